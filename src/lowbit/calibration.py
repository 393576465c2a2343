"""The calibration process: stream batches through a model and record each layer's input range.

Calibrators are attached with local forward-pre-hooks that are removed in ``finally``, so a
failing batch never leaves hooks behind. Batches are streamed (a one-pass generator works) and
each calibrator keeps constant-size state, so memory stays flat however many batches run.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from lowbit.calibrators import Calibrator

__all__ = ["CalibrationRecord", "run_batch", "run_calibration"]


@dataclass
class CalibrationRecord:
    """What calibration saw at one layer's input.

    Attributes:
        calibrator: registry name of the calibrator used.
        min: observed minimum (float32 scalar as Python float).
        max: observed maximum.
        range: the clipping range the calibrator chose ``(lo, hi)``.
        scale: the resulting activation scale.
        zero_point: the resulting activation zero-point.
        num_batches: how many batches reached the layer.
        last_change: relative movement of the range in the last update (convergence).
    """

    calibrator: str
    min: float
    max: float
    range: tuple[float, float]
    scale: float
    zero_point: int
    num_batches: int
    last_change: float


def describe_batch(batch: Any) -> str:
    """A short description of a calibration batch, for error messages.

    Example:
        >>> describe_batch((torch.zeros(4, 7), torch.zeros(4)))
        'a tuple of 2 (the model gets its first item: a float32 tensor of shape (4, 7))'
    """
    if isinstance(batch, torch.Tensor):
        return f"a {str(batch.dtype)[6:]} tensor of shape {tuple(batch.shape)}"
    if isinstance(batch, Mapping):
        return f"a dict of keyword inputs {sorted(map(str, batch))}"
    if isinstance(batch, (tuple, list)) and batch:
        return (f"a {type(batch).__name__} of {len(batch)} (the model gets its first item: "
                f"{describe_batch(batch[0])})")
    return f"a {type(batch).__name__}"


def note_failed_batch(exc: BaseException, index: int, batch: Any) -> None:
    """Add to ``exc`` (shown under its traceback, Python 3.11+) which calibration batch the
    model failed on and what lowbit passed it: the error itself comes from the user's model.

    Example:
        >>> e = RuntimeError("mat1 and mat2 shapes cannot be multiplied")
        >>> note_failed_batch(e, 0, torch.zeros(4, 7))
        >>> [note[:52] for note in e.__notes__]  # (Python 3.11+)
        ['lowbit: the model raised this on calibration batch 0']
    """
    if hasattr(exc, "add_note"):
        exc.add_note(f"lowbit: the model raised this on calibration batch {index}, "
                     f"{describe_batch(batch)}; calibration batches must be inputs the float "
                     "model accepts (a tensor, an (input, target) tuple, or a dict of keyword "
                     "inputs)")


def run_batch(model: nn.Module, batch: Any) -> Any:
    """Call ``model`` on one calibration batch.

    A tensor is passed as is, a tuple/list passes its first item (``(inputs, labels)`` from a
    DataLoader), a mapping is passed as keyword arguments (tokenizer output for transformers).

    Example:
        >>> run_batch(nn.Identity(), (torch.ones(1), torch.zeros(1))).tolist()
        [1.0]
    """
    if isinstance(batch, torch.Tensor):
        return model(batch)
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)) and batch:
        try:
            return model(batch[0])
        except TypeError as exc:  # e.g. "forward() missing 1 required positional argument"
            if len(batch) > 1 and "argument" in str(exc):
                raise TypeError(
                    f"calibration batch is a {type(batch).__name__} of {len(batch)} items: "
                    "lowbit passes only its first item to the model (the (input, target) "
                    f"convention), and the model refused it ({exc}). For a model with several "
                    "inputs, yield dicts of keyword inputs, e.g. {'x': x, 'y': y}") from exc
            raise
    raise TypeError(
        f"calibration_data yielded a {type(batch).__name__}; yield tensors, (input, target) "
        "tuples, or dicts of keyword inputs"
    )


def run_calibration(model: nn.Module, calibrators: dict[str, Calibrator],
                    calibration_data: Iterable[Any], *, progress: bool = True,
                    max_batches: int | None = None) -> int:
    """Feed every batch through ``model``; each named layer's input goes to its calibrator.

    Args:
        model: the (float) model; run in eval mode under ``torch.no_grad``.
        calibrators: ``{layer name: Calibrator}``.
        calibration_data: any iterable of batches (see :func:`run_batch`); a one-pass generator
            is read once, one batch at a time, and never closed (it can be resumed after
            ``max_batches``).
        progress: show a tqdm progress bar (on stderr).
        max_batches: stop after this many batches (>= 1).

    Returns:
        The number of batches run.

    Raises:
        ValueError: when ``calibration_data`` is ``None``, a bare tensor (iterating it would give
            one batch per row) or yields no batch, or ``max_batches < 1``.

    Example:
        >>> from lowbit.calibrators import create_calibrator
        >>> m = nn.Sequential(nn.Linear(2, 2))
        >>> cals = {"0": create_calibrator("minmax")}
        >>> run_calibration(m, cals, [torch.ones(1, 2), -torch.ones(1, 2)], progress=False)
        2
        >>> [round(v.item(), 1) for v in cals["0"].compute_range()]
        [-1.0, 1.0]
    """
    if calibration_data is None:
        raise ValueError("calibration_data is None: static quantization needs representative "
                         "input batches (a DataLoader, a list of tensors, ...)")
    if isinstance(calibration_data, torch.Tensor):
        raise ValueError(f"calibration_data is a single tensor of shape "
                         f"{tuple(calibration_data.shape)}; iterating it would feed one row per "
                         "batch. Pass a list of batches, e.g. [x] or list(x.split(32))")
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches={max_batches} must be >= 1 (or None for all batches)")
    handles = []

    def make_hook(cal: Calibrator):
        def hook(_module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else next(iter(kwargs.values()))
            cal.update(x.detach())
        return hook

    was_training = model.training
    model.eval()
    count = 0
    try:
        for name, cal in calibrators.items():
            handles.append(model.get_submodule(name).register_forward_pre_hook(
                make_hook(cal), with_kwargs=True))
        total = len(calibration_data) if hasattr(calibration_data, "__len__") else None
        if max_batches is not None:
            total = max_batches if total is None else min(total, max_batches)
        # The bar is updated by hand: iterating through tqdm would close a generator it wraps.
        bar = tqdm(total=total, desc="calibrating", unit="batch", disable=not progress,
                   leave=False)
        with bar, torch.no_grad():  # (not inference_mode: a cache the model builds in
            # forward must stay usable by autograd later)
            for batch in calibration_data:
                try:
                    run_batch(model, batch)
                except Exception as exc:
                    note_failed_batch(exc, count, batch)
                    raise
                count += 1
                bar.update()
                if max_batches is not None and count >= max_batches:
                    break
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if count == 0:
        raise ValueError("calibration_data is empty: it yielded no batch; pass at least one "
                         "representative input batch")
    return count
