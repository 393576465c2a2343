"""Training checkpoints without pickle: model + optimizer + QAT state in one safetensors file.

Layout of the file written by :func:`save_checkpoint`:

* tensors: ``model/<state_dict key>`` (parameters and buffers, QAT qparams and observer state
  included), ``optimizer/state/<param index>/<key>`` (e.g. Adam's ``exp_avg``, ``step``) and
  ``optimizer/param_groups/<group>/<key>`` for tensor-valued hyper-parameters;
* the safetensors header metadata ``lowbit.checkpoint``: a JSON document with the format
  version, the optimizer class and its non-tensor state (``param_groups``, scalars), the QAT
  config (when the model was prepared by :class:`lowbit.qat.QATPreparer`), the per-step QAT
  statistics, and the caller's ``extra`` dict.

The metadata also holds a SHA-256 over itself and every tensor (name, dtype, shape, bytes), so
a flipped byte anywhere is caught at load. Loading parses only JSON and raw tensors
(safetensors), verifies the checksum, and checks the format, the QAT config, the model's keys
and shapes, the optimizer class, parameter groups and per-parameter state, and the QAT
statistics, all before it writes anything into the model or the optimizer: a refused checkpoint
leaves both as they were. The file is written to a temporary name and renamed (see
:func:`lowbit.serialization.clean_stale_temporaries`), so a crash never leaves a half-written
checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from lowbit._qmodule import QuantizedModuleBase
from lowbit.fake_quantize import FakeQuantize
from lowbit.qat_stats import _node_name, collect_statistics
from lowbit.serialization import LoadError, _atomic_write, header_length, tensors_sha256

__all__ = ["CHECKPOINT_FORMAT", "load_checkpoint", "save_checkpoint"]

#: Value of the ``format`` field; bumped when the layout changes (2: SHA-256 ``checksum``).
CHECKPOINT_FORMAT = "lowbit.checkpoint/2"
_UNCHECKED_FORMAT = "lowbit.checkpoint/1"  # still read, with a warning: no checksum to verify
_META_KEY = "lowbit.checkpoint"
#: Optimizer state entries shaped like their parameter (Adam, AdamW, SGD, RMSprop, Adagrad,
#: Adadelta, Adamax, NAdam, RAdam, ASGD, Rprop); a mismatch would only fail at the next step.
_PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "momentum_buffer", "sum",
                 "square_avg", "grad_avg", "acc_delta", "exp_inf", "ax", "prev", "step_size")


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


def _checksum(meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the metadata (without its ``checksum``) and every tensor."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256((text + tensors_sha256(tensors)).encode()).hexdigest()


def _qat_configs(model: nn.Module) -> dict[str, Any]:
    """``{name: QATConfig dict}`` of every QAT model in ``model`` (itself: ``""``), named as
    the checkpoint's state dict names it (a ``DistributedDataParallel`` wrapper's ``module.``
    prefix dropped, as ``state_dict`` consumers do)."""
    out = {}
    for name, module in model.named_modules():
        text = getattr(module, "lowbit_qat_config_json", None)
        if isinstance(text, str):
            out[name.removeprefix("module.") if name != "module" else ""] = json.loads(text)
    return out


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
    meta["qat_configs"] = _qat_configs(model)  # (also of QAT models inside a wrapper / DDP)
    if any(isinstance(m, FakeQuantize) for m in model.modules()):
        meta["qat_statistics"] = collect_statistics(model).to_dict()
    tensors = _cpu_tensors(tensors)
    meta["checksum"] = _checksum(meta, tensors)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(meta)
    _atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={_META_KEY: text}))
    return path


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors and metadata of a checkpoint, its header size checked before anything is read
    and its checksum verified."""
    if not path.is_file():
        raise FileNotFoundError(f"load_checkpoint: {path} does not exist")
    try:
        with open(path, "rb") as f:
            header_length(f.read(8), path.stat().st_size, path)
    except LoadError as exc:
        raise ValueError(f"load_checkpoint: {exc}") from exc
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
    if not isinstance(meta, dict) or meta.get("format") not in (CHECKPOINT_FORMAT,
                                                                _UNCHECKED_FORMAT):
        found = meta.get("format") if isinstance(meta, dict) else meta
        raise ValueError(f"load_checkpoint: {path} has format {found!r:.60}; this lowbit reads "
                         f"{CHECKPOINT_FORMAT!r}")
    if meta["format"] == _UNCHECKED_FORMAT:
        warnings.warn(f"load_checkpoint: {path} was written before checkpoints had checksums; "
                      "corruption cannot be detected. Save it again to add one", stacklevel=3)
    elif meta.get("checksum") != _checksum(meta, tensors):
        raise ValueError(f"load_checkpoint: {path} fails its SHA-256 checksum: the file was "
                         "corrupted or modified after saving; use another copy")
    return tensors, meta


def _adopts_shapes(module: nn.Module) -> bool:
    """True when ``module`` loads state of other shapes itself (QAT quantizers and observers
    take the trained shapes); plain modules need equal shapes."""
    own = type(module)._load_from_state_dict
    return own not in (nn.Module._load_from_state_dict,
                       QuantizedModuleBase._load_from_state_dict)


def _check_model_state(model: nn.Module, state: Mapping[str, torch.Tensor], strict: bool,
                       path: Path) -> None:
    """What ``load_state_dict`` would refuse, found before it copies anything (it copies the
    matching tensors, then raises)."""
    current = model.state_dict()
    problems = []
    if strict:
        missing, unexpected = sorted(set(current) - set(state)), sorted(set(state) - set(current))
        if missing:
            problems.append(f"missing from the checkpoint: {missing[:5]}")
        if unexpected:
            problems.append(f"not in the model: {unexpected[:5]}")
    owners = {f"{name}.{key}" if name else key: m for name, m in model.named_modules()
              for key, _ in [*m.named_parameters(recurse=False), *m.named_buffers(recurse=False)]}
    for key in sorted(set(current) & set(state)):
        if current[key].shape != state[key].shape and not _adopts_shapes(owners.get(key, model)):
            problems.append(f"{key}: checkpoint {tuple(state[key].shape)}, model "
                            f"{tuple(current[key].shape)}")
    if problems:
        raise ValueError(f"load_checkpoint: {path} does not fit the model ("
                         + "; ".join(problems[:6]) + "); build and prepare the model as the "
                         "saved one (same constructor arguments and QATConfig)")


def _optimizer_state(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor],
                     info: Any, path: Path) -> dict[str, Any]:
    """The ``optimizer.load_state_dict`` argument, checked (class, groups, state per
    parameter); nothing is written."""
    where = f"load_checkpoint: {path}"
    if not isinstance(info, dict) or not isinstance(info.get("param_groups"), list) \
            or not isinstance(info.get("state"), dict) \
            or not isinstance(info.get("state_keys"), list) \
            or not all(isinstance(g, dict) and isinstance(g.get("params"), list)
                       for g in info["param_groups"]):
        raise ValueError(f"{where} has malformed optimizer metadata; save the checkpoint again")
    if info.get("class") != type(optimizer).__name__:
        raise ValueError(f"{where} holds {info.get('class')} state but the optimizer "
                         f"is a {type(optimizer).__name__}; build the same optimizer class")
    current = optimizer.state_dict()["param_groups"]
    saved = info["param_groups"]
    sizes_now, sizes_saved = [len(g["params"]) for g in current], [len(g["params"]) for g in saved]
    if sizes_now != sizes_saved:
        raise ValueError(f"load_checkpoint: the optimizer has parameter groups of sizes "
                         f"{sizes_now} but the checkpoint has {sizes_saved}; build the optimizer "
                         "on qat_model.parameters() of a model prepared the same way")
    params = {pid: p for g_saved, g_now in zip(saved, optimizer.param_groups, strict=True)
              for pid, p in zip(g_saved["params"], g_now["params"], strict=True)}
    try:
        state: dict[int, dict[str, Any]] = {int(k): {} for k in info["state_keys"]}
        for idx, entries in info["state"].items():
            state[int(idx)].update(entries)
        groups = [dict(g) for g in saved]
        for key, value in tensors.items():
            _, part, idx, *rest = key.split("/")
            if not rest:
                raise ValueError(key)
            (state[int(idx)] if part == "state" else groups[int(idx)])["/".join(rest)] = value
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
        raise ValueError(f"{where}: optimizer entry {exc} does not match its parameters; the "
                         "file is damaged") from exc
    for idx, entries in state.items():
        param = params.get(idx)
        if param is None:
            raise ValueError(f"{where} holds optimizer state for parameter {idx}, which none of "
                             "its parameter groups lists; the file is damaged")
        for key, value in entries.items():
            if key in _PARAM_SHAPED and isinstance(value, torch.Tensor) \
                    and value.shape != param.shape:
                raise ValueError(f"{where}: optimizer state {key!r} of parameter {idx} has shape "
                                 f"{tuple(value.shape)}, the parameter {tuple(param.shape)}; "
                                 "build the optimizer on a model prepared the same way")
    for group, old in zip(groups, current, strict=True):
        for key, value in old.items():  # restore tuple-typed hyper-parameters (e.g. betas)
            if isinstance(value, tuple) and isinstance(group.get(key), list):
                group[key] = tuple(group[key])
    return {"state": state, "param_groups": groups}


def _qat_traces(model: nn.Module, stats: Any, path: Path) -> list[tuple[FakeQuantize, Any]]:
    """``(quantizer, trace)`` pairs to restore, each trace checked as ``load_history`` needs it
    (columns of numbers, as long as its ``step`` column)."""
    traces = stats.get("traces", {}) if isinstance(stats, dict) else {}
    pairs = []
    for name, m in model.named_modules():
        node = _node_name(name) or getattr(m, "name", "")
        if not isinstance(m, FakeQuantize) or not isinstance(traces, dict) or node not in traces:
            continue
        trace = traces[node]
        ok = isinstance(trace, dict) and all(
            isinstance(col, list) and all(v is None or (isinstance(v, (int, float))
                                                        and not isinstance(v, bool)) for v in col)
            for col in trace.values())
        n = len(trace.get("step", [])) if ok else 0
        if not ok or any(col and len(col) != n for col in trace.values()):
            raise ValueError(f"load_checkpoint: {path}: the QAT statistics of {node!r} are "
                             "malformed; the file is damaged")
        pairs.append((m, trace))
    return pairs


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
        ValueError: not a lowbit checkpoint, another format version, a checksum mismatch
            (corrupted file), a QAT config different from the model's, missing/unexpected
            (with ``strict``) or mis-shaped model keys, no optimizer state when one is asked
            for, another optimizer class, parameter layout or state shapes. Raised before the
            model or the optimizer is changed.

    Example:
        >>> import tempfile, pathlib
        >>> model = nn.Linear(3, 2)
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "ckpt.safetensors"
        >>> _ = save_checkpoint(path, model, extra={"step": 7})
        >>> fresh = nn.Linear(3, 2)
        >>> load_checkpoint(path, fresh), torch.equal(fresh.weight, model.weight)
        ({'step': 7}, True)
    """
    path = Path(path)
    tensors, meta = _read(path)
    saved = meta.get("qat_configs")
    if not isinstance(saved, dict):  # (a checkpoint of an earlier lowbit: the root's only)
        saved = {} if meta.get("qat_config") is None else {"": meta["qat_config"]}
    for name, config in _qat_configs(model).items():
        if name in saved and saved[name] != config:
            where = f" (its QAT model {name!r})" if name else ""
            raise ValueError(f"load_checkpoint: {path} was trained with another QATConfig than "
                             f"the one this model{where} was prepared with; prepare the model "
                             "with QATConfig.from_dict(<the checkpoint's qat_configs"
                             f"[{name!r}]>)")
    model_sd = {k[len("model/"):]: v for k, v in tensors.items() if k.startswith("model/")}
    _check_model_state(model, model_sd, strict, path)
    opt_state = None
    if optimizer is not None:
        if meta.get("optimizer") is None:
            raise ValueError(f"load_checkpoint: {path} holds no optimizer state; pass "
                             "optimizer=None or save one with save_checkpoint(..., optimizer)")
        opt_tensors = {k: v for k, v in tensors.items() if k.startswith("optimizer/")}
        opt_state = _optimizer_state(optimizer, opt_tensors, meta["optimizer"], path)
    traces = _qat_traces(model, meta.get("qat_statistics"), path)
    # everything checked: write (the optimizer first: it can be put back if the model's own
    # loading code still refuses something)
    before = None if optimizer is None else optimizer.state_dict()
    if opt_state is not None:
        optimizer.load_state_dict(opt_state)  # type: ignore[union-attr]
    try:
        model.load_state_dict(model_sd, strict=strict)
    except Exception:
        if before is not None:
            optimizer.load_state_dict(before)  # type: ignore[union-attr]
        raise
    for quantizer, trace in traces:
        quantizer.load_history(trace)
    extra = meta.get("extra")
    return dict(extra) if isinstance(extra, dict) else {}
