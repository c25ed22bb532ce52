"""Recovery of a worker that starts after another one died: nothing lost, nothing applied twice.

A checkpoint holds the model and every stream's state as of its watermark ``L`` (the newest entry
applied, per shard: ``service.bus.shards.Watermark``). Entries after ``L`` are in one of three states:

    acked     applied by the dead worker after its last checkpoint   -> in the stream's history only
    pending   read by the dead worker, not acked (maybe applied)      -> in the history and the PEL
    unread    never delivered                                         -> in the history; read later

so the worker re-applies the history after ``L`` of every shard it owns (``Bus.replay``), which
covers all three, and then skips every entry its watermark covers when it comes again by ``read``
or ``claim_stale``. Pending entries are claimed first, so an entry that
keeps killing workers (a crash loop) shows its delivery count and is dead-lettered once it passes
``max_deliveries`` instead of being replayed for ever.

History kept by the bus is bounded (Redis: ``bus_maxlen``), hence ``checkpoint_max_entries``:
a checkpoint at least every that many entries keeps the replay within the kept history. On the
embedded bus the history dies with the process, and replay only sees what is still held.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from service.bus import Bus, BusEntry, entry_id_key
from service.bus.shards import Watermark, qualify, split_entry_id

log = logging.getLogger("ndot.worker")

#: Most pending entries claimed at once at start (a dead worker held at most a few read batches).
PENDING_SCAN = 10_000


def _order(entry_id: str) -> tuple[int, int]:
    """Order of entries across shards: their ids' (ms, seq) (one shard's entries keep their order)."""
    return entry_id_key(split_entry_id(entry_id)[1])


async def recover(
    bus: Bus,
    consumer: str,
    watermark: Callable[[], Watermark],
    handle: Callable[[list[BusEntry]], Awaitable[None]],
    page: int,
) -> int:
    """Re-apply the history after ``watermark()`` in every owned shard, then settle the claimed pending ones.

    Each pass takes up to ``page`` entries of every owned shard and hands them to ``handle`` as one
    batch, in publish order (shards interleaved by their ids' time; each shard's own order kept), so
    the ticks of a replay see every shard's streams together. ``handle(entries)`` applies, replies and
    acks a batch (skipping entries the watermark covers, dead-lettering those delivered too often);
    returns how many entries were replayed.
    """
    claimed = {entry.id: entry for entry in await bus.claim_stale(consumer, 0, PENDING_SCAN)}
    replayed = 0
    mark = watermark()
    cursors: dict[int, str | None] = {
        shard: None if (newest := mark.get(shard)) is None else qualify(shard, newest, bus.shards)
        for shard in bus.owned
    }
    while cursors:
        batch: list[BusEntry] = []
        for shard, after in list(cursors.items()):
            history = await bus.replay(after, page, shard=shard)
            batch += history
            if len(history) < page:
                del cursors[shard]  # the shard's history is done
            elif history:
                cursors[shard] = history[-1].id
        if not batch:
            break
        batch = [claimed.pop(entry.id, entry) for entry in sorted(batch, key=lambda entry: _order(entry.id))]
        await handle(batch)  # claimed copies carry their deliveries
        replayed += len(batch)
        mark = watermark()  # a restore in the history moves the watermark: go on after it
        for shard, after in cursors.items():
            newest = mark.get(shard)
            if newest is not None and (after is None or entry_id_key(newest) > _order(after)):
                cursors[shard] = qualify(shard, newest, bus.shards)
    if claimed:  # pending entries outside the history (covered by the watermark, or trimmed)
        await handle(sorted(claimed.values(), key=lambda entry: _order(entry.id)))
    if replayed:
        log.info("event=replayed entries=%d watermark=%s", replayed, watermark().as_dict())
    return replayed
