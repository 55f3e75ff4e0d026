"""`check-config --connect`: reach the control plane and say what was checked.

Three things are checked in order, each only if the one before passed: the control
plane answers (`/healthz`, no token needed), it speaks this agent's protocol, and it
takes the token in token_file. The answers are gathered first (`ask`), then judged by
a pure function (`judge`), so that a token that could not be read is reported as not
checked rather than as refused."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import aiohttp

from agent.client import misconfiguration, tls_context
from protocol import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS

TokenState = Literal["absent", "unreadable", "read"]
REFUSED = (401, 403)


@dataclass(frozen=True)
class Answers:
    """What the control plane answered: `failure` if it could not be reached at all;
    the status of `GET /agent/v1/version` without a token and (when that was refused
    and a token was read) with it; the protocol version from whichever succeeded."""

    failure: str | None = None
    health: int | None = None
    anonymous: int | None = None
    with_token: int | None = None
    protocol: Any = None


@dataclass(frozen=True)
class Verdict:
    checked: list[str]  # what passed, for the one summary line
    problems: list[str]  # what failed, each with its fix


async def ask(url: str, token: str | None, ca_file: str) -> Answers:
    """Ask the control plane at `url` what `judge` needs; never raises for a network
    failure (it becomes `failure`, with the fix when agent.toml is the cause)."""
    base = url.rstrip("/")
    context = tls_context(url, ca_file)
    connector = aiohttp.TCPConnector(ssl=context if context is not None else True)
    timeout = aiohttp.ClientTimeout(total=10)
    try:
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            async with session.get(f"{base}/healthz") as resp:
                health = resp.status
            if health != 200:
                return Answers(health=health)
            anonymous, protocol = await _version(session, base, None)
            if anonymous not in REFUSED or token is None:
                return Answers(health=health, anonymous=anonymous, protocol=protocol)
            with_token, protocol = await _version(session, base, token)
            return Answers(
                health=health, anonymous=anonymous, with_token=with_token, protocol=protocol
            )
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        explained = await misconfiguration(url, exc)
        return Answers(failure=explained or f"cannot reach {url}: {type(exc).__name__}: {exc}")


async def _version(session: aiohttp.ClientSession, base: str, token: str | None) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(f"{base}/agent/v1/version", headers=headers) as resp:
        if resp.status != 200:
            return resp.status, None
        body = await resp.json()
        return resp.status, body.get("protocol_version") if isinstance(body, dict) else None


def judge(url: str, answers: Answers, token: TokenState) -> Verdict:
    """What passed and what failed, from the answers and whether a token was read."""
    if answers.failure is not None:
        return Verdict([], [answers.failure])
    if answers.health != 200:
        return Verdict(
            [], [f"{url}/healthz answered HTTP {answers.health}: is it a control plane?"]
        )
    checked = ["reachable"]
    status = answers.with_token if answers.with_token is not None else answers.anonymous
    if status in REFUSED:
        return Verdict(checked, [_token_problem(token, answers)])
    if status != 200:
        return Verdict(checked, [f"{url}/agent/v1/version answered HTTP {status}"])
    if answers.protocol not in SUPPORTED_PROTOCOL_VERSIONS:
        problem = (
            f"the control plane speaks protocol {answers.protocol}; this agent speaks "
            f"{PROTOCOL_VERSION}: upgrade the older of the two"
        )
        return Verdict(checked, [problem])
    checked.append(f"protocol {answers.protocol} compatible")
    if answers.with_token == 200:
        checked.append("token accepted")
    elif token == "unreadable":
        checked.append("token not checked (token_file unreadable; this control plane needs none)")
    else:
        checked.append("no token needed (auth is off on the control plane)")
    return Verdict(checked, [])


def _token_problem(token: TokenState, answers: Answers) -> str:
    """Why the protocol could not be checked: the control plane wants a token."""
    if token == "read":
        return (
            f"the control plane refused the token in token_file (HTTP {answers.with_token}): "
            "write an agent token there (fleetrun tokens create --kind agent --name NAME)"
        )
    if token == "unreadable":
        return (
            "the control plane requires a token and token_file could not be read, so "
            "neither the token nor the protocol was checked"
        )
    return (
        "the control plane requires a token: set token_file in agent.toml to a file "
        "holding an agent token (fleetrun tokens create --kind agent --name NAME)"
    )
