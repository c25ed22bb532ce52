"""Stream registry: which live stream owns which state row, its framer, counters and age.

The worker holds one ``NetworkState`` with ``capacity`` rows; each live stream owns one row (its
"slot", like a sequence slot of Triton's sequence batcher) for as long as it lives. The registry
hands rows out, frees them when a stream is deleted, expires streams idle longer than a TTL and,
when all rows are taken, evicts the least recently used stream. It holds no tensors: the caller
resets the freed rows of its state.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol


class StreamError(ValueError):
    """A stream request the registry cannot honour (unknown id, conflicting sensor size)."""


class Framer(Protocol):
    """What the registry needs of ``ndot_core.framing.StreamFramer``."""

    late_events: int

    def push(self, events: Any) -> list[Any]: ...
    def flush(self) -> list[Any]: ...
    def state_dict(self) -> dict[str, Any]: ...


#: ``(width, height) -> a fresh framer`` for that sensor.
FramerFactory = Callable[[int, int], Framer]
#: ``framer.state_dict() -> framer`` (``StreamFramer.from_state_dict``).
FramerLoader = Callable[[dict[str, Any]], Framer]


@dataclass
class StreamSlot:
    """One live stream: its state row, framer, queued steps and counters."""

    stream_id: str
    row: int
    width: int
    height: int
    framer: Framer
    last_active_s: float
    steps: int = 0
    sequences: int = 0
    sequence_step: int = 0
    sequence_events: int = 0
    labelled_steps: int = 0
    correct_steps: int = 0
    last_prediction: int | None = None
    last_entry_id: str | None = None
    #: Work not yet run by the batcher, in order: ``("reset", record | None)``, ``("step", PendingStep)``
    #: or ``("end", EndMarker)`` (learn_at=sequence: after a sequence's last frame).
    pending: deque[tuple[str, Any]] = field(default_factory=deque)
    #: learn_at=sequence: the stream's held sequences and prequential counters
    #: (``service.worker.sequences.SequenceBook``; checkpointed apart from ``metadata``).
    book: Any = None

    def info(self) -> dict[str, Any]:
        """The ``StreamInfo`` fields (docs/design.md)."""
        book = self.book
        return {
            "stream_id": self.stream_id,
            "width": self.width,
            "height": self.height,
            "steps": self.steps,
            "sequences": self.sequences,
            "last_prediction": self.last_prediction,
            "online_accuracy": self.correct_steps / self.labelled_steps if self.labelled_steps else None,
            "labelled_steps": self.labelled_steps,
            "prequential_accuracy": None if book is None else book.prequential_accuracy,
            "scored_sequences": 0 if book is None else book.scored,
            "learned_sequences": 0 if book is None else book.learned,
        }

    def metadata(self) -> dict[str, Any]:
        """Everything but the framer, the queue and the book, as JSON-able values (for checkpoints)."""
        return {
            "stream_id": self.stream_id,
            "row": self.row,
            "width": self.width,
            "height": self.height,
            "last_active_s": self.last_active_s,
            "steps": self.steps,
            "sequences": self.sequences,
            "sequence_step": self.sequence_step,
            "sequence_events": self.sequence_events,
            "labelled_steps": self.labelled_steps,
            "correct_steps": self.correct_steps,
            "last_prediction": self.last_prediction,
            "last_entry_id": self.last_entry_id,
        }


class StreamRegistry:
    """``stream_id -> StreamSlot`` over ``capacity`` state rows, least recently used first."""

    def __init__(self, capacity: int, new_framer: FramerFactory) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.new_framer = new_framer
        self._slots: OrderedDict[str, StreamSlot] = OrderedDict()  # oldest activity first
        self._free_rows: list[int] = list(range(capacity - 1, -1, -1))  # pop() gives the lowest

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, stream_id: object) -> bool:
        return stream_id in self._slots

    def __iter__(self) -> Iterator[StreamSlot]:
        return iter(list(self._slots.values()))

    def get(self, stream_id: str) -> StreamSlot | None:
        return self._slots.get(stream_id)

    @property
    def full(self) -> bool:
        return not self._free_rows

    def least_recently_used(self) -> StreamSlot | None:
        return next(iter(self._slots.values()), None)

    def open(
        self, stream_id: str, width: int, height: int, now_s: float
    ) -> tuple[StreamSlot, StreamSlot | None]:
        """The stream's slot, created when new; returns ``(slot, evicted)``.

        Creating a stream when every row is taken evicts the least recently used one and returns
        it (its row is reused: the caller must reset that state row). An existing stream keeps
        its slot; declaring another sensor size for it raises ``StreamError``.
        """
        slot = self._slots.get(stream_id)
        if slot is not None:
            if (slot.width, slot.height) != (width, height):
                raise StreamError(
                    f"stream {stream_id!r} is open with sensor {slot.width}x{slot.height}, "
                    f"not {width}x{height}; delete it first"
                )
            self.touch(slot, now_s)
            return slot, None
        evicted = None
        if self.full:
            evicted = self.least_recently_used()
            assert evicted is not None
            self.remove(evicted.stream_id)
        slot = StreamSlot(
            stream_id, self._free_rows.pop(), width, height, self.new_framer(width, height), now_s
        )
        self._slots[stream_id] = slot
        return slot, evicted

    def touch(self, slot: StreamSlot, now_s: float) -> None:
        """Mark activity: the slot becomes the most recently used."""
        slot.last_active_s = now_s
        self._slots.move_to_end(slot.stream_id)

    def remove(self, stream_id: str) -> StreamSlot | None:
        """Drop a stream and free its row; None when it was not live."""
        slot = self._slots.pop(stream_id, None)
        if slot is not None:
            self._free_rows.append(slot.row)
            self._free_rows.sort(reverse=True)
        return slot

    def renumber(self, slots: list[StreamSlot]) -> None:
        """Give ``slots`` (every live stream, in the new order) rows 0..n-1; the rows above are free."""
        if {slot.stream_id for slot in slots} != set(self._slots) or len(slots) != len(self._slots):
            raise ValueError("renumber needs every live stream exactly once")
        for row, slot in enumerate(slots):
            slot.row = row
        self._free_rows = list(range(self.capacity - 1, len(slots) - 1, -1))

    def expire(self, now_s: float, ttl_s: float) -> list[StreamSlot]:
        """Remove and return the streams idle for more than ``ttl_s`` seconds (with nothing queued)."""
        stale = [s for s in self._slots.values() if now_s - s.last_active_s > ttl_s and not s.pending]
        for slot in stale:
            self.remove(slot.stream_id)
        return stale

    def infos(self) -> list[dict[str, Any]]:
        """``StreamInfo`` of every live stream, sorted by id."""
        return [self._slots[k].info() for k in sorted(self._slots)]

    # --- checkpoints ------------------------------------------------------------------------------

    def rows(self) -> list[int]:
        """State rows of the live streams, in the order ``state_dict`` lists them."""
        return [slot.row for slot in self._slots.values()]

    def state_dict(self) -> dict[str, Any]:
        """Metadata and framer state of every stream, least recently used first (queues must be empty).

        Rows are not saved: the i-th stream owns row i of a state saved as ``state.select(self.rows())``.
        """
        busy = [s.stream_id for s in self._slots.values() if s.pending]
        if busy:
            raise StreamError(f"streams {busy} have queued steps; drain before saving")
        streams = []
        for slot in self._slots.values():
            meta = slot.metadata()
            del meta["row"]
            streams.append({"meta": meta, "framer": slot.framer.state_dict()})
        return {"streams": streams}

    @classmethod
    def from_state_dict(
        cls, state: dict[str, Any], capacity: int, new_framer: FramerFactory, load_framer: FramerLoader
    ) -> tuple[StreamRegistry, list[int]]:
        """Rebuild a registry of ``capacity`` rows; returns ``(registry, rows)``.

        The i-th saved stream gets row ``rows[i]`` (0, 1, ...), so a checkpoint written under another
        ``max_streams`` still loads. Raises ``StreamError`` when the streams do not fit or repeat.
        """
        registry = cls(capacity, new_framer)
        entries = list(state["streams"])
        if len(entries) > capacity:
            raise StreamError(f"checkpoint holds {len(entries)} streams, more than max_streams={capacity}")
        for entry in entries:
            meta = dict(entry["meta"])
            if meta["stream_id"] in registry:
                raise StreamError(f"checkpoint lists stream {meta['stream_id']!r} twice")
            slot = StreamSlot(row=registry._free_rows.pop(), framer=load_framer(entry["framer"]), **meta)
            registry._slots[slot.stream_id] = slot
        return registry, registry.rows()
