"""Model traversal: which layers to quantize, how, and which neighbours fuse into them.

* :func:`find_fusions` finds Conv/Linear -> BatchNorm -> ReLU / GELU chains with ``torch.fx``
  when the model traces; when it does not, it falls back to the order of children inside
  ``nn.Sequential`` containers (where registration order is execution order) and to tracing
  each branch-free submodule on its own (most transformers blocks), saying so in ``note``.
* :func:`fold_bn_weights` / :func:`fold_batchnorm` fold an eval-mode BatchNorm into the layer
  before it (exact up to float rounding).
* :func:`plan_layers` resolves the per-layer config (skip lists, overrides, FP32 fallback) and
  refuses bad layers up front, naming them.
"""

from __future__ import annotations

import ast
import difflib
import fnmatch
import functools
import inspect
import logging
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit._qmodule import has_hooks
from lowbit.config import QuantizationConfig, QuantSpec, enclosing_names
from lowbit.dropin import is_depthwise_conv, is_hf_conv1d, is_linear_like, linear_weight
from lowbit.lora_peft import is_peft_adapter, peft_adapter_prefixes
from lowbit.modules import (
    QUANTIZABLE_TYPES,
    check_supported,
    int32_fits_any_codes,
    int32_sums_may_overflow,
)
from lowbit.ops import check_finite, quantize_tensor

__all__ = [
    "QUANTIZABLE_TYPES",
    "WEIGHTED_LAYERS",
    "Fusions",
    "LayerPlan",
    "check_eager_model",
    "find_fusions",
    "fold_batchnorm",
    "fold_bn_weights",
    "fusable_maxpool",
    "gelu_approximate",
    "int32_sum_may_overflow",
    "plan_layers",
]

log = logging.getLogger(__name__)

#: Layers with a weight matrix that BatchNorm folds into, ReLU fuses after, and QAT wraps.
WEIGHTED_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_RELU_FUNCS = (F.relu, torch.relu, torch.relu_)
FUNCTIONAL_RELU = "<functional>"


@dataclass
class Fusions:
    """What fuses into which layer.

    Attributes:
        bn_for: layer name -> name of the BatchNorm that directly and only consumes its output.
        relu_after: layer name -> ReLU module name (or ``"<functional>"``) applied right after
            the layer (or after its BatchNorm).
        relu_uses: ReLU module name -> how many times the forward calls it (a shared ReLU module
            must not be removed).
        gelu_after: Linear layer name -> a GELU module (:func:`gelu_approximate`) called once,
            right after the layer (its output's only user); it becomes ``Identity`` once fused.
        pool_after: layer name -> a non-overlapping ``nn.MaxPool2d`` module (kernel = stride,
            no padding) called once, right after the layer (or its BatchNorm / ReLU).
        method: ``"fx"`` or ``"module_order"``.
        note: why torch.fx could not trace the model, when it could not.
    """

    bn_for: dict[str, str] = field(default_factory=dict)
    relu_after: dict[str, str] = field(default_factory=dict)
    relu_uses: dict[str, int] = field(default_factory=dict)
    gelu_after: dict[str, str] = field(default_factory=dict)
    pool_after: dict[str, str] = field(default_factory=dict)
    method: str = "fx"
    note: str = ""

    def tables(self) -> tuple[dict[str, str], ...]:
        """The layer name -> fused module tables: ``bn_for``, ``relu_after``, ``gelu_after``,
        ``pool_after`` (the dicts themselves, so callers may edit them)."""
        return (self.bn_for, self.relu_after, self.gelu_after, self.pool_after)


@dataclass
class LayerPlan:
    """The decision for one layer.

    Attributes:
        name: qualified module name.
        module_type: class name of the float module.
        config: resolved config, or ``None`` when the layer stays in float.
        status: ``"quantized"``, ``"fp32 (requested)"`` or ``"skipped"``.
        reason: a human-readable why.
        fused_relu: a following ReLU is applied inside the quantized layer.
        folded_bn: name of the BatchNorm folded into this layer.
        fused_pool: name of the MaxPool2d run inside this (INT8 Conv2d) layer.
        fused_gelu: name of the GELU run inside this (quantized Linear) layer.
        shared_with: for a module registered under several names, the first name; this row
            follows that layer's decision and shares its quantized module.
    """

    name: str
    module_type: str
    config: QuantizationConfig | None
    status: str
    reason: str = ""
    fused_relu: bool = False
    folded_bn: str | None = None
    shared_with: str | None = None
    fused_pool: str | None = None
    fused_gelu: str | None = None


def _is_relu_node(node: torch.fx.Node, modules: dict[str, nn.Module]) -> str | None:
    if node.op == "call_module" and isinstance(modules.get(str(node.target)), nn.ReLU):
        return str(node.target)
    if node.op == "call_function" and node.target in _RELU_FUNCS:
        return FUNCTIONAL_RELU
    if node.op == "call_method" and node.target in ("relu", "relu_"):
        return FUNCTIONAL_RELU
    return None


class _Tracer(torch.fx.Tracer):
    """``torch.fx`` tracer that keeps GELU modules and transformers' ``Conv1D`` whole (they are
    not ``torch.nn`` classes, so the default tracer would trace into them); ``shallow`` keeps
    every child whole, so only the root's own forward is traced."""

    def __init__(self, shallow: bool = False) -> None:
        super().__init__()
        self.shallow = shallow

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return (self.shallow or gelu_approximate(m) is not None or is_hf_conv1d(m)
                or super().is_leaf_module(m, module_qualified_name))

    def trace(self, root: nn.Module, *args: Any, **kwargs: Any) -> torch.fx.Graph:
        """Trace ``root``, then undo whatever its forward stored on its modules while tracing:
        an attribute assigned in forward (a cache built on first call) would otherwise hold
        an fx ``Proxy`` and break every later call of the model."""
        saved = [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers),
                  dict(m._modules)) for m in root.modules()]
        try:
            return super().trace(root, *args, **kwargs)
        finally:
            for m, attrs, params, buffers, children in saved:
                m.__dict__.clear()
                m.__dict__.update(attrs)
                for table, content in ((m._parameters, params), (m._buffers, buffers),
                                       (m._modules, children)):
                    table.clear()
                    table.update(content)


#: transformers' activation classes that compute exactly ``F.gelu`` (``self.act(input)``).
_HF_GELUS = ("GELUActivation", "GELUTanh", "PytorchGELUTanh")


def gelu_approximate(module: nn.Module | None) -> str | None:
    """The ``approximate`` mode (``"none"`` / ``"tanh"``) when ``module`` computes exactly
    ``F.gelu(x, approximate=...)``: an ``nn.GELU``, or transformers' ``GELUActivation`` /
    ``GELUTanh`` in their default (C) form; else None. Python-formula GELUs (``gelu_new``,
    ``gelu_python``) round differently, so they never fuse.

    Example:
        >>> gelu_approximate(nn.GELU("tanh")), gelu_approximate(nn.ReLU())
        ('tanh', None)
    """
    if isinstance(module, nn.GELU):
        return module.approximate
    cls = type(module)
    if (cls.__name__ not in _HF_GELUS or not cls.__module__.startswith("transformers.")
            or "forward" in vars(module) or cls.forward.__qualname__ != f"{cls.__name__}.forward"):
        return None
    act = vars(module).get("act")
    if act is F.gelu:
        return "none"
    if (isinstance(act, functools.partial) and act.func is F.gelu and not act.args
            and act.keywords == {"approximate": "tanh"}):
        return "tanh"
    return None


def _fx_fusions(model: nn.Module) -> Fusions:
    return _graph_fusions(_Tracer().trace(model), dict(model.named_modules()))


def _graph_fusions(graph: torch.fx.Graph, modules: dict[str, nn.Module]) -> Fusions:
    """Fusions in one traced graph; ``modules`` maps its ``call_module`` targets."""
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
    fusions = Fusions(method="fx")
    fusions.relu_uses = {k: v for k, v in calls.items() if isinstance(modules.get(k), nn.ReLU)}
    for node in graph.nodes:
        name = str(node.target)
        if node.op != "call_module" or calls[name] != 1:  # called twice: cannot absorb one
            continue
        if is_hf_conv1d(modules.get(name)):  # GPT-2's Linear: a GELU after it fuses
            users = list(node.users)
            if len(users) == 1 and _fusable_gelu(modules[name], users[0], modules, calls):
                fusions.gelu_after[name] = str(users[0].target)
            continue
        if not isinstance(modules.get(name), WEIGHTED_LAYERS):
            continue
        tail = node
        users = list(tail.users)
        if len(users) == 1 and users[0].op == "call_module":
            bn_name = str(users[0].target)
            bn = modules.get(bn_name)
            if isinstance(bn, _BN) and calls.get(bn_name) == 1 and _bn_foldable(bn):
                fusions.bn_for[name] = bn_name
                tail = users[0]
        users = list(tail.users)
        if len(users) == 1:
            relu = _is_relu_node(users[0], modules)
            if relu is not None:
                fusions.relu_after[name] = relu
                tail = users[0]
            elif _fusable_gelu(modules[name], users[0], modules, calls):
                fusions.gelu_after[name] = str(users[0].target)
                continue
        users = list(tail.users)
        if len(users) == 1 and users[0].op == "call_module":
            pool = str(users[0].target)
            if calls.get(pool) == 1 and fusable_maxpool(modules.get(pool)):
                fusions.pool_after[name] = pool
    return fusions


def _fusable_gelu(layer: nn.Module, node: torch.fx.Node, modules: dict[str, nn.Module],
                  calls: dict[str, int]) -> bool:
    """``node`` calls a GELU module once, on a Linear's output (a GELU is not
    idempotent, so unlike ReLU only a module the fusion can replace by ``Identity`` fuses)."""
    return (is_linear_like(layer) and node.op == "call_module"
            and gelu_approximate(modules.get(str(node.target))) is not None
            and calls.get(str(node.target)) == 1 and len(node.args) == 1 and not node.kwargs)


def fusable_maxpool(module: nn.Module | None) -> int:
    """The kernel size of an ``nn.MaxPool2d`` a quantized conv can run itself (square, kernel =
    stride, no padding or dilation, floor, no indices), else 0.

    Example:
        >>> fusable_maxpool(nn.MaxPool2d(2)), fusable_maxpool(nn.MaxPool2d(3, stride=2))
        (2, 0)
    """
    if type(module) is not nn.MaxPool2d:
        return 0
    pair = lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v)  # noqa: E731
    k, s = pair(module.kernel_size), pair(module.stride)
    ok = (k[0] == k[1] == s[0] == s[1] and pair(module.padding) == (0, 0)
          and pair(module.dilation) == (1, 1) and not module.ceil_mode
          and not module.return_indices)
    return int(k[0]) if ok else 0


def _plain_sequential(module: nn.Module) -> bool:
    """``module`` is an ``nn.Sequential`` that runs its children one after another (a subclass
    with a forward of its own may skip, reorder or reuse them: a residual around a ReLU)."""
    return (isinstance(module, nn.Sequential) and "forward" not in vars(module)
            and type(module).forward is nn.Sequential.forward)


def _order_fusions(model: nn.Module, note: str) -> Fusions:
    fusions = Fusions(method="module_order", note=note)
    for parent_name, parent in model.named_modules():
        if not _plain_sequential(parent):  # (other containers: _add_submodule_fusions)
            continue
        children = list(parent.named_children())
        prefix = f"{parent_name}." if parent_name else ""
        for i, (child_name, child) in enumerate(children):
            if not isinstance(child, WEIGHTED_LAYERS):
                continue
            j = i + 1
            if j < len(children) and isinstance(children[j][1], _BN) and _bn_foldable(
                children[j][1]
            ):
                fusions.bn_for[prefix + child_name] = prefix + children[j][0]
                j += 1
            if j < len(children) and isinstance(children[j][1], nn.ReLU):
                relu_name = prefix + children[j][0]
                fusions.relu_after[prefix + child_name] = relu_name
                fusions.relu_uses[relu_name] = 1
                j += 1
            elif (j < len(children) and isinstance(child, nn.Linear)
                  and gelu_approximate(children[j][1]) is not None
                  and _registered_once(model, children[j][1])):
                fusions.gelu_after[prefix + child_name] = prefix + children[j][0]
                continue
            if j < len(children) and fusable_maxpool(children[j][1]) and _registered_once(
                    model, children[j][1]):
                fusions.pool_after[prefix + child_name] = prefix + children[j][0]
    return fusions


def _registered_once(model: nn.Module, module: nn.Module) -> bool:
    """``module`` appears once in the tree (the forward may still call it elsewhere, which
    module-order fusion cannot see; fx-based fusion counts the calls)."""
    return sum(m is module for _, m in model.named_modules(remove_duplicate=False)) == 1


def _bn_foldable(bn: nn.Module) -> bool:
    return bool(getattr(bn, "track_running_stats", False)) and bn.running_mean is not None


def find_fusions(model: nn.Module) -> Fusions:
    """Find BatchNorm and ReLU neighbours that fuse into Conv/Linear layers.

    Uses ``torch.fx.symbolic_trace``; when the model does not trace (data-dependent control
    flow), falls back to child order inside ``nn.Sequential`` containers and records why.

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten())
        >>> f = find_fusions(m)
        >>> f.method, f.bn_for, f.relu_after
        ('fx', {'0': '1'}, {'0': '2'})
    """
    try:
        fusions = _fx_fusions(model)
    except Exception as exc:  # fx raises many types for untraceable code
        note = f"torch.fx could not trace the model ({type(exc).__name__}: {exc}); " \
               "fusions found from nn.Sequential order and in submodules whose own forward " \
               "traces"
        log.info(note)
        fusions = _order_fusions(model, note.splitlines()[0])
        _add_submodule_fusions(model, fusions)
    return _drop_hooked(model, fusions)


def _straight_line(module: nn.Module) -> bool:
    """``module``'s forward has no branch or loop and stores only into local names, so its
    traced graph is all of its dataflow (fx follows one side of an ``if x is None`` test
    silently, and ``self.cache = y`` leaves no node: either could hide another use of an
    output the fusion changes)."""
    return "forward" not in vars(module) and _straight_line_forward(type(module).forward)


@functools.lru_cache(maxsize=256)
def _straight_line_forward(forward: object) -> bool:
    """:func:`_straight_line` for one class's forward (read once per class)."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(forward)))
    except (OSError, TypeError, SyntaxError):
        return False
    flow = (ast.If, ast.IfExp, ast.For, ast.AsyncFor, ast.While, ast.Try, ast.With,
            ast.AsyncWith, ast.Match, ast.comprehension, ast.BoolOp, ast.Lambda, ast.Global,
            ast.Nonlocal, ast.Yield, ast.YieldFrom, ast.NamedExpr, ast.Delete)
    for node in ast.walk(tree):
        if isinstance(node, flow):
            return False
        targets = (node.targets if isinstance(node, ast.Assign) else [node.target]
                   if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else [])
        stores = [n for t in targets for n in ast.walk(t)
                  if isinstance(getattr(n, "ctx", None), ast.Store)]
        if not all(isinstance(n, (ast.Name, ast.Tuple, ast.List, ast.Starred)) for n in stores):
            return False  # self.x = ..., d[k] = ...
    return True


def _add_submodule_fusions(model: nn.Module, fusions: Fusions) -> None:
    """Fusions inside submodules whose own forward traces (most transformers blocks do even
    when the whole model does not, e.g. ``BertIntermediate``: ``dense`` then
    ``intermediate_act_fn``): each submodule with a weighted child and a branch-free forward
    is traced with its children kept whole. A fusion counts only when the layer and what fuses
    into it are registered once in the whole model, so no other forward can call them."""
    taken = {n for t in fusions.tables() for n in t}
    for parent_name, parent in model.named_modules():
        if (parent is model or _plain_sequential(parent)
                or not any(isinstance(c, WEIGHTED_LAYERS) or is_hf_conv1d(c)
                           for c in parent.children())
                or not _straight_line(parent)):
            continue
        try:
            graph = _Tracer(shallow=True).trace(parent)
        except Exception:  # fx raises many types; this submodule keeps its ops
            continue
        local = _graph_fusions(graph, dict(parent.named_modules()))
        prefix = f"{parent_name}." if parent_name else ""
        pairs = list(zip(local.tables(), fusions.tables(), strict=True))
        for layer in {n for t in local.tables() for n in t} - taken:
            fused = [t[layer] for t in local.tables() if layer in t]
            if not all(_registered_once(model, parent.get_submodule(n))
                       for n in (layer, *fused) if n != FUNCTIONAL_RELU):
                continue
            for found, into in pairs:
                if layer in found:
                    value = found[layer]
                    into[prefix + layer] = value if value == FUNCTIONAL_RELU else prefix + value
            relu = local.relu_after.get(layer)
            if relu is not None and relu != FUNCTIONAL_RELU:
                fusions.relu_uses[prefix + relu] = local.relu_uses.get(relu, 0)


def _drop_hooked(model: nn.Module, fusions: Fusions) -> Fusions:
    """No fusion where a user's hook would notice it: a layer with forward (output) hooks
    would see its BN / ReLU / pool / GELU applied, and a hooked BN / ReLU / pool / GELU module
    would be replaced by ``Identity``. All of such a layer's fusions go (a ReLU fused after an
    unfolded BN would be wrong)."""
    modules = dict(model.named_modules())
    tables = fusions.tables()
    for layer in {n for t in tables for n in t}:
        fused = [t[layer] for t in tables if layer in t]
        owner = modules.get(layer)
        if (owner is not None and owner._forward_hooks) or any(
                n in modules and has_hooks(modules[n]) for n in fused):
            for t in tables:
                t.pop(layer, None)
    return fusions


def fold_bn_weights(weight: torch.Tensor, bias: torch.Tensor | None, bn: nn.Module
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """Fold an eval-mode BatchNorm into the preceding layer's weight and bias.

    ``W' = W * g / sqrt(var + eps)`` (per output channel), ``b' = (b - mean) * g / sqrt(var +
    eps) + beta``, with ``g = 1, beta = 0`` for a non-affine BatchNorm. Computed in float64 and
    cast back, so the folded layer equals layer+BN up to float32 rounding.

    Example:
        >>> conv, bn = nn.Conv2d(2, 3, 1), nn.BatchNorm2d(3).eval()
        >>> w, b = fold_bn_weights(conv.weight, conv.bias, bn)
        >>> w.shape, b.shape
        (torch.Size([3, 2, 1, 1]), torch.Size([3]))
    """
    var = bn.running_var.double()
    mean = bn.running_mean.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(var)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(var)
    scale = gamma / torch.sqrt(var + bn.eps)
    b = bias.double() if bias is not None else torch.zeros_like(mean)
    w = weight.double() * scale.reshape(-1, *([1] * (weight.dim() - 1)))
    return w.to(weight.dtype), ((b - mean) * scale + beta).to(weight.dtype)


def fold_batchnorm(model: nn.Module, fusions: Fusions, layers: set[str] | None = None) -> None:
    """Fold each ``fusions.bn_for`` BatchNorm into its layer, in place; the BN becomes Identity.

    Args:
        model: the model to change (a copy, normally).
        fusions: from :func:`find_fusions`.
        layers: fold only for these layer names (default: all).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2)).eval()
        >>> fold_batchnorm(m, find_fusions(m))
        >>> type(m[1]).__name__
        'Identity'
    """
    for name, bn_name in fusions.bn_for.items():
        if layers is not None and name not in layers:
            continue
        layer = model.get_submodule(name)
        bn = model.get_submodule(bn_name)
        with torch.no_grad():
            w, b = fold_bn_weights(layer.weight, layer.bias, bn)
            layer.weight.copy_(w)
            if layer.bias is None:
                layer.bias = nn.Parameter(b)
            else:
                layer.bias.copy_(b)
        model.set_submodule(bn_name, nn.Identity())


def _unsupported_reason(module: nn.Module) -> str | None:
    weights = [p for n, p in module.named_parameters(recurse=False) if p.dim() >= 2]
    if weights and not isinstance(module, QUANTIZABLE_TYPES):
        return f"{type(module).__name__} has no lowbit integer kernel; kept in float"
    return None


#: Weight-only INT4 keeps depthwise convs at INT8 (per channel): with a few weights per output
#: channel, INT4 costs them far more accuracy than other layers (EfficientNet-B0: cosine 0.60).
#: INT8 weight-only: for depthwise convs in INT4 mode, and layers whose INT8 x INT8 sum could
#: overflow int32.
_INT8_WEIGHT_ONLY = QuantizationConfig(weights=QuantSpec.int8_weight(), activations=None,
                                       mode="weight_only")
_DEPTHWISE_NOTE = ("; depthwise conv kept INT8 in INT4 weight-only mode (INT4 costs these "
                   "few-weight channels much accuracy; force INT4 with layer_overrides)")


def int32_sum_may_overflow(module: nn.Module, cfg: QuantizationConfig) -> bool:
    """Whether an INT8 x INT8 layer's int32 accumulator could overflow for some input.

    Each output is ``sum_k (q_k - zp) (w_nk - w_zp_n)``, summed in int32 by every kernel (and
    by ONNX Runtime's and fbgemm's). Its size is at most ``A * max_n sum_k |w_nk - w_zp_n|``,
    ``A`` the widest activation code distance (``|q - zp|``: 128 symmetric 8-bit, 255 affine):
    under 2^31 for every layer of common models (K up to 65,793 without looking at the
    weights); a Linear over a large flattened feature map (K = 140,000 with weights of one
    sign) can pass it and would wrap around silently.

    Example:
        >>> cfg = QuantizationConfig.int8_dynamic()
        >>> big = nn.Linear(140_000, 1)
        >>> _ = nn.init.constant_(big.weight, 1.0)
        >>> int32_sum_may_overflow(nn.Linear(4096, 4096), cfg), int32_sum_may_overflow(big, cfg)
        (False, True)
    """
    if not isinstance(cfg, QuantizationConfig):
        raise TypeError(f"int32_sum_may_overflow(cfg=...) expects a QuantizationConfig, got "
                        f"{type(cfg).__name__}")
    a = cfg.activations
    if a is None or cfg.mode == "weight_only" or not (
            is_linear_like(module) or isinstance(module, nn.Conv1d | nn.Conv2d)):
        return False
    w = linear_weight(module) if is_linear_like(module) else module.weight
    if int32_fits_any_codes(w[0].numel(), a):  # (no need to quantize the weight)
        return False
    w2d = w.detach().reshape(w.shape[0], -1).float()
    try:
        codes, _, zp = quantize_tensor(w2d, cfg.weights, "weight")
    except ValueError:  # (a spec that does not fit this shape: refused later anyway)
        return True
    return int32_sums_may_overflow(codes, zp, a)


def _int4_depthwise(module: nn.Module, cfg: QuantizationConfig) -> bool:
    return cfg.mode == "weight_only" and cfg.weights.bits <= 4 and is_depthwise_conv(module)


def plan_layers(model: nn.Module, config: QuantizationConfig, fallback: set[str] | None = None,
                fusions: Fusions | None = None) -> dict[str, LayerPlan]:
    """Decide, for every quantizable layer, whether and how it is quantized.

    Args:
        model: the float model.
        config: the global config (``skip_layers`` and ``layer_overrides`` apply per layer).
        fallback: names kept in FP32 on request (``Quantizer.set_per_layer_fallback``).
        fusions: from :func:`find_fusions`, to record fused ReLU / folded BN.

    Returns:
        ``{name: LayerPlan}`` in module order, also listing layers with weights that lowbit
        cannot quantize (status ``"skipped"`` with the reason).

    Raises:
        ValueError: a layer to be quantized has NaN/Inf weights (the message names it).

    Example:
        >>> m = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> plan = plan_layers(m, QuantizationConfig(skip_layers=("2",)))
        >>> [(p.name, p.status) for p in plan.values()]
        [('0', 'quantized'), ('2', 'fp32 (requested)')]
    """
    fallback = fallback or set()
    fusions = fusions or Fusions()
    parents = {name: mod for name, mod in model.named_modules()}
    adapters = peft_adapter_prefixes(model)
    plans: dict[str, LayerPlan] = {}
    first_name: dict[int, str] = {}
    names_of: dict[int, list[str]] = {}  # a module reused under several names: all of them
    for name, module in model.named_modules(remove_duplicate=False):
        names_of.setdefault(id(module), []).append(name)
    for name, module in model.named_modules(remove_duplicate=False):
        quantizable = isinstance(module, QUANTIZABLE_TYPES) or is_hf_conv1d(module)
        if not name and not quantizable:
            continue
        if id(module) in first_name:  # the same module object under a second name
            _plan_alias(plans, name, first_name[id(module)])
            continue
        first_name[id(module)] = name
        kind = type(module).__name__
        if is_peft_adapter(name, adapters):  # peft's lora_A / lora_B / modules_to_save
            if quantizable:
                plans[name] = LayerPlan(name, kind, None, "skipped",
                                        "peft adapter: kept in float and trainable")
            continue
        if not quantizable:
            if "parametrizations" in name.split("."):  # torch.nn.utils.parametrize's own
                continue  # modules: the layer they belong to is planned (and baked) instead
            reason = _unsupported_reason(module)
            if reason:
                plans[name] = LayerPlan(name, kind, None, "skipped", reason)
            continue
        parent = parents.get(name.rpartition(".")[0])
        if isinstance(parent, nn.MultiheadAttention):
            plans[name] = LayerPlan(name, kind, None, "skipped",
                                    "inside nn.MultiheadAttention, whose fused kernel reads the "
                                    "float weight directly; kept in float")
            continue
        layer_cfg, why = _rule_for(names_of[id(module)], config, fallback)
        if layer_cfg is None:
            plans[name] = LayerPlan(name, kind, None, "fp32 (requested)", f"kept in FP32 by {why}")
            continue
        note = ""
        if layer_cfg is config and _int4_depthwise(module, layer_cfg):  # no override names it
            layer_cfg, note = _INT8_WEIGHT_ONLY, _DEPTHWISE_NOTE
        reason = check_supported(module, layer_cfg)
        if reason:
            plans[name] = LayerPlan(name, kind, None, "skipped", reason)
            continue
        tensors = (module.named_parameters(recurse=False)
                   if isinstance(module, (nn.RNNBase, nn.RNNCellBase))
                   else [("weight", module.weight), ("bias", getattr(module, "bias", None))])
        for pname, p in tensors:  # (recurrent layers, cells: every gate matrix and bias)
            if p is not None:
                check_finite(p, f"{name} ({kind}).{pname}", name)
        # a following ReLU runs inside the quantized layer (in place on its fresh output), for
        # weight-only layers too; an embedding lookup has no fused activation
        fused_relu = name in fusions.relu_after and not isinstance(module, nn.Embedding)
        if int32_sum_may_overflow(module, layer_cfg):
            k = (linear_weight(module) if is_linear_like(module) else module.weight)[0].numel()
            layer_cfg, note = _INT8_WEIGHT_ONLY, (
                f"; activations kept float: with K={k} and these weights an INT8 x INT8 "
                "int32 sum could overflow")
        scheme = _scheme(layer_cfg, module) + note
        plans[name] = LayerPlan(name, kind, layer_cfg, "quantized", scheme, fused_relu=fused_relu,
                                folded_bn=fusions.bn_for.get(name),
                                fused_gelu=fusions.gelu_after.get(name))
    _warn_unmatched(model, config, fallback)
    return plans


def _rule_for(names: list[str], config: QuantizationConfig, fallback: set[str]
              ) -> tuple[QuantizationConfig | None, str]:
    """The config of one module known by ``names`` (several when the model reuses it) and what
    set it: a fallback, skip or override naming any of its names applies to the module; rules
    that disagree are an error naming them (the module can take only one)."""
    rules: dict[str, tuple[QuantizationConfig | None, str]] = {}
    for n in names:
        if any(scope in fallback for scope in enclosing_names(n)):  # (a container's covers it)
            rules[n] = (None, "set_per_layer_fallback")
        elif config.is_skipped(n):
            rules[n] = (None, "skip_layers")
        elif (cfg := config.config_for(n)) is not config:
            rules[n] = (cfg, "layer_overrides")
    if not rules:
        return config, ""
    chosen = next(iter(rules.values()))
    if any(cfg != chosen[0] for cfg, _ in rules.values()):
        said = "; ".join(f"{n!r}: {'FP32' if c is None else _scheme(c)} ({why})"
                         for n, (c, why) in rules.items())
        raise ValueError(f"{names[0]!r} is one module under the names {names}, and the rules "
                         f"for them differ ({said}); give every name the same rule, or one")
    return chosen


def _warn_unmatched(model: nn.Module, config: QuantizationConfig, fallback: set[str]) -> None:
    """Warn about skip / override / fallback names that match no module: a typo would otherwise
    quantize the layer the user meant to keep, without a word. Names the closest real ones."""
    names = [n for n, _ in model.named_modules(remove_duplicate=False)]  # ("": the root)
    for source, patterns in (("skip_layers", tuple(config.skip_layers)),
                             ("layer_overrides", tuple(config.layer_overrides)),
                             ("set_per_layer_fallback", tuple(sorted(fallback)))):
        for pattern in patterns:
            if any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names):
                continue
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"; the closest layer names are {close}" if close else ""
            warnings.warn(f"{source}: {pattern!r} matches no layer of the model, so it has no "
                          f"effect{hint}", stacklevel=4)


def _plan_alias(plans: dict[str, LayerPlan], alias: str, first: str) -> None:
    """Record a second name of a shared module: it follows (and shares) the first one's fate.

    A shared layer is called from several places, so a ReLU or BatchNorm after one call is not
    fused into it.
    """
    plan = plans.get(first)
    if plan is None:  # not a layer lowbit plans (e.g. a container reused twice)
        return
    plan.fused_relu, plan.folded_bn, plan.fused_gelu = False, None, None
    note = f"same module as {first!r}; shares its "
    note += "quantized module" if plan.status == "quantized" else "decision"
    plans[alias] = LayerPlan(alias, plan.module_type, plan.config, plan.status,
                             f"{note} ({plan.reason})" if plan.reason else note,
                             shared_with=first)


def _scheme(cfg: QuantizationConfig, module: nn.Module | None = None) -> str:
    w = cfg.weights
    wdesc = f"W{w.bits} {w.granularity}" + (f"/{w.group_size}" if w.group_size else "")
    if cfg.activations is None:
        return f"{wdesc}, float activations"
    a = cfg.activations
    how = "run-time" if cfg.mode == "dynamic" else f"calibrated ({cfg.calibrator})"
    granularity = a.granularity
    if cfg.mode == "dynamic" and isinstance(module, nn.Conv1d | nn.Conv2d):
        granularity = "per_tensor"  # a dynamic conv quantizes its whole input with one scale
    return f"{wdesc}, A{a.bits} {granularity} {how}"


def relu_modules_to_remove(fusions: Fusions, fused_layers: set[str]) -> set[str]:
    """ReLU modules that can become Identity because their only call was fused into a layer."""
    out = set()
    for layer, relu in fusions.relu_after.items():
        if layer in fused_layers and relu != FUNCTIONAL_RELU and fusions.relu_uses.get(relu) == 1:
            out.add(relu)
    return out


def disable_fused_fast_paths(model: nn.Module) -> list[str]:
    """Turn off PyTorch's fused inference path of each ``nn.TransformerEncoderLayer`` whose
    ``linear1`` / ``linear2`` / ``self_attn`` lowbit replaced; the names of those layers.

    Under ``no_grad`` / ``inference_mode`` that path (``torch._transformer_encoder_layer_fwd``)
    reads ``linear1.weight`` as a float matrix and never calls the module, so it would fail on
    (or misuse) integer codes. The layer's own ``activation_relu_or_gelu`` flag is what the
    path checks; clearing it makes the layer run its modules one by one (the same maths, the
    quantized kernels included). An ``nn.TransformerEncoder`` over such layers also stops
    converting padded batches to nested tensors (``use_nested_tensor``), which the quantized
    layers do not take.

    Example:
        >>> enc = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
        >>> enc.linear1 = nn.Identity()  # stands for a quantized replacement
        >>> disable_fused_fast_paths(enc), enc.activation_relu_or_gelu
        ([''], 0)
    """
    done = []
    for name, module in model.named_modules():
        if isinstance(module, nn.TransformerEncoderLayer) and not (
                type(module.linear1) is nn.Linear and type(module.linear2) is nn.Linear
                and type(module.self_attn) is nn.MultiheadAttention):
            module.activation_relu_or_gelu = 0
            done.append(name)
    for module in model.modules():  # its nested-tensor path hands nested tensors to the layers
        if (isinstance(module, nn.TransformerEncoder) and len(module.layers)
                and getattr(module.layers[0], "activation_relu_or_gelu", 1) == 0):
            module.use_nested_tensor = False
    return done


def check_eager_model(model: object, caller: str) -> None:
    """Refuse what lowbit cannot quantize before touching it: non-modules, and TorchScript
    (scripted or traced) models, whose layers are compiled code that a quantized module cannot
    replace (lowbit would return them unchanged).

    Example:
        >>> check_eager_model(nn.Linear(2, 2), "quantize")
        >>> check_eager_model(torch.jit.script(nn.Linear(2, 2)), "quantize")
        Traceback (most recent call last):
        ...
        TypeError: quantize: the model is a TorchScript module (RecursiveScriptModule); ...
    """
    if isinstance(model, torch.jit.ScriptModule):
        raise TypeError(f"{caller}: the model is a TorchScript module ({type(model).__name__}); "
                        "quantize the eager nn.Module instead (quantized models deploy with "
                        "torch.export / AOTInductor or lowbit.export_onnx)")
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller}(model=...) expects a torch.nn.Module, got "
                        f"{type(model).__name__}")
    meta = [n or "<model>" for n, t in (*model.named_parameters(), *model.named_buffers())
            if t.device.type == "meta"]
    if meta:
        raise ValueError(f"{caller}: the model has {len(meta)} tensor(s) on the 'meta' device "
                         f"(no values to quantize), e.g. {meta[:3]}; load real weights first "
                         "(e.g. model.to_empty(device='cpu') then load_state_dict, or build it "
                         "outside torch.device('meta'))")
