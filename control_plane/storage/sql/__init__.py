"""What SQLite and PostgreSQL storage share: every query and every state transition.

The backends (`sqlite.py`, `postgres.py`) supply only connections, transactions and
locks. Queries are written once, with `?` placeholders, in the SQL both databases
speak, one module per aggregate of the storage port; a backend's `Tx` translates what
it must. So the run state machine, fencing, dispatch and ticks behave the same on both,
and one test suite covers both.
"""

from __future__ import annotations

from control_plane.storage.logstore import DatabaseLogStore, LogStore
from control_plane.storage.sql.agents import AgentQueries
from control_plane.storage.sql.alerts import AlertQueries
from control_plane.storage.sql.catalog import CatalogCache
from control_plane.storage.sql.evaluations import EvaluationQueries
from control_plane.storage.sql.events import EventQueries
from control_plane.storage.sql.instigators import InstigatorQueries
from control_plane.storage.sql.leaders import LeaderQueries
from control_plane.storage.sql.pools import PoolQueries
from control_plane.storage.sql.retention import RetentionQueries
from control_plane.storage.sql.runs import RunQueries
from control_plane.storage.sql.steptasks import StepTaskQueries
from control_plane.storage.sql.tokens import TokenQueries


class SqlStorage(
    RunQueries,
    EventQueries,
    AgentQueries,
    InstigatorQueries,
    TokenQueries,
    LeaderQueries,
    EvaluationQueries,
    AlertQueries,
    RetentionQueries,
    PoolQueries,
    StepTaskQueries,
):
    """The storage port over any `Tx`; subclasses open connections and migrate."""

    def __init__(self) -> None:
        self._catalogs = CatalogCache()
        self.logs: LogStore = DatabaseLogStore()
