"""Every error the API answers, mapped to HTTP in one place: ``{"detail": "<message>"}`` bodies.

ApiError(status)          -> status (400 unreadable JSON, 404 unknown stream, 409, 413, 415, 422, 504 ...)
EventError                -> 422, its message (names the event index and value)
RequestValidationError    -> 422, "query.label: ..." (one line per problem); 400 for a body that is not JSON
HTTPException             -> its status; FastAPI's "error parsing the body" says what was wrong
BusFull                   -> 503 + Retry-After (backpressure)
BusUnavailable            -> 503 + Retry-After (bus down); the cause is logged, never answered (no URL, no host)

Details name limits, indices and values the client sent, never server paths or connection URLs.
"""

from __future__ import annotations

import logging
import math

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ndot_core.events.layout import EventError
from service.bus import BusFull, BusUnavailable

#: Retry-After (s) when the bus is unreachable.
UNAVAILABLE_RETRY_AFTER_S = 1
#: FastAPI's detail when a JSON body fails to parse for another reason than a syntax error.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"
NOT_JSON = "body is not valid JSON"
log = logging.getLogger("ndot.api")


class ApiError(Exception):
    """An answer other than success, with its HTTP status and a message for the client."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail
        self.headers = headers


def _answer(status: int, detail: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


def _shown(value: object) -> str:
    """`` (got ...)`` for a validation problem's input, at most 60 characters (deep nesting is no crash)."""
    if value is None:
        return ""
    try:
        return f" (got {value!r:.60})"
    except RecursionError:
        return f" (got a deeply nested {type(value).__name__})"


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
        if request.method == "POST" and request.url.path.endswith("/events"):  # refused before its route
            request.app.state.service.metrics.packets.labels(outcome="rejected").inc()
        lines = []
        for problem in err.errors():
            loc = problem.get("loc", ())
            if problem.get("type") == "json_invalid":  # the body is not JSON at all: 400, as for events
                reason = problem.get("ctx", {}).get("error", "JSON decode error")
                where = f" at character {loc[1]}" if len(loc) > 1 else ""
                return _answer(400, f"{NOT_JSON}: {reason}{where}")
            where = ".".join(str(part) for part in loc)
            lines.append(f"{where}: {problem.get('msg', 'invalid')}{_shown(problem.get('input'))}")
        return _answer(422, "; ".join(lines) or "invalid request")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        if err.status_code == 400 and err.detail == _FASTAPI_BODY_ERROR:  # RecursionError, bad UTF-8, ...
            cause = err.__cause__
            if isinstance(cause, ClientDisconnect):  # nobody is left to answer: one line, no traceback
                log.info("event=client_disconnected path=%s", request.url.path)
                return _answer(400, "client disconnected before the body was complete")
            reason = (
                "arrays or objects nested too deeply"
                if isinstance(cause, RecursionError)
                else f"{type(cause).__name__}: {cause}"
                if isinstance(cause, ValueError)
                else "unreadable"
            )
            return _answer(400, f"{NOT_JSON}: {reason}")
        return await http_exception_handler(request, err)

    @app.exception_handler(BusFull)
    async def bus_full(_: Request, err: BusFull) -> JSONResponse:
        retry = max(1, math.ceil(err.retry_after_s))
        return _answer(503, f"service busy: {err}", {"Retry-After": str(retry)})

    @app.exception_handler(BusUnavailable)
    async def bus_unavailable(request: Request, err: BusUnavailable) -> JSONResponse:
        log.warning("event=bus_unavailable path=%s error=%r", request.url.path, str(err))  # for operators
        retry = UNAVAILABLE_RETRY_AFTER_S
        return _answer(503, f"bus unavailable; retry after {retry} s", {"Retry-After": str(retry)})
