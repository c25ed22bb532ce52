"""Event-data benchmark: framing throughput against tonic's ToFrame, the streaming framer, decoding, readers.

    .venv/bin/python benchmarks/bench_events.py [--repeat 20] [--runs 5]

Workload: the real Prophesee EVT2 recording (640x480, 539,481 events in 50 ms, ~10.8 M events/s)
tiled ``--repeat`` times end to end in time (default 20: 10.8 M events, 1 s of camera time).
Measured (best of ``--runs``; rates per second of this process's CPU time, wall-clock beside):
  * one ``np.bincount`` over precomputed flat indices (the floor), the flat index itself;
  * ``to_frames``: 10 ms windows at 640x480 and at 48x48 (the model input), T=10 by event count;
  * ``tonic.transforms.ToFrame(time_window=10 ms)`` on the same events;
  * ``StreamFramer`` fed 1 ms packets (~10.8k events each), 10 ms windows, 640x480 and 48x48;
  * ``events_from_bytes`` (HTTP body → validated events) and each reader on ../shared/data.
Targets: to_frames >= 100 M events/s, StreamFramer >= 30 M events/s with 1 ms packets.
Writes results/bench_events.{json,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ndot_core.events.framing import StreamFramer, flat_pixel_index, to_frames  # noqa: E402
from ndot_core.events.layout import events_from_bytes, events_to_bytes, to_tonic  # noqa: E402
from ndot_core.events.readers import read_events  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
DATA = Path(
    os.environ.get("NDOT_SHARED_DATA", Path(__file__).resolve().parent.parent.parent / "shared" / "data")
)
TARGET_FRAMING = 100e6
TARGET_STREAMING = 30e6
WINDOW_US = 10_000


def best_seconds(work: Callable[[], Any], runs: int) -> tuple[float, float]:
    """Best wall-clock and best CPU seconds (this process) over ``runs`` calls.

    The CPU time is the figure judged: on shared cores a neighbour's load stretches wall time
    while this process waits, not while it works.
    """
    wall = cpu = float("inf")
    for _ in range(runs):
        start_wall, start_cpu = time.perf_counter(), time.process_time()
        work()
        wall = min(wall, time.perf_counter() - start_wall)
        cpu = min(cpu, time.process_time() - start_cpu)
    return wall, cpu


def tiled_recording(repeat: int) -> tuple[np.ndarray, tuple[int, int]]:
    events, sensor = read_events(DATA / "recordings" / "prophesee-evt2-640x480.raw")
    span = int(events["t"][-1] - events["t"][0]) + 1
    tiled = np.concatenate([events] * repeat)
    tiled["t"] = np.concatenate([events["t"] + k * span for k in range(repeat)])
    return tiled, sensor


def stream(events: np.ndarray, sensor: tuple[int, int], packet_us: int, output_size) -> int:
    framer = StreamFramer(sensor, window_us=WINDOW_US, output_size=output_size)
    cuts = np.searchsorted(events["t"], np.arange(events["t"][0], events["t"][-1] + packet_us, packet_us))
    frames = 0
    for begin, end in zip(cuts[:-1].tolist(), cuts[1:].tolist(), strict=True):
        frames += len(framer.push(events[begin:end]))
    return frames + len(framer.flush())


def measure(repeat: int, runs: int) -> list[dict[str, Any]]:
    events, sensor = tiled_recording(repeat)
    count = len(events)
    index = flat_pixel_index(events, sensor)
    body = events_to_bytes(events)
    rows: list[dict[str, Any]] = []

    def add(name: str, seconds: tuple[float, float], n: int = count, target: float | None = None) -> None:
        wall, cpu = seconds
        rows.append(
            {
                "name": name,
                "events": n,
                "wall_seconds": wall,
                "cpu_seconds": cpu,
                "events_per_s": n / cpu,
                "wall_events_per_s": n / wall,
                "target_events_per_s": target,
            }
        )

    add(
        "np.bincount alone (floor)",
        best_seconds(lambda: np.bincount(index, minlength=2 * sensor[0] * sensor[1]), runs),
    )
    add("flat_pixel_index", best_seconds(lambda: flat_pixel_index(events, sensor), runs))
    add(
        "to_frames 10 ms, 640x480",
        best_seconds(lambda: to_frames(events, sensor, time_window_us=WINDOW_US), runs),
        target=TARGET_FRAMING,
    )
    add(
        "to_frames 10 ms, 48x48",
        best_seconds(lambda: to_frames(events, sensor, time_window_us=WINDOW_US, output_size=(48, 48)), runs),
        target=TARGET_FRAMING,
    )
    add(
        "to_frames T=10 by count, 48x48",
        best_seconds(lambda: to_frames(events, sensor, n_event_bins=10, output_size=(48, 48)), runs),
        target=TARGET_FRAMING,
    )
    from tonic.transforms import ToFrame

    tonic_events = to_tonic(events)
    tonic_frame = ToFrame(sensor_size=(*sensor, 2), time_window=WINDOW_US, include_incomplete=True)
    add("tonic ToFrame 10 ms, 640x480", best_seconds(lambda: tonic_frame(tonic_events), max(1, runs // 2)))
    add(
        "StreamFramer 1 ms packets, 640x480",
        best_seconds(lambda: stream(events, sensor, 1000, None), runs),
        target=TARGET_STREAMING,
    )
    add(
        "StreamFramer 1 ms packets, 48x48",
        best_seconds(lambda: stream(events, sensor, 1000, (48, 48)), runs),
        target=TARGET_STREAMING,
    )
    add(
        "events_from_bytes (validate)",
        best_seconds(lambda: events_from_bytes(body, sensor, max_events=None), runs),
    )
    for name in (
        "prophesee-evt2-640x480.raw",
        "prophesee-evt3-1280x720.raw",
        "dvxplorer-1.46s.aedat4",
        "dvs128-clips/5.bs2",
    ):
        path = DATA / "recordings" / name
        n = len(read_events(path)[0])
        add(f"read_events {name}", best_seconds(lambda path=path: read_events(path), max(1, runs // 2)), n)
    return rows


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in rows]
    rates = [r["events_per_s"] / 1e6 for r in rows]
    colours = [
        "tab:green"
        if r["target_events_per_s"] and r["events_per_s"] >= r["target_events_per_s"]
        else "tab:red"
        if r["target_events_per_s"]
        else "tab:gray"
        for r in rows
    ]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(rows) + 1.2))
    ax.barh(names[::-1], rates[::-1], color=colours[::-1])
    for target, label in ((TARGET_FRAMING, "framing target"), (TARGET_STREAMING, "streaming target")):
        ax.axvline(target / 1e6, linestyle="--", color="black", linewidth=0.8)
        ax.text(target / 1e6, len(rows) - 0.4, f" {label}", fontsize=7)
    ax.set_xscale("log")
    ticks = [t for t in (1, 3, 10, 30, 100, 300, 1000, 3000) if min(rates) / 2 <= t <= max(rates) * 2]
    ax.xaxis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FixedFormatter([str(t) for t in ticks]))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("million events / s of CPU time (log)")
    ax.set_title("ndot_core event data throughput (green: meets target, red: misses)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--repeat", type=int, default=20, help="times the EVT2 recording is tiled (default 20)"
    )
    parser.add_argument(
        "--runs", type=int, default=5, help="timed runs per measurement, best kept (default 5)"
    )
    args = parser.parse_args()
    if not (DATA / "recordings").is_dir():
        sys.exit(f"recordings not found under {DATA} (set NDOT_SHARED_DATA)")
    rows = measure(args.repeat, args.runs)
    load = os.getloadavg()[0]
    print(
        f"load average {load:.1f} on {os.cpu_count()} cores; rates from CPU time (wall-clock rate beside it)"
    )
    print(f"{'measurement':40s} {'events':>11s} {'cpu s':>8s} {'M ev/s':>8s} {'wall M/s':>9s}  target")
    for r in rows:
        target = r["target_events_per_s"]
        verdict = (
            ""
            if target is None
            else f">= {target / 1e6:.0f} M: {'PASS' if r['events_per_s'] >= target else 'FAIL'}"
        )
        print(
            f"{r['name']:40s} {r['events']:11,d} {r['cpu_seconds']:8.4f} {r['events_per_s'] / 1e6:8.1f} "
            f"{r['wall_events_per_s'] / 1e6:9.1f}  {verdict}"
        )
    targets = [r for r in rows if r["target_events_per_s"]]
    passed = all(r["events_per_s"] >= r["target_events_per_s"] for r in targets)
    speedup = (
        next(r for r in rows if r["name"].startswith("to_frames 10 ms, 640"))["events_per_s"]
        / next(r for r in rows if r["name"].startswith("tonic"))["events_per_s"]
    )
    print(f"to_frames vs tonic ToFrame (same frames): {speedup:.1f}x")
    print(
        f"verdict: {'PASS' if passed else 'FAIL'} ({sum(r['events_per_s'] >= r['target_events_per_s'] for r in targets)}"
        f"/{len(targets)} targets met)"
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {
        "benchmark": "bench_events",
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "numpy": np.__version__,
            "load_average_1min": load,
        },
        "repeat": args.repeat,
        "runs": args.runs,
        "rows": rows,
        "speedup_vs_tonic": speedup,
        "verdict": "PASS" if passed else "FAIL",
    }
    (RESULTS / "bench_events.json").write_text(json.dumps(report, indent=2))
    plot(rows, RESULTS / "bench_events.png")
    print(f"wrote {RESULTS / 'bench_events.json'} and .png")


if __name__ == "__main__":
    main()
