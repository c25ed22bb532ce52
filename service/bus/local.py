"""LocalBus: the embedded, in-process bus (the default when no Redis URL is configured).

It mirrors Redis Streams with one consumer group, as a small state machine::

    publish ──► unread (FIFO) ──read──► pending[id] = (entry, consumer, delivered_at) ──ack──► gone
                                          └── claim_stale: idle >= min_idle_ms → new consumer, deliveries+1

    lag = len(unread) + len(pending);   publish raises BusFull when lag >= max_lag
    held_bytes = entry_size of unread + pending;  BusFull when held_bytes + the entry > max_bytes

Acked entries are dropped at once (there is no history to trim), so nothing unread is ever lost,
and the byte bound counts exactly the entries not yet applied (the process's own memory).
Everything runs on one asyncio event loop; blocking reads and reply waits park on ``asyncio.Event``.
Hand-written because no maintained library offers an in-process consumer-group stream with pending
entries, idle-time claiming and bounded lag (``asyncio.Queue`` has no acks, no claims, no ids).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, replace

from service.bus.base import (
    DEAD_LETTERS_KEPT,
    DEFAULT_MAX_BYTES,
    BusEntry,
    BusEntryTooLarge,
    BusFull,
    BusInputError,
    BusUnavailable,
    Value,
    dead_letter_fields,
    entry_id_key,
    entry_size,
    validate_publish,
)

__all__ = ["LocalBus"]

#: Expired values removed per ``set_value`` at most (the rest expire lazily, on read or later sets).
VALUE_SWEEP = 8


@dataclass(slots=True)
class _Pending:
    """A delivered, not yet acked entry: who holds it and since when (``time.monotonic`` s)."""

    entry: BusEntry
    consumer: str
    delivered_at_s: float


def _check_name(what: str, value: str) -> None:
    if not isinstance(value, str) or not value:
        raise BusInputError(f"{what} {value!r} must be a non-empty string")


def _check_shard(shard: int) -> None:
    if shard != 0:
        raise BusInputError(f"shard {shard!r}: the embedded bus has one shard, 0")


def _check_positive(what: str, value: float) -> None:
    if not isinstance(value, int | float) or not value > 0:
        raise BusInputError(f"{what} must be > 0, got {value!r}")


class LocalBus:
    """In-process bus with the ``Bus`` interface and Redis-Streams semantics.

    Args:
        max_lag: bound on ``unread + pending`` entries; ``publish`` raises ``BusFull`` at it.
        max_bytes: bound on the bytes (``entry_size``) of unread + pending entries (``BusFull`` past it).
        retry_after_s: the ``BusFull.retry_after_s`` hint given to producers.
        dead_letter_maxlen: how many dead letters are kept (oldest dropped first).
        clock_ms: wall clock in ms the ids are made of (``time.time_ns() // 10**6``). Ids stay strictly
            increasing when it steps back: the id keeps the last millisecond and counts up its sequence.

    Values: a dict for the values and a heap of ``(expires_at, key)`` for those with a TTL. Reads
    expire lazily; each set removes at most ``VALUE_SWEEP`` expired keys from the heap top; the heap
    is rebuilt when stale records (keys re-set or deleted) outnumber the live keys, so every value
    operation is O(1) amortised (O(log n) for the heap), whatever the number of keys.
    """

    def __init__(
        self,
        max_lag: int = 1_000,
        retry_after_s: float = 1.0,
        dead_letter_maxlen: int = DEAD_LETTERS_KEPT,
        clock_ms: Callable[[], int] | None = None,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if not isinstance(max_lag, int) or max_lag < 1:
            raise ValueError(f"max_lag must be an int >= 1, got {max_lag!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
        if not retry_after_s > 0:
            raise ValueError(f"retry_after_s must be > 0, got {retry_after_s!r}")
        self.max_lag = max_lag
        self.max_bytes = max_bytes
        self.shards = 1  # one process: nothing to spread (see service.bus.shards)
        self.owned = [0]
        self.held_bytes = 0  # entry_size of the unread and pending entries
        self.retry_after_s = float(retry_after_s)
        self._closed = False
        self._last_id = (0, 0)
        self._unread: deque[BusEntry] = deque()
        self._pending: dict[str, _Pending] = {}  # insertion order == id order
        self._arrived = asyncio.Event()  # replaced on every publish; readers wait on the one they saw
        self._dead: deque[BusEntry] = deque(maxlen=dead_letter_maxlen)
        self._replies: dict[str, deque[tuple[float, bytes]]] = {}  # request id -> (expires_at_s, payload)
        self._reply_expiry: list[tuple[float, str]] = []  # heap of (expires_at_s, request id)
        self._reply_ready: dict[str, asyncio.Event] = {}
        self._reply_waiters: dict[str, int] = {}
        self._values: dict[str, tuple[bytes, float | None]] = {}  # key -> (value, expires_at_s)
        self._value_expiry: list[
            tuple[float, str]
        ] = []  # heap of (expires_at_s, key); may hold stale records
        self._clock_ms = clock_ms or (lambda: time.time_ns() // 1_000_000)

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """(Re)open the bus on the running event loop; entries, pending and values are kept."""
        self._closed = False
        self._arrived = asyncio.Event()  # an Event binds to the loop that first waits on it

    async def close(self) -> None:
        """Close the bus: blocked readers return, later calls raise ``BusUnavailable``."""
        self._closed = True
        self._wake_readers()
        for event in self._reply_ready.values():
            event.set()

    async def ping(self) -> bool:
        return not self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise BusUnavailable("the local bus is closed")

    # -- the stream --------------------------------------------------------------------------
    def _next_id(self) -> str:
        now_ms = self._clock_ms()
        last_ms, last_seq = self._last_id
        self._last_id = (now_ms, 0) if now_ms > last_ms else (last_ms, last_seq + 1)
        return f"{self._last_id[0]}-{self._last_id[1]}"

    def _wake_readers(self) -> None:
        self._arrived.set()
        self._arrived = asyncio.Event()

    async def publish(self, kind: str, stream_id: str, fields: dict[str, bytes]) -> str:
        checked = validate_publish(kind, stream_id, fields)
        self._check_open()
        size = entry_size(kind, stream_id, checked)
        if size > self.max_bytes:
            raise BusEntryTooLarge(size, self.max_bytes)
        lag = len(self._unread) + len(self._pending)
        if lag >= self.max_lag:
            raise BusFull(self.retry_after_s, lag=lag, max_lag=self.max_lag)
        if self.held_bytes + size > self.max_bytes:
            raise BusFull(
                self.retry_after_s, held_bytes=self.held_bytes, max_bytes=self.max_bytes, entry_bytes=size
            )
        entry = BusEntry(id=self._next_id(), kind=kind, stream_id=stream_id, fields=checked, deliveries=0)
        self._unread.append(entry)
        self.held_bytes += size
        self._wake_readers()
        return entry.id

    def _deliver(self, consumer: str, count: int) -> list[BusEntry]:
        now = time.monotonic()
        delivered = []
        while self._unread and len(delivered) < count:
            entry = self._unread.popleft()
            entry = replace(entry, deliveries=entry.deliveries + 1)
            self._pending[entry.id] = _Pending(entry, consumer, now)
            delivered.append(entry)
        return delivered

    async def read(self, consumer: str, count: int, block_ms: int) -> list[BusEntry]:
        """Up to ``count`` new entries for ``consumer``; waits up to ``block_ms`` (<= 0: no wait)."""
        _check_name("consumer", consumer)
        _check_positive("count", count)
        self._check_open()
        deadline = time.monotonic() + max(block_ms, 0) / 1000
        while True:
            entries = self._deliver(consumer, count)
            remaining = deadline - time.monotonic()
            if entries or remaining <= 0 or self._closed:
                return entries
            arrived = self._arrived
            try:
                await asyncio.wait_for(arrived.wait(), remaining)
            except TimeoutError:
                return self._deliver(consumer, count)

    async def ack(self, ids: list[str]) -> None:
        for entry_id in ids:
            entry_id_key(entry_id)
        self._check_open()
        for entry_id in ids:
            self._release(self._pending.pop(entry_id, None))

    def _release(self, record: _Pending | None) -> None:
        """An entry leaves the bus (acked or dead-lettered): its bytes no longer count."""
        if record is not None:
            entry = record.entry
            self.held_bytes -= entry_size(entry.kind, entry.stream_id, entry.fields)

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[BusEntry]:
        """Entries pending for ``min_idle_ms`` or longer (any consumer), now owned by ``consumer``."""
        _check_name("consumer", consumer)
        _check_positive("count", count)
        self._check_open()
        now = time.monotonic()
        claimed = []
        for record in self._pending.values():
            if len(claimed) >= count:
                break
            if (now - record.delivered_at_s) * 1000 >= min_idle_ms:
                record.entry = replace(record.entry, deliveries=record.entry.deliveries + 1)
                record.consumer = consumer
                record.delivered_at_s = now
                claimed.append(record.entry)
        return claimed

    async def replay(self, after_id: str | None, count: int, shard: int = 0) -> list[BusEntry]:
        """Up to ``count`` held entries (pending or unread) with ids above ``after_id``, in id order.

        Acked entries are dropped at once here, so the history is only what is still held; the
        embedded bus lives and dies with its process, so there is no older history to recover.
        The embedded bus has one shard (0): it serves one process, so there is nothing to spread.
        """
        _check_positive("count", count)
        _check_shard(shard)
        self._check_open()
        floor = (-1, -1) if after_id is None else entry_id_key(after_id)
        held = [p.entry for p in self._pending.values()] + list(self._unread)
        held = sorted((e for e in held if entry_id_key(e.id) > floor), key=lambda e: entry_id_key(e.id))
        return [replace(e, deliveries=0) for e in held[:count]]

    async def newest_id(self, shard: int = 0) -> str | None:
        """The newest id handed out (entries and dead letters); None before the first."""
        _check_shard(shard)
        self._check_open()
        return None if self._last_id == (0, 0) else f"{self._last_id[0]}-{self._last_id[1]}"

    async def pending_count(self) -> int:
        self._check_open()
        return len(self._pending)

    async def lag(self) -> int:
        self._check_open()
        return len(self._unread) + len(self._pending)

    async def dead_letter(self, entry: BusEntry, error: str) -> None:
        """File ``entry`` with ``error`` (fields gain ``error`` and ``original_id``), then ack it."""
        entry_id_key(entry.id)
        self._check_open()
        fields = dead_letter_fields(entry.fields, error, entry.id)
        self._dead.append(BusEntry(self._next_id(), entry.kind, entry.stream_id, fields))
        self._release(self._pending.pop(entry.id, None))

    async def dead_letters(self, count: int = 100) -> list[BusEntry]:
        """The oldest ``count`` dead letters still kept, oldest first."""
        self._check_open()
        return list(self._dead)[:count]

    # -- replies -----------------------------------------------------------------------------
    def _purge_replies(self, now: float) -> None:
        while self._reply_expiry and self._reply_expiry[0][0] <= now:
            _, request_id = heapq.heappop(self._reply_expiry)
            self._pop_reply(request_id, now, take=False)

    def _pop_reply(self, request_id: str, now: float, take: bool = True) -> bytes | None:
        queue = self._replies.get(request_id)
        if queue is None:
            return None
        while queue and queue[0][0] <= now:
            queue.popleft()
        payload = queue.popleft()[1] if take and queue else None
        if not queue:
            del self._replies[request_id]
        return payload

    async def put_reply(self, request_id: str, payload: bytes, ttl_s: float) -> None:
        _check_name("request_id", request_id)
        _check_positive("ttl_s", ttl_s)
        self._check_open()
        now = time.monotonic()
        self._purge_replies(now)
        self._replies.setdefault(request_id, deque()).append((now + ttl_s, bytes(payload)))
        heapq.heappush(self._reply_expiry, (now + ttl_s, request_id))
        ready = self._reply_ready.get(request_id)
        if ready is not None:
            ready.set()

    async def wait_reply(self, request_id: str, timeout_s: float) -> bytes | None:
        """The next reply for ``request_id``, or ``None`` after ``timeout_s`` seconds."""
        _check_name("request_id", request_id)
        self._check_open()
        deadline = time.monotonic() + max(timeout_s, 0)
        ready = self._reply_ready.setdefault(request_id, asyncio.Event())
        self._reply_waiters[request_id] = self._reply_waiters.get(request_id, 0) + 1
        try:
            while True:
                now = time.monotonic()
                payload = self._pop_reply(request_id, now)
                if payload is not None:
                    return payload
                self._check_open()
                if now >= deadline:
                    return None
                ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(ready.wait(), deadline - now)
        finally:
            self._reply_waiters[request_id] -= 1
            if not self._reply_waiters[request_id]:
                del self._reply_waiters[request_id]
                del self._reply_ready[request_id]

    # -- values ------------------------------------------------------------------------------
    def _sweep_values(self, now: float) -> None:
        """Remove at most ``VALUE_SWEEP`` expired keys; rebuild the heap when mostly stale."""
        heap = self._value_expiry
        for _ in range(VALUE_SWEEP):
            if not heap or heap[0][0] > now:
                break
            _, key = heapq.heappop(heap)
            item = self._values.get(key)
            if item is not None and item[1] is not None and item[1] <= now:
                del self._values[key]
        if len(heap) > 2 * len(self._values) + 64:
            self._value_expiry = [(item[1], key) for key, item in self._values.items() if item[1] is not None]
            heapq.heapify(self._value_expiry)

    async def set_value(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        _check_name("key", key)
        if ttl_s is not None:
            _check_positive("ttl_s", ttl_s)
        self._check_open()
        now = time.monotonic()
        self._sweep_values(now)
        expires_at = None if ttl_s is None else now + ttl_s
        self._values[key] = (bytes(value), expires_at)
        if expires_at is not None:
            heapq.heappush(self._value_expiry, (expires_at, key))

    async def get_value(self, key: str) -> bytes | None:
        _check_name("key", key)
        self._check_open()
        item = self._values.get(key)
        if item is None:
            return None
        if item[1] is not None and item[1] <= time.monotonic():
            del self._values[key]
            return None
        return item[0]

    async def send_round(
        self, values: list[Value], replies: list[tuple[str, bytes]], reply_ttl_s: float, acks: list[str]
    ) -> None:
        """A worker round's writes, in order (in process there is no round trip to save)."""
        for key, value, ttl_s in values:
            if value is None:
                await self.delete_value(key)
            else:
                await self.set_value(key, value, ttl_s)
        for request_id, payload in replies:
            await self.put_reply(request_id, payload, reply_ttl_s)
        await self.ack(acks)

    async def get_values(self, keys: list[str]) -> list[bytes | None]:
        return [await self.get_value(key) for key in keys]

    async def delete_value(self, key: str) -> None:
        _check_name("key", key)
        self._check_open()
        self._values.pop(key, None)  # its heap record, if any, goes stale
