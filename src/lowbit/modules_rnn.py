"""Dynamic INT8 recurrent layers: :class:`QuantizedLSTM`, :class:`QuantizedGRU`,
:class:`QuantizedRNN` and the cells :class:`QuantizedLSTMCell`, :class:`QuantizedGRUCell`,
:class:`QuantizedRNNCell` (torch.ao's dynamic coverage; a cell is one time step of a one-layer
sequence module, with the float cell's buffer names and call signature).

A recurrent layer spends its time in two GEMMs per layer and direction: the input projection
``W_ih x_t`` and the recurrence ``W_hh h_{t-1}``. Both run on lowbit's exact INT8 kernels, as
in the dynamic :class:`~lowbit.modules.QuantizedLinear`: weights INT8 per output channel (each
row of the stacked gate matrices), activations (``x_t`` and ``h_{t-1}``) quantized on the fly
with one symmetric scale per token, i.e. per time step and sequence (torch.ao uses one scale
per tensor). The input projection of all time steps is one GEMM; then the recurrence runs step
by step in float32, with the float module's exact semantics (layers, directions,
``batch_first``, ``proj_size``, initial states, packed and unbatched inputs). On lowbit's C ISA
paths the whole recurrence of a layer direction is one C call (``lbk_rnn_scan``: the same exact
INT8 GEMM per step, the gates with a vectorized exp), which saves ~25 us of op dispatch per
step; the PyTorch loop (``backend="reference"``, other paths, ``proj_size``) agrees with it to
float rounding.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.utils.rnn import PackedSequence

from lowbit import _dispatch
from lowbit._qmodule import QuantizedModuleBase, quantize_weight, refuse_jit_trace
from lowbit.config import QuantizationConfig, QuantSpec
from lowbit.dropin import DequantizedWeight
from lowbit.kernels import (
    FUSED_GEMMS,
    fused_linear_layout,
    int8_linear,
    native_lib_for,
    quantize_activation,
    run_fused_linear,
    run_rnn_scan,
    s8_packed,
    select_kernel,
)
from lowbit.native import load_gemm
from lowbit.ops import dequantize

__all__ = ["MAX_RNN_LAYERS", "RNN_TYPES", "QuantizedGRU", "QuantizedGRUCell", "QuantizedLSTM",
           "QuantizedLSTMCell", "QuantizedRNN", "QuantizedRNNBase", "QuantizedRNNCell",
           "rnn_unsupported_reason", "rnn_weight_shapes"]

#: The float recurrent layers lowbit quantizes (dynamic mode).
RNN_TYPES: tuple[type[nn.Module], ...] = (nn.LSTM, nn.GRU, nn.RNN, nn.LSTMCell, nn.GRUCell,
                                          nn.RNNCell)

#: Most layers a quantized RNN may have (a saved file describing more is refused).
MAX_RNN_LAYERS = 1024

_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _is_cell(meta: Mapping[str, Any]) -> bool:
    return str(meta["class"]).endswith("Cell")


def rnn_unsupported_reason(module: nn.Module, config: QuantizationConfig) -> str | None:
    """Why a float recurrent layer (:data:`RNN_TYPES`) cannot be quantized under ``config``,
    else None.

    Example:
        >>> rnn_unsupported_reason(nn.GRU(4, 8), QuantizationConfig.int8_dynamic()) is None
        True
        >>> rnn_unsupported_reason(nn.GRU(4, 8), QuantizationConfig.int8_static())[:46]
        "GRU: mode='static' keeps recurrent layers in f"
    """
    kind = type(module).__name__
    if type(module) not in RNN_TYPES:
        return (f"{kind}: only nn.LSTM, nn.GRU, nn.RNN and their cells (not subclasses) have "
                "quantized versions")
    if config.mode != "dynamic":
        why = ("a calibrated activation range does not fit a recurrence (the hidden state's "
               "range changes every step)" if config.mode == "static" else
               "weight-only recurrent layers are not implemented")
        return (f"{kind}: mode={config.mode!r} keeps recurrent layers in float ({why}); "
                "lowbit quantizes LSTM / GRU / RNN layers and cells in mode='dynamic': use "
                "layer_overrides={name: QuantizationConfig.int8_dynamic()} for this layer")
    w, a = config.weights, config.activations
    if w.bits > 8 or not w.signed or w.granularity not in ("per_tensor", "per_channel") or (
            w.granularity == "per_channel" and w.axis != 0):
        return (f"{kind}: INT8 recurrent layers need signed per_channel (axis=0) or per_tensor "
                "weights of at most 8 bits, e.g. QuantSpec.int8_weight()")
    if a is None or a.bits > 8 or not a.symmetric or a.granularity != "per_token":
        return (f"{kind}: recurrent layers quantize activations per token (per step and "
                "sequence), symmetric, at most 8 bits: use QuantizationConfig.int8_dynamic()")
    return None


def _names(meta: Mapping[str, Any]) -> Iterator[tuple[str, int, int]]:
    """``(suffix, layer, direction)`` of every layer and direction, float-module order (a
    cell's weights have no suffix)."""
    if _is_cell(meta):
        yield "", 0, 0
        return
    for layer in range(meta["num_layers"]):
        for d in range(2 if meta["bidirectional"] else 1):
            yield f"_l{layer}{'_reverse' if d else ''}", layer, d


def rnn_weight_shapes(meta: Mapping[str, Any]) -> dict[str, list[int]]:
    """The int8 weight buffers of a quantized RNN described by ``meta``, with their shapes.

    Example:
        >>> meta = {"class": "QuantizedLSTM", "input_size": 4, "hidden_size": 8,
        ...         "num_layers": 1, "bidirectional": False, "proj_size": 0}
        >>> rnn_weight_shapes(meta)
        {'weight_ih_l0': [32, 4], 'weight_hh_l0': [32, 8]}
    """
    gates = _GATES[meta["class"].removeprefix("Quantized").removesuffix("Cell")]
    hidden, proj = meta["hidden_size"], meta.get("proj_size", 0)
    out = proj or hidden
    shapes = {}
    for sfx, layer, _d in _names(meta):
        width = meta["input_size"] if layer == 0 else out * (2 if meta["bidirectional"] else 1)
        shapes[f"weight_ih{sfx}"] = [gates * hidden, width]
        shapes[f"weight_hh{sfx}"] = [gates * hidden, out]
        if proj:
            shapes[f"weight_hr{sfx}"] = [proj, hidden]
    return shapes


class _RecurrentForward:
    """``forward(input, hx=None)`` of the quantized RNNs; a mixin, so that the one-tensor
    forward wrapper of :class:`QuantizedModuleBase` (custom op while compiling) stays off."""

    def _refuse_tracing(self) -> None:
        """torch.jit.trace and torch.export / ONNX export refused, naming the layer."""
        refuse_jit_trace(self)  # type: ignore[arg-type]
        if torch.compiler.is_exporting():
            raise RuntimeError(
                f"{self._label()}: torch.export / ONNX export of a quantized "  # type: ignore
                "recurrent layer is not supported (its recurrence runs eagerly); keep it in "
                "float for export: layer_overrides={name: None}")

    def forward(self, input: torch.Tensor | PackedSequence, hx: Any = None) -> tuple[Any, Any]:
        """Run the layer like the float module (see the class docstring)."""
        self._refuse_tracing()
        data = input.data if isinstance(input, PackedSequence) else input
        if (isinstance(data, torch.Tensor) and data.is_meta  # shape inference: no values
                and self._buffers[self._first].is_meta):  # type: ignore[attr-defined]
            return self.to_float()(input, hx)  # type: ignore[attr-defined]
        if (isinstance(input, torch.Tensor) and input.dim() == 3  # an empty batch: the float
                and input.shape[0 if self.batch_first else 1] == 0):  # type: ignore[attr-defined]
            return self.to_float()(input, hx)  # type: ignore[attr-defined]  # module's shapes
        return self._forward_eager(input, hx)  # type: ignore[attr-defined]


class QuantizedRNNBase(_RecurrentForward, QuantizedModuleBase):
    """Shared storage and recurrence of :class:`QuantizedLSTM`, :class:`QuantizedGRU`,
    :class:`QuantizedRNN` and the cells.

    Buffers follow the float module's parameter names: ``weight_ih_l{k}[_reverse]`` int8
    ``[gates * hidden, in]`` with ``..._scale`` float32 and ``..._zero_point`` int32 (one per
    row, or one per tensor), the same for ``weight_hh`` (and ``weight_hr`` with ``proj_size``),
    and float32 ``bias_ih`` / ``bias_hh``; read as attributes, the weights are float views of
    the codes (as a quantized Linear's ``weight``). Inference only: dropout between layers is not
    applied (as the float module in eval mode); an input that requires grad gets the gradient
    of the float layer with the dequantized weights (straight through).
    """

    _kind = ""
    _first = "weight_ih_l0"  # the first input projection's buffer

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1,
                 bias: bool = True, batch_first: bool = False, dropout: float = 0.0,
                 bidirectional: bool = False, proj_size: int = 0, *,
                 weight_spec: QuantSpec | None = None, act_spec: QuantSpec | None = None,
                 nonlinearity: str = "tanh", **kw: Any) -> None:
        super().__init__(**kw)
        if nonlinearity not in ("tanh", "relu"):
            raise ValueError(f"{self._label()}: nonlinearity={nonlinearity!r} must be 'tanh' or "
                             "'relu' (as nn.RNN)")
        self.nonlinearity = nonlinearity
        for field, value, low in (("input_size", input_size, 1), ("hidden_size", hidden_size, 1),
                                  ("num_layers", num_layers, 1), ("proj_size", proj_size, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{self._label()}: {field}={value!r} must be an integer >= {low}")
        if num_layers > MAX_RNN_LAYERS:
            raise ValueError(f"{self._label()}: num_layers={num_layers} exceeds {MAX_RNN_LAYERS}")
        if proj_size and (self._kind != "LSTM" or proj_size >= hidden_size):
            raise ValueError(f"{self._label()}: proj_size={proj_size} needs an LSTM with "
                             f"proj_size < hidden_size={hidden_size}")
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bool(bias), bool(batch_first), float(dropout)
        self.bidirectional, self.proj_size = bool(bidirectional), proj_size
        self.weight_spec = weight_spec or QuantSpec.int8_weight()
        self.act_spec = act_spec or QuantSpec.int8_dynamic_activation()
        self.mode = "dynamic"
        per_tensor = self.weight_spec.granularity == "per_tensor"
        for name, shape in rnn_weight_shapes(self._shape_meta()).items():
            self.register_buffer(name, torch.zeros(shape, dtype=torch.int8))
            qshape = () if per_tensor else (shape[0],)
            self.register_buffer(f"{name}_scale", torch.ones(qshape))
            self.register_buffer(f"{name}_zero_point", torch.zeros(qshape, dtype=torch.int32))
            if bias and not name.startswith("weight_hr"):
                self.register_buffer(name.replace("weight", "bias"), torch.zeros(shape[0]))
        off = 0 if self.act_spec.signed else -(2 ** (self.act_spec.bits - 1))
        self._qmin, self._qmax = self.act_spec.qmin + off, self.act_spec.qmax + off
        self._mats: dict[str, tuple] = {}
        self._directions = list(_names(self._shape_meta()))  # (a dict per call cost ~20 us)
        self._refresh_cache()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_float(cls, module: nn.Module, config: QuantizationConfig, *, name: str = "",
                   meta_extra: Mapping[str, Any] | None = None, backend: str = "auto",
                   **_ignored: Any) -> QuantizedRNNBase:
        """Quantize a float ``nn.LSTM`` / ``nn.GRU`` / ``nn.RNN`` or cell (``config``: dynamic
        INT8).

        Args:
            module: the float layer. config: its resolved config.
            name: layer name for errors and meta. meta_extra: JSON extras for :meth:`meta`.
            backend: ``"auto"`` or ``"reference"``. Other keyword arguments of
                :func:`~lowbit.modules.convert_module` (``fused_relu``, ...) are ignored.

        Raises:
            ValueError: a config :func:`rnn_unsupported_reason` refuses, or NaN/Inf weights
                (the message names the layer).
        """
        reason = rnn_unsupported_reason(module, config)
        if reason is not None:
            raise ValueError(f"{name or '<unnamed>'}: {reason}")
        m: Any = module
        q = cls(m.input_size, m.hidden_size, getattr(m, "num_layers", 1), m.bias,
                getattr(m, "batch_first", False), float(getattr(m, "dropout", 0.0)),
                getattr(m, "bidirectional", False), getattr(m, "proj_size", 0),
                weight_spec=config.weights, act_spec=config.activations,
                nonlinearity=getattr(m, "nonlinearity", "tanh"), name=name,
                meta_extra=meta_extra, backend=backend,
                orig_dtype=str(getattr(m, cls._first).dtype).removeprefix("torch."))
        kind = type(module).__name__
        with torch.no_grad():
            for wname in rnn_weight_shapes(q._shape_meta()):
                codes, scale, zp = quantize_weight(getattr(m, wname), q.weight_spec,
                                                   f"{name}.{wname}" if name else wname, kind)
                q._buffers[wname].copy_(codes)
                for key, value in (("scale", scale), ("zero_point", zp)):
                    buf = getattr(q, f"{wname}_{key}")
                    buf.copy_(value.reshape(buf.shape))
                bname = wname.replace("weight", "bias")
                if q.bias and bname in q._buffers:
                    getattr(q, bname).copy_(getattr(m, bname).detach().float())
        q._refresh_cache()
        return q

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> QuantizedRNNBase:
        """An empty module of the shapes in ``meta`` (fill it with ``load_state_dict``)."""
        return cls(meta["input_size"], meta["hidden_size"], meta["num_layers"], meta["bias"],
                   meta["batch_first"], meta.get("dropout", 0.0), meta["bidirectional"],
                   meta.get("proj_size", 0), weight_spec=QuantSpec.from_dict(meta["weight_spec"]),
                   act_spec=QuantSpec.from_dict(meta["activation_spec"]),
                   nonlinearity=meta.get("nonlinearity", "tanh"), **cls._common(meta))

    def _shape_meta(self) -> dict[str, Any]:
        meta = {"class": type(self).__name__, "input_size": self.input_size,
                "hidden_size": self.hidden_size, "num_layers": self.num_layers,
                "bias": self.bias, "batch_first": self.batch_first, "dropout": self.dropout,
                "bidirectional": self.bidirectional, "proj_size": self.proj_size,
                "mode": self.mode}
        if self._kind == "RNN":
            meta["nonlinearity"] = self.nonlinearity
        return {**meta, "weight_spec": self.weight_spec.to_dict(),
                "activation_spec": self.act_spec.to_dict()}

    def kernel_info(self) -> str:
        """The INT8 GEMM of a one-row call (the recurrence at batch 1), e.g. ``"s8_avx2"``."""
        w = self._buffers[self._first.replace("_ih", "_hh")]  # (the codes, not the float view)
        return select_kernel("int8_linear", 1, backend=self.backend, k=w.shape[1],
                             n=w.shape[0], device=w.device.type)

    def _refresh_cache(self) -> None:
        """Per weight: ``(int8 w, float32 scales [N], int32 colsum, bias, w_zp, fusable)``."""
        mats = {}
        for name in rnn_weight_shapes(self._shape_meta()):
            w = self._buffers[name]
            n = w.shape[0]
            scale = self._buffers[f"{name}_scale"].float().expand(n).contiguous()
            zp = self._buffers[f"{name}_zero_point"].to(torch.int32).expand(n).contiguous()
            w_zp = zp if bool(zp.any()) else None
            colsum = w.sum(1, dtype=torch.int32) - w.shape[1] * zp
            bias = self._buffers.get(name.replace("weight", "bias"))
            fusable = (self.backend == "auto" and w_zp is None
                       and fused_linear_layout(w, scale, bias))
            mats[name] = (w, scale, colsum, bias, w_zp, fusable)
        self._mats = mats

    def dequantize_weight(self, name: str = "") -> torch.Tensor:
        """The float32 weight ``(q - zp) * scale`` of buffer ``name`` (default: the first input
        projection, ``weight_ih_l0`` or a cell's ``weight_ih``).

        Example:
            >>> q = QuantizedGRU.from_float(nn.GRU(4, 8), QuantizationConfig.int8_dynamic())
            >>> tuple(q.dequantize_weight("weight_hh_l0").shape)
            (24, 8)
        """
        name = name or self._first
        return dequantize(self._buffers[name], self._buffers[f"{name}_scale"],
                          self._buffers[f"{name}_zero_point"], self.weight_spec)

    def to_float(self) -> nn.Module:
        """The float module (``nn.LSTM``, ``nn.GRU``, ``nn.RNN`` or the cell) with the
        dequantized weights, in the dtype the layer presents (``orig_dtype``).

        Example:
            >>> f = nn.LSTM(4, 8)
            >>> q = QuantizedLSTM.from_float(f, QuantizationConfig.int8_dynamic())
            >>> x = torch.randn(5, 1, 4)
            >>> bool((q.to_float()(x)[0] - f(x)[0]).abs().max() < 0.05)
            True
        """
        cell = isinstance(self, _Cell)
        kw: dict[str, Any] = ({"proj_size": self.proj_size} if self._kind == "LSTM" and not cell
                              else {})
        if self._kind == "RNN":
            kw["nonlinearity"] = self.nonlinearity
        ref = self._buffers[self._first]
        dtype = getattr(torch, self.orig_dtype, torch.float32)
        if cell:
            m = getattr(nn, f"{self._kind}Cell")(self.input_size, self.hidden_size,
                                                 bias=self.bias, device=ref.device, dtype=dtype,
                                                 **kw)
        else:
            m = getattr(nn, self._kind)(self.input_size, self.hidden_size, self.num_layers,
                                        bias=self.bias, batch_first=self.batch_first,
                                        dropout=self.dropout, bidirectional=self.bidirectional,
                                        device=ref.device, dtype=dtype, **kw)
        with torch.no_grad():
            for name in rnn_weight_shapes(self._shape_meta()):
                getattr(m, name).copy_(self.dequantize_weight(name))
                bname = name.replace("weight", "bias")
                if self.bias and bname in self._buffers:
                    getattr(m, bname).copy_(self._buffers[bname])
        return m.eval()

    def flatten_parameters(self) -> None:
        """No-op, as on CPU for the float module (model code often calls it in forward)."""

    def __getattr__(self, name: str) -> Any:
        """``weight_ih_l0`` ... read as the float module's would: a float view of the codes
        (:class:`lowbit.dropin.DequantizedWeight`, the dtype the layer presents), as a quantized
        Linear's ``weight`` is; model code casting its input to that dtype got int8. The codes
        stay the buffers of those names (``state_dict``, files, ``_buffers``)."""
        buffers = self.__dict__.get("_buffers", {})
        if name.startswith("weight_") and f"{name}_scale" in buffers:
            codes = buffers[name]
            return DequantizedWeight(functools.partial(self.dequantize_weight, name),
                                     codes.shape, getattr(torch, self.orig_dtype, torch.float32),
                                     codes.device, f"{self._label()}.{name}")
        return super().__getattr__(name)

    @property
    def all_weights(self) -> list[list[torch.Tensor]]:
        """Per layer and direction, as ``nn.LSTM`` / ``nn.GRU`` list them: ``weight_ih``,
        ``weight_hh`` (float views), ``bias_ih``, ``bias_hh``, ``weight_hr`` where present.

        Example:
            >>> q = QuantizedGRU.from_float(nn.GRU(4, 8), QuantizationConfig.int8_dynamic())
            >>> [(tuple(w.shape), w.dtype) for w in q.all_weights[0]][:2]
            [((24, 4), torch.float32), ((24, 8), torch.float32)]
        """
        out = []
        for k in range(self.num_layers):
            for sfx in ("", "_reverse") if self.bidirectional else ("",):
                names = [f"{kind}_{part}_l{k}{sfx}" for kind, part in (
                    ("weight", "ih"), ("weight", "hh"), ("bias", "ih"), ("bias", "hh"),
                    ("weight", "hr"))]
                out.append([getattr(self, n) for n in names if n in self._buffers])
        return out

    # ------------------------------------------------------------------ forward
    @contextlib.contextmanager
    def _backend_now(self) -> Iterator[str]:
        """This call's layer backend (a ``lowbit.backends.use`` block wins); on ``"torch"``
        lowbit's C kernels stay off, as for the other layers."""
        backend = _dispatch._OVERRIDE.get() or self.backend
        token = _dispatch._NATIVE_OFF.set(True) if backend == "torch" else None
        try:
            yield backend
        finally:
            if token is not None:
                _dispatch._NATIVE_OFF.reset(token)

    def _gemm(self, name: str, x: torch.Tensor, backend: str) -> torch.Tensor:
        """``x [M, K]`` (float32, contiguous) times weight ``name`` plus its bias: ``[M, N]``,
        activations quantized per row."""
        w, scale, colsum, bias, w_zp, fusable = self._mats[name]
        x = x.contiguous()  # (a no-op for the callers' rows; a strided one would be misread)
        kernel = select_kernel("int8_linear", x.shape[0], backend=backend, k=w.shape[1],
                               n=w.shape[0], device=x.device.type)
        if (fusable and backend == "auto" and kernel in FUSED_GEMMS
                and (lib := native_lib_for(x)) is not None):
            return run_fused_linear(lib, x, self._qmin, self._qmax, w, scale, colsum, bias,
                                    True, None, None, None, False, kernel)
        q, s, zp = quantize_activation(x, self._qmin, self._qmax, native=backend == "auto")
        return int8_linear(q, s, zp, w, scale, colsum, bias, kernel=kernel, w_zp=w_zp)

    def _check_input(self, x: Any) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{self._label()}: expected a torch.Tensor or PackedSequence input, "
                            f"got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self._label()}: expected a floating-point input, got {x.dtype}; "
                            "convert it first, e.g. x.float()")
        w = self._buffers[self._first]
        if x.device != w.device:
            raise RuntimeError(f"{self._label()}: input is on {x.device} but the layer's "
                               f"buffers are on {w.device}; move one of them")
        if x.dim() == 0 or x.shape[-1] != self.input_size:
            raise ValueError(f"{self._label()}: expected input with {self.input_size} features "
                             f"in the last dim (input_size), got shape {tuple(x.shape)}")

    def _states(self, hx: Any, batch: int, unbatched: bool, order: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(h0, c0)`` as float32 ``[layers * dirs, batch, size]`` (zeros when not given),
        in the packed batch order."""
        dirs = 2 if self.bidirectional else 1
        sizes = {"h0": self.proj_size or self.hidden_size, "c0": self.hidden_size}
        names = ("h0", "c0") if self._kind == "LSTM" else ("h0",)
        w = self._buffers[self._first]
        if hx is None:
            given: tuple = tuple(None for _ in names)
        elif self._kind == "LSTM":
            if not isinstance(hx, (tuple, list)) or len(hx) != 2:
                raise TypeError(f"{self._label()}: hx must be a tuple (h0, c0) of tensors, got "
                                f"{type(hx).__name__}")
            given = tuple(hx)
        else:
            given = (hx,)
        out = []
        for key, t in zip(names, given, strict=True):
            shape = (self.num_layers * dirs, batch, sizes[key])
            if t is None:
                out.append(torch.zeros(shape, device=w.device))
                continue
            if not isinstance(t, torch.Tensor) or t.dim() != (2 if unbatched else 3):
                raise ValueError(f"{self._label()}: {key} must be a "
                                 f"{2 if unbatched else 3}-D tensor for a "
                                 f"{'un' if unbatched else ''}batched input")
            t = t.unsqueeze(1) if unbatched else t
            if tuple(t.shape) != shape:
                raise ValueError(f"{self._label()}: expected {key} of shape {shape}, got "
                                 f"{tuple(t.shape)}")
            t = t.detach().to(torch.float32)
            out.append(t.index_select(1, order) if order is not None
                       else t.clone(memory_format=torch.contiguous_format))
        return out[0], out[1] if len(out) > 1 else None

    def _check_packed(self, input: PackedSequence) -> None:
        """A PackedSequence's ``batch_sizes`` must describe its data rows: the scan reads
        ``sum(batch_sizes)`` rows and writes as many (more rows were returned uninitialized,
        an empty list gave uninitialized output, a growing one a C refusal naming no layer)."""
        steps = input.batch_sizes.tolist()
        rows = input.data.shape[0] if input.data.dim() else -1
        if (not steps or any(s <= 0 for s in steps) or sum(steps) != rows
                or any(b > a for a, b in itertools.pairwise(steps))):
            shown = steps if len(steps) <= 8 else [*steps[:8], "..."]
            raise ValueError(
                f"{self._label()}: a PackedSequence whose batch_sizes {shown} do not describe "
                f"its {rows} data rows (they must be positive, non-increasing and sum to the "
                "rows); build it with torch.nn.utils.rnn.pack_padded_sequence or pack_sequence")

    @torch._disable_dynamo  # torch.compile: a graph break, the layer runs eagerly (dynamo is
    # imported on the first call, not by `import lowbit`)
    def _forward_eager(self, input: torch.Tensor | PackedSequence, hx: Any = None
                       ) -> tuple[Any, Any]:
        if isinstance(input, PackedSequence):
            self._check_packed(input)
        if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False) for t in (
                input.data if isinstance(input, PackedSequence) else input,
                *(hx if isinstance(hx, (tuple, list)) else (hx,)))):
            return self._straight_through(input, hx)
        packed = isinstance(input, PackedSequence)
        x = input.data if packed else input
        self._check_input(x)
        self._fresh_caches(self._first)  # (a buffer changed in place: rebuilt)
        dtype = x.dtype
        if packed:
            steps = input.batch_sizes.tolist()  # type: ignore[union-attr]
            data, unbatched = x, False
            order = input.sorted_indices  # type: ignore[union-attr]
        else:
            unbatched = x.dim() == 2
            if x.dim() not in (2, 3):
                raise ValueError(f"{self._label()}: expected a 2-D (unbatched) or 3-D input, "
                                 f"got shape {tuple(x.shape)}")
            x = x.unsqueeze(1) if unbatched else (x.transpose(0, 1) if self.batch_first else x)
            steps = [x.shape[1]] * x.shape[0]  # time-major: the packed layout of equal lengths
            data, order = x.reshape(-1, self.input_size), None
        h0, c0 = self._states(hx, steps[0] if steps else 0, unbatched, order)
        with torch.no_grad(), self._backend_now() as backend:
            out, h_n, c_n = self._layers(data.detach().float().contiguous(), steps, h0, c0,
                                         backend)
        out = out.to(dtype)
        if packed:
            undo = input.unsorted_indices  # type: ignore[union-attr]
            h_n = h_n if undo is None else h_n.index_select(1, undo)
            c_n = c_n if c_n is None or undo is None else c_n.index_select(1, undo)
            output: Any = PackedSequence(out, input.batch_sizes, input.sorted_indices, undo)
        else:
            output = out.view(len(steps), steps[0] if steps else 0, -1)
            output = output.squeeze(1) if unbatched else (
                output.transpose(0, 1) if self.batch_first else output)
        h_n = h_n.to(dtype).squeeze(1) if unbatched else h_n.to(dtype)
        if c_n is None:
            return output, h_n
        c_n = c_n.to(dtype).squeeze(1) if unbatched else c_n.to(dtype)
        return output, (h_n, c_n)

    def _straight_through(self, input: Any, hx: Any, run: Any = None) -> Any:
        """Quantized values (``run``, default :meth:`_forward_eager`), gradient of the float
        layer with the dequantized weights."""
        with torch.no_grad():
            q_out = (run or self._forward_eager)(input, hx)
        data = input.data if isinstance(input, PackedSequence) else input
        f_out = self.to_float().to(data.dtype)(input, hx)  # the quantized layer takes any float

        def mix(q: Any, f: Any) -> Any:
            if isinstance(q, PackedSequence):
                return q._replace(data=q.data + (f.data - f.data.detach()))
            if isinstance(q, tuple):
                return tuple(mix(a, b) for a, b in zip(q, f, strict=True))
            return q + (f - f.detach())
        return mix(q_out, f_out)

    def _layers(self, x: torch.Tensor, steps: list[int], h0: torch.Tensor,
                c0: torch.Tensor | None, backend: str
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """All layers over packed time-major data ``x [sum(steps), in]``: the output data, and
        the final states ``[layers * dirs, batch, size]`` (batch in packed order)."""
        offsets = [0]
        for b in steps:
            offsets.append(offsets[-1] + b)
        spans = list(zip(offsets, steps, strict=False))
        h_n, c_n = [], []
        for sfx, _layer, d in self._directions:
            if d == 0:
                outs = []
            gx = self._gemm(f"weight_ih{sfx}", x, backend)  # all time steps: one GEMM
            i = len(h_n)
            args = (gx, sfx, spans[::-1] if d else spans, h0[i], None if c0 is None else c0[i],
                    backend)
            y, h, c = self._scan_native(*args) or self._scan(*args)
            outs.append(y)
            h_n.append(h)
            if c is not None:
                c_n.append(c)
            if d == (1 if self.bidirectional else 0):
                x = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
        return x, torch.stack(h_n), torch.stack(c_n) if c_n else None

    def _scan(self, gx: torch.Tensor, sfx: str, spans: list[tuple[int, int]], h: torch.Tensor,
              c: torch.Tensor | None, backend: str
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The recurrence of one layer direction in PyTorch ops: per step ``(o, b)``,
        :meth:`_gates` on the first ``b`` state rows and input projection rows ``o .. o + b``;
        packed, the longer sequences come first and the rest keep their state."""
        out = gx.new_empty((gx.shape[0], h.shape[1]))
        for o, b in spans:
            h_new, c_new = self._gates(h[:b], None if c is None else c[:b], gx[o:o + b], sfx,
                                       backend)
            out[o:o + b] = h_new
            if b == h.shape[0]:
                h, c = h_new, c_new
            else:
                h[:b] = h_new
                if c is not None:
                    c[:b] = c_new
        return out, h, c

    def _gates(self, h: torch.Tensor, c: torch.Tensor | None, gx: torch.Tensor, sfx: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One step's new ``(h, c)`` (``c`` None but for an LSTM) from the state rows and the
        input projection rows ``gx`` (its bias included)."""
        raise NotImplementedError

    def _scan_native(self, gx: torch.Tensor, sfx: str, spans: list[tuple[int, int]],
                     h: torch.Tensor, c: torch.Tensor | None, backend: str
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None:
        """The recurrence in one C call (:func:`~lowbit.kernels.run_rnn_scan`) where the
        hidden GEMM runs on a C ISA path, else None (the PyTorch loop runs)."""
        w, scale, _, bias, _, fusable = self._mats[f"weight_hh{sfx}"]
        if (not fusable or backend != "auto" or self.proj_size or not spans
                or native_lib_for(gx, h) is None):
            return None
        kernel = select_kernel("int8_linear", h.shape[0], backend=backend, k=w.shape[1],
                               n=w.shape[0], device=h.device.type)
        lib = load_gemm(kernel[3:]) if kernel.startswith("s8_") else None
        packed = s8_packed(w, lib) if lib is not None else None
        if packed is None or not (gx.is_contiguous() and h.is_contiguous()
                                  and (c is None or c.is_contiguous())):
            return None
        kind = f"RNN_{self.nonlinearity.upper()}" if self._kind == "RNN" else self._kind
        out = run_rnn_scan(lib, kind, gx, spans, h, c, packed, scale, bias, self._qmin,
                           self._qmax)
        return out, h, c

    def extra_repr(self) -> str:
        proj = f", proj_size={self.proj_size}" if self.proj_size else ""
        if self._kind == "RNN":
            proj += f", nonlinearity={self.nonlinearity!r}"
        if isinstance(self, _Cell):
            return (f"{self.input_size}, {self.hidden_size}, bias={self.bias}{proj}, "
                    f"backend={self.backend}")
        return (f"{self.input_size}, {self.hidden_size}, num_layers={self.num_layers}, "
                f"bias={self.bias}, batch_first={self.batch_first}, "
                f"bidirectional={self.bidirectional}{proj}, backend={self.backend}")


class QuantizedLSTM(QuantizedRNNBase):
    """Dynamic INT8 ``nn.LSTM`` (see :class:`QuantizedRNNBase`): same arguments, inputs and
    outputs ``(output, (h_n, c_n))`` as the float module, ``proj_size`` included.

    Example:
        >>> f = nn.LSTM(16, 32, num_layers=2, batch_first=True, bidirectional=True)
        >>> q = QuantizedLSTM.from_float(f, QuantizationConfig.int8_dynamic(), name="lstm")
        >>> x = torch.randn(3, 7, 16)
        >>> (y, (h, c)), (yf, _) = q(x), f(x)
        >>> y.shape, h.shape, q.weight_hh_l1_reverse.dtype, q._buffers["weight_hh_l1"].dtype
        (torch.Size([3, 7, 64]), torch.Size([4, 3, 32]), torch.float32, torch.int8)
        >>> bool(torch.nn.functional.cosine_similarity(y.flatten(), yf.flatten(), 0) > 0.999)
        True
    """

    _kind = "LSTM"

    def _gates(self, h: torch.Tensor, c: torch.Tensor | None, gx: torch.Tensor, sfx: str,
               backend: str) -> tuple[torch.Tensor, torch.Tensor]:
        assert c is not None
        hid = self.hidden_size
        g = self._gemm(f"weight_hh{sfx}", h, backend).add_(gx)  # i, f, g, o gates
        s = torch.sigmoid(g)
        c_new = torch.addcmul(s[:, hid:2 * hid] * c, s[:, :hid], g[:, 2 * hid:3 * hid].tanh())
        h_new = s[:, 3 * hid:] * c_new.tanh()
        if self.proj_size:
            h_new = self._gemm(f"weight_hr{sfx}", h_new, backend)
        return h_new, c_new


class QuantizedGRU(QuantizedRNNBase):
    """Dynamic INT8 ``nn.GRU`` (see :class:`QuantizedRNNBase`): same arguments, inputs and
    outputs ``(output, h_n)`` as the float module.

    Example:
        >>> f = nn.GRU(16, 32)
        >>> q = QuantizedGRU.from_float(f, QuantizationConfig.int8_dynamic(), name="gru")
        >>> x = torch.randn(9, 2, 16)
        >>> (y, h), (yf, _) = q(x), f(x)
        >>> y.shape, h.shape
        (torch.Size([9, 2, 32]), torch.Size([1, 2, 32]))
        >>> bool(torch.nn.functional.cosine_similarity(y.flatten(), yf.flatten(), 0) > 0.999)
        True
    """

    _kind = "GRU"

    def _gates(self, h: torch.Tensor, c: torch.Tensor | None, gx: torch.Tensor, sfx: str,
               backend: str) -> tuple[torch.Tensor, None]:
        hid = self.hidden_size
        gh = self._gemm(f"weight_hh{sfx}", h, backend)  # r, z, n gates (with b_hh)
        rz = torch.sigmoid(gh[:, :2 * hid] + gx[:, :2 * hid])
        n = torch.addcmul(gx[:, 2 * hid:], rz[:, :hid], gh[:, 2 * hid:]).tanh_()
        return torch.addcmul(n, rz[:, hid:], h - n), None  # (1 - z) * n + z * h


class QuantizedRNN(QuantizedRNNBase):
    """Dynamic INT8 ``nn.RNN`` (Elman, ``tanh`` or ``relu``; see :class:`QuantizedRNNBase`):
    same arguments, inputs and outputs ``(output, h_n)`` as the float module.

    Example:
        >>> f = nn.RNN(16, 32, num_layers=2, nonlinearity="relu", bidirectional=True)
        >>> q = QuantizedRNN.from_float(f, QuantizationConfig.int8_dynamic(), name="rnn")
        >>> x = torch.randn(9, 2, 16)
        >>> (y, h), (yf, _) = q(x), f(x)
        >>> y.shape, h.shape, q.nonlinearity
        (torch.Size([9, 2, 64]), torch.Size([4, 2, 32]), 'relu')
        >>> bool(torch.nn.functional.cosine_similarity(y.flatten(), yf.flatten(), 0) > 0.999)
        True
    """

    _kind = "RNN"

    def _gates(self, h: torch.Tensor, c: torch.Tensor | None, gx: torch.Tensor, sfx: str,
               backend: str) -> tuple[torch.Tensor, None]:
        act = torch.tanh if self.nonlinearity == "tanh" else torch.relu
        return act(self._gemm(f"weight_hh{sfx}", h, backend).add_(gx)), None


class _Cell:
    """``forward(input, hx=None)`` of the quantized cells: one time step of the one-layer
    sequence module (``input [batch, in]`` or ``[in]``; ``hx`` as the float cell takes it)."""

    _first = "weight_ih"

    def forward(self, input: torch.Tensor, hx: Any = None) -> Any:
        """Run the cell like the float one: the new ``h`` (``(h, c)`` for an LSTM cell)."""
        me: Any = self
        me._refuse_tracing()
        if not isinstance(input, torch.Tensor) or input.dim() not in (1, 2):
            shape = tuple(input.shape) if isinstance(input, torch.Tensor) else type(input)
            raise ValueError(f"{me._label()}: expected a 1-D (unbatched) or 2-D input "
                             f"[batch, input_size], got {shape}")
        lstm = me._kind == "LSTM"
        if lstm and hx is not None and (not isinstance(hx, (tuple, list)) or len(hx) != 2):
            raise TypeError(f"{me._label()}: hx must be a tuple (h, c) of tensors, got "
                            f"{type(hx).__name__}")
        if input.shape[-1] != me.input_size:  # (named in the cell's terms, not the sequence's)
            raise ValueError(f"{me._label()}: expected input with {me.input_size} features in "
                             f"the last dim (input_size), got shape {tuple(input.shape)}")
        states = tuple(hx) if lstm and hx is not None else (hx,)
        want = (*input.shape[:-1], me.hidden_size)
        for key, t in zip(("h", "c"), states if hx is not None else (), strict=False):
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != want:
                got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"{me._label()}: expected {key} of shape {want} for an input "
                                 f"of shape {tuple(input.shape)}, got {got}")
        if ((input.is_meta and me._buffers[me._first].is_meta)  # shapes only, or an empty
                or (input.dim() == 2 and input.shape[0] == 0)):  # batch: the float cell's
            return me.to_float()(input, hx)
        if torch.is_grad_enabled() and any(getattr(t, "requires_grad", False)
                                           for t in (input, *states)):
            return me._straight_through(input, hx, self.forward)
        return self._step(input, states if hx is not None else None)

    @torch._disable_dynamo  # (as the sequence layers: torch.compile runs the step eagerly)
    def _step(self, input: torch.Tensor, states: tuple[torch.Tensor, ...] | None) -> Any:
        """One step of the one-layer recurrence on checked inputs: the input projection, then
        the hidden GEMM and gates (:meth:`_scan_native`, else the PyTorch loop), without the
        sequence layers' packing and stacking (a third of a cell's time at batch 1)."""
        me: Any = self
        me._check_input(input)  # (dtype, device)
        me._fresh_caches(me._first)
        w = me._buffers[me._first]
        x = input.detach().reshape(-1, me.input_size).float().contiguous()
        b = x.shape[0]

        def state(i: int) -> torch.Tensor:
            if states is None:
                return torch.zeros(b, me.hidden_size, device=w.device)
            return states[i].detach().reshape(b, me.hidden_size).to(torch.float32).clone(
                memory_format=torch.contiguous_format)  # (the C GEMMs read rows in order)

        h, c = state(0), state(1) if me._kind == "LSTM" else None
        spans = [(0, b)]
        with torch.no_grad(), me._backend_now() as backend:
            gx = me._gemm("weight_ih", x, backend)
            _, h, c = (me._scan_native(gx, "", spans, h, c, backend)
                       or me._scan(gx, "", spans, h, c, backend))
        shape = (*input.shape[:-1], me.hidden_size)
        h = h.to(input.dtype).reshape(shape)
        return (h, c.to(input.dtype).reshape(shape)) if c is not None else h


class QuantizedLSTMCell(_Cell, QuantizedLSTM):
    """Dynamic INT8 ``nn.LSTMCell``: buffers ``weight_ih`` / ``weight_hh`` (and biases) as the
    float cell names them; ``cell(x, (h, c))`` returns ``(h', c')``.

    Example:
        >>> f = nn.LSTMCell(16, 32)
        >>> q = QuantizedLSTMCell.from_float(f, QuantizationConfig.int8_dynamic())
        >>> x, h, c = torch.randn(3, 16), torch.randn(3, 32), torch.randn(3, 32)
        >>> (h1, c1), (hf, _) = q(x, (h, c)), f(x, (h, c))
        >>> h1.shape, c1.shape, sorted(q.state_dict())[:2]
        (torch.Size([3, 32]), torch.Size([3, 32]), ['bias_hh', 'bias_ih'])
        >>> bool(torch.nn.functional.cosine_similarity(h1.flatten(), hf.flatten(), 0) > 0.999)
        True
    """


class QuantizedGRUCell(_Cell, QuantizedGRU):
    """Dynamic INT8 ``nn.GRUCell``; ``cell(x, h)`` returns ``h'``.

    Example:
        >>> f = nn.GRUCell(16, 32)
        >>> q = QuantizedGRUCell.from_float(f, QuantizationConfig.int8_dynamic())
        >>> x = torch.randn(16)  # unbatched, as the float cell takes it
        >>> h = q(x)
        >>> h.shape, bool(torch.nn.functional.cosine_similarity(h, f(x), 0) > 0.999)
        (torch.Size([32]), True)
    """


class QuantizedRNNCell(_Cell, QuantizedRNN):
    """Dynamic INT8 ``nn.RNNCell`` (``tanh`` or ``relu``); ``cell(x, h)`` returns ``h'``.

    Example:
        >>> f = nn.RNNCell(16, 32, nonlinearity="relu")
        >>> q = QuantizedRNNCell.from_float(f, QuantizationConfig.int8_dynamic())
        >>> x = torch.randn(4, 16)
        >>> bool(torch.nn.functional.cosine_similarity(q(x).flatten(), f(x).flatten(), 0) > 0.999)
        True
    """
