"""``RedisStreamBus.send_round``: a worker round's writes in one pipeline, then its acks.

    pipeline: SET / DEL s:value:<key> ...   RPUSH + PEXPIRE s:reply:<id> ...
    then:     XACK s g id... per shard      (only when every write above was taken)

Two round trips per round instead of one or two per value and reply. The pipeline has no
transaction: Redis runs its commands in order, and a refused one (OOM refuses SET and RPUSH,
not XACK) leaves the round to be sent again whole (see ``Bus.send_round``) -- the acks wait for
it, so an entry is never acked before its reply is out. ``NOGROUP`` on the ack (the group went
with a Redis restart: nothing is pending any more) is not an error.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from redis.exceptions import ResponseError

from service.bus.base import BusInputError, Value

if TYPE_CHECKING:
    from service.bus.redis_streams import RedisStreamBus


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
    async with bus._guard(), bus._redis.pipeline(transaction=False) as pipe:
        for key, value, ttl_s in values:
            name = bus._value_key(key)
            if value is None:
                pipe.delete(name)
            else:
                if ttl_s is not None and not ttl_s > 0:
                    raise BusInputError(f"ttl_s must be > 0 or None, got {ttl_s!r}")
                pipe.set(name, bytes(value), px=None if ttl_s is None else max(int(ttl_s * 1000), 1))
        for request_id, payload in replies:
            key = bus._reply_key(request_id)
            pipe.rpush(key, bytes(payload))
            pipe.pexpire(key, max(int(reply_ttl_s * 1000), 1))
        results = await pipe.execute(raise_on_error=False) if (values or replies) else []
        for result in results:
            if isinstance(result, ResponseError):
                raise result
        for shard, raw_ids in acks_by_shard.items():
            try:
                await bus._ack_shard(shard, raw_ids)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
