"""What docs/install.md and docs/security.md tell an operator to do, done for real.

Given the TLS recipe the docs show (build/make-tls-certs.sh), when a control plane
serves its certificate, then the CLI reaches it by IP address and by DNS name trusting
only the recipe's CA. Given a database an older fleetrun made, when the current
`fleetrun migrate` runs, then it is brought up to date and served with its runs; given
one a newer fleetrun made, `serve` and `migrate` refuse it with exit 2 naming both
schema versions.
"""

from __future__ import annotations

import asyncio
import sqlite3
import ssl
import subprocess
from pathlib import Path

import asyncpg
import pytest

from control_plane.storage.schema import MIGRATIONS, for_postgres
from tests.conftest import (
    FLEETRUN,
    REPO,
    start_agent,
    start_control_plane,
    write_control_plane_config,
)

pytestmark = pytest.mark.e2e
OLD_VERSION = 5  # schedules and sensors, before tokens, leases, the run history, alerts
OLD_RUN = (
    "INSERT INTO runs (run_id, job, location, status, tags, config, create_time,"
    " update_time) VALUES ('made-by-an-older-fleetrun', 'etl', 'examples', 'SUCCESS',"
    " '{}', '{}', 1, 2)"
)


def fleetrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETRUN, *args], capture_output=True, text=True, timeout=120)


def make_certificates(folder: Path) -> None:
    """The recipe of docs/security.md, for localhost and 127.0.0.1."""
    script = REPO / "build" / "make-tls-certs.sh"
    result = subprocess.run(
        ["sh", str(script), str(folder), "localhost", "127.0.0.1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


def test_the_tls_recipe_makes_a_certificate_the_cli_trusts_by_ip_and_name(
    tmp_path: Path,
) -> None:
    # Given the recipe's files and a control plane serving its certificate
    tls = tmp_path / "tls"
    make_certificates(tls)
    assert sorted(p.name for p in tls.iterdir()) == ["ca.key", "ca.pem", "server.key", "server.pem"]
    assert (tls / "server.key").stat().st_mode & 0o077 == 0
    server_tls = f'host = "127.0.0.1"\ntls_cert = "{tls}/server.pem"\ntls_key = "{tls}/server.key"'
    context = ssl.create_default_context(cafile=str(tls / "ca.pem"))
    cp = start_control_plane(tmp_path, server_extra=server_tls, context=context)
    try:
        port = cp.url.rsplit(":", 1)[1]
        ca = ["--ca-file", str(tls / "ca.pem")]
        for url in (f"https://127.0.0.1:{port}", f"https://localhost:{port}"):
            # When the CLI calls it with the recipe's CA, by IP address and by DNS name
            result = fleetrun("agents", "list", "--url", url, *ca, "--json")
            # Then the certificate verifies
            assert result.returncode == 0, (url, result.stderr)
        # and without the CA (the system's store) it does not
        untrusted = fleetrun("agents", "list", "--url", f"https://127.0.0.1:{port}")
        assert untrusted.returncode != 0
        assert "certificate" in untrusted.stderr.lower(), untrusted.stderr
        # and an agent trusting the CA registers over TLS
        agent = start_agent(cp, tmp_path, extra=f'ca_file = "{tls}/ca.pem"')
        agent.stop()
    finally:
        cp.stop()


def old_sqlite_database(path: Path, version: int) -> None:
    """A database as a fleetrun that knew only the first `version` migrations left it."""
    with sqlite3.connect(path) as db:
        for migration in MIGRATIONS[:version]:
            db.executescript(migration)
        db.execute("CREATE TABLE schema_version (version INTEGER)")
        db.execute("INSERT INTO schema_version VALUES (?)", (version,))
        db.execute(OLD_RUN)


def old_postgres_database(url: str, version: int) -> None:
    async def build() -> None:
        conn = await asyncpg.connect(url, timeout=10)
        try:
            for migration in MIGRATIONS[:version]:
                await conn.execute(for_postgres(migration))
            await conn.execute("CREATE TABLE schema_version (version INTEGER)")
            await conn.execute("INSERT INTO schema_version VALUES ($1)", version)
            await conn.execute(OLD_RUN)
        finally:
            await conn.close()

    asyncio.run(build())


@pytest.fixture(params=["sqlite", "postgres"])
def storage_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where an older fleetrun's database is: a SQLite file, or a PostgreSQL schema."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'fleetrun.db'}"
    url: str = request.getfixturevalue("postgres_url")
    return url


def test_an_older_database_is_migrated_then_served(tmp_path: Path, storage_url: str) -> None:
    # Given a database at schema version 5 with a run in it
    if storage_url.startswith("sqlite"):
        old_sqlite_database(tmp_path / "fleetrun.db", OLD_VERSION)
    else:
        old_postgres_database(storage_url, OLD_VERSION)
    config = write_control_plane_config(tmp_path, storage_url=storage_url)
    # When the current fleetrun migrates it
    result = fleetrun("migrate", "--config", str(config))
    # Then every migration since is applied
    assert result.returncode == 0, result.stderr
    assert f"schema version {OLD_VERSION} -> {len(MIGRATIONS)}" in result.stdout, result.stdout
    again = fleetrun("migrate", "--config", str(config))
    assert f"schema version {len(MIGRATIONS)} (up to date)" in again.stdout, again.stdout
    # and the control plane serves it: the old run, and new runs on an agent
    cp = start_control_plane(tmp_path, storage_url=storage_url)
    try:
        assert cp.get("/api/v1/runs/made-by-an-older-fleetrun")["status"] == "SUCCESS"
        agent = start_agent(cp, tmp_path)
        try:
            assert cp.wait_run(cp.submit("etl"))["status"] == "SUCCESS"
        finally:
            agent.stop()
    finally:
        cp.stop()


def test_a_database_newer_than_the_software_is_refused(tmp_path: Path, storage_url: str) -> None:
    # Given a database a newer fleetrun migrated one version further
    config = write_control_plane_config(tmp_path, storage_url=storage_url)
    assert fleetrun("migrate", "--config", str(config)).returncode == 0
    newer = len(MIGRATIONS) + 1
    bump = f"UPDATE schema_version SET version = {newer}"
    if storage_url.startswith("sqlite"):
        with sqlite3.connect(tmp_path / "fleetrun.db") as db:
            db.execute(bump)
    else:
        asyncio.run(_execute(storage_url, bump))
    for command in ("serve", "migrate"):
        # When this fleetrun serves or migrates it
        result = fleetrun(command, "--config", str(config))
        # Then it refuses with exit 2 (systemd does not restart it), naming both versions
        assert result.returncode == 2, (command, result.stdout, result.stderr)
        message = f"has schema version {newer}, newer than this fleetrun knows ({len(MIGRATIONS)})"
        assert message in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert "restore the backup" in result.stderr


async def _execute(url: str, sql: str) -> None:
    conn = await asyncpg.connect(url, timeout=10)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()
