"""Save and load quantized models: safetensors tensors plus a JSON manifest, no pickle.

Layout of ``lowbit.save(model, "out")`` (a directory)::

    out/model.safetensors   every tensor of model.state_dict() (int8 codes, packed int4 bytes,
                            scales, zero-points, float parameters) + the manifest as metadata
    out/lowbit.json         a readable copy of the manifest

``lowbit.save(model, "model.safetensors")`` writes the single file only. The manifest embedded
in the safetensors file is the authoritative one, so each save has one commit point: the file
is written to a temporary name in the same folder, fsynced, then ``os.replace``-d over the old
one. A crash mid-save leaves the previous file intact.

The manifest records the format version, lowbit and torch versions, the SHA-256 of the tensors
and of the manifest itself, the model's class and (only when given) an importable factory, and,
for every module of the quantized model that differs from the float model, how to rebuild it:
a lowbit quantized module's ``meta()`` (rebuilt with ``from_meta``), a
:class:`~lowbit.lora.LoRALinear` adapter (its base's ``meta()`` and ``lora_config()``), or a
structural replacement (a folded BatchNorm or fused ReLU that became ``nn.Identity``). Loading
copies nothing into the float skeleton until the file and the skeleton have been checked
against each other, then swaps the modules and calls ``load_state_dict(strict=True)``: never a
half-loaded model.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from importlib import metadata as _metadata
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from torch import nn

from lowbit._dispatch import LAYER_BACKENDS
from lowbit._qmodule import check_conv_geometry
from lowbit.config import QuantSpec, enclosing_names
from lowbit.dropin import guard_save_pretrained
from lowbit.lora import LORA_BASES, LoRALinear, mark_only_lora_trainable
from lowbit.modules import (
    QUANTIZED_MODULES,
    WEIGHT_NAMES,
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    WeightOnlyConv2d,
    module_from_meta,
)
from lowbit.modules_mha import MultiheadAttentionLinears
from lowbit.modules_rnn import MAX_RNN_LAYERS, QuantizedRNNBase, rnn_weight_shapes
from lowbit.traverse import disable_fused_fast_paths, gelu_approximate

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]

__all__ = [
    "FORMAT_VERSION",
    "LoadError",
    "SavedLayer",
    "describe",
    "load",
    "read_manifest",
    "save",
]

#: Version of the file format written by :func:`save`; :func:`load` refuses any other.
FORMAT_VERSION = 1
MANIFEST_KEY = "lowbit"
TENSORS_FILE = "model.safetensors"
MANIFEST_FILE = "lowbit.json"
#: Structural replacements :func:`load` may apply (float module -> this module, built from the
#: entry's checked ``config``: none for ``Identity``).
REPLACEMENTS: dict[str, type[nn.Module]] = {
    "Identity": nn.Identity, "MultiheadAttentionLinears": MultiheadAttentionLinears}
#: The fields of a ``MultiheadAttentionLinears`` entry's ``config``.
_MHA_FIELDS = {"embed_dim": int, "num_heads": int, "kdim": int, "vdim": int, "dropout": float,
               "bias": bool, "batch_first": bool}
#: Modules that exist only before conversion (QAT layers, fake-quantizers, calibrators).
_UNSAVEABLE = ("lowbit.qat", "lowbit.fake_quantize", "lowbit.calibrators")
_FACTORY_RE = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_][\w.]*$")


class LoadError(ValueError):
    """A lowbit file cannot be loaded: truncated, tampered, wrong version or wrong skeleton."""


def _lowbit_version() -> str:
    try:
        return _metadata.version("lowbit")
    except _metadata.PackageNotFoundError:  # pragma: no cover - source checkout without install
        return "unknown"


def _canonical(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def tensors_sha256(tensors: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over name, dtype, shape and raw bytes of every tensor, in name order.

    Example:
        >>> a = tensors_sha256({"w": torch.zeros(2)}); b = tensors_sha256({"w": torch.ones(2)})
        >>> len(a), a == b
        (64, False)
    """
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(_canonical([name, str(t.dtype), list(t.shape)]))
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# ---------------------------------------------------------------------------------- saving
def _module_entries(model: nn.Module) -> dict[str, dict[str, Any]]:
    """``{name: how to rebuild it}`` for every quantized module and every ``nn.Identity``."""
    registered = {*QUANTIZED_MODULES.values(), LoRALinear}
    entries: dict[str, dict[str, Any]] = {}
    first_name: dict[int, str] = {}
    adapters: list[str] = []
    for name, module in model.named_modules(remove_duplicate=False):
        if any(not a or name.startswith(a + ".") for a in adapters):
            continue  # inside a LoRA wrapper: rebuilt with it
        if not name and type(module) not in registered:
            continue
        if id(module) in first_name and type(module) in registered:
            entries[name] = {"kind": "shared", "of": first_name[id(module)]}
            if isinstance(module, LoRALinear):
                adapters.append(name)
            continue
        first_name.setdefault(id(module), name)
        if isinstance(module, LoRALinear):
            entries[name] = {"kind": "lora", "meta": module.base.meta(),  # type: ignore[operator]
                             "lora": module.lora_config()}
            adapters.append(name)
        elif type(module) in registered:
            entries[name] = {"kind": "quantized", "meta": module.meta()}  # type: ignore[operator]
        elif type(module) is nn.Identity:
            entries[name] = {"kind": "replace", "class": "Identity"}
        elif type(module) is MultiheadAttentionLinears:  # its (quantized) projections follow
            entries[name] = {"kind": "replace", "class": "MultiheadAttentionLinears",
                             "config": module.config()}
        elif type(module).__module__ in _UNSAVEABLE:
            raise ValueError(
                f"lowbit.save: {name} ({type(module).__name__}) is not a saveable quantized "
                "module; convert QAT models with QATPreparer.convert_to_quantized first, or "
                "checkpoint them with torch.save(model.state_dict())")
    return entries


def _dedupe(state: Mapping[str, torch.Tensor]
            ) -> tuple[dict[str, torch.Tensor], dict[str, str], dict[str, str]]:
    """Contiguous CPU tensors without shared storage; ``aliases`` for tied tensors; zero-points
    narrowed to int8 when they fit (``narrowed`` maps name -> original dtype)."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    narrowed: dict[str, str] = {}
    seen: dict[tuple[Any, ...], str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"lowbit.save: state_dict entry {name!r} is a {type(t).__name__}, "
                             "not a tensor (get_extra_state?); safetensors stores tensors only")
        t = t.detach()
        if t.is_meta:
            raise ValueError(f"lowbit.save: {name!r} is on the meta device and holds no values; "
                             "load the model's weights first (model.to_empty(device='cpu'), "
                             "then load_state_dict or lowbit.load)")
        key = (t.device, t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            aliases[name] = seen[key]
            continue
        if t.numel():
            seen[key] = name
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        t = t.cpu()
        if storage in storages or not t.is_contiguous():
            t = t.contiguous().clone()  # a view into another tensor: store its own copy
        if storage is not None:
            storages.add(storage)
        if (t.dtype == torch.int32 and name.endswith("zero_point") and t.numel()
                and int(t.min()) >= -128 and int(t.max()) <= 127):
            t, narrowed[name] = t.to(torch.int8), "int32"  # bit-exact when widened on load
        out[name] = t
    return out, aliases, narrowed


#: Temporary files of :func:`_atomic_write`: ``.<target name>.lowbit-<random>.tmp``.
_TMP_PREFIX, _TMP_SUFFIX = ".lowbit-", ".tmp"
_TMP_RE = re.compile(r"^\..+\.lowbit-[A-Za-z0-9_]+\.tmp(dir)?$")
#: A temporary not written to for this long (seconds), and not locked by a running save, was
#: left by a crashed save: the next save into the same folder removes it.
STALE_TMP_SECONDS = 3600.0


def _umask() -> int:
    """The process umask (read from /proc where possible: ``os.umask`` must set it to read it)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _try_lock(fd: int) -> bool:
    """Take an exclusive advisory lock on ``fd`` without waiting; True when taken (or when the
    platform has no ``fcntl``, where only the age of a temporary protects it)."""
    if fcntl is None:  # pragma: no cover - Windows
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def clean_stale_temporaries(folder: str | os.PathLike[str], *,
                            older_than: float = STALE_TMP_SECONDS) -> list[Path]:
    """Remove the temporaries lowbit saves left in ``folder`` when they crashed.

    Only files and folders named like lowbit's temporaries (``.<name>.lowbit-<random>.tmp``,
    or ``.tmpdir``: a save writes inside one, so that what its writer leaves, such as
    safetensors' own temporary, goes with it), not written to for ``older_than`` seconds and not
    locked by a save in progress are removed. Every :func:`save` (and
    :func:`lowbit.checkpoint.save_checkpoint`) calls it on its folder.

    Returns:
        The paths removed.

    Example:
        >>> import os, pathlib, tempfile
        >>> d = pathlib.Path(tempfile.mkdtemp())
        >>> old = d / ".model.safetensors.lowbit-k2j4x9aa.tmp"; _ = old.write_bytes(b"half")
        >>> os.utime(old, (0, 0))  # last written in 1970
        >>> [p.name for p in clean_stale_temporaries(d)], old.exists()
        (['.model.safetensors.lowbit-k2j4x9aa.tmp'], False)
    """
    removed: list[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        if not _TMP_RE.match(entry.name):
            continue
        try:
            folder_entry = entry.name.endswith("dir")
            if not (entry.is_dir(follow_symlinks=False) if folder_entry
                    else entry.is_file(follow_symlinks=False)):
                continue
            if now - entry.stat(follow_symlinks=False).st_mtime < older_than:
                continue
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue  # removed meanwhile, or not ours to open
        try:
            if _try_lock(fd):  # a running save holds its temporary locked
                if folder_entry:
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
                removed.append(Path(entry.path))
        except OSError:
            pass
        finally:
            os.close(fd)
    return removed


def _atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync, then ``os.replace``.

    The temporary lies in a fresh private folder next to ``path``, locked while written
    (:func:`clean_stale_temporaries` of another save leaves it alone), so whatever the writer
    creates there (safetensors writes a temporary of its own and renames it) goes with the
    folder, even after a crash. The file gets the mode a plain ``open(path, "w")`` would
    (``0o666 & ~umask``; ``mkstemp`` and ``safetensors`` create 0600). Stale temporaries of
    crashed saves in the folder are removed first.
    """
    clean_stale_temporaries(path.parent)
    folder = tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}{_TMP_PREFIX}",
                              suffix=f"{_TMP_SUFFIX}dir")
    tmp = os.path.join(folder, path.name)
    fd = None
    try:
        if fcntl is not None:  # (a folder's descriptor: POSIX; elsewhere its age protects it)
            fd = os.open(folder, os.O_RDONLY)
            _try_lock(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())  # after write: writers may recreate the file
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        if fd is not None:
            os.close(fd)  # releases the lock
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _class_ref(model: nn.Module) -> str:
    return f"{type(model).__module__}:{type(model).__qualname__}"


def save(model: nn.Module, path: str | os.PathLike[str], *, factory: str | None = None,
         factory_kwargs: Mapping[str, Any] | None = None,
         extra: Mapping[str, Any] | None = None) -> Path:
    """Save a quantized model (no pickle): safetensors tensors + a JSON manifest, atomically.

    Args:
        model: a model returned by lowbit's quantizers (a float model saves too).
        path: a directory (``model.safetensors`` + ``lowbit.json`` inside, created if needed),
            or a file name ending in ``.safetensors`` (single file, manifest in its metadata).
        factory: ``"package.module:function"`` that builds the float skeleton; recorded so that
            ``load(path, trust_factory=True)`` can rebuild the model without your code.
        factory_kwargs: JSON-compatible keyword arguments of ``factory``.
        extra: JSON-compatible user data stored in the manifest under ``"extra"``.

    Returns:
        The path of the safetensors file written.

    Raises:
        ValueError: ``factory`` is not ``"module:function"``, ``extra`` is not JSON-compatible,
            a module cannot be saved (e.g. an unconverted QAT module, or the
            ``OnnxRuntimeModule`` / ``AOTInductorModule`` of a compiled backend), or ``path``
            is a directory where a file is asked for (and vice versa).

    Example:
        >>> import tempfile, torch
        >>> from lowbit.ptq import quantize_dynamic
        >>> q = quantize_dynamic(nn.Sequential(nn.Linear(8, 4)))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save(q, d + "/q")
        ...     r = load(d + "/q", model=nn.Sequential(nn.Linear(8, 4)))
        >>> x = torch.randn(2, 8); torch.equal(r(x), q(x))
        True
    """
    if type(model).__name__ in ("OnnxRuntimeModule", "AOTInductorModule"):
        raise ValueError(f"lowbit.save: this is a {type(model).__name__} (what set_backend "
                         "returns for a compiled backend): it runs a compiled file and holds no "
                         "PyTorch weights, so the file would hold none either; save the "
                         "quantized PyTorch model it was made from, or keep the compiled file")
    if factory is not None and not _FACTORY_RE.match(factory):
        raise ValueError(f"lowbit.save: factory={factory!r} must look like "
                         "'package.module:function'")
    path = Path(path)
    single = path.suffix == ".safetensors"
    if single and path.is_dir():
        raise ValueError(f"lowbit.save: {path} is a directory; pass a file name or a folder "
                         "name without the .safetensors suffix")
    if not single and path.exists() and not path.is_dir():
        raise ValueError(f"lowbit.save: {path} is an existing file; pass a directory, or a "
                         "name ending in .safetensors for the single-file format")
    entries = _module_entries(model)
    tensors, aliases, narrowed = _dedupe(model.state_dict())
    report = getattr(model, "lowbit_report", None)
    loaded = getattr(model, "lowbit_manifest", None)  # a loaded model's report: carried over
    carried = loaded if report is None and isinstance(loaded, dict) else {}
    manifest: dict[str, Any] = {
        "format": "lowbit",
        "format_version": FORMAT_VERSION,
        "lowbit_version": _lowbit_version(),
        "torch_version": torch.__version__,
        "architecture": {"class": _class_ref(model), "factory": factory,
                         "factory_kwargs": dict(factory_kwargs or {})},
        "modules": entries,
        "schemes": ({r.name: {"status": r.status, "scheme": r.reason}
                     for r in getattr(report, "rows", [])} or dict(carried.get("schemes") or {})),
        "quantization_report": (report.to_dict() if hasattr(report, "to_dict")
                                else carried.get("quantization_report")),
        "aliases": aliases,
        "narrowed": narrowed,
        "tensors_sha256": tensors_sha256(tensors),
        "extra": dict(extra or {}),
    }
    try:
        manifest["manifest_sha256"] = hashlib.sha256(_canonical(manifest)).hexdigest()
        text = json.dumps(manifest, sort_keys=True, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise ValueError(f"lowbit.save: the manifest is not JSON-compatible ({e}); pass plain "
                         "numbers, strings, lists and dicts in factory_kwargs / extra") from e
    target = path if single else path / TENSORS_FILE
    target.parent.mkdir(parents=True, exist_ok=True)
    metadata = {MANIFEST_KEY: text}
    _atomic_write(target, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata))
    if not single:
        pretty = json.dumps(manifest, indent=1, sort_keys=True) + "\n"
        _atomic_write(path / MANIFEST_FILE, lambda tmp: Path(tmp).write_text(pretty))
    return target


# ---------------------------------------------------------------------------------- loading
def _resolve(path: str | os.PathLike[str]) -> Path:
    p = Path(path)
    if p.is_dir():
        p = p / TENSORS_FILE
    if not p.is_file():
        raise FileNotFoundError(f"lowbit.load: {p} does not exist; pass the folder or the "
                                ".safetensors file written by lowbit.save")
    return p


#: Largest safetensors header accepted (the limit of the safetensors library itself).
MAX_HEADER_BYTES = 100_000_000


def header_length(head: bytes, size: int, where: str | os.PathLike[str]) -> int:
    """The header length a safetensors file of ``size`` bytes declares in its first 8 bytes
    ``head``, checked before anything else is read (a garbage file can declare any length).

    Raises:
        LoadError: too short, a declared header longer than the file or than
            :data:`MAX_HEADER_BYTES`.

    Example:
        >>> header_length(struct.pack("<Q", 2) + b"{}", 10, "f")
        2
        >>> header_length(b"\\xff" * 8, 1 << 40, "f")  # e.g. 1 TB of random bytes
        Traceback (most recent call last):
        ...
        lowbit.serialization.LoadError: f: not a safetensors file (its first 8 bytes declare ...
    """
    if head[:2] == b"PK":
        raise LoadError(f"{where}: not a lowbit file (a zip archive, e.g. torch.save or "
                        "TorchScript); pass the folder or .safetensors file lowbit.save wrote")
    if len(head) < 8:
        raise LoadError(f"{where}: truncated file ({len(head)} bytes); save it again")
    (n,) = struct.unpack("<Q", head[:8])
    if n > MAX_HEADER_BYTES:
        raise LoadError(f"{where}: not a safetensors file (its first 8 bytes declare a header of "
                        f"{n} bytes, more than the {MAX_HEADER_BYTES} safetensors allows)")
    if n > size - 8:
        raise LoadError(f"{where}: not a safetensors file, or truncated (its header would "
                        f"need {n} bytes, the file has {size}); save it again")
    return n


def _parse_header(data: bytes, size: int, where: Path) -> dict[str, Any]:
    """The manifest, from the first bytes ``data`` (at least the header) of a file of ``size``
    bytes.

    Raises :class:`LoadError` on a truncated file, a corrupted header or a missing manifest.
    """
    n = header_length(data, size, where)
    if n > len(data) - 8:
        raise LoadError(f"{where}: truncated file (header needs {n} bytes, only "
                        f"{len(data) - 8} present); save it again")
    try:
        header = json.loads(data[8:8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LoadError(f"{where}: not a safetensors file or corrupted header ({e})") from e
    if not isinstance(header, dict):
        raise LoadError(f"{where}: corrupted safetensors header")
    try:
        end = 8 + n + max((int(v["data_offsets"][1]) for k, v in header.items()
                           if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError) as e:
        raise LoadError(f"{where}: corrupted safetensors header ({e})") from e
    if end > size:
        raise LoadError(f"{where}: truncated file (tensor data needs {end} bytes, file has "
                        f"{size}); save it again")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise LoadError(f"{where}: corrupted safetensors header (__metadata__ is not a map)")
    if "lowbit.checkpoint" in meta:
        raise LoadError(f"{where}: a training checkpoint, not a saved quantized model; load it "
                        "with lowbit.checkpoint.load_checkpoint")
    if MANIFEST_KEY not in meta:
        raise LoadError(f"{where}: not a lowbit file (no '{MANIFEST_KEY}' manifest in its "
                        "metadata); plain safetensors files load with safetensors.torch.load_file")
    try:
        manifest = json.loads(meta[MANIFEST_KEY])
    except (TypeError, json.JSONDecodeError) as e:
        raise LoadError(f"{where}: the lowbit manifest is corrupted ({e})") from e
    return manifest


def _check_manifest(manifest: Any, where: Path) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != "lowbit":
        raise LoadError(f"{where}: not a lowbit manifest")
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
        raise LoadError(
            f"{where}: unsupported lowbit format version {version!r} (written by lowbit "
            f"{manifest.get('lowbit_version', '?')}); this lowbit {_lowbit_version()} reads "
            f"version {FORMAT_VERSION}; upgrade lowbit or re-save the model with this version")
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    if hashlib.sha256(_canonical(body)).hexdigest() != manifest.get("manifest_sha256"):
        raise LoadError(f"{where}: manifest checksum mismatch: the manifest was modified or "
                        "corrupted after saving; save the model again")
    _check_structure(manifest, where)


# ---------------------------------------------------------------------------------- validation
# Anyone who can edit a file can recompute its checksums: every field load reads is checked
# here, by type and range, before it is used, and a bad one is refused by name (LoadError).
#: Original dtypes a quantized module may record (the float layer's dtype).
_FLOAT_DTYPES = ("float32", "float16", "bfloat16", "float64")
_MAX_DIM = 2**31 - 1
_DAMAGED = "the file is damaged or was edited; save the model again"


def _field(obj: Mapping[str, Any], key: str, types: type | tuple[type, ...], where: str, *,
           optional: bool = False) -> Any:
    """``obj[key]`` when it has one of ``types`` (``bool`` is not an ``int`` here); None when
    ``optional`` and missing. Anything else is a :class:`LoadError` naming ``where`` and ``key``.
    """
    if key not in obj:
        if optional:
            return None
        raise LoadError(f"{where}: field {key!r} is missing; {_DAMAGED}")
    value = obj[key]
    kinds = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
        names = " or ".join("null" if t is type(None) else t.__name__ for t in kinds)
        raise LoadError(f"{where}: field {key!r} must be {names}, got {value!r:.80}; {_DAMAGED}")
    return value


def _dim(obj: Mapping[str, Any], key: str, where: str) -> int:
    value = _field(obj, key, int, where)
    if not 1 <= value <= _MAX_DIM:
        raise LoadError(f"{where}: field {key!r}={value} must be in 1..{_MAX_DIM}; {_DAMAGED}")
    return value


def _spec(meta: Mapping[str, Any], key: str, where: str) -> None:
    data = _field(meta, key, dict, where)
    for flag in ("signed", "symmetric", "narrow_range"):
        _field(data, flag, bool, f"{where} {key}", optional=True)
    try:
        QuantSpec.from_dict(data)
    except (TypeError, ValueError) as e:
        raise LoadError(f"{where}: field {key!r} is not a valid QuantSpec ({e}); {_DAMAGED}"
                        ) from e


def _check_meta(meta: Mapping[str, Any], where: str, lora: bool) -> None:
    """A quantized module's meta: class, shapes, conv geometry, specs and flags."""
    name = _field(meta, "class", str, where)
    cls = QUANTIZED_MODULES.get(name)
    if cls is None:
        raise LoadError(f"{where} is a {name!r}, which this lowbit {_lowbit_version()} does not "
                        "know; upgrade lowbit")
    where = f"{where} ({name})"
    if lora and not issubclass(cls, LORA_BASES):
        raise LoadError(f"{where}: a LoRA adapter needs one of "
                        f"{[c.__name__ for c in LORA_BASES]} as its base; {_DAMAGED}")
    _spec(meta, "weight_spec", where)
    if issubclass(cls, (QuantizedLinear, QuantizedConv2d)):
        if _field(meta, "mode", str, where) not in ("dynamic", "static"):
            raise LoadError(f"{where}: field 'mode'={meta['mode']!r:.40} must be 'dynamic' or "
                            f"'static'; {_DAMAGED}")
        _spec(meta, "activation_spec", where)
    if issubclass(cls, QuantizedEmbedding):
        rows = _dim(meta, "num_embeddings", where)
        _dim(meta, "embedding_dim", where)
        idx = _field(meta, "padding_idx", (int, type(None)), where, optional=True)
        if idx is not None and not -rows <= idx < rows:
            raise LoadError(f"{where}: field 'padding_idx'={idx} is outside the {rows} rows; "
                            f"{_DAMAGED}")
    else:
        _field(meta, "bias", bool, where)
    if issubclass(cls, QuantizedRNNBase):
        _check_rnn_meta(meta, where)
    elif issubclass(cls, (QuantizedConv2d, WeightOnlyConv2d)):
        geometry = _field(meta, "geometry", dict, where)
        try:
            check_conv_geometry(geometry, meta.get("kernel_size"), meta.get("in_channels"),
                                meta.get("out_channels"), cls._dims, where, fix=_DAMAGED)
        except ValueError as e:
            raise LoadError(str(e)) from e
    elif not issubclass(cls, QuantizedEmbedding):
        _dim(meta, "in_features", where)
        _dim(meta, "out_features", where)
    _field(meta, "fused_relu", bool, where, optional=True)
    _field(meta, "int8_activations", bool, where, optional=True)
    if _field(meta, "fused_gelu", (str, type(None)), where, optional=True) not in (
            None, "none", "tanh"):
        raise LoadError(f"{where}: field 'fused_gelu' must be null, 'none' or 'tanh'; {_DAMAGED}")
    if _field(meta, "dtype", str, where, optional=True) not in (None, *_FLOAT_DTYPES):
        raise LoadError(f"{where}: field 'dtype'={meta['dtype']!r:.40} must be one of "
                        f"{_FLOAT_DTYPES}; {_DAMAGED}")
    if _field(meta, "backend", str, where, optional=True) not in (None, *LAYER_BACKENDS):
        raise LoadError(f"{where}: field 'backend' must be one of {list(LAYER_BACKENDS)}; "
                        f"{_DAMAGED}")
    _field(meta, "name", str, where, optional=True)
    _field(meta, "extra", dict, where, optional=True)


def _check_rnn_meta(meta: Mapping[str, Any], where: str) -> None:
    """A quantized recurrent layer's meta: sizes, flags, dynamic activation spec."""
    if _field(meta, "mode", str, where) != "dynamic":
        raise LoadError(f"{where}: field 'mode'={meta['mode']!r:.40} must be 'dynamic'; "
                        f"{_DAMAGED}")
    _spec(meta, "activation_spec", where)
    _dim(meta, "input_size", where)
    hidden = _dim(meta, "hidden_size", where)
    if _dim(meta, "num_layers", where) > MAX_RNN_LAYERS:
        raise LoadError(f"{where}: field 'num_layers' must be at most {MAX_RNN_LAYERS}; "
                        f"{_DAMAGED}")
    for key in ("batch_first", "bidirectional"):
        _field(meta, key, bool, where)
    proj = _field(meta, "proj_size", int, where, optional=True) or 0
    if not 0 <= proj < hidden or (proj and meta["class"] != "QuantizedLSTM"):
        raise LoadError(f"{where}: field 'proj_size'={proj} must be 0, or below hidden_size "
                        f"for an LSTM; {_DAMAGED}")
    _field(meta, "dropout", (int, float), where, optional=True)
    if _field(meta, "nonlinearity", str, where, optional=True) not in (None, "tanh", "relu"):
        raise LoadError(f"{where}: field 'nonlinearity'={meta['nonlinearity']!r:.40} must be "
                        f"'tanh' or 'relu'; {_DAMAGED}")
    if str(meta["class"]).endswith("Cell") and (meta["num_layers"] != 1 or meta["bidirectional"]
                                                 or meta["batch_first"]):
        raise LoadError(f"{where}: a recurrent cell has one layer, one direction and no "
                        f"batch_first; {_DAMAGED}")


def _check_lora(config: Mapping[str, Any], where: str) -> None:
    where = f"{where} LoRA adapter"
    _dim(config, "r", where)
    for key in ("alpha", "dropout"):
        value = _field(config, key, (int, float), where, optional=key == "dropout")
        if value is not None and not math.isfinite(value):
            raise LoadError(f"{where}: field {key!r} must be finite; {_DAMAGED}")
    _field(config, "fused_relu", bool, where, optional=True)
    _field(config, "fused_gelu", (str, type(None)), where, optional=True)


def _check_mha_config(config: Mapping[str, Any], where: str) -> None:
    """A ``MultiheadAttentionLinears`` entry's constructor arguments: exactly the known fields,
    sizes in range, the heads dividing the width."""
    if set(config) != set(_MHA_FIELDS):
        raise LoadError(f"{where}: config fields {sorted(config)!r:.200} must be "
                        f"{sorted(_MHA_FIELDS)}; {_DAMAGED}")
    for key, typ in _MHA_FIELDS.items():
        value = config[key]
        if typ is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if type(value) is not typ:
            raise LoadError(f"{where}: config field {key!r}={config[key]!r:.40} must be a "
                            f"{typ.__name__}; {_DAMAGED}")
        if typ is int and not 0 < value <= (1 << 20):
            raise LoadError(f"{where}: config field {key!r}={value} is out of range; {_DAMAGED}")
    if not 0.0 <= float(config["dropout"]) <= 1.0 or config["embed_dim"] % config["num_heads"]:
        raise LoadError(f"{where}: config needs 0 <= dropout <= 1 and num_heads dividing "
                        f"embed_dim; {_DAMAGED}")


def _check_structure(manifest: Mapping[str, Any], where: Path) -> None:
    """Every field :func:`load` and :func:`describe` read, by type and range (no tensors)."""
    top = f"{where}: manifest"
    arch = _field(manifest, "architecture", dict, top)
    _field(arch, "class", str, f"{top} architecture")
    _field(arch, "factory", (str, type(None)), f"{top} architecture", optional=True)
    _field(arch, "factory_kwargs", dict, f"{top} architecture", optional=True)
    for key in ("aliases", "narrowed"):
        for name, value in (_field(manifest, key, dict, top, optional=True) or {}).items():
            if not isinstance(value, str) or (key == "narrowed" and value != "int32"):
                raise LoadError(f"{top}: {key}[{name!r}]={value!r:.40} is not "
                                f"{'int32' if key == 'narrowed' else 'a tensor name'}; "
                                f"{_DAMAGED}")
    _field(manifest, "extra", dict, top, optional=True)
    for name, entry in _field(manifest, "modules", dict, top).items():
        here = f"{where}: module {name!r}"
        if not isinstance(entry, dict):
            raise LoadError(f"{here}: its entry must be an object, got {entry!r:.80}; {_DAMAGED}")
        kind = _field(entry, "kind", str, here)
        if kind in ("quantized", "lora"):
            _check_meta(_field(entry, "meta", dict, here), here, lora=kind == "lora")
            if kind == "lora":
                _check_lora(_field(entry, "lora", dict, here), here)
        elif kind == "replace":
            if _field(entry, "class", str, here) not in REPLACEMENTS:
                raise LoadError(f"{here}: replacement class {entry['class']!r:.40} is not one of "
                                f"{sorted(REPLACEMENTS)}; {_DAMAGED}")
            if entry["class"] == "MultiheadAttentionLinears":
                _check_mha_config(_field(entry, "config", dict, here), here)
        elif kind == "shared":
            _field(entry, "of", str, here)
        else:
            raise LoadError(f"{here}: unknown kind {kind!r:.40} (known: quantized, lora, "
                            f"replace, shared); {_DAMAGED}")


def _check_tensor_refs(manifest: Mapping[str, Any], tensors: Mapping[str, torch.Tensor],
                       where: Path) -> None:
    """``narrowed`` / ``aliases`` name stored tensors, and no module describes more weight than
    the file stores for it: modules are rebuilt (allocated) from their meta before the exact
    shape check, so a meta of 10^12 elements must not get that far."""
    for key in ("narrowed", "aliases"):
        for name, value in (manifest.get(key) or {}).items():
            target = name if key == "narrowed" else value
            if target not in tensors or (key == "aliases" and name in tensors):
                raise LoadError(f"{where}: manifest {key}[{name!r}] names no stored tensor "
                                f"{target!r:.80}; {_DAMAGED}")
            if key == "narrowed" and tensors[name].dtype != torch.int8:
                raise LoadError(f"{where}: manifest narrowed[{name!r}]: the stored tensor is "
                                f"{tensors[name].dtype}, not the int8 save narrows to; {_DAMAGED}")
    stored = {**tensors, **{a: tensors[s] for a, s in (manifest.get("aliases") or {}).items()}}
    for name, entry in manifest["modules"].items():
        if entry["kind"] not in ("quantized", "lora"):
            continue
        prefix = (f"{name}." if name else "") + ("base." if entry["kind"] == "lora" else "")
        rnn = issubclass(QUANTIZED_MODULES[entry["meta"]["class"]], QuantizedRNNBase)
        shapes = (rnn_weight_shapes(entry["meta"]) if rnn
                  else {"weight": _weight_shape(entry["meta"])})
        for key, shape in shapes.items():
            weight = stored.get(f"{prefix}{key}")
            need = math.prod(shape)
            if weight is None or need > 2 * weight.numel() * weight.element_size():
                have = "no tensor" if weight is None else (
                    f"{weight.numel() * weight.element_size()} bytes ({list(weight.shape)} "
                    f"{str(weight.dtype).removeprefix('torch.')})")
                raise LoadError(f"{where}: module {name!r} ({entry['meta']['class']}) describes "
                                f"a weight of shape {shape}, but the file stores {have} for "
                                f"{prefix}{key}; {_DAMAGED}")
        if entry["kind"] == "lora":
            a = stored.get(f"{name}.lora_A" if name else "lora_A")
            if a is None or a.dim() != 2 or a.shape[0] != entry["lora"]["r"]:
                raise LoadError(f"{where}: module {name!r}: its LoRA rank r="
                                f"{entry['lora']['r']} does not match the stored lora_A "
                                f"{None if a is None else list(a.shape)}; {_DAMAGED}")


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The manifest of a saved model, checked (format, version, manifest checksum).

    Tensors are not read; :func:`load` and :func:`describe` also verify their SHA-256.

    Args:
        path: the folder or ``.safetensors`` file written by :func:`save`.

    Returns:
        The manifest dict (see :func:`save`).

    Raises:
        FileNotFoundError: no such file. LoadError: not a lowbit file, truncated header,
            unsupported format version, modified manifest.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save(nn.Linear(2, 2), d + "/m.safetensors")
        ...     read_manifest(d + "/m.safetensors")["format_version"]
        1
    """
    p = _resolve(path)
    with open(p, "rb") as f:
        return _read_manifest(f, p.stat().st_size, p)


def _read_manifest(f: Any, size: int, where: Path) -> dict[str, Any]:
    """The checked manifest from the open file ``f``: the header length is checked against the
    file size before the header is read, so a garbage file is never read whole."""
    head = f.read(8)
    data = head + f.read(header_length(head, size, where))
    manifest = _parse_header(data, size, where)
    _check_manifest(manifest, where)
    return manifest


def _read_verified(path: str | os.PathLike[str]
                   ) -> tuple[Path, dict[str, Any], dict[str, torch.Tensor]]:
    """Read, check and verify a saved file; tensors widened and aliases restored."""
    p = _resolve(path)
    size = p.stat().st_size
    with open(p, "rb") as f:
        manifest = _read_manifest(f, size, p)  # checked before the tensor data is read
    try:  # tensor by tensor from the file (reading it into one bytes object first held the
        # data twice: 2.25x the file at the peak)
        tensors = safetensors.torch.load_file(p)
    except MemoryError as e:
        raise MemoryError(f"{p}: its {size} bytes do not fit in memory") from e
    except Exception as e:  # safetensors raises its own error type
        raise LoadError(f"{p}: corrupted tensor data ({e}); save the model again") from e
    if tensors_sha256(tensors) != manifest.get("tensors_sha256"):
        raise LoadError(f"{p}: SHA-256 mismatch: the tensor data was modified or corrupted "
                        "after saving; save the model again")
    _check_tensor_refs(manifest, tensors, p)
    for name in manifest.get("narrowed") or {}:
        tensors[name] = tensors[name].to(torch.int32)
    for name, source in (manifest.get("aliases") or {}).items():
        tensors[name] = tensors[source]
    if p.name == TENSORS_FILE and (p.parent / MANIFEST_FILE).is_file():
        try:
            side = json.loads((p.parent / MANIFEST_FILE).read_text())
        except (OSError, json.JSONDecodeError):
            side = None
        if side != manifest:
            warnings.warn(f"{p.parent / MANIFEST_FILE} differs from the manifest embedded in "
                          f"{p} (an interrupted save or a manual edit); using the embedded one",
                          stacklevel=3)
    return p, manifest, tensors


def _import_factory(ref: str) -> Callable[..., nn.Module]:
    if not _FACTORY_RE.match(ref):
        raise LoadError(f"factory {ref!r} must look like 'package.module:function'")
    mod_name, _, attr = ref.partition(":")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise LoadError(f"cannot import the factory {ref!r} ({e}); install the package that "
                        "defines it or pass model=YourNet()") from e
    if not callable(obj):
        raise LoadError(f"factory {ref!r} is not callable")
    return obj


def _skeleton(manifest: dict[str, Any], model: nn.Module | None, trust_factory: bool,
              where: Path) -> nn.Module:
    arch = manifest.get("architecture", {})
    if model is not None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"lowbit.load(model=...) must be an nn.Module (the float model), got "
                            f"{type(model).__name__}")
        saved = str(arch.get("class", "")).rpartition(":")[2]
        root_replaced = "" in manifest.get("modules", {})  # (saved: the quantized root's class)
        if saved and not root_replaced and saved != type(model).__qualname__:
            warnings.warn(f"lowbit.load: {where} was saved from a {saved}, and is loaded into a "
                          f"{type(model).__qualname__}: their layers match by name, but their "
                          "forward may differ; pass the class that was quantized",
                          stacklevel=3)
        return model
    factory = arch.get("factory")
    if factory is None:
        raise ValueError(f"lowbit.load: {where} records no factory; pass the float model: "
                         f"load(path, model=...) (saved from {arch.get('class', '?')})")
    if not trust_factory:
        raise ValueError(f"lowbit.load: pass model=... (a float {arch.get('class', '?')}), or "
                         f"trust_factory=True to import and call {factory!r} recorded in {where}")
    built = _import_factory(factory)(**arch.get("factory_kwargs", {}))
    if not isinstance(built, nn.Module):
        raise LoadError(f"factory {factory!r} returned {type(built).__name__}, not an nn.Module")
    return built


def _rebuild_quantized(name: str, meta: dict[str, Any], float_module: nn.Module | None,
                       where: Path) -> nn.Module:
    """An empty quantized module from its meta, checked against the float layer it replaces."""
    cls = meta.get("class")
    if cls not in QUANTIZED_MODULES:
        raise LoadError(f"{where}: module {name!r} is a {cls!r}, which this lowbit "
                        f"{_lowbit_version()} does not know; upgrade lowbit")
    try:
        module = module_from_meta(meta)
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"{where}: cannot rebuild module {name!r} ({cls}) from its meta: {e}"
                        ) from e
    if isinstance(module, QuantizedRNNBase) and float_module is not None:
        kind = str(cls).removeprefix("Quantized")  # LSTM, GRU, RNN, LSTMCell, ...
        keys = ("input_size", "hidden_size", "bias") + (
            () if kind.endswith("Cell") else ("num_layers", "bidirectional", "proj_size"))
        keys += ("nonlinearity",) if kind.startswith("RNN") else ()
        saved = {k: getattr(module, k) for k in keys}
        have = {k: getattr(float_module, k, 0) for k in keys}
        if type(float_module).__name__ != kind or saved != have:
            raise LoadError(
                f"{where}: the float model does not match the saved model: {name} is "
                f"{type(float_module).__name__} {have}, the saved {cls} replaces an "
                f"nn.{kind} {saved}. Pass the same architecture (and constructor "
                "arguments) that was quantized")
    weight = getattr(float_module, "weight", None)
    expected = _weight_shape(meta)
    if expected and isinstance(meta.get("extra"), dict) and meta["extra"].get("hf_conv1d"):
        expected = expected[::-1]  # transformers' Conv1D holds its weight as [in, out]
    if isinstance(weight, torch.Tensor) and expected and list(weight.shape) != expected:
        raise LoadError(
            f"{where}: the float model does not match the saved model: {name} has a weight of "
            f"shape {list(weight.shape)}, the saved {cls} replaces one of shape {expected}. "
            "Pass the same architecture (and constructor arguments) that was quantized")
    return module


def _build_replacements(manifest: dict[str, Any], skeleton: nn.Module, where: Path
                        ) -> dict[str, nn.Module]:
    names = dict(skeleton.named_modules(remove_duplicate=False))
    built: dict[str, nn.Module] = {}
    for name, entry in sorted(manifest.get("modules", {}).items(),  # a module's other names
                              key=lambda kv: (kv[1].get("kind") == "shared",  # after it
                                              kv[0].count("."))):
        parent = name.rpartition(".")[0]
        if name not in names and parent not in built:
            raise LoadError(
                f"{where}: the float model has no module {name!r}; pass the same architecture "
                f"that was quantized ({manifest.get('architecture', {}).get('class', '?')})")
        kind = entry.get("kind")
        if kind in ("quantized", "lora"):
            module = _rebuild_quantized(name, entry.get("meta", {}), names.get(name), where)
            if kind == "lora":
                try:
                    module = LoRALinear.from_config(module, entry["lora"])
                except (KeyError, TypeError, ValueError) as e:
                    raise LoadError(f"{where}: cannot rebuild the LoRA adapter of {name!r} "
                                    f"from {entry.get('lora')!r}: {e}") from e
            built[name] = module
        elif kind == "replace" and entry.get("class") in REPLACEMENTS:
            old = names.get(name)
            if entry["class"] == "Identity" and old is not None and not _absorbed_kind(old):
                raise LoadError(
                    f"{where}: the file has an Identity at {name!r} (a ReLU, GELU or max-pool "
                    "run inside the layer before it, or a BatchNorm folded into it), but the "
                    f"float model has a {type(old).__name__} there, which lowbit never absorbs; "
                    "pass the same architecture that was quantized "
                    f"({manifest.get('architecture', {}).get('class', '?')})")
            built[name] = REPLACEMENTS[entry["class"]](**entry.get("config", {}))
        elif kind == "shared" and entry.get("of") in built:
            built[name] = built[entry["of"]]
        else:
            raise LoadError(f"{where}: unknown module entry for {name!r}: {entry!r}")
        owner = next((a for a in enclosing_names(name)[1:] if a in built), None)
        if owner is not None:  # inside another replacement (attention projections): goes in it
            built[owner].set_submodule(name[len(owner) + 1:], built[name])
    return built


def _absorbed_kind(module: nn.Module) -> bool:
    """Whether quantizing puts an ``nn.Identity`` in this float module's place: a ReLU, GELU
    or max-pool fused into the layer before it, a BatchNorm folded into it (or an Identity)."""
    absorbed = nn.Identity | nn.ReLU | nn.MaxPool2d | nn.modules.batchnorm._BatchNorm
    return isinstance(module, absorbed) or gelu_approximate(module) is not None


def _expected_state(skeleton: nn.Module, built: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The state dict the skeleton will have after the replacements, computed without them."""
    if "" in built:  # the root module itself was quantized
        return dict(built[""].state_dict(keep_vars=True))
    state = dict(skeleton.state_dict(keep_vars=True))
    for name in built:
        prefix = name + "."
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
    for name, module in built.items():
        if any(name.startswith(other + ".") for other in built):
            continue  # inside another replacement: already counted there
        state.update({f"{name}.{k}": v for k, v in module.state_dict(keep_vars=True).items()})
    return state


def _meta_tensors(skeleton: nn.Module, built: dict[str, nn.Module],
                  tensors: Mapping[str, torch.Tensor], where: Path) -> bool:
    """Whether the skeleton holds tensors on the ``meta`` device (built without memory, e.g.
    under ``torch.device("meta")``), which loading then replaces by the file's tensors; a
    LoadError, before anything changes, for meta tensors the file does not hold (buffers the
    model computes in its constructor)."""
    if "" in built:
        return False
    state = dict(skeleton.state_dict(keep_vars=True))
    kept = {k: v for k, v in dict(skeleton.named_buffers(remove_duplicate=False)).items()
            if k not in state}  # non-persistent buffers: never in a state dict
    kept.update(state)
    replaced = [name + "." for name in built]
    meta = [k for k, v in kept.items() if v.is_meta and not any(k.startswith(r) for r in replaced)]
    missing = [k for k in meta if k not in tensors]
    if missing:
        raise LoadError(
            f"{where}: the float model holds tensors on the meta device that the file does not "
            f"have: {missing[:5]}{' ...' if len(missing) > 5 else ''} (buffers the model "
            "computes in its constructor). Build the model with its buffers on the CPU (e.g. "
            "under accelerate's init_empty_weights(), which leaves buffers alone), or the whole "
            "model on the CPU")
    return bool(meta)


def _tied_parameters(model: nn.Module) -> list[list[tuple[nn.Module, str]]]:
    """Groups of (module, attribute) holding the same Parameter (tied weights), 2 or more."""
    groups: dict[int, list[tuple[nn.Module, str]]] = {}
    for module in model.modules():
        for attr, param in module._parameters.items():
            if param is not None:
                groups.setdefault(id(param), []).append((module, attr))
    return [g for g in groups.values() if len(g) > 1]


def _check_compatible(expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
                      where: Path) -> None:
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    problems = []
    if missing:
        problems.append(f"missing from the file: {missing[:5]}" + (" ..." if len(missing) > 5
                                                                   else ""))
    if unexpected:
        problems.append(f"not in the model: {unexpected[:5]}" + (" ..." if len(unexpected) > 5
                                                                 else ""))
    for k in sorted(set(expected) & set(tensors)):
        e, t = expected[k], tensors[k]
        if tuple(e.shape) != tuple(t.shape):
            problems.append(f"{k}: file has shape {tuple(t.shape)}, model {tuple(e.shape)}")
        elif e.dtype != t.dtype:
            problems.append(f"{k}: file has {t.dtype}, model {e.dtype} (convert the float model "
                            f"with .to({t.dtype}) before loading)")
        if len(problems) >= 6:
            break
    if problems:
        raise LoadError(f"{where}: the float model does not match the saved model: "
                        + "; ".join(problems)
                        + ". Pass the same architecture (and constructor arguments) that was "
                        "quantized")


def load(path: str | os.PathLike[str], model: nn.Module | None = None, *,
         trust_factory: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save`; its outputs are bit-identical to the saved one's.

    The file is fully read and verified (format version, manifest checksum, SHA-256 of the
    tensors) and checked against the float skeleton before anything is changed.

    Args:
        path: the folder or ``.safetensors`` file written by :func:`save`.
        model: the float skeleton (``MyNet()``, same constructor arguments as the model that was
            quantized). It is changed in place and returned. It may be built on the meta device
            (``with torch.device("meta"):``), so that no float weights are allocated: it then
            takes every tensor from the file (its tied weights stay tied); buffers it computes
            in its constructor, which the file lacks, must be on a real device.
        trust_factory: when ``model`` is None, import and call the factory recorded at save time
            (``save(..., factory="package.module:function")``). Off by default: importing runs
            code named by the file.

    Returns:
        The quantized model in eval mode, with the manifest as ``model.lowbit_manifest``.

    Raises:
        FileNotFoundError: no such file.
        LoadError: truncated, tampered or corrupted file; unknown format version (named);
            a skeleton that does not match the saved model (the message lists the differences).
        ValueError: neither ``model`` nor an allowed factory.

    Example:
        >>> import tempfile
        >>> from lowbit.models import MLP
        >>> from lowbit.ptq import quantize_weight_only
        >>> kwargs = {"in_features": 64, "hidden": [32], "num_classes": 4}
        >>> q = quantize_weight_only(MLP(**kwargs), bits=4, group_size=32)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save(q, d + "/q.safetensors", factory="lowbit.models:MLP",
        ...              factory_kwargs=kwargs)
        ...     r = load(d + "/q.safetensors", trust_factory=True)  # or model=MLP(**kwargs)
        >>> x = torch.randn(2, 64); torch.equal(r(x), q(x)), type(r.layers[0]).__name__
        (True, 'Int4Linear')
    """
    p, manifest, tensors = _read_verified(path)
    skeleton = _skeleton(manifest, model, trust_factory, p)
    built = _build_replacements(manifest, skeleton, p)
    _check_compatible(_expected_state(skeleton, built), tensors, p)
    on_meta = _meta_tensors(skeleton, built, tensors, p)
    if "" in built:  # the root module itself was quantized: the skeleton is not reused
        root = built[""]
        root.load_state_dict(tensors, strict=True)
        return _finish(root, manifest)
    originals: dict[str, nn.Module] = {}
    try:
        for name, module in built.items():
            if any(name.startswith(other + ".") for other in originals):
                continue
            old = skeleton.get_submodule(name)
            originals[name] = old
            ref = next(iter(old.parameters()), None)
            if ref is None:
                ref = next(iter(old.buffers()), None)
            keep = ref is None or ref.is_meta  # a meta skeleton: the file's tensors are used
            skeleton.set_submodule(name, module if keep else module.to(ref.device))
        ties = _tied_parameters(skeleton) if on_meta else []
        skeleton.load_state_dict(tensors, strict=True, assign=on_meta)
        for group in ties:  # assign=True gives each name its own Parameter: tie them again
            first = getattr(*group[0])
            for module, attr in group[1:]:
                setattr(module, attr, first)
    except Exception:
        for name, old in originals.items():  # leave the caller's skeleton as it was
            skeleton.set_submodule(name, old)
        raise
    return _finish(skeleton, manifest)


def _finish(model: nn.Module, manifest: dict[str, Any]) -> nn.Module:
    """Eval mode, the manifest attached; a LoRA model has only its adapters trainable."""
    disable_fused_fast_paths(model)  # nn.TransformerEncoderLayer would read linear1.weight
    if any(e.get("kind") == "lora" for e in manifest.get("modules", {}).values()):
        mark_only_lora_trainable(model)
    model.eval()
    model.lowbit_manifest = manifest
    return guard_save_pretrained(model)  # (transformers: from_pretrained would misread it)


# ---------------------------------------------------------------------------------- inspect
@dataclass
class SavedLayer:
    """One quantized layer of a saved model (a row of ``lowbit inspect``).

    Attributes:
        name: qualified module name.
        cls: lowbit module class.
        scheme: short description (weight bits/granularity, activations).
        bits: weight bits.
        shape: shape of the float weight it replaces.
        scale_min, scale_max: range of its weight scales.
        nbytes: bytes of its tensors in the file.
    """

    name: str
    cls: str
    scheme: str
    bits: int
    shape: list[int]
    scale_min: float
    scale_max: float
    nbytes: int


def _scheme_text(meta: Mapping[str, Any]) -> str:
    w = meta.get("weight_spec") or {}
    text = f"W{w.get('bits', '?')} {w.get('granularity', '?')}"
    if w.get("group_size"):
        text += f"/{w['group_size']}"
    a = meta.get("activation_spec")
    if not a:
        return text + ", float activations"
    how = "calibrated" if meta.get("mode") == "static" else "run-time"
    extra = meta.get("extra") or {}
    if meta.get("mode") == "static" and extra.get("calibrator"):
        how += f" ({extra['calibrator']})"
    granularity = a.get("granularity", "?")
    if meta.get("mode") == "dynamic" and "in_channels" in meta:  # a dynamic conv: one scale
        granularity = "per_tensor"  # for its whole input (as the layer computes it)
    return text + f", A{a.get('bits', '?')} {granularity} {how}"


def _weight_shape(meta: Mapping[str, Any]) -> list[int]:
    if "in_features" in meta:
        return [meta["out_features"], meta["in_features"]]
    if "in_channels" in meta:
        groups = (meta.get("geometry") or {}).get("groups", 1)
        return [meta["out_channels"], meta["in_channels"] // groups, *meta["kernel_size"]]
    if "hidden_size" in meta:  # LSTM / GRU / RNN (cell): the first input projection
        return next(iter(rnn_weight_shapes(meta).values()))
    for a, b in (("num_embeddings", "embedding_dim"), ("n", "k")):
        if a in meta:
            return [meta[a], meta[b]]
    return []


def layer_rows(metas: Mapping[str, Mapping[str, Any]], state: Mapping[str, torch.Tensor]
               ) -> list[SavedLayer]:
    """:class:`SavedLayer` rows from ``{name: module meta}`` and the model's state dict.

    Example:
        >>> from lowbit.modules import QuantizedLinear
        >>> from lowbit.config import QuantizationConfig
        >>> q = QuantizedLinear.from_float(nn.Linear(4, 2), QuantizationConfig.int8_dynamic())
        >>> row = layer_rows({"fc": q.meta()}, {f"fc.{k}": v for k, v in q.state_dict().items()})
        >>> row[0].bits, row[0].shape
        (8, [2, 4])
    """
    rows = []
    for name, meta in metas.items():
        prefix = f"{name}." if name else ""
        own = {k: v for k, v in state.items() if k.startswith(prefix)}
        scale = next((own[f"{prefix}{w}_scale"] for w in WEIGHT_NAMES
                      if f"{prefix}{w}_scale" in own), None)
        rows.append(SavedLayer(
            name=name, cls=str(meta.get("class")), scheme=_scheme_text(meta),
            bits=int((meta.get("weight_spec") or {}).get("bits", 0)),
            shape=_weight_shape(meta),
            scale_min=float(scale.min()) if scale is not None and scale.numel() else float("nan"),
            scale_max=float(scale.max()) if scale is not None and scale.numel() else float("nan"),
            nbytes=sum(t.numel() * t.element_size() for t in own.values())))
    return rows


def describe(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a saved file holds, verified: manifest summary and one row per quantized layer.

    Args:
        path: the folder or ``.safetensors`` file written by :func:`save`.

    Returns:
        ``{"path", "file_bytes", "format_version", "lowbit_version", "torch_version",
        "architecture", "layers": [SavedLayer as dict], "float_bytes", "replacements",
        "adapters": {LoRA layer: its config}}`` (a LoRA layer's base is listed as
        ``"<layer>.base"``).

    Raises:
        FileNotFoundError, LoadError: as :func:`load`.

    Example:
        >>> import tempfile
        >>> from lowbit.ptq import quantize_dynamic
        >>> q = quantize_dynamic(nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 2)))
        >>> with tempfile.TemporaryDirectory() as d:
        ...     _ = save(q, d)
        ...     info = describe(d)
        >>> [(r["name"], r["bits"]) for r in info["layers"]]
        [('0', 8), ('2', 8)]
    """
    p, manifest, tensors = _read_verified(path)
    modules = manifest.get("modules", {})
    metas = {n: e["meta"] for n, e in modules.items() if e.get("kind") == "quantized"}
    adapters = {n: e["lora"] for n, e in modules.items() if e.get("kind") == "lora"}
    metas.update({f"{n}.base" if n else "base": modules[n]["meta"] for n in adapters})
    rows = layer_rows(metas, tensors)
    in_layers = {k for k in tensors for n in metas if k.startswith(f"{n}." if n else "")}
    aliases = manifest.get("aliases", {})
    float_bytes = sum(t.numel() * t.element_size() for k, t in tensors.items()
                      if k not in in_layers and k not in aliases)
    return {
        "path": str(p), "file_bytes": p.stat().st_size,
        "format_version": manifest["format_version"],
        "lowbit_version": manifest.get("lowbit_version"),
        "torch_version": manifest.get("torch_version"),
        "architecture": manifest.get("architecture"),
        "layers": [vars(r) for r in rows], "float_bytes": float_bytes,
        "replacements": sorted(n for n, e in modules.items() if e.get("kind") == "replace"),
        "adapters": adapters,
    }
