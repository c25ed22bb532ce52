"""``BusFactory``: the same bus test on LocalBus and on RedisStreamBus (a fresh stream on a real Redis).

The ``buses`` fixture (tests/conftest.py) runs a test once per bus kind.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import redis

from service.bus import Bus, LocalBus, RedisStreamBus


class BusFactory:
    """Builds buses of one kind on one fresh stream; ``raw`` is a plain Redis client (Redis only)."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        self.kind = kind
        self.url = url
        self.stream = f"ndot-test:{uuid.uuid4().hex}"
        self.raw = redis.Redis.from_url(url) if url else None

    def __call__(self, max_lag: int = 1_000) -> Bus:
        if self.kind == "local":
            return LocalBus(max_lag=max_lag, retry_after_s=0.5)
        return RedisStreamBus(self.url, stream=self.stream, max_lag=max_lag, retry_after_s=0.5)

    def run(self, scenario: Callable[[Bus], Awaitable[Any]], max_lag: int = 1_000) -> Any:
        """Run ``scenario(bus)`` on a started bus in a fresh event loop; closes the bus after."""

        async def main() -> Any:
            bus = self(max_lag=max_lag)
            await bus.start()
            try:
                return await scenario(bus)
            finally:
                await bus.close()

        return asyncio.run(main())

    def cleanup(self) -> None:
        if self.raw is not None:
            keys = list(self.raw.scan_iter(match=f"{self.stream}*"))
            if keys:
                self.raw.delete(*keys)
            self.raw.close()
