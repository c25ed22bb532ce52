"""Recovery of a worker that starts after another one died: nothing lost, nothing applied twice.

A checkpoint holds the model and every stream's state as of bus entry ``L`` (its
``last_entry_id``). Entries after ``L`` are in one of three states on the bus:

    acked     applied by the dead worker after its last checkpoint   -> in the stream's history only
    pending   read by the dead worker, not acked (maybe applied)      -> in the history and the PEL
    unread    never delivered                                         -> in the history; read later

so the worker re-applies the history after ``L`` in id order (``Bus.replay``), which covers all
three, and then skips every entry at or below the newest id it applied (the watermark) when it
comes again by ``read`` or ``claim_stale``. Pending entries are claimed first, so an entry that
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

log = logging.getLogger("ndot.worker")

#: Most pending entries claimed at once at start (a dead worker held at most a few read batches).
PENDING_SCAN = 10_000


async def recover(
    bus: Bus,
    consumer: str,
    watermark: Callable[[], str | None],
    handle: Callable[[list[BusEntry]], Awaitable[None]],
    page: int,
) -> int:
    """Re-apply the history after ``watermark()``, then settle the claimed pending entries.

    ``handle(entries)`` applies, replies and acks a batch (skipping entries at or below the
    watermark, dead-lettering those delivered too often); returns how many entries were replayed.
    """
    claimed = {entry.id: entry for entry in await bus.claim_stale(consumer, 0, PENDING_SCAN)}
    replayed = 0
    after = watermark()
    while True:
        history = await bus.replay(after, page)
        if not history:
            break
        batch = [claimed.pop(entry.id, entry) for entry in history]  # claimed copies carry their deliveries
        await handle(batch)
        replayed += len(batch)
        after = max(watermark() or batch[-1].id, batch[-1].id, key=entry_id_key)
        if len(history) < page:
            break
    if claimed:  # pending entries outside the history (at or below the watermark, or trimmed)
        await handle(sorted(claimed.values(), key=lambda entry: entry_id_key(entry.id)))
    if replayed:
        log.info("event=replayed entries=%d upto=%s", replayed, after)
    return replayed
