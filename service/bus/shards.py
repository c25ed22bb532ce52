"""Shards: the fixed Redis streams that camera streams are spread over, and ids that name their shard.

A camera stream belongs to one of ``S`` shards for good::

    shard_of(stream_id) = crc32(utf8(stream_id)) mod S

Each shard is its own Redis stream with its own consumer group, byte counter and dead letters, all
under one hash tag (``ndot:{17}:events``, ``ndot:{17}:events:dead``, ...), so a shard lives in one
Redis Cluster slot and moves between workers whole. Entry ids count per shard, so with ``S > 1`` an
id names its shard: ``"17/1701234567890-0"``; with ``S == 1`` ids are the plain ``"<ms>-<seq>"``
they always were. Ids of one shard are ordered; ids of different shards are not comparable, hence
``Watermark``: the newest applied id per shard.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from typing import Any

from service.bus.base import BusInputError, entry_id_key

__all__ = [
    "Watermark",
    "delete_bus_keys",
    "per_shard_bounds",
    "qualify",
    "shard_key_pattern",
    "shard_of",
    "shard_stream_key",
    "split_entry_id",
]

MAX_SHARDS = 4096


def check_shards(shards: int) -> int:
    if not isinstance(shards, int) or not 1 <= shards <= MAX_SHARDS:
        raise ValueError(f"shards must be an int in [1, {MAX_SHARDS}], got {shards!r}")
    return shards


def shard_of(stream_id: str, shards: int) -> int:
    """The shard of a camera stream: ``crc32(stream_id) % shards`` (stable across processes and versions)."""
    return zlib.crc32(stream_id.encode()) % shards


def shard_stream_key(stream: str, shard: int | str) -> str:
    """The Redis key of shard ``shard`` of ``stream``: ``"ndot:events"`` -> ``"ndot:{17}:events"``."""
    base, _, tail = stream.rpartition(":")
    return f"{base}:{{{shard}}}:{tail}" if base else f"{{{shard}}}:{stream}"


def per_shard_bounds(
    maxlen: int | None, max_bytes: int, max_lag: int, max_body: int, shards: int
) -> tuple[int | None, int]:
    """``(maxlen, max_bytes)`` of one shard: the deployment's totals spread over the shards, but never
    below what one shard needs (``2 * max_lag`` entries; ``2 * max_body`` bytes, so the largest packet fits)."""
    shard_maxlen = None if not maxlen else max(maxlen // shards, 2 * max_lag)
    return shard_maxlen, max(max_bytes // shards, 2 * max_body, 1)


def shard_key_pattern(stream: str) -> str:
    """A Redis glob matching every key of every shard of ``stream`` (for tools that clean up)."""
    return shard_stream_key(stream, "*") + "*"  # type: ignore[arg-type]


def delete_bus_keys(client: Any, stream: str) -> int:
    """Delete every key of the bus ``stream`` (its own and its shards') with a synchronous redis-py
    client; returns how many. For tools and tests that clean up after a deployment."""
    keys = [
        key
        for pattern in (f"{stream}*", shard_key_pattern(stream))
        for key in client.scan_iter(match=pattern, count=1000)
    ]
    return int(client.delete(*keys)) if keys else 0


def qualify(shard: int, raw_id: str, shards: int) -> str:
    """The bus id of entry ``raw_id`` of ``shard``: ``"<shard>/<raw_id>"``, or ``raw_id`` when unsharded."""
    return raw_id if shards == 1 else f"{shard}/{raw_id}"


def split_entry_id(entry_id: str) -> tuple[int, str]:
    """``(shard, raw_id)`` of a bus id (a plain ``"<ms>-<seq>"`` is shard 0); ``BusInputError`` if malformed."""
    if not isinstance(entry_id, str):
        raise BusInputError(f"entry id {entry_id!r} is not a string")
    shard_text, slash, raw = entry_id.partition("/")
    if not slash:
        shard_text, raw = "0", entry_id
    if not shard_text.isdigit() or len(shard_text) > 4:
        raise BusInputError(f"entry id {entry_id!r} is not of the form '[<shard>/]<ms>-<seq>'")
    entry_id_key(raw)
    return int(shard_text), raw


class Watermark:
    """The newest entry applied, per shard: an entry is *covered* (applied before) if at or below it."""

    def __init__(self, newest: Mapping[int, str] | None = None) -> None:
        self._newest: dict[int, tuple[int, int]] = {}
        self._ids: dict[int, str] = {}
        for shard, raw in (newest or {}).items():
            self.advance(f"{shard}/{raw}")

    @classmethod
    def of_ids(cls, entry_ids: Iterable[str]) -> Watermark:
        """The watermark just covering ``entry_ids``."""
        watermark = cls()
        for entry_id in entry_ids:
            watermark.advance(entry_id)
        return watermark

    def covers(self, entry_id: str) -> bool:
        shard, raw = split_entry_id(entry_id)
        newest = self._newest.get(shard)
        return newest is not None and entry_id_key(raw) <= newest

    def advance(self, entry_id: str) -> None:
        """Move the shard's mark up to ``entry_id`` (never down)."""
        shard, raw = split_entry_id(entry_id)
        key = entry_id_key(raw)
        if shard not in self._newest or key > self._newest[shard]:
            self._newest[shard], self._ids[shard] = key, raw

    def get(self, shard: int) -> str | None:
        """The newest raw id applied of ``shard`` (``None``: none)."""
        return self._ids.get(shard)

    def drop(self, shard: int) -> None:
        self._newest.pop(shard, None)
        self._ids.pop(shard, None)

    def shards(self) -> list[int]:
        return sorted(self._ids)

    def as_dict(self) -> dict[str, str]:
        """``{"<shard>": "<ms>-<seq>"}`` (JSON keys are strings) for checkpoints and status."""
        return {str(shard): self._ids[shard] for shard in sorted(self._ids)}

    @classmethod
    def from_dict(cls, value: Mapping[str, str]) -> Watermark:
        watermark = cls()
        for shard, raw in value.items():
            watermark.advance(f"{int(shard)}/{raw}")
        return watermark

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Watermark) and self._newest == other._newest

    def __repr__(self) -> str:
        return f"Watermark({self.as_dict()})"
