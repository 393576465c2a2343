"""examples/backend_selection.py runs end to end in its fast mode and its claims hold."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "backend_selection.py"


def test_backend_selection_example(tmp_path: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(SCRIPT), "--fast"], capture_output=True,
                          text=True, timeout=600, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "| reference | layer | yes |" in out and "MNIST CNN, static INT8" in out
    assert re.search(r"selected: (\S+) \(fastest", out)
    assert "inside use('reference'): identical = True" in out
    agree = float(re.search(r"argmax agreement ([\d.]+)%", out).group(1))
    assert agree >= 99.9, out
    assert "Transformer encoder block, dynamic INT8" in out
    text = SCRIPT.read_text()
    assert "python examples/backend_selection.py" in text and "Expected output" in text
