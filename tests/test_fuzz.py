"""Fuzzing: schemathesis against the service's own OpenAPI (in-process ASGI, embedded bus, the real
worker and model), and hypothesis on the binary event decoder and the streaming framer with hostile
but valid packets. The framer's cut-independence and state round trip are in tests/test_framing.py,
the decoder's error messages and small round trips in tests/test_events.py."""

from __future__ import annotations

import tempfile
import uuid
from pathlib import Path

import numpy as np
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from service_support import ADMIN_KEY, AUTH_SETTINGS, auth

from ndot_core.events.framing import StreamFramer
from ndot_core.events.layout import EVENT_DTYPE, WIRE_DTYPE, EventError, events_from_bytes, events_to_bytes
from service.app import create_app
from service.settings import Settings

CASES_PER_OPERATION = 90
MIN_CASES = 1000

_checkpoints = Path(tempfile.mkdtemp(prefix="ndot-fuzz-"))
APP = create_app(
    Settings(
        redis_url=None,
        bus_stream=f"fuzz-{uuid.uuid4().hex[:8]}",
        checkpoint_dir=_checkpoints,
        checkpoint_interval_s=0,
        checkpoint_keep=2,
        max_body_bytes=64 * 1024,
        max_events_per_packet=2000,
        request_timeout_s=30,
        rate_limit_rps=0,
        **AUTH_SETTINGS,
    ),
    run_worker=True,
)
schema = schemathesis.openapi.from_asgi("/openapi.json", APP)
calls = {"cases": 0, "by_status": {}}


@schema.parametrize()
@settings(
    max_examples=CASES_PER_OPERATION,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_5xx(case) -> None:
    # Half the cases with the admin key (past auth, into the routes), half with whatever they carry.
    headers = auth(ADMIN_KEY) if calls["cases"] % 2 == 0 else None
    response = case.call(headers=headers)
    calls["cases"] += 1
    calls["by_status"][response.status_code] = calls["by_status"].get(response.status_code, 0) + 1
    assert response.status_code < 500, (case.operation.label, response.status_code, response.text[:500])


def test_the_fuzzing_ran_at_least_1000_cases() -> None:
    if calls["cases"] == 0:
        pytest.skip("run together with test_no_generated_request_gets_a_5xx")
    print(f"schemathesis: {calls['cases']} cases, statuses {dict(sorted(calls['by_status'].items()))}")
    assert calls["cases"] >= MIN_CASES
    assert sum(n for status, n in calls["by_status"].items() if 200 <= status < 300) > 0  # some got through


# --- the binary decoder -----------------------------------------------------------------------------

sensors = st.tuples(st.integers(1, 65535), st.integers(1, 65535))


@given(st.binary(max_size=13 * 40), sensors, st.integers(1, 50))
@settings(max_examples=400, deadline=None)
def test_arbitrary_bytes_decode_to_valid_events_or_raise_event_error_only(
    data: bytes, sensor, max_events
) -> None:
    try:
        events = events_from_bytes(data, sensor_size=sensor, max_events=max_events)
    except EventError:
        return
    assert len(data) == 13 * len(events) <= 13 * max_events
    assert np.all(np.diff(events["t"]) >= 0)
    assert np.all(events["x"] < sensor[0]) and np.all(events["y"] < sensor[1])


@st.composite
def event_arrays(draw, max_side: int = 65535) -> tuple[np.ndarray, tuple[int, int]]:
    """Valid events over the whole value ranges: any int64 times (sorted), any sensor up to ``max_side``."""
    width, height = draw(st.integers(1, max_side)), draw(st.integers(1, max_side))
    count = draw(st.integers(0, 60))
    events = np.zeros(count, dtype=EVENT_DTYPE)
    events["t"] = np.sort(
        np.array(
            draw(st.lists(st.integers(-(2**63), 2**63 - 1), min_size=count, max_size=count)), dtype=np.int64
        )
    )
    events["x"] = draw(st.lists(st.integers(0, width - 1), min_size=count, max_size=count))
    events["y"] = draw(st.lists(st.integers(0, height - 1), min_size=count, max_size=count))
    events["p"] = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    return events, (width, height)


@given(event_arrays())
@settings(max_examples=300, deadline=None)
def test_valid_events_round_trip_through_the_wire_format_at_any_value(drawn) -> None:
    events, sensor = drawn
    data = events_to_bytes(events)
    assert len(data) == len(events) * WIRE_DTYPE.itemsize
    back = events_from_bytes(data, sensor_size=sensor)
    np.testing.assert_array_equal(back, events)


# --- the streaming framer on hostile (valid) packets -------------------------------------------------


@given(
    event_arrays(max_side=1280),
    st.integers(1, 10**7),
    st.lists(st.integers(0, 60), max_size=6),
    st.booleans(),
)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_the_framer_takes_any_valid_packets_without_crashing_or_flooding(
    drawn, window_us, cuts, flush
) -> None:
    """Extreme times and gaps: frames are finite, correctly shaped, and at most (gap bound + 1) per event.

    Sensors up to the service's default ``max_sensor_size`` (1280): a resizing framer holds a W x H
    int64 pixel map, 32 GiB at 65535 x 65535, which is why the service bounds the sensor size."""
    events, sensor = drawn
    framer = StreamFramer(sensor, window_us=window_us, output_size=(16, 16))
    frames = []
    for part in np.split(events, sorted(c for c in cuts if c <= len(events))):
        try:
            frames += framer.push(part)
        except EventError:
            return
    if flush:
        frames += framer.flush()
    assert len(frames) <= (len(events) + 1) * (framer.max_gap_windows + 1)
    for frame in frames:
        assert frame.shape == (2, 16, 16) and np.isfinite(frame).all() and (frame >= 0).all()
    assert sum(float(f.sum()) for f in frames) <= len(events)
