"""The model (admin): fresh weights and optimizer; the current weights as a NIR file.

``POST /v1/model/export?format=nir`` asks the worker (a control entry, answered in bus order: the
file holds every packet applied before the request) for the NIR file of its current weights; the
reply carries the file base64-encoded, checked here against its length and SHA-256 before it is
answered (``service.worker.model_export`` has the design and the size bound). The API itself needs
neither torch nor nir: a worker without the optional ``nir`` package answers 501 with the install command.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from typing import Any, Literal

from fastapi import APIRouter, Query
from fastapi.responses import Response

from service.api.context import ADMIN, ERRORS, Context
from service.api.errors import ApiError
from service.api.schemas import ErrorDetail, ModelInfo
from service.bus import messages

router = APIRouter(prefix="/v1/model", tags=["model"], dependencies=ADMIN, responses=ERRORS)

#: Media type of a NIR file (an HDF5 file).
NIR_MEDIA_TYPE = "application/x-hdf5"


@router.post(
    "/reset",
    response_model=ModelInfo,
    summary="Fresh weights and optimizer (every stream's neuron state is zeroed too)",
)
async def reset_model(ctx: Context) -> Any:
    answer = await ctx.request(messages.MODEL_RESET, messages.MODEL_STREAM)
    return {"model": answer["model"], "model_version": answer["model_version"]}


@router.post(
    "/export",
    summary="The current weights as a NIR file (Neuromorphic Intermediate Representation, HDF5)",
    response_class=Response,
    responses={
        200: {
            "content": {NIR_MEDIA_TYPE: {"schema": {"type": "string", "format": "binary"}}},
            "description": "The NIR file; headers X-Model-Version and X-Content-SHA256 say what it holds.",
        },
        501: {
            "model": ErrorDetail,
            "description": "The worker lacks the optional nir package (the detail "
            "says how to install it: pip install 'ndot-stream[nir]').",
        },
    },
)
async def export_model(
    ctx: Context,
    format: Literal["nir"] = Query("nir", description="Export format; only 'nir'."),
    dt: float = Query(
        1e-4,
        gt=0,
        le=60,
        description="Seconds an importer simulates one frame with: LIF time constants are "
        "tau = dt / (1 - lam). Import with the same dt (it is in the file's metadata).",
    ),
) -> Response:
    """The worker's current weights as a NIR file (docs/nir.md); the file holds every packet applied before."""
    answer = await ctx.request(
        messages.MODEL_EXPORT, messages.MODEL_STREAM, {"format": format.encode(), "dt": repr(dt).encode()}
    )
    try:
        data = base64.b64decode(answer["nir_base64"], validate=True)
    except (KeyError, TypeError, binascii.Error) as err:
        raise ApiError(500, f"the worker's export reply is malformed: {type(err).__name__}") from err
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != answer.get("bytes") or digest != answer.get("sha256"):
        raise ApiError(500, "the worker's export reply does not match its length and SHA-256")
    version = answer.get("model_version")
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{answer.get('model', 'model')}-v{version}.nir")
    return Response(
        content=data,
        media_type=NIR_MEDIA_TYPE,
        headers={
            "content-disposition": f'attachment; filename="{name}"',
            "x-model-version": str(version),
            "x-content-sha256": digest,
        },
    )
