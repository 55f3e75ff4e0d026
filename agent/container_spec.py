"""What a run's container is made of: its image, limits, mounts, environment and labels,
from the run's tags and agent.toml's `[docker]`. Pure functions, shared by the docker
launcher (agent/containers.py) and the spec of every run worker, whose docker executor
starts its steps' containers alike (agent/worker/executors/docker.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agent.codeversions import LocationVersion
from agent.config import DockerConfig, OutputStoreConfig
from agent.worker.lease import CHANNEL_ENV
from agent.worker.main import OPEN_CHANNEL_ENV
from protocol.messages import LaunchRun
from protocol.tags import CPUS_TAG, IMAGE_TAG, MEMORY_MB_TAG

LABEL_RUN = "fleetrun.run_id"
LABEL_LEASE = "fleetrun.lease"
LABEL_AGENT = "fleetrun.agent"


@dataclass(frozen=True)
class ContainerPlan:
    """The image and limits one run's container runs with."""

    image: str
    cpus: float  # 0: no limit
    memory_mb: int  # 0: no limit
    network: str

    def describe(self) -> str:
        cpus = f"{self.cpus:g} CPUs" if self.cpus else "no CPU limit"
        memory = f"{self.memory_mb} MB memory" if self.memory_mb else "no memory limit"
        return f"image {self.image}, {cpus}, {memory}, network {self.network}"


def container_plan(tags: Mapping[str, str], config: DockerConfig) -> ContainerPlan:
    """The run's tags over the agent's defaults (the tags were checked at submission;
    one that is still unusable here falls back to the default)."""
    cpus, memory_mb = config.cpus, config.memory_mb
    with contextlib.suppress(KeyError, ValueError):
        cpus = float(tags[CPUS_TAG])
    with contextlib.suppress(KeyError, ValueError):
        memory_mb = int(tags[MEMORY_MB_TAG])
    return ContainerPlan(tags.get(IMAGE_TAG) or config.image, cpus, memory_mb, config.network)


def container_name(launch: LaunchRun) -> str:
    return f"fleetrun-{launch.run_id[:36]}-{launch.lease}"


def _bind(host: str, container: str, read_only: bool) -> str:
    return f"{host}:{container}:{'ro' if read_only else 'rw'}"


def container_binds(
    loc: LocationVersion,
    channel_dir: str,
    outputs: OutputStoreConfig,
    config: DockerConfig,
) -> list[str]:
    """What a run's container sees of the host, each at the same path as on the host
    (paths in the run's spec and channel stay valid) except `[docker] mounts`."""
    binds = [_bind(channel_dir, channel_dir, False)]
    code = sorted({loc.working_directory, loc.folder}, key=len)  # the version's copy too
    for i, folder in enumerate(code):
        if all(os.path.relpath(folder, outer).startswith("..") for outer in code[:i]):
            binds.append(_bind(folder, folder, True))
    if outputs.kind == "filesystem":
        binds.append(_bind(outputs.path, outputs.path, False))
    for mount in config.mounts:
        host, container, *mode = mount.split(":")
        binds.append(_bind(host, container, mode == ["ro"]))
    return binds


def container_config(
    plan: ContainerPlan,
    launch: LaunchRun,
    loc: LocationVersion,
    binds: list[str],
    env: Mapping[str, str],
    config: DockerConfig,
    agent_name: str,
) -> dict[str, Any]:
    """The body of Docker's `POST /containers/create` for one run's worker."""
    host_config: dict[str, Any] = {
        "Binds": binds,
        "NetworkMode": plan.network,
        "Init": True,  # the worker is not PID 1: signals and orphans are handled
    }
    if plan.memory_mb:
        host_config["Memory"] = plan.memory_mb * 1024 * 1024
        host_config["MemorySwap"] = plan.memory_mb * 1024 * 1024  # no swap on top
    if plan.cpus:
        host_config["NanoCpus"] = int(plan.cpus * 1e9)
    body: dict[str, Any] = {
        "Image": plan.image,
        "Cmd": [*config.worker_command, "run"],
        "Env": [f"{key}={value}" for key, value in sorted(env.items())],
        "WorkingDir": loc.working_directory,
        "Labels": {
            **config.labels,
            LABEL_RUN: launch.run_id,
            LABEL_LEASE: str(launch.lease),
            LABEL_AGENT: agent_name,
        },
        "StopSignal": "SIGTERM",
        "HostConfig": host_config,
    }
    if config.user:
        body["User"] = config.user
    return body


def container_env(
    marker: Mapping[str, str], channel_dir: str, config: DockerConfig, environ: Mapping[str, str]
) -> dict[str, str]:
    """The worker's environment: the names in `[docker] env` from the agent's own, then
    the run's marker and its channel."""
    passed = {name: environ[name] for name in config.env if name in environ}
    return {
        **passed,
        **marker,
        CHANNEL_ENV: channel_dir,
        OPEN_CHANNEL_ENV: "1",
        "PYTHONUNBUFFERED": "1",
    }


def step_container_settings(
    loc: LocationVersion,
    launch: LaunchRun,
    marker: Mapping[str, str],
    scratch: str,
    outputs: OutputStoreConfig,
    config: DockerConfig,
    agent_name: str,
) -> dict[str, Any]:
    """What the docker executor in a run worker needs to start a step's container:
    the run's own container body (its image, limits, mounts, environment, labels)."""
    channel_dir = os.path.dirname(scratch)
    plan = container_plan(launch.tags, config)
    env = container_env(marker, channel_dir, config, os.environ)
    env.pop(OPEN_CHANNEL_ENV)
    binds = container_binds(loc, channel_dir, outputs, config)
    return {
        "socket": config.socket.removeprefix("unix://"),
        "scratch": scratch,
        "worker_command": config.worker_command,
        "memory_mb": plan.memory_mb,
        "container": container_config(plan, launch, loc, binds, env, config, agent_name),
    }


def oom_message(memory_mb: int) -> str:
    limit = f"its memory limit of {memory_mb} MB" if memory_mb else "the memory it could get"
    return f"was killed for exceeding {limit} (out of memory; the fleetrun/memory_mb tag sets it)"
