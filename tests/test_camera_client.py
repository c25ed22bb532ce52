"""The live client (`ndot-client --camera / --dv-stream`): cutting, clock, buffer, labels, and a real DV stream.

The pieces are checked on a real DVXplorer recording (no camera needed). End to end, a real
``dv_processing.io.NetworkWriter`` (``python -m clients.dv_playback``, its own process) plays that
recording in real time on loopback, ``ndot-client --dv-stream`` runs as a subprocess against a real
``ndot serve``, the writer stops mid-recording and a second one plays the rest on the same port: the
service must have received exactly the recording's events, window by window, in the sequences and
with the labels the client sent. Those tests skip only when dv-processing cannot be imported.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import REPO_ROOT

from clients.live_labels import LabelBoard, LabelError, LineLabels, parse_label_line
from clients.live_packets import LiveClock, LivePacket, LivePacketizer, PacketBuffer
from clients.live_sources import parse_host_port
from clients.local_service import LocalService, free_port
from clients.packets import packetize
from ndot_core.events.layout import EVENT_DTYPE
from ndot_core.events.readers import read_events

RECORDING = "recordings/dvxplorer-1.46s.aedat4"  # 323,963 events, 320x240, absolute timestamps
PACKET_US = 10_000


def dv_available() -> bool:
    try:
        import dv_processing  # noqa: F401
    except ImportError:
        return False
    return True


needs_dv = pytest.mark.skipif(
    not dv_available(), reason="dv-processing cannot be imported (pip install dv-processing)"
)


@pytest.fixture(scope="module")
def recording(shared_data: Path) -> tuple[np.ndarray, tuple[int, int]]:
    events, sensor_size = read_events(shared_data / RECORDING)
    return events, (int(sensor_size[0]), int(sensor_size[1]))


def random_batches(events: np.ndarray, seed: int = 0) -> list[np.ndarray]:
    """The events in batches of random sizes (1 to 5000), as a source hands them over."""
    rng = np.random.default_rng(seed)
    cuts = np.cumsum(rng.integers(1, 5000, size=len(events) // 1000 + 2))
    return [part for part in np.split(events, cuts[cuts < len(events)]) if len(part)]


def cut_live(events: np.ndarray, sequence_us: int | None, labels=lambda: None) -> list[LivePacket]:
    clock, packetizer = LiveClock(), LivePacketizer(PACKET_US, sequence_us, labels)
    packets = []
    for batch in random_batches(events):
        batch = batch.copy()
        batch["t"] = clock.map(batch["t"])
        packets += packetizer.feed(batch, (320, 240), connection=1)
    last = packetizer.end_sequence()
    return packets + ([last] if last else [])


# ---------------------------------------------------------------- cutting, clock, buffer (no dv needed)


def test_a_live_stream_is_cut_into_the_same_windows_as_the_replay(recording) -> None:
    events, _ = recording
    packets = cut_live(events, sequence_us=None)
    replayed = packetize(events["t"], packet_us=PACKET_US)
    assert [p.n_events for p in packets] == [r.n_events for r in replayed]
    assert [p.window for p in packets] == [(r.release_us // PACKET_US) - 1 for r in replayed]
    assert [(p.start, p.end) for p in packets] == [(r.start, r.end) for r in replayed]
    assert packets[0].events["t"][0] == 0  # the stream's clock starts at its first event
    joined = np.concatenate([p.events for p in packets])
    np.testing.assert_array_equal(joined["t"], events["t"] - events["t"][0])
    np.testing.assert_array_equal(joined[["x", "y", "p"]], events[["x", "y", "p"]])


def test_fixed_length_sequences_open_and_close_with_flags(recording) -> None:
    events, _ = recording
    packets = cut_live(events, sequence_us=300_000, labels=iter(range(10_000)).__next__)
    sequences: dict[int, list[LivePacket]] = {}
    for packet in packets:
        sequences.setdefault(packet.sequence, []).append(packet)
    assert sorted(sequences) == [0, 1, 2, 3, 4]  # 1.46 s in 0.3 s sequences
    for j, members in sequences.items():
        assert [p.index for p in members] == list(range(len(members)))
        assert [p.start for p in members] == [True] + [False] * (len(members) - 1)
        assert [p.end for p in members] == [False] * (len(members) - 1) + [True]
        assert {p.window // 30 for p in members} == {j}  # 30 windows of 10 ms each
    assert [p.label for p in packets] == list(range(len(packets)))  # the label current at each cut
    assert sum(p.n_events for p in packets) == len(events)


def test_the_stream_clock_keeps_increasing_across_reconnects() -> None:
    clock = LiveClock()
    first = clock.map(np.array([5_000_000, 5_000_010, 5_020_000]), now_s=100.0)
    assert first.tolist() == [0, 10, 20_000]
    clock.lost(now_s=100.5)
    second = clock.map(np.array([7, 9]), now_s=100.75)  # a restarted camera clock
    assert second.tolist() == [20_000 + 250_000, 20_000 + 250_002]
    clock.lost(now_s=101.0)
    assert clock.map(np.array([3]), now_s=101.0).tolist() == [270_003]  # never equal to the last


def shaped(n_events: int, sequence: int, index: int, start: bool = False, end: bool = False) -> LivePacket:
    events = np.zeros(n_events, EVENT_DTYPE)
    return LivePacket(events, (34, 34), sequence, index, index, start, end, None, 1, time.monotonic())


def test_drop_oldest_bounds_the_events_and_keeps_the_sequence_flags() -> None:
    buffer = PacketBuffer(max_events=1_000, overflow="drop-oldest")
    for index in range(10):  # one sequence of 10 packets of 300 events: start on 0, end on 9
        buffer.put(shaped(300, 0, index, start=index == 0, end=index == 9))
        assert buffer.events <= 1_000
    assert buffer.dropped_packets == 7 and buffer.dropped_events == 2_100
    left = [buffer.get(0) for _ in range(len(buffer))]
    assert [(p.index, p.n_events, p.start) for p in left] == [
        (0, 0, True),
        (7, 300, False),
        (8, 300, False),
        (9, 300, False),
    ]
    assert left[0].dropped_events == 300 and left[-1].end
    big = shaped(5_000, 1, 0, start=True)
    buffer.put(big)  # larger than the bound: goes alone
    assert buffer.get(0) is big and buffer.most_events == 5_000


def test_block_waits_for_room_and_loses_nothing() -> None:
    buffer = PacketBuffer(max_events=1_000, overflow="block")
    sent = [shaped(400, 0, i) for i in range(20)]

    def produce() -> None:
        for packet in sent:
            buffer.put(packet)
        buffer.close()

    producer = threading.Thread(target=produce)
    producer.start()
    received = []
    while (packet := buffer.get(5)) is not None:
        assert buffer.events <= 1_000
        received.append(packet)
        time.sleep(0.002)  # a slow service
    producer.join(5)
    assert received == sent and buffer.dropped_events == 0 and buffer.blocked_s > 0


def test_label_lines_and_a_label_file_followed_as_it_grows(tmp_path: Path) -> None:
    assert parse_label_line("LABEL 3\n") == (True, 3)
    assert parse_label_line("label none") == (True, None)
    assert parse_label_line("  # comment") == (False, None)
    with pytest.raises(LabelError, match="got 'LABEL three'"):
        parse_label_line("LABEL three")
    path, board, stop = tmp_path / "labels.txt", LabelBoard(), threading.Event()
    reader = LineLabels(board, stop, path=path)
    reader.start()
    try:
        path.write_text("LABEL 4\n")
        wait_for(lambda: board.current == 4)
        with open(path, "a") as labels:
            labels.write("nonsense\nLABEL none\n")
        wait_for(lambda: len(board.changes) == 2)
        assert board.current is None and [c.label for c in board.changes] == [4, None]
    finally:
        stop.set()
        reader.join(5)


def test_host_port_is_checked() -> None:
    assert parse_host_port("127.0.0.1:7777") == ("127.0.0.1", 7777)
    assert parse_host_port("[::1]:7") == ("::1", 7)
    for bad in ("7777", "host:", "host:70000", "a b:1"):
        with pytest.raises(ValueError, match="expected HOST:PORT"):
            parse_host_port(bad)


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


# ---------------------------------------------------------------- the command line


def client_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "clients", *args]


def run_client(code_before: str, argv: list[str]) -> subprocess.CompletedProcess:
    script = f"import sys\n{code_before}\nfrom clients.dvs_client import main\nsys.exit(main({argv!r}))"
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("flags", [["--dv-stream", "127.0.0.1:7777"], ["--camera"], ["--list-cameras"]])
def test_without_dv_processing_the_live_flags_say_how_to_install_it(flags: list[str]) -> None:
    done = run_client("sys.modules['dv_processing'] = None  # what an absent package raises", flags)
    assert done.returncode == 2, done.stderr
    assert "pip install 'ndot-stream[camera]'" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--dv-stream", "nohost"], "expected HOST:PORT"),
        (["--dv-stream", "h:1", "--streams", "2"], "--streams is for replays"),
        (["--camera", "--synthetic", "3"], "give one of SOURCE"),
        (["--dv-stream", "h:1", "--sequence-s", "0.001"], "shorter than one packet"),
        pytest.param(
            ["--dv-stream", "h:1", "--labels", "keys"], "needs stdin to be a terminal", marks=needs_dv
        ),
    ],
)
def test_bad_live_flags_exit_2_with_a_message(flags: list[str], message: str) -> None:
    done = subprocess.run(
        client_command(*flags),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 2 and message in done.stderr, done.stderr


def test_the_client_loads_neither_torch_nor_dv_processing_until_a_live_source_is_used() -> None:
    code = "import sys, clients.dvs_client, clients.live_client; print(sorted(sys.modules))"
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert "'torch'" not in done.stdout and "'dv_processing'" not in done.stdout


@needs_dv
def test_a_camera_that_is_not_there_is_retried_then_given_up() -> None:
    """The USB path up to the device: discover() finds no camera (or not this one), with back-off."""
    done = subprocess.run(
        client_command(
            "--camera", "NOSUCHCAM_0", "--reconnect-attempts", "3", "--reconnect-initial-s", "0.05"
        ),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert done.returncode == 1, done.stderr
    failures = re.findall(
        r"event=reconnect_failed attempt=(\d) .*camera: no camera 'NOSUCHCAM_0'", done.stderr
    )
    assert failures == ["1", "2"]
    assert "event=source_gave_up attempts=3" in done.stderr and "gave up on the source" in done.stderr


@needs_dv
def test_list_cameras_says_when_none_is_connected() -> None:
    done = subprocess.run(
        client_command("--list-cameras"), cwd=REPO_ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert (
        done.stdout.strip() == "no event camera connected (dv-processing found none over USB)"
        or "\tmodel=" in done.stdout
    )


@needs_dv
def test_key_presses_on_a_real_terminal_label_the_stream_and_q_stops(tmp_path: Path) -> None:
    """stdin is a pseudo-terminal: single keys, no Enter; the source is absent, so the client keeps retrying."""
    import pty

    master, slave = pty.openpty()
    client = subprocess.Popen(
        client_command(
            "--dv-stream",
            f"127.0.0.1:{free_port()}",
            "--reconnect-max-s",
            "0.5",
            "--out",
            str(tmp_path / "r.json"),
        ),
        cwd=REPO_ROOT,
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    os.close(slave)
    try:
        logs = LogLines(client.stderr)
        logs.wait_for("event=reconnect_failed attempt=1")
        os.write(master, b"7")
        logs.wait_for("event=label label=7 from=keys")
        os.write(master, b"n")
        logs.wait_for("event=label label=none from=keys")
        os.write(master, b"q")
        assert client.wait(30) == 0, logs.text()
    finally:
        with contextlib.suppress(ProcessLookupError):
            client.kill()
        os.close(master)
    report = json.loads((tmp_path / "r.json").read_text())
    assert [c["label"] for c in report["labels"]] == [7, None] and report["summary"]["connections"] == 0


# ---------------------------------------------------------------- end to end: DV stream -> client -> ndot serve


class LogLines:
    """Lines of a subprocess pipe, collected by a thread; ``wait_for`` a regular expression."""

    def __init__(self, pipe) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe) -> None:
        for line in pipe:
            self.lines.append(line.rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_for(self, pattern: str, after: int = 0, timeout_s: float = 30.0) -> int:
        """Index of the first line from ``after`` on matching ``pattern``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for index in range(after, len(self.lines)):
                if re.search(pattern, self.lines[index]):
                    return index
            time.sleep(0.02)
        raise AssertionError(f"no line matching {pattern!r} in:\n{self.text()[-4000:]}")


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[str]:
    """`ndot serve` on the embedded bus, 10 ms windows (= the client's packets)."""
    service = LocalService(
        checkpoint_dir=tmp_path_factory.mktemp("ckpt"), env={"NDOT_WINDOW_US": str(PACKET_US)}
    )
    service.start()
    yield service.url
    service.close()


def playback(shared_data: Path, port: int, *flags: str) -> tuple[subprocess.Popen, LogLines]:
    writer = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clients.dv_playback",
            str(shared_data / RECORDING),
            "--port",
            str(port),
            *flags,
        ],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lines = LogLines(writer.stdout)
    lines.wait_for("event=serving")
    return writer, lines


def service_counter(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    match = re.search(rf"^{name} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


@needs_dv
@pytest.mark.slow
def test_a_dv_stream_reaches_the_service_window_by_window_across_a_writer_that_stops(
    served: str, shared_data: Path, recording, tmp_path: Path
) -> None:
    events, sensor_size = recording
    split_us = 700_000  # writer 1 plays [0, 0.7 s) and stops; writer 2 plays the rest
    events_before = service_counter(served, "ndot_events_total")
    late_before = service_counter(served, "ndot_late_events_total")
    port, report_path = free_port(), tmp_path / "live.json"
    client = subprocess.Popen(
        client_command(
            "--dv-stream",
            f"127.0.0.1:{port}",
            "--url",
            served,
            "--stream-prefix",
            "dvs",
            "--packet-us",
            str(PACKET_US),
            "--sequence-s",
            "0.5",
            "--labels",
            "stdin",
            "--overflow",
            "block",
            "--reconnect-initial-s",
            "0.1",
            "--reconnect-max-s",
            "0.3",
            "--out",
            str(report_path),
            "--quiet",
        ),
        cwd=REPO_ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    writers: list[subprocess.Popen] = []
    try:
        logs = LogLines(client.stderr)
        logs.wait_for("event=reconnect_failed attempt=1 ")  # no writer yet: the client keeps trying
        client.stdin.write("LABEL 3\n")
        client.stdin.flush()
        logs.wait_for("event=label label=3 from=stdin")
        writer, _ = playback(shared_data, port, "--to-s", str(split_us / 1e6))
        writers.append(writer)
        assert writer.wait(30) == 0
        lost = logs.wait_for(r"event=source_lost connection=1 ")
        ended = logs.wait_for(r"event=sequence_ended sequence=1 .*stream closed", after=lost)
        logs.wait_for(r"event=reconnect_failed attempt=1 .*error=", after=ended)  # refused / reset
        client.stdin.write("LABEL 5\n")
        client.stdin.flush()
        logs.wait_for("event=label label=5 from=stdin", after=ended)
        writer, _ = playback(shared_data, port, "--from-s", str(split_us / 1e6))
        writers.append(writer)
        assert writer.wait(30) == 0
        logs.wait_for(r"event=source_connected connection=2 ", after=ended)
        logs.wait_for(r"event=source_lost connection=2 ")
        client.send_signal(signal.SIGINT)
        assert client.wait(60) == 0, logs.text()[-4000:]
    finally:
        for process in (client, *writers):
            if process.poll() is None:
                process.kill()
    report = json.loads(report_path.read_text())
    packets, connections = report["packets"], report["connections"]

    # every packet was taken once; the two connections carried exactly the recording's halves
    t_rel = events["t"] - events["t"][0]
    halves = [events[t_rel < split_us], events[t_rel >= split_us]]
    assert [c["events"] for c in connections] == [len(h) for h in halves]
    assert all(p["taken"] for p in packets) and report["summary"]["dropped_events"] == 0
    assert sum(p["events"] for p in packets) == len(events)

    # window by window and sequence by sequence: the recording on the stream clock (t + the connection's
    # offset), cut at every 10 ms window and every 0.5 s from the connection's first window, == what was posted
    offsets = [c["clock_offset_us"] for c in connections]
    assert offsets[0] == -int(events["t"][0])  # the stream starts at 0 at its first event
    assert int(halves[1]["t"][0]) + offsets[1] > int(halves[0]["t"][-1]) + offsets[0]  # and keeps increasing
    sequence = -1
    for number, (half, offset) in enumerate(zip(halves, offsets, strict=True), start=1):
        stream_t = half["t"] + offset
        anchor = int(stream_t[0]) // PACKET_US * PACKET_US
        keys, counts = np.unique(
            np.stack([(stream_t - anchor) // 500_000, stream_t // PACKET_US], axis=1),
            axis=0,
            return_counts=True,
        )
        expected = []
        for (position, window), count in zip(keys.tolist(), counts.tolist(), strict=True):
            first = not expected or expected[-1][0] != position
            sequence += first
            expected.append((position, window, count, first, sequence))
        ends = [i == len(expected) - 1 or expected[i + 1][3] for i in range(len(expected))]
        mine = [p for p in packets if p["connection"] == number]
        assert [(p["window"], p["events"], p["start"], p["end"], p["sequence"]) for p in mine] == [
            (window, count, first, end, seq)
            for (_, window, count, first, seq), end in zip(expected, ends, strict=True)
        ]
    assert sequence == 3  # [0, .5) [.5, .7) | [0, .5) [.5, .76)
    for number in range(4):
        members = [p for p in packets if p["sequence"] == number]
        assert [p["index"] for p in members] == list(range(len(members)))

    # labels: as sent, per packet, and on every step the service answered
    assert {p["label"] for p in packets if p["connection"] == 1} == {3}
    assert {p["label"] for p in packets if p["connection"] == 2} == {5}
    assert all(set(p["step_labels"]) <= {p["label"]} for p in packets)

    # the service's own counts: events framed, sequences begun, steps (one per window spanned)
    expected_steps = 0
    for sequence in range(4):
        windows = [p["window"] for p in packets if p["sequence"] == sequence]
        expected_steps += max(windows) - min(windows) + 1
    info = httpx.get(f"{served}/v1/streams/dvs-0", timeout=10).json()
    assert info["sequences"] == 4 and (info["width"], info["height"]) == sensor_size
    assert info["steps"] == expected_steps == sum(p["steps"] for p in packets) == report["summary"]["steps"]
    assert info["labelled_steps"] == info["steps"]
    assert service_counter(served, "ndot_events_total") - events_before == len(events)
    assert service_counter(served, "ndot_late_events_total") - late_before == 0
