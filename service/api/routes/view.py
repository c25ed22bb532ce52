"""Live views: an HTML page per stream (and an index of streams), fed by server-sent events.

    GET /v1/view                    index of the live streams (static HTML: no data in it, open like /docs)
    GET /v1/streams/{id}/view       the stream's page (the same file; it reads the id from its URL)
    GET /v1/streams/{id}/live       text/event-stream; an ingest (or admin) key in the Authorization or
                                    X-API-Key header

The page asks for a key (kept in sessionStorage, never in a URL) and reads ``/live`` with fetch()
and a stream reader: EventSource cannot send headers. Events::

    event: live   the worker's live value as is (``service.worker.live``): frame, probabilities, ...
    event: info   {"stream": StreamInfo | null, "model", "model_version"} when it changed (~1 s)
    event: error  {"detail"} while the bus fails (the view goes on when it answers again)
    : keep-alive  a comment after KEEPALIVE_S without an event

Per API process, one *channel* per watched stream polls the bus and fans out to its viewers::

    every max(LIVE_INTERVAL_S, V / MESSAGES_PER_S)   GET {prefix}:live:{id}   changed -> event live
    every FLAG_REFRESH_S (1 s)      SET {prefix}:viewing:{id} (TTL VIEWING_TTL_S); GET the status -> info

(V: the views open on this process) so 100 viewers of one stream cost the bus what one does, all
views together get at most ~MESSAGES_PER_S live messages a second (each costs the process ~0.1 ms
of a core, which under ``ndot serve`` is the worker's), and the worker publishes a stream's live
value only while a viewing flag for it stands: nobody watching costs nothing. A viewer holds at
most one message per event kind (a newer one replaces it: nothing queues), plus the transport's
buffer; once that is full the send waits, and a viewer whose send has not gone through within
SEND_TIMEOUT_S is dropped. Views end when the client leaves, after MAX_VIEW_S (the page
reconnects), when MAX_VIEWERS are open already (503), or at shutdown (``close_live_views``, which
``ndot serve | api`` call from their signal handler, so SIGTERM does not wait for open views).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from starlette.types import Receive, Scope, Send

from service.api.context import INGEST, Context, StreamId
from service.api.errors import ApiError
from service.api.limits import retry_after_header
from service.bus import Bus, BusError, messages
from service.metrics import ServiceMetrics

log = logging.getLogger("ndot.api")
router = APIRouter(include_in_schema=False)  # an endless stream has no place in the fuzzed OpenAPI

FLAG_REFRESH_S = 1.0
KEEPALIVE_S = 15.0
SEND_TIMEOUT_S = 10.0
MAX_VIEW_S = 1800.0
MAX_VIEWERS = 512
#: Live messages a second this process sends to all its views together (``LiveHub.poll_interval_s``).
MESSAGES_PER_S = 400.0
BUS_RETRY_S = 1.0
LIVE, INFO, ERROR = "live", "info", "error"


def sse(kind: str, data: bytes) -> bytes:
    """One server-sent event (``data`` is one line of JSON)."""
    return b"event: " + kind.encode() + b"\ndata: " + data + b"\n\n"


# --- the page ---------------------------------------------------------------------------------------


def _csp_hash(html: str, tag: str) -> str:
    """``'sha256-…'`` of the page's one inline ``<tag>`` block, for the Content-Security-Policy."""
    match = re.search(rf"<{tag}>(.*?)</{tag}>", html, flags=re.DOTALL)
    if match is None:
        raise RuntimeError(f"view.html has no <{tag}> block")
    return "'sha256-" + base64.b64encode(hashlib.sha256(match.group(1).encode()).digest()).decode() + "'"


PAGE = resources.files("service.api").joinpath("static/view.html").read_text(encoding="utf-8")
PAGE_HEADERS = {
    "content-security-policy": (
        f"default-src 'none'; script-src {_csp_hash(PAGE, 'script')}; style-src {_csp_hash(PAGE, 'style')}; "
        "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}


@router.get("/v1/view")
async def view_index() -> HTMLResponse:
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


@router.get("/v1/streams/{stream_id}/view")
async def view_stream(stream_id: StreamId) -> HTMLResponse:
    return HTMLResponse(PAGE, headers=PAGE_HEADERS)


# --- the fan-out --------------------------------------------------------------------------------------


@dataclass(eq=False)
class Viewer:
    """One open view: the latest message of each kind not yet sent (never more)."""

    stream_id: str
    pending: dict[str, bytes] = field(default_factory=dict)
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    closed: bool = False

    def offer(self, kind: str, message: bytes) -> None:
        self.pending[kind] = message  # replaces an unsent older one
        self.ready.set()

    def take(self) -> bytes:
        out = b"".join(self.pending.values())
        self.pending.clear()
        self.ready.clear()
        return out

    def close(self) -> None:
        self.closed = True
        self.ready.set()


class Channel:
    """One watched stream in this process: polls the bus, fans out to the stream's viewers."""

    def __init__(self, hub: LiveHub, stream_id: str) -> None:
        self.hub, self.stream_id = hub, stream_id
        self.viewers: set[Viewer] = set()
        self.last: dict[str, bytes] = {}  # last message of each kind, for viewers who join later
        self._live: bytes | None = None
        self._info: bytes | None = None
        self._next_flag_s = 0.0
        self.task: asyncio.Task[None] = asyncio.create_task(self.run(), name=f"ndot-live-{stream_id}")

    def publish(self, kind: str, message: bytes) -> None:
        self.last[kind] = message
        for viewer in self.viewers:
            viewer.offer(kind, message)

    async def run(self) -> None:
        hub, loop = self.hub, asyncio.get_running_loop()
        try:
            while self.viewers and not hub.closing:
                try:
                    await self.poll(loop.time())
                    delay = hub.poll_interval_s()
                except BusError as err:
                    hub.metrics.bus_error("api", err.kind)
                    self.publish(ERROR, sse(ERROR, json.dumps({"detail": f"bus: {err.summary}"}).encode()))
                    self._next_flag_s, delay = 0.0, BUS_RETRY_S
                await asyncio.sleep(delay)
        except Exception:  # a bug here must not leave viewers hanging
            log.exception("event=live_channel_failed stream=%s", self.stream_id)
        finally:  # no await from the loop's last check to here: nobody can join in between
            if self.hub.channels.get(self.stream_id) is self:
                del self.hub.channels[self.stream_id]
            for viewer in self.viewers:
                viewer.close()

    async def poll(self, now: float) -> None:
        bus, prefix, sid = self.hub.bus, self.hub.prefix, self.stream_id
        if now >= self._next_flag_s:
            self._next_flag_s = now + FLAG_REFRESH_S
            await bus.set_value(messages.viewing_key(prefix, sid), b"1", ttl_s=messages.VIEWING_TTL_S)
            live, status = await bus.get_values([messages.live_key(prefix, sid), messages.status_key(prefix)])
            info = self.info_of(status)
            if info != self._info:
                self._info = info
                self.publish(INFO, sse(INFO, info))
        else:
            live = await bus.get_value(messages.live_key(prefix, sid))
        if live and live != self._live:
            self._live = live
            self.publish(LIVE, sse(LIVE, live))

    def info_of(self, status: bytes | None) -> bytes:
        """The ``info`` event of a status snapshot: the stream's info (null when not live) and the model."""
        snapshot: dict[str, Any] = json.loads(status) if status else {}
        stream = next((s for s in snapshot.get("streams", []) if s.get("stream_id") == self.stream_id), None)
        return json.dumps(
            {
                "stream": stream,
                "model": snapshot.get("model"),
                "model_version": snapshot.get("model_version"),
            },
            separators=(",", ":"),
        ).encode()


class LiveHub:
    """The live views of one API process (``app.state.live_hub``): channels by stream id."""

    def __init__(self, bus: Bus, prefix: str, metrics: ServiceMetrics) -> None:
        self.bus, self.prefix, self.metrics = bus, prefix, metrics
        self.interval_s = messages.LIVE_INTERVAL_S
        self.messages_per_s = MESSAGES_PER_S
        self.send_timeout_s = SEND_TIMEOUT_S
        self.max_view_s = MAX_VIEW_S
        self.max_viewers = MAX_VIEWERS
        self.channels: dict[str, Channel] = {}
        self.viewers = 0
        self.closing = False  # set from a signal handler: a plain flag the channels poll

    def poll_interval_s(self) -> float:
        """Seconds between a channel's polls: ``interval_s`` (10 per second) while the viewers of this
        process stay within ``messages_per_s`` together, longer beyond (100 views: 4 updates/s each).

        Every message costs the process the same (~0.1 ms of one core through uvicorn), so the views'
        cost stays bounded however many there are, and learning beside them keeps its pace.
        """
        return max(self.interval_s, self.viewers / self.messages_per_s)

    def join(self, stream_id: str) -> Viewer:
        viewer = Viewer(stream_id)
        channel = self.channels.get(stream_id)
        if channel is None or channel.task.done():
            channel = self.channels[stream_id] = Channel(self, stream_id)
        channel.viewers.add(viewer)
        for kind, message in channel.last.items():
            viewer.offer(kind, message)
        self.viewers += 1
        self.metrics.live_viewers.set(self.viewers)
        return viewer

    def leave(self, viewer: Viewer) -> None:
        channel = self.channels.get(viewer.stream_id)
        if channel is not None:
            channel.viewers.discard(viewer)  # its task ends at its next poll when it was the last
        self.viewers -= 1
        self.metrics.live_viewers.set(self.viewers)


def live_hub(app: FastAPI, ctx: Context) -> LiveHub:
    hub = getattr(app.state, "live_hub", None)
    if hub is None:
        hub = app.state.live_hub = LiveHub(ctx.bus, ctx.prefix, ctx.metrics)
    return hub


def close_live_views(app: FastAPI) -> None:
    """End every open view within one poll (safe in a signal handler: it only sets a flag)."""
    hub = getattr(app.state, "live_hub", None)
    if hub is not None:
        hub.closing = True


class EventStreamResponse(Response):
    """``text/event-stream`` of one viewer: what its channel offers, sent as the client takes it."""

    media_type = "text/event-stream"

    def __init__(self, hub: LiveHub, stream_id: str) -> None:  # no body, so no content-length
        self.status_code, self.background = 200, None
        self.init_headers({"cache-control": "no-store", "x-accel-buffering": "no"})
        self.hub, self.stream_id = hub, stream_id

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hub = self.hub
        viewer = hub.join(self.stream_id)
        watcher = asyncio.create_task(_closed_on_disconnect(receive, viewer))
        watcher.add_done_callback(lambda task: task.cancelled() or task.exception())  # no "never retrieved"
        loop = asyncio.get_running_loop()
        ends_at = loop.time() + hub.max_view_s
        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            await self._send(send, b"retry: 2000\n: connected\n\n")
            while not viewer.closed and not hub.closing and loop.time() < ends_at:
                if not viewer.ready.is_set():  # (asyncio.timeout: no task per wait, unlike wait_for)
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(KEEPALIVE_S):
                            await viewer.ready.wait()
                if viewer.closed and not viewer.pending:
                    break
                await self._send(send, viewer.take() if viewer.ready.is_set() else b": keep-alive\n\n")
            if not watcher.done():  # the client is still there: end the response properly
                await self._send(send, b"", more_body=False)
        except TimeoutError:  # the client stopped reading and its buffers are full: drop it (uvicorn then
            # closes the connection, logging that the response was not completed)
            log.info("event=live_view_dropped stream=%s reason=%r", self.stream_id, "client not reading")
        except OSError:  # the connection went away mid-send
            pass
        finally:
            watcher.cancel()
            hub.leave(viewer)

    async def _send(self, send: Send, body: bytes, more_body: bool = True) -> None:
        message = {"type": "http.response.body", "body": body, "more_body": more_body}
        async with asyncio.timeout(self.hub.send_timeout_s):
            await send(message)


async def _closed_on_disconnect(receive: Receive, viewer: Viewer) -> None:
    """Wait for the client to go away (``http.disconnect``), then close its view."""
    while (await receive())["type"] != "http.disconnect":
        pass
    viewer.close()


@router.get("/v1/streams/{stream_id}/live", dependencies=INGEST)
async def live(request: Request, ctx: Context, stream_id: StreamId) -> Response:
    hub = live_hub(request.app, ctx)
    if hub.viewers >= hub.max_viewers:
        raise ApiError(
            503,
            f"{hub.viewers} live views are open on this API process (at most {hub.max_viewers}); retry later",
            retry_after_header(5.0),
        )
    return EventStreamResponse(hub, stream_id)
