"""Export lowbit models to ONNX and run them in ONNX Runtime.

``export_onnx(qmodel, example_inputs, path, opset=18)`` writes standard ONNX: static INT8 as
QDQ that ONNX Runtime fuses into its integer kernels, dynamic INT8 as per-token quantization +
``MatMulInteger`` with lowbit's float epilogue, weight-only INT4 / INT8 as ``MatMulNBits``.
``OnnxRuntimeModule(path_or_model_proto)`` runs the result like the PyTorch module. The code
lives in the :mod:`lowbit.onnx` package; this module is its stable import path.

Example:
    >>> import torch, lowbit
    >>> qmodel = lowbit.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(16, 4)))
    >>> ort_model = OnnxRuntimeModule(export_onnx(qmodel, torch.randn(2, 16), None))
    >>> ort_model(torch.randn(3, 16)).shape
    torch.Size([3, 4])
"""

from lowbit.onnx import OnnxRuntimeModule, export_onnx

__all__ = ["OnnxRuntimeModule", "export_onnx"]
