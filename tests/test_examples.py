"""Every script in examples/ runs end to end (real MNIST, real kernels) and says what it did."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
EXPECTED = {
    "ptq_quickstart.py": "identical outputs",
    "qat_quickstart.py": "identical outputs",
    "custom_calibrator.py": "",
    "per_layer_config.py": "",
    "sensitivity_analysis.py": "report written to",
}


def test_every_example_is_listed() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("script", sorted(EXPECTED))
def test_example_runs(script: str, tmp_path: Path) -> None:
    args = [sys.executable, str(EXAMPLES / script)]
    if script == "sensitivity_analysis.py":
        args.append(str(tmp_path / "report"))
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert EXPECTED[script] in done.stdout
    if script == "sensitivity_analysis.py":
        assert (tmp_path / "report" / "report.html").stat().st_size > 1000
    if script == "qat_quickstart.py":
        line = next(s for s in done.stdout.splitlines() if s.startswith("FP32"))
        ptq = float(line.split("PTQ ")[1].split("%")[0])
        qat = float(line.split("QAT ")[1].split("%")[0])
        assert qat >= ptq + 1.0, line
