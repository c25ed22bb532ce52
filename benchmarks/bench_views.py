"""What open live views cost learning: steps per second with 0 and with 100 viewers, side by side.

    .venv/bin/python benchmarks/bench_views.py [--duration 10] [--cycles 3] [--viewers 100] [--streams 4]

Starts ``ndot serve`` (the embedded bus: API, live views and worker share one process and its GIL,
the worst case for the views) with ``NDOT_MAX_STREAM_SPEED=0``, so the worker steps as fast as it
can, and keeps it busy: ``--streams`` threads each post whole labelled N-MNIST recordings (one
packet per recording, ``wait=true``) on a stream of their own. Then ``--cycles`` times: a views
phase, where ``--viewers`` open ``GET /v1/streams/{id}/live`` spread over the streams from a process
of their own (raw sockets that read and drop what comes, counting events), between two baselines
where nobody watches (each ``--duration`` s; the closed views' flags lapse before a baseline).
Interleaving keeps a machine whose load drifts (others' jobs) from passing for the views' cost.

Steps per second from ``ndot_steps_total`` (``/metrics``) over each phase, and steps per CPU second
of the service process (``/proc``: what the views cost the process itself, whatever else runs).
Target (issue 12): each views phase at least 90 % of the mean of the baselines on either side, on
average over the cycles. Prints the load average and the updates each view got per second; writes
``results/bench_views.json``; exits 1 when the target is missed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import secrets
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from service_support import ServiceProcess, free_port, nmnist_samples, wait_ready  # noqa: E402

from ndot_core.events.layout import events_to_bytes  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
SHARED = Path(os.environ.get("NDOT_SHARED_DATA", REPO.parent / "shared" / "data"))
TARGET = 0.90
VIEWING_LAPSE_S = 5.0  # a closed view's flag lapses (3 s) and the worker reads the flags (~1 s)


def steps_total(url: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("ndot_steps_total{")
    )


def feed(url: str, key: str, stream_id: str, bodies: list[tuple[bytes, int]], stop: threading.Event) -> None:
    """Post whole recordings on one stream until ``stop``."""
    with httpx.Client(base_url=url, headers={"x-api-key": key}, timeout=60) as client:
        i = 0
        while not stop.is_set():
            body, label = bodies[i % len(bodies)]
            params = {"label": label, "start": True, "end": True, "width": 34, "height": 34}
            client.post(
                f"/v1/streams/{stream_id}/events",
                params=params,
                content=body,
                headers={"content-type": "application/octet-stream"},
            ).raise_for_status()
            i += 1


def viewers_process(port: int, key: str, streams: list[str], count: int, ready, stop, out: str) -> None:
    """Child: ``count`` live views over raw sockets; writes {opened, events, bytes, seconds}."""
    Path(out).write_text(json.dumps(asyncio.run(_views(port, key, streams, count, ready, stop))))


async def _views(port: int, key: str, streams: list[str], count: int, ready, stop) -> dict[str, Any]:
    tally = {"opened": 0, "events": 0, "bytes": 0}

    async def one(stream_id: str, opened: asyncio.Event) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        request = f"GET /v1/streams/{stream_id}/live HTTP/1.1\r\nHost: bench\r\nX-API-Key: {key}\r\n\r\n"
        writer.write(request.encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head[:200]
        tally["opened"] += 1
        if tally["opened"] == count:
            opened.set()
        try:
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    return
                tally["bytes"] += len(chunk)
                tally["events"] += chunk.count(b"event: live")
        finally:
            writer.close()

    opened = asyncio.Event()
    tasks = [asyncio.create_task(one(streams[i % len(streams)], opened)) for i in range(count)]
    await asyncio.wait_for(opened.wait(), 60)
    ready.set()
    started = time.monotonic()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    tally["seconds"] = time.monotonic() - started
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    return tally


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(url: str, duration_s: float, pid: int) -> dict[str, float]:
    load_before = os.getloadavg()[0]
    before, cpu_before, started = steps_total(url), cpu_s(pid), time.monotonic()
    time.sleep(duration_s)
    after, cpu_after, elapsed = steps_total(url), cpu_s(pid), time.monotonic() - started
    return {
        "steps_per_s": (after - before) / elapsed,
        "service_cpu_per_s": (cpu_after - cpu_before) / elapsed,
        "seconds": elapsed,
        "load_1m_before": load_before,
        "load_1m_after": os.getloadavg()[0],
    }


def open_views(port: int, key: str, streams: list[str], count: int, out: Path) -> tuple[Any, Any]:
    """Start the viewers' process; returns it and its stop event once every view is open."""
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Event(), ctx.Event()
    child = ctx.Process(target=viewers_process, args=(port, key, streams, count, ready, stop, str(out)))
    child.start()
    if not ready.wait(90):
        raise RuntimeError("the viewers did not all connect")
    return child, stop


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per phase (default 10)")
    parser.add_argument("--cycles", type=int, default=3, help="views phases, each between two baselines")
    parser.add_argument("--viewers", type=int, default=100, help="open live views in a views phase")
    parser.add_argument("--streams", type=int, default=4, help="streams fed with recordings")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load before measuring")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_views.json")
    args = parser.parse_args()

    samples = nmnist_samples(SHARED / "nmnist-small", 50)
    bodies = [(events_to_bytes(events), label) for events, label in samples]
    key = secrets.token_urlsafe(24)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    workdir = Path(tempfile.mkdtemp(prefix="bench-views-"))
    env = {
        "NDOT_PORT": str(port),
        "NDOT_INGEST_KEYS": key,
        "NDOT_ADMIN_KEYS": secrets.token_urlsafe(24),
        "NDOT_WINDOW_US": "20000",
        "NDOT_MAX_STREAM_SPEED": "0",
        "NDOT_RATE_LIMIT_RPS": "0",
        "NDOT_CHECKPOINT_DIR": str(workdir / "ckpt"),
        "NDOT_CHECKPOINT_INTERVAL_S": "0",
        "NDOT_CHECKPOINT_MAX_ENTRIES": "0",
        "NDOT_RESTORE_ON_START": "false",
        "OMP_NUM_THREADS": "1",
    }
    serve = ServiceProcess("serve", env, workdir / "serve.log").start()
    stop_feeding = threading.Event()
    streams = [f"cam-{i}" for i in range(args.streams)]
    baselines: list[dict[str, float]] = []
    views: list[dict[str, Any]] = []
    try:
        wait_ready(url, serve)
        for i, sid in enumerate(streams):
            rotated = bodies[i:] + bodies[:i]
            threading.Thread(target=feed, args=(url, key, sid, rotated, stop_feeding), daemon=True).start()
        time.sleep(args.warmup)
        print(f"baseline 0 (no views), {args.duration:g} s ...", flush=True)
        baselines.append(measure(url, args.duration, serve.process.pid))
        for cycle in range(args.cycles):
            tally = workdir / f"viewers-{cycle}.json"
            child, stop = open_views(port, key, streams, args.viewers, tally)
            time.sleep(2.0)  # the worker reads the viewing flags about once a second
            print(f"views {cycle} ({args.viewers} views), {args.duration:g} s ...", flush=True)
            phase = measure(url, args.duration, serve.process.pid)
            stop.set()
            child.join(60)
            views.append({**phase, "viewers": json.loads(tally.read_text())})
            time.sleep(VIEWING_LAPSE_S)
            print(f"baseline {cycle + 1} (no views), {args.duration:g} s ...", flush=True)
            baselines.append(measure(url, args.duration, serve.process.pid))
    finally:
        stop_feeding.set()
        code = serve.stop()

    def efficiency(phase: dict[str, float]) -> float:  # steps per CPU second of the service
        return phase["steps_per_s"] / phase["service_cpu_per_s"]

    for i, phase in enumerate(views):  # each views phase against the baselines on either side
        phase["over_baselines"] = phase["steps_per_s"] / (
            (baselines[i]["steps_per_s"] + baselines[i + 1]["steps_per_s"]) / 2
        )
        phase["efficiency_over_baselines"] = efficiency(phase) / (
            (efficiency(baselines[i]) + efficiency(baselines[i + 1])) / 2
        )
        tally = phase["viewers"]
        tally["updates_per_viewer_per_s"] = tally["events"] / max(1, tally["opened"]) / tally["seconds"]
    ratio = sum(v["over_baselines"] for v in views) / len(views)
    cpu_ratio = sum(v["efficiency_over_baselines"] for v in views) / len(views)
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    result = {
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d"),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "settings": {
            "duration_s": args.duration,
            "cycles": args.cycles,
            "viewers": args.viewers,
            "streams": args.streams,
            "window_us": 20_000,
            "bus": "embedded (ndot serve)",
        },
        "baselines": baselines,
        "views": views,
        "views_over_baselines": ratio,
        "steps_per_cpu_s_views_over_baselines": cpu_ratio,
        "target": TARGET,
        "verdict": verdict,
        "serve_exit_code": code,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{'phase':<12} {'steps/s':>9} {'service CPU':>12} {'steps/CPU s':>12} {'load 1m':>12}  views")
    rows = [(f"baseline {i}", b) for i, b in enumerate(baselines)] + [
        (f"views {i}", v) for i, v in enumerate(views)
    ]
    for name, phase in sorted(rows, key=lambda row: (int(row[0].split()[1]), row[0].startswith("views"))):
        load = f"{phase['load_1m_before']:.1f}->{phase['load_1m_after']:.1f}"
        extra = ""
        if "viewers" in phase:
            tally = phase["viewers"]
            extra = (
                f"{tally['opened']} x {tally['updates_per_viewer_per_s']:.1f} updates/s, "
                f"x{phase['over_baselines']:.3f} steps/s"
            )
        print(
            f"{name:<12} {phase['steps_per_s']:>9.1f} {phase['service_cpu_per_s']:>12.2f} "
            f"{efficiency(phase):>12.1f} {load:>12}  {extra}"
        )
    print(
        f"steps/s with views / without = {ratio:.3f} (mean of {len(views)} cycles; target >= {TARGET}): {verdict}"
    )
    print(f"steps per service CPU second, with views / without = {cpu_ratio:.3f}   -> {args.out}")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    raise SystemExit(main())
