"""``export_onnx``: a lowbit model (dynamic, static or weight-only; float layers too) to ONNX.

A copy of the model is made in which every quantized layer is its export stand-in
(:mod:`lowbit.onnx._layers`); ``torch.onnx.export(dynamo=True)`` traces it with the batch axis
dynamic and writes each quantized layer as the ONNX subgraph of :mod:`lowbit.onnx._ops`. Two
passes on the ONNX graph follow: a static conv whose output reaches the next layer's
``QuantizeLinear`` only through ReLU / max-pool / reshape gets that same Q/DQ pair right after
it (quantization commutes with those ops, so the numbers do not change), which lets ONNX Runtime
fuse the conv into ``QLinearConv``; and ``ir_version`` is set to one that ONNX Runtime reads.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from lowbit._export_inputs import export_arguments, export_failure_hint
from lowbit._qmodule import record_weight_reads

if TYPE_CHECKING:
    import onnx

__all__ = ["DEFAULT_OPSET", "IR_VERSION", "export_onnx"]

#: The ONNX opset written by default (the exporter's own; 18 to 21 work).
DEFAULT_OPSET = 18

#: ``ir_version`` written for opsets up to 22 (onnx >= 1.19 writes newer versions that
#: ONNX Runtime releases before them refuse).
IR_VERSION = 10

#: Ops between a static conv and the next ``QuantizeLinear`` that quantization commutes with.
_PASS_THROUGH = {"Relu", "MaxPool", "Reshape", "Flatten", "Identity", "Squeeze", "Unsqueeze"}


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """Keep the exporter's progress prints and log warnings (e.g. "torchvision is not
    installed") out of the user's output; yields the captured text for error messages."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "onnx_ir", "onnxscript")]
    levels = [lg.level for lg in loggers]
    log = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(log):
            warnings.simplefilter("ignore")
            yield log
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _require_onnx() -> None:
    missing = [m for m in ("onnx", "onnxscript") if not _importable(m)]
    if missing:
        raise ImportError(f"lowbit.export_onnx needs {missing}: pip install 'lowbit[onnx]' "
                          "(onnx, onnxscript, onnxruntime)")


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _export_copy(qmodel: nn.Module, exact: bool | str,
                 weight_read: set[int] = frozenset()) -> nn.Module:
    """A copy of ``qmodel`` in eval mode with every quantized layer replaced by its export
    stand-in (shared layers stay shared); ``qmodel`` itself is not touched. ``weight_read``:
    ids of layers whose float ``weight`` the model reads (their stand-ins get it)."""
    from lowbit.onnx._layers import export_layer, present_weight

    memo: dict[int, Any] = {}
    for module in qmodel.modules():
        if id(module) not in memo and (stand_in := export_layer(module, exact)) is not None:
            memo[id(module)] = stand_in
            if id(module) in weight_read:
                present_weight(stand_in)
    if isinstance(qmodel, nn.Module) and id(qmodel) in memo:
        return memo[id(qmodel)].eval()
    return copy.deepcopy(qmodel, memo).eval()


def _requantize_conv_outputs(graph: Any) -> int:
    """Insert ``QuantizeLinear -> DequantizeLinear`` after each QDQ ``Conv`` whose output
    reaches one per-tensor ``QuantizeLinear`` only through :data:`_PASS_THROUGH` ops, with
    that Q's scale and zero-point. Returns how many convs got one."""
    import onnx

    producers = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = defaultdict(list)
    for n in graph.node:
        for i in n.input:
            consumers[i].append(n)
    outputs = {o.name for o in graph.output}
    scalar = {i.name for i in graph.initializer if len(i.dims) == 0}
    scalar |= {n.output[0] for n in graph.node if n.op_type == "Constant"}
    done = 0
    for conv in list(graph.node):
        if conv.op_type != "Conv" or not all(
                getattr(producers.get(i), "op_type", None) == "DequantizeLinear"
                for i in conv.input[:2]):
            continue
        value, target = conv.output[0], None
        while value not in outputs and len(consumers[value]) == 1:
            user = consumers[value][0]
            if user.op_type == "QuantizeLinear" and all(i in scalar for i in user.input[1:3]):
                target = user
                break
            if user.op_type not in _PASS_THROUGH or user.input[0] != value:
                break
            value = user.output[0]
        if target is None:
            continue
        out = conv.output[0]
        q_out, dq_out = f"{out}_requant_q", f"{out}_requant"
        for user in consumers[out]:
            for j, name in enumerate(user.input):
                if name == out:
                    user.input[j] = dq_out
        pos = list(graph.node).index(conv) + 1
        graph.node.insert(pos, onnx.helper.make_node(
            "QuantizeLinear", [out, *target.input[1:3]], [q_out], name=f"{conv.name}_requant_q"))
        graph.node.insert(pos + 1, onnx.helper.make_node(
            "DequantizeLinear", [q_out, *target.input[1:3]], [dq_out],
            name=f"{conv.name}_requant_dq"))
        done += 1
    return done


def _check_dynamic(proto: Any, axes: Sequence[int]) -> None:
    """Refuse a graph whose inputs came out with a fixed size on a dynamic axis."""
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis in axes:
            if axis < len(dims) and not dims[axis].dim_param:
                raise ValueError(
                    f"export_onnx: axis {axis} of input {value.name!r} came out fixed at "
                    f"{dims[axis].dim_value}: the model ties it to a constant while tracing "
                    "(e.g. a reshape with a hard-coded batch size); make the model use "
                    "x.shape[...] there, or export with dynamic_axes=() for fixed shapes")


def _output_spec(program: Any) -> str | None:
    """The model's output structure (pytree spec as JSON) when it can be written."""
    from torch.utils import _pytree

    try:
        return _pytree.treespec_dumps(program.exported_program.call_spec.out_spec)
    except Exception:  # a custom output type without a serialized name: plain tuple
        return None


def _save_atomic(proto: Any, path: Path) -> None:
    """Write ``proto`` to ``path`` through a temporary folder and ``os.replace``; models over
    2 GB keep their weights in ``<path>.data`` next to it."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        large = proto.ByteSize() > 2**31 - 2**20
        data = f"{path.name}.data"
        onnx.save_model(proto, tmp / path.name, save_as_external_data=large, location=data)
        if large:
            os.replace(tmp / data, path.parent / data)
        os.replace(tmp / path.name, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _refuse_bfloat16(qmodel: nn.Module, inputs: list[Any]) -> None:
    """bfloat16 graphs do not run on ONNX Runtime's CPU kernels (no bfloat16 ``Div``, ...).
    The model's state is checked, not kernel caches (INT8 weight-only layers keep bfloat16
    scales for their CPU kernel; the exported graph takes the float32 ones)."""
    where = next((n for n, t in qmodel.state_dict(keep_vars=True).items()
                  if isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16), None)
    if where is None and any(isinstance(t, torch.Tensor) and t.dtype == torch.bfloat16
                             for t in inputs):
        where = "the example inputs"
    if where is not None:
        raise ValueError(f"export_onnx: {where} is bfloat16, which ONNX Runtime's CPU kernels do "
                         "not run; export a float32 copy with float32 inputs: export_onnx("
                         "copy.deepcopy(qmodel).float(), ...) (its quantized layers keep "
                         "their integer weights and scales) or a float16 one (.half())")


def export_onnx(qmodel: nn.Module, example_inputs: Any, path: str | os.PathLike | None,
                opset: int = DEFAULT_OPSET, *, dynamic_axes: Sequence[int] = (0,),
                exact: bool | str = True) -> onnx.ModelProto:
    """Export a lowbit model to ONNX that ONNX Runtime runs with integer kernels.

    Quantized layers become standard ONNX: static INT8 as QDQ (``QuantizeLinear`` /
    ``DequantizeLinear``, calibrated activation scale and zero-point, per-channel weights),
    dynamic INT8 as lowbit's per-token (or per-tensor) quantization in standard ops followed
    by ``MatMulInteger`` / ``ConvInteger`` and the float epilogue, INT4 / INT8 weight-only
    linears as com.microsoft ``MatMulNBits``; float layers export as usual. Run the file with
    :class:`lowbit.onnx_export.OnnxRuntimeModule` (or any ``onnxruntime.InferenceSession``).

    Args:
        qmodel: the model (quantized by lowbit, or partly, or not at all); not modified.
        example_inputs: a tensor, a tuple of positional arguments, or a dict of keyword
            arguments (e.g. a tokenizer's output); shapes only matter on fixed axes.
        path: the ``.onnx`` file to write (atomically), or None to only return the model.
        opset: the ONNX opset (18 to 21).
        dynamic_axes: axes left symbolic in every tensor input (default: the batch axis;
            ``(0, 1)`` for batch and sequence length).
        exact: INT8 x INT8 layers get uint8 weights (``w + 128``, zero-point 128), so ONNX
            Runtime runs u8 x u8 integer kernels whose int32 sums are exact on every CPU. False
            keeps int8 weights as ONNX Runtime's own quantizer does: its u8 x s8 kernels are
            ~1.5x faster, exact on CPUs with VNNI, but on x86 CPUs without VNNI (AVX2 only)
            they saturate int16 pair sums, which moves some outputs. Layers with 7-bit
            activations (``QuantizationConfig.int8_dynamic(activation_bits=7)``) get int8
            weights either way: their activation codes fit in [0, 127], where the u8 x s8
            kernels are exact on every CPU, so they are exact and fastest. ``"auto"`` (what
            the ``onnxruntime`` backend uses): int8 weights where ONNX Runtime's u8 x s8 kernels
            are exact on this CPU (x86 with AVX512-VNNI, AVX-VNNI or AMX) and faster (linears,
            static convs; the dynamic ``ConvInteger`` keeps uint8), else uint8: exact here, and
            on any CPU with VNNI, but not a file to run on an AVX2-only one; and linears with
            symmetric activations run their integer matmul and weight scale as com.microsoft
            ``MatMulIntegerToFloat`` (ONNX Runtime only; the same bits, faster at many rows).

    Returns:
        The ``onnx.ModelProto`` (checked with ``onnx.checker``).

    Raises:
        ImportError: onnx / onnxscript missing. ValueError: a bad ``opset`` or an axis the
            model fixes while tracing. TypeError: ``example_inputs`` of another kind.

    Example:
        >>> import lowbit, onnx
        >>> qmodel = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(16, 8), nn.ReLU()))
        >>> proto = export_onnx(qmodel, torch.randn(4, 16), None)
        >>> sorted({n.op_type for n in proto.graph.node} & {"MatMulInteger", "Relu"})
        ['MatMulInteger', 'Relu']
    """
    _require_onnx()
    import onnx

    from lowbit.onnx._ops import TRANSLATIONS

    if exact not in (True, False, "auto"):
        raise ValueError(f"export_onnx: exact={exact!r} must be True, False or 'auto'")
    if not isinstance(opset, int) or not 18 <= opset <= 21:
        raise ValueError(f"export_onnx: opset={opset!r} must be an integer from 18 to 21 "
                         "(lowbit's subgraphs use opset-18 operators)")
    axes = sorted({int(a) for a in dynamic_axes})
    args, kwargs, shapes = export_arguments(example_inputs, axes, "export_onnx")
    _refuse_bfloat16(qmodel, [*args, *kwargs.values()])
    with record_weight_reads() as weight_read, torch.no_grad():  # (model code that reads a
        eager = qmodel(*args, **kwargs)  # quantized layer's float weight: its graph needs it)
    model = _export_copy(qmodel, exact, weight_read)
    with _quiet_exporter() as log:
        try:
            program = torch.onnx.export(
                model, args, kwargs=kwargs or None, dynamo=True, opset_version=opset,
                dynamic_shapes=shapes, custom_translation_table=TRANSLATIONS, verbose=False,
                optimize=True, external_data=False)
        except Exception as exc:
            raise RuntimeError(f"export_onnx: {export_failure_hint(exc)}torch.onnx.export "
                               f"failed: {exc}\n"
                               f"exporter log:\n{log.getvalue()[-4000:]}") from exc
    proto = program.model_proto
    _requantize_conv_outputs(proto.graph)
    proto.ir_version = IR_VERSION
    _check_dynamic(proto, axes)
    meta = {"lowbit.producer": "lowbit.export_onnx",
            "lowbit.inputs": json.dumps([i.name for i in proto.graph.input])}
    constants = {k: v for k, v in kwargs.items() if isinstance(v, bool | int | float | str)}
    if constants:  # keyword flags traced as constants (use_cache=False): the runtime checks them
        meta["lowbit.constants"] = json.dumps(constants)
    if (spec := _output_spec(program)) is not None:
        meta["lowbit.output_spec"] = spec
        from torch.utils import _pytree

        nones = [i for i, leaf in enumerate(_pytree.tree_leaves(eager)) if leaf is None]
        if nones:  # (``return logits, None``: the graph has no output for a None)
            meta["lowbit.output_none"] = json.dumps(nones)
    onnx.helper.set_model_props(proto, meta)
    onnx.checker.check_model(proto)
    if path is not None:
        _save_atomic(proto, Path(path))
    return proto
