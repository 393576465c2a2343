"""Kernels: fast paths equal the reference path; quantization equals lowbit.ops bit for bit."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from lowbit import native
from lowbit.config import QuantSpec
from lowbit.kernels import (
    CONV_CODES_EXACT_K,
    CONV_CODES_MAX_K,
    CONV_CODES_MAX_K_NATIVE,
    INT4_PACKED_MAX_M,
    INT4_PACKED_MAX_M_NO_BF16,
    U4_NATIVE_MAX_M,
    cpu_features,
    int4_pack_for_cpu,
    int8_conv2d,
    int8_gemm,
    int8_linear,
    quantize_activation,
    quantize_activation_u8,
    select_kernel,
    weight_only_linear,
)
from lowbit.native import load_native
from lowbit.ops import choose_qparams, compute_range, dequantize, quantize, quantize_tensor

# oneDNN's int8 GEMM is exact only with VNNI (without it int16 pair sums saturate)
INT_MM = pytest.param("int_mm_s8s8", marks=pytest.mark.skipif(
    "vnni" not in cpu_features(), reason="_int_mm is used (and exact) only on VNNI CPUs"))


@pytest.mark.parametrize("shape", [(1, 7), (5, 33), (3, 4, 64)])
def test_dynamic_per_token_quantize_matches_ops(shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    x = torch.randn(shape) * 3
    x[..., 0] = 0.0
    spec = QuantSpec.int8_dynamic_activation("per_token")
    scale, zp = choose_qparams(*compute_range(x, spec), spec)
    expected = quantize(x, scale, zp, spec)
    q, s, zp_q = quantize_activation(x, spec.qmin, spec.qmax, per_token=True)
    assert torch.equal(s, scale) and zp_q is None and q.dtype == torch.int8
    assert torch.equal(q, expected.to(torch.int8))
    u, s_u, zp_u = quantize_activation_u8(x, spec.qmin, spec.qmax, per_token=True)
    assert torch.equal(s_u, scale) and torch.equal(u.int() - zp_u, expected.int())


@pytest.mark.parametrize("shape", [(600, 300), (1, 1 << 17)])  # max(amax, -amin) sizes
@pytest.mark.parametrize("per_token", [True, False])
def test_large_dynamic_quantize_matches_ops(shape: tuple[int, int], per_token: bool) -> None:
    torch.manual_seed(1)
    x = torch.randn(shape)
    x[0, 0] = -50.0  # the largest magnitude is negative
    spec = QuantSpec.int8_dynamic_activation("per_token" if per_token else "per_tensor")
    scale, zp = choose_qparams(*compute_range(x, spec), spec)
    q, s, _ = quantize_activation(x, spec.qmin, spec.qmax, per_token=per_token)
    assert torch.equal(s, scale) and torch.equal(q, quantize(x, scale, zp, spec).to(torch.int8))


def test_static_affine_quantize_matches_ops_including_ties() -> None:
    spec = QuantSpec.int8_static_activation()
    scale, zp = torch.tensor(0.5), torch.tensor(-3, dtype=torch.int32)
    x = torch.tensor([0.25, 0.75, -0.25, 1.25, 100.0, -100.0, 0.0, 63.9])  # .5 ties + clamps
    q, _, zp_q = quantize_activation(x, spec.qmin, spec.qmax, scale, zp)
    assert torch.equal(q.int(), quantize(x, scale, zp, spec).int()) and int(zp_q) == -3
    u, _, zp_u = quantize_activation_u8(x, spec.qmin, spec.qmax, scale, zp)
    assert torch.equal(u.int() - 128, quantize(x, scale, zp, spec).int())
    assert int(zp_u) == -3 + 128


def test_zero_rows_do_not_divide_by_zero() -> None:
    q, s, _ = quantize_activation(torch.zeros(2, 4), -128, 127)
    assert torch.isfinite(s).all() and torch.equal(q, torch.zeros(2, 4, dtype=torch.int8))


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (7, 33, 17), (33, 128, 48), (16, 5, 3),
                                   (3, 2100, 8)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kernel", [INT_MM, "fp32_codes"])
def test_int8_linear_fast_kernels_equal_reference(m: int, k: int, n: int, static: bool,
                                                  kernel: str) -> None:
    torch.manual_seed(m + k)
    x, w = torch.randn(m, k), torch.randint(-128, 128, (n, k), dtype=torch.int8)
    if static:
        q, s, zp = quantize_activation(x, -128, 127, torch.tensor(0.02),
                                       torch.tensor(-7, dtype=torch.int32))
    else:
        q, s, zp = quantize_activation(x, -128, 127)
    colsum = w.int().sum(1)
    args = (q, s, zp, w, torch.rand(n) + 0.1, colsum, torch.randn(n))
    fast = int8_linear(*args, kernel=kernel)
    ref = int8_linear(*args, kernel="reference")
    assert torch.equal(fast, ref)
    # the integer accumulator is exact: compare with int64 maths
    acc = (q.long() - (0 if zp is None else zp.long())) @ w.long().t()
    expected = acc.float() * s * args[4] + args[6]
    torch.testing.assert_close(fast, expected, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("kernel", [INT_MM, "fp32_codes", "reference"])
def test_int8_linear_extreme_codes_do_not_saturate(kernel: str) -> None:
    w = torch.full((32, 1300), -128, dtype=torch.int8)
    for dtype, hi in ((torch.uint8, 255), (torch.int8, -128)):  # int8 codes and shifted uint8
        u = torch.full((4, 1300), hi, dtype=dtype)
        u[:, ::3] = 0
        y = int8_linear(u, torch.tensor(1.0), None, w, torch.ones(32), w.int().sum(1),
                        kernel=kernel)
        assert torch.equal(y, (u.long() @ w.long().t()).float())


def test_int8_linear_fused_relu() -> None:
    torch.manual_seed(1)
    u, s, z = quantize_activation(torch.randn(3, 16), -128, 127)
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    y = int8_linear(u, s, z, w, torch.ones(8), w.int().sum(1))
    assert torch.equal(int8_linear(u, s, z, w, torch.ones(8), w.int().sum(1), relu=True),
                       y.relu())


@pytest.mark.parametrize("stride,padding,dilation,ksize", [
    ((1, 1), (1, 1), (1, 1), 3), ((2, 1), (0, 2), (1, 2), 3), ((1, 1), (0, 0), (1, 1), 1)])
@pytest.mark.parametrize("kernel", [INT_MM, "fp32_codes", "fp32_codes_conv"])
def test_int8_conv2d_im2col_equals_reference(stride, padding, dilation, ksize, kernel) -> None:
    torch.manual_seed(2)
    x = torch.randn(2, 5, 9, 8)
    w = torch.randint(-128, 128, (6, 5, ksize, ksize), dtype=torch.int8)
    args = (x, torch.tensor(0.03), torch.tensor(5, dtype=torch.int32), -128, 127, w,
            torch.rand(6) + 0.1, w.int().sum((1, 2, 3)), torch.randn(6), stride, padding,
            dilation, 1)
    fast = int8_conv2d(*args, kernel=kernel)
    ref = int8_conv2d(*args, kernel="reference")
    assert torch.equal(fast, ref)
    expect_shape = F.conv2d(x, w.float(), None, stride, padding, dilation).shape
    assert fast.shape == expect_shape


def test_int4_cpu_packing_matches_reference_dequantization() -> None:
    torch.manual_seed(3)
    for spec in (QuantSpec.int4_weight(32), QuantSpec.int4_weight(64, symmetric=True),
                 QuantSpec(bits=4, signed=False, symmetric=False, granularity="per_group",
                           group_size=32)):
        w = torch.randn(32, 128)
        q, s, z = quantize_tensor(w, spec)
        packed, sz = int4_pack_for_cpu(q, s, z, 8 if spec.signed else 0)
        eye = torch.eye(128)
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, packed, spec.group_size, sz).t()
        expected = dequantize(q, s, z, spec)
        # (u - 8) * s + z vs (q - zp) * s: equal up to one float rounding
        torch.testing.assert_close(got, expected, rtol=0, atol=2e-6)


def test_weight_only_kernels_equal_reference_up_to_bf16() -> None:
    torch.manual_seed(4)
    spec = QuantSpec.int4_weight(32)
    q, s, z = quantize_tensor(torch.randn(48, 96), spec)
    packed, sz = int4_pack_for_cpu(q, s, z, 8)
    deq = dequantize(q, s, z, spec)
    x = torch.randn(5, 96)
    ref = weight_only_linear(x, "reference", lambda: deq)
    for kernel in ("int4pack_bf16", "dequant_bf16"):
        y = weight_only_linear(x, kernel, lambda: deq, packed=packed,
                               scales=sz.bfloat16(), group_size=32)
        assert F.cosine_similarity(y.flatten(), ref.flatten(), dim=0) > 0.9999
        assert (y - ref).abs().max() < 0.05 * ref.abs().max()


def test_select_kernel_is_deterministic_and_documented() -> None:
    assert select_kernel("int8_linear", 1, backend="reference") == "reference"
    assert select_kernel("int8_conv2d", 4, groups=2) == "reference"
    dequant = "dequant_bf16" if "bf16" in cpu_features() else "dequant_fp32"
    max4 = INT4_PACKED_MAX_M if "bf16" in cpu_features() else INT4_PACKED_MAX_M_NO_BF16
    fast = int8_gemm()  # at every M
    # lowbit's INT4 kernel of the C ISA paths at small M (any N; K and group multiples of 32)
    small4 = "u4_" + fast[3:] if fast.startswith("s8_") else None
    assert select_kernel("int4_weight_only", 1, n=17, k=64, group_size=32) == (small4 or dequant)
    assert select_kernel("int4_weight_only", 1, n=16, k=64, group_size=16) == dequant
    assert select_kernel("int4_weight_only", 1, n=16, k=64, group_size=32) == (
        small4 or "int4pack_bf16")

    def int4_at(m: int) -> str:  # the documented plan: lowbit's kernel, packed op, dequantize
        if small4 and m <= U4_NATIVE_MAX_M:
            return small4
        return "int4pack_bf16" if m <= max4 else dequant

    for m in (U4_NATIVE_MAX_M + 1, max4, max4 + 1):
        assert select_kernel("int4_weight_only", m, n=16, k=64, group_size=32) == int4_at(m)
    assert select_kernel("int8_weight_only", 1, k=64, packable=False) == dequant
    assert select_kernel("int8_weight_only", 1, k=68) == dequant  # op needs K % 16 == 0
    assert select_kernel("int8_weight_only", 2, k=72) == dequant  # K = 72 segfaults at M >= 2
    assert select_kernel("int8_linear", 1) == select_kernel("int8_linear", 4096) == fast
    big = "int_mm_s8s8" if fast == "s8_avx512_vnni" else fast  # (VNNI: oneDNN's at many rows)
    assert select_kernel("int8_linear", 4096, n=1024, k=1024) == big
    assert select_kernel("int8_linear", 8, n=1024, k=1024) == fast
    assert select_kernel("int8_weight_only", 1, k=64) == "int8pack_bf16"
    assert select_kernel("int8_weight_only", 65, k=64) == dequant
    with pytest.raises(ValueError, match="backend"):
        select_kernel("int8_linear", 1, backend="fast")
    with pytest.raises(ValueError, match="unknown op"):
        select_kernel("int3_linear", 1)


@pytest.mark.parametrize("m,k,n", [(1, 64, 32), (7, 33, 17), (40, 1100, 24)])
@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("kernel", [INT_MM, "fp32_codes"])
def test_int8_linear_affine_weights_equal_reference(m: int, k: int, n: int, static: bool,
                                                    kernel: str) -> None:
    torch.manual_seed(m + n)
    x, w = torch.randn(m, k), torch.randint(-128, 128, (n, k), dtype=torch.int8)
    w_zp = torch.randint(-128, 128, (n,), dtype=torch.int32)
    if static:
        q, s, zp = quantize_activation(x, -128, 127, torch.tensor(0.02),
                                       torch.tensor(-100, dtype=torch.int32))
    else:
        q, s, zp = quantize_activation(x, -128, 127)
    colsum = w.int().sum(1) - k * w_zp
    args = (q, s, zp, w, torch.rand(n) + 0.1, colsum, torch.randn(n))
    fast = int8_linear(*args, kernel=kernel, w_zp=w_zp)
    ref = int8_linear(*args, kernel="reference", w_zp=w_zp)
    assert torch.equal(fast, ref)
    centered = q.long() - (0 if zp is None else zp.long())
    acc = centered @ (w.long() - w_zp.long()[:, None]).t()  # int64 maths
    torch.testing.assert_close(ref, acc.float() * s * args[4] + args[6], rtol=1e-6, atol=1e-5)
    # a weight zero-point really changes the result (the correction term is not dropped)
    assert not torch.equal(fast, int8_linear(*args, kernel=kernel))


def test_fp32_codes_is_exact_with_full_range_affine_activations() -> None:
    # centered codes of 255 times weights of +-127/128: a 1024-term fp32 partial sum passes 2^24
    # (and rounds), while the total stays small enough to be exact in the float32 output
    g = torch.Generator().manual_seed(0)
    u = torch.full((2, 2048), 255, dtype=torch.uint8)
    w = 127 + torch.randint(0, 2, (8, 2048), generator=g)
    w[:, :1024] *= -1
    w = w.clamp(-128, 127).to(torch.int8)
    zp_u = torch.tensor(0, dtype=torch.int32)
    y = int8_linear(u, torch.tensor(1.0), zp_u, w, torch.ones(8), w.int().sum(1),
                    kernel="fp32_codes")
    assert torch.equal(y.long(), u.long() @ w.long().t())


@pytest.mark.parametrize("kernel", [INT_MM, "fp32_codes", "fp32_codes_conv"])
def test_int8_conv2d_affine_weights_equal_reference(kernel: str) -> None:
    torch.manual_seed(7)
    x = torch.randn(2, 5, 9, 8)
    w = torch.randint(-128, 128, (6, 5, 3, 3), dtype=torch.int8)
    w_zp = torch.randint(-20, 20, (6,), dtype=torch.int32)
    colsum = w.int().sum((1, 2, 3)) - 45 * w_zp
    args = (x, torch.tensor(0.03), torch.tensor(5, dtype=torch.int32), -128, 127, w,
            torch.rand(6) + 0.1, colsum, torch.randn(6), (1, 2), (1, 1), (1, 1), 1)
    fast = int8_conv2d(*args, kernel=kernel, w_zp=w_zp)
    assert torch.equal(fast, int8_conv2d(*args, kernel="reference", w_zp=w_zp))
    assert not torch.equal(fast, int8_conv2d(*args, kernel=kernel))


def test_without_vnni_int8_kernels_stay_exact() -> None:
    # ONEDNN_MAX_CPU_ISA=AVX2 makes oneDNN run as on an AVX2-only CPU, where _int_mm saturates
    # int16 pair sums; cpu_features() follows the cap and the exact fp32_codes path is chosen
    code = """
import torch
from torch import nn
from lowbit.config import QuantizationConfig
from lowbit.kernels import cpu_features
from lowbit.modules import QuantizedLinear
assert "vnni" not in cpu_features()
torch.manual_seed(0)
fc = nn.Linear(1024, 64)
cfg = QuantizationConfig.int8_dynamic()
q = QuantizedLinear.from_float(fc, cfg)
ref = QuantizedLinear.from_float(fc, cfg, backend="reference")
for m in (1, 16, 40):
    x = torch.randn(m, 1024)
    assert torch.equal(q(x), ref(x)), m
from lowbit.modules import QuantizedConv2d
conv = nn.Conv2d(16, 8, 3, padding=1)  # K = 144: fp32 conv on codes without VNNI
qc = QuantizedConv2d.from_float(conv, cfg)
rc = QuantizedConv2d.from_float(conv, cfg, backend="reference")
xc = torch.randn(16, 16, 9, 9)
assert torch.equal(qc(xc), rc(xc))
from lowbit.kernels import int8_gemm
assert q.kernel_info() == int8_gemm() != "int_mm_s8s8"
print(q.kernel_info())
"""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    c_paths = [i for i in ("avx2", "portable") if native.isa_paths()[i] == "available"]
    forced = os.environ.get("LOWBIT_ISA")
    expect = {"avx2": "s8_avx2", "portable": "s8_portable", "torch": "fp32_codes"}.get(
        forced or "", f"s8_{c_paths[0]}" if c_paths else "fp32_codes")
    assert out.stdout.strip() == expect


@pytest.mark.parametrize("batch,cin,cout,hw,ksize,stride,padding,dilation,groups", [
    (1, 1, 16, (28, 28), 3, (1, 1), (1, 1), (1, 1), 1),  # MNIST conv1, K = 9
    (17, 1, 16, (12, 10), 3, (1, 1), (1, 1), (1, 1), 1),  # batch >= 16: mkldnn's conv
    (3, 16, 8, (9, 8), 3, (2, 1), (0, 2), (1, 2), 1),  # K = 144
    (2, 3, 5, (11, 11), 5, (2, 2), (2, 2), (1, 1), 1),  # K = 75
    (20, 8, 8, (7, 9), 3, (1, 1), (1, 1), (1, 1), 8),  # depthwise
    (2, 6, 4, (8, 8), 3, (1, 2), (1, 0), (2, 1), 2),  # grouped
    (4, 4, 6, (6, 6), 1, (1, 1), (0, 0), (1, 1), 1),  # 1x1
])
@pytest.mark.parametrize("zp", [None, -128, 5, 127])
@pytest.mark.parametrize("affine_w", [False, True])
def test_int8_conv2d_fp32_codes_conv_equals_reference(batch, cin, cout, hw, ksize, stride,
                                                      padding, dilation, groups, zp,
                                                      affine_w) -> None:
    g = torch.Generator().manual_seed(batch * 131 + cin * 7 + cout)
    x = torch.randn(batch, cin, *hw, generator=g) * 3 + (0.0 if zp is None else 0.02 * zp)
    w = torch.randint(-128, 128, (cout, cin // groups, ksize, ksize), dtype=torch.int8,
                      generator=g)
    k = w[0].numel()
    w_zp = torch.randint(-60, 60, (cout,), dtype=torch.int32, generator=g) if affine_w else None
    colsum = w.int().sum((1, 2, 3)) - (0 if w_zp is None else k * w_zp)
    x_zp = None if zp is None else torch.tensor(zp, dtype=torch.int32)
    bias = torch.randn(cout, generator=g) if zp != 5 else None
    args = (x, torch.tensor(0.021), x_zp, -128, 127, w, torch.rand(cout, generator=g) + 0.1,
            colsum, bias, stride, padding, dilation, groups)
    for relu in (False, True):
        fast = int8_conv2d(*args, kernel="fp32_codes_conv", w_zp=w_zp, relu=relu)
        ref = int8_conv2d(*args, kernel="reference", w_zp=w_zp, relu=relu)
        assert torch.equal(fast, ref)
        assert fast.shape == F.conv2d(x, w.float(), None, stride, padding, dilation,
                                      groups).shape
    wf = w.float() if w_zp is None else w.float() - w_zp.float().reshape(-1, 1, 1, 1)
    cached = int8_conv2d(*args, kernel="fp32_codes_conv", w_zp=w_zp, w_float=wf)
    assert torch.equal(cached, int8_conv2d(*args, kernel="reference", w_zp=w_zp))


@pytest.mark.parametrize("batch", [1, 16])
def test_int8_conv2d_fp32_codes_conv_exact_at_worst_case_k(batch: int) -> None:
    # the exactness bound: K = 258 (= 258 * 1 * 1), |q - zp| = 255, |w - w_zp| = 255, all
    # products of one sign: the accumulator reaches 258 * 255^2 = 16,776,450 < 2^24
    k = CONV_CODES_EXACT_K
    x = torch.full((batch, k, 3, 3), 255 * 0.5)  # code 127 = zp + 255 (scale 0.5)
    w = torch.full((4, k, 1, 1), -128, dtype=torch.int8)
    w_zp = torch.full((4,), 127, dtype=torch.int32)  # w - w_zp = -255
    args = (x, torch.tensor(0.5), torch.tensor(-128, dtype=torch.int32), -128, 127, w,
            torch.ones(4), torch.full((4,), -255 * k, dtype=torch.int32), None, (1, 1), (0, 0),
            (1, 1), 1)
    fast = int8_conv2d(*args, kernel="fp32_codes_conv", w_zp=w_zp)
    assert torch.equal(fast, int8_conv2d(*args, kernel="reference", w_zp=w_zp))
    assert float(fast.min()) == float(-255 * 255 * k * 0.5)


def test_select_kernel_conv_by_k() -> None:
    gemm = int8_gemm()  # an integer GEMM, or "fp32_codes" (the torch path without VNNI)
    max_k = CONV_CODES_MAX_K if load_native() is None else CONV_CODES_MAX_K_NATIVE
    assert select_kernel("int8_conv2d", 64, k=9) == "fp32_codes_conv"
    assert select_kernel("int8_conv2d", 64, k=max_k) == "fp32_codes_conv"
    mid = select_kernel("int8_conv2d", 64, k=max_k + 16)
    assert mid == (gemm if gemm != "fp32_codes" else "fp32_codes_conv")
    assert select_kernel("int8_conv2d", 64, k=CONV_CODES_EXACT_K + 1) == gemm
    assert select_kernel("int8_conv2d", 64, k=0) == gemm  # K unknown
    assert select_kernel("int8_conv2d", 64, k=CONV_CODES_EXACT_K, groups=4) == "fp32_codes_conv"
    assert select_kernel("int8_conv2d", 64, k=CONV_CODES_EXACT_K + 1, groups=4) == "reference"
    assert select_kernel("int8_conv2d", 64, k=9, backend="reference") == "reference"
    torch._C._set_mkldnn_enabled(False)  # F.conv2d could then take NNPACK: inexact
    try:
        assert select_kernel("int8_conv2d", 64, k=9) == gemm
    finally:
        torch._C._set_mkldnn_enabled(True)


def test_kernel_choice_off_the_cpu() -> None:
    """On CUDA: _int_mm only where it takes the shape (M > 16, K and N multiples of 8), else the
    exact float64 reference; never a CPU-only packed op or C kernel."""
    cuda = {"device": "cuda"}
    assert select_kernel("int8_linear", 32, k=128, n=16, **cuda) == "int_mm_s8s8"
    for m, k, n in ((16, 128, 16), (32, 100, 16), (32, 128, 10)):
        assert select_kernel("int8_linear", m, k=k, n=n, **cuda) == "reference"
    assert select_kernel("int8_conv2d", 1024, k=144, n=32, **cuda) == "int_mm_s8s8"
    assert select_kernel("int8_conv2d", 1024, k=9, n=16, **cuda) == "reference"
    assert select_kernel("int8_conv2d", 1024, k=144, n=32, groups=2, **cuda) == "reference"
    assert select_kernel("int4_weight_only", 1, n=16, k=64, group_size=32, **cuda) == "reference"
    assert select_kernel("int8_weight_only", 1, k=64, **cuda) == "reference"
    with pytest.raises(ValueError, match="unknown op"):
        select_kernel("int2_linear", 1, **cuda)


@pytest.mark.parametrize("vendor", ["GenuineIntel", "AuthenticAMD", ""])
def test_vnni_c_gemm_rows_is_the_select_rule(vendor, monkeypatch) -> None:
    """The avx512_vnni row limit: VNNI_S8_MAX_M rows (on AMD VNNI_S8_MAX_M_AMD) or
    VNNI_S8_MAX_MACS multiply-adds, and select_kernel follows it."""
    from lowbit.kernels import (
        VNNI_S8_MAX_M,
        VNNI_S8_MAX_M_AMD,
        VNNI_S8_MAX_MACS,
        select,
        vnni_c_gemm_rows,
    )

    monkeypatch.setattr(select, "cpu_vendor", lambda: vendor)
    rows = VNNI_S8_MAX_M_AMD if vendor == "AuthenticAMD" else VNNI_S8_MAX_M
    assert vnni_c_gemm_rows(4096, 4096) == vnni_c_gemm_rows(1536, 384) == rows
    assert vnni_c_gemm_rows(48, 67) == VNNI_S8_MAX_MACS // (48 * 67) > rows
    assert vnni_c_gemm_rows(0, 67) > 1 << 40  # unknown size: no limit
    with pytest.raises(ValueError, match="non-negative ints"):
        vnni_c_gemm_rows(-1, 67)
    if select.int8_gemm() == "s8_avx512_vnni":  # this CPU's path: the rule picks the kernel
        assert select.select_kernel("int8_linear", rows, n=4096, k=4096) == "s8_avx512_vnni"
        assert select.select_kernel("int8_linear", rows + 1, n=4096, k=4096) == "int_mm_s8s8"


def test_amx_tiles_is_the_select_rule_and_refuses_bad_sizes() -> None:
    """The amx path tiles K >= 61 (ceil(K / 4) >= 16 four-code steps); a size that is not a
    non-negative int is refused with its name and value, not answered."""
    from lowbit.kernels import amx_tiles

    assert [amx_tiles(k) for k in (0, 60, 61, 64, 784, 4096)] == [False, False, True, True,
                                                                 True, True]
    for bad in (-5, 2.5, "64", None):
        with pytest.raises(ValueError, match=r"amx_tiles: .*non-negative ints; got k="):
            amx_tiles(bad)  # type: ignore[arg-type]


def test_int_mm_takes_uint8_answers_for_device_types_and_refuses_others() -> None:
    """The probe answers a bool for a device type (the CPU's answer agrees with a real uint8
    call of ``torch._int_mm``); a string that names no device is refused with the argument."""
    from lowbit.kernels import int_mm_takes_uint8

    try:
        torch._int_mm(torch.ones(32, 8, dtype=torch.uint8), torch.ones(8, 8, dtype=torch.int8))
        works = True
    except RuntimeError:
        works = False
    assert int_mm_takes_uint8("cpu") is works
    assert isinstance(int_mm_takes_uint8("cuda"), bool)  # False without a GPU, no error
    for bad in ("nonsense", 3.5):
        with pytest.raises(ValueError, match=r"int_mm_takes_uint8: device=.* is not a torch"):
            int_mm_takes_uint8(bad)  # type: ignore[arg-type]
