"""The worker's model: a learner and its batcher built from the settings, and what names the model."""

from __future__ import annotations

import os
from typing import Any

import torch

from ndot_core import OnlineLearner, build_model
from service.metrics import ServiceMetrics
from service.settings import Settings
from service.worker.batcher import Batcher
from service.worker.sequences import SequenceLimits


def model_descriptor(settings: Settings) -> dict[str, Any]:
    """What a checkpoint must match to be loaded: model name, classes, channels, input size."""
    return {
        "name": settings.model,
        "num_classes": settings.num_classes,
        "in_channels": settings.in_channels,
        "input_size": list(settings.input_size),
    }


def build_batcher(settings: Settings, metrics: ServiceMetrics) -> Batcher:
    """Fresh weights (seeded) in an ``OnlineLearner``, behind a ``Batcher`` with the settings' limits."""
    s = settings
    if s.torch_threads:
        torch.set_num_threads(s.torch_threads)
    if s.compile_cache_dir:  # torch's compile caches (read when a bucket compiles)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = s.compile_cache_dir
    torch.manual_seed(s.seed)
    model = build_model(
        s.model, in_channels=s.in_channels, num_classes=s.num_classes, input_size=s.input_size
    )
    learner = OnlineLearner(
        model,
        rule=s.rule,
        mode=s.mode,
        optimizer=s.optimizer,
        lr=s.lr,
        momentum=s.momentum,
        alpha=s.alpha,
        steps_per_sample=s.steps_per_sample,
        device=s.torch_device(),
        backend=s.step_backend,
        compile=s.compile,
        cuda_graphs=s.cuda_graphs,
    )
    return Batcher(
        learner,
        s.max_streams,
        s.window_us,
        metrics,
        s.max_events_per_packet,
        max_failures=s.max_failures,
        max_sensor_size=s.max_sensor_size,
        max_gap_windows=s.max_gap_windows,
        max_packet_frames=s.max_packet_frames,
        max_window_events=s.max_window_events,
        max_stream_speed=s.max_stream_speed,
        learn_at=s.learn_at,
        sequence_limits=SequenceLimits(
            s.sequence_max_frames,
            s.sequence_max_bytes,
            s.sequences_held,
            replay_recent=s.replay_recent,
            replay_memory_bytes=s.replay_memory_bytes,
        ),
        prequential_window=s.prequential_window,
    )
