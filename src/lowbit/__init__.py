"""lowbit: quantize PyTorch models to INT8/INT4 that run on real integer kernels.

Example:
    >>> import torch, lowbit
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    >>> qmodel = lowbit.quantize_dynamic(model)
    >>> qmodel[0].weight.dtype, qmodel(torch.randn(2, 16)).shape
    (torch.int8, torch.Size([2, 16]))
"""

from lowbit import ops
from lowbit.calibration import CalibrationRecord
from lowbit.calibrators import (
    Calibrator,
    EntropyCalibrator,
    MinMaxCalibrator,
    MovingAverageCalibrator,
    MSECalibrator,
    PercentileCalibrator,
    available_calibrators,
    create_calibrator,
    register_calibrator,
)
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.modules import (
    Int4Linear,
    Int8WeightOnlyLinear,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
)
from lowbit.ptq import (
    PTQQuantizer,
    QuantizationReport,
    Quantizer,
    quantize_dynamic,
    quantize_static,
    quantize_weight_only,
)

__version__ = "0.1.0"

__all__ = [
    "CalibrationRecord",
    "Calibrator",
    "EntropyCalibrator",
    "Int4Linear",
    "Int8WeightOnlyLinear",
    "MSECalibrator",
    "MinMaxCalibrator",
    "MovingAverageCalibrator",
    "PTQQuantizer",
    "PercentileCalibrator",
    "QuantSpec",
    "QuantizationConfig",
    "QuantizationReport",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "Quantizer",
    "__version__",
    "available_calibrators",
    "create_calibrator",
    "ops",
    "quantize_dynamic",
    "quantize_static",
    "quantize_weight_only",
    "register_calibrator",
]
