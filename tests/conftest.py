"""Shared pytest configuration and fixtures.

Generic fixtures come first (seeding, RNG, hypothesis profiles, thread count); fixtures for
particular features go below the marked line.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from torch import nn

import lowbit
from lowbit.models import MLP, MnistCNN

# ---------------------------------------------------------------------------------- generic
# Hypothesis: modest example counts, no deadline (CI hosts are shared and noisy), and
# derandomized by default so CI failures reproduce; LOWBIT_HYPOTHESIS_PROFILE=dev explores new
# examples, =thorough runs ten times more.
settings.register_profile("ci", max_examples=50, deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("dev", max_examples=50, deadline=None)
settings.register_profile("thorough", max_examples=500, deadline=None)
settings.load_profile(os.environ.get("LOWBIT_HYPOTHESIS_PROFILE", "ci"))
# Hypothesis caches constants under ./.hypothesis even without a database: tests write only to
# temporary folders, and remove the one they made when the process ends.
_HYPOTHESIS_HOME = os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY")
if not _HYPOTHESIS_HOME:
    _HYPOTHESIS_HOME = tempfile.mkdtemp(prefix="lowbit-hypothesis-")
    atexit.register(shutil.rmtree, _HYPOTHESIS_HOME, ignore_errors=True)
set_hypothesis_home_dir(_HYPOTHESIS_HOME)

# torch 2.13's Inductor, on CPUs with AVX-512, tiles some float kernels by 8 and stores
# 16-float vectors: kernels that also write a bool / int8 tensor (a training graph's ReLU mask
# under one thread, as in the xdist workers; the max-pool backward at any thread count) write
# past their buffers: heap corruption ("double free or corruption") and wrong gradients in
# whichever compile test runs it. Pinning the vector width keeps loops and stores the same
# width. Not lowbit's code; docs/guides/troubleshooting.md gives users the same two lines.
if torch.backends.cpu.get_cpu_capability() == "AVX512":
    import torch._inductor.config

    torch._inductor.config.cpp.simdlen = 512

# Under pytest-xdist every worker would otherwise start torch's default thread pool on the
# same cores; oversubscribed intra-op threads make small tensor ops up to 100x slower.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch() -> None:
    """Every test starts from the same global torch seed."""
    torch.manual_seed(0)


@pytest.fixture
def rng() -> torch.Generator:
    """A private, seeded CPU generator for tests that draw their own data."""
    return torch.Generator().manual_seed(1234)


# ------------------------------------------------------------------------ feature fixtures


class _SharedLayer(nn.Module):
    """One Linear registered under two names (``first``, then ``second``) and called under
    both, with a ReLU after the first call; a ``head`` Linear after it."""

    def __init__(self, first: str = "a", second: str = "b") -> None:
        super().__init__()
        self.names = (first, second)
        self.add_module(first, nn.Linear(8, 8))
        self.add_module(second, self.get_submodule(first))
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        first, second = (self.get_submodule(n) for n in self.names)
        return self.head(second(torch.relu(first(x))))


@pytest.fixture
def shared_layer_model() -> nn.Module:
    """A float model (eval mode) whose Linear ``a`` is also registered as ``b``."""
    return _SharedLayer().eval()


@pytest.fixture
def make_shared_layer_model():
    """``make(first, second)``: a fresh float model (eval mode) whose Linear ``first`` is also
    registered as ``second`` (e.g. a second name that sorts first)."""
    return lambda first="a", second="b": _SharedLayer(first, second).eval()


@pytest.fixture
def forced_isa(monkeypatch: pytest.MonkeyPatch):
    """``forced_isa(name)`` forces ``LOWBIT_ISA`` for one test; the automatic choice is back
    after it (the selection is cached per process, so it is reset both ways)."""
    from lowbit import native

    def force(isa: str) -> None:
        monkeypatch.setenv("LOWBIT_ISA", isa)
        native._reset_for_tests()

    yield force
    monkeypatch.delenv("LOWBIT_ISA", raising=False)
    native._reset_for_tests()


# Small quantized models for the backend tests (tests/backends): the MNIST CNN, an MLP, and a
# 2-layer BERT built offline from a config (random init), each dynamic / static / INT4.
def _bert_and_inputs() -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    """A 2-layer BERT (hidden 64) from a config, and a batch of 2 x 8 token ids."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(vocab_size=100, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128,
                                  max_position_embeddings=32)
    torch.manual_seed(0)
    model = transformers.BertModel(cfg).eval()
    ids = torch.randint(0, 100, (2, 8), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": ids, "attention_mask": torch.ones(2, 8, dtype=torch.long)}


@pytest.fixture
def tiny_bert() -> torch.nn.Module:
    """The 2-layer BERT (hidden 64) of the backend tests, built fresh from its config."""
    return _bert_and_inputs()[0]


def _quantized(kind: str) -> tuple[torch.nn.Module, object]:
    """``(quantized model, example inputs)`` for ``kind`` in cnn-static, cnn-dynamic,
    cnn-int4, mlp-dynamic, mlp-static, mlp-int4, bert-dynamic, bert-static, bert-int4."""
    arch, mode = kind.split("-")
    torch.manual_seed(0)
    if arch == "bert":
        model, x = _bert_and_inputs()
    elif arch == "cnn":
        model, x = MnistCNN().eval(), torch.randn(4, 1, 28, 28)
    else:
        model, x = MLP(in_features=64, hidden=(96, 64), num_classes=10).eval(), torch.randn(4, 64)
    if mode == "dynamic":
        return lowbit.quantize_dynamic(model), x
    if mode == "static":
        return lowbit.quantize_static(model, [x], progress=False), x
    return lowbit.quantize_weight_only(model, bits=4, group_size=32), x


def _call(model: torch.nn.Module, x: object) -> torch.Tensor:
    """The model's output tensor for ``x`` (a tensor or a dict of keyword inputs)."""
    with torch.inference_mode():
        out = model(**x) if isinstance(x, dict) else model(x)
    if isinstance(out, tuple):
        return out[0]
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out


@pytest.fixture
def make_quantized():
    """``make_quantized(kind)`` -> ``(quantized model, example inputs)`` (see ``_quantized``)."""
    return _quantized


@pytest.fixture
def run():
    """``run(model, inputs)`` -> the output tensor, under inference mode."""
    return _call
