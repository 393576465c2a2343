"""The ``lowbit`` command line, end to end through ``python -m lowbit`` (and ``main`` in-process
for the quick error checks)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lowbit.cli import main
from lowbit.models import MLP, MnistCNN
from lowbit.ptq import quantize_dynamic
from lowbit.serialization import load, save

ARCH = ["--arch", "lowbit.models:MLP", "--arch-kwargs", '{"hidden": [32]}']


def lowbit(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "lowbit", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A float MLP state dict, a lowbit-quantized copy of it and a small labelled tensor file."""
    d = tmp_path_factory.mktemp("cli")
    torch.manual_seed(0)
    torch.save(MLP(hidden=(32,)).state_dict(), d / "mlp.pt")
    x = torch.randn(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    torch.save({"inputs": x, "labels": torch.arange(40) % 10}, d / "data.pt")
    assert main(["quantize", str(d / "mlp.pt"), *ARCH, "--method", "dynamic", "--out",
                 str(d / "q_dyn"), "--quiet"]) == 0
    return d


def test_quantize_static_on_mnist_then_inspect(work: Path) -> None:
    run = lowbit("quantize", "mlp.pt", *ARCH, "--method", "static", "--calib", "mnist",
                 "--calibrator", "percentile", "--calib-samples", "128", "--out", "q_static",
                 "--json", "--quiet", cwd=work)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    assert out["out"].endswith("q_static/model.safetensors") and out["config"]["mode"] == "static"
    assert [r["status"] for r in out["report"]["layers"]] == ["quantized", "quantized"]
    model = load(work / "q_static", trust_factory=True)  # the factory was recorded
    assert model.layers[0].meta()["extra"]["calibrator"] == "percentile"

    run = lowbit("inspect", "q_static", cwd=work)
    assert run.returncode == 0, run.stderr
    assert "| layers.0 | QuantizedLinear | W8 per_channel, A8 per_tensor calibrated " \
           "(percentile) | 8 | 32x784 |" in run.stdout
    info = json.loads(lowbit("inspect", "q_static", "--json", cwd=work).stdout)
    assert [r["name"] for r in info["layers"]] == ["layers.0", "layers.2"]


@pytest.mark.parametrize("extra", [["--method", "dynamic", "--per-tensor", "--skip", "layers.2"],
                                   ["--method", "int4", "--group-size", "32"]])
def test_quantize_variants_in_process(work: Path, extra: list[str], capsys) -> None:
    out = work / f"q_{extra[1]}.safetensors"
    assert main(["quantize", str(work / "mlp.pt"), *ARCH, *extra, "--out", str(out),
                 "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"Saved {out}" in printed
    model = load(out, model=MLP(hidden=(32,)))
    if extra[1] == "int4":
        assert type(model.layers[0]).__name__ == "Int4Linear"
    else:
        assert model.layers[0].weight_scale.dim() == 0 and type(model.layers[2]).__name__ == \
            "Linear"


def test_quantize_with_the_avx2_recipe_and_weight_methods(work: Path, capsys) -> None:
    """--activation-bits 7 --smooth-quant (the recipe for CPUs without VNNI) and
    --weight-method for INT4, calibrated on --calib; the flags they need are checked."""
    out = work / "q_recipe.safetensors"
    assert main(["quantize", str(work / "mlp.pt"), *ARCH, "--method", "dynamic",
                 "--activation-bits", "7", "--smooth-quant", "0.5", "--calib", "mnist",
                 "--calib-samples", "64", "--out", str(out), "--quiet"]) == 0
    layer = load(out, model=MLP(hidden=(32,))).layers[0]
    assert layer.act_spec.qmax == 63 and layer.input_smoothing is not None
    assert not torch.equal(layer.input_smoothing, torch.ones(784))
    out = work / "q_gptq.safetensors"
    assert main(["quantize", str(work / "mlp.pt"), *ARCH, "--method", "int4",
                 "--group-size", "32", "--weight-method", "gptq", "--calib", "mnist",
                 "--calib-samples", "64", "--out", str(out), "--quiet"]) == 0
    model = load(out, model=MLP(hidden=(32,)))
    assert type(model.layers[0]).__name__ == "Int4Linear"
    assert model.layers[0].meta()["extra"]["weight_method"] == "gptq"
    capsys.readouterr()
    for extra, says in ((["--method", "dynamic", "--smooth-quant", "0.5"],
                         "--smooth-quant needs --calib"),
                        (["--method", "int4", "--weight-method", "awq"],
                         "--weight-method awq needs --calib"),
                        (["--method", "static", "--activation-bits", "7"],
                         "--activation-bits 7 applies to --method dynamic"),
                        (["--method", "int4", "--smooth-quant", "0.5"],
                         "--smooth-quant applies to INT8 activations"),
                        (["--method", "dynamic", "--weight-method", "gptq"],
                         "use it with --method int4"),
                        (["--method", "dynamic", "--smooth-quant", "2", "--calib", "mnist"],
                         "--smooth-quant:")):
        assert main(["quantize", str(work / "mlp.pt"), *ARCH, *extra, "--out",
                     str(work / "never"), "--quiet"]) == 2, extra
        assert says in capsys.readouterr().err, extra


def test_compare_with_report(work: Path) -> None:
    run = lowbit("compare", "mlp.pt", "q_dyn", *ARCH, "--data", "data.pt", "--iters", "3",
                 "--batch-sizes", "1,8", "--json", "--report", "cmp_report", cwd=work)
    assert run.returncode == 0, run.stderr
    rows = json.loads(run.stdout)["rows"]
    assert [r["name"] for r in rows] == ["FP32", "q_dyn"]
    assert rows[1]["compression"] > 3 and rows[1]["output_error"]["cosine"] > 0.99
    assert set(rows[1]["latency"]) == {"b1", "b8"}
    for name in ("report.md", "report.html", "latency.png", "hist_layers.0.png"):
        assert (work / "cmp_report" / name).is_file(), name


def test_sensitivity_with_budget_and_report(work: Path) -> None:
    run = lowbit("sensitivity", "mlp.pt", *ARCH, "--method", "static", "--calib", "mnist",
                 "--calib-samples", "128", "--data", "mnist", "--samples", "300", "--budget",
                 "100", "--out", "q_fallback", "--report", "sens_report", cwd=work)
    assert run.returncode == 0, run.stderr
    assert "| 1 | layers." in run.stdout and "FP32 fallback for a drop <= 100.0: none" in \
        run.stdout
    assert (work / "q_fallback" / "model.safetensors").is_file()
    assert (work / "sens_report" / "sensitivity.png").is_file()
    assert "## Sensitivity" in (work / "sens_report" / "report.md").read_text()


def test_sensitivity_json_progress_and_quiet(work: Path) -> None:
    run = lowbit("sensitivity", "mlp.pt", *ARCH, "--method", "static", "--calib", "data.pt",
                 "--data", "data.pt", "--json", cwd=work)
    assert run.returncode == 0, run.stderr
    rep = json.loads(run.stdout)["sensitivity"]
    assert {r["name"] for r in rep["rows"]} == {"layers.0", "layers.2"}
    assert rep["metric_name"] == "accuracy" and rep["baseline"] is not None
    assert "calibrating" in run.stderr and "sensitivity" in run.stderr  # progress bars
    quiet = lowbit("sensitivity", "mlp.pt", *ARCH, "--method", "dynamic", "--data", "data.pt",
                   "--json", "--quiet", cwd=work)
    assert quiet.returncode == 0 and quiet.stderr == "", quiet.stderr
    assert json.loads(quiet.stdout)["sensitivity"]["rows"][0]["cosine"] > 0.99


def test_bench_json_progress_and_report(work: Path) -> None:
    run = lowbit("bench", "mlp.pt", "q_dyn", *ARCH, "--input-shape", "1,1,28,28",
                 "--batch-sizes", "1,4", "--iters", "3", "--rounds", "1", "--json",
                 "--report", "bench_report", cwd=work)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout)
    rows = out["rows"]
    assert [r["name"] for r in rows] == ["mlp.pt", "q_dyn"] and rows[0]["speedup"]["b4"] == 1.0
    assert set(out["native"]) == {"available", "reason", "path", "isa", "isa_paths",
                                  "libraries"}  # which kernels were timed
    assert "benchmarking" in run.stderr  # the progress bar; --quiet removes it
    assert (work / "bench_report" / "latency.png").is_file()
    assert "| q_dyn |" in (work / "bench_report" / "report.md").read_text()
    quiet = lowbit("bench", "mlp.pt", *ARCH, "--input-shape", "1,784", "--batch-sizes", "2",
                   "--iters", "2", "--rounds", "1", "--quiet", cwd=work)
    assert quiet.returncode == 0 and quiet.stderr == "" and "| mlp.pt |" in quiet.stdout
    assert "fused C kernels: " in quiet.stdout


def test_inspect_lists_lora_adapters(work: Path, capsys) -> None:
    from lowbit.lora import add_lora

    model = load(work / "q_dyn", model=MLP(hidden=(32,)))
    save(add_lora(model, r=4, alpha=8, target_modules=["layers.0"]), work / "q_lora")
    assert main(["inspect", str(work / "q_lora")]) == 0
    out = capsys.readouterr().out
    assert "LoRA adapter on layers.0: r=4, alpha=8, dropout=0" in out
    assert "| layers.0.base | QuantizedLinear |" in out


def test_inspect_escapes_a_pipe_in_a_layer_name(tmp_path: Path, capsys) -> None:
    model = nn.Sequential()
    model.add_module("a|b", nn.Linear(4, 4))
    save(quantize_dynamic(model), tmp_path / "pipe")
    assert main(["inspect", str(tmp_path / "pipe")]) == 0
    assert "| a\\|b | QuantizedLinear |" in capsys.readouterr().out


def test_exported_program_model(work: Path, capsys) -> None:
    torch.manual_seed(0)
    model = MnistCNN().eval()
    batch = torch.export.Dim("batch")
    program = torch.export.export(model, (torch.randn(2, 1, 28, 28),),
                                  dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, work / "cnn.pt2")
    assert main(["quantize", str(work / "cnn.pt2"), "--method", "dynamic", "--out",
                 str(work / "x")]) == 2  # a program: only with --trust-pickle
    assert "pass --trust-pickle only if you trust" in capsys.readouterr().err.lower()
    run = lowbit("quantize", "cnn.pt2", "--method", "dynamic", "--out", "q_cnn.safetensors",
                 "--trust-pickle", "--quiet", cwd=work)
    assert run.returncode == 0, run.stderr
    assert "| fc1 | Linear | quantized |" in run.stdout and "| conv1 | Conv2d | quantized |" \
        in run.stdout
    run = lowbit("compare", "cnn.pt2", "q_cnn.safetensors", "--data", "data.pt", "--iters", "2",
                 "--batch-sizes", "4", "--json", "--quiet", "--trust-pickle", "--report",
                 "pt2_report", cwd=work)  # (the report picked the program's root: '' failed)
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["rows"][1]["output_error"]["cosine"] > 0.99
    assert (work / "pt2_report" / "report.html").is_file()
    assert (work / "pt2_report" / "hist_conv1.png").is_file()


def test_torchscript_model_needs_trust_and_arch(work: Path, capsys) -> None:
    torch.manual_seed(0)
    torch.jit.save(torch.jit.script(MLP(hidden=(32,)).eval()), work / "mlp_ts.pt")
    assert main(["quantize", str(work / "mlp_ts.pt"), *ARCH, "--method", "dynamic", "--out",
                 str(work / "x")]) == 2
    assert "is TorchScript: loading it can run any code" in capsys.readouterr().err
    assert main(["quantize", str(work / "mlp_ts.pt"), "--method", "dynamic", "--out",
                 str(work / "x"), "--trust-pickle"]) == 2
    assert "is TorchScript, whose modules cannot be swapped" in capsys.readouterr().err
    assert main(["quantize", str(work / "mlp_ts.pt"), *ARCH, "--method", "dynamic", "--out",
                 str(work / "q_ts"), "--quiet", "--trust-pickle"]) == 0


class _Payload:
    """Unpickling it creates a marker file: stands for any code a pickle can run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (open, (str(self.marker), "w"))


def _evil_pt2(work: Path, marker: Path) -> Path:
    """A real torch.export program whose bias is stored "use_pickle": a crafted pickle."""
    import io
    import zipfile

    program = torch.export.export(torch.nn.Sequential(torch.nn.Linear(4, 2)).eval(),
                                  (torch.randn(1, 4),))
    torch.export.save(program, work / "plain.pt2")
    payload = io.BytesIO()
    torch.save(_Payload(marker), payload)
    evil = work / "evil.pt2"
    with zipfile.ZipFile(work / "plain.pt2") as src, \
            zipfile.ZipFile(evil, "w", zipfile.ZIP_STORED) as out:
        config = next(n for n in src.namelist() if n.endswith("model_weights_config.json"))
        weights = json.loads(src.read(config))
        weights["config"]["0.bias"]["use_pickle"] = True
        bias_file = config.rpartition("/")[0] + "/" + weights["config"]["0.bias"]["path_name"]
        for name in src.namelist():
            data = src.read(name)
            if name == config:
                data = json.dumps(weights).encode()
            elif name == bias_file:
                data = payload.getvalue()
            out.writestr(name, data)
    return evil


def test_pt2_is_not_unpickled_without_trust(work: Path, capsys) -> None:
    marker = work / "pwned"
    evil = _evil_pt2(work, marker)
    for argv in (["quantize", str(evil), "--method", "dynamic", "--out", str(work / "e")],
                 ["compare", str(evil), str(work / "q_dyn"), "--data", str(work / "data.pt")],
                 ["bench", str(evil), "--input-shape", "1,4"],
                 ["sensitivity", str(evil), "--method", "dynamic", "--data",
                  str(work / "data.pt")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "evil.pt2' is a torch.export program (.pt2)" in err and "--trust-pickle" in err
        assert not marker.exists(), f"{argv[0]} ran the pickle"
    with pytest.raises(Exception):  # noqa: B017 - the proof: loading it runs the payload
        torch.export.load(evil)
    assert marker.exists()


def test_demo_end_to_end(work: Path) -> None:
    """``python -m lowbit demo`` trains on the bundled MNIST, quantizes three ways, prints the
    table (one epoch to keep the suite short; the README's default is four)."""
    run = lowbit("--quiet", "demo", "--epochs", "1", "--json", "demo.json", cwd=work)
    assert run.returncode == 0, run.stderr
    for name in ("FP32", "INT8 dynamic", "INT8 static", "INT4 weight-only"):
        assert f"| {name} |" in run.stdout
    assert "training" not in run.stderr  # --quiet before the subcommand reaches the demo
    rows = {r["name"]: r for r in json.loads((work / "demo.json").read_text())["rows"]}
    assert rows["FP32"]["accuracy"] > 93 and rows["INT8 static"]["compression"] > 3


def test_demo_and_entry_points(work: Path) -> None:
    run = lowbit("demo", "--help", cwd=work)
    assert run.returncode == 0 and "usage: lowbit demo" in run.stdout and "--epochs" in run.stdout
    script = Path(sys.executable).with_name("lowbit")
    if script.exists():  # the console-script entry point of the installed package
        run = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
        assert run.returncode == 0 and "quantize" in run.stdout


def test_data_formats(tmp_path: Path) -> None:
    import numpy as np
    import safetensors.torch

    from lowbit.cli import load_data

    x, y = torch.randn(6, 3), torch.arange(6)
    torch.save((x, y), tmp_path / "pair.pt")
    np.save(tmp_path / "x.npy", x.double().numpy())
    safetensors.torch.save_file({"x": x, "y": y}, tmp_path / "xy.safetensors")
    for name in ("pair.pt", "x.npy", "xy.safetensors"):
        data = load_data(str(tmp_path / name), limit=4)
        assert torch.equal(data.inputs, x[:4]) and data.inputs.dtype == torch.float32, name
        assert (data.labels is None) == (name == "x.npy"), name
    mnist = load_data("mnist", "calib", limit=10)
    assert mnist.inputs.shape == (10, 1, 28, 28) and mnist.labels.shape == (10,)
    safetensors.torch.save_file({"a": x, "b": x.clone()}, tmp_path / "ambiguous.safetensors")
    with pytest.raises(ValueError, match="name them 'inputs'"):
        load_data(str(tmp_path / "ambiguous.safetensors"))


def test_hostile_data_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    """A pickled payload (refused without running: torch's own advice to re-run with
    weights_only=False is not repeated), an empty .pt, a nested dict, and a .npy whose header
    promises 40 GB (numpy tried to allocate it) each name the DATA file and the cause."""
    import os

    import numpy as np

    from lowbit.cli import load_data

    marker = tmp_path / "ran"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save(Evil(), tmp_path / "evil.pt")
    (tmp_path / "empty.pt").write_bytes(b"")
    torch.save({"inputs": {"a": torch.ones(2)}}, tmp_path / "nested.pt")
    huge = tmp_path / "huge.npy"
    with huge.open("wb") as f:
        np.lib.format.write_array_header_1_0(
            f, {"descr": "<f4", "fortran_order": False, "shape": (10_000_000_000,)})
        f.write(b"\0" * 16)
    for name, cause in (("evil.pt", "unsupported GLOBAL posix.system"),
                        ("empty.pt", "EOFError"), ("nested.pt", "Could not infer dtype"),
                        ("huge.npy", "40000000000 bytes) but the file holds 16")):
        with pytest.raises(ValueError) as info:
            load_data(str(tmp_path / name))
        text = str(info.value)
        assert text.startswith(f"DATA {str(tmp_path / name)!r}") and cause in text, text
        assert "will likely succeed" not in text
    assert not marker.exists()
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}] * 200, dtype=object),
            allow_pickle=True)  # (pickled objects: numpy's own reason, not a size)
    with pytest.raises(ValueError, match="Object arrays cannot be loaded"):
        load_data(str(tmp_path / "objects.npy"))


# ------------------------------------------------------------------ errors
@pytest.mark.parametrize(("argv", "code", "message"), [
    ([], 2, "the following arguments are required: COMMAND"),
    (["frobnicate"], 2, "invalid choice: 'frobnicate'"),
    (["quantize", "mlp.pt", "--out", "x"], 2, "--method"),
    (["quantize", "mlp.pt", "--method", "static", *ARCH, "--out", "x"], 2,
     "--method static needs --calib DATA"),
    (["quantize", "mlp.pt", "--method", "dynamic", "--out", "x"], 2, "pass --arch"),
    (["quantize", "mlp.pt", "--method", "dynamic", "--arch", "nocolon", "--out", "x"], 2,
     "must look like 'package.module:factory'"),
    (["quantize", "mlp.pt", "--method", "dynamic", *ARCH[:2], "--arch-kwargs", "{oops",
      "--out", "x"], 2, "not valid JSON"),
    (["quantize", "mlp.pt", "--method", "static", "--calibrator", "magic", "--out", "x"], 2,
     "invalid choice: 'magic'"),
    (["compare", "mlp.pt", "q_dyn", *ARCH, "--data", "data.pt", "--batch-sizes", "0"], 2,
     "expected positive integers"),
    (["bench", "mlp.pt", *ARCH], 2, "pass --data DATA or --input-shape"),
    (["inspect", "q_dyn"], 0, ""),
    (["quantize", "missing.pt", "--method", "dynamic", *ARCH, "--out", "x"], 1,
     "MODEL 'missing.pt' does not exist"),
    (["quantize", "mlp.pt", "--method", "dynamic", "--arch", "lowbit.models:MnistCNN",
      "--out", "x"], 1, "does not fit --arch lowbit.models:MnistCNN"),
    (["quantize", "mlp.pt", "--method", "dynamic", "--arch", "no_such_pkg:f", "--out", "x"], 1,
     "cannot import it"),
    (["compare", "mlp.pt", "q_dyn", "--data", "data.pt"], 2, "pass --arch"),
    (["compare", "mlp.pt", "q_dyn", *ARCH, "--data", "nothing.npy"], 1,
     "DATA 'nothing.npy' does not exist"),
    (["inspect", "data.pt"], 1, "data.pt: not a lowbit file (a zip archive"),
    (["inspect", "nothing"], 1, "does not exist; pass the folder or the .safetensors file"),
    # options that were accepted and silently ignored, or checked only after the work
    (["sensitivity", "mlp.pt", *ARCH, "--method", "dynamic", "--data", "data.pt", "--out",
      "fb"], 2, "--out saves the fallback model that --budget finds"),
    (["sensitivity", "mlp.pt", *ARCH, "--method", "dynamic", "--data", "data.pt", "--budget",
      "-1"], 2, "must be an accuracy drop >= 0"),
    (["quantize", "mlp.pt", *ARCH, "--method", "dynamic", "--calibrator", "percentile",
      "--out", "x"], 2, "--calibrator chooses static activation ranges"),
    (["quantize", "mlp.pt", *ARCH, "--method", "int4", "--per-channel", "--group-size", "32",
      "--out", "x"], 2, "--group-size applies to group-wise INT4"),
    (["compare", "mlp.pt", "q_dyn", *ARCH, "--data", "short_labels.pt"], 1,
     "holds 40 inputs but 10 labels"),
])
def test_errors_are_one_line(work: Path, monkeypatch, capsys, argv: list[str], code: int,
                             message: str) -> None:
    monkeypatch.chdir(work)
    if not (work / "short_labels.pt").exists():
        torch.save({"inputs": torch.randn(40, 1, 28, 28), "labels": torch.arange(10)},
                   work / "short_labels.pt")
    assert main(argv) == code
    err = capsys.readouterr().err
    if code:
        assert err.startswith("lowbit: error: ") and err.count("\n") == 1, err
        assert message in err
        assert "Traceback" not in err


def test_a_pickled_model_or_another_file_names_the_cause(tmp_path: Path, capsys) -> None:
    """torch's own message advised re-running with weights_only=False (unpickling the file);
    the error now names what was refused and what MODEL must be."""
    torch.save(MLP(hidden=(32,)), tmp_path / "whole.pt")  # the pickled model, not its weights
    (tmp_path / "noise.pt").write_bytes(b"\x00" * 100)
    for name, cause in (("whole.pt", "Unsupported global: GLOBAL lowbit.models.MLP"),
                        ("noise.pt", "Unsupported operand 0")):
        assert main(["quantize", str(tmp_path / name), "--method", "dynamic", *ARCH, "--out",
                     str(tmp_path / "q")]) == 1
        err = capsys.readouterr().err
        assert cause in err and "torch.save(model.state_dict(), path)" in err, err
        assert "weights_only` set to `False` will likely succeed" not in err


def test_tampered_file_and_debug_via_subprocess(work: Path) -> None:
    bad = work / "bad.safetensors"
    data = bytearray((work / "q_dyn" / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    bad.write_bytes(bytes(data))
    run = lowbit("inspect", "bad.safetensors", cwd=work)
    assert run.returncode == 1
    assert run.stderr.startswith("lowbit: error: ") and run.stderr.count("\n") == 1
    assert "SHA-256 mismatch" in run.stderr and "Traceback" not in run.stderr
    run = lowbit("inspect", "bad.safetensors", "--debug", cwd=work)
    assert run.returncode == 1 and "Traceback" in run.stderr and "LoadError" in run.stderr
    run = lowbit("quantize", cwd=work)
    assert run.returncode == 2 and run.stderr.count("\n") == 1
    assert run.stderr.startswith("lowbit: error: the following arguments are required")


def test_compare_and_bench_label_every_model_apart(work: Path, capsys) -> None:
    """Models were keyed by file name: run1/q and run2/q gave one row (the second one's
    numbers under the first one's name), and a folder named FP32 replaced the float row."""
    from lowbit.cli import _labels

    assert _labels(["run1/q", "run2/q", "b.safetensors"]) == ["run1/q", "run2/q", "b"]
    assert _labels(["FP32", "q"], taken=("FP32",)) == ["FP32 (#1)", "q"]
    for folder in ("run1", "run2"):
        (work / folder).mkdir(exist_ok=True)
        save(load(work / "q_dyn", model=MLP(hidden=(32,))), work / folder / "q")
    capsys.readouterr()
    assert main(["compare", str(work / "mlp.pt"), str(work / "run1" / "q"),
                 str(work / "run2" / "q"), *ARCH, "--data", str(work / "data.pt"), "--iters",
                 "2", "--batch-sizes", "1", "--json", "--quiet"]) == 0
    names = [r["name"] for r in json.loads(capsys.readouterr().out)["rows"]]
    assert names == ["FP32", str(work / "run1" / "q"), str(work / "run2" / "q")]
