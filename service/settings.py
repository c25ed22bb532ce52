"""Every knob of the online service, read once from env vars (and CLI flags) and passed down.

Env vars carry the prefix ``NDOT_`` (``NDOT_MAX_STREAMS=32``), except ``REDIS_URL``, which is read
without a prefix as is customary (``NDOT_REDIS_URL`` works too). Nothing else in the service reads
the environment: ``Settings`` is built once by ``service.cli`` (or a test) and handed to the API,
the bus and the worker.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """Configuration of the API, the bus and the worker (env prefix ``NDOT_``)."""

    model_config = SettingsConfigDict(env_prefix="NDOT_", extra="ignore", validate_default=True)

    # --- bus -------------------------------------------------------------------------------------
    redis_url: str | None = Field(
        None,
        validation_alias=AliasChoices("REDIS_URL", "NDOT_REDIS_URL", "redis_url"),
        description="Redis URL of the Redis Streams bus (env REDIS_URL); unset = the embedded in-process bus.",
    )
    bus_stream: str = Field("ndot:events", description="Redis stream key the packets travel on.")
    bus_group: str = Field("ndot-workers", description="Consumer group the worker reads with.")
    bus_max_lag: int = Field(
        2000, ge=1, description="Entries not yet applied above which POSTs answer 503 + Retry-After."
    )
    bus_retry_after_s: float = Field(
        1.0, gt=0, description="Retry-After (s) advised when the bus pushes back."
    )
    bus_maxlen: int = Field(
        100_000,
        ge=1,
        description="Entries the stream keeps at most: the oldest applied ones are trimmed past it (never an "
        "unread or pending one).",
    )
    bus_max_bytes: int = Field(
        512 * 1024 * 1024,
        ge=1,
        description="Bytes of entries the bus holds at most (events, fields and envelope). Applied entries are "
        "trimmed to make room; while entries not yet applied fill it, POSTs answer 503 + Retry-After. 512 MiB "
        "holds the whole lag bound (2000) of 10k-event packets (130 KB) twice over, and caps 16 MiB bodies "
        "at 32. Must be >= 2 x max_body_bytes; Redis's maxmemory must leave room above it (docs/deploy.md).",
    )
    shards: int = Field(
        64,
        ge=1,
        le=4096,
        description="Redis bus only: streams are spread over this many shard streams (crc32(stream id) % "
        "shards), whole shards are owned by one worker rank each. Fixed for a deployment's life: its bus "
        "history and checkpoints are per shard. The bus bounds (max_lag, maxlen, max_bytes) hold per shard "
        "(docs/scale-out.md). The embedded bus has one shard.",
    )

    # --- scale-out: worker ranks under torchrun -------------------------------------------------
    sync_mode: Literal["average", "grad"] = Field(
        "average",
        description="How worker ranks keep one model: 'average' (parameters averaged every "
        "sync_every_ticks ticks: periodic model averaging) or 'grad' (gradients all-reduced every tick: "
        "the same updates as one worker holding every stream).",
    )
    sync_every_ticks: int = Field(
        10, ge=1, description="Ticks between parameter averages (sync_mode average)."
    )
    cluster_backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="torch.distributed backend of the ranks: auto = nccl on cuda, else gloo."
    )
    cluster_timeout_s: float = Field(
        300.0, gt=0, description="Seconds a rank waits for the others at a rendezvous or a collective."
    )

    # --- model and learning ---------------------------------------------------------------------
    model: str = Field("stream_cnn", description="Model name for ndot_core.build_model.")
    num_classes: int = Field(10, ge=2, description="Number of classes K; labels must lie in [0, K).")
    in_channels: int = Field(2, ge=1, description="Input channels of a frame (2 = ON/OFF polarity).")
    input_width: int = Field(34, ge=1, description="Frame width the model takes; sensors are resized to it.")
    input_height: int = Field(34, ge=1, description="Frame height the model takes.")
    rule: Literal["ndot", "ndot_reference", "ottt"] = Field(
        "ndot", description="Temporal dependency rule of the online update."
    )
    mode: Literal["online", "accumulate"] = Field(
        "online", description="NDOT_O (online: update every labelled step) or NDOT_A (accumulate)."
    )
    steps_per_sample: int = Field(
        15,
        ge=1,
        description="T of the loss (each step's loss is divided by it) and labelled steps per weight "
        "update in accumulate mode (NDOT_A); ~ steps in one sample: a 0.3 s N-MNIST digit at 20 ms windows.",
    )
    optimizer: Literal["sgd", "adam"] = Field(
        "adam",
        description="Optimizer of the online learner. Adam learns N-MNIST online from a few hundred "
        "samples; SGD at one step per frame and 1-4 rows a batch mostly chases the current label "
        "(benchmarks/online_nmnist.py).",
    )
    lr: float | None = Field(
        2e-4,
        gt=0,
        description="Learning rate, tuned for Adam (benchmarks/online_nmnist.py); None = the learner's "
        "(0.1 SGD, 1e-3 Adam). With sgd set it too (~0.03).",
    )
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    alpha: float = Field(0.1, ge=0, le=1, description="Weight of the per-step loss term (Eq. 13).")
    seed: int = Field(0, description="Seed of the initial (and reset) weights.")
    device: str = Field("auto", description='Torch device: "auto" = cuda when available, else cpu.')
    step_backend: Literal["autograd", "local", "auto"] = Field(
        "auto",
        description="How the learner computes a step: 'autograd' (the reference), 'local' (a hand-written "
        "backward of the current step, no autograd graph, fused optimizer; the same gradients, "
        "tests/test_local_step.py) or 'auto' (local where the rule and model allow it).",
    )
    compile: Literal["off", "on", "auto"] = Field(
        "off",
        description="torch.compile the local step, graphs by batch shape (ndot_core.engine.compiled_step; "
        "~1.4x faster at batch 8 on one core, rows stepped in place: ~1.15x the frames a worker answers "
        "at 16 cameras): 'on', 'auto' (where the local backend runs and a compiler is installed) or "
        "'off'. Graphs compile in the background while the eager step serves; a compile error logs one "
        "warning and stays eager.",
    )
    cuda_graphs: Literal["off", "on", "auto"] = Field(
        "auto",
        description="Replay the local step as CUDA graphs, one per bucket of rows (1, 2, 4, .., 1024), the "
        "state in static buffers (ndot_core.engine.graph_step): 'auto' (on a GPU with the local backend; "
        "it then takes the place of compile), 'on' (an error elsewhere) or 'off'. A capture error logs "
        "one warning and stays eager.",
    )
    compile_cache_dir: str | None = Field(
        None,
        description="Directory of torch's compile caches (sets TORCHINDUCTOR_CACHE_DIR; None = torch's "
        "default under /tmp): on a volume, a restart compiles a bucket in seconds, not a minute.",
    )
    torch_threads: int = Field(
        1,
        ge=0,
        description="CPU threads of the learner's torch ops (0 = torch's default, one per core); "
        "1 leaves the other cores to the API and is much faster on a busy machine.",
    )
    flush_denormals: bool = Field(
        True,
        description="Run the model's threads with denormal floats flushed to zero (FTZ/DAZ, "
        "torch.set_flush_denormal): an optimizer state or membrane that decays below 1e-38 reads as 0 "
        "instead of taking the CPU's slow path (a fused Adam step over a few % of denormal moments "
        "runs ~2x slower); a pass over 800 N-MNIST digits learned the same weights to the bit either way "
        "(benchmarks/bench_update.py).",
    )

    # --- streams and framing --------------------------------------------------------------------
    window_us: int = Field(
        20_000,
        ge=1,
        description="Frame window in microseconds (one time-step per window). 20 ms: 10 ms frames "
        "of N-MNIST hold ~130 events and learn markedly worse online (benchmarks/online_nmnist.py).",
    )
    max_streams: int = Field(
        64, ge=1, description="Live streams the worker holds; the least recently used is evicted."
    )
    stream_ttl_s: float = Field(300.0, gt=0, description="Idle seconds after which a stream expires.")
    max_gap_windows: int = Field(
        100,
        ge=0,
        description="Empty frames a silent gap inside a sequence becomes (real time-steps: membranes decay); "
        "the rest of a longer gap is skipped and counted.",
    )
    max_packet_windows: int = Field(
        100,
        ge=1,
        description="Window boundaries one packet's events may cross (max t // window - min t // window); "
        "the API answers 422 above it, before publishing. A packet then closes at most "
        "max_packet_windows + max_gap_windows + 1 frames; the worker refuses (422) any that would close more.",
    )
    max_window_events: int = Field(
        2_000_000,
        ge=1,
        description="Most events one stream's open window may hold (8 bytes each, kept until an event past "
        "the window's end closes it); the worker refuses (422) a packet that would leave more. A camera "
        "of 10 M events/s fills a 20 ms window with 200,000.",
    )
    max_stream_speed: float = Field(
        2.0,
        ge=0,
        description="How many times faster than its camera's real time (one frame per window) a stream's "
        "frames may be stepped; a stream ahead of that waits, its queue and busy flag grow (0 = no cap). "
        "Draining rounds (control entries, checkpoints, recovery) are not capped.",
    )
    max_ticks_per_round: int = Field(
        8,
        ge=1,
        description="Batched learner steps the worker runs before it answers the packets that finished and "
        "reads the bus again; a stream with a long queue takes one frame per tick, the others go on.",
    )
    answer_before_learning: bool = Field(
        True,
        description="learn_at=sequence: a round's answers are sent before its learning (the replay steps of its "
        "ticks), which runs while they travel. False: each tick learns before the next, answers after the round.",
    )
    max_stream_backlog_frames: int = Field(
        600,
        ge=1,
        description="Frames one stream may have queued for its ticks; above it the worker raises the "
        "stream's busy flag and the API answers its packets 429 + Retry-After before publishing them, "
        "until the queue is under half of this.",
    )
    accuracy_window: int = Field(
        500, ge=1, description="Labelled steps the ndot_online_accuracy gauge (step level) averages over."
    )

    # --- when labels are learned: test-then-train (docs/service.md#labels-and-learn_at) ----------
    learn_at: Literal["sequence", "step"] = Field(
        "sequence",
        description="'sequence' (test-then-train): a sequence streams unlabelled, its prediction at its end is "
        "scored against its label (from its packets, or POST /v1/streams/{id}/label later), then its held "
        "frames are replayed with the label to learn; 'step': learn at every labelled step as it runs "
        "(NDOT_O as in the paper; a sample's later predictions follow updates on its earlier steps, so its "
        "accuracy is optimistic).",
    )
    sequence_max_frames: int = Field(
        250,
        ge=1,
        description="learn_at=sequence: frames one sequence may hold for its replay (250 = 5 s at 20 ms); a "
        "longer sequence is scored but not learned (ndot_sequences_total{outcome='too_long'}).",
    )
    sequence_max_bytes: int = Field(
        4 * 1024 * 1024,
        ge=1,
        description="learn_at=sequence: bytes one sequence may hold (its frames and its start state); a "
        "larger one is scored but not learned. A stream holds at most sequences_held + 1 sequences.",
    )
    sequences_held: int = Field(
        2,
        ge=0,
        description="learn_at=sequence: ended sequences per stream that wait for a late label "
        "(POST /v1/streams/{id}/label); past it the oldest unlabelled one is dropped, never learned.",
    )
    replay_recent: int = Field(
        2,
        ge=0,
        description="learn_at=sequence: re-learns of recent sequences queued after each newly scored one, drawn "
        "from a memory of learned sequences (service.worker.recent_replay), in this many lanes of one row per "
        "tick; a re-learn finding its lane busy is skipped (0 = off). docs/accuracy.md: 2 lifted held-out "
        "N-MNIST accuracy from 82 to 92 %.",
    )
    replay_memory_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="learn_at=sequence: bytes of the worker's memory of learned sequences kept for re-learning "
        "(frames and start states, all streams); the oldest is dropped past it. Not checkpointed.",
    )
    prequential_window: int = Field(
        100, ge=1, description="Scored sequences the ndot_prequential_accuracy gauge averages over."
    )

    # --- checkpoints ----------------------------------------------------------------------------
    checkpoint_dir: Path = Field(Path("checkpoints"), description="Folder the worker writes checkpoints to.")
    checkpoint_interval_s: float = Field(
        300.0, ge=0, description="Seconds between periodic checkpoints (0 = only on request and on shutdown)."
    )
    checkpoint_max_entries: int = Field(
        20_000,
        ge=0,
        description="Also checkpoint once this many bus entries were applied since the last one "
        "(0 = by time only); bounds what a restarted worker replays, keep it below bus_maxlen.",
    )
    checkpoint_keep: int = Field(
        5, ge=1, description="Newest automatic checkpoints kept; older ones are deleted."
    )
    restore_on_start: bool = Field(True, description="Restore the newest checkpoint when the worker starts.")

    # --- API ------------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address the HTTP API binds to.")
    port: int = Field(8000, ge=0, le=65535, description="Port of the HTTP API.")
    request_timeout_s: float = Field(
        10.0, gt=0, description="Seconds a request waits for the worker's reply before answering 504."
    )
    max_body_bytes: int = Field(
        16 * 1024 * 1024, ge=13, description="Largest request body accepted (413 above)."
    )
    max_events_per_packet: int = Field(1_000_000, ge=1, description="Most events one packet may carry.")
    access_log: bool = Field(False, description="Log every HTTP request (uvicorn's access log).")
    max_sensor_size: int = Field(
        1280,
        ge=1,
        description="Largest sensor width or height a stream may declare. Each live stream's framer "
        "holds a width x height int64 pixel map (7 MiB at 1280x720), so this bounds what one key can make the "
        "worker allocate (x max_streams).",
    )
    max_control_body_bytes: int = Field(
        64 * 1024, ge=64, description="Largest body of any route but POST .../events (413 above)."
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="Seconds a client has to send a request's line and headers, from connecting or from "
        "its first byte; slower connections are answered 408 and closed (slowloris).",
    )
    http_body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="Seconds a client has to send a request's whole body once its headers are in; "
        "slower uploads are cut off.",
    )
    http_keep_alive_s: float = Field(
        5.0, gt=0, description="Seconds an idle keep-alive connection stays open between requests."
    )
    http_max_connections: int = Field(
        2048,
        ge=1,
        description="Connections and requests in flight one API process serves at once (uvicorn "
        "limit_concurrency); above it new requests are answered 503.",
    )

    # --- security ------------------------------------------------------------------------------
    auth: Literal["on", "off"] = Field(
        "on",
        description="API keys on every /v1 route; 'off' only for local use (the server warns at start). "
        "With 'on' and no key configured the API refuses to start.",
    )
    ingest_keys: SecretStr | None = Field(
        None,
        description="Comma-separated ingest keys: post events, open / list / reset streams. "
        "Prefer the env var to the flag (flags show in the process list).",
    )
    admin_keys: SecretStr | None = Field(
        None,
        description="Comma-separated admin keys: everything, plus checkpoints, restore, model reset and "
        "stream delete.",
    )
    rate_limit_rps: float = Field(
        2000.0,
        ge=0,
        description="Requests per second one API key (one client address with auth off) may make, "
        "per API process (token bucket; 0 = no limit).",
    )
    rate_limit_burst: int = Field(
        4000, ge=1, description="Token bucket size: requests one key may make at once."
    )

    # --- worker loop ----------------------------------------------------------------------------
    worker_metrics_port: int = Field(
        9101, ge=0, le=65535, description="Port of the worker's own /metrics when it runs apart (0 = off)."
    )
    read_count: int = Field(64, ge=1, description="Most bus entries the worker reads per call.")
    read_block_ms: int = Field(100, ge=1, description="How long one bus read blocks when nothing is waiting.")
    claim_idle_ms: int = Field(
        30_000, ge=0, description="Pending entries idle this long are claimed from a dead consumer."
    )
    claim_interval_s: float = Field(
        10.0, gt=0, description="Seconds between claims of stale pending entries."
    )
    heartbeat_timeout_s: float = Field(
        5.0, gt=0, description="A worker heartbeat older than this makes /readyz answer 503."
    )
    max_deliveries: int = Field(
        5, ge=1, description="An entry handed out more often than this (a crash loop) is dead-lettered."
    )
    max_failures: int = Field(
        3,
        ge=1,
        description="Attempts at a packet's framing or learner step that may fail before the packet "
        "is dead-lettered (its stream goes on).",
    )
    reply_ttl_s: float = Field(60.0, gt=0, description="Seconds a reply waits on the bus for its request.")

    # --- logs -----------------------------------------------------------------------------------
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Log level.")
    log_format: Literal["kv", "json"] = Field("kv", description="Log lines as key=value or JSON.")

    @field_validator("redis_url")
    @classmethod
    def _empty_is_none(cls, value: str | None) -> str | None:
        return value or None

    @model_validator(mode="after")
    def _bus_holds_the_largest_packets(self) -> Settings:
        # A binary body becomes as many event bytes, a JSON one up to 13/8 as many (8 characters per
        # event at least): twice max_body_bytes holds the largest entry the API can publish, with its envelope.
        if self.bus_max_bytes < 2 * self.max_body_bytes:
            raise ValueError(
                f"bus_max_bytes={self.bus_max_bytes} must be at least 2 x max_body_bytes="
                f"{2 * self.max_body_bytes}, so the bus always holds the largest packet the API takes"
            )
        return self

    @property
    def max_packet_frames(self) -> int:
        """Frames one packet may close: its own windows, the one open before it and the gap up to it."""
        return self.max_packet_windows + self.max_gap_windows + 1

    @property
    def input_size(self) -> tuple[int, int]:
        """Frame size the model takes, ``(H, W)``."""
        return (self.input_height, self.input_width)

    def torch_device(self) -> str:
        """Resolve ``device``: "auto" is cuda when torch sees a GPU, else cpu."""
        if self.device != "auto":
            return self.device
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
