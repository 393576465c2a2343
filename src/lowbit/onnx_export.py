"""Export lowbit models to ONNX and run them in ONNX Runtime.

``export_onnx(qmodel, example_inputs, path, opset=18)`` writes standard ONNX: static INT8 as
QDQ that ONNX Runtime fuses into its integer kernels, dynamic INT8 as per-token quantization +
``MatMulInteger`` with lowbit's float epilogue, weight-only INT4 / INT8 as ``MatMulNBits``.
``OnnxRuntimeModule(path_or_model_proto)`` runs the result like the PyTorch module. The code
lives in the :mod:`lowbit.onnx` package; this module is its stable import path (see
``docs/reference/onnx.md``; the two names carry runnable examples).
"""

from lowbit.onnx import OnnxRuntimeModule, export_onnx

__all__ = ["OnnxRuntimeModule", "export_onnx"]
