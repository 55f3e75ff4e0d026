"""Agents as the control plane sees them, and the one rule of their liveness."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Agent:
    agent_id: str
    name: str
    hostname: str
    status: str
    queues: list[str]
    max_concurrent_runs: int
    version: str
    last_heartbeat: float
    registered_time: float
    capabilities: list[str] = field(default_factory=list)
    token_name: str | None = None  # the agent token it registered with (auth on)
    # Drained by an operator (`fleetrun agents drain`): DRAINING until undrained, through
    # the agent's restarts; the agent's own drain at shutdown ends when it registers again.
    operator_drain: bool = False
    labels: dict[str, str] = field(default_factory=dict)  # what `fleetrun/requires` selects
    resources: dict[str, int] = field(default_factory=dict)  # cpus, memory_mb, gpus offered

    @property
    def launcher(self) -> str | None:
        """Its run launcher ("forkserver", "subprocess", "docker"), from the capability
        "launcher:<name>" it registered with; None for an agent too old to say."""
        for capability in self.capabilities:
            if capability.startswith(LAUNCHER_CAPABILITY):
                return capability[len(LAUNCHER_CAPABILITY) :]
        return None


LAUNCHER_CAPABILITY = "launcher:"


ONLINE, DRAINING, OFFLINE = "ONLINE", "DRAINING", "OFFLINE"
AGENT_STATUSES = (ONLINE, DRAINING, OFFLINE)


def agent_status(agent: Agent, now: float, heartbeat_timeout: float) -> str:
    """ONLINE, DRAINING or OFFLINE, as every part of the control plane must see it: an
    agent silent for longer than the heartbeat timeout is OFFLINE whatever its row says
    (the monitor writes OFFLINE only when it fails a run of it). Only an ONLINE agent
    takes new runs and evaluations."""
    if now - agent.last_heartbeat > heartbeat_timeout:
        return OFFLINE
    return agent.status
