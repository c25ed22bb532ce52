"""Any labelled folder of event recordings: ``labels.txt`` of ``id<TAB>class`` lines, recordings beside it.

    folder/labels.txt          "#..." comments and blank lines skipped; each other line "id<TAB>class"
                               (or spaces), class an integer in [0, K)
    folder/{id}{ext}           the recording of each id, beside labels.txt ...
    folder/train/{id}{ext}     ... or under train/ (the N-MNIST layout of ``../shared/data/nmnist-small``)

``ext`` is any extension ``ndot_core.events.read_events`` reads (``.bs2``, ``.bin``, ``.aedat4``,
``.raw``, ``.dat``, ``.npy``), or none when the id already names the file (``clip-1.aedat4``). Ids are
plain file names: one holding a path separator or ``..`` is refused, so a labels file never points
outside its folder. Every listed recording must exist (the error names the first that does not).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ndot_core.events.datasets import DatasetError, DatasetNotFoundError

#: Extensions tried after an id, in this order.
EXTENSIONS = (".bs2", ".bin", ".aedat4", ".raw", ".dat", ".npy")
#: Sub-folders tried for an id's recording, in this order ("" = beside labels.txt).
PLACES = ("", "train")


@dataclass(frozen=True)
class LabelledRecording:
    """One line of ``labels.txt``: its id, its class and the file found for it."""

    id: str
    label: int
    path: Path


def find_recording(root: Path, recording_id: str) -> Path | None:
    """The file of ``recording_id`` beside ``labels.txt`` or under ``train/`` (None when absent)."""
    for place in PLACES:
        folder = root / place if place else root
        for name in (recording_id, *(recording_id + ext for ext in EXTENSIONS)):
            candidate = folder / name
            if candidate.is_file():
                return candidate
    return None


def read_labelled_folder(root: Path, num_classes: int) -> list[LabelledRecording]:
    """The recordings ``root/labels.txt`` lists, in its order; ``DatasetError`` names the first bad line."""
    root = Path(root)
    labels_file = root / "labels.txt"
    if not labels_file.is_file():
        raise DatasetNotFoundError(
            f"{root} is not a labelled folder: it has no labels.txt (lines 'id<TAB>class', recordings "
            "beside it or under train/)"
        )
    recordings: list[LabelledRecording] = []
    seen: set[str] = set()
    for number, line in enumerate(labels_file.read_text(errors="replace").splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"{labels_file}:{number}"
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise DatasetError(f"{where}: expected 'id<TAB>class', got {line[:80]!r}")
        recording_id, label = parts[0], int(parts[1])
        if "/" in recording_id or "\\" in recording_id or recording_id in (".", "..") or ".." in recording_id:
            raise DatasetError(f"{where}: id {recording_id!r} must be a plain file name (no path, no '..')")
        if label >= num_classes:
            raise DatasetError(f"{where}: class {label} outside [0, {num_classes}) of the network")
        if recording_id in seen:
            raise DatasetError(f"{where}: id {recording_id!r} is listed twice")
        path = find_recording(root, recording_id)
        if path is None:
            raise DatasetError(
                f"{where}: no recording for id {recording_id!r} beside labels.txt or under train/ "
                f"(tried the id itself and the extensions {', '.join(EXTENSIONS)})"
            )
        seen.add(recording_id)
        recordings.append(LabelledRecording(recording_id, label, path))
    if not recordings:
        raise DatasetError(f"{labels_file} lists no recording")
    return recordings
