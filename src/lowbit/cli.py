"""The ``lowbit`` command line: ``demo``, ``quantize``, ``inspect``, ``compare``, ``sensitivity``,
``bench``, ``export`` (also ``python -m lowbit``).

Each subcommand is a thin wrapper over the Python API. ``--json`` prints machine-readable
results on stdout; ``--report DIR`` writes ``report.md``, a self-contained ``report.html`` and
PNG plots; ``--quiet`` turns progress bars off. A user mistake prints one line
``lowbit: error: ...`` on stderr and exits with 2 (bad usage) or 1 (failure); ``--debug`` shows
the traceback instead. This module and ``lowbit.demo`` are the only places that print.

MODEL arguments: a float state dict (``.pt``/``.pth`` read with ``torch.load(weights_only=True)``,
or ``.safetensors``) together with ``--arch package.module:factory``; a ``torch.export`` program
(``.pt2``, whose ``aten.linear`` / ``aten.conv2d`` calls are lifted back into ``nn.Linear`` /
``nn.Conv2d`` modules so they can be swapped); a TorchScript file with ``--arch`` (its weights
are loaded into the Python class); or a model saved by ``lowbit.save`` (a folder or
``.safetensors``). DATA arguments: ``mnist`` (the bundled real MNIST split), or a ``.pt`` /
``.npy`` / ``.npz`` / ``.safetensors`` file holding a tensor of inputs, or inputs and labels
(keys ``inputs``/``x`` and ``labels``/``y``; a ``(inputs, labels)`` tuple in ``.pt``).

Trust: state dicts and DATA files are read without pickle (``weights_only=True``, safetensors,
``allow_pickle=False``); ``--arch`` imports the code you name. TorchScript and ``.pt2`` files
are programs that can run any code while they load (``torch.export.load`` unpickles weights
stored with pickle; TorchScript runs its own code): they are refused unless ``--trust-pickle``
says that you trust where they come from.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import warnings
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = ["UsageError", "build_parser", "main"]

EXIT_FAILURE, EXIT_USAGE = 1, 2


class UsageError(Exception):
    """Bad command-line usage: exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _say(text: str = "") -> None:
    print(text, flush=True)


def _json_out(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str), flush=True)


# ---------------------------------------------------------------------------------- data
@dataclass
class Data:
    """Inputs (and labels when known) read from a DATA argument."""

    inputs: torch.Tensor
    labels: torch.Tensor | None
    description: str

    def batches(self, batch_size: int, limit: int | None = None) -> list[torch.Tensor]:
        """Input batches of ``batch_size``, over the first ``limit`` samples."""
        x = self.inputs if limit is None else self.inputs[:limit]
        return list(x.split(batch_size))

    def dataset(self) -> TensorDataset | None:
        """``(input, label)`` pairs, or None without labels."""
        return None if self.labels is None else TensorDataset(self.inputs, self.labels)


def _pick(items: dict[str, Any], where: str) -> tuple[Any, Any]:
    keys = {k.lower(): k for k in items}
    x = next((items[keys[k]] for k in ("inputs", "x", "input", "images", "data") if k in keys),
             None)
    y = next((items[keys[k]] for k in ("labels", "y", "targets", "target") if k in keys), None)
    if x is None:
        if len(items) != 1:
            raise ValueError(f"{where}: cannot tell inputs from {sorted(items)}; name them "
                             "'inputs' (and 'labels')")
        x = next(iter(items.values()))
    return x, y


def load_data(spec: str, split: str = "eval", limit: int | None = None) -> Data:
    """Read a DATA argument (``mnist`` or a tensor file); ``split`` picks MNIST's part.

    Raises:
        FileNotFoundError: no such file. ValueError: unknown format or contents.
    """
    if spec == "mnist":
        from lowbit.data import mnist_splits

        splits = mnist_splits()
        ds = splits.train if split == "calib" else splits.eval
        x, y = ds.tensors
        what = "training part" if split == "calib" else "evaluation part"
        data = Data(x, y, f"bundled MNIST, {what}")
    else:
        path = Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"DATA {spec!r} does not exist (use 'mnist' for the bundled "
                                    "set, or a .pt/.npy/.npz/.safetensors file)")
        suffix = path.suffix.lower()
        if suffix not in (".pt", ".pth", ".npy", ".npz", ".safetensors"):
            raise ValueError(f"DATA {spec!r}: unknown format {suffix!r}; use .pt, .npy, .npz or "
                             ".safetensors (or 'mnist')")
        try:
            x, y = _read_data_file(path, suffix, spec)
            x, y = torch.as_tensor(x), None if y is None else torch.as_tensor(y)
        except Exception as e:  # the readers' own errors (empty, truncated, nested, huge)
            if isinstance(e, ValueError) and str(e).startswith(f"DATA {spec!r}"):
                raise  # (already names the file)
            cause = _first_line(e) if isinstance(e, ValueError) else (
                f"{type(e).__name__}: {_first_line(e)}")
            raise ValueError(f"DATA {spec!r}: cannot read it as a {suffix} file ({cause}); it "
                             "must hold an inputs tensor (and labels), see lowbit --help") from e
        if y is not None and (y.dim() == 0 or len(y) != len(x)):
            raise ValueError(f"DATA {spec!r} holds {len(x)} inputs but "
                             f"{y.numel() if y.dim() == 0 else len(y)} labels; "
                             "give one label per input")
        if x.dtype == torch.float64:
            x = x.float()
        data = Data(x, y, f"{path.name} ({len(x)} samples)")
    if limit is not None:
        data = Data(data.inputs[:limit], None if data.labels is None else data.labels[:limit],
                    data.description + f", first {min(limit, len(data.inputs))}")
    if len(data.inputs) == 0:
        raise ValueError(f"DATA {spec!r} holds no sample")
    return data


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def _torch_load(path: Path, what: str) -> Any:
    """``torch.load(weights_only=True)``; its refusal as a ValueError naming ``what`` and the
    cause (torch's own text advises ``weights_only=False``, which must not be followed for
    files of unknown origin)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        text = str(e)
        found = re.search(r"WeightsUnpickler error:\s*(.+?)(\n\n|$)", text, re.S)
        if found:
            cause = found.group(1).strip()
        else:  # torch 2.6+: the advice, then the cause in a paragraph of its own
            paragraphs = [p.strip() for p in text.split("\n\n") if p.strip()]
            causes = [p for p in paragraphs if not p.startswith(("Weights only load failed",
                                                                   "Check the documentation"))]
            cause = (causes[0] if causes else _first_line(e)) or type(e).__name__
        raise ValueError(f"{what}: torch.load(weights_only=True) refused it "
                         f"({cause.splitlines()[0][:300]})") from e


def _read_data_file(path: Path, suffix: str, spec: str) -> tuple[Any, Any]:
    """``(inputs, labels or None)`` of a DATA tensor file."""
    if suffix in (".pt", ".pth"):
        obj = _torch_load(path, f"DATA {spec!r}")
        if isinstance(obj, (tuple, list)) and len(obj) == 2:
            obj = {"inputs": obj[0], "labels": obj[1]}
        return _pick(obj if isinstance(obj, dict) else {"inputs": obj}, spec)
    if suffix in (".npy", ".npz"):
        import numpy as np

        if suffix == ".npy":
            _check_npy_size(path, spec)
        arr = np.load(path, allow_pickle=False)
        return _pick(dict(arr) if suffix == ".npz" else {"inputs": arr}, spec)
    import safetensors.torch

    return _pick(safetensors.torch.load_file(path), spec)


def _check_npy_size(path: Path, spec: str) -> None:
    """A ``.npy`` header's shape against the file's size, before numpy allocates it."""
    import numpy as np

    fmt = np.lib.format
    with path.open("rb") as f:
        try:
            version = fmt.read_magic(f)
            read = fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0
            shape, _, dtype = read(f)
        except ValueError:
            return  # (a header np.load reads its own way, or refuses with its own message)
        if dtype.hasobject:
            return  # (pickled objects: np.load refuses them, allow_pickle=False)
        needed = math.prod(shape) * dtype.itemsize
        held = path.stat().st_size - f.tell()
    if held < needed:
        raise ValueError(f"DATA {spec!r}: its header says shape {shape} {dtype} ({needed} "
                         f"bytes) but the file holds {held}; it is truncated or corrupted")


# ---------------------------------------------------------------------------------- models
def _factory(ref: str, kwargs: dict[str, Any]) -> Callable[[], nn.Module]:
    import importlib

    mod_name, sep, attr = ref.partition(":")
    if not sep or not mod_name or not attr:
        raise UsageError(f"--arch {ref!r} must look like 'package.module:factory'")
    try:
        obj: Any = importlib.import_module(mod_name)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"--arch {ref!r}: cannot import it ({e})") from e

    def build() -> nn.Module:
        model = obj(**kwargs)
        if not isinstance(model, nn.Module):
            raise ValueError(f"--arch {ref!r} returned {type(model).__name__}, not an nn.Module")
        return model.eval()
    return build


def _lift_exported(path: Path) -> nn.Module:
    """A ``torch.export`` program as a GraphModule whose linear/conv2d calls are modules."""
    import copy

    unlifted = torch.export.load(path).module()  # its class refuses .eval(): rebuild it
    gm = torch.fx.GraphModule(unlifted, copy.deepcopy(unlifted.graph))
    aten = torch.ops.aten
    kinds = {aten.linear.default: "linear", aten.conv2d.default: "conv2d"}
    for node in list(gm.graph.nodes):
        kind = kinds.get(node.target) if node.op == "call_function" else None
        if kind is None or len(node.args) < 2 or node.kwargs:
            continue
        w_node = node.args[1]
        b_node = node.args[2] if len(node.args) > 2 else None
        if getattr(w_node, "op", None) != "get_attr" or len(w_node.users) != 1:
            continue
        if b_node is not None and (getattr(b_node, "op", None) != "get_attr"
                                   or len(b_node.users) != 1):
            continue
        owner, _, leaf = w_node.target.rpartition(".")
        if not owner or leaf != "weight" or any(True for _ in gm.get_submodule(owner).children()):
            continue
        weight = gm.get_parameter(w_node.target)
        bias = None if b_node is None else gm.get_parameter(b_node.target)
        if kind == "linear":
            layer: nn.Module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        else:
            stride, padding, dilation, groups = (list(node.args[3:7]) + [None] * 4)[:4]
            layer = nn.Conv2d(weight.shape[1] * (groups or 1), weight.shape[0],
                              tuple(weight.shape[2:]), stride=stride or 1,
                              padding=padding or 0, dilation=dilation or 1, groups=groups or 1,
                              bias=bias is not None)
        layer.weight = weight
        if bias is not None:
            layer.bias = bias
        gm.set_submodule(owner, layer)
        with gm.graph.inserting_before(node):
            call = gm.graph.call_module(owner, (node.args[0],))
        node.replace_all_uses_with(call)
        gm.graph.erase_node(node)
        for n in (w_node, b_node):
            if n is not None and not n.users:
                gm.graph.erase_node(n)
    gm.graph.lint()
    gm.recompile()
    return gm.eval()


def _is_lowbit(path: Path) -> bool:
    if path.is_dir():
        return (path / "model.safetensors").is_file()
    if path.suffix != ".safetensors":
        return False
    import safetensors

    try:
        with safetensors.safe_open(str(path), "pt") as f:
            return "lowbit" in (f.metadata() or {})
    except Exception:  # unreadable: let lowbit.load explain what is wrong with it
        return True


TRUST_FLAG = "--trust-pickle"


def _require_trust(spec: str, what: str, trusted: bool) -> None:
    """Refuse a MODEL file whose loading can run code, unless the user said it is trusted."""
    if not trusted:
        raise UsageError(
            f"MODEL {spec!r} is {what}: loading it can run any code it holds (pickle). Pass "
            f"{TRUST_FLAG} only if you trust where it comes from; otherwise pass its state dict "
            "(.safetensors, or .pt read with weights_only=True) with --arch")


def load_float(spec: str, arch: str | None, arch_kwargs: dict[str, Any], *,
               trust_pickle: bool = False) -> nn.Module:
    """Read a float MODEL argument (see the module docstring).

    Args:
        spec: the MODEL argument.
        arch, arch_kwargs: ``--arch`` and ``--arch-kwargs``.
        trust_pickle: ``--trust-pickle``: allow ``.pt2`` and TorchScript files, whose loading
            runs code from the file.

    Raises:
        UsageError: ``--arch`` is needed but missing, or a ``.pt2`` / TorchScript file without
            ``trust_pickle``. FileNotFoundError, ValueError: otherwise.

    Example:
        >>> import tempfile
        >>> with tempfile.NamedTemporaryFile(suffix=".pt2") as f:
        ...     load_float(f.name, None, {})
        Traceback (most recent call last):
        ...
        lowbit.cli.UsageError: MODEL '...pt2' is a torch.export program (.pt2): loading it can ...
    """
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"MODEL {spec!r} does not exist")
    if _is_lowbit(path):
        raise ValueError(f"MODEL {spec!r} is already quantized by lowbit; pass the float model")
    if path.suffix == ".pt2":
        _require_trust(spec, "a torch.export program (.pt2)", trust_pickle)
        return _lift_exported(path)
    if path.suffix in (".pt", ".pth") and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            scripted = any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())
        if scripted:
            _require_trust(spec, "TorchScript", trust_pickle)
            if arch is None:
                raise UsageError(f"MODEL {spec!r} is TorchScript, whose modules cannot be "
                                 "swapped; pass --arch package.module:factory to load its "
                                 "weights into your Python class, or save a torch.export "
                                 "program (.pt2)")
            state: Any = torch.jit.load(str(path), map_location="cpu").state_dict()
            model = _factory(arch, arch_kwargs)()
            model.load_state_dict(state)
            return model
    if arch is None:
        raise UsageError(f"MODEL {spec!r} is a state dict: pass --arch package.module:factory "
                         "(e.g. lowbit.models:MnistCNN) to build the model it belongs to")
    if path.suffix == ".safetensors":
        import safetensors.torch

        state = safetensors.torch.load_file(path)
    else:
        try:
            state = _torch_load(path, f"MODEL {spec!r}")
        except ValueError as e:
            raise ValueError(f"{e}: it must be a state dict saved with "
                             "torch.save(model.state_dict(), path), not a pickled model nor "
                             "another file") from e
    if not isinstance(state, dict):
        raise ValueError(f"MODEL {spec!r} holds a {type(state).__name__}, not a state dict")
    model = _factory(arch, arch_kwargs)()
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"MODEL {spec!r} does not fit --arch {arch}: "
                         f"{' '.join(str(e).split())[:300]}") from e
    return model


def load_any(spec: str, args: argparse.Namespace, float_spec: str | None = None) -> nn.Module:
    """A float or lowbit-quantized MODEL; quantized ones are rebuilt into a float skeleton
    from ``--arch``, from ``float_spec`` (``compare``), or from the recorded factory
    (``--trust-factory``)."""
    from lowbit.serialization import load

    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"MODEL {spec!r} does not exist")
    trusted = getattr(args, "trust_pickle", False)
    if not _is_lowbit(path):
        return load_float(spec, args.arch, args.arch_kwargs, trust_pickle=trusted)
    if float_spec is not None and Path(float_spec).suffix == ".pt2":
        _require_trust(float_spec, "a torch.export program (.pt2)", trusted)
        return load(path, model=_lift_exported(Path(float_spec)))
    if args.arch is not None:
        return load(path, model=_factory(args.arch, args.arch_kwargs)())
    if getattr(args, "trust_factory", False):
        return load(path, trust_factory=True)
    raise UsageError(f"{spec!r} is a lowbit file: pass --arch package.module:factory for its "
                     "float skeleton, or --trust-factory to use the factory recorded in it")


# ---------------------------------------------------------------------------------- commands
def _config(args: argparse.Namespace) -> Any:
    from lowbit.config import QuantizationConfig, QuantSpec

    skip = tuple(args.skip or ())
    gran = args.granularity
    method, bits, alpha = args.weight_method, args.activation_bits, args.smooth_quant
    if method != "rtn" and args.method != "int4":
        raise UsageError(f"--weight-method {method} calibrates INT4 weights: use it with "
                         "--method int4")
    if bits != 8 and args.method != "dynamic":
        raise UsageError("--activation-bits 7 applies to --method dynamic")
    if args.calibrator is not None and args.method != "static":
        raise UsageError(f"--calibrator chooses static activation ranges: use it with --method "
                         f"static (--method {args.method} has none to calibrate)")
    if args.method == "int4" and gran is not None and args.group_size is not None:
        raise UsageError(f"--group-size applies to group-wise INT4; --{gran.replace('_', '-')} "
                         "has no groups: pass one of them")
    if alpha is not None and args.method == "int4":
        raise UsageError("--smooth-quant applies to INT8 activations (--method dynamic or "
                         "static); for INT4 weights use --weight-method awq")
    if args.method == "int4":
        if gran is None:
            return QuantizationConfig.int4_weight_only(args.group_size or 128, method=method,
                                                       skip_layers=skip)
        spec = QuantSpec(bits=4, symmetric=False, granularity=gran)
        return QuantizationConfig(weights=spec, activations=None, mode="weight_only",
                                  skip_layers=skip, method=method)
    weights = QuantSpec.int8_weight() if gran in (None, "per_channel") else QuantSpec()
    try:
        if args.method == "static":
            return QuantizationConfig(weights=weights,
                                      activations=QuantSpec.int8_static_activation(),
                                      mode="static", calibrator=args.calibrator or "minmax",
                                      skip_layers=skip, smooth_quant=alpha)
        act = QuantSpec.int8_dynamic_activation()
        return QuantizationConfig(weights=weights,
                                  activations=act if bits == 8 else act.with_(bits=bits),
                                  mode="dynamic", skip_layers=skip, smooth_quant=alpha)
    except ValueError as exc:  # e.g. an alpha outside [0, 1]
        raise UsageError(f"--smooth-quant: {exc}") from exc


def _calibration(args: argparse.Namespace) -> list[torch.Tensor] | None:
    """Calibration batches where the options need them (static activations, SmoothQuant,
    GPTQ / AWQ / SignRound weights), else None."""
    needs = [flag for flag, on in (
        ("--method static", args.method == "static"),
        ("--smooth-quant", args.smooth_quant is not None),
        (f"--weight-method {args.weight_method}", args.weight_method != "rtn")) if on]
    if not needs:
        return None
    if not args.calib:
        raise UsageError(f"{' and '.join(needs)} needs --calib DATA (e.g. --calib mnist)")
    return load_data(args.calib, "calib").batches(args.batch_size, args.calib_samples)


def cmd_quantize(args: argparse.Namespace) -> int:
    """``lowbit quantize``: quantize a float MODEL and save it with ``lowbit.save``."""
    from lowbit.evaluation import format_bytes, model_nbytes
    from lowbit.ptq import PTQQuantizer
    from lowbit.serialization import save

    config = _config(args)
    model = load_float(args.model, args.arch, args.arch_kwargs,
                       trust_pickle=args.trust_pickle)
    calib = _calibration(args)
    qmodel = PTQQuantizer(config, progress=not args.quiet).quantize(model, calib)
    path = save(qmodel, args.out, factory=args.arch, factory_kwargs=args.arch_kwargs)
    size, fsize = path.stat().st_size, model_nbytes(model)
    if args.json:
        _json_out({"out": str(path), "file_bytes": size, "float_bytes": fsize,
                   "method": args.method, "config": config.to_dict(),
                   "report": qmodel.lowbit_report.to_dict()})
    else:
        _say(qmodel.lowbit_report.to_markdown())
        _say(f"\nSaved {path} ({format_bytes(size)}; float weights {format_bytes(fsize)}, "
             f"{fsize / size:.2f}x smaller)")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    """``lowbit inspect``: the per-layer table of a saved model."""
    from lowbit.evaluation import format_bytes, markdown_table
    from lowbit.serialization import describe

    info = describe(args.path)
    if args.json:
        _json_out(info)
        return 0
    arch = info["architecture"] or {}
    _say(f"{info['path']}: lowbit format {info['format_version']} (lowbit "
         f"{info['lowbit_version']}, torch {info['torch_version']}), "
         f"{format_bytes(info['file_bytes'])}, model {arch.get('class')}"
         + (f", factory {arch['factory']}" if arch.get("factory") else ""))
    _say(markdown_table(
        ["layer", "class", "scheme", "bits", "shape", "scale range", "bytes"],
        [[r["name"], r["cls"], r["scheme"], str(r["bits"]), "x".join(map(str, r["shape"])),
          f"{r['scale_min']:.3g} .. {r['scale_max']:.3g}", format_bytes(r["nbytes"])]
         for r in info["layers"]]))
    _say(f"\nfloat tensors: {format_bytes(info['float_bytes'])}; replaced by Identity: "
         f"{', '.join(info['replacements']) or 'none'}")
    for name, cfg in info["adapters"].items():
        _say(f"LoRA adapter on {name or '<root>'}: r={cfg['r']}, alpha={cfg['alpha']:g}, "
             f"dropout={cfg['dropout']:g}")
    return 0


def _latency_inputs(data: Data, sizes: list[int]) -> dict[str, torch.Tensor]:
    return {f"b{b}": data.inputs[:b] for b in sizes if b <= len(data.inputs)} or {
        f"b{len(data.inputs)}": data.inputs}


def _write_report(args: argparse.Namespace, **sections: Any) -> None:
    if args.report:
        from lowbit.report import report

        page = report(args.report, **sections)
        if not args.json:
            _say(f"\nReport: {page}")


def _labels(specs: list[str], taken: tuple[str, ...] = ()) -> list[str]:
    """A table label per model argument: its file name, or the whole argument where two
    arguments share a name (``run1/q``, ``run2/q``) or a name is taken (the ``FP32`` row)."""
    names = [Path(s).name.removesuffix(".safetensors") for s in specs]
    out = [n if names.count(n) == 1 and n not in taken else s for n, s in zip(names, specs,
                                                                                strict=True)]
    return [f"{label} (#{i + 1})" if out.count(label) > 1 or label in taken else label
            for i, label in enumerate(out)]


def cmd_compare(args: argparse.Namespace) -> int:
    """``lowbit compare``: accuracy, size, latency and output error vs the float model."""
    from lowbit._qmodule import QuantizedModuleBase
    from lowbit.evaluation import compare_models
    from lowbit.report import collect_histograms

    data = load_data(args.data, "eval", args.samples)
    fp32 = load_any(args.float_model, args)
    models = {"FP32": fp32}
    for label, spec in zip(_labels(args.quantized, taken=("FP32",)), args.quantized,
                           strict=True):
        models[label] = load_any(spec, args, args.float_model)
    table = compare_models(models, data.dataset(), _latency_inputs(data, args.batch_sizes),
                           iters=args.iters, rounds=3, warmup=3)
    if args.json:
        _json_out({"data": data.description, "rows": table.to_dict()})
    else:
        _say(f"Data: {data.description}\n")
        _say(table.to_markdown())
    if args.report:
        qmodel = list(models.values())[1]
        layers = [n for n, m in qmodel.named_modules()
                  if isinstance(m, QuantizedModuleBase) and n][:3]  # (a .pt2 root has .meta)
        hists = collect_histograms(fp32, qmodel, data.inputs[:args.batch_size], layers)
        _write_report(args, comparison=table, quantized_model=qmodel, histograms=hists,
                      notes=f"Data: {data.description}.")
    return 0


def cmd_sensitivity(args: argparse.Namespace) -> int:
    """``lowbit sensitivity``: per-layer sensitivity; with ``--budget``, automatic fallback."""
    from lowbit.evaluation import evaluate_accuracy
    from lowbit.report import collect_histograms
    from lowbit.sensitivity import analyze_sensitivity, auto_fallback

    if args.out and args.budget is None:  # (checked before the analysis, not after it)
        raise UsageError("--out saves the fallback model that --budget finds: pass --budget")
    if args.budget is not None and not args.budget >= 0:
        raise UsageError(f"--budget {args.budget} must be an accuracy drop >= 0 (points)")
    config = _config(args)
    model = load_float(args.model, args.arch, args.arch_kwargs,
                       trust_pickle=args.trust_pickle)
    data = load_data(args.data, "eval", args.samples)
    if args.budget is not None and data.labels is None:
        raise UsageError("--budget needs labelled DATA (accuracy); this DATA has no labels")
    calib = _calibration(args)
    eval_fn = None
    if data.labels is not None:
        ds = data.dataset()
        eval_fn = lambda m: evaluate_accuracy(m, ds)  # noqa: E731
    rep = analyze_sensitivity(model, config, eval_fn, calib, progress=not args.quiet,
                              example_input=data.inputs[:args.batch_size],
                              metric_name="accuracy" if eval_fn else "metric")
    result: dict[str, Any] = {"data": data.description, "sensitivity": rep.to_dict()}
    qmodel = None
    if args.budget is not None:
        if eval_fn is None:
            raise UsageError("--budget needs labelled DATA (accuracy); this DATA has no labels")
        qmodel, _ = auto_fallback(model, config, eval_fn, calib, args.budget,
                                         sensitivity=rep, progress=not args.quiet)
        result["fallback"] = qmodel.lowbit_fallback
        if args.out:
            from lowbit.serialization import save

            result["out"] = str(save(qmodel, args.out, factory=args.arch,
                                     factory_kwargs=args.arch_kwargs))
    if args.json:
        _json_out(result)
    else:
        _say(f"Data: {data.description}\n")
        _say(rep.to_markdown())
        if "fallback" in result:
            fb = result["fallback"]
            _say(f"\nFP32 fallback for a drop <= {fb['budget']}: {fb['layers'] or 'none'} "
                 f"(drop {fb['drop']:+.4f})" + (f"; saved {result['out']}" if "out" in result
                                                 else ""))
    if args.report:
        from lowbit.ptq import PTQQuantizer

        shown = qmodel or PTQQuantizer(config, progress=False).quantize(model, calib)
        top = [n for n in rep.most_sensitive(args.top)
               if hasattr(shown.get_submodule(n), "meta")]
        hists = collect_histograms(model, shown, data.inputs[:args.batch_size], top)
        _write_report(args, quantized_model=shown, sensitivity=rep, histograms=hists,
                      notes=f"Data: {data.description}.")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    """``lowbit bench``: interleaved latency of models at several batch sizes."""
    from tqdm.auto import tqdm

    from lowbit.evaluation import LatencyStats, format_bytes, measure_latency, model_nbytes
    from lowbit.native import native_status

    if args.data:
        inputs = _latency_inputs(load_data(args.data, "eval"), args.batch_sizes)
    elif args.input_shape:
        shape = args.input_shape
        inputs = {f"b{b}": torch.randn(b, *shape[1:]) for b in args.batch_sizes}
    else:
        raise UsageError("pass --data DATA or --input-shape 1,C,H,W for the benchmark inputs")
    models = {label: load_any(s, args, args.models[0])
              for label, s in zip(_labels(args.models), args.models, strict=True)}
    samples: dict[tuple[str, str], list[float]] = {(m, k): [] for m in models for k in inputs}
    per_round = max(1, args.iters // args.rounds)
    steps = [(r, m, k) for r in range(args.rounds) for m in models for k in inputs]
    with torch.inference_mode():
        for m in models:
            for x in inputs.values():
                measure_latency(models[m], x, warmup=3, iters=1)
        for _, m, k in tqdm(steps, desc="benchmarking", disable=args.quiet, leave=False):
            stats = measure_latency(models[m], inputs[k], warmup=0, iters=per_round)
            samples[(m, k)].extend(stats.samples_ms)
    threads = torch.get_num_threads()
    base = next(iter(models))
    rows = []
    for m, model in models.items():
        lat = {k: LatencyStats.from_samples(samples[(m, k)], threads) for k in inputs}
        nbytes = model_nbytes(model)
        rows.append({"name": m, "accuracy": None, "accuracy_drop": None, "nbytes": nbytes,
                     "compression": model_nbytes(models[base]) / max(1, nbytes),
                     "latency": {k: {f: getattr(s, f) for f in ("median_ms", "p90_ms", "min_ms",
                                                                "iters", "threads")}
                                 for k, s in lat.items()},
                     "speedup": {k: (LatencyStats.from_samples(samples[(base, k)], threads)
                                     .median_ms / lat[k].median_ms) for k in inputs}})
    native = native_status()
    if args.json:
        _json_out({"threads": threads, "native": native, "rows": rows})
    else:
        _say(f"Median latency per call, {threads} thread(s), {args.rounds} interleaved rounds "
             f"(compare ratios: shared machines are noisy); fused C kernels: {native['reason']}; "
             f"INT8/INT4 ISA path: {native['isa']}"
             "\n")
        _say("| model | size | " + " | ".join(f"{k} | speedup {k}" for k in inputs) + " |")
        _say("|---|---|" + "---|---|" * len(inputs))
        for r in rows:
            cells = [f"{r['latency'][k]['median_ms']:.3f} ms | {r['speedup'][k]:.2f}x"
                     for k in inputs]
            _say(f"| {r['name']} | {format_bytes(r['nbytes'])} | " + " | ".join(cells) + " |")
    _write_report(args, comparison=rows, notes=f"Latency on {threads} thread(s).")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """``lowbit demo``: the README's main job (see ``lowbit.demo``); other arguments go to it."""
    from lowbit.demo import main as demo_main

    extra = list(args.demo_args)
    if args.quiet and "--quiet" not in extra:
        extra.append("--quiet")
    return demo_main(extra)


def _demo_argv(argv: list[str]) -> list[str] | None:
    """Arguments after ``demo`` (argparse cannot pass options through a sub-parser)."""
    head = 0
    while head < len(argv) and argv[head] in ("--quiet", "--debug", "--json"):
        head += 1
    if head < len(argv) and argv[head] == "demo":
        return argv[head + 1:] + (["--quiet"] if "--quiet" in argv[:head] else [])
    return None


def cmd_export(args: argparse.Namespace) -> int:
    """``lowbit export``: a float or lowbit model to ONNX (``lowbit.export_onnx``), then run in
    ONNX Runtime next to PyTorch on the same inputs (max abs difference reported)."""
    from collections import Counter

    from lowbit.onnx_export import OnnxRuntimeModule, export_onnx

    if args.data:
        x = load_data(args.data, "eval", limit=64).inputs
    elif args.input_shape:
        x = torch.randn(*args.input_shape)
    else:
        raise UsageError("pass --data DATA or --input-shape B,C,H,W for the example input")
    model = load_any(args.model, args).eval()
    proto = export_onnx(model, x[:2], args.out, opset=args.opset)
    with torch.inference_mode():
        err = float((model(x) - OnnxRuntimeModule(args.out)(x)).abs().max())
    ops = Counter(n.op_type for n in proto.graph.node)
    keys = ("QuantizeLinear", "DequantizeLinear", "MatMulInteger", "ConvInteger", "MatMulNBits")
    info = {"path": str(args.out), "bytes": Path(args.out).stat().st_size, "opset": args.opset,
            "nodes": sum(ops.values()), "integer_ops": {k: ops[k] for k in keys if ops[k]},
            "max_abs_diff_vs_pytorch": err, "checked_inputs": int(x.shape[0])}
    if args.json:
        _json_out(info)
    else:
        _say(f"Wrote {info['path']} ({info['bytes']} bytes, opset {args.opset}, "
             f"{info['nodes']} nodes; {info['integer_ops']}); ONNX Runtime vs PyTorch on "
             f"{info['checked_inputs']} inputs: max abs difference {err:.3g}")
    return 0


# ---------------------------------------------------------------------------------- parser
def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}"
                                         ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _json_dict(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg}): {text!r}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object like '{\"hidden\": 64}'")
    return value


def _positive(text: str) -> int:
    value = _ints(text)
    if len(value) != 1:
        raise argparse.ArgumentTypeError(f"expected one positive integer, got {text!r}")
    return value[0]


def build_parser() -> argparse.ArgumentParser:
    """The ``lowbit`` argument parser (subcommands and their options).

    Example:
        >>> args = build_parser().parse_args(["inspect", "model_dir", "--json"])
        >>> args.command, args.path, args.json
        ('inspect', 'model_dir', True)
    """
    from lowbit.calibrators import available_calibrators

    def common(suppress: bool) -> argparse.ArgumentParser:
        p = argparse.ArgumentParser(add_help=False)
        d = {"default": argparse.SUPPRESS} if suppress else {}
        p.add_argument("--quiet", action="store_true", help="no progress bars", **d)
        p.add_argument("--debug", action="store_true", help="show tracebacks", **d)
        p.add_argument("--json", action="store_true", help="machine-readable output", **d)
        return p

    def model_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--arch", metavar="PKG.MODULE:FACTORY",
                       help="builds the float model a state dict belongs to")
        p.add_argument("--arch-kwargs", type=_json_dict, default={}, metavar="JSON",
                       help="keyword arguments of the factory, as a JSON object")
        p.add_argument(TRUST_FLAG, action="store_true",
                       help="allow .pt2 (torch.export) and TorchScript MODEL files: loading "
                            "them can run code they hold (pickle); only for trusted files")

    def quant_args(p: argparse.ArgumentParser, method_required: bool = True) -> None:
        p.add_argument("--method", choices=("dynamic", "static", "int4"),
                       required=method_required, default="dynamic",
                       help="INT8 dynamic, INT8 static (calibrated) or INT4 weight-only")
        p.add_argument("--calib", metavar="DATA",
                       help="calibration data (--method static, --smooth-quant, "
                            "--weight-method other than rtn)")
        p.add_argument("--activation-bits", type=int, choices=(8, 7), default=8,
                       help="--method dynamic: 7 is the cheaper exact form on CPUs without "
                            "VNNI (AVX2; pair it with --smooth-quant on transformers)")
        p.add_argument("--smooth-quant", type=float, metavar="ALPHA",
                       help="SmoothQuant before INT8 (dynamic / static), e.g. 0.5")
        p.add_argument("--weight-method", choices=("rtn", "gptq", "awq", "signround"),
                       default="rtn", help="--method int4: how the weights are rounded "
                                           "(default rtn; the others need --calib)")
        p.add_argument("--calibrator", choices=available_calibrators(),
                       help="static activation calibrator (default minmax)")
        p.add_argument("--skip", nargs="+", metavar="LAYER", help="layer names/globs kept FP32")
        g = p.add_mutually_exclusive_group()
        g.add_argument("--per-channel", dest="granularity", action="store_const",
                       const="per_channel", help="one weight scale per output channel")
        g.add_argument("--per-tensor", dest="granularity", action="store_const",
                       const="per_tensor", help="one weight scale per tensor")
        p.add_argument("--group-size", type=_positive,
                       help="INT4 group size (default 128; not with --per-channel / "
                            "--per-tensor)")
        p.add_argument("--calib-samples", type=_positive, default=512,
                       help="calibration samples (default 512)")
        p.add_argument("--batch-size", type=_positive, default=64)

    parser = _Parser(prog="lowbit", parents=[common(False)],
                     description="Quantize PyTorch models to INT8/INT4 and check the result.")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    subs.required = True
    parent = [common(True)]

    p = subs.add_parser("demo", parents=parent, help="train, quantize and compare on MNIST",
                        description="Runs lowbit.demo; other arguments go to it "
                                    "(see 'lowbit demo --help').", add_help=False)
    p.add_argument("demo_args", nargs=argparse.REMAINDER)
    p.set_defaults(run=cmd_demo)

    p = subs.add_parser("quantize", parents=parent, help="quantize a float model and save it")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="folder, or a file name ending in .safetensors")
    model_args(p)
    quant_args(p)
    p.set_defaults(run=cmd_quantize)

    p = subs.add_parser("inspect", parents=parent, help="per-layer table of a saved model")
    p.add_argument("path", metavar="PATH")
    p.set_defaults(run=cmd_inspect)

    p = subs.add_parser("compare", parents=parent, help="accuracy/size/latency vs float")
    p.add_argument("float_model", metavar="FLOAT")
    p.add_argument("quantized", metavar="QUANT", nargs="+")
    p.add_argument("--data", required=True, metavar="DATA")
    p.add_argument("--trust-factory", action="store_true",
                   help="build skeletons with the factory recorded in the files")
    p.add_argument("--samples", type=_positive, help="evaluate on the first N samples")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 64], metavar="1,64")
    p.add_argument("--batch-size", type=_positive, default=64)
    p.add_argument("--iters", type=_positive, default=30)
    p.add_argument("--report", metavar="DIR", help="write report.md/report.html + PNGs")
    model_args(p)
    p.set_defaults(run=cmd_compare)

    p = subs.add_parser("sensitivity", parents=parent, help="per-layer sensitivity")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--data", required=True, metavar="DATA",
                   help="evaluation data (accuracy with labels, else output error)")
    p.add_argument("--samples", type=_positive, help="evaluate on the first N samples")
    p.add_argument("--top", type=_positive, default=3, help="layers with histograms")
    p.add_argument("--budget", type=float, help="keep layers FP32 until the drop is <= this")
    p.add_argument("--out", metavar="PATH", help="with --budget: save the fallback model")
    p.add_argument("--report", metavar="DIR", help="write report.md/report.html + PNGs")
    model_args(p)
    quant_args(p)
    p.set_defaults(run=cmd_sensitivity)

    p = subs.add_parser("export", parents=parent, help="export a model to ONNX (ORT-checked)")
    p.add_argument("model", metavar="MODEL")
    p.add_argument("--out", required=True, metavar="PATH.onnx")
    p.add_argument("--data", metavar="DATA", help="example inputs taken from DATA")
    p.add_argument("--input-shape", type=_ints, metavar="B,C,H,W", help="random example inputs")
    p.add_argument("--opset", type=int, default=18, help="ONNX opset, 18 to 21 (default 18)")
    model_args(p)
    p.set_defaults(run=cmd_export)

    p = subs.add_parser("bench", parents=parent, help="latency of models side by side")
    p.add_argument("models", metavar="MODEL", nargs="+", help="the first one is the baseline")
    p.add_argument("--data", metavar="DATA", help="inputs taken from DATA")
    p.add_argument("--input-shape", type=_ints, metavar="1,C,H,W",
                   help="random inputs of this shape; its first (batch) size is replaced by "
                        "each of --batch-sizes")
    p.add_argument("--batch-sizes", type=_ints, default=[1, 64], metavar="1,64")
    p.add_argument("--iters", type=_positive, default=30, help="timed calls per model/input")
    p.add_argument("--rounds", type=_positive, default=3, help="interleaved timing rounds")
    p.add_argument("--trust-factory", action="store_true",
                   help="build skeletons with the factory recorded in the files")
    p.add_argument("--report", metavar="DIR", help="write report.md/report.html + PNGs")
    model_args(p)
    p.set_defaults(run=cmd_bench)
    return parser


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, FileNotFoundError) and exc.filename and str(exc.filename) not in text:
        text += f": {exc.filename}"
    return text


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lowbit`` command line.

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status: 0 success, 1 failure, 2 bad usage.

    Example:
        >>> main(["inspect", "/no/such/model"])  # "lowbit: error: ..." goes to stderr
        1
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    warnings.filterwarnings("ignore", message=".*LeafSpec.*")  # torch.export pytree noise
    try:
        demo_argv = _demo_argv(argv)
        if demo_argv is not None:
            from lowbit.demo import main as demo_main

            return demo_main(demo_argv)
        args = build_parser().parse_args(argv)
        args.quiet, args.json = getattr(args, "quiet", False), getattr(args, "json", False)
        return int(args.run(args) or 0)
    except BrokenPipeError:  # e.g. `lowbit inspect ... | head`
        return 0
    except KeyboardInterrupt:
        print("lowbit: interrupted", file=sys.stderr)
        return 130
    except UsageError as e:
        if debug:
            raise
        print(f"lowbit: error: {_one_line(e)}", file=sys.stderr)
        return EXIT_USAGE
    except Exception as e:
        if debug:
            raise
        if isinstance(e, (ValueError, OSError)):  # user mistakes: bad file, data, arguments
            print(f"lowbit: error: {_one_line(e)}", file=sys.stderr)
        else:
            print(f"lowbit: error: {type(e).__name__}: {_one_line(e)} (rerun with --debug for "
                  "the traceback)", file=sys.stderr)
        return EXIT_FAILURE
