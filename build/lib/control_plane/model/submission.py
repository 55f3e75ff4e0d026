"""The rules every new run meets, however it comes to be.

A run is created by an API submission, a re-execution, a run retry, or a schedule or
sensor tick. Each path builds a `NewRun` with `new_run` and checks it with
`check_new_run` before storing it, so that:

- a job's own tags reach its runs (under the request's, which win on conflict, and the
  control plane's own), and limits, queues and priorities set on a job apply;
- its tags pass the tag rules, naming the tag that does not;
- its config fits `max_run_config_bytes`, and it and everything else the launch message
  carries can be delivered to and decoded by an agent (protocol/wire.py): what is
  accepted here can always be launched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from control_plane.errors import ControlPlaneError
from control_plane.model.catalog import CodeCatalog
from control_plane.model.runs import NewRun
from protocol.messages import LaunchRun, PollReply
from protocol.schema import INT64_MAX
from protocol.tags import (
    DEFAULT_TAG_LIMITS,
    JOB_TAG,
    PRIORITY_TAG,
    QUEUE_TAG,
    TagLimits,
    tag_problem,
)
from protocol.validation import name_problem
from protocol.wire import delivery_problem, payload_problem


class RunRefused(ControlPlaneError):
    """A run that may not be created; `status` and `code` are what the API answers."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class RunRules:
    """The limits a new run is held to (`[limits]` in control-plane.toml)."""

    tags: TagLimits = DEFAULT_TAG_LIMITS
    max_config_bytes: int = 1024 * 1024


DEFAULT_RUN_RULES = RunRules()


def job_tags(catalog: CodeCatalog, location: str, job: str) -> dict[str, str]:
    """The tags the job itself carries (`@job(tags=...)`), as its location defines it."""
    info = catalog.job_info(location, job)
    return dict(info.tags) if info is not None else {}


def new_run(
    run_id: str,
    job: str,
    location: str,
    tags: dict[str, str],
    config: dict[str, Any],
    own_tags: dict[str, str] | None = None,
    job_own_tags: dict[str, str] | None = None,
    **fields: Any,
) -> NewRun:
    """A NewRun whose tags are the job's, then `tags` (the request's), then `own_tags`
    (the control plane's); its priority and queue are read from the merged tags."""
    merged = {**(job_own_tags or {}), **tags, **(own_tags or {}), JOB_TAG: job}
    return NewRun(
        run_id=run_id,
        job=job,
        location=location,
        tags=merged,
        config=config,
        priority=_priority(merged),
        queue=merged.get(QUEUE_TAG, "default"),
        **fields,
    )


def _priority(tags: dict[str, str]) -> int:
    try:
        return int(tags.get(PRIORITY_TAG, "0"))
    except ValueError:  # refused by check_new_run, which names the tag
        return 0


def check_config(config: Any, rules: RunRules) -> None:
    """RunRefused if a run's config is not a JSON object an agent can receive, or is
    over `max_config_bytes` of JSON."""
    if not isinstance(config, dict):
        raise RunRefused(422, "bad_config", "config must be a JSON object")
    if (problem := payload_problem(config, "config")) is not None:
        raise RunRefused(422, "bad_config", f"{problem}: an agent could not receive it")
    size = len(json.dumps(config, separators=(",", ":")))
    if size > rules.max_config_bytes:
        raise RunRefused(
            413,
            "run_config_too_large",
            f"run config is {size} bytes of JSON; max_run_config_bytes is {rules.max_config_bytes}",
        )


def check_new_run(
    run: NewRun, rules: RunRules, reserved_ok: bool = False, config_checked: bool = False
) -> None:
    """RunRefused naming the first thing wrong with `run`; `reserved_ok`: the control
    plane made the run (a retry or re-execution) and set its lineage tags itself;
    `config_checked`: `check_config` already passed."""
    for field, value in (("job", run.job), ("location", run.location)):
        if (problem := name_problem(value)) is not None:
            raise RunRefused(422, "bad_request", f"{field} {problem}")
    problem = tag_problem(run.tags, rules.tags, reserved_ok=reserved_ok)
    if problem is not None:
        code = "too_many_tags" if problem.startswith("a run may") else "bad_tag"
        raise RunRefused(422, code, problem)
    if not config_checked:
        check_config(run.config, rules)
    if (problem := launch_problem(run)) is not None:
        raise RunRefused(422, "undeliverable", f"this run could not be sent to an agent: {problem}")


def launch_problem(run: NewRun) -> str | None:
    """Why the launch message of `run` would not reach an agent; None if it would."""
    launch = LaunchRun(
        run_id=run.run_id,
        job=run.job,
        location=run.location,
        lease=INT64_MAX,
        tags=run.tags,
        config=run.config,
        reuse_outputs=run.reuse_outputs,
    )
    return delivery_problem(PollReply(launches=[launch]))
