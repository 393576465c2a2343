"""Register a custom calibrator and compare calibration strategies on the same model.

A calibrator watches one layer's input during calibration and then proposes its range. Here we
add ``mean_std`` (clip at mean +- k standard deviations) next to the built-ins and compare
accuracy and output error. Runs in about 30 seconds on 2 CPU cores:

    python examples/custom_calibrator.py
"""

from __future__ import annotations

import math
from typing import Any

import torch

from lowbit.calibrators import MinMaxCalibrator, register_calibrator
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.data import mnist_splits
from lowbit.evaluation import compare_outputs, evaluate_accuracy
from lowbit.models import MnistCNN, train_classifier
from lowbit.ptq import quantize_static


@register_calibrator("mean_std")
class MeanStdCalibrator(MinMaxCalibrator):
    """Range = mean +- k * std of every value seen, kept inside the observed min / max.

    It extends the min-max calibrator (which keeps ``min_val`` / ``max_val``) with running sums.
    All state lives in buffers, so ``state_dict`` and ``merge`` (sharded calibration) work.
    """

    granularities = ("per_tensor",)

    def __init__(self, spec: QuantSpec | None = None, *, tensor_name: str = "tensor",
                 k: float = 6.0, **kwargs: Any) -> None:
        self.k = float(k)
        super().__init__(spec, tensor_name=tensor_name, **kwargs)

    def _init_state(self, device: torch.device) -> None:
        super()._init_state(device)
        for name in ("count", "total", "total_sq"):
            self.register_buffer(name, torch.zeros((), dtype=torch.float64, device=device))

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, first: bool) -> None:
        super()._observe(x, lo, hi, first)
        x = x.double()
        self.count += x.numel()
        self.total += x.sum()
        self.total_sq += (x * x).sum()

    def _merge(self, other: MinMaxCalibrator) -> None:
        super()._merge(other)
        for name in ("count", "total", "total_sq"):
            getattr(self, name).add_(getattr(other, name))

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        mean = float(self.total / self.count)
        std = math.sqrt(max(float(self.total_sq / self.count) - mean * mean, 0.0))
        lo = torch.maximum(self.min_val, torch.tensor(mean - self.k * std))
        hi = torch.minimum(self.max_val, torch.tensor(mean + self.k * std))
        return lo, hi


def main() -> None:
    splits = mnist_splits()
    torch.manual_seed(0)
    model = train_classifier(MnistCNN(), splits.train, epochs=2, lr=2e-3, progress=False)
    calibration = list(splits.train.tensors[0][:512].split(64))  # a list of input tensors
    eval_x = splits.eval.tensors[0][:256]
    with torch.inference_mode():
        reference = model(eval_x)

    print(splits.description)
    print(f"FP32 accuracy {evaluate_accuracy(model, splits.eval):.2f}%\n")
    print("| calibrator | options | accuracy | logits cosine | fc1 input range |")
    print("|---|---|---|---|---|")
    strategies = [("minmax", {}), ("moving_average", {}), ("percentile", {"percentile": 99.99}),
                  ("entropy", {}), ("mse", {}), ("mean_std", {"k": 6.0}), ("mean_std", {"k": 3.0})]
    for name, kwargs in strategies:
        config = QuantizationConfig.int8_static(calibrator=name, calibrator_kwargs=kwargs)
        qmodel = quantize_static(model, calibration, config, progress=False)
        with torch.inference_mode():
            cosine = compare_outputs(reference, qmodel(eval_x)).cosine
        lo, hi = qmodel.lowbit_report.calibration["fc1"].range  # the clipping range chosen
        print(f"| {name} | {kwargs or '-'} | {evaluate_accuracy(qmodel, splits.eval):.2f}% | "
              f"{cosine:.5f} | [{lo:.2f}, {hi:.2f}] |")


if __name__ == "__main__":
    main()
