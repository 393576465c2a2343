"""Shared base and helpers of lowbit's quantized modules (see ``modules.py``)."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import operator
import threading
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit import _dispatch
from lowbit.config import QuantSpec
from lowbit.dropin import DequantizedWeight
from lowbit.kernels.base import native_lib_for
from lowbit.kernels.plans import PlanCache
from lowbit.memory import POOL_MIN_BYTES
from lowbit.memory import empty as pooled_empty
from lowbit.native import load_native, selected_isa
from lowbit.ops import choose_qparams, compute_range, quantize

__all__ = ["MAX_CONV_EXTENT", "QuantizedModuleBase", "carry_hooks", "check_conv_geometry",
           "check_conv_input", "conv_geometry", "default_conv_geometry", "has_hooks", "jsonable",
           "quantize_weight"]

#: Largest kernel extent ``dilation * (kernel_size - 1) + 1``, stride or fused max-pool size
#: (per spatial dimension) a quantized conv accepts: far above real networks, small enough that
#: a hostile file cannot make one layer pad its input to gigabytes.
MAX_CONV_EXTENT = 4096
_PAD_MODES = ("constant", "reflect", "replicate", "circular")
_GEOMETRY_KEYS = {"stride", "padding", "dilation", "groups", "pre_pad", "pad_mode"}
#: Serializes kernel-cache rebuilds: a layer's first call from several threads at once (a
#: model served by a thread pool) rebuilds its caches once, and no thread reads them half made.
_REFRESH_LOCK = threading.RLock()
_WEIGHT_READS: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar(
    "lowbit_weight_reads", default=None)


@contextlib.contextmanager
def record_weight_reads() -> Iterator[set[int]]:
    """The ids of the quantized layers whose ``weight`` (the float view) is read inside the
    block: model code that reads it (CLIP's ``patch_embedding.weight.dtype``, MobileBERT's
    head multiplying by ``dense.weight``) needs it in an exported graph too.

    Example:
        >>> import lowbit
        >>> q = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(4, 4)))
        >>> with record_weight_reads() as read:
        ...     _ = q[0].weight.dtype
        >>> read == {id(q[0])}
        True
    """
    read: set[int] = set()
    token = _WEIGHT_READS.set(read)
    try:
        yield read
    finally:
        _WEIGHT_READS.reset(token)


def _weight_key(w: torch.Tensor) -> tuple[int, int]:
    """What identifies one tensor's values (the input smoothing a prepared call applies): its
    version counter (moved by in-place changes) and storage; inference tensors (made under
    ``torch.inference_mode``) have no version counter: their storage alone."""
    return (-1 if w.is_inference() else w._version, w.data_ptr())


def _state_key(module: nn.Module, codes: str = "weight") -> tuple[int, ...]:
    """What identifies a quantized layer's values for its derived kernel caches and prepared
    calls: the storage address of its codes and the version counter (moved by in-place
    changes) of every persistent buffer, the codes, scales, zero-points, bias and input qparams
    (static layers derive their int32 bias and zero-point corrections from them). So
    ``layer.input_scale.mul_(2)`` is honoured as assigning a new tensor is. Prepared calls bind
    their own copies of the small vectors (:mod:`lowbit.kernels.plans`), so a buffer whose
    memory moves (``share_memory_()``) is never read at its old address.

    Not seen (call ``layer._refresh_cache()`` after them): in-place changes made inside
    ``torch.inference_mode`` to buffers made there (inference tensors have no version counter)
    or through ``.data`` (which does not move it), and scales / zero-points / bias put straight
    into ``layer._buffers`` (assignment, ``load_state_dict`` and ``.to()`` are seen)."""
    buffers = module._buffers
    names = module.__dict__.get("_state_names")
    if names is None:  # (cached: dropped when a buffer is assigned, registered or deleted)
        skip = module._non_persistent_buffers_set
        # versioned ones only: None buffers and inference tensors have no counter to read
        names = tuple(n for n, t in buffers.items() if n not in skip and t is not None
                      and not t.is_inference())
        getter = (operator.itemgetter(*names) if len(names) > 1  # (a tuple from 2 names on)
                  else (lambda b, n=names: tuple(b[k] for k in n)))
        module.__dict__["_state_names"] = names = (names, getter)
    try:  # under 1 us: one attribute read per buffer
        return (buffers[codes].data_ptr(), *map(_VERSION, names[1](buffers)))
    except (AttributeError, RuntimeError, KeyError):  # the codes removed or not versioned
        w = buffers.get(codes)
        return (-1 if w is None else w.data_ptr(),
                *[-1 if t is None or t.is_inference() else t._version
                  for t in map(buffers.get, names[0])])


_VERSION = operator.attrgetter("_version")


def jsonable(value: Any) -> Any:
    """``value`` with tensors / tuples turned into plain JSON types (lists, floats, ints).

    Example:
        >>> jsonable({"range": (torch.tensor(1.5), 2)})
        {'range': [1.5, 2]}
    """
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (torch.dtype,)):
        return str(value).removeprefix("torch.")
    return value


def quantize_weight(weight: torch.Tensor, spec: QuantSpec, name: str, kind: str,
                    weight_qparams: tuple[Any, Any] | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize a float weight: ``(codes, scale float32, zero_point int32)``.

    Args:
        weight: float weight (2-D ``[N, K]`` for grouped specs).
        spec: the weight spec.
        name, kind: layer name and float type for error messages.
        weight_qparams: ``(scale, zero_point)`` overriding the observed qparams (QAT).

    Raises:
        ValueError: on NaN/Inf weights, naming the layer and the fix.

    Example:
        >>> q, s, z = quantize_weight(torch.randn(4, 8), QuantSpec.int8_weight(), "fc", "Linear")
        >>> q.dtype, tuple(s.shape)
        (torch.int8, (4,))
    """
    w = weight.detach().float()
    bad = int((~torch.isfinite(w)).sum())
    if bad:
        label = name or "<unnamed layer>"
        raise ValueError(f"{label} ({kind}): weight has {bad} NaN/Inf value(s); fix the weights "
                         f"or keep it in float with layer_overrides={{{label!r}: None}}")
    if weight_qparams is not None:
        scale = torch.as_tensor(weight_qparams[0], dtype=torch.float32).detach().clone()
        zp = torch.as_tensor(weight_qparams[1]).detach().to(torch.int32).clone()
    else:
        scale, zp = choose_qparams(*compute_range(w, spec, name or "weight"), spec)
    return quantize(w, scale, zp, spec), scale.contiguous(), zp.contiguous()


#: The hook tables of ``nn.Module`` that a replacement layer takes over from the layer it
#: replaces (forward, forward-pre and backward hooks with their kwargs / always-call flags).
_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks",
                "_backward_pre_hooks")


def has_hooks(module: nn.Module) -> bool:
    """Whether ``module`` has forward, forward-pre or backward hooks registered on it.

    Example:
        >>> m = nn.ReLU()
        >>> has_hooks(m), has_hooks((m.register_forward_hook(lambda *a: None), m)[1])
        (False, True)
    """
    return any(getattr(module, t, None) for t in ("_forward_hooks", "_forward_pre_hooks",
                                                   "_backward_hooks", "_backward_pre_hooks"))


def carry_hooks(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Give ``dst`` (the replacement of ``src``) the hooks registered on ``src``; ``dst``.

    The hook tables are shared, not copied, so the handles the user holds still remove them.
    A hook then sees the replacement module (its ``weight`` the float view of the codes).

    Example:
        >>> seen = []
        >>> old, new = nn.Linear(2, 2), nn.Linear(2, 2)
        >>> h = old.register_forward_hook(lambda m, i, o: seen.append(o.shape))
        >>> _ = carry_hooks(old, new)(torch.ones(1, 2)); h.remove(); _ = new(torch.ones(1, 2))
        >>> seen
        [torch.Size([1, 2])]
    """
    if src is not dst and has_hooks(src):
        for table in _HOOK_TABLES:
            if hasattr(src, table):
                setattr(dst, table, getattr(src, table))
    return dst


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _ints(value: Any, n: int) -> bool:
    return isinstance(value, (list, tuple)) and len(value) == n and all(map(_int, value))


def check_conv_geometry(geometry: Mapping[str, Any], kernel_size: Any, in_channels: Any,
                        out_channels: Any, dims: int, label: str = "conv",
                        fix: str = "fix the layer or keep it in float") -> None:
    """Refuse a conv geometry the kernels cannot run safely (they index memory by these sizes).

    Rules, per spatial dimension: ``1 <= kernel_size``; ``1 <= stride``, ``1 <= dilation`` and
    the kernel extent ``dilation * (kernel_size - 1) + 1`` at most :data:`MAX_CONV_EXTENT`;
    ``0 <= padding <= dilation * (kernel_size - 1)`` (the C kernels pad by reading; more
    padding goes through ``pre_pad``); each side of ``pre_pad`` (applied by ``F.pad`` before
    the kernels, then ``padding`` is 0) in ``0..MAX_CONV_EXTENT``; ``groups >= 1`` dividing both
    channel counts.

    Args:
        geometry: ``{"stride", "padding", "dilation", "groups", "pre_pad", "pad_mode"}`` and
            optionally ``"fused_maxpool"`` (see :func:`conv_geometry`).
        kernel_size, in_channels, out_channels: the conv's shape.
        dims: 1 (Conv1d) or 2 (Conv2d).
        label: names the layer in the error message.
        fix: what the message tells the user to do.

    Raises:
        ValueError: naming ``label``, the field and the allowed range.

    Example:
        >>> geo = conv_geometry(nn.Conv2d(3, 4, 3, padding=1))
        >>> check_conv_geometry(geo, (3, 3), 3, 4, dims=2)  # fine: returns None
        >>> check_conv_geometry({**geo, "padding": [-1, -1]}, (3, 3), 3, 4, dims=2)
        Traceback (most recent call last):
        ...
        ValueError: conv: padding=[-1, -1] must hold 2 integers, each >= 0 and <= ...
    """
    def bad(field: str, value: Any, rule: str) -> ValueError:
        return ValueError(f"{label}: {field}={value!r:.200} must {rule}; {fix}")

    if not isinstance(geometry, Mapping):
        raise bad("geometry", geometry, "be a dict of stride/padding/dilation/groups")
    missing, unknown = _GEOMETRY_KEYS - set(geometry), set(geometry) - _GEOMETRY_KEYS - {
        "fused_maxpool"}
    if missing or unknown:
        raise bad("geometry", dict(geometry), f"have the fields {sorted(_GEOMETRY_KEYS)} (and "
                  f"optionally 'fused_maxpool'); missing {sorted(missing)}, unknown "
                  f"{sorted(unknown)}")
    for field, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if not _int(value) or not 1 <= value < 2**31:
            raise bad(field, value, "be a positive integer")
    if not _ints(kernel_size, dims) or min(kernel_size) < 1:
        raise bad("kernel_size", kernel_size, f"hold {dims} positive integers")
    g = geometry
    if not _ints(g["dilation"], dims) or min(g["dilation"]) < 1:
        raise bad("dilation", g["dilation"], f"hold {dims} integers >= 1")
    reach = [d * (k - 1) for d, k in zip(g["dilation"], kernel_size, strict=True)]
    if max(reach) + 1 > MAX_CONV_EXTENT:
        raise bad("dilation", g["dilation"], f"keep dilation * (kernel_size - 1) + 1 <= "
                  f"{MAX_CONV_EXTENT} (kernel_size={list(kernel_size)})")
    if not _ints(g["stride"], dims) or not all(1 <= s <= MAX_CONV_EXTENT for s in g["stride"]):
        raise bad("stride", g["stride"], f"hold {dims} integers in 1..{MAX_CONV_EXTENT}")
    if not _ints(g["padding"], dims) or not all(
            0 <= p <= r for p, r in zip(g["padding"], reach, strict=True)):
        raise bad("padding", g["padding"], f"hold {dims} integers, each >= 0 and <= dilation * "
                  f"(kernel_size - 1) = {reach} (the kernel's reach)")
    if g["pre_pad"] is not None:  # F.pad order: last dimension first, (before, after) pairs
        if not _ints(g["pre_pad"], 2 * dims) or not all(
                0 <= p <= MAX_CONV_EXTENT for p in g["pre_pad"]):
            raise bad("pre_pad", g["pre_pad"], f"be None or hold {2 * dims} integers, each in "
                      f"0..{MAX_CONV_EXTENT}")
        if any(g["padding"]):
            raise bad("padding", g["padding"], "be 0 when pre_pad is given")
    if g["pad_mode"] not in _PAD_MODES:
        raise bad("pad_mode", g["pad_mode"], f"be one of {_PAD_MODES}")
    groups = g["groups"]
    if not _int(groups) or groups < 1 or in_channels % groups or out_channels % groups:
        raise bad("groups", groups, f"be a positive integer dividing in_channels={in_channels} "
                  f"and out_channels={out_channels}")
    pool = g.get("fused_maxpool", 0)
    if not _int(pool) or not 0 <= pool <= MAX_CONV_EXTENT or (pool and dims != 2):
        raise bad("fused_maxpool", pool, f"be an integer in 0..{MAX_CONV_EXTENT} (2-d convs "
                  "only)")


def check_conv_input(label: str, x: torch.Tensor, dims: int, kernel_size: Any,
                     geometry: Mapping[str, Any]) -> None:
    """Refuse a batched conv input the float ``nn.Conv{dims}d`` (and a fused max-pool) refuses.

    The input must have ``dims + 2`` dimensions and, per spatial dimension, a padded size of
    at least the kernel extent ``dilation * (kernel_size - 1) + 1`` (the float layer raises
    "Kernel size can't be greater than actual input size"); a fused max-pool needs at least
    its window of conv output.

    Raises:
        RuntimeError: naming ``label``, the sizes and the kernel extent.

    Example:
        >>> geo = default_conv_geometry(1)
        >>> check_conv_input("c", torch.zeros(1, 4, 5), 1, (3,), geo)  # fine: returns None
        >>> check_conv_input("c", torch.zeros(1, 4, 1), 1, (3,), geo)
        Traceback (most recent call last):
        ...
        RuntimeError: c: padded input size [1] is smaller than the kernel extent [3] ...
    """
    if x.dim() != dims + 2:
        raise RuntimeError(f"{label}: expected a {dims + 1}-D (unbatched) or {dims + 2}-D "
                           f"(batched) input, got shape {tuple(x.shape)}")
    g = geometry
    pre = g["pre_pad"]  # F.pad order: last dimension first, (before, after) pairs
    padded, extent, out = [], [], []
    for i in range(dims):
        side = (pre[2 * (dims - 1 - i)] + pre[2 * (dims - 1 - i) + 1] if pre is not None
                else 2 * g["padding"][i])
        padded.append(x.shape[2 + i] + side)
        extent.append(g["dilation"][i] * (kernel_size[i] - 1) + 1)
        out.append((padded[-1] - extent[-1]) // g["stride"][i] + 1)
    if any(p < e for p, e in zip(padded, extent, strict=True)):
        raise RuntimeError(f"{label}: padded input size {padded} is smaller than the kernel "
                           f"extent {extent} (input shape {tuple(x.shape)}); the float "
                           f"nn.Conv{dims}d refuses it too: give a larger input")
    pool = g.get("fused_maxpool", 0)
    if pool and min(out) < pool:
        raise RuntimeError(f"{label}: conv output size {out} is smaller than the fused "
                           f"max-pool window {pool} (input shape {tuple(x.shape)}); the float "
                           "nn.MaxPool2d refuses it too: give a larger input")


def conv_geometry(module: nn.Module, name: str = "") -> dict[str, Any]:
    """Stride/padding/dilation/groups of a float conv, with pre-padding for non-zero modes.

    ``padding="same"``, ``padding_mode != "zeros"`` and zero padding past the kernel's reach
    (``padding > dilation * (kernel_size - 1)``, e.g. a 1x1 conv with ``padding=1``: border
    pixels that see only zeros) become an explicit ``F.pad`` before the convolution
    (``pre_pad``, ``pad_mode``) and ``padding=0``.

    Raises:
        ValueError: a geometry :func:`check_conv_geometry` refuses (e.g. negative padding),
            naming the layer (``name``, else the module).

    Example:
        >>> conv_geometry(nn.Conv2d(3, 4, 3, padding=1))["padding"]
        [1, 1]
    """
    dims = 1 if isinstance(module, nn.Conv1d) else 2
    geo: dict[str, Any] = {"stride": list(module.stride), "dilation": list(module.dilation),
                           "groups": module.groups, "pre_pad": None, "pad_mode": "constant"}
    reach = [d * (k - 1) for d, k in zip(module.dilation, module.kernel_size, strict=True)]
    if (isinstance(module.padding, str) or module.padding_mode != "zeros"
            or any(p > r for p, r in zip(module.padding, reach, strict=True))):
        geo["pre_pad"] = [int(p) for p in module._reversed_padding_repeated_twice]
        geo["pad_mode"] = "constant" if module.padding_mode == "zeros" else module.padding_mode
        geo["padding"] = [0] * dims
    else:
        geo["padding"] = list(module.padding)
    label = f"{name} ({type(module).__name__})" if name else repr(module)
    check_conv_geometry(geo, list(module.kernel_size), module.in_channels, module.out_channels,
                        dims, label)
    return geo


class ConvAttributes:
    """``stride``, ``padding``, ``dilation``, ``groups`` and ``padding_mode`` of a quantized
    conv, read as the float conv's (model code reads them: Whisper's encoder computes its
    output length from ``conv1.stride[0]``), from the layer's ``geometry``. Read-only: the
    kernels and prepared calls derive from ``geometry``."""

    geometry: dict[str, Any]

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(self.geometry["stride"])

    @property
    def dilation(self) -> tuple[int, ...]:
        return tuple(self.geometry["dilation"])

    @property
    def groups(self) -> int:
        return int(self.geometry["groups"])

    @property
    def padding(self) -> tuple[int, ...] | str:
        """The float conv's padding: ``"same"`` where it padded one side more (even kernel
        extents), else per spatial dimension (``pre_pad`` holds it for non-zero modes)."""
        pre = self.geometry["pre_pad"]
        if pre is None:
            return tuple(self.geometry["padding"])
        pairs = [(pre[i], pre[i + 1]) for i in range(0, len(pre), 2)][::-1]  # (F.pad order)
        return "same" if any(a != b for a, b in pairs) else tuple(a for a, _ in pairs)

    @property
    def padding_mode(self) -> str:
        mode = self.geometry["pad_mode"]
        return "zeros" if mode == "constant" else mode


def default_conv_geometry(dims: int) -> dict[str, Any]:
    """The geometry of a plain conv (stride 1, no padding) with ``dims`` spatial dimensions.

    Example:
        >>> default_conv_geometry(1)["stride"]
        [1]
    """
    return {"stride": [1] * dims, "padding": [0] * dims, "dilation": [1] * dims, "groups": 1,
            "pre_pad": None, "pad_mode": "constant"}


def _float_target(fn: Any, current: torch.dtype, like: torch.Tensor | None) -> torch.dtype | None:
    """The float dtype ``fn`` (an ``nn.Module._apply`` function) turns ``current`` into, or None
    when it keeps it (a device move) or cannot tell (it fails on a one-element probe)."""
    device = like.device if like is not None else torch.device("cpu")
    try:
        out = fn(torch.zeros(1, dtype=current, device=device))
    except Exception:  # the real call then reports it on the real buffers
        return None
    ok = isinstance(out, torch.Tensor) and out.is_floating_point() and out.dtype != current
    return out.dtype if ok else None


def _smoothed(x: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor:
    """``x * smoothing``; a large float32 CPU result that autograd does not track goes to the
    output pool (:mod:`lowbit.memory`), as a quantized layer's output does: a fresh multi-MB
    tensor per call page-faults (measured: 1.5 ms of MiniLM's 38 at 32 sentences)."""
    if (type(x) is torch.Tensor and x.dtype == torch.float32 and x.is_cpu
            and x.numel() * 4 >= POOL_MIN_BYTES and smoothing.dtype == torch.float32
            and not (x.requires_grad and torch.is_grad_enabled())
            and not torch.compiler.is_compiling()):  # (a traced graph has no pool)
        return torch.mul(x, smoothing, out=pooled_empty(tuple(x.shape)))
    return x * smoothing.to(x.dtype)


def refuse_jit_trace(module: nn.Module) -> None:
    """Raise a clear error under ``torch.jit.trace`` (and the TorchScript-based ONNX exporter,
    ``torch.onnx.export(..., dynamo=False)``): the tracer records only tensor ops, so lowbit's
    C kernels and cached-kernel choices would come out as a wrong or non-reproducible graph,
    and PyTorch deprecates that API for ``torch.export`` / ``torch.compile``, which lowbit
    supports.

    Example:
        >>> refuse_jit_trace(nn.Linear(2, 2))  # eager: nothing to refuse
    """
    if torch.jit.is_tracing():
        raise _torchscript_refused(module, "torch.jit.trace cannot record")


def _torchscript_refused(module: nn.Module, what: str) -> RuntimeError:
    label = getattr(module, "_label", lambda: type(module).__name__)()
    return RuntimeError(
        f"{label}: {what} lowbit's quantized layers (PyTorch deprecates TorchScript in favour "
        "of torch.export / torch.compile). Deploy without Python with torch.export.export + "
        "AOTInductor (lowbit.backends 'aotinductor') or ONNX (lowbit.export_onnx); in Python, "
        "torch.compile(qmodel) or the eager model")


class QuantizedModuleBase(nn.Module):
    """Common plumbing: backend, layer name, fused ReLU / GELU, meta, cache refresh after loading.

    Subclasses hold plain buffers, implement ``_refresh_cache()`` (non-persistent kernel caches)
    and ``_shape_meta()``; ``meta()`` adds the common fields. Every ``forward`` starts with
    ``x = self._input(x, ...)``, after handing inputs that require grad to
    ``lowbit.qgrad.frozen_forward`` (gradient to the input through the dequantized weight).

    A subclass's ``forward`` is kept as ``_forward_body`` and called by a thin ``forward`` that
    first asks ``lowbit._dispatch.routed``: while compiling / exporting (the layer becomes the
    custom op ``lowbit::quantized_layer``), in a ``lowbit.backends.use`` block, or on the
    ``"torch"`` backend the call goes to ``lowbit._dispatch.route``; otherwise straight to the
    body (eager cost: one check, ~0.2 us).

    Layers that support it (``_make_plan``) then try a prepared C call for the input's shape
    (:mod:`lowbit.kernels.plans`): float32 (INT8 layers: also bfloat16) contiguous CPU inputs
    that do not require grad, the same bits as the body with one C call. Plans live in
    ``_plans`` ((shape, threads, ISA path, library, ``_plan_tag``) -> (plan or False, the
    buffers' versions and the codes' pointer: ``_state_key``)), emptied by ``_refresh_cache``
    and whenever a fusion, the backend or ``use_plans`` is set.
    """

    #: Attributes whose change makes the prepared calls stale.
    _PLAN_ATTRS = frozenset({"fused_relu", "_fused_gelu", "backend", "geometry",
                             "int8_activations", "use_plans"})
    #: False (per module): never use prepared calls, always the step-by-step path (the same
    #: bits, slower at batch 1; for comparisons).
    use_plans: bool = True
    #: Part of every plan's key: a setting a subclass reads that may change class-wide.
    _plan_tag: Any = None
    #: Whether the body computes a bfloat16 input exactly as its float32 copy, then rounds the
    #: output to bfloat16 (so plans may serve bfloat16 inputs through two casts).
    _plans_cast_bf16 = False
    #: Whether ``_make_plan(x, smooth)`` can build a call that applies the input smoothing
    #: itself (float32 inputs; the wrapper then skips its ``x * smoothing`` pass).
    _plans_fuse_smoothing = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        body = cls.__dict__.get("forward")
        if body is None:
            return

        @functools.wraps(body)
        def forward(self: QuantizedModuleBase, input: torch.Tensor, *,
                    _smoothed_input: bool = False) -> torch.Tensor:
            # ``input``: the float layers' name, so ``layer(input=x)`` works as on nn.Linear
            x = input
            refuse_jit_trace(self)
            smoothing = None if _smoothed_input else self._buffers.get("input_smoothing")
            if smoothing is not None and isinstance(x, torch.Tensor) and x.is_floating_point():
                plans = self.__dict__.get("_plans")  # AWQ / SmoothQuant (Linear): x * factor
                if (plans is not None and self._plans_fuse_smoothing and type(x) is torch.Tensor
                        and x.dtype == torch.float32 and smoothing.dtype == torch.float32
                        and x.dim() > 0 and smoothing.numel() == x.shape[-1]
                        and smoothing.is_contiguous() and not _dispatch.routed(self)):
                    # (a factor of another size, from a tampered file, fails in x * smoothing)
                    y = self._planned(plans, x, smoothing)  # the C call multiplies as it goes
                    if y is None:  # no plan: a step-by-step path that multiplies as it goes
                        y = self._fused_smoothing(x, smoothing)
                    if y is not None:
                        return y
                x = _smoothed(x, smoothing)
            if _dispatch.routed(self):
                return _dispatch.route(self, x)
            plans = self.__dict__.get("_plans")
            if plans is not None and type(x) is torch.Tensor:
                y = self._planned(plans, x)
                if y is not None:
                    return y
            if isinstance(x, torch.Tensor) and x.is_meta:  # (plans take CPU inputs only)
                return self._meta_forward(x)
            return body(self, x)

        cls._forward_body = body  # type: ignore[attr-defined]
        cls.forward = forward  # type: ignore[method-assign]

    def _meta_forward(self, x: torch.Tensor) -> torch.Tensor:
        """A call on the meta device (shape inference, big-model loaders): the output's shape
        and dtype, as ``torch.compile`` sees them, with no values and no kernel caches."""
        self._check_device(x)
        expected = getattr(self, "in_features", None)
        if expected is not None and (x.dim() == 0 or x.shape[-1] != expected):
            raise ValueError(f"{self._label()}: expected input with {expected} features in dim "
                             f"-1 (in_features={expected}), got shape {tuple(x.shape)}")
        return _dispatch.meta_output(self, x)

    def _forward_smoothed(self, x: torch.Tensor) -> torch.Tensor:
        """``forward`` after the input smoothing (AWQ / SmoothQuant): the entry of every call
        that has already applied it (``lowbit.qgrad.frozen_forward``, another backend's
        sibling, the ``lowbit::quantized_layer`` op), so the factor is applied exactly once."""
        return self.forward(x, _smoothed_input=True)

    def __new__(cls, *args: Any, **kwargs: Any) -> QuantizedModuleBase:
        # here rather than in __init__: copy.deepcopy and pickle create modules without it
        self = super().__new__(cls)
        _dispatch._LIVE.add(self)
        return self

    def __init__(self, *, backend: str = "auto", name: str = "", fused_relu: bool = False,
                 fused_gelu: str | None = None, orig_dtype: str = "float32",
                 meta_extra: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        if backend not in _dispatch.LAYER_BACKENDS:
            raise ValueError(f"backend={backend!r} is unknown; use one of "
                             f"{_dispatch.LAYER_BACKENDS} (lowbit.backends.set_backend takes "
                             "the backend names)")
        self.backend = backend
        self.name = name
        self.fused_relu = bool(fused_relu)
        self.fused_gelu = fused_gelu  # validated by the property setter
        self.orig_dtype = orig_dtype
        self.meta_extra: dict[str, Any] = jsonable(dict(meta_extra or {}))
        if self.meta_extra.get("input_smoothing"):  # lowbit.weight_calibration: x * factor
            self.register_buffer("input_smoothing", torch.ones(int(
                self.meta_extra["input_smoothing"])))

    def __prepare_scriptable__(self) -> nn.Module:
        """Called by ``torch.jit.script`` first: refuse with what to use instead (TorchScript
        cannot compile the layer's Python and C paths)."""
        raise _torchscript_refused(self, "torch.jit.script cannot compile")

    @property
    def qweight(self) -> torch.Tensor:
        """The integer weight codes (int8, or uint8 with two 4-bit codes per byte): the buffer
        saved as ``weight`` in ``state_dict`` and lowbit files (AttributeError for a layer with
        several weights: the quantized RNNs' ``weight_ih_l0``...)."""
        codes = self._codes_buffer()
        if codes is None:
            raise AttributeError(f"{self._label()} has no single weight; its codes are the "
                                 "buffers named weight_*")
        return codes

    @property
    def weight(self) -> torch.Tensor:
        """The float view of the weight (:class:`lowbit.dropin.DequantizedWeight`): the dtype,
        shape and device of the float layer's weight, dequantized only when an op uses it.

        Model code reads ``layer.weight.dtype`` (e.g. ``transformers`` casts inputs to it); the
        codes are :attr:`qweight`. GPT-2 ``Conv1D`` replacements report its ``[in, out]`` shape.

        Example:
            >>> from lowbit.modules import QuantizedLinear
            >>> from lowbit.config import QuantizationConfig
            >>> q = QuantizedLinear.from_float(nn.Linear(4, 2), QuantizationConfig.int8_dynamic())
            >>> q.weight.dtype, tuple(q.weight.shape), q.qweight.dtype
            (torch.float32, (2, 4), torch.int8)
        """
        codes = self._codes_buffer()
        if codes is None:
            raise AttributeError(f"{self._label()} has no weight codes")
        reads = _WEIGHT_READS.get()
        if reads is not None:
            reads.add(id(self))
        dtype = getattr(torch, self.orig_dtype, torch.float32)
        if torch.compiler.is_compiling():  # traced ops (dead code when only metadata is read)
            return self._float_weight(reference=True).to(dtype)
        shape = self._weight_shape()
        if self.meta_extra.get("hf_conv1d"):
            shape = shape[::-1]
        return DequantizedWeight(self._float_weight, shape, dtype, codes.device, self._label(),
                                 codes)

    def register_buffer(self, name: str, tensor: torch.Tensor | None,
                        persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        self.__dict__.pop("_state_names", None)  # (see _state_key)
        self.__dict__.pop("_weight_key", None)

    def __delattr__(self, name: str) -> None:
        super().__delattr__(name)  # (a parametrization moves a buffer away this way)
        self.__dict__.pop("_state_names", None)
        self.__dict__.pop("_weight_key", None)

    def __setattr__(self, name: str, value: Any) -> None:
        codes = self.__dict__.get("_buffers", {}).get("weight") if name == "weight" else None
        if name == "weight" and (isinstance(value, nn.Parameter) or (
                codes is not None and isinstance(value, torch.Tensor)
                and value.dtype != codes.dtype)):
            raise TypeError(f"{self._label()}: cannot assign a Parameter (or a tensor of another "
                            "dtype than the codes) to `weight` of a quantized layer: its weight "
                            "is the read-only float view of the integer codes `qweight`; tie or "
                            "change weights on the float model, then quantize it")
        buffers = self.__dict__.get("_buffers", {})
        state = (name in buffers and name not in self._non_persistent_buffers_set
                 and (value is None or isinstance(value, torch.Tensor)))
        if state:
            old = buffers[name]
            codes = buffers.get("weight")
            if old is None and name == "bias" and value is not None and codes is not None:
                old = codes.new_empty(codes.shape[:1], device="meta")  # (N,): one per output
            if old is not None and value is not None and value.shape != old.shape:
                raise ValueError(
                    f"{self._label()}: {name} has shape {tuple(old.shape)}; a tensor of shape "
                    f"{tuple(value.shape)} cannot replace it (the kernels read that many "
                    "values); quantize the float model again to change the layer")
        super().__setattr__(name, value)
        if state:  # the kernel caches and prepared calls derive from it: rebuilt at the next call
            self.__dict__.pop("_weight_key", None)
            self.__dict__.pop("_state_names", None)
            if "_plans_enabled" in self.__dict__:
                self._reset_plans(self.__dict__["_plans_enabled"])
        if name in self._PLAN_ATTRS and "_plans_enabled" in self.__dict__:
            self._reset_plans(self.__dict__["_plans_enabled"])

    def _fused_smoothing(self, x: torch.Tensor, smoothing: torch.Tensor) -> torch.Tensor | None:
        """This call with the input smoothing applied by the quantizer rather than by a pass of
        its own (float32 ``x``, not routed, no plan for it), or None where the layer has no
        such path (the wrapper then multiplies first)."""
        return None

    def _make_plan(self, x: torch.Tensor) -> Any:
        """A :class:`lowbit.kernels.plans.Plan` for inputs shaped like ``x`` (float32,
        contiguous, CPU), or None when this layer takes its step-by-step path for them."""
        return None

    def _reset_plans(self, enabled: bool) -> None:
        """Forget the prepared calls; ``enabled``: the layer may build new ones (unless
        ``use_plans`` is False)."""
        self.__dict__["_plans_enabled"] = enabled
        self.__dict__["_plans"] = PlanCache() if enabled and self.use_plans else None

    def _planned(self, plans: dict, x: torch.Tensor,
                 smooth: torch.Tensor | None = None) -> torch.Tensor | None:
        """This call on the layer's prepared C call for ``x.shape``, or None (the body runs).
        ``smooth``: the input smoothing, for a plan that applies it (float32 ``x`` only)."""
        if x.requires_grad or not x.is_cpu or not x.is_contiguous():
            return None
        if x.dtype != torch.float32:  # bfloat16 models: the body computes in float32 too
            if x.dtype != torch.bfloat16 or not self._plans_cast_bf16 or smooth is not None:
                return None
            y = self._planned(plans, x.float())
            return None if y is None else y.to(torch.bfloat16)
        key = (x.shape, torch.get_num_threads(), selected_isa(), load_native(), self._plan_tag,
               None if smooth is None else _weight_key(smooth))
        entry = plans.get(key)
        weight_key = _state_key(self)
        if entry is None:
            # per shape, thread count and kernel library; built only from fresh kernel caches
            # (the body's _input refreshes them after an in-place change of the weight); at
            # most 64 per layer
            if weight_key != self.__dict__.get("_weight_key") or len(plans) >= 64:
                return None
            plan = self._make_plan(x) if smooth is None else self._make_plan(x, smooth)
            entry = plans[key] = (plan or False, weight_key)
        plan, built_for = entry
        if not plan or built_for != weight_key or not _dispatch.native_allowed():
            return None  # (torch.jit tracing never gets here: the forward wrapper refuses it)
        y = plan.alloc(plan.out_shape)
        return self._gelu(y) if plan.run(x.data_ptr(), y.data_ptr()) == 0 else None

    def _weight_shape(self) -> tuple[int, ...]:
        """Shape of the float weight this layer replaced (the codes' shape by default)."""
        return tuple(self._codes_buffer().shape)

    def _float_weight(self, reference: bool = False) -> torch.Tensor:
        """The float32 weight a caller of :attr:`weight` sees: dequantized, input smoothing
        folded back, ``[in, out]`` for GPT-2 ``Conv1D``; ``reference``: pure torch ops."""
        w = self._dequantize_reference() if reference else self.dequantize_weight()
        smoothing = self._buffers.get("input_smoothing")  # y = W' (x * s): W = W' * s
        if smoothing is not None:
            w = w * smoothing.reshape(-1, *[1] * (w.dim() - 2)).to(w.dtype)
        return w.t() if self.meta_extra.get("hf_conv1d") else w

    def dequantize_weight(self) -> torch.Tensor:
        """The float32 weight ``(q - zp) * scale`` (subclasses implement it)."""
        raise NotImplementedError

    def _dequantize_reference(self) -> torch.Tensor:
        """:meth:`dequantize_weight` with pure torch ops (traceable by ``torch.compile``)."""
        return self.dequantize_weight()

    @staticmethod
    def _common(meta: Mapping[str, Any]) -> dict[str, Any]:
        """Constructor kwargs common to every module, read from a :meth:`meta` dict."""
        return {"backend": meta.get("backend", "auto"), "name": meta.get("name", ""),
                "fused_relu": meta.get("fused_relu", False),
                "fused_gelu": meta.get("fused_gelu"), "orig_dtype": meta.get("dtype", "float32"),
                "meta_extra": meta.get("extra")}

    @property
    def fused_gelu(self) -> str | None:
        """The ``approximate`` mode (``"none"`` or ``"tanh"``) of a GELU that runs inside this
        layer, or ``None``. ``lowbit.ptq`` sets it when an ``nn.GELU`` module directly and only
        consumes a quantized Linear's output: the GELU then runs in place on the layer's fresh
        output (same op, same values), which saves one activation-sized tensor and pass.
        """
        return self._fused_gelu

    @fused_gelu.setter
    def fused_gelu(self, value: str | None) -> None:
        if value not in (None, "none", "tanh"):
            raise ValueError(f"{self._label()}: fused_gelu={value!r} must be None, 'none' or "
                             "'tanh' (nn.GELU's approximate argument)")
        if value is not None and self.fused_relu:
            raise ValueError(f"{self._label()}: a layer fuses one activation; it already has "
                             "fused_relu=True")
        self._fused_gelu = value

    def _gelu(self, y: torch.Tensor) -> torch.Tensor:
        """Apply the fused GELU in place on ``y`` (a fresh output tensor of this layer)."""
        if self._fused_gelu is None:
            return y
        return torch.ops.aten.gelu_(y, approximate=self._fused_gelu)

    def _refresh_cache(self) -> None:
        """Rebuild derived (non-persistent) kernel caches from the persistent buffers."""

    def _load_from_state_dict(self, state_dict: Mapping[str, Any], prefix: str, *args: Any,
                              **kwargs: Any) -> None:
        """Load as ``nn.Module`` does, then rebuild the caches; an integer buffer (codes, zero
        points) refuses a tensor of another dtype: ``copy_`` would cast it, so a float model's
        weights loaded with ``strict=False`` silently became truncated codes."""
        error_msgs = args[-1] if args else kwargs["error_msgs"]
        kept = {}
        for name, buf in self._buffers.items():
            incoming = state_dict.get(prefix + name)
            if (buf is None or name in self._non_persistent_buffers_set or buf.is_floating_point()
                    or not isinstance(incoming, torch.Tensor) or incoming.dtype == buf.dtype):
                continue
            kept[name] = (buf, buf.clone())
            error_msgs.append(
                f"{prefix}{name}: {self._label()} holds {buf.dtype} "
                f"{'integers' if 'zero_point' in name else 'codes'} here, the state dict a "
                f"{incoming.dtype} tensor ("
                + ("a float model's weights?" if incoming.is_floating_point() else
                   "a model quantized with another scheme?")
                + "): not loaded. Load float weights into the float model and quantize it "
                "again; load a saved quantized model with lowbit.load")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        for name, (buf, before) in kept.items():  # nn.Module copied (cast) or assigned it
            self._buffers[name] = buf.copy_(before)
        self._refresh_or_defer()

    def _apply(self, fn: Any, recurse: bool = True) -> QuantizedModuleBase:
        """``.to()`` / ``.cuda()`` / ``.half()`` ...: buffers move, then the caches are rebuilt.

        A float dtype change (``model.to(torch.bfloat16)``) becomes the dtype the layer presents
        (``weight.dtype``, which model code casts its inputs to, and an embedding's rows), while
        its stored float tensors (scales, bias, smoothing) stay float32: rounding them to bf16
        would move every output by up to 0.4% of a channel's scale and take the layer off its
        fused kernels. The outputs follow the input's dtype as before.
        """
        target = _float_target(fn, getattr(torch, self.orig_dtype, torch.float32),
                               self._codes_buffer())
        own = {id(t) for t in self._buffers.values() if t is not None and t.is_floating_point()}

        def keep_dtype(t: torch.Tensor) -> torch.Tensor:
            out = fn(t)
            if id(t) in own and isinstance(out, torch.Tensor) and out.dtype != t.dtype:
                return t.to(device=out.device)
            return out

        out = super()._apply(keep_dtype, recurse)
        if target is not None:
            self.orig_dtype = str(target).removeprefix("torch.")
        self._refresh_or_defer(strict=False)  # (to_empty: values not loaded yet)
        return out

    def _refresh_or_defer(self, strict: bool = True) -> None:
        """Rebuild the caches now, or, while the buffers are on the meta device (``.to("meta")``,
        then ``.to_empty(device=...)`` and ``load_state_dict``, as big-model loaders do), at the
        first call: there are no values to derive them from yet. ``strict=False``: values the
        caches refuse (a zero-point out of range: ``to_empty``'s uninitialized memory) are
        refused at the first call instead, unless ``load_state_dict`` replaces them first."""
        if any(t.device.type == "meta" for t in self._buffers.values() if t is not None):
            self.__dict__.pop("_weight_key", None)
            return
        try:
            self._refresh_cache()
        except ValueError:
            if strict:
                raise
            self.__dict__.pop("_weight_key", None)

    def _check_device(self, x: torch.Tensor) -> torch.Tensor | None:
        """The layer's codes (``weight``), after checking that ``x`` is on their device."""
        w = self._buffers.get("weight")
        if w is not None and x.device != w.device:
            raise RuntimeError(f"{self._label()}: input is on {x.device} but the layer's "
                               f"quantized buffers are on {w.device}; move one of them "
                               f"(x.to({str(w.device)!r}) or model.to({str(x.device)!r}))")
        return w

    def _codes_dtype(self) -> torch.dtype:
        """The dtype of the ``weight`` buffer (the integer codes)."""
        return torch.int8

    def _codes_buffer(self) -> torch.Tensor | None:
        """The ``weight`` buffer (the codes), restored first if a loader replaced it with what
        ``layer.weight`` presents (see :meth:`_restore_codes`)."""
        w = self._buffers.get("weight")
        if w is not None and w.is_floating_point():
            w = self._restore_codes(w)
        return w

    def _save_to_state_dict(self, destination: Any, prefix: str, keep_vars: bool) -> None:
        self._codes_buffer()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _restore_codes(self, w: torch.Tensor) -> torch.Tensor:
        """The ``weight`` buffer back as the integer codes after a loader replaced it with
        what ``layer.weight`` presents, as accelerate's hooks (``dispatch_model``,
        ``cpu_offload``, ``disk_offload``) do: they store ``layer.weight.to(device)`` (the
        float view itself, whose codes come back), or, when offloading, load the state dict's
        codes cast to the view's float dtype before every call (an exact cast, undone here).
        Values that are not codes (float weights put there) are refused."""
        dtype = self._codes_dtype()
        codes = getattr(w, "_codes", None)
        if (isinstance(w, DequantizedWeight) and isinstance(codes, torch.Tensor)
                and codes.dtype == dtype and w._label == self._label()):
            self._buffers["weight"] = codes
            return codes
        if w.is_meta and not isinstance(w, DequantizedWeight):  # offloaded: no values yet
            codes = w.to(dtype)
            self._buffers["weight"] = codes
            return codes
        info = torch.iinfo(dtype)
        if isinstance(w, DequantizedWeight) or not (
                w.numel() == 0 or bool(torch.all((w == w.round()) & (w >= info.min)
                                                 & (w <= info.max)))):
            raise RuntimeError(
                f"{self._label()}: its 'weight' buffer was replaced by a {w.dtype} tensor whose "
                f"values are not {dtype} codes (float weights?); load a quantized state dict "
                "with load_state_dict, a saved model with lowbit.load, or quantize the float "
                "model again")
        codes = w.to(dtype)
        self._buffers["weight"] = codes
        return codes

    def _label(self) -> str:
        return f"{self.name or '<unnamed>'} ({type(self).__name__})"

    def _input(self, x: torch.Tensor, expected: int, dim: int = -1) -> torch.Tensor:
        """``x`` checked for ``expected`` features in ``dim``, detached from autograd.

        Quantized modules are inference modules: their buffers are not parameters and rounding
        has no useful gradient, so ``forward`` never records a graph (the in-place kernels
        could not be differentiated). An input that requires grad (under grad mode) never
        gets here: ``forward`` hands it to ``lowbit.qgrad.frozen_forward``, which runs this
        same path inside an autograd Function whose backward uses the dequantized weight. A
        buffer (codes, scales, zero-points, bias, input qparams) changed in place since the last
        call (its version counter moved), or a first call, rebuilds the kernel caches first:
        once, under a lock, with the key published last, so calls from several threads never
        run on half-rebuilt caches.
        """
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._label()}: expected a torch.Tensor input, got "
                            f"{type(x).__name__}")
        if not x.is_floating_point():  # the float layer refuses these too (or works in float)
            raise TypeError(f"{self._label()}: expected a floating-point input (float32, "
                            f"bfloat16, float16 or float64), got {x.dtype}; convert it first, "
                            "e.g. x.float()")
        w = self._check_device(x)
        if w is None or "parametrizations" in self._modules:
            self._refuse_parametrized()
        if x.dim() == 0 or x.shape[dim] != expected:
            raise ValueError(f"{self._label()}: expected input with {expected} features in dim "
                             f"{dim} (in_features={expected}), got shape {tuple(x.shape)}")
        if not w.is_meta:  # (meta: no values to derive caches from)
            self._fresh_caches()
        return x.detach()

    def _refuse_parametrized(self) -> None:
        """A quantized layer's buffers are its integer format: a parametrization (weight_norm,
        a function of ``weight_scale``) would be ignored by the kernels, silently."""
        raise RuntimeError(
            f"{self._label()}: its buffers are parametrized (torch.nn.utils.parametrize, e.g. "
            "weight_norm) or its codes buffer 'weight' was deleted; the quantized kernels read "
            "the plain buffers and would ignore that. Parametrize or change the float model, "
            "then quantize it (lowbit bakes weight_norm / spectral_norm into plain weights)")

    def _fresh_caches(self, codes: str = "weight") -> None:
        """Rebuild the kernel caches if a buffer changed in place since they were built (or on
        a first call): once, under a lock, with the key published last."""
        key = _state_key(self, codes)
        if key != self.__dict__.get("_weight_key"):  # changed in place (or first call):
            with _REFRESH_LOCK:  # the kernel caches derive from it; one thread rebuilds
                if key != self.__dict__.get("_weight_key"):  # (the others wait for it)
                    w = self._buffers[codes]
                    if codes == "weight" and w.is_floating_point():  # replaced by what
                        self._restore_codes(w)  # layer.weight presents
                        key = _state_key(self, codes)
                    self._refresh_cache()
                    self.__dict__["_weight_key"] = key

    def _finite_rows(self, x: torch.Tensor, scheme: str
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``x`` with its rows (dim 0) that hold NaN / Inf zeroed, and the mask of those rows.

        For layers whose activation scale is shared by all rows (static, per-tensor dynamic):
        one bad row must not change the others' outputs, so its values are left out of the
        scale and its output row is set to NaN by :meth:`_nan_rows` (the float layer gives NaN
        or +-Inf there). Warns once per layer. One reduction when every value is finite.
        """
        if x.numel() == 0 or x.device.type == "meta":
            return x, None
        if math.isfinite(self._absmax_or_sum(x)):
            return x, None
        bad = ~torch.isfinite(x.reshape(x.shape[0], -1)).all(dim=1)  # (rows,)
        if not bool(bad.any()):
            return x, None
        if not self.__dict__.get("_warned_nonfinite"):
            self.__dict__["_warned_nonfinite"] = True
            warnings.warn(f"{self._label()}: {int(bad.sum())} of {x.shape[0]} input row(s) "
                          f"hold NaN/Inf; their outputs are NaN, and the other rows are "
                          f"quantized as if those rows were absent ({scheme} activation scale). "
                          "Warned once per layer.", RuntimeWarning, stacklevel=3)
        return x.masked_fill(bad.view(-1, *[1] * (x.dim() - 1)), 0.0), bad

    @staticmethod
    def _absmax_or_sum(x: torch.Tensor) -> float:
        """A float that is finite when every value of ``x`` is: lowbit's C absmax (a NaN or
        Inf wins; about 1 us at batch 1) where it reads ``x``, else the sum (which may also
        overflow: :meth:`_finite_rows` then checks row by row)."""
        if x.dtype in (torch.float32, torch.bfloat16) and x.is_contiguous() and (
                lib := native_lib_for(x)) is not None:
            n = x.numel()
            return lib.lb_absmax(x.data_ptr(), int(x.dtype == torch.bfloat16), 1, n, n, 1)
        return float(x.sum())

    @staticmethod
    def _nan_rows(y: torch.Tensor, bad: torch.Tensor | None) -> torch.Tensor:
        """``y`` with the rows (dim 0) flagged by :meth:`_finite_rows` set to NaN."""
        if bad is not None:
            y[bad] = float("nan")
        return y

    def _shape_meta(self) -> dict[str, Any]:
        raise NotImplementedError

    def kernel_info(self) -> Any:
        """The kernel (or per-M kernel plan) this module runs; JSON-compatible."""
        return "reference"

    def meta(self) -> dict[str, Any]:
        """JSON-compatible description: class, shapes, specs, mode, kernel choice, extras."""
        return {"class": type(self).__name__, **self._shape_meta(), "fused_relu": self.fused_relu,
                "fused_gelu": self.fused_gelu,
                "dtype": self.orig_dtype, "backend": self.backend, "name": self.name,
                "kernel": self.kernel_info(), "extra": dict(self.meta_extra)}

    @staticmethod
    def _act(y: torch.Tensor, relu: bool) -> torch.Tensor:
        return F.relu(y) if relu else y
