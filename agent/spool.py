"""The agent's durable spool: every run record is on local disk before it is sent.

An SQLite file in the agent's state directory holds each run attempt's records until
the control plane acknowledges them (by per-attempt sequence number). So records
survive a control plane that is down, frozen or partitioned away, and an agent that is
killed: on start the agent re-sends what its spool holds, in order, before it
registers, and the control plane stores each (run, lease, seq) once.

Bounds: `max_bytes` of record bodies, and `max_age_seconds`. Past the size bound the
oldest compute-log text, and past the age bound any older log text, is replaced by a
short marker (its sequence number stays, so delivery stays in order); events — run and
step lifecycle — are never dropped. A warning is logged when the spool passes 80 % of
the size bound.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

import aiosqlite

from agent.channel import Position
from protocol.codec import decode, encode
from protocol.messages import RunRecord

log = logging.getLogger("fleetrun.agent.spool")

SCHEMA = """
CREATE TABLE IF NOT EXISTS records (
    lease INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    agent_id TEXT NOT NULL,
    run_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    size INTEGER NOT NULL,
    body BLOB NOT NULL,
    stored_time REAL NOT NULL,
    PRIMARY KEY (lease, seq)
);
CREATE INDEX IF NOT EXISTS records_by_kind ON records (kind, lease, seq);
CREATE TABLE IF NOT EXISTS positions (
    lease INTEGER PRIMARY KEY,
    position TEXT NOT NULL,
    next_seq INTEGER NOT NULL
);
"""
WARN_FRACTION = 0.8
AGE_CHECK_SECONDS = 60.0


@dataclass(frozen=True)
class SpooledAttempt:
    """A run attempt with records still to deliver."""

    agent_id: str
    run_id: str
    lease: int


class Spool:
    def __init__(
        self,
        path: str | Path,
        max_bytes: int = 256 * 1024 * 1024,
        max_age_seconds: float = 7 * 86400,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.max_age_seconds = max_age_seconds
        self.clock = clock
        self._age_checked = 0.0
        self._db: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()
        self._bytes = 0
        self._warned = False

    async def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        # WAL + NORMAL: a commit survives the agent being killed (what the spool is for);
        # a power loss may take the last commits, which the control plane then never
        # acknowledged either (documented in docs/reliability.md).
        await self._db.execute("PRAGMA journal_mode=WAL")
        await self._db.execute("PRAGMA synchronous=NORMAL")
        await self._db.executescript(SCHEMA)
        self._bytes = await self._stored_bytes()

    async def _stored_bytes(self) -> int:
        async with self.db.execute("SELECT COALESCE(SUM(size), 0) FROM records") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row is not None else 0

    async def close(self) -> None:
        if self._db is not None:
            await self._db.close()
            self._db = None

    @property
    def db(self) -> aiosqlite.Connection:
        assert self._db is not None, "open the spool first"
        return self._db

    @property
    def size(self) -> int:
        return self._bytes

    async def append(
        self, attempt: SpooledAttempt, records: list[RunRecord], position: Position | None = None
    ) -> None:
        """Store records (in one transaction); a record already stored is kept as is.
        With `position`: how far into the worker's channel these records go, stored in
        the same transaction (where an agent that restarts reads on from)."""
        if not records:
            return
        rows = []
        now = self.clock()
        for record in records:
            body = encode(record)
            rows.append(
                (
                    attempt.lease,
                    record.seq,
                    attempt.agent_id,
                    attempt.run_id,
                    record.kind,
                    len(body),
                    body,
                    now,
                )
            )
        async with self._lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                cursor = await self.db.executemany(
                    "INSERT OR IGNORE INTO records (lease, seq, agent_id, run_id, kind, size,"
                    " body, stored_time) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    rows,
                )
                added = sum(r[5] for r in rows) if cursor.rowcount == len(rows) else None
                if position is not None:
                    await self.db.execute(
                        "INSERT OR REPLACE INTO positions (lease, position, next_seq)"
                        " VALUES (?, ?, ?)",
                        (attempt.lease, position.to_json(), records[-1].seq + 1),
                    )
                await self.db.execute("COMMIT")
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            if added is None:  # some were there already (a replay): count from the table
                self._bytes = await self._stored_bytes()
            else:
                self._bytes += added
            if self._bytes > self.max_bytes:
                await self._shed_logs()
            await self._shed_old_logs(now)
        self._warn_if_near_full()

    async def _shed_old_logs(self, now: float) -> None:
        """Log text older than `max_age_seconds` goes, however much room is left (looked
        for at most once a minute)."""
        if now - self._age_checked < AGE_CHECK_SECONDS:
            return
        self._age_checked = now
        rows = await self.db.execute_fetchall(
            "SELECT lease, seq, size, body FROM records WHERE kind = 'log' AND size > 200"
            " AND stored_time < ? ORDER BY lease, seq",
            (now - self.max_age_seconds,),
        )
        if rows:
            await self._shed(list(rows), "older than the spool's max age", all_rows=True)

    async def _shed_logs(self) -> None:
        """Replace the oldest compute-log text by a marker until under the bound."""
        rows = await self.db.execute_fetchall(
            "SELECT lease, seq, size, body FROM records WHERE kind = 'log' AND size > 200"
            " ORDER BY lease, seq"
        )
        await self._shed(list(rows), "agent spool full", all_rows=False)

    async def _shed(self, rows: list[aiosqlite.Row], why: str, all_rows: bool) -> None:
        freed = 0
        updates = []
        for lease, seq, size, body in rows:
            if not all_rows and self._bytes - freed <= self.max_bytes:
                break
            record = decode(body, RunRecord)
            dropped = len(record.message.encode())
            marker = f"[{dropped} bytes of log dropped: {why}]\n"
            new_body = encode(replace(record, message=marker))
            updates.append((len(new_body), new_body, lease, seq))
            freed += size - len(new_body)
        if updates:
            await self.db.executemany(
                "UPDATE records SET size = ?, body = ? WHERE lease = ? AND seq = ?", updates
            )
            self._bytes -= freed
            log.warning("dropped the text of %d compute-log chunks (%s)", len(updates), why)

    def _warn_if_near_full(self) -> None:
        near = self._bytes > WARN_FRACTION * self.max_bytes
        if near and not self._warned:
            log.warning(
                "agent spool holds %d bytes, near its bound of %d: the control plane "
                "is not taking records; compute-log text goes first past the bound",
                self._bytes,
                self.max_bytes,
            )
        self._warned = near

    async def pending(self, lease: int, limit: int = 500) -> list[RunRecord]:
        rows = await self.db.execute_fetchall(
            "SELECT body FROM records WHERE lease = ? ORDER BY seq LIMIT ?", (lease, limit)
        )
        return [decode(body, RunRecord) for (body,) in rows]

    async def acknowledged(self, lease: int, acked_seq: int) -> None:
        """The control plane stored every record of `lease` up to `acked_seq`."""
        async with self._lock:
            cursor = await self.db.execute(
                "DELETE FROM records WHERE lease = ? AND seq <= ? RETURNING size",
                (lease, acked_seq),
            )
            freed = sum(size for (size,) in await cursor.fetchall())
            self._bytes -= freed
        self._warn_if_near_full()

    async def forget(self, lease: int) -> None:
        """Drop an attempt the control plane refused (fenced, or not this agent's)."""
        await self.acknowledged(lease, 2**62)
        await self.forget_position(lease)

    async def position(self, lease: int) -> tuple[Position, int] | None:
        """How far into its channel an attempt's stored records go, and the seq of the
        next record; None if none was stored."""
        rows = await self.db.execute_fetchall(
            "SELECT position, next_seq FROM positions WHERE lease = ?", (lease,)
        )
        for position, next_seq in rows:
            return Position.from_json(position), int(next_seq)
        return None

    async def forget_position(self, lease: int) -> None:
        """The attempt is over and delivered: its channel is no longer read."""
        async with self._lock:
            await self.db.execute("DELETE FROM positions WHERE lease = ?", (lease,))

    async def attempts(self) -> list[SpooledAttempt]:
        rows = await self.db.execute_fetchall(
            "SELECT DISTINCT agent_id, run_id, lease FROM records ORDER BY lease"
        )
        return [SpooledAttempt(agent_id, run_id, lease) for agent_id, run_id, lease in rows]
