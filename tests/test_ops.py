"""Golden numerics for ``lowbit.ops``.

* ``fake_quantize`` equals ``torch.fake_quantize_per_tensor_affine`` /
  ``torch.fake_quantize_per_channel_affine`` bit for bit (``torch.equal``), forward and input
  gradient, for bits 2..8, signed/unsigned, symmetric/affine, narrow range, float32/float16/
  bfloat16 inputs, zero ranges, constant tensors and exact .5 ties; per_group and per_token are
  checked against the per-channel op on a reshaped tensor.
* ``quantize``/``dequantize`` round trips, ``pack_int4``/``unpack_int4``, ``choose_qparams``
  conventions and input validation.
* ONNX Runtime's ``QuantizeLinear`` (opset 21, per-tensor, per-axis and blocked) equals
  ``quantize`` bit for bit for power-of-two scales; for arbitrary scales it differs by at most
  one code on fewer than 1e-4 of the elements (ORT divides by the scale, lowbit and torch
  multiply by the float32 ``1/scale``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from lowbit import ops
from lowbit.config import QuantSpec

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KINDS = ("normal", "uniform", "outliers", "constant", "zeros", "tiny")


# ------------------------------------------------------------------------------- strategies
@st.composite
def specs(draw: st.DrawFn, granularity: str = "per_tensor") -> QuantSpec:
    return QuantSpec(bits=draw(st.integers(2, 8)), signed=draw(st.booleans()),
                     symmetric=draw(st.booleans()), narrow_range=draw(st.booleans()),
                     granularity=granularity)


shapes = st.lists(st.integers(1, 7), min_size=1, max_size=4).map(tuple)


def make_tensor(shape: tuple[int, ...], seed: int, kind: str, log_mag: float,
                dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Deterministic test data of a given kind (constant/zero tensors give zero ranges)."""
    g = torch.Generator().manual_seed(seed)
    mag = 10.0**log_mag
    if kind == "normal":
        x = torch.randn(shape, generator=g) * mag
    elif kind == "uniform":
        x = torch.rand(shape, generator=g) * mag + mag / 3  # all positive: 0 outside the range
    elif kind == "outliers":
        x = torch.randn(shape, generator=g) * mag
        x.view(-1)[0] = 40 * mag
    elif kind == "constant":
        x = torch.full(shape, (seed % 7 - 3) * mag)
    elif kind == "zeros":
        x = torch.zeros(shape)
    else:  # tiny values next to float32 eps
        x = torch.randn(shape, generator=g) * 1e-7
    return x.to(dtype)


def qparams(x: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    return ops.choose_qparams(*ops.compute_range(x, spec), spec)


def both(fn_ours, fn_ref, x: torch.Tensor, seed: int):
    """Forward outputs and input gradients (for the same random upstream gradient) of both."""
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1)).to(x.dtype)
    out = []
    for fn in (fn_ours, fn_ref):
        xi = x.detach().clone().requires_grad_(True)
        y = fn(xi)
        y.backward(grad)
        out.append((y.detach(), xi.grad))
    return out


def assert_bitwise(ours, ref) -> None:
    (y1, g1), (y2, g2) = ours, ref
    assert y1.dtype == y2.dtype and y1.shape == y2.shape
    assert torch.equal(y1, y2), f"forward differs at {(y1 != y2).nonzero()[:5].tolist()}"
    assert torch.equal(g1, g2), f"gradient differs at {(g1 != g2).nonzero()[:5].tolist()}"


# ------------------------------------------------------------------ fake_quantize vs torch
@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**16), kind=st.sampled_from(KINDS),
       log_mag=st.floats(-3, 3), dtype=st.sampled_from(DTYPES))
def test_fake_quantize_per_tensor_matches_torch(spec, shape, seed, kind, log_mag, dtype):
    x = make_tensor(shape, seed, kind, log_mag, dtype)
    s, z = qparams(x, spec)
    assert_bitwise(*both(
        lambda t: ops.fake_quantize(t, s, z, spec),
        lambda t: torch.fake_quantize_per_tensor_affine(t, s, z, spec.qmin, spec.qmax), x, seed))


@given(spec=specs(), shape=shapes, seed=st.integers(0, 2**16), log_scale=st.floats(-8, 2),
       zp_frac=st.floats(0, 1), dtype=st.sampled_from(DTYPES))
def test_fake_quantize_arbitrary_qparams_clip_and_gradient_mask(spec, shape, seed, log_scale,
                                                                zp_frac, dtype):
    """Scales much smaller than the data clip many values: the gradient mask must match."""
    x = make_tensor(shape, seed, "normal", 0.0, dtype)
    s = torch.tensor(2.0**log_scale * 1.37, dtype=torch.float32)
    z = torch.tensor(round(spec.qmin + zp_frac * (spec.qmax - spec.qmin)), dtype=torch.int32)
    assert_bitwise(*both(
        lambda t: ops.fake_quantize(t, s, z, spec),
        lambda t: torch.fake_quantize_per_tensor_affine(t, s, z, spec.qmin, spec.qmax), x, seed))


@given(bits=st.integers(2, 8), signed=st.booleans(), exponent=st.integers(-12, 4),
       zp_frac=st.floats(0, 1), seed=st.integers(0, 2**16))
def test_exact_half_ties_round_to_even_like_torch(bits, signed, exponent, zp_frac, seed):
    """``x = (k + 0.5) * scale`` with a power-of-two scale is an exact tie: both round half to
    even (``torch.round``/``np.rint``), including ties just outside ``[qmin, qmax]``."""
    spec = QuantSpec(bits=bits, signed=signed, symmetric=False)
    scale = torch.tensor(2.0**exponent)
    zp = round(spec.qmin + zp_frac * (spec.qmax - spec.qmin))
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(spec.qmin - zp - 3, spec.qmax - zp + 3, (257,), generator=g).float()
    x = (k + 0.5) * scale  # exact in float32
    z = torch.tensor(zp, dtype=torch.int32)
    expected = np.clip(np.rint(k.numpy() + 0.5) + zp, spec.qmin, spec.qmax)
    assert np.array_equal(ops.quantize(x, scale, z, spec).numpy().astype(np.float64), expected)
    assert_bitwise(*both(
        lambda t: ops.fake_quantize(t, scale, z, spec),
        lambda t: torch.fake_quantize_per_tensor_affine(t, scale, z, spec.qmin, spec.qmax),
        x, seed))


@given(spec=specs("per_channel"), shape=shapes, axis_pick=st.integers(0, 8),
       seed=st.integers(0, 2**16), kind=st.sampled_from(KINDS), log_mag=st.floats(-3, 3),
       dtype=st.sampled_from(DTYPES), negative_axis=st.booleans())
def test_fake_quantize_per_channel_matches_torch(spec, shape, axis_pick, seed, kind, log_mag,
                                                 dtype, negative_axis):
    axis = axis_pick % len(shape)
    spec = spec.with_(axis=axis - len(shape) if negative_axis else axis)
    x = make_tensor(shape, seed, kind, log_mag, dtype)
    if kind == "normal":  # give some channels a zero range
        x.select(axis, 0).zero_()
    s, z = qparams(x, spec)
    assert s.shape == (shape[axis],) and z.dtype == torch.int32
    assert_bitwise(*both(
        lambda t: ops.fake_quantize(t, s, z, spec),
        lambda t: torch.fake_quantize_per_channel_affine(t, s, z, axis, spec.qmin, spec.qmax),
        x, seed))


@given(spec=specs("per_channel"), shape=shapes, axis_pick=st.integers(0, 8),
       seed=st.integers(0, 2**16), log_scale=st.floats(-8, 2), dtype=st.sampled_from(DTYPES))
def test_fake_quantize_per_channel_arbitrary_qparams_clip_and_gradient_mask(
        spec, shape, axis_pick, seed, log_scale, dtype):
    """Per-channel scales and zero-points drawn independently of the data (many values clip,
    zero-points anywhere in [qmin, qmax]): forward and gradient mask equal torch's."""
    axis = axis_pick % len(shape)
    spec = spec.with_(axis=axis)
    g = torch.Generator().manual_seed(seed)
    x = make_tensor(shape, seed, "normal", 0.0, dtype)
    s = 2.0 ** (log_scale + torch.rand(shape[axis], generator=g) * 4 - 2)
    z = torch.randint(spec.qmin, spec.qmax + 1, (shape[axis],), generator=g, dtype=torch.int32)
    assert_bitwise(*both(
        lambda t: ops.fake_quantize(t, s, z, spec),
        lambda t: torch.fake_quantize_per_channel_affine(t, s, z, axis, spec.qmin, spec.qmax),
        x, seed))


@given(spec=specs(), lead=st.lists(st.integers(1, 5), min_size=0, max_size=2).map(tuple),
       groups=st.integers(1, 4), group_size=st.sampled_from([1, 2, 4, 8, 32]),
       seed=st.integers(0, 2**16), kind=st.sampled_from(KINDS), log_mag=st.floats(-3, 3),
       dtype=st.sampled_from(DTYPES))
def test_fake_quantize_per_group_matches_per_channel_on_reshape(spec, lead, groups, group_size,
                                                                 seed, kind, log_mag, dtype):
    """per_group == per-channel op on ``x.reshape(-1, group_size)`` (one row per group)."""
    spec = spec.with_(granularity="per_group", group_size=group_size)
    shape = (*lead, groups * group_size)
    x = make_tensor(shape, seed, kind, log_mag, dtype)
    s, z = qparams(x, spec)
    assert s.shape == (*lead, groups)

    def reference(t: torch.Tensor) -> torch.Tensor:
        rows = t.reshape(-1, group_size)
        out = torch.fake_quantize_per_channel_affine(rows, s.reshape(-1), z.reshape(-1), 0,
                                                     spec.qmin, spec.qmax)
        return out.reshape(t.shape)

    assert_bitwise(*both(lambda t: ops.fake_quantize(t, s, z, spec), reference, x, seed))


@given(spec=specs(), shape=st.lists(st.integers(1, 6), min_size=1, max_size=3).map(tuple),
       seed=st.integers(0, 2**16), kind=st.sampled_from(KINDS), dtype=st.sampled_from(DTYPES))
def test_fake_quantize_per_token_matches_per_channel_on_rows(spec, shape, seed, kind, dtype):
    spec = spec.with_(granularity="per_token")
    x = make_tensor(shape, seed, kind, 0.0, dtype)
    s, z = qparams(x, spec)
    assert s.shape == (*shape[:-1], 1)

    def reference(t: torch.Tensor) -> torch.Tensor:
        rows = t.reshape(-1, shape[-1])
        out = torch.fake_quantize_per_channel_affine(rows, s.reshape(-1), z.reshape(-1), 0,
                                                     spec.qmin, spec.qmax)
        return out.reshape(t.shape)

    assert_bitwise(*both(lambda t: ops.fake_quantize(t, s, z, spec), reference, x, seed))


@pytest.mark.parametrize("dtype", DTYPES)
def test_fake_quantize_large_tensor_arbitrary_scales_matches_torch(dtype, rng):
    """A million values per scale: rare float32 rounding differences (e.g. dividing by the scale
    instead of multiplying by ``1/scale``: about one element in a million) cannot hide."""
    x = (torch.randn(1024, 1024, generator=rng) * 5).to(dtype)
    spec = QuantSpec(symmetric=False)
    for scale in (0.0317, 0.07777, 0.0123, 0.3):
        s, z = torch.tensor(scale), torch.tensor(-3, dtype=torch.int32)
        assert torch.equal(ops.fake_quantize(x, s, z, spec),
                           torch.fake_quantize_per_tensor_affine(x, s, z, spec.qmin, spec.qmax))
    pc = QuantSpec(granularity="per_channel", axis=0)
    s = torch.rand(1024, generator=rng) * 0.1 + 0.01
    z = torch.randint(-20, 20, (1024,), generator=rng, dtype=torch.int32)
    assert torch.equal(ops.fake_quantize(x, s, z, pc),
                       torch.fake_quantize_per_channel_affine(x, s, z, 0, -128, 127))


def test_fake_quantize_without_gradient_clipping_is_pure_ste():
    x = torch.tensor([-5.0, 0.1, 5.0], requires_grad=True)
    y = ops.fake_quantize(x, torch.tensor(0.1), torch.tensor(0), QuantSpec(bits=4),
                          clip_gradient=False)
    y.sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 1.0]


# -------------------------------------------------------------- quantize / dequantize / pack
GRANULARITY_SPECS = [
    QuantSpec(),
    QuantSpec(signed=False, symmetric=False),
    QuantSpec(bits=4, granularity="per_channel", axis=1),
    QuantSpec(bits=3, symmetric=False, granularity="per_group", group_size=4),
    QuantSpec(bits=8, granularity="per_token"),
]


@pytest.mark.parametrize("spec", GRANULARITY_SPECS, ids=lambda s: f"{s.granularity}-{s.bits}b")
@given(seed=st.integers(0, 2**16), kind=st.sampled_from(KINDS), log_mag=st.floats(-3, 3))
def test_dequantize_of_quantize_is_fake_quantize(spec, seed, kind, log_mag):
    x = make_tensor((3, 5, 8), seed, kind, log_mag)
    s, z = qparams(x, spec)
    q = ops.quantize(x, s, z, spec)
    assert q.dtype == spec.storage_dtype and q.shape == x.shape
    assert int(q.min()) >= spec.qmin and int(q.max()) <= spec.qmax
    assert torch.equal(ops.dequantize(q, s, z, spec), ops.fake_quantize(x, s, z, spec))


@pytest.mark.parametrize("spec", GRANULARITY_SPECS, ids=lambda s: f"{s.granularity}-{s.bits}b")
@given(seed=st.integers(0, 2**16), log_scale=st.floats(-20, 10))
def test_quantize_of_dequantize_returns_every_code(spec, seed, log_scale):
    g = torch.Generator().manual_seed(seed)
    shape = (3, 5, 8)
    q = torch.randint(spec.qmin, spec.qmax + 1, shape, generator=g).to(spec.storage_dtype)
    stats = ops.compute_range(q.float(), spec)[0].shape
    s = (torch.rand(stats, generator=g) + 0.5) * 2.0**log_scale
    z = torch.randint(spec.qmin, spec.qmax + 1, stats, generator=g).to(torch.int32)
    assert torch.equal(ops.quantize(ops.dequantize(q, s, z, spec), s, z, spec), q)


def test_dequantize_keeps_requested_dtype():
    q = torch.tensor([1, -2], dtype=torch.int8)
    out = ops.dequantize(q, torch.tensor(0.5), torch.tensor(0), QuantSpec(), dtype=torch.bfloat16)
    assert out.dtype == torch.bfloat16 and out.tolist() == [0.5, -1.0]


@given(signed=st.booleans(), lead=st.lists(st.integers(1, 4), max_size=2).map(tuple),
       half_k=st.integers(1, 33), seed=st.integers(0, 2**16))
def test_pack_int4_round_trip_half_a_byte_per_value(signed, lead, half_k, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi, dtype = (-8, 7, torch.int8) if signed else (0, 15, torch.uint8)
    q = torch.randint(lo, hi + 1, (*lead, 2 * half_k), generator=g).to(dtype)
    packed = ops.pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (*lead, half_k)
    assert packed.numel() * packed.element_size() * 2 == q.numel()  # 4 bits per value
    assert torch.equal(ops.unpack_int4(packed, signed=signed), q)


def test_pack_int4_layout_low_nibble_first():
    packed = ops.pack_int4(torch.tensor([[1, 2, -1, -8]], dtype=torch.int8))
    assert packed.tolist() == [[0x21, 0x8F]]


@pytest.mark.parametrize("q, match", [
    (torch.tensor([1, 2, 3], dtype=torch.int8), "even"),
    (torch.tensor([1, 8], dtype=torch.int8), r"\[-8, 7\]"),
    (torch.tensor([-9, 0], dtype=torch.int8), r"\[-8, 7\]"),
    (torch.tensor([16, 0], dtype=torch.uint8), r"\[0, 15\]"),
    (torch.tensor([1, 2], dtype=torch.int32), "int8 or uint8"),
])
def test_pack_int4_rejects_bad_input(q, match):
    with pytest.raises(ValueError, match=match):
        ops.pack_int4(q)


def test_unpack_int4_rejects_non_uint8():
    with pytest.raises(ValueError, match="uint8"):
        ops.unpack_int4(torch.tensor([1], dtype=torch.int8))


# -------------------------------------------------------------------- choose_qparams rules
ranges = st.tuples(st.floats(-1e4, 1e4, width=32), st.floats(-1e4, 1e4, width=32)).map(sorted)


@given(spec=specs(), lohi=ranges)
def test_zero_is_exactly_representable(spec, lohi):
    s, z = ops.choose_qparams(torch.tensor(lohi[0]), torch.tensor(lohi[1]), spec)
    zero = torch.zeros(3)
    assert torch.equal(ops.fake_quantize(zero, s, z, spec), zero)
    assert spec.qmin <= int(z) <= spec.qmax


@given(bits=st.integers(2, 8), narrow=st.booleans(), lohi=ranges)
def test_symmetric_signed_scale_is_absmax_over_qmax(bits, narrow, lohi):
    spec = QuantSpec(bits=bits, symmetric=True, narrow_range=narrow)
    s, z = ops.choose_qparams(torch.tensor(lohi[0]), torch.tensor(lohi[1]), spec)
    amax = torch.tensor(max(abs(lohi[0]), abs(lohi[1])), dtype=torch.float32)
    expected = torch.clamp(amax / spec.qmax, min=torch.finfo(torch.float32).eps)
    assert torch.equal(s, expected) and int(z) == 0


@given(bits=st.integers(2, 8), lohi=ranges)
def test_symmetric_unsigned_zero_point_is_mid_code(bits, lohi):
    spec = QuantSpec(bits=bits, signed=False, symmetric=True)
    _, z = ops.choose_qparams(torch.tensor(lohi[0]), torch.tensor(lohi[1]), spec)
    assert int(z) == (spec.qmin + spec.qmax + 1) // 2


@given(spec=specs().map(lambda s: s.with_(symmetric=False)), lohi=ranges)
def test_affine_scale_and_zero_point(spec, lohi):
    lo, hi = min(lohi[0], 0.0), max(lohi[1], 0.0)  # the range is widened to include 0
    s, z = ops.choose_qparams(torch.tensor(lohi[0]), torch.tensor(lohi[1]), spec)
    expected = torch.clamp((torch.tensor(hi) - torch.tensor(lo)) / float(spec.qmax - spec.qmin),
                           min=torch.finfo(torch.float32).eps)
    assert torch.equal(s, expected)
    assert int(z) == int(torch.clamp(spec.qmin - torch.round(torch.tensor(lo) / s), spec.qmin,
                                     spec.qmax))
    if hi - lo > 1e-3:  # the range ends land on (or next to) the end codes
        q = ops.quantize(torch.tensor([lo, hi]), s, z, spec).int().tolist()
        assert abs(q[0] - spec.qmin) <= 1 and abs(q[1] - spec.qmax) <= 1


@given(spec=specs(), value=st.floats(-1e3, 1e3, width=32))
def test_zero_range_gives_finite_scale(spec, value):
    x = torch.full((4,), value)
    s, z = qparams(x, spec)
    assert torch.isfinite(s) and float(s) > 0
    y = ops.fake_quantize(x, s, z, spec)
    assert torch.isfinite(y).all()
    if value == 0:
        assert torch.equal(y, x)
    else:  # a constant is one end of [min(c, 0), max(c, 0)]: representable within a step
        assert float((y - x).abs().max()) <= float(s) * 1.01 + 1e-6 * abs(value)


def test_choose_qparams_rejects_reversed_or_non_finite_range():
    with pytest.raises(ValueError, match="min_val > max_val"):
        ops.choose_qparams(torch.tensor(1.0), torch.tensor(0.0), QuantSpec())
    with pytest.raises(ValueError, match="NaN/Inf"):
        ops.choose_qparams(torch.tensor(0.0), torch.tensor(float("inf")), QuantSpec())


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input_is_refused_by_name(bad):
    x = torch.randn(4, 8)
    x[1, 2] = bad
    with pytest.raises(ValueError, match=r"encoder\.fc1\.weight has 1 NaN/Inf"):
        ops.quantize_tensor(x, QuantSpec(), name="encoder.fc1.weight")
    with pytest.raises(ValueError, match=r"encoder\.fc1\.weight"):
        ops.check_finite(x, "encoder.fc1.weight")


@pytest.mark.parametrize("bits", [0, 1, 9, 16, 8.0, True])
def test_bits_out_of_range_is_refused(bits):
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bits)


def test_group_size_must_divide_last_dim():
    with pytest.raises(ValueError, match="group_size=32"):
        ops.quantize_tensor(torch.randn(4, 48), QuantSpec.int4_weight(group_size=32), name="w")


def test_empty_tensor_is_refused_by_name():
    with pytest.raises(ValueError, match=r"fc2\.bias is empty"):
        ops.compute_range(torch.empty(0), QuantSpec(), name="fc2.bias")


# ------------------------------------------------------------------ fast paths, same results
@pytest.mark.parametrize("spec", [
    QuantSpec(), QuantSpec(granularity="per_channel", axis=0),
    QuantSpec(granularity="per_channel", axis=1), QuantSpec(granularity="per_channel", axis=-1),
    QuantSpec(granularity="per_token"), QuantSpec.int4_weight(group_size=4)],
    ids=lambda s: f"{s.granularity}-{s.axis}")
@pytest.mark.parametrize("poison", [None, float("nan"), float("inf")])
def test_compute_range_equals_aminmax_reference(spec, poison):
    """compute_range uses amin/amax (about 20x faster than aminmax(dim=...) on CPU); min and max
    are exact, so the result is that of torch.aminmax, NaN and Inf propagation included."""
    x = torch.randn(3, 8, 4) * 5
    if poison is not None:
        x[1, 2, 3] = poison
    lo, hi = ops.compute_range(x, spec)
    if spec.granularity == "per_tensor":
        ref = torch.aminmax(x)
    elif spec.granularity == "per_channel":
        axis = spec.axis % x.dim()
        ref = torch.aminmax(x.movedim(axis, 0).reshape(x.shape[axis], -1), dim=1)
    elif spec.granularity == "per_token":
        ref = torch.aminmax(x, dim=-1, keepdim=True)
    else:
        ref = torch.aminmax(x.reshape(3, 8, -1, spec.group_size), dim=-1)
    torch.testing.assert_close(lo, ref[0], rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(hi, ref[1], rtol=0, atol=0, equal_nan=True)


@given(spec=specs(), lohi=ranges)
def test_qparams_from_range_is_choose_qparams_without_checks(spec, lohi):
    lo, hi = torch.tensor(lohi[0]), torch.tensor(lohi[1])
    s, z = ops.qparams_from_range(lo, hi, spec)
    s2, z2 = ops.choose_qparams(lo, hi, spec)
    assert torch.equal(s, s2) and torch.equal(z, z2)
    assert not torch.isfinite(ops.qparams_from_range(lo, torch.tensor(float("nan")), spec)[0])


# ------------------------------------------------------------------ ONNX Runtime QuantizeLinear
def _ort_quantize_linear(x: np.ndarray, scale: np.ndarray, zero_point: np.ndarray, *,
                         axis: int | None = None, block_size: int | None = None) -> np.ndarray:
    """Run a one-node QuantizeLinear model (opset 21, IR version 10) on the CPU provider."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    helper, tp = onnx.helper, onnx.TensorProto
    qtype = tp.INT8 if zero_point.dtype == np.int8 else tp.UINT8
    attrs = {k: v for k, v in (("axis", axis), ("block_size", block_size)) if v is not None}
    node = helper.make_node("QuantizeLinear", ["x", "scale", "zp"], ["y"], **attrs)
    graph = helper.make_graph(
        [node], "quantize_linear",
        [helper.make_tensor_value_info("x", tp.FLOAT, list(x.shape)),
         helper.make_tensor_value_info("scale", tp.FLOAT, list(scale.shape)),
         helper.make_tensor_value_info("zp", qtype, list(zero_point.shape))],
        [helper.make_tensor_value_info("y", qtype, list(x.shape))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10  # onnx 1.23 writes 14; onnxruntime accepts at most 13
    options = ort.SessionOptions()
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(model.SerializeToString(), options,
                                   providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x, "scale": scale, "zp": zero_point})[0]


def _ort(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, spec: QuantSpec, **kw) -> torch.Tensor:
    zdtype = np.int8 if spec.signed else np.uint8
    y = _ort_quantize_linear(x.numpy(), s.numpy().astype(np.float32),
                             z.numpy().astype(zdtype), **kw)
    return torch.from_numpy(y)


def _pow2(s: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.round(torch.log2(s)))


@given(signed=st.booleans(), shape=shapes, seed=st.integers(0, 2**16),
       kind=st.sampled_from(KINDS), log_mag=st.floats(-3, 3), ties=st.booleans())
def test_ort_quantize_linear_per_tensor_power_of_two_is_bit_exact(signed, shape, seed, kind,
                                                                   log_mag, ties):
    spec = QuantSpec(signed=signed, symmetric=False)
    x = make_tensor(shape, seed, kind, log_mag)
    s, z = qparams(x, spec)
    s = _pow2(s)
    if ties:  # exact .5 ties: both round half to even
        x = (torch.round(x / s) + 0.5) * s
    assert torch.equal(_ort(x, s, z, spec), ops.quantize(x, s, z, spec))


@given(signed=st.booleans(), shape=shapes, axis_pick=st.integers(0, 8),
       seed=st.integers(0, 2**16), log_mag=st.floats(-3, 3))
def test_ort_quantize_linear_per_axis_power_of_two_is_bit_exact(signed, shape, axis_pick, seed,
                                                                 log_mag):
    axis = axis_pick % len(shape)
    spec = QuantSpec(signed=signed, symmetric=False, granularity="per_channel", axis=axis)
    x = make_tensor(shape, seed, "normal", log_mag)
    s, z = qparams(x, spec)
    s = _pow2(s)
    assert torch.equal(_ort(x, s, z, spec, axis=axis), ops.quantize(x, s, z, spec))


@given(signed=st.booleans(), lead=st.lists(st.integers(1, 4), min_size=1, max_size=2).map(tuple),
       groups=st.integers(1, 4), group_size=st.sampled_from([2, 8, 32]),
       seed=st.integers(0, 2**16))
def test_ort_quantize_linear_blocked_matches_per_group(signed, lead, groups, group_size, seed):
    spec = QuantSpec(signed=signed, symmetric=False, granularity="per_group",
                     group_size=group_size)
    x = make_tensor((*lead, groups * group_size), seed, "normal", 0.0)
    s, z = qparams(x, spec)
    s = _pow2(s)
    got = _ort(x, s, z, spec, axis=x.dim() - 1, block_size=group_size)
    assert torch.equal(got, ops.quantize(x, s, z, spec))


@pytest.mark.parametrize("signed", [True, False])
def test_ort_quantize_linear_arbitrary_scale_within_one_code(signed, rng):
    """ORT computes ``x / scale``, lowbit ``x * (1/scale)``: the two float32 results round to
    different codes only next to a .5 tie; bound: |diff| <= 1 code on < 1e-4 of the elements."""
    spec = QuantSpec(signed=signed, symmetric=False)
    x = torch.randn(1_000_000, generator=rng) * 7
    for scale in (0.0317, 0.1, 0.07777, 0.0123, 0.3):
        s = torch.tensor(scale)
        z = torch.tensor(3 if signed else 131, dtype=torch.int32)
        diff = (_ort(x, s, z, spec).int() - ops.quantize(x, s, z, spec).int()).abs()
        assert int(diff.max()) <= 1
        assert float((diff != 0).float().mean()) < 1e-4


def _ort_dynamic_quantize_linear(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    """Run a one-node DynamicQuantizeLinear model (opset 18) on the CPU provider."""
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    helper, tp = onnx.helper, onnx.TensorProto
    node = helper.make_node("DynamicQuantizeLinear", ["x"], ["y", "scale", "zp"])
    graph = helper.make_graph(
        [node], "dynamic_quantize_linear", [helper.make_tensor_value_info("x", tp.FLOAT, ["n"])],
        [helper.make_tensor_value_info("y", tp.UINT8, ["n"]),
         helper.make_tensor_value_info("scale", tp.FLOAT, []),
         helper.make_tensor_value_info("zp", tp.UINT8, [])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 10
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y, scale, zp = session.run(None, {"x": x})
    return y, float(scale), int(zp)


@pytest.mark.parametrize("kind", ["mixed", "positive", "negative", "offset"])
def test_ort_dynamic_quantize_linear_qparams_are_bit_exact(kind, rng):
    """uint8 affine per tensor (``int8_dynamic(per_token=False, symmetric=False)``) is ONNX's
    DynamicQuantizeLinear: the same scale and zero-point bit for bit; codes a step apart only
    next to a .5 tie (ORT divides by the scale)."""
    spec = QuantSpec(signed=False, symmetric=False)
    diffs = total = 0
    for log_mag in range(-4, 5):
        x = torch.randn(20_000, generator=rng) * 10.0 ** log_mag
        x = {"mixed": x, "positive": x.abs(), "negative": -x.abs(),
             "offset": x + 3 * 10.0 ** log_mag}[kind]
        y, scale, zp = _ort_dynamic_quantize_linear(x.numpy())
        s, z = ops.choose_qparams(x.min(), x.max(), spec)
        assert (float(s), int(z)) == (scale, zp)
        diff = (torch.from_numpy(y).int() - ops.quantize(x, s, z, spec).int()).abs()
        assert int(diff.max()) <= 1
        diffs, total = diffs + int((diff != 0).sum()), total + x.numel()
    assert diffs < 1e-4 * total


def test_quantize_bias_rounds_to_int32_and_refuses_mismatched_scales():
    q, s = ops.quantize_bias(torch.tensor([0.1, -0.33]), torch.tensor(0.02),
                             torch.tensor([1.0, 2.0]))
    assert q.dtype == torch.int32 and q.tolist() == [5, -8]
    assert s.tolist() == pytest.approx([0.02, 0.04])
    assert ops.quantize_bias(torch.tensor([1e30]), torch.tensor(1e-6), torch.ones(1)) is None
    with pytest.raises(ValueError, match="one weight scale per bias value"):
        ops.quantize_bias(torch.ones(3), torch.tensor(0.1), torch.ones(4))


@pytest.mark.parametrize("shape, axis", [((), 0), ((4,), 1), ((3, 4), -3)])
def test_compute_range_names_a_missing_channel_axis(shape, axis) -> None:
    """A 0-d tensor with a per-channel spec failed in a bare ZeroDivisionError (axis % 0)."""
    spec = QuantSpec(granularity="per_channel", axis=axis)
    with pytest.raises(ValueError, match=rf"fc1.weight has shape .*no axis {axis}"):
        ops.compute_range(torch.ones(shape), spec, "fc1.weight")
