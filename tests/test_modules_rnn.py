"""Dynamic INT8 LSTM / GRU / RNN and their cells (lowbit.modules_rnn): accuracy vs float and
torch.ao, exact float semantics (layers, directions, batch_first, states, packed and unbatched
inputs), save / load, and the refusals (static / weight-only modes, export)."""

from __future__ import annotations

import io
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import (
    PackedSequence,
    pack_padded_sequence,
    pack_sequence,
    pad_packed_sequence,
)

import lowbit
from lowbit.config import QuantizationConfig
from lowbit.kernels import run_rnn_scan, s8_packed
from lowbit.modules import QUANTIZED_MODULES, check_supported, convert_module, module_from_meta
from lowbit.modules_rnn import (
    QuantizedGRU,
    QuantizedGRUCell,
    QuantizedLSTM,
    QuantizedLSTMCell,
    QuantizedRNN,
    QuantizedRNNCell,
    rnn_weight_shapes,
)
from lowbit.native import load_gemm, native_status

DYN = QuantizationConfig.int8_dynamic()
# Stated bounds (INT8 weights per channel, per-token INT8 activations, hidden 32, 7 steps):
# measured cosine >= 0.99997 and max |error| / max |float| <= 0.01 on these shapes.
MIN_COS, MAX_REL = 0.9995, 0.03


def _float(kind: str, layers: int = 1, bidir: bool = False, batch_first: bool = False,
           **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return getattr(nn, kind)(16, 32, layers, batch_first=batch_first, bidirectional=bidir,
                             **kw).eval()


def _close(q: torch.Tensor, f: torch.Tensor) -> None:
    cos = float(F.cosine_similarity(q.flatten().double(), f.flatten().double(), dim=0))
    rel = float((q - f).abs().max() / f.abs().max())
    assert cos >= MIN_COS and rel <= MAX_REL, (cos, rel)


def _flat(out: object) -> list[torch.Tensor]:
    return [out] if isinstance(out, torch.Tensor) else [t for o in out for t in _flat(o)]


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("layers", [1, 2])
@pytest.mark.parametrize("bidir", [False, True])
@pytest.mark.parametrize("batch_first", [False, True])
def test_matches_float(kind: str, layers: int, bidir: bool, batch_first: bool) -> None:
    f = _float(kind, layers, bidir, batch_first)
    q = convert_module(f, DYN, name="rnn")
    assert type(q) is (QuantizedLSTM if kind == "LSTM" else QuantizedGRU)
    x = torch.randn(3, 7, 16) if batch_first else torch.randn(7, 3, 16)
    dirs = 2 if bidir else 1
    h0 = torch.randn(layers * dirs, 3, 32) * 0.5
    hx = (h0, torch.randn_like(h0)) if kind == "LSTM" else h0
    with torch.no_grad():
        for state in (None, hx):
            got, want = _flat(q(x, state)), _flat(f(x, state))
            assert [t.shape for t in got] == [t.shape for t in want]
            for a, b in zip(got, want, strict=True):
                _close(a, b)


def test_lstm_proj_size() -> None:
    f = _float("LSTM", 2, True, proj_size=8)
    q = convert_module(f, DYN)
    x = torch.randn(6, 2, 16)
    with torch.no_grad():
        for a, b in zip(_flat(q(x)), _flat(f(x)), strict=True):
            assert a.shape == b.shape
            _close(a, b)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
@pytest.mark.parametrize("bidir", [False, True])
def test_packed_sequences(kind: str, bidir: bool) -> None:
    """Packed sequences of different lengths: the float module's output structure, and each
    sequence's outputs and final states equal to running it alone."""
    f = _float(kind, 2, bidir, batch_first=True)
    q = convert_module(f, DYN)
    lengths = [4, 7, 2]
    x = torch.randn(3, 7, 16)
    dirs = 2 if bidir else 1
    h0 = torch.randn(2 * dirs, 3, 32) * 0.5
    hx = (h0, torch.randn_like(h0)) if kind == "LSTM" else h0
    packed = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        out, hn = q(packed, hx)
        fout, fhn = f(packed, hx)
    assert type(out) is type(fout)
    assert torch.equal(out.batch_sizes, fout.batch_sizes)
    assert torch.equal(out.sorted_indices, fout.sorted_indices)
    _close(out.data, fout.data)
    for a, b in zip(_flat(hn), _flat(fhn), strict=True):
        _close(a, b)
    padded, _ = pad_packed_sequence(out, batch_first=True)
    for i, n in enumerate(lengths):
        alone_hx = (h0[:, i:i + 1], hx[1][:, i:i + 1]) if kind == "LSTM" else h0[:, i:i + 1]
        with torch.no_grad():
            y, h = q(x[i:i + 1, :n], alone_hx)
        assert torch.equal(padded[i:i + 1, :n], y)
        assert all(torch.equal(a[:, i:i + 1], b) for a, b in zip(_flat(hn), _flat(h),
                                                                 strict=True))


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_unbatched(kind: str) -> None:
    f = _float(kind, 2, True)
    q = convert_module(f, DYN)
    x, h0 = torch.randn(5, 16), torch.randn(4, 32)
    hx = (h0, torch.randn_like(h0)) if kind == "LSTM" else h0
    batched_hx = tuple(t.unsqueeze(1) for t in hx) if kind == "LSTM" else h0.unsqueeze(1)
    with torch.no_grad():
        got, one = _flat(q(x, hx)), _flat(q(x.unsqueeze(1), batched_hx))
        want = _flat(f(x, hx))
    for a, b, c in zip(got, one, want, strict=True):
        assert a.shape == c.shape
        assert torch.equal(a, b.squeeze(1))
        _close(a, c)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_weights_read_as_the_float_modules(kind: str) -> None:
    """``weight_ih_l0`` ... were the int8 codes: model code casting its input to
    ``rnn.weight_ih_l0.dtype`` cast it to int8. They now read as a quantized Linear's
    ``weight``: float views (the float module's dtype, shape, values within the step); the
    codes stay the buffers (``state_dict``); ``all_weights`` lists them per layer."""
    kw = {"proj_size": 8} if kind == "LSTM" else {}
    f = _float(kind, 2, bidir=True, **kw)
    q = convert_module(f, DYN)
    for name, param in f.named_parameters():
        view = getattr(q, name)
        assert view.dtype == param.dtype and view.shape == param.shape
        if name.startswith("weight"):
            step = q._buffers[f"{name}_scale"].max()
            assert (view - param).abs().max() <= step / 2 + 1e-6
            assert q.state_dict()[name].dtype == torch.int8
            with pytest.raises(RuntimeError, match="read-only"):
                view.add_(1)
    assert [[tuple(w.shape) for w in ws] for ws in q.all_weights] == [
        [tuple(w.shape) for w in ws] for ws in f.all_weights]
    x = torch.randn(7, 3, 16)
    assert torch.equal(q(x.to(q.weight_ih_l0.dtype))[0], q(x)[0])
    assert q.to(torch.bfloat16).weight_hh_l0.dtype == torch.bfloat16


def test_more_accurate_than_torch_ao() -> None:
    """lowbit's per-token activations vs torch.ao's per-tensor ones, on the same LSTM."""
    ao = pytest.importorskip("torch.ao.quantization")
    torch.manual_seed(1)
    model = nn.Sequential(nn.LSTM(64, 128, 2, batch_first=True)).eval()
    x = torch.randn(8, 24, 64) * torch.rand(8, 1, 1) * 3  # sequences of different scales
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ao.quantize_dynamic(model, {nn.LSTM}, dtype=torch.qint8)
        with torch.no_grad():
            y_ao = theirs[0](x)[0]
    q = lowbit.quantize_dynamic(model)
    with torch.no_grad():
        want, y = model[0](x)[0], q[0](x)[0]
    err, err_ao = (y - want).abs().mean(), (y_ao - want).abs().mean()
    assert err <= err_ao, (float(err), float(err_ao))


def _assert_within_half_a_step(ref: torch.Tensor, out: torch.Tensor) -> None:
    """The C recurrence (gates with its own vectorized exp) vs the PyTorch loop: float rounding
    differences, which now and then move an activation code of h by one; the outputs stay
    within half an activation step (max |h| of the row / 127) of each other."""
    step = ref.abs().amax(-1, keepdim=True).clamp(min=1e-6) / 127
    worst = float(((out - ref).abs() / step).max())
    assert worst <= 0.5, f"{worst:.3f} activation steps apart"


@pytest.mark.parametrize("kind", ["LSTM", "GRU", "RNN_TANH", "RNN_RELU"])
@pytest.mark.parametrize("packed", [False, True])
def test_c_recurrence_matches_the_pytorch_loop(kind: str, packed: bool) -> None:
    """On the C ISA paths the recurrence is one C call per layer direction; on 2 layers x 2
    directions, 40 steps of 3 sequences (packed: of lengths 40, 25, 7) it stays within half an
    activation step of the PyTorch loop (backend "reference"), as close to the float module.
    (nn.RNN's ran the PyTorch loop first: 2.8x slower than the float module at batch 1.)"""
    torch.manual_seed(0)
    kw = {"nonlinearity": kind[4:].lower()} if kind.startswith("RNN") else {}
    f = getattr(nn, kind[:3] if kw else kind)(16, 48, num_layers=2, bidirectional=True,
                                              **kw).eval()
    q = convert_module(f, DYN)
    x = torch.randn(40, 3, 16)
    if packed:
        x = nn.utils.rnn.pack_padded_sequence(x, torch.tensor([40, 7, 25]),
                                              enforce_sorted=False)
    with torch.no_grad():
        (y, hn), (yf, _) = q(x), f(x)
        with lowbit.backends.use("reference"):
            r, hr = q(x)
    data = (lambda t: t.data) if packed else (lambda t: t)
    _assert_within_half_a_step(data(r), data(y))
    for a, b in zip(_flat(hr), _flat(hn), strict=True):
        _assert_within_half_a_step(a, b)
    err, err_ref = (data(y) - data(yf)).abs().mean(), (data(r) - data(yf)).abs().mean()
    assert abs(float(err - err_ref)) <= 0.05 * float(err_ref)


def test_c_recurrence_refuses_spans_outside_its_buffers() -> None:
    """The C scan checks every step's rows against gx / out and the batch before it runs."""
    lib = load_gemm("portable")
    if lib is None:  # no C compiler here: the PyTorch loop is the only path
        assert native_status()["available"] is False
        return
    w = torch.randint(-127, 128, (12, 3), dtype=torch.int8)
    packed, ones = s8_packed(w[:9], lib), torch.ones(9)
    for spans in ([(0, 1), (2, 1)], [(0, 2)], [(-1, 1)], [(0, 0)]):  # rows 0..1, batch 1
        with pytest.raises(RuntimeError, match="refused its arguments"):
            run_rnn_scan(lib, "GRU", torch.randn(2, 9), spans, torch.zeros(1, 3), None, packed,
                         ones, None, -128, 127)
    with pytest.raises(ValueError, match="gx must be a contiguous float32"):
        run_rnn_scan(lib, "GRU", torch.randn(2, 8), [(0, 1)], torch.zeros(1, 3), None, packed,
                     ones, None, -128, 127)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_reference_backend_and_grad(kind: str) -> None:
    f = _float(kind, 1, True)
    q = convert_module(f, DYN)
    x = torch.randn(5, 2, 16)
    with torch.no_grad():
        y = q(x)[0]
    with lowbit.backends.use("reference"):  # the PyTorch loop: the same exact INT8 GEMMs
        _assert_within_half_a_step(q(x)[0], y)
    xg = x.clone().requires_grad_()
    out = q(xg)[0]  # straight through: quantized values, the float layer's gradient
    out.sum().backward()
    assert torch.equal(out.detach(), y) and xg.grad is not None and xg.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_bfloat16_inputs_with_grad_after_a_model_cast(kind: str) -> None:
    """``q.to(torch.bfloat16)`` then a bf16 input that requires grad: the straight-through
    float layer runs in the input's dtype (it was float32: "RNN input dtype does not match
    weight dtype"), and the values are the quantized layer's own."""
    q = convert_module(_float(kind, 2, True), DYN).to(torch.bfloat16)
    x = torch.randn(5, 2, 16, dtype=torch.bfloat16)
    with torch.no_grad():
        y = q(x)[0]
    xg = x.clone().requires_grad_()
    out = q(xg)[0]
    out.float().sum().backward()
    assert out.dtype == torch.bfloat16 and torch.equal(out.detach(), y)
    assert xg.grad is not None and xg.grad.dtype == torch.bfloat16 and xg.grad.abs().sum() > 0
    assert q.to_float().weight_ih_l0.dtype == torch.bfloat16


class LM(nn.Module):
    """A small LSTM language model: embedding, 2-layer LSTM, next-token head."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(100, 16)
        self.lstm = nn.LSTM(16, 32, 2, batch_first=True)
        self.head = nn.Linear(32, 100)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        self.lstm.flatten_parameters()  # as model code often does
        return self.head(self.lstm(self.emb(ids))[0])


def test_language_model_report_and_save_load(tmp_path) -> None:
    torch.manual_seed(0)
    model = LM().eval()
    ids = torch.randint(0, 100, (2, 9))
    q = lowbit.quantize_dynamic(model)
    assert type(q.lstm) is QuantizedLSTM
    row = {p.name: p for p in q.lowbit_report.rows}["lstm"]
    assert row.status == "quantized" and row.module_type == "LSTM"
    with torch.no_grad():
        y = q(ids)
        _close(y, model(ids))
    lowbit.save(q, tmp_path / "lm.safetensors")
    loaded = lowbit.load(tmp_path / "lm.safetensors", model=LM())
    with torch.no_grad():
        assert torch.equal(loaded(ids), y)
    buf = io.BytesIO()
    torch.save(q, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(ids), y)
    wrong = LM()
    wrong.lstm = nn.LSTM(16, 32, 1, batch_first=True)
    with pytest.raises(lowbit.serialization.LoadError, match="lstm is LSTM"):
        lowbit.load(tmp_path / "lm.safetensors", model=wrong)
    static = lowbit.quantize_static(model, [ids], progress=False)
    row = {p.name: p for p in static.lowbit_report.rows}["lstm"]
    assert row.status == "skipped" and "mode='dynamic'" in row.reason
    assert isinstance(static.lstm, nn.LSTM)


def test_whole_model_gru_is_listed_and_round_trips(tmp_path) -> None:
    f = _float("GRU", 2)
    q = lowbit.quantize_dynamic(f)
    assert type(q) is QuantizedGRU
    assert [(p.name, p.module_type, p.status) for p in q.lowbit_report.rows] == [
        ("", "GRU", "quantized")]
    x = torch.randn(4, 2, 16)
    lowbit.save(q, tmp_path / "g.safetensors")
    r = lowbit.load(tmp_path / "g.safetensors", model=_float("GRU", 2))
    assert torch.equal(r(x)[0], q(x)[0])
    meta = json.loads(json.dumps(q.meta()))
    m = module_from_meta(meta)
    m.load_state_dict(q.state_dict())
    assert torch.equal(m(x)[1], q(x)[1])
    assert set(rnn_weight_shapes(meta)) < set(q.state_dict())
    assert {"QuantizedLSTM", "QuantizedGRU"} <= set(QUANTIZED_MODULES)


def test_refusals() -> None:
    f = _float("LSTM")
    for cfg in (QuantizationConfig.int8_static(), QuantizationConfig.int4_weight_only(32),
                QuantizationConfig.int8_dynamic(per_token=False)):
        assert "LSTM" in (check_supported(f, cfg) or "")
    with pytest.raises(ValueError, match="rnn: LSTM: mode='static'"):
        convert_module(f, QuantizationConfig.int8_static(), name="rnn")
    q = convert_module(f, DYN, name="rnn")
    with pytest.raises(ValueError, match=r"rnn \(QuantizedLSTM\): expected input with 16"):
        q(torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="h0 of shape"):
        q(torch.randn(3, 2, 16), (torch.zeros(1, 3, 32), torch.zeros(1, 3, 32)))
    bad = _float("GRU")
    with torch.no_grad():
        bad.weight_hh_l0[0, 0] = float("nan")
    with pytest.raises(ValueError, match="weight_hh_l0"):
        lowbit.quantize_dynamic(nn.Sequential(bad))


def test_export_refused_compile_runs() -> None:
    q = convert_module(_float("GRU"), DYN, name="gru")
    x = torch.randn(4, 2, 16)
    from lowbit.onnx._layers import export_layer

    with pytest.raises(NotImplementedError, match=r"gru \(QuantizedGRU\).*layer_overrides"):
        export_layer(q)
    with pytest.raises(RuntimeError, match=r"gru \(QuantizedGRU\): torch.export"):
        torch.export.export(q, (x,))
    with torch.no_grad():
        assert torch.equal(torch.compile(q)(x)[0], q(x)[0])  # a graph break: eager run


@pytest.mark.parametrize("cls", [nn.LSTM, nn.GRU])
def test_malformed_packed_sequences_are_refused_by_name(cls) -> None:
    """``batch_sizes`` that do not describe the data rows: an empty list and extra rows
    returned uninitialized memory (different on each call), a growing one made the C scan
    refuse its arguments naming no layer."""
    torch.manual_seed(0)
    q = lowbit.quantize_dynamic(nn.Sequential(cls(4, 8)))[0]
    for rows, sizes in ((5, [2, 0, 2]), (5, [2, 3]), (4, []), (9, [2, 2]), (3, [2, 2])):
        bad = PackedSequence(torch.randn(rows, 4), torch.tensor(sizes, dtype=torch.int64))
        with pytest.raises(ValueError, match=r"0 \(Quantized\w+\): a PackedSequence whose "
                                             r"batch_sizes .* do not describe its"):
            q(bad)
    good = pack_sequence([torch.randn(3, 4), torch.randn(2, 4)])
    assert q(good)[0].data.shape == (5, 8)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("batch_first", [False, True])
def test_an_empty_batch_gives_the_float_modules_empty_outputs(backend: str,
                                                              batch_first: bool) -> None:
    """A batch of size 0 (the end of a filtered stream) gave "RNN scan refused its arguments"
    (or a reshape error on the reference path), where nn.LSTM / nn.GRU return empty outputs."""
    for kind, cls in (("LSTM", QuantizedLSTM), ("GRU", QuantizedGRU)):
        float_rnn = getattr(nn, kind)(6, 12, num_layers=2, bidirectional=True,
                                      batch_first=batch_first).eval()
        q = cls.from_float(float_rnn, QuantizationConfig.int8_dynamic(), backend=backend)
        x = torch.randn(0, 4, 6) if batch_first else torch.randn(4, 0, 6)
        with torch.no_grad():
            want, got = float_rnn(x), q(x)
        assert got[0].shape == want[0].shape
        hidden = (got[1],) if kind == "GRU" else got[1]
        for g, w in zip(hidden, (want[1],) if kind == "GRU" else want[1], strict=True):
            assert g.shape == w.shape


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_buffers_changed_in_place_are_used(kind: str) -> None:
    """A zero-point (or scale, weight, bias) changed in place reaches the next call: the layer
    had kept the decision that its zero-points are all 0, so the change was ignored."""
    torch.manual_seed(6)
    f = getattr(nn, kind)(8, 16)
    x = torch.randn(5, 2, 8)
    for name in ("weight_hh_l0_zero_point", "weight_ih_l0_scale", "bias_hh_l0"):
        q = convert_module(f, QuantizationConfig.int8_dynamic())
        before = q(x)[0]
        t = q.state_dict()[name]
        with torch.no_grad():
            t.copy_(t * 2 if t.is_floating_point() else t + 1)
        fresh = convert_module(f, QuantizationConfig.int8_dynamic())
        fresh.load_state_dict(q.state_dict())
        assert torch.equal(q(x)[0], fresh(x)[0]), name
        assert not torch.equal(q(x)[0], before), name



@pytest.mark.parametrize("nonlinearity", ["tanh", "relu"])
@pytest.mark.parametrize("bidir", [False, True])
def test_elman_rnn_matches_float_packed_and_unbatched(nonlinearity: str, bidir: bool) -> None:
    """nn.RNN had stayed float without a word (torch.ao's dynamic coverage includes it)."""
    f = _float("RNN", 2, bidir, batch_first=True, nonlinearity=nonlinearity)
    q = convert_module(f, DYN, name="rnn")
    assert type(q) is QuantizedRNN and q.nonlinearity == nonlinearity
    x = torch.randn(3, 7, 16)
    h0 = torch.randn(2 * (2 if bidir else 1), 3, 32) * 0.5
    packed = pack_padded_sequence(x, [4, 7, 2], batch_first=True, enforce_sorted=False)
    with torch.no_grad():
        for args in ((x,), (x, h0), (packed, h0), (x[0],)):
            got, want = q(*args), f(*args)
            if isinstance(got[0], PackedSequence):
                got, want = (got[0].data, got[1]), (want[0].data, want[1])
            for a, b in zip(_flat(got), _flat(want), strict=True):
                assert a.shape == b.shape
                _close(a, b)
        with lowbit.backends.use("reference"):
            assert torch.equal(q(x)[0], q(x)[0])


CELLS = {"LSTMCell": QuantizedLSTMCell, "GRUCell": QuantizedGRUCell, "RNNCell": QuantizedRNNCell}


def _cell(kind: str, **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return getattr(nn, kind)(16, 32, **kw).eval()


@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_match_float_and_one_step_of_the_sequence_module(kind: str) -> None:
    """LSTMCell / GRUCell / RNNCell had stayed float (torch.ao quantizes them): each is one
    time step of the one-layer sequence module with the same weights, with the float cell's
    call signature (states given or not, unbatched) and buffer names."""
    f = _cell(kind)
    q = convert_module(f, DYN, name="cell")
    assert type(q) is CELLS[kind]
    assert {k for k in q.state_dict() if not k.endswith(("_scale", "_zero_point"))} == set(
        f.state_dict())
    x = torch.randn(5, 16)
    h = torch.randn(5, 32) * 0.5
    hx = (h, torch.randn(5, 32)) if kind == "LSTMCell" else h
    seq = getattr(nn, kind.removesuffix("Cell"))(16, 32).eval()
    with torch.no_grad():
        for name, t in f.named_parameters():
            getattr(seq, f"{name}_l0").copy_(t)
        qseq = convert_module(seq, DYN)
        for state in (None, hx):
            got, want = q(x, state), f(x, state)
            for a, b in zip(_flat(got), _flat(want), strict=True):
                assert a.shape == b.shape
                _close(a, b)
            seq_state = None if state is None else (
                tuple(t.unsqueeze(0) for t in state) if kind == "LSTMCell" else state[None])
            _, step = qseq(x[None], seq_state)
            assert all(torch.equal(a, b[0]) for a, b in zip(_flat(got), _flat(step),
                                                            strict=True))
        one = q(x[0], None if state is None else (
            tuple(t[0] for t in hx) if kind == "LSTMCell" else h[0]))  # unbatched
        assert all(a.shape == (32,) for a in _flat(one))
        assert all(a.shape == (0, 32) for a in _flat(q(torch.randn(0, 16))))
    xg = x.clone().requires_grad_()
    out = _flat(q(xg, hx))[0]  # straight through: the float cell's gradient
    out.sum().backward()
    assert xg.grad is not None and xg.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.equal(out.detach(), _flat(q(x, hx))[0])
    with pytest.raises(ValueError, match=r"cell \(Quantized\w+Cell\): expected a 1-D"):
        q(torch.randn(2, 3, 16))
    with pytest.raises(ValueError, match=r"input_size\), got shape \(5, 7\)"):
        q(torch.randn(5, 7))  # (named in the cell's shapes, not the one-step sequence's)
    with pytest.raises(ValueError, match=r"expected h of shape \(5, 32\) for an input of shape "
                                         r"\(5, 16\), got \(5, 31\)"):
        q(x, (torch.zeros(5, 31), torch.zeros(5, 32)) if kind == "LSTMCell" else torch.zeros(5, 31))
    with pytest.raises(ValueError, match=r"expected h of shape \(32,\)"):
        q(x[0], tuple(hx) if kind == "LSTMCell" else h)  # batched states, unbatched input


def test_recurrent_layers_and_cells_quantize_in_a_model_and_round_trip(tmp_path) -> None:
    """Every recurrent type in one model: all quantized (the report lists them), more accurate
    than torch.ao's dynamic quantization of the same model, and bit-exact after save / load."""
    ao = pytest.importorskip("torch.ao.quantization")

    class Decoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.rnn = nn.RNN(16, 32, nonlinearity="relu")
            self.lstm_cell, self.gru_cell = nn.LSTMCell(32, 32), nn.GRUCell(32, 32)
            self.rnn_cell = nn.RNNCell(32, 32)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y, _ = self.rnn(x)
            state = None
            for t in range(y.shape[0]):
                state = self.lstm_cell(y[t], state)
            return self.rnn_cell(self.gru_cell(state[0]))

    torch.manual_seed(0)
    model = Decoder().eval()
    q = lowbit.quantize_dynamic(model, progress=False)
    assert [(r.name, r.status) for r in q.lowbit_report.rows] == [
        (n, "quantized") for n in ("rnn", "lstm_cell", "gru_cell", "rnn_cell")]
    x = torch.randn(6, 4, 16) * torch.rand(1, 4, 1) * 3
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = ao.quantize_dynamic(model, {nn.RNN, nn.LSTMCell, nn.GRUCell, nn.RNNCell},
                                     dtype=torch.qint8)
    with torch.no_grad():
        want, y, y_ao = model(x), q(x), theirs(x)
    _close(y, want)
    assert (y - want).abs().mean() <= (y_ao - want).abs().mean()
    lowbit.save(q, tmp_path / "m")
    back = lowbit.load(tmp_path / "m", model=Decoder())
    with torch.no_grad():
        assert torch.equal(back(x), y)
    with pytest.raises(lowbit.serialization.LoadError, match="rnn_cell is GRUCell"):
        other = Decoder()
        other.rnn_cell = nn.GRUCell(32, 32)
        lowbit.load(tmp_path / "m", model=other)



@pytest.mark.parametrize("kind", list(CELLS))
def test_cells_take_strided_states_and_refuse_tracing_by_name(kind: str) -> None:
    """A transposed (column-major) state had been read as row-major by the C GEMM of the
    direct step (0.59 off instead of 0.006); tracing and export failed in internal errors
    naming no layer once the step bypassed the sequence layers' forward."""
    f = _cell(kind)
    q = convert_module(f, DYN, name="cell")
    x, h = torch.randn(3, 16), torch.randn(3, 32) * 0.5
    ht = h.t().contiguous().t()  # the same values, column-major
    hx = (h, torch.randn(3, 32)) if kind == "LSTMCell" else h
    hxt = (ht, hx[1].t().contiguous().t()) if kind == "LSTMCell" else ht
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(_flat(q(x, hxt)), _flat(q(x, hx)),
                                                     strict=True))
    with pytest.raises(RuntimeError, match=r"cell \(Quantized\w+Cell\): torch.jit.trace"):
        torch.jit.trace(q, (x,))
    with pytest.raises(RuntimeError, match=r"cell \(Quantized\w+Cell\): torch.export"):
        torch.export.export(q, (x,))
