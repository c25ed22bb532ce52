"""Request and response models of the HTTP API (docs/design.md), with OpenAPI examples."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

#: Stream ids and checkpoint names: safe as Redis key parts and file names.
STREAM_ID_PATTERN = r"^[A-Za-z0-9_.-]{1,64}$"
CHECKPOINT_NAME_PATTERN = r"^[A-Za-z0-9_.-]{1,128}$"


class SensorSize(BaseModel):
    """Sensor size a stream declares when it opens (``PUT /v1/streams/{id}``)."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"width": 34, "height": 34}]})
    width: int = Field(..., strict=True, ge=1, le=65535, description="Sensor width in pixels (x < width).")
    height: int = Field(..., strict=True, ge=1, le=65535, description="Sensor height in pixels (y < height).")


class EventColumns(BaseModel):
    """JSON body of a packet: one list per field, equal lengths, ``t`` in microseconds."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [{"t": [1000, 1005, 1020], "x": [3, 4, 4], "y": [10, 10, 11], "p": [1, 0, 1]}]
        }
    )
    t: list[int]
    x: list[int]
    y: list[int]
    p: list[int]


class StepResult(BaseModel):
    """One time-step a packet completed: the prediction (made before learning from its label)."""

    step: int = Field(
        ..., description="Index of the time-step within the stream's current sequence (from 0)."
    )
    predicted: int = Field(
        ..., description="Predicted class: argmax of the readout summed over the sequence."
    )
    probabilities: list[float] = Field(
        ..., description="Softmax of the mean readout over the sequence (K values)."
    )
    label: int | None = Field(None, description="The packet's label, when it had one.")
    learned: bool = Field(
        ...,
        description="True when the step's label updated the weights at this step (learn_at=step); "
        "with learn_at=sequence always false: the sequence is learned after its end.",
    )
    model_version: int = Field(..., description="Optimizer steps the model had taken after this step.")


class SequenceResult(BaseModel):
    """A sequence's test-then-train outcome (learn_at=sequence): scored before it is learned."""

    sequence: int | None = Field(None, description="The sequence's number within its stream (from 1).")
    predicted: int | None = Field(
        None,
        description="Its prediction: argmax of the readout summed over all its steps, made with weights "
        "that learned nothing of it yet.",
    )
    probabilities: list[float] | None = Field(
        None, description="Softmax of the mean readout over its steps (K values)."
    )
    label: int | None = Field(None, description="Its label; null while it waits for one.")
    correct: bool | None = Field(None, description="predicted == label (null without a label).")
    learning: str = Field(
        ...,
        description="queued: its held frames are replayed with the label in the next ticks; awaiting_label: "
        "held until POST /v1/streams/{id}/label names it; not_held: dropped unlabelled; too_long: over "
        "NDOT_SEQUENCE_MAX_FRAMES/BYTES, scored but not learned; incomplete: begun before a restore, scored "
        "but not learned; abandoned: cut by a reset; applied_before: a label entry applied before a restart.",
    )
    model_version: int | None = Field(None, description="Optimizer steps of the weights that predicted it.")


class LabelResult(SequenceResult):
    """Answer to ``POST /v1/streams/{id}/label``: the labelled sequence, scored."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "stream_id": "cam-1",
                    "sequence": 12,
                    "predicted": 3,
                    "probabilities": [0.01, 0.02, 0.05, 0.8, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02],
                    "label": 3,
                    "correct": True,
                    "learning": "queued",
                    "model_version": 120,
                }
            ]
        }
    )
    stream_id: str


class SequenceLabel(BaseModel):
    """Body of ``POST /v1/streams/{id}/label``: the class of one of the stream's sequences."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"label": 3, "sequence": "last"}, {"label": 7, "sequence": 12}]}
    )
    label: int = Field(..., strict=True, ge=0, description="The class, in [0, K).")
    sequence: Annotated[int, Field(strict=True, ge=1)] | Literal["last"] = Field(
        "last",
        description='"last": the stream\'s sequence that ended last (before this label, in bus order); or '
        "a sequence number (StreamInfo.sequences counts them): an ended one still held, or the running one "
        "(then the label is held and it is scored and learned when it ends).",
    )


class PacketResult(BaseModel):
    """200 answer to ``POST .../events``: the time-steps this packet completed (may be empty)."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "stream_id": "cam-1",
                    "packet_id": "1718000000000-0",
                    "steps": [
                        {
                            "step": 12,
                            "predicted": 3,
                            "probabilities": [0.01, 0.02, 0.05, 0.8, 0.02, 0.02, 0.02, 0.02, 0.02, 0.02],
                            "label": 3,
                            "learned": True,
                            "model_version": 120,
                        }
                    ],
                }
            ]
        }
    )
    stream_id: str
    packet_id: str = Field(..., description="Bus entry id of the packet.")
    steps: list[StepResult]
    sequence: SequenceResult | None = Field(
        None,
        description="learn_at=sequence, on the packet with end=true: the sequence it ended, scored when "
        "labelled (its prediction at its end, made before any learning from it).",
    )


class PacketAccepted(BaseModel):
    """202 answer with ``wait=false``: the packet is on the bus and will be applied."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"stream_id": "cam-1", "packet_id": "1718000000000-0"}]}
    )
    stream_id: str
    packet_id: str


class StreamInfo(BaseModel):
    """What the worker knows of one live stream."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "stream_id": "cam-1",
                    "width": 34,
                    "height": 34,
                    "steps": 930,
                    "sequences": 31,
                    "last_prediction": 3,
                    "online_accuracy": 0.82,
                    "labelled_steps": 900,
                    "prequential_accuracy": 0.77,
                    "scored_sequences": 30,
                    "learned_sequences": 30,
                }
            ]
        }
    )
    stream_id: str
    width: int
    height: int
    steps: int = Field(..., description="Time-steps applied since the stream opened.")
    sequences: int = Field(..., description="Sequences begun (packets with start=true, or the first one).")
    last_prediction: int | None = Field(None, description="Predicted class of the latest step.")
    online_accuracy: float | None = Field(
        None,
        description="Correct / labelled steps, step level (each step predicted before its own update; with "
        "learn_at=step a sample's later steps follow updates on its earlier ones: optimistic).",
    )
    labelled_steps: int = Field(0, description="Steps that carried a label.")
    prequential_accuracy: float | None = Field(
        None,
        description="learn_at=sequence: correct / scored sequences, each predicted at its end before any "
        "learning from its label (test-then-train, sample level).",
    )
    scored_sequences: int = Field(0, description="Sequences scored against their label (learn_at=sequence).")
    learned_sequences: int = Field(0, description="Sequences learned by replay (learn_at=sequence).")
    rank: int | None = Field(None, description="The worker rank holding the stream (worker ranks only).")


class StreamList(BaseModel):
    streams: list[StreamInfo]


class StreamAction(BaseModel):
    """Answer to reset / delete / open of a stream."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"stream_id": "cam-1", "action": "reset", "ok": True}]}
    )
    stream_id: str
    action: str
    ok: bool = True


class CheckpointInfo(BaseModel):
    """One checkpoint file in the worker's checkpoint folder."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "name": "ckpt-20250101T120000.000000-v120",
                    "model_version": 120,
                    "streams": 3,
                    "created": 1735732800.0,
                    "bytes": 1843200,
                }
            ]
        }
    )
    name: str
    model_version: int
    streams: int
    created: float = Field(..., description="Unix time (s) the checkpoint was written.")
    bytes: int


class CheckpointList(BaseModel):
    checkpoints: list[CheckpointInfo]


class ModelInfo(BaseModel):
    """Answer to ``POST /v1/model/reset``."""

    model_config = ConfigDict(json_schema_extra={"examples": [{"model": "stream_cnn", "model_version": 0}]})
    model: str
    model_version: int


class Readiness(BaseModel):
    """``GET /readyz``: ready only when the bus takes writes, a model is loaded and the worker beats.

    ``bus`` is false when Redis is unreachable or refuses writes; ``reasons`` says which
    (``bus unreachable``, ``bus refuses writes (OOM)``, ``worker heartbeat 7.1 s old``, ...).
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "ready": True,
                    "bus": True,
                    "worker": True,
                    "model": "stream_cnn",
                    "model_version": 120,
                    "heartbeat_age_s": 0.1,
                    "reasons": [],
                }
            ]
        }
    )
    ready: bool
    bus: bool
    worker: bool
    model: str | None = None
    model_version: int | None = None
    heartbeat_age_s: float | None = None
    reasons: list[str] = Field(default_factory=list)


class ErrorDetail(BaseModel):
    """Every 4xx/5xx answer: a message naming the limit, index or value at fault."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"detail": "event 17: x=40 outside sensor width 34"}]}
    )
    detail: str
