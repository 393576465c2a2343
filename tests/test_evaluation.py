"""Tests for lowbit.evaluation: accuracy, sizes, latency and output errors on known inputs."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowbit.evaluation import (
    ComparisonTable,
    LatencyStats,
    compare_models,
    compare_outputs,
    evaluate_accuracy,
    format_bytes,
    measure_latency,
    model_nbytes,
    quantized_weight_nbytes,
)


def _data() -> TensorDataset:
    return TensorDataset(torch.eye(4), torch.tensor([0, 1, 3, 3]))


def test_accuracy_dataset_and_loader_and_mode_restored():
    model = nn.Sequential(nn.Identity())
    model.train()
    assert evaluate_accuracy(model, _data()) == 75.0
    assert evaluate_accuracy(model, DataLoader(_data(), batch_size=3)) == 75.0
    assert model.training
    with pytest.raises(ValueError, match="no sample"):
        evaluate_accuracy(model, [])


def test_accuracy_reads_column_labels_and_refuses_other_shapes() -> None:
    """(B, 1) labels broadcast against (B,) predictions counted B x B hits (100% here, 3 of 4
    right); one-hot labels scored 18.75%. Now a column is read as indices, others refused."""
    x, y = torch.eye(4), torch.tensor([0, 1, 3, 3])
    assert evaluate_accuracy(nn.Identity(), [(x, y[:, None])]) == 75.0
    assert evaluate_accuracy(nn.Identity(), [(x, y.float())]) == 75.0
    with pytest.raises(ValueError, match=r"labels of shape \(4, 4\) do not match the "
                                         r"predictions \(4,\).*labels\.argmax\(-1\)"):
        evaluate_accuracy(nn.Identity(), [(x, nn.functional.one_hot(y, 4))])


def test_nbytes_known_modules():
    assert model_nbytes(nn.Linear(10, 4)) == (40 + 4) * 4
    assert model_nbytes(nn.Linear(10, 4, bias=False).half()) == 40 * 2
    conv = nn.Conv2d(3, 8, 3)  # 8*3*3*3 + 8 floats
    assert model_nbytes(conv) == (216 + 8) * 4
    bn = nn.BatchNorm2d(8)  # weight, bias, running mean, running var, int64 counter
    assert model_nbytes(bn) == 4 * 8 * 4 + 8


def test_nbytes_counts_tied_weights_once_and_skips_non_persistent():
    emb = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = emb.weight
    assert model_nbytes(nn.ModuleList([emb, head])) == 40 * 4
    m = nn.Module()
    m.register_buffer("codes", torch.zeros(16, 8, dtype=torch.int8))
    m.register_buffer("scale", torch.ones(16))
    m.register_buffer("cache", torch.zeros(1000), persistent=False)
    assert model_nbytes(m) == 128 + 64
    assert quantized_weight_nbytes(m) == 128


@pytest.mark.filterwarnings("ignore")
def test_nbytes_torch_ao_dynamic():
    from torch.ao.quantization import quantize_dynamic

    q = quantize_dynamic(nn.Sequential(nn.Linear(64, 32)), {nn.Linear}, dtype=torch.qint8)
    assert quantized_weight_nbytes(q) == 64 * 32
    assert 64 * 32 <= model_nbytes(q) <= 64 * 32 + 32 * 4 + 64


def test_compare_outputs_known_values():
    ref = torch.tensor([3.0, 4.0])
    same = compare_outputs(ref, ref.clone())
    assert same.cosine == pytest.approx(1.0) and same.max_abs == 0 and same.rel_l2 == 0
    err = compare_outputs(ref, torch.tensor([4.0, 3.0]))
    assert err.cosine == pytest.approx(24 / 25)
    assert err.max_abs == 1.0 and err.rel_l2 == pytest.approx(math.sqrt(2) / 5)
    opposite = compare_outputs(ref, -ref)
    assert opposite.cosine == pytest.approx(-1.0)
    assert compare_outputs(torch.zeros(3), torch.zeros(3)).cosine == 1.0
    assert compare_outputs(torch.zeros(2), torch.ones(2)).rel_l2 == math.inf
    import numpy as np

    assert compare_outputs(np.ones((2, 2)), torch.ones(2, 2)).cosine == pytest.approx(1.0)
    with pytest.raises(ValueError, match=r"shape \(3,\), candidate \(4,\); compare outputs of "
                                         "the same input"):
        compare_outputs(torch.ones(3), torch.ones(4))
    with pytest.raises(ValueError, match="same input and layout"):  # (same count: a transpose
        compare_outputs(torch.ones(2, 3), torch.ones(3, 2))  # would compare wrong elements)


def test_latency_positive_and_threads_restored():
    before = torch.get_num_threads()
    stats = measure_latency(nn.Linear(32, 32), torch.randn(4, 32), warmup=1, iters=7, threads=1)
    assert stats.iters == 7 and len(stats.samples_ms) == 7 and stats.threads == 1
    assert 0 < stats.min_ms <= stats.median_ms <= stats.p90_ms
    assert torch.get_num_threads() == before
    # tuple and dict inputs
    bilinear = nn.Bilinear(4, 4, 2)
    x = torch.randn(2, 4)
    assert measure_latency(bilinear, (x, x), warmup=0, iters=1).median_ms > 0
    assert measure_latency(lambda a: a * 2, {"a": x}, warmup=0, iters=1).median_ms > 0
    with pytest.raises(ValueError, match="iters=0"):
        measure_latency(bilinear, (x, x), iters=0)
    with pytest.raises(ValueError, match="threads=0"):
        measure_latency(bilinear, (x, x), threads=0)


def test_latency_stats_percentiles():
    stats = LatencyStats.from_samples([float(i) for i in range(1, 11)], threads=2)
    assert (stats.min_ms, stats.median_ms, stats.p90_ms, stats.mean_ms) == (1.0, 5.5, 9.0, 5.5)


def test_compare_models_table():
    torch.manual_seed(0)
    fp32 = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    fp16 = nn.Sequential(nn.Flatten(), nn.Linear(4, 4))
    fp16.load_state_dict(fp32.state_dict())
    fp16.half()
    models = {"fp32": fp32, "fp16": lambda x: fp16(x.half()).float()}
    table = compare_models(models, _data(), {"b1": torch.eye(4)[:1], "b4": torch.eye(4)},
                           warmup=1, iters=4, rounds=2, sizes={"fp16": model_nbytes(fp16)})
    assert isinstance(table, ComparisonTable) and [r.name for r in table] == ["fp32", "fp16"]
    base, half = table
    assert base.accuracy_drop == 0.0 and base.compression == 1.0
    assert half.compression == 2.0 and half.output_error.cosine > 0.999
    assert set(half.latency) == {"b1", "b4"} and len(half.latency["b1"].samples_ms) == 4
    assert all(s > 0 for s in half.speedup.values())
    md = table.to_markdown()
    for column in ("accuracy", "drop", "size", "compression", "latency b1", "speedup b4"):
        assert column in md
    assert "samples_ms" not in str(table.to_dict())
    with pytest.raises(ValueError, match="models is empty"):
        compare_models({}, None)


def test_format_bytes():
    assert format_bytes(1023) == "1023 B" and format_bytes(2048) == "2.0 KiB"


def test_evaluating_mid_training_leaves_the_model_trainable() -> None:
    """A module that builds a cache in forward (as rotary embeddings do) kept it as an
    inference tensor when lowbit evaluated (or calibrated) under torch.inference_mode, and
    the next training step failed ("Inference tensors cannot be saved for backward")."""
    import lowbit
    from lowbit.qat import prepare_qat

    class Cached(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.out, self.cache = nn.Linear(8, 8), nn.Linear(8, 2), None

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if self.cache is None:
                self.cache = torch.linspace(0.5, 1.5, x.shape[1]).unsqueeze(-1)
            return self.out(self.fc(x) * self.cache).mean(1)

    data = TensorDataset(torch.randn(16, 6, 8), torch.randint(0, 2, (16,)))
    qat = prepare_qat(Cached(), lowbit.QuantizationConfig.int8_static()).train()
    evaluate_accuracy(qat, data)
    qat(torch.randn(4, 6, 8)).pow(2).mean().backward()  # raised before
    assert qat.fc.base_layer.weight.grad is not None
    calibrated = lowbit.quantize_static(Cached().eval(), [torch.randn(2, 6, 8)], progress=False)
    x = torch.randn(2, 6, 8, requires_grad=True)
    calibrated(x).sum().backward()  # an input gradient through the calibrated cache
    assert x.grad is not None


def test_evaluation_gives_every_submodule_its_own_mode_back() -> None:
    """A model training with a frozen (eval-mode) BatchNorm: evaluation used to end with
    ``model.train()``, which switched that BatchNorm back to training."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)).train()
    model[1].eval()
    data = TensorDataset(torch.randn(8, 4), torch.randint(0, 2, (8,)))
    evaluate_accuracy(model, data)
    assert model.training and model[0].training and not model[1].training


def test_nbytes_counts_each_meta_tensor() -> None:
    """Meta tensors have no storage (data_ptr 0): they had counted as one tied tensor."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64), nn.Linear(64, 64))
    assert model_nbytes(model) == 3 * (64 * 64 + 64) * 4


def test_accuracy_refuses_one_logit_per_sample() -> None:
    """argmax over one logit is always 0: a perfect binary classifier had scored ~50%."""
    x = torch.randn(100, 1)
    data = TensorDataset(x, (x > 0).long())
    with pytest.raises(ValueError, match="one value per sample"):
        evaluate_accuracy(nn.Identity(), data)
