"""Every error the API answers, mapped to HTTP in one place: ``{"detail": "<message>"}`` bodies.

ApiError(status)          -> status (400 unreadable JSON, 404 unknown stream, 409, 413, 415, 422, 504 ...)
EventError                -> 422, its message (names the event index and value)
RequestValidationError    -> 422, "query.label: ..." (one line per problem); 400 for a body that is not JSON
HTTPException             -> its status; FastAPI's "error parsing the body" says what was wrong
BusFull                   -> 503 + Retry-After (backpressure: lag or bytes)
BusUnavailable            -> 503 + Retry-After (bus down): "bus unavailable; retry after 1 s"
BusRefused                -> 503 + Retry-After (Redis up, refusing writes): "bus refuses writes (OOM); ..."
BusEntryTooLarge          -> 413 (an entry larger than the bus's whole byte bound)
BusCommandError, other    -> 500 "bus error (WRONGTYPE): ..." (an unexpected error answer: retrying alone
  BusError                   will not help, an operator must look)
Bus failures are counted (ndot_bus_errors_total{side="api"}) and logged (``BusErrorLog``: one line per
kind, then at most one per 10 s); the cause is logged, never answered (no URL, no host).

Details name limits, indices and values the client sent, never server paths or connection URLs.
"""

from __future__ import annotations

import logging
import math
import time

from fastapi import FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ndot_core.events.layout import EventError
from service.bus import BusCommandError, BusEntryTooLarge, BusError, BusFull, BusRefused, BusUnavailable

#: Retry-After (s) when the bus is unreachable.
UNAVAILABLE_RETRY_AFTER_S = 1
#: FastAPI's detail when a JSON body fails to parse for another reason than a syntax error.
_FASTAPI_BODY_ERROR = "There was an error parsing the body"
NOT_JSON = "body is not valid JSON"
log = logging.getLogger("ndot.api")


class BusErrorLog:
    """Logs bus failures without a flood: the first of each ``BusError.summary``, then one per ``every_s``."""

    def __init__(self, every_s: float = 10.0) -> None:
        self.every_s = every_s
        self._seen: dict[str, tuple[float, int]] = {}  # summary -> (last logged, failures since)

    def __call__(self, err: BusError, where: str) -> None:
        now = time.monotonic()
        last, since = self._seen.get(err.summary, (None, 0))
        if last is not None and now - last < self.every_s:
            self._seen[err.summary] = (last, since + 1)
            return
        self._seen[err.summary] = (now, 0)
        log.warning(
            "event=bus_unavailable kind=%s where=%s error=%r more_since_last_line=%d",
            err.summary,
            where,
            str(err),
            since,
        )


def bus_detail(err: BusError, retry_after_s: int = UNAVAILABLE_RETRY_AFTER_S) -> str:
    """What a client is told about a bus failure: the kind and reason, never the server."""
    if isinstance(err, BusRefused):
        return f"bus refuses writes ({err.reason}); retry after {retry_after_s} s"
    if isinstance(err, BusUnavailable):
        return f"bus unavailable; retry after {retry_after_s} s"
    if isinstance(err, BusCommandError):
        return f"bus error ({err.code}): Redis answered an unexpected error; see the server log"
    return f"bus error ({type(err).__name__}); see the server log"


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

    @app.exception_handler(BusUnavailable)  # BusRefused too
    async def bus_unavailable(request: Request, err: BusUnavailable) -> JSONResponse:
        request.app.state.service.bus_failed(err, request.url.path)  # counted, and logged for operators
        retry = UNAVAILABLE_RETRY_AFTER_S
        return _answer(503, bus_detail(err, retry), {"Retry-After": str(retry)})

    @app.exception_handler(BusEntryTooLarge)
    async def bus_entry_too_large(_: Request, err: BusEntryTooLarge) -> JSONResponse:
        return _answer(413, f"{err}; send smaller packets")

    @app.exception_handler(BusError)  # BusCommandError, and anything else the bus raises
    async def bus_error(request: Request, err: BusError) -> JSONResponse:
        request.app.state.service.bus_failed(err, request.url.path)
        return _answer(500, bus_detail(err))
