"""SQLite storage (embedded default): aiosqlite, WAL, synchronous=FULL, versioned schema.

One writer connection, serialised by an asyncio lock so that each write is one
`BEGIN IMMEDIATE … COMMIT` transaction that no other coroutine can interleave with, and
one reader connection that WAL lets read concurrently. `synchronous=FULL` makes every
acknowledged commit survive a power loss, not only a process crash. The queries
(`sql/`) and the schema (`schema.py`) are shared with PostgreSQL.
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

from control_plane.storage.errors import StorageFull
from control_plane.storage.schema import (
    MIGRATIONS,
    check_not_newer,
    current_version,
    statements,
)
from control_plane.storage.sql import SqlStorage
from control_plane.storage.sql.base import record_status_changes

log = logging.getLogger("fleetrun.storage")
INCREMENTAL = 2  # PRAGMA auto_vacuum's value for INCREMENTAL


class SqliteTx:
    """An aiosqlite connection as a `Tx` (SQLite speaks the `?` placeholders as written)."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self.db = db
        self.status_changes: list[tuple[str, str, float]] = []

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
        try:
            if self.auto_migrate:
                await self.migrate()
            self._read_db = await self._connect()
        except BaseException:  # e.g. SchemaTooNew: a connection left open keeps the process
            await self.close()
            raise

    async def _connect(self) -> aiosqlite.Connection:
        db = await aiosqlite.connect(self.path, isolation_level=None)
        # Takes effect only on a new, empty database (an existing one switches with a
        # VACUUM, docs/operations.md): purged pages can then go back to the file system.
        await db.execute("PRAGMA auto_vacuum=INCREMENTAL")
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
            current = current_version(rows[0][0] if rows else None, postgres=False)
            check_not_newer(current, self.path)
            for migration in MIGRATIONS[current:]:
                for statement in statements(migration):
                    await db.execute(statement)
            if rows:
                await db.execute("UPDATE schema_version SET version = ?", (len(MIGRATIONS),))
            else:
                await db.execute("INSERT INTO schema_version VALUES (?)", (len(MIGRATIONS),))
            return current, len(MIGRATIONS)

    async def schema_version(self) -> int:
        rows = await self._reader.fetch("SELECT version FROM schema_version")
        return int(rows[0][0])

    async def reclaim_space(self, pages: int) -> None:
        """`PRAGMA incremental_vacuum` when the database has auto_vacuum=INCREMENTAL: a
        few pages at a time, under the writer lock, outside any transaction."""
        assert self._writer is not None, "storage is not open"
        async with self._lock:
            rows = await self._writer.execute_fetchall("PRAGMA auto_vacuum")
            if next(iter(rows))[0] == INCREMENTAL:
                await self._writer.execute_fetchall(f"PRAGMA incremental_vacuum({int(pages)})")

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
                tx = SqliteTx(db)
                try:
                    yield tx
                    await record_status_changes(tx)  # one writer: ids in commit order
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
                    log.error(
                        "storage is full: writes fail until space is freed (%s: %s)", self.path, exc
                    )
                self._full = f"{exc} ({self.path})"
                raise StorageFull(self._full) from exc
            if self._full is not None and db.total_changes != changes:  # it wrote pages
                log.warning("storage is writable again (%s)", self.path)
                self._full = None
