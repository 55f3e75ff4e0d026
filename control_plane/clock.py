"""Time as an explicit input, so time-based logic can be tested without sleeping."""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def time(self) -> float:
        """Wall-clock seconds since the epoch (stored timestamps)."""
        ...

    def monotonic(self) -> float:
        """Monotonic seconds (timeouts and durations)."""
        ...


class SystemClock:
    def time(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()
