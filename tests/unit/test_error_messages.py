"""Errors that say how to fix them: the pure functions that word them (issue 27, 8-13)."""

from __future__ import annotations

import asyncpg

from control_plane.storage.postgres import explain_connect_failure

URL = "postgresql://ops:s3cret@db.example:5432/fleet?search_path=fr"


def test_a_missing_role_names_the_setting_and_the_fix() -> None:
    exc = asyncpg.InvalidAuthorizationSpecificationError('role "ops" does not exist')
    line = explain_connect_failure(URL, exc)
    assert line.startswith("cannot connect to postgresql://ops:***@db.example:5432/fleet")
    assert 'role "ops" does not exist' in line and "storage.url" in line
    assert "createuser ops" in line and "s3cret" not in line and "\n" not in line


def test_a_missing_database_names_the_setting_and_the_fix() -> None:
    exc = asyncpg.InvalidCatalogNameError('database "fleet" does not exist')
    line = explain_connect_failure(URL, exc)
    assert 'database "fleet" does not exist' in line and "storage.url" in line
    assert "createdb -O ops fleet" in line and "s3cret" not in line


def test_a_wrong_password_or_port_names_the_setting() -> None:
    password = explain_connect_failure(URL, asyncpg.InvalidPasswordError("password failed"))
    assert "correct the password in storage.url" in password
    refused = explain_connect_failure(URL, ConnectionRefusedError(111, "Connect call failed"))
    assert "listening on db.example:5432?" in refused and "storage.url" in refused
