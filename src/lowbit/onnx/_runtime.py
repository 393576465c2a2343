"""``OnnxRuntimeModule``: an exported model run by ONNX Runtime, called like the PyTorch one."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

__all__ = ["CPU_DISABLED_OPTIMIZERS", "OnnxRuntimeModule"]

#: ONNX Runtime graph fusions that :class:`OnnxRuntimeModule` leaves out on the CPU provider,
#: measured slower than the operators they replace: ``SkipLayerNormalization`` (a residual
#: ``Add`` and ``LayerNormalization`` in one kernel) ran 3.6-7x slower than the two on 1 to
#: 1,024 rows of 384 to 4,096 on ONNX Runtime 1.32, and a transformer block 1.15x slower with
#: it (``docs/backends.md``). Other providers keep every fusion.
CPU_DISABLED_OPTIMIZERS = ("SkipLayerNormFusion",)

_NUMPY = {"tensor(float)": np.float32, "tensor(double)": np.float64,
          "tensor(float16)": np.float16, "tensor(int64)": np.int64, "tensor(int32)": np.int32,
          "tensor(int8)": np.int8, "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


class OnnxRuntimeModule(nn.Module):
    """An ``onnxruntime.InferenceSession`` wrapped as an ``nn.Module``: tensors in, tensors out.

    Positional arguments fill the graph inputs in order, keyword arguments by name (``None``
    values are dropped, as PyTorch models ignore them; flags that were constants at export,
    such as ``use_cache=False``, are accepted with the exported value); any batch size the
    graph's dynamic axes allow. The outputs come back as CPU tensors in the model's own
    structure when :func:`lowbit.export_onnx` could record it (e.g. a transformers
    ``ModelOutput``), else as one tensor or a tuple.

    Args:
        path_or_model_proto: an ``.onnx`` file or an ``onnx.ModelProto``.
        providers: ONNX Runtime execution providers (default: the CPU provider).
        session_options: an ``onnxruntime.SessionOptions`` (threads, optimization level).
        disabled_optimizers: ONNX Runtime graph optimizers to skip (their names, as
            ``InferenceSession`` takes them); default :data:`CPU_DISABLED_OPTIMIZERS` when
            the CPU provider is the only one installed of those asked for, else none. ``()``
            keeps every fusion.

    Raises:
        ImportError: onnxruntime is not installed.
        TypeError: ``disabled_optimizers`` is not a sequence of names (a single string, say).
        ValueError: (when called) an input with a size the graph fixes, named with the shape
            the graph takes.

    Example:
        >>> import lowbit
        >>> qmodel = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(16, 8)))
        >>> ort_model = OnnxRuntimeModule(lowbit.export_onnx(qmodel, torch.randn(2, 16), None))
        >>> x = torch.randn(5, 16)
        >>> ort_model(x).shape, bool((ort_model(x) - qmodel(x)).abs().max() < 1e-4)
        (torch.Size([5, 8]), True)
    """

    def __init__(self, path_or_model_proto: str | os.PathLike | Any,
                 providers: list[str] | None = None, *, session_options: Any = None,
                 disabled_optimizers: Sequence[str] | None = None) -> None:
        super().__init__()
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise ImportError("OnnxRuntimeModule needs onnxruntime: pip install "
                              "'lowbit[onnx]'") from exc
        source = path_or_model_proto
        if not isinstance(source, (str, os.PathLike)):
            source = source.SerializeToString()
        if isinstance(disabled_optimizers, str) or not (
                disabled_optimizers is None
                or all(isinstance(n, str) for n in disabled_optimizers)):
            raise TypeError(f"OnnxRuntimeModule: disabled_optimizers={disabled_optimizers!r} "
                            "must be a list of optimizer names, e.g. "
                            "['SkipLayerNormFusion'], or () to keep every fusion")
        providers = providers or ["CPUExecutionProvider"]
        if disabled_optimizers is None:  # by the providers the session will have
            names = [p[0] if isinstance(p, tuple) else p for p in providers]
            installed = set(ort.get_available_providers())
            usable = [n for n in names if n in installed]
            cpu_only = all(n == "CPUExecutionProvider" for n in usable)
            disabled_optimizers = CPU_DISABLED_OPTIMIZERS if cpu_only else ()
        self.disabled_optimizers = tuple(disabled_optimizers)
        self.session = ort.InferenceSession(source, sess_options=session_options,
                                            providers=providers,
                                            disabled_optimizers=list(self.disabled_optimizers))
        self.input_names = [i.name for i in self.session.get_inputs()]
        self._types = {i.name: _NUMPY.get(i.type) for i in self.session.get_inputs()}
        # each input's sizes: an int where the graph fixes it, None where it is symbolic
        self._shapes = {i.name: [d if isinstance(d, int) else None for d in i.shape]
                        for i in self.session.get_inputs() if isinstance(i.shape, list)}
        self.output_names = [o.name for o in self.session.get_outputs()]
        meta = self.session.get_modelmeta().custom_metadata_map
        self._out_spec = _load_spec(meta.get("lowbit.output_spec"))
        #: positions of the model's None outputs among the output leaves (no graph output)
        self._none_leaves: list[int] = json.loads(meta.get("lowbit.output_none") or "[]")
        #: keyword flags that were constants at export (``use_cache=False``): accepted with
        #: the same value, refused with another
        self.constants: dict[str, Any] = _load_constants(meta.get("lowbit.constants"))

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("OnnxRuntimeModule holds a live ONNX Runtime session, which cannot be "
                        "copied or pickled: build another from the .onnx file "
                        "(OnnxRuntimeModule(path)), or call lowbit.backends.set_backend again")

    def __deepcopy__(self, memo: dict) -> Any:
        return self.__reduce_ex__(4)

    def _feeds(self, args: tuple, kwargs: dict[str, Any]) -> dict[str, np.ndarray]:
        if len(args) > len(self.input_names):
            raise TypeError(f"OnnxRuntimeModule: {len(args)} positional inputs, but the graph "
                            f"takes {len(self.input_names)}: {self.input_names}")
        named = dict(zip(self.input_names, args, strict=False))
        for key, value in kwargs.items():
            if value is None:
                continue
            if key not in self.input_names and key in self.constants:
                if value != self.constants[key] or type(value) is not type(self.constants[key]):
                    raise ValueError(f"OnnxRuntimeModule: {key}={value!r}, but the graph was "
                                     f"exported with {key}={self.constants[key]!r}, a constant "
                                     "in it; export again with the value you need")
                continue
            if key not in self.input_names:
                raise TypeError(f"OnnxRuntimeModule: unknown input {key!r}; the graph takes "
                                f"{self.input_names} (export with it to use it)")
            if key in named:
                raise TypeError(f"OnnxRuntimeModule: input {key!r} given twice")
            named[key] = value
        missing = [n for n in self.input_names if n not in named]
        if missing:
            raise TypeError(f"OnnxRuntimeModule: missing input(s) {missing}; the graph takes "
                            f"{self.input_names}")
        feeds = {}
        for name, value in named.items():
            if isinstance(value, torch.Tensor):  # (numpy has no bfloat16: widened first)
                value = value.detach().cpu()
                value = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
            array = np.asarray(value)
            self._check_shape(name, array.shape)
            dtype = self._types.get(name)
            feeds[name] = np.ascontiguousarray(array if dtype is None else array.astype(
                dtype, copy=False))
        return feeds

    def _check_shape(self, name: str, shape: tuple[int, ...]) -> None:
        """A clear error for a size the graph fixes (ONNX Runtime's names only the index)."""
        want = self._shapes.get(name)
        if want is None or (len(want) == len(shape) and all(
                d is None or d == n for d, n in zip(want, shape, strict=True))):
            return
        text = ", ".join("*" if d is None else str(d) for d in want)
        raise ValueError(f"OnnxRuntimeModule: input {name!r} has shape {tuple(shape)}; the ONNX "
                         f"graph takes ({text}) (* is dynamic; other sizes are the example "
                         "inputs' at export: export again with e.g. lowbit.export_onnx(..., "
                         "dynamic_axes=(0, 1)) for a variable sequence length)")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the session; see the class docstring for inputs and outputs."""
        outs = [torch.from_numpy(o) for o in self.session.run(None, self._feeds(args, kwargs))]
        if self._out_spec is not None:
            from torch.utils import _pytree

            leaves: list[Any] = list(outs)
            for i in self._none_leaves:
                leaves.insert(i, None)
            return _pytree.tree_unflatten(leaves, self._out_spec)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def extra_repr(self) -> str:
        return f"inputs={self.input_names}, providers={self.session.get_providers()}"


def _load_constants(text: str | None) -> dict[str, Any]:
    if not text:
        return {}
    import json

    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _load_spec(text: str | None) -> Any:
    if not text:
        return None
    from torch.utils import _pytree

    try:
        return _pytree.treespec_loads(text)
    except Exception:  # the output type is not importable here: plain tuple
        return None
