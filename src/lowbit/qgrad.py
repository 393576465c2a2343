"""Input gradients through frozen quantized layers (what QLoRA needs), on request only.

A quantized layer is an inference module: its integer kernels record no autograd graph. When
its input requires grad (an adapter or a float layer before it trains), the layer's ``forward``
hands the call to :func:`frozen_forward` instead, which runs the same integer kernels (same
output bits) and gives the input the gradient of the layer with its *dequantized* weight::

    grad_x = (grad_y * act'(y)) @ W_hat        # W_hat = (q - zp) * scale, [N, K]

- The activation quantizer of INT8 layers passes gradients straight through (STE); a static
  layer zeroes them where its input was clamped, as ``torch.fake_quantize_per_tensor_affine``.
- ``W_hat`` is built in the backward pass and dropped right after it: the forward pass never
  materialises a float weight and nothing float is kept per layer (memory is QLoRA's point).
- Saved per call: nothing for a plain linear layer, a bool mask for a fused ReLU or a static
  activation quantizer, the input for a fused GELU (its derivative needs the pre-activation) and
  for convolutions (their backward re-runs the float convolution under autograd).
- Weights, scales and zero-points are buffers: they never get gradients and never change.

In inference mode, under ``no_grad`` or for inputs that do not require grad, the layers skip
this module entirely (no autograd cost, the forward path unchanged).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["frozen_forward", "input_grad"]


def frozen_forward(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module.forward(x)`` on its integer kernels, differentiable w.r.t. ``x``.

    Args:
        module: a lowbit quantized linear or conv layer (it calls this itself when ``x``
            requires grad and grad mode is on).
        x: the float input.

    Returns:
        The layer's output (bit-identical to the inference path) carrying the gradient to ``x``
        through the dequantized weight.

    Example:
        >>> from lowbit.config import QuantizationConfig
        >>> from lowbit.modules import QuantizedLinear
        >>> q = QuantizedLinear.from_float(nn.Linear(8, 4), QuantizationConfig.int8_dynamic())
        >>> x = torch.randn(3, 8, requires_grad=True)
        >>> q(x).sum().backward()  # calls frozen_forward
        >>> torch.allclose(x.grad, q.dequantize_weight().sum(0).expand(3, 8))
        True
        >>> with torch.no_grad():
        ...     torch.equal(q(x), q.forward(x.detach()))
        True
    """
    k = getattr(module, "in_features", None)
    if k is not None and x.dim() != 2 and x.dim() > 0 and x.shape[-1] == k:
        # a Linear computes row by row: the Function sees the 2-D rows, and the view back to
        # x's batch shape is made here, so the output may be written in place as nn.Linear's
        # (a view made inside a custom Function may not: Wav2Vec2's SpecAugment masking)
        y = _FrozenQuantized.apply(x.reshape(-1, k), module)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    return _FrozenQuantized.apply(x, module)


def _is_conv(module: nn.Module) -> bool:
    return hasattr(module, "geometry")


def _static_mask(module: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """Where a static activation quantizer did not clamp ``x`` (None: it never clamps)."""
    if getattr(module, "mode", None) != "static":
        return None
    spec = module.act_spec
    q = torch.round(x.float() * (1.0 / module.input_scale.float())) + module.input_zero_point
    return (q >= spec.qmin) & (q <= spec.qmax)


class _FrozenQuantized(torch.autograd.Function):
    """Forward: the layer's integer kernels. Backward: the float layer with ``W_hat``."""

    @staticmethod
    def forward(x: torch.Tensor, module: nn.Module) -> torch.Tensor:  # type: ignore[override]
        # grad mode is off here: the layer takes its inference path (x is smoothed already)
        y = module._forward_smoothed(x)
        return y if y._base is None else y.clone()  # (a view of its own: writable in place)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: torch.Tensor) -> None:
        x, module = inputs
        ctx.module = module
        ctx.x_dtype = x.dtype
        saved: list[torch.Tensor | None] = [None, None, None]  # x, relu mask, STE mask
        if _is_conv(module) or module.fused_gelu is not None:
            saved[0] = x.detach()
        elif module.fused_relu:
            saved[1] = output > 0
        if not _is_conv(module):
            saved[2] = _static_mask(module, x.detach())
        ctx.save_for_backward(*saved)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None
        x, relu_mask, ste_mask = ctx.saved_tensors
        return _input_grad(ctx.module, x, relu_mask, ste_mask, grad).to(ctx.x_dtype), None


def input_grad(module: nn.Module, x: torch.Tensor, y: torch.Tensor,
               grad: torch.Tensor) -> torch.Tensor:
    """The input gradient of one call ``y = module(x)`` of a quantized linear or conv layer
    (what :func:`frozen_forward`'s backward computes; the backward of the custom op
    ``lowbit::quantized_layer`` inside ``torch.compile``), in ``x``'s dtype.

    Example:
        >>> from lowbit.config import QuantizationConfig
        >>> from lowbit.modules import QuantizedLinear
        >>> q = QuantizedLinear.from_float(nn.Linear(8, 4), QuantizationConfig.int8_dynamic())
        >>> x = torch.randn(3, 8)
        >>> g = input_grad(q, x, q(x), torch.ones(3, 4))
        >>> torch.allclose(g, q.dequantize_weight().sum(0).expand(3, 8))
        True
    """
    relu = None
    if not _is_conv(module) and module.fused_gelu is None and module.fused_relu:
        relu = y > 0
    ste = None if _is_conv(module) else _static_mask(module, x)
    return _input_grad(module, x, relu, ste, grad).to(x.dtype)


def _input_grad(module: nn.Module, x: torch.Tensor | None, relu_mask: torch.Tensor | None,
                ste_mask: torch.Tensor | None, grad: torch.Tensor) -> torch.Tensor:
    if _is_conv(module):
        assert x is not None
        return _conv_input_grad(module, x, grad)
    g = grad.float()
    if relu_mask is not None:
        g = g * relu_mask
    weight = module.dequantize_weight()  # (N, K) float32, freed when this returns
    if module.fused_gelu is not None:  # derivative at the float pre-activation
        assert x is not None
        with torch.enable_grad():
            z = F.linear(x.float(), weight, module.bias).requires_grad_()
            (g,) = torch.autograd.grad(F.gelu(z, approximate=module.fused_gelu), z, g)
    grad_x = g.reshape(-1, g.shape[-1]) @ weight  # (M, K)
    grad_x = grad_x.reshape(*grad.shape[:-1], weight.shape[1])
    return grad_x if ste_mask is None else grad_x * ste_mask


def _conv_input_grad(module: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """Input gradient of the float conv with ``W_hat`` (pre-pad, bias, ReLU, max-pool), by
    re-running it under autograd; a static activation quantizer's STE mask applied on top."""
    g = module.geometry
    with torch.enable_grad():
        xf = x.float().requires_grad_()
        xp = xf if g["pre_pad"] is None else F.pad(xf, g["pre_pad"], mode=g["pad_mode"])
        conv = F.conv1d if module._dims == 1 else F.conv2d
        weight = module.dequantize_weight()  # conv-shaped float32
        y = conv(xp, weight, module.bias, g["stride"], g["padding"], g["dilation"], g["groups"])
        if module.fused_relu:
            y = F.relu(y)
        if g.get("fused_maxpool"):
            y = F.max_pool2d(y, g["fused_maxpool"])
        (grad_x,) = torch.autograd.grad(y, xf, grad.float())
    mask = _static_mask(module, x)
    return grad_x if mask is None else grad_x * mask
