"""API keys: who may call which route.

Two roles, each with its own keys (``NDOT_INGEST_KEYS`` / ``NDOT_ADMIN_KEYS``, comma-separated)::

    ingest   POST .../events, PUT /v1/streams/{id}, GET /v1/streams[/{id}], POST .../reset
    admin    everything ingest may, plus /v1/checkpoints*, POST /v1/model/reset, DELETE /v1/streams/{id}
    open     /healthz, /readyz, /metrics, /docs, /openapi.json (no key)

A key comes as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. It is compared with every
configured key by ``hmac.compare_digest`` and the loop never stops early, so the time taken does
not tell which key (or how much of one) matched. No key: 401; an ingest key on an admin route: 403.
After the key, its token bucket (``service.limits.RateLimiter``): 429 + ``Retry-After``.

``auth="off"`` lifts all of it (for a laptop: the server logs a warning at start); the rate limit
then applies per client address.
"""

from __future__ import annotations

import enum
import hmac
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated

from fastapi import Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from service.api.errors import ApiError
from service.api.limits import RateLimiter, retry_after_header
from service.settings import Settings

log = logging.getLogger("ndot.auth")

#: Shortest key accepted in the configuration (a random 16-character key has ~95 bits).
MIN_KEY_CHARS = 16


class AuthConfigError(ValueError):
    """The key configuration cannot be used (auth on without keys, a key too short or given twice)."""


class Role(enum.IntEnum):
    """What a key may do; a higher role includes the lower ones."""

    INGEST = 1
    ADMIN = 2


def _split(value: object) -> list[str]:
    raw = value.get_secret_value() if hasattr(value, "get_secret_value") else (value or "")
    return [key.strip() for key in str(raw).split(",") if key.strip()]


@dataclass(frozen=True)
class KeyRing:
    """The configured keys, each with its role and a name for logs and rate buckets (never the key)."""

    keys: tuple[tuple[bytes, Role, str], ...]

    @classmethod
    def from_settings(cls, settings: Settings) -> KeyRing | None:
        """The keys of ``settings``; None when auth is off. Raises ``AuthConfigError`` when unusable."""
        ingest, admin = _split(settings.ingest_keys), _split(settings.admin_keys)
        if settings.auth == "off":
            return None
        if not ingest and not admin:
            raise AuthConfigError(
                "auth is on but no API key is configured: set NDOT_INGEST_KEYS and NDOT_ADMIN_KEYS "
                "(comma-separated), or NDOT_AUTH=off / --insecure-local for local use only"
            )
        keys = [(k, Role.INGEST, f"ingest#{i}") for i, k in enumerate(ingest)]
        keys += [(k, Role.ADMIN, f"admin#{i}") for i, k in enumerate(admin)]
        for key, _, name in keys:
            if len(key) < MIN_KEY_CHARS:
                raise AuthConfigError(f"API key {name} has {len(key)} characters, fewer than {MIN_KEY_CHARS}")
        if len({k for k, _, _ in keys}) != len(keys):
            raise AuthConfigError("an API key is configured twice (or as both ingest and admin key)")
        return cls(tuple((k.encode(), role, name) for k, role, name in keys))

    def identify(self, presented: str) -> tuple[Role, str] | None:
        """``(role, name)`` of the key presented, or None; constant time over all keys."""
        given = presented.encode()
        found = None
        for key, role, name in self.keys:  # no early exit
            if hmac.compare_digest(given, key):
                found = (role, name)
        return found


bearer_scheme = HTTPBearer(auto_error=False, description="An ingest or admin API key.")
api_key_scheme = APIKeyHeader(name="X-API-Key", auto_error=False, description="An ingest or admin API key.")
Bearer = Annotated[HTTPAuthorizationCredentials | None, Security(bearer_scheme)]
ApiKey = Annotated[str | None, Security(api_key_scheme)]


@dataclass
class Gate:
    """Keys and rate limit of one app (``app.state.gate``); ``on_refused(reason)`` counts refusals."""

    keys: KeyRing | None
    limiter: RateLimiter
    on_refused: Callable[[str], None]

    def check(self, request: Request, role: Role, bearer: str | None, api_key: str | None) -> str:
        """The caller's name (key name or client address) if it may call a ``role`` route; else ApiError."""
        if self.keys is None:
            caller = f"addr:{request.client.host if request.client else 'unknown'}"
        else:
            presented = bearer or api_key
            if not presented:
                self.on_refused("unauthenticated")
                raise ApiError(
                    401,
                    "missing API key: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'",
                    {"WWW-Authenticate": "Bearer"},
                )
            found = self.keys.identify(presented)
            if found is None:
                self.on_refused("unauthenticated")
                raise ApiError(401, "unknown API key", {"WWW-Authenticate": "Bearer"})
            held, caller = found
            if held < role:
                self.on_refused("forbidden")
                raise ApiError(
                    403,
                    f"{request.method} {request.url.path} needs an admin key; "
                    f"the key given ({caller}) is an ingest key",
                )
        wait_s = self.limiter.take(caller)
        if wait_s > 0:
            self.on_refused("rate_limited")
            raise ApiError(
                429,
                f"rate limit of {self.limiter.describe()} per API key exceeded "
                f"({caller}); retry after {wait_s:.2f} s",
                retry_after_header(wait_s),
            )
        return caller


def requires(role: Role) -> Callable[..., Awaitable[str]]:
    """A route dependency that lets only callers holding ``role`` (or higher) through."""

    async def dependency(request: Request, bearer: Bearer = None, api_key: ApiKey = None) -> str:
        gate: Gate = request.app.state.gate
        return gate.check(request, role, bearer.credentials if bearer else None, api_key)

    dependency.__name__ = f"requires_{role.name.lower()}"
    return dependency


require_ingest = requires(Role.INGEST)
require_admin = requires(Role.ADMIN)
