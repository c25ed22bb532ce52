"""A ``Batcher``'s checkpointable state: taken as a tree of tensors and plain values, and put back.

``snapshot`` lists the learner (weights, optimizer), the live streams' state rows, the stream
registry (framers included), the RNG state and, under learn_at=sequence, each stream's held
sequences (``sequences``: frames, start state, label, prediction; ``service.worker.sequences``), so
a sequence running at the checkpoint is still learned after a restore. ``loaded`` checks a tree against the running model
before anything changes and returns the state and registry to swap in; the learner's weights are
swapped last, and put back as they were when they are refused.
"""

from __future__ import annotations

import copy
import time
from typing import TYPE_CHECKING, Any

import torch

from ndot_core import NetworkState
from ndot_core.events.framing import StreamFramer
from service.worker.checkpoints import CheckpointError, check_like
from service.worker.sequences import BookShape, book_from_state_dict
from service.worker.streams import StreamRegistry

if TYPE_CHECKING:
    from service.worker.batcher import Batcher


def snapshot(batcher: Batcher) -> dict[str, Any]:
    """The batcher's state as a checkpoint tree (its queues must be drained)."""
    learner = batcher.learner
    rng = {"cpu": torch.get_rng_state()}
    if learner.device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(learner.device)
    tree = {
        "learner": learner.state_dict(),
        "network_state": batcher.state.select(batcher.registry.rows()).state_dict(),
        "registry": batcher.registry.state_dict(),
        "rng": rng,
        "model_version": learner.version,
    }
    if batcher.sequences is not None:  # a list (stream ids may hold dots, the tree's path separator)
        tree["sequences"] = [
            {"stream_id": slot.stream_id, "book": batcher.sequences.book(slot).state_dict()}
            for slot in batcher.registry
        ]
    return tree


def _books(batcher: Batcher, tree: dict[str, Any], registry: StreamRegistry) -> dict[str, Any]:
    """The held sequences of a tree's ``sequences`` (checked; ``{}`` when absent or learn_at=step)."""
    saved = tree.get("sequences")
    if saved is None or batcher.sequences is None:
        return {}
    if not isinstance(saved, list):
        raise CheckpointError("checkpoint field sequences: expected a list")
    shape = BookShape(
        (batcher.learner.model.in_channels, *batcher.input_size),
        {k: v.cpu() for k, v in batcher.learner.new_state(1).state_dict().items()},
        batcher.learner.model.num_classes,
        batcher.sequences.limits,
    )
    books = {}
    for i, item in enumerate(saved):
        if not isinstance(item, dict) or set(item) != {"stream_id", "book"}:
            raise CheckpointError(f"checkpoint field sequences.{i}: expected {{stream_id, book}}")
        slot = registry.get(item["stream_id"]) if isinstance(item["stream_id"], str) else None
        if slot is None or slot.stream_id in books:
            raise CheckpointError(
                f"checkpoint field sequences.{i}.stream_id: not a stream of the registry once"
            )
        books[slot.stream_id] = book_from_state_dict(
            item["book"], f"sequences.{i}.book", shape, slot.sequences
        )
    return books


def loaded(batcher: Batcher, tree: dict[str, Any]) -> tuple[NetworkState, StreamRegistry]:
    """Check ``tree`` against the running model, load its learner state and RNG; the state and
    registry to swap in. Raises ``CheckpointError`` naming the first mismatch (nothing changed then)."""
    learner = batcher.learner
    try:
        saved_state = NetworkState.from_state_dict(tree["network_state"])
        check_like(
            learner.new_state(saved_state.batch_size).state_dict(), tree["network_state"], "network_state"
        )
        check_like(learner.model.state_dict(), tree["learner"]["model"], "learner.model")
        registry, rows = StreamRegistry.from_state_dict(
            tree["registry"], batcher.registry.capacity, batcher.new_framer, StreamFramer.from_state_dict
        )
        if saved_state.batch_size != len(rows):
            raise CheckpointError(
                f"checkpoint has {saved_state.batch_size} state rows for {len(rows)} streams"
            )
        books = _books(batcher, tree, registry)
        for slot in registry:
            slot.book = books.get(slot.stream_id)
            if slot.framer.frame_shape != batcher.input_size:
                raise CheckpointError(
                    f"stream {slot.stream_id!r}: frames {slot.framer.frame_shape}, "
                    f"the model takes {batcher.input_size}"
                )
    except CheckpointError:
        raise
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise CheckpointError(f"checkpoint does not fit the running model: {err}") from err
    state = learner.new_state(batcher.registry.capacity)
    if rows:
        state.assign(rows, saved_state.to(learner.device))
    backup = copy.deepcopy(learner.state_dict())  # state_dict() shares storage with the weights
    try:
        learner.load_state_dict(tree["learner"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        learner.load_state_dict(backup)
        raise CheckpointError(f"learner state refused: {err}") from err
    now = time.time()
    for slot in registry:  # time spent down does not count towards a stream's idle TTL
        slot.last_active_s = now
    rng = tree.get("rng", {})
    if isinstance(rng.get("cpu"), torch.Tensor):
        torch.set_rng_state(rng["cpu"])
    if learner.device.type == "cuda" and isinstance(rng.get("cuda"), torch.Tensor):
        torch.cuda.set_rng_state(rng["cuda"], learner.device)
    return state, registry
