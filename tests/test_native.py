"""Fused C kernels: built in a temp folder, bit-identical to the pure-PyTorch path everywhere."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lowbit import native
from lowbit.config import QuantSpec
from lowbit.kernels import (
    BLOCK_ROWS,
    SMALL_LINEAR_CODES,
    SMALL_LINEAR_MACS,
    _epilogue_native,
    _int8_epilogue,
    conv2d_direct_native,
    dequantize_weight_native,
    direct_conv_fits,
    fused_int8_linear,
    int8_conv2d,
    int8_gemm,
    int8_linear,
    maxpool2d_native,
    quantize_activation,
    select_kernel,
    weight_only_linear_native,
)
from lowbit.modules_weight_only import Int4Linear, Int8WeightOnlyLinear, WeightOnlyConv2d
from lowbit.ptq import quantize_dynamic, quantize_static

HAS_CC = native._compiler() is not None
#: The INT8 GEMM of this CPU: ``_int_mm`` is exact (and used) only with VNNI.
GEMM = select_kernel("int8_linear", 64)
needs_native = pytest.mark.skipif(not HAS_CC, reason="no C compiler: lowbit runs pure PyTorch")


@pytest.fixture
def no_native(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The pure-PyTorch path everywhere (as on a machine without a C compiler)."""
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    monkeypatch.delenv("LOWBIT_ISA", raising=False)  # a forced C path cannot run then
    native._reset_for_tests()
    assert native.load_native() is None
    yield
    monkeypatch.delenv("LOWBIT_NATIVE")
    native._reset_for_tests()


def test_builds_into_the_cache_dir_when_a_compiler_exists(tmp_path, monkeypatch) -> None:
    status = native.native_status()
    if not HAS_CC:
        assert not status["available"] and "compiler" in status["reason"]
        return
    assert status["available"], status["reason"]
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    path = native._build(native._compiler())  # type: ignore[arg-type]
    assert path.parent == tmp_path and path.suffix == ".so"
    stamp = path.stat().st_mtime_ns
    assert native._build(native._compiler()) == path  # type: ignore[arg-type]
    assert path.stat().st_mtime_ns == stamp  # cached, not rebuilt
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp files left behind


def test_disabled_by_environment(no_native) -> None:
    status = native.native_status()
    assert {k: status[k] for k in ("available", "reason", "path")} == {
        "available": False, "reason": "disabled by LOWBIT_NATIVE=0", "path": None}
    assert status["isa_paths"]["portable"] == "disabled by LOWBIT_NATIVE=0"
    assert status["isa"] in ("avx512_vnni", "torch")  # no C path without the C kernels
    assert all(why == "disabled by LOWBIT_NATIVE=0" for why in status["libraries"].values()
               if not why.startswith("the CPU"))  # (a CPU without the ISA says so first)
    assert int8_gemm() in ("int_mm_s8s8", "fp32_codes")  # VNNI: oneDNN's, exact; else fp32


def test_failed_build_falls_back_with_a_warning(tmp_path, monkeypatch, caplog) -> None:
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "false")  # a "compiler" that always fails
    monkeypatch.setattr(native.shutil, "which", lambda name: f"/bin/{name}"
                        if name == "false" else None)
    native._reset_for_tests()
    try:
        with caplog.at_level(logging.WARNING, logger="lowbit.native"):
            assert native.load_native() is None
        status = native.native_status()
        assert not status["available"] and "failed" in status["reason"]
        assert "pure-PyTorch" in caplog.text
        x = torch.randn(4, 16)
        q, s, _ = quantize_activation(x, -128, 127)  # still works, on the PyTorch path
        assert q.dtype == torch.int8 and s.shape == (4, 1)
    finally:
        monkeypatch.undo()
        native._reset_for_tests()


@needs_native
def test_export_as_first_use_keeps_the_c_kernels(make_quantized) -> None:
    """torch.export computes a layer's kernel choice under its fake-tensor modes: when that is
    the first use of lowbit's kernels in the process, loading them (and the rounding probe)
    must still succeed, not leave the process on the pure-PyTorch path."""
    qmodel, x = make_quantized("mlp-dynamic")
    native._reset_for_tests()
    try:
        torch.export.export(qmodel, (x,))
        assert native._state["tried"]  # the export was the first use
        status = native.native_status()
        assert status["available"], status["reason"]
        assert native.addcmul_fma() == native._addcmul_fuses()
    finally:
        native._reset_for_tests()


# ------------------------------------------------------------------ bit identity, kernel level

@needs_native
@given(m=st.integers(1, 70), k=st.integers(1, 300), scale=st.floats(1e-3, 1e3),
       per_token=st.booleans(), bf16=st.booleans(), strided=st.booleans(),
       seed=st.integers(0, 2**16))
def test_dynamic_quantize_is_bit_identical(m, k, scale, per_token, bf16, strided, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k + 3 * strided, generator=g) * scale
    x = x[:, 1:k + 1] if strided else x  # rows with a stride larger than K
    x[0, 0] = 0.0
    if bf16:
        x = x.to(torch.bfloat16)
    q, s, z = quantize_activation(x, -128, 127, per_token=per_token)
    q_ref, s_ref, z_ref = quantize_activation(x, -128, 127, per_token=per_token, native=False)
    assert torch.equal(q, q_ref) and torch.equal(s, s_ref) and z is None and z_ref is None


@needs_native
@given(n=st.integers(0, 70) | st.just(100_003), bits=st.sampled_from([8, 7]),
       log_mag=st.floats(-6, 6), shift=st.floats(-2, 2), threads=st.sampled_from([1, 2]),
       seed=st.integers(0, 2**16))
def test_affine_qparams_in_c_are_bit_identical(n, bits, log_mag, shift, threads, seed) -> None:
    """``lb_affine_qparams`` (dynamic uint8 affine per tensor): lowbit.ops' scale and zero-point
    and ``zp * colsum``, on odd lengths, 1 and 2 threads; exact-size buffers."""
    from lowbit.ops import qparams_from_range

    lib = native.load_native()
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(n, generator=g) + shift) * 10.0 ** log_mag
    cols = int(torch.randint(1, 40, (), generator=g))
    colsum = torch.randint(-5000, 5000, (cols,), dtype=torch.int32, generator=g)
    spec = QuantSpec(bits=bits, signed=False, symmetric=False)
    off = -(2 ** (bits - 1))
    scale, zp, comp = torch.empty(1), torch.empty(1, dtype=torch.int32), torch.empty_like(colsum)
    rc = lib.lb_affine_qparams(x.data_ptr(), n, spec.qmin, spec.qmax, off, colsum.data_ptr(),
                               cols, scale.data_ptr(), zp.data_ptr(), comp.data_ptr(), threads)
    lo, hi = (x.min(), x.max()) if n else (torch.tensor(0.0), torch.tensor(0.0))
    s_ref, z_ref = qparams_from_range(lo, hi, spec)
    assert rc == 0 and (float(scale), int(zp)) == (float(s_ref), int(z_ref) + off)
    assert torch.equal(comp, colsum * (int(z_ref) + off))
    for bad in (float("inf"), float("-inf"), float("nan")) if n else ():
        y = x.clone()
        y[n // 2] = bad  # (a NaN does not move a min or max: the kernel checks for it)
        assert lib.lb_affine_qparams(y.data_ptr(), n, spec.qmin, spec.qmax, off,
                                     colsum.data_ptr(), cols, scale.data_ptr(), zp.data_ptr(),
                                     comp.data_ptr(), threads) == 1


@needs_native
@given(m=st.integers(1, 40), k=st.integers(2, 200), scale=st.floats(1e-4, 10.0),
       zp=st.integers(-128, 127), qrange=st.sampled_from([(-128, 127), (-127, 127), (-8, 7)]),
       bf16=st.booleans(), seed=st.integers(0, 2**16))
def test_static_quantize_is_bit_identical(m, k, scale, zp, qrange, bf16, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 40
    x[0, :2] = torch.tensor([0.5, -2.5]) * scale  # (near) ties: round half to even
    x = x.to(torch.bfloat16) if bf16 else x
    s, z = torch.tensor(scale), torch.tensor(zp, dtype=torch.int32)
    q, _, _ = quantize_activation(x, *qrange, s, z)
    q_ref, _, _ = quantize_activation(x, *qrange, s, z, native=False)
    assert torch.equal(q, q_ref)


@needs_native
@pytest.mark.parametrize("threads", [1, 2])
def test_large_inputs_use_threads_and_stay_identical(threads: int) -> None:
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.randn(257, 1031) * 5  # > PARALLEL_MIN_ELEMENTS, odd sizes
        assert x.numel() >= native.PARALLEL_MIN_ELEMENTS
        for per_token in (True, False):
            got = quantize_activation(x, -128, 127, per_token=per_token)
            ref = quantize_activation(x, -128, 127, per_token=per_token, native=False)
            assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        acc = torch.randint(-2**20, 2**20, (257, 1031), dtype=torch.int32)
        sx, sw, b = torch.rand(257, 1), torch.rand(1031), torch.randn(1031)
        assert torch.equal(_int8_epilogue(acc.clone(), sx, sw, b, True),
                           _int8_epilogue(acc.clone(), sx, sw, b, True, native=False))
    finally:
        torch.set_num_threads(old)


@needs_native
@given(m=st.integers(1, 50), n=st.integers(1, 300), per_row=st.booleans(), bias=st.booleans(),
       relu=st.booleans(), seed=st.integers(0, 2**16))
def test_linear_epilogue_is_bit_identical(m, n, per_row, bias, relu, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    acc = torch.randint(-2**22, 2**22, (m, n), dtype=torch.int32, generator=g)
    sx = torch.rand((m, 1) if per_row else (), generator=g)
    sw = torch.rand(n, generator=g) * 1e-3
    b = torch.randn(n, generator=g) if bias else None
    assert torch.equal(_int8_epilogue(acc.clone(), sx, sw, b, relu),
                       _int8_epilogue(acc.clone(), sx, sw, b, relu, native=False))


@needs_native
@pytest.mark.parametrize("bias", [True, False])
def test_nchw_conv_epilogue_is_bit_identical(bias: bool) -> None:
    """The C epilogue on the NCHW output of the fp32 conv over codes."""
    w = torch.randint(-127, 128, (8, 2, 3, 3), dtype=torch.int8)
    x = torch.randn(3, 2, 5, 7)
    args = (x, torch.tensor(0.013), None, -128, 127, w, torch.rand(8),
            w.sum((1, 2, 3), dtype=torch.int32), torch.randn(8) if bias else None, (1, 1),
            (1, 1), (1, 1), 1)
    got = int8_conv2d(*args, relu=True, kernel="fp32_codes_conv")
    assert torch.equal(got, int8_conv2d(*args, relu=True, kernel="reference"))


@needs_native
def test_epilogue_refuses_layouts_it_does_not_handle() -> None:
    acc = torch.ones(4, 6, dtype=torch.int32)
    assert not _epilogue_native(acc.t(), torch.tensor(1.0), torch.ones(4), None, False)
    assert not _epilogue_native(acc.float(), torch.tensor(1.0), torch.ones(6), None, False)
    assert not _epilogue_native(acc, torch.ones(3, 1), torch.ones(6), None, False)  # M mismatch
    assert not _epilogue_native(acc, torch.tensor(1.0), torch.ones(6).double(), None, False)
    assert torch.equal(acc, torch.ones(4, 6, dtype=torch.int32))  # untouched


# ------------------------------------------------------------------ bit identity, fused linear

@needs_native
@given(m=st.integers(1, 40), k=st.sampled_from([8, 24, 64, 100, 300]), n=st.integers(1, 300),
       mode=st.sampled_from(["per_token", "per_tensor", "static", "static_affine"]),
       bf16=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_fused_linear_equals_reference(m, k, n, mode, bf16, relu, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 2
    x = x.to(torch.bfloat16) if bf16 else x
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    ws, b = torch.rand(n, generator=g) * 0.01, torch.randn(n, generator=g)
    colsum = w.sum(1, dtype=torch.int32)
    scale = zp = comp = None
    if mode.startswith("static"):
        scale = torch.tensor(0.02)
        if mode == "static_affine":
            zp = torch.tensor(-7, dtype=torch.int32)
            comp = zp * colsum
    kernel = GEMM if k > 16 else "fp32_codes"
    y = fused_int8_linear(x, -128, 127, w, ws, colsum, b, per_token=mode == "per_token",
                          scale=scale, zero_point=zp, comp=comp, relu=relu, kernel=kernel)
    q, s, z = quantize_activation(x, -128, 127, scale, zp, per_token=mode == "per_token",
                                  native=False)
    ref = int8_linear(q, s, z, w, ws, colsum, b, relu=relu, kernel="reference")
    assert y is not None and y.dtype == x.dtype
    assert torch.equal(y, ref.to(x.dtype))


@needs_native
@pytest.mark.parametrize("mnk", [(1, 128, 10), (64, 512, 256)])  # one C call / three calls
def test_fused_linear_both_strategies_equal_reference(mnk: tuple[int, int, int]) -> None:
    m, n, k = mnk
    x = torch.randn(m, k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    ws, b, colsum = torch.rand(n) * 0.01, torch.randn(n), w.sum(1, dtype=torch.int32)
    y = fused_int8_linear(x, -128, 127, w, ws, colsum, b, relu=True, kernel=GEMM)
    q, s, z = quantize_activation(x, -128, 127, native=False)
    small = m * n * k <= SMALL_LINEAR_MACS and m * k <= SMALL_LINEAR_CODES
    assert y is not None and small == (mnk == (1, 128, 10))
    assert torch.equal(y, int8_linear(q, s, z, w, ws, colsum, b, relu=True, kernel="reference"))


@needs_native
@pytest.mark.parametrize("mode", ["per_token", "per_tensor", "static_affine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_linear_in_row_blocks_equals_reference(mode: str, dtype: torch.dtype) -> None:
    m, k, n = 2 * BLOCK_ROWS + 77, 64, 48  # two full blocks and a partial one
    x = (torch.randn(m, k) * 3).to(dtype)
    x[5] *= 100  # one row dominates a per-tensor scale
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    ws, b, colsum = torch.rand(n) * 0.01, torch.randn(n), w.sum(1, dtype=torch.int32)
    scale = zp = comp = None
    if mode == "static_affine":
        scale, zp = torch.tensor(0.05), torch.tensor(9, dtype=torch.int32)
        comp = zp * colsum
    y = fused_int8_linear(x, -128, 127, w, ws, colsum, b, per_token=mode == "per_token",
                          scale=scale, zero_point=zp, comp=comp, relu=True, kernel=GEMM)
    q, s, z = quantize_activation(x, -128, 127, scale, zp, per_token=mode == "per_token",
                                  native=False)
    ref = int8_linear(q, s, z, w, ws, colsum, b, relu=True, kernel="reference").to(dtype)
    assert y is not None and y.dtype == dtype and torch.equal(y, ref)


def test_fused_linear_declines_what_it_cannot_run() -> None:
    w = torch.ones(4, 8, dtype=torch.int8)
    args = (-128, 127, w, torch.ones(4), w.int().sum(1), None)
    assert fused_int8_linear(torch.randn(3, 8).double(), *args) is None
    assert fused_int8_linear(torch.randn(8, 3).t(), *args) is None  # K not unit-stride
    assert fused_int8_linear(torch.randn(3, 8), *args, kernel="reference") is None
    wide = torch.tensor(2, dtype=torch.int64) * args[4]  # an int64 zero-point term
    assert fused_int8_linear(torch.randn(3, 8), *args, scale=torch.tensor(0.1),
                             zero_point=torch.tensor(2, dtype=torch.int32), comp=wide) is None


# ------------------------------------------------------------------ modules, native on and off

def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 48), nn.ReLU(), nn.Linear(48, 10)).eval()
    cnn = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3),
                        nn.Flatten(), nn.Linear(16 * 6 * 6, 5)).eval()
    return {"mlp": mlp, "cnn": cnn}


def _outputs(models: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    xs = {"mlp": torch.randn(6, 64, generator=torch.Generator().manual_seed(1)),
          "cnn": torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))}
    out = {}
    for name, model in models.items():
        x = xs[name]
        calib = [x]
        with torch.inference_mode():
            out[f"{name}/dynamic"] = quantize_dynamic(model)(x)
            out[f"{name}/static"] = quantize_static(model, calib, progress=False)(x)
            out[f"{name}/bf16"] = quantize_dynamic(model.to(torch.bfloat16))(x.bfloat16())
            model.float()
    return out


@needs_native
def test_quantized_models_give_the_same_bits_without_native(request) -> None:
    assert native.load_native() is not None
    fast = _outputs(_models())
    request.getfixturevalue("no_native")
    slow = _outputs(_models())
    for key, y in fast.items():
        assert y.dtype == slow[key].dtype and torch.equal(y, slow[key]), key


@needs_native
def test_conv_kernels_agree_with_reference_with_native_on() -> None:
    w = torch.randint(-127, 128, (6, 4, 3, 3), dtype=torch.int8)
    x = torch.randn(2, 4, 9, 9)
    args = (x, None, None, -128, 127, w, torch.rand(6), w.int().sum((1, 2, 3)), torch.randn(6),
            (1, 1), (1, 1), (1, 1), 1)
    ref = int8_conv2d(*args, kernel="reference")
    for kernel in ("fp32_codes_conv", "fp32_codes"):
        assert torch.equal(int8_conv2d(*args, kernel=kernel), ref), kernel


def test_module_cast_to_bf16_keeps_working() -> None:
    model = nn.Sequential(nn.Linear(32, 16)).eval()
    q = quantize_dynamic(model)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        ref = q(x.bfloat16())
        q.to(torch.bfloat16)  # scales and bias stay float32: the same kernels, the same bits
        y = q(x.bfloat16())
    assert y.dtype == torch.bfloat16 and q[0].weight_scale.dtype == torch.float32
    assert torch.equal(y, ref)


@needs_native
@pytest.mark.parametrize("case", [
    dict(stride=1, padding=1, dilation=1, ksize=3, cin=1),
    dict(stride=2, padding=0, dilation=1, ksize=3, cin=5),
    dict(stride=1, padding=2, dilation=2, ksize=3, cin=4),
    dict(stride=1, padding=0, dilation=1, ksize=1, cin=6),  # 1x1: no im2col at all
    dict(stride=(2, 1), padding=(1, 0), dilation=1, ksize=(3, 2), cin=40),  # > 32-byte rows
])
@pytest.mark.parametrize("zp", [None, 5])
def test_native_conv_gemm_equals_reference(case: dict, zp: int | None) -> None:
    pair = lambda v: v if isinstance(v, tuple) else (v, v)  # noqa: E731
    kh, kw = pair(case["ksize"])
    w = torch.randint(-127, 128, (7, case["cin"], kh, kw), dtype=torch.int8)
    x = torch.randn(3, case["cin"], 11, 9)
    scale = None if zp is None else torch.tensor(0.03)
    zpt = None if zp is None else torch.tensor(zp, dtype=torch.int32)
    args = (x, scale, zpt, -128, 127, w, torch.rand(7), w.sum((1, 2, 3), dtype=torch.int32),
            torch.randn(7), pair(case["stride"]), pair(case["padding"]), pair(case["dilation"]),
            1)
    ref = int8_conv2d(*args, relu=True, kernel="reference")
    for kernel in {GEMM, "fp32_codes"}:
        got = int8_conv2d(*args, relu=True, kernel=kernel)
        assert got.is_contiguous() and torch.equal(got, ref), kernel


@needs_native
@given(bits=st.sampled_from([4, 8]), signed=st.booleans(), symmetric=st.booleans(),
       gran=st.sampled_from(["per_tensor", "per_channel", "per_group"]),
       group=st.sampled_from([2, 7, 8, 32]), k=st.integers(1, 70), n=st.integers(1, 9),
       seed=st.integers(0, 2**16))
def test_weight_dequantization_is_bit_identical(bits, signed, symmetric, gran, group, k, n,
                                                seed) -> None:
    torch.manual_seed(seed)
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric and signed, granularity=gran,
                     axis=0,
                     group_size=group if gran == "per_group" else None)
    layer = nn.Linear(k, n)
    cls = Int4Linear if bits == 4 else Int8WeightOnlyLinear
    cfg_spec = {"weight_spec": spec}
    q = cls(k, n, **cfg_spec)
    q._fill(layer.weight.detach(), layer.bias.detach(), "Linear", None)
    got = q.dequantize_weight()
    assert torch.equal(got, q._dequant_padded()[:, :k])


@needs_native
@given(b=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 13), w=st.integers(1, 13),
       k=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_maxpool_is_bit_identical_with_ties_signed_zeros_and_nans(b, c, h, w, k, seed) -> None:
    g = torch.Generator().manual_seed(seed)
    pick = torch.tensor([0.0, -0.0, 1.0, -1.0, 2.0, float("nan"), float("-inf"), float("inf")])
    y = pick[torch.randint(0, len(pick), (b, c, h, w), generator=g)]
    if h < k or w < k:
        return
    got = maxpool2d_native(native.load_native(), y, k)
    ref = torch.nn.functional.max_pool2d(y, k)
    assert torch.equal(got.view(torch.int32), ref.view(torch.int32))


@needs_native
@given(b=st.integers(1, 3), c=st.integers(1, 6), o=st.integers(1, 20), h=st.integers(1, 12),
       w=st.integers(1, 20), k=st.sampled_from([(1, 1), (3, 3), (2, 5)]), sh=st.integers(1, 2),
       pad=st.integers(0, 2), dil=st.integers(1, 2), relu=st.booleans(), bias=st.booleans(),
       seed=st.integers(0, 2**16))
def test_direct_conv_matches_oneDNN(b, c, o, h, w, k, sh, pad, dil, relu, bias, seed) -> None:
    """Float inputs: F.conv2d up to float32 rounding (|err| <= taps eps (|x| * |w|)); integer
    inputs (the "fp32_codes_conv" case): the same bits."""
    torch.manual_seed(seed)
    x, wt = torch.randn(b, c, h, w), torch.randn(o, c, *k)
    bb = torch.randn(o) if bias else None
    if (h + 2 * pad - dil * (k[0] - 1) - 1) < 0 or (w + 2 * pad - dil * (k[1] - 1) - 1) < 0:
        return
    lib = native.load_native()
    assert direct_conv_fits(x, wt.numel(), (sh, 1), 1)
    assert not direct_conv_fits(x, wt.numel(), (sh, 2), 1)
    got = conv2d_direct_native(lib, x, wt, bb, (sh, 1), (pad, pad), (dil, dil), relu)
    ref = F.conv2d(x, wt, bb, (sh, 1), pad, dil)
    ref = ref.relu() if relu else ref
    taps = c * k[0] * k[1] + 1
    bound = 2 * taps * torch.finfo(torch.float32).eps * F.conv2d(
        x.abs(), wt.abs(), None if bb is None else bb.abs(), (sh, 1), pad, dil) + 1e-30
    assert got.shape == ref.shape and bool(((got - ref).abs() <= bound).all())
    xi, wi = x.mul(20).round(), wt.mul(20).round()  # integer-valued: exact sums
    assert torch.equal(conv2d_direct_native(lib, xi, wi, None, (sh, 1), (pad, pad), (dil, dil)),
                       F.conv2d(xi, wi, None, (sh, 1), pad, dil))


def _wo_layer(bits: int, signed: bool, symmetric: bool, gran: str, group: int, k: int, n: int,
              bias: bool = True) -> Int4Linear | Int8WeightOnlyLinear:
    spec = QuantSpec(bits=bits, signed=signed, symmetric=symmetric and signed, granularity=gran,
                     axis=0, group_size=group if gran == "per_group" else None)
    layer = nn.Linear(k, n, bias=bias)
    q = (Int4Linear if bits == 4 else Int8WeightOnlyLinear)(k, n, bias, weight_spec=spec)
    q._fill(layer.weight.detach(), None if layer.bias is None else layer.bias.detach(), "Linear",
            None)
    return q


@needs_native
@given(bits=st.sampled_from([4, 8]), signed=st.booleans(), symmetric=st.booleans(),
       gran=st.sampled_from(["per_tensor", "per_channel", "per_group"]),
       group=st.sampled_from([2, 8, 32]), k=st.integers(1, 70), n=st.integers(1, 9),
       m=st.integers(1, 5), bias=st.booleans(), relu=st.booleans(), seed=st.integers(0, 2**16))
def test_small_weight_only_linear_equals_dequantized_float(bits, signed, symmetric, gran, group,
                                                           k, n, m, bias, relu, seed) -> None:
    """The one-call C weight-only linear gives F.linear over the dequantized weight up to float32
    summation order: |error| <= k eps (|x| @ |W|.T), the bound of any summation order."""
    torch.manual_seed(seed)
    q = _wo_layer(bits, signed, symmetric, gran, group, k, n, bias)
    x = torch.randn(m, k)
    s = q.eff_spec
    got = weight_only_linear_native(
        x, q.qweight, packed=q.packed, signed=q.weight_spec.signed, n=n, kp=q.kp,
        group_size=s.group_size if s.granularity == "per_group" else None,
        scale=q.weight_scale, zero_point=q.weight_zero_point, bias=q.bias, relu=relu)
    w = q.dequantize_weight()
    ref = F.linear(x, w, q.bias)
    ref = ref.relu() if relu else ref
    bound = 2 * (k + 2) * torch.finfo(torch.float32).eps * (
        x.abs() @ w.abs().t() + (0 if q.bias is None else q.bias.abs())) + 1e-30
    assert got is not None and got.shape == (m, n)
    assert bool(((got - ref).abs() <= bound).all()), (got - ref).abs().max()


@needs_native
def test_small_weight_only_layers_run_one_c_call_for_float32_inputs() -> None:
    """A 128 -> 10 INT4 head at batch 1 runs the C path (reported as ``native_fp32``); larger M,
    bf16 inputs and the reference backend keep the packed / float kernels, with the same
    values up to rounding."""
    torch.manual_seed(0)
    q = _wo_layer(4, True, True, "per_group", 32, 128, 10)
    limit = q._small_max_m
    info = q.kernel_info()
    assert limit >= 1 and next(iter(info.items())) == (f"M<={limit}", "native_fp32")
    for rule, kernel in info.items():  # each range names the kernel its bound selects
        bound = int(rule[3:]) if rule.startswith("M<=") else int(rule[2:]) + 1
        assert q._select(bound) == kernel, (rule, kernel)
    assert q._select(1) == "native_fp32" and q._select(limit + 1) == q._select_packed(limit + 1)
    ref = Int4Linear(128, 10, weight_spec=q.weight_spec, backend="reference")
    ref.load_state_dict(q.state_dict())
    assert "native_fp32" not in ref.kernel_info().values()
    for m in (1, limit, limit + 1):
        x = torch.randn(m, 128)
        assert torch.allclose(q(x), ref(x), rtol=1e-2, atol=1e-2)  # bf16 packed op past limit
    x = torch.randn(1, 128)
    y = torch.nn.functional.linear(x, q.dequantize_weight(), q.bias)
    assert torch.allclose(q(x), y, rtol=1e-5, atol=1e-6)  # float32 all through
    assert q(x.bfloat16()).dtype == torch.bfloat16
    odd = _wo_layer(4, True, True, "per_group", 7, 14, 3)  # packed groups not byte aligned
    assert odd._small_max_m == 0 and "native_fp32" not in odd.kernel_info().values()
    with pytest.raises(ValueError, match=r"x must be float32 \[M, K\] with K <= kp=128"):
        weight_only_linear_native(torch.randn(2, 129), q.qweight, packed=True, signed=True, n=10,
                                  kp=128, group_size=32, scale=q.weight_scale,
                                  zero_point=q.weight_zero_point)
    with pytest.raises(ValueError, match=r"bias must be float32 \[10\]"):
        weight_only_linear_native(x, q.qweight, packed=True, signed=True, n=10, kp=128,
                                  group_size=32, scale=q.weight_scale,
                                  zero_point=q.weight_zero_point, bias=torch.ones(3))


def test_small_weight_only_path_steps_aside_without_native(no_native) -> None:
    torch.manual_seed(0)
    q = _wo_layer(4, True, True, "per_group", 32, 128, 10)
    assert "native_fp32" not in q.kernel_info().values() and q._select(1) != "native_fp32"
    x = torch.randn(1, 128)
    y = torch.nn.functional.linear(x, q.dequantize_weight(), q.bias)
    assert torch.allclose(q(x), y, rtol=1e-2, atol=1e-2)


@needs_native
def test_weight_only_conv_uses_the_same_weights() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(5, 6, 3, padding=1)
    fast = WeightOnlyConv2d.from_float(conv, _int4_config(), fused_relu=True)
    ref = WeightOnlyConv2d.from_float(conv, _int4_config(), fused_relu=True, backend="reference")
    x = torch.randn(2, 5, 7, 7)
    with torch.inference_mode():  # the direct C conv: float32 rounding of another sum order
        w = ref.dequantize_weight()
        bound = 2 * (5 * 9 + 1) * torch.finfo(torch.float32).eps * (
            F.conv2d(x.abs(), w.abs(), ref.bias.abs(), 1, 1)) + 1e-30
        assert bool(((fast(x) - ref(x)).abs() <= bound).all()) and bool((fast(x) >= 0).all())
    w = fast.qweight
    got = dequantize_weight_native(w, True, True, fast.n, fast.kp, fast.k,
                                   fast.eff_spec.group_size, fast.weight_scale,
                                   fast.weight_zero_point)
    assert got is not None and torch.equal(got.reshape(fast.wshape), ref.dequantize_weight())


def _int4_config():
    from lowbit.config import QuantizationConfig
    return QuantizationConfig.int4_weight_only(group_size=8)


@needs_native
def test_portable_torch_kernels_keep_bit_identity(tmp_path) -> None:
    """With torch's portable (non-FMA) kernels, the C epilogue rounds as they do."""
    script = (
        "import torch\n"
        "from lowbit.kernels import _int8_epilogue\n"
        "from lowbit.native import load_native\n"
        "assert load_native() is not None\n"
        "acc = torch.randint(-2**22, 2**22, (33, 70), dtype=torch.int32)\n"
        "sx, sw, b = torch.rand(33, 1), torch.rand(70), torch.randn(70)\n"
        "a = _int8_epilogue(acc.clone(), sx, sw, b, False)\n"
        "r = _int8_epilogue(acc.clone(), sx, sw, b, False, native=False)\n"
        "assert torch.equal(a, r), (a - r).abs().max()\n"
        "print(torch.backends.cpu.get_cpu_capability())\n")
    env = {**os.environ, "ATEN_CPU_CAPABILITY": "default"}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "DEFAULT"


@pytest.mark.parametrize("use_native", [True, False])
def test_empty_batches_pass_through(use_native: bool, request) -> None:
    if not use_native:
        request.getfixturevalue("no_native")
    lin = quantize_dynamic(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).eval())
    conv = quantize_dynamic(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 4, 1)).eval())
    with torch.inference_mode():
        assert lin(torch.zeros(0, 16)).shape == (0, 4)
        assert conv(torch.zeros(0, 3, 6, 6)).shape == (0, 4, 4, 4)


@pytest.mark.parametrize("per_token", [True, False])
def test_modules_can_be_called_from_several_threads(per_token: bool) -> None:
    """The fused path keeps no per-module scratch: concurrent calls give the same results
    (dynamic affine per-tensor layers too: their qparams live in a buffer per call)."""
    import threading

    from lowbit import QuantizationConfig

    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    q = quantize_dynamic(model, None if per_token else QuantizationConfig.int8_dynamic(
        per_token=False, symmetric=False))
    xs = [torch.randn(1100 if i % 2 else 3, 64) * (i + 1) for i in range(6)]  # row blocks and
    # one call; different ranges, so that a shared per-tensor scale would be caught
    with torch.inference_mode():
        refs = [q(x) for x in xs]
    wrong: list[int] = []

    def work(i: int) -> None:
        with torch.inference_mode():
            for _ in range(10):
                if not torch.equal(q(xs[i]), refs[i]):
                    wrong.append(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(xs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []


def test_low_level_kernels_refuse_mismatched_shapes() -> None:
    """The C kernels read operands by the sizes they are given: mismatches are refused, named."""
    w = torch.ones(4, 8, dtype=torch.int8)
    ws, colsum = torch.ones(4), w.sum(1, dtype=torch.int32)
    with pytest.raises(ValueError, match=r"same K; got x \(3, 16\), w \(4, 8\)"):
        fused_int8_linear(torch.randn(3, 16), -128, 127, w, ws, colsum, None)
    with pytest.raises(ValueError, match=r"bias must have one value per output feature \(N=4\)"):
        fused_int8_linear(torch.randn(3, 8), -128, 127, w, ws, colsum, torch.ones(3))
    with pytest.raises(ValueError, match=r"contiguous float32 NCHW.*use F\.max_pool2d"):
        maxpool2d_native(None, torch.randn(1, 2, 4, 4).transpose(2, 3), 2)
    with pytest.raises(ValueError, match=r"weight must be \(4, 8\) for n=4, kp=16"):
        dequantize_weight_native(torch.zeros(2, 3, dtype=torch.uint8), True, True, 4, 16, 16,
                                 None, torch.ones(4), torch.zeros(4, dtype=torch.int32))
    lib = native.load_native()
    if lib is not None:
        x, w = torch.randn(1, 3, 5, 5), torch.randn(4, 2, 3, 3)
        with pytest.raises(ValueError, match=r"same C.*weight \(4, 2, 3, 3\).*use F\.conv2d"):
            conv2d_direct_native(lib, x, w, None, (1, 1), (1, 1), (1, 1))
        with pytest.raises(ValueError, match=r"bias \(3,\)"):
            conv2d_direct_native(lib, x, torch.randn(4, 3, 3, 3), torch.ones(3), (1, 1), (1, 1),
                                 (1, 1))
    with pytest.raises(ValueError, match=r"scale / zero_point need 8 values \(per group\)"):
        dequantize_weight_native(torch.zeros(4, 8, dtype=torch.uint8), True, True, 4, 16, 16, 8,
                                 torch.ones(3), torch.zeros(3, dtype=torch.int32))
