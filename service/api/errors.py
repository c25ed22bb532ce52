"""Every error the API answers, mapped to HTTP in one place: ``{"detail": "<message>"}`` bodies.

ApiError(status)          -> status (404 unknown stream, 409, 413, 415, 422, 504 ...)
EventError                -> 422, its message (names the event index and value)
RequestValidationError    -> 422, "query.label: ..." (one line per problem)
BusFull                   -> 503 + Retry-After (backpressure)
BusUnavailable            -> 503 + Retry-After (bus down)
"""

from __future__ import annotations

import math

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from ndot_core.events.layout import EventError
from service.bus import BusFull, BusUnavailable

#: Retry-After (s) when the bus is unreachable.
UNAVAILABLE_RETRY_AFTER_S = 1


class ApiError(Exception):
    """An answer other than success, with its HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    """Register the mapping above on ``app``."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError) -> JSONResponse:
        return _answer(err.status, err.detail, err.headers)

    @app.exception_handler(EventError)
    async def event_error(_: Request, err: EventError) -> JSONResponse:
        return _answer(422, f"bad events: {err}")

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        if request.method == "POST" and request.url.path.endswith(
            "/events"
        ):  # a packet refused before its route
            request.app.state.service.metrics.packets.labels(outcome="rejected").inc()
        lines = []
        for problem in err.errors():
            where = ".".join(str(part) for part in problem.get("loc", ()))
            got = (
                f" (got {problem['input']!r:.60})"
                if "input" in problem and problem["input"] is not None
                else ""
            )
            lines.append(f"{where}: {problem.get('msg', 'invalid')}{got}")
        return _answer(422, "; ".join(lines) or "invalid request")

    @app.exception_handler(BusFull)
    async def bus_full(_: Request, err: BusFull) -> JSONResponse:
        retry = max(1, math.ceil(err.retry_after_s))
        return _answer(503, f"service busy: {err}", {"Retry-After": str(retry)})

    @app.exception_handler(BusUnavailable)
    async def bus_unavailable(_: Request, err: BusUnavailable) -> JSONResponse:
        return _answer(503, f"bus unavailable: {err}", {"Retry-After": str(UNAVAILABLE_RETRY_AFTER_S)})
