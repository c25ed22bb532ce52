"""A bus read that ends when its block is up, on a quiet Redis too.

Redis times a blocked ``XREADGROUP`` out only when its event loop wakes: at any client's next command,
or at its cron (``hz``: 10 a second by default). On a quiet server a 5 ms block may so last up to
100 ms (redis/redis#2774: "the actual granularity depends on server.hz"; measured here on Redis 7.0,
hz 10: 5 ms blocks ending after 94-101 ms, 7-12 ms with the wake-up below). The ranks of a cluster
wait for each other's reads every round: under ``sync_mode=grad`` a rank with no packets held every
answer of the others up that long, since nobody else spoke to Redis meanwhile (the cameras wait for
their answers). So when the read has not returned ``WAKE_MARGIN_S`` past its block, one ``GET`` wakes
the server, which then times the read out.
"""

from __future__ import annotations

import asyncio
import contextlib

from service.bus import Bus, BusEntry
from service.worker.bus_retry import RETRIED

#: How long past its block a read may take before the server is woken.
WAKE_MARGIN_S = 0.001


async def read_on_time(bus: Bus, consumer: str, count: int, block_ms: int, wake_key: str) -> list[BusEntry]:
    """``bus.read(consumer, count, block_ms)``; ``GET wake_key`` (any value key) when the block is up."""
    read = asyncio.ensure_future(bus.read(consumer, count, block_ms))
    try:
        if block_ms > 0:
            done, _ = await asyncio.wait({read}, timeout=block_ms / 1000 + WAKE_MARGIN_S)
            if not done:
                with contextlib.suppress(*RETRIED):  # (the read's own failure is the one that counts)
                    await bus.get_value(wake_key)
        return await read
    except asyncio.CancelledError:
        read.cancel()
        raise
