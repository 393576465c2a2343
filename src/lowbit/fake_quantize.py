"""``FakeQuantize``: an observer plus quantize-dequantize with a straight-through gradient.

Forward (the convention of :mod:`lowbit.ops`, bit-identical to ``torch.fake_quantize_per_*``)::

    q     = clamp(round_half_even(x * (1 / scale)) + zero_point, qmin, qmax)
    x_hat = (q - zero_point) * scale

Backward:

* ``d x_hat / d x = 1`` where the unclamped code lies in ``[qmin, qmax]``, else 0 (the clipped
  straight-through estimator, as torch's fake-quantize ops).
* learnable scale (LSQ, Esser et al. 2020) only: ``d x_hat / d scale = (q - zp) - x / scale``
  inside the range and ``q - zp`` (the clamped code) outside, times the gradient scale
  ``g = 1 / sqrt(numel_per_scale * qmax)``; the same formula as
  ``torch._fake_quantize_learnable_per_tensor_affine`` / ``_per_channel_affine``.
  The module learns ``log_scale`` (``scale = exp(log_scale)``, as TQT learns log thresholds):
  the scale stays positive, and the user's optimizer, whose learning rate suits weights of
  order 1e-2..1, moves a scale of order 1e-3 by a relative amount instead of driving it
  through zero (Adam's step is about ``lr`` whatever the gradient's size).

Observation schedule. Qparams come from a :class:`~lowbit.calibrators.Calibrator` (the observer,
a child module whose state is in buffers). The observer sees the tensor only in training mode
while ``observer_enabled`` (plus once, whatever the mode, when the quantizer has never seen
data), so evaluating a model never moves its ranges. With ``learnable_scale`` the observer only
initializes the scale; the optimizer moves it afterwards. ``dynamic=True`` skips the observer:
qparams are computed from each tensor at run time (per token for ``per_token`` specs).

Every training forward (every ``statistics_every``-th) appends one row of statistics (scale,
zero-point, observed range, fraction of clipped elements), and its backward adds the gradient
norm before and after clipping; rows stay tensors until read (no host sync), and
:mod:`lowbit.qat_stats` turns them into tables and plots.

Speed (``benchmarks/bench_qat.py``; QAT training step <= 1.5x FP32). Measured on CPU, 1
thread, 784x1024 weight: ``torch.fake_quantize_per_channel_affine_cachemask`` /
``_per_tensor_affine_cachemask_tensor_qparams`` are bit-identical to this forward but about 3x
slower than the vectorized ``mul, round_, clamp, eq_, mul_`` sequence here, and
``torch._fake_quantize_learnable_per_channel_affine`` is slower still, so neither is used. What
the hot path does instead:

* the "not clipped" mask is a float 1/0 tensor written over the codes (``eq_``); bool masks
  make ``torch.where`` / ``mul`` 4-50x slower on CPU;
* min-max and moving-average observers are updated on their buffers directly, in the state
  ``Calibrator.update`` would leave (``observe``), with one host sync (the NaN/Inf check);
* weights observed afresh with a symmetric signed spec cannot clip (see ``_clip_free``): no
  clamp, no mask, the gradient passes through as the mask would let it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowbit import distributed as _dist
from lowbit.calibrators import (
    Calibrator,
    MinMaxCalibrator,
    MovingAverageCalibrator,
    create_calibrator,
)
from lowbit.config import QuantSpec
from lowbit.ops import choose_qparams, compute_range, expand_qparam, qparams_from_range

__all__ = ["FakeQuantize", "fake_quantize_lsq"]

#: Columns of one forward statistics row (see :meth:`FakeQuantize.history`).
FORWARD_COLUMNS = ("scale", "scale_min", "scale_max", "zero_point", "range_min", "range_max",
                   "clipped_fraction")
#: Columns filled by the backward pass of the same step.
BACKWARD_COLUMNS = ("grad_norm_in", "grad_norm")
_ROW_COLUMNS = FORWARD_COLUMNS[:-1]  # what a forward row stores; clipping comes separately


class _FakeQuantizeFn(torch.autograd.Function):
    """Quantize-dequantize; STE for x, LSQ gradient for a learnable scale; gradient stats.

    ``no_clip=True`` (only when the caller knows that no code can leave ``[qmin, qmax]``, see
    :meth:`FakeQuantize._clip_free`) skips the clamp and the mask: the same forward, and the
    backward passes the gradient through unchanged, which is what the mask would do.
    """

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, learn, grad_factor, sink,  # type: ignore[override]
                no_clip=False):
        xg = _grouped_float(x, spec)  # float32, grouped view for per_group
        s = expand_qparam(scale.detach().float(), x, spec)  # broadcastable to xg
        # the codes of lowbit.ops (round(x * (1/s)) + zp), with as few passes over x as possible
        codes = (xg * (1.0 / s)).round_()
        z = None if spec.symmetric and spec.signed else expand_qparam(zero_point, x, spec).float()
        if z is not None:
            codes += z
        ctx.spec, ctx.learn, ctx.grad_factor, ctx.x_shape = spec, learn, grad_factor, x.shape
        ctx.sink = sink  # (FakeQuantize, row index) or None: where backward records grad norms
        ctx.no_clip = no_clip = no_clip and not learn
        if no_clip:
            q, mask = codes, None
        else:
            q = torch.clamp(codes, spec.qmin, spec.qmax)
            # float 1/0 mask "the code was not clipped", in the codes' memory; float masks are
            # several times faster than bool ones in torch.where / mul on CPU. NaN compares
            # unequal, so NaN inputs get a zero gradient, as in torch's fake-quantize ops.
            mask = codes.eq_(q)
        if z is not None:
            q -= z  # q - zp
        if learn:
            # d x_hat / d scale: q - x/s inside the range, q (the clamped code) outside, computed
            # here so that backward needs no copy of x. Float arithmetic instead of torch.where
            # (4x faster on CPU): x/s is finite inside, and a NaN can only come from 0 * inf
            # outside, where the term is q. -t + q is exactly q - t in IEEE arithmetic.
            term = (xg / s).mul_(mask).nan_to_num_(0.0).neg_().add_(q)
            ctx.save_for_backward(mask, term, scale)
        elif mask is not None:
            ctx.save_for_backward(mask)
        if sink is not None:
            # float32 sum of 0/1: exact below 2**24 elements, a statistic above
            kept = None if mask is None else mask.sum()
            sink[0]._set_clipped(sink[1], kept, 1 if mask is None else mask.numel())
        return q.mul_(s).reshape(x.shape).to(x.dtype)  # (q - zp) * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if ctx.no_clip:
            gx = grad
        else:
            mask = ctx.saved_tensors[0]
            g = grad.reshape(mask.shape) if mask.shape != grad.shape else grad
            gx = (g * mask).reshape(ctx.x_shape).to(grad.dtype)  # clipped STE
        gs = None
        if ctx.learn:
            term, scale = ctx.saved_tensors[1], ctx.saved_tensors[2]
            g = grad.reshape(term.shape)
            gs = _scale_grad(g, term, scale, ctx.spec, ctx.x_shape) * ctx.grad_factor
        if ctx.sink is not None:
            fq, row = ctx.sink
            norm_in = torch.linalg.vector_norm(grad)
            fq._set_grad(row, norm_in, norm_in if gx is grad else torch.linalg.vector_norm(gx))
        return gx, gs, None, None, None, None, None, None


def _grouped_float(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    xf = x.float()
    if spec.granularity == "per_group":
        return xf.reshape(*x.shape[:-1], -1, spec.group_size)
    return xf


def _scale_grad(g: torch.Tensor, term: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
                x_shape: torch.Size) -> torch.Tensor:
    """``sum(g * term)`` reduced to ``scale``'s shape (``term``: x's grouped view); per tensor
    as one dot product (no product tensor is allocated)."""
    g = g.float()
    if spec.granularity == "per_tensor":
        out = torch.dot(g.reshape(-1), term.reshape(-1))
    elif spec.granularity == "per_channel":  # (bmm of (1, K) @ (K, 1) rows is 3x slower)
        axis = spec.axis % len(x_shape)
        out = (g * term).sum(dim=[d for d in range(term.dim()) if d != axis])
    else:
        out = (g * term).sum(dim=-1)  # per_group / per_token
    return out.reshape(scale.shape).to(scale.dtype)


def fake_quantize_lsq(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                      spec: QuantSpec, grad_factor: float | None = None) -> torch.Tensor:
    """Fake-quantize with a learnable scale (LSQ): same forward as ``lowbit.ops.fake_quantize``.

    Args:
        x: float tensor.
        scale: float32 scale with requires_grad (shape from ``spec``'s granularity).
        zero_point: int32 zero-point (not learned).
        spec: the quantized format.
        grad_factor: multiplies the scale gradient; default LSQ's
            ``1 / sqrt(numel_per_scale * qmax)``.

    Returns:
        ``x_hat`` in x's dtype; backward gives x the clipped STE gradient and ``scale`` the LSQ
        gradient ``(q - zp) - x / scale`` inside the range, ``q - zp`` outside.

    Example:
        >>> s = torch.tensor(0.1, requires_grad=True)
        >>> y = fake_quantize_lsq(torch.tensor([0.26, 5.0]), s, torch.tensor(0), QuantSpec(bits=4),
        ...                       grad_factor=1.0)
        >>> y.tolist(), round(torch.autograd.grad(y.sum(), s)[0].item(), 4)
        ([0.30000001192092896, 0.699999988079071], 7.4)
    """
    if grad_factor is None:
        grad_factor = lsq_grad_factor(x, scale, spec)
    return _FakeQuantizeFn.apply(x, scale, zero_point, spec, True, float(grad_factor), None)


def lsq_grad_factor(x: torch.Tensor, scale: torch.Tensor, spec: QuantSpec) -> float:
    """LSQ's gradient scale ``1 / sqrt(numel_per_scale * qmax)``.

    Example:
        >>> lsq_grad_factor(torch.zeros(4, 32), torch.ones(()), QuantSpec(bits=8))
        0.0078...
    """
    per_scale = max(x.numel() // max(scale.numel(), 1), 1)
    return 1.0 / math.sqrt(per_scale * max(spec.qmax, 1))


class FakeQuantize(nn.Module):
    """Observer + fake quantization (quantize then dequantize in float) with an STE gradient.

    Args:
        spec: the quantized format (granularity, bits, symmetric...).
        observer: calibrator registry name, class or template instance (see
            :func:`lowbit.calibrators.create_calibrator`); ``"moving_average"`` by default, which
            is the usual choice for activations during QAT.
        observer_kwargs: options of the observer (e.g. ``{"averaging_constant": 0.01}``).
        dynamic: compute qparams from each tensor at run time (``mode="dynamic"`` activations);
            no observer, no stored qparams.
        learnable_scale: train the scale with the LSQ gradient through the parameter
            ``log_scale`` (``scale`` then reads ``exp(log_scale)``); the observer only initializes
            it.
        reset_observer: forget the observer's history before each observation, so qparams follow
            the current tensor only (what weights need: the range of today's weights).
        freeze_observer_after: stop observing after this many training steps (``None``: never).
        record_statistics: keep statistics of training forwards (see :meth:`history`).
        statistics_every: record every n-th training forward (1: every step).
        name: tensor name used in errors and statistics, e.g. ``"fc1.input"``.

    Buffers: ``scale`` (parameter ``log_scale`` when learnable), ``zero_point``,
    ``fake_quant_enabled``,
    ``observer_enabled``, ``initialized``, ``num_steps`` (training forwards seen), and the
    observer's own buffers: ``state_dict()`` restores a quantizer exactly.

    Raises:
        ValueError: on a non-QuantSpec spec, a per-token spec without ``dynamic=True``, a
            learnable dynamic quantizer, or an unknown observer.

    Example:
        >>> fq = FakeQuantize(QuantSpec(bits=8, symmetric=False), name="fc1.input")
        >>> x = torch.randn(16, 8)
        >>> y = fq(x)  # first call observes x, then quantizes-dequantizes it
        >>> from lowbit.ops import fake_quantize
        >>> torch.equal(y, fake_quantize(x, fq.scale, fq.zero_point, fq.spec))
        True
        >>> fq.disable_fake_quant(); torch.equal(fq(x), x)
        True
    """

    scale: torch.Tensor
    zero_point: torch.Tensor
    fake_quant_enabled: torch.Tensor
    observer_enabled: torch.Tensor
    initialized: torch.Tensor
    num_steps: torch.Tensor

    def __init__(self, spec: QuantSpec, observer: str | type[Calibrator] | Calibrator = (
            "moving_average"), *, observer_kwargs: Mapping[str, Any] | None = None,
                 dynamic: bool = False, learnable_scale: bool = False,
                 reset_observer: bool = False, freeze_observer_after: int | None = None,
                 record_statistics: bool = True, statistics_every: int = 1,
                 name: str = "tensor") -> None:
        super().__init__()
        if not isinstance(spec, QuantSpec):
            raise ValueError(f"FakeQuantize({name}): spec must be a QuantSpec, got "
                             f"{type(spec).__name__}")
        if dynamic and learnable_scale:
            raise ValueError(f"FakeQuantize({name}): a dynamic quantizer computes its scale from "
                             "each tensor, there is nothing to learn; drop learnable_scale or "
                             "dynamic")
        if spec.granularity == "per_token" and not dynamic:
            raise ValueError(f"FakeQuantize({name}): per_token qparams exist only at run time; "
                             "pass dynamic=True or use a per_tensor spec")
        if freeze_observer_after is not None and freeze_observer_after < 0:
            raise ValueError(f"FakeQuantize({name}): freeze_observer_after must be >= 0 or None, "
                             f"got {freeze_observer_after}")
        self.spec, self.name, self.dynamic = spec, name, bool(dynamic)
        self.learnable_scale, self.reset_observer = bool(learnable_scale), bool(reset_observer)
        self.freeze_observer_after = freeze_observer_after
        self.record_statistics = bool(record_statistics)
        if not isinstance(statistics_every, int) or statistics_every < 1:
            raise ValueError(f"FakeQuantize({name}): statistics_every must be a positive int, "
                             f"got {statistics_every!r}")
        self.statistics_every = statistics_every
        self.observer: Calibrator | None = None
        if not dynamic:
            self.observer = create_calibrator(observer, spec, tensor_name=name,
                                              **dict(observer_kwargs or {}))
        qshape: tuple[int, ...] = () if spec.granularity == "per_tensor" else (0,)
        if learnable_scale:
            self.log_scale = nn.Parameter(torch.zeros(qshape))
        else:
            self.register_buffer("scale", torch.ones(qshape))
        self.register_buffer("zero_point", torch.zeros(qshape, dtype=torch.int32))
        self.register_buffer("fake_quant_enabled", torch.tensor(True))
        self.register_buffer("observer_enabled", torch.tensor(True))
        self.register_buffer("initialized", torch.tensor(bool(dynamic)))
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        self._fwd: list[torch.Tensor] = []  # one (6,) row per recorded step, see _record_row
        self._steps: list[int] = []  # the training step of each row
        self._bwd: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # grad norms in / out
        self._clip: dict[int, Any] = {}  # (kept count, numel) or a loaded fraction
        self.sync_every = 0  # cross-rank range sync: lowbit.distributed.configure_qat_sync
        self.sync_group: Any = None

    # ------------------------------------------------------------------ modes
    def enable_observer(self, enabled: bool = True) -> None:
        """Let training forwards update the range (``False`` freezes the current qparams)."""
        self.observer_enabled.fill_(bool(enabled))

    def disable_observer(self) -> None:
        """Freeze the range: ``enable_observer(False)``."""
        self.enable_observer(False)

    def enable_fake_quant(self, enabled: bool = True) -> None:
        """Quantize-dequantize in forward (``False``: pass the tensor through, still observing)."""
        self.fake_quant_enabled.fill_(bool(enabled))

    def disable_fake_quant(self) -> None:
        """Pass tensors through unchanged: ``enable_fake_quant(False)``."""
        self.enable_fake_quant(False)

    @property
    def observing(self) -> bool:
        """Whether the next training forward updates the range."""
        return not self.dynamic and self._observing(int(self.num_steps))

    # ------------------------------------------------------------------ qparams
    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The current ``(scale float32, zero_point int32)``, detached copies.

        Raises:
            ValueError: for a dynamic quantizer, or one that has never observed data.
        """
        if self.dynamic:
            raise ValueError(f"{self.name}: a dynamic quantizer has no stored qparams")
        if not bool(self.initialized):
            raise ValueError(f"{self.name}: no data observed yet; run at least one batch through "
                             "the model (training mode) before reading its qparams")
        return self.scale.detach().float().clone(), self.zero_point.detach().clone()

    def __getattr__(self, name: str) -> Any:
        if name == "scale":  # a learnable quantizer's scale is derived from its log
            params = self.__dict__.get("_parameters", {})
            if "log_scale" in params:
                return torch.exp(params["log_scale"])
        return super().__getattr__(name)

    @torch.no_grad()
    def observe(self, x: torch.Tensor, *, sync: bool = False) -> None:
        """Feed ``x`` to the observer and refresh ``scale``/``zero_point`` from its range.

        ``sync=True`` (training forwards) takes part in the cross-rank range sync set up by
        :func:`lowbit.distributed.configure_qat_sync` (a no-op outside a distributed run).

        A learnable scale is only set by the first observation (LSQ initialization).
        Min-max and moving-average observers (the QAT defaults) take a fast path that leaves
        them in exactly the state :meth:`~lowbit.calibrators.Calibrator.update` would, with a
        handful of small ops and one host sync (the NaN/Inf check on the new scale).

        Raises:
            ValueError: when ``x`` holds NaN/Inf (named), or changes its channel count.
        """
        obs = self.observer
        if obs is None:
            return
        group = _dist.qat_group(self) if sync else None
        every_step = group is not None and (self.sync_every == 1 or not bool(self.initialized))
        scale = zp = None
        if type(obs) in (MinMaxCalibrator, MovingAverageCalibrator):
            scale, zp = self._observe_fast(obs, x, group if every_step else None)
        if scale is None and every_step:  # the global batch, through the exact merge
            _dist.observe_merged(obs, x, self.reset_observer, group)
            if self.learnable_scale and bool(self.initialized):
                return
            scale, zp = obs.compute_qparams(self.spec)
        elif scale is None:  # other observers, or a case the fast path hands over
            if self.reset_observer:
                obs.reset()
            obs.update(x)
            if self.learnable_scale and bool(self.initialized):
                return
            scale, zp = obs.compute_qparams(self.spec)
        elif self.learnable_scale and bool(self.initialized):
            return
        self._set_qparams(scale, zp)
        self.initialized.fill_(True)
        if group is not None and not every_step and int(self.num_steps) % self.sync_every == 0:
            _dist.sync_fake_quantize(self, group)  # every n-th step: combine the ranks' ranges

    def _observe_fast(self, obs: Calibrator, x: torch.Tensor, group: Any = None
                      ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Min-max / moving-average update straight on the observer's buffers.

        Returns the new ``(scale, zero_point)``, or ``(None, None)`` without touching anything
        when the generic :meth:`Calibrator.update` must run (empty, non-finite or re-shaped
        input: it raises the named error; a range whose width overflows float32). With a
        ``group``, the batch range is first reduced over its ranks (the global batch's range).
        """
        if x.numel() == 0:
            return None, None
        lo, hi = compute_range(x, obs.spec, obs.tensor_name)
        if group is not None:
            lo, hi = _dist.all_reduce_range(lo, hi, group, self.name)
        first = self.reset_observer or int(obs.num_batches_tracked) == 0
        if not first and lo.shape != obs.min_val.shape:
            return None, None
        old_lo, old_hi = obs.min_val, obs.max_val
        if first:
            new_lo, new_hi = lo, hi
        elif isinstance(obs, MovingAverageCalibrator):  # the calibrator's own formula
            c = obs.averaging_constant
            new_lo, new_hi = old_lo + c * (lo - old_lo), old_hi + c * (hi - old_hi)
        else:
            new_lo, new_hi = torch.minimum(old_lo, lo), torch.maximum(old_hi, hi)
        scale, zp = qparams_from_range(new_lo, new_hi, self.spec)
        # scales are >= eps, so their max is finite iff all are (amax propagates NaN); one op
        # and one host sync instead of isfinite's five ops
        if not math.isfinite(float(scale.amax())):  # NaN/Inf data: let update() name it
            return None, None
        obs.min_val, obs.max_val = new_lo, new_hi
        if first:
            obs.num_batches_tracked.fill_(1)  # a reset observer, or one that saw nothing yet
            obs.range_change.fill_(math.inf)
        else:
            obs.num_batches_tracked += 1
            # Calibrator._relative_change, without its host sync
            delta = (new_lo - old_lo).abs() + (new_hi - old_hi).abs()
            rel = torch.where(delta == 0, torch.zeros_like(delta), delta / (new_hi - new_lo))
            obs.range_change.copy_(rel.max())
        return scale, zp

    def _set_qparams(self, scale: torch.Tensor, zp: torch.Tensor) -> None:
        scale = scale.to(self.zero_point.device, torch.float32)
        zp = zp.to(self.zero_point.device, torch.int32)
        if self.learnable_scale:
            self.log_scale.data = torch.log(scale).reshape(scale.shape)  # shape may be new
        elif self.scale.shape != scale.shape:  # first per-channel / per-group observation
            self.scale = scale.clone()
        else:
            self.scale.copy_(scale)
        if self.zero_point.shape != zp.shape:
            self.zero_point = zp.clone()
        else:
            self.zero_point.copy_(zp)

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Observe (training mode, when enabled), then quantize-dequantize ``x``."""
        training = self.training
        step = 0
        if training:
            self.num_steps += 1
            step = int(self.num_steps)
        record = training and self.record_statistics and step % self.statistics_every == 0
        fake_quant = bool(self.fake_quant_enabled)
        if self.dynamic:
            if not fake_quant:
                return x
            lo, hi = compute_range(x, self.spec, self.name)
            scale, zp = qparams_from_range(lo, hi, self.spec)
            if not math.isfinite(float(scale.amax())):  # as in _observe_fast
                choose_qparams(lo, hi, self.spec)  # raises, naming the problem
            row = self._record_row(scale, zp, lo, hi, step) if record else None
            return self._fake_quantize(x, scale, zp, row, self._clip_free)
        # observe before the step counts: freeze_observer_after=n observes n training steps
        observe = not bool(self.initialized) or (training and self._observing(step - 1))
        if observe:
            self.observe(x, sync=training)
        assert self.observer is not None
        row = None
        if record:
            row = self._record_row(self.scale, self.zero_point, self.observer.min_val,
                                   self.observer.max_val, step)
        if not fake_quant:
            if row is not None:
                self._clip[row] = 0.0  # pass-through: nothing clipped
            return x
        return self._fake_quantize(x, self.scale, self.zero_point, row, observe and self._clip_free)

    def _observing(self, steps_before: int) -> bool:
        limit = self.freeze_observer_after
        return (limit is None or steps_before < limit) and bool(self.observer_enabled)

    @property
    def _clip_free(self) -> bool:
        """No code can be clipped when the qparams were just computed from this very tensor's
        min/max with a symmetric signed spec: ``|x| * (1 / (amax / qmax))`` exceeds ``qmax`` by a
        few float32 ulps at most, far below the 0.5 that would round past it. Then the clamp and
        the mask are skipped (same forward, same gradient). True for dynamic symmetric
        quantizers and for ``reset_observer`` min-max ones (QAT weights), whenever they observed
        the tensor they quantize."""
        if not (self.spec.symmetric and self.spec.signed) or self.learnable_scale:
            return False
        return self.dynamic or (self.reset_observer and type(self.observer) is MinMaxCalibrator)

    def _fake_quantize(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
               row: int | None, no_clip: bool = False) -> torch.Tensor:
        sink = None if row is None else (self, row)
        learn = self.learnable_scale and torch.is_grad_enabled()
        factor = lsq_grad_factor(x, scale, self.spec) if learn else 0.0
        return _FakeQuantizeFn.apply(x, scale, zp, self.spec, learn, factor, sink, no_clip)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def _record_row(self, scale: torch.Tensor, zp: torch.Tensor, lo: torch.Tensor,
                    hi: torch.Tensor, step: int) -> int:
        """Append this step's (scale mean/min/max, zero-point mean, range min/max); no sync."""
        s = scale.detach()
        if s.dim() == 0 and zp.dim() == 0 and lo.dim() == 0:  # per tensor: no reduction
            row = torch.stack((s, s, s, zp.to(s.dtype), lo.to(s.dtype), hi.to(s.dtype)))
        else:
            row = torch.stack((s.mean(), s.amin(), s.amax(), zp.float().mean(),
                               lo.amin().float(), hi.amax().float()))
        self._fwd.append(row)
        self._steps.append(step)
        return len(self._fwd) - 1

    def _set_clipped(self, row: int, kept: torch.Tensor | None, numel: int) -> None:
        """``kept``: count of unclipped elements (a tensor, read lazily); None: none clipped."""
        self._clip[row] = 0.0 if kept is None else (kept.detach(), numel)

    def _set_grad(self, row: int, norm_in: torch.Tensor, norm_out: torch.Tensor) -> None:
        self._bwd[row] = (norm_in.detach(), norm_out.detach())

    def history(self) -> dict[str, list[float]]:
        """Per recorded training step: ``step`` (the training forward's index) and the columns
        of ``FORWARD_COLUMNS`` and ``BACKWARD_COLUMNS`` (``nan`` where a step had no backward).

        Example:
            >>> fq = FakeQuantize(QuantSpec()).train()
            >>> fq(torch.randn(4, 4, requires_grad=True)).sum().backward()
            >>> h = fq.history(); h["step"], 0.0 <= h["clipped_fraction"][0] <= 1.0
            ([1], True)
        """
        n = len(self._fwd)
        out: dict[str, list[float]] = {"step": list(self._steps)}
        fwd = torch.stack(self._fwd).cpu() if n else torch.zeros(0, len(_ROW_COLUMNS))
        for j, col in enumerate(_ROW_COLUMNS):
            out[col] = fwd[:, j].tolist()
        out["clipped_fraction"] = [self._clipped(i) for i in range(n)]
        for j, col in enumerate(BACKWARD_COLUMNS):
            out[col] = [float(self._bwd[i][j]) if i in self._bwd else math.nan for i in range(n)]
        return out

    def _clipped(self, row: int) -> float:
        value = self._clip.get(row, math.nan)
        if isinstance(value, tuple):
            return 1.0 - float(value[0]) / max(value[1], 1)
        return float(value)

    def load_history(self, columns: Mapping[str, list[float | None]]) -> None:
        """Replace the recorded statistics by ``columns`` (as :meth:`history` returns them).

        Example:
            >>> a = FakeQuantize(QuantSpec()).train(); _ = a(torch.randn(3))
            >>> b = FakeQuantize(QuantSpec()); b.load_history(a.history())
            >>> b.history() == a.history()
            True
        """
        def col(name: str) -> list[float]:
            return [math.nan if v is None else float(v) for v in columns.get(name, [])]

        steps = [int(v) for v in columns.get("step", [])]
        n = len(steps)
        fwd = [col(c) or [math.nan] * n for c in _ROW_COLUMNS]
        self._steps = steps
        self._fwd = [torch.tensor([c[i] for c in fwd]) for i in range(n)]
        clip = col("clipped_fraction")
        self._clip = {i: v for i, v in enumerate(clip) if not math.isnan(v)}
        bwd = [col(c) or [math.nan] * n for c in BACKWARD_COLUMNS]
        self._bwd = {i: (torch.tensor(bwd[0][i]), torch.tensor(bwd[1][i])) for i in range(n)
                     if not (math.isnan(bwd[0][i]) and math.isnan(bwd[1][i]))}

    def clear_history(self) -> None:
        """Forget the recorded statistics (qparams and observer state are kept)."""
        self._fwd, self._steps, self._bwd, self._clip = [], [], {}, {}

    # ------------------------------------------------------------------ state dict
    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        # per-channel qparams and observer ranges get their shape at the first observation:
        # adopt the incoming shapes so a fresh quantizer can load a trained one
        for name, buf in [*self.named_buffers(), *self.named_parameters(recurse=False)]:
            key = prefix + name
            incoming = state_dict.get(key)
            if not isinstance(incoming, torch.Tensor) or buf is None or incoming.shape == buf.shape:
                continue
            owner_name, _, leaf = name.rpartition(".")
            owner = self.get_submodule(owner_name) if owner_name else self
            fresh = torch.empty(incoming.shape, dtype=buf.dtype, device=buf.device)
            if isinstance(getattr(owner, leaf), nn.Parameter):
                getattr(owner, leaf).data = fresh
            else:
                owner._buffers[leaf] = fresh
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        s = self.spec
        kind = "dynamic" if self.dynamic else (type(self.observer).__name__ if self.observer
                                               else "")
        return (f"name={self.name!r}, bits={s.bits}, {s.granularity}, "
                f"{'symmetric' if s.symmetric else 'affine'}, {kind}"
                + (", learnable_scale" if self.learnable_scale else ""))
