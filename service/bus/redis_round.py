"""``RedisStreamBus.send_round``: a worker round's writes and acks in one script call.

    EVALSHA round.lua   SET / DEL s:value:<key> ...   RPUSH + PEXPIRE s:reply:<id> ...   XACK s g id... per shard

One round trip per round, and one command for redis-py to pack and parse: the pipeline it replaced
(a command per value, two per reply, then an XACK per shard: two round trips) took 2.2x the client
CPU and 1.8x the time of a round of 8 replies (docs/benchmarks.md § Bus). The script
(``redis_lua.ROUND_LUA``) runs the writes in order and the acks last, so an entry is never acked
before its reply is out: a refused write (OOM refuses SET and RPUSH) ends it with nothing acked and
the round is sent again whole (see ``Bus.send_round``). A fenced bus (``claim_shards``) has its
token checked against every acked shard's owner key first; a round of a group that lost its shards
writes nothing (``BusFenced``). Acks of a group gone with a Redis restart (nothing is pending any
more) ack nothing and are not an error.

The keys span the bus's shards (one Cluster slot each) and its value and reply keys: like the read
(one XREADGROUP over every owned shard), a round needs the one Redis the service runs on, not a
Redis Cluster (docs/scale-out.md).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.bus.base import BusInputError, Value

if TYPE_CHECKING:
    from service.bus.redis_streams import RedisStreamBus


def milliseconds(seconds: float) -> int:
    """A TTL in whole milliseconds for PX / PEXPIRE, at least 1 (0 would mean no expiry or an error)."""
    return max(int(seconds * 1000), 1)


async def send_round(
    bus: RedisStreamBus,
    values: list[Value],
    replies: list[tuple[str, bytes]],
    reply_ttl_s: float,
    acks: list[str],
) -> None:
    if not reply_ttl_s > 0:
        raise BusInputError(f"reply_ttl_s must be > 0, got {reply_ttl_s!r}")
    await bus._check_layout()
    acks_by_shard = bus._by_shard(acks)
    if not (values or replies or acks):
        return
    keys: list[str] = []
    fenced = bus.fence_token is not None
    args: list[str | int | bytes] = [
        bus.group,
        str(bus.fence_token) if fenced else "",
        milliseconds(reply_ttl_s),
        len(values),
        len(replies),
    ]
    for key, value, ttl_s in values:
        keys.append(bus._value_key(key))
        if value is None:
            args += ["del", b""]
        elif ttl_s is None:
            args += ["", bytes(value)]
        elif ttl_s > 0:
            args += [milliseconds(ttl_s), bytes(value)]
        else:
            raise BusInputError(f"ttl_s must be > 0 or None, got {ttl_s!r}")
    for request_id, payload in replies:
        keys.append(bus._reply_key(request_id))
        args.append(bytes(payload))
    for shard, raw_ids in acks_by_shard.items():
        keys += [bus.shard_keys[shard], bus.owner_key(shard)] if fenced else [bus.shard_keys[shard]]
        args += [len(raw_ids), *raw_ids]
    async with bus._guard():
        await bus._round_script(keys=keys, args=args)
