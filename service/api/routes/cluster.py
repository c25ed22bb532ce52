"""The cluster (admin): the worker ranks of ``ndot workers``, their shards and whether they agree."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from service.api.context import ADMIN, ERRORS, Context

router = APIRouter(prefix="/v1/cluster", tags=["operations"], dependencies=ADMIN, responses=ERRORS)


@router.get("", summary="World size, each rank's shards, tick clock and model digest")
async def cluster(ctx: Context) -> Any:
    """One worker: ``{"world_size": 1, "ranks": []}``. Worker ranks: what each rank last wrote (its
    shards, tick clock, averages, sync seconds, and the model digest right after its latest average:
    equal digests at equal ``digest_clock`` mean the ranks held one model then)."""
    info, statuses = await ctx.cluster_status()
    if info is None:
        return {"world_size": 1, "ranks": []}
    ranks = []
    for rank, status in enumerate(statuses):
        entry: dict[str, Any] = {"rank": rank, "alive": status is not None}
        if status is not None:
            entry.update(status.get("cluster", {}))
            entry.update(
                {
                    "model_version": status.get("model_version"),
                    "streams": len(status.get("streams", [])),
                    "watermark": status.get("watermark", {}),
                    "time": status.get("time"),
                }
            )
        ranks.append(entry)
    digests = {(r.get("digest_clock"), r.get("digest")) for r in ranks if r.get("digest")}
    return {**info, "ranks": ranks, "digests_agree": len(digests) == 1 if digests else None}
