"""`make bench` (`python -m bench`): every benchmark, one table, each figure against its goal.

The workloads (each module's docstring says exactly what it measures):
  1    bench/hops.py      submit -> STARTED on an idle system, hop by hop, and the
                          machine's floor (a bare fork, one fsync'd commit)
  2    bench/latency.py   a burst through 4 x 8 slots, with each side's CPU per run
  3    bench/scale.py     one control plane under 1,000 and 10,000 simulated agents
  4    bench/ingest.py    event ingestion from 50 concurrent runs, SQLite and PostgreSQL
  1-4 run again while bench/hog.py keeps one core busy (--no-hog: not)
  5    bench/footprint.py the agent's own RSS and CPU, idle and per run
  6    bench/dagster.py   workloads 1 and 2 on Dagster OSS, installed into .bench/
  7    bench/replicas.py  submit -> launch received through the replica that does not
                          lead the run queue (two replicas on PostgreSQL)
  8    bench/retention.py the longest write pause while the retention loop purges N runs
  9    bench/bigdata.py   a million runs and 50 million events (bulk-built) against an
                          empty database, SQLite and PostgreSQL: each figure <= 2x
  10   bench/docker.py    submit -> STARTED with the docker launcher next to the process
                          launchers, and the docker executor's per-step overhead (a
                          dockerd of its own; needs Debian's docker.io)
  11   bench/pools.py     a freed pool slot -> the next waiting step started
plus two figures of earlier issues: executor overhead per step, agent death -> FAILURE.
For before -> after pairs of one change, bench/pair.py prints workloads 1 and 2 in a line.
The table is Markdown, so that docs/performance.md can hold it as printed.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from bench import replicas
from bench.harness import pct
from bench.hog import hog


@dataclass
class Row:
    workload: str
    measure: str
    p50: str = ""
    p99: str = ""
    value: str = ""
    goal: str = ""
    met: bool | None = None


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _dist(
    workload: str,
    measure: str,
    seconds: list[float],
    goal: str = "",
    p50_goal: float | None = None,
    p99_goal: float | None = None,
) -> Row:
    p50, p99 = statistics.median(seconds), pct(seconds, 0.99)
    checks = []
    if p50_goal is not None:
        checks.append(p50 <= p50_goal)
    if p99_goal is not None:
        checks.append(p99 <= p99_goal)
    met = all(checks) if checks else None
    return Row(workload, measure, _ms(p50), _ms(p99), goal=goal, met=met)


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, Python {platform.python_version()}"


def print_table(rows: list[Row], title: str) -> None:
    print(f"\n{title}\n")
    head = ["workload", "measure", "p50", "p99", "value", "goal", "met"]
    cells = [
        [
            r.workload,
            r.measure,
            r.p50,
            r.p99,
            r.value,
            r.goal,
            "" if r.met is None else ("yes" if r.met else "**no**"),
        ]
        for r in rows
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(head)]
    print("| " + " | ".join(h.ljust(w) for h, w in zip(head, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for c in cells:
        print("| " + " | ".join(v.ljust(w) for v, w in zip(c, widths, strict=True)) + " |")
    sys.stdout.flush()


def docker_rows(runs: int) -> list[Row]:
    """Workload 10: each launcher's submit -> STARTED, each executor's per-step cost."""
    from bench import docker

    found = docker.measure(runs)
    rows = [
        _dist("10 docker", f"{launcher} launcher: submit -> STARTED", found[launcher])
        for launcher in docker.LAUNCHERS
    ]
    for executor in ("multiprocess", "docker"):
        ms = statistics.median(found[f"{executor} executor"])
        measure = f"{executor} executor, per step of a {docker.CHAIN_STEPS}-op chain"
        rows.append(Row("10 docker", measure, value=f"{ms:.1f} ms"))
    return rows


def big_data_rows(runs: int, postgres_url: str) -> list[Row]:
    """Workload 9's figures, each against its own on an empty database."""
    import tempfile
    from pathlib import Path

    from bench import bigdata

    folder = Path(tempfile.mkdtemp(prefix="fleetrun-bigdata-"))
    rows = []
    for backend in ("sqlite", "postgres"):
        try:
            comparisons = bigdata.run_backend(
                backend, folder, postgres_url, runs, bigdata.EVENTS_PER_RUN, bigdata.REQUESTS
            )
        finally:
            shutil.rmtree(folder / backend, ignore_errors=True)  # SQLite's: GBs at a million
        for c in comparisons:
            empty = f"empty p50 {_ms(statistics.median(c.empty))}; {c.ratio:.2f}x"
            rows.append(
                Row(
                    "9 big",
                    f"{backend}, {runs:,} runs: {c.measure}",
                    _ms(statistics.median(c.big)),
                    _ms(pct(c.big, 0.99)),
                    value=empty,
                    goal="<= 2x empty",
                    met=c.ratio <= 2,
                )
            )
    return rows


@dataclass
class CoreRows:
    rows: list[Row]
    figures: dict[str, object]  # what the Dagster ratios need


def _goal(quiet: float, loaded: bool) -> float:
    """Issue 30: under the CPU hog a goal holds at 2x its quiet value."""
    return quiet * 2 if loaded else quiet


def core_rows(args: argparse.Namespace, loaded: bool, progress: Callable[[str], None]) -> CoreRows:
    """Workloads 1-4 (and the machine's floor), once; `loaded`: a CPU hog runs beside."""
    from bench import hops, ingest, latency, scale

    tag = " +hog" if loaded else ""
    rows: list[Row] = []
    progress(f"1: {args.runs} idle runs, hop by hop")
    idle = hops.idle(args.runs, args.storage)
    p50, p99 = _goal(0.010, loaded), _goal(0.020, loaded)
    rows.append(
        _dist(
            f"1 idle{tag}",
            "submit -> STARTED",
            idle["submit -> STARTED"],
            f"p50 <= {p50 * 1000:.0f} ms, p99 <= {p99 * 1000:.0f} ms",
            p50_goal=p50,
            p99_goal=p99,
        )
    )
    for name in hops.HOPS:
        rows.append(_dist(f"1 idle{tag}", f"hop: {name}", idle[name]))
    rows.append(
        _dist(f"1 idle{tag}", "submit -> stored (seen by a client)", idle["submit -> stored"])
    )
    rows.append(_dist(f"1 idle{tag}", "client: POST round trip", idle["POST round trip"]))
    fork, commit = hops.fork_seconds(), hops.commit_seconds()
    rows.append(_dist(f"1 floor{tag}", "bare fork (+ exit, reaped)", fork))
    rows.append(_dist(f"1 floor{tag}", "one fsync'd SQLite commit", commit))
    floor = statistics.median(fork) + statistics.median(commit)
    rows.append(Row(f"1 floor{tag}", "fork + commit, p50s added", value=_ms(floor)))
    progress(f"2: a burst of {args.burst} runs")
    b = latency.burst(args.burst, storage_url=args.storage)
    want = 150 / (2 if loaded else 1)
    rows.append(
        Row(
            f"2 burst{tag}",
            f"{args.burst} one-op runs, 4 agents x 8 slots",
            value=f"{b.runs_per_s:.1f} runs/s",
            goal=f">= {want:.0f} runs/s",
            met=b.runs_per_s >= want,
        )
    )
    rows.append(_dist(f"2 burst{tag}", "time in queue", b.queued))
    cpu = "; ".join(f"{side} {ms:.1f}" for side, ms in b.cpu_ms_per_run.items())
    rows.append(Row(f"2 burst{tag}", "CPU per run (ms)", value=cpu))
    fleets = (args.hog_agents or args.agents) if loaded else args.agents
    for wanted in [int(n) for n in fleets.split(",") if n]:
        count = min(wanted, scale.most_agents())
        if count < wanted:
            rows.append(
                Row(
                    f"3 scale{tag}",
                    f"{wanted:,} agents: not run here",
                    value=f"{2 * wanted:,} connections need more open files than this "
                    f"host allows ({scale.open_files_limit():,}); measured {count:,}",
                    goal="10,000 agents" if wanted >= 10_000 else "",
                    met=False if wanted >= 10_000 else None,
                )
            )
        progress(f"3: {count} simulated agents")
        try:
            s = scale.measure(count)
        except RuntimeError as exc:  # e.g. the fleet went OFFLINE: a finding, not a crash
            rows.append(Row(f"3 scale{tag}", f"{count:,} agents: failed", value=str(exc)))
            continue
        big = wanted >= 10_000
        rows.append(
            Row(
                f"3 scale{tag}",
                f"{count:,} agents: control-plane RSS, CPU",
                value=f"{s.rss_bytes / 2**20:.0f} MiB, {s.cpu_percent:.0f} %",
                goal="RSS <= 1 GiB" if big else "",
                met=s.rss_bytes <= 2**30 if big else None,
            )
        )
        p99 = _goal(0.100, loaded)
        rows.append(
            _dist(
                f"3 scale{tag}",
                f"{count:,} agents: dispatch latency",
                s.dispatch,
                f"p99 <= {p99 * 1000:.0f} ms" if big else "",
                p99_goal=p99 if big else None,
            )
        )
        headroom = s.flood_heartbeats_per_s / s.heartbeats_per_s if s.heartbeats_per_s else 0.0
        want = 1.0 if loaded else 2.0  # 2x the fleet's pace; under the hog, half that
        rows.append(
            Row(
                f"3 scale{tag}",
                f"{count:,} agents: heartbeats handled",
                value=f"{s.heartbeats_per_s:,.0f}/s paced; "
                f"{s.flood_heartbeats_per_s:,.0f}/s flooded "
                f"({s.flood_cpu_percent:.0f} % CPU): {headroom:.1f}x headroom",
                goal=f">= {want:g}x headroom" if big else "",
                met=headroom >= want if big else None,
            )
        )
    progress("4: ingestion, SQLite and PostgreSQL")
    for backend, url in (("sqlite", "sqlite:///b.db"), ("postgres", args.postgres)):
        if backend == "postgres" and args.skip_replicas:
            continue
        ing = ingest.measure(storage_url=url)
        want = 100_000 / (2 if loaded else 1) if backend == "sqlite" else 0
        rows.append(
            Row(
                f"4 ingest{tag}",
                f"{backend}: {ing.runs} runs logging in batches of 500",
                value=f"{ing.per_second:,.0f} events/s ({ing.cpu_percent:.0f} % CPU)",
                goal=f">= {want:,.0f} events/s" if want else "",
                met=ing.per_second >= want if want else None,
            )
        )
    return CoreRows(
        rows,
        {"submit -> STARTED": idle["submit -> STARTED"], "burst runs/s": b.runs_per_s},
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=100, help="idle runs (workload 1)")
    parser.add_argument("--burst", type=int, default=1000, help="runs in the burst (2)")
    parser.add_argument("--agents", default="1000,10000", help="simulated agents (3)")
    parser.add_argument(
        "--hog-agents",
        default=None,
        help="simulated agents (3) under the CPU hog; default as --agents",
    )
    parser.add_argument(
        "--storage",
        default="sqlite:///b.db",
        help="storage URL for workloads 1, 2 and 4 (PostgreSQL: a fresh schema each)",
    )
    parser.add_argument("--dagster-runs", type=int, default=20, help="Dagster idle runs (6)")
    parser.add_argument(
        "--dagster-burst",
        type=int,
        default=100,
        help="Dagster burst runs (6); it launches about one run per 3-6 s",
    )
    parser.add_argument("--skip-dagster", action="store_true")
    parser.add_argument(
        "--postgres",
        default=os.environ.get("FLEETRUN_TEST_POSTGRES_URL", replicas.POSTGRES_URL),
        help="PostgreSQL for the replicas (7): a fresh schema on it",
    )
    parser.add_argument(
        "--skip-replicas",
        action="store_true",
        help="leave PostgreSQL out: the replicas (7) and the PostgreSQL ingest (4)",
    )
    parser.add_argument(
        "--hog",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run workloads 1-4 again while a CPU hog occupies one core (issue 30)",
    )
    parser.add_argument("--purge-runs", type=int, default=20_000, help="finished runs purged (8)")
    parser.add_argument(
        "--big-runs",
        type=int,
        default=1_000_000,
        help="runs in the big database (9), 50 events each; 100000 for a quick try",
    )
    parser.add_argument("--skip-big", action="store_true")
    parser.add_argument("--pool-runs", type=int, default=40, help="runs through one slot (10)")
    parser.add_argument(
        "--skip-extra", action="store_true", help="skip the executor and agent-death figures"
    )
    parser.add_argument("--docker-runs", type=int, default=20, help="runs per launcher (10)")
    parser.add_argument("--skip-docker", action="store_true")
    parser.add_argument(
        "--core-only", action="store_true", help="workloads 1-4 only (quiet, then the hog)"
    )
    args = parser.parse_args(argv)
    started = time.monotonic()
    rows: list[Row] = []

    def progress(what: str) -> None:
        print(f"[{time.monotonic() - started:6.0f} s] {what}", file=sys.stderr, flush=True)

    from bench import footprint

    quiet: dict[str, object] = {}
    for loaded in (False, True) if args.hog else (False,):
        with hog(loaded):
            progress("workloads 1-4 " + ("with a CPU hog on one core" if loaded else "quiet"))
            found = core_rows(args, loaded, progress)
        rows.extend(found.rows)
        print_table(found.rows, "workloads 1-4 " + ("with the CPU hog" if loaded else "quiet"))
        if not loaded:
            quiet = found.figures
    if args.core_only:
        return
    progress("5: agent footprint")
    fp = footprint.measure()
    idle_value = f"{fp.idle_rss_bytes / 2**20:.0f} MiB, {fp.idle_cpu_percent:.2f} %"
    rows.append(
        Row("5 agent", f"idle RSS, CPU ({fp.agent}, with its fork server)", value=idle_value)
    )
    per_run = f"{fp.cpu_ms_per_run:.1f} ms; {fp.rss_after_runs_bytes / 2**20:.0f} MiB"
    rows.append(Row("5 agent", "agent CPU per run; RSS after 100 runs", value=per_run))
    if not args.skip_replicas:
        progress(f"7: {args.runs} runs through the replica that does not lead")
        through = replicas.non_leader(args.runs, args.postgres)
        measure = f"submit to the non-leader -> launch received ({args.runs} runs)"
        rows.append(_dist("7 replicas", measure, through, "p50 <= 50 ms", p50_goal=0.050))
    progress(f"8: retention purging {args.purge_runs} runs while submitting")
    from bench.retention import purge_runs

    purged = purge_runs(args.purge_runs)
    rows.append(
        Row(
            "8 retention",
            f"longest write pause while purging {purged.runs:,} runs (SQLite)",
            value=f"purge tx {_ms(purged.longest_purge_s)}; a submit waited "
            f"{_ms(purged.longest_submit_s)} at most (p50 {_ms(purged.median_submit_s)}); "
            f"{purged.total_s:.1f} s in all",
        )
    )
    progress(f"11: {args.pool_runs} steps handing one pool slot on")
    from bench.pools import handovers

    handed = handovers(args.pool_runs, args.storage)
    measure = f"pool slot freed -> next waiting step started ({len(handed)} handovers)"
    rows.append(_dist("11 pools", measure, handed, "p50 <= 50 ms", p50_goal=0.050))
    if not args.skip_big:
        progress(f"9: a database of {args.big_runs:,} runs (building it takes minutes)")
        rows.extend(big_data_rows(args.big_runs, args.postgres))
    if not args.skip_docker:
        progress("10: docker launcher and executor (a dockerd of its own)")
        rows.extend(docker_rows(args.docker_runs))
    if not args.skip_extra:
        progress("extra: executors, agent death")
        from bench.executors import CASES, describe, per_step_ms
        from bench.monitoring import TIMEOUT, agent_death

        for executor, job in CASES:
            ms = per_step_ms(executor, 3, job)
            rows.append(
                Row(
                    "extra",
                    describe(executor, job),
                    value=f"{statistics.median(ms):.2f} ms",
                )
            )
        lags = agent_death(10, 0)
        rows.append(_dist("extra", f"agent killed -> FAILURE (timeout {TIMEOUT:g} s)", lags))
    if not args.skip_dagster:
        from bench import dagster

        progress(
            f"6: Dagster, {args.dagster_runs} idle runs and a {args.dagster_burst}-run "
            "burst (minutes: it starts a process per run)"
        )
        dg = dagster.measure(args.dagster_runs, args.dagster_burst, 32)
        d_idle = dg["idle"]
        rows.append(
            _dist(
                "6 dagster",
                f"submit -> launch received ({args.dagster_runs} runs)",
                d_idle["submit -> launch received"],
            )
        )
        rows.append(_dist("6 dagster", "submit -> STARTED", d_idle["submit -> STARTED"]))
        d_rate = dg["burst"]["runs_per_s"]
        rows.append(
            Row(
                "6 dagster",
                f"burst of {args.dagster_burst} runs, 32 concurrent",
                value=f"{d_rate:.2f} runs/s",
            )
        )
        rows.append(_dist("6 dagster", "time in queue", dg["burst"]["queue_s"]))
        idle_started = quiet["submit -> STARTED"]
        assert isinstance(idle_started, list)
        ratio1 = statistics.median(d_idle["submit -> STARTED"]) / statistics.median(idle_started)
        rows.append(
            Row(
                "6 ratio",
                "Dagster / fleetrun, submit -> STARTED p50",
                value=f"{ratio1:,.0f}x",
                goal=">= 20x",
                met=ratio1 >= 20,
            )
        )
        rate = quiet["burst runs/s"]
        assert isinstance(rate, float)
        ratio2 = rate / d_rate
        rows.append(
            Row(
                "6 ratio",
                "fleetrun / Dagster, burst runs/s",
                value=f"{ratio2:,.0f}x",
                goal=">= 20x",
                met=ratio2 >= 20,
            )
        )
    storage = args.storage.split(":", 1)[0]
    print_table(
        rows,
        f"fleetrun bench, {time.strftime('%Y-%m-%d')}: {_machine()}; storage "
        f"{storage}; took {time.monotonic() - started:.0f} s",
    )


if __name__ == "__main__":
    main()
