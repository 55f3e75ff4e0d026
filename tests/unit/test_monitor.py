"""Run-monitoring verdicts and retry decisions as pure functions of state and time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from control_plane.config import RunMonitoringConfig, RunRetriesConfig
from control_plane.daemon.monitor import find_verdicts
from control_plane.daemon.retries import decide_retry, retry_delay
from control_plane.model.agents import Agent
from control_plane.model.runs import QueueSnapshot, Run, Verdict
from control_plane.model.statuses import RunStatus

NOW = 10_000.0
BOOT = 0.0


def run(
    run_id: str,
    status: RunStatus,
    since: float = NOW - 1,
    started: float | None = None,
    failure_kind: str | None = None,
    tags: dict[str, str] | None = None,
) -> Run:
    return Run(
        run_id=run_id,
        job="etl",
        location="loc",
        status=status,
        tags=dict(tags or {}),
        config={"x": 1},
        create_time=0,
        agent_id="a1",
        lease=7,
        status_time=since,
        start_time=started if started is not None else since,
        failure_kind=failure_kind,
    )


def agent(heartbeat: float, agent_id: str = "a1") -> Agent:
    return Agent(
        agent_id=agent_id,
        name=f"host-{agent_id}",
        hostname="h",
        status="ONLINE",
        queues=["default"],
        max_concurrent_runs=4,
        version="0",
        last_heartbeat=heartbeat,
        registered_time=0,
    )


def verdicts(
    runs: list[Run], heartbeat: float = NOW - 1, boot: float = BOOT, **config: Any
) -> tuple[list[Verdict], float | None]:
    found, deadline = find_verdicts(
        runs, {"a1": agent(heartbeat)}, NOW, RunMonitoringConfig(**config), boot
    )
    return [v for v in found if isinstance(v, Verdict)], deadline


def test_silent_agent_fails_its_runs_naming_it() -> None:
    found, _ = verdicts(
        [run("r1", RunStatus.STARTED), run("r2", RunStatus.CANCELING)], heartbeat=NOW - 31
    )
    assert [(v.run_id, v.outcome, v.kind, v.offline_agent) for v in found] == [
        ("r1", RunStatus.FAILURE, "agent_lost", "a1"),
        ("r2", RunStatus.CANCELED, "agent_lost", "a1"),
    ]
    assert found[0].message.startswith("agent lost: no heartbeat from agent host-a1 for 31 s")
    assert found[0].lease == 7 and found[0].status == RunStatus.STARTED


def test_a_control_plane_restart_restarts_the_clock() -> None:
    found, next_deadline = verdicts(
        [run("r1", RunStatus.STARTED)], heartbeat=NOW - 100, boot=NOW - 10
    )
    assert found == [] and next_deadline == NOW + 20


def test_after_a_rebase_no_deadline_falls_early() -> None:
    """A restart, a stall or a clock jump (boot) restarts every timer from then."""
    limit = {"fleetrun/max_runtime": "60"}
    runs = [
        run("starting", RunStatus.STARTING, since=NOW - 500),
        run("long", RunStatus.STARTED, started=NOW - 500, tags=limit),
    ]
    runs[0].launch_acked = True
    found, next_deadline = verdicts(runs, heartbeat=NOW - 500, boot=NOW - 5)
    assert found == [] and next_deadline == NOW - 5 + 30  # the heartbeat, then 60, then 180


def test_a_heartbeat_stamped_in_the_future_counts_as_now() -> None:
    """The wall clock stepped back an hour: the agent is judged from now, not from then."""
    found, next_deadline = verdicts([run("r1", RunStatus.STARTED)], heartbeat=NOW + 3600)
    assert found == [] and next_deadline == NOW + 30


def test_start_cancel_and_runtime_deadlines() -> None:
    starting = run("starting", RunStatus.STARTING, since=NOW - 181)
    starting.launch_acked = True
    runs = [
        starting,
        run("unacknowledged", RunStatus.STARTING, since=NOW - 6),
        run("canceling", RunStatus.CANCELING, since=NOW - 181),
        run("long", RunStatus.STARTED, started=NOW - 61, tags={"fleetrun/max_runtime": "60"}),
        run("config_limit", RunStatus.STARTED, started=NOW - 11),
        run("fine", RunStatus.STARTED, started=NOW - 5, tags={"fleetrun/max_runtime": "60"}),
    ]
    found, next_deadline = verdicts(runs, max_runtime_seconds=10)
    assert {v.run_id: (v.outcome, v.kind, v.message) for v in found} == {
        "starting": (RunStatus.FAILURE, "start_timeout", "run did not start within 180 s"),
        "unacknowledged": (
            RunStatus.QUEUED,
            "launch_not_acked",
            "launch not acknowledged by the agent within 5 s; back to the queue",
        ),
        "canceling": (
            RunStatus.CANCELED,
            "cancel_timeout",
            "canceled: the worker did not confirm within 180 s",
        ),
        "long": (RunStatus.FAILURE, "max_runtime", "exceeded max runtime of 60 s"),
        "config_limit": (RunStatus.FAILURE, "max_runtime", "exceeded max runtime of 10 s"),
    }
    assert next_deadline == NOW - 1 + 30  # the heartbeat deadline comes before "fine"'s 55 s


def test_bad_stored_tags_do_not_stop_the_loops() -> None:
    odd = run("odd", RunStatus.STARTED, started=NOW - 11, tags={"fleetrun/max_runtime": "x"})
    found, _ = verdicts([odd], max_runtime_seconds=10)
    assert [v.kind for v in found] == ["max_runtime"]  # falls back to the config value


def test_nothing_active_means_no_deadline() -> None:
    assert verdicts([]) == ([], None)


def failed(kind: str = "op_failure", **tags: str) -> Run:
    return run("r1", RunStatus.FAILURE, failure_kind=kind, tags=tags)


def test_retry_copies_the_run_and_links_the_chain() -> None:
    decision = decide_retry(failed(team="a"), RunRetriesConfig(max_retries=2), NOW, "new")
    retry = decision.retry
    assert retry is not None and (retry.run_id, retry.job, retry.config) == ("new", "etl", {"x": 1})
    assert retry.tags == {
        "team": "a",
        "fleetrun/parent_run_id": "r1",
        "fleetrun/root_run_id": "r1",
        "fleetrun/retry_number": "1",
        "fleetrun/job": "etl",
    }
    assert (retry.parent_run_id, retry.root_run_id, retry.not_before) == ("r1", "r1", None)
    assert decision.message == "retry 1 of 2 queued as run new"


def test_a_retry_that_could_not_be_launched_is_not_made() -> None:
    """A run stored before today's rules (a config nested too deep for the protocol)
    gets no retry that would poison the next agent, and the reason says why."""
    deep: dict = {}
    for _ in range(40):
        deep = {"a": deep}
    poisoned = failed()
    poisoned.config = deep
    decision = decide_retry(poisoned, RunRetriesConfig(max_retries=2), NOW, "new")
    assert decision.retry is None
    assert decision.message.startswith("not retried: config.a.a")
    assert "nested deeper than" in decision.message


def test_retry_limits_tags_and_kinds() -> None:
    config = RunRetriesConfig(max_retries=1)
    by_default = decide_retry(failed(), RunRetriesConfig(), NOW, "n")
    assert by_default.retry is None
    assert by_default.message.startswith("not retried: max_retries is 0")
    off = decide_retry(failed(), RunRetriesConfig(enabled=False, max_retries=3), NOW, "n")
    assert (off.retry, off.message) == (
        None,
        "not retried: run retries are off ([run_retries] enabled)",
    )
    zero = decide_retry(failed(**{"fleetrun/max_retries": "0"}), config, NOW, "n")
    assert zero.retry is None and zero.message.startswith("not retried: max_retries is 0")
    tagged = decide_retry(failed(**{"fleetrun/max_retries": "3"}), RunRetriesConfig(), NOW, "n")
    assert tagged.retry is not None and "of 3" in tagged.message
    used = decide_retry(failed(**{"fleetrun/retry_number": "1"}), config, NOW, "n")
    assert (used.retry, used.message) == (None, "not retried: all 1 retries used")
    no_ops = RunRetriesConfig(max_retries=1, retry_on_op_failure=False)
    assert decide_retry(failed("op_failure"), no_ops, NOW, "n").retry is None
    for kind in ("worker_crash", "agent_lost", "agent_restarted", "start_timeout"):
        assert decide_retry(failed(kind), no_ops, NOW, "n").retry is not None


def test_the_retry_on_op_failure_tag_overrides_the_instance_either_way() -> None:
    """Dagster's dagster/retry_on_asset_or_op_failure: a run asks for retries of
    infrastructure failures only, or of op failures too, whatever the default."""
    only_infra = failed("op_failure", **{"fleetrun/retry_on_op_failure": "false"})
    decision = decide_retry(only_infra, RunRetriesConfig(max_retries=1), NOW, "n")
    assert decision.retry is None
    assert decision.message == (
        "not retried: an op failed and tag fleetrun/retry_on_op_failure is false"
    )
    crashed = failed("worker_crash", **{"fleetrun/retry_on_op_failure": "false"})
    assert decide_retry(crashed, RunRetriesConfig(max_retries=1), NOW, "n").retry is not None
    wants_ops = failed("op_failure", **{"fleetrun/retry_on_op_failure": "true"})
    no_ops = RunRetriesConfig(max_retries=1, retry_on_op_failure=False)
    assert decide_retry(wants_ops, no_ops, NOW, "n").retry is not None


def test_retry_delay_and_backoff() -> None:
    def delays(backoff: str) -> list[float]:
        config = RunRetriesConfig(delay_seconds=2, backoff=backoff)
        return [retry_delay(config, n) for n in (1, 2, 3)]

    assert delays("none") == [2, 2, 2]
    assert delays("linear") == [2, 4, 6]
    assert delays("exponential") == [2, 6, 14]
    config = RunRetriesConfig(max_retries=1, delay_seconds=5)
    decision = decide_retry(failed(), config, NOW, "n")
    assert decision.retry is not None and decision.retry.not_before == NOW + 5
    assert decision.message.endswith("it starts after 5 s")


async def test_the_retrier_settles_a_bad_run_and_goes_on(tmp_path: Path) -> None:
    from control_plane.bus import WakeBus
    from control_plane.daemon.retries import Retrier, retry_pass
    from control_plane.model.runs import NewRun, RunFilter
    from control_plane.storage import open_storage
    from protocol.messages import CodeLocationInfo, JobInfo, OpInfo, RunRecord

    etl = JobInfo(name="etl", ops=[OpInfo(name="a")])
    storage = open_storage(f"sqlite:///{tmp_path}/r.db")
    await storage.open()
    try:
        agent = await storage.register_agent(
            "w", "h", "0", ["default"], 2, [CodeLocationInfo(name="loc", jobs=[etl])], now=1
        )
        runs: tuple[tuple[str, dict[str, str]], ...] = (
            ("bad", {"fleetrun/retry_number": "x"}),
            ("good", {}),
            ("all", {"fleetrun/retry_strategy": "ALL_STEPS"}),
        )
        for run_id, tags in runs:
            await storage.create_run(NewRun(run_id, "etl", "loc", tags, {}), now=1)

            def decide(_snapshot: QueueSnapshot, r: str = run_id) -> list[tuple[str, str]]:
                return [(r, agent.agent_id)]

            (run,) = await storage.assign_queued(2, decide)
            records = [
                RunRecord(seq=1, time=3, kind="event", type="RUN_START"),
                RunRecord(seq=2, time=3, kind="event", type="STEP_SUCCESS", step="a"),
                RunRecord(seq=3, time=3, kind="event", type="RUN_FAILURE"),
            ]
            await storage.append_records(run_id, run.lease, records, now=3)  # type: ignore[arg-type]
        retrier = Retrier(storage, RunRetriesConfig(max_retries=1), WakeBus(storage, "r"))
        await retry_pass(retrier, now=4)
        retries, _ = await storage.list_runs(RunFilter(statuses=[RunStatus.QUEUED]), 10, None)
        queued = retries[::-1]  # oldest first
        assert [r.parent_run_id for r in queued] == ["good", "all"]
        assert [r.reuse_outputs for r in queued] == [{"a": "good"}, {}]  # FROM_FAILURE default
        assert await storage.pending_retries(10) == []
        bad = [e for e in await storage.get_events("bad", 0, 100) if e.type == "RUN_RETRY"]
        assert bad[0].message.startswith("not retried: invalid literal")
    finally:
        await storage.close()
