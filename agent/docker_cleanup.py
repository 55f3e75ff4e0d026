"""Removing what a run attempt left in Docker: the step containers of the docker
executor whose run worker died before it could remove them (killed at its lease
deadline, or with its own container). Found by the labels every container of the run
carries (agent/container_spec.py)."""

from __future__ import annotations

import contextlib
import json
import logging

import aiodocker

from agent.config import DockerConfig
from agent.container_spec import LABEL_AGENT, LABEL_LEASE

log = logging.getLogger("fleetrun.agent")


async def remove_run_containers(config: DockerConfig, agent_name: str, lease: int) -> list[str]:
    """Remove every container of this agent labelled with `lease`; their names. Docker
    unreachable: logged, nothing removed."""
    labels = [f"{LABEL_AGENT}={agent_name}", f"{LABEL_LEASE}={lease}"]
    removed: list[str] = []
    docker = aiodocker.Docker(url=config.socket)
    try:
        found = await docker.containers.list(all=True, filters=json.dumps({"label": labels}))
        for container in found:
            names = container._container.get("Names") or [container.id[:12]]
            with contextlib.suppress(aiodocker.DockerError):
                await container.delete(force=True)
                removed.append(str(names[0]).lstrip("/"))
    except (aiodocker.DockerError, OSError) as exc:
        log.error("cannot look for the containers of lease %d: %s", lease, exc)
    finally:
        await docker.close()
    return removed
