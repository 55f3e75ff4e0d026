"""Executors run directly (no agent, no control plane): events, retries, processes.

The run's records go to a file through the real RecordSink and are read back; the
multiprocess executor really forks.
"""

from __future__ import annotations

import importlib.util
import os
import pickle
import time
from pathlib import Path

import pytest

from agent.sdk import Definitions, JobDefinition
from agent.worker.executors import Execution, get_executor
from agent.worker.outputs import FilesystemOutputStore
from agent.worker.records import RecordSink
from protocol.codec import FRAME_HEADER_SIZE, decode, frame_length
from protocol.messages import LaunchRun, RunRecord
from tests.conftest import FIXTURES


def _definitions(name: str = "executor_jobs") -> Definitions:
    spec = importlib.util.spec_from_file_location(name, FIXTURES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.defs


DEFS = _definitions()


def read_records(path: Path) -> list[RunRecord]:
    data, records = path.read_bytes(), []
    while data:
        size = frame_length(data[:FRAME_HEADER_SIZE])
        records.append(decode(data[FRAME_HEADER_SIZE : FRAME_HEADER_SIZE + size], RunRecord))
        data = data[FRAME_HEADER_SIZE + size :]
    return records


def execute(
    tmp_path: Path,
    job_name: str,
    executor: str | None = None,
    *,
    max_output_bytes: int = 1 << 24,
    reuse: dict[str, str] | None = None,
    run_id: str = "run-1",
    defs: Definitions = DEFS,
) -> tuple[list[str], list[RunRecord]]:
    job: JobDefinition = defs.get_job(job_name)
    options = dict(job.executor) if executor is None else {"name": executor}
    log = tmp_path / f"{run_id}.records"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        launch = LaunchRun(
            run_id=run_id, job=job_name, location="ex", lease=1, config={"dir": str(tmp_path)}
        )
        execution = Execution(
            job,
            launch,
            RecordSink(fd),
            options,
            FilesystemOutputStore(str(tmp_path / "store")),
            max_output_bytes,
            reuse or {},
        )
        failed = get_executor(options["name"])(execution)
    finally:
        os.close(fd)
    return failed, read_records(log)


def events(records: list[RunRecord], event_type: str) -> list[RunRecord]:
    return [r for r in records if r.kind == "event" and r.type == event_type]


def by_step(records: list[RunRecord], event_type: str) -> dict[str | None, RunRecord]:
    return {r.step: r for r in events(records, event_type)}


EXECUTORS = ["in_process", "multiprocess"]


def test_independent_steps_run_in_parallel(tmp_path: Path) -> None:
    started = time.monotonic()
    failed, records = execute(tmp_path, "parallel")
    elapsed = time.monotonic() - started
    assert failed == [] and elapsed < 3.0, elapsed  # four 1 s steps, max_concurrent 4
    assert set(by_step(records, "STEP_SUCCESS")) == {
        "sleep_0",
        "sleep_1",
        "sleep_2",
        "sleep_3",
        "gather",
    }
    stored = FilesystemOutputStore(str(tmp_path / "store")).get("run-1", "gather")
    assert pickle.loads(stored) == ["sleep_0", "sleep_1", "sleep_2", "sleep_3"]
    assert by_step(records, "STEP_OUTPUT")["gather"].message == "output of type list"


@pytest.mark.parametrize("executor", EXECUTORS)
def test_a_failed_step_skips_its_downstream_and_other_branches_finish(
    tmp_path: Path, executor: str
) -> None:
    failed, records = execute(tmp_path, "pipeline", executor)
    assert failed == ["flaky"]
    assert set(by_step(records, "STEP_SUCCESS")) == {"produce", "independent"}
    skipped = by_step(records, "STEP_SKIPPED")
    assert set(skipped) == {"consume"} and skipped["consume"].data["upstream"] == ["flaky"]
    failure = by_step(records, "STEP_FAILURE")["flaky"]
    assert failure.data["error_type"] == "ValueError" and "in flaky" in failure.data["traceback"]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_retry_waits_follow_the_policy(tmp_path: Path, executor: str) -> None:
    failed, records = execute(tmp_path, "retries", executor)
    assert sorted(failed) == ["exponential", "full_jitter", "gives_up", "linear", "plus_minus"]
    waits: dict[str, list[float]] = {}
    for r in events(records, "STEP_UP_FOR_RETRY"):
        waits.setdefault(r.step or "", []).append(r.data["wait_seconds"])
        assert r.data["retry_number"] == len(waits[r.step or ""])
    assert waits["exponential"] == pytest.approx([0.05, 0.15])  # (2^n - 1) * delay
    assert waits["linear"] == pytest.approx([0.05, 0.10])  # n * delay
    assert all(0 <= w <= 0.05 for w in waits["full_jitter"]) and len(waits["full_jitter"]) == 3
    for n, wait in enumerate(waits["plus_minus"], start=1):  # n * delay +- delay
        assert n * 0.05 - 0.05 <= wait <= n * 0.05 + 0.05
    assert waits["requested"] == [0.01, 0.01]  # RetryRequested(seconds_to_wait=...)
    assert "gives_up" not in waits  # Failure(allow_retries=False)
    restarted = [r.step for r in events(records, "STEP_RESTARTED")]
    counts = {step: restarted.count(step) for step in set(restarted)}
    assert counts == {
        "exponential": 2,
        "linear": 2,
        "full_jitter": 3,
        "plus_minus": 3,
        "requested": 2,
    }
    assert set(by_step(records, "STEP_SUCCESS")) == {"requested"}


@pytest.mark.parametrize("executor", EXECUTORS)
def test_an_invocation_retry_policy_retries_only_that_invocation(
    tmp_path: Path, executor: str
) -> None:
    failed, records = execute(tmp_path, "invocation_retries", executor)
    assert failed == ["fails_twice"]
    retries = [(r.step, r.data["retry_number"]) for r in events(records, "STEP_UP_FOR_RETRY")]
    assert retries == [("retried", 1), ("retried", 2)]
    assert set(by_step(records, "STEP_SUCCESS")) == {"retried"}
    assert set(by_step(records, "STEP_FAILURE")) == {"fails_twice"}
    assert (tmp_path / "count-retried").read_text() == "xxx"
    assert (tmp_path / "count-fails_twice").read_text() == "x"


def test_child_process_deaths_and_unpicklable_things(tmp_path: Path) -> None:
    failed, records = execute(tmp_path, "child_trouble")
    assert sorted(failed) == ["dies_always", "raises_unpicklable", "returns_unpicklable"]
    success = by_step(records, "STEP_SUCCESS")
    assert set(success) == {"dies_once"}  # its policy retried it after the crash
    retry = by_step(records, "STEP_UP_FOR_RETRY")["dies_once"]
    assert retry.data["error_type"] == "StepProcessDied" and retry.data["exit_code"] == 9
    failures = by_step(records, "STEP_FAILURE")
    assert failures["dies_always"].data["exit_code"] == 11
    assert "exited with code 11" in failures["dies_always"].message
    assert failures["raises_unpicklable"].data["error_type"] == "Unpicklable"
    assert failures["raises_unpicklable"].data["message"] == "carries a lock"
    assert "pickle" in failures["returns_unpicklable"].message.lower()
    logs = "".join(r.message for r in records if r.kind == "log" and r.step == "dies_once")
    assert "dying now" in logs


@pytest.mark.parametrize("executor", EXECUTORS)
def test_an_output_over_the_cap_fails_its_step(tmp_path: Path, executor: str) -> None:
    failed, records = execute(tmp_path, "big_output", executor, max_output_bytes=1000)
    assert failed == ["big"]
    message = by_step(records, "STEP_FAILURE")["big"].data["message"]
    assert "over the output store's limit of 1000 bytes" in message


@pytest.mark.parametrize("executor", [None, "in_process"])
def test_ready_steps_start_by_priority_tag(tmp_path: Path, executor: str | None) -> None:
    failed, _ = execute(tmp_path, "prioritized", executor)
    assert failed == [] and (tmp_path / "order").read_text().split() == ["high", "low", "plain"]


@pytest.mark.parametrize("executor", [None, "in_process"])
def test_an_invocation_tag_sets_the_step_priority(tmp_path: Path, executor: str | None) -> None:
    failed, _ = execute(tmp_path, "prioritized_invocations", executor)
    assert failed == [] and (tmp_path / "order").read_text().split() == ["sooner", "later"]


@pytest.mark.parametrize("executor", EXECUTORS)
def test_reused_outputs_are_loaded_not_recomputed(tmp_path: Path, executor: str) -> None:
    failed, _ = execute(tmp_path, "pipeline", executor, run_id="parent")
    assert failed == ["flaky"]
    (tmp_path / "fixed").touch()
    failed, records = execute(
        tmp_path,
        "pipeline",
        executor,
        run_id="child",
        reuse={"produce": "parent", "independent": "parent"},
    )
    assert failed == []
    assert set(by_step(records, "STEP_REUSED")) == {"produce", "independent"}
    assert set(by_step(records, "STEP_SUCCESS")) == {"flaky", "consume"}
    assert (tmp_path / "count-produce").read_text() == "x"  # ran once, in the parent
    assert (tmp_path / "consumed").read_text() == "6"
    # An output no step that runs needs is not even loaded (here: it no longer unpickles)
    FilesystemOutputStore(str(tmp_path / "store")).put("parent", "independent", b"garbage")
    failed, _ = execute(
        tmp_path,
        "pipeline",
        executor,
        run_id="again",
        reuse={"produce": "parent", "independent": "parent"},
    )
    assert failed == []


def test_unknown_executor_is_named(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown executor 'nope'"):
        get_executor("nope")


def test_the_documented_custom_executor_runs(tmp_path: Path) -> None:
    defs = _definitions("custom_executor_jobs")  # importing it registers "audited"
    failed, records = execute(tmp_path, "audited_job", defs=defs)
    assert failed == []
    assert [r.message for r in events(records, "LOG")] == [
        "audit: starting one",
        "audit: starting two",
    ]
    assert pickle.loads(FilesystemOutputStore(str(tmp_path / "store")).get("run-1", "two")) == 2
