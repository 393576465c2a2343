"""Tests for lowbit.data: the bundled MNIST files, the IDX parser and the deterministic split."""

from __future__ import annotations

import gzip
import hashlib
import struct

import numpy as np
import pytest
import torch

from lowbit.data import (
    BUNDLED_MNIST_DIR,
    BUNDLED_MNIST_MD5,
    load_mnist,
    mnist_splits,
    read_idx,
)


def _write_idx(path, array: np.ndarray, gz: bool = True, magic: bytes | None = None) -> None:
    header = magic or bytes([0, 0, 0x08, array.ndim])
    raw = header + struct.pack(f">{array.ndim}i", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)


@pytest.mark.parametrize("name", sorted(BUNDLED_MNIST_MD5))
def test_bundled_files_md5(name):
    digest = hashlib.md5((BUNDLED_MNIST_DIR / name).read_bytes()).hexdigest()
    assert digest == BUNDLED_MNIST_MD5[name]


def test_bundled_licence_is_there():
    text = (BUNDLED_MNIST_DIR / "LICENSE.md").read_text()
    assert "CC BY-SA 3.0" in text and "LeCun" in text and "Cortes" in text and "Burges" in text


def test_load_bundled_test_set():
    images, labels = load_mnist()
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (10_000,) and labels.dtype == torch.int64
    assert labels[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]  # the well-known first digits
    assert torch.bincount(labels).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974,
                                               1009]
    assert int(images.max()) == 255 and int(images.min()) == 0


def test_bundled_has_no_train_split():
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        load_mnist(split="train")


def test_unknown_split():
    with pytest.raises(ValueError, match="split='valid'"):
        load_mnist(split="valid")


def test_bundled_splits():
    splits = mnist_splits()
    assert (len(splits.train), len(splits.eval)) == (8000, 2000)
    assert "first 8,000" in splits.description and "last 2,000" in splits.description
    x = splits.train.tensors[0]
    assert x.shape == (8000, 1, 28, 28) and x.dtype == torch.float32
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1) < 0.05  # normalized
    _, labels = load_mnist()
    assert torch.equal(splits.eval.tensors[1], labels[8000:])
    raw = mnist_splits(normalize=False).train.tensors[0]
    assert float(raw.min()) == 0.0 and float(raw.max()) == 1.0


def test_full_set_layout_raw_files(tmp_path):
    """A folder with the 60k-style train files: train = train files, eval = test files."""
    rng = np.random.default_rng(0)
    for prefix, n in (("train", 30), ("t10k", 10)):
        _write_idx(tmp_path / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)),
                   gz=False)
        _write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte", rng.integers(0, 10, (n,)), gz=False)
    splits = mnist_splits(tmp_path)
    assert (len(splits.train), len(splits.eval)) == (30, 10)
    assert "training images" in splits.description and "test images" in splits.description
    images, _ = load_mnist(tmp_path, "train")
    assert images.shape == (30, 28, 28)


def test_truncated_file_is_a_clear_error(tmp_path):
    good = gzip.decompress((BUNDLED_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes())
    path = tmp_path / "t10k-labels-idx1-ubyte"
    path.write_bytes(good[:5000])
    with pytest.raises(ValueError, match="truncated or corrupted"):
        read_idx(path)


def test_truncated_gzip_is_a_clear_error(tmp_path):
    data = (BUNDLED_MNIST_DIR / "t10k-labels-idx1-ubyte.gz").read_bytes()
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cannot decompress"):
        read_idx(path)


def test_bad_magic_and_swapped_files(tmp_path):
    bad = tmp_path / "bad-idx"
    _write_idx(bad, np.zeros(4), magic=b"\x12\x34\x08\x01")
    with pytest.raises(ValueError, match="bad magic"):
        read_idx(bad)
    floats = tmp_path / "float-idx"
    _write_idx(floats, np.zeros(4), magic=b"\x00\x00\x0d\x01")
    with pytest.raises(ValueError, match="type code 0x0d"):
        read_idx(floats)
    # labels written where the images should be
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros(3))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(ValueError, match="expected 3"):
        load_mnist(tmp_path)


def test_count_mismatch(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
    with pytest.raises(ValueError, match="3 test images but 4 labels"):
        load_mnist(tmp_path)
