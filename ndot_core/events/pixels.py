"""Events -> flat pixel indices and counts: the primitives both framers share.

The flat index of an event is ``p H' W' + y' W' + x'`` with the optional resize done on the
coordinates, ``x' = floor(x W' / W)``, ``y' = floor(y H' / H)`` (a lookup table per sensor size).
It is built in cache-sized chunks of the packed event array; counting is one ``np.bincount`` per
frame (``np.add.at`` for frames sparser than their pixel count).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ndot_core.events.layout import (
    EVENT_DTYPE,
    WIRE_DTYPE,
    EventError,
    SensorSize,
    as_event_array,
    check_sensor_size,
)

# x (uint16 at byte 8) and y (uint16 at byte 10) of EVENT_DTYPE / WIRE_DTYPE read as one uint32 y<<16 | x.
_XY_VIEW = np.dtype({"names": ["xy"], "formats": ["<u4"], "offsets": [8], "itemsize": EVENT_DTYPE.itemsize})
_CHUNK = 1 << 16  # events per chunk: the temporaries stay in L2 cache
MAX_FRAMES = 1_000_000  # to_frames refuses more time windows than this (a unit mistake, not a recording)


def _packed(events: np.ndarray) -> np.ndarray:
    """``events`` in the 13-byte t/x/y/p layout (a view when it already is), else a converted copy."""
    if events.dtype in (EVENT_DTYPE, WIRE_DTYPE):
        return events
    return as_event_array(events)


def output_shape(sensor_size: Sequence[int], output_size: Sequence[int] | None) -> tuple[int, int]:
    """``(H', W')`` of the frames: ``output_size`` or the sensor's ``(H, W)``."""
    width, height = check_sensor_size(sensor_size)
    if output_size is None:
        return height, width
    out_height, out_width = (int(v) for v in output_size)
    if out_height <= 0 or out_width <= 0:
        raise EventError(f"output_size (height, width) must be positive, got {tuple(output_size)}")
    return out_height, out_width


def flat_pixel_index(
    events: np.ndarray, sensor_size: Sequence[int], output_size: Sequence[int] | None = None
) -> np.ndarray:
    """Flat index ``p H' W' + y' W' + x'`` (int64) of each event in a ``[2, H', W']`` frame.

    Raises :class:`EventError` naming the first event outside the sensor.
    """
    sensor = check_sensor_size(sensor_size)
    frame_shape = output_shape(sensor, output_size)
    return _index_pass(_packed(events), sensor, frame_shape, _pixel_map(sensor, frame_shape))[0]


def _pixel_map(sensor_size: SensorSize, frame_shape: tuple[int, int]) -> np.ndarray | None:
    """Output pixel ``y' W' + x'`` of each sensor pixel ``y W + x`` (None when no resize)."""
    width, height = sensor_size
    out_height, out_width = frame_shape
    if (out_height, out_width) == (height, width):
        return None
    columns = (np.arange(width, dtype=np.int64) * out_width) // width
    rows = (np.arange(height, dtype=np.int64) * out_height) // height
    return (rows[:, None] * out_width + columns[None, :]).ravel()


def _index_pass(
    events: np.ndarray,
    sensor: SensorSize,
    frame_shape: tuple[int, int],
    pixel_map: np.ndarray | None,
    edges_us: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray | None]:
    """One chunked pass over packed events: their flat indices and, given sorted ``edges_us``, the
    cuts ``cuts[k] = first i with t[i] >= edges_us[k]`` (len(events) when none), found chunk by
    chunk so t is read once, in cache. With ``edges_us`` t must be non-decreasing (else EventError)."""
    width, height = sensor
    count = len(events)
    index = np.empty(count, dtype=np.int64)
    xy, polarity, t = events.view(_XY_VIEW)["xy"], events["p"], events["t"]
    scratch = np.empty(min(count, _CHUNK), dtype=np.int64)
    times = np.empty(min(count, _CHUNK), dtype=np.int64)
    cuts = None if edges_us is None else np.full(len(edges_us), count, dtype=np.int64)
    resolved, previous_t = 0, None
    for start in range(0, count, _CHUNK):
        stop = min(count, start + _CHUNK)
        out, tmp = index[start:stop], scratch[: stop - start]
        np.copyto(tmp, xy[start:stop], casting="unsafe")
        np.right_shift(tmp, 16, out=out)  # y
        np.bitwise_and(tmp, 0xFFFF, out=tmp)  # x
        if out.max() >= height or tmp.max() >= width:
            _raise_outside(events[start:stop], start, width, height)
        out *= width
        out += tmp
        if pixel_map is not None:
            np.take(pixel_map, out, out=out)
        np.copyto(tmp, polarity[start:stop], casting="unsafe")
        tmp *= frame_shape[0] * frame_shape[1]
        out += tmp
        if cuts is not None:
            chunk_t = times[: stop - start]
            np.copyto(chunk_t, t[start:stop])
            backwards = chunk_t[1:] < chunk_t[:-1]
            if backwards.any() or (previous_t is not None and chunk_t[0] < previous_t):
                bad = (
                    start
                    if previous_t is not None and chunk_t[0] < previous_t
                    else start + 1 + int(backwards.argmax())
                )
                raise EventError(
                    f"event {bad}: t={t[bad]} decreases (previous t={t[bad - 1]}); sort events by t"
                )
            previous_t = int(chunk_t[-1])
            upto = int(np.searchsorted(edges_us, previous_t, side="right"))  # edges this chunk resolves
            if upto > resolved:
                cuts[resolved:upto] = start + np.searchsorted(chunk_t, edges_us[resolved:upto], side="left")
                resolved = upto
    return index, cuts


def _raise_outside(events: np.ndarray, offset: int, width: int, height: int) -> None:
    bad = int(np.argmax((events["x"] >= width) | (events["y"] >= height)))
    raise EventError(
        f"event {offset + bad}: (x={events['x'][bad]}, y={events['y'][bad]}) outside the {width}x{height} sensor"
    )


def count_into(frame: np.ndarray, index: np.ndarray, binary: bool = False) -> None:
    """Add 1 to the zero-initialised flat float32 ``frame`` at each of ``index`` (then clip to 1 when binary).

    ``np.bincount`` when there are at least as many events as bins; ``np.add.at`` (numpy >= 2
    makes it a tight loop) for sparse frames, where zero-filling and converting bincount's int64
    histogram would cost more than the events themselves.
    """
    if len(index) >= frame.size:
        counts = np.bincount(index, minlength=frame.size)
        frame[:] = counts > 0 if binary else counts
    else:
        np.add.at(frame, index, np.float32(1))
        if binary:
            np.minimum(frame, 1, out=frame)
