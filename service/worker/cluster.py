"""Many worker processes, one model: the ranks of a ``torch.distributed`` group launched by ``torchrun``.

Every rank holds a full copy of the model and the streams of its shards (``owned_shards``: rank
``r`` of world ``W`` owns the shards ``s`` with ``s % W == r``). The ranks keep their weights equal
by collectives on one *tick clock*: each round they agree on how many ticks to run (``TickClock``,
an all-reduce MAX), and every rank runs that many ticks, idle ones included, so every rank enters
the same collectives in the same order whatever its streams did. Two ways to keep weights in step:

``average`` (default) -- local updates, then every ``K`` ticks the parameters are averaged
(``ParameterAverager``, torch.distributed's ``model_averaging``: periodic model averaging)::

    W  <-  (1 / W_ranks) * sum_r W_r

``grad`` -- every tick the gradients are all-reduced and scaled by the global count of labelled
rows (``GradientSync``). Rank ``r`` holds ``g_r = (1/n_r) sum_{i in r} dL_i/dW`` (the loss is a mean
over its ``n_r`` labelled rows), so::

    g = (1 / N) * sum_r n_r * g_r,     N = sum_r n_r

which is the gradient of one worker holding every stream in one batch: every rank then takes the same
optimizer step, and the ranks stay bit-for-bit equal up to the all-reduce's rounding (the test oracle).

The process group is keyed per restart attempt (``PrefixStore`` on torchrun's restart count): after a
restart, ranks that start at different speeds would otherwise read the previous attempt's addresses
from torchrun's store.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.algorithms.model_averaging.averagers import ModelAverager

from ndot_core import OnlineLearner

log = logging.getLogger("ndot.cluster")

SYNC_MODES = ("average", "grad")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Where this process stands in the group, as torchrun's environment says."""

    rank: int
    world_size: int
    restart_count: int
    master_addr: str
    master_port: int
    #: torchrun's agent hosts the store (``TORCHELASTIC_USE_AGENT_STORE``); else rank 0 hosts it.
    agent_store: bool

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClusterConfig | None:
        """The config torchrun (or a hand-set environment) gives; ``None`` outside a group (one worker)."""
        env = os.environ if env is None else env
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return None
        try:
            config = cls(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                restart_count=int(env.get("TORCHELASTIC_RESTART_COUNT", "0")),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env["MASTER_PORT"]),
                agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
            )
        except (KeyError, ValueError) as err:
            raise ValueError(f"bad torchrun environment (RANK, WORLD_SIZE, MASTER_PORT): {err}") from err
        if not 0 <= config.rank < config.world_size:
            raise ValueError(f"RANK={config.rank} is outside WORLD_SIZE={config.world_size}")
        return config


def owned_shards(rank: int, world_size: int, shards: int) -> list[int]:
    """The shards rank ``rank`` of ``world_size`` owns: ``s % world_size == rank``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    return [shard for shard in range(shards) if shard % world_size == rank]


def join(config: ClusterConfig, backend: str = "gloo", timeout_s: float = 300.0) -> None:
    """Join the process group of ``config`` (its store keyed by the restart attempt)."""
    store = dist.TCPStore(
        config.master_addr,
        config.master_port,
        config.world_size,
        is_master=config.rank == 0 and not config.agent_store,
        timeout=timedelta(seconds=timeout_s),
        wait_for_workers=False,
    )
    attempt = dist.PrefixStore(f"ndot/attempt-{config.restart_count}", store)
    dist.init_process_group(
        backend,
        store=attempt,
        rank=config.rank,
        world_size=config.world_size,
        timeout=timedelta(seconds=timeout_s),
    )
    log.info(
        "event=cluster_joined rank=%d world_size=%d attempt=%d backend=%s",
        config.rank,
        config.world_size,
        config.restart_count,
        backend,
    )


def leave() -> None:
    """Leave the process group (if joined)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_parameters(params: Iterable[torch.Tensor], source: int = 0) -> None:
    """Every rank takes ``source``'s parameters (in place: layouts and references are kept)."""
    params = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, source)
    _unflatten_into(flat, params)


def model_digest(params: Iterable[torch.Tensor]) -> str:
    """SHA-256 of the parameters' bytes (rank-independent: equal weights give equal digests)."""
    digest = hashlib.sha256()
    for param in params:
        digest.update(param.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def _unflatten_into(flat: torch.Tensor, tensors: list[torch.Tensor]) -> None:
    offset = 0
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(flat[offset : offset + tensor.numel()].view(tensor.shape))
            offset += tensor.numel()


class TickClock:
    """The ranks agree, each round, on how many ticks every one of them runs."""

    def __init__(self) -> None:
        self.ticks = 0  # ticks run by every rank since the group formed

    def agree(self, wanted: int) -> int:
        """The most ticks any rank wants this round (all-reduce MAX); every rank runs that many."""
        count = torch.tensor([wanted], dtype=torch.long)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        return int(count.item())


class ParameterAverager(ModelAverager):
    """Periodic model averaging every ``period`` ticks (``ModelAverager`` of torch.distributed).

    Written beside torch's ``PeriodicModelAverager`` because that one rebinds ``param.data`` to views
    of one flat buffer, which drops the channels-last layout of the local step's weights and the
    references its fused optimizer and workspace hold; this one copies the average back in place.
    """

    def __init__(self, period: int) -> None:
        if period < 1:
            raise ValueError(f"period must be >= 1, got {period}")
        super().__init__()
        self.period = period

    def average_parameters(self, params: Iterable[torch.Tensor]) -> bool:  # type: ignore[override]
        """Count a tick; average when the period is up. Returns whether it averaged."""
        self.step += 1
        if self.step % self.period:
            return False
        average_in_place(params)
        return True


def average_in_place(params: Iterable[torch.Tensor]) -> None:
    """Every rank's parameters become their mean over the ranks (one flat all-reduce, copied back in place)."""
    params = list(params)
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    flat /= dist.get_world_size()
    dist.all_reduce(flat)
    _unflatten_into(flat, params)


@dataclass(frozen=True, slots=True)
class RoundOutcome:
    """What the ranks agreed at the end of a round."""

    ticks: int  # the tick clock after the round (every rank's equal)
    averaged: bool  # the parameters were averaged this round
    stop: bool  # some rank is stopping: every rank stops after this round
    model_reset: bool  # some rank applied a model reset this round: every rank resets too
    checkpoint: bool  # some rank's checkpoint is due, or they stop: every rank saves this round (the cut)


class RoundSync:
    """One collective per worker round on every rank, in step: the tick clock, averaging, stop, reset.

    Each rank runs its rounds at its own pace (reading its shards, applying, ticking) and ends every
    round here, so the ranks meet once a round::

        [ticks, stop, reset, checkpoint]  <-  all-reduce MAX over the ranks
        clock += ticks;  average the parameters when the clock passes a multiple of every_ticks,
                         or when the ranks checkpoint (so every rank saves the same weights)

    A round's ticks count once (the most any rank ran), so the clock is the same on every rank and the
    ranks average together. Under ``mode="grad"`` nothing is averaged (every tick's update was one
    all-reduced gradient, ``GradientSync``): the digest is still taken every ``every_ticks`` ticks. ``stop``: a rank asked to stop (SIGTERM) makes every rank stop after the
    same round, so none waits in a collective for a rank that left. ``reset``: a model reset reached
    one rank (its shard holds the control entry); the others reset too, so all start again equal.
    """

    def __init__(self, every_ticks: int, mode: str = "average") -> None:
        if every_ticks < 1:
            raise ValueError(f"every_ticks must be >= 1, got {every_ticks}")
        if mode not in SYNC_MODES:
            raise ValueError(f"unknown sync mode {mode!r}; expected one of {SYNC_MODES}")
        self.every_ticks = every_ticks
        self.mode = mode
        self.clock = 0
        self.rounds = 0
        self.averages = 0
        self.sync_s = 0.0  # seconds spent in the collectives, all rounds
        self.digest: str | None = None  # the model digest right after the latest average
        self.digest_clock: int | None = None  # the clock at that average

    def after_round(
        self,
        params: Iterable[torch.Tensor],
        ticks: int,
        stop: bool,
        model_reset: bool,
        checkpoint: bool = False,
        run_ticks: Callable[[int, bool, bool], None] | None = None,
    ) -> RoundOutcome:
        """The round's collective (see the class docstring); call on every rank once per round.

        ``run_ticks(ticks, model_reset, checkpoint)`` (sync_mode grad): ``ticks`` is what the ranks *want* to
        run; the agreed count is handed to ``run_ticks`` right after the collective, and the clock counts it.
        """
        started = time.perf_counter()
        agreed = torch.tensor([ticks, int(stop), int(model_reset), int(checkpoint)], dtype=torch.long)
        dist.all_reduce(agreed, op=dist.ReduceOp.MAX)
        ticks, stop, model_reset, checkpoint = (int(v) for v in agreed.tolist())
        checkpoint = checkpoint or stop
        if run_ticks is not None:  # (the ticks' own work is not sync time)
            ticking = time.perf_counter()
            run_ticks(ticks, bool(model_reset), bool(checkpoint))
            started += time.perf_counter() - ticking
        before, self.clock = self.clock, self.clock + ticks
        self.rounds += 1
        due = self.clock // self.every_ticks > before // self.every_ticks or bool(checkpoint)
        averaged = due and self.mode == "average"  # (grad: the ranks' weights are equal at every tick)
        if due:
            params = list(params)
            if averaged:
                average_in_place(params)
                self.averages += 1
            self.digest, self.digest_clock = model_digest(params), self.clock
        self.sync_s += time.perf_counter() - started
        return RoundOutcome(self.clock, averaged, bool(stop), bool(model_reset), bool(checkpoint))


class GradientSync:
    """All-reduce of the held gradients every tick, scaled by the global labelled-row count.

    The learner holds its updates (``learner.hold_updates``); after each tick the caller passes how
    many labelled rows the tick had on this rank (0 on an idle tick). See the module docstring.
    """

    def __init__(self, learner: OnlineLearner) -> None:
        if learner.mode != "online":
            raise ValueError("grad sync needs mode 'online' (one optimizer step per labelled tick)")
        if learner.regulariser is not None:
            raise ValueError("grad sync does not support a regulariser (its term would be summed per rank)")
        self.learner = learner
        self.ticks = 0  # ticks whose gradients were all-reduced
        self.updates = 0  # of which some rank learned something (an optimizer step on every rank)
        self.sync_s = 0.0  # seconds in the gradients' all-reduce (waiting for the other ranks included)
        learner.hold_updates = True

    def after_tick(self, labelled_rows: int) -> int:
        """Reduce and apply this tick's gradients on every rank; returns the global labelled-row count."""
        learner = self.learner
        grads = learner.held_gradients()
        if learner.pending_steps == 0:
            labelled_rows = 0  # nothing learned here this tick: contribute zeros
        flat = torch.cat([g.reshape(-1) for g in grads] + [grads[0].new_zeros(1)])
        if labelled_rows:
            flat.mul_(labelled_rows)
        flat[-1] = labelled_rows
        started = time.perf_counter()
        dist.all_reduce(flat)
        self.sync_s += time.perf_counter() - started
        total = int(round(flat[-1].item()))
        self.ticks += 1
        self.updates += total > 0
        if total == 0:
            learner.drop_held()
            return 0
        flat.div_(total)
        _unflatten_into(flat[:-1], grads)
        learner.apply_update()
        return total
