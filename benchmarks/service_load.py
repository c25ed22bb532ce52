"""Load generators and stand-ins for ``bench_service.py`` (loopback only, bounded in time).

wrk (or plain http.client processes) posting one binary packet over and over;
a sink API (``python benchmarks/service_load.py sink-server PORT [REDIS_URL]``): the API without a
worker, whose published entries a sink consumer acks at once;
cameras replaying labelled N-MNIST at real time in 10 ms packets.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import multiprocessing as mp
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ndot_core.events.layout import WIRE_DTYPE, events_to_bytes  # noqa: E402
from ndot_core.events.readers import read_events  # noqa: E402

DATA = Path(os.environ.get("NDOT_SHARED_DATA", ROOT.parent / "shared" / "data"))
REDIS_URL = os.environ.get("NDOT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")
WINDOW_US = 10_000
PACKET_EVENTS = 10_000
WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/octet-stream"
local f = assert(io.open(os.getenv("NDOT_BENCH_BODY"), "rb")); wrk.body = f:read("*all"); f:close()
done = function(summary, latency, requests)
  io.write(string.format('RESULT {"requests": %d, "duration_us": %d, "non2xx": %d, "errors": %d, "p50_us": %d, "p99_us": %d}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_http(url: str, path: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            host, port = url.removeprefix("http://").split(":")
            conn = http.client.HTTPConnection(host, int(port), timeout=2)
            conn.request("GET", path)
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"{url}{path} not ready after {timeout_s} s")


def packet_body(count: int = PACKET_EVENTS) -> bytes:
    """``count`` events spread over one 10 ms window of a 34x34 sensor."""
    rng = np.random.default_rng(0)
    events = np.zeros(count, dtype=WIRE_DTYPE)
    events["t"] = np.sort(rng.integers(0, WINDOW_US, count))
    events["x"], events["y"], events["p"] = (
        rng.integers(0, 34, count),
        rng.integers(0, 34, count),
        rng.integers(0, 2, count),
    )
    return events.tobytes()


# --- ingest ---------------------------------------------------------------------------------------


def sink_server(port: int, redis_url: str | None) -> None:
    """The API (no worker) on ``port``; on the embedded bus a sink task acks every entry in-process."""
    import uvicorn

    from service.app import create_app
    from service.bus import make_bus
    from service.settings import Settings

    settings = Settings(
        redis_url=redis_url,
        bus_stream=f"bench-{uuid.uuid4().hex[:8]}",
        port=port,
        bus_max_lag=256,
        bus_maxlen=512,
        log_level="WARNING",
        auth="off",
    )  # loopback benchmark
    bus = make_bus(settings)
    app = create_app(settings, bus=bus, run_worker=False)

    async def main() -> None:
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        task = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        print(f"STREAM {settings.bus_stream}", flush=True)
        while redis_url is None and not task.done():
            entries = await bus.read("sink", 256, 100)
            if entries:
                await bus.ack([e.id for e in entries])
        await task

    asyncio.run(main())


async def redis_sink(stream: str, stop: asyncio.Event) -> None:
    from service.bus import RedisStreamBus

    bus = RedisStreamBus(REDIS_URL, stream=stream, max_lag=256, maxlen=512, shards=None)
    await bus.start()  # takes the API's shard layout
    try:
        while not stop.is_set():
            entries = await bus.read("sink", 256, 100)
            if entries:
                await bus.ack([e.id for e in entries])
    finally:
        await bus.close()


def post_loop(url: str, path: str, body: bytes, duration_s: float, out: Any) -> None:
    """One load process: keep-alive POSTs for ``duration_s``; puts (ok, other) counts."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    ok = other = 0
    deadline = time.perf_counter() + duration_s
    while time.perf_counter() < deadline:
        conn.request("POST", path, body, {"Content-Type": "application/octet-stream"})
        response = conn.getresponse()
        response.read()
        ok, other = (ok + 1, other) if response.status == 202 else (ok, other + 1)
    out.put((ok, other))


def load(url: str, path: str, body: bytes, duration_s: float) -> dict[str, Any]:
    """Requests/s with 2xx answers, by wrk when installed, else by 4 python processes."""
    if shutil.which("wrk"):
        with tempfile.TemporaryDirectory() as tmp:
            (Path(tmp) / "body").write_bytes(body)
            (Path(tmp) / "post.lua").write_text(WRK_SCRIPT)
            run = subprocess.run(
                ["wrk", "-t1", "-c8", f"-d{duration_s:.0f}s", "-s", str(Path(tmp) / "post.lua"), url + path],
                capture_output=True,
                text=True,
                env={**os.environ, "NDOT_BENCH_BODY": str(Path(tmp) / "body")},
                timeout=duration_s + 60,
            )
        line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
        stats = json.loads(line.removeprefix("RESULT "))
        ok = stats["requests"] - stats["non2xx"] - stats["errors"]
        return {
            "tool": "wrk -t1 -c8",
            "ok_per_s": ok / (stats["duration_us"] / 1e6),
            "refused": stats["non2xx"],
            "errors": stats["errors"],
            "p50_ms": stats["p50_us"] / 1e3,
            "p99_ms": stats["p99_us"] / 1e3,
        }
    queue: Any = mp.get_context("spawn").Queue()
    procs = [
        mp.get_context("spawn").Process(target=post_loop, args=(url, path, body, duration_s, queue))
        for _ in range(4)
    ]
    for p in procs:
        p.start()
    counts = [queue.get(timeout=duration_s + 60) for _ in procs]
    for p in procs:
        p.join()
    return {
        "tool": "4 http.client processes",
        "ok_per_s": sum(c[0] for c in counts) / duration_s,
        "refused": sum(c[1] for c in counts),
        "errors": 0,
    }


# --- latency --------------------------------------------------------------------------------------


def nmnist_packets(count: int, offset: int) -> list[tuple[int, list[tuple[float, bytes]]]]:
    """``count`` labelled recordings: (label, [(release time s from sample start, body)])."""
    folder = DATA / "nmnist-small"
    lines = (folder / "labels.txt").read_text().splitlines()[1:]
    samples = []
    for line in lines[offset : offset + count]:
        sample_id, label = line.split()
        events, _ = read_events(folder / "train" / f"{sample_id}.bs2")
        t = events["t"] - events["t"][0]
        cuts = np.searchsorted(t, np.arange(WINDOW_US, int(t[-1]) + WINDOW_US, WINDOW_US))
        parts = np.split(events, cuts)
        samples.append(
            (int(label), [((k + 1) * WINDOW_US / 1e6, events_to_bytes(p)) for k, p in enumerate(parts)])
        )
    return samples


def replay_stream(url: str, stream: int, duration_s: float, out: Any) -> None:
    """One camera: N-MNIST at real time, 10 ms packets, wait=true; puts (latencies s, max lateness s)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    samples = nmnist_packets(40, offset=40 * stream)
    latencies, lateness = [], 0.0
    begin = clock = time.perf_counter()
    first = True
    while time.perf_counter() - begin < duration_s:
        for label, packets in samples:
            for k, (release_s, body) in enumerate(packets):
                wait = clock + release_s - time.perf_counter()
                if wait > 0:
                    time.sleep(wait)
                lateness = max(lateness, -wait)
                query = f"label={label}&start={str(k == 0).lower()}&end={str(k == len(packets) - 1).lower()}"
                if first:
                    query += "&width=34&height=34"
                    first = False
                sent = time.perf_counter()
                conn.request(
                    "POST",
                    f"/v1/streams/cam-{stream}/events?{query}",
                    body,
                    {"Content-Type": "application/octet-stream"},
                )
                response = conn.getresponse()
                response.read()
                if response.status == 200:
                    latencies.append(time.perf_counter() - sent)
            clock += packets[-1][0]
            if time.perf_counter() - begin >= duration_s:
                break
    out.put((latencies, lateness))


if __name__ == "__main__":
    if sys.argv[1:2] == ["sink-server"]:
        sink_server(int(sys.argv[2]), sys.argv[3] if len(sys.argv) > 3 else None)
