"""The control plane's own gaps: a stall (the process was frozen, paused or starved) or a
jump of the wall clock.

Agents are judged by how long ago their last heartbeat arrived. If this process did not
run for a while, or its wall clock stepped, that gap is ours, not theirs: judging by it
would declare a live fleet dead. So when the watch sees a gap it rebases the monitor:
every deadline starts again from now (the rule Consul and Nomad apply after their own
outage). A verdict may then come late by the length of the gap, never early.

It compares the wall clock with the monotonic one on a one-second tick, and the monitor
asks it again right before judging, so a check that runs first after a freeze still
sees the freeze.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from control_plane.clock import Clock

log = logging.getLogger("fleetrun.stallwatch")

TICK_SECONDS = 1.0
TOLERANCE_SECONDS = 2.0


class StallWatch:
    def __init__(self, clock: Clock, on_gap: Callable[[str], None]) -> None:
        self.clock = clock
        self.on_gap = on_gap
        self.gaps = 0
        self.reset()

    def reset(self) -> None:
        """Look at both clocks afresh (at start: whatever came before is not a gap)."""
        self._wall = self.clock.time()
        self._mono = self.clock.monotonic()

    def observe(self) -> bool:
        """Compare both clocks with the last look; rebase on a gap. True if there was one."""
        wall, mono = self.clock.time(), self.clock.monotonic()
        elapsed = mono - self._mono
        jump = (wall - self._wall) - elapsed
        self._wall, self._mono = wall, mono
        if elapsed > TICK_SECONDS + TOLERANCE_SECONDS:
            reason = f"this process did not run for {elapsed:.1f} s"
        elif abs(jump) > TOLERANCE_SECONDS:
            reason = f"the wall clock jumped by {jump:+.1f} s"
        else:
            return False
        self.gaps += 1
        log.warning("%s: every agent gets a full heartbeat timeout from now", reason)
        self.on_gap(reason)
        return True


async def watch_pass(watch: StallWatch, now: float) -> float:
    """One look at both clocks, every TICK_SECONDS (a daemon loop beside the monitor)."""
    watch.observe()
    return now + TICK_SECONDS
