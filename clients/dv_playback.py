"""``python -m clients.dv_playback RECORDING``: serve a recording as a DV network event stream, in real time.

A stand-in for an event camera behind the DV software: a ``dv_processing.io.NetworkWriter`` on
``--host:--port`` with the recording's sensor size, which sends the recording's events in batches
of ``--batch-us`` of camera time, each when its batch closes on the recording's clock (divided by
``--speed``), to every connected client -- what ``ndot-client --dv-stream HOST:PORT`` reads. It
waits for the first client before it starts (``--no-wait-client``: start at once), plays
``[--from-s, --to-s)`` of the recording (seconds from its first event) and then closes the stream
by exiting (the reader sees the stream end, as when the DV software stops).

Logs ``key=value`` lines on stdout: ``event=serving``, ``event=client_connected``, ``event=played``.
Needs dv-processing (``pip install 'ndot-stream[camera]'``); exit code 2 without it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

from ndot_core.events.readers import read_events


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clients.dv_playback",
        description="Serve an event recording as a DV network stream (dv_processing NetworkWriter), in real time.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("recording", type=Path, help="any file ndot_core.events.read_events reads")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=7777, help="TCP port to listen on")
    parser.add_argument("--batch-us", type=int, default=5_000, help="camera time per batch sent")
    parser.add_argument("--speed", type=float, default=1.0, help="playback speed-up factor")
    parser.add_argument(
        "--from-s", type=float, default=0.0, help="start this many seconds into the recording"
    )
    parser.add_argument(
        "--to-s", type=float, help="stop this many seconds into the recording (default: its end)"
    )
    parser.add_argument(
        "--wait-client",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="start playing when the first client connects",
    )
    parser.add_argument(
        "--linger-s", type=float, default=0.5, help="seconds to keep the stream open after the last batch"
    )
    return parser


def batches(events: np.ndarray, batch_us: int) -> list[np.ndarray]:
    """The events cut into batches of ``batch_us`` of camera time from the first event (empty ones skipped)."""
    if len(events) == 0:
        return []
    t = events["t"]
    edges = np.arange(int(t[0]), int(t[-1]) + batch_us + 1, batch_us)
    cuts = np.searchsorted(t, edges[1:-1], side="left")
    return [part for part in np.split(events, cuts) if len(part)]


def to_store(dv, events: np.ndarray):
    """An ``EventStore`` of ``events`` (EVENT_DTYPE)."""
    store = dv.EventStore()
    push = store.push_back
    for t, x, y, p in zip(
        events["t"].tolist(), events["x"].tolist(), events["y"].tolist(), events["p"].tolist(), strict=True
    ):
        push(t, x, y, bool(p))
    return store


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        import dv_processing as dv
    except ImportError:
        print("dv_playback: needs dv-processing: pip install 'ndot-stream[camera]'", file=sys.stderr)
        return 2
    if args.batch_us < 1 or args.speed <= 0:
        print("dv_playback: --batch-us must be >= 1 and --speed > 0", file=sys.stderr)
        return 2
    events, sensor_size = read_events(args.recording)
    t0 = int(events["t"][0]) if len(events) else 0
    lo = t0 + round(args.from_s * 1e6)
    hi = t0 + round(args.to_s * 1e6) if args.to_s is not None else None
    t = events["t"]
    events = events[(t >= lo) & ((t < hi) if hi is not None else True)]
    parts = batches(events, args.batch_us)
    stores = [to_store(dv, part) for part in parts]
    width, height = int(sensor_size[0]), int(sensor_size[1])
    stream = dv.io.Stream.EventStream(0, "events", f"playback_{args.recording.stem}", (width, height))
    writer = dv.io.NetworkWriter(args.host, args.port, stream)
    print(
        f"event=serving host={args.host} port={args.port} width={width} height={height} "
        f"events={len(events)} batches={len(parts)}",
        flush=True,
    )
    if args.wait_client:
        while writer.getClientCount() == 0:
            time.sleep(0.005)
        print(f"event=client_connected clients={writer.getClientCount()}", flush=True)
    started_s = time.perf_counter()
    first_t = int(parts[0]["t"][0]) if parts else 0
    for part, store in zip(parts, stores, strict=True):
        # a batch leaves when its window closes on the recording's clock, as a camera sends it
        due_s = (
            started_s
            + ((int(part["t"][0]) - first_t) // args.batch_us + 1) * args.batch_us / 1e6 / args.speed
        )
        delay_s = due_s - time.perf_counter()
        if delay_s > 0:
            time.sleep(delay_s)
        writer.writeEvents(store)
    while writer.getQueuedPacketCount() > 0:
        time.sleep(0.005)
    print(
        f"event=played events={len(events)} batches={len(parts)} seconds={time.perf_counter() - started_s:.3f}",
        flush=True,
    )
    time.sleep(max(args.linger_s, 0.0))
    sys.stdout.flush()
    # dv-processing's NetworkWriter destructor can wait on its network thread for good; the
    # process exit closes the sockets (the client sees the stream end) without running it.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
