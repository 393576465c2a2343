"""Activation quantization to int8 codes, ``clamp(round(x * (1/scale)) + zp, qmin, qmax)``: the
fused C quantizer (one pass) or PyTorch ops, the same bits.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.kernels.base import _F32_EPS, NATIVE_DTYPES, native_lib_for
from lowbit.native import threads_for

#: From this many elements on, ``max|x|`` is taken as ``max(amax, -amin)`` (see ``_absmax``).
_MINMAX_NUMEL = 1 << 17


def _quantize_native(lib: Any, x: torch.Tensor, qmin: int, qmax: int, scale: torch.Tensor | None,
                     zp: torch.Tensor | None, per_token: bool
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
    """:func:`quantize_activation` by ``lb_quantize_s8`` (float32 or bfloat16 ``x``); None when
    the layout does not fit."""
    if x.dim() == 2 and x.stride(1) == 1:
        x2 = x
    elif x.is_contiguous() and (per_token is False or scale is not None):
        x2 = x.reshape(-1, x.shape[-1] if x.dim() else 1)
    else:
        return None
    m, k = x2.shape
    if scale is None:
        per_row = per_token and x.dim() == 2
        scale = torch.empty((m, 1) if per_row else ())
        dynamic = 1
    else:
        scale = scale.float().contiguous()
        per_row = scale.numel() != 1
        if (per_row and (scale.numel() != m or x.dim() != 2)) or (
                zp is not None and zp.numel() != scale.numel()):
            return None
        dynamic = 0
    zpc = None if zp is None else zp.contiguous()
    q = torch.empty(x.shape, dtype=torch.int8)
    lib.lb_quantize_s8(x2.data_ptr(), int(x.dtype == torch.bfloat16), m, k, x2.stride(0),
                       scale.data_ptr(), int(per_row),
                       dynamic, None if zpc is None else zpc.data_ptr(), qmin, qmax,
                       q.data_ptr(), threads_for(m * k), None)
    return q, scale, zp


def _absmax(x: torch.Tensor, per_token: bool) -> torch.Tensor:
    """``max|x|`` per row (``[M, 1]``) or per tensor (``()``), without a float temporary when big.

    ``abs().amax()`` writes an ``|x|`` copy: on large inputs ``max(amax, -amin)`` (two reads, no
    write) is 1.3x faster; below ``_MINMAX_NUMEL`` elements one reduction call is cheaper.
    """
    if x.numel() == 0:  # an empty batch: no range (the scale then clamps to eps)
        return x.new_zeros((*x.shape[:-1], 1) if per_token else ())
    if x.numel() < _MINMAX_NUMEL:
        return x.abs().amax(dim=-1, keepdim=True) if per_token else x.abs().amax()
    if per_token:
        return torch.maximum(x.amax(dim=-1, keepdim=True), x.amin(dim=-1, keepdim=True).neg_())
    return torch.maximum(x.amax(), x.amin().neg_())


def quantize_activation(x: torch.Tensor, qmin: int, qmax: int, scale: torch.Tensor | None = None,
                        zero_point: torch.Tensor | None = None, *, per_token: bool = True,
                        native: bool = True
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Quantize float activations to int8 codes ``clamp(round(x * (1/scale)) + zp, qmin, qmax)``.

    The same codes as ``lowbit.ops.quantize`` (bit for bit). Without ``scale`` the qparams are
    dynamic and symmetric (``scale = max|x| / qmax``, clamped to float32 eps, zero-point 0), per
    row when ``per_token`` else per tensor, as ``lowbit.ops.choose_qparams`` computes them.

    Args:
        x: float activations ``[M, K]`` (or any shape for per-tensor).
        qmin, qmax: signed code range of the activation spec (e.g. -128, 127).
        scale, zero_point: given qparams (float32 / int32 scalars); ``zero_point=None`` means 0
            (symmetric), which saves the zero-point compensation in :func:`int8_linear`.
        per_token: dynamic granularity.
        native: use the fused C kernel (:mod:`lowbit.native`, one pass, same bits) when it is
            available and ``x`` is a float32 or bfloat16 CPU tensor with unit stride in its
            last dim (2-D; or contiguous, for per-tensor or given scales).

    Returns:
        ``(q int8 like x, scale float32 [M, 1] or (), zero_point int32 or None)``; the
        zero-point is None when it is 0 by construction (dynamic symmetric, or given as None).

    Example:
        >>> q, s, z = quantize_activation(torch.tensor([[1.0, -2.0]]), -128, 127)
        >>> q.tolist(), z
        ([[64, -127]], None)
    """
    zp = None if zero_point is None else zero_point.to(torch.int32)
    if native and x.dtype in NATIVE_DTYPES and (lib := native_lib_for(x)) is not None:
        out = _quantize_native(lib, x, qmin, qmax, scale, zp, per_token)
        if out is not None:
            return out
    xf = x if x.dtype == torch.float32 else x.float()
    if scale is None:
        scale = _absmax(xf, per_token).div_(qmax).clamp_(min=_F32_EPS)
        # |round(x / scale)| <= qmax: only a range narrower than -qmax..qmax needs the clamp
        clamp = qmin > -qmax
    else:
        scale, clamp = scale.float(), True
    t = xf * scale.reciprocal()  # the one float temporary; 1/scale as in lowbit.ops
    t.round_()
    if zp is not None:
        t.add_(zp)
    if clamp:
        t.clamp_(qmin, qmax)
    return t.to(torch.int8), scale, zp  # float -> int8 is 2x faster than float -> uint8


def quantize_activation_u8(x: torch.Tensor, qmin: int, qmax: int, scale: torch.Tensor | None = None,
                           zero_point: torch.Tensor | None = None, *, per_token: bool = True
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`quantize_activation` with the codes stored shifted by +128 as uint8.

    ``u = q + 128`` (a flip of the sign bit) and ``zp_u = zp + 128``: the layout of oneDNN's
    u8 x s8 GEMMs. Kept for callers that want unsigned codes; lowbit's kernels take int8 codes.

    Returns:
        ``(u uint8 like x, scale float32 [M, 1] or (), zp_u int32)``.

    Example:
        >>> u, s, z = quantize_activation_u8(torch.tensor([[1.0, -2.0]]), -128, 127)
        >>> (u.int() - z).tolist()
        [[64, -127]]
    """
    if scale is not None and zero_point is None:
        zero_point = torch.zeros((), dtype=torch.int32)
    q, scale, zp = quantize_activation(x, qmin, qmax, scale, zero_point, per_token=per_token)
    zp_u = torch.tensor(128, dtype=torch.int32) if zp is None else zp + 128
    return q.view(torch.uint8).bitwise_xor_(0x80), scale, zp_u
