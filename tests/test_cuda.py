"""Quantized models on CUDA (skipped without a GPU): ``.to("cuda")`` runs them there, close to CPU.

The C kernels and the output pool are CPU-only; on CUDA the modules take the PyTorch paths.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lowbit.config import QuantizationConfig
from lowbit.lora import add_lora, lora_parameters
from lowbit.models import MLP, MnistCNN, TransformerEncoderBlock
from lowbit.ptq import PTQQuantizer, quantize_dynamic, quantize_static, quantize_weight_only
from lowbit.qat import convert_qat, prepare_qat
from lowbit.serialization import load, save

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _quantize(model: nn.Module, method: str, example: torch.Tensor) -> nn.Module:
    if method == "dynamic":
        return quantize_dynamic(model)
    if method == "static":
        return quantize_static(model, [example], progress=False)
    if method == "int4":
        return quantize_weight_only(model, bits=4, group_size=32)
    return quantize_weight_only(model, bits=8)


def _fit(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor) -> list[float]:
    """20 Adam steps fitting ``model(x)`` to a random 10-wide target; the losses."""
    opt = torch.optim.Adam(params, lr=1e-2)
    target = torch.randn(x.shape[0], 10, device=x.device)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(x), target)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@needs_cuda
@pytest.mark.parametrize("method", ["dynamic", "static", "int4", "int8_weight_only"])
@pytest.mark.parametrize("which", ["mlp", "cnn", "encoder"])
def test_quantized_models_run_on_cuda(which: str, method: str) -> None:
    torch.manual_seed(0)
    model, x = {
        "mlp": lambda: (MLP(), torch.randn(32, 1, 28, 28)),
        "cnn": lambda: (MnistCNN(), torch.randn(32, 1, 28, 28)),
        "encoder": lambda: (TransformerEncoderBlock(hidden=64, heads=4, ffn=128),
                            torch.randn(4, 24, 64)),
    }[which]()
    q = _quantize(model.eval(), method, x)
    with torch.inference_mode():
        ref = q(x)
        qc = copy.deepcopy(q).to("cuda")
        y = qc(x.cuda())
        assert y.is_cuda and y.shape == ref.shape and y.dtype == ref.dtype
        cos = torch.nn.functional.cosine_similarity(y.cpu().flatten().double(),
                                                    ref.flatten().double(), dim=0)
        assert float(cos) > 0.999, (which, method, float(cos))
        for batch in (x[:1], x[:3]):  # small calls take other kernels on CPU
            yb = qc(batch.cuda())
            assert yb.is_cuda and torch.isfinite(yb).all()


@needs_cuda
@pytest.mark.parametrize("config", ["int8_static", "int4_weight_only"])
def test_qat_trains_and_converts_on_cuda(config: str) -> None:
    """prepare_qat on a CUDA model, a few optimizer steps there, convert, run the integer model
    on CUDA: it agrees with the fake-quantized model it came from."""
    torch.manual_seed(0)
    cfg = (QuantizationConfig.int8_static() if config == "int8_static"
           else QuantizationConfig.int4_weight_only(group_size=32))
    qat = prepare_qat(MnistCNN().cuda().train(), cfg)
    opt = torch.optim.Adam(qat.parameters(), lr=1e-3)
    x, y = torch.randn(64, 1, 28, 28, device="cuda"), torch.randint(0, 10, (64,), device="cuda")
    for _ in range(5):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(qat(x), y)
        loss.backward()
        opt.step()
    assert torch.isfinite(loss)
    qat.eval()
    converted = convert_qat(qat)
    with torch.inference_mode():
        a, b = qat(x), converted(x)
    assert b.is_cuda
    cos = nn.functional.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0)
    assert float(cos) > 0.99, float(cos)


@needs_cuda
def test_lora_on_a_quantized_base_trains_on_cuda() -> None:
    torch.manual_seed(0)
    q = quantize_weight_only(MLP().eval(), bits=4, group_size=32)
    lq = add_lora(q, r=4).cuda()
    losses = _fit(lq, lora_parameters(lq), torch.randn(32, 1, 28, 28, device="cuda"))
    assert losses[-1] < losses[0]


@needs_cuda
@pytest.mark.parametrize("method", ["dynamic", "static", "int4"])
def test_quantizing_a_cuda_model_keeps_it_on_cuda(method: str, tmp_path) -> None:
    """PTQ of a model already on CUDA (calibrating on CUDA batches) gives a CUDA model; saved and
    loaded back on CPU it gives the same outputs up to kernel rounding."""
    torch.manual_seed(0)
    model = MnistCNN().eval().cuda()
    x = torch.randn(32, 1, 28, 28, device="cuda")
    q = _quantize(model, method, x)
    devices = {t.device.type for t in [*q.parameters(), *q.buffers()]}
    assert devices == {"cuda"}, devices
    with torch.inference_mode():
        y = q(x)
        assert y.is_cuda
        save(q, tmp_path / "q")
        back = load(tmp_path / "q", model=MnistCNN())
        cpu = back(x.cpu())
    cos = nn.functional.cosine_similarity(cpu.flatten().double(), y.cpu().flatten().double(), 0)
    assert float(cos) > 0.999, float(cos)


# ---------------------------------------------------------------- features added since
def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(nn.functional.cosine_similarity(a.detach().cpu().flatten().double(),
                                                 b.detach().cpu().flatten().double(), dim=0))


@needs_cuda
def test_cuda_backend_is_listed_compared_and_selectable() -> None:
    """The ``cuda`` backend: available here, measured by ``compare`` against ``reference`` (CPU
    tensors in and out), and ``set_backend`` returns a model that runs there."""
    from lowbit import backends

    torch.manual_seed(0)
    q = quantize_dynamic(MLP().eval())
    x = torch.randn(16, 1, 28, 28)
    assert backends.available()["cuda"].available
    table = backends.compare(q, x, backends=["reference", "cuda"], iters=5, warmup=1)
    row = table["cuda"]
    assert row.available and row.cosine > 0.999, table.to_markdown()
    on_gpu = backends.set_backend(q, "cuda")
    y = on_gpu(x)
    assert y.device.type == "cpu" and _cos(y, q(x)) > 0.999


@needs_cuda
@pytest.mark.parametrize("method", ["dynamic", "static", "int4"])
def test_compile_and_export_on_cuda_match_eager(method: str) -> None:
    """The custom op has a CUDA kernel: ``torch.compile`` (Inductor, Triton) traces a CUDA
    quantized model with no graph break and gives eager's outputs; ``torch.export`` too."""
    torch.manual_seed(0)
    x = torch.randn(8, 1, 28, 28)
    q = _quantize(MnistCNN().eval(), method, x).cuda()
    xc = x.cuda()
    with torch.inference_mode():
        want = q(xc)
    explained = torch._dynamo.explain(q)(xc)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    with torch.inference_mode():
        got = torch.compile(q)(xc)
    assert got.is_cuda and _cos(got, want) > 0.99999
    program = torch.export.export(q, (xc,))
    with torch.inference_mode():
        exported = program.module()(xc)
    assert exported.is_cuda and _cos(exported, want) > 0.99999


@needs_cuda
@pytest.mark.parametrize("kind", ["LSTM", "GRU", "MHA"])
def test_dynamic_rnn_and_attention_on_cuda(kind: str) -> None:
    """INT8 dynamic LSTM / GRU (bidirectional, 2 layers, packed sequences) and
    MultiheadAttention moved to CUDA give the CPU module's outputs up to kernel rounding."""
    torch.manual_seed(0)
    x = torch.randn(3, 20, 16)
    if kind == "MHA":
        f: nn.Module = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    else:
        f = getattr(nn, kind)(16, 32, num_layers=2, bidirectional=True, batch_first=True).eval()
    q = quantize_dynamic(nn.Sequential(f))[0]
    assert type(q).__name__ != type(f).__name__, "not quantized"
    qc = copy.deepcopy(q).cuda()
    with torch.inference_mode():
        if kind == "MHA":
            mask = torch.rand(3, 20) > 0.8
            mask[:, 0] = False
            want, got = q(x, x, x, key_padding_mask=mask), qc(*[x.cuda()] * 3,
                                                              key_padding_mask=mask.cuda())
            assert _cos(got[0], want[0]) > 0.999 and _cos(got[1], want[1]) > 0.999
            return
        want, got = q(x), qc(x.cuda())
        assert got[0].is_cuda and _cos(got[0], want[0]) > 0.999
        assert _cos(got[1] if kind == "GRU" else got[1][0], want[1] if kind == "GRU"
                    else want[1][0]) > 0.999
        packed = nn.utils.rnn.pack_padded_sequence(x, [20, 13, 4], batch_first=True)
        pw = q(packed)[0].data
        pg = qc(nn.utils.rnn.pack_padded_sequence(x.cuda(), [20, 13, 4], batch_first=True))
        assert _cos(pg[0].data, pw) > 0.999


@needs_cuda
@pytest.mark.parametrize("method", ["gptq", "awq", "signround"])
def test_weight_calibration_of_a_cuda_model(method: str) -> None:
    """GPTQ / AWQ / SignRound on a CUDA model with CUDA calibration batches: the INT4 model
    stays on CUDA, beats round-to-nearest there, and is close to the same method run on CPU."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.GELU(), nn.Linear(96, 32)).eval()
    x = torch.randn(256, 64) * torch.linspace(0.2, 3, 64)
    kwargs = {"iters": 20} if method == "signround" else {}
    cfg = QuantizationConfig.int4_weight_only(16, method=method, method_kwargs=kwargs)
    calib = list(x.split(64))
    q_gpu = PTQQuantizer(cfg, progress=False).quantize(copy.deepcopy(model).cuda(),
                                                       [b.cuda() for b in calib])
    q_cpu = PTQQuantizer(cfg, progress=False).quantize(model, calib)
    rtn = quantize_weight_only(model, bits=4, group_size=16)
    assert {t.device.type for t in [*q_gpu.parameters(), *q_gpu.buffers()]} == {"cuda"}
    with torch.inference_mode():
        ref = model(x)
        err = {name: float(((y.cpu() - ref) ** 2).mean()) for name, y in
               (("gpu", q_gpu(x.cuda())), ("cpu", q_cpu(x)), ("rtn", rtn(x)))}
    assert err["gpu"] < err["rtn"] and err["gpu"] < 1.25 * err["cpu"], err


@needs_cuda
def test_smooth_quant_and_sensitivity_on_cuda() -> None:
    """SmoothQuant W8A8 and the per-layer sensitivity analysis on a CUDA model and data."""
    from lowbit.sensitivity import analyze_sensitivity

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8)).eval().cuda()
    x = torch.randn(256, 32, device="cuda")
    x[:, 3] *= 30  # an outlier channel
    calib = list(x.split(64))
    sq = quantize_static(model, calib, progress=False, smooth_quant=0.5)
    plain = quantize_static(model, calib, progress=False)
    with torch.inference_mode():
        ref = model(x)
        e_sq, e_plain = (float(((m(x) - ref) ** 2).mean()) for m in (sq, plain))
    assert sq[0].meta()["extra"]["smooth_quant"] == 0.5 and e_sq < e_plain, (e_sq, e_plain)
    report = analyze_sensitivity(model, QuantizationConfig.int8_dynamic(),
                                 example_input=x[:16], progress=False)
    assert {r.name for r in report.rows} == {"0", "2"}


@needs_cuda
def test_peft_lora_on_a_quantized_model_trains_on_cuda() -> None:
    """peft wraps lowbit's INT4 layers of a CUDA model (with one float layer: peft reads the
    device from a parameter); a few steps lower the loss there."""
    from peft import LoraConfig, get_peft_model

    import lowbit

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.LayerNorm(96), nn.Linear(96, 10)).eval()
    q = quantize_weight_only(model, bits=4, group_size=32).cuda()
    pm = get_peft_model(q, lowbit.register_peft(LoraConfig(r=4, target_modules=["0", "2"])))
    assert pm.base_model.model[0].base_layer.qweight.is_cuda
    losses = _fit(pm, [p for p in pm.parameters() if p.requires_grad],
                  torch.randn(32, 64, device="cuda"))
    assert losses[-1] < losses[0]
