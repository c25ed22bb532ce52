"""The batcher's learner steps: live rows, replay rows, their results, and learning after the answers.

A tick runs up to two learner steps (``Batcher.tick``)::

    _step(live rows)        forward of every stream with a frame ready (under learn_at=step its
                            labelled rows learn in the same call); results recorded per packet
    _replay_step(replays)   learn_at=sequence: the tick's replay rows learn (one row per replaying stream)

**Answers before learning.** Under learn_at=sequence the live step never learns: every prediction a
packet's reply carries is final once ``_step`` ran, and a sequence's learning is its replay rows. A
tick run with ``defer=True`` (the worker's rounds) owes its replay step instead of running it
(``replay_ticks_owed``); the worker sends the round's answers and then runs the owed learning
(``learn_deferred``), the two overlapping. So a round's answers wait for its live forwards only.
Whatever touches the weights or the states next (a tick without ``defer``, a control entry, a
checkpoint, a reset, the next round) runs the owed learning first.

``learn_deferred`` runs one replay step for the round (every replay advances one frame) and the rest
of the owed ones only while some stream's replays back up (a second one queued behind the one
running: its sequences end faster than one step a round learns them). A learning step's cost is
mostly fixed (~1.8 ms at one row, ~5.4 ms at 16, one CPU thread), so under load fewer, fuller replay
steps follow the cameras further: the replays that are running together grow until their rows per
step match the frames per round. What changes against one replay step per tick: the live forwards
of a round do not see that round's replay updates (they see them from the next round on), and under
load a replay advances one frame a round rather than one a tick; what is learned, from which frames
and start states, each replay's frames in order, is the same (docs/service.md § Answers before
learning).

Under learn_at=step a labelled live step learns in the call that predicts. A tick run with
``defer=True`` keeps that step's backward and optimizer step pending in the learner
(``OnlineLearner.step(defer_learning=True)``); the next tick runs it before its forward, so only the
round's last tick's learning waits past the answers, and the updates are exactly those of learning
at once. (The compiled step computes its gradients with its forward: it does not defer.)
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

import service.worker.step_failures as step_failures
from ndot_core import NetworkState, OnlineLearner
from service.worker.batcher_sequences import STEP
from service.worker.state_table import shallow

if TYPE_CHECKING:
    from collections import defaultdict

    from service.metrics import ServiceMetrics
    from service.worker.batcher import PendingStep
    from service.worker.live import LiveFrames
    from service.worker.sequence_learning import Replay, SequenceLearning
    from service.worker.state_table import StateTable
    from service.worker.streams import StreamSlot

log = logging.getLogger("ndot.worker")


class StepRunner:
    """Learner steps of a ``Batcher`` and the learning deferred past a round's answers."""

    learner: OnlineLearner
    metrics: ServiceMetrics
    table: StateTable
    live: LiveFrames
    sequences: SequenceLearning | None
    results: defaultdict[str, list[dict[str, Any]]]
    remaining: defaultdict[str, int]
    poisoned: dict[str, str]
    step_s_average: float
    #: Replay ticks run with ``defer=True`` whose replay step has not run yet (``learn_deferred`` runs them).
    replay_ticks_owed: int = 0
    #: Seconds of the forward of a live step whose learning is pending (observed with the learning's).
    deferred_forward_s: float = 0.0

    @property
    def learning_deferred(self) -> bool:
        """Learning waits for ``learn_deferred`` (the round's answers go first)."""
        return self.replay_ticks_owed > 0 or self.learner.learning_pending

    def learn_deferred(self) -> int:
        """Run the learning ``tick(defer=True)`` left: the live step's (learn_at=step), then the replay
        steps owed (one, more while replays back up; see the module docstring); returns the replay rows
        learned."""
        self.learn_live_pending()
        owed, self.replay_ticks_owed = self.replay_ticks_owed, 0
        learned = 0
        for step in range(owed):
            replays = self.sequences.rows() if self.sequences is not None else []
            if not replays or (step and not self.sequences.backed_up()):  # (one step a round keeps up)
                break
            self._run_replays(replays)
            learned += len(replays)
        return learned

    def learn_live_pending(self) -> None:
        """The pending learning of a live step (learn_at=step, ``defer``), timed with its forward.

        If it fails, that step's learning is dropped, logged and counted: its answers went out and its
        state advanced; the weights are as before the step.
        """
        if not self.learner.learning_pending:
            return
        started = time.perf_counter()
        try:
            self.learner.learn_pending()
        except Exception as err:
            self.metrics.learning_failures.inc()
            log.error("event=deferred_learning_failed error=%r; that step's learning is dropped", err)
        self._observe_step(self.deferred_forward_s + time.perf_counter() - started)

    def _run_replays(self, replays: list[Replay]) -> None:
        try:
            self._replay_step(replays)
        except Exception as err:
            step_failures.run_each_alone(self, [], replays, err)

    def give_up(self, slot: StreamSlot, step: PendingStep, error: str) -> None:
        """A packet whose step failed on every attempt: its remaining steps dropped, ``error`` its answer."""
        if self.sequences is not None:  # the row missed a frame of its sequence: not scored, not learned
            self._finished(self.sequences.abandon(slot))
        self.poisoned[step.entry_id] = error
        slot.pending = type(slot.pending)(
            work for work in slot.pending if not (work[0] == STEP and work[1].entry_id == step.entry_id)
        )
        self.results[step.entry_id] = []
        self.remaining[step.entry_id] = 0

    def _step(self, batch: list[tuple[StreamSlot, PendingStep]], defer: bool = False) -> None:
        """Rows -> ``learner.step`` -> rows back -> record; the state changes only if the step succeeds.

        ``defer``: a labelled row's learning waits (``learn_live_pending``; see the module docstring).

        Every live stream in the batch (the usual case at real time): the table is stepped as it is,
        no copies (``StateTable.batch_of``). At least three quarters of them, with the compiled graph
        of the table's size ready (``OnlineLearner.steps_in_place``): the whole table is stepped with
        the others inactive (``step(active=)``: they stay exactly as they were), again with no copies
        (an inactive row costs a row of compute, about what gathering and scattering a row costs).
        Else the rows are gathered and scattered back. The table's tensors before the step are kept
        to put back on failure.
        """
        batch.sort(key=lambda item: item[0].row)
        rows = [slot.row for slot, _ in batch]
        label_list = [step.learn_label for _, step in batch]
        labelled = max(label_list) >= 0
        table = self.table.state
        dense = len(rows) < table.batch_size and 4 * len(rows) >= 3 * table.batch_size
        if dense and self.learner.steps_in_place(table.batch_size, labelled):
            self._step_in_place(batch, rows, label_list if labelled else None, defer)
            return
        frames = self._frames([step.frame for _, step in batch])
        labels = torch.tensor(label_list, dtype=torch.long) if labelled else None
        sub, how = self.table.batch_of(rows)
        before = shallow(sub) if how == "whole" else None
        try:
            self._timed_step(frames, labels, sub, defer)
        except Exception:
            if before is not None:
                self.table.state = before
            raise
        self.table.put(rows, sub, how)
        self._record(batch, sub.readout_sum, sub.steps)

    def _step_in_place(
        self,
        batch: list[tuple[StreamSlot, PendingStep]],
        rows: list[int],
        label_list: list[int] | None,
        defer: bool,
    ) -> None:
        """The batch's rows stepped inside the whole table, the other rows inactive (unchanged)."""
        table = self.table.state
        size = table.batch_size
        first = batch[0][1].frame
        frames = np.zeros((size, *first.shape), dtype=first.dtype)
        frames[rows] = [step.frame for _, step in batch]
        index = torch.tensor(rows)
        active = torch.zeros(size, dtype=torch.bool).index_fill_(0, index, True)
        labels = None
        if label_list is not None:
            labels = torch.full((size,), -1, dtype=torch.long).index_copy_(0, index, torch.tensor(label_list))
        before = shallow(table)
        try:
            self._timed_step(self._frames(frames), labels, table, defer, active)
        except Exception:
            self.table.state = before
            raise
        self._record(batch, table.readout_sum[index], table.steps[index])

    def _replay_step(self, replays: list[Replay]) -> None:
        """The tick's replay rows (one per stream that has one), in one learning step of their own.

        Apart from the live rows: a step mixing unlabelled and labelled rows costs more than the two
        apart (measured: 16 live + 1 replay row 11.1 ms together, 6.6 ms apart). The replays' rows stay
        in one state from step to step (``SequenceLearning.batch``; on the compiled step a finished
        replay leaves an inactive hole that the next one fills, instead of a gather of all rows); a
        failed step changes nothing (the tensors before it are put back).
        """
        layout, stepped = self.sequences.batch(replays, lambda rows: self.learner.steps_in_place(rows, True))
        replays = [replay for replay in layout if replay is not None]  # (in the order of the batch's rows)
        active = None
        if len(replays) == len(layout):
            frames = self._frames([replay.frame() for replay in replays])
            labels = torch.tensor([replay.label for replay in replays], dtype=torch.long)
        else:  # holes: inactive rows, no frame, no label
            first = replays[0].frame()
            rows = np.zeros((len(layout), *first.shape), dtype=first.dtype)
            label_list = [-1] * len(layout)
            for i, replay in enumerate(layout):
                if replay is not None:
                    rows[i], label_list[i] = replay.frame(), replay.label
            frames = self._frames(rows)
            labels = torch.tensor(label_list, dtype=torch.long)
            active = torch.tensor([replay is not None for replay in layout])
        before = shallow(stepped)
        try:
            self._timed_step(frames, labels, stepped, active=active)
        except Exception:
            self.sequences.unstep(before)  # the step rebinds the tensors of the state it is given
            raise
        self.sequences.stepped(replays)

    @staticmethod
    def _frames(frames: list[np.ndarray] | np.ndarray) -> torch.Tensor:
        """The tick's frames as one ``[B, C, H, W]`` host tensor (the learner sends it to its device:
        on a GPU from pinned memory, without waiting)."""
        return torch.from_numpy(frames if isinstance(frames, np.ndarray) else np.stack(frames))

    def _timed_step(
        self,
        frames: torch.Tensor,
        labels: torch.Tensor | None,
        state: NetworkState,
        defer: bool = False,
        active: torch.Tensor | None = None,
    ) -> None:
        started = time.perf_counter()
        self.learner.step(frames, labels, state, defer_learning=defer, active=active)
        elapsed = time.perf_counter() - started
        if self.learner.learning_pending:  # observed once its learning ran too
            self.deferred_forward_s = elapsed
        else:
            self._observe_step(elapsed)

    def _observe_step(self, elapsed: float) -> None:
        self.metrics.step_duration.observe(elapsed)
        self.step_s_average += 0.05 * (elapsed - self.step_s_average)

    def _record(
        self, batch: list[tuple[StreamSlot, PendingStep]], readout_sum: torch.Tensor, steps: torch.Tensor
    ) -> None:
        """Each row's prediction (argmax of its readout sum, as ``OnlineLearner.predict``) into its
        packet's results; ``readout_sum`` and ``steps`` are the batch's rows, in its order."""
        predicted = readout_sum.argmax(dim=1).tolist()
        steps = steps.clamp(min=1).to(readout_sum.dtype).unsqueeze(1)
        probabilities = torch.softmax(readout_sum / steps, dim=1).tolist()
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
                    "learned": step.learn_label >= 0,
                    "model_version": version,
                }
            )
            slot.sequence_step += 1
            slot.steps += 1
            slot.last_prediction = guess
            if correct is not None:
                learned += step.learn_label >= 0
                slot.labelled_steps += 1
                slot.correct_steps += correct
            self.metrics.record_prediction(correct)
        self.metrics.steps.labels(kind="learn").inc(learned)
        self.metrics.steps.labels(kind="infer").inc(len(batch) - learned)
        self.metrics.model_version.set(version)
        self.live.record(batch, predicted, probabilities, version)
