"""peft interoperability, both ways, without importing peft until asked.

1. **peft on a lowbit model**: peft's LoRA wraps the layers it knows (``nn.Linear``, ...) and
   takes other layers through a config's custom-module mapping. :func:`register_peft` puts
   lowbit's quantized linear layers in that mapping, with
   :class:`~lowbit.lora_peft_layer.LowbitLoraLinear` (a peft ``lora.Linear`` that keeps the
   base integer and merges by re-quantizing)::

       model = peft.get_peft_model(qmodel, lowbit.register_peft(LoraConfig(target_modules=...)))
       model.save_pretrained(path)
       PeftModel.from_pretrained(qmodel2, path, config=lowbit.register_peft(
           LoraConfig.from_pretrained(path)))

2. **lowbit on a peft model**: quantizing a model that already has peft adapters quantizes
   each adapter's ``base_layer`` and leaves the adapters (``lora_A``, ``lora_B``, ...) and
   ``modules_to_save`` in float and trainable: ``lowbit.traverse`` asks
   :func:`peft_adapter_prefixes` which layers those are (duck-typed, no peft import).
"""

from __future__ import annotations

from typing import Any

from torch import nn

__all__ = ["is_peft_adapter", "peft_adapter_prefixes", "register_peft"]


def register_peft(config: Any) -> Any:
    """Let peft put LoRA adapters on lowbit's quantized linear layers (returns ``config``).

    Registers :class:`~lowbit.lora_peft_layer.LowbitLoraLinear` for
    :data:`lowbit.lora.LORA_BASES` in the config's custom-module mapping (peft's
    ``LoraConfig._register_custom_module``). The mapping is not saved with the config: register
    the config again when loading (``PeftModel.from_pretrained(..., config=...)``). peft
    0.21's ``get_peft_model`` needs the model to have at least one parameter (it reads the
    device from it): a model whose every layer is quantized has none; keep one float layer
    (a norm, a head) or set ``model.hf_device_map = {"": "cpu"}`` first.

    Args:
        config: a ``peft.LoraConfig``.

    Returns:
        The same config, registered.

    Raises:
        ImportError: peft is not installed (``pip install lowbit[lora]``).
        TypeError: ``config`` is not a peft ``LoraConfig``.

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> from lowbit.ptq import quantize_weight_only
        >>> model = nn.Sequential(nn.Linear(64, 32), nn.LayerNorm(32))
        >>> q = quantize_weight_only(model, bits=4, group_size=32)
        >>> pm = get_peft_model(q, register_peft(LoraConfig(r=4, target_modules=["0"])))
        >>> type(pm.base_model.model[0]).__name__, pm.base_model.model[0].base_layer.qweight.dtype
        ('LowbitLoraLinear', torch.uint8)
    """
    if not hasattr(config, "_register_custom_module"):
        raise TypeError(f"register_peft: expected a peft LoraConfig, got {type(config).__name__}"
                        " (lowbit needs peft >= 0.21)")
    from lowbit.lora import LORA_BASES
    from lowbit.lora_peft_layer import LowbitLoraLinear

    config._register_custom_module(dict.fromkeys(LORA_BASES, LowbitLoraLinear))
    return config


def _is_tuner_layer(module: nn.Module) -> bool:
    """A peft adapter layer (``BaseTunerLayer``): it has a ``base_layer`` and names its
    adapter sub-layers in ``adapter_layer_names``."""
    return hasattr(module, "adapter_layer_names") and hasattr(module, "base_layer")


def _is_modules_to_save(module: nn.Module) -> bool:
    """peft's ``ModulesToSaveWrapper`` (a trainable float copy of a whole layer)."""
    return hasattr(module, "original_module") and hasattr(module, "modules_to_save")


def peft_adapter_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Qualified names under which peft keeps adapters (to stay float and trainable).

    Example:
        >>> from peft import LoraConfig, get_peft_model
        >>> pm = get_peft_model(nn.Sequential(nn.Linear(8, 8)),
        ...                     LoraConfig(r=2, target_modules=["0"]))
        >>> peft_adapter_prefixes(pm)
        ('base_model.model.0.lora_A', 'base_model.model.0.lora_B', ...)
    """
    prefixes: list[str] = []
    for name, module in model.named_modules():
        dot = f"{name}." if name else ""
        if _is_modules_to_save(module):
            prefixes.append(name)
        elif _is_tuner_layer(module):
            prefixes += [dot + attr for attr in module.adapter_layer_names
                         if isinstance(getattr(module, attr, None), nn.Module)]
    return tuple(prefixes)


def is_peft_adapter(name: str, prefixes: tuple[str, ...]) -> bool:
    """Whether layer ``name`` lies under one of :func:`peft_adapter_prefixes`.

    Example:
        >>> is_peft_adapter("m.q.lora_A.default", ("m.q.lora_A",)), is_peft_adapter("m.q", ())
        (True, False)
    """
    return any(name == p or name.startswith(p + ".") for p in prefixes)
