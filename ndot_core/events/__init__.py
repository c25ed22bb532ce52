"""Event data: the layout and its validation, framing into tensors, file readers, datasets.

``layout`` (the event dtype, wire format, validation) -> ``framing`` (events to frames, whole or
streaming) -> ``readers`` (files of the field's formats) -> ``datasets`` (labelled recordings).
None of it needs torch. The layout, framing and reader names are re-exported here, so
``from ndot_core.events import events_from_bytes, StreamFramer, read_events`` works; the dataset
classes load on first use (``from ndot_core.events import NMNISTFolder``).
"""

from __future__ import annotations

import importlib
from typing import Any

from ndot_core.events.framing import StreamFramer, to_frames
from ndot_core.events.layout import (
    DEFAULT_MAX_EVENTS,
    EVENT_DTYPE,
    EVENT_FIELDS,
    TONIC_DTYPE,
    WIRE_DTYPE,
    EventError,
    SensorSize,
    as_event_array,
    check_sensor_size,
    events_from_bytes,
    events_from_columns,
    events_to_bytes,
    from_aedat,
    from_expelliarmus,
    from_tonic,
    to_tonic,
    validate_events,
)

_LAZY = {"read_events": "ndot_core.events.readers", "NMNISTFolder": "ndot_core.events.datasets"}

__all__ = [
    "DEFAULT_MAX_EVENTS",
    "EVENT_DTYPE",
    "EVENT_FIELDS",
    "TONIC_DTYPE",
    "WIRE_DTYPE",
    "EventError",
    "NMNISTFolder",
    "SensorSize",
    "StreamFramer",
    "as_event_array",
    "check_sensor_size",
    "events_from_bytes",
    "events_from_columns",
    "events_to_bytes",
    "from_aedat",
    "from_expelliarmus",
    "from_tonic",
    "read_events",
    "to_frames",
    "to_tonic",
    "validate_events",
]


def __getattr__(name: str) -> Any:
    """Import a reader or dataset name's module on first use (they pull in tonic and friends)."""
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'ndot_core.events' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
