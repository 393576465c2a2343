"""lowbit's per-ISA C kernels (``csrc/lowbit_gemm_*.c``), each path this CPU can run forced one
by one: the INT8 x INT8 GEMM bit-exact against int64 arithmetic (full-range and worst-case
codes, odd and large shapes, strided inputs, 1 and 2 threads, 8-bit activations in the sign
and the split form and the automatic choice between them), the fused linear against the
pure-PyTorch reference bit for bit (8-bit and 7-bit activations), the INT4 kernels against
dequantize + GEMM (float activations) and their integer reference (int8 activations), the C
bounds checks (hypothesis fuzzes every extent of both entry points with
buffers of exactly the claimed sizes), and ``LOWBIT_ISA``."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import lowbit
from lowbit import native
from lowbit.kernels import (
    _s8_acc,
    _s8_call,
    cpu_features,
    dequantize_weight_native,
    fused_int8_linear,
    int8_linear,
    quantize_activation,
    run_u4_linear,
    run_u4p_linear,
    s8_packed,
    select_kernel,
    u4_pack,
    u4p_pack,
    weight_only_linear_native,
)

#: The C ISA paths this machine can run (by feature detection: AMX, VNNI and AVX2 are skipped on
#: CPUs without them, never assumed).
C_PATHS = [isa for isa in ("amx", "avx512_vnni", "avx2", "portable") if native.load_gemm(isa)]
needs_c = pytest.mark.skipif(not C_PATHS, reason="no C compiler: no C ISA path to test")


@pytest.fixture(params=C_PATHS or ["none"])
def lib(request):
    """Each available C ISA path's library."""
    if request.param == "none":
        pytest.skip("no C compiler")
    return native.load_gemm(request.param)


def test_every_path_this_cpu_runs_builds() -> None:
    """The kernels of every ISA path are tested where the CPU runs them (C_PATHS); a path whose
    C source fails to compile would drop out of C_PATHS and its tests with it, so a failed
    build is a failure here, never a smaller suite (a CPU without the ISA, no compiler or
    LOWBIT_NATIVE=0 are reasons of another kind)."""
    failed = {isa: why for isa, why in native.isa_paths().items()
              if why.startswith("build or load failed")}
    assert not failed, failed


@pytest.fixture(params=[-1, 0, 1], ids=["auto", "sign", "split"])
def form(request, lib) -> Iterator[int]:
    """How 8-bit activation codes are laid out, forced process-wide: chosen per block of rows
    (-1), always the sign form (0), always the split form (1: a 7-bit part for every step, the
    remainder of codes outside [-64, 63] for the listed steps only)."""
    before = lib.lbk_s8_split_mode(request.param)
    yield request.param
    lib.lbk_s8_split_mode(before)


@pytest.fixture(params=[1, 2])
def threads(request) -> Iterator[int]:
    before = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(before)


def _exact(q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return (q.long() @ w.long().t()).to(torch.int32)


@pytest.mark.parametrize("m,k,n", [(1, 1, 1), (1, 7, 3), (3, 33, 17), (4, 64, 16), (5, 130, 31),
                                   (37, 300, 100), (130, 1000, 40), (2, 16384 + 3, 21),
                                   # panel pairs with a single panel left (2 / 8 rows), 6 rows
                                   (2, 100, 40), (8, 70, 50), (6, 64, 33)])
def test_s8_gemm_is_exact_on_full_range_codes(lib, form, threads, m: int, k: int,
                                               n: int) -> None:
    g = torch.Generator().manual_seed(m * 1000 + k + n)
    q = torch.randint(-128, 128, (m, k), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    packed = s8_packed(w, lib)
    assert packed is not None
    assert torch.equal(_s8_acc(lib, q, packed, n, pooled=False), _exact(q, w))


@pytest.mark.parametrize("a,b", [(-127, -127), (127, -127), (-128, 127), (-128, -127),
                                 (127, 127)])
def test_s8_gemm_worst_case_sums_do_not_saturate(lib, form, threads, a: int, b: int) -> None:
    k = 16384 + 5  # every pair sum at its extreme, K not a multiple of any tile
    q = torch.full((6, k), a, dtype=torch.int8)
    w = torch.full((19, k), b, dtype=torch.int8)
    got = _s8_acc(lib, q, s8_packed(w, lib), 19, pooled=False)  # type: ignore[arg-type]
    assert torch.equal(got, _exact(q, w))
    assert int(got[0, 0]) == a * b * k


def test_s8_gemm_reads_strided_rows(lib, form) -> None:
    base = torch.randint(-128, 128, (9, 80), dtype=torch.int8)
    q = base[:, 5:69]  # row stride 80, 64 columns
    w = torch.randint(-127, 128, (24, 64), dtype=torch.int8)
    assert torch.equal(_s8_acc(lib, q, s8_packed(w, lib), 24, pooled=False),  # type: ignore[arg-type]
                       _exact(q, w))
    qt = torch.randint(-128, 128, (64, 9), dtype=torch.int8).t()  # column-major: copied first
    assert torch.equal(_s8_acc(lib, qt, s8_packed(w, lib), 24, pooled=False),  # type: ignore[arg-type]
                       _exact(qt, w))


def test_s8_pack_refuses_minus_128_and_the_gemm_stays_exact(lib, form) -> None:
    w = torch.randint(-127, 128, (8, 40), dtype=torch.int8)
    w[3, 7] = -128
    assert s8_packed(w, lib) is None
    q = torch.randint(-128, 128, (5, 40), dtype=torch.int8)
    args = (q, torch.ones(5, 1), None, w, torch.ones(8), w.sum(1, dtype=torch.int32))
    kernel = "s8_" + lib.lbk_isa().decode()
    assert torch.equal(int8_linear(*args, kernel=kernel), int8_linear(*args, kernel="reference"))


@pytest.mark.parametrize("m,k,n", [(1, 1000, 40), (3, 257, 33), (4, 64, 16), (67, 1031, 45),
                                   (130, 2048 + 7, 19)])
@pytest.mark.parametrize("density", [0.0, 0.01, 0.1, 0.3, 1.0])
def test_s8_gemm_split_form_is_exact_at_its_boundaries(lib, form, threads, m: int, k: int,
                                                       n: int, density: float) -> None:
    """Codes mostly inside the 7-bit part with a fraction on and past its edges (-128, -65,
    -64, 63, 64, 127): every form, including the automatic choice on either side of its
    threshold, gives int64 arithmetic's sums."""
    g = torch.Generator().manual_seed(int(density * 100) + m * 7 + k)
    q = torch.randint(-64, 64, (m, k), dtype=torch.int8, generator=g)
    edge = torch.tensor([-128, -127, -65, -64, 63, 64, 65, 127], dtype=torch.int8)
    hit = torch.rand(m, k, generator=g) < density
    q[hit] = edge[torch.randint(0, len(edge), (int(hit.sum()),), generator=g)]
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w[:, :5] = 127
    w[:, 5:10] = -127
    assert torch.equal(_s8_acc(lib, q, s8_packed(w, lib), n, pooled=False),  # type: ignore[arg-type]
                       _exact(q, w))


@pytest.mark.parametrize("n", [40, 2100])
def test_s8_gemm_many_rows_in_either_tile_order(lib, form, threads, n: int) -> None:
    """Many rows run tiles rows-outer on packed weights up to 4 MiB and panels-outer beyond
    (2100 x 2051: 4.3 MiB); both give the exact sums."""
    g = torch.Generator().manual_seed(n)
    m, k = 140, 2048 + 3
    q = torch.randint(-64, 64, (m, k), dtype=torch.int8, generator=g)
    q[torch.rand(m, k, generator=g) < 0.02] = 127
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    exact = (q.double() @ w.double().t()).to(torch.int32)  # sums < 2**53: exact in float64
    assert torch.equal(_s8_acc(lib, q, s8_packed(w, lib), n, pooled=False), exact)  # type: ignore[arg-type]


AMX_LIB = native.load_gemm("amx") if "amx" in C_PATHS else None


@pytest.fixture(params=[1, 6, 1 << 20], ids=["amx-from-1-row", "amx-default", "amx-off"])
def amx_rows(request) -> Iterator[int]:
    """The amx library's row threshold for AMX tiles, forced process-wide: from one row on,
    the default, and never (its vpdpbusd tiles)."""
    before = AMX_LIB.lbk_amx_min_rows(request.param)  # type: ignore[union-attr]
    yield request.param
    AMX_LIB.lbk_amx_min_rows(before)  # type: ignore[union-attr]


@pytest.mark.skipif(AMX_LIB is None, reason="no AMX-INT8 on this CPU (or no C compiler)")
@pytest.mark.parametrize("m", [1, 5, 6, 15, 16, 17, 31, 32, 33, 64, 130, 300, 1100])
@pytest.mark.parametrize("k,n", [(61, 18), (64, 17), (100, 33), (256, 16), (784, 40),
                                 (4093, 33), (1024, 100)])
def test_amx_tiles_are_exact_at_every_row_count_and_panel_count(amx_rows, threads, m: int,
                                                                k: int, n: int) -> None:
    """Row counts around the 16-row tiles, the 32-row pairs and the larger AMX row blocks, odd
    panel counts, K whose last step is padded (61, 4093) and K with steps after the last whole
    tile (100, 784: run with vpdpbusd and added): int64 arithmetic's sums, 8-bit and 7-bit
    codes."""
    g = torch.Generator().manual_seed(m * 31 + k + n)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    packed = s8_packed(w, AMX_LIB)
    assert packed is not None
    for lo, hi in ((-128, 128), (-64, 64)):
        q = torch.randint(lo, hi, (m, k), dtype=torch.int8, generator=g)
        assert torch.equal(_s8_acc(AMX_LIB, q, packed, n, pooled=False), _exact(q, w))


@pytest.mark.skipif(AMX_LIB is None, reason="no AMX-INT8 on this CPU (or no C compiler)")
@pytest.mark.parametrize("a,b", [(-128, 127), (-128, -127), (127, 127), (127, -127)])
def test_amx_tiles_worst_case_sums_do_not_saturate(amx_rows, a: int, b: int) -> None:
    k = 16384 + 40  # every product at its extreme, on AMX tiles and the vpdpbusd tail
    q = torch.full((40, k), a, dtype=torch.int8)
    w = torch.full((35, k), b, dtype=torch.int8)
    got = _s8_acc(AMX_LIB, q, s8_packed(w, AMX_LIB), 35, pooled=False)  # type: ignore[arg-type]
    assert torch.equal(got, _exact(q, w))
    assert int(got[39, 34]) == a * b * k


@pytest.mark.skipif(AMX_LIB is None, reason="no AMX-INT8 on this CPU (or no C compiler)")
def test_amx_row_threshold_setter_returns_the_previous_one_and_ignores_bad_values() -> None:
    for setter in (AMX_LIB.lbk_amx_min_rows, AMX_LIB.lbk_amx_u4_min_rows):  # type: ignore[union-attr]
        before = setter(3)
        assert setter(0) == 3 and setter(-5) == 3
        setter(before)
    assert AMX_LIB.lbk_amx_ok() == 1  # type: ignore[union-attr]
    assert native.load_gemm("avx512_vnni").lbk_amx_ok() == 0  # type: ignore[union-attr]


@pytest.mark.parametrize("threads_", [1, 2])
def test_s8_automatic_form_follows_the_share_of_outlying_codes(lib, threads_: int) -> None:
    """Automatic choice: the split form for codes that mostly fit in 7 bits (on the ISA whose
    sign op it saves), the sign form for Gaussian-like codes, the 7-bit form for 7-bit
    activations; the same sums in every case."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads_)
    g = torch.Generator().manual_seed(threads_)
    w = torch.randint(-127, 128, (48, 512), dtype=torch.int8, generator=g)
    packed = s8_packed(w, lib)
    sparse = torch.randint(-64, 64, (200, 512), dtype=torch.int8, generator=g)
    sparse[:, 7] = 127  # one outlying code per row: 1 of 128 steps listed
    dense = torch.randint(-127, 128, (200, 512), dtype=torch.int8, generator=g)
    split = 4 if lib.lbk_isa() == b"avx2" else 1  # bit 2: split, bit 0: sign
    try:
        for q, want in ((sparse, split), (dense, 1), (sparse[:3], split), (dense[:3], 1)):
            lib.lbk_s8_forms_seen(1)
            assert torch.equal(_s8_acc(lib, q, packed, 48, pooled=False), _exact(q, w))  # type: ignore[arg-type]
            assert lib.lbk_s8_forms_seen(0) == want, (q.shape, want)
        x = torch.randn(5, 512, generator=g)  # 7-bit activations: the 7-bit form (bit 1)
        y = torch.empty(5, 48)
        lib.lbk_s8_forms_seen(1)
        _s8_call(lib, x, 0, torch.empty(5, 1), True, True, None, -64, 63, packed, 48,  # type: ignore[arg-type]
                 None, torch.ones(48), None, False, y, 0)
        assert lib.lbk_s8_forms_seen(0) == 2
    finally:
        torch.set_num_threads(before)


def test_s8_split_mode_setter_returns_the_previous_choice_and_ignores_bad_values(lib) -> None:
    before = lib.lbk_s8_split_mode(1)
    try:
        assert lib.lbk_s8_split_mode(5) == 1  # out of range: only read
        assert lib.lbk_s8_split_mode(0) == 1
        assert lib.lbk_s8_split_mode(-1) == 0
    finally:
        lib.lbk_s8_split_mode(before)


def test_s8_pack_follows_in_place_weight_changes(lib) -> None:
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    first = s8_packed(w, lib)
    assert s8_packed(w, lib) is first  # cached
    w.zero_()
    q = torch.randint(-128, 128, (2, 32), dtype=torch.int8)
    assert not _s8_acc(lib, q, s8_packed(w, lib), 16, pooled=False).any()  # type: ignore[arg-type]


@pytest.mark.parametrize("mode", ["per_token", "per_tensor", "static", "static_zp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bits", [8, 7])  # 7: the unsigned "u7" form, no sign op
@pytest.mark.parametrize("k", [259, 320])  # 259: AMX tiles + vpdpbusd tail; 320: tiles only
def test_fused_linear_matches_the_reference_bit_for_bit(lib, form, threads, mode: str,
                                                        dtype: torch.dtype, bits: int,
                                                        k: int) -> None:
    g = torch.Generator().manual_seed(7)
    m, n = 67, 45
    x = (torch.randn(m, k, generator=g) * 3).to(dtype)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    w_scale, bias = torch.rand(n, generator=g) / 50, torch.randn(n, generator=g)
    colsum = w.sum(1, dtype=torch.int32)
    scale = zp = comp = None
    if mode.startswith("static"):
        scale = torch.tensor(0.05)
        if mode == "static_zp":
            zp = torch.tensor(-9, dtype=torch.int32)
            comp = zp * colsum
    per_token = mode == "per_token"
    dynamic = scale is None
    s = torch.empty((m, 1) if per_token else ()) if dynamic else scale
    y = torch.empty((m, n), dtype=dtype)
    bf16 = int(dtype == torch.bfloat16)
    qmin, qmax = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    _s8_call(lib, x, bf16, s, dynamic and per_token, dynamic, zp, qmin, qmax,
             s8_packed(w, lib), n, comp, w_scale, bias, True, y, bf16)  # type: ignore[arg-type]
    q, qs, qz = quantize_activation(x, qmin, qmax, scale, zp, per_token=per_token, native=False)
    ref = int8_linear(q, qs, qz, w, w_scale, colsum, bias, relu=True, kernel="reference")
    assert torch.equal(y, ref.to(dtype))


def test_the_c_kernels_refuse_what_does_not_fit(lib) -> None:
    w = torch.randint(-127, 128, (16, 32), dtype=torch.int8)
    packed = s8_packed(w, lib)
    q = torch.randint(-128, 128, (4, 32), dtype=torch.int8)
    short = torch.empty((2, 16), dtype=torch.int32)  # room for 32 outputs, not 64
    with pytest.raises(RuntimeError, match="refused its arguments"):
        _s8_call(lib, q, 2, None, False, False, None, -128, 127, packed, 16, None, None,  # type: ignore[arg-type]
                 None, False, short, 2)
    with pytest.raises(RuntimeError, match="refused"):  # a packed weight of another shape
        _s8_call(lib, q, 2, None, False, False, None, -128, 127, packed[:-64], 16, None,  # type: ignore[index]
                 None, None, False, torch.empty((4, 16), dtype=torch.int32), 2)
    x = torch.randn(3, 64)
    wq, s, z = u4_pack(torch.randint(-8, 8, (5, 64), dtype=torch.int8), True,
                       torch.rand(5, 2), torch.zeros(5, 2, dtype=torch.int32), 32)
    with pytest.raises(RuntimeError, match="refused"):  # x has 96 columns, Kp is 64
        run_u4_linear(lib, torch.randn(3, 96), (wq, s, z, 64, 32), None, False)
    with pytest.raises(ValueError, match="packed weight"):  # a Kp the weight does not have
        run_u4_linear(lib, x, (wq, s, z, 32, 32), None, False)
    with pytest.raises(ValueError, match="scales"):  # one group's scales: never read past
        run_u4_linear(lib, x, (wq, s[:, :1].contiguous(), z, 64, 32), None, False)
    with pytest.raises(ValueError, match="zero_points"):
        run_u4_linear(lib, x, (wq, s, z[:, :1].contiguous(), 64, 32), None, False)
    codes8 = torch.randint(-100, 100, (4, 64), dtype=torch.int8)
    one = torch.ones(4), torch.zeros(4, dtype=torch.int32)  # per channel, for group_size 32
    with pytest.raises(ValueError, match="need 8 values"):
        dequantize_weight_native(codes8, False, True, 4, 64, 64, 32, *one)
    with pytest.raises(ValueError, match="need 8 values"):
        weight_only_linear_native(x, codes8, packed=False, signed=True, n=4, kp=64,
                                  group_size=32, scale=one[0], zero_point=one[1])
    with pytest.raises(ValueError, match="scale must hold one value"):  # read as scale[0]
        fused_int8_linear(torch.randn(2, 64), -128, 127, codes8, torch.ones(4),
                          codes8.sum(1, dtype=torch.int32), None, scale=torch.empty(0),
                          zero_point=torch.zeros((), dtype=torch.int32))
    codes = torch.randint(-8, 8, (5, 64), dtype=torch.int8)
    wp, sp, zpp = u4p_pack(codes, True, torch.rand(5, 2), torch.zeros(5, 2, dtype=torch.int32), 32)
    with pytest.raises(RuntimeError, match="refused"):  # x has 64 columns, Kp is 32
        run_u4p_linear(lib, x, (wp, sp[:, :1].contiguous(), zpp[:, :1].contiguous(), 5, 32, 32),
                       None, False)
    with pytest.raises(ValueError, match="scales"):  # scales of another layer: never read past
        run_u4p_linear(lib, x, (wp, sp[:, :1].contiguous(), zpp, 5, 64, 32), None, False)
    with pytest.raises(ValueError, match="zero_points"):
        run_u4p_linear(lib, x, (wp, sp, zpp.float(), 5, 64, 32), None, False)
    with pytest.raises(ValueError, match="zero-points outside"):  # stored as bytes: never wrap
        u4p_pack(codes, True, torch.rand(5, 2), torch.full((5, 2), 300, dtype=torch.int32), 32)


@pytest.mark.parametrize("m,k,n,g", [(1, 64, 3, 32), (3, 100, 17, 32), (4, 256, 64, 128),
                                     (7, 1024, 33, 64), (16, 512, 8, 256)])
@pytest.mark.parametrize("signed", [True, False])
def test_u4_kernel_matches_dequantize_then_gemm(lib, threads, m: int, k: int, n: int, g: int,
                                                 signed: bool) -> None:
    gen = torch.Generator().manual_seed(k + n)
    kp = -(-k // g) * g
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (n, kp), dtype=torch.int8 if signed else torch.uint8,
                          generator=gen)
    s = torch.rand(n, kp // g, generator=gen) / 10
    z = torch.randint(lo, hi, (n, kp // g), dtype=torch.int32, generator=gen)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    got = run_u4_linear(lib, x, (*u4_pack(codes, signed, s, z, g), kp, g), bias, True)
    w = (codes.float() - z.float().repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)
    ref = torch.relu(x.double() @ w[:, :k].double().t() + bias.double()).float()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def u4q8_reference(x: torch.Tensor, codes: torch.Tensor, s: torch.Tensor, z: torch.Tensor,
                   g: int, shift: int) -> torch.Tensor:
    """The INT4 x INT8 kernel's arithmetic in float64 / int64: x [M, K] quantized per row and
    group as the C code does (float32 ``127 / max|x_g|``, round half to even), then
    ``sum_g s_g * sx_g * (dot_g(u, q) - z_g * sum_g(q))`` with ``u = code + shift``."""
    m, kp = x.shape[0], codes.shape[1]
    xp = torch.nn.functional.pad(x, (0, kp - x.shape[1])).reshape(m, kp // g, g)
    amax = xp.abs().amax(-1, keepdim=True)  # (M, G, 1) float32
    full = torch.full_like(amax, 127.0)  # (a python scalar over a tensor is 127 * (1 / amax))
    inv = torch.where(amax > 0, full / amax, torch.zeros_like(amax))
    q = torch.round(xp * inv).clamp(-127, 127).long()  # (M, G, g)
    sx = (amax / full).double().squeeze(-1)  # (M, G), float32 division
    u = (codes.long() + shift).reshape(codes.shape[0], kp // g, g)  # (N, G, g)
    dot = torch.einsum("mgj,ngj->mng", q, u).double()  # exact integers
    corr = z.double().unsqueeze(0) * q.sum(-1).double().unsqueeze(1)  # (M, N, G)
    return ((dot - corr) * s.double().unsqueeze(0) * sx.unsqueeze(1)).sum(-1)  # (M, N)


@pytest.mark.parametrize("m,k,n,g", [(1, 64, 3, 32), (3, 100, 17, 32), (4, 256, 64, 128),
                                     (7, 1024, 33, 64), (16, 512, 8, 256), (5, 1024, 9, 512),
                                     (70, 384, 50, 128), (2, 16384, 5, 128)])
@pytest.mark.parametrize("signed", [True, False])
def test_u4q8_kernel_matches_its_integer_reference(lib, threads, m: int, k: int, n: int, g: int,
                                                   signed: bool) -> None:
    """INT4 weights x int8 activations (per row and group): equal to its float64 / int64
    reference up to float32 rounding, on full-range codes (all 15 x -127 pair sums included);
    within the activation rounding of the float-activation kernel."""
    gen = torch.Generator().manual_seed(k + n + g)
    kp = -(-k // g) * g
    lo, hi = (-8, 8) if signed else (0, 16)
    codes = torch.randint(lo, hi, (n, kp), dtype=torch.int8 if signed else torch.uint8,
                          generator=gen)
    codes[0] = hi - 1  # the largest pair sums: 15 * 127 twice
    s = torch.rand(n, kp // g, generator=gen) / 10
    z = torch.randint(lo, hi, (n, kp // g), dtype=torch.int32, generator=gen)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen)
    x[0, :] = -torch.linspace(0.5, 1, k)  # codes -127 against the largest u
    got = run_u4p_linear(lib, x, (*u4p_pack(codes, signed, s, z, g), n, kp, g), bias, False)
    ref = u4q8_reference(x, codes, s, z + (8 if signed else 0), g, 8 if signed else 0)
    ref = (ref + bias.double()).float()  # float32 sums of up to 512 group terms: rounding only
    torch.testing.assert_close(got, ref, rtol=5e-5, atol=1e-6 * float(ref.abs().max()))
    fp = run_u4_linear(lib, x, (*u4_pack(codes, signed, s, z, g), kp, g), bias, False)
    assert float((got - fp).norm() / fp.norm()) < 2e-2  # the activation rounding only


@pytest.mark.skipif(AMX_LIB is None, reason="no AMX-INT8 on this CPU (or no C compiler)")
@pytest.mark.parametrize("m", [1, 15, 16, 17, 32, 33, 100, 129, 300])
@pytest.mark.parametrize("k,n,g", [(64, 8, 64), (256, 17, 128), (1024, 33, 256), (768, 100, 128),
                                   (384, 40, 192), (128, 24, 32)])
def test_amx_int4_tiles_give_the_vpdpbusd_panels_bits(threads, m: int, k: int, n: int,
                                                      g: int) -> None:
    """INT4 x INT8 on AMX tiles (group sizes 64-256, from 6 rows by default; forced from one
    row here) adds each group's integer sums in the same float ops as the vpdpbusd panels: the
    same bits, for partial panel quads (n = 8, 17, 33, 100), row counts around the 32-row tiles
    and the 128-row work items, and rows holding NaN (computed in float afterwards). g = 32 is
    not tiled and must be unchanged too."""
    gen = torch.Generator().manual_seed(m + k + n + g)
    codes = torch.randint(-8, 8, (n, k), dtype=torch.int8, generator=gen)
    s = torch.rand(n, k // g, generator=gen) / 10
    z = torch.randint(-8, 8, (n, k // g), dtype=torch.int32, generator=gen)
    bias = torch.randn(n, generator=gen)
    x = torch.randn(m, k, generator=gen) * 3
    x[0, :] = -torch.linspace(0.5, 1, k)
    if m > 3:
        x[3, 5] = float("nan")
    args = (*u4p_pack(codes, True, s, z, g), n, k, g)
    before = AMX_LIB.lbk_amx_u4_min_rows(1)  # type: ignore[union-attr]
    try:
        tiles = run_u4p_linear(AMX_LIB, x, args, bias, True)
        AMX_LIB.lbk_amx_u4_min_rows(1 << 20)  # type: ignore[union-attr]
        panels = run_u4p_linear(AMX_LIB, x, args, bias, True)
    finally:
        AMX_LIB.lbk_amx_u4_min_rows(before)  # type: ignore[union-attr]
    assert torch.equal(tiles.isnan(), panels.isnan())
    assert torch.equal(tiles.nan_to_num(), panels.nan_to_num())
    ref = u4q8_reference(x[:3], codes, s, z + 8, g, 8)
    torch.testing.assert_close(tiles[:3], torch.relu(ref + bias.double()).float(), rtol=5e-5,
                               atol=1e-5)


def test_u4q8_kernel_rows_with_nan_inf_or_tiny_values_are_computed_in_float(lib) -> None:
    gen = torch.Generator().manual_seed(5)
    codes = torch.randint(-8, 8, (6, 128), dtype=torch.int8, generator=gen)
    codes[:, 40] = torch.tensor([0, 1, -1, 7, -8, 0])  # +Inf times zero, positive, negative
    s, z = torch.rand(6, 4, generator=gen), torch.zeros(6, 4, dtype=torch.int32)
    x = torch.randn(5, 128, generator=gen)
    x[1, 3], x[2, 40] = float("nan"), float("inf")
    x[3, 96:] = 1e-35  # a group whose scale would underflow
    x[4, 64:96] = 0.0  # an all-zero group: codes 0, no division by zero
    got = run_u4p_linear(lib, x, (*u4p_pack(codes, True, s, z, 32), 6, 128, 32), None, False)
    w = (codes.float() + 8 - (z.float() + 8).repeat_interleave(32, 1)) * s.repeat_interleave(32, 1)
    fp = x.double() @ w.double().t()  # the float product: NaN / Inf where it has them
    assert bool(got[1].isnan().all())
    assert torch.equal(got[2].isnan(), fp[2].isnan()) and torch.equal(got[2].isinf(), fp[2].isinf())
    assert torch.equal(torch.sign(got[2][fp[2].isinf()]), torch.sign(fp[2][fp[2].isinf()]).float())
    torch.testing.assert_close(got[3], fp[3].float(), rtol=1e-5, atol=1e-5)  # in float
    ref = u4q8_reference(x[[0, 4]], codes, s, z + 8, 32, 8)
    torch.testing.assert_close(got[[0, 4]], ref.float(), rtol=1e-5, atol=1e-5)


@needs_c
@pytest.mark.parametrize("isa", C_PATHS)
def test_expanded_and_channels_last_inputs_give_the_contiguous_bits(forced_isa, isa: str) -> None:
    """A batch expanded from one sample (row stride 0, as ``query.expand(B, -1, -1)`` gives)
    once made the INT8 and INT4 C GEMMs refuse their arguments, and a weight-only conv took
    another kernel for a channels-last or expanded input (1 ulp off): every layout of the same
    values now gets the same bits, in every mode."""
    forced_isa(isa)
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    conv = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()).eval()
    cal = [torch.randn(16, 64)]
    per_tensor = lowbit.QuantizationConfig.int8_dynamic(per_token=False, symmetric=False)
    for model, sample in ((mlp, torch.randn(64)), (conv, torch.randn(3, 8, 8))):
        for qmodel in (lowbit.quantize_dynamic(model),
                       lowbit.quantize_dynamic(model, config=per_tensor),
                       lowbit.quantize_weight_only(model, bits=4, group_size=32),
                       lowbit.quantize_weight_only(model, bits=8)) + (
                           (lowbit.quantize_static(model, cal, progress=False),)
                           if model is mlp else ()):
            for shape in ((1,), (5,), (300,)) + (((2, 40),) if model is mlp else ()):
                x = sample.expand(*shape, *sample.shape)
                want = qmodel(x.contiguous())
                assert torch.equal(qmodel(x), want), (type(qmodel[0]).__name__, shape)
                if model is conv and len(shape) == 1:
                    x = x.contiguous(memory_format=torch.channels_last)
                    assert torch.equal(qmodel(x), want), (type(qmodel[0]).__name__, shape)


@needs_c
@pytest.mark.parametrize("isa", C_PATHS)
def test_models_under_each_forced_isa_match_the_reference(forced_isa, isa: str) -> None:
    forced_isa(isa)
    assert native.selected_isa() == isa
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(300, 128), nn.ReLU(), nn.Linear(128, 40)).eval()
    x = torch.randn(70, 300)
    for qmodel in (lowbit.quantize_dynamic(model), lowbit.quantize_static(model, [x[:16]])):
        assert select_kernel("int8_linear", 70, k=300, n=128) == f"s8_{isa}"  # every path
        got = qmodel(x)
        for layer in (qmodel[0], qmodel[2]):
            layer.backend = "reference"
            layer._refresh_cache()
        assert torch.equal(got, qmodel(x))
    q4 = lowbit.quantize_weight_only(model, bits=4, group_size=32)
    assert select_kernel("int4_weight_only", 1, n=128, k=320, group_size=32) == f"u4_{isa}"
    layer = q4[0]
    many = ({"M>0": f"u4q8_{isa}"} if "amx" not in cpu_features() else  # int8 activations
            {"M<=1024": f"u4q8_{isa}", "M>1024": "dequant_bf16"})  # (AMX: bf16 GEMM at many)
    assert layer.kernel_info() == many
    codes = layer.codes()  # (128, 320) signed codes, zero-points (128, 10)
    for rows in (x[:3], x):
        ref = u4q8_reference(rows, codes, layer.weight_scale, layer.weight_zero_point + 8, 32, 8)
        want = torch.relu(ref + layer.bias.double()).float()  # the ReLU is fused
        torch.testing.assert_close(layer(rows), want, rtol=1e-5, atol=1e-5)
    layer.int8_activations = False  # float32 activations: dequantize + GEMM up to rounding
    ref = torch.relu(x[:3] @ layer.dequantize_weight().t() + layer.bias)
    torch.testing.assert_close(layer(x[:3]), ref, rtol=1e-5, atol=1e-5)


def test_lowbit_isa_refuses_unknown_and_unavailable_paths(forced_isa) -> None:
    forced_isa("sse9")
    with pytest.raises(ValueError, match="unknown"):
        native.selected_isa()
    missing = [isa for isa, why in native.isa_paths().items() if why != "available"]
    for isa in missing:  # e.g. avx512_vnni on an AVX2-only CPU
        forced_isa(isa)
        with pytest.raises(ValueError, match="cannot run here"):
            native.selected_isa()
    forced_isa("torch")
    assert native.selected_isa() == "torch"
    assert select_kernel("int8_linear", 8) in ("int_mm_s8s8", "fp32_codes")
    assert native.native_status()["isa"] == "torch"


@needs_c
def test_seven_bit_activations_run_exact_and_stay_accurate() -> None:
    """An activation spec of 7 bits takes the cheaper unsigned form of the C GEMM: the same bits
    as the reference, and per-token 7-bit stays close to FP32."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(256, 96)).eval()
    act = lowbit.QuantSpec(bits=7, signed=True, symmetric=True, granularity="per_token")
    cfg = lowbit.QuantizationConfig(weights=lowbit.QuantSpec.int8_weight(), activations=act,
                                    mode="dynamic")
    q = lowbit.PTQQuantizer(cfg).quantize(model)
    x = torch.randn(37, 256)
    got = q(x)
    q[0].backend = "reference"
    q[0]._refresh_cache()
    assert torch.equal(got, q(x))
    ref = model(x)
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.999


@needs_c
@settings(max_examples=60, deadline=None)
@given(m=st.integers(0, 9), k=st.integers(1, 70), n=st.integers(1, 40), pad=st.integers(0, 5),
       short_x=st.integers(0, 3), short_y=st.integers(0, 3), wrong_pack=st.booleans(),
       kind=st.sampled_from([0, 1, 2]), split=st.sampled_from([-1, 0, 1]))
def test_fuzz_s8_entry_point_checks_every_extent(m: int, k: int, n: int, pad: int, short_x: int,
                                                 short_y: int, wrong_pack: bool, kind: int,
                                                 split: int) -> None:
    """Raw calls with buffers of exactly the claimed sizes: the C entry point either computes the
    exact result or refuses (LB_EARG) when any extent is short, never reading past it."""
    lib = native.load_gemm(C_PATHS[0])
    g = torch.Generator().manual_seed(m * 7919 + k * 31 + n)
    ldx = k + pad
    dtype = {0: torch.float32, 1: torch.bfloat16, 2: torch.int8}[kind]
    need_x = max(0, (m - 1) * ldx + k) if m else 0
    flat = (torch.randn(max(need_x - short_x, 0), generator=g) * 4).to(dtype) if kind != 2 else \
        torch.randint(-128, 128, (max(need_x - short_x, 0),), dtype=torch.int8, generator=g)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=g)
    packed = s8_packed(w, lib)
    assert packed is not None
    if wrong_pack:
        packed = packed[:-1]
    y_kind = 2 if kind == 2 else 0
    y = torch.empty(max(m * n - short_y, 0), dtype=torch.int32 if y_kind == 2 else torch.float32)
    scale = torch.empty(max(m, 1))
    sw = torch.ones(n)
    before = lib.lbk_s8_split_mode(split)
    try:
        rc = lib.lbk_s8_linear(flat.data_ptr(), kind, m, k, ldx,
                               flat.numel() * flat.element_size(), scale.data_ptr(), 1, 1, None,
                               -128, 127, packed.data_ptr(), packed.numel(), n, None,
                               sw.data_ptr(), None, 0, 1, y.data_ptr(), y_kind,
                               y.numel() * y.element_size(), 1, None)
    finally:
        lib.lbk_s8_split_mode(before)
    bad = wrong_pack or (m > 0 and (short_x > 0 or short_y > 0))
    assert rc == (-1 if bad else 0)
    if rc == 0 and m and kind == 2:
        q = flat.as_strided((m, k), (ldx, 1))
        assert torch.equal(y.reshape(m, n), (q.long() @ w.long().t()).int())


@needs_c
@settings(max_examples=40, deadline=None)
@given(m=st.integers(0, 6), groups=st.integers(1, 3), n=st.integers(1, 9),
       k_short=st.integers(0, 40), short_x=st.integers(0, 2), short_y=st.integers(0, 2),
       wrong_w=st.booleans())
@pytest.mark.parametrize("entry", ["lbk_u4_linear", "lbk_u4p_linear"])
def test_fuzz_u4_entry_point_checks_every_extent(entry: str, m: int, groups: int, n: int,
                                                 k_short: int, short_x: int, short_y: int,
                                                 wrong_w: bool) -> None:
    """Both INT4 entry points (float / int8 activations) with buffers of exactly the claimed
    sizes: equal to their references up to rounding, or refused; never a read past an
    extent."""
    lib = native.load_gemm(C_PATHS[0])
    g, kp = 32, 32 * groups
    k = max(1, kp - k_short)
    gen = torch.Generator().manual_seed(m * 131 + kp + n)
    codes = torch.randint(-8, 8, (n, kp), dtype=torch.int8, generator=gen)
    s, z = torch.rand(n, groups, generator=gen), torch.randint(-8, 8, (n, groups), generator=gen)
    pack = u4p_pack if entry == "lbk_u4p_linear" else u4_pack
    wq, sc, zp = pack(codes, True, s, z.int(), g)
    wq = wq.reshape(-1)[:-1] if wrong_w else wq
    x = torch.randn(max(m * k - short_x, 0), generator=gen)
    y = torch.empty(max(m * n - short_y, 0))
    rc = getattr(lib, entry)(x.data_ptr(), m, k, k, x.numel(), wq.data_ptr(), wq.numel(), n,
                             kp, g, sc.data_ptr(), zp.data_ptr(), None, 0, y.data_ptr(),
                             y.numel(), 1)
    bad = wrong_w or (m > 0 and (short_x > 0 or short_y > 0))
    assert rc == (-1 if bad else 0)
    if rc == 0 and m:
        if entry == "lbk_u4p_linear":
            ref = u4q8_reference(x.reshape(m, k), codes, s, z + 8, g, 8)
        else:
            w = (codes.float() - z.float().repeat_interleave(g, 1)) * s.repeat_interleave(g, 1)
            ref = x.reshape(m, k).double() @ w[:, :k].double().t()
        torch.testing.assert_close(y.reshape(m, n), ref.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("layout", ["expanded", "strided", "sliced_rows"])
def test_weight_only_batch_one_reads_strided_inputs_as_they_are(bits: int, layout: str) -> None:
    """A batch-1 input that is expanded (stride 0) or strided reaches the C paths as the values
    it holds (they read rows contiguously): the same output as its contiguous copy."""
    torch.manual_seed(5)
    k = 64
    model = nn.Sequential(nn.Linear(k, 16)).eval()
    q = lowbit.quantize_weight_only(model, bits=bits, group_size=32)
    base = torch.randn(4, 2 * k)
    x = {"expanded": base[:1, :1].expand(1, k), "strided": base[:1, ::2],
         "sliced_rows": base[1:2, k:]}[layout]
    assert torch.equal(q(x), q(x.contiguous()))


@needs_c
@settings(max_examples=60, deadline=None)
@given(kind=st.sampled_from([0, 1, 2, 3]), hid=st.integers(1, 12), batch=st.integers(1, 3),
       steps=st.integers(0, 4), extra_rows=st.integers(0, 2), bad_span=st.booleans(),
       short=st.sampled_from(["", "gx", "state", "out"]))
def test_fuzz_rnn_scan_checks_every_span_and_extent(kind: int, hid: int, batch: int, steps: int,
                                                    extra_rows: int, bad_span: bool,
                                                    short: str) -> None:
    """Raw lbk_rnn_scan calls with buffers of exactly the claimed sizes: it runs the recurrence
    or refuses (LB_EARG, nothing written) when a span leaves gx / out or the batch, or a buffer
    is one float short; never reading past them."""
    lib = native.load_gemm(C_PATHS[0])
    g = torch.Generator().manual_seed(kind * 1000 + hid * 37 + batch * 5 + steps)
    gates = {0: 4, 1: 3}.get(kind, 1)  # LSTM, GRU, Elman RNN (tanh, relu)
    spans = [(t * batch, batch) for t in range(steps)]
    rows = steps * batch + extra_rows
    if bad_span and spans:
        spans[-1] = (rows - batch + 1, batch)  # one row past the end of gx / out
    cut = {name: int(short == name) for name in ("gx", "state", "out")}
    gx = torch.randn(max(rows * gates * hid - cut["gx"], 0), generator=g)
    h = torch.randn(max(batch * hid - cut["state"], 0), generator=g)
    c = torch.randn(max(batch * hid - cut["state"], 0), generator=g)
    out = torch.full((max(rows * hid - cut["out"], 0),), 7.0)
    w = torch.randint(-127, 128, (gates * hid, hid), dtype=torch.int8, generator=g)
    packed = s8_packed(w, lib)
    span_t = torch.tensor(spans, dtype=torch.int64).reshape(-1, 2)
    w_scale = torch.full((gates * hid,), 0.01)  # (held: a temporary's memory is freed at once)
    rc = lib.lbk_rnn_scan(kind, gx.data_ptr(), gx.numel(), rows, hid, span_t.data_ptr(),
                          span_t.shape[0], h.data_ptr(), c.data_ptr(), h.numel(), batch,
                          packed.data_ptr(), packed.numel(), w_scale.data_ptr(), None, 0, -128,
                          127, out.data_ptr(), out.numel(), 1)
    # a cut shortens a buffer only where the shapes need one (no rows: gx and out are empty)
    bad = short == "state" or (short and rows > 0) or (bad_span and steps > 0)
    assert rc == (-1 if bad else 0)
    if bad:
        assert bool((out == 7.0).all())  # nothing written
    elif steps:
        y = out[:steps * batch * hid].reshape(steps, batch, hid)
        assert bool(torch.isfinite(y).all())
        assert kind in (1, 3) or bool((y.abs() <= 1).all())  # h = o * tanh(c), tanh(.)
        assert kind != 3 or bool((y >= 0).all())  # relu
        assert torch.equal(h.reshape(batch, hid), y[-1])


@pytest.mark.parametrize("isa", [*C_PATHS, "torch"])
def test_int8_convs_whose_patches_overlap_match_the_reference(forced_isa, isa: str) -> None:
    """A conv's im2col view can hold rows less than K apart (a (1, k) kernel: each patch
    starts one pixel after the last); ``torch._int_mm`` misread them, so an INT8 conv whose
    codes took that path was off by up to 3.4e4 (avx512_vnni) for a transposed Conv1d input,
    a channels-last Conv2d input or affine weights."""
    forced_isa(isa)
    torch.manual_seed(0)
    affine = lowbit.QuantizationConfig.int8_dynamic(per_token=False, symmetric=False)
    affine = dataclasses.replace(affine, weights=lowbit.QuantSpec(symmetric=False))
    cases = [  # (rows enough for each path's _int_mm: avx512_vnni > 819, amx K < 61 > 26214)
        (nn.Conv1d(64, 64, 5, padding=2), torch.randn(1, 1000, 64).transpose(1, 2)),
        (nn.Conv1d(8, 16, 5, padding=2), torch.randn(1, 8, 30000)),
        (nn.Conv2d(8, 16, (1, 9)), torch.randn(2, 8, 30, 30).contiguous(
            memory_format=torch.channels_last))]
    for conv, x in cases:
        for cfg in (lowbit.QuantizationConfig.int8_dynamic(per_token=False), affine):
            q = lowbit.quantize_dynamic(nn.Sequential(conv), config=cfg)
            got = q(x)
            q[0].backend = "reference"
            assert torch.equal(got, q(x)), (conv, cfg.weights.symmetric)
