"""End to end on real MNIST (bundled 10k test set: first 8,000 train/calibrate, last 2,000 eval).

Bounds from the PTQ issue: FP32 >= 97%; INT8 dynamic and static drop <= 0.5 points; INT4
weight-only drop <= 1.5 points; INT8 weights of the quantized layers >= 3.9x smaller.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.data import DataLoader, Subset

from lowbit.data import mnist_splits
from lowbit.evaluation import evaluate_accuracy
from lowbit.models import MnistCNN, train_classifier
from lowbit.ptq import quantize_dynamic, quantize_static, quantize_weight_only


@pytest.fixture(scope="module")
def trained():
    splits = mnist_splits()
    torch.manual_seed(0)
    model = train_classifier(MnistCNN(), splits.train, epochs=3, batch_size=64, seed=0,
                             progress=False)
    return model, splits, evaluate_accuracy(model, splits.eval)


def _float_weight_bytes(model: torch.nn.Module, names: list[str]) -> int:
    return sum(model.get_submodule(n).weight.numel() * 4 for n in names)


def test_fp32_baseline(trained) -> None:
    _, _, acc = trained
    assert acc >= 97.0, f"FP32 accuracy {acc:.2f}% on the 2,000 held-out images"


def test_int8_dynamic_drop(trained) -> None:
    model, splits, acc = trained
    q = quantize_dynamic(model)
    qacc = evaluate_accuracy(q, splits.eval)
    assert acc - qacc <= 0.5, f"dynamic INT8: {qacc:.2f}% vs FP32 {acc:.2f}%"
    names = q.lowbit_report.quantized
    assert len(names) == 4
    int8_bytes = sum(q.get_submodule(n).qweight.numel() for n in names)
    assert _float_weight_bytes(model, names) / int8_bytes >= 3.9


def test_int8_static_drop(trained) -> None:
    model, splits, acc = trained
    original = copy.deepcopy(model.state_dict())
    calib = DataLoader(Subset(splits.train, range(512)), batch_size=64)
    q = quantize_static(model, calib, progress=False)
    qacc = evaluate_accuracy(q, splits.eval)
    assert acc - qacc <= 0.5, f"static INT8: {qacc:.2f}% vs FP32 {acc:.2f}%"
    assert q.lowbit_report.quantized == ["conv1", "conv2", "fc1", "fc2"]
    assert q.lowbit_report.rows[0].folded_bn == "bn1"
    for k, v in model.state_dict().items():  # BN folding happened on the copy only
        assert torch.equal(v, original[k])


def test_int4_weight_only_drop(trained) -> None:
    model, splits, acc = trained
    q = quantize_weight_only(model, bits=4, group_size=32)
    qacc = evaluate_accuracy(q, splits.eval)
    assert acc - qacc <= 1.5, f"INT4 weight-only: {qacc:.2f}% vs FP32 {acc:.2f}%"
    assert q.fc1.qweight.dtype == torch.uint8
