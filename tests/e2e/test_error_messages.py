"""Errors that say how to fix them, as a user meets them (issue 27, items 8-13).

Given a mistake an operator makes on a first install (a wrong database role or name,
http:// against a TLS control plane, a missing CA, an unreadable token file, a typo
in a config key), when they run the command, then one line says what is wrong, which
setting it is, and how to fix it; never a traceback.
"""

from __future__ import annotations

import re
import signal
import ssl
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme

from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    POSTGRES_URL,
    start_agent,
    start_control_plane,
    write_control_plane_config,
)

pytestmark = pytest.mark.e2e


def fleetrun(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETRUN, *args], capture_output=True, text=True, timeout=120)


def fleetrun_agent(*args: str) -> subprocess.CompletedProcess[str]:
    agent = [sys.executable, "-m", "agent.cli"]
    return subprocess.run([*agent, *args], capture_output=True, text=True, timeout=120)


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


@pytest.fixture(scope="module")
def tls_control_plane(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A control plane on TLS with a certificate from a test CA: its URL and the CA file."""
    folder = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(folder / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(folder / "cert.pem"))
    cert.private_key_pem.write_to_path(str(folder / "key.pem"))
    server_tls = f'tls_cert = "{folder / "cert.pem"}"\ntls_key = "{folder / "key.pem"}"'
    context = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    cp = start_control_plane(folder, server_extra=server_tls, context=context)
    yield cp.url, folder / "ca.pem"
    cp.stop()


def agent_config(folder: Path, url: str, extra: str = "", locations: str = "") -> Path:
    path = folder / "agent.toml"
    path.write_text(
        f'control_plane_url = "{url}"\nname = "a"\nstate_dir = "{folder / "state"}"\n'
        f"{extra}\n{locations}"
    )
    return path


def test_http_to_a_tls_control_plane_says_use_https(
    tmp_path: Path, tls_control_plane: tuple[str, Path]
) -> None:
    https, _ = tls_control_plane
    http = "http://" + https.removeprefix("https://")
    says = f"speaks HTTPS: use {https}"
    cli = fleetrun("--url", http, "runs", "list")
    assert cli.returncode == 1 and says in cli.stderr and "--url" in cli.stderr, cli.stderr
    config = agent_config(tmp_path, http)
    check = fleetrun_agent("check-config", "--config", str(config), "--connect")
    assert check.returncode == 2 and f"control_plane_url: the control plane at {http} " + says in (
        check.stderr
    ), check.stderr
    run = fleetrun("agent", "--config", str(config))  # exits instead of retrying for ever
    assert run.returncode == 1 and says in run.stderr, run.stderr
    assert "control_plane_url in agent.toml" in run.stderr
    assert "Traceback" not in cli.stderr + check.stderr + run.stderr


def test_a_certificate_that_does_not_verify_names_the_ca_setting(
    tmp_path: Path, tls_control_plane: tuple[str, Path]
) -> None:
    https, ca_file = tls_control_plane
    cli = fleetrun("--url", https, "runs", "list")
    assert cli.returncode == 1 and "--ca-file or FLEETRUN_CA_FILE" in cli.stderr, cli.stderr
    assert "certificate does not verify" in cli.stderr
    config = agent_config(tmp_path, https)
    check = fleetrun_agent("check-config", "--config", str(config), "--connect")
    assert check.returncode == 2 and "with ca_file in agent.toml" in check.stderr, check.stderr
    run = fleetrun("agent", "--config", str(config))
    assert run.returncode == 1 and "with ca_file in agent.toml" in run.stderr, run.stderr
    trusted = fleetrun("--url", https, "--ca-file", str(ca_file), "runs", "list")
    assert trusted.returncode == 0, trusted.stderr


def test_check_config_connect_says_what_it_checked(tmp_path: Path) -> None:
    config = write_control_plane_config(tmp_path)
    token = fleetrun("tokens", "create", "--config", str(config), "--kind", "agent", "--name", "a")
    assert token.returncode == 0, token.stderr
    (tmp_path / "agent.token").write_text(token.stdout.strip())
    cp = start_control_plane(tmp_path, "[auth]\nenabled = true\n")
    try:
        locations = f'[[code_locations]]\nname = "d"\npython_file = "{FIXTURES / "daemon_jobs.py"}"'
        # Given a token file that cannot be read: neither token nor protocol was checked
        missing = agent_config(tmp_path, cp.url, 'token_file = "gone.token"', locations)
        check = fleetrun_agent("check-config", "--config", str(missing), "--connect")
        assert check.returncode == 2, check.stderr
        assert "token_file: cannot read" in check.stderr
        assert "token_file could not be read" in check.stderr
        assert "refused the token" not in check.stderr
        assert f"control plane {cp.url}: reachable" in check.stdout, check.stdout
        assert "schedules every_minute, nightly; sensors inbox" in check.stdout
        # Given the agent's token: every check passed, each named
        good = agent_config(tmp_path, cp.url, 'token_file = "agent.token"', locations)
        check = fleetrun_agent("check-config", "--config", str(good), "--connect")
        assert check.returncode == 0, check.stderr
        assert "reachable, protocol" in check.stdout and "token accepted" in check.stdout
    finally:
        cp.stop()


def test_serve_logs_the_signal_that_stopped_it(tmp_path: Path) -> None:
    cp = start_control_plane(tmp_path)
    agent = start_agent(cp, tmp_path)  # its long-poll is held open when the signal comes
    try:
        cp.popen.send_signal(signal.SIGTERM)
        assert cp.popen.wait(30) == 0, cp.log()
        assert "stopping on SIGTERM" in cp.log()
        assert re.search(r"control plane stopped \(SIGTERM\) in [\d.]+ s", cp.log()), cp.log()
        assert "Traceback" not in cp.log()
    finally:
        agent.stop()
        cp.stop()
