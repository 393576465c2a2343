"""lowbit.report: markdown + self-contained HTML with plots; rendered in headless Chromium."""

from __future__ import annotations

import base64
import html
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch
from matplotlib.image import imread
from torch import nn
from torch.utils.data import TensorDataset

from lowbit.config import QuantizationConfig
from lowbit.evaluation import compare_models, evaluate_accuracy
from lowbit.models import MnistCNN
from lowbit.ptq import quantize_dynamic, quantize_static
from lowbit.report import collect_histograms, report
from lowbit.sensitivity import analyze_sensitivity
from lowbit.serialization import load, save

CHROMIUM = next((p for p in ("/usr/bin/chromium", "/usr/bin/chromium-browser")
                 if Path(p).exists()), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                  "--no-first-run", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def full_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every section of the report, for a small CNN on synthetic data (fast, no training)."""
    torch.manual_seed(0)
    model = MnistCNN().eval()
    x = torch.randn(96, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    data = TensorDataset(x, model(x).argmax(1).detach())
    calib = list(x[:64].split(32))
    qstatic = quantize_static(model, calib, progress=False)
    table = compare_models({"FP32": model, "INT8 static": qstatic,
                            "INT8 dynamic": quantize_dynamic(model)}, data,
                           {"b1": x[:1]}, warmup=1, iters=2, rounds=1)
    sens = analyze_sensitivity(model, QuantizationConfig.int8_static(),
                               lambda m: evaluate_accuracy(m, data), calib, progress=False,
                               metric_name="accuracy")
    hists = collect_histograms(model, qstatic, calib[0], sens.most_sensitive(2))
    out = tmp_path_factory.mktemp("report")
    return report(out, comparison=table, quantized_model=qstatic, sensitivity=sens,
                  histograms=hists, notes="synthetic test <data> & co")


def test_files_and_sections(full_report: Path) -> None:
    out = full_report.parent
    md = (out / "report.md").read_text()
    for heading in ("## Comparison", "## Per-layer schemes", "## Sensitivity",
                    "## Weight and activation histograms"):
        assert heading in md
    for png in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", md):
        assert (out / png).read_bytes().startswith(PNG_MAGIC)
    assert (out / "sensitivity.png").is_file() and (out / "latency.png").is_file()
    assert len(list(out.glob("hist_*.png"))) == 2
    assert "| INT8 static |" in md and "| conv1 | Conv2d | quantized |" in md


def test_html_is_self_contained(full_report: Path) -> None:
    page = full_report.read_text()
    assert page.startswith("<!DOCTYPE html>")
    assert "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?(https?:|//|file:)""", page)
    sources = re.findall(r'<img src="([^"]+)"', page)
    assert len(sources) == 4  # latency, sensitivity and two histogram figures
    for src in sources:
        prefix = "data:image/png;base64,"
        assert src.startswith(prefix)
        assert base64.b64decode(src[len(prefix):]).startswith(PNG_MAGIC)
    assert "synthetic test &lt;data&gt; &amp; co" in page  # user text is escaped


def test_histograms_use_folded_weights_and_clipping_ranges() -> None:
    torch.manual_seed(0)
    model = MnistCNN().eval()
    with torch.no_grad():
        model.bn1.running_var.fill_(0.01)  # folding multiplies the conv weights by 10
    x = torch.randn(8, 1, 28, 28)
    q = quantize_static(model, [x], progress=False)
    h = collect_histograms(model, q, x, ["conv1", "fc1"])
    lo, hi = h["conv1"].weight_range
    amax = float(h["conv1"].weight.abs().max())
    assert amax > 2 * float(model.conv1.weight.detach().abs().max())  # folded, not raw
    assert lo <= -amax * 0.99 and hi >= amax * 0.99
    assert h["conv1"].activation_note == "calibrated (minmax)"
    a_lo, a_hi = h["fc1"].activation_range
    assert a_lo <= float(h["fc1"].activation.min()) and a_hi >= float(h["fc1"].activation.max())
    d = collect_histograms(model, quantize_dynamic(model), x, ["fc2"])["fc2"]
    assert d.activation_range is None and "run time" in d.activation_note
    with pytest.raises(ValueError, match="'bn1' is not a quantized layer"):
        collect_histograms(model, q, x, ["bn1"])


def test_report_of_a_loaded_model_and_dict_inputs(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    q = quantize_static(model, [torch.randn(32, 8)], progress=False)
    save(q, tmp_path / "q")
    loaded = load(tmp_path / "q", model=nn.Sequential(nn.Linear(8, 16), nn.ReLU(),
                                                      nn.Linear(16, 4)))
    sens = analyze_sensitivity(model, example_input=torch.randn(16, 8), progress=False)
    page = report(tmp_path / "r", quantized_model=loaded, sensitivity=sens.to_dict())
    md = (tmp_path / "r" / "report.md").read_text()
    assert "| 0 | Linear | quantized | W8 per_channel, A8 per_tensor calibrated (minmax) |" in md
    assert "1 - output cosine" not in md and page.is_file()
    with pytest.raises(ValueError, match="nothing to report"):
        report(tmp_path / "empty")


def _chromium(*args: str, tmp: Path) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp / 'profile'}",
                           *args], capture_output=True, text=True, timeout=120)


def _console_messages(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines()
            if ":CONSOLE" in line or "Uncaught" in line or "Failed to load resource" in line]


# Run after the load event of a copy of the page: how each image decoded and the page height.
_PROBE = ("<script>window.addEventListener('load', () => document.body.setAttribute("
          "'data-probe', JSON.stringify({images: [...document.images].map(i => i.complete ? "
          "i.naturalWidth : -1), height: document.documentElement.scrollHeight})))</script>")


def _probe(page: Path, tmp: Path) -> dict[str, Any]:
    probe = tmp / "probe.html"
    probe.write_text(page.read_text().replace("</body>", _PROBE + "</body>"))
    dom = _chromium("--window-size=1280,1000", "--dump-dom", probe.as_uri(), tmp=tmp).stdout
    found = re.search(r'data-probe="([^"]*)"', dom)
    assert found, dom[-1000:]
    return json.loads(html.unescape(found.group(1)))


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install "
                    "-y chromium); the HTML report is not rendered in this run")
def test_renders_in_headless_chromium(full_report: Path, tmp_path: Path) -> None:
    probe = _probe(full_report, tmp_path)
    assert len(probe["images"]) == 4 and min(probe["images"]) > 300, probe  # all PNGs decoded
    height = int(probe["height"])
    assert 1500 < height < 10_000, probe
    shot = tmp_path / "shot.png"
    run = _chromium("--enable-logging=stderr", "--v=0", f"--screenshot={shot}",
                    f"--window-size=1280,{height}", full_report.as_uri(), tmp=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert _console_messages(run.stderr) == []
    assert shot.read_bytes().startswith(PNG_MAGIC) and shot.stat().st_size > 50_000
    pixels = imread(shot)[..., :3]  # the whole page, plots included
    assert pixels.shape[:2] == (height, 1280) and float(pixels.std()) > 0.05
    bottom = pixels[int(height * 0.75):]  # the last histograms, at the end of the page
    assert float(bottom.std()) > 0.05 and float((bottom < 0.5).mean()) > 0.005
    keep = os.environ.get("LOWBIT_SCREENSHOT_DIR")  # to look at the screenshot
    if keep:
        shutil.copy(shot, Path(keep) / "report_screenshot.png")
    dom = _chromium("--dump-dom", full_report.as_uri(), tmp=tmp_path).stdout
    for text in ("Comparison", "Per-layer schemes", "Sensitivity",
                 "Weight and activation histograms", "INT8 static", "speedup b1", "conv2"):
        assert text in dom


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
def test_console_error_detection_works(tmp_path: Path) -> None:
    """The checks above would notice a console error or a broken image: a page with both is
    flagged."""
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><p>x</p><img src='data:image/png;base64,AAAA'>"
                   "<script>undefinedFunction();</script></body></html>")
    run = _chromium("--enable-logging=stderr", "--v=0", f"--screenshot={tmp_path / 's.png'}",
                    bad.as_uri(), tmp=tmp_path)
    assert any("Uncaught ReferenceError" in line for line in _console_messages(run.stderr))
    assert _probe(bad, tmp_path)["images"] == [0]


def test_layers_left_out_of_a_sensitivity_run_are_listed(tmp_path: Path) -> None:
    """Without an eval_fn the report had dropped the list of layers not analysed (it kept the
    markdown after the table's blank line, which only a baseline wrote)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    rep = analyze_sensitivity(model, QuantizationConfig.int8_dynamic(skip_layers=("2",)),
                              example_input=torch.randn(32, 8), progress=False)
    report(tmp_path, sensitivity=rep)
    assert "- 2: not analysed (kept in FP32 by skip_layers)" in (tmp_path / "report.md").read_text()


def test_a_failed_write_keeps_the_previous_report(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Each file is replaced atomically: a write that fails half-way (a full disk) leaves the
    previous report whole, and no temporary behind (it had truncated report.md)."""
    from lowbit.evaluation import ComparisonRow

    rows = [ComparisonRow("FP32", 98.6, 0.0, 827_688, 1.0),
            ComparisonRow("INT8", 98.5, 0.1, 211_000, 3.92)]
    report(tmp_path, comparison=rows)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}

    def half_then_fail(self: Path, data: Any, *args: Any, **kwargs: Any) -> int:
        with open(self, "wb") as f:
            f.write(bytes(data[: len(data) // 2]) if isinstance(data, bytes)
                    else data[: len(data) // 2].encode())
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", half_then_fail)
    monkeypatch.setattr(Path, "write_text", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        report(tmp_path, comparison=rows, title="another title")
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
