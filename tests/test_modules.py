"""Quantized modules: storage, accuracy vs FP32, auto == reference, round trips, errors."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn
from torch.utils._pytree import tree_leaves

import lowbit
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.kernels import (
    CODES_DIRECT_MAX_MACS,
    INT4_PACKED_MAX_M,
    VNNI_S8_MAX_MACS,
    WEIGHT_ONLY_PACKED_MAX_M,
    int8_gemm,
    select_kernel,
)
from lowbit.kernels import select as kernel_select
from lowbit.modules import (
    QUANTIZED_MODULES,
    Int4Linear,
    Int8WeightOnlyLinear,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedEmbedding,
    QuantizedLinear,
    WeightOnlyConv2d,
    check_supported,
    convert_module,
    module_from_meta,
)
from lowbit.ops import dequantize, quantize_bias, quantize_tensor, unpack_int4

DYN = QuantizationConfig.int8_dynamic()
DYN_PT = QuantizationConfig.int8_dynamic(per_token=False)
STATIC = QuantizationConfig.int8_static()
INT4 = QuantizationConfig.int4_weight_only(group_size=32)
INT8_WO = QuantizationConfig.int8_weight_only()
EMB_WO = QuantizationConfig(weights=QuantSpec.int8_weight(), activations=None, mode="weight_only",
                          quantize_embeddings=True)


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0))


def _static_qparams(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    spec = STATIC.activations
    from lowbit.ops import choose_qparams, compute_range
    return choose_qparams(*compute_range(x, spec), spec)


def _linear(k: int = 64, n: int = 48, seed: int = 0) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(k, n)


def _make(kind: str, fc: nn.Linear, x: torch.Tensor, backend: str = "auto") -> nn.Module:
    if kind == "static":
        return QuantizedLinear.from_float(fc, STATIC, input_qparams=_static_qparams(x),
                                          backend=backend, name="fc")
    cfg = {"dynamic": DYN, "dynamic_pt": DYN_PT, "int4": INT4, "int8wo": INT8_WO}[kind]
    return convert_module(fc, cfg, name="fc", backend=backend)


KINDS = ["dynamic", "dynamic_pt", "static", "int4", "int8wo"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1, 67), (7, 67), (33, 67), (2, 5, 67)])
def test_linear_auto_vs_reference_and_fp32(kind: str, shape: tuple[int, ...]) -> None:
    fc = _linear(67, 48)  # odd K, not divisible by the INT4 group size
    x = torch.randn(shape)
    q = _make(kind, fc, x)
    ref = _make(kind, fc, x, backend="reference")
    y, y_ref, y_fp = q(x), ref(x), fc(x).detach()
    assert y.shape == y_fp.shape and y.dtype == x.dtype
    if kind in ("dynamic", "dynamic_pt", "static"):
        assert torch.equal(y, y_ref)  # exact integer accumulator, shared epilogue
    else:  # bf16 activations on the fast path
        assert _cos(y, y_ref) > 0.9999
    assert _cos(y, y_fp) > (0.995 if kind == "int4" else 0.999)


def test_dynamic_error_bound_from_scales() -> None:
    fc = _linear(128, 32)
    x = torch.randn(9, 128)
    q = QuantizedLinear.from_float(fc, DYN)
    y, y_fp = q(x), fc(x).detach()
    # |err| <= sum_k |x||dw| + |dx||w| + |dx||dw| with |dx| <= s_x/2, |dw| <= s_w/2
    s_x = x.abs().amax(1, keepdim=True) / 127
    s_w = q.weight_scale[None, :]
    bound = (x.abs().sum(1, keepdim=True) * s_w / 2 + s_x / 2 * fc.weight.abs().sum(1)[None]
             + 128 * s_x * s_w / 4)
    assert ((y - y_fp).abs() <= bound + 1e-5).all()


def test_storage_dtypes_and_bytes() -> None:
    fc = _linear(64, 48)
    q8 = QuantizedLinear.from_float(fc, DYN)
    assert q8.qweight.dtype == torch.int8 and q8.qweight.nbytes == 48 * 64
    q4 = Int4Linear.from_float(fc, INT4)
    assert q4.qweight.dtype == torch.uint8 and q4.qweight.nbytes == 48 * 64 // 2
    assert q4.weight_scale.shape == (48, 2) and q4.weight_zero_point.dtype == torch.int32
    assert set(q8.state_dict()) == {"weight", "weight_scale", "weight_zero_point", "bias"}
    qs = QuantizedLinear.from_float(fc, STATIC, input_qparams=(0.1, 3))
    assert {"input_scale", "input_zero_point"} <= set(qs.state_dict())
    assert not isinstance(q8, nn.Linear) and not isinstance(q4, nn.Linear)


def test_static_zero_point_compensation_is_exact() -> None:
    fc = _linear(40, 24)
    x = torch.randn(6, 40) + 1.5  # asymmetric range -> non-zero zero-point
    scale, zp = _static_qparams(x)
    assert int(zp) != 0
    q = QuantizedLinear.from_float(fc, STATIC, input_qparams=(scale, zp))
    from lowbit.ops import quantize
    qx = quantize(x, scale, zp, STATIC.activations).long()
    acc = (qx - int(zp)) @ q.qweight.long().t()  # exact integer accumulator
    # the bias as int32 codes at scale s_x * s_w (as ONNX Runtime's QGemm adds it)
    bias_q, bias_scale = quantize_bias(q.bias, scale, q.weight_scale)
    expected = acc.float() * scale * q.weight_scale + bias_q.float() * bias_scale
    torch.testing.assert_close(q(x), expected, rtol=1e-6, atol=1e-5)
    assert not torch.equal(bias_q.float() * bias_scale, q.bias)  # (so the test can tell)


def test_static_bias_is_int32_at_input_times_weight_scale_unless_it_overflows() -> None:
    fc = _linear(16, 8)
    x = torch.randn(5, 16)
    scale, zp = _static_qparams(x)
    q = QuantizedLinear.from_float(fc, STATIC, input_qparams=(scale, zp))
    step = scale * q.weight_scale  # [N]
    assert float(((q._bias - q.bias).abs() - step / 2).max()) <= 1e-7
    assert torch.equal(torch.round(q._bias.double() / step.double()),
                       torch.round(q.bias.double() / step.double()))
    assert torch.equal(q.state_dict()["bias"], fc.bias.detach())  # the saved bias stays float
    with torch.no_grad():
        fc.bias[0] = 1e30  # 1e30 / step does not fit in int32: the bias stays float
    q = QuantizedLinear.from_float(fc, STATIC, input_qparams=(scale, zp))
    assert quantize_bias(q.bias, scale, q.weight_scale) is None and q._bias is q.bias
    assert q(x).shape == (5, 8)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_relu(kind: str) -> None:
    fc = _linear(32, 16)
    x = torch.randn(4, 32)
    q = _make(kind, fc, x)
    q.fused_relu = True
    if hasattr(q, "_refresh_cache"):
        q._refresh_cache()
    y = q(x)
    q.fused_relu = False
    assert torch.equal(y, q(x).relu())


def _roundtrip_modules() -> list[tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(5)
    fc, x = _linear(67, 48), torch.randn(3, 67)
    conv, xc = nn.Conv2d(4, 8, 3, padding=1), torch.randn(2, 4, 7, 7)
    out = [(_make(k, fc, x), x) for k in KINDS]
    out.append((QuantizedConv2d.from_float(conv, DYN, fused_relu=True), xc))
    out.append((QuantizedConv2d.from_float(conv, STATIC, input_qparams=_static_qparams(xc),
                                           meta_extra={"calibrator": "minmax",
                                                       "observed_range": (-1.0, 2.0)}), xc))
    out.append((WeightOnlyConv2d.from_float(conv, INT4), xc))
    emb = nn.Embedding(20, 12)
    out.append((QuantizedEmbedding.from_float(emb, INT4), torch.tensor([[1, 5, 19]])))
    return out


def test_state_dict_round_trips_torch_save_and_safetensors(tmp_path) -> None:
    for q, x in _roundtrip_modules():
        y = q(x)
        meta = json.loads(json.dumps(q.meta()))  # JSON-compatible
        # torch.save / torch.load(weights_only=True)
        buf = io.BytesIO()
        torch.save(q.state_dict(), buf)
        buf.seek(0)
        r1 = module_from_meta(meta)
        r1.load_state_dict(torch.load(buf, weights_only=True), strict=True)
        assert torch.equal(r1(x), y), meta["class"]
        # safetensors
        r2 = QUANTIZED_MODULES[meta["class"]].from_meta(meta)
        r2.load_state_dict(st_load(st_save(dict(q.state_dict()))), strict=True)
        assert torch.equal(r2(x), y), meta["class"]
        assert r2.meta() == meta


def test_meta_device_gives_shapes_and_to_empty_then_load_restores_the_bits() -> None:
    """``.to("meta")``, a forward for shapes, ``.to_empty()`` and ``load_state_dict``: the
    steps of big-model loaders (accelerate's empty init). The kernel caches derive from the
    buffers' values, which meta tensors lack: they wait for the first call on real data
    (before, ``.to("meta")`` raised 'Tensor.item() cannot be called on meta tensors')."""
    torch.manual_seed(6)
    cases = _roundtrip_modules()
    for rnn in (nn.LSTM(6, 8, num_layers=2, batch_first=True, bidirectional=True),
                nn.GRU(6, 8, batch_first=True)):
        cases.append((lowbit.quantize_dynamic(nn.Sequential(rnn))[0], torch.randn(2, 5, 6)))
    smoothed = lowbit.quantize_static(  # (input smoothing: the wrapper's own path)
        nn.Sequential(nn.Linear(16, 8)), [torch.randn(4, 16)], progress=False,
        config=QuantizationConfig.int8_static(smooth_quant=0.5))[0]
    assert "input_smoothing" in smoothed.state_dict()
    cases.append((smoothed, torch.randn(3, 16)))
    for q, x in cases:
        name = type(q).__name__
        y = q(x)
        state = {k: v.clone() for k, v in q.state_dict().items()}
        on_meta = copy.deepcopy(q).to("meta")
        y_meta = on_meta(x.to("meta"))
        for a, b in zip(tree_leaves(y_meta), tree_leaves(y), strict=True):
            assert a.is_meta and a.shape == b.shape and a.dtype == b.dtype, name
        restored = on_meta.to_empty(device="cpu")
        restored.load_state_dict(state)
        y2 = restored(x)
        for a, b in zip(tree_leaves(y2), tree_leaves(y), strict=True):
            assert torch.equal(a, b), name
    q = cases[0][0]
    with pytest.raises(ValueError, match="in_features=67"):
        copy.deepcopy(q).to("meta")(torch.empty(3, 66, device="meta"))


def test_meta_contents() -> None:
    fc = _linear(67, 48)
    m = Int4Linear.from_float(fc, INT4, name="blocks.0.fc", meta_extra={"note": "x"}).meta()
    assert m["class"] == "Int4Linear" and m["padding"] == 29 and m["padded_in_features"] == 96
    assert m["weight_spec"] == INT4.weights.to_dict() and m["name"] == "blocks.0.fc"
    assert m["extra"] == {"note": "x"} and m["dtype"] == "float32"
    s = QuantizedLinear.from_float(fc, STATIC, input_qparams=(0.1, 2), fused_relu=True).meta()
    assert s["mode"] == "static" and s["fused_relu"]
    small, large = (select_kernel("int8_linear", m, k=67, n=48) for m in (1, 1 << 20))
    t = VNNI_S8_MAX_MACS // (67 * 48)  # avx512_vnni: _int_mm from many rows on
    assert small == int8_gemm()
    assert s["kernel"] == (small if small == large else {f"M<={t}": small, f"M>{t}": large})
    assert s["activation_spec"] == STATIC.activations.to_dict()
    assert m["kernel"] == Int4Linear.from_float(fc, INT4).kernel_info()  # the per-M plan


def test_dequantize_weight_matches_ops() -> None:
    fc = _linear(64, 32)
    q8 = QuantizedLinear.from_float(fc, DYN)
    codes, s, z = quantize_tensor(fc.weight, DYN.weights)
    assert torch.equal(q8.dequantize_weight(), dequantize(codes, s, z, DYN.weights))
    q4 = Int4Linear.from_float(fc, INT4)
    codes, s, z = quantize_tensor(fc.weight, INT4.weights)
    assert torch.equal(unpack_int4(q4.qweight), codes)
    assert torch.equal(q4.dequantize_weight(), dequantize(codes, s, z, INT4.weights))


def test_int4_small_k_uses_one_group_per_row_and_low_bits() -> None:
    fc = _linear(21, 16)
    q = Int4Linear.from_float(fc, QuantizationConfig.int4_weight_only(group_size=128))
    assert q.meta()["effective_weight_spec"]["group_size"] == 22
    x = torch.randn(2, 21)
    assert _cos(q(x), fc(x).detach()) > 0.99
    cfg3 = QuantizationConfig(weights=QuantSpec(bits=3, symmetric=False, granularity="per_group",
                                                group_size=32), activations=None,
                              mode="weight_only")
    fc = _linear(64, 32)
    q3 = convert_module(fc, cfg3)
    assert isinstance(q3, Int4Linear)
    ref3 = convert_module(fc, cfg3, backend="reference")
    x = torch.randn(3, 64)
    assert _cos(q3(x), ref3(x)) > 0.9999 and _cos(q3(x), fc(x).detach()) > 0.95


def test_int8_weight_only_per_group_uses_dequant_path() -> None:
    cfg = QuantizationConfig(weights=QuantSpec(bits=8, granularity="per_group", group_size=16),
                             activations=None, mode="weight_only")
    fc = _linear(40, 16)
    q = convert_module(fc, cfg)
    assert isinstance(q, Int8WeightOnlyLinear) and q.meta()["padding"] == 8
    x = torch.randn(70, 40)
    assert _cos(q(x), fc(x).detach()) > 0.999


@pytest.mark.parametrize("cfg_name", ["dynamic", "static"])
@pytest.mark.parametrize("groups,stride,padding,dilation,mode", [
    (1, 1, 1, 1, "zeros"), (2, 2, 0, 1, "zeros"), (1, 1, "same", 2, "zeros"),
    (1, 1, 1, 1, "reflect")])
def test_conv2d(cfg_name, groups, stride, padding, dilation, mode) -> None:
    torch.manual_seed(6)
    conv = nn.Conv2d(4, 6, 3, stride=stride, padding=padding, dilation=dilation, groups=groups,
                     padding_mode=mode)
    x = torch.randn(2, 4, 9, 9)
    kw = {"input_qparams": _static_qparams(x)} if cfg_name == "static" else {}
    cfg = STATIC if cfg_name == "static" else DYN
    q = convert_module(conv, cfg, **kw)
    ref = convert_module(conv, cfg, backend="reference", **kw)
    y = q(x)
    assert torch.equal(y, ref(x)) and y.is_contiguous()
    assert _cos(y, conv(x).detach()) > 0.999
    if groups > 1:
        assert q.meta()["kernel"] == "fp32_codes_conv"  # K = 18: exact fp32 conv on codes


@pytest.mark.parametrize("kind", ["dynamic", "static", "int4", "int8wo"])
@pytest.mark.parametrize("conv", [
    lambda: nn.Conv2d(4, 6, 1, padding=1),  # a 1x1 conv with padding: a border of bias only
    lambda: nn.Conv2d(4, 6, 2, padding=2, padding_mode="circular"),
    lambda: nn.Conv1d(4, 6, 3, padding=3, padding_mode="replicate", stride=2),
    lambda: nn.Conv2d(4, 6, 3, padding=(0, 5), dilation=(1, 2))], ids=[
        "1x1_pad1", "circular_past_reach", "conv1d_replicate", "zeros_past_dilated_reach"])
def test_conv_padding_past_the_kernel_reach(conv: Callable[[], nn.Module], kind: str) -> None:
    """Padding wider than the kernel reaches (valid in PyTorch) goes through an explicit pad
    before the kernels; quantizing such a layer failed ("padding ... must be <= dilation *
    (kernel_size - 1)")."""
    torch.manual_seed(3)
    f = conv()
    x = torch.randn(2, 4, *([9] if isinstance(f, nn.Conv1d) else [9, 8]))
    if kind == "static":
        kw = {"input_qparams": _static_qparams(x)}
        cfg = STATIC
    else:
        kw, cfg = {}, {"dynamic": DYN, "int4": QuantizationConfig.int4_weight_only(
            group_size=4), "int8wo": INT8_WO}[kind]
    q = convert_module(f, cfg, name="c", **kw)
    ref = convert_module(f, cfg, name="c", backend="reference", **kw)
    want = f(x).detach()
    y = q(x)
    assert q.geometry["pre_pad"] is not None and y.shape == want.shape
    if kind in ("dynamic", "static"):
        assert torch.equal(y, ref(x))
    assert _cos(y, want) > (0.99 if kind == "int4" else 0.999)


@pytest.mark.parametrize("cin,groups", [(1, 1), (16, 1), (32, 1), (8, 8)])
def test_conv2d_kernels_by_k_equal_reference(cin: int, groups: int) -> None:
    # K = 9 and 72 (depthwise): fp32 conv on codes; K = 288: im2col + INT8 GEMM
    torch.manual_seed(11)
    conv = nn.Conv2d(cin, 8, 3, padding=1, groups=groups)
    x = torch.randn(17, cin, 10, 10)
    big = torch.randn(2, cin, 64, 64)  # M = 8,192 rows: past the direct codes conv (if any)
    for cfg, kw in ((DYN, {}), (STATIC, {"input_qparams": _static_qparams(x)})):
        q = convert_module(conv, cfg, **kw)
        ref = convert_module(conv, cfg, backend="reference", **kw)
        for xx in (x, big):
            assert torch.equal(q(xx), ref(xx)) and q(xx).is_contiguous()
        k = cin // groups * 9
        expect = select_kernel("int8_conv2d", 1 << 40, k=k, n=8, groups=groups)
        assert (expect == "fp32_codes_conv") == (k <= 258) or k == 144  # 144: VNNI -> GEMM
        if expect != "fp32_codes_conv" and q._conv_kernel(1) == "fp32_codes_conv":  # C kernels
            limit = CODES_DIRECT_MAX_MACS // (8 * k)  # small calls: the direct codes conv
            expect = {f"M<={limit}": "fp32_codes_conv", f"M>{limit}": expect}
            assert q._conv_kernel(limit) == "fp32_codes_conv" != q._conv_kernel(limit + 1)
        elif expect != (small := select_kernel("int8_conv2d", 1, k=k, n=8, groups=groups)):
            limit = VNNI_S8_MAX_MACS // (8 * k)  # avx512_vnni: its C GEMM, then _int_mm
            expect = {f"M<={limit}": small, f"M>{limit}": expect}
        assert q.kernel_info() == q.meta()["kernel"] == expect


@pytest.mark.parametrize("cin", [1, 8])  # K = 9: fp32 conv over codes; K = 72: im2col GEMM
def test_conv2d_weight_caches_follow_load_state_dict(cin: int) -> None:
    """Both weight caches (the codes of "fp32_codes_conv", the im2col matrix of the GEMM) are
    rebuilt when the state dict changes: a small and a large input reach both for K = 72."""
    torch.manual_seed(12)
    a, b = nn.Conv2d(cin, 4, 3), nn.Conv2d(cin, 4, 3)
    xs = [torch.randn(2, cin, 6, 6), torch.randn(2, cin, 70, 70)]  # 9,800 rows: past the
    qa, qb = convert_module(a, DYN), convert_module(b, DYN)  # direct codes conv's limit
    if cin == 8 and int8_gemm() != "fp32_codes":  # an integer GEMM on this CPU / ISA path
        assert qa._conv_kernel(9800) == select_kernel("int8_conv2d", 1, k=72) != "fp32_codes_conv"
    ys = [qa(x) for x in xs]  # fills the weight caches of their kernels
    qa.load_state_dict(qb.state_dict())
    for x, y in zip(xs, ys, strict=True):
        assert torch.equal(qa(x), qb(x)) and not torch.equal(qa(x), y)
    assert not {"_codes_cache", "_cols_cache"} & set(qa.state_dict())


@pytest.mark.parametrize("strict", [True, False])
@pytest.mark.parametrize("mode", ["dynamic", "int4", "int8_weight_only", "lstm"])
def test_a_float_state_dict_is_refused_not_cast_into_codes(mode: str, strict: bool) -> None:
    """``load_state_dict(float_model.state_dict(), strict=False)`` cast the float weights into
    the int8 codes (truncated: outputs off by the whole signal) and returned without a word;
    now every integer buffer refuses another dtype, names the layer, and keeps its codes."""
    from lowbit.ptq import quantize_dynamic, quantize_weight_only

    torch.manual_seed(0)
    float_model = nn.LSTM(8, 8) if mode == "lstm" else nn.Sequential(nn.Linear(64, 32)).eval()
    q = (quantize_dynamic(float_model) if mode in ("dynamic", "lstm") else
         quantize_weight_only(float_model, bits=4 if mode == "int4" else 8, group_size=32))
    x = torch.randn(3, 8) if mode == "lstm" else torch.randn(3, 64)
    def run() -> torch.Tensor:
        return q(x)[0] if mode == "lstm" else q(x)  # (an LSTM returns output, (h, c))

    y = run()
    codes = {n: t.clone() for n, t in q.state_dict().items() if not t.is_floating_point()}
    with pytest.raises(RuntimeError, match=r"weight\S*: .* holds torch\.u?int8 codes here, the "
                                           r"state dict a torch\.float32 tensor.*lowbit\.load"):
        q.load_state_dict(float_model.state_dict(), strict=strict)
    assert all(torch.equal(q.state_dict()[n], t) for n, t in codes.items())
    assert torch.equal(run(), y)
    q.load_state_dict(q.state_dict())  # the same dtypes: loads as before


def test_another_schemes_state_dict_is_named_as_such() -> None:
    from lowbit.ptq import quantize_dynamic, quantize_weight_only

    model = nn.Sequential(nn.Linear(64, 32)).eval()
    q = quantize_dynamic(model)
    with pytest.raises(RuntimeError, match=r"holds torch\.int8 codes here, the state dict a "
                                           r"torch\.uint8 tensor \(a model quantized with "
                                           r"another scheme\?\)"):
        q.load_state_dict(quantize_weight_only(model, bits=4, group_size=32).state_dict())


def test_first_calls_from_several_threads_rebuild_the_caches_once(monkeypatch) -> None:
    """A served model's first calls can come from several threads at once, and each layer
    rebuilds its kernel caches on its first call: one thread does it (made slow here) while
    the others wait for it, rather than running on caches another thread is rebuilding
    (before the lock: MnistCNN static outputs off by up to 0.58 on cold concurrent calls)."""
    import threading
    import time

    torch.manual_seed(13)
    fc = nn.Linear(32, 16)
    x = torch.randn(4, 32) * 3 + 1
    cfg = dataclasses.replace(QuantizationConfig.int8_static(),  # asymmetric weights: the
                              weights=QuantSpec.int8_weight().with_(symmetric=False))  # body
    qparams = (torch.tensor(0.05), torch.tensor(-20))
    expected = convert_module(fc, cfg, input_qparams=qparams)(x)
    q = convert_module(fc, cfg, input_qparams=qparams)
    refresh, rebuilds = type(q)._refresh_cache, []

    def slow_refresh(self) -> None:
        rebuilds.append(threading.current_thread().name)
        time.sleep(0.1)
        refresh(self)

    monkeypatch.setattr(type(q), "_refresh_cache", slow_refresh)
    start, outs = threading.Barrier(4), []

    def call() -> None:
        start.wait()
        outs.append(q(x))

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(rebuilds) == 1 and len(outs) == 4
    assert all(torch.equal(y, expected) for y in outs)


@pytest.mark.parametrize("kind", ["dynamic", "static_conv", "int4", "gru"])
def test_torchscript_is_refused_with_what_to_use_instead(kind: str, tmp_path) -> None:
    """torch.jit.trace records tensor ops only: a C call left an empty output in the graph
    (INT4: outputs of 1e37), other layers failed inside the tracer. trace, script and the
    TorchScript ONNX exporter now stop at the layer, saying what to use instead."""
    torch.manual_seed(14)
    if kind == "static_conv":
        x = torch.randn(2, 3, 8, 8)
        layer = convert_module(nn.Conv2d(3, 4, 3), QuantizationConfig.int8_static(), name="c",
                               input_qparams=(torch.tensor(0.03), torch.tensor(0)))
    elif kind == "gru":
        x = torch.randn(5, 2, 8)
        layer = convert_module(nn.GRU(8, 8), DYN, name="c")
        assert not hasattr(layer, "qweight")  # (several weights; was a KeyError)
    else:
        x = torch.randn(2, 16)
        cfg = DYN if kind == "dynamic" else QuantizationConfig.int4_weight_only(group_size=16)
        layer = convert_module(nn.Linear(16, 8), cfg, name="c")
    model = nn.Sequential(layer).eval()
    with pytest.raises(RuntimeError, match=r"c \(\w+\): torch.jit.trace cannot record .*"
                                           r"torch.export.export \+ AOTInductor"):
        torch.jit.trace(model, x, check_trace=False)
    with pytest.raises(RuntimeError, match=r"c \(\w+\): torch.jit.script cannot compile"):
        torch.jit.script(model)
    with pytest.raises(Exception, match=r"lowbit.export_onnx"):
        torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=False)
    out = model(x)  # eager still runs
    assert (out[0] if kind == "gru" else out).shape[0] == x.shape[0]


def test_conv1d() -> None:
    conv = nn.Conv1d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(2, 3, 11)
    q = convert_module(conv, DYN)
    assert isinstance(q, QuantizedConv1d) and q.qweight.shape == (5, 3, 3)
    assert _cos(q(x), conv(x).detach()) > 0.999
    assert q.kernel_info() == "fp32_codes_conv"
    assert torch.equal(q(x), convert_module(conv, DYN, backend="reference")(x))
    wo = convert_module(conv, QuantizationConfig.int4_weight_only(group_size=9))
    assert _cos(wo(x), conv(x).detach()) > 0.98


def test_bf16_input_dtype_preserved() -> None:
    fc = _linear(32, 16)
    x = torch.randn(3, 32, dtype=torch.bfloat16)
    for kind in KINDS:
        assert _make(kind, fc, x.float())(x).dtype == torch.bfloat16


def test_nan_weights_error_names_layer() -> None:
    fc = _linear(8, 4)
    with torch.no_grad():
        fc.weight[0, 0] = float("nan")
    for cfg in (DYN, INT4):
        with pytest.raises(ValueError, match=r"encoder\.fc.*layer_overrides"):
            convert_module(fc, cfg, name="encoder.fc")


def test_shape_mismatch_error_names_layer() -> None:
    q = QuantizedLinear.from_float(_linear(8, 4), DYN, name="head")
    with pytest.raises(ValueError, match=r"head.*in_features=8"):
        q(torch.randn(2, 9))
    q4 = Int4Linear.from_float(_linear(64, 16), INT4, name="proj")
    with pytest.raises(ValueError, match=r"proj.*in_features=64"):
        q4(torch.randn(2, 63))


def test_check_supported_and_dispatch() -> None:
    assert "weight_only" in check_supported(nn.Embedding(4, 4), DYN)
    assert check_supported(nn.ReLU(), DYN) is not None
    assert check_supported(nn.Linear(4, 4), DYN) is None
    grouped = QuantizationConfig(weights=QuantSpec(bits=8, granularity="per_group", group_size=2))
    assert "per_group" in check_supported(nn.Linear(4, 4), grouped)
    with pytest.raises(ValueError, match="emb"):
        convert_module(nn.Embedding(4, 4), DYN, name="emb")
    assert isinstance(convert_module(nn.Linear(8, 4), INT8_WO), Int8WeightOnlyLinear)
    assert isinstance(convert_module(nn.Conv2d(2, 2, 1), INT4), WeightOnlyConv2d)
    with pytest.raises(ValueError, match="input_qparams"):
        convert_module(nn.Linear(8, 4), STATIC, name="fc")


def test_embedding_int8_per_row_matches_dequantize() -> None:
    emb = nn.Embedding(30, 10, padding_idx=0)
    q = convert_module(emb, EMB_WO)
    idx = torch.randint(0, 30, (4, 7))
    assert torch.equal(q(idx), q.dequantize_weight()[idx])
    assert _cos(q(idx), emb(idx).detach()) > 0.999


def _cfg(weights: QuantSpec, acts: QuantSpec | None = None, mode: str = "dynamic"
         ) -> QuantizationConfig:
    return QuantizationConfig(weights=weights, mode=mode,
                              activations=acts or QuantSpec.int8_dynamic_activation())


AFFINE_W = [QuantSpec(bits=8, symmetric=False, granularity="per_tensor"),
            QuantSpec(bits=8, symmetric=False, granularity="per_channel")]


@pytest.mark.parametrize("wspec", AFFINE_W, ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_linear_affine_weights(wspec: QuantSpec, mode: str) -> None:
    torch.manual_seed(8)
    fc = nn.Linear(96, 40)
    with torch.no_grad():
        fc.weight.add_(0.05 * torch.rand(40, 1))  # one-sided rows -> non-zero zero-points
    x = torch.randn(5, 96) + 0.5
    acts = QuantSpec.int8_static_activation() if mode == "static" else None
    cfg = _cfg(wspec, acts, mode)
    kw = {"input_qparams": _static_qparams(x)} if mode == "static" else {}
    q = convert_module(fc, cfg, **kw)
    ref = convert_module(fc, cfg, backend="reference", **kw)
    assert check_supported(fc, cfg) is None and bool(q.weight_zero_point.ne(0).any())
    y = q(x)
    assert torch.equal(y, ref(x))
    # exact integer accumulator with the weight zero-point: int64 maths
    if mode == "static":
        from lowbit.ops import quantize
        s_x, zp_x = kw["input_qparams"]
        qx = quantize(x, s_x, zp_x, cfg.activations).long() - int(zp_x)
        s_x = s_x.reshape(1, 1)
    else:
        s_x = x.abs().amax(1, keepdim=True) / 127
        qx = torch.round(x / s_x).long()
    qw = q.qweight.long() - q.weight_zero_point.long().reshape(-1, 1)
    expected = (qx @ qw.t()).float() * s_x * q.weight_scale + q.bias
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-4)
    assert _cos(y, fc(x).detach()) > 0.999
    # round trip through the state dict rebuilds the zero-point caches
    r = module_from_meta(q.meta())
    r.load_state_dict(q.state_dict())
    assert torch.equal(r(x), y)


@pytest.mark.parametrize("wspec", AFFINE_W, ids=["per_tensor", "per_channel"])
@pytest.mark.parametrize("mode", ["dynamic", "static"])
def test_conv2d_affine_weights(wspec: QuantSpec, mode: str) -> None:
    torch.manual_seed(9)
    conv = nn.Conv2d(4, 6, 3, padding=1)
    with torch.no_grad():
        conv.weight.add_(0.1)
    x = torch.randn(2, 4, 9, 9)
    acts = QuantSpec.int8_static_activation() if mode == "static" else None
    cfg = _cfg(wspec, acts, mode)
    kw = {"input_qparams": _static_qparams(x)} if mode == "static" else {}
    q = convert_module(conv, cfg, **kw)
    assert bool(q.weight_zero_point.ne(0).any())
    y = q(x)
    assert torch.equal(y, convert_module(conv, cfg, backend="reference", **kw)(x))
    assert _cos(y, conv(x).detach()) > 0.999
    q1 = convert_module(nn.Conv1d(4, 6, 3), cfg, **kw) if mode == "dynamic" else None
    if q1 is not None:
        assert q1(torch.randn(2, 4, 10)).shape == (2, 6, 8)


def test_unsigned_weights_are_refused_with_a_fix() -> None:
    cfg = _cfg(QuantSpec(bits=8, signed=False, symmetric=False, granularity="per_channel"))
    assert "signed" in check_supported(nn.Linear(4, 4), cfg)


@pytest.mark.parametrize("wbits,abits,asigned,asym", [
    (4, 8, True, True), (8, 4, True, True), (4, 4, True, True), (8, 4, False, False),
    (6, 8, False, True), (8, 5, True, False)])
@pytest.mark.parametrize("wsym", [True, False])
def test_fewer_bits_run_as_int8_codes(wbits: int, abits: int, asigned: bool, asym: bool,
                                      wsym: bool) -> None:
    torch.manual_seed(10)
    fc = nn.Linear(64, 32)
    x = torch.randn(6, 64) + 0.3
    wspec = QuantSpec(bits=wbits, symmetric=wsym, granularity="per_channel")
    aspec = QuantSpec(bits=abits, signed=asigned, symmetric=asym, granularity="per_token")
    q = convert_module(fc, _cfg(wspec, aspec))
    assert q.qweight.dtype == torch.int8
    assert int(q.qweight.min()) >= wspec.qmin and int(q.qweight.max()) <= wspec.qmax
    y = q(x)
    assert torch.equal(y, convert_module(fc, _cfg(wspec, aspec), backend="reference")(x))
    # same as fake-quantizing both operands with lowbit.ops in float64
    from lowbit.ops import choose_qparams, compute_range, quantize
    s_x, zp_x = choose_qparams(*compute_range(x, aspec), aspec)
    qx = quantize(x, s_x, zp_x, aspec).double() - zp_x.double()
    qw = q.qweight.double() - q.weight_zero_point.double()[:, None]
    expected = (qx @ qw.t()) * s_x.double() * q.weight_scale.double() + q.bias.double()
    torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-4)
    bits = min(wbits, abits)
    assert _cos(y, fc(x).detach()) > {4: 0.97, 5: 0.99, 6: 0.995, 8: 0.999}[bits]


@pytest.mark.parametrize("kind", [*KINDS, "conv_dynamic", "conv_static", "conv_int4"])
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_input_requiring_grad_gives_same_output_and_a_gradient(kind: str, backend: str) -> None:
    # an input that requires grad (a float layer or a LoRA adapter before the layer, sensitivity
    # analysis) gives bit-identical outputs and a gradient w.r.t. the input (lowbit.qgrad);
    # the integer weights never get one
    torch.manual_seed(9)
    if kind.startswith("conv"):
        float_layer: nn.Module = nn.Conv2d(4, 16, 3, padding=1)
        x = torch.randn(2, 4, 6, 6)
        cfg = {"conv_dynamic": DYN, "conv_static": STATIC, "conv_int4": INT4}[kind]
        kw = {"input_qparams": _static_qparams(x)} if kind == "conv_static" else {}
        q = convert_module(float_layer, cfg, backend=backend, **kw)
    else:
        float_layer = _linear(64, 48)
        x = torch.randn(5, 64)
        q = _make(kind, float_layer, x, backend=backend)
    expected = q(x)
    assert not expected.requires_grad
    xg = x.clone().requires_grad_()
    y = q(xg)
    assert torch.equal(y, expected) and y.requires_grad
    head = nn.Linear(y.shape[-1], 2)  # float layers after a quantized one still train
    head(y).sum().backward()
    assert head.weight.grad is not None
    assert xg.grad is not None and torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0
    assert all(not t.requires_grad for t in q.state_dict().values())


def test_quantized_model_with_float_first_layer_runs_with_grad() -> None:
    import lowbit

    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    cfg = QuantizationConfig.int8_dynamic(layer_overrides={"0": None})
    q = lowbit.quantize_dynamic(model, cfg)
    assert isinstance(q[2], QuantizedLinear) and q[0].weight.requires_grad
    assert q(torch.randn(3, 8)).shape == (3, 4)


@pytest.mark.parametrize("n", [10, 17, 40])
@pytest.mark.parametrize("spec", [QuantSpec.int4_weight(32),
                                  QuantSpec(bits=4, signed=False, symmetric=False,
                                            granularity="per_group", group_size=64)])
def test_int4_out_features_not_multiple_of_16_use_packed_kernel(n: int, spec: QuantSpec,
                                                                 forced_isa,
                                                                 monkeypatch) -> None:
    # PyTorch's packed op up to INT4_PACKED_MAX_M rows, as on a CPU with AVX512-BF16 (the C ISA
    # paths run lowbit's own INT4 kernel at small M, and CPUs without BF16 dequantize above)
    forced_isa("torch")
    monkeypatch.setattr(kernel_select, "INT4_PACKED_MAX_M_NO_BF16", INT4_PACKED_MAX_M)
    fc = _linear(128, n)
    cfg = QuantizationConfig(weights=spec, activations=None, mode="weight_only")
    q = convert_module(fc, cfg, name="head")
    ref = convert_module(fc, cfg, backend="reference")
    assert "int4pack_bf16" in q.meta()["kernel"].values()
    assert tuple(q.qweight.shape) == (n, 64) and q._packed is None  # built on first use
    for m in (1, 5, 40):
        x = torch.randn(m, 128)
        y = q(x)
        assert y.shape == (m, n) and y.is_contiguous()
        assert _cos(y, ref(x)) > 0.9999 and _cos(y, fc(x).detach()) > 0.99
    assert q._packed is not None  # (40 rows: the packed op; fewer: the small C kernel)
    # the padded cache is not persistent: state dict and a round trip are unchanged
    r = module_from_meta(q.meta())
    r.load_state_dict(q.state_dict())
    assert set(q.state_dict()) == {"weight", "weight_scale", "weight_zero_point", "bias"}
    x = torch.randn(3, 128)
    assert torch.equal(r(x), q(x))


def test_int8_weight_only_k_not_multiple_of_8_uses_packed_kernel() -> None:
    fc = _linear(67, 100)  # (N = 100: few rows run the one-call C path, more the packed op)
    q, ref = convert_module(fc, INT8_WO), convert_module(fc, INT8_WO, backend="reference")
    assert (q.meta()["kernel"][f"M<={WEIGHT_ONLY_PACKED_MAX_M}"] == "int8pack_bf16"
            and tuple(q.qweight.shape) == (100, 67))
    for m in (1, 5, WEIGHT_ONLY_PACKED_MAX_M):  # K = 67 -> 80 in the cache (the op crashes on
        # K = 72 from M = 2 on)
        x = torch.randn(m, 67)
        assert _cos(q(x), ref(x)) > 0.9999
    assert set(q.state_dict()) == {"weight", "weight_scale", "weight_zero_point", "bias"}


@pytest.mark.parametrize("kind", ["linear", "conv", "int4"])
def test_kernel_caches_follow_in_place_weight_changes(kind: str) -> None:
    """``layer.weight.zero_()`` on a quantized layer changes its output at once (a conv's im2col
    / codes caches, the packed GEMM weights and the column sums all derive from the weight)."""
    torch.manual_seed(4)
    if kind == "conv":
        float_layer, x = nn.Conv2d(8, 16, 3), torch.randn(2, 8, 12, 12)
        cfg = DYN
    else:
        float_layer, x = nn.Linear(64, 32), torch.randn(5, 64)
        cfg = DYN if kind == "linear" else QuantizationConfig.int4_weight_only(32)
    q = convert_module(float_layer, cfg)
    before = q(x)
    with torch.no_grad():
        q.qweight.zero_()  # int8 codes 0; int4: both nibbles 0, the code 0
        if kind == "int4":
            q.weight_zero_point.zero_()  # (read again with the weight's caches)
    after = q(x)
    assert not torch.equal(before, after)
    bias = q.bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    torch.testing.assert_close(after, bias.expand_as(after), rtol=0, atol=1e-6)


# ------------------------------------------ refusing what the float layer refuses; NaN / Inf


def _conv(kind: str, dims: int = 2, padding: int = 0) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """``(float conv, quantized conv, batch of 3)`` for kind dynamic / static / int4 / int8wo."""
    torch.manual_seed(3)
    conv = (nn.Conv1d if dims == 1 else nn.Conv2d)(4, 8, 3, padding=padding)
    x = torch.randn(3, 4, *([9] * dims))
    cfg = {"dynamic": DYN, "static": STATIC, "int4": QuantizationConfig.int4_weight_only(
        group_size=4), "int8wo": INT8_WO}[kind]
    kw = {"input_qparams": _static_qparams(x)} if kind == "static" else {}
    return conv, convert_module(conv, cfg, name="conv", **kw), x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool, torch.complex64])
def test_non_float_inputs_are_a_type_error_naming_the_layer(kind: str, dtype) -> None:
    fc = _linear(16, 8)
    q = _make(kind, fc, torch.randn(4, 16))
    x = torch.ones(2, 16, dtype=dtype)
    with pytest.raises((RuntimeError, TypeError)):
        fc(x)  # the float layer refuses them as well
    with pytest.raises(TypeError, match=r"fc \(\w+\): expected a floating-point.*x\.float\(\)"):
        q(x)
    with pytest.raises(TypeError, match=r"expected a torch\.Tensor"):
        q([[1.0] * 16])


@pytest.mark.parametrize("kind", KINDS)
def test_float16_float64_bfloat16_inputs_keep_their_dtype(kind: str) -> None:
    fc = _linear(16, 8)
    x = torch.randn(3, 16)
    q = _make(kind, fc, x)
    y32 = q(x)
    for dtype in (torch.float16, torch.float64, torch.bfloat16):
        y = q(x.to(dtype))
        assert y.dtype == dtype and y.shape == (3, 8)
        assert _cos(y.float(), y32) > 0.999


@pytest.mark.parametrize("kind", [*KINDS, "int4_f32_act"])
def test_module_dtype_cast_keeps_quantization_parameters_in_float32(kind: str) -> None:
    """``.to(torch.bfloat16)`` / ``.half()`` / ``.double()`` change the dtype a layer presents
    (``weight.dtype``, which model code casts inputs to), not its scales or bias: rounding
    them to bf16 moved outputs by up to 0.4% of a channel's scale (and, for INT4, a bf16 bias
    read as float32 by the C kernels gave NaN). The outputs stay bit-identical."""
    x = torch.randn(40, 67)  # 40 rows: past the one-call small kernels, the GEMM paths too
    q = _make("int4" if kind == "int4_f32_act" else kind, _linear(67, 48), x)
    if kind == "int4_f32_act":
        q.int8_activations = False
    stored = {k: v.clone() for k, v in q.state_dict().items()}
    want = {dt: q(x.to(dt)) for dt in (torch.float32, torch.bfloat16, torch.float16,
                                        torch.float64)}
    for dt, cast in ((torch.bfloat16, lambda m: m.to(torch.bfloat16)),
                     (torch.float16, lambda m: m.half()), (torch.float64, lambda m: m.double())):
        cast(q)
        assert q.weight.dtype == dt and q.orig_dtype == str(dt)[6:]
        for k, v in q.state_dict().items():
            assert v.dtype == stored[k].dtype and torch.equal(v, stored[k]), (dt, k)
        y = q(x.to(dt))
        assert y.dtype == dt and torch.equal(y, want[dt]), dt
    q.float()
    assert q.weight.dtype == torch.float32 and torch.equal(q(x), want[torch.float32])


def test_meta_inputs_and_device_mismatch_say_where_things_live() -> None:
    q = _make("dynamic", _linear(16, 8), torch.randn(2, 16))
    with pytest.raises(RuntimeError, match=r"fc \(\w+\): input is on meta.*on cpu.*x\.to"):
        q(torch.randn(2, 16, device="meta"))


@pytest.mark.parametrize("kind", ["dynamic", "static", "int4", "int8wo"])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_input_smaller_than_the_kernel_is_refused_like_float(kind: str, dims: int) -> None:
    conv, q, _ = _conv(kind, dims)
    small = torch.randn(1, 4, *([2] * dims))
    with pytest.raises(RuntimeError):
        conv(small)
    with pytest.raises(RuntimeError, match=r"conv \(\w+\): padded input size .* smaller than "
                                           r"the kernel extent \[3"):
        q(small)
    with pytest.raises(RuntimeError, match="expected a"):
        q(torch.randn(1, 4, 1, *([9] * dims)))  # one dimension too many


@pytest.mark.parametrize("kind", ["dynamic", "static", "int4", "int8wo"])
@pytest.mark.parametrize("dims", [1, 2])
def test_conv_unbatched_input_equals_a_batch_of_one(kind: str, dims: int) -> None:
    conv, q, x = _conv(kind, dims, padding=1)
    y = q(x[0])
    assert y.shape == conv(x[0]).shape
    torch.testing.assert_close(y, q(x[:1])[0], rtol=0, atol=1e-6)


def test_fused_maxpool_window_larger_than_the_conv_output_is_refused() -> None:
    import lowbit
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.MaxPool2d(4)).eval()
    x = torch.randn(2, 1, 10, 10)
    q = lowbit.quantize_static(net, [x], progress=False)
    assert q[0].geometry.get("fused_maxpool") == 4  # the pool was fused into the conv
    with pytest.raises(RuntimeError):
        net(torch.randn(1, 1, 5, 5))
    with pytest.raises(RuntimeError, match="max-pool window 4"):
        q(torch.randn(1, 1, 5, 5))


def _bad_sample(x: torch.Tensor, value: float) -> torch.Tensor:
    x = x.clone()
    x.view(x.shape[0], -1)[1, 3] = value
    return x


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_a_nonfinite_sample_gives_a_nonfinite_row_and_leaves_the_others(kind: str,
                                                                        value: float) -> None:
    fc = _linear(16, 8)
    x = torch.randn(3, 16)
    q = _make(kind, fc, x)
    clean = q(x[[0, 2]])
    with pytest.warns(RuntimeWarning, match=r"fc \(\w+\): 1 of 3 input row") if kind in (
            "static", "dynamic_pt") else _no_warning():
        y = q(_bad_sample(x, value))
    assert not torch.isfinite(y[1]).all()  # the float layer gives NaN / +-Inf there too
    assert not torch.isfinite(fc(_bad_sample(x, value))[1]).all()
    if kind in ("dynamic", "static", "dynamic_pt"):
        assert torch.equal(y[[0, 2]], clean)  # per-row scales, or the bad row left out
    else:
        torch.testing.assert_close(y[[0, 2]], clean)  # weight-only: rows are independent


@pytest.mark.parametrize("kind", ["dynamic", "static", "int4", "int8wo"])
def test_a_nonfinite_sample_of_a_conv_batch_leaves_the_others(kind: str) -> None:
    _, q, x = _conv(kind, 2, padding=1)
    clean = q(x[[0, 2]])
    with pytest.warns(RuntimeWarning, match=r"conv \(\w+\): 1 of 3") if kind in (
            "dynamic", "static") else _no_warning():
        y = q(_bad_sample(x, float("inf")))
    assert torch.isnan(y[1]).any() or torch.isinf(y[1]).any()
    torch.testing.assert_close(y[[0, 2]], clean, rtol=0, atol=0)


def test_the_nonfinite_warning_comes_once_per_layer() -> None:
    import warnings
    q = _make("static", _linear(16, 8), torch.randn(4, 16))
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(3):
            q(_bad_sample(torch.randn(3, 16), float("nan")))
    assert len([w for w in seen if issubclass(w.category, RuntimeWarning)]) == 1


def test_relu_fused_layers_keep_nan_like_torch_relu() -> None:
    fc = _linear(16, 8)
    x = torch.randn(4, 16)
    q = QuantizedLinear.from_float(fc, DYN, name="fc", fused_relu=True)
    y = q(_bad_sample(x, float("nan")))
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2, 3]]).all()
    assert (y[[0, 2, 3]] >= 0).all()


def test_embedding_empty_batches_for_int8_and_int4() -> None:
    torch.manual_seed(0)
    emb = nn.Embedding(10, 8)
    int4 = QuantizationConfig.int4_weight_only(group_size=8, quantize_embeddings=True)
    for cfg in (EMB_WO, int4):
        q = convert_module(emb, cfg, name="emb")
        for shape in ((0,), (0, 3), (2, 0)):
            idx = torch.zeros(shape, dtype=torch.long)
            assert q(idx).shape == emb(idx).shape == (*shape, 8)
        for dtype in (torch.uint8, torch.bool):  # refused as torch refuses them, empty or not
            with pytest.raises(RuntimeError, match="indices"):
                q(torch.zeros(0, dtype=dtype))


class _no_warning:
    """Context manager: fails when a RuntimeWarning is raised inside."""

    def __enter__(self) -> None:
        import warnings
        self._cm = warnings.catch_warnings()
        self._cm.__enter__()
        warnings.simplefilter("error", RuntimeWarning)

    def __exit__(self, *exc: object) -> None:
        self._cm.__exit__(*exc)


@pytest.mark.parametrize("isa", ["auto", "avx2", "avx512_vnni", "amx", "portable", "torch"])
def test_dynamic_per_tensor_affine_runs_the_fused_gemm_bit_exactly(isa: str, forced_isa) -> None:
    """``int8_dynamic(per_token=False, symmetric=False)`` (ONNX's DynamicQuantizeLinear
    scheme): the fused C path computes the qparams per call, with the reference's bits."""
    from lowbit import native

    if isa != "auto":
        if isa in native.isa_paths() and native.isa_paths()[isa] != "available":
            pytest.skip(f"this CPU cannot run the {isa} path ({native.isa_paths()[isa]})")
        forced_isa(isa)
    cfg = QuantizationConfig.int8_dynamic(per_token=False, symmetric=False)
    torch.manual_seed(3)
    for k, n in [(37, 5), (384, 96), (1100, 64)]:
        fc = nn.Linear(k, n)
        q = convert_module(fc, cfg, fused_relu=True)
        ref = convert_module(fc, cfg, fused_relu=True, backend="reference")
        assert q._fused_args is not None or isa == "torch" or native.load_native() is None
        for rows in (0, 1, 2, 3, 7, 40, 130):
            for dtype in (torch.float32, torch.bfloat16):
                x = ((torch.randn(rows, k) + 0.7) * 3).to(dtype)
                assert torch.equal(q(x), ref(x)), (k, n, rows, dtype)
        x = torch.randn(4, 3, k)  # 3-D: one scale for the whole tensor
        assert torch.equal(q(x), ref(x))
        x[1, 2, 0] = float("nan")  # a NaN row gives NaN there, the others as if it were absent
        with pytest.warns(RuntimeWarning, match="NaN/Inf"):
            y = q(x)
        assert torch.isnan(y[1, 2]).all() and not torch.isnan(y[0]).any()
        x[1, 2] = 0.0  # (the bad row is left out of the range: as if it were zeros)
        assert torch.equal(y[0], q(x)[0])
    for conv in (nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(40, 24, 3)):  # convs: the same
        qc = convert_module(conv, cfg, fused_relu=True)  # scheme, per tensor (direct conv
        rc = convert_module(conv, cfg, fused_relu=True, backend="reference")  # and GEMM)
        for batch in (1, 5):
            x = torch.randn(batch, conv.in_channels, 9, 9) + 0.5
            assert torch.equal(qc(x), rc(x))
            assert _cos(qc(x), conv(x).relu().detach()) > 0.999


def test_static_bias_changed_in_place_is_used() -> None:
    """The int32 bias a static layer adds is derived from ``bias``: an in-place change of the
    bias (e.g. a bias correction) reaches the kernels, prepared calls included."""
    fc = _linear(16, 8)
    x = torch.randn(1, 16)
    scale, zp = _static_qparams(torch.randn(64, 16))
    q = QuantizedLinear.from_float(fc, STATIC, input_qparams=(scale, zp))
    y = q(x)
    q(x)  # (a prepared call now)
    with torch.no_grad():
        q.bias.add_(1.0)
    assert torch.allclose(q(x), y + 1.0, atol=float(scale * q.weight_scale.max()))


@pytest.mark.parametrize("kind", ["dynamic", "static", "int4", "int8wo", "conv_static",
                                  "conv_int4"])
def test_qparams_changed_in_place_are_used(kind: str) -> None:
    """Scales, zero-points and input qparams changed in place (``layer.input_scale.mul_(2)``,
    or through the tensors ``state_dict()`` returns) reach the kernel caches and prepared calls
    at the next call, as assigning new tensors or ``load_state_dict`` does (the caches had
    kept the old zero-points and the int32 bias of the old scale)."""
    torch.manual_seed(5)
    conv = kind.startswith("conv")
    layer, x = ((nn.Conv2d(4, 8, 3), torch.randn(2, 4, 7, 7)) if conv
                else (_linear(40, 24), torch.randn(5, 40)))
    cfg = {"dynamic": DYN, "static": STATIC, "int4": QuantizationConfig.int4_weight_only(8),
           "int8wo": INT8_WO}[kind.removeprefix("conv_")]
    kw = ({"input_qparams": _static_qparams(x)} if "static" in kind else {})
    names = [n for n in ("weight_scale", "weight_zero_point", "input_scale", "input_zero_point")
             if n in convert_module(layer, cfg, **kw)._buffers]
    for name in names:
        q = convert_module(layer, cfg, **kw)
        q(x)
        q(x)  # (a prepared call now, where the layer has one)
        t = q.state_dict()[name]
        with torch.no_grad():
            t.copy_(t * 2 if t.is_floating_point() else t + 1)
        fresh = convert_module(layer, cfg, **kw)
        fresh.load_state_dict(q.state_dict())
        assert torch.equal(q(x), fresh(x)), name
        assert not torch.equal(q(x), convert_module(layer, cfg, **kw)(x)), name


@pytest.mark.parametrize("kind", ["dynamic", "static", "int4", "conv_static", "conv_int4"])
def test_buffers_whose_memory_moves_are_never_read_at_the_old_address(kind: str) -> None:
    """``share_memory_()`` (what torch.multiprocessing does to tensors it sends) moves a buffer
    to new memory without a new version: prepared calls had kept the old address (read after
    free: outputs off by 1e14). They bind their own copies of the small vectors now."""
    torch.manual_seed(7)
    conv = kind.startswith("conv")
    layer, x = ((nn.Conv2d(8, 16, 3, padding=1), torch.randn(2, 8, 6, 6)) if conv
                else (_linear(64, 48), torch.randn(4, 64)))
    cfg = {"dynamic": DYN, "static": STATIC,
           "int4": QuantizationConfig.int4_weight_only(32)}[kind.removeprefix("conv_")]
    q = convert_module(layer, cfg, **({"input_qparams": _static_qparams(x)}
                                      if "static" in kind else {}))
    with torch.no_grad():
        expected = q(x)
        q(x)  # (a prepared call now, where the layer has one)
        for name in ("weight_scale", "bias", "input_scale", "input_zero_point"):
            if q._buffers.get(name) is not None:
                q._buffers[name].share_memory_()
        junk = [torch.full((1 << 14,), 1e30) for _ in range(64)]  # (reuses freed memory)
        assert torch.equal(q(x), expected)
    del junk


def test_weight_only_dequantized_weight_follows_an_assigned_scale() -> None:
    """``dequantize_weight()`` / ``layer.weight`` read before any call after a new scale was
    assigned had returned the old weight (its C arguments were rebuilt at the next call)."""
    q = convert_module(_linear(64, 32), QuantizationConfig.int4_weight_only(32))
    q(torch.randn(2, 64))
    before = q.dequantize_weight()
    q.weight_scale = q.weight_scale * 2
    torch.testing.assert_close(q.dequantize_weight(), before * 2)
    torch.testing.assert_close(q.weight.float(), before * 2)


def test_parametrized_quantized_layers_are_refused() -> None:
    """weight_norm on a quantized layer removed its codes buffer, and a parametrization of
    weight_scale moved the buffer: the kernels kept running on the old caches, ignoring both."""
    import torch.nn.utils.parametrize as parametrize

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 2

    x = torch.randn(4, 64)
    q = convert_module(_linear(64, 48), DYN)
    q(x)
    parametrize.register_parametrization(q, "weight_scale", Double())
    with pytest.raises(RuntimeError, match="parametrized"):
        q(x)
    q = convert_module(_linear(64, 48), DYN)
    q(x)
    torch.nn.utils.parametrizations.weight_norm(q)
    with pytest.raises(RuntimeError, match="parametrized"):
        q(x)


def test_int4_takes_a_non_contiguous_bias() -> None:
    q = convert_module(_linear(64, 48), QuantizationConfig.int4_weight_only(32))
    x = torch.randn(4, 64)
    expected = q(x)
    q.bias = torch.stack([q.bias, q.bias], -1)[:, 0]  # (the same values, strided)
    assert not q.bias.is_contiguous()
    torch.testing.assert_close(q(x), expected)


def test_input_smoothing_product_from_the_pool_is_x_times_factor() -> None:
    """Large smoothed inputs are written into the output pool: the same values, and inputs that
    autograd tracks keep their graph."""
    from lowbit._qmodule import _smoothed

    torch.manual_seed(0)
    factor = torch.rand(384) + 0.5
    for rows in (4, 1024):  # 6 KB on the heap, 1.5 MB from the pool
        x = torch.randn(rows, 384)
        assert torch.equal(_smoothed(x, factor), x * factor)
    x = torch.randn(1024, 384, requires_grad=True)
    y = _smoothed(x, factor)
    y.sum().backward()
    assert torch.equal(x.grad, factor.expand(1024, 384))


@pytest.mark.parametrize("kind", ["dynamic", "static", "int4", "int8wo"])
def test_conv_attributes_read_as_the_float_convs(kind: str) -> None:
    """Model code reads a conv's geometry (Whisper: ``conv1.stride[0]``); a quantized conv had
    no ``stride`` / ``padding`` / ``dilation`` / ``groups`` / ``padding_mode``."""
    cfg = {"dynamic": DYN, "static": STATIC, "int8wo": INT8_WO,
           "int4": QuantizationConfig.int4_weight_only(group_size=4)}[kind]
    convs = [nn.Conv1d(4, 8, 3, stride=2, padding=1), nn.Conv2d(4, 8, 3, dilation=2, groups=2),
             nn.Conv2d(4, 8, (3, 1), padding=(2, 0), padding_mode="reflect"),
             nn.Conv2d(4, 8, 1, padding=1), nn.Conv1d(4, 8, 4, padding="same"),
             nn.Conv2d(4, 8, 3, padding="same", padding_mode="circular")]
    for conv in convs:
        x = torch.randn(2, 4, *([9] * (conv.weight.dim() - 2)))
        kw = {"input_qparams": _static_qparams(x)} if kind == "static" else {}
        q = convert_module(conv, cfg, name="conv", **kw)
        padding = conv.padding  # "same" with an odd kernel extent pads both sides equally
        if padding == "same" and all(k % 2 for k in conv.kernel_size):
            padding = tuple(k // 2 for k in conv.kernel_size)
        assert (q.stride, q.padding, q.dilation, q.groups, q.padding_mode) == (
            conv.stride, padding, conv.dilation, conv.groups, conv.padding_mode), conv
        assert q.kernel_size == conv.kernel_size and q(x).shape == conv(x).shape


@pytest.mark.parametrize("kind", [*KINDS, "conv"])
def test_assigned_buffers_are_checked_and_taken_at_the_next_call(kind: str) -> None:
    """``layer.bias = torch.zeros(3)`` on a 24-output layer was accepted and the C kernels
    read 21 floats past it (a crash at a page end); a same-shape ``layer.weight_scale = 2 *
    layer.weight_scale`` was ignored by the kernel caches (outputs of the old scale)."""
    torch.manual_seed(7)
    if kind == "conv":
        conv, x = nn.Conv2d(4, 24, 3), torch.randn(2, 4, 9, 9)
        q = QuantizedConv2d.from_float(conv, DYN, name="fc")
    else:
        x = torch.randn(40, 36)
        q = _make(kind, _linear(36, 24), x)
    q(x)  # (caches and prepared calls built)
    for name in ("bias", "weight_scale", "weight"):
        old = getattr(q, "qweight" if name == "weight" else name)
        with pytest.raises(ValueError, match=rf"fc \(\w+\): {name} has shape .* cannot replace"):
            setattr(q, name, old[:3].clone())
    scaled = ["weight_scale", "bias"] + (["input_scale"] if kind == "static" else [])
    for name in scaled:
        setattr(q, name, getattr(q, name) * 2)
        fresh = module_from_meta(json.loads(json.dumps(q.meta())))  # built from the new state
        fresh.load_state_dict(q.state_dict())
        assert torch.equal(q(x), fresh(x)), f"{kind}: {name}"


@pytest.mark.parametrize("isa", ["auto", "torch"])
def test_weight_only_layers_take_transposed_inputs(isa: str, forced_isa) -> None:
    """PyTorch's packed weight-only ops (``_weight_int8pack_mm``, ``_weight_int4pack_mm``)
    refuse rows that are not contiguous, and ``x.to(bfloat16)`` keeps x's strides: an INT8
    weight-only layer raised for a transposed input from 2 to 32 rows, INT4 with float
    activations (and every INT4 layer on the torch path) too."""
    if isa == "torch":
        forced_isa("torch")
    torch.manual_seed(0)
    fc = nn.Linear(64, 512)
    q8 = convert_module(fc, INT8_WO, name="fc")
    q4 = convert_module(fc, QuantizationConfig.int4_weight_only(group_size=32), name="fc")
    q4.int8_activations = False
    for q, rows, dtype in ((q8, 5, torch.float32), (q8, 5, torch.bfloat16),
                           (q4, 70, torch.float32)):
        x = torch.randn(64, rows).to(dtype).t()
        assert torch.equal(q(x), q(x.contiguous())), (type(q).__name__, rows, dtype)


def test_int8_layers_whose_int32_sums_could_wrap_are_refused() -> None:
    """The quantizers keep such a layer off INT8 x INT8 (INT8 weight-only); a QuantizedLinear
    built directly, or loaded from a file whose class was edited, returned wrapped sums
    (K = 300,000: 337.1 where the float layer gives 3000.05), on every path."""
    big = nn.Linear(140_000, 2, bias=False)
    nn.init.constant_(big.weight, 1.0)
    with pytest.raises(ValueError, match=r"big \(QuantizedLinear\): its INT8 x INT8 sums could "
                                         r"pass int32 \(K = 140000"):
        QuantizedLinear.from_float(big, DYN, name="big")
    ok = nn.Linear(70_000, 2)  # any codes fit below K = 65,793; random weights far beyond it
    x = torch.randn(3, 70_000)
    torch.testing.assert_close(QuantizedLinear.from_float(ok, DYN)(x), ok(x).detach(),
                               rtol=0, atol=0.05)


def test_zero_points_from_a_modified_state_are_applied_or_refused() -> None:
    """Values a file can carry that the quantizers never write: a non-zero weight zero-point on
    an INT8 weight-only layer went through ``_weight_int8pack_mm``, which has none (2 to 32
    rows, off by 1.08 on outputs of 2.2); a static input zero-point of 2^30 wrapped the int32
    compensation (off by 1.2e5)."""
    torch.manual_seed(0)
    q = convert_module(_linear(64, 32), INT8_WO, name="fc")
    q.weight_zero_point = torch.full_like(q.weight_zero_point, 50)
    x = torch.randn(20, 64)
    with lowbit.backends.use("reference"):
        want = q(x)
    torch.testing.assert_close(q(x), want, rtol=0, atol=0.05)  # (bf16 activations)
    s = _make("static", _linear(16, 8), torch.randn(4, 16))
    s.input_zero_point = torch.tensor(2**30, dtype=s.input_zero_point.dtype)
    with pytest.raises(ValueError, match=r"fc \(QuantizedLinear\): input_zero_point 1073741824 "
                                         r"is outside its activation codes"):
        s(torch.randn(2, 16))


def test_to_empty_values_are_checked_at_the_first_call_not_by_to() -> None:
    """``to_empty`` leaves uninitialized memory until ``load_state_dict``: a zero-point out of
    range there made ``.to_empty()`` itself raise (a flaky failure of the big-model loaders'
    steps); the check now waits for a call on those values."""
    q = _make("static", _linear(16, 8), torch.randn(4, 16))
    state = {k: v.clone() for k, v in q.state_dict().items()}
    x = torch.randn(3, 16)
    y = q(x)
    empty = copy.deepcopy(q).to("meta").to_empty(device="cpu")
    empty._buffers["input_zero_point"].fill_(2**30)  # (what the memory may hold)
    empty.to("cpu")
    with pytest.raises(ValueError, match="input_zero_point 1073741824 is outside"):
        empty(x)
    empty.load_state_dict(state)
    assert torch.equal(empty(x), y)
