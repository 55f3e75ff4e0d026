"""SQLite storage (embedded default): aiosqlite, WAL, synchronous=FULL, versioned schema.

One writer connection, serialised by an asyncio lock so that each write is one
`BEGIN IMMEDIATE … COMMIT` transaction that no other coroutine can interleave with, and
one reader connection that WAL lets read concurrently. `synchronous=FULL` makes every
acknowledged commit survive a power loss, not only a process crash. The queries
themselves live in sql.py, shared with PostgreSQL.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiosqlite

from control_plane.storage import StorageFull
from control_plane.storage.sql import SqlStorage

log = logging.getLogger("fleetrun.storage")

MIGRATIONS: list[str] = [
    # version 1: runs, leases, event log, compute logs, agents, code locations
    """
    CREATE TABLE runs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL UNIQUE,
        job TEXT NOT NULL,
        location TEXT NOT NULL,
        status TEXT NOT NULL,
        status_reason TEXT,
        tags TEXT NOT NULL,
        config TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        queue TEXT NOT NULL DEFAULT 'default',
        agent_id TEXT,
        lease INTEGER,
        create_time REAL NOT NULL,
        start_time REAL,
        end_time REAL,
        update_time REAL NOT NULL,
        last_event_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX runs_by_status ON runs (status, priority DESC, id);
    CREATE INDEX runs_by_job ON runs (job, id);
    CREATE INDEX runs_by_agent ON runs (agent_id, status);
    CREATE TABLE run_tags (
        run_id TEXT NOT NULL,
        key TEXT NOT NULL,
        value TEXT NOT NULL,
        PRIMARY KEY (run_id, key)
    );
    CREATE INDEX run_tags_by_key_value ON run_tags (key, value);
    CREATE TABLE run_attempts (
        attempt_id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        agent_id TEXT NOT NULL,
        create_time REAL NOT NULL,
        acked_seq INTEGER NOT NULL DEFAULT 0
    );
    CREATE INDEX run_attempts_by_run ON run_attempts (run_id);
    CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        seq INTEGER NOT NULL,
        time REAL NOT NULL,
        type TEXT NOT NULL,
        step TEXT,
        message TEXT NOT NULL,
        data TEXT NOT NULL,
        attempt INTEGER,
        UNIQUE (run_id, seq)
    );
    CREATE TABLE compute_logs (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        attempt INTEGER,
        step TEXT,
        stream TEXT NOT NULL,
        time REAL NOT NULL,
        text TEXT NOT NULL
    );
    CREATE INDEX compute_logs_by_run ON compute_logs (run_id, step, id);
    CREATE TABLE agents (
        agent_id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        hostname TEXT NOT NULL,
        status TEXT NOT NULL,
        queues TEXT NOT NULL,
        max_concurrent_runs INTEGER NOT NULL,
        version TEXT NOT NULL,
        last_heartbeat REAL NOT NULL,
        registered_time REAL NOT NULL
    );
    CREATE TABLE code_locations (
        agent_id TEXT NOT NULL,
        name TEXT NOT NULL,
        info TEXT NOT NULL,
        PRIMARY KEY (agent_id, name)
    );
    """,
    # version 2: run monitoring and retries
    """
    ALTER TABLE runs ADD COLUMN status_time REAL;
    ALTER TABLE runs ADD COLUMN not_before REAL;
    ALTER TABLE runs ADD COLUMN failure_kind TEXT;
    ALTER TABLE runs ADD COLUMN retry_pending INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE runs ADD COLUMN parent_run_id TEXT;
    ALTER TABLE runs ADD COLUMN root_run_id TEXT;
    ALTER TABLE runs ADD COLUMN resume_count INTEGER NOT NULL DEFAULT 0;
    UPDATE runs SET status_time = update_time;
    CREATE UNIQUE INDEX runs_by_parent ON runs (parent_run_id);
    CREATE INDEX runs_retry_pending ON runs (retry_pending, id);
    """,
    # version 3: the output store, and which outputs a re-execution reuses; a run may have
    # several re-executions, so a parent is no longer unique (a retry stays exactly-once
    # through the retry_pending mark, checked and cleared in the retry's transaction)
    """
    DROP INDEX runs_by_parent;
    CREATE INDEX runs_by_parent ON runs (parent_run_id);
    ALTER TABLE runs ADD COLUMN reuse_outputs TEXT NOT NULL DEFAULT '{}';
    CREATE TABLE step_outputs (
        run_id TEXT NOT NULL,
        step TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        size INTEGER NOT NULL,
        data BLOB NOT NULL,
        create_time REAL NOT NULL,
        PRIMARY KEY (run_id, step)
    );
    """,
    # version 4: what each agent can do (protocol version skew)
    """
    ALTER TABLE agents ADD COLUMN capabilities TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE runs ADD COLUMN launch_acked INTEGER NOT NULL DEFAULT 0;
    """,
    # version 5: schedules and sensors (the daemon), and idempotent run creation
    """
    ALTER TABLE runs ADD COLUMN idempotency_key TEXT;
    CREATE UNIQUE INDEX runs_by_idempotency_key ON runs (idempotency_key);
    CREATE TABLE instigators (
        location TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        status TEXT,
        cursor TEXT,
        last_run_key TEXT,
        last_tick_time REAL,
        PRIMARY KEY (location, name, kind)
    );
    CREATE TABLE ticks (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        location TEXT NOT NULL,
        name TEXT NOT NULL,
        kind TEXT NOT NULL,
        scheduled_time REAL,
        status TEXT NOT NULL,
        skip_reason TEXT,
        error TEXT,
        run_ids TEXT NOT NULL DEFAULT '[]',
        cursor TEXT,
        start_time REAL NOT NULL,
        end_time REAL
    );
    CREATE UNIQUE INDEX ticks_by_scheduled_time ON ticks (location, name, kind, scheduled_time);
    CREATE INDEX ticks_by_instigator ON ticks (location, name, kind, id);
    CREATE INDEX ticks_by_status ON ticks (status);
    """,
    # version 6: tokens (auth), and the agent token each agent registered with
    """
    CREATE TABLE tokens (
        token_id TEXT PRIMARY KEY,
        name TEXT NOT NULL UNIQUE,
        kind TEXT NOT NULL,
        role TEXT,
        salt BLOB NOT NULL,
        hash BLOB NOT NULL,
        create_time REAL NOT NULL,
        last_used REAL,
        revoked_time REAL
    );
    ALTER TABLE agents ADD COLUMN token_name TEXT;
    """,
    # version 7: leases on the daemon loops (one replica runs each), and evaluations in
    # flight, so that the replica an agent polls can hand it a request made on another
    """
    CREATE TABLE leader_leases (
        name TEXT PRIMARY KEY,
        holder TEXT NOT NULL,
        term INTEGER NOT NULL,
        acquired_time REAL NOT NULL,
        expires REAL NOT NULL
    );
    CREATE TABLE evaluations (
        eval_id TEXT PRIMARY KEY,
        location TEXT NOT NULL,
        request BLOB NOT NULL,
        agent_id TEXT,
        result BLOB,
        create_time REAL NOT NULL,
        take_time REAL
    );
    CREATE INDEX evaluations_untaken ON evaluations (agent_id, location);
    """,
    # version 8: a version number for the code locations, moved by each registration and
    # kept on the agent it registered, so a process re-reads only what changed
    """
    CREATE TABLE catalog (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL);
    INSERT INTO catalog (id, version) VALUES (1, 0);
    ALTER TABLE agents ADD COLUMN catalog_version INTEGER NOT NULL DEFAULT 0;
    """,
]


class SqliteTx:
    """An aiosqlite connection as a `Tx` (SQLite speaks the `?` placeholders as written)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(row) for row in await self.db.execute_fetchall(sql, args)]

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        cursor = await self.db.execute(sql, args)
        return cursor.rowcount

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        await self.db.executemany(sql, rows)


class SqliteStorage(SqlStorage):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._writer: aiosqlite.Connection | None = None
        self._read_db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._full: str | None = None  # why the last write failed for lack of space

    def full_reason(self) -> str | None:
        return self._full

    async def probe_write(self) -> None:
        async with self._write() as db:
            await db.execute("UPDATE schema_version SET version = version")

    async def open(self) -> None:
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        self._writer = await self._connect()
        if self.auto_migrate:
            await self.migrate()
        self._read_db = await self._connect()

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=FULL")
        await db.execute("PRAGMA busy_timeout=10000")
        return db

    async def close(self) -> None:
        for db in (self._read_db, self._writer):
            if db is not None:
                await db.close()
        self._read_db = self._writer = None

    async def migrate(self) -> tuple[int, int]:
        """Bring the schema to this version; (before, after)."""
        async with self._write() as db:
            await db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            rows = await db.fetch("SELECT version FROM schema_version")
            current = rows[0][0] if rows else 0
            if current > len(MIGRATIONS):
                raise RuntimeError(
                    f"{self.path} has schema version {current}, newer than this fleetrun "
                    f"({len(MIGRATIONS)}); upgrade fleetrun"
                )
            for version in range(current + 1, len(MIGRATIONS) + 1):
                for statement in MIGRATIONS[version - 1].split(";"):
                    if statement.strip():
                        await db.execute(statement)
            if rows:
                await db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))
            else:
                await db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
            return current, len(MIGRATIONS)

    async def schema_version(self) -> int:
        rows = await self._reader.fetch("SELECT version FROM schema_version")
        return int(rows[0][0])

    @property
    def _reader(self) -> SqliteTx:
        assert self._read_db is not None, "storage is not open"
        return SqliteTx(self._read_db)

    @asynccontextmanager
    async def _write(self, run_id: str | None = None) -> AsyncIterator[SqliteTx]:
        """One transaction at a time, whatever its scope: SQLite has a single writer."""
        assert self._writer is not None, "storage is not open"
        async with self._lock:
            db = self._writer
            try:
                await db.execute("BEGIN IMMEDIATE")
                changes = db.total_changes
                try:
                    yield SqliteTx(db)
                except BaseException:
                    if db.in_transaction:  # on SQLITE_FULL SQLite may have rolled back
                        await db.execute("ROLLBACK")
                    raise
                try:
                    await db.execute("COMMIT")
                except sqlite3.OperationalError:
                    if db.in_transaction:  # never leave the writer inside a transaction
                        await db.execute("ROLLBACK")
                    raise
            except sqlite3.OperationalError as exc:
                if getattr(exc, "sqlite_errorcode", None) != sqlite3.SQLITE_FULL:
                    raise
                if self._full is None:
                    log.error("storage is full: writes fail until space is freed (%s: %s)",
                              self.path, exc)  # fmt: skip
                self._full = f"{exc} ({self.path})"
                raise StorageFull(self._full) from exc
            if self._full is not None and db.total_changes != changes:  # it wrote pages
                log.warning("storage is writable again (%s)", self.path)
                self._full = None
