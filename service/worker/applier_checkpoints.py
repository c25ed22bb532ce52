"""The applier's checkpoints: saving, the periodic trigger, restoring, and the watermark a restore adopts.

A mixin of ``EntryApplier`` (``service.worker.applier``): the same object, its checkpoint half. A
checkpoint is the batcher's snapshot (learner, streams, state rows; queues drained first), the model
descriptor and the watermark (``last_entry_id`` on an unsharded bus, ``shards`` and ``watermark`` per
shard otherwise). A restore checks the file whole (digest) and field by field (``checkpoint_tree``)
before anything is swapped in, and drops any shard mark the bus cannot back.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from service.bus import messages
from service.bus.shards import Watermark
from service.worker.checkpoint_tree import beyond, tree_watermark, validate_tree
from service.worker.checkpoints import CheckpointError
from service.worker.model import model_descriptor

if TYPE_CHECKING:
    from service.metrics import ServiceMetrics
    from service.settings import Settings
    from service.worker.applier import Applied
    from service.worker.batcher import Batcher
    from service.worker.checkpoint_due import CheckpointDue
    from service.worker.checkpoints import CheckpointStore

log = logging.getLogger("ndot.worker")


class CheckpointSide:
    """``EntryApplier``'s checkpoint methods (see the module docstring)."""

    settings: Settings
    metrics: ServiceMetrics
    prefix: str
    store: CheckpointStore
    batcher: Batcher
    watermark: Watermark
    shards: int
    in_cluster: bool
    checkpoints: list[dict[str, Any]]
    dirty: bool
    due: CheckpointDue

    @property
    def last_entry_id(self) -> str | None:
        """The watermark of an unsharded bus: the newest entry applied (None on a sharded bus)."""
        return self.watermark.get(0) if self.shards == 1 else None

    def checkpoint_failed(self, stage: str, name: str, error: BaseException) -> None:
        """Log and count a checkpoint file or write that failed (``ndot_checkpoint_errors_total{stage}``)."""
        self.metrics.checkpoint_errors.labels(stage=stage).inc()
        log.error("event=checkpoint_error stage=%s name=%s error=%r", stage, name, str(error))

    def adopt_watermark(self, tree: dict[str, Any], bus_newest: dict[int, str | None], name: str) -> None:
        """Take a restored tree's watermark, but no mark the bus cannot back (see ``restore_newest``)."""
        watermark, shards = tree_watermark(tree)
        if shards != self.shards:
            log.warning(
                "event=watermark_dropped name=%s checkpoint_shards=%d bus_shards=%d action=%r",
                name,
                shards,
                self.shards,
                "the checkpoint's ids name shards of another layout: every entry the bus holds is applied",
            )
            watermark = Watermark()
        for shard, newest in bus_newest.items():
            mark = watermark.get(shard)
            if mark is not None and beyond(mark, newest):
                log.warning(
                    "event=watermark_beyond_bus name=%s shard=%d watermark=%s bus_newest=%s action=%r",
                    name,
                    shard,
                    mark,
                    newest,
                    "the bus never handed out this id, so it does not hold the checkpoint's history: "
                    "every entry it holds is applied",
                )
                watermark.drop(shard)
        self.watermark = watermark

    def restore_newest(self, bus_newest: dict[int, str | None]) -> str | None:
        """Load the newest usable checkpoint (skipping, logging and counting bad ones); its name, or None.

        ``bus_newest``: the bus's newest id of each shard this worker owns. A shard's watermark beyond
        it names entries this bus never had (a new or emptied bus, another one, a clock stepped back):
        the weights are kept, that mark dropped, so no entry of this bus is skipped as applied before.
        A checkpoint of another shard count keeps no mark at all (its ids name other shards).
        """
        for info in reversed(self.store.list()):
            try:
                tree = self._load(info.name)
            except CheckpointError as err:
                self.checkpoint_failed("restore", info.name, err)
                continue
            self.adopt_watermark(tree, bus_newest, info.name)
            log.info(
                "event=checkpoint_restored name=%s model_version=%d streams=%d",
                info.name,
                info.model_version,
                len(self.batcher.registry),
            )
            return info.name
        return None

    def _checkpoint_if_due(self) -> None:
        """Periodic checkpoint when ``self.due`` says so (``service.worker.checkpoint_due``: by time, or
        before the bus may trim applied history of a shard; a restart's replay must find everything
        after it). Ranks of a cluster checkpoint together instead (``service.worker.cluster_member``)."""
        if not self.dirty or self.in_cluster or not self.due.due():
            return
        applied = self.due.applied
        try:
            info = self.save()
        except Exception as err:  # a full disk must not stop the stream; retried when due
            self.due.failed()
            self.checkpoint_failed("save", "periodic", err)
            return
        log.info("event=periodic_checkpoint name=%s entries=%d", info["name"], applied)

    def checkpoint_tree(self) -> dict[str, Any]:
        """What a checkpoint holds now (the queues drained first): model, streams, the watermark."""
        tree = self.batcher.snapshot()
        tree["model"] = model_descriptor(self.settings)
        tree["last_entry_id"] = self.last_entry_id  # the watermark of an unsharded bus, as always
        if self.shards > 1:
            tree["shards"] = self.shards
            tree["watermark"] = self.watermark.as_dict()
        return tree

    def save(self) -> dict[str, Any]:
        info = self.store.save(self.checkpoint_tree())
        self.store.prune(self.settings.checkpoint_keep)
        self.checkpoints = [i.as_dict() for i in self.store.list()]
        self.saved()
        return info.as_dict()

    def saved(self) -> None:
        """Everything applied so far is in a checkpoint (here, or in a cluster's committed round)."""
        self.dirty = False
        self.due.saved()

    def _load(self, name: str) -> dict[str, Any]:
        """Read, check and swap in checkpoint ``name``; ``CheckpointError`` leaves the model untouched."""
        return self.load_tree(self.store.load(name), name)

    def load_tree(self, tree: dict[str, Any], name: str) -> dict[str, Any]:
        """Check and swap in a checkpoint's tree; ``CheckpointError`` leaves the model untouched."""
        if tree.get("model") != model_descriptor(self.settings):
            raise CheckpointError(
                f"checkpoint {name!r} is for model {tree.get('model')}, "
                f"the worker runs {model_descriptor(self.settings)}"
            )
        validate_tree(tree, self.batcher.learner, self.settings.num_classes)
        try:
            self.batcher.load(tree)
        except CheckpointError:
            raise
        except Exception as err:  # whatever the file holds, it is refused, never a crash
            raise CheckpointError(f"checkpoint {name!r} unusable: {type(err).__name__}: {err}") from err
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
            out.values[messages.sensor_key(self.prefix, stream_id)] = None
        self.dirty = False
        log.info("event=checkpoint_restored name=%s model_version=%d", name, self.batcher.learner.version)
        return self.store.info(name).as_dict()
