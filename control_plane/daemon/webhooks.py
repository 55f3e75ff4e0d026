"""Alert delivery: one POST of an outbox row to its rule's webhook, and what follows.

Each attempt runs as a task of the alerts loop, never inside its pass, under a timeout,
so a slow or failing receiver costs the control plane nothing but that task. A row is
`sent` only after a 2xx; any other answer, a timeout or a refused connection is retried
with exponential backoff until the attempts run out (`failed`, with the last error),
except a 4xx other than 408 and 429, which no retry would change. Delivery is
at-least-once: a process that dies after the receiver took the POST but before `sent`
was written leaves the row to be sent again, so the body carries the occurrence's key
and the `Idempotency-Key` / `X-Fleetrun-Alert-Id` headers name it for the receiver.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import aiohttp

from control_plane.clock import Clock
from control_plane.metrics import Metrics
from control_plane.model.alerts import AlertDelivery
from control_plane.storage.port import AlertStore
from protocol import FLEETRUN_VERSION
from protocol.logs import redact

log = logging.getLogger("fleetrun.alerts")

ERROR_CHARS = 300  # of a refusal's body, kept as the delivery's last error


@dataclass(frozen=True)
class DeliveryPolicy:
    """How hard a delivery is tried: `max_attempts` POSTs of up to `timeout_seconds`
    each, waiting 1, 2, 4, 8 … s (up to `max_retry_seconds`) between them."""

    timeout_seconds: float = 10.0
    max_attempts: int = 5
    first_retry_seconds: float = 1.0
    max_retry_seconds: float = 300.0
    max_in_flight: int = 16  # deliveries under way at once

    @property
    def hold_seconds(self) -> float:
        """How long a claimed row is left alone: its attempt has ended by then, or its
        process died and the row is due again."""
        return 2 * self.timeout_seconds + 5.0

    def retry_at(self, attempts: int, now: float) -> float | None:
        """When to try again after attempt `attempts` failed; None: give up."""
        if attempts >= self.max_attempts:
            return None
        delay = self.first_retry_seconds * 2.0 ** (attempts - 1)
        return now + min(self.max_retry_seconds, delay)


POLICY = DeliveryPolicy()  # what `daemon_loops` uses (tests shorten it)


@dataclass(frozen=True)
class AlertSink:
    """Where deliveries go (each rule's webhook) and what records their outcome."""

    storage: AlertStore
    urls: dict[str, str]  # rule name -> webhook URL
    clock: Clock
    policy: DeliveryPolicy = POLICY
    metrics: Metrics | None = None


def _final(status: int) -> bool:
    """A refusal that the same request will meet again."""
    return 400 <= status < 500 and status not in (408, 429)


async def post(url: str, delivery: AlertDelivery, seconds: float) -> tuple[str | None, bool]:
    """POST the row's payload: (None, _) on a 2xx, else (why not, whether final)."""
    alert_id = f"{delivery.rule}/{delivery.key}"
    headers = {
        "Idempotency-Key": alert_id,
        "X-Fleetrun-Alert-Id": alert_id,
        "User-Agent": f"fleetrun/{FLEETRUN_VERSION}",
    }
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=seconds)) as session,
            session.post(
                url, json=delivery.payload, headers=headers, allow_redirects=False
            ) as resp,
        ):
            if 200 <= resp.status < 300:
                return None, False
            body = (await resp.content.read(ERROR_CHARS)).decode(errors="replace").strip()
            return f"HTTP {resp.status}" + (f": {body}" if body else ""), _final(resp.status)
    except TimeoutError:
        return f"no answer within {seconds:g} s", False
    except (aiohttp.ClientError, ValueError) as exc:
        # The URL's path may be a secret (Slack's is): never in an error or a log line.
        message = str(exc).replace(url, "<webhook_url>") or type(exc).__name__
        return f"{type(exc).__name__}: {redact(message)}", False


async def deliver(sink: AlertSink, delivery: AlertDelivery) -> None:
    """One attempt at a claimed row, and its outcome recorded."""
    url = sink.urls.get(delivery.rule)
    if url is None:
        error: str | None = f"no alert is called {delivery.rule!r} any more"
        final = True
    else:
        try:
            error, final = await post(url, delivery, sink.policy.timeout_seconds)
        except asyncio.CancelledError:  # this replica stops the loop: due again at once
            stopped = "the control plane stopped during this attempt"
            now = sink.clock.time()
            with contextlib.suppress(Exception):  # else its claim lapses by itself
                await sink.storage.settle_delivery(delivery, now, stopped, retry_at=now)
            raise
    now = sink.clock.time()
    retry_at = None if error is None or final else sink.policy.retry_at(delivery.attempts, now)
    if not await sink.storage.settle_delivery(delivery, now, error, retry_at):
        return  # its claim lapsed meanwhile: another attempt owns the row now
    outcome = "sent" if error is None else "retry" if retry_at is not None else "failed"
    if sink.metrics is not None:
        sink.metrics.alert_attempt(delivery.event, outcome)
    if error is None:
        log.info("alert %s %s: sent (attempt %d)", delivery.rule, delivery.key, delivery.attempts)
    elif retry_at is not None:
        log.warning(
            "alert %s %s: attempt %d failed (%s); next in %.0f s",
            delivery.rule,
            delivery.key,
            delivery.attempts,
            error,
            retry_at - now,
        )
    else:
        log.error(
            "alert %s %s: not delivered after %d attempts: %s",
            delivery.rule,
            delivery.key,
            delivery.attempts,
            error,
        )
