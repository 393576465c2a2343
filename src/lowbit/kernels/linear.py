"""INT8 x INT8 linear layers: ``int8_linear`` on given codes, and the fused path that quantizes,
runs the GEMM and the epilogue in one to three calls (what ``QuantizedLinear`` runs).
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit.kernels.base import _F32_EPS, NATIVE_DTYPES, c_layout, native_lib_for
from lowbit.kernels.gemm import _int8_acc, _int8_epilogue
from lowbit.kernels.isa import _s8_call, check_smooth, s8_packed
from lowbit.kernels.select import select_kernel
from lowbit.memory import empty as pooled_empty
from lowbit.native import load_gemm, threads_for

#: Up to this many multiply-adds (M*N*K) :func:`fused_int8_linear` runs the whole layer in one
#: C call (its own int8 dot products) instead of quantize + ``_int_mm`` + epilogue: e.g. 6.5 vs
#: 10.7 us for 1x128 -> 10, 9.7 vs 12.0 us for 1x1568 -> 128; from ~1M on ``_int_mm`` wins.
SMALL_LINEAR_MACS = 1 << 18


#: ... and up to this many activation codes (bytes of C stack scratch; thread stacks can be
#: as small as 128 KiB).
SMALL_LINEAR_CODES = 1 << 14


#: Where the INT8 GEMM is lowbit's own (``"s8_avx2"`` / ``"s8_portable"``: no VNNI) the one-call
#: path's plain int8 dot products lose to it sooner (AVX2 machine, us, one call vs the GEMM
#: path, 1 thread / 2 threads: 1x128 -> 10 8.7 vs 18.4 / 8.9 vs 17.9, 1x256 -> 256 17.1 vs 20.8
#: / 13.3 vs 18.9, 32x64 -> 64 - / 20.0 vs 21.1, 1x1568 -> 128 33.1 vs 22.1 / 21.6 vs 22.0,
#: 1x512 -> 512 42.2 vs 25.0 / 25.5 vs 21.3).
SMALL_LINEAR_MACS_S8 = 1 << 17


#: :func:`fused_int8_linear` runs ``_int_mm`` layers of at least twice this many rows block by
#: block. Each ``_int_mm`` call re-lays out the weight for oneDNN, so blocks are large: whole
#: dynamic layer, Xeon with AMX, 2 threads, blocks of 512 / 1024 / 2048 / none, ms: 4096 x 384
#: -> 1536 6.2 / 5.3 / 4.9 / 4.4; 4096 x 1536 -> 384 5.3 / 4.0 / 3.8 / 3.2; 4096 x 4096 -> 4096
#: 79 / 76 / 69 / 66 (FP32 20, 17, 516).
BLOCK_ROWS = 2048


#: The GEMMs :func:`fused_int8_linear` runs.
FUSED_GEMMS = ("int_mm_s8s8", "fp32_codes", "s8_amx", "s8_avx512_vnni", "s8_avx2",
               "s8_portable")


def int8_linear(q: torch.Tensor, x_scale: torch.Tensor, zp: torch.Tensor | None,
                w: torch.Tensor, w_scale: torch.Tensor, colsum: torch.Tensor,
                bias: torch.Tensor | None = None, *, relu: bool = False,
                kernel: str | None = None, comp: torch.Tensor | None = None,
                w_zp: torch.Tensor | None = None) -> torch.Tensor:
    """INT8 x INT8 GEMM with INT32 accumulation and a float epilogue.

    ``y[m, n] = s_x[m] * s_w[n] * sum_k (q[m, k] - zp[m]) * (w[n, k] - w_zp[n]) + bias[n]``

    Symmetric activations (``zp=None``) go straight into the GEMM; a zero-point costs one
    ``[M, N]`` pass ``acc -= zp * colsum``; an affine weight (``w_zp``) one int32 row sum of
    ``q`` and a rank-1 update ``acc -= rowsum(q) (x) w_zp`` (``colsum`` is centered).

    Args:
        q: int8 activation codes ``[M, K]`` from :func:`quantize_activation` (the uint8 codes
            of :func:`quantize_activation_u8` with their ``zp_u`` give the same result).
        x_scale, zp: ``[M, 1]`` (per token) or ``()`` (per tensor) float32 / int32; ``zp``
            None means 0.
        w: int8 weight ``[N, K]``, contiguous.
        w_scale: float32 ``[N]``; colsum: int32 ``[N]``, ``(w - w_zp).sum(1)``.
        bias: float32 ``[N]`` or None; relu: apply ReLU after the bias.
        kernel: ``"int_mm_s8s8"``, ``"fp32_codes"`` or ``"reference"``; None: chosen by
            :func:`select_kernel` for this CPU and M.
        comp: optional precomputed ``zp * colsum`` (int32 ``[N]``) for a fixed zero-point.
        w_zp: int32 weight zero-points ``[N]``, or None for symmetric weights.

    Returns:
        float32 ``[M, N]``.

    Example:
        >>> from lowbit.kernels import quantize_activation
        >>> w = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
        >>> q, s, z = quantize_activation(torch.tensor([[1.0, 0.5]]), -128, 127)
        >>> args = (q, s, z, w, torch.ones(2), w.int().sum(1))
        >>> torch.equal(int8_linear(*args), int8_linear(*args, kernel="reference"))
        True
        >>> zw = torch.tensor([1, -3], dtype=torch.int32)  # affine weights
        >>> args = (q, s, z, w, torch.ones(2), w.int().sum(1) - 2 * zw)
        >>> ref = int8_linear(*args, w_zp=zw, kernel="reference")
        >>> torch.equal(int8_linear(*args, w_zp=zw), ref)
        True
    """
    if kernel is None:
        kernel = select_kernel("int8_linear", q.shape[0], k=q.shape[1], n=w.shape[0],
                               device=q.device.type)
    acc = _int8_acc(q, zp, w, colsum, comp, kernel, w_zp)  # (M, N) int32
    return _int8_epilogue(acc, x_scale, w_scale, bias, relu, native=kernel != "reference")


def fused_int8_linear(x: torch.Tensor, qmin: int, qmax: int, w: torch.Tensor,
                      w_scale: torch.Tensor, colsum: torch.Tensor, bias: torch.Tensor | None, *,
                      per_token: bool = True, scale: torch.Tensor | None = None,
                      zero_point: torch.Tensor | None = None, comp: torch.Tensor | None = None,
                      relu: bool = False, kernel: str = "int_mm_s8s8") -> torch.Tensor | None:
    """:func:`quantize_activation` + :func:`int8_linear` in three calls: the fused C quantizer,
    the INT8 GEMM and the fused C epilogue; the same bits. None when it does not apply.

    It applies to float32 or bfloat16 CPU ``x [M, K]`` with unit stride in K (a bfloat16 ``x``
    gives a bfloat16 output, rounded once from the float32 result), symmetric weights, the
    ``"int_mm_s8s8"`` / ``"fp32_codes"`` GEMMs, and the C kernels available (see
    :mod:`lowbit.native`). Eager PyTorch spends ~12 op dispatches on the same work, which is
    most of a small layer's time (e.g. 21 vs 4 us for a 128 -> 10 Linear at batch 1).

    Args:
        x: float32 or bfloat16 activations ``[M, K]``.
        qmin, qmax: activation code range.
        w, w_scale, colsum, bias: int8 ``[N, K]`` weight, float32 ``[N]`` scales, int32 ``[N]``
            column sums, float32 ``[N]`` bias or None (all contiguous).
        per_token: dynamic granularity (when ``scale`` is None).
        scale, zero_point: static per-tensor qparams (0-dim float32 / int32; ``zero_point``
            None means 0); None: dynamic symmetric.
        comp: ``zero_point * colsum`` (int32 ``[N]``) for a non-zero static zero-point.
        relu: fused ReLU. kernel: the GEMM.

    Returns:
        ``[M, N]`` in x's dtype, or None (use :func:`quantize_activation` + :func:`int8_linear`).

    Example:
        >>> from lowbit.kernels import quantize_activation
        >>> w = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
        >>> x = torch.tensor([[1.0, 0.5]])
        >>> y = fused_int8_linear(x, -128, 127, w, torch.ones(2), w.int().sum(1), None)
        >>> q, s, z = quantize_activation(x, -128, 127, native=False)
        >>> ref = int8_linear(q, s, z, w, torch.ones(2), w.int().sum(1), kernel="reference")
        >>> y is None or torch.equal(y, ref)
        True
    """
    _check_linear_shapes("fused_int8_linear", x, w, w_scale, colsum, bias, comp)
    for name, t in (("scale", scale), ("zero_point", zero_point)):  # (C reads one value)
        if t is not None and t.numel() != 1:
            raise ValueError(f"fused_int8_linear: {name} must hold one value (static per-tensor "
                             f"qparams); got shape {tuple(t.shape)}")
    lib = native_lib_for(x)
    if (lib is None or x.dtype not in NATIVE_DTYPES or x.dim() != 2 or x.stride(1) != 1
            or kernel not in FUSED_GEMMS or not fused_linear_layout(
                w, w_scale, bias, comp, scale, zero_point)):
        return None
    return run_fused_linear(lib, x, qmin, qmax, w, w_scale, colsum, bias, per_token, scale,
                         zero_point, comp, relu, kernel)


def _check_linear_shapes(fn: str, x: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
                         colsum: torch.Tensor, bias: torch.Tensor | None,
                         comp: torch.Tensor | None) -> None:
    """Refuse operands whose shapes do not match ``x [M, K]`` and ``w [N, K]`` (the C kernels
    read them by those sizes)."""
    if x.dim() != 2 or w.dim() != 2 or x.shape[1] != w.shape[1]:
        raise ValueError(f"{fn}: x must be [M, K] and w [N, K] with the same K; got x "
                         f"{tuple(x.shape)}, w {tuple(w.shape)}")
    n = w.shape[0]
    for name, t in (("w_scale", w_scale), ("colsum", colsum), ("bias", bias), ("comp", comp)):
        if t is not None and t.numel() != n:
            raise ValueError(f"{fn}: {name} must have one value per output feature (N={n}); "
                             f"got shape {tuple(t.shape)}")


def fused_linear_layout(w: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                        comp: torch.Tensor | None = None, scale: torch.Tensor | None = None,
                        zero_point: torch.Tensor | None = None) -> bool:
    """Whether a layer's tensors have the dtypes and layout :func:`fused_int8_linear` reads
    (int8 weight, float32 scales and bias, int32 zero-point terms, all contiguous): a module
    checks this once, then calls the kernel without per-call checks.

    Example:
        >>> fused_linear_layout(torch.zeros(2, 4, dtype=torch.int8), torch.ones(2), None)
        True
    """
    return c_layout((w, torch.int8), (w_scale, torch.float32), (bias, torch.float32),
                     (comp, torch.int32), (scale, torch.float32), (zero_point, torch.int32))


def one_call_linear(m: int, k: int, n: int, kernel: str) -> bool:
    """Whether :func:`run_fused_linear` runs an ``[m, k] x [n, k]^T`` layer whose GEMM is
    ``kernel`` as the one-call small C kernel (quantize, int8 dot products and epilogue
    together, codes on the C stack).

    Example:
        >>> one_call_linear(1, 128, 10, "s8_avx2"), one_call_linear(32, 4096, 4096, "s8_avx2")
        (True, False)
    """
    small = SMALL_LINEAR_MACS_S8 if kernel.startswith("s8_") else SMALL_LINEAR_MACS
    return m * n * k <= small and m * k <= SMALL_LINEAR_CODES


def run_fused_linear(lib: Any, x: torch.Tensor, qmin: int, qmax: int, w: torch.Tensor,
                  w_scale: torch.Tensor, colsum: torch.Tensor, bias: torch.Tensor | None,
                  per_token: bool, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                  comp: torch.Tensor | None, relu: bool, kernel: str,
                  smooth: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fused_int8_linear` once everything is checked (a module checks its own tensors
    once with :func:`fused_linear_layout`, then only ``x`` and ``lib`` per call).

    ``smooth``: float32 ``[K]`` input smoothing (AWQ / SmoothQuant) that the quantizer applies
    to each row (the products ``x * smooth`` gives, without a pass of its own); float32 ``x``
    with dynamic per-token scales only, else it is multiplied in first.

    Example:
        >>> w = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
        >>> x = torch.tensor([[1.0, 0.5]])
        >>> lib = native_lib_for(x)
        >>> y = lib and run_fused_linear(lib, x, -128, 127, w, torch.ones(2), w.sum(
        ...     1, dtype=torch.int32), None, True, None, None, None, False, "fp32_codes")
        >>> y is None or y.tolist() == fused_int8_linear(x, -128, 127, w, torch.ones(2),
        ...     w.sum(1, dtype=torch.int32), None, kernel="fp32_codes").tolist()
        True
    """
    m, k = x.shape
    n = w.shape[0]
    bf16 = x.dtype == torch.bfloat16
    check_smooth(smooth, k, "run_fused_linear")
    if smooth is not None and (bf16 or scale is not None or not per_token):
        x, smooth = x * smooth.to(x.dtype), None
    sp = None if smooth is None else smooth.data_ptr()
    if one_call_linear(m, k, n, kernel):
        dynamic = scale is None  # (its codes and dynamic scales live on the C stack)
        out = torch.empty((m, n), dtype=x.dtype)
        lib.lb_linear_s8_small(x.data_ptr(), bf16, m, k, x.stride(0),
                               None if dynamic else scale.data_ptr(),  # type: ignore[union-attr]
                               int(dynamic and per_token), int(dynamic),
                               None if zero_point is None else zero_point.data_ptr(), qmin, qmax,
                               w.data_ptr(), n, None if comp is None else comp.data_ptr(),
                               w_scale.data_ptr(), None if bias is None else bias.data_ptr(),
                               int(relu), out.data_ptr(), bf16, threads_for(m * n * k), sp)
        return out
    if kernel.startswith("s8_"):
        packed = (lib8 := load_gemm(kernel[3:])) and s8_packed(w, lib8)
        if packed is not None:  # quantize, GEMM and epilogue in one call of this ISA's C
            out = pooled_empty((m, n), x.dtype)  # (from the pool when large)
            dynamic = scale is None
            s = torch.empty((m, 1) if per_token else ()) if dynamic else scale
            _s8_call(lib8, x, int(bf16), s, dynamic and per_token, dynamic, zero_point, qmin,
                     qmax, packed, n, comp, w_scale, bias, relu, out, int(bf16), smooth)
            return out
        kernel = "fp32_codes"  # a -128 weight code: the exact fp32 GEMM over the codes
    if kernel == "int_mm_s8s8" and m >= 2 * BLOCK_ROWS:
        return _fused_linear_blocks(lib, x, qmin, qmax, w, w_scale, bias, per_token, scale,
                                    zero_point, comp, relu, smooth)
    zp = None
    q = torch.empty((m, k), dtype=torch.int8)
    if scale is None:
        s = torch.empty((m, 1) if per_token else ())
        lib.lb_quantize_s8(x.data_ptr(), bf16, m, k, x.stride(0), s.data_ptr(), int(per_token), 1,
                           None, qmin, qmax, q.data_ptr(), threads_for(m * k), sp)
    else:
        s, zp = scale, zero_point
        lib.lb_quantize_s8(x.data_ptr(), bf16, m, k, x.stride(0), s.data_ptr(), 0, 0,
                           None if zp is None else zp.data_ptr(), qmin, qmax, q.data_ptr(),
                           threads_for(m * k), None)
    acc = _int8_acc(q, zp, w, colsum, comp, kernel, pooled=True)  # (M, N) int32
    out = pooled_empty((m, n), torch.bfloat16) if bf16 else None
    lib.lb_epilogue(acc.data_ptr(), 1, m, n, 1, s.data_ptr(), int(s.numel() != 1),
                    w_scale.data_ptr(), None if bias is None else bias.data_ptr(), int(relu),
                    None if out is None else out.data_ptr(), threads_for(m * n))
    return acc.view(torch.float32) if out is None else out


def _fused_linear_blocks(lib: Any, x: torch.Tensor, qmin: int, qmax: int, w: torch.Tensor,
                         w_scale: torch.Tensor, bias: torch.Tensor | None, per_token: bool,
                         scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                         comp: torch.Tensor | None, relu: bool,
                         smooth: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`fused_int8_linear` for many rows, :data:`BLOCK_ROWS` at a time: the int8 codes
    (and, for a bfloat16 output, the int32 accumulator) live in small buffers reused across
    blocks and stay in cache between the quantizer, ``_int_mm`` and the epilogue; a float32
    output takes the accumulator in place. The same per-row arithmetic, so the same bits."""
    m, k = x.shape
    n = w.shape[0]
    bf16 = x.dtype == torch.bfloat16
    rows = BLOCK_ROWS
    out = pooled_empty((m, n), x.dtype)
    qb = torch.empty((rows, k), dtype=torch.int8)
    accb = torch.empty((rows, n), dtype=torch.int32) if bf16 else None
    per_row = scale is None and per_token
    if scale is None:  # per token: each block computes its rows' scales
        s = torch.empty((m, 1) if per_token else ())
        if not per_token:  # one scale from all rows first (float32 maths, as everywhere)
            absmax = lib.lb_absmax(x.data_ptr(), bf16, m, k, x.stride(0), threads_for(m * k))
            s = torch.tensor(absmax).div_(qmax).clamp_(min=_F32_EPS)
    else:
        s = scale
    zp_ptr = None if zero_point is None else zero_point.data_ptr()
    x_ptr, x_row, s_ptr, out_ptr = (x.data_ptr(), x.stride(0) * x.element_size(), s.data_ptr(),
                                    out.data_ptr())
    wt, n_threads = w.t(), threads_for(rows * max(k, n))
    for r0 in range(0, m, rows):
        b = min(rows, m - r0)
        s_blk = s_ptr + 4 * r0 if per_row else s_ptr
        lib.lb_quantize_s8(x_ptr + r0 * x_row, bf16, b, k, x.stride(0), s_blk, int(per_row),
                           int(per_row), zp_ptr, qmin, qmax, qb.data_ptr(), n_threads,
                           None if smooth is None else smooth.data_ptr())
        acc = accb[:b] if accb is not None else out[r0:r0 + b].view(torch.int32)
        torch._int_mm(qb[:b], wt, out=acc)
        if comp is not None:
            acc.sub_(comp)
        lib.lb_epilogue(acc.data_ptr(), 1, b, n, 1, s_blk, int(s.numel() != 1),
                        w_scale.data_ptr(), None if bias is None else bias.data_ptr(), int(relu),
                        out_ptr + r0 * n * 2 if bf16 else None, n_threads)
    return out
