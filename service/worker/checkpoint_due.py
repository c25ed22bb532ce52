"""When a periodic checkpoint is due: by time, or before the bus may trim history it did not cover.

A restarted worker replays the bus history after its checkpoint, so a checkpoint must come before
the bus trims applied entries it does not cover. The Redis bus trims each shard on its own, past
that shard's ``maxlen`` entries or ``max_bytes`` bytes (``service.bus.shards.per_shard_bounds``), so
the applied entries and bytes are counted per shard::

    due  =  dirty  and  ( now - last_save >= checkpoint_interval_s            (> 0)
                          or  max_s entries_s >= min(checkpoint_max_entries, shard maxlen / 2)
                          or  max_s bytes_s   >= shard max_bytes / 2 )
"""

from __future__ import annotations

import time
from collections import Counter

from service.bus.shards import per_shard_bounds, split_entry_id
from service.settings import Settings


class CheckpointDue:
    """Counts what was applied since the last checkpoint, per shard; says when the next one is due."""

    def __init__(self, settings: Settings, shards: int) -> None:
        self.interval_s = settings.checkpoint_interval_s
        shard_maxlen, shard_bytes = per_shard_bounds(
            settings.bus_maxlen, settings.bus_max_bytes, settings.bus_max_lag, settings.max_body_bytes, shards
        )
        limits = [n for n in (settings.checkpoint_max_entries, (shard_maxlen or 0) // 2) if n > 0]
        self.max_entries = min(limits) if settings.checkpoint_max_entries > 0 and limits else 0
        self.max_bytes = shard_bytes // 2
        self.entries: Counter[int] = Counter()
        self.bytes: Counter[int] = Counter()
        self.last_save_s = time.monotonic()

    @property
    def applied(self) -> int:
        """Entries applied since the last checkpoint, all shards."""
        return sum(self.entries.values())

    def count(self, entry_id: str, size: int) -> None:
        shard = split_entry_id(entry_id)[0]
        self.entries[shard] += 1
        self.bytes[shard] += size

    def due(self) -> bool:
        by_time = self.interval_s > 0 and time.monotonic() - self.last_save_s >= self.interval_s
        by_count = self.max_entries > 0 and max(self.entries.values(), default=0) >= self.max_entries
        by_bytes = max(self.bytes.values(), default=0) >= self.max_bytes
        return by_time or by_count or by_bytes

    def saved(self) -> None:
        self.entries.clear()
        self.bytes.clear()
        self.last_save_s = time.monotonic()

    def failed(self) -> None:
        """A checkpoint failed: try again when due by time (the counts stay)."""
        self.last_save_s = time.monotonic()
