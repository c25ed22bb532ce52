"""Redis's replies as bus values (text, ``BusEntry``) and the argument checks of ``RedisStreamBus``."""

from __future__ import annotations

from typing import Any

from service.bus.base import MALFORMED_KIND, BusEntry, BusInputError

__all__ = ["as_text", "check_consumer", "decode_entry"]


def as_text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def decode_entry(entry_id: bytes | str, raw: dict[bytes, bytes], deliveries: int) -> BusEntry:
    """A stream entry as ``BusEntry``; one without the bus envelope gets kind ``MALFORMED_KIND``."""
    fields = {as_text(name): bytes(value) for name, value in raw.items()}
    kind = fields.pop("kind", None)
    stream_id = fields.pop("stream_id", None)
    if kind is None or stream_id is None:
        return BusEntry(as_text(entry_id), MALFORMED_KIND, as_text(stream_id or b""), fields, deliveries)
    return BusEntry(as_text(entry_id), as_text(kind), as_text(stream_id), fields, deliveries)


def check_consumer(consumer: str, count: int) -> None:
    if not isinstance(consumer, str) or not consumer:
        raise BusInputError(f"consumer {consumer!r} must be a non-empty string")
    if not isinstance(count, int) or count < 1:
        raise BusInputError(f"count must be an int >= 1, got {count!r}")
