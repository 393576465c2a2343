"""Small demo models (MNIST and CIFAR-10 CNNs, MLP, a MiniLM-like encoder block, a tiny ResNet)
and a trainer.

They exist to exercise and demonstrate quantization: every quantizable layer is a plain
``nn.Linear`` / ``nn.Conv2d`` (so dynamic INT8 hits them), :class:`MnistCNN` has a BatchNorm for
BN folding, and :class:`TinyResNet` has residual adds in ``forward`` for traversal tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

__all__ = [
    "MLP",
    "CifarCNN",
    "MnistCNN",
    "TinyResNet",
    "TransformerEncoderBlock",
    "train_classifier",
]


class MnistCNN(nn.Module):
    """A small CNN for 28x28 digits: (conv-BN-ReLU-pool), (conv-ReLU-pool), fc-ReLU, fc.

    About 207k parameters; reaches 98.6-98.9% on the bundled MNIST split (8,000 training images,
    2,000 evaluation images) after 4 epochs of :func:`train_classifier` with ``lr=2e-3``, in
    about 6 seconds on 2 idle CPU cores.

    Args:
        num_classes: number of output logits.
        channels: output channels of the two convolutions.
        hidden: width of the hidden fully connected layer.

    Example:
        >>> model = MnistCNN()
        >>> model(torch.zeros(2, 1, 28, 28)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int] = (16, 32),
                 hidden: int = 128) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 28 -> 14
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 14 -> 7
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c2 * 7 * 7, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 1, 28, 28)`` -> logits ``(B, num_classes)``."""
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.conv2(x)))
        return self.fc2(self.relu3(self.fc1(self.flatten(x))))


class CifarCNN(nn.Module):
    """A small CNN for 3x32x32 images (CIFAR-10): three (conv-BN-ReLU-pool) blocks, fc-ReLU, fc.

    The layers are named as in :class:`MnistCNN` (``conv1``, ``conv2``, ``fc1``, ``fc2``, plus
    ``conv3``), so per-layer configs written for one apply to the other. About 620k parameters,
    85% of them in ``fc1`` (2,048 inputs: INT4 group size 32 divides it).

    Args:
        num_classes: number of output logits.
        channels: output channels of the three convolutions.
        hidden: width of the hidden fully connected layer.

    Example:
        >>> model = CifarCNN()
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, num_classes: int = 10, channels: tuple[int, int, int] = (32, 64, 128),
                 hidden: int = 256) -> None:
        super().__init__()
        c1, c2, c3 = channels
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.relu1 = nn.ReLU()
        self.pool1 = nn.MaxPool2d(2)  # 32 -> 16
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c2)
        self.relu2 = nn.ReLU()
        self.pool2 = nn.MaxPool2d(2)  # 16 -> 8
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(c3)
        self.relu3 = nn.ReLU()
        self.pool3 = nn.MaxPool2d(2)  # 8 -> 4
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(c3 * 4 * 4, hidden)
        self.relu4 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, 3, 32, 32)`` -> logits ``(B, num_classes)``."""
        x = self.pool1(self.relu1(self.bn1(self.conv1(x))))
        x = self.pool2(self.relu2(self.bn2(self.conv2(x))))
        x = self.pool3(self.relu3(self.bn3(self.conv3(x))))
        return self.fc2(self.relu4(self.fc1(self.flatten(x))))


class MLP(nn.Module):
    """A multi-layer perceptron: ``Flatten`` then ``Linear``-``ReLU`` blocks and a final ``Linear``.

    The default is ``784-1024-1024-10`` (about 1.9M parameters), Linear-heavy enough to show
    INT8 GEMM speed.

    Args:
        in_features: input size after flattening.
        hidden: widths of the hidden layers.
        num_classes: output size.

    Example:
        >>> model = MLP(in_features=16, hidden=(8,), num_classes=3)
        >>> [type(m).__name__ for m in model.layers]
        ['Linear', 'ReLU', 'Linear']
        >>> model(torch.zeros(2, 4, 4)).shape
        torch.Size([2, 3])
    """

    def __init__(self, in_features: int = 784, hidden: tuple[int, ...] = (1024, 1024),
                 num_classes: int = 10) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = in_features
        for h in hidden:
            layers += [nn.Linear(width, h), nn.ReLU()]
            width = h
        layers.append(nn.Linear(width, num_classes))
        self.flatten = nn.Flatten()
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, ...)`` flattening to ``in_features`` -> ``(B, num_classes)``."""
        return self.layers(self.flatten(x))


class TransformerEncoderBlock(nn.Module):
    """A BERT/MiniLM-style post-LayerNorm encoder block made of plain ``nn.Linear`` layers.

    ``x -> LN(x + Attn(x)) -> LN(h + FFN(h))`` with ``FFN = Linear-GELU-Linear``. The defaults
    (hidden 384, 12 heads, FFN 1536) are those of all-MiniLM-L6-v2.

    Args:
        hidden: model width.
        heads: attention heads (must divide ``hidden``).
        ffn: width of the feed-forward layer.
        dropout: dropout probability (used only in training mode).

    Raises:
        ValueError: when ``heads`` does not divide ``hidden``.

    Example:
        >>> block = TransformerEncoderBlock(hidden=32, heads=4, ffn=64)
        >>> block(torch.zeros(2, 5, 32)).shape
        torch.Size([2, 5, 32])
    """

    def __init__(self, hidden: int = 384, heads: int = 12, ffn: int = 1536,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"TransformerEncoderBlock: heads={heads} must divide hidden={hidden}")
        self.heads = heads
        self.dropout = dropout
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.attn_out = nn.Linear(hidden, hidden)
        self.attn_norm = nn.LayerNorm(hidden)
        self.ffn_in = nn.Linear(hidden, ffn)
        self.act = nn.GELU()
        self.ffn_out = nn.Linear(ffn, hidden)
        self.ffn_norm = nn.LayerNorm(hidden)

    def _split(self, t: torch.Tensor) -> torch.Tensor:
        b, s, h = t.shape
        return t.view(b, s, self.heads, h // self.heads).transpose(1, 2)  # (B, heads, S, d)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``x``: ``(B, S, hidden)``; ``attention_mask``: optional bool ``(B, S)``, True = keep."""
        b, s, h = x.shape
        mask = None if attention_mask is None else attention_mask[:, None, None, :].bool()
        p = self.dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(self._split(self.query(x)), self._split(self.key(x)),
                                             self._split(self.value(x)), attn_mask=mask,
                                             dropout_p=p)
        ctx = ctx.transpose(1, 2).reshape(b, s, h)
        x = self.attn_norm(x + F.dropout(self.attn_out(ctx), p, self.training))
        return self.ffn_norm(x + F.dropout(self.ffn_out(self.act(self.ffn_in(x))), p,
                                           self.training))


class _BasicBlock(nn.Module):
    """conv-BN-ReLU-conv-BN plus a shortcut (1x1 conv-BN when the shape changes), then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False),
                                          nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))  # residual add, functional ReLU


class TinyResNet(nn.Module):
    """A ResNet-8-like network: stem, three residual stages (one block each), pool, fc.

    ``forward`` has residual additions and functional ReLUs, which is what traversal and fusion
    code must handle beyond a plain ``nn.Sequential``.

    Args:
        in_channels: input image channels.
        num_classes: output logits.
        width: channels of the first stage (doubled at each later stage).

    Example:
        >>> model = TinyResNet(in_channels=3, width=8)
        >>> model(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(width)
        self.stem_relu = nn.ReLU()
        self.layer1 = _BasicBlock(width, width, 1)
        self.layer2 = _BasicBlock(width, 2 * width, 2)
        self.layer3 = _BasicBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``(B, in_channels, H, W)`` -> logits ``(B, num_classes)``."""
        x = self.stem_relu(self.stem_bn(self.stem(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def train_classifier(model: nn.Module, dataset: Dataset, epochs: int = 3, batch_size: int = 64,
                     lr: float = 1e-3, seed: int = 0, progress: bool = True) -> nn.Module:
    """Train a classifier in place with Adam and cross-entropy; deterministic for a given seed.

    The seed fixes the shuffling order and dropout; initialize ``model`` after
    ``torch.manual_seed(seed)`` too for a fully reproducible run. Results are reproducible on
    the same machine and thread count.

    Args:
        model: maps a batch of inputs to logits ``(B, num_classes)``.
        dataset: yields ``(input, int label)`` pairs (e.g. ``MnistSplits.train``).
        epochs: passes over ``dataset`` (>= 1).
        batch_size: mini-batch size.
        lr: Adam learning rate (cosine-decayed to 5% of it over the run).
        seed: seed of the shuffling order.
        progress: show a tqdm progress bar (on stderr).

    Returns:
        ``model`` itself, trained and in eval mode.

    Raises:
        ValueError: when ``epochs``, ``batch_size`` or ``lr`` is not positive.

    Example:
        >>> from torch.utils.data import TensorDataset
        >>> data = TensorDataset(torch.randn(32, 4), torch.randint(0, 2, (32,)))
        >>> model = train_classifier(nn.Linear(4, 2), data, epochs=1, batch_size=16,
        ...                          progress=False)
        >>> model.training
        False
    """
    if epochs < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"train_classifier: epochs={epochs}, batch_size={batch_size} and lr={lr} "
                         "must be positive")
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, generator=generator)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    total = epochs * len(loader)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * step / total)))
    model.train()
    with torch.random.fork_rng(), tqdm(total=total, desc="training", unit="batch",
                                       disable=not progress, leave=False) as bar:
        torch.manual_seed(seed)
        for epoch in range(epochs):
            for inputs, labels in loader:
                optimizer.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(inputs), labels)
                loss.backward()
                optimizer.step()
                schedule.step()
                bar.update()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.3f}")
    return model.eval()
