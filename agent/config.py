"""`agent.toml`: what one agent serves and where its control plane is (see DESIGN.md)."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from urllib.parse import urlsplit

from protocol.schema import ConfigError, FieldError, load_toml
from protocol.tags import MAX_RESOURCE, image_problem
from protocol.validation import agent_name_problem, placement_problem

NAME_CHARS = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_")


@dataclass(frozen=True)
class CodeLocationConfig:
    """One `[[code_locations]]` table: local files (python_file or module, in
    working_directory), or a git repository the agent clones (`git`, `ref`,
    `subdirectory`; python_file and working_directory are then inside the checkout)."""

    name: str
    python_file: str | None = None
    module: str | None = None
    working_directory: str = "."
    executable: str = ""
    git: str = ""  # a repository URL (or path): the agent fetches the code itself
    ref: str = ""  # branch, tag or commit; "": the remote's default branch
    subdirectory: str = ""  # of the repository, where the location's files are
    credentials_file: str = ""  # git credential-store lines: https://user:token@host
    update_interval_seconds: float = 60.0  # git: look for a new commit this often; 0: never
    watch: bool = True  # local files: reload when they change
    include: list[str] = field(default_factory=lambda: ["*.py"])  # files that are code
    keep_versions: int = 3  # old versions kept besides the current one and those in use

    def problems(self) -> Iterator[FieldError]:
        if not self.name or not set(self.name) <= NAME_CHARS or len(self.name) > 128:
            yield FieldError("name", "must match ^[A-Za-z0-9_]{1,128}$")
        if (self.python_file is None) == (self.module is None):
            yield FieldError("python_file", "give exactly one of python_file or module")
        if not self.git:
            for key in ("ref", "subdirectory", "credentials_file"):
                if getattr(self, key):
                    yield FieldError(key, "is only used with git")
        elif self.git.startswith("-"):
            yield FieldError("git", "must be a repository URL or path")
        else:
            for key in ("python_file", "working_directory"):
                value = getattr(self, key)
                if value is not None and (value.startswith("/") or ".." in value.split("/")):
                    yield FieldError(key, "of a git location is a path inside its checkout")
        if self.ref.startswith("-") or any(c.isspace() for c in self.ref):
            yield FieldError("ref", "must be a branch, tag or commit name")
        if self.subdirectory.startswith("/") or ".." in self.subdirectory.split("/"):
            yield FieldError("subdirectory", "must be a relative path inside the repository")
        if self.update_interval_seconds < 0:
            yield FieldError("update_interval_seconds", "must be >= 0")
        if not 0 <= self.keep_versions <= 100:
            yield FieldError("keep_versions", "must be between 0 and 100")
        if not self.include or not all(isinstance(p, str) and p for p in self.include):
            yield FieldError("include", "must list at least one file name pattern")


MAX_OUTPUT_BYTES = 64 * 1024 * 1024


@dataclass(frozen=True)
class OutputStoreConfig:
    """Where step outputs are kept for re-execution (see agent/worker/outputs.py)."""

    kind: str = "control_plane"
    path: str = ""
    max_output_bytes: int = 16 * 1024 * 1024

    def problems(self) -> Iterator[FieldError]:
        if self.kind not in ("control_plane", "filesystem"):
            yield FieldError("kind", f"must be 'control_plane' or 'filesystem', not {self.kind!r}")
        if self.kind == "filesystem" and not self.path:
            yield FieldError("path", "the filesystem output store needs a path")
        if not 1 <= self.max_output_bytes <= MAX_OUTPUT_BYTES:
            yield FieldError(
                "max_output_bytes",
                f"must be between 1 and {MAX_OUTPUT_BYTES} (what the control plane accepts)",
            )


RUN_LAUNCHERS = ("forkserver", "subprocess", "docker")


@dataclass(frozen=True)
class DockerConfig:
    """`[docker]`: how the `docker` run launcher runs each run worker in a container.

    `image`, `cpus` and `memory_mb` are defaults that a run's `fleetrun/image`,
    `fleetrun/cpus` and `fleetrun/memory_mb` tags override (0: no limit)."""

    image: str = "fleetrun-worker:latest"
    network: str = "host"  # "host" | "none": never a bridge
    mounts: list[str] = field(default_factory=list)  # "host_path:container_path[:ro]"
    env: list[str] = field(default_factory=list)  # agent environment variables passed in
    cpus: float = 0.0
    memory_mb: int = 0
    user: str = ""  # "uid[:gid]" inside the container; default: the image's user
    labels: dict[str, str] = field(default_factory=dict)  # added to every container
    socket: str = "unix:///var/run/docker.sock"
    stop_grace_seconds: float = 10.0  # between SIGTERM and SIGKILL when a run is stopped
    pull: str = "missing"  # "missing": pull an image this host lacks; "never"
    # What runs the worker inside the image ("run" is appended).
    worker_command: list[str] = field(default_factory=lambda: ["python3", "-m", "agent.worker"])

    def problems(self) -> Iterator[FieldError]:
        if (problem := image_problem(self.image)) is not None:
            yield FieldError("image", problem)
        if self.network not in ("host", "none"):
            yield FieldError("network", f"must be 'host' or 'none', not {self.network!r}")
        for mount in self.mounts:
            if (problem := mount_problem(mount)) is not None:
                yield FieldError("mounts", f"{mount!r}: {problem}")
        for name in self.env:
            if not name or "=" in name or "\0" in name:
                yield FieldError("env", f"{name!r} must be the name of an environment variable")
        if not math.isfinite(self.cpus) or not 0 <= self.cpus <= 1024:
            yield FieldError("cpus", "must be between 0 (no limit) and 1024")
        if self.memory_mb != 0 and not 6 <= self.memory_mb <= 16 * 1024 * 1024:
            yield FieldError("memory_mb", "must be 0 (no limit) or at least 6")
        if self.user and not re.fullmatch(r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?", self.user):
            yield FieldError("user", "must be 'user' or 'uid[:gid]'")
        if not self.socket.startswith("unix:///"):
            yield FieldError("socket", "must be a unix:///path address of the Docker socket")
        if not 0 <= self.stop_grace_seconds <= 3600:
            yield FieldError("stop_grace_seconds", "must be between 0 and 3600")
        if self.pull not in ("missing", "never"):
            yield FieldError("pull", f"must be 'missing' or 'never', not {self.pull!r}")
        if not self.worker_command or not all(self.worker_command):
            yield FieldError("worker_command", "must be a non-empty list of arguments")


def mount_problem(mount: str) -> str | None:
    """What is wrong with a `host_path:container_path[:ro]` mount; None if nothing."""
    parts = mount.split(":")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("ro", "rw")):
        return "must be host_path:container_path[:ro]"
    if not parts[0]:
        return "needs a host path (absolute, or relative to agent.toml)"
    if not os.path.isabs(parts[1]):
        return "the container path must be absolute"
    return None


@dataclass(frozen=True)
class ResourcesConfig:
    """`[resources]`: what this agent offers to runs that ask for resources
    (`fleetrun/cpus`, `fleetrun/memory_mb`, `fleetrun/gpus`); 0: not offered. A run holds
    what it asked for on its agent from its launch to its end."""

    cpus: int = 0
    memory_mb: int = 0
    gpus: int = 0

    def problems(self) -> Iterator[FieldError]:
        for name, amount in self.offered(every=True).items():
            if not 0 <= amount <= MAX_RESOURCE:
                yield FieldError(name, f"must be between 0 and {MAX_RESOURCE} (0: not offered)")

    def offered(self, every: bool = False) -> dict[str, int]:
        amounts = {"cpus": self.cpus, "memory_mb": self.memory_mb, "gpus": self.gpus}
        return {k: v for k, v in amounts.items() if every or v > 0}


@dataclass(frozen=True)
class AgentConfig:
    control_plane_url: str = "http://127.0.0.1:8470"
    name: str = ""
    token_file: str = ""
    ca_file: str = ""  # PEM CA bundle for an https control plane (default: the system's)
    allow_insecure_http: bool = False  # send the token over http to a non-loopback host
    code_root: str = ""  # if set, every code location must lie inside this folder
    queues: list[str] = field(default_factory=lambda: ["default"])
    max_concurrent_runs: int = 4
    heartbeat_interval_seconds: float = 5.0
    # A run worker stops itself this long before the control plane may give its run to
    # another attempt (its lease deadline, counted from the last heartbeat it stored).
    lease_margin_seconds: float = 2.0
    code_locations: list[CodeLocationConfig] = field(default_factory=list)
    output_store: OutputStoreConfig = field(default_factory=OutputStoreConfig)
    # "subprocess": a fresh interpreter per run; "docker": a container per run ([docker])
    run_launcher: str = "forkserver"
    docker: DockerConfig = field(default_factory=DockerConfig)
    process_tracking: str = "auto"  # "cgroup", "sweep", or "auto": cgroup where possible
    drain_timeout_seconds: float = 60.0  # on SIGTERM: how long running runs may finish
    state_dir: str = ""  # the spool's folder; default: fleetrun-state/NAME beside this file
    spool_max_bytes: int = 256 * 1024 * 1024  # past it, compute-log text is dropped first
    spool_max_age_seconds: float = 7 * 86400  # older compute-log text is dropped too
    labels: dict[str, str] = field(default_factory=dict)  # what `fleetrun/requires` matches
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)

    def problems(self) -> Iterator[FieldError]:
        if self.run_launcher not in RUN_LAUNCHERS:
            yield FieldError(
                "run_launcher",
                f"must be 'forkserver', 'subprocess' or 'docker', not {self.run_launcher!r}",
            )
        if self.process_tracking not in ("auto", "cgroup", "sweep"):
            yield FieldError(
                "process_tracking",
                f"must be 'auto', 'cgroup' or 'sweep', not {self.process_tracking!r}",
            )
        if not self.control_plane_url.startswith(("http://", "https://")):
            yield FieldError("control_plane_url", "must start with http:// or https://")
        if self.ca_file and not self.control_plane_url.startswith("https://"):
            yield FieldError(
                "ca_file",
                "is only used with an https:// control_plane_url: if the control plane "
                "speaks TLS, make it https://; if not, remove ca_file",
            )
        if self.token_file and not self.allow_insecure_http and _insecure(self.control_plane_url):
            yield FieldError(
                "control_plane_url",
                "would send the agent token in clear text to a host that is not loopback: "
                "use https://, or set allow_insecure_http = true",
            )
        if self.drain_timeout_seconds < 0:
            yield FieldError("drain_timeout_seconds", "must be >= 0")
        if self.spool_max_bytes < 1024 * 1024:
            yield FieldError("spool_max_bytes", "must be at least 1 MiB")
        if self.spool_max_age_seconds < 60:
            yield FieldError("spool_max_age_seconds", "must be at least 60")
        if self.max_concurrent_runs < 1:
            yield FieldError("max_concurrent_runs", "must be >= 1")
        if not 0 < self.heartbeat_interval_seconds <= 300:
            yield FieldError("heartbeat_interval_seconds", "must be in (0, 300]")
        if not 0 <= self.lease_margin_seconds <= 60:
            yield FieldError("lease_margin_seconds", "must be between 0 and 60")
        if agent_name_problem(self.name) and self.name:
            yield FieldError("name", agent_name_problem(self.name) or "")
        if not self.queues:
            yield FieldError("queues", "must name at least one queue")
        if (problem := placement_problem(self.labels, {})) is not None:
            yield FieldError("labels", problem)
        names = [loc.name for loc in self.code_locations]
        for name in sorted({name for name in names if names.count(name) > 1}):
            yield FieldError("code_locations", f"location name {name!r} is used twice")


def _insecure(url: str) -> bool:
    """Plain http to anything but this machine."""
    if not url.startswith("http://"):
        return False
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return False
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return True


def _outside_code_root(config: AgentConfig) -> Iterator[str]:
    """With `code_root`, a location's folder and file must resolve (symlinks followed)
    inside it, so a config cannot point workers at code elsewhere on the host. (A git
    location's files are inside the agent's own checkout.)"""
    root = Path(config.code_root).resolve()
    for i, loc in enumerate(config.code_locations):
        if loc.git:
            continue
        for key in ("working_directory", "python_file"):
            value = getattr(loc, key)
            if value is not None and not Path(value).resolve().is_relative_to(root):
                yield f"key 'code_locations[{i}].{key}': {value} is outside code_root {root}"


def _resolved_location(loc: CodeLocationConfig, base_dir: str) -> CodeLocationConfig:
    """A location with its folder and file as absolute paths (relative to `base_dir`);
    a git location's stay relative to its checkout, and a local-path repository and
    credentials file are resolved against `base_dir` too."""
    if loc.git:
        git = loc.git
        if "://" not in git and ":" not in git.split("/")[0]:  # a path, not user@host:repo
            git = os.path.normpath(os.path.join(base_dir, git))
        credentials = os.path.join(base_dir, loc.credentials_file) if loc.credentials_file else ""
        return replace(loc, git=git, credentials_file=credentials)
    folder = os.path.normpath(os.path.join(base_dir, loc.working_directory))
    python_file = None if loc.python_file is None else os.path.join(folder, loc.python_file)
    return replace(loc, working_directory=folder, python_file=python_file)


def load_agent_config(path: str) -> AgentConfig:
    """Load agent.toml; relative paths are resolved against the file's folder."""
    config = load_toml(path, AgentConfig)
    base_dir = os.path.dirname(os.path.abspath(path))
    name = config.name or socket.gethostname()
    locations = [_resolved_location(loc, base_dir) for loc in config.code_locations]
    output_store = config.output_store
    if output_store.path:
        output_store = replace(output_store, path=os.path.join(base_dir, output_store.path))

    def resolve(value: str) -> str:
        return os.path.join(base_dir, value) if value else value

    docker = config.docker
    if docker.mounts:
        mounts = [resolve(m) for m in docker.mounts]  # its host path, if relative
        docker = replace(docker, mounts=mounts)

    config = replace(
        config,
        name=name,
        code_locations=locations,
        output_store=output_store,
        docker=docker,
        token_file=resolve(config.token_file),
        ca_file=resolve(config.ca_file),
        code_root=resolve(config.code_root),
        state_dir=resolve(config.state_dir or os.path.join("fleetrun-state", name)),
    )
    outside = list(_outside_code_root(config)) if config.code_root else []
    if outside:
        raise ConfigError(*(f"{path}: {problem}" for problem in outside))
    return config


__all__ = ["AgentConfig", "CodeLocationConfig", "ConfigError", "load_agent_config"]
