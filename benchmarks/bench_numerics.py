"""Numerics throughput: ``lowbit.ops.quantize`` / ``fake_quantize`` vs PyTorch's fake-quantize ops.

Prints a markdown table: GB/s of float32 input processed (4096 x 4096, 64 MiB) for 8- and 4-bit,
per-tensor / per-channel / per-group(128), next to ``torch.fake_quantize_per_tensor_affine`` /
``torch.fake_quantize_per_channel_affine`` (per-group: the per-channel op on the tensor reshaped
to one row per group, which is bit-identical), timed round-robin in the same process; the last
column is lowbit's throughput divided by torch's (> 1: lowbit is faster).

lowbit computes ``x * (1/scale)`` into one temporary and finishes in place, which on large
tensors beats torch's fused op (on small ones torch's fused op is not faster either). A second
table times the range reduction, ``ops.compute_range`` against ``torch.aminmax`` (which
reduces along a dimension several times slower than ``amin`` + ``amax`` on CPU), and
``quantize_tensor``.

Usage: ``python benchmarks/bench_numerics.py [--threads 2] [--rounds 9] [--size 4096] [--quick]``
"""

from __future__ import annotations

import argparse

import torch
from _timing import machine_line, median_times

from lowbit import ops
from lowbit.config import QuantSpec


def torch_fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        spec: QuantSpec) -> torch.Tensor:
    """PyTorch's fake-quantize op for the spec's granularity (per-group/per-token: reshaped)."""
    if spec.granularity == "per_tensor":
        return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, spec.qmin, spec.qmax)
    if spec.granularity == "per_channel":
        return torch.fake_quantize_per_channel_affine(x, scale, zero_point, spec.axis % x.dim(),
                                                      spec.qmin, spec.qmax)
    width = spec.group_size if spec.granularity == "per_group" else x.shape[-1]
    rows = x.reshape(-1, width)  # one row per group / token
    out = torch.fake_quantize_per_channel_affine(rows, scale.reshape(-1), zero_point.reshape(-1),
                                                 0, spec.qmin, spec.qmax)
    return out.reshape(x.shape)





def range_aminmax(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """The range with ``torch.aminmax`` (lowbit's first implementation), to compare against
    ``ops.compute_range`` (``amin`` + ``amax``: the same values; aminmax along a dimension is
    several times slower on CPU)."""
    x = x.detach().float()
    if spec.granularity == "per_tensor":
        return torch.aminmax(x)
    if spec.granularity == "per_channel":
        axis = spec.axis % x.dim()
        return torch.aminmax(x.movedim(axis, 0).reshape(x.shape[axis], -1), dim=1)
    if spec.granularity == "per_token":
        return torch.aminmax(x, dim=-1, keepdim=True)
    return torch.aminmax(x.reshape(*x.shape[:-1], -1, spec.group_size), dim=-1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args(argv)
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(args.size, args.size)
    gb = x.numel() * x.element_size() / 1e9

    print(f"# {machine_line()}")
    print(f"# lowbit numerics throughput: {args.size}x{args.size} float32 "
          f"({gb * 1e3:.0f} MB), {args.threads} threads, torch {torch.__version__}, "
          f"median of {rounds} round-robin rounds\n")
    print("GB/s of float input processed; lowbit/torch = throughput ratio (> 1: lowbit faster)."
          " The torch column is the fake-quantize op for the same granularity (per-group: the "
          "per-channel op on a (rows*groups, 128) view).\n")
    print("| bits | granularity | lowbit quantize | lowbit fake_quantize | torch fake_quantize "
          "| quantize / torch | fake_quantize / torch |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    range_rows = []
    for bits in (8, 4):
        for granularity, extra in (("per_tensor", {}), ("per_channel", {"axis": 0}),
                                   ("per_group", {"group_size": 128})):
            spec = QuantSpec(bits=bits, symmetric=False, granularity=granularity, **extra)
            scale, zp = ops.choose_qparams(*ops.compute_range(x, spec), spec)
            ref = torch_fake_quantize(x, scale, zp, spec)
            assert torch.equal(ops.fake_quantize(x, scale, zp, spec), ref), "not bit-identical"
            times = median_times({
                "quantize": lambda s=spec, a=scale, b=zp: ops.quantize(x, a, b, s),
                "fake": lambda s=spec, a=scale, b=zp: ops.fake_quantize(x, a, b, s),
                "torch": lambda s=spec, a=scale, b=zp: torch_fake_quantize(x, a, b, s),
            }, rounds)
            if bits == 8:  # the range does not depend on the bit width
                ours, proto = ops.compute_range(x, spec), range_aminmax(x, spec)
                same = all(torch.equal(a, b) for a, b in zip(ours, proto, strict=True))
                assert same, "range differs"
                range_times = median_times({
                    "ours": lambda s=spec: ops.compute_range(x, s),
                    "aminmax": lambda s=spec: range_aminmax(x, s),
                    "e2e": lambda s=spec: ops.quantize_tensor(x, s),
                }, rounds)
                range_rows.append((granularity, {k: gb / v for k, v in range_times.items()}))
            rate = {k: gb / v for k, v in times.items()}
            label = granularity + ("(128)" if granularity == "per_group" else "")
            print(f"| {bits} | {label} | {rate['quantize']:.2f} | {rate['fake']:.2f} | "
                  f"{rate['torch']:.2f} | {rate['quantize'] / rate['torch']:.2f} | "
                  f"{rate['fake'] / rate['torch']:.2f} |", flush=True)

    print("\n## Range reduction (the first step of quantize_tensor and of every calibrator update):"
          " ops.compute_range vs torch.aminmax (identical values)\n")
    print("| granularity | compute_range GB/s | torch.aminmax GB/s | compute_range / aminmax "
          "| quantize_tensor (range+qparams+quantize) GB/s |")
    print("| --- | --- | --- | --- | --- |")
    for granularity, r in range_rows:
        print(f"| {granularity} | {r['ours']:.2f} | {r['aminmax']:.2f} | "
              f"{r['ours'] / r['aminmax']:.2f}x | {r['e2e']:.2f} |")


if __name__ == "__main__":
    main()
