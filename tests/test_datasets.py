"""Event datasets: the N-MNIST folder, tonic's classes behind a download guard, frames and named splits."""

from __future__ import annotations

import numpy as np
import pytest

from ndot_core.events.datasets import (
    DatasetError,
    DatasetNotFoundError,
    NMNISTFolder,
    stratified_split_indices,
    tonic_dataset,
)
from ndot_core.events.layout import EVENT_DTYPE
from ndot_core.experiments.data import load_frames


@pytest.fixture(scope="module")
def folder(nmnist_small):
    return NMNISTFolder(nmnist_small)


def test_nmnist_folder_reads_the_labelled_recordings(folder, nmnist_small):
    assert len(folder) == 1000
    counts = np.bincount(folder.labels, minlength=10)
    assert counts.sum() == 1000 and counts.min() >= 87 and counts.max() <= 117  # README: 87-117 per class
    listed = dict(line.split("\t") for line in (nmnist_small / "labels.txt").read_text().splitlines()[1:])
    for item in (0, 500, 999):
        events, label = folder[item]
        assert events.dtype == EVENT_DTYPE and 1_000 <= len(events) <= 7_300
        assert label == int(listed[folder.ids[item]])
        assert events["x"].max() < 34 and events["y"].max() < 34
        assert (np.diff(events["t"]) >= 0).all()
    with pytest.raises(IndexError):
        folder[1000]


def test_stratified_split_is_disjoint_balanced_and_seeded(folder):
    train, held = folder.stratified_split(0.2, seed=1)
    assert len(train) + len(held) == 1000
    assert not set(train.indices) & set(held.indices)
    per_class = np.bincount(folder.labels, minlength=10)
    np.testing.assert_array_equal(
        np.bincount(held.labels, minlength=10), np.round(0.2 * per_class).astype(int)
    )
    again, _ = folder.stratified_split(0.2, seed=1)
    other, _ = folder.stratified_split(0.2, seed=2)
    np.testing.assert_array_equal(train.indices, again.indices)
    assert not np.array_equal(train.indices, other.indices)
    events, label = held[0]  # views read the right recording
    np.testing.assert_array_equal(events, folder[int(held.indices[0])][0])
    assert label == folder.labels[held.indices[0]]


def test_split_fraction_bounds():
    with pytest.raises(DatasetError, match="fraction"):
        stratified_split_indices(np.zeros(4, dtype=np.int64), 1.5, 0)
    kept, held = stratified_split_indices(np.array([0, 0, 1, 1, 1]), 0.0, 0)
    assert len(held) == 0 and kept.tolist() == [0, 1, 2, 3, 4]


def test_frames_view_and_arrays(folder):
    small = folder.subset(range(6))
    view = small.frames(n_event_bins=8)
    frames, label = view[2]
    events, _ = small[2]
    assert frames.shape == (8, 2, 34, 34) and frames.sum() == len(events)
    x, y = view.arrays()
    assert x.shape == (6, 8, 2, 34, 34) and x.dtype == np.float32
    np.testing.assert_array_equal(y, small.labels)
    np.testing.assert_array_equal(x[2], frames)
    with pytest.raises(DatasetError, match="different numbers of frames"):
        small.frames(time_window_us=5_000).arrays()


def test_load_frames_nmnist_small(nmnist_small):
    splits = load_frames("nmnist-small", nmnist_small, time_steps=6, output_size=(17, 17), seed=0)
    assert splits.train_x.shape == (801, 6, 2, 17, 17) and splits.test_x.shape == (199, 6, 2, 17, 17)
    assert splits.num_classes == 10 and len(splits.train_y) == 801
    assert set(np.unique(splits.test_y)) == set(range(10))
    batch = splits.augment(splits.train_x[:3], np.random.default_rng(0))
    np.testing.assert_array_equal(batch, splits.train_x[:3])  # N-MNIST: no augmentation
    with pytest.raises(DatasetError, match="unknown dataset"):
        load_frames("mnist", nmnist_small)


def test_missing_folder_names_the_download_flag(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="--download"):
        NMNISTFolder(tmp_path)
    with pytest.raises(DatasetNotFoundError, match="--download"):
        load_frames("nmnist-small", tmp_path)


def test_malformed_labels_file(tmp_path):
    (tmp_path / "labels.txt").write_text("#sample #class\n1\t12\n")
    with pytest.raises(DatasetError, match=r"labels.txt:2: expected"):
        NMNISTFolder(tmp_path)
    (tmp_path / "labels.txt").write_text("#sample #class\n1\t3\n")
    with pytest.raises(DatasetError, match="recording '1' listed in labels.txt is missing"):
        NMNISTFolder(tmp_path)


@pytest.mark.parametrize("name", ["nmnist", "dvsgesture", "cifar10dvs"])
def test_tonic_datasets_never_download_unless_asked(tmp_path, name):
    with pytest.raises(DatasetNotFoundError, match="--download"):
        tonic_dataset(name, tmp_path)
    assert not any(tmp_path.rglob("*"))  # nothing fetched, nothing written


def write_dvsgesture_folder(root, rng):
    """tonic's DVSGesture layout: the archive beside ibmGestureTrain/userNN_light/{class}.npy (x, y, p, t ms)."""
    base = root / "DVSGesture"
    base.mkdir()
    (base / "ibmGestureTrain.tar.gz").write_bytes(b"")
    for user in range(1, 11):
        folder = base / "ibmGestureTrain" / f"user{user:02d}_fluorescent"
        folder.mkdir(parents=True)
        for label in range(11):
            count = 50
            rows = np.stack(
                [
                    rng.integers(0, 128, count),
                    rng.integers(0, 128, count),
                    rng.integers(0, 2, count),
                    np.sort(rng.integers(0, 1000, count)),
                ],
                axis=1,
            )
            if user == 1 and label == 0:
                rows = rows[::-1].copy()  # unsorted in time: the wrapper sorts
            np.save(folder / f"{label}.npy", rows.astype(np.int64))


def test_tonic_dvsgesture_through_the_wrapper(tmp_path):
    write_dvsgesture_folder(tmp_path, np.random.default_rng(0))
    dataset = tonic_dataset("dvsgesture", tmp_path, train=True)
    assert len(dataset) == 110 and dataset.sensor_size == (128, 128) and dataset.num_classes == 11
    assert sorted(np.unique(dataset.labels).tolist()) == list(range(11))
    for item in range(len(dataset)):
        events, label = dataset[item]
        assert events.dtype == EVENT_DTYPE and len(events) == 50
        assert (np.diff(events["t"]) >= 0).all()
        assert events["t"].max() < 1_000_000  # ms → µs by tonic
    frames, _ = dataset.frames(n_event_bins=5, output_size=(48, 48))[0]
    assert frames.shape == (5, 2, 48, 48) and frames.sum() == 50
