"""Tests for lowbit.reparam: copies and weight reparametrizations of the user's model."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrizations, prune

from lowbit.reparam import bake_reparametrizations, copy_model, weight_mask


def test_copy_model_takes_a_training_mode_weight_norm_model() -> None:
    """A hook-based weight_norm layer's weight carries autograd history until its next call:
    copy.deepcopy refuses it, copy_model copies it detached (and equal)."""
    model = nn.Sequential(nn.utils.weight_norm(nn.Linear(4, 3))).train()
    copied = copy_model(model)
    x = torch.randn(2, 4)
    assert torch.equal(copied(x), model(x)) and copied[0].weight_g is not model[0].weight_g


def test_bake_changes_only_the_named_layers_and_never_the_original_class() -> None:
    """parametrize's own removal edits the class it generated, which a deepcopy shares with
    the user's model (whose ``weight`` then vanished); lowbit's leaves that class alone."""
    model = nn.Sequential(parametrizations.weight_norm(nn.Linear(4, 3)),
                          nn.utils.spectral_norm(nn.Linear(3, 3)),
                          parametrizations.spectral_norm(nn.Linear(3, 2))).eval()
    x = torch.randn(5, 4)
    with torch.no_grad():
        before = model(x)
    copied = copy_model(model)
    assert bake_reparametrizations(copied, ["0", "1"]) == ["0", "1"]
    assert [type(m).__name__ for m in copied] == ["Linear", "Linear", "ParametrizedLinear"]
    assert set(dict(copied[0].named_parameters())) == {"weight", "bias"}
    assert not copied[1]._forward_pre_hooks and "weight_orig" not in copied[1]._parameters
    with torch.no_grad():
        assert torch.allclose(copied(x), before, atol=1e-6)
        assert torch.equal(model(x), before)  # the original: still parametrized, same outputs
    assert type(model[0]).__name__ == "ParametrizedLinear" and model[1]._forward_pre_hooks


def test_pruned_layers_copy_and_bake_with_their_zeros() -> None:
    """torch.nn.utils.prune: deepcopy refused the model; baked, the mask's zeros stay."""
    model = nn.Sequential(nn.Linear(6, 4))
    prune.l1_unstructured(model[0], "weight", amount=0.5)
    prune.random_unstructured(model[0], "weight", amount=0.5)  # a PruningContainer
    zeros = model[0].weight_mask == 0
    copied = copy_model(model)
    assert bake_reparametrizations(copied) == ["0"]
    assert "weight" in copied[0]._parameters and not copied[0]._forward_pre_hooks
    assert torch.equal(copied[0].weight, model[0].weight) and (copied[0].weight[zeros] == 0).all()


def test_wrong_arguments_say_what_is_expected() -> None:
    model = nn.Sequential(nn.Linear(2, 2))
    for fn in (copy_model, bake_reparametrizations, weight_mask):
        with pytest.raises(TypeError, match=r"expects a torch\.nn\.Module, got str"):
            fn("model")
    with pytest.raises(ValueError, match=r"no module named \['1'\].*named_modules"):
        bake_reparametrizations(model, ["0", "1"])
    shared = nn.Linear(2, 2)
    twice = nn.ModuleDict({"a": shared, "b": shared})  # a second name is a name too
    assert bake_reparametrizations(twice, ["a", "b"]) == []


def test_shared_copy_unshares_tied_parameters_once() -> None:
    """A tie inside the copy survives unsharing, even over several calls."""
    from lowbit.reparam import SharedCopy

    model = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.Linear(4, 10, bias=False))
    model[2].weight = model[0].weight
    shared = SharedCopy(model)
    copy = shared.model
    assert copy[0].weight is model[0].weight and copy[2].weight is copy[0].weight
    shared.unshare([copy[2]])
    shared.unshare([copy[0], copy[1]])
    assert copy[0].weight is copy[2].weight and copy[0].weight is not model[0].weight
    assert shared.shared_parameters(copy) == []
    with torch.no_grad():
        copy[0].weight.add_(1.0)
    assert not torch.equal(copy[0].weight, model[0].weight)

