"""Calibration throughput with 1 vs 2 processes (torch.distributed, gloo, CPU).

Run: ``.venv/bin/python benchmarks/bench_distributed.py`` (about a minute; ``--quick`` for a
smoke run). For the MNIST CNN (real MNIST images) and a MiniLM-sized transformer encoder block
(hidden 384, 12 heads, FFN 1536, random tokens of length 64), static INT8 calibration
(``quantize_static``: copy, plan, calibrate, merge across ranks, convert) of the same sample set
is timed as

* 1 process, 1 intra-op thread;
* 1 process, 2 intra-op threads (all the cores of a 2-core machine in one process);
* 2 processes x 1 thread, each calibrating half the samples, statistics merged over gloo (the
  ``sync`` column is the time of the merge alone, :func:`lowbit.distributed.sync_calibrators`).

Throughput is samples / wall time of the slowest rank, from a barrier to the quantized model;
median of ``--rounds`` rounds per variant. What it can show on a 2-core machine: whether the
merge is cheap next to calibration (it is a fixed cost per layer, independent of the samples)
and how 2 processes compare to 2 threads on the same 2 cores; not scaling beyond 2 cores.
Results also go to ``benchmarks/results/bench_distributed.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _timing import machine_line, results_path

import lowbit
from lowbit.data import mnist_splits
from lowbit.distributed import sync_calibrators
from lowbit.models import MnistCNN, TransformerEncoderBlock

CALIBRATORS = ("minmax", "percentile")


def workload(name: str, quick: bool) -> tuple[torch.nn.Module, list[torch.Tensor]]:
    torch.manual_seed(0)
    if name == "MNIST CNN":
        images = mnist_splits().train.tensors[0][: 512 if quick else 4096]
        return MnistCNN().eval(), list(images.split(64))
    tokens = torch.randn(64 if quick else 256, 64, 384)  # (batch, sequence, hidden)
    return TransformerEncoderBlock().eval(), list(tokens.split(16))


def time_rank(name: str, calibrator: str, rounds: int, quick: bool) -> tuple[float, float]:
    """(median seconds of quantize_static on this rank's shard, median seconds of the merge)."""
    model, batches = workload(name, quick)
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    shard = batches[rank::world]
    config = lowbit.QuantizationConfig.int8_static(calibrator=calibrator)
    totals, merges = [], []
    for _ in range(rounds + 1):  # the first round warms up
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        quantizer = lowbit.PTQQuantizer(config, progress=False)
        quantizer.quantize(model, shard)
        total = torch.tensor([time.perf_counter() - start])
        start = time.perf_counter()
        sync_calibrators(quantizer.calibrators)  # the merge alone (its result is discarded)
        merge = time.perf_counter() - start
        if world > 1:
            dist.all_reduce(total, op=dist.ReduceOp.MAX)  # the slowest rank decides
        totals.append(float(total))
        merges.append(merge)
    return statistics.median(totals[1:]), statistics.median(merges[1:])


def _two(rank: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    results = {f"{m}|{c}": time_rank(m, c, args.rounds, args.quick)
               for m in ("MNIST CNN", "encoder block") for c in CALIBRATORS}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer samples and rounds")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if args.quick:
        args.rounds = 1
    print(machine_line())
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs visible, shared host: noisy")
    single = {}
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for m in ("MNIST CNN", "encoder block"):
            for c in CALIBRATORS:
                single[(threads, m, c)] = time_rank(m, c, args.rounds, args.quick)[0]
    out = results_path("bench_distributed.json")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = out.with_suffix(".ranks.json")
    mp.spawn(_two, args=(port, args, str(tmp)), nprocs=2)
    two = json.loads(tmp.read_text())
    tmp.unlink()
    print("\n| model | calibrator | samples | 1 proc x 1 thread | 1 proc x 2 threads | "
          "2 procs x 1 thread | 2 procs / 1 proc x 1 | 2 procs / 1 proc x 2 | sync |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for m in ("MNIST CNN", "encoder block"):
        n = sum(b.shape[0] for b in workload(m, args.quick)[1])
        for c in CALIBRATORS:
            t1, t2 = single[(1, m, c)], single[(2, m, c)]
            tp, sync = two[f"{m}|{c}"]
            row = {"model": m, "calibrator": c, "samples": n, "one_thread_sps": n / t1,
                   "two_threads_sps": n / t2, "two_procs_sps": n / tp, "sync_ms": sync * 1e3}
            rows.append(row)
            print(f"| {m} | {c} | {n} | {n / t1:,.0f}/s | {n / t2:,.0f}/s | {n / tp:,.0f}/s | "
                  f"{t1 / tp:.2f}x | {t2 / tp:.2f}x | {sync * 1e3:.1f} ms |")
    out.write_text(json.dumps({"machine": machine_line(), "rows": rows}, indent=1))
    print(f"\nresults: {out}")


if __name__ == "__main__":
    main()
