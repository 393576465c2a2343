"""``benchmarks/emulate.py``: a benchmark run under another CPU's instruction limits gets the
libraries' switches in its environment, says so in its machine line, and passes its exit code
through; bad arguments get a usage message."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _module(name: str):
    path = ROOT / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def test_every_isa_caps_lowbit_and_onednn() -> None:
    emulate = _module("emulate")
    for isa, caps in emulate.CAPS.items():
        env = emulate.emulation_env(isa, {"PATH": "/bin"})
        assert env["LOWBIT_ISA"] == isa and env["PATH"] == "/bin"
        assert set(caps) <= set(_module("_timing").EMULATION_VARS)
    with pytest.raises(ValueError, match="unknown ISA 'sse2'"):
        emulate.emulation_env("sse2", {})


def test_runs_the_script_with_the_caps_and_returns_its_exit_code(tmp_path: Path) -> None:
    script = tmp_path / "bench_probe.py"
    script.write_text("import os, sys\nprint(os.environ['FBGEMM_ENABLE_INSTRUCTIONS'], "
                      "os.environ['LOWBIT_ISA'])\nsys.exit(3)\n")
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "emulate.py"), "avx2",
                          str(script)], capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 3 and run.stdout.split() == ["AVX2", "avx2"], run.stderr


@pytest.mark.parametrize("args", [[], ["avx2"], ["neon", "bench_kernels.py"],
                                  ["avx2", "bench_nothing.py"]])
def test_bad_arguments_exit_2_with_a_message(args: list[str]) -> None:
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "emulate.py"), *args],
                         capture_output=True, text=True, timeout=60, check=False)
    assert run.returncode == 2 and ("usage" in run.stderr or "no benchmark" in run.stderr)


def test_machine_line_names_the_caps(monkeypatch: pytest.MonkeyPatch) -> None:
    timing = _module("_timing")
    for var in timing.EMULATION_VARS:
        monkeypatch.delenv(var, raising=False)
    assert "limited by" not in timing.machine_line()
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert "limited by ONEDNN_MAX_CPU_ISA=AVX2 (ONNX Runtime not)" in timing.machine_line()
