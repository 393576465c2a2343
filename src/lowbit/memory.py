"""A reuse pool for the large outputs of quantized layers (what ONNX Runtime's arena does).

With glibc's default allocator, a multi-megabyte tensor freed after a forward is often returned
to the OS (``munmap``, or a heap trim), and the next forward page-faults a fresh copy back in:
about 1.2 us per 4 KiB page, 25 MB = 7.5 ms for one FFN activation of a 4,096-token batch,
which was half the time of an INT8 encoder block. Whether that happens changes from one process
to the next, so timings flipped by 1.7x between identical runs.

:func:`empty` hands out output tensors of at least :data:`POOL_MIN_BYTES` from blocks lowbit
keeps mapped: a block goes back to the pool when the last tensor (or view, or NumPy array)
using its memory is freed, never earlier, so a caller may keep, view or modify any output.
Smaller tensors come from ``torch.empty``. The pool keeps at most ``LOWBIT_OUTPUT_POOL_MB``
(default 256) MiB of free blocks; ``LOWBIT_OUTPUT_POOL_MB=0`` turns it off, and
:func:`release_output_pool` frees the cached blocks.

Example:
    >>> y = empty((1024, 512))  # 2 MiB: from the pool
    >>> y.shape, y.dtype
    (torch.Size([1024, 512]), torch.float32)
    >>> del y
    >>> output_pool_stats()["free_bytes"] >= 0
    True
"""

from __future__ import annotations

import math
import os
import threading
import weakref
from typing import Any

import numpy as np
import torch

__all__ = ["POOL_MIN_BYTES", "empty", "output_pool_stats", "release_output_pool", "trim_heap"]

#: Outputs of at least this many bytes come from the pool (smaller ones stay on glibc's heap,
#: which keeps them mapped anyway).
POOL_MIN_BYTES = 1 << 20
_ALIGN = 64  # bytes; the C kernels and oneDNN vectorize best on cache-line-aligned rows

# reentrant: a garbage-collection pass inside a locked section may run a finalizer (_release)
_lock = threading.RLock()
_free: dict[int, list[np.ndarray]] = {}  # block size -> free blocks
_state = {"free_bytes": 0, "blocks_made": 0, "reused": 0, "limit": None}


def _limit() -> int:
    if _state["limit"] is None:
        try:
            mb = float(os.environ.get("LOWBIT_OUTPUT_POOL_MB", "256"))
        except ValueError:
            mb = 256.0
        _state["limit"] = max(0, int(mb * (1 << 20)))
    return int(_state["limit"])  # type: ignore[arg-type]


def _release(size: int, block: np.ndarray) -> None:
    """A block's last user is gone: keep it for the next output of its size, within the cap."""
    with _lock:
        if _state["free_bytes"] + size <= _limit():  # type: ignore[operator]
            _free.setdefault(size, []).append(block)
            _state["free_bytes"] += size  # type: ignore[operator]


def empty(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised contiguous CPU tensor; from the pool when it is large (see module doc).

    Args:
        shape: the tensor's shape. dtype: any fixed-size dtype (bfloat16 included).

    Example:
        >>> empty((2, 3)).shape  # small: plain torch.empty
        torch.Size([2, 3])
    """
    size = math.prod(shape) * dtype.itemsize
    if size < POOL_MIN_BYTES or _limit() == 0:
        return torch.empty(shape, dtype=dtype)
    with _lock:
        blocks = _free.get(size)
        block = blocks.pop() if blocks else None
        if block is not None:
            _state["free_bytes"] -= size  # type: ignore[operator]
            _state["reused"] += 1  # type: ignore[operator]
        else:
            _state["blocks_made"] += 1  # type: ignore[operator]
    if block is None:
        block = np.empty(size + _ALIGN, dtype=np.uint8)
    off = -block.ctypes.data % _ALIGN
    view = block[off:off + size]  # a new array object: its lifetime is the output's
    weakref.finalize(view, _release, size, block)
    return torch.from_numpy(view).view(dtype).view(shape)


def output_pool_stats() -> dict[str, Any]:
    """``{"free_bytes", "blocks_made", "reused", "limit_bytes"}`` of the output pool.

    Example:
        >>> sorted(output_pool_stats())
        ['blocks_made', 'free_bytes', 'limit_bytes', 'reused']
    """
    with _lock:
        return {"free_bytes": _state["free_bytes"], "blocks_made": _state["blocks_made"],
                "reused": _state["reused"], "limit_bytes": _limit()}


def release_output_pool() -> int:
    """Free the pool's cached blocks (outputs in use stay valid); returns the bytes released.

    Example:
        >>> release_output_pool() >= 0
        True
    """
    with _lock:
        freed = int(_state["free_bytes"])  # type: ignore[arg-type]
        _free.clear()
        _state["free_bytes"] = 0
        _state["limit"] = None  # re-read LOWBIT_OUTPUT_POOL_MB
    return freed


_LIBC: Any = None  # the C library's handle once looked up; False where it has no malloc_trim


def trim_heap() -> bool:
    """Give freed heap memory back to the OS (glibc's ``malloc_trim``); False where the C
    library has no such call (macOS, musl), which then does nothing.

    Quantizing frees many layer-sized temporaries, and glibc keeps freed heap memory mapped
    unless it sits at the top of the heap: after static quantization of a 1 GiB model of
    4096 x 4096 Linears the process held +0.65-0.95 GiB for 0.26 GiB of INT8 weights, +0.27
    GiB after a trim (30-50 ms). :class:`lowbit.PTQQuantizer` and :func:`lowbit.convert_qat`
    call it when they finish.

    Example:
        >>> isinstance(trim_heap(), bool)
        True
    """
    global _LIBC
    if _LIBC is None:
        import ctypes

        try:
            lib = ctypes.CDLL(None)
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:
            _LIBC = False
    if _LIBC is False:
        return False
    _LIBC.malloc_trim(0)
    return True

