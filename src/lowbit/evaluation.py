"""Accuracy, size, latency and output-error helpers shared by the demo, CLI, report and benchmarks.

* :func:`evaluate_accuracy` - top-1 accuracy in percent.
* :func:`model_nbytes` / :func:`quantized_weight_nbytes` - what a model stores.
* :func:`measure_latency` - per-call latency statistics under ``torch.inference_mode``.
* :func:`compare_outputs` - cosine, max abs and relative L2 error of one output vs a reference.
* :func:`compare_models` - all of the above for several models side by side, as a table.

Timings on a shared machine are noisy: only ratios measured side by side in one process mean
anything, which is why :func:`compare_models` interleaves the models' timing rounds.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "ComparisonRow",
    "ComparisonTable",
    "LatencyStats",
    "OutputError",
    "compare_models",
    "compare_outputs",
    "evaluate_accuracy",
    "format_bytes",
    "measure_latency",
    "model_nbytes",
    "quantized_weight_nbytes",
]

_INTEGER_DTYPES = (torch.int8, torch.uint8, torch.qint8, torch.quint8, torch.quint4x2)


def _batches(data: Dataset | Iterable[Any], batch_size: int) -> Iterable[Any]:
    if isinstance(data, Dataset) and hasattr(data, "__len__"):
        return DataLoader(data, batch_size=batch_size, shuffle=False)
    return data


def _call(model: Callable[..., Any], inputs: Any) -> Any:
    if isinstance(inputs, Mapping):
        return model(**inputs)
    if isinstance(inputs, tuple):
        return model(*inputs)
    return model(inputs)


@contextmanager
def _eval_mode(model: Any):
    """``model`` in eval mode inside the block; afterwards every submodule gets its own
    training flag back (``model.train()`` would also switch on those the caller keeps in eval
    mode, such as frozen BatchNorms)."""
    modes = [(m, m.training) for m in model.modules()] if isinstance(model, nn.Module) else []
    if isinstance(model, nn.Module):
        model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def evaluate_accuracy(model: nn.Module, dataset_or_loader: Dataset | Iterable[Any],
                      batch_size: int = 256) -> float:
    """Top-1 accuracy of a classifier, in percent.

    Args:
        model: maps a batch of inputs to logits ``(B, num_classes)``; run in eval mode (its
            training flag is restored afterwards).
        dataset_or_loader: a map-style dataset of ``(input, label)`` pairs (batched here), or any
            iterable of ``(inputs, labels)`` batches such as a ``DataLoader``.
        batch_size: batch size when a dataset is given.

    Returns:
        Accuracy in percent, in ``[0, 100]``.

    Raises:
        ValueError: when the data holds no sample, or labels that are not one class index per
            prediction (a trailing size-1 dimension is accepted).

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.eye(4), torch.tensor([0, 1, 2, 0]))
        >>> evaluate_accuracy(nn.Identity(), data)
        75.0
    """
    correct = total = 0
    with _eval_mode(model), torch.no_grad():  # (not inference_mode: evaluated mid-training,
        # a cache the model builds in forward must stay usable by autograd)
        for inputs, labels in _batches(dataset_or_loader, batch_size):
            logits = _call(model, inputs)
            if logits.dim() == 0 or logits.shape[-1] == 1:  # (argmax of one logit: always 0)
                raise ValueError(
                    f"evaluate_accuracy: the model's output {tuple(logits.shape)} has one value "
                    "per sample, not one logit per class; wrap a binary classifier to return "
                    "two logits, e.g. torch.cat([-z, z], -1), or evaluate it yourself")
            preds = logits.argmax(dim=-1)
            labels = torch.as_tensor(labels, device=preds.device)
            if labels.shape == (*preds.shape, 1):  # a (B, 1) column of class indices: it
                labels = labels.squeeze(-1)  # broadcast against (B,) to B x B "hits"
            if labels.shape != preds.shape:
                raise ValueError(
                    f"evaluate_accuracy: labels of shape {tuple(labels.shape)} do not match "
                    f"the predictions {tuple(preds.shape)} (the argmax over the last dimension "
                    f"of the model's output {tuple(logits.shape)}); give class indices, e.g. "
                    "labels.argmax(-1) for one-hot labels")
            correct += int((preds == labels).sum())
            total += labels.numel()
    if total == 0:
        raise ValueError("evaluate_accuracy: dataset_or_loader yielded no sample")
    return 100.0 * correct / total


def _tensors(obj: Any) -> Iterable[torch.Tensor]:
    """Tensors inside a state-dict value (torch.ao packs quantized weights in tuples)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)


def _unique_state(model: nn.Module) -> list[torch.Tensor]:
    seen: set[tuple[int, int, torch.dtype]] = set()
    out = []
    for value in model.state_dict(keep_vars=True).values():
        for t in _tensors(value):
            # (meta tensors have no storage, data_ptr 0: each counts, as it will once loaded)
            key = ((t.data_ptr(), t.numel(), t.dtype)
                   if not (t.is_quantized or t.is_meta) else (id(t), 0, t.dtype))
            if key not in seen:  # tied weights are stored once
                seen.add(key)
                out.append(t)
    return out


def model_nbytes(model: nn.Module) -> int:
    """Bytes a model stores: its parameters and persistent buffers (its ``state_dict``).

    Tensors shared between layers (tied weights) count once; non-persistent buffers (kernel
    caches rebuilt after loading) do not count. torch.ao quantized modules, whose state holds
    packed quantized tensors, are counted as well.

    Args:
        model: any ``nn.Module``.

    Returns:
        Total ``numel * element_size`` in bytes.

    Example:
        >>> model_nbytes(nn.Linear(10, 4))  # (40 weights + 4 biases) * 4 bytes
        176
        >>> model_nbytes(nn.BatchNorm1d(4))  # 4 params x 2 + running mean/var, counter (int64)
        72
    """
    return sum(t.numel() * t.element_size() for t in _unique_state(model))


def quantized_weight_nbytes(model: nn.Module) -> int:
    """Bytes of the integer tensors a model stores (INT8 codes, packed INT4 bytes).

    Scales, zero-points and float parameters are not included: compare with
    :func:`model_nbytes` to see how much of a model is still float.

    Args:
        model: any ``nn.Module``.

    Returns:
        Bytes of every stored ``int8`` / ``uint8`` (and torch.ao ``qint8`` / ``quint8``) tensor.

    Example:
        >>> m = nn.Module()
        >>> m.register_buffer("weight", torch.zeros(4, 8, dtype=torch.int8))
        >>> quantized_weight_nbytes(m), quantized_weight_nbytes(nn.Linear(8, 4))
        (32, 0)
    """
    return sum(t.numel() * t.element_size() for t in _unique_state(model)
               if t.dtype in _INTEGER_DTYPES)


def markdown_table(head: list[str], body: list[list[str]]) -> str:
    """A markdown table; a ``|`` inside a cell (a layer name may hold one) is escaped.

    Example:
        >>> print(markdown_table(["layer", "bits"], [["a|b", "8"]]))
        | layer | bits |
        |---|---|
        | a\\|b | 8 |
    """
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, head)) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(map(esc, row)) + " |" for row in body]
    return "\n".join(lines)


def format_bytes(n: float) -> str:
    """Human-readable size in binary units.

    Example:
        >>> format_bytes(512), format_bytes(827_688), format_bytes(3 * 2**20)
        ('512 B', '808.3 KiB', '3.00 MiB')
    """
    if n < 1024:
        return f"{int(n)} B"
    if n < 2**20:
        return f"{n / 1024:.1f} KiB"
    return f"{n / 2**20:.2f} MiB"


@dataclass(frozen=True)
class LatencyStats:
    """Latency of one call, in milliseconds, over several timed iterations.

    Attributes:
        median_ms: median time per call (the figure to report).
        p90_ms: 90th percentile.
        min_ms: fastest call (the least disturbed by other processes).
        mean_ms: mean time per call.
        iters: number of timed calls.
        threads: ``torch.get_num_threads()`` while timing.
        samples_ms: every timed call, in order.
    """

    median_ms: float
    p90_ms: float
    min_ms: float
    mean_ms: float
    iters: int
    threads: int
    samples_ms: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_samples(cls, samples_ms: Iterable[float], threads: int) -> LatencyStats:
        """Statistics of a list of per-call times in ms.

        Example:
            >>> LatencyStats.from_samples([3.0, 1.0, 2.0], threads=2).median_ms
            2.0
        """
        s = sorted(samples_ms)
        if not s:
            raise ValueError("LatencyStats.from_samples: no sample")
        p90 = s[min(len(s) - 1, round(0.9 * (len(s) - 1)))]
        return cls(statistics.median(s), p90, s[0], statistics.fmean(s), len(s), threads,
                   tuple(samples_ms))


@contextmanager
def _num_threads(threads: int | None):
    before = torch.get_num_threads()
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads={threads} must be >= 1 (or None to keep "
                             f"torch.get_num_threads()={before})")
        torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def measure_latency(model: Callable[..., Any], example_input: Any, warmup: int = 5,
                    iters: int = 30, threads: int | None = None) -> LatencyStats:
    """Time ``model(example_input)`` call by call under ``torch.inference_mode``.

    Args:
        model: an ``nn.Module`` (put in eval mode, restored after) or any callable, e.g. a
            wrapper around an ONNX Runtime session.
        example_input: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        warmup: untimed calls first (kernel selection, caches, allocator).
        iters: timed calls (>= 1).
        threads: intra-op threads while timing (``torch.set_num_threads``, restored after);
            ``None`` keeps the current setting.

    Returns:
        :class:`LatencyStats`.

    Raises:
        ValueError: when ``iters < 1``, ``warmup < 0`` or ``threads < 1``.

    Example:
        >>> stats = measure_latency(nn.Linear(8, 8), torch.randn(4, 8), warmup=1, iters=5)
        >>> stats.median_ms > 0 and stats.iters == 5
        True
    """
    if iters < 1 or warmup < 0:
        raise ValueError(f"measure_latency: iters={iters} must be >= 1 and warmup={warmup} >= 0")
    samples = []
    with _num_threads(threads) as n, _eval_mode(model), torch.inference_mode():
        for _ in range(warmup):
            _call(model, example_input)
        for _ in range(iters):
            start = time.perf_counter()
            _call(model, example_input)
            samples.append((time.perf_counter() - start) * 1e3)
    return LatencyStats.from_samples(samples, n)


@dataclass(frozen=True)
class OutputError:
    """How far a candidate output is from a reference output.

    Attributes:
        cosine: cosine similarity of the flattened outputs (1.0 = same direction).
        max_abs: largest absolute elementwise difference.
        rel_l2: ``||candidate - reference|| / ||reference||``.
    """

    cosine: float
    max_abs: float
    rel_l2: float


def _check_reference(output: torch.Tensor, what: str) -> None:
    """Refuse a reference output that nothing can be measured against: empty (every candidate
    would score a perfect cosine) or holding NaN / Inf (every score NaN)."""
    if output.numel() == 0:
        raise ValueError(f"{what} is empty (shape {tuple(output.shape)}); pass a batch with at "
                         "least one sample")
    if output.is_floating_point() and not bool(torch.isfinite(output).all()):
        raise ValueError(f"{what} holds NaN/Inf values, so no error can be measured against "
                         "it; pass finite inputs")


def compare_outputs(reference: Any, candidate: Any) -> OutputError:
    """Compare two outputs of the same shape (tensors or numpy arrays), in float64.

    Args:
        reference: the float model's output.
        candidate: the quantized (or otherwise approximated) model's output.

    Returns:
        :class:`OutputError`. Two all-zero outputs have cosine 1.0; rel_l2 is ``inf`` when only
        the reference is zero.

    Raises:
        ValueError: when the shapes differ.

    Example:
        >>> err = compare_outputs(torch.tensor([1.0, 0.0]), torch.tensor([1.0, 0.5]))
        >>> round(err.cosine, 4), err.max_abs, err.rel_l2
        (0.8944, 0.5, 0.5)
    """
    ref = torch.as_tensor(reference).detach().to(torch.float64)
    cand = torch.as_tensor(candidate).detach().to(torch.float64)
    if ref.shape != cand.shape:  # (same count, other layout: element-wise errors would lie)
        raise ValueError(f"compare_outputs: reference has shape {tuple(ref.shape)}, candidate "
                         f"{tuple(cand.shape)}; compare outputs of the same input and layout")
    ref, cand = ref.flatten(), cand.flatten()
    diff = cand - ref
    ref_norm, cand_norm = float(ref.norm()), float(cand.norm())
    if ref_norm == 0.0 and cand_norm == 0.0:
        cosine = 1.0
    elif ref_norm == 0.0 or cand_norm == 0.0:
        cosine = 0.0
    else:
        cosine = float(torch.dot(ref, cand)) / (ref_norm * cand_norm)
    max_abs = float(diff.abs().max()) if diff.numel() else 0.0
    rel = float(diff.norm()) / ref_norm if ref_norm else (0.0 if not max_abs else float("inf"))
    return OutputError(cosine, max_abs, rel)


@dataclass
class ComparisonRow:
    """One model's line in :func:`compare_models`.

    Attributes:
        name: the model's key in the ``models`` dict.
        accuracy: top-1 accuracy in percent (``None`` when no dataset was given).
        accuracy_drop: baseline accuracy minus this one, in percentage points.
        nbytes: :func:`model_nbytes` (``None`` when unknown).
        compression: baseline bytes / these bytes (``None`` when unknown).
        latency: ``{input label: LatencyStats}``.
        speedup: ``{input label: baseline median / this median}``.
        output_error: error of the first latency input's output vs the baseline's.
    """

    name: str
    accuracy: float | None
    accuracy_drop: float | None
    nbytes: int | None
    compression: float | None
    latency: dict[str, LatencyStats] = field(default_factory=dict)
    speedup: dict[str, float] = field(default_factory=dict)
    output_error: OutputError | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (latency samples left out)."""
        out = asdict(self)
        for stats in out["latency"].values():
            stats.pop("samples_ms")
        return out


class ComparisonTable(list):
    """A list of :class:`ComparisonRow` (the first is the baseline) that prints as markdown."""

    def to_markdown(self) -> str:
        """A markdown table: accuracy, drop, size, compression, latency and speedup per input.

        Example:
            >>> row = ComparisonRow("fp32", 98.5, 0.0, 2048, 1.0)
            >>> print(ComparisonTable([row]).to_markdown())
            | model | accuracy | drop | size | compression |
            |---|---|---|---|---|
            | fp32 | 98.50% | +0.00 pp | 2.0 KiB | 1.00x |
        """
        labels = list(self[0].latency) if self else []
        head = ["model", "accuracy", "drop", "size", "compression"]
        for label in labels:
            head += [f"latency {label}", f"speedup {label}"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in self:
            cells = [r.name,
                     "n/a" if r.accuracy is None else f"{r.accuracy:.2f}%",
                     "n/a" if r.accuracy_drop is None else f"{r.accuracy_drop:+.2f} pp",
                     "n/a" if r.nbytes is None else format_bytes(r.nbytes),
                     "n/a" if r.compression is None else f"{r.compression:.2f}x"]
            for label in labels:
                stats = r.latency.get(label)
                cells += ["n/a", "n/a"] if stats is None else [
                    f"{stats.median_ms:.3f} ms", f"{r.speedup[label]:.2f}x"]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def to_dict(self) -> list[dict[str, Any]]:
        """JSON-compatible list of rows."""
        return [r.to_dict() for r in self]


def compare_models(models: Mapping[str, nn.Module], dataset: Dataset | Iterable[Any] | None,
                   example_inputs: Mapping[str, Any] | None = None, *, warmup: int = 3,
                   iters: int = 20, rounds: int = 3, threads: int | None = None,
                   batch_size: int = 256, sizes: Mapping[str, int] | None = None
                   ) -> ComparisonTable:
    """Accuracy, size, latency and output error of several models, against the first one.

    Timing is interleaved: each of ``rounds`` rounds times every model ``iters // rounds`` times
    per input, so a burst of load on a shared machine hits all models alike.

    Args:
        models: ``{name: model}``; the first entry is the baseline (usually the FP32 model).
            A model may be any callable (e.g. a cast wrapper or an ONNX Runtime session
            wrapper); give the size of those that are not ``nn.Module`` in ``sizes``.
        dataset: evaluation data for :func:`evaluate_accuracy`, or ``None`` to skip accuracy.
        example_inputs: ``{label: input}`` to time, e.g. ``{"b1": x[:1], "b64": x[:64]}``.
        warmup: untimed calls per model and input before the timed rounds.
        iters: timed calls per model and input, over all rounds.
        rounds: number of interleaved timing rounds.
        threads: intra-op threads while timing (``None`` keeps the current setting).
        batch_size: evaluation batch size.
        sizes: ``{name: bytes}`` overriding :func:`model_nbytes` (needed for non-modules).

    Returns:
        A :class:`ComparisonTable` (a list of :class:`ComparisonRow`) with ``to_markdown()``.

    Raises:
        ValueError: when ``models`` is empty.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> import copy
        >>> fp32 = nn.Linear(8, 4)
        >>> bf16 = copy.deepcopy(fp32).to(torch.bfloat16)
        >>> models = {"fp32": fp32, "bf16": lambda x: bf16(x.to(torch.bfloat16)).float()}
        >>> data = TensorDataset(torch.randn(16, 8), torch.randint(0, 4, (16,)))
        >>> table = compare_models(models, data, {"b1": torch.randn(1, 8)}, iters=2, rounds=1,
        ...                        sizes={"bf16": model_nbytes(bf16)})
        >>> table[1].compression, table[1].output_error.cosine > 0.99
        (2.0, True)
    """
    if not models:
        raise ValueError("compare_models: models is empty; pass {'fp32': model, ...}")
    example_inputs = dict(example_inputs or {})
    names = list(models)
    base = names[0]
    per_round = max(1, iters // max(1, rounds))
    samples: dict[tuple[str, str], list[float]] = {(n, k): [] for n in names
                                                    for k in example_inputs}
    outputs: dict[str, Any] = {}
    with _num_threads(threads) as n_threads:
        for name in names:
            for x in example_inputs.values():
                measure_latency(models[name], x, warmup=warmup, iters=1)
        for _ in range(max(1, rounds)):
            for name in names:
                for label, x in example_inputs.items():
                    stats = measure_latency(models[name], x, warmup=0, iters=per_round)
                    samples[(name, label)].extend(stats.samples_ms)
        if example_inputs:
            first = next(iter(example_inputs.values()))
            with torch.no_grad():
                for name in names:
                    with _eval_mode(models[name]):
                        outputs[name] = _as_output_tensor(_call(models[name], first))
    accuracy = {n: (None if dataset is None else evaluate_accuracy(models[n], dataset, batch_size))
                for n in names}
    sizes = dict(sizes or {})
    nbytes = {n: sizes[n] if n in sizes else (model_nbytes(models[n])
                                              if isinstance(models[n], nn.Module) else None)
              for n in names}
    table = ComparisonTable()
    for name in names:
        latency = {k: LatencyStats.from_samples(samples[(name, k)], n_threads)
                   for k in example_inputs}
        acc, base_acc = accuracy[name], accuracy[base]
        table.append(ComparisonRow(
            name=name, accuracy=acc,
            accuracy_drop=None if acc is None or base_acc is None else base_acc - acc,
            nbytes=nbytes[name],
            compression=(None if nbytes[name] is None or nbytes[base] is None
                         else nbytes[base] / max(1, nbytes[name])),
            latency=latency,
            speedup={k: statistics.median(samples[(base, k)]) / latency[k].median_ms
                     for k in example_inputs},
            output_error=(None if outputs.get(name) is None or outputs.get(base) is None
                          else compare_outputs(outputs[base], outputs[name])),
        ))
    return table


def _as_output_tensor(out: Any) -> torch.Tensor | None:
    """The tensor to compare in a model output (first item of a tuple; numpy arrays too)."""
    if isinstance(out, (tuple, list)) and out:
        return _as_output_tensor(out[0])
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "__array__"):
        return torch.as_tensor(out)
    return None
