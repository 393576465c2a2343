"""Hostile inputs for every quantized module type, on every kernel path this machine runs.

Each (kernel path, module family) runs in its own Python process, so an out-of-bounds read
that kills the process fails one test and names the case it was running, instead of killing
the test run. Kernel paths: each ISA path ``lowbit.native.isa_paths()`` says is available here
(forced with ``LOWBIT_ISA``; ``avx512_vnni`` only on VNNI CPUs, ``amx`` only on CPUs with
AMX-INT8) plus the ``reference`` backend.

Every case compares the quantized layer with what it must do:
- layouts (expanded from one element, expanded rows, strided, transposed, column-sliced, a
  permuted 3-D input, channels_last): the same output as for the contiguous copy;
- 0-size batches: the float layer's output shape; huge (1e30) and tiny (1e-38) values: finite
  outputs close to the float layer's; NaN / +Inf / -Inf in one sample: that sample's output is
  not finite and the others are exactly what they are without it;
- int64 / int32 / bool / complex inputs: ``TypeError``; float16 / float64 / bfloat16: output
  in that dtype, close to the float32 output; ``meta`` inputs: ``RuntimeError``;
- embeddings: index layouts, 0-size, int32, out-of-range / negative / float indices (the float
  ``nn.Embedding``'s errors).

Case count (kept current by ``test_case_count_matches_the_docstring``): 295 linear and 452
conv cases per kernel path, and 32 embedding cases: 3,020 cases on an AVX2 machine (avx2,
portable, torch, reference), 3,767 with avx512_vnni, 4,514 with amx too.
"""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

LINEAR_CASES = 295
CONV_CASES = 452
EMBEDDING_CASES = 32
FAMILIES = ("linear", "conv")
TIMEOUT_S = 240

# --------------------------------------------------------------------------- case builders
# (run inside the worker process; importing torch / lowbit here keeps the parent light)

LINEAR_KINDS = ("dynamic", "dynamic_per_tensor", "static", "int8_weight_only", "int4")
CONV_KINDS = ("dynamic", "static", "int8_weight_only", "int4")
DTYPES_REFUSED = ("int64", "int32", "bool", "complex64")
DTYPES_KEPT = ("float16", "float64", "bfloat16")


def _quantize(float_model, kind: str, calib, backend):
    import lowbit
    b = {"backend": backend}
    if kind == "dynamic":
        return lowbit.quantize_dynamic(float_model, **b)
    if kind == "dynamic_per_tensor":
        return lowbit.quantize_dynamic(
            float_model, lowbit.QuantizationConfig.int8_dynamic(per_token=False), **b)
    if kind == "static":
        return lowbit.quantize_static(float_model, [calib], progress=False, **b)
    if kind == "int8_weight_only":
        return lowbit.quantize_weight_only(float_model, bits=8, **b)
    return lowbit.quantize_weight_only(float_model, bits=4, group_size=8, **b)


def _layouts(x, torch) -> Iterator[tuple[str, object]]:
    """Non-contiguous views with the values and shape of a batch like ``x``."""
    shape = tuple(x.shape)
    yield "expanded_scalar", torch.randn(1).expand(*shape)
    yield "expanded_rows", x[:1].expand(*shape)
    wide = torch.randn(*shape[:-1], 2 * shape[-1] + 3)
    yield "strided", wide[..., 1::2][..., : shape[-1]]
    yield "column_sliced", wide[..., 3: 3 + shape[-1]]
    yield "transposed", x.transpose(0, -1).contiguous().transpose(0, -1)
    if x.dim() == 4:
        yield "channels_last", x.contiguous(memory_format=torch.channels_last)
    if x.dim() >= 3:
        yield "batch_strided", torch.cat([x, x]).view(2, *shape).transpose(0, 1)[:, 0]


def _value_cases(x, torch) -> Iterator[tuple[str, object]]:
    yield "huge_values", x * 1e30  # (a static scale saturates: checked against clamping)
    yield "tiny_values", x * 1e-38
    for label, v in (("nan", math.nan), ("posinf", math.inf), ("neginf", -math.inf)):
        bad = x.clone()
        bad.view(x.shape[0], -1)[min(1, x.shape[0] - 1), 3] = v
        yield f"{label}_in_one_sample", bad


def _cos(a, b) -> float:
    import torch
    a, b = a.double().flatten(), b.double().flatten()
    if a.norm() == 0 and b.norm() == 0:
        return 1.0
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))


def _check_layer(q, fl, x, case: str, torch, min_cos: float) -> str | None:
    """Run one case on quantized ``q`` (float twin ``fl``); None when it behaves, else why."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the once-per-layer NaN/Inf warning
        return _check_layer_inner(q, fl, x, case, torch, min_cos)


def _check_layer_inner(q, fl, x, case, torch, min_cos):
    if case.startswith("dtype_"):
        dtype = getattr(torch, case[6:])
        xd = (x > 0) if dtype == torch.bool else x.to(dtype)
        if case[6:] in DTYPES_REFUSED:
            try:
                q(xd)
            except TypeError:
                return None
            return f"{case[6:]} input accepted (expected TypeError)"
        y, y32 = q(xd), q(x)
        if y.dtype != dtype or y.shape != y32.shape:
            return f"output {y.dtype} {tuple(y.shape)} for a {dtype} input"
        c = _cos(y.float(), y32)
        return None if c > 0.99 else f"cosine {c:.4f} vs the float32 input's output"
    if case == "meta":
        try:
            q(torch.empty(x.shape, device="meta"))
        except RuntimeError:
            return None
        return "meta input accepted (expected RuntimeError)"
    if case == "zero_batch":
        x0 = x[:0]
        y, yf = q(x0), fl(x0)
        return None if y.shape == yf.shape else f"shape {tuple(y.shape)} != {tuple(yf.shape)}"
    if case == "unbatched":
        y, y1 = q(x[0]), q(x[:1])[0]
        return None if torch.equal(y, y1) else f"max diff {float((y - y1).abs().max()):.3g}"
    values = dict(_value_cases(x, torch))
    if case in values:
        xv = values[case]
        y, yf = q(xv), fl(xv)
        if case.endswith("_in_one_sample"):
            row = min(1, x.shape[0] - 1)
            if bool(torch.isfinite(y[row]).all()):
                return "the non-finite sample's output is finite (the float layer's is not)"
            others = [i for i in range(x.shape[0]) if i != row]
            if others:
                # the same batch with the bad sample replaced by a copy of another one: the
                # same row count (a float GEMM may round a row differently at another M, as
                # MKL does on Intel CPUs limited to AVX2) and the same per-tensor range
                xc = xv.clone()
                xc[row] = xv[others[0]]
                clean = q(xc)[others]
                if not torch.equal(y[others], clean):
                    return (f"other samples changed: max diff "
                            f"{float((y[others] - clean).abs().max()):.3g}")
            return None
        if not bool(torch.isfinite(y).all()):
            return "non-finite output for finite input"
        first = q[0] if isinstance(q, torch.nn.Sequential) else q
        if case == "huge_values" and getattr(first, "mode", None) == "static":
            # a calibrated scale saturates: the same codes as any input beyond its range
            clipped = q(xv.clamp(-1e4, 1e4))
            return None if torch.equal(y, clipped) else "huge values do not saturate"
        if case == "tiny_values":  # ~bias: the input part is below any scale's resolution
            err = float((y - yf).abs().max())
            return None if err < 1e-3 else f"max diff {err:.3g} from the float layer"
        c = _cos(y, yf)
        return None if c > min_cos else f"cosine {c:.4f} vs the float layer"
    layouts = dict(_layouts(x, torch))
    xl = layouts[case]
    y, yc = q(xl), q(xl.contiguous())
    d = float((y - yc).abs().max()) if y.numel() else 0.0
    tol = 1e-5 * (1.0 + float(yc.abs().max()))
    return None if y.shape == yc.shape and d <= tol else f"max diff {d:.3g} vs the contiguous copy"


def _linear_cases(backend, torch) -> Iterator[tuple[str, Callable[[], str | None]]]:
    from torch import nn
    torch.manual_seed(0)
    fl = nn.Linear(36, 24).eval()
    for kind in LINEAR_KINDS:
        for m in (1, 5, 70):  # batch 1, small and past the packed weight-only kernels' M
            x = torch.randn(m, 36)
            q = _quantize(nn.Sequential(fl), kind, torch.randn(16, 36), backend)[0]
            min_cos = 0.97 if kind == "int4" else 0.995
            names = ([c for c, _ in _layouts(x, torch)] + [c for c, _ in _value_cases(x, torch)]
                     + ["zero_batch"])
            if m == 5:
                names += [f"dtype_{d}" for d in DTYPES_REFUSED + DTYPES_KEPT] + ["meta"]
            for case in names:
                yield (f"linear/{kind}/m{m}/{case}",
                       lambda q=q, x=x, case=case, mc=min_cos: _check_layer(q, fl, x, case,
                                                                            torch, mc))
            for case in (c for c, _ in _layouts(x.reshape(m, 1, 36).expand(m, 3, 36)
                                               .contiguous(), torch)):
                x3 = torch.randn(m, 3, 36)
                yield (f"linear/{kind}/m{m}/3d_{case}",
                       lambda q=q, x3=x3, case=case, mc=min_cos: _check_layer(q, fl, x3, case,
                                                                              torch, mc))


def _conv_cases(backend, torch) -> Iterator[tuple[str, Callable[[], str | None]]]:
    from torch import nn
    torch.manual_seed(0)
    convs = {"c2d_1to8": (nn.Conv2d(1, 8, 3, padding=1), (1, 10, 10)),
             "c2d_8to16_s2": (nn.Conv2d(8, 16, 3, stride=2, padding=1), (8, 9, 9)),
             "c1d_4to8": (nn.Conv1d(4, 8, 3, padding=1), (4, 12))}
    for cname, (conv, shape) in convs.items():
        conv.eval()
        for kind in CONV_KINDS:
            q = _quantize(nn.Sequential(conv), kind, torch.randn(8, *shape), backend)[0]
            min_cos = 0.97 if kind == "int4" else 0.995
            for m in (1, 6):
                x = torch.randn(m, *shape)
                names = ([c for c, _ in _layouts(x, torch)]
                         + [c for c, _ in _value_cases(x, torch)] + ["zero_batch", "unbatched"])
                if m == 6:
                    names += [f"dtype_{d}" for d in DTYPES_REFUSED + DTYPES_KEPT] + ["meta"]
                for case in names:
                    yield (f"conv/{cname}/{kind}/m{m}/{case}",
                           lambda q=q, x=x, case=case, conv=conv, mc=min_cos:
                           _check_layer(q, conv, x, case, torch, mc))
    # a static conv with its ReLU and max-pool fused (lowbit.quantize_static fuses them)
    net = nn.Sequential(nn.Conv2d(2, 8, 3), nn.ReLU(), nn.MaxPool2d(2)).eval()
    q = _quantize(net, "static", torch.randn(8, 2, 12, 12), backend)
    assert q[0].geometry.get("fused_maxpool") == 2
    for m in (1, 6):
        x = torch.randn(m, 2, 12, 12)
        names = [c for c, _ in _layouts(x, torch)] + [c for c, _ in _value_cases(x, torch)]
        for case in [*names, "zero_batch", "unbatched"]:
            yield (f"conv/fused_relu_maxpool/static/m{m}/{case}",
                   lambda q=q, x=x, case=case: _check_layer(q, net, x, case, torch, 0.995))


def _embedding_cases(backend, torch) -> Iterator[tuple[str, Callable[[], str | None]]]:
    from torch import nn
    torch.manual_seed(0)
    emb = nn.Embedding(50, 24).eval()
    for kind in ("int8_weight_only", "int4"):
        q = _quantize(nn.Sequential(emb), kind, None, backend)[0]
        idx = torch.randint(0, 50, (4, 7))
        views = {"expanded": idx[:1, :1].expand(4, 7), "strided": torch.randint(
            0, 50, (4, 14))[:, ::2], "transposed": idx.t().contiguous().t(),
            "zero_size": idx[:0], "zero_width": idx[:, :0], "int32": idx.int(),
            "scalar": idx[0, 0]}
        for name, v in views.items():
            def case(v=v, q=q) -> str | None:
                y, yf = q(v), emb(v)
                if y.shape != yf.shape:
                    return f"shape {tuple(y.shape)} != {tuple(yf.shape)}"
                ref = q(v.long().contiguous()) if v.numel() else y
                return None if torch.equal(y, ref) else "differs from the contiguous copy"
            yield f"embedding/{kind}/{name}", case
        bad = {"out_of_range": torch.tensor([50]), "negative": torch.tensor([-1]),
               "huge": torch.tensor([2**62]), "float": torch.zeros(2),
               "bool": torch.ones(2, dtype=torch.bool), "complex": torch.zeros(2,
                                                                            dtype=torch.complex64),
               "meta": torch.zeros(2, dtype=torch.long, device="meta"),
               "int8": torch.zeros(2, dtype=torch.int8), "float_empty": torch.zeros(0)}
        for name, v in bad.items():
            def refused(v=v, q=q) -> str | None:
                try:
                    emb(v)
                    float_error: type[BaseException] | None = None
                except Exception as exc:  # the float layer's error class
                    float_error = type(exc)
                try:
                    y = q(v)
                except Exception as exc:
                    if float_error is None:
                        return f"raised {type(exc).__name__} where nn.Embedding works"
                    return None if isinstance(exc, (float_error, TypeError)) else (
                        f"{type(exc).__name__} where nn.Embedding raises {float_error.__name__}")
                if float_error is not None:
                    return f"accepted where nn.Embedding raises {float_error.__name__}"
                return None if y.shape == emb(v).shape else "wrong shape"
            yield f"embedding/{kind}/{name}", refused


def _cases(family: str, backend, torch) -> Iterator[tuple[str, Callable[[], str | None]]]:
    return {"linear": _linear_cases, "conv": _conv_cases,
            "embedding": _embedding_cases}[family](backend, torch)


def _worker(family: str, backend: str | None) -> None:
    """Run every case of ``family``, one JSON line before and after each (flushed)."""
    import torch
    torch.set_num_threads(1)
    for name, run in _cases(family, backend, torch):
        print(json.dumps({"start": name}), flush=True)
        try:
            why = run()
        except Exception as exc:  # an unexpected error: a failed case
            why = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps({"case": name, "why": why}), flush=True)


# ------------------------------------------------------------------------- parent side


def _paths() -> list[str]:
    """The kernel paths to run: available ISA paths, and the reference backend."""
    from lowbit import native
    return [isa for isa, status in native.isa_paths().items() if status == "available"] + [
        "reference"]


def _run(family: str, path: str) -> tuple[int, list[dict], str]:
    env = {k: v for k, v in os.environ.items() if k != "LOWBIT_ISA"}
    if path != "reference":
        env["LOWBIT_ISA"] = path
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, __file__, family, path], capture_output=True,
                          text=True, env=env, timeout=TIMEOUT_S)
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    return proc.returncode, lines, proc.stderr[-2000:]


def _assert_all_pass(rc: int, lines: list[dict], stderr: str) -> list[str]:
    started = [ln["start"] for ln in lines if "start" in ln]
    done = {ln["case"]: ln["why"] for ln in lines if "case" in ln}
    if rc != 0:
        last = started[-1] if started else "(before the first case)"
        how = f"signal {-rc}" if rc < 0 else f"exit code {rc}"
        pytest.fail(f"the worker died ({how}) in case {last}; stderr:\n{stderr}")
    failed = {k: v for k, v in done.items() if v}
    assert not failed, "\n".join(f"{k}: {v}" for k, v in list(failed.items())[:40])
    return started


PATHS = _paths()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("family", FAMILIES)
def test_every_case_behaves_in_its_own_process(family: str, path: str) -> None:
    started = _assert_all_pass(*_run(family, path))
    assert len(started) == {"linear": LINEAR_CASES, "conv": CONV_CASES}[family]


def test_embedding_cases_behave_in_their_own_process() -> None:
    # embeddings gather rows in PyTorch on every path: one process covers them
    started = _assert_all_pass(*_run("embedding", "reference"))
    assert len(started) == EMBEDDING_CASES


def test_case_count_matches_the_docstring() -> None:
    per_path = LINEAR_CASES + CONV_CASES
    text = " ".join((__doc__ or "").split())
    numbers = {int(n.replace(",", "")) for n in re.findall(r"\d[\d,]*", text)}
    assert {LINEAR_CASES, CONV_CASES, EMBEDDING_CASES} <= numbers
    assert 4 * per_path + EMBEDDING_CASES in numbers  # avx2, portable, torch, reference
    assert 5 * per_path + EMBEDDING_CASES in numbers  # ... and avx512_vnni
    assert 6 * per_path + EMBEDDING_CASES in numbers  # ... and amx
    assert len(PATHS) in (4, 5, 6)


if __name__ == "__main__":  # the worker: python test_hostile_inputs.py FAMILY PATH
    sys.path.insert(0, str(Path(__file__).parent))
    _worker(sys.argv[1], "reference" if sys.argv[2] == "reference" else None)
