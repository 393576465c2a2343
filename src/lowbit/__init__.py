"""lowbit: quantize PyTorch models to INT8/INT4 that run on real integer kernels.

Example:
    >>> import torch, lowbit
    >>> model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU())
    >>> qmodel = lowbit.quantize_dynamic(model)
    >>> qmodel[0].qweight.dtype, qmodel(torch.randn(2, 16)).shape
    (torch.int8, torch.Size([2, 16]))
"""

from lowbit import backends, distributed, ops
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
from lowbit.checkpoint import load_checkpoint, save_checkpoint
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.distributed import DistributedSyncError
from lowbit.evaluation import (
    ComparisonRow,
    ComparisonTable,
    LatencyStats,
    OutputError,
    compare_models,
    compare_outputs,
    evaluate_accuracy,
    measure_latency,
    model_nbytes,
    quantized_weight_nbytes,
)
from lowbit.fake_quantize import FakeQuantize
from lowbit.lora import LoRALinear, add_lora, lora_parameters, mark_only_lora_trainable
from lowbit.lora_adapters import load_adapters, save_adapters
from lowbit.lora_merge import MergeReport, merge_lora
from lowbit.lora_peft import register_peft
from lowbit.memory import output_pool_stats, release_output_pool
from lowbit.modules import (
    QUANTIZED_MODULES,
    Int4Linear,
    Int8WeightOnlyLinear,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    WeightOnlyConv1d,
    WeightOnlyConv2d,
    check_supported,
    convert_module,
    module_from_meta,
)
from lowbit.native import native_status
from lowbit.onnx_export import OnnxRuntimeModule, export_onnx
from lowbit.ptq import (
    PTQQuantizer,
    QuantizationReport,
    Quantizer,
    quantize_dynamic,
    quantize_static,
    quantize_weight_only,
)
from lowbit.qat import (
    QATConfig,
    QATLayer,
    QATPreparer,
    convert_qat,
    freeze_bn_stats,
    get_qat_statistics,
    prepare_qat,
    set_fake_quant_enabled,
    set_observer_enabled,
)
from lowbit.qat_stats import QATStatistics
from lowbit.report import report
from lowbit.sensitivity import (
    LayerSensitivity,
    SensitivityReport,
    analyze_sensitivity,
    auto_fallback,
)
from lowbit.serialization import LoadError, describe, load, read_manifest, save

__version__ = "0.1.0"

__all__ = [
    "QUANTIZED_MODULES",
    "CalibrationRecord",
    "Calibrator",
    "ComparisonRow",
    "ComparisonTable",
    "DistributedSyncError",
    "EntropyCalibrator",
    "FakeQuantize",
    "Int4Linear",
    "Int8WeightOnlyLinear",
    "LatencyStats",
    "LayerSensitivity",
    "LoRALinear",
    "LoadError",
    "MSECalibrator",
    "MergeReport",
    "MinMaxCalibrator",
    "MovingAverageCalibrator",
    "OnnxRuntimeModule",
    "OutputError",
    "PTQQuantizer",
    "PercentileCalibrator",
    "QATConfig",
    "QATLayer",
    "QATPreparer",
    "QATStatistics",
    "QuantSpec",
    "QuantizationConfig",
    "QuantizationReport",
    "QuantizedConv1d",
    "QuantizedConv2d",
    "QuantizedEmbedding",
    "QuantizedLinear",
    "Quantizer",
    "SensitivityReport",
    "WeightOnlyConv1d",
    "WeightOnlyConv2d",
    "__version__",
    "add_lora",
    "analyze_sensitivity",
    "auto_fallback",
    "available_calibrators",
    "backends",
    "check_supported",
    "compare_models",
    "compare_outputs",
    "convert_module",
    "convert_qat",
    "create_calibrator",
    "describe",
    "distributed",
    "evaluate_accuracy",
    "export_onnx",
    "freeze_bn_stats",
    "get_qat_statistics",
    "load",
    "load_adapters",
    "load_checkpoint",
    "lora_parameters",
    "mark_only_lora_trainable",
    "measure_latency",
    "merge_lora",
    "model_nbytes",
    "module_from_meta",
    "native_status",
    "ops",
    "output_pool_stats",
    "prepare_qat",
    "quantize_dynamic",
    "quantize_static",
    "quantize_weight_only",
    "quantized_weight_nbytes",
    "read_manifest",
    "register_calibrator",
    "register_peft",
    "release_output_pool",
    "report",
    "save",
    "save_adapters",
    "save_checkpoint",
    "set_fake_quant_enabled",
    "set_observer_enabled",
]
