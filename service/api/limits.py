"""Request limits that hold before any route runs: a per-key token bucket and a body-size cap.

Token bucket (one per key; rate ``r`` requests/s, size ``b``)::

    tokens(t) = min(b, tokens(t0) + r · (t - t0))        a request takes one token
    no token left  ->  429, Retry-After = ceil((1 - tokens) / r) seconds

The buckets live in the API process (per process: N API processes allow N times the rate).
Hand-written because the well-kept limiters (slowapi, limits) bring their own storage backends and
decorators, while this is ten lines of arithmetic on a dict.

``BodyLimit`` is an ASGI middleware: a body whose ``Content-Length`` (or, chunked, whose bytes)
pass the limit of its route is answered 413 before the app reads it into memory. The events route
has a larger limit and streams its body itself (``service.api.read_body``).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

Scope = dict[str, Any]
Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated_s: float


class RateLimiter:
    """Token buckets by key: ``rate_per_s`` tokens per second, at most ``burst``; ``rate_per_s=0`` = no limit."""

    def __init__(self, rate_per_s: float, burst: int, max_buckets: int = 100_000) -> None:
        if rate_per_s < 0 or burst < 1:
            raise ValueError(f"rate_per_s={rate_per_s} must be >= 0 and burst={burst} >= 1")
        self.rate_per_s = float(rate_per_s)
        self.burst = int(burst)
        self.max_buckets = max_buckets
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str, now_s: float | None = None) -> float:
        """Take one token for ``key``: 0.0 when allowed, else the seconds until one is available."""
        if self.rate_per_s == 0:
            return 0.0
        now_s = time.monotonic() if now_s is None else now_s
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= self.max_buckets:  # keys by client address could grow without bound
                self._forget_full(now_s)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now_s)
        bucket.tokens = min(self.burst, bucket.tokens + (now_s - bucket.updated_s) * self.rate_per_s)
        bucket.updated_s = now_s
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s

    def _forget_full(self, now_s: float) -> None:
        """Drop buckets that have refilled completely (they behave exactly like new ones)."""
        full_after_s = self.burst / self.rate_per_s
        self._buckets = {k: b for k, b in self._buckets.items() if now_s - b.updated_s < full_after_s}

    def describe(self) -> str:
        return f"{self.rate_per_s:g} requests/s (burst {self.burst})"


def retry_after_header(wait_s: float) -> dict[str, str]:
    """``Retry-After`` in whole seconds (at least 1), as HTTP wants it."""
    return {"Retry-After": str(max(1, math.ceil(wait_s)))}


class BodyLimit:
    """ASGI middleware: 413 for bodies over ``limit_for(path)`` bytes (``None`` = the route checks itself)."""

    def __init__(
        self,
        app: ASGIApp,
        limit_for: Callable[[str], int | None],
        on_refused: Callable[[], None] | None = None,
    ) -> None:
        self.app = app
        self.limit_for = limit_for
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope.get("path", "")) if scope["type"] == "http" else None
        if limit is None:
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None:
            if not declared.isdigit() or int(declared) > limit:
                await self._refuse(
                    send,
                    f"body of {declared.decode(errors='replace')!s:.20} bytes exceeds the "
                    f"limit of {limit} bytes for this route",
                )
                return
            await self.app(scope, receive, send)
            return
        # No Content-Length (chunked): read up to the limit here, then hand the messages on.
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > limit:
                await self._refuse(send, f"body exceeds the limit of {limit} bytes for this route")
                return
            if message["type"] != "http.request" or not message.get("more_body", False):
                break

        async def replay() -> Message:
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, detail: str) -> None:
        if self.on_refused is not None:
            self.on_refused()
        body = json.dumps({"detail": detail}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})
