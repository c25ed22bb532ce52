"""Cutting a sequence into the packets a camera would post, and their HTTP bodies.

By time (``packet_us``): packet ``k`` holds the events with ``t0 + k*P <= t < t0 + (k+1)*P``
(``t0`` = the sequence's first event time); empty windows send nothing. The camera emits packet
``k`` when its window closes, so its release time on the sequence's clock is ``(k+1)*P``.
By count (``packet_events``): consecutive chunks of ``N`` events, released at their last event.

Binary body: packed little-endian 13-byte records ``t:int64 µs, x:uint16, y:uint16, p:uint8``
(``WIRE_DTYPE``, aedat's layout). JSON body: ``{"t": [...], "x": [...], "y": [...], "p": [...]}``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

import numpy as np

from ndot_core.events.layout import WIRE_DTYPE, events_to_bytes

__all__ = ["WIRE_DTYPE", "Packet", "PacketError", "encode_body", "packetize"]

BodyFormat = Literal["binary", "json"]
CONTENT_TYPES: dict[str, str] = {"binary": "application/octet-stream", "json": "application/json"}


class PacketError(ValueError):
    """Packetizing parameters or events that cannot be cut (message names the value/index)."""


@dataclass(frozen=True)
class Packet:
    """One POST: ``events[lo:hi]`` of its sequence, the flags, and when the camera releases it."""

    index: int
    lo: int
    hi: int
    release_us: int
    start: bool
    end: bool

    @property
    def n_events(self) -> int:
        return self.hi - self.lo


def packetize(
    t_us: np.ndarray, packet_us: int | None = 10_000, packet_events: int | None = None
) -> list[Packet]:
    """Packets of a sequence with event times ``t_us`` (sorted): by time, or by count when given."""
    t_us = np.asarray(t_us, dtype=np.int64)
    if t_us.size == 0:
        return []
    if t_us.size > 1:
        decreasing = np.flatnonzero(np.diff(t_us) < 0)
        if decreasing.size:
            i = int(decreasing[0]) + 1
            raise PacketError(f"event {i}: t={t_us[i]} is before t={t_us[i - 1]} of event {i - 1}")
    t0 = int(t_us[0])
    if packet_events is not None:
        if packet_events < 1:
            raise PacketError(f"packet_events={packet_events} must be >= 1")
        cuts = np.arange(0, t_us.size, packet_events)
        bounds = [(int(lo), int(min(lo + packet_events, t_us.size))) for lo in cuts]
        releases = [int(t_us[hi - 1]) - t0 for _, hi in bounds]
    else:
        if packet_us is None or packet_us < 1:
            raise PacketError(f"packet_us={packet_us} must be >= 1")
        window = (t_us - t0) // packet_us
        starts = np.flatnonzero(np.r_[True, window[1:] != window[:-1]])
        ends = np.r_[starts[1:], t_us.size]
        bounds = [(int(lo), int(hi)) for lo, hi in zip(starts, ends, strict=True)]
        releases = [(int(window[lo]) + 1) * packet_us for lo, _ in bounds]
    last = len(bounds) - 1
    return [
        Packet(k, lo, hi, release, start=k == 0, end=k == last)
        for k, ((lo, hi), release) in enumerate(zip(bounds, releases, strict=True))
    ]


def encode_body(events: np.ndarray, body_format: BodyFormat = "binary") -> bytes:
    """HTTP body of ``events`` (any array with t, x, y, p fields) in ``body_format``."""
    if body_format == "json":
        columns = {name: events[name].astype(np.int64).tolist() for name in ("t", "x", "y", "p")}
        return json.dumps(columns, separators=(",", ":")).encode()
    if body_format != "binary":
        raise PacketError(f"body_format={body_format!r} is not one of {sorted(CONTENT_TYPES)}")
    return events_to_bytes(events)
