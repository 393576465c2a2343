"""Gradients through every quantized layer (lowbit.qgrad): adapters train wherever they sit,
the base never changes, and the inference path stays what it was."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.config import QuantizationConfig
from lowbit.lora import LORA_BASES, LoRALinear, add_lora, lora_parameters
from lowbit.modules import (
    Int4Linear,
    Int8WeightOnlyLinear,
    QuantizedConv1d,
    QuantizedConv2d,
    QuantizedLinear,
    WeightOnlyConv2d,
)


def _tensor_bytes(model: nn.Module, skip: set[int] = frozenset()) -> int:
    """Bytes of every tensor storage the model's modules hold (parameters, buffers and plain
    attributes such as kernel caches), each storage counted once."""
    seen: dict[int, int] = {}

    def visit(v: object) -> None:
        if isinstance(v, torch.Tensor) and id(v) not in skip:
            s = v.untyped_storage()
            seen[s.data_ptr()] = s.nbytes()
        elif isinstance(v, (tuple, list)):
            for i in v:
                visit(i)
        elif isinstance(v, dict):
            for i in v.values():
                visit(i)

    for m in model.modules():
        for k, v in vars(m).items():
            if k != "_modules":
                visit(v)
    return sum(seen.values())


def _layer(kind: str) -> tuple[nn.Module, torch.Tensor]:
    """A quantized layer of each kind (with a fused activation where it has one) and an input."""
    g = torch.Generator().manual_seed(0)
    lin, x2 = nn.Linear(48, 24), torch.randn(2, 5, 48, generator=g)
    conv, x4 = nn.Conv2d(3, 8, 3, padding=1), torch.randn(2, 3, 8, 8, generator=g)
    if kind == "dynamic":
        return QuantizedLinear.from_float(lin, QuantizationConfig.int8_dynamic(),
                                          fused_relu=True), x2
    if kind == "static":
        q = QuantizedLinear.from_float(lin, QuantizationConfig.int8_static(),
                                       input_qparams=(torch.tensor(0.01), torch.tensor(0)))
        return q, x2  # inputs beyond +-1.28 are clamped by the activation quantizer
    if kind == "int4":
        q = Int4Linear.from_float(lin, QuantizationConfig.int4_weight_only(16))
        q.fused_gelu = "tanh"
        return q, x2
    if kind == "int8_weight_only":
        cfg = QuantizationConfig(weights=lowbit.QuantSpec.int8_weight(), activations=None,
                                 mode="weight_only")
        return Int8WeightOnlyLinear.from_float(lin, cfg, fused_relu=True), x2
    if kind == "conv":
        q = QuantizedConv2d.from_float(conv, QuantizationConfig.int8_dynamic(), fused_relu=True)
        q.geometry["fused_maxpool"] = 2
        return q, x4
    if kind == "conv1d":
        conv1 = nn.Conv1d(4, 6, 3, padding_mode="reflect", padding=1)
        return QuantizedConv1d.from_float(conv1, QuantizationConfig.int8_dynamic()), \
            torch.randn(2, 4, 10, generator=g)
    if kind == "wo_conv":
        return WeightOnlyConv2d.from_float(conv, QuantizationConfig.int4_weight_only(9),
                                           fused_relu=True), x4
    raise AssertionError(kind)


KINDS = ["dynamic", "static", "int4", "int8_weight_only", "conv", "conv1d", "wo_conv"]


def _float_reference(q: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The float layer with the dequantized weight (activation quantizer as identity)."""
    w = q.dequantize_weight()
    if hasattr(q, "geometry"):
        g = q.geometry
        if g["pre_pad"] is not None:
            x = F.pad(x, g["pre_pad"], mode=g["pad_mode"])
        conv = F.conv1d if w.dim() == 3 else F.conv2d
        y = conv(x, w, q.bias, g["stride"], g["padding"], g["dilation"], g["groups"])
        y = F.relu(y) if q.fused_relu else y
        return F.max_pool2d(y, g["fused_maxpool"]) if g.get("fused_maxpool") else y
    y = F.linear(x, w, q.bias)
    if q.fused_gelu is not None:
        return F.gelu(y, approximate=q.fused_gelu)
    return F.relu(y) if q.fused_relu else y


@pytest.mark.parametrize("kind", KINDS)
def test_output_bits_and_inference_path_unchanged(kind: str) -> None:
    q, x = _layer(kind)
    with torch.inference_mode():
        ref = q(x)
    with torch.no_grad():
        assert torch.equal(q(x.requires_grad_()), ref)
    x.requires_grad_(True)
    y = q(x)  # the grad path runs the same integer kernels
    assert torch.equal(y.detach(), ref) and y.requires_grad and y.grad_fn is not None
    assert q(x.detach()).grad_fn is None  # an input without grad: no autograd at all
    assert not any(b.requires_grad for b in q.buffers())


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("unbatched", [False, True])
def test_output_is_writable_in_place_under_autograd(kind: str, unbatched: bool) -> None:
    """Model code writes into a layer's output while training (Wav2Vec2's SpecAugment:
    ``hidden_states[mask] = masked_spec_embed`` after its projection), as nn.Linear allows;
    the output was a view made inside lowbit's autograd Function, which autograd refuses to
    have written in place."""
    q, x = _layer(kind)
    x = (x[0] if unbatched else x).detach().requires_grad_()
    y = q(x)
    y[..., 0, :] = 0.0  # (the batch and sequence dims of a Linear; a conv's rows)
    v = torch.randn(y.shape, generator=torch.Generator().manual_seed(2))
    (y * v).sum().backward()
    got, x.grad = x.grad.clone(), None
    want_y = _float_reference(q, x)
    want_y = want_y.clone()
    want_y[..., 0, :] = 0.0
    (want_y * v).sum().backward()
    assert got.shape == x.shape and x.grad.abs().sum() > 0
    assert F.cosine_similarity(got.flatten(), x.grad.flatten(), dim=0) > 0.9


@pytest.mark.parametrize("kind", KINDS)
def test_input_gradient_is_the_dequantized_float_layers(kind: str) -> None:
    q, x = _layer(kind)
    x = x.requires_grad_()
    out = q(x)
    v = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    (out * v).sum().backward()
    got, x.grad = x.grad.clone(), None
    (_float_reference(q, x) * v).sum().backward()
    want = x.grad
    if kind == "static":  # STE: zero where the activation quantizer clamped the input
        spec = q.act_spec
        codes = torch.round(x.detach() / 0.01)
        clamped = (codes < spec.qmin) | (codes > spec.qmax)
        assert clamped.any() and not clamped.all()
        want = want * ~clamped
        assert torch.all(got[clamped] == 0)
    if kind in ("dynamic", "conv", "conv1d"):  # activation rounding flips a few ReLU / pools
        cos = F.cosine_similarity(got.flatten(), want.flatten(), dim=0)
        assert cos > 0.995, cos
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 64), nn.GELU(),
                         nn.Linear(64, 8))


def _dequantized_twin(model: nn.Module) -> nn.Module:
    """A float copy: every quantized linear layer (adapter bases included) becomes an
    ``nn.Linear`` with the dequantized weight, followed by the activation fused into it."""
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, LORA_BASES) and name:
            fl = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            with torch.no_grad():
                fl.weight.copy_(m.dequantize_weight())
                if m.bias is not None:
                    fl.bias.copy_(m.bias)
            fl.requires_grad_(False)
            act = (nn.GELU(m.fused_gelu) if m.fused_gelu else nn.ReLU() if m.fused_relu
                   else None)
            twin.set_submodule(name, fl if act is None else nn.Sequential(fl, act))
    return twin


def _perturb(model: nn.Module) -> None:
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in lora_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _lora_grads(model: nn.Module, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss(model).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", ["int4", "int8_weight_only"])
def test_adapter_on_the_first_layer_only(method: str, monkeypatch) -> None:
    """The adapter of layer 0 trains through two quantized layers without adapters; its
    gradient equals the float model's with the dequantized weights."""
    monkeypatch.setattr(Int4Linear, "int8_activations", False)  # float32 activations
    bits = 4 if method == "int4" else 8
    q = lowbit.quantize_weight_only(_mlp(), bits=bits, group_size=32)
    assert q[2].fused_gelu == "none" and q[0].fused_relu
    lq = add_lora(q, r=4, target_modules=["0"])
    _perturb(lq)
    x = torch.randn(16, 32, generator=torch.Generator().manual_seed(2))
    got = _lora_grads(lq, lambda m: m(x).square().mean())
    assert set(got) == {"0.lora_A", "0.lora_B"}
    assert all(p.grad is None for n, p in lq.named_parameters() if "lora" not in n)
    want = _lora_grads(_dequantized_twin(lq), lambda m: m(x).square().mean())
    assert set(want) == set(got)
    # INT4 runs fp32 kernels here (float roundoff only); INT8 weight-only may round its
    # activations to bf16 for the packed kernel
    tol = 1e-4 if method == "int4" else 2e-2
    for n in got:
        assert (got[n] - want[n]).norm() <= tol * want[n].norm(), n


def test_fifty_steps_leave_every_base_tensor_byte_identical() -> None:
    """Static INT8, dynamic INT8 and INT4 layers with and without adapters, a float conv
    front: after 50 Adam steps every integer buffer and qparam is unchanged."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 64),
                          nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    cfg = QuantizationConfig.int8_static(layer_overrides={
        "5": QuantizationConfig.int8_dynamic(),
        "7": QuantizationConfig.int4_weight_only(group_size=16)})
    data = [torch.randn(32, 1, 8, 8) for _ in range(2)]
    q = lowbit.PTQQuantizer(cfg, progress=False).quantize(model, data)
    assert isinstance(q[0], QuantizedConv2d) and isinstance(q[7], Int4Linear)
    lq = add_lora(q, r=4, target_modules=["3"])  # the conv and layers 5, 7: no adapter
    before = {k: v.clone() for k, v in lq.state_dict().items() if "lora" not in k}
    opt = torch.optim.Adam(lora_parameters(lq), lr=1e-2)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    lq.train()
    losses = []
    for _ in range(50):
        opt.zero_grad()
        loss = F.cross_entropy(lq(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0]
    after = lq.state_dict()
    for k, v in before.items():
        assert v.dtype == after[k].dtype and torch.equal(v, after[k]), k
    assert all(b.grad is None for b in lq.buffers())


def test_backward_keeps_no_float_weight_and_int4_model_is_small() -> None:
    """Memory is QLoRA's point: the INT4 model (without adapters) is <= 0.3x the FP32 model's
    bytes, kernel caches included, and a backward pass leaves nothing float behind."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(512, 512) for _ in range(4)], nn.LayerNorm(512))
    q = lowbit.quantize_weight_only(model, bits=4, group_size=128)
    lq = add_lora(q, r=8)
    adapters = {id(p) for p in lora_parameters(lq)}
    x = torch.randn(8, 512)
    for _ in range(2):  # builds every lazy kernel cache and prepared call of the shapes used
        lq(x).sum().backward()
    fp32 = _tensor_bytes(model)
    state = sum(t.numel() * t.element_size() for k, t in
                [*lq.named_parameters(), *lq.named_buffers()] if "lora" not in k)
    grads = {id(p.grad) for p in lora_parameters(lq)}
    walked = _tensor_bytes(lq, skip=adapters | grads)
    assert state <= 0.2 * fp32, state / fp32  # parameters + buffers
    assert walked <= 0.3 * fp32, walked / fp32  # every tensor, kernel caches included
    lq(x).sum().backward()
    assert _tensor_bytes(lq, skip=adapters | grads) == walked


def test_adapter_inside_a_model_that_runs_in_bf16() -> None:
    q = lowbit.quantize_weight_only(_mlp(), bits=4, group_size=32)
    lq = add_lora(q, r=4, target_modules=["0"])
    x = torch.randn(4, 32).bfloat16()
    y = lq(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert lq[0].lora_A.grad is not None and lq[0].lora_A.grad.dtype == torch.float32


def test_lora_layers_stay_lora_layers() -> None:
    """Fused activation moves to the wrapper; the grad path applies it after the update."""
    q = lowbit.quantize_dynamic(_mlp())
    lq = add_lora(q, r=4, target_modules=["2"])
    assert isinstance(lq[2], LoRALinear) and lq[2].fused_gelu == "none"
    assert lq[2].base.fused_gelu is None


@pytest.mark.parametrize("bits", [8, 4])
def test_adapter_gradients_under_torch_compile_match_eager(bits: int) -> None:
    """Inside torch.compile a quantized layer became an opaque op fed ``x.detach()``: an
    adapter before another quantized layer got no gradient through it (relative error 1.0,
    training 4x slower to move the loss, silently). Inputs that require grad now take the
    eager differentiable call there."""

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 10))
    q = lowbit.quantize_dynamic(model) if bits == 8 else lowbit.quantize_weight_only(
        model, bits=4, group_size=32)
    x = torch.randn(16, 64)

    def grads(compiled: bool) -> dict[str, torch.Tensor]:
        torch.manual_seed(1)
        adapted = lowbit.add_lora(q)
        with torch.no_grad():
            for p in lowbit.lora_parameters(adapted):
                p.add_(0.01 * torch.randn_like(p))  # B is zero at first: make it count
        run = torch.compile(adapted) if compiled else adapted
        run(x).pow(2).mean().backward()
        return {n: p.grad for n, p in adapted.named_parameters() if p.requires_grad}

    torch._dynamo.reset()
    eager, compiled = grads(False), grads(True)
    assert eager.keys() == compiled.keys() and len(eager) == 4
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-4, atol=1e-6, msg=name)
