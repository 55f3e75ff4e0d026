"""What storage reports to its callers: each is a refusal with a reason, never a bug."""

from __future__ import annotations

from control_plane.errors import ControlPlaneError


class StorageError(ControlPlaneError):
    """Base class of the errors storage reports to its callers."""


class UnknownRun(StorageError):
    pass


class StaleLease(StorageError):
    """A write came with a lease that is no longer the run's current one."""


class NotYourRun(StorageError):
    """A write came from an agent the run is not leased to."""


class RecordRefused(StorageError):
    """An agent's record or output that the run may not take (control_plane/model/records.py)."""


class NameTaken(StorageError):
    """A token name, or an agent name held by another live agent token, is in use."""


class StorageUnavailable(StorageError):
    """The database cannot be reached (a PostgreSQL server down or restarting). Callers
    answer 503 (retryable), as for a full disk."""


class StorageFull(StorageError):
    """The database's disk is full: the write was rolled back, nothing changed. Callers
    answer 503 (retryable) and carry on; writes work again once space is freed."""


class SchemaTooNew(StorageError):
    """The database was migrated by a newer fleetrun: this one would misread it. Callers
    exit 2 (a restart cannot fix it), naming both versions."""

    def __init__(self, where: str, found: int, known: int) -> None:
        super().__init__(
            f"{where} has schema version {found}, newer than this fleetrun knows ({known}): "
            "run the fleetrun version that migrated it, or restore the backup taken before "
            "the upgrade (docs/install.md, rolling back)"
        )
        self.found = found
        self.known = known


class AgentNameTaken(NameTaken):
    """An agent name held by another live agent token."""


class RunActive(StorageError):
    """A run that has not ended may not be deleted (cancel it first)."""


class RunHasLiveChildren(StorageError):
    """A run whose retry or re-execution has not ended may not be deleted: the live run
    still reads its parent (reused outputs, the retry's lineage)."""
