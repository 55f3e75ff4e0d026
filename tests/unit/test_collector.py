"""The control plane's garbage-collection schedule (control_plane/collector.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Iterator

import pytest

from control_plane import collector


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def restore_gc() -> Iterator[None]:
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tuning_moves_full_collections_off_the_allocation_counter(restore_gc: None) -> None:
    collector.tune()
    young, _, full = gc.get_threshold()
    assert young == collector.YOUNG_THRESHOLD and full >= 2**30
    assert gc.get_freeze_count() > 0  # start-up objects are out of every collection


async def test_the_scheduled_pass_frees_cyclic_garbage(restore_gc: None) -> None:
    collector.tune()
    garbage = _Cycle()
    alive = weakref.ref(garbage)
    gc.collect()  # it survives into the oldest generation, like a finished long-poll's
    del garbage
    gc.collect(1)
    assert alive() is not None  # young collections do not look there: a full one must
    passes = 0

    async def one_pass_then_stop(seconds: float) -> None:
        nonlocal passes
        assert seconds == 60.0
        passes += 1
        if passes > 1:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await collector.collect_forever(every=60.0, sleep=one_pass_then_stop)
    assert alive() is None


def test_every_collection_reports_its_generation_and_pause() -> None:
    seen: list[tuple[int, float]] = []
    undo = collector.observe_pauses(lambda generation, took: seen.append((generation, took)))
    try:
        gc.collect(1)
    finally:
        undo()
    assert seen[-1][0] == 1 and seen[-1][1] >= 0
    gc.collect(1)
    assert len([g for g, _ in seen if g == 1]) == 1  # undone: no longer observed


async def test_event_loop_lag_is_how_late_each_timer_fired() -> None:
    now = 100.0
    lags: list[float] = []
    late_by = iter([0.0, 0.3, -0.001])  # a stall, then a timer a hair early (clock noise)

    def monotonic() -> float:
        return now

    async def sleep(seconds: float) -> None:
        nonlocal now
        try:
            now += seconds + next(late_by)
        except StopIteration:
            raise asyncio.CancelledError from None

    with pytest.raises(asyncio.CancelledError):
        await collector.measure_lag_forever(lags.append, 0.5, sleep, monotonic)
    assert lags == [0.0, pytest.approx(0.3), 0.0]
