"""Measure one quantized model on every backend that runs here, and pick the fastest that
agrees with ``reference``.

Layer backends are timed on one copy of the model switched with ``set_backend`` (the user's
model is never touched), model backends on what their ``prepare`` returns. Each output is
compared in float64 with the ``reference`` output of the same inputs.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from lowbit.backends.registry import _status, available, get_backend, set_backend
from lowbit.evaluation import _call, _check_reference, compare_outputs, measure_latency

__all__ = ["BackendComparison", "BackendResult", "Selection", "compare", "select_best"]


def _one_line(text: str, limit: int) -> str:
    """``text`` as one line for a table cell: terminal colour codes out, whitespace runs as one
    space, at most ``limit`` characters."""
    text = " ".join(re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text).split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


@dataclass(frozen=True)
class BackendResult:
    """One backend's line in :func:`compare`.

    Attributes:
        backend: its name. available: it ran (else ``reason`` says why not).
        p50_ms, p90_ms: latency per call (median, 90th percentile), milliseconds.
        throughput: samples per second at the median (batch size / p50).
        max_abs_dev: largest ``|y - y_reference|``; rel_dev: that over ``max |y_reference|``.
        cosine: cosine similarity with the reference output. exact: the same bits. All three
            over every tensor the model returns (a tuple's, a dict's or ``ModelOutput``'s).
        reason: why it did not run (unavailable, or the error it raised).
    """

    backend: str
    available: bool
    p50_ms: float = math.nan
    p90_ms: float = math.nan
    throughput: float = math.nan
    max_abs_dev: float = math.nan
    rel_dev: float = math.nan
    cosine: float = math.nan
    exact: bool = False
    reason: str = ""


@dataclass
class BackendComparison:
    """What :func:`compare` returns: one :class:`BackendResult` per backend, fastest first."""

    results: list[BackendResult]
    batch_size: int
    threads: int
    machine: str = ""
    notes: list[str] = field(default_factory=list)

    def __iter__(self) -> Any:
        return iter(self.results)

    def __len__(self) -> int:
        return len(self.results)

    def __getitem__(self, name: str) -> BackendResult:
        for r in self.results:
            if r.backend == name:
                return r
        raise KeyError(f"no backend {name!r} in this comparison; have "
                       f"{[r.backend for r in self.results]}")

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible form."""
        return {"batch_size": self.batch_size, "threads": self.threads, "machine": self.machine,
                "results": [asdict(r) for r in self.results], "notes": list(self.notes)}

    def to_markdown(self) -> str:
        """A markdown table: latency p50 / p90, throughput, deviation and cosine vs reference."""
        lines = ["| backend | p50 ms | p90 ms | samples/s | max abs dev | rel dev | cosine | "
                 "same bits |", "|---|---|---|---|---|---|---|---|"]
        for r in self.results:
            if not r.available:
                reason = _one_line(r.reason, 300).replace("|", "\\|")
                lines.append(f"| {r.backend} | - | - | - | - | - | - | not run: {reason} |")
                continue
            lines.append(f"| {r.backend} | {r.p50_ms:.3f} | {r.p90_ms:.3f} | "
                         f"{r.throughput:,.0f} | {r.max_abs_dev:.3g} | {r.rel_dev:.3g} | "
                         f"{r.cosine:.6f} | {'yes' if r.exact else 'no'} |")
        lines.append("")
        lines.append(f"batch {self.batch_size}, {self.threads} threads"
                     + (f", {self.machine}" if self.machine else ""))
        lines.extend(self.notes)
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


@dataclass(frozen=True)
class Selection:
    """What :func:`select_best` returns: the chosen backend and the table it was chosen from."""

    name: str
    table: BackendComparison
    tolerance: float

    def to_markdown(self) -> str:
        """The table and the choice."""
        return (f"{self.table.to_markdown()}\n\nselected: {self.name} (fastest with rel dev <= "
                f"{self.tolerance:g})")


def _leaves(out: Any) -> list[torch.Tensor]:
    """Every tensor in an output, in order: of tuples, lists, dicts and ``ModelOutput``s
    (``None`` and other values, such as a ``(loss, logits)`` pair's missing loss, skipped)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _leaves(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _leaves(v)]
    if hasattr(out, "__array__") and not isinstance(out, (str, bytes)):
        return [torch.as_tensor(out)]
    return []


def _batch_size(inputs: Any) -> int:
    """The leading size of the first input tensor (1 without one, or for a 0-dim one)."""
    first = next(iter(_leaves(inputs)), None)
    return int(first.shape[0]) if first is not None and first.dim() else 1


def _run(model: Any, inputs: Any) -> list[torch.Tensor]:
    with torch.no_grad():
        out = _leaves(_call(model, inputs))
    if not out:
        raise TypeError("compare: the model's output holds no tensor to compare")
    return [t.detach().cpu() for t in out]


def _flat(leaves: list[torch.Tensor]) -> torch.Tensor:
    """All outputs as one float64 vector (deviation and cosine over every output)."""
    return torch.cat([t.detach().double().reshape(-1) for t in leaves])


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y)
                                    for x, y in zip(a, b, strict=True))


def compare(qmodel: nn.Module, example_inputs: Any, backends: Sequence[str] | None = None, *,
            warmup: int = 3, iters: int = 20, threads: int | None = None) -> BackendComparison:
    """Latency, throughput and agreement with ``reference`` of ``qmodel`` on each backend.

    Args:
        qmodel: a model quantized by lowbit (not modified).
        example_inputs: a tensor, a tuple of positional inputs or a dict of keyword inputs.
        backends: names to measure (default: every registered backend; those that cannot run
            here are listed with the reason).
        warmup: untimed calls per backend (a ``torch.compile`` backend compiles in the first).
        iters: timed calls per backend.
        threads: intra-op threads while timing (default: the current setting).

    Returns:
        A :class:`BackendComparison`, available backends fastest first; ``.to_markdown()``.

    Raises:
        ValueError: an unknown backend name.

    Example:
        >>> import torch, lowbit
        >>> qmodel = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(16, 8), nn.ReLU()))
        >>> table = compare(qmodel, torch.randn(4, 16), ["reference", "native", "torch"],
        ...                 warmup=1, iters=3)
        >>> table["native"].exact, table["torch"].exact  # INT8 x INT8: the same bits
        (True, True)
        >>> "| native |" in table.to_markdown()
        True
    """
    names = list(backends) if backends is not None else [s.name for s in available()]
    for name in names:
        get_backend(name)  # unknown names fail before anything runs
    work = copy.deepcopy(qmodel).eval()  # switched between the layer backends
    reference = _run(set_backend(work, "reference"), example_inputs)
    ref_flat = _flat(reference)
    _check_reference(ref_flat, "compare: the reference backend's output on example_inputs")
    ref_max = float(ref_flat.abs().max()) if ref_flat.numel() else 0.0
    results = []
    for name in names:
        backend = get_backend(name)
        status = _status(backend)
        if not status.available:
            results.append(BackendResult(name, False, reason=status.reason))
            continue
        try:
            if backend.scope == "layer":
                model = set_backend(work, name)
            else:
                base = set_backend(copy.deepcopy(qmodel).eval(), "native") \
                    if _status(get_backend("native")).available else copy.deepcopy(qmodel)
                model = set_backend(base, name, example_inputs)
            out = _run(model, example_inputs)
            stats = measure_latency(model, example_inputs, warmup=warmup, iters=iters,
                                    threads=threads)
        except Exception as exc:  # one backend failing must not hide the others
            results.append(BackendResult(name, False, reason=f"failed: {type(exc).__name__}: "
                                                              f"{_one_line(str(exc), 300)}"))
            continue
        if [t.shape for t in out] != [t.shape for t in reference]:
            results.append(BackendResult(name, False, reason="failed: its outputs' shapes "
                                         f"{[tuple(t.shape) for t in out]} differ from the "
                                         "reference's"))
            continue
        err = compare_outputs(ref_flat, _flat(out))
        results.append(BackendResult(
            name, True, stats.median_ms, stats.p90_ms,
            _batch_size(example_inputs) / (stats.median_ms / 1e3), err.max_abs,
            err.max_abs / ref_max if ref_max else err.max_abs, err.cosine,
            _same(out, reference)))
    results.sort(key=lambda r: (not r.available, r.p50_ms if r.available else 0.0))
    return BackendComparison(results, _batch_size(example_inputs),
                             threads or torch.get_num_threads(), _machine())


def _machine() -> str:
    from lowbit.native import selected_isa

    return f"lowbit ISA path {selected_isa()}"


def select_best(qmodel: nn.Module, example_inputs: Any, tolerance: float = 1e-2,
                backends: Sequence[str] | None = None, **kwargs: Any) -> Selection:
    """The fastest backend whose output stays within ``tolerance`` of ``reference``.

    Args:
        qmodel: as :func:`compare`.
        example_inputs: as :func:`compare`.
        backends: as :func:`compare`.
        **kwargs: as :func:`compare`.
        tolerance: largest accepted ``rel_dev`` = ``max|y - y_ref| / max|y_ref|`` (0: only
            backends with the reference's exact bits).

    Returns:
        :class:`Selection` (``.name``, ``.table``); switch with
        ``lowbit.backends.set_backend(qmodel, selection.name, example_inputs)``.

    Raises:
        ValueError: a negative tolerance, or no backend within it.

    Example:
        >>> import torch, lowbit
        >>> qmodel = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(16, 8)))
        >>> best = select_best(qmodel, torch.randn(4, 16), 0.0, ["reference", "native"],
        ...                    warmup=1, iters=3)
        >>> best.name in ("reference", "native")
        True
    """
    if not tolerance >= 0:
        raise ValueError(f"select_best: tolerance={tolerance} must be >= 0 (a relative max "
                         "deviation, e.g. 1e-2)")
    table = compare(qmodel, example_inputs, backends, **kwargs)
    ok = [r for r in table if r.available and (r.exact or r.rel_dev <= tolerance)]
    if not ok:
        raise ValueError(f"select_best: no backend within tolerance={tolerance:g} of reference; "
                         f"raise it or see the table:\n{table.to_markdown()}")
    return Selection(min(ok, key=lambda r: r.p50_ms).backend, table, tolerance)
