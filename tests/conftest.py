"""Shared fixtures: where the real recordings live, and a Redis URL for bus tests."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from bus_support import BusFactory

REPO_ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("NDOT_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))
REDIS_URL = os.environ.get("NDOT_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The folder of real event-camera recordings (`../shared/data`); skips when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared recordings not found at {SHARED_DATA} (set NDOT_SHARED_DATA)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def nmnist_small(shared_data: Path) -> Path:
    """The 1000-recording N-MNIST subset (`train/{id}.bs2` + `labels.txt`)."""
    path = shared_data / "nmnist-small"
    if not (path / "labels.txt").is_file():
        pytest.skip(f"N-MNIST subset not found at {path}")
    return path


@pytest.fixture(scope="session")
def redis_url() -> str:
    """URL of a real Redis (database 15 by default); skips only when none answers."""
    import redis

    client = redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1)
    try:
        client.ping()
    except redis.exceptions.ConnectionError:
        if os.environ.get("NDOT_REQUIRE_REDIS") == "1":
            pytest.fail(f"no Redis answers at {REDIS_URL} and NDOT_REQUIRE_REDIS=1")
        pytest.skip(f"no Redis answers at {REDIS_URL} (.ci/run starts one)")
    finally:
        client.close()
    return REDIS_URL


@pytest.fixture(params=["local", "redis"])
def buses(request: pytest.FixtureRequest) -> Iterator[BusFactory]:
    """Runs a test on both buses: LocalBus, and RedisStreamBus on a fresh stream of a real Redis."""
    url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    factory = BusFactory(request.param, url)
    yield factory
    factory.cleanup()


@pytest.fixture
def sharded_stream(redis_url: str) -> Iterator[str]:
    """A fresh bus stream name on the real Redis; its keys and its shards' keys are deleted after."""
    import redis

    from service.bus.shards import delete_bus_keys

    name = f"ndot-test-shards:{uuid.uuid4().hex[:12]}"
    yield name
    raw = redis.Redis.from_url(redis_url)
    delete_bus_keys(raw, name)
    raw.close()
