"""Execution backends for quantized models: list them, compare them, pick one, switch.

=================  =====  =============================================================
backend            kind   what runs the quantized layers
=================  =====  =============================================================
``reference``      layer  pure PyTorch (float64 over integer codes / dequantize + float op)
``native``         layer  lowbit's kernels for this CPU's ISA path (the default)
``torch``          layer  PyTorch's integer ops (``_int_mm``, packed INT4 / INT8 mm)
``cuda``           model  the model on a CUDA GPU
``onnxruntime``    model  the model exported to ONNX, in an ONNX Runtime session
``torch.compile``  model  Inductor; quantized layers are the op ``lowbit::quantized_layer``
``aotinductor``    model  ``torch.export`` + AOTInductor: the same graph compiled ahead of time
=================  =====  =============================================================

Example:
    >>> import torch, lowbit
    >>> from lowbit import backends
    >>> qmodel = lowbit.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(16, 8)))
    >>> backends.available()["reference"].available
    True
    >>> x = torch.randn(4, 16)
    >>> with backends.use("reference"):
    ...     y = qmodel(x)
    >>> torch.equal(y, qmodel(x))
    True
"""

from lowbit.backends import builtin  # noqa: F401  (registers the built-in backends)
from lowbit.backends.builtin import AOTInductorModule, DeviceModule
from lowbit.backends.compare import (
    BackendComparison,
    BackendResult,
    Selection,
    compare,
    select_best,
)
from lowbit.backends.registry import (
    Backend,
    BackendStatus,
    BackendStatusList,
    BackendUnavailableError,
    available,
    get_backend,
    register_backend,
    require,
    set_backend,
    use,
)

__all__ = [
    "AOTInductorModule",
    "Backend",
    "BackendComparison",
    "BackendResult",
    "BackendStatus",
    "BackendStatusList",
    "BackendUnavailableError",
    "DeviceModule",
    "Selection",
    "available",
    "compare",
    "get_backend",
    "register_backend",
    "require",
    "select_best",
    "set_backend",
    "use",
]
