"""``RedisStreamBus``'s shard layout: which Redis streams it spans, which it owns, and their ids.

The layout (``service.bus.shards``) is recorded on Redis under ``<stream>:shards`` by the first
process that touches the bus; a process configured with another count is refused (its entries would
go to streams nobody reads), and a tool may take the recorded count (``shards=None``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.bus.base import BusEntry, BusFenced, BusInputError, BusRefused
from service.bus.redis_entries import decode_entry
from service.bus.shards import check_shards, qualify, shard_stream_key, split_entry_id

if TYPE_CHECKING:
    import contextlib

    from redis.asyncio import Redis


class ShardLayout:
    """Shard keys, the owned subset, shard-qualified ids and the recorded layout (a mixin)."""

    stream: str
    layout_key: str
    _adopt_layout: bool
    _layout_checked: bool
    _wanted_owned: list[int] | None
    _redis: Redis
    shards: int
    shard_keys: list[str]
    owned: list[int]
    group: str
    #: The fencing token of this process's worker group (``claim_shards``); None = acks unfenced.
    fence_token: int | None = None

    if TYPE_CHECKING:
        from redis.commands.core import AsyncScript

        _claim_script: AsyncScript
        _fenced_ack_script: AsyncScript
        _round_script: AsyncScript

        def _guard(self, blocking_s: float = 0.0) -> contextlib.AbstractAsyncContextManager[None]: ...

    def _set_layout(self, shards: int) -> None:
        self.shards = shards
        #: The Redis key of each shard's stream (one shard: ``stream`` itself).
        self.shard_keys = (
            [self.stream] if shards == 1 else [shard_stream_key(self.stream, s) for s in range(shards)]
        )
        self.owned: list[int] = list(range(shards))

    async def _check_layout(self) -> None:
        """Record this bus's shard count on Redis, or take / check the one recorded (see ``shards``).

        Runs on the first call that touches the stream (``start`` or any other) until it succeeds; a
        server refusing writes (OOM, a replica) leaves the record for a later call, reads go on.
        """
        if self._layout_checked:
            return
        async with self._guard():
            recorded = await self._redis.get(self.layout_key)
        if self._adopt_layout:
            self._set_layout(check_shards(int(recorded)) if recorded else 1)
            if self._wanted_owned is not None:
                self.own(self._wanted_owned)
            self._layout_checked = True
            return
        if recorded is None:
            try:
                async with self._guard():
                    await self._redis.set(self.layout_key, str(self.shards), nx=True)
                    recorded = await self._redis.get(self.layout_key)
            except BusRefused:
                return
        if int(recorded or self.shards) != self.shards:
            raise ValueError(
                f"the bus {self.stream!r} on Redis is laid out in {int(recorded)} shards, this process in "
                f"{self.shards}: set NDOT_SHARDS={int(recorded)} (a deployment's shard count is fixed for its life)"
            )
        self._layout_checked = True

    def owner_key(self, shard: int) -> str:
        """Holds the fencing token of the group that owns the shard (in the shard's slot)."""
        return f"{self.shard_keys[shard]}:owner"

    @property
    def epoch_key(self) -> str:
        """``INCR`` gives every new worker group a token higher than any before it."""
        return f"{self.stream}:epoch"

    async def claim_shards(self, token: int) -> None:
        """Write ``token`` into the owner key of every owned shard; from now on acks are fenced by it.

        Raises ``BusFenced`` when a shard already holds a higher token (a newer group owns it).
        """
        await self._check_layout()
        async with self._guard():
            for shard in self.owned:
                newer = await self._claim_script(keys=[self.owner_key(shard)], args=[token])
                if newer:
                    raise BusFenced(
                        f"shard {shard} is owned by a newer worker group (token {newer} > {token})"
                    )
        self.fence_token = token

    async def _ack_shard(self, shard: int, raw_ids: list[str]) -> None:
        """XACK ``raw_ids`` of ``shard`` (inside the caller's guard), fenced when this group has a token."""
        if self.fence_token is None:
            await self._redis.xack(self.shard_keys[shard], self.group, *raw_ids)
        else:
            keys = [self.shard_keys[shard], self.owner_key(shard)]
            await self._fenced_ack_script(keys=keys, args=[self.group, self.fence_token, *raw_ids])

    def own(self, shards: list[int]) -> None:
        """Read, ack, claim and replay only ``shards`` from now on (a rank's share after a rendezvous)."""
        owned = sorted(set(shards))
        if not owned or not all(isinstance(s, int) and 0 <= s < self.shards for s in owned):
            raise ValueError(f"owned shards {shards!r} must be a non-empty subset of [0, {self.shards})")
        self.owned = owned

    def _dead_key(self, shard: int) -> str:
        return f"{self.shard_keys[shard]}:dead"

    def _shard_of_id(self, entry_id: str) -> tuple[int, str]:
        """``(shard, raw id)`` of one of this bus's ids (a qualified id on a sharded bus)."""
        shard, raw = split_entry_id(entry_id)
        if shard >= self.shards or (self.shards > 1) != ("/" in entry_id):
            raise BusInputError(f"entry id {entry_id!r} names no shard of this bus ({self.shards} shards)")
        return shard, raw

    def _by_shard(self, ids: list[str]) -> dict[int, list[str]]:
        grouped: dict[int, list[str]] = {}
        for entry_id in ids:
            shard, raw = self._shard_of_id(entry_id)
            grouped.setdefault(shard, []).append(raw)
        return grouped

    def _entry(self, shard: int, entry_id: bytes | str, raw: dict[bytes, bytes], deliveries: int) -> BusEntry:
        entry = decode_entry(entry_id, raw, deliveries)
        if self.shards == 1:
            return entry
        return BusEntry(
            qualify(shard, entry.id, self.shards), entry.kind, entry.stream_id, entry.fields, deliveries
        )
