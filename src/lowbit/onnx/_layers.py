"""Export stand-ins for lowbit's quantized layers: the same maths, laid out for ONNX.

:func:`export_layer` reads a quantized module's buffers (never changing them) and returns a
small module whose ``forward`` calls one op of :mod:`lowbit.onnx._ops` on tensors already in
the ONNX layout (uint8 codes ``w + 128`` for the exact u8 x u8 integer kernels, or int8 ones
where the activations fit in 7 bits, ``[K, N]``
weights for ``MatMulInteger``, packed nibbles for ``MatMulNBits``, int32 bias for QDQ) and
runs the parts torch exports as-is (reshapes, padding, fused ReLU / GELU / max-pool) in torch.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.modules import (
    Int4Linear,
    Int8WeightOnlyLinear,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    WeightOnlyConv1d,
    WeightOnlyConv2d,
)
from lowbit.modules_rnn import QuantizedRNNBase
from lowbit.onnx import _ops  # noqa: F401  (registers torch.ops.lowbit_export)
from lowbit.ops import quantize_bias

__all__ = ["export_layer", "present_weight", "u8s8_exact_here"]

class _PresentsWeight:
    """``weight`` as the eager layer presents it (its float view), for model code that reads
    it while the graph is traced: its dtype (CLIP casts its pixels to the patch conv's) or
    its values (MobileBERT's head multiplies by its dense layer's weight). ``export_onnx``
    finds the layers whose weight the model reads (one eager call) and gives their stand-ins
    the float weight as a buffer (:func:`present_weight`); the graphs of other models hold no
    float copy."""

    _buffers: dict[str, torch.Tensor | None]
    _presented: functools.partial

    def _present(self, layer: nn.Module) -> None:
        object.__setattr__(self, "_presented", functools.partial(_float_weight_of, layer))

    @property
    def weight(self) -> torch.Tensor:
        w = self._buffers.get("presented_weight")
        return self._presented() if w is None else w


def _float_weight_of(layer: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return layer._float_weight(reference=True).to(getattr(torch, layer.orig_dtype))


def present_weight(stand_in: nn.Module) -> None:
    """Give an export stand-in its layer's float weight (what ``layer.weight`` reads) as a
    buffer, for a model that reads it (see :class:`_PresentsWeight`)."""
    if isinstance(stand_in, _PresentsWeight):
        stand_in.register_buffer("presented_weight", stand_in._presented(), persistent=False)


def _per_row(t: torch.Tensor, n: int) -> torch.Tensor:
    """A per-tensor / per-row / per-group qparam as ``[N, groups]``."""
    t = t.detach()
    return t.reshape(1, 1).expand(n, 1) if t.dim() == 0 else t.reshape(n, -1)


def _u8(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes shifted into uint8 (``q + 128``); uint8 codes unchanged."""
    if codes.dtype == torch.uint8:
        return codes.clone()
    return (codes.to(torch.int16) + 128).to(torch.uint8)


@functools.lru_cache(maxsize=1)
def u8s8_exact_here() -> bool:
    """Whether ONNX Runtime's u8 x s8 integer kernels are exact on this CPU: x86 with VNNI
    (``avx512_vnni``, ``avx_vnni`` or AMX), which multiplies and adds into int32 directly.
    Without it they add int16 pair sums, which saturate (and on other CPUs: not assumed).

    Example:
        >>> isinstance(u8s8_exact_here(), bool)
        True
    """
    from lowbit.kernels.select import VNNI_FLAGS
    from lowbit.native import _cpu_key  # the CPU's flags, not capped by ONEDNN_MAX_CPU_ISA

    return bool(VNNI_FLAGS & set(_cpu_key().split()))


def _s8_weights(layer: QuantizedLinear | QuantizedConv2d, exact: bool | str) -> bool:
    """Whether an INT8 x INT8 layer exports int8 weights (ONNX Runtime's u8 x s8 kernels)
    rather than uint8 ``w + 128`` (u8 x u8 kernels: exact on every CPU, slower).

    Activations become uint8 ``q - qmin``. The u8 x s8 kernels add int16 pair sums, which
    saturate on x86 CPUs without VNNI unless the activation codes fit in [0, 127] (7-bit
    activations: ``2 * 127 * 128 < 2**15``): linears with such activations take int8 weights
    even when ``exact``. ``"auto"``: int8 weights where :func:`u8s8_exact_here` and ONNX
    Runtime's u8 x s8 kernel is the faster one (``MatMulInteger``, static ``QLinearConv``;
    not the dynamic ``ConvInteger``, whose u8 x s8 kernel measured 1.8-2.2x slower).
    """
    if layer.qweight.dtype != torch.int8:
        return False
    if layer._qmax - layer._qmin <= 127 and isinstance(layer, QuantizedLinear):
        return True
    if exact == "auto":
        return u8s8_exact_here() and (isinstance(layer, QuantizedLinear)
                                      or layer.mode == "static")
    return not exact


class _Epilogue(nn.Module):
    """Fused ReLU / GELU / max-pool of a quantized layer, run in torch (exported as is)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.relu = bool(getattr(layer, "fused_relu", False))
        self.gelu = getattr(layer, "fused_gelu", None)
        self.pool = int(getattr(layer, "geometry", {}).get("fused_maxpool", 0) or 0)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        if self.relu:
            y = torch.relu(y)
        if self.gelu is not None:
            y = F.gelu(y, approximate=self.gelu)
        if self.pool:
            y = F.max_pool2d(y, self.pool)
        return y


class _Int8(_PresentsWeight, nn.Module):
    """Weights and activation parameters of an INT8 x INT8 layer, in ONNX layout."""

    def __init__(self, layer: QuantizedLinear | QuantizedConv2d,
                 exact: bool | str = True) -> None:
        super().__init__()
        self._present(layer)
        self.post = _Epilogue(layer)
        spec, self.mode = layer.act_spec, layer.mode
        self.qmin, self.qmax, self.off = layer._qmin, layer._qmax, layer._act_off
        codes = (lambda t: t.to(torch.int8).clone()) if _s8_weights(layer, exact) else _u8
        self.spec_qmin, self.spec_qmax = spec.qmin, spec.qmax
        self.symmetric, self.per_token = spec.symmetric, spec.granularity == "per_token"
        w = layer.qweight.detach()
        n = w.shape[0]
        w_scale = layer.weight_scale.detach().float().expand(n).contiguous()  # [N]
        w_zp = layer.weight_zero_point.detach().to(torch.int32).expand(n).contiguous()
        self.per_channel_zp = bool((w_zp != w_zp[0]).any())
        self.register_buffer("w_scale", w_scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())
        if self.mode == "static":
            self._static(layer, codes(w), w_scale, codes(w_zp.to(torch.int8)))
        else:
            self.register_buffer("w", codes(w))
            self.register_buffer("w_zp", codes(w_zp.to(torch.int8)))  # [N]
            colsum = w.reshape(n, -1).sum(1, dtype=torch.int32) - w[0].numel() * w_zp
            self.register_buffer("colsum", colsum)  # sum_k (w - w_zp), for affine activations

    def _static(self, layer: nn.Module, w: torch.Tensor, w_scale: torch.Tensor,
                w_zp: torch.Tensor) -> None:
        """Standard QDQ: uint8 activations (zero-point ``- qmin``), per-channel weights (codes
        as chosen by ``exact`` and the activation bits) and an int32 bias at scale
        ``s_x * s_w`` (a float bias when that would overflow int32)."""
        s_x = layer.input_scale.detach().float().reshape(())
        zp = int(layer.input_zero_point) + self.off  # signed-equivalent
        self.register_buffer("x_scale", s_x.clone())
        self.register_buffer("x_zp", torch.tensor(zp - self.qmin, dtype=torch.uint8))
        bits = layer.act_spec.bits
        self.x_range = [] if bits >= 8 else [float((self.qmin - zp) * s_x),
                                             float((self.qmax - zp) * s_x)]
        self.register_buffer("w", w)
        self.register_buffer("w_zp", w_zp)
        self.register_buffer("bias_q", None)
        self.register_buffer("bias_scale", None)
        qb = None if self.bias is None else quantize_bias(self.bias, s_x, w_scale)
        if qb is not None:  # the int32 codes lowbit's static kernels add (float otherwise)
            self.bias_q, self.bias_scale = qb
            self.bias = None


class ExportLinear(_Int8):
    """:class:`~lowbit.modules.QuantizedLinear` for export (dynamic or static)."""

    def __init__(self, layer: QuantizedLinear, exact: bool | str = True) -> None:
        super().__init__(layer, exact)
        self.k, self.n = layer.in_features, layer.out_features
        self.fused = exact == "auto"  # ONNX Runtime's MatMulIntegerToFloat (see _ops)
        if self.mode != "static":
            self.w = self.w.t().contiguous()  # [K, N] for MatMulInteger
            # one weight scale / zero-point for all columns as a scalar: ORT's per-tensor
            # kernels (per-column ones cost ~5% at batch 1)
            if not self.per_channel_zp:
                self.w_zp = self.w_zp[:1].reshape(()).clone()
            if bool((self.w_scale == self.w_scale[0]).all()):
                self.w_scale = self.w_scale[:1].reshape(()).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # per-tensor activations take any rank (MatMulInteger broadcasts): no Reshape nodes
        keep = x.dim() == 2 or not (self.mode == "static" or self.per_token)
        x2 = (x if keep else x.reshape(-1, self.k)).float()
        if self.mode == "static":
            y = torch.ops.lowbit_export.static_linear(
                x2, self.x_scale, self.x_zp, self.x_range, self.w, self.w_scale, self.w_zp,
                self.bias_q, self.bias_scale, self.bias)
        else:
            y = torch.ops.lowbit_export.dynamic_linear(
                x2, self.w, self.w_zp, self.w_scale, self.bias, self.colsum, self.qmin,
                self.qmax, self.spec_qmin, self.spec_qmax, self.off, self.per_token,
                self.symmetric, self.fused)
        return _like(self.post(y if keep else y.reshape(*x.shape[:-1], self.n)), x)


class ExportConv(_Int8):
    """:class:`~lowbit.modules.QuantizedConv2d` / ``QuantizedConv1d`` for export."""

    def __init__(self, layer: QuantizedConv2d, exact: bool | str = True) -> None:
        super().__init__(layer, exact)
        g = layer.geometry
        self.pre_pad, self.pad_mode = g["pre_pad"], g["pad_mode"]
        self.geo = (list(g["stride"]), list(g["padding"]), list(g["dilation"]), g["groups"])
        self.in_channels = layer.in_channels
        if self.mode != "static":
            self.integer = not self.per_channel_zp  # ConvInteger takes one weight zero-point
            if self.integer:
                self.w_zp = self.w_zp[:1].reshape(()).clone()

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        x = x_in.float()
        if self.pre_pad is not None:
            x = F.pad(x, self.pre_pad, mode=self.pad_mode)
        if self.mode == "static":
            y = torch.ops.lowbit_export.static_conv(
                x, self.x_scale, self.x_zp, self.x_range, self.w, self.w_scale, self.w_zp,
                self.bias_q, self.bias_scale, self.bias, *self.geo)
        else:
            y = torch.ops.lowbit_export.dynamic_conv(
                x, self.w, self.w_zp, self.w_scale, self.bias, self.qmin, self.qmax,
                self.spec_qmin, self.spec_qmax, self.off, self.symmetric, self.integer,
                *self.geo)
        return _like(self.post(y), x_in)


def _like(y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``y`` (float32) in the dtype of the layer's float input ``x``, as the eager layers
    return it (a float16 model's next float layers take float16)."""
    return y if not x.is_floating_point() or x.dtype == y.dtype else y.to(x.dtype)


def _nbits_block(layer: Int4Linear | Int8WeightOnlyLinear) -> int | None:
    """A MatMulNBits block size (a power of two >= 16) that splits every scale group evenly,
    or None when there is none."""
    spec = layer.eff_spec
    if spec.granularity != "per_group" or spec.group_size >= layer.kp:
        return 32  # one scale per row (or tensor): any block size, the scale repeated
    group = spec.group_size
    for block in (256, 128, 64, 32, 16):
        if group % block == 0:
            return block
    return None


class ExportNBits(_PresentsWeight, nn.Module):
    """Weight-only Linear as com.microsoft ``MatMulNBits`` (4 bits: packed nibbles; 8 bits:
    bytes): unsigned codes ``q + 2^(bits-1)`` and zero-points shifted the same way, so
    ``(q_u - zp_u) * scale`` equals lowbit's ``(q - zp) * scale``."""

    def __init__(self, layer: Int4Linear | Int8WeightOnlyLinear, block: int) -> None:
        super().__init__()
        self._present(layer)
        self.post = _Epilogue(layer)
        self.k, self.n = layer.in_features, layer.out_features
        self.bits = 4 if layer.packed else 8
        self.block = block
        # int8 activations per block in ONNX Runtime too, where lowbit's INT4 x INT8 kernel
        # takes them (Int4Linear.int8_activations; its layout needs groups of 32k)
        group = layer.eff_spec.group_size if layer.eff_spec.granularity == "per_group" else 32
        self.accuracy_level = 4 if (self.bits == 4 and getattr(layer, "int8_activations", False)
                                    and group and group % 32 == 0) else 0
        shift = 2 ** (self.bits - 1) if layer.weight_spec.signed else 0
        codes = layer.codes().to(torch.int16)[:, : self.k] + shift  # [N, K] unsigned
        n, k = codes.shape
        blocks = -(-k // block)
        codes = F.pad(codes, (0, blocks * block - k)).to(torch.uint8)  # [N, blocks * block]
        scale = _per_row(layer.weight_scale, n).float()  # [N, groups]
        zp = _per_row(layer.weight_zero_point, n).to(torch.int16) + shift
        reps = layer.eff_spec.group_size // block if scale.shape[1] > 1 else blocks
        scale = scale.repeat_interleave(reps, 1)[:, :blocks]  # [N, blocks]
        zp = zp.repeat_interleave(reps, 1)[:, :blocks].to(torch.uint8)
        if self.bits == 4:
            codes = codes[:, 0::2] | (codes[:, 1::2] << 4)  # [N, blocks * block / 2]
            zp = F.pad(zp, (0, blocks % 2))
            zp = zp[:, 0::2] | (zp[:, 1::2] << 4)  # [N, ceil(blocks / 2)]
        self.register_buffer("b", codes.reshape(n, blocks, -1).contiguous())
        self.register_buffer("scales", scale.reshape(-1).contiguous())
        self.register_buffer("zp", zp.reshape(-1).contiguous())
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = (x if x.dim() == 2 else x.reshape(-1, self.k)).float()
        y = torch.ops.lowbit_export.matmul_nbits(x2, self.b, self.scales, self.zp, self.bias,
                                                 self.k, self.n, self.bits, self.block,
                                                 self.accuracy_level)
        return _like(self.post(y if x.dim() == 2 else y.reshape(*x.shape[:-1], self.n)), x)


class ExportDequant(_PresentsWeight, nn.Module):
    """Any other weight-only layer: integer codes dequantized by standard ONNX ops (which ONNX
    Runtime folds into a float weight when the session starts), then the float op."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self._present(layer)
        self.post = _Epilogue(layer)
        self.layer_type = type(layer)
        codes = layer.codes()
        if layer.packed:  # int8 codes: ONNX has no 4-bit Cast before opset 21
            codes = codes.to(torch.int8) if layer.weight_spec.signed else codes
        spec = layer.eff_spec
        n = codes.shape[0]
        group = spec.group_size if spec.granularity == "per_group" else codes.shape[1]
        self.shape = (n, codes.shape[1] // group, group)
        self.k = layer.k
        self.register_buffer("codes", codes.reshape(self.shape).clone())
        for name, t in (("scale", layer.weight_scale), ("zp", layer.weight_zero_point)):
            t = _per_row(t, n).float().expand(n, self.shape[1]).unsqueeze(-1)  # [N, G, 1]
            self.register_buffer(name, t.contiguous())
        bias = getattr(layer, "bias", None)
        self.register_buffer("bias", None if bias is None else bias.float())
        self.out_dtype = getattr(torch, layer.orig_dtype, torch.float32)  # embedding rows
        self.wshape = getattr(layer, "wshape", None)
        self.geometry = dict(getattr(layer, "geometry", {}))

    def _dequantized(self) -> torch.Tensor:
        w = ((self.codes.float() - self.zp) * self.scale).reshape(self.shape[0], -1)
        w = w[:, : self.k]
        return w if self.wshape is None else w.reshape(self.wshape)

    def forward(self, x_in: torch.Tensor) -> torch.Tensor:
        if issubclass(self.layer_type, QuantizedEmbedding):
            return F.embedding(x_in, self._dequantized()).to(self.out_dtype)
        x = x_in.float()
        if issubclass(self.layer_type, WeightOnlyConv2d):
            g = self.geometry
            if g["pre_pad"] is not None:
                x = F.pad(x, g["pre_pad"], mode=g["pad_mode"])
            conv = F.conv1d if issubclass(self.layer_type, WeightOnlyConv1d) else F.conv2d
            y = conv(x, self._dequantized(), self.bias, g["stride"], g["padding"], g["dilation"],
                     g["groups"])
            return _like(self.post(y), x_in)
        return _like(self.post(F.linear(x, self._dequantized(), self.bias)), x_in)


def export_layer(layer: nn.Module, exact: bool | str = True) -> nn.Module | None:
    """The export stand-in of a lowbit quantized layer, or None for any other module.

    ``exact``: INT8 x INT8 layers with 8-bit activations keep uint8 weights ``w + 128`` (u8 x
    u8 integer kernels: exact int32 sums on every CPU) rather than the int8 codes (u8 x s8:
    ONNX Runtime's fastest kernels, whose int16 pair sums saturate on x86 CPUs without VNNI).
    Layers with activations of 7 bits or fewer always get int8 weights: their uint8 codes
    ``q - qmin`` stay in ``[0, 127]``, where the u8 x s8 kernels are exact too. ``"auto"``:
    int8 weights where they are exact on this CPU and faster (see ``_s8_weights``).

    Example:
        >>> from lowbit import QuantizationConfig
        >>> q = QuantizedLinear.from_float(nn.Linear(8, 4), QuantizationConfig.int8_dynamic())
        >>> type(export_layer(q)).__name__, export_layer(nn.Linear(8, 4))
        ('ExportLinear', None)

    Raises:
        NotImplementedError: a quantized recurrent layer (no ONNX subgraph yet), naming it.
    """
    if isinstance(layer, QuantizedRNNBase):
        raise NotImplementedError(
            f"export_onnx: {layer._label()} has no ONNX export yet (its per-step INT8 "
            "recurrence has no standard ONNX form); keep it in float for export: quantize with "
            f"layer_overrides={{{layer.name or 'name'!r}: None}} (torch exports the float "
            "recurrent layer), or run the quantized model in PyTorch")
    stand_in = _export_layer(layer, exact)
    smoothing = getattr(layer, "input_smoothing", None)
    if stand_in is not None and isinstance(smoothing, torch.Tensor):
        return _SmoothedInput(stand_in, smoothing)  # AWQ / SmoothQuant: x * factor first
    return stand_in


class _SmoothedInput(nn.Module):
    """A stand-in whose layer multiplies its input per channel first (exports as ``Mul``)."""

    def __init__(self, inner: nn.Module, factor: torch.Tensor) -> None:
        super().__init__()
        self.inner = inner
        self.register_buffer("factor", factor.detach().float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x * self.factor.to(x.dtype))


def _export_layer(layer: nn.Module, exact: bool | str) -> nn.Module | None:
    if isinstance(layer, QuantizedLinear):
        return ExportLinear(layer, exact)
    if isinstance(layer, (QuantizedConv2d, QuantizedConv1d)):
        return ExportConv(layer, exact)
    if isinstance(layer, (Int4Linear, Int8WeightOnlyLinear)):
        block = _nbits_block(layer)
        return ExportDequant(layer) if block is None else ExportNBits(layer, block)
    if isinstance(layer, (QuantizedEmbedding, WeightOnlyConv2d)):
        return ExportDequant(layer)
    return None
