"""Backends: list them, compare them on real models, pick the best, switch, run in ONNX Runtime.

A quantized lowbit model runs on several backends (``lowbit.backends``): ``reference`` (pure
PyTorch, the expected numbers), ``native`` (lowbit's kernels for this CPU, the default),
``torch`` (PyTorch's integer ops), ``cuda``, ``onnxruntime``, ``torch.compile`` and
``aotinductor`` (``torch.export`` compiled ahead of time). This script
prints which run here, times them on an MNIST CNN (static INT8) and a transformer encoder block
(dynamic INT8), selects the fastest that matches the reference, switches, and checks the ONNX
Runtime session against lowbit on real MNIST images (or CIFAR-10's with ``--cifar10 DIR``):

    python examples/backend_selection.py [--fast] [--mnist DIR | --cifar10 DIR]

``--fast`` (what CI runs) trains on 2,000 images, times 3 calls per backend and leaves out
``torch.compile`` and ``aotinductor`` (they compile for a while).

Expected output (AMD EPYC Zen 3, AVX2, 2 shared cores, ``--fast``; timings vary run to run)::

    | backend | kind | available | runs here | exactness vs reference |
    | reference | layer | yes | pure PyTorch ops, any device | defines the expected numbers |
    | native | layer | yes | ISA path avx2: INT8 GEMM s8_avx2, INT4 u4_avx2 (small M), ...
    ...
    MNIST CNN, static INT8:
    | backend | p50 ms | p90 ms | samples/s | max abs dev | rel dev | cosine | same bits |
    | onnxruntime | 15.250 | 15.422 | 2,098 | 0.0101 | 0.00124 | 1.000000 | no |
    | native | 41.262 | 101.537 | 776 | 0 | 0 | 1.000000 | yes |
    ...
    selected: onnxruntime (fastest with rel dev <= 0.01)
    native vs reference inside use('reference'): identical = True
    ONNX Runtime vs lowbit on 256 MNIST images: argmax agreement 100.00%, max abs diff 0.0189
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import DataLoader, Subset

from lowbit import backends
from lowbit.data import add_dataset_arguments, splits_and_model
from lowbit.models import TransformerEncoderBlock, train_classifier
from lowbit.ptq import quantize_dynamic, quantize_static


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true",
                        help="small training set, few timed calls, no torch.compile (CI)")
    add_dataset_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    fast = args.fast
    # 1. What runs here, and why not where it does not.
    print(backends.available().to_markdown(), "\n")

    # 2. A real model: the MNIST CNN (CifarCNN with --cifar10), trained briefly, quantized to
    #    static INT8.
    splits, make_model = splits_and_model(args.mnist, args.cifar10)
    dataset = "CIFAR-10" if args.cifar10 else "MNIST"
    torch.manual_seed(0)
    train = Subset(splits.train, range(2000)) if fast else splits.train
    model = train_classifier(make_model(), train, epochs=1 if fast else 2, lr=2e-3, progress=False)
    calibration = DataLoader(Subset(splits.train, range(256)), batch_size=64)
    qmodel = quantize_static(model, calibration, progress=False)
    images = splits.eval.tensors[0]

    # 3. Compare every backend on a batch of 32 (latency, throughput, agreement with the
    #    reference) and select the fastest within 1% (relative max deviation) of it.
    iters = 3 if fast else 30
    names = None if not fast else ["reference", "native", "torch", "cuda", "onnxruntime"]
    best = backends.select_best(qmodel, images[:32], tolerance=1e-2, backends=names,
                                warmup=2, iters=iters)
    print(f"{dataset} CNN, static INT8:\n" + best.to_markdown(), "\n")

    # 4. Switch to it: a layer backend switches qmodel in place, a model backend (ONNX Runtime,
    #    torch.compile, AOTInductor, CUDA) returns a module called like qmodel.
    runner = backends.set_backend(qmodel, best.name, images[:32])
    if runner is qmodel:
        backends.set_backend(qmodel, "native")  # back to the default for what follows

    # 5. Switch at run time: a block on another layer backend gives the same bits (INT8 x INT8).
    x = images[:8]
    with torch.inference_mode():
        y = qmodel(x)
        with backends.use("reference"):
            y_ref = qmodel(x)
    print(f"native vs reference inside use('reference'): identical = {torch.equal(y, y_ref)}")

    # 6. ONNX Runtime: export, run in an InferenceSession, compare on the evaluation images.
    n = 256 if fast else len(images)
    ort = runner if best.name == "onnxruntime" else backends.set_backend(
        qmodel, "onnxruntime", images[:32])
    with torch.inference_mode():
        ours = torch.cat([qmodel(images[i:i + 500]) for i in range(0, n, 500)])
        theirs = torch.cat([ort(images[i:i + 500]) for i in range(0, n, 500)])
    agree = float((ours.argmax(1) == theirs.argmax(1)).float().mean()) * 100
    print(f"ONNX Runtime vs lowbit on {n} {dataset} images: argmax agreement {agree:.2f}%, "
          f"max abs diff {float((ours - theirs).abs().max()):.4f}")

    # 7. A transformer encoder block (MiniLM-sized), dynamic INT8.
    block = TransformerEncoderBlock(hidden=384 if not fast else 128, heads=4).eval()
    qblock = quantize_dynamic(block)
    tokens = torch.randn(8, 32, block.query.in_features)
    table = backends.compare(qblock, tokens, ["reference", "native", "torch"] if fast else None,
                             warmup=2, iters=iters)
    print("\nTransformer encoder block, dynamic INT8:\n" + table.to_markdown())


if __name__ == "__main__":
    main()
