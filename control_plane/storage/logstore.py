"""Where compute-log text lives: in the database (`DatabaseLogStore`, the default) or in
files per run and step (`FilesystemLogStore`), as `[compute_logs] kind` chooses.

Either way every chunk has an index row in `compute_logs`, written in the same
transaction as the rest of its batch: the row's id orders the run's chunks and pages
`after=ID`, and the transaction's acked sequence number keeps a re-sent chunk from being
stored twice. The filesystem store writes a chunk's bytes at the end of its file and
fsyncs them before the row is inserted, so a committed row never points at missing bytes;
bytes a crash left behind past the last committed row belong to no row and are never read.
A run's folder is removed once no row of it is left (its deletion, its purge, or the
purge of its last chunks), after that transaction commits; chunks purged while younger
ones of the same run are kept stay on disk until the rest go too.
A row that holds its own text (`file_offset` NULL) is served as it is, whatever the kind:
an instance that switches kinds keeps serving its old logs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shutil
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

from control_plane.model.runs import LogChunk
from protocol.messages import RunRecord

if TYPE_CHECKING:
    from control_plane.storage.sql.base import Tx

log = logging.getLogger("fleetrun.storage")

LOG_COLUMNS = "id, step, stream, time, text, file_offset, file_length"
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


@dataclass(frozen=True)
class LogRow:
    """One `compute_logs` index row, as `LOG_COLUMNS` selects it."""

    id: int
    step: str | None
    stream: str
    time: float
    text: str
    file_offset: int | None
    file_length: int | None


class LogStore(Protocol):
    """Stores compute-log chunks inside a run's write transaction, and reads them back."""

    async def append(self, db: Tx, run_id: str, lease: int, records: Sequence[RunRecord]) -> None:
        """Store `records` (kind "log", in order) within `db`'s transaction."""
        ...

    async def read(self, run_id: str, rows: Sequence[LogRow]) -> list[LogChunk]:
        """The chunks the index rows stand for, in the rows' order."""
        ...

    async def forget(self, run_ids: Sequence[str]) -> None:
        """Drop the text of runs that no index row points at any more (called once the
        transaction that deleted their rows committed)."""
        ...


class DatabaseLogStore:
    """Text in the `compute_logs` rows themselves. `files` is the folder of an earlier
    filesystem store, so that its chunks stay readable after switching back."""

    def __init__(self, files: str = "") -> None:
        self.files = files

    async def append(self, db: Tx, run_id: str, lease: int, records: Sequence[RunRecord]) -> None:
        await db.executemany(
            "INSERT INTO compute_logs (run_id, attempt, step, stream, time, text)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(run_id, lease, r.step, r.type, r.time, r.message) for r in records],
        )

    async def read(self, run_id: str, rows: Sequence[LogRow]) -> list[LogChunk]:
        if not self.files or all(row.file_offset is None for row in rows):
            return [_chunk(row, row.text) for row in rows]
        return await FilesystemLogStore(self.files).read(run_id, rows)

    async def forget(self, run_ids: Sequence[str]) -> None:
        if self.files:
            await FilesystemLogStore(self.files).forget(run_ids)


class FilesystemLogStore:
    """Text in files `<root>/<run_id>/step-<step>.log` (`run.log` for chunks of no step),
    appended as chunks arrive; the index rows hold each chunk's offset and length."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    async def append(self, db: Tx, run_id: str, lease: int, records: Sequence[RunRecord]) -> None:
        places = await asyncio.to_thread(self._write, run_id, records)
        await db.executemany(
            "INSERT INTO compute_logs"
            " (run_id, attempt, step, stream, time, text, file_offset, file_length)"
            " VALUES (?, ?, ?, ?, ?, '', ?, ?)",
            [
                (run_id, lease, r.step, r.type, r.time, offset, length)
                for r, (offset, length) in zip(records, places, strict=True)
            ],
        )

    async def read(self, run_id: str, rows: Sequence[LogRow]) -> list[LogChunk]:
        return await asyncio.to_thread(self._read, run_id, rows)

    async def forget(self, run_ids: Sequence[str]) -> None:
        if run_ids:
            await asyncio.to_thread(self._remove, run_ids)

    def _remove(self, run_ids: Sequence[str]) -> None:
        for run_id in run_ids:
            try:
                folder = self.path(run_id, None).parent
            except ValueError:
                continue  # a name no folder of ours can have
            shutil.rmtree(folder, ignore_errors=True)

    def path(self, run_id: str, step: str | None) -> Path:
        """The file of one run's step; names that could leave the folder are refused."""
        if not _SAFE_NAME.match(run_id) or run_id.startswith("."):
            raise ValueError(f"run id {run_id[:64]!r} cannot name a log folder")
        if step is None:
            return self.root / run_id / "run.log"
        if not _SAFE_NAME.match(step):
            raise ValueError(f"step {step[:64]!r} cannot name a log file")
        return self.root / run_id / f"step-{step}.log"

    def _write(self, run_id: str, records: Sequence[RunRecord]) -> list[tuple[int, int]]:
        """Append each record's text to its step's file, fsync; (offset, length) each."""
        files: dict[Path, list[int]] = {}
        for index, record in enumerate(records):
            files.setdefault(self.path(run_id, record.step), []).append(index)
        places: dict[int, tuple[int, int]] = {}
        for path, indexes in files.items():
            texts = [records[index].message.encode("utf-8") for index in indexes]
            places.update(zip(indexes, _append(path, texts), strict=True))
        return [places[index] for index in range(len(records))]

    def _read(self, run_id: str, rows: Sequence[LogRow]) -> list[LogChunk]:
        """Each row's byte range, read from its file (each file opened once)."""
        with ExitStack() as stack:
            opened: dict[Path, BinaryIO | None] = {}
            chunks: list[LogChunk] = []
            for row in rows:
                if row.file_offset is None or row.file_length is None:
                    chunks.append(_chunk(row, row.text))
                    continue
                path = self.path(run_id, row.step)
                if path not in opened:
                    opened[path] = _open(stack, path)
                data = _range(opened[path], row.file_offset, row.file_length)
                chunks.append(_chunk(row, data.decode("utf-8", errors="replace")))
            return chunks


def _append(path: Path, texts: list[bytes]) -> list[tuple[int, int]]:
    """Append the texts at the end of `path` (past any bytes a crash left) and fsync;
    (offset, length) of each."""
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    places: list[tuple[int, int]] = []
    with open(path, "ab") as out:
        offset = out.seek(0, os.SEEK_END)
        for data in texts:
            out.write(data)
            places.append((offset, len(data)))
            offset += len(data)
        out.flush()
        os.fsync(out.fileno())
    if new:
        _fsync_dir(path.parent)
    return places


def _fsync_dir(folder: Path) -> None:
    """Make a new file's name durable too (its folder's entry)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _open(stack: ExitStack, path: Path) -> BinaryIO | None:
    try:
        return stack.enter_context(open(path, "rb"))
    except FileNotFoundError:
        log.warning("compute-log file %s is missing: its chunks are served empty", path)
        return None


def _range(file: BinaryIO | None, offset: int, length: int) -> bytes:
    if file is None:
        return b""
    file.seek(offset)
    return file.read(length)


def _chunk(row: LogRow, text: str) -> LogChunk:
    return LogChunk(id=row.id, step=row.step, stream=row.stream, time=row.time, text=text)


def log_store_for(kind: str, path: str) -> LogStore:
    """The log store `[compute_logs]` names: the one place the kind is chosen."""
    if kind == "filesystem":
        return FilesystemLogStore(path)
    if kind == "database":
        return DatabaseLogStore(files=path)
    raise ValueError(f"unknown compute_logs kind {kind!r}: use 'database' or 'filesystem'")
