"""The service in one process: the API plus, when asked, the worker beside it.

``create_app`` is what ``ndot serve`` and ``ndot api`` run. The API package never imports the
worker; this module, above both, wires them together as a lifespan companion.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service.api.app import Companion, create_api
from service.bus import Bus
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker import Worker


def worker_companion(settings: Settings, started: list[Worker] | None = None) -> Companion:
    """A lifespan companion that runs a ``Worker`` in the app's event loop (appended to ``started``)."""

    @asynccontextmanager
    async def run(bus: Bus, metrics: ServiceMetrics) -> AsyncIterator[Worker]:
        worker = Worker(settings, bus, metrics)
        if started is not None:
            started.append(worker)
        await worker.start()
        worker.run_in_background()
        try:
            yield worker
        finally:
            await worker.stop()

    return run


def create_app(
    settings: Settings,
    bus: Bus | None = None,
    *,
    run_worker: bool | None = None,
    metrics: ServiceMetrics | None = None,
) -> FastAPI:
    """The API app; ``run_worker``: None = run the worker in-process when the bus is embedded.

    ``app.state.workers`` lists the in-process workers once started (``ndot serve`` reads their
    ``shutdown_error`` for its exit code).
    """
    with_worker = (settings.redis_url is None) if run_worker is None else run_worker
    workers: list[Worker] = []
    companions = [worker_companion(settings, workers)] if with_worker else []
    app = create_api(settings, bus, metrics=metrics, companions=companions)
    app.state.workers = workers
    return app
