"""Model traversal: layer identification, fusion discovery, exact BatchNorm folding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import QuantizationConfig
from lowbit.ptq import quantize_dynamic
from lowbit.traverse import FUNCTIONAL_RELU, find_fusions, fold_batchnorm, plan_layers


class ConvBnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(x))
        x = F.relu(x + y)  # residual: the ReLU after bn2 is not adjacent, so not fused
        return self.fc(self.pool(x).flatten(1))


class Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(x).mean((2, 3))
        if x.sum() > 0:  # data-dependent control flow defeats torch.fx
            x = x * 2
        return self.head(x)


def _randomize_bn(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g))
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.randn(n, generator=g))
            m.bias.data.copy_(torch.randn(n, generator=g))


def test_fx_finds_bn_and_relu_and_respects_residual() -> None:
    f = find_fusions(ConvBnNet())
    assert f.method == "fx"
    assert f.bn_for == {"conv1": "bn1", "conv2": "bn2"}
    assert f.relu_after == {"conv1": "relu"}  # conv2+bn2 feeds an add, not a ReLU
    assert f.relu_uses == {"relu": 1}


def test_functional_relu_is_detected() -> None:
    class M(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x):
            return torch.relu(self.fc(x))

    assert find_fusions(M()).relu_after == {"fc": FUNCTIONAL_RELU}


def test_untraceable_model_falls_back_to_sequential_order() -> None:
    f = find_fusions(Untraceable())
    assert f.method == "module_order"
    assert "torch.fx could not trace" in f.note
    assert f.bn_for == {"body.0": "body.1"}
    assert f.relu_after == {"body.0": "body.2"}


def test_bn_folding_is_numerically_exact_before_quantization() -> None:
    model = ConvBnNet().eval()
    _randomize_bn(model)
    x = torch.randn(4, 3, 16, 16)
    ref = model(x)
    folded = copy.deepcopy(model)
    fold_batchnorm(folded, find_fusions(folded))
    assert isinstance(folded.bn1, nn.Identity) and isinstance(folded.bn2, nn.Identity)
    assert folded.conv2.bias is not None  # created by folding
    out = folded(x)
    # float64 folding: the only difference left is float32 rounding of the folded weights
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_plan_identifies_quantizable_layers_and_reasons() -> None:
    class Mixed(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.fc1 = nn.Linear(8, 8)
            self.norm = nn.LayerNorm(8)
            self.up = nn.ConvTranspose1d(8, 8, 1)
            self.fc2 = nn.Linear(8, 2)

    cfg = QuantizationConfig.int8_dynamic(layer_overrides={"fc2": None})
    plan = plan_layers(Mixed(), cfg)
    status = {n: p.status for n, p in plan.items()}
    assert status == {
        "emb": "skipped",  # Embedding only in weight-only mode
        "attn": "skipped",  # in_proj_weight: no kernel for MultiheadAttention itself
        "attn.out_proj": "skipped",  # MHA's fused kernel reads out_proj.weight
        "fc1": "quantized",
        "up": "skipped",  # no kernel for ConvTranspose
        "fc2": "fp32 (requested)",
    }
    assert "MultiheadAttention" in plan["attn.out_proj"].reason
    assert "ConvTranspose1d" in plan["up"].reason
    assert "layer_overrides" in plan["fc2"].reason
    assert "norm" not in plan  # norms are not weight layers


def test_plan_refuses_nan_weights_naming_the_layer() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[2].weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"2 \(Linear\)\.weight has 1 NaN/Inf"):
        plan_layers(model, QuantizationConfig())
    # kept in float on request, the same model plans fine
    plan = plan_layers(model, QuantizationConfig(skip_layers=("2",)))
    assert plan["2"].status == "fp32 (requested)"


def test_skip_globs_and_fallback_set() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 2))
    plan = plan_layers(model, QuantizationConfig(skip_layers=("[01]",)), fallback={"2"})
    assert [p.status for p in plan.values()] == ["fp32 (requested)"] * 3
    assert "set_per_layer_fallback" in plan["2"].reason


class PoolNet(nn.Module):
    """conv-BN-ReLU-pool (fusable), conv-pool used twice, conv-overlapping pool."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1, self.relu1 = nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.pool2 = nn.MaxPool2d(2)  # also applied to the input: not fusable
        self.conv3 = nn.Conv2d(4, 4, 1)
        self.pool3 = nn.MaxPool2d(3, stride=2)  # overlapping windows: not fusable

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.conv2(x)) + self.pool2(x)
        return self.pool3(self.conv3(x))


def test_fx_finds_fusable_maxpools_only() -> None:
    f = find_fusions(PoolNet().eval())
    assert f.pool_after == {"conv1": "pool1"}
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(4, 4, 3),
                        nn.MaxPool2d(2, ceil_mode=True))
    assert find_fusions(seq).pool_after == {"0": "2"}  # ceil_mode pools are left alone
    nested = nn.Sequential(Untraceable().body, nn.MaxPool2d(2))  # traces: the pool follows
    assert find_fusions(nested).pool_after == {"0.0": "1"}
    untraceable = Untraceable()
    assert find_fusions(untraceable).pool_after == {}
    untraceable.body.append(nn.MaxPool2d(2))  # module order inside the Sequential
    f = find_fusions(untraceable)
    assert f.method == "module_order" and f.pool_after == {"body.0": "body.3"}


def test_torchscript_models_are_refused_with_a_message() -> None:
    """A scripted or traced model's layers are compiled code lowbit cannot replace: refused by
    quantize and prepare_for_qat (it used to come back unchanged without a word)."""
    import lowbit

    model = nn.Sequential(nn.Linear(4, 3)).eval()
    for compiled in (torch.jit.script(model), torch.jit.trace(model, torch.randn(2, 4))):
        with pytest.raises(TypeError, match=r"TorchScript.*quantize the eager nn\.Module instead"):
            lowbit.quantize_dynamic(compiled)
        with pytest.raises(TypeError, match="TorchScript"):
            lowbit.QATPreparer(lowbit.QATConfig()).prepare_for_qat(compiled)
    with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module"):
        lowbit.quantize_dynamic(lambda x: x)  # type: ignore[arg-type]


def test_names_that_match_no_layer_warn_with_the_closest_names() -> None:
    """A typo in skip_layers / layer_overrides / a fallback would quantize the layer the user
    meant to keep: each unmatched name warns and suggests the real ones; matches stay quiet."""
    model = nn.Sequential()
    model.add_module("features", nn.Linear(4, 4))
    model.add_module("classifier", nn.Linear(4, 2))
    cfg = QuantizationConfig(skip_layers=("clasifier",), layer_overrides={"feature*": None,
                                                                          "head": None})
    with pytest.warns(UserWarning) as record:
        plan_layers(model, cfg, fallback={"featres"})
    messages = [str(w.message) for w in record]
    assert any("skip_layers: 'clasifier' matches no layer" in m and "'classifier'" in m
               for m in messages)
    assert any("layer_overrides: 'head' matches no layer" in m for m in messages)
    assert any("set_per_layer_fallback: 'featres'" in m and "'features'" in m for m in messages)
    assert not any("feature*" in m for m in messages)  # a glob that matches is quiet
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        plan_layers(model, QuantizationConfig(skip_layers=("classifier",)))


# --------------------------------------------------- hooks survive; fast paths stay correct


def _hooked_net() -> tuple[nn.Module, list[tuple[str, str]]]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    seen: list[tuple[str, str]] = []
    net[0].register_forward_hook(lambda m, i, o: seen.append(("post0", type(m).__name__)))
    net[1].register_forward_hook(lambda m, i, o: seen.append(("relu", type(m).__name__)))
    net[2].register_forward_pre_hook(lambda m, i: seen.append(("pre2", type(m).__name__)))
    return net, seen


@pytest.mark.parametrize("mode", ["dynamic", "static", "int4", "qat"])
def test_hooks_on_float_layers_are_carried_to_their_replacements(mode: str) -> None:
    import lowbit
    net, seen = _hooked_net()
    x = torch.randn(5, 4)
    if mode == "qat":
        qat = lowbit.prepare_qat(net, QuantizationConfig.int8_dynamic())
        qat(x)
        assert [s[0] for s in seen] == ["post0", "relu", "pre2"]
        seen.clear()
        q = lowbit.convert_qat(qat)
    else:
        q = {"dynamic": lambda: lowbit.quantize_dynamic(net),
             "static": lambda: lowbit.quantize_static(net, [x], progress=False),
             "int4": lambda: lowbit.quantize_weight_only(net, bits=4, group_size=4)}[mode]()
        seen.clear()  # (calibration ran the float model's hooks)
    q(x)
    assert [s[0] for s in seen] == ["post0", "relu", "pre2"]  # a hooked ReLU is not fused away
    assert seen[0][1] != "Linear" and isinstance(q[1], nn.ReLU)


def test_transformer_encoder_layers_work_under_no_grad_and_inference_mode() -> None:
    import lowbit
    torch.manual_seed(0)
    enc = nn.TransformerEncoder(nn.TransformerEncoderLayer(32, 4, 64, batch_first=True,
                                                           dropout=0.0), 2,
                                enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 32)
    ref = enc(x).detach()
    for q, bound in ((lowbit.quantize_dynamic(enc), 0.999),  # (INT4: attention projections
                     (lowbit.quantize_weight_only(enc, bits=4, group_size=32), 0.995)):  # too)
        assert type(q.layers[0].linear1).__name__ != "Linear"
        for ctx in (torch.enable_grad, torch.no_grad, torch.inference_mode):
            with ctx():
                y = q(x)
            assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > bound


class _Block(nn.Module):
    """A straight-line submodule: fc -> GELU, and fc_shared whose output has two users."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.GELU()
        self.fc_shared, self.act2 = nn.Linear(4, 4), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc(x))
        y = self.fc_shared(h)
        return self.act2(y) + y  # y is used twice: its GELU cannot run in place


class _Branchy(nn.Module):
    """fc -> GELU, but fc's raw output is also kept where fx leaves no node: in the branch
    ``keep is None`` (fx traces ``keep`` as a proxy, so it follows the other side silently)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.GELU()

    def forward(self, x: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        y = self.fc(x)
        if keep is None:
            self.last = y
        return self.act(y)


class _Stores(nn.Module):
    """Straight-line, but ``self.last = y`` keeps fc's raw output (no fx node either)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.act = nn.Linear(4, 4), nn.GELU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.fc(x)
        self.last = y
        return self.act(y)


class _UntraceableWithBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block, self.branchy, self.stores = _Block(), _Branchy(), _Stores()
        self.head = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stores(self.branchy(self.block(x)))
        if x.sum() > 0:  # data-dependent control flow defeats torch.fx for the whole model
            x = x * 2
        return self.head(x)


def test_untraceable_model_fuses_inside_straight_line_submodules() -> None:
    f = find_fusions(_UntraceableWithBlocks())
    assert f.method == "module_order"
    assert "submodules whose own forward traces" in f.note
    # not fc_shared (two users), not branchy / stores (a use fx cannot see)
    assert f.gelu_after == {"block.fc": "block.act"}
    model = _UntraceableWithBlocks().eval()
    q = quantize_dynamic(model)
    x = torch.randn(3, 4)
    assert q.block.fc.fused_gelu == "none" and q.branchy.fc.fused_gelu is None
    q.branchy(x)
    assert torch.equal(q.branchy.last, q.branchy.fc(x))  # the raw output, not GELU'd
    assert torch.allclose(q(x), model(x), atol=0.05)


def test_a_submodule_layer_registered_twice_does_not_fuse() -> None:
    model = _UntraceableWithBlocks()
    model.other = model.block.fc  # another forward could call it
    assert find_fusions(model).gelu_after == {}


class _ResidualSequential(nn.Sequential):
    """A Sequential subclass whose forward uses the Linear's output twice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self[0](x)
        return self[1](y) + y


class _ChainSequential(nn.Sequential):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self[1](self[0](x))


class _UntraceableWithSequentials(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.res = _ResidualSequential(nn.Linear(4, 4), nn.ReLU())
        self.chain = _ChainSequential(nn.Linear(4, 4), nn.ReLU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > -1e9:  # data-dependent control flow defeats torch.fx for the whole model
            x = self.res(x)
        return self.chain(x)


def test_sequential_subclasses_with_their_own_forward_fuse_by_their_dataflow() -> None:
    """Child order is the dataflow only for ``nn.Sequential``'s own forward: the ReLU of a
    subclass whose forward adds the Linear's raw output back was fused (the skip then got the
    ReLU'd values: cosine 0.92 vs FP32 in every mode); a subclass whose forward is a plain
    chain still fuses, through its traced forward."""
    model = _UntraceableWithSequentials().eval()
    f = find_fusions(model)
    assert f.method == "module_order"
    assert f.relu_after == {"chain.0": "chain.1"}
    q = quantize_dynamic(model)
    x = torch.randn(8, 4)
    assert not q.res[0].fused_relu and q.chain[0].fused_relu
    assert F.cosine_similarity(q(x).flatten(), model(x).flatten(), dim=0) > 0.999


def test_transformers_gelus_fuse_only_in_their_exact_forms() -> None:
    transformers = pytest.importorskip("transformers")
    from lowbit.traverse import gelu_approximate

    act = transformers.activations
    assert gelu_approximate(act.GELUActivation()) == "none"
    assert gelu_approximate(act.ACT2FN["gelu_pytorch_tanh"]) == "tanh"
    # written-out formulas round differently from F.gelu: never fused
    assert gelu_approximate(act.GELUActivation(use_gelu_python=True)) is None
    assert gelu_approximate(act.ACT2FN["gelu_new"]) is None
    assert gelu_approximate(act.ACT2FN["gelu_fast"]) is None
    patched = act.GELUActivation()
    patched.forward = lambda x: x  # an instance-level forward (e.g. a user's patch)
    assert gelu_approximate(patched) is None


class _LazyCache(nn.Module):
    """Builds a cache on its first call, as rotary-embedding modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.out, self.cache = nn.Linear(8, 8), nn.Linear(8, 2), None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cache is None or self.cache.shape[0] < x.shape[1]:
            self.cache = torch.linspace(0.5, 1.5, x.shape[1]).unsqueeze(-1)
        return self.out(self.fc(x) * self.cache[: x.shape[1]])


def test_tracing_leaves_no_fx_proxy_in_the_model() -> None:
    """fx runs forward with Proxy inputs: an attribute assigned there kept a Proxy, and every
    later call of the quantized model failed ("symbolically traced variables cannot be used
    as inputs to control flow"). The tracer now puts the modules back as they were."""
    model = _LazyCache().eval()
    find_fusions(model)
    assert model.cache is None
    x = torch.randn(2, 6, 8)
    q = quantize_dynamic(model)
    assert q.cache is None and torch.allclose(q(x), model(x), atol=0.05)


def test_int32_sum_may_overflow_wants_a_config() -> None:
    from lowbit.traverse import int32_sum_may_overflow

    with pytest.raises(TypeError, match="expects a QuantizationConfig, got str"):
        int32_sum_may_overflow(nn.Linear(2, 2), "int8_dynamic")  # type: ignore[arg-type]
