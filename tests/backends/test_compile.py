"""torch.compile / torch.export of quantized models: no graph break, exported == eager."""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn

import lowbit
from lowbit import backends

MODES = ["dynamic", "static", "int4"]
needs_aoti = pytest.mark.skipif(not backends.available()["aotinductor"].available,
                                reason=f"aotinductor: {backends.available()['aotinductor'].reason}")


def _explain_and_export(qmodel: nn.Module, x: object, run) -> None:
    args, kwargs = ((), x) if isinstance(x, dict) else ((x,), {})
    torch._dynamo.reset()
    explained = torch._dynamo.explain(qmodel)(*args, **kwargs)  # (grad mode: the op's backward)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1
    ops = [n for g in explained.graphs for n in g.graph.nodes
           if n.op == "call_function" and "quantized_layer" in str(n.target)]
    layers = {id(m) for m in qmodel.modules() if hasattr(m, "kernel_info")}
    assert len(ops) >= len(layers) > 0  # every quantized layer is one opaque op
    program = torch.export.export(qmodel, args, kwargs)
    assert "lowbit.quantized_layer" in str(program.graph)
    out = program.module()(*args, **kwargs)
    out = out[0] if isinstance(out, (tuple, list)) else getattr(out, "last_hidden_state", out)
    assert torch.equal(out, run(qmodel, x))


@pytest.mark.parametrize("arch", ["mlp", "cnn", "bert"])
def test_no_graph_break_and_export_equals_eager(arch: str, make_quantized, run) -> None:
    for mode in MODES:
        qmodel, x = make_quantized(f"{arch}-{mode}")
        _explain_and_export(qmodel, x, run)


@pytest.mark.parametrize("kind", ["bert-dynamic", "bert-static", "cnn-static", "mlp-int4"])
def test_gradients_through_compiled_layers_equal_eager(kind: str, make_quantized) -> None:
    """The op took ``x.detach()``: float layers before a quantized one got no gradient through
    it inside torch.compile. Its backward is now the eager one (dequantized weight), in the
    same graph: the float parameters' gradients equal eager training's."""
    qmodel, x = make_quantized(kind)
    args, kwargs = ((), x) if isinstance(x, dict) else ((x.clone().requires_grad_(),), {})

    def grads(model: nn.Module) -> dict[str, torch.Tensor]:
        qmodel.zero_grad(set_to_none=True)
        out = model(*args, **kwargs)
        out = getattr(out, "last_hidden_state", out)
        out.float().pow(2).mean().backward()
        got = {n: p.grad.clone() for n, p in qmodel.named_parameters() if p.grad is not None}
        if args:
            got["input"] = args[0].grad.clone()
            args[0].grad = None
        return got

    eager = grads(qmodel)
    torch._dynamo.reset()
    compiled = grads(torch.compile(qmodel))
    assert eager and eager.keys() == compiled.keys()
    for name, g in eager.items():
        torch.testing.assert_close(compiled[name], g, rtol=1e-3, atol=1e-6, msg=name)


def test_a_trace_without_gradients_calls_the_live_layer(make_quantized) -> None:
    """Under ``torch.no_grad()`` (and for inputs that need no gradient) a compiled graph calls
    each layer through ``lowbit.quantized_layer_live``: the module itself, by a handle, with no
    buffers as graph inputs and no Python autograd kernel (the buffer op cost 12-19 us more per
    layer call at batch 1). A layer whose input needs a gradient keeps the op with the eager
    backward; ``torch.export`` keeps the self-contained buffer op."""
    qmodel, x = make_quantized("mlp-dynamic")

    def graph(inputs: torch.Tensor) -> torch.fx.Graph:
        torch._dynamo.reset()
        graphs = torch._dynamo.explain(qmodel)(inputs).graphs
        assert len(graphs) == 1
        return graphs[0].graph

    def layer_ops(g: torch.fx.Graph) -> list[str]:
        return [str(n.target) for n in g.nodes
                if n.op == "call_function" and "quantized_layer" in str(n.target)]

    layers = sum(hasattr(m, "kernel_info") for m in qmodel.modules())
    for context in (torch.no_grad(), torch.enable_grad()):  # (x needs no gradient)
        with context:
            g = graph(x)
        assert layer_ops(g) == ["lowbit.quantized_layer_live"] * layers
        assert [n.op for n in g.nodes].count("placeholder") == 1  # x only: no buffers
    assert layer_ops(graph(x.clone().requires_grad_())) == ["lowbit.quantized_layer"] * layers
    program = torch.export.export(qmodel, (x,))
    assert "quantized_layer_live" not in str(program.graph)
    torch._dynamo.reset()
    with torch.no_grad():
        compiled = torch.compile(qmodel)(x)
    assert torch.equal(compiled, qmodel(x))


@pytest.mark.parametrize("kind", ["mlp-dynamic", "cnn-static", "mlp-int4"])
def test_a_compiled_model_follows_its_layers_and_copies_keep_their_own(kind: str,
                                                                        make_quantized) -> None:
    """The live op calls the module a graph was traced from: a buffer assigned after compiling
    is used (as eager does), and a deep copy, which carries the original's attributes, gets a
    layer of its own when compiled (its graph never calls the original's layers)."""
    qmodel, x = make_quantized(kind)
    torch._dynamo.reset()
    compiled = torch.compile(qmodel)
    with torch.no_grad():
        assert torch.equal(compiled(x), qmodel(x))
        twin = copy.deepcopy(qmodel)
        layer = next(m for m in twin.modules() if hasattr(m, "kernel_info"))
        name = "weight_scale" if hasattr(layer, "weight_scale") else "scales"
        setattr(layer, name, getattr(layer, name) * 2)  # the copy changes; the original not
        changed = twin(x)
        assert not torch.equal(changed, qmodel(x))
        assert torch.equal(torch.compile(twin)(x), changed)
        assert torch.equal(compiled(x), qmodel(x))
        layer = next(m for m in qmodel.modules() if hasattr(m, "kernel_info"))
        setattr(layer, name, getattr(layer, name) * 2)  # the original, after compiling
        assert torch.equal(compiled(x), qmodel(x))
        assert torch.equal(compiled(x), changed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inductor_cache_never_serves_another_models_graph(dtype: torch.dtype, tmp_path,
                                                          monkeypatch) -> None:
    """Inductor's on-disk FX-graph cache keys on the graph's text. With handles alone, a
    second process (the handle counter restarting at 1) compiling a model of other widths
    wrote the same graph and got the first model's compiled code: wrong sizes ("malloc():
    invalid next size", or an assertion on the output's shape). The layer's spec is in the
    graph now, so each model gets its own entry."""
    from lowbit import _dispatch

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    x = torch.randn(4, 64, dtype=dtype)
    for hidden in (96, 128, 96):  # (the third: a hit of the first's entry, which is right)
        torch._dynamo.reset()
        monkeypatch.setattr(_dispatch, "_NEXT_HANDLE", itertools.count(1))  # a new process
        torch.manual_seed(hidden)
        model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, 8)).eval()
        q = lowbit.quantize_dynamic(model.to(dtype))
        with torch.no_grad():
            assert torch.equal(torch.compile(q)(x), q(x)), hidden


def test_a_graph_whose_layer_is_gone_says_so() -> None:
    with pytest.raises(RuntimeError, match=r"no longer exists.*compile the model again"):
        torch.ops.lowbit.quantized_layer_live(torch.randn(2, 4), 10**15, "{}")


@pytest.mark.parametrize("method", ["smooth_quant", "awq"])
def test_smoothed_layers_trace_without_graph_break(method: str, run) -> None:
    """AWQ / SmoothQuant layers multiply their input first; large inputs take that product
    from lowbit's output pool in eager mode, never inside a traced graph."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(384, 512), nn.ReLU(), nn.Linear(512, 8)).eval()
    x = torch.randn(1024, 384) * torch.linspace(0.1, 10.0, 384)  # 1.5 MB: a pooled product
    if method == "awq":
        qmodel = lowbit.quantize_weight_only(model, bits=4, group_size=128, method="awq",
                                             calibration_data=[x[:64]], progress=False)
    else:
        qmodel = lowbit.quantize_dynamic(model, smooth_quant=0.5, calibration_data=[x[:64]],
                                         progress=False)
    assert qmodel[0].input_smoothing is not None
    _explain_and_export(qmodel, x, run)


def test_export_keeps_the_batch_dynamic_and_each_layer_backend(make_quantized, run) -> None:
    qmodel, x = make_quantized("cnn-static")
    batch = torch.export.Dim("batch", min=1, max=1024)
    program = torch.export.export(qmodel, (x,), dynamic_shapes=({0: batch},))
    for n in (1, 7):
        xb = torch.randn(n, 1, 28, 28)
        assert torch.equal(program.module()(xb), run(qmodel, xb))
    backends.set_backend(qmodel, "torch")  # the layer backend is part of the exported spec
    program = torch.export.export(qmodel, (x,))
    assert "'backend': 'torch'" in str(program.graph_module.code)
    assert torch.equal(program.module()(x), run(qmodel, x))


def test_cpp_wrapper_compile_equals_eager(make_quantized, run) -> None:
    """Inductor's C++ wrapper writes each layer's spec as a C++ string literal, unescaped (a
    spec with double quotes did not compile)."""
    qmodel, x = make_quantized("mlp-dynamic")
    torch._dynamo.reset()
    compiled = torch.compile(qmodel, options={"cpp_wrapper": True})
    assert torch.equal(run(compiled, x), run(qmodel, x))


@pytest.mark.parametrize("mode", MODES)
def test_a_layer_reused_under_two_names_exports_and_compiles(mode: str,
                                                             shared_layer_model) -> None:
    """torch.export (non-strict) calls a reused layer through its tracer's proxy of it, not the
    live module: the op's spec lookup by id failed ("no live quantized module"), and so did
    every export-based backend (aotinductor, ONNX)."""
    torch.manual_seed(0)
    model = shared_layer_model
    q = (lowbit.quantize_dynamic(model) if mode == "dynamic" else
         lowbit.quantize_static(model, [torch.randn(8, 8)], progress=False)
         if mode == "static" else lowbit.quantize_weight_only(model, bits=4, group_size=8))
    assert q.a is q.b
    x = torch.randn(3, 8)
    _explain_and_export(q, x, lambda m, x: m(x))
    assert torch.equal(torch.export.export(q, (x,), strict=True).module()(x), q(x))


@needs_aoti
def test_aotinductor_backend_equals_eager(make_quantized, run) -> None:
    """torch.export -> AOTInductor (the ``aotinductor`` backend): the compiled library calls
    lowbit's op and gives eager's bits at any batch size, from a batch-1 example."""
    qmodel, x = make_quantized("cnn-static")
    qmodel.train()  # exported in eval mode, from a copy: the user's model keeps its mode
    compiled = backends.set_backend(qmodel, "aotinductor", x[:1])
    assert isinstance(compiled, backends.AOTInductorModule) and qmodel.training
    qmodel.eval()
    for n in (1, 5):
        xb = torch.randn(n, 1, 28, 28)
        assert torch.equal(run(compiled, xb), run(qmodel, xb))


@needs_aoti
def test_aotinductor_dynamic_axes_keep_the_sequence_length_free(make_quantized, run) -> None:
    qmodel, x = make_quantized("bert-dynamic")
    compiled = backends.set_backend(qmodel, "aotinductor", x, dynamic_axes=(0, 1))
    longer = {k: torch.cat([v, v], dim=1) for k, v in x.items()}
    assert torch.allclose(run(compiled, longer), run(qmodel, longer), atol=1e-5)


@needs_aoti
def test_aotinductor_backend_checks_what_the_library_would_not(make_quantized, run) -> None:
    """Keyword inputs (a BERT's token ids): the batch is dynamic, the sequence length is the
    example's; another length or dtype is refused before the compiled code could read past
    its buffers (it does not check sizes itself)."""
    qmodel, x = make_quantized("bert-dynamic")
    compiled = backends.set_backend(qmodel, "aotinductor", x)
    three = {k: v[:1].repeat(3, 1) for k, v in x.items()}
    assert torch.allclose(run(compiled, three), run(qmodel, three), atol=1e-5)
    longer = {k: torch.cat([v, v], dim=1) for k, v in x.items()}
    with pytest.raises(ValueError, match=r"input input_ids has shape \(2, 16\).*\(\*, 8\)"):
        compiled(**longer)
    with pytest.raises(ValueError, match=r"torch\.int32"):
        compiled(**{**x, "input_ids": x["input_ids"].int()})
    # called like the model: positionally too (it was traced with keywords), and what the
    # example did not pass is named (the compiled program had refused both with a bare "kwarg
    # keyword mismatch")
    with torch.inference_mode():
        positional = compiled(x["input_ids"], x["attention_mask"])
    assert torch.allclose(positional.last_hidden_state, run(qmodel, x), atol=1e-5)
    with pytest.raises(ValueError, match="input attention_mask is a NoneType"):
        compiled(x["input_ids"])
    with pytest.raises(ValueError, match="'token_type_ids' was not among the example inputs"):
        compiled(**x, token_type_ids=torch.zeros_like(x["input_ids"]))


@needs_aoti
def test_aotinductor_package_runs_in_another_process(make_quantized, run, tmp_path) -> None:
    """The deployment path: a package written here runs in a fresh process that imports lowbit
    (the op rebuilds each layer from its spec and the packaged buffers) and gives these bits."""
    import subprocess
    import sys

    qmodel, x = make_quantized("mlp-int4")
    program = torch.export.export(qmodel, (x,))
    package = torch._inductor.aoti_compile_and_package(
        program, package_path=str(tmp_path / "mlp.pt2"))
    torch.save({"x": x, "y": run(qmodel, x)}, tmp_path / "io.pt")
    code = ("import sys, torch, lowbit\n"
            "io = torch.load(sys.argv[2], weights_only=True)\n"
            "runner = torch._inductor.aoti_load_package(sys.argv[1])\n"
            "with torch.inference_mode():\n"
            "    print(torch.equal(runner(io['x']), io['y']))\n")
    out = subprocess.run([sys.executable, "-c", code, package, str(tmp_path / "io.pt")],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "True"


def test_exported_program_runs_without_the_original_model(make_quantized, run) -> None:
    """A layer the op cannot find alive is rebuilt from the spec and the exported buffers."""
    qmodel, x = make_quantized("mlp-int4")
    expected = run(qmodel, x)
    program = torch.export.export(qmodel, (x,))
    state = {k: v.clone() for k, v in program.state_dict.items()}
    del qmodel
    program = program.run_decompositions({})  # (a new program object, same graph)
    gm = program.module()
    gm.load_state_dict(state, strict=False)
    assert torch.equal(gm(x), expected)


def test_torch_compile_backend_equals_eager(run) -> None:
    torch.manual_seed(0)
    model = lowbit.models.MLP(in_features=32, hidden=(48,), num_classes=10).eval()
    x = torch.randn(4, 32)
    qmodel = lowbit.quantize_weight_only(model, 4, 32)
    torch._dynamo.reset()
    compiled = backends.set_backend(qmodel, "torch.compile")
    assert compiled is not qmodel
    assert torch.equal(run(compiled, x), run(qmodel, x))
    assert torch.equal(run(compiled, x[:1]), run(qmodel, x[:1]))  # a new shape
