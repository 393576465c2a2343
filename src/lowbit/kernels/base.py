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


def native_lib_for(*tensors: torch.Tensor) -> Any:
    """The fused C kernel library when it can run on these tensors (plain CPU tensors, eager
    mode, not the ``"torch"`` backend), else None (the pure-PyTorch path).

    Example:
        >>> lib = native_lib_for(torch.zeros(2))
        >>> lib is None or hasattr(lib, "lb_epilogue")
        True
    """
    if not native_allowed():  # a "torch"-backend layer is running
        return None
    lib = load_native()
    if lib is None or torch.jit.is_tracing() or torch.compiler.is_compiling():
        return None
    for t in tensors:
        if type(t) is not torch.Tensor or not t.is_cpu:
            return None
    return lib


def c_layout(*pairs: tuple[torch.Tensor | None, torch.dtype]) -> bool:
    """Every given ``(tensor, dtype)`` pair is None or a contiguous tensor of that dtype (the
    layout the C kernels read; modules check their buffers once with it).

    Example:
        >>> c_layout((torch.zeros(2), torch.float32), (None, torch.int32))
        True
    """
    return all(t is None or (t.dtype == dt and t.is_contiguous()) for t, dt in pairs)


def _extent(t: torch.Tensor) -> int:
    """Bytes of ``t``'s storage from its first element on: what a C kernel may read there."""
    return t.untyped_storage().nbytes() - t.storage_offset() * t.element_size()
