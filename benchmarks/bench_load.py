"""Load benchmark: 8, 32 and 128 real-time camera streams against `ndot api` + `ndot worker` on Redis.

    .venv/bin/python benchmarks/bench_load.py [--streams 8 32 128] [--duration 20] [--processes 4]

For each stream count, ``--processes`` client processes (benchmarks/realtime_load.py) replay labelled
N-MNIST in 10 ms packets at the pace of the event clock (wait=true) for ``--duration`` seconds,
through real HTTP on loopback, with API keys on. Then the bus is drained and counted:

  * events accepted, packets accepted (200 or 504), 503/429 retries;
  * steps applied by the worker (its ``ndot_steps_total``) against the steps the accepted packets
    must produce (each client frames what it sent with its own StreamFramer);
  * packets lost = accepted - applied by the worker (``ndot_packets_total{outcome="applied"}``),
    must be 0; dead letters must be 0;
  * POST -> prediction latency p50 / p99 (client side, 200 answers), the largest lag behind the
    camera clock, and the worker's bus lag (entries accepted, not yet applied) sampled every 0.5 s.

Loopback only; Redis at $NDOT_BENCH_REDIS_URL (default redis://127.0.0.1:6379/15, a stream of its
own). Writes results/bench_load.{json,png}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import secrets
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.realtime_load import REPO, camera_process, percentile, scrape  # noqa: E402
from clients.local_service import free_port  # noqa: E402
from service.bus.shards import delete_bus_keys

RESULTS = REPO / "benchmarks" / "results"
REDIS_URL = os.environ.get("NDOT_BENCH_REDIS_URL", "redis://127.0.0.1:6379/15")


class Deployment:
    """`ndot api` and `ndot worker` subprocesses on one Redis stream, keys on; a context manager."""

    def __init__(self, workdir: Path, max_streams: int) -> None:
        self.port, self.metrics_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stream = f"bench-load-{uuid.uuid4().hex[:8]}"
        self.admin_key, self.ingest_key = secrets.token_urlsafe(24), secrets.token_urlsafe(24)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("NDOT_")},
            "REDIS_URL": REDIS_URL,
            "NDOT_BUS_STREAM": self.stream,
            "NDOT_PORT": str(self.port),
            "NDOT_WORKER_METRICS_PORT": str(self.metrics_port),
            "NDOT_CHECKPOINT_DIR": str(workdir / "ckpt"),
            "NDOT_MAX_STREAMS": str(max_streams),
            "NDOT_LOG_LEVEL": "WARNING",
            "NDOT_BUS_MAX_LAG": "5000",
            "NDOT_WINDOW_US": "10000",  # the cameras' own framers count expected steps at 10 ms
            "NDOT_BUS_MAXLEN": "100000",
            "NDOT_INGEST_KEYS": self.ingest_key,
            "NDOT_ADMIN_KEYS": self.admin_key,
            "PYTHONPATH": str(REPO),
        }
        self.logs = workdir
        self.processes: list[subprocess.Popen] = []

    def __enter__(self) -> Deployment:
        for command in ("worker", "api"):
            log = open(self.logs / f"{command}.log", "wb")  # noqa: SIM115 (closed with the process)
            self.processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "service.cli", command],
                    cwd=REPO,
                    env=self.env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError("the service did not become ready")

    def __exit__(self, *exc: object) -> None:
        for process in self.processes:
            process.terminate()
        for process in self.processes:
            process.wait(60)
        import redis

        client = redis.Redis.from_url(REDIS_URL)
        delete_bus_keys(client, self.stream)
        client.close()

    def worker_metrics(self) -> dict[str, float]:
        return scrape(f"http://127.0.0.1:{self.metrics_port}/metrics")

    def bus_lag(self) -> int:
        from service.bus import RedisStreamBus

        async def read() -> int:
            bus = RedisStreamBus(REDIS_URL, stream=self.stream, max_lag=5000, maxlen=100_000, shards=None)
            try:
                await bus.start()  # takes the deployment's shard layout
                return await bus.lag()
            finally:
                await bus.close()

        return asyncio.run(read())


def counters(metrics: dict[str, float]) -> dict[str, float]:
    return {
        "steps": metrics.get('ndot_steps_total{kind="learn"}', 0)
        + metrics.get('ndot_steps_total{kind="infer"}', 0),
        "applied": metrics.get('ndot_packets_total{outcome="applied"}', 0),
        "dead": metrics.get('ndot_packets_total{outcome="dead_lettered"}', 0),
    }


def run_level(
    deployment: Deployment,
    streams: int,
    duration_s: float,
    processes: int,
    workdir: Path,
    window_us: int = 10_000,
) -> dict[str, Any]:
    before = counters(deployment.worker_metrics())
    names = [f"load{streams}-{i}" for i in range(streams)]
    groups = [names[i::processes] for i in range(processes) if names[i::processes]]
    context = mp.get_context("spawn")
    outs = [workdir / f"camera-{streams}-{i}.json" for i in range(len(groups))]
    children = [
        context.Process(
            target=camera_process,
            args=(deployment.url, deployment.ingest_key, group, duration_s, i, str(out), window_us),
        )
        for i, (group, out) in enumerate(zip(groups, outs, strict=True))
    ]
    lag_samples: list[int] = []
    stop = threading.Event()

    def sample_lag() -> None:
        while not stop.wait(0.5):
            lag_samples.append(deployment.bus_lag())

    sampler = threading.Thread(target=sample_lag, daemon=True)
    started = time.perf_counter()
    for child in children:
        child.start()
    sampler.start()
    for child in children:
        child.join()
    sent_s = time.perf_counter() - started
    while deployment.bus_lag() and time.perf_counter() - started < duration_s + 300:  # drain
        time.sleep(0.2)
    drained_s = time.perf_counter() - started - sent_s
    stop.set()
    sampler.join()
    time.sleep(1.5)  # the worker's counters are read after its batch
    after = counters(deployment.worker_metrics())
    records = [json.loads(out.read_text()) for out in outs]
    total = {
        k: sum(r[k] for r in records)
        for k in (
            "accepted",
            "timed_out",
            "retried",
            "rejected",
            "lost",
            "events",
            "expected_steps",
            "returned_steps",
        )
    }
    latencies = [v for r in records for v in r["latencies_ms"]]
    applied = after["applied"] - before["applied"]
    with httpx.Client(
        base_url=deployment.url, headers={"authorization": f"Bearer {deployment.admin_key}"}
    ) as admin:
        for name in names:  # free the slots for the next level
            admin.delete(f"/v1/streams/{name}")
    return {
        "streams": streams,
        "client_processes": len(children),
        "duration_s": duration_s,
        "events_accepted": total["events"],
        "events_per_s": total["events"] / duration_s,
        "packets_accepted": total["accepted"],
        "packets_timed_out_504": total["timed_out"],
        "retries_503_429": total["retried"],
        "packets_rejected": total["rejected"],
        "packets_applied": applied,
        "packets_lost": total["accepted"] - applied + total["lost"],
        "dead_lettered": after["dead"] - before["dead"],
        "steps_expected": total["expected_steps"],
        "steps_returned": total["returned_steps"],
        "steps_applied": after["steps"] - before["steps"],
        "steps_per_s": (after["steps"] - before["steps"]) / (sent_s + drained_s),
        "latency_p50_ms": percentile(latencies, 50),
        "latency_p99_ms": percentile(latencies, 99),
        "max_behind_camera_s": max(r["max_schedule_lag_s"] for r in records),
        "bus_lag_max": max(lag_samples, default=0),
        "bus_lag_mean": sum(lag_samples) / max(len(lag_samples), 1),
        "drain_s": drained_s,
        "_latencies_ms": latencies,
        "_lag": lag_samples,
    }


def plot(levels: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for level in levels:
        values = np.sort(level["_latencies_ms"])
        if values.size:
            left.plot(
                values, np.arange(1, values.size + 1) / values.size, label=f"{level['streams']} streams"
            )
        right.plot(np.arange(len(level["_lag"])) * 0.5, level["_lag"], label=f"{level['streams']} streams")
    left.set(xscale="log", xlabel="POST -> prediction (ms)", ylabel="fraction of packets", title="latency")
    right.set(xlabel="s", ylabel="bus lag (entries not yet applied)", title="worker lag")
    for axes in (left, right):
        axes.grid(alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--streams", type=int, nargs="+", default=[8, 32, 128], help="stream counts to run")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of posting per stream count")
    parser.add_argument("--processes", type=int, default=4, help="client processes per stream count")
    args = parser.parse_args()
    levels = []
    with (
        tempfile.TemporaryDirectory(prefix="bench-load-") as tmp,
        Deployment(Path(tmp), max(args.streams) + 8) as d,
    ):
        for streams in args.streams:
            level = run_level(d, streams, args.duration, min(args.processes, streams), Path(tmp))
            levels.append(level)
            print(
                f"{streams:>4} streams: {level['events_accepted']:>9} events accepted, "
                f"{level['packets_accepted']} packets, {level['steps_applied']:.0f}/{level['steps_expected']} steps "
                f"applied/expected, lost {level['packets_lost']:.0f}",
                flush=True,
            )
    header = (
        f"{'streams':>7} {'events/s':>9} {'packets':>8} {'steps ok':>9} {'lost':>5} {'p50 ms':>8} "
        f"{'p99 ms':>8} {'behind s':>9} {'lag max':>8} {'retries':>8}"
    )
    print(header)
    for lv in levels:
        print(
            f"{lv['streams']:>7} {lv['events_per_s']:>9.0f} {lv['packets_accepted']:>8} "
            f"{str(lv['steps_applied'] == lv['steps_expected']):>9} {lv['packets_lost']:>5.0f} "
            f"{lv['latency_p50_ms'] or 0:>8.1f} {lv['latency_p99_ms'] or 0:>8.1f} {lv['max_behind_camera_s']:>9.1f} "
            f"{lv['bus_lag_max']:>8} {lv['retries_503_429']:>8}"
        )
    nothing_lost = all(lv["packets_lost"] == 0 and lv["dead_lettered"] == 0 for lv in levels)
    exact = all(lv["steps_applied"] == lv["steps_expected"] for lv in levels)
    verdict = "PASS" if nothing_lost and exact else "FAIL"
    print(f"verdict: {verdict} (packets lost 0: {nothing_lost}; steps applied == steps expected: {exact})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    plot(levels, RESULTS / "bench_load.png")
    result = {
        "benchmark": "load",
        "command": " ".join(["benchmarks/bench_load.py", *sys.argv[1:]]),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load_avg": os.getloadavg()},
        "verdict": verdict,
        "levels": [{k: v for k, v in lv.items() if not k.startswith("_")} for lv in levels],
    }
    (RESULTS / "bench_load.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'bench_load.json'} and bench_load.png")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
