"""RedisStreamBus: the ``Bus`` over Redis Streams and one consumer group (``redis.asyncio``).

One Redis stream per shard (``service.bus.shards``; ``s`` below is the entry's shard's key, and a
read spans every owned shard), the shard layout and fencing in ``redis_shards``. Redis commands
per method::

    publish      EVALSHA publish.lua: lag and byte bounds, trimming of applied entries, XADD (redis_lua.py)
    read         XREADGROUP GROUP g c COUNT n BLOCK ms STREAMS s >
    ack          XACK s g id...
    claim_stale  XAUTOCLAIM s g c min_idle cursor COUNT n (loop on the cursor) + XPENDING for deliveries
    dead_letter  MULTI XADD s:dead … ; XACK s g id EXEC     (both in redis_pending.PendingEntries)
    replay       XRANGE s (after_id + COUNT n                      (history, read or not, acked or not)
    put_reply    MULTI RPUSH s:reply:<id> payload ; PEXPIRE EXEC        wait_reply  BLPOP s:reply:<id> t
    set_value    SET s:value:<key> v PX ttl            get_value   GET         delete_value   DEL
    newest_id    XINFO STREAM s → last-generated-id (survives trimming; 0-0 / no stream = None)
    send_round   EVALSHA round.lua: a round's SET / DEL, RPUSH + PEXPIRE, then XACK per shard (redis_round)

Backpressure is exact: the lag check, the byte check and the XADD run in one Lua script,
atomically on the server, so ``unread + pending`` never exceeds ``max_lag`` (slack 0) and the
stream's entries never pass ``max_bytes``, however many API processes publish, at one round trip
per publish. The script drops only applied entries (acked: at or below the group's last delivered
id and not pending), oldest first, when the stream would pass ``maxlen`` entries or ``max_bytes``;
an unread or pending entry is never dropped (``max_bytes`` then refuses with ``BusFull``). A byte
counter beside the stream (``redis_lua.bytes_key``) follows every entry added or dropped. A pending
entry trimmed by something else is reported by XAUTOCLAIM (``lost_pending``).

Blocking reply waits (BLPOP) use their own connection pool (``max_reply_waiters`` connections), so
hundreds of waiting requests never starve publish, read or ack on the main pool. The group is created
on ``start`` and re-created on demand (after a Redis restart without persistence).

Time bounds and errors: every call runs under one ``asyncio.timeout(command_timeout_s + its blocking
time)`` (``_guard``), which also turns Redis's failures into bus errors (``redis_errors.bus_error``:
``BusUnavailable``; ``BusRefused`` for OOM, MISCONF, READONLY, ...; else ``BusCommandError``). The sockets themselves have no read timeout
(``socket_timeout=None``): redis-py's default of 5 s would cut a blocking XREADGROUP / BLPOP longer
than that into a spurious ``BusUnavailable``; the guard still turns a dead or silent server into
``BusUnavailable`` in time.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError, ResponseError

from service.bus.base import (
    DEFAULT_MAX_BYTES,
    BusEntry,
    BusEntryTooLarge,
    BusError,
    BusFull,
    BusInputError,
    entry_id_key,
    entry_size,
    validate_publish,
)
from service.bus.redis_entries import as_text, check_consumer
from service.bus.redis_errors import bus_error, redacted
from service.bus.redis_lua import (
    BYTES_FULL,
    CLAIM_SHARD_LUA,
    FENCED_ACK_LUA,
    LAG_FULL,
    PUBLISH_LUA,
    ROUND_LUA,
    TOO_LARGE,
    bytes_key,
)
from service.bus.redis_pending import PendingEntries
from service.bus.redis_shards import ShardLayout
from service.bus.redis_values import RepliesAndValues
from service.bus.shards import check_shards, qualify, shard_of

#: How long past its block a read may take before the server is woken (``RedisStreamBus._read_on_time``).
WAKE_MARGIN_S = 0.001

__all__ = ["RedisStreamBus"]


class RedisStreamBus(ShardLayout, PendingEntries, RepliesAndValues):
    """The ``Bus`` over Redis Streams.

    Args:
        url: ``redis://host:port/db``.
        stream: stream key; dead letters, replies and values live under ``<stream>:dead``,
            ``<stream>:reply:<id>`` and ``<stream>:value:<key>``, the byte counter under ``bytes_key``.
        group: the consumer group's name.
        max_lag: bound on ``unread + pending``; ``publish`` raises ``BusFull`` at it.
        maxlen: stream length kept, applied entries trimmed first (default and minimum ``2 * max_lag``).
        max_bytes: bound on the bytes of the stream's entries (``entry_size``); applied entries are
            trimmed to make room, ``BusFull`` while unapplied ones fill it.
        retry_after_s: the ``BusFull.retry_after_s`` hint.
        max_connections: main pool size (publish, read, ack, ...); callers beyond it wait.
        max_reply_waiters: reply pool size, i.e. concurrent ``wait_reply`` calls served at once.
        connect_timeout_s: TCP connect timeout.
        command_timeout_s: bound on one command, on top of its own blocking time.
        shards: how many shard streams (``service.bus.shards``); 1 = the one stream ``stream`` of old.
            ``max_lag``, ``maxlen`` and ``max_bytes`` bound each shard. ``start`` records the count on
            Redis (``<stream>:shards``) and refuses a process configured with another one (its entries
            would go to streams nobody reads); ``None`` takes the recorded count (1 if none), for tools.
        owned: the shards this process reads, acks, claims and replays (default: all); ``publish``
            writes to any shard.
    """

    def __init__(
        self,
        url: str,
        stream: str = "ndot:events",
        group: str = "ndot-workers",
        max_lag: int = 1_000,
        maxlen: int | None = None,
        retry_after_s: float = 1.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
        max_connections: int = 64,
        max_reply_waiters: int = 1024,
        connect_timeout_s: float = 1.0,
        command_timeout_s: float = 5.0,
        shards: int | None = 1,
        owned: list[int] | None = None,
    ) -> None:
        if not isinstance(max_lag, int) or max_lag < 1:
            raise ValueError(f"max_lag must be an int >= 1, got {max_lag!r}")
        maxlen = 2 * max_lag if maxlen is None else maxlen
        if not isinstance(maxlen, int) or maxlen < 2 * max_lag:
            raise ValueError(
                f"maxlen={maxlen!r} must be >= 2 * max_lag = {2 * max_lag}, so trimming never reaches unread entries"
            )
        if not retry_after_s > 0:
            raise ValueError(f"retry_after_s must be > 0, got {retry_after_s!r}")
        if not isinstance(max_bytes, int) or max_bytes < 1:
            raise ValueError(f"max_bytes must be an int >= 1, got {max_bytes!r}")
        if not stream or not group:
            raise ValueError(f"stream {stream!r} and group {group!r} must be non-empty")
        self.stream = stream
        self.layout_key = f"{stream}:shards"
        self._adopt_layout = shards is None
        self._layout_checked = False
        self._set_layout(1 if shards is None else check_shards(shards))
        self._wanted_owned = owned
        if owned is not None:
            self.own(owned)
        self.group = group
        self.max_lag = max_lag
        self.maxlen = maxlen
        self.max_bytes = max_bytes
        self.retry_after_s = float(retry_after_s)
        self.dead_stream = f"{stream}:dead"  # (shard 0's; see _dead_key)
        self.bytes_key = bytes_key(self.shard_keys[0])
        self.lost_pending = 0  # pending entries found trimmed by XAUTOCLAIM (see module docstring)
        self._command_timeout_s = command_timeout_s
        self._where = redacted(url)  # logs name the server, never its credentials
        options: dict[str, Any] = {
            "decode_responses": False,
            "protocol": 2,
            "socket_connect_timeout": connect_timeout_s,
            # No socket read timeout: blocking commands may wait longer than redis-py's default 5 s;
            # ``_guard`` bounds every call (command time + its blocking time) instead.
            "socket_timeout": None,
            # No retries: fail fast into BusUnavailable; the pool replaces stale sockets on checkout.
            "retry": Retry(NoBackoff(), 0),
            "timeout": command_timeout_s,  # wait for a free pooled connection
        }
        self._redis = Redis.from_pool(
            BlockingConnectionPool.from_url(url, max_connections=max_connections, **options)
        )
        self._replies = Redis.from_pool(
            BlockingConnectionPool.from_url(url, max_connections=max_reply_waiters, **options)
        )
        self._publish_script = self._redis.register_script(PUBLISH_LUA)
        self._claim_script = self._redis.register_script(CLAIM_SHARD_LUA)
        self._fenced_ack_script = self._redis.register_script(FENCED_ACK_LUA)
        self._round_script = self._redis.register_script(ROUND_LUA)

    # -- plumbing ----------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def _guard(self, blocking_s: float = 0.0) -> AsyncIterator[None]:
        """Bound a call in time; Redis's failures become bus errors (``redis_errors.bus_error``)."""
        try:
            async with asyncio.timeout(self._command_timeout_s + blocking_s):
                yield
        except (RedisError, OSError) as exc:  # OSError covers TimeoutError
            error = bus_error(exc, self._where)
            if error is None:
                raise
            raise error from exc

    async def _ensure_group(self, shard: int | None = None) -> None:
        for key in self.shard_keys if shard is None else [self.shard_keys[shard]]:
            try:
                await self._redis.xgroup_create(key, self.group, id="0", mkstream=True)
            except ResponseError as exc:
                if "BUSYGROUP" not in str(exc):
                    raise

    async def _group_info(self, shard: int = 0) -> dict[str, Any] | None:
        try:
            rows = await self._redis.xinfo_groups(self.shard_keys[shard])
        except ResponseError as exc:
            if "no such key" in str(exc):
                return None
            raise
        for row in rows:
            info = {as_text(k): v for k, v in row.items()}
            if as_text(info["name"]) == self.group:
                return info
        return None

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        """Create the stream and group (idempotent); ``BusUnavailable`` if Redis is down or refuses.

        Optional: publish and read re-create the group themselves when it is missing.
        """
        await self._check_layout()
        async with self._guard():
            await self._ensure_group()

    async def close(self) -> None:
        await self._redis.aclose()
        await self._replies.aclose()

    async def ping(self) -> bool:
        try:
            async with self._guard():
                return bool(await self._redis.ping())
        except BusError:  # unreachable, or refusing even PING (MISCONF, LOADING)
            return False

    # -- the stream --------------------------------------------------------------------------
    async def publish(self, kind: str, stream_id: str, fields: dict[str, bytes]) -> str:
        await self._check_layout()
        checked = validate_publish(kind, stream_id, fields)
        size = entry_size(kind, stream_id, checked)
        if size > self.max_bytes:
            raise BusEntryTooLarge(size, self.max_bytes)
        shard = shard_of(stream_id, self.shards)
        key = self.shard_keys[shard]
        args: list[Any] = [self.group, self.max_lag, self.maxlen, self.max_bytes]
        args += [b"kind", kind, b"stream_id", stream_id]
        for name, value in checked.items():
            args += [name, value]
        async with self._guard():
            outcome, value = await self._publish_script(keys=[key, bytes_key(key)], args=args)
        if outcome == LAG_FULL:
            raise BusFull(self.retry_after_s, lag=int(value), max_lag=self.max_lag)
        if outcome == BYTES_FULL:
            raise BusFull(
                self.retry_after_s, held_bytes=int(value), max_bytes=self.max_bytes, entry_bytes=size
            )
        if outcome == TOO_LARGE:
            raise BusEntryTooLarge(int(value), self.max_bytes)
        return qualify(shard, as_text(value), self.shards)

    async def read(self, consumer: str, count: int, block_ms: int) -> list[BusEntry]:
        """Up to ``count`` new entries for ``consumer`` from the owned shards; waits up to ``block_ms``.

        One XREADGROUP over every owned shard's stream (``block_ms`` <= 0: no wait); ``count`` bounds
        each shard's share, and the whole answer is cut to ``count`` (the rest stays for the next read).
        """
        await self._check_layout()
        check_consumer(consumer, count)
        block = block_ms if block_ms > 0 else None  # BLOCK 0 would wait forever
        shard_at = {self.shard_keys[s]: s for s in self.owned}
        async with self._guard(blocking_s=max(block_ms, 0) / 1000):
            try:
                reply = await self._read_on_time(
                    self._redis.xreadgroup(
                        self.group, consumer, dict.fromkeys(shard_at, ">"), count=count, block=block
                    ),
                    block_ms,
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                for shard in self.owned:  # lost with a Redis restart: start over from the streams
                    await self._ensure_group(shard)
                return []
        return [
            self._entry(shard_at[as_text(key)], eid, raw, 1)
            for key, entries in reply or []
            for eid, raw in entries
        ]

    async def _read_on_time(self, read: Any, block_ms: int) -> Any:
        """Await a blocking read; ``PING`` the server when it is not back ``WAKE_MARGIN_S`` past its block.

        Redis times a blocked ``XREADGROUP`` out only when its event loop wakes: at any client's next
        command, or at its cron (``hz``, 10 a second by default; redis/redis#2774). On a quiet server a
        5 ms block so lasted 86-101 ms here, 7-13 ms with the ``PING`` (measured on Redis 7.0). That
        matters where a short block is a promise: the ranks of ``ndot workers`` wait for each other's
        reads every round, while nobody else speaks to Redis (the cameras wait for their answers).
        """
        task = asyncio.ensure_future(read)
        try:
            if block_ms > 0:
                done, _ = await asyncio.wait({task}, timeout=block_ms / 1000 + WAKE_MARGIN_S)
                if not done:
                    with contextlib.suppress(
                        RedisError, OSError
                    ):  # (the read's own failure is the one that counts)
                        await self._redis.ping()
            return await task
        except asyncio.CancelledError:
            task.cancel()
            raise

    async def ack(self, ids: list[str]) -> None:
        await self._check_layout()
        grouped = self._by_shard(ids)
        if not grouped:
            return
        async with self._guard():
            for shard, raw_ids in grouped.items():
                try:
                    await self._ack_shard(shard, raw_ids)
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):  # no group: nothing is pending any more
                        raise

    async def replay(self, after_id: str | None, count: int, shard: int = 0) -> list[BusEntry]:
        """Up to ``count`` entries of one shard with ids above ``after_id``, in id order.

        ``after_id`` None: from the oldest kept entry of ``shard``; else the shard its id names.
        The shard's history, whatever each entry's state in the group (unread, pending or acked):
        what a restarted worker re-applies after restoring a checkpoint. Entries trimmed by
        ``maxlen`` are gone. Delivery state is untouched (``deliveries`` reads 0).
        """
        await self._check_layout()
        if not isinstance(count, int) or count < 1:
            raise BusInputError(f"count must be an int >= 1, got {count!r}")
        if after_id is not None:
            shard, raw = self._shard_of_id(after_id)
        elif not (isinstance(shard, int) and 0 <= shard < self.shards):
            raise BusInputError(f"shard {shard!r} is not one of this bus's {self.shards}")
        start = "-" if after_id is None else "({}-{}".format(*entry_id_key(raw))  # exclusive
        async with self._guard():
            rows = await self._redis.xrange(self.shard_keys[shard], min=start, max="+", count=count)
        return [self._entry(shard, eid, raw_fields, 0) for eid, raw_fields in rows]

    async def newest_id(self, shard: int = 0) -> str | None:
        """The shard's last generated id (None when its stream is missing or has never had an entry)."""
        await self._check_layout()
        async with self._guard():
            try:
                info = await self._redis.xinfo_stream(self.shard_keys[shard])
            except ResponseError as exc:
                if "no such key" not in str(exc):
                    raise
                return None
        newest = as_text(info["last-generated-id"])
        return None if entry_id_key(newest) == (0, 0) else qualify(shard, newest, self.shards)

    async def pending_count(self) -> int:
        """Entries delivered and not yet acked, over the owned shards."""
        await self._check_layout()
        total = 0
        async with self._guard():
            for shard in self.owned:
                info = await self._group_info(shard)
                total += 0 if info is None else int(info["pending"])
        return total

    async def lag(self) -> int:
        """Entries not yet acked over the owned shards: unread (``lag``, or XLEN) + pending."""
        await self._check_layout()
        total = 0
        async with self._guard():
            for shard in self.owned:
                info = await self._group_info(shard)
                if info is None:
                    continue
                unread = info.get("lag")
                if unread is None:
                    unread = await self._redis.xlen(self.shard_keys[shard])
                total += int(unread) + int(info["pending"])
        return total
