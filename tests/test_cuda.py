"""Quantized models on CUDA (skipped without a GPU): ``.to("cuda")`` runs them there, close to CPU.

The C kernels and the output pool are CPU-only; on CUDA the modules take the PyTorch paths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.config import QuantizationConfig
from lowbit.lora import add_lora, lora_parameters
from lowbit.models import MLP, MnistCNN, TransformerEncoderBlock
from lowbit.ptq import quantize_dynamic, quantize_static, quantize_weight_only
from lowbit.qat import convert_qat, prepare_qat
from lowbit.serialization import load, save

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _quantize(model: nn.Module, method: str, example: torch.Tensor) -> nn.Module:
    if method == "dynamic":
        return quantize_dynamic(model)
    if method == "static":
        return quantize_static(model, [example], progress=False)
    if method == "int4":
        return quantize_weight_only(model, bits=4, group_size=32)
    return quantize_weight_only(model, bits=8)


@needs_cuda
@pytest.mark.parametrize("method", ["dynamic", "static", "int4", "int8_weight_only"])
@pytest.mark.parametrize("which", ["mlp", "cnn", "encoder"])
def test_quantized_models_run_on_cuda(which: str, method: str) -> None:
    torch.manual_seed(0)
    model, x = {
        "mlp": lambda: (MLP(), torch.randn(32, 1, 28, 28)),
        "cnn": lambda: (MnistCNN(), torch.randn(32, 1, 28, 28)),
        "encoder": lambda: (TransformerEncoderBlock(hidden=64, heads=4, ffn=128),
                            torch.randn(4, 24, 64)),
    }[which]()
    q = _quantize(model.eval(), method, x)
    with torch.inference_mode():
        ref = q(x)
        qc = copy.deepcopy(q).to("cuda")
        y = qc(x.cuda())
        assert y.is_cuda and y.shape == ref.shape and y.dtype == ref.dtype
        cos = torch.nn.functional.cosine_similarity(y.cpu().flatten().double(),
                                                    ref.flatten().double(), dim=0)
        assert float(cos) > 0.999, (which, method, float(cos))
        for batch in (x[:1], x[:3]):  # small calls take other kernels on CPU
            yb = qc(batch.cuda())
            assert yb.is_cuda and torch.isfinite(yb).all()


@needs_cuda
@pytest.mark.parametrize("config", ["int8_static", "int4_weight_only"])
def test_qat_trains_and_converts_on_cuda(config: str) -> None:
    """prepare_qat on a CUDA model, a few optimizer steps there, convert, run the integer model
    on CUDA: it agrees with the fake-quantized model it came from."""
    torch.manual_seed(0)
    cfg = (QuantizationConfig.int8_static() if config == "int8_static"
           else QuantizationConfig.int4_weight_only(group_size=32))
    qat = prepare_qat(MnistCNN().cuda().train(), cfg)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 28, 28, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(qat(x), y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    qat.eval()
    converted = convert_qat(qat)
    with torch.inference_mode():
        a, b = qat(x), converted(x)
    assert b.is_cuda
    cos = nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
    assert float(cos) > 0.99, float(cos)


@needs_cuda
def test_lora_on_a_quantized_base_trains_on_cuda() -> None:
    torch.manual_seed(0)
    q = quantize_weight_only(MLP().eval(), bits=4, group_size=32)
    lq = add_lora(q, r=4).cuda()
    opt = torch.optim.Adam(lora_parameters(lq), lr=1e-2)
    x = torch.randn(32, 1, 28, 28, device="cuda")
    target = torch.randn(32, 10, device="cuda")
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(lq(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@needs_cuda
@pytest.mark.parametrize("method", ["dynamic", "static", "int4"])
def test_quantizing_a_cuda_model_keeps_it_on_cuda(method: str, tmp_path) -> None:
    """PTQ of a model already on CUDA (calibrating on CUDA batches) gives a CUDA model; saved and
    loaded back on CPU it gives the same outputs up to kernel rounding."""
    torch.manual_seed(0)
    model = MnistCNN().eval().cuda()
    x = torch.randn(32, 1, 28, 28, device="cuda")
    q = _quantize(model, method, x)
    devices = {t.device.type for t in [*q.parameters(), *q.buffers()]}
    assert devices == {"cuda"}, devices
    with torch.inference_mode():
        y = q(x)
        assert y.is_cuda
        save(q, tmp_path / "q")
        back = load(tmp_path / "q", model=MnistCNN())
        cpu = back(x.cpu())
    cos = nn.functional.cosine_similarity(cpu.flatten().double(), y.cpu().flatten().double(), 0)
    assert float(cos) > 0.999, float(cos)
