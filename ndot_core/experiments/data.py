"""The experiments' dataset catalogue: each named dataset's defaults, loaded as train/held-out arrays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ndot_core.events.datasets import DatasetError, NMNISTFolder, tonic_dataset
from ndot_core.experiments.augment import augment
from ndot_core.experiments.cifar import CIFAR_SPECS, load_cifar, normalize_images


@dataclass
class FrameSplits:
    """Train and held-out arrays of one dataset, and how to augment a training batch."""

    name: str
    train_x: np.ndarray  # [N, T, 2, H, W] (event data) or [N, 3, 32, 32] (CIFAR images), float32
    train_y: np.ndarray  # [N] int64
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    augmentation: dict[str, int | bool] = field(default_factory=dict)

    def augment(self, batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """The dataset's training augmentation applied to a batch (a copy; identity when none)."""
        return augment(batch, rng, **self.augmentation) if self.augmentation else batch.copy()


@dataclass(frozen=True)
class DatasetSpec:
    """Defaults of one named dataset (the paper's preprocessing where the paper uses it)."""

    time_steps: int | None  # None: static images
    output_size: tuple[int, int] | None
    augmentation: dict[str, int | bool]
    heldout_fraction: float | None = None  # stratified held-out share where there is no official test split


DATASETS: dict[str, DatasetSpec] = {
    "nmnist-small": DatasetSpec(10, None, {}, heldout_fraction=0.2),
    "nmnist": DatasetSpec(10, None, {}),
    "dvsgesture": DatasetSpec(
        20, (48, 48), {"padding": 4, "flip": False}
    ),  # flipping swaps left/right-arm classes
    "cifar10dvs": DatasetSpec(10, (48, 48), {"padding": 4, "flip": True}, heldout_fraction=0.1),
    "cifar10": DatasetSpec(None, None, {"padding": 4, "flip": True, "cutout_size": 16}),
    "cifar100": DatasetSpec(None, None, {"padding": 4, "flip": True, "cutout_size": 16}),
}


def load_frames(
    name: str,
    data_dir: str | Path,
    time_steps: int | None = None,
    *,
    output_size: Sequence[int] | None = None,
    split_by: str = "events",
    heldout_fraction: float | None = None,
    seed: int = 0,
    download: bool = False,
    progress: bool = False,
) -> FrameSplits:
    """Train / held-out arrays for ``name`` in :data:`DATASETS`.

    Event datasets give ``[N, T, 2, H', W']`` frames: T bins of equal event count (``split_by="events"``,
    the paper's) or equal time (``"time"``), resized to ``output_size`` (default per dataset: 48x48 for
    DVS Gesture and CIFAR10-DVS). Held-out data is the official test split where one exists, else a
    stratified ``heldout_fraction`` (default nmnist-small 0.2, CIFAR10-DVS 0.1: the usual 9:1) drawn with ``seed``.
    CIFAR gives normalised images ``[N, 3, 32, 32]``. Missing data raises :class:`DatasetNotFoundError`.
    """
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; one of {tuple(DATASETS)}")
    spec = DATASETS[name]
    if spec.time_steps is None:
        train_x, train_y = load_cifar(name, data_dir, train=True, download=download)
        test_x, test_y = load_cifar(name, data_dir, train=False, download=False)
        return FrameSplits(
            name,
            normalize_images(train_x, name),
            train_y,
            normalize_images(test_x, name),
            test_y,
            CIFAR_SPECS[name].num_classes,
            dict(spec.augmentation),
        )
    if split_by not in ("events", "time"):
        raise DatasetError(f"split_by must be 'events' or 'time', got {split_by!r}")
    steps = time_steps or spec.time_steps
    rule = {"n_event_bins" if split_by == "events" else "n_time_bins": steps}
    size = output_size if output_size is not None else spec.output_size
    fraction = spec.heldout_fraction if heldout_fraction is None else heldout_fraction
    if name == "nmnist-small":
        train, test = NMNISTFolder(data_dir).stratified_split(fraction, seed)
    elif name == "cifar10dvs":
        train, test = tonic_dataset(name, data_dir, download=download).stratified_split(fraction, seed)
    else:
        train = tonic_dataset(name, data_dir, train=True, download=download)
        test = tonic_dataset(name, data_dir, train=False, download=download)
    train_x, train_y = train.frames(output_size=size, **rule).arrays(progress)
    test_x, test_y = test.frames(output_size=size, **rule).arrays(progress)
    return FrameSplits(name, train_x, train_y, test_x, test_y, train.num_classes, dict(spec.augmentation))


__all__ = ["DATASETS", "DatasetSpec", "FrameSplits", "load_frames"]
