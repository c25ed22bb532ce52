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
from pathlib import Path

import numpy as np

from ndot_core.events.framing import to_frames
from ndot_core.events.layout import SensorSize, as_event_array, validate_events
from ndot_core.events.readers import read_events


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
            found = [
                p
                for p in (self.root / split / f"{recording}.bs2", self.root / split / f"{recording}.bin")
                if p.is_file()
            ]
            if not found:
                raise DatasetError(
                    f"{self.root / split}: recording {recording!r} listed in labels.txt is missing"
                )
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

    def __init__(
        self,
        dataset: EventDataset,
        output_size: Sequence[int] | None = None,
        binary: bool = False,
        **rule: int,
    ) -> None:
        self.dataset, self.output_size, self.binary, self.rule = dataset, output_size, binary, rule

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: int) -> tuple[np.ndarray, int]:
        events, label = self.dataset[item]
        frames = to_frames(
            events, self.dataset.sensor_size, binary=self.binary, output_size=self.output_size, **self.rule
        )
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
            raise DatasetError(
                f"recordings give different numbers of frames {sorted(lengths)[:5]}; use a fixed-T rule"
            )
        if not frames:
            return np.zeros((0, 0, 2, 0, 0), dtype=np.float32), np.zeros(0, dtype=np.int64)
        return np.stack(frames), self.dataset.labels.copy()


__all__ = [
    "DatasetError",
    "DatasetNotFoundError",
    "EventDataset",
    "FramesView",
    "NMNISTFolder",
    "TonicEvents",
    "stratified_split_indices",
    "tonic_dataset",
]
