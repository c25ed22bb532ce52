"""A stream's pace: at most ``speed`` times its camera's real time once its burst is spent."""

from __future__ import annotations

import numpy as np
import pytest

from ndot_core import OnlineLearner, build_model
from service.metrics import ServiceMetrics
from service.worker.batcher import STEP, Batcher, PendingStep
from service.worker.pace import Pace


def test_a_bucket_gives_its_burst_then_the_rate() -> None:
    pace = Pace(speed=2.0, window_us=20_000, burst=3)  # 100 frames/s
    assert [pace.take("s", 10.0) for _ in range(4)] == [True, True, True, False]
    assert pace.wait_s(["s"], 10.0) == pytest.approx(0.01)
    assert not pace.take("s", 10.005) and pace.take("s", 10.0101)
    assert pace.take("other", 10.0)  # buckets are per stream
    assert pace.wait_s([], 10.0) == 0.0
    unlimited = Pace(speed=0, window_us=20_000, burst=3)
    assert all(unlimited.take("s", 0.0) for _ in range(1000)) and unlimited.wait_s(["s"], 0.0) == 0.0


def test_a_flooded_stream_waits_for_its_pace_and_the_others_do_not() -> None:
    model = build_model("stream_cnn", in_channels=2, num_classes=10, input_size=(34, 34))
    batcher = Batcher(
        OnlineLearner(model, backend="local"),
        capacity=4,
        window_us=20_000,
        metrics=ServiceMetrics(),
        max_packet_frames=5,
        max_stream_speed=1.0,  # 50 frames/s after a burst of 5
    )
    batcher.clock = lambda: 1000.0  # the pace's clock stands still: no token comes back within the round
    flood, camera = batcher.open("flood", 34, 34)[0], batcher.open("camera", 34, 34)[0]
    frame = np.zeros((2, 34, 34), dtype=np.float32)
    for k in range(40):
        flood.pending.append((STEP, PendingStep(frame, None, f"1-{k}")))
        batcher.remaining[f"1-{k}"] += 1
    for k in range(8):
        camera.pending.append((STEP, PendingStep(frame, None, f"2-{k}")))
        batcher.remaining[f"2-{k}"] += 1
    batcher.drain(max_ticks=8)  # a paced round: both streams spend their burst of 5, then only time helps
    assert len(camera.pending) == 3 and len(flood.pending) == 35
    assert 0 < batcher.wait_s() <= 0.02
    batcher.drain()  # a draining round (control entry, checkpoint, recovery) is not paced
    assert not flood.pending and not camera.pending and flood.steps == 40
