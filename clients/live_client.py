"""``ndot-client --camera / --dv-stream``: stream a live event source to the ndot-stream API as it arrives.

Two threads and a coroutine, one code path for a USB camera and a DV network stream:

    reader thread   open the source (back-off on failure) -> read batches -> clock map ->
                    LivePacketizer -> PacketBuffer (bounded: drop-oldest or block)
    label thread    key presses or LABEL lines -> LabelBoard (clients.live_labels)
    sender          PacketBuffer -> clients.dvs_client.post_packet, in order, one stream

The source lost (unplugged, stream closed) ends the open sequence (its last packet goes with
``end=true``); the reader reconnects after ``initial * 2^(n-1)`` s (capped) and logs every step as
``key=value`` lines on stderr. Packets are posted once: ``post_packet`` resends only what the
service certainly did not take, and nothing read before a loss is read again.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import time
from dataclasses import dataclass, field

import httpx

from clients.delivery import ClientConfig, post_packet
from clients.live_labels import LabelBoard
from clients.live_packets import LiveClock, LivePacket, LivePacketizer, Overflow, PacketBuffer
from clients.live_sources import LiveSource, LiveSourceUnavailable, SourceLost, SourceOpener
from clients.packets import Packet
from clients.scoreboard import SampleResult, Scoreboard
from clients.sources import Sequence

log = logging.getLogger("ndot.client")


@dataclass(frozen=True)
class LiveConfig:
    """How to cut, buffer and reconnect a live source."""

    packet_us: int = 10_000
    sequence_us: int | None = None  # None: one sequence per connection
    buffer_events: int = 1_000_000
    overflow: Overflow = "drop-oldest"
    reconnect_initial_s: float = 0.5
    reconnect_max_s: float = 10.0
    reconnect_attempts: int = 0  # failed opens in a row before giving up; 0 = never give up
    duration_s: float | None = None
    status_s: float = 10.0
    poll_s: float = 0.002

    def backoff_s(self, attempt: int) -> float:
        """Wait before the ``attempt``-th (1, 2, ...) retry: ``initial * 2^(attempt-1)``, capped."""
        return min(self.reconnect_initial_s * 2 ** min(attempt - 1, 30), self.reconnect_max_s)


@dataclass
class Connection:
    """One opened source: what it was and what came of it."""

    number: int
    source: str
    camera: str
    width: int
    height: int
    clock_offset_us: int | None = None
    events: int = 0
    ended: str | None = None


@dataclass
class LiveRun:
    """What the reader saw (the sender's figures are in the Scoreboard)."""

    connections: list[Connection] = field(default_factory=list)
    failed_opens: int = 0
    gave_up: str | None = None
    invalid_events: int = 0
    late_events: int = 0


class LiveReader(threading.Thread):
    """Reads the source, cuts packets, fills the buffer; reconnects with back-off until ``stop``."""

    def __init__(
        self,
        opener: SourceOpener,
        config: LiveConfig,
        packetizer: LivePacketizer,
        buffer: PacketBuffer,
        stop: threading.Event,
    ) -> None:
        super().__init__(name="ndot-live-reader", daemon=True)
        self.opener, self.config, self.stop = opener, config, stop
        self.packetizer, self.buffer = packetizer, buffer
        self.clock = LiveClock()
        self.run_info = LiveRun()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as error:  # reported by the caller; the buffer must still close
            self.error = error
            self.stop.set()
        finally:
            self.buffer.close()

    def _run(self) -> None:
        failures = 0
        while not self.stop.is_set():
            try:
                source = self.opener()
            except (SourceLost, LiveSourceUnavailable) as error:
                failures += 1
                self.run_info.failed_opens += 1
                limit = self.config.reconnect_attempts
                if limit and failures >= limit:
                    self.run_info.gave_up = str(error)
                    log.error("event=source_gave_up attempts=%d error=%r", failures, str(error))
                    self.stop.set()
                    return
                wait_s = self.config.backoff_s(failures)
                log.warning(
                    "event=reconnect_failed attempt=%d retry_in_s=%.2f error=%r", failures, wait_s, str(error)
                )
                self.stop.wait(wait_s)
                continue
            failures = 0
            self._read(source)

    def _read(self, source: LiveSource) -> None:
        info = self.run_info
        connection = Connection(
            len(info.connections) + 1, source.name, getattr(source, "camera", ""), *source.sensor_size
        )
        info.connections.append(connection)
        log.info(
            "event=source_connected connection=%d source=%s camera=%r width=%d height=%d",
            connection.number,
            source.name,
            connection.camera,
            *source.sensor_size,
        )
        reason = "client stopping"
        try:
            while not self.stop.is_set():
                events = source.read()
                if not len(events):
                    self.stop.wait(self.config.poll_s)
                    continue
                events["t"] = self.clock.map(events["t"])
                if connection.clock_offset_us is None:
                    connection.clock_offset_us = self.clock.offset_us
                connection.events += len(events)
                for packet in self.packetizer.feed(events, source.sensor_size, connection.number):
                    self.buffer.put(packet)
        except SourceLost as error:
            reason = str(error)
            log.warning(
                "event=source_lost connection=%d events=%d error=%r; reconnecting",
                connection.number,
                connection.events,
                reason,
            )
        finally:
            last = self.packetizer.end_sequence()
            if last is not None:
                log.info(
                    "event=sequence_ended sequence=%d packets=%d reason=%r",
                    last.sequence,
                    last.index + 1,
                    reason,
                )
                self.buffer.put(last)
            connection.ended = reason
            info.invalid_events += getattr(source, "invalid_events", 0)
            info.late_events += getattr(source, "late_events", 0)
            source.close()
            self.clock.lost()


async def send_live(
    client: httpx.AsyncClient,
    buffer: PacketBuffer,
    client_config: ClientConfig,
    stream_id: str,
    board: Scoreboard,
    records: list[dict],
) -> None:
    """Post every packet of ``buffer`` in order until it is closed and drained (``post_packet``: the
    replay's delivery rules, unchanged)."""
    samples: dict[int, SampleResult] = {}
    while True:
        packet = await asyncio.to_thread(buffer.get, 0.2)
        if packet is None:
            if buffer.drained:
                break
            continue
        sample = samples.get(packet.sequence)
        if sample is None:
            sample = samples[packet.sequence] = SampleResult(
                packet.sequence, f"live-{packet.sequence}", stream_id, packet.label
            )
        sample.label = packet.label  # a sequence is scored by the label it ends with
        sequence = Sequence(sample.name, packet.events, packet.sensor_size, packet.label)
        wire = Packet(packet.index, 0, packet.n_events, 0, start=packet.start, end=packet.end)
        taken_before, steps_before = sample.packets, len(board.step_records)
        queued_s = time.monotonic() - packet.cut_s
        await post_packet(client, client_config, stream_id, sequence, wire, board, sample)
        taken = sample.packets > taken_before
        records.append(_record(packet, taken, board.step_records[steps_before:], queued_s))
        if packet.end:
            board.finish_sample(samples.pop(packet.sequence))
    for sample in samples.values():  # sequences cut short by an abort
        board.finish_sample(sample)


def _record(packet: LivePacket, taken: bool, steps: list[dict], queued_s: float) -> dict:
    """One packet as the report lists it: where it belongs, what it held, what the service made of it."""
    t = packet.events["t"]
    return {
        "sequence": packet.sequence,
        "index": packet.index,
        "connection": packet.connection,
        "window": packet.window,
        "start": packet.start,
        "end": packet.end,
        "label": packet.label,
        "events": packet.n_events,
        "dropped_events": packet.dropped_events,
        "t_first": int(t[0]) if len(t) else None,
        "t_last": int(t[-1]) if len(t) else None,
        "taken": taken,
        "steps": len(steps),
        "step_labels": sorted({s["label"] for s in steps}, key=str),
        "queued_s": round(queued_s, 6),  # from its cut to its POST
    }


async def stream_live(
    opener: SourceOpener,
    client_config: ClientConfig,
    live: LiveConfig,
    labels: LabelBoard,
    stop: threading.Event,
) -> tuple[Scoreboard, LiveReader, PacketBuffer, list[dict]]:
    """Run reader and sender until ``stop`` (signal, ``q``, ``--duration``, gave up); drain; report."""
    board = Scoreboard(window=client_config.window)
    buffer = PacketBuffer(live.buffer_events, live.overflow)
    packetizer = LivePacketizer(live.packet_us, live.sequence_us, labels.label_for_packet)
    reader = LiveReader(opener, live, packetizer, buffer, stop)
    records: list[dict] = []
    stream_id = f"{client_config.stream_prefix}-0"
    loop = asyncio.get_running_loop()
    # the HTTP client first: its set-up (~0.1 s) must not hold up the first packets once the source runs
    client = httpx.AsyncClient(
        base_url=client_config.url, timeout=client_config.timeout_s, headers=client_config.headers()
    )
    sender = asyncio.create_task(send_live(client, buffer, client_config, stream_id, board, records))

    def on_signal(signum: int) -> None:
        if stop.is_set():  # second signal: stop sending what is still buffered
            log.warning("event=abort signal=%s buffered_packets=%d", signal.Signals(signum).name, len(buffer))
            buffer.close()
            sender.cancel()
        else:
            log.info("event=stop_requested signal=%s", signal.Signals(signum).name)
            stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, on_signal, signum)
    started_s, last_status_s = time.monotonic(), time.monotonic()
    reader.start()
    try:
        while not sender.done():
            await asyncio.wait({sender}, timeout=0.2)
            now = time.monotonic()
            if live.duration_s is not None and now - started_s >= live.duration_s and not stop.is_set():
                log.info("event=stop_requested reason=duration duration_s=%.1f", live.duration_s)
                stop.set()
            if live.status_s > 0 and now - last_status_s >= live.status_s:
                last_status_s = now
                _log_status(board, buffer)
        await asyncio.to_thread(reader.join, 5.0)
    finally:
        stop.set()
        buffer.close()  # normally closed and drained by now; after a failure the reader must not block
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        board.finished_s = time.perf_counter()
        await client.aclose()
    if sender.cancelled():
        raise KeyboardInterrupt
    sender.result()
    return board, reader, buffer, records


def _log_status(board: Scoreboard, buffer: PacketBuffer) -> None:
    accuracy = board.recent_step_accuracy
    log.info(
        "event=status packets_ok=%d events=%d steps=%d step_accuracy_last=%s buffered_packets=%d "
        "dropped_events=%d",
        board.outcomes.get("ok", 0),
        board.events_sent,
        len(board.step_records),
        "-" if accuracy is None else f"{accuracy:.3f}",
        len(buffer),
        buffer.dropped_events,
    )
