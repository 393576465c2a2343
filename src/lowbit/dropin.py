"""What keeps lowbit's replacement layers drop-in for model code that reads their attributes.

Model code reads layer attributes, not only outputs: ``transformers`` casts inputs to
``layer.weight.dtype`` in about 270 places (ViT casts ``pixel_values`` to the patch conv's
weight dtype, T5 its hidden states to ``wo.weight.dtype``). A quantized layer therefore
answers ``weight`` with a :class:`DequantizedWeight`: a tensor of the *float* dtype, shape
and device of the weight it replaced, with no storage of its own. Reading its metadata costs
~3 us and no memory; any op on it (``F.linear(x, layer.weight)``, ``weight.float()``,
``weight @ x``) dequantizes the integer codes for that op only and returns a plain tensor. In
place ops on it raise (they would change nothing). Why not a stored float copy: it would cost
the memory quantization saves; why not the dequantized tensor on each read: T5 reads it every
forward. The codes stay the buffer ``weight`` in ``state_dict`` and saved files (the format is
unchanged) and are read as ``layer.qweight``.

Also here: ``transformers``' GPT-2 ``Conv1D`` (a Linear with a transposed ``[in, out]``
weight) recognised without importing ``transformers``, which layers keep a subclass
forward lowbit must not drop, and the warning a quantized ``transformers`` model's
``save_pretrained`` gives (``from_pretrained`` would read its codes as float weights).
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map

__all__ = ["DequantizedWeight", "forward_override", "guard_save_pretrained", "is_depthwise_conv",
           "is_hf_conv1d", "linear_from_conv1d"]


class DequantizedWeight(torch.Tensor):
    """The float view of a quantized layer's weight: metadata now, values on use.

    Args:
        materialize: returns the dequantized weight (a plain float tensor of ``shape``).
        shape, dtype, device: what ``weight.shape`` / ``.dtype`` / ``.device`` report.
        label: names the layer in error messages.
        codes: the integer codes it presents (how the layer gets them back when a loader
            stores the view in their place, as accelerate's hooks do).

    Example:
        >>> w = torch.randn(3, 4)
        >>> view = DequantizedWeight(lambda: w, w.shape, torch.float32, w.device, "fc")
        >>> view.dtype, tuple(view.shape), torch.equal(view @ torch.ones(4), w @ torch.ones(4))
        (torch.float32, (3, 4), True)
    """

    _materialize: Callable[[], torch.Tensor]
    _label: str
    _codes: torch.Tensor | None

    @staticmethod
    def __new__(cls, materialize: Callable[[], torch.Tensor], shape: Any, dtype: torch.dtype,
                device: torch.device, label: str = "",
                codes: torch.Tensor | None = None) -> DequantizedWeight:
        view = torch.Tensor._make_wrapper_subclass(cls, tuple(shape), dtype=dtype, device=device,
                                                   requires_grad=False)
        view._materialize, view._label, view._codes = materialize, label, codes
        return view

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()

    __torch_function__ = torch._C._disabled_torch_function_impl

    def dequantize(self) -> torch.Tensor:  # type: ignore[override]
        """The dequantized weight as a plain tensor (what every op on the view uses)."""
        return self._materialize().to(self.dtype)

    @classmethod
    def __torch_dispatch__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func._schema.is_mutable:
            names = [a._label for a in (*args, *kwargs.values())
                     if isinstance(a, DequantizedWeight)]
            raise RuntimeError(
                f"{names[0] or 'a quantized layer'}: {func} would write to `weight`, the "
                "read-only dequantized view of the layer's integer codes (`qweight`); change the "
                "float model and quantize it again instead")

        def plain(a: Any) -> Any:
            return a.dequantize() if isinstance(a, DequantizedWeight) else a

        return func(*tree_map(plain, args), **tree_map(plain, kwargs))

    def __repr__(self, *args: Any, **kwargs: Any) -> str:  # type: ignore[override]
        return f"DequantizedWeight(layer={self._label!r}, {self.dequantize()!r})"


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is ``transformers``' ``Conv1D`` (GPT-2's Linear with an ``[in, out]``
    weight), recognised without importing ``transformers``.

    Example:
        >>> is_hf_conv1d(nn.Linear(2, 2)), is_hf_conv1d(nn.Conv1d(2, 2, 1))
        (False, False)
    """
    cls = type(module)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")
            and isinstance(getattr(module, "weight", None), torch.Tensor)
            and module.weight.dim() == 2 and hasattr(module, "nf"))


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` or ``transformers``' GPT-2 ``Conv1D`` (the Linear it is).

    Example:
        >>> is_linear_like(nn.Linear(2, 2)), is_linear_like(nn.Conv1d(2, 2, 1))
        (True, False)
    """
    return isinstance(module, nn.Linear) or is_hf_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``[out, in]`` weight of an ``nn.Linear``, or of ``transformers``' GPT-2 ``Conv1D``
    (stored ``[in, out]``: a transposed view, so writing into it writes the parameter).

    Example:
        >>> linear_weight(nn.Linear(4, 3)).shape
        torch.Size([3, 4])
    """
    return module.weight.t() if is_hf_conv1d(module) else module.weight


def linear_from_conv1d(module: nn.Module) -> nn.Linear:
    """An ``nn.Linear`` computing what ``transformers``' ``Conv1D`` computes (weight
    transposed once; a new parameter with the same ``requires_grad``).

    Example:
        >>> class Conv1D(nn.Module):  # stands for transformers.pytorch_utils.Conv1D
        ...     def __init__(self):
        ...         super().__init__(); self.nf = 3
        ...         self.weight, self.bias = nn.Parameter(torch.randn(4, 3)), None
        >>> fc = linear_from_conv1d(Conv1D())
        >>> fc.in_features, fc.out_features, fc.weight.shape
        (4, 3, torch.Size([3, 4]))
    """
    w, b = module.weight, getattr(module, "bias", None)
    fc = nn.Linear(w.shape[0], w.shape[1], bias=b is not None, device="meta", dtype=w.dtype)
    fc.weight = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
    if b is not None:
        fc.bias = nn.Parameter(b.detach().clone(), requires_grad=b.requires_grad)
    return fc


_BASES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding)

#: Subclasses whose own forward computes what the base layer's does (read in their source),
#: quantized as the base: transformers' ``FalconLinear`` (``x @ W.T + b``, every Linear of
#: Falcon but its head).
SAME_AS_BASE = frozenset({"transformers.models.falcon.modeling_falcon.FalconLinear"})


def forward_override(module: nn.Module) -> str | None:
    """``"Class.forward"`` when a subclass of a layer lowbit replaces defines its own forward
    (a scaled or positional embedding, a custom Linear), or ``"Class._conv_forward"`` when a
    conv subclass changes the convolution itself (custom padding, weight standardization):
    the replacement would drop it.

    Example:
        >>> class Scaled(nn.Embedding):
        ...     def forward(self, ids):
        ...         return super().forward(ids) * 2.0
        >>> forward_override(Scaled(4, 2)), forward_override(nn.Embedding(4, 2))
        ('Scaled.forward', None)
    """
    if f"{type(module).__module__}.{type(module).__qualname__}" in SAME_AS_BASE:
        return None
    for base in _BASES:
        if isinstance(module, base):
            for method in ("forward", "_conv_forward"):
                own = getattr(type(module), method, None)
                if own is not getattr(base, method, None):
                    return f"{type(module).__name__}.{method}"
            return None
    return None


def is_depthwise_conv(module: nn.Module) -> bool:
    """A conv whose groups equal its input channels (> 1): few weights per output channel,
    so INT4 costs them much more accuracy than other layers.

    Example:
        >>> is_depthwise_conv(nn.Conv2d(8, 8, 3, groups=8)), is_depthwise_conv(nn.Conv2d(8, 8, 3))
        (True, False)
    """
    return (isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups > 1
            and module.groups == module.in_channels)


class _QuantizedSavePretrained:
    """A lowbit-quantized ``transformers`` (or ``diffusers``) model's ``save_pretrained``: warns,
    then saves as the model class does.

    ``save_pretrained`` writes the integer codes under the float weights' names, and
    ``from_pretrained`` of the float architecture loads that file without an error (the scales
    listed as unexpected keys): the codes become float weights and the outputs are wrong
    (cosine -0.04 against the quantized model's on a 2-layer BERT). ``load_state_dict`` into
    the quantized model itself, which is how ``transformers.Trainer`` resumes its checkpoints,
    reads the file right, so the save goes ahead.
    """

    def __init__(self, model: nn.Module) -> None:
        self._model = weakref.ref(model)  # (a strong one would keep a deleted model alive
        # until the cycle collector ran: its tensors too)

    @property
    def model(self) -> nn.Module | None:
        """The model whose ``save_pretrained`` this is."""
        return self._model()

    def __reduce__(self) -> tuple[Any, ...]:  # pickled with its model (torch.save(model))
        return (_QuantizedSavePretrained, (self._model(),))

    def __deepcopy__(self, memo: dict[int, Any]) -> _QuantizedSavePretrained:
        model = self._model()  # a copy of the model gets its copy's (made first, in memo)
        return _QuantizedSavePretrained(memo.get(id(model), model))

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        model = self._model()
        if model is None:
            raise ReferenceError("lowbit: save_pretrained of a model that no longer exists")
        cls = type(model)
        warnings.warn(
            f"lowbit: {cls.__name__}.save_pretrained writes this quantized model's integer codes "
            "under the float weights' names; from_pretrained loads that file into the float "
            "model without an error, and its outputs are then wrong. Save it with "
            "lowbit.save(model, path) and load it with lowbit.load(path, "
            "model=<the architecture, e.g. AutoModel.from_config(config)>); the files written "
            "now are right only for load_state_dict into this quantized model (Trainer resume)",
            UserWarning, stacklevel=2)
        return cls.save_pretrained(model, *args, **kwargs)


def guard_save_pretrained(model: nn.Module) -> nn.Module:
    """Make a quantized model's ``save_pretrained`` (``transformers`` / ``diffusers``: a class
    method and a ``config``) warn before it writes a file ``from_pretrained`` misreads; other
    models are returned as they are.

    Example:
        >>> m = nn.Linear(2, 2)
        >>> guard_save_pretrained(m) is m and "save_pretrained" not in vars(m)
        True
    """
    if callable(getattr(type(model), "save_pretrained", None)) and hasattr(model, "config"):
        model.__dict__["save_pretrained"] = _QuantizedSavePretrained(model)
    return model
