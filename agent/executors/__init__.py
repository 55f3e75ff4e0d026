"""Executors run the steps of one run inside its run worker; chosen by name."""

from __future__ import annotations

from collections.abc import Callable

from agent.executors.in_process import execute_in_process
from agent.records import RecordSink
from agent.sdk import JobDefinition
from protocol.messages import LaunchRun

Executor = Callable[[JobDefinition, LaunchRun, RecordSink], list[str]]

EXECUTORS: dict[str, Executor] = {"in_process": execute_in_process}


def get_executor(name: str) -> Executor:
    try:
        return EXECUTORS[name]
    except KeyError:
        known = ", ".join(sorted(EXECUTORS))
        raise ValueError(f"unknown executor {name!r} (available: {known})") from None
