"""Errors that say how to fix them: the pure functions that word them (issue 27, 8-13)."""

from __future__ import annotations

import ssl
from pathlib import Path

import asyncpg
import pytest

from agent.config import load_agent_config
from agent.connection_check import Answers, Verdict, judge
from control_plane.config import load_control_plane_config
from control_plane.storage.postgres import explain_connect_failure
from protocol import PROTOCOL_VERSION
from protocol.schema import ConfigError, unknown_key
from protocol.transport import certificate_problem, speaks_https

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


def verify_error(code: int, message: str) -> ssl.SSLCertVerificationError:
    error = ssl.SSLCertVerificationError(1, f"[SSL: CERTIFICATE_VERIFY_FAILED] {message}")
    error.reason, error.verify_code, error.verify_message = (
        "CERTIFICATE_VERIFY_FAILED",
        code,
        message,
    )
    return error


def test_an_unknown_ca_names_the_setting_of_each_side() -> None:
    error = verify_error(20, "unable to get local issuer certificate")
    line = certificate_problem(error, "ca_file in agent.toml")
    assert "does not verify (CERTIFICATE_VERIFY_FAILED: unable to get local issuer" in line
    assert line.endswith("give the CA that signed it with ca_file in agent.toml")


def test_a_host_name_the_certificate_does_not_name_is_not_a_ca_problem() -> None:
    error = verify_error(62, "Hostname mismatch, certificate is not valid for 'cp.lan'.")
    line = certificate_problem(error, "--ca-file or FLEETRUN_CA_FILE")
    assert "not valid for 'cp.lan'" in line and "SAN" in line and "--ca-file" not in line


def test_http_to_tls_says_which_url_to_use() -> None:
    line = speaks_https("http://10.0.0.5:8470", "--url or FLEETRUN_URL")
    assert line == (
        "the control plane at http://10.0.0.5:8470 speaks HTTPS: use https://10.0.0.5:8470 "
        "(--url or FLEETRUN_URL)"
    )


URL_CP = "http://127.0.0.1:8470"


def test_an_unreadable_token_is_reported_as_not_checked_not_as_refused() -> None:
    auth_on = Answers(health=200, anonymous=401)
    verdict = judge(URL_CP, auth_on, "unreadable")
    assert verdict.checked == ["reachable"]
    assert "token_file could not be read" in verdict.problems[0]
    assert "refused" not in verdict.problems[0]
    auth_off = judge(
        URL_CP, Answers(health=200, anonymous=200, protocol=PROTOCOL_VERSION), "unreadable"
    )
    assert auth_off.problems == [] and "token not checked" in auth_off.checked[-1]


def test_each_check_is_named_when_it_passes_or_fails() -> None:
    accepted = Answers(health=200, anonymous=401, with_token=200, protocol=PROTOCOL_VERSION)
    verdict = judge(URL_CP, accepted, "read")
    assert verdict.checked == [
        "reachable",
        f"protocol {PROTOCOL_VERSION} compatible",
        "token accepted",
    ]
    refused = judge(URL_CP, Answers(health=200, anonymous=401, with_token=401), "read")
    assert "refused the token in token_file (HTTP 401)" in refused.problems[0]
    missing = judge(URL_CP, Answers(health=200, anonymous=401), "absent")
    assert "set token_file" in missing.problems[0]
    old = judge(URL_CP, Answers(health=200, anonymous=200, protocol=-1), "absent")
    assert "speaks protocol -1" in old.problems[0]
    down = judge(URL_CP, Answers(failure="cannot reach it"), "read")
    assert down == Verdict([], ["cannot reach it"])


def test_an_unknown_key_suggests_the_nearest_valid_one() -> None:
    names = {"max_concurrent_runs", "tag_concurrency_limits", "kind"}
    assert unknown_key("max_concurent_runs", names) == (
        "unknown key; did you mean max_concurrent_runs?"
    )
    assert unknown_key("zzz", names) == "unknown key"


def test_config_files_suggest_the_key_meant(tmp_path: Path) -> None:
    path = tmp_path / "control-plane.toml"
    path.write_text("[run_coordinator]\nmax_concurent_runs = 3\n[storag]\n")
    with pytest.raises(ConfigError) as info:
        load_control_plane_config(str(path))
    assert info.value.lines == (
        f"{path}: key 'storag': unknown key; did you mean storage?",
        f"{path}: key 'run_coordinator.max_concurent_runs': unknown key; "
        "did you mean max_concurrent_runs?",
    )
    agent = tmp_path / "agent.toml"
    agent.write_text('control_plane_url = "http://127.0.0.1:8470"\nheartbeat_interval = 5\n')
    with pytest.raises(ConfigError) as info:
        load_agent_config(str(agent))
    assert "did you mean heartbeat_interval_seconds?" in str(info.value)
