"""Fold LoRA adapters into their quantized base: dequantize, add the update, re-quantize.

``merge_lora(model)`` replaces every adapter layer (lowbit's :class:`~lowbit.lora.LoRALinear`,
and peft LoRA layers whose base is a lowbit quantized layer) by one layer holding::

    W = W_hat + (B @ A) * alpha / r        # W_hat = (q - zp) * scale, the frozen base

re-quantized with the base's own scheme (same class, spec, group size and static input
qparams; the weight qparams are calibrated again on ``W``), or kept as a float ``nn.Linear``
with ``requantize=False``. Re-quantization rounds ``W`` again, so the merged model is close to,
not equal to, the adapter model: the :class:`MergeReport` says by how much, per layer.
"""

from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.config import QuantizationConfig
from lowbit.lora import LORA_BASES, LoRALinear
from lowbit.ops import code_range
from lowbit.weight_calibration import set_input_smoothing

__all__ = ["MergeReport", "MergeRow", "merge_lora", "merged_weight", "requantize_linear"]


@dataclass(frozen=True)
class MergeRow:
    """One merged layer.

    Attributes:
        name: qualified layer name.
        kind: the base's class (``"Int4Linear"``, ...) or ``"Linear"`` for a float merge.
        weight_error: ``||W_merged_q - W|| / ||W||`` (Frobenius): the relative error the
            re-quantization added to the merged weight ``W`` (0 for a float merge); for
            inputs with uncorrelated features it is also the relative output error.
        output_error: ``||merged(x) - adapter(x)|| / ||adapter(x)||`` on the layer's real inputs
            when ``merge_lora`` got ``inputs``, else ``None``.
    """

    name: str
    kind: str
    weight_error: float
    output_error: float | None = None


@dataclass
class MergeReport:
    """What :func:`merge_lora` did, per layer (``model.lora_merge_report``)."""

    rows: list[MergeRow] = field(default_factory=list)

    @property
    def max_weight_error(self) -> float:
        """The largest relative weight error over the merged layers (0 when none)."""
        return max((r.weight_error for r in self.rows), default=0.0)

    @property
    def max_output_error(self) -> float | None:
        """The largest measured relative output error, or None when none was measured."""
        errors = [r.output_error for r in self.rows if r.output_error is not None]
        return max(errors) if errors else None

    def __str__(self) -> str:
        lines = ["| layer | merged into | re-quantization weight error | output error |",
                 "|---|---|---|---|"]
        for r in self.rows:
            out = "-" if r.output_error is None else f"{r.output_error:.2e}"
            lines.append(f"| {r.name} | {r.kind} | {r.weight_error:.2e} | {out} |")
        return "\n".join(lines)


def requantize_linear(base: nn.Module, weight: torch.Tensor,
                      bias: torch.Tensor | None = None) -> nn.Module:
    """A new layer of ``base``'s class and scheme holding the float ``weight`` ``[N, K]``.

    The weight qparams are calibrated on ``weight`` again; static input qparams, name, backend,
    fused activation, extras and the input smoothing (AWQ / SmoothQuant) are copied from
    ``base``. ``weight`` acts on the layer's smoothed input as ``base.dequantize_weight()``
    does (see :func:`merged_weight`).

    Args:
        base: a lowbit quantized linear layer (one of :data:`lowbit.lora.LORA_BASES`).
        weight: the new float weight, same shape as the base's.
        bias: the new bias (default: the base's).

    Raises:
        TypeError: ``base`` is not a quantized linear layer.
        ValueError: ``weight`` has the wrong shape or NaN/Inf values (naming the layer).

    Example:
        >>> from lowbit.modules import Int4Linear
        >>> base = Int4Linear.from_float(nn.Linear(32, 8), QuantizationConfig.int4_weight_only(16))
        >>> new = requantize_linear(base, base.dequantize_weight() * 2)
        >>> type(new).__name__, new.weight_spec == base.weight_spec
        ('Int4Linear', True)
        >>> torch.allclose(new.dequantize_weight(), 2 * base.dequantize_weight(), atol=1e-6)
        True
    """
    if not isinstance(base, LORA_BASES):
        raise TypeError(f"requantize_linear: {type(base).__name__} is not one of "
                        f"{[c.__name__ for c in LORA_BASES]}")
    shape = (base.out_features, base.in_features)
    if tuple(weight.shape) != shape:
        raise ValueError(f"requantize_linear: {base.name or type(base).__name__}: weight shape "
                         f"{tuple(weight.shape)} must be {shape}")
    bias = base.bias if bias is None else bias
    fl = nn.Linear(base.in_features, base.out_features, bias=bias is not None)
    with torch.no_grad():
        fl.weight.copy_(weight.detach())
        if bias is not None:
            fl.bias.copy_(bias.detach())
    kwargs: dict[str, Any] = {"name": base.name, "backend": base.backend,
                              "fused_relu": base.fused_relu,
                              "meta_extra": dict(base.meta_extra)}
    if getattr(base, "mode", "weight_only") == "weight_only":
        cfg = QuantizationConfig(weights=base.weight_spec, activations=None, mode="weight_only")
    else:
        cfg = QuantizationConfig(weights=base.weight_spec, activations=base.act_spec,
                                 mode=base.mode)
        if base.mode == "static":
            kwargs["input_qparams"] = (base.input_scale.clone(), base.input_zero_point.clone())
    new = type(base).from_float(fl, cfg, **kwargs)
    new.fused_gelu = base.fused_gelu
    new.orig_dtype = base.orig_dtype
    factor = base._buffers.get("input_smoothing")
    if factor is not None:  # (from_float made the buffer from the meta: ones)
        set_input_smoothing(new, factor)
    return new.to(base.weight.device)


def merged_weight(base: nn.Module, delta: torch.Tensor) -> torch.Tensor:
    """``base``'s float weight with a LoRA update ``delta`` ``[N, K]`` added, in the space the
    quantized layer computes in: ``W_hat + delta / f`` for a layer with input smoothing ``f``
    (AWQ / SmoothQuant: it computes ``W_hat (x * f)``, and the update acts on ``x``), else
    ``W_hat + delta``. Give the result to :func:`requantize_linear`.

    Raises:
        ValueError: ``delta`` is not ``[out_features, in_features]``.

    Example:
        >>> from lowbit.modules import QuantizedLinear
        >>> from lowbit.weight_calibration import set_input_smoothing
        >>> base = QuantizedLinear.from_float(nn.Linear(4, 2), QuantizationConfig.int8_dynamic())
        >>> set_input_smoothing(base, torch.tensor([1.0, 2.0, 4.0, 0.5]))
        >>> merged_weight(base, torch.ones(2, 4))[0] - base.dequantize_weight()[0]
        tensor([1.0000, 0.5000, 0.2500, 2.0000])
    """
    w = base.dequantize_weight()
    if tuple(delta.shape) != tuple(w.shape):
        raise ValueError(f"merged_weight: {base.name or type(base).__name__}: the update has "
                         f"shape {tuple(delta.shape)}; it must be the layer's [out_features, "
                         f"in_features] = {tuple(w.shape)} (B @ A * scaling)")
    delta = delta.to(w.device).float()
    factor = base._buffers.get("input_smoothing")
    return w + (delta if factor is None else delta / factor.to(w.device).float())


def _is_peft_lora(module: nn.Module) -> bool:
    """A peft LoRA layer (duck-typed: peft stays optional) over a lowbit quantized base."""
    return (hasattr(module, "lora_A") and hasattr(module, "get_base_layer")
            and isinstance(module.get_base_layer(), LORA_BASES))


def _adapter_parts(name: str, module: nn.Module) -> tuple[nn.Module, torch.Tensor,
                                                           torch.Tensor | None, str | None, bool]:
    """(base, float update [N, K], bias update or None, GELU mode, ReLU) of an adapter layer."""
    if isinstance(module, LoRALinear):
        delta = (module.lora_B @ module.lora_A) * module.scaling
        return module.base, delta, None, module.fused_gelu, module.fused_relu
    base = module.get_base_layer()
    delta = torch.zeros(base.out_features, base.in_features)
    bias = None
    for adapter in module.active_adapters:
        if adapter not in module.lora_A or adapter in getattr(module, "merged_adapters", ()):
            continue
        if adapter in getattr(module, "lora_variant", {}):
            raise ValueError(f"merge_lora: {name}: adapter {adapter!r} is a LoRA variant "
                             f"({type(module.lora_variant[adapter]).__name__}); only plain "
                             "LoRA adapters merge into a quantized base")
        a, b = module.lora_A[adapter], module.lora_B[adapter]
        scaling = module.scaling[adapter]
        delta = delta + (b.weight.float() @ a.weight.float()) * scaling
        if getattr(b, "bias", None) is not None:
            bias = (0 if bias is None else bias) + b.bias.float() * scaling
    return (base, delta, bias, getattr(module, "fused_gelu", None),
            bool(getattr(module, "fused_relu", False)))


def _float_layer(base: nn.Module, weight: torch.Tensor, bias: torch.Tensor | None,
                 gelu: str | None, relu: bool) -> nn.Module:
    fl = nn.Linear(base.in_features, base.out_features, bias=bias is not None,
                   device=weight.device, dtype=getattr(torch, base.orig_dtype, torch.float32))
    with torch.no_grad():  # (the model's dtype: a bf16 model's merged layer takes bf16)
        fl.weight.copy_(weight)
        if bias is not None:
            fl.bias.copy_(bias)
    if gelu is not None:
        return nn.Sequential(fl, nn.GELU(approximate=gelu))
    return nn.Sequential(fl, nn.ReLU()) if relu else fl


def _capture_inputs(model: nn.Module, targets: dict[str, nn.Module],
                    inputs: Any) -> dict[str, torch.Tensor]:
    """The first input each adapter layer sees when ``model`` runs on ``inputs``."""
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in targets.items():
        def hook(_m: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
            if name not in seen and args and isinstance(args[0], torch.Tensor):
                seen[name] = args[0].detach()
        hooks.append(module.register_forward_pre_hook(hook))
    training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(**inputs) if isinstance(inputs, dict) else model(inputs)
    finally:
        for h in hooks:
            h.remove()
        model.train(training)
    return seen


def _warn_clipped(name: str, base: nn.Module, x: torch.Tensor, out_err: float) -> None:
    """Warn where a static base's inputs in the adapter model leave its calibrated range: the
    adapter model clips them for the base weight only (its update sees them whole), which no
    single merged layer reproduces (10% output error after 20 training steps, with or
    without re-quantization)."""
    if getattr(base, "mode", None) != "static" or x.numel() == 0:
        return
    factor = base._buffers.get("input_smoothing")  # the layer quantizes x * f
    xs = x.detach().float() if factor is None else x.detach().float() * factor.to(x).float()
    scale = base.input_scale.float()
    lo, hi = code_range(base.input_scale, base.input_zero_point, base.act_spec)
    outside = float(((xs < lo - scale / 2) | (xs > hi + scale / 2)).float().mean())
    if outside > 1e-3:
        warnings.warn(f"merge_lora: layer {name!r}: {outside:.1%} of its inputs lie outside its "
                      f"calibrated static input range [{lo:.4g}, {hi:.4g}] (the adapters before "
                      "it moved them); the adapter model clips them for the base weight only, "
                      f"which no merged layer reproduces (output error {out_err:.2%}). Keep "
                      "the adapters unmerged to keep that function, or merge with "
                      "requantize=False and calibrate the merged model again", stacklevel=3)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).float().norm() / b.float().norm().clamp_min(1e-30))


def merge_lora(model: nn.Module, requantize: bool = True, *, inputs: Any = None,
               inplace: bool = False) -> nn.Module:
    """Fold every LoRA adapter into its quantized base (see the module docstring).

    Args:
        model: a model with :class:`~lowbit.lora.LoRALinear` adapters (``add_lora``), or a
            peft model whose LoRA layers sit on lowbit quantized layers (a ``PeftModel``
            gives back its underlying model, as peft's ``merge_and_unload``).
        requantize: re-quantize each merged weight with its base's scheme (default), or keep
            it as a float ``nn.Linear`` (followed by the ReLU / GELU the base had fused, in an
            ``nn.Sequential``).
        inputs: optional sample batch (a tensor, or a dict of keyword arguments) run once
            through the adapter model to measure each merged layer's output error on its real
            inputs (``MergeRow.output_error``).
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The merged model, with ``lora_merge_report`` (a :class:`MergeReport`) attached.

    Raises:
        ValueError: the model has no LoRA adapter on a lowbit layer, or an adapter is a LoRA
            variant (DoRA, ...) that does not merge into a quantized base.

    Example:
        >>> from lowbit.lora import add_lora
        >>> from lowbit.ptq import quantize_weight_only
        >>> q = quantize_weight_only(nn.Sequential(nn.Linear(64, 32)), bits=4, group_size=32)
        >>> lq = add_lora(q, r=4)
        >>> with torch.no_grad():
        ...     _ = lq[0].lora_B.normal_(0, 0.05)
        >>> x = torch.randn(8, 64)
        >>> merged = merge_lora(lq, inputs=x)
        >>> type(merged[0]).__name__, merged.lora_merge_report.max_output_error < 0.1
        ('Int4Linear', True)
        >>> exact = merge_lora(lq, requantize=False)
        >>> torch.allclose(exact(x), lq(x), atol=1e-5)
        True
    """
    targets = {n: m for n, m in model.named_modules()
               if isinstance(m, LoRALinear) or _is_peft_lora(m)}
    if not targets:
        raise ValueError("merge_lora: the model has no LoRA adapter on a lowbit quantized layer "
                         "(add them with lowbit.add_lora or peft.get_peft_model)")
    if not inplace:
        report = getattr(model, "lowbit_report", None)
        model = copy.deepcopy(model, {} if report is None else {id(report): report})
        targets = {n: model.get_submodule(n) for n in targets}
    seen = {} if inputs is None else _capture_inputs(model, targets, inputs)
    rows = []
    for name, module in targets.items():
        base, delta, bias_delta, gelu, relu = _adapter_parts(name, module)
        with torch.no_grad():
            exact = merged_weight(base, delta)  # (in the smoothed input's space, if any)
            bias = base.bias
            if bias_delta is not None:
                bias = bias_delta if bias is None else bias + bias_delta
            if requantize:
                new = requantize_linear(base, exact, bias)
                new.fused_relu, new.fused_gelu = relu, gelu
                kind, err = type(new).__name__, _rel(new.dequantize_weight(), exact)
            else:
                factor = base._buffers.get("input_smoothing")  # a float layer takes raw x
                raw = exact if factor is None else exact * factor.to(exact.device).float()
                new, kind, err = _float_layer(base, raw, bias, gelu, relu), "Linear", 0.0
            out_err = None
            if name in seen:  # both in eval mode, as the inputs were captured (no dropout)
                x, training = seen[name], module.training
                module.eval()
                out_err = _rel(new.eval()(x), module(x))
                module.train(training)
                _warn_clipped(name, base, x, out_err)
            new.train(module.training)
        rows.append(MergeRow(name, kind, err, out_err))
        model = _replace(model, module, new)
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        model = model.get_base_model()  # a PeftModel without adapters left: its model
    model.lora_merge_report = MergeReport(rows)
    return model


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> nn.Module:
    """Put ``new`` wherever ``old`` sits (every name of a shared layer); the new root when
    ``old`` is the model itself."""
    if model is old:
        return new
    for n in [n for n, m in model.named_modules(remove_duplicate=False) if m is old]:
        model.set_submodule(n, new)
    return model
