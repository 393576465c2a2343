"""compare() / select_best(): every backend measured, agreement with reference, the choice."""

from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit import backends


def _mlp() -> torch.nn.Module:
    torch.manual_seed(0)
    return lowbit.models.MLP(in_features=32, hidden=(48,), num_classes=10).eval()


def test_compare_measures_every_backend() -> None:
    qmodel = lowbit.quantize_dynamic(_mlp())
    before = {k: v.clone() for k, v in qmodel.state_dict().items()}
    x = torch.randn(8, 32)
    table = backends.compare(qmodel, x, warmup=1, iters=3)
    names = [r.backend for r in table]
    assert sorted(names) == sorted(s.name for s in backends.available())
    runs = [r for r in table if r.available]
    assert [r.p50_ms for r in runs] == sorted(r.p50_ms for r in runs)  # fastest first
    for r in runs:
        assert r.p50_ms > 0 and r.p90_ms >= r.p50_ms and r.throughput > 0
        assert r.cosine > 0.9999 and r.rel_dev < 1e-2, r
    aoti = ("aotinductor",) if backends.available()["aotinductor"].available else ()
    for name in ("reference", "native", "torch", "torch.compile", *aoti):
        assert table[name].available and table[name].exact, table[name]
    for status in backends.available():
        if not status.available:
            assert table[status.name].reason == status.reason and math.isnan(
                table[status.name].p50_ms)
    md = table.to_markdown()
    assert "| backend | p50 ms | p90 ms | samples/s |" in md and "batch 8" in md
    assert all(torch.equal(v, before[k]) for k, v in qmodel.state_dict().items())
    assert {m.backend for m in qmodel.modules() if hasattr(m, "kernel_info")} == {"auto"}


def test_select_best_respects_the_tolerance() -> None:
    qmodel = lowbit.quantize_weight_only(_mlp(), 4, 32)
    x = torch.randn(4, 32)
    exact = backends.select_best(qmodel, x, 0.0, ["reference", "native", "torch"], warmup=1,
                                 iters=3)
    assert exact.table[exact.name].exact or exact.table[exact.name].rel_dev == 0.0
    loose = backends.select_best(qmodel, x, 0.05, ["reference", "native", "torch"], warmup=1,
                                 iters=3)
    fastest = min((r for r in loose.table if r.rel_dev <= 0.05), key=lambda r: r.p50_ms)
    assert loose.name == fastest.backend and "selected:" in loose.to_markdown()
    with pytest.raises(ValueError, match="tolerance=-1 must be >= 0"):
        backends.select_best(qmodel, x, -1)
    with pytest.raises(ValueError, match="unknown"):
        backends.compare(qmodel, x, ["reference", "gpu"])


def test_a_long_multi_line_failure_stays_one_table_row() -> None:
    """An exporter's error (several lines, terminal colour codes, a ``|``) broke the markdown
    table; each reason is now one cell of at most 300 characters."""
    reason = "failed: RuntimeError: step \x1b[96m1/3\x1b[0m of export\n- fix | this\n" + "x" * 500
    table = backends.BackendComparison(
        [backends.BackendResult("onnxruntime", False, reason=reason)], batch_size=2, threads=1)
    rows = [line for line in table.to_markdown().splitlines() if line.startswith("| onnx")]
    assert len(rows) == 1 and "\x1b" not in rows[0] and "step 1/3 of export - fix \\| this" in \
        rows[0] and len(rows[0]) < 400


class _TwoHeads(torch.nn.Module):
    """Returns ``(None, {"n": 3, "int8": ..., "int4": ...})``: a missing loss first, a
    non-tensor value, and a second output whose layer deviates on another backend."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(32, 16), torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor, use_cache: bool = False) -> tuple:
        return None, {"n": 3, "int8": self.a(x), "int4": self.b(x)}


def test_every_output_is_compared_and_batch_is_read_from_the_first_tensor() -> None:
    """Only the first output had been compared (torch reported exact while the INT4 head
    deviated), a None first output crashed, and a dict's first non-tensor value gave batch 1."""
    torch.manual_seed(0)
    model = _TwoHeads().eval()
    cfg = lowbit.QuantizationConfig.int8_dynamic(
        layer_overrides={"b": lowbit.QuantizationConfig.int4_weight_only(32)})
    qmodel = lowbit.PTQQuantizer(cfg, progress=False).quantize(model)
    x = torch.randn(8, 32)  # (up to 16 rows PyTorch's bf16 packed INT4 runs on every CPU;
    # more rows dequantize for a float32 GEMM on CPUs without fast bf16: exact there)
    table = backends.compare(qmodel, x, ["reference", "torch"], warmup=1, iters=2)
    assert table["torch"].available and not table["torch"].exact  # (bf16 packed INT4)
    only_int8 = lowbit.PTQQuantizer(lowbit.QuantizationConfig.int8_dynamic(),
                                    progress=False).quantize(model)
    assert backends.compare(only_int8, x, ["reference", "torch"], warmup=1,
                            iters=2)["torch"].exact
    assert backends.compare(only_int8, {"use_cache": False, "x": x}, ["reference"], warmup=1,
                            iters=2).batch_size == 8


@pytest.mark.parametrize("example", [torch.randn(0, 32), torch.full((4, 32), float("nan"))],
                         ids=["empty", "nan"])
def test_an_example_nothing_can_be_measured_on_is_refused(example) -> None:
    """An empty batch reported every backend 'same bits, cosine 1.0'."""
    with pytest.raises(ValueError, match=r"reference backend's output on example_inputs "
                                         r"(is empty|holds NaN/Inf)"):
        backends.compare(lowbit.quantize_dynamic(_mlp()), example, ["reference", "native"])
