"""The stream bus between the API (producer) and the workers (consumer group).

``base`` states the contract (``Bus``, ``BusEntry``, the errors), ``local`` and ``redis_streams``
implement it, ``factory.make_bus`` picks one from the settings, and ``messages`` says what the API
and the worker write into entries, replies and values.
"""

from service.bus.base import (
    DEFAULT_MAX_BYTES,
    MALFORMED_KIND,
    REFUSAL_REASONS,
    RESERVED_FIELDS,
    Bus,
    BusCommandError,
    BusEntry,
    BusEntryTooLarge,
    BusError,
    BusFenced,
    BusFull,
    BusInputError,
    BusRefused,
    BusUnavailable,
    entry_id_key,
    entry_size,
    validate_publish,
)
from service.bus.factory import make_bus
from service.bus.local import LocalBus
from service.bus.redis_streams import RedisStreamBus

__all__ = [
    "DEFAULT_MAX_BYTES",
    "MALFORMED_KIND",
    "REFUSAL_REASONS",
    "RESERVED_FIELDS",
    "Bus",
    "BusCommandError",
    "BusEntry",
    "BusEntryTooLarge",
    "BusError",
    "BusFenced",
    "BusFull",
    "BusInputError",
    "BusRefused",
    "BusUnavailable",
    "LocalBus",
    "RedisStreamBus",
    "entry_id_key",
    "entry_size",
    "make_bus",
    "validate_publish",
]
