"""The camera client: packet cutting, bodies, sources, delivery semantics, and a real `ndot serve`.

Delivery semantics (503 + Retry-After, refused connections, 4xx) are checked against a small
stand-in FastAPI app served by real uvicorn over real HTTP, because the real service cannot be made
to answer 503 on a chosen packet; the end-to-end tests run the real service in a subprocess.
"""

from __future__ import annotations

import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from clients.dvs_client import ClientConfig, build_parser, replay
from clients.dvs_client import main as client_main
from clients.local_service import LocalService, free_port
from clients.packets import WIRE_DTYPE, Packet, PacketError, encode_body, packetize
from clients.sources import Sequence, SourceError, open_source, read_labels, synthetic_source
from ndot_core.events.layout import EVENT_DTYPE, events_from_bytes


def make_events(times_us: list[int], width: int = 34) -> np.ndarray:
    events = np.zeros(len(times_us), EVENT_DTYPE)
    events["t"] = times_us
    events["x"] = np.arange(len(times_us)) % width
    events["y"] = (np.arange(len(times_us)) * 7) % width
    events["p"] = np.arange(len(times_us)) % 2 == 0
    return events


# ---------------------------------------------------------------- packets and bodies


def test_packets_by_time_follow_windows_from_the_first_event_and_skip_empty_ones() -> None:
    t = np.array([100, 5_000, 10_099, 10_100, 19_000, 45_000, 45_001])
    packets = packetize(t, packet_us=10_000)
    assert [(p.lo, p.hi) for p in packets] == [(0, 3), (3, 5), (5, 7)]
    assert [p.release_us for p in packets] == [10_000, 20_000, 50_000]
    assert [(p.start, p.end) for p in packets] == [(True, False), (False, False), (False, True)]
    assert [p.index for p in packets] == [0, 1, 2]


def test_packets_by_count_and_single_packet_sequences() -> None:
    t = np.arange(0, 2_500, 100)  # 25 events
    packets = packetize(t, packet_events=10)
    assert [p.n_events for p in packets] == [10, 10, 5]
    assert [p.release_us for p in packets] == [900, 1_900, 2_400]
    only = packetize(np.array([7, 8]), packet_us=10_000)
    assert only == [Packet(0, 0, 2, 10_000, start=True, end=True)]
    assert packetize(np.array([], dtype=np.int64)) == []


def test_decreasing_time_and_bad_sizes_raise_naming_the_value() -> None:
    with pytest.raises(PacketError, match="event 2: t=50 is before t=90"):
        packetize(np.array([10, 90, 50]))
    with pytest.raises(PacketError, match="packet_us=0"):
        packetize(np.array([1, 2]), packet_us=0)
    with pytest.raises(PacketError, match="packet_events=0"):
        packetize(np.array([1, 2]), packet_events=0)


def test_binary_body_is_13_byte_little_endian_records() -> None:
    events = make_events([1, 2**40, 3 * 2**40])
    events["x"][1], events["y"][1] = 65535, 300
    body = encode_body(events, "binary")
    assert WIRE_DTYPE.itemsize == 13 and len(body) == 39
    first = body[:13]
    assert int.from_bytes(first[:8], "little") == 1
    assert int.from_bytes(body[13 + 8 : 13 + 10], "little") == 65535
    assert int.from_bytes(body[13 + 10 : 13 + 12], "little") == 300
    np.testing.assert_array_equal(events_from_bytes(body, sensor_size=(65536, 301)), events)


def test_json_body_has_equal_columns() -> None:
    events = make_events([5, 6, 7])
    columns = json.loads(encode_body(events, "json"))
    assert columns == {"t": [5, 6, 7], "x": [0, 1, 2], "y": [0, 7, 14], "p": [1, 0, 1]}


# ---------------------------------------------------------------- sources


def test_labels_file_parsing_and_errors(tmp_path: Path) -> None:
    labels = tmp_path / "labels.txt"
    labels.write_text("#sample #class\n1\t5\n2\t0\n\n")
    assert read_labels(labels) == [("1", 5), ("2", 0)]
    labels.write_text("#sample #class\n1\t5\n2 zero\n")
    with pytest.raises(SourceError, match=r"labels.txt:3: expected 'id<TAB>class', got '2 zero'"):
        read_labels(labels)
    labels.write_text("1\t5\n")
    (tmp_path / "train").mkdir()
    with pytest.raises(SourceError, match="no recording for sample id '1'"):
        open_source(tmp_path)
    with pytest.raises(SourceError, match="no such file"):
        open_source(tmp_path / "missing")


def test_labelled_dataset_gives_one_labelled_sequence_per_sample(nmnist_small: Path) -> None:
    source = open_source(nmnist_small)
    labels = dict(read_labels(nmnist_small / "labels.txt"))
    assert len(source) == len(labels) == 1000
    picked = source.select(limit=3, shuffle=True, seed=1)
    assert len(picked) == 3 and picked.names != source.names[:3]
    for sequence in picked:
        assert sequence.label == labels[sequence.name]
        assert sequence.sensor_size == (34, 34)
        assert len(sequence.events) > 500 and np.all(np.diff(sequence.events["t"]) >= 0)


def test_a_single_recording_file_is_one_unlabelled_sequence(shared_data: Path) -> None:
    source = open_source(shared_data / "recordings" / "nmnist-digit.bin")
    (sequence,) = list(source)
    assert sequence.label is None and sequence.sensor_size == (34, 34) and len(sequence.events) == 4325


def test_synthetic_source_is_sized_labelled_and_seeded() -> None:
    source = synthetic_source(4, num_classes=4, seed=2, duration_us=50_000)
    first, second = list(source), list(synthetic_source(4, num_classes=4, seed=2, duration_us=50_000))
    assert len(source) == 4 and sorted(s.label for s in first) == [0, 1, 2, 3]
    assert all(np.array_equal(a.events, b.events) for a, b in zip(first, second, strict=True))


# ---------------------------------------------------------------- delivery against a real HTTP server


class StandInService:
    """A real uvicorn server whose app answers 503 to every ``refuse_every``-th POST and 422 on demand."""

    def __init__(self, refuse_every: int = 0, reject_packet: int | None = None) -> None:
        self.received: list[dict] = []
        self.posts = 0
        app = FastAPI()

        @app.post("/v1/streams/{stream_id}/events")
        async def events(stream_id: str, request: Request) -> JSONResponse:
            self.posts += 1
            query = request.query_params
            if refuse_every and self.posts % refuse_every == 0:
                return JSONResponse({"detail": "bus lag 2001 > 2000"}, 503, headers={"Retry-After": "0.01"})
            if reject_packet is not None and len(self.received) == reject_packet:
                self.received.append({"rejected": True})
                return JSONResponse({"detail": "event 0: x=99 outside sensor width 34"}, 422)
            label = int(query["label"]) if "label" in query else None
            self.received.append(
                {
                    "stream_id": stream_id,
                    "body": await request.body(),
                    "label": label,
                    "start": query["start"] == "true",
                    "end": query["end"] == "true",
                    "width": query.get("width"),
                }
            )
            step = {
                "step": len(self.received),
                "predicted": 1,
                "probabilities": [0.5, 0.5],
                "label": label,
                "learned": label is not None,
                "model_version": len(self.received),
            }
            return JSONResponse({"stream_id": stream_id, "packet_id": str(self.posts), "steps": [step]})

        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture
def stand_in(request) -> Iterator[StandInService]:
    service = StandInService(**getattr(request, "param", {}))
    service.start()
    yield service
    service.stop()


def labelled_sequences(count: int) -> list[Sequence]:
    return [
        Sequence(f"s{i}", make_events(list(range(0, 35_000, 500))), (34, 34), label=i % 2)
        for i in range(count)
    ]


def fast_config(url: str, **options) -> ClientConfig:
    return ClientConfig(url=url, realtime=False, progress=False, connect_backoff_s=0.01, **options)


@pytest.mark.parametrize("stand_in", [{"refuse_every": 3}], indirect=True)
def test_503_is_retried_after_retry_after_and_no_packet_is_sent_twice(stand_in: StandInService) -> None:
    sequences = labelled_sequences(4)
    board = asyncio.run(replay(sequences, fast_config(stand_in.url, streams=2)))
    per_stream: dict[str, list[dict]] = {}
    for packet in stand_in.received:
        per_stream.setdefault(packet["stream_id"], []).append(packet)
    assert sorted(per_stream) == ["cam-0", "cam-1"]
    assert len(stand_in.received) == 4 * 4  # 35 ms in 10 ms packets: 4 per sequence, each exactly once
    assert board.retries == stand_in.posts - len(stand_in.received) > 0
    assert board.outcomes == {"ok": 16}
    for packets in per_stream.values():  # each stream: whole sequences, in order, flags at the ends
        for k in range(0, len(packets), 4):
            sequence = packets[k : k + 4]
            assert [p["start"] for p in sequence] == [True, False, False, False]
            assert [p["end"] for p in sequence] == [False, False, False, True]
            assert [p["width"] for p in sequence] == ["34", None, None, None]
            assert len({p["label"] for p in sequence}) == 1
            bodies = b"".join(p["body"] for p in sequence)
            np.testing.assert_array_equal(np.frombuffer(bodies, WIRE_DTYPE)["t"], np.arange(0, 35_000, 500))
    assert board.labelled_steps == 16 and board.step_accuracy == 0.5  # predicted 1, labels alternate
    assert len(board.samples) == 4 and sorted(s.index for s in board.samples) == [0, 1, 2, 3]


@pytest.mark.parametrize("stand_in", [{"reject_packet": 1}], indirect=True)
def test_a_4xx_is_reported_with_its_detail_and_the_rest_still_sent(stand_in: StandInService) -> None:
    board = asyncio.run(replay(labelled_sequences(1), fast_config(stand_in.url)))
    assert board.outcomes == {"ok": 3, "rejected": 1}
    assert len(board.errors) == 1
    assert "packet 1: HTTP 422: event 0: x=99 outside sensor width 34" in board.errors[0]


def test_a_refused_connection_is_retried_until_the_service_is_up() -> None:
    service = StandInService()

    async def run() -> None:
        task = asyncio.create_task(replay(labelled_sequences(1), fast_config(service.url, max_retries=200)))
        await asyncio.sleep(0.3)  # the client meets a closed port first
        await asyncio.to_thread(service.start)
        board = await task
        assert board.outcomes == {"ok": 4}

    try:
        asyncio.run(run())
    finally:
        service.stop()
    assert len(service.received) == 4


def test_a_malformed_recording_is_one_line_and_exit_code_2(tmp_path: Path, capsys) -> None:
    """Time going back in a recording: ``ndot-client`` says so in one line and exits 2 (no traceback),
    before anything is posted (nothing listens at the URL)."""
    events = np.zeros(3, dtype=EVENT_DTYPE)
    events["t"] = [30, 20, 10]
    np.save(tmp_path / "backwards.npy", events)
    assert client_main([str(tmp_path / "backwards.npy"), "--url", "http://127.0.0.1:9", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ndot-client: ") and "decreases" in err and "Traceback" not in err
    assert client_main([str(tmp_path / "missing.npy"), "--url", "http://127.0.0.1:9", "--quiet"]) == 2
    assert capsys.readouterr().err.startswith("ndot-client: ")


def test_help_explains_every_flag() -> None:
    parser = build_parser()
    text = parser.format_help()
    for action in parser._actions:
        for flag in action.option_strings:
            assert flag in text
        assert action.help, f"{action.option_strings or action.dest} has no help"


# ---------------------------------------------------------------- end to end: a real `ndot serve`


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[str]:
    """`python -m service.cli serve` on the embedded bus, a free port and a temporary checkpoint dir."""
    service = LocalService(
        checkpoint_dir=tmp_path_factory.mktemp("checkpoints"),
        env={"NDOT_WINDOW_US": "10000", "NDOT_LEARN_AT": "step"},  # the tests count per-step learning
    )
    service.start()
    yield service.url
    code = service.stop()
    assert service.stopped_cleanly, f"ndot serve exited with {code} on SIGTERM:\n{service.log_tail()}"
    service.close()


@pytest.mark.slow
def test_replaying_labelled_nmnist_returns_predictions_for_every_window(
    served: str, nmnist_small: Path, tmp_path: Path
) -> None:
    out, plot = tmp_path / "replay.json", tmp_path / "accuracy.png"
    argv = [
        str(nmnist_small),
        "--url",
        served,
        "--no-realtime",
        "--limit",
        "6",
        "--shuffle",
        "--streams",
        "2",
        "--out",
        str(out),
        "--plot",
        str(plot),
        "--quiet",
        "--stream-prefix",
        "nm",
    ]
    assert client_main(argv) == 0
    record = json.loads(out.read_text())
    summary, samples, steps = record["summary"], record["samples"], record["steps"]
    assert summary["samples"] == 6 and summary["packets"] == {"ok": sum(s["packets"] for s in samples)}
    labels = dict(read_labels(nmnist_small / "labels.txt"))
    for sample in samples:
        assert sample["label"] == labels[sample["name"]]
        mine = [s for s in steps if s["name"] == sample["name"]]
        # ~0.3 s recordings in 10 ms windows: one step per window, the last flushed by end=true
        assert 20 <= len(mine) == sample["steps"] <= 40
        assert [s["step"] for s in mine] == list(range(mine[0]["step"], mine[0]["step"] + len(mine)))
        assert all(s["label"] == sample["label"] and s["learned"] for s in mine)
        assert sample["final_prediction"] == mine[-1]["predicted"]
    for stream in ("nm-0", "nm-1"):  # NDOT_O: the weights move on every labelled (batched) step
        versions = [s["model_version"] for s in steps if s["stream_id"] == stream]
        assert versions == sorted(versions) and versions[-1] > versions[0]
    assert 0 < max(s["model_version"] for s in steps) <= summary["labelled_steps"]
    assert 0.0 <= summary["step_accuracy"] <= 1.0 and summary["latency_p99_ms"] >= summary["latency_p50_ms"]
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    streams = {s["stream_id"]: s for s in httpx.get(f"{served}/v1/streams").json()["streams"]}
    assert streams["nm-0"]["steps"] + streams["nm-1"]["steps"] == summary["steps"]


@pytest.mark.slow
def test_realtime_json_replay_and_reopening_a_stream_with_another_sensor(served: str) -> None:
    config = ClientConfig(
        url=served, realtime=True, speed=20.0, body_format="json", progress=False, stream_prefix="reopen"
    )
    small = [Sequence("small", make_events(list(range(0, 40_000, 200)), width=20), (20, 20), label=1)]
    large = [Sequence("large", make_events(list(range(0, 40_000, 200)), width=30), (30, 30), label=2)]
    first = asyncio.run(replay(small, config))
    second = asyncio.run(replay(large, config))  # same stream id, another sensor: 409 -> DELETE -> reopen
    assert first.outcomes == {"ok": 4} and second.outcomes == {"ok": 4}
    assert len(first.step_records) == len(second.step_records) == 4
    info = httpx.get(f"{served}/v1/streams/reopen-0").json()
    assert (info["width"], info["height"]) == (30, 30)


@pytest.mark.slow
def test_demo_streams_to_its_own_service_and_stops_it(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "clients.demo",
            "--samples",
            "8",
            "--block",
            "4",
            "--data",
            "synthetic",
            "--classes",
            "4",
            "--streams",
            "2",
            "--out-dir",
            str(tmp_path),
        ],
        cwd=Path(__file__).resolve().parent.parent,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines() if re.match(r"^\s+[48]\s+\d", line)]
    assert [row[0] for row in rows] == ["4", "8"]
    assert "service stopped (cleanly;" in done.stdout
    assert (tmp_path / "online_accuracy.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads((tmp_path / "replay.json").read_text())["summary"]["samples"] == 8
