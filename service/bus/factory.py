"""``make_bus``: the bus the settings ask for (Redis Streams or the embedded one)."""

from __future__ import annotations

from typing import Any

from service.bus.base import DEFAULT_MAX_BYTES, Bus
from service.bus.local import LocalBus
from service.bus.redis_streams import RedisStreamBus
from service.bus.shards import per_shard_bounds


def make_bus(settings: Any, owned: list[int] | None = None) -> Bus:
    """The bus the settings ask for: Redis Streams when ``redis_url`` is set, else the embedded bus.

    Reads ``redis_url``, ``bus_stream``, ``bus_group``, ``bus_max_lag``, ``bus_maxlen``,
    ``bus_max_bytes``, ``bus_retry_after_s``, ``shards`` and ``max_body_bytes`` from ``settings``
    (any object; missing attributes take the defaults). ``owned``: the shards this process reads
    (a worker rank's share; default all).

    On a sharded Redis bus the bounds hold per shard: ``max_lag`` as set, ``maxlen`` and
    ``max_bytes`` the deployment's total spread over the shards but never below what one shard needs
    (``2 * max_lag`` entries; ``2 * max_body_bytes``, so the largest packet fits): see docs/scale-out.md.
    """
    max_lag = int(getattr(settings, "bus_max_lag", 1_000))
    retry_after_s = float(getattr(settings, "bus_retry_after_s", 1.0))
    max_bytes = int(getattr(settings, "bus_max_bytes", DEFAULT_MAX_BYTES))
    redis_url = getattr(settings, "redis_url", None)
    if not redis_url:
        return LocalBus(max_lag=max_lag, retry_after_s=retry_after_s, max_bytes=max_bytes)
    shards = int(getattr(settings, "shards", 1))
    maxlen, shard_bytes = per_shard_bounds(
        getattr(settings, "bus_maxlen", None),
        max_bytes,
        max_lag,
        int(getattr(settings, "max_body_bytes", 0)),
        shards,
    )
    return RedisStreamBus(
        str(redis_url),
        stream=str(getattr(settings, "bus_stream", "ndot:events")),
        group=str(getattr(settings, "bus_group", "ndot-workers")),
        max_lag=max_lag,
        maxlen=maxlen,
        retry_after_s=retry_after_s,
        max_bytes=shard_bytes,
        shards=shards,
        owned=owned,
    )
