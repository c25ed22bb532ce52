"""The model (admin): fresh weights and optimizer."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.context import ADMIN, ERRORS, Context
from service.api.schemas import ModelInfo
from service.bus import messages

router = APIRouter(prefix="/v1/model", tags=["model"], dependencies=ADMIN, responses=ERRORS)


@router.post(
    "/reset",
    response_model=ModelInfo,
    summary="Fresh weights and optimizer (every stream's neuron state is zeroed too)",
)
async def reset_model(ctx: Context) -> Any:
    answer = await ctx.request(messages.MODEL_RESET, messages.MODEL_STREAM)
    return {"model": answer["model"], "model_version": answer["model_version"]}
