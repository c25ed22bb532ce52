"""Applying bus entries to the model, in bus order: the worker's synchronous half (run in a thread).

``EntryApplier`` holds the model (``Batcher``), the checkpoint store and the *watermark*, the id of
the newest entry applied. For a batch of entries it::

    skips entries at or below the watermark (applied before: by this process or its checkpoint;
        logged and counted in ndot_entries_skipped_total, never silent)
    events  -> frames onto its stream's queue (batcher.push_packet)
    label   -> the named sequence of its stream gets its label (batcher.push_label, learn_at=sequence):
               answered once that sequence's end ran (scored), refused 404/409/422 without a dead letter
    control -> drain queued steps, then apply (open, reset, delete, checkpoint, restore, model_reset)
    at most max_ticks_per_round batched ticks (each steps every stream with a frame ready once)
    settle: answer and ack the packets whose steps all ran; the rest stay in flight for the next round
    busy flags: raised for streams with more than max_stream_backlog_frames queued (the API answers 429)
    expire idle streams; periodic checkpoint when due (it drains, so settle again)

and returns what the async side must send (``Applied``: replies, values, busy flags, dead letters,
acks). The round's tick budget is the fair share: a stream with a long queue gets one frame per
tick like every other, and the others' packets are answered after the round they finish in. The
periodic checkpoint runs after the batch's outcomes are settled: a checkpoint that fails (disk full,
a bad file in the folder) is logged and counted (``ndot_checkpoint_errors_total{stage}``) and changes
none of them. Checkpoint files are checked whole (digest) and field by field (``checkpoint_tree``);
saving, the periodic trigger and restoring are the applier's checkpoint half (``applier_checkpoints``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from ndot_core.events.layout import EventError
from service.bus import BusEntry, messages
from service.bus.shards import Watermark
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker.applier_checkpoints import CheckpointSide
from service.worker.batcher import PacketFailed
from service.worker.checkpoint_due import CheckpointDue
from service.worker.checkpoints import CheckpointError, CheckpointStore
from service.worker.model import build_batcher
from service.worker.model_export import export_reply
from service.worker.sequences import LabelRefused
from service.worker.streams import StreamError

log = logging.getLogger("ndot.worker")

#: Lockstep (sync_mode grad): ticks of replays alone a round runs at most (``ticks_wanted``).
LOCKSTEP_REPLAY_TICKS = 2
#: Ticks of replays alone an idle round (no packet read or waiting) runs at most: a packet that comes
#: meanwhile waits for one learning step, not for a round's budget of them (at 8 cameras, 8 such ticks
#: held a round for ~30 ms and set the p99 of the replies; while replays remain the next idle round
#: follows ``REPLAY_IDLE_S`` later if no packet came, ``Batcher.wait_s``).
IDLE_REPLAY_TICKS = 1


def _named(entry: BusEntry) -> str:
    """The checkpoint a control entry names (restore), or its kind (checkpoint)."""
    return entry.fields.get("name", entry.kind.encode()).decode(errors="replace")


def reason(error: BaseException) -> str:
    """An error for a reply: an ``OSError`` without its file name (no server path reaches a client)."""
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error.strerror or 'failed'}"
    return str(error) or type(error).__name__


@dataclass
class Applied:
    """What one batch of entries produced, for the async side to send."""

    replies: list[tuple[str, bytes]] = field(default_factory=list)
    #: Sensor values to write (with their TTL), ``None`` = delete the key (the stream closed).
    values: dict[str, bytes | None] = field(default_factory=dict)
    dead: list[tuple[BusEntry, str]] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)
    #: Per-stream backpressure flags to write (value: Retry-After seconds), ``None`` = clear the flag.
    busy: dict[str, bytes | None] = field(default_factory=dict)


class EntryApplier(CheckpointSide):
    """The model, its checkpoints and the watermark; applies batches of entries (see the module docstring)."""

    def __init__(self, settings: Settings, metrics: ServiceMetrics, shards: int = 1) -> None:
        self.settings = settings
        self.metrics = metrics
        self.prefix = settings.bus_stream
        self.store = CheckpointStore(settings.checkpoint_dir, report=self.checkpoint_failed)
        self.batcher = build_batcher(settings, metrics)
        #: The newest entry applied per shard (entries of one shard come in id order).
        self.watermark = Watermark()
        self.shards = shards  # the bus's shard count (1: unsharded), recorded in checkpoints
        self.in_cluster = False  # one rank of several (service.worker.cluster_member)
        #: sync_mode=grad: no tick runs here; the ranks tick together at the end of each round
        #: (``ClusterMember.lockstep_ticks``), and a control entry waits in ``held`` while steps are queued.
        self.lockstep = False
        #: Entries read but not applied yet (lockstep: a control entry and every entry after it).
        self.held: list[BusEntry] = []
        self.stopping = False  # lockstep: the last rounds after the cut take no held entry on
        self.checkpoints: list[dict[str, Any]] = []
        #: Packets taken off the bus whose steps still wait for ticks, in bus order (not yet acked).
        self.in_flight: dict[str, BusEntry] = {}
        self.busy: set[str] = set()  # streams whose busy flag is raised
        self.dirty = False
        self.due = CheckpointDue(settings, shards)  # when the next periodic checkpoint is due
        self._last_refresh_s = time.monotonic()

    def sensor_values(self) -> dict[str, bytes]:
        """The sensor value of every live stream (what the API checks packets against)."""
        return {
            messages.sensor_key(self.prefix, s.stream_id): messages.encode_sensor(s.width, s.height)
            for s in self.batcher.registry
        }

    @property
    def has_work(self) -> bool:
        """Packets taken whose steps still wait for ticks, or replays of scored sequences (the loop should
        not block on the bus)."""
        return bool(self.in_flight) or self.batcher.replaying or bool(self.held)

    def ticks_wanted(self, draining: bool) -> int:
        """Lockstep: the ticks this rank wants this round. All its queued work (live frames and replays)
        while a control entry is held or ``draining``; else its live frames, at most
        ``max_ticks_per_round``, and with none (an idle rank: replays run alone) at most
        ``LOCKSTEP_REPLAY_TICKS`` ticks of replays, so a round of replays alone, whose every tick is an
        all-reduce on every rank, holds back the next packets by a few ticks only.
        """
        batcher = self.batcher
        if draining or self.held:
            return batcher.ticks_to_drain()
        live = batcher.ticks_to_drain(replays=False)
        if live:
            return min(live, self.settings.max_ticks_per_round)
        return min(batcher.ticks_to_drain(), LOCKSTEP_REPLAY_TICKS)

    def settle_ticked(self, out: Applied) -> None:
        """Lockstep: after the ranks' ticks, answer the packets they finished (replays' streams, busy flags)."""
        self._settle(out)
        self._refresh_learned(out)
        self._flag_busy(out)

    def learn_deferred(self) -> int:
        """Run the learning the round's last tick left for after its answers; returns the rows learned."""
        try:
            return self.batcher.learn_deferred()
        except Exception:  # (the replay steps confine their own failures; this is a bug: log, go on)
            log.exception("event=deferred_learning_failed")
            return 0

    def wait_s(self) -> float:
        """Seconds until queued work may run (0: now); the loop blocks on the bus that long at most."""
        return self.batcher.wait_s()

    def apply(self, entries: list[BusEntry], housekeeping: bool, drain: bool = False) -> Applied:
        """Apply ``entries`` in bus order, then at most ``max_ticks_per_round`` ticks (all with ``drain``).

        Packets whose steps all ran are answered and acked; the others stay in flight for later rounds.
        With ``answer_before_learning`` the last tick's learning may wait for ``learn_deferred``, which the
        worker calls once the answers are on their way (whatever runs first here runs it before).
        """
        self.learn_deferred()
        try:
            out = self._apply_in_order(
                entries, housekeeping, None if drain else self.settings.max_ticks_per_round
            )
        except Exception as err:  # a bug outside a packet's framing / step (those the batcher confines)
            log.exception("event=batch_failed entries=%d in_flight=%d", len(entries), len(self.in_flight))
            self.batcher.forget()
            failed = [*self.in_flight.values(), *(e for e in entries if e.id not in self.in_flight)]
            self.in_flight.clear()
            self.metrics.packets.labels(outcome="failed").inc(len(failed))
            detail = f"worker failed on this batch: {type(err).__name__}: {err}"
            return Applied(
                replies=[(e.id, messages.error_reply(500, detail)) for e in failed],
                dead=[(e, detail) for e in failed],
            )
        self._checkpoint_if_due()  # the outcomes above are settled: a failing checkpoint changes none
        self._settle(out)  # a checkpoint drains: what it finished is answered now
        return out

    def _settle(self, out: Applied) -> None:
        """Answer and ack every in-flight packet whose steps have all run (in bus order)."""
        applied = 0
        for entry_id in list(self.in_flight):
            taken = self.batcher.take(entry_id)
            if taken is None:
                continue
            entry = self.in_flight.pop(entry_id)
            steps, poisoned = taken
            sequence = self.batcher.take_sequence(entry_id)
            if poisoned is not None:
                self._refuse(out, entry, 500, poisoned)
                continue
            if entry.kind == messages.LABEL:
                reply = messages.ok_reply(sequence=sequence)
            else:
                reply = messages.ok_reply(steps=steps, **({} if sequence is None else {"sequence": sequence}))
            out.replies.append((entry.id, reply))
            out.acks.append(entry.id)
            applied += 1
        if applied:
            self.metrics.packets.labels(outcome="applied").inc(applied)

    def _flag_busy(self, out: Applied) -> None:
        """Raise a stream's busy flag over ``max_stream_backlog_frames`` queued frames, clear it below half.

        The API answers 429 to a busy stream's packets before publishing them, so one fast stream
        cannot fill the bus (whose lag limit every stream shares) nor queue unbounded frames here.
        """
        limit = self.settings.max_stream_backlog_frames
        pace = self.batcher.pace.rate_per_s
        frame_s = max(self.batcher.step_s_average, 1.0 / pace if pace else 0.0)  # how fast a queue drains
        for slot in self.batcher.registry:
            queued = len(slot.pending)
            if queued > limit or (slot.stream_id in self.busy and queued > limit // 2):  # raise or refresh
                out.busy[slot.stream_id] = f"{max(0.1, (queued - limit // 2) * frame_s):.2f}".encode()
                self.busy.add(slot.stream_id)
            elif slot.stream_id in self.busy:
                out.busy[slot.stream_id] = None
                self.busy.discard(slot.stream_id)
        for stream_id in self.busy - {slot.stream_id for slot in self.batcher.registry}:
            out.busy[stream_id] = None
            self.busy.discard(stream_id)

    def already_applied(self, entry: BusEntry) -> bool:
        """At or below the watermark: applied before (by this worker or the checkpoint it restored)."""
        return self.watermark.covers(entry.id)

    def _apply_in_order(self, entries: list[BusEntry], housekeeping: bool, max_ticks: int | None) -> Applied:
        batcher, out = self.batcher, Applied()
        idle = not entries and not self.in_flight  # nobody waits: replays may run alone (learn_at=sequence)
        skipped: list[str] = []
        if self.held and not self.stopping:  # (lockstep) held entries come first, in bus order
            held_ids = {entry.id for entry in self.held}
            entries = [*self.held, *(entry for entry in entries if entry.id not in held_ids)]
            self.held = []
        for position, entry in enumerate(entries):
            if entry.id in self.in_flight:  # claimed again while its steps still wait: it is ours already
                continue
            if self.lockstep and entry.kind in messages.CONTROL_KINDS and batcher.has_work():
                self.held = entries[position:]  # its steps before it run in the ranks' ticks first
                break
            if self.already_applied(entry):
                out.replies.append((entry.id, messages.ok_reply(steps=[], skipped=True)))
                out.acks.append(entry.id)
                skipped.append(entry.id)
                continue
            if entry.deliveries > self.settings.max_deliveries:
                self._refuse(
                    out,
                    entry,
                    500,
                    f"entry delivered {entry.deliveries} times (a crash loop?); "
                    f"dead-lettered after max_deliveries={self.settings.max_deliveries}",
                )
                continue
            if entry.kind == messages.EVENTS:
                try:
                    packet = messages.EventsPacket.from_fields(entry.fields)
                    created = entry.stream_id not in batcher.registry
                    evicted = batcher.push_packet(entry.id, entry.stream_id, packet)
                except (EventError, StreamError, ValueError) as err:
                    self._refuse(out, entry, 409 if isinstance(err, StreamError) else 422, str(err))
                    continue
                except PacketFailed as err:
                    self._refuse(out, entry, 500, str(err))
                    continue
                if created:
                    out.values[messages.sensor_key(self.prefix, entry.stream_id)] = messages.encode_sensor(
                        packet.width, packet.height
                    )
                for slot in evicted:
                    out.values[messages.sensor_key(self.prefix, slot.stream_id)] = None
                    log.info("event=stream_evicted stream=%s", slot.stream_id)
                self.in_flight[entry.id] = entry
            elif entry.kind == messages.LABEL:
                try:
                    request = messages.LabelRequest.from_fields(entry.fields)
                    batcher.push_label(entry.id, entry.stream_id, request.label, request.sequence)
                except ValueError as err:
                    self._refuse(out, entry, 422, str(err))
                    continue
                except LabelRefused as err:  # answered (a client's mistake, not a poison entry); applied
                    out.replies.append((entry.id, messages.error_reply(err.status, err.detail)))
                    out.acks.append(entry.id)
                else:
                    self.in_flight[entry.id] = entry
            elif entry.kind in messages.CONTROL_KINDS:
                batcher.drain()  # bus order: everything before the control entry is applied first
                self._settle(out)
                out.replies.append((entry.id, self._control(entry, out)))
                out.acks.append(entry.id)
            else:
                self._refuse(out, entry, 400, f"unknown entry kind {entry.kind!r}")
                continue
            self.watermark.advance(entry.id)
            self.dirty = True
            self.due.count(entry.id, sum(len(value) for value in entry.fields.values()))
        if skipped:
            self.metrics.entries_skipped.inc(len(skipped))
            log.info(
                "event=entries_skipped count=%d first=%s last=%s watermark=%s reason=%r",
                len(skipped),
                skipped[0],
                skipped[-1],
                self.watermark.as_dict(),
                "at or below the watermark: applied before, by this worker or the checkpoint it restored",
            )
        if not self.lockstep:
            budget = IDLE_REPLAY_TICKS if idle and max_ticks is not None else max_ticks
            batcher.drain(budget, idle=idle, answer_early=self.settings.answer_before_learning)
        self._settle(out)
        self._refresh_learned(out)
        self._flag_busy(out)
        if housekeeping:
            self._housekeeping(out)
        return out

    def _refresh_learned(self, out: Applied) -> None:
        """A stream whose sequence was learned (a replay, learn_at=sequence) changed: its sensor value is
        re-set, which makes the round write the status snapshot (``GET /v1/streams/{id}``) too."""
        if self.batcher.sequences is None:
            return
        for stream_id in self.batcher.sequences.learned_streams:
            slot = self.batcher.registry.get(stream_id)
            if slot is not None:
                key = messages.sensor_key(self.prefix, stream_id)
                out.values.setdefault(key, messages.encode_sensor(slot.width, slot.height))
        self.batcher.sequences.learned_streams.clear()

    def _refuse(self, out: Applied, entry: BusEntry, status: int, detail: str) -> None:
        log.warning(
            "event=entry_refused id=%s kind=%s stream=%s status=%d error=%r",
            entry.id,
            entry.kind,
            entry.stream_id,
            status,
            detail,
        )
        out.dead.append((entry, detail))
        out.replies.append((entry.id, messages.error_reply(status, detail)))
        self.metrics.packets.labels(outcome="dead_lettered").inc()

    def _housekeeping(self, out: Applied) -> None:
        ttl_s = self.settings.stream_ttl_s
        if time.monotonic() - self._last_refresh_s >= messages.sensor_refresh_s(ttl_s):
            self._last_refresh_s = time.monotonic()  # live streams' sensor values must not lapse
            out.values = {**self.sensor_values(), **out.values}
        for slot in self.batcher.expire(ttl_s):
            out.values[messages.sensor_key(self.prefix, slot.stream_id)] = None
            log.info(
                "event=stream_expired stream=%s idle_s=%.0f", slot.stream_id, time.time() - slot.last_active_s
            )

    def _control(self, entry: BusEntry, out: Applied) -> bytes:
        batcher, kind, stream_id = self.batcher, entry.kind, entry.stream_id
        if self.in_cluster and kind in (messages.CHECKPOINT, messages.RESTORE):
            return messages.error_reply(
                409,
                f"{kind} by request is not served by a cluster of worker ranks yet: each rank checkpoints "
                "its own shards periodically and on shutdown (docs/scale-out.md)",
            )
        key = messages.sensor_key(self.prefix, stream_id)
        try:
            if kind == messages.OPEN:
                width, height = int(entry.fields["width"]), int(entry.fields["height"])
                slot, evicted = batcher.open(stream_id, width, height)
                out.values[key] = messages.encode_sensor(width, height)
                for gone in evicted:
                    out.values[messages.sensor_key(self.prefix, gone.stream_id)] = None
                return messages.ok_reply(stream=slot.info())
            if kind == messages.RESET:
                slot = batcher.registry.get(stream_id)
                if slot is None:
                    return messages.error_reply(404, f"stream {stream_id!r} is not live in the worker")
                batcher.reset_stream(slot)
                return messages.ok_reply()
            if kind == messages.DELETE:
                out.values[key] = None
                return messages.ok_reply(was_live=batcher.remove(stream_id) is not None)
            if kind == messages.CHECKPOINT:
                return messages.ok_reply(checkpoint=self.save())
            if kind == messages.RESTORE:
                return messages.ok_reply(checkpoint=self._restore(entry.fields["name"].decode(), out))
            if kind == messages.MODEL_RESET:
                batcher.reset_model(self.settings.seed)
                return messages.ok_reply(model=self.settings.model, model_version=batcher.learner.version)
            if kind == messages.MODEL_EXPORT:  # the weights as a NIR file (service.worker.model_export)
                return export_reply(batcher.learner.model, batcher.learner.version, entry.fields)
        except StreamError as err:
            return messages.error_reply(409, str(err))
        except CheckpointError as err:
            if "no checkpoint named" in str(err):
                return messages.error_reply(404, str(err))
            self.checkpoint_failed("restore" if kind == messages.RESTORE else "save", _named(entry), err)
            return messages.error_reply(422, str(err))
        except (KeyError, ValueError, UnicodeDecodeError) as err:
            return messages.error_reply(422, f"malformed {kind} entry: {err}")
        except Exception as err:  # disk full, read-only folder: this entry fails, and no other
            if kind not in (messages.CHECKPOINT, messages.RESTORE):
                raise
            self.checkpoint_failed("save" if kind == messages.CHECKPOINT else "restore", _named(entry), err)
            return messages.error_reply(500, f"{kind} failed: {reason(err)}")
        return messages.error_reply(400, f"unknown control {kind!r}")
