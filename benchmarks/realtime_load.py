"""What bench_load.py and bench_soak.py share: real-time camera processes with a deadline, and scraping.

``camera_process`` (run in a child process) drives some streams, each replaying labelled N-MNIST
recordings (the synthetic camera when absent) in packets of one window (10 ms by default) at the pace of the event clock,
``wait=true``, until a deadline; it retries only what the service certainly did not take (503 /
429 after ``Retry-After``, refused connections) and counts what it did take. For every accepted
packet it also frames the same events with its own ``StreamFramer``, so the steps the worker should
have applied are known exactly. It writes one JSON record.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np

REPO = Path(__file__).resolve().parent.parent
DATA = Path(os.environ.get("NDOT_SHARED_DATA", REPO.parent / "shared" / "data"))


def load_sequences(seed: int) -> list[Any]:
    """200 labelled N-MNIST recordings in a seeded order (the synthetic camera when they are absent)."""
    from clients.sources import open_source, synthetic_source

    local = DATA / "nmnist-small"
    source = open_source(local) if (local / "labels.txt").is_file() else synthetic_source(500)
    return list(source.select(limit=200, shuffle=True, seed=seed))


async def camera_packets(
    sequences: list[Any], offset: int, started: float, deadline: float, window_us: int, tally: dict[str, Any]
) -> AsyncIterator[tuple[Any, Any, np.ndarray, Any]]:
    """One camera: ``(sequence, packet, events, framer)`` for each packet of one window, when the camera's
    clock releases it, until ``deadline``; how late it went out is kept in ``tally["max_schedule_lag_s"]``.

    ``framer`` (the sequence's own ``StreamFramer``) counts the frames the service should make of it.
    """
    from clients.packets import packetize
    from ndot_core.events.framing import StreamFramer

    clock_us = 0
    for k in range(10**9):
        sequence = sequences[(offset + k) % len(sequences)]
        framer = StreamFramer(sequence.sensor_size, window_us=window_us, output_size=(34, 34))
        packets = packetize(sequence.events["t"], packet_us=window_us)
        for packet in packets:
            due = started + (clock_us + packet.release_us) * 1e-6
            if due > deadline or time.perf_counter() > deadline:  # a fixed wall-clock time, too
                return
            await asyncio.sleep(max(due - time.perf_counter(), 0))
            tally["max_schedule_lag_s"] = max(tally["max_schedule_lag_s"], time.perf_counter() - due)
            yield sequence, packet, sequence.events[packet.lo : packet.hi], framer
        clock_us += packets[-1].release_us if packets else 0


def camera_process(
    url: str, key: str, streams: list[str], duration_s: float, seed: int, out: str, window_us: int = 10_000
) -> None:
    """Child process entry point: drive ``streams`` in real time for ``duration_s``; write a JSON record.

    Packets hold one ``window_us`` of events each (the service must run with the same window)."""
    record = asyncio.run(_drive(url, key, streams, duration_s, seed, window_us))
    Path(out).write_text(json.dumps(record))


async def _drive(
    url: str, key: str, streams: list[str], duration_s: float, seed: int, window_us: int = 10_000
) -> dict[str, Any]:
    from clients.packets import encode_body

    sequences = load_sequences(seed)
    tally: dict[str, Any] = {
        "accepted": 0,
        "timed_out": 0,
        "retried": 0,
        "rejected": 0,
        "lost": 0,
        "events": 0,
        "expected_steps": 0,
        "returned_steps": 0,
        "max_schedule_lag_s": 0.0,
    }
    latencies: list[float] = []
    started = time.perf_counter()
    deadline = started + duration_s

    async def stream(client: httpx.AsyncClient, stream_id: str, offset: int) -> None:
        async for sequence, packet, events, framer in camera_packets(
            sequences, offset, started, deadline, window_us, tally
        ):
            params = {"label": sequence.label, "start": packet.start, "end": packet.end}
            if packet.start:
                params.update(width=sequence.sensor_size[0], height=sequence.sensor_size[1])
            status = await _post(client, stream_id, params, encode_body(events), latencies, tally)
            if status in (200, 504):
                tally["events"] += len(events)
                tally["expected_steps"] += len(framer.push(events)) + (
                    len(framer.flush()) if packet.end else 0
                )

    limits = httpx.Limits(max_connections=len(streams), max_keepalive_connections=len(streams))
    headers = {"authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits, headers=headers) as client:
        await asyncio.gather(*(stream(client, sid, i * 7 + seed) for i, sid in enumerate(streams)))
    lat = np.asarray(latencies)
    tally["latencies_ms"] = (lat * 1e3).round(3).tolist()
    tally["packets_ok"] = int(lat.size)
    return tally


async def _post(
    client: httpx.AsyncClient,
    stream_id: str,
    params: dict,
    body: bytes,
    latencies: list[float],
    tally: dict[str, Any],
) -> int:
    for _ in range(100):
        sent = time.perf_counter()
        try:
            answer = await client.post(
                f"/v1/streams/{stream_id}/events",
                params=params,
                content=body,
                headers={"content-type": "application/octet-stream"},
            )
        except (httpx.ConnectError, httpx.PoolTimeout):
            await asyncio.sleep(0.1)
            continue
        except httpx.HTTPError:
            tally["lost"] += 1  # sent, no answer: it may or may not be applied
            return -1
        if answer.status_code in (429, 503):
            tally["retried"] += 1
            await asyncio.sleep(float(answer.headers.get("retry-after", "1")))
            continue
        if answer.status_code == 200:
            latencies.append(time.perf_counter() - sent)
            tally["accepted"] += 1
            tally["returned_steps"] += len(answer.json()["steps"])
        elif answer.status_code == 504:
            tally["accepted"] += 1
            tally["timed_out"] += 1
        else:
            tally["rejected"] += 1
        return answer.status_code
    return -1


def scrape(url: str) -> dict[str, float]:
    """A Prometheus text page as ``{"name{labels}": value}``."""
    values = {}
    for line in httpx.get(url, timeout=10).text.splitlines():
        match = re.fullmatch(r"([a-zA-Z_:][\w:]*(?:\{[^}]*\})?) ([-+0-9.eEinfNa]+)", line)
        if match:
            values[match.group(1)] = float(match.group(2))
    return values


def percentile(values: list[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None
