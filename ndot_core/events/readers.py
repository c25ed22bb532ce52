"""Event files → ``(events in EVENT_DTYPE, sensor_size (W, H))``, through the field's libraries.

| format | picked by | decoded by | sensor size from |
|---|---|---|---|
| N-MNIST 40-bit binary | ``.bin``, ``.bs2`` | ``tonic.io.read_mnist_file`` | no header: smallest of 34x34 (N-MNIST), 128x128 (DVS128), 256x256 holding every event |
| AEDAT 4.0 | ``.aedat4`` or ``#!AER-DAT4`` | ``aedat.Decoder`` (what ``tonic.io.read_aedat4`` wraps) | the event stream's width/height |
| Prophesee EVT 2.0 / 3.0 RAW | ``.raw`` + ``% evt`` / ``% format`` header | ``expelliarmus.Wizard`` | ``% geometry WxH``, ``% format ...;width=;height=``, else the camera plugin |
| Prophesee DAT | ``.dat`` | ``expelliarmus.Wizard("dat")`` | ``% Width`` / ``% Height`` |
| numpy | ``.npy`` / ``\\x93NUMPY`` | ``np.load(allow_pickle=False)`` (fields t, x, y, p) | -- |

When a file carries no sensor size, the ``sensor_size`` argument is used, else the bounding box
of the events ``(max x + 1, max y + 1)``. Every result is validated (coordinates inside the sensor,
``t`` non-decreasing); problems raise :class:`~ndot_core.events.EventError`.
AEDAT 2.0/3.x is not read: tonic 1.7.0's ``read_dvs_128`` is broken for it and no sample needs it.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ndot_core.events.layout import (
    EVENT_DTYPE,
    EventError,
    SensorSize,
    as_event_array,
    check_sensor_size,
    validate_events,
)

# Prophesee camera plugins → sensor (W, H), for RAW files whose header predates `% geometry`.
PROPHESEE_PLUGIN_SENSORS: dict[str, SensorSize] = {
    "gen41": (1280, 720),
    "imx636": (1280, 720),
    "imx646": (1280, 720),
    "gen4": (1280, 720),
    "gen31": (640, 480),
    "gen3": (640, 480),
    "genx320": (320, 320),
}
NMNIST_BIN_SENSORS: tuple[SensorSize, ...] = ((34, 34), (128, 128), (256, 256))
FORMATS = ("nmnist", "aedat4", "evt2", "evt3", "dat", "npy")


def read_header_lines(path: Path, limit: int = 1 << 16) -> list[str]:
    """The leading ``%`` comment lines of a Prophesee RAW / DAT file, without the ``%``."""
    lines: list[str] = []
    with open(path, "rb") as handle:
        while handle.tell() < limit:
            line = handle.readline()
            if not line.startswith(b"%"):
                break
            lines.append(line[1:].decode("latin-1").strip())
            if line.strip() == b"% end":
                break
    return lines


def prophesee_sensor_size(header: list[str]) -> SensorSize | None:
    """Sensor ``(W, H)`` from a Prophesee header: ``geometry WxH``, ``format ...;width=W;height=H``,
    ``Width W`` + ``Height H`` (DAT), or the ``plugin_name`` of the camera; None when none says."""
    fields: dict[str, str] = {}
    for line in header:
        key, _, value = line.partition(" ")
        fields[key.lower()] = value.strip()
    if match := re.fullmatch(r"(\d+)\s*x\s*(\d+)", fields.get("geometry", "")):
        return int(match[1]), int(match[2])
    format_fields = dict(part.split("=", 1) for part in fields.get("format", "").split(";") if "=" in part)
    if "width" in format_fields and "height" in format_fields:
        width, height = format_fields["width"].strip(), format_fields["height"].strip()
        if not (width.isdigit() and height.isdigit()):
            raise EventError(f"Prophesee header: format width={width!r}, height={height!r} are not sizes")
        return int(width), int(height)
    if fields.get("width", "").isdigit() and fields.get("height", "").isdigit():
        return int(fields["width"]), int(fields["height"])
    plugin = fields.get("plugin_name", "")
    for name, size in PROPHESEE_PLUGIN_SENSORS.items():
        if re.search(rf"(^|_){name}(_|$)", plugin):
            return size
    return None


def _raw_encoding(header: list[str], path: Path) -> str:
    for line in header:
        key, _, value = line.partition(" ")
        if key.lower() == "evt" and value.strip() in ("2.0", "3.0"):
            return "evt" + value.strip()[0]
        if key.lower() == "format" and value.split(";")[0].strip().upper() in ("EVT2", "EVT3"):
            return value.split(";")[0].strip().lower()
    raise EventError(f"{path}: RAW header names no EVT 2.0 / 3.0 encoding ({header[:8]})")


def detect_format(path: str | Path) -> str:
    """One of :data:`FORMATS`, from the extension, else from the first bytes."""
    path = Path(path)
    suffix = path.suffix.lower()
    by_suffix = {".bin": "nmnist", ".bs2": "nmnist", ".aedat4": "aedat4", ".dat": "dat", ".npy": "npy"}
    if suffix in by_suffix:
        return by_suffix[suffix]
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"#!AER-DAT4"):
        return "aedat4"
    if head.startswith(b"#!AER-DAT"):
        raise EventError(f"{path}: AEDAT {head[9:12].decode('latin-1')} is not supported (only AEDAT 4.0)")
    if head.startswith(b"\x93NUMPY"):
        return "npy"
    if head.startswith(b"%"):
        header = read_header_lines(path)
        if any(line.lower().startswith(("evt ", "format ")) for line in header):
            return _raw_encoding(header, path)
        return "dat"
    raise EventError(f"{path}: unknown event file format (extension {suffix!r}, first bytes {head[:8]!r})")


def _read_nmnist(path: Path) -> tuple[np.ndarray, SensorSize | None]:
    from tonic.io import read_mnist_file

    from ndot_core.events.layout import TONIC_DTYPE

    events = as_event_array(read_mnist_file(str(path), dtype=TONIC_DTYPE))
    if len(events) == 0:
        return events, NMNIST_BIN_SENSORS[0]
    x_max, y_max = int(events["x"].max()), int(events["y"].max())
    size = next(s for s in NMNIST_BIN_SENSORS if x_max < s[0] and y_max < s[1])
    return events, size


def _read_aedat4(path: Path) -> tuple[np.ndarray, SensorSize | None]:
    import aedat

    decoder = aedat.Decoder(str(path))
    streams = {sid: info for sid, info in decoder.id_to_stream().items() if info["type"] == "events"}
    if not streams:
        raise EventError(f"{path}: AEDAT4 file has no event stream")
    stream_id = min(streams)  # the first event stream, as tonic.io.read_aedat4 picks it
    packets = [
        packet["events"] for packet in decoder if packet["stream_id"] == stream_id and "events" in packet
    ]
    events = as_event_array(np.concatenate(packets)) if packets else np.zeros(0, dtype=EVENT_DTYPE)
    return events, (int(streams[stream_id]["width"]), int(streams[stream_id]["height"]))


def _read_prophesee(path: Path, encoding: str) -> tuple[np.ndarray, SensorSize | None]:
    from expelliarmus import Wizard

    header = read_header_lines(path)
    if encoding != "dat":
        encoding = _raw_encoding(header, path)
    suffix = ".dat" if encoding == "dat" else ".raw"
    if path.suffix.lower() == suffix:
        decoded = Wizard(encoding=encoding).read(str(path))
    else:  # expelliarmus insists on the extension (and resolves symlinks): hard link, else a copy
        with tempfile.TemporaryDirectory() as folder:
            named = Path(folder) / f"recording{suffix}"
            try:
                os.link(path, named)
            except OSError:
                shutil.copyfile(path, named)
            decoded = Wizard(encoding=encoding).read(str(named))
    return as_event_array(decoded), prophesee_sensor_size(header)


def _read_npy(path: Path) -> tuple[np.ndarray, SensorSize | None]:
    try:  # mapped first: a header that declares more than the file holds is refused, never allocated
        array = np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except ValueError as error:
        raise EventError(f"{path}: not a plain numpy array ({error})") from error
    if array.ndim != 1:
        raise EventError(f"{path}: events must be a 1-D structured array, got shape {array.shape}")
    return as_event_array(array), None


def read_events(
    path: str | Path, sensor_size: Sequence[int] | None = None, file_format: str | None = None
) -> tuple[np.ndarray, SensorSize]:
    """Read an event file: ``(events in EVENT_DTYPE, (W, H))``; the format by extension or header.

    ``sensor_size`` is used where the file carries none (and must agree where it does: a file whose
    events fall outside it raises :class:`EventError`). ``file_format`` forces one of :data:`FORMATS`.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no event file at {path}")
    kind = file_format or detect_format(path)
    if kind not in FORMATS:
        raise EventError(f"unknown file_format {kind!r}; one of {FORMATS}")
    if kind == "nmnist":
        events, found = _read_nmnist(path)
    elif kind == "aedat4":
        events, found = _read_aedat4(path)
    elif kind in ("evt2", "evt3", "dat"):
        events, found = _read_prophesee(path, kind)
    else:
        events, found = _read_npy(path)
    if sensor_size is not None:
        size = check_sensor_size(sensor_size)
    elif found is not None:
        size = found
    elif len(events):
        size = (int(events["x"].max()) + 1, int(events["y"].max()) + 1)
    else:
        raise EventError(f"{path}: empty file without a sensor size; pass sensor_size")
    try:
        validate_events(events, size, max_events=None)
    except EventError as error:
        raise EventError(f"{path}: {error}") from error
    return events, size
