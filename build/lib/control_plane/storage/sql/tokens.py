"""Tokens: only a salted hash of each secret is stored."""

from __future__ import annotations

import dataclasses

from control_plane.model.tokens import TokenRecord
from control_plane.storage.errors import NameTaken
from control_plane.storage.sql.base import TOKEN_COLUMNS, SqlBase, token_from_row


class TokenQueries(SqlBase):
    async def create_token(self, token: TokenRecord) -> None:
        async with self._write() as db:
            rows = await db.fetch("SELECT 1 FROM tokens WHERE name = ?", (token.name,))
            if rows:
                raise NameTaken(f"a token named {token.name!r} exists (names are never reused)")
            await db.execute(
                f"INSERT INTO tokens ({TOKEN_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                dataclasses.astuple(token),
            )

    async def get_token(self, token_id: str) -> TokenRecord | None:
        rows = await self._reader.fetch(
            f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE token_id = ?", (token_id,)
        )
        return token_from_row(rows[0]) if rows else None

    async def list_tokens(self) -> list[TokenRecord]:
        rows = await self._reader.fetch(f"SELECT {TOKEN_COLUMNS} FROM tokens ORDER BY name")
        return [token_from_row(row) for row in rows]

    async def revoke_token(self, name: str, now: float) -> TokenRecord | None:
        """Revoke the live token called `name`; None if there is none."""
        async with self._write() as db:
            changed = await db.execute(
                "UPDATE tokens SET revoked_time = ? WHERE name = ? AND revoked_time IS NULL",
                (now, name),
            )
            if changed == 0:
                return None
            rows = await db.fetch(f"SELECT {TOKEN_COLUMNS} FROM tokens WHERE name = ?", (name,))
            return token_from_row(rows[0])

    async def touch_token(self, token_id: str, now: float) -> None:
        async with self._write_row() as db:
            await db.execute("UPDATE tokens SET last_used = ? WHERE token_id = ?", (now, token_id))
