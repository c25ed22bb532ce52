"""The event layout: wire decoding, JSON columns, validation messages, library layout conversions."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ndot_core.events.layout import (
    EVENT_DTYPE,
    WIRE_DTYPE,
    EventError,
    as_event_array,
    events_from_bytes,
    events_from_columns,
    events_to_bytes,
    from_aedat,
    from_expelliarmus,
    from_tonic,
    to_tonic,
    validate_events,
)

SENSOR = (34, 34)


def make_events(t, x, y, p) -> np.ndarray:
    events = np.empty(len(t), dtype=EVENT_DTYPE)
    events["t"], events["x"], events["y"], events["p"] = t, x, y, p
    return events


def wire(t, x, y, p) -> bytes:
    records = np.empty(len(t), dtype=WIRE_DTYPE)
    records["t"], records["x"], records["y"], records["p"] = t, x, y, p
    return records.tobytes()


def test_layouts_are_packed_13_bytes():
    assert EVENT_DTYPE.itemsize == WIRE_DTYPE.itemsize == 13
    assert EVENT_DTYPE.names == WIRE_DTYPE.names == ("t", "x", "y", "p")


@settings(max_examples=50, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 10**6), st.integers(0, 33), st.integers(0, 33), st.booleans()), max_size=50
    )
)
def test_bytes_round_trip(rows):
    rows = sorted(rows)
    events = make_events(*zip(*rows, strict=True)) if rows else np.zeros(0, dtype=EVENT_DTYPE)
    body = events_to_bytes(events)
    assert len(body) == 13 * len(events)
    decoded = events_from_bytes(body, SENSOR)
    assert decoded.dtype == EVENT_DTYPE
    np.testing.assert_array_equal(decoded, events)


def test_decoded_bytes_are_a_read_only_view():
    decoded = events_from_bytes(wire([1, 2], [0, 1], [0, 1], [1, 0]), SENSOR)
    assert not decoded.flags.writeable
    assert decoded["p"].tolist() == [True, False]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (wire([1, 2], [0, 1], [0, 1], [1, 0]) + b"\x00" * 5, "31 bytes is not a multiple of the 13-byte"),
        (wire([1, 2, 3], [0, 1, 2], [0, 1, 2], [1, 2, 0]), "event 1: p=2"),
        (wire([1, 2, 3], [0, 34, 2], [0, 1, 2], [1, 1, 0]), "event 1: x=34 outside the sensor"),
        (wire([1, 2, 3], [0, 1, 2], [0, 1, 40], [1, 1, 0]), "event 2: y=40 outside the sensor"),
        (wire([5, 7, 6], [0, 1, 2], [0, 1, 2], [1, 1, 0]), "event 2: t=6 decreases (previous t=7)"),
    ],
)
def test_bytes_rejected_with_index_and_value(body, expected):
    with pytest.raises(EventError, match=expected.replace("(", r"\(").replace(")", r"\)")):
        events_from_bytes(body, SENSOR)


def test_bytes_over_max_events_rejected_before_decoding():
    body = wire([1, 2, 3], [0, 1, 2], [0, 1, 2], [1, 1, 0])
    with pytest.raises(EventError, match="3 events, more than max_events=2"):
        events_from_bytes(body, SENSOR, max_events=2)
    assert len(events_from_bytes(body, SENSOR, max_events=3)) == 3


def test_t_min_bound():
    with pytest.raises(EventError, match="event 0: t=1 before t_min=2"):
        events_from_bytes(wire([1, 2], [0, 0], [0, 0], [0, 0]), SENSOR, t_min=2)


def test_columns_build_the_internal_layout():
    events = events_from_columns({"t": [1, 2, 2], "x": [0, 33, 5], "y": [3, 3, 0], "p": [1, 0, True]}, SENSOR)
    np.testing.assert_array_equal(events, make_events([1, 2, 2], [0, 33, 5], [3, 3, 0], [1, 0, 1]))


@pytest.mark.parametrize(
    ("columns", "expected"),
    [
        ({"t": [1], "x": [0], "y": [0]}, r"missing \['p'\]"),
        ({"t": [1, 2], "x": [0], "y": [0, 0], "p": [0, 1]}, "columns differ in length"),
        ({"t": [1, 2.5], "x": [0, 0], "y": [0, 0], "p": [0, 1]}, "event 1: t=2.5 is not an integer"),
        ({"t": [1, 2**63], "x": [0, 0], "y": [0, 0], "p": [0, 1]}, "event 1: t=9223372036854775808 outside"),
        ({"t": [1, 2], "x": [0, -1], "y": [0, 0], "p": [0, 1]}, r"event 1: x=-1 outside \[0, 33\]"),
        ({"t": [1, 2], "x": [0, 0], "y": [0, "a"], "p": [0, 1]}, "event 1: y='a' is not an integer"),
        ({"t": [1, 2], "x": [0, 0], "y": [0, 0], "p": [0, 3]}, r"event 1: p=3 outside \[0, 1\]"),
        ({"t": [3, 2], "x": [0, 0], "y": [0, 0], "p": [0, 1]}, "event 1: t=2 decreases"),
        ({"t": [[1], [2]], "x": [0, 0], "y": [0, 0], "p": [0, 1]}, "must be a flat list"),
    ],
)
def test_columns_rejected_with_index_and_value(columns, expected):
    with pytest.raises(EventError, match=expected):
        events_from_columns(columns, SENSOR)


def test_columns_over_max_events():
    with pytest.raises(EventError, match="more than max_events=1"):
        events_from_columns({"t": [1, 2], "x": [0, 0], "y": [0, 0], "p": [0, 1]}, SENSOR, max_events=1)


def test_validate_requires_fields_and_sensor_size():
    with pytest.raises(EventError, match="missing"):
        validate_events(np.zeros(3, dtype=[("t", "<i8"), ("x", "<u2")]), SENSOR)
    with pytest.raises(EventError, match="sensor_size"):
        validate_events(np.zeros(0, dtype=EVENT_DTYPE), (0, 34))
    with pytest.raises(EventError, match="1-D"):
        validate_events(np.zeros((2, 2), dtype=EVENT_DTYPE), SENSOR)


TONIC_LAYOUT = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "?")])
AEDAT_LAYOUT = np.dtype([("t", "<u8"), ("x", "<u2"), ("y", "<u2"), (("p", "on"), "?")])
EXPELLIARMUS_LAYOUT = np.dtype(
    {
        "names": ["t", "x", "y", "p"],
        "formats": ["<i8", "<i2", "<i2", "u1"],
        "offsets": [0, 8, 10, 12],
        "itemsize": 16,
        "aligned": True,
    }
)


@pytest.mark.parametrize(
    ("convert", "layout"),
    [(from_tonic, TONIC_LAYOUT), (from_aedat, AEDAT_LAYOUT), (from_expelliarmus, EXPELLIARMUS_LAYOUT)],
)
def test_library_layouts_convert(convert, layout):
    source = np.zeros(3, dtype=layout)
    source["t"], source["x"], source["y"], source["p"] = [10, 20, 30], [1, 2, 3], [4, 5, 6], [1, 0, 1]
    events = convert(source, SENSOR)
    assert events.dtype == EVENT_DTYPE
    np.testing.assert_array_equal(events, make_events([10, 20, 30], [1, 2, 3], [4, 5, 6], [1, 0, 1]))


def test_conversion_rejects_values_that_do_not_fit():
    source = np.zeros(2, dtype=TONIC_LAYOUT)
    source["x"] = [3, -2]
    with pytest.raises(EventError, match="event 1: x=-2 below 0"):
        as_event_array(source)
    aedat = np.zeros(2, dtype=AEDAT_LAYOUT)
    aedat["t"] = [1, 2**63]
    with pytest.raises(EventError, match="event 1: t=9223372036854775808 above"):
        as_event_array(aedat)
    source["x"] = [3, 40]
    with pytest.raises(EventError, match="event 1: x=40 outside the sensor"):
        from_tonic(source, SENSOR)


def test_to_tonic_round_trip():
    events = make_events([1, 5], [2, 3], [4, 5], [0, 1])
    converted = to_tonic(events)
    assert converted.dtype == TONIC_LAYOUT
    np.testing.assert_array_equal(from_tonic(converted), events)


EVENT_MODULES = (
    "events/__init__",
    "events/layout",
    "events/framing",
    "events/readers",
    "events/datasets",
    "experiments/cifar",
    "experiments/augment",
)


def test_event_modules_load_no_heavy_library_at_import():
    """tonic / expelliarmus / aedat load lazily; torch is never imported by these modules themselves."""
    code = (
        "import sys\n"
        + "".join(f"import ndot_core.{m.replace('/__init__', '').replace('/', '.')}\n" for m in EVENT_MODULES)
        + "print(sorted(m for m in ('tonic', 'expelliarmus', 'aedat') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
    package = Path(__file__).resolve().parent.parent / "ndot_core"
    for module in EVENT_MODULES:
        tree = ast.parse((package / f"{module}.py").read_text())
        top_level = [node for node in tree.body if isinstance(node, ast.Import | ast.ImportFrom)]
        names = {
            alias.name.split(".")[0]
            for node in top_level
            if isinstance(node, ast.Import)
            for alias in node.names
        }
        names |= {(node.module or "").split(".")[0] for node in top_level if isinstance(node, ast.ImportFrom)}
        assert not names & {"torch", "tonic", "expelliarmus", "aedat"}, module
