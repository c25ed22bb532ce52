"""Labelled event datasets, their frames, and train / held-out arrays for a named dataset.

- :class:`NMNISTFolder`: a folder ``train/{id}.bs2`` + ``labels.txt`` (``id<TAB>class`` lines after a
  ``#`` header), e.g. ``../shared/data/nmnist-small``.
- :func:`tonic_dataset`: N-MNIST, DVS128 Gesture and CIFAR10-DVS through tonic's classes; they are
  fetched only with ``download=True`` (``--download``), never silently.
- :class:`FramesView`: any of them as ``(frames [T, 2, H', W'] float32, label)`` (usable by a torch
  ``DataLoader`` as is: numpy arrays collate to tensors).
- :func:`load_frames`: ``FrameSplits`` (train / held-out numpy arrays + labels) for a named dataset
  with the paper's preprocessing: T frames split by event count, DVS data resized to 48x48, and
  the training augmentation (random crop, flip where the classes allow it) as :meth:`FrameSplits.augment`.

Nothing here imports torch or tonic at import time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ndot_core.augment import augment
from ndot_core.events import SensorSize, as_event_array, validate_events
from ndot_core.framing import to_frames
from ndot_core.readers import read_events


class DatasetError(ValueError):
    """A dataset's files are malformed or a dataset name / option is unknown."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset is not on disk; the message names the flag that downloads it (``--download``)."""


def stratified_split_indices(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(kept, held_out)`` sorted indices: ``round(fraction * n_c)`` of each class ``c`` held out at random."""
    if not 0.0 <= fraction <= 1.0:
        raise DatasetError(f"split fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        held.append(members[: int(round(fraction * len(members)))])
    held_out = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    kept = np.setdiff1d(np.arange(len(labels)), held_out)
    return kept, held_out


class EventDataset:
    """Base: ``dataset[i] -> (events in EVENT_DTYPE, label)`` over a subset of a collection of recordings."""

    sensor_size: SensorSize
    num_classes: int

    def __init__(self, labels: np.ndarray, indices: np.ndarray | None = None) -> None:
        self._all_labels = np.asarray(labels, dtype=np.int64)
        self.indices = np.arange(len(labels)) if indices is None else np.asarray(indices, dtype=np.int64)

    @property
    def labels(self) -> np.ndarray:
        """Class of each item, int64 ``[len(self)]``."""
        return self._all_labels[self.indices]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> tuple[np.ndarray, int]:
        if not -len(self) <= item < len(self):
            raise IndexError(f"index {item} out of range for {len(self)} recordings")
        position = int(self.indices[item])
        return self._read(position), int(self._all_labels[position])

    def _read(self, position: int) -> np.ndarray:
        raise NotImplementedError

    def subset(self, items: Sequence[int] | np.ndarray) -> EventDataset:
        """A view on some of this dataset's items (positions in ``range(len(self))``)."""
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__)
        view.indices = self.indices[np.asarray(items, dtype=np.int64)]
        return view

    def stratified_split(self, fraction: float, seed: int = 0) -> tuple[EventDataset, EventDataset]:
        """``(rest, held_out)`` views with ``round(fraction * n_c)`` items of each class ``c`` held out."""
        kept, held_out = stratified_split_indices(self.labels, fraction, seed)
        return self.subset(kept), self.subset(held_out)

    def frames(self, **options: object) -> FramesView:
        """:class:`FramesView` over this dataset (``options`` as :class:`FramesView`)."""
        return FramesView(self, **options)  # type: ignore[arg-type]


class NMNISTFolder(EventDataset):
    """N-MNIST recordings in ``root/{split}/{id}.bs2`` (or ``.bin``) labelled by ``root/labels.txt``."""

    sensor_size = (34, 34)
    num_classes = 10

    def __init__(self, root: str | Path, split: str = "train") -> None:
        self.root = Path(root)
        labels_file = self.root / "labels.txt"
        if not labels_file.is_file():
            raise DatasetNotFoundError(
                f"no N-MNIST folder at {self.root} (needs labels.txt and {split}/{{id}}.bs2); point --data-dir "
                "at one, or use --dataset nmnist --download to fetch the full N-MNIST through tonic"
            )
        ids, labels = [], []
        for number, line in enumerate(labels_file.read_text().splitlines(), start=1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            parts = line.split()
            if len(parts) != 2 or not parts[1].isdigit() or int(parts[1]) >= self.num_classes:
                raise DatasetError(f"{labels_file}:{number}: expected 'id<TAB>class(0-9)', got {line!r}")
            ids.append(parts[0])
            labels.append(int(parts[1]))
        self.paths = []
        for recording in ids:
            found = [p for p in (self.root / split / f"{recording}.bs2", self.root / split / f"{recording}.bin")
                     if p.is_file()]
            if not found:
                raise DatasetError(f"{self.root / split}: recording {recording!r} listed in labels.txt is missing")
            self.paths.append(found[0])
        self.ids = ids
        super().__init__(np.asarray(labels, dtype=np.int64))

    def _read(self, position: int) -> np.ndarray:
        events, _ = read_events(self.paths[position], sensor_size=self.sensor_size, file_format="nmnist")
        return events


TONIC_DATASETS = {"nmnist": "NMNIST", "dvsgesture": "DVSGesture", "cifar10dvs": "CIFAR10DVS"}
TONIC_CLASSES = {"nmnist": 10, "dvsgesture": 11, "cifar10dvs": 10}


class TonicEvents(EventDataset):
    """A tonic dataset (events converted to EVENT_DTYPE and sorted by t)."""

    def __init__(self, name: str, root: str | Path, train: bool = True, download: bool = False) -> None:
        if name not in TONIC_DATASETS:
            raise DatasetError(f"unknown tonic dataset {name!r}; one of {tuple(TONIC_DATASETS)}")
        import tonic.datasets

        base = getattr(tonic.datasets, TONIC_DATASETS[name])

        def guarded_download(dataset: object) -> None:
            if not download:
                raise DatasetNotFoundError(
                    f"{name} not found under {Path(root) / base.__name__}; pass --download (download=True) "
                    f"to fetch it from {getattr(dataset, 'url', 'its source')}"
                )
            base.download(dataset)

        # Same class name, so tonic's folder (root/<ClassName>) is unchanged; only download is guarded.
        guarded = type(base.__name__, (base,), {"download": guarded_download})
        self.tonic = guarded(str(root)) if name == "cifar10dvs" else guarded(str(root), train=train)
        self.name = name
        self.sensor_size = tuple(base.sensor_size[:2])  # type: ignore[assignment]
        self.num_classes = TONIC_CLASSES[name]
        super().__init__(np.asarray(self.tonic.targets, dtype=np.int64))

    def _read(self, position: int) -> np.ndarray:
        raw, _ = self.tonic[position]
        events = as_event_array(raw)
        t = events["t"]
        if len(t) > 1 and (t[1:] < t[:-1]).any():
            events = events[np.argsort(t, kind="stable")]
        return validate_events(events, self.sensor_size, max_events=None)


def tonic_dataset(name: str, root: str | Path, train: bool = True, download: bool = False) -> TonicEvents:
    """N-MNIST / DVS Gesture / CIFAR10-DVS via tonic (CIFAR10-DVS has no split: ``train`` is ignored)."""
    return TonicEvents(name, root, train=train, download=download)


class FramesView:
    """``(frames [T, 2, H', W'] float32, label)`` for each recording of an :class:`EventDataset`.

    ``rule`` is the one :func:`~ndot_core.framing.to_frames` slicing option (``n_event_bins=T``,
    ``n_time_bins=T``, ``time_window_us=w`` or ``event_count=c``).
    """

    def __init__(self, dataset: EventDataset, output_size: Sequence[int] | None = None, binary: bool = False,
                 **rule: int) -> None:
        self.dataset, self.output_size, self.binary, self.rule = dataset, output_size, binary, rule

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> tuple[np.ndarray, int]:
        events, label = self.dataset[item]
        frames = to_frames(events, self.dataset.sensor_size, binary=self.binary, output_size=self.output_size,
                           **self.rule)
        return frames, label

    def arrays(self, progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """All items stacked: ``(x [N, T, 2, H', W'] float32, y [N] int64)``; needs a fixed T per item."""
        items = range(len(self))
        if progress:
            from tqdm import tqdm

            items = tqdm(items, desc="framing", unit="rec")
        frames = [self[i][0] for i in items]
        lengths = {len(f) for f in frames}
        if len(lengths) > 1:
            raise DatasetError(f"recordings give different numbers of frames {sorted(lengths)[:5]}; use a fixed-T rule")
        if not frames:
            return np.zeros((0, 0, 2, 0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
        return np.stack(frames), self.dataset.labels.copy()


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
    "dvsgesture": DatasetSpec(20, (48, 48), {"padding": 4, "flip": False}),  # flipping swaps left/right-arm classes
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
        from ndot_core.cifar import CIFAR_SPECS, load_cifar, normalize_images

        train_x, train_y = load_cifar(name, data_dir, train=True, download=download)
        test_x, test_y = load_cifar(name, data_dir, train=False, download=False)
        return FrameSplits(name, normalize_images(train_x, name), train_y, normalize_images(test_x, name), test_y,
                           CIFAR_SPECS[name].num_classes, dict(spec.augmentation))
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


__all__ = [
    "DATASETS", "DatasetError", "DatasetNotFoundError", "EventDataset", "FrameSplits",
    "FramesView", "NMNISTFolder", "TonicEvents", "load_frames", "stratified_split_indices", "tonic_dataset",
]
