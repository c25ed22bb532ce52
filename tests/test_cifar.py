"""CIFAR binary-version reader on files written in the published record layout."""

from __future__ import annotations

import numpy as np
import pytest

from ndot_core.events.datasets import DatasetError, DatasetNotFoundError
from ndot_core.experiments.cifar import load_cifar, normalize_images, read_cifar_binary
from ndot_core.experiments.data import load_frames


def write_records(path, labels, label_bytes=1, seed=0):
    """Records ``<label bytes><1024 R><1024 G><1024 B>``; returns the images [N, 3, 32, 32]."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(labels), 3, 32, 32), dtype=np.uint8)
    heads = np.zeros((len(labels), label_bytes), dtype=np.uint8)
    heads[:, -1] = labels
    if label_bytes == 2:
        heads[:, 0] = 19  # coarse label, ignored
    path.parent.mkdir(parents=True, exist_ok=True)
    np.concatenate([heads, images.reshape(len(labels), -1)], axis=1).tofile(path)
    return images


def write_cifar10(root):
    folder = root / "cifar-10-batches-bin"
    train = [write_records(folder / f"data_batch_{i}.bin", [i, 9 - i], seed=i) for i in range(1, 6)]
    test = write_records(folder / "test_batch.bin", [3, 4, 5], seed=9)
    return np.concatenate(train), test


def test_cifar10_binary_layout(tmp_path):
    train_images, test_images = write_cifar10(tmp_path)
    images, labels = load_cifar("cifar10", tmp_path, train=True)
    assert images.shape == (10, 3, 32, 32) and images.dtype == np.uint8
    assert labels.tolist() == [1, 8, 2, 7, 3, 6, 4, 5, 5, 4]
    np.testing.assert_array_equal(images, train_images)
    images, labels = load_cifar("cifar10", tmp_path, train=False)
    np.testing.assert_array_equal(images, test_images)
    assert labels.tolist() == [3, 4, 5]


def test_cifar100_uses_the_fine_label(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    write_records(folder / "train.bin", [42, 99], label_bytes=2)
    write_records(folder / "test.bin", [7], label_bytes=2)
    _, labels = load_cifar("cifar100", tmp_path, train=True)
    assert labels.tolist() == [42, 99]


def test_malformed_and_missing_files(tmp_path):
    (tmp_path / "short.bin").write_bytes(b"\x00" * 3000)
    with pytest.raises(DatasetError, match="not a whole number of 3073-byte records"):
        read_cifar_binary(tmp_path / "short.bin", 1, 10)
    write_records(tmp_path / "bad.bin", [3, 12])
    with pytest.raises(DatasetError, match="record 1 has label 12"):
        read_cifar_binary(tmp_path / "bad.bin", 1, 10)
    with pytest.raises(DatasetNotFoundError, match="--download"):
        load_cifar("cifar10", tmp_path / "nothing")
    assert not (tmp_path / "nothing").exists()


def test_load_frames_gives_normalised_images_and_the_paper_augmentation(tmp_path):
    write_cifar10(tmp_path)
    splits = load_frames("cifar10", tmp_path)
    assert splits.train_x.shape == (10, 3, 32, 32) and splits.train_x.dtype == np.float32
    assert splits.test_x.shape == (3, 3, 32, 32)
    np.testing.assert_allclose(
        splits.train_x, normalize_images(load_cifar("cifar10", tmp_path)[0], "cifar10")
    )
    assert splits.augmentation == {"padding": 4, "flip": True, "cutout_size": 16}
    augmented = splits.augment(splits.train_x, np.random.default_rng(0))
    assert augmented.shape == splits.train_x.shape and (augmented == 0).any()
