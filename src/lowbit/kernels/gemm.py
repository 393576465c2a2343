"""The exact INT32 accumulator ``(q - zp) @ (w - w_zp).T`` by every path: the pure-PyTorch
reference (float64), the torch-ops paths (``torch._int_mm``; an fp32 GEMM over the codes) and
lowbit's per-ISA C GEMM; and the float epilogue ``acc * s_x * s_w + bias`` they share.
"""

from __future__ import annotations

import functools

import torch

from lowbit.kernels.base import native_lib_for
from lowbit.kernels.isa import s8_acc
from lowbit.memory import empty as pooled_empty
from lowbit.native import threads_for

#: fp32 GEMM over integer codes is exact while every partial sum stays below 2^24: centered
#: activation codes reach 255 (affine zero-point), weight codes 128, and 512 * 255 * 128 < 2^24.
_CODES_CHUNK_K = 512


def acc_reference(q: torch.Tensor, zp: torch.Tensor | None, w2d: torch.Tensor,
                  w_zp: torch.Tensor | None) -> torch.Tensor:
    """The pure-PyTorch reference: ``(q - zp) @ (w2d - w_zp).T`` in float64, exact for
    ``K < 2^37``, as int32 ``[M, N]``. Runs anywhere; defines the expected numbers.

    Example:
        >>> q = torch.tensor([[1, -2]], dtype=torch.int8)
        >>> acc_reference(q, None, torch.tensor([[3, 4]], dtype=torch.int8), None).tolist()
        [[-5]]
    """
    centered = q.double() if zp is None else q.double() - zp.double()  # (M, K) q - zp
    wc = w2d.double() if w_zp is None else w2d.double() - w_zp.double()[:, None]  # (N, K)
    return (centered @ wc.t()).to(torch.int32)


def acc_fp32_codes(q: torch.Tensor, zp: torch.Tensor | None, w2d: torch.Tensor,
                   w_zp: torch.Tensor | None, pooled: bool = False) -> torch.Tensor:
    """A torch-ops path: an fp32 GEMM over the integer codes in K chunks of 512, exact because
    every partial sum is an integer below 2^24 (``|q - zp| <= 255``, ``|w| <= 128``): the exact
    choice where the integer GEMM is not (no VNNI) and no C path is available. ``pooled``: the
    large buffers come from :mod:`lowbit.memory`'s reused blocks (no page faults per call).

    Example:
        >>> q = torch.randint(-128, 128, (3, 1100), dtype=torch.int8)
        >>> w = torch.randint(-128, 128, (5, 1100), dtype=torch.int8)
        >>> torch.equal(acc_fp32_codes(q, None, w, None), acc_reference(q, None, w, None))
        True
    """
    def buffer(shape: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
        return pooled_empty(shape, dtype) if pooled else torch.empty(shape, dtype=dtype)

    (m, k), n = q.shape, w2d.shape[0]
    centered32 = buffer((m, k), torch.float32).copy_(q)  # |q - zp| <= 255
    if zp is not None:
        centered32.sub_(zp.float())
    wf = w2d.float()  # (N, K), |w| <= 128
    acc, part = buffer((m, n), torch.int32), buffer((m, n), torch.float32)
    for s in range(0, k, _CODES_CHUNK_K):
        torch.mm(centered32[:, s:s + _CODES_CHUNK_K], wf[:, s:s + _CODES_CHUNK_K].t(), out=part)
        if s == 0:
            acc.copy_(part)  # an exact integer in float32 -> int32
        else:
            acc.add_(part.to(torch.int32))
    if w_zp is not None:  # - w_zp[n] * sum_k (q - zp)[m, k]
        rows = q.sum(1, dtype=torch.int32)
        if zp is not None:
            rows = rows - k * zp.reshape(-1)
        acc.addr_(rows.expand(acc.shape[0]), w_zp, alpha=-1)
    return acc


@functools.cache
def int_mm_takes_uint8(device: str = "cpu") -> bool:
    """Whether ``torch._int_mm`` multiplies uint8 by int8 on ``device`` (the CPU: torch >= 2.13).

    ``device`` is a device type such as ``"cpu"`` or ``"cuda"``; anything else is a
    ``ValueError``.

    Example:
        >>> isinstance(int_mm_takes_uint8("cpu"), bool)
        True
    """
    try:
        device = torch.device(device).type
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"int_mm_takes_uint8: device={device!r} is not a torch device type; "
                         "pass e.g. 'cpu' or 'cuda' (a tensor's .device.type)") from exc
    try:
        torch._int_mm(torch.zeros(32, 8, dtype=torch.uint8, device=device),
                      torch.zeros(8, 8, dtype=torch.int8, device=device))
    except (RuntimeError, AttributeError, AssertionError):  # (no such op / kernel / device)
        return False
    return True


def acc_int_mm(q: torch.Tensor, w2d: torch.Tensor, pooled: bool) -> torch.Tensor:
    """A torch-ops path: raw int32 ``q @ w2d.T`` by ``torch._int_mm`` (oneDNN: exact with VNNI,
    and on CUDA). B is the transpose of the contiguous ``[N, K]`` weight, its fast layout;
    ``pooled``: the output in :mod:`lowbit.memory`'s reused blocks. Rows less than K apart
    (an im2col view of a conv's patches, an expanded input) are copied first: ``_int_mm``
    misreads them (conv outputs off by 10^4 on oneDNN's VNNI kernel)."""
    if q.dim() == 2 and (q.stride(1) != 1 or (q.shape[0] > 1 and q.stride(0) < q.shape[1])):
        q = q.contiguous()
    if not pooled:
        return torch._int_mm(q, w2d.t())
    return torch._int_mm(q, w2d.t(), out=pooled_empty((q.shape[0], w2d.shape[0]), torch.int32))


def _int8_acc(q: torch.Tensor, zp: torch.Tensor | None, w2d: torch.Tensor, colsum: torch.Tensor,
              comp: torch.Tensor | None, kernel: str, w_zp: torch.Tensor | None = None,
              pooled: bool = False) -> torch.Tensor:
    """Exact int32 ``(q - zp) @ (w2d - w_zp).T`` ``[M, N]`` by the chosen kernel.

    ``q`` are int8 codes (uint8 codes work too, e.g. from :func:`quantize_activation_u8`);
    ``zp=None`` means 0. ``colsum[n] = sum_k (w2d[n, k] - w_zp[n])``; the zero-point costs
    ``zp * colsum`` (or the precomputed ``comp``), a weight zero-point ``w_zp[n] * rowsum_m(q)``.
    The integer GEMMs (``"s8_<isa>"``, ``"int_mm_s8s8"``) give the raw ``q @ w.T`` and the
    zero-point terms are applied here.
    """
    if kernel == "reference":
        return acc_reference(q, zp, w2d, w_zp)
    acc = s8_acc(q, w2d, kernel, pooled) if kernel.startswith("s8_") else None
    if kernel == "fp32_codes" or (acc is None and (kernel.startswith("s8_") or (
            q.dtype == torch.uint8 and not int_mm_takes_uint8(q.device.type)))):
        return acc_fp32_codes(q, zp, w2d, w_zp, pooled)  # (also for a -128 weight code, uint8)
    if acc is None:
        acc = acc_int_mm(q, w2d, pooled)
    if comp is not None:
        acc.sub_(comp)
    elif zp is not None:
        acc.sub_(zp * colsum)
    if w_zp is not None:  # - w_zp[n] * sum_k q[m, k]
        acc.addr_(q.sum(1, dtype=torch.int32), w_zp, alpha=-1)
    return acc


def _int8_epilogue(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, relu: bool, native: bool = True) -> torch.Tensor:
    """``acc * s_w * s_x + bias`` (then ReLU), float32 ``[M, N]``; shared by all INT8 paths.

    Runs in place in the int32 accumulator's memory (``acc`` is consumed): no new ``[M, N]``
    allocation, which for large outputs costs more than the arithmetic. ``native``: one pass of
    the fused C kernel (same bits) when available, else three PyTorch passes.
    """
    if native and _epilogue_native(acc, x_scale, w_scale, bias, relu):
        return acc.view(torch.float32)
    y = acc.view(torch.float32)
    y.copy_(acc)  # int32 -> float32 element by element in the same memory
    return _float_epilogue(y, x_scale, w_scale, bias, relu)


def _float_epilogue(y: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None, relu: bool) -> torch.Tensor:
    """The float part of :func:`_int8_epilogue` in PyTorch ops, in place on a float32
    accumulator: ``[M, N]`` (per-row or scalar ``x_scale``, ``w_scale`` / ``bias`` ``[N]``) or
    NCHW ``[B, N, H, W]`` (scalar ``x_scale``, ``[N, 1, 1]`` ``w_scale`` / ``bias``).
    ``"fp32_codes_conv"`` calls it directly on its (exact, integer-valued) float32 conv output:
    the same values and the same ops as the int32 -> float32 copy, so the same bits.
    """
    y.mul_(w_scale)
    if bias is None:
        y.mul_(x_scale)
    else:
        torch.addcmul(bias, y, x_scale, out=y)
    return y.relu_() if relu else y


def _epilogue_native(acc: torch.Tensor, x_scale: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, relu: bool) -> bool:
    """:func:`_int8_epilogue` of an int32 ``[M, N]`` accumulator by ``lb_epilogue``, in place;
    False (nothing done) when the C kernel is unavailable or the layout does not fit."""
    if not acc.is_contiguous() or acc.dim() != 2 or acc.dtype != torch.int32:
        return False
    m, n = acc.shape
    parts = [x_scale, w_scale] if bias is None else [x_scale, w_scale, bias]
    lib = native_lib_for(acc, *parts)
    if lib is None or any(t.dtype != torch.float32 for t in parts):
        return False
    per_row = x_scale.numel() != 1
    if (per_row and x_scale.numel() != m) or w_scale.numel() not in (1, n):
        return False
    if bias is not None and bias.numel() != n:
        return False
    sw = w_scale.expand(n) if w_scale.numel() == 1 else w_scale
    sx, sw = x_scale.contiguous(), sw.contiguous()
    b = None if bias is None else bias.contiguous()
    lib.lb_epilogue(acc.data_ptr(), 1, m, n, 1, sx.data_ptr(), int(per_row), sw.data_ptr(),
                    None if b is None else b.data_ptr(), int(relu), None,
                    threads_for(acc.numel()))
    return True
