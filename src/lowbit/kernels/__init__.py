"""Integer kernels: the only place lowbit calls torch's integer ops or its own C kernels.

Every INT8 / INT4 op has a pure-PyTorch reference (``kernel="reference"``: the obvious formula,
exact on integer codes) and fast paths chosen per op, shape and CPU by
:func:`~lowbit.kernels.select.select_kernel`: lowbit's per-ISA C GEMMs (``"s8_avx2"``,
``"s8_portable"``, ``"u4_*"``, :mod:`lowbit.kernels.isa`), PyTorch's integer ops
(``torch._int_mm`` where oneDNN is exact, i.e. with VNNI; its packed weight-only ops) and an
exact fp32 GEMM over the codes. The INT8 x INT8 paths are bit-identical to the reference.

Modules: ``select`` (which kernel), ``base`` (shared checks), ``isa`` (the C GEMMs per
instruction set), ``quantize`` (activation codes), ``gemm`` (the INT32 accumulator by every path,
and the float epilogue), ``linear``, ``conv``, ``weight_only``, ``plans`` (a layer's call prepared
once per input shape, for batch 1). Measurements and the decisions
drawn from them: ``docs/kernels.md``.
"""

from __future__ import annotations

from lowbit.kernels.base import (  # noqa: F401
    NATIVE_DTYPES,
    _extent,
    c_layout,
    native_lib_for,
)
from lowbit.kernels.conv import (  # noqa: F401
    DIRECT_CONV_MAX_MACS,
    DIRECT_CONV_PARALLEL_MACS,
    _conv_out_hw,
    _im2col_codes,
    conv2d_direct_native,
    conv2d_fused,
    direct_conv_fits,
    int8_conv2d,
    maxpool2d_native,
    run_wo_conv2d_native,
)
from lowbit.kernels.gemm import (  # noqa: F401
    _epilogue_native,
    _float_epilogue,
    _int8_acc,
    _int8_epilogue,
    acc_fp32_codes,
    acc_int_mm,
    acc_reference,
    int_mm_takes_uint8,
)
from lowbit.kernels.isa import (  # noqa: F401
    _s8_acc,
    _s8_call,
    run_rnn_scan,
    run_u4_linear,
    run_u4p_linear,
    s8_acc,
    s8_packed,
    u4_pack,
    u4p_pack,
)
from lowbit.kernels.linear import (  # noqa: F401
    BLOCK_ROWS,
    FUSED_GEMMS,
    SMALL_LINEAR_CODES,
    SMALL_LINEAR_MACS,
    _check_linear_shapes,
    fused_int8_linear,
    fused_linear_layout,
    int8_linear,
    run_fused_linear,
)
from lowbit.kernels.quantize import (  # noqa: F401
    _absmax,
    quantize_activation,
    quantize_activation_u8,
)
from lowbit.kernels.select import (
    AMX_U4_GROUP_SIZES,
    CODES_DIRECT_MAX_MACS,
    CONV_CODES_EXACT_K,
    CONV_CODES_MAX_K,
    CONV_CODES_MAX_K_NATIVE,
    CUDA_INT_MM_MIN_ROWS,
    INT4_GROUP_SIZES,
    INT4_PACKED_MAX_M,
    INT4_PACKED_MAX_M_NO_BF16,
    ISA_KERNELS,
    U4_NATIVE_MAX_M,
    U4Q8_MAX_M_BF16,
    VNNI_S8_MAX_M,
    VNNI_S8_MAX_MACS,
    WEIGHT_ONLY_PACKED_MAX_M,
    amx_tiles,
    cpu_features,
    int8_gemm,
    select_kernel,
    vnni_c_gemm_rows,
)
from lowbit.kernels.weight_only import (
    WO_SMALL_MACS,
    dequantize_weight_native,
    int4_pack_for_cpu,
    run_dequantize_weight_native,
    run_weight_only_linear_native,
    weight_only_linear,
    weight_only_linear_native,
    wo_group,
    wo_small_fits,
    wo_small_max_rows,
)

__all__ = [
    "AMX_U4_GROUP_SIZES",
    "BLOCK_ROWS",
    "CODES_DIRECT_MAX_MACS",
    "CONV_CODES_EXACT_K",
    "CONV_CODES_MAX_K",
    "CONV_CODES_MAX_K_NATIVE",
    "CUDA_INT_MM_MIN_ROWS",
    "DIRECT_CONV_MAX_MACS",
    "DIRECT_CONV_PARALLEL_MACS",
    "FUSED_GEMMS",
    "INT4_GROUP_SIZES",
    "INT4_PACKED_MAX_M",
    "INT4_PACKED_MAX_M_NO_BF16",
    "ISA_KERNELS",
    "NATIVE_DTYPES",
    "SMALL_LINEAR_CODES",
    "SMALL_LINEAR_MACS",
    "U4Q8_MAX_M_BF16",
    "U4_NATIVE_MAX_M",
    "VNNI_S8_MAX_M",
    "VNNI_S8_MAX_MACS",
    "WEIGHT_ONLY_PACKED_MAX_M",
    "WO_SMALL_MACS",
    "acc_fp32_codes",
    "acc_int_mm",
    "acc_reference",
    "amx_tiles",
    "c_layout",
    "conv2d_direct_native",
    "conv2d_fused",
    "cpu_features",
    "dequantize_weight_native",
    "direct_conv_fits",
    "fused_int8_linear",
    "fused_linear_layout",
    "int4_pack_for_cpu",
    "int8_conv2d",
    "int8_gemm",
    "int8_linear",
    "int_mm_takes_uint8",
    "maxpool2d_native",
    "native_lib_for",
    "quantize_activation",
    "quantize_activation_u8",
    "run_dequantize_weight_native",
    "run_fused_linear",
    "run_u4_linear",
    "run_u4p_linear",
    "run_weight_only_linear_native",
    "run_wo_conv2d_native",
    "s8_acc",
    "s8_packed",
    "select_kernel",
    "u4_pack",
    "u4p_pack",
    "vnni_c_gemm_rows",
    "weight_only_linear",
    "weight_only_linear_native",
    "wo_group",
    "wo_small_fits",
    "wo_small_max_rows",
]
