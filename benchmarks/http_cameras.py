"""Cameras that POST through a real ``ndot api`` process, for ``bench_scaleout.py --via http``.

``ApiProcess(worker)``: ``ndot api`` on the bus of a running ``worker_load.WorkerProcess`` (same Redis
stream, shards and window), with an ingest key and no rate limit; a context manager.

``http_level(url, key, streams, ...)``: ``processes`` child processes share ``streams`` cameras; each
camera replays labelled N-MNIST (``realtime_load.camera_packets``: one window per packet, at the pace of
its event clock) and POSTs each packet with ``wait=true`` (the default), waiting for its answer before
the next one. Latency is POST -> prediction on the client (HTTP, the API, the bus, a rank and back);
the steps an answered packet should produce are counted with the camera's own ``StreamFramer``. The
record has the fields of ``worker_load.worker_level`` (``replied_at``: wall-clock times of each
camera's answers, for the recovery measurement) plus the answers' status codes.
"""

from __future__ import annotations

import asyncio
import json
import multiprocessing as mp
import os
import secrets
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.realtime_load import camera_packets, load_sequences  # noqa: E402
from clients.local_service import free_port  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


class ApiProcess:
    """``ndot api`` on the bus of ``worker`` (a ``WorkerProcess``); a context manager."""

    def __init__(self, worker: Any) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.key = secrets.token_urlsafe(24)
        self.env = {
            **worker.env,
            "NDOT_PORT": str(self.port),
            "NDOT_INGEST_KEYS": self.key,
            "NDOT_RATE_LIMIT_RPS": "0",  # every camera shares one key: no per-key limit
        }
        self.log = Path(worker.log).with_name("api.log")
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> ApiProcess:
        import httpx

        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "service.cli", "api"], cwd=REPO, env=self.env, stdout=log, stderr=log
            )
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the API did not become ready; see {self.log}")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(60)


def http_level(
    url: str, key: str, streams: int, duration_s: float, window_us: int, processes: int = 2, seed: int = 0
) -> dict[str, Any]:
    """``streams`` cameras in ``processes`` child processes for ``duration_s``; one merged record."""
    names = [f"h{streams}-{i}" for i in range(streams)]
    offsets = {name: i * 7 + seed for i, name in enumerate(names)}
    spawn = mp.get_context("spawn")  # fresh interpreters: no torch or event loop of the parent
    ready, results = spawn.Barrier(processes + 1), spawn.Queue()
    children = [
        spawn.Process(
            target=_camera_process,
            args=(
                url,
                key,
                {n: offsets[n] for n in names[p::processes]},
                duration_s,
                window_us,
                seed,
                ready,
                results,
            ),
        )
        for p in range(processes)
    ]
    for child in children:
        child.start()
    ready.wait(timeout=120)  # every child loaded its recordings: the cameras start together
    records = [results.get(timeout=duration_s + 120) for _ in children]
    for child in children:
        child.join(30)
    tally = {
        key_: sum(r[key_] for r in records)
        for key_ in ("packets", "lost", "expected_steps", "returned_steps")
    }
    statuses: dict[str, int] = {}
    for record in records:
        for status, count in record["statuses"].items():
            statuses[status] = statuses.get(status, 0) + count
    lat = np.asarray([x for r in records for x in r["latencies_ms"]])
    return {
        "streams": streams,
        "window_us": window_us,
        "duration_s": duration_s,
        "via": "http",
        "processes": processes,
        **tally,
        "statuses": statuses,
        "max_schedule_lag_s": max(r["max_schedule_lag_s"] for r in records),
        "steps_per_s": tally["returned_steps"] / duration_s,
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "replied_at": {name: at for r in records for name, at in r["replied_at"].items()},
    }


def _camera_process(
    url: str,
    key: str,
    cameras: dict[str, int],
    duration_s: float,
    window_us: int,
    seed: int,
    ready: Any,
    results: Any,
) -> None:
    """Child process: load the recordings, wait for the others, drive ``cameras`` (name -> offset)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sequences = load_sequences(seed)
    ready.wait(timeout=120)
    results.put(asyncio.run(_drive(url, key, cameras, sequences, duration_s, window_us)))


class Connection:
    """One keep-alive HTTP/1.1 connection of a camera: a request is a write and a few reads. (httpx cost
    6-15 ms of CPU a request here, in its connection pool and per-client TLS set-up: on 2 cores the
    cameras' client would take that from the service it measures.)"""

    def __init__(self, url: str, key: str) -> None:
        address = urllib.parse.urlsplit(url)
        self.host, self.port = address.hostname or "127.0.0.1", address.port or 80
        self.headers = (
            f"Host: {self.host}:{self.port}\r\nAuthorization: Bearer {key}\r\n"
            "Content-Type: application/octet-stream\r\n"
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def post(self, target: str, body: bytes) -> tuple[int, bytes]:
        """``POST target`` with ``body``; ``(status, answer body)``. Raises ``OSError`` (connection lost)."""
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        try:
            head = b"POST %s HTTP/1.1\r\n%sContent-Length: %d\r\n\r\n" % (
                target.encode(),
                self.headers,
                len(body),
            )
            self.writer.write(head + body)
            await self.writer.drain()
            status_line = await self.reader.readline()
            if not status_line:
                raise ConnectionError("the server closed the connection")
            length, close = 0, False
            while (line := await self.reader.readline()) not in (b"\r\n", b""):
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection":
                    close = value.strip().lower() == b"close"
            answer = await self.reader.readexactly(length)
        except (OSError, asyncio.IncompleteReadError) as err:
            self.close()
            raise ConnectionError(str(err)) from err
        if close:
            self.close()
        return int(status_line.split()[1]), answer

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _drive(
    url: str, key: str, cameras: dict[str, int], sequences: list[Any], duration_s: float, window_us: int
) -> dict[str, Any]:
    from clients.packets import encode_body

    tally: dict[str, Any] = {"packets": 0, "lost": 0, "expected_steps": 0, "returned_steps": 0}
    tally["max_schedule_lag_s"] = 0.0
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    replied: dict[str, list[float]] = {}  # per camera: time.time() of each answer (recovery times)
    started = time.perf_counter() + 0.5
    deadline = started + duration_s

    async def camera(name: str, offset: int) -> None:
        connection = Connection(url, key)
        try:
            async for sequence, packet, events, framer in camera_packets(
                sequences, offset, started, deadline, window_us, tally
            ):
                params = {"label": sequence.label, "start": _flag(packet.start), "end": _flag(packet.end)}
                if packet.start:
                    params.update(width=sequence.sensor_size[0], height=sequence.sensor_size[1])
                target = f"/v1/streams/{name}/events?{urllib.parse.urlencode(params)}"
                sent = time.perf_counter()
                try:
                    status, answer = await connection.post(target, encode_body(events))
                except ConnectionError:
                    statuses["connection_lost"] = statuses.get("connection_lost", 0) + 1
                    tally["lost"] += 1
                    continue
                tally["packets"] += 1
                statuses[str(status)] = statuses.get(str(status), 0) + 1
                if status != 200:  # 504: no answer within the API's request_timeout_s
                    tally["lost"] += 1
                    continue
                latencies.append(time.perf_counter() - sent)
                replied.setdefault(name, []).append(time.time())
                tally["returned_steps"] += len(json.loads(answer)["steps"])
                tally["expected_steps"] += len(framer.push(events)) + (
                    len(framer.flush()) if packet.end else 0
                )
        finally:
            connection.close()

    await asyncio.gather(*(camera(name, offset) for name, offset in cameras.items()))
    return {
        **tally,
        "statuses": statuses,
        "latencies_ms": [round(x * 1e3, 3) for x in latencies],
        "replied_at": replied,
    }


def _flag(value: bool) -> str:
    return "true" if value else "false"
