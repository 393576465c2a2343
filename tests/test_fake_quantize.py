"""FakeQuantize: forward = quantize-then-dequantize, STE backward, LSQ, modes, state, statistics."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.config import QuantSpec
from lowbit.fake_quantize import FakeQuantize, fake_quantize_lsq
from lowbit.kernels import quantize_activation_u8
from lowbit.ops import choose_qparams, compute_range, dequantize, fake_quantize, quantize

torch.manual_seed(0)

SPECS = [
    QuantSpec(bits=8, symmetric=False),
    QuantSpec(bits=8, granularity="per_channel"),
    QuantSpec(bits=4, granularity="per_channel", symmetric=False),
    QuantSpec(bits=4, symmetric=False, granularity="per_group", group_size=8),
    QuantSpec(bits=2, granularity="per_channel"),
]


def _trained(spec: QuantSpec, x: torch.Tensor) -> FakeQuantize:
    fq = FakeQuantize(spec, "minmax")
    fq.observe(x)
    return fq


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}b-{s.granularity}")
def test_forward_equals_quantize_then_dequantize(spec: QuantSpec) -> None:
    x = torch.randn(6, 32) * 3
    fq = _trained(spec, x)
    scale, zp = fq.qparams()
    want = dequantize(quantize(x, scale, zp, spec), scale, zp, spec)
    assert torch.equal(fq(x), want)
    assert torch.equal(fq(x), fake_quantize(x, scale, zp, spec))


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 5), cols=st.integers(1, 40), bits=st.sampled_from([2, 4, 8]),
       symmetric=st.booleans(), scale=st.floats(1e-3, 2.0), seed=st.integers(0, 2**16))
def test_matches_torch_fake_quantize_forward_and_gradient(rows, cols, bits, symmetric, scale,
                                                          seed) -> None:
    """FakeQuantize_PreservesGradientFlow: the gradient is identical inside the range (1) and
    zero outside, exactly as torch's own fake-quantize ops; forward bit-identical."""
    g = torch.Generator().manual_seed(seed)
    spec = QuantSpec(bits=bits, symmetric=symmetric)
    x = (torch.randn(rows, cols, generator=g) * 4).requires_grad_(True)
    x.data[0, 0] = 0.5 * scale  # a rounding tie
    zp = 0 if symmetric else int(torch.randint(spec.qmin, spec.qmax + 1, (), generator=g))
    fq = FakeQuantize(spec, "minmax")
    fq.scale.fill_(scale)
    fq.zero_point.fill_(zp)
    fq.initialized.fill_(True)
    fq.eval()
    y = fq(x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.fake_quantize_per_tensor_affine(x2, scale, zp, spec.qmin, spec.qmax)
    upstream = torch.randn(rows, cols, generator=g)
    (gx,) = torch.autograd.grad(y, x, upstream)
    (gx2,) = torch.autograd.grad(y2, x2, upstream)
    assert torch.equal(y, y2)
    assert torch.equal(gx, gx2)
    codes = torch.round(x.detach() * (1.0 / torch.tensor(scale))) + zp
    inside = (codes >= spec.qmin) & (codes <= spec.qmax)
    assert torch.equal(gx[inside], upstream[inside])  # STE: unchanged inside the range
    assert bool((gx[~inside] == 0).all())  # zero where clipped


def test_per_channel_matches_torch() -> None:
    spec = QuantSpec(bits=4, granularity="per_channel", axis=0, symmetric=False)
    x = (torch.randn(5, 12) * 2).requires_grad_(True)
    fq = _trained(spec, x.detach() * 0.5).eval()  # narrow range: some values clip
    scale, zp = fq.qparams()
    y = fq(x)
    x2 = x.detach().clone().requires_grad_(True)
    y2 = torch.fake_quantize_per_channel_affine(x2, scale, zp, 0, spec.qmin, spec.qmax)
    y.sum().backward()
    y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    assert 0 < int((x.grad == 0).sum()) < x.numel()


@pytest.mark.parametrize("per_channel", [False, True])
def test_lsq_gradient_matches_torch_learnable_ops(per_channel: bool) -> None:
    x = (torch.randn(6, 10) * 3).requires_grad_(True)
    if per_channel:
        spec = QuantSpec(bits=4, granularity="per_channel", axis=1, symmetric=False)
        scale0, zp = torch.rand(10) + 0.1, torch.randint(-3, 3, (10,), dtype=torch.int32)
    else:
        spec = QuantSpec(bits=8, symmetric=False)
        scale0, zp = torch.tensor(0.02), torch.tensor(5, dtype=torch.int32)
    scale = scale0.clone().requires_grad_(True)
    y = fake_quantize_lsq(x, scale, zp, spec, grad_factor=0.5)
    upstream = torch.randn_like(y)
    gx, gs = torch.autograd.grad(y, (x, scale), upstream)
    x2 = x.detach().clone().requires_grad_(True)
    s2 = scale0.clone().reshape(-1).requires_grad_(True)
    z2 = zp.float().reshape(-1)
    if per_channel:
        y2 = torch._fake_quantize_learnable_per_channel_affine(x2, s2, z2, 1, spec.qmin,
                                                               spec.qmax, 0.5)
    else:
        y2 = torch._fake_quantize_learnable_per_tensor_affine(x2, s2, z2, spec.qmin, spec.qmax,
                                                              0.5)
    gx2, gs2 = torch.autograd.grad(y2, (x2, s2), upstream)
    assert torch.equal(y, y2) and torch.equal(gx, gx2)
    torch.testing.assert_close(gs.reshape(-1), gs2, rtol=1e-5, atol=1e-5)


def test_learnable_scale_is_a_parameter_initialized_by_the_observer() -> None:
    fq = FakeQuantize(QuantSpec(bits=4, symmetric=False), learnable_scale=True).train()
    assert isinstance(fq.log_scale, torch.nn.Parameter) and "scale" not in dict(fq.named_buffers())
    x = torch.randn(64, 8)
    fq(x)
    s0 = fq.scale.detach().clone()
    assert torch.allclose(s0, choose_qparams(*compute_range(x, fq.spec), fq.spec)[0])
    opt = torch.optim.SGD(fq.parameters(), lr=0.1)
    for _ in range(5):
        opt.zero_grad()
        (fq(x * 3) - x * 3).pow(2).mean().backward()  # wider data: the scale should grow
        opt.step()
    assert float(fq.scale.detach()) > float(s0)  # learned, not overwritten by the observer


def test_observer_and_fake_quant_modes() -> None:
    spec = QuantSpec(bits=8, symmetric=False)
    fq = FakeQuantize(spec).train()
    fq(torch.randn(32) * 1.0)
    s1 = fq.scale.clone()
    fq.disable_observer()
    fq(torch.randn(32) * 100.0)  # frozen: the range does not move
    assert torch.equal(fq.scale, s1)
    fq.enable_observer()
    fq.disable_fake_quant()
    x = torch.randn(32) * 100.0
    assert torch.equal(fq(x), x)  # pass-through, still observing
    assert not torch.equal(fq.scale, s1)
    fq.enable_fake_quant()
    fq.eval()
    s2 = fq.scale.clone()
    fq(torch.randn(32) * 1000.0)  # eval mode never moves the range
    assert torch.equal(fq.scale, s2)


def test_eval_initializes_once_and_freeze_after() -> None:
    fq = FakeQuantize(QuantSpec(), "minmax").eval()
    assert not bool(fq.initialized)
    fq(torch.tensor([-1.0, 2.0]))
    assert bool(fq.initialized) and math.isclose(float(fq.scale), 2.0 / 127, rel_tol=1e-6)
    fq = FakeQuantize(QuantSpec(), "minmax", freeze_observer_after=2).train()
    for amax in (1.0, 2.0, 50.0):
        fq(torch.tensor([amax]))
    assert math.isclose(float(fq.scale), 2.0 / 127, rel_tol=1e-6) and int(fq.num_steps) == 3


def test_reset_observer_tracks_current_tensor() -> None:
    fq = FakeQuantize(QuantSpec(granularity="per_channel"), "minmax", reset_observer=True).train()
    fq(torch.full((2, 3), 4.0))
    fq(torch.full((2, 3), 1.0))
    assert torch.allclose(fq.scale, torch.full((2,), 1.0 / 127))


def test_dynamic_per_token_matches_integer_kernel_codes() -> None:
    spec = QuantSpec.int8_dynamic_activation()
    fq = FakeQuantize(spec, dynamic=True)
    x = torch.randn(7, 16) * torch.arange(1, 8).reshape(7, 1)
    y = fq(x)
    u, s, z = quantize_activation_u8(x, spec.qmin, spec.qmax)
    assert torch.equal(y, (u.int() - z).float() * s)
    with pytest.raises(ValueError, match="no stored qparams"):
        fq.qparams()


def test_state_dict_restores_a_fresh_per_channel_quantizer() -> None:
    spec = QuantSpec(bits=4, granularity="per_channel", symmetric=False)
    a = FakeQuantize(spec, learnable_scale=True).train()
    for _ in range(3):
        a(torch.randn(4, 9))
    b = FakeQuantize(spec, learnable_scale=True)
    b.load_state_dict(a.state_dict())
    x = torch.randn(4, 9)
    assert torch.equal(a.eval()(x), b.eval()(x))
    assert torch.equal(a.observer.min_val, b.observer.min_val)
    assert isinstance(b.log_scale, torch.nn.Parameter)


def test_statistics_rows_and_gradients() -> None:
    fq = FakeQuantize(QuantSpec(bits=4)).train()
    for i in range(4):
        x = (torch.randn(50) * (1 + i)).requires_grad_(True)
        fq(x).pow(2).sum().backward()
    h = fq.history()
    assert h["step"] == [1, 2, 3, 4] and len(h["scale"]) == 4
    assert all(0.0 <= c <= 1.0 for c in h["clipped_fraction"])
    assert all(n > 0 for n in h["grad_norm"])
    assert all(a >= b for a, b in zip(h["grad_norm_in"], h["grad_norm"], strict=True))
    other = FakeQuantize(QuantSpec(bits=4))
    other.load_history(h)
    assert other.history() == h


def test_errors_name_the_problem() -> None:
    with pytest.raises(ValueError, match="dynamic=True"):
        FakeQuantize(QuantSpec(granularity="per_token"))
    with pytest.raises(ValueError, match="nothing to learn"):
        FakeQuantize(QuantSpec(), dynamic=True, learnable_scale=True)
    with pytest.raises(ValueError, match="unknown calibrator"):
        FakeQuantize(QuantSpec(), "nope")
    with pytest.raises(ValueError, match="no data observed"):
        FakeQuantize(QuantSpec(), name="fc1.input").qparams()


# ---------------------------------------------------------------------- fast paths, same results
@pytest.mark.parametrize("observer", ["minmax", "moving_average"])
@pytest.mark.parametrize("spec", [
    QuantSpec(bits=8, symmetric=False), QuantSpec(bits=8, granularity="per_channel"),
    QuantSpec(bits=4, granularity="per_channel", axis=1, symmetric=False),
    QuantSpec(bits=4, granularity="per_group", group_size=4, symmetric=False)],
    ids=lambda s: f"{s.bits}b-{s.granularity}-{s.axis}")
@pytest.mark.parametrize("reset", [False, True])
def test_fast_observer_leaves_the_calibrator_state_update_would(observer, spec, reset) -> None:
    """FakeQuantize updates min-max / moving-average observers on their buffers directly (no
    host sync but the NaN check): the observer state and qparams equal those of the generic
    Calibrator.update + compute_qparams, buffer for buffer."""
    from lowbit.calibrators import create_calibrator

    fq = FakeQuantize(spec, observer, observer_kwargs={"averaging_constant": 0.3}
                      if observer == "moving_average" else None, reset_observer=reset).train()
    kwargs = {"averaging_constant": 0.3} if observer == "moving_average" else {}
    ref = create_calibrator(observer, spec, **kwargs)
    g = torch.Generator().manual_seed(3)
    for i in range(4):
        x = torch.randn(6, 8, generator=g) * (1 + i) + (i - 2)
        fq.observe(x)
        if reset:
            ref.reset()
        ref.update(x)
        scale, zp = ref.compute_qparams(spec)
        assert torch.equal(fq.scale, scale) and torch.equal(fq.zero_point, zp), i
        mine, theirs = fq.observer.state_dict(), ref.state_dict()
        assert mine.keys() == theirs.keys()
        for key in theirs:
            assert torch.equal(mine[key], theirs[key]), (i, key)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("narrow", [False, True])
def test_clip_free_weights_equal_the_masked_path(bits: int, narrow: bool) -> None:
    """Symmetric signed weights observed afresh each step can never clip, so FakeQuantize skips
    the clamp and mask there: forward and gradient equal lowbit.ops.fake_quantize's, on rows
    of every magnitude (zeros: eps scale; subnormal-small; a lone value at +-amax)."""
    spec = QuantSpec(bits=bits, granularity="per_channel", narrow_range=narrow)
    fq = FakeQuantize(spec, "minmax", reset_observer=True).train()
    assert fq._clip_free
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(8, 33, generator=g) * torch.logspace(-30, 30, 8).reshape(8, 1)
    w[0] = 0.0
    w[1, 5], w[2, 7] = 3.0e38, -3.0e38
    w[3] = torch.rand(33, generator=g) * 1e-38  # subnormal scales
    w = w.requires_grad_(True)
    upstream = torch.randn(8, 33, generator=g)
    y = fq(w)
    (gx,) = torch.autograd.grad(y, w, upstream)
    w2 = w.detach().clone().requires_grad_(True)
    y2 = fake_quantize(w2, fq.scale, fq.zero_point, spec)
    (gx2,) = torch.autograd.grad(y2, w2, upstream)
    assert torch.equal(y, y2) and torch.equal(gx, gx2)
    assert fq.history()["clipped_fraction"] == [0.0]


def test_dynamic_quantizer_is_clip_free_and_exact() -> None:
    spec = QuantSpec.int8_dynamic_activation()
    fq = FakeQuantize(spec, dynamic=True).train()
    x = (torch.randn(5, 16) * torch.logspace(-3, 3, 5).reshape(5, 1)).requires_grad_(True)
    y = fq(x)
    (gx,) = torch.autograd.grad(y, x, torch.ones_like(y))
    scale, zp = choose_qparams(*compute_range(x, spec), spec)
    assert torch.equal(y, fake_quantize(x.detach(), scale, zp, spec))
    assert torch.equal(gx, torch.ones_like(x))


def test_nan_while_observing_is_refused_by_name_and_leaves_state() -> None:
    fq = FakeQuantize(QuantSpec(bits=8, symmetric=False), name="fc1.input").train()
    fq(torch.randn(4, 4))
    before = {k: v.clone() for k, v in fq.state_dict().items()}
    bad = torch.randn(4, 4)
    bad[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"fc1\.input has 1 NaN/Inf"):
        fq(bad)
    after = fq.state_dict()
    for key in ("scale", "zero_point", "observer.min_val", "observer.max_val",
                "observer.num_batches_tracked"):
        assert torch.equal(after[key], before[key]), key


def test_statistics_every_n_steps() -> None:
    fq = FakeQuantize(QuantSpec(), statistics_every=3).train()
    for _ in range(7):
        fq(torch.randn(8, requires_grad=True)).sum().backward()
    h = fq.history()
    assert h["step"] == [3, 6] and len(h["scale"]) == 2 and int(fq.num_steps) == 7
    assert all(not math.isnan(v) for v in h["grad_norm"])
    with pytest.raises(ValueError, match="statistics_every"):
        FakeQuantize(QuantSpec(), statistics_every=0)
