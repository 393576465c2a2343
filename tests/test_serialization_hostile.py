"""Hostile input: files, manifests and layers that must be refused with a message, never
crash the kernels, allocate without bound, or run code."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowbit.ptq import quantize_dynamic, quantize_weight_only


# ------------------------------------------------------------------ conv geometry at quantization
@pytest.mark.parametrize("kwargs, field", [
    ({"padding": -1}, "padding"), ({"padding": 4000}, "padding"), ({"stride": 0}, "stride"),
    ({"dilation": 0}, "dilation"), ({"padding": (1, -2)}, "padding")])
@pytest.mark.parametrize("quantize", [quantize_dynamic,
                                      lambda m: quantize_weight_only(m, bits=4, group_size=9)],
                         ids=["int8", "int4"])
def test_quantization_refuses_bad_conv_geometry(kwargs: dict, field: str, quantize) -> None:
    """The C kernels index memory by these sizes (padding=-1 corrupted the heap): refused."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, **kwargs))
    with pytest.raises(ValueError, match=rf"Conv2d.*: {field}=.* must "):
        quantize(model)


def test_quantization_keeps_legitimate_geometries() -> None:
    model = nn.Sequential(nn.Conv2d(4, 6, 3, padding=2, dilation=1, groups=2),
                          nn.Conv2d(6, 6, 3, padding="same", dilation=3, padding_mode="reflect"),
                          nn.Conv2d(6, 4, 5, stride=2, padding=4))
    x = torch.randn(1, 4, 12, 12)
    q = quantize_dynamic(model)
    assert torch.nn.functional.cosine_similarity(q(x).flatten(), model(x).flatten(), 0) > 0.99
