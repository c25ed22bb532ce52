"""``ndot-client``: replay event recordings (or the synthetic camera), or stream a live camera, to the API.

Each of ``--streams N`` concurrent streams takes the next sequence, cuts it into packets
(``clients.packets``), and POSTs them in order to ``/v1/streams/{id}/events`` -- ``start=true`` on a
sequence's first packet, ``end=true`` on its last, its label (if any) on every packet -- either at
the pace of the event clock (``--realtime``, scaled by ``--speed``) or as fast as the service
answers. It knows only the HTTP API (docs/design.md). ``--camera`` / ``--dv-stream`` stream a live
source instead (``clients.live_cli``).

Delivery (what is resent, what is counted; ``clients.delivery``): a packet is sent again only when
the service certainly did not take it (503 / 429 after ``Retry-After``, a refused connection, a 409
on a sequence's first packet: DELETE once, reopen); a timeout after sending is counted, never resent.
Auth: ``--api-key`` (or ``NDOT_API_KEY``) is sent as ``Authorization: Bearer <key>``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import httpx
from tqdm import tqdm

from clients.delivery import FAILED_OUTCOMES, ClientConfig, post_packet
from clients.live_cli import add_live_arguments, live_requested, run_live
from clients.packets import packetize
from clients.scoreboard import SampleResult, Scoreboard, format_summary, plot_accuracy
from clients.sources import Sequence, SequenceSource, SourceError, open_source, synthetic_source
from ndot_core.events.layout import EventError


async def replay(
    sequences: Iterable[Sequence],
    config: ClientConfig,
    total: int | None = None,
    on_sample: Callable[[SampleResult, Scoreboard], None] | None = None,
) -> Scoreboard:
    """Replay ``sequences`` over ``config.streams`` concurrent streams; return what was measured."""
    board = Scoreboard(window=config.window)
    source: Iterator[Sequence] = iter(sequences)
    take_lock = asyncio.Lock()
    counter = {"next": 0}
    # disable=None: no bar when stderr is not a terminal (logs, CI)
    bar = tqdm(total=total, unit="sample", disable=None if config.progress else True, dynamic_ncols=True)

    async def next_sequence() -> tuple[int, Sequence] | None:
        async with take_lock:  # one reader at a time; files are read off the event loop
            sequence = await asyncio.to_thread(next, source, None)
            index = counter["next"]
            counter["next"] += 1
        return None if sequence is None else (index, sequence)

    async def run_stream(client: httpx.AsyncClient, stream_id: str) -> None:
        stream_clock_s = time.perf_counter()
        offset_us = 0  # camera time of this stream before the current sequence
        while (taken := await next_sequence()) is not None:
            index, sequence = taken
            sample = SampleResult(index, sequence.name, stream_id, sequence.label)
            packets = packetize(sequence.events["t"], config.packet_us, config.packet_events)
            for packet in packets:
                if config.realtime:
                    due_s = stream_clock_s + (offset_us + packet.release_us) * 1e-6 / config.speed
                    delay_s = due_s - time.perf_counter()
                    if delay_s > 0:
                        await asyncio.sleep(delay_s)
                    board.schedule_lag_s.append(max(-delay_s, 0.0))  # behind the camera by this much
                await post_packet(client, config, stream_id, sequence, packet, board, sample)
                bar.set_postfix_str(_postfix(board), refresh=False)
            if packets:
                offset_us += packets[-1].release_us
            board.finish_sample(sample)
            if on_sample is not None:
                on_sample(sample, board)
            bar.update(1)

    limits = httpx.Limits(max_connections=config.streams, max_keepalive_connections=config.streams)
    try:
        async with httpx.AsyncClient(
            base_url=config.url, timeout=config.timeout_s, limits=limits, headers=config.headers()
        ) as client:
            names = [f"{config.stream_prefix}-{i}" for i in range(config.streams)]
            await asyncio.gather(*(run_stream(client, name) for name in names))
    finally:
        board.finished_s = time.perf_counter()
        bar.close()
    return board


def _postfix(board: Scoreboard) -> str:
    def pct(value: float | None) -> str:
        return "-" if value is None else f"{100 * value:.1f}%"

    return (
        f"acc(sample) {pct(board.sample_accuracy)} last{board.window} {pct(board.recent_sample_accuracy)}"
        f" | acc(step) last{board.window} {pct(board.recent_step_accuracy)} | steps {len(board.step_records)}"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ndot-client",
        description="Replay event recordings, a labelled dataset or the synthetic camera to the ndot-stream API, "
        "or stream a live event camera / DV network stream (--camera, --dv-stream), with live online "
        "accuracy and a closing summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Examples: ndot-client ../shared/data/nmnist-small --no-realtime --limit 200 --plot acc.png; "
        "ndot-client recording.aedat4 --speed 0.5; ndot-client --synthetic 100 --streams 4; "
        "ndot-client --camera --sequence-s 2; ndot-client --dv-stream 127.0.0.1:7777",
    )
    parser.add_argument(
        "source",
        nargs="?",
        type=Path,
        help="a recording file (any format ndot_core.events.readers reads), a folder of recordings, "
        "or a labelled dataset folder (labels.txt + train/{id}.bs2)",
    )
    parser.add_argument(
        "--synthetic",
        type=int,
        metavar="N",
        help="instead of SOURCE, replay N labelled samples of the synthetic DVS camera",
    )
    parser.add_argument(
        "--synthetic-pattern",
        choices=("directions", "bars"),
        default="directions",
        help="synthetic classes: direction of a moving disk, or orientation of a moving bar",
    )
    parser.add_argument("--classes", type=int, default=10, help="number of synthetic classes")
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="base URL of the ndot API")
    parser.add_argument(
        "--api-key",
        help="API key sent as 'Authorization: Bearer KEY' (unset: $NDOT_API_KEY; an ingest key suffices)",
    )
    parser.add_argument("--streams", type=int, default=1, help="concurrent streams (cam-0 .. cam-N-1)")
    parser.add_argument("--stream-prefix", default="cam", help="stream ids are PREFIX-0, PREFIX-1, ...")
    parser.add_argument(
        "--realtime",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="pace packets by the event clock; --no-realtime sends as fast as the service answers",
    )
    parser.add_argument(
        "--speed", type=float, default=1.0, help="event-clock speed-up factor with --realtime"
    )
    cut = parser.add_mutually_exclusive_group()
    cut.add_argument("--packet-us", type=int, default=10_000, help="packet duration in microseconds")
    cut.add_argument("--packet-events", type=int, help="packets of this many events instead of by time")
    parser.add_argument(
        "--format",
        dest="body_format",
        choices=("binary", "json"),
        default="binary",
        help="request body: packed 13-byte records or JSON columns",
    )
    parser.add_argument(
        "--wait",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="wait for each packet's predictions; --no-wait sends wait=false (202 at once, "
        "no predictions, no accuracy)",
    )
    parser.add_argument("--limit", type=int, help="replay at most this many sequences")
    parser.add_argument(
        "--shuffle", action="store_true", help="shuffle the sequences (seeded) before --limit"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of --shuffle and of the synthetic camera")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for one response")
    parser.add_argument(
        "--max-retries", type=int, default=100, help="resends per packet after 503 or a refused connection"
    )
    parser.add_argument("--window", type=int, default=100, help="the 'last N' of the accuracy figures")
    parser.add_argument("--out", type=Path, help="write the summary and per-step records as JSON here")
    parser.add_argument("--plot", type=Path, help="write a PNG of online accuracy over samples here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (live: no status lines)")
    add_live_arguments(parser)
    return parser


def source_from_args(args: argparse.Namespace) -> SequenceSource:
    if (args.source is None) == (args.synthetic is None):
        raise SystemExit(
            "ndot-client: give one of SOURCE, --synthetic N, --camera [NAME] or --dv-stream HOST:PORT"
        )
    if args.synthetic is not None:
        source = synthetic_source(
            args.synthetic, num_classes=args.classes, pattern=args.synthetic_pattern, seed=args.seed
        )
    else:
        source = open_source(args.source)
    return source.select(limit=args.limit, shuffle=args.shuffle, seed=args.seed)


def config_from_args(args: argparse.Namespace) -> ClientConfig:
    """Where to and how to post, from the command line."""
    return ClientConfig(
        url=args.url,
        streams=args.streams,
        stream_prefix=args.stream_prefix,
        realtime=args.realtime,
        speed=args.speed,
        packet_us=None if args.packet_events else args.packet_us,
        packet_events=args.packet_events,
        body_format=args.body_format,
        wait=args.wait,
        timeout_s=args.timeout,
        max_retries=args.max_retries,
        window=args.window,
        progress=not args.quiet,
        api_key=args.api_key or os.environ.get("NDOT_API_KEY") or None,
    )


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if live_requested(args):
        return run_live(parser, args, config_from_args(args))
    try:  # (a recording is read when its turn comes: a bad one stops the replay there)
        source = source_from_args(args)
        config = config_from_args(args)
        board = asyncio.run(replay(source, config, total=len(source)))
    except KeyboardInterrupt:
        print("ndot-client: interrupted", file=sys.stderr)
        return 130
    except (EventError, SourceError, OSError) as err:  # an unreadable or malformed recording, one line
        print(f"ndot-client: {err}", file=sys.stderr)
        return 2
    summary = board.summary()
    print("ndot-client summary\n" + format_summary(summary))
    if args.out:
        board.write_json(args.out)
        print(f"  wrote {args.out}")
    if args.plot:
        print(f"  wrote {args.plot}" if plot_accuracy(board, args.plot) else "  no labelled samples: no plot")
    failed = sum(summary["packets"].get(outcome, 0) for outcome in FAILED_OUTCOMES)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
