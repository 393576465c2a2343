"""Shared pytest configuration and fixtures.

Generic fixtures come first (seeding, RNG, hypothesis profiles, thread count); fixtures for
particular features go below the marked line.
"""

from __future__ import annotations

import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, settings
from hypothesis.configuration import set_hypothesis_home_dir
from torch import nn

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
# temporary folders.
set_hypothesis_home_dir(os.environ.get("HYPOTHESIS_STORAGE_DIRECTORY")
                        or tempfile.mkdtemp(prefix="lowbit-hypothesis-"))

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
    """One Linear registered under two names and called twice, with a ReLU after one call."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 8)
        self.b = self.a
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(torch.relu(self.a(x))))


@pytest.fixture
def shared_layer_model() -> nn.Module:
    """A float model (eval mode) whose Linear ``a`` is also registered as ``b``."""
    return _SharedLayer().eval()


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
