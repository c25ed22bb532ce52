"""The stream registry: rows, LRU eviction, TTL expiry, conflicting sensors, save/load."""

from __future__ import annotations

import numpy as np
import pytest

from ndot_core.events.framing import StreamFramer
from ndot_core.events.layout import EVENT_DTYPE
from service.worker.streams import StreamError, StreamRegistry


def new_framer(width: int, height: int) -> StreamFramer:
    return StreamFramer((width, height), window_us=1000, output_size=(8, 8))


def test_streams_get_distinct_rows_and_keep_them() -> None:
    registry = StreamRegistry(3, new_framer)
    a, _ = registry.open("a", 34, 34, now_s=0)
    b, _ = registry.open("b", 34, 34, now_s=1)
    again, evicted = registry.open("a", 34, 34, now_s=2)
    assert again is a and evicted is None
    assert {a.row, b.row} == {0, 1}
    assert len(registry) == 2 and "a" in registry and "c" not in registry


def test_another_sensor_size_for_an_open_stream_is_refused() -> None:
    registry = StreamRegistry(2, new_framer)
    registry.open("cam", 34, 34, now_s=0)
    with pytest.raises(StreamError, match="34x34, not 128x128"):
        registry.open("cam", 128, 128, now_s=1)


def test_the_least_recently_used_stream_is_evicted_and_its_row_reused() -> None:
    registry = StreamRegistry(2, new_framer)
    a, _ = registry.open("a", 34, 34, now_s=0)
    registry.open("b", 34, 34, now_s=1)
    registry.touch(a, now_s=2)  # b is now the least recently used
    c, evicted = registry.open("c", 34, 34, now_s=3)
    assert evicted is not None and evicted.stream_id == "b"
    assert c.row == evicted.row
    assert [s.stream_id for s in registry] == ["a", "c"]


def test_idle_streams_expire_but_not_those_with_queued_work() -> None:
    registry = StreamRegistry(4, new_framer)
    registry.open("old", 34, 34, now_s=0)
    busy, _ = registry.open("busy", 34, 34, now_s=0)
    busy.pending.append(("step", None))
    registry.open("fresh", 34, 34, now_s=95)
    expired = registry.expire(now_s=100, ttl_s=10)
    assert [s.stream_id for s in expired] == ["old"]
    assert sorted(s.stream_id for s in registry) == ["busy", "fresh"]
    assert registry.open("new", 34, 34, now_s=100)[0].row == 0  # the expired row is free again


def test_state_dict_round_trip_continues_the_framers_exactly() -> None:
    registry = StreamRegistry(3, new_framer)
    slot, _ = registry.open("cam", 16, 16, now_s=5)
    events = np.zeros(4, dtype=EVENT_DTYPE)
    events["t"] = [100, 200, 1500, 1600]
    events["x"] = [1, 2, 3, 15]
    slot.framer.push(events)
    slot.steps, slot.labelled_steps, slot.correct_steps, slot.last_entry_id = 7, 5, 4, "17-3"

    loaded, rows = StreamRegistry.from_state_dict(
        registry.state_dict(), 2, new_framer, StreamFramer.from_state_dict
    )
    twin = loaded.get("cam")
    assert rows == [twin.row] and twin.info() == slot.info() and twin.last_entry_id == "17-3"
    later = np.zeros(1, dtype=EVENT_DTYPE)
    later["t"] = [2600]
    np.testing.assert_array_equal(twin.framer.push(later.copy())[0], slot.framer.push(later.copy())[0])


def test_loading_more_streams_than_rows_is_refused() -> None:
    registry = StreamRegistry(3, new_framer)
    for name in "abc":
        registry.open(name, 8, 8, now_s=0)
    with pytest.raises(StreamError, match="3 streams, more than max_streams=2"):
        StreamRegistry.from_state_dict(registry.state_dict(), 2, new_framer, StreamFramer.from_state_dict)


def test_saving_with_queued_steps_is_refused() -> None:
    registry = StreamRegistry(1, new_framer)
    slot, _ = registry.open("a", 8, 8, now_s=0)
    slot.pending.append(("step", None))
    with pytest.raises(StreamError, match="queued steps"):
        registry.state_dict()
