"""What the API and the worker say to each other over the bus: entry kinds, fields, value keys, replies.

    events entry   kind="events", stream_id, fields {events: WIRE_DTYPE bytes, width, height,
                   label (absent = unlabelled), start, end, posted_s}
    label entry    kind="label", stream_id, fields {label, sequence: b"<number>" | b"last"}: a label for a
                   sequence of the stream, after the fact (learn_at=sequence; ``LabelRequest``)
    control entry  kind in CONTROL_KINDS, stream_id (MODEL_STREAM for model-wide ones), fields
    reply          per entry id: JSON {"ok": true, ...result} or {"ok": false, "status": 4xx/5xx, "detail"}
    values         {prefix}:sensor:{stream_id} = b"WxH" (absent = closed; TTL ``sensor_ttl_s``, refreshed by the
                   worker while the stream lives), {prefix}:worker:heartbeat = unix s (TTL),
                   {prefix}:worker:status = JSON snapshot (model, version, streams, checkpoints),
                   {prefix}:api:probe = unix s (TTL ``PROBE_TTL_S``, written by /readyz),
                   {prefix}:busy:{stream_id} = Retry-After s while the stream has too many frames queued
                   (TTL ``BUSY_TTL_S``, refreshed by the worker while it stays busy; the API answers 429)
                   {prefix}:viewing:{stream_id} = b"1" while a browser watches the stream (TTL
                   ``VIEWING_TTL_S``, refreshed by the API's live-view endpoint; read by the worker ~1/s)
                   {prefix}:live:{stream_id} = JSON of the stream's latest step for live views (frame,
                   probabilities, counters; ``service.worker.live``), at most every ``LIVE_INTERVAL_S``,
                   written only while its viewing flag stands (TTL ``LIVE_TTL_S``)
                   {prefix}:worker:cluster = JSON {world_size, attempt, shards, sync_mode, sync_every_ticks}
                   (rank 0 of worker ranks; absent for one worker), {prefix}:worker:status:rank:{r} = rank
                   r's status snapshot (its streams, watermark, and "cluster": shards, tick clock, digest)

``prefix`` is the bus stream name, so two deployments on one Redis do not mix.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

EVENTS = "events"
#: A label for a sequence that streamed without one (``LabelRequest``); applied in the stream's bus order.
LABEL = "label"
#: ``LabelRequest.sequence`` naming the stream's sequence that ended last (before the label, in bus order).
LAST_SEQUENCE = "last"
OPEN, RESET, DELETE = "open", "reset", "delete"
CHECKPOINT, RESTORE, MODEL_RESET = "checkpoint", "restore", "model_reset"
#: The live weights as a file: fields {format: b"nir", dt}; the reply carries it (service.worker.model_export).
MODEL_EXPORT = "model_export"
CONTROL_KINDS = (OPEN, RESET, DELETE, CHECKPOINT, RESTORE, MODEL_RESET, MODEL_EXPORT)
#: ``stream_id`` of the model-wide control entries (not a valid stream id: it has no effect on streams).
MODEL_STREAM = "*"


def sensor_key(prefix: str, stream_id: str) -> str:
    return f"{prefix}:sensor:{stream_id}"


#: Seconds a sensor value outlives two stream TTLs: slack for the worker's housekeeping cadence (1 s).
SENSOR_TTL_SLACK_S = 2.0


def sensor_ttl_s(stream_ttl_s: float) -> float:
    """TTL of a sensor value: twice the stream TTL (``NDOT_STREAM_TTL_S``) plus ``SENSOR_TTL_SLACK_S``.

    The worker re-sets the values of its live streams every ``stream_ttl_s / 2`` (``sensor_refresh_s``),
    so a live stream's value never lapses; one that nobody refreshes (a stream the worker never
    applied, or one dropped while the bus was down) is gone within two stream TTLs.
    """
    return 2.0 * stream_ttl_s + SENSOR_TTL_SLACK_S


def sensor_refresh_s(stream_ttl_s: float) -> float:
    """How often the worker re-sets its live streams' sensor values (see ``sensor_ttl_s``)."""
    return stream_ttl_s / 2.0


def busy_key(prefix: str, stream_id: str) -> str:
    """Set (value: Retry-After seconds) while the stream has more frames queued than it may."""
    return f"{prefix}:busy:{stream_id}"


#: TTL of a busy flag: the worker re-sets it every round while the stream stays busy, so a flag
#: outlives a dead worker by this much at most.
BUSY_TTL_S = 5.0


def viewing_key(prefix: str, stream_id: str) -> str:
    """Set by the API while a live view of the stream is open: the worker publishes ``live_key`` then."""
    return f"{prefix}:viewing:{stream_id}"


def live_key(prefix: str, stream_id: str) -> str:
    """The stream's latest step as JSON for live views (``service.worker.live``)."""
    return f"{prefix}:live:{stream_id}"


#: TTL of a viewing flag: the API re-sets it every second while a view is open, so the worker stops
#: publishing a stream's live value this long after its last viewer left.
VIEWING_TTL_S = 3.0
#: Seconds between two live values of one stream (at most ~10 updates per second, however fast it steps).
LIVE_INTERVAL_S = 0.1
#: TTL of a live value: an idle stream's last step stays visible this long.
LIVE_TTL_S = 60.0


def heartbeat_key(prefix: str) -> str:
    return f"{prefix}:worker:heartbeat"


def status_key(prefix: str) -> str:
    return f"{prefix}:worker:status"


def rank_status_key(prefix: str, rank: int) -> str:
    """The status snapshot of worker rank ``rank`` of a cluster (``ndot workers``)."""
    return f"{prefix}:worker:status:rank:{rank}"


def cluster_key(prefix: str) -> str:
    """Set by rank 0 of a cluster: JSON {world_size, shards, sync_mode, attempt} (absent: one worker)."""
    return f"{prefix}:worker:cluster"


def probe_key(prefix: str) -> str:
    """Written by ``/readyz`` with a short TTL: PING alone does not see a Redis that refuses writes."""
    return f"{prefix}:api:probe"


#: TTL of the readiness probe value.
PROBE_TTL_S = 5.0


def encode_sensor(width: int, height: int) -> bytes:
    return f"{width}x{height}".encode()


def decode_sensor(value: bytes | None) -> tuple[int, int] | None:
    """``(width, height)`` of a sensor value; None when absent (or ``b""``, how older versions closed one)."""
    if not value:
        return None
    width, _, height = value.decode().partition("x")
    return int(width), int(height)


@dataclass(frozen=True, slots=True)
class EventsPacket:
    """The fields of an events entry, decoded (``events`` stays wire bytes until the worker parses it)."""

    events: bytes
    width: int
    height: int
    label: int | None = None
    start: bool = False
    end: bool = False
    posted_s: float = 0.0

    def to_fields(self) -> dict[str, bytes]:
        fields = {
            "events": self.events,
            "width": str(self.width).encode(),
            "height": str(self.height).encode(),
            "start": b"1" if self.start else b"0",
            "end": b"1" if self.end else b"0",
            "posted_s": repr(self.posted_s or time.time()).encode(),
        }
        if self.label is not None:
            fields["label"] = str(self.label).encode()
        return fields

    @classmethod
    def from_fields(cls, fields: dict[str, bytes]) -> EventsPacket:
        """Decode; raises ``ValueError`` naming the field when one is missing or malformed."""
        try:
            label = fields.get("label")
            return cls(
                events=fields["events"],
                width=int(fields["width"]),
                height=int(fields["height"]),
                label=None if label is None else int(label),
                start=fields.get("start") == b"1",
                end=fields.get("end") == b"1",
                posted_s=float(fields.get("posted_s", b"0")),
            )
        except KeyError as err:
            raise ValueError(f"events entry lacks field {err.args[0]!r}") from err


@dataclass(frozen=True, slots=True)
class LabelRequest:
    """The fields of a label entry: ``label`` for sequence ``sequence`` (a number, or ``LAST_SEQUENCE``)."""

    label: int
    sequence: int | str = LAST_SEQUENCE

    def to_fields(self) -> dict[str, bytes]:
        return {"label": str(self.label).encode(), "sequence": str(self.sequence).encode()}

    @classmethod
    def from_fields(cls, fields: dict[str, bytes]) -> LabelRequest:
        """Decode; raises ``ValueError`` naming the field when one is missing or malformed."""
        if "label" not in fields:
            raise ValueError("label entry lacks field 'label'")
        text = fields["label"].decode(errors="replace")
        if not text.lstrip("-").isdigit():
            raise ValueError(f"label entry: label {text[:40]!r} is not an integer")
        label = int(text)
        raw = fields.get("sequence", LAST_SEQUENCE.encode()).decode(errors="replace")
        if raw == LAST_SEQUENCE:
            return cls(label, LAST_SEQUENCE)
        if not raw.isdigit() or int(raw) < 1:
            raise ValueError(
                f"label entry: sequence {raw[:40]!r} is neither a number >= 1 nor {LAST_SEQUENCE!r}"
            )
        return cls(label, int(raw))


def ok_reply(**result: Any) -> bytes:
    return json.dumps({"ok": True, **result}).encode()


def error_reply(status: int, detail: str) -> bytes:
    return json.dumps({"ok": False, "status": status, "detail": detail}).encode()


def decode_reply(payload: bytes) -> dict[str, Any]:
    return json.loads(payload)
