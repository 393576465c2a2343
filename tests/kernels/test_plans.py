"""Prepared C calls (lowbit.kernels.plans): the same bits as the step-by-step path, used when
they apply, and dropped whenever what they were built from changes."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lowbit._qmodule import QuantizedModuleBase
from lowbit.config import QuantizationConfig
from lowbit.kernels import native_lib_for
from lowbit.kernels.plans import Plan
from lowbit.modules import Int4Linear
from lowbit.ptq import quantize_dynamic, quantize_static, quantize_weight_only

pytestmark = pytest.mark.skipif(native_lib_for(torch.zeros(1)) is None,
                                reason="lowbit's C kernels are not available here")


def _stepwise(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose quantized layers never use prepared calls."""
    model = copy.deepcopy(model)
    for m in model.modules():
        if isinstance(m, QuantizedModuleBase):
            m.use_plans = False
    return model


def _plans(layer: nn.Module) -> list[Plan]:
    return [p for p, _ in (layer.__dict__.get("_plans") or {}).values() if p]


def _run_twice(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The second call is the one that runs on a plan (the first refreshes the caches)."""
    with torch.no_grad():
        model(x)
        return model(x)


class _ConvNet(nn.Module):
    def __init__(self, c: int, o: int, k: int, stride: tuple[int, int], dilation: int,
                 padding: int, bias: bool, relu: bool, pool: bool) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, o, k, stride=stride, dilation=dilation, padding=padding,
                              bias=bias)
        self.act = nn.ReLU() if relu else nn.Identity()
        self.pool = nn.MaxPool2d(2) if pool else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.act(self.conv(x)))


CONV_CASES = [  # c, o, k, stride, dilation, padding, bias, relu, pool, input shape
    (1, 16, 3, (1, 1), 1, 1, False, True, True, (1, 1, 28, 28)),
    (16, 32, 3, (1, 1), 1, 1, True, True, True, (1, 16, 14, 14)),
    (3, 9, 3, (2, 1), 2, 2, True, False, False, (2, 3, 11, 13)),
    (5, 4, 1, (1, 1), 1, 0, True, True, False, (1, 5, 7, 9)),
    (4, 12, 5, (1, 1), 1, 0, False, False, True, (3, 4, 17, 19)),
]


@pytest.mark.parametrize("mode", ["dynamic", "static"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}to{c[1]}k{c[2]}")
def test_conv_plan_gives_the_stepwise_bits(mode: str, case: tuple) -> None:
    *geometry, shape = case
    model = _ConvNet(*geometry).eval()
    if mode == "dynamic":
        q = quantize_dynamic(model, progress=False)
    else:
        q = quantize_static(model, [torch.randn(4, *shape[1:]) for _ in range(3)],
                            progress=False)
    x = torch.randn(shape)
    y = _run_twice(q, x)
    assert _plans(q.conv), "the conv did not run on a prepared call"
    stepwise = _stepwise(q)
    ref = _run_twice(stepwise, x)
    assert not _plans(stepwise.conv)
    assert torch.equal(y, ref)
    assert y.shape == model(x).shape


def _mlp(k: int, hidden: int, relu: bool) -> nn.Module:
    return nn.Sequential(nn.Linear(k, hidden), nn.ReLU() if relu else nn.GELU(),
                         nn.Linear(hidden, 10)).eval()


LINEAR_SHAPES = [(1, 128), (3, 128), (2, 5, 128), (1, 1568), (32, 1568), (128,)]


@pytest.mark.parametrize("shape", LINEAR_SHAPES, ids=str)
@pytest.mark.parametrize("scheme", ["per_token", "per_tensor", "static"])
def test_linear_plan_gives_the_stepwise_bits(shape: tuple[int, ...], scheme: str) -> None:
    k = shape[-1]
    model = _mlp(k, 96, relu=scheme != "per_token")  # ReLU fused, or GELU fused
    if scheme == "static":
        q = quantize_static(model, [torch.randn(8, k) for _ in range(3)], progress=False)
    else:
        cfg = QuantizationConfig.int8_dynamic(per_token=scheme == "per_token")
        q = quantize_dynamic(model, config=cfg, progress=False)
    x = torch.randn(shape)
    y = _run_twice(q, x)
    assert _plans(q[0]) and _plans(q[2]), "the linears did not run on prepared calls"
    assert torch.equal(y, _run_twice(_stepwise(q), x))


def test_in_place_weight_change_is_seen() -> None:
    q = quantize_dynamic(_mlp(64, 32, relu=True), progress=False)
    x = torch.randn(2, 64)
    _run_twice(q, x)
    with torch.no_grad():
        q[0].qweight.neg_()  # the step-by-step path rebuilds its caches, plans are dropped
    y = q(x)
    assert torch.equal(y, _run_twice(_stepwise(q), x))
    assert torch.equal(_run_twice(q, x), y)


@pytest.mark.parametrize("where", ["quantized", "copied"])
def test_models_made_under_inference_mode_run_on_prepared_calls(where: str) -> None:
    """Weights that are inference tensors (no version counter) still get their kernel caches
    and prepared calls, with the bits of a model made outside inference mode; loading new
    weights into it is seen."""
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                          nn.Linear(8 * 6 * 6, 10))
    normal = quantize_dynamic(model, progress=False)
    with torch.inference_mode():
        q = (quantize_dynamic(model, progress=False) if where == "quantized"
             else copy.deepcopy(normal))
        assert q[0].qweight.is_inference()
        x = torch.randn(1, 1, 6, 6)
        y = _run_twice(q, x)
        assert _plans(q[0]) and _plans(q[3])
        assert torch.equal(y, _run_twice(_stepwise(normal), x))
        state = {k: v.clone() for k, v in normal.state_dict().items()}
        state["3.weight"] = -state["3.weight"]  # the codes; copied in place: caches rebuilt
        q.load_state_dict(state)
        normal.load_state_dict(state)
        assert torch.equal(_run_twice(q, x), _run_twice(_stepwise(normal), x))


def test_fusion_and_backend_changes_drop_the_plans() -> None:
    q = quantize_dynamic(_mlp(64, 32, relu=True), progress=False)
    x = torch.randn(2, 64)
    before = _run_twice(q, x)
    q[0].fused_relu = False  # (the ReLU module was replaced by Identity: outputs change)
    after = _run_twice(q, x)
    assert not torch.equal(before, after)
    assert torch.equal(after, _run_twice(_stepwise(q), x))
    q[0].backend = "reference"
    assert not _plans(q[0])
    assert torch.allclose(q(x), after, atol=1e-5)


def test_thread_count_changes_give_new_plans_with_the_same_bits() -> None:
    q = quantize_dynamic(_ConvNet(16, 32, 3, (1, 1), 1, 1, True, True, True).eval(),
                         progress=False)
    x = torch.randn(1, 16, 14, 14)
    threads = torch.get_num_threads()
    try:
        y2 = _run_twice(q, x)
        torch.set_num_threads(1)
        y1 = _run_twice(q, x)
    finally:
        torch.set_num_threads(threads)
    assert len(_plans(q.conv)) == (2 if threads > 1 else 1)
    assert torch.equal(y1, y2)


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_non_finite_inputs_take_the_stepwise_path(mode: str) -> None:
    model = _ConvNet(3, 8, 3, (1, 1), 1, 1, True, True, False).eval()
    if mode == "dynamic":
        q = quantize_dynamic(model, progress=False)
    else:
        q = quantize_static(model, [torch.randn(4, 3, 9, 9)], progress=False)
    x = torch.randn(3, 3, 9, 9)
    _run_twice(q, x)
    bad = x.clone()
    bad[1, 0, 2, 2] = float("nan")
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        y = q(bad)
        ref = _stepwise(q)(bad)
    assert torch.isnan(y[1]).all() and torch.equal(y[[0, 2]], ref[[0, 2]])
    assert torch.equal(y[[0, 2]], q(x)[[0, 2]])  # the other samples as without the NaN


def test_wrong_shapes_raise_as_without_plans() -> None:
    q = quantize_dynamic(_ConvNet(3, 8, 3, (1, 1), 1, 0, True, True, False).eval(),
                         progress=False)
    _run_twice(q, torch.randn(1, 3, 9, 9))
    with pytest.raises(RuntimeError, match="smaller than"):
        q(torch.randn(1, 3, 2, 9))
    with pytest.raises(ValueError, match="expected input with 3 features"):
        q(torch.randn(1, 4, 9, 9))


def test_inputs_that_need_grad_or_other_dtypes_skip_the_plans() -> None:
    q = quantize_dynamic(_mlp(64, 32, relu=True), progress=False)
    x = torch.randn(2, 64)
    y = _run_twice(q, x)
    assert torch.equal(q(x.double()).float(), _stepwise(q)(x.double()).float())
    xg = x.clone().requires_grad_(True)
    out = q(xg)
    out.sum().backward()
    assert xg.grad is not None and torch.allclose(out.detach(), y)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: f"{c[0]}to{c[1]}k{c[2]}")
def test_weight_only_conv_plan_gives_the_stepwise_bits(bits: int, case: tuple) -> None:
    *geometry, shape = case
    model = _ConvNet(*geometry).eval()
    q = quantize_weight_only(model, bits=bits, group_size=geometry[0] * geometry[2] ** 2,
                             progress=False)  # one group per output channel
    x = torch.randn(shape)
    y = _run_twice(q, x)
    assert _plans(q.conv), "the conv did not run on a prepared call"
    assert torch.equal(y, _run_twice(_stepwise(q), x))


@pytest.mark.parametrize("shape", [(1, 128), (3, 128), (2, 5, 128), (1, 1568), (40, 1568)],
                         ids=str)
@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_linear_plan_gives_the_stepwise_bits(shape: tuple[int, ...],
                                                         bits: int) -> None:
    q = quantize_weight_only(_mlp(shape[-1], 96, relu=True), bits=bits,
                             group_size=32 if bits == 4 else None, progress=False)
    x = torch.randn(shape)
    y = _run_twice(q, x)
    rows = x.numel() // shape[-1]
    if bits == 4 or rows <= q[2]._small_max_m:  # (else PyTorch's packed INT8 op runs)
        assert _plans(q[2]), "the head did not run on a prepared call"
    assert torch.equal(y, _run_twice(_stepwise(q), x))


def test_int4_activation_setting_changes_the_plan(monkeypatch: pytest.MonkeyPatch) -> None:
    q = quantize_weight_only(_mlp(1568, 96, relu=True), bits=4, group_size=32,
                             progress=False)
    x = torch.randn(40, 1568)
    y8 = _run_twice(q, x)
    monkeypatch.setattr(Int4Linear, "int8_activations", False)  # class-wide
    yf = _run_twice(q, x)
    assert torch.equal(yf, _run_twice(_stepwise(q), x))
    assert not torch.equal(yf, y8)
    q[0].int8_activations = True  # on one module
    assert torch.equal(_run_twice(q, x), _run_twice(_stepwise(q), x))


@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_bfloat16_models_use_the_plans_with_the_stepwise_bits(mode: str) -> None:
    from lowbit.models import MnistCNN

    model = MnistCNN().eval().to(torch.bfloat16)
    if mode == "dynamic":
        q = quantize_dynamic(model, progress=False)
    else:
        q = quantize_static(model, [torch.randn(8, 1, 28, 28, dtype=torch.bfloat16)],
                            progress=False)
    for batch in (1, 32):
        x = torch.randn(batch, 1, 28, 28, dtype=torch.bfloat16)
        y = _run_twice(q, x)
        assert y.dtype == torch.bfloat16
        assert torch.equal(y, _run_twice(_stepwise(q), x))
    assert _plans(q.conv1) and _plans(q.fc2)


@settings(max_examples=40, deadline=None)
@given(c=st.integers(1, 6), o=st.integers(1, 12), kh=st.integers(1, 4), kw=st.integers(1, 4),
       sh=st.integers(1, 3), dil=st.integers(1, 2), pad=st.integers(0, 2),
       h=st.integers(1, 12), w=st.integers(1, 17), batch=st.integers(1, 3),
       bias=st.booleans(), relu=st.booleans(), pool=st.booleans(), static=st.booleans(),
       bits=st.sampled_from([0, 4, 8]))
def test_fuzz_conv_plans_read_and_write_only_their_tensors(
        c: int, o: int, kh: int, kw: int, sh: int, dil: int, pad: int, h: int, w: int,
        batch: int, bias: bool, relu: bool, pool: bool, static: bool, bits: int) -> None:
    """Random geometries, down to inputs exactly the kernel's extent: a plan's output equals
    the step-by-step path's (bits = 0: INT8 x INT8, else weight-only), and a shape the conv
    refuses raises the same error with and without plans. Inputs and outputs sit between
    guard values that must come back unchanged."""
    pad = min(pad, dil * (min(kh, kw) - 1))  # (lowbit refuses padding beyond the kernel's reach)
    model = _ConvNet(c, o, (kh, kw), (sh, 1), dil, pad, bias, relu, pool).eval()
    if bits:
        q = quantize_weight_only(model, bits=bits, group_size=c * kh * kw, progress=False)
    elif static:
        q = quantize_static(model, [torch.randn(2, c, 16, 20)], progress=False)
    else:
        q = quantize_dynamic(model, progress=False)
    guard = torch.full((3 * batch * c * h * w,), 1e30)
    x = guard[batch * c * h * w:2 * batch * c * h * w].view(batch, c, h, w)
    x.copy_(torch.randn(batch, c, h, w))
    try:
        ref = _run_twice(_stepwise(q), x)
    except (RuntimeError, ValueError) as exc:
        with pytest.raises(type(exc)):
            _run_twice(q, x)
        return
    y = _run_twice(q, x)
    assert torch.equal(y, ref)
    assert bool((guard[:batch * c * h * w] == 1e30).all())
    assert bool((guard[2 * batch * c * h * w:] == 1e30).all())


def test_threads_sharing_a_model_get_their_own_results() -> None:
    """Plans hold no per-call state: threads calling one model at once (as a server's request
    threads do) each get exactly the single-threaded result for their input."""
    from concurrent.futures import ThreadPoolExecutor

    from lowbit.models import MnistCNN

    q = quantize_dynamic(MnistCNN().eval(), progress=False)
    xs = [torch.randn(1 + i % 3, 1, 28, 28) for i in range(12)]
    with torch.no_grad():
        expected = [_run_twice(q, x) for x in xs]

    def work(i: int) -> bool:
        with torch.no_grad():
            return all(torch.equal(q(xs[i]), expected[i]) for _ in range(20))

    with ThreadPoolExecutor(4) as pool:
        assert all(pool.map(work, range(len(xs))))


def test_plan_builders_refuse_arguments_the_c_calls_would_read_past() -> None:
    """Called directly, each builder checks what its C call will read, and says what to pass."""
    from lowbit.kernels.linear import run_fused_linear
    from lowbit.kernels.plans import conv_codes_plan, linear_plan, wo_conv_plan, wo_linear_plan

    lib = native_lib_for(torch.zeros(1))
    w = torch.randint(-127, 128, (8, 16), dtype=torch.int8)
    args = (torch.ones(8), None, True, None, None, None, False, -127, 127)
    with pytest.raises(ValueError, match="K = the input's last dim"):
        linear_plan(lib, (3, 20), "s8_avx2", w, *args)
    with pytest.raises(ValueError, match="int8 weight"):
        linear_plan(lib, (3, 16), "s8_avx2", w.float(), *args)
    with pytest.raises(ValueError, match="N values"):
        linear_plan(lib, (3, 16), "s8_avx2", w, torch.ones(7), *args[1:])
    for smooth in (torch.ones(15), torch.ones(16, dtype=torch.float64), torch.ones(32)[::2]):
        with pytest.raises(ValueError, match="smooth must be a contiguous float32 tensor"):
            linear_plan(lib, (3, 16), "s8_avx2", w, *args, None, smooth)
        with pytest.raises(ValueError, match="smooth must be a contiguous float32 tensor"):
            run_fused_linear(lib, torch.randn(3, 16), -127, 127, w, torch.ones(8),
                             w.sum(1, dtype=torch.int32), None, True, None, None, None, False,
                             "int_mm_s8s8", smooth)
    with pytest.raises(ValueError, match="do not match the conv"):
        conv_codes_plan(lib, (1, 3, 5, 5), torch.zeros(4, 2, 3, 3), torch.ones(4), None, None,
                        0, -127, 127, (3, 3), (1, 1), (1, 1), (1, 1), False, 0)
    c_args = (torch.ones(2, 4, dtype=torch.int8), 0, 1, 2, 4, 4, 4, torch.ones(2),
              torch.zeros(2, dtype=torch.int32))
    with pytest.raises(ValueError, match="pass the layer's own _c_args"):
        wo_conv_plan(lib, (1, 3, 5, 5), c_args, 2, (2, 2), None, (1, 1), (0, 0), (1, 1), False,
                     0)
    small = (torch.ones(1, 2, dtype=torch.int8), 0, 1, 1, 2, 2, torch.ones(1),
             torch.zeros(1, dtype=torch.int32), None)
    with pytest.raises(ValueError, match="at most Kp=2"):
        wo_linear_plan(lib, (1, 7), small, None, None, False)


@pytest.mark.parametrize("shape", [(1, 128), (3, 128), (2, 5, 128), (32, 1568), (300, 384)],
                         ids=str)
@pytest.mark.parametrize("config", ["int8", "7-bit", "static"])
def test_input_smoothing_fused_into_the_plan_gives_the_stepwise_bits(
        shape: tuple[int, ...], config: str) -> None:
    """SmoothQuant layers: dynamic per-token plans multiply each row by the factors as the C
    call quantizes it (no ``x * smoothing`` pass), with the bits of the step-by-step path;
    other schemes keep the multiply in front of their plans."""
    k = shape[-1]
    torch.manual_seed(0)
    model = _mlp(k, 96, relu=True)
    calib = [torch.randn(16, k) * torch.linspace(0.05, 20.0, k) for _ in range(2)]
    cfg = {"int8": QuantizationConfig.int8_dynamic(smooth_quant=0.5),
           "7-bit": QuantizationConfig.int8_dynamic(activation_bits=7, smooth_quant=0.5),
           "static": QuantizationConfig.int8_static(smooth_quant=0.5)}[config]
    from lowbit.ptq import PTQQuantizer

    q = PTQQuantizer(cfg, progress=False).quantize(model, calib)
    assert q[0]._buffers.get("input_smoothing") is not None
    x = torch.randn(shape) * torch.linspace(0.05, 20.0, k)
    y = _run_twice(q, x)
    fused = [p for key, (p, _) in q[0]._plans.items() if key[-1] is not None and p]
    assert bool(fused) == (config != "static")
    assert _plans(q[0]) and _plans(q[2])
    assert torch.equal(y, _run_twice(_stepwise(q), x))
    with torch.no_grad():  # a changed factor is seen (a new plan), still the stepwise bits
        q[0].input_smoothing.mul_(1.5)
    assert torch.equal(_run_twice(q, x), _run_twice(_stepwise(q), x))


@pytest.mark.parametrize("kernel", ["int_mm_s8s8", "fp32_codes"])
@pytest.mark.parametrize("rows", [40, 4500])  # 4500: block by block
def test_input_smoothing_on_the_step_path_gives_the_multiplied_bits(
        monkeypatch: pytest.MonkeyPatch, kernel: str, rows: int) -> None:
    """GEMMs without a plan (oneDNN's ``_int_mm`` above the C GEMM's rows, the fp32 GEMM over
    the codes) take the input smoothing in the quantizer too: the bits of ``x * factor``."""
    from lowbit.modules import QuantizedLinear
    from lowbit.ptq import PTQQuantizer

    monkeypatch.setattr(QuantizedLinear, "_kernel", lambda self, m, device: kernel)
    torch.manual_seed(0)
    k = 384
    model = _mlp(k, 96, relu=False)  # GELU fused
    calib = [torch.randn(16, k) * torch.linspace(0.05, 20.0, k)]
    q = PTQQuantizer(QuantizationConfig.int8_dynamic(smooth_quant=0.5),
                     progress=False).quantize(model, calib)
    x = torch.randn(rows, k) * torch.linspace(0.05, 20.0, k)
    calls = []
    fused = QuantizedLinear._fused_smoothing

    def spy(self, x, smoothing):
        y = fused(self, x, smoothing)
        calls.append(y is not None)
        return y

    monkeypatch.setattr(QuantizedLinear, "_fused_smoothing", spy)
    y = _run_twice(q, x)
    assert calls and all(calls)
    assert torch.equal(y, _run_twice(_stepwise(q), x))


@pytest.mark.parametrize("shape", [(1, 256), (3, 256), (40, 256), (2, 300, 256)], ids=str)
@pytest.mark.parametrize("nonfinite", [False, True])
def test_awq_smoothing_fused_into_the_int4_plan_gives_the_stepwise_bits(
        shape: tuple[int, ...], nonfinite: bool) -> None:
    """AWQ INT4 layers: the INT4 x INT8 kernel's plans multiply each row by the factors as
    they quantize it (rows it computes from float values too), with the step path's bits."""
    torch.manual_seed(0)
    k = shape[-1]
    model = _mlp(k, 96, relu=True)
    calib = [torch.randn(32, k) * torch.linspace(0.05, 20.0, k) for _ in range(2)]
    q = quantize_weight_only(model, bits=4, group_size=32, method="awq", calibration_data=calib,
                             progress=False)
    assert q[0]._buffers.get("input_smoothing") is not None
    x = torch.randn(shape) * torch.linspace(0.05, 20.0, k)
    if nonfinite:
        x.view(-1, k)[0, 5] = float("inf")  # a row from its float values
    y = _run_twice(q, x)
    fused = [p for key, (p, _) in q[0]._plans.items() if key[-1] is not None and p]
    m = x.numel() // k
    assert bool(fused) == (m > q[0]._small_max_m and q[0]._select_packed(m).startswith("u4q8_"))
    torch.testing.assert_close(y, _run_twice(_stepwise(q), x), rtol=0, atol=0, equal_nan=True)
