"""Which agent token each agent registered with: with auth on, an agent token may act
only for its own agent, whatever agent id a message names."""

from __future__ import annotations

from control_plane.errors import ControlPlaneError
from control_plane.storage.port import AgentStore


class NotThisAgent(ControlPlaneError):
    """This token does not belong to that agent."""


class AgentIdentities:
    """The token each agent registered with, cached (an agent may have registered with
    another replica: the cache is filled from storage when it does not know)."""

    def __init__(self, agents: AgentStore) -> None:
        self.agents = agents
        self._tokens: dict[str, str | None] = {}

    def registered(self, agent_id: str, token_name: str | None) -> None:
        self._tokens[agent_id] = token_name

    async def check(self, token_name: str, agent_id: str) -> None:
        """NotThisAgent unless `agent_id` is bound to the token called `token_name`. An
        unknown agent passes: the handler answers unknown_agent and it registers."""
        if self._tokens.get(agent_id, "") != token_name:  # unknown here, or stale:
            agent = await self.agents.get_agent(agent_id)
            if agent is None:
                return
            self._tokens[agent_id] = agent.token_name
        if self._tokens[agent_id] != token_name:
            raise NotThisAgent("this token does not belong to that agent")
