"""The body of ``POST /v1/streams/{id}/events``: read with a byte cap, then validated, before the bus.

Two encodings of one packet: packed little-endian 13-byte records ``t:int64 µs, x:uint16, y:uint16,
p:uint8`` (``WIRE_DTYPE``, ``application/octet-stream``) or JSON columns ``{"t", "x", "y", "p"}``.
Either way the events are checked against the stream's sensor (``EventError`` names the first bad
index and value) and travel on as wire bytes.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from fastapi import Request
from starlette.requests import ClientDisconnect

from ndot_core.events.layout import events_from_bytes, events_from_columns, events_to_bytes
from service.api.errors import ApiError
from service.api.schemas import EventColumns

BINARY = "application/octet-stream"
JSON = "application/json"
#: Bodies above this are validated in a thread, keeping the event loop free.
LARGE_BODY_BYTES = 1 << 20
log = logging.getLogger("ndot.api")


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes ``limit`` bytes."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"body of {declared} bytes exceeds the limit of {limit} bytes")
    chunks, size = [], 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, f"body exceeds the limit of {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # nobody is left to answer: one line, no traceback
        log.info("event=client_disconnected path=%s received_bytes=%d", request.url.path, size)
        raise ApiError(400, f"client disconnected after {size} bytes of the body") from None
    return b"".join(chunks)


def parse_json(body: bytes) -> Any:
    """``json.loads`` of an untrusted body: 400 with a message for anything unreadable, never a 500.

    Unreadable: invalid JSON or UTF-8, an integer of more digits than Python converts, nesting
    deeper than the parser's recursion limit.
    """
    try:
        return json.loads(body)
    except RecursionError:
        raise ApiError(400, "body is not valid JSON: arrays or objects nested too deeply") from None
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, int digit limit
        raise ApiError(400, f"body is not valid JSON: {err}") from None


def parse_events(body: bytes, content_type: str, sensor: tuple[int, int], max_events: int) -> bytes:
    """Validate a packet body; returns it as ``WIRE_DTYPE`` bytes (raises ``EventError`` / ``ApiError``)."""
    if content_type == BINARY:
        events_from_bytes(body, sensor_size=sensor, max_events=max_events)
        return body
    columns = parse_json(body) if body else {"t": [], "x": [], "y": [], "p": []}
    if not isinstance(columns, dict):
        kind = "null" if columns is None else type(columns).__name__
        raise ApiError(422, f"JSON body must be an object of columns t, x, y, p, got {kind}")
    return events_to_bytes(events_from_columns(columns, sensor_size=sensor, max_events=max_events))


EVENTS_BODY = {
    "required": False,
    "description": "Event packet: packed little-endian 13-byte records `t:int64 µs, x:uint16, y:uint16, "
    "p:uint8` (aedat's layout, `WIRE_DTYPE`), or JSON columns. Empty = no events (e.g. `end=true`).",
    "content": {
        BINARY: {
            "schema": {"type": "string", "format": "binary"},
            "example": "<13 bytes per event: e8 03 00 00 00 00 00 00 | 03 00 | 0a 00 | 01>",
        },
        JSON: {
            "schema": EventColumns.model_json_schema(),
            "example": {"t": [1000, 1005, 1020], "x": [3, 4, 4], "y": [10, 10, 11], "p": [1, 0, 1]},
        },
    },
}
