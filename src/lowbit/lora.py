"""QLoRA-style adapters on quantized linear layers: frozen integer base, trainable float LoRA.

``add_lora(qmodel)`` wraps quantized linear layers (:class:`~lowbit.modules.QuantizedLinear`,
:class:`~lowbit.modules.Int4Linear`, :class:`~lowbit.modules.Int8WeightOnlyLinear`) in
:class:`LoRALinear`::

    y = base(x) + dropout(x) @ lora_A.T @ lora_B.T * (alpha / r)

The base keeps its integer codes and runs its integer kernel; every quantized layer (with or
without an adapter) passes the gradient to its input through its dequantized weight
(:mod:`lowbit.qgrad`, as QLoRA does), so adapters train wherever they sit. ``lora_B`` starts at
zero: a fresh adapter does not change the model's output. :func:`lowbit.merge_lora` folds
adapters into their base; :func:`lowbit.save_adapters` / :func:`lowbit.load_adapters` store
the adapters alone.
``lowbit.save`` / ``lowbit.load`` record the adapter configuration and rebuild the wrappers.
"""

from __future__ import annotations

import copy
import fnmatch
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from lowbit.config import real_number, whole_number
from lowbit.modules import Int4Linear, Int8WeightOnlyLinear, QuantizedLinear

__all__ = ["LORA_BASES", "LoRALinear", "add_lora", "lora_parameters", "mark_only_lora_trainable"]

#: Quantized layers :class:`LoRALinear` can wrap.
LORA_BASES: tuple[type[nn.Module], ...] = (QuantizedLinear, Int4Linear, Int8WeightOnlyLinear)


class LoRALinear(nn.Module):
    """A frozen quantized linear layer plus a trainable low-rank float update.

    Args:
        base: a quantized linear layer (one of :data:`LORA_BASES`). Its buffers stay integer;
            a ReLU or GELU fused into it moves to the wrapper (applied after the LoRA update).
        r: rank of the update (>= 1).
        alpha: scaling numerator: the update is multiplied by ``alpha / r``.
        dropout: dropout probability on the adapter's input (0: none).

    Attributes:
        lora_A: ``(r, in_features)`` parameter, Kaiming-uniform initialised.
        lora_B: ``(out_features, r)`` parameter, zeros.
        scaling: ``alpha / r``.

    Raises:
        TypeError: ``base`` is not a quantized linear layer.
        ValueError: ``r < 1`` or ``dropout`` outside [0, 1).

    Example:
        >>> from lowbit.config import QuantizationConfig
        >>> fc = nn.Linear(16, 8)
        >>> base = Int4Linear.from_float(fc, QuantizationConfig.int4_weight_only(group_size=16))
        >>> layer = LoRALinear(base, r=4, alpha=8)
        >>> x = torch.randn(2, 16)
        >>> torch.equal(layer(x), base(x)), layer.scaling  # lora_B starts at zero
        (True, 2.0)
        >>> layer(x).sum().backward()
        >>> layer.lora_A.grad is not None, base.qweight.dtype, layer.weight.dtype
        (True, torch.uint8, torch.float32)
    """

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, LORA_BASES):
            raise TypeError(f"LoRALinear wraps {[c.__name__ for c in LORA_BASES]}, got "
                            f"{type(base).__name__}")
        r = _rank(r)
        self.in_features: int = base.in_features  # type: ignore[assignment]
        self.out_features: int = base.out_features  # type: ignore[assignment]
        self.r = int(r)
        self.set_scaling(alpha, dropout)
        self.fused_relu = bool(base.fused_relu)
        self.fused_gelu: str | None = base.fused_gelu
        base.fused_relu, base.fused_gelu = False, None  # act(base + update), not act(base) + ...
        self.base = base
        self.lora_A = nn.Parameter(torch.empty(self.r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def set_scaling(self, alpha: float, dropout: float) -> None:
        """Set ``alpha`` (the update is scaled by ``alpha / r``) and the adapter's input
        dropout, in the layer's train / eval mode.

        Example:
            >>> from lowbit.config import QuantizationConfig
            >>> q = QuantizedLinear.from_float(nn.Linear(4, 2), QuantizationConfig.int8_dynamic())
            >>> layer = LoRALinear(q, r=2, alpha=4)
            >>> layer.set_scaling(8, 0.1); layer.scaling, type(layer.lora_dropout).__name__
            (4.0, 'Dropout')
        """
        self.alpha, self.dropout_p = _scaling(alpha, dropout)
        self.scaling = self.alpha / self.r
        self.lora_dropout = (nn.Dropout(self.dropout_p) if self.dropout_p else
                             nn.Identity()).train(self.training)

    @property
    def weight(self) -> torch.Tensor:
        """The base layer's float view of its weight (the LoRA update not included), for model
        code that reads ``layer.weight.dtype``; see :mod:`lowbit.dropin`."""
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias."""
        return self.base.bias

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """``base(x) + dropout(x) @ A.T @ B.T * scaling`` (then the ReLU / GELU fused into the
        base, if any); ``input`` is named as nn.Linear's, so ``layer(input=x)`` works too."""
        x = input
        y = self.base(x)  # differentiable w.r.t. x when x requires grad (lowbit.qgrad)
        update = self.lora_dropout(x).to(self.lora_A.dtype) @ self.lora_A.T @ self.lora_B.T
        y = y + (update * self.scaling).to(y.dtype)
        if self.fused_gelu is not None:
            return F.gelu(y, approximate=self.fused_gelu)
        return F.threshold(y, 0.0, 0.0) if self.fused_relu else y  # an in-place op may follow

    def lora_config(self) -> dict[str, Any]:
        """JSON-compatible adapter settings (what ``lowbit.save`` records).

        Example:
            >>> from lowbit.config import QuantizationConfig
            >>> q = QuantizedLinear.from_float(nn.Linear(4, 2), QuantizationConfig.int8_dynamic())
            >>> LoRALinear(q, r=2, alpha=4).lora_config()
            {'r': 2, 'alpha': 4.0, 'dropout': 0.0, 'fused_relu': False}
        """
        cfg = {"r": self.r, "alpha": self.alpha, "dropout": self.dropout_p,
               "fused_relu": self.fused_relu}
        return cfg if self.fused_gelu is None else {**cfg, "fused_gelu": self.fused_gelu}

    @classmethod
    def from_config(cls, base: nn.Module, config: dict[str, Any]) -> LoRALinear:
        """Rebuild a wrapper from :meth:`lora_config` (adapter weights come from a state dict).

        Example:
            >>> from lowbit.config import QuantizationConfig
            >>> q = QuantizedLinear.from_float(nn.Linear(4, 2), QuantizationConfig.int8_dynamic())
            >>> cfg = {"r": 2, "alpha": 4.0, "dropout": 0.0, "fused_relu": True}
            >>> LoRALinear.from_config(q, cfg).lora_config() == cfg
            True
        """
        cls.check_config(config)  # before the wrapper turns its base's fused activation off
        layer = cls(base, r=config["r"], alpha=config["alpha"],
                    dropout=config.get("dropout", 0.0))
        layer.fused_relu = bool(config.get("fused_relu", False)) or layer.fused_relu
        layer.fused_gelu = config.get("fused_gelu") or layer.fused_gelu
        return layer

    @staticmethod
    def check_config(config: Mapping[str, Any]) -> None:
        """Refuse settings :meth:`from_config` cannot build a wrapper from, without building
        one (a wrapper turns its base's fused activation off: a refusal after that would leave
        the base changed).

        Raises:
            KeyError: ``r`` or ``alpha`` is missing.
            ValueError: a setting out of range, naming it.

        Example:
            >>> LoRALinear.check_config({"r": 2, "alpha": 4.0, "fused_gelu": "erf"})
            Traceback (most recent call last):
            ...
            ValueError: LoRALinear: fused_gelu='erf' must be None, 'none' or 'tanh' ...
        """
        _rank(config["r"])
        _scaling(config["alpha"], config.get("dropout", 0.0))
        gelu = config.get("fused_gelu")
        if gelu not in (None, "none", "tanh"):
            raise ValueError(f"LoRALinear: fused_gelu={gelu!r} must be None, 'none' or 'tanh' "
                             "(nn.GELU's approximate); the config is damaged")

    def extra_repr(self) -> str:
        return (f"r={self.r}, alpha={self.alpha:g}, scaling={self.scaling:g}, "
                f"dropout={self.dropout_p:g}, fused_relu={self.fused_relu}"
                + ("" if self.fused_gelu is None else f", fused_gelu={self.fused_gelu!r}"))


def _rank(r: Any) -> int:
    r = whole_number(r, "LoRALinear: r", "the adapters' rank, e.g. 8")
    if r < 1:
        raise ValueError(f"LoRALinear: r={r!r} must be a positive integer")
    return r


def _scaling(alpha: Any, dropout: Any) -> tuple[float, float]:
    """``(alpha, dropout)`` as floats, or a ValueError naming the bad one (a NaN / Inf alpha
    makes every output NaN, even with lora_B zero)."""
    alpha = real_number(alpha, "LoRALinear: alpha",
                        "the update is scaled by alpha / r; lowbit's default is 16")
    if not 0.0 <= real_number(dropout, "LoRALinear: dropout", "it must be in [0, 1)") < 1.0:
        raise ValueError(f"LoRALinear: dropout={dropout!r} must be in [0, 1)")
    return alpha, float(dropout)


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The ``lora_A`` / ``lora_B`` parameters of every :class:`LoRALinear` (for the optimizer).

    Example:
        >>> len(lora_parameters(nn.Linear(2, 2)))
        0
    """
    return [p for m in model.modules() if isinstance(m, LoRALinear)
            for p in (m.lora_A, m.lora_B)]


def mark_only_lora_trainable(model: nn.Module) -> None:
    """Freeze every parameter except the LoRA adapters (``requires_grad``), in place.

    Example:
        >>> m = nn.Linear(2, 2); mark_only_lora_trainable(m); m.weight.requires_grad
        False
    """
    adapters = {id(p) for p in lora_parameters(model)}
    for p in model.parameters():
        p.requires_grad_(id(p) in adapters)


def add_lora(qmodel: nn.Module, r: int = 8, alpha: float = 16.0,
             target_modules: Sequence[str] = ("*",), dropout: float = 0.0, *,
             inplace: bool = False) -> nn.Module:
    """Wrap a quantized model's linear layers in :class:`LoRALinear` adapters (QLoRA style).

    Every other parameter (e.g. layers kept in FP32) is frozen, so only the adapters train.

    Args:
        qmodel: a model quantized by lowbit (a quantized linear layer on its own works too).
        r: adapter rank.
        alpha: scaling numerator (the adapter output is scaled by ``alpha / r``).
        target_modules: glob patterns (``fnmatch``) over qualified layer names; a quantized
            linear layer matching any of them gets an adapter (one adapter for a layer shared
            under several names).
        dropout: dropout probability on the adapter's input.
        inplace: modify ``qmodel`` instead of a deep copy.

    Returns:
        The model with adapters (``qmodel`` itself when ``inplace``).

    Raises:
        ValueError: no quantized linear layer matches ``target_modules`` (the message lists
            them), or the model already has adapters.

    Example:
        >>> from lowbit.ptq import quantize_weight_only
        >>> q = quantize_weight_only(nn.Sequential(nn.Linear(64, 32), nn.ReLU(),
        ...                                        nn.Linear(32, 4)), bits=4, group_size=32)
        >>> lq = add_lora(q, r=4, target_modules=["0"])
        >>> type(lq[0]).__name__, type(lq[2]).__name__, type(q[0]).__name__
        ('LoRALinear', 'Int4Linear', 'Int4Linear')
        >>> [n for n, p in lq.named_parameters() if p.requires_grad]
        ['0.lora_A', '0.lora_B']
    """
    if any(isinstance(m, LoRALinear) for m in qmodel.modules()):
        raise ValueError("add_lora: the model already has LoRA adapters")
    if inplace:
        model = qmodel
    else:  # the attached report holds immutable configs: share it
        report = getattr(qmodel, "lowbit_report", None)
        model = copy.deepcopy(qmodel, {} if report is None else {id(report): report})
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    named = [(n, m) for n, m in model.named_modules(remove_duplicate=False)
             if isinstance(m, LORA_BASES)]
    chosen = {id(m) for n, m in named if any(fnmatch.fnmatchcase(n, p) for p in patterns)}
    if not chosen:
        qat = any(type(m).__name__ == "QATLayer" for m in model.modules())
        candidates = [n for n, _ in named] or (
            "none: the model is prepared for QAT (fake-quantized float layers); convert it "
            "first (lowbit.convert_qat), then add adapters to its integer layers" if qat
            else "none (quantize it first)")
        raise ValueError(f"add_lora: no quantized linear layer matches target_modules="
                         f"{patterns}; candidates: {candidates}")
    wrappers: dict[int, LoRALinear] = {}  # a layer used under several names gets one adapter
    for name, module in named:
        if id(module) in chosen:
            if id(module) not in wrappers:  # (in the layer's mode: an eval model stays eval)
                wrappers[id(module)] = LoRALinear(module, r, alpha, dropout).train(
                    module.training)
            if name:
                model.set_submodule(name, wrappers[id(module)])
            else:  # the model itself is a quantized linear layer
                model = wrappers[id(module)]
    mark_only_lora_trainable(model)
    return model
