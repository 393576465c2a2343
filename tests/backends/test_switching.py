"""Switching layer backends (set_backend, use, backend=): the same numbers within each
backend's documented tolerance, bit-identical for INT8 x INT8 on native / torch vs reference."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import lowbit
from lowbit import backends
from lowbit.config import QuantizationConfig
from lowbit.modules import QuantizedConv2d, QuantizedLinear

KINDS = ["mlp-dynamic", "cnn-static", "mlp-int4", "bert-dynamic", "bert-static", "bert-int4"]


def _layers() -> list[tuple[str, nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    fc, conv = nn.Linear(40, 24), nn.Conv2d(3, 8, 3, padding=1)
    x_fc, x_conv = torch.randn(5, 40), torch.randn(2, 3, 12, 12)
    static = QuantizationConfig.int8_static()
    return [("linear-dynamic", QuantizedLinear.from_float(fc, QuantizationConfig.int8_dynamic()),
             x_fc),
            ("linear-static", QuantizedLinear.from_float(fc, static, input_qparams=(0.02, 3)),
             x_fc),
            ("conv-dynamic", QuantizedConv2d.from_float(conv, QuantizationConfig.int8_dynamic()),
             x_conv),
            ("conv-static", QuantizedConv2d.from_float(conv, static, input_qparams=(0.03, -2)),
             x_conv)]


@pytest.mark.parametrize("index", range(4))
def test_int8_layers_bit_identical_on_every_layer_backend(index: int) -> None:
    _, layer, x = _layers()[index]
    y = layer(x)
    for name in ("reference", "torch", "native"):
        with backends.use(name):
            assert torch.equal(layer(x), y), name
        assert torch.equal(backends.set_backend(layer, name)(x), y), name
    assert layer.backend == "auto"


@pytest.mark.parametrize("kind", KINDS)
def test_models_agree_on_every_layer_backend(kind: str, make_quantized, run) -> None:
    qmodel, x = make_quantized(kind)
    y = run(qmodel, x)
    outs = {}
    for name in ("reference", "torch", "native"):
        with backends.use(name):
            outs[name] = run(qmodel, x)
    ref = outs["reference"]
    if kind.endswith("int4"):  # int8 activations per group (native), bf16 packed ops (torch)
        scale = float(ref.abs().max())
        assert float((outs["native"] - ref).abs().max()) <= 2e-3 * scale
        assert float((outs["torch"] - ref).abs().max()) <= 2e-2 * scale
    else:
        assert torch.equal(outs["native"], ref) and torch.equal(outs["torch"], ref)
    assert torch.equal(outs["native"], y)  # the default backend is native: today's bits
    # set_backend switches in place and back: the same results as the block
    for name in ("torch", "reference"):
        backends.set_backend(qmodel, name)
        assert torch.equal(run(qmodel, x), outs[name]), name
    backends.set_backend(qmodel, "native")
    assert torch.equal(run(qmodel, x), y)


def test_backend_argument_of_quantizers(make_quantized, run) -> None:
    torch.manual_seed(0)
    model = lowbit.models.MLP(in_features=64, hidden=(32,), num_classes=10).eval()
    x = torch.randn(3, 64)
    for name, value in (("reference", "reference"), ("torch", "torch"), ("native", "auto"),
                        (None, "auto")):
        for q in (lowbit.quantize_dynamic(model, backend=name),
                  lowbit.quantize_static(model, [x], progress=False, backend=name),
                  lowbit.quantize_weight_only(model, 4, 32, backend=name),
                  lowbit.PTQQuantizer(backend=name).quantize(model)):
            layers = [m for m in q.modules() if hasattr(m, "kernel_info")]
            assert layers and {m.backend for m in layers} == {value}, (name, q)
    q = lowbit.quantize_dynamic(model, backend="torch")
    ref = backends.set_backend(lowbit.quantize_dynamic(model), "reference")
    assert torch.equal(run(q, x), run(ref, x))


def test_torch_backend_runs_no_lowbit_c(monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch backend's kernels are PyTorch's: lowbit's C libraries are never called."""
    from lowbit.kernels import isa

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    x = torch.randn(4, 64)
    for q in (lowbit.quantize_dynamic(model), lowbit.quantize_weight_only(model, 4, 32)):
        y_ref = backends.set_backend(q, "reference")(x)
        backends.set_backend(q, "torch")
        info = str([m.kernel_info() for m in q if hasattr(m, "kernel_info")])
        assert "s8_" not in info and "u4_" not in info and "native" not in info, info

        def no_c(*args, **kwargs):
            raise AssertionError("lowbit C kernel called on the torch backend")

        with monkeypatch.context() as mp:
            mp.setattr(isa, "load_gemm", no_c)
            mp.setattr("lowbit.kernels.base.load_native", no_c)
            y = q(x)
        assert torch.allclose(y, y_ref, rtol=0, atol=2e-2 * float(y_ref.abs().max()))


def test_use_is_scoped_per_thread_and_nests() -> None:
    _, layer, x = _layers()[0]
    seen = {}

    def other() -> None:
        seen["backend"] = backends.registry._dispatch._OVERRIDE.get()

    with backends.use("reference"):
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
        with backends.use("torch"):
            assert backends.registry._dispatch._OVERRIDE.get() == "torch"
        assert backends.registry._dispatch._OVERRIDE.get() == "reference"
        layer(x)
    assert seen["backend"] is None and backends.registry._dispatch._OVERRIDE.get() is None
    assert layer.backend == "auto"


def test_siblings_follow_weight_changes() -> None:
    _, layer, x = _layers()[0]
    with backends.use("reference"):
        before = layer(x)
    layer.qweight.neg_()  # in place: the sibling shares the tensor, its caches refresh
    with backends.use("reference"):
        after = layer(x)
    assert torch.equal(after, layer(x)) and not torch.equal(after, before)
    layer.weight = layer.qweight.clone().neg_()  # replaced: the sibling is rebuilt
    with backends.use("reference"):
        assert torch.equal(layer(x), before)


@pytest.mark.parametrize("bits", [4, 8])
def test_weight_only_native_and_torch_stay_within_the_documented_tolerance(bits: int) -> None:
    # docs/backends.md, "Tolerances": relative max deviation <= 1e-2 from reference
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 512)).eval()
    refq = lowbit.quantize_weight_only(model, bits=bits, group_size=128, backend="reference")
    for name in ("native", "torch"):
        q = lowbit.quantize_weight_only(model, bits=bits, group_size=128)
        backends.set_backend(q, name)
        for m in (1, 16, 48, 128):
            x = torch.randn(m, 1024)
            with torch.inference_mode():
                y, y_ref = q(x), refq(x)
            rel = float((y - y_ref).abs().max() / y_ref.abs().max())
            assert rel <= 1e-2, (name, m, rel)
            if q[0]._select(m) == "dequant_fp32":  # dequantize + float32 GEMM: the same bits
                assert torch.equal(y, y_ref)
