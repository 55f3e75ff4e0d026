"""Workload 9: an instance with a million runs answers as fast as an empty one.

A database of `runs` finished runs with `events` events each (by default 1,000,000 and
50: 50,000,000 events), their tags and status history, is built by bulk insert, not by
running them: SQLite through executemany in large transactions with synchronous=OFF,
PostgreSQL through COPY, after the control plane's own migrations made the schema.
Then a real control plane with one agent serves it, and each figure is read over HTTP,
`requests` times each: submission (POST /api/v1/runs), dispatch (submit -> launch
received), GET /api/v1/runs on the first page and at a deep cursor (the middle of the
ids), unfiltered and filtered by status, job and tag, a run's events and the UI's runs
page. The same figures on an empty database (BASELINE_RUNS: as good as empty, but
every page measured is full, so both sides serve the same bytes) are the baseline; the
goal is p50 <= 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import shutil
import sqlite3
import statistics
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg

from bench.harness import Fleet, get, pct, post, wait
from control_plane.storage import open_storage

JOBS = [f"job_{n:02d}" for n in range(20)]
TEAMS = 10
RUNS_PER_BATCH = 10_000
EVENTS_PER_RUN = 50
REQUESTS = 50
STEP_EVENTS = ["STEP_START", "LOG_MESSAGE", "STEP_OUTPUT", "STEP_SUCCESS"]
RUN_COLUMNS = (
    "run_id",
    "job",
    "location",
    "status",
    "status_reason",
    "tags",
    "config",
    "queue",
    "agent_id",
    "lease",
    "create_time",
    "start_time",
    "end_time",
    "update_time",
    "status_time",
    "last_event_seq",
    "launch_acked",
)
EVENT_COLUMNS = ("run_id", "seq", "time", "type", "step", "message", "data", "attempt")
# A bulk run's numeric id is n + 1: the runs go into a fresh table in order of n.
TAG_COLUMNS = ("run_id", "key", "value", "run_pk")
TAGS_OFF_THEIR_RUN = (
    "SELECT COUNT(*) FROM run_tags t LEFT JOIN runs r ON r.id = t.run_pk"
    " WHERE r.run_id IS NULL OR r.run_id <> t.run_id"
)
CHANGE_COLUMNS = ("run_id", "status", "time")
# The filters measured: a status of 8 % of the runs, a job of 5 %, a tag of 10 %, and a
# tag no run has (the worst case of a filter that walks the runs: it finds nothing).
# The baseline: a database as good as empty, but with enough runs to fill every page
# measured (100 runs: 4,000 has 320 FAILUREs, 200 of each job and 400 of each team).
BASELINE_RUNS = 4000
FILTERS = {
    "status": "status=FAILURE",
    "job": "job=job_07",
    "tag": "tag=team%3Dt3",
    "a tag no run has": "tag=team%3Dnobody",
}


def run_id_of(n: int) -> str:
    """The id of bulk run `n`: random-looking like a real one, the same on every build."""
    return str(uuid.UUID(bytes=hashlib.md5(f"bigdata-{n}".encode()).digest(), version=4))


def final_status(n: int) -> str:
    """90 % SUCCESS, 8 % FAILURE, 2 % CANCELED."""
    return "SUCCESS" if n % 100 < 90 else "FAILURE" if n % 100 < 98 else "CANCELED"


def tags_of(n: int) -> dict[str, str]:
    return {"team": f"t{n % TEAMS}", "batch": f"b{n // 1000}"}


def run_row(n: int, start: float, events: int) -> tuple[Any, ...]:
    status = final_status(n)
    end = start + 10.0
    tags = json.dumps(tags_of(n))
    return (
        run_id_of(n),
        JOBS[n % len(JOBS)],
        "bench",
        status,
        f"run {status.lower()}",
        tags,
        "{}",
        "default",
        "agent-bulk",
        1,
        start,
        start + 1.0,
        end,
        end,
        end,
        events,
        1,
    )


def event_rows(n: int, start: float, events: int) -> Iterator[tuple[Any, ...]]:
    """RUN_ENQUEUED, RUN_STARTING, RUN_START, step events, then the run's end."""
    run_id = run_id_of(n)
    heads = ["RUN_ENQUEUED", "RUN_STARTING", "RUN_START"]
    for seq in range(1, events + 1):
        if seq <= len(heads) and seq < events:
            kind, step = heads[seq - 1], None
        elif seq == events:
            kind, step = f"RUN_{final_status(n)}", None
        else:
            kind = STEP_EVENTS[(seq - 4) % len(STEP_EVENTS)]
            step = f"op_{(seq - 4) // len(STEP_EVENTS)}"
        attempt = 1 if seq > 1 else None
        yield (run_id, seq, start + seq * 0.1, kind, step, f"{kind} {step or ''}", "{}", attempt)


def change_rows(n: int, start: float) -> list[tuple[Any, ...]]:
    run_id = run_id_of(n)
    statuses = ["QUEUED", "STARTING", "STARTED", final_status(n)]
    return [(run_id, status, start + i) for i, status in enumerate(statuses)]


@dataclass
class Batch:
    runs: list[tuple[Any, ...]] = field(default_factory=list)
    events: list[tuple[Any, ...]] = field(default_factory=list)
    tags: list[tuple[Any, ...]] = field(default_factory=list)
    changes: list[tuple[Any, ...]] = field(default_factory=list)


def batches(runs: int, events: int, now: float) -> Iterator[Batch]:
    """The rows of every table, RUNS_PER_BATCH runs at a time, oldest first (ids grow
    with time, as they do for real runs); the last run ended an hour before `now`."""
    first = now - 3600.0 - runs * 30.0
    for low in range(0, runs, RUNS_PER_BATCH):
        batch = Batch()
        for n in range(low, min(runs, low + RUNS_PER_BATCH)):
            start = first + n * 30.0
            batch.runs.append(run_row(n, start, events))
            batch.events.extend(event_rows(n, start, events))
            batch.tags.extend((run_id_of(n), k, v, n + 1) for k, v in tags_of(n).items())
            batch.changes.extend(change_rows(n, start))
        yield batch


async def migrate(url: str) -> None:
    """The schema, made by the control plane's own migrations."""
    storage = open_storage(url)
    await storage.open()
    await storage.close()


def _insert(table: str, columns: tuple[str, ...]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def build_sqlite(path: Path, runs: int, events: int) -> None:
    asyncio.run(migrate(f"sqlite:///{path}"))
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA synchronous=OFF")
        db.execute("PRAGMA cache_size=-1000000")
        for batch in batches(runs, events, time.time()):
            with db:
                db.executemany(_insert("runs", RUN_COLUMNS), batch.runs)
                db.executemany(_insert("events", EVENT_COLUMNS), batch.events)
                db.executemany(_insert("run_tags", TAG_COLUMNS), batch.tags)
                db.executemany(_insert("run_status_changes", CHANGE_COLUMNS), batch.changes)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (wrong,) = db.execute(TAGS_OFF_THEIR_RUN).fetchone()
    finally:
        db.close()
    assert wrong == 0, f"{wrong} tags name another run's id"


async def build_postgres(url: str, runs: int, events: int) -> None:
    """COPY every table; then VACUUM ANALYZE, where autovacuum would be after a while."""
    await migrate(url)
    schema = url.rsplit("search_path=", 1)[1]
    conn = await asyncpg.connect(url.split("?", 1)[0], server_settings={"search_path": schema})
    try:
        for batch in batches(runs, events, time.time()):
            async with conn.transaction():
                for table, columns, rows in (
                    ("runs", RUN_COLUMNS, batch.runs),
                    ("events", EVENT_COLUMNS, batch.events),
                    ("run_tags", TAG_COLUMNS, batch.tags),
                    ("run_status_changes", CHANGE_COLUMNS, batch.changes),
                ):
                    await conn.copy_records_to_table(table, records=rows, columns=columns)
        await conn.execute("VACUUM ANALYZE")
        wrong = await conn.fetchval(TAGS_OFF_THEIR_RUN)
    finally:
        await conn.close()
    assert wrong == 0, f"{wrong} tags name another run's id"


def timed_get(url: str) -> float:
    """Seconds to fetch `url` whole (any content type)."""
    t0 = time.perf_counter()
    with urllib.request.urlopen(url, timeout=60) as resp:
        resp.read()
    return time.perf_counter() - t0


def submit_and_dispatch(url: str) -> tuple[float, float, str]:
    """Submission time, submit -> launch received, and the run's id (a `hello` run)."""
    t0 = time.time()
    run_id = post(f"{url}/api/v1/runs", {"job": "hello"})["run_id"]
    submitted = time.time() - t0
    wait(lambda: get(f"{url}/api/v1/runs/{run_id}")["end_time"], 60, "a run", 0.01)
    events = get(f"{url}/api/v1/runs/{run_id}/events?limit=10")["events"]
    start = next(e for e in events if e["type"] == "RUN_START")
    return submitted, start["data"]["launch_received_time"] - t0, run_id


def read_paths(run_id: str, deep_cursor: int) -> dict[str, str]:
    """Each read measured, by name: its path on the control plane."""
    paths = {
        "runs, first page": "/api/v1/runs",
        "runs, deep cursor": f"/api/v1/runs?cursor={deep_cursor}",
    }
    for name, query in FILTERS.items():
        paths[f"runs by {name}, first page"] = f"/api/v1/runs?{query}"
        paths[f"runs by {name}, deep cursor"] = f"/api/v1/runs?{query}&cursor={deep_cursor}"
    paths["a run's events"] = f"/api/v1/runs/{run_id}/events"
    paths["UI runs page"] = "/ui/runs"
    return paths


def measure(storage_url: str, deep_cursor: int, requests: int) -> dict[str, list[float]]:
    """Every figure, in seconds, `requests` samples each, on the database at the URL."""
    figures: dict[str, list[float]] = {"submission": [], "dispatch": []}
    with Fleet(storage_url=storage_url, fresh_schema=False) as fleet:
        fleet.add_agents(1, 4)
        run_id = ""
        for _ in range(requests):
            submitted, dispatched, run_id = submit_and_dispatch(fleet.url)
            figures["submission"].append(submitted)
            figures["dispatch"].append(dispatched)
        for name, path in read_paths(run_id, deep_cursor).items():
            timed_get(fleet.url + path)  # warm: the first read pays for the cache
            figures[name] = [timed_get(fleet.url + path) for _ in range(requests)]
    return figures


@dataclass
class Comparison:
    backend: str
    measure: str
    empty: list[float]
    big: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.big) / statistics.median(self.empty)


def compare(
    backend: str, empty: dict[str, list[float]], big: dict[str, list[float]]
) -> list[Comparison]:
    return [Comparison(backend, name, empty[name], big[name]) for name in empty]


def build(backend: str, folder: Path, postgres_url: str, runs: int, events: int) -> str:
    """Build the big database for `backend`; its storage URL."""
    if backend == "sqlite":
        path = folder / "fleetrun.db"
        build_sqlite(path, runs, events)
        return f"sqlite:///{path}"
    url = fresh_schema(postgres_url, folder.name)  # folder: .../postgres/empty or big
    asyncio.run(build_postgres(url, runs, events))
    return url


def fresh_schema(postgres_url: str, what: str) -> str:
    schema = f"fleetrun_bigdata_{what}_{time.monotonic_ns()}"
    asyncio.run(_execute(postgres_url, f"CREATE SCHEMA {schema}"))
    return f"{postgres_url}?search_path={schema}"


def drop_schema(url: str) -> None:
    server, _, schema = url.partition("?search_path=")
    asyncio.run(_execute(server, f"DROP SCHEMA {schema} CASCADE"))


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def run_backend(
    backend: str, folder: Path, postgres_url: str, runs: int, events: int, requests: int
) -> list[Comparison]:
    """Figures on the baseline database, then on the big one, for one backend."""
    empty = measure_built(
        backend, folder / backend / "empty", postgres_url, BASELINE_RUNS, events, requests
    )
    big = measure_built(backend, folder / backend / "big", postgres_url, runs, events, requests)
    return compare(backend, empty, big)


def measure_built(
    backend: str, folder: Path, postgres_url: str, runs: int, events: int, requests: int
) -> dict[str, list[float]]:
    """Build a database of `runs` runs, measure on it, drop it."""
    folder.mkdir(parents=True)
    t0 = time.monotonic()
    url = build(backend, folder, postgres_url, runs, events)
    print(f"built {runs:,} runs on {backend} in {time.monotonic() - t0:.0f} s", flush=True)
    try:
        return measure(url, runs // 2, requests)
    finally:
        if backend == "postgres":
            drop_schema(url)


def ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def describe(c: Comparison) -> str:
    return (
        f"{c.backend} {c.measure}: empty p50 {ms(statistics.median(c.empty))} p99 "
        f"{ms(pct(c.empty, 0.99))}; big p50 {ms(statistics.median(c.big))} p99 "
        f"{ms(pct(c.big, 0.99))}; {c.ratio:.2f}x"
    )


def main() -> None:
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--events", type=int, default=EVENTS_PER_RUN, help="events per run")
    parser.add_argument("--requests", type=int, default=REQUESTS, help="samples of each")
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432/test")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="fleetrun-bigdata-"))
    try:
        for backend in args.backends.split(","):
            comparisons = run_backend(
                backend, folder, args.postgres, args.runs, args.events, args.requests
            )
            for c in comparisons:
                print(describe(c), flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # SQLite's database: GBs at a million runs


if __name__ == "__main__":
    main()
