"""``ndot-client``: replay event recordings (or the synthetic camera) to the ndot-stream HTTP API.

Each of ``--streams N`` concurrent streams takes the next sequence, cuts it into packets
(``clients.packets``), and POSTs them in order to ``/v1/streams/{id}/events`` -- ``start=true`` on a
sequence's first packet, ``end=true`` on its last, its label (if any) on every packet -- either at
the pace of the event clock (``--realtime``, scaled by ``--speed``) or as fast as the service
answers. It knows only the HTTP API (docs/design.md).

Delivery: a packet is sent again only when the service certainly did not take it -- a 503
(backpressure / bus down; after ``Retry-After``), a connection that failed before anything was
sent, or a 409 on a sequence's first packet (the stream id is open with another sensor size: the
client DELETEs it once and reopens it). A timeout or broken connection after sending is counted, never resent (no duplicate steps).

Auth: ``--api-key`` (or ``NDOT_API_KEY``) is sent as ``Authorization: Bearer <key>``; an ingest key
suffices, except for that DELETE, which needs an admin key (without one the 409 is reported).
A 429 (the key's rate limit) is waited out like a 503, after ``Retry-After``.
"""

from __future__ import annotations

import argparse
import asyncio
import email.utils
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from tqdm import tqdm

from clients.packets import CONTENT_TYPES, BodyFormat, Packet, encode_body, packetize
from clients.scoreboard import SampleResult, Scoreboard, format_summary, plot_accuracy
from clients.sources import Sequence, SequenceSource, open_source, synthetic_source

#: Errors raised before any byte of the request left: resending cannot duplicate a packet.
NOT_SENT_ERRORS = (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout)
MAX_RETRY_AFTER_S = 30.0
MAX_ERRORS_SHOWN = 20
FAILED_OUTCOMES = ("rejected", "failed", "lost", "unreachable")


@dataclass(frozen=True)
class ClientConfig:
    """How to replay: where to, how many streams, pacing, packet cutting, retries."""

    url: str = "http://127.0.0.1:8000"
    streams: int = 1
    stream_prefix: str = "cam"
    realtime: bool = True
    speed: float = 1.0
    packet_us: int | None = 10_000
    packet_events: int | None = None
    body_format: BodyFormat = "binary"
    wait: bool = True
    timeout_s: float = 30.0
    max_retries: int = 100
    connect_backoff_s: float = 0.1
    window: int = 100
    progress: bool = True
    api_key: str | None = None

    def headers(self) -> dict[str, str]:
        """Headers every request carries: the API key, when there is one."""
        return {"authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def __post_init__(self) -> None:
        if self.streams < 1:
            raise ValueError(f"streams={self.streams} must be >= 1")
        if self.speed <= 0:
            raise ValueError(f"speed={self.speed} must be > 0")


def retry_after_s(response: httpx.Response, default_s: float = 1.0) -> float:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP date), capped."""
    value = response.headers.get("retry-after")
    if value is None:
        return default_s
    try:
        seconds = float(value)
    except ValueError:
        try:
            seconds = email.utils.parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError):
            seconds = default_s
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_S)


async def post_packet(
    client: httpx.AsyncClient,
    config: ClientConfig,
    stream_id: str,
    sequence: Sequence,
    packet: Packet,
    board: Scoreboard,
    sample: SampleResult,
) -> None:
    """POST one packet, retrying only when it certainly was not taken; record the outcome."""
    params: dict[str, str | int] = {
        "start": str(packet.start).lower(),
        "end": str(packet.end).lower(),
        "wait": str(config.wait).lower(),
    }
    if sequence.label is not None:
        params["label"] = sequence.label
    if packet.start:
        params["width"], params["height"] = sequence.sensor_size
    body = encode_body(sequence.events[packet.lo : packet.hi], config.body_format)
    headers = {"content-type": CONTENT_TYPES[config.body_format]}
    where = f"stream {stream_id} sample {sequence.name!r} packet {packet.index}"
    attempts = 0
    reopened = False
    while True:
        attempts += 1
        sent_at = time.perf_counter()
        try:
            response = await client.post(
                f"/v1/streams/{stream_id}/events", content=body, params=params, headers=headers
            )
        except NOT_SENT_ERRORS as error:
            if attempts > config.max_retries:
                return _failed(board, "unreachable", f"{where}: {type(error).__name__}: {error}")
            await asyncio.sleep(min(config.connect_backoff_s * 2 ** min(attempts, 6), 5.0))
            continue
        except httpx.HTTPError as error:  # sent: the service may have applied it, so never resend
            return _failed(board, "lost", f"{where}: {type(error).__name__} after sending: {error}")
        if response.status_code in (429, 503) and attempts <= config.max_retries:  # not taken: send again
            board.retries += 1
            await asyncio.sleep(retry_after_s(response))
            continue
        if response.status_code == 409 and packet.start and not reopened:
            # The stream id is open with another sensor size (an earlier run, or a folder of mixed
            # sensors): the packet was refused before the bus, so close the stream and send it again.
            reopened = True
            deleted = await client.delete(f"/v1/streams/{stream_id}")
            if deleted.status_code in (401, 403):
                return _failed(
                    board,
                    "rejected",
                    f"{where}: HTTP 409: {_detail(response)}; closing the stream "
                    f"needs an admin key (HTTP {deleted.status_code})",
                )
            continue
        break
    latency_s = time.perf_counter() - sent_at
    status = response.status_code
    if status in (200, 202):
        board.outcomes["ok"] += 1
        board.events_sent += packet.n_events
        board.latencies_s.append(latency_s)
        sample.events += packet.n_events
        sample.packets += 1
        if status == 200:
            board.record_steps(sample, response.json().get("steps", []), latency_s)
        return None
    if status == 504:  # the reply timed out; the packet is still applied by the worker
        board.outcomes["timed_out"] += 1
        board.events_sent += packet.n_events
        sample.events += packet.n_events
        sample.packets += 1
        return None
    detail = _detail(response)
    return _failed(board, "rejected" if status < 500 else "failed", f"{where}: HTTP {status}: {detail}")


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail", response.text))
    except ValueError:
        return response.text[:300]


def _failed(board: Scoreboard, outcome: str, message: str) -> None:
    board.outcomes[outcome] += 1
    board.errors.append(message)
    if len(board.errors) <= MAX_ERRORS_SHOWN:
        tqdm.write(f"ndot-client: {message}", file=sys.stderr)
    elif len(board.errors) == MAX_ERRORS_SHOWN + 1:
        tqdm.write("ndot-client: further errors are only counted (see the summary)", file=sys.stderr)


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
        "with live online accuracy and a closing summary.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Examples: ndot-client ../shared/data/nmnist-small --no-realtime --limit 200 --plot acc.png; "
        "ndot-client recording.aedat4 --speed 0.5; ndot-client --synthetic 100 --streams 4",
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
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def source_from_args(args: argparse.Namespace) -> SequenceSource:
    if (args.source is None) == (args.synthetic is None):
        raise SystemExit("ndot-client: give either SOURCE or --synthetic N")
    if args.synthetic is not None:
        source = synthetic_source(
            args.synthetic, num_classes=args.classes, pattern=args.synthetic_pattern, seed=args.seed
        )
    else:
        source = open_source(args.source)
    return source.select(limit=args.limit, shuffle=args.shuffle, seed=args.seed)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    source = source_from_args(args)
    config = ClientConfig(
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
    try:
        board = asyncio.run(replay(source, config, total=len(source)))
    except KeyboardInterrupt:
        print("ndot-client: interrupted", file=sys.stderr)
        return 130
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
