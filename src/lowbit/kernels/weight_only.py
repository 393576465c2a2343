"""Weight-only linear layers (float activations, INT8 / INT4 weights): PyTorch's packed ops on
bf16 activations, dequantize + GEMM, and the one-call C path for small layers.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lowbit.kernels.base import c_layout, native_lib_for
from lowbit.memory import empty as pooled_empty
from lowbit.native import threads_for

#: torch before 2.13 (seen on 2.11): its CPU bf16 GEMM can spread a NaN / Inf of one input row
#: into the output of a neighbouring row (M=70, K=36, one thread). There, rows with non-finite
#: values are multiplied on their own, so one bad sample never changes another's output.
_BF16_MM_MIXES_ROWS = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)

#: Up to this many multiply-adds (M*N*Kp) a float32 weight-only linear runs in one C call
#: (:func:`weight_only_linear_native`, straight from the codes, in float32) instead of the
#: packed bf16 ops: INT4 g32 1 x 128 -> 10 7.1 vs 12.6 us, 1 x 512 -> 64 11 vs 13 us; from
#: ~100k on the packed ops win (1 x 1568 -> 128: 28 vs 16 us).
WO_SMALL_MACS = 1 << 15


def int4_pack_for_cpu(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Convert lowbit INT4 weights to ``aten._weight_int4pack_mm_for_cpu``'s layout.

    The op computes ``w = (u - 8) * s + z`` with ``u`` in [0, 15]; lowbit stores
    ``w = (c - zp) * s`` with codes ``c = u - shift`` (shift 8 for signed, 0 for unsigned codes),
    so ``z = (8 - shift - zp) * s``.

    Args:
        codes: int8/uint8 codes ``[N, K]``; scale / zero_point: ``[N, K // group]``.
        shift: 8 for signed codes, 0 for unsigned.

    Returns:
        ``(packed uint8 [N, K/2], scale_and_zero float32 [K // group, N, 2])``.

    Example:
        >>> c = torch.randint(-8, 8, (16, 64), dtype=torch.int8)
        >>> zp = torch.zeros(16, 2, dtype=torch.int32)
        >>> p, sz = int4_pack_for_cpu(c, torch.ones(16, 2), zp, 8)
        >>> tuple(p.shape), tuple(sz.shape)
        ((16, 32), (2, 16, 2))
    """
    u = codes.to(torch.int32) + shift  # (N, K) in [0, 15]
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(u.contiguous(), 1)
    zero = (8 - shift - zero_point.float()) * scale.float()  # (N, G)
    sz = torch.stack([scale.float(), zero], dim=-1).transpose(0, 1).contiguous()  # (G, N, 2)
    return packed, sz


def dequantize_weight_native(weight: torch.Tensor, packed: bool, signed: bool, n: int, kp: int,
                             k: int, group_size: int | None, scale: torch.Tensor,
                             zero_point: torch.Tensor) -> torch.Tensor | None:
    """float32 ``(code - zp) * scale`` ``[N, K]`` of a weight-only module's stored codes by one
    call of the fused C kernel; None when it does not apply (then use ``lowbit.ops``).

    Args:
        weight: stored codes ``[N, Kp]`` (int8 / uint8), or int4 nibbles ``[N, Kp / 2]`` (uint8)
            when ``packed``; signed: the codes' signedness.
        n, kp, k: rows, padded and real row length (the output drops the padding).
        group_size: codes per scale along a row, None for per-channel or per-tensor (told apart
            by ``scale.numel()``).
        scale, zero_point: float32 / int32 qparams ``()``, ``[N]`` or ``[N, Kp / group]``.

    Example:
        >>> from lowbit.ops import pack_int4
        >>> codes = torch.tensor([[-8, 7, 1, 0]], dtype=torch.int8)
        >>> w = dequantize_weight_native(pack_int4(codes), True, True, 1, 4, 3, None,
        ...                              torch.tensor([0.5]), torch.zeros(1, dtype=torch.int32))
        >>> w is None or w.tolist() == [[-4.0, 3.5, 0.5]]
        True
    """
    lib = _wo_weight_lib("dequantize_weight_native", weight, packed, n, kp, k, group_size,
                         scale, zero_point)
    if lib is None:
        return None
    return run_dequantize_weight_native(lib, (weight, int(packed), int(signed), n, kp, k,
                                              wo_group(group_size, scale, kp), scale,
                                              zero_point))


def run_dequantize_weight_native(lib: Any, args: tuple) -> torch.Tensor:
    """:func:`dequantize_weight_native` once checked: ``args`` is ``(weight, packed, signed, n,
    kp, k, group, scale, zero_point)`` with ``group`` as the C kernels take it (0: one scale
    per tensor); a module builds it once.

    Example:
        >>> codes = torch.tensor([[3, -2]], dtype=torch.int8)
        >>> lib = native_lib_for(codes)
        >>> args = (codes, 0, 1, 1, 2, 2, 2, torch.tensor([0.5]), torch.zeros(1, dtype=torch.int32))
        >>> lib is None or run_dequantize_weight_native(lib, args).tolist() == [[1.5, -1.0]]
        True
    """
    w, packed, signed, n, kp, k, group, scale, zp = args
    out = pooled_empty((n, k))  # a large weight: no page faults per call (lowbit.memory)
    lib.lb_dequantize_weight(w.data_ptr(), packed, signed, n, kp, k, group, scale.data_ptr(),
                             zp.data_ptr(), out.data_ptr(), threads_for(n * k))
    return out


def _wo_weight_lib(caller: str, weight: torch.Tensor, packed: bool, n: int, kp: int, k: int,
                   group_size: int | None, scale: torch.Tensor, zero_point: torch.Tensor) -> Any:
    """The C library when it can read this weight-only layer's codes and qparams, else None;
    ValueError (naming ``caller``) when their shapes do not match ``n`` / ``kp`` / ``k``."""
    rows = (n, kp // 2 if packed else kp)
    if tuple(weight.shape) != rows or k > kp or (packed and kp % 2):
        raise ValueError(f"{caller}: weight must be {rows} for n={n}, kp={kp}"
                         f"{' (int4, two codes per byte)' if packed else ''}, and k <= kp; got "
                         f"weight {tuple(weight.shape)}, k={k}")
    if group_size and (group_size < 1 or kp % group_size):
        raise ValueError(f"{caller}: group_size={group_size} must divide kp={kp}")
    # (the C kernels read one scale per group_size codes when it is given: n * kp / group)
    counts = (n * (kp // group_size),) if group_size else (1, n)
    if scale.numel() not in counts or zero_point.numel() != scale.numel():
        raise ValueError(f"{caller}: scale / zero_point need "
                         f"{' or '.join(map(str, counts))} values (per "
                         f"{'group' if group_size else 'tensor or channel'}); got "
                         f"{scale.numel()} / {zero_point.numel()}")
    lib = native_lib_for(weight)
    if lib is None or not c_layout((scale, torch.float32), (zero_point, torch.int32)):
        return None
    if not weight.is_contiguous() or weight.dtype not in (torch.int8, torch.uint8):
        return None
    return lib


def wo_small_max_rows(n: int, kp: int) -> int:
    """Largest M for which a weight-only linear of ``n`` outputs and ``kp`` (padded) inputs runs
    as ``"native_fp32"`` (:func:`weight_only_linear_native`); 0 when never.

    Example:
        >>> wo_small_max_rows(10, 128), wo_small_max_rows(4096, 4096)
        (25, 0)
    """
    return WO_SMALL_MACS // (n * kp) if n > 0 and kp > 0 else 0


def wo_small_fits(packed: bool, group_size: int | None) -> bool:
    """Whether :func:`weight_only_linear_native` can read this layout: its packed runs of one
    scale must be whole bytes (an even group size; per-channel and per-tensor rows are).

    Example:
        >>> wo_small_fits(True, 32), wo_small_fits(True, 7), wo_small_fits(False, 7)
        (True, False, True)
    """
    return not packed or not group_size or group_size % 2 == 0


def weight_only_linear_native(x: torch.Tensor, weight: torch.Tensor, *, packed: bool,
                              signed: bool, n: int, kp: int, group_size: int | None,
                              scale: torch.Tensor, zero_point: torch.Tensor,
                              bias: torch.Tensor | None = None, relu: bool = False
                              ) -> torch.Tensor | None:
    """A whole weight-only linear in one C call, in float32: ``x [M, K] @ W.T (+ bias, ReLU)``
    with ``W = (code - zp) * scale`` as :func:`dequantize_weight_native` reads it, each output
    a sum in a fixed order (16 interleaved partial sums), straight from the codes. For small
    layers (``M*N*Kp`` up to :data:`WO_SMALL_MACS`), where
    the packed bf16 ops cost more in casts and calls than in arithmetic. Same result as
    dequantize + ``F.linear`` up to float32 rounding. None when the C kernels do not apply
    (no compiler, or packed groups of an odd size: see :func:`wo_small_fits`).

    Args:
        x: float32 ``[M, K]`` with unit column stride. weight: stored codes (see
            :func:`dequantize_weight_native`); packed, signed, n, kp, group_size, scale,
            zero_point: as there. bias: float32 ``[N]``. relu: apply ReLU.

    Raises:
        ValueError: mismatched shapes or dtypes (named).

    Example:
        >>> from lowbit.ops import pack_int4
        >>> codes = torch.tensor([[-8, 7, 1, 0]], dtype=torch.int8)
        >>> y = weight_only_linear_native(torch.ones(2, 4), pack_int4(codes), packed=True,
        ...     signed=True, n=1, kp=4, group_size=None, scale=torch.tensor([0.5]),
        ...     zero_point=torch.zeros(1, dtype=torch.int32))
        >>> y is None or y.tolist() == [[0.0], [0.0]]
        True
    """
    if x.dim() != 2 or x.dtype != torch.float32 or x.shape[1] > kp or (
            x.shape[0] > 1 and x.stride(1) != 1):
        raise ValueError(f"weight_only_linear_native: x must be float32 [M, K] with K <= kp={kp} "
                         f"and unit column stride; got {tuple(x.shape)} {x.dtype}")
    if bias is not None and (tuple(bias.shape) != (n,) or bias.dtype != torch.float32):
        raise ValueError(f"weight_only_linear_native: bias must be float32 [{n}]; got "
                         f"{tuple(bias.shape)} {bias.dtype}")
    lib = _wo_weight_lib("weight_only_linear_native", weight, packed, n, kp, x.shape[1],
                         group_size, scale, zero_point)
    if (lib is None or native_lib_for(x) is None or not c_layout((bias, torch.float32))
            or not wo_small_fits(packed, group_size)):
        return None
    return run_weight_only_linear_native(lib, x, (weight, int(packed), int(signed), n, kp,
                                                  wo_group(group_size, scale, kp), scale,
                                                  zero_point, bias), relu)


def wo_group(group_size: int | None, scale: torch.Tensor, kp: int) -> int:
    """The C kernels' ``group``: codes per scale along a row, 0 for one scale per tensor.

    Example:
        >>> wo_group(32, torch.ones(4, 2), 64), wo_group(None, torch.ones(4), 64)
        (32, 64)
    """
    return group_size or (0 if scale.numel() == 1 else kp)


def run_weight_only_linear_native(lib: Any, x: torch.Tensor, args: tuple, relu: bool
                                  ) -> torch.Tensor:
    """:func:`weight_only_linear_native` once checked: ``args`` is ``(weight, packed, signed,
    n, kp, group, scale, zero_point, bias)`` with ``group`` as the C kernels take it (a module
    builds it once).

    Example:
        >>> codes = torch.tensor([[3, -2]], dtype=torch.int8)
        >>> lib = native_lib_for(codes)
        >>> args = (codes, 0, 1, 1, 2, 2, torch.tensor([0.5]), torch.zeros(1, dtype=torch.int32),
        ...         None)
        >>> y = lib and run_weight_only_linear_native(lib, torch.ones(1, 2), args, False)
        >>> y is None or y.tolist() == [[0.5]]
        True
    """
    w, packed, signed, n, kp, group, scale, zp, bias = args
    if x.stride(-1) != 1:  # the C kernel reads each row contiguously (a batch-1 row may be
        x = x.contiguous()  # expanded or strided: it must not be read as if it were not)
    m, k = x.shape
    out = torch.empty((m, n))
    err = lib.lb_wo_linear_small(x.data_ptr(), m, k, x.stride(0), w.data_ptr(), packed, signed,
                                 n, kp, group, scale.data_ptr(), zp.data_ptr(),
                                 None if bias is None else bias.data_ptr(), int(relu),
                                 out.data_ptr(), threads_for(m * n * kp))
    if err == -1:
        raise MemoryError(f"weight_only_linear_native: no memory for {m} x {kp} floats")
    if err:
        raise ValueError(f"weight_only_linear_native: packed group={group} is odd (see "
                         "wo_small_fits)")
    return out


def weight_only_linear(x: torch.Tensor, kernel: str, dequantize: callable,  # type: ignore[valid-type]
                       bias: torch.Tensor | None = None, *, packed: torch.Tensor | None = None,
                       scales: torch.Tensor | None = None, group_size: int = 0,
                       out_features: int | None = None) -> torch.Tensor:
    """Float-activation linear with low-bit weights; result in float32 ``[M, N]``.

    Args:
        x: float ``[M, K]``.
        kernel: from :func:`select_kernel`: ``"int8pack_bf16"`` (``packed`` = int8 ``[N, K16]``,
            zero columns up to a multiple of 16 and ``x`` padded to match,
            ``scales`` bf16 ``[N]``), ``"int4pack_bf16"`` (``packed`` from
            :func:`int4_pack_for_cpu`, ``scales`` its bf16 scale-and-zero), ``"dequant_bf16"``
            or ``"reference"`` (float32).
        dequantize: zero-argument callable returning the float32 weight ``[N, K]``.
        bias: float32 ``[N]`` or None.
        out_features: N when ``packed`` has extra (padding) rows: the output is sliced to it.

    Returns:
        float32 ``[M, N]``.

    Example:
        >>> w = torch.randn(3, 4)
        >>> y = weight_only_linear(torch.ones(2, 4), "reference", lambda: w)
        >>> torch.allclose(y, torch.ones(2, 4) @ w.t())
        True
    """
    if kernel == "int8pack_bf16":  # (both packed ops refuse rows that are not contiguous)
        xb = x.to(torch.bfloat16).contiguous()
        if packed.shape[1] != x.shape[1]:  # type: ignore[union-attr]  # zero columns, K % 16
            xb = F.pad(xb, (0, packed.shape[1] - x.shape[1]))  # type: ignore[union-attr]
        y = torch.ops.aten._weight_int8pack_mm(xb, packed, scales).float()
    elif kernel == "int4pack_bf16":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16).contiguous(), packed, group_size, scales)[:, :out_features].float()
    elif kernel == "dequant_bf16":  # (a large bf16 copy from the pool: no page faults)
        w = dequantize()
        wb = pooled_empty(tuple(w.shape), torch.bfloat16).copy_(w)
        xb = x.to(torch.bfloat16)
        bad = ~xb.isfinite().all(1) if _BF16_MM_MIXES_ROWS else None
        if bad is not None and bool(bad.any()):  # finite rows as always, the others alone
            y = F.linear(xb.masked_fill(bad[:, None], 0), wb).float()
            y[bad] = F.linear(xb[bad], wb).float()
        else:
            y = F.linear(xb, wb).float()
    else:  # "reference" / "dequant_fp32"
        return F.linear(x.float(), dequantize(), bias)
    return y if bias is None else y.add_(bias)
