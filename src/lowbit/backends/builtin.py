"""The built-in backends: ``reference``, ``native``, ``torch``, ``cuda``, ``onnxruntime``,
``torch.compile`` and ``aotinductor``, each with its availability check (package, CPU feature,
device, compiler).
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lowbit.backends.registry import Backend, register_backend

__all__ = ["AOTInductorModule", "DeviceModule"]


def _native_missing() -> str | None:
    from lowbit.native import load_native, native_status

    if load_native() is None:
        return f"lowbit's C kernels are not available: {native_status()['reason']}"
    return None


def _native_detail() -> str:
    from lowbit.kernels.select import ISA_KERNELS, int8_gemm
    from lowbit.native import selected_isa

    isa = selected_isa()
    int4 = ISA_KERNELS[isa][1] or "PyTorch's packed INT4 op"
    forms = (" (8-bit activations: sign trick, or a 7-bit part plus the outlying codes when "
             "most fit in 7 bits)" if isa == "avx2" else "")
    return (f"ISA path {isa}: INT8 GEMM {int8_gemm()}{forms}, INT4 {int4} (small M), fused C "
            "quantize / epilogue")


def _torch_detail() -> str:
    from lowbit.kernels.select import int8_gemm

    gemm = int8_gemm("torch")
    why = "" if gemm == "int_mm_s8s8" else " (torch._int_mm is not exact without VNNI)"
    return (f"INT8 GEMM {gemm}{why}; weight-only: _weight_int4pack_mm_for_cpu / "
            "_weight_int8pack_mm on bf16, else dequantize + GEMM")


class DeviceModule(nn.Module):
    """A module on another device, called with tensors on any device: inputs are moved to
    ``device``, outputs back to the first input's device.

    Example:
        >>> m = DeviceModule(nn.Linear(2, 2), "cpu")
        >>> m(torch.zeros(1, 2)).shape
        torch.Size([1, 2])
    """

    def __init__(self, module: nn.Module, device: str | torch.device) -> None:
        super().__init__()
        self.device = torch.device(device)
        self.module = module.to(self.device)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Move the inputs, call the module, move the outputs back."""
        first = next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
        home = first.device if first is not None else torch.device("cpu")

        def move(obj: Any, device: torch.device) -> Any:
            if isinstance(obj, torch.Tensor):
                return obj.to(device)
            if isinstance(obj, (tuple, list)):
                return type(obj)(move(o, device) for o in obj)
            if isinstance(obj, dict):
                return type(obj)({k: move(v, device) for k, v in obj.items()})
            return obj

        out = self.module(*move(args, self.device), **move(kwargs, self.device))
        return move(out, home)


def _cuda_missing() -> str | None:
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    return None


def _cuda_prepare(qmodel: nn.Module, example_inputs: Any) -> nn.Module:
    return DeviceModule(copy.deepcopy(qmodel), "cuda").eval()


def _onnx_missing() -> str | None:
    for package in ("onnx", "onnxruntime", "onnxscript"):  # (the exporter needs onnxscript)
        if importlib.util.find_spec(package) is None:
            return f"package {package} is not installed (pip install 'lowbit[onnx]')"
    try:
        module = importlib.import_module("lowbit.onnx_export")
    except ModuleNotFoundError as exc:
        if exc.name == "lowbit.onnx_export":
            return "lowbit.onnx_export not present"
        raise
    for name in ("export_onnx", "OnnxRuntimeModule"):
        if not hasattr(module, name):
            return f"lowbit.onnx_export has no {name}"
    return None


def _onnx_detail() -> str:
    import onnxruntime

    providers = ", ".join(onnxruntime.get_available_providers())
    return f"onnxruntime {onnxruntime.__version__}, {providers}"


def _onnx_prepare(qmodel: nn.Module, example_inputs: Any,
                  dynamic_axes: tuple[int, ...] = (0,)) -> nn.Module:
    from lowbit.onnx_export import OnnxRuntimeModule, export_onnx

    with tempfile.TemporaryDirectory(prefix="lowbit-ort-") as folder:
        path = Path(folder) / "model.onnx"
        export_onnx(qmodel, example_inputs, path, exact="auto",  # exact on this CPU
                    dynamic_axes=dynamic_axes)
        return OnnxRuntimeModule(str(path))  # the session has read the file (and its data)


def _compile_missing() -> str | None:
    cxx = os.environ.get("CXX", "c++")
    if not any(shutil.which(c) for c in (cxx, "g++", "clang++")):
        return f"no C++ compiler for TorchInductor ({cxx!r} not found; set CXX)"
    return None


#: The oldest torch whose AOTInductor compiles every lowbit layer: 2.9 fails to lower a static
#: convolution's op ("Cannot access data pointer of Tensor (e.g. FakeTensor ...)"); 2.11, 2.13
#: and 2.14 pass the backend's tests.
AOTI_MIN_TORCH = "2.11"


def _aoti_missing() -> str | None:
    if torch.torch_version.TorchVersion(torch.__version__) < AOTI_MIN_TORCH:
        return (f"torch {torch.__version__} is older than {AOTI_MIN_TORCH}, whose AOTInductor "
                f"compiles every lowbit layer (pip install 'torch>={AOTI_MIN_TORCH}')")
    return _compile_missing()


def _compile_prepare(qmodel: nn.Module, example_inputs: Any) -> nn.Module:
    return torch.compile(qmodel)


class AOTInductorModule(nn.Module):
    """A model compiled ahead of time by AOTInductor (``torch.export`` then
    ``torch._inductor.aoti_compile_and_package``), called like the model it came from.

    The compiled code calls each quantized layer as the op ``lowbit::quantized_layer``, which
    runs lowbit's kernels: it needs ``lowbit`` imported in the process that runs it. Only the
    batch axis is dynamic: every call is checked against the traced shapes and dtypes first,
    since the compiled library does not check them (a longer sequence would read past its
    buffers).

    Example:
        >>> import lowbit
        >>> q = lowbit.quantize_dynamic(nn.Sequential(nn.Linear(8, 4)))
        >>> m = lowbit.backends.set_backend(q, "aotinductor", torch.randn(2, 8))  # compiles C++
        >>> x = torch.randn(3, 8)
        >>> torch.equal(m(x), q(x))
        True
        >>> m(torch.randn(3, 9))
        Traceback (most recent call last):
        ...
        ValueError: aotinductor: input 0 has shape (3, 9) and dtype torch.float32 on cpu; the ...
    """

    def __init__(self, runner: Any,
                 inputs: dict[int | str, tuple[tuple, torch.dtype, torch.device]],
                 signature: inspect.Signature | None = None,
                 traced: tuple[tuple[str, ...], tuple[str, ...]] = ((), ())) -> None:
        super().__init__()
        self.runner = runner
        self.inputs = inputs  # position / keyword -> (shape, None where dynamic; dtype; device)
        self.signature = signature  # of the model's forward (None: calls pass through as is)
        self.traced = traced  # (names passed by position, names passed by keyword) when traced

    def __reduce_ex__(self, protocol: Any) -> Any:
        raise TypeError("AOTInductorModule holds a loaded compiled library, which cannot be "
                        "pickled: keep the .pt2 package (torch._inductor.aoti_compile_and_"
                        "package) and load it with torch._inductor.aoti_load_package, or call "
                        "lowbit.backends.set_backend again")

    def __deepcopy__(self, memo: dict) -> AOTInductorModule:
        """Another module on the same loaded library (it holds no state a call changes)."""
        twin = AOTInductorModule(self.runner, copy.deepcopy(self.inputs, memo), self.signature,
                                 self.traced)
        return twin.train(self.training)

    def _traced_form(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any]]:
        """``args`` / ``kwargs`` bound to the model's ``forward`` and rearranged as the example
        inputs passed them (the compiled program takes exactly that form)."""
        if self.signature is None:
            return args, kwargs
        try:
            bound = self.signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise TypeError(f"aotinductor: {exc} (the compiled model is called like the model "
                            "it came from)") from None
        bound.apply_defaults()
        values = dict(bound.arguments)
        params = self.signature.parameters
        for p in params.values():  # (**kwargs: its items are arguments of their own)
            if p.kind is p.VAR_KEYWORD:
                values.update(values.pop(p.name, {}))
        positional, keyword = self.traced
        for name, value in values.items():
            if (name not in positional and name not in keyword
                    and (name not in params or value is not params[name].default)):
                raise ValueError(f"aotinductor: argument {name!r} was not among the example "
                                 "inputs the model was compiled with; compile again with it")
        return tuple(values[n] for n in positional), {k: values.get(k) for k in keyword}

    def _check(self, key: int | str, t: Any) -> None:
        shape, dtype, device = self.inputs.get(key, (None, None, None))
        if shape is None:
            return
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"aotinductor: input {key} is a {type(t).__name__}; the model was "
                             "compiled with a tensor there: pass one, or compile again with an "
                             "example like this call")
        if t.dtype != dtype or t.device.type != device.type or t.dim() != len(shape) or any(
                d is not None and d != n for d, n in zip(shape, t.shape, strict=True)):
            want = ", ".join("*" if d is None else str(d) for d in shape)
            raise ValueError(f"aotinductor: input {key} has shape {tuple(t.shape)} and dtype "
                             f"{t.dtype} on {t.device.type}; the compiled model takes ({want}) "
                             f"{dtype} on {device.type} (* is dynamic; other sizes are those of "
                             "the example inputs: compile again with an example like this)")

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Check the inputs' shapes, run the compiled model (float tensors in and out)."""
        args, kwargs = self._traced_form(args, kwargs)
        for i, a in enumerate(args):
            self._check(i, a)
        for k, v in kwargs.items():
            self._check(k, v)
        return self.runner(*args, **kwargs)


def _traced_inputs(program: Any, model: nn.Module, args: tuple, kwargs: dict[str, Any]
                   ) -> dict[int | str, tuple[tuple, torch.dtype, torch.device]]:
    """Each top-level tensor input's traced shape (None on a symbolic axis), dtype and device,
    found by name: ``torch.export`` names an input's placeholder after its keyword or its
    parameter in ``forward``. An input whose placeholder is not found (nested or renamed) is
    not checked."""
    user = set(program.graph_signature.user_inputs)
    vals = {n.name: n.meta.get("val") for n in program.graph.nodes
            if n.op == "placeholder" and n.name in user}
    params = list(inspect.signature(model.forward).parameters)
    keyed = [(i, params[i] if i < len(params) else None, a) for i, a in enumerate(args)]
    keyed += [(k, k, v) for k, v in kwargs.items()]
    return {key: (tuple(d if isinstance(d, int) else None for d in val.shape), val.dtype,
                  val.device)
            for key, name, t in keyed if isinstance(t, torch.Tensor)
            and isinstance(val := vals.get(name), torch.Tensor) and val.dim() == t.dim()}


def _aoti_prepare(qmodel: nn.Module, example_inputs: Any,
                  dynamic_axes: tuple[int, ...] = (0,)) -> nn.Module:
    from lowbit._export_inputs import export_arguments, export_failure_hint

    args, kwargs, shapes = export_arguments(example_inputs, sorted(set(dynamic_axes)),
                                            "backend aotinductor")
    model = copy.deepcopy(qmodel).eval() if qmodel.training else qmodel  # (leave it as it is)
    try:
        program = torch.export.export(model, args, kwargs or None, dynamic_shapes=shapes)
    except Exception as exc:
        hint = export_failure_hint(exc)
        if not hint:
            raise
        raise RuntimeError(f"backend aotinductor: {hint}torch.export failed: {exc}") from exc
    inputs = _traced_inputs(program, qmodel, args, kwargs)
    signature = inspect.signature(qmodel.forward)
    params = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
    if any(p.kind is p.VAR_POSITIONAL for p in params) or len(args) > len(params):
        signature = None  # (*args: calls pass through as they come)
    traced = (tuple(p.name for p in params[:len(args)]), tuple(kwargs))
    with tempfile.TemporaryDirectory(prefix="lowbit-aoti-") as folder, \
            warnings.catch_warnings():
        # torch's own unpickling of the program's tree spec (not the user's concern)
        warnings.filterwarnings("ignore", ".*LeafSpec.*", FutureWarning)
        path = torch._inductor.aoti_compile_and_package(
            program, package_path=str(Path(folder) / "model.pt2"))
        runner = torch._inductor.aoti_load_package(path)  # (loaded: the file can go)
    return AOTInductorModule(runner, inputs, signature, traced)


register_backend(Backend(
    "reference", "pure PyTorch: integer GEMM as float64 over the codes, weight-only as "
    "dequantize + float op", "defines the expected numbers", lambda: None,
    layer_value="reference", detail=lambda: "pure PyTorch ops, any device"))
register_backend(Backend(
    "native", "lowbit's kernels for this CPU (the default)",
    "INT8 x INT8: bit-identical (LSTM / GRU: the gates' float32 rounding, within half an "
    "activation step); weight-only: int8 activations per group for INT4 (relative "
    "max deviation <= 1e-2; float32 rounding with int8_activations=False), bf16 activations "
    "(<= 1e-2) for weight-only INT8 up to 64 rows and, on CPUs with AMX, for INT4 above 1024 "
    "rows",
    _native_missing, layer_value="auto", detail=_native_detail))
register_backend(Backend(
    "torch", "PyTorch's own integer ops, no C kernels of lowbit",
    "INT8 x INT8: bit-identical; weight-only: bf16 packed ops (~1e-2 relative)",
    lambda: None, layer_value="torch", detail=_torch_detail))
register_backend(Backend(
    "cuda", "the model on a CUDA GPU (torch._int_mm where it takes the shape)",
    "INT8 x INT8: exact accumulators, float32 epilogue on the GPU (~1e-6 relative)",
    _cuda_missing, prepare=_cuda_prepare,
    detail=lambda: torch.cuda.get_device_name(0)))
register_backend(Backend(
    "onnxruntime", "exported to ONNX (QDQ / MatMulInteger / MatMulNBits), run by an ONNX "
    "Runtime InferenceSession", "within one output quantization step (ONNX rounds ties "
    "of x / scale its own way)", _onnx_missing, prepare=_onnx_prepare, detail=_onnx_detail,
    needs_inputs=True))
register_backend(Backend(
    "torch.compile", "torch.compile (Inductor) of the model: the quantized layers are the "
    "custom op lowbit::quantized_layer, the float ops between them compiled",
    "quantized layers bit-identical to their layer backend; compiled float ops may round "
    "differently (~1e-6 relative)", _compile_missing, prepare=_compile_prepare,
    detail=lambda: f"torch {torch.__version__}, Inductor"))
register_backend(Backend(
    "aotinductor", "torch.export, then AOTInductor compiles the program to a shared library "
    "ahead of time: the quantized layers are the op lowbit::quantized_layer, the float ops "
    "between them C++; no Python wrapper per call", "quantized layers bit-identical to their "
    "layer backend; compiled float ops may round differently (~1e-6 relative)",
    _aoti_missing, prepare=_aoti_prepare, needs_inputs=True,
    detail=lambda: f"torch {torch.__version__}, AOTInductor"))
