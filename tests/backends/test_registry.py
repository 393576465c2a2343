"""lowbit.backends.registry: available() is honest, selection errors name the reason."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import torch
from torch import nn

import lowbit
from lowbit import backends, native
from lowbit.backends import BackendUnavailableError


def _qmodel() -> nn.Module:
    return lowbit.quantize_dynamic(nn.Sequential(nn.Linear(16, 8), nn.ReLU()))


def test_available_lists_every_builtin_backend() -> None:
    table = backends.available()
    assert [s.name for s in table] == ["reference", "native", "torch", "cuda", "onnxruntime",
                                       "torch.compile", "aotinductor"]
    assert table["reference"].available and table["torch"].available
    assert {s.scope for s in table} == {"layer", "model"}
    for status in table:
        assert status.available == (status.reason == ""), status
    if native.load_native() is not None:
        assert f"ISA path {native.selected_isa()}" in table["native"].detail
    md = table.to_markdown()
    assert md.count("\n") == len(table) + 1 and "| reference | layer | yes |" in md


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_unavailable_without_gpu() -> None:
    status = backends.available()["cuda"]
    assert not status.available and "no CUDA device" in status.reason
    with pytest.raises(BackendUnavailableError, match="'cuda' is not available here: no CUDA"):
        backends.set_backend(_qmodel(), "cuda")
    with pytest.raises(BackendUnavailableError, match="no CUDA device"):
        lowbit.PTQQuantizer(backend="cuda")


def test_old_torch_makes_aotinductor_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    """torch 2.9's AOTInductor cannot lower a static conv layer's op: the backend names the
    version it needs instead of failing inside the compile."""
    monkeypatch.setattr(torch, "__version__", torch.torch_version.TorchVersion("2.9.1+cpu"))
    status = backends.available()["aotinductor"]
    assert not status.available
    assert status.reason.startswith("torch 2.9.1+cpu is older than 2.11") and "pip" in status.reason
    with pytest.raises(BackendUnavailableError, match="'aotinductor' is not available here"):
        backends.set_backend(_qmodel(), "aotinductor", torch.randn(2, 16))
    assert backends.available()["torch.compile"].available == (
        backends.available()["torch.compile"].reason == "")


def test_hidden_package_makes_onnxruntime_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def find_spec(name: str, *args, **kwargs):
        return None if name == "onnxruntime" else real(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    status = backends.available()["onnxruntime"]
    assert not status.available
    assert status.reason == "package onnxruntime is not installed (pip install 'lowbit[onnx]')"
    with pytest.raises(BackendUnavailableError, match="onnxruntime is not installed"):
        backends.set_backend(_qmodel(), "onnxruntime", torch.randn(2, 16))
    assert "onnxruntime" not in backends.available().names


def test_missing_onnxscript_makes_onnxruntime_unavailable(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporter needs onnxscript: without it available() had said yes, then set_backend
    failed with an ImportError."""
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a, **k: None
                        if name == "onnxscript" else real(name, *a, **k))
    assert backends.available()["onnxruntime"].reason == (
        "package onnxscript is not installed (pip install 'lowbit[onnx]')")


def test_missing_export_module_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lowbit.onnx_export", None)  # import fails: not present
    status = backends.available()["onnxruntime"]
    assert (status.available, status.reason) == (False, "lowbit.onnx_export not present")


def test_native_unavailable_without_c_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOWBIT_NATIVE", "0")
    native._reset_for_tests()
    try:
        status = backends.available()["native"]
        assert not status.available and "LOWBIT_NATIVE=0" in status.reason
        with pytest.raises(BackendUnavailableError, match="LOWBIT_NATIVE=0"):
            backends.set_backend(_qmodel(), "native")
        with pytest.raises(BackendUnavailableError, match="LOWBIT_NATIVE=0"):
            lowbit.quantize_dynamic(nn.Linear(4, 4), backend="native")
    finally:
        monkeypatch.delenv("LOWBIT_NATIVE")
        native._reset_for_tests()


def test_selection_errors() -> None:
    q = _qmodel()
    with pytest.raises(ValueError, match="backend='tpu' is unknown; known backends: reference"):
        backends.set_backend(q, "tpu")
    with pytest.raises(ValueError, match="runs a whole model"), backends.use("torch.compile"):
        pass
    with pytest.raises(ValueError, match="needs example_inputs"):
        backends.set_backend(q, "onnxruntime")
    with pytest.raises(ValueError, match="no lowbit quantized layer"):
        backends.set_backend(nn.Linear(2, 2), "reference")
    with pytest.raises(ValueError, match="runs a whole model, not one layer"):
        lowbit.PTQQuantizer(backend="torch.compile")
    with pytest.raises(ValueError, match="backend='fast' is unknown"):
        lowbit.modules.QuantizedLinear(4, 4, backend="fast")


def test_register_backend() -> None:
    mine = backends.Backend("exact-again", "pure PyTorch", "bit-identical", lambda: "not today",
                            layer_value="reference")
    backends.register_backend(mine)
    try:
        assert backends.available()["exact-again"].reason == "not today"
        with pytest.raises(ValueError, match="already registered"):
            backends.register_backend(mine)
        with pytest.raises(BackendUnavailableError, match="not today"):
            backends.require("exact-again")
    finally:
        backends.registry._REGISTRY.pop("exact-again")
    with pytest.raises(ValueError, match="exactly one of layer_value"):
        backends.Backend("bad", "", "", lambda: None)
