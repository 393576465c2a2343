"""Calibrators: watch a tensor batch by batch and choose its quantization range.

A calibrator follows the torch.ao observer contract: an ``nn.Module`` whose ``forward(x)``
records statistics and returns ``x`` unchanged, with every piece of state in buffers, so
``.to()``, ``state_dict()`` and ``load_state_dict()`` just work. After calibration,
:meth:`Calibrator.compute_range` gives the chosen ``(min, max)`` and
:meth:`Calibrator.compute_qparams` the ``(scale, zero_point)`` of
:func:`lowbit.ops.choose_qparams`.

==================  ===========================================================================
registry name       range
==================  ===========================================================================
``minmax``          running min / max (per tensor, per channel or per group)
``moving_average``  exponential moving average of each batch's min / max,
                    ``m <- m + c * (batch_min - m)``, ``c = averaging_constant = 0.01`` (torch.ao)
``percentile``      histogram (2048 bins); drop the ``100 - percentile`` % most extreme values
                    (of ``|x|`` for symmetric specs, half of them per side for affine specs)
``entropy``         histogram (8192 bins); the clipping threshold minimising KL(p || q) between
                    the clipped and quantized distributions (TensorRT, ONNX Runtime's ``Entropy``)
``mse``             histogram (2048 bins); the range minimising the expected quantization MSE
==================  ===========================================================================

Histogram calibrators keep a fixed-size state: ``bins`` int64 counts over ``[-2**k, 2**k)``, with
``k`` the smallest integer such that every observed ``|x| < 2**k`` (``bins`` a power of two, bin
``j`` is ``[(j - bins/2) * w, (j - bins/2 + 1) * w)``, ``w = 2**(k+1) / bins``). When a batch
exceeds the grid, ``k`` grows and each group of ``2**shift`` adjacent bins is summed into one. A
value's bin is ``floor(x / w)``, computed exactly (``w`` is a power of two), so coarsening commutes
with binning: streaming batches, merging shards with :meth:`Calibrator.merge` and calibrating
the concatenation give identical histograms, bit for bit, whatever the shards' ranges. The price
is resolution: the data spans at least ``bins / 4`` bins (``bins / 2`` when it has both signs).

Example:
    >>> import torch
    >>> cal = create_calibrator("minmax", tensor_name="fc1.input")
    >>> for batch in (torch.tensor([-1.0, 0.5]), torch.tensor([2.0])):
    ...     _ = cal(batch)  # forward records the batch and returns it unchanged
    >>> [v.item() for v in cal.compute_range()], cal.num_batches
    ([-1.0, 2.0], 2)
    >>> scale, zero_point = cal.compute_qparams()
    >>> round(scale.item(), 6), zero_point.item()
    (0.011765, -43)
"""

from __future__ import annotations

import copy
import inspect
import math
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from lowbit import ops
from lowbit.config import QuantSpec, real_number

__all__ = [
    "Calibrator",
    "EntropyCalibrator",
    "HistogramCalibrator",
    "MSECalibrator",
    "MinMaxCalibrator",
    "MovingAverageCalibrator",
    "PercentileCalibrator",
    "available_calibrators",
    "create_calibrator",
    "observed_range",
    "register_calibrator",
]

_REGISTRY: dict[str, type[Calibrator]] = {}
_K_MIN = -100  # smallest histogram grid exponent: an all-zero tensor gets [-2**-100, 2**-100)
_CalibratorT = TypeVar("_CalibratorT", bound="type[Calibrator]")


def _default_spec() -> QuantSpec:
    """Per-tensor affine INT8: the static-activation default."""
    return QuantSpec(bits=8, signed=True, symmetric=False, granularity="per_tensor")


def _relative_change(old: tuple[torch.Tensor, torch.Tensor],
                     new: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """``max((|d min| + |d max|) / (max - min))`` over channels (0-dim tensor, on the device);
    0 when nothing moved."""
    delta = (new[0] - old[0]).abs() + (new[1] - old[1]).abs()
    rel = torch.where(delta == 0, torch.zeros_like(delta), delta / (new[1] - new[0]))
    return rel.max()


class Calibrator(nn.Module):
    """Base class: records statistics of one tensor, then proposes its quantization range.

    Subclasses implement ``_init_state`` (register buffers, including the tracked range
    ``min_val``/``max_val`` that :attr:`last_change` follows), ``_observe`` (fold one batch in),
    ``_merge`` and ``_compute_range``; :func:`register_calibrator` makes them available by name.
    Subclassing :class:`MinMaxCalibrator` and overriding ``_compute_range`` is the shortest way.

    Args:
        spec: format the range is for; default per-tensor affine INT8. ``per_channel`` specs give
            per-channel statistics along ``spec.axis`` (min-max and moving average only).
        tensor_name: name used in error messages, e.g. ``"features.3.input"``.

    Attributes:
        num_batches: batches observed so far (int; stored in the ``num_batches_tracked`` buffer).
        last_change: relative movement ``(|d min| + |d max|) / (max - min)`` of the tracked range
            (running min/max, moving averages, or the histogram's observed min/max) in the last
            update or merge; ``inf`` after the first update. It shrinks as calibration converges.

    Devices: the state follows the batches (a calibrator fed CUDA tensors moves its buffers to
    that device), and :meth:`update` never waits for the device: it reads nothing back to the
    host (no ``.item()``), except the NaN/Inf check of CPU batches, which is free there.

    Raises:
        ValueError: on an unknown option, a non-QuantSpec spec or an unsupported granularity.
    """

    name: ClassVar[str] = ""
    granularities: ClassVar[tuple[str, ...]] = ("per_tensor", "per_channel", "per_group")

    num_batches_tracked: torch.Tensor
    range_change: torch.Tensor
    min_val: torch.Tensor
    max_val: torch.Tensor

    def __init__(self, spec: QuantSpec | None = None, *, tensor_name: str = "tensor",
                 **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            known = [p.name for p in inspect.signature(type(self)).parameters.values()
                     if p.kind is p.KEYWORD_ONLY]
            raise ValueError(f"{type(self).__name__} got unknown option(s) {sorted(kwargs)}; "
                             f"it accepts {known}")
        self.tensor_name = str(tensor_name)
        self.spec = self._check_spec(_default_spec() if spec is None else spec)
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.int64))
        self.register_buffer("range_change", torch.tensor(math.inf))
        self._init_state(torch.device("cpu"))

    # ------------------------------------------------------------------ public API
    @property
    def num_batches(self) -> int:
        """Number of batches observed (merges add the other calibrator's count)."""
        return int(self.num_batches_tracked)

    @property
    def last_change(self) -> float:
        """Relative movement of the tracked range in the last update (``inf`` after the first)."""
        return float(self.range_change)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Record ``x`` (see :meth:`update`) and return it unchanged."""
        self.update(x)
        return x

    @torch.no_grad()
    def _layer(self) -> str | None:
        """The layer name in ``tensor_name`` ("fc1 input" / "fc1.input" -> "fc1"), if any."""
        for suffix in (" input", ".input"):
            if self.tensor_name.endswith(suffix):
                return self.tensor_name[: -len(suffix)]
        return None

    def update(self, x: torch.Tensor) -> None:
        """Fold one batch into the statistics (constant memory, incremental, no host sync).

        The calibrator's buffers move to ``x``'s device if they are elsewhere. A NaN/Inf batch on
        the CPU is refused at once and leaves no trace; on an accelerator, checking would force a
        host sync per batch, so the non-finite values flow into the tracked range and
        :meth:`compute_range` refuses it (:meth:`reset` starts over).

        Raises:
            ValueError: when ``x`` is empty or (on the CPU) holds NaN/Inf (the message names
                ``tensor_name``), or when per-channel statistics change shape between batches.
        """
        if not isinstance(x, torch.Tensor):
            raise ValueError(f"{self.tensor_name}: expected a torch.Tensor, got {type(x).__name__}")
        if x.numel() == 0:
            raise ValueError(f"{self.tensor_name} is empty (shape {tuple(x.shape)}); "
                             "calibration batches must hold at least one value")
        x = x.detach()
        if x.device != self.num_batches_tracked.device:
            self.to(x.device)
        x = x.float()
        lo, hi = ops.compute_range(x, self.spec, self.tensor_name)
        if x.device.type == "cpu" and not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all()):
            ops.check_finite(x, self.tensor_name, self._layer())  # raises, counting bad values
        first = self.num_batches_tracked == 0  # a device tensor: no host sync
        old = (self.min_val.clone(), self.max_val.clone())
        self._observe(x, lo, hi, first)
        self._record_change(old, first)
        self.num_batches_tracked = self.num_batches_tracked + 1  # out of place: inference_mode

    @torch.no_grad()
    def compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The chosen ``(min, max)`` as float32 tensors (shape of the spec's statistics).

        Raises:
            ValueError: before any batch was observed, or when the batches held NaN/Inf (only
                accelerator batches get this far; CPU batches are refused by :meth:`update`).
        """
        if self.num_batches == 0:
            raise ValueError(f"{self.tensor_name}: no data observed: call update()/run "
                             "calibration batches first")
        seen = [getattr(self, n, None) for n in ("min_val", "max_val")]
        if not all(t is None or bool(torch.isfinite(t).all()) for t in seen):
            raise ValueError(f"{self.tensor_name}: the calibration batches held NaN/Inf values "
                             "(the observed range is not finite); fix the input, or keep its layer "
                             f"in float with layer_overrides={{{self._layer() or '<layer name>'!r}"
                             ": None}; reset() to calibrate again")
        return self._checked_range(self._compute_range(), seen[0])

    def _checked_range(self, result: Any, like: torch.Tensor | None
                       ) -> tuple[torch.Tensor, torch.Tensor]:
        """``_compute_range``'s answer as float32 tensors, refused with the calibrator's name
        when it is not a finite ``(min, max)`` pair of the statistics' shape (a custom
        calibrator's mistake otherwise surfaced as an unrelated reshape or attribute error,
        or as "the calibrated tensor had non-finite values")."""
        who = f"{self.tensor_name}: {type(self).__name__}._compute_range()"
        if not (isinstance(result, tuple | list) and len(result) == 2):
            raise TypeError(f"{who} must return (min, max), got {result!r:.80}")
        try:
            lo, hi = (torch.as_tensor(v).detach().float() for v in result)  # (numbers too)
        except (TypeError, ValueError, RuntimeError) as exc:
            raise TypeError(f"{who} must return (min, max) tensors or numbers, got "
                            f"{result!r:.80}") from exc
        want = lo.shape if like is None else like.shape
        if lo.shape != want or hi.shape != want:
            raise ValueError(f"{who} returned min of shape {tuple(lo.shape)} and max of shape "
                             f"{tuple(hi.shape)}; both must have the statistics' shape "
                             f"{tuple(want)} ({self.spec.granularity})")
        if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(hi).all())):
            raise ValueError(f"{who} returned a range that is not finite "
                             f"({lo.flatten()[:4].tolist()} .. {hi.flatten()[:4].tolist()})")
        if bool((lo > hi).any()):
            raise ValueError(f"{who} returned min > max ({lo.flatten()[:4].tolist()} .. "
                             f"{hi.flatten()[:4].tolist()}); return (min, max) in that order")
        return lo, hi

    def compute_qparams(self, spec: QuantSpec | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``lowbit.ops.choose_qparams(*compute_range(), spec)``: ``(scale, zero_point)``.

        ``spec`` defaults to the calibrator's; another spec must have the same granularity
        (the range itself is always chosen for the calibrator's own spec).
        """
        spec = self.spec if spec is None else spec
        if spec.granularity != self.spec.granularity:
            raise ValueError(f"{self.tensor_name}: the calibrator collected "
                             f"{self.spec.granularity} statistics; cannot give "
                             f"{spec.granularity} qparams")
        lo, hi = self.compute_range()
        return ops.choose_qparams(lo, hi, spec)

    @torch.no_grad()
    def reset(self) -> None:
        """Forget every observation (buffers keep their device)."""
        device = self.num_batches_tracked.device
        self.num_batches_tracked.zero_()
        self.range_change.fill_(math.inf)
        self._init_state(device)

    @torch.no_grad()
    def merge(self, other: Calibrator) -> None:
        """Fold in the statistics of ``other`` (another shard or process), in place.

        Exact for min-max and for the histogram calibrators (calibrating the concatenation of
        both shards' batches gives the same state); the moving average takes the
        batch-count-weighted mean of both averages (an EMA depends on batch order).

        Raises:
            ValueError: when ``other`` is of another class, spec granularity or bin count.
        """
        if type(other) is not type(self):
            raise ValueError(f"{self.tensor_name}: cannot merge a {type(other).__name__} into a "
                             f"{type(self).__name__}")
        if (other.spec.granularity, other.spec.axis, other.spec.group_size) != (
                self.spec.granularity, self.spec.axis, self.spec.group_size):
            raise ValueError(f"{self.tensor_name}: cannot merge statistics of spec {other.spec} "
                             f"into spec {self.spec}; granularity, axis and group size must match")
        self._check_mergeable(other)
        if other.num_batches == 0:
            return
        if self.num_batches == 0:
            for name, buf in other.named_buffers(recurse=False):
                self._buffers[name] = buf.detach().clone().to(self.num_batches_tracked.device)
            return
        old = (self.min_val.clone(), self.max_val.clone())
        self._merge(other)
        self._record_change(old, None)
        # out of place, as in update(): buffers filled under inference_mode stay mergeable
        self.num_batches_tracked = self.num_batches_tracked + other.num_batches_tracked.to(
            self.num_batches_tracked.device)

    def extra_repr(self) -> str:
        return (f"tensor_name={self.tensor_name!r}, bits={self.spec.bits}, "
                f"symmetric={self.spec.symmetric}, granularity={self.spec.granularity!r}, "
                f"num_batches={self.num_batches}")

    # ------------------------------------------------------------------ subclass hooks
    def _init_state(self, device: torch.device) -> None:
        raise NotImplementedError

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 first: torch.Tensor) -> None:
        """Fold batch ``x`` (float32) in; ``lo, hi`` is its range at the spec's granularity.

        ``first`` is a 0-dim bool tensor on the state's device, true for the first batch: use it
        in ``torch.where`` to stay sync-free (``if first:`` works too, but waits for the device).
        """
        raise NotImplementedError

    def _merge(self, other: Calibrator) -> None:
        raise NotImplementedError

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _check_mergeable(self, other: Calibrator) -> None:
        """Raise ValueError when ``other``'s state cannot be combined with this one."""

    # ------------------------------------------------------------------ helpers
    def _check_spec(self, spec: QuantSpec) -> QuantSpec:
        cls = type(self).__name__
        if not isinstance(spec, QuantSpec):
            raise ValueError(f"{cls}: spec must be a QuantSpec, got {type(spec).__name__}")
        if spec.granularity == "per_token":
            raise ValueError(f"{cls} ({self.tensor_name}): per_token ranges are computed at run "
                             "time (mode='dynamic'); there is nothing to calibrate. Use a "
                             "per_tensor spec for static activations")
        if spec.granularity not in self.granularities:
            raise ValueError(f"{cls} ({self.tensor_name}) supports granularity "
                             f"{list(self.granularities)}, not {spec.granularity!r}; use "
                             "'minmax' or 'moving_average' for per-channel statistics")
        return spec

    def _empty_range(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial (min, max): (+inf, -inf) scalars per tensor, shape (0,) until the first
        batch fixes the number of channels/groups otherwise."""
        if self.spec.granularity == "per_tensor":
            return (torch.tensor(math.inf, device=device), torch.tensor(-math.inf, device=device))
        return torch.empty(0, device=device), torch.empty(0, device=device)

    def _check_shape(self, lo: torch.Tensor, what: str = "this batch") -> None:
        if lo.shape != self.min_val.shape:
            raise ValueError(
                f"{self.tensor_name}: {self.spec.granularity} statistics have shape "
                f"{tuple(self.min_val.shape)} but {what} gives {tuple(lo.shape)}; the channel "
                f"axis (axis={self.spec.axis}) / groups must keep their size across batches")

    def _record_change(self, old: tuple[torch.Tensor, torch.Tensor],
                       first: torch.Tensor | None) -> None:
        """Store the relative range movement on the device (``inf`` for the first batch)."""
        if old[0].shape != self.min_val.shape:  # per-channel statistics were just created
            self.range_change.fill_(math.inf)
            return
        change = _relative_change(old, (self.min_val, self.max_val))
        if first is not None:
            change = torch.where(first, math.inf, change)
        self.range_change = change.to(self.range_change.dtype)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):  # type: ignore[no-untyped-def]
        # Per-channel statistics are shape (0,) until the first batch: take the saved shape.
        for name, buf in list(self._buffers.items()):
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and buf.numel() == 0 \
                    and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


# ---------------------------------------------------------------------- registry
def register_calibrator(name: str, *, overwrite: bool = False
                        ) -> Callable[[_CalibratorT], _CalibratorT]:
    """Class decorator: make a :class:`Calibrator` subclass available by ``name``.

    A registered calibrator works everywhere a built-in does (``QuantizationConfig(calibrator=
    name)``, :func:`create_calibrator`).

    Raises:
        ValueError: when ``name`` is taken by another class (pass ``overwrite=True`` to replace
            it) or the class is not a Calibrator.

    Example:
        >>> @register_calibrator("abs_max_doc")
        ... class AbsMax(MinMaxCalibrator):
        ...     def _compute_range(self):
        ...         amax = torch.maximum(-self.min_val, self.max_val)
        ...         return -amax, amax
        >>> cal = create_calibrator("abs_max_doc")
        >>> _ = cal(torch.tensor([-1.0, 3.0]))
        >>> [v.item() for v in cal.compute_range()]
        [-3.0, 3.0]
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_calibrator: name must be a non-empty string, got {name!r}")

    def decorator(cls: _CalibratorT) -> _CalibratorT:
        if not (isinstance(cls, type) and issubclass(cls, Calibrator)):
            raise ValueError(f"register_calibrator({name!r}): {cls!r} is not a Calibrator "
                             "subclass")
        old = _REGISTRY.get(name)
        same = old is not None and (old.__module__, old.__qualname__) == (cls.__module__,
                                                                           cls.__qualname__)
        if old is not None and old is not cls and not same and not overwrite:
            raise ValueError(f"calibrator name {name!r} is already registered to "
                             f"{old.__module__}.{old.__qualname__}; pick another name or pass "
                             "overwrite=True")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorator


def available_calibrators() -> list[str]:
    """Registered calibrator names, sorted.

    Example:
        >>> {"minmax", "moving_average", "percentile", "entropy", "mse"} <= set(
        ...     available_calibrators())
        True
    """
    return sorted(_REGISTRY)


def create_calibrator(calibrator: str | type[Calibrator] | Calibrator,
                      spec: QuantSpec | None = None, **kwargs: Any) -> Calibrator:
    """A fresh calibrator from a registry name, a class, or an instance used as a template.

    An instance is deep-copied and reset, so one configured instance can serve many layers;
    only ``spec`` and ``tensor_name`` may be changed on the copy.

    Raises:
        ValueError: on an unknown name (the message lists the available ones) or options.

    Example:
        >>> cal = create_calibrator("percentile", percentile=99.9, tensor_name="conv1.input")
        >>> type(cal).__name__, cal.percentile
        ('PercentileCalibrator', 99.9)
        >>> copy = create_calibrator(cal, tensor_name="conv2.input")
        >>> copy is cal, copy.percentile, copy.tensor_name
        (False, 99.9, 'conv2.input')
    """
    if isinstance(calibrator, Calibrator):
        extra = sorted(set(kwargs) - {"tensor_name"})
        if extra:
            raise ValueError(f"create_calibrator: options {extra} cannot be applied to an existing "
                             f"{type(calibrator).__name__} instance; pass them to its constructor")
        new = copy.deepcopy(calibrator)
        if spec is not None:
            new.spec = new._check_spec(spec)
        if "tensor_name" in kwargs:
            new.tensor_name = str(kwargs["tensor_name"])
        new.reset()
        return new
    if isinstance(calibrator, str):
        cls = _REGISTRY.get(calibrator)
        if cls is None:
            raise ValueError(f"unknown calibrator {calibrator!r}; available: "
                             f"{available_calibrators()} (register your own with "
                             "@register_calibrator(name))")
    elif isinstance(calibrator, type) and issubclass(calibrator, Calibrator):
        cls = calibrator
    else:
        raise ValueError("create_calibrator: expected a registry name, a Calibrator subclass or "
                         f"instance, got {calibrator!r}")
    return cls(spec, **kwargs)


# ---------------------------------------------------------------------- min-max family
@register_calibrator("minmax")
class MinMaxCalibrator(Calibrator):
    """Running minimum and maximum (torch.ao ``MinMaxObserver`` / ``PerChannelMinMaxObserver``).

    Example:
        >>> cal = MinMaxCalibrator(QuantSpec(granularity="per_channel", axis=1))
        >>> _ = cal(torch.tensor([[1.0, -2.0], [3.0, 4.0]]))
        >>> cal.min_val.tolist(), cal.max_val.tolist()
        ([1.0, -2.0], [3.0, 4.0])
    """

    def _init_state(self, device: torch.device) -> None:
        lo, hi = self._empty_range(device)
        self.register_buffer("min_val", lo)
        self.register_buffer("max_val", hi)

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 first: torch.Tensor) -> None:
        if self.min_val.numel() == 0:  # per-channel/group: the first batch sets the shape
            self.min_val, self.max_val = lo.clone(), hi.clone()
            return
        self._check_shape(lo)  # per tensor, the initial (+inf, -inf) needs no special case
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _merge(self, other: Calibrator) -> None:
        self._check_shape(other.min_val, "the other calibrator")
        self.min_val = torch.minimum(self.min_val, other.min_val.to(self.min_val.device))
        self.max_val = torch.maximum(self.max_val, other.max_val.to(self.max_val.device))

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.min_val.clone(), self.max_val.clone()


@register_calibrator("moving_average")
class MovingAverageCalibrator(MinMaxCalibrator):
    """Exponential moving average of each batch's min and max (torch.ao
    ``MovingAverageMinMaxObserver``): the first batch sets the range, then
    ``m <- m + averaging_constant * (batch_min - m)`` (same for max), in float32 as torch does.

    Args:
        averaging_constant: weight of the newest batch, in (0, 1]; torch's default 0.01.

    Example:
        >>> cal = MovingAverageCalibrator(averaging_constant=0.5)
        >>> for b in (torch.tensor([0.0, 2.0]), torch.tensor([0.0, 4.0])):
        ...     _ = cal(b)
        >>> cal.max_val.item()
        3.0
    """

    def __init__(self, spec: QuantSpec | None = None, *, tensor_name: str = "tensor",
                 averaging_constant: float = 0.01, **kwargs: Any) -> None:
        hint = "it must lie in (0, 1]; torch's default is 0.01"
        value = real_number(averaging_constant, "MovingAverageCalibrator.averaging_constant",
                            hint)
        if not 0.0 < value <= 1.0:
            raise ValueError(f"MovingAverageCalibrator.averaging_constant={averaging_constant!r}"
                             f": {hint}")
        self.averaging_constant = value
        super().__init__(spec, tensor_name=tensor_name, **kwargs)

    def _init_state(self, device: torch.device) -> None:
        super()._init_state(device)
        # the true extremes, for reports ("observed"); not part of the state a checkpoint holds
        lo, hi = self._empty_range(device)
        self.register_buffer("seen_min", lo, persistent=False)
        self.register_buffer("seen_max", hi, persistent=False)

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 first: torch.Tensor) -> None:
        if self.min_val.numel() == 0:  # per-channel/group: the first batch sets the shape
            self.min_val, self.max_val = lo.clone(), hi.clone()
            self.seen_min, self.seen_max = lo.clone(), hi.clone()
            return
        self._check_shape(lo)
        c = self.averaging_constant
        self.min_val = torch.where(first, lo, self.min_val + c * (lo - self.min_val))
        self.max_val = torch.where(first, hi, self.max_val + c * (hi - self.max_val))
        if self.seen_min.shape == lo.shape:
            self.seen_min = torch.minimum(self.seen_min, lo)
            self.seen_max = torch.maximum(self.seen_max, hi)

    def _merge(self, other: Calibrator) -> None:
        self._check_shape(other.min_val, "the other calibrator")
        na, nb = self.num_batches, other.num_batches
        dev = self.min_val.device
        self.min_val = (na * self.min_val + nb * other.min_val.to(dev)) / (na + nb)
        self.max_val = (na * self.max_val + nb * other.max_val.to(dev)) / (na + nb)
        if self.seen_min.shape == other.seen_min.shape:
            self.seen_min = torch.minimum(self.seen_min, other.seen_min.to(dev))
            self.seen_max = torch.maximum(self.seen_max, other.seen_max.to(dev))


def observed_range(cal: Calibrator) -> tuple[torch.Tensor, torch.Tensor]:
    """The extremes a calibrator saw (what reports call "observed"): the moving average's own
    running extremes where it has them (not its averaged range), else ``min_val`` /
    ``max_val``, else the chosen range.

    Example:
        >>> cal = MovingAverageCalibrator(averaging_constant=0.5)
        >>> for b in (torch.tensor([0.0, 2.0]), torch.tensor([0.0, 4.0])):
        ...     _ = cal(b)
        >>> cal.max_val.item(), observed_range(cal)[1].item()
        (3.0, 4.0)
    """
    if not isinstance(cal, Calibrator):
        raise TypeError(f"observed_range: expected a Calibrator (e.g. create_calibrator("
                        f"'minmax')), got {type(cal).__name__}")
    if cal.num_batches == 0:
        return cal.compute_range()  # (raises: nothing observed yet, naming the tensor)
    lo, hi = getattr(cal, "seen_min", None), getattr(cal, "seen_max", None)
    if (lo is not None and hi is not None and lo.numel() > 0 and bool(torch.isfinite(lo).all())
            and bool(torch.isfinite(hi).all()) and lo.shape == cal.min_val.shape):
        return lo, hi  # (after load_state_dict they are unset: the tracked range instead)
    if hasattr(cal, "min_val") and hasattr(cal, "max_val"):
        return cal.min_val, cal.max_val
    return cal.compute_range()


# ---------------------------------------------------------------------- histogram family
def _pow2(e: torch.Tensor) -> torch.Tensor:
    """Exactly ``2.0 ** e`` (float32) for integer ``e`` in [-126, 127], built from its bits on
    ``e``'s device (no host sync, no reliance on ``exp2`` rounding).

    Example:
        >>> _pow2(torch.tensor([-3, 0, 10])).tolist()
        [0.125, 1.0, 1024.0]
    """
    return ((e.to(torch.int32) + 127) << 23).view(torch.float32)


def _bin_counts(x: torch.Tensor, exponent: torch.Tensor, bins: int) -> torch.Tensor:
    """int64 counts of ``x`` over the grid ``[-2**exponent, 2**exponent)`` with ``bins`` bins.

    ``x * (1/w)`` scales by a power of two, so ``floor`` sees the exact quotient. On CUDA,
    ``torch.bincount`` reads the largest index back to the host; ``index_add_`` does not.
    """
    half = bins // 2
    inv_w = _pow2(half.bit_length() - 1 - exponent)  # 1 / bin width, a power of two
    idx = torch.floor(x.reshape(-1) * inv_w).to(torch.int64).add_(half).clamp_(0, bins - 1)
    if idx.device.type == "cpu":
        return torch.bincount(idx, minlength=bins)
    counts = torch.zeros(bins, dtype=torch.int64, device=idx.device)
    return counts.index_add_(0, idx, torch.ones_like(idx))


def _coarsen(hist: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Re-bin onto the grid ``2**shift`` times wider: bin j -> ``((j - half) >> shift) + half``.

    ``shift`` is a 0-dim int64 tensor >= 0 (0 returns an equal histogram), so regridding needs
    no host sync.
    """
    half = hist.numel() // 2
    j = torch.arange(hist.numel(), device=hist.device)
    target = ((j - half) >> shift.clamp(max=62)) + half  # floor division by 2**shift
    return torch.zeros_like(hist).index_add_(0, target, hist)


def _xlogx(t: torch.Tensor) -> torch.Tensor:
    return torch.where(t > 0, t * torch.log(t.clamp(min=1e-300)), torch.zeros_like(t))


def _quantile(counts: torch.Tensor, start: float, width: float, frac: float,
              zeros: float = 0.0, zero_bin: int = 0) -> float:
    """Value below which ``frac`` of the mass lies; density uniform inside each bin, except for
    ``zeros`` exact zeros: a point mass at the left edge (0.0) of bin ``zero_bin``."""
    cum = torch.cumsum(counts, 0)
    target = frac * float(cum[-1])
    j = min(int(torch.searchsorted(cum, torch.tensor([target], dtype=cum.dtype))),
            counts.numel() - 1)
    n_j = float(counts[j])
    rest = target - float(cum[j]) + n_j  # mass needed from inside bin j
    if j == zero_bin and zeros > 0:
        rest, n_j = rest - zeros, n_j - zeros
    inside = rest / n_j if n_j > 0 else 0.0
    return start + (j + min(max(inside, 0.0), 1.0)) * width


class HistogramCalibrator(Calibrator):
    """Base of the histogram calibrators: the fixed-size, exactly mergeable histogram described
    in the module docstring, plus the observed min/max. Per-tensor only.

    Args:
        bins: number of bins, a power of two >= 64 (default 2048; state is ``8 * bins`` bytes).

    Buffers: ``histogram`` (int64 ``[bins]``), ``grid_exponent`` (``k``: the grid is
    ``[-2**k, 2**k)``), ``zero_count`` (exact zeros seen), ``min_val``, ``max_val``.
    """

    granularities = ("per_tensor",)

    histogram: torch.Tensor
    grid_exponent: torch.Tensor
    zero_count: torch.Tensor

    def __init__(self, spec: QuantSpec | None = None, *, tensor_name: str = "tensor",
                 bins: int = 2048, **kwargs: Any) -> None:
        if (not isinstance(bins, int) or isinstance(bins, bool) or not 64 <= bins <= 2**24
                or bins & (bins - 1)):
            raise ValueError(f"{type(self).__name__}.bins={bins!r} must be a power of two in "
                             "[64, 2**24] (e.g. 2048)")
        self.bins = bins
        super().__init__(spec, tensor_name=tensor_name, **kwargs)

    @property
    def bin_width(self) -> float:
        """Width of one bin of the current grid."""
        return 2.0 ** (int(self.grid_exponent) + 1) / self.bins

    @property
    def bin_edges(self) -> torch.Tensor:
        """``bins + 1`` float64 edges of the current grid (CPU)."""
        return (torch.arange(self.bins + 1, dtype=torch.float64) - self.bins // 2) * self.bin_width

    def _init_state(self, device: torch.device) -> None:
        self.register_buffer("histogram", torch.zeros(self.bins, dtype=torch.int64, device=device))
        self.register_buffer("grid_exponent", torch.tensor(_K_MIN, device=device))
        self.register_buffer("zero_count", torch.zeros((), dtype=torch.int64, device=device))
        lo, hi = self._empty_range(device)
        self.register_buffer("min_val", lo)
        self.register_buffer("max_val", hi)

    def _check_mergeable(self, other: Calibrator) -> None:
        if other.histogram.numel() != self.bins:
            raise ValueError(f"{self.tensor_name}: cannot merge a {other.histogram.numel()}-bin "
                             f"histogram into a {self.bins}-bin one; use the same bins")

    def _regrid(self, exponent: torch.Tensor) -> None:
        """Widen the grid to ``[-2**exponent, 2**exponent)`` if that is wider (on the device)."""
        self.histogram = _coarsen(self.histogram, (exponent - self.grid_exponent).clamp(min=0))
        self.grid_exponent = torch.maximum(self.grid_exponent, exponent)

    def _observe(self, x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
                 first: torch.Tensor) -> None:
        amax = torch.maximum(-lo, hi)
        exponent = torch.frexp(amax).exponent.to(torch.int64)  # amax < 2**exponent
        self._regrid(torch.where(amax == 0, _K_MIN, exponent).clamp(min=_K_MIN))
        self.histogram = self.histogram + _bin_counts(x, self.grid_exponent, self.bins)
        self.zero_count = self.zero_count + (x == 0).sum()
        self.min_val = torch.minimum(self.min_val, lo)
        self.max_val = torch.maximum(self.max_val, hi)

    def _merge(self, other: Calibrator) -> None:
        assert isinstance(other, HistogramCalibrator)
        dev = self.histogram.device
        other_k = other.grid_exponent.to(dev)
        self._regrid(other_k)
        self.histogram = self.histogram + _coarsen(other.histogram.to(dev),
                                                   self.grid_exponent - other_k)
        self.zero_count = self.zero_count + other.zero_count.to(dev)
        self.min_val = torch.minimum(self.min_val, other.min_val.to(dev))
        self.max_val = torch.maximum(self.max_val, other.max_val.to(dev))

    def _counts(self) -> tuple[torch.Tensor, float, int]:
        """(float64 CPU counts, bin width, index of the bin starting at 0)."""
        return self.histogram.detach().to("cpu", torch.float64), self.bin_width, self.bins // 2

    def _folded(self, counts: torch.Tensor) -> torch.Tensor:
        """Histogram of ``|x|`` over ``[0, 2**k)`` with ``bins / 2`` bins (exact: 0 is an edge)."""
        half = self.bins // 2
        return counts[half:] + counts[:half].flip(0)

    def _clamped(self, lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(lo, hi) clipped into the observed range, as float32 tensors on the buffers' device."""
        lo = max(lo, float(self.min_val))
        hi = min(hi, float(self.max_val))
        lo = min(lo, hi)
        dev = self.min_val.device
        return torch.tensor(lo, device=dev), torch.tensor(hi, device=dev)


@register_calibrator("percentile")
class PercentileCalibrator(HistogramCalibrator):
    """Clip the most extreme ``100 - percentile`` percent of the values.

    Symmetric specs: ``t`` = the ``percentile``-th percentile of ``|x|``, range ``(-t, t)``.
    Affine specs: the ``(100 - percentile) / 2`` and ``(100 + percentile) / 2`` percentiles.
    Percentiles interpolate linearly inside a histogram bin (exact zeros, e.g. ReLU outputs,
    count as a point mass at 0); the range is clipped into the observed ``[min, max]`` (as ONNX
    Runtime does).

    Args:
        percentile: in (0, 100]; default 99.99. ``100`` gives the observed min/max.
        bins: histogram bins (see :class:`HistogramCalibrator`).

    Example:
        >>> cal = PercentileCalibrator(percentile=99.0)
        >>> _ = cal(torch.linspace(0, 100, 100_001))
        >>> [round(v.item(), 1) for v in cal.compute_range()]
        [0.5, 99.5]
    """

    def __init__(self, spec: QuantSpec | None = None, *, tensor_name: str = "tensor",
                 percentile: float = 99.99, bins: int = 2048, **kwargs: Any) -> None:
        value = real_number(percentile, "PercentileCalibrator.percentile",
                            "it must lie in (0, 100], e.g. 99.99")
        if not 0.0 < value <= 100.0:
            raise ValueError(f"PercentileCalibrator.percentile={percentile!r} must lie in "
                             "(0, 100], e.g. 99.99")
        self.percentile = value
        super().__init__(spec, tensor_name=tensor_name, bins=bins, **kwargs)

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts, w, half = self._counts()
        zeros = float(self.zero_count)
        if self.spec.symmetric:
            t = _quantile(self._folded(counts), 0.0, w, self.percentile / 100.0, zeros, 0)
            return self._clamped(-t, t)
        cut = (100.0 - self.percentile) / 200.0
        start = -half * w
        return self._clamped(_quantile(counts, start, w, cut, zeros, half),
                             _quantile(counts, start, w, 1.0 - cut, zeros, half))


def _kl_divergence(h: torch.Tensor, s: torch.Tensor, e: torch.Tensor, nq: int,
                   eps: float = 1e-4) -> torch.Tensor:
    """TensorRT's KL(p || q) for each candidate window ``[s_c, e_c)`` of the histogram ``h``.

    ``p`` is ``h[s:e]`` with the mass outside the window added to its first/last bin; ``q``
    merges ``h[s:e]`` (without the outliers) into ``nq`` quantized bins of ``(e-s) // nq`` bins
    (the last takes the remainder) and spreads each evenly over the bins where ``p > 0``.
    Computed for all windows at once from prefix sums: with ``P_k``/``Q_k`` the mass of
    quantized bin k in p/q and ``nz_k`` its count of non-empty bins,
    ``KL = (sum p log p - sum_k P_k log(Q_k / nz_k)) / N - log N + log sum_k Q_k``.
    Empty ``Q_k`` under outliers are floored at ``eps`` counts (TensorRT's smoothing).

    Args:
        h: float64 counts ``[B]``; s, e: int64 ``[C]`` with ``e - s >= nq``.

    Returns:
        float64 ``[C]``.
    """
    n = h.sum()
    zero = h.new_zeros(1)
    cum = torch.cat([zero, h.cumsum(0)])  # (B+1,) mass before index i
    nzc = torch.cat([zero, (h > 0).to(h.dtype).cumsum(0)])  # non-empty bins before index i
    hlogh = torch.cat([zero, _xlogx(h).cumsum(0)])
    left, right = cum[s], n - cum[e]  # (C,) outliers folded into the edge bins
    first, last = h[s], h[e - 1]
    m = (e - s) // nq  # (C,) fine bins per quantized bin
    k = torch.arange(nq + 1)
    b = torch.where(k < nq, s[:, None] + k * m[:, None], e[:, None])  # (C, nq+1) boundaries
    flat = b.reshape(-1)
    q = cum.index_select(0, flat).view(b.shape).diff(dim=1)  # (C, nq) in-window mass
    nz = nzc.index_select(0, flat).view(b.shape).diff(dim=1)  # (C, nq) non-empty fine bins
    nz[:, 0] += ((first == 0) & (left > 0)).to(h.dtype)
    nz[:, -1] += ((last == 0) & (right > 0)).to(h.dtype)
    p = q.clone()
    p[:, 0] += left
    p[:, -1] += right
    plogp = (hlogh[e] - hlogh[s] - _xlogx(first) - _xlogx(last)
             + _xlogx(first + left) + _xlogx(last + right))
    q.clamp_(min=eps)
    plogq = (p * torch.log(q / nz.clamp(min=1))).sum(1)  # p = 0 wherever nz = 0
    qsum = (q * (nz > 0)).sum(1)
    return (plogp - plogq) / n - torch.log(n) + torch.log(qsum)


@register_calibrator("entropy")
class EntropyCalibrator(HistogramCalibrator):
    """KL-divergence threshold search (TensorRT's entropy calibration; ORT ``Entropy``).

    Symmetric specs follow TensorRT: on the histogram of ``|x|``, every window ``[0, i)`` with
    ``i >= nq`` is a candidate, ``nq = 2**(bits-1)`` quantized bins (128 for INT8); the
    threshold ``t`` of the smallest KL gives ``(-t, t)``. Affine specs follow ONNX Runtime:
    windows ``[-t, t)`` of the signed histogram, intersected with the observed range, into
    ``nq = 2**bits`` quantized bins (ORT's default is 128). See :func:`_kl_divergence`.
    The result is clipped into the observed ``[min, max]``.

    Args:
        num_quantized_bins: override ``nq``.
        bins: histogram bins (see :class:`HistogramCalibrator`); default 8192, so that ``|x|``
            gets at least 2048 bins over ``[0, max|x|]`` like TensorRT's histogram. The KL search
            needs that resolution: with 2048 bins, 0.1 % outliers at 50 sigma leave the Gaussian
            core too few bins to be clipped.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> cal = EntropyCalibrator(QuantSpec(symmetric=True))
        >>> _ = cal(torch.randn(100_000, generator=g))
        >>> 2.5 < cal.compute_range()[1].item() < 4.5
        True
    """

    def __init__(self, spec: QuantSpec | None = None, *, tensor_name: str = "tensor",
                 num_quantized_bins: int | None = None, bins: int = 8192,
                 **kwargs: Any) -> None:
        if num_quantized_bins is not None and (not isinstance(num_quantized_bins, int)
                                               or num_quantized_bins < 2):
            raise ValueError("EntropyCalibrator.num_quantized_bins must be an integer >= 2 or "
                             f"None (got {num_quantized_bins!r})")
        self.num_quantized_bins = num_quantized_bins
        super().__init__(spec, tensor_name=tensor_name, bins=bins, **kwargs)

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts, w, half = self._counts()
        counts[half] -= float(self.zero_count)  # exact zeros quantize exactly: search the rest
        if float(counts.sum()) == 0.0:
            return self._clamped(float(self.min_val), float(self.max_val))
        levels = self.spec.qmax - self.spec.qmin + 1
        if self.spec.symmetric:
            h = self._folded(counts)  # (half,) |x| histogram over [0, 2**k)
            nq = self.num_quantized_bins or max(levels // 2, 2)
            end = int(torch.nonzero(h).max()) + 1
            e = torch.arange(min(nq, end), end + 1)
            s = torch.zeros_like(e)
        else:
            h = counts
            nq = self.num_quantized_bins or levels
            nonzero = torch.nonzero(h).flatten()
            i_lo, i_hi = int(nonzero.min()), int(nonzero.max()) + 1
            n = torch.arange(1, max(half - i_lo, i_hi - half) + 1)  # larger n: same window
            s = (half - n).clamp(min=i_lo)
            e = (half + n).clamp(max=i_hi)
            keep = (e - s) >= nq
            s, e = (s[keep], e[keep]) if bool(keep.any()) else (s[-1:], e[-1:])
        # A window whose own data fills fewer than two fine bins scores KL = 0 whatever it
        # clips (p and q both put everything in one bin): on integer, binary or shifted data
        # the search took a window holding none or one value of the data, and clipped the
        # rest (-5..5 -> (-1, 1)). Such windows are no candidates; with none left, the whole
        # observed range.
        nonempty = torch.cat([h.new_zeros(1), (h > 0).to(h.dtype).cumsum(0)])  # before i
        filled = nonempty[e] - nonempty[s]  # non-empty fine bins in [s, e)
        if not bool((filled >= 2).any()):
            t = max(-float(self.min_val), float(self.max_val))
            return (self._clamped(-t, t) if self.spec.symmetric else
                    self._clamped(float(self.min_val), float(self.max_val)))
        nq = min(nq, int((e - s).min()))
        kl = _kl_divergence(h, s, e, nq).masked_fill(filled < 2, float("inf"))
        best = int(torch.argmin(kl))
        if self.spec.symmetric:
            t = float(e[best]) * w
            return self._clamped(-t, t)
        return self._clamped(float(s[best] - half) * w, float(e[best] - half) * w)


@register_calibrator("mse")
class MSECalibrator(HistogramCalibrator):
    """The clipping range minimising the expected quantization MSE over the histogram.

    Error model (values uniform inside each bin, exact zeros kept aside since 0 quantizes
    exactly): ``MSE(lo, hi) = E[(x - clip)^2 ; x outside [lo', hi']] + N_inside * step^2 / 12``,
    ``step`` the quantization step, ``[lo', hi']`` the representable range. Symmetric specs
    search ``t = amax * i / candidates`` (clip points ``(qmin - zp) * step`` and
    ``(qmax - zp) * step`` with ``step = t / qmax``, as ``choose_qparams`` sets them); affine
    specs search a ``(candidates + 1)^2`` grid of ``(lo, hi)`` fractions of the observed range
    (the zero-point nudge is ignored). Both terms are computed from prefix sums in
    ``O(bins + candidates^2)``.

    Args:
        candidates: grid resolution of the search (default 512).
        bins: histogram bins (see :class:`HistogramCalibrator`).

    Example:
        >>> cal = MSECalibrator(QuantSpec(bits=4, symmetric=True))
        >>> _ = cal(torch.cat([torch.linspace(-1, 1, 10_000), torch.tensor([100.0])]))
        >>> cal.compute_range()[1].item() < 10  # the lone outlier is clipped
        True
    """

    def __init__(self, spec: QuantSpec | None = None, *, tensor_name: str = "tensor",
                 candidates: int = 512, bins: int = 2048, **kwargs: Any) -> None:
        if not isinstance(candidates, int) or candidates < 8:
            raise ValueError(f"MSECalibrator.candidates={candidates!r} must be an integer >= 8")
        self.candidates = candidates
        super().__init__(spec, tensor_name=tensor_name, bins=bins, **kwargs)

    def _compute_range(self) -> tuple[torch.Tensor, torch.Tensor]:
        counts, w, half = self._counts()
        zeros = float(self.zero_count)
        counts[half] -= zeros  # exact zeros quantize exactly: keep them out of the density
        nbins = counts.numel()
        centers = (torch.arange(nbins, dtype=torch.float64) - half + 0.5) * w
        zero = counts.new_zeros(1)
        p0 = torch.cat([zero, counts.cumsum(0)])  # prefix sums of n, n*c, n*E[x^2 | bin]
        p1 = torch.cat([zero, (counts * centers).cumsum(0)])
        p2 = torch.cat([zero, (counts * (centers**2 + w * w / 12)).cumsum(0)])
        edge0 = -half * w

        def tail(clip: torch.Tensor, upper: bool) -> tuple[torch.Tensor, torch.Tensor]:
            """Mass beyond ``clip`` and its squared clipping error (partial bin included)."""
            clip = clip.clamp(edge0, -edge0)
            j = torch.floor((clip - edge0) / w).long().clamp(0, nbins - 1)  # bin holding clip
            if upper:
                i0, i1, d = j + 1, torch.full_like(j, nbins), edge0 + (j + 1) * w - clip
            else:
                i0, i1, d = torch.zeros_like(j), j, clip - (edge0 + j * w)
            d = d.clamp(min=0.0)
            s0, s1, s2 = p0[i1] - p0[i0], p1[i1] - p1[i0], p2[i1] - p2[i0]
            mass = s0 + counts[j] * d / w
            err = (s2 - 2 * clip * s1 + clip**2 * s0).clamp(min=0.0) + counts[j] * d**3 / (3 * w)
            return mass, err

        total = float(counts.sum())
        spec, c = self.spec, self.candidates
        frac = torch.arange(0, c + 1, dtype=torch.float64) / c
        if spec.symmetric:
            amax = max(-float(self.min_val), float(self.max_val))
            t = amax * frac[1:]  # (c,)
            if spec.signed:
                zp, half_levels = 0, spec.qmax
            else:
                zp = (spec.qmin + spec.qmax + 1) // 2
                half_levels = min(spec.qmax - zp, zp - spec.qmin)
            step = t / half_levels
            m_lo, e_lo = tail((spec.qmin - zp) * step, upper=False)
            m_hi, e_hi = tail((spec.qmax - zp) * step, upper=True)
            err = e_lo + e_hi + (total - m_lo - m_hi).clamp(min=0) * step**2 / 12
            best = float(t[int(torch.argmin(err))])
            return self._clamped(-best, best)
        lo = min(float(self.min_val), 0.0) * (frac if float(self.min_val) < 0 else frac[:1])
        hi = max(float(self.max_val), 0.0) * (frac if float(self.max_val) > 0 else frac[:1])
        m_lo, e_lo = tail(lo, upper=False)  # (L,)
        m_hi, e_hi = tail(hi, upper=True)  # (H,)
        step = (hi[None, :] - lo[:, None]) / (spec.qmax - spec.qmin)  # (L, H)
        inside = (total - m_lo[:, None] - m_hi[None, :]).clamp(min=0)
        err = e_lo[:, None] + e_hi[None, :] + inside * step**2 / 12
        a, b = divmod(int(torch.argmin(err)), hi.numel())
        return self._clamped(float(lo[a]), float(hi[b]))
