"""Scaling out on ``torch.distributed``: sharded calibration and QAT ranges every rank agrees on.

Sharded calibration: each rank calibrates on its own shard, then :func:`sync_calibrators`
gathers every calibrator's state (its state dict, bit for bit) from every rank and folds the
states together with :meth:`~lowbit.calibrators.Calibrator.merge` in rank order. Every rank ends
with the same state: the one a single process reaches on the union of the shards (bit-identical
for min-max and the histogram calibrators; a moving average becomes the batch-weighted mean of
the ranks' averages). :class:`~lowbit.ptq.PTQQuantizer`, ``quantize_static`` and the
sensitivity analysis do this by themselves when ``torch.distributed`` is initialized
(``process_group=`` picks the group, ``sync=False`` opts out).

QAT: the activation quantizers of a model from ``QATPreparer`` all-reduce each batch's min/max
before updating their range (``QATConfig.sync_every=1``, the default), which is exactly what one
process sees on the global batch; with ``sync_every=n`` they observe locally and combine their
ranges (and the folded BatchNorms their running statistics) every n-th step.

Failures: a rank whose calibration raises still enters the sync and sends its error, so the
others raise :class:`DistributedSyncError` naming the rank and the error instead of waiting; a
rank that dies or hangs makes the collectives fail after the process group's ``timeout``.
See ``docs/distributed.md`` for ``torchrun`` commands, DDP, FSDP2 and NCCL.
"""

from __future__ import annotations

import inspect
import logging
import zlib
from collections.abc import Callable, Iterable, Mapping
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from lowbit.calibrators import (
    Calibrator,
    MinMaxCalibrator,
    MovingAverageCalibrator,
    create_calibrator,
)

__all__ = [
    "DistributedSyncError",
    "active_group",
    "calibrate_synced",
    "configure_qat_sync",
    "on_rank0",
    "sync_calibrators",
    "sync_qat_state",
    "unwrap",
]

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_MSG_BYTES = 1024  # error text sent to the other ranks (UTF-8, truncated)
_MAX_DIMS = 8  # calibrator state tensors have at most this many dimensions


class DistributedSyncError(RuntimeError):
    """Another rank failed (its error is in the message) or did not reach a sync point."""


class _GroupRef:
    """Holds a process group on a module: a deep copy of the model shares it (process groups
    cannot be copied), and ``None`` means the default group."""

    __slots__ = ("group",)

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict[int, Any]) -> _GroupRef:
        return self


def active_group(process_group: Any = None) -> Any | None:
    """The group to synchronize over, or ``None`` when there is nothing to do.

    ``None`` when ``torch.distributed`` is unavailable or not initialized, or when the group
    (default: the world) has a single rank or does not contain this rank.

    Example:
        >>> active_group() is None  # a plain process: nothing to synchronize
        True
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    group = dist.group.WORLD if process_group is None else process_group
    if dist.get_world_size(group) <= 1 or dist.get_rank(group) < 0:
        return None
    return group


def _device(group: Any) -> torch.device:
    """Where this group's collectives take their tensors: CUDA for NCCL, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _where(group: Any) -> str:
    return f"rank {dist.get_rank(group)} of {dist.get_world_size(group)}"


def _collective(group: Any, what: str, fn: Callable[[], _T]) -> _T:
    """Run a collective; a timeout or a lost peer becomes a DistributedSyncError."""
    try:
        return fn()
    except DistributedSyncError:
        raise
    except RuntimeError as exc:
        raise DistributedSyncError(
            f"lowbit {what} ({_where(group)}): the other ranks did not answer ({exc}). A rank "
            "failed, was killed or hangs; every rank must run the same call with the same "
            "model and config (the wait is bounded by init_process_group(timeout=...))"
        ) from exc


def _group_timeout(group: Any) -> timedelta | None:
    """The timeout the group was created with (``monitored_barrier`` would wait 30 minutes by
    default, not that), or None where torch does not expose it."""
    try:
        return group._get_backend(torch.device("cpu")).options._timeout
    except (AttributeError, RuntimeError):
        return None


def _all_gather(t: torch.Tensor, group: Any, what: str) -> list[torch.Tensor]:
    out = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    _collective(group, what, lambda: dist.all_gather(out, t, group=group))
    return out


def _agree(error: BaseException | None, group: Any, what: str, count: int = 0,
           timeout: float | None = None) -> int:
    """Every rank reports success (with ``count``) or its error; returns the sum of the counts.

    Raises:
        DistributedSyncError: on a healthy rank when another rank reported an error (the
            message names the rank and the error), or when a rank does not arrive in time.
    """
    if dist.get_backend(group) == "gloo":  # names the ranks that never arrive (on rank 0)
        wait = _group_timeout(group) if timeout is None else timedelta(seconds=timeout)
        if wait is not None:
            _collective(group, what, lambda: dist.monitored_barrier(
                group, timeout=wait, wait_all_ranks=True))
    msg = b"" if error is None else f"{type(error).__name__}: {error}".encode()[:_MSG_BYTES]
    status = torch.zeros(9 + _MSG_BYTES, dtype=torch.uint8)
    status[0] = error is not None
    status[1:9] = torch.tensor([count], dtype=torch.int64).view(torch.uint8)
    status[9:9 + len(msg)] = torch.frombuffer(bytearray(msg), dtype=torch.uint8) if msg else 0
    parts = _all_gather(status.to(_device(group)), group, what)
    parts = [p.cpu() for p in parts]
    failed = [(r, bytes(p[9:].tolist()).rstrip(b"\0").decode(errors="replace"))
              for r, p in enumerate(parts) if int(p[0])]
    if failed and error is None:
        ranks = ", ".join(f"rank {r}: {m}" for r, m in failed)
        raise DistributedSyncError(f"lowbit {what} stopped on {_where(group)} because another "
                                   f"rank failed ({ranks}); fix that rank's error and rerun "
                                   "every rank")
    return sum(int(p[1:9].clone().view(torch.int64)) for p in parts)


def _run_agreed(run: Callable[[], _T], group: Any, what: str,
                count: Callable[[_T], int] = lambda _: 0,
                timeout: float | None = None) -> tuple[_T, int]:
    """``run()`` on this rank, then every rank reports its success (with ``count`` of the
    result) or its error before anything else is exchanged (:func:`_agree`): a rank whose
    ``run`` raised re-raises, the others raise :class:`DistributedSyncError` naming it instead
    of waiting for it. Returns ``run()``'s result and the counts summed over the ranks."""
    try:
        out = run()
    except BaseException as exc:
        _agree(exc, group, what, timeout=timeout)
        raise
    return out, _agree(None, group, what, count(out), timeout=timeout)


# ---------------------------------------------------------------------- calibration
def _options(cal: Calibrator) -> str:
    """A calibrator's settings: the constructor arguments it keeps under their own names
    (``percentile``, ``bins``, ``averaging_constant``, a custom calibrator's own), as plain
    values; ranks that differ there would merge into qparams no single process computes.
    (What changes with the data, such as a counter, is not a setting: left out.)"""
    plain = (bool, int, float, str, tuple, type(None))
    try:
        params = inspect.signature(type(cal).__init__).parameters
    except (TypeError, ValueError):
        return ""
    skip = {"self", "spec", "tensor_name"}
    return repr(sorted((k, v) for k in params if k not in skip
                       and isinstance(v := getattr(cal, k, None), plain)))


def _fingerprint(names: list[str], states: list[dict[str, torch.Tensor]],
                 cals: list[Calibrator]) -> int:
    text = "|".join(f"{n}:{type(c).__qualname__}:{c.spec}:{_options(c)}:"
                    + ",".join(f"{k}/{v.dtype}/{v.dim()}" for k, v in s.items())
                    for n, s, c in zip(names, states, cals, strict=True))
    return zlib.crc32(text.encode())


def _gather_states(names: list[str], cals: list[Calibrator], group: Any,
                   error: BaseException | None = None) -> list[list[dict[str, torch.Tensor]]]:
    """``[rank][calibrator] -> state dict`` of every rank, exchanged as raw bytes (exact).
    ``error``: this rank could not fill its calibrators (its batch held NaN): every rank stops,
    that one with ``error``, the others naming it."""
    what = "calibration sync"
    states = [{k: v.detach() for k, v in c.state_dict().items()} for c in cals]
    entries = [(i, k, v) for i, s in enumerate(states) for k, v in s.items()]
    if any(v.dim() > _MAX_DIMS for _, _, v in entries):
        raise ValueError(f"sync_calibrators: calibrator state tensors may have at most "
                         f"{_MAX_DIMS} dimensions")
    payload = [v.contiguous().cpu().reshape(-1).view(torch.uint8) for _, _, v in entries]
    nbytes = sum(p.numel() for p in payload)
    dev = _device(group)
    head = torch.tensor([_fingerprint(names, states, cals), len(entries), nbytes,
                         error is not None], device=dev)
    heads = [h.cpu() for h in _all_gather(head, group, what)]
    failed = [r for r, h in enumerate(heads) if int(h[3])]
    if error is not None:
        raise error
    if failed:
        raise ValueError(f"{', '.join(names)}: rank {failed[0]} could not observe its batch "
                         f"(see its error, e.g. NaN/Inf values); every rank stops at this step")
    if len({int(h[0]) for h in heads}) > 1:
        raise ValueError(f"sync_calibrators ({_where(group)}): the ranks hold different "
                         "calibrators (layer names, classes, specs or options such as bins or "
                         "percentile differ, or a rank has none); every rank must quantize the "
                         "same model with the same config")
    shapes = torch.zeros(len(entries), _MAX_DIMS + 1, dtype=torch.int64)
    for j, (_, _, v) in enumerate(entries):
        shapes[j, 0] = v.dim()
        shapes[j, 1:1 + v.dim()] = torch.tensor(v.shape, dtype=torch.int64)
    all_shapes = [s.cpu() for s in _all_gather(shapes.to(dev), group, what)]
    width = max(int(h[2]) for h in heads)
    flat = torch.zeros(width, dtype=torch.uint8)
    if payload:
        flat[:nbytes] = torch.cat(payload)
    all_flat = [f.cpu() for f in _all_gather(flat.to(dev), group, what)]
    out: list[list[dict[str, torch.Tensor]]] = []
    for rank_flat, rank_shapes in zip(all_flat, all_shapes, strict=True):
        per_cal: list[dict[str, torch.Tensor]] = [{} for _ in cals]
        offset = 0
        for j, (i, key, local) in enumerate(entries):
            shape = rank_shapes[j, 1:1 + int(rank_shapes[j, 0])].tolist()
            n = local.element_size() * int(torch.tensor(shape, dtype=torch.int64).prod())
            raw = rank_flat[offset:offset + n].clone()  # own storage: aligned for the view
            per_cal[i][key] = raw.view(local.dtype).reshape(shape)
            offset += n
        out.append(per_cal)
    return out


def sync_calibrators(calibrators: Mapping[str, Calibrator], process_group: Any = None) -> None:
    """Merge the calibrators of every rank into each rank's calibrators, in place.

    Every rank must call this with calibrators of the same names, classes, specs and options (the
    same model and config). Each calibrator's state dict is gathered from every rank, bit for
    bit, and merged in rank order with :meth:`Calibrator.merge`, so all ranks end with the same
    state, equal to a single process calibrating on the union of the shards (exactly for
    min-max and the histogram calibrators; the moving average is the batch-count-weighted mean
    of the ranks' averages). A no-op when :func:`active_group` is ``None``.

    Args:
        calibrators: ``{name: Calibrator}`` (e.g. ``PTQQuantizer.calibrators``).
        process_group: the group to merge over (default: the world).

    Raises:
        ValueError: when the ranks hold different calibrators.
        DistributedSyncError: when another rank does not take part (timeout, lost peer).

    Example:
        >>> cal = create_calibrator("minmax")
        >>> _ = cal(torch.tensor([-1.0, 2.0]))
        >>> sync_calibrators({"fc": cal})  # one process: nothing to merge
        >>> [v.item() for v in cal.compute_range()]
        [-1.0, 2.0]
    """
    group = active_group(process_group)
    if group is None:
        return
    _merge_over(calibrators, group)


def _merge_over(calibrators: Mapping[str, Calibrator], group: Any,
                error: BaseException | None = None) -> None:
    """:func:`sync_calibrators` over ``group``; ``error``: see :func:`_gather_states`."""
    names = sorted(calibrators)  # (none on this rank: it still takes part, so that the
    cals = [calibrators[n] for n in names]  # others learn it holds different calibrators)
    gathered = _gather_states(names, cals, group, error)
    for i, cal in enumerate(cals):
        merged = create_calibrator(cal)
        for rank_states in gathered:
            part = create_calibrator(cal)
            part.load_state_dict(rank_states[i])
            merged.merge(part)
        with torch.inference_mode():  # buffers made under inference mode take it in place
            cal.load_state_dict(merged.state_dict())
    log.info("lowbit: merged %d calibrators over %d ranks", len(cals),
             dist.get_world_size(group))


def calibrate_synced(run: Callable[[], int], calibrators: Mapping[str, Calibrator],
                     process_group: Any = None, *, sync: bool = True,
                     timeout: float | None = None) -> int:
    """Run ``run()`` (local calibration, returns its batch count), then merge across ranks.

    Without an :func:`active_group` (or with ``sync=False``) this is just ``run()``. Otherwise
    every rank reports whether its calibration succeeded before any state is exchanged: a rank
    whose ``run()`` raises re-raises its own error, and every other rank raises
    :class:`DistributedSyncError` naming it, instead of waiting for it.

    Args:
        run: the local calibration; returns the number of batches it ran.
        calibrators: the calibrators ``run`` fills.
        process_group: the group (default: the world).
        sync: ``False`` calibrates locally only.
        timeout: seconds to wait for the slowest rank at the sync point (gloo; default: the
            process group's timeout).

    Returns:
        The number of batches, summed over the ranks.

    Example:
        >>> cal = create_calibrator("minmax")
        >>> calibrate_synced(lambda: (cal(torch.ones(2)), 1)[1], {"x": cal})
        1
    """
    group = active_group(process_group) if sync else None
    if group is None:
        return run()
    _, total = _run_agreed(run, group, "calibration", lambda count: count, timeout)
    sync_calibrators(calibrators, group)
    return total


# ---------------------------------------------------------------------- QAT
def _qat_layers(model: nn.Module) -> Iterable[nn.Module]:
    from lowbit.qat import QATLayer

    return (m for m in model.modules() if isinstance(m, QATLayer))


def configure_qat_sync(model: nn.Module, every: int = 1, process_group: Any = None) -> int:
    """Make the QAT layers of ``model`` keep their ranges identical across ranks.

    ``every=1``: each static activation quantizer all-reduces its batch's min/max before
    updating (ranks never differ; equal to one process on the global batch), and folded
    BatchNorms average their running statistics after each training step. ``every=n``: ranges
    are observed locally and combined every n-th training step (min-max: union; moving average:
    mean over ranks), BatchNorm statistics likewise. The first observation is always
    synchronized (learnable scales start equal). ``every=0`` turns synchronization off. Weights
    need none: DDP and FSDP keep them identical. Nothing happens outside a distributed run.

    Returns:
        The number of activation quantizers configured.

    Raises:
        ValueError: on a negative ``every``, or ``every > 1`` with an activation observer other
            than min-max or moving average (use ``every=1`` for histogram observers).

    Example:
        >>> from lowbit.qat import prepare_qat
        >>> qat = prepare_qat(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)))
        >>> configure_qat_sync(qat, every=10)
        2
    """
    if not isinstance(every, int) or isinstance(every, bool) or every < 0:
        raise ValueError(f"configure_qat_sync: every={every!r} must be an int >= 0 (1: every "
                         "step, n: every n-th step, 0: never)")
    ref = _GroupRef(process_group)
    count = 0
    for layer in _qat_layers(model):
        layer.sync_every, layer.sync_group = every, ref
        fq = layer.input_quantizer
        if fq is None or fq.dynamic:
            continue
        if every > 1 and type(fq.observer) not in (MinMaxCalibrator, MovingAverageCalibrator):
            raise ValueError(f"{fq.name}: sync_every={every} combines ranges every n steps, which "
                             f"needs a minmax or moving_average observer, not "
                             f"{type(fq.observer).__name__}; use sync_every=1")
        fq.sync_every, fq.sync_group = every, ref
        count += 1
    return count


def qat_group(module: nn.Module) -> Any | None:
    """The active group of a module configured by :func:`configure_qat_sync`, else None."""
    ref = getattr(module, "sync_group", None)
    if not getattr(module, "sync_every", 0) or ref is None:
        return None
    return active_group(ref.group)


def all_reduce_range(lo: torch.Tensor, hi: torch.Tensor, group: Any, name: str
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The min / max over all ranks of this batch's ``(lo, hi)``, in one collective.

    Raises:
        ValueError: on every rank, when any rank's batch holds NaN/Inf (the rank is named).
    """
    bad = not bool(torch.isfinite(lo).all() & torch.isfinite(hi).all())
    me = dist.get_rank(group)
    flag = torch.tensor([float(me + 1) if bad else 0.0])
    buf = torch.cat([torch.nan_to_num(-lo.detach().float()).reshape(-1),
                     torch.nan_to_num(hi.detach().float()).reshape(-1), flag])
    buf = buf.to(_device(group))
    _collective(group, f"QAT range sync of {name}",
                lambda: dist.all_reduce(buf, op=dist.ReduceOp.MAX, group=group))
    buf = buf.to(lo.device)
    if float(buf[-1]) > 0:
        raise ValueError(f"{name}: the batch of rank {int(buf[-1]) - 1} holds NaN/Inf values; "
                         "every rank stops at this step (fix that rank's input)")
    n = lo.numel()
    return (-buf[:n]).reshape(lo.shape).to(lo.dtype), buf[n:2 * n].reshape(hi.shape).to(hi.dtype)


def observe_merged(obs: Calibrator, x: torch.Tensor, reset: bool, group: Any) -> None:
    """Generic observers with ``sync_every=1``: observe ``x`` in a fresh calibrator, merge the
    ranks' fresh calibrators (the global batch), then fold that into ``obs``."""
    delta = create_calibrator(obs)
    try:
        delta.update(x)
        error = None
    except (ValueError, RuntimeError) as exc:  # (NaN / Inf): the other ranks must not wait
        error = exc
    _merge_over({obs.tensor_name: delta}, group, error)
    if reset:
        obs.reset()
    obs.merge(delta)


@torch.no_grad()
def sync_fake_quantize(fq: nn.Module, group: Any) -> None:
    """Combine a min-max / moving-average observer's range over the ranks (union / mean) and
    refresh the quantizer's qparams (unless its scale is learned)."""
    obs = fq.observer
    dev = obs.min_val.device
    n = obs.min_val.numel()
    if isinstance(obs, MovingAverageCalibrator):
        buf = torch.cat([obs.min_val.reshape(-1), obs.max_val.reshape(-1)]).to(_device(group))
        _collective(group, f"QAT range sync of {fq.name}",
                    lambda: dist.all_reduce(buf, group=group))
        buf = buf.to(dev) / dist.get_world_size(group)
        lo, hi = buf[:n], buf[n:]
    else:
        lo, hi = all_reduce_range(obs.min_val, obs.max_val, group, fq.name)
    obs.min_val = lo.reshape(obs.min_val.shape).to(obs.min_val.dtype)
    obs.max_val = hi.reshape(obs.max_val.shape).to(obs.max_val.dtype)
    if not fq.learnable_scale:
        fq._set_qparams(*obs.compute_qparams(fq.spec))


@torch.no_grad()
def sync_batchnorm(bn: nn.Module, group: Any) -> None:
    """Average a BatchNorm's running mean and variance over the ranks (in place)."""
    if bn.running_mean is None:
        return
    n = bn.running_mean.numel()
    buf = torch.cat([bn.running_mean, bn.running_var]).to(_device(group))
    _collective(group, "QAT BatchNorm sync", lambda: dist.all_reduce(buf, group=group))
    buf = buf.to(bn.running_mean.device) / dist.get_world_size(group)
    # through .data: autograd saved the running statistics for batch_norm's backward (which
    # does not read them in training); an in-place write would fail its version check
    bn.running_mean.data.copy_(buf[:n])
    bn.running_var.data.copy_(buf[n:])


def sync_qat_state(model: nn.Module, process_group: Any = None) -> None:
    """Make every rank's QAT ranges and folded BatchNorm statistics identical, once.

    Not needed with ``sync_every=1`` (the default keeps them identical at every step); call it
    before converting or saving when training ran with ``sync_every=n`` and the last step was
    not a sync step, or with ``sync_every=0``. Min-max ranges are united, moving averages
    averaged, other observers take rank 0's state; running statistics are averaged.

    Example:
        >>> from lowbit.qat import prepare_qat
        >>> qat = prepare_qat(nn.Sequential(nn.Linear(4, 4)))
        >>> sync_qat_state(qat)  # one process: nothing to do
    """
    group = active_group(process_group)
    if group is None:
        return
    for layer in _qat_layers(unwrap(model)):
        fq = layer.input_quantizer
        if fq is not None and not fq.dynamic and bool(fq.initialized):
            if type(fq.observer) in (MinMaxCalibrator, MovingAverageCalibrator):
                sync_fake_quantize(fq, group)
            else:
                for t in [*fq.observer.buffers(), *fq.buffers(recurse=False)]:
                    _collective(group, "QAT state sync", lambda t=t: dist.broadcast(
                        t, src=dist.get_global_rank(group, 0), group=group))
        if layer.bn is not None:
            sync_batchnorm(layer.bn, group)


# ---------------------------------------------------------------------- checkpoints
def unwrap(model: nn.Module) -> nn.Module:
    """The user's model inside a ``DistributedDataParallel`` wrapper (else ``model`` itself).

    Example:
        >>> m = nn.Linear(2, 2)
        >>> unwrap(m) is m
        True
    """
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def on_rank0(fn: Callable[..., _T], *args: Any, process_group: Any = None,
             **kwargs: Any) -> _T | None:
    """Run ``fn(*args, **kwargs)`` on rank 0 of the group only, then wait on every rank.

    For writing files once: ``on_rank0(lowbit.save, qmodel, "out/")``. The other ranks return
    after rank 0 finished, so they can read what it wrote; if ``fn`` raises on rank 0, the
    others raise :class:`DistributedSyncError` with its message (they do not hang). Outside a
    distributed run, ``fn`` simply runs.

    Returns:
        ``fn``'s result on rank 0, ``None`` on the others.

    Example:
        >>> on_rank0(sum, [1, 2, 3])
        6
    """
    group = active_group(process_group)
    if group is None:
        return fn(*args, **kwargs)
    rank0 = dist.get_rank(group) == 0
    return _run_agreed(lambda: fn(*args, **kwargs) if rank0 else None, group,
                       f"{getattr(fn, '__name__', 'call')} on rank 0")[0]
