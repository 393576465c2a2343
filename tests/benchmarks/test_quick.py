"""Benchmark scripts run to the end in their ``--quick`` mode (a broken benchmark would
otherwise go unseen until someone measures). Each runs from a copy of ``benchmarks/`` in a
temporary folder, so its results files land there; the timings themselves are not checked
(speed lives in the benchmarks, never in tests).

The suite runs the scripts whose quick mode takes up to ~25 s (2 cores); ``bench_backends``,
``bench_onnx`` and ``bench_transformers`` take 50-95 s each even then (ONNX exports, the real
MiniLM), which the suite's time budget does not allow: ``python benchmarks/run_all.py --quick``
runs every script (measured ~5 minutes)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = sorted(p.name for p in (ROOT / "benchmarks").glob("bench_*.py"))
#: Quick modes too slow for the suite (see the module docstring).
SLOW = ("bench_backends.py", "bench_onnx.py", "bench_transformers.py")


@pytest.fixture(scope="module")
def bench_copy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of ``benchmarks/`` (and the MiniLM sentences some of them read) in a temp dir."""
    root = tmp_path_factory.mktemp("bench")
    shutil.copytree(ROOT / "benchmarks", root / "benchmarks",
                    ignore=shutil.ignore_patterns("results", "__pycache__"))
    (root / "tests" / "integration").mkdir(parents=True)
    shutil.copy(ROOT / "tests" / "integration" / "test_minilm.py", root / "tests" / "integration")
    return root


def test_every_benchmark_has_a_quick_mode() -> None:
    assert len(SCRIPTS) >= 10 and set(SLOW) <= set(SCRIPTS)
    for name in SCRIPTS:
        assert "--quick" in (ROOT / "benchmarks" / name).read_text(), name


@pytest.mark.parametrize("name", [s for s in SCRIPTS if s not in SLOW])
def test_benchmark_runs_quick(bench_copy: Path, name: str) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [
        str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
    run = subprocess.run([sys.executable, str(bench_copy / "benchmarks" / name), "--quick"],
                         cwd=bench_copy, capture_output=True, text=True, timeout=600, env=env,
                         check=False)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "|" in run.stdout and "FAILED" not in run.stdout, run.stdout[-3000:]


def test_results_go_where_run_all_says(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``run_all.py --out-dir DIR`` (through LOWBIT_BENCH_RESULTS) moves every benchmark's JSON
    results out of the repository; six benchmarks had a fixed path under benchmarks/results."""
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    from _timing import results_path

    monkeypatch.setenv("LOWBIT_BENCH_RESULTS", str(tmp_path / "out"))
    assert results_path("bench_x.json") == tmp_path / "out" / "bench_x.json"
    assert (tmp_path / "out").is_dir()
    for name in SCRIPTS:  # every script writes through it (or writes nothing)
        text = (ROOT / "benchmarks" / name).read_text()
        assert '/ "results"' not in text, name
