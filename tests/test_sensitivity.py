"""Per-layer sensitivity analysis and automatic FP32 fallback."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import Subset, TensorDataset

from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.data import mnist_splits
from lowbit.evaluation import evaluate_accuracy
from lowbit.models import MLP, MnistCNN, TransformerEncoderBlock, train_classifier
from lowbit.sensitivity import SensitivityReport, analyze_sensitivity, auto_fallback

PER_TENSOR_STATIC = QuantizationConfig.int8_static().__class__(
    weights=QuantSpec(bits=8, granularity="per_tensor"),
    activations=QuantSpec.int8_static_activation(), mode="static")


def _trap_model() -> nn.Sequential:
    """Four Linear layers; layer "2" is deliberately sensitive to per-tensor quantization.

    Hidden unit 0 is always zero (ReLU of a negative constant), so the float model ignores
    layer 2's huge weight on it; quantized per tensor, that outlier sets a scale so large that
    every other weight of layer 2 rounds to zero.
    """
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(),
                          nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).eval()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):  # He init, no bias: inputs drive the outputs
                nn.init.normal_(layer.weight, std=(2.0 / layer.in_features) ** 0.5)
                layer.bias.zero_()
        model[0].weight[0].zero_()
        model[0].bias[0] = -1.0
        model[2].weight[:, 0] = 0.0
        model[2].weight[0, 0] = 1000.0
    return model


@pytest.fixture(scope="module")
def trap() -> tuple[nn.Sequential, list[torch.Tensor], object]:
    model = _trap_model()
    x = torch.randn(512, 16, generator=torch.Generator().manual_seed(1))
    labels = model(x).argmax(1).detach()

    def agreement(m: nn.Module) -> float:  # % of float predictions kept, higher is better
        with torch.inference_mode():
            return 100.0 * float((m(x).argmax(1) == labels).float().mean())

    return model, list(x[:256].split(64)), agreement


def test_identifies_the_sensitive_layer(trap) -> None:
    model, calib, agreement = trap
    rep = analyze_sensitivity(model, PER_TENSOR_STATIC, agreement, calib, progress=False,
                              metric_name="agreement")
    assert rep.most_sensitive(1) == ["2"]
    assert sorted(r.name for r in rep.rows) == ["0", "2", "4", "6"]
    worst, *others = rep.rows
    assert worst.drop > 30 and all(r.drop < 5 for r in others)
    assert worst.cosine < min(r.cosine for r in others)
    assert rep.baseline == 100.0 and rep.quantized_metric < 70
    assert all(isinstance(p, torch.Tensor) for p in model.state_dict().values())
    assert type(model[2]) is nn.Linear  # the float model is untouched


def test_auto_fallback_keeps_the_sensitive_layer_in_fp32(trap) -> None:
    model, calib, agreement = trap
    qmodel, fallback = auto_fallback(model, PER_TENSOR_STATIC, agreement, calib, budget=2.0,
                                     progress=False)
    assert fallback == ["2"]
    assert type(qmodel[2]) is nn.Linear
    assert {type(qmodel[i]).__name__ for i in (0, 4, 6)} == {"QuantizedLinear"}
    assert 100.0 - agreement(qmodel) <= 2.0
    assert qmodel.lowbit_report.fp32 == ["2"]
    assert qmodel.lowbit_fallback["layers"] == ["2"]


def test_auto_fallback_reuses_a_report_and_warns_when_budget_unreachable(trap) -> None:
    model, calib, agreement = trap
    rep = analyze_sensitivity(model, PER_TENSOR_STATIC, agreement, calib, progress=False)
    with pytest.warns(UserWarning, match="still above budget"):
        _, fallback = auto_fallback(model, PER_TENSOR_STATIC, agreement, calib, budget=0.0,
                                    sensitivity=rep, progress=False, max_fallback=1)
    assert fallback == ["2"]
    with pytest.raises(ValueError, match="budget=-1"):
        auto_fallback(model, PER_TENSOR_STATIC, agreement, calib, budget=-1)


def test_output_error_ranking_without_eval_fn(trap) -> None:
    model, calib, _ = trap
    rep = analyze_sensitivity(model, PER_TENSOR_STATIC, None, iter(calib), progress=False)
    assert rep.most_sensitive(1) == ["2"] and rep.baseline is None
    assert rep.rows[0].metric is None and rep.rows[0].sensitivity == 1 - rep.rows[0].cosine
    with pytest.raises(ValueError, match="pass eval_fn"):
        analyze_sensitivity(model, QuantizationConfig.int8_dynamic(), None)


def test_layers_filter(trap) -> None:
    model, calib, agreement = trap
    rep = analyze_sensitivity(model, PER_TENSOR_STATIC, agreement, calib, layers=["4", "6"],
                              progress=False)
    assert sorted(r.name for r in rep.rows) == ["4", "6"]
    with pytest.raises(ValueError, match=r"layers \['nope'\] are not quantized"):
        analyze_sensitivity(model, PER_TENSOR_STATIC, agreement, calib, layers=["nope"])


def test_mnist_sensitivity_and_serialization_of_the_report() -> None:
    splits = mnist_splits()
    torch.manual_seed(0)
    model = train_classifier(MLP(hidden=(64,)), Subset(splits.train, range(2000)), epochs=1,
                             progress=False)
    evalset = TensorDataset(*(t[:500] for t in splits.eval.tensors))
    calib = list(splits.train.tensors[0][:256].split(64))
    accuracy = lambda m: evaluate_accuracy(m, evalset)  # noqa: E731
    rep = analyze_sensitivity(model, QuantizationConfig.int8_static(), accuracy, calib,
                              progress=False, metric_name="accuracy")
    assert {r.name for r in rep.rows} == {"layers.0", "layers.2"}
    assert rep.baseline > 60  # a 1-epoch MLP on 2,000 images
    assert all(abs(r.drop) < 5 and r.cosine > 0.98 for r in rep.rows)
    text = rep.to_markdown()
    assert "| 1 | " in text and "FP32 accuracy" in text
    again = SensitivityReport.from_dict(json.loads(json.dumps(rep.to_dict())))
    assert again == rep
    qmodel, fallback = auto_fallback(model, QuantizationConfig.int8_static(), accuracy, calib,
                                     budget=5.0, sensitivity=rep, progress=False)
    assert fallback == [] and qmodel.lowbit_report.fp32 == []


def test_folded_batchnorm_is_measured_once() -> None:
    """conv1 carries bn1 folded in: analysing it alone must not apply the BatchNorm twice."""
    torch.manual_seed(0)
    model = MnistCNN().eval()
    with torch.no_grad():
        model.bn1.running_mean.uniform_(-1, 1)
        model.bn1.running_var.uniform_(0.2, 3.0)
    x = torch.randn(16, 1, 28, 28)
    rep = analyze_sensitivity(model, QuantizationConfig.int8_dynamic(), example_input=x,
                              progress=False)
    conv1 = next(r for r in rep.rows if r.name == "conv1")
    assert conv1.cosine > 0.999


def test_fused_gelu_is_applied_once() -> None:
    """ffn_in carries the FFN's GELU: analysing it alone swaps the GELU module out with it."""
    torch.manual_seed(0)
    model = TransformerEncoderBlock(hidden=32, heads=4, ffn=64).eval()
    x = torch.randn(2, 6, 32)
    rep = analyze_sensitivity(model, QuantizationConfig.int8_dynamic(), example_input=x,
                              progress=False)
    ffn_in = next(r for r in rep.rows if r.name == "ffn_in")
    assert ffn_in.cosine > 0.9999 and isinstance(model.act, nn.GELU)  # twice: 0.9986


def test_models_with_multihead_attention_and_training_mode() -> None:
    """nn.MultiheadAttention is quantized as its projections (q_proj...): analysing one of
    them failed ("MultiheadAttention has no attribute q_proj"). auto_fallback took its
    baseline on the user's model as given: in training mode that ran dropout and moved the
    BatchNorm statistics of the caller's model."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, dropout=0.5, batch_first=True),
                          nn.Linear(16, 4)).train()
    x = torch.randn(3, 5, 16)
    rep = analyze_sensitivity(model, QuantizationConfig.int8_dynamic(), example_input=x,
                              progress=False)
    names = {r.name for r in rep.rows}
    assert {"0.self_attn.q_proj", "0.linear1", "1"} <= names
    assert all(r.cosine > 0.99 for r in rep.rows)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eval_model = nn.Sequential(nn.TransformerEncoderLayer(16, 2, 32, batch_first=True),
                               nn.Linear(16, 4))
    eval_model.load_state_dict(state)
    eval_model.eval()
    score = lambda m: -float((m(x) - eval_model(x)).detach().abs().mean())  # noqa: E731
    q, _ = auto_fallback(model, QuantizationConfig.int8_dynamic(), score, budget=1.0,
                         progress=False)
    assert q.lowbit_fallback["baseline"] == 0.0 and model.training  # no dropout in it
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


def test_auto_fallback_to_another_config_gives_mixed_precision(trap) -> None:
    """``fallback_config``: the most sensitive layer gets that config (here dynamic per-token
    INT8) instead of FP32; the others keep the main config."""
    model, calib, agreement = trap
    dynamic = QuantizationConfig.int8_dynamic()
    with pytest.warns(UserWarning, match=r"still above budget .* in dynamic fallback \(\['2'\]"):
        qmodel, fallback = auto_fallback(model, PER_TENSOR_STATIC, agreement, calib,
                                         budget=0.0, progress=False, max_fallback=1,
                                         fallback_config=dynamic)
    assert fallback == ["2"] and qmodel.lowbit_report.fp32 == []
    assert [qmodel[i].mode for i in (0, 2, 4, 6)] == ["static", "dynamic", "static", "static"]
    assert qmodel.lowbit_fallback["config"] == dynamic.to_dict()
    with pytest.raises(TypeError, match="fallback_config must be a QuantizationConfig"):
        auto_fallback(model, PER_TENSOR_STATIC, agreement, calib, fallback_config="int8")


def test_output_error_ranking_reads_a_transformers_model_output() -> None:
    """Without eval_fn the ranking compares the first output tensor; a transformers
    ``ModelOutput`` (a dict) gives its ``last_hidden_state`` (it used to count as no tensor:
    every layer ranked 0)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    bert = transformers.BertModel(transformers.BertConfig(
        vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=64)).eval()
    batches = [{"input_ids": torch.randint(0, 100, (2, 8))} for _ in range(2)]
    rep = analyze_sensitivity(bert, QuantizationConfig.int4_weight_only(32), None, batches,
                              progress=False)
    cosine = {r.name: r.cosine for r in rep.rows}
    assert len(cosine) == 7 and cosine["pooler.dense"] > 1 - 1e-12  # not in last_hidden_state
    assert sum(c < 1 - 1e-9 for c in cosine.values()) >= 4  # FFN, value, attention output
    assert rep.rows[0].sensitivity > 0

    class Text(nn.Module):
        def forward(self, x: torch.Tensor) -> str:
            return "no tensor"

    with pytest.raises(ValueError, match="holds no tensor to compare; pass eval_fn"):
        analyze_sensitivity(nn.Sequential(nn.Linear(4, 4), Text()), None, None,
                            [torch.randn(2, 4)], progress=False)


def test_bad_metrics_and_settings_are_refused(trap) -> None:
    """A NaN metric had counted as meeting the budget (and a NaN budget as any budget), a
    negative max_fallback fell back every layer but the last."""
    model, calib, agreement = trap
    nan_quantized = lambda m: 100.0 if type(m[2]) is nn.Linear else float("nan")  # noqa: E731
    with pytest.raises(ValueError, match="eval_fn returned nan for the quantized model"):
        auto_fallback(model, PER_TENSOR_STATIC, nan_quantized, calib, progress=False)
    with pytest.raises(ValueError, match="eval_fn returned nan for the quantized model"):
        analyze_sensitivity(model, PER_TENSOR_STATIC, nan_quantized, calib, progress=False)
    with pytest.raises(ValueError, match="budget=nan"):
        auto_fallback(model, PER_TENSOR_STATIC, agreement, calib, budget=float("nan"))
    with pytest.raises(ValueError, match="max_fallback=-1"):
        auto_fallback(model, PER_TENSOR_STATIC, agreement, calib, max_fallback=-1)


@pytest.mark.parametrize("example", [torch.randn(0, 16), torch.full((4, 16), float("nan"))],
                         ids=["empty", "nan"])
def test_an_example_input_nothing_can_be_measured_on_is_refused(example) -> None:
    """An empty example scored every layer cosine 1.0 (perfectly safe), a NaN one ranked the
    layers by NaN in arbitrary order; auto_fallback then fell back in that order."""
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    with pytest.raises(ValueError, match=r"the float model's output on example_input "
                                         r"(is empty|holds NaN/Inf)"):
        analyze_sensitivity(model, example_input=example, progress=False)


def test_an_eval_fn_that_leaves_train_mode_does_not_change_the_measurements() -> None:
    """The working copy is back in eval mode after every eval_fn call: an eval_fn ending with
    model.train() had left dropout on for the output error (cosine 0.52 instead of 1.0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.Dropout(0.5), nn.ReLU(), nn.Linear(32, 4)).eval()
    x = torch.randn(64, 16)

    def score(m: nn.Module, restore: bool) -> float:
        m.eval()
        with torch.no_grad():
            value = -float((m(x) - model(x)).abs().mean())
        if restore:
            m.train()
        return value

    clean, messy = (analyze_sensitivity(model, None, lambda m, r=r: score(m, r),
                                        example_input=x, progress=False) for r in (False, True))
    assert [(r.name, r.drop, r.cosine) for r in messy.rows] == [
        (r.name, r.drop, r.cosine) for r in clean.rows]
    assert min(r.cosine for r in messy.rows) > 0.999
    q, _ = auto_fallback(model, None, lambda m: score(m, True), budget=1.0, progress=False)
    assert not q.training


def test_a_shared_layer_is_one_row_measured_at_every_call_site() -> None:
    """A module registered under two names had a row per name, each quantized at one call site
    only (the other still float): its error was understated."""
    class Twice(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = self.a
            self.head = nn.Linear(16, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.b(torch.relu(self.a(x))))

    torch.manual_seed(0)
    model = Twice().eval()
    x = torch.randn(64, 16)
    per_tensor = QuantizationConfig(weights=QuantSpec(granularity="per_tensor"))
    rep = analyze_sensitivity(model, per_tensor, example_input=x, progress=False)
    assert sorted(r.name for r in rep.rows) == ["a", "head"]
    by_alias = analyze_sensitivity(model, per_tensor, example_input=x, layers=["b"],
                                   progress=False)  # (its other name: the same row)
    assert [r.name for r in by_alias.rows] == ["a"]
    only_a = lowbit_quantize_only(model, per_tensor, "a")
    row = next(r for r in rep.rows if r.name == "a")
    with torch.no_grad():
        expected = float((only_a(x) - model(x)).norm() / model(x).norm())
    assert row.rel_l2 == pytest.approx(expected, rel=1e-5)


def lowbit_quantize_only(model: nn.Module, config: QuantizationConfig, name: str) -> nn.Module:
    from dataclasses import replace

    from lowbit.ptq import PTQQuantizer
    others = {n: None for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != name
              and m is not model.get_submodule(name)}
    return PTQQuantizer(replace(config, layer_overrides=others), progress=False).quantize(model)


def test_a_model_that_is_one_layer_is_analysed() -> None:
    torch.manual_seed(0)
    model = nn.Linear(8, 4).eval()
    x = torch.randn(32, 8)
    rep = analyze_sensitivity(model, None, lambda m: -float((m(x) - model(x)).abs().mean()),
                              example_input=x, progress=False)
    assert [r.name for r in rep.rows] == [""] and rep.rows[0].cosine > 0.999
    with pytest.warns(UserWarning, match="no quantizable layer") as seen:  # (it is in FP32)
        q, fallback = auto_fallback(model, None, lambda m: -float((m(x) - model(x)).abs().mean()),
                                    budget=0.0, progress=False)
    assert fallback == [""] and type(q) is nn.Linear
    assert not [w for w in seen if "matches no layer" in str(w.message)]


def test_sensitive_layers_by_threshold(trap) -> None:
    """Seed 000: 'identify sensitive layers that need FP32 fallback' by a per-layer limit, not
    only the top k: the layers above the threshold, most sensitive first, as skip_layers."""
    model, calib, agreement = trap
    rep = analyze_sensitivity(model, PER_TENSOR_STATIC, agreement, calib, progress=False)
    cut = (rep.rows[0].sensitivity + rep.rows[1].sensitivity) / 2
    assert rep.sensitive_layers(cut) == [rep.rows[0].name] == rep.most_sensitive(1)
    assert rep.sensitive_layers(float(rep.rows[-1].sensitivity) - 1) == [r.name for r in rep.rows]
    for bad in (float("nan"), "1", True):
        with pytest.raises(ValueError, match=r"threshold=.* must be a finite number"):
            rep.sensitive_layers(bad)
