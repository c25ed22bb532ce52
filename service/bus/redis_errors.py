"""Redis's failures as bus errors: unreachable, refusing for now, or an unexpected error answer.

    connection refused / reset / timed out (redis-py ConnectionError, TimeoutError, OSError)
        -> BusUnavailable                          "redis at host:port/db is unreachable: ..."
    an answer whose first word is a refusal (OOM, MISCONF, READONLY, LOADING, BUSY, NOREPLICAS,
    MASTERDOWN, TRYAGAIN, CLUSTERDOWN): redis-py's OutOfMemoryError, ReadOnlyError, BusyLoadingError,
    MasterDownError, TryAgainError, ClusterDownError, or a plain ResponseError carrying the word,
    also inside a Lua script's error (Redis 7 keeps the word first, Redis 6 writes "... -OOM ...")
        -> BusRefused(reason)                      "redis at host:port/db refuses writes (OOM): ..."
    FENCED (a fenced ack of a shard that a newer worker group owns)
        -> BusFenced
    any other error answer (WRONGTYPE, NOPERM, ERR unknown command, ...)
        -> BusCommandError(code)

Messages name the server without credentials (for logs); clients only ever see ``reason`` or
``code``. redis-py quotes a pipeline's command (and its payload) in the message: that part is cut.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    MasterDownError,
    OutOfMemoryError,
    ReadOnlyError,
    ResponseError,
    TryAgainError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from service.bus.base import REFUSAL_REASONS, BusCommandError, BusError, BusFenced, BusRefused, BusUnavailable

__all__ = ["bus_error", "redacted"]

#: redis-py's classes for the refusals it knows (it strips the word from their message); most specific first.
_REFUSAL_CLASSES: tuple[tuple[type[Exception], str], ...] = (
    (OutOfMemoryError, "OOM"),
    (ReadOnlyError, "READONLY"),
    (BusyLoadingError, "LOADING"),  # a ConnectionError subclass in redis-py, so looked at first
    (MasterDownError, "MASTERDOWN"),  # a ClusterDownError subclass
    (TryAgainError, "TRYAGAIN"),
    (ClusterDownError, "CLUSTERDOWN"),
)
_CONNECTION_ERRORS = (RedisConnectionError, RedisTimeoutError, OSError)  # OSError covers TimeoutError
_WORDS = "|".join(REFUSAL_REASONS)
#: The refusal word first (Redis 7, also in a script's error), or after "-" (Redis 6: "...: -OOM ...").
_REFUSAL_RE = re.compile(rf"(?:^|\s-)({_WORDS})\b")
_CODE_RE = re.compile(r"([A-Z][A-Z0-9_]{1,31})\b")
_PIPELINE_MARK = "of pipeline caused error: "
_SHOWN_CHARS = 160


def redacted(url: str) -> str:
    """``host:port/db`` of a Redis URL (a unix socket's path), without user, password or query."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    return f"{host}{parts.path}" if host else parts.path or "?"


def _message(exc: BaseException) -> str:
    """The server's answer: without redis-py's pipeline preamble (which quotes the command), shortened."""
    text = str(exc)
    if _PIPELINE_MARK in text:
        text = text.rsplit(_PIPELINE_MARK, 1)[1].strip("(),'\"")
    return text if len(text) <= _SHOWN_CHARS else text[:_SHOWN_CHARS] + "..."


def bus_error(exc: BaseException, where: str) -> BusError | None:
    """The bus error for a redis-py (or socket) failure at server ``where``; None for any other error."""
    for cls, reason in _REFUSAL_CLASSES:
        if isinstance(exc, cls):
            return BusRefused(reason, f"redis at {where} refuses writes ({reason}): {_message(exc)}")
    if isinstance(exc, ResponseError):
        text = _message(exc)
        refusal = _REFUSAL_RE.search(text)
        if refusal:
            reason = refusal.group(1)
            return BusRefused(reason, f"redis at {where} refuses writes ({reason}): {text}")
        status = getattr(exc, "status_code", None)
        code = status if isinstance(status, str) and status else None
        if code is None:
            match = _CODE_RE.match(text)
            code = match.group(1) if match else "ERR"
        if code == "FENCED":  # a fenced script's refusal (service.bus.redis_lua.FENCED_ACK_LUA)
            return BusFenced(f"redis at {where}: {text}")
        return BusCommandError(code, f"redis at {where} answered an error ({code}): {text}")
    if isinstance(exc, _CONNECTION_ERRORS):
        return BusUnavailable(f"redis at {where} is unreachable: {type(exc).__name__}: {exc}")
    return None  # a client-side error (redis-py's DataError, ...): a bug, raised as it is
