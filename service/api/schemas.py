"""Request and response models of the HTTP API (docs/design.md), with OpenAPI examples."""

from __future__ import annotations

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
    learned: bool = Field(..., description="True when the step's label updated the weights.")
    model_version: int = Field(..., description="Optimizer steps the model had taken after this step.")


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
        None, description="Correct / labelled steps (predicted before learning)."
    )
    labelled_steps: int = Field(0, description="Steps that carried a label.")


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
