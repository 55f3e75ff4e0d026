"""Per-step capture of stdout/stderr that survives a crash of the step's process (the
run worker's side; the agent splits the streams in agent/compute_logs.py).

The run worker's fds 1 and 2 are pipes read by the agent. At each step boundary the
worker writes a marker into both streams (`begin_step`/`end_step`); the agent's
`StepOutputSplitter` attributes the bytes between markers to that step. Because the
markers travel in the same pipe as the output, attribution is exact, output of C
extensions and subprocesses is included, and everything written before a crash
(os._exit, segfault, OOM kill) still reaches the agent, whose end of the pipe outlives
the worker.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

MARK_OPEN = b"\x00\x1efleetrun-step:"
MARK_CLOSE = b"\x1e\x00"


def _mark(step: str) -> bytes:
    return MARK_OPEN + step.encode() + MARK_CLOSE


def _write_marker(step: str) -> None:
    data = _mark(step)
    for pystream, fd in ((sys.stdout, 1), (sys.stderr, 2)):
        with contextlib.suppress(Exception):
            pystream.flush()
        os.write(fd, data)


@contextlib.contextmanager
def capture_step_output(step: str) -> Iterator[None]:
    """Attribute what the block writes to fds 1 and 2 to `step` (in the worker)."""
    _write_marker(step)
    try:
        yield
    finally:
        _write_marker("")
