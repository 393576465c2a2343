"""Backends benchmark: one quantized model on every available lowbit backend, vs FP32.

Models: MLP 784-1024-1024-10 and the MNIST CNN (dynamic INT8, static INT8 for the CNN), a
MiniLM-sized transformer encoder block (hidden 384, 32 tokens, dynamic INT8); batch 1 and 32.
Each cell is FP32 PyTorch time / variant time (higher is better), all measured in one run,
candidates interleaved. Peers: FP32 under ``torch.compile`` and ONNX Runtime's own
``quantize_dynamic`` of the float model (per-tensor QInt8 weights). The last columns give each
ONNX variant's output cosine vs FP32 (lowbit's export vs ORT's own quantization), batch 32.
Both ONNX Runtime sessions are ``OnnxRuntimeModule`` with the same options: 2 intra-op
threads, thread spinning off (a spinning pool would take the cores from whichever candidate
runs next in the interleaved rounds), and the module's default of leaving out ORT's slower
``SkipLayerNormalization`` fusion on the CPU (``lowbit.onnx.CPU_DISABLED_OPTIMIZERS``).

    python benchmarks/bench_backends.py [--quick] [--no-compile]
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import sys
import tempfile
import warnings
from typing import Any

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
from _timing import machine_line, median_times

from lowbit import backends
from lowbit.evaluation import compare_outputs
from lowbit.models import MLP, MnistCNN, TransformerEncoderBlock
from lowbit.onnx_export import OnnxRuntimeModule, export_onnx
from lowbit.ptq import quantize_dynamic, quantize_static

THREADS = 2
BATCHES = (1, 32)


def _ort_options() -> Any:
    """The session options of both ONNX Runtime candidates (an ``onnxruntime.SessionOptions``)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = THREADS, 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return options


def _ort_own(model: nn.Module, example: torch.Tensor, folder: str, stem: str) -> nn.Module:
    """ONNX Runtime's quantize_dynamic of the float model, wrapped like a module."""
    import onnx
    from onnxruntime.quantization import QuantType
    from onnxruntime.quantization import quantize_dynamic as ort_quantize_dynamic

    fp32, int8 = os.path.join(folder, f"{stem}.onnx"), os.path.join(folder, f"{stem}.int8.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), fp32, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, dynamo=False,
                          opset_version=17)
    proto = onnx.load(fp32)
    proto.ir_version = min(proto.ir_version, 9)
    onnx.save(proto, fp32)
    logging.getLogger().setLevel(logging.ERROR)
    ort_quantize_dynamic(fp32, int8, weight_type=QuantType.QInt8)
    return OnnxRuntimeModule(int8, session_options=_ort_options())


def _cases() -> list[tuple[str, nn.Module, nn.Module, dict[int, torch.Tensor]]]:
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    mlp, cnn, block = MLP().eval(), MnistCNN().eval(), TransformerEncoderBlock().eval()
    img = {b: torch.randn(b, 1, 28, 28, generator=g) for b in BATCHES}
    tok = {b: torch.randn(b, 32, 384, generator=g) for b in BATCHES}
    calib = [torch.randn(32, 1, 28, 28, generator=g) for _ in range(4)]
    return [("MLP dynamic", mlp, quantize_dynamic(mlp), img),
            ("MNIST CNN static", cnn, quantize_static(cnn, calib, progress=False), img),
            ("MNIST CNN dynamic", cnn, quantize_dynamic(cnn), img),
            ("Encoder block dynamic", block, quantize_dynamic(block), tok)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    rounds = 5 if args.quick else 30
    print(machine_line())
    print(backends.available().to_markdown(), "\n")
    usable = [s.name for s in backends.available() if s.available and s.name != "reference"]
    if args.no_compile:
        usable = [n for n in usable if n != "torch.compile"]
    header = (["model", "batch", *usable, "FP32 torch.compile", "ORT quantize_dynamic",
               "cosine lowbit ORT / ORT own"])
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    with tempfile.TemporaryDirectory() as folder, torch.inference_mode():
        for label, fp32, qmodel, inputs in _cases():
            runners = {}
            for name in usable:
                if name == "onnxruntime":  # the backend's export, in a session like the peer's
                    runners[name] = OnnxRuntimeModule(
                        export_onnx(qmodel, inputs[32], None, exact="auto"),
                        session_options=_ort_options())
                    continue
                runners[name] = backends.set_backend(copy.deepcopy(qmodel), name, inputs[32])
            peers = {"ORT quantize_dynamic": _ort_own(fp32, inputs[32], folder,
                                                      label.replace(" ", "_"))}
            if not args.no_compile:
                peers["FP32 torch.compile"] = torch.compile(copy.deepcopy(fp32))
            ref = fp32(inputs[32])
            cos = []
            for name in ("onnxruntime", "ORT quantize_dynamic"):
                fn = runners.get(name) or peers.get(name)
                cos.append(f"{compare_outputs(ref, fn(inputs[32])).cosine:.6f}" if fn else "-")
            for b in BATCHES:
                x = inputs[b]
                fns = {"FP32": lambda m=fp32, x=x: m(x)}
                fns.update({n: (lambda m=m, x=x: m(x)) for n, m in {**runners, **peers}.items()})
                t = median_times(fns, rounds)
                cells = [f"{t['FP32'] / t[n]:.2f}x" if n in t else "-"
                         for n in [*usable, "FP32 torch.compile", "ORT quantize_dynamic"]]
                last = " / ".join(cos) if b == 32 else ""
                print(f"| {label} | {b} | " + " | ".join(cells) + f" | {last} |", flush=True)


if __name__ == "__main__":
    main()
