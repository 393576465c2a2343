"""Quantized layers are drop-in for model code (lowbit.dropin): transformers and CNNs in every mode.

Tiny ``transformers`` models (hidden 32, 2 layers, random init, built offline) and small
re-implementations of torchvision's ResNet-18 BasicBlock (one ``ReLU(inplace=True)`` shared by
both activations) and MobileNet-V2's inverted residual (depthwise convs): no torchvision
wheel matching torch 2.13 installs here, so these follow torchvision's code.
"""

from __future__ import annotations

import copy
import gc
import warnings
import weakref
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.config import QuantizationConfig
from lowbit.dropin import DequantizedWeight, is_hf_conv1d

tf = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", message=".*token_id.*")


# ---------------------------------------------------------------------------- models
class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: one ReLU(inplace=True) used twice."""

    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None if stride == 1 and cin == cout else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


class ResNetTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.layer2(self.layer1(self.relu(self.bn1(self.conv1(x)))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _cbr(cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, (k - 1) // 2, groups=groups,
                                   bias=False), nn.BatchNorm2d(cout), nn.ReLU6(inplace=True))


class InvertedResidual(nn.Module):
    """torchvision.models.mobilenetv2.InvertedResidual (expand, depthwise, project)."""

    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.conv = nn.Sequential(_cbr(cin, hidden, 1), _cbr(hidden, hidden, 3, stride, hidden),
                                  nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.use_res else self.conv(x)


class MobileNetTiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(_cbr(3, 16, 3, 2), InvertedResidual(16, 16, 1, 4),
                                      InvertedResidual(16, 24, 2, 4),
                                      InvertedResidual(24, 24, 1, 4))
        self.classifier = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(self.features(x), 1)
        return self.classifier(torch.flatten(x, 1))


def _init_cnn(model: nn.Module) -> nn.Module:
    for m in model.modules():  # non-trivial BatchNorm statistics, as after training
        if isinstance(m, nn.BatchNorm2d):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.2, 0.2)
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model


MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2": lambda: tf.GPT2LMHeadModel(tf.GPT2Config(
        n_embd=32, n_layer=2, n_head=2, vocab_size=96, n_positions=32, bos_token_id=0,
        eos_token_id=0)),
    "llama": lambda: tf.LlamaForCausalLM(tf.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=2, vocab_size=96, max_position_embeddings=32)),
    "bart": lambda: tf.BartForConditionalGeneration(tf.BartConfig(
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=96,
        max_position_embeddings=32, scale_embedding=True, pad_token_id=1, bos_token_id=0,
        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2)),
    "t5": lambda: tf.T5ForConditionalGeneration(tf.T5Config(
        d_model=32, d_ff=64, d_kv=16, num_layers=2, num_heads=2, vocab_size=96,
        decoder_start_token_id=0)),
    "vit": lambda: tf.ViTModel(tf.ViTConfig(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        image_size=16, patch_size=4), add_pooling_layer=False),
    "falcon": lambda: tf.FalconForCausalLM(tf.FalconConfig(  # FalconLinear, tied head
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=96)),
    "whisper": lambda: tf.WhisperForConditionalGeneration(tf.WhisperConfig(  # conv front end
        d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=96,
        num_mel_bins=8, max_source_positions=16, max_target_positions=32, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)),
    "resnet": lambda: _init_cnn(ResNetTiny()),
    "mobilenet": lambda: _init_cnn(MobileNetTiny()),
}


def _inputs(name: str, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    if name in ("vit", "resnet", "mobilenet"):
        key = "pixel_values" if name == "vit" else "x"
        return {key: torch.randn(2, 3, 16, 16, generator=g)}
    if name == "whisper":  # (log-mel frames: twice the encoder positions)
        return {"input_features": torch.randn(2, 8, 32, generator=g),
                "decoder_input_ids": torch.randint(3, 96, (2, 6), generator=g)}
    batch = {"input_ids": torch.randint(3, 96, (2, 8), generator=g)}
    if name in ("bart", "t5"):
        batch["decoder_input_ids"] = torch.randint(3, 96, (2, 6), generator=g)
    return batch


def _run(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    out = model(**batch)
    if isinstance(out, torch.Tensor):
        return out
    return out.last_hidden_state if getattr(out, "logits", None) is None else out.logits


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.detach().flatten().double(),
                                     b.detach().flatten().double(), dim=0))


_FLOAT: dict[str, nn.Module] = {}


def _float(name: str) -> nn.Module:
    if name not in _FLOAT:
        torch.manual_seed(0)
        _FLOAT[name] = MODELS[name]().eval()
    return _FLOAT[name]


def _calibration(name: str) -> list[dict[str, torch.Tensor]]:
    return [_inputs(name, 100 + i) for i in range(2)]


def _qat(name: str) -> nn.Module:
    """Prepare (static INT8), a few training steps, convert."""
    qat = lowbit.prepare_qat(_float(name), QuantizationConfig.int8_static())
    qat.train()
    lowbit.freeze_bn_stats(qat)  # compare with the float model's BatchNorm statistics
    opt = torch.optim.SGD([p for p in qat.parameters() if p.requires_grad], lr=1e-4)
    for i in range(1):
        _run(qat, _inputs(name, 200 + i)).float().pow(2).mean().backward()  # in-place ReLUs too
        opt.step()
        opt.zero_grad()
    qat.eval()
    with torch.no_grad():
        _run(qat, _inputs(name, 300))
    return lowbit.convert_qat(qat)


def _quantize(name: str, mode: str) -> nn.Module:
    model = _float(name)
    if mode == "dynamic":
        return lowbit.quantize_dynamic(model)
    if mode == "static":
        return lowbit.quantize_static(model, _calibration(name), progress=False)
    if mode == "int8_weight_only":
        return lowbit.quantize_weight_only(model, bits=8)
    if mode == "int4_weight_only":
        return lowbit.quantize_weight_only(model, bits=4, group_size=32)
    return _qat(name)


#: lowest output cosine vs FP32 per mode (random init; measured 0.985-1.0 for the
#: transformers, static / QAT on the CNNs calibrate per-tensor ranges on 2 batches).
BOUNDS = {"dynamic": 0.99, "static": 0.95, "int8_weight_only": 0.995, "int4_weight_only": 0.97,
          "qat": 0.95}
CNN_BOUNDS = {"dynamic": 0.98, "static": 0.9, "int8_weight_only": 0.995,
              "int4_weight_only": 0.9, "qat": 0.9}
MODES = tuple(BOUNDS)


def _linear_names(model: nn.Module) -> list[str]:
    return [n for n, m in model.named_modules()
            if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)) or is_hf_conv1d(m)]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MODELS))
def test_model_quantizes_and_tracks_its_inputs(name: str, mode: str) -> None:
    """Every Linear / Conv1D / conv quantized and reported; two inputs give two outputs (as the
    float model's differ); cosine vs FP32 within the mode's bound."""
    model = _float(name)
    with torch.no_grad():
        fa, fb = _run(model, _inputs(name, 1)), _run(model, _inputs(name, 2))
    q = _quantize(name, mode)
    with torch.no_grad():
        qa, qb = _run(q, _inputs(name, 1)), _run(q, _inputs(name, 2))
    assert not torch.equal(fa, fb) and not torch.equal(qa, qb)
    assert _cos(qa - qb, fa - fb) > 0.9  # the outputs move with the inputs as the float ones
    bound = (CNN_BOUNDS if name in ("resnet", "mobilenet") else BOUNDS)[mode]
    assert _cos(qa, fa) >= bound, (_cos(qa, fa), bound)
    quantized = set(q.lowbit_report.quantized)
    assert set(_linear_names(model)) <= quantized, set(_linear_names(model)) - quantized
    for layer_name in quantized:
        layer = q.get_submodule(layer_name)
        assert layer.weight.dtype == torch.float32 and layer.weight.is_floating_point()
        float_layer = model.get_submodule(layer_name)
        assert layer.weight.shape == float_layer.weight.shape, layer_name


@pytest.mark.parametrize("name", ["gpt2", "t5", "vit"])
def test_add_lora_and_save_load(name: str, tmp_path: Path) -> None:
    """LoRA on a quantized transformer trains; its output starts at the base's; a saved model
    reloads into a fresh float skeleton with bit-identical outputs."""
    q = lowbit.quantize_weight_only(_float(name), bits=4, group_size=32)
    batch = _inputs(name, 1)
    with torch.no_grad():
        ref = _run(q, batch)
    lq = lowbit.add_lora(q, r=2)
    assert torch.equal(_run(lq, batch).detach(), ref)
    loss = _run(lq, batch).float().pow(2).mean()
    loss.backward()
    lora = [m for m in lq.modules() if isinstance(m, lowbit.LoRALinear)]
    assert lora and all(m.weight.dtype == torch.float32 for m in lora)
    assert any(m.lora_B.grad is not None for m in lora)
    lowbit.save(q, tmp_path / "q")
    torch.manual_seed(1)  # a different random init: the file restores every tensor
    loaded = lowbit.load(tmp_path / "q", MODELS[name]().eval())
    with torch.no_grad():
        assert torch.equal(_run(loaded, batch), ref)


@pytest.mark.parametrize("mode", ["dynamic", "int4_weight_only", "qat", "load"])
def test_save_pretrained_of_a_quantized_model_warns_and_still_resumes(
        mode: str, tmp_path: Path) -> None:
    """``save_pretrained`` writes the codes under the float weights' names and
    ``from_pretrained`` loads them as float weights, with no error (outputs uncorrelated): the
    quantized model's ``save_pretrained`` now says so and names lowbit.save / lowbit.load; the
    file still reloads right with ``load_state_dict`` (how ``Trainer`` resumes)."""
    name = "llama"
    if mode == "load":
        lowbit.save(_quantize(name, "dynamic"), tmp_path / "q")
        q = lowbit.load(tmp_path / "q", MODELS[name]().eval())
    else:
        q = _quantize(name, mode)
    assert "save_pretrained" not in vars(_float(name))  # the user's model is left alone
    with pytest.warns(UserWarning, match=r"LlamaForCausalLM\.save_pretrained writes this "
                                         r"quantized model's integer codes.*lowbit\.save"):
        q.save_pretrained(tmp_path / "hf")
    state = safetensors.torch.load_file(tmp_path / "hf" / "model.safetensors")
    fresh = lowbit.load(tmp_path / "q", MODELS[name]().eval()) if mode == "load" else (
        copy.deepcopy(q))
    with torch.no_grad():
        for t in fresh.state_dict().values():
            if t.dtype == torch.int8:
                t.zero_()
    fresh.load_state_dict(state)
    batch = _inputs(name, 1)
    with torch.no_grad():
        assert torch.equal(_run(fresh, batch), _run(q, batch))
    assert fresh.save_pretrained.model is fresh  # (a copy's warning saves the copy)


def test_a_deleted_quantized_model_is_freed_without_the_cycle_collector() -> None:
    """``save_pretrained``'s warning refers to its model weakly: a strong reference made every
    quantized transformers model a reference cycle, kept (weights included) until gc ran."""
    q = _quantize("llama", "dynamic")
    ref = weakref.ref(q)
    gc.collect()
    gc.disable()
    try:
        del q
        assert ref() is None
    finally:
        gc.enable()


def test_weight_view_is_float_lazy_and_read_only() -> None:
    fc = nn.Linear(64, 16)
    q = lowbit.convert_module(fc, QuantizationConfig.int4_weight_only(group_size=32), name="fc")
    w = q.weight
    assert isinstance(w, DequantizedWeight) and w.dtype == torch.float32
    assert w.shape == fc.weight.shape and w.device == fc.weight.device
    assert q.qweight.dtype == torch.uint8 and "weight" in q.state_dict()
    x = torch.randn(3, 64)
    torch.testing.assert_close(F.linear(x, w, q.bias), q(x), atol=2e-2, rtol=0)
    assert _cos(w.float(), fc.weight) > 0.99
    with pytest.raises(RuntimeError, match=r"fc .*read-only"):
        w.zero_()
    with pytest.raises(TypeError, match=r"fc .*cannot assign a Parameter"):
        q.weight = nn.Parameter(torch.zeros(16, 64))


@pytest.mark.parametrize("mode", ["dynamic", "static", "int4", "int8wo"])
def test_accelerate_hooks_that_store_the_weight_view_keep_the_codes(mode: str,
                                                                    tmp_path: Path) -> None:
    """accelerate's hooks (``cpu_offload``, ``disk_offload``, ``dispatch_model``) set each
    tensor with ``module._buffers[name] = getattr(module, name).to(device)``, or with the state
    dict's codes cast to ``layer.weight.dtype``: the float view (or float codes) took the codes'
    place, and the next call recursed without end (INT4: 'unpack_int4: expected uint8')."""
    import accelerate
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 8))
    x = torch.randn(5, 32)
    q = _quantize_modes(model, mode, x)
    ref, ref2 = q(x), q(2 * x)
    for offload in (lambda m: accelerate.cpu_offload(m, execution_device="cpu"),
                    lambda m: accelerate.disk_offload(m, tmp_path / "offload",
                                                      execution_device="cpu")):
        hooked = offload(copy.deepcopy(q))
        assert torch.equal(hooked(x), ref) and torch.equal(hooked(2 * x), ref2)
        assert hooked.state_dict()["0.weight"].dtype == q.state_dict()["0.weight"].dtype
    layer = copy.deepcopy(q)[0]
    layer._buffers["weight"] = layer.weight.to("cpu")  # the view itself (same device)
    assert isinstance(layer._buffers["weight"], DequantizedWeight)
    assert torch.equal(layer.state_dict()["weight"], q[0].qweight)
    layer._buffers["weight"] = q[0].qweight.float()  # the codes, cast
    assert torch.equal(layer(x), q[0](x)) and layer.qweight.dtype == q[0].qweight.dtype
    layer._buffers["weight"] = q[0].weight.dequantize()  # float weights are not codes
    with pytest.raises(RuntimeError, match=r"0 \(\w+\): its 'weight' buffer was replaced"):
        layer(x)


def _quantize_modes(model: nn.Module, mode: str, x: torch.Tensor) -> nn.Module:
    if mode == "static":
        return lowbit.quantize_static(model, [x], progress=False)
    if mode == "dynamic":
        return lowbit.quantize_dynamic(model)
    return lowbit.quantize_weight_only(model, bits=4 if mode == "int4" else 8, group_size=16)


class CastsToWeightDtype(nn.Module):
    """As HF ViT's patch embedding: ``pixel_values.to(self.proj.weight.dtype)``."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, 16, 4, 4)
        self.norm = nn.LayerNorm(16)
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x.to(self.proj.weight.dtype)).flatten(2).transpose(1, 2)
        return self.head(self.norm(h)).mean(1)


@pytest.mark.parametrize("mode", ["dynamic", "static", "int4", "int8wo"])
def test_model_cast_to_bfloat16_after_quantizing_runs_in_bfloat16(mode: str) -> None:
    """``qmodel.to(torch.bfloat16)``: each quantized layer presents bf16 (its scales stay
    float32), so model code that casts to ``layer.weight.dtype`` feeds the float layers after
    it the dtype they hold (a float32 ``weight.dtype`` made the bf16 LayerNorm fail)."""
    torch.manual_seed(0)
    model = CastsToWeightDtype().eval()
    x = torch.randn(2, 3, 16, 16)
    q = {"dynamic": lambda: lowbit.quantize_dynamic(model),
         "static": lambda: lowbit.quantize_static(model, [torch.randn(4, 3, 16, 16)],
                                                  progress=False),
         "int4": lambda: lowbit.quantize_weight_only(model, bits=4, group_size=16,
                                                     progress=False),
         "int8wo": lambda: lowbit.quantize_weight_only(model, bits=8, group_size=None,
                                                       progress=False)}[mode]()
    with torch.no_grad():
        want = q(x)
        q.to(torch.bfloat16)
        assert q.proj.weight.dtype == torch.bfloat16 and q.proj.weight_scale.dtype == torch.float32
        y = q(x)
    assert y.dtype == torch.bfloat16 and _cos(y.float(), want) > 0.999


def test_gpt2_conv1d_layers_are_linears_with_their_shape() -> None:
    model = _float("gpt2")
    q = lowbit.quantize_dynamic(model)
    c_attn = q.transformer.h[0].attn.c_attn
    assert type(c_attn).__name__ == "QuantizedLinear" and c_attn.meta()["extra"]["hf_conv1d"]
    float_w = model.transformer.h[0].attn.c_attn.weight  # Conv1D: [in, out]
    assert c_attn.weight.shape == float_w.shape
    assert _cos(c_attn.weight.float(), float_w) > 0.999
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert rows["transformer.h.0.attn.c_attn"].module_type == "Conv1D"


def test_embeddings_stay_float_in_weight_only_unless_asked() -> None:
    model = _float("gpt2")
    q = lowbit.quantize_weight_only(model, bits=4, group_size=32)
    assert type(q.transformer.wte) is nn.Embedding
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert "quantize_embeddings=True" in rows["transformer.wte"].reason
    cfg = QuantizationConfig.int4_weight_only(group_size=32, quantize_embeddings=True)
    q = lowbit.PTQQuantizer(cfg, progress=False).quantize(model)
    assert type(q.transformer.wte).__name__ == "QuantizedEmbedding"
    assert type(q.lm_head).__name__ == "Int4Linear"  # tied to wte in the float model
    batch = _inputs("gpt2", 1)
    with torch.no_grad():
        assert _cos(_run(q, batch), _run(model, batch)) > 0.97


def test_embedding_subclasses_with_their_own_forward_stay_float() -> None:
    """BART's scaled word / learned positional embeddings: replacing them would drop
    ``embed_scale`` or the position offset; they stay float and are reported."""
    model = _float("bart")
    cfg = QuantizationConfig.int4_weight_only(group_size=32, quantize_embeddings=True)
    q = lowbit.PTQQuantizer(cfg, progress=False).quantize(model)
    rows = {r.name: r for r in q.lowbit_report.rows}
    for sub in ("model.shared", "model.encoder.embed_tokens", "model.encoder.embed_positions"):
        assert rows[sub].status == "skipped" and ".forward differs" in rows[sub].reason
    batch = _inputs("bart", 1)
    with torch.no_grad():
        assert _cos(_run(q, batch), _run(model, batch)) > 0.97


def test_conv_subclasses_with_their_own_conv_forward_stay_float() -> None:
    """A conv subclass that changes ``_conv_forward`` (custom padding, weight standardization)
    was quantized and lost it (max error 0.45 here); it stays float and is reported."""

    class HalfWeightConv(nn.Conv2d):
        def _conv_forward(self, x, weight, bias):
            return super()._conv_forward(x, weight * 0.5, bias)

    model = nn.Sequential(HalfWeightConv(2, 3, 3), nn.Conv2d(3, 3, 1)).eval()
    q = lowbit.quantize_dynamic(model)
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert rows["0"].status == "skipped" and "HalfWeightConv._conv_forward" in rows["0"].reason
    assert rows["1"].status == "quantized"
    x = torch.randn(2, 2, 6, 6)
    with torch.no_grad():
        assert _cos(q(x), model(x)) > 0.999


def test_int4_keeps_depthwise_convs_int8() -> None:
    model = _float("mobilenet")
    q = lowbit.quantize_weight_only(model, bits=4, group_size=32)
    rows = {r.name: r for r in q.lowbit_report.rows}
    dw = "features.1.conv.1.0"
    assert "depthwise" in rows[dw].reason and q.get_submodule(dw).weight_spec.bits == 8
    assert q.get_submodule("features.1.conv.0.0").weight_spec.bits == 4
    forced = QuantizationConfig.int4_weight_only(
        group_size=32, layer_overrides={dw: QuantizationConfig.int4_weight_only(group_size=32)})
    q4 = lowbit.PTQQuantizer(forced, progress=False).quantize(model)
    assert q4.get_submodule(dw).weight_spec.bits == 4


def test_qat_layer_and_shared_inplace_relu_backward() -> None:
    """QAT layers expose weight / bias; a shared in-place ReLU after a fused layer backprops."""
    block = _init_cnn(BasicBlock(8, 8)).train()
    qat = lowbit.prepare_qat(block, QuantizationConfig.int8_static())
    assert qat.conv1.weight is qat.conv1.base_layer.weight and qat.conv1.bias is None
    x = torch.randn(2, 8, 6, 6, requires_grad=True)
    qat(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    model = lowbit.prepare_qat(_float("t5"), QuantizationConfig.int8_dynamic())
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo
    assert wo.weight.dtype == torch.float32 and wo.in_features == 64


def test_mha_projections_quantized_and_reported() -> None:
    """nn.MultiheadAttention reads its in_proj_weight in one fused call: lowbit re-expresses it
    with four Linear projections (lowbit.modules_mha), which are then quantized and reported."""
    model = nn.TransformerEncoderLayer(32, 2, 64, batch_first=True).eval()
    q = lowbit.quantize_dynamic(model)
    rows = {r.name: r for r in q.lowbit_report.rows}
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
        assert rows[f"self_attn.{proj}"].status == "quantized"
        assert type(getattr(q.self_attn, proj)).__name__ == "QuantizedLinear"
    assert type(q.linear1).__name__ == "QuantizedLinear"
