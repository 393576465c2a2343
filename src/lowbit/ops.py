"""Pure quantization maths: ranges, qparams, quantize, dequantize, fake-quantize, INT4 packing.

Conventions (the same as PyTorch's ``torch.fake_quantize_per_*_affine``)::

    q     = clamp(round_half_even(x * (1 / scale)) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

``1 / scale`` is computed in float32 and multiplied in, exactly as PyTorch does, so lowbit's
fake-quantize equals PyTorch's bit for bit. ONNX's ``QuantizeLinear`` divides (``x / scale``);
the two agree bit for bit whenever ``1 / scale`` is exact (power-of-two scales) and otherwise
differ by one code on a few inputs per million that sit on a rounding tie.

Scales are float32, zero-points int32. Their shapes follow the granularity of the
:class:`~lowbit.config.QuantSpec`:

=============  =====================================================
per_tensor     ``()``
per_channel    ``(x.shape[axis],)``
per_group      ``x.shape[:-1] + (x.shape[-1] // group_size,)``
per_token      ``x.shape[:-1] + (1,)``
=============  =====================================================
"""

from __future__ import annotations

import torch

from lowbit.config import QuantSpec

__all__ = [
    "check_finite",
    "choose_qparams",
    "code_range",
    "compute_range",
    "dequantize",
    "expand_qparam",
    "fake_quantize",
    "pack_int4",
    "qparams_from_range",
    "quantize",
    "quantize_bias",
    "quantize_tensor",
    "unpack_int4",
]

_EPS = torch.finfo(torch.float32).eps


def check_finite(x: torch.Tensor, name: str = "tensor", layer: str | None = None) -> None:
    """Raise ``ValueError`` naming ``name`` (and the ``layer`` to keep float) when ``x`` holds
    NaN or Inf.

    Example:
        >>> check_finite(torch.ones(3), "fc1.weight")
        >>> check_finite(torch.tensor([1.0, float("nan")]), "fc1.weight")
        Traceback (most recent call last):
        ...
        ValueError: fc1.weight has 1 NaN/Inf value(s) out of 2; ...
    """
    if x.is_floating_point():
        bad = (~torch.isfinite(x)).sum().item()
        if bad:
            raise ValueError(
                f"{name} has {bad} NaN/Inf value(s) out of {x.numel()}; fix the tensor, or keep "
                f"its layer in float with layer_overrides={{{layer or '<layer name>'!r}: None}}"
            )


def _check_groups(x: torch.Tensor, spec: QuantSpec, name: str) -> int:
    assert spec.group_size is not None
    k = x.shape[-1]
    if k % spec.group_size:
        raise ValueError(
            f"{name}: last dimension {k} is not divisible by group_size={spec.group_size}; "
            "pick a group size that divides it (e.g. 32) or pad the layer"
        )
    return k // spec.group_size


def compute_range(x: torch.Tensor, spec: QuantSpec, name: str = "tensor"
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Min and max of ``x`` reduced to the shape the granularity asks for (float32).

    Computed with ``amin``/``amax`` (exact, like every min/max): on CPU they are an order of
    magnitude faster than ``torch.aminmax(dim=...)`` and never slower for full reductions.

    Example:
        >>> lo, hi = compute_range(torch.tensor([[1., -2.], [3., 4.]]),
        ...                        QuantSpec(granularity="per_channel"))
        >>> lo.tolist(), hi.tolist()
        ([-2.0, 3.0], [1.0, 4.0])
    """
    if x.numel() == 0:
        raise ValueError(f"{name} is empty; cannot compute a quantization range")
    x = x.detach().float()
    if spec.granularity == "per_tensor":
        return x.amin(), x.amax()
    if spec.granularity == "per_channel":
        if not -x.dim() <= spec.axis < x.dim():  # a 0-d tensor: a bare modulo by zero
            raise ValueError(f"{name} has shape {tuple(x.shape)}: it has no axis {spec.axis} "
                             "for per_channel quantization; use granularity='per_tensor'")
        axis = spec.axis % x.dim()
        flat = x.movedim(axis, 0).reshape(x.shape[axis], -1)  # (C, rest)
        return flat.amin(1), flat.amax(1)
    if spec.granularity == "per_token":
        return x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    groups = _check_groups(x, spec, name)
    grouped = x.reshape(*x.shape[:-1], groups, spec.group_size)
    return grouped.amin(-1), grouped.amax(-1)


def choose_qparams(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero-point from an observed range.

    The range is first widened to include 0 so that 0.0 is exactly representable. Then::

        symmetric:  scale = max(|min|, |max|) / ((qmax - qmin) / 2 rounded down)
                    zero_point = 0 (signed) or (qmin + qmax + 1) // 2 (unsigned)
        affine:     scale = (max - min) / (qmax - qmin)
                    zero_point = clamp(qmin - round(min / scale), qmin, qmax)

    For signed symmetric formats the divisor is ``qmax`` (127 for int8). A zero range gives
    ``scale = float32 eps`` rather than a division by zero.

    Returns:
        ``(scale float32, zero_point int32)`` with the shape of ``min_val``.

    Example:
        >>> s, z = choose_qparams(torch.tensor(-1.0), torch.tensor(2.54), QuantSpec())
        >>> round(s.item(), 6), z.item()
        (0.02, 0)
        >>> s, z = choose_qparams(torch.tensor(0.0), torch.tensor(2.55),
        ...                       QuantSpec(signed=False, symmetric=False))
        >>> round(s.item(), 6), z.item()
        (0.01, 0)
    """
    min_val = torch.as_tensor(min_val, dtype=torch.float32)
    max_val = torch.as_tensor(max_val, dtype=torch.float32)
    if torch.any(min_val > max_val):
        raise ValueError("choose_qparams: min_val > max_val; pass (min, max) in that order")
    if not (torch.isfinite(min_val).all() and torch.isfinite(max_val).all()):
        raise ValueError("choose_qparams: the observed range holds NaN/Inf; the calibrated "
                         "tensor had non-finite values")
    return qparams_from_range(min_val, max_val, spec)


def code_range(scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
               ) -> tuple[float, float]:
    """The float range the codes of ``spec`` can represent with these qparams: ``(qmin - zp) *
    scale`` to ``(qmax - zp) * scale`` (the widest over channels), in float64.

    Example:
        >>> code_range(torch.tensor(0.125), torch.tensor(-28), QuantSpec(symmetric=False))
        (-12.5, 19.375)
    """
    lo = (spec.qmin - zero_point.double()) * scale.double()
    hi = (spec.qmax - zero_point.double()) * scale.double()
    return float(lo.min()), float(hi.max())


def qparams_from_range(min_val: torch.Tensor, max_val: torch.Tensor, spec: QuantSpec
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`choose_qparams` without its argument checks (no host sync), for hot loops.

    The caller guarantees float32 tensors with ``min_val <= max_val``; NaN/Inf give a non-finite
    scale, which the caller can test on the (small) result instead of on the range.

    Example:
        >>> s, z = qparams_from_range(torch.tensor(-1.0), torch.tensor(2.54), QuantSpec())
        >>> round(s.item(), 6), z.item()
        (0.02, 0)
    """
    lo = torch.clamp(min_val, max=0.0)
    hi = torch.clamp(max_val, min=0.0)
    qmin, qmax = spec.qmin, spec.qmax
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        if spec.signed:
            zero_point = torch.zeros_like(amax, dtype=torch.int32)
            half = qmax
        else:
            mid = (qmin + qmax + 1) // 2
            zero_point = torch.full_like(amax, mid, dtype=torch.int32)
            half = min(qmax - mid, mid - qmin)
        scale = torch.clamp(amax / half, min=_EPS)
        return scale, zero_point
    scale = torch.clamp((hi - lo) / float(qmax - qmin), min=_EPS)
    zero_point = torch.clamp(qmin - torch.round(lo / scale), qmin, qmax).to(torch.int32)
    return scale, zero_point


def quantize_bias(bias: torch.Tensor, input_scale: torch.Tensor, weight_scale: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A static layer's bias as int32 codes at scale ``input_scale * weight_scale`` (per output
    channel), as integer runtimes add it to the int32 accumulator (ONNX ``QLinearConv`` /
    ``QGemm``, fbgemm, TensorRT); None when a code would not fit in int32 (or is not finite):
    the bias then stays float.

    Returns:
        ``(codes int32 [N], scale float32 [N])``; ``codes.float() * scale`` is the bias the
        static kernels add.

    Example:
        >>> q, s = quantize_bias(torch.tensor([0.1, -0.25]), torch.tensor(0.02), torch.ones(2))
        >>> q.tolist(), (q.float() * s).tolist()
        ([5, -13], [0.09999999403953552, -0.25999999046325684])
    """
    if input_scale.numel() != 1 or weight_scale.numel() not in (1, bias.numel()):
        raise ValueError(f"quantize_bias: needs one input scale and one weight scale per bias "
                         f"value (or one for all); got bias {tuple(bias.shape)}, input_scale "
                         f"{tuple(input_scale.shape)}, weight_scale {tuple(weight_scale.shape)}")
    scale = (input_scale.float().reshape(()) * weight_scale.float().reshape(-1)
             ).expand(bias.numel()).reshape(bias.shape).contiguous()
    codes = torch.round(bias.double() / scale.double())
    if not bool(torch.isfinite(codes).all()) or float(codes.abs().max()) > 2**31 - 1:
        return None
    return codes.to(torch.int32), scale


def expand_qparam(p: torch.Tensor, x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Reshape a qparam (shape from the table above) so it broadcasts against ``x``, or against
    ``x``'s grouped view ``x.shape[:-1] + (groups, group_size)`` for per_group.

    Example:
        >>> expand_qparam(torch.ones(3), torch.zeros(3, 8), QuantSpec(granularity="per_channel")
        ...               ).shape
        torch.Size([3, 1])
    """
    if spec.granularity == "per_tensor":
        return p.reshape(())
    if spec.granularity == "per_channel":
        axis = spec.axis % x.dim()
        shape = [1] * x.dim()
        shape[axis] = -1
        return p.reshape(shape)
    if spec.granularity == "per_token":
        return p.reshape(*x.shape[:-1], 1)
    return p.reshape(*x.shape[:-1], -1, 1)



def _grouped(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    if spec.granularity != "per_group":
        return x
    _check_groups(x, spec, "tensor")
    return x.reshape(*x.shape[:-1], -1, spec.group_size)


def _codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
           ) -> torch.Tensor:
    """Unclamped float codes ``round(x * (1/scale)) + zero_point`` in x's grouped view."""
    xg = _grouped(x.float(), spec)
    inv = 1.0 / expand_qparam(scale.float(), x, spec)
    codes = xg * inv  # the one full-size temporary; the rest is in place (same values)
    return codes.round_().add_(expand_qparam(zero_point, x, spec).float())


def quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec
             ) -> torch.Tensor:
    """Quantize ``x`` to integer codes (int8 for signed specs, uint8 for unsigned).

    4-bit codes come back one per int8/uint8 element; :func:`pack_int4` stores two per byte.

    Example:
        >>> spec = QuantSpec()
        >>> quantize(torch.tensor([2.5, -1.3, 0.8, -2.1]), torch.tensor(2.5 / 127),
        ...          torch.tensor(0), spec).tolist()
        [127, -66, 41, -107]
    """
    q = _codes(x, scale, zero_point, spec).clamp_(spec.qmin, spec.qmax)
    return q.reshape(x.shape).to(spec.storage_dtype)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, spec: QuantSpec,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float values ``(q - zero_point) * scale`` of integer codes ``q``.

    Example:
        >>> dequantize(torch.tensor([127, -66], dtype=torch.int8), torch.tensor(0.02),
        ...            torch.tensor(0), QuantSpec()).tolist()
        [2.5399999618530273, -1.3199999332427979]
    """
    qg = _grouped(q.float(), spec)
    x = (qg - expand_qparam(zero_point, q, spec).float()) * expand_qparam(scale.float(), q, spec)
    return x.reshape(q.shape).to(dtype)


class _FakeQuantizeSTE(torch.autograd.Function):
    """Quantize-dequantize forward; straight-through-estimator backward."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, clip_gradient):  # type: ignore[override]
        codes = _codes(x, scale, zero_point, spec)
        if clip_gradient:
            mask = ((codes >= spec.qmin) & (codes <= spec.qmax)).reshape(x.shape)
            ctx.save_for_backward(mask)
        out = codes.clamp_(spec.qmin, spec.qmax)  # in place: codes are not needed any more
        out.sub_(expand_qparam(zero_point, x, spec).float())
        out.mul_(expand_qparam(scale.float(), x, spec))
        ctx.clip_gradient = clip_gradient
        return out.reshape(x.shape).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.clip_gradient:
            (mask,) = ctx.saved_tensors
            grad = grad * mask.to(grad.dtype)
        return grad, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                  spec: QuantSpec, clip_gradient: bool = True) -> torch.Tensor:
    """Quantize then dequantize in float, differentiable by the straight-through estimator.

    Forward: ``(clamp(round(x * (1/scale)) + zp, qmin, qmax) - zp) * scale`` in x's dtype
    (computed in float32). Backward: the gradient passes unchanged where the unclamped code lies
    in ``[qmin, qmax]`` and is zero where the value was clipped, exactly like
    ``torch.fake_quantize_per_tensor_affine``. ``clip_gradient=False`` gives the pure STE
    (gradient always passes). Scale and zero-point get no gradient here (see
    :class:`lowbit.FakeQuantize` for a learnable scale).

    Example:
        >>> x = torch.tensor([0.5, 3.0], requires_grad=True)
        >>> y = fake_quantize(x, torch.tensor(0.1), torch.tensor(0), QuantSpec(bits=4))
        >>> y.detach().tolist(), torch.autograd.grad(y.sum(), x)[0].tolist()
        ([0.5, 0.699999988079071], [1.0, 0.0])
    """
    return _FakeQuantizeSTE.apply(x, scale, zero_point, spec, clip_gradient)


def quantize_tensor(x: torch.Tensor, spec: QuantSpec, name: str = "tensor"
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Check, range, qparams and quantize in one call: ``(codes, scale, zero_point)``.

    Raises:
        ValueError: when ``x`` holds NaN/Inf (the message names ``name``) or the group size does
            not divide the last dimension.

    Example:
        >>> q, s, z = quantize_tensor(torch.randn(4, 64), QuantSpec.int4_weight(group_size=32))
        >>> q.dtype, tuple(s.shape), int(q.min()) >= -8, int(q.max()) <= 7
        (torch.int8, (4, 2), True, True)
    """
    check_finite(x, name)
    lo, hi = compute_range(x, spec, name)
    scale, zero_point = choose_qparams(lo, hi, spec)
    return quantize(x, scale, zero_point, spec), scale, zero_point


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes two per byte along the last dimension.

    Element ``2i`` goes to the low nibble and ``2i + 1`` to the high nibble of byte ``i``.
    Signed codes (int8 in [-8, 7]) are stored as two's-complement nibbles.

    Args:
        q: int8 codes in [-8, 7] or uint8 codes in [0, 15]; the last dimension must be even.

    Returns:
        uint8 tensor of shape ``q.shape[:-1] + (q.shape[-1] // 2,)``.

    Example:
        >>> packed = pack_int4(torch.tensor([1, -2, 7, -8], dtype=torch.int8))
        >>> packed.tolist(), unpack_int4(packed).tolist()
        ([225, 135], [1, -2, 7, -8])
    """
    if q.shape[-1] % 2:
        raise ValueError(f"pack_int4: last dimension {q.shape[-1]} must be even; pad it by one")
    if q.dtype == torch.int8:
        if q.numel() and (q.min() < -8 or q.max() > 7):
            raise ValueError("pack_int4: signed codes must lie in [-8, 7]")
    elif q.dtype == torch.uint8:
        if q.numel() and q.max() > 15:
            raise ValueError("pack_int4: unsigned codes must lie in [0, 15]")
    else:
        raise ValueError(f"pack_int4: expected int8 or uint8 codes, got {q.dtype}")
    nib = q.to(torch.int16) & 0xF  # (..., K) one nibble per element
    return (nib[..., 0::2] | (nib[..., 1::2] << 4)).to(torch.uint8)  # (..., K//2)


def unpack_int4(packed: torch.Tensor, signed: bool = True) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: int8 codes in [-8, 7] (or uint8 in [0, 15] if unsigned).

    Example:
        >>> unpack_int4(torch.tensor([0xF0], dtype=torch.uint8), signed=False).tolist()
        [0, 15]
    """
    if packed.dtype != torch.uint8:
        raise ValueError(f"unpack_int4: expected uint8 packed bytes, got {packed.dtype}")
    p = packed.to(torch.int16)
    out = torch.stack((p & 0xF, p >> 4), dim=-1).reshape(*packed.shape[:-1], -1)  # (..., 2K)
    if signed:
        out = torch.where(out >= 8, out - 16, out)
        return out.to(torch.int8)
    return out.to(torch.uint8)
