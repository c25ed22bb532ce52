"""Replay of recent sequences (``NDOT_REPLAY_RECENT``): learned sequences kept in a bounded memory, learned again.

Under test-then-train a sequence is learned once, by its replay (``service.worker.sequence_learning``).
With ``SequenceLimits.replay_recent = k > 0``, a sequence whose replay finished is kept here (its
frames, label and start state: the same arrays, no copy), across all streams, oldest dropped first::

    held bytes = sum over kept sequences of (frame bytes + start state bytes)  <= replay_memory_bytes

and each newly scored sequence also queues up to ``k`` *re-learns*: sequences drawn uniformly (seeded)
from the memory, each learned again from its start state with its label, exactly as its first replay.
Re-learns run in ``k`` lanes of their own (one row per lane per tick, beside the streams' replay rows),
each lane holding at most one re-learn: one that finds its lane busy is skipped (``skipped``), so the
extra work is at most ``k`` learning rows a tick whatever the traffic. The memory is not checkpointed:
a restarted worker starts it empty.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

from ndot_core import NetworkState
from service.worker.sequences import state_bytes

#: Prefix of a re-learn lane's key among the replay queues (``:`` is never in a stream id).
LANE_PREFIX = "recent:"


@dataclass(frozen=True, slots=True)
class KeptSequence:
    """A learned sequence in the memory: what a re-learn needs."""

    frames: list[np.ndarray]
    label: int
    start_state: NetworkState | None
    nbytes: int


class RecentSequences:
    """The bounded memory of learned sequences and the seeded draw of re-learns."""

    def __init__(self, max_bytes: int, seed: int = 0) -> None:
        self.max_bytes = max_bytes
        self.kept: deque[KeptSequence] = deque()
        self.held_bytes = 0
        self.rng = np.random.default_rng(seed)
        self.relearned = 0  # re-learns queued
        self.skipped = 0  # re-learns not queued: their lane was busy

    def __len__(self) -> int:
        return len(self.kept)

    def keep(self, frames: list[np.ndarray], label: int, start_state: NetworkState | None) -> None:
        """Keep a learned sequence; the oldest ones leave while the memory is over ``max_bytes``."""
        nbytes = sum(frame.nbytes for frame in frames) + state_bytes(start_state)
        if not frames or nbytes > self.max_bytes:
            return
        self.kept.append(KeptSequence(frames, label, start_state, nbytes))
        self.held_bytes += nbytes
        while self.held_bytes > self.max_bytes:
            self.held_bytes -= self.kept.popleft().nbytes

    def draw(self) -> KeptSequence | None:
        """One kept sequence, uniformly at random (None when the memory is empty)."""
        if not self.kept:
            return None
        return self.kept[int(self.rng.integers(len(self.kept)))]

    def clear(self) -> None:
        self.kept.clear()
        self.held_bytes = 0


def lane(index: int) -> str:
    return f"{LANE_PREFIX}{index}"


def is_lane(key: str) -> bool:
    return key.startswith(LANE_PREFIX)
