"""The retention loop's decision (pure) and one pass over real storage."""

from __future__ import annotations

import pytest

from control_plane.config import RetentionConfig
from control_plane.daemon.retention import (
    DAY_SECONDS,
    IDLE_SECONDS,
    Retention,
    due_purges,
    enabled,
    retention_pass,
    retention_rules,
)
from control_plane.metrics import Metrics
from control_plane.model.retention import COMPUTE_LOGS, RUNS, TICKS, Purge, RetentionSnapshot
from control_plane.storage import Storage
from protocol.schema import FieldError
from tests.unit.test_storage import agent_id
from tests.unit.test_storage_retention import finished

NOW = 100 * DAY_SECONDS


def test_nothing_ages_out_by_default() -> None:
    assert not enabled(RetentionConfig())
    assert retention_rules(RetentionConfig(), NOW) == []


def test_rules_come_in_purge_order_with_their_cutoffs() -> None:
    config = RetentionConfig(success_days=30, compute_logs_days=7, ticks_skipped_days=1)
    assert retention_rules(config, NOW) == [
        Purge(RUNS, "SUCCESS", NOW - 30 * DAY_SECONDS),
        Purge(COMPUTE_LOGS, None, NOW - 7 * DAY_SECONDS),
        Purge(TICKS, "SKIPPED", NOW - 1 * DAY_SECONDS),
    ]


def test_a_purge_is_due_only_when_something_is_older_than_its_cutoff() -> None:
    config = RetentionConfig(success_days=30, failure_days=90, compute_logs_days=7)
    snapshot = RetentionSnapshot(
        {
            (RUNS, "SUCCESS"): NOW - 31 * DAY_SECONDS,
            (RUNS, "FAILURE"): NOW - 89 * DAY_SECONDS,
            (COMPUTE_LOGS, None): None,
        }
    )
    assert due_purges(config, NOW, snapshot) == [Purge(RUNS, "SUCCESS", NOW - 30 * DAY_SECONDS)]


@pytest.mark.parametrize(
    ("config", "bad"),
    [
        (RetentionConfig(success_days=-1), ["success_days"]),
        (RetentionConfig(1, 2, 3, compute_logs_days=2, outputs_days=1), ["compute_logs_days"]),
        (RetentionConfig(success_days=1, compute_logs_days=5), []),  # failures kept: allowed
    ],
)
def test_config_problems_name_the_key(config: RetentionConfig, bad: list[str]) -> None:
    assert [p.field for p in config.problems() if isinstance(p, FieldError)] == bad


async def test_a_pass_purges_in_batches_and_counts_what_it_removed(storage: Storage) -> None:
    aid = await agent_id(storage)
    for i in range(3):
        await finished(storage, f"r{i}", aid, end=100 + i)
    metrics = Metrics()
    retention = Retention(storage, RetentionConfig(success_days=1), metrics, batch_runs=2)
    assert await retention_pass(retention, NOW) == NOW + retention.pause  # a full batch
    assert await retention_pass(retention, NOW) == NOW + IDLE_SECONDS
    assert [await storage.get_run(f"r{i}") for i in range(3)] == [None, None, None]
    text = metrics.exposition().decode()
    assert 'fleetrun_retention_rows_purged_total{table="runs"} 3.0' in text
    assert 'fleetrun_retention_rows_purged_total{table="events"} 15.0' in text
    assert "fleetrun_retention_bytes_purged_total 0.0" not in text
