"""Export-only PyTorch ops (``torch.ops.lowbit_export.*``) and their ONNX translations.

:mod:`lowbit.onnx._layers` swaps each quantized layer for a module that calls one of these ops on
tensors already laid out for ONNX (e.g. uint8 codes ``w + 128``). ``torch.export`` sees only the
op's fake implementation (shapes); ``torch.onnx.export`` then calls the translation below, which
writes the standard ONNX subgraph:

* ``dynamic_linear``: per-token (or per-tensor) activation quantization with standard ops, then
  ``MatMulInteger`` (uint8 x uint8 by default: exact int32 sums on every CPU, where ONNX
  Runtime's u8 x s8 kernels saturate int16 pair sums on x86 without VNNI) and the float epilogue
  ``acc * s_w * s_x + bias``, the formula of lowbit's own kernels.
* ``static_linear`` / ``static_conv``: QDQ (``QuantizeLinear`` / ``DequantizeLinear`` with the
  calibrated scale and zero-point, per-channel weights, int32 bias) that ONNX Runtime fuses into
  ``QGemm`` / ``QLinearConv``.
  With ``fused`` (``export_onnx(exact="auto")``, the onnxruntime backend) the integer matmul
  and the weight scale of symmetric activations are com.microsoft ``MatMulIntegerToFloat``
  with unit activation scale: ONNX Runtime applies the weight scale in its GEMM's epilogue
  (the same bits, up to 1.5x faster at 1,024 rows), the row scale follows.
* ``dynamic_conv``: the activation quantized per tensor, ``ConvInteger`` and the float epilogue.
* ``matmul_nbits``: com.microsoft ``MatMulNBits`` (INT4 / INT8 weight-only).

The eager implementations exist only so the ops are complete; they raise (they never run:
``torch.export`` traces with fake tensors).
"""

from __future__ import annotations

from collections.abc import Sequence

import onnx
import torch
from onnxscript import opset18 as op
from onnxscript.values import Op, Opset

__all__ = ["TRANSLATIONS"]



def _matmul_nbits_schema() -> onnx.defs.OpSchema:
    """The com.microsoft ``MatMulNBits`` signature (onnx itself has no schema for it)."""
    p = onnx.defs.OpSchema.FormalParameter
    attr = onnx.defs.OpSchema.Attribute
    int_attr = onnx.defs.OpSchema.AttrType.INT
    return onnx.defs.OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[p("A", "T1"), p("B", "T2"), p("scales", "T1"), p("zero_points", "T3")],
        outputs=[p("Y", "T1")],
        type_constraints=[("T1", ["tensor(float)"], ""), ("T2", ["tensor(uint8)"], ""),
                          ("T3", ["tensor(uint8)"], "")],
        attributes=[attr(name, int_attr, "")
                    for name in ("K", "N", "bits", "block_size", "accuracy_level")])


def _matmul_integer_to_float_schema() -> onnx.defs.OpSchema:
    """The com.microsoft ``MatMulIntegerToFloat`` signature: ``MatMulInteger`` whose int32
    result the kernel converts and multiplies by ``a_scale * b_scale`` (``+ bias``)."""
    p = onnx.defs.OpSchema.FormalParameter
    optional = onnx.defs.OpSchema.FormalParameterOption.Optional
    return onnx.defs.OpSchema(
        "MatMulIntegerToFloat", "com.microsoft", 1,
        inputs=[p("A", "T1"), p("B", "T2"), p("a_scale", "T3"), p("b_scale", "T3"),
                p("a_zero_point", "T1", param_option=optional),
                p("b_zero_point", "T2", param_option=optional),
                p("bias", "T3", param_option=optional)],
        outputs=[p("Y", "T3")],
        type_constraints=[("T1", ["tensor(uint8)", "tensor(int8)"], ""),
                          ("T2", ["tensor(uint8)", "tensor(int8)"], ""),
                          ("T3", ["tensor(float)"], "")])


_MATMUL_NBITS = Op(Opset("com.microsoft", 1), "MatMulNBits", _matmul_nbits_schema())
_MATMUL_INTEGER_TO_FLOAT = Op(Opset("com.microsoft", 1), "MatMulIntegerToFloat",
                              _matmul_integer_to_float_schema())
_EPS = float(torch.finfo(torch.float32).eps)
_FLOAT, _UINT8, _INT32 = 1, 2, 6  # onnx.TensorProto data types


def _export_only(name: str) -> RuntimeError:
    return RuntimeError(f"torch.ops.lowbit_export.{name} only exists to be exported to ONNX "
                        "(lowbit.export_onnx); run the quantized model itself instead")


# ---------------------------------------------------------------------------------- ops
@torch.library.custom_op("lowbit_export::dynamic_linear", mutates_args=())
def dynamic_linear(x: torch.Tensor, w: torch.Tensor, w_zp: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, colsum: torch.Tensor, qmin: int, qmax: int,
                   spec_qmin: int, spec_qmax: int, off: int, per_token: bool,
                   symmetric: bool, fused: bool) -> torch.Tensor:
    """``x [M, K]`` float (any rank for per-tensor activations), ``w [K, N]`` codes (uint8 + 128,
    or int8) -> float ``[..., N]``; the activations become uint8 codes ``q - qmin``. ``fused``:
    symmetric activations' integer matmul and weight scale as ONNX Runtime's
    ``MatMulIntegerToFloat`` (same bits) instead of ``MatMulInteger`` + ``Cast`` + ``Mul``."""
    raise _export_only("dynamic_linear")


@dynamic_linear.register_fake
def _(x, w, w_zp, w_scale, bias, colsum, qmin, qmax, spec_qmin, spec_qmax, off, per_token,
      symmetric, fused):
    return x.new_empty(*x.shape[:-1], w.shape[1])


@torch.library.custom_op("lowbit_export::static_linear", mutates_args=())
def static_linear(x: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor,
                  x_range: Sequence[float], w: torch.Tensor, w_scale: torch.Tensor,
                  w_zp: torch.Tensor, bias_q: torch.Tensor | None,
                  bias_scale: torch.Tensor | None, bias: torch.Tensor | None) -> torch.Tensor:
    """``x [M, K]`` float, ``w [N, K]`` codes -> float ``[M, N]`` (QDQ + Gemm)."""
    raise _export_only("static_linear")


@static_linear.register_fake
def _(x, x_scale, x_zp, x_range, w, w_scale, w_zp, bias_q, bias_scale, bias):
    return x.new_empty(x.shape[0], w.shape[0])


def _conv_out(x: torch.Tensor, w: torch.Tensor, stride: Sequence[int], padding: Sequence[int],
              dilation: Sequence[int]) -> torch.Tensor:
    spatial = [(size + 2 * p - d * (k - 1) - 1) // s + 1 for size, k, s, p, d in zip(
        x.shape[2:], w.shape[2:], stride, padding, dilation, strict=True)]
    return x.new_empty(x.shape[0], w.shape[0], *spatial)


@torch.library.custom_op("lowbit_export::static_conv", mutates_args=())
def static_conv(x: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor,
                x_range: Sequence[float], w: torch.Tensor, w_scale: torch.Tensor,
                w_zp: torch.Tensor, bias_q: torch.Tensor | None, bias_scale: torch.Tensor | None,
                bias: torch.Tensor | None, stride: Sequence[int], padding: Sequence[int],
                dilation: Sequence[int], groups: int) -> torch.Tensor:
    """``x [B, C, *S]`` float, ``w [O, C/groups, *k]`` codes -> float (QDQ + Conv)."""
    raise _export_only("static_conv")


@static_conv.register_fake
def _(x, x_scale, x_zp, x_range, w, w_scale, w_zp, bias_q, bias_scale, bias, stride, padding,
      dilation, groups):
    return _conv_out(x, w, stride, padding, dilation)


@torch.library.custom_op("lowbit_export::dynamic_conv", mutates_args=())
def dynamic_conv(x: torch.Tensor, w: torch.Tensor, w_zp: torch.Tensor, w_scale: torch.Tensor,
                 bias: torch.Tensor | None, qmin: int, qmax: int, spec_qmin: int,
                 spec_qmax: int, off: int, symmetric: bool, integer: bool,
                 stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                 groups: int) -> torch.Tensor:
    """``x [B, C, *S]`` float, ``w`` codes (uint8 + 128, or int8) -> float (per tensor)."""
    raise _export_only("dynamic_conv")


@dynamic_conv.register_fake
def _(x, w, w_zp, w_scale, bias, qmin, qmax, spec_qmin, spec_qmax, off, symmetric, integer,
      stride, padding, dilation, groups):
    return _conv_out(x, w, stride, padding, dilation)


@torch.library.custom_op("lowbit_export::matmul_nbits", mutates_args=())
def matmul_nbits(x: torch.Tensor, b: torch.Tensor, scales: torch.Tensor, zp: torch.Tensor,
                 bias: torch.Tensor | None, k: int, n: int, bits: int, block_size: int,
                 accuracy_level: int) -> torch.Tensor:
    """``x [M, K]`` float -> float ``[M, N]`` (com.microsoft MatMulNBits; ``accuracy_level``
    4: ONNX Runtime quantizes x to int8 per block, as lowbit's INT4 x INT8 kernel does)."""
    raise _export_only("matmul_nbits")


@matmul_nbits.register_fake
def _(x, b, scales, zp, bias, k, n, bits, block_size, accuracy_level):
    return x.new_empty(x.shape[0], n)


# --------------------------------------------------------------------------- translations
def _ints(values: Sequence[int]) -> object:
    return op.Constant(value_ints=list(values))


def _quantize_dynamic(x, per_token: bool, symmetric: bool, qmin: int, qmax: int,
                      spec_qmin: int, spec_qmax: int, off: int):
    """uint8 codes ``q - qmin`` of float ``x`` with lowbit's dynamic qparams (``q + 128`` for
    8-bit codes, ``q + 64`` in ``[0, 127]`` for 7-bit ones).

    Returns ``(codes uint8 like x, scale [M, 1] or [], zero_point)``: the zero-point is None for
    symmetric activations (the codes then carry ``-qmin``), else the float signed zero-point.
    Symmetric: ``scale = max(max|x| / qmax, eps)``, then ``QuantizeLinear`` of
    ``x * (1 / scale)`` with unit scale and zero-point ``-qmin`` (saturation is never reached:
    ``|x / scale| <= qmax``). Affine: lowbit's ``choose_qparams`` and
    ``clamp(round(x * (1 / scale)) + zp, qmin, qmax)`` written out in standard ops.
    """
    axes = _ints([1]) if per_token else None
    if symmetric:
        amax = op.ReduceMax(op.Abs(x), axes, keepdims=1)  # [M, 1] or [1, 1]
        scale = op.Max(op.Div(amax, op.Constant(value_float=float(qmax))),
                       op.Constant(value_float=_EPS))
        if not per_token:
            scale = op.Reshape(scale, _ints([]))
        # x * (1 / scale) as lowbit rounds it (QuantizeLinear divides: a code apart on ties)
        codes = op.QuantizeLinear(op.Mul(x, op.Reciprocal(scale)), op.Constant(value_float=1.0),
                                  op.Constant(value=_u8_scalar(-qmin)))
        return codes, scale, None
    zero = op.Constant(value_float=0.0)
    lo = op.Min(op.ReduceMin(x, axes, keepdims=1), zero)
    hi = op.Max(op.ReduceMax(x, axes, keepdims=1), zero)
    scale = op.Max(op.Div(op.Sub(hi, lo), op.Constant(value_float=float(spec_qmax - spec_qmin))),
                   op.Constant(value_float=_EPS))
    zp = op.Clip(op.Sub(op.Constant(value_float=float(spec_qmin)), op.Round(op.Div(lo, scale))),
                 op.Constant(value_float=float(spec_qmin)),
                 op.Constant(value_float=float(spec_qmax)))
    zp = op.Add(zp, op.Constant(value_float=float(off)))  # signed-equivalent zero-point
    q = op.Clip(op.Add(op.Round(op.Mul(x, op.Reciprocal(scale))), zp),
                op.Constant(value_float=float(qmin)), op.Constant(value_float=float(qmax)))
    codes = op.Cast(op.Add(q, op.Constant(value_float=float(-qmin))), to=_UINT8)
    if not per_token:
        scale, zp = op.Reshape(scale, _ints([])), op.Reshape(zp, _ints([]))
    return codes, scale, zp


def _u8_scalar(value: int) -> onnx.TensorProto:
    return onnx.helper.make_tensor("value", _UINT8, [], [value])


def _is_dynamic_quantize_linear(per_token: bool, symmetric: bool, spec_qmin: int,
                                spec_qmax: int) -> bool:
    """Whether the activation spec is ``DynamicQuantizeLinear``'s: uint8, affine, per tensor."""
    return not per_token and not symmetric and (spec_qmin, spec_qmax) == (0, 255)


def _dynamic_linear(x, w, w_zp, w_scale, bias, colsum, qmin: int, qmax: int, spec_qmin: int,
                    spec_qmax: int, off: int, per_token: bool, symmetric: bool, fused: bool):
    if _is_dynamic_quantize_linear(per_token, symmetric, spec_qmin, spec_qmax):
        # ORT's own dynamic-quantization pattern, which it fuses into DynamicQuantizeMatMul
        codes, scale, zp = op.DynamicQuantizeLinear(x)
        acc = op.MatMulInteger(codes, w, zp, w_zp)
        y = op.Mul(op.Cast(acc, to=_FLOAT), op.Mul(scale, w_scale))
        return y if bias is None else op.Add(y, bias)
    codes, scale, zp = _quantize_dynamic(x, per_token, symmetric, qmin, qmax, spec_qmin,
                                         spec_qmax, off)
    if fused and zp is None:  # ORT converts and scales in its GEMM's epilogue: the same bits
        y = _MATMUL_INTEGER_TO_FLOAT(codes, w, op.Constant(value_float=1.0), w_scale,
                                     op.Constant(value=_u8_scalar(-qmin)), w_zp)
        y = op.Mul(y, scale)
        return y if bias is None else op.Add(y, bias)
    acc = op.MatMulInteger(codes, w, op.Constant(value=_u8_scalar(-qmin)), w_zp)  # [M, N] int32
    if zp is not None:  # sum_k (q - zp)(w - w_zp) = acc - zp * colsum
        acc = op.Sub(acc, op.Mul(op.Cast(zp, to=_INT32), colsum))
    y = op.Mul(op.Mul(op.Cast(acc, to=_FLOAT), w_scale), scale)
    return y if bias is None else op.Add(y, bias)


def _qdq_input(x, x_scale, x_zp, x_range: Sequence[float]):
    if x_range:  # fewer than 8 bits: clamp to the codes' float range first (lowbit's clamp)
        x = op.Clip(x, op.Constant(value_float=float(x_range[0])),
                    op.Constant(value_float=float(x_range[1])))
    return op.DequantizeLinear(op.QuantizeLinear(x, x_scale, x_zp), x_scale, x_zp)


def _bias(bias_q, bias_scale, bias):
    if bias_q is not None:
        return op.DequantizeLinear(bias_q, bias_scale, axis=0)
    return bias


def _static_linear(x, x_scale, x_zp, x_range: Sequence[float], w, w_scale, w_zp, bias_q,
                   bias_scale, bias):
    xd = _qdq_input(x, x_scale, x_zp, x_range)
    wd = op.DequantizeLinear(w, w_scale, w_zp, axis=0)
    b = _bias(bias_q, bias_scale, bias)
    return op.Gemm(xd, wd, transB=1) if b is None else op.Gemm(xd, wd, b, transB=1)


def _conv_attrs(stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                groups: int) -> dict:
    return {"strides": list(stride), "pads": list(padding) * 2, "dilations": list(dilation),
            "group": groups}


def _static_conv(x, x_scale, x_zp, x_range: Sequence[float], w, w_scale, w_zp, bias_q,
                 bias_scale, bias, stride: Sequence[int], padding: Sequence[int],
                 dilation: Sequence[int], groups: int):
    xd = _qdq_input(x, x_scale, x_zp, x_range)
    wd = op.DequantizeLinear(w, w_scale, w_zp, axis=0)
    b = _bias(bias_q, bias_scale, bias)
    attrs = _conv_attrs(stride, padding, dilation, groups)
    return op.Conv(xd, wd, **attrs) if b is None else op.Conv(xd, wd, b, **attrs)


def _dynamic_conv(x, w, w_zp, w_scale, bias, qmin: int, qmax: int, spec_qmin: int,
                  spec_qmax: int, off: int, symmetric: bool, integer: bool,
                  stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                  groups: int):
    if _is_dynamic_quantize_linear(False, symmetric, spec_qmin, spec_qmax):
        codes, scale, zp_u8 = op.DynamicQuantizeLinear(x)
    else:
        codes, scale, zp = _quantize_dynamic(x, False, symmetric, qmin, qmax, spec_qmin,
                                             spec_qmax, off)
        zp_u8 = (op.Constant(value=_u8_scalar(-qmin)) if zp is None
                 else op.Cast(op.Add(zp, op.Constant(value_float=float(-qmin))), to=_UINT8))
    attrs = _conv_attrs(stride, padding, dilation, groups)
    bshape = _ints([-1] + [1] * len(stride))  # [O, 1, (1)]
    if integer:  # ConvInteger pads with the zero-point: zero padding stays exact
        acc = op.ConvInteger(codes, w, zp_u8, w_zp, **attrs)
        y = op.Mul(op.Mul(op.Cast(acc, to=_FLOAT), op.Reshape(w_scale, bshape)), scale)
    else:  # per-channel weight zero-points: ConvInteger takes one; dequantize both sides
        xd = op.DequantizeLinear(codes, scale, zp_u8)
        y = op.Conv(xd, op.DequantizeLinear(w, w_scale, w_zp, axis=0), **attrs)
    return y if bias is None else op.Add(y, op.Reshape(bias, bshape))


def _matmul_nbits(x, b, scales, zp, bias, k: int, n: int, bits: int, block_size: int,
                  accuracy_level: int):
    y = _MATMUL_NBITS(x, b, scales, zp, K=k, N=n, bits=bits, block_size=block_size,
                      accuracy_level=accuracy_level)
    return y if bias is None else op.Add(y, bias)


def _gelu(self, approximate: str = "none"):  # aten's argument names: the exporter matches them
    """``aten.gelu`` (float layers between lowbit's) in the operand order ONNX Runtime fuses.

    The exporter's own translation writes ``x * (0.5 * (1 + erf(x / sqrt 2)))``, which ONNX
    Runtime 1.32 leaves as five elementwise passes; ``(x * (1 + erf(x / sqrt 2))) * 0.5`` is
    its ``Gelu`` pattern: one pass, 2.0-2.3x faster on 1,024 x 1,536 (``docs/backends.md``).
    Standard opset-18 operators either way, the same function to an ulp.
    """
    x = self

    def const(value: float):
        return op.CastLike(op.Constant(value_float=value), x)

    if approximate == "tanh":  # 0.5 x (1 + tanh(sqrt(2 / pi) (x + 0.044715 x^3)))
        inner = op.Mul(const(0.7978845608028654),
                       op.Add(x, op.Mul(const(0.044715), op.Mul(op.Mul(x, x), x))))
        return op.Mul(op.Mul(x, op.Add(op.Tanh(inner), const(1.0))), const(0.5))
    erf = op.Erf(op.Div(x, const(1.4142135623730951)))
    return op.Mul(op.Mul(x, op.Add(erf, const(1.0))), const(0.5))


#: ``custom_translation_table`` for ``torch.onnx.export``.
TRANSLATIONS = {
    torch.ops.aten.gelu.default: _gelu,
    torch.ops.lowbit_export.dynamic_linear.default: _dynamic_linear,
    torch.ops.lowbit_export.static_linear.default: _static_linear,
    torch.ops.lowbit_export.static_conv.default: _static_conv,
    torch.ops.lowbit_export.dynamic_conv.default: _dynamic_conv,
    torch.ops.lowbit_export.matmul_nbits.default: _matmul_nbits,
}
