"""peft's LoRA layer for lowbit's quantized linear layers (imports peft; see ``lora_peft``).

:class:`LowbitLoraLinear` is peft's own ``lora.Linear`` (same parameters, state-dict keys,
adapters, dropout, scaling, multi-adapter and ``save_pretrained`` behaviour) with three changes
for an integer base: the weight is always ``[N, K]`` (``fan_in_fan_out`` does not apply), a
ReLU / GELU fused into the base runs after the LoRA update, and ``merge`` re-quantizes
``W_hat + B @ A * scaling`` into a new base with the base's scheme (``unmerge`` restores the
original base exactly).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from peft.tuners.lora import Linear as PeftLinear
from peft.tuners.tuners_utils import check_adapters_to_merge
from torch import nn

from lowbit.lora_merge import merged_weight, requantize_linear

__all__ = ["LowbitLoraLinear"]

#: peft ``init_lora_weights`` values (prefixes) whose initialization writes the base weight.
_BASE_REWRITING_INITS = ("pissa", "corda", "olora", "loftq", "lora_ga")


class LowbitLoraLinear(PeftLinear):
    """peft ``lora.Linear`` over a lowbit quantized linear layer.

    Built by peft (``get_peft_model`` / ``PeftModel.from_pretrained``) once the config went
    through :func:`lowbit.register_peft`.

    Example:
        >>> from peft import LoraConfig
        >>> from lowbit.config import QuantizationConfig
        >>> from lowbit.modules import QuantizedLinear
        >>> q = QuantizedLinear.from_float(nn.Linear(16, 8), QuantizationConfig.int8_dynamic())
        >>> layer = LowbitLoraLinear(q, "default", config=LoraConfig(r=2), r=2, lora_alpha=4)
        >>> x = torch.randn(3, 16)
        >>> torch.equal(layer(x), q(x)), layer.lora_A["default"].weight.shape
        (True, torch.Size([2, 16]))
    """

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any,
                 **kwargs: Any) -> None:
        with warnings.catch_warnings():  # peft reads in/out_features, then warns anyway
            warnings.filterwarnings("ignore", message="Unsupported layer type")
            super().__init__(base_layer, adapter_name, config=config, **kwargs)
        self.fan_in_fan_out = False  # lowbit stores every weight as [N, K]
        base = self.get_base_layer()
        # act(base(x) + update), not act(base(x)) + update: the wrapper applies it
        self.fused_gelu: str | None = base.fused_gelu
        self.fused_relu = bool(base.fused_relu)
        base.fused_gelu, base.fused_relu = None, False
        self._unmerged_base: nn.Module | None = None

    def update_layer(self, adapter_name: str, r: int, lora_alpha: int, config: Any,
                     **kwargs: Any) -> None:
        """peft's ``update_layer``, refusing the initializations that rewrite the base weight.

        PiSSA, CorDA, OLoRA, LoftQ and LoRA-GA move part of the weight into the adapter by
        assigning ``base_layer.weight.data``: on a lowbit layer ``weight`` is a dequantized
        view, so the assignment changed nothing and the adapter added that part a second time
        (outputs off by ~1 before any training).
        """
        init = getattr(config, "init_lora_weights", True)
        if isinstance(init, str) and init.lower().startswith(_BASE_REWRITING_INITS):
            base = self.get_base_layer()
            name = getattr(base, "name", "") or type(base).__name__
            raise ValueError(
                f"register_peft: init_lora_weights={init!r} rewrites the base weight, which is "
                f"integer on layer {name!r}; initialize the adapters this way on the float model, "
                "then quantize it (its adapters stay float), or use init_lora_weights=True or "
                "'gaussian'")
        super().update_layer(adapter_name, r, lora_alpha, config, **kwargs)

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        if self.fused_gelu is not None:
            return F.gelu(y, approximate=self.fused_gelu)
        return F.relu(y) if self.fused_relu else y

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """peft's ``base(x) + sum of active updates``, then the base's fused activation (a
        merged base runs it itself)."""
        y = super().forward(x, *args, **kwargs)
        return y if self.merged else self._activate(y)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Re-quantize ``W_hat + sum(B @ A * scaling)`` (and a LoRA bias) into a new base (the
        update divided by the base's input smoothing, if any: ``lora_merge.merged_weight``).

        Raises:
            ValueError: the merged weight has NaN/Inf values (``safe_merge`` or not: a broken
                adapter never reaches the integer base), or an adapter is a LoRA variant.
        """
        adapter_names = check_adapters_to_merge(self, adapter_names)
        adapter_names = [a for a in adapter_names if a in self.lora_A]
        if not adapter_names:
            return
        base = self.get_base_layer()
        bias = None if base.bias is None else base.bias.clone()
        with torch.no_grad():
            delta = torch.zeros(base.out_features, base.in_features, device=base.weight.device)
            for adapter in adapter_names:
                if adapter in self.lora_variant:
                    raise ValueError(f"{base.name or 'LowbitLoraLinear'}: adapter {adapter!r} "
                                     "is a LoRA variant; only plain LoRA merges into a "
                                     "quantized base")
                delta = delta + self.get_delta_weight(adapter).float().to(delta.device)
                if self.lora_bias[adapter]:
                    b = self.lora_B[adapter].bias.float() * self.scaling[adapter]
                    bias = b if bias is None else bias + b
            # (an AWQ / SmoothQuant base computes in its smoothed input's space)
            weight = merged_weight(base, delta)
        if not torch.isfinite(weight).all():
            raise ValueError(f"{base.name or 'LowbitLoraLinear'}: NaN/Inf in the merged weight; "
                             f"the adapter(s) {adapter_names} are broken")
        new = requantize_linear(base, weight, bias)
        new.fused_relu, new.fused_gelu = self.fused_relu, self.fused_gelu
        if self._unmerged_base is None:
            self._unmerged_base = base
        self.base_layer = new
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        """Put the original quantized base back (exactly: no second rounding)."""
        if self._unmerged_base is not None:
            self.base_layer = self._unmerged_base
            self._unmerged_base = None
        self.merged_adapters.clear()

    def unload_and_optionally_merge_module(self, merge: bool, safe_merge: bool,
                                           adapter_names: list[str] | None) -> nn.Module:
        """What peft's ``merge_and_unload`` / ``unload`` put in this layer's place: the merged
        base, or the original base with its fused activation back."""
        if merge:
            self.merge(safe_merge=safe_merge, adapter_names=adapter_names)
        base = self.get_base_layer()
        if not self.merged:
            base.fused_relu, base.fused_gelu = self.fused_relu, self.fused_gelu
        return base

    def __repr__(self) -> str:
        return "lowbit." + super().__repr__()
