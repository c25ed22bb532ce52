"""The work one packet can cause is bounded: in the worker (entries may bypass the API) and at the API."""

from __future__ import annotations

from pathlib import Path

from test_worker import post, reply, run, wire

from service.bus import LocalBus


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


def test_a_long_silence_inside_the_limit_still_becomes_empty_frames(tmp_path: Path) -> None:
    """The bound is on work, not on gaps: a 150 ms silence is 15 real time-steps (membranes decay)."""

    async def scenario(bus: LocalBus, new_worker) -> None:
        worker = await new_worker()
        first = await post(bus, "cam", wire([0, 5_000]))
        second = await post(bus, "cam", wire([160_000, 165_000]))
        await worker.run_once(block_ms=0)
        assert (await reply(bus, first))["steps"] == []
        assert len((await reply(bus, second))["steps"]) == 16  # the open window + 15 empty ones

    run(tmp_path, scenario, max_packet_windows=20, max_gap_windows=15)
