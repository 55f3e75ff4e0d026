"""Pool slots, as a run worker waits for them: a step of an op with a pool asks the
control plane for a slot before each attempt and starts once it is granted.

The ask is a record (STEP_SLOT_REQUESTED, with the pool and the attempt): it travels,
is stored and is fenced like every other record of the attempt. The grant comes back
through the agent's long-poll; the agent writes the granted slots into the worker's
channel (agent/channel.py `grant_slots`) and rings its slot bell, which wakes the
waiting worker. The attempt's end (STEP_SUCCESS, STEP_FAILURE, STEP_UP_FOR_RETRY) gives
the slot back on the control plane, in the transaction that stores it.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
from typing import TYPE_CHECKING, Any

from protocol.events import STEP_SLOT_REQUESTED
from protocol.messages import StepResult

if TYPE_CHECKING:
    from agent.worker.executors.step import EventSink

RECHECK_SECONDS = 1.0  # a wait looks at the grants this often even without a bell
SLOTS, SLOT_BELL = "slots", "slot_bell"  # in the worker's channel folder
STEP_RESULTS = "step_results"  # how its step tasks ended (the fleet executor)


def step_result_entry(result: StepResult) -> dict[str, Any]:
    """A step task's result as the worker reads it in its channel's `step_results`."""
    return {
        "task_id": result.task_id,
        "step": result.step,
        "attempt": result.attempt,
        "agent": result.agent,
        "outcome": result.outcome,
    }


def slot_key(step: str, attempt: int) -> str:
    """How `slots` names the grant of attempt `attempt` (from 0) of step `step`."""
    return f"{step}#{attempt}"


class SlotGate:
    """One run worker's side of pool slots (`enabled`: the control plane limits pools by
    op; otherwise every step starts at once)."""

    def __init__(self, sink: EventSink, channel_dir: str, enabled: bool) -> None:
        self.sink = sink
        self.enabled = enabled and bool(channel_dir)
        self._slots = os.path.join(channel_dir, SLOTS) if channel_dir else ""
        self.fd: int | None = None
        if self.enabled:
            with contextlib.suppress(OSError):  # a channel without a bell: rechecked only
                flags = os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC
                self.fd = os.open(os.path.join(channel_dir, SLOT_BELL), flags)
        self._asked: set[str] = set()

    def needed(self, pool: str | None) -> bool:
        return self.enabled and pool is not None

    def ask(self, step: str, pool: str, attempt: int) -> None:
        """Claim a slot of `pool` for attempt `attempt` of `step` (once)."""
        key = slot_key(step, attempt)
        if key in self._asked:
            return
        self._asked.add(key)
        self.sink.event(
            STEP_SLOT_REQUESTED,
            f"step {step} asks for a slot in pool {pool}",
            step,
            {"pool": pool, "attempt": attempt},
        )

    def granted(self) -> set[str]:
        """The slot keys granted so far (the bell is emptied: it rang for these)."""
        if self.fd is not None:
            with contextlib.suppress(BlockingIOError):
                while os.read(self.fd, 4096):
                    pass
        try:
            with open(self._slots, "rb") as fh:
                keys = json.loads(fh.read())
        except (OSError, ValueError):
            return set()
        return {key for key in keys if isinstance(key, str)} if isinstance(keys, list) else set()

    def acquire(self, step: str, pool: str | None, attempt: int) -> None:
        """Block until attempt `attempt` of `step` holds a slot of `pool` (at once when
        it has no pool, or pools are not limited by op)."""
        if pool is None or not self.needed(pool):
            return
        self.ask(step, pool, attempt)
        key = slot_key(step, attempt)
        while key not in self.granted():
            readable = [self.fd] if self.fd is not None else []
            select.select(readable, [], [], RECHECK_SECONDS)
