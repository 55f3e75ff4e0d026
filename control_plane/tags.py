"""The tags the control plane reads, and the rules every run's tags must pass.

Applied to runs submitted through the API and to runs a schedule or sensor requests, so
a bad value is refused with a message naming the tag wherever it comes from.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from control_plane.monitor import MAX_RUNTIME_TAG
from control_plane.retries import (
    MAX_RETRIES_TAG,
    PARENT_TAG,
    RETRY_NUMBER_TAG,
    RETRY_STRATEGIES,
    RETRY_STRATEGY_TAG,
    ROOT_TAG,
)


@dataclass(frozen=True)
class TagLimits:
    """`[limits]` max_tags_per_run, max_tag_key_length, max_tag_value_length."""

    max_tags: int = 64
    max_key: int = 128
    max_value: int = 4096


DEFAULT_TAG_LIMITS = TagLimits()
PRIORITY_TAG = "fleetrun/priority"
QUEUE_TAG = "fleetrun/queue"
JOB_TAG = "fleetrun/job"
ON_LOST_CONTACT_TAG = "fleetrun/on_lost_contact"
REEXECUTION_TAG = "fleetrun/reexecution_strategy"
SCHEDULE_TAG = "fleetrun/schedule"
SENSOR_TAG = "fleetrun/sensor"
TICK_TAG = "fleetrun/tick"
RUN_KEY_TAG = "fleetrun/run_key"
RESERVED_TAGS = frozenset({PARENT_TAG, ROOT_TAG, RETRY_NUMBER_TAG, REEXECUTION_TAG})


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


def _one_of(*choices: str) -> Callable[[str], str | None]:
    return lambda value: None if value in choices else f"must be one of {', '.join(choices)}"


TAG_CHECKS: dict[str, Callable[[str], str | None]] = {
    PRIORITY_TAG: lambda value: _integer(value, -(2**31), 2**31 - 1),
    MAX_RETRIES_TAG: lambda value: _integer(value, 0, 1000),
    RETRY_STRATEGY_TAG: _one_of(*RETRY_STRATEGIES),
    MAX_RUNTIME_TAG: _seconds,
    ON_LOST_CONTACT_TAG: _one_of("continue", "stop"),
}


def tag_problem(tags: dict[str, str], limits: TagLimits = DEFAULT_TAG_LIMITS) -> str | None:
    """What is wrong with a run's tags, naming the tag or the limit; None if nothing."""
    if len(tags) > limits.max_tags:
        return f"a run may have at most {limits.max_tags} tags (max_tags_per_run)"
    for key, value in tags.items():
        if not isinstance(key, str) or not key or len(key) > limits.max_key:
            return f"tag keys must be 1 to {limits.max_key} characters (max_tag_key_length)"
        if not isinstance(value, str) or len(value) > limits.max_value:
            return (f"tag {key[:64]!r}: values must be strings of at most {limits.max_value} "
                    "characters (max_tag_value_length)")  # fmt: skip
    for key in sorted(RESERVED_TAGS & tags.keys()):
        return f"tag {key} is set by the control plane, not on submit"
    for key, check in TAG_CHECKS.items():
        value = tags.get(key)
        if value is not None and (problem := check(value)) is not None:
            return f"tag {key} {problem}, got {value!r}"
    return None
