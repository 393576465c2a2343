"""Example inputs for ``torch.export``: the arguments and dynamic-shape specs that both of
lowbit's exports (ONNX, and AOTInductor for the ``aotinductor`` backend) trace a model with.

``torch.export`` specializes a dimension of size 1 to the constant 1, so a batch-1 example would
give a program that only takes batch 1: such axes are widened to 2 before tracing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["export_arguments"]


def _split_inputs(example_inputs: Any, who: str) -> tuple[tuple, dict[str, Any]]:
    """``(args, kwargs)`` from a tensor, a tuple / list of arguments or a dict of keywords."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"{who}: example_inputs must be a tensor, a tuple of arguments or a dict of "
                    f"keyword arguments, got {type(example_inputs).__name__}")


def _widen(t: Any, axes: Sequence[int]) -> Any:
    """``t`` repeated to size 2 on each dynamic axis of size 1."""
    if not isinstance(t, torch.Tensor):
        return t
    for axis in axes:
        if axis < t.dim() and t.shape[axis] == 1:
            t = torch.cat([t, t], dim=axis)
    return t


def _dynamic_shapes(args: tuple, kwargs: dict[str, Any],
                    axes: Sequence[int]) -> dict[str, Any] | tuple:
    def spec(t: Any) -> Any:
        if not isinstance(t, torch.Tensor):
            return None
        return {a: torch.export.Dim.AUTO for a in axes if a < t.dim()} or None

    if kwargs:  # (inputs come either all by position or all by keyword)
        return {k: spec(v) for k, v in kwargs.items()}
    return tuple(spec(a) for a in args)


def export_arguments(example_inputs: Any, axes: Sequence[int],
                     who: str) -> tuple[tuple, dict[str, Any], dict[str, Any] | tuple]:
    """``(args, kwargs, dynamic_shapes)`` for ``torch.export.export(model, args, kwargs,
    dynamic_shapes=...)`` from a tensor, a tuple of positional arguments or a dict of keyword
    arguments: ``axes`` of every tensor input left symbolic (size-1 ones widened to 2). ``who``
    names the caller in errors.

    Example:
        >>> args, kwargs, shapes = export_arguments(torch.randn(1, 4), [0], "me")
        >>> args[0].shape, list(shapes[0])
        (torch.Size([2, 4]), [0])
    """
    args, kwargs = _split_inputs(example_inputs, who)
    args = tuple(_widen(a, axes) for a in args)
    kwargs = {k: _widen(v, axes) for k, v in kwargs.items()}
    return args, kwargs, _dynamic_shapes(args, kwargs, axes)


def export_failure_hint(exc: BaseException) -> str:
    """What to change, for a ``torch.export`` failure lowbit recognizes (else ``""``): a
    sentence ending in ``"; "`` to put before the error.

    Example:
        >>> export_failure_hint(RuntimeError("Found <class 'DynamicCache'> in output, which "
        ...                                  "is not a known type."))[:33]
        'the model returns a cache object '
    """
    text = str(exc)
    if "Cache" in text and ("not a known type" in text or "pytree" in text):
        return ("the model returns a cache object (transformers' DynamicCache), which export "
                "cannot hold: pass use_cache=False with the example inputs, e.g. "
                "{'input_ids': ids, 'use_cache': False}; ")
    return ""

