"""Configuration dataclasses: what a quantized number looks like and how a model is quantized.

Two frozen dataclasses carry every choice lowbit makes:

* :class:`QuantSpec` describes one quantized number format (bits, signedness, symmetric or
  affine, narrow range, granularity).
* :class:`QuantizationConfig` describes how a whole model is quantized (weight spec, activation
  spec, mode, calibrator, skipped layers and per-layer overrides).

Both validate on construction (errors name the field and the fix) and round-trip through plain
JSON-compatible dicts.
"""

from __future__ import annotations

import fnmatch
import json
import math
import numbers
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from types import MappingProxyType
from typing import Any, Literal

import torch

__all__ = [
    "GRANULARITIES",
    "MODES",
    "WEIGHT_METHODS",
    "QuantSpec",
    "QuantizationConfig",
]

Granularity = Literal["per_tensor", "per_channel", "per_group", "per_token"]
Mode = Literal["dynamic", "static", "weight_only"]

GRANULARITIES: tuple[str, ...] = ("per_tensor", "per_channel", "per_group", "per_token")
MODES: tuple[str, ...] = ("dynamic", "static", "weight_only")
#: weight calibration methods of ``mode="weight_only"`` (see :mod:`lowbit.weight_calibration`)
WEIGHT_METHODS: tuple[str, ...] = ("rtn", "gptq", "awq", "signround")
_POSITIVE_NUMBER, _FLAG, _POSITIVE_INT = "a number > 0", "True or False", "a positive integer"
#: the options of each method, with what each accepts
_METHOD_KWARGS: dict[str, dict[str, str]] = {
    "rtn": {},
    "gptq": {"damp": _POSITIVE_NUMBER, "act_order": _FLAG, "block_size": _POSITIVE_INT,
             "clip_search": _FLAG},
    "awq": {"grid": _POSITIVE_INT},
    "signround": {"iters": _POSITIVE_INT, "lr": _POSITIVE_NUMBER},
}


def _accepts(kind: str, value: Any) -> bool:
    if kind == _FLAG:
        return isinstance(value, bool)
    number = isinstance(value, int if kind == _POSITIVE_INT else (int, float))
    return number and not isinstance(value, bool) and value > 0 and math.isfinite(value)


def real_number(value: Any, what: str, hint: str) -> float:
    """``value`` as a float if it is a finite real number (not a bool; numpy scalars and
    one-element tensors count), else a ValueError naming ``what`` (``float()`` had taken
    ``True`` as 1.0 and NaN / Inf silently).

    Example:
        >>> real_number(2, "alpha", "e.g. 16")
        2.0
    """
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value):
        raise ValueError(f"{what}={value!r} must be a finite number; {hint}")
    return float(value)


def require_mapping(value: Any, what: str) -> Mapping[str, Any]:
    """``value`` if it is a mapping, else a ValueError naming ``what``.

    Example:
        >>> require_mapping([1, 2], "calibrator_kwargs")
        Traceback (most recent call last):
        ...
        ValueError: calibrator_kwargs must be a dict, got list: [1, 2]
    """
    if not isinstance(value, Mapping):
        raise ValueError(f"{what} must be a dict, got {type(value).__name__}: {value!r:.80}")
    return value


def _scalar(value: Any) -> Any:
    """A one-element non-bool tensor as its Python number, anything else as it is."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and value.dtype != torch.bool:
        return value.item()
    return value


def whole_number(value: Any, what: str, hint: str) -> int:
    """``value`` as an int if it is an integer (not a bool), else a ValueError naming ``what``.

    Example:
        >>> whole_number(8, "r", "e.g. 8")
        8
    """
    value = _scalar(value)
    if isinstance(value, float) and value.is_integer():  # 8.0 (as LoRA's r was accepted)
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{what}={value!r} must be an integer; {hint}")
    return int(value)


@dataclass(frozen=True)
class QuantSpec:
    """The spec of one quantized integer format.

    Args:
        bits: integer width, 2..8 (4 and 8 are the ones with fast kernels).
        signed: integers in ``[-2^(b-1), 2^(b-1)-1]`` when True, ``[0, 2^b-1]`` when False.
        symmetric: zero-point fixed at the middle of the range (0 for signed); otherwise affine
            with an integer zero-point chosen from the observed range.
        narrow_range: drop the most negative code (``[-127, 127]`` for int8) so that the range is
            symmetric around zero; for unsigned it drops code 0.
        granularity: ``"per_tensor"`` (one scale), ``"per_channel"`` (one scale per index of
            ``axis``), ``"per_group"`` (one scale per ``group_size`` consecutive elements of the
            last dimension, for every row), or ``"per_token"`` (one scale per row of the last
            dimension: dynamic activations).
        axis: channel axis for ``per_channel`` (0 = output channels of a weight).
        group_size: elements per group along the last (input) dimension for ``per_group``.

    Raises:
        ValueError: on an out-of-range field; the message names the field and the fix.

    Example:
        >>> spec = QuantSpec(bits=4, granularity="per_group", group_size=32)
        >>> spec.qmin, spec.qmax
        (-8, 7)
        >>> QuantSpec.from_dict(spec.to_dict()) == spec
        True
    """

    bits: int = 8
    signed: bool = True
    symmetric: bool = True
    narrow_range: bool = False
    granularity: Granularity = "per_tensor"
    axis: int = 0
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.bits, int) or isinstance(self.bits, bool) or not 2 <= self.bits <= 8:
            raise ValueError(
                f"QuantSpec.bits={self.bits!r} is not supported; use an integer in 2..8 "
                "(8 for INT8, 4 for INT4)"
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"QuantSpec.granularity={self.granularity!r} is unknown; use one of {GRANULARITIES}"
            )
        if self.granularity == "per_group":
            if (not isinstance(self.group_size, int) or isinstance(self.group_size, bool)
                    or self.group_size < 1):
                raise ValueError(
                    "QuantSpec.group_size must be a positive integer when granularity='per_group'"
                    f" (got {self.group_size!r}); typical values are 32, 64 or 128"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"QuantSpec.group_size={self.group_size!r} only applies to granularity='per_group';"
                f" remove it or set granularity='per_group' (granularity is {self.granularity!r})"
            )
        if not isinstance(self.axis, int) or isinstance(self.axis, bool):
            raise ValueError(f"QuantSpec.axis must be an int, got {self.axis!r}")
        for flag in ("signed", "symmetric", "narrow_range"):
            if not isinstance(getattr(self, flag), bool):
                raise ValueError(f"QuantSpec.{flag} must be True or False, got "
                                 f"{getattr(self, flag)!r}")

    # ------------------------------------------------------------------ derived properties
    @property
    def qmin(self) -> int:
        """Smallest integer code."""
        base = -(2 ** (self.bits - 1)) if self.signed else 0
        return base + 1 if self.narrow_range else base

    @property
    def qmax(self) -> int:
        """Largest integer code."""
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_dtype(self) -> torch.dtype:
        """The torch dtype that holds one unpacked code (int8 or uint8)."""
        return torch.int8 if self.signed else torch.uint8

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict of every field."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantSpec:
        """Inverse of :meth:`to_dict`; unknown keys are refused by name."""
        if not isinstance(data, Mapping):
            raise ValueError(f"QuantSpec.from_dict expects a dict of QuantSpec fields (as "
                             f"QuantSpec.to_dict() writes), got {type(data).__name__}: "
                             f"{data!r:.80}")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise ValueError(
                f"QuantSpec: unknown field(s) {sorted(unknown)}; known: {sorted(known)}"
            )
        return cls(**dict(data))

    def with_(self, **changes: Any) -> QuantSpec:
        """A copy with some fields changed (validated again).

        Example:
            >>> QuantSpec().with_(bits=4).bits
            4
        """
        return replace(self, **changes)

    # ------------------------------------------------------------------ common formats
    @classmethod
    def int8_weight(cls) -> QuantSpec:
        """INT8 symmetric per-output-channel weights (the accurate default)."""
        return cls(bits=8, signed=True, symmetric=True, granularity="per_channel", axis=0)

    @classmethod
    def int4_weight(cls, group_size: int = 128, symmetric: bool = False) -> QuantSpec:
        """INT4 group-wise weights (asymmetric by default, as most INT4 LLM recipes use)."""
        return cls(bits=4, signed=True, symmetric=symmetric, granularity="per_group",
                   group_size=group_size)

    @classmethod
    def int8_dynamic_activation(cls, granularity: Granularity = "per_token") -> QuantSpec:
        """INT8 symmetric activations quantized at run time, one scale per token by default."""
        return cls(bits=8, signed=True, symmetric=True, granularity=granularity)

    @classmethod
    def int8_static_activation(cls) -> QuantSpec:
        """INT8 affine per-tensor activations with a calibrated range."""
        return cls(bits=8, signed=True, symmetric=False, granularity="per_tensor")


def _default_weight_spec() -> QuantSpec:
    return QuantSpec.int8_weight()


class _ByMode:
    """The default of ``QuantizationConfig.activations``: chosen from ``mode``."""

    def __repr__(self) -> str:
        return "<activations of the mode>"


_BY_MODE: Any = _ByMode()


def enclosing_names(name: str) -> list[str]:
    """``name`` and the names of the modules around it, most specific first.

    Example:
        >>> enclosing_names("encoder.layer.0")
        ['encoder.layer.0', 'encoder.layer', 'encoder']
    """
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


@dataclass(frozen=True)
class QuantizationConfig:
    """How a model is quantized.

    Args:
        weights: spec of the weights.
        activations: spec of the activations; ``None`` for weight-only (its default there).
            For ``mode="dynamic"`` it says how activations are quantized at run time (default
            per token); for ``mode="static"`` it is the calibrated format (default per-tensor
            affine INT8).
        mode: ``"dynamic"``, ``"static"`` or ``"weight_only"``.
        calibrator: registry name of the calibrator for static activations (``"minmax"``,
            ``"moving_average"``, ``"percentile"``, ``"entropy"``, ``"mse"`` or a custom one).
        calibrator_kwargs: keyword arguments for the calibrator (e.g. ``{"percentile": 99.99}``).
        skip_layers: qualified layer names or glob patterns kept in float. A container's name
            (an ``nn.Sequential`` head, a block) covers every layer inside it, as torch.ao's
            module-name qconfigs do.
        layer_overrides: ``{name or glob: QuantizationConfig or None}``; ``None`` keeps the layer
            in FP32. A container's name covers the layers inside it; the most specific rule
            wins (a layer's own name, then its parent's, ...); at one level, a skip beats an
            override, an exact name beats globs, and globs go in insertion order.
        method: how weight-only Linear weights are rounded: ``"rtn"`` (round to nearest, no
            data), ``"gptq"``, ``"awq"`` or ``"signround"`` (need ``calibration_data``; see
            :mod:`lowbit.weight_calibration` and :mod:`lowbit.signround`).
        method_kwargs: options of the method (gptq: ``damp``, ``act_order``, ``block_size``,
            ``clip_search``; awq: ``grid``; signround: ``iters``, ``lr``).
        smooth_quant: SmoothQuant migration strength ``alpha`` in ``[0, 1]`` for dynamic / static
            Linear layers (needs ``calibration_data``), or ``None`` (off).
        quantize_embeddings: weight-only mode also quantizes ``nn.Embedding`` tables (default
            ``False``: they stay float, which keeps INT4 accuracy and the fast float lookup).

    Raises:
        ValueError: when a field is invalid or the combination makes no sense.

    Example:
        >>> cfg = QuantizationConfig.int8_static(calibrator="percentile")
        >>> cfg.mode, cfg.activations.granularity
        ('static', 'per_tensor')
        >>> QuantizationConfig.from_json(cfg.to_json()) == cfg
        True
        >>> QuantizationConfig(layer_overrides={"fc2": None}).config_for("fc2") is None
        True
    """

    weights: QuantSpec = field(default_factory=_default_weight_spec)
    activations: QuantSpec | None = field(default=_BY_MODE)
    mode: Mode = "dynamic"
    calibrator: str = "minmax"
    calibrator_kwargs: Mapping[str, Any] = field(default_factory=dict)
    skip_layers: tuple[str, ...] = ()
    layer_overrides: Mapping[str, QuantizationConfig | None] = field(default_factory=dict)
    method: str = "rtn"
    method_kwargs: Mapping[str, Any] = field(default_factory=dict)
    smooth_quant: float | None = None
    quantize_embeddings: bool = False

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(
                f"QuantizationConfig.mode={self.mode!r} is unknown; use one of {MODES}"
            )
        if self.activations is _BY_MODE:  # QuantizationConfig(mode="static") just works
            object.__setattr__(self, "activations", {
                "dynamic": QuantSpec.int8_dynamic_activation(),
                "static": QuantSpec.int8_static_activation()}.get(self.mode))
        if not isinstance(self.weights, QuantSpec):
            raise ValueError("QuantizationConfig.weights must be a QuantSpec, "
                             f"got {type(self.weights).__name__}")
        if self.activations is not None and not isinstance(self.activations, QuantSpec):
            raise ValueError("QuantizationConfig.activations must be a QuantSpec or None, "
                             f"got {type(self.activations).__name__}")
        if self.mode == "weight_only" and self.activations is not None:
            raise ValueError("QuantizationConfig: mode='weight_only' keeps activations in float; "
                             "pass activations=None")
        if self.mode in ("dynamic", "static") and self.activations is None:
            raise ValueError(f"QuantizationConfig: mode={self.mode!r} needs an activations spec; "
                             "use mode='weight_only' for float activations")
        # dynamic/static run INT8 x INT8 kernels: any width <= 8 is stored as int8 codes
        # (e.g. W4A8 for QAT, or 7-bit weights, which oneDNN's u8 x s8 GEMM on AVX2-only CPUs
        # computes without int16 saturation); packed INT4 storage is mode='weight_only'.
        if self.activations is not None:
            if self.activations.granularity == "per_group" or (
                self.activations.granularity == "per_channel"
            ):
                raise ValueError(
                    "QuantizationConfig: activations must be 'per_tensor' or 'per_token' "
                    f"(got {self.activations.granularity!r})"
                )
            if self.mode == "static" and self.activations.granularity != "per_tensor":
                raise ValueError("QuantizationConfig: static activations are calibrated per "
                                 "tensor; use granularity='per_tensor' or mode='dynamic'")
        if self.weights.granularity == "per_token":
            raise ValueError("QuantizationConfig.weights: 'per_token' is for activations; use "
                             "'per_channel' or 'per_group' for weights")
        if not isinstance(self.calibrator, str) or not self.calibrator:
            raise ValueError("QuantizationConfig.calibrator must be a registry name such as "
                             f"'minmax' (got {self.calibrator!r}); pass calibrator instances to "
                             "PTQQuantizer(calibrator=...)")
        if isinstance(self.skip_layers, str):
            object.__setattr__(self, "skip_layers", (self.skip_layers,))
        if isinstance(self.skip_layers, Mapping) or not hasattr(self.skip_layers, "__iter__"):
            raise ValueError("QuantizationConfig.skip_layers must be a list of layer names or "
                             f"globs, got {type(self.skip_layers).__name__}: "
                             f"{self.skip_layers!r:.60}")
        object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        for name in self.skip_layers:
            if not isinstance(name, str):
                raise ValueError(f"QuantizationConfig.skip_layers must hold strings, got {name!r}")
        for what in ("layer_overrides", "calibrator_kwargs"):
            require_mapping(getattr(self, what), f"QuantizationConfig.{what}")
        overrides = dict(self.layer_overrides)
        for key, value in overrides.items():
            if not isinstance(key, str):
                raise ValueError(f"QuantizationConfig.layer_overrides keys are layer names or "
                                 f"globs, got {key!r}")
            if value is not None and not isinstance(value, QuantizationConfig):
                raise ValueError(
                    f"QuantizationConfig.layer_overrides[{key!r}] must be a QuantizationConfig or "
                    f"None (FP32 fallback), got {type(value).__name__}"
                )
        object.__setattr__(self, "layer_overrides", MappingProxyType(overrides))
        kwargs = MappingProxyType(dict(self.calibrator_kwargs))
        object.__setattr__(self, "calibrator_kwargs", kwargs)
        if not isinstance(self.quantize_embeddings, bool):
            raise ValueError("QuantizationConfig.quantize_embeddings must be True or False, got "
                             f"{self.quantize_embeddings!r}")
        self._check_methods()

    def _check_methods(self) -> None:
        if self.method not in WEIGHT_METHODS:
            raise ValueError(f"QuantizationConfig.method={self.method!r} is unknown; use one of "
                             f"{WEIGHT_METHODS}")
        if self.method != "rtn" and self.mode != "weight_only":
            raise ValueError(f"QuantizationConfig.method={self.method!r} calibrates weight-only "
                             f"weights; mode is {self.mode!r}: use mode='weight_only' (e.g. "
                             f"QuantizationConfig.int4_weight_only(method={self.method!r})) or "
                             "smooth_quant=alpha for W8A8")
        require_mapping(self.method_kwargs, "QuantizationConfig.method_kwargs")
        options = _METHOD_KWARGS[self.method]
        unknown = set(self.method_kwargs) - set(options)
        if unknown:
            raise ValueError(f"QuantizationConfig.method_kwargs: {sorted(unknown)} not options of "
                             f"method={self.method!r}; known: {list(options)}")
        for key, value in self.method_kwargs.items():
            if not _accepts(options[key], value):
                raise ValueError(f"QuantizationConfig.method_kwargs[{key!r}]={value!r}: "
                                 f"method={self.method!r} takes {options[key]} there")
        object.__setattr__(self, "method_kwargs", MappingProxyType(dict(self.method_kwargs)))
        a = self.smooth_quant
        if a is not None:
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a <= 1.0:
                raise ValueError(f"QuantizationConfig.smooth_quant={a!r} must be an alpha in "
                                 "[0, 1] (0.5 is the usual choice) or None")
            if self.mode == "weight_only":
                raise ValueError("QuantizationConfig.smooth_quant applies to INT8 activations "
                                 "(mode 'dynamic' or 'static'); weight-only keeps activations in "
                                 "float: use method='awq' instead")
            object.__setattr__(self, "smooth_quant", float(a))

    def __hash__(self) -> int:
        return hash(self.to_json())

    def __copy__(self) -> QuantizationConfig:
        """The config itself: it is frozen and its mappings are read-only views."""
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> QuantizationConfig:
        """The config itself (``copy.deepcopy`` of a model holding one shares it): frozen and
        immutable, so a copy could never differ, and ``MappingProxyType`` cannot be deep-copied.

        Example:
            >>> import copy
            >>> cfg = QuantizationConfig.int8_static(layer_overrides={"fc": None})
            >>> copy.deepcopy({"cfg": cfg})["cfg"] is cfg
            True
        """
        return self

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        """Pickle through the constructor: ``MappingProxyType`` fields cannot be pickled, so
        they travel as plain dicts and are validated and wrapped again on unpickling.

        Example:
            >>> import pickle
            >>> cfg = QuantizationConfig.int8_static(layer_overrides={"fc": None})
            >>> pickle.loads(pickle.dumps(cfg)) == cfg
            True
        """
        return (type(self), (self.weights, self.activations, self.mode, self.calibrator,
                             dict(self.calibrator_kwargs), self.skip_layers,
                             dict(self.layer_overrides), self.method, dict(self.method_kwargs),
                             self.smooth_quant, self.quantize_embeddings))

    # ------------------------------------------------------------------ presets
    @classmethod
    def int8_dynamic(cls, per_token: bool = True, activation_bits: int = 8,
                     symmetric: bool = True, **kwargs: Any) -> QuantizationConfig:
        """INT8 per-channel weights, activations quantized at run time (per token by default).

        ``symmetric=False`` gives unsigned affine activation codes (a zero-point beside each
        scale). With ``per_token=False`` that is ONNX's ``DynamicQuantizeLinear`` scheme, which
        :func:`lowbit.export_onnx` writes as ONNX Runtime's own dynamic-quantization pattern
        (fused into ``DynamicQuantizeMatMul``: as fast as ORT's ``quantize_dynamic``, per-channel
        weights); per-token symmetric activations are the more accurate default.

        ``activation_bits=7`` trades one bit of activation precision (about twice the
        activation rounding error) for speed on CPUs without VNNI: lowbit's AVX2 GEMM then
        needs no sign operation (about 1.3x faster on compute-bound shapes; see
        ``docs/kernels.md``). Results stay exact with respect to the reference either way.

        Example:
            >>> QuantizationConfig.int8_dynamic(activation_bits=7).activations.qmax
            63
            >>> a = QuantizationConfig.int8_dynamic(per_token=False, symmetric=False).activations
            >>> a.qmin, a.qmax, a.granularity
            (0, 255, 'per_tensor')
        """
        if activation_bits not in (7, 8) or isinstance(activation_bits, bool):
            raise ValueError(f"int8_dynamic: activation_bits must be 8 (default) or 7; got "
                             f"{activation_bits!r}")
        for name, flag in (("per_token", per_token), ("symmetric", symmetric)):
            if not isinstance(flag, bool):
                raise TypeError(f"int8_dynamic: {name} must be True or False; got {flag!r}")
        act = QuantSpec.int8_dynamic_activation("per_token" if per_token else "per_tensor")
        if not symmetric:
            act = act.with_(signed=False, symmetric=False)
        act = act if activation_bits == 8 else act.with_(bits=activation_bits)
        return cls(weights=QuantSpec.int8_weight(), activations=act, mode="dynamic", **kwargs)

    @classmethod
    def int8_static(cls, calibrator: str = "minmax", **kwargs: Any) -> QuantizationConfig:
        """INT8 per-channel weights and calibrated per-tensor INT8 activations."""
        return cls(weights=QuantSpec.int8_weight(), activations=QuantSpec.int8_static_activation(),
                   mode="static", calibrator=calibrator, **kwargs)

    @classmethod
    def int4_weight_only(cls, group_size: int = 128, symmetric: bool = False,
                         method: str = "rtn", **kwargs: Any) -> QuantizationConfig:
        """INT4 group-wise weights (packed two per byte), float activations.

        ``method``: ``"rtn"``, ``"gptq"``, ``"awq"`` or ``"signround"`` (all but ``"rtn"`` need
        calibration data).

        Example:
            >>> QuantizationConfig.int4_weight_only(group_size=32, method="gptq").method
            'gptq'
        """
        return cls(weights=QuantSpec.int4_weight(group_size, symmetric), activations=None,
                   mode="weight_only", method=method, **kwargs)

    @classmethod
    def int8_weight_only(cls, method: str = "rtn", **kwargs: Any) -> QuantizationConfig:
        """INT8 per-channel symmetric weights, float activations (what
        ``quantize_weight_only(model, bits=8)`` uses; e.g. the ``fallback_config`` of
        :func:`lowbit.auto_fallback` or a ``layer_overrides`` value beside INT4 layers).

        Example:
            >>> cfg = QuantizationConfig.int8_weight_only()
            >>> cfg.weights.bits, cfg.weights.granularity, cfg.activations, cfg.mode
            (8, 'per_channel', None, 'weight_only')
        """
        return cls(weights=QuantSpec.int8_weight(), activations=None, mode="weight_only",
                   method=method, **kwargs)

    # ------------------------------------------------------------------ per-layer resolution
    def _rule(self, name: str) -> tuple[bool, QuantizationConfig | None] | None:
        """``(skipped, override)`` of the most specific rule for layer ``name`` (its own name,
        then each enclosing module's: a container's rule covers its layers), or None."""
        for scope in enclosing_names(name):
            if any(scope == pat or fnmatch.fnmatchcase(scope, pat) for pat in self.skip_layers):
                return True, None
            if scope in self.layer_overrides:
                return False, self.layer_overrides[scope]
            for pattern, value in self.layer_overrides.items():
                if fnmatch.fnmatchcase(scope, pattern):
                    return False, value
        return None

    def is_skipped(self, name: str) -> bool:
        """True when the most specific rule for ``name`` is one of ``skip_layers`` (exact name
        or glob, of the layer or of a container it sits in)."""
        rule = self._rule(name)
        return rule is not None and rule[0]

    def config_for(self, name: str) -> QuantizationConfig | None:
        """The config that applies to layer ``name`` (``None`` = keep in FP32).

        Example:
            >>> cfg = QuantizationConfig(skip_layers=("head",), layer_overrides={"head.out": None})
            >>> cfg.config_for("head.0") is None, cfg.config_for("body.0") is cfg
            (True, True)
        """
        rule = self._rule(name)
        return self if rule is None else rule[1]

    # ------------------------------------------------------------------ (de)serialization
    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (overrides nested; ``None`` marks FP32 fallback)."""
        return {
            "weights": self.weights.to_dict(),
            "activations": None if self.activations is None else self.activations.to_dict(),
            "mode": self.mode,
            "calibrator": self.calibrator,
            "calibrator_kwargs": dict(self.calibrator_kwargs),
            "skip_layers": list(self.skip_layers),
            "layer_overrides": {
                k: (None if v is None else v.to_dict()) for k, v in self.layer_overrides.items()
            },
            # written only when set: configs (and files) without them read the same as before
            **({"method": self.method} if self.method != "rtn" else {}),
            **({"method_kwargs": dict(self.method_kwargs)} if self.method_kwargs else {}),
            **({"smooth_quant": self.smooth_quant} if self.smooth_quant is not None else {}),
            **({"quantize_embeddings": True} if self.quantize_embeddings else {}),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QuantizationConfig:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: naming the field, for a value of the wrong type or an unknown field.
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"QuantizationConfig.from_dict expects a dict (as to_dict() "
                             f"writes), got {type(data).__name__}: {data!r:.80}")
        data = dict(data)
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"QuantizationConfig: unknown field(s) {sorted(unknown)}; "
                             f"known: {sorted(known)}")
        if "weights" in data:
            data["weights"] = QuantSpec.from_dict(data["weights"])
        if data.get("activations") is not None:
            data["activations"] = QuantSpec.from_dict(data["activations"])
        if "skip_layers" in data:
            if not isinstance(data["skip_layers"], (list, tuple)):
                raise ValueError("QuantizationConfig.skip_layers must be a list of layer names, "
                                 f"got {type(data['skip_layers']).__name__}: "
                                 f"{data['skip_layers']!r:.80}")
            data["skip_layers"] = tuple(data["skip_layers"])
        for key in ("layer_overrides", "calibrator_kwargs", "method_kwargs"):
            if key in data:  # (layer_overrides is read below, before __post_init__)
                require_mapping(data[key], f"QuantizationConfig.{key}")
        if "layer_overrides" in data:
            overrides = {}
            for k, v in data["layer_overrides"].items():
                if v is not None and not isinstance(v, Mapping):
                    raise ValueError(f"QuantizationConfig.layer_overrides[{k!r}] must be a "
                                     f"config dict or null (float), got {type(v).__name__}")
                overrides[k] = None if v is None else cls.from_dict(v)
            data["layer_overrides"] = overrides
        return cls(**data)

    def to_json(self) -> str:
        """The config as a JSON string (sorted keys, stable)."""
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> QuantizationConfig:
        """Inverse of :meth:`to_json`.

        Raises:
            ValueError: when ``text`` is not JSON (``json.JSONDecodeError``) or not a config.
        """
        if not isinstance(text, (str, bytes, bytearray)):
            raise ValueError(f"QuantizationConfig.from_json expects a JSON string, got "
                             f"{type(text).__name__}; use from_dict for a dict")
        return cls.from_dict(json.loads(text))
