"""Events → frames: a whole recording at once (:func:`to_frames`) or a live stream (:class:`StreamFramer`).

A frame counts the events of one time-step per polarity and pixel::

    F[k, p, y', x'] = #{ i in bin k : p_i = p, y'(y_i) = y', x'(x_i) = x' }     (binary: min(F, 1))

with the optional resize to ``output_size = (H', W')`` done on the event coordinates,
``x' = floor(x W' / W)``, ``y' = floor(y H' / H)``: each output pixel sums the block of sensor
pixels that maps onto it (exact sum-pooling when W' divides W, nearest-index blocks of
``floor``/``ceil(W / W')`` pixels otherwise). Counting is one ``np.bincount`` per frame on the
flat index ``p H' W' + y' W' + x'`` (``np.add.at`` for frames sparser than their pixel count); the
index is built in cache-sized chunks of the packed event array (``benchmarks/bench_events.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ndot_core.events.layout import EventError, check_sensor_size
from ndot_core.events.pixels import (
    MAX_FRAMES,
    _index_pass,
    _packed,
    _pixel_map,
    count_into,
    flat_pixel_index,
    output_shape,
)

#: Packets an open window keeps apart before they are joined into one array (each part costs an array
#: header and a term of ``pending_events``; joining costs a copy of the window's events, so it is
#: rare: one in this many packets).
MAX_PENDING_PARTS = 256

__all__ = [
    "MAX_FRAMES",
    "StreamFramer",
    "count_into",
    "flat_pixel_index",
    "output_shape",
    "to_frames",
    "windows_spanned",
]


def _count_frames(
    index: np.ndarray, cuts: np.ndarray, frame_shape: tuple[int, int], binary: bool
) -> np.ndarray:
    """Frames ``[len(cuts) - 1, 2, H', W']`` float32; frame k counts ``index[cuts[k]:cuts[k+1]]``."""
    out_height, out_width = frame_shape
    frames = np.zeros((len(cuts) - 1, 2 * out_height * out_width), dtype=np.float32)
    for k in range(len(cuts) - 1):
        if cuts[k + 1] > cuts[k]:
            count_into(frames[k], index[cuts[k] : cuts[k + 1]], binary)
    return frames.reshape(len(cuts) - 1, 2, out_height, out_width)


def windows_spanned(t: np.ndarray, window_us: int, origin_us: int = 0) -> int:
    """Window boundaries the times ``t`` cross: ``(max t - o) // w - (min t - o) // w`` (0 when empty).

    A packet closes at most this many windows of its own (gap frames included), plus the one open
    before it and the gap up to its first event: the stateless bound the API checks before publishing.
    """
    if len(t) == 0:
        return 0
    return int((int(t.max()) - origin_us) // window_us - (int(t.min()) - origin_us) // window_us)


def to_frames(
    events: np.ndarray,
    sensor_size: Sequence[int],
    *,
    n_time_bins: int | None = None,
    time_window_us: int | None = None,
    event_count: int | None = None,
    n_event_bins: int | None = None,
    binary: bool = False,
    output_size: Sequence[int] | None = None,
    start_time_us: int | None = None,
) -> np.ndarray:
    """Frames ``[T, 2, H', W']`` float32 from a whole recording (``t`` non-decreasing), by exactly one rule:

    - ``time_window_us=w``: bins ``[t0 + k w, t0 + (k+1) w)`` with ``t0 = start_time_us`` or the first
      event's t (events before it are ignored); ``T = (t_last - t0) // w + 1``, the last one partial.
      Equal to ``tonic.transforms.ToFrame(time_window=w, include_incomplete=True)`` unless
      ``t_last - t0`` is a multiple of w (tonic then drops the events at ``t_last``).
    - ``n_time_bins=n``: bins of ``w = max(1, (t_last - t0) // n)`` µs from t0; events at or after
      ``t0 + n w`` go in the last bin (tonic's ``ToFrame(n_time_bins=n)`` drops them).
    - ``event_count=c``: consecutive groups of c events, the last one partial
      (tonic's ``ToFrame(event_count=c, include_incomplete=True)``).
    - ``n_event_bins=n``: n groups of ``floor((k+1) N / n) - floor(k N / n)`` events each, so none is
      dropped (tonic's ``ToFrame(n_event_bins=n)`` when n divides N); the paper's "split by event count".

    ``binary`` clips counts to 1; ``output_size=(H', W')`` resizes by coordinate mapping (module doc).
    No events: zero frames for ``n_time_bins`` / ``n_event_bins``, ``T = 0`` otherwise.
    """
    rules = {
        "n_time_bins": n_time_bins,
        "time_window_us": time_window_us,
        "event_count": event_count,
        "n_event_bins": n_event_bins,
    }
    chosen = {name: value for name, value in rules.items() if value is not None}
    if len(chosen) != 1:
        raise EventError(f"give exactly one of {tuple(rules)}, got {tuple(chosen) or 'none'}")
    ((rule, amount),) = chosen.items()
    if int(amount) != amount or amount < 1:
        raise EventError(f"{rule} must be a positive integer, got {amount!r}")
    amount = int(amount)
    sensor = check_sensor_size(sensor_size)
    frame_shape = output_shape(sensor, output_size)
    events = _packed(events)
    count = len(events)
    if count == 0:
        bins = amount if rule in ("n_time_bins", "n_event_bins") else 0
        return np.zeros((bins, 2, *frame_shape), dtype=np.float32)
    pixel_map = _pixel_map(sensor, frame_shape)
    t_first, t_last = int(events["t"][0]), int(events["t"][-1])
    if rule == "time_window_us":
        t0 = t_first if start_time_us is None else int(start_time_us)
        n_bins = max(0, (t_last - t0) // amount + 1)
        if n_bins > MAX_FRAMES:
            raise EventError(
                f"time_window_us={amount} over {t_last - t0} µs gives {n_bins} frames (> {MAX_FRAMES})"
            )
        index, cuts = _index_pass(events, sensor, frame_shape, pixel_map, t0 + amount * np.arange(n_bins + 1))
        cuts[-1] = count  # the last window is partial: it ends with the recording
    elif rule == "n_time_bins":
        width = max(1, (t_last - t_first) // amount)
        index, cuts = _index_pass(
            events, sensor, frame_shape, pixel_map, t_first + width * np.arange(amount + 1)
        )
        cuts[-1] = count  # events at or after t0 + n w join the last bin
    else:
        index, _ = _index_pass(events, sensor, frame_shape, pixel_map)
        if rule == "event_count":
            cuts = np.append(np.arange(0, count, amount), count)
        else:
            cuts = (np.arange(amount + 1, dtype=np.int64) * count) // amount
    return _count_frames(index, cuts, frame_shape, binary)


class StreamFramer:
    """Incremental framer for one live stream: fed packets of any size, emits each window's frame once it closes.

    Window grid: window ``k`` covers ``[origin_us + k w, origin_us + (k+1) w)`` µs, ``w = window_us``.
    The first window of a sequence is the grid window holding its first event (the first event's t
    floored to the grid; with the default ``origin_us=0`` window starts are multiples of w, so every
    stream of one camera clock shares the same grid).

    Event clock: ``c = max t`` seen in the sequence. The open window is the one holding c; when an
    event moves c past the open window's end, the open window closes and its frame
    ``[2, H', W']`` float32 is emitted (counts, or 0/1 when ``binary``; resized as :func:`to_frames`).

    Policies:

    - **gaps**: windows with no events between two events are real SNN time-steps (membranes
      decay), so they are emitted as zero frames, at most ``max_gap_windows`` per gap; the rest are
      skipped and counted in :attr:`skipped_windows`.
    - **late events**: an event with ``t`` before the open window's start is dropped and counted in
      :attr:`late_events`. Events out of order *within* the open window are kept.
    - **end of sequence**: :meth:`flush` closes the open window and returns its frame; the next event
      then opens a fresh window wherever it falls (no gap frames, nothing is late).

    The output depends only on the sequence of events, not on how it is cut into packets, and
    :meth:`state_dict` / :meth:`from_state_dict` capture everything needed to continue exactly.
    Events must lie inside the sensor (:func:`~ndot_core.events.validate_events`); ``t`` may be unsorted.
    """

    def __init__(
        self,
        sensor_size: Sequence[int],
        window_us: int = 10_000,
        output_size: Sequence[int] | None = None,
        binary: bool = False,
        max_gap_windows: int = 100,
        origin_us: int = 0,
    ) -> None:
        self.sensor_size = check_sensor_size(sensor_size)
        self.frame_shape = output_shape(self.sensor_size, output_size)
        self.output_size = None if output_size is None else self.frame_shape
        self._pixel_map = _pixel_map(self.sensor_size, self.frame_shape)
        if int(window_us) < 1 or int(max_gap_windows) < 0:
            raise EventError(
                f"window_us must be >= 1 and max_gap_windows >= 0, got {window_us}, {max_gap_windows}"
            )
        self.window_us = int(window_us)
        self.binary = bool(binary)
        self.max_gap_windows = int(max_gap_windows)
        self.origin_us = int(origin_us)
        self.late_events = 0
        self.skipped_windows = 0
        self.frames_emitted = 0
        self.reset()

    def reset(self) -> None:
        """Drop the open window (a new sequence starts); the counters are kept."""
        self._open_window: int | None = None
        self._clock_us = 0
        self._pending: list[np.ndarray] = []

    @property
    def window_start_us(self) -> int | None:
        """Start time of the open window, or None when no window is open."""
        return None if self._open_window is None else self.origin_us + self._open_window * self.window_us

    @property
    def pending_events(self) -> int:
        """Events counted into the open window so far."""
        return sum(len(part) for part in self._pending)

    def _close(self, pending: list[np.ndarray]) -> np.ndarray:
        frame = np.zeros(2 * self.frame_shape[0] * self.frame_shape[1], dtype=np.float32)
        count_into(frame, np.concatenate(pending) if len(pending) > 1 else pending[0], self.binary)
        return frame.reshape(2, *self.frame_shape)

    def push(
        self, events: np.ndarray, max_frames: int | None = None, max_window_events: int | None = None
    ) -> list[np.ndarray]:
        """Add a packet; return the frames of the windows it closed (gap frames included), oldest first.

        ``max_frames``: a packet that would close more windows than this (gap frames included) raises
        :class:`EventError` and changes nothing, counters included (a bound on the work one packet causes).
        ``max_window_events``: likewise for a packet after which the open window would hold more events
        than this (a window's events are kept until it closes: a bound on a stream's memory, whose
        packets could otherwise all fall in one window that never closes).
        """
        events = _packed(events)
        if len(events) == 0:
            return []
        if len(self._pending) >= MAX_PENDING_PARTS:  # many small packets in one window: one array again
            self._pending = [np.concatenate(self._pending)]  # (a new list: a snapshot keeps the old one)
        index, _ = _index_pass(events, self.sensor_size, self.frame_shape, self._pixel_map)
        t = np.ascontiguousarray(events["t"])
        w, origin = self.window_us, self.origin_us
        if self._open_window is not None:  # fast path: the whole packet falls in the open window
            start = origin + self._open_window * w
            t_low, t_high = int(t.min()), int(t.max())
            if t_low >= start and t_high < start + w:
                if max_window_events is not None:
                    self._check_window_events(self.pending_events + len(index), max_window_events)
                self._pending.append(index)
                self._clock_us = max(self._clock_us, t_high)
                return []
        clock = np.maximum.accumulate(t)
        if self._open_window is not None:
            np.maximum(clock, self._clock_us, out=clock)
        window = (clock - origin) // w
        late = t < origin + window * w
        late_count = int(late.sum())
        if late_count:
            window, index = window[~late], index[~late]
        change = np.flatnonzero(window[1:] != window[:-1]) + 1
        bounds = np.concatenate(([0], change, [len(window)]))
        if max_frames is not None and len(window):
            frames_due = self._frames_closed(window[bounds[:-1]])
            if frames_due > max_frames:
                raise EventError(
                    f"packet would close {frames_due} windows of {w} µs (events from t={int(t.min())} "
                    f"to t={int(t.max())}); at most {max_frames} per packet: send smaller packets"
                )
        if max_window_events is not None and len(window):
            last = int(bounds[-1] - bounds[-2])  # the packet's events in the window left open
            held = self.pending_events if int(window[-1]) == self._open_window else 0
            self._check_window_events(held + last, max_window_events)
        self.late_events += late_count
        self._clock_us = int(clock[-1])
        if len(window) == 0:  # every event was late
            return []
        frames: list[np.ndarray] = []
        current, pending = self._open_window, self._pending
        for begin, end in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
            window_id = int(window[begin])
            if current is not None and window_id != current:
                frames.append(self._close(pending))
                gap = window_id - current - 1
                shown = min(gap, self.max_gap_windows)
                frames.extend(np.zeros((2, *self.frame_shape), dtype=np.float32) for _ in range(shown))
                self.skipped_windows += gap - shown
                pending = []
            current = window_id
            pending.append(index[begin:end])
        self._open_window, self._pending = current, pending
        self.frames_emitted += len(frames)
        return frames

    def _check_window_events(self, held: int, most: int) -> None:
        if held > most:
            raise EventError(
                f"the open window of {self.window_us} µs would hold {held} events, at most {most}: a "
                "window's events are kept until an event past its end closes it"
            )

    def snapshot(self) -> tuple:
        """What :meth:`restore` needs to undo the pushes and flushes after it, in O(1) (no copy of the
        open window's events: ``push`` only appends to their list, ``flush`` starts a new one)."""
        counters = (self.late_events, self.skipped_windows, self.frames_emitted)
        return self._open_window, self._clock_us, self._pending, len(self._pending), counters

    def restore(self, snapshot: tuple) -> None:
        """Back to the state of :meth:`snapshot` (of this framer)."""
        self._open_window, self._clock_us, self._pending, parts, counters = snapshot
        del self._pending[parts:]
        self.late_events, self.skipped_windows, self.frames_emitted = counters

    def _frames_closed(self, window_ids: np.ndarray) -> int:
        """Frames a push emits for the packet's distinct windows in order: a closed window plus its gap
        frames (at most ``max_gap_windows``) per change of window."""
        ids = window_ids.astype(np.int64)
        if self._open_window is not None and ids[0] != self._open_window:
            ids = np.concatenate(([self._open_window], ids))
        gaps = np.diff(ids) - 1
        return int(len(gaps) + np.minimum(gaps, self.max_gap_windows).sum())

    def flush(self) -> list[np.ndarray]:
        """Close the open window (end of a sequence): ``[frame]``, or ``[]`` when no window is open."""
        if self._open_window is None:
            return []
        frame = self._close(self._pending)
        self.reset()
        self.frames_emitted += 1
        return [frame]

    def state_dict(self) -> dict[str, int | np.ndarray]:
        """Everything to continue exactly: ints and one int64 array (no pickle; safetensors / JSON friendly)."""
        out_height, out_width = self.output_size or (0, 0)
        pending = np.concatenate(self._pending) if self._pending else np.zeros(0, dtype=np.int64)
        return {
            "sensor_width": self.sensor_size[0],
            "sensor_height": self.sensor_size[1],
            "output_height": out_height,
            "output_width": out_width,
            "window_us": self.window_us,
            "binary": int(self.binary),
            "max_gap_windows": self.max_gap_windows,
            "origin_us": self.origin_us,
            "has_open_window": int(self._open_window is not None),
            "open_window": self._open_window or 0,
            "clock_us": self._clock_us,
            "late_events": self.late_events,
            "skipped_windows": self.skipped_windows,
            "frames_emitted": self.frames_emitted,
            "pending_index": pending.astype(np.int64),
        }

    @classmethod
    def from_state_dict(cls, state: dict[str, int | np.ndarray]) -> StreamFramer:
        """Rebuild a framer from :meth:`state_dict` (values may be ints or 0-d / 1-element arrays)."""

        def scalar(name: str) -> int:
            try:
                return int(np.asarray(state[name]).reshape(()))
            except KeyError as error:
                raise EventError(f"framer state lacks {name!r}") from error

        output = (scalar("output_height"), scalar("output_width"))
        framer = cls(
            (scalar("sensor_width"), scalar("sensor_height")),
            scalar("window_us"),
            None if output == (0, 0) else output,
            bool(scalar("binary")),
            scalar("max_gap_windows"),
            scalar("origin_us"),
        )
        framer.late_events, framer.skipped_windows = scalar("late_events"), scalar("skipped_windows")
        framer.frames_emitted = scalar("frames_emitted")
        pending = np.asarray(state.get("pending_index", np.zeros(0)), dtype=np.int64).reshape(-1)
        size = 2 * framer.frame_shape[0] * framer.frame_shape[1]
        if len(pending) and (pending.min() < 0 or pending.max() >= size):
            raise EventError(f"framer state: pending_index outside [0, {size})")
        if scalar("has_open_window"):
            framer._open_window, framer._clock_us = scalar("open_window"), scalar("clock_us")
            framer._pending = [pending] if len(pending) else []
        return framer
