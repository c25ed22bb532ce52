"""Test-then-train in the batcher (``NDOT_LEARN_AT=sequence``): score each sequence, then learn it by replay.

The ``Batcher`` calls this at *push* time (packets and label entries framed or read in bus order)
and at *tick* time (frames stepped)::

    push   begin(slot)               a new running record (``service.worker.sequences``); the batcher
                                     queues a RESET marker carrying it
           framed(slot, frames, y)   its frames appended (bounded), a packet's label held on it
           end(slot, entry)          it ended: an END marker after its last frame (the entry that ended it
                                     waits for the marker, so its reply carries the sequence's result)
           label(slot, entry, req)   a late label: held on the record it names, or scored at once when that
                                     record's END already ran (``LabelRefused`` says why none fits)
    tick   started(record, state)    the RESET ran: the row it starts from (None: at rest)
           at_end(slot, marker, ...) the END ran: prediction = argmax readout_sum of the row after the last
                                     frame, made by weights that learned nothing of the sequence (its frames
                                     ran unlabelled); with a label: scored, then a ``Replay`` queued

A ``Replay`` learns a scored sequence: its held frames, in order, from its start state, with its
label, on a state row of its own (the stream's live row is never touched: the stream carries on
from where its live frames took it). Each tick, the first replay of every stream that has one gives
one row (``rows``); the tick steps the live rows, then the replay rows together::

    learner.step(live frames, None, live rows)                                   (predict only)
    learner.step(replay frames, [y_1 .. y_r], NetworkState.cat(replay rows))     (learn)

so a replay of T frames costs T rows over T ticks, counted in the round's tick budget like any
tick, batched with the other streams' replays (one step mixing unlabelled and labelled rows costs
more than the two apart). A scored sequence's label first reaches the weights at the tick after
its end; the next prediction of any stream may use what it taught.

With ``SequenceLimits.replay_recent = k``, each scored sequence also queues up to k *re-learns* of
sequences learned earlier, drawn from a bounded memory (``service.worker.recent_replay``); they run
as replays of their own lanes (``recent:0 .. recent:k-1``), at most one row per lane per tick.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ndot_core import NetworkState, OnlineLearner
from service.bus.messages import LabelRequest
from service.metrics import ServiceMetrics
from service.worker.recent_replay import RecentSequences, is_lane, lane
from service.worker.sequences import (
    INCOMPLETE,
    LabelRefused,
    SequenceBook,
    SequenceLimits,
    SequenceRecord,
)
from service.worker.streams import StreamSlot

log = logging.getLogger("ndot.worker")


@dataclass(frozen=True, slots=True)
class EndMarker:
    """Queued after a sequence's last frame: the record, and the entry whose reply waits for it."""

    record: SequenceRecord
    entry_id: str | None


@dataclass(eq=False)
class Replay:
    """A scored sequence being learned: one row per tick, from its start state, with its label."""

    stream_id: str
    book: SequenceBook
    record: SequenceRecord
    frames: list[np.ndarray]
    label: int
    start_state: NetworkState | None
    state: NetworkState | None = None  # its row while outside the batch (built at its first row)
    position: int = 0
    again: bool = False  # a re-learn of a kept sequence (its first replay finished earlier)

    def frame(self) -> np.ndarray:
        return self.frames[self.position]


class SequenceLearning:
    """The books' push- and tick-time hooks, the queued replays and the sequence results of replies."""

    def __init__(self, learner: OnlineLearner, metrics: ServiceMetrics, limits: SequenceLimits) -> None:
        self.learner, self.metrics, self.limits = learner, metrics, limits
        #: Replays waiting or running, per stream, oldest first (one row per stream per tick).
        self.replays: dict[str, deque[Replay]] = {}
        #: The ``sequence`` object of each finished entry's reply (an end packet or a label entry).
        self.results: dict[str, dict[str, Any]] = {}
        #: Streams whose replay finished since the worker last looked (their info changed).
        self.learned_streams: set[str] = set()
        #: Learned sequences kept for re-learning (``limits.replay_recent`` > 0), else None.
        self.recent = RecentSequences(limits.replay_memory_bytes) if limits.replay_recent > 0 else None
        #: The rows of the replays of the last learning step, as one state, and whose rows they are (in
        #: order; None: a hole): the next step starts from it (``batch``).
        self._batch: NetworkState | None = None
        self._batch_of: list[Replay | None] = []

    # --- push time ----------------------------------------------------------------------------------

    def book(self, slot: StreamSlot) -> SequenceBook:
        """The stream's book; a stream met mid-sequence (restored without one) starts it incomplete."""
        if slot.book is None:
            midway = slot.sequence_events > 0
            slot.book = SequenceBook(SequenceRecord(slot.sequences if midway else slot.sequences + 1))
            if midway:
                slot.book.running.release(INCOMPLETE)
        return slot.book

    def begin(self, slot: StreamSlot) -> SequenceRecord:
        """A new running sequence (its number: the stream's next); the caller queues RESET with it."""
        return self.book(slot).begin(slot.sequences + 1)

    def framed(self, slot: StreamSlot, frames: list[np.ndarray], label: int | None) -> None:
        record = self.book(slot).running
        if label is not None:  # held until the sequence ends; the latest packet's label counts
            record.label = label
        record.add(frames, self.limits)

    def end(self, slot: StreamSlot, entry_id: str | None) -> EndMarker | None:
        """The running sequence ended (``entry_id``'s packet ended it, or a start cut it): its marker."""
        book = self.book(slot)
        record = book.running
        for dropped in book.end_running(self.limits):
            self.metrics.sequences.labels(outcome="unlabelled").inc()
            log.info(
                "event=sequence_dropped stream=%s sequence=%d reason=%r",
                slot.stream_id,
                dropped.number,
                "no label came within NDOT_SEQUENCES_HELD ended sequences",
            )
        if record.frame_count == 0 and not record.waiting:
            return None
        return EndMarker(record, entry_id)

    def label(self, slot: StreamSlot, entry_id: str, request: LabelRequest) -> bool:
        """Give a held sequence its label; True when its result is ready now (its END already ran),
        False when ``entry_id`` waits for the END marker. Raises ``LabelRefused``."""
        classes = self.learner.model.num_classes
        if not 0 <= request.label < classes:
            raise LabelRefused(422, f"label {request.label} outside [0, {classes})")
        book = self.book(slot)
        record = book.find(request.sequence, slot.stream_id, slot.sequences, self.limits.held)
        record.label = request.label
        if not record.predicted_at_end:
            record.waiting.append(entry_id)
            return False
        self._score(slot.stream_id, book, record)
        self.results[entry_id] = record.result()
        return True

    def abandon(self, slot: StreamSlot) -> list[str]:
        """The stream's row was reset mid-sequence: its running sequence is neither scored nor learned,
        a fresh one begins at rest. Returns the label entries that waited for it (answered)."""
        book = self.book(slot)
        record = book.running
        if record.frame_count or record.waiting:
            record.abandoned = True
            record.release(None)
            self.metrics.sequences.labels(outcome="abandoned").inc()
        finished = self._answer(record.waiting, record)
        book.begin(slot.sequences + 1).hold_start(None, self.limits)
        return finished

    def close(self, slot: StreamSlot) -> list[str]:
        """The stream closed (deleted, evicted, expired): what it held is dropped, counted."""
        if slot.book is None:
            return []
        finished = []
        for record in slot.book.dropped_records():
            if record is slot.book.running and not record.ended:
                if record.frame_count or record.waiting:
                    record.abandoned = True
                    self.metrics.sequences.labels(outcome="abandoned").inc()
            elif record.label is None:
                self.metrics.sequences.labels(outcome="unlabelled").inc()
            finished += self._answer(record.waiting, record)
        slot.book = None
        return finished

    # --- tick time ----------------------------------------------------------------------------------

    def started(self, record: SequenceRecord, state: NetworkState | None) -> None:
        record.hold_start(state, self.limits)

    def at_end(self, slot: StreamSlot, marker: EndMarker, readout: torch.Tensor, steps: int) -> list[str]:
        """The END marker ran (the row holds the sequence's last step): predict, score when labelled.

        Returns the entries whose reply waited for it (the one that ended it, label entries)."""
        record = marker.record
        if record.frame_count and not record.abandoned:
            record.predicted = int(readout.argmax())
            record.probabilities = torch.softmax(readout.float() / max(steps, 1), dim=0).tolist()
            record.model_version = self.learner.version
            if record.label is not None and slot.book is not None:
                self._score(slot.stream_id, slot.book, record)
        entries = [marker.entry_id] if marker.entry_id is not None else []
        return self._answer(entries + record.waiting, record)

    def _answer(self, entries: Iterable[str], record: SequenceRecord) -> list[str]:
        result = record.result()
        entries = list(entries)
        for entry_id in entries:
            self.results[entry_id] = result
        record.waiting = []
        return entries

    def _score(self, stream_id: str, book: SequenceBook, record: SequenceRecord) -> None:
        """Prediction against label (``ndot_prequential_accuracy``), then queue its replay when held."""
        assert record.predicted is not None and record.label is not None
        correct = record.predicted == record.label
        self.metrics.record_sequence(correct)
        book.settle(record, correct)
        if record.learnable and record.frames:
            replay = Replay(stream_id, book, record, record.frames, record.label, record.start_state)
            self.replays.setdefault(stream_id, deque()).append(replay)
            self._queue_relearns(book, record)
        elif record.unlearnable is not None:
            self.metrics.sequences.labels(outcome=record.unlearnable).inc()

    def _queue_relearns(self, book: SequenceBook, record: SequenceRecord) -> None:
        """Up to ``replay_recent`` kept sequences learned again, one per free lane (a busy lane skips)."""
        if self.recent is None:
            return
        for index in range(self.limits.replay_recent):
            key = lane(index)
            if key in self.replays:
                self.recent.skipped += 1
                continue
            kept = self.recent.draw()
            if kept is None:
                return
            again = Replay(key, book, record, kept.frames, kept.label, kept.start_state, again=True)
            self.replays[key] = deque([again])
            self.recent.relearned += 1

    def forget_recent(self) -> None:
        """Empty the memory of learned sequences and drop the re-learns queued from it (a model reset:
        the fresh weights must not re-learn what was streamed before)."""
        if self.recent is None:
            return
        self.recent.clear()
        for key in [key for key in self.replays if is_lane(key)]:
            del self.replays[key]

    # --- replays ------------------------------------------------------------------------------------

    @property
    def replaying(self) -> bool:
        return bool(self.replays)

    def backed_up(self) -> bool:
        """Some stream has a replay queued behind the one in progress (its sequences end faster than
        its replay steps learn them)."""
        return any(len(queue) > 1 for queue in self.replays.values())

    def rows(self) -> list[Replay]:
        """The replays that step this tick: the oldest of every stream that has one."""
        return [queue[0] for queue in self.replays.values()]

    def state_of(self, replay: Replay) -> NetworkState:
        """The replay's current state row (its start state at its first row), when not in the batch."""
        if replay.state is None:
            replay.state = self.learner.new_state(1)
            if replay.start_state is not None:
                replay.state.assign([0], replay.start_state)
        return replay.state

    def batch(
        self, replays: list[Replay], in_place: Callable[[int], bool] | None = None
    ) -> tuple[list[Replay | None], NetworkState]:
        """``replays`` laid out in the rows of one state that holds them, for one learning step; a row
        of the layout that is None is a hole (a row that must not step: ``step(active=)``).

        The rows stay in that state from step to step (a step rebinds its tensors: nothing is copied)
        while the same replays step. When some finished or others start:

        * with ``in_place(rows)`` true (the learner steps a state of that many rows in place, holes
          inactive: ``OnlineLearner.steps_in_place``) and three quarters of the rows stepping, a finished
          replay's row becomes a hole and a new replay's start row is written into a hole (one row
          copied) or appended (one ``cat`` when there is no hole): no gather of the others. Holes at
          the end are cut off (a view); with more than a quarter of the rows holes (each costs a row
          of compute every step) the rows are gathered as below;
        * else the rows that go on are gathered with one ``select`` and the new replays' rows appended
          (one ``cat``): a handful of ops a step instead of one view and one copy per replay row (at 16
          cameras those took ~12 % of the worker's stepping thread). No holes.

        A replay that does not step this time keeps its row apart (``Replay.state``).
        """
        previous, batch = self._batch_of, self._batch
        stepping = {id(replay) for replay in replays}
        present = {id(replay) for replay in previous if replay is not None}
        if batch is not None and present == stepping:
            return previous, batch
        layout: list[Replay | None] = list(previous)
        for i, replay in enumerate(layout):  # rows that do not step now become holes
            if replay is not None and id(replay) not in stepping:
                if replay.position < len(replay.frames):  # (it goes on later, outside the batch)
                    replay.state = batch.narrow(i, 1).clone()
                layout[i] = None
        fresh = [replay for replay in replays if id(replay) not in present]
        holes = [i for i, replay in enumerate(layout) if replay is None]
        rows = len(layout) + max(0, len(fresh) - len(holes))
        if batch is None or in_place is None or 4 * len(replays) < 3 * rows or not in_place(rows):
            return self._compact(layout, batch, fresh)
        for i, replay in zip(holes, fresh, strict=False):  # (more holes than replays: some stay)
            batch.write_rows(i, self.state_of(replay))
            layout[i], replay.state = replay, None
        extra = fresh[len(holes) :]
        if extra:
            batch = NetworkState.cat([batch, *(self.state_of(replay) for replay in extra)])
            for replay in extra:
                replay.state = None
            layout += extra
        while layout and layout[-1] is None:  # trailing holes: cut off (a view)
            layout.pop()
        if len(layout) < batch.batch_size:
            batch = batch.narrow(0, len(layout))
        if 4 * layout.count(None) > len(layout):  # (a hole costs a row of compute every step)
            return self._compact(layout, batch, [])
        self._batch, self._batch_of = batch, layout
        return layout, batch

    def _compact(
        self, layout: list[Replay | None], batch: NetworkState | None, fresh: list[Replay]
    ) -> tuple[list[Replay | None], NetworkState]:
        """The stepping rows of ``layout`` gathered (one ``select``), ``fresh``'s rows appended (one ``cat``)."""
        kept = [i for i, replay in enumerate(layout) if replay is not None]
        parts = []
        if kept:
            parts.append(batch if len(kept) == batch.batch_size else batch.select(kept))
        parts += [self.state_of(replay) for replay in fresh]
        for replay in fresh:
            replay.state = None  # (its row is the batch's now)
        self._batch = parts[0] if len(parts) == 1 else NetworkState.cat(parts)
        self._batch_of = [layout[i] for i in kept] + fresh
        return self._batch_of, self._batch

    def unstep(self, before: NetworkState) -> None:
        """A learning step on ``batch``'s state failed: its rows are as they were (``before``, a shallow copy)."""
        self._batch = before

    def stepped(self, replays: list[Replay]) -> None:
        """Each replay of the batch advanced by one frame (its row of the batch)."""
        for replay in replays:
            replay.position += 1
            if replay.position == len(replay.frames):
                if replay.again:
                    self._finish(replay, None)
                    continue
                if self.recent is not None:
                    self.recent.keep(replay.frames, replay.label, replay.start_state)
                self._finish(replay, "learned")
                replay.book.learned += 1
                self.learned_streams.add(replay.stream_id)
        self.metrics.steps.labels(kind="learn").inc(len(replays))

    def failed(self, replay: Replay, error: str) -> None:
        """A replay's step failed on every attempt: dropped (the weights keep what it taught so far)."""
        log.warning(
            "event=replay_failed stream=%s sequence=%d error=%r",
            replay.stream_id,
            replay.record.number,
            error,
        )
        self._finish(replay, "failed")

    def _finish(self, replay: Replay, outcome: str | None) -> None:
        """Take a finished (or failed) replay off its queue; ``outcome`` counted (None: a re-learn)."""
        queue = self.replays[replay.stream_id]
        queue.remove(replay)
        if not queue:
            del self.replays[replay.stream_id]
        replay.state = None
        if replay.again:
            return
        replay.record.frames = None
        if outcome is not None:
            self.metrics.sequences.labels(outcome=outcome).inc()
