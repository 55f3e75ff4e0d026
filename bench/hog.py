"""A CPU hog for workload figures under load: one busy core the bench starts and stops.

The hog is a subprocess spinning in a bounded busy loop: it stops by itself after
`limit` seconds even if nobody stops it, and the kernel kills it with the bench
(PR_SET_PDEATHSIG, bench/harness.py), so no load is left behind to skew what follows.
On a 2-core host it takes one of the two cores from the workload measured beside it.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager

from bench.harness import spawn

LIMIT_SECONDS = 1800.0
SPIN = "import time\nend = time.monotonic() + {limit}\nwhile time.monotonic() < end:\n    pass\n"


@contextmanager
def hog(on: bool = True, limit: float = LIMIT_SECONDS) -> Iterator[int | None]:
    """While inside: one core busy (the hog's pid), or nothing when `on` is false."""
    if not on:
        yield None
        return
    proc = spawn([sys.executable, "-c", SPIN.format(limit=limit)])
    try:
        yield proc.pid
    finally:
        proc.kill()
        proc.wait(10)
