"""``RedisStreamBus``'s pending entries that leave their consumer: claimed by another, or dead-lettered.

    claim_stale  XAUTOCLAIM per owned shard (the cursor looped) + XPENDING for the deliveries
    dead_letter  MULTI XADD <shard>:dead ... ; XACK EXEC (WATCHing the shard's owner key when fenced)
    dead_letters XRANGE of every shard's dead letters, merged oldest first

A mixin of ``RedisStreamBus`` (``service.bus.redis_streams``): the same object, its pending half.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from redis.exceptions import ResponseError, WatchError

from service.bus.base import DEAD_LETTERS_KEPT, BusEntry, BusFenced, dead_letter_fields, entry_id_key
from service.bus.redis_entries import as_text, check_consumer

if TYPE_CHECKING:
    import contextlib

    from redis.asyncio import Redis


class PendingEntries:
    """Claims and dead letters of ``RedisStreamBus`` (see the module docstring)."""

    group: str
    shards: int
    owned: list[int]
    shard_keys: list[str]
    fence_token: int | None
    lost_pending: int
    _redis: Redis

    if TYPE_CHECKING:

        def _guard(self, blocking_s: float = 0.0) -> contextlib.AbstractAsyncContextManager[None]: ...
        async def _check_layout(self) -> None: ...
        def _entry(
            self, shard: int, entry_id: bytes | str, raw: dict[bytes, bytes], deliveries: int
        ) -> BusEntry: ...
        def _shard_of_id(self, entry_id: str) -> tuple[int, str]: ...
        def _dead_key(self, shard: int) -> str: ...
        def owner_key(self, shard: int) -> str: ...

    async def claim_stale(self, consumer: str, min_idle_ms: int, count: int) -> list[BusEntry]:
        """Entries pending for ``min_idle_ms`` or longer (any consumer) in the owned shards, now ``consumer``'s."""
        await self._check_layout()
        check_consumer(consumer, count)
        claimed: list[BusEntry] = []
        async with self._guard():
            for shard in self.owned:
                if len(claimed) >= count:
                    break
                claimed += await self._claim_shard(shard, consumer, min_idle_ms, count - len(claimed))
        return claimed

    async def _claim_shard(self, shard: int, consumer: str, min_idle_ms: int, count: int) -> list[BusEntry]:
        key = self.shard_keys[shard]
        raw_claimed: list[tuple[bytes, dict[bytes, bytes]]] = []
        cursor: bytes | str = "0-0"
        while len(raw_claimed) < count:
            try:
                reply = await self._redis.xautoclaim(
                    key,
                    self.group,
                    consumer,
                    max(int(min_idle_ms), 0),
                    start_id=cursor,
                    count=count - len(raw_claimed),
                )
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                return []
            cursor, entries = reply[0], reply[1]
            self.lost_pending += len(reply[2]) if len(reply) > 2 else 0  # Redis 7: trimmed ids
            for entry_id, raw in entries:
                if raw is None:  # Redis 6.2 reports a trimmed entry this way
                    self.lost_pending += 1
                    await self._redis.xack(key, self.group, entry_id)
                else:
                    raw_claimed.append((entry_id, raw))
            if as_text(cursor) == "0-0":
                break
        deliveries = await self._delivery_counts(key, consumer, [as_text(eid) for eid, _ in raw_claimed])
        return [self._entry(shard, eid, raw, deliveries.get(as_text(eid), 1)) for eid, raw in raw_claimed]

    async def _delivery_counts(self, key: str, consumer: str, ids: list[str]) -> dict[str, int]:
        """``times_delivered`` of ``ids`` (sorted) from ``consumer``'s pending list, paging XPENDING."""
        wanted, counts = set(ids), {}
        start = ids[0] if ids else None
        while start is not None and len(counts) < len(wanted):
            rows = await self._redis.xpending_range(
                key,
                self.group,
                min=start,
                max=ids[-1],
                count=len(wanted) - len(counts) + 16,
                consumername=consumer,
            )
            for row in rows:
                if as_text(row["message_id"]) in wanted:
                    counts[as_text(row["message_id"])] = int(row["times_delivered"])
            start = f"({as_text(rows[-1]['message_id'])}" if rows else None
        return counts

    async def dead_letter(self, entry: BusEntry, error: str) -> None:
        """XADD ``entry`` with ``error`` and ``original_id`` to its shard's ``:dead`` stream, then XACK (atomic)."""
        await self._check_layout()
        shard, raw = self._shard_of_id(entry.id)
        fields = {"kind": entry.kind.encode(), "stream_id": entry.stream_id.encode()}
        fields.update(dead_letter_fields(entry.fields, error, entry.id))
        async with self._guard(), self._redis.pipeline(transaction=True) as pipe:
            if self.fence_token is not None:  # fenced: only while the shard is still this group's
                await pipe.watch(self.owner_key(shard))
                owner = await pipe.get(self.owner_key(shard))
                if owner != str(self.fence_token).encode():
                    raise BusFenced(f"shard {shard} is owned by token {owner!r}, not {self.fence_token}")
                pipe.multi()
            pipe.xadd(self._dead_key(shard), fields, maxlen=DEAD_LETTERS_KEPT, approximate=True)
            pipe.xack(self.shard_keys[shard], self.group, raw)
            try:
                added, _ = await pipe.execute(raise_on_error=False)  # XACK fails harmlessly without a group
            except WatchError:
                raise BusFenced(f"shard {shard} changed owner while dead-lettering {entry.id}") from None
            if isinstance(added, Exception):
                raise added

    async def dead_letters(self, count: int = 100) -> list[BusEntry]:
        """The oldest ``count`` dead letters still kept (every shard's), oldest first."""
        await self._check_layout()
        letters: list[tuple[tuple[int, int], BusEntry]] = []
        async with self._guard():
            for shard in range(self.shards):
                for eid, raw in await self._redis.xrange(self._dead_key(shard), count=count):
                    letters.append((entry_id_key(as_text(eid)), self._entry(shard, eid, raw, 1)))
        return [entry for _, entry in sorted(letters, key=lambda item: item[0])[:count]]
