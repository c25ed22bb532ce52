"""Checkpoints (admin): save one now, list them, restore one."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Path

from service.api.context import ADMIN, ERRORS, Context
from service.api.errors import ApiError
from service.api.schemas import CHECKPOINT_NAME_PATTERN, CheckpointInfo, CheckpointList
from service.bus import messages

router = APIRouter(prefix="/v1/checkpoints", tags=["model"], dependencies=ADMIN, responses=ERRORS)

CheckpointName = Annotated[
    str, Path(pattern=CHECKPOINT_NAME_PATTERN, examples=["ckpt-20250101T120000.000000-v120"])
]


@router.post("", response_model=CheckpointInfo, summary="Save a checkpoint now")
async def save_checkpoint(ctx: Context) -> Any:
    return (await ctx.request(messages.CHECKPOINT, messages.MODEL_STREAM))["checkpoint"]


@router.get("", response_model=CheckpointList, summary="Checkpoints, oldest first")
async def list_checkpoints(ctx: Context) -> Any:
    return {"checkpoints": (await ctx.status()).get("checkpoints", [])}


@router.post(
    "/{name}/restore",
    response_model=CheckpointInfo,
    summary="Restore weights, optimizer, stream states and bus offsets from a checkpoint",
)
async def restore_checkpoint(ctx: Context, name: CheckpointName) -> Any:
    if ".." in name or name.startswith("."):
        raise ApiError(422, f"checkpoint name {name!r} may not contain '..' or start with '.'")
    return (await ctx.request(messages.RESTORE, messages.MODEL_STREAM, {"name": name.encode()}))["checkpoint"]
