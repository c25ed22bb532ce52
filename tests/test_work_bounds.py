"""The work one packet can cause is bounded: in the worker (entries may bypass the API) and at the API."""

from __future__ import annotations

from pathlib import Path

from test_worker import post, reply, run, wire

from service.bus import LocalBus, messages
from service.worker import Worker


async def settle(worker: Worker) -> None:
    """Run rounds until no packet taken off the bus waits for ticks."""
    while worker.applier.has_work:
        await worker.run_once(block_ms=0)


def test_a_packet_that_would_close_too_many_windows_is_refused_and_the_others_applied(tmp_path: Path) -> None:
    """30 events 1 s apart at 10 ms windows would make ~3,000 learner steps; the worker refuses the
    packet (422, dead-lettered, stream unchanged) and applies the other stream's packet of the batch."""

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        hostile = await post(bus, "hostile", wire([k * 1_000_000 for k in range(30)]))
        honest = await post(bus, "honest", wire(list(range(0, 25_000, 250))))
        await worker.run_once(block_ms=0)
        refused = await reply(bus, hostile)
        assert not refused["ok"] and refused["status"] == 422
        assert "would close" in refused["detail"] and "at most 36 per packet" in refused["detail"]
        assert len((await reply(bus, honest))["steps"]) == 2
        assert worker.batcher.registry.get("hostile").steps == 0
        assert worker.batcher.learner.version == 0  # unlabelled: nothing learned, nothing stepped for it
        assert [e.fields["original_id"].decode() for e in await bus.dead_letters()] == [hostile]

    run(tmp_path, scenario, max_packet_windows=20, max_gap_windows=15)


def test_packets_that_pile_events_into_one_open_window_are_refused_past_the_bound(tmp_path: Path) -> None:
    """Packets whose events all fall in the open window close nothing: their events wait for its end.
    The window may hold ``max_window_events``; the packet that would pass it is refused (422, the stream
    unchanged), and the stream goes on: the next window closes this one with every event it held."""

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        taken = [await post(bus, "cam", wire([5_000] * 40, seed=k)) for k in range(2)]  # 80 events held
        over = await post(bus, "cam", wire([6_000] * 41, seed=2))  # 121 > 100
        fits = await post(bus, "cam", wire([7_000] * 20, seed=3))  # 100: the bound itself
        await worker.run_once(block_ms=0)
        await settle(worker)
        assert [(await reply(bus, entry))["ok"] for entry in taken] == [True, True]
        refused = await reply(bus, over)
        assert not refused["ok"] and refused["status"] == 422
        assert "would hold 121 events, at most 100" in refused["detail"]
        assert (await reply(bus, fits))["ok"]
        framer = worker.batcher.registry.get("cam").framer
        assert framer.pending_events == 100 and framer.frames_emitted == 0
        closing = await post(bus, "cam", wire([15_000], seed=4))  # the next window: the held one closes
        await worker.run_once(block_ms=0)
        await settle(worker)
        assert len((await reply(bus, closing))["steps"]) == 1
        assert framer.frames_emitted == 1 and framer.pending_events == 1
        assert [e.fields["original_id"].decode() for e in await bus.dead_letters()] == [over]

    run(tmp_path, scenario, max_window_events=100)


def test_a_long_silence_inside_the_limit_still_becomes_empty_frames(tmp_path: Path) -> None:
    """The bound is on work, not on gaps: a 150 ms silence is 15 real time-steps (membranes decay)."""

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        first = await post(bus, "cam", wire([0, 5_000]))
        second = await post(bus, "cam", wire([160_000, 165_000]))
        await worker.run_once(block_ms=0)
        await settle(worker)
        assert (await reply(bus, first))["steps"] == []
        assert len((await reply(bus, second))["steps"]) == 16  # the open window + 15 empty ones

    run(tmp_path, scenario, max_packet_windows=20, max_gap_windows=15)


def test_the_api_refuses_a_packet_spanning_too_many_windows_before_publishing(tmp_path: Path) -> None:
    from service_support import ServerThread, http

    from service.app import create_app
    from service.settings import Settings

    settings = Settings(redis_url=None, auth="off", checkpoint_dir=tmp_path / "ckpt", max_packet_windows=20)
    with ServerThread(create_app(settings, run_worker=True)) as server, http(server.url) as client:
        query = "width=34&height=34&start=true"
        spread = {"t": [0, 10 * 20_000 + 5, 25 * 20_000], "x": [1, 2, 3], "y": [1, 2, 3], "p": [1, 0, 1]}
        refused = client.post(f"/v1/streams/cam/events?{query}", json=spread)
        assert refused.status_code == 422 and "spans 25 windows" in refused.json()["detail"]
        assert client.get("/v1/streams/cam").status_code == 404  # nothing was published, no ghost
        spread["t"] = [0, 10 * 20_000 + 5, 20 * 20_000]  # exactly at the limit: taken
        taken = client.post(f"/v1/streams/cam/events?{query}", json=spread)
        assert taken.status_code == 200 and len(taken.json()["steps"]) == 20


def test_a_stream_with_a_long_queue_takes_its_share_of_ticks_and_the_others_are_answered_meanwhile(
    tmp_path: Path,
) -> None:
    """4 packets of 40 frames on one stream, 2 frames on another: the light stream is answered after the
    first round of 8 ticks, the heavy one's busy flag goes up (the API then answers 429), and in the end
    every step of every packet ran exactly once and the flag is cleared."""

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        heavy = [
            await post(bus, "heavy", wire(list(range(k * 400_000, (k + 1) * 400_000, 2_000)), seed=k))
            for k in range(4)
        ]
        light = await post(bus, "light", wire(list(range(0, 25_000, 250))))
        await worker.run_once(block_ms=0)
        assert len((await reply(bus, light))["steps"]) == 2
        assert await bus.wait_reply(heavy[-1], 0) is None and worker.applier.has_work
        busy = await bus.get_value(messages.busy_key(worker.prefix, "heavy"))
        assert busy is not None and float(busy) > 0
        assert await bus.get_value(messages.busy_key(worker.prefix, "light")) is None
        await settle(worker)
        steps = [len((await reply(bus, entry_id))["steps"]) for entry_id in heavy]
        assert steps == [39, 40, 40, 40]  # each packet closes its windows (the first opens its own)
        assert worker.batcher.registry.get("heavy").steps == sum(steps)
        assert await bus.get_value(messages.busy_key(worker.prefix, "heavy")) is None
        assert await bus.pending_count() == 0

    run(tmp_path, scenario, max_packet_windows=40, max_stream_backlog_frames=50)


def test_the_api_answers_429_for_a_busy_stream_and_nothing_it_refused_is_applied(tmp_path: Path) -> None:
    import time

    import numpy as np
    from service_support import BINARY, ServerThread, http

    from ndot_core.events.framing import StreamFramer
    from ndot_core.events.layout import WIRE_DTYPE
    from service.app import create_app
    from service.settings import Settings

    settings = Settings(
        redis_url=None,
        auth="off",
        checkpoint_dir=tmp_path / "ckpt",
        window_us=10_000,
        max_packet_windows=40,
        max_stream_backlog_frames=50,
        max_ticks_per_round=1,
    )
    framer = StreamFramer((34, 34), window_us=10_000, output_size=(34, 34))
    accepted_frames, statuses = 0, []
    with ServerThread(create_app(settings, run_worker=True)) as server, http(server.url) as client:
        for k in range(60):
            body = wire(list(range(k * 400_000, (k + 1) * 400_000, 2_000)), seed=k)
            url = "/v1/streams/heavy/events?wait=false&width=34&height=34"
            answer = client.post(url, content=body, headers=BINARY)
            statuses.append(answer.status_code)
            if answer.status_code == 202:
                accepted_frames += len(framer.push(np.frombuffer(body, dtype=WIRE_DTYPE)))
            else:
                assert answer.status_code == 429 and int(answer.headers["retry-after"]) >= 1
                assert "not taken" in answer.json()["detail"]
            if 429 in statuses and statuses[-1] == 202 and statuses.index(429) < len(statuses) - 1:
                break  # refused while busy, then taken again once the queue went down
            time.sleep(0.02)
        assert 429 in statuses and statuses[-1] == 202
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            info = client.get("/v1/streams/heavy").json()
            if info["steps"] == accepted_frames:
                break
            time.sleep(0.1)
        assert info["steps"] == accepted_frames  # every taken packet applied once, no refused one at all
