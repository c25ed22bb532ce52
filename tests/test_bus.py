"""Behaviour of the stream bus, the same tests over LocalBus and RedisStreamBus (real Redis)."""

from __future__ import annotations

import asyncio
import random
from types import SimpleNamespace
from typing import Any

import pytest
from bus_support import BusFactory

from service.bus import (
    Bus,
    BusEntry,
    BusFull,
    BusInputError,
    BusUnavailable,
    LocalBus,
    RedisStreamBus,
    entry_id_key,
    make_bus,
)


def test_round_trip_is_byte_exact(buses: BusFactory) -> None:
    rng = random.Random(0)
    payloads = [
        ("events", "cam-1", {"data": rng.randbytes(130_000), "label": b"3"}),
        ("events", "cam.2_x", {"data": bytes(range(256)) * 3, "empty": b"", "nul": b"\x00\x00\r\n"}),
        ("reset", "cam-1", {}),
    ]

    async def scenario(bus: Bus) -> None:
        ids = [await bus.publish(kind, sid, fields) for kind, sid, fields in payloads]
        entries = await bus.read("c1", 10, 0)
        assert [e.id for e in entries] == ids
        for entry, (kind, sid, fields) in zip(entries, payloads, strict=True):
            assert (entry.kind, entry.stream_id, entry.fields, entry.deliveries) == (kind, sid, fields, 1)

    buses.run(scenario)


def test_entries_arrive_in_order_with_increasing_ids(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        ids = [await bus.publish("events", f"s{i % 3}", {"seq": str(i).encode()}) for i in range(30)]
        got: list[BusEntry] = []
        while batch := await bus.read("c1", 7, 0):
            assert len(batch) <= 7
            got += batch
        assert [e.id for e in got] == ids
        assert [int(e.fields["seq"]) for e in got] == list(range(30))
        keys = [entry_id_key(i) for i in ids]
        assert all(a < b for a, b in zip(keys, keys[1:], strict=False))

    buses.run(scenario)


def test_blocking_read_returns_when_an_entry_arrives(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        assert await bus.read("c1", 5, 0) == []
        assert await bus.read("c1", 5, 30) == []
        reader = asyncio.create_task(bus.read("c1", 5, 20_000))
        await asyncio.sleep(0.1)
        assert not reader.done()
        entry_id = await bus.publish("events", "s1", {"data": b"x"})
        entries = await asyncio.wait_for(reader, 10)
        assert [e.id for e in entries] == [entry_id]

    buses.run(scenario)


def test_ack_removes_from_pending(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        ids = [await bus.publish("events", "s1", {}) for _ in range(3)]
        assert (await bus.lag(), await bus.pending_count()) == (3, 0)
        entries = await bus.read("c1", 10, 0)
        assert [e.id for e in entries] == ids
        assert (await bus.lag(), await bus.pending_count()) == (3, 3)
        await bus.ack(ids[:2])
        assert (await bus.lag(), await bus.pending_count()) == (1, 1)
        await bus.ack(ids[:2])  # acking twice is harmless
        await bus.ack([])
        assert await bus.pending_count() == 1
        assert await bus.read("c2", 10, 0) == []  # pending entries are not handed out again by read
        await bus.ack(ids[2:])
        assert (await bus.lag(), await bus.pending_count()) == (0, 0)

    buses.run(scenario)


def test_unacked_entries_are_claimed_by_another_consumer_after_min_idle(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        sent = {await bus.publish("events", f"s{i}", {"data": bytes([i]) * 10}): i for i in range(5)}
        dead_consumer_entries = await bus.read("worker-a", 5, 0)
        assert await bus.claim_stale("worker-b", 60_000, 10) == []  # not idle long enough
        await asyncio.sleep(0.15)
        first = await bus.claim_stale("worker-b", 100, 2)
        rest = await bus.claim_stale("worker-b", 100, 10)
        claimed = first + rest
        assert [e.id for e in first] == list(sent)[:2]
        assert [e.id for e in claimed] == list(sent)
        for before, after in zip(dead_consumer_entries, claimed, strict=True):
            assert (after.kind, after.stream_id, after.fields) == (
                before.kind,
                before.stream_id,
                before.fields,
            )
            assert after.deliveries == 2
        assert await bus.claim_stale("worker-c", 100, 10) == []  # claiming reset their idle time
        await bus.ack([e.id for e in claimed])
        assert await bus.pending_count() == 0

    buses.run(scenario)


def test_bus_full_at_the_lag_bound_and_accepted_again_after_acks(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        for _ in range(4):
            await bus.publish("events", "s1", {"data": b"x"})
        with pytest.raises(BusFull) as full:
            await bus.publish("events", "s1", {"data": b"x"})
        assert full.value.retry_after_s == 0.5
        assert (full.value.lag, full.value.max_lag) == (4, 4)
        entries = await bus.read("c1", 2, 0)
        with pytest.raises(BusFull):  # read but not acked still counts
            await bus.publish("events", "s1", {})
        await bus.ack([e.id for e in entries])
        await bus.publish("events", "s1", {})
        await bus.publish("events", "s1", {})
        with pytest.raises(BusFull):
            await bus.publish("events", "s1", {})
        assert await bus.lag() == 4

    buses.run(scenario, max_lag=4)


def test_nothing_is_trimmed_while_unread(buses: BusFactory) -> None:
    """250 entries through a bus bounded to 5 unacked (Redis maxlen 10): every one arrives, in order."""
    total, received = 250, []

    async def scenario(bus: Bus) -> None:
        sent = 0
        while sent < total:
            try:
                while sent < total:
                    await bus.publish("events", "s1", {"seq": sent.to_bytes(4, "little")})
                    sent += 1
            except BusFull:
                pass
            entries = await bus.read("c1", 100, 0)
            received.extend(int.from_bytes(e.fields["seq"], "little") for e in entries)
            await bus.ack([e.id for e in entries])
        entries = await bus.read("c1", 100, 0)
        received.extend(int.from_bytes(e.fields["seq"], "little") for e in entries)

    buses.run(scenario, max_lag=5)
    assert received == list(range(total))
    if buses.raw is not None:
        assert buses.raw.xlen(buses.stream) < total  # trimming did run meanwhile


def test_dead_letter_keeps_the_entry_and_its_error(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        await bus.publish("events", "cam-7", {"data": b"\x01\x02\x03", "label": b"9"})
        (entry,) = await bus.read("c1", 1, 0)
        await bus.dead_letter(entry, "EventError: event 3 has x=40 outside width 34")
        assert (await bus.pending_count(), await bus.lag()) == (0, 0)
        (dead,) = await bus.dead_letters()
        assert (dead.kind, dead.stream_id) == ("events", "cam-7")
        assert dead.fields == {
            "data": b"\x01\x02\x03",
            "label": b"9",
            "error": b"EventError: event 3 has x=40 outside width 34",
            "original_id": entry.id.encode(),
        }
        next_id = await bus.publish("events", "cam-7", {"data": b"ok"})  # the stream keeps going
        assert [e.id for e in await bus.read("c1", 5, 0)] == [next_id]

    buses.run(scenario)


def test_replies_reach_their_waiter_and_time_out_as_none(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        await bus.put_reply("req-1", b'{"steps": []}', ttl_s=30)
        await bus.put_reply("req-1", b"second", ttl_s=30)
        assert await bus.wait_reply("req-1", 1) == b'{"steps": []}'
        assert await bus.wait_reply("req-1", 1) == b"second"
        assert await bus.wait_reply("req-1", 0.1) is None
        assert await bus.wait_reply("never-sent", 0) is None
        waiter = asyncio.create_task(bus.wait_reply("req-2", 20))
        await asyncio.sleep(0.1)
        await bus.put_reply("req-2", b"\x00late\xff", ttl_s=30)
        assert await asyncio.wait_for(waiter, 10) == b"\x00late\xff"
        await bus.put_reply("req-3", b"stale", ttl_s=0.05)  # nobody waited in time: it expires
        await asyncio.sleep(0.3)
        assert await bus.wait_reply("req-3", 0.05) is None

    buses.run(scenario)


def test_many_concurrent_reply_waiters_do_not_starve_the_stream(buses: BusFactory) -> None:
    n = 120

    async def scenario(bus: Bus) -> None:
        waiters = [asyncio.create_task(bus.wait_reply(f"req-{i}", 30)) for i in range(n)]
        await asyncio.sleep(0.3)
        assert not any(w.done() for w in waiters)
        entry_id = await asyncio.wait_for(bus.publish("events", "s1", {"data": b"x"}), 10)
        assert [e.id for e in await asyncio.wait_for(bus.read("c1", 1, 0), 10)] == [entry_id]
        for i in reversed(range(n)):
            await bus.put_reply(f"req-{i}", f"reply-{i}".encode(), ttl_s=30)
        replies = await asyncio.wait_for(asyncio.gather(*waiters), 20)
        assert replies == [f"reply-{i}".encode() for i in range(n)]

    buses.run(scenario)


def test_values_are_kept_and_expire_with_their_ttl(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        assert await bus.get_value("status") is None
        await bus.set_value("status", b'{"streams": 3}')
        await bus.set_value("heartbeat", b"1700000000.5", ttl_s=0.1)
        assert await bus.get_value("heartbeat") == b"1700000000.5"
        await asyncio.sleep(0.35)
        assert await bus.get_value("heartbeat") is None
        assert await bus.get_value("status") == b'{"streams": 3}'
        await bus.set_value("status", b"")
        assert await bus.get_value("status") == b""

    buses.run(scenario)


@pytest.mark.parametrize(
    ("kind", "stream_id", "fields", "names"),
    [
        ("events", "s1", {"kind": b"x"}, "'kind'"),
        ("events", "s1", {"error": b"x"}, "'error'"),
        ("events", "s1", {"data": "not bytes"}, "'data'"),
        ("events", "s1", {"data": 5}, "'data'"),
        ("", "s1", {}, "kind ''"),
        ("Events!", "s1", {}, "'Events!'"),
        ("events", "", {}, "stream_id ''"),
    ],
)
def test_bad_publish_arguments_raise_bus_input_error(
    buses: BusFactory, kind: str, stream_id: str, fields: dict[str, Any], names: str
) -> None:
    async def scenario(bus: Bus) -> None:
        with pytest.raises(BusInputError, match=names):
            await bus.publish(kind, stream_id, fields)
        with pytest.raises(BusInputError, match="'not-an-id'"):
            await bus.ack(["not-an-id"])
        assert await bus.lag() == 0

    buses.run(scenario)


def test_ping_answers_true_on_a_live_bus(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        assert await bus.ping() is True
        assert isinstance(bus, Bus)

    buses.run(scenario)


def test_entry_id_key_orders_ids_numerically() -> None:
    assert entry_id_key("1700000000000-0") == (1_700_000_000_000, 0)
    assert entry_id_key("9-10") > entry_id_key("9-9") > entry_id_key("8-99")
    for bad in ("", "12", "1-2-3", "a-1", " 1-2", "1-2\n"):
        with pytest.raises(BusInputError, match=repr(bad).replace("\\", "\\\\")):
            entry_id_key(bad)


def test_make_bus_picks_the_embedded_bus_without_redis_url() -> None:
    bus = make_bus(SimpleNamespace(redis_url=None, bus_max_lag=7))
    assert isinstance(bus, LocalBus) and bus.max_lag == 7
    assert isinstance(make_bus(object()), LocalBus)


def test_make_bus_picks_redis_streams_with_a_url() -> None:
    settings = SimpleNamespace(
        redis_url="redis://127.0.0.1:6379/15", bus_stream="st", bus_group="gr", bus_max_lag=10, bus_maxlen=50
    )
    bus = make_bus(settings)
    assert isinstance(bus, RedisStreamBus)
    assert (bus.stream, bus.group, bus.max_lag, bus.maxlen) == ("st", "gr", 10, 50)
    assert RedisStreamBus("redis://127.0.0.1:6379/15", max_lag=10).maxlen == 20


def test_redis_maxlen_must_stay_well_above_max_lag() -> None:
    with pytest.raises(ValueError, match="maxlen=15"):
        RedisStreamBus("redis://127.0.0.1:6379/15", max_lag=10, maxlen=15)
    with pytest.raises(ValueError, match="max_lag"):
        LocalBus(max_lag=0)


def test_local_bus_refuses_calls_after_close() -> None:
    async def scenario() -> None:
        bus = LocalBus()
        reader = asyncio.create_task(bus.read("c1", 1, 20_000))
        await asyncio.sleep(0.05)
        await bus.close()
        assert await asyncio.wait_for(reader, 5) == []
        assert await bus.ping() is False
        with pytest.raises(BusUnavailable):
            await bus.publish("events", "s1", {})

    asyncio.run(scenario())


@pytest.mark.redis
def test_redis_counts_pending_entries_lost_to_trimming(redis_url: str) -> None:
    factory = BusFactory("redis", redis_url)

    async def scenario(bus: Bus) -> None:
        assert isinstance(bus, RedisStreamBus)
        await bus.publish("events", "s1", {"data": b"x"})
        await bus.read("c1", 1, 0)
        factory.raw.xtrim(factory.stream, maxlen=0)  # as if maxlen newer entries had pushed it out
        assert await bus.claim_stale("c2", 0, 10) == []
        assert bus.lost_pending == 1
        assert await bus.pending_count() == 0

    try:
        factory.run(scenario)
    finally:
        factory.cleanup()


@pytest.mark.redis
def test_redis_group_is_recreated_when_lost(redis_url: str) -> None:
    """A Redis restart without persistence loses the group: the bus creates it again by itself."""
    factory = BusFactory("redis", redis_url)

    async def scenario(bus: Bus) -> None:
        await bus.publish("events", "s1", {"data": b"old"})
        factory.raw.delete(factory.stream)
        assert await bus.read("c1", 5, 0) == []
        assert await bus.lag() == 0
        factory.raw.delete(factory.stream)
        entry_id = await bus.publish("events", "s1", {"data": b"new"})
        assert [e.id for e in await bus.read("c1", 5, 0)] == [entry_id]
        await bus.ack([entry_id])

    try:
        factory.run(scenario)
    finally:
        factory.cleanup()


def test_send_round_writes_values_replies_and_acks(buses: BusFactory) -> None:
    """A worker round in one call: values set (with TTL) and deleted, replies queued, entries acked."""

    async def scenario(bus: Bus) -> None:
        ids = [await bus.publish("events", "s1", {}) for _ in range(2)]
        await bus.read("c1", 10, 0)
        await bus.set_value("gone", b"x")
        values = [("kept", b"v1", None), ("brief", b"v2", 0.05), ("gone", None, None)]
        await bus.send_round(values, [(ids[0], b"r0"), (ids[1], b"r1")], 5.0, ids)
        assert await bus.get_value("kept") == b"v1" and await bus.get_value("gone") is None
        assert await bus.wait_reply(ids[1], 1) == b"r1" and await bus.wait_reply(ids[0], 1) == b"r0"
        assert await bus.pending_count() == 0
        await asyncio.sleep(0.1)
        assert await bus.get_value("brief") is None
        await bus.send_round([], [], 5.0, [])  # an empty round is a no-op

    buses.run(scenario)


def test_a_dead_letter_keeps_a_bounded_part_of_a_large_entry(buses: BusFactory) -> None:
    """Dead letters are for diagnosis: a field over 16 KiB is kept as its first 16 KiB and named in
    ``truncated`` with its size, so dead letters cannot make the bus hold what their entries held."""
    from service.bus.base import DEAD_LETTER_FIELD_BYTES

    async def scenario(bus: Bus) -> None:
        big = bytes(range(256)) * 1024  # 256 KiB
        entry_id = await bus.publish("events", "s1", {"events": big, "label": b"3"})
        (entry,) = await bus.read("c1", 10, 0)
        await bus.dead_letter(entry, "x" * 100_000)
        (dead,) = await bus.dead_letters()
        assert dead.fields["events"] == big[:DEAD_LETTER_FIELD_BYTES] and dead.fields["label"] == b"3"
        assert dead.fields["truncated"] == f"events={len(big)}".encode()
        assert len(dead.fields["error"]) == DEAD_LETTER_FIELD_BYTES
        assert dead.fields["original_id"].decode() == entry_id and await bus.pending_count() == 0

    buses.run(scenario)


def test_get_values_reads_several_keys_at_once(buses: BusFactory) -> None:
    async def scenario(bus: Bus) -> None:
        await bus.set_value("a", b"1")
        await bus.set_value("c", b"3")
        assert await bus.get_values(["a", "b", "c"]) == [b"1", None, b"3"]
        assert await bus.get_values([]) == []

    buses.run(scenario)
