"""Security end to end: tokens, TLS, revocation and rotation with real processes, and
slow clients that must not hold the control plane.

Given a control plane with `[auth] enabled = true` (and TLS where the test says so),
tokens made with `fleetrun tokens create --config`, and a real agent with its token
file, when users and agents call it, then only the right token gets in, and secrets
appear nowhere but in the token file.
"""

from __future__ import annotations

import http.client
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlencode, urlsplit

import pytest
import trustme

from tests.conftest import (
    FIXTURES,
    FLEETRUN,
    start_agent,
    start_control_plane,
    wait_for,
    write_control_plane_config,
)

pytestmark = pytest.mark.e2e
GATES = {"gates": FIXTURES / "gate_jobs.py"}
AUTH = "[auth]\nenabled = true\n"


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> Iterator[dict[str, Path]]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    files = {"ca": tmp_path / "ca.pem", "cert": tmp_path / "cert.pem", "key": tmp_path / "key.pem"}
    ca.cert_pem.write_to_path(str(files["ca"]))
    cert.cert_chain_pems[0].write_to_path(str(files["cert"]))
    cert.private_key_pem.write_to_path(str(files["key"]))
    yield files


def fleetrun(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLEETRUN, *args], capture_output=True, text=True, timeout=120, cwd=cwd)


def create_token(config: Path, name: str, kind: str, role: str | None = None) -> str:
    args = ["tokens", "create", "--config", str(config), "--kind", kind, "--name", name]
    result = fleetrun(*args, *(["--role", role] if role else []))
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def secret_of(token: str) -> str:
    return token.split("_", 2)[2]


def test_auth_and_tls_end_to_end(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    # Given tokens made in the database before the control plane starts
    config = write_control_plane_config(tmp_path)
    admin = create_token(config, "root", "user", "admin")
    operator = create_token(config, "deployer", "user", "operator")
    viewer = create_token(config, "dashboard", "user", "viewer")
    agent_token = create_token(config, "worker-1", "agent")
    (tmp_path / "agent.token").write_text(agent_token + "\n")
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    server_tls = f'tls_cert = "{tls_files["cert"]}"\ntls_key = "{tls_files["key"]}"'
    cp = start_control_plane(tmp_path, AUTH, server_extra=server_tls, token=viewer, context=context)
    try:
        assert cp.url.startswith("https://")
        agent_extra = f'token_file = "agent.token"\nca_file = "{tls_files["ca"]}"'
        agent = start_agent(cp, tmp_path, "agent-1", extra=agent_extra)
        try:
            # When an operator submits with the CLI over TLS and waits
            user = ["--url", cp.url, "--token", operator, "--ca-file", str(tls_files["ca"])]
            done = fleetrun(*user, "runs", "submit", "hello", "--wait")
            # Then the run succeeds on the agent that authenticated with its own token
            assert done.returncode == 0, done.stdout + done.stderr
            # and the viewer can read but not submit; no token, or a wrong CA, gets nowhere
            viewer_cli = ["--url", cp.url, "--token", viewer, "--ca-file", str(tls_files["ca"])]
            assert fleetrun(*viewer_cli, "runs", "list").returncode == 0
            refused = fleetrun(*viewer_cli, "runs", "submit", "hello")
            assert refused.returncode == 1 and "403" in refused.stderr
            anonymous = fleetrun("--url", cp.url, "--ca-file", str(tls_files["ca"]), "runs", "list")
            assert anonymous.returncode == 1 and "401" in anonymous.stderr
            untrusted = fleetrun("--url", cp.url, "--token", viewer, "runs", "list")
            assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr
            # tokens list over the API (admin) shows names, kinds, roles and last use only
            listing = fleetrun(
                "--url",
                cp.url,
                "--token",
                admin,
                "--ca-file",
                str(tls_files["ca"]),
                "--json",
                "tokens",
                "list",
            )
            assert listing.returncode == 0, listing.stderr
            assert "worker-1" in listing.stdout and "deployer" in listing.stdout
            assert '"last_used": null' not in listing.stdout.split('"deployer"')[1][:300]
            agents = cp.get("/api/v1/agents")["agents"]
            assert [a["name"] for a in agents] == ["agent-1"]
        finally:
            agent.stop()
            agent_log = agent.log()
    finally:
        cp.stop()
    # Then no secret appears in either process's log or in the database files
    stored = b"".join(p.read_bytes() for p in tmp_path.glob("fleetrun.db*"))
    for token in (admin, operator, viewer, agent_token):
        assert secret_of(token) not in cp.log() and secret_of(token) not in agent_log
        assert secret_of(token).encode() not in stored


# The test offers the server TLS 1.1 on purpose, to see it refused; Python warns that the
# version is deprecated, which is the very reason the server refuses it.
@pytest.mark.filterwarnings("ignore:ssl.TLSVersion.TLSv1_1 is deprecated:DeprecationWarning")
def test_the_agent_verifies_the_certificate(tmp_path: Path, tls_files: dict[str, Path]) -> None:
    server_tls = f'tls_cert = "{tls_files["cert"]}"\ntls_key = "{tls_files["key"]}"'
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    cp = start_control_plane(tmp_path, server_extra=server_tls, context=context)
    try:
        config = tmp_path / "agent.toml"
        config.write_text(f'control_plane_url = "{cp.url}"\nname = "a"\n')
        # Without the CA: refused, never a fallback to http
        check = subprocess.run(
            [*FLEETRUN[:2], "agent.cli", "check-config", "--config", str(config), "--connect"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 2 and "certificate" in check.stderr.lower(), check.stderr
        # With it: reachable
        config.write_text(config.read_text() + f'ca_file = "{tls_files["ca"]}"\n')
        check = subprocess.run(
            [*FLEETRUN[:2], "agent.cli", "check-config", "--config", str(config), "--connect"],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert check.returncode == 0, check.stderr
        # Plain HTTP and TLS 1.1 to the TLS port fail; the server goes on serving
        host, port = cp.url.removeprefix("https://").split(":")
        with socket.create_connection((host, int(port)), timeout=10) as sock:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            assert b"200 OK" not in sock.recv(4096)
        old = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        old.load_verify_locations(str(tls_files["ca"]))
        old.maximum_version = ssl.TLSVersion.TLSv1_1
        with pytest.raises(ssl.SSLError), socket.create_connection((host, int(port)), 10) as raw:
            old.wrap_socket(raw, server_hostname="127.0.0.1")
        assert cp.get("/healthz")["status"] == "ok"
    finally:
        cp.stop()


def test_token_rotation_with_a_run_in_flight(tmp_path: Path) -> None:
    config = write_control_plane_config(tmp_path)
    operator = create_token(config, "ops", "user", "operator")
    (tmp_path / "agent.token").write_text(create_token(config, "agent-1-2025", "agent"))
    cp = start_control_plane(tmp_path, AUTH, token=operator)
    agent = start_agent(cp, tmp_path, "agent-1", GATES, extra='token_file = "agent.token"')
    try:
        gate = tmp_path / "gate"
        run_id = cp.submit("gated", config={"gate": str(gate)})
        wait_for(
            lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED", what="run to start"
        )
        # When the new token is put in the token file and the old one revoked
        (tmp_path / "agent.token").write_text(create_token(config, "agent-1-2026", "agent"))
        revoke = fleetrun("tokens", "revoke", "agent-1-2025", "--config", str(config))
        assert revoke.returncode == 0, revoke.stderr
        wait_for(lambda: "registering with it" in agent.log(), what="the agent to rotate")
        # Then the run goes on and finishes, and later runs work under the new token
        gate.write_text("open")
        assert cp.wait_run(run_id)["status"] == "SUCCESS"
        assert cp.wait_run(cp.submit("quick"))["status"] == "SUCCESS"
        assert [a["status"] for a in cp.get("/api/v1/agents")["agents"]] == ["ONLINE"]
    finally:
        agent.stop()
        cp.stop()


def test_a_revoked_agent_token_ends_that_agents_work(tmp_path: Path) -> None:
    config = write_control_plane_config(tmp_path)
    operator = create_token(config, "ops", "user", "operator")
    (tmp_path / "agent.token").write_text(create_token(config, "a1", "agent"))
    monitoring = "[run_monitoring]\nagent_heartbeat_timeout_seconds = 3\n"
    cp = start_control_plane(tmp_path, AUTH + monitoring, token=operator)
    agent = start_agent(cp, tmp_path, "agent-1", GATES, extra='token_file = "agent.token"')
    try:
        run_id = cp.submit("gated", config={"gate": str(tmp_path / "never")})
        wait_for(
            lambda: cp.get(f"/api/v1/runs/{run_id}")["status"] == "STARTED", what="run to start"
        )
        assert fleetrun("tokens", "revoke", "a1", "--config", str(config)).returncode == 0
        # Then its calls are refused, and the run fails as its agent is lost
        run = cp.wait_run(run_id, timeout=60)
        assert run["status"] == "FAILURE" and "agent lost" in run["status_reason"]
        wait_for(lambda: "revoked_token" in agent.log(), what="the agent to log the refusal")
    finally:
        agent.stop()
        cp.stop()


def test_slow_clients_do_not_hold_the_control_plane(tmp_path: Path) -> None:
    limits = "[limits]\nkeepalive_timeout_seconds = 2\nbody_timeout_seconds = 2\n"
    cp = start_control_plane(tmp_path, limits)
    host, port = cp.url.removeprefix("http://").split(":")
    address = (host, int(port))
    try:
        # Given 200 connections that send half a request header and then nothing
        slow = []
        for _ in range(200):
            sock = socket.create_connection(address, timeout=10)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(sock)
        # and one that promises a body it never sends
        body = socket.create_connection(address, timeout=10)
        body.sendall(
            b"POST /api/v1/runs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b'\r\nContent-Length: 100\r\n\r\n{"job"'
        )
        # When honest clients call meanwhile, then they are served
        for _ in range(20):
            assert cp.get("/healthz")["status"] == "ok"
        # and the slow body gets a 408 naming the limit
        answer = body.recv(4096)
        assert b"408" in answer.split(b"\r\n")[0] and b"body_timeout_seconds" in answer
        body.close()

        # and the dribbling connections are closed by the server (not left for an hour)
        def closed_by_server(sock: socket.socket, deadline: float) -> bool:
            try:
                while True:
                    sock.settimeout(max(0.1, deadline - time.monotonic()))
                    if sock.recv(4096) == b"":
                        return True
            except ConnectionResetError:
                return True
            except TimeoutError:
                return False

        deadline = time.monotonic() + 30
        for sock in slow:
            assert closed_by_server(sock, deadline), "a slow connection was left open"
            sock.close()
        assert cp.get("/healthz")["status"] == "ok"
        assert cp.popen.poll() is None
    finally:
        cp.stop()


def post_form(
    base: str,
    path: str,
    headers: dict[str, str],
    context: ssl.SSLContext | None = None,
    **form: str,
) -> tuple[int, str | None, bytes]:
    """POST a form without following the redirect: (status, Set-Cookie, body)."""
    parts = urlsplit(base)
    assert parts.hostname is not None
    if parts.scheme == "https":
        conn: http.client.HTTPConnection = http.client.HTTPSConnection(
            parts.hostname, parts.port, timeout=30, context=context
        )
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request(
            "POST",
            path,
            urlencode(form),
            {"Content-Type": "application/x-www-form-urlencoded", **headers},
        )
        response = conn.getresponse()
        return response.status, response.getheader("Set-Cookie"), response.read()
    finally:
        conn.close()


def assert_refused(status: int, cookie: str | None, body: bytes, case: str) -> None:
    assert status == 403 and cookie is None, (case, status, cookie, body)
    assert json.loads(body)["error"]["code"] == "cross_origin", (case, body)


def test_sign_in_and_out_only_from_the_control_planes_own_origin(tmp_path: Path) -> None:
    # Given a control plane with auth on and a user token
    config = write_control_plane_config(tmp_path)
    viewer = create_token(config, "watcher", "user", "viewer")
    cp = start_control_plane(tmp_path, AUTH)
    port = urlsplit(cp.url).port
    own = f"http://127.0.0.1:{port}"
    try:
        assert port is not None
        # When a page elsewhere posts the sign-in form (login CSRF: the browser would be
        # signed in as the attacker), then it is refused and no cookie is set
        refused = {
            "Origin: null": {"Origin": "null"},
            "look-alike host": {"Origin": f"http://127.0.0.1:{port}.evil.com"},
            "look-alike subdomain": {"Origin": f"http://127.0.0.1.evil.com:{port}"},
            "another port": {"Origin": f"http://127.0.0.1:{port + 1}"},
            "https, not http": {"Origin": f"https://127.0.0.1:{port}"},
            "another site": {"Origin": "https://evil.example"},
            "garbage": {"Origin": "http://[::1"},
            "Referer elsewhere": {"Referer": f"http://127.0.0.1:{port}.evil.com/login"},
            "Origin wins over Referer": {"Origin": "https://evil.example", "Referer": own + "/"},
            "Host names another": {"Host": "evil.example", "Origin": own},
        }
        for case, headers in refused.items():
            answer = post_form(cp.url, "/ui/login", headers, token=viewer, next="/ui/runs")
            assert_refused(*answer, case)
            assert_refused(*post_form(cp.url, "/ui/logout", headers), case)
        # and from the control plane's own pages, from clients that send neither header
        # (curl), and through a proxy that terminates TLS, it signs in
        accepted = {
            "same origin": {"Origin": own},
            "same origin, Referer only": {"Referer": own + "/ui/login?next=%2Fui%2Fagents"},
            "neither header": {},
            "by host name": {"Host": f"localhost:{port}", "Origin": f"http://localhost:{port}"},
            "TLS proxy": {
                "Host": "fleet.example",
                "X-Forwarded-Proto": "https",
                "Origin": "https://fleet.example",
            },
        }
        for case, headers in accepted.items():
            status, cookie, _ = post_form(cp.url, "/ui/login", headers, token=viewer)
            assert status == 303 and cookie and "fleetrun_session=fru_" in cookie, case
            status, cookie, _ = post_form(cp.url, "/ui/logout", headers)
            assert status == 303 and cookie and 'fleetrun_session=""' in cookie, case
    finally:
        cp.stop()


def test_sign_in_over_tls_takes_only_the_https_origin(
    tmp_path: Path, tls_files: dict[str, Path]
) -> None:
    config = write_control_plane_config(tmp_path)
    viewer = create_token(config, "watcher", "user", "viewer")
    context = ssl.create_default_context(cafile=str(tls_files["ca"]))
    server_tls = f'tls_cert = "{tls_files["cert"]}"\ntls_key = "{tls_files["key"]}"'
    cp = start_control_plane(tmp_path, AUTH, server_extra=server_tls, context=context)
    try:
        https_origin = {"Origin": cp.url}
        status, cookie, _ = post_form(cp.url, "/ui/login", https_origin, context, token=viewer)
        assert status == 303 and cookie and "Secure" in cookie
        http_origin = {"Origin": cp.url.replace("https://", "http://")}
        assert_refused(*post_form(cp.url, "/ui/login", http_origin, context, token=viewer), "http")
    finally:
        cp.stop()
