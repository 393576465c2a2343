"""nn.MultiheadAttention re-expressed with Linear projections (lowbit.modules_mha): the same
outputs as PyTorch's module for every mask / shape option, its projections quantized in every
mode, reported, saved and loaded; unsupported variants stay float with a reason."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.modules_mha import MultiheadAttentionLinears, expand_attention
from lowbit.serialization import LoadError


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten(), b.flatten(), dim=0))


CASES = {
    "self": dict(batch_first=True),
    "seq_first": dict(batch_first=False),
    "cross_kdim_vdim": dict(batch_first=True, kdim=12, vdim=20),
    "no_bias": dict(batch_first=True, bias=False),
}


def _inputs(case: str, gen: torch.Generator, batch: int = 3, tgt: int = 5, src: int = 7):
    kw = CASES[case]
    if case == "cross_kdim_vdim":
        q = torch.randn(batch, tgt, 16, generator=gen)
        return q, torch.randn(batch, src, 12, generator=gen), torch.randn(batch, src, 20,
                                                                          generator=gen)
    shape = (batch, tgt, 16) if kw["batch_first"] else (tgt, batch, 16)
    x = torch.randn(shape, generator=gen)
    return x, x, x


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("mask", ["none", "bool_attn", "float_attn_3d", "key_padding",
                                  "both", "causal"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_same_outputs_as_nn_multihead_attention(case: str, mask: str, need_weights: bool) -> None:
    gen = torch.Generator().manual_seed(1)
    mha = nn.MultiheadAttention(16, 4, **CASES[case]).eval()
    lin = MultiheadAttentionLinears.from_float(mha)
    q, k, v = _inputs(case, gen, src=5 if mask == "causal" else 7)  # causal: as many keys
    batch, tgt = 3, 5
    src = k.shape[1] if mha.batch_first else k.shape[0]
    kw: dict = {"need_weights": need_weights}
    if mask in ("bool_attn", "both"):
        kw["attn_mask"] = torch.rand(tgt, src, generator=gen) > 0.7
        kw["attn_mask"][:, 0] = False  # every query sees a key
    if mask == "float_attn_3d":
        kw["attn_mask"] = torch.randn(batch * 4, tgt, src, generator=gen)
    if mask in ("key_padding", "both"):
        kw["key_padding_mask"] = torch.zeros(batch, src, dtype=torch.bool)
        kw["key_padding_mask"][0, -2:] = True
    if mask == "causal":
        kw["attn_mask"] = nn.Transformer.generate_square_subsequent_mask(tgt)
        kw["is_causal"] = True
    with torch.inference_mode():
        (y, w), (yf, wf) = lin(q, k, v, **kw), mha(q, k, v, **kw)
    torch.testing.assert_close(y, yf, rtol=1e-5, atol=1e-5)
    assert (w is None) == (wf is None)
    if w is not None:
        torch.testing.assert_close(w, wf, rtol=1e-5, atol=1e-6)


def test_unbatched_inputs_and_per_head_weights() -> None:
    mha = nn.MultiheadAttention(16, 4).eval()
    lin = MultiheadAttentionLinears.from_float(mha)
    x = torch.randn(6, 16)
    with torch.inference_mode():
        (y, w), (yf, wf) = (m(x, x, x, average_attn_weights=False) for m in (lin, mha))
    assert y.shape == yf.shape == (6, 16) and w.shape == wf.shape == (4, 6, 6)
    torch.testing.assert_close(y, yf, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(w, wf, rtol=1e-5, atol=1e-6)


class _Attn(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att = nn.MultiheadAttention(64, 4, batch_first=True)
        self.head = nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.att(x, x, x, need_weights=False)[0])


def _quantize(model: nn.Module, mode: str, x: torch.Tensor) -> nn.Module:
    if mode == "dynamic":
        return lowbit.quantize_dynamic(model)
    if mode == "static":
        return lowbit.quantize_static(model, [x], progress=False)
    return lowbit.quantize_weight_only(model, bits=4 if mode == "int4" else 8, group_size=32)


MODES = {"dynamic": 0.999, "static": 0.999, "int8_weight_only": 0.999, "int4": 0.99}


@pytest.mark.parametrize("mode", list(MODES))
def test_projections_quantized_in_every_mode(mode: str) -> None:
    torch.manual_seed(0)
    model = _Attn().eval()
    before = copy.deepcopy(model.state_dict())
    x, x2 = torch.randn(2, 10, 64), torch.randn(2, 10, 64)
    q = _quantize(model, mode, x)
    assert type(model.att) is nn.MultiheadAttention  # the user's model is untouched
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert type(q.att) is MultiheadAttentionLinears
    names = set(q.lowbit_report.quantized)
    assert {"att.q_proj", "att.k_proj", "att.v_proj", "att.out_proj", "head"} <= names
    with torch.inference_mode():
        y, yf, y2, yf2 = q(x), model(x), q(x2), model(x2)
    assert _cos(y, yf) > MODES[mode] and _cos(y2, yf2) > MODES[mode]
    assert not torch.equal(y, y2)  # different inputs, different outputs (as the float model)


@pytest.mark.parametrize("mode", ["dynamic", "int4", "static"])
def test_transformer_encoder_with_padding_mask(mode: str) -> None:
    """nn.TransformerEncoder's nested-tensor path (eval + src_key_padding_mask) used to hand
    nested tensors to the quantized layers; it is turned off with them."""
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True),
                                2).eval()
    x = torch.randn(3, 10, 64)
    kpm = torch.zeros(3, 10, dtype=torch.bool)
    kpm[0, 7:] = True
    q = _quantize(enc, mode, x)
    assert len(q.lowbit_report.quantized) == 12  # 2 x (4 projections + 2 FFN linears)
    with torch.inference_mode():
        got, want = q(x, src_key_padding_mask=kpm), enc(x, src_key_padding_mask=kpm)
    assert _cos(got[1:], want[1:]) > 0.99 and _cos(got[0, :7], want[0, :7]) > 0.99


def test_unsupported_attention_stays_float_with_a_reason() -> None:
    model = _Attn().eval()
    model.att = nn.MultiheadAttention(64, 4, batch_first=True, add_bias_kv=True).eval()
    q = lowbit.quantize_dynamic(model)
    assert type(q.att) is nn.MultiheadAttention
    plan = {p.name: p for p in q.lowbit_report.rows}["att.out_proj"]
    assert plan.status == "skipped" and "MultiheadAttention" in plan.reason


def test_hooks_move_to_the_replacement() -> None:
    model = _Attn().eval()
    seen = []
    handle = model.att.register_forward_hook(lambda m, i, o: seen.append(type(m).__name__))
    q = lowbit.quantize_dynamic(model)
    with torch.inference_mode():
        q(torch.randn(1, 4, 64))
    assert seen == ["MultiheadAttentionLinears"]
    handle.remove()


@pytest.mark.parametrize("mode", ["dynamic", "int4"])
def test_save_load_round_trip_and_tampered_config(mode: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = _Attn().eval()
    x = torch.randn(2, 10, 64)
    q = _quantize(model, mode, x)
    lowbit.save(q, tmp_path / "m")
    r = lowbit.load(tmp_path / "m", model=_Attn())
    with torch.inference_mode():
        assert torch.equal(r(x), q(x))
    manifest = json.loads((tmp_path / "m" / "lowbit.json").read_text())
    assert manifest["modules"]["att"]["config"]["num_heads"] == 4
    bad = copy.deepcopy(manifest)
    bad["modules"]["att"]["config"]["num_heads"] = 5  # does not divide 64
    from lowbit.serialization import _check_structure
    with pytest.raises(LoadError, match="num_heads"):
        _check_structure(bad, tmp_path)


def test_expand_attention_leaves_a_root_attention_and_subclasses_alone() -> None:
    class MyAttention(nn.MultiheadAttention):
        pass

    mha = nn.MultiheadAttention(8, 2)
    assert expand_attention(mha) == [] and type(mha) is nn.MultiheadAttention
    holder = nn.Sequential(MyAttention(8, 2))
    assert expand_attention(holder) == [] and type(holder[0]) is MyAttention


def test_qat_trains_and_converts_the_projections() -> None:
    torch.manual_seed(0)
    model = _Attn().train()
    preparer = lowbit.QATPreparer(lowbit.QuantizationConfig.int8_dynamic())
    qat = preparer.prepare_for_qat(model)
    assert type(qat.att) is MultiheadAttentionLinears
    params = dict(qat.att.q_proj.named_parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    opt = torch.optim.SGD([p for p in qat.parameters() if p.requires_grad], lr=1e-2)
    x = torch.randn(4, 6, 64)
    for _ in range(3):
        opt.zero_grad()
        qat(x).square().mean().backward()
        opt.step()
    assert any(not torch.equal(before[n], p.detach()) for n, p in params.items())  # it trained
    converted = preparer.convert_to_quantized(qat.eval())
    assert type(converted.att.q_proj).__name__ == "QuantizedLinear"
    with torch.inference_mode():
        assert _cos(converted(x), qat(x)) > 0.999


def test_quantized_encoder_layer_traces_without_graph_breaks_and_exports() -> None:
    torch.manual_seed(0)
    enc = nn.TransformerEncoderLayer(64, 4, 128, batch_first=True, dropout=0.0).eval()
    q = lowbit.quantize_dynamic(enc)
    x = torch.randn(2, 10, 64)
    with torch.no_grad():
        assert torch._dynamo.explain(q)(x).graph_break_count == 0
        exported = torch.export.export(q, (x,)).module()
        torch.testing.assert_close(exported(x), q(x), rtol=1e-5, atol=1e-5)
