"""Fused CPU kernels in C (``csrc/lowbit_kernels.c``), built on first use and called via ctypes.

Eager PyTorch spends most of a small quantized layer's time dispatching ops: dynamic per-token
quantization is ~8 ops and the epilogue 3-4, each a few microseconds plus a pass over memory.
The C kernels do each in one call and one pass, computing the same float32 operations in the
same order as the pure-PyTorch path (no implicit FMA contraction, ``torch.addcmul``'s rounding
as probed on this machine, round half to even), so both give the same bits: the tests compare
them on every path.

The library is compiled once per source/CPU/compiler with the system C compiler
(``$CC``, else ``cc``; ``-O3 -march=native -fopenmp``, OpenMP resolving to the runtime PyTorch
already loaded) into ``$LOWBIT_CACHE_DIR`` (default ``~/.cache/lowbit``), atomically. Without a
compiler, or with ``LOWBIT_NATIVE=0``, lowbit runs its pure-PyTorch path: same results, slower
on small shapes. :func:`native_status` says which is in use and why.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch

__all__ = ["load_native", "native_status"]

_LOG = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("csrc") / "lowbit_kernels.c"
_FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fno-strict-aliasing",
          "-fno-math-errno", "-fPIC", "-shared"]
#: Below this many elements a kernel runs on one thread (OpenMP fork/join costs ~2-5 us).
PARALLEL_MIN_ELEMENTS = 1 << 15

_lock = threading.Lock()
_state: dict[str, Any] = {"lib": None, "tried": False, "reason": "not loaded yet", "path": None}

_P, _I64, _I32, _INT, _F = (ctypes.c_void_p, ctypes.c_int64, ctypes.c_int32, ctypes.c_int,
                           ctypes.c_float)
_SIGNATURES = {
    "lb_set_addcmul_fma": (None, [_INT]),
    "lb_absmax": (_F, [_P, _INT, _I64, _I64, _I64, _INT]),
    "lb_quantize_s8": (None, [_P, _INT, _I64, _I64, _I64, _P, _INT, _INT, _P, _I32, _I32, _P,
                              _INT]),
    "lb_quantize_centered_f32": (None, [_P, _I64, _P, _INT, _I32, _I32, _I32, _P, _INT]),
    "lb_epilogue": (None, [_P, _INT, _I64, _I64, _I64, _P, _INT, _P, _P, _INT, _P, _INT]),
    "lb_quantize_nhwc_padded_s8": (None, [_P, _I64, _I64, _I64, _I64, _I64, _I64, _P, _INT,
                                          _I32, _I32, _I32, _P, _INT]),
    "lb_im2col_nhwc_s8": (None, [_P, *[_I64] * 12, _P, _INT]),
    "lb_epilogue_to_nchw": (None, [_P, _I64, _I64, _I64, _P, _P, _P, _INT, _P, _INT]),
    "lb_maxpool2d": (None, [_P, _I64, _I64, _I64, _I64, _P, _INT]),
    "lb_dequantize_weight": (None, [_P, _INT, _INT, _I64, _I64, _I64, _I64, _P, _P, _P, _INT]),
    "lb_wo_linear_small": (_INT, [_P, _I64, _I64, _I64, _P, _INT, _INT, _I64, _I64, _I64, _P,
                                  _P, _P, _INT, _P, _INT]),
    "lb_conv2d_f32_small": (_INT, [_P, _I64, _I64, _I64, _I64, _P, *[_I64] * 9, _P, _INT, _P,
                                   _INT]),
    "lb_wo_conv2d_small": (_INT, [_P, _I64, _I64, _I64, _I64, _P, _INT, _INT, _I64, _I64, _P, _P,
                                  *[_I64] * 9, _P, _INT, _P, _INT]),
    "lb_linear_s8_small": (None, [_P, _INT, _I64, _I64, _I64, _P, _INT, _INT, _P, _I32, _I32,
                                  _P, _I64, _P, _P, _P, _INT, _P, _INT, _INT]),
}


def _cache_dir() -> Path:
    env = os.environ.get("LOWBIT_CACHE_DIR")
    if env:
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lowbit"


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            flags = next((ln for ln in fh if ln.startswith("flags")), "")
    except OSError:
        flags = platform.processor()
    return flags


def _build(cc: str) -> Path:
    """Compile the library (cached by source, flags, compiler and CPU flags); its path."""
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    key = hashlib.sha256("\0".join([_SOURCE.read_text(), " ".join(_FLAGS), version,
                                    _cpu_key(), platform.machine()]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"lowbit_kernels-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    _LOG.info("lowbit: building the fused C kernels into %s (once per machine)", target)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        errors = ""
        for omp in (["-fopenmp"], []):  # without libgomp: single-threaded, same results
            proc = subprocess.run([cc, *_FLAGS, *omp, "-o", tmp, str(_SOURCE)],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
                return target
            errors = proc.stderr.strip()[-2000:]
        raise RuntimeError(f"{cc} failed to build {_SOURCE.name}: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _addcmul_fuses() -> bool:
    """Whether ``torch.addcmul`` rounds ``bias + v * s`` once (FMA) on this machine.

    Its AVX2 / AVX-512 kernels are compiled with FMA contraction; its portable one (older CPUs,
    or ``ATEN_CPU_CAPABILITY=default``) is not. The epilogue kernels follow whichever rounding
    torch uses here, so that both paths stay bit-identical. Raises when torch's vectorized and
    scalar code disagree (then lowbit keeps to the pure-PyTorch path).
    """
    v = torch.full((67,), 1 + 2.0**-12)  # v * v needs 26 significant bits: FMA is visible
    got = torch.addcmul(torch.full((67,), -1.0), v, v)
    fused = float(got[0]) == 2.0**-11 + 2.0**-24
    if bool((got != got[0]).any()):
        raise RuntimeError("torch.addcmul rounds its vector and scalar lanes differently")
    return fused


def load_native() -> ctypes.CDLL | None:
    """The compiled kernel library, building it on first call; None when unavailable.

    Unavailable means ``LOWBIT_NATIVE=0``, no C compiler, or a failed build (logged at
    WARNING); :func:`native_status` gives the reason. Thread-safe; the result is cached.

    Example:
        >>> lib = load_native()
        >>> lib is None or hasattr(lib, "lb_quantize_s8")
        True
    """
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if _state["tried"]:
            return _state["lib"]
        lib, reason, path = None, "", None
        if os.environ.get("LOWBIT_NATIVE", "1") == "0":
            reason = "disabled by LOWBIT_NATIVE=0"
        elif (cc := _compiler()) is None:
            reason = "no C compiler found (set CC)"
        else:
            try:
                path = _build(cc)
                lib = ctypes.CDLL(str(path))
                for name, (res, args) in _SIGNATURES.items():
                    fn = getattr(lib, name)
                    fn.restype, fn.argtypes = res, args
                lib.lb_set_addcmul_fma(int(_addcmul_fuses()))
                reason = "loaded"
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                lib, reason = None, f"build or load failed: {exc}"
                _LOG.warning("lowbit: fused C kernels unavailable, using the pure-PyTorch "
                             "path (same results, slower on small shapes): %s", exc)
        _state.update(lib=lib, tried=True, reason=reason, path=None if path is None else str(path))
        return lib


def native_status() -> dict[str, Any]:
    """Whether the fused C kernels are in use: ``{"available", "reason", "path"}``.

    Example:
        >>> sorted(native_status())
        ['available', 'path', 'reason']
    """
    load_native()
    return {"available": _state["lib"] is not None, "reason": _state["reason"],
            "path": _state["path"]}


def threads_for(numel: int) -> int:
    """OpenMP threads for a kernel over ``numel`` elements: 1 when small, else torch's count."""
    return 1 if numel < PARALLEL_MIN_ELEMENTS else torch.get_num_threads()


def _reset_for_tests() -> None:
    """Forget the loaded library so the next :func:`load_native` re-reads the environment."""
    with _lock:
        _state.update(lib=None, tried=False, reason="not loaded yet", path=None)
