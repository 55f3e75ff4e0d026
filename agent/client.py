"""The agent's connection to the control plane: one msgpack POST per protocol message."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import ssl
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp

from agent.errors import AgentError
from protocol.codec import ProtocolError, decode, encode
from protocol.messages import ErrorReply
from protocol.transport import answers_tls, certificate_problem, is_plain_http, speaks_https

T = TypeVar("T")
log = logging.getLogger("fleetrun.agent")


class ControlPlaneUnreachable(AgentError):
    """No answer (connection refused, reset, timeout, 5xx): worth retrying."""


class Misconfigured(ControlPlaneUnreachable):
    """The connection failed in a way only agent.toml can fix (http:// to a control plane
    on TLS, a certificate that does not verify). Fatal at start-up; later it is retried
    like an outage (the control plane's setup may have changed under a running agent)."""


CA_SETTING = "ca_file in agent.toml"
URL_SETTING = "control_plane_url in agent.toml"


class TokenRefused(ControlPlaneUnreachable):
    """401: the token is unknown or revoked. Retried like an outage (the token file may
    be rotated meanwhile); the control plane fails the runs if it never comes back."""


class ControlPlaneError(AgentError):
    """The control plane answered with a refusal (4xx) that names the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


class BadReply(ControlPlaneUnreachable):
    """A 200 whose body this agent cannot read (a control plane of another version, a
    proxy in between): retried like an outage, never a reason to exit."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# Refusals that no retry can cure: the agent exits and says why (systemd restarts it).
FATAL_CODES = frozenset({"unsupported_version", "not_this_agent", "forbidden"})


def read_token(path: str) -> str | None:
    if not path:
        return None
    with open(path) as fh:
        return fh.read().strip() or None


def tls_context(url: str, ca_file: str = "") -> ssl.SSLContext | None:
    """Certificate and host name verified for https (against `ca_file`, or the system's
    CAs); never a fallback to plain http."""
    if not url.startswith("https://"):
        return None
    context = ssl.create_default_context(cafile=ca_file or None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ControlPlaneClient:
    """Token rotation: on a 401 the token file is read again; if it holds a new token,
    `on_token_rotated` runs (the agent registers under it) and the call is retried."""

    def __init__(
        self,
        base_url: str,
        token: str | None = None,
        *,
        token_file: str = "",
        ca_file: str = "",
        on_token_rotated: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.token_file = token_file
        self.on_token_rotated = on_token_rotated
        self._ssl = tls_context(self.base_url, ca_file)
        self._rotation = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlPlaneClient:
        connector = aiohttp.TCPConnector(ssl=self._ssl if self._ssl is not None else True)
        self._session = aiohttp.ClientSession(connector=connector)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _send(
        self, method: str, path: str, data: bytes | None, wait: float, params: dict[str, str]
    ) -> tuple[int, bytes]:
        assert self._session is not None, "use the client as an async context manager"
        headers = {"Content-Type": "application/msgpack"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            async with self._session.request(
                method,
                f"{self.base_url}/agent/v1/{path}",
                data=data,
                params=params,
                headers=headers,
                timeout=aiohttp.ClientTimeout(total=wait),
            ) as resp:
                return resp.status, await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise await transport_failure(self.base_url, path, exc) from None

    async def _rotated(self, used: str | None) -> bool:
        """After a 401 with token `used`: True if a newer token is now in use."""
        async with self._rotation:
            if self.token != used:
                return True  # another call rotated it meanwhile
            try:
                fresh = await asyncio.to_thread(read_token, self.token_file)
            except OSError as exc:
                log.warning("cannot read token_file %s: %s", self.token_file, exc.strerror)
                return False
            if fresh is None or fresh == used:
                return False
            log.info("token_file holds a new token; registering with it")
            self.token = fresh
            if self.on_token_rotated is not None:
                await self.on_token_rotated()
            return True

    async def _request(
        self,
        method: str,
        path: str,
        data: bytes | None,
        wait: float,
        params: dict[str, str],
        rotate: bool = True,
    ) -> tuple[int, bytes]:
        used = self.token
        status, body = await self._send(method, path, data, wait, params)
        if status == 401 and rotate and self.token_file and await self._rotated(used):
            status, body = await self._send(method, path, data, wait, params)
        if status >= 500:
            raise ControlPlaneUnreachable(f"{path}: HTTP {status}")
        if status != 200:
            try:
                err = decode(body, ErrorReply)
            except ProtocolError:
                err = ErrorReply(code="http_error", message=body[:200].decode(errors="replace"))
            if status == 401:
                raise TokenRefused(f"{path}: 401 {err.code}: {err.message}")
            raise ControlPlaneError(status, err.code, err.message)
        return status, body

    async def put_output(
        self, agent_id: str, run_id: str, lease: int, step: str, data: bytes, wait: float
    ) -> None:
        """Store one step output (raw pickled bytes) in the control plane's output store."""
        params = {"agent_id": agent_id, "lease": str(lease)}
        await self._request("PUT", f"outputs/{run_id}/{step}", data, wait, params)

    async def get_output(
        self, agent_id: str, run_id: str, lease: int, source: str, step: str, wait: float
    ) -> bytes:
        """The output of `step` in run `source`, which run `run_id` (ours, under `lease`)
        reuses."""
        params = {"agent_id": agent_id, "run_id": run_id, "lease": str(lease)}
        return (await self._request("GET", f"outputs/{source}/{step}", None, wait, params))[1]

    async def call_raw(self, path: str, message: Any, wait: float, rotate: bool = True) -> bytes:
        """POST one message; the reply's bytes, for a caller that decodes them itself."""
        return (await self._request("POST", path, encode(message), wait, {}, rotate))[1]

    async def call(
        self, path: str, message: Any, reply_type: type[T], wait: float, rotate: bool = True
    ) -> T:
        body = await self.call_raw(path, message, wait, rotate)
        try:
            return decode(body, reply_type)
        except ProtocolError as exc:
            raise BadReply(exc.code, f"bad reply to {path}: {exc}") from None


async def transport_failure(url: str, what: str, exc: BaseException) -> ControlPlaneUnreachable:
    """The error for a request that got no answer: `Misconfigured`, with the fix, when
    the agent's settings are the cause; else a plain `ControlPlaneUnreachable`."""
    problem = await misconfiguration(url, exc, URL_SETTING)
    if problem is not None:
        return Misconfigured(f"{what}: {problem}")
    return ControlPlaneUnreachable(f"{what}: {type(exc).__name__}: {exc}")


async def misconfiguration(url: str, exc: BaseException, url_setting: str = "") -> str | None:
    """What in agent.toml makes the control plane at `url` unreachable, or None. A
    hang-up on an http:// URL is checked with a TLS handshake (in a thread)."""
    if isinstance(exc, aiohttp.ClientConnectorCertificateError):
        error = exc.certificate_error
        if isinstance(error, ssl.SSLCertVerificationError):
            return certificate_problem(error, CA_SETTING)
    hung_up = isinstance(exc, aiohttp.ServerDisconnectedError | ConnectionResetError)
    if hung_up and is_plain_http(url) and await asyncio.to_thread(answers_tls, url):
        return speaks_https(url, url_setting)
    return None


class RetryDelays:
    """Capped exponential backoff with full jitter (a uniform draw below the cap), so a
    fleet of agents that lost the control plane together comes back spread out."""

    def __init__(self, base: float = 0.2, cap: float = 10.0, rng: random.Random | None = None):
        self.base = base
        self.cap = cap
        self.rng = rng or random.Random()
        self.attempt = 0

    def next_delay(self) -> float:
        delay = self.rng.uniform(0, min(self.cap, self.base * 2**self.attempt))
        self.attempt = min(self.attempt + 1, 32)
        return delay

    def reset(self) -> None:
        self.attempt = 0


class ContactLog:
    """One log line when contact with the control plane is lost, one when it is back,
    however many attempts fail in between."""

    def __init__(self, logger: logging.Logger) -> None:
        self.log = logger
        self.lost_since: float | None = None
        self._restored = asyncio.Event()

    async def wait(self, seconds: float) -> None:
        """Sleep `seconds`, or less if contact comes back meanwhile (a heartbeat got
        through): whatever backed off then retries at once instead of at its cap."""
        restored = self._restored
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(restored.wait(), seconds)

    def failed(self, what: str, exc: Exception) -> None:
        if self.lost_since is None:
            self.lost_since = time.monotonic()
            self.log.warning(
                "lost contact with the control plane (%s: %s); retrying with backoff", what, exc
            )

    def succeeded(self) -> None:
        if self.lost_since is not None:
            seconds = time.monotonic() - self.lost_since
            self.lost_since = None
            self.log.info("contact with the control plane restored after %.1f s", seconds)
            self._restored.set()
            self._restored = asyncio.Event()
