"""The root of every error the agent raises on purpose (its docstring says what)."""

from __future__ import annotations


class AgentError(Exception):
    """Something the agent refused or could not do; the message says what."""


class FatalAgentError(AgentError):
    """The control plane refused this agent outright (a version or identity mismatch, a
    refused registration): the agent exits and says why."""
