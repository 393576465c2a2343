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

Every training forward appends one row of statistics (scale, zero-point, observed range,
fraction of clipped elements), and its backward adds the gradient norm before and after
clipping; :mod:`lowbit.qat_stats` turns them into tables and plots.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from lowbit.calibrators import Calibrator, MinMaxCalibrator, create_calibrator
from lowbit.config import QuantSpec
from lowbit.ops import _expand, choose_qparams, compute_range

__all__ = ["FakeQuantize", "fake_quantize_lsq"]

#: Columns of one forward statistics row (see :meth:`FakeQuantize.history`).
FORWARD_COLUMNS = ("scale", "scale_min", "scale_max", "zero_point", "range_min", "range_max",
                   "clipped_fraction")
#: Columns filled by the backward pass of the same step.
BACKWARD_COLUMNS = ("grad_norm_in", "grad_norm")
_ROW_COLUMNS = FORWARD_COLUMNS[:-1]  # what a forward row stores; clipping comes separately


class _FakeQuantizeFn(torch.autograd.Function):
    """Quantize-dequantize; STE for x, LSQ gradient for a learnable scale; gradient stats."""

    @staticmethod
    def forward(ctx, x, scale, zero_point, spec, learn, grad_factor, sink):  # type: ignore[override]
        xg = _grouped_float(x, spec)  # float32, grouped view for per_group
        s = _expand(scale.detach().float(), x, spec)  # broadcastable to xg
        # the codes of lowbit.ops (round(x * (1/s)) + zp), with fewer passes over x
        codes = (xg * (1.0 / s)).round_()
        z = None if spec.symmetric and spec.signed else _expand(zero_point, x, spec).float()
        if z is not None:
            codes += z
        q = torch.clamp(codes, spec.qmin, spec.qmax)
        inside = codes == q  # the code was not clipped (NaN compares False, as torch does)
        ctx.spec, ctx.learn, ctx.grad_factor, ctx.x_shape = spec, learn, grad_factor, x.shape
        ctx.sink = sink  # (FakeQuantize, row index) or None: where backward records grad norms
        if z is not None:
            q -= z  # q - zp
        if learn:
            # d x_hat / d scale, computed here so that backward needs no copy of x
            term = torch.where(inside, q - xg / s, q)
            ctx.save_for_backward(inside, term, scale)
        else:
            ctx.save_for_backward(inside)
        if sink is not None:
            sink[0]._set_clipped(sink[1], torch.count_nonzero(inside), inside.numel())
        return q.mul_(s).reshape(x.shape).to(x.dtype)  # (q - zp) * scale

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        inside = ctx.saved_tensors[0]
        g = grad.reshape(inside.shape) if inside.shape != grad.shape else grad
        gx = torch.where(inside, g, 0.0).reshape(ctx.x_shape)  # clipped STE
        gs = None
        if ctx.learn:
            term, scale = ctx.saved_tensors[1], ctx.saved_tensors[2]
            gs = _scale_grad(g.float() * term, scale, ctx.spec, ctx.x_shape) * ctx.grad_factor
        if ctx.sink is not None:
            fq, row = ctx.sink
            fq._set_grad(row, torch.linalg.vector_norm(grad), torch.linalg.vector_norm(gx))
        return gx, gs, None, None, None, None, None


def _grouped_float(x: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    xf = x.float()
    if spec.granularity == "per_group":
        return xf.reshape(*x.shape[:-1], -1, spec.group_size)
    return xf


def _scale_grad(t: torch.Tensor, scale: torch.Tensor, spec: QuantSpec,
                x_shape: torch.Size) -> torch.Tensor:
    """Reduce the per-element LSQ term (x's grouped view) to ``scale``'s shape."""
    if spec.granularity == "per_tensor":
        return t.sum().reshape(scale.shape).to(scale.dtype)
    if spec.granularity == "per_channel":
        axis = spec.axis % len(x_shape)
        dims = [d for d in range(t.dim()) if d != axis]
        return t.sum(dim=dims).reshape(scale.shape).to(scale.dtype)
    return t.sum(dim=-1).reshape(scale.shape).to(scale.dtype)  # per_group / per_token


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
        frozen = (self.freeze_observer_after is not None
                  and int(self.num_steps) >= self.freeze_observer_after)
        return bool(self.observer_enabled) and not frozen and not self.dynamic

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
    def observe(self, x: torch.Tensor) -> None:
        """Feed ``x`` to the observer and refresh ``scale``/``zero_point`` from its range.

        A learnable scale is only set by the first observation (LSQ initialization).
        """
        if self.observer is None:
            return
        if self.reset_observer:
            self.observer.reset()
        self.observer.update(self._summary(x))
        if self.learnable_scale and bool(self.initialized):
            return
        scale, zp = self.observer.compute_qparams(self.spec)
        self._set_qparams(scale, zp)
        self.initialized.fill_(True)

    def _summary(self, x: torch.Tensor) -> torch.Tensor:
        """What the observer needs to see: for min-max observers of per-channel (axis 0)
        statistics, the ``(C, 2)`` tensor of each channel's min and max, which gives the
        observer exactly the same state as ``x`` itself (``amin``/``amax`` are an order of
        magnitude faster than ``torch.aminmax(dim=...)`` on CPU); otherwise ``x``."""
        spec = self.spec
        if (not isinstance(self.observer, MinMaxCalibrator) or spec.granularity != "per_channel"
                or x.dim() < 2 or spec.axis % x.dim() != 0):
            return x
        flat = x.detach().reshape(x.shape[0], -1)  # (C, rest)
        return torch.stack([flat.amin(1), flat.amax(1)], dim=1)  # (C, 2)

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
        observe = (training and self.observing) or not bool(self.initialized)
        if training:
            self.num_steps += 1
        record = training and self.record_statistics and (
            int(self.num_steps) % self.statistics_every == 0)
        if self.dynamic:
            if not bool(self.fake_quant_enabled):
                return x
            scale, zp = choose_qparams(*compute_range(x, self.spec, self.name), self.spec)
            row = None
            if record:  # the batch's own range
                lo, hi = compute_range(x, self.spec.with_(granularity="per_tensor"), self.name)
                row = self._record_row(scale, zp, lo, hi)
            return self._apply(x, scale, zp, row)
        if observe:
            self.observe(x)
        assert self.observer is not None
        row = None
        if record:
            row = self._record_row(self.scale, self.zero_point, self.observer.min_val,
                                   self.observer.max_val)
        if not bool(self.fake_quant_enabled):
            if row is not None:
                self._clip[row] = 0.0  # pass-through: nothing clipped
            return x
        return self._apply(x, self.scale, self.zero_point, row)

    def _apply(self, x: torch.Tensor, scale: torch.Tensor, zp: torch.Tensor,
               row: int | None) -> torch.Tensor:
        sink = None if row is None else (self, row)
        learn = self.learnable_scale and torch.is_grad_enabled()
        factor = lsq_grad_factor(x, scale, self.spec) if learn else 0.0
        return _FakeQuantizeFn.apply(x, scale, zp, self.spec, learn, factor, sink)

    # ------------------------------------------------------------------ statistics
    @torch.no_grad()
    def _record_row(self, scale: torch.Tensor, zp: torch.Tensor, lo: torch.Tensor,
                    hi: torch.Tensor) -> int:
        """Append this step's (scale mean/min/max, zero-point mean, range min/max); no sync."""
        s = scale.detach()
        if s.dim() == 0 and zp.dim() == 0 and lo.dim() == 0:  # per tensor: no reduction
            row = torch.stack((s, s, s, zp.to(s.dtype), lo.to(s.dtype), hi.to(s.dtype)))
        else:
            s_lo, s_hi = torch.aminmax(s)
            row = torch.stack((s.mean(), s_lo, s_hi, zp.float().mean(), lo.min().float(),
                               hi.max().float()))
        self._fwd.append(row)
        self._steps.append(int(self.num_steps))
        return len(self._fwd) - 1

    def _set_clipped(self, row: int, kept: torch.Tensor, numel: int) -> None:
        self._clip[row] = (kept.detach(), numel)  # fraction computed when read

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
            return 1.0 - int(value[0]) / max(value[1], 1)
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
