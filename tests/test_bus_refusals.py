"""Redis up but refusing writes (OOM, MISCONF, NOREPLICAS, READONLY), and the bus's byte bound.

Each refusal comes from a private ``redis-server`` put in that state for real: ``maxmemory`` below
what it holds (noeviction), an RDB snapshot that failed (its folder removed) with
``stop-writes-on-bgsave-error``, ``min-replicas-to-write 1`` with no replica, and a replica
(``REPLICAOF``) the service points at. Then the bus raises ``BusRefused`` naming the reason, the API
answers 503 + Retry-After with a JSON detail and ``/readyz`` says why, the worker keeps retrying,
and everything recovers without a restart once Redis accepts writes again. The byte bound
(``bus_max_bytes``) is checked on both buses: ``BusFull`` while unapplied entries fill it, room
again once they are acked, and a byte counter that always matches the stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import redis.asyncio
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError
from service_support import AUTH_SETTINGS, BINARY, ServerThread, clear_redis, http
from test_bus_redis_faults import OwnRedis
from test_faults import packet

from ndot_core.events.layout import WIRE_DTYPE
from service.app import create_app
from service.bus import BusFull, BusInputError, BusUnavailable, LocalBus, RedisStreamBus, messages
from service.bus.shards import shard_of, shard_stream_key
from service.settings import Settings
from service.worker.loop import Worker

pytestmark = pytest.mark.redis

KINDS = ("OOM", "MISCONF", "NOREPLICAS", "READONLY")


def wait_for(predicate: Callable[[], Any], what: str, timeout_s: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout_s
    while not (value := predicate()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
    return value


class Refusing:
    """A private Redis that ``refuse()`` makes refuse writes with ``kind`` and ``lift()`` makes accept them.

    ``primary_url`` takes writes until ``refuse()``; ``url`` is where the service under test points:
    the same server, or for READONLY a replica of it (``lift()`` = ``REPLICAOF NO ONE``).
    """

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.dir = tmp_path / f"redis-{kind.lower()}"
        self.dir.mkdir()
        self.server = OwnRedis(self.dir, "--maxmemory-policy", "noeviction")
        self.server.start()
        self.raw = redis.Redis(port=self.server.port)
        self.primary_url = self.url = self.server.url
        self.replica: OwnRedis | None = None
        if kind == "READONLY":
            (tmp_path / "replica").mkdir()
            self.replica = OwnRedis(tmp_path / "replica")
            self.replica.start()
            self.replica_raw = redis.Redis(port=self.replica.port)
            self.replica_raw.replicaof("127.0.0.1", self.server.port)
            self.url = self.replica.url

    def refuse(self) -> None:
        if self.kind == "OOM":
            self.raw.config_set("maxmemory", 1)  # less than it holds: every write that may grow memory fails
        elif self.kind == "MISCONF":
            self.dir.rmdir()  # the snapshot cannot be written: with a save point set, writes stop
            self.raw.config_set("save", "3600 1")
            self.raw.bgsave()
            wait_for(
                lambda: self.raw.info("persistence")["rdb_last_bgsave_status"] == "err", "a failed BGSAVE"
            )
        elif self.kind == "NOREPLICAS":
            self.raw.config_set("min-replicas-to-write", 1)
        else:  # READONLY: the replica has caught up with everything written so far
            wait_for(lambda: self.replica_raw.info("replication")["master_link_status"] == "up", "sync")
            offset = self.raw.info("replication")["master_repl_offset"]
            wait_for(
                lambda: self.replica_raw.info("replication")["slave_repl_offset"] >= offset, "replication"
            )

    def lift(self) -> None:
        if self.kind == "OOM":
            self.raw.config_set("maxmemory", 0)
        elif self.kind == "MISCONF":
            self.raw.config_set("save", "")
        elif self.kind == "NOREPLICAS":
            self.raw.config_set("min-replicas-to-write", 0)
        else:
            self.replica_raw.replicaof("NO", "ONE")

    def close(self) -> None:
        for server in (self.server, self.replica):
            if server is not None:
                server.kill()
        self.raw.close()
        if self.replica is not None:
            self.replica_raw.close()


@pytest.fixture
def refusing(tmp_path: Path) -> Iterator[Callable[[str], Refusing]]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    made: list[Refusing] = []

    def make(kind: str) -> Refusing:
        made.append(Refusing(kind, tmp_path))
        return made[-1]

    yield make
    for state in made:
        state.close()


def bus_errors(text: str) -> dict[tuple[str, str], float]:
    """``ndot_bus_errors_total`` by ``(side, kind)`` from a /metrics page."""
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ndot_bus_errors_total":
                found[sample.labels["side"], sample.labels["kind"]] = sample.value
    return found


def service_settings(url: str, tmp_path: Path, **overrides: Any) -> Settings:
    knobs = {
        **AUTH_SETTINGS,
        "window_us": 10_000,  # packet(i) puts its events in window i
        "checkpoint_interval_s": 0,
        "request_timeout_s": 5,
        **overrides,
    }
    return Settings(
        redis_url=url,
        bus_stream=f"test-refusals-{uuid.uuid4().hex[:8]}",
        checkpoint_dir=tmp_path / "ckpt",
        **knobs,
    )


# --- the bus ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_every_write_raises_bus_refused_naming_the_reason_and_the_bus_recovers(
    kind: str, refusing: Callable[[str], Refusing]
) -> None:
    from service.bus import BusRefused

    state = refusing(kind)

    async def scenario() -> None:
        before = RedisStreamBus(state.primary_url, stream="ndot:events", max_lag=100)
        await before.publish("events", "s1", {"data": b"before"})
        (entry,) = await before.read("c1", 1, 0)
        await before.close()
        state.refuse()

        bus = RedisStreamBus(state.url, stream="ndot:events", max_lag=100)
        writes = {
            "start": bus.start(),
            "publish": bus.publish("events", "s1", {"data": b"refused"}),
            "set_value": bus.set_value("k", b"v", ttl_s=5),
            "put_reply": bus.put_reply(entry.id, b"reply", 5),
            "dead_letter": bus.dead_letter(entry, "boom"),
        }
        for name, call in writes.items():
            with pytest.raises(BusRefused) as refused:
                await call
            assert isinstance(refused.value, BusUnavailable), name  # every outage handler applies
            assert refused.value.reason == kind, (name, str(refused.value))
            assert refused.value.kind == "refused"
        assert [e.id for e in await bus.replay(None, 10)] == [entry.id]  # reads still answer
        assert await bus.get_value("k") is None

        state.lift()  # the same bus object goes on by itself
        new_id = await bus.publish("events", "s1", {"data": b"after"})
        assert [e.id for e in await bus.read("c2", 5, 0)] == [new_id]
        await bus.ack([new_id])
        await bus.dead_letter(entry, "boom")
        assert await bus.lag() == 0
        await bus.close()

    asyncio.run(scenario())


def test_refusal_reasons_are_read_from_every_form_redis_and_redis_py_give_them() -> None:
    from redis.exceptions import BusyLoadingError, MasterDownError, OutOfMemoryError, ResponseError

    from service.bus import BusCommandError, BusRefused
    from service.bus.redis_errors import bus_error

    refusals = {
        "BUSY": ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL"),
        "LOADING": BusyLoadingError("Redis is loading the dataset in memory"),
        "MASTERDOWN": MasterDownError(
            "Link with MASTER is down and replica-serve-stale-data is set to 'no'."
        ),
        "OOM": OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        "TRYAGAIN": ResponseError("TRYAGAIN Multiple keys request during rehashing of slot"),
        "CLUSTERDOWN": ResponseError("CLUSTERDOWN The cluster is down"),
        # Redis 6 wraps an error inside a script in its own message
        "MISCONF": ResponseError(
            "Error running script (call to f_1): @user_script:9: -MISCONF Errors writing"
        ),
    }
    for reason, exc in refusals.items():
        error = bus_error(exc, "127.0.0.1:6379/0")
        assert isinstance(error, BusRefused) and error.reason == reason, (reason, error)
    others = {
        "WRONGTYPE": ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        "BUSYGROUP": ResponseError("BUSYGROUP Consumer Group name already exists"),
        "ERR": ResponseError("unknown command 'XAUTOCLAIM'"),
        # a payload quoted in redis-py's pipeline message is no reason
        "NOPERM": ResponseError("Command # 1 (RPUSH key -OOM x) of pipeline caused error: NOPERM no"),
    }
    for code, exc in others.items():
        error = bus_error(exc, "127.0.0.1:6379/0")
        assert type(error) is BusCommandError and error.code == code, (code, error)
        assert error.kind == "error"


# --- the API and the worker -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ("MISCONF", "NOREPLICAS", "READONLY"))
def test_the_api_answers_503_with_the_reason_and_readyz_names_it(
    kind: str, refusing: Callable[[str], Refusing], tmp_path: Path
) -> None:
    state = refusing(kind)
    state.refuse()  # before the API starts: it starts all the same
    settings = service_settings(state.url, tmp_path)
    with ServerThread(create_app(settings, run_worker=False)) as server, http(server.url) as client:
        refused = client.post(
            "/v1/streams/cam/events",
            params={"width": 34, "height": 34, "wait": False},
            content=packet(0, 0),
            headers=BINARY,
        )
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1
        detail = refused.json()["detail"]
        assert f"({kind})" in detail and "127.0.0.1" not in detail and str(state.server.port) not in detail
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["bus"] is False
        assert f"bus refuses writes ({kind})" in ready.json()["reasons"]
        assert bus_errors(client.get("/metrics").text)["api", "refused"] >= 2

        state.lift()
        accepted = client.post(
            "/v1/streams/cam/events",
            params={"width": 34, "height": 34, "wait": False},
            content=packet(0, 0),
            headers=BINARY,
        )
        assert accepted.status_code == 202, accepted.text
        assert "bus refuses writes" not in " ".join(client.get("/readyz").json()["reasons"])


def test_oom_gives_503_and_readyz_names_it_the_worker_lives_and_all_recovers_without_a_restart(
    refusing: Callable[[str], Refusing], tmp_path: Path
) -> None:
    state = refusing("OOM")
    app = create_app(service_settings(state.url, tmp_path), run_worker=True)
    with ServerThread(app) as server, http(server.url) as client:
        wait_for(lambda: client.get("/readyz").status_code == 200, "readiness")
        opened = client.post(
            "/v1/streams/cam/events",
            params={"width": 34, "height": 34, "label": 1, "start": True},
            content=packet(0, 0),
            headers=BINARY,
        )
        assert opened.status_code == 200, opened.text
        one = client.post("/v1/streams/cam/events", params={"label": 1}, content=packet(1, 0), headers=BINARY)
        assert one.status_code == 200 and len(one.json()["steps"]) == 1  # window 0 closed

        state.refuse()
        refused = client.post(
            "/v1/streams/cam/events", params={"label": 1}, content=packet(2, 0), headers=BINARY
        )
        assert refused.status_code == 503, refused.text
        assert int(refused.headers["retry-after"]) >= 1 and "(OOM)" in refused.json()["detail"]
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "bus refuses writes (OOM)" in ready.json()["reasons"]
        time.sleep(2.0)  # the worker meets the refusal again and again (heartbeat, status)
        (worker,) = app.state.workers
        assert worker._task is not None and not worker._task.done()
        errors = bus_errors(client.get("/metrics").text)  # API and worker share the registry here
        assert errors["api", "refused"] >= 2 and errors["worker", "refused"] >= 1

        state.lift()
        wait_for(lambda: client.get("/readyz").status_code == 200, "readiness after the refusal")
        again = client.post(
            "/v1/streams/cam/events", params={"label": 1}, content=packet(2, 0), headers=BINARY
        )
        assert again.status_code == 200 and len(again.json()["steps"]) == 1, again.text  # window 1 closed
        assert client.get("/v1/streams/cam").json()["steps"] == 2  # the refused packet applied once
        assert not worker._task.done()


def test_a_worker_started_while_redis_refuses_waits_and_then_works(
    refusing: Callable[[str], Refusing], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    state = refusing("OOM")
    state.refuse()
    settings = service_settings(state.url, tmp_path, read_block_ms=20)

    async def scenario() -> None:
        bus = RedisStreamBus(state.url, stream=settings.bus_stream, max_lag=100)
        worker = Worker(settings, bus, consumer="w1")
        starting = asyncio.create_task(worker.start())
        await asyncio.sleep(3.0)  # longer than building the model: the old start had died by now
        assert not starting.done(), starting.exception() if starting.done() else None
        sample = worker.metrics.registry.get_sample_value
        failures = sample("ndot_bus_errors_total", {"side": "worker", "kind": "refused"})
        assert failures >= 3
        warnings = [r for r in caplog.records if r.name == "ndot.worker" and r.levelno >= logging.WARNING]
        assert len(warnings) == 1 and "OOM" in warnings[0].getMessage()  # one line, not one per attempt

        state.lift()
        await asyncio.wait_for(starting, 15)
        worker.run_in_background()
        fields = messages.EventsPacket(packet(0, 0) + packet(1, 0), 34, 34, label=2, start=True).to_fields()
        entry_id = await bus.publish(messages.EVENTS, "cam", fields)
        reply = json.loads(await bus.wait_reply(entry_id, 10))
        assert reply["ok"] and len(reply["steps"]) == 1
        await worker.stop()
        await bus.close()
        assert any("event=bus_recovered" in r.getMessage() for r in caplog.records)

    with caplog.at_level(logging.INFO, logger="ndot.worker"):
        asyncio.run(scenario())


def test_replies_values_and_acks_refused_after_a_batch_was_applied_go_out_once_redis_accepts(
    refusing: Callable[[str], Refusing], tmp_path: Path
) -> None:
    state = refusing("OOM")  # OOM refuses SET and RPUSH, not XREADGROUP: the worker reads and applies
    settings = service_settings(state.url, tmp_path)

    async def scenario() -> None:
        bus = RedisStreamBus(state.url, stream=settings.bus_stream, max_lag=100)
        worker = Worker(settings, bus, consumer="w1")
        await worker.start()
        fields = messages.EventsPacket(packet(0, 0) + packet(1, 0), 34, 34, label=2, start=True).to_fields()
        entry_id = await bus.publish(messages.EVENTS, "cam", fields)
        state.refuse()
        with pytest.raises(BusUnavailable):
            await worker.run_once(block_ms=10)  # applied; its sensor value, reply and ack refused
        assert worker.batcher.registry.get("cam").steps == 1 and await bus.pending_count() == 1
        state.lift()
        await worker.run_once(block_ms=10)  # what was refused goes out first
        reply = json.loads(await bus.wait_reply(entry_id, 1))
        assert reply["ok"] and len(reply["steps"]) == 1
        assert await bus.lag() == 0
        assert await bus.get_value(messages.sensor_key(settings.bus_stream, "cam")) == b"34x34"
        assert worker.batcher.registry.get("cam").steps == 1
        await bus.close()

    asyncio.run(scenario())


def test_an_unexpected_redis_error_is_a_json_500_naming_it(redis_url: str, tmp_path: Path) -> None:
    settings = service_settings(redis_url, tmp_path)
    raw = redis.Redis.from_url(redis_url)
    try:
        with ServerThread(create_app(settings, run_worker=False)) as server, http(server.url) as client:
            key = shard_stream_key(settings.bus_stream, shard_of("cam", settings.shards))  # cam's shard
            raw.delete(key)
            raw.set(key, b"not a stream")  # someone else's key in the bus's place
            answer = client.post(
                "/v1/streams/cam/events",
                params={"width": 34, "height": 34, "wait": False},
                content=packet(0, 0),
                headers=BINARY,
            )
            assert answer.status_code == 500
            assert "WRONGTYPE" in answer.json()["detail"] and "6379" not in answer.json()["detail"]
            assert bus_errors(client.get("/metrics").text)["api", "error"] >= 1
    finally:
        raw.close()
        clear_redis(redis_url, settings.bus_stream)


# --- the byte bound -----------------------------------------------------------------------------


@pytest.fixture(params=["local", "redis"])
def byte_bus(request: pytest.FixtureRequest) -> Iterator[Callable[..., Any]]:
    """``make(max_bytes, max_lag=100, maxlen=None)`` -> a bus of one kind on a fresh stream."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    stream = f"ndot-test:{uuid.uuid4().hex}"

    def make(max_bytes: int, max_lag: int = 100, maxlen: int | None = None) -> Any:
        if url is None:
            return LocalBus(max_lag=max_lag, max_bytes=max_bytes)
        return RedisStreamBus(url, stream=stream, max_lag=max_lag, maxlen=maxlen, max_bytes=max_bytes)

    make.url = url  # type: ignore[attr-defined]
    yield make
    if url is not None:
        clear_redis(url, stream)


async def held_bytes(bus: Any, url: str | None = None) -> int:
    """The bus's byte counter, checked against what it holds (Redis at ``url``: the stream; local: unacked)."""
    from service.bus import entry_size

    if isinstance(bus, LocalBus):
        held = await bus.replay(None, 10_000)  # unread + pending: all the embedded bus holds
        assert bus.held_bytes == sum(entry_size(e.kind, e.stream_id, e.fields) for e in held)
        return bus.held_bytes
    raw = redis.asyncio.Redis.from_url(url)
    try:
        rows = await raw.xrange(bus.stream)
        counter = await raw.hgetall(bus.bytes_key)
    finally:
        await raw.aclose()
    assert int(counter[b"entries"]) == len(rows)
    assert int(counter[b"bytes"]) == sum(len(k) + len(v) for _, fields in rows for k, v in fields.items())
    return int(counter[b"bytes"])


def test_publishing_past_the_byte_bound_is_bus_full_until_entries_are_acked(
    byte_bus: Callable[..., Any],
) -> None:
    from service.bus import entry_size

    fields = {"data": b"x" * 300}
    size = entry_size("events", "s1", fields)
    assert size == len("kind") + len("events") + len("stream_id") + len("s1") + len("data") + 300

    async def scenario() -> None:
        bus = byte_bus(max_bytes=3 * size + size // 2)  # room for 3 entries, not 4
        await bus.start()
        for _ in range(3):
            await bus.publish("events", "s1", fields)
        with pytest.raises(BusFull) as full:
            await bus.publish("events", "s1", fields)
        assert (full.value.held_bytes, full.value.max_bytes) == (3 * size, 3 * size + size // 2)
        assert "max_bytes" in str(full.value) and full.value.retry_after_s > 0
        assert await held_bytes(bus, byte_bus.url) == 3 * size
        taken = await bus.read("c1", 2, 0)
        with pytest.raises(BusFull):  # read, not acked: pending entries are never dropped
            await bus.publish("events", "s1", fields)
        await bus.ack([e.id for e in taken])
        await bus.publish("events", "s1", fields)  # room made by dropping applied entries only
        assert await held_bytes(bus, byte_bus.url) <= 3 * size
        rest = await bus.read("c1", 10, 0)
        assert len(rest) == 2  # the unread one and the new one: nothing unread was lost
        await bus.ack([e.id for e in rest])
        with pytest.raises(BusInputError, match="max_bytes"):  # could never fit: refused for good
            await bus.publish("events", "s1", {"data": b"x" * (4 * size)})
        await held_bytes(bus, byte_bus.url)
        await bus.close()

    asyncio.run(scenario())


def test_redis_trimming_keeps_the_byte_counter_exact_and_never_drops_a_pending_entry(redis_url: str) -> None:
    stream = f"ndot-test:{uuid.uuid4().hex}"
    raw = redis.Redis.from_url(redis_url)

    async def scenario() -> None:
        bus = RedisStreamBus(redis_url, stream=stream, max_lag=3, maxlen=6, max_bytes=10_000)
        straggler_id = await bus.publish("events", "s0", {"data": b"slow"})
        await bus.read("slow-consumer", 1, 0)  # pending, never acked
        for i in range(40):  # count trimming (maxlen) and byte trimming both run, around the straggler
            await bus.publish("events", f"s{i}", {"data": b"y" * (i * 50 % 1200)})
            (entry,) = await bus.read("c1", 1, 0)
            if i % 7:
                await bus.ack([entry.id])
            else:  # another entry left pending a while: stepped over, then dropped once acked
                await bus.publish("events", "s1", {"data": b"late"})
                later = await bus.read("c1", 1, 0)
                await bus.ack([e.id for e in later] + [entry.id])
            await held_bytes(bus, redis_url)
            assert raw.xlen(stream) <= 6
        ids = [e.id for e in await bus.replay(None, 100)]
        assert ids[0] == straggler_id  # the pending entry is kept, the applied ones after it went
        (claimed,) = await bus.claim_stale("c1", 0, 10)
        assert claimed.id == straggler_id and bus.lost_pending == 0
        await bus.ack([straggler_id])
        assert await bus.lag() == 0
        for _ in range(6):
            await bus.publish("events", "s1", {"data": b"z"})
            await bus.ack([e.id for e in await bus.read("c1", 1, 0)])
        assert straggler_id not in [e.id for e in await bus.replay(None, 100)]
        await held_bytes(bus, redis_url)

        raw.xtrim(stream, maxlen=1)  # changed behind the bus's back: the counter is recounted
        await bus.publish("events", "s1", {"data": b"z"})
        await held_bytes(bus, redis_url)
        raw.delete(stream)
        await bus.publish("events", "s1", {"data": b"z"})
        assert await held_bytes(bus, redis_url) == len("kindeventsstream_ids1dataz")
        await bus.close()

    try:
        asyncio.run(scenario())
    finally:
        clear_redis(redis_url, stream)
        raw.close()


def test_the_byte_counter_shares_the_stream_s_cluster_slot() -> None:
    from redis.crc import key_slot

    from service.bus.redis_lua import bytes_key

    for stream in ("ndot:events", "{ndot}:events", "a{b}c", "test-faults-1234"):
        key = bytes_key(stream)
        assert key.startswith(stream) and key != stream
        assert key_slot(key.encode()) == key_slot(stream.encode()), key


def test_settings_refuse_a_bus_byte_bound_smaller_than_two_bodies() -> None:
    assert Settings().bus_max_bytes == 512 * 2**20
    with pytest.raises(ValidationError, match="bus_max_bytes"):
        Settings(bus_max_bytes=20 * 2**20, max_body_bytes=16 * 2**20)
    assert Settings(bus_max_bytes=2 * 2**20, max_body_bytes=2**20).bus_max_bytes == 2 * 2**20


def test_the_api_answers_503_when_the_byte_bound_is_reached(redis_url: str, tmp_path: Path) -> None:
    limit = 13 * 100  # bodies of at most 100 events; the bus holds 2 such bodies, less than 2 entries
    settings = service_settings(redis_url, tmp_path, max_body_bytes=limit, bus_max_bytes=2 * limit)
    events = np.zeros(100, dtype=WIRE_DTYPE)
    events["t"] = np.arange(100)
    try:
        with ServerThread(create_app(settings, run_worker=False)) as server, http(server.url) as client:
            post = lambda: client.post(  # noqa: E731
                "/v1/streams/cam/events",
                params={"width": 34, "height": 34, "wait": False},
                content=events.tobytes(),
                headers=BINARY,
            )
            assert post().status_code == 202
            full = post()  # no worker reads: the first entry is unread
            assert full.status_code == 503 and int(full.headers["retry-after"]) >= 1
            assert "max_bytes" in full.json()["detail"]
    finally:
        clear_redis(redis_url, settings.bus_stream)
