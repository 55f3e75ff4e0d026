"""API and agent tokens as stored."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from control_plane.model.times import iso


@dataclass
class TokenRecord:
    """An API or agent token as stored: its secret only as a salted hash."""

    token_id: str
    name: str
    kind: str  # "agent" | "user"
    role: str | None  # viewer | operator | admin, for user tokens
    salt: bytes
    hash: bytes
    create_time: float
    last_used: float | None = None
    revoked_time: float | None = None

    def to_json(self) -> dict[str, Any]:
        """What `tokens list` shows: never the hash or salt."""
        return {
            "name": self.name,
            "kind": self.kind,
            "role": self.role,
            "create_time": iso(self.create_time),
            "last_used": iso(self.last_used),
            "revoked": self.revoked_time is not None,
            "revoked_time": iso(self.revoked_time),
        }
