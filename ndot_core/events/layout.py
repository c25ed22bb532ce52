"""The event layout, its validation, and conversions from the field's libraries' layouts.

An event camera emits a stream of events ``e_i = (t_i, x_i, y_i, p_i)``: time in microseconds,
pixel column ``x < W``, pixel row ``y < H`` and polarity ``p`` (1 = ON, brightness went up).
Inside ndot-stream every event array is a 1-D numpy structured array of :data:`EVENT_DTYPE`
with an explicit sensor size ``(W, H)`` travelling beside it, and ``t`` non-decreasing.

Untrusted input (HTTP bodies, JSON columns, files) passes through :func:`validate_events`
(directly or via :func:`events_from_bytes` / :func:`events_from_columns`), which raises
:class:`EventError` naming the first offending index and value.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

EVENT_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "?")])
"""Internal layout: ``t`` µs (int64), ``x``/``y`` pixel (uint16), ``p`` polarity (bool). Packed, 13 bytes."""

WIRE_DTYPE = np.dtype([("t", "<i8"), ("x", "<u2"), ("y", "<u2"), ("p", "u1")])
"""HTTP body layout: packed little-endian 13-byte records ``t:int64 µs, x:uint16, y:uint16, p:uint8``."""

DEFAULT_MAX_EVENTS = 1_000_000
"""Default bound on the events in one packet (untrusted input)."""

EVENT_FIELDS = ("t", "x", "y", "p")
SensorSize = tuple[int, int]


class EventError(ValueError):
    """Bad event data: wrong layout, a value out of range, time going backwards, too many events."""


def check_sensor_size(sensor_size: Sequence[int]) -> SensorSize:
    """Return ``sensor_size`` as ``(W, H)`` ints, raising :class:`EventError` unless both are in [1, 65536]."""
    try:
        width, height = (int(v) for v in sensor_size)
    except (TypeError, ValueError) as error:
        raise EventError(f"sensor_size must be (width, height), got {sensor_size!r}") from error
    if not (0 < width <= 65536 and 0 < height <= 65536):
        raise EventError(f"sensor_size (width, height) must be in 1..65536, got ({width}, {height})")
    return width, height


def _first(mask: np.ndarray) -> int | None:
    """Index of the first True in ``mask``, or None."""
    if not mask.any():
        return None
    return int(mask.argmax())


def validate_events(
    events: np.ndarray,
    sensor_size: Sequence[int],
    max_events: int | None = DEFAULT_MAX_EVENTS,
    t_min: int | None = None,
) -> np.ndarray:
    """Check an event array and return it unchanged.

    Checks, in order: a 1-D structured array with fields t, x, y, p; at most ``max_events``
    events; ``0 <= x < W``; ``0 <= y < H``; ``p`` in {0, 1}; ``t >= t_min`` (when given);
    ``t[i] >= t[i-1]``. Raises :class:`EventError` naming the first bad index and its value.
    """
    width, height = check_sensor_size(sensor_size)
    names = (
        getattr(getattr(events, "dtype", None), "fields", None) or {}
    )  # titles too (aedat: "on" titled "p")
    missing = [name for name in EVENT_FIELDS if name not in names]
    if missing:
        raise EventError(f"events need fields {EVENT_FIELDS}, missing {missing}")
    if events.ndim != 1:
        raise EventError(f"events must be a 1-D array, got shape {events.shape}")
    if max_events is not None and len(events) > max_events:
        raise EventError(f"{len(events)} events, more than max_events={max_events} (index {max_events})")
    if len(events) == 0:
        return events
    for name, bound in (("x", width), ("y", height)):
        column = events[name]
        bad = (
            _first((column < 0) | (column >= bound)) if column.dtype.kind == "i" else _first(column >= bound)
        )
        if bad is not None:
            limit = "width" if name == "x" else "height"
            raise EventError(f"event {bad}: {name}={column[bad]} outside the sensor ({limit} {bound})")
    polarity = events["p"]
    if polarity.dtype != np.bool_:
        bad = _first((polarity != 0) & (polarity != 1))
        if bad is not None:
            raise EventError(f"event {bad}: p={polarity[bad]} not in {{0, 1}}")
    t = events["t"]
    if t_min is not None:
        bad = _first(t < t_min)
        if bad is not None:
            raise EventError(f"event {bad}: t={t[bad]} before t_min={t_min}")
    backwards = _first(t[1:] < t[:-1])
    if backwards is not None:
        raise EventError(f"event {backwards + 1}: t={t[backwards + 1]} decreases (previous t={t[backwards]})")
    return events


def events_from_bytes(
    data: bytes | bytearray | memoryview,
    sensor_size: Sequence[int],
    max_events: int | None = DEFAULT_MAX_EVENTS,
    t_min: int | None = None,
) -> np.ndarray:
    """Decode and validate a packed :data:`WIRE_DTYPE` body into a read-only :data:`EVENT_DTYPE` array.

    Zero-copy: the result is a view on ``data`` (the layouts differ only in p's type, and p is
    checked to be 0 or 1 before it is read as bool).
    """
    size = len(data)
    if size % WIRE_DTYPE.itemsize:
        raise EventError(
            f"body of {size} bytes is not a multiple of the {WIRE_DTYPE.itemsize}-byte event record "
            f"({size % WIRE_DTYPE.itemsize} trailing bytes after event {size // WIRE_DTYPE.itemsize})"
        )
    count = size // WIRE_DTYPE.itemsize
    if max_events is not None and count > max_events:
        raise EventError(f"{count} events, more than max_events={max_events} (index {max_events})")
    wire = np.frombuffer(data, dtype=WIRE_DTYPE)
    validate_events(wire, sensor_size, max_events, t_min)
    return wire.view(EVENT_DTYPE)


def events_to_bytes(events: np.ndarray) -> bytes:
    """Pack events into the :data:`WIRE_DTYPE` body that :func:`events_from_bytes` reads."""
    wire = np.empty(len(events), dtype=WIRE_DTYPE)
    for name in EVENT_FIELDS:
        wire[name] = events[name]
    return wire.tobytes()


def _describe(value: object) -> str:
    """A short, safe rendering of one untrusted JSON value (no repr of a nested container)."""
    if isinstance(value, list | tuple | dict | Mapping):
        return f"a {type(value).__name__}"
    return f"{value!r:.40}"


def _checked_values(name: str, values: object, allow_bool: bool) -> Sequence[int] | np.ndarray:
    """``values`` when it is a flat list (tuple, 1-D array) of integers, else :class:`EventError`.

    Booleans count as integers only where ``allow_bool`` (the polarity): JSON's ``true`` is no pixel
    or time. The element types are checked before numpy sees the list, so scalars, nested lists and
    strings are refused with the index of the first bad value, never crash the caller.
    """
    if isinstance(values, np.ndarray):
        if values.ndim != 1:
            raise EventError(f"column {name!r} must be a flat list, got shape {values.shape}")
        if values.dtype.kind == "b" and not allow_bool:
            raise EventError(f"column {name!r} holds booleans; {name} must be integers")
        return values
    if not isinstance(values, list | tuple):
        raise EventError(f"column {name!r} must be a list of integers, got {_describe(values)}")
    kinds = set(map(type, values))
    if kinds <= {int} or (allow_bool and kinds <= {int, bool}):
        return values
    for index, value in enumerate(values):
        if isinstance(value, list | tuple):
            raise EventError(f"column {name!r} must be a flat list: event {index} is {_describe(value)}")
        if isinstance(value, bool | np.bool_) and not allow_bool:
            raise EventError(f"event {index}: {name}={value} is a boolean, not an integer")
        if not isinstance(value, int | np.integer | bool):
            raise EventError(f"event {index}: {name}={_describe(value)} is not an integer")
    return values


def _integer_column(name: str, values: Sequence[int] | np.ndarray, lower: int, upper: int) -> np.ndarray:
    """One column (checked by ``_checked_values``) as int64; :class:`EventError` at the first out-of-range value."""
    try:
        column = np.asarray(values)
    except (ValueError, TypeError) as error:
        raise EventError(f"column {name!r} is not a flat list of numbers: {error}") from error
    if column.ndim != 1:
        raise EventError(f"column {name!r} must be a flat list, got shape {column.shape}")
    if column.dtype.kind not in "biu":
        # Slow path (floats, ints beyond int64): find the first bad value.
        for index, value in enumerate(values):
            if not isinstance(value, int | np.integer):
                raise EventError(f"event {index}: {name}={_describe(value)} is not an integer")
            if not lower <= int(value) <= upper:
                raise EventError(f"event {index}: {name}={value} outside [{lower}, {upper}]")
        raise EventError(f"column {name!r} cannot be read as integers (dtype {column.dtype})")
    if column.dtype == np.uint64:
        bad = _first(column > np.uint64(upper))
        if bad is not None:
            raise EventError(f"event {bad}: {name}={column[bad]} outside [{lower}, {upper}]")
    column = column.astype(np.int64)
    bad = _first((column < lower) | (column > upper))
    if bad is not None:
        raise EventError(f"event {bad}: {name}={column[bad]} outside [{lower}, {upper}]")
    return column


def events_from_columns(
    columns: Mapping[str, Sequence[int]],
    sensor_size: Sequence[int],
    max_events: int | None = DEFAULT_MAX_EVENTS,
    t_min: int | None = None,
) -> np.ndarray:
    """Build and validate an :data:`EVENT_DTYPE` array from ``{"t": [...], "x": [...], "y": [...], "p": [...]}``.

    Each column must be a flat list (tuple, 1-D array) of integers; ``p`` may hold booleans, ``t``,
    ``x`` and ``y`` may not. Anything else (scalars, null, strings, nested lists) is an :class:`EventError`.
    """
    width, height = check_sensor_size(sensor_size)
    if not isinstance(columns, Mapping):
        raise EventError(f"columns must be an object of lists t, x, y, p, got {_describe(columns)}")
    missing = [name for name in EVENT_FIELDS if name not in columns]
    if missing:
        raise EventError(f"columns {EVENT_FIELDS} required, missing {missing}")
    values = {name: _checked_values(name, columns[name], allow_bool=name == "p") for name in EVENT_FIELDS}
    lengths = {name: len(values[name]) for name in EVENT_FIELDS}
    if len(set(lengths.values())) != 1:
        raise EventError(f"columns differ in length: {lengths}")
    count = lengths["t"]
    if max_events is not None and count > max_events:
        raise EventError(f"{count} events, more than max_events={max_events} (index {max_events})")
    bounds = {"t": (-(2**63), 2**63 - 1), "x": (0, width - 1), "y": (0, height - 1), "p": (0, 1)}
    events = np.empty(count, dtype=EVENT_DTYPE)
    for name in EVENT_FIELDS:
        events[name] = _integer_column(name, values[name], *bounds[name])
    return validate_events(events, (width, height), max_events, t_min)


def as_event_array(events: np.ndarray, sensor_size: Sequence[int] | None = None) -> np.ndarray:
    """Convert any structured array with fields t, x, y, p into a new :data:`EVENT_DTYPE` array.

    Reads tonic's layout (x, y int16/int64, t int64, p bool/int), aedat's (t uint64, x, y uint16,
    p bool titled "on") and expelliarmus's (t int64, x, y int16, p uint8). Values that do not fit
    the internal layout raise :class:`EventError`; with ``sensor_size`` the result is also validated.
    """
    names = (
        getattr(getattr(events, "dtype", None), "fields", None) or {}
    )  # titles too (aedat: "on" titled "p")
    missing = [name for name in EVENT_FIELDS if name not in names]
    if missing:
        raise EventError(f"events need fields {EVENT_FIELDS}, missing {missing} (got {tuple(names)})")
    result = np.empty(len(events), dtype=EVENT_DTYPE)
    limits = {"t": (-(2**63), 2**63 - 1), "x": (0, 65535), "y": (0, 65535), "p": (0, 1)}
    for name in EVENT_FIELDS:
        column = events[name]
        lower, upper = limits[name]
        if column.dtype.kind in "iu" and len(column):
            info = np.iinfo(column.dtype)
            if info.min < lower:
                bad = _first(column < lower)
                if bad is not None:
                    raise EventError(f"event {bad}: {name}={column[bad]} below {lower}")
            if info.max > upper:
                bad = _first(column > np.array(upper).astype(column.dtype))
                if bad is not None:
                    raise EventError(f"event {bad}: {name}={column[bad]} above {upper}")
        elif column.dtype.kind not in "iub":
            raise EventError(f"field {name!r} must be integer or bool, got {column.dtype}")
        result[name] = column
    if sensor_size is not None:
        validate_events(result, sensor_size, max_events=None)
    return result


def from_tonic(events: np.ndarray, sensor_size: Sequence[int] | None = None) -> np.ndarray:
    """tonic's events (``tonic.io.events_struct``: x, y int16, t int64, p bool) → :data:`EVENT_DTYPE`."""
    return as_event_array(events, sensor_size)


def from_aedat(events: np.ndarray, sensor_size: Sequence[int] | None = None) -> np.ndarray:
    """aedat's packet events (t uint64, x, y uint16, p bool titled "on") → :data:`EVENT_DTYPE`."""
    return as_event_array(events, sensor_size)


def from_expelliarmus(events: np.ndarray, sensor_size: Sequence[int] | None = None) -> np.ndarray:
    """expelliarmus's events (t int64, x, y int16, p uint8) → :data:`EVENT_DTYPE`."""
    return as_event_array(events, sensor_size)


TONIC_DTYPE = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")])
"""tonic's default event layout (``tonic.io.events_struct``)."""


def to_tonic(events: np.ndarray) -> np.ndarray:
    """:data:`EVENT_DTYPE` → tonic's layout, for tonic transforms that expect it."""
    result = np.empty(len(events), dtype=TONIC_DTYPE)
    for name in EVENT_FIELDS:
        result[name] = events[name]
    return result
