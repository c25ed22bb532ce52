"""Scale-out: live cameras on 1 worker, on N worker ranks (``ndot workers``), and a rank killed.

    .venv/bin/python benchmarks/bench_scaleout.py [--ranks 1 2] [--levels 8 32 128] [--duration 12]
        [--window-ms 20] [--shards 64] [--sync-modes average grad] [--via http|bus] [--processes 2]
        [--warmup 3] [--skip-recovery]

Per configuration (``ndot worker``, then ``ndot workers --nproc R`` for each R > 1 and each
``--sync-modes`` (``NDOT_SYNC_MODE``: average = periodic parameter averaging, grad = ranks in
lockstep, gradients all-reduced every tick)), after ``--warmup`` seconds of 2 cameras (not recorded),
per level of N live N-MNIST cameras, each waiting for its answer before its next packet:

* ``--via http`` (default): the cameras POST through a real ``ndot api`` process
  (``http_cameras.http_level``, ``--processes`` client processes); latency is POST -> prediction.
* ``--via bus``: one driver publishes straight onto Redis (``worker_load.worker_level``); latency is
  publish -> reply (no HTTP, no API process).

Reported: steps/s against what the cameras made, p50 / p99 latency, how far behind the cameras' clocks
the drivers fell, and for ranks the seconds per round spent in the collectives
(``ndot_cluster_sync_seconds_total / ndot_cluster_rounds_total`` of every rank's /metrics). Then, with
R ranks and the first level: one rank SIGKILLed a third into the run; *recovery* = kill -> every
camera answered again (torchrun restarts the group from the last committed cut and the ranks replay
their shards), and kill -> the first answer. A camera whose packet was in flight at the kill waits
for it 10 s (the API's 504, or the bus driver's reply wait) before its next one. One torch thread per rank; the drivers (and the API) share the machine's cores with
the ranks (on 2 cores everything competes: at 128 cameras nothing here runs in real time). Prints the
load average before and after each configuration and writes ``results/bench_scaleout.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from http_cameras import ApiProcess, http_level  # noqa: E402
from worker_load import WorkerProcess, worker_level  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def free_port_pair() -> int:
    while True:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = int(probe.getsockname()[1])
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port + 1)) != 0:
                return port


def scrape(port: int) -> dict[str, float]:
    """``name{labels}`` -> value of a rank's /metrics (the cluster series only)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("ndot_cluster_"):
            name, value = line.rsplit(" ", 1)
            values[name.split("{")[0]] = float(value)
    return values


def rank_pids(stream: str) -> dict[int, int]:
    """``{rank: pid}`` of the ranks serving ``stream`` (torchrun gives them RANK and a restart count)."""
    found = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = dict(x.split("=", 1) for x in (proc / "environ").read_text().split("\0") if "=" in x)
        except OSError:
            continue
        if env.get("NDOT_BUS_STREAM") == stream and "TORCHELASTIC_RESTART_COUNT" in env:
            found[int(env["RANK"])] = int(proc.name)
    return found


def run_config(
    ranks: int, levels: list[int], args: argparse.Namespace, workdir: Path, sync_mode: str = "average"
) -> dict[str, Any]:
    port = free_port_pair()
    env = {
        "NDOT_WINDOW_US": str(args.window_ms * 1000),
        "NDOT_MAX_STREAMS": str(max(levels) + 8),
        "NDOT_MAX_STREAM_BACKLOG_FRAMES": "100000",
        "NDOT_SHARDS": str(args.shards),
        "NDOT_WORKER_METRICS_PORT": str(port),
        "NDOT_WORKER_RANKS": str(ranks),
        "NDOT_SYNC_MODE": sync_mode,
    }
    command = "worker" if ranks == 1 else "workers"
    name = f"{ranks} rank(s)" if ranks == 1 else f"{ranks} ranks {sync_mode}"
    out: dict[str, Any] = {
        "ranks": ranks,
        "sync_mode": sync_mode if ranks > 1 else None,
        "name": name,
        "command": f"ndot {command}",
        "levels": [],
    }
    folder = workdir / f"r{ranks}-{sync_mode}"
    folder.mkdir(parents=True, exist_ok=True)
    out["load_before"] = os.getloadavg()
    with WorkerProcess(folder, env, command=command) as worker, contextlib.ExitStack() as stack:
        api = stack.enter_context(ApiProcess(worker)) if args.via == "http" else None

        def level_of(streams: int, duration_s: float) -> dict[str, Any]:
            """One level of ``streams`` cameras through the API (``--via http``) or onto the bus."""
            if api is None:
                return worker_level(worker.stream, streams, duration_s, args.window_ms * 1000)
            return http_level(api.url, api.key, streams, duration_s, args.window_ms * 1000, args.processes)

        if args.warmup > 0:  # not recorded: the model's first steps, the clients' first connections
            level_of(2, args.warmup)
        for streams in levels:
            before = [scrape(port + r) for r in range(ranks)] if ranks > 1 else []
            scraped = time.perf_counter()
            level = level_of(streams, args.duration)
            level.pop("replied_at")
            level["camera_frames_per_s"] = level["expected_steps"] / args.duration
            if ranks > 1:
                after = [scrape(port + r) for r in range(ranks)]
                rounds = [
                    a["ndot_cluster_rounds_total"] - b["ndot_cluster_rounds_total"]
                    for a, b in zip(after, before, strict=True)
                ]
                sync = [
                    a["ndot_cluster_sync_seconds_total"] - b["ndot_cluster_sync_seconds_total"]
                    for a, b in zip(after, before, strict=True)
                ]
                level["sync_ms_per_round"] = [1e3 * s / max(r, 1) for s, r in zip(sync, rounds, strict=True)]
                # (over the scrapes' interval: the client processes' start-up included)
                level["rounds_per_s"] = rounds[0] / (time.perf_counter() - scraped)
            print(
                f"  {name:16s} {streams:4d} cameras: steps/s {level['steps_per_s']:7.1f} "
                f"(cameras made {level['camera_frames_per_s']:.0f}/s)  p50 {level['latency_p50_ms'] or 0:6.1f} ms "
                f"p99 {level['latency_p99_ms'] or 0:7.1f} ms  behind {level['max_schedule_lag_s']:.2f} s  lost {level['lost']}"
                + (
                    f"  sync {min(level['sync_ms_per_round']):.2f}-{max(level['sync_ms_per_round']):.2f} ms/round "
                    f"({level['rounds_per_s']:.0f} rounds/s)"
                    if ranks > 1
                    else ""
                ),
                flush=True,
            )
            out["levels"].append(level)
        if ranks > 1 and not args.skip_recovery:
            out["recovery"] = recovery(worker.stream, levels[0], args, level_of)
            # what the restarted ranks replay: the history since the last committed cut (none is due within
            # NDOT_CHECKPOINT_INTERVAL_S=300 s here, so every packet of the levels above, and the warm-up's)
            out["recovery"]["history_packets"] = sum(level["packets"] for level in out["levels"])
    out["load_after"] = os.getloadavg()
    print(f"  ({name}: load average {out['load_before'][0]:.2f} before, {out['load_after'][0]:.2f} after)")
    return out


def recovery(
    stream: str, streams: int, args: argparse.Namespace, level_of: Callable[[int, float], dict[str, Any]]
) -> dict[str, Any]:
    """Kill rank 1 a third into a run; seconds until every camera got a reply again."""
    killed: list[float] = []

    def kill() -> None:
        time.sleep(args.duration / 3 + (3.0 if args.via == "http" else 0.0))  # (the clients' start-up)
        pids = rank_pids(stream)
        killed.append(time.time())  # (the drivers' replied_at: wall-clock times)
        os.kill(pids[1], signal.SIGKILL)

    killer = threading.Thread(target=kill)
    killer.start()
    level = level_of(streams, args.duration * 2)
    killer.join()
    at = killed[0]
    answered_again = [
        min((t for t in times if t > at), default=float("inf")) for times in level["replied_at"].values()
    ]
    seconds, first = max(answered_again) - at, min(answered_again) - at
    statuses = level.get("statuses", {})  # (--via http: the answers' status codes)
    print(
        f"  recovery: rank 1 SIGKILLed with {streams} cameras posting; every camera answered again after "
        f"{seconds:.1f} s, the first after {first:.1f} s (no answer within 10 s: {level['lost']}"
        + (f"; statuses {statuses}" if statuses else "")
        + ")",
        flush=True,
    )
    return {
        "streams": streams,
        "recovery_s": seconds,
        "first_answer_s": first,
        "lost": level["lost"],
        "packets": level["packets"],
        "statuses": statuses,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--levels", type=int, nargs="+", default=[8, 32, 128])
    parser.add_argument("--duration", type=float, default=12.0)
    parser.add_argument("--warmup", type=float, default=3.0, help="seconds of 2 cameras first, not recorded")
    parser.add_argument("--window-ms", type=int, default=20)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument(
        "--sync-modes",
        nargs="+",
        choices=["average", "grad"],
        default=["average", "grad"],
        help="for ranks > 1",
    )
    parser.add_argument(
        "--via",
        choices=["http", "bus"],
        default="http",
        help="cameras POST through an ndot api process (POST -> prediction), or publish onto Redis",
    )
    parser.add_argument("--processes", type=int, default=2, help="camera client processes (--via http)")
    parser.add_argument("--skip-recovery", action="store_true")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    load_before = os.getloadavg()
    print(
        f"load average before: {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}; "
        f"{os.cpu_count()} cores; 1 torch thread per rank; {args.window_ms} ms windows; cameras via {args.via}"
    )
    started = time.perf_counter()
    configs = []
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for sync_mode in args.sync_modes if ranks > 1 else ["average"]:
                configs.append(run_config(ranks, args.levels, args, Path(tmp), sync_mode))
    load_after = os.getloadavg()
    print(f"load average after: {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    base = {lv["streams"]: lv["steps_per_s"] for lv in configs[0]["levels"]}
    print("\nScaling (steps/s against the first configuration, same cameras)")
    for config in configs[1:]:
        for level in config["levels"]:
            ratio = (
                level["steps_per_s"] / base[level["streams"]] if base.get(level["streams"]) else float("nan")
            )
            print(f"  {config['name']}, {level['streams']:4d} cameras: {ratio:.2f}x")
            level["scaling_vs_first"] = ratio
    report = {
        "command": " ".join(sys.argv),
        "via": args.via,
        "date": time.strftime("%Y-%m-%d"),
        "cores": os.cpu_count(),
        "load_before": load_before,
        "load_after": load_after,
        "configs": configs,
        "seconds": time.perf_counter() - started,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "bench_scaleout.json").write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.out / 'bench_scaleout.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
