"""The schema, written once for both databases: a list of migrations, applied in order.

Each migration is written in SQLite's spelling; `for_postgres` turns it into PostgreSQL's
(64-bit integers, identity columns, DOUBLE PRECISION, BYTEA), so the two can never drift
apart. A database records the number of migrations applied to it (`schema_version`).

PostgreSQL databases made before this list was shared recorded their own numbering
(1: everything up to migration 7 here, 2: migration 8); `current_version` reads those
numbers as what they mean. (Such a number only ever appears on a database made then: a
migration here runs in one transaction with the version written at its end.)
"""

from __future__ import annotations

import re

from control_plane.storage.errors import SchemaTooNew

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
    # version 9: every change of a run's status in one history, numbered in commit order
    # (what run status sensors and alerts read from); how often a run was re-queued
    # because its code location could not be loaded; failed evaluations within a tick
    """
    CREATE TABLE run_status_changes (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        status TEXT NOT NULL,
        time REAL NOT NULL
    );
    ALTER TABLE runs ADD COLUMN code_retries INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE ticks ADD COLUMN failure_count INTEGER NOT NULL DEFAULT 0;
    """,
    # version 10: the alerts outbox, one row per rule and occurrence (the unique key is
    # what sends each alert once across replicas and restarts), and where detection
    # resumes (a cursor on the run-status history, one on ticks, when watching began)
    """
    CREATE TABLE alert_deliveries (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        rule TEXT NOT NULL,
        event TEXT NOT NULL,
        dedup_key TEXT NOT NULL,
        payload TEXT NOT NULL,
        status TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL,
        last_error TEXT,
        created_at REAL NOT NULL,
        sent_at REAL,
        UNIQUE (rule, dedup_key)
    );
    CREATE INDEX alert_deliveries_due ON alert_deliveries (status, next_attempt_at);
    CREATE TABLE alert_cursors (
        name TEXT PRIMARY KEY,
        value REAL NOT NULL
    );
    """,
    # version 11: an operator's drain, kept apart from the status so that it outlives the
    # agent's restart (a registration or a return from OFFLINE leaves it DRAINING)
    """
    ALTER TABLE agents ADD COLUMN operator_drain INTEGER NOT NULL DEFAULT 0;
    """,
    # version 12: retention and deletion find what aged out by status and time, and delete
    # a run's status history by run
    """
    CREATE INDEX runs_by_status_end_time ON runs (status, end_time);
    CREATE INDEX run_status_changes_by_run ON run_status_changes (run_id);
    CREATE INDEX step_outputs_by_create_time ON step_outputs (create_time);
    CREATE INDEX ticks_by_status_end_time ON ticks (status, end_time);
    """,
    # version 13: where a compute-log chunk's text
    # lies in its file when [compute_logs] kind = "filesystem"; NULL: in `text`
    """
    ALTER TABLE compute_logs ADD COLUMN file_offset INTEGER;
    ALTER TABLE compute_logs ADD COLUMN file_length INTEGER;
    """,
    # version 14: runs listed by status, newest first, read in id order from an index
    # (runs_by_status orders by priority first: a status filter sorted every run of that
    # status, 80,000 FAILUREs in a million runs, for each page)
    """
    CREATE INDEX runs_by_status_id ON runs (status, id);
    """,
    # version 15: a run's family (its retries and re-executions) read by its root, and a
    # tag filter that pages in run order: each tag row carries its run's numeric id, so
    # (key, value, run_pk) walks the runs with that tag newest first and stops at a page,
    # however rare or common the tag (an EXISTS per run walked every run for a rare tag)
    """
    CREATE INDEX runs_by_root ON runs (root_run_id, id);
    ALTER TABLE run_tags ADD COLUMN run_pk INTEGER;
    UPDATE run_tags SET run_pk = (SELECT id FROM runs WHERE runs.run_id = run_tags.run_id);
    CREATE INDEX run_tags_by_key_value_run ON run_tags (key, value, run_pk);
    """,
    # version 16: concurrency pools (issue 24): the limits set through the API, every
    # live slot claim (waiting or granted) under its run's lease, and what agents offer
    # to placement (labels, resources)
    """
    CREATE TABLE pool_limits (
        name TEXT PRIMARY KEY,
        slot_limit INTEGER NOT NULL,
        update_time REAL NOT NULL
    );
    CREATE TABLE pool_slots (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        pool TEXT NOT NULL,
        run_id TEXT NOT NULL,
        lease INTEGER NOT NULL,
        step TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        create_time REAL NOT NULL,
        granted_time REAL,
        noted INTEGER NOT NULL DEFAULT 0,
        UNIQUE (run_id, step, attempt, pool)
    );
    CREATE INDEX pool_slots_by_pool ON pool_slots (pool, granted_time);
    ALTER TABLE agents ADD COLUMN labels TEXT NOT NULL DEFAULT '{}';
    ALTER TABLE agents ADD COLUMN resources TEXT NOT NULL DEFAULT '{}';
    """,
    # version 17 (code versions): the version of its code location a run ran with (from
    # its RUN_START), the version a re-execution asks for (its parent's), and a reload
    # an operator asked of an agent (JSON list of locations, [] = all; taken by a poll)
    """
    ALTER TABLE runs ADD COLUMN code_version TEXT;
    ALTER TABLE runs ADD COLUMN wanted_code_version TEXT;
    ALTER TABLE agents ADD COLUMN reload_request TEXT;
    """,
    # version 18 (the fleet executor): step tasks, one step attempt of a run placed on
    # any agent under a lease of its own (a run_attempts row, fenced with the run's)
    """
    CREATE TABLE step_tasks (
        task_id INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id TEXT NOT NULL,
        run_lease INTEGER NOT NULL,
        step TEXT NOT NULL,
        attempt INTEGER NOT NULL,
        queue TEXT NOT NULL,
        tags TEXT NOT NULL,
        inputs TEXT NOT NULL,
        status TEXT NOT NULL,
        create_time REAL NOT NULL,
        agent_id TEXT,
        lease INTEGER,
        start_time REAL,
        end_time REAL,
        outcome TEXT,
        UNIQUE (run_id, run_lease, step, attempt)
    );
    CREATE INDEX step_tasks_by_status ON step_tasks (status, task_id);
    CREATE INDEX step_tasks_by_lease ON step_tasks (lease);
    CREATE INDEX step_tasks_by_run ON step_tasks (run_id, task_id);
    """,
]


# What PostgreSQL's schema_version meant before the migrations were shared.
_EARLIER_POSTGRES_VERSIONS = {1: 7, 2: 8}

_POSTGRES_SPELLING = [
    (
        re.compile(r"\bINTEGER PRIMARY KEY AUTOINCREMENT\b"),
        "BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY",
    ),
    (re.compile(r"\bINTEGER\b"), "BIGINT"),
    (re.compile(r"\bREAL\b"), "DOUBLE PRECISION"),
    (re.compile(r"\bBLOB\b"), "BYTEA"),
]


def for_postgres(sql: str) -> str:
    """A migration in PostgreSQL's spelling."""
    for pattern, replacement in _POSTGRES_SPELLING:
        sql = pattern.sub(replacement, sql)
    return sql


def statements(migration: str) -> list[str]:
    """The statements of one migration, one by one (SQLite executes them singly)."""
    return [s.strip() for s in migration.split(";") if s.strip()]


def current_version(recorded: int | None, postgres: bool) -> int:
    """The number of migrations a database has, from what its schema_version says."""
    if recorded is None:
        return 0
    if postgres and recorded in _EARLIER_POSTGRES_VERSIONS:
        return _EARLIER_POSTGRES_VERSIONS[recorded]
    return recorded


def check_not_newer(found: int, where: str) -> None:
    """Refuse a database migrated past the migrations this fleetrun knows (SchemaTooNew):
    an older fleetrun would not write what the newer schema's readers expect."""
    if found > len(MIGRATIONS):
        raise SchemaTooNew(where, found, len(MIGRATIONS))
