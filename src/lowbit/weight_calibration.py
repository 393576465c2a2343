"""Weight calibration for weight-only INT4 / INT8 (GPTQ, AWQ, SignRound) and SmoothQuant.

Round-to-nearest (``"rtn"``) quantizes each weight on its own. With a few calibration batches
the error can be steered to where the activations do not look: ``"gptq"`` quantizes the
columns of a Linear one by one and spreads each column's rounding error over the columns not yet
quantized (second-order, through the inverse Hessian ``H = 2 X^T X`` of the layer's inputs);
``"awq"`` scales the input channels that carry large activations up before rounding (and the
input down by the same factor); ``"signround"`` learns the rounding of a whole block
(:mod:`lowbit.signround`). They change codes and scales only: the quantized modules and
file format stay the same (AWQ adds a per-input-channel ``input_smoothing`` buffer).
:func:`smooth_quant` moves activation outliers into the weights for static / dynamic W8A8.

Calibration streams batches and keeps one ``K x K`` Hessian per layer being calibrated (never
the activations); layers are calibrated in execution order, each one on the outputs of the
already-quantized layers before it.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.utils._pytree import tree_map
from tqdm.auto import tqdm

from lowbit.calibration import note_failed_batch, run_batch
from lowbit.config import WEIGHT_METHODS, QuantSpec
from lowbit.dropin import is_linear_like, linear_weight
from lowbit.modules_weight_only import _layout
from lowbit.ops import choose_qparams, compute_range, fake_quantize
from lowbit.signround import block_of, signround_block

__all__ = ["WEIGHT_METHODS", "CalibratedWeight", "awq_search", "calibrate_weights",
           "gptq_quantize", "set_input_smoothing", "smooth_quant"]

_T = TypeVar("_T")


@dataclass
class CalibratedWeight:
    """What a calibration method hands to the module conversion of one layer.

    Attributes:
        weight: the float weight to convert (GPTQ: already on the quantization grid).
        qparams: ``(scale, zero_point)`` shaped like the module's buffers, or None (RTN them).
        input_smoothing: per-input-channel factor applied to ``x`` by the module, or None.
    """

    weight: torch.Tensor
    qparams: tuple[torch.Tensor, torch.Tensor] | None = None
    input_smoothing: torch.Tensor | None = None


def set_linear_weight(layer: nn.Module, w: torch.Tensor) -> None:
    """Overwrite a Linear / ``Conv1D`` weight with ``w`` ``[out, in]`` (later layers then see
    this layer's quantized function).

    Example:
        >>> fc = nn.Linear(3, 2); set_linear_weight(fc, torch.ones(2, 3)); float(fc.weight.sum())
        6.0
    """
    with torch.no_grad():
        linear_weight(layer).copy_(w.to(layer.weight.dtype))


class _Stop(Exception):
    """Raised by a hook once the inputs a pass needs are captured (the rest is not run)."""


def _column_spec(spec: QuantSpec) -> QuantSpec:
    """The spec of one group's columns ``[N, g]``: one scale per row."""
    return spec.with_(granularity="per_channel", axis=0, group_size=None)


#: Fractions of a group's min / max range tried by the clipping search (1.0: plain min-max).
CLIP_GRID = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)


def _group_qparams(wg: torch.Tensor, col: QuantSpec, weight: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """One scale / zero-point per row of a group's columns ``wg`` ``[N, g]``.

    With ``weight`` (the Hessian diagonal of those columns, ``[g]``) the range is clipped to
    the fraction in :data:`CLIP_GRID` that minimizes each row's weighted squared rounding error
    (a few outliers stop setting the step of the whole group); without it, plain min-max.
    """
    lo, hi = compute_range(wg, col, "weight")
    scale, zp = choose_qparams(lo, hi, col)
    if weight is None:
        return scale, zp
    best = None
    for ratio in CLIP_GRID:
        s, z = (scale, zp) if ratio == 1.0 else choose_qparams(lo * ratio, hi * ratio, col)
        err = ((fake_quantize(wg, s, z, col) - wg) ** 2 * weight).sum(1)
        if best is None:
            best, scale, zp = err, s.clone(), z.clone()
            continue
        better = err < best
        best = torch.where(better, err, best)
        scale, zp = torch.where(better, s, scale), torch.where(better, z, zp)
    return scale, zp


def _rtn(w: torch.Tensor, spec: QuantSpec) -> torch.Tensor:
    """Round-to-nearest fake-quantized ``w`` ``[N, Kp]`` (float32, same grid as the modules)."""
    w = w.float()
    scale, zp = choose_qparams(*compute_range(w, spec, "weight"), spec)
    return fake_quantize(w, scale, zp, spec)


def gptq_quantize(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, *,
                  damp: float = 0.01, act_order: bool = False, block_size: int = 128,
                  clip_search: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GPTQ of one ``[N, K]`` weight: ``(dequantized weight, scale, zero_point)``.

    Column by column (lazy updates ``block_size`` columns at a time through the upper Cholesky
    factor of ``H^-1``), each column's rounding error is compensated on the columns not yet
    quantized. Group scales are computed when the first column of their group is reached
    (with ``act_order``: from the original weight, so groups stay contiguous in the file).

    Args:
        weight: float weight ``[N, K]`` with ``K`` a multiple of the group size.
        hessian: ``X^T X`` of the layer's inputs, ``[K, K]`` (any positive factor).
        spec: ``per_channel`` or ``per_group`` weight spec.
        damp: added to the diagonal, as a fraction of its mean.
        act_order: quantize columns in order of decreasing Hessian diagonal.
        block_size: columns per lazy batch update (rounded to whole groups).
        clip_search: choose each group's range by the Hessian-weighted clipping search of
            :func:`_group_qparams` instead of plain min-max.

    Example:
        >>> _ = torch.manual_seed(0); x, w = torch.randn(256, 64), torch.randn(8, 64)
        >>> spec = QuantSpec.int4_weight(group_size=32)
        >>> q, s, z = gptq_quantize(w, x.T @ x, spec)
        >>> tuple(q.shape), tuple(s.shape)
        ((8, 64), (8, 2))
        >>> bool(((x @ (q - w).T) ** 2).sum() < ((x @ (_rtn(w, spec) - w).T) ** 2).sum())
        True
    """
    w = weight.detach().double().clone()
    n, k = w.shape
    h = hessian.detach().double().clone()
    g = spec.group_size if spec.granularity == "per_group" else k
    assert g is not None and k % g == 0, "pad K to a multiple of the group size"
    col = _column_spec(spec)
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    groups = k // g
    scale = torch.ones(n, groups, device=w.device)  # (a CUDA model's layer: all on its GPU)
    zp = torch.zeros(n, groups, dtype=torch.int32, device=w.device)
    if act_order:  # static groups: qparams of the original weight, group by group
        for j in range(groups):
            wg = w[:, j * g:(j + 1) * g].float()
            hd = torch.diag(h)[j * g:(j + 1) * g].float() if clip_search else None
            scale[:, j], zp[:, j] = _group_qparams(wg, col, hd)
        perm = torch.argsort(torch.diag(h), descending=True, stable=True)
    else:
        perm = torch.arange(k, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    hdiag = torch.diag(h).float()  # input energy per column: weights the clipping search
    h.diagonal().add_(damp * float(torch.diag(h).mean()))
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros_like(w)
    s64, z64 = scale.double(), zp.double()  # filled group by group below unless act_order
    qmin, qmax = spec.qmin, spec.qmax
    block = max(g, block_size // g * g) if g <= block_size else g
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        w1, err1 = w[:, i1:i2].clone(), torch.zeros(n, i2 - i1, dtype=torch.float64,
                                                     device=w.device)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c = i1 + i
            j = int(perm[c]) // g
            if not act_order and c % g == 0:  # the group's scale from its updated columns
                wg = w1[:, i:i + g].float()
                hd = hdiag[c:c + g] if clip_search else None
                scale[:, j], zp[:, j] = _group_qparams(wg, col, hd)
                s64[:, j], z64[:, j] = scale[:, j].double(), zp[:, j].double()
            sc, zc, wc = s64[:, j], z64[:, j], w1[:, i]
            qc = (torch.round(wc / sc) + zc).clamp_(qmin, qmax).sub_(zc).mul_(sc)
            e = (wc - qc) / h1[i, i]
            w1[:, i:].addr_(e, h1[i, i:], alpha=-1.0)
            q[:, c], err1[:, i] = qc, e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    q = q[:, torch.argsort(perm)]
    return q.float(), scale, zp


def _output_error(w: torch.Tensor, w_eff: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``sum ||X (w_eff - w)^T||^2`` from ``H = X^T X``: ``tr(D H D^T)``."""
    d = w_eff - w
    return ((d @ h) * d).sum()


def awq_search(weight: torch.Tensor, hessian: torch.Tensor, act_mean: torch.Tensor,
               spec: QuantSpec, *, grid: int = 20) -> tuple[torch.Tensor, float]:
    """AWQ's scale search for one ``[N, K]`` weight: ``(s, best alpha)``.

    For ``alpha`` in ``0, 1/grid, ..., (grid-1)/grid``: ``s = mean|x|^alpha`` (normalized),
    quantize ``W diag(s)`` round-to-nearest and measure the layer output error of
    ``Q(W diag(s)) diag(s)^-1`` on the calibration inputs (through ``H = X^T X``); alpha 0 is
    plain RTN, so the result is never worse than RTN on this objective.

    Example:
        >>> _ = torch.manual_seed(0); x = torch.randn(256, 64) * torch.logspace(-1, 1, 64)
        >>> w, spec = torch.randn(8, 64), QuantSpec.int4_weight(group_size=32)
        >>> s, alpha = awq_search(w, x.T @ x, x.abs().mean(0), spec)
        >>> tuple(s.shape), 0.0 <= alpha < 1.0
        ((64,), True)
    """
    w, h = weight.detach().float(), hessian.detach().float()
    mean = act_mean.detach().float().clamp(min=1e-8)
    best: tuple[float, torch.Tensor, float] | None = None
    for step in range(grid):
        alpha = step / grid
        s = mean.pow(alpha)
        s = s / (s.max() * s.min()).sqrt()
        err = float(_output_error(w, _rtn(w * s, spec) / s, h))
        if best is None or err < best[0]:
            best = (err, s, alpha)
    assert best is not None
    return best[1], best[2]


def set_input_smoothing(module: nn.Module, factor: torch.Tensor) -> None:
    """Make a quantized Linear multiply its input by ``factor`` (per input channel) first.

    Registers the ``input_smoothing`` buffer (saved, loaded and exported with the module) and
    records it in the module's meta so that ``lowbit.load`` rebuilds it.

    Example:
        >>> from lowbit import QuantizationConfig
        >>> from lowbit.modules import convert_module
        >>> q = convert_module(nn.Linear(4, 2), QuantizationConfig.int4_weight_only(32))
        >>> set_input_smoothing(q, torch.ones(4)); q.meta()["extra"]["input_smoothing"]
        4
    """
    n = int(getattr(module, "in_features", -1))
    if factor.shape != (n,):
        raise ValueError(f"{getattr(module, 'name', '') or type(module).__name__}: "
                         f"input_smoothing must have in_features={n} values, got shape "
                         f"{tuple(factor.shape)}")
    module.register_buffer("input_smoothing", factor.detach().float().clone())
    module.meta_extra["input_smoothing"] = n


# ---------------------------------------------------------------------------- streaming stats
class _Stats:
    """Streaming ``X^T X``, mean |x| and max |x| of one layer's input (``K x K`` memory, on the
    layer's device: a CUDA model's calibration batches stay on the GPU)."""

    def __init__(self, k: int, device: torch.device | str = "cpu") -> None:
        self.h = torch.zeros(k, k, dtype=torch.float64, device=device)
        self.abs_sum = torch.zeros(k, dtype=torch.float64, device=device)
        self.abs_max = torch.zeros(k, device=device)
        self.rows = 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.h += (x.T @ x).double()
        self.abs_sum += x.abs().sum(0).double()
        self.abs_max = torch.maximum(self.abs_max, x.abs().amax(0))
        self.rows += x.shape[0]


def _sync_group(process_group: Any, sync: bool) -> Any | None:
    """The ``torch.distributed`` group whose ranks' batches are combined, or None."""
    if not sync:
        return None
    from lowbit.distributed import active_group  # (lowbit.distributed imports calibrators)

    return active_group(process_group)


def _collect(group: Any, what: str, collect: Callable[[], _T]) -> _T:
    """``collect()`` (this rank's statistics), then, in a distributed run, every rank reports
    whether it succeeded before any statistics are exchanged: a rank whose ``collect`` raised
    (an empty shard, NaN inputs) re-raises, the others raise ``DistributedSyncError`` quoting
    it instead of waiting for its sums."""
    if group is None:
        return collect()
    from lowbit.distributed import _run_agreed

    return _run_agreed(collect, group, what)[0]


def _sync_stats(stats: Mapping[str, _Stats], group: Any, what: str, full: bool = True) -> None:
    """Every rank's statistics become those of all ranks' batches: sums (``X^T X``, ``|x|``,
    rows) added, maxima taken, so every rank calibrates the same weights. ``full``: the sums
    too (SmoothQuant needs only the maxima and the rows)."""
    if group is None:
        return
    import torch.distributed as dist

    from lowbit.distributed import _collective, _device

    dev = _device(group)
    for s in stats.values():
        parts = [s.h.reshape(-1), s.abs_sum] if full else []
        sums = torch.cat([*parts, torch.tensor([float(s.rows)], dtype=torch.float64,
                                                device=s.abs_sum.device)]).to(dev)
        peak = s.abs_max.to(dev)
        _collective(group, what, lambda sums=sums: dist.all_reduce(sums, group=group))
        _collective(group, what, lambda peak=peak: dist.all_reduce(
            peak, op=dist.ReduceOp.MAX, group=group))
        k, home = s.abs_sum.numel(), s.abs_sum.device
        if full:
            s.h = sums[:k * k].reshape(k, k).to(home)
            s.abs_sum = sums[k * k:k * k + k].to(home)
        s.rows = int(sums[-1].item())
        s.abs_max = peak.to(home)


def _broadcast_weights(results: Mapping[str, CalibratedWeight], group: Any
                       ) -> dict[str, CalibratedWeight]:
    """Rank 0's calibrated weights (and qparams, factors), on every rank."""
    import torch.distributed as dist

    from lowbit.distributed import _collective, _device

    src, dev = dist.get_global_rank(group, 0), _device(group)

    def bcast(t: torch.Tensor | None) -> torch.Tensor | None:
        if t is None:
            return None
        buf = t.detach().to(dev).contiguous().clone()
        _collective(group, "SignRound weights", lambda: dist.broadcast(buf, src=src,
                                                                         group=group))
        return buf.to(t.device)

    return {name: CalibratedWeight(bcast(cw.weight),
                                   None if cw.qparams is None else tuple(map(bcast, cw.qparams)),
                                   bcast(cw.input_smoothing))
            for name, cw in results.items()}


_EMPTY = ("calibration_data is empty: it yielded no batch (GPTQ, AWQ, SignRound and "
          "SmoothQuant read it once per group of layers: an iterable that yields its batches "
          "only once is empty from the second pass on; pass a list of batches or a DataLoader)")


def _reiterable(data: Any, what: str) -> Iterable[Any]:
    if data is None:
        raise ValueError(f"{what} needs calibration_data (a list of batches or a DataLoader); "
                         "pass calibration_data=..., or use method='rtn' (no data needed)")
    if isinstance(data, torch.Tensor):
        raise ValueError(f"calibration_data is a single tensor of shape {tuple(data.shape)}; "
                         "pass a list of batches, e.g. [x] or list(x.split(32))")
    if iter(data) is data:
        raise ValueError(f"{what} reads calibration_data once per group of layers: pass a list "
                         "of batches or a DataLoader, not a one-pass iterator / generator")
    return data


def _run(model: nn.Module, data: Iterable[Any], hooks: Mapping[str, Callable[..., None]],
         max_batches: int | None) -> int:
    """Run ``data`` through ``model`` with forward-pre ``hooks`` on the named layers."""
    handles = [model.get_submodule(n).register_forward_pre_hook(fn, with_kwargs=True)
               for n, fn in hooks.items()]
    count = 0
    try:
        with torch.no_grad():  # (a cache the model builds in forward stays autograd-usable)
            for batch in data:
                try:
                    run_batch(model, batch)
                except _Stop:
                    pass
                except Exception as exc:
                    note_failed_batch(exc, count, batch)
                    raise
                count += 1
                if max_batches is not None and count >= max_batches:
                    break
    finally:
        for handle in handles:
            handle.remove()
    if count == 0:
        raise ValueError(_EMPTY)
    return count


def _first(args: tuple[Any, ...], kwargs: dict[str, Any]) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _call_order(model: nn.Module, names: list[str], batch: Any
                ) -> tuple[list[list[str]], set[str]]:
    """Groups of layers in execution order (layers fed the same input tensor share a group:
    q / k / v), and the layers called more than once per forward."""
    calls: list[tuple[str, int]] = []

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((name, id(_first(args, kwargs))))
        return fn

    keep: list[torch.Tensor] = []  # keeps inputs alive so that ids are not reused

    def keep_alive(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        keep.append(_first(args, kwargs))

    hooks = {n: hook(n) for n in names}
    handles = [model.get_submodule(n).register_forward_pre_hook(keep_alive, with_kwargs=True)
               for n in names]
    try:
        _run(model, [batch], hooks, None)
    finally:
        for handle in handles:
            handle.remove()
    groups: list[list[str]] = []
    last_id, seen, multi = None, set(), set()
    for name, xid in calls:
        if name in seen:
            multi.add(name)
            continue
        seen.add(name)
        if groups and xid == last_id:
            groups[-1].append(name)
        else:
            groups.append([name])
        last_id = xid
    return groups, multi


def _group_stats(model: nn.Module, group: list[str], multi: bool, data: Iterable[Any],
                 max_batches: int | None) -> dict[str, _Stats]:
    """Input statistics of the layers of one group; each batch stops once they are captured
    (unless a layer runs more than once per forward: ``multi``)."""
    weights = {n: linear_weight(model.get_submodule(n)) for n in group}
    stats = {n: _Stats(w.shape[1], w.device) for n, w in weights.items()}
    pending: set[str] = set()

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first(args, kwargs)
            _check_input(name, x, "weight calibration (GPTQ / AWQ)", finite=False)
            stats[name].update(x)
            pending.discard(name)
            if not pending and not multi:
                raise _Stop  # the rest of the model is not needed for this group
        return fn

    def batches() -> Iterator[Any]:
        for batch in data:
            pending.update(group)
            yield batch

    _run(model, batches(), {n: hook(n) for n in group}, max_batches)
    _check_finite(stats, "weight calibration (GPTQ / AWQ)")
    return stats


def _check_input(name: str, x: Any, what: str, *, finite: bool = True) -> None:
    """Refuse a layer's (or block's) calibration input that is empty, or (``finite``) holds
    NaN / Inf, naming it (an empty batch failed in a bare reduction error; SignRound kept
    round-to-nearest without a word)."""
    if not isinstance(x, torch.Tensor):
        return
    if x.numel() == 0:
        raise ValueError(f"{name}: a calibration batch gave it an empty input (shape "
                         f"{tuple(x.shape)}); {what} needs at least one row: drop empty "
                         "batches from the calibration data")
    if finite and x.is_floating_point() and not bool(torch.isfinite(x).all()):
        raise ValueError(_not_finite(name, what))


def _not_finite(name: str, what: str) -> str:
    return (f"{name}: its inputs in the calibration batches hold NaN/Inf values, which {what} "
            f"cannot use; fix the calibration batches, or keep the layer in float with "
            f"layer_overrides={{{name!r}: None}}")


def _check_finite(stats: Mapping[str, _Stats], what: str) -> None:
    """Refuse statistics of inputs that held NaN / Inf, naming the layer (GPTQ failed in a
    bare Cholesky error, SmoothQuant's factors became NaN)."""
    for name, st in stats.items():
        if not bool(torch.isfinite(st.h).all() & torch.isfinite(st.abs_max).all()):
            raise ValueError(_not_finite(name, what))


def calibrate_weights(model: nn.Module, layers: Mapping[str, tuple[str, QuantSpec,
                                                                     Mapping[str, Any]]],
                      calibration_data: Any, *, progress: bool = True,
                      max_batches: int | None = None, process_group: Any = None,
                      sync: bool = True) -> dict[str, CalibratedWeight]:
    """Calibrate the weights of the named ``nn.Linear`` layers of ``model`` (changed in place).

    Layers run in execution order, each group (layers sharing one input) on the outputs of the
    already calibrated ones: after a layer is done, its float weight is its quantized weight.

    Args:
        model: the float model (a copy: its Linear weights are overwritten).
        layers: ``{name: (method, weight spec, method kwargs)}``; method ``"gptq"`` (kwargs
            ``damp``, ``act_order``, ``block_size``), ``"awq"`` (kwargs ``grid``) or
            ``"signround"`` (kwargs ``iters``, ``lr``; run after the other methods, block by
            block, see :mod:`lowbit.signround`).
        calibration_data: a re-iterable of batches (list, DataLoader), as for static PTQ.
        progress: a tqdm bar over the layers.
        max_batches: use at most this many batches.
        process_group: under ``torch.distributed``, the group whose ranks' batches are
            combined (default: the world), so every rank gets the same weights: GPTQ / AWQ
            statistics are summed over the ranks, SignRound (trained on each rank's batches)
            takes rank 0's result. ``sync=False``: this rank's batches only.

    Returns:
        ``{name: CalibratedWeight}`` for the layers the calibration data reached (the others
        are warned about and left to round-to-nearest).

    Example:
        >>> _ = torch.manual_seed(0)
        >>> m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8))
        >>> spec = QuantSpec.int4_weight(group_size=32)
        >>> out = calibrate_weights(m, {"0": ("gptq", spec, {}), "2": ("awq", spec, {})},
        ...                         [torch.randn(16, 64)], progress=False)
        >>> sorted(out), out["0"].qparams[0].shape, out["2"].input_smoothing.shape
        (['0', '2'], torch.Size([64, 2]), torch.Size([64]))
    """
    data = _reiterable(calibration_data, f"weight calibration ({layers[next(iter(layers))][0]})")
    for name in layers:
        if not is_linear_like(model.get_submodule(name)):
            raise ValueError(f"{name}: weight calibration methods apply to nn.Linear layers "
                             "(and transformers' Conv1D); "
                             f"this is a {type(model.get_submodule(name)).__name__}. Use "
                             f"layer_overrides={{{name!r}: QuantizationConfig.int4_weight_only()}}"
                             " (method='rtn') for it")
    group_ = _sync_group(process_group, sync)

    def call_order() -> tuple[list[list[str]], set[str]]:
        first = next(iter(data), None)
        if first is None:
            raise ValueError(_EMPTY)
        return _call_order(model, list(layers), first)

    groups, multi = _collect(group_, "weight calibration", call_order)
    reached = {n for g in groups for n in g}
    for name in layers:
        if name not in reached:
            warnings.warn(f"{name}: not reached by the calibration batches; quantized "
                          "round-to-nearest. Calibrate with batches that run it",
                          RuntimeWarning, stacklevel=3)
    results: dict[str, CalibratedWeight] = {}
    rounded = [n for g in groups for n in g if layers[n][0] == "signround"]
    bar = tqdm(total=len(reached), desc="weight calibration", unit="layer",
               disable=not progress, leave=False)
    with bar:
        for group in groups:
            group = [n for n in group if n not in rounded]
            if not group:
                continue
            stats = _collect(group_, "weight calibration", lambda group=group: _group_stats(
                model, group, bool(multi.intersection(group)), data, max_batches))
            _sync_stats(stats, group_, "weight calibration")
            for name in group:
                bar.set_postfix_str(name)
                results[name] = _calibrate_layer(model.get_submodule(name), stats[name],
                                                 *layers[name])
                bar.update()
        blocks: dict[str, list[str]] = {}  # execution order of their first layers
        for name in rounded:
            blocks.setdefault(block_of(model, name), []).append(name)
        for block, names in blocks.items():
            bar.set_postfix_str(block)
            done = _signround(model, block, names, layers, bool(multi & set(names)), data,
                              max_batches, progress)
            if group_ is not None:  # rank 0's rounding everywhere (later blocks see it)
                done = _broadcast_weights(done, group_)
                for name, cw in done.items():
                    set_linear_weight(model.get_submodule(name), cw.weight)
            results.update(done)
            bar.update(len(names))
    return results


def _is_cache(value: Any) -> bool:
    """A ``transformers`` key / value cache (``DynamicCache``, ``EncoderDecoderCache``...)."""
    return type(value).__name__.endswith("Cache") and hasattr(value, "get_seq_length")


def _without_cache(kwargs: dict[str, Any]) -> dict[str, Any]:
    """A block's keyword inputs with any key / value cache (``transformers``' ``Cache``
    objects, legacy ``past_key_value`` tuples) removed and ``use_cache`` off: the block runs
    once per iteration and must not append to a cache each time (positional caches, as
    GPT-2 passes them, are dropped by the caller)."""
    out = {}
    for key, value in kwargs.items():
        if key == "use_cache":
            value = False
        elif "past_key_value" in key or key == "layer_past" or _is_cache(value):
            value = None
        out[key] = value
    return out


def _signround(model: nn.Module, block_name: str, names: list[str],
               layers: Mapping[str, tuple[str, QuantSpec, Mapping[str, Any]]], multi: bool,
               data: Iterable[Any], max_batches: int | None, progress: bool
               ) -> dict[str, CalibratedWeight]:
    """SignRound of the layers ``names`` of one block (see :mod:`lowbit.signround`); their
    weights are then overwritten with the quantized ones."""
    block = model.get_submodule(block_name)
    samples: list[tuple[tuple[Any, ...], dict[str, Any]]] = []

    def capture(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        samples.append((tuple(None if _is_cache(a) else a for a in args),
                        _without_cache(kwargs)))
        if not multi:
            raise _Stop

    _run(model, data, {block_name: capture}, max_batches)
    for args, kwargs in samples:
        _check_input(block_name, _first(args, kwargs), "SignRound")
    # inference tensors become normal ones (autograd runs through the block)
    samples = tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, samples)
    prefix = len(block_name) + 1
    rel = {n[prefix:] if n != block_name else "": n for n in names}
    kwargs = dict(layers[names[0]][2])
    out = signround_block(block, {r: layers[n][1] for r, n in rel.items()}, samples,
                          progress=progress, **kwargs)
    results = {}
    for r, name in rel.items():
        w, scale, zp = out[r]
        set_linear_weight(model.get_submodule(name), w)  # later blocks see it quantized
        results[name] = CalibratedWeight(w, (scale, zp))
    return results


def _calibrate_layer(layer: nn.Module, stats: _Stats, method: str, spec: QuantSpec,
                     kwargs: Mapping[str, Any]) -> CalibratedWeight:
    weight = linear_weight(layer).detach().float()  # [out, in]
    k = weight.shape[1]
    eff, kp = _layout(k, spec)
    w = torch.nn.functional.pad(weight, (0, kp - k))
    h = torch.nn.functional.pad(stats.h, (0, kp - k, 0, kp - k))
    if method == "gptq":
        q, scale, zp = gptq_quantize(w, h, eff, **kwargs)
        if eff.granularity != "per_group":
            scale, zp = scale.reshape(-1), zp.reshape(-1)
        result = CalibratedWeight(q[:, :k], (scale, zp))
        effective = q[:, :k]
    elif method == "awq":
        mean = stats.abs_sum / max(stats.rows, 1)
        s, _ = awq_search(w, h, torch.nn.functional.pad(mean, (0, kp - k), value=1.0), eff,
                          **kwargs)
        s = s[:k]
        result = CalibratedWeight(weight * s, None, 1.0 / s)
        effective = _rtn(w * torch.nn.functional.pad(s, (0, kp - k), value=1.0), eff)[:, :k] / s
    else:
        raise ValueError(f"unknown weight calibration method {method!r}; use one of "
                         f"{WEIGHT_METHODS}")
    set_linear_weight(layer, effective)  # later layers see this layer's quantized function
    return result


def smooth_quant(model: nn.Module, alphas: Mapping[str, float], calibration_data: Any, *,
                 progress: bool = True, max_batches: int | None = None,
                 process_group: Any = None, sync: bool = True
                 ) -> dict[str, tuple[torch.Tensor, Any]]:
    """SmoothQuant: per input channel ``s = max|X|^a / max|W|^(1-a)``; ``W <- W diag(s)``.

    Changes the named float ``nn.Linear`` layers in place and registers a forward-pre hook on
    each dividing its input by ``s``, so the model computes the same function (static
    calibration run afterwards sees the smoothed inputs). One pass over the data.

    Under ``torch.distributed`` the maxima are taken over the ranks' batches (``process_group``,
    default the world; ``sync=False``: this rank's only), so every rank gets the same factors.

    Returns:
        ``{name: (1/s, hook handle)}``: remove the hook and give the quantized module the
        factor with :func:`set_input_smoothing`.

    Example:
        >>> _ = torch.manual_seed(0); m = nn.Sequential(nn.Linear(8, 4)); x = torch.randn(4, 8)
        >>> y = m(x); out = smooth_quant(m, {"0": 0.5}, [x], progress=False)
        >>> torch.allclose(m(x), y, atol=1e-5), out["0"][0].shape
        (True, torch.Size([8]))
    """
    data = _reiterable(calibration_data, "smooth_quant")
    weights = {n: model.get_submodule(n).weight for n in alphas}
    stats = {n: _Stats(w.shape[1], w.device) for n, w in weights.items()}

    def hook(name: str) -> Callable[..., None]:
        def fn(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = _first(args, kwargs).detach()
            _check_input(name, x, "SmoothQuant", finite=False)
            stats[name].abs_max = torch.maximum(stats[name].abs_max,
                                                x.reshape(-1, x.shape[-1]).abs().amax(0).float())
            stats[name].rows += 1
        return fn

    def collect() -> None:
        _run(model, tqdm(data, desc="smooth_quant", unit="batch", disable=not progress,
                         leave=False), {n: hook(n) for n in alphas}, max_batches)
        _check_finite(stats, "SmoothQuant")

    group = _sync_group(process_group, sync)
    _collect(group, "SmoothQuant", collect)
    _sync_stats(stats, group, "SmoothQuant", full=False)
    out: dict[str, tuple[torch.Tensor, Any]] = {}
    for name, alpha in alphas.items():
        layer = model.get_submodule(name)
        if not stats[name].rows:
            continue
        w_max = layer.weight.detach().abs().amax(0).float().clamp(min=1e-5)
        s = (stats[name].abs_max.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha))
        s = s.clamp(min=1e-5).to(layer.weight.dtype)
        if not bool(torch.isfinite(s).all()):
            continue
        with torch.no_grad():
            layer.weight.mul_(s)
        inv = 1.0 / s

        def pre(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                inv: torch.Tensor = inv) -> Any:
            if args:  # (fc(x) or, as nn.Linear allows, fc(input=x))
                return (args[0] * inv.to(args[0].dtype), *args[1:]), kwargs
            x = kwargs["input"]
            return args, {**kwargs, "input": x * inv.to(x.dtype)}

        out[name] = (inv, layer.register_forward_pre_hook(pre, with_kwargs=True))
    return out
