"""Where a quantized layer's call runs when it is not its own eager kernels.

Every quantized module's ``forward`` (see ``QuantizedModuleBase.__init_subclass__``) first asks
:func:`routed`; in the common case (eager, default backend) the answer is no and the module runs
its kernels directly. Otherwise :func:`route` sends the call to:

- the custom op ``torch.ops.lowbit.quantized_layer`` (``quantized_layer_nograd`` where the input
  needs no gradient) while ``torch.export`` traces the model, or ``torch.compile`` traces a
  layer whose input needs a gradient: an opaque node with a fake (meta) implementation, so the
  trace has no graph break and the exported graph is self-contained (the layer's buffers and a
  spec, its meta as JSON with ``'`` for ``"``, which Inductor's C++ wrapper and AOTInductor can
  embed);
- ``torch.ops.lowbit.quantized_layer_live`` where ``torch.compile`` traces a layer whose input
  needs no gradient: the same opaque node, but it names the live module by a handle instead of
  passing its buffers, so each call is the module's own prepared call (12-19 us less per
  layer call at batch 1 than the buffer op, measured on an MLP, a CNN and an encoder block);
- a sibling module sharing the layer's buffers with another backend, inside a
  ``lowbit.backends.use(name)`` block;
- the layer's own kernels with lowbit's C kernels switched off, for the ``"torch"`` backend
  (PyTorch's integer ops only).

The custom op is defined with ``torch.library.Library`` rather than ``torch.library.custom_op``:
the same op, but the latter's Python wrappers cost ~35 us per call against ~7 us (measured,
torch 2.13 CPU), which matters for a batch-1 layer of 5-20 us. The op runs the layer's eager
code, so compiled and exported models give the eager model's bits.
"""

from __future__ import annotations

import contextvars
import functools
import itertools
import json
import re
import sys
import weakref
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["LAYER_BACKENDS", "layer_buffers", "load_spec", "native_allowed", "op_spec", "override",
           "route", "routed"]

#: The values of a quantized module's ``backend`` attribute: ``"auto"`` (lowbit's kernels for
#: this CPU, the ``native`` backend; PyTorch ops where a kernel is missing), ``"reference"``
#: (pure PyTorch, the expected numbers) and ``"torch"`` (PyTorch's integer ops, no C).
LAYER_BACKENDS = ("auto", "reference", "torch")

_OVERRIDE: contextvars.ContextVar[str | None] = contextvars.ContextVar("lowbit_backend",
                                                                     default=None)
_NATIVE_OFF: contextvars.ContextVar[bool] = contextvars.ContextVar("lowbit_native_off",
                                                                  default=False)
#: Every quantized module, copies included (QuantizedModuleBase.__new__ adds it): owner lookup.
_LIVE: weakref.WeakSet[nn.Module] = weakref.WeakSet()
_COMPILER = torch.compiler
_HAS_FLAG = isinstance(getattr(_COMPILER, "_is_compiling_flag", None), bool)
#: Whether dynamo holds that flag while it traces (torch >= 2.13). Before, only torch.export
#: sets it, and dynamo answers ``torch.compiler.is_compiling()`` itself (a constant True).
_FLAG_WHILE_DYNAMO = _HAS_FLAG and hasattr(_COMPILER, "_compile_session_context")


def native_allowed() -> bool:
    """False while a ``"torch"``-backend layer runs: lowbit's C kernels stay unused.

    Example:
        >>> native_allowed()
        True
    """
    return not _NATIVE_OFF.get()


def _assume_constant_result(fn: Any) -> Any:
    """``torch.compiler.assume_constant_result`` without importing ``torch._dynamo`` (about
    3 s) when ``import lowbit`` runs: that decorator only sets the attribute dynamo reads."""
    if "torch._dynamo" in sys.modules:
        return torch.compiler.assume_constant_result(fn)
    fn._dynamo_marked_constant = True
    return fn


def routed(module: nn.Module) -> bool:
    """Whether this call of ``module`` leaves its eager kernels (see the module docstring).

    Example:
        >>> import lowbit
        >>> q = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)))[0]
        >>> routed(q), routed(lowbit.backends.set_backend(q, "torch"))
        (False, True)
    """
    return (module.backend == "torch" or _elsewhere()
            or (not _FLAG_WHILE_DYNAMO and _COMPILER.is_compiling()))


@_assume_constant_result  # while tracing: evaluated once, True, no guard
def _elsewhere() -> bool:
    """A ``use(...)`` override is set, or dynamo / ``torch.export`` trace. Takes no argument:
    dynamo before torch 2.13 cannot pass a module to a constant function. Reads the compiling
    flag directly: ``torch.compiler.is_compiling()`` costs two Python calls, and this check
    runs on every eager call of every quantized layer."""
    return (_OVERRIDE.get() is not None
            or (_COMPILER._is_compiling_flag if _HAS_FLAG else _COMPILER.is_compiling()))


def override(backend: str | None) -> contextvars.Token:
    """Run every quantized layer called in this thread / context on layer backend ``backend``
    (a :data:`LAYER_BACKENDS` value; None: each layer's own) until the token is reset with
    ``_OVERRIDE.reset(token)``; ``lowbit.backends.use`` wraps it.

    Example:
        >>> token = override("reference"); _OVERRIDE.get()
        'reference'
        >>> _OVERRIDE.reset(token)
    """
    if backend is not None and backend not in LAYER_BACKENDS:
        raise ValueError(f"override: backend={backend!r} is not a layer backend "
                         f"{LAYER_BACKENDS}")
    return _OVERRIDE.set(backend)


def route(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run one call of a quantized module away from its default path (:func:`routed` is True).

    Example:
        >>> import lowbit
        >>> q = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)))[0]
        >>> x = torch.randn(2, 4)
        >>> torch.equal(route(q, x), q(x))
        True
    """
    if torch.compiler.is_compiling():  # (an input that requires grad: the op's backward)
        if torch.is_grad_enabled() and x.requires_grad:
            return torch.ops.lowbit.quantized_layer(x, layer_buffers(module), op_spec(module))
        if not _COMPILER.is_exporting() and _COMPILER.is_dynamo_compiling():
            return torch.ops.lowbit.quantized_layer_live(x, _handle_of(id(module)),
                                                         op_spec(module))
        return torch.ops.lowbit.quantized_layer_nograd(x, layer_buffers(module), op_spec(module))
    name = _OVERRIDE.get()
    if name is not None and name != module.backend:
        token = _OVERRIDE.set(None)
        try:
            return _sibling(module, name)._forward_smoothed(x)  # x is smoothed already
        finally:
            _OVERRIDE.reset(token)
    if module.backend == "torch" and not _NATIVE_OFF.get():
        token = _NATIVE_OFF.set(True)
        try:
            return module._forward_body(x)
        finally:
            _NATIVE_OFF.reset(token)
    return module._forward_body(x)


def _buffer_names(module: nn.Module) -> list[str]:
    """The module's persistent, non-None buffers, ``weight`` first."""
    skip = module._non_persistent_buffers_set
    names = [n for n, b in module._buffers.items() if b is not None and n not in skip]
    return sorted(names, key=lambda n: n != "weight")


def layer_buffers(module: nn.Module) -> list[torch.Tensor]:
    """The tensors a quantized layer is made of (what its state dict holds), ``weight`` first.

    Example:
        >>> import lowbit
        >>> q = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)))[0]
        >>> [t.dtype for t in layer_buffers(q)][:2]
        [torch.int8, torch.float32]
    """
    return [module._buffers[n] for n in _buffer_names(module)]


_SPEC_ESCAPES = {"%": "%25", "'": "%27", "\\": "%5C"}
_SPEC_UNESCAPES = {v: k for k, v in _SPEC_ESCAPES.items()}


def _spec(module: nn.Module) -> str:
    """The layer's spec: its JSON with ``'`` for ``"`` (and ``%``, ``'``, ``\\`` escaped as
    ``%25``, ``%27``, ``%5C``), a string Inductor's C++ wrapper (``cpp_wrapper``,
    AOTInductor) can write as a literal: it emits string arguments unescaped."""
    meta = {k: v for k, v in module.meta().items() if k not in ("kernel", "extra")}
    meta["buffers"] = _buffer_names(module)
    text = json.dumps(meta, sort_keys=True)
    return re.sub(r"[%'\\]", lambda m: _SPEC_ESCAPES[m.group()], text).replace('"', "'")


def load_spec(spec: str) -> dict[str, Any]:
    """The layer meta an :func:`op_spec` string holds (plain JSON, as older lowbit wrote it,
    is read too).

    Example:
        >>> import lowbit
        >>> q = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(4, 3)))[0]
        >>> load_spec(op_spec(q))["out_features"]
        3
    """
    text = spec
    if not text.startswith('{"'):
        text = re.sub(r"%(25|27|5C)", lambda m: _SPEC_UNESCAPES[m.group()],
                      text.replace("'", '"'))
    try:
        meta = json.loads(text)
    except json.JSONDecodeError as exc:
        meta = exc
    if not isinstance(meta, dict):
        raise ValueError(f"load_spec: {spec[:60]!r} is not a lowbit layer spec (the string "
                         "op_spec writes into a traced graph); export the model again")
    return meta


def op_spec(module: nn.Module) -> str:
    """The JSON a traced graph keeps for one quantized layer: its ``meta()`` (class, shapes,
    specs, backend, fusions) and the names of the buffers passed beside it. A constant of the
    trace (computed once, while tracing, from ``id(module)``: dynamo before torch 2.13 cannot
    pass a module itself to a constant function).

    Example:
        >>> import lowbit
        >>> q = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(4, 3)))[0]
        >>> '"' in op_spec(q), load_spec(op_spec(q))["out_features"]
        (False, 3)
    """
    if not _COMPILER.is_dynamo_compiling():  # (non-strict torch.export: plain Python, and the
        return _spec(module)  # module may be its tracer's proxy of a reused layer, not live)
    return _spec_of(id(module))


def _module_with_id(key: int) -> nn.Module:
    """The live quantized module whose ``id`` is ``key`` (trace time only: dynamo before
    torch 2.13 cannot pass a module to a constant function, only its id)."""
    for module in list(_LIVE):  # every quantized module (registered by __new__)
        if id(module) == key:
            return module
    raise RuntimeError(f"lowbit: no live quantized module with id {key}")


@_assume_constant_result
def _spec_of(key: int) -> str:
    return _spec(_module_with_id(key))


#: ``torch.compile`` handles: a number per quantized module a compiled graph calls (never
#: reused, so a graph never reaches another module that got a dead one's address) and its
#: module, held weakly; written while dynamo traces.
_HANDLE_OF: weakref.WeakKeyDictionary[nn.Module, int] = weakref.WeakKeyDictionary()
_HANDLES: dict[int, weakref.ref] = {}
_NEXT_HANDLE = itertools.count(1)


@_assume_constant_result
def _handle_of(key: int) -> int:
    """The handle of the live quantized module with ``id`` ``key`` (given one on first use);
    a constant of the trace, as :func:`_spec_of`."""
    module = _module_with_id(key)
    handle = _HANDLE_OF.get(module)
    if handle is None:
        handle = _HANDLE_OF[module] = next(_NEXT_HANDLE)
        _HANDLES[handle] = weakref.ref(module, lambda _, h=handle: _HANDLES.pop(h, None))
    return handle


def _live(handle: int) -> nn.Module:
    """The module behind a compiled graph's handle."""
    ref = _HANDLES.get(handle)
    module = None if ref is None else ref()
    if module is None:
        raise RuntimeError(f"lowbit.quantized_layer_live: the quantized layer {handle} that this "
                           "compiled graph calls no longer exists (a graph loaded from another "
                           "process, or a layer deleted since); compile the model again")
    return module


def _config_key(module: nn.Module) -> tuple:
    """What a sibling copies besides the buffers and may change after construction (settings
    of the meta that ``_build`` reads, e.g. ``Int4Linear.int8_activations``)."""
    return (module.fused_relu, module.fused_gelu, repr(getattr(module, "geometry", None)),
            module.name, getattr(module, "int8_activations", None),
            getattr(module, "orig_dtype", None))


def _sibling(module: nn.Module, backend: str) -> nn.Module:
    """A module like ``module`` with another layer backend, sharing its buffers (its own kernel
    caches); kept on the module and rebuilt when a buffer or a fusion changed."""
    cache = module.__dict__.setdefault("_lowbit_siblings", {})
    names = _buffer_names(module)
    hit = cache.get(backend)
    if hit is not None and hit[0] == _config_key(module) and all(
            hit[1]._buffers.get(n) is module._buffers[n] for n in names):
        return hit[1]
    sib = _build(load_spec(_spec(module)), [module._buffers[n] for n in names], backend)
    cache[backend] = (_config_key(module), sib)
    return sib


def _build(meta: dict[str, Any], buffers: Sequence[torch.Tensor],
           backend: str | None = None) -> nn.Module:
    """A quantized module from its meta whose buffers are ``buffers`` (shared, not copied)."""
    from lowbit.modules import module_from_meta  # (imports this module)

    if backend is not None:
        meta = {**meta, "backend": backend}
    names = meta["buffers"]
    if len(names) != len(buffers):
        raise ValueError(f"lowbit.quantized_layer: {meta.get('name') or meta.get('class')} "
                         f"expects buffers {names}, got {len(buffers)} tensors")
    module = module_from_meta(meta)
    for n, t in zip(names, buffers, strict=True):
        want = module._buffers.get(n)  # the empty layer's buffer: the shape its kernels read
        if want is not None and (t.dtype != want.dtype or t.shape != want.shape):
            raise ValueError(f"lowbit.quantized_layer: {meta.get('name') or meta.get('class')} "
                             f"buffer {n!r} is {t.dtype} {tuple(t.shape)}, but its spec needs "
                             f"{want.dtype} {tuple(want.shape)}: the program's buffers do not "
                             "match its layers (a tampered or mixed-up export); export the "
                             "model again")
        module._buffers[n] = t
    module._refresh_cache()
    return module.eval()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a is b or (a.data_ptr() == b.data_ptr() and a.shape == b.shape
                      and a.dtype == b.dtype and a.device == b.device)


def _executor(spec: str, buffers: Sequence[torch.Tensor]) -> nn.Module:
    """The module that runs one ``quantized_layer`` call: the live layer that owns these
    buffers (a compiled model's, or an exported one made in this process), else one built from
    the spec and kept on the weight tensor."""
    weight = buffers[0]
    hit = weight.__dict__.get("_lowbit_executor")
    if hit is not None and hit[0] == spec:
        module = hit[1]() if isinstance(hit[1], weakref.ref) else hit[1]
        if module is not None and all(_same(module._buffers[n], t) for n, t in zip(
                hit[2], buffers, strict=True)):
            return module
    meta = load_spec(spec)
    names = meta["buffers"]
    if len(names) != len(buffers):
        raise ValueError(f"lowbit.quantized_layer: {meta.get('name') or meta.get('class')} "
                         f"expects buffers {names}, got {len(buffers)} tensors")
    for module in list(_LIVE):
        own = module._buffers.get("weight")
        if (own is not None and _same(own, weight) and _buffer_names(module) == names
                and all(_same(module._buffers[n], t) for n, t in zip(names, buffers, strict=True))
                and _spec(module) == spec):
            weight.__dict__["_lowbit_executor"] = (spec, weakref.ref(module), names)
            return module
    module = _build(meta, buffers)
    weight.__dict__["_lowbit_executor"] = (spec, module, names)
    return module


_LIB = torch.library.Library("lowbit", "DEF")
_LIB.define("quantized_layer(Tensor x, Tensor[] buffers, str spec) -> Tensor")


_LIB.define("quantized_layer_grad(Tensor grad, Tensor x, Tensor y, Tensor[] buffers, str spec)"
            " -> Tensor")
#: The same layer call for a trace where its input needs no gradient (inference, or no float
#: parameter before it): no Python autograd kernel, which costs ~5 us per call even under
#: ``torch.no_grad()`` (the dispatcher calls it for every op that has one).
_LIB.define("quantized_layer_nograd(Tensor x, Tensor[] buffers, str spec) -> Tensor")


def _quantized_layer(x: torch.Tensor, buffers: list[torch.Tensor], spec: str) -> torch.Tensor:
    y = _executor(spec, buffers)._forward_smoothed(x.detach())  # the traced graph smoothed x
    return y if y.is_contiguous() else y.contiguous()


def _quantized_layer_grad(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                          buffers: list[torch.Tensor], spec: str) -> torch.Tensor:
    """The input gradient of one ``quantized_layer`` call (``lowbit.qgrad.input_grad``: the
    float layer with the dequantized weight, as in eager mode)."""
    from lowbit.qgrad import input_grad

    return input_grad(_executor(spec, buffers), x, y, grad).contiguous()


#: The spec rides along although the module is at hand: it is what makes two layers' graphs
#: differ for Inductor's on-disk FX-graph cache, which keys on the graph's text. With handles
#: alone, two models of other shapes (or dtypes) traced in two processes wrote the same graph,
#: and the second got the first one's compiled code.
_LIB.define("quantized_layer_live(Tensor x, int handle, str spec) -> Tensor")


def _quantized_layer_live(x: torch.Tensor, handle: int, spec: str) -> torch.Tensor:
    """One layer call of a compiled graph: the module itself, its prepared C call first (what
    its ``forward`` does after the checks a compiled graph has passed at trace time)."""
    module = _live(handle)
    if routed(module):  # (a use(...) block, the "torch" backend: the forward routes it)
        y = module._forward_smoothed(x)  # the traced graph smoothed x
    else:  # (once: a plan that declines the call leaves it to the body, as forward does)
        plans = module.__dict__.get("_plans")
        y = None if plans is None or type(x) is not torch.Tensor else module._planned(plans, x)
        if y is None:
            y = module._forward_body(x)
    return y if y.is_contiguous() else y.contiguous()


@torch.library.register_fake("lowbit::quantized_layer_live")
def _quantized_layer_live_fake(x: torch.Tensor, handle: int, spec: str) -> torch.Tensor:
    return _quantized_layer_fake(x, [], spec)


for _key in ("CPU", "CUDA"):
    _LIB.impl("quantized_layer_live", _quantized_layer_live, _key)
    _LIB.impl("quantized_layer", _quantized_layer, _key)
    _LIB.impl("quantized_layer_nograd", _quantized_layer, _key)
    _LIB.impl("quantized_layer_grad", _quantized_layer_grad, _key)


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
    x, buffers, spec = inputs
    ctx.spec = spec
    ctx.save_for_backward(x, output, *buffers)


def _backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, list[None], None]:
    """Inside ``torch.compile``, an input that requires grad (QLoRA adapters, float layers
    training before this one) gets the eager gradient; the op took ``x.detach()`` before, so
    those layers silently got no gradient through it. Buffers never get one."""
    x, y, *buffers = ctx.saved_tensors
    none: list[None] = [None] * len(buffers)
    if not ctx.needs_input_grad[0]:
        return None, none, None
    return torch.ops.lowbit.quantized_layer_grad(grad, x, y, buffers, ctx.spec), none, None


torch.library.register_autograd("lowbit::quantized_layer", _backward,
                                setup_context=_setup_context)


def meta_output(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output a quantized layer gives for ``x`` on the meta device: the op's fake.

    Example:
        >>> import lowbit
        >>> q = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(4, 3)))[0]
        >>> meta_output(q, torch.empty(2, 4, device="meta")).shape
        torch.Size([2, 3])
    """
    return _quantized_layer_fake(x, [], _spec(module))


@functools.lru_cache(maxsize=1024)
def _meta(spec: str) -> dict[str, Any]:
    return load_spec(spec)


@torch.library.register_fake("lowbit::quantized_layer_grad")
def _quantized_layer_grad_fake(grad: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                               buffers: list[torch.Tensor], spec: str) -> torch.Tensor:
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.register_fake("lowbit::quantized_layer_nograd")
@torch.library.register_fake("lowbit::quantized_layer")
def _quantized_layer_fake(x: torch.Tensor, buffers: list[torch.Tensor],
                          spec: str) -> torch.Tensor:
    """The output's shape and dtype, from the spec (symbolic batch sizes stay symbolic)."""
    meta = _meta(spec)
    if "num_embeddings" in meta:  # QuantizedEmbedding: indices -> rows
        return x.new_empty((*x.shape, meta["embedding_dim"]),
                           dtype=getattr(torch, meta["dtype"], torch.float32))
    if "out_features" in meta:  # the Linear modules
        return x.new_empty((*x.shape[:-1], meta["out_features"]))
    g = meta["geometry"]
    conv1d = meta["class"].endswith("1d")
    if g["pre_pad"] is not None:
        x = F.pad(x, g["pre_pad"])
    weight = x.new_empty((meta["out_channels"], meta["in_channels"] // g["groups"],
                          *meta["kernel_size"]))
    conv = F.conv1d if conv1d else F.conv2d
    y = conv(x, weight, None, g["stride"], g["padding"], g["dilation"], g["groups"])
    if g.get("fused_maxpool"):
        y = F.max_pool2d(y, g["fused_maxpool"])
    return y.new_empty(y.shape)
