"""The live half of ``ndot-client``'s command line: ``--camera``, ``--dv-stream``, ``--list-cameras``.

``add_live_arguments`` adds the flags to the replay client's parser; ``run_live`` checks them,
opens the source through dv-processing (exit code 2 with the install command when it is missing),
starts the label input, runs :func:`clients.live_client.stream_live` until Ctrl-C / SIGTERM / ``q``
/ ``--duration``, and prints the summary (``--out``: JSON with every packet posted). Logs are
``key=value`` lines on stderr (``ts=... level=... logger=ndot.client event=...``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import threading
from dataclasses import asdict
from pathlib import Path

from clients.delivery import FAILED_OUTCOMES, ClientConfig
from clients.live_labels import LabelBoard, LabelError, start_label_input
from clients.live_packets import OVERFLOW_POLICIES
from clients.scoreboard import format_summary, plot_accuracy

#: Replay-only options that make no sense for a live source (flag -> its default).
REPLAY_ONLY = {"streams": 1, "packet_events": None, "limit": None, "shuffle": False}


def add_live_arguments(parser: argparse.ArgumentParser) -> None:
    """The live-source flags (a group of their own in ``--help``)."""
    live = parser.add_argument_group(
        "live sources (need dv-processing: pip install 'ndot-stream[camera]')",
        "Stream an event camera as it records. Packets are cut by --packet-us on the camera's clock, "
        "mapped to microseconds from the stream's start; the stream id is PREFIX-0.",
    )
    live.add_argument(
        "--camera",
        nargs="?",
        const="",
        metavar="NAME",
        help="a USB event camera (DVS128, DAVIS, DVXplorer) through dv-processing: NAME = MODEL_SERIAL "
        "or the serial number as --list-cameras prints it; no NAME = the first camera found",
    )
    live.add_argument(
        "--dv-stream",
        metavar="HOST:PORT",
        help="a DV network event stream (the DV software's TCP output, or any dv_processing NetworkWriter)",
    )
    live.add_argument(
        "--list-cameras", action="store_true", help="print the connected event cameras and exit"
    )
    live.add_argument(
        "--sequence-s",
        type=float,
        metavar="S",
        help="cut the live stream into sequences of S seconds (start/end flags: the service resets the "
        "neuron state between them); unset: one sequence per connection, predictions continuously",
    )
    live.add_argument(
        "--labels",
        default="auto",
        metavar="MODE",
        help="where labels come from: 'keys' (0-9 on the terminal), 'stdin' or a FILE (followed as it "
        "grows) of 'LABEL <class>' / 'LABEL none' lines, 'none', or 'auto' (keys when stdin is a terminal, "
        "else stdin); each packet carries the label current when it is cut",
    )
    live.add_argument(
        "--buffer-events",
        type=int,
        default=1_000_000,
        metavar="N",
        help="at most N events wait for the service (a packet larger than N alone still goes)",
    )
    live.add_argument(
        "--overflow",
        choices=OVERFLOW_POLICIES,
        default="drop-oldest",
        help="when the buffer is full: drop the oldest packets' events (counted; their start/end flags "
        "are kept) or block reading the source",
    )
    live.add_argument(
        "--reconnect-initial-s",
        type=float,
        default=0.5,
        metavar="S",
        help="first wait before reopening a lost source",
    )
    live.add_argument(
        "--reconnect-max-s",
        type=float,
        default=10.0,
        metavar="S",
        help="longest wait between reopen attempts (doubling)",
    )
    live.add_argument(
        "--reconnect-attempts",
        type=int,
        default=0,
        metavar="N",
        help="give up (exit 1) after N failed opens in a row; 0 = keep trying",
    )
    live.add_argument(
        "--duration", type=float, metavar="S", help="stop after S seconds (unset: at Ctrl-C / SIGTERM)"
    )
    live.add_argument(
        "--status-s", type=float, default=10.0, metavar="S", help="seconds between status log lines; 0 = none"
    )


def live_requested(args: argparse.Namespace) -> bool:
    return args.camera is not None or args.dv_stream is not None or args.list_cameras


class KeyValueFormatter(logging.Formatter):
    """``ts=... level=INFO logger=ndot.client event=...`` (messages are already key=value)."""

    def format(self, record: logging.LogRecord) -> str:
        line = (
            f"ts={self.formatTime(record, '%Y-%m-%dT%H:%M:%S')} level={record.levelname} "
            f"logger={record.name} {record.getMessage()}"
        )
        return line + ("\n" + self.formatException(record.exc_info) if record.exc_info else "")


def configure_logging(level: int = logging.INFO) -> None:
    logger = logging.getLogger("ndot.client")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(KeyValueFormatter())
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)


def _check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    sources = [
        args.source is not None,
        args.synthetic is not None,
        args.camera is not None,
        bool(args.dv_stream),
    ]
    if sum(sources) > 1:
        parser.error("give one of SOURCE, --synthetic N, --camera [NAME] or --dv-stream HOST:PORT")
    for name, default in REPLAY_ONLY.items():
        if getattr(args, name) != default:
            parser.error(f"--{name.replace('_', '-')} is for replays, not a live source")
    if args.packet_us < 1:
        parser.error(f"--packet-us {args.packet_us} must be >= 1")
    if args.sequence_s is not None and args.sequence_s * 1e6 < args.packet_us:
        parser.error(
            f"--sequence-s {args.sequence_s} is shorter than one packet (--packet-us {args.packet_us})"
        )
    if args.buffer_events < 1:
        parser.error(f"--buffer-events {args.buffer_events} must be >= 1")
    if args.reconnect_initial_s <= 0 or args.reconnect_max_s < args.reconnect_initial_s:
        parser.error("need 0 < --reconnect-initial-s <= --reconnect-max-s")


def _print_cameras() -> int:
    from clients.live_sources import list_cameras

    cameras = list_cameras()
    if not cameras:
        print("no event camera connected (dv-processing found none over USB)")
    for camera in cameras:
        print(f"{camera.name}\tmodel={camera.model}\tserial={camera.serial}")
    return 0


def run_live(parser: argparse.ArgumentParser, args: argparse.Namespace, config: ClientConfig) -> int:
    """``ndot-client --camera / --dv-stream / --list-cameras``: the exit code."""
    from clients.live_client import LiveConfig, stream_live
    from clients.live_sources import LiveSourceUnavailable, camera_opener, dv_stream_opener

    _check_args(parser, args)
    configure_logging()
    try:
        if args.list_cameras:
            return _print_cameras()
        if args.camera is not None:
            opener = camera_opener(args.camera or None)
        else:
            opener = dv_stream_opener(args.dv_stream)
    except LiveSourceUnavailable as error:
        print(f"ndot-client: {error}", file=sys.stderr)
        return 2
    except ValueError as error:
        parser.error(str(error))
    live = LiveConfig(
        packet_us=args.packet_us,
        sequence_us=None if args.sequence_s is None else round(args.sequence_s * 1e6),
        buffer_events=args.buffer_events,
        overflow=args.overflow,
        reconnect_initial_s=args.reconnect_initial_s,
        reconnect_max_s=args.reconnect_max_s,
        reconnect_attempts=args.reconnect_attempts,
        duration_s=args.duration,
        status_s=0.0 if args.quiet else args.status_s,
    )
    stop, labels = threading.Event(), LabelBoard()
    try:
        _, restore_terminal = start_label_input(args.labels, labels, stop)
    except LabelError as error:
        parser.error(str(error))
    try:
        board, reader, buffer, records = asyncio.run(stream_live(opener, config, live, labels, stop))
    except KeyboardInterrupt:
        print("ndot-client: interrupted", file=sys.stderr)
        return 130
    finally:
        restore_terminal()
    run = reader.run_info
    summary = {
        **board.summary(),
        "connections": len(run.connections),
        "failed_opens": run.failed_opens,
        "sequences": reader.packetizer.sequences,
        "dropped_packets": buffer.dropped_packets,
        "dropped_events": buffer.dropped_events,
        "buffer_most_events": buffer.most_events,
        "blocked_s": round(buffer.blocked_s, 3),
        "invalid_events": run.invalid_events,
        "late_events": run.late_events,
        **_queue_figures(records),
    }
    print("ndot-client summary\n" + format_summary(summary))
    if args.out:
        _write_report(args.out, summary, board, run, records, labels)
        print(f"  wrote {args.out}")
    if args.plot:
        print(
            f"  wrote {args.plot}" if plot_accuracy(board, args.plot) else "  no labelled sequences: no plot"
        )
    if reader.error is not None:
        print(f"ndot-client: reading the source failed: {reader.error!r}", file=sys.stderr)
        return 1
    if run.gave_up:
        print(f"ndot-client: gave up on the source: {run.gave_up}", file=sys.stderr)
        return 1
    return 1 if any(summary["packets"].get(outcome, 0) for outcome in FAILED_OUTCOMES) else 0


def _queue_figures(records: list[dict]) -> dict:
    """How far behind the source the posts ran: seconds from a packet's cut to its POST."""
    waits = sorted(r["queued_s"] for r in records)
    if not waits:
        return {"queued_p50_ms": None, "queued_max_s": None}
    return {"queued_p50_ms": round(1e3 * waits[len(waits) // 2], 3), "queued_max_s": round(waits[-1], 3)}


def _write_report(path: Path, summary: dict, board, run, records: list[dict], labels: LabelBoard) -> None:
    """``{"summary", "connections", "labels", "packets", "samples", "steps"}`` as JSON."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {
        "summary": summary,
        "connections": [asdict(c) for c in run.connections],
        "labels": [asdict(change) for change in labels.changes],
        "packets": records,
        "samples": [{**asdict(s), "correct": s.correct} for s in board.samples],
        "steps": board.step_records,
    }
    path.write_text(json.dumps(payload, indent=1))
