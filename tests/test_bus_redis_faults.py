"""Faults at the bus level over a real Redis: server crash and restart, a consumer killed with -9."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.bus import BusEntry, BusUnavailable, RedisStreamBus

REPO_ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.redis


class OwnRedis:
    """A redis-server of this test's own on a fixed free port, which the test may stop and start."""

    def __init__(self, workdir: Path, *extra_args: str) -> None:
        """``extra_args``: more ``redis-server`` options (``"--maxmemory", "1mb"``)."""
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = sock.getsockname()[1]
        self.workdir = workdir
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.extra_args = list(extra_args)
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        args = [
            "redis-server",
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.workdir),
            *self.extra_args,
        ]
        self.process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.2)
        try:
            for _ in range(100):
                try:
                    if client.ping():
                        return
                except redis.exceptions.ConnectionError:
                    time.sleep(0.05)
            raise RuntimeError(f"redis-server did not answer on port {self.port}")
        finally:
            client.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no shutdown, no save."""
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None


@pytest.fixture
def own_redis(tmp_path: Path) -> Iterator[OwnRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = OwnRedis(tmp_path)
    server.start()
    yield server
    server.kill()


def test_every_call_raises_bus_unavailable_while_redis_is_down_and_recovers(own_redis: OwnRedis) -> None:
    async def scenario() -> None:
        bus = RedisStreamBus(own_redis.url, stream="ndot:events", max_lag=100)
        await bus.start()
        await bus.publish("events", "s1", {"data": b"before"})
        (before,) = await bus.read("w1", 5, 0)
        await bus.send_round([], [("r0", b"x")], 5, [])  # (the round script is in the server's cache now)
        own_redis.kill()

        assert await bus.ping() is False
        calls = {
            "publish": bus.publish("events", "s1", {"data": b"gap"}),
            "read": bus.read("w1", 5, 100),
            "ack": bus.ack([before.id]),
            "claim_stale": bus.claim_stale("w2", 0, 5),
            "pending_count": bus.pending_count(),
            "lag": bus.lag(),
            "dead_letter": bus.dead_letter(before, "boom"),
            "dead_letters": bus.dead_letters(),
            "put_reply": bus.put_reply("r1", b"x", 5),
            "wait_reply": bus.wait_reply("r1", 1),
            "set_value": bus.set_value("k", b"v"),
            "get_value": bus.get_value("k"),
            "send_round": bus.send_round([("k", b"v", None)], [("r1", b"x")], 5, [before.id]),
            "start": bus.start(),
        }
        for name, call in calls.items():
            with pytest.raises(BusUnavailable, match=f"127.0.0.1:{own_redis.port}"):
                await call
            print(f"{name}: BusUnavailable")

        own_redis.start()  # same port, empty data: stream and group are gone
        assert await bus.ping() is True
        entry_id = await bus.publish("events", "s1", {"data": b"after"})
        entries = await bus.read("w1", 5, 1000)
        assert [(e.id, e.fields) for e in entries] == [(entry_id, {"data": b"after"})]
        await bus.ack([entry_id])
        await bus.put_reply("r2", b"ok", 5)
        assert await bus.wait_reply("r2", 1) == b"ok"
        # the round script is gone with the server's script cache: loaded again (NOSCRIPT), the round goes out
        newer = await bus.publish("events", "s1", {"data": b"later"})
        assert [e.id for e in await bus.read("w1", 5, 1000)] == [newer]
        await bus.send_round([("k", b"v", None)], [("r3", b"done")], 5, [newer])
        assert await bus.get_value("k") == b"v" and await bus.wait_reply("r3", 1) == b"done"
        assert await bus.lag() == 0
        await bus.close()

    asyncio.run(scenario())


def test_blocked_read_and_reply_wait_fail_fast_when_redis_dies(own_redis: OwnRedis) -> None:
    async def scenario() -> None:
        bus = RedisStreamBus(own_redis.url, max_lag=100)
        await bus.start()
        reader = asyncio.create_task(bus.read("w1", 5, 60_000))
        waiter = asyncio.create_task(bus.wait_reply("r1", 60))
        await asyncio.sleep(0.2)
        own_redis.kill()
        for task in (reader, waiter):
            with pytest.raises(BusUnavailable):
                await asyncio.wait_for(task, 10)
        await bus.close()

    asyncio.run(scenario())


_DOOMED_CONSUMER = """
import asyncio, sys
from service.bus import RedisStreamBus

async def main():
    bus = RedisStreamBus(sys.argv[1], stream=sys.argv[2], max_lag=100)
    entries = await bus.read("doomed", 10, 5000)
    print(" ".join(e.id for e in entries), flush=True)
    await asyncio.sleep(120)  # "processing": never acks

asyncio.run(main())
"""


def test_entries_of_a_consumer_killed_with_sigkill_are_claimed(redis_url: str) -> None:
    stream = f"ndot-test:{uuid.uuid4().hex}"
    raw = redis.Redis.from_url(redis_url)

    async def publish() -> list[str]:
        bus = RedisStreamBus(redis_url, stream=stream, max_lag=100)
        await bus.start()
        ids = [await bus.publish("events", f"s{i}", {"data": bytes([i]) * 13}) for i in range(3)]
        await bus.close()
        return ids

    async def survive() -> list[BusEntry]:
        bus = RedisStreamBus(redis_url, stream=stream, max_lag=100)
        claimed: list[BusEntry] = []
        for _ in range(100):  # the dead consumer's entries turn stale after min_idle_ms
            claimed += await bus.claim_stale("survivor", 200, 10)
            if len(claimed) >= 3:
                break
            await asyncio.sleep(0.1)
        await bus.ack([e.id for e in claimed])
        assert await bus.pending_count() == 0
        await bus.close()
        return claimed

    try:
        ids = asyncio.run(publish())
        env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
        doomed = subprocess.Popen(
            [sys.executable, "-c", _DOOMED_CONSUMER, redis_url, stream],
            stdout=subprocess.PIPE,
            env=env,
            cwd=REPO_ROOT,
        )
        try:
            assert doomed.stdout is not None
            assert doomed.stdout.readline().decode().split() == ids
        finally:
            doomed.send_signal(signal.SIGKILL)
            doomed.wait()
        claimed = asyncio.run(survive())
        assert [e.id for e in claimed] == ids
        assert [e.fields["data"] for e in claimed] == [bytes([i]) * 13 for i in range(3)]
        assert all(e.deliveries == 2 for e in claimed)
    finally:
        keys = list(raw.scan_iter(match=f"{stream}*"))
        if keys:
            raw.delete(*keys)
        raw.close()
