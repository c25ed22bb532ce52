"""Riding out bus failures in the worker: back-off, one log line per kind of failure, a metric.

A bus that is unreachable (``BusUnavailable``), refuses writes (``BusRefused``: Redis OOM, MISCONF,
READONLY, ...) or answers an unexpected error (``BusCommandError``) is waited out, never a reason
for the worker to stop: each failure counts in ``ndot_bus_errors_total{side="worker", kind}``; the
log gets one ``event=bus_unavailable`` line when a kind of failure starts (not one per attempt) and
one ``event=bus_recovered`` line when the bus answers again; the wait between attempts doubles
from ``first_s`` up to ``max_s``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from service.bus import BusCommandError, BusError, BusUnavailable
from service.metrics import ServiceMetrics

log = logging.getLogger("ndot.worker")

#: The bus failures the worker waits out (not BusInputError, a bug, nor BusFull, which it never meets).
RETRIED = (BusUnavailable, BusCommandError)

T = TypeVar("T")


class BusRetry:
    """Back-off and logging across consecutive bus failures (see the module docstring)."""

    def __init__(self, metrics: ServiceMetrics, first_s: float = 0.2, max_s: float = 2.0) -> None:
        self.metrics = metrics
        self.first_s = first_s
        self.max_s = max_s
        self.failures = 0  # since the bus last answered
        self._logged: str | None = None  # the kind of failure last logged
        self._since = 0.0
        self._delay = first_s

    def failed(self, err: BusError, during: str) -> float:
        """Count and (once per kind) log a failure; returns how long to wait before the next attempt."""
        self.metrics.bus_error("worker", err.kind)
        if self.failures == 0:
            self._since = time.monotonic()
            self._delay = self.first_s
        self.failures += 1
        if err.summary != self._logged:
            self._logged = err.summary
            log.warning(
                "event=bus_unavailable kind=%s during=%s error=%r action=%r",
                err.summary,
                during,
                str(err),
                f"retrying every {self.max_s:g} s at most; logged again only if the failure changes",
            )
        delay, self._delay = self._delay, min(2 * self._delay, self.max_s)
        return delay

    def recovered(self, during: str) -> None:
        """The bus answered: log the end of an outage (if there was one) and reset the back-off."""
        if self.failures:
            log.info(
                "event=bus_recovered during=%s failures=%d after_s=%.1f",
                during,
                self.failures,
                time.monotonic() - self._since,
            )
        self.failures = 0
        self._logged = None

    async def call(
        self, op: Callable[[], Awaitable[T]], stop: asyncio.Event, during: str
    ) -> tuple[bool, T | None]:
        """``op()`` until it succeeds: ``(True, result)``, or ``(False, None)`` once ``stop`` is set."""
        while not stop.is_set():
            try:
                result = await op()
            except RETRIED as err:
                delay = self.failed(err, during)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
                continue
            self.recovered(during)
            return True, result
        return False, None
