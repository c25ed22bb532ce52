"""Operations (open, no key): liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.api.context import Context
from service.api.schemas import Readiness
from service.bus import BusCommandError, BusError, BusRefused, BusUnavailable, messages

log = logging.getLogger("ndot.api")
router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Bus reachable and taking writes, model loaded, worker heartbeat fresh",
)
async def readyz(ctx: Context) -> Any:
    """Ready when a probe value can be written (PING alone does not see OOM, MISCONF, READONLY, ...)
    and the worker's heartbeat is fresh. A bus that refuses writes is still read, for the worker's state."""
    reasons: list[str] = []
    readable = True
    try:
        probe = repr(time.time()).encode()
        await ctx.bus.set_value(messages.probe_key(ctx.prefix), probe, ttl_s=messages.PROBE_TTL_S)
        bus_ok = True
    except BusError as err:
        ctx.bus_failed(err, "/readyz")
        reasons.append(_not_ready(err))
        bus_ok = False
        readable = err.kind != "unreachable"  # a refusing Redis still answers reads
    status: dict[str, Any] = {}
    age = None
    if readable:
        try:
            beat = await ctx.bus.get_value(messages.heartbeat_key(ctx.prefix))  # b"" once a worker stopped
            age = time.time() - float(beat) if beat else None
            status = await ctx.status()
        except BusError as err:
            ctx.bus_failed(err, "/readyz")
            readable = False
            if bus_ok:
                reasons.append(_not_ready(err))
                bus_ok = False
    worker_ok = age is not None and age <= ctx.settings.heartbeat_timeout_s
    if readable and not worker_ok:
        reasons.append("no worker heartbeat" if age is None else f"worker heartbeat {age:.1f} s old")
    if readable and not status.get("model"):
        reasons.append("no model loaded")
    ready = not reasons
    body = {
        "ready": ready,
        "bus": bus_ok,
        "worker": worker_ok,
        "model": status.get("model"),
        "model_version": status.get("model_version"),
        "heartbeat_age_s": age,
        "reasons": reasons,
    }
    return JSONResponse(body, status_code=200 if ready else 503)


def _not_ready(err: BusError) -> str:
    """A readiness reason for a bus failure: ``bus refuses writes (OOM)``, ``bus unreachable``, ..."""
    if isinstance(err, BusRefused):
        return f"bus refuses writes ({err.reason})"
    if isinstance(err, BusUnavailable):
        return "bus unreachable"
    if isinstance(err, BusCommandError):
        return f"bus error ({err.code})"
    return f"bus error ({type(err).__name__})"


@router.get(
    "/metrics", summary="Prometheus text exposition", responses={200: {"content": {"text/plain": {}}}}
)
async def metrics(ctx: Context) -> Response:
    try:
        ctx.metrics.bus_lag.set(await ctx.bus.lag())
    except BusError as err:  # a scrape must not fail because the bus is down; the gauge keeps its value
        ctx.bus_failed(err, "/metrics")
    except Exception:
        log.debug("event=metrics_bus_lag_unavailable")
    data, content_type = ctx.metrics.exposition()
    return Response(data, media_type=content_type)
