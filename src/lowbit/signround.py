"""SignRound: weight rounding learned block by block with signed gradient descent.

Round-to-nearest and GPTQ decide each weight's rounding from that layer alone. SignRound
(Cheng et al., 2023; Intel's AutoRound) learns, for every weight, an offset ``v`` in
``[-0.5, 0.5]`` added before rounding, and for every group a shrink factor of its min and max,
so that a whole block (a transformer layer: attention and MLP together) reproduces its float
outputs on the calibration data. The updates follow the sign of the gradient (lr ``1 / iters``,
decaying linearly), which suits the piecewise-constant rounding. The result is codes and scales
on the same grid as round-to-nearest: the same modules, kernels and file format.

Blocks are the elements of the model's ``nn.ModuleList`` s (transformer layers); a Linear that
is in none is a block of its own. Blocks run in execution order, each on the inputs the
already-quantized blocks before it produce, with its float self on those inputs as the target.
Memory: the inputs and targets of one block on every calibration batch are kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from lowbit.config import QuantSpec
from lowbit.dropin import is_hf_conv1d, is_linear_like, linear_weight
from lowbit.modules_weight_only import _layout
from lowbit.ops import compute_range, qparams_from_range

__all__ = ["block_of", "signround_block"]


def _tensor_out(out: Any) -> torch.Tensor:
    """A block's first output tensor (of a tuple / list / dict such as a ``ModelOutput``)."""
    while isinstance(out, (tuple, list, Mapping)) and out:
        out = next(iter(out.values())) if isinstance(out, Mapping) else out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"signround: a block returned {type(out).__name__}, not a tensor (or a "
                         "tuple / dict starting with one); use method='gptq' for this model")
    return out


class _Rounding:
    """The learned rounding of one ``[N, K]`` weight: offsets ``v`` and range factors."""

    def __init__(self, weight: torch.Tensor, spec: QuantSpec) -> None:
        self.k = weight.shape[1]
        self.spec, kp = _layout(self.k, spec)
        self.dtype = weight.dtype
        w = nn.functional.pad(weight.detach().float(), (0, kp - self.k))
        self.g = self.spec.group_size if self.spec.granularity == "per_group" else kp
        self.n, self.groups = w.shape[0], kp // self.g
        self.wg = w.reshape(-1, self.g)  # one row per (output channel, group)
        self.col = self.spec.with_(granularity="per_channel", axis=0, group_size=None)
        self.lo, self.hi = compute_range(self.wg, self.col, "weight")
        self.v = torch.zeros_like(self.wg, requires_grad=True)
        self.a = torch.ones_like(self.lo, requires_grad=True)  # min factor, in [0.5, 1]
        self.b = torch.ones_like(self.hi, requires_grad=True)  # max factor, in [0.5, 1]

    def params(self) -> list[torch.Tensor]:
        return [self.v, self.a, self.b]

    def qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return qparams_from_range(self.lo * self.a, self.hi * self.b, self.col)

    def weight(self) -> torch.Tensor:
        """The fake-quantized weight ``[N, K]``, differentiable in ``v``, ``a`` and ``b``
        (straight-through rounding)."""
        scale, zp = self.qparams()
        scale, zp = scale.unsqueeze(1), zp.unsqueeze(1).float()
        x = self.wg / scale + self.v
        x = x + (torch.round(x) - x).detach()
        q = torch.clamp(x + zp, self.spec.qmin, self.spec.qmax)
        return ((q - zp) * scale).reshape(self.n, -1)[:, :self.k].to(self.dtype)

    def step(self, lr: float) -> None:
        with torch.no_grad():
            for p, lo, hi in ((self.v, -0.5, 0.5), (self.a, 0.5, 1.0), (self.b, 0.5, 1.0)):
                if p.grad is not None:
                    p.sub_(lr * p.grad.sign()).clamp_(lo, hi)
                    p.grad = None

    def state(self) -> list[torch.Tensor]:
        return [p.detach().clone() for p in self.params()]

    def load(self, state: list[torch.Tensor]) -> None:
        with torch.no_grad():
            for p, saved in zip(self.params(), state, strict=True):
                p.copy_(saved)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dequantized weight [N, K] float32, scale, zero_point)`` shaped for the module."""
        with torch.no_grad():
            w = self.weight().float()
            scale, zp = self.qparams()
        if self.spec.granularity == "per_group":
            return w, scale.reshape(self.n, self.groups), zp.reshape(self.n, self.groups)
        return w, scale, zp


def signround_block(block: nn.Module, layers: Mapping[str, QuantSpec],
                    samples: Iterable[tuple[tuple[Any, ...], dict[str, Any]]], *,
                    iters: int = 200, lr: float | None = None, progress: bool = False
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Learn the rounding of the named Linear layers of ``block`` (``block`` is not changed).

    Each iteration runs one sample (cycling through them) through the block with the
    fake-quantized weights and moves every offset and range factor by ``lr`` against the sign
    of its gradient of the mean squared error to the float block's output. The error on all
    samples is measured at the start (round-to-nearest) and after each quarter of the
    iterations; the best of these is returned, so the block is never worse than
    round-to-nearest on the calibration data.

    Args:
        block: the float module whose output is reconstructed (a transformer layer, a Linear).
        layers: ``{name relative to block ("" for the block itself): weight spec}``: Linear
            layers (or ``transformers``' GPT-2 ``Conv1D``, weight ``[in, out]``).
        samples: the block's ``(args, kwargs)`` on the calibration batches.
        iters: optimization steps (AutoRound's default: 200).
        lr: step size; ``1 / iters`` by default, decaying linearly to 0.
        progress: a tqdm bar over the iterations.

    Returns:
        ``{name: (dequantized weight float32 [out, in], scale, zero_point)}``, the weight on
        the grid.

    Example:
        >>> _ = torch.manual_seed(0)
        >>> block = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64))
        >>> xs = [((torch.randn(32, 64),), {}) for _ in range(4)]
        >>> spec = QuantSpec.int4_weight(group_size=32)
        >>> out = signround_block(block, {"0": spec, "2": spec}, xs, iters=50)
        >>> w, s, z = out["0"]
        >>> tuple(w.shape), tuple(s.shape), tuple(z.shape)
        ((64, 64), (64, 2), (64, 2))
    """
    samples = list(samples)
    if not samples:
        raise ValueError("signround: the block received no calibration batch")
    if iters < 1:
        raise ValueError(f"signround: iters={iters} must be a positive integer")
    lr = 1.0 / iters if lr is None else lr
    for name in layers:
        _linear(block, name, "block")
    transposed = {name for name in layers if is_hf_conv1d(block.get_submodule(name))}
    rounding = {name: _Rounding(linear_weight(block.get_submodule(name)), spec)
                for name, spec in layers.items()}
    with torch.no_grad():
        targets = [_tensor_out(block(*a, **k)).detach() for a, k in samples]

    def loss(i: int) -> torch.Tensor:
        weights = {(f"{n}.weight" if n else "weight"): r.weight().t() if n in transposed
                   else r.weight() for n, r in rounding.items()}
        args, kwargs = samples[i]
        out = _tensor_out(functional_call(block, weights, args, kwargs))
        return nn.functional.mse_loss(out.float(), targets[i].float())

    def total() -> float:
        with torch.no_grad():
            return sum(float(loss(i)) for i in range(len(samples)))

    checks = {iters * j // 4 for j in range(1, 5)}  # keep the best of these and the start
    best, kept = total(), [r.state() for r in rounding.values()]
    if not math.isfinite(best):  # NaN never improves: round-to-nearest would be kept silently
        raise ValueError(f"signround: the block's output error on the calibration batches is "
                         f"{best} (its inputs or the float block's output hold NaN/Inf, or a "
                         f"batch is empty); fix the calibration batches, or keep the layers "
                         f"{sorted(layers)} round-to-nearest")
    with torch.enable_grad():
        for it in tqdm(range(iters), desc="signround", unit="it", disable=not progress,
                       leave=False):
            loss(it % len(samples)).backward()
            for r in rounding.values():
                r.step(lr * (1.0 - it / iters))
            if it + 1 in checks and (now := total()) < best:
                best, kept = now, [r.state() for r in rounding.values()]
    for r, state in zip(rounding.values(), kept, strict=True):
        r.load(state)
    return {name: r.result() for name, r in rounding.items()}


def _linear(model: nn.Module, name: str, what: str) -> nn.Module:
    """The Linear (or GPT-2 ``Conv1D``) ``name`` of ``model``, or a ValueError saying why not."""
    try:
        layer = model.get_submodule(name)
    except AttributeError:
        raise ValueError(f"signround: the {what} has no layer {name!r}; pass names as "
                         f"model.named_modules() gives them (relative to the {what})") from None
    if not is_linear_like(layer):
        raise ValueError(f"signround: {name!r} is a {type(layer).__name__}; it rounds nn.Linear "
                         "(and transformers' Conv1D) weights only: keep others round-to-nearest")
    return layer


def block_of(model: nn.Module, name: str) -> str:
    """The block a Linear layer belongs to: its nearest ancestor held in an ``nn.ModuleList``
    (a transformer layer), else the layer itself.

    Example:
        >>> m = nn.Module(); m.layers = nn.ModuleList([nn.Sequential(nn.Linear(4, 4))])
        >>> m.head = nn.Linear(4, 2)
        >>> block_of(m, "layers.0.0"), block_of(m, "head")
        ('layers.0', 'head')
    """
    _linear(model, name, "model")
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        if isinstance(model.get_submodule(".".join(parts[:i - 1])), nn.ModuleList):
            return ".".join(parts[:i])
    return name
