"""Operations (open, no key): liveness, readiness and Prometheus metrics."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse

from service.api.context import Context
from service.api.schemas import Readiness
from service.bus import messages

log = logging.getLogger("ndot.api")
router = APIRouter(tags=["ops"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness}},
    summary="Bus reachable, model loaded, worker heartbeat fresh",
)
async def readyz(ctx: Context) -> Any:
    reasons: list[str] = []
    bus_ok = await ctx.bus.ping()
    if not bus_ok:
        reasons.append("bus unreachable")
    status: dict[str, Any] = {}
    age = None
    if bus_ok:
        beat = await ctx.bus.get_value(messages.heartbeat_key(ctx.prefix))  # b"" once a worker stopped
        age = time.time() - float(beat) if beat else None
        status = await ctx.status()
    worker_ok = age is not None and age <= ctx.settings.heartbeat_timeout_s
    if bus_ok and not worker_ok:
        reasons.append("no worker heartbeat" if age is None else f"worker heartbeat {age:.1f} s old")
    if bus_ok and not status.get("model"):
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


@router.get(
    "/metrics", summary="Prometheus text exposition", responses={200: {"content": {"text/plain": {}}}}
)
async def metrics(ctx: Context) -> Response:
    try:
        ctx.metrics.bus_lag.set(await ctx.bus.lag())
    except Exception:  # a scrape must not fail because the bus is down; the gauge keeps its value
        log.debug("event=metrics_bus_lag_unavailable")
    data, content_type = ctx.metrics.exposition()
    return Response(data, media_type=content_type)
