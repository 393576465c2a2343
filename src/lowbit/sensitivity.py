"""Per-layer quantization sensitivity and automatic FP32 fallback to an accuracy budget.

:func:`analyze_sensitivity` quantizes the whole model once (so static layers are calibrated on
the float network's activations, exactly as in a full PTQ run), then, for each layer in turn,
swaps only that layer's quantized module into a float copy of the model and measures

* the drop of a user metric (``eval_fn(model) -> float``, higher is better, e.g. accuracy in
  percent) against the float model, and
* the output error on one batch (cosine similarity and relative L2) against the float output.

A layer whose BatchNorm was folded into it has that BatchNorm replaced by ``nn.Identity`` while
it is measured. :func:`auto_fallback` then keeps the most sensitive layers in FP32 one at a time
(``layer_overrides={name: None}``) until the drop is within a budget.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibration import run_batch
from lowbit.config import QuantizationConfig, real_number
from lowbit.evaluation import _check_reference, _eval_mode, compare_outputs
from lowbit.modules_mha import expand_attention
from lowbit.ptq import PTQQuantizer
from lowbit.reparam import copy_model
from lowbit.traverse import disable_fused_fast_paths

__all__ = ["LayerSensitivity", "SensitivityReport", "analyze_sensitivity", "auto_fallback"]

log = logging.getLogger(__name__)

EvalFn = Callable[[nn.Module], float]


@dataclass
class LayerSensitivity:
    """How much quantizing one layer alone hurts.

    Attributes:
        name: qualified module name.
        module_type: float class name.
        scheme: how the layer was quantized.
        metric: ``eval_fn`` with only this layer quantized (``None`` without ``eval_fn``).
        drop: baseline metric minus ``metric`` (points; ``None`` without ``eval_fn``).
        cosine: cosine similarity of the model output to the float output on one batch.
        rel_l2: relative L2 error of that output.
        sensitivity: the ranking key: ``drop`` when there is an ``eval_fn``, else
            ``1 - cosine``.
    """

    name: str
    module_type: str
    scheme: str
    metric: float | None
    drop: float | None
    cosine: float | None
    rel_l2: float | None
    sensitivity: float


@dataclass
class SensitivityReport:
    """Per-layer sensitivities, most sensitive first.

    Attributes:
        rows: one :class:`LayerSensitivity` per analysed layer, sorted by ``sensitivity``
            (descending; ties broken by lower cosine).
        baseline: the float model's metric (``None`` without ``eval_fn``).
        quantized_metric: the metric with every layer quantized.
        metric_name: what the metric is (for tables and plots).
        skipped: ``{layer: reason}`` for layers that were not quantized at all.

    Example:
        >>> row = LayerSensitivity("fc1", "Linear", "W8", 97.0, 1.5, 0.99, 0.1, 1.5)
        >>> rep = SensitivityReport([row], baseline=98.5, metric_name="accuracy")
        >>> rep.most_sensitive(1)
        ['fc1']
        >>> SensitivityReport.from_dict(rep.to_dict()) == rep
        True
    """

    rows: list[LayerSensitivity]
    baseline: float | None = None
    quantized_metric: float | None = None
    metric_name: str = "metric"
    skipped: dict[str, str] = field(default_factory=dict)

    def most_sensitive(self, k: int = 1) -> list[str]:
        """Names of the ``k`` most sensitive layers."""
        return [r.name for r in self.rows[: max(0, k)]]

    def sensitive_layers(self, threshold: float) -> list[str]:
        """Names of the layers whose ``sensitivity`` exceeds ``threshold``, most sensitive first:
        the FP32-fallback candidates by a per-layer limit (``drop`` in metric points with an
        ``eval_fn``, else ``1 - cosine`` of the output), e.g. for
        ``QuantizationConfig(skip_layers=report.sensitive_layers(0.5))``.

        Example:
            >>> rows = [LayerSensitivity("fc1", "Linear", "W8", 96.0, 2.0, None, None, 2.0),
            ...         LayerSensitivity("fc2", "Linear", "W8", 97.9, 0.1, None, None, 0.1)]
            >>> SensitivityReport(rows, baseline=98.0).sensitive_layers(0.5)
            ['fc1']
        """
        limit = real_number(threshold, "sensitive_layers: threshold",
                            "metric points with an eval_fn, else 1 - cosine")
        return [r.name for r in self.rows if r.sensitivity > limit]

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form."""
        return {"metric_name": self.metric_name, "baseline": self.baseline,
                "quantized_metric": self.quantized_metric, "skipped": dict(self.skipped),
                "rows": [asdict(r) for r in self.rows]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> SensitivityReport:
        """Inverse of :meth:`to_dict`."""
        return cls(rows=[LayerSensitivity(**r) for r in data["rows"]],
                   baseline=data.get("baseline"), quantized_metric=data.get("quantized_metric"),
                   metric_name=data.get("metric_name", "metric"),
                   skipped=dict(data.get("skipped", {})))

    def to_markdown(self) -> str:
        """A markdown table, most sensitive layer first, with the baseline underneath.

        Example:
            >>> row = LayerSensitivity("fc1", "Linear", "W8", 97.0, 1.5, 0.99, 0.1, 1.5)
            >>> print(SensitivityReport([row], 98.5, 96.0, "accuracy").to_markdown())
            | rank | layer | type | scheme | accuracy | drop | output cosine |
            |---|---|---|---|---|---|---|
            | 1 | fc1 | Linear | W8 | 97.0000 | +1.5000 | 0.990000 |
            <BLANKLINE>
            FP32 accuracy 98.5000; all layers quantized: 96.0000 (drop +2.5000).
        """
        def num(v: float | None, fmt: str) -> str:
            return "n/a" if v is None else format(v, fmt)

        m = self.metric_name
        lines = [f"| rank | layer | type | scheme | {m} | drop | output cosine |",
                 "|---|---|---|---|---|---|---|"]
        for i, r in enumerate(self.rows, 1):
            lines.append(f"| {i} | {r.name} | {r.module_type} | {r.scheme} | "
                         f"{num(r.metric, '.4f')} | {num(r.drop, '+.4f')} | "
                         f"{num(r.cosine, '.6f')} |")
        if self.baseline is not None:
            tail = f"FP32 {m} {self.baseline:.4f}"
            if self.quantized_metric is not None:
                tail += (f"; all layers quantized: {self.quantized_metric:.4f} "
                         f"(drop {self.baseline - self.quantized_metric:+.4f})")
            lines += ["", tail + "."]
        elif self.skipped:  # (the text after the table's blank line is what reports show)
            lines.append("")
        lines += [f"- {name}: not analysed ({why})" for name, why in self.skipped.items()]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


def _replayable(data: Iterable[Any] | None) -> list[Any] | Iterable[Any] | None:
    """One-pass iterators become lists (the data is used more than once)."""
    if data is not None and iter(data) is data:
        return list(data)
    return data


def _first(data: Iterable[Any] | None) -> Any:
    if data is None:
        return None
    for batch in data:
        return batch
    return None


def _output(model: nn.Module, batch: Any) -> torch.Tensor | None:
    """The model's first output tensor: of a tuple / list, or of a dict such as a transformers
    ``ModelOutput`` (``last_hidden_state``, ``logits``)."""
    with torch.no_grad():
        out = run_batch(model, batch)
    while isinstance(out, (tuple, list, Mapping)) and out:
        out = next(iter(out.values())) if isinstance(out, Mapping) else out[0]
    return out if isinstance(out, torch.Tensor) else None


def _metric(eval_fn: EvalFn, model: nn.Module, what: str) -> float:
    """``eval_fn(model)`` as a finite float, with ``model`` back in eval mode after it (an
    ``eval_fn`` that ends with ``model.train()`` would leave dropout on for the next
    measurement; the user's own model is scored inside ``_eval_mode``, which restores its
    modes afterwards)."""
    value = float(eval_fn(model))
    model.eval()
    if not math.isfinite(value):
        raise ValueError(f"eval_fn returned {value} for {what}; it must return a "
                         "finite number, higher is better (e.g. accuracy in percent)")
    return value


def _aliases(plans: Mapping[str, Any], name: str) -> list[str]:
    """The other names under which the module ``name`` is registered (one module, one row)."""
    return [n for n, p in plans.items() if getattr(p, "shared_with", None) == name]


def analyze_sensitivity(model: nn.Module, config: QuantizationConfig | None = None,
                        eval_fn: EvalFn | None = None,
                        calibration_data: Iterable[Any] | None = None,
                        layers: Iterable[str] | None = None, progress: bool = True, *,
                        example_input: Any = None, metric_name: str = "metric",
                        process_group: Any = None, sync: bool = True) -> SensitivityReport:
    """Quantize one layer at a time (the others float) and measure the damage.

    Args:
        model: the float model (not modified).
        config: the quantization config (INT8 dynamic per-token when ``None``).
        eval_fn: ``eval_fn(model) -> float``, higher is better (e.g. accuracy in percent). When
            ``None``, layers are ranked by ``1 - cosine`` of the output on ``example_input``.
        calibration_data: batches for static layers; its first batch is the default
            ``example_input``. A one-pass iterator is materialized into a list.
        layers: analyse only these layer names (default: every layer the config quantizes).
        progress: show a progress bar over the layers.
        example_input: a batch (tensor, ``(inputs, labels)`` tuple or dict) for the output error.
        metric_name: name of the metric in tables and plots (e.g. ``"accuracy"``).
        process_group: under ``torch.distributed``, calibration statistics are merged over
            this group's ranks (default: the world; see :class:`~lowbit.ptq.PTQQuantizer`);
            ``eval_fn`` must then return the same value on every rank (evaluate the same
            data, or all-reduce it).
        sync: ``False`` calibrates on this rank's batches only.

    Returns:
        A :class:`SensitivityReport` sorted most sensitive first.

    Raises:
        ValueError: no ``eval_fn`` and no batch to measure output error on; an unknown name in
            ``layers``; ``eval_fn`` returning NaN / Inf.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> with torch.no_grad():
        ...     model[2].weight[0, 0] = 100.0  # an outlier ruins per-tensor scales
        >>> cfg = QuantizationConfig(weights=QuantizationConfig().weights.with_(
        ...     granularity="per_tensor"))
        >>> rep = analyze_sensitivity(model, cfg, example_input=torch.randn(32, 8),
        ...                           progress=False)
        >>> rep.most_sensitive(1)
        ['2']
    """
    config = config or QuantizationConfig.int8_dynamic()
    calibration_data = _replayable(calibration_data)
    example = example_input if example_input is not None else _first(calibration_data)
    if eval_fn is None and example is None:
        raise ValueError("analyze_sensitivity: pass eval_fn (higher is better), or an "
                         "example_input / calibration_data batch to rank layers by output error")
    qfull = PTQQuantizer(config, progress=progress, process_group=process_group, sync=sync
                         ).quantize(model, calibration_data)
    plans = {r.name: r for r in qfull.lowbit_report.rows}
    # a module registered under several names: one row, quantized at all its names at once
    todo = [n for n, r in plans.items() if r.status == "quantized" and not r.shared_with]
    skipped = {n: r.reason for n, r in plans.items() if r.status != "quantized"}
    if layers is not None:  # (a shared module's other names: its row)
        wanted = [n if n not in plans else (plans[n].shared_with or n) for n in layers]
        unknown = [n for n in wanted if n not in todo]
        if unknown:
            raise ValueError(f"analyze_sensitivity: layers {unknown} are not quantized under this "
                             f"config; choose from {todo}")
        todo = [n for n in todo if n in wanted]

    work = copy_model(model).eval()
    expand_attention(work)  # the layers qfull quantized, under the same names
    disable_fused_fast_paths(work)
    baseline = None if eval_fn is None else _metric(eval_fn, work, "the float model")
    quantized_metric = (None if eval_fn is None
                        else _metric(eval_fn, qfull, "the quantized model"))
    reference = None if example is None else _output(work, example)
    if eval_fn is None and reference is None:
        raise ValueError("analyze_sensitivity: the model's output on example_input holds no "
                         "tensor to compare; pass eval_fn (higher is better) instead")
    if reference is not None:  # else every layer scored a perfect (or NaN) cosine
        _check_reference(reference, "analyze_sensitivity: the float model's output on "
                                    "example_input")
    rows = []
    for name in tqdm(todo, desc="sensitivity", unit="layer", disable=not progress, leave=False):
        plan = plans[name]
        if not name:  # the model is the layer: the quantized model is the measurement
            metric = quantized_metric
            out = None if reference is None else _output(qfull, example)
        else:
            layer = qfull.get_submodule(name)
            swapped = {n: layer for n in (name, *_aliases(plans, name))}
            for absorbed in (plan.folded_bn, plan.fused_pool, plan.fused_gelu):  # now inside
                if absorbed:
                    swapped[absorbed] = nn.Identity()
            originals = {n: work.get_submodule(n) for n in swapped}
            try:
                for n, module in swapped.items():
                    work.set_submodule(n, module)
                metric = None if eval_fn is None else _metric(eval_fn, work, f"layer {name!r}")
                out = None if reference is None else _output(work, example)
            finally:
                for n, module in originals.items():
                    work.set_submodule(n, module)
        err = None if out is None or reference is None else compare_outputs(reference, out)
        drop = None if metric is None or baseline is None else baseline - metric
        cosine = None if err is None else err.cosine
        rows.append(LayerSensitivity(
            name=name, module_type=plan.module_type, scheme=plan.reason, metric=metric,
            drop=drop, cosine=cosine, rel_l2=None if err is None else err.rel_l2,
            sensitivity=drop if drop is not None else 1.0 - (cosine if cosine is not None
                                                             else 1.0)))
    rows.sort(key=lambda r: (-r.sensitivity, r.cosine if r.cosine is not None else 1.0))
    return SensitivityReport(rows, baseline, quantized_metric, metric_name, skipped)


def _with_fallback(config: QuantizationConfig, names: Iterable[str],
               fallback: QuantizationConfig | None = None) -> QuantizationConfig:
    """``config`` with ``names`` overridden to ``fallback`` (None: FP32)."""
    overrides: dict[str, QuantizationConfig | None] = {n: fallback for n in names}
    overrides.update({k: v for k, v in config.layer_overrides.items() if k not in overrides})
    return replace(config, layer_overrides=overrides)


def auto_fallback(model: nn.Module, config: QuantizationConfig | None, eval_fn: EvalFn,
                  calibration_data: Iterable[Any] | None = None, budget: float = 1.0, *,
                  sensitivity: SensitivityReport | None = None, progress: bool = True,
                  max_fallback: int | None = None,
                  fallback_config: QuantizationConfig | None = None
                  ) -> tuple[nn.Module, list[str]]:
    """Quantize ``model``, keeping its most sensitive layers in FP32 until the drop fits a budget.

    Layers are added to FP32 greedily, most sensitive first (from ``sensitivity`` or a fresh
    :func:`analyze_sensitivity`), each step re-quantizing with
    ``layer_overrides={name: None, ...}``, until ``eval_fn(float) - eval_fn(quantized) <= budget``.
    With ``fallback_config`` the fallback layers get that config instead of FP32: mixed
    precision, e.g. INT4 weights with the most sensitive layers in INT8.

    Args:
        model: the float model (not modified).
        config: the quantization config (INT8 dynamic per-token when ``None``).
        eval_fn: ``eval_fn(model) -> float``, higher is better (e.g. accuracy in percent).
        calibration_data: batches for static layers (a one-pass iterator is materialized).
        budget: largest acceptable drop, in the metric's units (points for accuracy).
        sensitivity: a report to reuse; computed when ``None``.
        progress: progress bars.
        max_fallback: keep at most this many layers in FP32 (default: no limit).
        fallback_config: the config of the fallback layers (default None: FP32), e.g.
            ``QuantizationConfig.int8_weight_only()`` for an INT4 model; the sensitivity
            order still comes from ``config``.

    Returns:
        ``(quantized_model, fallback_layers)``; the model's ``lowbit_report`` shows the fallback
        layers as ``"fp32 (requested)"`` (or quantized with ``fallback_config``), and
        ``model.lowbit_fallback`` records the budget, baseline, final drop and fallback
        config. If the budget cannot be met, a warning says so and the model with the most
        fallback layers tried is returned.

    Raises:
        ValueError: ``budget < 0`` or NaN, ``max_fallback < 0``, or ``eval_fn`` returning NaN /
            Inf. TypeError: a ``fallback_config`` that is not a config.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
        >>> with torch.no_grad():
        ...     model[2].weight[0, 0] = 100.0
        >>> cfg = QuantizationConfig(weights=QuantizationConfig().weights.with_(
        ...     granularity="per_tensor"))
        >>> x = torch.randn(64, 8)
        >>> score = lambda m: -float((m(x) - model(x)).detach().abs().mean())  # higher: better
        >>> q, fp32 = auto_fallback(model, cfg, score, budget=0.05, progress=False)
        >>> fp32, type(q[2]).__name__
        (['2'], 'Linear')
    """
    if not budget >= 0:  # (NaN too)
        raise ValueError(f"auto_fallback: budget={budget} must be >= 0 (the largest acceptable "
                         "drop of eval_fn, e.g. 1.0 accuracy point)")
    if max_fallback is not None and max_fallback < 0:
        raise ValueError(f"auto_fallback: max_fallback={max_fallback} must be >= 0 (the most "
                         "layers kept in FP32), or None for no limit")
    config = config or QuantizationConfig.int8_dynamic()
    if fallback_config is not None and not isinstance(fallback_config, QuantizationConfig):
        raise TypeError(f"auto_fallback: fallback_config must be a QuantizationConfig or None "
                        f"(FP32), got {type(fallback_config).__name__}")
    where = "FP32" if fallback_config is None else f"{fallback_config.mode} fallback"
    calibration_data = _replayable(calibration_data)

    def quantize(fallback: list[str]) -> nn.Module:
        cfg = _with_fallback(config, fallback, fallback_config) if fallback else config
        return PTQQuantizer(cfg, progress=False).quantize(model, calibration_data)

    with _eval_mode(model):  # (the user's model may be training: no dropout, BN statistics;
        baseline = _metric(eval_fn, model, "the float model")  # its modes come back after)
    fallback: list[str] = []
    qmodel = quantize(fallback)
    drop = baseline - _metric(eval_fn, qmodel, "the quantized model")
    if drop > budget:
        report = sensitivity or analyze_sensitivity(model, config, eval_fn, calibration_data,
                                                    progress=progress)
        order = [r.name for r in report.rows]
        if max_fallback is not None:
            order = order[:max_fallback]
        bar = tqdm(order, desc="fallback", unit="layer", disable=not progress, leave=False)
        for name in bar:
            fallback.append(name)
            qmodel = quantize(fallback)
            drop = baseline - _metric(eval_fn, qmodel, f"the model with {fallback} in {where}")
            log.info("auto_fallback: %s in %s -> drop %.4f (budget %.4f)", fallback, where,
                     drop, budget)
            if drop <= budget:
                break
        if drop > budget:
            warnings.warn(f"auto_fallback: drop {drop:.4f} is still above budget {budget} with "
                          f"{len(fallback)} layer(s) in {where} ({fallback}); returning that "
                          "model", stacklevel=2)
    qmodel.lowbit_fallback = {"layers": list(fallback), "budget": budget,
                              "baseline": baseline, "drop": drop,
                              "config": None if fallback_config is None
                              else fallback_config.to_dict()}
    return qmodel, fallback
