"""merge_lora (float and re-quantized) and adapters saved alone (save_adapters / load_adapters)."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from torch import nn

import lowbit
from lowbit.config import QuantizationConfig
from lowbit.lora import LoRALinear, add_lora, lora_parameters


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(),
                         nn.Linear(128, 16))


X = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
SCALE = torch.linspace(0.1, 10.0, 64)  # outlier channels for the smoothing methods


def _quantize(method: str) -> nn.Module:
    if method == "int4":
        return lowbit.quantize_weight_only(_mlp(), bits=4, group_size=32)
    if method == "int8_weight_only":
        return lowbit.quantize_weight_only(_mlp(), bits=8)
    if method == "static":
        return lowbit.quantize_static(_mlp(), [X], progress=False)
    if method == "smooth_quant":  # input smoothing: W_hat computes on x * f
        return lowbit.quantize_dynamic(_mlp(), smooth_quant=0.5, calibration_data=[X * SCALE],
                                       progress=False)
    if method == "awq":
        return lowbit.quantize_weight_only(_mlp(), bits=4, group_size=32, method="awq",
                                           calibration_data=[X * SCALE], progress=False)
    return lowbit.quantize_dynamic(_mlp())


def _trained(method: str) -> nn.Module:
    lq = add_lora(_quantize(method), r=8, alpha=16)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(lq):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return lq.eval()


#: Re-quantization rounds the merged weight once more: its relative error is about the base's
#: own quantization error (INT4 g32: ~6-8%, INT8: ~0.5%).
WEIGHT_BOUND = {"int4": 0.1, "int8_weight_only": 0.01, "dynamic": 0.01, "static": 0.01,
                "smooth_quant": 0.01, "awq": 0.1}


@pytest.mark.parametrize("method", ["int4", "int8_weight_only", "dynamic", "static",
                                    "smooth_quant", "awq"])
def test_merge_float_is_exact_and_requantized_is_bounded(method: str) -> None:
    lq = _trained(method)
    x = X * SCALE if method in ("smooth_quant", "awq") else X
    with torch.no_grad():
        want = lq(x)
    exact = lowbit.merge_lora(lq, requantize=False)
    assert not any(isinstance(m, LoRALinear) for m in exact.modules())
    assert isinstance(lq[0], LoRALinear)  # the input model is untouched
    for i, layer in ((0, exact[0][0]), (2, exact[2][0]), (4, exact[4])):  # + ReLU / GELU
        a = lq[i]
        w = a.base.dequantize_weight()
        if getattr(a.base, "input_smoothing", None) is not None:  # W_hat (x * f): W_hat * f
            w = w * a.base.input_smoothing
        w = w + a.scaling * a.lora_B @ a.lora_A
        torch.testing.assert_close(layer.weight, w.detach(), rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        err = (exact(x) - want).norm() / want.norm()
    # the quantized model rounds its activations (INT8 codes; INT4 without VNNI: int8 per
    # group; weight-only on VNNI: bf16), the merged float one does not
    assert err < 0.02, err
    merged = lowbit.merge_lora(lq, inputs=x)
    report = merged.lora_merge_report
    assert [r.name for r in report.rows] == ["0", "2", "4"]
    base = type(lq[0].base)
    assert all(type(merged[i]) is base for i in (0, 2, 4))
    assert merged[0].fused_relu and merged[2].fused_gelu == "none"
    assert merged[0].weight_spec == lq[0].base.weight_spec
    if method == "static":
        assert torch.equal(merged[2].input_scale, lq[2].base.input_scale)
    assert 0 < report.max_weight_error < WEIGHT_BOUND[method], str(report)
    assert report.max_output_error < 2 * WEIGHT_BOUND[method], str(report)
    with torch.no_grad():
        err = (merged(x) - want).norm() / want.norm()
    assert err < 2 * WEIGHT_BOUND[method]
    if method in ("smooth_quant", "awq"):  # the factor went with the layer, not ones
        assert torch.equal(merged[0].input_smoothing, lq[0].base.input_smoothing)
    assert "| 0 |" in str(report)


def test_merge_errors() -> None:
    with pytest.raises(ValueError, match="no LoRA adapter on a lowbit quantized layer"):
        lowbit.merge_lora(_quantize("int4"))


def test_save_and_load_adapters_alone(tmp_path: Path) -> None:
    lq = _trained("int4")
    path = lowbit.save_adapters(lq, tmp_path / "a.safetensors")
    whole = tmp_path / "whole"
    lowbit.save(lq, whole)
    whole_bytes = sum(f.stat().st_size for f in whole.iterdir())
    assert path.stat().st_size < 0.5 * whole_bytes
    assert not list(tmp_path.glob(".*tmp"))  # atomic: no temporaries left
    back = lowbit.load_adapters(_quantize("int4"), path)
    with torch.no_grad():
        assert torch.equal(back(X), lq(X))
    assert [n for n, p in back.named_parameters() if p.requires_grad] == [
        f"{i}.{w}" for i in (0, 2, 4) for w in ("lora_A", "lora_B")]
    # onto a model that already has adapters: the weights are replaced
    fresh = add_lora(_quantize("int4"), r=8, alpha=16)
    again = lowbit.load_adapters(fresh, path, inplace=True)
    assert again is fresh and torch.equal(fresh[2].lora_B, lq[2].lora_B)
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["adapters"])
    assert meta["0"]["lora"]["fused_relu"] and meta["2"]["lora"]["fused_gelu"] == "none"


def test_load_adapters_onto_adapters_takes_the_file_settings(tmp_path: Path) -> None:
    """Onto a model whose adapters had the same r but another alpha / dropout, the file's
    weights were loaded with the model's scaling: outputs off by ~1.9 from the trained model,
    silently. The file's alpha and dropout now apply, as onto a model without adapters."""
    lq = add_lora(_quantize("int4"), r=8, alpha=4, dropout=0.25)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(lq):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lq.eval()
    path = lowbit.save_adapters(lq, tmp_path / "a.safetensors")
    other = add_lora(_quantize("int4"), r=8, alpha=64, dropout=0.0).eval()
    back = lowbit.load_adapters(other, path)
    assert [(m.alpha, m.scaling, m.dropout_p) for m in back.modules()
            if isinstance(m, LoRALinear)] == [(4.0, 0.5, 0.25)] * 3
    assert isinstance(back[0].lora_dropout, nn.Dropout) and not back[0].lora_dropout.training
    with torch.no_grad():
        assert torch.equal(back(X), lq(X))


@pytest.mark.parametrize("requantize", [False, True])
def test_merge_keeps_a_bfloat16_model_in_bfloat16(requantize: bool) -> None:
    """merge_lora(requantize=False) built float32 nn.Linear layers for a model cast to bf16:
    its first bf16 call raised "mat1 and mat2 must have the same dtype"."""
    lq = _trained("int8_weight_only").to(torch.bfloat16)
    x = X.to(torch.bfloat16)
    merged = lowbit.merge_lora(lq, requantize=requantize)
    with torch.no_grad():
        y, want = merged(x), lq(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), want.float(), rtol=0.05, atol=0.05)


def test_merge_report_measures_in_eval_mode() -> None:
    """The output error of a model merged in train mode was measured with the adapters'
    dropout on (0.58 against a true 0.002): both sides now run in eval mode, as the inputs
    were captured, and each merged layer keeps the mode of the layer it replaced."""
    lq = add_lora(_quantize("int4"), r=8, alpha=16, dropout=0.5)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(lq):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    evaluated = lowbit.merge_lora(lq.eval(), requantize=False, inputs=X).lora_merge_report
    trained = lowbit.merge_lora(lq.train(), requantize=False, inputs=X)
    assert trained.lora_merge_report.max_output_error == pytest.approx(
        evaluated.max_output_error, rel=1e-6)
    assert evaluated.max_output_error < 0.02  # (the INT4 x INT8 kernel vs a float layer)
    assert all(m.training for m in trained.modules())


def test_load_adapters_refuses_another_base(tmp_path: Path) -> None:
    path = lowbit.save_adapters(_trained("int4"), tmp_path / "a.safetensors")
    torch.manual_seed(5)
    other = lowbit.quantize_weight_only(nn.Sequential(
        nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 16)),
        bits=4, group_size=32)
    with pytest.raises(ValueError, match=r"layer '0' \(Int4Linear 64 -> 128\): its weights "
                                         "differ"):
        lowbit.load_adapters(other, path)
    with pytest.raises(ValueError, match="trained on a 'Int4Linear'"):
        lowbit.load_adapters(_quantize("dynamic"), path)
    with pytest.raises(ValueError, match="no quantized linear layer there"):
        lowbit.load_adapters(lowbit.PTQQuantizer(QuantizationConfig.int4_weight_only(
            32, layer_overrides={"0": None}), progress=False).quantize(_mlp()), path)
    bad = tmp_path / "bad.safetensors"
    safetensors.torch.save_file({"x": torch.zeros(1)}, str(bad), {"format": "something"})
    with pytest.raises(ValueError, match="expected 'lowbit-lora-adapters/1'"):
        lowbit.load_adapters(_quantize("int4"), bad)
    tensors = safetensors.torch.load_file(str(path))
    tensors["0.lora_A"] = tensors["0.lora_A"][:, :3].contiguous()
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    safetensors.torch.save_file(tensors, str(bad), meta)
    with pytest.raises(ValueError, match="adapter tensors are damaged"):  # the checksum
        lowbit.load_adapters(_quantize("int4"), bad)
    meta.pop("sha256")  # a file saved before lowbit recorded checksums
    safetensors.torch.save_file(tensors, str(bad), meta)
    with pytest.raises(ValueError, match=r"lora_A must be a float tensor of shape \(8, 64\)"):
        lowbit.load_adapters(_quantize("int4"), bad)
    with pytest.raises(FileNotFoundError, match="save_adapters"):
        lowbit.load_adapters(_quantize("int4"), tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="has no LoRA adapters"):
        lowbit.save_adapters(_quantize("int4"), tmp_path / "none.safetensors")


def test_load_adapters_refuses_damaged_tensors_before_changing_the_model(
        tmp_path: Path) -> None:
    """Two flipped bytes in a tensor loaded silently (output off by 8); a file without the
    adapters a model has was refused only after ``inplace=True`` had overwritten the others."""
    lq = _trained("dynamic")
    path = lowbit.save_adapters(lq, tmp_path / "a.safetensors")
    raw = bytearray(path.read_bytes())
    raw[-2] ^= 0x7F
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="adapter tensors are damaged"):
        lowbit.load_adapters(_quantize("dynamic"), damaged)
    tensors = safetensors.torch.load_file(str(path))
    tensors["2.lora_B"][0, 0] = float("nan")
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = {k: v for k, v in f.metadata().items() if k != "sha256"}
    safetensors.torch.save_file(tensors, str(damaged), meta)
    with pytest.raises(ValueError, match=r"layer '2': lora_B holds NaN/Inf"):
        lowbit.load_adapters(_quantize("dynamic"), damaged)

    one = lowbit.save_adapters(add_lora(_quantize("dynamic"), r=2, target_modules=["0"]),
                               tmp_path / "one.safetensors")
    target = add_lora(_quantize("dynamic"), r=2, alpha=4.0)  # adapters on 0, 2 and 4
    with torch.no_grad():
        target[0].lora_B.normal_()
    before = {k: v.clone() for k, v in target.state_dict().items()}
    with pytest.raises(ValueError, match=r"has adapters at \['2', '4'\] that the file does "
                                         "not hold"):
        lowbit.load_adapters(target, one, inplace=True)
    assert target[0].scaling == 2.0
    assert all(torch.equal(v, before[k]) for k, v in target.state_dict().items())
    changed = _mlp()  # layer '2' differs: refused there, after layer '0' passed its checks
    with torch.no_grad():
        changed[2].weight.mul_(1.5)
    other = lowbit.quantize_dynamic(changed)
    with torch.no_grad():
        want = other(X)
    with pytest.raises(ValueError, match=r"layer '2' .*its weights differ"):
        lowbit.load_adapters(other, path, inplace=True)
    assert other[0].fused_relu  # (a wrapper built for layer '0' had turned it off)
    with torch.no_grad():
        assert torch.equal(other(X), want)


@pytest.mark.parametrize("alpha", [float("nan"), float("inf")])
def test_lora_alpha_must_be_finite(alpha: float) -> None:
    with pytest.raises(ValueError, match="must be a finite number"):
        add_lora(_quantize("dynamic"), r=2, alpha=alpha)


def test_merge_a_root_adapter_and_a_static_config_check() -> None:
    q = lowbit.QuantizedLinear.from_float(nn.Linear(16, 8), QuantizationConfig.int8_dynamic())
    layer = add_lora(q, r=2)
    merged = lowbit.merge_lora(layer)
    assert isinstance(merged, lowbit.QuantizedLinear)
    with torch.no_grad():
        x = torch.randn(4, 16)
        assert torch.equal(merged(x), q(x))  # B = 0: the same codes come back


def test_merged_weight_names_a_wrong_update_shape() -> None:
    from lowbit.lora_merge import merged_weight

    base = _quantize("smooth_quant")[0]
    with pytest.raises(ValueError, match=r"must be the layer's \[out_features, in_features\]"):
        merged_weight(base, torch.zeros(64, 128))


def test_merging_past_a_static_layers_calibrated_range_warns() -> None:
    """An adapter before a static layer that moves its inputs out of the calibrated range: the
    adapter model clips them for the base weight only, which no merged layer reproduces (10%
    output error after 20 training steps, reported without a word of why)."""
    lq = add_lora(_quantize("static"), r=8, alpha=16, target_modules=["0", "2"])
    with torch.no_grad():
        lq[0].lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    lq.eval()
    with pytest.warns(UserWarning, match=r"layer '2': .* outside its calibrated static input "
                                         r"range .*output error"):
        lowbit.merge_lora(lq, inputs=X)
    quiet = add_lora(_quantize("static"), r=8, target_modules=["0", "2"]).eval()  # B = 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lowbit.merge_lora(quiet, inputs=X)
