"""The HTTP server: uvicorn, configured from the settings, with deadlines on receiving a request.

uvicorn bounds idle keep-alive connections (``timeout_keep_alive``) and connections in flight
(``limit_concurrency``) but has no deadline for *receiving* a request: its keep-alive timer is
reset by every byte, so a client that trickles a header a byte at a time holds a connection for
ever (slowloris; uvicorn issue #157 lists the timeouts as not done). ASGI middleware cannot help,
it runs only once the headers are parsed. So ``DeadlineH11Protocol`` wraps uvicorn's h11 protocol:

    connection made or first byte of a request   -> header deadline (http_header_timeout_s)
    headers parsed (h11 their_state SEND_BODY)   -> body deadline   (http_body_timeout_s)
    request complete (DONE)                      -> no deadline (the app's time is its own)
    header deadline passes                       -> 408, connection closed
    body deadline passes                         -> connection closed (the app sees a disconnect)
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from service.settings import Settings

log = logging.getLogger("ndot.api")

HEADERS, BODY = "headers", "body"


class DeadlineH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline for each request's headers and for its body."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline: asyncio.TimerHandle | None = None
        self._phase: str | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm(HEADERS)

    def connection_lost(self, exc: Exception | None) -> None:
        self._arm(None)
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        self._follow_state()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._phase is None:  # a pipelined next request may already be half in
            self._follow_state(idle_is_waiting=False)

    def _follow_state(self, idle_is_waiting: bool = True) -> None:
        """Arm the deadline of the phase the client's side of the connection is in."""
        state = self.conn.their_state
        if state is h11.IDLE:
            if idle_is_waiting and self._phase is None:  # first byte of a keep-alive request
                self._arm(HEADERS)
        elif state is h11.SEND_BODY:
            if self._phase != BODY:
                self._arm(BODY)
        else:  # DONE, MUST_CLOSE, CLOSED, ERROR: nothing more to receive for this request
            self._arm(None)

    def _arm(self, phase: str | None) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        self._phase = phase
        if phase is not None:
            delay = self.header_timeout_s if phase == HEADERS else self.body_timeout_s
            self._deadline = self.loop.call_later(delay, self._expired, phase)

    def _expired(self, phase: str) -> None:
        self._deadline = None
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        log.info("event=request_receive_timeout phase=%s client=%s", phase, client)
        if phase == HEADERS and self.conn.our_state is h11.IDLE:
            body = f"request {phase} not received within {self.header_timeout_s:g} s\n".encode()
            try:
                response = h11.Response(
                    status_code=408,
                    headers=[
                        (b"content-type", b"text/plain; charset=utf-8"),
                        (b"content-length", str(len(body)).encode()),
                        (b"connection", b"close"),
                    ],
                )
                self.transport.write(self.conn.send(response) + self.conn.send(h11.Data(data=body)))
            except h11.LocalProtocolError:  # the connection is in no state to answer; just close it
                pass
        self.transport.close()


def deadline_protocol(settings: Settings) -> type[DeadlineH11Protocol]:
    """A ``DeadlineH11Protocol`` subclass carrying the settings' deadlines (uvicorn takes a class)."""
    return type(
        "SettingsDeadlineH11Protocol",
        (DeadlineH11Protocol,),
        {"header_timeout_s": settings.http_header_timeout_s, "body_timeout_s": settings.http_body_timeout_s},
    )


def uvicorn_config(app: Any, settings: Settings, **overrides: Any) -> uvicorn.Config:
    """uvicorn's config for ``app``: address, deadlines, keep-alive and concurrency from the settings."""
    options: dict[str, Any] = {
        "host": settings.host,
        "port": settings.port,
        "http": deadline_protocol(settings),
        "timeout_keep_alive": settings.http_keep_alive_s,
        "limit_concurrency": settings.http_max_connections,
        "log_config": None,
        "access_log": settings.access_log,
        "timeout_graceful_shutdown": 30,
        **overrides,
    }
    return uvicorn.Config(app, **options)
