"""The batcher's queue markers and label entries under test-then-train (a mixin of ``Batcher``).

A stream's queue holds, in order::

    ("reset", record | None)   a sequence starts: its row is reset at the next tick (record: its held
                               sequence under learn_at=sequence, whose start state is taken then)
    ("step", PendingStep)      one frame for one tick
    ("end", EndMarker)         learn_at=sequence: after a sequence's last frame; at its tick the row's
                               readout_sum is the sequence's prediction (scored if labelled, then replayed)

``_markers`` runs the markers at a queue's head before a tick (RESET, END) and after it (END only:
a sequence ends in the tick of its last frame, so the reply to the packet that ended it carries its
result). Label entries (``push_label``) are resolved in bus order against the stream's held
sequences (``service.worker.sequence_learning``). Uses the ``Batcher``'s ``sequences``,
``registry``, ``table``, ``results`` and ``remaining``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from ndot_core import NetworkState
from service.bus.messages import LabelRequest
from service.worker.sequence_learning import EndMarker
from service.worker.sequences import LEARN_AT_STEP_REFUSAL, LabelRefused
from service.worker.streams import StreamSlot

if TYPE_CHECKING:
    from collections import defaultdict

    from service.worker.sequence_learning import SequenceLearning
    from service.worker.state_table import StateTable
    from service.worker.streams import StreamRegistry

RESET, STEP, END = "reset", "step", "end"


class SequenceHooks:
    """Queue markers and label entries of a ``Batcher`` (see the module docstring)."""

    sequences: SequenceLearning | None
    registry: StreamRegistry
    table: StateTable
    results: defaultdict[str, list[dict[str, Any]]]
    remaining: defaultdict[str, int]

    def _end_sequence(self, slot: StreamSlot, entry_id: str | None) -> None:
        """learn_at=sequence: the running sequence ended; its END marker follows its last frame."""
        marker = self.sequences.end(slot, entry_id) if self.sequences is not None else None
        if marker is not None:
            slot.pending.append((END, marker))
            if entry_id is not None:
                self.remaining[entry_id] += 1

    def _closed(self, slot: StreamSlot) -> None:
        """A stream left the registry: its held sequences go (its queued replays still run)."""
        if self.sequences is not None:
            self._finished(self.sequences.close(slot))

    def _finished(self, entries: list[str]) -> None:
        """Entries whose wait for a sequence's END is over (their result is in ``sequences.results``)."""
        for entry_id in entries:
            if entry_id in self.remaining:
                self.remaining[entry_id] -= 1

    def push_label(self, entry_id: str, stream_id: str, label: int, sequence: int | str) -> None:
        """A label entry: give the named sequence of the stream its label (scored, then learned).

        The entry is done (``take``) once the sequence's END ran; raises ``LabelRefused`` (404 unknown
        stream, 409 no such sequence held or learn_at=step, 422 label outside [0, K)).
        """
        if self.sequences is None:
            raise LabelRefused(409, LEARN_AT_STEP_REFUSAL)
        slot = self.registry.get(stream_id)
        if slot is None:
            raise LabelRefused(404, f"stream {stream_id!r} is not live in the worker")
        self.registry.touch(slot, time.time())
        self.results.setdefault(entry_id, [])
        if not self.sequences.label(slot, entry_id, LabelRequest(label, sequence)):
            self.remaining[entry_id] += 1

    def take_sequence(self, entry_id: str) -> dict[str, Any] | None:
        """The ``sequence`` result of a finished entry that ended or labelled one (learn_at=sequence)."""
        return None if self.sequences is None else self.sequences.results.pop(entry_id, None)

    @property
    def replaying(self) -> bool:
        """Replays of scored sequences wait for ticks (learn_at=sequence)."""
        return self.sequences is not None and self.sequences.replaying

    def _markers(self, slot: StreamSlot, fresh_rows: list[int] | None, starting: list | None) -> None:
        """Run the markers at the head of a stream's queue: RESET (its row joins ``fresh_rows``; not when
        ``fresh_rows`` is None) and END (its sequence is predicted and scored from the row as it is)."""
        while slot.pending and slot.pending[0][0] != STEP:
            kind, payload = slot.pending[0]
            if kind == RESET:
                if fresh_rows is None:
                    return  # after a tick's steps: the reset waits for the next tick
                slot.pending.popleft()
                fresh_rows.append(slot.row)
                slot.sequence_step = 0
                if payload is not None and starting is not None:
                    starting.append((slot, payload))
            else:
                slot.pending.popleft()
                self._sequence_ended(slot, payload)

    def _sequence_ended(self, slot: StreamSlot, marker: EndMarker) -> None:
        state = self.table.state
        readout, steps = state.readout_sum[slot.row], int(state.steps[slot.row])
        self._finished(self.sequences.at_end(slot, marker, readout, steps))

    def _row_unless_resting(self, row: int) -> NetworkState | None:
        """A copy of the row, or None when it is at rest (a row that took no step since its reset)."""
        state = self.table.state
        return None if int(state.steps[row]) == 0 else state.select([row])
