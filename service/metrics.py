"""Prometheus metrics of the service, defined in one place (names fixed by docs/design.md).

Each ``ServiceMetrics`` owns its own ``CollectorRegistry`` (with the process and platform
collectors, so ``process_resident_memory_bytes`` is there too) instead of the library's global
one: an API and a worker built in the same process share one instance, and tests can build as
many as they like. No stream ids appear as labels.

Who increments what: the API counts packets ``accepted`` / ``rejected`` / ``throttled`` (bus
backpressure or the per-key rate limit), requests refused before their route
(``ndot_requests_refused_total{reason}``), the POST -> prediction latency and the open live views;
the worker counts everything it applies (events, steps, predictions, step and prequential accuracy,
sequences by outcome, streams, bus lag,
memory, model version, step duration, the time of its last round), each failed attempt at a packet
(``failed``), each packet moved to the dead-letter stream (``dead_lettered``), each entry skipped
as applied before and each checkpoint file or write that failed
(``ndot_checkpoint_errors_total{stage}``). Both count the bus calls that failed
(``ndot_bus_errors_total{side, kind}``): Redis unreachable, refusing writes (OOM, MISCONF,
READONLY, ...) or answering an unexpected error.
"""

from __future__ import annotations

from collections import deque

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)

#: Sub-millisecond to seconds: 50 µs .. 10 s.
LATENCY_BUCKETS_S = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.00075,
    0.001,
    0.0025,
    0.005,
    0.0075,
    0.01,
    0.025,
    0.05,
    0.075,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)

PACKET_OUTCOMES = ("accepted", "rejected", "applied", "failed", "dead_lettered", "throttled")
STEP_KINDS = ("learn", "infer")
#: What became of a sequence under learn_at=sequence (``ndot_sequences_total{outcome}``).
SEQUENCE_OUTCOMES = ("scored", "learned", "too_long", "incomplete", "unlabelled", "abandoned", "failed")
#: Why the API refused a request before it reached a route's own checks (auth, rate limit, body size).
REFUSAL_REASONS = ("unauthenticated", "forbidden", "rate_limited", "too_large")
#: Where a checkpoint failed: a file unreadable when listed, refused at restore, a write, deleting old
#: ones, the checkpoint written on SIGTERM.
CHECKPOINT_STAGES = ("list", "restore", "save", "prune", "shutdown")
#: Who met a bus failure, and which (``BusError.kind``): no connection, a refusal, an unexpected error answer.
BUS_ERROR_SIDES = ("api", "worker")
BUS_ERROR_KINDS = ("unreachable", "refused", "error")


class ServiceMetrics:
    """The metric objects of one process, in one registry."""

    def __init__(self, accuracy_window: int = 500, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        r = self.registry
        self.events = Counter("ndot_events", "Events applied to stream framers.", registry=r)
        self.packets = Counter("ndot_packets", "Event packets by outcome.", ["outcome"], registry=r)
        self.refused = Counter(
            "ndot_requests_refused",
            "HTTP requests refused by auth, the rate limit or the body limit.",
            ["reason"],
            registry=r,
        )
        self.steps = Counter(
            "ndot_steps",
            "Network time-steps by kind: learn = steps that learned from a label (learn_at=sequence: the "
            "replayed steps), infer = steps that only predicted.",
            ["kind"],
            registry=r,
        )
        self.predictions = Counter("ndot_predictions", "Predictions returned.", registry=r)
        self.correct_predictions = Counter(
            "ndot_correct_predictions", "Predictions of labelled steps that matched the label.", registry=r
        )
        self.online_accuracy = Gauge(
            "ndot_online_accuracy",
            f"Step-level accuracy over the last {accuracy_window} labelled time-steps, each predicted before "
            "its own update. With learn_at=step a sample's later steps follow updates on its earlier steps "
            "(optimistic); ndot_prequential_accuracy is the sample-level test-then-train figure.",
            registry=r,
        )
        self.prequential_accuracy = Gauge(
            "ndot_prequential_accuracy",
            "Sample-level test-then-train accuracy over the last scored sequences (learn_at=sequence): "
            "each sequence's prediction at its end, made before any learning from its label (NaN until one "
            "is scored).",
            registry=r,
        )
        self.prequential_accuracy.set(float("nan"))
        self.sequences = Counter(
            "ndot_sequences",
            "Labelled sequences of learn_at=sequence by outcome: scored (prediction met its label), learned "
            "(replayed with its label), too_long (over the frames or bytes bound: scored, not learned), "
            "incomplete (begun before a restore without its frames: scored, not learned), unlabelled (dropped "
            "without a label), abandoned (cut by a stream or model reset), failed (replay failed).",
            ["outcome"],
            registry=r,
        )
        self.active_streams = Gauge("ndot_active_streams", "Live streams held by the worker.", registry=r)
        self.streams_evicted = Counter(
            "ndot_streams_evicted", "Streams evicted (least recently used) to stay under the cap.", registry=r
        )
        self.late_events = Counter(
            "ndot_late_events", "Events older than their stream's open frame window (dropped).", registry=r
        )
        self.bus_lag = Gauge("ndot_bus_lag", "Bus entries not yet applied.", registry=r)
        self.device_memory_bytes = Gauge(
            "ndot_device_memory_bytes", "Bytes held by the torch device allocator (0 on CPU).", registry=r
        )
        self.model_version = Gauge("ndot_model_version", "Optimizer steps taken by the model.", registry=r)
        self.worker_heartbeat = Gauge(
            "ndot_worker_heartbeat_timestamp_seconds",
            "Unix time of the worker's last round sent to the bus (0 in a process without a worker).",
            registry=r,
        )
        self.live_viewers = Gauge(
            "ndot_live_viewers",
            "Live views (GET /v1/streams/{id}/live) open on this API process.",
            registry=r,
        )
        self.entries_skipped = Counter(
            "ndot_entries_skipped",
            "Bus entries skipped as applied before (at or below the worker's watermark).",
            registry=r,
        )
        self.learning_failures = Counter(
            "ndot_learning_failures",
            "Learner steps whose learning, run after their answers (answer_before_learning), failed and was "
            "dropped (the answers stand, the weights are as before that step).",
            registry=r,
        )
        self.checkpoint_errors = Counter(
            "ndot_checkpoint_errors",
            "Checkpoint files skipped as unreadable and checkpoint writes that failed, by stage.",
            ["stage"],
            registry=r,
        )
        self.bus_errors = Counter(
            "ndot_bus_errors",
            "Bus calls that failed, by side (api, worker) and kind (unreachable; refused: Redis up but "
            "refusing, e.g. OOM, MISCONF, READONLY; error: an unexpected error answer).",
            ["side", "kind"],
            registry=r,
        )
        self.step_duration = Histogram(
            "ndot_step_duration_seconds",
            "Duration of one batched learner step.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.prediction_latency = Histogram(
            "ndot_prediction_latency_seconds",
            "POST received -> its predictions returned.",
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        for outcome in PACKET_OUTCOMES:
            self.packets.labels(outcome=outcome)
        for kind in STEP_KINDS:
            self.steps.labels(kind=kind)
        for reason in REFUSAL_REASONS:
            self.refused.labels(reason=reason)
        for outcome in SEQUENCE_OUTCOMES:
            self.sequences.labels(outcome=outcome)
        for stage in CHECKPOINT_STAGES:
            self.checkpoint_errors.labels(stage=stage)
        for side in BUS_ERROR_SIDES:
            for kind in BUS_ERROR_KINDS:
                self.bus_errors.labels(side=side, kind=kind)
        self._recent_correct: deque[bool] = deque(maxlen=accuracy_window)
        self._recent_correct_count = 0
        self._recent_sequences: deque[bool] = deque(maxlen=100)

    def set_prequential_window(self, size: int) -> None:
        """Average ``ndot_prequential_accuracy`` over the last ``size`` scored sequences (from now on)."""
        self._recent_sequences = deque(self._recent_sequences, maxlen=size)

    def record_sequence(self, correct: bool) -> None:
        """Count one scored sequence (its prediction, made before learning from it, against its label)."""
        self.sequences.labels(outcome="scored").inc()
        self._recent_sequences.append(correct)
        self.prequential_accuracy.set(sum(self._recent_sequences) / len(self._recent_sequences))

    def bus_error(self, side: str, kind: str) -> None:
        """Count one failed bus call (``kind`` = ``BusError.kind``; others, such as ``full``, are not failures)."""
        if kind in BUS_ERROR_KINDS:
            self.bus_errors.labels(side=side, kind=kind).inc()

    def record_prediction(self, correct: bool | None) -> None:
        """Count one prediction; ``correct`` is None for an unlabelled step."""
        self.predictions.inc()
        if correct is None:
            return
        if correct:
            self.correct_predictions.inc()
        window = self._recent_correct
        if len(window) == window.maxlen:
            self._recent_correct_count -= window[0]
        window.append(correct)
        self._recent_correct_count += correct
        self.online_accuracy.set(self._recent_correct_count / len(window))

    def exposition(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
