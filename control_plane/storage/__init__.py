"""The instance's storage: the port the control plane talks to (`port.py`, one protocol
per aggregate), and its two implementations, SQLite (embedded) and PostgreSQL (several
replicas), which share their queries (`sql/`) and their schema (`schema.py`).

Nothing outside this package writes SQL; nothing inside it decides what a run should
do next: that is the daemon's and the model's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from control_plane.storage.port import Storage
from protocol.logs import redact

if TYPE_CHECKING:
    from control_plane.storage.logstore import LogStore
    from control_plane.storage.sql import SqlStorage


def url_problem(url: str) -> str | None:
    """Why a database URL's user name or password cannot be used as written, or None.
    A space, a control character or an unescaped / ? # @ in them makes parsers cut the
    URL elsewhere than meant: a piece of the password then passes for a host or a port,
    is quoted in their errors, and no mask can find it. The answer never quotes the URL."""
    if url.startswith("sqlite:"):
        return None  # a path, no credentials: spaces and @ are fine
    credentials, at, _ = url.partition("://")[2].rpartition("@")
    if at and any(ch.isspace() or not ch.isprintable() or ch in "/?#@" for ch in credentials):
        return (
            "percent-encode the user name and password of the storage url: a space, a "
            "control character or one of / ? # @ in them is ambiguous (%20 for a space, "
            "%2F for /, %3F for ?, %23 for #, %40 for @)"
        )
    return None


def open_storage(url: str, pool_size: int = 10, logs: LogStore | None = None) -> Storage:
    """Create the storage backend a `[storage] url` names (not yet opened), keeping
    compute-log text where `logs` does (default: in the database)."""
    problem = url_problem(url)
    if problem is not None:
        raise ValueError(problem)
    storage: SqlStorage
    if url.startswith("sqlite:///"):
        from control_plane.storage.sqlite import SqliteStorage

        storage = SqliteStorage(url.removeprefix("sqlite:///"))
    elif url.startswith(("postgresql://", "postgres://")):
        from control_plane.storage.postgres import PostgresStorage

        storage = PostgresStorage(url, pool_size)
    else:
        raise ValueError(
            f"unsupported storage url {redact(url)!r}: expected sqlite:///PATH or postgresql://…"
        )
    if logs is not None:
        storage.logs = logs
    return storage
