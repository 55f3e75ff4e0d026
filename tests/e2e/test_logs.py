"""Log lines of both processes: `--log-format json` gives one JSON object per line, and
every line about a run names the run and the agent."""

from __future__ import annotations

import base64
import json
import secrets
import socket
from pathlib import Path

import pytest

from tests.conftest import (
    FIXTURES,
    free_port,
    start_agent,
    start_control_plane,
    wait_for,
    write_control_plane_config,
)
from tests.e2e.test_security import create_token, fleetrun, secret_of

pytestmark = pytest.mark.e2e
MONITOR = {"monitor": FIXTURES / "monitor_jobs.py"}


def json_lines(path: Path) -> list[dict]:
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    return [json.loads(line) for line in lines]  # fails on any line that is not JSON


def test_json_logs_name_the_run_and_the_agent(tmp_path: Path) -> None:
    json_flag = ("--log-format", "json")
    cp = start_control_plane(
        tmp_path,
        "[run_monitoring]\nagent_heartbeat_timeout_seconds = 3\n[run_retries]\nmax_retries = 1\n",
        extra_args=json_flag,
    )
    agent = start_agent(cp, tmp_path, "agent-1", MONITOR, extra_args=json_flag)
    try:
        # a run that crashes its worker once: the agent logs it, the control plane retries
        run_id = cp.submit("fail_once", config={"dir": str(tmp_path)})
        run = cp.wait_run(run_id)
        retry = wait_for(
            lambda: [r for r in cp.get("/api/v1/runs")["runs"] if r["parent_run_id"] == run_id],
            what="the retry",
        )
        assert cp.wait_run(retry[0]["run_id"])["status"] == "SUCCESS"
        assert run["status"] == "FAILURE"
    finally:
        agent.stop()
        cp.stop()
    agent_lines = json_lines(agent.log_path)
    cp_lines = json_lines(cp.log_path)
    assert all({"time", "level", "logger", "message"} <= line.keys() for line in agent_lines)
    # every agent line names the agent; every line that mentions a run carries its id
    assert all(line["agent"] == "agent-1" for line in agent_lines)
    for line in agent_lines + cp_lines:
        mentioned = {rid for rid in (run_id, retry[0]["run_id"]) if rid in line["message"]}
        if mentioned:
            assert line.get("run_id") in mentioned, line
    launched = [line for line in agent_lines if line["message"].startswith("launching run")]
    assert {line["run_id"] for line in launched} == {run_id, retry[0]["run_id"]}
    retried = [line for line in cp_lines if line.get("run_id") == run_id]
    assert retried and all(line.get("agent") for line in retried)


# --- no secret in any log line -----------------------------------------------------------


def windows(secret: str, size: int = 10) -> list[str]:
    """Every stretch of `size` characters of a secret: none may show in a log, whole or cut."""
    return [secret[i : i + size] for i in range(len(secret) - size + 1)]


def exchange(address: tuple[str, int], raw: bytes) -> bytes:
    """Send `raw` on a new connection; the answer's status line (b"" if the server reset it)."""
    with socket.create_connection(address, timeout=10) as sock:
        try:
            sock.sendall(raw)
        except OSError:  # a huge header: the server answers and closes before it is all sent
            pass
        try:
            return sock.recv(4096).split(b"\r\n", 1)[0]
        except ConnectionResetError:
            return b""


def header_cases(token: bytes, opaque: bytes) -> dict[str, bytes]:
    """Header lines carrying a secret, every way a client may get them wrong."""
    cut = len(token) - 20  # splits the secret part of the token
    head, tail = token[:cut], token[cut:]
    basic = base64.b64encode(b"alice:" + opaque)
    return {
        "control char after": b"Authorization: Bearer " + token + b"\x01",
        "control char inside": b"Authorization: Bearer " + head + b"\x1f" + tail,
        "NUL": b"Authorization: Bearer " + token + b"\x00rest",
        "DEL": b"Authorization: Bearer " + token + b"\x7f",
        "CR without LF inside": b"Authorization: Bearer " + head + b"\r" + tail,
        "CR without LF after": b"Authorization: Bearer " + token + b"\rX-Next: 1",
        "bare LF": b"Authorization: Bearer " + token + b"\nX-Next: 1",
        "obs-fold": b"Authorization: Bearer " + head + b"\r\n " + tail,
        "obs-fold tab": b"Authorization: Bearer\r\n\t" + token,
        "latin-1 after": b"Authorization: Bearer " + token + b"\xe9",
        "latin-1 before": b"Authorization: Bearer \xff\xfe" + token,
        "UTF-8 after": b"Authorization: Bearer " + token + "é".encode(),
        "64 KiB after": b"Authorization: Bearer " + token + b"A" * 65536,
        "64 KiB before": b"Authorization: Bearer " + b"A" * 65536 + token,
        "duplicated, one bad": b"Authorization: Bearer %s\r\nAuthorization: Bearer %s\x02"
        % (token, token),
        "duplicated, both parse": b"Authorization: Bearer fru_0000000000000000_wrong\r\n"
        b"Authorization: Bearer " + token,
        "lower case": b"authorization: bearer " + token + b"\x03",
        "upper case, no space": b"AUTHORIZATION:BEARER " + token + b"\x04",
        "no colon": b"Authorization Bearer " + token,
        "space before colon": b"Authorization : Bearer " + token,
        "as a header name": token + b"\x01: x",
        "cookie": b"Cookie: fleetrun_session=" + token + b"\x01",
        "cookie, cut": b"Cookie: theme=dark; fleetrun_session=" + head + b"\x01" + tail,
        "opaque bearer": b"Authorization: Bearer " + opaque + b"\x01",
        "basic": b"Authorization: Basic " + basic + b"\x00",
        "proxy": b"Proxy-Authorization: Bearer " + opaque + b"\x05",
        "api key": b"X-Api-Key: " + opaque + b"\x06",
    }


def request_line_cases(token: bytes, host: bytes) -> dict[str, bytes]:
    """Whole requests with the secret in the request line, a pipelined method or a body."""
    end = b"Host: %s\r\n\r\n" % host
    return {
        "query, control char": b"GET /api/v1/runs?token=%s\x01 HTTP/1.1\r\n%s" % (token, end),
        "query, space": b"GET /api/v1/runs?token=%s x HTTP/1.1\r\n%s" % (token, end),
        "query, valid": b"GET /api/v1/runs?token=%s HTTP/1.1\r\n%s" % (token, end),
        "query, too long": b"GET /ui/runs?token=%s%s HTTP/1.1\r\n%s" % (token, b"A" * 9000, end),
        "path": b"GET /ui/runs/%s HTTP/1.1\r\n%s" % (token, end),
        "pipelined method": b"GET /healthz HTTP/1.1\r\n%s%s\x01 /agent/v1/poll HTTP/1.1\r\n%s"
        % (end, token, end),
        "chunk size": b"POST /agent/v1/poll HTTP/1.1\r\nTransfer-Encoding: chunked\r\n%s%s\r\n"
        % (end, token),
    }


@pytest.mark.parametrize("log_format", ["text", "json"])
def test_no_secret_reaches_the_log_whatever_the_request(tmp_path: Path, log_format: str) -> None:
    # Given a control plane with auth on, a user and an agent token, and a foreign secret
    config = write_control_plane_config(tmp_path)
    user = create_token(config, "alice", "user", "admin")
    agent = create_token(config, "worker-1", "agent")
    opaque = secrets.token_urlsafe(24)
    cp = start_control_plane(
        tmp_path, "[auth]\nenabled = true\n", token=user, extra_args=("--log-format", log_format)
    )
    host, port = cp.url.removeprefix("http://").split(":")
    address = (host, int(port))
    answers: dict[str, bytes] = {}
    try:
        # When clients send malformed requests with those secrets to API, agent and UI routes
        routes = {"GET /api/v1/runs": user, "POST /agent/v1/poll": agent, "GET /ui/runs": user}
        for route, token in routes.items():
            start = f"{route} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: 0\r\n".encode()
            for name, line in header_cases(token.encode(), opaque.encode()).items():
                answers[f"{route}, {name}"] = exchange(address, start + line + b"\r\n\r\n")
        for name, raw in request_line_cases(user.encode(), f"{host}:{port}".encode()).items():
            answers[name] = exchange(address, raw)
        # Then each gets an answer (a huge header may be cut off by a reset), and the
        # control plane goes on serving
        for name, status in answers.items():
            assert status.startswith(b"HTTP/1.") or "64 KiB" in name, (name, status)
            assert not status.startswith(b"HTTP/1.1 5"), (name, status)  # a 4xx, never a 5xx
        assert cp.get("/healthz")["status"] == "ok"
    finally:
        cp.stop()
    # and no secret, nor any piece of one, is in its log, though the errors are
    log = cp.log()
    assert "Error handling request" in log and "aiohttp.http_exceptions" in log
    for secret in (secret_of(user), secret_of(agent), opaque):
        leaked = [piece for piece in windows(secret) if piece in log]
        assert not leaked, f"{leaked[0]!r} of a secret is in the log:\n{log}"


# --- no storage password in any output ----------------------------------------------------

PASSWORD = "S3cretPassw0rd"


def with_password(url: str, password: str = PASSWORD) -> str:
    """The test server's URL with a password (it trusts local connections, so any works)."""
    scheme, rest = url.split("://", 1)
    user, _, where = rest.partition("@")
    return f"{scheme}://{user.split(':')[0]}:{password}@{where}"


def assert_no_password(output: str, password: str = PASSWORD) -> None:
    leaked = [piece for piece in windows(password, 6) if piece in output]
    assert not leaked, f"{leaked[0]!r} of the password is in:\n{output}"


def test_serve_and_migrate_print_the_storage_url_masked(tmp_path: Path, postgres_url: str) -> None:
    url = with_password(postgres_url)
    config = write_control_plane_config(tmp_path, storage_url=url)
    migrated = fleetrun("migrate", "--config", str(config))
    assert migrated.returncode == 0, migrated.stderr
    assert "postgres:***@127.0.0.1" in migrated.stdout
    assert_no_password(migrated.stdout + migrated.stderr)
    copied = fleetrun("--json", "migrate", "--from", url, "--to", f"sqlite:///{tmp_path}/copy.db")
    assert copied.returncode == 0 and '"from": "postgresql://postgres:***@' in copied.stdout
    assert_no_password(copied.stdout + copied.stderr)
    cp = start_control_plane(tmp_path, storage_url=url)
    try:
        assert cp.get("/readyz")["status"] == "ready"
    finally:
        cp.stop()
    assert "(storage postgresql://postgres:***@127.0.0.1:5432/" in cp.log()
    assert_no_password(cp.log())


def test_storage_failures_print_the_url_masked(tmp_path: Path) -> None:
    down = f"postgresql://postgres:{PASSWORD}@127.0.0.1:{free_port()}/test"
    slash = f"postgresql://postgres:{PASSWORD[:6]}/{PASSWORD[6:]}@127.0.0.1:5432/test"
    bad_port = f"postgresql://postgres:{PASSWORD}@127.0.0.1:54x32/test"
    cases = {
        "serve, nothing listens": (["serve"], down, 1, "cannot connect to"),
        "serve, unescaped / in the password": (["serve"], slash, 2, "percent-encode"),
        "serve, port not a number": (["serve"], bad_port, 1, "54x32"),
        "serve, unknown scheme": (["serve"], down.replace("postgresql", "mysql"), 2, "mysql"),
        "migrate, nothing listens": (["migrate"], down, 1, "cannot connect to"),
        "migrate, unescaped /": (["migrate"], slash, 2, "percent-encode"),
        "migrate --to, unescaped /": (["migrate", "--to", slash], "", 1, "percent-encode"),
        "migrate --to, unknown scheme": (["migrate", "--to", "mysql" + down[10:]], "", 1, "mysql"),
        "migrate --from, nothing listens": (
            ["migrate", "--from", down, "--to", f"sqlite:///{tmp_path}/x.db"],
            "",
            1,
            "cannot",
        ),
        "tokens list, nothing listens": (["tokens", "list"], down, 1, "cannot connect to"),
    }
    for name, (args, url, code, says) in cases.items():
        folder = tmp_path / name.replace(" ", "_").replace(",", "").replace("/", "")
        folder.mkdir()
        config = write_control_plane_config(folder, storage_url=url or "sqlite:///x.db")
        result = fleetrun(*args, *(["--config", str(config)] if url else []))
        output = result.stdout + result.stderr
        assert result.returncode == code and says in output, (name, output)
        assert "Traceback" not in output, (name, output)
        assert ":***@" in output or says == "percent-encode", (name, output)  # URL quoted
        assert_no_password(output)
