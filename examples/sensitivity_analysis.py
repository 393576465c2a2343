"""Sensitivity analysis and automatic FP32 fallback to an accuracy budget, with a report.

Quantize one layer at a time to find the layers that hurt most, then let lowbit keep just
enough of them in FP32 to stay within a budget, and write an HTML/markdown report with plots.
Runs in about 30 seconds on 2 CPU cores:

    python examples/sensitivity_analysis.py [REPORT_DIR]
"""

from __future__ import annotations

import sys
import tempfile

import torch

import lowbit
from lowbit.data import mnist_splits
from lowbit.models import MnistCNN, train_classifier


def main(report_dir: str | None = None) -> None:
    splits = mnist_splits()
    torch.manual_seed(0)
    model = train_classifier(MnistCNN(), splits.train, epochs=2, lr=2e-3, progress=False)
    calibration = list(splits.train.tensors[0][:512].split(64))

    def accuracy(m: torch.nn.Module) -> float:
        return lowbit.evaluate_accuracy(m, splits.eval)

    # An aggressive scheme so that layers differ: 4-bit weights, 8-bit static activations.
    config = lowbit.QuantizationConfig(
        weights=lowbit.QuantSpec(bits=4, granularity="per_channel"),
        activations=lowbit.QuantSpec(bits=8, symmetric=False), mode="static")
    sens = lowbit.analyze_sensitivity(model, config, eval_fn=accuracy,
                                      calibration_data=calibration, progress=False,
                                      metric_name="accuracy")
    print(sens.to_markdown())
    print("most sensitive:", sens.most_sensitive(2))

    qmodel, fallback = lowbit.auto_fallback(model, config, accuracy, calibration, budget=0.2,
                                            sensitivity=sens, progress=False)
    print(f"kept in FP32 to stay within 0.2 points: {fallback or 'none'}")

    rows = lowbit.compare_models({"FP32": model, "W4A8 + fallback": qmodel}, splits.eval,
                                 example_inputs={"b1": splits.eval.tensors[0][:1]})
    out = report_dir or tempfile.mkdtemp(prefix="lowbit-report-")
    page = lowbit.report(out, comparison=rows, quantized_model=qmodel, sensitivity=sens)
    print(f"report written to {page}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
