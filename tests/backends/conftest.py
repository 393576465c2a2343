"""Small quantized models for the backend tests: the MNIST CNN (static), an MLP (dynamic), an
INT4 weight-only MLP, and a 2-layer BERT built offline from a config (random init)."""

from __future__ import annotations

import pytest
import torch

import lowbit
from lowbit.models import MLP, MnistCNN


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
