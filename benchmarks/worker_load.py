"""The worker alone under live cameras: packets published straight onto the Redis bus, no HTTP.

``worker_level`` drives N streams from one asyncio process: each replays labelled N-MNIST
recordings (``../shared/data/nmnist-small``; the synthetic camera when absent) at the pace of its
event clock in packets of one window, publishes each packet as the API would (``EventsPacket`` on
``RedisStreamBus.publish``) and waits for its reply before the next one (as a ``wait=true``
client). Latency is publish -> reply; *behind* is how late a packet went out against its camera's
clock. What this leaves out (HTTP, the API process, client processes) is what ``bench_load.py``
measures; on a 2-core machine those share the cores with the worker there.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.realtime_load import camera_packets, load_sequences  # noqa: E402
from service.bus.shards import delete_bus_keys

REPO = Path(__file__).resolve().parent.parent
REDIS_URL = os.environ.get("NDOT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")


class WorkerProcess:
    """``ndot worker`` (or ``ndot workers``: ``command``) on a Redis stream of its own; a context manager.

    ``launcher``: the interpreter's arguments before ``command`` (``phase_timing.py`` wraps the CLI)."""

    def __init__(
        self,
        workdir: Path,
        env: dict[str, str],
        command: str = "worker",
        source: Path = REPO,
        launcher: tuple[str, ...] = ("-m", "service.cli"),
    ) -> None:
        self.command = command
        self.launcher = launcher
        self.source = source  # the source tree the worker runs from (``worker_ab.py``: another revision)
        self.stream = f"bench-worker-{uuid.uuid4().hex[:8]}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("NDOT_")},
            "REDIS_URL": REDIS_URL,
            "NDOT_BUS_STREAM": self.stream,
            "NDOT_CHECKPOINT_DIR": str(workdir / "ckpt"),
            "NDOT_LOG_LEVEL": "WARNING",
            "NDOT_WORKER_METRICS_PORT": "0",
            "NDOT_BUS_MAX_LAG": "5000",
            "PYTHONPATH": str(source),
            **env,
        }
        self.log = workdir / "worker.log"
        self.process: subprocess.Popen | None = None

    def __enter__(self) -> WorkerProcess:
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen(
                [sys.executable, *self.launcher, self.command],
                cwd=self.source,
                env=self.env,
                stdout=log,
                stderr=log,
            )
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        deadline = time.monotonic() + 120
        while not client.get(f"{self.stream}:value:{self.stream}:worker:heartbeat"):
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"the worker did not start; see {self.log}")
            time.sleep(0.2)
        client.close()
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.process is not None
        self.process.terminate()
        self.process.wait(60)
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        delete_bus_keys(client, self.stream)
        client.close()


def delete_streams(stream: str, names: list[str]) -> None:
    """Delete the worker's streams ``names`` (as ``DELETE /streams/{id}`` does), waiting for each answer:
    what a warm-up drove leaves no idle rows in the state table of the run measured after it."""

    async def delete() -> None:
        from service.bus import RedisStreamBus, messages

        bus = RedisStreamBus(REDIS_URL, stream=stream, max_lag=5000, shards=None)
        try:
            await bus.start()
            for name in names:
                await bus.wait_reply(await bus.publish(messages.DELETE, name, {}), 10.0)
        finally:
            await bus.close()

    asyncio.run(delete())


def level_names(streams: int) -> list[str]:
    """The stream names ``worker_level`` drives at ``streams`` cameras."""
    return [f"w{streams}-{i}" for i in range(streams)]


def worker_level(
    stream: str, streams: int, duration_s: float, window_us: int, seed: int = 0
) -> dict[str, Any]:
    return asyncio.run(_drive(stream, streams, duration_s, window_us, seed))


async def _drive(stream: str, streams: int, duration_s: float, window_us: int, seed: int) -> dict[str, Any]:
    from ndot_core.events.layout import events_to_bytes
    from service.bus import RedisStreamBus, messages

    sequences = load_sequences(seed)
    bus = RedisStreamBus(REDIS_URL, stream=stream, max_lag=5000, max_connections=streams + 8, shards=None)
    tally = {"packets": 0, "lost": 0, "expected_steps": 0, "returned_steps": 0, "max_schedule_lag_s": 0.0}
    latencies: list[float] = []
    replied: dict[str, list[float]] = {}  # per camera: time.time() of each reply (recovery times)
    started = time.perf_counter() + 0.5
    deadline = started + duration_s

    async def camera(name: str, offset: int) -> None:
        async for sequence, packet, events, framer in camera_packets(
            sequences, offset, started, deadline, window_us, tally
        ):
            width, height = sequence.sensor_size
            body = messages.EventsPacket(
                events_to_bytes(events), width, height, sequence.label, packet.start, packet.end
            )
            sent = time.perf_counter()
            entry_id = await bus.publish(messages.EVENTS, name, body.to_fields())
            reply = await bus.wait_reply(entry_id, 10.0)
            tally["packets"] += 1
            if reply is None:
                tally["lost"] += 1
                continue
            latencies.append(time.perf_counter() - sent)
            replied.setdefault(name, []).append(time.time())
            tally["returned_steps"] += len(json.loads(reply).get("steps", []))
            tally["expected_steps"] += len(framer.push(events)) + (len(framer.flush()) if packet.end else 0)

    try:
        await bus.start()  # takes the worker's shard layout
        await asyncio.gather(*(camera(name, i * 7 + seed) for i, name in enumerate(level_names(streams))))
    finally:
        await bus.close()
    lat = np.asarray(latencies) * 1e3
    return {
        "streams": streams,
        "window_us": window_us,
        "duration_s": duration_s,
        **tally,
        "steps_per_s": tally["returned_steps"] / duration_s,
        "latency_p50_ms": float(np.percentile(lat, 50)) if lat.size else None,
        "latency_p99_ms": float(np.percentile(lat, 99)) if lat.size else None,
        "replied_at": replied,
    }
