"""The HTTP front end: ``create_api`` builds the FastAPI app (routers, dependencies, lifespan).

Every /v1 route first passes its key check and rate limit (``service.api.auth``); bodies are capped
before they are read (``service.api.limits.BodyLimit``). Routes validate untrusted bytes before
anything reaches the bus, publish, and wait for the worker's reply. Errors become HTTP answers in
one place, ``service.api.errors``. The API knows the bus, never the worker: whoever runs both in one
process (``service.app.create_app``) passes the worker in as a *companion* of the lifespan.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service.api.auth import Gate, KeyRing
from service.api.context import ServiceContext
from service.api.errors import install_error_handlers
from service.api.limits import BodyLimit, RateLimiter
from service.api.routes import checkpoints, cluster, model, operations, streams, view
from service.bus import Bus, BusRefused, make_bus
from service.metrics import ServiceMetrics
from service.settings import Settings

log = logging.getLogger("ndot.api")

#: Something that runs beside the API for the app's lifetime, given the started bus and the metrics.
Companion = Callable[[Bus, ServiceMetrics], AbstractAsyncContextManager[Any]]


def create_api(
    settings: Settings,
    bus: Bus | None = None,
    *,
    metrics: ServiceMetrics | None = None,
    companions: Sequence[Companion] = (),
) -> FastAPI:
    """The API app over ``bus`` (default: the one the settings ask for, owned and closed by the app).

    Raises ``AuthConfigError`` when auth is on without usable keys.
    """
    keys = KeyRing.from_settings(settings)
    own_bus = bus is None
    bus = make_bus(settings) if bus is None else bus
    metrics = metrics or ServiceMetrics(settings.accuracy_window)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            await bus.start()
        except BusRefused as err:  # Redis is up: serve, answering 503 and not ready until it takes writes
            log.warning("event=bus_refuses_writes_at_start reason=%s error=%r", err.reason, str(err))
        async with AsyncExitStack() as stack:
            if own_bus:
                stack.push_async_callback(bus.close)
            for companion in companions:
                await stack.enter_async_context(companion(bus, metrics))
            if keys is None:
                log.warning(
                    "event=auth_disabled message=%r",
                    "NDOT_AUTH=off: no API key is required, anyone who can reach this port may post "
                    "events and restore checkpoints; for local use only",
                )
            auth = "off" if keys is None else f"{len(keys.keys)} keys"
            log.info(
                "event=api_started bus=%s worker=%s auth=%s",
                type(bus).__name__,
                "in-process" if companions else "apart",
                auth,
            )
            yield
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
    app.add_middleware(
        BodyLimit,
        limit_for=lambda path: body_limit(settings, path),
        on_refused=lambda: metrics.refused.labels(reason="too_large").inc(),
    )
    install_error_handlers(app)
    for router in (
        streams.router,
        checkpoints.router,
        model.router,
        operations.router,
        cluster.router,
        view.router,
    ):
        app.include_router(router)
    return app


def body_limit(settings: Settings, path: str) -> int | None:
    """Body cap of a path for ``BodyLimit``: None for the events route, which streams and caps its own."""
    if path.startswith(streams.EVENTS_PATH_PREFIX) and path.endswith(streams.EVENTS_PATH_SUFFIX):
        return None
    return settings.max_control_body_bytes
