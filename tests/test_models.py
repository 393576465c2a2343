"""Tests for lowbit.models: shapes, layer types and a short deterministic training run."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

import lowbit
from lowbit.models import (
    MLP,
    CifarCNN,
    MnistCNN,
    TinyResNet,
    TransformerEncoderBlock,
    train_classifier,
)


def _count(model: nn.Module, kind: type) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def test_mnist_cnn_layers():
    model = MnistCNN()
    assert model(torch.zeros(3, 1, 28, 28)).shape == (3, 10)
    assert _count(model, nn.Conv2d) == 2 and _count(model, nn.BatchNorm2d) == 1
    assert _count(model, nn.Linear) == 2
    assert model.fc1.in_features % 32 == 0  # INT4 group size 32 divides it


def test_cifar_cnn_layers():
    model = CifarCNN()
    assert model(torch.zeros(3, 3, 32, 32)).shape == (3, 10)
    assert _count(model, nn.Conv2d) == 3 and _count(model, nn.BatchNorm2d) == 3
    assert _count(model, nn.Linear) == 2
    assert model.fc1.in_features % 32 == 0  # INT4 group size 32 divides it


W2A8 = lowbit.QuantizationConfig(weights=lowbit.QuantSpec(bits=2, granularity="per_channel"),
                                 activations=lowbit.QuantSpec(bits=8, symmetric=False),
                                 mode="static")


def test_cifar_cnn_quantizes_in_every_mode():
    """Dynamic / static INT8, INT4 weight-only, W2A8 and QAT: every conv and linear quantized
    (BN folded), outputs close to the float model's at 8 bits."""
    torch.manual_seed(0)
    model = CifarCNN().eval()
    x = torch.randn(16, 3, 32, 32)
    calibration = list(x.split(8))
    with torch.no_grad():
        ref = model(x)
    qat = lowbit.QATPreparer(lowbit.QuantizationConfig.int8_static())
    prepared = qat.prepare_for_qat(model).train()
    prepared(x)
    models = {
        "dynamic": lowbit.quantize_dynamic(model),
        "static": lowbit.quantize_static(model, calibration, progress=False),
        "int4": lowbit.quantize_weight_only(model, bits=4, group_size=32),
        "w2a8": lowbit.quantize_static(model, calibration, W2A8, progress=False),
        "qat": qat.convert_to_quantized(prepared.eval()),
    }
    for mode, qmodel in models.items():
        report = qmodel.lowbit_report
        assert set(report.quantized) == {"conv1", "conv2", "conv3", "fc1", "fc2"}, mode
        with torch.inference_mode():
            out = qmodel(x)
        assert out.shape == (16, 10) and torch.isfinite(out).all(), mode
        if mode in ("dynamic", "static"):
            cos = torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0)
            assert cos > 0.99, (mode, float(cos))


def test_mlp_default_shape():
    model = MLP()
    widths = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert widths == [(784, 1024), (1024, 1024), (1024, 10)]
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_transformer_block_is_linear_based_and_masks():
    block = TransformerEncoderBlock().eval()
    assert _count(block, nn.Linear) == 6 and _count(block, nn.MultiheadAttention) == 0
    x = torch.randn(2, 7, 384)
    mask = torch.ones(2, 7, dtype=torch.bool)
    with torch.no_grad():
        assert torch.allclose(block(x), block(x, mask), atol=1e-5)
        mask[:, 5:] = False  # padding must not change the unpadded tokens' outputs
        short = block(x[:, :5])
        assert torch.allclose(block(x, mask)[:, :5], short, atol=1e-4)
    with pytest.raises(ValueError, match="heads=5 must divide hidden=384"):
        TransformerEncoderBlock(heads=5)


def test_tiny_resnet_residuals():
    model = TinyResNet(in_channels=1, width=8)
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    assert isinstance(model.layer1.shortcut, nn.Identity)
    assert isinstance(model.layer2.shortcut, nn.Sequential)  # 1x1 conv-BN projection


def _toy_data() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 2, generator=g)
    return TensorDataset(x, (x[:, 0] > x[:, 1]).long())


def _train(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 2))
    return train_classifier(model, _toy_data(), epochs=3, batch_size=32, lr=1e-2, seed=seed,
                            progress=False)


def test_train_classifier_learns_and_is_deterministic():
    a, b = _train(0), _train(0)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)
    x, y = _toy_data().tensors
    with torch.no_grad():
        assert (a(x).argmax(1) == y).float().mean() > 0.9
    assert not a.training


def test_train_classifier_does_not_touch_global_rng():
    model = nn.Sequential(nn.Dropout(0.5), nn.Linear(2, 2))
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    train_classifier(model, _toy_data(), epochs=1, batch_size=64, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_train_classifier_validates():
    with pytest.raises(ValueError, match="epochs=0"):
        train_classifier(nn.Linear(2, 2), _toy_data(), epochs=0)
