"""Per-layer control: overrides, FP32 fallback and mixed INT8 / INT4 precision.

``QuantizationConfig.layer_overrides`` maps layer names or glob patterns to another config, or to
``None`` to keep a layer in FP32; ``skip_layers`` keeps layers in FP32 too. Every quantize call
reports what happened to each layer. Runs in about 20 seconds on 2 idle CPU cores (``--fast``,
what CI runs: a few seconds):

    python examples/per_layer_config.py [--fast] [--mnist DIR | --cifar10 DIR]

Expected output (AMD EPYC Zen 3, AVX2, 2 cores; each model is followed by its per-layer table)::

    FP32: 98.35%, 808.5 KiB
    ## INT8 static, conv1 + fc2 in FP32: 98.30%, 208.2 KiB
    | conv1 | Conv2d | fp32 (requested) | kept in FP32 by skip_layers |  |
    ...
    ## INT8 static + INT4 fc1: 98.35%, 154.1 KiB
    | fc1 | Linear | quantized | W4 per_group/32, float activations | ReLU |
    ...
    ## conv* dynamic INT8, fc* INT4: 98.15%, 153.7 KiB
    ...
    set_per_layer_fallback('fc2'): kept in FP32 -> ['fc2']
"""

from __future__ import annotations

import argparse

import torch
from torch.utils.data import Subset

from lowbit.config import QuantizationConfig
from lowbit.data import add_dataset_arguments, splits_and_model
from lowbit.evaluation import evaluate_accuracy, format_bytes, model_nbytes
from lowbit.models import train_classifier
from lowbit.ptq import PTQQuantizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fast", action="store_true",
                        help="small training and evaluation sets (what CI runs, a few seconds)")
    add_dataset_arguments(parser)
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    splits, make_model = splits_and_model(args.mnist, args.cifar10)
    torch.manual_seed(0)
    train = Subset(splits.train, range(3000)) if args.fast else splits.train
    model = train_classifier(make_model(), train, epochs=1 if args.fast else 2, lr=2e-3,
                             progress=False)
    calibration = list(splits.train.tensors[0][:512].split(64))
    print(splits.description)
    print(f"FP32: {evaluate_accuracy(model, splits.eval):.2f}%, "
          f"{format_bytes(model_nbytes(model))}\n")

    configs = {
        # Keep the first conv (few weights, sensitive raw-pixel input) and the classifier in
        # FP32: a common recipe for accuracy-critical layers.
        "INT8 static, conv1 + fc2 in FP32": QuantizationConfig.int8_static(
            skip_layers=("conv1",), layer_overrides={"fc2": None}),
        # Mixed precision: the big fully connected layer (97% of the weights) in INT4
        # weight-only, the rest INT8 static.
        "INT8 static + INT4 fc1": QuantizationConfig.int8_static(
            layer_overrides={"fc1": QuantizationConfig.int4_weight_only(group_size=32)}),
        # Glob patterns: every conv dynamic INT8, every fc INT4 weight-only.
        "conv* dynamic INT8, fc* INT4": QuantizationConfig.int8_dynamic(
            layer_overrides={"fc*": QuantizationConfig.int4_weight_only(group_size=32)}),
    }
    for title, config in configs.items():
        quantizer = PTQQuantizer(config, progress=False)
        qmodel = quantizer.quantize(model, calibration)
        print(f"## {title}: {evaluate_accuracy(qmodel, splits.eval):.2f}%, "
              f"{format_bytes(model_nbytes(qmodel))}\n")
        print(qmodel.lowbit_report.to_markdown(), "\n")

    # The quantizer can also keep a layer in FP32 imperatively, e.g. after a sensitivity scan.
    quantizer = PTQQuantizer(QuantizationConfig.int8_static(), progress=False)
    quantizer.set_per_layer_fallback("fc2", True)
    qmodel = quantizer.quantize(model, calibration)
    print(f"set_per_layer_fallback('fc2'): kept in FP32 -> {qmodel.lowbit_report.fp32}")


if __name__ == "__main__":
    main()
