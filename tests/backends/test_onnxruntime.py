"""The onnxruntime backend end to end: lowbit.onnx_export's export, a real ORT session."""

from __future__ import annotations

import pytest
import torch

from lowbit import backends

if not backends.available()["onnxruntime"].available:  # real feature detection
    pytest.skip(f"onnxruntime backend: {backends.available()['onnxruntime'].reason}",
                allow_module_level=True)


@pytest.mark.parametrize("kind", ["mlp-dynamic", "cnn-static", "mlp-int4"])
def test_onnxruntime_backend_agrees_with_reference(kind: str, make_quantized, run) -> None:
    qmodel, x = make_quantized(kind)
    with backends.use("reference"):
        ref = run(qmodel, x)
    ort = backends.set_backend(qmodel, "onnxruntime", x)
    assert type(ort).__name__ == "OnnxRuntimeModule" and ort is not qmodel
    out = run(ort, x)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert float((out - ref).abs().max()) <= 2e-2 * float(ref.abs().max())
    assert torch.equal(out.argmax(-1), ref.argmax(-1))
    x1 = x[:1]  # dynamic batch
    with backends.use("reference"):
        ref1 = run(qmodel, x1)
    assert float((run(ort, x1) - ref1).abs().max()) <= 2e-2 * float(ref1.abs().max())


def test_dynamic_axes_keep_the_sequence_length_free(make_quantized, run) -> None:
    """set_backend(..., dynamic_axes=(0, 1)): a BERT exported from 8 tokens runs 16 (with the
    default, batch-only axes the graph fixes the length: a clear error). A layer backend has
    no export to shape: refused."""
    qmodel, x = make_quantized("bert-dynamic")
    ort = backends.set_backend(qmodel, "onnxruntime", x, dynamic_axes=(0, 1))
    longer = {k: torch.cat([v, v], dim=1)[:1] for k, v in x.items()}
    ref, out = run(qmodel, longer), run(ort, longer)
    assert out.shape == ref.shape and float((out - ref).abs().max()) <= 2e-2 * float(
        ref.abs().max())
    with pytest.raises(ValueError, match="dynamic_axes applies to the backends that export"):
        backends.set_backend(qmodel, "native", dynamic_axes=(0, 1))
