"""`control-plane.toml`: the instance's configuration (every key optional, see DESIGN.md)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from typing import Any
from urllib.parse import urlsplit

from control_plane.model.alerts import ALERT_EVENTS
from control_plane.model.pools import GRANULARITIES, PoolLimits
from control_plane.model.runs import ResumeRules
from control_plane.model.submission import RunRules
from control_plane.storage import url_problem
from control_plane.storage.logstore import LogStore, log_store_for
from protocol.codec import DecodeLimits
from protocol.logs import redact
from protocol.schema import ConfigError, FieldError, load_toml
from protocol.tags import TagLimits
from protocol.validation import name_problem

MAX_POOL_LIMIT = 1_000_000


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8470
    poll_timeout_seconds: float = 25.0
    tls_cert: str = ""  # PEM certificate chain; with tls_key, the server speaks only HTTPS
    tls_key: str = ""
    public_url: str = ""  # where people reach this control plane (links in alerts)

    def problems(self) -> Iterator[FieldError]:
        if self.public_url and (problem := http_url_problem(self.public_url)):
            yield FieldError("public_url", problem)
        if not 0 <= self.port <= 65535:
            yield FieldError("port", "must be between 0 and 65535 (0: any free port)")
        if not 0 < self.poll_timeout_seconds <= 300:
            yield FieldError("poll_timeout_seconds", "must be in (0, 300]")
        if bool(self.tls_cert) != bool(self.tls_key):
            yield FieldError("tls_cert", "give both tls_cert and tls_key, or neither")

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert)

    def base_url(self) -> str:
        """Where people reach this control plane: `public_url`, else host and port."""
        if self.public_url:
            return self.public_url.rstrip("/")
        return f"{'https' if self.tls else 'http'}://{self.host}:{self.port}"


def http_url_problem(url: str) -> str | None:
    """Why `url` is not an absolute http(s) URL, or None."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # a port out of range raises here
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


@dataclass(frozen=True)
class LimitsConfig:
    """Bounds on everything a client sends; each refusal names the limit it hit."""

    max_body_bytes: int = 8 * 1024 * 1024
    max_msgpack_str_bytes: int = 1024 * 1024
    max_msgpack_bin_bytes: int = 1024 * 1024
    max_msgpack_array_length: int = 100_000
    max_msgpack_map_length: int = 10_000
    max_msgpack_depth: int = 32
    max_events_per_batch: int = 5_000
    max_tags_per_run: int = 64
    max_tag_key_length: int = 128
    max_tag_value_length: int = 4096
    max_run_config_bytes: int = 1024 * 1024
    max_polls_per_agent: int = 2
    keepalive_timeout_seconds: float = 15.0
    body_timeout_seconds: float = 60.0

    def decode_limits(self) -> DecodeLimits:
        """What an agent's message may be, as the codec checks it."""
        return DecodeLimits(
            max_body_bytes=self.max_body_bytes,
            max_str_len=self.max_msgpack_str_bytes,
            max_bin_len=self.max_msgpack_bin_bytes,
            max_array_len=self.max_msgpack_array_length,
            max_map_len=self.max_msgpack_map_length,
            max_depth=self.max_msgpack_depth,
        )

    def problems(self) -> Iterator[FieldError]:
        for name, value in vars(self).items():
            if value <= 0:
                yield FieldError(name, "must be > 0")
        if 0 < self.max_events_per_batch < 500:
            yield FieldError("max_events_per_batch", "must be >= 500 (an agent's batch size)")
        if 0 < self.max_msgpack_depth < 8:
            yield FieldError("max_msgpack_depth", "must be >= 8 (the protocol's own nesting)")


@dataclass(frozen=True)
class StorageConfig:
    url: str = "sqlite:///fleetrun.db"
    pool_size: int = 10  # PostgreSQL: connections per replica

    def problems(self) -> Iterator[FieldError]:
        problem = url_problem(self.url)
        if problem is not None:
            yield FieldError("url", problem)
        elif not self.url.startswith(("sqlite:///", "postgresql://", "postgres://")):
            yield FieldError(
                "url",
                f"unsupported storage url {redact(self.url)!r}: use "
                "sqlite:///PATH or postgresql://USER@HOST:PORT/DB",
            )
        if not 1 <= self.pool_size <= 1000:
            yield FieldError("pool_size", "must be between 1 and 1000")


@dataclass(frozen=True)
class ComputeLogsConfig:
    """Where compute-log text lives (control_plane/storage/logstore.py): in the database,
    or in files under `path` (relative to the config file). With "database", a `path`
    keeps the chunks an earlier "filesystem" instance wrote readable."""

    kind: str = "database"
    path: str = ""

    def problems(self) -> Iterator[FieldError]:
        if self.kind not in ("database", "filesystem"):
            yield FieldError("kind", f"must be 'database' or 'filesystem', not {self.kind!r}")
        elif self.kind == "filesystem" and not self.path.strip():
            yield FieldError("path", 'required with kind = "filesystem": the folder for the logs')
        if "\0" in self.path:
            yield FieldError("path", "must not contain a NUL character")

    def store(self) -> LogStore:
        return log_store_for(self.kind, self.path)


@dataclass(frozen=True)
class DaemonConfig:
    """The daemon loops; with several replicas, each loop runs on one at a time."""

    leader_lease_seconds: float = 6.0  # a dead leader's loops move within this long
    # A schedule or sensor whose evaluation fails is evaluated again within the same tick
    # this many times before the tick is FAILURE (each failure counts in failure_count).
    max_tick_retries: int = 0

    def problems(self) -> Iterator[FieldError]:
        if not 1.0 <= self.leader_lease_seconds <= 300:
            yield FieldError("leader_lease_seconds", "must be between 1 and 300")
        if not 0 <= self.max_tick_retries <= 10:
            yield FieldError("max_tick_retries", "must be between 0 and 10")


@dataclass(frozen=True)
class TagConcurrencyLimit:
    key: str
    limit: int
    value: str | None = None
    per_unique_value: bool = False

    def problems(self) -> Iterator[FieldError]:
        if self.limit < 0:
            yield FieldError("limit", "must be >= 0")
        if self.value is not None and self.per_unique_value:
            yield FieldError("per_unique_value", "cannot be combined with value")


@dataclass(frozen=True)
class RunCoordinatorConfig:
    kind: str = "queued"
    max_concurrent_runs: int = 10
    tag_concurrency_limits: list[TagConcurrencyLimit] = field(default_factory=list)
    # A run whose code location cannot be loaded waits and is launched again, this many
    # times, before it fails (Dagster's max_user_code_failure_retries); 0: it fails.
    max_user_code_failure_retries: int = 0
    user_code_failure_retry_delay_seconds: float = 60.0

    def problems(self) -> Iterator[FieldError]:
        if self.kind not in ("queued", "default"):
            yield FieldError("kind", f"must be 'queued' or 'default', not {self.kind!r}")
        if self.max_concurrent_runs < -1:
            yield FieldError("max_concurrent_runs", "must be >= 0, or -1 for no limit")
        if not 0 <= self.max_user_code_failure_retries <= 1000:
            yield FieldError("max_user_code_failure_retries", "must be between 0 and 1000")
        if not 0 <= self.user_code_failure_retry_delay_seconds <= 86400:
            yield FieldError("user_code_failure_retry_delay_seconds", "must be between 0 and 86400")


@dataclass(frozen=True)
class PoolConfig:
    """One `[[concurrency.pools]]` table: a pool's limit (`fleetrun pools set` wins)."""

    name: str
    limit: int

    def problems(self) -> Iterator[FieldError]:
        if problem := name_problem(self.name):
            yield FieldError("name", problem)
        if not 0 <= self.limit <= MAX_POOL_LIMIT:
            yield FieldError("limit", f"must be between 0 and {MAX_POOL_LIMIT} (0: paused)")


@dataclass(frozen=True)
class ConcurrencyConfig:
    """`[concurrency]`: pools of ops across runs (control_plane/model/pools.py)."""

    default_pool_limit: int = 0  # a pool nobody configured; 0: unlimited
    granularity: str = "op"  # "op": each step holds a slot; "run": the run holds one per pool
    pools: list[PoolConfig] = field(default_factory=list)

    def problems(self) -> Iterator[FieldError]:
        if not 0 <= self.default_pool_limit <= MAX_POOL_LIMIT:
            yield FieldError("default_pool_limit", f"must be between 0 and {MAX_POOL_LIMIT}")
        if self.granularity not in GRANULARITIES:
            yield FieldError("granularity", f"must be 'op' or 'run', not {self.granularity!r}")
        seen: set[str] = set()
        for index, pool in enumerate(self.pools):
            if pool.name in seen:
                yield FieldError(f"pools[{index}].name", f"pool {pool.name!r} is listed twice")
            seen.add(pool.name)

    def limits(self, set_limits: dict[str, int] | None = None) -> PoolLimits:
        """These limits under the ones set through the API."""
        configured = {pool.name: pool.limit for pool in self.pools}
        return PoolLimits(dict(set_limits or {}), configured, self.default_pool_limit)


@dataclass(frozen=True)
class RunMonitoringConfig:
    enabled: bool = True
    agent_heartbeat_timeout_seconds: float = 30.0
    start_timeout_seconds: float = 180.0
    cancel_timeout_seconds: float = 180.0
    max_runtime_seconds: float = 0.0
    max_resume_run_attempts: int = 0
    terminate_grace_seconds: float = 10.0
    launch_ack_timeout_seconds: float = 5.0

    def problems(self) -> Iterator[FieldError]:
        for name in (
            "agent_heartbeat_timeout_seconds",
            "start_timeout_seconds",
            "cancel_timeout_seconds",
            "terminate_grace_seconds",
            "launch_ack_timeout_seconds",
        ):
            if getattr(self, name) <= 0:
                yield FieldError(name, "must be > 0")
        if self.max_runtime_seconds < 0:
            yield FieldError("max_runtime_seconds", "must be >= 0 (0: no limit)")
        if self.max_resume_run_attempts < 0:
            yield FieldError("max_resume_run_attempts", "must be >= 0")


@dataclass(frozen=True)
class RunRetriesConfig:
    enabled: bool = True
    max_retries: int = 0
    retry_on_op_failure: bool = True
    delay_seconds: float = 0.0
    backoff: str = "none"

    def problems(self) -> Iterator[FieldError]:
        if self.max_retries < 0:
            yield FieldError("max_retries", "must be >= 0")
        if self.delay_seconds < 0:
            yield FieldError("delay_seconds", "must be >= 0")
        if self.backoff not in ("none", "linear", "exponential"):
            yield FieldError(
                "backoff", f"must be 'none', 'linear' or 'exponential', not {self.backoff!r}"
            )


@dataclass(frozen=True)
class AlertRule:
    """One `[[alerts]]` table: which events go to which webhook (docs/alerts.md). `jobs`
    and `tags` narrow the run events only; the others concern the whole instance."""

    name: str
    on: list[str]
    webhook_url: str
    jobs: list[str] = field(default_factory=list)  # empty: every job
    tags: dict[str, str] = field(default_factory=dict)  # a run must carry each of these
    queued_seconds: float = 600.0  # run_queued_too_long: queued longer than this

    def problems(self) -> Iterator[FieldError]:
        if not 1 <= len(self.name) <= 128 or not self.name.isprintable():
            yield FieldError("name", "must be 1 to 128 printable characters")
        if not self.on:
            yield FieldError("on", f"list at least one event: {', '.join(ALERT_EVENTS)}")
        for event in self.on:
            if event not in ALERT_EVENTS:
                yield FieldError(
                    "on", f"unknown event {event!r}: use one of {', '.join(ALERT_EVENTS)}"
                )
        if problem := http_url_problem(self.webhook_url):
            yield FieldError("webhook_url", problem)
        if not 0 < self.queued_seconds <= 30 * 86400:
            yield FieldError("queued_seconds", "must be in (0, 2592000]")

    def matches_run(self, job: str, tags: dict[str, str]) -> bool:
        """Whether a run event of this job and tags concerns this rule."""
        if self.jobs and job not in self.jobs:
            return False
        return all(tags.get(key) == value for key, value in self.tags.items())


@dataclass(frozen=True)
class RetentionConfig:
    """How long data is kept, in days; 0 keeps it forever (docs/operations.md). Runs by
    status (from their end); compute logs and stored outputs of the runs that are kept,
    which are the bulk of the bytes; schedule and sensor ticks by status."""

    success_days: float = 0
    failure_days: float = 0
    canceled_days: float = 0
    compute_logs_days: float = 0
    outputs_days: float = 0
    ticks_success_days: float = 0
    ticks_skipped_days: float = 0
    ticks_failure_days: float = 0

    def problems(self) -> Iterator[FieldError]:
        for name, value in vars(self).items():
            if value < 0:
                yield FieldError(name, "must be >= 0 (0: keep forever)")
        # A longer limit than a run's own would never apply: refused once every status
        # ages out. While one status is kept forever, it applies to those runs: allowed.
        runs = (self.success_days, self.failure_days, self.canceled_days)
        if all(days > 0 for days in runs):
            shortest = min(runs)
            for name in ("compute_logs_days", "outputs_days"):
                if getattr(self, name) > shortest:
                    yield FieldError(
                        name,
                        f"must not be longer than the shortest run retention ({shortest:g}"
                        " days): every run is deleted with its logs and outputs by then",
                    )


@dataclass(frozen=True)
class AuthConfig:
    enabled: bool = False


@dataclass(frozen=True)
class ControlPlaneConfig:
    server: ServerConfig = field(default_factory=ServerConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    run_coordinator: RunCoordinatorConfig = field(default_factory=RunCoordinatorConfig)
    run_monitoring: RunMonitoringConfig = field(default_factory=RunMonitoringConfig)
    run_retries: RunRetriesConfig = field(default_factory=RunRetriesConfig)
    auth: AuthConfig = field(default_factory=AuthConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    compute_logs: ComputeLogsConfig = field(default_factory=ComputeLogsConfig)
    alerts: list[AlertRule] = field(default_factory=list)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    concurrency: ConcurrencyConfig = field(default_factory=ConcurrencyConfig)

    def problems(self) -> Iterator[FieldError]:
        seen: set[str] = set()
        for index, rule in enumerate(self.alerts):
            if rule.name in seen:
                yield FieldError(f"alerts[{index}].name", f"another alert is called {rule.name!r}")
            seen.add(rule.name)

    def updated(self, **sections: dict[str, Any]) -> ControlPlaneConfig:
        """A copy with fields of some sections changed: `updated(auth={"enabled": True})`."""
        changed = {name: replace(getattr(self, name), **kw) for name, kw in sections.items()}
        return replace(self, **changed)

    def resume_rules(self) -> ResumeRules:
        """When a failed attempt puts its run back in the queue (model/runs.py)."""
        return ResumeRules(
            self.run_monitoring.max_resume_run_attempts,
            self.run_coordinator.max_user_code_failure_retries,
            self.run_coordinator.user_code_failure_retry_delay_seconds,
        )

    def run_rules(self) -> RunRules:
        """What every new run is held to (model/submission.py), from `[limits]`."""
        limits = self.limits
        tags = TagLimits(
            limits.max_tags_per_run, limits.max_tag_key_length, limits.max_tag_value_length
        )
        return RunRules(tags, limits.max_run_config_bytes)


def resolve_storage_url(url: str, base_dir: str) -> str:
    """`sqlite:///rel` is relative to the config file's folder; `sqlite:////abs` is absolute."""
    if url.startswith("sqlite:///"):
        path = url.removeprefix("sqlite:///")
        if path != ":memory:" and not os.path.isabs(path):
            path = os.path.join(base_dir, path)
        return "sqlite:///" + path
    return url


def load_control_plane_config(path: str | None) -> ControlPlaneConfig:
    """Load the config file (all defaults when `path` is None)."""
    if path is None:
        config = ControlPlaneConfig()
        base_dir = os.getcwd()
    else:
        config = load_toml(path, ControlPlaneConfig)
        base_dir = os.path.dirname(os.path.abspath(path))
    server = config.server
    tls_cert = os.path.join(base_dir, server.tls_cert) if server.tls_cert else ""
    tls_key = os.path.join(base_dir, server.tls_key) if server.tls_key else ""
    logs = config.compute_logs
    return replace(
        config,
        storage=replace(config.storage, url=resolve_storage_url(config.storage.url, base_dir)),
        server=replace(server, tls_cert=tls_cert, tls_key=tls_key),
        compute_logs=replace(logs, path=os.path.join(base_dir, logs.path) if logs.path else ""),
    )
    return config


__all__ = ["ConfigError", "ControlPlaneConfig", "load_control_plane_config"]
