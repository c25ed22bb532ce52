"""Events → frames: agreement with tonic's ToFrame, resizing, and the streaming framer's policies."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.numpy import load as load_safetensors
from safetensors.numpy import save as save_safetensors

from ndot_core.events.framing import StreamFramer, flat_pixel_index, to_frames
from ndot_core.events.layout import EVENT_DTYPE, EventError, to_tonic
from ndot_core.events.readers import read_events


def make_events(t, x, y, p) -> np.ndarray:
    events = np.empty(len(t), dtype=EVENT_DTYPE)
    events["t"], events["x"], events["y"], events["p"] = t, x, y, p
    return events


def random_events(count: int, sensor=(20, 12), span_us=100_000, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return make_events(
        np.sort(rng.integers(0, span_us, count)),
        rng.integers(0, sensor[0], count),
        rng.integers(0, sensor[1], count),
        rng.integers(0, 2, count),
    )


@pytest.fixture(scope="module")
def digit(shared_data):
    events, sensor = read_events(shared_data / "recordings" / "nmnist-digit.bin")
    return events, sensor


def tonic_frames(events, sensor, **options):
    from tonic.transforms import ToFrame

    return ToFrame(sensor_size=(*sensor, 2), **options)(to_tonic(events))


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        ({"time_window_us": 10_000}, {"time_window": 10_000, "include_incomplete": True}),
        ({"time_window_us": 7_777}, {"time_window": 7_777, "include_incomplete": True}),
        ({"event_count": 1000}, {"event_count": 1000, "include_incomplete": True}),
        ({"n_event_bins": 5}, {"n_event_bins": 5}),  # 4325 events: 5 divides N
    ],
)
def test_equal_to_tonic_toframe_on_a_real_recording(digit, ours, theirs):
    events, sensor = digit
    assert (events["t"][-1] - events["t"][0]) % ours.get(
        "time_window_us", 1_000_003
    ) != 0  # tonic's boundary case
    expected = tonic_frames(events, sensor, **theirs)
    frames = to_frames(events, sensor, **ours)
    assert frames.dtype == np.float32 and frames.shape == expected.shape
    np.testing.assert_array_equal(frames, expected)


def test_n_time_bins_equal_to_tonic_but_keeps_its_dropped_tail(digit):
    events, sensor = digit
    expected = tonic_frames(events, sensor, n_time_bins=7)
    frames = to_frames(events, sensor, n_time_bins=7)
    np.testing.assert_array_equal(frames[:-1], expected[:-1])
    width = (events["t"][-1] - events["t"][0]) // 7
    tail = events[
        events["t"] >= events["t"][0] + 7 * width
    ]  # tonic drops these; we count them in the last bin
    assert len(tail) >= 1
    np.testing.assert_array_equal(frames[-1] - expected[-1], to_frames(tail, sensor, n_event_bins=1)[0])
    assert frames.sum() == len(events)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 300), st.integers(1, 9), st.integers(0, 2**31))
def test_every_rule_counts_every_event_once(count, bins, seed):
    events = random_events(count, seed=seed)
    for rule in (
        {"n_time_bins": bins},
        {"n_event_bins": bins},
        {"event_count": bins},
        {"time_window_us": 1000 * bins},
    ):
        frames = to_frames(events, (20, 12), **rule)
        assert frames.sum() == count, rule
        for p in (0, 1):
            assert frames[:, p].sum() == (events["p"] == p).sum()


def test_counts_land_on_their_pixel_and_polarity():
    events = make_events([0, 1, 2, 3], [4, 4, 0, 19], [2, 2, 11, 0], [1, 1, 0, 0])
    frames = to_frames(events, (20, 12), n_time_bins=1)
    assert frames.shape == (1, 2, 12, 20)
    assert frames[0, 1, 2, 4] == 2 and frames[0, 0, 11, 0] == 1 and frames[0, 0, 0, 19] == 1
    assert frames.sum() == 4
    binary = to_frames(events, (20, 12), n_time_bins=1, binary=True)
    np.testing.assert_array_equal(binary, (frames > 0).astype(np.float32))


def test_resize_by_an_integer_factor_is_sum_pooling():
    events = random_events(5000, sensor=(128, 128), seed=3)
    full = to_frames(events, (128, 128), n_event_bins=4)
    small = to_frames(events, (128, 128), n_event_bins=4, output_size=(64, 32))
    pooled = full.reshape(4, 2, 64, 2, 32, 4).sum(axis=(3, 5))
    np.testing.assert_array_equal(small, pooled)


def test_resize_by_a_fractional_factor_maps_each_sensor_pixel_to_its_nearest_block():
    events = random_events(3000, sensor=(128, 128), seed=4)
    small = to_frames(events, (128, 128), n_event_bins=2, output_size=(48, 48))
    expected = np.zeros_like(small)
    half = len(events) // 2
    for i, e in enumerate(events):
        expected[int(i >= half), int(e["p"]), e["y"] * 48 // 128, e["x"] * 48 // 128] += 1
    np.testing.assert_array_equal(small, expected)


def test_bad_arguments_raise_event_error():
    events = random_events(10)
    with pytest.raises(EventError, match="exactly one of"):
        to_frames(events, (20, 12), n_time_bins=2, event_count=3)
    with pytest.raises(EventError, match="exactly one of"):
        to_frames(events, (20, 12))
    with pytest.raises(EventError, match="positive integer"):
        to_frames(events, (20, 12), n_time_bins=0)
    with pytest.raises(EventError, match=r"event 2: \(x=20, y=0\) outside the 20x12 sensor"):
        to_frames(make_events([0, 1, 2], [0, 1, 20], [0, 0, 0], [0, 0, 0]), (20, 12), n_time_bins=1)
    with pytest.raises(EventError, match="gives 100000001 frames"):
        to_frames(make_events([0, 10**8], [0, 0], [0, 0], [0, 0]), (20, 12), time_window_us=1)
    with pytest.raises(EventError, match="event 2: t=1 decreases"):
        to_frames(make_events([0, 5, 1], [0, 1, 2], [0, 0, 0], [0, 0, 0]), (20, 12), time_window_us=2)


def test_empty_recordings():
    empty = np.zeros(0, dtype=EVENT_DTYPE)
    assert to_frames(empty, (20, 12), n_time_bins=3).shape == (3, 2, 12, 20)
    assert to_frames(empty, (20, 12), time_window_us=10).shape == (0, 2, 12, 20)


def test_flat_index_matches_its_formula():
    events = random_events(200, seed=5)
    index = flat_pixel_index(events, (20, 12))
    expected = events["p"].astype(np.int64) * 240 + events["y"].astype(np.int64) * 20 + events["x"]
    np.testing.assert_array_equal(index, expected)


# --- StreamFramer ---------------------------------------------------------------------------------

SMALL_SENSOR = (5, 4)


@st.composite
def event_sequences(draw):
    """Events on a 5x4 sensor whose t mostly rises, sometimes jumps far ahead or steps back (late events)."""
    count = draw(st.integers(0, 60))
    steps = draw(
        st.lists(
            st.one_of(st.integers(0, 300), st.integers(1000, 5000), st.integers(-400, -1)),
            min_size=count,
            max_size=count,
        )
    )
    start = draw(st.integers(-5000, 5000))
    t = start + np.cumsum(np.asarray(steps, dtype=np.int64))
    x = draw(st.lists(st.integers(0, 4), min_size=count, max_size=count))
    y = draw(st.lists(st.integers(0, 3), min_size=count, max_size=count))
    p = draw(st.lists(st.booleans(), min_size=count, max_size=count))
    return make_events(t, x, y, p)


@st.composite
def framer_options(draw):
    return {
        "window_us": draw(st.integers(1, 500)),
        "max_gap_windows": draw(st.integers(0, 4)),
        "binary": draw(st.booleans()),
        "origin_us": draw(st.integers(-100, 100)),
        "output_size": draw(st.sampled_from([None, (2, 3), (4, 5)])),
    }


def run_framer(framer: StreamFramer, events: np.ndarray, cuts: list[int]) -> list[np.ndarray]:
    frames = []
    for begin, end in zip([0, *cuts], [*cuts, len(events)], strict=True):
        frames += framer.push(events[begin:end])
    return frames + framer.flush()


def counters(framer: StreamFramer) -> tuple[int, int, int]:
    return framer.late_events, framer.skipped_windows, framer.frames_emitted


@settings(max_examples=150, deadline=None)
@given(event_sequences(), framer_options(), st.data())
def test_framer_output_does_not_depend_on_packet_cuts(events, options, data):
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), max_size=8)))
    whole = StreamFramer(SMALL_SENSOR, **options)
    expected = run_framer(whole, events, [])
    pieces = StreamFramer(SMALL_SENSOR, **options)
    frames = run_framer(pieces, events, cuts)
    assert len(frames) == len(expected)
    for ours, theirs in zip(frames, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert counters(pieces) == counters(whole)
    assert (
        sum(f.sum() for f in expected) <= len(events) - whole.late_events
        if options["binary"]
        else sum(f.sum() for f in expected) == len(events) - whole.late_events
    )


def state_through_files(state: dict) -> dict:
    """What a checkpoint does: arrays through safetensors, ints through JSON."""
    arrays = {k: v for k, v in state.items() if isinstance(v, np.ndarray)}
    scalars = {k: v for k, v in state.items() if not isinstance(v, np.ndarray)}
    restored = load_safetensors(save_safetensors(arrays))
    restored.update(json.loads(json.dumps(scalars)))
    return restored


@settings(max_examples=100, deadline=None)
@given(event_sequences(), framer_options(), st.data())
def test_framer_state_restores_exactly(events, options, data):
    cut = data.draw(st.integers(0, len(events)))
    reference = StreamFramer(SMALL_SENSOR, **options)
    expected = run_framer(reference, events, [cut])
    first = StreamFramer(SMALL_SENSOR, **options)
    frames = first.push(events[:cut])
    second = StreamFramer.from_state_dict(state_through_files(first.state_dict()))
    frames += second.push(events[cut:]) + second.flush()
    assert len(frames) == len(expected)
    for ours, theirs in zip(frames, expected, strict=True):
        np.testing.assert_array_equal(ours, theirs)
    assert counters(second) == counters(reference)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 400), st.integers(300, 5000), st.integers(0, 2**31))
def test_framer_equals_to_frames_on_a_sorted_recording(count, window_us, seed):
    events = random_events(count, seed=seed, span_us=200_000)
    framer = StreamFramer((20, 12), window_us=window_us, max_gap_windows=10**9)
    frames = run_framer(framer, events, list(range(0, count, 37)))
    start = events["t"][0] // window_us * window_us  # first window: first event's t floored to the grid
    np.testing.assert_array_equal(
        np.stack(frames), to_frames(events, (20, 12), time_window_us=window_us, start_time_us=int(start))
    )


def test_gap_policy_emits_at_most_max_gap_empty_frames():
    framer = StreamFramer(SMALL_SENSOR, window_us=10_000, max_gap_windows=3)
    assert framer.push(make_events([5, 9_999], [0, 1], [0, 0], [1, 1])) == []
    frames = framer.push(make_events([1_000_005], [2], [3], [0]))  # 99 empty windows in between
    assert len(frames) == 1 + 3
    assert frames[0].sum() == 2 and frames[0][1, 0, 0] == 1 and frames[0][1, 0, 1] == 1
    assert all(f.sum() == 0 for f in frames[1:])
    assert framer.skipped_windows == 96
    assert framer.window_start_us == 1_000_000
    last = framer.flush()
    assert len(last) == 1 and last[0][0, 3, 2] == 1
    assert framer.flush() == [] and framer.frames_emitted == 5


def test_late_events_are_dropped_and_counted_but_in_window_disorder_is_kept():
    framer = StreamFramer(SMALL_SENSOR, window_us=100)
    framer.push(make_events([150, 120], [0, 1], [0, 0], [0, 0]))  # out of order inside window [100, 200)
    frames = framer.push(make_events([210, 99, 180, 205], [2, 3, 4, 4], [1, 1, 1, 1], [1, 1, 1, 1]))
    assert framer.late_events == 2  # t=99 and t=180 arrive after the clock reached window [200, 300)
    assert len(frames) == 1 and frames[0].sum() == 2
    (last,) = framer.flush()
    assert last.sum() == 2 and last[1, 1, 2] == 1 and last[1, 1, 4] == 1


def test_flush_starts_a_fresh_sequence():
    framer = StreamFramer(SMALL_SENSOR, window_us=100, max_gap_windows=100)
    framer.push(make_events([1_000], [0], [0], [0]))
    assert len(framer.flush()) == 1
    assert framer.push(make_events([50], [0], [0], [0])) == []  # earlier t, yet not late: new sequence
    assert framer.late_events == 0 and framer.window_start_us == 0
    assert framer.pending_events == 1


def test_framer_output_shape_and_resize():
    framer = StreamFramer((128, 128), window_us=1000, output_size=(48, 48))
    frames = framer.push(random_events(2000, sensor=(128, 128), span_us=5000, seed=9))
    assert framer.frame_shape == (48, 48)
    assert all(f.shape == (2, 48, 48) and f.dtype == np.float32 for f in frames)


def test_framer_rejects_events_outside_its_sensor_and_bad_state():
    framer = StreamFramer(SMALL_SENSOR)
    with pytest.raises(EventError, match=r"event 0: \(x=5, y=0\) outside the 5x4 sensor"):
        framer.push(make_events([0], [5], [0], [0]))
    state = framer.state_dict()
    state["pending_index"] = np.array([40], dtype=np.int64)
    with pytest.raises(EventError, match="pending_index outside"):
        StreamFramer.from_state_dict(state)
    del state["window_us"]
    with pytest.raises(EventError, match="lacks 'window_us'"):
        StreamFramer.from_state_dict(state)


def _spread_packet(count: int, spacing_us: int, start_us: int = 0) -> np.ndarray:
    events = np.zeros(count, dtype=EVENT_DTYPE)
    events["t"] = start_us + spacing_us * np.arange(count)
    return events


@pytest.mark.parametrize("max_gap", [0, 3, 100])
def test_max_frames_counts_exactly_what_a_push_would_emit(max_gap: int) -> None:
    """The dry-run count equals the frames a push emits, from any state: fresh, mid-window, after gaps."""
    rng = np.random.default_rng(max_gap)
    for _ in range(20):
        framer = StreamFramer((34, 34), window_us=1_000, max_gap_windows=max_gap)
        clock = 0
        for _ in range(5):
            times = np.sort(clock + rng.integers(0, 20_000, rng.integers(1, 30)))
            clock = int(times[-1])
            packet = np.zeros(len(times), dtype=EVENT_DTYPE)
            packet["t"] = times
            expected = len(StreamFramer.from_state_dict(framer.state_dict()).push(packet))
            if expected:
                with pytest.raises(EventError, match=f"would close {expected} windows"):
                    framer.push(packet, max_frames=expected - 1)
            assert len(framer.push(packet, max_frames=expected)) == expected


def test_a_refused_packet_changes_nothing() -> None:
    framer = StreamFramer((34, 34), window_us=10_000)
    framer.push(_spread_packet(3, 1_000))
    before = framer.state_dict()
    hostile = _spread_packet(30, 1_000_000, start_us=5_000)  # 30 events, 1 s apart: ~3,000 frames
    with pytest.raises(EventError, match="at most 50 per packet"):
        framer.push(hostile, max_frames=50)
    after = framer.state_dict()
    assert before.keys() == after.keys()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def same_state(a: StreamFramer, b: StreamFramer) -> bool:
    left, right = a.state_dict(), b.state_dict()
    return left.keys() == right.keys() and all(np.array_equal(left[k], right[k]) for k in left)


@settings(max_examples=150, deadline=None)
@given(event_sequences(), framer_options(), st.data())
def test_max_window_events_refuses_exactly_the_packets_that_would_pass_it(events, options, data):
    """From any state, a packet is refused (nothing changes) exactly when the window it leaves open would
    hold more than the bound, on the fast path (all in the open window) and the slow one alike."""
    cuts = sorted(data.draw(st.lists(st.integers(0, len(events)), max_size=8)))
    most = data.draw(st.integers(0, 30))
    framer = StreamFramer(SMALL_SENSOR, **options)
    for begin, end in zip([0, *cuts], [*cuts, len(events)], strict=True):
        free = StreamFramer.from_state_dict(framer.state_dict())  # the same push without the bound
        frames = free.push(events[begin:end])
        if free.pending_events > most:
            before = StreamFramer.from_state_dict(framer.state_dict())
            with pytest.raises(EventError, match=f"would hold {free.pending_events} events, at most {most}"):
                framer.push(events[begin:end], max_window_events=most)
            assert same_state(framer, before)
        else:
            got = framer.push(events[begin:end], max_window_events=most)
            assert len(got) == len(frames) and same_state(framer, free)
        assert framer.pending_events <= most


@settings(max_examples=100, deadline=None)
@given(event_sequences(), framer_options(), st.data())
def test_restore_undoes_pushes_and_flushes_after_the_snapshot(events, options, data):
    """``snapshot`` / ``restore`` (the worker's undo of a packet that failed): the state before, exactly,
    whatever pushes (window changes, late events) and flushes came in between."""
    cut, later = sorted(data.draw(st.lists(st.integers(0, len(events)), min_size=2, max_size=2)))
    framer = StreamFramer(SMALL_SENSOR, **options)
    framer.push(events[:cut])
    expected = StreamFramer.from_state_dict(framer.state_dict())
    snapshot = framer.snapshot()
    framer.push(events[cut:later])
    if data.draw(st.booleans()):
        framer.flush()
    framer.push(events[later:])
    framer.restore(snapshot)
    assert same_state(framer, expected) and counters(framer) == counters(expected)
    assert [f.tolist() for f in framer.push(events[cut:]) + framer.flush()] == [
        f.tolist() for f in expected.push(events[cut:]) + expected.flush()
    ]


def test_many_one_event_packets_in_one_window_keep_few_parts_and_undo_across_a_join() -> None:
    """1,000 packets of one event in one open window: a few arrays held, not 1,000 (each push's cost and
    memory stay bounded); a restore across a join is exact; the frame is that of one packet."""
    from ndot_core.events.framing import MAX_PENDING_PARTS

    events = random_events(1_000, sensor=SMALL_SENSOR, span_us=900, seed=3)
    events["t"] = np.sort(events["t"])
    framer, whole = StreamFramer(SMALL_SENSOR, window_us=1_000), StreamFramer(SMALL_SENSOR, window_us=1_000)
    for k in range(600):
        framer.push(events[k : k + 1])
    expected = StreamFramer.from_state_dict(framer.state_dict())
    snapshot = framer.snapshot()
    for k in range(600, 1_000):  # one join at least on the way
        framer.push(events[k : k + 1])
    assert len(framer._pending) <= MAX_PENDING_PARTS and framer.pending_events == 1_000
    after = StreamFramer.from_state_dict(framer.state_dict())
    framer.restore(snapshot)
    assert same_state(framer, expected) and framer.pending_events == 600
    for k in range(600, 1_000):
        framer.push(events[k : k + 1])
    assert same_state(framer, after)
    whole.push(events)
    np.testing.assert_array_equal(framer.flush()[0], whole.flush()[0])


def test_windows_spanned_is_the_packets_own_window_count() -> None:
    from ndot_core.events.framing import windows_spanned

    assert windows_spanned(np.array([], dtype=np.int64), 10_000) == 0
    assert windows_spanned(np.array([5, 9_999]), 10_000) == 0
    assert windows_spanned(np.array([9_999, 10_000]), 10_000) == 1
    assert windows_spanned(_spread_packet(30, 1_000_000)["t"], 10_000) == 2_900
