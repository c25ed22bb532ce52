"""The stream bus between the API (producer) and the workers (consumer group).

``base`` states the contract (``Bus``, ``BusEntry``, the errors), ``local`` and ``redis_streams``
implement it, ``factory.make_bus`` picks one from the settings, and ``messages`` says what the API
and the worker write into entries, replies and values.
"""

from service.bus.base import (
    MALFORMED_KIND,
    RESERVED_FIELDS,
    Bus,
    BusEntry,
    BusError,
    BusFull,
    BusInputError,
    BusUnavailable,
    entry_id_key,
    validate_publish,
)
from service.bus.factory import make_bus
from service.bus.local import LocalBus
from service.bus.redis_streams import RedisStreamBus

__all__ = [
    "MALFORMED_KIND",
    "RESERVED_FIELDS",
    "Bus",
    "BusEntry",
    "BusError",
    "BusFull",
    "BusInputError",
    "BusUnavailable",
    "LocalBus",
    "RedisStreamBus",
    "entry_id_key",
    "make_bus",
    "validate_publish",
]
