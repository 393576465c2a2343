"""MNIST (IDX format) and CIFAR-10 (binary version), parsed with numpy (no pickle, no download).

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

CIFAR-10 is not bundled: :func:`cifar10_splits` reads the official *binary version*
(``cifar-10-batches-bin/`` from :data:`CIFAR10_URL`) when you have it. Each of its files
(``data_batch_1.bin`` .. ``data_batch_5.bin``, ``test_batch.bin``) holds 10,000 records of
3,073 bytes: one label byte (0..9), then the 32x32 image as 1,024 red, 1,024 green and 1,024
blue bytes (rows top to bottom). The python version (``cifar-10-batches-py``) is pickled and
is refused: unpickling a file can run arbitrary code.
"""

from __future__ import annotations

import argparse
import gzip
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import TensorDataset

__all__ = [
    "BUNDLED_MNIST_DIR",
    "BUNDLED_MNIST_MD5",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CIFAR10_URL",
    "MNIST_MEAN",
    "MNIST_STD",
    "MNIST_URL",
    "Cifar10Splits",
    "DatasetSplits",
    "MnistSplits",
    "add_dataset_arguments",
    "cifar10_splits",
    "load_cifar10",
    "load_mnist",
    "mnist_splits",
    "read_cifar10_batch",
    "read_idx",
    "splits_and_model",
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
MNIST_URL: str = "http://yann.lecun.com/exdb/mnist/"
"""Where the four standard MNIST IDX files come from (mirrors: torchvision's, Kaggle's)."""

CIFAR10_URL: str = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
"""The CIFAR-10 binary version (unpacks to ``cifar-10-batches-bin/``), the one lowbit reads."""
CIFAR10_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
"""Per-channel (R, G, B) mean of the CIFAR-10 training pixels in [0, 1]."""
CIFAR10_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
"""Per-channel (R, G, B) standard deviation of the CIFAR-10 training pixels in [0, 1]."""
CIFAR10_CLASSES: tuple[str, ...] = ("airplane", "automobile", "bird", "cat", "deer", "dog",
                                    "frog", "horse", "ship", "truck")
"""The class of each CIFAR-10 label, 0..9 (``batches.meta.txt`` in the binary version)."""

_PREFIX = {"train": "train", "test": "t10k"}
_IDX_UBYTE = 0x08
_GZIP_MAGIC = b"\x1f\x8b"
_IDX_MAX_BYTES = 4 << 30  # an IDX file promising more is corrupted (MNIST train: 47 MB)
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
    with path.open("rb") as f:
        gzipped = f.read(2) == _GZIP_MAGIC  # gzipped, whatever the file is called
    try:  # (streamed: a small gzip file that inflates to gigabytes is refused by its header)
        with (gzip.open(path, "rb") if gzipped else path.open("rb")) as f:
            return _read_idx_stream(f, path, expected_ndim)
    except (OSError, EOFError) as exc:  # gzip.BadGzipFile is an OSError
        raise ValueError(f"{path}: cannot decompress ({exc}); the file is corrupted or "
                         "truncated, download it again") from exc


def _read_idx_stream(f: Any, path: Path, expected_ndim: int | None) -> np.ndarray:
    """:func:`read_idx` on an open (decompressing) stream: the header first, then exactly the
    bytes it announces, read only once its shape has been checked."""
    raw = f.read(4)
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
    dims = f.read(4 * ndim)
    if len(dims) < 4 * ndim:
        raise ValueError(f"{path}: truncated header ({4 + len(dims)} bytes); download the file "
                         "again")
    shape = tuple(int.from_bytes(dims[i:i + 4], "big", signed=True) for i in range(0, len(dims), 4))
    expected = math.prod(shape)  # (Python ints: no wrap-around)
    if any(d < 0 for d in shape) or expected > _IDX_MAX_BYTES:
        raise ValueError(f"{path}: header says shape {shape}, which is not a dataset this reader "
                         f"takes (negative, or over {_IDX_MAX_BYTES >> 30} GiB); the file is "
                         "corrupted")
    data = f.read(expected + 1)  # (one more: a longer file is refused too)
    if len(data) != expected:
        held = f"{len(data)}" if len(data) <= expected else "more"
        raise ValueError(
            f"{path}: header says shape {shape} ({expected} bytes of data) but the file holds "
            f"{held}; the file is truncated or corrupted, download it again"
        )
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


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
    if images.shape[1:] != (28, 28):
        raise ValueError(f"load_mnist: the {split} images in {folder} are "
                         f"{images.shape[1]} x {images.shape[2]} pixels; MNIST images are "
                         "28 x 28 (resize your data, or load it as tensors with your own "
                         "Dataset)")
    if images.shape[0] != labels.shape[0]:
        raise ValueError(f"load_mnist: {folder} holds {images.shape[0]} {split} images but "
                         f"{labels.shape[0]} labels; one of the files is from another set")
    if labels.size and labels.max() > 9:
        raise ValueError(f"load_mnist: {split} labels in {folder} go up to {labels.max()}; "
                         "MNIST labels are 0..9, the label file is corrupted")
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


@dataclass(frozen=True)
class DatasetSplits:
    """A training/calibration split and an evaluation split of an image data set.

    Attributes:
        train: ``TensorDataset(images, labels)`` for training and calibration.
        eval: ``TensorDataset(images, labels)`` for evaluation (never used for training).
        description: one sentence saying where each split comes from (print it next to any
            accuracy figure).
    """

    train: TensorDataset
    eval: TensorDataset
    description: str


@dataclass(frozen=True)
class MnistSplits(DatasetSplits):
    """The splits of MNIST (see :class:`DatasetSplits`)."""


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


_CIFAR_SHAPE = (3, 32, 32)
_CIFAR_RECORD = 1 + 3 * 32 * 32  # label byte + channel-major RGB
_CIFAR_FILES = {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                "test": ("test_batch.bin",)}
_CIFAR_PY_FILES = ("data_batch_1", "test_batch", "batches.meta")


def read_cifar10_batch(path: str | Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Read one file of the CIFAR-10 binary version (e.g. ``test_batch.bin``).

    Args:
        path: the file: records of 1 label byte + 3,072 image bytes (R, G, B planes of 32x32).

    Returns:
        ``(images, labels)``: ``uint8`` tensor ``[N, 3, 32, 32]`` and ``int64`` tensor ``[N]``.

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: when the file is empty, its length is not a multiple of 3,073 bytes (a
            truncated download, or not the binary version) or a label is above 9.

    Example:
        >>> import tempfile
        >>> record = bytes([3]) + bytes(range(256)) * 12  # label 3 ("cat"), 3,072 pixel bytes
        >>> path = Path(tempfile.mkdtemp()) / "test_batch.bin"
        >>> _ = path.write_bytes(record * 2)
        >>> images, labels = read_cifar10_batch(path)
        >>> tuple(images.shape), labels.tolist(), images[0, 0, 0, :3].tolist()
        ((2, 3, 32, 32), [3, 3], [0, 1, 2])
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"CIFAR-10 file {path} does not exist")
    raw = path.read_bytes()
    if not raw or len(raw) % _CIFAR_RECORD:
        raise ValueError(
            f"{path}: {len(raw):,} bytes is not a whole number of 3,073-byte CIFAR-10 records "
            f"(1 label byte + 3x32x32 pixels); the file is truncated or not from the binary "
            f"version, download it again from {CIFAR10_URL}"
        )
    records = np.frombuffer(raw, dtype=np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0]
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise ValueError(f"{path}: record {bad} has label {labels[bad]}; CIFAR-10 labels are "
                         f"0..9, the file is corrupted or not CIFAR-10 (CIFAR-100's binary "
                         f"files have 2 label bytes)")
    images = records[:, 1:].reshape(-1, *_CIFAR_SHAPE)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _cifar10_folder(root: str | Path) -> Path:
    """``root`` itself or its ``cifar-10-batches-bin`` subfolder; refuses the python version."""
    folder = Path(root)
    if not folder.is_dir():
        raise FileNotFoundError(f"CIFAR-10: root={str(folder)!r} is not a folder; point it at "
                                f"cifar-10-batches-bin/ (unpacked from {CIFAR10_URL})")
    if (folder / "cifar-10-batches-bin").is_dir():
        return folder / "cifar-10-batches-bin"
    has_bin = any((folder / name).is_file() for names in _CIFAR_FILES.values() for name in names)
    python_version = (folder.name == "cifar-10-batches-py"
                      or (folder / "cifar-10-batches-py").is_dir()
                      or any((folder / name).is_file() for name in _CIFAR_PY_FILES))
    if python_version and not has_bin:
        raise ValueError(
            f"CIFAR-10: {folder} holds the python version (pickled files); lowbit does not "
            f"unpickle data (it can run arbitrary code). Download the binary version, "
            f"{CIFAR10_URL}, unpack it and point at its cifar-10-batches-bin folder"
        )
    return folder


def load_cifar10(root: str | Path, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """Load one CIFAR-10 split from the binary version.

    Args:
        root: ``cifar-10-batches-bin/`` or the folder it was unpacked into.
        split: ``"test"`` (``test_batch.bin``) or ``"train"`` (``data_batch_1.bin`` ..
            ``data_batch_5.bin``, in that order).

    Returns:
        ``(images, labels)``: ``uint8`` tensor ``[N, 3, 32, 32]`` and ``int64`` tensor ``[N]``.

    Raises:
        ValueError: on an unknown ``split``, a malformed file (see :func:`read_cifar10_batch`),
            or a folder holding the python (pickled) version.
        FileNotFoundError: when ``root`` or one of the split's files is missing.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> _ = (root / "test_batch.bin").write_bytes((bytes([9]) + bytes(3072)) * 5)
        >>> images, labels = load_cifar10(root, "test")
        >>> tuple(images.shape), CIFAR10_CLASSES[int(labels[0])]
        ((5, 3, 32, 32), 'truck')
    """
    if split not in _CIFAR_FILES:
        raise ValueError(f"load_cifar10: split={split!r} is unknown; use 'train' or 'test'")
    folder = _cifar10_folder(root)
    missing = [name for name in _CIFAR_FILES[split] if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10: {', '.join(missing)} not found in {folder}; unpack the binary version "
            f"({CIFAR10_URL}) and point at cifar-10-batches-bin/ (data_batch_1.bin .. "
            "data_batch_5.bin, test_batch.bin)"
        )
    parts = [read_cifar10_batch(folder / name) for name in _CIFAR_FILES[split]]
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


@dataclass(frozen=True)
class Cifar10Splits(DatasetSplits):
    """The splits of CIFAR-10 (see :class:`DatasetSplits`)."""


def _cifar_to_float(images: torch.Tensor, normalize: bool) -> torch.Tensor:
    x = images.to(torch.float32).div_(255.0)  # (N, 3, 32, 32) in [0, 1]
    if not normalize:
        return x
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    return x.sub_(mean).div_(std)


def cifar10_splits(root: str | Path, normalize: bool = True) -> Cifar10Splits:
    """Train/eval datasets of float images ``[N, 3, 32, 32]`` and int64 labels from CIFAR-10.

    The five training files (50,000 images) train and calibrate, ``test_batch.bin`` (10,000
    images) evaluates. Only the binary version is read (see :data:`CIFAR10_URL`).

    Args:
        root: ``cifar-10-batches-bin/`` or the folder it was unpacked into.
        normalize: standardize each channel with :data:`CIFAR10_MEAN` / :data:`CIFAR10_STD`
            (``(x/255 - mean) / std``); ``False`` keeps ``x/255`` in ``[0, 1]``.

    Returns:
        :class:`Cifar10Splits`.

    Raises:
        ValueError, FileNotFoundError: as :func:`load_cifar10`.

    Example:
        >>> import tempfile
        >>> root = Path(tempfile.mkdtemp())
        >>> record = bytes([1]) + bytes(3072)  # an all-black "automobile"
        >>> for name in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
        ...     _ = (root / name).write_bytes(record * 4)
        >>> splits = cifar10_splits(root)
        >>> len(splits.train), len(splits.eval), tuple(splits.train[0][0].shape)
        (20, 4, (3, 32, 32))
        >>> round(float(splits.eval[0][0][0, 0, 0]), 4)  # (0 - 0.4914) / 0.2470
        -1.9895
    """
    test_x, test_y = load_cifar10(root, "test")
    train_x, train_y = load_cifar10(root, "train")
    return Cifar10Splits(
        train=TensorDataset(_cifar_to_float(train_x, normalize), train_y),
        eval=TensorDataset(_cifar_to_float(test_x, normalize), test_y),
        description=(f"CIFAR-10 (binary version): the {len(train_y):,} training images for "
                     f"training/calibration, the {len(test_y):,} test images for evaluation"),
    )


def add_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mutually exclusive ``--mnist DIR`` / ``--cifar10 DIR`` options (what the examples
    take; read them with :func:`splits_and_model`).

    Example:
        >>> parser = argparse.ArgumentParser()
        >>> add_dataset_arguments(parser)
        >>> args = parser.parse_args(["--cifar10", "data/cifar-10-batches-bin"])
        >>> args.mnist, args.cifar10
        (None, 'data/cifar-10-batches-bin')
    """
    group = parser.add_argument_group(
        "data",
        "Default: the bundled real MNIST test set (10,000 images). With the standard files, "
        "use the full MNIST or CIFAR-10 instead; accuracy figures in the docs are MNIST only.")
    choice = group.add_mutually_exclusive_group()
    choice.add_argument("--mnist", metavar="DIR", default=None,
                        help="folder with the four standard MNIST IDX files "
                             "(train-/t10k-images-idx3-ubyte, train-/t10k-labels-idx1-ubyte, "
                             f"gzipped or not; from {MNIST_URL} or a mirror)")
    choice.add_argument("--cifar10", metavar="DIR", default=None,
                        help="folder with the CIFAR-10 binary version (cifar-10-batches-bin/ "
                             f"from {CIFAR10_URL}; not the python version); trains CifarCNN")


def splits_and_model(mnist: str | Path | None = None, cifar10: str | Path | None = None
                     ) -> tuple[DatasetSplits, Callable[[], nn.Module]]:
    """The data and the model class of an example: MNIST + ``MnistCNN`` or CIFAR-10 + ``CifarCNN``.

    Args:
        mnist: folder of MNIST IDX files (see :func:`mnist_splits`); ``None`` with ``cifar10``
            also ``None`` gives the bundled MNIST test set.
        cifar10: folder of the CIFAR-10 binary version (see :func:`cifar10_splits`).

    Returns:
        ``(splits, make_model)``: ``make_model()`` builds a fresh float model for the images.

    Raises:
        ValueError: when both folders are given, and as the readers.

    Example:
        >>> splits, make_model = splits_and_model()
        >>> make_model()(splits.eval.tensors[0][:2]).shape
        torch.Size([2, 10])
    """
    from lowbit.models import CifarCNN, MnistCNN  # lowbit.models imports tqdm: load it late

    if mnist is not None and cifar10 is not None:
        raise ValueError("splits_and_model: give mnist or cifar10, not both")
    if cifar10 is not None:
        return cifar10_splits(cifar10), CifarCNN
    return mnist_splits(mnist), MnistCNN
