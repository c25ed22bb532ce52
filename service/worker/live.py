"""Live views: the latest step of each watched stream, for the browser (``GET /v1/streams/{id}/live``).

The API raises a viewing flag per stream while a browser watches it (``messages.viewing_key``, TTL
``VIEWING_TTL_S``, re-set every second). The worker reads the flags of its live streams at
housekeeping (~1 s, one MGET: ``LiveFrames.refresh_watched``) and, for the watched streams only::

    record(batch, predicted, probabilities, version)   every tick (Batcher._record); O(1) when none is watched
        latest = the row's frame F [C, H, W] (event counts at the model's input size), its prediction,
                 probabilities, label and the model version
        A     += F                                      (every frame since the stream's last value)
        recent = correctness of its last RECENT_LABELLED labelled steps
    due_values(prefix)                                 every round (Worker._round_values)
        one JSON value per watched stream that stepped since its last one, at most one per
        LIVE_INTERVAL_S (~10 per second however fast it steps): F and A as base64 of uint8
        min(count, 255) (row-major [C, H, W], channel 0 = OFF, 1 = ON), probabilities (4 decimals),
        the stream's info (the StreamInfo fields), the recent accuracy and the lag

        lag_s = queued frames × window_us / 10⁶   (camera time between the frame shown and the newest
                                                   frame the stream's events have closed)

The worker keeps frames at the model's input size only (the framer resizes events on the way in);
the page draws A at the sensor's size by nearest-neighbour upscaling. State is per watched stream
(two frames, a bounded deque) and is dropped when its flag lapses; nothing queues: a newer step
replaces an older one. ``record`` runs in the applier's thread and ``due_values`` /
``refresh_watched`` on the event loop, never at the same time (the loop awaits the applier).
"""

from __future__ import annotations

import base64
import json
import math
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from service.bus import Bus, messages
from service.bus.base import Value
from service.worker.streams import StreamSlot

#: Labelled steps the recent accuracy of a watched stream averages over.
RECENT_LABELLED = 200


class Step(Protocol):
    """What ``record`` needs of a batch row's step (``batcher.PendingStep``)."""

    frame: np.ndarray
    label: int | None


def encode_frame(frame: np.ndarray) -> dict[str, Any]:
    """``{"shape": [C, H, W], "data": base64 of uint8 min(round(count), 255)}`` of a count frame."""
    counts = np.clip(np.rint(frame), 0, 255).astype(np.uint8)
    return {"shape": list(counts.shape), "data": base64.b64encode(counts.tobytes()).decode("ascii")}


@dataclass
class Watched:
    """One watched stream's latest step and what accumulated since its last live value."""

    slot: StreamSlot | None = None
    frame: np.ndarray | None = None
    accumulated: np.ndarray | None = None
    frames: int = 0
    predicted: int | None = None
    probabilities: list[float] = field(default_factory=list)
    label: int | None = None
    version: int = 0
    fresh: bool = False  # stepped since its last value
    sent_s: float = -math.inf
    recent: deque[bool] = field(default_factory=lambda: deque(maxlen=RECENT_LABELLED))


class LiveFrames:
    """The watched streams' latest steps; see the module docstring."""

    def __init__(self, window_us: int, interval_s: float = messages.LIVE_INTERVAL_S) -> None:
        self.window_us = window_us
        self.interval_s = interval_s
        self.watched: dict[str, Watched] = {}

    # --- who is watched ---------------------------------------------------------------------------

    def watch(self, stream_ids: Iterable[str]) -> None:
        """Watch exactly ``stream_ids``: new ones start empty, the others' state is dropped."""
        wanted = set(stream_ids)
        self.watched = {sid: self.watched.get(sid) or Watched() for sid in wanted}

    async def refresh_watched(self, bus: Bus, prefix: str, stream_ids: Sequence[str]) -> None:
        """Read the viewing flags of ``stream_ids`` (one round trip) and watch the flagged ones."""
        ids = list(stream_ids)
        flags = await bus.get_values([messages.viewing_key(prefix, sid) for sid in ids]) if ids else []
        self.watch(sid for sid, flag in zip(ids, flags, strict=True) if flag)

    # --- every tick -------------------------------------------------------------------------------

    def record(
        self,
        batch: Sequence[tuple[StreamSlot, Step]],
        predicted: Sequence[int],
        probabilities: Sequence[Sequence[float]],
        version: int,
    ) -> None:
        """Keep the watched rows of one tick (after its counters were updated)."""
        if not self.watched:
            return
        for (slot, step), guess, probs in zip(batch, predicted, probabilities, strict=True):
            live = self.watched.get(slot.stream_id)
            if live is None:
                continue
            live.slot, live.frame, live.label, live.version = slot, step.frame, step.label, version
            live.predicted, live.probabilities = guess, list(probs)
            if live.accumulated is None or live.accumulated.shape != step.frame.shape:
                live.accumulated, live.frames = np.array(step.frame, dtype=np.float32), 1
            else:
                live.accumulated += step.frame
                live.frames += 1
            if step.label is not None:
                live.recent.append(guess == step.label)
            live.fresh = True

    # --- every round ------------------------------------------------------------------------------

    def due_values(self, prefix: str, now: float | None = None) -> list[Value]:
        """The live values to write this round (``(key, JSON, LIVE_TTL_S)``), at most one per interval each."""
        now = time.monotonic() if now is None else now
        values: list[Value] = []
        for stream_id, live in self.watched.items():
            if not live.fresh or now - live.sent_s < self.interval_s or live.slot is None:
                continue
            values.append((messages.live_key(prefix, stream_id), self.snapshot(live), messages.LIVE_TTL_S))
            live.sent_s, live.fresh = now, False
            live.accumulated, live.frames = None, 0
        return values

    def snapshot(self, live: Watched) -> bytes:
        """The JSON live value of one watched stream (see the module docstring)."""
        slot = live.slot
        queued = sum(1 for _, work in slot.pending if work is not None)  # reset markers carry None
        recent = sum(live.recent) / len(live.recent) if live.recent else None
        return json.dumps(
            {
                "stream_id": slot.stream_id,
                "time": time.time(),
                "model_version": live.version,
                "step": slot.steps,
                "sequence_step": max(slot.sequence_step - 1, 0),
                "predicted": live.predicted,
                "label": live.label,
                "probabilities": [round(p, 4) for p in live.probabilities],
                "frame": encode_frame(live.frame),
                "accumulated": encode_frame(live.accumulated),
                "frames": live.frames,
                "sensor": [slot.width, slot.height],
                "queued_frames": queued,
                "lag_s": queued * self.window_us / 1e6,
                "recent_accuracy": recent,
                "recent_labelled": len(live.recent),
                "info": slot.info(),
            },
            separators=(",", ":"),
        ).encode()
