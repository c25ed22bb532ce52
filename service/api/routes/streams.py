"""Streams: post event packets, label a sequence after the fact, open, list, inspect, reset and delete a stream."""

from __future__ import annotations

import asyncio
import time
from typing import Annotated, Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse

from ndot_core.events.framing import windows_spanned
from ndot_core.events.layout import WIRE_DTYPE
from service.api.body import BINARY, EVENTS_BODY, JSON, LARGE_BODY_BYTES, parse_events, read_body
from service.api.context import ADMIN, ERRORS, INGEST, Context, StreamId
from service.api.errors import ApiError
from service.api.limits import retry_after_header
from service.api.schemas import (
    LabelResult,
    PacketAccepted,
    PacketResult,
    SensorSize,
    SequenceLabel,
    StreamAction,
    StreamInfo,
    StreamList,
)
from service.bus import BusFull, messages
from service.settings import Settings

router = APIRouter(prefix="/v1/streams", tags=["streams"], responses=ERRORS)

#: The events route streams and caps its own body; ``BodyLimit`` leaves paths like this one alone.
EVENTS_PATH_PREFIX, EVENTS_PATH_SUFFIX = "/v1/streams/", "/events"


@router.post(
    "/{stream_id}/events",
    dependencies=INGEST,
    response_model=PacketResult,
    responses={202: {"model": PacketAccepted, "description": "wait=false: queued."}},
    openapi_extra={"requestBody": EVENTS_BODY},
    summary="Post an event packet; get the predictions of the time-steps it completed",
)
async def post_events(
    request: Request,
    ctx: Context,
    stream_id: StreamId,
    label: Annotated[int | None, Query(description="Class of every step this packet completes.")] = None,
    start: Annotated[bool, Query(description="Begin a new sequence: fresh neuron and framer state.")] = False,
    end: Annotated[
        bool, Query(description="Close the sequence: flush the open window as a last frame.")
    ] = False,
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
            raise ApiError(
                415, f"content type {content_type or '(none)'!r} not accepted; send {BINARY} or {JSON}"
            )
        if label is not None and not 0 <= label < settings.num_classes:
            raise ApiError(422, f"label {label} outside [0, {settings.num_classes})")
        if (width is None) != (height is None):
            raise ApiError(422, "give both width and height, or neither")
        current, busy = await ctx.stream_values(stream_id)
        if width is not None and height is not None:  # checked now, registered once the packet is on the bus
            sensor, known = ctx.declared_sensor(stream_id, width, height, current)
        else:
            sensor, known = ctx.require_sensor(stream_id, current), True
        check_not_busy(ctx, stream_id, busy)
        body = await read_body(request, settings.max_body_bytes)
        parse_args = (body, content_type, sensor, settings.max_events_per_packet)
        if len(body) > LARGE_BODY_BYTES:  # keep the event loop free while a big packet is checked
            events = await asyncio.to_thread(parse_events, *parse_args)
        else:
            events = parse_events(*parse_args)
        check_work(np.frombuffer(events, dtype=WIRE_DTYPE)["t"], settings)
        packet = messages.EventsPacket(events, sensor[0], sensor[1], label, start, end, posted_s)
        entry_id = await ctx.bus.publish(messages.EVENTS, stream_id, packet.to_fields())
        if not known:
            await ctx.register_sensor(stream_id, *sensor)
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
    return {
        "stream_id": stream_id,
        "packet_id": entry_id,
        "steps": answer.get("steps", []),
        "sequence": answer.get("sequence"),
    }


@router.post(
    "/{stream_id}/label",
    dependencies=INGEST,
    response_model=LabelResult,
    summary="Label a sequence after it streamed: it is scored, then learned (learn_at=sequence)",
)
async def label_sequence(ctx: Context, stream_id: StreamId, body: SequenceLabel) -> Any:
    """The label goes in the stream's bus order: ``"last"`` names the sequence that ended before it.

    The answer comes once that sequence's last frame has run: its prediction (made before any learning
    from it) against the label. 404 unknown stream; 409 no such sequence held (too old, labelled
    already, not begun) or the worker learns per step; 422 a label outside [0, K).
    """
    classes = ctx.settings.num_classes
    if not 0 <= body.label < classes:
        raise ApiError(422, f"label {body.label} outside [0, {classes})")
    await ctx.known_sensor(stream_id)
    request = messages.LabelRequest(body.label, body.sequence)
    answer = await ctx.request(messages.LABEL, stream_id, request.to_fields())
    sequence = answer.get("sequence") or {"label": body.label, "learning": "applied_before"}
    return {"stream_id": stream_id, **sequence}


def check_not_busy(ctx: Context, stream_id: str, flag: bytes | None) -> None:
    """429 + Retry-After while the worker flags the stream as too far behind (its queue of frames)."""
    if flag:
        wait_s = float(flag)
        raise ApiError(
            429,
            f"stream {stream_id!r} has more frames queued in the worker than "
            f"NDOT_MAX_STREAM_BACKLOG_FRAMES={ctx.settings.max_stream_backlog_frames}; "
            f"this packet was not taken: send it again in {wait_s:.1f} s",
            retry_after_header(wait_s),
        )


def check_work(t: np.ndarray, settings: Settings) -> None:
    """422 unless the packet's events cross at most ``max_packet_windows`` window boundaries.

    That bounds the learner steps one small packet can cause (the worker checks the exact count too).
    """
    span = windows_spanned(t, settings.window_us)
    if span > settings.max_packet_windows:
        raise ApiError(
            422,
            f"packet spans {span} windows of {settings.window_us} µs (t from {int(t.min())} to "
            f"{int(t.max())}); at most {settings.max_packet_windows} per packet "
            "(NDOT_MAX_PACKET_WINDOWS): send smaller packets",
        )


@router.put(
    "/{stream_id}",
    dependencies=INGEST,
    response_model=StreamInfo,
    summary="Open a stream with its sensor size",
)
async def open_stream(ctx: Context, stream_id: StreamId, sensor: SensorSize) -> Any:
    await ctx.check_sensor(stream_id, sensor.width, sensor.height)  # the worker registers it when it opens
    fields = {"width": str(sensor.width).encode(), "height": str(sensor.height).encode()}
    return (await ctx.request(messages.OPEN, stream_id, fields))["stream"]


@router.get("", dependencies=INGEST, response_model=StreamList, summary="Live streams")
async def list_streams(ctx: Context) -> Any:
    return {"streams": (await ctx.status()).get("streams", [])}


@router.get(
    "/{stream_id}",
    dependencies=INGEST,
    response_model=StreamInfo,
    summary="One stream: steps, last prediction, online accuracy",
)
async def get_stream(ctx: Context, stream_id: StreamId) -> Any:
    for info in (await ctx.status()).get("streams", []):
        if info["stream_id"] == stream_id:
            return info
    raise ApiError(404, f"unknown stream {stream_id!r}")


@router.post(
    "/{stream_id}/reset",
    dependencies=INGEST,
    response_model=StreamAction,
    summary="Fresh neuron and framer state for this stream only",
)
async def reset_stream(ctx: Context, stream_id: StreamId) -> Any:
    await ctx.known_sensor(stream_id)
    await ctx.request(messages.RESET, stream_id)
    return {"stream_id": stream_id, "action": "reset", "ok": True}


@router.delete(
    "/{stream_id}",
    dependencies=ADMIN,
    response_model=StreamAction,
    summary="Close a stream and free its state slot",
)
async def delete_stream(ctx: Context, stream_id: StreamId) -> Any:
    await ctx.known_sensor(stream_id)
    await ctx.bus.delete_value(messages.sensor_key(ctx.prefix, stream_id))
    await ctx.request(messages.DELETE, stream_id)
    return {"stream_id": stream_id, "action": "delete", "ok": True}
