"""The worker's loop: consume -> apply (in a thread) -> send values, replies, dead letters -> ack.

One iteration::

    entries = claimed stale (periodically) + bus.read(consumer, COUNT, BLOCK)
    applied = await to_thread(applier.apply, entries)   # frame, batch, learn/predict (service.worker.applier)
    values (sensor sizes, status snapshot, heartbeat) -> dead letters -> replies -> ack
        meanwhile, in the thread: the learning the round's last tick deferred (answers before learning)

Every call that runs the model goes to a thread of the pool with the settings' float mode
(``NDOT_FLUSH_DENORMALS``: denormals flushed to zero, the default). A packet is acked only after all
its steps ran and its reply is out. One worker owns the model:
at start it restores the newest checkpoint (logged with its name; ``ndot worker --fresh`` starts
from fresh weights instead), re-applies the bus history after it (``service.worker.recovery``) and
from then on skips every entry at or below the newest id it applied, so each step is applied
exactly once across crashes. A packet whose framing or learner step keeps failing is retried
``max_failures`` times, then dead-lettered with its error (``service.worker.batcher``); its stream
and the others go on. SIGTERM: the batch in hand is finished, replied and acked, then a checkpoint
is written; when that fails (disk full, read-only folder) the worker logs one line
(``event=shutdown_checkpoint_failed``) and sets ``shutdown_error``, and ``ndot worker`` / ``ndot
serve`` exit 1 instead of 0.

As one rank of ``ndot workers`` (``cluster``: ``service.worker.cluster_member``) the worker owns the
shards ``s % W == r`` of the bus, restores the group's newest committed round, and ends every round in
one collective with the other ranks (tick clock, parameter averaging, stopping together, model reset,
the consistent cut): docs/scale-out.md. Under sync_mode grad (lockstep) that collective and the ranks'
ticks run between the apply and the send (``ClusterMember.end_round``): the packets they finish are
answered in the same round, and the last tick's update (an all-reduce) runs while the answers travel.

Bus failures (Redis unreachable, refusing writes: OOM, MISCONF, READONLY, ..., or an unexpected
error answer) never end the worker: ``start`` and the loop wait them out with back-off
(``service.worker.bus_retry``: one log line per kind of failure, ``ndot_bus_errors_total``). What a
batch produced but could not send (values, replies, dead letters, acks) is kept and sent first on
the next round, so an applied packet is still answered and acked once Redis takes writes again.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import os
import socket
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch

from service.bus import Bus, BusEntry, messages
from service.bus.base import Value
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker.applier import Applied, EntryApplier, reason
from service.worker.batcher import Batcher
from service.worker.bus_retry import RETRIED, BusRetry
from service.worker.cluster import RoundOutcome
from service.worker.cluster_checkpoints import round_infos
from service.worker.cluster_member import ClusterMember
from service.worker.recovery import recover

log = logging.getLogger("ndot.worker")

HOUSEKEEPING_INTERVAL_S = 1.0
#: A rank's longest wait for entries: every round ends in a collective, so a rank waiting for its own
#: shards holds up the others' next round (their packets) that long.
CLUSTER_READ_BLOCK_MS = 5


T = TypeVar("T")


def _in_float_mode(flush_denormals: bool, fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` with this thread's denormals flushed to zero or not (``torch.set_flush_denormal``)."""
    torch.set_flush_denormal(flush_denormals)
    return fn(*args)


class Worker:
    """One persistent SNN fed by the bus; see the module docstring."""

    def __init__(
        self,
        settings: Settings,
        bus: Bus,
        metrics: ServiceMetrics | None = None,
        consumer: str | None = None,
        cluster: ClusterMember | None = None,
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics or ServiceMetrics(settings.accuracy_window)
        self.cluster = cluster  # one rank of a torchrun group (service.worker.cluster_member), or None
        if cluster is not None:
            cluster.attach_metrics(self.metrics.registry)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.prefix = settings.bus_stream
        self.applier: EntryApplier | None = None  # built in start(), in a thread
        self.restored_from: str | None = None  # the checkpoint restored at start, if any
        self.shutdown_error: str | None = None  # why the checkpoint on the way out failed, if it did
        self._resync_values = False  # after a bus outage: publish every stream's sensor value again
        self._unsent: Applied | None = None  # what a batch produced that the bus has not taken yet
        self._bus_retry = BusRetry(self.metrics)
        self._last_claim_s = 0.0
        self._last_housekeeping_s = 0.0
        self._status_s = 0.0  # when this rank last wrote its status (cluster)
        #: Lockstep (sync_mode grad): the round's end, when ``run_once`` already took it (before its answers).
        self._round_outcome: RoundOutcome | None = None
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def batcher(self) -> Batcher:
        """The model and its streams (``EntryApplier.batcher``)."""
        return self.applier.batcher

    @property
    def checkpoints(self) -> list[dict[str, Any]]:
        return self.applier.checkpoints

    @property
    def last_entry_id(self) -> str | None:
        """The watermark: newest entry applied."""
        return self.applier.last_entry_id

    # --- lifecycle --------------------------------------------------------------------------------

    async def start(self) -> None:
        """Build the model (restoring the newest checkpoint) and announce the worker on the bus.

        While the bus is unreachable or refuses writes, retries with back-off until it answers or a
        stop is requested (then returns, without a model if it had none; ``run`` returns at once).
        The bus's group is created on the first read if nobody created it before.
        """
        applier_settings = self.settings
        if self.cluster is not None:  # meet the other ranks: this rank's shards, its checkpoint folder
            if not hasattr(self.bus, "own"):
                raise ValueError(
                    "worker ranks need the Redis bus (REDIS_URL): the embedded one is in-process"
                )
            owned, token = await asyncio.to_thread(self.cluster.join, self.bus.shards)
            self.bus.own(owned)
            await self.bus.claim_shards(token)  # acks fenced: a zombie of an older group is refused
            applier_settings = self.settings.model_copy(
                update={"checkpoint_dir": self.cluster.checkpoint_dir()}
            )

        # a checkpoint's watermark must not lie beyond the bus's newest id of a shard

        async def newest_ids() -> dict[int, str | None]:
            return {shard: await self.bus.newest_id(shard) for shard in self.bus.owned}

        opened, bus_newest = await self._bus_retry.call(newest_ids, self._stop, "start")
        if not opened:
            log.info("event=worker_stopped_before_start consumer=%s", self.consumer)
            return

        def build() -> EntryApplier:
            applier = EntryApplier(applier_settings, self.metrics, shards=self.bus.shards)
            applier.in_cluster = self.cluster is not None
            if self.cluster is not None:  # the group's committed rounds (service.worker.cluster_checkpoints)
                if self.settings.restore_on_start:
                    self.restored_from = self.cluster.restore(applier, bus_newest)
                applier.checkpoints = round_infos(self.cluster.checkpoint_dir())
                return applier
            if self.settings.restore_on_start:
                self.restored_from = applier.restore_newest(bus_newest)
            applier.checkpoints = [i.as_dict() for i in applier.store.list()]
            return applier

        self.applier = await self._in_model_thread(build)
        if self.cluster is not None:
            await self._in_model_thread(self.cluster.align, self.batcher)  # rank 0's weights on every rank
            self.applier.lockstep = self.cluster.gradients is not None  # sync_mode grad: ticks in lockstep
        self.metrics.model_version.set(self.batcher.learner.version)
        announce = Applied(values=self.applier.sensor_values())
        values = self._round_values(announce, changed=True)
        await self._bus_retry.call(
            lambda: self.bus.send_round(values, [], self.settings.reply_ttl_s, []), self._stop, "start"
        )
        if self.restored_from is not None:
            start = f"continuing from checkpoint {self.restored_from}"
            fresh = "to start fresh: --fresh (NDOT_RESTORE_ON_START=false) or another NDOT_CHECKPOINT_DIR"
        else:
            start, fresh = "fresh model", ""
        log.info(
            "event=worker_started consumer=%s model=%s device=%s streams=%d start=%r checkpoint_dir=%s %s",
            self.consumer,
            self.settings.model,
            self.batcher.learner.device,
            len(self.batcher.registry),
            start,
            self.settings.checkpoint_dir,
            f"hint={fresh!r}" if fresh else "",
        )

    def request_stop(self) -> None:
        self._stop.set()

    def run_in_background(self) -> None:
        self._task = asyncio.create_task(self.run(), name="ndot-worker")
        self._task.add_done_callback(self._report_crash)

    @staticmethod
    def _report_crash(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:  # /readyz turns 503 as the heartbeat ages
            log.error("event=worker_crashed error=%r", str(task.exception()), exc_info=task.exception())

    async def stop(self) -> None:
        """Stop the loop (it finishes the entries in hand and writes a last checkpoint)."""
        self._stop.set()
        if self._task is not None:
            with contextlib.suppress(Exception):  # a crash was logged when it happened
                await self._task

    async def run(self) -> None:
        """Loop until stopped; first recovers what a previous incarnation applied or left pending.

        Bus failures are waited out with back-off (``BusRetry``); they never end the loop.
        """
        if self.applier is None:  # stopped while start waited for the bus
            return
        recovered = False
        while self.cluster is not None or not self._stop.is_set():
            try:
                if not recovered:
                    await self.recover()
                    recovered = True
                await self.run_once()
            except RETRIED as err:  # unreachable, refusing writes, or an unexpected error answer
                delay = self._bus_retry.failed(err, "run")
                self._resync_values = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
            else:
                self._bus_retry.recovered("run")
            if self.cluster is not None:  # every rank ends every round together (and stops together)
                outcome, self._round_outcome = self._round_outcome, None  # (lockstep: taken in run_once)
                if outcome is None:
                    outcome = await self._in_model_thread(
                        self.cluster.after_round, self.applier, self._stop.is_set()
                    )
                if outcome.stop:
                    self._stop.set()
                    break
        # packets taken off the bus are finished, answered and acked (with what the bus had refused)
        if self.applier.has_work or self._unsent is not None:
            self.applier.stopping = True  # (lockstep: what is held waits for the next group, after the cut)
            with contextlib.suppress(*RETRIED):  # unacked, they are replayed by the next worker
                await self._handle([], drain=True)
        if self.cluster is not None:  # the stop round was a cut: every rank saved, rank 0 committed
            self.shutdown_error = self.cluster.cut_error
            if self.shutdown_error:
                log.error("event=shutdown_checkpoint_failed error=%r", self.shutdown_error)
            else:
                log.info("event=shutdown_checkpoint name=%s", self.cluster.committed)
        elif self.applier.dirty:
            try:
                info = await self._in_model_thread(self.applier.save)
            except Exception as err:  # one clear line and a non-zero exit, not a traceback
                self.shutdown_error = reason(err)
                self.metrics.checkpoint_errors.labels(stage="shutdown").inc()
                log.error(
                    "event=shutdown_checkpoint_failed error=%r lost=%r",
                    self.shutdown_error,
                    "the model's changes since the last checkpoint: a restarted worker replays them from "
                    "the bus history (Redis), or starts without them (embedded bus)",
                )
            else:
                log.info("event=shutdown_checkpoint name=%s", info["name"])
        with contextlib.suppress(*RETRIED):  # readiness drops at once, not a heartbeat timeout later
            await self.bus.delete_value(messages.heartbeat_key(self.prefix))
        log.info("event=worker_stopped consumer=%s", self.consumer)

    async def run_once(self, block_ms: int | None = None) -> int:
        """Read and apply one batch of entries; returns how many were handled."""
        now = time.monotonic()
        if now - self._last_claim_s >= self.settings.claim_interval_s:
            await self._claim_and_apply(self.settings.claim_idle_ms)
        block = self.settings.read_block_ms if block_ms is None else block_ms
        if self.applier.has_work:  # queued steps wait: look for new entries, wait only for their pace
            block = min(block, math.ceil(self.applier.wait_s() * 1000))
        if self.cluster is not None:  # the other ranks wait for this round's end: never for long
            block = min(block, CLUSTER_READ_BLOCK_MS)
        entries = await self.bus.read(self.consumer, self.settings.read_count, block)
        await self._handle(entries, end_round=self.cluster is not None and self.applier.lockstep)
        return len(entries)

    async def _in_model_thread(self, fn: Callable[..., T], *args: Any) -> T:
        """``fn(*args)`` in a worker thread (``asyncio.to_thread``) whose float mode is the settings':
        denormals flushed to zero or not (``flush_denormals``). The mode is the thread's own (the CPU's
        control register), so it is set on every call: the pool's threads take turns."""
        return await asyncio.to_thread(_in_float_mode, self.settings.flush_denormals, fn, *args)

    async def recover(self) -> int:
        """Re-apply the bus history after the restored checkpoint (see ``service.worker.recovery``)."""
        if not self.settings.restore_on_start:  # a fresh model: what came before is not its history
            await self._claim_and_apply(min_idle_ms=0)
            return 0
        return await recover(
            self.bus,
            self.consumer,
            lambda: self.applier.watermark,
            lambda entries: self._handle(entries, drain=True),  # replayed history: no pace, no budget
            self.settings.read_count,
        )

    async def _claim_and_apply(self, min_idle_ms: int) -> None:
        self._last_claim_s = time.monotonic()
        while claimed := await self.bus.claim_stale(self.consumer, min_idle_ms, self.settings.read_count):
            log.info("event=claimed_stale entries=%d", len(claimed))
            await self._handle(claimed)

    async def _handle(self, entries: list[BusEntry], drain: bool = False, end_round: bool = False) -> None:
        """Apply ``entries`` and send what that produced; ``end_round`` (lockstep): the round's collective and
        the ranks' ticks run between the two, so the packets those ticks finish are answered this round."""
        now = time.monotonic()
        housekeeping = now - self._last_housekeeping_s >= HOUSEKEEPING_INTERVAL_S
        if end_round:
            stopping = self._stop.is_set()
            applied, self._round_outcome = await self._in_model_thread(
                self.cluster.end_round, self.applier, entries, housekeeping, stopping
            )
        elif entries or housekeeping or self.applier.has_work or drain:
            applied = await self._in_model_thread(self.applier.apply, entries, housekeeping, drain)
        else:
            applied = Applied()
        # What the bus has not taken goes out first; until all of it is out it stays in self._unsent
        # (a bus failure below leaves it there for the next round: nothing applied goes unanswered).
        changed = bool(entries or applied.values or applied.replies) or self._resync_values
        if self._unsent is not None:
            applied, changed = _merged(self._unsent, applied), True
        self._unsent = applied
        learning = None
        try:
            if housekeeping:
                self._last_housekeeping_s = now
                self.metrics.bus_lag.set(await self.bus.lag())
                streams = [slot.stream_id for slot in self.batcher.registry]
                await self.batcher.live.refresh_watched(self.bus, self.prefix, streams)  # viewing flags
                device = self.batcher.learner.device
                if device.type == "cuda":
                    self.metrics.device_memory_bytes.set(torch.cuda.memory_allocated(device))
            if self._resync_values:
                applied.values = {**self.applier.sensor_values(), **applied.values}
            values = self._round_values(applied, changed)
            # answers before learning: the learning the round's last tick deferred runs in the thread while
            # the answers travel, and is over before anything else touches the model (the next round)
            learning = self._learn_beside_answers(end_round)
            while applied.dead:  # (rare) before the round's answers: a dead letter is on file when its 500 is
                await self.bus.dead_letter(*applied.dead[0])
                applied.dead.pop(0)
            await self.bus.send_round(values, applied.replies, self.settings.reply_ttl_s, applied.acks)
        finally:
            # (a bus failure before the answers: the ranks' update runs now, before anything else)
            if learning is None and end_round:
                learning = self._learn_beside_answers(end_round)
            if learning is not None:
                await learning
        self._resync_values = False
        self._unsent = None
        self.metrics.worker_heartbeat.set(time.time())

    def _learn_beside_answers(self, end_round: bool) -> asyncio.Future[Any] | None:
        """The learning deferred past the round's answers, started in a thread: under lockstep (``end_round``)
        the last tick's update with the other ranks (``ClusterMember.finish_tick``: every rank, every round
        that deferred one), else what the batcher's ticks owe (``learn_deferred``); ``None`` when nothing waits."""
        if end_round:
            if not self.cluster.tick_deferred:
                return None
            return asyncio.ensure_future(self._in_model_thread(self.cluster.finish_tick, self.applier))
        if self.batcher.learning_deferred:
            return asyncio.ensure_future(self._in_model_thread(self.applier.learn_deferred))
        return None

    def _round_values(self, applied: Applied, changed: bool) -> list[Value]:
        """The round's value writes, before its replies (a client that got its reply sees them): sensor
        sizes (``None`` = the stream closed), busy flags, the status snapshot when anything changed and
        the heartbeat."""
        sensor_ttl_s = messages.sensor_ttl_s(self.settings.stream_ttl_s)
        values: list[Value] = [(key, value, sensor_ttl_s) for key, value in applied.values.items()]
        values += [
            (messages.busy_key(self.prefix, stream_id), flag, messages.BUSY_TTL_S)
            for stream_id, flag in applied.busy.items()
        ]
        if changed and self.cluster is None:
            values.append((messages.status_key(self.prefix), self.status_json(), None))
        elif self.cluster is not None and (changed or time.monotonic() - self._status_s >= 1.0):
            # each rank its own snapshot (its tick clock moves every round: at most once a second
            # when nothing else changed); rank 0 says what the cluster is
            self._status_s = time.monotonic()
            values.append(
                (messages.rank_status_key(self.prefix, self.cluster.rank), self.status_json(), None)
            )
            if self.cluster.rank == 0:
                values.append((messages.cluster_key(self.prefix), self.cluster.cluster_json(), None))
        heartbeat_ttl_s = max(60.0, 10 * self.settings.heartbeat_timeout_s)
        values.append((messages.heartbeat_key(self.prefix), repr(time.time()).encode(), heartbeat_ttl_s))
        values += self.batcher.live.due_values(self.prefix)  # live views, <= 10/s per watched stream
        return values

    def status_json(self) -> bytes:
        batcher = self.batcher
        status = {
            "time": time.time(),
            "consumer": self.consumer,
            "model": self.settings.model,
            "model_version": batcher.learner.version,
            "device": str(batcher.learner.device),
            "streams": batcher.registry.infos(),
            "checkpoints": self.checkpoints,
            "watermark": self.applier.watermark.as_dict(),
        }
        if self.cluster is not None:
            status["cluster"] = self.cluster.status()
        return json.dumps(status).encode()


def _merged(older: Applied, newer: Applied) -> Applied:
    """What two batches have to send, in order: lists queue up (older first), newer values and flags win."""
    merged = {}
    for name in (f.name for f in dataclasses.fields(Applied)):
        old, new = getattr(older, name), getattr(newer, name)
        merged[name] = {**old, **new} if isinstance(old, dict) else old + new
    return Applied(**merged)
