"""The compute-log stores (control_plane/storage/logstore.py) on both databases: chunks in
files keep the order, the paging and the exactly-once of chunks in the database, a crash
between the file write and the commit leaves nothing visible, and switching kinds keeps
every chunk readable."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from control_plane.config import load_control_plane_config
from control_plane.storage import Storage
from control_plane.storage.logstore import DatabaseLogStore, FilesystemLogStore, log_store_for
from control_plane.storage.sql import SqlStorage
from control_plane.storage.sql.base import Tx
from protocol.messages import RunRecord
from protocol.schema import ConfigError
from tests.unit.test_storage import agent_id, started


def line(seq: int, text: str, step: str | None = "a", stream: str = "stdout") -> RunRecord:
    return RunRecord(seq=seq, time=float(seq), kind="log", type=stream, step=step, message=text)


def use(storage: Storage, store: DatabaseLogStore | FilesystemLogStore) -> None:
    assert isinstance(storage, SqlStorage)
    storage.logs = store


class CrashBeforeCommit(FilesystemLogStore):
    """Writes and fsyncs the bytes, then fails before its rows are inserted: the same
    state on disk as a control plane killed between the file write and the commit."""

    async def append(self, db: Tx, run_id: str, lease: int, records: Sequence[RunRecord]) -> None:
        await super().append(db, run_id, lease, records)
        raise RuntimeError("killed before the commit")


async def texts(storage: Storage, step: str | None = None, after: int = 0) -> list[str]:
    return [c.text for c in await storage.get_logs("r1", step, after)]


async def test_chunks_go_to_files_per_run_and_step(storage: Storage, tmp_path: Path) -> None:
    store = FilesystemLogStore(str(tmp_path / "logs"))
    use(storage, store)
    lease = await started(storage, "r1", await agent_id(storage))
    batch = [line(2, "one\n"), line(3, "é two\n", stream="stderr"), line(4, "x\n", "extract")]
    assert (await storage.append_records("r1", lease, batch, now=3)).acked_seq == 4
    await storage.append_records("r1", lease, [line(5, "three\n"), line(6, "free\n", None)], now=4)
    assert (tmp_path / "logs" / "r1" / "step-a.log").read_text() == "one\né two\nthree\n"
    assert (tmp_path / "logs" / "r1" / "step-extract.log").read_text() == "x\n"
    assert (tmp_path / "logs" / "r1" / "run.log").read_text() == "free\n"
    chunks = await storage.get_logs("r1", None, 0)
    assert [(c.step, c.stream, c.text) for c in chunks] == [
        ("a", "stdout", "one\n"),
        ("a", "stderr", "é two\n"),
        ("extract", "stdout", "x\n"),
        ("a", "stdout", "three\n"),
        (None, "stdout", "free\n"),
    ]
    assert [c.id for c in chunks] == sorted(c.id for c in chunks)
    assert await texts(storage, "a") == ["one\n", "é two\n", "three\n"]
    assert await texts(storage, None, chunks[2].id) == ["three\n", "free\n"]
    assert await texts(storage, "a", chunks[-1].id) == []


async def test_a_resent_chunk_is_stored_once(storage: Storage, tmp_path: Path) -> None:
    use(storage, FilesystemLogStore(str(tmp_path / "logs")))
    lease = await started(storage, "r1", await agent_id(storage))
    await storage.append_records("r1", lease, [line(2, "one\n"), line(3, "two\n")], now=3)
    batch = [line(2, "one\n"), line(3, "two\n"), line(4, "three\n")]
    assert (await storage.append_records("r1", lease, batch, now=4)).acked_seq == 4
    assert await texts(storage) == ["one\n", "two\n", "three\n"]
    assert (tmp_path / "logs" / "r1" / "step-a.log").read_text() == "one\ntwo\nthree\n"


async def test_a_crash_between_file_write_and_commit_leaves_nothing_visible(
    storage: Storage, tmp_path: Path
) -> None:
    folder = str(tmp_path / "logs")
    use(storage, FilesystemLogStore(folder))
    lease = await started(storage, "r1", await agent_id(storage))
    await storage.append_records("r1", lease, [line(2, "one\n")], now=3)
    use(storage, CrashBeforeCommit(folder))
    with pytest.raises(RuntimeError):
        await storage.append_records("r1", lease, [line(3, "two\n")], now=4)
    assert await texts(storage) == ["one\n"]  # the bytes are on disk, but no row has them
    use(storage, FilesystemLogStore(folder))  # restarted: the agent sends the chunk again
    assert (await storage.append_records("r1", lease, [line(3, "two\n")], now=5)).acked_seq == 3
    await storage.append_records("r1", lease, [line(4, "three\n")], now=6)
    assert await texts(storage) == ["one\n", "two\n", "three\n"]


async def test_logs_stay_readable_when_the_kind_changes(storage: Storage, tmp_path: Path) -> None:
    folder = str(tmp_path / "logs")
    lease = await started(storage, "r1", await agent_id(storage))
    await storage.append_records("r1", lease, [line(2, "in the table\n")], now=3)
    use(storage, FilesystemLogStore(folder))
    await storage.append_records("r1", lease, [line(3, "in a file\n")], now=4)
    assert await texts(storage) == ["in the table\n", "in a file\n"]
    assert (tmp_path / "logs" / "r1" / "step-a.log").read_text() == "in a file\n"
    use(storage, DatabaseLogStore(files=folder))  # switched back, path kept
    await storage.append_records("r1", lease, [line(4, "in the table again\n")], now=5)
    assert await texts(storage) == ["in the table\n", "in a file\n", "in the table again\n"]


def test_names_that_could_leave_the_folder_are_refused(tmp_path: Path) -> None:
    store = FilesystemLogStore(str(tmp_path))
    for run_id, step in [("../r1", "a"), ("..", "a"), ("r1", "../a"), ("r1", "a/b"), ("", "a")]:
        with pytest.raises(ValueError, match="cannot name"):
            store.path(run_id, step)
    assert store.path("r1", "a") == tmp_path / "r1" / "step-a.log"


def test_the_kind_chooses_the_store(tmp_path: Path) -> None:
    assert isinstance(log_store_for("filesystem", str(tmp_path)), FilesystemLogStore)
    assert isinstance(log_store_for("database", ""), DatabaseLogStore)
    with pytest.raises(ValueError, match="unknown compute_logs kind 's3'"):
        log_store_for("s3", "")


def test_the_path_is_relative_to_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "cp.toml"
    path.write_text('[compute_logs]\nkind = "filesystem"\npath = "logs"\n')
    config = load_control_plane_config(str(path))
    assert (config.compute_logs.kind, config.compute_logs.path) == (
        "filesystem",
        f"{tmp_path}/logs",
    )
    assert load_control_plane_config(None).compute_logs.kind == "database"


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ('kind = "filesystem"\n', "'compute_logs.path': required"),
        ('kind = "s3"\npath = "x"\n', "'compute_logs.kind': must be 'database' or 'filesystem'"),
        ("kind = 1\n", "compute_logs.kind"),
        ('kind = "database"\nfolder = "x"\n', "folder"),
    ],
)
def test_a_bad_compute_logs_table_is_named(tmp_path: Path, text: str, named: str) -> None:
    path = tmp_path / "cp.toml"
    path.write_text("[compute_logs]\n" + text)
    with pytest.raises(ConfigError) as info:
        load_control_plane_config(str(path))
    assert named in str(info.value) and "cp.toml" in str(info.value)


async def test_a_runs_files_go_when_its_rows_do(storage: Storage, tmp_path: Path) -> None:
    """Deleting a run, purging it, or purging its last chunks removes its folder; a run
    whose younger chunks are kept keeps its folder (the file's bytes back them)."""
    from control_plane.model.retention import COMPUTE_LOGS, RUNS, Purge
    from tests.unit.test_storage import assign_lease, event, new_run
    from tests.unit.test_storage_retention import finished, purge_all

    root = tmp_path / "logs"
    use(storage, FilesystemLogStore(str(root)))
    aid = await agent_id(storage)
    await finished(storage, "deleted", aid, end=10)
    await finished(storage, "purged", aid, end=10)
    await finished(storage, "old-logs", aid, end=100)
    await storage.create_run(new_run("young-logs"), now=90)
    lease = await assign_lease(storage, "young-logs", aid, now=90)
    late = RunRecord(seq=3, time=5000.0, kind="log", type="stdout", step="a", message="late\n")
    batch = [event(1, "RUN_START"), line(2, "early\n"), late]
    await storage.append_records("young-logs", lease, batch, now=5000)
    await storage.append_records("young-logs", lease, [event(4, "RUN_SUCCESS")], now=5001)
    assert {p.name for p in root.iterdir()} == {"deleted", "purged", "old-logs", "young-logs"}

    await storage.delete_run("deleted")
    assert not (root / "deleted").exists()
    await purge_all(storage, Purge(RUNS, "SUCCESS", before=11))
    assert {p.name for p in root.iterdir()} == {"old-logs", "young-logs"}
    assert await purge_all(storage, Purge(COMPUTE_LOGS, None, before=1000)) == {"compute_logs": 2}
    assert {p.name for p in root.iterdir()} == {"young-logs"}
    assert [c.text for c in await storage.get_logs("young-logs", None, 0)] == ["late\n"]
