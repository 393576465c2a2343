"""ONNX export of lowbit models and an ONNX Runtime module (see :mod:`lowbit.onnx_export`).

``_ops``: export-only torch ops and their ONNX translations; ``_layers``: the quantized layers'
export stand-ins; ``_export``: :func:`export_onnx`; ``_runtime``: :class:`OnnxRuntimeModule`.
"""

from lowbit.onnx._export import export_onnx
from lowbit.onnx._runtime import CPU_DISABLED_OPTIMIZERS, OnnxRuntimeModule

__all__ = ["CPU_DISABLED_OPTIMIZERS", "OnnxRuntimeModule", "export_onnx"]
