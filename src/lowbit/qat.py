"""Quantization-aware training: prepare a model with fake quantization, train it, convert it.

``QATPreparer(config).prepare_for_qat(model)`` returns a copy in which every quantizable
``Linear`` / ``Conv1d`` / ``Conv2d`` is a :class:`QATLayer`: the float layer (``base_layer``,
same parameters, same ``requires_grad``), a :class:`~lowbit.fake_quantize.FakeQuantize` on its
weight and one on its activation, a folded BatchNorm and a fused ReLU where present. The user's
optimizer, loop and loss stay unchanged. ``convert_to_quantized`` then builds, for every
``QATLayer``, the very integer module PTQ builds (:func:`lowbit.modules.convert_module`), fed
with the learned qparams.

Where the activation fake-quantizer sits, and why. A converted lowbit module quantizes **its
own input** with ``input_qparams`` and returns float (``docs/design.md``), so the tensor the
integer kernel consumes is the layer's input. Each ``QATLayer`` therefore fake-quantizes its
input (``input_quantizer``) with exactly the spec and qparams the converted module receives,
and its weight with the qparams stored in the module; the integer kernel then sees the same
codes as the QAT forward, bit for bit, and only float rounding in the GEMM separates the two.
This is the "output activation after the fused ReLU" of the issue seen from the consumer's
side: in ``conv -> BN -> ReLU -> pool -> conv`` the second conv's input quantizer sees the
first conv's post-ReLU output (max-pooling commutes with a monotone quantizer). An output-side
quantizer would have to hand its qparams to the next layer, which breaks as soon as the next
op is a residual add, a concat or the model's float output; the input side is exact in every
graph. The last layer's output is float in the converted model, so it is float in QAT too.

* ``mode="static"``: the input quantizer observes with a moving average (``activation_observer``)
  in training mode and its qparams become the converted module's ``input_scale`` /
  ``input_zero_point``.
* ``mode="dynamic"``: qparams are computed per token (per tensor for convs, as the converted
  conv does) from each input at run time; nothing is learned.
* ``mode="weight_only"``: no activation quantizer; the weight is fake-quantized in the converted
  module's ``[N, K]`` padded group layout.

Conv/Linear + BatchNorm (found by :func:`lowbit.traverse.find_fusions`) follow the standard QAT
folding (Jacob et al. 2018; ``torch.ao.nn.intrinsic.qat.ConvBn2d``): in training the weight is
scaled by ``gamma / sqrt(running_var + eps)`` before fake quantization, the conv output is
unscaled and the BatchNorm normalizes it with batch statistics (running statistics keep
updating); after ``freeze_bn_after`` steps (or :func:`freeze_bn_stats`, or with the BatchNorm
module itself in eval mode), and always in eval mode, the layer runs the folded weights of
:func:`lowbit.traverse.fold_bn_weights`, which is what conversion quantizes. In the
batch-statistics phase the rescaling ``gamma / sqrt(running_var + eps)`` is a constant for
autograd (``gamma`` learns through the BatchNorm's affine, as in the float model), which also
avoids three extra passes over the conv output in backward.
"""

from __future__ import annotations

import copy
import json
import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from lowbit._qmodule import QuantizedModuleBase, carry_hooks, has_hooks
from lowbit.calibrators import available_calibrators
from lowbit.config import QuantizationConfig, require_mapping
from lowbit.distributed import configure_qat_sync, qat_group, sync_batchnorm
from lowbit.dropin import guard_save_pretrained, is_hf_conv1d, linear_from_conv1d
from lowbit.fake_quantize import FakeQuantize
from lowbit.memory import trim_heap
from lowbit.modules import QuantizedConv2d, WeightOnlyConv2d, convert_module
from lowbit.modules_mha import expand_attention
from lowbit.modules_weight_only import _layout
from lowbit.ops import quantize_bias
from lowbit.ptq import QuantizationReport
from lowbit.qat_stats import QATStatistics, collect_statistics
from lowbit.reparam import SharedCopy, bake_reparametrizations, copy_model, weight_mask
from lowbit.traverse import (
    WEIGHTED_LAYERS,
    check_eager_model,
    disable_fused_fast_paths,
    find_fusions,
    fold_bn_weights,
    fusable_maxpool,
    plan_layers,
    relu_modules_to_remove,
)

__all__ = [
    "QATConfig",
    "QATLayer",
    "QATPreparer",
    "convert_qat",
    "freeze_bn_stats",
    "get_qat_statistics",
    "prepare_qat",
    "set_fake_quant_enabled",
    "set_observer_enabled",
]

log = logging.getLogger(__name__)



#: Attributes of the float layer a :class:`QATLayer` mirrors (model code reads them).
_LAYER_ATTRS = ("in_features", "out_features", "in_channels", "out_channels", "kernel_size",
                "stride", "padding", "dilation", "groups")


def _default_quantization() -> QuantizationConfig:
    return QuantizationConfig.int8_static()


def _not_int(value: Any) -> bool:
    return not isinstance(value, int) or isinstance(value, bool)  # True had counted as 1


@dataclass(frozen=True)
class QATConfig:
    """How a model is trained with fake quantization.

    Args:
        quantization: the target :class:`~lowbit.config.QuantizationConfig` (weights,
            activations, mode; ``skip_layers`` and ``layer_overrides`` set the spec or mode per
            layer or glob, ``None`` keeps a layer in float: partial QAT). Default INT8 static.
        activation_observer: calibrator name observing static activations during training
            (default ``"moving_average"``; ``quantization.calibrator`` is a PTQ setting).
        activation_observer_kwargs: its options, e.g. ``{"averaging_constant": 0.01}``.
        weight_observer: calibrator name for weights (default ``"minmax"``, per channel when the
            spec is). Weights are observed afresh at every step (the range of the current
            weights), except with ``"moving_average"``, which averages over steps as torch.ao
            does.
        learnable_scale: train the scales with the LSQ gradient (weights and static
            activations; not for frozen layers) through ``log_scale`` parameters, which the
            user's optimizer picks up from ``qat_model.parameters()``; the observers only
            initialize them.
        freeze_bn_after: training steps after which folded BatchNorms stop using batch
            statistics and stop updating their running statistics (``None``: never).
        freeze_observers_after: training steps after which ranges stop moving (``None``: never).
        record_statistics: keep per-step statistics (see :func:`get_qat_statistics`).
        statistics_every: record every n-th training step only (1: every step; larger values
            cut the small per-step cost of statistics on big runs).
        sync_every: under ``torch.distributed`` (DDP, FSDP), keep activation ranges and folded
            BatchNorm statistics identical across ranks: 1 all-reduces every step, n every
            n-th step, 0 never (see :func:`lowbit.distributed.configure_qat_sync`). No effect
            in a single process.

    Raises:
        ValueError: on an unknown observer name or a negative step count.

    Example:
        >>> cfg = QATConfig(learnable_scale=True, freeze_bn_after=200)
        >>> cfg.quantization.mode, QATConfig.from_dict(cfg.to_dict()) == cfg
        ('static', True)
    """

    quantization: QuantizationConfig = field(default_factory=_default_quantization)
    activation_observer: str = "moving_average"
    activation_observer_kwargs: Mapping[str, Any] = field(default_factory=dict)
    weight_observer: str = "minmax"
    learnable_scale: bool = False
    freeze_bn_after: int | None = None
    freeze_observers_after: int | None = None
    record_statistics: bool = True
    statistics_every: int = 1
    sync_every: int = 1

    def __post_init__(self) -> None:
        if not isinstance(self.quantization, QuantizationConfig):
            raise ValueError("QATConfig.quantization must be a QuantizationConfig, got "
                             f"{type(self.quantization).__name__}")
        for what in ("activation_observer", "weight_observer"):
            name = getattr(self, what)
            if name not in available_calibrators():
                raise ValueError(f"QATConfig.{what}={name!r} is unknown; use one of "
                                 f"{available_calibrators()}")
        for what in ("learnable_scale", "record_statistics"):  # "no" had been truthy
            if not isinstance(getattr(self, what), (bool, np.bool_)):
                raise ValueError(f"QATConfig.{what} must be True or False, got "
                                 f"{getattr(self, what)!r}")
            object.__setattr__(self, what, bool(getattr(self, what)))
        for what in ("freeze_bn_after", "freeze_observers_after"):
            value = getattr(self, what)
            if value is not None and (_not_int(value) or value < 0):
                raise ValueError(f"QATConfig.{what} must be a non-negative int or None, got "
                                 f"{value!r}")
        if _not_int(self.sync_every) or self.sync_every < 0:
            raise ValueError("QATConfig.sync_every must be an int >= 0 (1: every step, 0: never), "
                             f"got {self.sync_every!r}")
        if _not_int(self.statistics_every) or self.statistics_every < 1:
            raise ValueError("QATConfig.statistics_every must be a positive int, got "
                             f"{self.statistics_every!r}")
        object.__setattr__(self, "activation_observer_kwargs", dict(require_mapping(
            self.activation_observer_kwargs, "QATConfig.activation_observer_kwargs")))

    def __hash__(self) -> int:
        return hash((self.quantization, self.activation_observer, self.weight_observer,
                     self.learnable_scale, self.freeze_bn_after, self.freeze_observers_after,
                     self.record_statistics, self.statistics_every, self.sync_every,
                     tuple(sorted(self.activation_observer_kwargs))))

    def to_dict(self) -> dict[str, Any]:
        """JSON-compatible dict (the quantization config nested)."""
        return {"quantization": self.quantization.to_dict(),
                "activation_observer": self.activation_observer,
                "activation_observer_kwargs": dict(self.activation_observer_kwargs),
                "weight_observer": self.weight_observer, "learnable_scale": self.learnable_scale,
                "freeze_bn_after": self.freeze_bn_after,
                "freeze_observers_after": self.freeze_observers_after,
                "record_statistics": self.record_statistics,
                "statistics_every": self.statistics_every, "sync_every": self.sync_every}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> QATConfig:
        """Inverse of :meth:`to_dict`; unknown keys are refused by name."""
        if not isinstance(data, Mapping):
            raise ValueError(f"QATConfig.from_dict expects a dict of QATConfig fields (as "
                             f"QATConfig.to_dict() writes), got {type(data).__name__}: "
                             f"{data!r:.80}")
        data = dict(data)
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"QATConfig: unknown field(s) {sorted(unknown)}")
        if "quantization" in data:
            data["quantization"] = QuantizationConfig.from_dict(data["quantization"])
        return cls(**data)


class QATLayer(nn.Module):
    """A Linear / Conv1d / Conv2d trained with fake-quantized weight and input activation.

    ``y = relu?(op(input_quantizer(x), weight_quantizer(W'), b'))`` where ``W', b'`` are the
    weight and bias with the BatchNorm folded in (see the module docstring for training mode).

    Args:
        base_layer: the float layer (kept as is: same parameters and ``requires_grad``).
        config: the layer's resolved :class:`~lowbit.config.QuantizationConfig`.
        options: the :class:`QATConfig` (observers, LSQ, freezing, statistics).
        bn: a BatchNorm that directly follows the layer, folded into it.
        fused_relu: apply ReLU to the output (the model's ReLU module becomes ``Identity``).
        name: qualified layer name, used in errors and statistics.

    Raises:
        ValueError: when ``base_layer`` is not a Linear/Conv1d/Conv2d.

    Example:
        >>> layer = QATLayer(nn.Linear(8, 4), QuantizationConfig.int8_static(), name="fc")
        >>> y = layer.train()(torch.randn(5, 8))
        >>> y.shape, float(layer.input_quantizer.scale) > 0
        (torch.Size([5, 4]), True)
    """

    num_steps: torch.Tensor
    bn_frozen: torch.Tensor

    def __init__(self, base_layer: nn.Module, config: QuantizationConfig,
                 options: QATConfig | None = None, *, bn: nn.Module | None = None,
                 fused_relu: bool = False, name: str = "") -> None:
        super().__init__()
        options = options or QATConfig(quantization=config)
        self.hf_conv1d = is_hf_conv1d(base_layer)  # GPT-2 Conv1D: trained as its Linear
        if self.hf_conv1d:
            base_layer = linear_from_conv1d(base_layer)
        elif not isinstance(base_layer, WEIGHTED_LAYERS):
            raise ValueError(f"{name or '<unnamed>'}: QAT supports Linear, Conv1d, Conv2d and "
                             f"transformers' Conv1D, not {type(base_layer).__name__}")
        self.base_layer, self.bn, self.name = base_layer, bn, name
        for attr in _LAYER_ATTRS:  # what model code reads on the float layer (in_features, ...)
            if hasattr(base_layer, attr):
                setattr(self, attr, getattr(base_layer, attr))
        self._config = config  # frozen: deepcopy of the model shares it
        self.fused_relu = bool(fused_relu)
        self.freeze_bn_after = options.freeze_bn_after
        self.register_buffer("num_steps", torch.zeros((), dtype=torch.int64))
        # a torch.nn.utils.prune mask of the weight (set by prepare_for_qat): pruned stays zero
        self.register_buffer("weight_mask", None)
        self.register_buffer("bn_frozen", torch.tensor(False))
        self.sync_every, self.sync_group = 0, None  # lowbit.distributed.configure_qat_sync
        weight = base_layer.weight
        self._k = weight[0].numel()
        self._weight_only = config.mode == "weight_only"
        wspec, self._kp = config.weights, self._k
        if self._weight_only:  # the converted module's [N, Kp] layout (padding, small groups)
            wspec, self._kp = _layout(self._k, config.weights)
        learn = options.learnable_scale and weight.requires_grad
        self.weight_quantizer = FakeQuantize(
            wspec, options.weight_observer, learnable_scale=learn,
            reset_observer=options.weight_observer != "moving_average",
            freeze_observer_after=options.freeze_observers_after,
            record_statistics=options.record_statistics,
            statistics_every=options.statistics_every, name=f"{name}.weight")
        self.input_quantizer: FakeQuantize | None = None
        if config.activations is not None:
            aspec = config.activations
            dynamic = config.mode == "dynamic"
            if dynamic and not isinstance(base_layer, nn.Linear):
                aspec = aspec.with_(granularity="per_tensor")  # as QuantizedConv2d does
            self.input_quantizer = FakeQuantize(
                aspec, options.activation_observer,
                observer_kwargs=None if dynamic else options.activation_observer_kwargs,
                dynamic=dynamic, learnable_scale=learn and not dynamic,
                freeze_observer_after=options.freeze_observers_after,
                record_statistics=options.record_statistics,
                statistics_every=options.statistics_every, name=f"{name}.input")
        self.to(weight.device)  # the new quantizers' buffers join the layer (e.g. on CUDA)
        with torch.no_grad():  # weight qparams from the pretrained weights, right away
            self.weight_quantizer.observe(self._weight_view(self._folded()[0]))

    @property
    def config(self) -> QuantizationConfig:
        """The layer's resolved quantization config."""
        return self._config

    @property
    def weight(self) -> torch.Tensor:
        """The float weight QAT trains (BatchNorm not folded in; GPT-2 ``Conv1D``: its
        ``[in, out]`` layout), for model code that reads ``layer.weight.dtype``."""
        w = self.base_layer.weight
        return w.t() if self.hf_conv1d else w

    @property
    def bias(self) -> torch.Tensor | None:
        """The float bias of the wrapped layer."""
        return self.base_layer.bias

    # ------------------------------------------------------------------ weights
    def _masked_weight(self) -> torch.Tensor:
        """The layer's weight, times its pruning mask when it has one."""
        w, mask = self.base_layer.weight, self.weight_mask
        return w if mask is None else w * mask.to(w.dtype)

    def _folded(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Weight (pruning mask applied) and bias with the BatchNorm (running statistics)
        folded in."""
        w, b = self._masked_weight(), self.base_layer.bias
        if self.bn is None:
            return w, b
        return fold_bn_weights(w, b, self.bn)

    def _weight_view(self, w: torch.Tensor) -> torch.Tensor:
        """The tensor the weight quantizer sees: ``w``, or its padded ``[N, Kp]`` view."""
        if not self._weight_only:
            return w
        w2 = w.reshape(w.shape[0], -1)  # (N, K)
        return F.pad(w2, (0, self._kp - self._k)) if self._kp > self._k else w2  # (N, Kp)

    def _quantize_weight(self, w: torch.Tensor) -> torch.Tensor:
        wq = self.weight_quantizer(self._weight_view(w))
        if self._weight_only:
            wq = wq[:, : self._k].reshape(w.shape)
        return wq

    def _op(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        if isinstance(self.base_layer, nn.Linear):
            return F.linear(x, w, b)
        return self.base_layer._conv_forward(x, w, b)

    @property
    def bn_is_frozen(self) -> bool:
        """True when the BatchNorm runs folded with its running statistics in training too."""
        if self.bn is None:
            return True
        late = self.freeze_bn_after is not None and int(self.num_steps) >= self.freeze_bn_after
        return bool(self.bn_frozen) or late

    def freeze_bn(self, frozen: bool = True) -> None:
        """Stop (or resume) batch statistics and running-statistics updates of the folded BN."""
        self.bn_frozen.fill_(bool(frozen))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Fake-quantize the input and the (folded) weight, run the float op, fused ReLU.

        Inside ``torch.compile`` the layer runs eagerly (its observers, statistics and
        BatchNorm folding are Python state dynamo cannot trace): the rest of the model
        compiles around it."""
        # torch.compiler.is_compiling(), not the flag behind it: dynamo answers the call as a
        # constant, but guarded a read of the flag, and that guard failed on every run (the
        # frame recompiled on each call until dynamo's recompile limit)
        if torch.compiler.is_compiling():
            return _eager_forward()(self, x)
        return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_quantizer is not None:
            x = self.input_quantizer(x)
        bn = self.bn
        if bn is not None and self.training and bn.training and not self.bn_is_frozen:
            y = self._forward_bn_training(x, bn)
            group = qat_group(self)
            if group is not None and (int(self.num_steps) + 1) % self.sync_every == 0:
                sync_batchnorm(bn, group)  # running statistics equal on every rank
        else:
            w, b = self._folded()
            wq = self._quantize_weight(w)
            y = self._op(x, wq, self._static_bias(b))
        if self.training:
            self.num_steps += 1
        # F.relu saves its output for backward: an in-place op after this layer (torchvision's
        # shared ReLU(inplace=True)) would break autograd; threshold saves its input instead
        return F.threshold(y, 0.0, 0.0) if self.fused_relu else y

    def _static_bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        """The bias as the converted static layer adds it: int32 codes at scale ``s_x * s_w``
        (:func:`lowbit.ops.quantize_bias`), with a straight-through gradient; ``b`` otherwise."""
        iq = self.input_quantizer
        if (b is None or iq is None or iq.dynamic or self._weight_only
                or not bool(iq.initialized) or not bool(iq.fake_quant_enabled)
                or not bool(self.weight_quantizer.fake_quant_enabled)):
            return b
        s_w = self.weight_quantizer.scale.detach().float().reshape(-1)
        qb = quantize_bias(b.detach().float(), iq.scale.detach().float().reshape(()), s_w)
        if qb is None:
            return b
        return (qb[0].float() * qb[1]).to(b.dtype) + (b - b.detach())  # value: the codes'

    def _forward_bn_training(self, x: torch.Tensor, bn: nn.Module) -> torch.Tensor:
        weight = self._masked_weight()
        with torch.no_grad():  # gamma / sqrt(running_var + eps): a constant rescaling here;
            # gamma gets its gradient from the BatchNorm's affine, as in the float model
            gamma = bn.weight if bn.weight is not None else torch.ones_like(bn.running_var)
            factor = gamma.double() / torch.sqrt(bn.running_var.double() + bn.eps)  # (C,)
            factor = torch.where(factor == 0, torch.ones_like(factor), factor)
            inv = (1.0 / factor).to(weight.dtype)
            factor = factor.to(weight.dtype)
        w_scaled = weight * factor.reshape([-1] + [1] * (weight.dim() - 1))  # folded scale
        y = self._op(x, self._quantize_weight(w_scaled), None)
        shape = [1, -1] + [1] * (y.dim() - 2)
        y = y * inv.reshape(shape)  # back to conv(x, W), up to the weight's quantization
        if self.base_layer.bias is not None:
            y = y + self.base_layer.bias.reshape(shape)
        return bn(y)  # batch statistics; running statistics update

    # ------------------------------------------------------------------ conversion
    def to_float(self) -> nn.Module:
        """A float copy of the layer with the BatchNorm folded in (what gets quantized)."""
        layer = copy.deepcopy(self.base_layer)
        with torch.no_grad():
            w, b = self._folded()
            layer.weight = nn.Parameter(w.detach().clone(), requires_grad=False)
            layer.bias = None if b is None else nn.Parameter(b.detach().clone(),
                                                             requires_grad=False)
        return layer

    def to_quantized(self, backend: str = "auto") -> nn.Module:
        """The integer module PTQ would build, with this layer's learned qparams.

        Raises:
            ValueError: when the static input quantizer never saw data.
        """
        kwargs: dict[str, Any] = {"fused_relu": self.fused_relu, "name": self.name,
                                  "weight_qparams": self.weight_quantizer.qparams(),
                                  "backend": backend}
        iq = self.input_quantizer
        extra: dict[str, Any] = {"qat": True,
                                 "learnable_scale": self.weight_quantizer.learnable_scale}
        if self.hf_conv1d:
            extra["hf_conv1d"] = True
        if iq is not None and not iq.dynamic:
            if not bool(iq.initialized):
                raise ValueError(f"{self.name}: its input quantizer never saw data, so the input "
                                 "range is unknown; run at least one batch through the QAT model "
                                 "before converting, or keep the layer in float with "
                                 f"layer_overrides={{{self.name!r}: None}}")
            kwargs["input_qparams"] = iq.qparams()
            assert iq.observer is not None
            extra["calibrator"] = f"qat:{iq.observer.name}"
            extra["observed_range"] = [float(iq.observer.min_val), float(iq.observer.max_val)]
        kwargs["meta_extra"] = extra
        return convert_module(self.to_float(), self.config, **kwargs)

    def extra_repr(self) -> str:
        return (f"name={self.name!r}, mode={self.config.mode}, fused_relu={self.fused_relu}, "
                f"folded_bn={self.bn is not None}")


_EAGER_FORWARD: Any = None


def _eager_forward() -> Any:
    """``QATLayer._forward`` marked for dynamo to run eagerly; made on first use (when dynamo
    is loaded anyway): ``torch.compiler.disable`` imports dynamo, which ``import lowbit``
    must not pay for (2 s)."""
    global _EAGER_FORWARD
    if _EAGER_FORWARD is None:
        _EAGER_FORWARD = torch.compiler.disable(QATLayer._forward)
    return _EAGER_FORWARD


class QATPreparer:
    """Prepare a float model for quantization-aware training and convert it afterwards.

    Args:
        config: a :class:`QATConfig`, or a :class:`~lowbit.config.QuantizationConfig` used with
            the default QAT options (``None``: INT8 static).
        process_group: the ``torch.distributed`` group QAT ranges are synchronized over
            (default: the world; see ``QATConfig.sync_every``).

    Example:
        >>> model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
        >>> preparer = QATPreparer(QuantizationConfig.int8_static())
        >>> qat_model = preparer.prepare_for_qat(model)
        >>> opt = torch.optim.SGD(qat_model.parameters(), lr=0.1)  # the user's own optimizer
        >>> for _ in range(3):
        ...     opt.zero_grad()
        ...     loss = qat_model(torch.randn(8, 16)).pow(2).mean()
        ...     loss.backward()
        ...     opt.step()
        >>> q = preparer.convert_to_quantized(qat_model)
        >>> type(q[0]).__name__, q[0].qweight.dtype, q[0].fused_relu
        ('QuantizedLinear', torch.int8, True)
    """

    def __init__(self, config: QATConfig | QuantizationConfig | None = None, *,
                 process_group: Any = None) -> None:
        if config is None:
            config = QATConfig()
        elif isinstance(config, QuantizationConfig):
            config = QATConfig(quantization=config)
        elif not isinstance(config, QATConfig):
            raise TypeError("QATPreparer(config=...) must be a QATConfig or QuantizationConfig, "
                            f"got {type(config).__name__}")
        self.config = config
        self.process_group = process_group

    def prepare_for_qat(self, model: nn.Module) -> nn.Module:
        """A copy of ``model`` with every quantizable layer replaced by a :class:`QATLayer`.

        BatchNorms folded into a layer and ReLU modules fused into one become ``nn.Identity``;
        layers kept in float by the config (or that lowbit cannot quantize) are left as they
        are and listed in ``qat_model.lowbit_report``. The copy keeps the training mode of
        ``model``.

        Raises:
            TypeError: when ``model`` is not an ``nn.Module``.
            ValueError: NaN/Inf weights or an unsupported spec (the layer is named).
        """
        check_eager_model(model, "prepare_for_qat")
        qat = _copy_model(model)
        fusions = find_fusions(qat)
        expand_attention(qat)  # nn.MultiheadAttention: its projections as Linear children
        plans = plan_layers(qat, self.config.quantization, None, fusions)
        planned = [n for n, p in plans.items() if p.status == "quantized"]
        masks = {n: m for n in planned if (m := weight_mask(qat.get_submodule(n))) is not None}
        baked = bake_reparametrizations(qat, planned)  # weight_norm / spectral_norm / prune
        # (QAT applies a pruning mask itself: pruned weights stay zero while training)
        if baked:
            log.info("prepare_for_qat: %d layers train plain weights (weight_norm / "
                     "spectral_norm / pruning folded in; a pruning mask still applies): %s",
                     len(baked), ", ".join(baked))
        fused: set[str] = set()
        for name, plan in plans.items():
            if plan.status != "quantized":
                continue
            if plan.shared_with:  # a second name of a shared layer: the same QAT layer
                qat.set_submodule(name, qat.get_submodule(plan.shared_with))
                continue
            module = qat.get_submodule(name)
            if not isinstance(module, WEIGHTED_LAYERS) and not is_hf_conv1d(module):
                plan.config, plan.status = None, "skipped"
                plan.reason = (f"QAT covers Linear/Conv1d/Conv2d; {plan.module_type} kept in "
                               "float (quantize it after conversion with PTQ)")
                continue
            assert plan.config is not None
            bn = qat.get_submodule(plan.folded_bn) if plan.folded_bn else None
            layer = carry_hooks(module, QATLayer(module, plan.config, self.config, bn=bn,
                                                 fused_relu=plan.fused_relu, name=name))
            if name in masks:
                layer.weight_mask = masks[name].to(layer.weight.device)
            layer.train(module.training)
            if not name:
                qat = layer
                break
            qat.set_submodule(name, layer)
            if plan.folded_bn:
                qat.set_submodule(plan.folded_bn, nn.Identity())
            if plan.fused_relu:
                fused.add(name)
        if isinstance(qat, nn.Module) and not isinstance(qat, QATLayer):
            for relu in relu_modules_to_remove(fusions, fused):
                qat.set_submodule(relu, nn.Identity())
        configure_qat_sync(qat, self.config.sync_every, self.process_group)
        report = QuantizationReport(list(plans.values()), fusions.method, fusions.note)
        disable_fused_fast_paths(qat)  # its fused path reads linear1.weight, a QAT layer's
        qat.lowbit_report = report
        qat.lowbit_qat_config_json = json.dumps(self.config.to_dict(), sort_keys=True)
        # max-pools that convert_qat runs inside their conv, as PTQ does (training keeps them)
        qat.lowbit_qat_pools = {n: p for n, p in fusions.pool_after.items() if n in fused
                                or (n in plans and plans[n].status == "quantized")}
        # the ReLU modules fused into a layer, to put back where that layer stays float
        removed = relu_modules_to_remove(fusions, fused) if not isinstance(qat, QATLayer) else {}
        qat.lowbit_qat_relus = {n: r for n, r in fusions.relu_after.items() if r in removed}
        n = len(report.quantized)
        if n == 0:
            log.warning("prepare_for_qat: no layer to quantize under this config")
        log.info("lowbit QAT: %d layers prepared, %d FP32 by request, %d skipped", n,
                 len(report.fp32), len(report.skipped))
        return qat

    def convert_to_quantized(self, qat_model: nn.Module, *, backend: str = "auto"
                             ) -> nn.Module:
        """Replace every :class:`QATLayer` by its integer module; no ``FakeQuantize`` remains.

        Weights are quantized with the weight quantizer's qparams (learned or observed),
        static inputs with the input quantizer's; the QAT model is not modified.

        Args:
            qat_model: a model from :meth:`prepare_for_qat` (trained or not).
            backend: ``"auto"`` (fast integer kernels) or ``"reference"``.

        A static layer whose input quantizer never saw data, where others did (a head that
        reads its weight and never calls it, a branch training never took), stays float with a
        ``RuntimeWarning``, as :func:`lowbit.quantize_static` keeps a layer no calibration
        batch reached; the returned model's report lists it as skipped.

        Returns:
            The quantized copy in eval mode, with ``lowbit_report`` attached.

        Raises:
            ValueError: when no static layer's input quantizer saw data (the model was not
                run), or one with a functional fused ReLU did not.
        """
        return convert_qat(qat_model, backend=backend)

    def get_qat_statistics(self, qat_model: nn.Module) -> QATStatistics:
        """Per-quantizer, per-step statistics: see :func:`get_qat_statistics`."""
        return get_qat_statistics(qat_model)


def _check_convertible(qat_model: nn.Module) -> None:
    """Refuse, with what to do, a model :func:`convert_qat` would return unchanged."""
    if not isinstance(qat_model, nn.Module):
        raise TypeError(f"convert_qat: expected the nn.Module prepare_qat returned, got "
                        f"{type(qat_model).__name__}")
    if any(isinstance(m, QATLayer) for m in qat_model.modules()):
        return
    if any(isinstance(m, QuantizedModuleBase) for m in qat_model.modules()):
        raise ValueError("convert_qat: the model has quantized layers and no QAT layer: it was "
                         "already converted. Convert the QAT model (the one prepare_qat "
                         "returned) instead, or use this model as it is")
    if not hasattr(qat_model, "lowbit_qat_config_json"):
        raise ValueError("convert_qat: the model has no QAT layer: prepare it first with "
                         "lowbit.prepare_qat(model, config), train it, then convert it")


def convert_qat(qat_model: nn.Module, *, backend: str = "auto") -> nn.Module:
    """Convert a QAT model to integer modules (see :meth:`QATPreparer.convert_to_quantized`).

    Example:
        >>> qat = prepare_qat(nn.Sequential(nn.Linear(8, 8)), QuantizationConfig.int8_dynamic())
        >>> type(convert_qat(qat)[0]).__name__
        'QuantizedLinear'
    """
    _check_convertible(qat_model)
    report = getattr(qat_model, "lowbit_report", None)  # (immutable configs inside: shared)
    sharing = SharedCopy(qat_model, {} if report is None else {id(report): report})
    model = sharing.model  # the QAT layers' weights are read, never copied: they are replaced
    if isinstance(model, QATLayer):
        out = carry_hooks(model, model.to_quantized(backend))
        out.lowbit_report = getattr(qat_model, "lowbit_report", None)
        return out.eval()
    relus = getattr(qat_model, "lowbit_qat_relus", {})  # (fused into layers, by layer)
    unseen = _unobserved_layers(model, relus)
    converted: dict[int, nn.Module] = {}  # a shared QAT layer converts once, stays shared
    for name, module in list(model.named_modules(remove_duplicate=False)):
        if isinstance(module, QATLayer):
            if id(module) not in converted:
                converted[id(module)] = carry_hooks(module, module.to_float() if id(module)
                                                    in unseen else module.to_quantized(backend))
            model.set_submodule(name, converted[id(module)])
    leftovers = [n for n, m in model.named_modules() if isinstance(m, FakeQuantize)]
    if leftovers:
        raise ValueError(f"convert_qat: FakeQuantize modules outside QAT layers remain at "
                         f"{leftovers}; remove them or prepare the model with QATPreparer")
    _fuse_maxpools(model, getattr(qat_model, "lowbit_qat_pools", {}))
    if unseen:
        _keep_unobserved_float(model, unseen, relus)
    disable_fused_fast_paths(model)
    sharing.unshare(model.modules())  # float layers: their own weights, not the QAT model's
    trim_heap()
    return guard_save_pretrained(model).eval()


_UNSEEN = ("not reached by any training or calibration batch, so its input range is unknown; "
           "kept in float")


def _unobserved_layers(model: nn.Module, relus: Mapping[str, str]) -> dict[int, str]:
    """The static QAT layers whose input quantizer never saw data (``id -> name``), where
    other static layers did: they stay float, as :func:`lowbit.quantize_static` keeps a layer
    no calibration batch reached (e.g. a head that reads a layer's weight and never calls it).
    Where no static layer saw data the model was not run at all, and where a layer's fused
    ReLU was functional (no module to put back), ``to_quantized`` refuses."""
    static = {id(m): m for m in model.modules() if isinstance(m, QATLayer)
              and m.input_quantizer is not None and not m.input_quantizer.dynamic}
    unseen = {i: m.name for i, m in static.items() if not bool(m.input_quantizer.initialized)}
    if len(unseen) == len(static):
        return {}
    return {i: n for i, n in unseen.items() if not static[i].fused_relu or n in relus}


def _keep_unobserved_float(model: nn.Module, unseen: dict[int, str],
                           relus: Mapping[str, str]) -> None:
    """Warn about the layers :func:`_unobserved_layers` kept float, put back the ReLU modules
    fused into them, and record them as skipped in the model's own copy of the report."""
    for name in unseen.values():
        warnings.warn(f"{name or '<model>'}: {_UNSEEN}. Run batches that call it before "
                      "converting", RuntimeWarning, stacklevel=3)
        relu = relus.get(name)
        if relu is not None:
            model.set_submodule(relu, nn.ReLU())
    report = getattr(model, "lowbit_report", None)
    if isinstance(report, QuantizationReport):
        report = copy.deepcopy(report)  # (the QAT model's report stays as it is)
        for row in report.rows:
            if row.name in unseen.values() or row.shared_with in unseen.values():
                row.config, row.status, row.reason = None, "skipped", _UNSEEN
                row.fused_relu, row.fused_gelu, row.fused_pool = False, None, None
        model.lowbit_report = report


def _fuse_maxpools(model: nn.Module, pools: dict[str, str]) -> None:
    """Run each non-overlapping ``MaxPool2d`` that follows a converted conv inside that conv
    (as :mod:`lowbit.ptq` does: a max picks one input, so the values are the same; at batch 1
    the separate module costs about as much as a small conv)."""
    for name, pool in pools.items():
        try:
            layer, pool_module = model.get_submodule(name), model.get_submodule(pool)
        except AttributeError:  # the model was edited after prepare_qat
            continue
        size = fusable_maxpool(pool_module)
        if (type(layer) in (QuantizedConv2d, WeightOnlyConv2d) and size and not
                has_hooks(pool_module) and not layer.geometry.get("fused_maxpool")):
            layer.geometry["fused_maxpool"] = size
            model.set_submodule(pool, nn.Identity())


def _copy_model(model: nn.Module) -> nn.Module:
    """Deep copy that shares an attached ``lowbit_report`` (immutable configs inside it)."""
    report = getattr(model, "lowbit_report", None)
    memo = {} if report is None else {id(report): report}
    return copy_model(model, memo)


def prepare_qat(model: nn.Module, config: QATConfig | QuantizationConfig | None = None
                ) -> nn.Module:
    """One-line QAT: ``QATPreparer(config).prepare_for_qat(model)``.

    Example:
        >>> qat = prepare_qat(nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU()))
        >>> type(qat[0]).__name__, type(qat[1]).__name__
        ('QATLayer', 'Identity')
    """
    return QATPreparer(config).prepare_for_qat(model)


def get_qat_statistics(qat_model: nn.Module) -> QATStatistics:
    """Per layer and quantizer: scale/zero-point per training step, observed ranges, and the
    gradient flow through each fake-quant node (clipped fraction, gradient norms).

    Example:
        >>> qat = prepare_qat(nn.Sequential(nn.Linear(4, 4))).train()
        >>> qat(torch.randn(3, 4)).sum().backward()
        >>> stats = get_qat_statistics(qat)
        >>> sorted(stats.traces), stats.traces["0.input"]["step"]
        (['0.input', '0.weight'], [1])
    """
    return collect_statistics(qat_model)


def _quantizers(model: nn.Module) -> list[FakeQuantize]:
    return [m for m in model.modules() if isinstance(m, FakeQuantize)]


def set_observer_enabled(model: nn.Module, enabled: bool = True) -> None:
    """Let every ``FakeQuantize`` in ``model`` update its range in training, or freeze them all.

    Example:
        >>> qat = prepare_qat(nn.Sequential(nn.Linear(4, 4)))
        >>> set_observer_enabled(qat, False); bool(qat[0].input_quantizer.observer_enabled)
        False
    """
    for fq in _quantizers(model):
        fq.enable_observer(enabled)


def set_fake_quant_enabled(model: nn.Module, enabled: bool = True) -> None:
    """Turn fake quantization of every ``FakeQuantize`` in ``model`` on or off (observers go on).

    Example:
        >>> qat = prepare_qat(nn.Sequential(nn.Linear(4, 4)))
        >>> set_fake_quant_enabled(qat, False); bool(qat[0].weight_quantizer.fake_quant_enabled)
        False
    """
    for fq in _quantizers(model):
        fq.enable_fake_quant(enabled)


def freeze_bn_stats(model: nn.Module, frozen: bool = True) -> None:
    """Run every folded BatchNorm of ``model`` on its running statistics (or resume updating).

    Example:
        >>> m = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
        >>> qat = prepare_qat(m); freeze_bn_stats(qat); qat[0].bn_is_frozen
        True
    """
    for m in model.modules():
        if isinstance(m, QATLayer):
            m.freeze_bn(frozen)
