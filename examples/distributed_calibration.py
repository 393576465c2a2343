"""Sharded calibration and DDP QAT with torch.distributed: every rank ends with the same model.

Each rank calibrates on its own shard of the data (``DistributedSampler``); lowbit merges the
ranks' calibration statistics before choosing qparams, so every rank gets the qparams of the
whole calibration set. Then a short QAT fine-tune under ``DistributedDataParallel`` keeps the
activation ranges identical across ranks at every step, and rank 0 alone writes the files.

Launch it with torchrun (any number of processes, gloo on CPU; see docs/distributed.md), or
plainly, and it starts 2 local processes itself. About 40 seconds on 2 busy CPU cores
(``--fast``, what CI runs: 600 training images for one epoch, 20 seconds):

    torchrun --nproc_per_node=2 examples/distributed_calibration.py [--fast] [--out DIR]
    python examples/distributed_calibration.py [--fast] [--mnist DIR | --cifar10 DIR] [--out DIR]

Expected output (AMD EPYC Zen 3, AVX2, 2 cores)::

    2 ranks calibrated on 16 batches in all; input scales identical on every rank and equal to
    one process on the whole set: True; accuracy 91.15%
    QAT: converted models identical on every rank: True; reloaded from rank 0's files: True;
    accuracy 92.30%
"""

from __future__ import annotations

import argparse
import os
import socket
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset

import lowbit
from lowbit.data import add_dataset_arguments, splits_and_model
from lowbit.distributed import on_rank0, unwrap
from lowbit.models import train_classifier


def same_on_every_rank(t: torch.Tensor) -> bool:
    """True when ``t`` is bit-identical on every rank."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return all(torch.equal(p, parts[0]) for p in parts)


def input_scales(qmodel: torch.nn.Module) -> torch.Tensor:
    return torch.stack([m.input_scale.reshape(()) for m in qmodel.modules()
                        if hasattr(m, "input_scale")])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true",
                        help="small training and evaluation sets (what CI runs)")
    add_dataset_arguments(parser)
    parser.add_argument("--out", metavar="DIR", default=None,
                        help="where rank 0 writes the quantized models (default: a temporary "
                             "folder; under torchrun: ./lowbit_out)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace, out: Path) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    splits, make_model = splits_and_model(args.mnist, args.cifar10)
    torch.manual_seed(0)  # the same float model on every rank
    n_train, epochs = (600, 1) if args.fast else (2000, 2)
    model = train_classifier(make_model(), Subset(splits.train, range(n_train)), epochs=epochs,
                             lr=2e-3, progress=False)
    evaluation = Subset(splits.eval, range(500)) if args.fast else splits.eval

    # 1. Sharded calibration: 1024 images, each rank sees 1024 / world of them.
    calib = Subset(splits.train, range(2000, 3024))
    loader = DataLoader(calib, batch_size=64, sampler=DistributedSampler(calib, shuffle=False))
    qmodel = lowbit.quantize_static(model, loader, progress=False)
    scales = input_scales(qmodel)
    single = input_scales(lowbit.quantize_static(model, DataLoader(calib, batch_size=64),
                                                 progress=False, sync=False))
    ok = same_on_every_rank(scales) and torch.equal(scales, single)
    if rank == 0:
        print(f"{world} ranks calibrated on {qmodel.lowbit_report.num_calibration_batches} "
              f"batches in all; input scales identical on every rank and equal to one process "
              f"on the whole set: {ok}; accuracy "
              f"{lowbit.evaluate_accuracy(qmodel, evaluation):.2f}%")
    on_rank0(lowbit.save, qmodel, out / "ptq_int8")

    # 2. QAT under DDP: activation ranges all-reduced every step (QATConfig.sync_every=1).
    preparer = lowbit.QATPreparer(lowbit.QATConfig(sync_every=1))
    ddp = DistributedDataParallel(preparer.prepare_for_qat(model).train())
    optimizer = torch.optim.Adam(ddp.parameters(), lr=1e-4)
    train = Subset(splits.train, range(3024, 3536 if args.fast else 4048))
    for images, labels in DataLoader(train, batch_size=32, sampler=DistributedSampler(train)):
        optimizer.zero_grad()
        F.cross_entropy(ddp(images), labels).backward()
        optimizer.step()
    converted = preparer.convert_to_quantized(unwrap(ddp))
    x = splits.eval.tensors[0][:64]
    identical = same_on_every_rank(converted(x))
    on_rank0(lowbit.save, converted, out / "qat_int8")
    reloaded = lowbit.load(out / "qat_int8", model=make_model())  # what rank 0 wrote
    if rank == 0:
        print(f"QAT: converted models identical on every rank: {identical}; reloaded from rank "
              f"0's files: {torch.equal(reloaded(x), converted(x))}; accuracy "
              f"{lowbit.evaluate_accuracy(converted, evaluation):.2f}%")


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world))
    _run(args, Path(out))


def _run(args: argparse.Namespace, out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")  # reads MASTER_ADDR / MASTER_PORT / RANK / WORLD_SIZE
    try:
        main(args, out)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    arguments = parse_args()
    if "RANK" in os.environ:  # started by torchrun
        _run(arguments, Path(arguments.out or "lowbit_out"))
    else:
        with tempfile.TemporaryDirectory() as tmp, socket.socket() as s:
            s.bind(("127.0.0.1", 0))  # a free port for the rendezvous
            port = s.getsockname()[1]
            s.close()
            mp.spawn(_spawned, args=(2, port, arguments, arguments.out or tmp), nprocs=2)
