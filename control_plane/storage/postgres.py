"""PostgreSQL storage: asyncpg, a connection pool, and LISTEN/NOTIFY between replicas.

Several control-plane replicas share one database. The queries are `sql/`'s and the schema
`schema.py`'s; what this module adds is how transactions are kept apart across processes:

- a write that spans runs (dispatch, verdicts, registration, ticks) takes the instance's
  advisory lock exclusively, so writes that decide things - which run gets the last
  slot of a limit - happen one at a time across all replicas, exactly as on SQLite;
- one run's records and outputs take that lock shared plus the run's own advisory lock,
  so batches of different runs commit in parallel;
- a one-row write (a heartbeat) takes it shared only.

Advisory locks are namespaced by the schema (`search_path`), so that several instances
may share a database in separate schemas. Wake-ups cross replicas as NOTIFY payloads on
one channel (see bus.py).
"""

from __future__ import annotations

import asyncio
import logging
import re
import zlib
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from control_plane.storage.errors import StorageError, StorageFull, StorageUnavailable
from control_plane.storage.schema import (
    MIGRATIONS,
    check_not_newer,
    current_version,
    for_postgres,
)
from control_plane.storage.sql import SqlStorage
from control_plane.storage.sql.base import record_status_changes
from protocol.logs import redact

log = logging.getLogger("fleetrun.storage")


_CONNECTION_ERRORS = (
    OSError,
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,
    asyncpg.InterfaceError,
    TimeoutError,
)
_PLACEHOLDER = re.compile(r"'[^']*'|\?")
# What the server refuses at log-in: a fix in the URL, not a wait, will help.
_LOGIN_REFUSALS = (
    asyncpg.InvalidAuthorizationSpecificationError,  # and its InvalidPasswordError
    asyncpg.InvalidCatalogNameError,
)


def to_numbered(sql: str) -> str:
    """`?` placeholders (outside string literals) as PostgreSQL's `$1, $2, …`."""
    count = 0

    def number(match: re.Match[str]) -> str:
        nonlocal count
        if match.group() != "?":
            return match.group()
        count += 1
        return f"${count}"

    return _PLACEHOLDER.sub(number, sql)


class PgTx:
    """An asyncpg connection (or the pool, for reads) as a `Tx`."""

    _sql: dict[str, str] = {}  # translated statements, shared by all

    def __init__(self, conn: asyncpg.Connection | asyncpg.Pool | PoolConnectionProxy) -> None:
        self.conn = conn
        self.status_changes: list[tuple[str, str, float]] = []

    def _translate(self, sql: str) -> str:
        numbered = self._sql.get(sql)
        if numbered is None:
            numbered = self._sql[sql] = to_numbered(sql)
        return numbered

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return [tuple(r) for r in await self.conn.fetch(self._translate(sql), *args)]

    async def execute(self, sql: str, args: Sequence[Any] = ()) -> int:
        status = await self.conn.execute(self._translate(sql), *args)
        tail = status.rsplit(" ", 1)[-1]
        return int(tail) if tail.isdigit() else 0

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> None:
        rows = list(rows)
        if rows:
            await self.conn.executemany(self._translate(sql), rows)


def _lock_key(text: str) -> int:
    """A signed 32-bit advisory-lock key for `text`."""
    return zlib.crc32(text.encode()) - 2**31


def _search_path(url: str) -> str:
    values = parse_qs(urlsplit(url).query).get("search_path")
    return values[0].split(",")[0].strip() if values else "public"


def explain_connect_failure(url: str, exc: BaseException) -> str:
    """One line for a failed first connection: the URL (masked), what the server or the
    network said, and what to change in `storage.url`. Startup errors end here, so an
    operator reads a fix rather than asyncpg's traceback."""
    parts = urlsplit(url)
    role = parts.username or "ROLE"
    database = parts.path.lstrip("/") or role
    where = parts.netloc.rpartition("@")[2] or "localhost:5432"
    if isinstance(exc, asyncpg.InvalidPasswordError):
        fix = "correct the password in storage.url (percent-encoded: %40 for @, %2F for /)"
    elif isinstance(exc, asyncpg.InvalidAuthorizationSpecificationError):
        fix = (
            f"put an existing role in storage.url (postgresql://ROLE@{where}/{database}) "
            f"or create this one (createuser {role}); if it exists, pg_hba.conf must let it in"
        )
    elif isinstance(exc, asyncpg.InvalidCatalogNameError):
        fix = (
            f"name an existing database in storage.url (postgresql://{role}@{where}/DATABASE) "
            f"or create this one (createdb -O {role} {database})"
        )
    elif isinstance(exc, OSError | TimeoutError):
        fix = f"is PostgreSQL listening on {where}? correct the host and port in storage.url"
    else:
        fix = "check storage.url"
    return f"cannot connect to {redact(url)}: {redact(str(exc)) or type(exc).__name__}; fix: {fix}"


class PostgresStorage(SqlStorage):
    shared = True

    def __init__(self, url: str, pool_size: int = 10) -> None:
        super().__init__()
        self.url = url
        self.pool_size = pool_size
        self._pool: asyncpg.Pool | None = None
        self._full: str | None = None
        schema = _search_path(url)
        self.channel = (
            "fleetrun" if schema == "public" else f"fleetrun_{_lock_key(schema) & 0xFFFF}"
        )
        self._instance_key = _lock_key(f"fleetrun instance {schema}")
        self._run_space = _lock_key(f"fleetrun runs {schema}")
        self._history_key = _lock_key(f"fleetrun status history {schema}")

    def __repr__(self) -> str:
        return f"PostgresStorage({redact(self.url)})"

    def full_reason(self) -> str | None:
        return self._full

    async def probe_write(self) -> None:
        async with self._write_row() as db:
            await db.execute("UPDATE schema_version SET version = version")

    async def open(self) -> None:
        try:
            self._pool = await asyncpg.create_pool(
                self.url, min_size=1, max_size=self.pool_size, command_timeout=60
            )
        except _LOGIN_REFUSALS as exc:
            raise StorageError(explain_connect_failure(self.url, exc)) from exc
        except _CONNECTION_ERRORS as exc:
            raise StorageUnavailable(explain_connect_failure(self.url, exc)) from exc
        except ValueError as exc:  # asyncpg cannot parse the URL (a port, a parameter)
            raise StorageError(f"cannot use {redact(self.url)}: {redact(str(exc))}") from exc
        if self.auto_migrate:
            try:
                await self.migrate()
            except BaseException:
                await self.close()
                raise

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    @property
    def _p(self) -> asyncpg.Pool:
        assert self._pool is not None, "storage is not open"
        return self._pool

    async def migrate(self) -> tuple[int, int]:
        """Bring the schema to this version (one replica at a time); (before, after)."""
        async with self._p.acquire() as conn, conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", _lock_key("migrate"))
            await conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER)")
            recorded = await conn.fetchval("SELECT version FROM schema_version")
            current = current_version(recorded, postgres=True)
            check_not_newer(current, redact(self.url))
            for migration in MIGRATIONS[current:]:
                await conn.execute(for_postgres(migration))
            if recorded is None:
                await conn.execute("INSERT INTO schema_version VALUES ($1)", len(MIGRATIONS))
            else:
                await conn.execute("UPDATE schema_version SET version = $1", len(MIGRATIONS))
            return current, len(MIGRATIONS)

    async def continue_ids(self, columns: dict[str, str]) -> None:
        async with self._write() as db:
            for table, column in columns.items():
                await db.fetch(
                    f"SELECT setval(pg_get_serial_sequence('{table}', '{column}'),"
                    f" COALESCE((SELECT MAX({column}) FROM {table}), 0) + 1, false)"
                )

    async def schema_version(self) -> int:
        recorded = await self._p.fetchval("SELECT version FROM schema_version")
        return current_version(recorded, postgres=True)

    @property
    def _reader(self) -> PgTx:
        return _ReadTx(self._p)

    def _write(self, run_id: str | None = None) -> AbstractAsyncContextManager[PgTx]:
        if run_id is None:
            return self._transaction("SELECT pg_advisory_xact_lock($1)", self._instance_key)
        return self._transaction(
            "SELECT pg_advisory_xact_lock_shared($1), pg_advisory_xact_lock($2, $3)",
            self._instance_key,
            self._run_space,
            _lock_key(run_id),
        )

    def _write_row(self) -> AbstractAsyncContextManager[PgTx]:
        return self._transaction("SELECT pg_advisory_xact_lock_shared($1)", self._instance_key)

    @asynccontextmanager
    async def _transaction(self, lock_sql: str, *lock_args: int) -> AsyncIterator[PgTx]:
        """A transaction that first takes the advisory locks `lock_sql` names."""
        try:
            async with self._p.acquire() as conn, conn.transaction():
                await conn.execute(lock_sql, *lock_args)
                tx = PgTx(conn)
                yield tx
                if tx.status_changes:  # numbered under a lock held to the commit
                    await conn.execute("SELECT pg_advisory_xact_lock($1)", self._history_key)
                    await record_status_changes(tx)
        except asyncpg.DiskFullError as exc:
            if self._full is None:
                log.error("storage is full: writes fail until space is freed (%s)", exc)
            self._full = f"{exc} ({redact(self.url)})"
            raise StorageFull(self._full) from exc
        except _CONNECTION_ERRORS as exc:
            raise StorageUnavailable(f"lost the database connection: {exc}") from exc
        if self._full is not None:
            log.warning("storage is writable again (%s)", redact(self.url))
            self._full = None

    # --- notifications between replicas ----------------------------------------------

    async def notify(self, payloads: list[str]) -> None:
        if payloads:
            await self._p.execute(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p", self.channel, payloads
            )

    async def listen(
        self, on_message: Callable[[str], None], on_reconnect: Callable[[], None]
    ) -> None:
        """Hold a LISTEN connection; when it drops, reconnect and report it (whatever was
        sent meanwhile is lost, so the caller re-checks everything)."""
        delay = 0.1
        while True:
            conn: asyncpg.Connection | None = None
            try:
                conn = await asyncpg.connect(self.url)
                lost = asyncio.Event()
                conn.add_termination_listener(lambda _c, lost=lost: lost.set())
                await conn.add_listener(
                    self.channel, lambda _c, _p, _ch, payload: on_message(payload)
                )
                on_reconnect()
                delay = 0.1
                while not lost.is_set():
                    try:
                        await asyncio.wait_for(lost.wait(), 5.0)
                    except TimeoutError:
                        await asyncio.wait_for(conn.fetchval("SELECT 1"), 5.0)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning(
                    "LISTEN connection to %s lost (%s); reconnecting in %.1f s",
                    redact(self.url),
                    exc,
                    delay,
                )
            finally:
                if conn is not None and not conn.is_closed():
                    conn.terminate()
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


class _ReadTx(PgTx):
    """Reads outside a transaction: each statement on whichever pooled connection is free."""

    async def fetch(self, sql: str, args: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return await super().fetch(sql, args)
        except _CONNECTION_ERRORS as exc:
            raise StorageUnavailable(f"lost the database connection: {exc}") from exc
