"""Where the client's event sequences come from: a recording, a folder, a labelled dataset, a camera.

A ``Sequence`` is one recording or one dataset sample: events in ``EVENT_DTYPE`` (t in µs, sorted),
the sensor size ``(W, H)`` and, for labelled datasets, the class. Sources are lazy: a file is read
only when its sequence is reached, so a 60k-sample folder costs nothing up front.
"""

from __future__ import annotations

import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ndot_core.events.layout import EVENT_DTYPE

LABELS_FILE = "labels.txt"


class SourceError(ValueError):
    """A recording path or labelled dataset that cannot be replayed (message names the path/line)."""


@dataclass(frozen=True)
class Sequence:
    """One recording or sample: ``events`` (EVENT_DTYPE, sorted by t), ``sensor_size`` (W, H), ``label``."""

    name: str
    events: np.ndarray
    sensor_size: tuple[int, int]
    label: int | None = None


class SequenceSource:
    """A lazy, sized collection of sequences: ``len(source)`` and ``iter(source)``."""

    def __init__(self, loaders: list[tuple[str, Callable[[], Sequence]]]) -> None:
        self._loaders = loaders

    def __len__(self) -> int:
        return len(self._loaders)

    def __iter__(self) -> Iterator[Sequence]:
        for _, load in self._loaders:
            yield load()

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._loaders]

    def select(self, limit: int | None = None, shuffle: bool = False, seed: int = 0) -> SequenceSource:
        """The first ``limit`` sequences, after a seeded shuffle when ``shuffle``."""
        loaders = list(self._loaders)
        if shuffle:
            random.Random(seed).shuffle(loaders)
        return SequenceSource(loaders[:limit] if limit is not None else loaders)


def _read_recording(path: Path) -> tuple[np.ndarray, tuple[int, int]]:
    from ndot_core.events.readers import read_events

    events, sensor_size = read_events(path)
    return events, (int(sensor_size[0]), int(sensor_size[1]))


def _recording_loader(path: Path, label: int | None = None) -> Callable[[], Sequence]:
    def load() -> Sequence:
        events, sensor_size = _read_recording(path)
        return Sequence(path.stem if label is not None else path.name, events, sensor_size, label)

    return load


def read_labels(labels_path: Path) -> list[tuple[str, int]]:
    """``(id, class)`` pairs of a ``labels.txt``: ``id<whitespace>class`` lines, ``#`` lines skipped."""
    pairs: list[tuple[str, int]] = []
    for number, line in enumerate(labels_path.read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].lstrip("-").isdigit():
            raise SourceError(f"{labels_path}:{number}: expected 'id<TAB>class', got {line!r}")
        label = int(fields[1])
        if label < 0:
            raise SourceError(f"{labels_path}:{number}: class {label} is negative")
        pairs.append((fields[0], label))
    if not pairs:
        raise SourceError(f"{labels_path}: no labelled samples")
    return pairs


def labelled_dataset(root: Path) -> SequenceSource:
    """A folder with ``labels.txt`` and one file per id, e.g. ``train/{id}.bs2`` (the nmnist-small layout).

    Each id's file is looked up in ``root/train``, then ``root``, then the other sub-folders.
    """
    folders = [root / "train", root, *sorted(p for p in root.iterdir() if p.is_dir() and p.name != "train")]
    files: dict[str, Path] = {}
    for folder in folders:
        if folder.is_dir():
            for path in sorted(folder.iterdir()):
                if path.is_file() and path.name != LABELS_FILE:
                    files.setdefault(path.stem, path)
    loaders = []
    for sample_id, label in read_labels(root / LABELS_FILE):
        if sample_id not in files:
            raise SourceError(f"{root}: no recording for sample id {sample_id!r} listed in {LABELS_FILE}")
        loaders.append((sample_id, _recording_loader(files[sample_id], label)))
    return SequenceSource(loaders)


def open_source(path: str | Path) -> SequenceSource:
    """One recording file, a labelled dataset folder (has ``labels.txt``), or a folder of recordings."""
    path = Path(path)
    if path.is_file():
        return SequenceSource([(path.name, _recording_loader(path))])
    if not path.is_dir():
        raise SourceError(f"{path}: no such file or folder")
    if (path / LABELS_FILE).is_file():
        return labelled_dataset(path)
    files = [p for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")]
    if not files:
        raise SourceError(f"{path}: folder holds no recordings")
    return SequenceSource([(p.name, _skip_unreadable(p)) for p in files])


def _skip_unreadable(path: Path) -> Callable[[], Sequence]:
    """Loader for a file of a plain folder: a file no reader knows becomes an empty sequence (skipped)."""

    def load() -> Sequence:
        try:
            events, sensor_size = _read_recording(path)
        except (ValueError, OSError) as error:  # EventError is a ValueError
            print(f"ndot-client: skipping {path}: {error}", file=sys.stderr)
            return Sequence(path.name, np.zeros(0, EVENT_DTYPE), (1, 1), None)
        return Sequence(path.name, events, sensor_size, None)

    return load


def synthetic_source(count: int, **camera_options) -> SequenceSource:
    """``count`` labelled samples of the synthetic DVS camera (``clients.synthetic.SyntheticCamera``)."""
    from clients.synthetic import SyntheticCamera

    camera = SyntheticCamera(**camera_options)

    def loader(index: int) -> Callable[[], Sequence]:
        def load() -> Sequence:
            events, label = camera.sample(index)
            return Sequence(f"synthetic-{index}", events, camera.sensor_size, label)

        return load

    return SequenceSource([(f"synthetic-{i}", loader(i)) for i in range(count)])
