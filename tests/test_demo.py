"""End-to-end: ``lowbit demo`` trains, quantizes three ways and prints the comparison table."""

from __future__ import annotations

import json

import pytest

from lowbit.demo import main


def test_demo_one_epoch_end_to_end(tmp_path, capsys):
    out_json = tmp_path / "demo.json"
    assert main(["--epochs", "1", "--quiet", "--json", str(out_json)]) == 0
    printed = capsys.readouterr().out
    header = printed.splitlines()[1]
    for column in ("model", "accuracy", "drop", "size", "compression", "latency b1",
                   "speedup b1", "latency b64", "speedup b64"):
        assert column in header
    for name in ("FP32", "INT8 dynamic", "INT8 static", "INT4 weight-only"):
        assert f"| {name} |" in printed
    assert "first 8,000" in printed and "last 2,000" in printed

    results = json.loads(out_json.read_text())
    rows = {r["name"]: r for r in results["rows"]}
    assert rows["FP32"]["accuracy"] > 93.0  # one epoch on 8,000 images
    for name in ("INT8 dynamic", "INT8 static"):
        assert rows[name]["accuracy_drop"] < 1.5, name
        assert rows[name]["compression"] > 3.0, name
    assert rows["INT4 weight-only"]["accuracy_drop"] < 3.0
    assert rows["INT4 weight-only"]["compression"] > rows["INT8 dynamic"]["compression"]
    for row in rows.values():
        assert row["latency"]["b1"]["median_ms"] > 0 and row["latency"]["b64"]["median_ms"] > 0
    static = results["coverage"]["INT8 static"]["layers"]
    assert [layer["status"] for layer in static] == ["quantized"] * 4


def test_demo_rejects_bad_epochs(capsys):
    with pytest.raises(SystemExit):
        main(["--epochs", "0"])
    assert "--epochs must be >= 1" in capsys.readouterr().err
