"""One line per checkout for before → after pairs: idle submit → STARTED (60 runs, hop
by hop), then a 500-run burst with its CPU per run on each side.

Run it alternately from two checkouts (`PYTHONPATH=<checkout> python -m bench.pair
LABEL`), a few times each: single runs on a shared 2-core host differ by more than most
changes do. docs/performance.md's round-2 pairs were taken this way.
"""

from __future__ import annotations

import statistics
import sys

from bench import hops, latency
from bench.harness import pct


def main(label: str) -> None:
    idle = hops.idle(60)
    burst = latency.burst(500)

    def dist(hop: str) -> str:
        values = idle[hop]
        return f"{statistics.median(values) * 1000:.1f}/{pct(values, 0.99) * 1000:.1f}"

    cpu = {side: round(ms, 1) for side, ms in burst.cpu_ms_per_run.items()}
    print(
        f"{label}: submit -> STARTED {dist('submit -> STARTED')} ms,"
        f" worker began -> RUN_START {dist('worker began -> RUN_START')} ms,"
        f" burst {burst.runs_per_s:.1f} runs/s, CPU ms per run {cpu}",
        flush=True,
    )


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "this checkout")
