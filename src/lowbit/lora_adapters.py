"""LoRA adapters alone: a small safetensors file tied to the quantized base it was trained on.

``save_adapters(model, path)`` writes each :class:`~lowbit.lora.LoRALinear`'s ``lora_A`` /
``lora_B`` (kilobytes to megabytes, where the whole model is hundreds) and, in the safetensors
metadata, JSON with each adapter's settings and a fingerprint of its base (class, shapes, and
a SHA-256 of its integer codes, scales, zero-points and bias). ``load_adapters(qmodel, path)``
puts them back on the same quantized model and refuses any other base by name. No pickle: the
file is tensors plus JSON, checked field by field before use.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch
from torch import nn

from lowbit.lora import LORA_BASES, LoRALinear, mark_only_lora_trainable

__all__ = ["ADAPTER_FORMAT", "base_fingerprint", "load_adapters", "save_adapters"]

#: ``format`` value in the metadata of an adapter file.
ADAPTER_FORMAT = "lowbit-lora-adapters/1"
_DEFAULT_NAME = "adapters.safetensors"


def base_fingerprint(base: nn.Module) -> str:
    """SHA-256 (hex) over a quantized layer's persistent tensors, names, dtypes and shapes.

    Example:
        >>> from lowbit.config import QuantizationConfig
        >>> from lowbit.modules import QuantizedLinear
        >>> fc = nn.Linear(4, 2)
        >>> q = QuantizedLinear.from_float(fc, QuantizationConfig.int8_dynamic())
        >>> base_fingerprint(q) == base_fingerprint(q), len(base_fingerprint(q))
        (True, 64)
    """
    h = hashlib.sha256(type(base).__name__.encode())
    for key, t in sorted(base.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{key}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _file(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    return p / _DEFAULT_NAME if p.is_dir() else p


def _adapters(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def save_adapters(model: nn.Module, path: str | os.PathLike[str]) -> Path:
    """Write the model's LoRA adapters alone (see the module docstring), atomically.

    Args:
        model: a model with :class:`~lowbit.lora.LoRALinear` adapters (``add_lora``).
        path: the file to write (``.safetensors``); an existing folder gets
            ``adapters.safetensors`` inside.

    Returns:
        The path written.

    Raises:
        ValueError: the model has no adapters.

    Example:
        >>> import tempfile
        >>> from lowbit.lora import add_lora
        >>> from lowbit.ptq import quantize_weight_only
        >>> q = quantize_weight_only(nn.Sequential(nn.Linear(64, 32)), bits=4, group_size=32)
        >>> lq = add_lora(q, r=4)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     f = save_adapters(lq, d)
        ...     back = load_adapters(q, f)
        ...     f.name, type(back[0]).__name__, torch.equal(back[0].lora_A, lq[0].lora_A)
        ('adapters.safetensors', 'LoRALinear', True)
    """
    from lowbit.serialization import _atomic_write

    adapters = _adapters(model)
    if not adapters:
        raise ValueError("save_adapters: the model has no LoRA adapters (add them with "
                         "lowbit.add_lora); for a whole quantized model use lowbit.save")
    tensors: dict[str, torch.Tensor] = {}
    entries: dict[str, Any] = {}
    for name, layer in adapters.items():
        prefix = f"{name}." if name else ""
        tensors[prefix + "lora_A"] = layer.lora_A.detach().cpu().contiguous()
        tensors[prefix + "lora_B"] = layer.lora_B.detach().cpu().contiguous()
        base = layer.base
        entries[name] = {"lora": layer.lora_config(),
                         "base": {"class": type(base).__name__,
                                  "in_features": base.in_features,
                                  "out_features": base.out_features,
                                  "fingerprint": base_fingerprint(base)}}
    from lowbit.serialization import tensors_sha256

    metadata = {"format": ADAPTER_FORMAT, "adapters": json.dumps(entries, sort_keys=True),
                "sha256": tensors_sha256(tensors)}  # load_adapters finds damaged tensors
    target = _file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(target, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata))
    return target


def _read(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    where = f"load_adapters: {path}"
    if not path.is_file():
        raise FileNotFoundError(f"{where}: no such file (write one with lowbit.save_adapters)")
    try:
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open API
    except Exception as e:  # a damaged or foreign file
        raise ValueError(f"{where}: not a readable safetensors file ({e})") from e
    if meta.get("format") != ADAPTER_FORMAT:
        raise ValueError(f"{where}: format={meta.get('format')!r:.60}, expected "
                         f"{ADAPTER_FORMAT!r} (a file written by lowbit.save_adapters)")
    try:
        entries = json.loads(meta.get("adapters", ""))
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: the adapter metadata is not valid JSON ({e})") from e
    if not isinstance(entries, dict) or not entries:
        raise ValueError(f"{where}: the adapter metadata lists no adapters")
    from lowbit.serialization import tensors_sha256

    stored = meta.get("sha256")  # files saved before lowbit recorded it have none
    if stored is not None and stored != tensors_sha256(tensors):
        raise ValueError(f"{where}: the adapter tensors are damaged (their SHA-256 differs "
                         "from the one recorded when the file was saved); save them again")
    return entries, tensors


def _check_entry(where: str, entry: Any, a: Any, b: Any) -> None:
    """The stored settings and tensors of one adapter are well-formed and agree."""
    ok = (isinstance(entry, dict) and isinstance(entry.get("lora"), dict)
          and isinstance(entry.get("base"), dict))
    if not ok:
        raise ValueError(f"{where}: damaged entry (needs 'lora' and 'base' objects)")
    r = entry["lora"].get("r")
    n, k = entry["base"].get("out_features"), entry["base"].get("in_features")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in (r, n, k)):
        raise ValueError(f"{where}: r / in_features / out_features must be positive integers, "
                         f"got {r!r:.20} / {k!r:.20} / {n!r:.20}")
    for label, t, shape in (("lora_A", a, (r, k)), ("lora_B", b, (n, r))):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or tuple(t.shape) != shape:
            got = None if t is None else (t.dtype, tuple(t.shape))
            raise ValueError(f"{where}: {label} must be a float tensor of shape {shape}, "
                             f"got {got}")
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{where}: {label} holds NaN/Inf values: the file is damaged, or "
                             "the adapters diverged in training; save them again")


def load_adapters(model: nn.Module, path: str | os.PathLike[str], *,
                  inplace: bool = False) -> nn.Module:
    """Put adapters saved by :func:`save_adapters` back on the quantized model they came from.

    Args:
        model: the quantized model the adapters were trained on, without adapters (they are
            added) or with adapters of the same shapes at the same layers (their weights are
            replaced).
        path: the adapter file (or a folder holding ``adapters.safetensors``).
        inplace: modify ``model`` instead of a deep copy.

    Returns:
        The model with the adapters, only they trainable.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not an adapter file, damaged metadata or tensors, a stored layer that the
            model lacks, or a base that differs from the one the adapters were trained on
            (class, shapes or weights; the message names the layer).

    Example:
        >>> from lowbit.lora import add_lora
        >>> from lowbit.ptq import quantize_dynamic
        >>> import tempfile, os
        >>> q = quantize_dynamic(nn.Sequential(nn.Linear(8, 8)))
        >>> other = quantize_dynamic(nn.Sequential(nn.Linear(8, 8)))  # other weights
        >>> with tempfile.TemporaryDirectory() as d:
        ...     f = save_adapters(add_lora(q, r=2), os.path.join(d, "a.safetensors"))
        ...     load_adapters(other, f)
        Traceback (most recent call last):
        ...
        ValueError: load_adapters: ...: layer '0' (QuantizedLinear 8 -> 8): its weights differ ...
    """
    file = _file(path)
    entries, tensors = _read(file)
    if not inplace:
        report = getattr(model, "lowbit_report", None)
        model = copy.deepcopy(model, {} if report is None else {id(report): report})
    existing = _adapters(model)
    extra = sorted(set(existing) - set(entries))
    if extra:
        raise ValueError(f"load_adapters: {file}: the model has adapters at {extra[:20]} that "
                         "the file does not hold; load onto a model without them")
    modules = dict(model.named_modules())
    # every entry is checked (and its wrapper built) before the model changes: with
    # inplace=True a refused file leaves the model as it was
    plans = [_plan(file, name, entry, tensors, modules) for name, entry in entries.items()]
    for name, target, base, settings, a, b in plans:
        if isinstance(target, LoRALinear):  # same r (checked); the file's scaling and dropout
            target.set_scaling(settings["alpha"], settings.get("dropout", 0.0))
            layer = target
        else:  # (a wrapper turns its base's fused activation off: built only now)
            layer = LoRALinear.from_config(base, settings)
            for n in [n for n, m in model.named_modules(remove_duplicate=False) if m is base]:
                if n:
                    model.set_submodule(n, layer)
            if not name:
                model = layer
        with torch.no_grad():
            layer.lora_A.copy_(a)
            layer.lora_B.copy_(b)
    mark_only_lora_trainable(model)
    return model


def _plan(file: Path, name: str, entry: Any, tensors: Mapping[str, torch.Tensor],
          modules: Mapping[str, nn.Module]
          ) -> tuple[str, nn.Module | None, nn.Module, dict[str, Any], torch.Tensor,
                     torch.Tensor]:
    """One stored adapter checked against the model's layer ``name``, the model unchanged:
    ``(name, the layer there, its quantized base, the file's adapter settings, lora_A,
    lora_B)``."""
    where = f"load_adapters: {file}: layer {name!r}"
    prefix = f"{name}." if name else ""
    a, b = tensors.get(prefix + "lora_A"), tensors.get(prefix + "lora_B")
    _check_entry(where, entry, a, b)
    target = modules.get(name)
    base = target.base if isinstance(target, LoRALinear) else target
    if not isinstance(base, LORA_BASES):
        candidates = sorted(n for n, m in modules.items() if isinstance(m, LORA_BASES))
        raise ValueError(f"{where}: the model has no quantized linear layer there (found "
                         f"{type(target).__name__ if target is not None else 'nothing'}); "
                         f"its quantized linear layers: {candidates[:20]}")
    stored = entry["base"]
    label = f"{where} ({type(base).__name__} {base.in_features} -> {base.out_features})"
    if (stored.get("class"), stored.get("in_features"), stored.get("out_features")) != (
            type(base).__name__, base.in_features, base.out_features):
        raise ValueError(f"{label}: the adapters were trained on a {stored.get('class')!r:.40}"
                         f" {stored.get('in_features')} -> {stored.get('out_features')}; "
                         "load them onto the model they were saved from")
    if stored.get("fingerprint") != base_fingerprint(base):
        raise ValueError(f"{label}: its weights differ from the base the adapters were "
                         "trained on (fingerprint mismatch); load them onto the quantized "
                         "model they were saved from (same float weights and config)")
    if isinstance(target, LoRALinear) and target.r != entry["lora"]["r"]:
        raise ValueError(f"{label}: its adapter has r={target.r}, the file "
                         f"r={entry['lora']['r']}")
    settings = entry["lora"]
    try:
        LoRALinear.check_config(settings)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{where}: cannot rebuild the adapter from {settings!r:.200}: {e}"
                         ) from e
    return name, target, base, settings, a, b
