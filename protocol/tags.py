"""Run tags: the reserved names (the contract in DESIGN.md) and the rules every tag meets.

Both sides read tags (the agent `fleetrun/on_lost_contact`, executors
`fleetrun/priority` on ops), and tags come from users, jobs, schedules and sensors, so
the names and the rules live here, once. `tag_problem` is applied wherever a run is
created and wherever an agent describes a job, and names the tag it refuses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass

from protocol.wire import text_problem

PRIORITY_TAG = "fleetrun/priority"
QUEUE_TAG = "fleetrun/queue"
JOB_TAG = "fleetrun/job"
MAX_RETRIES_TAG = "fleetrun/max_retries"
RETRY_STRATEGY_TAG = "fleetrun/retry_strategy"
MAX_RUNTIME_TAG = "fleetrun/max_runtime"
ON_LOST_CONTACT_TAG = "fleetrun/on_lost_contact"
PARENT_TAG = "fleetrun/parent_run_id"
ROOT_TAG = "fleetrun/root_run_id"
RETRY_NUMBER_TAG = "fleetrun/retry_number"
REEXECUTION_TAG = "fleetrun/reexecution_strategy"
SCHEDULE_TAG = "fleetrun/schedule"
SENSOR_TAG = "fleetrun/sensor"
TICK_TAG = "fleetrun/tick"
RUN_KEY_TAG = "fleetrun/run_key"
RETRY_ON_OP_FAILURE_TAG = "fleetrun/retry_on_op_failure"
# The Docker launcher's image for a run (agent.toml [docker] gives the default).
IMAGE_TAG = "fleetrun/image"
REQUIRES_TAG = "fleetrun/requires"  # label selector: key=value[,key=value...]
# Resources a run needs: its agent must offer them ([resources] in agent.toml), and under
# the Docker launcher they are also its container's limits.
CPUS_TAG = "fleetrun/cpus"
MEMORY_MB_TAG = "fleetrun/memory_mb"
GPUS_TAG = "fleetrun/gpus"
# Resources a run asks of its agent, by the name agent.toml's [resources] gives them.
RESOURCE_TAGS = {CPUS_TAG: "cpus", MEMORY_MB_TAG: "memory_mb", GPUS_TAG: "gpus"}
RESOURCE_NAMES = tuple(RESOURCE_TAGS.values())
MAX_RESOURCE = 10**9
CODE_VERSION_TAG = "fleetrun/code_version"  # run only where this code version is served

RETRY_STRATEGIES = ("FROM_FAILURE", "ALL_STEPS")
ON_LOST_CONTACT_CHOICES = ("continue", "stop")
# Set by the control plane on retries and re-executions; refused anywhere else.
RESERVED_TAGS = frozenset({PARENT_TAG, ROOT_TAG, RETRY_NUMBER_TAG, REEXECUTION_TAG})
# What the control plane adds to a run; they do not count against max_tags_per_run.
SYSTEM_TAGS = RESERVED_TAGS | {JOB_TAG, SCHEDULE_TAG, SENSOR_TAG, TICK_TAG, RUN_KEY_TAG}


@dataclass(frozen=True)
class TagLimits:
    """`[limits]` max_tags_per_run, max_tag_key_length, max_tag_value_length."""

    max_tags: int = 64
    max_key: int = 128
    max_value: int = 4096


DEFAULT_TAG_LIMITS = TagLimits()


def code_version_ok(version: str) -> bool:
    """A code version: a git commit or a content hash, letters and digits only."""
    return 0 < len(version) <= 64 and version.isascii() and version.isalnum()


def _integer(value: str, minimum: int, maximum: int) -> str | None:
    try:
        number = int(value)
    except ValueError:
        return "must be an integer"
    if not minimum <= number <= maximum:
        return f"must be an integer from {minimum} to {maximum}"
    return None


def _seconds(value: str) -> str | None:
    try:
        number = float(value)
    except ValueError:
        return "must be a number of seconds"
    return None if math.isfinite(number) and number >= 0 else "must be a number of seconds >= 0"


def _cpus(value: str) -> str | None:
    try:
        number = float(value)
    except ValueError:
        return "must be a number of CPUs"
    return (
        None
        if math.isfinite(number) and 0 < number <= 1024
        else "must be a number of CPUs in (0, 1024]"
    )


# What Docker takes as an image reference: [registry[:port]/]path[:tag][@digest].
_IMAGE = re.compile(
    r"(?:[a-zA-Z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
    r"(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@[a-z0-9]+:[a-fA-F0-9]{32,})?"
)


def image_problem(value: str) -> str | None:
    """What is wrong with a Docker image reference; None if nothing."""
    if len(value) > 255 or _IMAGE.fullmatch(value) is None:
        return "must be a Docker image reference such as fleetrun-worker:latest"
    return None


def label_selector(value: str) -> dict[str, str]:
    """`key=value[,key=value...]` as a dict; ValueError naming the part that is not."""
    pairs: dict[str, str] = {}
    for part in value.split(","):
        key, sep, wanted = (p.strip() for p in part.partition("="))
        if not sep or not key or not wanted:
            raise ValueError(f"{part.strip()!r} is not key=value")
        if key in pairs and pairs[key] != wanted:
            raise ValueError(f"label {key} is asked for twice, as {pairs[key]} and {wanted}")
        pairs[key] = wanted
    return pairs


def _selector(value: str) -> str | None:
    try:
        label_selector(value)
    except ValueError as exc:
        return f"must be key=value[,key=value...]: {exc}"
    return None


def run_resources(tags: dict[str, str]) -> dict[str, float]:
    """What a run asks of its agent (`fleetrun/cpus`...), by resource name (cpus may be a
    fraction, as a container limit); a tag that is not a number counts as 0 (submission
    refuses it before it gets here)."""
    wanted = {}
    for tag, name in RESOURCE_TAGS.items():
        try:
            amount = float(tags.get(tag, "0"))
        except ValueError:
            amount = 0.0
        if amount > 0:
            wanted[name] = amount
    return wanted


def run_labels(tags: dict[str, str]) -> dict[str, str]:
    """The labels a run's agent must have (`fleetrun/requires`); {} if none or unreadable."""
    try:
        return label_selector(tags[REQUIRES_TAG]) if tags.get(REQUIRES_TAG) else {}
    except ValueError:
        return {}


def _one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


TAG_CHECKS: dict[str, Callable[[str], str | None]] = {
    PRIORITY_TAG: lambda value: _integer(value, -(2**31), 2**31 - 1),
    MAX_RETRIES_TAG: lambda value: _integer(value, 0, 1000),
    RETRY_STRATEGY_TAG: _one_of(*RETRY_STRATEGIES),
    MAX_RUNTIME_TAG: _seconds,
    ON_LOST_CONTACT_TAG: _one_of(*ON_LOST_CONTACT_CHOICES),
    RETRY_ON_OP_FAILURE_TAG: _one_of("true", "false"),
    IMAGE_TAG: image_problem,
    REQUIRES_TAG: _selector,
    CPUS_TAG: _cpus,
    # Docker's smallest memory limit is 6 MB.
    MEMORY_MB_TAG: lambda value: _integer(value, 6, 16 * 1024 * 1024),
    GPUS_TAG: lambda value: _integer(value, 0, MAX_RESOURCE),
    CODE_VERSION_TAG: lambda value: (
        None if code_version_ok(value) else "must be a code version (letters and digits, <= 64)"
    ),
}


def tag_problem(
    tags: dict[str, str], limits: TagLimits = DEFAULT_TAG_LIMITS, reserved_ok: bool = False
) -> str | None:
    """What is wrong with a run's tags, naming the tag or the limit; None if nothing.
    `reserved_ok`: the control plane's own tags (a retry's parent) are allowed."""
    if not isinstance(tags, dict):
        return "tags must be a table of strings"
    if len(tags.keys() - SYSTEM_TAGS) > limits.max_tags:
        return f"a run may have at most {limits.max_tags} tags (max_tags_per_run)"
    for key, value in tags.items():
        if not isinstance(key, str) or not key or len(key) > limits.max_key:
            return f"tag keys must be 1 to {limits.max_key} characters (max_tag_key_length)"
        if (problem := text_problem(key)) is not None:
            return f"tag key {key.encode('unicode_escape').decode()[:64]!r} {problem}"
        if not isinstance(value, str) or len(value) > limits.max_value:
            return (
                f"tag {key[:64]!r}: values must be strings of at most {limits.max_value} "
                "characters (max_tag_value_length)"
            )
        if (problem := text_problem(value)) is not None:
            return f"tag {key[:64]!r}: the value {problem}"
    if not reserved_ok:
        for key in sorted(RESERVED_TAGS & tags.keys()):
            return f"tag {key} is set by the control plane, not on submit"
    for key, check in TAG_CHECKS.items():
        given = tags.get(key)
        if given is not None and (problem := check(given)) is not None:
            return f"tag {key} {problem}, got {given!r}"
    return None
