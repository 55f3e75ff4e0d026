"""Errors that say how to fix them, as a user meets them (issue 27, items 8-13).

Given a mistake an operator makes on a first install (a wrong database role or name,
http:// against a TLS control plane, a missing CA, an unreadable token file, a typo
in a config key), when they run the command, then one line says what is wrong, which
setting it is, and how to fix it; never a traceback.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.conftest import FLEETRUN, POSTGRES_URL, write_control_plane_config

pytestmark = pytest.mark.e2e


def fleetrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETRUN, *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("swap", "says"),
    [
        ("role", 'role "fleetrun_no_such_role" does not exist'),
        ("database", 'database "fleetrun_no_such_db" does not exist'),
    ],
)
def test_a_wrong_postgres_role_or_database_is_one_line(
    tmp_path: Path, swap: str, says: str
) -> None:
    scheme, _, rest = POSTGRES_URL.partition("://")
    user, _, where = rest.partition("@")
    host, _, database = where.partition("/")
    if swap == "role":
        url = f"{scheme}://fleetrun_no_such_role@{host}/{database}"
    else:
        url = f"{scheme}://{user}@{host}/fleetrun_no_such_db"
    config = write_control_plane_config(tmp_path, storage_url=url)
    for command in (["serve"], ["migrate"]):
        result = fleetrun(*command, "--config", str(config))
        assert result.returncode == 1, result.stderr
        assert "Traceback" not in result.stderr and says in result.stderr, result.stderr
        assert "storage.url" in result.stderr and "fix:" in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
