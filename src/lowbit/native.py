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

The INT8 x INT8 GEMM and the INT4 weight kernels (``csrc/lowbit_gemm_*.c``) are built once per
instruction set, each with its own flags (``amx``: the AVX2 source with VNNI and AMX enabled;
``avx512_vnni``: with VNNI; ``avx2``: ``-mavx2 -mfma``; ``portable``: none), and
:func:`selected_isa` picks one at run time from the CPU's features: ``amx`` (AMX tiles; Linux
must grant the tile state), else ``avx512_vnni`` (its C kernels where they win, PyTorch's
``_int_mm``, whose oneDNN kernels are exact with VNNI, at many rows or without its library),
else ``avx2``, else ``portable``, else ``torch`` (PyTorch ops only, no C).
``LOWBIT_ISA=amx|avx512_vnni|avx2|portable|torch`` forces a path (an unavailable one is an error
naming the reason), so one machine can test them all.
"""

from __future__ import annotations

import ctypes
import functools
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
from torch.utils._python_dispatch import _disable_current_modes

__all__ = ["ISA_PATHS", "isa_paths", "load_gemm", "load_native", "native_status", "selected_isa"]

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
    "lb_affine_qparams": (_INT, [_P, _I64, _I32, _I32, _I32, _P, _I64, _P, _P, _P, _INT]),
    "lb_quantize_s8": (_INT, [_P, _INT, _I64, _I64, _I64, _P, _INT, _INT, _P, _I32, _I32, _P,
                              _INT, _P]),
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
    "lb_linear_s8_small": (_INT, [_P, _INT, _I64, _I64, _I64, _P, _INT, _INT, _P, _I32, _I32,
                                  _P, _I64, _P, _P, _P, _INT, _P, _INT, _INT, _P]),
    "lb_qconv_nparams": (_I64, []),
    "lb_qconv_direct": (_INT, [_P] * 7),
    "lb_linear_small_nparams": (_I64, []),
    "lb_linear_small_prepared": (_INT, [_P] * 3),
    "lb_wo_linear_small_nparams": (_I64, []),
    "lb_wo_linear_small_prepared": (_INT, [_P] * 3),
    "lb_wo_conv_nparams": (_I64, []),
    "lb_wo_conv_direct": (_INT, [_P] * 7),
}


_GEMM_SIGNATURES = {
    "lbk_isa": (ctypes.c_char_p, []),
    "lbk_s8_packed_bytes": (_I64, [_I64, _I64]),
    "lbk_s8_split_mode": (_INT, [_INT]),
    "lbk_amx_ok": (_INT, []),
    "lbk_amx_min_rows": (_INT, [_INT]),
    "lbk_amx_u4_min_rows": (_INT, [_INT]),
    "lbk_s8_forms_seen": (_INT, [_INT]),
    "lbk_s8_pack": (_INT, [_P, _I64, _I64, _I64, _P, _I64]),
    "lbk_s8_linear": (_INT, [_P, _INT, _I64, _I64, _I64, _I64, _P, _INT, _INT, _P, _I32, _I32,
                             _P, _I64, _I64, _P, _P, _P, _INT, _INT, _P, _INT, _I64, _INT,
                             _P]),
    "lbk_u4_linear": (_INT, [_P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _I64, _I64, _P, _P, _P,
                             _INT, _P, _I64, _INT]),
    "lbk_u4p_bytes": (_I64, [_I64, _I64]),
    "lbk_u4p_linear": (_INT, [_P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _I64, _I64, _P, _P,
                              _P, _INT, _P, _I64, _INT]),
    "lbk_u4p_linear_s": (_INT, [_P, _I64, _I64, _I64, _I64, _P, _I64, _I64, _I64, _I64, _P, _P,
                                _P, _INT, _P, _I64, _INT, _P]),
    "lbk_rnn_scan": (_INT, [_INT, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _I64, _I64, _P, _I64,
                            _P, _P, _INT, _I32, _I32, _P, _I64, _INT]),
}
_VNNI_FLAGS = ("-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512vnni")
_VNNI_NEEDS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni")
#: The ISA paths in order of preference: name -> (C source or None for PyTorch ops, its flags,
#: the /proc/cpuinfo flags it needs; VNNI and AMX are read by ``lowbit.kernels.cpu_features``,
#: and the ``amx`` library must be granted the tile state by the OS).
ISA_PATHS: dict[str, tuple[str | None, tuple[str, ...], tuple[str, ...]]] = {
    "amx": ("lowbit_gemm_avx2.c", (*_VNNI_FLAGS, "-mamx-tile", "-mamx-int8"),
            (*_VNNI_NEEDS, "amx_tile", "amx_int8")),
    "avx512_vnni": ("lowbit_gemm_avx2.c", _VNNI_FLAGS, _VNNI_NEEDS),
    "avx2": ("lowbit_gemm_avx2.c", ("-mavx2", "-mfma", "-mf16c"), ("avx2", "fma", "f16c")),
    "portable": ("lowbit_gemm_portable.c", (), ()),
    "torch": (None, (), ()),
}
_gemm: dict[str, Any] = {}  # isa -> (CDLL or None, reason)


def _no_c_reason() -> str | None:
    """Why no C library can be built here (disabled, no compiler), or None."""
    if os.environ.get("LOWBIT_NATIVE", "1") == "0":
        return "disabled by LOWBIT_NATIVE=0"
    return "no C compiler found (set CC)" if _compiler() is None else None


def _open(path: Path, signatures: dict[str, tuple[Any, list[Any]]]) -> ctypes.CDLL:
    """The library at ``path`` with the ctypes signatures of its entry points set."""
    lib = ctypes.CDLL(str(path))
    for name, (res, args) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args
    return lib


#: ISA paths that run on PyTorch's ops where their C library cannot be built or loaded
#: (``avx512_vnni``: oneDNN's ``_int_mm`` is exact with VNNI; its C kernels are optional).
_TORCH_BACKED = ("avx512_vnni",)


def _isa_missing(isa: str, library: bool = False) -> str | None:
    """Why an ISA path (``library``: its C library) cannot run here, or None when it can (the
    library is not built)."""
    source, _, needs = ISA_PATHS[isa]
    if isa in ("amx", "avx512_vnni"):
        from lowbit.kernels.select import cpu_features  # (it imports this module)

        if "vnni" not in cpu_features():
            return "the CPU has no VNNI (or ONEDNN_MAX_CPU_ISA excludes it)"
        if isa == "amx" and "amx" not in cpu_features():
            return "the CPU has no AMX-INT8 (or ONEDNN_MAX_CPU_ISA excludes it)"
        if not hasattr(torch, "_int_mm"):
            return "this torch has no _int_mm"
        if not library:
            return None
    flags = set(_cpu_key().split())
    missing = [f for f in needs if f not in flags]
    if missing:
        return f"the CPU lacks {', '.join(missing)}"
    return None if source is None else _no_c_reason()


def load_gemm(isa: str) -> ctypes.CDLL | None:
    """The compiled kernels of one ISA path (``"amx"`` / ``"avx512_vnni"`` / ``"avx2"`` /
    ``"portable"``), or None when that path cannot run here or failed to build
    (:func:`isa_paths` says why; the ``avx512_vnni`` path then runs on PyTorch's ``_int_mm``;
    :func:`native_status`'s ``"libraries"`` says why).

    Example:
        >>> lib = load_gemm("portable")
        >>> lib is None or lib.lbk_isa() == b"portable"
        True
    """
    if isa in _gemm:
        return _gemm[isa][0]
    if isa not in ISA_PATHS or ISA_PATHS[isa][0] is None:
        raise ValueError(f"load_gemm: {isa!r} is not a C ISA path; use one of "
                         f"{[k for k, v in ISA_PATHS.items() if v[0] is not None]}")
    with _lock:
        if isa in _gemm:
            return _gemm[isa][0]
        source, flags, _ = ISA_PATHS[isa]
        lib, reason = None, _isa_missing(isa, library=True)
        if reason is None:
            try:
                cc = _compiler()
                assert cc is not None
                lib = _open(_build(cc, _SOURCE.with_name(source), [*_ISA_BASE_FLAGS, *flags],
                                   cpu_specific=False), _GEMM_SIGNATURES)
                reason = "loaded"
                if isa == "amx" and not lib.lbk_amx_ok():
                    lib, reason = None, ("the OS did not grant the AMX tile state "
                                         "(arch_prctl ARCH_REQ_XCOMP_PERM)")
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                lib, reason = None, f"build or load failed: {exc}"
                _LOG.warning("lowbit: %s kernels unavailable: %s", isa, exc)
        _gemm[isa] = (lib, reason)
        return lib


def isa_paths() -> dict[str, str]:
    """Every ISA path with ``"available"`` or the reason it cannot run here.

    Example:
        >>> isa_paths()["torch"]
        'available'
    """
    out = {}
    for isa, (source, _, _) in ISA_PATHS.items():
        if source is None or isa in _TORCH_BACKED:
            out[isa] = _isa_missing(isa) or "available"
        else:
            out[isa] = "available" if load_gemm(isa) is not None else _gemm[isa][1]
    return out


def selected_isa() -> str:
    """The ISA path lowbit's INT8 GEMM and INT4 kernels run on: ``LOWBIT_ISA`` when set, else
    the first available of ``amx``, ``avx512_vnni``, ``avx2``, ``portable``, ``torch``. Read
    once per process (the kernels call it on every forward).

    Raises:
        ValueError: ``LOWBIT_ISA`` names an unknown path, or one that cannot run here (the
            message says why).

    Example:
        >>> selected_isa() in ISA_PATHS
        True
    """
    if (cached := _gemm.get("selected")) is not None:
        return cached
    forced = os.environ.get("LOWBIT_ISA", "").strip().lower() or None
    if forced is not None:
        if forced not in ISA_PATHS:
            raise ValueError(f"LOWBIT_ISA={forced!r} is unknown; use one of "
                             f"{', '.join(ISA_PATHS)} (or unset it for automatic choice)")
        status = isa_paths()[forced]
        if status != "available":
            usable = [k for k, v in isa_paths().items() if v == "available"]
            raise ValueError(f"LOWBIT_ISA={forced!r} cannot run here: {status}; unset it or "
                             f"pick one of {usable}")
        choice = forced
    else:
        choice = next(k for k, v in isa_paths().items() if v == "available")
    _gemm["selected"] = choice
    return choice


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


#: Flags of the per-ISA GEMM libraries, before each ISA's own (no -march=native: an ISA
#: library runs on every CPU that has its ISA). -fno-trapping-math lets the compiler vectorize
#: float compares (the RNN gates' clamps); no value changes (lowbit never reads FP exceptions).
_ISA_BASE_FLAGS = ["-O3", "-ffp-contract=off", "-fno-strict-aliasing", "-fno-math-errno",
                   "-fno-trapping-math", "-fPIC", "-shared"]


def _build(cc: str, source: Path = _SOURCE, flags: list[str] | None = None,
           cpu_specific: bool = True) -> Path:
    """Compile a library (cached by source and the headers beside it, flags, compiler and,
    for ``-march=native`` builds, the CPU's flags); its path."""
    flags = _FLAGS if flags is None else flags
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=30).stdout
    texts = [source.read_text()] + [h.read_text() for h in sorted(source.parent.glob("*.h"))]
    key = hashlib.sha256("\0".join([*texts, " ".join(flags), version,
                                    _cpu_key() if cpu_specific else "",
                                    platform.machine()]).encode()).hexdigest()[:16]
    folder = _cache_dir()
    target = folder / f"{source.stem}-{key}.so"
    if target.exists():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    _LOG.info("lowbit: building the fused C kernels into %s (once per machine)", target)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=folder)
    os.close(fd)
    try:
        errors = ""
        for omp in (["-fopenmp"], []):  # without libgomp: single-threaded, same results
            proc = subprocess.run([cc, *flags, *omp, "-o", tmp, str(source)],
                                  capture_output=True, text=True, timeout=120)
            if proc.returncode == 0:
                os.replace(tmp, target)  # atomic: concurrent builders race harmlessly
                return target
            errors = proc.stderr.strip()[-2000:]
        raise RuntimeError(f"{cc} failed to build {source.name}: {errors}")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@functools.lru_cache(maxsize=1)
def addcmul_fma() -> bool:
    """Whether ``torch.addcmul`` rounds ``bias + v * s`` once here (the epilogues follow it)."""
    return _addcmul_fuses()


def _addcmul_fuses() -> bool:
    """Whether ``torch.addcmul`` rounds ``bias + v * s`` once (FMA) on this machine.

    Its AVX2 / AVX-512 kernels are compiled with FMA contraction; its portable one (older CPUs,
    or ``ATEN_CPU_CAPABILITY=default``) is not. The epilogue kernels follow whichever rounding
    torch uses here, so that both paths stay bit-identical. Raises when torch's vectorized and
    scalar code disagree (then lowbit keeps to the pure-PyTorch path).

    Runs on real tensors even when the first use of lowbit's kernels is inside a trace
    (``torch.export`` computes a layer's kernel choice under its fake-tensor and
    ``__torch_function__`` modes, where reading a value back raises): the probe steps out of
    those modes instead of failing the load.
    """
    with _disable_current_modes(), torch._C.DisableTorchFunction():
        # v * v needs 26 significant bits: FMA is visible (on the CPU whatever the default
        # device)
        v = torch.full((67,), 1 + 2.0**-12, device="cpu")
        got = torch.addcmul(torch.full((67,), -1.0, device="cpu"), v, v)
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
        lib, path = None, None
        reason = _no_c_reason() or ""
        if not reason:
            try:
                path = _build(_compiler())  # type: ignore[arg-type]
                lib = _open(path, _SIGNATURES)
                lib.lb_set_addcmul_fma(int(addcmul_fma()))
                reason = "loaded"
            except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
                lib, reason = None, f"build or load failed: {exc}"
                _LOG.warning("lowbit: fused C kernels unavailable, using the pure-PyTorch "
                             "path (same results, slower on small shapes): %s", exc)
        _state.update(lib=lib, tried=True, reason=reason, path=None if path is None else str(path))
        return lib


def native_status() -> dict[str, Any]:
    """Whether the fused C kernels are in use and which ISA path runs the INT8 / INT4 GEMMs:
    ``{"available", "reason", "path", "isa", "isa_paths", "libraries"}`` (``isa_paths``: every
    path with ``"available"`` or why not; ``isa``: :func:`selected_isa`, or the error it
    raises; ``libraries``: each ISA path's C library, ``"loaded"`` or why not).

    Example:
        >>> sorted(native_status())
        ['available', 'isa', 'isa_paths', 'libraries', 'path', 'reason']
    """
    load_native()
    try:
        isa = selected_isa()
    except ValueError as exc:
        isa = f"error: {exc}"
    paths = isa_paths()
    libraries = {}
    for name, (source, _, _) in ISA_PATHS.items():
        if source is not None:
            load_gemm(name)
            libraries[name] = _gemm[name][1]
    return {"available": _state["lib"] is not None, "reason": _state["reason"],
            "path": _state["path"], "isa": isa, "isa_paths": paths, "libraries": libraries}


def threads_for(numel: int) -> int:
    """OpenMP threads for a kernel over ``numel`` elements: 1 when small, else torch's count."""
    return 1 if numel < PARALLEL_MIN_ELEMENTS else torch.get_num_threads()


def _reset_for_tests() -> None:
    """Forget the loaded library so the next :func:`load_native` re-reads the environment."""
    with _lock:
        _state.update(lib=None, tried=False, reason="not loaded yet", path=None)
        _gemm.clear()
        addcmul_fma.cache_clear()
