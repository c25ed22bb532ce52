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

When labels are learned (``learn_at``): ``"step"`` learns each labelled step as it runs (above);
``"sequence"`` (test-then-train, ``service.worker.sequence_learning``) steps every live frame
unlabelled, holds a sequence's frames and label, scores its prediction at its end (an END marker
after its last frame) and then learns it by replaying the held frames as extra labelled rows of
the next ticks, on rows apart from the live ones: a tick is then two learner steps::

    learner.step(live frames, None (no row learns), the live rows)             predict
    learner.step(replay frames, their labels, NetworkState.cat(replay rows))   learn (one row per replay)

With ``drain(answer_early=True)`` (the worker's rounds) the replay steps of a round's ticks wait until
the round's answers are sent (answers before learning: ``service.worker.batcher_steps``).

Failures are confined to the packet that causes them: a tick whose learner step raises leaves the
state untouched and is re-run row by row (``service.worker.step_failures``; ``poisoned`` packets
after ``max_failures`` attempts). Framing a packet is undone on failure (the framer is rebuilt from
its ``state_dict`` taken before) and retried the same way (``PacketFailed`` after the last).

Everything here is synchronous torch / numpy work, run off the event loop by the worker.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

import service.worker.batcher_state as batcher_state
import service.worker.step_failures as step_failures
from ndot_core import NetworkState, OnlineLearner
from ndot_core.events.framing import StreamFramer
from ndot_core.events.layout import EventError, events_from_bytes
from service.bus.messages import EventsPacket
from service.metrics import ServiceMetrics
from service.worker.batcher_sequences import RESET, STEP, SequenceHooks
from service.worker.batcher_steps import StepRunner
from service.worker.live import LiveFrames
from service.worker.pace import Pace
from service.worker.sequence_learning import SequenceLearning
from service.worker.sequences import SequenceLimits
from service.worker.state_table import StateTable
from service.worker.streams import StreamRegistry, StreamSlot

LEARN_AT = ("sequence", "step")
#: With only replays queued, how long the worker loop waits for packets before running them alone.
REPLAY_IDLE_S = 0.005
log = logging.getLogger("ndot.worker")


class PacketFailed(Exception):
    """Framing a packet failed on every attempt (``max_failures``); the message says why."""


@dataclass(frozen=True, slots=True)
class PendingStep:
    """One frame waiting for its tick, with the packet it came from."""

    frame: np.ndarray  # [C, H, W] float32
    label: int | None
    entry_id: str
    learn: bool = True  # False: the label is held for the sequence's end (learn_at=sequence)

    @property
    def learn_label(self) -> int:
        """The label this step learns from, -1 for none."""
        return -1 if self.label is None or not self.learn else self.label


class Batcher(SequenceHooks, StepRunner):
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
        max_window_events: int | None = None,
        max_stream_speed: float = 0.0,
        learn_at: str = "step",
        sequence_limits: SequenceLimits | None = None,
        prequential_window: int = 100,
    ) -> None:
        if learn_at not in LEARN_AT:
            raise ValueError(f"learn_at must be one of {LEARN_AT}, got {learn_at!r}")
        self.learner = learner
        self.window_us = window_us
        self.max_gap_windows = max_gap_windows
        self.max_packet_frames = max_packet_frames
        self.max_window_events = max_window_events
        self.pace = Pace(max_stream_speed, window_us, burst=max_packet_frames or 1)  # service.worker.pace
        self.clock: Callable[[], float] = time.monotonic  # the pace's clock (seconds)
        self.step_s_average = 0.01  # moving average of a learner step's seconds (for Retry-After)
        self.ticks_run = 0  # ticks that stepped at least one row
        self.model_resets = 0
        self.last_tick_labelled = 0  # labelled rows the latest tick learned from (live and replay rows)
        self.metrics = metrics
        self.max_events = max_events
        self.max_failures = max_failures
        self.max_sensor_size = max_sensor_size
        self.input_size: tuple[int, int] = tuple(learner.model.input_size)  # (H, W)
        self.registry = StreamRegistry(capacity, self.new_framer)
        self.table = StateTable(learner)  # one compact row per live stream (service.worker.state_table)
        self.live = LiveFrames(window_us)  # watched streams' latest steps (service.worker.live)
        #: Step results per bus entry id, filled by ticks, taken by the worker once the entry is done.
        self.results: dict[str, list[dict[str, Any]]] = defaultdict(list)
        #: Packets given up after ``max_failures`` failed steps: entry id -> error (taken by the worker).
        self.poisoned: dict[str, str] = {}
        #: Steps (and END markers) each entry still has queued; an entry is done when its count is 0 (``take``).
        self.remaining: dict[str, int] = defaultdict(int)
        #: learn_at=sequence: held sequences, scores and replays; None when labels are learned per step.
        self.sequences: SequenceLearning | None = None
        if learn_at == "sequence":
            self.sequences = SequenceLearning(learner, metrics, sequence_limits or SequenceLimits())
            metrics.set_prequential_window(prequential_window)

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
            self._closed(evicted)
        if created:  # its row may hold an old stream's state
            self._begin_sequence(slot)
        self.metrics.active_streams.set(len(self.registry))
        return slot, [] if evicted is None else [evicted]

    def _begin_sequence(self, slot: StreamSlot, framer: StreamFramer | None = None) -> None:
        """Fresh framer now, fresh neuron state at this point of the stream's queue."""
        slot.framer = framer or self.new_framer(slot.width, slot.height)
        record = self.sequences.begin(slot) if self.sequences is not None else None
        slot.pending.append((RESET, record))
        slot.sequence_events = 0

    def push_packet(self, entry_id: str, stream_id: str, packet: EventsPacket) -> list[StreamSlot]:
        """Frame a packet's events onto its stream's queue; returns streams evicted to make room.

        Raises ``EventError`` when the events are invalid, would close more than ``max_packet_frames``
        windows or leave more than ``max_window_events`` events in the open window (nothing is queued
        then), ``PacketFailed`` when framing them failed ``max_failures`` times (each attempt undone).
        """
        events = events_from_bytes(packet.events, (packet.width, packet.height), self.max_events)
        classes = self.learner.model.num_classes
        if self.sequences is not None and packet.label is not None and not 0 <= packet.label < classes:
            raise ValueError(f"label {packet.label} outside [0, {classes})")  # (held: no step would meet it)
        slot, evicted = self.open(stream_id, packet.width, packet.height)
        error: Exception | None = None
        for attempt in range(1, self.max_failures + 1):
            framer = slot.framer  # (its snapshot copies nothing: the open window may hold many events)
            undo = (framer.snapshot(), len(slot.pending), slot.sequences, slot.sequence_events)
            try:
                self._frame(entry_id, slot, packet, events)
                return evicted
            except Exception as err:  # undo the half-framed packet; a refusal is final, a failure retried
                error = err
                snapshot, queued, slot.sequences, slot.sequence_events = undo
                framer.restore(snapshot)
                slot.framer = framer
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
        """Frame one packet's (valid) events onto ``slot``'s queue (nothing changes if framing raises)."""
        begins = packet.start and slot.sequence_events  # a sequence without events yet is already fresh
        framer = self.new_framer(slot.width, slot.height) if begins else slot.framer
        late_before = framer.late_events
        frames = framer.push(events, self.max_packet_frames, self.max_window_events)
        if packet.end:
            frames += framer.flush()

        if begins:  # a start cuts the running sequence: it ends here
            self._end_sequence(slot, None)
            self._begin_sequence(slot, framer)
        if len(events) and not slot.sequence_events:
            slot.sequences += 1
        slot.sequence_events += len(events)
        self.metrics.events.inc(len(events))
        self.metrics.late_events.inc(framer.late_events - late_before)
        learn = self.sequences is None
        slot.pending.extend((STEP, PendingStep(f, packet.label, entry_id, learn)) for f in frames)
        self.remaining[entry_id] += len(frames)
        if self.sequences is not None:
            self.sequences.framed(slot, frames, packet.label)
        if packet.end:  # the next packet begins a new sequence
            self._end_sequence(slot, entry_id)
            self._begin_sequence(slot)
        slot.last_entry_id = entry_id
        self.results.setdefault(entry_id, [])

    def reset_stream(self, slot: StreamSlot) -> None:
        """Fresh neuron and framer state for one stream (queue must be drained)."""
        self.learn_deferred()
        self.state.reset_rows([slot.row])  # (the property fits the table first)
        slot.framer = self.new_framer(slot.width, slot.height)
        slot.sequence_step = 0
        slot.sequence_events = 0
        if self.sequences is not None:  # its running sequence is cut: neither scored nor learned
            self._finished(self.sequences.abandon(slot))

    def remove(self, stream_id: str) -> StreamSlot | None:
        slot = self.registry.remove(stream_id)
        self.metrics.active_streams.set(len(self.registry))
        if slot is not None:
            self._closed(slot)
        return slot

    def expire(self, ttl_s: float) -> list[StreamSlot]:
        expired = self.registry.expire(time.time(), ttl_s)
        self.pace.forget_all_but(slot.stream_id for slot in self.registry)
        if expired:
            self.metrics.active_streams.set(len(self.registry))
        for slot in expired:
            self._closed(slot)
        return expired

    def reset_model(self, seed: int) -> None:
        """Fresh weights and optimizer; every stream's neuron state back to rest (framers kept)."""
        self.learn_deferred()  # (a replay learned now is then forgotten with the weights, as before)
        self.learner.reset_weights(seed)
        self.model_resets += 1
        self.state.reset_rows(list(range(self.state.batch_size)))
        for slot in self.registry:
            slot.sequence_step = 0
            if self.sequences is not None:  # running sequences are cut (their rows rest now)
                self._finished(self.sequences.abandon(slot))
        if self.sequences is not None:  # the fresh weights re-learn nothing streamed before the reset
            self.sequences.forget_recent()
        self.metrics.model_version.set(self.learner.version)

    # --- ticks ------------------------------------------------------------------------------------

    def has_work(self) -> bool:
        return any(slot.pending for slot in self.registry) or self.replaying

    def drain(self, max_ticks: int | None = None, idle: bool = False, answer_early: bool = False) -> int:
        """Run ticks until no stream has a frame ready, or ``max_ticks`` ran; returns the number of ticks.

        Every tick steps every stream that has a frame ready once, so with a budget a stream with a long
        queue takes its share of ticks and the others' packets finish (and are answered) meanwhile.
        Replays (learn_at=sequence) are background work: with a budget they ride along with the ticks of
        live frames (one row per stream per tick), and ticks of replays alone run only in an ``idle``
        round (no packet read or waiting), so they never hold back a round's answers; without a budget
        everything runs.

        ``answer_early`` (with a budget): the round's replay learning is owed (``learning_deferred``)
        until the caller has sent the answers and calls ``learn_deferred`` (one replay step, more while
        replays back up: ``service.worker.batcher_steps``).
        """
        self.learn_deferred()
        defer = answer_early and max_ticks is not None
        ticks = 0
        while max_ticks is None or ticks < max_ticks:
            if not self.tick(
                paced=max_ticks is not None, replays_alone=max_ticks is None or idle, defer=defer
            ):
                break
            ticks += 1
        return ticks

    def wait_s(self) -> float:
        """Seconds until a queued frame may be stepped (0: now; only a stream's pace makes one wait), or,
        with only replays to run, ``REPLAY_IDLE_S``: the loop waits that long for packets before an idle
        round runs the replays alone (instead of spinning on the bus)."""
        live = [slot.stream_id for slot in self.registry if slot.pending]
        if not live and self.replaying:
            return REPLAY_IDLE_S
        return self.pace.wait_s(live, self.clock())

    def take(self, entry_id: str) -> tuple[list[dict[str, Any]], str | None] | None:
        """A finished packet's step results and its error (``None`` = applied); ``None`` while steps wait."""
        if self.remaining.get(entry_id, 0) > 0:
            return None
        self.remaining.pop(entry_id, None)
        return self.results.pop(entry_id, []), self.poisoned.pop(entry_id, None)

    def forget(self) -> None:
        """Drop every queued step and result (after a failure outside any one packet)."""
        self.replay_ticks_owed = 0  # (the replays stay queued: they run from where they were)
        for slot in self.registry:
            slot.pending.clear()
            if self.sequences is not None:  # its sequences lost queued frames: dropped
                self.sequences.close(slot)
        self.results.clear()
        self.remaining.clear()
        if self.sequences is not None:
            self.sequences.results.clear()

    def tick(self, paced: bool = False, replays_alone: bool = True, defer: bool = False) -> int:
        """One batched step over every stream with a frame ready; returns the batch size.

        ``paced``: a stream ahead of its pace (``service.worker.pace``) sits this tick out.
        ``replays_alone``: run the replays' rows (learn_at=sequence) even when no live frame is ready.
        ``defer``: a tick with live rows owes its replay step (learn_at=sequence), or its live rows' learning
        (learn_at=step), to ``learn_deferred`` (after the answers; ``service.worker.batcher_steps``).

        When the batched step raises, each row is run alone (``service.worker.step_failures``), so one
        bad packet never holds back the other streams.
        """
        if not defer:  # learning owed by earlier ticks comes first: the updates keep the ticks' order
            self.learn_deferred()
        self.last_tick_labelled = 0
        self.table.fit(self.registry)
        batch: list[tuple[StreamSlot, PendingStep]] = []
        fresh_rows: list[int] = []
        starting: list[tuple[StreamSlot, Any]] = []
        now = self.clock()
        for slot in self.registry:
            self._markers(slot, fresh_rows, starting)
            if slot.pending and (not paced or self.pace.take(slot.stream_id, now)):
                step = slot.pending.popleft()[1]
                self.remaining[step.entry_id] -= 1
                batch.append((slot, step))
        if fresh_rows:  # (a live step's pending learning may hold the table's tensors: reset a copy)
            self.table.reset_rows(fresh_rows, copy=self.learner.learning_pending)
        for slot, record in starting:  # the row a sequence starts from (at rest after its reset)
            self.sequences.started(record, self._row_unless_resting(slot.row))
        replays = self.sequences.rows() if self.sequences is not None else []
        if not batch and not (replays and replays_alone):
            return 0
        self.ticks_run += 1  # (the tick clock of a cluster counts these: service.worker.cluster)
        self.last_tick_labelled = sum(step.learn_label >= 0 for _, step in batch)
        self.learn_live_pending()  # a live step's learning (learn_at=step, defer) before the next step
        if batch:
            try:
                self._step(batch, defer)
            except Exception as err:
                step_failures.run_each_alone(self, batch, [], err)
        if replays and defer and batch:  # learned after the round's answers (learn_deferred)
            self.replay_ticks_owed += 1
        elif replays:  # after the live rows: a replay's update reaches the live rows at the next tick
            if self.learning_deferred:  # (a tick of replays alone: the owed ones first, in order)
                self.learn_deferred()
                replays = self.sequences.rows()
            if replays:
                self._run_replays(replays)
                self.last_tick_labelled += len(replays)
        for slot, _ in batch:  # a sequence's END right after its last frame: its reply goes this round
            self._markers(slot, None, None)
        return len(batch) + len(replays)

    def ticks_to_drain(self, replays: bool = True) -> int:
        """Ticks until no stream has a frame queued and (``replays``) no replay is left, as things stand (a
        sequence that ends meanwhile adds its replay): a tick steps one frame and one replay row per stream."""
        needed = max((sum(kind == STEP for kind, _ in slot.pending) for slot in self.registry), default=0)
        if replays and self.sequences is not None:
            for queue in self.sequences.replays.values():
                needed = max(needed, sum(len(replay.frames) - replay.position for replay in queue))
        return needed

    # --- checkpoints ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Learner, network state, streams (framers included) and RNG state; drains first."""
        self.drain()  # (the learning a tick deferred included)
        return batcher_state.snapshot(self)

    def load(self, tree: dict[str, Any]) -> None:
        """Swap in a snapshot after checking it against the running model; on error nothing changes."""
        self.learn_deferred()
        self.state, self.registry = batcher_state.loaded(self, tree)
        if self.sequences is not None:  # as a restarted worker: the memory of learned sequences is empty
            self.sequences.forget_recent()
        self.metrics.active_streams.set(len(self.registry))
        self.metrics.model_version.set(self.learner.version)
