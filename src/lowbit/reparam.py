"""What lowbit does to its copy of a model before planning: copy it (also with hook-based
``weight_norm`` / ``spectral_norm`` / pruning, whose computed weight deepcopy refuses) and fold
weight reparametrizations into plain weights (a recomputed weight would undo a BatchNorm fold,
and a reparametrization's hook reads parameters the quantized layer does not have)."""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

__all__ = ["SharedCopy", "bake_reparametrizations", "copy_model", "is_reparametrized",
           "weight_mask"]


def _module(model: Any, caller: str) -> nn.Module:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{caller} expects a torch.nn.Module, got {type(model).__name__}")
    return model


def _hooked_reparametrizations(module: nn.Module) -> list[tuple[Any, str]]:
    """The hook-based reparametrizations of ``module``: ``weight_norm``, ``spectral_norm`` and
    ``torch.nn.utils.prune`` (a mask), as ``(hook object, name of the tensor it computes)``."""
    from torch.nn.utils.prune import BasePruningMethod
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    found = []
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm | SpectralNorm):
            found.append((hook, hook.name))
        elif isinstance(hook, BasePruningMethod):
            found.append((hook, hook._tensor_name))
    return found


def _remove_hooked(module: nn.Module, hook: Any, name: str) -> None:
    """Make the hook's tensor a plain parameter again (its current value, mask applied)."""
    from torch.nn.utils import prune
    from torch.nn.utils.weight_norm import WeightNorm

    if isinstance(hook, WeightNorm):
        nn.utils.remove_weight_norm(module, name)
    elif isinstance(hook, prune.BasePruningMethod):
        prune.remove(module, name)
    else:
        nn.utils.remove_spectral_norm(module, name)


def weight_mask(module: nn.Module) -> torch.Tensor | None:
    """The ``torch.nn.utils.prune`` mask of ``module.weight`` (a copy), or None: QAT keeps
    applying it after the weight is baked, so pruned weights stay zero while training.

    Example:
        >>> from torch.nn.utils import prune
        >>> m = prune.l1_unstructured(nn.Linear(4, 2), "weight", amount=0.5)
        >>> int(weight_mask(m).sum()), weight_mask(nn.Linear(4, 2))
        (4, None)
    """
    for _hook, name in _hooked_reparametrizations(_module(module, "weight_mask")):
        mask = getattr(module, f"{name}_mask", None)
        if name == "weight" and isinstance(mask, torch.Tensor):
            return mask.detach().clone()
    return None


def copy_model(model: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(model, memo)`` that also copies models with hook-based
    ``torch.nn.utils.weight_norm`` / ``spectral_norm`` / ``prune`` layers: their ``weight`` is a
    tensor computed with autograd history, which deepcopy refuses (the hook recomputes it on the
    next call); the copy gets it detached.

    Example:
        >>> m = nn.utils.weight_norm(nn.Linear(2, 2))
        >>> type(copy_model(m)).__name__
        'Linear'
    """
    memo = {} if memo is None else memo
    for module in _module(model, "copy_model").modules():
        for _hook, name in _hooked_reparametrizations(module):
            t = getattr(module, name, None)
            if isinstance(t, torch.Tensor) and not t.is_leaf:
                memo[id(t)] = t.detach().clone()
    return copy.deepcopy(model, memo)


def is_reparametrized(module: nn.Module) -> bool:
    """Whether ``module`` has a weight reparametrization (``torch.nn.utils.parametrize``, or a
    hook-based ``weight_norm`` / ``spectral_norm`` / ``prune``) of its own.

    Example:
        >>> is_reparametrized(nn.utils.weight_norm(nn.Linear(2, 2))), is_reparametrized(
        ...     nn.Linear(2, 2))
        (True, False)
    """
    from torch.nn.utils import parametrize

    return parametrize.is_parametrized(module) or bool(_hooked_reparametrizations(module))


class SharedCopy:
    """A copy of a model whose parameters are, at first, the original's own tensors.

    Quantizing (or converting a QAT model) into a copy used to hold the float weights twice
    (the user's model and the copy) until each layer was converted: 2x the model's memory at
    the peak. ``memo``: more ``copy.deepcopy`` memo entries (objects to share). Here the copy's
    modules are new objects but its parameters are shared; :meth:`unshare` gives modules their
    own copies before anything may write to them (a BatchNorm fold, GPTQ, a layer that stays
    float in the result), so the user's model is never changed and the float weights of
    layers that are only read and converted are never copied. Tied parameters stay tied.

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
        >>> c = SharedCopy(m)
        >>> c.model[0].weight is m[0].weight, c.model[0] is m[0]
        (True, False)
        >>> c.unshare([c.model[1]]); c.model[1].weight is m[1].weight
        False
        >>> c.shared_parameters(c.model)
        ['0.weight', '0.bias']
    """

    def __init__(self, model: nn.Module, memo: dict[int, Any] | None = None) -> None:
        params = {id(p): p for p in _module(model, "SharedCopy").parameters()}
        self._original = set(params)
        self.model = copy_model(model, {**(memo or {}), **params})
        self._fresh: dict[int, nn.Parameter] = {}

    def unshare(self, modules: Iterable[nn.Module]) -> None:
        """Give ``modules`` their own copies of the original's parameters they hold."""
        for module in modules:
            for key, p in list(module._parameters.items()):
                if p is None or id(p) not in self._original:
                    continue
                new = self._fresh.get(id(p))
                if new is None:  # (as the deepcopy would have: attributes, grad kept)
                    new = self._fresh[id(p)] = copy.deepcopy(p)
                module._parameters[key] = new

    def shared_parameters(self, root: nn.Module) -> list[str]:
        """Names of ``root``'s parameters that are still the original's tensors."""
        return [name for name, p in root.named_parameters(remove_duplicate=False)
                if id(p) in self._original]


def bake_reparametrizations(model: nn.Module, names: Iterable[str] | None = None) -> list[str]:
    """Fold weight reparametrizations into plain weights, in place (on lowbit's copy): the
    ``torch.nn.utils.parametrize`` ones (``parametrizations.weight_norm`` / ``spectral_norm``
    / ``orthogonal``...), the hook-based ``weight_norm`` / ``spectral_norm``, and
    ``torch.nn.utils.prune`` masks (the pruned zeros stay zeros).

    lowbit replaces the layers (their hooks would recompute ``weight`` from parameters the
    quantized layer does not have) and folds BatchNorm into ``weight`` (a reparametrized
    weight is recomputed on each access: the fold would be lost, silently). The baked weight
    is the one the float model computes now (in eval mode: its inference weight).

    Args:
        model: the model to change.
        names: bake only these modules (the layers being quantized: the others keep their
            reparametrization, and their state-dict keys match the user's float model).

    Returns:
        The names of the modules changed.

    Example:
        >>> m = nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(3, 2))).eval()
        >>> w = m[0].weight.detach().clone()
        >>> bake_reparametrizations(m), type(m[0]).__name__, torch.equal(m[0].weight, w)
        (['0'], 'Linear', True)
    """
    from torch.nn.utils import parametrize

    modules = dict(_module(model, "bake_reparametrizations").named_modules(remove_duplicate=False))
    wanted = None if names is None else set(names)
    unknown = sorted(wanted - set(modules)) if wanted is not None else []
    if unknown:
        raise ValueError(f"bake_reparametrizations: no module named {unknown} in the model; "
                         "pass names from model.named_modules()")
    changed = []
    for name, module in modules.items():
        if wanted is not None and name not in wanted:
            continue
        hooks = _hooked_reparametrizations(module)
        for hook, tensor_name in hooks:
            _remove_hooked(module, hook, tensor_name)
        parametrized = parametrize.is_parametrized(module)
        if parametrized:  # (not parametrize.remove_parametrizations: it edits the generated
            # class, which a deepcopy shares with the user's model)
            values = {t: getattr(module, t).detach().clone()
                      for t in module.parametrizations}  # type: ignore[union-attr]
            module.__class__ = type(module).__bases__[0]  # the layer's own class
            del module._modules["parametrizations"]
            for tensor, value in values.items():
                module.register_parameter(tensor, nn.Parameter(value))
        if hooks or parametrized:
            changed.append(name)
    return changed
