"""Helpers shared by the benchmark scripts (run them from the repository root): interleaved
timing, the machine line every benchmark prints, synthetic activations."""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def median_times(fns: dict[str, Callable[[], object]], rounds: int,
                 settle: int = 1) -> dict[str, float]:
    """Median wall time per candidate, candidates interleaved in rounds (noisy shared host).

    Each round runs them in a new (seeded) random order, so no candidate always runs right after
    the same one, and each candidate first runs ``settle`` untimed calls: the timed call sees the
    caches and memory in the state its own previous call left, not the one another candidate
    left. On a Xeon with AMX a large op pays for the memory traffic of whatever ran before it:
    at 4096 x 384 -> 1536, an int8 layer right after the FP32 ``F.linear`` (which leaves a
    25 MB output to write back) took 10.8 ms against 5.4 ms right after itself, and a plain
    elementwise op over the same output 6.6 ms against 3.9 ms.
    """
    times: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up (allocator, first-call dispatch)
        fn()
        fn()
    items, order = list(fns.items()), random.Random(0)
    for _ in range(rounds):
        order.shuffle(items)
        for name, fn in items:
            for _ in range(settle):
                fn()
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def activations(rows: int, k: int, kind: str = "gaussian",
                generator: torch.Generator | None = None) -> torch.Tensor:
    """``rows x k`` inputs: standard Gaussian; ``"outlier"``: Gaussian with 1% of the channels
    x 20; ``"heavy"``: Student-t with 3 degrees of freedom (from the global generator), heavy
    tailed like transformer activations."""
    if kind == "heavy":
        return torch.distributions.StudentT(3.0).sample((rows, k))
    x = torch.randn(rows, k, generator=generator)
    if kind == "outlier":
        x[:, torch.randperm(k, generator=generator)[:max(1, k // 100)]] *= 20
    return x


#: Environment variables that limit the libraries' instruction sets (``benchmarks/emulate.py``).
EMULATION_VARS = ("LOWBIT_ISA", "ONEDNN_MAX_CPU_ISA", "FBGEMM_ENABLE_INSTRUCTIONS",
                  "MKL_ENABLE_INSTRUCTIONS")


def results_path(name: str) -> Path:
    """Where a benchmark writes its JSON results: ``benchmarks/results/<name>`` (gitignored),
    or ``$LOWBIT_BENCH_RESULTS/<name>`` (``run_all.py --out-dir DIR`` sets it); the folder is
    created."""
    folder = Path(os.environ.get("LOWBIT_BENCH_RESULTS") or Path(__file__).resolve().parent
                  / "results")
    folder.mkdir(parents=True, exist_ok=True)
    return folder / name


def machine_line() -> str:
    """The CPU model, its ISA class and the ISA path lowbit runs, e.g. ``"AMD EPYC (AVX2, no
    AVX-512 VNNI), lowbit ISA path: avx2"`` (benchmarks print it: results depend on it)."""
    import platform

    from lowbit.native import selected_isa

    model, flags = "", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = ("AVX-512 VNNI" + (" + BF16" if "avx512_bf16" in flags else "")
           + (" + AMX" if "amx_int8" in flags else "")
           if "avx512_vnni" in flags else
           "AVX2, no AVX-512 VNNI" if "avx2" in flags else "no AVX2")
    model = model or platform.processor() or platform.machine()
    caps = [f"{k}={os.environ[k]}" for k in EMULATION_VARS if os.environ.get(k)]
    emulated = f", limited by {' '.join(caps)} (ONNX Runtime not)" if caps else ""
    return f"{model} ({isa}){emulated}, lowbit ISA path: {selected_isa()}"
