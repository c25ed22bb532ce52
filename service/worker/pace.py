"""Each stream's pace: its frames are stepped at most ``speed`` times faster than its camera's clock.

A token bucket per stream, filled at ``speed / window`` frames per second up to ``burst`` frames
(a packet's worth, so one packet's frames never wait on each other). A tick takes a stream's next
frame only when its bucket holds one. A replay may run ahead of real time by ``speed``; a client
that floods one stream gets ``speed`` times one camera's worth of the worker and no more, its queue
grows, its busy flag rises and the API answers it 429 -- the other streams keep their ticks and,
on shared cores, their CPU. Rounds that only drain (a control entry, a checkpoint, recovery after
a restart) step without a cap: they must finish what is queued.
"""

from __future__ import annotations

from collections.abc import Iterable

DISABLED = 0.0


class Pace:
    """Token buckets by stream id; ``speed`` 0 = no cap (every ready frame is taken)."""

    def __init__(self, speed: float, window_us: int, burst: int) -> None:
        self.rate_per_s = speed * 1e6 / window_us if speed > 0 else DISABLED
        self.burst = float(max(burst, 1))
        self._buckets: dict[str, tuple[float, float]] = {}  # stream id -> (tokens, at monotonic s)

    def _tokens(self, stream_id: str, now: float) -> float:
        tokens, at = self._buckets.get(stream_id, (self.burst, now))
        return min(self.burst, tokens + (now - at) * self.rate_per_s)

    def take(self, stream_id: str, now: float) -> bool:
        """Whether the stream may have a frame stepped now (and spend its token)."""
        if self.rate_per_s == DISABLED:
            return True
        tokens = self._tokens(stream_id, now)
        if tokens < 1.0:
            self._buckets[stream_id] = (tokens, now)
            return False
        self._buckets[stream_id] = (tokens - 1.0, now)
        return True

    def wait_s(self, stream_ids: Iterable[str], now: float) -> float:
        """Seconds until one of ``stream_ids`` may have a frame stepped (0 when one may now)."""
        if self.rate_per_s == DISABLED:
            return 0.0
        needs = [1.0 - self._tokens(stream_id, now) for stream_id in stream_ids]
        return max(0.0, min(needs, default=0.0)) / self.rate_per_s

    def forget_all_but(self, stream_ids: Iterable[str]) -> None:
        """Drop the buckets of streams that are gone."""
        live = set(stream_ids)
        for stream_id in [s for s in self._buckets if s not in live]:
            del self._buckets[stream_id]
