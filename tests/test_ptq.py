"""PTQ API: dynamic, static and weight-only quantization on small real models (seed 001)."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.calibrators import MinMaxCalibrator, register_calibrator
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.models import MnistCNN, TransformerEncoderBlock
from lowbit.ops import dequantize
from lowbit.ptq import (
    PTQQuantizer,
    Quantizer,
    quantize_dynamic,
    quantize_static,
    quantize_weight_only,
)
from lowbit.serialization import load, save

torch.manual_seed(0)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.pool = nn.MaxPool2d(2)
        self.conv2 = nn.Conv2d(8, 16, 3, padding=1)
        self.fc1 = nn.Linear(16 * 4 * 4, 32)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(32, 10)

    def forward(self, x):
        x = self.pool(self.relu1(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc2(self.drop(F.relu(self.fc1(x.flatten(1)))))


class ResBlockNet(nn.Module):
    """Residual model: functional adds in forward must keep working."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.bna = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.relu = nn.ReLU()
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        x = self.relu(self.bn0(self.stem(x)))
        y = self.b(F.relu(self.bna(self.a(x))))
        x = self.relu(x + y)
        return self.head(x.mean((2, 3)))


@pytest.fixture
def images() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [torch.rand(16, 1, 16, 16, generator=g) for _ in range(6)]


def test_dynamic_linear_model_int8_weights_float_boundaries() -> None:
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    x = torch.randn(32, 64)
    q = quantize_dynamic(model)
    for i in (0, 2):
        assert q[i].qweight.dtype == torch.int8
        assert q[i].qweight.numel() * q[i].qweight.element_size() == model[i].weight.numel()
    out = q(x)
    assert out.dtype == torch.float32  # activations stay float at module boundaries
    ref = model(x)
    # bound: per-token INT8 activations x per-channel INT8 weights keep cosine >= 0.999
    assert cosine(out, ref) > 0.999
    assert (out - ref).abs().max() < 0.05 * ref.abs().max()
    assert type(model[0]) is nn.Linear  # the user's model is untouched


def test_static_conv_model_calibrated_scales(images: list[torch.Tensor]) -> None:
    model = ConvNet().eval()
    q = quantize_static(model, images, progress=False)
    report = q.lowbit_report
    assert report.quantized == ["conv1", "conv2", "fc1", "fc2"]
    assert report.num_calibration_batches == len(images)
    for name in report.quantized:
        layer = q.get_submodule(name)
        assert layer.qweight.dtype == torch.int8
        rec = report.calibration[name]
        assert rec.num_batches == len(images)
        # input range of conv1 is the data range [0, 1): scale ~ 1/255, zero-point at qmin
        assert 0 < float(layer.input_scale) < 1
    rec = report.calibration["conv1"]
    assert rec.min >= 0 and 0.95 < rec.max < 1.0
    assert abs(float(q.conv1.input_scale) - rec.max / 255) < 1e-3
    x = torch.rand(8, 1, 16, 16)
    assert cosine(q(x), model(x)) > 0.99
    assert isinstance(q.relu1, nn.Identity)  # ReLU module fused into conv1


def test_multilayer_model_every_quantizable_layer_quantized(images) -> None:
    model = ConvNet().eval()
    q = PTQQuantizer(QuantizationConfig.int8_static(), progress=False).quantize(model, images)
    assert isinstance(q.pool, nn.MaxPool2d) and isinstance(q.drop, nn.Dropout)
    for name in ("conv1", "conv2", "fc1", "fc2"):
        meta = q.get_submodule(name).meta()
        assert meta["weight_spec"]["bits"] == 8
        layer = model.get_submodule(name)
        out = layer.out_channels if "conv" in name else layer.out_features
        assert q.get_submodule(name).weight_scale.numel() == out


def test_residual_model_with_bn_folding_works(images) -> None:
    model = ResBlockNet().eval()
    with torch.no_grad():
        for bn in (model.bn0, model.bna):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    data = [torch.rand(8, 3, 12, 12) for _ in range(4)]
    q = quantize_static(model, data, progress=False)
    assert isinstance(q.bn0, nn.Identity) and isinstance(q.bna, nn.Identity)
    assert isinstance(q.relu, nn.ReLU)  # shared ReLU (called twice) is kept
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert rows["stem"].folded_bn == "bn0" and rows["stem"].fused_relu
    assert rows["a"].fused_relu and not rows["b"].fused_relu
    x = torch.rand(4, 3, 12, 12)
    assert cosine(q(x), model(x)) > 0.99


class _ConvBNLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.l, self.o = nn.Linear(8 * 36, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.o(F.relu(self.l(F.relu(self.bn(self.c(x))).flatten(1))))


@pytest.mark.parametrize("reparam", ["weight_norm", "parametrizations.weight_norm",
                                     "parametrizations.spectral_norm", "spectral_norm", "prune"])
def test_weight_norm_and_spectral_norm_layers_quantize_like_plain_ones(reparam: str,
                                                                       tmp_path) -> None:
    """A reparametrized weight is recomputed on each access (or by a hook): the BatchNorm fold
    was lost (outputs off by as much as the whole BN; parametrizations), or the quantized
    layer inherited a hook reading parameters it has not (the hook-based forms). Folded into
    a plain weight on lowbit's copy, the model quantizes exactly as its plain twin, and the
    user's model keeps its reparametrization and outputs."""
    torch.manual_seed(21)
    plain = _ConvBNLinear()
    with torch.no_grad():
        plain.bn.running_mean.uniform_(-1, 1)
        plain.bn.running_var.uniform_(0.5, 2)
        plain.bn.weight.uniform_(0.5, 2)
    model = copy.deepcopy(plain)
    if reparam == "prune":  # (torch.nn.utils.prune: a mask, deepcopy refused the model)
        from torch.nn.utils import prune

        def wrap(m: nn.Module) -> nn.Module:
            return prune.l1_unstructured(m, "weight", amount=0.5)
    else:
        wrap = eval(f"nn.utils.{reparam}")
    model.c, model.l = wrap(model.c), wrap(model.l)
    model.eval()
    x, data = torch.randn(5, 3, 6, 6), [torch.randn(4, 3, 6, 6) for _ in range(2)]
    with torch.no_grad():
        before = model(x)
        plain.c.weight.copy_(model.c.weight)  # the twin: the same effective weights
        plain.l.weight.copy_(model.l.weight)
    plain.eval()
    for cfg in (QuantizationConfig.int8_dynamic(), QuantizationConfig.int8_static(),
                QuantizationConfig.int4_weight_only(group_size=9)):
        q = PTQQuantizer(cfg, progress=False).quantize(model, data)
        twin = PTQQuantizer(cfg, progress=False).quantize(plain, data)
        assert torch.equal(q(x), twin(x)), cfg.mode
        assert isinstance(q.bn, nn.Identity) and cosine(q(x), before) > 0.99
        # (parametrize's own modules were listed too, as skipped layers that no longer exist)
        assert q.lowbit_report.skipped == twin.lowbit_report.skipped == [], cfg.mode
    assert torch.equal(model(x), before)  # the user's model: untouched, still reparametrized
    assert "weight" not in model.l._parameters
    # a layer kept in float keeps its reparametrization: the file loads into the float model
    model.o = wrap(model.o)
    q = PTQQuantizer(QuantizationConfig.int8_dynamic(skip_layers=("o",)),
                     progress=False).quantize(model.eval())
    assert "weight" not in q.o._parameters and "weight" in q.l._buffers
    save(q, tmp_path / "q")
    skeleton = _ConvBNLinear()  # the float architecture, fresh
    skeleton.c, skeleton.l, skeleton.o = (wrap(m) for m in (skeleton.c, skeleton.l, skeleton.o))
    assert torch.equal(load(tmp_path / "q", model=skeleton.eval())(x), q(x))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_layers_whose_int32_sum_could_overflow_keep_float_activations(mode: str) -> None:
    """K = 140,000 with weights of one sign: the INT8 x INT8 int32 sum wrapped around
    (-126,288 for 140,000). Such a layer now gets INT8 weights and float activations, and the
    report says why; the next layer keeps INT8 x INT8."""
    k = 140_000
    model = nn.Sequential(nn.Linear(k, 2, bias=False), nn.Linear(2, 3)).eval()
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    x = torch.ones(1, k)
    cfg = QuantizationConfig.int8_dynamic() if mode == "dynamic" else \
        QuantizationConfig.int8_static()
    q = PTQQuantizer(cfg, progress=False).quantize(model, [x])
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert "K=140000" in rows["0"].reason and "float" in rows["0"].reason
    assert rows["1"].config.mode == mode
    assert type(q[1]).__name__ == "QuantizedLinear"
    y = q[0](x)
    assert torch.allclose(y, model[0](x), rtol=0.01)  # was -126,288


@pytest.mark.parametrize("mode", ["dynamic", "static", "int4"])
@pytest.mark.parametrize("k, n", [(0, 4), (4, 0)])
def test_layers_with_an_empty_weight_stay_float(mode: str, k: int, n: int) -> None:
    """nn.Linear(0, 4) / nn.Linear(4, 0) (valid, degenerate): kept float with the reason; the
    model quantized the rest. Quantizing failed ("index 0 is out of bounds", "group_size
    ... got 0", "0 is empty; cannot compute a quantization range")."""
    model = nn.Sequential(nn.Linear(k, n), nn.Linear(n, 3), nn.Linear(3, 3)).eval()
    x = torch.randn(5, k)
    q = {"dynamic": lambda: quantize_dynamic(model),
         "static": lambda: quantize_static(model, [torch.randn(8, k)], progress=False),
         "int4": lambda: quantize_weight_only(model, bits=4, group_size=32)}[mode]()
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert type(q[0]) is nn.Linear and "empty weight" in rows["0"].reason
    if n == 0:
        assert type(q[1]) is nn.Linear and "empty weight" in rows["1"].reason
    if not (mode == "static" and n == 0):  # (there layer 2 sees a constant: float, reported)
        assert type(q[2]) is not nn.Linear
    torch.testing.assert_close(q(x), model(x), atol=0.05, rtol=0.05)


def test_per_layer_fallback_toggle_and_mixed_boundaries() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = nn.Linear(20, 40)
            self.fc2 = nn.Linear(40, 40)
            self.fc3 = nn.Linear(40, 5)

        def forward(self, x):
            return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))

    model = Net().eval()
    data = [torch.randn(16, 20) for _ in range(4)]
    quantizer = PTQQuantizer(QuantizationConfig.int8_static(), progress=False)
    assert isinstance(quantizer, Quantizer)
    quantizer.set_per_layer_fallback("fc2", True)
    mixed = quantizer.quantize(model, data)
    assert type(mixed.fc2) is nn.Linear and mixed.fc2 is not model.fc2
    assert mixed.lowbit_report.fp32 == ["fc2"]
    assert type(mixed.fc1).__name__ == "QuantizedLinear"
    # boundaries: fc1 outputs float into the float fc2; fc3 quantizes fc2's float output itself
    x = torch.randn(8, 20)
    h = F.relu(mixed.fc1(x))
    assert h.dtype == torch.float32
    torch.testing.assert_close(mixed(x), mixed.fc3(F.relu(mixed.fc2(h))))
    assert cosine(mixed(x), model(x)) > 0.995
    quantizer.set_per_layer_fallback("fc2", False)
    full = quantizer.quantize(model, data)
    assert type(full.fc2).__name__ == "QuantizedLinear"


@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_weight_granularity_and_symmetry(granularity: str, symmetric: bool) -> None:
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    wspec = QuantSpec(bits=8, symmetric=symmetric, granularity=granularity)
    cfg = QuantizationConfig(weights=wspec, activations=QuantSpec.int8_dynamic_activation(),
                             mode="dynamic")
    q = quantize_dynamic(model, cfg)
    expected = 1 if granularity == "per_tensor" else 16
    assert q[0].weight_scale.numel() == expected
    w_hat = dequantize(q[0].qweight, q[0].weight_scale, q[0].weight_zero_point, wspec)
    step = q[0].weight_scale.max()
    assert (w_hat - model[0].weight).abs().max() <= step / 2 + 1e-7
    torch.testing.assert_close(q[0].dequantize_weight(), w_hat)
    if not symmetric:  # affine weights run on the integer kernels with a zero-point term
        assert type(q[0]).__name__ == "QuantizedLinear"
    from lowbit.ops import choose_qparams, compute_range, quantize

    x = torch.randn(4, 32) + 0.5
    assert cosine(q(x), model(x)) > 0.999
    aspec = cfg.activations
    s_x, zp_x = choose_qparams(*compute_range(x, aspec), aspec)
    x_hat = dequantize(quantize(x, s_x, zp_x, aspec), s_x, zp_x, aspec)
    expected = F.linear(x_hat.double(), w_hat.double(), model[0].bias.double()).float()
    torch.testing.assert_close(q(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_each_calibrator_quantizes_conv_model(name: str, images) -> None:
    model = ConvNet().eval()
    q = quantize_static(model, images, QuantizationConfig.int8_static(calibrator=name),
                        progress=False)
    assert q.lowbit_report.calibration["fc1"].calibrator == name
    x = images[0]
    assert cosine(q(x), model(x)) > 0.98


def test_custom_calibrator_instance_and_registered_name(images) -> None:
    @register_calibrator("fixed_unit_test")
    class Fixed(MinMaxCalibrator):
        def _compute_range(self):
            return torch.tensor(-4.0), torch.tensor(4.0)

    model = ConvNet().eval()
    q = quantize_static(model, images, QuantizationConfig.int8_static("fixed_unit_test"),
                        progress=False)
    assert abs(float(q.fc1.input_scale) - 8 / 255) < 1e-6


def test_mixed_overrides_weight_only_and_static() -> None:
    model = nn.Sequential(nn.Linear(128, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    cfg = QuantizationConfig.int8_static(
        layer_overrides={"0": QuantizationConfig.int4_weight_only(group_size=32), "2": None})
    data = [torch.randn(4, 128) for _ in range(3)]
    q = PTQQuantizer(cfg, progress=False).quantize(model, data)
    assert q[0].qweight.dtype == torch.uint8 and q[0].qweight.shape == (64, 64)
    assert type(q[2]) is nn.Linear
    assert cosine(q(data[0]), model(data[0])) > 0.99


def test_deterministic_and_original_untouched() -> None:
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    before = copy.deepcopy(model.state_dict())
    a, b = quantize_dynamic(model), quantize_dynamic(model)
    for k, v in a.state_dict().items():
        assert torch.equal(v, b.state_dict()[k])
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


class _EveryPath(nn.Module):
    """Layers the copy must give their own weights (a BatchNorm fold, weight_norm, a float
    fallback, a tied float embedding, a layer kept float after calibration) beside plain ones
    that are only read and converted."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(20, 16)
        self.conv = nn.Conv1d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm1d(16)
        self.norm = nn.utils.parametrizations.weight_norm(nn.Linear(16, 16))
        self.plain = nn.Linear(16, 16)
        self.const = nn.Linear(16, 16)  # sees a constant input: static keeps it float
        self.keep = nn.Linear(16, 16)  # layer_overrides: float
        self.head = nn.Linear(16, 20, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.bn(self.conv(self.emb(ids).transpose(1, 2))).transpose(1, 2)
        h = self.plain(self.norm(h)) + self.const(torch.zeros_like(h))
        return self.head(self.keep(h))


@pytest.mark.parametrize("mode", ["dynamic", "static", "int4", "gptq"])
def test_the_copy_shares_no_tensor_with_the_users_model(mode: str) -> None:
    """Quantizing a copy no longer copies every float weight first (2x the model's memory at
    the peak): the layers only read and converted use the user's tensors while they are
    converted. Everything written to or kept float gets its own copy; the user's model is
    unchanged and the result shares no storage with it."""
    torch.manual_seed(0)
    model = _EveryPath().train()  # (BatchNorm in training mode: the copy is put in eval)
    with torch.no_grad():
        model.bn.running_mean.uniform_(-1, 1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = [torch.randint(0, 20, (4, 6)) for _ in range(2)]
    overrides = {"keep": None}
    cfg = {"dynamic": QuantizationConfig.int8_dynamic(layer_overrides=overrides),
           "static": QuantizationConfig.int8_static(layer_overrides=overrides),
           "int4": QuantizationConfig.int4_weight_only(group_size=16, layer_overrides=overrides),
           "gptq": QuantizationConfig.int4_weight_only(group_size=16, method="gptq",
                                                       layer_overrides=overrides)}[mode]
    q = PTQQuantizer(cfg, progress=False).quantize(model, ids)
    assert model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    mine = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    theirs = [n for n, t in [*q.named_parameters(), *q.named_buffers()]
              if t.untyped_storage().data_ptr() in mine]
    assert theirs == []
    assert type(q.plain).__name__ != "Linear" and type(q.keep) is nn.Linear
    if mode == "static":
        assert type(q.const) is nn.Linear
    with torch.no_grad():
        want = model.eval()(ids[0])
        assert cosine(q(ids[0]), want) > 0.98


def test_converted_layers_float_weights_are_never_copied(monkeypatch) -> None:
    """Only what stays float (or is written to) is copied: here the LayerNorm."""
    import lowbit.ptq as ptq
    from lowbit.reparam import SharedCopy

    made: list[SharedCopy] = []

    class Spy(SharedCopy):
        def __init__(self, model: nn.Module) -> None:
            super().__init__(model)
            made.append(self)

    monkeypatch.setattr(ptq, "SharedCopy", Spy)
    model = nn.Sequential(nn.Linear(32, 32), nn.LayerNorm(32), nn.Linear(32, 8)).eval()
    quantize_dynamic(model)
    assert len(made) == 1 and sorted(made[0]._fresh) == sorted(id(p) for p in model[1].parameters())


def test_inplace_opt_in() -> None:
    model = nn.Sequential(nn.Linear(8, 8))
    out = quantize_dynamic(model, inplace=True)
    assert out is model and type(model[0]).__name__ == "QuantizedLinear"


def test_int4_weight_only_packs_two_per_byte() -> None:
    model = nn.Sequential(nn.Linear(256, 64)).eval()
    q = quantize_weight_only(model, bits=4, group_size=128)
    assert q[0].qweight.dtype == torch.uint8
    assert q[0].qweight.numel() == 256 * 64 // 2
    x = torch.randn(3, 256)
    assert cosine(q(x), model(x)) > 0.99


# ----------------------------------------------------------------------------- edge cases
def test_empty_calibration_data_is_a_clear_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="calibration_data is empty"):
        quantize_static(model, [], progress=False)
    with pytest.raises(ValueError, match="calibration_data is None"):
        quantize_static(model, None, progress=False)  # type: ignore[arg-type]


def test_single_batch_and_generator_and_dict_batches() -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    q = quantize_static(model, (torch.randn(2, 4) for _ in range(1)), progress=False)
    assert q.lowbit_report.num_calibration_batches == 1

    class Kw(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 2)

        def forward(self, input_ids, scale=1.0):
            return self.fc(input_ids) * scale

    q = quantize_static(Kw(), [{"input_ids": torch.randn(3, 4), "scale": 2.0}], progress=False)
    assert q.lowbit_report.calibration["fc"].num_batches == 1


def test_one_layer_model_and_tuple_batches() -> None:
    model = nn.Linear(8, 3).eval()
    data = [(torch.randn(4, 8), torch.zeros(4)) for _ in range(2)]
    q = quantize_static(model, data, progress=False)
    assert type(q).__name__ == "QuantizedLinear"  # the root itself is swapped
    x = torch.randn(5, 8)
    assert cosine(q(x), model(x)) > 0.995


def test_no_quantizable_layer_warns_and_returns_unchanged() -> None:
    model = nn.Sequential(nn.ReLU(), nn.MaxPool1d(2))
    with pytest.warns(UserWarning, match="no quantizable layer"):
        q = quantize_dynamic(model)
    assert q.lowbit_report.quantized == []
    assert [type(m) for m in q] == [nn.ReLU, nn.MaxPool1d]


def test_quantizing_a_quantized_model_says_its_layers_are_quantized_already() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    qmodel = quantize_dynamic(model)
    with pytest.warns(UserWarning, match="2 of its layers are lowbit quantized layers already"):
        again = quantize_static(qmodel, [torch.randn(4, 8)], progress=False)
    x = torch.randn(3, 8)
    assert torch.equal(again(x), qmodel(x))  # unchanged: still the dynamic model


def test_nan_weights_clear_error() -> None:
    model = nn.Sequential(nn.Linear(4, 4))
    model[0].weight.data[1, 2] = float("inf")
    with pytest.raises(ValueError, match=r"0 \(Linear\)\.weight has 1 NaN/Inf.*layer_overrides"):
        quantize_dynamic(model)


def test_wrong_config_mode_for_shortcut() -> None:
    with pytest.raises(ValueError, match=r"config\.mode is 'dynamic'"):
        quantize_static(nn.Linear(2, 2), [torch.ones(1, 2)], QuantizationConfig.int8_dynamic())
    with pytest.raises(TypeError, match=r"torch\.nn\.Module"):
        quantize_dynamic("not a model")  # type: ignore[arg-type]


@pytest.mark.parametrize("method", ["static", "gptq"])
def test_a_batch_the_model_refuses_names_the_batch(method: str) -> None:
    """The model's own error stays (its type and text), with a note saying which calibration
    batch it came from and what lowbit passed to the model."""
    model = nn.Sequential(nn.Linear(32, 8)).eval()
    data = [torch.randn(4, 32), (torch.randn(4, 7), torch.zeros(4))]
    cfg = (QuantizationConfig.int8_static() if method == "static"
           else QuantizationConfig.int4_weight_only(group_size=16, method="gptq"))
    with pytest.raises(RuntimeError, match=r"mat1 and mat2|must match the size") as info:
        PTQQuantizer(cfg, progress=False).quantize(model, data)
    assert info.value.__notes__ == [
        "lowbit: the model raised this on calibration batch 1, a tuple of 2 (the model gets its "
        "first item: a float32 tensor of shape (4, 7)); calibration batches must be inputs the "
        "float model accepts (a tensor, an (input, target) tuple, or a dict of keyword inputs)"]


def test_layer_not_reached_by_calibration_is_kept_float_and_reported() -> None:
    class Unused(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.used = nn.Linear(4, 4)
            self.unused = nn.Linear(4, 4)

        def forward(self, x):
            return self.used(x)

    q = quantize_static(Unused(), [torch.randn(2, 4)], progress=False)
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert rows["unused"].status == "skipped" and "not reached" in rows["unused"].reason
    assert type(q.unused) is nn.Linear


def test_report_markdown_lists_every_layer(images) -> None:
    q = quantize_static(ConvNet().eval(), images, progress=False,
                        config=QuantizationConfig.int8_static(skip_layers=("fc2",)))
    md = q.lowbit_report.to_markdown()
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert f"| {name} |" in md
    assert "3 quantized, 1 kept in FP32 on request, 0 skipped" in md
    d = q.lowbit_report.to_dict()
    assert d["layers"][0]["calibration"]["num_batches"] == len(images)


def test_report_markdown_escapes_a_pipe_in_a_layer_name() -> None:
    model = nn.Sequential()
    model.add_module("a|b", nn.Linear(4, 4))  # (nn.ModuleDict keys may hold any character)
    row = quantize_dynamic(model).lowbit_report.to_markdown().splitlines()[2]
    assert row.startswith("| a\\|b | Linear | quantized |") and row.count(" | ") == 4


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_shared_layer_is_reported_under_every_name_and_stays_shared(
        mode: str, shared_layer_model: nn.Module) -> None:
    model = shared_layer_model
    x = torch.randn(16, 8)
    if mode == "dynamic":
        q = quantize_dynamic(model)
    else:
        q = quantize_static(model, [x[:8], x[8:]], progress=False)
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert rows["a"].status == rows["b"].status == "quantized"
    assert "same module as 'a'" in rows["b"].reason
    assert q.a is q.b and type(q.a).__name__ == "QuantizedLinear"
    assert not q.a.fused_relu  # the ReLU follows only one of the two calls
    ref = model(x)
    out = q(x)
    assert torch.nn.functional.cosine_similarity(out.flatten(), ref.flatten(), dim=0) > 0.999


@pytest.mark.parametrize(("rule", "expected"), [
    ({"skip_layers": ("b",)}, nn.Linear),
    ({"layer_overrides": {"b": None}}, nn.Linear),
    ({"layer_overrides": {"b": QuantizationConfig.int4_weight_only(group_size=8)}}, "Int4Linear"),
    ({"layer_overrides": {"a": None, "b": None}}, nn.Linear),
])
def test_a_rule_naming_a_shared_layers_second_name_applies(
        rule: dict, expected: type | str, shared_layer_model: nn.Module) -> None:
    """A skip / override naming ``b`` (the second name of layer ``a``) was ignored with a
    warning that ``'b'`` matches no layer; it now applies to the one module under both names."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (no "matches no layer" warning)
        q = PTQQuantizer(QuantizationConfig.int8_dynamic(**rule), progress=False).quantize(
            shared_layer_model)
    assert q.a is q.b
    assert (type(q.a) is expected if isinstance(expected, type)
            else type(q.a).__name__ == expected)


def test_disagreeing_rules_for_one_shared_layer_are_refused(shared_layer_model) -> None:
    cfg = QuantizationConfig.int8_dynamic(layer_overrides={
        "a": QuantizationConfig.int4_weight_only(group_size=8), "b": None})
    with pytest.raises(ValueError, match=r"'a' is one module under the names \['a', 'b'\].*"
                                         r"'a': W4 per_group/8.*'b': FP32"):
        PTQQuantizer(cfg, progress=False).quantize(shared_layer_model)
    q = PTQQuantizer(QuantizationConfig.int8_dynamic(layer_overrides={"b": None}),
                     progress=False)
    q.set_per_layer_fallback("a", True)  # the same decision under both names: accepted
    assert type(q.quantize(shared_layer_model).b) is nn.Linear


@pytest.mark.parametrize("method", ["dynamic", "static", "int4"])
def test_maxpool_after_conv_runs_inside_it(method: str, tmp_path) -> None:
    torch.manual_seed(0)
    model = MnistCNN().eval()
    x = torch.randn(3, 1, 28, 28)
    q = (quantize_dynamic(model) if method == "dynamic"
         else quantize_static(model, [torch.randn(16, 1, 28, 28)], progress=False)
         if method == "static" else quantize_weight_only(model, bits=4, group_size=32))
    assert isinstance(q.pool1, nn.Identity) and isinstance(q.pool2, nn.Identity)
    assert q.conv1.geometry["fused_maxpool"] == 2
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert rows["conv1"].fused_pool == "pool1" and rows["fc1"].fused_pool is None
    unfused = copy.deepcopy(q)  # the same integer layers with the pools run separately
    for conv in (unfused.conv1, unfused.conv2):
        conv.geometry["fused_maxpool"] = 0
    unfused.pool1, unfused.pool2 = nn.MaxPool2d(2), nn.MaxPool2d(2)
    with torch.inference_mode():
        y = q(x)
        assert torch.equal(y, unfused(x))
        save(q, tmp_path / "q")
        assert torch.equal(load(tmp_path / "q", model=MnistCNN()).eval()(x), y)
    assert "MaxPool pool1" in q.lowbit_report.to_markdown()


def _unfused_gelu(q: nn.Module, layer: str, gelu: str) -> nn.Module:
    """``q`` with the GELU fused into ``layer`` run as its own module again."""
    u = copy.deepcopy(q)
    approximate = u.get_submodule(layer).fused_gelu
    u.get_submodule(layer).fused_gelu = None
    u.set_submodule(gelu, nn.GELU(approximate=approximate))
    return u


@pytest.mark.parametrize("method", ["dynamic", "static", "int4", "int8_weight_only"])
def test_gelu_after_linear_runs_inside_it(method: str, tmp_path) -> None:
    """The encoder's FFN GELU runs in place on the quantized ffn_in's output: the same values as
    the separate module, one activation-sized tensor less; saved and loaded with the layer."""
    torch.manual_seed(0)
    model = TransformerEncoderBlock(hidden=32, heads=4, ffn=64).eval()
    x = torch.randn(2, 5, 32)
    q = (quantize_dynamic(model) if method == "dynamic"
         else quantize_static(model, [torch.randn(4, 5, 32)], progress=False)
         if method == "static" else quantize_weight_only(model, bits=4, group_size=32)
         if method == "int4" else quantize_weight_only(model, bits=8))
    assert isinstance(q.act, nn.Identity) and q.ffn_in.fused_gelu == "none"
    assert all(getattr(q, n).fused_gelu is None for n in ("query", "key", "attn_out", "ffn_out"))
    rows = {r.name: r for r in q.lowbit_report.rows}
    assert rows["ffn_in"].fused_gelu == "act" and rows["ffn_out"].fused_gelu is None
    assert "GELU act" in q.lowbit_report.to_markdown()
    assert q.lowbit_report.to_dict()["layers"][4]["fused_gelu"] == "act"
    with torch.inference_mode():
        y = q(x)
        for batch in (x, x[:1, :1]):  # many rows, and one (the small C paths)
            assert torch.equal(q(batch), _unfused_gelu(q, "ffn_in", "act")(batch))
        assert torch.nn.functional.cosine_similarity(y.flatten(), model(x).flatten(), 0) > 0.99
        save(q, tmp_path / "q")
        back = load(tmp_path / "q", model=TransformerEncoderBlock(hidden=32, heads=4, ffn=64))
        assert back.ffn_in.fused_gelu == "none" and torch.equal(back.eval()(x), y)
    assert model.act.__class__ is nn.GELU  # the float model is untouched


def test_gelu_fusion_keeps_the_tanh_approximation_and_leaves_other_gelus() -> None:
    """Fused: an nn.GELU module (tanh too) directly after a Linear. Not fused: a GELU module
    called twice, one after a non-Linear, and a functional F.gelu (not idempotent, and the
    forward would still call it)."""

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.g1 = nn.Linear(8, 8), nn.GELU(approximate="tanh")
            self.fc2, self.shared = nn.Linear(8, 8), nn.GELU()
            self.fc3, self.norm, self.g3 = nn.Linear(8, 8), nn.LayerNorm(8), nn.GELU()
            self.fc4 = nn.Linear(8, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.g1(self.fc1(x))
            x = self.shared(self.shared(self.fc2(x)))
            x = self.g3(self.norm(self.fc3(x)))
            return F.gelu(self.fc4(x))

    torch.manual_seed(0)
    model = Net().eval()
    q = quantize_dynamic(model)
    assert q.fc1.fused_gelu == "tanh" and isinstance(q.g1, nn.Identity)
    assert q.fc2.fused_gelu is None and isinstance(q.shared, nn.GELU)
    assert q.fc3.fused_gelu is None and isinstance(q.g3, nn.GELU)
    assert q.fc4.fused_gelu is None
    x = torch.randn(3, 8)
    assert torch.equal(q(x), _unfused_gelu(q, "fc1", "g1")(x))
    seq = quantize_dynamic(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 2)))
    assert seq[0].fused_gelu == "none" and isinstance(seq[1], nn.Identity)


def _hf_model(kind: str) -> tuple[nn.Module, str, str]:
    """A transformers model built offline from a config (torch.fx cannot trace either whole),
    with the names of its first FFN input layer and the GELU module after it."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, intermediate_size=64)
        ffn = "encoder.layer.0.intermediate"
        return transformers.BertModel(cfg).eval(), f"{ffn}.dense", f"{ffn}.intermediate_act_fn"
    cfg = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=2,
                                  activation_function="gelu_pytorch_tanh")
    return transformers.GPT2Model(cfg).eval(), "h.0.mlp.c_fc", "h.0.mlp.act"


@pytest.mark.parametrize("kind", ["bert", "gpt2"])
@pytest.mark.parametrize("method", ["dynamic", "int4"])
def test_transformers_gelu_activation_fuses_without_fx(kind: str, method: str,
                                                       tmp_path) -> None:
    """transformers' GELUActivation / GELUTanh after a Linear (GPT-2: its Conv1D) runs inside
    the quantized layer although fx cannot trace the whole model: same values as the module
    run on its own, saved and loaded with the layer; the float model keeps its GELUs."""
    model, layer, act = _hf_model(kind)
    q = (quantize_dynamic(model) if method == "dynamic"
         else quantize_weight_only(model, bits=4, group_size=32))
    approximate = "none" if kind == "bert" else "tanh"
    fused = [n for n, m in q.named_modules() if getattr(m, "fused_gelu", None) == approximate]
    assert len(fused) == 2 and layer in fused and isinstance(q.get_submodule(act), nn.Identity)
    assert type(model.get_submodule(act)).__name__ != "Identity"
    ids = torch.randint(0, 100, (2, 7))
    with torch.inference_mode():
        y = q(ids).last_hidden_state
        unfused = copy.deepcopy(q)
        for name in fused:
            unfused = _unfused_gelu(unfused, name, act.replace(layer.rsplit(".", 2)[0],
                                                               name.rsplit(".", 2)[0]))
        assert torch.equal(unfused(ids).last_hidden_state, y)
        save(q, tmp_path / "q")
        back = load(tmp_path / "q", model=_hf_model(kind)[0])
        assert back.get_submodule(layer).fused_gelu == approximate
        assert torch.equal(back.eval()(ids).last_hidden_state, y)


def test_fused_gelu_is_validated() -> None:
    q = quantize_dynamic(nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(ValueError, match="fuses one activation; it already has fused_relu"):
        q[0].fused_gelu = "none"
    with pytest.raises(ValueError, match="must be None, 'none' or 'tanh'"):
        quantize_dynamic(nn.Linear(4, 4)).fused_gelu = "erf"


# ------------------------------------------------------------------ degenerate calibration


def test_constant_calibration_input_warns_and_keeps_the_layer_float() -> None:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)).eval()
    with pytest.warns(RuntimeWarning, match=r"0: calibration saw a constant input .*kept in "
                                            r"float"):
        q = quantize_static(net, [torch.zeros(3, 4)], progress=False)
    assert isinstance(q[0], nn.Linear) and type(q[2]).__name__ == "QuantizedLinear"
    row = next(r for r in q.lowbit_report.rows if r.name == "0")
    assert row.status == "skipped" and "constant input" in row.reason
    x = torch.randn(5, 4)
    torch.testing.assert_close(q[0](x), net[0](x))  # the float layer, not its bias


def test_unreached_layers_warn_and_stay_float() -> None:
    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.unused = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.a(x)

    with pytest.warns(RuntimeWarning, match="unused"):
        q = quantize_static(Branchy().eval(), [torch.randn(3, 4)], progress=False)
    assert isinstance(q.unused, nn.Linear) and type(q.a).__name__ == "QuantizedLinear"


def test_calibration_tuples_for_a_multi_input_model_say_to_use_dicts() -> None:
    class Two(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.a(x) + y

    batch = (torch.randn(2, 4), torch.randn(2, 4))
    with pytest.raises(TypeError, match=r"tuple of 2 items.*dict"):
        quantize_static(Two(), [batch], progress=False)
    q = quantize_static(Two(), [{"x": batch[0], "y": batch[1]}], progress=False)
    assert type(q.a).__name__ == "QuantizedLinear"


def test_meta_device_models_are_refused_with_what_to_do() -> None:
    with torch.device("meta"):
        net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match=r"'meta' device.*to_empty"):
        quantize_dynamic(net)


class _TiedLM(nn.Module):
    """A language model whose output layer shares the input embedding's table (as
    ``tie_word_embeddings=True`` models: OPT, BLOOM, Gemma, RoBERTa ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(60, 32)
        self.body = nn.Linear(32, 32)
        self.head = nn.Linear(32, 60, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.body(self.embed(ids))))


@pytest.mark.parametrize("inplace", [False, True])
@pytest.mark.parametrize("how", ["dynamic_smooth_quant", "static_smooth_quant", "gptq", "awq",
                                 "signround"])
def test_tied_embedding_keeps_its_float_table_when_the_head_is_written(how: str,
                                                                       inplace: bool) -> None:
    """SmoothQuant / GPTQ / AWQ / SignRound write the output layer's weight before converting
    it; tied to the embedding, the float embedding looked up those rows (cosine 0.63 on OPT)."""
    import lowbit

    torch.manual_seed(0)
    model = _TiedLM().eval()
    table = model.embed.weight.detach().clone()
    data = [torch.randint(0, 60, (4, 10)) for _ in range(3)]
    kw = {"progress": False, "inplace": inplace}
    if how == "dynamic_smooth_quant":
        q = lowbit.quantize_dynamic(model, smooth_quant=0.5, calibration_data=data, **kw)
    elif how == "static_smooth_quant":
        q = lowbit.quantize_static(model, data, smooth_quant=0.5, **kw)
    else:
        q = lowbit.quantize_weight_only(model, bits=4, group_size=16, method=how,
                                        calibration_data=data, **kw)
    assert type(q.head).__name__ in ("QuantizedLinear", "Int4Linear")
    assert type(q.embed) is nn.Embedding and torch.equal(q.embed.weight, table)
    assert inplace or torch.equal(model.embed.weight, table)
    ids = torch.randint(0, 60, (2, 10))
    with torch.no_grad():
        assert torch.equal(q.embed(ids), F.embedding(ids, table))


def test_skip_override_and_fallback_of_a_container_keep_its_layers_float() -> None:
    """The README's own ``skip_layers=("classifier",)`` names a container in torchvision-style
    models: every layer in it was quantized anyway, with no warning. Each route now keeps the
    container's layers float; the layers outside it are quantized."""
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.classifier = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    model, data = Net().eval(), [torch.randn(8, 4)]
    routes = [QuantizationConfig.int8_static(skip_layers=("classifier",)),
              QuantizationConfig.int8_static(layer_overrides={"classifier": None}), None]
    for config in routes:
        quantizer = PTQQuantizer(config or QuantizationConfig.int8_static(), progress=False)
        if config is None:
            quantizer.set_per_layer_fallback("classifier", True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # (no "matches no layer" either)
            q = quantizer.quantize(model, data)
        assert q.lowbit_report.quantized == ["features.0"]
        assert sorted(q.lowbit_report.fp32) == ["classifier.0", "classifier.2"]
        assert type(q.classifier[0]) is nn.Linear and type(q.classifier[2]) is nn.Linear


def test_quantize_weight_only_8_bit_takes_a_group_size() -> None:
    """bits=8 with group_size=32 gave per-channel weights: the group size was ignored."""
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(256, 64))
    assert quantize_weight_only(m, bits=8)[0].weight_spec.granularity == "per_channel"
    grouped = quantize_weight_only(m, bits=8, group_size=32)[0]
    assert (grouped.weight_spec.group_size, tuple(grouped.weight_scale.shape)) == (32, (64, 8))
    assert quantize_weight_only(m)[0].weight_spec.group_size == 128
