"""The run worker's own lease deadline: it stops itself before the control plane may
give its run to another attempt, whatever became of its agent (killed, frozen, cut off
from the control plane by a partition).

The agent writes the deadline into the worker's channel (agent/channel.py) and moves it
on each time the control plane answers a heartbeat. A thread here reads it: at the
deadline less the grace it says, the worker's process group gets SIGTERM (steps unwind
as on a cancel); at the deadline, everything the run started is killed, the worker
included. So two attempts of one run never run user code at the same time.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time

from agent.processes import kill_cgroup
from agent.worker.records import RecordSink

CHANNEL_ENV = "FLEETRUN_CHANNEL"  # the worker's channel folder: its bell and deadline
CHECK_SECONDS = 0.1


def read_deadline(path: str) -> tuple[float, float] | None:
    """(deadline on the host's monotonic clock, grace); None if there is none (an agent
    that does not set one, or a run that asked to keep going: on_lost_contact)."""
    try:
        with open(path, "rb") as fh:
            deadline, grace = fh.read().split()
        return float(deadline), float(grace)
    except (OSError, ValueError):
        return None


def watch_lease(channel_dir: str, sink: RecordSink, cgroup: str | None) -> threading.Thread:
    """Start the thread that enforces the deadline in `channel_dir`."""
    thread = threading.Thread(
        target=_watch,
        args=(os.path.join(channel_dir, "deadline"), sink, cgroup),
        name="lease-deadline",
        daemon=True,
    )
    thread.start()
    return thread


def _watch(path: str, sink: RecordSink, cgroup: str | None) -> None:
    stopping = False
    while True:
        time.sleep(CHECK_SECONDS)
        found = read_deadline(path)
        if found is None:
            continue
        deadline, grace = found
        now = time.monotonic()
        if now >= deadline:
            _kill_everything(cgroup)
        elif now >= deadline - grace and not stopping:
            stopping = True
            sink.event(
                "ENGINE_EVENT",
                "stopping the run: its agent has not heard from the control plane, whose "
                f"lease on this attempt ends in {deadline - now:.1f} s (SIGTERM now, "
                "SIGKILL at the end)",
                data={"lease_deadline": True, "seconds_left": round(deadline - now, 3)},
            )
            with contextlib.suppress(ProcessLookupError):
                os.killpg(0, signal.SIGTERM)


def _kill_everything(cgroup: str | None) -> None:
    """What the run started (its cgroup, or its process group), this worker last."""
    if cgroup:
        with contextlib.suppress(OSError):
            kill_cgroup(cgroup, os.getpid())
    with contextlib.suppress(ProcessLookupError):
        os.killpg(0, signal.SIGKILL)
    os._exit(128 + signal.SIGKILL)
