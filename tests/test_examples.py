"""Every script in examples/ runs end to end in its fast mode (real MNIST, real kernels), answers
``--help``, states its expected output, and its key claim holds.

The claims checked here are the ones the docs make about each example: PTQ INT8 costs well
under a point and reloads bit-identically, QAT beats PTQ where PTQ breaks (2-bit weights),
a registered custom calibrator is used like a built-in, per-layer overrides land where asked,
the sensitivity fallback really keeps a layer in FP32 within budget, and in the accuracy
comparison QAT is not worse than PTQ. One intra-op thread per script: pytest runs two at once
on two cores.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
OWN = ["accuracy_comparison.py", "custom_calibrator.py", "per_layer_config.py",
       "ptq_quickstart.py", "qat_quickstart.py", "sensitivity_analysis.py"]
#: Examples whose checks live with their feature's tests (other issues' examples).
ELSEWHERE = {"backend_selection.py", "distributed_calibration.py"}


def run(script: str, *args: str, cwd: Path) -> str:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(EXAMPLES / script), *args], capture_output=True,
                          text=True, timeout=600, cwd=cwd, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def percent(pattern: str, text: str) -> float:
    match = re.search(pattern, text)
    assert match, f"{pattern!r} not in output:\n{text[-2000:]}"
    return float(match.group(1))


def test_every_example_is_listed() -> None:
    found = {p.name for p in EXAMPLES.glob("*.py")}
    assert set(OWN) <= found
    assert found - set(OWN) <= ELSEWHERE, f"add a check for {sorted(found - set(OWN))}"


@pytest.mark.parametrize("script", OWN)
def test_example_documents_itself(script: str) -> None:
    """A module docstring with the usage line and the expected output (from a real run)."""
    text = (EXAMPLES / script).read_text()
    doc = text.split('"""')[1]
    assert f"python examples/{script}" in doc
    assert "--fast" in doc and "Expected output" in doc and "Zen 3" in doc


@pytest.mark.parametrize("script", OWN)
def test_example_help(script: str, capsys: pytest.CaptureFixture[str]) -> None:
    """``--help`` answers (in process: the script's own parse_args, no second interpreter)."""
    spec = importlib.util.spec_from_file_location(f"example_{script[:-3]}", EXAMPLES / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines functions only: main() runs under __main__
    with pytest.raises(SystemExit) as done:
        module.parse_args(["--help"])
    out = capsys.readouterr().out
    assert done.value.code == 0 and "--fast" in out and "--mnist" in out and "--cifar10" in out
    assert "cifar-10-binary.tar.gz" in out and "MNIST only" in out


def test_ptq_quickstart(tmp_path: Path) -> None:
    out = run("ptq_quickstart.py", "--fast", cwd=tmp_path)
    fp32 = percent(r"FP32 ([\d.]+)%", out)
    int8 = percent(r"-> INT8 ([\d.]+)%", out)
    assert fp32 - int8 < 1.0, out
    assert "saved and reloaded: identical outputs" in out


def test_ptq_quickstart_on_cifar10(tmp_path: Path) -> None:
    """``--cifar10 DIR`` end to end on a synthetic folder in the official binary format (random
    pixels: the run and the reload are checked, not the accuracy)."""
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    rng = np.random.default_rng(0)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for name in names:  # 110 records each: label byte + 3x32x32 pixels
        records = rng.integers(0, 256, (110, 3073), dtype=np.uint8)
        records[:, 0] %= 10
        (folder / name).write_bytes(records.tobytes())
    out = run("ptq_quickstart.py", "--fast", "--cifar10", str(tmp_path), cwd=tmp_path)
    assert "CIFAR-10 (binary version): the 550 training images" in out, out
    assert re.search(r"\| conv3 \| Conv2d \| quantized", out), out  # CifarCNN, not MnistCNN
    assert "saved and reloaded: identical outputs" in out


def test_qat_quickstart_beats_ptq(tmp_path: Path) -> None:
    out = run("qat_quickstart.py", "--fast", cwd=tmp_path)
    ptq = percent(r"W2A8 PTQ ([\d.]+)%", out)
    qat = percent(r"W2A8 QAT ([\d.]+)%", out)
    assert qat >= ptq + 1.0, out
    assert "saved and reloaded: identical outputs" in out


def test_custom_calibrator(tmp_path: Path) -> None:
    out = run("custom_calibrator.py", "--fast", cwd=tmp_path)
    rows = {}
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if len(cells) == 5 and cells[2].endswith("%"):
            lo, hi = (float(v) for v in cells[4].strip("[]").split(","))
            rows[(cells[0], cells[1])] = (float(cells[2].rstrip("%")), hi - lo)
    minmax_acc, minmax_width = rows[("minmax", "-")]
    k3_acc, k3_width = rows[("mean_std", "{'k': 3.0}")]
    assert k3_width < minmax_width  # the custom calibrator really chose the range
    assert abs(k3_acc - minmax_acc) < 2.0


def test_per_layer_config(tmp_path: Path) -> None:
    out = run("per_layer_config.py", "--fast", cwd=tmp_path)
    assert re.search(r"\| conv1 \| Conv2d \| fp32 \(requested\)", out), out
    assert re.search(r"\| fc1 \| Linear \| quantized \| W4 per_group", out), out
    assert "set_per_layer_fallback('fc2'): kept in FP32 -> ['fc2']" in out


def test_sensitivity_fallback_keeps_a_layer_in_fp32(tmp_path: Path) -> None:
    out = run("sensitivity_analysis.py", "--fast", "--report", str(tmp_path / "report"),
              cwd=tmp_path)
    drop_all = percent(r"all layers W3A8: drop (-?[\d.]+) points", out)
    kept = re.search(r"kept in FP32: (\[.*\]) -> drop (-?[\d.]+) points", out)
    assert kept, out
    assert drop_all > 0.25 and kept.group(1) != "[]", out  # the budget forced a fallback
    assert float(kept.group(2)) <= 0.25, out
    assert re.search(r"^\w+: fp32 \(requested\)$", out, re.MULTILINE), out
    assert (tmp_path / "report" / "report.html").stat().st_size > 1000


def test_accuracy_comparison_qat_not_worse_than_ptq(tmp_path: Path) -> None:
    out = run("accuracy_comparison.py", "--fast", "--report", str(tmp_path / "report"),
              cwd=tmp_path)
    acc = {m.group(1): float(m.group(2))
           for m in re.finditer(r"^\| ([A-Z][\w -]+?) \| ([\d.]+)% \|", out, re.MULTILINE)}
    assert {"FP32", "PTQ INT8 dynamic", "PTQ INT8 static", "PTQ INT4 weight-only g32",
            "PTQ W2A8", "QAT INT8 static", "QAT W2A8"} <= set(acc), out
    assert acc["QAT W2A8"] >= acc["PTQ W2A8"] + 3.0, out
    assert acc["QAT INT8 static"] >= acc["PTQ INT8 static"] - 0.5, out
    assert acc["FP32"] - acc["PTQ INT8 static"] < 1.0, out
    page = (tmp_path / "report" / "report.html").read_text()
    assert "Per-layer SQNR" in page and page.count("data:image/png;base64") >= 2
    assert "Per-layer SQNR" in (tmp_path / "report" / "report.md").read_text()
