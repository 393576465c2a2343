"""Helpers shared by the kernel modules: which tensors the fused C kernels take, and how far
their memory reaches.
"""

from __future__ import annotations

from typing import Any

import torch

from lowbit._dispatch import native_allowed
from lowbit.native import load_native

#: Activation dtypes the fused C kernels read (and, for the linear epilogue, write).
NATIVE_DTYPES = (torch.float32, torch.bfloat16)


_F32_EPS = torch.finfo(torch.float32).eps


def native_eager(*tensors: torch.Tensor) -> bool:
    """Whether lowbit's C kernels may run on these tensors: plain CPU tensors, in eager mode
    (a C call is invisible to ``torch.jit.trace`` and ``torch.compile``: they would record an
    empty output), not under the ``"torch"`` backend.

    Example:
        >>> native_eager(torch.zeros(2)), native_eager(torch.zeros(2, device="meta"))
        (True, False)
    """
    if not native_allowed() or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return False
    return all(type(t) is torch.Tensor and t.is_cpu for t in tensors)


def native_lib_for(*tensors: torch.Tensor) -> Any:
    """The fused C kernel library when it can run on these tensors (:func:`native_eager`),
    else None (the pure-PyTorch path).

    Example:
        >>> lib = native_lib_for(torch.zeros(2))
        >>> lib is None or hasattr(lib, "lb_epilogue")
        True
    """
    return load_native() if native_eager(*tensors) else None


def c_layout(*pairs: tuple[torch.Tensor | None, torch.dtype]) -> bool:
    """Every given ``(tensor, dtype)`` pair is None or a contiguous tensor of that dtype (the
    layout the C kernels read; modules check their buffers once with it).

    Example:
        >>> c_layout((torch.zeros(2), torch.float32), (None, torch.int32))
        True
    """
    return all(t is None or (t.dtype == dt and t.is_contiguous()) for t, dt in pairs)


def c_rows(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``x [M, K]`` as rows a C kernel reads, with the row stride to pass it: unit stride along
    K and rows at least K apart. An expanded view (``t.expand(M, K)``: row stride 0) or another
    overlapping one is copied; one row keeps its data and is passed with stride K.

    Example:
        >>> x, ld = c_rows(torch.ones(3).expand(4, 3))
        >>> x.stride(), ld
        ((3, 1), 3)
    """
    m, k = x.shape
    if x.stride(-1) != 1 or (m > 1 and x.stride(0) < k):
        x = x.clone(memory_format=torch.contiguous_format)
    return x, (x.stride(0) if m > 1 else k)


def _extent(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage from its first element on: what a C kernel may read there."""
    return t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
