"""Live event sources: a USB event camera or a DV network stream, through iniVation's dv-processing.

Both are a dv-processing ``InputBase`` (``dv_processing.io.camera.open()`` for a camera,
``dv_processing.io.NetworkReader(host, port)`` for the TCP stream the DV software or any
``NetworkWriter`` serves), so one class, :class:`DvSource`, reads both: ``read()`` returns the
events that arrived since the last call (``EVENT_DTYPE``, camera clock in µs; empty when none) and
raises :class:`SourceLost` once the device is unplugged or the stream closed. The sensor size comes
from the source (``getEventResolution()``).

Events outside the sensor (untrusted bytes from the network) are dropped and counted in
``invalid_events``; so are events whose time goes back before the source's latest one
(``late_events``: dv-processing hands them out in order, so a count here means a broken stream).

dv-processing is the optional extra ``ndot-stream[camera]``; without it :func:`import_dv` raises
:class:`LiveSourceUnavailable` whose message says how to install it.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from ndot_core.events.layout import EVENT_DTYPE

INSTALL_HINT = (
    "live cameras and DV streams need iniVation's dv-processing: "
    "pip install 'ndot-stream[camera]'  (or: pip install dv-processing)"
)


class LiveSourceUnavailable(RuntimeError):
    """dv-processing is not installed, or the source cannot be opened (message says why/what to do)."""


class SourceLost(ConnectionError):
    """The camera was unplugged or the network stream closed."""


def import_dv() -> Any:
    """The ``dv_processing`` module, or :class:`LiveSourceUnavailable` with the install command."""
    try:
        import dv_processing
    except ImportError as error:
        raise LiveSourceUnavailable(f"{INSTALL_HINT} ({error})") from error
    return dv_processing


class LiveSource(Protocol):
    """What the live client reads: a name, the sensor size, and batches of events as they arrive."""

    name: str
    sensor_size: tuple[int, int]

    def read(self) -> np.ndarray:
        """Events that arrived since the last call (may be empty); raises SourceLost when gone."""
        ...

    def close(self) -> None: ...


#: Opens a fresh connection to the same source (called again on every reconnect).
SourceOpener = Callable[[], LiveSource]


def dv_events(raw: np.ndarray) -> np.ndarray:
    """``EventStore.numpy()`` (fields timestamp:i8, x:i2, y:i2, polarity:i1) as ``EVENT_DTYPE``."""
    events = np.empty(len(raw), EVENT_DTYPE)
    if len(raw):
        events["t"] = raw["timestamp"]
        events["x"] = raw["x"]
        events["y"] = raw["y"]
        events["p"] = raw["polarity"] != 0
    return events


def inside_sensor(raw: np.ndarray, sensor_size: tuple[int, int]) -> np.ndarray:
    """Mask of the events of a dv-processing numpy batch whose x, y lie on the sensor."""
    width, height = sensor_size
    x, y = raw["x"].astype(np.int64), raw["y"].astype(np.int64)
    return (x >= 0) & (x < width) & (y >= 0) & (y < height)


class DvSource:
    """Any dv-processing ``InputBase`` (a USB camera or a ``NetworkReader``) as a :class:`LiveSource`."""

    def __init__(self, reader: Any, name: str) -> None:
        resolution = reader.getEventResolution()
        if not reader.isEventStreamAvailable() or resolution is None:
            raise LiveSourceUnavailable(f"{name}: the source has no event stream")
        self._reader = reader
        self.name = name
        self.camera = str(reader.getCameraName())
        self.sensor_size = (int(resolution[0]), int(resolution[1]))
        self.invalid_events = 0
        self.late_events = 0
        self._latest_t: int | None = None

    def read(self) -> np.ndarray:
        if self._reader is None:
            raise SourceLost(f"{self.name}: closed")
        try:
            batch = self._reader.getNextEventBatch()
        except RuntimeError as error:  # dv-processing raises RuntimeError on a broken connection
            raise SourceLost(f"{self.name}: {error}") from error
        if batch is None or len(batch) == 0:
            if not self._reader.isRunning():
                raise SourceLost(f"{self.name}: {'stream closed' if '://' in self.name else 'device gone'}")
            return np.zeros(0, EVENT_DTYPE)
        raw = batch.numpy()
        on_sensor = inside_sensor(raw, self.sensor_size)
        self.invalid_events += int(len(raw) - np.count_nonzero(on_sensor))
        events = dv_events(raw[on_sensor])
        if len(events) > 1 and np.any(np.diff(events["t"]) < 0):
            events = events[np.argsort(events["t"], kind="stable")]
        if self._latest_t is not None and len(events) and events["t"][0] < self._latest_t:
            in_order = events["t"] >= self._latest_t
            self.late_events += int(len(events) - np.count_nonzero(in_order))
            events = events[in_order]
        if len(events):
            self._latest_t = int(events["t"][-1])
        return events

    def close(self) -> None:
        self._reader = None  # dv-processing closes the socket / device when the object goes


HOST_PORT = re.compile(r"^(?P<host>\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.\-]+):(?P<port>\d{1,5})$")


def parse_host_port(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:7777`` for IPv6) as ``(host, port)``; ValueError naming the text."""
    match = HOST_PORT.match(text.strip())
    port = int(match["port"]) if match else 0
    if not match or not 0 < port < 65536:
        raise ValueError(f"--dv-stream {text!r}: expected HOST:PORT, e.g. 127.0.0.1:7777")
    return match["host"].strip("[]"), port


def dv_stream_opener(address: str) -> SourceOpener:
    """Opens ``dv_processing.io.NetworkReader(host, port)`` for ``HOST:PORT`` (checked now)."""
    host, port = parse_host_port(address)
    dv = import_dv()

    def open_stream() -> LiveSource:
        try:
            reader = dv.io.NetworkReader(host, port)
        except RuntimeError as error:
            raise SourceLost(f"dv-stream://{host}:{port}: {_first_line(error)}") from error
        return DvSource(reader, f"dv-stream://{host}:{port}")

    return open_stream


@dataclass(frozen=True)
class CameraInfo:
    """One connected camera as dv-processing's ``discover()`` lists it."""

    name: str
    model: str
    serial: str
    descriptor: Any


def list_cameras() -> list[CameraInfo]:
    """The event cameras connected over USB (``dv_processing.io.camera.discover()``)."""
    dv = import_dv()
    cameras = []
    for descriptor in dv.io.camera.discover():
        model, serial = str(descriptor.cameraModel), str(descriptor.serialNumber)
        cameras.append(CameraInfo(f"{model}_{serial}", model, serial, descriptor))
    return cameras


def camera_opener(name: str | None = None) -> SourceOpener:
    """Opens the USB camera ``name`` (``MODEL_SERIAL`` or the serial number; None = the first found)."""
    dv = import_dv()

    def open_camera() -> LiveSource:
        matches = [c for c in list_cameras() if name is None or name in (c.name, c.serial)]
        if not matches:
            wanted = "no event camera" if name is None else f"no camera {name!r}"
            raise SourceLost(f"camera: {wanted} connected (ndot-client --list-cameras)")
        try:
            reader = dv.io.camera.open(matches[0].descriptor)
        except RuntimeError as error:
            raise SourceLost(f"camera {matches[0].name}: {_first_line(error)}") from error
        return DvSource(reader, f"camera://{matches[0].name}")

    return open_camera


def _first_line(error: BaseException) -> str:
    """dv-processing's messages carry a boost source location after the reason: keep the reason."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return text.split(" [system:")[0]
