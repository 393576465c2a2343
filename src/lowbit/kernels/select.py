"""Kernel selection: which kernel runs a given op and shape on this CPU, from one table per
ISA path (:func:`lowbit.native.selected_isa`) and a few shape rules. The measurements behind
the thresholds are in ``docs/kernels.md``.
"""

from __future__ import annotations

import functools
import os
import re
import sys

import torch

from lowbit.native import load_gemm, load_native, selected_isa

#: Largest number of rows M for which ``_weight_int8pack_mm`` (bf16 activations) runs INT8
#: weight-only layers; above, the weight is dequantized in one C pass for a float GEMM. Xeon, 2
#: threads, ms, packed op / dequantize + GEMM (FP32 alone), the same within 10% with oneDNN
#: limited to AVX2 or to AVX512_CORE_BF16: 16 x 4096 -> 4096 3.0-3.2 / 7.4-8.4 (5.2-5.6), 32x
#: 6.0-6.7 / 8.8-9.0 (6.2-6.4), 64x 12.0-12.3 / 9.6-11.8 (8.3-8.6); 32 x 1024 -> 1024 0.43-0.44
#: / 0.59-0.69 (0.34-0.39), 64x 0.81-0.85 / 0.62-0.83 (0.51-0.59); 64 x 384 -> 1536 0.53-0.54 /
#: 0.38 (0.24-0.25). Between about 20 and a few hundred rows neither beats FP32.
WEIGHT_ONLY_PACKED_MAX_M = 32


#: The same for ``_weight_int4pack_mm_for_cpu``: dequantizing INT4 costs more, so the packed op
#: wins up to larger M (measured crossover ~1024 on the VNNI machine).
INT4_PACKED_MAX_M = 512


#: The same on CPUs without AVX512-BF16, where the packed op's bf16 arithmetic is emulated:
#: dequantize + fp32 GEMM is faster from M = 32 on (AVX2 machine, 2 threads, 384 -> 1536 g128,
#: packed op vs dequantize + fp32: M = 32 1.30 vs 1.05 ms, M = 64 2.68 vs 1.50 ms, M = 128
#: 3.27 vs 2.38 ms; fp32 0.69 / 1.19 / 1.65 ms). Up to 16 rows lowbit's own INT4 kernel runs.
INT4_PACKED_MAX_M_NO_BF16 = 16
#: Group sizes ``aten._weight_int4pack_mm_for_cpu`` accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)


#: Largest conv reduction size K = C/groups * kh * kw run as ``"fp32_codes_conv"`` (fp32
#: ``F.conv2d`` over the centered codes) on VNNI CPUs, where im2col + ``_int_mm`` wins above
#: (measured crossover K ~ 108-144).
CONV_CODES_MAX_K = 128


#: The same with the fused C kernels (:mod:`lowbit.native`): their im2col (quantize into a
#: padded NHWC buffer, gather, NCHW epilogue) makes the INT8 GEMM win from K ~ 27 on (whole
#: conv, 32 output channels, batch 1 / 8 / 32 vs ``fp32_codes_conv``: K = 9 46 / 91 / - vs
#: 41 / 89 / - us; K = 27 56 / 127 / 457 vs 79 / 136 / 348; K = 72 47 / 118 / 363 vs
#: 86 / 142 / 373; K = 144 33 / 79 / 180 vs 57 / 126 / 270).
CONV_CODES_MAX_K_NATIVE = 16


#: On the ``amx`` path (the same C library built with AMX) the INT8 GEMM is lowbit's C kernel at
#: every M where :func:`amx_tiles` holds (K >= 61): AMX tiles from 6 rows on, vpdpbusd below.
#: Whole dynamic layer, Xeon with AMX, 2 threads, AMX tiles / vpdpbusd tiles / ``_int_mm``, ms:
#: 32 x 4096 -> 11008 1.65-1.89 / 4.6-4.8 / 3.0-3.1; 4096 x 384 -> 1536 2.8-3.0 / 8.6-9.1 /
#: 5.0-5.3; 1024 x 4096 -> 4096 11.5-12.2 / 55 / 15-16; 8 x 4096 -> 4096 0.48 / 0.51 / 0.92;
#: 1 x 1024 -> 1024 0.047-0.051 / 0.038-0.040 / 0.11 (``docs/kernels.md``).
#:
#: On the ``avx512_vnni`` path (VNNI without AMX: AMD Zen 4, Intel Ice Lake / Cascade Lake) the
#: INT8 GEMM is lowbit's C kernel (``"s8_avx512_vnni"``: quantize, vpdpbusd GEMM and epilogue in
#: one call) up to this many rows or :data:`VNNI_S8_MAX_MACS` multiply-adds, oneDNN's
#: ``_int_mm`` above (blocked for caches; ~90 us of fixed cost per call). Whole dynamic layer, 2
#: threads, C vs ``_int_mm`` ms, Xeon with oneDNN capped to ``AVX512_CORE_BF16`` (what
#: ``_int_mm`` runs on such CPUs), two runs: 8 x 4096 -> 4096 0.38-0.42 vs 0.38-0.39, 32x
#: 1.11-1.17 vs 1.64-2.22, 64x 1.88-2.08 vs 2.47-2.61; 32 x 4096 -> 11008 2.64 vs 4.21-4.45;
#: 32 x 1024 -> 1024 0.077-0.079 vs 0.101-0.104, 64x 0.140-0.142 vs 0.152-0.157; 64 x 384 ->
#: 1536 0.090-0.092 vs 0.102-0.106; 96 x 4096 -> 4096 3.37 vs 2.99; 4096 x 384 -> 1536 4.96-5.16
#: vs 3.90-4.17 (``docs/kernels.md``).
VNNI_S8_MAX_M = 64


#: See :data:`VNNI_S8_MAX_M`.
VNNI_S8_MAX_MACS = 1 << 24


#: On AMD CPUs (Zen 4) the ``avx512_vnni`` path's C GEMM runs up to this many rows: oneDNN's
#: ``_int_mm`` trails it much further there than on Intel cores. AMD EPYC Zen 4, 2 threads,
#: whole dynamic layer, C GEMM (two-panel tiles) vs ``_int_mm``, ms: 128 x 384 -> 1536 0.23 vs
#: 0.28, 256x 0.58 vs 0.70, 512x 0.87 vs 0.86, 4096x 7.2 vs 6.6; 256 x 1536 -> 384 0.44 vs
#: 0.48, 1024x 1.76 vs 1.70; 256 x 1024 -> 1024 0.82 vs 1.04 (before those tiles), 512x 1.54
#: vs 1.74, 1024x 3.02 vs 3.03; 256 x 4096 -> 4096 10.8 vs 14.4, 512x 21.4 vs 23.5, 1024x 41.5
#: vs 43.8; 256 x 4096 -> 11008 29.8 vs 35.2, 512x 60.4 vs 61.3 (``docs/kernels.md``).
VNNI_S8_MAX_M_AMD = 512


def _check_features(fn: str, **sizes: int) -> None:
    """Refuse weight sizes (``n``: output features, ``k``: input features) that are not
    non-negative ints, naming ``fn`` and the values."""
    if not all(isinstance(v, int) and v >= 0 for v in sizes.values()):
        got = ", ".join(f"{name}={v!r}" for name, v in sizes.items())
        raise ValueError(f"{fn}: weight sizes (n: output features, k: input features) must be "
                         f"non-negative ints; got {got}")


def vnni_c_gemm_rows(n: int, k: int) -> int:
    """The most rows for which the ``avx512_vnni`` path runs its C GEMM (``"s8_avx512_vnni"``)
    on an ``[n, k]`` weight (:data:`VNNI_S8_MAX_M` rows, :data:`VNNI_S8_MAX_M_AMD` on AMD
    CPUs, or :data:`VNNI_S8_MAX_MACS` multiply-adds, whichever allows more); ``_int_mm`` runs
    above. Unknown sizes (0): no limit.

    Raises:
        ValueError: ``n`` or ``k`` is not a non-negative int.

    Example:
        >>> vnni_c_gemm_rows(48, 67)  # 67 -> 48: VNNI_S8_MAX_MACS // (48 * 67) rows
        5216
    """
    _check_features("vnni_c_gemm_rows", n=n, k=k)
    if n * k == 0:
        return sys.maxsize
    rows = VNNI_S8_MAX_M_AMD if cpu_vendor() == "AuthenticAMD" else VNNI_S8_MAX_M
    return max(rows, VNNI_S8_MAX_MACS // (n * k))


@functools.lru_cache(maxsize=1)
def _cpuinfo() -> str | None:
    """``/proc/cpuinfo`` (read once; None where there is none, e.g. off Linux)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            return fh.read()
    except OSError:
        return None


@functools.lru_cache(maxsize=1)
def cpu_vendor() -> str:
    """The CPU's ``vendor_id`` from ``/proc/cpuinfo`` (``"AuthenticAMD"``, ``"GenuineIntel"``;
    ``""`` where there is none, e.g. off Linux or on ARM). Cached.

    Example:
        >>> isinstance(cpu_vendor(), str)
        True
    """
    found = re.search(r"^vendor_id\s*:\s*(\S+)", _cpuinfo() or "", re.MULTILINE)
    return found.group(1) if found else ""


def amx_tiles(k: int) -> bool:
    """Whether the ``amx`` path's C GEMM (``"s8_amx"``) runs an input size ``k`` on AMX tiles,
    so it beats ``_int_mm`` at every M: at least one whole tile of 16 four-code steps
    (``ceil(k / 4) >= 16``; the last ``ceil(k / 4) % 16`` steps run vpdpbusd). Smaller K run
    its vpdpbusd tiles, with the ``avx512_vnni`` path's row limit (:func:`vnni_c_gemm_rows`).

    Raises:
        ValueError: ``k`` is not a non-negative int.

    Example:
        >>> amx_tiles(4096), amx_tiles(784), amx_tiles(27)
        (True, True, False)
    """
    _check_features("amx_tiles", k=k)
    return -(-k // 4) >= 16


#: With int8 activations, ``"u4q8_<isa>"`` runs up to this many rows on CPUs with AMX (bf16
#: tiles), and dequantize + bf16 GEMM above (its cost per weight is spread over enough rows). Xeon
#: with AMX, 2 threads, g128, ratio to fp32, u4q8 / dequantize + bf16: 384 -> 1536 M = 1024 1.08 /
#: 0.97, M = 2048 1.24 / 1.69, M = 4096 1.12 / 2.25; 1024 -> 1024 M = 1024 1.25 / 1.00, M = 2048
#: 1.27 / 1.77; 4096 -> 4096 M = 1024 1.38 / 0.68; 1536 -> 384 M = 2048 1.18 / 1.49. Without AMX
#: the panels win at every M, AVX512-BF16 or not: AMD EPYC Zen 4, u4q8_avx512_vnni / dequantize
#: + bf16 / bf16 ``F.linear`` alone: 384 -> 1536 M = 2048 2.24 / 1.73 / 2.07, M = 4096 2.30 /
#: 1.78 / 2.10; 1024 -> 1024 M = 1024 2.39 / 1.73 / 2.18, M = 2048 2.28 / 1.45 / 2.11; 1536 ->
#: 384 M = 2048 2.20 / 1.73 / 2.18; 4096 -> 4096 M = 1024 2.86 / 2.05 / 2.29.
U4Q8_MAX_M_BF16 = 1024


#: Group sizes whose INT4 x INT8 layers the ``amx`` path runs on AMX tiles (from 6 rows; the
#: vpdpbusd panels below): faster than dequantize + bf16 GEMM at every M measured, so those
#: layers keep ``"u4q8_amx"`` above :data:`U4Q8_MAX_M_BF16` too. Xeon with AMX, 2 threads, g128,
#: AMX / vpdpbusd panels / FP32, ms: 32 x 4096 -> 4096 1.0 / 2.6 / 8.1-8.4; 32 x 4096 -> 11008
#: 2.3-2.6 / 7.0-7.4 / 27; 1024 x 1024 -> 1024 2.1-2.4 / 5.4 / 7.8-8.2; 2048 x 1024 -> 1024
#: 4.5-4.7 / 11.2-11.5 / 15.5-15.8 (dequantize + bf16: 1.77x FP32); 4096 x 384 -> 1536 7.7-8.0
#: / 15-16 / 18.1-18.2 (dequantize + bf16: 2.25x FP32); 4096 x 1536 -> 384 6.2-6.6 / 14.5-14.7 /
#: 17.6-17.7; 1024 x 4096 -> 4096 30 / 82-86 / 131-137.
AMX_U4_GROUP_SIZES = (64, 128, 192, 256)


#: ``torch._int_mm`` on CUDA takes more than this many rows (and K, N multiples of 8).
CUDA_INT_MM_MIN_ROWS = 16


#: With the C kernels, an INT8 conv (groups 1, width stride 1, K up to CONV_CODES_EXACT_K) of
#: up to this many multiply-adds runs ``"fp32_codes_conv"`` on the direct C conv rather than
#: im2col + ``_int_mm`` (16 -> 32 channels 3x3 on 14x14: batch 1 25 vs 29 us, batch 8 76 vs
#: 60 us; 3 -> 16 on 32x32: batch 1 21 vs 34 us).
CODES_DIRECT_MAX_MACS = 1 << 21


#: ``"fp32_codes_conv"`` is exact for any zero-points up to this K: |q - zp| and |w - w_zp| are
#: at most 255 and 258 * 255 * 255 < 2^24. Without VNNI (and for ``groups > 1``) it is used up
#: to here.
CONV_CODES_EXACT_K = 258


#: Up to this many rows an INT4 layer with float32 activations (``Int4Linear.int8_activations =
#: False``) runs lowbit's INT4 kernel of the ISA path (``"u4_avx2"``: codes unpacked in
#: registers, FMA with the activations; with int8 activations ``"u4q8_avx2"`` runs at every M). It
#: decodes the weight once per 4 rows, so it beats dequantize + fp32 GEMM up to M ~ 64 (AVX2
#: machine, 2 threads, g128, u4 vs dequantize + fp32, ms: 1024 -> 1024 M = 32 1.04 vs 2.21,
#: M = 64 2.16 vs 2.91, M = 128 4.06 vs 3.91; 4096 -> 4096 M = 64 27 vs 71, M = 128 55 vs 102).
U4_NATIVE_MAX_M = 64


#: /proc/cpuinfo flags of an x86 CPU that multiplies u8 x s8 into int32 without int16 pair sums
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})
#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) that still include VNNI / AVX512-BF16.
_VNNI_ISAS = ("VNNI", "BF16", "FP16", "AVX10", "AMX", "ALL", "DEFAULT")


_BF16_ISAS = ("BF16", "FP16", "AVX10", "AMX", "ALL", "DEFAULT")


_AMX_ISAS = ("AMX", "ALL", "DEFAULT")


#: ``vendor_id`` s whose AVX512-BF16 runs bf16 GEMMs faster than float32 without AMX (AMD Zen 4
#: and later: ``vdpbf16ps`` does 32 multiply-adds where an FMA does 16). Intel's runs them no
#: faster: a Xeon with oneDNN capped to ``AVX512_CORE_BF16`` (no AMX), 2 threads, ms, FP32 /
#: bf16 ``F.linear`` 4096 x 384 -> 1536 16.4 / 20.9; INT4 g128 layers, FP32 / dequantize + bf16
#: GEMM / INT4 x INT8 panels: 2048 x 384 -> 1536 5.9 / 13.3 / 4.0, 4096 x 384 -> 1536 12.0 /
#: 25.1 / 8.8, 4096 x 1536 -> 384 11.8 / 24.5 / 8.1, 2048 x 1024 -> 1024 10.3 / 22.7 / 6.6.
FAST_BF16_VENDORS = frozenset({"AuthenticAMD"})


_HAS_INT_MM = hasattr(torch, "_int_mm")


_HAS_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


_HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """CPU features that decide the kernels: ``{"vnni", "bf16", "amx"}`` subsets (cached).

    Read from ``/proc/cpuinfo`` flags (``avx512_vnni`` / ``avx_vnni`` / ``amx_int8`` -> vnni;
    ``amx_tile`` + ``amx_int8`` -> amx); elsewhere torch's CPU capability ``AVX512`` is taken
    to mean vnni and bf16. bf16 means bf16 GEMMs faster than float32 ones, which the kernels
    choose by (dequantize + bf16 GEMM, PyTorch's packed bf16 ops): ``amx_bf16``, or
    ``avx512_bf16`` on AMD (Zen 4 and later run it twice as fast as float32). An Intel CPU with
    ``avx512_bf16`` and no AMX (Cooper Lake; a Sapphire Rapids whose AMX the hypervisor does not
    expose) runs bf16 GEMMs no faster than float32 (:data:`FAST_BF16_VENDORS`). An ISA cap in
    ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) that excludes them removes them too: oneDNN
    then runs without them (e.g. ``AVX2`` emulates an AVX2-only CPU, where ``_int_mm`` is not
    exact; ``AVX512_CORE_BF16`` a VNNI CPU without AMX: a Zen 4 on an AMD CPU, and without fast
    bf16 on an Intel one, as above).

    Example:
        >>> cpu_features() <= {"vnni", "bf16", "amx"}
        True
    """
    info = _cpuinfo()
    if info is None:
        cap = torch.backends.cpu.get_cpu_capability()
        return frozenset({"vnni", "bf16"} if "AVX512" in cap else set())
    flags = set(info.split())
    feats = set()
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
           or "ALL").upper()
    if flags & VNNI_FLAGS and any(t in isa for t in _VNNI_ISAS):
        feats.add("vnni")
    if ("amx_bf16" in flags and any(t in isa for t in _AMX_ISAS)) or (
            "avx512_bf16" in flags and cpu_vendor() in FAST_BF16_VENDORS
            and any(t in isa for t in _BF16_ISAS)):
        feats.add("bf16")
    if {"amx_tile", "amx_int8"} <= flags and any(t in isa for t in _AMX_ISAS):
        feats.add("amx")
    return frozenset(feats)


#: The kernels of each ISA path (:func:`lowbit.native.selected_isa`): its exact INT8 x INT8 GEMM
#: and its INT4 kernel for float32 activations at small M (None: PyTorch's ops instead; the
#: ``torch`` path's GEMM is ``_int_mm`` where VNNI makes it exact, else an fp32 GEMM over the
#: codes).
ISA_KERNELS: dict[str, tuple[str | None, str | None]] = {
    # the same built with AMX: tdpbusd tiles where K >= 61 (amx_tiles), at every M
    "amx": ("s8_amx", "u4_amx"),
    # csrc/lowbit_gemm_avx2.c built with VNNI (vpdpbusd); oneDNN's _int_mm at many rows
    "avx512_vnni": ("s8_avx512_vnni", "u4_avx512_vnni"),
    "avx2": ("s8_avx2", "u4_avx2"),  # csrc/lowbit_gemm_avx2.c
    "portable": ("s8_portable", "u4_portable"),  # csrc/lowbit_gemm_portable.c
    "torch": (None, None),
}


def select_kernel(op: str, m: int, *, backend: str = "auto", n: int = 0, k: int = 0,
                  group_size: int | None = None, groups: int = 1, packable: bool = True,
                  unit_stride: bool = False, device: str = "cpu",
                  int8_activations: bool = False) -> str:
    """The kernel for one call, a deterministic function of the op and the shape.

    Args:
        op: ``"int8_linear"``, ``"int8_conv2d"``, ``"int8_weight_only"`` or ``"int4_weight_only"``.
        m: rows of the activation matrix (tokens; batch x output pixels for conv).
        backend: ``"auto"`` (the selected ISA path), ``"reference"`` (always the pure-PyTorch
            path) or ``"torch"`` (the ``torch`` ISA path: PyTorch's ops only, no C kernels).
        n: output features; k: input features (padded K for INT4; for conv the reduction
            size ``C/groups * kh * kw``, 0 = unknown: no ``"fp32_codes_conv"``).
        group_size: INT4 group size (``None`` = not a packable INT4 layout).
        groups: conv groups.
        packable: for ``"int8_weight_only"``: the weight is symmetric per-channel (the packed
            op's only layout).
        unit_stride: for ``"int8_conv2d"`` with ``n`` (output channels) given: the width stride
            is 1, so with the C kernels a conv of at most :data:`CODES_DIRECT_MAX_MACS`
            multiply-adds (``m*n*k``) runs ``"fp32_codes_conv"`` on the direct C conv.
        int8_activations: for ``"int4_weight_only"``: the layer may quantize its activations to
            int8 per row and group (``Int4Linear.int8_activations``): on the C ISA paths
            ``"u4q8_<isa>"`` then runs at every M (it is faster than FP32 at every M measured),
            up to :data:`U4Q8_MAX_M_BF16` rows on CPUs with AMX (at every M on the ``amx``
            path for :data:`AMX_U4_GROUP_SIZES`).
        device: the tensors' device type. Off the CPU (CUDA): ``"int_mm_s8s8"`` where
            ``torch._int_mm`` takes the shape there (M > 16, K and N multiples of 8), else
            ``"reference"`` (float64 over the codes: exact); weight-only layers dequantize and
            run a float GEMM (``"reference"``). The CPU-only packed ops and C kernels are never
            picked there.

    Returns:
        One of ``"int_mm_s8s8"``, ``"s8_<isa>"``, ``"u4q8_<isa>"``, ``"u4_<isa>"`` (``<isa>``:
        ``avx512_vnni``, ``avx2`` or ``portable``), ``"fp32_codes"``, ``"fp32_codes_conv"``,
        ``"int8pack_bf16"``, ``"int4pack_bf16"``, ``"dequant_bf16"``, ``"dequant_fp32"``,
        ``"reference"``.

    Raises:
        ValueError: on an unknown op or backend.

    Example:
        >>> select_kernel("int8_linear", 512) == int8_gemm()  # this CPU's exact INT8 GEMM
        True
        >>> select_kernel("int8_conv2d", 64, k=9)  # 1 -> 16 channels, 3x3
        'fp32_codes_conv'
        >>> select_kernel("int4_weight_only", 1, n=64, k=256, group_size=32)  # per ISA path
        '...4...'
        >>> select_kernel("int4_weight_only", 2048, n=64, k=256, group_size=32)  # doctest: +SKIP
        'dequant_bf16'
    """
    if backend not in ("auto", "reference", "torch"):
        raise ValueError(f"backend={backend!r} is unknown; use 'auto', 'reference' or 'torch'")
    if backend == "reference":
        return "reference"
    if device != "cpu":
        if (op in ("int8_linear", "int8_conv2d") and groups == 1 and _HAS_INT_MM
                and m > CUDA_INT_MM_MIN_ROWS
                and k > 0 and k % 8 == 0 and n > 0 and n % 8 == 0):
            return "int_mm_s8s8"
        if op not in ("int8_linear", "int8_conv2d", "int8_weight_only", "int4_weight_only"):
            raise ValueError(f"select_kernel: unknown op {op!r}")
        return "reference"
    feats = cpu_features()
    torch_ops = backend == "torch"
    native = not torch_ops and load_native() is not None
    gemm = int8_gemm("torch" if torch_ops else None)
    if (op == "int8_conv2d" and unit_stride and groups == 1 and 0 < k <= CONV_CODES_EXACT_K
            and 0 < m * n * k <= CODES_DIRECT_MAX_MACS and native
            and torch._C._get_mkldnn_enabled()):  # (F.conv2d when the C path steps aside)
        return "fp32_codes_conv"  # the direct C conv over the codes: exact, and no GEMM setup
    # with mkldnn off, F.conv2d may pick NNPACK (Winograd/FFT: not exact on integers)
    max_k = CONV_CODES_MAX_K_NATIVE if native else CONV_CODES_MAX_K
    if (op == "int8_conv2d" and 0 < k <= CONV_CODES_EXACT_K and torch._C._get_mkldnn_enabled()
            and (groups != 1 or k <= max_k or gemm == "fp32_codes")):
        return "fp32_codes_conv"
    if op in ("int8_linear", "int8_conv2d"):
        if op == "int8_conv2d" and groups != 1:
            return "reference"
        if (gemm in ("s8_avx512_vnni", "s8_amx") and m > vnni_c_gemm_rows(n, k)
                and not (gemm == "s8_amx" and amx_tiles(k))):
            return "int_mm_s8s8"  # oneDNN's blocked kernels (AMX where the CPU has it)
        return gemm
    # dequantize once per call, then a float GEMM: bf16 where the CPU has it, else float32
    dequant = "dequant_bf16" if "bf16" in feats else "dequant_fp32"
    if op == "int8_weight_only":
        # K % 16 != 0 segfaults inside aten._weight_int8pack_mm (torch 2.13 CPU; K % 16 == 8
        # only from M = 2 on)
        fast = _HAS_INT8PACK and packable and k % 16 == 0 and m <= WEIGHT_ONLY_PACKED_MAX_M
        return "int8pack_bf16" if fast else dequant
    if op == "int4_weight_only":
        u4 = None if torch_ops else ISA_KERNELS[selected_isa()][1]
        u4 = u4 if u4 is not None and load_gemm(u4[3:]) is not None else None
        fits = (u4 is not None and group_size is not None and group_size % 32 == 0
                and k % 32 == 0 and k % group_size == 0)
        amx4 = u4 == "u4_amx" and group_size in AMX_U4_GROUP_SIZES  # (AMX tiles from 6 rows)
        if fits and int8_activations and (m <= U4Q8_MAX_M_BF16 or "amx" not in feats or amx4):
            return "u4q8_" + u4[3:]  # type: ignore[index]  # INT4 x INT8 panels
        if fits and m <= U4_NATIVE_MAX_M:
            return u4  # type: ignore[return-value]  # lowbit's INT4 kernel, float32 activations
        packable = (_HAS_INT4 and group_size in INT4_GROUP_SIZES and n % 16 == 0
                    and k % group_size == 0)  # type: ignore[operator]
        max_m = INT4_PACKED_MAX_M if "bf16" in feats else INT4_PACKED_MAX_M_NO_BF16
        return "int4pack_bf16" if packable and m <= max_m else dequant
    raise ValueError(f"select_kernel: unknown op {op!r}")


def int8_gemm(isa: str | None = None) -> str:
    """The exact INT8 x INT8 GEMM of an ISA path (default: :func:`lowbit.native.selected_isa`)
    at few rows.

    ``"s8_amx"`` / ``"s8_avx512_vnni"`` / ``"s8_avx2"`` / ``"s8_portable"`` (lowbit's C kernels),
    ``"int_mm_s8s8"`` (oneDNN with VNNI: the ``torch`` path there, and the ``avx512_vnni`` one
    without its C library or above :data:`VNNI_S8_MAX_M` rows), or ``"fp32_codes"`` (an fp32
    GEMM over the codes: the ``torch`` path without VNNI, where oneDNN's int8 GEMM saturates
    int16 pair sums and is not exact).

    Example:
        >>> int8_gemm() in ("s8_amx", "s8_avx512_vnni", "s8_avx2", "s8_portable", "int_mm_s8s8",
        ...                 "fp32_codes")
        True
    """
    gemm = ISA_KERNELS[isa or selected_isa()][0]
    if gemm is not None and load_gemm(gemm[3:]) is not None:
        return gemm
    return "int_mm_s8s8" if _HAS_INT_MM and "vnni" in cpu_features() else "fp32_codes"
