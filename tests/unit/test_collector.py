"""The control plane's garbage-collection schedule (control_plane/collector.py)."""

from __future__ import annotations

import asyncio
import gc
import weakref

import pytest

from control_plane import collector


class _Cycle:
    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def restore_gc():  # type: ignore[no-untyped-def]
    before = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*before)


def test_tuning_moves_full_collections_off_the_allocation_counter(restore_gc) -> None:  # type: ignore[no-untyped-def]
    collector.tune()
    young, _, full = gc.get_threshold()
    assert young == collector.YOUNG_THRESHOLD and full >= 2**30
    assert gc.get_freeze_count() > 0  # start-up objects are out of every collection


async def test_the_scheduled_pass_frees_cyclic_garbage(restore_gc) -> None:  # type: ignore[no-untyped-def]
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
