"""One stream's sequences under test-then-train (``NDOT_LEARN_AT=sequence``): held, scored, then learned.

A stream's ``SequenceBook`` holds its *running* sequence (the one being streamed) and the sequences
that *ended* and still wait for their label or for their last frames' tick. Each ``SequenceRecord``
keeps what learning it later needs: its frames, as framed, in order, and its start state (the
stream's ``NetworkState`` row when its first frame was stepped; ``None`` = the resting state, which
every sequence starts from today, since a sequence start resets the row: it costs no bytes)::

    held bytes = sum(frame.nbytes) + bytes of the start state      <= SequenceLimits.max_bytes
    held frames                                                    <= SequenceLimits.max_frames

A sequence over either bound drops its frames (``unlearnable = TOO_LONG``): it is still scored
when its label comes, never learned. A book holds at most ``held`` ended sequences without a label;
the oldest is dropped past it (a label for it is then refused). Numbers are the stream's sequence
counter (``StreamSlot.sequences``): 1 for the first sequence with events.

The result of a sequence (the ``sequence`` object of a reply, ``SequenceRecord.result``)::

    {"sequence": n, "predicted": argmax of the row's readout_sum after its last frame,
     "probabilities": softmax(readout_sum / steps), "label", "correct": predicted == label (None
     without a label), "learning": LEARNING state, "model_version": the weights that predicted it}

The records and counters go into checkpoints (``state_dict`` / ``book_from_state_dict``, checked
field by field before use).
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ndot_core import NetworkState
from service.worker.checkpoints import CheckpointError

#: ``learning`` of a result: the replay is queued (learned in the next ticks); it waits for its label;
#: it was dropped unlabelled; its frames are not held (over the bound, or begun before a restore);
#: it was cut by a reset of its stream or of the model.
QUEUED, AWAITING_LABEL, NOT_HELD = "queued", "awaiting_label", "not_held"
TOO_LONG, INCOMPLETE, ABANDONED = "too_long", "incomplete", "abandoned"
LEARNING = (QUEUED, AWAITING_LABEL, NOT_HELD, TOO_LONG, INCOMPLETE, ABANDONED)
#: Numbers of sequences scored lately, remembered per stream to say why a second label is refused.
RECENTLY_SCORED = 16
#: Why a label entry is refused by a worker that learns per step.
LEARN_AT_STEP_REFUSAL = (
    "a label after the fact needs NDOT_LEARN_AT=sequence; this worker learns at every labelled step "
    "(learn_at=step): send the label with the sequence's packets"
)


@dataclass(frozen=True)
class SequenceLimits:
    """Per stream: frames and bytes one sequence may hold, ended sequences that may wait for a label;
    per worker: re-learns of recent sequences after each new one and their memory
    (``service.worker.recent_replay``; ``replay_recent = 0``: none)."""

    max_frames: int = 250
    max_bytes: int = 4 * 1024 * 1024
    held: int = 2
    replay_recent: int = 2
    replay_memory_bytes: int = 64 * 1024 * 1024


class LabelRefused(Exception):
    """A label the stream cannot take: ``status`` (404 / 409 / 422) and ``detail`` for the reply."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail


def state_bytes(state: NetworkState | None) -> int:
    return 0 if state is None else sum(t.numel() * t.element_size() for t in state.tensors().values())


@dataclass(eq=False)
class SequenceRecord:
    """One sequence of a stream: what it needs to be scored and learned later."""

    number: int
    frames: list[np.ndarray] | None = field(default_factory=list)  # None once not held
    frame_count: int = 0  # frames the sequence made (held or not)
    held_bytes: int = 0
    start_state: NetworkState | None = None  # the row at its start; None = at rest
    label: int | None = None
    ended: bool = False
    unlearnable: str | None = None  # TOO_LONG or INCOMPLETE: its frames are not held
    abandoned: bool = False  # cut by a reset: neither scored nor learned
    dropped: bool = False  # left its book unlabelled
    predicted: int | None = None  # set at the tick of its end
    probabilities: list[float] | None = None
    model_version: int | None = None
    waiting: list[str] = field(default_factory=list)  # label entries waiting for its prediction

    @property
    def learnable(self) -> bool:
        return self.frames is not None and not self.abandoned

    @property
    def predicted_at_end(self) -> bool:
        return self.predicted is not None

    def release(self, reason: str | None) -> None:
        """Stop holding the frames: they will not be learned (``reason``: ``TOO_LONG``, ``INCOMPLETE``)."""
        self.unlearnable = self.unlearnable or reason
        self.frames, self.held_bytes, self.start_state = None, 0, None

    def add(self, frames: list[np.ndarray], limits: SequenceLimits) -> None:
        """Append frames while within ``limits``; past them the frames are released (``TOO_LONG``)."""
        self.frame_count += len(frames)
        if self.frames is None:
            return
        self.frames.extend(frames)
        self.held_bytes += sum(frame.nbytes for frame in frames)
        if self.frame_count > limits.max_frames or self.held_bytes > limits.max_bytes:
            self.release(TOO_LONG)

    def hold_start(self, state: NetworkState | None, limits: SequenceLimits) -> None:
        """The row at the sequence's start (``None``: at rest), counted against the bytes bound."""
        if self.frames is None:
            return
        self.start_state = state
        self.held_bytes += state_bytes(state)
        if self.held_bytes > limits.max_bytes:
            self.release(TOO_LONG)

    def learning(self) -> str:
        if self.abandoned:
            return ABANDONED
        if self.unlearnable is not None:
            return self.unlearnable
        if self.label is None:
            return NOT_HELD if self.dropped else AWAITING_LABEL
        return QUEUED

    def result(self) -> dict[str, Any]:
        """The ``sequence`` object of a reply (see the module docstring)."""
        correct = None if self.label is None or self.predicted is None else self.predicted == self.label
        return {
            "sequence": self.number,
            "predicted": self.predicted,
            "probabilities": self.probabilities,
            "label": self.label,
            "correct": correct,
            "learning": self.learning(),
            "model_version": self.model_version,
        }


@dataclass(eq=False)
class SequenceBook:
    """A stream's running sequence, its ended ones that wait, and its prequential counters."""

    running: SequenceRecord
    ended: deque[SequenceRecord] = field(default_factory=deque)
    last_ended: int | None = None  # number of the sequence that ended last (what "last" labels)
    scored: int = 0
    correct: int = 0
    learned: int = 0
    recently_scored: deque[int] = field(default_factory=lambda: deque(maxlen=RECENTLY_SCORED))

    @property
    def prequential_accuracy(self) -> float | None:
        return self.correct / self.scored if self.scored else None

    def begin(self, number: int) -> SequenceRecord:
        """A fresh running record (the caller settled the old one)."""
        self.running = SequenceRecord(number)
        return self.running

    def end_running(self, limits: SequenceLimits) -> list[SequenceRecord]:
        """The running sequence ended: keep it among the ended ones when it made frames; returns the
        unlabelled ones dropped to stay within ``limits.held``."""
        record = self.running
        record.ended = True
        if record.frame_count == 0 or record.abandoned:
            return []
        self.ended.append(record)
        self.last_ended = record.number
        dropped = []
        while sum(r.label is None for r in self.ended) > limits.held:
            oldest = next(r for r in self.ended if r.label is None)
            self.ended.remove(oldest)
            oldest.dropped = True
            oldest.release(None)
            dropped.append(oldest)
        return dropped

    def settle(self, record: SequenceRecord, correct: bool) -> None:
        """``record`` was scored: count it and let it go."""
        self.scored += 1
        self.correct += correct
        self.recently_scored.append(record.number)
        if record in self.ended:
            self.ended.remove(record)

    def find(self, target: int | str, stream_id: str, begun: int, held: int) -> SequenceRecord:
        """The record a label names: a number, or ``"last"`` (the one that ended last); ``begun`` is
        the stream's sequence counter. Raises ``LabelRefused`` (409) saying why none fits."""
        if target == "last":
            if self.last_ended is None:
                raise LabelRefused(
                    409,
                    f"stream {stream_id!r} has no ended sequence to label; to label the running one "
                    f"say its number ({begun}); it is learned when it ends",
                )
            target = self.last_ended
        assert isinstance(target, int)
        if target == self.running.number and target <= begun and not self.running.abandoned:
            record = self.running
        else:
            record = next((r for r in self.ended if r.number == target), None)
        if record is None:
            if target > begun:
                raise LabelRefused(
                    409, f"sequence {target} of stream {stream_id!r} has not begun (its latest is {begun})"
                )
            if target in self.recently_scored:
                raise LabelRefused(
                    409, f"sequence {target} of stream {stream_id!r} was labelled and scored already"
                )
            raise LabelRefused(
                409,
                f"sequence {target} of stream {stream_id!r} is no longer held: a stream holds its running "
                f"sequence and up to {held} ended ones awaiting a label (NDOT_SEQUENCES_HELD); an older "
                "one, one cut by a reset, or one that made no frame cannot be labelled",
            )
        if record.label is not None:
            raise LabelRefused(
                409, f"sequence {target} of stream {stream_id!r} has its label already ({record.label})"
            )
        return record

    def dropped_records(self) -> list[SequenceRecord]:
        """Everything the book holds, for a stream that closes (counted by the caller)."""
        return [*self.ended, self.running]

    # --- checkpoints ----------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """The book as a checkpoint tree (no tick may be pending: waiting label entries are settled)."""
        return {
            "running": _record_state(self.running),
            "ended": [_record_state(record) for record in self.ended],
            "last_ended": self.last_ended,
            "scored": self.scored,
            "correct": self.correct,
            "learned": self.learned,
            "recently_scored": list(self.recently_scored),
        }


def _record_state(record: SequenceRecord) -> dict[str, Any]:
    frames = None
    if record.frames is not None:
        frames = torch.from_numpy(np.stack(record.frames)) if record.frames else torch.zeros(0)
    return {
        "number": record.number,
        "frames": frames,
        "frame_count": record.frame_count,
        "start_state": None if record.start_state is None else record.start_state.state_dict(),
        "label": record.label,
        "ended": record.ended,
        "unlearnable": record.unlearnable,
        "predicted": record.predicted,
        "probabilities": record.probabilities,
        "model_version": record.model_version,
    }


def _fail(path: str, what: str, value: Any) -> CheckpointError:
    shown = f"a {type(value).__name__}" if isinstance(value, dict | list | torch.Tensor) else repr(value)
    return CheckpointError(f"checkpoint field {path}: {what}, found {shown:.80}")


def _int(path: str, value: Any, lower: int = 0, upper: int = 2**63 - 1, none: bool = False) -> int | None:
    if value is None and none:
        return None
    if type(value) is not int or not lower <= value <= upper:
        raise _fail(path, f"expected an integer in [{lower}, {upper}]" + (" or null" if none else ""), value)
    return value


@dataclass(frozen=True)
class BookShape:
    """What a checkpointed book must fit: the model's frame shape, a state row, the classes, the bounds."""

    frame_shape: tuple[int, ...]
    state_template: dict[str, torch.Tensor]  # learner.new_state(1).state_dict()
    num_classes: int
    limits: SequenceLimits


def book_from_state_dict(tree: Any, path: str, shape: BookShape, begun: int) -> SequenceBook:
    """Rebuild a book from ``state_dict`` output, checking every field (``CheckpointError`` names the
    first bad one). ``begun``: the stream's sequence counter, which no number may pass. Records over
    the running bounds drop their frames; ended ones past ``held`` are dropped, oldest first."""
    if not isinstance(tree, dict):
        raise _fail(path, "expected an object", tree)
    keys = {"running", "ended", "last_ended", "scored", "correct", "learned", "recently_scored"}
    if set(tree) != keys:
        raise _fail(path, f"expected keys {sorted(keys)}", sorted(map(str, tree)))
    running = _record_from(tree["running"], f"{path}.running", shape, begun + 1)
    if not isinstance(tree["ended"], list):
        raise _fail(f"{path}.ended", "expected a list", tree["ended"])
    ended = [_record_from(r, f"{path}.ended.{i}", shape, begun) for i, r in enumerate(tree["ended"])]
    scored = _int(f"{path}.scored", tree["scored"])
    correct = _int(f"{path}.correct", tree["correct"], upper=scored)
    recent = tree["recently_scored"]
    if not isinstance(recent, list) or len(recent) > RECENTLY_SCORED:
        raise _fail(f"{path}.recently_scored", f"expected a list of at most {RECENTLY_SCORED}", recent)
    book = SequenceBook(
        running=running,
        ended=deque(r for r in ended if r.ended),
        last_ended=_int(f"{path}.last_ended", tree["last_ended"], 1, begun, none=True),
        scored=scored,
        correct=correct,
        learned=_int(f"{path}.learned", tree["learned"]),
        recently_scored=deque(
            (_int(f"{path}.recently_scored.{i}", n, 1, begun) for i, n in enumerate(recent)),
            maxlen=RECENTLY_SCORED,
        ),
    )
    while sum(r.label is None for r in book.ended) > shape.limits.held:
        book.ended.remove(next(r for r in book.ended if r.label is None))
    return book


def _record_from(tree: Any, path: str, shape: BookShape, highest: int) -> SequenceRecord:
    keys = {
        "number",
        "frames",
        "frame_count",
        "start_state",
        "label",
        "ended",
        "unlearnable",
        "predicted",
        "probabilities",
        "model_version",
    }
    if not isinstance(tree, dict) or set(tree) != keys:
        raise _fail(path, f"expected an object with keys {sorted(keys)}", tree)
    k = shape.num_classes
    record = SequenceRecord(
        number=_int(f"{path}.number", tree["number"], 1, highest),
        frame_count=_int(f"{path}.frame_count", tree["frame_count"]),
        label=_int(f"{path}.label", tree["label"], 0, k - 1, none=True),
        predicted=_int(f"{path}.predicted", tree["predicted"], 0, k - 1, none=True),
        model_version=_int(f"{path}.model_version", tree["model_version"], none=True),
    )
    if not isinstance(tree["ended"], bool):
        raise _fail(f"{path}.ended", "expected true or false", tree["ended"])
    record.ended = tree["ended"]
    if tree["unlearnable"] not in (None, TOO_LONG, INCOMPLETE):
        raise _fail(
            f"{path}.unlearnable", f"expected null, {TOO_LONG!r} or {INCOMPLETE!r}", tree["unlearnable"]
        )
    probabilities = tree["probabilities"]
    if probabilities is not None and (
        not isinstance(probabilities, list)
        or len(probabilities) != k
        or not all(type(p) in (int, float) and math.isfinite(p) and 0 <= p <= 1 for p in probabilities)
    ):
        raise _fail(f"{path}.probabilities", f"expected null or {k} numbers in [0, 1]", probabilities)
    record.probabilities = probabilities
    frames = tree["frames"]
    if frames is None:
        record.frames, record.unlearnable = None, tree["unlearnable"] or INCOMPLETE
        return record
    if not isinstance(frames, torch.Tensor) or frames.dtype != torch.float32:
        raise _fail(f"{path}.frames", "expected a float32 tensor or null", frames)
    if record.frame_count and tuple(frames.shape) != (record.frame_count, *shape.frame_shape):
        raise _fail(f"{path}.frames", f"expected shape {(record.frame_count, *shape.frame_shape)}", frames)
    if not bool(torch.isfinite(frames).all()):
        raise _fail(f"{path}.frames", "expected finite values", frames)
    start = tree["start_state"]
    state = None
    if start is not None:
        if not isinstance(start, dict) or set(start) != set(shape.state_template):
            raise _fail(f"{path}.start_state", "expected the tensors of one state row", start)
        for name, tensor in start.items():
            like = shape.state_template[name]
            if (
                not isinstance(tensor, torch.Tensor)
                or tensor.shape != like.shape
                or tensor.dtype != like.dtype
            ):
                raise _fail(
                    f"{path}.start_state.{name}", f"expected a {like.dtype} of {tuple(like.shape)}", tensor
                )
        state = NetworkState.from_state_dict(start)
    held = [f.numpy() for f in frames.unbind(0)] if record.frame_count else []
    record.frames = []
    record.frame_count = 0
    record.add(held, shape.limits)
    record.hold_start(state, shape.limits)
    return record
