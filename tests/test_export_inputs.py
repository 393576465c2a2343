"""lowbit._export_inputs: the arguments and dynamic shapes both exports trace with."""

from __future__ import annotations

import pytest
import torch

from lowbit._export_inputs import export_arguments


def test_size_one_dynamic_axes_are_widened_and_marked() -> None:
    args, kwargs, shapes = export_arguments(torch.randn(1, 4), [0], "t")
    assert kwargs == {} and args[0].shape == (2, 4)
    assert torch.equal(args[0][0], args[0][1])  # the row repeated, not made up
    assert list(shapes[0]) == [0]
    args, _, shapes = export_arguments((torch.randn(3, 4), 7), [0, 5], "t")
    assert args[0].shape == (3, 4) and args[1] == 7  # non-tensors pass through, no spec
    assert list(shapes[0]) == [0] and shapes[1] is None


def test_keyword_inputs_keep_their_names_and_order() -> None:
    ids, mask = torch.ones(1, 5, dtype=torch.long), torch.ones(1, 5)
    args, kwargs, shapes = export_arguments({"mask": mask, "input_ids": ids}, [0, 1], "t")
    assert args == () and list(kwargs) == ["mask", "input_ids"]
    assert kwargs["input_ids"].shape == (2, 5) and kwargs["input_ids"].dtype == torch.long
    assert list(shapes) == ["mask", "input_ids"] and list(shapes["mask"]) == [0, 1]


def test_bad_example_inputs_name_the_caller() -> None:
    with pytest.raises(TypeError, match=r"^mine: example_inputs must be a tensor, a tuple"):
        export_arguments("x", [0], "mine")
