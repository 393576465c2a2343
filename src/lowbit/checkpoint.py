"""Training checkpoints without pickle: model + optimizer + QAT state in one safetensors file.

Layout of the file written by :func:`save_checkpoint`:

* tensors: ``model/<state_dict key>`` (parameters and buffers, QAT qparams and observer state
  included), ``optimizer/state/<param index>/<key>`` (e.g. Adam's ``exp_avg``, ``step``) and
  ``optimizer/param_groups/<group>/<key>`` for tensor-valued hyper-parameters;
* the safetensors header metadata ``lowbit.checkpoint``: a JSON document with the format
  version, the optimizer class and its non-tensor state (``param_groups``, scalars), the QAT
  config (when the model was prepared by :class:`lowbit.qat.QATPreparer`), the per-step QAT
  statistics, and the caller's ``extra`` dict.

Loading parses only JSON and raw tensors (safetensors), checks the format, the optimizer class
and parameter counts and the QAT config, and refuses mismatches by name. The file is written to
a temporary name and renamed, so a crash never leaves a half-written checkpoint.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit.fake_quantize import FakeQuantize
from lowbit.qat_stats import _node_name, collect_statistics

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

#: Value of the ``format`` field; bumped when the layout changes.
CHECKPOINT_FORMAT = "lowbit.checkpoint/1"
_META_KEY = "lowbit.checkpoint"


def _cpu_tensors(items: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, tensors sharing storage copied (safetensors refuses aliasing)."""
    out, seen = {}, set()
    for key, t in items.items():
        t = t.detach().to("cpu").contiguous()
        ptr = t.untyped_storage().data_ptr()
        if t.numel() and ptr in seen:
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[key] = t
    return out


def _json_value(value: Any, where: str) -> Any:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, where) for v in value]
    if isinstance(value, Mapping):
        return {str(k): _json_value(v, where) for k, v in value.items()}
    raise ValueError(f"save_checkpoint: {where} holds a {type(value).__name__}, which is neither "
                     "a tensor nor JSON data; checkpoints store only tensors and JSON")


def _split_optimizer(optimizer: torch.optim.Optimizer
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    state_json: dict[str, dict[str, Any]] = {}
    for idx, entries in sd["state"].items():
        for key, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/state/{idx}/{key}"] = value
            else:
                state_json.setdefault(str(idx), {})[key] = _json_value(
                    value, f"optimizer state[{idx}][{key!r}]")
    groups = []
    for g, group in enumerate(sd["param_groups"]):
        plain = {}
        for key, value in group.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer/param_groups/{g}/{key}"] = value
            else:
                plain[key] = _json_value(value, f"optimizer param_groups[{g}][{key!r}]")
        groups.append(plain)
    return tensors, {"class": type(optimizer).__name__, "param_groups": groups,
                     "state": state_json, "state_keys": [str(k) for k in sd["state"]]}


def save_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Write model, optimizer and QAT state to one safetensors file (atomic, no pickle).

    Args:
        path: file to write (conventionally ``*.safetensors``).
        model: any ``nn.Module`` (a QAT model's qparams and observer state are buffers, so they
            are part of its ``state_dict``).
        optimizer: an optimizer whose state should resume exactly.
        extra: JSON-compatible data to keep alongside (epoch, step, metrics...).

    Returns:
        The path written.

    Raises:
        ValueError: when the state holds something that is neither a tensor nor JSON data.

    Example:
        >>> import tempfile, pathlib
        >>> model = nn.Linear(3, 2)
        >>> opt = torch.optim.Adam(model.parameters())
        >>> model(torch.ones(1, 3)).sum().backward(); opt.step()
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ckpt.safetensors"
        >>> _ = save_checkpoint(path, model, opt, extra={"epoch": 1})
        >>> load_checkpoint(path, nn.Linear(3, 2), torch.optim.Adam(model.parameters()))
        {'epoch': 1}
    """
    path = Path(path)
    sd = model.state_dict()
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"save_checkpoint: model state {key!r} is a {type(value).__name__} "
                             "(extra state); only tensors can be stored without pickle")
    tensors = {f"model/{k}": v for k, v in sd.items()}
    meta: dict[str, Any] = {"format": CHECKPOINT_FORMAT, "model_class": type(model).__name__,
                            "extra": _json_value(dict(extra or {}), "extra"), "optimizer": None}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _split_optimizer(optimizer)
        tensors.update(opt_tensors)
    qat_config = getattr(model, "lowbit_qat_config_json", None)
    meta["qat_config"] = None if qat_config is None else json.loads(qat_config)
    if any(isinstance(m, FakeQuantize) for m in model.modules()):
        meta["qat_statistics"] = collect_statistics(model).to_dict()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(_cpu_tensors(tensors), tmp, metadata={_META_KEY: json.dumps(meta)})
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open API)
    except Exception as exc:  # safetensors raises its own error types
        raise ValueError(f"load_checkpoint: {path} is not a safetensors file ({exc})") from exc
    if _META_KEY not in header:
        raise ValueError(f"load_checkpoint: {path} has no {_META_KEY!r} metadata; it was not "
                         "written by lowbit.save_checkpoint")
    try:
        meta = json.loads(header[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"load_checkpoint: {path} has corrupt metadata ({exc})") from exc
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"load_checkpoint: {path} has format {meta.get('format')!r}; this "
                         f"lowbit reads {CHECKPOINT_FORMAT!r}")
    return tensors, meta


def _restore_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                       info: Mapping[str, Any], path: Path) -> None:
    if info["class"] != type(optimizer).__name__:
        raise ValueError(f"load_checkpoint: {path} holds {info['class']} state but the optimizer "
                         f"is a {type(optimizer).__name__}; build the same optimizer class")
    current = optimizer.state_dict()["param_groups"]
    saved = info["param_groups"]
    sizes_now, sizes_saved = [len(g["params"]) for g in current], [len(g["params"]) for g in saved]
    if sizes_now != sizes_saved:
        raise ValueError(f"load_checkpoint: the optimizer has parameter groups of sizes "
                         f"{sizes_now} but the checkpoint has {sizes_saved}; build the optimizer "
                         "on qat_model.parameters() of a model prepared the same way")
    state: dict[int, dict[str, Any]] = {int(k): {} for k in info["state_keys"]}
    groups = [dict(g) for g in saved]
    for key, value in tensors.items():
        parts = key.split("/")
        if parts[1] == "state":
            state[int(parts[2])]["/".join(parts[3:])] = value
        else:
            groups[int(parts[2])]["/".join(parts[3:])] = value
    for idx, entries in info["state"].items():
        state[int(idx)].update(entries)
    for group, old in zip(groups, current, strict=True):
        for key, value in old.items():  # restore tuple-typed hyper-parameters (e.g. betas)
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_checkpoint(path: str | Path, model: nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, *,
                    strict: bool = True) -> dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` (no pickle is ever read).

    For a QAT model, prepare a fresh model with the same :class:`~lowbit.qat.QATConfig`, build
    the optimizer on its parameters, then load: outputs match bit for bit and training resumes
    with the same next-step loss.

    Args:
        path: the checkpoint file.
        model: receives the model state (``load_state_dict`` with ``strict``).
        optimizer: receives the optimizer state, when given.
        strict: refuse missing/unexpected model keys.

    Returns:
        The ``extra`` dict given to :func:`save_checkpoint`.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: not a lowbit checkpoint, another format version, a QAT config different
            from the model's, no optimizer state when one is asked for, another optimizer class
            or parameter layout.
        RuntimeError: from ``load_state_dict`` on missing/unexpected/mis-shaped model keys.
    """
    path = Path(path)
    tensors, meta = _read(path)
    saved_cfg, model_cfg = meta.get("qat_config"), getattr(model, "lowbit_qat_config_json", None)
    if saved_cfg is not None and model_cfg is not None and json.loads(model_cfg) != saved_cfg:
        raise ValueError(f"load_checkpoint: {path} was trained with another QATConfig than the "
                         "one this model was prepared with; prepare the model with "
                         "QATConfig.from_dict(<the checkpoint's qat_config>)")
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    model.load_state_dict(model_sd, strict=strict)
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise ValueError(f"load_checkpoint: {path} holds no optimizer state; pass "
                             "optimizer=None or save one with save_checkpoint(..., optimizer)")
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer/")}
        _restore_optimizer(optimizer, opt_tensors, meta["optimizer"], path)
    stats = meta.get("qat_statistics")
    if stats:
        for name, m in model.named_modules():
            node = _node_name(name) or getattr(m, "name", "")
            if isinstance(m, FakeQuantize) and node in stats.get("traces", {}):
                m.load_history(stats["traces"][node])
    return dict(meta.get("extra") or {})
