"""The `docker` run launcher: each run worker in a container of its own.

The agent talks to the Docker Engine through its HTTP API on the Unix socket
(`[docker] socket`, with aiodocker); it never runs the `docker` command. A run's
container gets:

- the run's image (`fleetrun/image` tag, else `[docker] image`) and limits
  (`fleetrun/cpus`, `fleetrun/memory_mb`, else `[docker] cpus`, `memory_mb`; memory
  without swap, so that a run over its limit is OOM-killed and reported as such);
- bind mounts, at the same paths as on the host: the run's channel folder (records,
  output, bell, lease deadline, scratch outputs: agent/channel.py), the code location
  (read-only), the filesystem output store, and `[docker] mounts`;
- the network `host` or `none` (never a bridge), an init process (docker-init), the
  agent's environment variables named in `[docker] env`, and labels naming the run, its
  lease and the agent, by which a restarted agent finds its containers.

The worker inside opens its channel's files itself (agent/worker/main.py), so the run's
events, compute logs and outputs reach the agent exactly as from a process on the host,
and the lease deadline (the host's monotonic clock, which a container shares) stops it.
When the container has exited its exit code and whether it was OOM-killed are read, and
it is removed. Schedules, sensors and code-location loading stay on the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Mapping
from typing import Any

import aiodocker

from agent.channel import Channel, WorkerIdentity
from agent.codeversions import LocationVersion
from agent.config import CodeLocationConfig, DockerConfig, OutputStoreConfig
from agent.container_spec import (
    LABEL_AGENT,
    LABEL_LEASE,
    ContainerPlan,
    container_binds,
    container_config,
    container_env,
    container_name,
    container_plan,
)
from agent.launchers import SubprocessLauncher, WorkerPipes, _LauncherBase
from agent.processes import LeftProcess
from agent.tracking import Tracking
from protocol.codec import frame
from protocol.messages import EvaluateSpec, LaunchRun, WorkerSpec

log = logging.getLogger("fleetrun.agent")

CONNECT_TIMEOUT_SECONDS = 10.0
RETRY_SECONDS = 2.0  # between attempts to reach a Docker daemon that stopped answering
UNREACHABLE = 900  # aiodocker's status for a socket that does not answer


class DockerUnavailable(ConnectionError):
    """The Docker daemon does not answer on the configured socket."""


class ImageMissing(FileNotFoundError):
    """The run's image is not on this host and could not be pulled."""


class ContainerScope:
    """A run in a container needs no process tracking on the host: its container holds
    everything it starts, and goes when it has exited."""

    tracking = "container"

    def __init__(self, marker: Mapping[str, str]) -> None:
        self.env = dict(marker)

    async def end(self, worker_pid: int | None) -> list[LeftProcess]:
        return []


class ContainerTracking:
    name = "container"

    def scope(self, label: str, marker: Mapping[str, str]) -> ContainerScope:
        return ContainerScope(marker)

    def describe(self) -> str:
        return "container (a container per run)"

    async def close(self) -> None:
        return None


class ContainerWorker:
    """A run worker in a container, started by this agent or by a previous life of it
    (adopted). `wait` returns its exit code once it has exited, notes whether it was
    OOM-killed, and removes it."""

    def __init__(
        self,
        docker: aiodocker.Docker,
        container_id: str,
        pid: int,
        plan: ContainerPlan,
        stop_grace_seconds: float,
        adopted: bool = False,
    ) -> None:
        self.docker = docker
        self.container_id = container_id
        self.pid = pid
        self.plan = plan
        self.stop_grace_seconds = stop_grace_seconds
        self.adopted = adopted
        self.pipes = WorkerPipes()
        self.oom_killed = False
        self.gone = False  # adopted, but removed before this agent started
        self.removed = False  # removed by someone else before its exit was seen
        self._signals: set[asyncio.Task[None]] = set()

    @property
    def short_id(self) -> str:
        return self.container_id[:12]

    @property
    def memory_mb(self) -> int:
        return self.plan.memory_mb

    def started_note(self) -> tuple[str, dict[str, Any]] | None:
        """What the run's page says of its container: the image and limits."""
        plan = self.plan
        data = {
            "container_id": self.container_id,
            "image": plan.image,
            "cpus": plan.cpus,
            "memory_mb": plan.memory_mb,
            "network": plan.network,
        }
        return f"run worker container {self.short_id} started: {plan.describe()}", data

    def _container(self) -> Any:
        return self.docker.containers.container(self.container_id)

    async def wait(self) -> int | None:
        """Its exit code (None if it was removed meanwhile); then it is removed. A Docker
        daemon that stops answering is asked again (said once): the run's lease deadline
        still bounds the run."""
        unreachable = False
        while True:
            try:
                result = await self._container().wait()
                state = (await self._container().show()).get("State", {})
                break
            except aiodocker.DockerError as exc:
                if exc.status == 404:
                    self.removed = True
                    return None
                if not unreachable:
                    log.warning("container %s: cannot reach Docker: %s", self.short_id, exc)
                unreachable = True
                await asyncio.sleep(RETRY_SECONDS)
        self.oom_killed = bool(state.get("OOMKilled"))
        await self.remove()
        code = result.get("StatusCode")
        return code if isinstance(code, int) else None

    async def remove(self) -> None:
        try:
            await self._container().delete(force=True)
        except aiodocker.DockerError as exc:
            if exc.status != 404:
                log.warning("cannot remove container %s: %s", self.short_id, exc)

    def signal(self, signum: int) -> None:
        """Send `signum` to the container's init, which passes it to the worker."""
        if self.removed:
            return
        task = asyncio.ensure_future(self._send(signal.Signals(signum).name))
        self._signals.add(task)
        task.add_done_callback(self._signals.discard)

    async def _send(self, name: str) -> None:
        try:
            await self._container().kill(signal=name)
        except aiodocker.DockerError as exc:
            if exc.status not in (404, 409):  # gone, or not running any more
                log.warning("cannot signal container %s (%s): %s", self.short_id, name, exc)

    def kill_group(self) -> None:
        self.signal(signal.SIGKILL)


class DockerLauncher(_LauncherBase):
    """Starts each run worker in a container; evaluations run on the host (as by the
    subprocess launcher), where the agent loads its code locations."""

    def __init__(
        self,
        locations: list[CodeLocationConfig],
        outputs: OutputStoreConfig | None = None,
        tracking: Tracking | None = None,
        docker: DockerConfig | None = None,
        agent_name: str = "",
    ) -> None:
        super().__init__(locations, outputs, tracking, docker, agent_name)
        self.config = self.docker_config
        self.host = SubprocessLauncher(locations, outputs, self.tracking)
        self.run_tracking: Tracking = ContainerTracking()
        self._docker: aiodocker.Docker | None = None

    def docker(self) -> aiodocker.Docker:
        if self._docker is None:
            timeout = aiohttp_timeout()
            self._docker = aiodocker.Docker(url=self.config.socket, timeout=timeout)
        return self._docker

    async def check(self) -> tuple[str | None, str | None]:
        """(Docker's version, None) if the daemon answers, else (None, why not); and,
        in the log, whether the default image is here."""
        try:
            version = await self.docker().version()
        except (aiodocker.DockerError, OSError, TimeoutError) as exc:
            return None, f"Docker does not answer at {self.config.socket}: {exc}"
        return str(version.get("Version", "?")), None

    async def image_present(self, image: str) -> bool:
        try:
            await self.docker().images.inspect(image)
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def warm_up(self) -> None:
        """Say at start whether Docker answers and has the default image."""
        version, problem = await self.check()
        if problem is not None:
            log.error("docker launcher: %s; runs on this agent will fail until it does", problem)
            return
        log.info("docker launcher: Docker %s at %s", version, self.config.socket)
        with contextlib.suppress(aiodocker.DockerError, OSError, TimeoutError):
            if not await self.image_present(self.config.image):
                log.warning(
                    "docker launcher: the default image %s is not on this host%s",
                    self.config.image,
                    " (pull = never)" if self.config.pull == "never" else "; runs will pull it",
                )

    async def start(
        self,
        loc: LocationVersion,
        spec: WorkerSpec | EvaluateSpec,
        mode: str = "run",
        env: Mapping[str, str] | None = None,
        channel: Channel | None = None,
    ) -> Any:
        if mode != "run" or channel is None or not isinstance(spec, WorkerSpec):
            return await self.host.start(loc, spec, mode, env, channel)
        return await self.start_container(loc, spec, env or {}, channel)

    async def start_container(
        self, loc: LocationVersion, spec: WorkerSpec, env: Mapping[str, str], channel: Channel
    ) -> ContainerWorker:
        launch = spec.launch
        plan = container_plan(launch.tags, self.config)
        folder = str(channel.folder)
        _prepare_channel(channel, spec, self.config.user)
        body = container_config(
            plan,
            launch,
            loc,
            container_binds(loc, folder, self.outputs, self.config),
            container_env(env, folder, self.config, os.environ),
            self.config,
            self.agent_name,
        )
        container = await self._create(body, container_name(launch))
        try:
            await container.start()
            state = (await container.show()).get("State", {})
        except aiodocker.DockerError as exc:
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)
            raise OSError(f"Docker could not start the container: {exc.message}") from None
        except BaseException:
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)
            raise
        return ContainerWorker(
            self.docker(),
            container.id,
            int(state.get("Pid") or 0),
            plan,
            self.config.stop_grace_seconds,
        )

    async def _create(self, body: dict[str, Any], name: str) -> Any:
        """Create the container; pull its image first if it is missing and pulling is
        allowed. DockerUnavailable or ImageMissing if that cannot be done."""
        image = body["Image"]
        try:
            return await self._create_once(body, name)
        except ImageMissing:
            if self.config.pull == "never":
                raise ImageMissing(
                    f"image {image} is not on this host (and [docker] pull = never)"
                ) from None
        log.info("pulling image %s", image)
        try:
            await self.docker().images.pull(image)
        except aiodocker.DockerError as exc:
            raise ImageMissing(
                f"image {image} is not on this host and could not be pulled: {exc.message}"
            ) from None
        return await self._create_once(body, name)

    async def _create_once(self, body: dict[str, Any], name: str) -> Any:
        try:
            return await self.docker().containers.create(body, name=name)
        except aiodocker.DockerError as exc:
            if exc.status == UNREACHABLE:
                raise DockerUnavailable(
                    f"Docker does not answer at {self.config.socket}: {exc.message}"
                ) from None
            if exc.status == 404 and "image" in exc.message.lower():
                raise ImageMissing(exc.message) from None
            if exc.status == 409:  # a container of this attempt left by a crash
                with contextlib.suppress(aiodocker.DockerError):
                    await self.docker().containers.container(name).delete(force=True)
                    return await self.docker().containers.create(body, name=name)
            raise OSError(f"Docker refused to create the container: {exc.message}") from None

    async def adopt(self, identity: WorkerIdentity, launch: LaunchRun) -> ContainerWorker:
        """The container of a run that a previous life of this agent started."""
        assert identity.container is not None
        worker = ContainerWorker(
            self.docker(),
            identity.container,
            identity.pid,
            container_plan(launch.tags, self.config),
            self.config.stop_grace_seconds,
            adopted=True,
        )
        try:
            await worker._container().show()
        except aiodocker.DockerError as exc:
            if exc.status == 404:
                worker.gone = worker.removed = True
        return worker

    async def remove_strays(self, held: set[int]) -> list[str]:
        """Remove this agent's containers whose lease it does not hold (their agent was
        killed between creating and recording them, or their channel is gone): none may
        run unsupervised. Returns their names."""
        filters = f'{{"label": ["{LABEL_AGENT}={self.agent_name}"]}}'
        try:
            found = await self.docker().containers.list(all=True, filters=filters)
        except (aiodocker.DockerError, OSError) as exc:
            log.error("cannot list this agent's containers: %s", exc)
            return []
        removed = []
        for container in found:
            labels = container._container.get("Labels") or {}
            try:
                lease = int(labels.get(LABEL_LEASE, ""))
            except ValueError:
                lease = -1
            if lease in held:
                continue
            names = container._container.get("Names") or [container.id[:12]]
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)
                removed.append(str(names[0]).lstrip("/"))
        return removed

    async def close(self) -> None:
        if self._docker is not None:
            await self._docker.close()
            self._docker = None


def aiohttp_timeout() -> Any:
    import aiohttp

    # No total: a container's wait lasts as long as its run.
    return aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_SECONDS)


def _prepare_channel(channel: Channel, spec: WorkerSpec, user: str) -> None:
    """Write the worker's spec into its channel, and give a numeric `[docker] user` the
    channel's files (they are the agent's, 0600)."""
    with open(channel.path("spec"), "wb") as fh:
        fh.write(frame(spec))
    uid_text, _, gid_text = user.partition(":")
    if not uid_text.isdigit():
        return
    uid, gid = int(uid_text), int(gid_text) if gid_text.isdigit() else -1
    for root, dirs, files in os.walk(channel.folder):
        for name in [*dirs, *files]:
            os.chown(os.path.join(root, name), uid, gid)
    os.chown(channel.folder, uid, gid)
