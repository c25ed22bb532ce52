"""The stream bus: the one queue between the API (producer) and the worker (consumer group).

Semantics shared by both implementations (`LocalBus` in-process, `RedisStreamBus` over Redis Streams):

* ``publish`` appends an entry and returns its id ``"<ms>-<seq>"``; ids increase strictly, so
  ``entry_id_key(a) < entry_id_key(b)`` iff ``a`` was published before ``b``.
* One consumer group: ``read`` hands each new entry to exactly one consumer and keeps it *pending*
  until ``ack``; ``claim_stale`` moves entries pending longer than ``min_idle_ms`` (a dead consumer's)
  to another consumer, counting deliveries in ``BusEntry.deliveries``.
* Backpressure: with ``lag = unread + pending``, ``publish`` raises ``BusFull`` when
  ``lag >= max_lag`` instead of appending, so trimming (``maxlen``) never drops an unread entry.
  The bytes held are bounded too (``max_bytes``, entries measured by ``entry_size``): applied
  entries make room first; while unread and pending ones fill the bound, ``publish`` raises
  ``BusFull``; an entry larger than the whole bound raises ``BusEntryTooLarge``.
* ``dead_letter`` files an entry with its error in a side stream and acks the original.
* ``replay(after_id, count, shard)`` reads one shard's history after an id, whatever the entries'
  delivery state: a worker restored from a checkpoint re-applies what it had applied (and acked) after it.
* ``newest_id(shard)`` is the newest id the bus has handed out in a shard (``None`` before the first):
  a restored checkpoint whose watermark lies beyond it was not written against this bus's history.
* Shards (``service.bus.shards``): the Redis bus can spread streams over ``shards`` Redis streams
  (``crc32(stream_id) % shards``); ids then name their shard (``"17/<ms>-<seq>"``) and ``read``,
  ``ack``, ``claim_stale``, ``lag`` cover the ``owned`` shards. The embedded bus has one shard.
* Replies travel per request id (``put_reply`` / ``wait_reply``); small values (heartbeat, status,
  sensor sizes) live under plain keys with an optional TTL; ``delete_value`` removes a key (a
  closed stream leaves nothing behind). Every value operation is O(1) in the number of keys.
* ``get_values(keys)``: several values in one round trip (Redis: MGET), ``None`` for a missing one.
* ``send_round(values, replies, reply_ttl_s, acks)``: a worker round's writes in this order, in one
  round trip where the bus can (Redis: one script). Not atomic: after a ``BusError`` the caller
  sends the whole round again (values and acks are idempotent; a reply pushed twice is popped
  once, and its copy expires with the reply TTL).
* A lost connection surfaces as ``BusUnavailable`` from every method (``ping`` answers ``False``);
  the bus reconnects by itself on the next call once the server is back. A server that is up but
  refuses the command for now (Redis OOM, MISCONF, READONLY, ...) raises ``BusRefused``, a
  ``BusUnavailable`` naming the ``reason``; any other error answer raises ``BusCommandError``.
  ``BusError.kind`` (``unreachable``, ``refused``, ``error``) labels ``ndot_bus_errors_total``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

__all__ = [
    "DEFAULT_MAX_BYTES",
    "REFUSAL_REASONS",
    "RESERVED_FIELDS",
    "MALFORMED_KIND",
    "Bus",
    "BusCommandError",
    "BusEntry",
    "BusEntryTooLarge",
    "BusError",
    "BusFenced",
    "BusFull",
    "BusInputError",
    "BusRefused",
    "BusUnavailable",
    "entry_id_key",
    "entry_size",
    "validate_publish",
]

#: Field names the bus itself writes into an entry (envelope and dead-letter record).
RESERVED_FIELDS = frozenset({"kind", "stream_id", "error", "original_id"})
#: ``kind`` given to a stream entry that lacks the bus envelope (written by something else).
MALFORMED_KIND = "malformed"

#: Bytes of entries a bus holds at most by default (``NDOT_BUS_MAX_BYTES``; see docs/reliability.md).
DEFAULT_MAX_BYTES = 512 * 1024 * 1024
#: Why a server that is up refuses a command for now (the first word of Redis's error answer).
REFUSAL_REASONS = (
    "OOM",  # used memory is over maxmemory (noeviction)
    "MISCONF",  # an RDB snapshot or AOF write failed: writes stop until one succeeds
    "READONLY",  # a replica
    "LOADING",  # loading its data set at start
    "BUSY",  # a script or function runs past busy-reply-threshold
    "NOREPLICAS",  # fewer good replicas than min-replicas-to-write
    "MASTERDOWN",  # a replica lost its master and serves no stale data
    "TRYAGAIN",  # cluster: slot migrating
    "CLUSTERDOWN",  # cluster: not all slots served
)

_KIND_RE = re.compile(r"[a-z][a-z0-9_]{0,31}")
_ENTRY_ID_RE = re.compile(r"(\d+)-(\d+)")


class BusError(Exception):
    """Base of every error the bus raises; ``kind`` says which (the label of ``ndot_bus_errors_total``)."""

    kind = "error"

    @property
    def summary(self) -> str:
        """What went wrong in a few words, with no server named: ``kind``, and the reason or code if any."""
        return self.kind


class BusFull(BusError):
    """Backpressure: the group's lag reached ``max_lag``, or unapplied entries fill ``max_bytes``.

    Retry after ``retry_after_s`` seconds. ``lag``/``max_lag`` are set when the lag bound refused,
    ``held_bytes``/``max_bytes``/``entry_bytes`` when the byte bound did.
    """

    kind = "full"

    def __init__(
        self,
        retry_after_s: float,
        lag: int | None = None,
        max_lag: int | None = None,
        *,
        held_bytes: int | None = None,
        max_bytes: int | None = None,
        entry_bytes: int | None = None,
    ) -> None:
        if max_bytes is not None:
            reason = (
                f"bus holds {held_bytes} bytes of entries not yet applied; {entry_bytes} more would pass "
                f"the bound max_bytes={max_bytes}"
            )
        else:
            reason = f"bus lag {lag} reached the bound max_lag={max_lag}"
        super().__init__(f"{reason}; retry after {retry_after_s:g} s")
        self.retry_after_s = retry_after_s
        self.lag = lag
        self.max_lag = max_lag
        self.held_bytes = held_bytes
        self.max_bytes = max_bytes
        self.entry_bytes = entry_bytes


class BusUnavailable(BusError):
    """The bus backend cannot be reached (connection refused, reset or timed out), or refuses for now."""

    kind = "unreachable"


class BusRefused(BusUnavailable):
    """The backend is up but refuses the command for now; ``reason`` is one of ``REFUSAL_REASONS``.

    A ``BusUnavailable``: whoever handles an outage (503 + Retry-After, the worker's retries)
    handles this too. The message names the server for the logs; ``reason`` alone is for clients.
    """

    kind = "refused"

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason

    @property
    def summary(self) -> str:
        return f"refused ({self.reason})"


class BusCommandError(BusError):
    """The backend answered a command with an error the bus does not expect (``WRONGTYPE``, ``NOPERM``, ...).

    ``code`` is the error's first word (``ERR`` when it has none). Retrying alone does not help:
    someone changed the bus's keys, permissions or server. The API answers 500 naming ``code``.
    """

    kind = "error"

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    @property
    def summary(self) -> str:
        return f"error ({self.code})"


class BusFenced(BusError):
    """A newer worker group owns the shard (its fencing token is higher): this process is a zombie.

    Not retried: a worker that gets it stops (its acks would settle entries its successor owns).
    """

    kind = "fenced"


class BusInputError(BusError, ValueError):
    """A caller passed a malformed argument (kind, stream id, field name or value, entry id)."""

    kind = "input"


class BusEntryTooLarge(BusInputError):
    """An entry larger than the bus's whole byte bound: it could never be published (the API: 413)."""

    def __init__(self, entry_bytes: int, max_bytes: int) -> None:
        super().__init__(
            f"entry of {entry_bytes} bytes is larger than the bus's whole bound max_bytes={max_bytes}"
        )
        self.entry_bytes = entry_bytes
        self.max_bytes = max_bytes


@dataclass(frozen=True, slots=True)
class BusEntry:
    """One bus entry: its id, what it is (``kind``), which stream it belongs to, and its payload.

    ``deliveries`` counts how often the group handed it out (1 on first read, +1 per claim).
    """

    id: str
    kind: str
    stream_id: str
    fields: dict[str, bytes] = field(default_factory=dict)
    deliveries: int = 1


def entry_id_key(entry_id: str) -> tuple[int, int]:
    """Sort key of an entry id ``"<ms>-<seq>"``: ``(ms, seq)``; raises ``BusInputError`` if malformed."""
    match = _ENTRY_ID_RE.fullmatch(entry_id) if isinstance(entry_id, str) else None
    if match is None:
        raise BusInputError(f"entry id {entry_id!r} is not of the form '<ms>-<seq>'")
    return int(match.group(1)), int(match.group(2))


def entry_size(kind: str, stream_id: str, fields: Mapping[str, bytes]) -> int:
    """Bytes an entry counts against ``max_bytes``: its field names and values, the envelope included.

    ``len("kind") + len(kind) + len("stream_id") + len(stream_id) + sum(len(name) + len(value))``
    (names and strings as UTF-8); the Redis bus counts the same bytes in its publish script.
    """
    size = len(b"kind") + len(kind.encode()) + len(b"stream_id") + len(stream_id.encode())
    return size + sum(len(name.encode()) + len(value) for name, value in fields.items())


#: Dead letters kept (oldest dropped first) and the most bytes one keeps of its fields: together they
#: bound what dead letters can make the bus hold (10 000 x 16 KiB = 160 MiB at most).
DEAD_LETTERS_KEPT = 10_000
DEAD_LETTER_FIELD_BYTES = 16 * 1024


def dead_letter_fields(entry_fields: Mapping[str, bytes], error: str, original_id: str) -> dict[str, bytes]:
    """A dead letter's fields: the entry's, with ``error`` and ``original_id``; a field over
    ``DEAD_LETTER_FIELD_BYTES`` is kept as its first bytes, and ``truncated`` names it with its size."""
    fields: dict[str, bytes] = {}
    truncated = []
    for name, value in entry_fields.items():
        if len(value) > DEAD_LETTER_FIELD_BYTES:
            truncated.append(f"{name}={len(value)}")
            value = value[:DEAD_LETTER_FIELD_BYTES]
        fields[name] = bytes(value)
    if truncated:
        fields["truncated"] = ",".join(truncated).encode()
    fields["error"] = str(error).encode()[:DEAD_LETTER_FIELD_BYTES]
    fields["original_id"] = original_id.encode()
    return fields


def validate_publish(kind: str, stream_id: str, fields: Mapping[str, Any]) -> dict[str, bytes]:
    """Check a publish request; returns the fields as ``bytes`` values (bytes-likes are copied)."""
    if not isinstance(kind, str) or not _KIND_RE.fullmatch(kind):
        raise BusInputError(f"kind {kind!r} must match {_KIND_RE.pattern}")
    if not isinstance(stream_id, str) or not stream_id:
        raise BusInputError(f"stream_id {stream_id!r} must be a non-empty string")
    if not isinstance(fields, Mapping):
        raise BusInputError(f"fields must be a mapping of str to bytes, got {type(fields).__name__}")
    checked: dict[str, bytes] = {}
    for name, value in fields.items():
        if not isinstance(name, str) or not name:
            raise BusInputError(f"field name {name!r} must be a non-empty string")
        if name in RESERVED_FIELDS:
            raise BusInputError(f"field name {name!r} is reserved by the bus ({sorted(RESERVED_FIELDS)})")
        if isinstance(value, bytes):
            checked[name] = value
        elif isinstance(value, bytearray | memoryview):
            checked[name] = bytes(value)
        else:
            raise BusInputError(f"field {name!r} must be bytes, got {type(value).__name__}")
    return checked


#: A value write of ``Bus.send_round``: ``(key, value, ttl_s)``; ``value`` None deletes the key.
Value = tuple[str, bytes | None, float | None]


@runtime_checkable
class Bus(Protocol):
    """What the API and the worker use; see the module docstring for the semantics."""

    shards: int  # shard streams (``service.bus.shards``); 1 = unsharded
    owned: list[int]  # the shards this process reads, acks, claims and replays

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def ping(self) -> bool: ...
    async def publish(self, kind: str, stream_id: str, fields: dict[str, bytes]) -> str: ...
    async def read(self, consumer: str, count: int, block_ms: int) -> list[BusEntry]: ...
    async def ack(self, ids: list[str]) -> None: ...
    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[BusEntry]: ...
    async def replay(self, after_id: str | None, count: int, shard: int = 0) -> list[BusEntry]: ...
    async def newest_id(self, shard: int = 0) -> str | None: ...
    async def pending_count(self) -> int: ...
    async def lag(self) -> int: ...
    async def dead_letter(self, entry: BusEntry, error: str) -> None: ...
    async def dead_letters(self, count: int = 100) -> list[BusEntry]: ...
    async def put_reply(self, request_id: str, payload: bytes, ttl_s: float) -> None: ...
    async def wait_reply(self, request_id: str, timeout_s: float) -> bytes | None: ...
    async def set_value(self, key: str, value: bytes, ttl_s: float | None = None) -> None: ...
    async def get_value(self, key: str) -> bytes | None: ...
    async def delete_value(self, key: str) -> None: ...
    async def get_values(self, keys: list[str]) -> list[bytes | None]: ...
    async def send_round(
        self, values: list[Value], replies: list[tuple[str, bytes]], reply_ttl_s: float, acks: list[str]
    ) -> None: ...
