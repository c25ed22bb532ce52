"""``ndot worker`` with each phase of its rounds timed: calls, wall time and the calling thread's CPU time.

    python -m benchmarks.phase_timing OUT.json [worker arguments...]     (what ``worker_phases.py`` starts)

Wraps a fixed list of the worker's methods (``PHASES``: the read, the apply, the ticks, the learner's steps,
the round's writes, ...) and writes their running totals to ``OUT.json`` every second, replaced whole
(``{"elapsed_s", "process_cpu_s", "phases": {name: [calls, wall_s, cpu_s]}}``). The CPU time is the
thread's (``time.thread_time``): an ``async`` phase's includes what else its thread ran while it waited,
which in the worker's main thread is little. Phases nest (``OnlineLearner.step`` runs inside
``StepRunner._step``): their times are not to be added up. A diagnostic for benchmarks only; it changes
nothing the worker computes.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

#: ``module:Class.method`` of each phase timed, outermost first.
PHASES = (
    "service.worker.loop:Worker.run_once",
    "service.bus.redis_streams:RedisStreamBus.read",
    "service.worker.loop:Worker._handle",
    "service.worker.applier:EntryApplier.apply",
    "service.worker.batcher:Batcher.push_packet",
    "service.worker.batcher:Batcher.tick",
    "service.worker.batcher_steps:StepRunner._step",
    "service.worker.batcher_steps:StepRunner._record",
    "service.worker.applier:EntryApplier.learn_deferred",
    "service.worker.batcher_steps:StepRunner._replay_step",
    "service.worker.sequence_learning:SequenceLearning.batch",
    "ndot_core.engine.learner:OnlineLearner.step",
    "ndot_core.engine.compiled_step:CompiledStep._call",
    "ndot_core.engine.learner:OnlineLearner._optimizer_step",
    "service.bus.redis_values:RepliesAndValues.send_round",
    "service.worker.loop:Worker._round_values",
    "service.worker.loop:Worker.status_json",
)


class PhaseTotals:
    """Running ``[calls, wall_s, cpu_s]`` by phase name, safe across threads."""

    def __init__(self) -> None:
        self.totals: dict[str, list[float]] = {}
        self._lock = threading.Lock()

    def add(self, name: str, wall_s: float, cpu_s: float) -> None:
        with self._lock:
            calls_wall_cpu = self.totals.setdefault(name, [0, 0.0, 0.0])
            calls_wall_cpu[0] += 1
            calls_wall_cpu[1] += wall_s
            calls_wall_cpu[2] += cpu_s

    def snapshot(self) -> dict[str, list[float]]:
        with self._lock:
            return {name: list(values) for name, values in self.totals.items()}


def timed(function: Callable[..., Any], name: str, totals: PhaseTotals) -> Callable[..., Any]:
    """``function`` (sync or async) adding each call's wall and thread CPU time to ``totals[name]``."""
    if inspect.iscoroutinefunction(function):

        @functools.wraps(function)
        async def timed_async(*args: Any, **kwargs: Any) -> Any:
            wall, cpu = time.perf_counter(), time.thread_time()
            try:
                return await function(*args, **kwargs)
            finally:
                totals.add(name, time.perf_counter() - wall, time.thread_time() - cpu)

        return timed_async

    @functools.wraps(function)
    def timed_sync(*args: Any, **kwargs: Any) -> Any:
        wall, cpu = time.perf_counter(), time.thread_time()
        try:
            return function(*args, **kwargs)
        finally:
            totals.add(name, time.perf_counter() - wall, time.thread_time() - cpu)

    return timed_sync


def install(totals: PhaseTotals, phases: tuple[str, ...] = PHASES) -> None:
    """Wrap each phase's method in place (a missing one is an error: the list follows the code)."""
    for phase in phases:
        module_name, qualified = phase.split(":")
        class_name, method = qualified.split(".")
        owner = getattr(importlib.import_module(module_name), class_name)
        setattr(owner, method, timed(getattr(owner, method), qualified, totals))


def write_every(path: Path, totals: PhaseTotals, interval_s: float = 1.0) -> None:
    """Replace ``path`` with the totals every ``interval_s`` (a daemon thread)."""
    started = time.perf_counter()

    def loop() -> None:
        while True:
            time.sleep(interval_s)
            report = {
                "elapsed_s": time.perf_counter() - started,
                "process_cpu_s": time.process_time(),
                "phases": totals.snapshot(),
            }
            partial = path.with_suffix(".partial")
            partial.write_text(json.dumps(report))
            os.replace(partial, path)

    threading.Thread(target=loop, name="phase-timing", daemon=True).start()


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    totals = PhaseTotals()
    install(totals)
    write_every(Path(argv[0]), totals)
    from service.cli import main as ndot_main

    return ndot_main(argv[1:] or ["worker"])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
