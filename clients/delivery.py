"""Delivering one packet to ``POST /v1/streams/{id}/events``: retries, reopening, outcomes.

A packet is sent again only when the service certainly did not take it -- a 503 (backpressure /
bus down; after ``Retry-After``), a 429 (the key's rate limit or a stream too far behind; after
``Retry-After``), a connection that failed before anything was sent, or a 409 on a sequence's first
packet (the stream id is open with another sensor size: the client DELETEs it once and reopens
it). A timeout or broken connection after sending is counted, never resent (no duplicate steps).

Auth: ``ClientConfig.api_key`` is sent as ``Authorization: Bearer <key>``; an ingest key suffices,
except for that DELETE, which needs an admin key (without one the 409 is reported). The replay
(``clients.dvs_client``) and the live client (``clients.live_client``) both post through here.
"""

from __future__ import annotations

import asyncio
import email.utils
import sys
import time
from dataclasses import dataclass

import httpx
from tqdm import tqdm

from clients.packets import CONTENT_TYPES, BodyFormat, Packet, encode_body
from clients.scoreboard import SampleResult, Scoreboard
from clients.sources import Sequence

#: Errors raised before any byte of the request left: resending cannot duplicate a packet.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
MAX_RETRY_AFTER_S = 30.0
MAX_ERRORS_SHOWN = 20
FAILED_OUTCOMES = ("rejected", "failed", "lost", "unreachable")


@dataclass(frozen=True)
class ClientConfig:
    """How to replay: where to, how many streams, pacing, packet cutting, retries."""

    url: str = "http://127.0.0.1:8000"
    streams: int = 1
    stream_prefix: str = "cam"
    realtime: bool = True
    speed: float = 1.0
    packet_us: int | None = 10_000
    packet_events: int | None = None
    body_format: BodyFormat = "binary"
    wait: bool = True
    timeout_s: float = 30.0
    max_retries: int = 100
    connect_backoff_s: float = 0.1
    window: int = 100
    progress: bool = True
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        """Headers every request carries: the API key, when there is one."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams={self.streams} must be >= 1")
        if self.speed <= 0:
            raise ValueError(f"speed={self.speed} must be > 0")


def retry_after_s(response: httpx.Response, default_s: float = 1.0) -> float:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), capped."""
    value = response.headers.get("retry-after")
    if value is None:
        return default_s
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            seconds = default_s
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


async def post_packet(
    client: httpx.AsyncClient,
    config: ClientConfig,
    stream_id: str,
    sequence: Sequence,
    packet: Packet,
    board: Scoreboard,
    sample: SampleResult,
) -> None:
    """POST one packet, retrying only when it certainly was not taken; record the outcome."""
    params: dict[str, str | int] = {
        "start": str(packet.start).lower(),
        "end": str(packet.end).lower(),
        "wait": str(config.wait).lower(),
    }
    if sequence.label is not None:
        params["label"] = sequence.label
    if packet.start:
        params["width"], params["height"] = sequence.sensor_size
    body = encode_body(sequence.events[packet.lo : packet.hi], config.body_format)
    headers = {"content-type": CONTENT_TYPES[config.body_format]}
    where = f"stream {stream_id} sample {sequence.name!r} packet {packet.index}"
    attempts = 0
    reopened = False
    while True:
        attempts += 1
        sent_at = time.perf_counter()
        try:
            response = await client.post(
                f"/v1/streams/{stream_id}/events", content=body, params=params, headers=headers
            )
        except NOT_SENT_ERRORS as error:
            if attempts > config.max_retries:
                return _failed(board, "unreachable", f"{where}: {type(error).__name__}: {error}")
            await asyncio.sleep(min(config.connect_backoff_s * 2 ** min(attempts, 6), 5.0))
            continue
        except httpx.HTTPError as error:  # sent: the service may have applied it, so never resend
            return _failed(board, "lost", f"{where}: {type(error).__name__} after sending: {error}")
        if response.status_code in (429, 503) and attempts <= config.max_retries:  # not taken: send again
            board.retries += 1
            await asyncio.sleep(retry_after_s(response))
            continue
        if response.status_code == 409 and packet.start and not reopened:
            # The stream id is open with another sensor size (an earlier run, or a folder of mixed
            # sensors): the packet was refused before the bus, so close the stream and send it again.
            reopened = True
            deleted = await client.delete(f"/v1/streams/{stream_id}")
            if deleted.status_code in (401, 403):
                return _failed(
                    board,
                    "rejected",
                    f"{where}: HTTP 409: {_detail(response)}; closing the stream "
                    f"needs an admin key (HTTP {deleted.status_code})",
                )
            continue
        break
    latency_s = time.perf_counter() - sent_at
    status = response.status_code
    if status in (200, 202):
        board.outcomes["ok"] += 1
        board.events_sent += packet.n_events
        board.latencies_s.append(latency_s)
        sample.events += packet.n_events
        sample.packets += 1
        if status == 200:
            answer = response.json()
            board.record_steps(sample, answer.get("steps", []), latency_s, answer.get("sequence"))
        return None
    if status == 504:  # the reply timed out; the packet is still applied by the worker
        board.outcomes["timed_out"] += 1
        board.events_sent += packet.n_events
        sample.events += packet.n_events
        sample.packets += 1
        return None
    detail = _detail(response)
    return _failed(board, "rejected" if status < 500 else "failed", f"{where}: HTTP {status}: {detail}")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:300]


def _failed(board: Scoreboard, outcome: str, message: str) -> None:
    board.outcomes[outcome] += 1
    board.errors.append(message)
    if len(board.errors) <= MAX_ERRORS_SHOWN:
        tqdm.write(f"ndot-client: {message}", file=sys.stderr)
    elif len(board.errors) == MAX_ERRORS_SHOWN + 1:
        tqdm.write("ndot-client: further errors are only counted (see the summary)", file=sys.stderr)
