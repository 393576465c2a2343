"""Integer kernels: the only place lowbit calls torch's integer ops, with a reference path.

Every kernel here has two implementations selected by a ``kernel`` name:

* a fast one built on torch's CPU integer ops, and
* ``"reference"``: pure PyTorch, the obvious formula in float64 (exact for integer codes), which
  gives the same result up to float rounding (for the INT8 x INT8 kernels: bit for bit, because
  the integer accumulator is exact in both and the float epilogue is shared).

INT8 x INT8 linear (dynamic or static activations)::

    q      = clamp(round(x * (1/s_x)) + zp_x, qmin, qmax)                # int8 codes
    acc    = q @ w.T - zp_x * colsum(w)               # int32, == (q_x - zp_x) @ w.T exactly
    y      = acc * s_x * s_w[n] + bias

Symmetric activations (``zp_x = 0``: the dynamic default, and static symmetric specs) go into
``torch._int_mm`` as int8 codes with no compensation pass at all; only a non-zero zero-point
costs the ``zp_x * colsum`` pass.

Kernel choice (:func:`select_kernel`) depends on the CPU (:func:`cpu_features`, read at run
time) and on M. Measured with ``benchmarks/bench_kernels.py`` (2 threads, median of 9 rounds,
ratio = time / fp32 ``F.linear`` in the same run; lower is faster) on two 2-core AMD EPYC kinds,
both heavily shared (load average 4-7 on 2 cores while measuring), so single cells can be off
by 2-3x; the 1-thread side-by-side checks below are steadier.

=================================  ========  ========  ===========  ===========  ========
AVX2-only machine (M x K x N)      1x4096^2  8x4096^2  32x384x1536  256x1024x4k  1024^3
=================================  ========  ========  ===========  ===========  ========
bf16 F.linear                      0.59      1.22      3.19         6.67         4.35
``_int_mm`` u8s8 (int32 out)       1.87      4.29      9.34         22.1         14.2
QuantizedLinear dynamic (wrapper)  1.98      4.28      9.66         22.3         23.3
onednn qlinear u8 (**inexact**)    0.86      0.50      0.71         0.48         0.53
``_weight_int8pack_mm`` bf16 act   0.29      0.33      0.73         1.58         1.88
``_weight_int4pack_mm`` bf16 g128  0.44      0.32      0.71         1.60         1.56
``_weight_int4pack_mm`` fp32 act   5.77      13.2      -            -            -
int4 dequant + bf16 GEMM           56.9      19.9      6.34         7.63         10.6
=================================  ========  ========  ===========  ===========  ========

=================================  ========  ========  ===========  ===========  ========
AVX-512 VNNI + BF16 (Zen 4)        1x4096^2  8x4096^2  32x384x1536  256x1024x4k  1024^3
=================================  ========  ========  ===========  ===========  ========
bf16 F.linear                      2.90*     0.46      0.32         0.26         0.29
``_int_mm`` u8s8 (int32 out)       3.58*     0.48      0.21         0.79*        0.24
``_int_mm`` s8s8 (int32 out)       3.78*     0.50      0.12         0.27         0.06*
QuantizedLinear dynamic (wrapper)  7.68*     1.42*     0.38         0.06         0.26
onednn qlinear u8, prepacked       3.79*     0.49      0.34         0.05         0.06
``_weight_int8pack_mm`` bf16 act   3.83*     0.48      0.42         0.52         0.65
``_weight_int4pack_mm`` bf16 g128  2.85*     0.48      0.32         0.51         0.63
``_weight_int4pack_mm`` fp32 act   13.6*     12.1      -            -            -
int4 dequant + bf16 GEMM           151*      18.4      3.81         1.23         0.44
=================================  ========  ========  ===========  ===========  ========

(* = a cell visibly hit by the shared host's load; KERNELS.md has ``_int_mm`` u8s8 at 0.05-0.2
on every shape of this CPU kind.) 1-thread side-by-side on the VNNI machine (min of 10, ms),
``_int_mm`` u8s8 / s8s8 / prepacked ``onednn::qlinear_pointwise``: 1x1024x1024 0.011 / - /
0.029; 32x1024x1024 0.091 / 0.100 / 0.089; 640x384x1536 0.78 / 0.75 / 0.79; 4096x384x384
1.26 / 1.21 / 1.26; 4096x1536x384 4.93 / 4.94 / 4.80. Whole ``QuantizedLinear`` dynamic vs bf16
``F.linear`` (1 thread, ratio to fp32): 1x784x1024 0.86 / 1.45; 32x1024x1024 0.22 / 0.38;
4096x384x1536 0.14 / 0.21; 4096x1536x384 0.21 / 0.24; 640x384x1536 0.17 / 0.29.
Weight-only, 2048x1024 weight, 1 thread, ms (packed / dequant + bf16): INT4 M=64 2.0 / 37,
M=256 16 / 40, M=512 60 / 100, M=1024 104 / 98; INT8 M=64 1.8 / 10, M=128 11.5 / 10.9,
M=256 23 / 12. A side-by-side check on the AVX2 machine at 4096^2 gave ``_int_mm`` / exact
fp32-on-codes: M=1 5.0 / 16, M=4 1.8 / 4.8, M=16 5.1 / 5.4, M=64 18 / 5.3.

Decisions drawn from those numbers:

* INT8 x INT8 with VNNI: ``torch._int_mm`` on int8 activation codes (``"int_mm_s8s8"``) at
  every M. s8 x s8 was within 5-10% of u8 x s8 in the GEMM alone (oneDNN shifts internally)
  and drops the wrapper's sign-flip pass and the ``[M, N]`` shift-compensation pass: whole
  layer 1 thread, old u8s8 wrapper / s8s8 (ms): MLP 784-1024-1024-10 batch 1 0.137 / 0.115,
  batch 32 0.52 / 0.46; ``TransformerEncoderBlock`` (1, 128, 384) 2.10 / 1.72, (32, 128, 384)
  91 / 80 (fp32 5.4 and 167).
  Without VNNI: ``"fp32_codes"`` at every M (fp32 GEMM over the integer codes in K chunks of
  512, exact because every partial sum is an integer below 2^24). ``_int_mm`` is **not exact**
  there, u8 x s8 or s8 x s8: with ``ONEDNN_MAX_CPU_ISA=AVX2`` on the VNNI machine a 1x1024x256
  dynamic layer was off by 15% of its output range (int16 pair-sum saturation, as for
  ``qlinear`` below), so an earlier ``_int_mm`` for ``M <= 16`` there was dropped. Neither beats
  fp32 on AVX2-only CPUs: there use weight-only INT8/INT4. :func:`cpu_features` honours that
  ISA cap, so the AVX2 selection can be tested on a VNNI machine.
* ``onednn::qlinear_pointwise`` / ``qconv2d_pointwise``: on AVX2-only CPUs **not exact** (u8 x s8
  pair sums saturate at int16, as ``vpmaddubsw`` does without VNNI: errors of 10^5 on a 10^6
  accumulator with full-range weights). On the VNNI CPU the accumulation is exact (u8 255 x s8
  -128, K=1300 and random codes: identical to int64), but it is not faster than ``_int_mm``
  side by side (equal at M >= 32, 2.6x slower at M=1), takes one activation scale/zero-point per
  tensor (lowbit's default is per token) and symmetric weights only, and fuses a float epilogue
  that the reference path could not reproduce bit for bit. Not used.
* The wrapper decides the speed: per-token quantization is ``x * (1/s)``, ``round_``, then
  float -> int8 (2x faster than -> uint8); ``max|x|`` is ``abs().amax()`` below 2^17 elements
  and ``max(amax, -amin)`` above (no ``|x|`` temporary: 1.3-1.5x faster at 4096x384 and
  4096x1536; ``vector_norm(inf)`` / ``aminmax`` are ~10x slower); the epilogue runs in place in
  the int32
  accumulator's memory (3 passes, no new ``[M, N]`` buffer: 10x faster at 4096x1536, where the
  page faults of a fresh 25 MB buffer cost more than the arithmetic).
* Weight-only INT8: ``_weight_int8pack_mm`` on bf16 activations for
  ``M <= WEIGHT_ONLY_PACKED_MAX_M`` (64); INT4: ``_weight_int4pack_mm_for_cpu`` for
  ``M <= INT4_PACKED_MAX_M`` (512: dequantizing INT4 is expensive, crossover ~1024); above,
  dequantize + bf16 GEMM on CPUs with AVX512-BF16, else dequantize + fp32 GEMM. fp32
  activations are never fed to the packed ops (3-50x slower): cast to bf16 and back.
* ``_weight_int8pack_mm`` needs ``K % 16 == 0``: other K crash the process in torch 2.13
  (K = 24, 40, 72, 136 segfault from M = 2 on, K % 8 != 0 at any M). ``Int8WeightOnlyLinear``
  adds zero weight columns up to a multiple of 16 in its packed cache and pads the input.
* INT4 packed op constraints: ``N % 16 == 0``, group size in {32, 64, 128, 256}, ``K % group ==
  0``. ``Int4Linear`` pads the packed rows to a multiple of 16 and slices the output (a 1024->10
  head at M=1: 4 us instead of ~70 us for dequantize + bf16 GEMM); other shapes use the
  dequantize path.
* ``aten._dyn_quant_matmul_4bit`` (KleidiAI) has its fast path on Arm only; on this x86 build
  ``_dyn_quant_pack_4bit_weight`` refused plain inputs ("Expected bias length to match output
  dimension" even with an ``[N]`` bias), so it is not used.
* Conv2d INT8: the input is quantized once, then a channels-last im2col on the int8 codes (one
  strided copy; ``F.unfold`` on floats was 85x the conv time at batch 64) + the same INT8 GEMM
  for ``groups == 1``; ``groups > 1`` with K > 258 uses the reference path (reported in
  ``meta``).
* Conv2d with a small reduction size K = C/groups * kh * kw: ``"fp32_codes_conv"``, an fp32
  ``F.conv2d`` (NCHW in and out) on the centered codes ``q - zp`` with the float32 weight
  ``w - w_zp`` (a non-persistent module cache), then the shared epilogue in place with
  ``[O, 1, 1]`` broadcasts (per element the same ops as the ``[M, N]`` one, so the same bits;
  it skips im2col and the two NHWC <-> NCHW copies). Exact for any zero-points up to
  ``CONV_CODES_EXACT_K = 258`` (258 * 255 * 255 < 2^24); not used when mkldnn is disabled
  (``F.conv2d`` could then pick NNPACK's Winograd/FFT). Kernel-level, dynamic per-tensor
  codes, ratio to fp32 ``F.conv2d`` (VNNI machine, 2 threads, 3x3 pad 1, batch 1 / 64),
  im2col + ``_int_mm`` vs ``fp32_codes_conv``: 1->16 on 28x28 (K = 9) 4.3 / 5.5 vs 2.2 / 2.6;
  16->32 on 14x14 (K = 144) 1.5 / 1.1 vs 1.5 / 1.4; 32->32 on 16x16 (K = 288) 0.83 / 0.79 vs
  1.3 / 1.2. Whole ``QuantizedConv2d`` (batch 1 / 8 / 64), ``_int_mm`` vs ``fp32_codes_conv``:
  K = 36 3.8 / 3.1 / 4.6 vs 2.7 / 2.1 / 2.5; K = 72 2.1 / 2.3 / 3.1 vs 2.1 / 1.9 / 2.1;
  K = 108 2.5 / 1.6 / 1.8 vs 2.3 / 1.8 / 1.7; K = 144 1.3 / 1.5 / 1.8 vs 1.7 / 1.6 / 1.8.
  So on VNNI CPUs up to ``CONV_CODES_MAX_K = 128``; without VNNI (where the alternative is
  im2col + ``"fp32_codes"``: 1.4-3.2x fp32 vs 1.2-1.8x for ``fp32_codes_conv`` at K = 144-252,
  ``ONEDNN_MAX_CPU_ISA=AVX2``) and for ``groups > 1`` (instead of the float64 reference) up to
  258. MNIST CNN end to end (``quantize_dynamic`` / ``quantize_static``, batch 1, fp32 0.10 ms):
  0.192 / 0.202 ms before, 0.176 / 0.182 ms after; at batch 64 (fp32 ~5 ms) the change is within
  the noise of the max-pool and allocator costs that dominate there.
* Affine weights (``w_zp != 0``): one int32 row sum of the activation codes and a rank-1
  update ``acc -= rowsum(q) (x) w_zp`` on top of the symmetric kernel.
* Fused C kernels (:mod:`lowbit.native`; every function above with ``native=True`` uses them
  when available, with the same bits): the quantizer (one pass, float32 or bf16 in), the
  epilogue (one pass, float32 in place or bf16 out), the conv's quantize-into-padded-NHWC,
  im2col and NCHW epilogue, a whole small linear layer (``SMALL_LINEAR_MACS``) in one call,
  and weight dequantization. Measured (2 threads, PyTorch ops -> C): per-token quantize
  4096x384 0.30 -> 0.10 ms; linear epilogue 4096x1536 with bias 0.93 -> 0.45 ms; whole
  ``QuantizedLinear`` 1x128 -> 10 21 -> 10 us, 1x1568 -> 128 23.5 -> 15 us; INT4 conv weight
  (32x144) dequantization 33 -> 8 us; MNIST CNN end to end at batch 1 (fp32 ~0.105 ms)
  0.19 -> 0.12 ms; encoder block (32x128x384) 46 -> 34 ms with glibc's default allocator,
  28 -> 23 ms with a tuned one. Large layers run :data:`BLOCK_ROWS` rows at a time, keeping
  the codes in a small reused buffer.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from lowbit.memory import empty as pooled_empty
from lowbit.native import addcmul_fma, load_gemm, load_native, selected_isa, threads_for

__all__ = [
    "CONV_CODES_EXACT_K",
    "CONV_CODES_MAX_K",
    "CONV_CODES_MAX_K_NATIVE",
    "INT4_GROUP_SIZES",
    "INT4_PACKED_MAX_M",
    "WEIGHT_ONLY_PACKED_MAX_M",
    "cpu_features",
    "dequantize_weight_native",
    "fused_int8_linear",
    "fused_linear_layout",
    "int4_pack_for_cpu",
    "int8_conv2d",
    "int8_gemm",
    "int8_linear",
    "maxpool2d_native",
    "quantize_activation",
    "quantize_activation_u8",
    "run_u4_linear",
    "s8_packed",
    "select_kernel",
    "u4_pack",
    "weight_only_linear",
    "weight_only_linear_native",
]

#: Largest number of rows M for which ``_weight_int8pack_mm`` beats dequantize + bf16 GEMM.
WEIGHT_ONLY_PACKED_MAX_M = 64
#: The same for ``_weight_int4pack_mm_for_cpu``: dequantizing INT4 costs more, so the packed op
#: wins up to larger M (measured crossover ~1024 on the VNNI machine).
INT4_PACKED_MAX_M = 512
#: Group sizes ``aten._weight_int4pack_mm_for_cpu`` accepts.
INT4_GROUP_SIZES = (32, 64, 128, 256)

#: fp32 GEMM over integer codes is exact while every partial sum stays below 2^24: centered
#: activation codes reach 255 (affine zero-point), weight codes 128, and 512 * 255 * 128 < 2^24.
_CODES_CHUNK_K = 512
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
#: From this many elements on, ``max|x|`` is taken as ``max(amax, -amin)`` (see ``_absmax``).
_MINMAX_NUMEL = 1 << 17
#: oneDNN ISA caps (``ONEDNN_MAX_CPU_ISA``) that still include VNNI / AVX512-BF16.
_VNNI_ISAS = ("VNNI", "BF16", "FP16", "AVX10", "AMX", "ALL", "DEFAULT")
_BF16_ISAS = ("BF16", "FP16", "AVX10", "AMX", "ALL", "DEFAULT")

_F32_EPS = torch.finfo(torch.float32).eps
#: Up to this many multiply-adds (M*N*K) :func:`fused_int8_linear` runs the whole layer in one
#: C call (its own int8 dot products) instead of quantize + ``_int_mm`` + epilogue: e.g. 6.5 vs
#: 10.7 us for 1x128 -> 10, 9.7 vs 12.0 us for 1x1568 -> 128; from ~1M on ``_int_mm`` wins.
SMALL_LINEAR_MACS = 1 << 18
#: ... and up to this many activation codes (bytes of C stack scratch; thread stacks can be
#: as small as 128 KiB).
SMALL_LINEAR_CODES = 1 << 14
#: Up to this many multiply-adds (M*N*Kp) a float32 weight-only linear runs in one C call
#: (:func:`weight_only_linear_native`, straight from the codes, in float32) instead of the
#: packed bf16 ops: INT4 g32 1 x 128 -> 10 7.1 vs 12.6 us, 1 x 512 -> 64 11 vs 13 us; from
#: ~100k on the packed ops win (1 x 1568 -> 128: 28 vs 16 us).
WO_SMALL_MACS = 1 << 15
#: Up to this many rows an INT4 layer with float32 activations runs lowbit's INT4 kernel of
#: the ISA path (``"u4_avx2"``: codes unpacked in registers, FMA with the activations).
U4_NATIVE_MAX_M = 16
#: :func:`fused_int8_linear` runs layers of at least twice this many rows block by block.
BLOCK_ROWS = 512
#: The GEMMs :func:`fused_int8_linear` runs.
FUSED_GEMMS = ("int_mm_s8s8", "fp32_codes", "s8_avx2", "s8_portable")
#: Activation dtypes the fused C kernels read (and, for the linear epilogue, write).
NATIVE_DTYPES = (torch.float32, torch.bfloat16)
_HAS_INT_MM = hasattr(torch, "_int_mm")
_HAS_INT4 = hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
_HAS_INT8PACK = hasattr(torch.ops.aten, "_weight_int8pack_mm")


@functools.lru_cache(maxsize=1)
def cpu_features() -> frozenset[str]:
    """CPU features that decide the kernels: ``{"vnni", "bf16"}`` subsets (cached).

    Read from ``/proc/cpuinfo`` flags (``avx512_vnni`` / ``avx_vnni`` / ``amx_int8`` -> vnni;
    ``avx512_bf16`` / ``amx_bf16`` -> bf16); elsewhere torch's CPU capability ``AVX512`` is
    taken to mean both. An ISA cap in ``ONEDNN_MAX_CPU_ISA`` (or ``DNNL_MAX_CPU_ISA``) that
    excludes them removes them too: oneDNN then runs without them (e.g. ``AVX2`` emulates an
    AVX2-only CPU, where ``_int_mm`` is not exact).

    Example:
        >>> cpu_features() <= {"vnni", "bf16"}
        True
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = set(fh.read().split())
    except OSError:
        cap = torch.backends.cpu.get_cpu_capability()
        return frozenset({"vnni", "bf16"} if "AVX512" in cap else set())
    feats = set()
    isa = (os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
           or "ALL").upper()
    if flags & {"avx512_vnni", "avx_vnni", "amx_int8"} and any(t in isa for t in _VNNI_ISAS):
        feats.add("vnni")
    if flags & {"avx512_bf16", "amx_bf16"} and any(t in isa for t in _BF16_ISAS):
        feats.add("bf16")
    return frozenset(feats)


def select_kernel(op: str, m: int, *, backend: str = "auto", n: int = 0, k: int = 0,
                  group_size: int | None = None, groups: int = 1, packable: bool = True,
                  unit_stride: bool = False, device: str = "cpu") -> str:
    """The kernel for one call, a deterministic function of the op and the shape.

    Args:
        op: ``"int8_linear"``, ``"int8_conv2d"``, ``"int8_weight_only"`` or ``"int4_weight_only"``.
        m: rows of the activation matrix (tokens; batch x output pixels for conv).
        backend: ``"auto"`` or ``"reference"`` (always the pure-PyTorch path).
        n: output features; k: input features (padded K for INT4; for conv the reduction
            size ``C/groups * kh * kw``, 0 = unknown: no ``"fp32_codes_conv"``).
        group_size: INT4 group size (``None`` = not a packable INT4 layout).
        groups: conv groups.
        packable: for ``"int8_weight_only"``: the weight is symmetric per-channel (the packed
            op's only layout).
        unit_stride: for ``"int8_conv2d"`` with ``n`` (output channels) given: the width stride
            is 1, so with the C kernels a conv of at most :data:`CODES_DIRECT_MAX_MACS`
            multiply-adds (``m*n*k``) runs ``"fp32_codes_conv"`` on the direct C conv.
        device: the tensors' device type. Off the CPU (CUDA): ``"int_mm_s8s8"`` where
            ``torch._int_mm`` takes the shape there (M > 16, K and N multiples of 8), else
            ``"reference"`` (float64 over the codes: exact); weight-only layers dequantize and
            run a float GEMM (``"reference"``). The CPU-only packed ops and C kernels are never
            picked there.

    Returns:
        One of ``"int_mm_s8s8"``, ``"s8_avx2"``, ``"s8_portable"``, ``"fp32_codes"``,
        ``"fp32_codes_conv"``, ``"u4_avx2"``, ``"u4_portable"``, ``"int8pack_bf16"``,
        ``"int4pack_bf16"``, ``"dequant_bf16"``, ``"reference"``.

    Raises:
        ValueError: on an unknown op or backend.

    Example:
        >>> select_kernel("int8_linear", 512) == int8_gemm()  # this CPU's exact INT8 GEMM
        True
        >>> select_kernel("int8_conv2d", 64, k=9)  # 1 -> 16 channels, 3x3
        'fp32_codes_conv'
        >>> select_kernel("int4_weight_only", 100, n=64, k=256, group_size=32)
        'int4pack_bf16'
        >>> select_kernel("int4_weight_only", 2048, n=64, k=256, group_size=32)  # doctest: +SKIP
        'dequant_bf16'
    """
    if backend not in ("auto", "reference"):
        raise ValueError(f"backend={backend!r} is unknown; use 'auto' or 'reference'")
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
    gemm = int8_gemm()
    if (op == "int8_conv2d" and unit_stride and groups == 1 and 0 < k <= CONV_CODES_EXACT_K
            and 0 < m * n * k <= CODES_DIRECT_MAX_MACS and load_native() is not None
            and torch._C._get_mkldnn_enabled()):  # (F.conv2d when the C path steps aside)
        return "fp32_codes_conv"  # the direct C conv over the codes: exact, and no GEMM setup
    # with mkldnn off, F.conv2d may pick NNPACK (Winograd/FFT: not exact on integers)
    max_k = CONV_CODES_MAX_K if load_native() is None else CONV_CODES_MAX_K_NATIVE
    if (op == "int8_conv2d" and 0 < k <= CONV_CODES_EXACT_K and torch._C._get_mkldnn_enabled()
            and (groups != 1 or k <= max_k or gemm == "fp32_codes")):
        return "fp32_codes_conv"
    if op in ("int8_linear", "int8_conv2d"):
        if op == "int8_conv2d" and groups != 1:
            return "reference"
        return gemm
    dequant = "dequant_bf16" if "bf16" in feats else "reference"
    if op == "int8_weight_only":
        # K % 16 != 0 segfaults inside aten._weight_int8pack_mm (torch 2.13 CPU; K % 16 == 8
        # only from M = 2 on)
        fast = _HAS_INT8PACK and packable and k % 16 == 0 and m <= WEIGHT_ONLY_PACKED_MAX_M
        return "int8pack_bf16" if fast else dequant
    if op == "int4_weight_only":
        if (gemm.startswith("s8_") and m <= U4_NATIVE_MAX_M and group_size is not None
                and group_size % 32 == 0 and k % 32 == 0 and k % group_size == 0):
            return "u4_" + gemm[3:]  # lowbit's INT4 kernel of this ISA (float32 activations)
        packable = (_HAS_INT4 and group_size in INT4_GROUP_SIZES and n % 16 == 0
                    and k % group_size == 0)  # type: ignore[operator]
        return "int4pack_bf16" if packable and m <= INT4_PACKED_MAX_M else dequant
    raise ValueError(f"select_kernel: unknown op {op!r}")


def int8_gemm() -> str:
    """The exact INT8 x INT8 GEMM of the selected ISA path (:func:`lowbit.native.selected_isa`).

    ``"int_mm_s8s8"`` (oneDNN with VNNI), ``"s8_avx2"`` / ``"s8_portable"`` (lowbit's C
    kernels), or ``"fp32_codes"`` (an fp32 GEMM over the codes: the ``torch`` path without
    VNNI, where oneDNN's int8 GEMM saturates int16 pair sums and is not exact).

    Example:
        >>> int8_gemm() in ("int_mm_s8s8", "s8_avx2", "s8_portable", "fp32_codes")
        True
    """
    isa = selected_isa()
    if isa in ("avx2", "portable"):
        return "s8_" + isa
    if isa == "avx512_vnni" or (_HAS_INT_MM and "vnni" in cpu_features()):
        return "int_mm_s8s8"
    return "fp32_codes"


def _extent(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage from its first element on: what a C kernel may read there."""
    return t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()


def s8_packed(w2d: torch.Tensor, lib: Any) -> torch.Tensor | None:
    """The int8 ``[N, K]`` weight in the C GEMM's panel layout (``lowbit_gemm.h``), cached on
    the tensor and rebuilt when it changes in place; None when a code is -128 (the sign trick
    needs [-127, 127]: symmetric weights never have it) so the caller uses another GEMM.

    Example:
        >>> w = torch.randint(-127, 128, (20, 9), dtype=torch.int8)
        >>> lib = load_gemm("portable")
        >>> lib is None or s8_packed(w, lib).numel() == 2 * 3 * 64  # ceil(20/16) x ceil(9/4)
        True
    """
    # inference tensors have no version counter (nor can they change outside inference mode)
    key = (-1 if w2d.is_inference() else w2d._version, w2d.data_ptr(), tuple(w2d.shape))
    cached = w2d.__dict__.get("_lowbit_s8")
    if cached is not None and cached[0] == key:
        return cached[1]
    if w2d.dim() != 2 or w2d.dtype != torch.int8 or w2d.device.type != "cpu":
        raise ValueError(f"s8_packed: needs an int8 CPU [N, K] weight; got {w2d.dtype} "
                         f"{tuple(w2d.shape)} on {w2d.device}")
    w = w2d.contiguous()
    n, k = w.shape
    nbytes = lib.lbk_s8_packed_bytes(n, k)
    out = torch.empty(max(nbytes, 0), dtype=torch.int8)
    rc = lib.lbk_s8_pack(w.data_ptr(), n, k, k, out.data_ptr(), nbytes) if nbytes > 0 else -1
    if rc not in (0, -2):
        raise ValueError(f"s8_packed: the C packer refused a {n}x{k} weight (code {rc})")
    packed = out if rc == 0 else None
    w2d.__dict__["_lowbit_s8"] = (key, packed)
    return packed


def _s8_call(lib: Any, x: torch.Tensor, kind: int, scale: torch.Tensor | None, per_row: bool,
             dynamic: bool, zp: torch.Tensor | None, qmin: int, qmax: int,
             packed: torch.Tensor, n: int, comp: torch.Tensor | None,
             w_scale: torch.Tensor | None, bias: torch.Tensor | None, relu: bool,
             y: torch.Tensor, y_kind: int) -> None:
    """One ``lbk_s8_linear`` call: the C side bounds-checks ``x`` and ``y`` against their
    extents; the per-row / per-column operands are checked here (dtype, size, layout)."""
    m, k = x.shape
    for name, t, dt, size in (("scale", scale, torch.float32, m if per_row else 1),
                              ("zero_point", zp, torch.int32, m if per_row else 1),
                              ("comp", comp, torch.int32, n),
                              ("w_scale", w_scale, torch.float32, n),
                              ("bias", bias, torch.float32, n)):
        if t is not None and (t.dtype != dt or t.numel() != size or not t.is_contiguous()):
            raise ValueError(f"lowbit INT8 GEMM: {name} must be a contiguous {dt} tensor of "
                             f"{size} values; got {t.dtype} {tuple(t.shape)}")
    if packed.dtype != torch.int8 or not packed.is_contiguous():
        raise ValueError("lowbit INT8 GEMM: the packed weight must come from s8_packed")
    rc = lib.lbk_s8_linear(
        x.data_ptr(), kind, m, k, x.stride(0), _extent(x),
        None if scale is None else scale.data_ptr(), int(per_row), int(dynamic),
        None if zp is None else zp.data_ptr(), qmin, qmax, packed.data_ptr(), packed.numel(), n,
        None if comp is None else comp.data_ptr(),
        None if w_scale is None else w_scale.data_ptr(),
        None if bias is None else bias.data_ptr(), int(relu), int(addcmul_fma()),
        y.data_ptr(), y_kind, _extent(y), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"lowbit INT8 GEMM ({lib.lbk_isa().decode()}) refused its arguments "
                           f"(code {rc}): x {tuple(x.shape)} stride {x.stride()}, N={n}")


def _s8_acc(lib: Any, q: torch.Tensor, packed: torch.Tensor, n: int,
            pooled: bool) -> torch.Tensor:
    """int32 ``q @ w.T`` ``[M, N]`` of int8 codes ``q [M, K]`` on the packed weight."""
    if q.stride(-1) != 1:
        q = q.contiguous()
    m = q.shape[0]
    acc = (pooled_empty((m, n), torch.int32) if pooled
           else torch.empty((m, n), dtype=torch.int32))
    _s8_call(lib, q, 2, None, False, False, None, -128, 127, packed, n, None, None, None, False,
             acc, 2)
    return acc


def native_lib_for(*tensors: torch.Tensor) -> Any:
    """The fused C kernel library when it can run on these tensors (plain CPU tensors, eager
    mode), else None (the pure-PyTorch path).

    Example:
        >>> lib = native_lib_for(torch.zeros(2))
        >>> lib is None or hasattr(lib, "lb_epilogue")
        True
    """
    lib = load_native()
    if lib is None or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    for t in tensors:
        if type(t) is not torch.Tensor or not t.is_cpu:
            return None
    return lib


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
                       q.data_ptr(), threads_for(m * k))
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


def _int8_acc(q: torch.Tensor, zp: torch.Tensor | None, w2d: torch.Tensor, colsum: torch.Tensor,
              comp: torch.Tensor | None, kernel: str, w_zp: torch.Tensor | None = None,
              pooled: bool = False) -> torch.Tensor:
    """Exact int32 ``(q - zp) @ (w2d - w_zp).T`` ``[M, N]`` by the chosen kernel.

    ``q`` are int8 codes (uint8 codes work too, e.g. from :func:`quantize_activation_u8`);
    ``zp=None`` means 0. ``colsum[n] = sum_k (w2d[n, k] - w_zp[n])``; the zero-point costs
    ``zp * colsum`` (or the precomputed ``comp``), a weight zero-point ``w_zp[n] * rowsum_m(q)``.
    """
    packed = None
    if kernel.startswith("s8_"):
        lib = load_gemm(kernel[3:])
        if lib is not None and q.dtype == torch.int8:
            packed = s8_packed(w2d, lib)
        if packed is None:  # a -128 weight code, or uint8 codes: the exact fp32 GEMM instead
            kernel = "fp32_codes"
    if kernel == "reference":
        centered = q.double() if zp is None else q.double() - zp.double()  # (M, K) q - zp
        wc = w2d.double() if w_zp is None else w2d.double() - w_zp.double()[:, None]  # (N, K)
        return (centered @ wc.t()).to(torch.int32)  # exact for K < 2^37
    if kernel == "fp32_codes":  # exact: every partial sum is an integer below 2^24
        centered32 = q.float() if zp is None else q.float().sub_(zp.float())  # |q - zp| <= 255
        wf = w2d.float()  # (N, K), |w| <= 128
        acc = None
        for s in range(0, w2d.shape[1], _CODES_CHUNK_K):
            part = (centered32[:, s:s + _CODES_CHUNK_K] @ wf[:, s:s + _CODES_CHUNK_K].t())
            acc = part.to(torch.int32) if acc is None else acc.add_(part.to(torch.int32))
        assert acc is not None
        if w_zp is not None:  # - w_zp[n] * sum_k (q - zp)[m, k]
            rows = q.sum(1, dtype=torch.int32)
            if zp is not None:
                rows = rows - w2d.shape[1] * zp.reshape(-1)
            acc.addr_(rows.expand(acc.shape[0]), w_zp, alpha=-1)
        return acc
    # (M, N) int32; B = transpose of contiguous (N, K); pooled: in lowbit.memory's reused blocks
    if packed is not None:
        acc = _s8_acc(lib, q, packed, w2d.shape[0], pooled)
    elif not pooled:
        acc = torch._int_mm(q, w2d.t())
    else:
        acc = torch._int_mm(q, w2d.t(), out=pooled_empty((q.shape[0], w2d.shape[0]),
                                                          torch.int32))
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


def _conv_out_hw(x: torch.Tensor, ksize: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int]) -> tuple[int, int]:
    """Output height and width of a conv of ``x`` ``[B, C, H, W]`` (zero padding)."""
    h, w = x.shape[2], x.shape[3]
    return ((h + 2 * padding[0] - dilation[0] * (ksize[0] - 1) - 1) // stride[0] + 1,
            (w + 2 * padding[1] - dilation[1] * (ksize[1] - 1) - 1) // stride[1] + 1)


def int8_conv2d(x: torch.Tensor, x_scale: torch.Tensor, x_zp: torch.Tensor | None, qmin: int,
                qmax: int, w: torch.Tensor, w_scale: torch.Tensor, colsum: torch.Tensor,
                bias: torch.Tensor | None, stride: tuple[int, int], padding: tuple[int, int],
                dilation: tuple[int, int], groups: int, *, relu: bool = False,
                kernel: str | None = None, w_zp: torch.Tensor | None = None,
                w_float: torch.Tensor | None = None, w_cols: torch.Tensor | None = None
                ) -> torch.Tensor:
    """INT8 Conv2d on per-tensor activation qparams: fp32 conv on codes, im2col + INT8 GEMM, or
    reference.

    Zero padding is exact: 0.0 quantizes to the zero-point, which the compensation removes.
    ``"fp32_codes_conv"`` (small K) runs ``F.conv2d`` in float32 on the centered codes, exact
    while ``K * 255 * 255 < 2^24`` (:data:`CONV_CODES_EXACT_K`), any ``groups``.

    Args:
        x: float input ``[B, C, H, W]``; x_scale / x_zp: per-tensor qparams (float32 / int32;
            ``x_zp=None`` means 0 and skips the zero-point compensation); ``x_scale=None``:
            dynamic symmetric, ``max|x| / qmax`` (clamped to float32 eps), zero-point 0.
        qmin, qmax: activation code range.
        w: int8 weight ``[O, C/groups, kh, kw]``; w_scale float32 ``[O]``;
        colsum: int32 ``[O]``, the sum of ``w - w_zp`` over all but the first dim.
        bias, stride, padding, dilation, groups: as in ``F.conv2d``; relu: fused ReLU.
        kernel: ``"int_mm_s8s8"`` / ``"fp32_codes"`` (groups must be 1), ``"fp32_codes_conv"``
            (K at most :data:`CONV_CODES_EXACT_K`) or ``"reference"``; None: chosen by
            :func:`select_kernel`.
        w_zp: int32 weight zero-points ``[O]``, or None for symmetric weights.
        w_float: for ``"fp32_codes_conv"``: the float32 ``w - w_zp`` (a module's cache); None
            computes it.
        w_cols: for the GEMM kernels: ``w.permute(0, 2, 3, 1).reshape(O, -1)`` (a module's
            cache); None computes it.

    Returns:
        float32 ``[B, O, Ho, Wo]``.

    Example:
        >>> w = torch.randint(-127, 128, (4, 3, 3, 3), dtype=torch.int8)
        >>> x = torch.randn(2, 3, 5, 5)
        >>> args = (x, torch.tensor(0.02), torch.tensor(3), -128, 127, w, torch.ones(4),
        ...         w.int().sum((1, 2, 3)), None, (1, 1), (1, 1), (1, 1), 1)
        >>> torch.equal(int8_conv2d(*args), int8_conv2d(*args, kernel="reference"))
        True
    """
    bsz = x.shape[0]
    o, _, kh, kw = w.shape
    ho, wo = _conv_out_hw(x, (kh, kw), stride, padding, dilation)
    if kernel is None:
        kernel = select_kernel("int8_conv2d", bsz * ho * wo, groups=groups, k=w[0].numel(),
                               n=o, device=x.device.type)
    native = kernel != "reference"
    if kernel == "fp32_codes_conv":
        return _conv_codes_fp32(x, x_scale, x_zp, qmin, qmax, w, w_scale, bias, stride, padding,
                                dilation, groups, relu, w_zp, w_float)
    if w_cols is None:
        w_cols = w.permute(0, 2, 3, 1).reshape(o, -1)  # (O, kh*kw*C), the order of the columns
    if (native and groups == 1 and w_zp is None and x.dtype == torch.float32
            and x.is_contiguous() and (lib := native_lib_for(x)) is not None):
        return _conv_gemm_native(lib, x, x_scale, x_zp, qmin, qmax, w_cols, (kh, kw), w_scale,
                                 colsum, bias, stride, padding, dilation, (ho, wo), relu, kernel)
    q, x_scale, zp = quantize_activation(x, qmin, qmax, x_scale, x_zp, per_token=False,
                                         native=native)  # (B, C, H, W) int8 codes
    if kernel == "reference":
        centered = q.double() if zp is None else q.double() - zp.double()  # zero pad = exact
        wc = w.double() if w_zp is None else w.double() - w_zp.double().reshape(-1, 1, 1, 1)
        acc = F.conv2d(centered, wc, None, stride, padding, dilation, groups)
        acc = acc.to(torch.int32).permute(0, 2, 3, 1).reshape(-1, o)  # (B*Ho*Wo, O)
    else:  # quantize the input once, then im2col on int8 codes (4x fewer bytes than float)
        pad = 0 if zp is None else int(zp)
        cols = _im2col_codes(q, pad, (kh, kw), stride, padding, dilation, (ho, wo))
        acc = _int8_acc(cols, zp, w_cols, colsum, None, kernel, w_zp)  # (B*Ho*Wo, O) int32
    y = _int8_epilogue(acc, x_scale, w_scale, bias, relu, native)  # (B*L, O)
    return y.reshape(bsz, ho, wo, o).permute(0, 3, 1, 2)  # (B, O, Ho, Wo), channels-last memory


def c_layout(*pairs: tuple[torch.Tensor | None, torch.dtype]) -> bool:
    """Every given ``(tensor, dtype)`` pair is None or a contiguous tensor of that dtype (the
    layout the C kernels read; modules check their buffers once with it).

    Example:
        >>> c_layout((torch.zeros(2), torch.float32), (None, torch.int32))
        True
    """
    return all(t is None or (t.dtype == dt and t.is_contiguous()) for t, dt in pairs)


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
        >>> w = torch.tensor([[1, -2], [3, 4]], dtype=torch.int8)
        >>> x = torch.tensor([[1.0, 0.5]])
        >>> y = fused_int8_linear(x, -128, 127, w, torch.ones(2), w.int().sum(1), None)
        >>> q, s, z = quantize_activation(x, -128, 127, native=False)
        >>> ref = int8_linear(q, s, z, w, torch.ones(2), w.int().sum(1), kernel="reference")
        >>> y is None or torch.equal(y, ref)
        True
    """
    _check_linear_shapes("fused_int8_linear", x, w, w_scale, colsum, bias, comp)
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


def run_fused_linear(lib: Any, x: torch.Tensor, qmin: int, qmax: int, w: torch.Tensor,
                  w_scale: torch.Tensor, colsum: torch.Tensor, bias: torch.Tensor | None,
                  per_token: bool, scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                  comp: torch.Tensor | None, relu: bool, kernel: str) -> torch.Tensor:
    """:func:`fused_int8_linear` once everything is checked (a module checks its own tensors
    once with :func:`fused_linear_layout`, then only ``x`` and ``lib`` per call).

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
    if m * n * k <= SMALL_LINEAR_MACS and m * k <= SMALL_LINEAR_CODES:  # one call
        dynamic = scale is None  # (its codes and dynamic scales live on the C stack)
        out = torch.empty((m, n), dtype=x.dtype)
        lib.lb_linear_s8_small(x.data_ptr(), bf16, m, k, x.stride(0),
                               None if dynamic else scale.data_ptr(),  # type: ignore[union-attr]
                               int(dynamic and per_token), int(dynamic),
                               None if zero_point is None else zero_point.data_ptr(), qmin, qmax,
                               w.data_ptr(), n, None if comp is None else comp.data_ptr(),
                               w_scale.data_ptr(), None if bias is None else bias.data_ptr(),
                               int(relu), out.data_ptr(), bf16, threads_for(m * n * k))
        return out
    if kernel.startswith("s8_"):
        packed = (lib8 := load_gemm(kernel[3:])) and s8_packed(w, lib8)
        if packed is not None:  # quantize, GEMM and epilogue in one call of this ISA's C
            out = (pooled_empty((m, n), x.dtype) if m * n * x.element_size() >= 1 << 20
                   else torch.empty((m, n), dtype=x.dtype))
            dynamic = scale is None
            s = torch.empty((m, 1) if per_token else ()) if dynamic else scale
            _s8_call(lib8, x, int(bf16), s, dynamic and per_token, dynamic, zero_point, qmin,
                     qmax, packed, n, comp, w_scale, bias, relu, out, int(bf16))
            return out
        kernel = "fp32_codes"  # a -128 weight code: the exact fp32 GEMM over the codes
    if kernel == "int_mm_s8s8" and m >= 2 * BLOCK_ROWS:
        return _fused_linear_blocks(lib, x, qmin, qmax, w, w_scale, bias, per_token, scale,
                                    zero_point, comp, relu)
    zp = None
    q = torch.empty((m, k), dtype=torch.int8)
    if scale is None:
        s = torch.empty((m, 1) if per_token else ())
        lib.lb_quantize_s8(x.data_ptr(), bf16, m, k, x.stride(0), s.data_ptr(), int(per_token), 1,
                           None, qmin, qmax, q.data_ptr(), threads_for(m * k))
    else:
        s, zp = scale, zero_point
        lib.lb_quantize_s8(x.data_ptr(), bf16, m, k, x.stride(0), s.data_ptr(), 0, 0,
                           None if zp is None else zp.data_ptr(), qmin, qmax, q.data_ptr(),
                           threads_for(m * k))
    acc = _int8_acc(q, zp, w, colsum, comp, kernel, pooled=True)  # (M, N) int32
    out = pooled_empty((m, n), torch.bfloat16) if bf16 else None
    lib.lb_epilogue(acc.data_ptr(), 1, m, n, 1, s.data_ptr(), int(s.numel() != 1),
                    w_scale.data_ptr(), None if bias is None else bias.data_ptr(), int(relu),
                    None if out is None else out.data_ptr(), threads_for(m * n))
    return acc.view(torch.float32) if out is None else out


def _fused_linear_blocks(lib: Any, x: torch.Tensor, qmin: int, qmax: int, w: torch.Tensor,
                         w_scale: torch.Tensor, bias: torch.Tensor | None, per_token: bool,
                         scale: torch.Tensor | None, zero_point: torch.Tensor | None,
                         comp: torch.Tensor | None, relu: bool) -> torch.Tensor:
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
                           int(per_row), zp_ptr, qmin, qmax, qb.data_ptr(), n_threads)
        acc = accb[:b] if accb is not None else out[r0:r0 + b].view(torch.int32)
        torch._int_mm(qb[:b], wt, out=acc)
        if comp is not None:
            acc.sub_(comp)
        lib.lb_epilogue(acc.data_ptr(), 1, b, n, 1, s_blk, int(s.numel() != 1),
                        w_scale.data_ptr(), None if bias is None else bias.data_ptr(), int(relu),
                        out_ptr + r0 * n * 2 if bf16 else None, n_threads)
    return out


def conv2d_fused(lib: Any, x: torch.Tensor, kernel: str, x_scale: torch.Tensor | None,
                 x_zp: torch.Tensor | None, zp_int: int, qmin: int, qmax: int,
                 weight: torch.Tensor, w_scale: torch.Tensor, colsum: torch.Tensor,
                 bias: torch.Tensor | None, ksize: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int], dilation: tuple[int, int], relu: bool,
                 pool: int = 0) -> torch.Tensor:
    """A module's INT8 conv on the C kernels with everything checked beforehand (the layer's
    tensors by ``_refresh_cache``, ``x`` float32, contiguous, CPU, 4-D): the same kernels and
    bits as :func:`int8_conv2d`, without its per-call preparation (a batch-1 conv is ~8-25 us).

    Args:
        lib: from :func:`native_lib_for`. kernel: ``"fp32_codes_conv"`` (``weight`` = the
            float32 centered weight codes) or ``"int_mm_s8s8"`` / ``"fp32_codes"`` (``weight``
            = the int8 ``[O, kh*kw*C]`` im2col matrix).
        x_scale, x_zp: static qparams (0-dim float32 / int32), or None / None for dynamic
            symmetric; zp_int: ``x_zp`` as an int (0 when None).
        w_scale, colsum, bias: float32 ``[O]``, int32 ``[O]``, float32 ``[O]`` or None.
        ksize, stride, padding, dilation, relu: the conv's geometry and fused ReLU.
        pool: a fused ``MaxPool2d(pool)`` (kernel = stride, no padding) on the output; 0: none.

    Returns:
        float32 ``[B, O, Ho, Wo]`` (pooled: ``[B, O, Ho // pool, Wo // pool]``), contiguous.

    Example:
        >>> w = torch.randint(-127, 128, (4, 2, 3, 3), dtype=torch.int8)
        >>> x = torch.randn(1, 2, 5, 5)
        >>> args = (None, None, 0, -128, 127)
        >>> lib = native_lib_for(x)
        >>> y = lib and conv2d_fused(lib, x, "fp32_codes_conv", *args, w.float(), torch.ones(4),
        ...                          w.sum((1, 2, 3), dtype=torch.int32), None, (3, 3), (1, 1),
        ...                          (1, 1), (1, 1), False)
        >>> ref = int8_conv2d(x, None, None, -128, 127, w, torch.ones(4),
        ...                   w.sum((1, 2, 3), dtype=torch.int32), None, (1, 1), (1, 1), (1, 1),
        ...                   1, kernel="reference")
        >>> y is None or torch.equal(y, ref)
        True
    """
    if kernel == "fp32_codes_conv":
        y = _conv_codes_native(lib, x, x_scale, zp_int, qmin, qmax, weight, w_scale, bias,
                               stride, padding, dilation, 1, relu)
    else:
        y = _conv_gemm_native(lib, x, x_scale, x_zp, qmin, qmax, weight, ksize, w_scale,
                              colsum, bias, stride, padding, dilation,
                              _conv_out_hw(x, ksize, stride, padding, dilation), relu, kernel,
                              zp_int=zp_int)
    return y if not pool else maxpool2d_native(lib, y, pool)


def maxpool2d_native(lib: Any, y: torch.Tensor, k: int) -> torch.Tensor:
    """``F.max_pool2d(y, k)`` (kernel = stride = k, no padding, floor) of a contiguous float32
    NCHW ``y`` by one C call; the same values (a max picks, it does not round).

    Example:
        >>> y = torch.arange(16.0).reshape(1, 1, 4, 4)
        >>> lib = native_lib_for(y)
        >>> out = lib and maxpool2d_native(lib, y, 2)
        >>> out is None or torch.equal(out, F.max_pool2d(y, 2))
        True
    """
    if y.dim() != 4 or y.dtype != torch.float32 or not y.is_contiguous() or k < 1:
        raise ValueError(f"maxpool2d_native: needs a contiguous float32 NCHW tensor and k >= 1; "
                         f"got {tuple(y.shape)} {y.dtype} (contiguous={y.is_contiguous()}), "
                         f"k={k}; use F.max_pool2d otherwise")
    b, c, h, w = y.shape
    out = torch.empty((b, c, h // k, w // k))
    lib.lb_maxpool2d(y.data_ptr(), b * c, h, w, k, out.data_ptr(), threads_for(y.numel()))
    return out


def _conv_gemm_native(lib: Any, x: torch.Tensor, x_scale: torch.Tensor | None,
                      x_zp: torch.Tensor | None, qmin: int, qmax: int, w_cols: torch.Tensor,
                      ksize: tuple[int, int], w_scale: torch.Tensor, colsum: torch.Tensor,
                      bias: torch.Tensor | None, stride: tuple[int, int],
                      padding: tuple[int, int], dilation: tuple[int, int],
                      out_hw: tuple[int, int], relu: bool, kernel: str,
                      zp_int: int | None = None) -> torch.Tensor:
    """The im2col + INT8 GEMM conv with its three memory passes in C: quantize into a
    zero-point-padded NHWC int8 buffer, gather the patches, and the epilogue written straight
    to NCHW. The same codes, accumulator and epilogue as the PyTorch path, so the same bits."""
    bsz, c, h, wd = x.shape
    (kh, kw), (ph, pw), (ho, wo) = ksize, padding, out_hw
    o = w_cols.shape[0]
    dynamic = x_scale is None
    cell = ctypes.c_float() if dynamic else None  # the dynamic scale, written by C
    if x_scale is not None and not c_layout((x_scale, torch.float32)):
        x_scale = x_scale.float().contiguous()
    s_ptr = ctypes.addressof(cell) if cell is not None else x_scale.data_ptr()  # type: ignore[union-attr]
    zp = (0 if x_zp is None else int(x_zp)) if zp_int is None else zp_int
    qpad = torch.empty((bsz, h + 2 * ph, wd + 2 * pw, c), dtype=torch.int8)
    lib.lb_quantize_nhwc_padded_s8(x.data_ptr(), bsz, c, h, wd, ph, pw, s_ptr, int(dynamic),
                                   zp, qmin, qmax, qpad.data_ptr(), threads_for(x.numel()))
    if (kh, kw) == (1, 1) and stride == (1, 1) and (ph, pw) == (0, 0):
        cols = qpad.view(-1, c)  # (B*H*W, C)
    else:
        cols = torch.empty((bsz * ho * wo, kh * kw * c), dtype=torch.int8)
        lib.lb_im2col_nhwc_s8(qpad.data_ptr(), bsz, c, h + 2 * ph, wd + 2 * pw, kh, kw,
                              stride[0], stride[1], dilation[0], dilation[1], ho, wo,
                              cols.data_ptr(), threads_for(cols.numel()))
    zpt = None if x_zp is None else x_zp.to(torch.int32)
    acc = _int8_acc(cols, zpt, w_cols, colsum, None, kernel, pooled=True)  # (B*Ho*Wo, O) int32
    y = pooled_empty((bsz, o, ho, wo))
    if not c_layout((w_scale, torch.float32)) or w_scale.numel() != o:  # modules: already so
        w_scale = w_scale.float().expand(o).contiguous()
    b = bias if bias is None or c_layout((bias, torch.float32)) else bias.float().contiguous()
    lib.lb_epilogue_to_nchw(acc.data_ptr(), bsz, ho * wo, o, s_ptr, w_scale.data_ptr(),
                            None if b is None else b.data_ptr(), int(relu), y.data_ptr(),
                            threads_for(acc.numel()))
    return y


def _conv_codes_fp32(x: torch.Tensor, x_scale: torch.Tensor | None, x_zp: torch.Tensor | None,
                     qmin: int, qmax: int, w: torch.Tensor, w_scale: torch.Tensor,
                     bias: torch.Tensor | None, stride: tuple[int, int],
                     padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                     relu: bool, w_zp: torch.Tensor | None, w_float: torch.Tensor | None
                     ) -> torch.Tensor:
    """``"fp32_codes_conv"``: fp32 ``F.conv2d`` over centered codes, NCHW in and out.

    The centered codes ``q - zp = clamp(round(x * (1/s)), qmin - zp, qmax - zp)`` are the same
    integers as :func:`quantize_activation`'s, kept in float32 (no int8 round trip); zero
    padding is an exact 0.0. With ``K * 255 * 255 < 2^24`` every partial sum of the conv is an
    exactly represented integer, so the result equals the int32 accumulator in any summation
    order. The epilogue runs in place in NCHW with ``[O, 1, 1]`` broadcasts: the same per-element
    ops as :func:`_int8_epilogue` (hence the same bits), without the two ``[B*L, O]`` <-> NCHW
    copies of the GEMM paths.
    """
    o = w.shape[0]
    xf = x if x.dtype == torch.float32 else x.float()
    zp = 0 if x_zp is None else int(x_zp)
    if w_float is None:
        w_float = w.float() if w_zp is None else w.float().sub_(w_zp.float().reshape(-1, 1, 1, 1))
    lib = (native_lib_for(xf) if xf.is_contiguous() and w_scale.numel() == o
           and c_layout((w_scale, torch.float32), (bias, torch.float32)) else None)
    if lib is not None:
        if x_scale is not None and not c_layout((x_scale, torch.float32)):
            x_scale = x_scale.float().contiguous()
        return _conv_codes_native(lib, xf, x_scale, zp, qmin, qmax, w_float, w_scale, bias,
                                  stride, padding, dilation, groups, relu)
    if x_scale is None:  # max|x| / qmax, zero-point 0: as choose_qparams
        x_scale = _absmax(xf, False).div_(qmax).clamp_(min=_F32_EPS)
    t = xf * x_scale.float().reciprocal()  # as quantize_activation
    t.round_()
    t.clamp_(qmin - zp, qmax - zp)  # == clamp(round + zp, qmin, qmax) - zp, |.| <= 255
    y = F.conv2d(t, w_float, None, stride, padding, dilation, groups).contiguous()
    return _float_epilogue(y, x_scale, w_scale.reshape(o, 1, 1),
                           None if bias is None else bias.reshape(o, 1, 1), relu)


#: Convolutions of up to this many multiply-adds (and groups 1, width stride 1) run as the
#: direct C conv (:func:`conv2d_direct_native`) instead of ``F.conv2d`` (oneDNN): 16 -> 32
#: channels 3x3 on 14x14 at batch 1 14.5 vs 21.8 us, batch 8 62 vs 77 us (2 threads).
DIRECT_CONV_MAX_MACS = 1 << 23
#: ... on all threads from this many multiply-adds (MNIST conv1 at batch 1, 113k: 1 thread).
DIRECT_CONV_PARALLEL_MACS = 1 << 18


def direct_conv_fits(x: torch.Tensor, weight_numel: int, stride: Sequence[int],
                     groups: int) -> bool:
    """Whether the direct C conv (:func:`conv2d_direct_native`, the weight-only conv) takes a
    conv of ``x`` with a weight of ``weight_numel`` values: float32 contiguous 4-D ``x``,
    groups 1, width stride 1, at most :data:`DIRECT_CONV_MAX_MACS` multiply-adds.

    Example:
        >>> direct_conv_fits(torch.zeros(1, 16, 14, 14), 32 * 16 * 9, (1, 1), 1)
        True
    """
    if (groups != 1 or stride[1] != 1 or x.dim() != 4 or x.dtype != torch.float32
            or not x.is_contiguous()):
        return False
    b, _, h, w = x.shape
    return b * h * w * weight_numel <= DIRECT_CONV_MAX_MACS


def _direct_conv_result(err: int, caller: str) -> None:
    if err == -1:
        raise MemoryError(f"{caller}: no memory for the padded input / weight rows")
    if err:
        raise ValueError(f"{caller}: the width stride must be 1 (see direct_conv_fits)")


def run_wo_conv2d_native(lib: Any, x: torch.Tensor, c_args: tuple, out_channels: int,
                         ksize: Sequence[int], bias: torch.Tensor | None, stride: Sequence[int],
                         padding: Sequence[int], dilation: Sequence[int],
                         relu: bool) -> torch.Tensor:
    """A weight-only conv in one C call: the weight dequantized from its codes (``c_args`` as
    a weight-only module builds them for :func:`run_dequantize_weight_native`) straight into
    the direct conv (:func:`conv2d_direct_native`), with bias and ReLU. ``x`` and the conv
    must pass :func:`direct_conv_fits`.

    Example:
        >>> codes = torch.ones(2, 4, dtype=torch.int8)  # 2 output channels, 1 x 2 x 2 kernel
        >>> args = (codes, 0, 1, 2, 4, 4, 4, torch.tensor([0.5, 1.0]),
        ...         torch.zeros(2, dtype=torch.int32))
        >>> x = torch.ones(1, 1, 3, 3)
        >>> lib = native_lib_for(x)
        >>> y = lib and run_wo_conv2d_native(lib, x, args, 2, (2, 2), None, (1, 1), (0, 0),
        ...                                  (1, 1), False)
        >>> y is None or y[0, :, 0, 0].tolist() == [2.0, 4.0]
        True
    """
    w, packed, signed, _n, kp, _k, group, scale, zp = c_args
    b, c, h, wd = x.shape
    ho, wo = _conv_out_hw(x, ksize, stride, padding, dilation)
    y = pooled_empty((b, out_channels, max(ho, 0), max(wo, 0)))
    macs = b * max(ho, 0) * max(wo, 0) * out_channels * c * ksize[0] * ksize[1]
    _direct_conv_result(lib.lb_wo_conv2d_small(
        x.data_ptr(), b, c, h, wd, w.data_ptr(), packed, signed, kp, group, scale.data_ptr(),
        zp.data_ptr(), out_channels, ksize[0], ksize[1], stride[0], stride[1], padding[0],
        padding[1], dilation[0], dilation[1], None if bias is None else bias.data_ptr(),
        int(relu), y.data_ptr(), _direct_conv_threads(macs)), "run_wo_conv2d_native")
    return y


def _direct_conv_threads(macs: int) -> int:
    """One thread below ~256k multiply-adds: the OpenMP fork costs more than it saves there."""
    return 1 if macs < DIRECT_CONV_PARALLEL_MACS else torch.get_num_threads()


def conv2d_direct_native(lib: Any, x: torch.Tensor, weight: torch.Tensor,
                         bias: torch.Tensor | None, stride: tuple[int, int],
                         padding: tuple[int, int], dilation: tuple[int, int],
                         relu: bool = False) -> torch.Tensor:
    """``F.conv2d(x, weight, bias, stride, padding, dilation)`` (then ReLU) by the direct C conv,
    for operands :func:`direct_conv_fits` accepts: float32 sums over the taps in order with
    fused multiply-adds, so equal to ``F.conv2d`` up to float32 rounding, and exact for
    integer-valued operands (the centered codes of ``"fp32_codes_conv"``).

    Example:
        >>> x, w = torch.randn(1, 2, 5, 5), torch.randn(3, 2, 3, 3)
        >>> lib = native_lib_for(x)
        >>> y = lib and conv2d_direct_native(lib, x, w, None, (1, 1), (1, 1), (1, 1))
        >>> y is None or torch.allclose(y, F.conv2d(x, w, None, 1, 1), atol=1e-5)
        True

    Raises:
        ValueError: operands the C conv cannot read as given (named), e.g. a weight whose input
            channels differ from ``x``'s; use ``F.conv2d`` for those.
    """
    if (weight.dim() != 4 or x.dim() != 4 or weight.shape[1] != x.shape[1]
            or not direct_conv_fits(x, weight.numel(), stride, 1)
            or not c_layout((weight, torch.float32), (bias, torch.float32))
            or (bias is not None and bias.numel() != weight.shape[0])):
        raise ValueError(
            f"conv2d_direct_native: needs contiguous float32 x [B, C, H, W] and weight "
            f"[O, C, kh, kw] with the same C, bias [O] or None, width stride 1 and at most "
            f"DIRECT_CONV_MAX_MACS multiply-adds (see direct_conv_fits); got x "
            f"{tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, bias "
            f"{None if bias is None else tuple(bias.shape)}, stride {tuple(stride)}; use F.conv2d")
    return _conv2d_direct(lib, x, weight, bias, stride, padding, dilation, relu)


def _conv2d_direct(lib: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                   stride: Sequence[int], padding: Sequence[int], dilation: Sequence[int],
                   relu: bool = False) -> torch.Tensor:
    """:func:`conv2d_direct_native` once its operands are known to fit."""
    b, c, h, w = x.shape
    o, _, kh, kw = weight.shape
    ho, wo = _conv_out_hw(x, (kh, kw), stride, padding, dilation)
    y = pooled_empty((b, o, max(ho, 0), max(wo, 0)))
    _direct_conv_result(lib.lb_conv2d_f32_small(
        x.data_ptr(), b, c, h, w, weight.data_ptr(), o, kh, kw, stride[0], stride[1],
        padding[0], padding[1], dilation[0], dilation[1], None if bias is None else bias.data_ptr(),
        int(relu), y.data_ptr(), _direct_conv_threads(b * max(ho, 0) * max(wo, 0) * weight.numel())
    ), "conv2d_direct_native")
    return y


def _conv_codes_native(lib: Any, x: torch.Tensor, x_scale: torch.Tensor | None, zp: int,
                       qmin: int, qmax: int, w_float: torch.Tensor, w_scale: torch.Tensor,
                       bias: torch.Tensor | None, stride: tuple[int, int],
                       padding: tuple[int, int], dilation: tuple[int, int], groups: int,
                       relu: bool) -> torch.Tensor:
    """``"fp32_codes_conv"`` on the C kernels: the centered codes in one pass (two when dynamic:
    ``x_scale`` None), the direct C conv over them (``F.conv2d`` when it does not fit), the
    epilogue in place in NCHW; the same bits as
    :func:`_conv_codes_fp32`'s PyTorch ops. ``x``, ``x_scale``, ``w_scale`` ``[O]`` and ``bias``
    are float32 and contiguous."""
    cell = ctypes.c_float() if x_scale is None else None  # the dynamic scale, written by C
    s_ptr = ctypes.addressof(cell) if cell is not None else x_scale.data_ptr()  # type: ignore[union-attr]
    t = torch.empty_like(x)
    lib.lb_quantize_centered_f32(x.data_ptr(), x.numel(), s_ptr, int(cell is not None), zp,
                                 qmin, qmax, t.data_ptr(), threads_for(x.numel()))
    if direct_conv_fits(t, w_float.numel(), stride, groups) and c_layout(
            (w_float, torch.float32)):  # exact either way: integer sums < 2^24
        y = _conv2d_direct(lib, t, w_float, None, stride, padding, dilation)
    else:
        y = F.conv2d(t, w_float, None, stride, padding, dilation, groups)
        y = y if y.is_contiguous() else y.contiguous()
    bsz, o, ho, wo = y.shape
    lib.lb_epilogue(y.data_ptr(), 0, bsz, o, ho * wo, s_ptr, 0, w_scale.data_ptr(),
                    None if bias is None else bias.data_ptr(), int(relu), None,
                    threads_for(y.numel()))
    return y


def _im2col_codes(u: torch.Tensor, pad_value: int, ksize: tuple[int, int], stride: tuple[int, int],
               padding: tuple[int, int], dilation: tuple[int, int], out_hw: tuple[int, int]
               ) -> torch.Tensor:
    """Channels-last im2col of integer codes ``[B, C, H, W]`` -> ``[B*Ho*Wo, kh*kw*C]``.

    Padding is filled with ``pad_value`` (the zero-point code, i.e. an exact 0.0); the patches are
    gathered by one strided copy.
    """
    bsz, c, h, w = u.shape
    (kh, kw), (ph, pw), (ho, wo) = ksize, padding, out_hw
    if (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0):
        return u.permute(0, 2, 3, 1).reshape(-1, c)  # (B*H*W, C)
    buf = u.new_full((bsz, h + 2 * ph, w + 2 * pw, c), pad_value)  # (B, Hp, Wp, C)
    buf[:, ph:ph + h, pw:pw + w] = u.permute(0, 2, 3, 1)
    sb, sh, sw, _ = buf.stride()
    patches = buf.as_strided((bsz, ho, wo, kh, kw, c),
                             (sb, sh * stride[0], sw * stride[1], sh * dilation[0],
                              sw * dilation[1], 1))
    return patches.reshape(bsz * ho * wo, kh * kw * c)


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
    out = torch.empty((n, k))
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
    groups = kp // group_size if group_size else 1
    if scale.numel() not in (1, n, n * groups) or zero_point.numel() != scale.numel():
        raise ValueError(f"{caller}: scale / zero_point need 1, {n} or "
                         f"{n * groups} values (per tensor, channel or group); got "
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


def u4_pack(codes: torch.Tensor, signed: bool, scale: torch.Tensor, zero_point: torch.Tensor,
            group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """INT4 codes ``[N, Kp]`` and their per-group qparams in the layout of lowbit's INT4 C
    kernels (``"u4_<isa>"``): unsigned codes ``u = code + 8`` (signed) or ``code``, per 32
    codes 16 bytes ``u[j] | u[j + 16] << 4``; float32 scales and unsigned zero-points
    ``[N, Kp / group]``. ``Kp`` and ``group`` must be multiples of 32.

    Example:
        >>> codes = torch.randint(-8, 8, (2, 64), dtype=torch.int8)
        >>> wq, s, z = u4_pack(codes, True, torch.ones(2, 2), torch.zeros(2, 2, dtype=torch.int32),
        ...                    32)
        >>> tuple(wq.shape), int(wq[0, 0] & 15) == int(codes[0, 0]) + 8
        ((2, 32), True)
    """
    n, kp = codes.shape
    if kp % 32 or group % 32 or kp % group:
        raise ValueError(f"u4_pack: Kp={kp} and group={group} must be multiples of 32 "
                         "(and group must divide Kp)")
    u = codes.to(torch.int32) + (8 if signed else 0)  # (N, Kp) in [0, 15]
    if u.numel() and (int(u.min()) < 0 or int(u.max()) > 15):
        raise ValueError("u4_pack: codes out of the 4-bit range")
    u = u.to(torch.uint8).reshape(n, kp // 32, 2, 16)
    wq = (u[:, :, 0] | (u[:, :, 1] << 4)).reshape(n, kp // 2).contiguous()  # (N, Kp/2)
    groups = kp // group
    s = scale.float().reshape(-1).expand(n * groups).reshape(n, groups).contiguous() \
        if scale.numel() == 1 else scale.float().reshape(n, groups).contiguous()
    z = (zero_point.to(torch.int32) + (8 if signed else 0)).float()
    z = (z.reshape(-1).expand(n * groups) if z.numel() == 1 else z).reshape(n, groups)
    return wq, s, z.contiguous()


def run_u4_linear(lib: Any, x: torch.Tensor, args: tuple, bias: torch.Tensor | None,
                  relu: bool) -> torch.Tensor:
    """``x [M, K] @ W.T (+ bias, ReLU)`` in float32 on lowbit's INT4 C kernel of one ISA;
    ``args`` = ``(wq, scales, zero_points, kp, group)`` from :func:`u4_pack`. The same as
    dequantize + ``F.linear`` up to float32 rounding (each group's dot product first).

    Example:
        >>> codes = torch.randint(-8, 8, (3, 64), dtype=torch.int8)
        >>> s, z = torch.rand(3, 2), torch.randint(-8, 8, (3, 2), dtype=torch.int32)
        >>> lib, x = load_gemm("portable"), torch.randn(2, 64)
        >>> w = (codes.float() - z.float().repeat_interleave(32, 1)) * s.repeat_interleave(32, 1)
        >>> lib is None or torch.allclose(run_u4_linear(lib, x, (*u4_pack(codes, True, s, z, 32),
        ...     64, 32), None, False), x @ w.T, atol=1e-4)
        True
    """
    wq, sc, zp, kp, group = args
    if x.dtype != torch.float32 or x.dim() != 2:
        raise ValueError(f"run_u4_linear: x must be float32 [M, K]; got {x.dtype} "
                         f"{tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    n = wq.shape[0]
    y = torch.empty((m, n))
    rc = lib.lbk_u4_linear(x.data_ptr(), m, k, x.stride(0), _extent(x) // 4, wq.data_ptr(),
                           wq.numel(), n, kp, group, sc.data_ptr(), zp.data_ptr(),
                           None if bias is None else bias.data_ptr(), int(relu), y.data_ptr(),
                           y.numel(), torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"lowbit INT4 kernel ({lib.lbk_isa().decode()}) refused its "
                           f"arguments (code {rc}): x {tuple(x.shape)}, N={n}, Kp={kp}, "
                           f"group={group}")
    return y


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
    if kernel == "int8pack_bf16":
        xb = x.to(torch.bfloat16)
        if packed.shape[1] != x.shape[1]:  # type: ignore[union-attr]  # zero columns, K % 16
            xb = F.pad(xb, (0, packed.shape[1] - x.shape[1]))  # type: ignore[union-attr]
        y = torch.ops.aten._weight_int8pack_mm(xb, packed, scales).float()
    elif kernel == "int4pack_bf16":
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(
            x.to(torch.bfloat16), packed, group_size, scales)[:, :out_features].float()
    elif kernel == "dequant_bf16":
        y = F.linear(x.to(torch.bfloat16), dequantize().to(torch.bfloat16)).float()
    else:
        return F.linear(x.float(), dequantize(), bias)
    return y if bias is None else y.add_(bias)
