"""Quickstart: static INT8 post-training quantization of a small CNN on real MNIST.

Train (or load) a float model, give lowbit a few hundred calibration images, quantize, check
accuracy and size, save and load it back. Runs in about 20 seconds on 2 idle CPU cores
(``--fast``, what CI runs: a few seconds, 3,000 training images for one epoch):

    python examples/ptq_quickstart.py [--fast] [--mnist DIR | --cifar10 DIR]

Expected output (AMD EPYC Zen 3, AVX2, 2 cores)::

    MNIST (bundled real 10,000-image test set): the first 8,000 images for training/...
    | layer | type | status | scheme / reason | fused |
    |---|---|---|---|---|
    | conv1 | Conv2d | quantized | W8 per_channel, A8 per_tensor calibrated (percentile) | ...
    ...
    FP32 98.35% (808.5 KiB) -> INT8 98.35% (204.1 KiB)
    saved and reloaded: identical outputs
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from torch.utils.data import DataLoader, Subset

from lowbit.config import QuantizationConfig
from lowbit.data import add_dataset_arguments, splits_and_model
from lowbit.evaluation import evaluate_accuracy, format_bytes, model_nbytes
from lowbit.models import train_classifier
from lowbit.ptq import quantize_static
from lowbit.serialization import load, save


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true",
                        help="small training and evaluation sets (what CI runs, a few seconds)")
    add_dataset_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    # 1. Data: the bundled real MNIST test set, first 8,000 images to train/calibrate, last 2,000
    #    to evaluate; --mnist DIR / --cifar10 DIR read the full MNIST / CIFAR-10 files instead.
    splits, make_model = splits_and_model(args.mnist, args.cifar10)
    print(splits.description)

    # 2. A trained float model. Use your own; here we train MnistCNN (or CifarCNN) for two epochs.
    torch.manual_seed(0)
    train = Subset(splits.train, range(min(3000, len(splits.train)))) if args.fast else splits.train
    model = train_classifier(make_model(), train, epochs=1 if args.fast else 2, lr=2e-3,
                             progress=False)

    # 3. Calibration data: any iterable of batches. A DataLoader of (images, labels) works;
    #    lowbit feeds the first item of each tuple to the model. 512 images are plenty.
    calibration = DataLoader(Subset(splits.train, range(512)), batch_size=64)

    # 4. Config: INT8 per-channel weights, INT8 per-tensor activations whose range is chosen by
    #    the percentile calibrator (clips the 0.01% most extreme values).
    config = QuantizationConfig.int8_static(calibrator="percentile",
                                            calibrator_kwargs={"percentile": 99.99})
    qmodel = quantize_static(model, calibration, config, progress=False)
    print(qmodel.lowbit_report.to_markdown())  # which layers were quantized, and how

    # 5. Evaluate: accuracy and size against the float model.
    fp32_acc = evaluate_accuracy(model, splits.eval)
    int8_acc = evaluate_accuracy(qmodel, splits.eval)
    print(f"FP32 {fp32_acc:.2f}% ({format_bytes(model_nbytes(model))}) -> "
          f"INT8 {int8_acc:.2f}% ({format_bytes(model_nbytes(qmodel))})")

    # 6. Save (safetensors + JSON manifest, no pickle) and load into a fresh float skeleton.
    with tempfile.TemporaryDirectory() as folder:
        save(qmodel, f"{folder}/int8")
        restored = load(f"{folder}/int8", model=make_model())
    x = splits.eval.tensors[0][:8]
    with torch.inference_mode():
        assert torch.equal(restored(x), qmodel(x))
    print("saved and reloaded: identical outputs")


if __name__ == "__main__":
    main()
