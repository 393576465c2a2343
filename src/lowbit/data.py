"""MNIST in its original IDX format, parsed with numpy (no pickle, no download).

lowbit ships the real 10,000-image MNIST test set (Yann LeCun, Corinna Cortes and Christopher
J.C. Burges; CC BY-SA 3.0) under ``lowbit/datasets/mnist/`` so that the demo, the examples and
the tests run offline. Point ``root`` at a folder holding the four standard files to use the
full 60,000 + 10,000 set instead:

=========================  ===========================
split ``"train"``          ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``
split ``"test"``           ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``
=========================  ===========================

Each file may be gzipped (``.gz``) or raw.

IDX layout (big-endian): two zero bytes, a type code (``0x08`` = unsigned byte), the number of
dimensions ``d``, ``d`` int32 sizes, then the data in C order.
"""

from __future__ import annotations

import gzip
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = [
    "BUNDLED_MNIST_DIR",
    "BUNDLED_MNIST_MD5",
    "MNIST_MEAN",
    "MNIST_STD",
    "MnistSplits",
    "load_mnist",
    "mnist_splits",
    "read_idx",
]

BUNDLED_MNIST_DIR: Path = Path(__file__).resolve().parent / "datasets" / "mnist"
"""Folder of the bundled MNIST test set (10,000 images)."""

BUNDLED_MNIST_MD5: dict[str, str] = {
    "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
    "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
}
"""md5 of each bundled file (the same as the files distributed by Yann LeCun)."""

MNIST_MEAN: float = 0.1307
"""Mean pixel value of MNIST in [0, 1] (the usual normalization constant)."""
MNIST_STD: float = 0.3081
"""Standard deviation of MNIST pixels in [0, 1]."""

_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_EXPECTED_NDIM = {"images": 3, "labels": 1}
_TRAIN_TEST_SPLIT = 8000  # bundled test set only: first 8,000 train/calibrate, last 2,000 eval


def read_idx(path: str | Path, expected_ndim: int | None = None) -> np.ndarray:
    """Read one IDX file (gzipped or raw) of unsigned bytes into a numpy array.

    Args:
        path: the file, e.g. ``t10k-labels-idx1-ubyte.gz``; gzip is detected from the content.
        expected_ndim: the number of dimensions the file must have (3 for images, 1 for
            labels), or ``None`` to accept any.

    Returns:
        A ``uint8`` array with the shape stored in the file header.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is not valid IDX: bad gzip stream, wrong magic number or type
            code, unexpected number of dimensions, or a data size that does not match the header
            (a truncated download).

    Example:
        >>> labels = read_idx(BUNDLED_MNIST_DIR / "t10k-labels-idx1-ubyte.gz", expected_ndim=1)
        >>> labels.shape, labels.dtype, labels[:5].tolist()
        ((10000,), dtype('uint8'), [7, 2, 1, 0, 4])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist")
    raw = path.read_bytes()
    if raw[:2] == _GZIP_MAGIC:  # gzipped, whatever the file is called
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
            raise ValueError(
                f"{path}: cannot decompress ({exc}); the file is corrupted or truncated, "
                "download it again"
            ) from exc
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0:
        raise ValueError(f"{path}: not an IDX file (bad magic number {raw[:4].hex()!r}); "
                         "expected a file such as t10k-images-idx3-ubyte(.gz)")
    type_code, ndim = raw[2], raw[3]
    if type_code != _IDX_UBYTE:
        raise ValueError(f"{path}: IDX type code 0x{type_code:02x} is not supported; MNIST files "
                         "hold unsigned bytes (0x08)")
    if expected_ndim is not None and ndim != expected_ndim:
        raise ValueError(f"{path}: has {ndim} dimension(s), expected {expected_ndim}; are the "
                         "image and label files swapped?")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated header ({len(raw)} bytes); download the file again")
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">i4", count=ndim, offset=4))
    expected = int(np.prod(shape, dtype=np.int64))
    if len(raw) - header != expected:
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{len(raw) - header}; the file is truncated or corrupted, download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    raise FileNotFoundError(
        f"MNIST file {stem}(.gz) not found in {root}; put the four standard IDX files there "
        "(train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
        "t10k-labels-idx1-ubyte, gzipped or not), or pass root=None for the bundled test set"
    )


def load_mnist(root: str | Path | None = None, split: str = "test"
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Load one MNIST split from IDX files.

    Args:
        root: folder holding the IDX files; ``None`` uses the bundled copy of the real 10,000-image
            test set (which has no ``"train"`` split).
        split: ``"test"`` (``t10k-*`` files) or ``"train"`` (``train-*`` files).

    Returns:
        ``(images, labels)``: ``uint8`` tensor ``[N, 28, 28]`` and ``int64`` tensor ``[N]``.

    Raises:
        ValueError: on an unknown ``split``, a corrupted file, or image/label counts that differ.
        FileNotFoundError: when the split's files are not in ``root``.

    Example:
        >>> images, labels = load_mnist()
        >>> images.shape, images.dtype, labels.dtype
        (torch.Size([10000, 28, 28]), torch.uint8, torch.int64)
    """
    if split not in _PREFIX:
        raise ValueError(f"load_mnist: split={split!r} is unknown; use 'train' or 'test'")
    folder = BUNDLED_MNIST_DIR if root is None else Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"load_mnist: root={str(folder)!r} is not a folder")
    prefix = _PREFIX[split]
    images = read_idx(_find(folder, f"{prefix}-images-idx3-ubyte"), expected_ndim=3)
    labels = read_idx(_find(folder, f"{prefix}-labels-idx1-ubyte"), expected_ndim=1)
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"load_mnist: {folder} holds {images.shape[0]} {split} images but "
                         f"{labels.shape[0]} labels; one of the files is from another set")
    if labels.size and labels.max() > 9:
        raise ValueError(f"load_mnist: {split} labels in {folder} go up to {labels.max()}; "
                         "MNIST labels are 0..9, the label file is corrupted")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


@dataclass(frozen=True)
class MnistSplits:
    """A training/calibration split and an evaluation split of MNIST.

    Attributes:
        train: ``TensorDataset(images, labels)`` for training and calibration.
        eval: ``TensorDataset(images, labels)`` for evaluation (never used for training).
        description: one sentence saying where each split comes from (print it next to any
            accuracy figure).
    """

    train: TensorDataset
    eval: TensorDataset
    description: str


def _to_float(images: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = images.unsqueeze(1).to(torch.float32).div_(255.0)  # (N, 1, 28, 28) in [0, 1]
    return x.sub_(MNIST_MEAN).div_(MNIST_STD) if normalize else x


def mnist_splits(root: str | Path | None = None, normalize: bool = True) -> MnistSplits:
    """Deterministic train/eval datasets of float images ``[N, 1, 28, 28]`` and int64 labels.

    With the bundled test set (``root=None``, or a ``root`` without the training files) the
    first 8,000 of the 10,000 test images train and calibrate, the last 2,000 evaluate. When
    ``root`` also holds the 60,000-image training files, those train and the 10,000 test images
    evaluate. ``description`` says which.

    Args:
        root: folder of IDX files, or ``None`` for the bundled test set.
        normalize: standardize pixels with the MNIST mean/std (``(x/255 - 0.1307) / 0.3081``);
            ``False`` keeps ``x/255`` in ``[0, 1]``.

    Returns:
        :class:`MnistSplits`.

    Raises:
        ValueError, FileNotFoundError: as :func:`load_mnist`.

    Example:
        >>> splits = mnist_splits()
        >>> len(splits.train), len(splits.eval), tuple(splits.train[0][0].shape)
        (8000, 2000, (1, 28, 28))
    """
    folder = BUNDLED_MNIST_DIR if root is None else Path(root)
    has_train = any((folder / f"train-images-idx3-ubyte{ext}").is_file() for ext in (".gz", ""))
    test_x, test_y = load_mnist(root, "test")
    if has_train:
        train_x, train_y = load_mnist(root, "train")
        return MnistSplits(
            train=TensorDataset(_to_float(train_x, normalize), train_y),
            eval=TensorDataset(_to_float(test_x, normalize), test_y),
            description=(f"MNIST: the {len(train_y):,} training images for training/calibration, "
                         f"the {len(test_y):,} test images for evaluation"),
        )
    n = len(test_y)
    if n < 2:
        raise ValueError(f"mnist_splits: the test set in {folder} has only {n} image(s)")
    cut = _TRAIN_TEST_SPLIT if n == 10_000 else int(n * 0.8)
    where = "bundled " if root is None else ""
    return MnistSplits(
        train=TensorDataset(_to_float(test_x[:cut], normalize), test_y[:cut]),
        eval=TensorDataset(_to_float(test_x[cut:], normalize), test_y[cut:]),
        description=(f"MNIST ({where}real {n:,}-image test set): the first {cut:,} images for "
                     f"training/calibration, the last {n - cut:,} for evaluation"),
    )
