"""What every route needs, injected by FastAPI: the ``ServiceContext`` and shared route parameters."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Path, Request

from service.api.auth import require_admin, require_ingest
from service.api.errors import ApiError, BusErrorLog
from service.api.schemas import STREAM_ID_PATTERN, ErrorDetail
from service.bus import Bus, BusError, messages
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("ndot.api")
INGEST = [Depends(require_ingest)]  # route dependencies: the key check and rate limit (service.api.auth)
ADMIN = [Depends(require_admin)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail, "description": text}
    for code, text in {
        400: "Body is not valid JSON (syntax, encoding, nesting too deep), or the client hung up mid-upload.",
        401: "No API key, or an unknown one (send `Authorization: Bearer <key>` or `X-API-Key`).",
        403: "An ingest key on an admin route.",
        404: "Unknown stream or checkpoint.",
        409: "The stream is open with another sensor size.",
        413: "Body over the size limit (or larger than the bus's whole byte bound).",
        415: "Content type is neither application/octet-stream nor application/json.",
        422: "Bad events, label or parameter; the message names the index and value.",
        429: "Rate limit of the API key exceeded; retry after the Retry-After header.",
        500: "The bus answered an unexpected error (named in the detail); retrying alone will not help.",
        503: "Backpressure (bus lag or bytes), bus unreachable or refusing writes (OOM, READONLY, ...); "
        "retry after the Retry-After header.",
        504: "The worker did not reply in time; the packet stays on the bus and is still applied.",
    }.items()
}


@dataclass
class ServiceContext:
    """The settings, bus and metrics of one app, and the bus conversations routes share."""

    settings: Settings
    bus: Bus
    metrics: ServiceMetrics
    bus_log: BusErrorLog = field(default_factory=BusErrorLog)

    @property
    def prefix(self) -> str:
        return self.settings.bus_stream

    def bus_failed(self, err: BusError, where: str) -> None:
        """Count a failed bus call (``ndot_bus_errors_total{side="api"}``) and log it without a flood."""
        self.metrics.bus_error("api", err.kind)
        self.bus_log(err, where)

    async def sensor(self, stream_id: str) -> tuple[int, int] | None:
        return messages.decode_sensor(await self.bus.get_value(messages.sensor_key(self.prefix, stream_id)))

    async def stream_values(self, stream_id: str) -> tuple[tuple[int, int] | None, bytes | None]:
        """The stream's sensor size and busy flag, in one round trip (what every packet is checked against)."""
        keys = [messages.sensor_key(self.prefix, stream_id), messages.busy_key(self.prefix, stream_id)]
        sensor, busy = await self.bus.get_values(keys)
        return messages.decode_sensor(sensor), busy

    async def known_sensor(self, stream_id: str) -> tuple[int, int]:
        """The stream's sensor size (404 when not open)."""
        return self.require_sensor(stream_id, await self.sensor(stream_id))

    async def check_sensor(self, stream_id: str, width: int, height: int) -> tuple[tuple[int, int], bool]:
        """``declared_sensor`` against the stream's sensor size as the bus has it now."""
        return self.declared_sensor(stream_id, width, height, await self.sensor(stream_id))

    @staticmethod
    def require_sensor(stream_id: str, sensor: tuple[int, int] | None) -> tuple[int, int]:
        """``sensor`` (read from the bus), or 404 when the stream is not open."""
        if sensor is None:
            raise ApiError(
                404,
                f"unknown stream {stream_id!r}: open it with PUT /v1/streams/{stream_id} "
                "or width/height query parameters on its first packet",
            )
        return sensor

    def declared_sensor(
        self, stream_id: str, width: int, height: int, current: tuple[int, int] | None
    ) -> tuple[tuple[int, int], bool]:
        """Check a declared sensor size against the stream's ``current`` one (422 outside the limit,
        409 when open with another one).

        Returns ``((width, height), known)``; writes nothing: a stream is registered only once a
        packet or an open for it is on the bus (``register_sensor``), so a refused request leaves none.
        """
        limit = self.settings.max_sensor_size
        if not (1 <= width <= limit and 1 <= height <= limit):
            raise ApiError(422, f"sensor size {width}x{height} outside 1..{limit} pixels per side")
        if current is not None and current != (width, height):
            raise ApiError(
                409,
                f"stream {stream_id!r} is open with sensor {current[0]}x{current[1]}, "
                f"not {width}x{height}; DELETE it first",
            )
        return (width, height), current is not None

    async def register_sensor(self, stream_id: str, width: int, height: int) -> None:
        """Record a stream's sensor size for the packets that follow, before the worker applies the first.

        Best effort, after the packet is on the bus: the worker writes the same value when it applies
        it, so a bus failure here must not turn an accepted packet into an error (a client would resend).
        """
        key = messages.sensor_key(self.prefix, stream_id)
        try:
            await self.bus.set_value(
                key,
                messages.encode_sensor(width, height),
                ttl_s=messages.sensor_ttl_s(self.settings.stream_ttl_s),
            )
        except BusError as err:  # unreachable, refusing, unexpected: the packet is on the bus all the same
            self.bus_failed(err, "register_sensor")
            log.warning("event=sensor_not_registered stream=%s error=%r", stream_id, err.summary)

    async def status(self) -> dict[str, Any]:
        """The worker's latest status snapshot (empty before the worker first wrote one).

        With worker ranks (``ndot workers``) the ranks' snapshots merged: every rank's streams (each
        with its ``rank``); the model fields and the checkpoints (committed rounds: the group's) of rank 0.
        """
        cluster, ranks = await self.cluster_status()
        if cluster is None:
            raw = await self.bus.get_value(messages.status_key(self.prefix))
            return json.loads(raw) if raw else {}
        merged: dict[str, Any] = {"checkpoints": [], **(ranks[0] or {}), "streams": []}
        for rank, status in enumerate(ranks):
            merged["streams"] += [{**item, "rank": rank} for item in (status or {}).get("streams", [])]
        return merged

    async def cluster_status(self) -> tuple[dict[str, Any] | None, list[dict[str, Any] | None]]:
        """``(cluster, [status of rank 0, 1, ...])`` as the ranks wrote them; ``(None, [])`` for one worker."""
        raw = await self.bus.get_value(messages.cluster_key(self.prefix))
        if not raw:
            return None, []
        cluster = json.loads(raw)
        keys = [messages.rank_status_key(self.prefix, rank) for rank in range(int(cluster["world_size"]))]
        return cluster, [json.loads(value) if value else None for value in await self.bus.get_values(keys)]

    async def request(
        self, kind: str, stream_id: str, fields: dict[str, bytes] | None = None
    ) -> dict[str, Any]:
        """Publish a control entry and wait for the worker's answer (504 on timeout)."""
        entry_id = await self.bus.publish(kind, stream_id, fields or {})
        return await self.reply(entry_id)

    async def reply(self, entry_id: str) -> dict[str, Any]:
        """The worker's answer to entry ``entry_id`` (504 when none comes in time).

        The entry is on the bus already, so a bus failure while waiting (unreachable, refusing, an
        unexpected answer) is a 504 too, never a 503: a 503 tells the client to send again, which
        would apply the packet twice.
        """
        timeout_s = self.settings.request_timeout_s
        try:
            payload = await self.bus.wait_reply(entry_id, timeout_s)
        except BusError as err:
            self.bus_failed(err, "reply")  # counted, and its cause logged for operators
            log.warning("event=reply_lost entry=%s error=%r", entry_id, err.summary)
            raise ApiError(
                504,
                f"entry {entry_id} was accepted, but the bus failed while waiting for its "
                "reply; do not send it again",
            ) from err
        if payload is None:
            raise ApiError(
                504,
                f"no reply from the worker within {timeout_s:g} s; "
                f"entry {entry_id} stays on the bus and will be applied",
            )
        answer = messages.decode_reply(payload)
        if not answer.get("ok"):
            raise ApiError(int(answer.get("status", 500)), str(answer.get("detail", "worker error")))
        return answer


async def get_context(request: Request) -> ServiceContext:
    """The app's ``ServiceContext`` (async: a sync dependency would cost a thread hop per request)."""
    return request.app.state.service


Context = Annotated[ServiceContext, Depends(get_context)]
StreamId = Annotated[
    str, Path(pattern=STREAM_ID_PATTERN, description="Stream id, [A-Za-z0-9_.-]{1,64}.", examples=["cam-1"])
]
