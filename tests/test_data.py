"""Tests for lowbit.data: the bundled MNIST files, the IDX parser and the deterministic split;
the CIFAR-10 binary reader on synthetic files in the official format."""

from __future__ import annotations

import argparse
import gzip
import hashlib
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lowbit.data import (
    BUNDLED_MNIST_DIR,
    BUNDLED_MNIST_MD5,
    CIFAR10_MEAN,
    CIFAR10_STD,
    add_dataset_arguments,
    cifar10_splits,
    load_cifar10,
    load_mnist,
    mnist_splits,
    read_cifar10_batch,
    read_idx,
    splits_and_model,
)
from lowbit.models import CifarCNN, MnistCNN


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


def test_hostile_idx_headers_are_refused_before_reading(tmp_path):
    """A gzip file inflating to far more than its header announces had been decompressed in
    full first (1000:1: a 4 MB file took 4 GB); negative or wrapping dimensions failed in numpy
    without the file's name; images of another size loaded and failed later in the model."""
    bomb = tmp_path / "bomb-idx.gz"
    header = struct.pack(">BBBBiii", 0, 0, 8, 3, 1, 28, 28)
    bomb.write_bytes(gzip.compress(header + bytes(784 + (64 << 20)), compresslevel=1))
    with pytest.raises(ValueError, match=r"784 bytes of data.*holds more"):
        read_idx(bomb)
    for dims in ((-1, -784, 1), (1 << 30, 1 << 30, 16)):
        path = tmp_path / "dims-idx"
        path.write_bytes(struct.pack(">BBBBiii", 0, 0, 8, 3, *dims))
        with pytest.raises(ValueError, match=r"dims-idx: header says shape .* not a dataset"):
            read_idx(path)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 10, 10)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(3))
    with pytest.raises(ValueError, match="are 10 x 10 pixels; MNIST images are 28 x 28"):
        load_mnist(tmp_path)


def test_count_mismatch(tmp_path):
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.zeros((3, 28, 28)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
    with pytest.raises(ValueError, match="3 test images but 4 labels"):
        load_mnist(tmp_path)


CIFAR_FILES = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]


def write_cifar10(folder: Path, per_file: int = 60, seed: int = 0
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A synthetic ``cifar-10-batches-bin`` folder in the official binary format, built byte by
    byte from the spec (label byte, then the R, G, B planes, rows top to bottom)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    written = {}
    for name in CIFAR_FILES:
        labels = rng.integers(0, 10, per_file, dtype=np.uint8)
        images = rng.integers(0, 256, (per_file, 3, 32, 32), dtype=np.uint8)
        with open(folder / name, "wb") as f:
            for label, image in zip(labels, images, strict=True):
                f.write(bytes([label]))
                for channel in image:
                    for row in channel:
                        f.write(row.tobytes())
        written[name] = (images, labels)
    return written


def test_cifar10_round_trip(tmp_path):
    """Every label and pixel comes back where the format puts it, batches in order."""
    written = write_cifar10(tmp_path / "cifar-10-batches-bin")
    images, labels = read_cifar10_batch(tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin")
    assert images.dtype == torch.uint8 and labels.dtype == torch.int64
    assert np.array_equal(images.numpy(), written["data_batch_2.bin"][0])
    assert np.array_equal(labels.numpy(), written["data_batch_2.bin"][1])
    raw = (tmp_path / "cifar-10-batches-bin" / "data_batch_2.bin").read_bytes()
    assert images[1, 2, 5, 7] == raw[3073 + 1 + 2 * 1024 + 5 * 32 + 7]  # blue, row 5, col 7

    # the unpack folder or cifar-10-batches-bin itself
    for root in (tmp_path, tmp_path / "cifar-10-batches-bin"):
        train_x, train_y = load_cifar10(root, "train")
        expected = np.concatenate([written[n][0] for n in CIFAR_FILES[:5]])
        assert np.array_equal(train_x.numpy(), expected)
        assert np.array_equal(train_y.numpy(),
                              np.concatenate([written[n][1] for n in CIFAR_FILES[:5]]))

    splits = cifar10_splits(tmp_path)
    assert (len(splits.train), len(splits.eval)) == (300, 60)
    assert "300 training images" in splits.description and "60 test" in splits.description
    test_x, test_y = written["test_batch.bin"]
    assert torch.equal(splits.eval.tensors[1], torch.from_numpy(test_y.astype(np.int64)))
    mean = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    back = (splits.eval.tensors[0] * std + mean) * 255
    assert torch.equal(back.round().to(torch.uint8), torch.from_numpy(test_x))
    raw = cifar10_splits(tmp_path, normalize=False).eval.tensors[0]
    assert torch.equal(raw, torch.from_numpy(test_x).float() / 255)


def test_cifar10_malformed_files_name_the_file(tmp_path):
    write_cifar10(tmp_path, per_file=3)
    path = tmp_path / "data_batch_3.bin"
    good = path.read_bytes()
    path.write_bytes(good[:-100])
    with pytest.raises(ValueError, match=r"data_batch_3\.bin: 9,119 bytes is not a whole number"):
        load_cifar10(tmp_path, "train")
    path.write_bytes(b"")
    with pytest.raises(ValueError, match=r"data_batch_3\.bin: 0 bytes"):
        cifar10_splits(tmp_path)
    path.write_bytes(good[:3073] + bytes([10]) + good[3074:])  # record 1 labelled 10
    with pytest.raises(ValueError, match=r"data_batch_3\.bin: record 1 has label 10"):
        read_cifar10_batch(path)
    path.unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3\.bin not found.*cifar-10-binary"):
        cifar10_splits(tmp_path)
    with pytest.raises(FileNotFoundError, match="is not a folder"):
        cifar10_splits(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split='valid'"):
        load_cifar10(tmp_path, "valid")


@pytest.mark.parametrize("where", ["the -py folder", "its parent"])
def test_cifar10_python_version_is_refused(tmp_path, where):
    """The pickled version is never opened: a clear error says to get the binary version."""
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("data_batch_1", "test_batch", "batches.meta"):
        (folder / name).write_bytes(b"\x80\x04 not to be unpickled")
    root = folder if where == "the -py folder" else tmp_path
    with pytest.raises(ValueError, match=r"python version \(pickled.*binary version.*"
                                         r"cifar-10-binary\.tar\.gz.*cifar-10-batches-bin"):
        cifar10_splits(root)


def test_splits_and_model(tmp_path):
    write_cifar10(tmp_path, per_file=2)
    splits, make_model = splits_and_model(cifar10=tmp_path)
    assert make_model is CifarCNN and len(splits.train) == 10
    assert make_model()(splits.eval.tensors[0]).shape == (2, 10)
    splits, make_model = splits_and_model()
    assert make_model is MnistCNN and "bundled" in splits.description
    with pytest.raises(ValueError, match="not both"):
        splits_and_model(mnist=tmp_path, cifar10=tmp_path)


def test_dataset_arguments_are_exclusive(capsys):
    parser = argparse.ArgumentParser()
    add_dataset_arguments(parser)
    assert parser.parse_args([]).cifar10 is None
    with pytest.raises(SystemExit):
        parser.parse_args(["--mnist", "a", "--cifar10", "b"])
    assert "not allowed with argument" in capsys.readouterr().err
