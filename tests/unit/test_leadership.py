"""Leader election of the daemon loops, on a manual clock (no sleeping) and a real
storage shared by two electors, as two replicas would share PostgreSQL."""

from __future__ import annotations

import asyncio

import pytest

from control_plane.daemon.health import DaemonHealth
from control_plane.daemon.leadership import LeaderElector
from control_plane.storage import Storage


class ManualClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now


def elector(storage: Storage, clock: ManualClock, name: str, runs: list[str]) -> LeaderElector:
    e = LeaderElector(storage, clock, DaemonHealth(clock), name, lease_seconds=6.0)

    async def loop() -> None:
        runs.append(name)
        await asyncio.Event().wait()

    e.add("run-queue", loop)
    return e


async def test_one_replica_runs_a_loop_and_another_takes_over_after_it_dies(
    storage: Storage,
) -> None:
    clock = ManualClock()
    runs: list[str] = []
    a, b = elector(storage, clock, "a", runs), elector(storage, clock, "b", runs)
    # Given replica a asked first: it runs the loop, b stands by
    await a.elect_once()
    await b.elect_once()
    await asyncio.sleep(0)
    assert (a.leading(), b.leading(), runs) == (["run-queue"], [], ["a"])
    assert b.health.standby_loops == set()  # never ran it: nothing to hand over
    # When a keeps renewing, the lease stays with it however long it runs
    for _ in range(5):
        clock.now += 2.0
        await a.elect_once()
        await b.elect_once()
    assert a.holds("run-queue") and not b.holds("run-queue")
    # When a stops renewing (it died), b cannot take over before the lease expires...
    clock.now += 5.0
    await b.elect_once()
    assert b.leading() == []
    # ...and by then a (were it only frozen) no longer trusts its own lease
    assert not a.holds("run-queue")
    # Then once the lease has expired, b takes the loop over
    clock.now += 1.5
    await b.elect_once()
    await asyncio.sleep(0)
    assert b.leading() == ["run-queue"] and runs == ["a", "b"]
    # And a, waking up, finds the lease gone and stops its loop
    await a.elect_once()
    assert a.leading() == [] and "run-queue" in a.health.standby_loops
    await b.release_all()
    await a.release_all()


async def test_a_clean_shutdown_hands_the_lease_over_at_once(storage: Storage) -> None:
    clock = ManualClock()
    runs: list[str] = []
    a, b = elector(storage, clock, "a", runs), elector(storage, clock, "b", runs)
    await a.elect_once()
    await a.release_all()
    await b.elect_once()  # no waiting out the lease
    assert b.leading() == ["run-queue"]
    leaders = await storage.leaders()
    assert leaders["run-queue"][0] == "b"
    await b.release_all()


async def test_a_replica_that_cannot_renew_stops_before_the_lease_can_pass_on(
    storage: Storage, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = ManualClock()
    runs: list[str] = []
    a = elector(storage, clock, "a", runs)
    await a.elect_once()

    async def unreachable(*_args: object) -> bool:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(storage, "try_lead", unreachable)
    clock.now += 2.0
    await a.elect_once()  # unknown: still surely ours for a while
    assert a.leading() == ["run-queue"]
    clock.now += 3.0  # 5 s after the last renewal: past 80 % of the 6 s lease
    await a.elect_once()
    assert a.leading() == []
    assert a.health.loops["leader-election"].last_error is not None
