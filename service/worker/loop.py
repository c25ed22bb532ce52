"""The worker: consume -> frame -> batch -> learn/predict -> reply -> ack, plus checkpoints.

One loop iteration::

    entries = claimed stale (periodically) + bus.read(consumer, COUNT, BLOCK)
    in a thread: for each entry in bus order
        events  -> frames onto its stream's queue (batcher.push_packet)
        control -> drain queued steps, then apply (open, reset, delete, checkpoint, restore, model_reset)
      drain (batched ticks until no frame is ready); periodic checkpoint when due
    values (sensor sizes, status snapshot, heartbeat) -> replies -> ack

A packet is acked only after all its steps ran and its reply is out. One worker owns the model:
at start it restores the newest checkpoint, re-applies the bus history after it
(``service.worker.recovery``) and from then on skips every entry at or below the newest id it applied,
so each step is applied exactly once across crashes. A packet whose framing or learner step keeps
failing is retried ``max_failures`` times, then dead-lettered with its error (``service.worker.batcher``);
its stream and the others go on. SIGTERM: the batch in hand is finished, replied and acked, then a
checkpoint is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ndot_core import OnlineLearner, build_model
from ndot_core.events.layout import EventError
from service.bus import Bus, BusEntry, BusUnavailable, entry_id_key, messages
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker.batcher import Batcher, PacketFailed
from service.worker.checkpoints import CheckpointError, CheckpointStore
from service.worker.recovery import recover
from service.worker.streams import StreamError

log = logging.getLogger("ndot.worker")

HOUSEKEEPING_INTERVAL_S = 1.0


@dataclass
class Applied:
    """What one batch of entries produced, for the async side to send."""

    replies: list[tuple[str, bytes]] = field(default_factory=list)
    values: dict[str, bytes] = field(default_factory=dict)
    dead: list[tuple[BusEntry, str]] = field(default_factory=list)
    acks: list[str] = field(default_factory=list)


class Worker:
    """One persistent SNN fed by the bus; see the module docstring."""

    def __init__(
        self, settings: Settings, bus: Bus, metrics: ServiceMetrics | None = None, consumer: str | None = None
    ) -> None:
        self.settings = settings
        self.bus = bus
        self.metrics = metrics or ServiceMetrics(settings.accuracy_window)
        self.consumer = consumer or f"{socket.gethostname()}-{os.getpid()}"
        self.store = CheckpointStore(settings.checkpoint_dir)
        self.prefix = settings.bus_stream
        self.batcher: Batcher | None = None
        self.last_entry_id: str | None = (
            None  # the watermark: newest entry applied (entries come in id order)
        )
        self.checkpoints: list[dict[str, Any]] = []
        self._dirty = False
        self._applied_since_save = 0
        self._resync_values = False  # after a bus outage: publish every stream's sensor value again
        self._last_save_s = time.monotonic()
        self._last_claim_s = 0.0
        self._last_housekeeping_s = 0.0
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- lifecycle --------------------------------------------------------------------------------

    def _model_descriptor(self) -> dict[str, Any]:
        s = self.settings
        return {
            "name": s.model,
            "num_classes": s.num_classes,
            "in_channels": s.in_channels,
            "input_size": list(s.input_size),
        }

    def _build(self) -> Batcher:
        s = self.settings
        if s.torch_threads:
            torch.set_num_threads(s.torch_threads)
        torch.manual_seed(s.seed)
        model = build_model(
            s.model, in_channels=s.in_channels, num_classes=s.num_classes, input_size=s.input_size
        )
        learner = OnlineLearner(
            model,
            rule=s.rule,
            mode=s.mode,
            optimizer=s.optimizer,
            lr=s.lr,
            momentum=s.momentum,
            alpha=s.alpha,
            steps_per_sample=s.steps_per_sample,
            device=s.torch_device(),
        )
        return Batcher(
            learner,
            s.max_streams,
            s.window_us,
            self.metrics,
            s.max_events_per_packet,
            max_failures=s.max_failures,
            max_sensor_size=s.max_sensor_size,
        )

    def _restore_newest(self) -> None:
        """Load the newest readable checkpoint (falling back to older ones), if any."""
        for info in reversed(self.store.list()):
            try:
                tree = self._load(info.name)
            except CheckpointError as err:
                log.warning("event=checkpoint_refused name=%s error=%r", info.name, str(err))
                continue
            self.last_entry_id = tree.get("last_entry_id")
            log.info(
                "event=checkpoint_restored name=%s model_version=%d streams=%d",
                info.name,
                info.model_version,
                len(self.batcher.registry),
            )
            return

    async def start(self) -> None:
        """Build the model (restoring the newest checkpoint) and announce the worker on the bus."""

        def build() -> None:
            self.batcher = self._build()
            if self.settings.restore_on_start:
                self._restore_newest()
            self.checkpoints = [i.as_dict() for i in self.store.list()]

        await asyncio.to_thread(build)
        self.metrics.model_version.set(self.batcher.learner.version)
        await self._publish_state(Applied(values=self._sensor_values()))
        log.info(
            "event=worker_started consumer=%s model=%s device=%s streams=%d",
            self.consumer,
            self.settings.model,
            self.batcher.learner.device,
            len(self.batcher.registry),
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
        """Loop until stopped; first recovers what a previous incarnation applied or left pending."""
        recovered = False
        while not self._stop.is_set():
            try:
                if not recovered:
                    await self.recover()
                    recovered = True
                await self.run_once()
            except BusUnavailable as err:
                log.warning("event=bus_unavailable error=%r", str(err))
                self._resync_values = True
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), 1.0)
        if self._dirty:
            info = await asyncio.to_thread(self._save)
            log.info("event=shutdown_checkpoint name=%s", info["name"])
        with contextlib.suppress(BusUnavailable):  # readiness drops at once, not a heartbeat timeout later
            await self.bus.set_value(messages.heartbeat_key(self.prefix), b"")
        log.info("event=worker_stopped consumer=%s", self.consumer)

    async def run_once(self, block_ms: int | None = None) -> int:
        """Read and apply one batch of entries; returns how many were handled."""
        now = time.monotonic()
        if now - self._last_claim_s >= self.settings.claim_interval_s:
            await self._claim_and_apply(self.settings.claim_idle_ms)
        block = self.settings.read_block_ms if block_ms is None else block_ms
        entries = await self.bus.read(self.consumer, self.settings.read_count, block)
        await self._handle(entries)
        return len(entries)

    async def recover(self) -> int:
        """Re-apply the bus history after the restored checkpoint (see ``service.worker.recovery``)."""
        if not self.settings.restore_on_start:  # a fresh model: what came before is not its history
            await self._claim_and_apply(min_idle_ms=0)
            return 0
        return await recover(
            self.bus, self.consumer, lambda: self.last_entry_id, self._handle, self.settings.read_count
        )

    async def _claim_and_apply(self, min_idle_ms: int) -> None:
        self._last_claim_s = time.monotonic()
        while claimed := await self.bus.claim_stale(self.consumer, min_idle_ms, self.settings.read_count):
            log.info("event=claimed_stale entries=%d", len(claimed))
            await self._handle(claimed)

    async def _handle(self, entries: list[BusEntry]) -> None:
        now = time.monotonic()
        housekeeping = now - self._last_housekeeping_s >= HOUSEKEEPING_INTERVAL_S
        if entries or housekeeping:
            applied = await asyncio.to_thread(self._apply_safely, entries, housekeeping)
        else:
            applied = Applied()
        if housekeeping:
            self._last_housekeeping_s = now
            self.metrics.bus_lag.set(await self.bus.lag())
            if self.batcher.learner.device.type == "cuda":
                self.metrics.device_memory_bytes.set(torch.cuda.memory_allocated(self.batcher.learner.device))
        if self._resync_values:
            applied.values = {**self._sensor_values(), **applied.values}
        await self._publish_state(applied, changed=bool(entries) or bool(applied.values))
        self._resync_values = False
        for entry, error in applied.dead:
            await self.bus.dead_letter(entry, error)
        for entry_id, payload in applied.replies:
            await self.bus.put_reply(entry_id, payload, self.settings.reply_ttl_s)
        if applied.acks:
            await self.bus.ack(applied.acks)

    async def _publish_state(self, applied: Applied, changed: bool = True) -> None:
        """Sensor values and the status snapshot (before replies: a client that got its reply sees them)."""
        for key, value in applied.values.items():
            await self.bus.set_value(key, value)
        if changed:
            await self.bus.set_value(messages.status_key(self.prefix), self.status_json())
        await self.bus.set_value(
            messages.heartbeat_key(self.prefix),
            repr(time.time()).encode(),
            ttl_s=max(60.0, 10 * self.settings.heartbeat_timeout_s),
        )

    def _sensor_values(self) -> dict[str, bytes]:
        """The sensor value of every live stream (what the API checks packets against)."""
        return {
            messages.sensor_key(self.prefix, s.stream_id): messages.encode_sensor(s.width, s.height)
            for s in self.batcher.registry
        }

    def status_json(self) -> bytes:
        batcher = self.batcher
        return json.dumps(
            {
                "time": time.time(),
                "consumer": self.consumer,
                "model": self.settings.model,
                "model_version": batcher.learner.version,
                "device": str(batcher.learner.device),
                "streams": batcher.registry.infos(),
                "checkpoints": self.checkpoints,
            }
        ).encode()

    # --- applying entries (runs in a thread) ------------------------------------------------------

    def _apply_safely(self, entries: list[BusEntry], housekeeping: bool) -> Applied:
        try:
            return self._apply(entries, housekeeping)
        except Exception as err:  # a bug outside a packet's framing / step (those the batcher confines)
            log.exception("event=batch_failed entries=%d", len(entries))
            for slot in self.batcher.registry:
                slot.pending.clear()
            self.batcher.results.clear()
            self.metrics.packets.labels(outcome="failed").inc(len(entries))
            detail = f"worker failed on this batch: {type(err).__name__}: {err}"
            return Applied(
                replies=[(e.id, messages.error_reply(500, detail)) for e in entries],
                dead=[(e, detail) for e in entries],
            )

    def _already_applied(self, entry: BusEntry) -> bool:
        """At or below the watermark: applied before (by this worker or the checkpoint it restored)."""
        return self.last_entry_id is not None and entry_id_key(entry.id) <= entry_id_key(self.last_entry_id)

    def _apply(self, entries: list[BusEntry], housekeeping: bool) -> Applied:
        batcher, out = self.batcher, Applied()
        packets: list[BusEntry] = []
        for entry in entries:
            if self._already_applied(entry):
                out.replies.append((entry.id, messages.ok_reply(steps=[], skipped=True)))
                out.acks.append(entry.id)
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
                    out.values[messages.sensor_key(self.prefix, slot.stream_id)] = b""
                    log.info("event=stream_evicted stream=%s", slot.stream_id)
                packets.append(entry)
            elif entry.kind in messages.CONTROL_KINDS:
                batcher.drain()  # bus order: everything before the control entry is applied first
                out.replies.append((entry.id, self._control(entry, out)))
                out.acks.append(entry.id)
            else:
                self._refuse(out, entry, 400, f"unknown entry kind {entry.kind!r}")
                continue
            self.last_entry_id = entry.id
            self._dirty = True
            self._applied_since_save += 1
        batcher.drain()
        applied = 0
        for entry in packets:
            poisoned = batcher.poisoned.pop(entry.id, None)
            if poisoned is not None:
                self._refuse(out, entry, 500, poisoned)
                continue
            out.replies.append((entry.id, messages.ok_reply(steps=batcher.results.pop(entry.id, []))))
            out.acks.append(entry.id)
            applied += 1
        self.metrics.packets.labels(outcome="applied").inc(applied)
        if housekeeping:
            self._housekeeping(out)
        self._checkpoint_if_due()
        return out

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
        for slot in self.batcher.expire(self.settings.stream_ttl_s):
            out.values[messages.sensor_key(self.prefix, slot.stream_id)] = b""
            log.info(
                "event=stream_expired stream=%s idle_s=%.0f", slot.stream_id, time.time() - slot.last_active_s
            )

    def _checkpoint_if_due(self) -> None:
        """Periodic checkpoint: every ``checkpoint_interval_s`` or ``checkpoint_max_entries`` applied entries."""
        s = self.settings
        by_time = (
            s.checkpoint_interval_s > 0 and time.monotonic() - self._last_save_s >= s.checkpoint_interval_s
        )
        by_count = 0 < s.checkpoint_max_entries <= self._applied_since_save
        if self._dirty and (by_time or by_count):
            try:
                info = self._save()
            except (
                OSError,
                CheckpointError,
            ) as err:  # a full disk must not stop the stream; retried when due
                self._last_save_s = time.monotonic()
                log.error("event=checkpoint_failed error=%r", str(err))
                return
            log.info("event=periodic_checkpoint name=%s entries=%d", info["name"], self._applied_since_save)

    def _control(self, entry: BusEntry, out: Applied) -> bytes:
        batcher, kind, stream_id = self.batcher, entry.kind, entry.stream_id
        key = messages.sensor_key(self.prefix, stream_id)
        try:
            if kind == messages.OPEN:
                width, height = int(entry.fields["width"]), int(entry.fields["height"])
                slot, evicted = batcher.open(stream_id, width, height)
                out.values[key] = messages.encode_sensor(width, height)
                for gone in evicted:
                    out.values[messages.sensor_key(self.prefix, gone.stream_id)] = b""
                return messages.ok_reply(stream=slot.info())
            if kind == messages.RESET:
                slot = batcher.registry.get(stream_id)
                if slot is None:
                    return messages.error_reply(404, f"stream {stream_id!r} is not live in the worker")
                batcher.reset_stream(slot)
                return messages.ok_reply()
            if kind == messages.DELETE:
                out.values[key] = b""
                return messages.ok_reply(was_live=batcher.remove(stream_id) is not None)
            if kind == messages.CHECKPOINT:
                return messages.ok_reply(checkpoint=self._save())
            if kind == messages.RESTORE:
                return messages.ok_reply(checkpoint=self._restore(entry.fields["name"].decode(), out))
            if kind == messages.MODEL_RESET:
                batcher.reset_model(self.settings.seed)
                return messages.ok_reply(model=self.settings.model, model_version=batcher.learner.version)
        except StreamError as err:
            return messages.error_reply(409, str(err))
        except CheckpointError as err:
            return messages.error_reply(404 if "no checkpoint named" in str(err) else 422, str(err))
        except OSError as err:
            return messages.error_reply(500, f"checkpoint folder unusable: {err}")
        except (KeyError, ValueError, UnicodeDecodeError) as err:
            return messages.error_reply(422, f"malformed {kind} entry: {err}")
        return messages.error_reply(400, f"unknown control {kind!r}")

    # --- checkpoints (run in a thread) ------------------------------------------------------------

    def _save(self) -> dict[str, Any]:
        tree = self.batcher.snapshot()
        tree["model"] = self._model_descriptor()
        tree["last_entry_id"] = self.last_entry_id
        info = self.store.save(tree)
        self.store.prune(self.settings.checkpoint_keep)
        self.checkpoints = [i.as_dict() for i in self.store.list()]
        self._dirty = False
        self._applied_since_save = 0
        self._last_save_s = time.monotonic()
        return info.as_dict()

    def _load(self, name: str) -> dict[str, Any]:
        """Read, check and swap in checkpoint ``name``; ``CheckpointError`` leaves the model untouched."""
        tree = self.store.load(name)
        if tree.get("model") != self._model_descriptor():
            raise CheckpointError(
                f"checkpoint {name!r} is for model {tree.get('model')}, "
                f"the worker runs {self._model_descriptor()}"
            )
        self.batcher.load(tree)
        return tree

    def _restore(self, name: str, out: Applied) -> dict[str, Any]:
        before = {slot.stream_id for slot in self.batcher.registry}
        self._load(name)
        for slot in self.batcher.registry:
            out.values[messages.sensor_key(self.prefix, slot.stream_id)] = messages.encode_sensor(
                slot.width, slot.height
            )
            before.discard(slot.stream_id)
        for stream_id in before:
            out.values[messages.sensor_key(self.prefix, stream_id)] = b""
        self._dirty = False
        log.info("event=checkpoint_restored name=%s model_version=%d", name, self.batcher.learner.version)
        return self.store.info(name).as_dict()
