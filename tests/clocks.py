"""Clocks for tests and benches that stand at a chosen time while everything runs."""

from __future__ import annotations

import time

from control_plane.clock import SystemClock


class OffsetClock(SystemClock):
    """The system clock shifted by `offset` seconds (adjustable): lets a test stand just
    before a cron tick, or jump ahead, while everything else runs in real time."""

    def __init__(self, offset: float = 0.0) -> None:
        self.offset = offset

    def time(self) -> float:
        return time.time() + self.offset
