"""Which of an agent's records a run takes (control_plane/model/records.py), and what every new
run is held to (control_plane/model/submission.py): pure decisions, tested as tables."""

from __future__ import annotations

import pytest

from control_plane.model.catalog import CodeCatalog, CodeLocation
from control_plane.model.records import TRAILING_LOG_SECONDS, Take, output_problem, screen_record
from control_plane.model.statuses import RunStatus
from control_plane.model.submission import RunRefused, RunRules, check_new_run, job_tags, new_run
from protocol.messages import CodeLocationInfo, JobInfo, OpInfo, RunRecord
from protocol.tags import TagLimits, tag_problem

STEPS = frozenset({"extract", "load"})
S = RunStatus


def rec(type_: str, step: str | None = None, kind: str = "event") -> RunRecord:
    return RunRecord(seq=1, time=1.0, kind=kind, type=type_, step=step)


@pytest.mark.parametrize(
    ("record", "status", "take"),
    [
        (rec("RUN_START"), S.STARTING, Take.STORE),
        (rec("RUN_START"), S.CANCELING, Take.SKIP),
        (rec("RUN_START"), S.STARTED, Take.REFUSE),
        (rec("RUN_SUCCESS"), S.STARTED, Take.STORE),
        (rec("RUN_SUCCESS"), S.STARTING, Take.REFUSE),
        (rec("RUN_FAILURE"), S.STARTING, Take.STORE),
        (rec("RUN_FAILURE"), S.CANCELING, Take.STORE),
        (rec("RUN_CANCELED"), S.CANCELING, Take.STORE),
        (rec("RUN_CANCELED"), S.STARTED, Take.REFUSE),
        (rec("STEP_START", "extract"), S.STARTED, Take.STORE),
        (rec("STEP_START", "extract"), S.CANCELING, Take.STORE),
        (rec("STEP_START", "extract"), S.STARTING, Take.REFUSE),
        (rec("STEP_START", "nope"), S.STARTED, Take.REFUSE),
        (rec("STEP_START"), S.STARTED, Take.REFUSE),
        (rec("LOG", "load"), S.STARTING, Take.STORE),
        (rec("ENGINE_EVENT"), S.STARTING, Take.STORE),
        (rec("stdout", "extract", "log"), S.STARTING, Take.STORE),
        (rec("stdout", "forged", "log"), S.STARTED, Take.STORE_UNATTRIBUTED),
        (rec("stdin", None, "log"), S.STARTED, Take.REFUSE),
        (rec("RUN_ENQUEUED"), S.STARTED, Take.REFUSE),
        (rec("RUN_RETRY"), S.STARTED, Take.REFUSE),
        (rec("BOGUS_TYPE"), S.STARTED, Take.REFUSE),
        (rec("LOG", "../../x"), S.STARTED, Take.REFUSE),
        (rec("LOG", kind="blob"), S.STARTED, Take.REFUSE),
        (rec("RUN_FAILURE"), S.SUCCESS, Take.REFUSE),
        (rec("STEP_FAILURE", "load"), S.FAILURE, Take.REFUSE),
        (rec("stderr", "load", "log"), S.FAILURE, Take.STORE),
        (rec("RUN_START"), S.QUEUED, Take.REFUSE),
    ],
)
def test_screen_record(record: RunRecord, status: RunStatus, take: Take) -> None:
    got, why = screen_record(record, status, STEPS, end_time=100.0, now=101.0)
    assert got is take, why
    assert why


def test_trailing_logs_have_a_grace_and_no_more() -> None:
    log = rec("stdout", "load", "log")
    late = 100.0 + TRAILING_LOG_SECONDS + 0.1
    assert screen_record(log, S.SUCCESS, STEPS, 100.0, late)[0] is Take.REFUSE


def test_a_job_no_agent_lists_any_more_has_its_steps_checked_by_form_only() -> None:
    assert screen_record(rec("STEP_START", "any"), S.STARTED, None, None, 1.0)[0] is Take.STORE
    assert screen_record(rec("STEP_START", "a/b"), S.STARTED, None, None, 1.0)[0] is Take.REFUSE


def test_output_problem() -> None:
    assert output_problem("load", S.STARTING, STEPS) is None  # uploaded before RUN_START
    assert "not a step" in (output_problem("nope", S.STARTED, STEPS) or "")
    assert "must match" in (output_problem("../x", S.STARTED, None) or "")
    assert "no longer takes" in (output_problem("load", S.FAILURE, STEPS) or "")


def catalog(tags: dict[str, str]) -> CodeCatalog:
    job = JobInfo(name="etl", ops=[OpInfo("extract")], tags=tags)
    info = CodeLocationInfo(name="loc", jobs=[job])
    return CodeCatalog.of(1, {"a1": [CodeLocation("a1", info)]})


def test_a_runs_tags_are_the_jobs_then_the_requests_then_the_control_planes() -> None:
    own = job_tags(
        catalog({"team": "job", "warehouse": "snowflake", "fleetrun/priority": "3"}), "loc", "etl"
    )
    run = new_run(
        "r",
        "etl",
        "loc",
        {"team": "request", "fleetrun/job": "forged"},
        {},
        own_tags={"fleetrun/sensor": "s"},
        job_own_tags=own,
    )
    assert run.tags == {
        "team": "request",
        "warehouse": "snowflake",
        "fleetrun/priority": "3",
        "fleetrun/sensor": "s",
        "fleetrun/job": "etl",
    }
    assert run.priority == 3 and run.queue == "default"
    assert job_tags(catalog({}), "loc", "missing") == {}


def test_what_every_new_run_is_held_to() -> None:
    rules = RunRules(TagLimits(max_tags=2), max_config_bytes=100)

    def refused(**fields: object) -> RunRefused:
        run = new_run("r", "etl", "loc", {}, {})
        for key, value in fields.items():
            setattr(run, key, value)
        with pytest.raises(RunRefused) as caught:
            check_new_run(run, rules)
        return caught.value

    assert refused(job="../x").code == "bad_request"
    assert refused(tags={"a": "1", "b": "2", "c": "3"}).code == "too_many_tags"
    assert refused(tags={"fleetrun/parent_run_id": "x"}).code == "bad_tag"
    assert refused(tags={"fleetrun/priority": "high"}).code == "bad_tag"
    assert refused(config={"k": "x" * 200}).status == 413
    assert refused(config={"n": 2**64}).code == "bad_config"
    assert refused(config=[1]).code == "bad_config"
    assert refused(reuse_outputs={"s": "\ud800"}).code == "undeliverable"
    # the control plane's own tags do not count against the limit
    many = new_run(
        "r",
        "etl",
        "loc",
        {"a": "1", "b": "2"},
        {},
        own_tags={"fleetrun/parent_run_id": "p", "fleetrun/root_run_id": "p"},
    )
    check_new_run(many, rules, reserved_ok=True)


def test_tag_text_must_be_unicode() -> None:
    assert "lone surrogate" in (tag_problem({"\ud800": "x"}) or "")
    assert "lone surrogate" in (tag_problem({"k": "\udc00"}) or "")
