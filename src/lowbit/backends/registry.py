"""The backend registry: what each backend is, whether it runs here (and why not), switching.

Two kinds of backend. *Layer* backends (``reference``, ``native``, ``torch``) are a setting of
every quantized layer: :func:`set_backend` switches a model in place, :func:`use` switches every
layer called in a ``with`` block, and the model stays an ordinary ``nn.Module``. *Model*
backends (``cuda``, ``onnxruntime``, ``torch.compile``, ``aotinductor``) run the whole model
somewhere else: :func:`set_backend` returns a new module that is called like the quantized one
(float tensors in and out) and leaves the quantized model as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from lowbit import _dispatch

__all__ = ["Backend", "BackendStatus", "BackendStatusList", "BackendUnavailableError",
           "available", "get_backend", "register_backend", "require", "set_backend", "use"]


class BackendUnavailableError(RuntimeError):
    """A backend was selected that cannot run here; the message says why and what can.

    Example:
        >>> raise BackendUnavailableError("cuda", "no CUDA device", ["reference", "native"])
        Traceback (most recent call last):
        ...
        lowbit.backends.registry.BackendUnavailableError: backend 'cuda' is not available here: ...
    """

    def __init__(self, name: str, reason: str, usable: list[str]) -> None:
        self.name, self.reason = name, reason
        super().__init__(f"backend {name!r} is not available here: {reason}; available: "
                         f"{', '.join(usable)} (see lowbit.backends.available())")


@dataclass(frozen=True)
class Backend:
    """One execution backend for quantized models.

    Attributes:
        name: what users pass (``"native"``, ``"onnxruntime"``, ...).
        summary: one line: what runs the integer layers.
        exactness: how its outputs relate to ``reference`` (bit-identical, or the tolerance).
        check: returns None when the backend runs here, else the reason it does not.
        layer_value: for a layer backend, the quantized modules' ``backend`` attribute it sets;
            None for a model backend.
        prepare: for a model backend, ``prepare(qmodel, example_inputs) -> nn.Module``
            (called with ``dynamic_axes=`` too when :func:`set_backend` is given them).
        detail: optional, returns what it runs on here (e.g. the ISA path).
        needs_inputs: ``prepare`` needs ``example_inputs`` (an export traces the model).

    Example:
        >>> b = Backend("mine", "my kernels", "bit-identical", lambda: None, layer_value="auto")
        >>> b.scope
        'layer'
    """

    name: str
    summary: str
    exactness: str
    check: Callable[[], str | None]
    layer_value: str | None = None
    prepare: Callable[..., nn.Module] | None = None
    detail: Callable[[], str] | None = None
    needs_inputs: bool = False

    def __post_init__(self) -> None:
        if (self.layer_value is None) == (self.prepare is None):
            raise ValueError(f"Backend {self.name!r}: give exactly one of layer_value (a layer "
                             "backend) or prepare (a model backend)")
        if self.layer_value is not None and self.layer_value not in _dispatch.LAYER_BACKENDS:
            raise ValueError(f"Backend {self.name!r}: layer_value={self.layer_value!r} must be "
                             f"one of {_dispatch.LAYER_BACKENDS}")

    @property
    def scope(self) -> str:
        """``"layer"`` (switches each quantized layer) or ``"model"`` (runs the whole model)."""
        return "layer" if self.layer_value is not None else "model"


@dataclass(frozen=True)
class BackendStatus:
    """Whether one backend runs here. ``reason`` says why not (empty when it does)."""

    name: str
    available: bool
    reason: str
    detail: str
    scope: str
    summary: str
    exactness: str


class BackendStatusList(list):
    """The list :func:`available` returns, with :meth:`to_markdown` and lookup by name."""

    def __getitem__(self, key: Any) -> Any:
        if isinstance(key, str):
            for status in self:
                if status.name == key:
                    return status
            raise KeyError(f"no backend {key!r}; known: {[s.name for s in self]}")
        return super().__getitem__(key)

    @property
    def names(self) -> list[str]:
        """Names of the backends that run here."""
        return [s.name for s in self if s.available]

    def to_markdown(self) -> str:
        """A markdown table: backend, available (or why not), what it runs here, exactness."""
        lines = ["| backend | kind | available | runs here | exactness vs reference |",
                 "|---|---|---|---|---|"]
        for s in self:
            ok = "yes" if s.available else f"no: {s.reason}"
            lines.append(f"| {s.name} | {s.scope} | {ok} | {s.detail or s.summary} | "
                         f"{s.exactness} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()


_REGISTRY: dict[str, Backend] = {}


def register_backend(backend: Backend, *, replace: bool = False) -> Backend:
    """Add a backend to the registry (``replace=True`` to redefine an existing name).

    Raises:
        ValueError: the name is taken and ``replace`` is False.

    Example:
        >>> b = register_backend(Backend("ref2", "pure PyTorch again", "bit-identical",
        ...                              lambda: None, layer_value="reference"))
        >>> "ref2" in [s.name for s in available()]
        True
        >>> _ = _REGISTRY.pop("ref2")
    """
    if backend.name in _REGISTRY and not replace:
        raise ValueError(f"register_backend: {backend.name!r} is already registered; pass "
                         "replace=True to redefine it")
    _REGISTRY[backend.name] = backend
    return backend


def get_backend(name: str) -> Backend:
    """The registered backend called ``name``.

    Raises:
        ValueError: unknown name (the message lists the known ones).

    Example:
        >>> get_backend("reference").scope
        'layer'
    """
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown; known backends: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def _status(backend: Backend) -> BackendStatus:
    try:
        reason = backend.check()
    except Exception as exc:  # a broken optional dependency must not break available()
        reason = f"check failed: {type(exc).__name__}: {exc}"
    detail = ""
    if reason is None and backend.detail is not None:
        try:
            detail = backend.detail()
        except Exception as exc:
            detail = f"(detail failed: {exc})"
    return BackendStatus(backend.name, reason is None, reason or "", detail, backend.scope,
                         backend.summary, backend.exactness)


def available() -> BackendStatusList:
    """Every registered backend with whether it runs here and, if not, why.

    Returns:
        A :class:`BackendStatusList` of :class:`BackendStatus` (index it by name too).

    Example:
        >>> table = available()
        >>> table["reference"].available, table["reference"].scope
        (True, 'layer')
        >>> "cuda" in [s.name for s in table]
        True
    """
    return BackendStatusList(_status(b) for b in _REGISTRY.values())


def require(name: str) -> Backend:
    """The backend ``name``, checked to run here.

    Raises:
        ValueError: unknown name.
        BackendUnavailableError: it cannot run here (the message says why).

    Example:
        >>> require("reference").name
        'reference'
    """
    backend = get_backend(name)
    status = _status(backend)
    if not status.available:
        raise BackendUnavailableError(name, status.reason, available().names)
    return backend


def _quantized_layers(model: nn.Module) -> list[nn.Module]:
    from lowbit._qmodule import QuantizedModuleBase

    return [m for m in model.modules() if isinstance(m, QuantizedModuleBase)]


def set_backend(qmodel: nn.Module, name: str, example_inputs: Any = None, *,
                dynamic_axes: Sequence[int] | None = None) -> nn.Module:
    """Run ``qmodel`` on backend ``name``.

    A layer backend (``reference``, ``native``, ``torch``) switches every quantized layer of
    ``qmodel`` in place and returns ``qmodel``; a model backend (``cuda``, ``onnxruntime``,
    ``torch.compile``, ``aotinductor``) returns a new module called like ``qmodel`` and leaves
    ``qmodel`` as it was.

    Args:
        qmodel: a model quantized by lowbit (or one quantized layer).
        name: a backend name (see :func:`available`).
        example_inputs: a tensor, tuple or dict of inputs; needed by ``onnxruntime`` and
            ``aotinductor`` (the export traces the model with them; the batch dimension stays
            dynamic).
        dynamic_axes: for ``onnxruntime`` and ``aotinductor``, the axes of every input that
            stay dynamic (default ``(0,)``, the batch); ``(0, 1)`` also keeps a transformer's
            sequence length free.

    Returns:
        The module to call.

    Raises:
        ValueError: unknown name; no quantized layer in ``qmodel``; missing example inputs.
        BackendUnavailableError: the backend cannot run here (the message says why).

    Example:
        >>> import torch, lowbit
        >>> qmodel = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(8, 4)))
        >>> x = torch.randn(2, 8)
        >>> y = qmodel(x)
        >>> set_backend(qmodel, "reference") is qmodel, qmodel[0].backend
        (True, 'reference')
        >>> torch.equal(qmodel(x), y)  # INT8 x INT8: native and reference give the same bits
        True
        >>> _ = set_backend(qmodel, "native")
    """
    backend = require(name)
    if dynamic_axes is not None and not backend.needs_inputs:
        raise ValueError(f"set_backend(..., {name!r}, dynamic_axes=...): dynamic_axes applies "
                         "to the backends that export the model (onnxruntime, aotinductor); "
                         f"{name} takes any input shape")
    layers = _quantized_layers(qmodel)
    if not layers:
        raise ValueError(f"set_backend: {type(qmodel).__name__} has no lowbit quantized layer; "
                         "quantize it first (lowbit.quantize_dynamic / quantize_static / "
                         "quantize_weight_only)")
    if backend.layer_value is not None:
        for layer in layers:
            layer.backend = backend.layer_value
            layer.__dict__.pop("_lowbit_siblings", None)
            layer._refresh_cache()
        return qmodel
    if backend.needs_inputs and example_inputs is None:
        raise ValueError(f"set_backend(..., {name!r}) needs example_inputs (a tensor, tuple or "
                         "dict of inputs): the model is traced with them")
    assert backend.prepare is not None
    if dynamic_axes is None:
        return backend.prepare(qmodel, example_inputs)
    return backend.prepare(qmodel, example_inputs, dynamic_axes=tuple(dynamic_axes))


@contextlib.contextmanager
def use(name: str) -> Iterator[Backend]:
    """Run every quantized layer called inside the block on layer backend ``name``.

    Applies to the current thread (and async context); layers keep their own setting outside.
    Each layer runs a sibling that shares its buffers (built on first use, then cached).
    Model backends cannot switch per layer: use :func:`set_backend` for them.

    Raises:
        ValueError: unknown name, or a model backend.
        BackendUnavailableError: the backend cannot run here.

    Example:
        >>> import torch, lowbit
        >>> qmodel = lowbit.quantize_weight_only(nn.Sequential(nn.Linear(64, 32)), 4, 32)
        >>> x = torch.randn(3, 64)
        >>> with use("reference"):
        ...     y_ref = qmodel(x)
        >>> torch.allclose(qmodel(x), y_ref, atol=1e-4), qmodel[0].backend
        (True, 'auto')
    """
    backend = require(name)
    if backend.layer_value is None:
        raise ValueError(f"use({name!r}): {name} runs a whole model, it cannot switch layer by "
                         f"layer; call lowbit.backends.set_backend(qmodel, {name!r}, "
                         "example_inputs) and call the module it returns")
    token = _dispatch.override(backend.layer_value)
    try:
        yield backend
    finally:
        _dispatch._OVERRIDE.reset(token)
