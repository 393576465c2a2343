"""Post-training quantization: the ``Quantizer`` interface, ``PTQQuantizer`` and shortcuts.

``PTQQuantizer.quantize`` copies the model, plans every layer (refusing bad ones up front, by
name), folds BatchNorm into the layer before it, calibrates static activations with streamed
batches, and swaps in integer modules. Each quantized layer takes and returns float tensors and
quantizes its own input, so a model that mixes INT8 and FP32 layers needs no stubs: the
boundaries quantize and dequantize themselves.
"""

from __future__ import annotations

import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import nn

from lowbit._qmodule import QuantizedModuleBase
from lowbit.calibration import CalibrationRecord, run_calibration
from lowbit.calibrators import Calibrator, create_calibrator, observed_range
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.distributed import calibrate_synced
from lowbit.dropin import guard_save_pretrained, is_linear_like
from lowbit.evaluation import markdown_table
from lowbit.memory import trim_heap
from lowbit.modules import (
    Int4Linear,
    Int8WeightOnlyLinear,
    QuantizedConv2d,
    QuantizedLinear,
    WeightOnlyConv2d,
    convert_module,
)
from lowbit.modules_mha import expand_attention
from lowbit.reparam import SharedCopy, bake_reparametrizations, is_reparametrized
from lowbit.traverse import (
    Fusions,
    LayerPlan,
    check_eager_model,
    disable_fused_fast_paths,
    find_fusions,
    fold_batchnorm,
    fusable_maxpool,
    gelu_approximate,
    plan_layers,
    relu_modules_to_remove,
)
from lowbit.weight_calibration import (
    CalibratedWeight,
    calibrate_weights,
    set_input_smoothing,
    set_linear_weight,
    smooth_quant,
)

__all__ = [
    "PTQQuantizer",
    "QuantizationReport",
    "Quantizer",
    "quantize_dynamic",
    "quantize_static",
    "quantize_weight_only",
]

log = logging.getLogger(__name__)


@dataclass
class QuantizationReport:
    """Per-layer coverage of one quantize call: nothing is skipped silently.

    Attributes:
        rows: one :class:`~lowbit.traverse.LayerPlan` per layer with weights.
        fusion_method: ``"fx"`` or ``"module_order"``.
        fusion_note: why fx tracing failed, when it did.
        calibration: ``{layer: CalibrationRecord}`` for static layers.
        num_calibration_batches: batches run during calibration.
    """

    rows: list[LayerPlan]
    fusion_method: str = "fx"
    fusion_note: str = ""
    calibration: dict[str, CalibrationRecord] = field(default_factory=dict)
    num_calibration_batches: int = 0

    @property
    def quantized(self) -> list[str]:
        """Names of the layers that now run on integer kernels."""
        return [r.name for r in self.rows if r.status == "quantized"]

    @property
    def fp32(self) -> list[str]:
        """Names kept in float on request."""
        return [r.name for r in self.rows if r.status == "fp32 (requested)"]

    @property
    def skipped(self) -> list[str]:
        """Names lowbit could not quantize (each row says why)."""
        return [r.name for r in self.rows if r.status == "skipped"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form."""
        return {
            "fusion_method": self.fusion_method,
            "fusion_note": self.fusion_note,
            "num_calibration_batches": self.num_calibration_batches,
            "layers": [
                {"name": r.name, "type": r.module_type, "status": r.status, "reason": r.reason,
                 "fused_relu": r.fused_relu, "folded_bn": r.folded_bn,
                 "fused_pool": r.fused_pool, "fused_gelu": r.fused_gelu,
                 "calibration": (vars(self.calibration[r.name])
                                 if r.name in self.calibration else None)}
                for r in self.rows
            ],
        }

    def to_markdown(self) -> str:
        """A markdown table: layer, type, status, scheme or reason, fusions."""
        body = []
        for r in self.rows:
            fused = ", ".join(x for x in (f"BN {r.folded_bn}" if r.folded_bn else "",
                                          "ReLU" if r.fused_relu else "",
                                          f"GELU {r.fused_gelu}" if r.fused_gelu else "",
                                          f"MaxPool {r.fused_pool}" if r.fused_pool else "") if x)
            body.append([r.name, r.module_type, r.status, r.reason, fused])
        lines = [markdown_table(["layer", "type", "status", "scheme / reason", "fused"], body), ""]
        lines.append(f"{len(self.quantized)} quantized, {len(self.fp32)} kept in FP32 on request, "
                     f"{len(self.skipped)} skipped; fusions found by {self.fusion_method}"
                     + (f" ({self.fusion_note})" if self.fusion_note else ""))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


class Quantizer(ABC):
    """The quantizer interface: ``quantize`` a model, with per-layer FP32 fallback.

    Example:
        >>> q = PTQQuantizer()
        >>> q.set_per_layer_fallback("fc2", True)
        >>> sorted(q.fallback_layers)
        ['fc2']
    """

    def __init__(self, config: QuantizationConfig | None = None) -> None:
        self.config = config
        self.fallback_layers: set[str] = set()

    def set_per_layer_fallback(self, layer_name: str, enabled: bool) -> None:
        """Keep ``layer_name`` in FP32 (``enabled=True``) or quantize it again (``False``)."""
        if not isinstance(layer_name, str) or not layer_name:
            raise ValueError("set_per_layer_fallback: layer_name must be a qualified module name "
                             "such as 'fc2' or 'features.3'")
        if enabled:
            self.fallback_layers.add(layer_name)
        else:
            self.fallback_layers.discard(layer_name)

    @abstractmethod
    def quantize(self, model: nn.Module, calibration_data: Iterable[Any] | None = None,
                 config: QuantizationConfig | None = None) -> nn.Module:
        """Return a quantized copy of ``model``."""


class PTQQuantizer(Quantizer):
    """Post-training quantization: dynamic, static (calibrated) and weight-only.

    Args:
        config: default :class:`QuantizationConfig` (INT8 dynamic per-token when ``None``).
        calibrator: a registry name, Calibrator class or instance (used as a template for every
            layer) that overrides ``config.calibrator``.
        progress: show a progress bar while calibrating.
        max_calibration_batches: stop calibration after this many batches.
        inplace: modify the given model instead of a deep copy.
        process_group: under ``torch.distributed``, the group whose ranks' calibration
            statistics are merged before qparams are chosen (default: the world; see
            :func:`lowbit.distributed.sync_calibrators`), and GPTQ / AWQ / SmoothQuant
            statistics before weights are (SignRound: rank 0's result).
        sync: ``False`` calibrates on this rank's batches only, even in a distributed run.
        backend: the layer backend of the quantized layers: ``"native"`` (default: lowbit's
            kernels for this CPU), ``"reference"`` or ``"torch"`` (see :mod:`lowbit.backends`;
            model backends such as ``"onnxruntime"`` apply to a quantized model, with
            ``lowbit.backends.set_backend``).

    Example:
        >>> import torch
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> data = [torch.randn(8, 16) for _ in range(4)]
        >>> qmodel = PTQQuantizer(QuantizationConfig.int8_static()).quantize(model, data)
        >>> type(qmodel[0]).__name__, qmodel[0].qweight.dtype, qmodel(data[0]).shape
        ('QuantizedLinear', torch.int8, torch.Size([8, 4]))
    """

    def __init__(self, config: QuantizationConfig | None = None, *,
                 calibrator: str | type[Calibrator] | Calibrator | None = None,
                 progress: bool = True, max_calibration_batches: int | None = None,
                 inplace: bool = False, process_group: Any = None, sync: bool = True,
                 backend: str | None = None) -> None:
        super().__init__(config)
        self.backend = _layer_backend(backend)
        if config is not None and not isinstance(config, QuantizationConfig):
            raise TypeError(f"PTQQuantizer(config=...) must be a QuantizationConfig, got "
                            f"{type(config).__name__}")
        self.calibrator = calibrator
        self.progress = progress
        self.max_calibration_batches = max_calibration_batches
        self.inplace = inplace
        self.process_group, self.sync = process_group, sync
        self.last_report: QuantizationReport | None = None
        self.calibrators: dict[str, Calibrator] = {}

    def _make_calibrator(self, cfg: QuantizationConfig, name: str) -> Calibrator:
        source = self.calibrator if self.calibrator is not None else cfg.calibrator
        kwargs = {} if self.calibrator is not None else dict(cfg.calibrator_kwargs)
        cal = create_calibrator(source, cfg.activations, **kwargs)
        cal.tensor_name = f"{name} input"
        return cal

    def _prepare_weights(self, qmodel: nn.Module, todo: dict[str, LayerPlan],
                         calibration_data: Any) -> tuple[dict[str, CalibratedWeight],
                                                         dict[str, tuple[torch.Tensor, Any]]]:
        """GPTQ / AWQ / SignRound weights of the planned Linear layers (and GPT-2 ``Conv1D``)
        and SmoothQuant factors of the Linear ones (see :mod:`lowbit.weight_calibration`);
        other layer types keep round-to-nearest."""
        methods, alphas = {}, {}
        for name, plan in todo.items():
            cfg = plan.config
            layer = qmodel.get_submodule(name)
            if cfg is None or not is_linear_like(layer):
                continue
            if cfg.method != "rtn":
                methods[name] = (cfg.method, cfg.weights, dict(cfg.method_kwargs))
            if cfg.smooth_quant is not None and isinstance(layer, nn.Linear):
                alphas[name] = cfg.smooth_quant
        opts = {"progress": self.progress, "max_batches": self.max_calibration_batches,
                "process_group": self.process_group, "sync": self.sync}
        calibrated = calibrate_weights(qmodel, methods, calibration_data, **opts) if methods \
            else {}
        smoothed = smooth_quant(qmodel, alphas, calibration_data, **opts) if alphas else {}
        return calibrated, smoothed

    def quantize(self, model: nn.Module, calibration_data: Iterable[Any] | None = None,
                 config: QuantizationConfig | None = None, *,
                 inplace: bool | None = None) -> nn.Module:
        """Quantize a copy of ``model`` (the original is never touched unless ``inplace``).

        Args:
            model: a trained float ``nn.Module``.
            calibration_data: batches for static layers, GPTQ / AWQ weights and SmoothQuant
                (``config.method``, ``config.smooth_quant``); ignored otherwise.
            config: overrides the quantizer's config for this call.
            inplace: overrides the quantizer's ``inplace`` for this call.

        Returns:
            The quantized model in eval mode, with ``model.lowbit_report`` (a
            :class:`QuantizationReport`) attached; also kept as ``self.last_report``.

        Raises:
            ValueError: NaN/Inf weights (the layer is named), empty calibration data for static
                layers, or an unsupported combination refused at planning time.
        """
        check_eager_model(model, "quantize")
        cfg = config or self.config or QuantizationConfig.int8_dynamic()
        do_inplace = self.inplace if inplace is None else inplace
        sharing = None if do_inplace else SharedCopy(model)  # float weights not held twice
        qmodel = model if sharing is None else sharing.model
        qmodel.eval()

        fusions = find_fusions(qmodel)
        expand_attention(qmodel)  # nn.MultiheadAttention: its projections as Linear children
        plans = plan_layers(qmodel, cfg, self.fallback_layers, fusions)
        todo = {n: p for n, p in plans.items() if p.status == "quantized" and not p.shared_with}
        if sharing is not None:  # own copies for what may be written or stays float
            sharing.unshare(_may_change(qmodel, todo))
        bake_reparametrizations(qmodel, todo)  # weight_norm / spectral_norm: plain weights
        _untie_written(qmodel, todo)
        report = QuantizationReport(list(plans.values()), fusions.method, fusions.note)
        if not todo:
            done = sum(isinstance(m, QuantizedModuleBase) for m in qmodel.modules())
            warnings.warn("quantize: the model has no quantizable layer under this config; "
                          "returning it unchanged (see model.lowbit_report)" + (
                              f". {done} of its layers are lowbit quantized layers already: "
                              "quantize the float model to change their scheme"
                              if done else ""), stacklevel=2)
        fold_batchnorm(qmodel, fusions, layers={n for n, p in todo.items() if p.folded_bn})

        calibrated, smoothed = self._prepare_weights(qmodel, todo, calibration_data)
        static = {n: p for n, p in todo.items() if p.config and p.config.mode == "static"}
        self.calibrators = {n: self._make_calibrator(p.config, n) for n, p in static.items()}
        if static:
            report.num_calibration_batches = calibrate_synced(  # all ranks' batches, merged
                lambda: run_calibration(qmodel, self.calibrators, calibration_data,
                                        progress=self.progress,
                                        max_batches=self.max_calibration_batches),
                self.calibrators, self.process_group, sync=self.sync)
        elif _asks_static(cfg):  # a rank left with no static layer still joins the sync, so
            calibrate_synced(lambda: 0, {}, self.process_group,  # that the others raise
                             sync=self.sync)  # "different calibrators" instead of waiting
        input_qparams: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name, cal in self.calibrators.items():
            qparams, reason = _static_qparams(name, cal, todo[name])
            if reason:
                plan = todo.pop(name)
                plan.config, plan.status, plan.reason = None, "skipped", reason
                plan.fused_relu, plan.fused_gelu = False, None
            else:
                input_qparams[name] = qparams

        for name, plan in todo.items():
            assert plan.config is not None
            module = qmodel.get_submodule(name)
            kwargs: dict[str, Any] = {"fused_relu": plan.fused_relu, "name": name,
                                      "backend": self.backend}
            if name in input_qparams:
                scale, zp = kwargs["input_qparams"] = input_qparams[name]
                record = _record(self.calibrators[name], plan.config.calibrator, scale, zp)
                report.calibration[name] = record
                kwargs["meta_extra"] = {"calibrator": record.calibrator,
                                        "observed_range": [record.min, record.max],
                                        "clipping_range": list(record.range)}
            done = calibrated.get(name)
            if done is not None:  # GPTQ / AWQ: the weight to convert (and its qparams)
                set_linear_weight(module, done.weight)
                if done.qparams is not None:
                    kwargs["weight_qparams"] = done.qparams
                kwargs["meta_extra"] = {**kwargs.get("meta_extra", {}),
                                        "weight_method": plan.config.method}
            factor = done.input_smoothing if done is not None else None
            if name in smoothed:  # SmoothQuant: the module divides its input itself
                factor, handle = smoothed.pop(name)
                handle.remove()
                kwargs["meta_extra"] = {**kwargs.get("meta_extra", {}),
                                        "smooth_quant": plan.config.smooth_quant}
            new = convert_module(module, plan.config, **kwargs)
            if factor is not None:
                set_input_smoothing(new, factor)
            if name:
                qmodel.set_submodule(name, new)
            else:  # the model itself is a single quantizable layer
                qmodel = new

        for name, plan in plans.items():  # second names of shared layers: the same new module
            if plan.shared_with and plan.status == "quantized":
                if plan.shared_with in todo:
                    qmodel.set_submodule(name, qmodel.get_submodule(plan.shared_with))
                else:  # the first name was skipped after calibration
                    shared = plans[plan.shared_with]
                    plan.config, plan.status, plan.reason = None, shared.status, shared.reason
        for name, (factor, handle) in smoothed.items():  # smoothed, then kept float: undo
            handle.remove()
            with torch.no_grad():
                qmodel.get_submodule(name).weight.mul_(factor)
        fused = {n for n, p in todo.items() if p.fused_relu}
        for relu in relu_modules_to_remove(fusions, fused):
            qmodel.set_submodule(relu, nn.Identity())
        _fuse_maxpools(qmodel, fusions, todo)
        _fuse_gelus(qmodel, todo)
        disable_fused_fast_paths(qmodel)  # nn.TransformerEncoderLayer reads linear1.weight
        if sharing is not None:  # (layers kept float after calibration, for one)
            sharing.unshare(qmodel.modules())
        trim_heap()  # the conversion temporaries' freed heap back to the OS
        qmodel.eval()  # (the layers put in above too: model.training flags agree)
        qmodel.lowbit_report = report
        guard_save_pretrained(qmodel)  # (transformers: from_pretrained would misread its file)
        self.last_report = report
        log.info("lowbit: %d layers quantized, %d FP32 by request, %d skipped",
                 len(report.quantized), len(report.fp32), len(report.skipped))
        return qmodel


def _untie_written(qmodel: nn.Module, todo: dict[str, LayerPlan]) -> None:
    """Give each planned layer whose weight is written before it is converted (SmoothQuant,
    GPTQ, AWQ, SignRound, a BatchNorm fold) its own copy of a parameter another module holds
    too: tied input / output embeddings (``lm_head`` and ``embed_tokens``), where the float
    embedding looked up the scaled or dequantized rows written into ``lm_head``."""
    written = [n for n, p in todo.items() if p.folded_bn or (p.config is not None and (
        p.config.method != "rtn" or p.config.smooth_quant is not None))]
    if not written:
        return
    holders: dict[int, set[int]] = {}
    for module in qmodel.modules():
        for p in module._parameters.values():
            if p is not None:
                holders.setdefault(id(p), set()).add(id(module))
    for name in written:
        layer = qmodel.get_submodule(name)
        for key, p in list(layer._parameters.items()):
            if p is not None and len(holders[id(p)]) > 1:
                layer._parameters[key] = nn.Parameter(p.detach().clone(),
                                                      requires_grad=p.requires_grad)


def _may_change(qmodel: nn.Module, todo: dict[str, LayerPlan]) -> list[nn.Module]:
    """The modules of lowbit's copy that may be written to, or stay float in the result: all
    of them but the planned layers that are only read and converted (no BatchNorm fold, no
    reparametrization to bake, round-to-nearest weights; any GPTQ / AWQ / SignRound /
    SmoothQuant layer may write to others: then all)."""
    if any(p.config is not None and (p.config.method != "rtn" or p.config.smooth_quant
                                     is not None) for p in todo.values()):
        return list(qmodel.modules())
    read_only = {id(qmodel.get_submodule(n)) for n, p in todo.items()
                 if not p.folded_bn and not is_reparametrized(qmodel.get_submodule(n))}
    return [m for m in qmodel.modules() if id(m) not in read_only]


def _fuse_maxpools(qmodel: nn.Module, fusions: Fusions, todo: dict[str, LayerPlan]) -> None:
    """Run each non-overlapping MaxPool2d that directly follows a quantized Conv2d (INT8 or
    weight-only; or its fused BatchNorm / ReLU) inside that conv, and make the pool module
    ``Identity``.

    A max picks one of its inputs, so pooling the conv's float output inside the module gives
    the same values as the separate pool (a ReLU in between commutes with max); at batch 1 the
    separate module call and pass over memory cost about as much as a small conv itself.
    """
    for name, plan in todo.items():
        pool = fusions.pool_after.get(name)
        layer = qmodel.get_submodule(name) if name and pool else None
        if type(layer) not in (QuantizedConv2d, WeightOnlyConv2d):
            continue
        layer.geometry["fused_maxpool"] = fusable_maxpool(qmodel.get_submodule(pool))
        layer._refresh_cache()  # (its prepared calls ran without the pool)
        qmodel.set_submodule(pool, nn.Identity())
        plan.fused_pool = pool


def _fuse_gelus(qmodel: nn.Module, todo: dict[str, LayerPlan]) -> None:
    """Run each GELU module (``nn.GELU``, transformers' ``GELUActivation``) that directly and
    only consumes a quantized Linear's output inside that layer (in place on its fresh
    output), and make the GELU module ``Identity``.

    Same op on the same values, so the result does not change; what goes is one
    activation-sized tensor per call (25 MB for a 4,096-token FFN at width 1,536), which under
    glibc's default allocator is also what pushed the heap past its trim threshold, so that
    every call page-faulted its activations back in.
    """
    linear = (QuantizedLinear, Int4Linear, Int8WeightOnlyLinear)
    for name, plan in todo.items():
        layer = qmodel.get_submodule(name) if name and plan.fused_gelu else None
        if not isinstance(layer, linear) or layer.fused_relu:
            plan.fused_gelu = None
            continue
        layer.fused_gelu = gelu_approximate(qmodel.get_submodule(plan.fused_gelu))
        qmodel.set_submodule(plan.fused_gelu, nn.Identity())


def _asks_static(cfg: QuantizationConfig) -> bool:
    """Whether ``cfg`` (or one of its layer overrides) calibrates static activations: every
    rank of a distributed run then takes part in the calibration sync."""
    return cfg.mode == "static" or any(c is not None and c.mode == "static"
                                       for c in cfg.layer_overrides.values())


def _static_qparams(name: str, cal: Calibrator, plan: LayerPlan
                    ) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, str | None]:
    """``((scale, zero_point), None)`` for a calibrated layer, or ``(None, why)`` when it
    cannot get a static scale (then it stays float).

    A layer no batch reached has no range; a constant input (or a clipping range the
    calibrator collapsed to zero) gives a scale at float32 eps that clips every other input to
    about zero, so the layer would output its bias whatever it is given: warned, kept float.
    """
    if int(cal.num_batches) == 0:
        reason = ("not reached by any calibration batch, so its input range is unknown; kept "
                  "in float")
        warnings.warn(f"{name or '<model>'}: {reason}. Calibrate with batches that run it",
                      RuntimeWarning, stacklevel=4)
        return None, reason
    assert plan.config is not None and plan.config.activations is not None
    scale, zp = cal.compute_qparams(plan.config.activations)
    if float(scale.min()) > torch.finfo(torch.float32).eps:
        return (scale, zp), None
    lo, hi = cal.compute_range()
    seen_lo, seen_hi = observed_range(cal)
    seen = (float(seen_lo.min()), float(seen_hi.max()))
    clip = (float(lo.min()), float(hi.max()))
    what = ("a constant input" if seen[0] == seen[1] else
            f"a clipping range {list(clip)} of zero width (chosen by the calibrator)")
    reason = (f"calibration saw {what} (observed range {list(seen)}): a static scale from it "
              f"({float(scale.min()):.3g}) would clip every other input to about zero; kept in "
              "float")
    warnings.warn(f"{name or '<model>'}: {reason}. Calibrate with representative batches, or "
                  f"quantize it dynamically (layer_overrides={{{name!r}: "
                  "QuantizationConfig.int8_dynamic()})", RuntimeWarning, stacklevel=4)
    return None, reason


def _record(cal: Calibrator, default_name: str, scale: Any, zp: Any) -> CalibrationRecord:
    lo, hi = cal.compute_range()
    seen_lo, seen_hi = observed_range(cal)
    return CalibrationRecord(
        calibrator=getattr(cal, "name", default_name) or default_name,
        min=float(seen_lo.min()), max=float(seen_hi.max()),
        range=(float(lo.min()), float(hi.max())),
        scale=float(scale.reshape(-1)[0]), zero_point=int(zp.reshape(-1)[0]),
        num_batches=int(cal.num_batches), last_change=float(cal.last_change),
    )


def quantize_dynamic(model: nn.Module, config: QuantizationConfig | None = None, *,
                     inplace: bool = False, backend: str | None = None,
                     smooth_quant: float | None = None,
                     calibration_data: Iterable[Any] | None = None,
                     progress: bool = True) -> nn.Module:
    """INT8 weights (per channel) and INT8 activations quantized at run time (per token).

    ``backend``: the layers' backend (see :class:`PTQQuantizer`). ``smooth_quant=alpha``
    (with ``calibration_data``) first migrates activation outliers into the weights.

    Example:
        >>> import torch
        >>> m = nn.Sequential(nn.Linear(8, 8))
        >>> quantize_dynamic(m)[0].qweight.dtype
        torch.int8
    """
    cfg = config or QuantizationConfig.int8_dynamic()
    if cfg.mode != "dynamic":
        raise ValueError(f"quantize_dynamic: config.mode is {cfg.mode!r}; use "
                         "QuantizationConfig.int8_dynamic() or PTQQuantizer for other modes")
    if smooth_quant is not None:
        cfg = replace(cfg, smooth_quant=smooth_quant)
    return PTQQuantizer(cfg, inplace=inplace, backend=backend, progress=progress).quantize(
        model, calibration_data)


def quantize_static(model: nn.Module, calibration_data: Iterable[Any],
                    config: QuantizationConfig | None = None, *,
                    calibrator: str | type[Calibrator] | Calibrator | None = None,
                    inplace: bool = False, progress: bool = True,
                    max_calibration_batches: int | None = None, process_group: Any = None,
                    sync: bool = True, backend: str | None = None,
                    smooth_quant: float | None = None) -> nn.Module:
    """INT8 weights and calibrated INT8 activations (``backend``: see :class:`PTQQuantizer`).

    ``smooth_quant=alpha`` (e.g. 0.5) first migrates activation outliers into the weights
    (SmoothQuant; see :mod:`lowbit.weight_calibration`).

    Under ``torch.distributed`` each rank passes its own shard of the calibration data and every
    rank gets the same qparams, those of the union of the shards (``process_group``, ``sync``:
    see :class:`PTQQuantizer`).

    Example:
        >>> import torch
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU())
        >>> q = quantize_static(m, [torch.randn(2, 1, 8, 8)], progress=False)
        >>> float(q[0].input_scale) > 0
        True
    """
    cfg = config or QuantizationConfig.int8_static()
    if cfg.mode != "static":
        raise ValueError(f"quantize_static: config.mode is {cfg.mode!r}; use "
                         "QuantizationConfig.int8_static(...)")
    if smooth_quant is not None:
        cfg = replace(cfg, smooth_quant=smooth_quant)
    return PTQQuantizer(cfg, calibrator=calibrator, progress=progress, inplace=inplace,
                        max_calibration_batches=max_calibration_batches,
                        process_group=process_group, sync=sync, backend=backend
                        ).quantize(model, calibration_data)


def quantize_weight_only(model: nn.Module, bits: int = 4, group_size: int | None = None, *,
                         symmetric: bool = False, config: QuantizationConfig | None = None,
                         inplace: bool = False, backend: str | None = None,
                         method: str | None = None,
                         calibration_data: Iterable[Any] | None = None,
                         progress: bool = True) -> nn.Module:
    """Weight-only quantization (INT4 packed two per byte, group-wise scales by default).

    ``group_size``: weights per scale along the input dimension; default 128 for 2-7 bits and
    one scale per output channel for ``bits=8`` (a given ``group_size`` makes INT8 weights
    group-wise too; it was ignored).

    ``backend``: the layers' backend (see :class:`PTQQuantizer`). ``method``: ``"rtn"``
    (default), ``"gptq"``, ``"awq"`` or ``"signround"``; all but ``"rtn"`` need
    ``calibration_data`` (a list of batches or a DataLoader; see
    :mod:`lowbit.weight_calibration`).

    Example:
        >>> m = nn.Sequential(nn.Linear(256, 8))
        >>> quantize_weight_only(m)[0].qweight.dtype
        torch.uint8
        >>> q = quantize_weight_only(m, group_size=64, method="gptq",
        ...                          calibration_data=[torch.randn(4, 256)], progress=False)
        >>> q[0].meta()["extra"]["weight_method"]
        'gptq'
    """
    if config is None:
        spec = (QuantSpec.int8_weight() if bits == 8 and group_size is None
                else QuantSpec.int4_weight(128 if group_size is None else group_size,
                                           symmetric).with_(bits=bits))
        config = QuantizationConfig(weights=spec, activations=None, mode="weight_only")
    if config.mode != "weight_only":
        raise ValueError(f"quantize_weight_only: config.mode is {config.mode!r}; use "
                         "QuantizationConfig.int4_weight_only(...)")
    if method is not None:
        config = replace(config, method=method)
    return PTQQuantizer(config, inplace=inplace, backend=backend, progress=progress).quantize(
        model, calibration_data)


def _layer_backend(name: str | None) -> str:
    """The quantized modules' ``backend`` value for a backend name (checked to run here)."""
    if name is None or name == "auto":
        return "auto"
    from lowbit.backends import require  # (lowbit.backends imports lowbit.modules)

    backend = require(name)
    if backend.layer_value is None:
        raise ValueError(f"backend={name!r} runs a whole model, not one layer; quantize with a "
                         f"layer backend (native, reference, torch), then call "
                         f"lowbit.backends.set_backend(qmodel, {name!r}, example_inputs)")
    return backend.layer_value
