"""Executors run the steps of one run inside its run worker; chosen by name, pluggable.

An executor is a function `Execution -> list of failed step names`. Register your own
with `register_executor("name", fn)` in a module your code location imports, and select
it with `@job(executor="name")` or per run with the run config key `execution`.
"""

from __future__ import annotations

from agent.worker.executors.docker import execute_docker
from agent.worker.executors.execution import Execution, Executor
from agent.worker.executors.fleet import execute_fleet
from agent.worker.executors.in_process import execute_in_process
from agent.worker.executors.multiprocess import execute_multiprocess

__all__ = ["EXECUTORS", "Execution", "Executor", "get_executor", "register_executor"]


EXECUTORS: dict[str, Executor] = {}


def register_executor(name: str, executor: Executor) -> None:
    EXECUTORS[name] = executor


def get_executor(name: str) -> Executor:
    try:
        return EXECUTORS[name]
    except KeyError:
        known = ", ".join(sorted(EXECUTORS))
        raise ValueError(f"unknown executor {name!r} (available: {known})") from None


register_executor("in_process", execute_in_process)
register_executor("multiprocess", execute_multiprocess)
register_executor("docker", execute_docker)
register_executor("fleet", execute_fleet)
