"""A live event stream cut into packets and sequences as it arrives, and the bounded buffer they wait in.

**Clock.** The camera's clock (absolute µs, restarting after a replug) is mapped to the stream's
clock, which the service sees: microseconds from the stream's start, increasing across reconnects::

    s = t - o_c + b_c        o_c = camera time of connection c's first event
                             b_1 = 0,  b_c = s_last + max(1, gap_c)   (gap_c: wall µs since the loss)

**Packets.** Event ``i`` belongs to packet window ``k_i = s_i // P`` (``P = packet_us``; window edges
at multiples of P, so with P equal to the service's ``NDOT_WINDOW_US`` each packet is one frame
window) and to sequence position ``j_i = (s_i - a) // S`` (``S = sequence_us``; ``a`` = the first
window edge of the connection; ``j = 0`` unsegmented). A packet holds the events of one ``(j, k)``;
it is released when an event of another ``(j, k)`` arrives (the window closed on the event clock,
as the service's framer sees it), with ``start`` on a sequence's first packet and ``end`` on its last.
The source lost, or the client stopping, ends the open sequence: its last packet goes with ``end``.

**Buffer.** Packets wait for the sender in a FIFO of at most ``max_events`` events. When a new
packet does not fit, ``block`` makes the reader wait (the source's own buffers fill, not ours);
``drop-oldest`` drops the oldest packets' events, counted, keeping their ``start``/``end`` flags as
empty packets so every sequence the service sees still opens and closes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from ndot_core.events.layout import EVENT_DTYPE

Overflow = Literal["drop-oldest", "block"]
OVERFLOW_POLICIES: tuple[str, ...] = ("drop-oldest", "block")
#: At most this many packets wait, whatever their sizes (flag-only packets hold no events).
MAX_BUFFERED_PACKETS = 100_000


class LiveClock:
    """Camera µs -> stream µs, continuous and increasing across reconnects (see the module docstring)."""

    def __init__(self) -> None:
        self.offset_us: int | None = None  # b_c - o_c of the open connection
        self.last_us = -1  # the latest stream time handed out
        self._lost_at_s: float | None = None

    def map(self, t_camera: np.ndarray, now_s: float | None = None) -> np.ndarray:
        """Stream times of camera times ``t_camera`` (sorted, of the open connection)."""
        if len(t_camera) == 0:
            return np.asarray(t_camera, dtype=np.int64)
        if self.offset_us is None:
            if self.last_us < 0:
                base = 0
            else:
                gap_s = (time.monotonic() if now_s is None else now_s) - (self._lost_at_s or 0.0)
                base = self.last_us + max(1, round(gap_s * 1e6))
            self.offset_us = base - int(t_camera[0])
        stream = np.asarray(t_camera, dtype=np.int64) + self.offset_us
        self.last_us = int(stream[-1])
        return stream

    def lost(self, now_s: float | None = None) -> None:
        """The connection ended: the next event starts a new connection's mapping."""
        self.offset_us = None
        self._lost_at_s = time.monotonic() if now_s is None else now_s


@dataclass(frozen=True)
class LivePacket:
    """One POST of a live stream: ``events`` (EVENT_DTYPE, stream clock) and where it belongs."""

    events: np.ndarray
    sensor_size: tuple[int, int]
    sequence: int  # 0, 1, 2, ... over the whole run
    index: int  # packet number within its sequence
    window: int  # s // packet_us of its events
    start: bool
    end: bool
    label: int | None
    connection: int
    cut_s: float  # time.monotonic() when it was released
    dropped_events: int = 0  # events the buffer dropped from it (drop-oldest)

    @property
    def n_events(self) -> int:
        return len(self.events)


class LivePacketizer:
    """Cuts stream-clock events into packets of one ``(sequence, window)``; holds the open one."""

    def __init__(
        self,
        packet_us: int = 10_000,
        sequence_us: int | None = None,
        label_for_packet: Callable[[], int | None] = lambda: None,
    ) -> None:
        if packet_us < 1:
            raise ValueError(f"packet_us={packet_us} must be >= 1")
        if sequence_us is not None and sequence_us < 1:
            raise ValueError(f"sequence_us={sequence_us} must be >= 1")
        self.packet_us, self.sequence_us = packet_us, sequence_us
        self.label_for_packet = label_for_packet
        self.sequences = 0  # sequences begun
        self._anchor_us: int | None = None
        self._key: tuple[int, int] | None = None  # (j, k) of the open packet; None = no open sequence
        self._pending: list[np.ndarray] = []
        self._start = False
        self._index = 0
        self._sensor: tuple[int, int] = (1, 1)
        self._connection = 0

    @property
    def sequence_open(self) -> bool:
        return self._key is not None

    def feed(self, events: np.ndarray, sensor_size: tuple[int, int], connection: int) -> list[LivePacket]:
        """Take events (EVENT_DTYPE, stream clock, sorted); return the packets they closed."""
        if len(events) == 0:
            return []
        t = events["t"]
        if self._anchor_us is None:
            self._anchor_us = int(t[0]) // self.packet_us * self.packet_us
        windows = t // self.packet_us
        positions = (t - self._anchor_us) // self.sequence_us if self.sequence_us else np.zeros_like(t)
        edges = np.flatnonzero((windows[1:] != windows[:-1]) | (positions[1:] != positions[:-1])) + 1
        released = []
        for lo, hi in zip(np.r_[0, edges], np.r_[edges, len(t)], strict=True):
            key = (int(positions[lo]), int(windows[lo]))
            if self._key is not None and key != self._key:
                closes_sequence = key[0] != self._key[0]
                released.append(self._release(end=closes_sequence))
            if self._key is None:
                self.sequences += 1
                self._start, self._index = True, 0
                self._sensor, self._connection = sensor_size, connection
            self._key = key
            self._pending.append(events[lo:hi])
        return released

    def end_sequence(self) -> LivePacket | None:
        """Release the open sequence's last packet with ``end`` (source lost, client stopping)."""
        if self._key is None:
            return None
        packet = self._release(end=True)
        self._anchor_us = None  # the next connection's sequences start from its first event
        return packet

    def _release(self, end: bool) -> LivePacket:
        assert self._key is not None
        events = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        packet = LivePacket(
            events=events,
            sensor_size=self._sensor,
            sequence=self.sequences - 1,
            index=self._index,
            window=self._key[1],
            start=self._start,
            end=end,
            label=self.label_for_packet(),
            connection=self._connection,
            cut_s=time.monotonic(),
        )
        self._pending, self._start, self._index = [], False, self._index + 1
        if end:
            self._key = None
        return packet


class PacketBuffer:
    """Bounded FIFO of packets between the reader thread and the sender (``get`` from any thread)."""

    def __init__(self, max_events: int = 1_000_000, overflow: Overflow = "drop-oldest") -> None:
        if max_events < 1:
            raise ValueError(f"max_events={max_events} must be >= 1")
        if overflow not in OVERFLOW_POLICIES:
            raise ValueError(f"overflow={overflow!r} is not one of {OVERFLOW_POLICIES}")
        self.max_events, self.overflow = max_events, overflow
        self._packets: deque[LivePacket] = deque()
        self._events = 0
        self._closed = False
        self._changed = threading.Condition()
        self.dropped_packets = 0  # packets whose events were dropped
        self.dropped_events = 0
        self.blocked_s = 0.0
        self.most_events = 0  # the most events ever held at once

    def __len__(self) -> int:
        with self._changed:
            return len(self._packets)

    @property
    def events(self) -> int:
        with self._changed:
            return self._events

    def _fits(self, n_events: int) -> bool:
        return (self._events + n_events <= self.max_events or self._events == 0) and len(
            self._packets
        ) < MAX_BUFFERED_PACKETS

    def put(self, packet: LivePacket) -> None:
        """Queue ``packet``; make room by the overflow policy. Returns at once once closed."""
        with self._changed:
            if self.overflow == "block":
                waited_from = time.monotonic()
                while not self._fits(packet.n_events) and not self._closed:
                    self._changed.wait(0.1)
                self.blocked_s += time.monotonic() - waited_from
            else:
                self._drop_oldest_for(packet.n_events)
            if self._closed:
                self.dropped_packets += 1
                self.dropped_events += packet.n_events
                return
            self._packets.append(packet)
            self._events += packet.n_events
            self.most_events = max(self.most_events, self._events)
            self._changed.notify_all()

    def _drop_oldest_for(self, n_events: int) -> None:
        kept: deque[LivePacket] = deque()  # flag-only shells of dropped packets, oldest first
        while self._packets and not self._fits(n_events):
            oldest = self._packets.popleft()
            self._events -= oldest.n_events
            if oldest.n_events:
                self.dropped_packets += 1
                self.dropped_events += oldest.n_events
            if (oldest.start or oldest.end) and len(self._packets) + len(kept) < MAX_BUFFERED_PACKETS - 1:
                dropped = oldest.dropped_events + oldest.n_events
                kept.append(replace(oldest, events=np.zeros(0, EVENT_DTYPE), dropped_events=dropped))
        self._packets.extendleft(reversed(kept))

    def get(self, timeout_s: float | None = None) -> LivePacket | None:
        """The oldest packet; None after ``timeout_s`` with nothing queued, or once closed and empty."""
        with self._changed:
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            while not self._packets and not self._closed:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return None
                self._changed.wait(remaining)
            if not self._packets:
                return None
            packet = self._packets.popleft()
            self._events -= packet.n_events
            self._changed.notify_all()
            return packet

    def close(self) -> None:
        """No more packets will come: ``get`` drains what is left, then returns None; ``put`` drops."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()

    @property
    def drained(self) -> bool:
        """Closed and empty: the sender is done."""
        with self._changed:
            return self._closed and not self._packets
