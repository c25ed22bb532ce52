"""The HTTP API: FastAPI app factory, routes, dependencies and lifespan (docs/design.md).

``create_app(settings, bus)`` builds an app whose lifespan starts the bus and, when the bus is the
embedded one (or ``run_worker=True``, as ``ndot serve`` asks), the worker as a background task in
the same process. Every /v1 route first passes its key check and rate limit (``service.auth``);
bodies are capped before they are read (``service.limits.BodyLimit``). Routes validate untrusted
bytes (``events_from_bytes`` with the stream's sensor size) before anything reaches the bus,
publish, and wait for the worker's reply. Errors become HTTP answers in one place, ``service.errors``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Path, Query, Request, Response
from fastapi.responses import JSONResponse

from service import protocol
from service.auth import Gate, KeyRing, require_admin, require_ingest
from service.bus import Bus, BusFull, BusUnavailable, make_bus
from service.errors import ApiError, install_error_handlers
from service.limits import BodyLimit, RateLimiter
from service.metrics import ServiceMetrics
from service.packet_body import BINARY, EVENTS_BODY, JSON, LARGE_BODY_BYTES, parse_events, read_body
from service.schemas import (
    CHECKPOINT_NAME_PATTERN,
    STREAM_ID_PATTERN,
    CheckpointInfo,
    CheckpointList,
    ErrorDetail,
    ModelInfo,
    PacketAccepted,
    PacketResult,
    Readiness,
    SensorSize,
    StreamAction,
    StreamInfo,
    StreamList,
)
from service.settings import Settings

log = logging.getLogger("ndot.api")

EVENTS_PATH_PREFIX, EVENTS_PATH_SUFFIX = "/v1/streams/", "/events"
INGEST = [Depends(require_ingest)]  # route dependencies: the key check and rate limit (service.auth)
ADMIN = [Depends(require_admin)]
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorDetail, "description": text}
    for code, text in {
        401: "No API key, or an unknown one (send `Authorization: Bearer <key>` or `X-API-Key`).",
        403: "An ingest key on an admin route.",
        404: "Unknown stream or checkpoint.",
        409: "The stream is open with another sensor size.",
        413: "Body over the size limit.",
        415: "Content type is neither application/octet-stream nor application/json.",
        422: "Bad events, label or parameter; the message names the index and value.",
        429: "Rate limit of the API key exceeded; retry after the Retry-After header.",
        503: "Backpressure or bus unreachable; retry after the Retry-After header.",
        504: "The worker did not reply in time; the packet stays on the bus and is still applied.",
    }.items()
}


@dataclass
class ServiceContext:
    """What every route needs, built once per app (dependency-injected)."""

    settings: Settings
    bus: Bus
    metrics: ServiceMetrics

    @property
    def prefix(self) -> str:
        return self.settings.bus_stream

    async def sensor(self, stream_id: str) -> tuple[int, int] | None:
        return protocol.decode_sensor(await self.bus.get_value(protocol.sensor_key(self.prefix, stream_id)))

    async def known_sensor(self, stream_id: str) -> tuple[int, int]:
        sensor = await self.sensor(stream_id)
        if sensor is None:
            raise ApiError(404, f"unknown stream {stream_id!r}: open it with PUT /v1/streams/{stream_id} "
                                "or width/height query parameters on its first packet")  # fmt: skip
        return sensor

    async def open_sensor(self, stream_id: str, width: int, height: int) -> tuple[int, int]:
        """Declare a stream's sensor size (returned); 409 when it is open with another one."""
        limit = self.settings.max_sensor_size
        if not (1 <= width <= limit and 1 <= height <= limit):
            raise ApiError(422, f"sensor size {width}x{height} outside 1..{limit} pixels per side")
        sensor = await self.sensor(stream_id)
        if sensor is not None and sensor != (width, height):
            raise ApiError(409, f"stream {stream_id!r} is open with sensor {sensor[0]}x{sensor[1]}, "
                                f"not {width}x{height}; DELETE it first")  # fmt: skip
        if sensor is None:
            await self.bus.set_value(protocol.sensor_key(self.prefix, stream_id), protocol.encode_sensor(width, height))
        return width, height

    async def status(self) -> dict[str, Any]:
        """The worker's latest status snapshot (empty before the worker first wrote one)."""
        raw = await self.bus.get_value(protocol.status_key(self.prefix))
        return json.loads(raw) if raw else {}

    async def request(self, kind: str, stream_id: str, fields: dict[str, bytes] | None = None) -> dict[str, Any]:
        """Publish a control entry and wait for the worker's answer (504 on timeout)."""
        entry_id = await self.bus.publish(kind, stream_id, fields or {})
        return await self.reply(entry_id)

    async def reply(self, entry_id: str) -> dict[str, Any]:
        """The worker's answer to entry ``entry_id`` (504 when none comes in time).

        The entry is on the bus already, so a bus failure while waiting is a 504 too, never a 503:
        a 503 tells the client to send again, which would apply the packet twice.
        """
        timeout_s = self.settings.request_timeout_s
        try:
            payload = await self.bus.wait_reply(entry_id, timeout_s)
        except BusUnavailable as err:
            raise ApiError(504, f"entry {entry_id} was accepted, but the bus failed while waiting for its "
                                f"reply ({err}); do not send it again") from err  # fmt: skip
        if payload is None:
            raise ApiError(504, f"no reply from the worker within {timeout_s:g} s; "
                                f"entry {entry_id} stays on the bus and will be applied")  # fmt: skip
        answer = protocol.decode_reply(payload)
        if not answer.get("ok"):
            raise ApiError(int(answer.get("status", 500)), str(answer.get("detail", "worker error")))
        return answer


async def get_context(request: Request) -> ServiceContext:
    """The app's ``ServiceContext`` (async: a sync dependency would cost a thread hop per request)."""
    return request.app.state.service


Context = Annotated[ServiceContext, Depends(get_context)]
StreamId = Annotated[str, Path(pattern=STREAM_ID_PATTERN, description="Stream id, [A-Za-z0-9_.-]{1,64}.",
                               examples=["cam-1"])]  # fmt: skip


def build_router(app: FastAPI) -> None:
    """Attach every route of the API to ``app``."""

    @app.post(
        "/v1/streams/{stream_id}/events", tags=["streams"], response_model=PacketResult, dependencies=INGEST,
        responses={202: {"model": PacketAccepted, "description": "wait=false: queued."}, **ERRORS},
        openapi_extra={"requestBody": EVENTS_BODY},
        summary="Post an event packet; get the predictions of the time-steps it completed",
    )  # fmt: skip
    async def post_events(
        request: Request,
        ctx: Context,
        stream_id: StreamId,
        label: Annotated[int | None, Query(description="Class of every step this packet completes.")] = None,
        start: Annotated[bool, Query(description="Begin a new sequence: fresh neuron and framer state.")] = False,
        end: Annotated[bool, Query(description="Close the sequence: flush the open window as a last frame.")] = False,
        wait: Annotated[bool, Query(description="Wait for the predictions (200) or not (202).")] = True,
        width: Annotated[int | None, Query(description="Sensor width, to open the stream.")] = None,
        height: Annotated[int | None, Query(description="Sensor height, to open the stream.")] = None,
    ) -> Any:
        posted_s = time.time()
        received = time.perf_counter()
        settings, metrics = ctx.settings, ctx.metrics
        try:
            content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
            if content_type not in (BINARY, JSON):
                raise ApiError(415, f"content type {content_type or '(none)'!r} not accepted; "
                                    f"send {BINARY} or {JSON}")  # fmt: skip
            if label is not None and not 0 <= label < settings.num_classes:
                raise ApiError(422, f"label {label} outside [0, {settings.num_classes})")
            if (width is None) != (height is None):
                raise ApiError(422, "give both width and height, or neither")
            if width is not None and height is not None:
                sensor = await ctx.open_sensor(stream_id, width, height)
            else:
                sensor = await ctx.known_sensor(stream_id)
            body = await read_body(request, settings.max_body_bytes)
            parse_args = (body, content_type, sensor, settings.max_events_per_packet)
            if len(body) > LARGE_BODY_BYTES:  # keep the event loop free while a big packet is checked
                events = await asyncio.to_thread(parse_events, *parse_args)
            else:
                events = parse_events(*parse_args)
            packet = protocol.EventsPacket(events, sensor[0], sensor[1], label, start, end, posted_s)
            entry_id = await ctx.bus.publish(protocol.EVENTS, stream_id, packet.to_fields())
        except BusFull:
            metrics.packets.labels(outcome="throttled").inc()
            raise
        except Exception:
            metrics.packets.labels(outcome="rejected").inc()
            raise
        metrics.packets.labels(outcome="accepted").inc()
        if not wait:
            return JSONResponse({"stream_id": stream_id, "packet_id": entry_id}, status_code=202)
        answer = await ctx.reply(entry_id)
        metrics.prediction_latency.observe(time.perf_counter() - received)
        return {"stream_id": stream_id, "packet_id": entry_id, "steps": answer.get("steps", [])}

    @app.put("/v1/streams/{stream_id}", tags=["streams"], dependencies=INGEST, response_model=StreamInfo, responses=ERRORS,
             summary="Open a stream with its sensor size")  # fmt: skip
    async def open_stream(ctx: Context, stream_id: StreamId, sensor: SensorSize) -> Any:
        await ctx.open_sensor(stream_id, sensor.width, sensor.height)
        fields = {"width": str(sensor.width).encode(), "height": str(sensor.height).encode()}
        return (await ctx.request(protocol.OPEN, stream_id, fields))["stream"]

    @app.get("/v1/streams", tags=["streams"], dependencies=INGEST, responses=ERRORS, response_model=StreamList, summary="Live streams")
    async def list_streams(ctx: Context) -> Any:
        return {"streams": (await ctx.status()).get("streams", [])}

    @app.get("/v1/streams/{stream_id}", tags=["streams"], dependencies=INGEST, response_model=StreamInfo, responses=ERRORS,
             summary="One stream: steps, last prediction, online accuracy")  # fmt: skip
    async def get_stream(ctx: Context, stream_id: StreamId) -> Any:
        for info in (await ctx.status()).get("streams", []):
            if info["stream_id"] == stream_id:
                return info
        raise ApiError(404, f"unknown stream {stream_id!r}")

    @app.post("/v1/streams/{stream_id}/reset", tags=["streams"], dependencies=INGEST, response_model=StreamAction, responses=ERRORS,
              summary="Fresh neuron and framer state for this stream only")  # fmt: skip
    async def reset_stream(ctx: Context, stream_id: StreamId) -> Any:
        await ctx.known_sensor(stream_id)
        await ctx.request(protocol.RESET, stream_id)
        return {"stream_id": stream_id, "action": "reset", "ok": True}

    @app.delete("/v1/streams/{stream_id}", tags=["streams"], dependencies=ADMIN, response_model=StreamAction, responses=ERRORS,
                summary="Close a stream and free its state slot")  # fmt: skip
    async def delete_stream(ctx: Context, stream_id: StreamId) -> Any:
        await ctx.known_sensor(stream_id)
        await ctx.bus.set_value(protocol.sensor_key(ctx.prefix, stream_id), b"")
        await ctx.request(protocol.DELETE, stream_id)
        return {"stream_id": stream_id, "action": "delete", "ok": True}

    @app.post("/v1/checkpoints", tags=["model"], dependencies=ADMIN, response_model=CheckpointInfo, responses=ERRORS,
              summary="Save a checkpoint now")  # fmt: skip
    async def save_checkpoint(ctx: Context) -> Any:
        return (await ctx.request(protocol.CHECKPOINT, protocol.MODEL_STREAM))["checkpoint"]

    @app.get("/v1/checkpoints", tags=["model"], dependencies=ADMIN, responses=ERRORS, response_model=CheckpointList, summary="Checkpoints, oldest first")
    async def list_checkpoints(ctx: Context) -> Any:
        return {"checkpoints": (await ctx.status()).get("checkpoints", [])}

    @app.post("/v1/checkpoints/{name}/restore", tags=["model"], dependencies=ADMIN, response_model=CheckpointInfo, responses=ERRORS,
              summary="Restore weights, optimizer, stream states and bus offsets from a checkpoint")  # fmt: skip
    async def restore_checkpoint(
        ctx: Context, name: Annotated[str, Path(pattern=CHECKPOINT_NAME_PATTERN, examples=["ckpt-20250101T120000.000000-v120"])]
    ) -> Any:
        if ".." in name or name.startswith("."):
            raise ApiError(422, f"checkpoint name {name!r} may not contain '..' or start with '.'")
        return (await ctx.request(protocol.RESTORE, protocol.MODEL_STREAM, {"name": name.encode()}))["checkpoint"]

    @app.post("/v1/model/reset", tags=["model"], dependencies=ADMIN, response_model=ModelInfo, responses=ERRORS,
              summary="Fresh weights and optimizer (every stream's neuron state is zeroed too)")  # fmt: skip
    async def reset_model(ctx: Context) -> Any:
        answer = await ctx.request(protocol.MODEL_RESET, protocol.MODEL_STREAM)
        return {"model": answer["model"], "model_version": answer["model_version"]}

    @app.get("/healthz", tags=["ops"], summary="The process is alive")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], response_model=Readiness, responses={503: {"model": Readiness}},
             summary="Bus reachable, model loaded, worker heartbeat fresh")  # fmt: skip
    async def readyz(ctx: Context) -> Any:
        reasons: list[str] = []
        bus_ok = await ctx.bus.ping()
        if not bus_ok:
            reasons.append("bus unreachable")
        status: dict[str, Any] = {}
        age = None
        if bus_ok:
            beat = await ctx.bus.get_value(protocol.heartbeat_key(ctx.prefix))  # b"" once a worker stopped
            age = time.time() - float(beat) if beat else None
            status = await ctx.status()
        worker_ok = age is not None and age <= ctx.settings.heartbeat_timeout_s
        if bus_ok and not worker_ok:
            reasons.append("no worker heartbeat" if age is None else f"worker heartbeat {age:.1f} s old")
        if bus_ok and not status.get("model"):
            reasons.append("no model loaded")
        ready = not reasons
        body = {"ready": ready, "bus": bus_ok, "worker": worker_ok, "model": status.get("model"),
                "model_version": status.get("model_version"), "heartbeat_age_s": age, "reasons": reasons}  # fmt: skip
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/metrics", tags=["ops"], summary="Prometheus text exposition",
             responses={200: {"content": {"text/plain": {}}}})  # fmt: skip
    async def metrics_route(ctx: Context) -> Response:
        try:
            ctx.metrics.bus_lag.set(await ctx.bus.lag())
        except Exception:  # a scrape must not fail because the bus is down; the gauge keeps its value
            log.debug("event=metrics_bus_lag_unavailable")
        data, content_type = ctx.metrics.exposition()
        return Response(data, media_type=content_type)


def create_app(
    settings: Settings,
    bus: Bus | None = None,
    *,
    run_worker: bool | None = None,
    metrics: ServiceMetrics | None = None,
) -> FastAPI:
    """The API app. ``run_worker``: None = run the worker in-process when the bus is embedded."""
    keys = KeyRing.from_settings(settings)  # AuthConfigError: auth on without (usable) keys
    own_bus = bus is None
    bus = make_bus(settings) if bus is None else bus
    metrics = metrics or ServiceMetrics(settings.accuracy_window)
    with_worker = (settings.redis_url is None) if run_worker is None else run_worker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await bus.start()
        worker = None
        if with_worker:
            from service.worker import Worker

            worker = Worker(settings, bus, metrics)
            await worker.start()
            worker.run_in_background()
        if keys is None:
            log.warning("event=auth_disabled message=%r", "NDOT_AUTH=off: no API key is required, anyone who can "
                        "reach this port may post events and restore checkpoints; for local use only")  # fmt: skip
        log.info("event=api_started bus=%s worker=%s auth=%s", type(bus).__name__,
                 "in-process" if worker else "apart", "off" if keys is None else f"{len(keys.keys)} keys")  # fmt: skip
        try:
            yield
        finally:
            if worker is not None:
                await worker.stop()
            if own_bus:
                await bus.close()
            log.info("event=api_stopped")

    app = FastAPI(
        title="ndot-stream",
        version="0.1.0",
        summary="Streaming online learning for event cameras: an SNN trained with NDOT while it runs.",
        lifespan=lifespan,
    )
    app.state.service = ServiceContext(settings, bus, metrics)
    limiter = RateLimiter(settings.rate_limit_rps, settings.rate_limit_burst)
    app.state.gate = Gate(keys, limiter, lambda reason: metrics.refused.labels(reason=reason).inc())
    app.add_middleware(BodyLimit, limit_for=lambda path: body_limit(settings, path),
                       on_refused=lambda: metrics.refused.labels(reason="too_large").inc())  # fmt: skip
    install_error_handlers(app)
    build_router(app)
    return app


def body_limit(settings: Settings, path: str) -> int | None:
    """Body cap of a path for ``BodyLimit``: None for the events route, which streams and caps its own."""
    if path.startswith(EVENTS_PATH_PREFIX) and path.endswith(EVENTS_PATH_SUFFIX):
        return None
    return settings.max_control_body_bytes
