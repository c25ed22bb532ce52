"""This worker as one rank of a torchrun group: its shards, its rounds with the others, its status.

``ndot workers --nproc N`` (``torchrun``) starts N ``ndot worker`` processes; each finds its rank in
torchrun's environment (``ClusterConfig.from_env``) and the ``Worker`` hands this object the
cluster's part of its life::

    start   join the process group (keyed per restart attempt), own shards s % W == r of the bus,
            restore the newest committed round (``cluster_checkpoints``: any world size), then
            take rank 0's weights
    round   after every loop round: RoundSync (tick clock, periodic averaging, stop, model reset,
            checkpoint); a checkpoint round is a consistent cut: every rank saves, rank 0 commits
    status  rank, world, shards, clock, averages, the digest at the latest average, sync seconds

``NDOT_SYNC_MODE=grad`` runs the ranks in lockstep: the applier runs no tick of its own
(``EntryApplier.lockstep``); every round ends with ``lockstep_ticks``: the ranks agree on a tick
count (all-reduce MAX of what each wants), every rank runs exactly that many ticks, empty ones
included, and after each tick the gradients are all-reduced and applied on every rank
(``cluster.GradientSync``): each update is the one a single worker holding every stream would make
from the tick's rows. A control entry waits (``EntryApplier.held``) until the rank's queued steps
ran in such ticks; a cut first drains every rank's queues the same way. The worker runs the round's
end between its apply and its send (``end_round``), so the packets those ticks finish are answered in
the same round; the last tick's learning (its replay step, the all-reduce, the update) waits until the
answers are on their way (``finish_tick``, answers before learning): the updates are the same, each
comes before the next tick's forward.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import redis
import torch
from prometheus_client import CollectorRegistry, Counter, Gauge

from service.bus import BusEntry
from service.settings import Settings
from service.worker.applier import Applied, EntryApplier
from service.worker.batcher import Batcher
from service.worker.checkpoints import CheckpointError
from service.worker.cluster import (
    ClusterConfig,
    GradientSync,
    RoundOutcome,
    RoundSync,
    TickClock,
    broadcast_parameters,
    join,
    leave,
    owned_shards,
)
from service.worker.cluster_checkpoints import (
    committed_rounds,
    merged_tree,
    prune_rounds,
    round_infos,
    save_round,
)

log = logging.getLogger("ndot.cluster")

#: This rank's metrics: (key, kind, name, help); each labelled with the rank (one value per process).
CLUSTER_METRICS = (
    ("clock", Gauge, "ndot_cluster_tick_clock", "The cluster's tick clock."),
    ("rounds", Counter, "ndot_cluster_rounds", "Rounds ended together with the other ranks."),
    ("averages", Counter, "ndot_cluster_averages", "Parameter averages taken part in."),
    (
        "sync",
        Counter,
        "ndot_cluster_sync_seconds",
        "Seconds spent in the round's collectives (waiting for the other ranks included).",
    ),
    (
        "gradient_syncs",
        Counter,
        "ndot_cluster_gradient_syncs",
        "Ticks whose gradients were all-reduced over the ranks (sync_mode grad).",
    ),
    ("world", Gauge, "ndot_cluster_world_size", "Worker ranks in the group."),
)


class ClusterMember:
    """Rank ``config.rank`` of ``config.world_size`` (see the module docstring)."""

    def __init__(self, config: ClusterConfig, settings: Settings) -> None:
        if settings.sync_mode == "grad" and settings.mode != "online":
            raise ValueError(
                "NDOT_SYNC_MODE=grad needs NDOT_MODE=online (one all-reduced update per labelled tick)"
            )
        self.config = config
        self.settings = settings
        self.sync = RoundSync(settings.sync_every_ticks, settings.sync_mode)
        self.gradients: GradientSync | None = None  # sync_mode grad: built by ``align`` (the learner's)
        self.shards: list[int] = []
        self.shard_count = 0  # the bus's shards (join)
        self._ticks_seen = 0
        self._resets_seen = 0
        self._metrics: dict[str, Any] = {}
        self._counted = {"gradient_syncs": 0, "sync": 0.0}  # what the counters in _metrics hold
        self.committed: str | None = None  # the newest round this group committed
        self.token = 0  # this group's fencing token (join)
        self._epoch_key = f"{settings.bus_stream}:epoch"  # (RedisStreamBus.epoch_key)
        self.cut_error: str | None = None  # why the latest cut was not committed, if it was not
        #: Lockstep: the round's last tick ran with its learning deferred (``finish_tick`` runs it, on every
        #: rank alike) and this rank's labelled rows of it so far.
        self.tick_deferred = False
        self._deferred_rows = 0

    def attach_metrics(self, registry: CollectorRegistry) -> None:
        """This rank's cluster metrics in the worker's registry (label ``rank``: one value per process)."""
        self._metrics = {
            key: kind(name, text, ["rank"], registry=registry).labels(rank=str(self.rank))
            for key, kind, name, text in CLUSTER_METRICS
        }
        self._metrics["world"].set(self.world_size)

    @property
    def rank(self) -> int:
        return self.config.rank

    @property
    def world_size(self) -> int:
        return self.config.world_size

    def backend(self) -> str:
        if self.settings.cluster_backend != "auto":
            return self.settings.cluster_backend
        return "nccl" if self.settings.torch_device() == "cuda" else "gloo"

    def join(self, shards: int) -> tuple[list[int], int]:
        """Join the group (blocks until every rank is there); returns ``(owned shards, fencing token)``.

        Rank 0 takes the group's fencing token (``INCR <stream>:epoch``: higher than any group's before)
        and every rank gets it; the worker then writes it into its shards' owner keys
        (``RedisStreamBus.claim_shards``), so acks of an older group's zombie are refused.
        """
        join(self.config, self.backend(), self.settings.cluster_timeout_s)
        token: list[int | None] = [None]
        if self.rank == 0:
            client = self._redis()
            try:
                token = [int(client.incr(self._epoch_key))]
            finally:
                client.close()
        torch.distributed.broadcast_object_list(token, src=0)
        self.token = int(token[0])
        self.shards = owned_shards(self.rank, self.world_size, shards)
        self.shard_count = shards
        log.info(
            "event=rank_owns rank=%d world_size=%d shards=%d first=%s",
            self.rank,
            self.world_size,
            len(self.shards),
            self.shards[:8],
        )
        return self.shards, self.token

    def _redis(self) -> redis.Redis:
        return redis.Redis.from_url(str(self.settings.redis_url), socket_timeout=10)

    def fence_holds(self) -> bool:
        """Whether no newer group took a token since this one joined (asked before a round is committed)."""
        client = self._redis()
        try:
            newest = client.get(self._epoch_key)
        finally:
            client.close()
        return newest is not None and int(newest) == self.token

    def checkpoint_dir(self) -> Path:
        """Where the ranks' committed rounds live (one folder for every world size)."""
        return Path(self.settings.checkpoint_dir) / "cluster"

    def restore(self, applier: EntryApplier, bus_newest: dict[int, str | None]) -> str | None:
        """Load the newest usable committed round (this rank's shards of it); its name, or None."""
        base = self.checkpoint_dir()
        for round_id, manifest in reversed(committed_rounds(base)):
            name = f"round-{round_id}"
            try:
                tree = applier.load_tree(merged_tree(base, manifest, self.shards, applier.shards), name)
            except CheckpointError as err:
                applier.checkpoint_failed("restore", name, err)
                continue
            applier.adopt_watermark(tree, bus_newest, name)
            self.sync.rounds = round_id  # round numbers go on rising across restarts
            self.sync.clock = int(manifest.get("tick_clock", 0))
            log.info(
                "event=round_restored round=%d rank=%d world_then=%s world_now=%d streams=%d",
                round_id,
                self.rank,
                manifest.get("world_size"),
                self.world_size,
                len(applier.batcher.registry),
            )
            return name
        return None

    def align(self, batcher: Batcher) -> None:
        """Every rank takes rank 0's weights (after each restored its own checkpoint, or none).

        Under sync_mode grad the learner holds its updates for the ranks' all-reduce from now on (the
        optimizer states are equal already: a restored round gives every rank rank 0's learner).
        """
        broadcast_parameters(batcher.learner.model.parameters(), source=0)
        if self.settings.sync_mode == "grad":
            self.gradients = GradientSync(batcher.learner)
        self._ticks_seen, self._resets_seen = batcher.ticks_run, batcher.model_resets

    def lockstep_ticks(
        self,
        applier: EntryApplier,
        ticks: int | None = None,
        draining: bool = False,
        defer_last: bool = False,
    ) -> int:
        """sync_mode grad: run ``ticks`` ticks together with the other ranks, one all-reduced update per tick
        (see the module docstring); ``None``: agree on the count first (all-reduce MAX of what each rank
        wants: every rank's queued work when ``draining``). ``defer_last``: the last tick's learning (its
        replay step, the gradients' all-reduce and the update) waits for ``finish_tick``, which the worker
        runs while the round's answers travel (answers before learning). Returns the ticks run."""
        assert self.gradients is not None
        self.finish_tick(applier)  # (every rank's gradients of a tick come from the same weights)
        if ticks is None:
            ticks = TickClock().agree(applier.ticks_wanted(draining))
        batcher = applier.batcher
        for tick in range(ticks):
            drains = draining or bool(applier.held)
            defer = defer_last and tick == ticks - 1
            batcher.tick(paced=not drains, replays_alone=drains or not applier.in_flight, defer=defer)
            if defer:
                self.tick_deferred, self._deferred_rows = True, batcher.last_tick_labelled
            else:
                self.gradients.after_tick(batcher.last_tick_labelled)
        return ticks

    def finish_tick(self, applier: EntryApplier) -> None:
        """The learning of a tick run with ``defer_last``, if one waits: its owed replay step (or a live step's
        pending learning), then the gradients' all-reduce and the update. Every rank deferred the same tick,
        so every rank calls this at the same point of its rounds (the all-reduce)."""
        if not self.tick_deferred:
            return
        self.tick_deferred = False
        learned = applier.learn_deferred()  # the replay rows the tick owed (0 when they ran in it)
        self.gradients.after_tick(self._deferred_rows + learned)

    def end_round(
        self, applier: EntryApplier, entries: list[BusEntry], housekeeping: bool, stopping: bool
    ) -> tuple[Applied, RoundOutcome]:
        """Lockstep: frame ``entries``, end the round with the other ranks (their ticks run in it), then
        settle what the ticks finished, so those packets are answered this round (run in a thread)."""
        applied = applier.apply(entries, housekeeping)
        outcome = self.after_round(applier, stopping)
        applier.settle_ticked(applied)
        return applied, outcome

    def after_round(self, applier: EntryApplier, stopping: bool) -> RoundOutcome:
        """This rank's end of a round (every rank calls it once per round; see ``RoundSync``)."""
        batcher = applier.batcher
        reset = batcher.model_resets > self._resets_seen
        due = applier.dirty and applier.due.due()
        run_ticks = None
        if self.gradients is None:
            ticks = batcher.ticks_run - self._ticks_seen  # run in this round's apply
        else:  # lockstep: the ranks agree on the ticks in the round's collective, then run them together
            ticks = applier.ticks_wanted(draining=False)

            def run_ticks(agreed: int, model_reset: bool, checkpoint: bool) -> None:
                self.finish_tick(applier)
                if model_reset:  # before the ticks: every rank's gradients come from the same weights
                    self._reset_model(batcher)
                # the last tick's learning after the round's answers, unless the ranks save this round
                defer_last = self.settings.answer_before_learning and not checkpoint
                self.lockstep_ticks(applier, agreed, defer_last=defer_last)

        outcome = self.sync.after_round(
            batcher.learner.model.parameters(), ticks, stopping, reset, due, run_ticks
        )
        if self._metrics:
            self._metrics["clock"].set(outcome.ticks)
            self._metrics["rounds"].inc()
            self._metrics["averages"].inc(int(outcome.averaged))
            if self.gradients is not None:
                self._metrics["gradient_syncs"].inc(self.gradients.ticks - self._counted["gradient_syncs"])
                self._counted["gradient_syncs"] = self.gradients.ticks
            # (cumulative: a deferred tick's all-reduce runs between two rounds)
            self._metrics["sync"].inc(self.sync_seconds() - self._counted["sync"])
            self._counted["sync"] = self.sync_seconds()
        if outcome.model_reset and self.gradients is None:  # every rank alike: fresh seeded weights
            self._reset_model(batcher)
        if outcome.checkpoint:
            self.cut(applier, outcome)
        self._ticks_seen, self._resets_seen = batcher.ticks_run, batcher.model_resets
        return outcome

    def _reset_model(self, batcher: Batcher) -> None:
        """A model reset reached some rank this round: every rank resets (fresh seeded weights, streams at rest)."""
        batcher.reset_model(self.settings.seed)
        log.info("event=cluster_model_reset rank=%d clock=%d", self.rank, self.sync.clock)

    def sync_seconds(self) -> float:
        """Seconds this rank spent in the collectives: the rounds' and, under grad, the gradients'."""
        return self.sync.sync_s + (0.0 if self.gradients is None else self.gradients.sync_s)

    def cut(self, applier: EntryApplier, outcome: RoundOutcome) -> None:
        """Every rank saves this round; rank 0 commits it (``cluster_checkpoints.save_round``)."""
        base = self.checkpoint_dir()
        while self.gradients is not None and self.lockstep_ticks(applier, draining=True):
            pass  # every rank's queued steps run, together, before any rank saves (its snapshot drains)
        tree = applier.checkpoint_tree()
        tree["tick_clock"] = outcome.ticks
        try:
            name = save_round(
                base, self.sync.rounds, self.rank, self.world_size, applier.shards, tree, self.fence_holds
            )
        except CheckpointError as err:  # not committed on any rank: tried again when due
            self.cut_error = str(err)
            applier.due.failed()
            applier.checkpoint_failed("save", f"round-{self.sync.rounds}", err)
            return
        self.cut_error, self.committed = None, name
        applier.saved()
        if self.rank == 0:
            prune_rounds(base, self.settings.checkpoint_keep)
        applier.checkpoints = round_infos(base)
        log.info("event=round_committed name=%s rank=%d clock=%d", name, self.rank, outcome.ticks)

    def status(self) -> dict[str, Any]:
        sync = self.sync
        return {
            "rank": self.rank,
            "world_size": self.world_size,
            "attempt": self.config.restart_count,
            "shards": self.shards,
            "sync_mode": self.settings.sync_mode,
            "sync_every_ticks": sync.every_ticks,
            "tick_clock": sync.clock,
            "rounds": sync.rounds,
            "averages": sync.averages,
            "gradient_syncs": 0 if self.gradients is None else self.gradients.ticks,
            "sync_seconds": round(self.sync_seconds(), 6),
            "digest": sync.digest,
            "digest_clock": sync.digest_clock,
        }

    def cluster_json(self) -> bytes:
        """What the cluster is (rank 0 writes it to the bus for ``GET /v1/cluster``)."""
        settings = self.settings
        return json.dumps(
            {
                "world_size": self.world_size,
                "attempt": self.config.restart_count,
                "shards": self.shard_count,
                "sync_mode": settings.sync_mode,
                "sync_every_ticks": settings.sync_every_ticks,
            }
        ).encode()

    def leave(self) -> None:
        leave()


def from_environment(settings: Settings) -> ClusterMember | None:
    """The rank torchrun started this process as, or ``None`` when it runs alone."""
    config = ClusterConfig.from_env()
    if config is None:
        return None
    torch.set_num_threads(max(settings.torch_threads, 1))
    return ClusterMember(config, settings)
