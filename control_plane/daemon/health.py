"""Daemon health: every control-plane loop beats on each pass and records its last error;
`/readyz` turns 503, naming the loop, when one has not beaten for too long. Since every
loop reports here, this is also where pass durations and errors reach the metrics."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from control_plane.clock import Clock

if TYPE_CHECKING:
    from control_plane.metrics import Metrics

log = logging.getLogger("fleetrun.health")

STALE_AFTER_SECONDS = 60.0


@dataclass
class LoopHealth:
    name: str
    last_beat: float
    last_error: str | None = None
    last_error_time: float | None = None


class DaemonHealth:
    def __init__(self, clock: Clock, metrics: Metrics | None = None) -> None:
        self.clock = clock
        self.metrics = metrics  # None: a loop's private health (tests), nothing exported
        self.loops: dict[str, LoopHealth] = {}
        self.standby_loops: set[str] = set()  # run by another replica (leader election)

    def standby(self, name: str) -> None:
        """Another replica runs this loop now: it is not ours to be stale."""
        self.loops.pop(name, None)
        self.standby_loops.add(name)

    def beat(self, name: str) -> None:
        self.standby_loops.discard(name)
        loop = self.loops.get(name)
        if loop is None:
            self.loops[name] = LoopHealth(name, self.clock.time())
        else:
            loop.last_beat = self.clock.time()

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        """Wrap one pass: its duration goes to the metrics, whether it succeeds or raises
        (monotonic time, not the clock, which tests may freeze)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self.metrics is not None:
                self.metrics.loop_pass(name, time.perf_counter() - start)

    def failed(self, name: str, exc: BaseException) -> None:
        """A pass raised: log it with context; the loop carries on."""
        log.exception("%s loop: a pass failed; carrying on", name, exc_info=exc)
        if self.metrics is not None:
            self.metrics.loop_failed(name)
        self.beat(name)
        loop = self.loops[name]
        loop.last_error = f"{type(exc).__name__}: {exc}"
        loop.last_error_time = self.clock.time()

    def stale(self) -> list[str]:
        now = self.clock.time()
        return sorted(n for n, h in self.loops.items() if now - h.last_beat > STALE_AFTER_SECONDS)

    def to_json(self) -> dict[str, dict[str, object]]:
        now = self.clock.time()
        loops: dict[str, dict[str, object]] = {
            n: {"seconds_since_beat": round(now - h.last_beat, 3), "last_error": h.last_error}
            for n, h in sorted(self.loops.items())
        }
        for name in sorted(self.standby_loops):
            loops[name] = {"standby": True}
        return loops
