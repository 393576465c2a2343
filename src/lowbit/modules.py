"""Quantized modules that run on integer kernels; conversion dispatch and support checks.

INT8 x INT8 modules live here (:class:`QuantizedLinear`, :class:`QuantizedConv2d`,
:class:`QuantizedConv1d`); weight-only ones (:class:`Int4Linear`, :class:`Int8WeightOnlyLinear`,
:class:`QuantizedEmbedding`, :class:`WeightOnlyConv2d`, :class:`WeightOnlyConv1d`) in
``modules_weight_only.py``. All hold plain buffers (see ``docs/design.md``): ``weight`` (int8
codes, or uint8 packed nibbles for <= 4 bits), ``weight_scale`` float32, ``weight_zero_point``
int32, ``bias`` float32, and for static activations ``input_scale`` / ``input_zero_point``.
Kernel caches are non-persistent and rebuilt by ``_refresh_cache()`` after ``load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit._qmodule import (
    ConvAttributes,
    QuantizedModuleBase,
    carry_hooks,
    check_conv_geometry,
    check_conv_input,
    conv_geometry,
    default_conv_geometry,
    quantize_weight,
)
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.dropin import forward_override, is_hf_conv1d, linear_from_conv1d
from lowbit.kernels import (
    CODES_DIRECT_MAX_MACS,
    CUDA_INT_MM_MIN_ROWS,
    FUSED_GEMMS,
    NATIVE_DTYPES,
    conv2d_fused,
    fused_linear_layout,
    int8_conv2d,
    int8_linear,
    native_lib_for,
    quantize_activation,
    run_fused_linear,
    select_kernel,
    vnni_c_gemm_rows,
)
from lowbit.kernels.plans import Plan, conv_codes_plan, linear_plan
from lowbit.modules_rnn import (
    RNN_TYPES,
    QuantizedGRU,
    QuantizedGRUCell,
    QuantizedLSTM,
    QuantizedLSTMCell,
    QuantizedRNN,
    QuantizedRNNCell,
    rnn_unsupported_reason,
)
from lowbit.modules_weight_only import (
    Int4Linear,
    Int8WeightOnlyLinear,
    QuantizedEmbedding,
    WeightOnlyConv1d,
    WeightOnlyConv2d,
)
from lowbit.ops import choose_qparams, compute_range, dequantize, quantize_bias
from lowbit.qgrad import frozen_forward

__all__ = [
    "QUANTIZABLE_TYPES",
    "QUANTIZED_MODULES",
    "Int4Linear",
    "Int8WeightOnlyLinear",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedEmbedding",
    "QuantizedGRU",
    "QuantizedGRUCell",
    "QuantizedLSTM",
    "QuantizedLSTMCell",
    "QuantizedLinear",
    "QuantizedRNN",
    "QuantizedRNNCell",
    "WeightOnlyConv1d",
    "WeightOnlyConv2d",
    "check_supported",
    "convert_module",
    "module_from_meta",
]

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding,
                                                  *RNN_TYPES)


class _Int8Base(QuantizedModuleBase):
    """Buffers and activation handling shared by the INT8 x INT8 modules."""

    _plans_cast_bf16 = True  # (bfloat16 in: widened exactly; out: rounded to nearest even)

    def _init_int8(self, weight_shape: tuple[int, ...], has_bias: bool, weight_spec: QuantSpec,
                   act_spec: QuantSpec, mode: str) -> None:
        self.weight_spec, self.act_spec, self.mode = weight_spec, act_spec, mode
        n = weight_shape[0]
        qshape = () if weight_spec.granularity == "per_tensor" else (n,)
        self.register_buffer("weight", torch.zeros(weight_shape, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(qshape))
        self.register_buffer("weight_zero_point", torch.zeros(qshape, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(n) if has_bias else None)
        if mode == "static":
            self.register_buffer("input_scale", torch.tensor(1.0))
            self.register_buffer("input_zero_point", torch.tensor(0, dtype=torch.int32))
        # signed-equivalent activation code range (unsigned specs shift by -2^(bits-1), which
        # maps the symmetric unsigned midpoint to 0)
        off = 0 if act_spec.signed else -(2 ** (act_spec.bits - 1))
        self._act_off, self._qmin, self._qmax = off, act_spec.qmin + off, act_spec.qmax + off
        self.register_buffer("_w_scale", torch.ones(n), persistent=False)  # (N,) float32
        self.register_buffer("_colsum", torch.zeros(n, dtype=torch.int32), persistent=False)
        self.register_buffer("_comp", None, persistent=False)  # (N,) zp * colsum, static zp != 0
        self.register_buffer("_w_zp", None, persistent=False)  # (N,) int32, None when all 0
        self._fused_args: tuple | None = None  # set by _refresh_cache
        self._dynamic_affine = False  # set by _refresh_cache
        # the bias the kernels add: derived, rebuilt by _refresh_cache (also after .to()); a
        # plain attribute, since it may be `bias` itself (torch.jit.trace checks for a tensor
        # held by two buffers before it runs anything)
        self._bias: torch.Tensor | None = None

    def _check_int32_sums(self, w2d: torch.Tensor, w_zp: torch.Tensor) -> None:
        if int32_sums_may_overflow(w2d, w_zp, self.act_spec):
            raise ValueError(
                f"{self._label()}: its INT8 x INT8 sums could pass int32 (K = {w2d.shape[1]} "
                "with these weights) and wrap around; quantize this layer as INT8 weight-only "
                "(lowbit's quantizers choose that for it) or keep it float")

    def _refresh_cache(self) -> None:
        n = self.qweight.shape[0]
        w2d = self.qweight.reshape(n, -1)  # (N, K)
        self._w_scale = self.weight_scale.float().expand(n).contiguous()
        w_zp = self.weight_zero_point.to(torch.int32).expand(n).contiguous()
        self._check_int32_sums(w2d, w_zp)
        self._w_zp = w_zp if bool(w_zp.any()) else None
        self._colsum = w2d.sum(1, dtype=torch.int32) - w2d.shape[1] * w_zp  # sum_k (w - w_zp)
        self._comp = None
        bias = self.bias  # the bias the kernels add
        if self.mode == "static":
            spec = self.act_spec
            if not spec.qmin <= int(self.input_zero_point) <= spec.qmax:  # (a modified file)
                raise ValueError(f"{self._label()}: input_zero_point {int(self.input_zero_point)} "
                                 f"is outside its activation codes [{spec.qmin}, {spec.qmax}]; "
                                 "calibrate the float model again")
            zp = self.input_zero_point.to(torch.int32) + self._act_off
            self._comp = zp * self._colsum if bool(zp != 0) else None
            # int32 at scale s_x * s_w, as ONNX Runtime's QLinearConv / QGemm add it
            qb = None if self.bias is None else quantize_bias(self.bias, self.input_scale,
                                                                self._w_scale)
            if qb is not None:
                bias = qb[0].float() * qb[1]
        self._bias = bias
        # the fused C path (lowbit.native): symmetric weights, symmetric or static activations;
        # its tensors gathered once (module attribute lookups cost ~0.5 us each at batch 1)
        static = self.mode == "static"
        scale = self.input_scale.float() if static else None
        zp = self._static_zero_point() if static else None
        # dynamic affine per-tensor activations (ONNX's DynamicQuantizeLinear scheme): the
        # qparams come from one min/max pass per call, then the static form of the C call
        self._dynamic_affine = (not static and not self.act_spec.symmetric
                                and self.act_spec.granularity == "per_tensor")
        fusable = (self.backend == "auto" and self._w_zp is None
                   and (static or self.act_spec.symmetric or self._dynamic_affine)
                   and fused_linear_layout(self.qweight, self._w_scale, self._bias, self._comp,
                                           scale, zp))
        self._fused_args = (self.qweight, self._w_scale, self._colsum, self._bias, scale, zp,
                            self._comp) if fusable else None
        self._reset_plans(fusable and self.qweight.is_cpu)

    def _static_zero_point(self) -> torch.Tensor | None:
        """Signed static activation zero-point, None when it is 0 (no compensation needed)."""
        return None if self._comp is None else self.input_zero_point + self._act_off

    def _quantize_input(self, x: torch.Tensor, per_token: bool
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """int8 codes, scale and signed zero-point (None when 0) of the activations."""
        native = self.backend == "auto"  # "reference" / "torch": no C
        if self.mode == "static":
            return quantize_activation(x, self._qmin, self._qmax, self.input_scale,
                                       self._static_zero_point(), native=native)
        if self.act_spec.symmetric:
            return quantize_activation(x, self._qmin, self._qmax, per_token=per_token,
                                       native=native)
        scale, zp = self._affine_qparams(x, per_token)
        return quantize_activation(x, self._qmin, self._qmax, scale, zp, native=native)

    def _affine_qparams(self, x: torch.Tensor, per_token: bool = False
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and signed-equivalent zero-point of dynamic affine activations ``x`` (per
        tensor, or per row), as ``lowbit.ops.choose_qparams`` computes them."""
        spec = self.act_spec if per_token else self.act_spec.with_(granularity="per_tensor")
        if x.numel() == 0:  # an empty batch: no value reads the qparams
            scale, zp = torch.ones(()), torch.zeros((), dtype=torch.int32)
        else:
            scale, zp = choose_qparams(*compute_range(x, spec, self.name), spec)
        return scale, zp + self._act_off

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight ``(q - zp) * scale`` (same as ``lowbit.ops.dequantize``)."""
        return dequantize(self.qweight, self.weight_scale, self.weight_zero_point, self.weight_spec)

    def _spec_meta(self) -> dict[str, Any]:
        return {"weight_spec": self.weight_spec.to_dict(),
                "activation_spec": self.act_spec.to_dict(), "mode": self.mode,
                "bias": self.bias is not None}

    @classmethod
    def _init_from(cls, module: nn.Module, config: QuantizationConfig, **kw: Any) -> dict:
        assert config.activations is not None
        return {"weight_spec": config.weights, "act_spec": config.activations, "mode": config.mode,
                "has_bias": module.bias is not None, "orig_dtype": str(module.weight.dtype)[6:],
                **kw}

    def _fill(self, module: nn.Module, input_qparams: Any, weight_qparams: Any) -> None:
        kind = type(module).__name__
        q, s, z = quantize_weight(module.weight, self.weight_spec, self.name, kind, weight_qparams)
        self.qweight.copy_(q)
        self.weight_scale.copy_(s.reshape(self.weight_scale.shape))
        self.weight_zero_point.copy_(z.reshape(self.weight_zero_point.shape))
        if self.bias is not None:
            self.bias.copy_(module.bias.detach().float())
        if self.mode == "static":
            if input_qparams is None:
                raise ValueError(f"{self.name or kind}: mode='static' needs input_qparams=(scale, "
                                 "zero_point) from calibration")
            self.input_scale.fill_(float(torch.as_tensor(input_qparams[0]).reshape(())))
            self.input_zero_point.fill_(int(torch.as_tensor(input_qparams[1]).reshape(())))
        self._refresh_cache()


INT32_MAX = 2**31 - 1


def _int32_span(act: QuantSpec) -> int:
    """The widest activation code distance ``|q - zp|`` (128 symmetric 8-bit, 255 affine)."""
    return max(-act.qmin, act.qmax) if act.symmetric else act.qmax - act.qmin


def int32_fits_any_codes(k: int, act: QuantSpec) -> bool:
    """Whether an INT8 x INT8 sum over ``k`` products stays in int32 whatever the weight codes
    (``|w - w_zp| <= 255``): K up to 65,793 with symmetric 8-bit activations.

    Example:
        >>> int32_fits_any_codes(4096, QuantSpec()), int32_fits_any_codes(140_000, QuantSpec())
        (True, False)
    """
    return _int32_span(act) * 256 * k <= INT32_MAX


def int32_sums_may_overflow(codes: torch.Tensor, zero_point: torch.Tensor,
                            act: QuantSpec) -> bool:
    """Whether ``sum_k (q_k - zp) (w_nk - w_zp_n)`` can pass int32 for some activation codes,
    for weight ``codes [N, K]`` and their zero-points (one, or one per row): what every INT8 x
    INT8 kernel sums in int32 (ONNX Runtime's and fbgemm's too).

    Example:
        >>> codes = torch.full((1, 140_000), 127, dtype=torch.int8)
        >>> zp = torch.zeros(1, dtype=torch.int32)
        >>> int32_sums_may_overflow(codes, zp, QuantSpec()), int32_sums_may_overflow(
        ...     codes[:, :4096], zp, QuantSpec())
        (True, False)
    """
    if int32_fits_any_codes(codes.shape[1], act):
        return False
    zp = zero_point.to(torch.int32).reshape(-1).expand(codes.shape[0])
    worst = max(int((codes[i:i + 64].to(torch.int32) - zp[i:i + 64, None]).abs().sum(1).max())
                for i in range(0, codes.shape[0], 64))
    return _int32_span(act) * worst > INT32_MAX


class QuantizedLinear(_Int8Base):
    """INT8 weights x INT8 activations (dynamic per-token/per-tensor, or static) linear layer.

    ``y = s_x * s_w[n] * ((q_x - zp_x) @ q_w.T)[m, n] + bias[n]`` with INT32 accumulation on
    ``torch._int_mm`` (see ``lowbit.kernels``). Float in, float out (input dtype preserved).
    Static layers add their bias as int32 codes at scale ``s_x * s_w[n]``
    (:func:`lowbit.ops.quantize_bias`, as ONNX Runtime, fbgemm and TensorRT do; the saved
    ``bias`` stays float). Dynamic activation qparams are computed per call: symmetric per token
    or per tensor, or affine per tensor (ONNX's ``DynamicQuantizeLinear``, bit for bit).

    Args:
        in_features: input features.
        out_features: output features.
        has_bias: whether the layer has a bias.
        weight_spec: signed per-channel (axis 0) or per-tensor spec of at most 8 bits,
            symmetric or affine (a weight zero-point costs one row sum per call).
        act_spec: activation spec (at most 8 bits, signed or unsigned; per_token or
            per_tensor).
        mode: ``"dynamic"`` or ``"static"``.
        **kw: ``backend``, ``name``, ``fused_relu``, ``orig_dtype``, ``meta_extra``; see
            :meth:`from_float`.

    Example:
        >>> fc = nn.Linear(16, 8)
        >>> q = QuantizedLinear.from_float(fc, QuantizationConfig.int8_dynamic(), name="fc")
        >>> x = torch.randn(3, 16)
        >>> q.qweight.dtype, bool(torch.nn.functional.cosine_similarity(
        ...     q(x).flatten(), fc(x).flatten(), dim=0) > 0.99)
        (torch.int8, True)
    """

    def __init__(self, in_features: int, out_features: int, has_bias: bool = True, *,
                 weight_spec: QuantSpec | None = None, act_spec: QuantSpec | None = None,
                 mode: str = "dynamic", **kw: Any) -> None:
        super().__init__(**kw)
        self.in_features, self.out_features = in_features, out_features
        self._init_int8((out_features, in_features), has_bias,
                        weight_spec or QuantSpec.int8_weight(),
                        act_spec or QuantSpec.int8_dynamic_activation(), mode)

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantizationConfig, *,
                   input_qparams: Any = None, weight_qparams: Any = None, fused_relu: bool = False,
                   name: str = "", meta_extra: Mapping[str, Any] | None = None,
                   backend: str = "auto") -> QuantizedLinear:
        """Quantize a float ``nn.Linear``.

        Args:
            module: the float layer. config: its resolved config (dynamic or static).
            input_qparams: ``(scale, zero_point)`` of static activations.
            weight_qparams: ``(scale, zero_point)`` overriding the weight qparams (QAT).
            fused_relu: apply ReLU to the output. name: layer name for errors and meta.
            meta_extra: JSON-compatible extras for :meth:`meta` (calibrator, observed range).
            backend: ``"auto"`` or ``"reference"``.

        Raises:
            ValueError: NaN/Inf weights, or static mode without ``input_qparams``.
        """
        q = cls(module.in_features, module.out_features,
                **cls._init_from(module, config, fused_relu=fused_relu, name=name,
                                 meta_extra=meta_extra, backend=backend))
        q._fill(module, input_qparams, weight_qparams)
        return q

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> QuantizedLinear:
        """An empty module of the shapes in ``meta`` (fill it with ``load_state_dict``)."""
        return cls(meta["in_features"], meta["out_features"], meta["bias"],
                   weight_spec=QuantSpec.from_dict(meta["weight_spec"]),
                   act_spec=QuantSpec.from_dict(meta["activation_spec"]), mode=meta["mode"],
                   **cls._common(meta))

    def _shape_meta(self) -> dict[str, Any]:
        return {"in_features": self.in_features, "out_features": self.out_features,
                **self._spec_meta()}

    def _kernel(self, m: int, device: str) -> str:
        return select_kernel("int8_linear", m, backend=self.backend, k=self.in_features,
                             n=self.out_features, device=device)

    _plans_fuse_smoothing = True

    def _make_plan(self, x: torch.Tensor, smooth: torch.Tensor | None = None) -> Plan | None:
        lib = native_lib_for(x)
        if lib is None or x.dim() == 0 or x.shape[-1] != self.in_features:
            return None  # (the body raises for a wrong shape)
        m = x.numel() // self.in_features
        w, w_scale, _colsum, bias, scale, zp, comp = self._fused_args  # type: ignore[misc]
        spec = self.act_spec
        affine = (_colsum, spec.qmin, spec.qmax, self._act_off) if self._dynamic_affine else None
        return linear_plan(lib, tuple(x.shape), self._kernel(m, "cpu"), w, w_scale, bias,
                           spec.granularity == "per_token", scale, zp, comp, self.fused_relu,
                           self._qmin, self._qmax, affine, smooth)

    def kernel_info(self) -> str | dict[str, str]:
        """The INT8 GEMM, e.g. ``"s8_avx2"`` (the same at every M on most CPUs); where it
        changes with the rows M, ``{"M<=T": small, "M>T": large}``: on CUDA ``{"M<=16":
        "reference", "M>16": "int_mm_s8s8"}`` where ``_int_mm`` takes the shape, on the
        ``avx512_vnni`` path lowbit's C GEMM up to T rows, then ``"int_mm_s8s8"``."""
        device = self.qweight.device.type
        small, large = self._kernel(1, device), self._kernel(1 << 40, device)
        if small == large:
            return small
        t = (CUDA_INT_MM_MIN_ROWS if device != "cpu" else
             vnni_c_gemm_rows(self.out_features, self.in_features))
        return {f"M<={t}": small, f"M>{t}": large}

    def _fused_smoothing(self, x: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor | None:
        spec = self.act_spec
        if (self.mode == "static" or self._dynamic_affine or spec.granularity != "per_token"
                or not spec.symmetric or (torch.is_grad_enabled() and x.requires_grad)
                or smoothing.dtype != torch.float32):
            return None
        x = self._input(x, self.in_features)  # (refreshes the kernel caches if need be)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        kernel = self._kernel(x2.shape[0], x2.device.type)
        if (self._fused_args is None or x2.stride(-1) != 1 or kernel not in FUSED_GEMMS
                or (lib := native_lib_for(x2)) is None):
            return None
        w, w_scale, colsum, bias, _scale, _zp, _comp = self._fused_args
        y = run_fused_linear(lib, x2, self._qmin, self._qmax, w, w_scale, colsum, bias, True,
                             None, None, None, self.fused_relu, kernel, smoothing)
        y = self._gelu(y)
        return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize ``x`` (..., K), run the INT8 GEMM, return float (..., N) in x's dtype."""
        if torch.is_grad_enabled() and getattr(x, "requires_grad", False):
            return frozen_forward(self, x)  # an adapter or float layer before it trains
        x = self._input(x, self.in_features)
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        kernel = self._kernel(x2.shape[0], x2.device.type)
        per_token = self.act_spec.granularity == "per_token"
        bad = None  # per-token symmetric scales keep a NaN / Inf row's effect in that row
        if self.mode == "static" or not (per_token and self.act_spec.symmetric):
            x2, bad = self._finite_rows(x2, "static" if self.mode == "static" else "per-tensor")
        fa = self._fused_args  # quantize, GEMM, epilogue: 1-3 C / GEMM calls, not ~12 ops
        if (fa is not None and x2.dtype in NATIVE_DTYPES and x2.stride(-1) == 1
                and kernel in FUSED_GEMMS
                and (lib := native_lib_for(x2)) is not None):
            w, w_scale, colsum, bias, scale, zp, comp = fa
            if self._dynamic_affine:  # this call's qparams, then the static form of the call
                scale, zp = self._affine_qparams(x2)
                comp = zp * colsum
            y = run_fused_linear(lib, x2, self._qmin, self._qmax, w, w_scale, colsum, bias,
                                 per_token, scale, zp, comp, self.fused_relu, kernel)
            y = self._gelu(self._nan_rows(y, bad))
            return y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.out_features)
        q, s, zp = self._quantize_input(x2, per_token)
        y = int8_linear(q, s, zp, self.qweight, self._w_scale, self._colsum, self._bias,
                        relu=self.fused_relu, kernel=kernel, comp=self._comp,
                        w_zp=self._w_zp)  # (M, N)
        y = self._nan_rows(y, bad)
        return self._gelu(y.reshape(*x.shape[:-1], self.out_features).to(x.dtype))

    def extra_repr(self) -> str:
        gelu = "" if self.fused_gelu is None else f", fused_gelu={self.fused_gelu!r}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"mode={self.mode}, act={self.act_spec.granularity}, "
                f"fused_relu={self.fused_relu}{gelu}, backend={self.backend}")


class QuantizedConv2d(ConvAttributes, _Int8Base):
    """INT8 x INT8 Conv2d (static, or dynamic with per-tensor activation qparams).

    ``weight`` keeps the conv shape ``[O, C/groups, kh, kw]`` as int8. Per-token activation specs
    are applied per tensor for convs. Small reduction sizes (``C/groups * kh * kw``) run an exact
    fp32 conv on the codes (``"fp32_codes_conv"``); ``groups > 1`` with a larger one runs the
    reference path (see ``meta``).

    Example:
        >>> conv = nn.Conv2d(3, 8, 3, padding=1)
        >>> q = QuantizedConv2d.from_float(conv, QuantizationConfig.int8_dynamic(), name="c")
        >>> x = torch.randn(2, 3, 8, 8)
        >>> q(x).shape, bool(torch.nn.functional.cosine_similarity(
        ...     q(x).flatten(), conv(x).flatten(), dim=0) > 0.99)
        (torch.Size([2, 8, 8, 8]), True)
    """

    _dims = 2

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, ...],
                 has_bias: bool = True, *, geometry: Mapping[str, Any] | None = None,
                 weight_spec: QuantSpec | None = None, act_spec: QuantSpec | None = None,
                 mode: str = "dynamic", **kw: Any) -> None:
        super().__init__(**kw)
        d = self._dims
        self._conv_args: tuple | None = None  # set by _refresh_cache
        self.geometry = dict(geometry or default_conv_geometry(d))
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size = tuple(kernel_size)
        check_conv_geometry(self.geometry, list(self.kernel_size), in_channels, out_channels, d,
                            self._label())  # also for from_meta and direct construction
        shape = (out_channels, in_channels // self.geometry["groups"], *self.kernel_size)
        self._init_int8(shape, has_bias, weight_spec or QuantSpec.int8_weight(),
                        act_spec or QuantSpec.int8_dynamic_activation(), mode)
        self._codes_cache: tuple[int, torch.Tensor] | None = None  # see _weight_cache
        self._cols_cache: tuple[int, torch.Tensor] | None = None

    @classmethod
    def from_float(cls, module: nn.Module, config: QuantizationConfig, *,
                   input_qparams: Any = None, weight_qparams: Any = None, fused_relu: bool = False,
                   name: str = "", meta_extra: Mapping[str, Any] | None = None,
                   backend: str = "auto") -> QuantizedConv2d:
        """Quantize a float conv; arguments as :meth:`QuantizedLinear.from_float`."""
        q = cls(module.in_channels, module.out_channels, module.kernel_size,
                geometry=conv_geometry(module, name),
                **cls._init_from(module, config, fused_relu=fused_relu, name=name,
                                 meta_extra=meta_extra, backend=backend))
        q._fill(module, input_qparams, weight_qparams)
        return q

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> QuantizedConv2d:
        """An empty module of the shapes in ``meta`` (fill it with ``load_state_dict``)."""
        return cls(meta["in_channels"], meta["out_channels"], meta["kernel_size"], meta["bias"],
                   geometry=meta["geometry"], weight_spec=QuantSpec.from_dict(meta["weight_spec"]),
                   act_spec=QuantSpec.from_dict(meta["activation_spec"]), mode=meta["mode"],
                   **cls._common(meta))

    def _shape_meta(self) -> dict[str, Any]:
        return {"in_channels": self.in_channels, "out_channels": self.out_channels,
                "kernel_size": list(self.kernel_size), "geometry": dict(self.geometry),
                "activation_granularity_used": "per_tensor", **self._spec_meta()}

    def _conv_kernel(self, rows: int) -> str:
        """The kernel for ``rows`` = batch x input pixels (an upper bound of the output pixels,
        known before the call)."""
        g = self.geometry
        return select_kernel("int8_conv2d", rows, backend=self.backend, groups=g["groups"],
                             k=self.qweight[0].numel(), n=self.out_channels,
                             unit_stride=g["stride"][-1] == 1, device=self.qweight.device.type)

    def kernel_info(self) -> str | dict[str, str]:
        """``"fp32_codes_conv"`` for a small K, else the INT8 GEMM after im2col (or reference);
        ``{"M<=X": "fp32_codes_conv", "M>X": ...}`` when small calls (M = batch x input
        pixels) run the direct C conv over the codes (or, on the ``avx512_vnni`` path,
        lowbit's C GEMM: ``{"M<=X": "s8_avx512_vnni", "M>X": "int_mm_s8s8"}``)."""
        small, large = self._conv_kernel(1), self._conv_kernel(1 << 40)
        if small == large:
            return small
        n, k = self.out_channels, self.qweight[0].numel()
        limit = (CUDA_INT_MM_MIN_ROWS if not self.qweight.is_cpu
                 else CODES_DIRECT_MAX_MACS // (n * k) if small == "fp32_codes_conv"
                 else vnni_c_gemm_rows(n, k))  # avx512_vnni's C GEMM
        return {f"M<={limit}": small, f"M>{limit}": large}

    def _refresh_cache(self) -> None:
        super()._refresh_cache()
        self._codes_cache = None
        self._cols_cache = None
        g = self.geometry
        # the fused C path (lowbit.native): 2-d, zero padding, symmetric weights, float32 bias;
        # everything it needs gathered once (batch-1 convs are dominated by per-call overhead)
        fast = (self._fused_args is not None and self._dims == 2 and g["pre_pad"] is None
                and g["groups"] == 1)
        zp = self._fused_args[5] if fast else None  # type: ignore[index]
        self._conv_args = None if not fast else (
            self.qweight[0].numel(), tuple(self.kernel_size), tuple(g["stride"]),
            tuple(g["padding"]), tuple(g["dilation"]), 0 if zp is None else int(zp))
        # (dynamic affine: each call's qparams go to the same C calls as static ones)
        self._reset_plans(fast and self.qweight.is_cpu)

    def _make_plan(self, x: torch.Tensor) -> Plan | None:
        lib = native_lib_for(x)
        if lib is None or x.dim() != 4 or x.shape[1] != self.in_channels:
            return None  # (the body handles unbatched inputs and raises for wrong shapes)
        check_conv_input(self._label(), x, self._dims, self.kernel_size, self.geometry)
        b, _, h, w = x.shape
        if self._conv_kernel(b * h * w) != "fp32_codes_conv":
            return None
        _k, ksize, stride, padding, dilation, zp_int = self._conv_args  # type: ignore[misc]
        _, w_scale, _colsum, bias, scale, _zp, _ = self._fused_args  # type: ignore[misc]
        spec = self.act_spec
        affine = (spec.qmin, spec.qmax, self._act_off) if self._dynamic_affine else None
        return conv_codes_plan(lib, tuple(x.shape), self._codes_weight(), w_scale, bias, scale,
                               zp_int, self._qmin, self._qmax, ksize, stride, padding, dilation,
                               self.fused_relu, self.geometry.get("fused_maxpool") or 0, affine)

    def _weight_cache(self, slot: str, build: Callable[[], torch.Tensor]) -> torch.Tensor:
        """A kernel's derived weight, kept in the plain attribute ``slot`` (not a buffer: never
        saved), dropped by ``_refresh_cache`` (so after ``load_state_dict``, like the other
        kernel caches) and rebuilt when ``weight`` is replaced by another tensor."""
        key = self.qweight.data_ptr()
        cache = getattr(self, slot)
        if cache is None or cache[0] != key:
            cache = (key, build())
            setattr(self, slot, cache)
        return cache[1]

    def _codes_weight(self) -> torch.Tensor:
        """float32 centered weight codes ``w - w_zp`` for ``"fp32_codes_conv"`` (cached)."""
        def build() -> torch.Tensor:
            wf = self.qweight.float()
            if self._w_zp is not None:
                wf.sub_(self._w_zp.float().reshape(-1, *([1] * (wf.dim() - 1))))
            return wf
        return self._weight_cache("_codes_cache", build)

    def _cols_weight(self) -> torch.Tensor:
        """The int8 weight as the im2col GEMM's ``[O, kh*kw*C]`` matrix (cached)."""
        def build() -> torch.Tensor:
            w = self.qweight if self._dims == 2 else self.qweight.unsqueeze(2)
            return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
        return self._weight_cache("_cols_cache", build)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize ``x`` per tensor, INT8 convolution, float output in x's dtype."""
        if torch.is_grad_enabled() and getattr(x, "requires_grad", False):
            return frozen_forward(self, x)  # an adapter or float layer before it trains
        if isinstance(x, torch.Tensor) and x.dim() == self._dims + 1:  # unbatched, as the
            return self.forward(x.unsqueeze(0)).squeeze(0)  # float conv takes it
        x = self._input(x, self.in_channels, dim=1)
        checked = (x.shape, self.geometry.get("fused_maxpool"))  # once per input shape
        if checked != self.__dict__.get("_checked_input"):
            check_conv_input(self._label(), x, self._dims, self.kernel_size, self.geometry)
            self.__dict__["_checked_input"] = checked
        x, bad = self._finite_rows(x, "static" if self.mode == "static" else "per-tensor")
        if self._conv_args is not None and x.dim() == 4 and x.dtype in NATIVE_DTYPES:
            y = self._forward_fused(x if x.dtype == torch.float32 else x.float())
            if y is not None:
                y = self._nan_rows(y, bad)
                return y if x.dtype == torch.float32 else y.to(x.dtype)
        g = self.geometry
        xf = x.float()
        if g["pre_pad"] is not None:
            xf = F.pad(xf, g["pre_pad"], mode=g["pad_mode"])
        w = self.qweight
        stride, padding, dilation = g["stride"], g["padding"], g["dilation"]
        if self._dims == 1:  # conv1d as conv2d over a unit height
            xf, w = xf.unsqueeze(2), w.unsqueeze(2)
            stride, padding, dilation = [1, *stride], [0, *padding], [1, *dilation]
        if self.mode == "static":
            s, zp = self.input_scale, self._static_zero_point()
        elif self.act_spec.symmetric:  # max|x| / qmax, zero-point 0: computed by the kernel
            s, zp = None, None
        else:
            s, zp = self._affine_qparams(xf)
        rows = xf.shape[0] * xf.shape[2] * xf.shape[3]  # upper bound of B*Ho*Wo
        kernel = self._conv_kernel(rows)
        w_float = w_cols = None
        if kernel == "fp32_codes_conv":
            w_float = self._codes_weight()
            if self._dims == 1:
                w_float = w_float.unsqueeze(2)
        elif kernel != "reference" and g["groups"] == 1:
            w_cols = self._cols_weight()
        y = int8_conv2d(xf, s, zp, self._qmin, self._qmax, w, self._w_scale, self._colsum,
                        self._bias, tuple(stride), tuple(padding), tuple(dilation), g["groups"],
                        relu=self.fused_relu, kernel=kernel, w_zp=self._w_zp,
                        w_float=w_float, w_cols=w_cols)  # (B, O, Ho, Wo)
        if self._dims == 1:
            y = y.squeeze(2)
        if g.get("fused_maxpool"):  # a following MaxPool2d fused by lowbit.ptq
            y = F.max_pool2d(y, g["fused_maxpool"])
        y = self._nan_rows(y if y.is_contiguous() else y.contiguous(), bad)
        return y if x.dtype == torch.float32 else y.to(x.dtype)

    def _forward_fused(self, x: torch.Tensor) -> torch.Tensor | None:
        """:meth:`forward` with the tensors and geometry gathered by ``_refresh_cache`` (the same
        kernels and bits, fewer Python steps); None when the C kernels cannot take ``x``."""
        lib = native_lib_for(x) if x.is_contiguous() else None
        if lib is None:
            return None
        _k, ksize, stride, padding, dilation, zp_int = self._conv_args  # type: ignore[misc]
        _, w_scale, colsum, bias, scale, zp, _ = self._fused_args  # type: ignore[misc]
        if self._dynamic_affine:  # this call's qparams, then the static form of the call
            scale, zp = self._affine_qparams(x)
            zp_int = int(zp)
        kernel = self._conv_kernel(x.shape[0] * x.shape[2] * x.shape[3])
        if kernel == "fp32_codes_conv":
            weight = self._codes_weight()
        elif kernel in FUSED_GEMMS:
            weight = self._cols_weight()
        else:
            return None
        return conv2d_fused(lib, x, kernel, scale, zp, zp_int, self._qmin, self._qmax, weight,
                            w_scale, colsum, bias, ksize, stride, padding, dilation,
                            self.fused_relu, self.geometry.get("fused_maxpool", 0))

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"{self.geometry}, mode={self.mode}, fused_relu={self.fused_relu}, "
                f"backend={self.backend}")


class QuantizedConv1d(QuantizedConv2d):
    """INT8 x INT8 Conv1d, run as a Conv2d over a unit height (weight ``[O, C/groups, k]``).

    Example:
        >>> q = QuantizedConv1d.from_float(nn.Conv1d(4, 6, 3), QuantizationConfig.int8_dynamic())
        >>> q(torch.randn(2, 4, 10)).shape
        torch.Size([2, 6, 8])
    """

    _dims = 1


QUANTIZED_MODULES: dict[str, type[nn.Module]] = {
    c.__name__: c for c in (QuantizedLinear, QuantizedConv2d, QuantizedConv1d, Int4Linear,
                            Int8WeightOnlyLinear, QuantizedEmbedding, WeightOnlyConv2d,
                            WeightOnlyConv1d, QuantizedLSTM, QuantizedGRU, QuantizedRNN,
                            QuantizedLSTMCell, QuantizedGRUCell, QuantizedRNNCell)
}


def module_from_meta(meta: Mapping[str, Any]) -> nn.Module:
    """Rebuild an empty quantized module from its :meth:`meta` dict (for ``lowbit.load``).

    Raises:
        ValueError: when ``meta["class"]`` is not a lowbit quantized module.

    Example:
        >>> q = QuantizedLinear.from_float(nn.Linear(4, 2), QuantizationConfig.int8_dynamic())
        >>> r = module_from_meta(q.meta()); _ = r.load_state_dict(q.state_dict())
        >>> torch.equal(r(torch.ones(1, 4)), q(torch.ones(1, 4)))
        True
    """
    cls = QUANTIZED_MODULES.get(meta.get("class", ""))
    if cls is None:
        raise ValueError(f"module_from_meta: unknown class {meta.get('class')!r}; known: "
                         f"{sorted(QUANTIZED_MODULES)}")
    return cls.from_meta(meta)  # type: ignore[attr-defined]


_RNN_CLASSES: dict[type[nn.Module], type[nn.Module]] = {
    nn.LSTM: QuantizedLSTM, nn.GRU: QuantizedGRU, nn.RNN: QuantizedRNN,
    nn.LSTMCell: QuantizedLSTMCell, nn.GRUCell: QuantizedGRUCell, nn.RNNCell: QuantizedRNNCell}


#: Where a layer keeps its (first) weight: a recurrent layer's first input projection is
#: ``weight_ih_l0``, a cell's ``weight_ih``.
WEIGHT_NAMES = ("weight", "weight_ih_l0", "weight_ih")


def _first_weight(module: nn.Module) -> Any:
    """A layer's weight (:data:`WEIGHT_NAMES`), or None."""
    for name in WEIGHT_NAMES:
        if isinstance(getattr(module, name, None), torch.Tensor):
            return getattr(module, name)
    return None


def check_supported(module: nn.Module, config: QuantizationConfig) -> str | None:
    """Why ``module`` cannot be quantized under ``config``, or None when it can.

    Example:
        >>> check_supported(nn.Linear(4, 4), QuantizationConfig.int8_dynamic()) is None
        True
        >>> check_supported(nn.Embedding(10, 4), QuantizationConfig.int8_dynamic())
        "Embedding has no activations to quantize; use mode='weight_only' for it"
        >>> check_supported(nn.Embedding(10, 4), QuantizationConfig.int4_weight_only(
        ...     32, quantize_embeddings=True)) is None
        True
    """
    if not isinstance(module, QUANTIZABLE_TYPES) and not is_hf_conv1d(module):
        return f"{type(module).__name__} is not a quantizable type"
    kind, w = type(module).__name__, config.weights
    weight = _first_weight(module)
    if isinstance(weight, torch.Tensor) and weight.numel() == 0:
        return (f"{kind} has an empty weight (shape {tuple(weight.shape)}): nothing to "
                "quantize, so it stays float")
    override = forward_override(module)
    if override:
        return (f"{override} differs from the torch layer it subclasses (e.g. a scaled or "
                "positional embedding, a conv's own padding); a quantized replacement would "
                "drop it, so it stays float")
    if isinstance(module, RNN_TYPES):  # dynamic INT8 only (lowbit.modules_rnn)
        return rnn_unsupported_reason(module, config)
    if isinstance(module, nn.Embedding):
        if config.mode != "weight_only":
            return f"{kind} has no activations to quantize; use mode='weight_only' for it"
        if not config.quantize_embeddings:
            return (f"{kind}: weight-only mode keeps embedding tables float by default (INT4 "
                    "tables cost accuracy and their lookup is slower); set "
                    "quantize_embeddings=True in the config to quantize them")
        if module.max_norm is not None:
            return f"{kind} with max_norm renormalizes its weight in place; keep it in float"
        if w.granularity == "per_tensor" or (w.granularity == "per_channel" and w.axis != 0):
            return f"{kind}: weight-only embeddings are per row (per_channel axis=0) or per_group"
        return None
    if w.granularity == "per_channel" and w.axis != 0:
        return f"{kind}: per_channel weights must use axis=0 (output channels), got {w.axis}"
    if config.mode == "weight_only":
        return None  # every weight-only spec has at least the dequantize path
    if w.granularity not in ("per_tensor", "per_channel"):
        return (f"{kind}: INT8 x INT8 kernels need per_tensor or per_channel weights "
                f"(got {w.granularity}); use mode='weight_only' for group-wise weights")
    if not w.signed:
        return (f"{kind}: INT8 x INT8 kernels need signed weight codes (symmetric or affine); "
                "set weights=QuantSpec(signed=True, ...) or use QuantSpec.int8_weight()")
    return None


def convert_module(module: nn.Module, config: QuantizationConfig, **kwargs: Any) -> nn.Module:
    """Build the quantized replacement of a float layer (dispatch on type and ``config.mode``).

    Args:
        module: ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d``, ``nn.Embedding``, ``nn.LSTM``,
            ``nn.GRU``, ``nn.RNN`` or their cells (dynamic mode only), or ``transformers``'
            ``Conv1D`` (quantized as the Linear it is; the replacement's ``weight`` view keeps
            its ``[in, out]`` shape).
        config: the layer's resolved config.
        **kwargs: passed to ``from_float`` (``input_qparams``, ``weight_qparams``,
            ``fused_relu``, ``name``, ``meta_extra``, ``backend``).

    Returns:
        The quantized module, on the float layer's device, with the float layer's forward /
        forward-pre / backward hooks (shared: the user's handles still remove them).

    Raises:
        ValueError: when :func:`check_supported` refuses the layer (the message names it).

    Example:
        >>> q = convert_module(nn.Linear(64, 32), QuantizationConfig.int4_weight_only(32))
        >>> type(q).__name__, q.qweight.dtype, tuple(q.qweight.shape), q.weight.dtype
        ('Int4Linear', torch.uint8, (32, 32), torch.float32)
    """
    reason = check_supported(module, config)
    if reason is not None:
        raise ValueError(f"{kwargs.get('name') or '<unnamed>'}: {reason}")
    wo = config.mode == "weight_only"
    float_module = module
    if is_hf_conv1d(module):  # GPT-2: the Linear it is, its [in, out] weight transposed
        module = linear_from_conv1d(module)
        kwargs = {**kwargs, "meta_extra": {**(kwargs.get("meta_extra") or {}), "hf_conv1d": True}}
    if isinstance(module, RNN_TYPES):
        cls: Any = _RNN_CLASSES[type(module)]
    elif isinstance(module, nn.Embedding):
        cls = QuantizedEmbedding
    elif isinstance(module, nn.Linear):
        cls = (Int4Linear if config.weights.bits <= 4 else Int8WeightOnlyLinear) if wo \
            else QuantizedLinear
    elif isinstance(module, nn.Conv1d):
        cls = WeightOnlyConv1d if wo else QuantizedConv1d
    else:
        cls = WeightOnlyConv2d if wo else QuantizedConv2d
    if wo:
        kwargs = {k: v for k, v in kwargs.items() if k != "input_qparams"}
    q = carry_hooks(float_module, cls.from_float(module, config, **kwargs))  # the user's hooks
    ref = _first_weight(module)
    device = ref.device  # the replacement lives where the float layer did (CUDA too)
    return q if device.type == "cpu" else q.to(device)
