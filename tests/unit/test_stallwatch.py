"""The stall watch: a freeze of this process or a wall-clock step rebases the monitor."""

from __future__ import annotations

from control_plane.daemon.stallwatch import StallWatch


class ManualClock:
    def __init__(self) -> None:
        self.wall = 1_000_000.0
        self.mono = 50.0

    def time(self) -> float:
        return self.wall

    def monotonic(self) -> float:
        return self.mono

    def advance(self, seconds: float) -> None:
        self.wall += seconds
        self.mono += seconds


def test_a_stall_or_a_clock_jump_rebases_and_ordinary_ticks_do_not() -> None:
    clock = ManualClock()
    reasons: list[str] = []
    watch = StallWatch(clock, reasons.append)
    for _ in range(5):
        clock.advance(1.0)
        assert watch.observe() is False
    clock.advance(2.5)  # a slow tick under load is not a stall
    assert watch.observe() is False
    clock.advance(20.0)  # SIGSTOP for 20 s: both clocks moved, this process did not run
    assert watch.observe() is True
    clock.advance(1.0)
    clock.wall += 3600.0  # an NTP step forward
    assert watch.observe() is True
    clock.advance(1.0)
    clock.wall -= 3600.0  # and back
    assert watch.observe() is True
    assert [r.split(":")[0] for r in reasons] == [
        "this process did not run for 20.0 s",
        "the wall clock jumped by +3600.0 s",
        "the wall clock jumped by -3600.0 s",
    ]
    assert watch.gaps == 3
