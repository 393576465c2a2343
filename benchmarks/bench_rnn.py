"""Recurrent benchmark: lowbit dynamic INT8 vs torch.ao dynamic vs FP32 on a language model.

Run: ``.venv/bin/python benchmarks/bench_rnn.py`` (about 1-2 minutes on 2 idle cores;
``--quick`` for a smoke run). The model: ``Embedding(2000, 256) -> {LSTM, GRU, RNN}(256, 512,
num_layers=2) -> Linear(512, 2000)``, or a decoder stepping an ``{LSTMCell, GRUCell}(256,
512)`` over the tokens (random init), on random sequences of 64 tokens.
Variants: FP32 eager; torch.ao ``quantize_dynamic`` ({the recurrent type, Linear}: per-tensor
activations, per-tensor qint8 weights; torch.ao has no quantized ``nn.RNN``, so there only the
head is quantized); lowbit ``quantize_dynamic`` (per-channel INT8
weights, per-token INT8 activations). Prints, per variant, the logits' cosine vs FP32 (mean
over sequences), the next-token (top-1) agreement with FP32, the weight size, and the latency
at batch 1 and 32 (2 intra-op threads, timing rounds interleaved). Results also go to
``benchmarks/results/bench_rnn.json`` (gitignored).
"""

from __future__ import annotations

import argparse
import json
import warnings

import torch
import torch.nn.functional as F
from _timing import machine_line, median_times, results_path
from torch import nn

import lowbit
from lowbit.evaluation import format_bytes, model_nbytes

THREADS = 2
RESULTS = results_path("bench_rnn.json")


class RNNLM(nn.Module):
    """Embedding, 2-layer LSTM / GRU / RNN (or one cell stepped over the tokens), next-token
    head."""

    def __init__(self, kind: str, vocab: int = 2000, emb: int = 256, hidden: int = 512) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, emb)
        self.cell = kind.endswith("Cell")
        self.rnn = (getattr(nn, kind)(emb, hidden) if self.cell
                    else getattr(nn, kind)(emb, hidden, num_layers=2, batch_first=True))
        self.head = nn.Linear(hidden, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        if not self.cell:
            return self.head(self.rnn(x)[0])
        state, outs = None, []
        for t in range(x.shape[1]):
            state = self.rnn(x[:, t], state)
            outs.append(state[0] if isinstance(state, tuple) else state)
        return self.head(torch.stack(outs, 1))


def _variants(model: nn.Module, kind: str) -> dict[str, nn.Module]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ao = torch.ao.quantization.quantize_dynamic(model, {getattr(nn, kind), nn.Linear},
                                                    dtype=torch.qint8)
        ours = lowbit.quantize_dynamic(model)
    return {"FP32": model, "torch.ao dynamic": ao, "lowbit INT8 dynamic": ours}


def run(kind: str, seq: int, rounds: int) -> dict[str, dict[str, float]]:
    torch.manual_seed(0)
    model = RNNLM(kind).eval()
    variants = _variants(model, kind)
    gen = torch.Generator().manual_seed(1)
    data = {b: torch.randint(0, 2000, (b, seq), generator=gen) for b in (1, 32)}
    rows: dict[str, dict[str, float]] = {}
    with torch.inference_mode():
        ref = model(data[32])
        for name, m in variants.items():
            y = m(data[32])
            cos = F.cosine_similarity(y.flatten(1).double(), ref.flatten(1).double(), dim=1)
            agree = (y.argmax(-1) == ref.argmax(-1)).float().mean()
            rows[name] = {"cosine": float(cos.mean()), "top1_agreement": float(agree),
                          "bytes": model_nbytes(m)}
        for b, x in data.items():
            times = median_times({n: (lambda m=m, x=x: m(x)) for n, m in variants.items()},
                                 rounds)
            for name, t in times.items():
                rows[name][f"b{b}_ms"] = t * 1e3
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds, shorter sequences")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    seq, rounds = (16, 3) if args.quick else (64, 5)
    print(f"{machine_line()}, {THREADS} threads, torch {torch.__version__}")
    results = {}
    for kind in ("LSTM", "GRU", "RNN", "LSTMCell", "GRUCell"):
        rows = run(kind, seq, rounds)
        results[kind] = rows
        fp32 = rows["FP32"]
        layers = "stepped over the tokens" if kind.endswith("Cell") else "2 layers"
        print(f"\n{kind} LM: Embedding(2000, 256) -> {kind}(256, 512, {layers}) -> "
              f"Linear(512, 2000), {seq} tokens")
        print("| variant | logits cosine vs FP32 | next-token agreement | size | batch 1 | "
              "batch 32 |")
        print("|---|---|---|---|---|---|")
        for name, r in rows.items():
            speed = " ".join(f"| {r[f'b{b}_ms']:.2f} ms ({fp32[f'b{b}_ms'] / r[f'b{b}_ms']:.2f}x)"
                             for b in (1, 32))
            print(f"| {name} | {r['cosine']:.6f} | {r['top1_agreement']:.4f} | "
                  f"{format_bytes(r['bytes'])} {speed} |")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine_line(), "seq": seq, **results}, indent=1))


if __name__ == "__main__":
    main()
