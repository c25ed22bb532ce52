"""The batcher: per-stream queues of frames -> one batched learner step per tick.

Every live stream owns row ``r`` of one ``NetworkState`` (``capacity`` rows). Packets are framed
as they arrive and their frames queue on their stream, in order, with ``reset`` markers where a
sequence starts. A tick takes the head frame of every stream that has one, stacks them into one
batch ``[B, C, H, W]`` and runs::

    sub = state.select(rows)
    logits = learner.step(frames, labels, sub)
    state.assign(rows, sub)

(labels -1 for unlabelled rows: they infer only; labelled rows predict first, then learn).
``drain`` repeats ticks until no stream has a frame ready. The prediction of a step is
``argmax readout_sum`` with ``probabilities = softmax(readout_sum / steps)``: the evidence summed
over the sequence so far.

Failures are confined to the packet that causes them. A tick whose learner step raises leaves the
state untouched (``sub`` is a copy; ``assign`` runs only after the step) and is re-run row by row,
so the other streams' steps still apply; a step that fails alone is retried up to ``max_failures``
attempts in all, then its packet is given up (``poisoned``: its remaining steps are dropped, its
stream goes on with the next packet). Framing a packet is undone on failure (the framer is rebuilt
from its ``state_dict`` taken before) and retried the same way (``PacketFailed`` after the last).

Everything here is synchronous torch / numpy work, run off the event loop by the worker.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

import service.worker.batcher_state as batcher_state
from ndot_core import NetworkState, OnlineLearner
from ndot_core.events.framing import StreamFramer
from ndot_core.events.layout import EventError, events_from_bytes
from service.bus.messages import EventsPacket
from service.metrics import ServiceMetrics
from service.worker.pace import Pace
from service.worker.state_table import StateTable, shallow
from service.worker.streams import StreamRegistry, StreamSlot

RESET, STEP = "reset", "step"
log = logging.getLogger("ndot.worker")


class PacketFailed(Exception):
    """Framing a packet failed on every attempt (``max_failures``); the message says why."""


@dataclass(frozen=True, slots=True)
class PendingStep:
    """One frame waiting for its tick, with the packet it came from."""

    frame: np.ndarray  # [C, H, W] float32
    label: int | None
    entry_id: str


class Batcher:
    """Streams' frame queues over one learner and one batched ``NetworkState``."""

    def __init__(
        self,
        learner: OnlineLearner,
        capacity: int,
        window_us: int,
        metrics: ServiceMetrics,
        max_events: int | None = None,
        max_failures: int = 3,
        max_sensor_size: int = 65535,
        max_gap_windows: int = 100,
        max_packet_frames: int | None = None,
        max_stream_speed: float = 0.0,
    ) -> None:
        self.learner = learner
        self.window_us = window_us
        self.max_gap_windows = max_gap_windows
        self.max_packet_frames = max_packet_frames
        self.pace = Pace(max_stream_speed, window_us, burst=max_packet_frames or 1)  # service.worker.pace
        self.step_s_average = 0.01  # moving average of a learner step's seconds (for Retry-After)
        self.metrics = metrics
        self.max_events = max_events
        self.max_failures = max_failures
        self.max_sensor_size = max_sensor_size
        self.input_size: tuple[int, int] = tuple(learner.model.input_size)  # (H, W)
        self.registry = StreamRegistry(capacity, self.new_framer)
        self.table = StateTable(learner)  # one compact row per live stream (service.worker.state_table)
        #: Step results per bus entry id, filled by ticks, taken by the worker once the entry is done.
        self.results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        #: Packets given up after ``max_failures`` failed steps: entry id -> error (taken by the worker).
        self.poisoned: dict[str, str] = {}
        #: Steps each packet still has queued; a packet is done when its count is 0 (``take``).
        self.remaining: dict[str, int] = defaultdict(int)

    @property
    def state(self) -> NetworkState:
        """The live streams' states, stream ``slot`` in row ``slot.row``."""
        self.table.fit(self.registry)
        return self.table.state

    @state.setter
    def state(self, state: NetworkState) -> None:
        self.table.state = state

    def new_framer(self, width: int, height: int) -> StreamFramer:
        return StreamFramer(
            (width, height),
            window_us=self.window_us,
            output_size=self.input_size,
            max_gap_windows=self.max_gap_windows,
        )

    # --- streams ----------------------------------------------------------------------------------

    def open(self, stream_id: str, width: int, height: int) -> tuple[StreamSlot, list[StreamSlot]]:
        """The stream's slot (new ones start a fresh sequence); returns ``(slot, evicted)``."""
        limit = self.max_sensor_size
        if not (1 <= width <= limit and 1 <= height <= limit):
            raise ValueError(f"sensor size {width}x{height} outside 1..{limit} pixels per side")
        created = stream_id not in self.registry
        if created and self.registry.full:
            self.drain()  # the victim's queued steps run before it loses its row
        slot, evicted = self.registry.open(stream_id, width, height, time.time())
        if evicted is not None:
            self.metrics.streams_evicted.inc()
        if created:  # its row may hold an old stream's state
            self._begin_sequence(slot)
        self.metrics.active_streams.set(len(self.registry))
        return slot, [] if evicted is None else [evicted]

    def _begin_sequence(self, slot: StreamSlot) -> None:
        """Fresh framer now, fresh neuron state at this point of the stream's queue."""
        slot.framer = self.new_framer(slot.width, slot.height)
        slot.pending.append((RESET, None))
        slot.sequence_events = 0

    def push_packet(self, entry_id: str, stream_id: str, packet: EventsPacket) -> list[StreamSlot]:
        """Frame a packet's events onto its stream's queue; returns streams evicted to make room.

        Raises ``EventError`` when the events are invalid or would close more than ``max_packet_frames``
        windows (nothing is queued then), ``PacketFailed`` when framing them failed ``max_failures``
        times (each attempt undone).
        """
        events = events_from_bytes(packet.events, (packet.width, packet.height), self.max_events)
        slot, evicted = self.open(stream_id, packet.width, packet.height)
        error: Exception | None = None
        for attempt in range(1, self.max_failures + 1):
            undo = (slot.framer.state_dict(), len(slot.pending), slot.sequences, slot.sequence_events)
            try:
                self._frame(entry_id, slot, packet, events)
                return evicted
            except Exception as err:  # undo the half-framed packet; a refusal is final, a failure retried
                error = err
                framer_state, queued, slot.sequences, slot.sequence_events = undo
                slot.framer = StreamFramer.from_state_dict(framer_state)
                while len(slot.pending) > queued:
                    slot.pending.pop()
                if isinstance(err, EventError):  # the packet itself is refused: no retry
                    raise
                self.metrics.packets.labels(outcome="failed").inc()
                log.warning(
                    "event=framing_failed id=%s stream=%s attempt=%d error=%r",
                    entry_id,
                    stream_id,
                    attempt,
                    f"{type(err).__name__}: {err}",
                )
        raise PacketFailed(
            f"framing failed {self.max_failures} times on this packet: {type(error).__name__}: {error}"
        )

    def _frame(self, entry_id: str, slot: StreamSlot, packet: EventsPacket, events: np.ndarray) -> None:
        """Frame one packet's (valid) events onto ``slot``'s queue."""
        if packet.start and slot.sequence_events:  # a sequence without events yet is already fresh
            self._begin_sequence(slot)
        late_before = slot.framer.late_events
        frames = slot.framer.push(events, max_frames=self.max_packet_frames)
        if packet.end:
            frames += slot.framer.flush()

        if len(events) and not slot.sequence_events:
            slot.sequences += 1
        slot.sequence_events += len(events)
        self.metrics.events.inc(len(events))
        self.metrics.late_events.inc(slot.framer.late_events - late_before)
        slot.pending.extend((STEP, PendingStep(f, packet.label, entry_id)) for f in frames)
        self.remaining[entry_id] += len(frames)
        if packet.end:  # the next packet begins a new sequence
            self._begin_sequence(slot)
        slot.last_entry_id = entry_id
        self.results.setdefault(entry_id, [])

    def reset_stream(self, slot: StreamSlot) -> None:
        """Fresh neuron and framer state for one stream (queue must be drained)."""
        self.state.reset_rows([slot.row])  # (the property fits the table first)
        slot.framer = self.new_framer(slot.width, slot.height)
        slot.sequence_step = 0
        slot.sequence_events = 0

    def remove(self, stream_id: str) -> StreamSlot | None:
        slot = self.registry.remove(stream_id)
        self.metrics.active_streams.set(len(self.registry))
        return slot

    def expire(self, ttl_s: float) -> list[StreamSlot]:
        expired = self.registry.expire(time.time(), ttl_s)
        self.pace.forget_all_but(slot.stream_id for slot in self.registry)
        if expired:
            self.metrics.active_streams.set(len(self.registry))
        return expired

    def reset_model(self, seed: int) -> None:
        """Fresh weights and optimizer; every stream's neuron state back to rest (framers kept)."""
        self.learner.reset_weights(seed)
        self.state.reset_rows(list(range(self.state.batch_size)))
        for slot in self.registry:
            slot.sequence_step = 0
        self.metrics.model_version.set(self.learner.version)

    # --- ticks ------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return any(slot.pending for slot in self.registry)

    def drain(self, max_ticks: int | None = None) -> int:
        """Run ticks until no stream has a frame ready, or ``max_ticks`` ran; returns the number of ticks.

        Every tick steps every stream that has a frame ready once, so with a budget a stream with a long
        queue takes its share of ticks and the others' packets finish (and are answered) meanwhile.
        """
        ticks = 0
        while (max_ticks is None or ticks < max_ticks) and self.tick(paced=max_ticks is not None):
            ticks += 1
        return ticks

    def wait_s(self) -> float:
        """Seconds until a queued frame may be stepped (0: now; only a stream's pace makes one wait)."""
        return self.pace.wait_s((slot.stream_id for slot in self.registry if slot.pending), time.monotonic())

    def take(self, entry_id: str) -> tuple[list[dict[str, Any]], str | None] | None:
        """A finished packet's step results and its error (``None`` = applied); ``None`` while steps wait."""
        if self.remaining.get(entry_id, 0) > 0:
            return None
        self.remaining.pop(entry_id, None)
        return self.results.pop(entry_id, []), self.poisoned.pop(entry_id, None)

    def forget(self) -> None:
        """Drop every queued step and result (after a failure outside any one packet)."""
        for slot in self.registry:
            slot.pending.clear()
        self.results.clear()
        self.remaining.clear()

    def tick(self, paced: bool = False) -> int:
        """One batched step over every stream with a frame ready; returns the batch size.

        ``paced``: a stream ahead of its pace (``service.worker.pace``) sits this tick out.

        When the batched step raises, each row is run alone (``_run_alone``), so one bad packet
        never holds back the other streams.
        """
        self.table.fit(self.registry)
        batch: list[tuple[StreamSlot, PendingStep]] = []
        fresh_rows = []
        now = time.monotonic()
        for slot in self.registry:
            while slot.pending and slot.pending[0][0] == RESET:
                slot.pending.popleft()
                fresh_rows.append(slot.row)
                slot.sequence_step = 0
            if slot.pending and (not paced or self.pace.take(slot.stream_id, now)):
                step = slot.pending.popleft()[1]
                self.remaining[step.entry_id] -= 1
                batch.append((slot, step))
        if fresh_rows:
            self.table.reset_rows(fresh_rows)
        if not batch:
            return 0
        try:
            self._step(batch)
        except Exception as err:
            if len(batch) == 1:
                self._run_alone(batch[0], err)
            else:
                log.warning(
                    "event=batch_step_failed rows=%d error=%r; running each row alone",
                    len(batch),
                    f"{type(err).__name__}: {err}",
                )
                for item in batch:
                    self._run_alone(item, None)
        return len(batch)

    def _run_alone(self, item: tuple[StreamSlot, PendingStep], failure: Exception | None) -> None:
        """Run one row's step, with up to ``max_failures`` attempts in all; give its packet up after that.

        ``failure``: the error of a first attempt already made alone (it counts as one attempt).
        """
        slot, step = item
        attempts = 0 if failure is None else 1
        while failure is None or attempts < self.max_failures:
            if failure is not None:
                self.metrics.packets.labels(outcome="failed").inc()
                log.warning(
                    "event=step_failed id=%s stream=%s attempt=%d error=%r",
                    step.entry_id,
                    slot.stream_id,
                    attempts,
                    f"{type(failure).__name__}: {failure}",
                )
                if (
                    self.learner.device.type == "cuda"
                ):  # a transient out-of-memory may pass once the cache is freed
                    torch.cuda.empty_cache()
            try:
                self._step([item])
                return
            except Exception as err:
                failure, attempts = err, attempts + 1
        self.metrics.packets.labels(outcome="failed").inc()
        self.poisoned[step.entry_id] = (
            f"learner step failed {attempts} times on this packet: {type(failure).__name__}: {failure}"
        )
        slot.pending = type(slot.pending)(
            work for work in slot.pending if not (work[0] == STEP and work[1].entry_id == step.entry_id)
        )
        self.results[step.entry_id] = []
        self.remaining[step.entry_id] = 0

    def _step(self, batch: list[tuple[StreamSlot, PendingStep]]) -> None:
        """Rows -> ``learner.step`` -> rows back -> record; the state changes only if the step succeeds.

        Every live stream in the batch (the usual case at real time): the table is stepped as it is,
        no copies (``StateTable.batch_of``); its tensors before the step are kept to put back on failure.
        """
        batch.sort(key=lambda item: item[0].row)
        rows = [slot.row for slot, _ in batch]
        frames = torch.from_numpy(np.stack([step.frame for _, step in batch]))
        label_list = [-1 if step.label is None else step.label for _, step in batch]
        labels = torch.tensor(label_list, dtype=torch.long) if max(label_list) >= 0 else None
        sub, how = self.table.batch_of(rows)
        before = shallow(sub) if how == "whole" else None
        started = time.perf_counter()
        try:
            self.learner.step(frames, labels, sub)
        except Exception:
            if before is not None:
                self.table.state = before
            raise
        elapsed = time.perf_counter() - started
        self.metrics.step_duration.observe(elapsed)
        self.step_s_average += 0.05 * (elapsed - self.step_s_average)
        self.table.put(rows, sub, how)
        self._record(batch, sub)

    def _record(self, batch: list[tuple[StreamSlot, PendingStep]], sub: NetworkState) -> None:
        predicted = OnlineLearner.predict(sub).tolist()
        steps = sub.steps.clamp(min=1).to(sub.readout_sum.dtype).unsqueeze(1)
        probabilities = torch.softmax(sub.readout_sum / steps, dim=1).tolist()
        version = self.learner.version
        learned = 0
        for (slot, step), guess, probs in zip(batch, predicted, probabilities, strict=True):
            correct = None if step.label is None else guess == step.label
            self.results[step.entry_id].append(
                {
                    "step": slot.sequence_step,
                    "predicted": guess,
                    "probabilities": probs,
                    "label": step.label,
                    "learned": step.label is not None,
                    "model_version": version,
                }
            )
            slot.sequence_step += 1
            slot.steps += 1
            slot.last_prediction = guess
            if correct is not None:
                learned += 1
                slot.labelled_steps += 1
                slot.correct_steps += correct
            self.metrics.record_prediction(correct)
        self.metrics.steps.labels(kind="learn").inc(learned)
        self.metrics.steps.labels(kind="infer").inc(len(batch) - learned)
        self.metrics.model_version.set(version)

    # --- checkpoints ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Learner, network state, streams (framers included) and RNG state; drains first."""
        self.drain()
        return batcher_state.snapshot(self)

    def load(self, tree: dict[str, Any]) -> None:
        """Swap in a snapshot after checking it against the running model; on error nothing changes."""
        self.state, self.registry = batcher_state.loaded(self, tree)
        self.metrics.active_streams.set(len(self.registry))
        self.metrics.model_version.set(self.learner.version)
