"""QLoRA-style adapters: frozen integer base, trainable float A/B, save/load round trip."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.lora import LoRALinear, add_lora, lora_parameters
from lowbit.modules import Int4Linear, Int8WeightOnlyLinear, QuantizedLinear
from lowbit.ptq import PTQQuantizer, quantize_dynamic, quantize_static, quantize_weight_only
from lowbit.serialization import describe, load, save


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                         nn.Linear(64, 8)).eval()


def _x(n: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def _quantize(method: str) -> nn.Module:
    model = _mlp()
    if method == "dynamic":
        return quantize_dynamic(model)
    if method == "static":
        return quantize_static(model, [_x(64, seed=s) for s in range(2)], progress=False)
    if method == "int4":
        return quantize_weight_only(model, bits=4, group_size=32)
    if method == "int8_weight_only":
        return quantize_weight_only(model, bits=8)
    if method == "mixed":  # INT4 first layer, INT8 dynamic middle, last layer kept in FP32
        cfg = QuantizationConfig.int8_dynamic(layer_overrides={
            "0": QuantizationConfig.int4_weight_only(group_size=32), "4": None})
        return PTQQuantizer(cfg, progress=False).quantize(model)
    raise AssertionError(method)


def _perturb(model: nn.Module, seed: int = 3) -> None:
    """Non-zero adapters (as after training), so round trips compare real updates."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_wraps_each_quantized_linear_kind() -> None:
    expected = {"dynamic": QuantizedLinear, "static": QuantizedLinear, "int4": Int4Linear,
                "int8_weight_only": Int8WeightOnlyLinear}
    for method, cls in expected.items():
        q = _quantize(method)
        lq = add_lora(q, r=4, alpha=8)
        assert [type(lq[i]) for i in (0, 2, 4)] == [LoRALinear] * 3, method
        assert type(lq[0].base) is cls and lq[0].scaling == 2.0
        assert lq[0].lora_A.shape == (4, 32) and lq[0].lora_B.shape == (64, 4)
        assert type(q[0]) is cls  # add_lora copies by default
        with torch.inference_mode():  # lora_B starts at zero: same outputs
            assert torch.equal(lq(_x()), q(_x())), method


def test_gradients_flow_only_to_adapters() -> None:
    q = _quantize("mixed")
    lq = add_lora(q, r=4)
    assert type(lq[4]) is nn.Linear  # the FP32 layer gets no adapter, and is frozen
    trainable = [n for n, p in lq.named_parameters() if p.requires_grad]
    assert trainable == ["0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    buffers = {k: v.clone() for k, v in lq.state_dict().items() if "lora" not in k}
    _perturb(lq)
    lq(_x()).square().mean().backward()
    for name, p in lq.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name
    after = lq.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in buffers.items())
    assert lq[0].base.qweight.dtype == torch.uint8 and lq[2].base.qweight.dtype == torch.int8


def test_backward_through_the_integer_base_uses_dequantized_weights() -> None:
    """The first adapter's gradient passes through layer 2's integer base: it must match the
    gradient of the same network written with dequantized float weights."""
    lq = add_lora(_quantize("dynamic"), r=4)
    _perturb(lq)
    x = _x()
    lq(x).sum().backward()
    got = lq[0].lora_A.grad.clone()

    def reference(x: torch.Tensor) -> torch.Tensor:
        for i in (0, 2, 4):
            layer = lq[i]
            b = layer.base
            x = (x @ b.dequantize_weight().T + b.bias
                 + x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling)
            x = F.relu(x) if layer.fused_relu else x
        return x

    lq.zero_grad()
    reference(x).sum().backward()
    assert lq[0].fused_relu and lq[2].fused_relu and not lq[4].fused_relu
    # not exact: run-time activation quantization flips a few ReLU masks in the forward pass
    assert F.cosine_similarity(got.flatten(), lq[0].lora_A.grad.flatten(), dim=0) > 0.99


def test_input_gradient_is_exact() -> None:
    layer = add_lora(quantize_dynamic(nn.Linear(32, 16)), r=4)
    _perturb(layer)
    x = _x().requires_grad_()
    v = torch.randn(16, 16, generator=torch.Generator().manual_seed(2))
    (layer(x) * v).sum().backward()
    w = layer.base.dequantize_weight() + layer.scaling * layer.lora_B @ layer.lora_A
    torch.testing.assert_close(x.grad, v @ w.detach())


def test_fused_relu_moves_after_the_update() -> None:
    q = _quantize("dynamic")
    assert q[0].fused_relu
    layer = add_lora(q, r=4)[0]
    assert layer.fused_relu and not layer.base.fused_relu
    _perturb(layer)
    x = _x()
    update = x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    with torch.inference_mode():
        assert torch.equal(layer(x), F.relu(layer.base(x) + update))


def test_training_lowers_the_loss() -> None:
    """Toy regression: the target is the float model with a low-rank change to its last layer;
    only the adapters train, the INT4 base stays fixed, and the loss falls."""
    model = _mlp()
    target = _mlp()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        target[4].weight += 0.5 * torch.randn(8, 1, generator=g) @ torch.randn(1, 64, generator=g)
    lq = add_lora(quantize_weight_only(model, bits=4, group_size=32), r=4, alpha=8)
    codes = lq[4].base.weight.clone()
    opt = torch.optim.Adam(lora_parameters(lq), lr=1e-2)
    x = torch.randn(256, 32, generator=g)
    with torch.no_grad():
        y = target(x)
    losses = []
    lq.train()
    for _ in range(60):
        opt.zero_grad()
        loss = F.mse_loss(lq(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0], losses[::10]
    assert torch.equal(lq[4].base.weight, codes)


def test_dropout_only_in_training() -> None:
    layer = add_lora(quantize_dynamic(nn.Linear(32, 16)), r=4, dropout=0.5)
    assert isinstance(layer, LoRALinear) and isinstance(layer.lora_dropout, nn.Dropout)
    _perturb(layer)
    x = _x()
    layer.train()
    assert not torch.equal(layer(x), layer(x))
    layer.eval()
    assert torch.equal(layer(x), layer(x))


def test_adapters_take_the_mode_of_the_model() -> None:
    """Quantized layers were left in training mode inside an eval model, and add_lora gave
    their adapters that mode: dropout ran in an eval model (two calls, two outputs)."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    for quantize in (quantize_dynamic, lambda m: quantize_weight_only(m, bits=4, group_size=16),
                     lambda m: quantize_static(m, [torch.randn(8, 16)], progress=False)):
        q = quantize(model)
        assert not any(m.training for m in q.modules())
        lq = add_lora(q, r=4, dropout=0.5)
        assert not any(m.training for m in lq.modules())
        with torch.no_grad():
            lq[0].lora_B.normal_()
            x = torch.randn(4, 16)
            assert torch.equal(lq(x), lq(x))
        lq.train()
        assert lq[0].lora_dropout.training


def test_target_modules_inplace_and_errors() -> None:
    q = _quantize("dynamic")
    lq = add_lora(q, target_modules=["2", "4"], r=2)
    assert [type(lq[i]).__name__ for i in (0, 2, 4)] == ["QuantizedLinear", "LoRALinear",
                                                         "LoRALinear"]
    same = add_lora(q, target_modules="0", inplace=True)
    assert same is q and isinstance(q[0], LoRALinear)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(q)
    with pytest.raises(ValueError, match=r"no quantized linear layer matches .*\['fc\*'\]"):
        add_lora(_quantize("dynamic"), target_modules=["fc*"])
    with pytest.raises(ValueError, match="quantize it first"):
        add_lora(_mlp())
    with pytest.raises(ValueError, match=r"prepared for QAT .*convert it first"):
        add_lora(lowbit.prepare_qat(_mlp()))
    with pytest.raises(TypeError, match="got Linear"):
        LoRALinear(nn.Linear(2, 2))
    with pytest.raises(ValueError, match="r=0"):
        add_lora(_quantize("dynamic"), r=0)
    with pytest.raises(ValueError, match=r"dropout=1\.0"):
        add_lora(_quantize("dynamic"), dropout=1.0)


@pytest.mark.parametrize("method", ["dynamic", "static", "int4", "int8_weight_only", "mixed"])
def test_save_load_round_trip_is_bit_identical(tmp_path: Path, method: str) -> None:
    lq = add_lora(_quantize(method), r=4, alpha=8, target_modules=["0", "2"], dropout=0.1)
    _perturb(lq)
    lq.eval()
    save(lq, tmp_path / "lora")
    manifest = json.loads((tmp_path / "lora" / "lowbit.json").read_text())
    entry = manifest["modules"]["0"]
    assert entry["kind"] == "lora"
    # the ReLU after layer 0 runs inside every quantized layer kind, weight-only ones included
    assert entry["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.1, "fused_relu": True}
    assert "0.base" not in manifest["modules"] and "0.lora_dropout" not in manifest["modules"]
    loaded = load(tmp_path / "lora", model=_mlp())
    assert [type(m) for m in loaded.modules()] == [type(m) for m in lq.modules()]
    x = _x(5, seed=9)
    with torch.inference_mode():
        assert torch.equal(loaded(x), lq(x))
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == [
        "0.lora_A", "0.lora_B", "2.lora_A", "2.lora_B"]
    info = describe(tmp_path / "lora")
    assert set(info["adapters"]) == {"0", "2"} and info["adapters"]["2"]["r"] == 4
    assert {r["name"] for r in info["layers"]} >= {"0.base", "2.base"}


def test_loaded_lora_model_keeps_training(tmp_path: Path) -> None:
    lq = add_lora(quantize_weight_only(_mlp(), bits=4, group_size=32), r=4)
    _perturb(lq)
    save(lq, tmp_path / "m.safetensors")
    loaded = load(tmp_path / "m.safetensors", model=_mlp())
    before = loaded[0].lora_A.detach().clone()
    opt = torch.optim.SGD(lora_parameters(loaded), lr=0.1)
    loaded.train()
    loaded(_x()).square().mean().backward()
    opt.step()
    assert not torch.equal(loaded[0].lora_A, before)


def test_plain_state_dict_round_trip(tmp_path: Path) -> None:
    lq = add_lora(_quantize("int4"), r=4)
    _perturb(lq)
    torch.save(lq.state_dict(), tmp_path / "lora.pt")
    other = add_lora(quantize_weight_only(nn.Sequential(
        nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)),
        bits=4, group_size=32), r=4)
    other.load_state_dict(torch.load(tmp_path / "lora.pt", weights_only=True))
    x = _x()
    with torch.inference_mode():
        assert torch.equal(other(x), lq(x))


def test_root_lora_layer_round_trip(tmp_path: Path) -> None:
    spec = QuantizationConfig(weights=QuantSpec.int8_weight(), activations=None,
                              mode="weight_only")
    base = Int8WeightOnlyLinear.from_float(nn.Linear(32, 16), spec)
    layer = add_lora(base, r=2)
    _perturb(layer)
    save(layer, tmp_path / "root.safetensors")
    loaded = load(tmp_path / "root.safetensors", model=nn.Linear(32, 16))
    assert isinstance(loaded, LoRALinear)
    assert torch.equal(loaded(_x()), layer(_x()))
    assert describe(tmp_path / "root.safetensors")["layers"][0]["name"] == "base"


class _Tied(nn.Module):
    """One linear layer used twice (under two names)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(32, 32)
        self.b = self.a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def test_shared_layer_gets_one_adapter_and_round_trips(tmp_path: Path) -> None:
    q = quantize_dynamic(_Tied())
    assert q.a is q.b  # PTQ swaps a shared layer under all its names
    lq = add_lora(q, r=2, target_modules=["b"])
    assert isinstance(lq.a, LoRALinear) and lq.a is lq.b
    assert len(lora_parameters(lq)) == 2  # one A and one B: the shared wrapper counts once
    _perturb(lq)
    save(lq, tmp_path / "tied")
    loaded = load(tmp_path / "tied", model=_Tied())
    assert loaded.a is loaded.b and isinstance(loaded.a, LoRALinear)
    assert torch.equal(loaded(_x()), lq(_x()))


def test_fused_gelu_moves_after_the_update(tmp_path) -> None:
    torch.manual_seed(0)
    q = quantize_weight_only(nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 8)),
                             group_size=32)
    assert q[0].fused_gelu == "none" and isinstance(q[1], nn.Identity)
    layer = add_lora(q, r=4)[0]
    assert layer.fused_gelu == "none" and layer.base.fused_gelu is None
    assert layer.lora_config()["fused_gelu"] == "none"
    _perturb(layer)
    x = torch.randn(3, 32)
    update = x @ layer.lora_A.T @ layer.lora_B.T * layer.scaling
    with torch.inference_mode():
        assert torch.equal(layer(x), F.gelu(layer.base(x) + update))
        y = q(x)
    save(q, tmp_path / "q")
    back = load(tmp_path / "q", model=nn.Sequential(nn.Linear(32, 64), nn.GELU(),
                                                    nn.Linear(64, 8)))
    assert back[0].fused_gelu == "none" and torch.equal(back(x), y)
    with pytest.raises(ValueError, match="fused_gelu='erf' must be None, 'none' or 'tanh'"):
        LoRALinear.from_config(back[0], {**layer.lora_config(), "fused_gelu": "erf"})


def test_set_scaling_names_a_bad_alpha_or_dropout() -> None:
    layer = add_lora(quantize_dynamic(nn.Sequential(nn.Linear(8, 4))), r=2)[0]
    with pytest.raises(ValueError, match=r"alpha='a' must be a finite number"):
        layer.set_scaling("a", 0.1)
    with pytest.raises(ValueError, match=r"dropout=1.5 must be in \[0, 1\)"):
        layer.set_scaling(8, 1.5)
    layer.set_scaling(8, 0.25)
    assert (layer.alpha, layer.scaling, layer.dropout_p) == (8.0, 4.0, 0.25)


@pytest.mark.parametrize("kwargs, message", [
    ({"r": True}, "r=True must be an integer"),  # had been rank 1
    ({"r": None}, "r=None must be an integer"),
    ({"r": 2, "dropout": "0.1"}, "dropout='0.1' must be a finite number"),
])
def test_lora_settings_of_the_wrong_type_are_refused_by_name(kwargs, message) -> None:
    with pytest.raises(ValueError, match=message):
        LoRALinear(quantize_dynamic(nn.Sequential(nn.Linear(8, 4)))[0], **kwargs)


def test_lora_settings_take_integral_floats_and_scalars() -> None:
    """r=8.0 and tensor / numpy alphas were accepted before the stricter checks: still are."""
    layer = LoRALinear(quantize_dynamic(nn.Sequential(nn.Linear(8, 4)))[0], r=8.0,
                       alpha=torch.tensor(16.0))
    assert (layer.r, layer.alpha, layer.scaling) == (8, 16.0, 2.0)
