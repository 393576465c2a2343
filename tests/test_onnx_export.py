"""lowbit.export_onnx / OnnxRuntimeModule: real exports run in real ONNX Runtime sessions.

Each test checks the graph (which integer ops carry the quantized layers), the file
(``onnx.checker``, an ``ir_version`` ONNX Runtime reads, a symbolic batch axis) and the numbers
against lowbit's own output: within one output quantization step (``max|y| / 127``), argmax
agreement >= 99.9% on the MNIST evaluation images.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections import Counter
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Subset

import lowbit
from lowbit import QuantizationConfig, QuantSpec
from lowbit.data import mnist_splits
from lowbit.models import MLP, MnistCNN, train_classifier
from lowbit.onnx_export import OnnxRuntimeModule, export_onnx


def _ops(proto: onnx.ModelProto) -> Counter:
    return Counter(n.op_type for n in proto.graph.node)


def _export(qmodel: nn.Module, example, path: Path, **kw) -> tuple[onnx.ModelProto,
                                                                     OnnxRuntimeModule]:
    """Export, reload the file, check it, and open it in ONNX Runtime."""
    proto = export_onnx(qmodel, example, path, **kw)
    on_disk = onnx.load(path)
    onnx.checker.check_model(on_disk)
    assert on_disk.ir_version == 10
    assert on_disk.SerializeToString() == proto.SerializeToString()
    assert on_disk.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary files left
    return proto, OnnxRuntimeModule(path)


def _fused_ops(path: Path, tmp_path: Path) -> Counter:
    """The op types ONNX Runtime runs after its graph optimizations (fusions)."""
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return _ops(onnx.load(so.optimized_model_filepath))


def _assert_close(ref: torch.Tensor, out: torch.Tensor, steps: float = 1.0) -> None:
    step = float(ref.abs().max()) / 127
    err = float((ref - out).abs().max())
    assert err <= steps * step, f"max abs error {err:.3g} > {steps} output step(s) {step:.3g}"


def _assert_mostly_exact(ref: torch.Tensor, out: torch.Tensor) -> None:
    """The same integer codes as lowbit: >= 99.9% of the outputs agree to float rounding (a
    last-bit difference in a float epilogue can move a later layer's code by one)."""
    exact = (ref - out).abs() <= 1e-5 * float(ref.abs().max())
    assert float(exact.float().mean()) >= 0.999, f"{int((~exact).sum())} outputs differ"


@pytest.fixture(scope="module")
def mnist():
    splits = mnist_splits()
    torch.manual_seed(0)
    model = train_classifier(MnistCNN(), Subset(splits.train, range(2048)), epochs=1,
                             batch_size=64, seed=0, progress=False)
    return model.eval(), splits


def test_mnist_cnn_static_is_qdq_that_ort_fuses(mnist, tmp_path) -> None:
    model, splits = mnist
    calib = DataLoader(Subset(splits.train, range(256)), batch_size=64)
    qmodel = lowbit.quantize_static(model, calib, progress=False)
    path = tmp_path / "out" / "cnn_static.onnx"
    proto, ort_model = _export(qmodel, splits.train.tensors[0][:2], path)

    ops = _ops(proto)
    # 4 activation Q/DQ pairs (conv1, conv2, fc1, fc2) + 2 inserted after the convs so ORT can
    # fuse them; DQ also for 4 weights and 4 int32 biases
    assert ops["QuantizeLinear"] == 6 and ops["DequantizeLinear"] == 14, ops
    assert ops["Conv"] == 2 and ops["Gemm"] == 2 and not ops["MatMulInteger"], ops
    fused = _fused_ops(path, tmp_path)
    assert fused["QLinearConv"] == 2 and fused["QGemm"] == 2, fused
    assert not fused["Conv"] and not fused["Gemm"] and not fused["FusedConv"], fused

    x = splits.eval.tensors[0]  # the 2,000 evaluation images
    with torch.inference_mode():
        ref, out = qmodel(x), ort_model(x)
    _assert_close(ref, out)
    agree = float((ref.argmax(1) == out.argmax(1)).float().mean())
    assert agree >= 0.999, f"argmax agreement {agree:.4f}"


def test_mlp_dynamic_per_token_matmul_integer(tmp_path) -> None:
    model = MLP(hidden=(256, 128)).eval()
    before = copy.deepcopy(model.state_dict())
    qmodel = lowbit.quantize_dynamic(model)
    qstate = {k: v.clone() for k, v in qmodel.state_dict().items()}
    proto, ort_model = _export(qmodel, torch.randn(3, 1, 28, 28), tmp_path / "mlp.onnx")
    ops = _ops(proto)
    assert ops["MatMulInteger"] == 3 and ops["QuantizeLinear"] == 3, ops
    assert not ops["DequantizeLinear"] and not ops["MatMul"] and not ops["Gemm"], ops
    for batch in (1, 37):  # any batch size
        x = torch.randn(batch, 1, 28, 28)
        with torch.inference_mode():
            ref, out = qmodel(x), ort_model(x)
        assert out.shape == (batch, 10)
        _assert_close(ref, out, steps=0.01)
        _assert_mostly_exact(ref, out)
    # neither the float nor the quantized model changed
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, qstate[k]) for k, v in qmodel.state_dict().items())
    assert type(qmodel.layers[0]).__name__ == "QuantizedLinear"


@pytest.mark.parametrize("exact", [True, False])
def test_mlp_dynamic_per_tensor_affine_is_ort_own_dynamic_pattern(exact, tmp_path) -> None:
    """uint8 affine per-tensor activations export as ORT's quantize_dynamic graph
    (DynamicQuantizeLinear -> MatMulInteger -> scale), which ORT fuses into
    DynamicQuantizeMatMul; per-channel weights (uint8 ``w + 128`` when ``exact``)."""
    model = MLP(hidden=(256, 128)).eval()
    qmodel = lowbit.quantize_dynamic(
        model, QuantizationConfig.int8_dynamic(per_token=False, symmetric=False))
    path = tmp_path / "mlp.onnx"
    proto, ort_model = _export(qmodel, torch.randn(3, 1, 28, 28), path, exact=exact)
    ops = _ops(proto)
    assert ops["DynamicQuantizeLinear"] == 3 and ops["MatMulInteger"] == 3, ops
    assert not ops["QuantizeLinear"] and not ops["ReduceMax"] and not ops["MatMul"], ops
    weights = {i.name: i.data_type for i in proto.graph.initializer if i.name.endswith(".w")}
    assert set(weights.values()) == {onnx.TensorProto.UINT8 if exact else onnx.TensorProto.INT8}
    fused = _fused_ops(path, tmp_path)
    assert fused["DynamicQuantizeMatMul"] == 3 and not fused["MatMulInteger"], fused
    for batch in (1, 37):
        x = torch.randn(batch, 1, 28, 28)
        with torch.inference_mode():
            ref, out = qmodel(x), ort_model(x)
        _assert_close(ref, out, steps=0.01)
        _assert_mostly_exact(ref, out)
    # [batch, tokens, features]: no Reshape around the layers (one scale for the whole tensor)
    seq = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8)).eval()
    qseq = lowbit.quantize_dynamic(
        seq, QuantizationConfig.int8_dynamic(per_token=False, symmetric=False))
    proto, ort_seq = _export(qseq, torch.randn(2, 5, 16), tmp_path / "seq" / "seq.onnx",
                             exact=exact, dynamic_axes=(0, 1))
    assert not _ops(proto)["Reshape"] and _ops(proto)["DynamicQuantizeLinear"] == 2
    x = torch.randn(3, 11, 16)
    with torch.inference_mode():
        _assert_mostly_exact(qseq(x), ort_seq(x))


def test_int4_weight_only_mlp_matmul_nbits(tmp_path, monkeypatch) -> None:
    # MatMulNBits runs float activations (accuracy_level 0): so does lowbit's kernel here
    monkeypatch.setattr(lowbit.Int4Linear, "int8_activations", False)
    model = MLP(in_features=96, hidden=(128, 64), num_classes=10).eval()
    qmodel = lowbit.quantize_weight_only(model, bits=4, group_size=32)
    proto, ort_model = _export(qmodel, torch.randn(1, 96), tmp_path / "int4.onnx")  # batch 1
    ops = _ops(proto)
    assert ops["MatMulNBits"] == 3 and not ops["MatMul"] and not ops["Gemm"], ops
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert {a.name: a.i for a in nbits[0].attribute if a.name in ("bits", "block_size")} == {
        "bits": 4, "block_size": 32}
    weights = {i.name: i for i in proto.graph.initializer}
    assert weights[nbits[0].input[1]].data_type == onnx.TensorProto.UINT8
    x = torch.randn(9, 96)
    with torch.inference_mode():
        ref, out = qmodel(x), ort_model(x)
    assert float((ref - out).abs().max()) <= 1e-5 * float(ref.abs().max())
    levels = {a.name: a.i for a in nbits[0].attribute if a.name == "accuracy_level"}
    assert levels == {"accuracy_level": 0}  # float activations, as the eager kernel


def test_int4_int8_activations_export_as_matmul_nbits_accuracy_level_4(tmp_path) -> None:
    """With int8 activations (the default) the export asks ONNX Runtime for the same arithmetic
    (``accuracy_level=4``: A quantized to int8 per block): one layer matches lowbit's INT4 x
    INT8 kernel to float rounding where that kernel runs, and a whole MLP stays within the
    documented activation-rounding tolerance of the reference."""
    assert lowbit.Int4Linear.int8_activations
    layer = lowbit.quantize_weight_only(nn.Sequential(nn.Linear(256, 512)).eval(), bits=4,
                                        group_size=128)
    (tmp_path / "layer").mkdir()
    proto, ort_layer = _export(layer, torch.randn(1, 256), tmp_path / "layer" / "layer.onnx")
    nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
    assert [{a.name: a.i for a in n.attribute}["accuracy_level"] for n in nbits] == [4]
    x = torch.randn(17, 256)
    with torch.inference_mode():
        mine, out = layer(x), ort_layer(x)
    if layer[0].kernel_info() == {"M>0": "u4q8_" + lowbit.native.selected_isa()}:
        assert float((out - mine).abs().max()) <= 1e-5 * float(mine.abs().max())
    model = MLP(in_features=256, hidden=(512, 128), num_classes=10).eval()
    qmodel = lowbit.quantize_weight_only(model, bits=4, group_size=128)
    (tmp_path / "mlp").mkdir()
    _, ort_model = _export(qmodel, torch.randn(1, 256), tmp_path / "mlp" / "mlp.onnx")
    with torch.inference_mode():
        out = ort_model(x)
        ref = lowbit.backends.set_backend(copy.deepcopy(qmodel), "reference")(x)
    assert float((out - ref).abs().max()) <= 1e-2 * float(ref.abs().max())  # docs/backends.md


class _Mixed(nn.Module):
    """Conv2d (reflect padding, groups), Conv1d, Linear + GELU, Embedding, a float head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1, padding_mode="reflect", groups=2)
        self.conv1d = nn.Conv1d(8, 8, 3)
        self.fc = nn.Linear(8 * 6, 48)
        self.gelu = nn.GELU()
        self.emb = nn.Embedding(20, 48)
        self.head = nn.Linear(48, 5)

    def forward(self, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv(x)).mean(-1)  # (B, 8, 8)
        y = self.fc(self.conv1d(y).flatten(1))  # (B, 48)
        return self.head(self.gelu(y) + self.emb(idx).sum(1))


@pytest.mark.parametrize("scheme", ["dynamic_affine", "weight_only_int8_odd_groups",
                                    "weight_only_int8"])
def test_every_layer_kind_with_float_fallback(scheme, tmp_path) -> None:
    """``weight_only_int8``: the default INT8 weight-only layers, whose CPU kernel keeps
    bfloat16 scales beside the float32 ones (they made the export refuse a 'bfloat16' model)."""
    model = _Mixed().eval()
    if scheme == "weight_only_int8":
        cfg = dataclasses.replace(QuantizationConfig.int8_weight_only(),
                                  layer_overrides={"head": None})
        expect = {"MatMulNBits": 1}  # (8-bit blocks; the convs dequantize their codes)
    elif scheme == "dynamic_affine":  # unsigned affine activations, affine per-tensor weights
        cfg = QuantizationConfig(weights=QuantSpec(symmetric=False),
                                 activations=QuantSpec(signed=False, symmetric=False),
                                 mode="dynamic", layer_overrides={"head": None})
        expect = {"MatMulInteger": 1, "ConvInteger": 2, "Conv": 0}
    else:  # group 12: no MatMulNBits block size fits, the codes are dequantized in the graph
        cfg = QuantizationConfig(weights=QuantSpec(granularity="per_group", group_size=12),
                                 activations=None, mode="weight_only",
                                 layer_overrides={"head": None})
        expect = {"MatMulNBits": 0}
    qmodel = lowbit.PTQQuantizer(cfg).quantize(model)
    assert isinstance(qmodel.head, nn.Linear)  # the float fallback layer
    example = (torch.randn(2, 4, 8, 8), torch.randint(0, 20, (2, 3)))
    proto, ort_model = _export(qmodel, example, tmp_path / f"{scheme}.onnx")
    ops = _ops(proto)
    assert all(ops[k] == v for k, v in expect.items()), ops
    x, idx = torch.randn(6, 4, 8, 8), torch.randint(0, 20, (6, 3))
    with torch.inference_mode():
        ref, out = qmodel(x, idx), ort_model(x, idx)
    _assert_close(ref, out, steps=0.05)
    _assert_mostly_exact(ref, out)


def test_two_layer_bert_dynamic_batch_and_sequence(tmp_path) -> None:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=300, hidden_size=64, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=128,
                        max_position_embeddings=64)
    torch.manual_seed(0)
    qmodel = lowbit.quantize_dynamic(BertModel(config).eval())
    ids = torch.randint(0, 300, (2, 9))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    proto, ort_model = _export(qmodel, example, tmp_path / "bert.onnx", dynamic_axes=(0, 1))
    assert _ops(proto)["MatMulInteger"] == 2 * 6 + 1  # q, k, v, out, ffn in/out; pooler
    assert [d.dim_param != "" for d in proto.graph.input[0].type.tensor_type.shape.dim] == [
        True, True]
    ids = torch.randint(0, 300, (3, 17))
    mask = torch.ones_like(ids)
    mask[0, 11:] = 0
    with torch.inference_mode():
        ref = qmodel(input_ids=ids, attention_mask=mask)
        out = ort_model(input_ids=ids, attention_mask=mask)
    assert type(out) is type(ref)  # the model's own output structure
    _assert_close(ref.last_hidden_state, out.last_hidden_state, steps=0.01)
    cos = torch.nn.functional.cosine_similarity(ref.pooler_output, out.pooler_output, dim=-1)
    assert float(cos.min()) >= 0.9999


def test_bad_arguments_are_refused_with_the_fix(tmp_path) -> None:
    qmodel = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(4, 2)))
    with pytest.raises(ValueError, match="opset=17 must be an integer from 18 to 21"):
        export_onnx(qmodel, torch.randn(2, 4), tmp_path / "m.onnx", opset=17)
    with pytest.raises(TypeError, match="example_inputs must be a tensor"):
        export_onnx(qmodel, 3.0, tmp_path / "m.onnx")
    assert not list(tmp_path.iterdir())
    ort_model = OnnxRuntimeModule(export_onnx(qmodel, torch.randn(2, 4), None))
    with pytest.raises(TypeError, match=r"unknown input 'y'; the graph takes \['input'\]"):
        ort_model(y=torch.randn(2, 4))
    with pytest.raises(TypeError, match="missing input"):
        ort_model()
    import copy
    import pickle
    for clone in (copy.deepcopy, pickle.dumps):  # (a live session: a clear message, not
        with pytest.raises(TypeError, match=r"build another from the \.onnx file"):  # ORT's)
            clone(ort_model)


def test_cli_export_of_a_saved_lowbit_model(tmp_path, capsys) -> None:
    import json

    from lowbit.cli import main

    torch.manual_seed(0)
    model = MLP(hidden=(32,)).eval()
    lowbit.save(lowbit.quantize_dynamic(model), tmp_path / "q")
    arch = ["--arch", "lowbit.models:MLP", "--arch-kwargs", '{"hidden": [32]}']
    out = tmp_path / "onnx" / "q.onnx"
    assert main(["export", str(tmp_path / "q"), *arch, "--data", "mnist", "--out", str(out),
                 "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["integer_ops"] == {"QuantizeLinear": 2, "MatMulInteger": 2}
    assert info["checked_inputs"] == 64 and info["max_abs_diff_vs_pytorch"] < 1e-4
    onnx.checker.check_model(onnx.load(out))
    assert main(["export", str(tmp_path / "q"), *arch, "--out", str(out)]) == 2  # no inputs
    assert "pass --data DATA or --input-shape" in capsys.readouterr().err


def test_exact_false_keeps_int8_weights_and_opset_21(tmp_path) -> None:
    qmodel = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(32, 16), nn.ReLU()))
    proto, ort_model = _export(qmodel, torch.randn(2, 32), tmp_path / "fast.onnx", opset=21,
                               exact=False)
    assert [o.version for o in proto.opset_import if o.domain == ""] == [21]
    weights = {i.name: i for i in proto.graph.initializer}
    mm = next(n for n in proto.graph.node if n.op_type == "MatMulInteger")
    assert weights[mm.input[1]].data_type == onnx.TensorProto.INT8  # ORT's u8 x s8 kernels
    x = torch.randn(64, 32)
    with torch.inference_mode():
        ref, out = qmodel(x), ort_model(x)
    # u8 x s8 kernels saturate int16 pair sums on x86 without VNNI (cosine ~0.98 on AVX2)
    assert out.shape == ref.shape
    assert float(torch.nn.functional.cosine_similarity(ref.flatten(), out.flatten(), 0)) > 0.9


def _worst_case_linear() -> tuple[nn.Module, torch.Tensor]:
    """A Linear whose INT8 codes are all +-127 and inputs whose codes hit the ends of their
    range with the weights' signs: the largest int16 pair sums u8 x s8 kernels can meet."""
    torch.manual_seed(0)
    layer = nn.Linear(64, 32)
    signs = torch.randint(0, 2, (32, 64)).float() * 2 - 1
    with torch.no_grad():
        layer.weight.copy_(signs * 0.05)
    x = signs[:8].clone() * 3.0  # rows aligned with the first 8 output channels' signs
    x[:, 0] = -6.0  # one large entry per row: most codes land near +-half the range
    return nn.Sequential(layer, nn.ReLU()).eval(), torch.cat([x, -x, torch.randn(48, 64)])


_SEVEN_BIT = {
    "dynamic_per_token": QuantizationConfig.int8_dynamic(activation_bits=7),
    "dynamic_affine_per_tensor": QuantizationConfig(
        weights=QuantSpec.int8_weight(), mode="dynamic",
        activations=QuantSpec(bits=7, symmetric=False, granularity="per_tensor")),
    "static": QuantizationConfig(
        weights=QuantSpec.int8_weight(), mode="static",
        activations=QuantSpec(bits=7, symmetric=False, granularity="per_tensor")),
}


@pytest.mark.parametrize("scheme", sorted(_SEVEN_BIT))
def test_seven_bit_activations_export_int8_weights_exactly(scheme, tmp_path) -> None:
    """7-bit activation codes become uint8 ``q - qmin`` in [0, 127], so int8 weights (ONNX
    Runtime's fast u8 x s8 kernels) give exact sums even at the largest pair sums, with the
    default ``exact=True``."""
    model, x = _worst_case_linear()
    q = lowbit.PTQQuantizer(_SEVEN_BIT[scheme]).quantize(model, [x])
    assert int(q[0].qweight.abs().max()) == 127
    proto, ort_model = _export(q, x[:2], tmp_path / f"{scheme}.onnx")
    weights = [i for i in proto.graph.initializer if len(i.dims) == 2]
    assert [w.data_type for w in weights] == [onnx.TensorProto.INT8]  # u8 x s8 kernels
    with torch.inference_mode():
        ref, out = q(x), ort_model(x)
    if scheme == "static":  # QDQ divides where lowbit multiplies by 1 / scale: a step at most
        _assert_close(ref, out)
        assert "QGemm" in _fused_ops(tmp_path / f"{scheme}.onnx", tmp_path)
    else:
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


@pytest.mark.parametrize("vnni", [True, False])
def test_exact_auto_takes_int8_weights_only_where_this_cpu_keeps_them_exact(
        vnni, tmp_path, monkeypatch) -> None:
    """``exact="auto"`` (the onnxruntime backend's choice): int8 weights where ONNX Runtime's
    u8 x s8 kernels are exact on this CPU (VNNI), uint8 elsewhere and always for the dynamic
    ``ConvInteger``, and the linear as ORT's ``MatMulIntegerToFloat``; the outputs equal the
    exact standard-ops export's at the largest pair sums (8-bit activation codes)."""
    from lowbit.onnx import _layers

    if vnni and not _layers.u8s8_exact_here():  # (feature detection: ORT's int8 kernels
        pytest.skip("this CPU has no VNNI: ONNX Runtime's u8 x s8 kernels saturate here")
    monkeypatch.setattr(_layers, "u8s8_exact_here", lambda: vnni)  # False: as on AVX2 only
    linear, x = _worst_case_linear()
    q = lowbit.quantize_dynamic(linear)
    assert int(q[0].qweight.abs().max()) == 127
    proto, auto = _export(q, x[:2], tmp_path / "auto.onnx", exact="auto")
    weights = {i.name: i.data_type for i in proto.graph.initializer}
    assert "MatMulInteger" not in _ops(proto)  # ORT's fused op, the weight scale inside
    mm = next(n for n in proto.graph.node if n.op_type == "MatMulIntegerToFloat")
    assert mm.domain == "com.microsoft"
    want = onnx.TensorProto.INT8 if vnni else onnx.TensorProto.UINT8  # MatMulIntegerToFloat
    # takes both: uint8 weights (u8 x u8, exact on every CPU) where int8 would saturate
    assert weights[mm.input[1]] == want
    exact = OnnxRuntimeModule(export_onnx(q, x[:2], None))
    assert torch.equal(auto(x), exact(x))
    with torch.inference_mode():
        torch.testing.assert_close(auto(x), q(x), rtol=0, atol=1e-6 * float(q(x).abs().max()))
    torch.manual_seed(0)
    conv = lowbit.quantize_dynamic(nn.Sequential(nn.Conv2d(2, 4, 3), nn.ReLU()).eval())
    proto = export_onnx(conv, torch.randn(2, 2, 6, 6), None, exact="auto")
    weights = {i.name: i.data_type for i in proto.graph.initializer}
    ci = next(n for n in proto.graph.node if n.op_type == "ConvInteger")
    assert weights[ci.input[1]] == onnx.TensorProto.UINT8  # its u8 x s8 kernel is slower
    with pytest.raises(ValueError, match="exact='yes' must be True, False or 'auto'"):
        export_onnx(q, x[:2], None, exact="yes")


class _ResidualNorm(nn.Module):
    """Linear -> GELU -> Linear with a residual Add and a LayerNorm: a transformer FFN."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.up, self.act = nn.Linear(32, 64), nn.GELU(approximate=approximate)
        self.down, self.norm = nn.Linear(64, 32), nn.LayerNorm(32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.down(self.act(self.up(x))))


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_float_gelu_exports_as_the_pattern_ort_fuses(approximate, tmp_path) -> None:
    torch.manual_seed(0)
    model = _ResidualNorm(approximate).eval()
    path = tmp_path / "ffn.onnx"
    _, ort_model = _export(model, torch.randn(2, 5, 32), path, dynamic_axes=(0, 1))
    x = 3 * torch.randn(4, 7, 32)
    with torch.inference_mode():
        ref, out = model(x), ort_model(x)
    assert float((ref - out).abs().max()) < 1e-5  # the same function (float rounding)
    if approximate == "none":  # one Gelu kernel instead of five elementwise passes
        fused = _fused_ops(path, tmp_path)
        assert fused["Gelu"] + fused["BiasGelu"] == 1 and not fused["Erf"], fused
    # and inside a quantized model, between two INT8 layers
    qmodel = lowbit.quantize_dynamic(model)
    (qpath := tmp_path / "int8" / "ffn.onnx").parent.mkdir()
    _, ort_q = _export(qmodel, torch.randn(2, 5, 32), qpath, dynamic_axes=(0, 1))
    with torch.inference_mode():
        _assert_close(qmodel(x), ort_q(x), steps=0.05)


def test_cpu_sessions_leave_out_the_slow_skip_layer_norm_fusion(tmp_path) -> None:
    from lowbit.onnx import CPU_DISABLED_OPTIMIZERS

    torch.manual_seed(0)
    model = _ResidualNorm().eval()
    path = tmp_path / "ffn.onnx"
    export_onnx(lowbit.quantize_dynamic(model), torch.randn(2, 5, 32), path, dynamic_axes=(0, 1))
    x = torch.randn(3, 6, 32)
    outs = {}
    for disabled in (None, ()):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / f"optimized_{disabled is None}.onnx")
        so.log_severity_level = 3
        module = OnnxRuntimeModule(path, session_options=so, disabled_optimizers=disabled)
        outs[disabled] = module(x)
        fused = _ops(onnx.load(so.optimized_model_filepath))
        if disabled is None:  # the default on the CPU provider
            assert module.disabled_optimizers == CPU_DISABLED_OPTIMIZERS
            assert not fused["SkipLayerNormalization"] and fused["LayerNormalization"], fused
        else:  # ONNX Runtime's own choice: Add + LayerNormalization fused
            assert module.disabled_optimizers == ()
            assert fused["SkipLayerNormalization"] == 1, fused
    assert float((outs[None] - outs[()]).abs().max()) < 1e-5
    # the default follows the providers the session gets: a GPU one keeps every fusion (one
    # that is not installed falls back to the CPU, and so to the CPU's choice)
    with pytest.warns(UserWarning) if "CUDAExecutionProvider" not in (
            ort.get_available_providers()) else contextlib.nullcontext():
        gpu = OnnxRuntimeModule(path, providers=["CUDAExecutionProvider",
                                                 "CPUExecutionProvider"])
    expected = (() if "CUDAExecutionProvider" in ort.get_available_providers()
                else CPU_DISABLED_OPTIMIZERS)
    assert gpu.disabled_optimizers == expected
    with pytest.raises(TypeError, match=r"list of optimizer names, e.g. \['SkipLayerNormFusion'\]"):
        OnnxRuntimeModule(path, disabled_optimizers="SkipLayerNormFusion")  # one string


def test_a_size_the_graph_fixes_is_a_clear_error() -> None:
    """ONNX Runtime named only the index of a wrong size ("Got invalid dimensions for input:
    input for the following indices index: 1 Got: 7 Expected: 5"); the wrapper now names the
    shape the graph takes and how to export a variable sequence length."""
    torch.manual_seed(0)
    q = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(16, 4)))
    x = torch.randn(2, 5, 16)
    fixed = OnnxRuntimeModule(export_onnx(q, x, None))
    assert fixed(torch.randn(3, 5, 16)).shape == (3, 5, 4)  # the batch axis is dynamic
    with pytest.raises(ValueError, match=r"shape \(3, 7, 16\); the ONNX graph takes "
                                         r"\(\*, 5, 16\).*dynamic_axes=\(0, 1\)"):
        fixed(torch.randn(3, 7, 16))
    both = OnnxRuntimeModule(export_onnx(q, x, None, dynamic_axes=(0, 1)))
    y = torch.randn(3, 7, 16)
    assert torch.allclose(both(y), q(y), atol=1e-5)


def test_gpt2_cache_output_says_use_cache_false_and_the_flag_is_kept() -> None:
    """GPT-2 returns a ``DynamicCache`` by default, which export cannot hold: the error says
    to pass ``use_cache=False``. With it the graph has ``use_cache`` as a constant, and the
    ONNX Runtime module accepts the same inputs (it refused ``use_cache``: "unknown input")
    and refuses another value, which the graph cannot honour."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64,
                                       n_positions=16)).eval()
    qmodel = lowbit.quantize_dynamic(model)
    ids = torch.randint(0, 64, (2, 6))
    with pytest.raises(RuntimeError, match=r"cache object .*use_cache=False"):
        export_onnx(qmodel, {"input_ids": ids}, None)
    example = {"input_ids": ids, "use_cache": False}
    ort_model = OnnxRuntimeModule(export_onnx(qmodel, example, None))
    assert ort_model.constants == {"use_cache": False}
    with torch.inference_mode():
        ref = qmodel(**example).logits
    _assert_close(ref, ort_model(**example).logits, steps=0.01)
    with pytest.raises(ValueError, match=r"use_cache=True, but the graph was exported with "
                                         r"use_cache=False"):
        ort_model(input_ids=ids, use_cache=True)


@pytest.mark.parametrize("mode", ["dynamic", "static", "int4"])
def test_float16_and_float64_models_export_in_their_dtype(mode: str) -> None:
    """The export layers compute in float32 and hand the next layer the model's dtype, as the
    eager layers do: a float16 INT4 conv failed to export ("Input type (c10::Half) and bias
    type (float) should be the same") and INT8 layers fed float32 to float16 layers."""
    torch.manual_seed(0)
    for dtype in (torch.float16, torch.float64):
        model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Flatten(), nn.Linear(512, 16),
                              nn.LayerNorm(16), nn.Linear(16, 4)).eval().to(dtype)
        x = torch.randn(2, 3, 8, 8, dtype=dtype)
        q = {"dynamic": lambda m: lowbit.quantize_dynamic(m),
             "static": lambda m: lowbit.quantize_static(
                 m, [torch.randn(4, 3, 8, 8).to(x.dtype)], progress=False),  # noqa: B023
             "int4": lambda m: lowbit.quantize_weight_only(m, bits=4, group_size=8)}[mode](model)
        ort_model = OnnxRuntimeModule(export_onnx(q, x, None))
        with torch.no_grad():
            ref, out = q(x), ort_model(x)
        assert out.dtype == ref.dtype == dtype
        _assert_close(ref.float(), out.float(), steps=1.0 if mode == "int4" else 0.05)


def test_bfloat16_export_is_refused_with_the_fix_and_bf16_inputs_are_widened() -> None:
    import copy

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.LayerNorm(32), nn.Linear(32, 4)).eval()
    q = lowbit.quantize_dynamic(model.to(torch.bfloat16))
    x = torch.randn(3, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"1.weight is bfloat16.*\.float\(\)"):
        export_onnx(q, x, None)
    q32 = copy.deepcopy(q).float()
    ort_model = OnnxRuntimeModule(export_onnx(q32, x.float(), None))
    with torch.no_grad():
        _assert_close(q32(x.float()), ort_model(x))  # a bf16 tensor in: widened, not refused


class _ReadsWeights(nn.Module):
    """Model code that reads quantized layers' ``weight``: its dtype (CLIP casts its pixels
    to ``patch_embedding.weight.dtype``) and its values (MobileBERT's head multiplies by
    ``dense.weight``)."""

    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 4, 4)
        self.dense = nn.Linear(16, 32)
        self.unused = nn.Linear(16, 32)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x.to(self.patch.weight.dtype)).flatten(2).transpose(1, 2)
        return h @ self.dense.weight.t() + self.unused(h)


@pytest.mark.parametrize("mode", ["dynamic", "static", "int4"])
def test_model_code_that_reads_layer_weights_exports(mode: str, tmp_path) -> None:
    """The stand-ins had no ``weight`` ('ExportConv' object has no attribute 'weight'; INT4:
    a method). A layer whose weight the model reads gets it in the graph; others do not."""
    torch.manual_seed(0)
    model = _ReadsWeights().eval()
    x = torch.randn(2, 3, 16, 16)
    if mode == "static":
        qmodel = lowbit.quantize_static(model, [x], progress=False)
    elif mode == "dynamic":
        qmodel = lowbit.quantize_dynamic(model, progress=False)
    else:
        qmodel = lowbit.quantize_weight_only(model, bits=4, group_size=16, progress=False)
    proto, ort_model = _export(qmodel, x, tmp_path / f"{mode}.onnx")
    floats = sorted(tuple(t.dims) for t in proto.graph.initializer
                    if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
    assert (32, 16) in floats or (16, 32) in floats  # dense: its values are read
    assert floats.count((32, 16)) + floats.count((16, 32)) == 1  # unused: only its codes
    x2 = torch.randn(5, 3, 16, 16)
    with torch.inference_mode():
        ref = qmodel(x2)
    _assert_close(ref, ort_model(x2), steps=0.5)


def test_none_in_the_outputs_comes_back_as_none(tmp_path) -> None:
    """A model returning ``(logits, None)`` (no loss in eval) exported fine, but every
    OnnxRuntimeModule call raised "treespec.unflatten(leaves): leaves has length 1": the graph
    has no output for a None. The None now comes back where the model put it."""
    class WithNone(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> tuple[None, torch.Tensor, dict]:
            y = self.fc(x)
            return None, y, {"aux": None, "twice": y * 2}

    q = lowbit.quantize_dynamic(WithNone().eval())
    path = tmp_path / "m.onnx"
    export_onnx(q, torch.randn(2, 8), path)
    x = torch.randn(5, 8)
    none, y, extra = OnnxRuntimeModule(path)(x)
    want = q(x)
    assert none is None and extra["aux"] is None
    torch.testing.assert_close(y, want[1], rtol=0, atol=1e-5)
    torch.testing.assert_close(extra["twice"], want[2]["twice"], rtol=0, atol=1e-5)
