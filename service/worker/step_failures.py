"""When a batched learner step raises: each row again alone, so one bad packet never holds back the others.

    batch of rows raised  ->  every live row and every replay row stepped alone
    a row alone raised    ->  retried, up to ``max_failures`` attempts in all, then given up:
        live row   its packet is poisoned (its remaining steps dropped, answered 500 and dead-lettered
                   by the worker; its stream goes on with its next packet; under learn_at=sequence its
                   running sequence is abandoned, since the row missed one of its frames)
        replay     dropped (``ndot_sequences_total{outcome="failed"}``; what it taught so far stays)

A failed step changes no state (``Batcher._step``), so running a row again is safe.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from service.worker.batcher import Batcher, PendingStep
    from service.worker.sequence_learning import Replay
    from service.worker.streams import StreamSlot

log = logging.getLogger("ndot.worker")


def run_each_alone(
    batcher: Batcher,
    batch: list[tuple[StreamSlot, PendingStep]],
    replays: list[Replay],
    error: Exception,
) -> None:
    """The tick of ``batch`` and ``replays`` raised ``error``: each row alone (a lone row: ``error`` was
    its first attempt)."""
    if len(batch) + len(replays) == 1:
        if batch:
            run_alone(batcher, batch[0], error)
        else:
            replay_alone(batcher, replays[0], error)
        return
    log.warning(
        "event=batch_step_failed rows=%d error=%r; running each row alone",
        len(batch) + len(replays),
        f"{type(error).__name__}: {error}",
    )
    for item in batch:
        run_alone(batcher, item, None)
    for replay in replays:
        replay_alone(batcher, replay, None)


def run_alone(batcher: Batcher, item: tuple[StreamSlot, PendingStep], failure: Exception | None) -> None:
    """Run one live row's step, with up to ``max_failures`` attempts in all; give its packet up after that.

    ``failure``: the error of a first attempt already made alone (it counts as one attempt).
    """
    slot, step = item
    attempts = 0 if failure is None else 1
    while failure is None or attempts < batcher.max_failures:
        if failure is not None:
            batcher.metrics.packets.labels(outcome="failed").inc()
            log.warning(
                "event=step_failed id=%s stream=%s attempt=%d error=%r",
                step.entry_id,
                slot.stream_id,
                attempts,
                f"{type(failure).__name__}: {failure}",
            )
            if batcher.learner.device.type == "cuda":  # a transient out-of-memory may pass once freed
                torch.cuda.empty_cache()
        try:
            batcher._step([item])
            return
        except Exception as err:
            failure, attempts = err, attempts + 1
    batcher.metrics.packets.labels(outcome="failed").inc()
    batcher.give_up(
        slot,
        step,
        f"learner step failed {attempts} times on this packet: {type(failure).__name__}: {failure}",
    )


def replay_alone(batcher: Batcher, replay: Replay, failure: Exception | None) -> None:
    """A replay's row alone, up to ``max_failures`` attempts in all; then the replay is dropped."""
    attempts = 0 if failure is None else 1
    while failure is None or attempts < batcher.max_failures:
        try:
            batcher._replay_step([replay])
            return
        except Exception as err:
            failure, attempts = err, attempts + 1
    batcher.sequences.failed(replay, f"{type(failure).__name__}: {failure}")
