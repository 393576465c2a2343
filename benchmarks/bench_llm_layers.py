"""LLM-sized Linear layers: lowbit INT8 / INT4 vs FP32 and the peers' INT8 GEMMs, same run.

Run: ``.venv/bin/python benchmarks/bench_llm_layers.py`` (2-4 minutes on 2 cores; ``--quick``
for a smoke run). For each shape ``M x K -> N`` (4096 -> 4096 and 4096 -> 11008 at M = 1, 8,
32, plus the transformer-block shapes 4096 x 384 -> 1536 and 32 x 1024 -> 1024) it times, in
one process with 2 threads and rounds interleaved across variants:

* FP32 eager ``nn.Linear`` (what users run), and bf16;
* lowbit INT8 dynamic (per-channel weights, per-token activations; also with 7-bit activations,
  ``QuantizationConfig.int8_dynamic(activation_bits=7)``), INT8 static (per-tensor, calibrated
  min-max) and INT4 weight-only (group 128), each with the kernel it chose;
* torch.ao ``quantize_dynamic`` (fbgemm: per-tensor weights, 7-bit activations);
* ONNX Runtime ``quantize_dynamic`` of the exported layer (``DynamicQuantizeMatMul`` /
  ``MatMulInteger``), spinning off.

Inputs are Gaussian by default; ``--activations heavy`` draws them from a Student-t with 3
degrees of freedom instead, heavy-tailed like the inputs of LLM and transformer Linears (a few
large values per token): per-token 8-bit codes then mostly fit in 7 bits, where lowbit's AVX2
GEMM takes its split form (``docs/kernels.md``), and per-tensor peers lose precision.

It prints the CPU, its ISA and lowbit's ISA path first; ratios are FP32 time / variant time
(> 1 is faster) and lowbit time vs each peer. Output error (relative to FP32) is printed too.
Results also go to ``benchmarks/results/bench_llm_layers.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch
from _timing import activations, machine_line, median_times, results_path
from bench_ptq import OrtModel, _onnx, _torch_ao_dynamic
from torch import nn

from lowbit.config import QuantizationConfig
from lowbit.ptq import PTQQuantizer, quantize_dynamic, quantize_static, quantize_weight_only

THREADS = 2
SHAPES = [(1, 4096, 4096), (8, 4096, 4096), (32, 4096, 4096), (1, 4096, 11008),
          (8, 4096, 11008), (32, 4096, 11008), (4096, 384, 1536), (32, 1024, 1024)]
QUICK_SHAPES = [(1, 1024, 1024), (32, 384, 1536)]
RESULTS = results_path("bench_llm_layers.json")
PEERS = ("torch.ao dynamic", "ORT dynamic INT8")
LOWBIT = ("lowbit INT8 dynamic", "lowbit INT8 dyn 7-bit act", "lowbit INT8 static",
          "lowbit INT4 g128")


def _variants(m: int, k: int, n: int, folder: str,
              kind: str = "gaussian") -> tuple[dict, dict, torch.Tensor]:
    torch.manual_seed(0)
    layer = nn.Sequential(nn.Linear(k, n)).eval()
    x = activations(m, k, kind)
    calib = [activations(min(m, 64), k, kind) for _ in range(2)]
    seven = QuantizationConfig.int8_dynamic(activation_bits=7)
    lowbit = {"lowbit INT8 dynamic": quantize_dynamic(layer),
              "lowbit INT8 dyn 7-bit act": PTQQuantizer(seven).quantize(layer),
              "lowbit INT8 static": quantize_static(layer, calib, progress=False),
              "lowbit INT4 g128": quantize_weight_only(layer, bits=4, group_size=128)}
    kernels = {name: q[0].kernel_info() for name, q in lowbit.items()}
    bf16 = copy.deepcopy(layer).to(torch.bfloat16)
    variants = {"FP32": layer, "bf16": lambda t: bf16(t.bfloat16()).float(), **lowbit,
                "torch.ao dynamic": _torch_ao_dynamic(layer)}
    try:
        _, int8_path = _onnx(layer, x, folder, f"linear_{k}_{n}")
        variants["ORT dynamic INT8"] = OrtModel(int8_path)
    except Exception as exc:  # report and go on
        print(f"ORT export/quantization failed for {k}->{n}: {exc}", flush=True)
    return variants, kernels, x


def _pick(kernels: str | dict, m: int) -> str:
    """The kernel a layer runs for ``m`` rows, from its ``kernel_info()``."""
    if isinstance(kernels, str):
        return kernels
    for rule, name in kernels.items():
        op, _, bound = rule.partition("<=")
        if op == "M" and bound and m <= int(bound):
            return name
    return list(kernels.values())[-1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two small shapes, few rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--activations", choices=("gaussian", "heavy"), default="gaussian",
                        help="input distribution (heavy: Student-t, 3 degrees of freedom)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    rounds = args.rounds or (5 if args.quick else 15)
    print(f"# LLM-sized layers: {machine_line()}, {THREADS} threads, median of {rounds} "
          f"interleaved rounds, {args.activations} activations\n", flush=True)
    head = ["M x K -> N", "FP32 ms", *[f"{v} vs FP32" for v in ("bf16", *LOWBIT, *PEERS)],
            "INT8 dyn vs torch.ao", "INT8 dyn vs ORT", "7-bit vs torch.ao", "7-bit vs ORT",
            "kernels (dyn / 7-bit / static / int4)", "rel. error dyn / 7-bit / torch.ao / ORT"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), flush=True)
    dump = []
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        for m, k, n in QUICK_SHAPES if args.quick else SHAPES:
            variants, kernels, x = _variants(m, k, n, folder, args.activations)
            times = median_times({name: (lambda v=v, x=x: v(x))
                                  for name, v in variants.items()}, rounds)
            ref = variants["FP32"](x)
            err = {}
            for name in ("lowbit INT8 dynamic", "lowbit INT8 dyn 7-bit act", *PEERS):
                if name in variants:
                    y = variants[name](x).float()
                    err[name] = float((y - ref).norm() / ref.norm())
            fp32 = times["FP32"]

            def ratio(name: str, base: float = fp32, times: dict = times) -> str:
                return f"{base / times[name]:.2f}x" if name in times else "n/a"

            dyn, dyn7 = times["lowbit INT8 dynamic"], times["lowbit INT8 dyn 7-bit act"]
            cells = [f"{m} x {k} -> {n}", f"{fp32 * 1e3:.3f}",
                     *[ratio(v) for v in ("bf16", *LOWBIT, *PEERS)],
                     *[f"{times[p] / t:.2f}x" if p in times else "n/a"
                       for t in (dyn, dyn7) for p in PEERS],
                     " / ".join(_pick(kernels[v], m) for v in LOWBIT),
                     " / ".join(f"{err[v]:.1e}" if v in err else "n/a"
                                for v in ("lowbit INT8 dynamic", "lowbit INT8 dyn 7-bit act",
                                          *PEERS))]
            print("| " + " | ".join(cells) + " |", flush=True)
            dump.append({"shape": [m, k, n], "seconds": times, "kernels": kernels,
                         "rel_error": err})
            del variants
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"machine": machine_line(), "threads": THREADS,
                                     "activations": args.activations, "rows": dump},
                                    indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
