"""How the control plane writes a stored timestamp for people and the API."""

from __future__ import annotations

from datetime import UTC, datetime


def iso(ts: float | None) -> str | None:
    """Seconds since the epoch as ISO 8601 in UTC (`...Z`); None stays None."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")
