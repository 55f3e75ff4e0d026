"""A run attempt's records on their way to the control plane.

Records are numbered 1, 2, 3… as they arrive and sent in order, in batches of whatever has
accumulated while the previous send was in flight. The control plane acknowledges the
highest seq it stored; only acknowledged records are dropped, so a failed or repeated send
loses and duplicates nothing (the control plane stores each seq once).

With a spool (the agent always has one), records go to disk first and batches are read
back from it, so what was not acknowledged survives the agent (agent/spool.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import replace

from agent.channel import Position
from agent.client import ContactLog, ControlPlaneError, ControlPlaneUnreachable, RetryDelays
from agent.errors import AgentError
from agent.spool import Spool, SpooledAttempt
from protocol.codec import encode
from protocol.messages import EventAck, EventBatch, RunRecord

log = logging.getLogger("fleetrun.agent.outbox")

MAX_BATCH = 500
MAX_BATCH_BYTES = 4 * 1024 * 1024  # well under the control plane's 8 MiB body limit


def _size(record: RunRecord) -> int:
    """An upper bound of a record's encoded size (msgpack strings are UTF-8)."""
    return len(encode(record)) + 16


def _up_to_size(records: list[RunRecord], limit: int) -> list[RunRecord]:
    """The longest prefix under `limit` bytes (at least one record)."""
    total = 0
    for i, record in enumerate(records):
        total += _size(record)
        if total > limit and i > 0:
            return records[:i]
    return records


class AttemptRejected(AgentError):
    """The control plane refused this attempt's records (stale lease, not our run)."""


class RunOutbox:
    def __init__(
        self,
        agent_id: str,
        run_id: str,
        lease: int,
        send: Callable[[EventBatch], Awaitable[EventAck]],
        before_send: Callable[[list[RunRecord]], Awaitable[None]] | None = None,
        contact: ContactLog | None = None,
        spool: Spool | None = None,
        next_seq: int = 1,
    ) -> None:
        self.agent_id = agent_id
        self.run_id = run_id
        self.lease = lease
        self._spool = spool
        self._attempt = SpooledAttempt(agent_id, run_id, lease)
        self._send = send
        self._before_send = before_send
        self._contact = contact or ContactLog(log)
        self._pending: list[RunRecord] = []
        self._next_seq = next_seq
        self._closed = False
        self._wake = asyncio.Event()
        self._flushing: asyncio.Task[None] | None = None
        self._position: Position | None = None

    def add(self, record: RunRecord, position: Position | None = None) -> None:
        """Number a record and send it; `position`: how far into the worker's channel
        the records added so far go (stored with them)."""
        self._pending.append(replace(record, seq=self._next_seq))
        self._next_seq += 1
        self._position = position or self._position
        if self._spool is not None and (self._flushing is None or self._flushing.done()):
            self._flushing = asyncio.create_task(self._flush())
        self._wake.set()

    async def _flush(self) -> None:
        """Spool records as they come, whatever the send loop is doing (a send can hang
        for its whole timeout in a partition: records must not wait in memory)."""
        assert self._spool is not None
        while self._pending:
            spooling, position, self._pending = self._pending, self._position, []
            try:
                await self._spool.append(self._attempt, spooling, position)
            except Exception as exc:  # e.g. the agent's disk is full: keep them in memory
                self._pending = spooling + self._pending
                log.warning("run %s: cannot spool records: %s", self.run_id, exc)
                return
        self._wake.set()

    def close(self) -> None:
        """No more records will be added; `deliver` returns once all are acknowledged."""
        self._closed = True
        self._wake.set()

    async def _next_batch(self) -> list[RunRecord]:
        """Up to MAX_BATCH records to send next: from memory, or spooled first and read
        back from the spool."""
        if self._spool is None:
            return self._pending[:MAX_BATCH]
        while True:
            flushing = self._flushing
            if flushing is not None and not flushing.done():
                await asyncio.shield(flushing)
            records = await self._spool.pending(self.lease, MAX_BATCH)
            if self._flushing is flushing:
                break
            # A record came while the spool was read, and its flush began: it is in
            # neither `records` nor `_pending` yet. Read again once it is spooled, or
            # a last record (a RUN_SUCCESS) could be left behind when the run closes.
        if not records and self._pending:  # spooling failed: send from memory meanwhile
            return self._pending[:MAX_BATCH]
        return records

    async def _acknowledged(self, acked_seq: int) -> None:
        if self._spool is not None:
            await self._spool.acknowledged(self.lease, acked_seq)
        self._pending = [r for r in self._pending if r.seq > acked_seq]

    async def deliver(self) -> None:
        """Send until closed and fully acknowledged; raises AttemptRejected on refusal."""
        delays = RetryDelays()
        while True:
            records = await self._next_batch()
            if not records:
                if self._closed and not self._pending:
                    return
                self._wake.clear()
                if not self._pending:
                    await self._wake.wait()
                continue
            try:
                if self._before_send is not None:
                    await self._before_send(records)
                batch = EventBatch(
                    agent_id=self.agent_id,
                    run_id=self.run_id,
                    lease=self.lease,
                    records=_up_to_size(records, MAX_BATCH_BYTES),
                )
                ack = await self._send(batch)
            except ControlPlaneUnreachable as exc:
                self._contact.failed(f"records of run {self.run_id}", exc)
                await self._contact.wait(delays.next_delay())
                continue
            except ControlPlaneError as exc:
                if self._spool is not None:
                    await self._spool.forget(self.lease)
                raise AttemptRejected(str(exc)) from None
            delays.reset()
            self._contact.succeeded()
            await self._acknowledged(ack.acked_seq)
