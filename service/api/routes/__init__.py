"""One ``APIRouter`` per resource: streams, checkpoints, model, operations (FastAPI's bigger-applications layout)."""
