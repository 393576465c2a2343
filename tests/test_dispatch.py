"""lowbit._dispatch: the custom op's fake shapes, its executor, and the eager routing check."""

from __future__ import annotations

import json

import pytest
import torch
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
