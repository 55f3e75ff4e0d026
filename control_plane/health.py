"""Daemon health: every control-plane loop beats on each pass and records its last error;
`/readyz` turns 503, naming the loop, when one has not beaten for too long."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from control_plane.clock import Clock

log = logging.getLogger("fleetrun.health")

STALE_AFTER_SECONDS = 60.0


@dataclass
class LoopHealth:
    name: str
    last_beat: float
    last_error: str | None = None
    last_error_time: float | None = None


class DaemonHealth:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.loops: dict[str, LoopHealth] = {}

    def beat(self, name: str) -> None:
        loop = self.loops.get(name)
        if loop is None:
            self.loops[name] = LoopHealth(name, self.clock.time())
        else:
            loop.last_beat = self.clock.time()

    def failed(self, name: str, exc: BaseException) -> None:
        """A pass raised: log it with context; the loop carries on."""
        log.exception("%s loop: a pass failed; carrying on", name, exc_info=exc)
        self.beat(name)
        loop = self.loops[name]
        loop.last_error = f"{type(exc).__name__}: {exc}"
        loop.last_error_time = self.clock.time()

    def stale(self) -> list[str]:
        now = self.clock.time()
        return sorted(n for n, h in self.loops.items() if now - h.last_beat > STALE_AFTER_SECONDS)

    def to_json(self) -> dict[str, dict[str, object]]:
        now = self.clock.time()
        return {n: {"seconds_since_beat": round(now - h.last_beat, 3), "last_error": h.last_error}
                for n, h in sorted(self.loops.items())}  # fmt: skip
