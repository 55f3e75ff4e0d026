"""The agent's connection to the control plane: one msgpack POST per protocol message."""

from __future__ import annotations

import logging
import random
import time
from typing import Any, TypeVar

import aiohttp

from protocol.codec import ProtocolError, decode
from protocol.messages import ErrorReply

T = TypeVar("T")


class ControlPlaneUnreachable(Exception):
    """No answer (connection refused, reset, timeout, 5xx): worth retrying."""


class ControlPlaneError(Exception):
    """The control plane answered with a refusal (4xx) that names the problem."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code


class ControlPlaneClient:
    def __init__(self, base_url: str, token: str | None = None) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Content-Type": "application/msgpack"}
        if token:
            self._headers["Authorization"] = f"Bearer {token}"
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> ControlPlaneClient:
        self._session = aiohttp.ClientSession()
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _request(
        self, method: str, path: str, data: bytes | None, wait: float, params: dict[str, str]
    ) -> tuple[int, bytes]:
        assert self._session is not None, "use the client as an async context manager"
        try:
            async with self._session.request(
                method,
                f"{self.base_url}/agent/v1/{path}",
                data=data,
                params=params,
                headers=self._headers,
                timeout=aiohttp.ClientTimeout(total=wait),
            ) as resp:
                body = await resp.read()
                status = resp.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise ControlPlaneUnreachable(f"{path}: {type(exc).__name__}: {exc}") from None
        if status >= 500:
            raise ControlPlaneUnreachable(f"{path}: HTTP {status}")
        if status != 200:
            try:
                err = decode(body, ErrorReply)
            except ProtocolError:
                err = ErrorReply(code="http_error", message=body[:200].decode(errors="replace"))
            raise ControlPlaneError(status, err.code, err.message)
        return status, body

    async def put_output(
        self, agent_id: str, run_id: str, lease: int, step: str, data: bytes, wait: float
    ) -> None:
        """Store one step output (raw pickled bytes) in the control plane's output store."""
        params = {"agent_id": agent_id, "lease": str(lease)}
        await self._request("PUT", f"outputs/{run_id}/{step}", data, wait, params)

    async def get_output(self, run_id: str, step: str, wait: float) -> bytes:
        return (await self._request("GET", f"outputs/{run_id}/{step}", None, wait, {}))[1]

    async def call(self, path: str, message: Any, reply_type: type[T], wait: float) -> T:
        from protocol.codec import encode

        status, body = await self._request("POST", path, encode(message), wait, {})
        try:
            return decode(body, reply_type)
        except ProtocolError as exc:
            raise ControlPlaneError(status, exc.code, f"bad reply to {path}: {exc}") from None


class Backoff:
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

    def failed(self, what: str, exc: Exception) -> None:
        if self.lost_since is None:
            self.lost_since = time.monotonic()
            self.log.warning("lost contact with the control plane (%s: %s); retrying with "
                             "backoff", what, exc)  # fmt: skip

    def succeeded(self) -> None:
        if self.lost_since is not None:
            seconds = time.monotonic() - self.lost_since
            self.lost_since = None
            self.log.info("contact with the control plane restored after %.1f s", seconds)
