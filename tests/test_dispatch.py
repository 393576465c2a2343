"""lowbit._dispatch: the custom op's fake shapes, its executor, and the eager routing check."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from lowbit import _dispatch
from lowbit.config import QuantizationConfig
from lowbit.modules import convert_module

CASES = [
    (nn.Conv2d(3, 8, 3, padding="same", padding_mode="reflect"), "dyn", (2, 3, 9, 7)),
    (nn.Conv2d(4, 6, (3, 1), stride=2, dilation=(1, 2), groups=2), "wo", (1, 4, 11, 8)),
    (nn.Conv1d(4, 6, 3, padding=2), "dyn", (3, 4, 10)),
    (nn.Linear(10, 5), "wo", (2, 3, 10)),
    (nn.Embedding(12, 6), "emb", (2, 5)),
]


@pytest.mark.parametrize("index", range(len(CASES)))
def test_fake_output_matches_real(index: int) -> None:
    float_layer, mode, shape = CASES[index]
    cfg = (QuantizationConfig.int8_dynamic() if mode == "dyn"
           else QuantizationConfig.int4_weight_only(group_size=4,
                                                    quantize_embeddings=mode == "emb"))
    q = convert_module(float_layer, cfg, name="layer")
    x = (torch.randint(0, 12, shape) if isinstance(float_layer, nn.Embedding)
         else torch.randn(shape))
    spec, buffers = _dispatch._spec(q), _dispatch.layer_buffers(q)
    real = torch.ops.lowbit.quantized_layer(x, buffers, spec)
    assert torch.equal(real, q(x))
    with FakeTensorMode(allow_non_fake_inputs=True) as mode_:
        fake = torch.ops.lowbit.quantized_layer(mode_.from_tensor(x), buffers, spec)
    assert fake.shape == real.shape and fake.dtype == real.dtype


def test_fused_maxpool_shape_and_executor_rebuilt_from_spec() -> None:
    q = convert_module(nn.Conv2d(1, 4, 3, padding=1), QuantizationConfig.int8_dynamic())
    q.geometry["fused_maxpool"] = 2
    x = torch.randn(2, 1, 9, 9)
    spec = _dispatch._spec(q)
    copies = [t.clone() for t in _dispatch.layer_buffers(q)]  # no live layer owns these
    out = torch.ops.lowbit.quantized_layer(x, copies, spec)
    assert out.shape == (2, 4, 4, 4) and torch.equal(out, q(x))
    executor = copies[0].__dict__["_lowbit_executor"][1]
    assert executor is not q and executor.qweight is copies[0]
    with pytest.raises(ValueError, match="expects buffers"):
        torch.ops.lowbit.quantized_layer(x, copies[:1], spec.replace("_lowbit", "") + " ")


@pytest.mark.parametrize("name", ["layers.0", 'odd "name" \\ with %27 \' and %'])
def test_spec_is_a_c_literal_that_reads_back(name: str) -> None:
    """Inductor's C++ wrapper writes the spec between double quotes, unescaped: it holds no
    double quote and no backslash, whatever the layer's name, and reads back exactly."""
    q = convert_module(nn.Linear(4, 3), QuantizationConfig.int8_dynamic(), name=name)
    spec = _dispatch.op_spec(q)
    assert '"' not in spec and "\\" not in spec
    meta = _dispatch.load_spec(spec)
    assert meta["name"] == name and meta["out_features"] == 3
    plain = json.dumps(meta, sort_keys=True)  # the plain JSON older versions wrote
    assert _dispatch.load_spec(plain) == meta
    for bad in ("nonsense", "[1, 2]"):
        with pytest.raises(ValueError, match="is not a lowbit layer spec"):
            _dispatch.load_spec(bad)
    x = torch.randn(2, 4)
    assert torch.equal(torch.ops.lowbit.quantized_layer(x, _dispatch.layer_buffers(q), plain),
                       q(x))


def test_buffers_that_do_not_match_the_spec_are_refused() -> None:
    """A program whose buffers were swapped or cut (a tampered export) must not reach the
    kernels, which read as many rows as the spec says: before this check a 3-row INT4 weight
    under a 32-row spec ran and returned 32 columns."""
    q = convert_module(nn.Linear(64, 32), QuantizationConfig.int4_weight_only(group_size=32),
                       name="fc")
    spec, buffers = _dispatch._spec(q), [t.clone() for t in _dispatch.layer_buffers(q)]
    x = torch.randn(2, 64)
    assert torch.equal(torch.ops.lowbit.quantized_layer(x, buffers, spec), q(x))
    cut = [buffers[0][:3].clone(), *[t.clone() for t in buffers[1:]]]
    with pytest.raises(ValueError, match=r"fc buffer 'weight' is torch.uint8 \(3, 32\), but "
                                         r"its spec needs torch.uint8 \(32, 32\)"):
        torch.ops.lowbit.quantized_layer(x, cut, spec)
    wide = [buffers[0].clone(), buffers[1].double(), *[t.clone() for t in buffers[2:]]]
    with pytest.raises(ValueError, match=r"buffer 'weight_scale' is torch\.float64"):
        torch.ops.lowbit.quantized_layer(x, wide, spec)


def test_routing_is_off_by_default_and_override_checks_names() -> None:
    q = convert_module(nn.Linear(4, 4), QuantizationConfig.int8_dynamic())
    assert not _dispatch.routed(q) and _dispatch.native_allowed()
    q.backend = "torch"
    assert _dispatch.routed(q)
    with pytest.raises(ValueError, match="not a layer backend"):
        _dispatch.override("native")


def test_import_lowbit_leaves_torch_dynamo_unimported() -> None:
    # torch._dynamo takes seconds to import: only torch.compile / torch.export should pay that
    import subprocess
    import sys
    code = "import sys, lowbit; print('torch._dynamo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=120)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("method", ["smooth_quant", "awq"])
def test_input_smoothing_is_applied_once_on_every_path(method: str) -> None:
    """AWQ / SmoothQuant layers multiply their input by a per-channel factor: once, whether the
    call runs eagerly, on another backend, through the custom op (torch.export / compile) or
    with an input that requires grad (each of these once re-applied it)."""
    import lowbit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)).eval()
    x = torch.randn(6, 16) * torch.linspace(0.1, 10.0, 16)  # outlier channels
    if method == "awq":
        q = lowbit.quantize_weight_only(model, bits=4, group_size=16, method="awq",
                                        calibration_data=[x], progress=False)
    else:
        q = lowbit.quantize_dynamic(model, smooth_quant=0.5, calibration_data=[x],
                                    progress=False)
    assert q[0]._buffers.get("input_smoothing") is not None
    with torch.no_grad():
        want, eager = model(x), q(x)
        assert F.cosine_similarity(eager.flatten(), want.flatten(), 0) > 0.99
        with lowbit.backends.use("reference"):
            reference = q(x)
        exported = torch.export.export(q, (x,)).module()(x)
        for layer in (m for m in q.modules() if hasattr(m, "backend")):
            layer.backend = "torch"
        torch_ops = q(x)
        for layer in (m for m in q.modules() if hasattr(m, "backend")):
            layer.backend = "auto"
    tol = dict(rtol=1e-5, atol=1e-5 * float(eager.abs().max()))
    for name, y in (("reference", reference), ("torch.export", exported)):
        assert torch.allclose(y, eager, **tol), f"{name}: {float((y - eager).abs().max())}"
    # PyTorch's ops take INT4 layers' activations in float (lowbit's kernels: int8 per group)
    assert float((torch_ops - eager).abs().max()) < 0.01 * float(eager.abs().max())
    xg = x.clone().requires_grad_()
    yg = q(xg)
    assert torch.equal(yg.detach(), eager)
    yg.sum().backward()
    xf = x.clone().requires_grad_()
    model(xf).sum().backward()
    assert F.cosine_similarity(xg.grad.flatten(), xf.grad.flatten(), 0) > 0.95


def test_another_backend_follows_a_setting_changed_after_its_first_call() -> None:
    """A ``use(...)`` sibling is rebuilt when a setting it copies changes
    (``Int4Linear.int8_activations`` picks another kernel: it used to keep the old one)."""
    import lowbit

    torch.manual_seed(0)
    q = lowbit.quantize_weight_only(nn.Sequential(nn.Linear(256, 64)).eval(), bits=4,
                                    group_size=32, progress=False)
    q[0].backend = "reference"
    x = torch.randn(3, 256)
    with torch.no_grad():
        with lowbit.backends.use("native"):
            q(x)
        q[0].int8_activations = False
        with lowbit.backends.use("native"):
            got = q(x)
        q[0].backend = "auto"
        assert torch.equal(got, q(x))
