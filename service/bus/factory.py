"""``make_bus``: the bus the settings ask for (Redis Streams or the embedded one)."""

from __future__ import annotations

from typing import Any

from service.bus.base import DEFAULT_MAX_BYTES, Bus
from service.bus.local import LocalBus
from service.bus.redis_streams import RedisStreamBus


def make_bus(settings: Any) -> Bus:
    """The bus the settings ask for: Redis Streams when ``redis_url`` is set, else the embedded bus.

    Reads ``redis_url``, ``bus_stream``, ``bus_group``, ``bus_max_lag``, ``bus_maxlen``,
    ``bus_max_bytes`` and ``bus_retry_after_s`` from ``settings`` (any object; missing attributes
    take the defaults).
    """
    max_lag = int(getattr(settings, "bus_max_lag", 1_000))
    retry_after_s = float(getattr(settings, "bus_retry_after_s", 1.0))
    max_bytes = int(getattr(settings, "bus_max_bytes", DEFAULT_MAX_BYTES))
    redis_url = getattr(settings, "redis_url", None)
    if not redis_url:
        return LocalBus(max_lag=max_lag, retry_after_s=retry_after_s, max_bytes=max_bytes)
    maxlen = getattr(settings, "bus_maxlen", None)
    return RedisStreamBus(
        str(redis_url),
        stream=str(getattr(settings, "bus_stream", "ndot:events")),
        group=str(getattr(settings, "bus_group", "ndot-workers")),
        max_lag=max_lag,
        maxlen=int(maxlen) if maxlen else None,
        retry_after_s=retry_after_s,
        max_bytes=max_bytes,
    )
