"""Replies and small values of ``RedisStreamBus``: one list per reply, one string per value.

    put_reply   MULTI RPUSH s:reply:<id> payload ; PEXPIRE EXEC        wait_reply  BLPOP s:reply:<id> t
    set_value   SET s:value:<key> v PX ttl    get_value GET    get_values MGET    delete_value DEL
    send_round  EVALSHA round.lua: a worker round's values, replies, then XACK (``redis_round``)

Blocking reply waits use the bus's own reply pool (``_replies``), so waiting requests never starve
publish, read or ack. ``RedisStreamBus`` mixes this in; it provides ``_redis``, ``_replies``,
``stream`` and ``_guard``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from service.bus.base import BusInputError, Value
from service.bus.redis_round import milliseconds, send_round

if TYPE_CHECKING:
    from redis.asyncio import Redis


class RepliesAndValues:
    """The reply and value half of the ``Bus`` contract over Redis (see the module docstring)."""

    stream: str
    _redis: Redis
    _replies: Redis

    def _reply_key(self, request_id: str) -> str:
        if not isinstance(request_id, str) or not request_id:
            raise BusInputError(f"request_id {request_id!r} must be a non-empty string")
        return f"{self.stream}:reply:{request_id}"

    def _value_key(self, key: str) -> str:
        if not isinstance(key, str) or not key:
            raise BusInputError(f"key {key!r} must be a non-empty string")
        return f"{self.stream}:value:{key}"

    async def put_reply(self, request_id: str, payload: bytes, ttl_s: float) -> None:
        key = self._reply_key(request_id)
        if not ttl_s > 0:
            raise BusInputError(f"ttl_s must be > 0, got {ttl_s!r}")
        async with self._guard(), self._redis.pipeline(transaction=True) as pipe:
            pipe.rpush(key, bytes(payload))
            pipe.pexpire(key, milliseconds(ttl_s))
            await pipe.execute()

    async def wait_reply(self, request_id: str, timeout_s: float) -> bytes | None:
        """The next reply for ``request_id`` (BLPOP on the reply pool), or ``None`` after ``timeout_s``."""
        key = self._reply_key(request_id)
        async with self._guard(blocking_s=max(timeout_s, 0)):
            if timeout_s <= 0:
                return await self._replies.lpop(key)
            popped = await self._replies.blpop([key], timeout=timeout_s)
        return None if popped is None else popped[1]

    async def set_value(self, key: str, value: bytes, ttl_s: float | None = None) -> None:
        name = self._value_key(key)
        if ttl_s is not None and not ttl_s > 0:
            raise BusInputError(f"ttl_s must be > 0 or None, got {ttl_s!r}")
        async with self._guard():
            await self._redis.set(name, bytes(value), px=None if ttl_s is None else milliseconds(ttl_s))

    async def get_value(self, key: str) -> bytes | None:
        name = self._value_key(key)
        async with self._guard():
            return await self._redis.get(name)

    async def send_round(
        self, values: list[Value], replies: list[tuple[str, bytes]], reply_ttl_s: float, acks: list[str]
    ) -> None:
        await send_round(self, values, replies, reply_ttl_s, acks)  # service.bus.redis_round

    async def get_values(self, keys: list[str]) -> list[bytes | None]:
        names = [self._value_key(key) for key in keys]
        if not names:
            return []
        async with self._guard():
            return await self._redis.mget(names)

    async def delete_value(self, key: str) -> None:
        name = self._value_key(key)
        async with self._guard():
            await self._redis.delete(name)
