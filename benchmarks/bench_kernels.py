"""Kernel benchmark: time ratios vs fp32 ``F.linear`` / ``F.conv2d`` (lower is faster).

Prints a markdown table per layer type. Candidates are timed round-robin in one process (the
host is shared and noisy) and the median per candidate is reported. These numbers set the
thresholds in ``lowbit.kernels`` (see its module docstring).

The last table times the two exact layouts of 8-bit activations in the C GEMM (the sign form
and the split form: a 7-bit part plus the outlying codes, ``docs/kernels.md``), forced one by one
and as chosen automatically, on Gaussian, outlier (1% of the channels x 20) and heavy-tailed
(Student-t, 3 degrees of freedom) inputs.

Usage: ``python benchmarks/bench_kernels.py [--threads 2] [--rounds 15] [--quick]``
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _timing import activations, machine_line, median_times
from torch import nn

from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.kernels import (
    int4_pack_for_cpu,
    int8_conv2d,
    int8_gemm,
    int_mm_takes_uint8,
    quantize_activation,
    quantize_activation_u8,
    s8_acc,
)
from lowbit.modules import Int4Linear, Int8WeightOnlyLinear, QuantizedConv2d, QuantizedLinear

LINEAR_SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (32, 384, 1536), (256, 1024, 4096),
                 (1024, 1024, 1024)]
CONV_BATCHES = [1, 64]
FORM_SHAPES = [(1, 4096, 4096), (32, 4096, 4096), (544, 384, 1536), (544, 1536, 384),
               (4096, 384, 1536)]
#: (C_in, C_out, H = W) of 3x3 pad-1 convs: K = 9 * C_in spans the ``"fp32_codes_conv"``
#: threshold (the MNIST CNN's two convs are the first two).
CONV_SHAPES = [(1, 16, 28), (16, 32, 14), (4, 32, 28), (8, 32, 28), (32, 32, 16)]




def _linear_candidates(m: int, k: int, n: int) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    fc = nn.Linear(k, n)
    x = torch.randn(m, k)
    xb = x.bfloat16()
    wb, bb = fc.weight.detach().bfloat16(), fc.bias.detach().bfloat16()
    dyn = QuantizedLinear.from_float(fc, QuantizationConfig.int8_dynamic())
    amax = float(x.abs().max())
    static = QuantizedLinear.from_float(fc, QuantizationConfig.int8_static(),
                                        input_qparams=(amax / 127, 0))
    w8 = dyn.qweight  # the int8 codes (.weight is their float view)
    s8, _, _ = quantize_activation(x, -128, 127)
    u = s8.view(torch.uint8) ^ 0x80  # the same codes shifted to uint8
    i4 = Int4Linear.from_float(fc, QuantizationConfig.int4_weight_only(128))
    i4_deq = Int4Linear.from_float(fc, QuantizationConfig.int4_weight_only(128))
    i8wo_cfg = QuantizationConfig(weights=QuantSpec.int8_weight(), activations=None,
                                  mode="weight_only")
    i8wo = Int8WeightOnlyLinear.from_float(fc, i8wo_cfg)
    packed, sz = int4_pack_for_cpu(i4.codes(), i4.weight_scale, i4.weight_zero_point, 8)
    szb = sz.bfloat16()
    sb = dyn.weight_scale.bfloat16()
    from lowbit.kernels import weight_only_linear

    cands: dict[str, Callable[[], object]] = {
        "fp32 F.linear": lambda: F.linear(x, fc.weight, fc.bias),
        "bf16 F.linear": lambda: F.linear(xb, wb, bb),
        **({"_int_mm u8s8 (int32 out)": lambda: torch._int_mm(u, w8.t())}
           if int_mm_takes_uint8() else {}),  # (torch >= 2.13)
        "_int_mm s8s8 (int32 out)": lambda: torch._int_mm(s8, w8.t()),
        "per-token quantize only (int8)": lambda: quantize_activation(x, -128, 127),
        "per-token quantize only (uint8)": lambda: quantize_activation_u8(x, -128, 127),
        "QuantizedLinear dynamic (auto)": lambda: dyn(x),
        "QuantizedLinear static (auto)": lambda: static(x),
        "_weight_int8pack_mm bf16": lambda: torch.ops.aten._weight_int8pack_mm(xb, w8, sb),
        "Int8WeightOnlyLinear (auto)": lambda: i8wo(x),
        "int8 wo dequant+bf16": lambda: weight_only_linear(x, "dequant_bf16",
                                                           i8wo._dequant_padded),
        "_weight_int4pack_mm bf16 g128": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            xb, packed, 128, szb),
        "Int4Linear g128 (auto)": lambda: i4(x),
        "int4 dequant+bf16": lambda: weight_only_linear(x, "dequant_bf16",
                                                        i4_deq._dequant_padded),
    }
    # this CPU's C GEMM (s8_portable / s8_avx2 / s8_avx512_vnni / s8_amx), where it applies
    if (gemm := int8_gemm()).startswith("s8_") and s8_acc(s8, w8, gemm, False) is not None:
        cands[f"lowbit {gemm} GEMM (int32 out)"] = lambda: s8_acc(s8, w8, gemm, False)
    if m <= 8:
        cands["_weight_int4pack_mm fp32 act"] = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(
            x, packed, 128, sz)
    try:  # prepacked oneDNN qlinear: exact only with VNNI (see lowbit.kernels)
        pw = torch.ops.onednn.qlinear_prepack(w8, [m, k])
        zw = torch.zeros(n, dtype=torch.int64)
        cands["onednn qlinear u8 (prepacked)"] = lambda: torch.ops.onednn.qlinear_pointwise(
            u, 0.01, 128, pw, dyn.weight_scale, zw, None, 1.0, 0, torch.float32, "none", [], "")
    except (RuntimeError, AttributeError):
        pass
    return cands


def _conv_candidates(batch: int, cin: int = 32, cout: int = 32, hw: int = 16
                     ) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    x = torch.randn(batch, cin, hw, hw)
    dyn = QuantizedConv2d.from_float(conv, QuantizationConfig.int8_dynamic())
    st = QuantizedConv2d.from_float(conv, QuantizationConfig.int8_static(),
                                    input_qparams=(float(x.abs().max()) / 127, 0))
    w, s, zp, cs = dyn.qweight, torch.tensor(0.02), None, dyn._colsum

    def forced(kernel: str) -> Callable[[], object]:
        return lambda: int8_conv2d(x, s, zp, -128, 127, w, dyn._w_scale, cs, dyn.bias, (1, 1),
                                   (1, 1), (1, 1), 1, kernel=kernel).contiguous()

    gemm = int8_gemm()  # this CPU's exact INT8 GEMM (ISA path)
    xb, wb, bb = x.bfloat16(), conv.weight.bfloat16(), conv.bias.bfloat16()  # (not timed)
    return {
        "fp32 F.conv2d": lambda: conv(x),
        "bf16 F.conv2d": lambda: F.conv2d(xb, wb, bb, padding=1),
        "QuantizedConv2d dynamic (auto)": lambda: dyn(x),
        "QuantizedConv2d static (auto)": lambda: st(x),
        f"int8_conv2d im2col + {gemm}": forced(gemm),
        "int8_conv2d fp32_codes_conv": forced("fp32_codes_conv"),
        "im2col F.unfold only": lambda: F.unfold(x, 3, padding=1),
    }


def _activation_forms(rounds: int, quick: bool) -> str:
    """Sign vs split form of 8-bit per-token activations, forced through the C library's
    process-wide switch (``lbk_s8_split_mode``), on one dynamic INT8 layer per shape."""
    from lowbit.native import ISA_PATHS, load_gemm, selected_isa

    isa = selected_isa()
    if ISA_PATHS[isa][0] is None:
        return f"(8-bit activation forms: the {isa} path runs no C GEMM; nothing to time)"
    lib = load_gemm(isa)
    lines = [f"### 8-bit activation forms, {isa} C GEMM (ms; sign / split > 1: split faster)",
             "", "| M x K -> N | inputs | steps with a remainder | sign | split | automatic "
             "| sign / split |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for m, k, n in [(33, 256, 256)] if quick else FORM_SHAPES:
        layer = QuantizedLinear.from_float(nn.Linear(k, n), QuantizationConfig.int8_dynamic())
        for kind in ("gaussian", "outlier", "heavy"):
            x = activations(m, k, kind, torch.Generator().manual_seed(m + k))
            codes, _, _ = quantize_activation(x, -127, 127)
            c4 = ((codes < -64) | (codes > 63))[:, : k // 4 * 4].reshape(m, -1, 4).any(-1)

            def forced(mode: int, x: torch.Tensor = x,
                       layer: nn.Module = layer) -> Callable[[], object]:
                def run() -> object:
                    before = lib.lbk_s8_split_mode(mode)
                    try:
                        return layer(x)
                    finally:
                        lib.lbk_s8_split_mode(before)
                return run

            t = median_times({"sign": forced(0), "split": forced(1), "auto": forced(-1)},
                             rounds)
            lines.append(f"| {m} x {k} -> {n} | {kind} | {float(c4.float().mean()):.1%} | "
                         f"{t['sign'] * 1e3:.2f} | {t['split'] * 1e3:.2f} | "
                         f"{t['auto'] * 1e3:.2f} | {t['sign'] / t['split']:.2f} |")
    return "\n".join(lines)


def _table(title: str, cols: list[str], rows: dict[str, dict[str, float]],
           base: str) -> str:
    lines = [f"### {title} (time / {base}; lower is faster)", "",
             "| kernel | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    names: list[str] = []
    for r in rows.values():
        names += [n for n in r if n not in names]
    for name in names:
        cells = []
        for c in cols:
            t = rows[c].get(name)
            cells.append("-" if t is None else f"{t / rows[c][base]:.2f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| (" + base + " ms) | " + " | ".join(
        f"{rows[c][base] * 1e3:.2f}" for c in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    """Run the benchmark and print the tables."""
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="small shapes only (smoke test)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(1, 256, 256), (33, 128, 256)] if args.quick else LINEAR_SHAPES
    with torch.inference_mode():
        lin = {f"{m}x{k}x{n}": median_times(_linear_candidates(m, k, n), args.rounds)
               for m, k, n in shapes}
        conv = {f"batch {b}": median_times(_conv_candidates(b), args.rounds)
                for b in CONV_BATCHES}
        small = {c: {f"batch {b}": median_times(_conv_candidates(b, *c), args.rounds)
                     for b in CONV_BATCHES} for c in (CONV_SHAPES[:2] if args.quick
                                                     else CONV_SHAPES)}
    print(f"{machine_line()}; torch {torch.__version__}, {args.threads} threads, median of "
          f"{args.rounds} rounds\n")
    print(_table("Linear M x K x N", list(lin), lin, "fp32 F.linear"))
    print()
    print(_table("Linear M x K x N, vs bf16", list(lin), lin, "bf16 F.linear"))
    print()
    print(_table("Conv2d 32->32 3x3 pad 1 on 16x16", list(conv), conv, "fp32 F.conv2d"))
    for (cin, cout, hw), rows in small.items():
        print()
        print(_table(f"Conv2d {cin}->{cout} 3x3 pad 1 on {hw}x{hw} (K = {9 * cin})", list(rows),
                     rows, "fp32 F.conv2d"))
    print()
    with torch.inference_mode():
        print(_activation_forms(args.rounds, args.quick))


if __name__ == "__main__":
    main()
