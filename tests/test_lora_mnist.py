"""QLoRA does something real: an INT4 MNIST model that never saw digits 5-9 learns them
through LoRA adapters alone (the bundled real MNIST; a few seconds on 2 cores)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import lowbit
from lowbit.data import mnist_splits


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.inference_mode():
        return float((model(x).argmax(1) == y).float().mean())


def _train(model: nn.Module, params: list[nn.Parameter], x: torch.Tensor, y: torch.Tensor,
           epochs: int, lr: float, seed: int) -> None:
    opt = torch.optim.Adam(params, lr=lr)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def test_lora_teaches_an_int4_model_new_digits() -> None:
    splits = mnist_splits()
    x_train, y_train = (t.flatten(1) if t.dim() > 1 else t for t in splits.train.tensors)
    x_eval, y_eval = splits.eval.tensors
    x_eval = x_eval.flatten(1)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 128), nn.ReLU(),
                          nn.Linear(128, 10))
    low = y_train < 5  # the float model only ever sees digits 0-4
    _train(model, list(model.parameters()), x_train[low], y_train[low], epochs=2, lr=1e-3,
           seed=0)
    float_acc = _accuracy(model, x_eval, y_eval)

    qmodel = lowbit.quantize_weight_only(model, bits=4, group_size=32)
    base_acc = _accuracy(qmodel, x_eval, y_eval)
    codes = {k: v.clone() for k, v in qmodel.state_dict().items()}
    lq = lowbit.add_lora(qmodel, r=4, alpha=8)
    trainable = sum(p.numel() for p in lowbit.lora_parameters(lq))
    total = sum(p.numel() for p in model.parameters())
    assert trainable < 0.05 * total, (trainable, total)

    _train(lq, lowbit.lora_parameters(lq), x_train, y_train, epochs=2, lr=1e-2, seed=1)
    lora_acc = _accuracy(lq, x_eval, y_eval)
    high = y_eval >= 5
    new_digits = _accuracy(lq, x_eval[high], y_eval[high])
    print(f"0-9 accuracy: float(0-4 only) {float_acc:.3f}, INT4 base {base_acc:.3f}, "
          f"INT4 + LoRA {lora_acc:.3f} (digits 5-9: {new_digits:.3f}); trainable "
          f"{trainable}/{total} = {trainable / total:.1%}")
    # the base cannot name digits it never saw: about half the eval set
    assert base_acc < 0.55, base_acc
    assert lora_acc > 0.82 and lora_acc > base_acc + 0.3, (base_acc, lora_acc)
    assert new_digits > 0.7, new_digits
    after = lq.state_dict()  # the integer base did not move
    assert all(torch.equal(v, after[_wrapped(k)]) for k, v in codes.items())

    merged = lowbit.merge_lora(lq)  # folded into INT4 again: still knows the new digits
    merged_acc = _accuracy(merged, x_eval, y_eval)
    print(f"merged and re-quantized to INT4: {merged_acc:.3f}")
    assert merged_acc > lora_acc - 0.03, (lora_acc, merged_acc)


def _wrapped(key: str) -> str:
    """State-dict key of a base buffer once its layer is wrapped by LoRALinear."""
    layer, _, buf = key.rpartition(".")
    return f"{layer}.base.{buf}"
