"""GPTQ / AWQ weight calibration and SmoothQuant (lowbit.weight_calibration) on small layers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowbit
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.onnx._layers import export_layer
from lowbit.ops import choose_qparams, compute_range
from lowbit.ptq import PTQQuantizer, quantize_static, quantize_weight_only
from lowbit.weight_calibration import _output_error, _rtn, awq_search, gptq_quantize, smooth_quant

SPEC = QuantSpec.int4_weight(group_size=16)


def _data(rows: int = 512, k: int = 64, seed: int = 0) -> torch.Tensor:
    """Correlated activations with a few large channels (what makes GPTQ / AWQ matter)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g) @ torch.randn(k, k, generator=g) / k**0.5
    return x * torch.logspace(-0.5, 1, k)[torch.randperm(k, generator=g)]


def _gptq_reference(w: torch.Tensor, h: torch.Tensor, spec: QuantSpec, damp: float = 0.01
                    ) -> torch.Tensor:
    """GPTQ written out in float64: no blocks, no Cholesky; the full inverse Hessian of the
    remaining columns, recomputed after each column (OBQ / GPTQ paper, eqs. 2-3)."""
    w, h = w.double().clone(), h.double().clone()
    h += damp * torch.diag(h).mean() * torch.eye(len(h), dtype=torch.float64)
    k, g = w.shape[1], spec.group_size
    col = spec.with_(granularity="per_channel", group_size=None)
    q = torch.zeros_like(w)
    hinv = torch.linalg.inv(h)
    for c in range(k):
        if c % g == 0:
            scale, zp = choose_qparams(*compute_range(w[:, c:c + g].float(), col), col)
            s, z = scale.double(), zp.double()
        q[:, c] = ((w[:, c] / s).round() + z).clamp(spec.qmin, spec.qmax).sub(z).mul(s)
        err = (w[:, c] - q[:, c]) / hinv[0, 0]
        w[:, c:] -= torch.outer(err, hinv[0, :])
        hinv = hinv[1:, 1:] - torch.outer(hinv[1:, 0], hinv[0, 1:]) / hinv[0, 0]  # drop column
    return q


def test_gptq_beats_rtn_and_matches_float64_reference():
    x = _data()
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    h = x.T @ x
    q, scale, zp = gptq_quantize(w, h, SPEC, block_size=32)  # 2 groups per lazy block
    assert scale.shape == zp.shape == (24, 4)
    ref = _gptq_reference(w, h, SPEC)
    assert torch.allclose(q.double(), ref, atol=1e-5)
    err_gptq = float(((x @ (q - w).T) ** 2).sum())
    err_rtn = float(((x @ (_rtn(w, SPEC) - w).T) ** 2).sum())
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)
    # on the grid: codes in range, the module stores exactly these values
    codes = torch.round(q.reshape(24, 4, 16) / scale.unsqueeze(-1)) + zp.unsqueeze(-1)
    assert int(codes.min()) >= SPEC.qmin and int(codes.max()) <= SPEC.qmax
    q2, *_ = gptq_quantize(w, h, SPEC, block_size=32)
    assert torch.equal(q, q2)  # deterministic
    qa, *_ = gptq_quantize(w, h, SPEC, act_order=True)
    assert float(((x @ (qa - w).T) ** 2).sum()) < err_rtn


def test_awq_objective_below_rtn_and_deterministic():
    x = _data()
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(2))
    h = x.T @ x
    s, alpha = awq_search(w, h, x.abs().mean(0), SPEC)
    err_awq = float(_output_error(w, _rtn(w * s, SPEC) / s, h))
    err_rtn = float(_output_error(w, _rtn(w, SPEC), h))
    assert alpha > 0 and err_awq < err_rtn
    assert torch.allclose(err_rtn * torch.ones(1), ((x @ (_rtn(w, SPEC) - w).T) ** 2).sum(),
                          rtol=1e-4)  # the objective is the output error
    s2, _ = awq_search(w, h, x.abs().mean(0), SPEC)
    assert torch.equal(s, s2)


def _mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()


@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_methods_end_to_end_lower_error_deterministic_and_round_trip(method, tmp_path):
    model, x = _mlp(), _data(256)
    calib = list(x.split(64))
    ref = model(x)
    rtn = quantize_weight_only(model, group_size=16)
    q = quantize_weight_only(model, group_size=16, method=method, calibration_data=calib,
                             progress=False)
    again = PTQQuantizer(QuantizationConfig.int4_weight_only(16, method=method),
                         progress=False).quantize(model, calib)
    assert type(q[0]).__name__ == type(rtn[0]).__name__ == "Int4Linear"  # same modules
    assert torch.equal(q[0].weight, again[0].weight) and torch.equal(q[2].weight, again[2].weight)
    assert ((q(x) - ref) ** 2).mean() < ((rtn(x) - ref) ** 2).mean()
    assert q[0].meta()["extra"]["weight_method"] == method
    assert hasattr(q[0], "input_smoothing") == (method == "awq")
    path = tmp_path / "q.safetensors"
    lowbit.save(q, path)
    loaded = lowbit.load(path, model=_mlp())
    assert torch.equal(loaded(x), q(x))
    stand_in = export_layer(q[0])  # the export keeps the smoothing (an ONNX Mul)
    assert (type(stand_in).__name__ == "_SmoothedInput") == (method == "awq")


def test_awq_model_exports_to_onnx(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    model, x = _mlp(), _data(64)
    q = quantize_weight_only(model, group_size=16, method="awq", calibration_data=[x],
                             progress=False)
    path = tmp_path / "q.onnx"
    lowbit.export_onnx(q, x[:4], path)
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = sess.run(None, {sess.get_inputs()[0].name: x[:4].numpy()})[0]
    assert torch.allclose(torch.from_numpy(out), q(x[:4]), atol=1e-4)


def test_gptq_layers_run_sequentially_on_quantized_inputs():
    """The second layer's Hessian comes from the first layer's quantized outputs."""
    from lowbit.weight_calibration import calibrate_weights

    model, x = _mlp(), _data(128)
    seen = []
    model[2].register_forward_pre_hook(lambda m, a: seen.append(model[0].weight.clone()))
    w0 = model[0].weight.clone()
    calibrate_weights(model, {"0": ("gptq", SPEC, {}), "2": ("gptq", SPEC, {})}, [x],
                      progress=False)
    assert torch.equal(seen[0], w0)  # discovery pass: float
    assert not torch.equal(seen[-1], w0)  # layer 2's pass: layer 0 already quantized


@pytest.mark.parametrize("method", ["gptq", "awq", "signround"])
def test_gpt2_conv1d_layers_are_calibrated(method):
    """transformers' GPT-2 Conv1D (weight [in, out]) is calibrated as the Linear it is."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=32)).eval()
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 100, (8, 16), generator=g)} for _ in range(4)]
    test = {"input_ids": torch.randint(0, 100, (8, 16), generator=g)}
    cfg = QuantizationConfig.int4_weight_only(32, method=method, method_kwargs=(
        {"iters": 20} if method == "signround" else {}))
    q = PTQQuantizer(cfg, progress=False).quantize(model, batches)
    conv1d = [q.transformer.h[i].get_submodule(n) for i in range(2)
              for n in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")]
    assert {m.meta()["extra"]["weight_method"] for m in conv1d} == {method}
    assert tuple(conv1d[0].weight.shape) == (64, 192)  # still reports Conv1D's [in, out]
    with torch.no_grad():
        ref = model(**test).logits
        err = float(((q(**test).logits - ref) ** 2).mean())
        rtn = PTQQuantizer(QuantizationConfig.int4_weight_only(32), progress=False).quantize(model)
        err_rtn = float(((rtn(**test).logits - ref) ** 2).mean())
    assert err < (0.9 if method == "gptq" else 1.2) * err_rtn, (err, err_rtn)


def test_errors_name_the_fix():
    with pytest.raises(ValueError, match="unknown; use one of"):
        QuantizationConfig.int4_weight_only(method="hqq2")
    with pytest.raises(ValueError, match="mode='weight_only'"):
        QuantizationConfig(method="gptq")
    with pytest.raises(ValueError, match="not options of"):
        QuantizationConfig.int4_weight_only(method="gptq", method_kwargs={"grid": 3})
    with pytest.raises(ValueError, match="alpha in"):
        QuantizationConfig.int8_static(smooth_quant=1.5)
    with pytest.raises(ValueError, match=r"calibration_data=.*method='rtn'"):
        quantize_weight_only(_mlp(), group_size=16, method="gptq")
    with pytest.raises(ValueError, match="not a one-pass iterator"):
        quantize_weight_only(_mlp(), group_size=16, method="awq",
                             calibration_data=(b for b in [torch.randn(2, 64)]))

    class OnePass:  # an iterable (not its own iterator) that yields its batches once
        def __init__(self) -> None:
            self.batches = [torch.randn(4, 64)]

        def __iter__(self):  # type: ignore[no-untyped-def]
            batches, self.batches = self.batches, []
            return iter(batches)

    with pytest.raises(ValueError, match="empty from the second pass on"):
        quantize_weight_only(_mlp(), group_size=16, method="gptq", calibration_data=OnePass())
    cfg = QuantizationConfig.int4_weight_only(32, method="awq", method_kwargs={"grid": 10})
    assert QuantizationConfig.from_json(cfg.to_json()) == cfg
    assert "method" not in QuantizationConfig.int4_weight_only().to_dict()  # old files unchanged


def _outlier_model() -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 16)).eval()
    x = torch.randn(512, 64)
    x[:, :3] *= 60  # activation outlier channels
    return model, x


def test_smooth_quant_keeps_function_and_lowers_w8a8_error():
    model, x = _outlier_model()
    ref = model(x)
    smoothed = _outlier_model()[0]
    out = smooth_quant(smoothed, {"0": 0.5, "1": 0.5}, [x], progress=False)
    assert torch.allclose(smoothed(x), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert set(out) == {"0", "1"}
    calib = list(x.split(128))
    plain = quantize_static(model, calib, progress=False)
    sq = quantize_static(model, calib, progress=False, smooth_quant=0.5)
    err = {n: float(((m(x) - ref) ** 2).mean()) for n, m in (("plain", plain), ("sq", sq))}
    assert err["sq"] < 0.5 * err["plain"], err
    assert not sq[0]._forward_hooks and not sq[0]._forward_pre_hooks  # a buffer, no hook
    dyn = lowbit.quantize_dynamic(model, smooth_quant=0.8, calibration_data=calib,
                                  progress=False)
    assert dyn[0].meta()["extra"]["smooth_quant"] == 0.8


def test_clip_search_never_rounds_a_group_worse_than_min_max() -> None:
    from lowbit.ops import choose_qparams, compute_range, fake_quantize
    from lowbit.weight_calibration import _group_qparams
    torch.manual_seed(0)
    w = torch.randn(16, 32)
    w[:, 3] *= 8  # an outlier column sets the min-max step of every row
    col = QuantSpec.int4_weight(group_size=32).with_(granularity="per_channel", axis=0,
                                                      group_size=None)
    importance = torch.rand(32) + 0.1

    def err(s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return ((fake_quantize(w, s, z, col) - w) ** 2 * importance).sum(1)

    searched = err(*_group_qparams(w, col, importance))
    plain = err(*choose_qparams(*compute_range(w, col, "weight"), col))
    assert bool((searched <= plain).all()) and bool((searched < plain).any())
    cfg = QuantizationConfig.int4_weight_only(32, method="gptq",
                                              method_kwargs={"clip_search": True})
    assert QuantizationConfig.from_json(cfg.to_json()) == cfg


class _KeywordCall(nn.Module):
    """Calls its Linears as ``fc(input=x)``, which nn.Linear allows."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(input=torch.relu(self.fc1(input=x)))


def test_layers_called_with_the_input_keyword_quantize_and_smooth() -> None:
    """A model calling ``fc(input=x)`` ran in float, but every quantized model of it raised
    "forward() got an unexpected keyword argument 'input'", and SmoothQuant's division hook
    read ``args[0]`` (IndexError). Each mode now equals the same model called positionally."""
    torch.manual_seed(0)
    model = _KeywordCall().eval()
    data = [torch.randn(32, 16) * torch.linspace(0.1, 8, 16) for _ in range(2)]
    x = data[0][:5]
    quantized = {
        "dynamic": lowbit.quantize_dynamic(model),
        "static": quantize_static(model, data, progress=False),
        "int4": quantize_weight_only(model, bits=4, group_size=16),
        "dynamic + smooth_quant": lowbit.quantize_dynamic(model, smooth_quant=0.5,
                                                          calibration_data=data, progress=False),
        "static + smooth_quant": quantize_static(model, data, smooth_quant=0.5, progress=False),
        "add_lora": lowbit.add_lora(lowbit.quantize_dynamic(model), r=2),
    }
    with torch.no_grad():
        for name, q in quantized.items():
            positional = q.fc2(torch.relu(q.fc1(x)))
            assert torch.equal(q(x), positional), name
    smoothed = _KeywordCall().eval()
    smoothed.load_state_dict(model.state_dict())
    smooth_quant(smoothed, {"fc1": 0.5}, data, progress=False)  # float function unchanged
    with torch.no_grad():
        torch.testing.assert_close(smoothed(x), model(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [QuantizationConfig.int4_weight_only(16, method="gptq"),
                                 QuantizationConfig.int4_weight_only(16, method="awq"),
                                 QuantizationConfig.int4_weight_only(16, method="signround"),
                                 QuantizationConfig.int8_dynamic(smooth_quant=0.5)],
                         ids=["gptq", "awq", "signround", "smoothquant"])
def test_nan_calibration_inputs_are_refused_naming_the_layer(cfg: QuantizationConfig) -> None:
    """A NaN in a calibration batch: GPTQ failed in a bare ``linalg.cholesky`` error, AWQ and
    SmoothQuant went on with NaN statistics, SignRound kept round-to-nearest (a NaN error never
    improves) while the layer said ``signround``."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    batches = [torch.randn(4, 16) for _ in range(3)]
    batches[1][0, 3] = float("nan")
    with pytest.raises(ValueError, match=r"0: its inputs in the calibration batches hold NaN"):
        PTQQuantizer(cfg, progress=False).quantize(model, batches)


@pytest.mark.parametrize("method", ["gptq", "awq", "signround", "smoothquant"])
def test_empty_calibration_batch_is_refused_naming_the_layer(method: str) -> None:
    """A zero-row batch: GPTQ / AWQ / SmoothQuant failed in a bare ``amax()`` IndexError naming
    no layer, SignRound kept round-to-nearest without a word."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    cfg = (QuantizationConfig.int8_dynamic(smooth_quant=0.5) if method == "smoothquant"
           else QuantizationConfig.int4_weight_only(16, method=method))
    with pytest.raises(ValueError, match=r"^0: a calibration batch gave it an empty input"):
        PTQQuantizer(cfg, progress=False).quantize(model, [torch.randn(0, 16)])
