"""A Docker daemon of the tests' own, and a worker image built here without a registry.

The daemon runs with no bridge and no iptables rules, its data root, exec root, pid file
and socket in a temporary folder; containers use the network `host` or `none` only.
The image is `docker import`ed from a root file system made of this machine's Python
(the interpreter, its standard library and the shared libraries they link, found with
ldd), the few packages a run worker imports, and this checkout's `agent` and
`protocol`: nothing is pulled. The Docker CLI is used here, in tests only; the agent
itself speaks Docker's HTTP API.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
IMAGE = "fleetrun-test-worker:1"
PYTHONPATH = "/opt/fleetrun"
# What a run worker and the test jobs import besides the standard library.
PACKAGES = ("msgpack", "croniter", "dateutil")
STDLIB_SKIPPED = {"site-packages", "test", "idlelib", "tkinter", "turtledemo", "ensurepip"}
INSTALL_HINT = "as root, run: apt-get install -y docker.io (make test does)"


class UnixHTTPConnection(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float = 30.0) -> None:
        super().__init__("localhost", timeout=timeout)
        self.path = path

    def connect(self) -> None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        self.sock = sock


@dataclass
class Dockerd:
    folder: Path
    process: subprocess.Popen

    @property
    def socket_path(self) -> str:
        return str(self.folder / "docker.sock")

    @property
    def url(self) -> str:
        return f"unix://{self.socket_path}"

    def api(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """Docker's HTTP API, on our socket."""
        conn = UnixHTTPConnection(self.socket_path)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, data, {"Content-Type": "application/json"})
            resp = conn.getresponse()
            raw = resp.read()
            if "json" not in resp.getheader("Content-Type", ""):
                return resp.status, raw.decode(errors="replace")
            return resp.status, json.loads(raw)
        finally:
            conn.close()

    def cli(self, *args: str, input: bytes | None = None) -> str:
        docker = shutil.which("docker")
        assert docker, f"the docker command is missing; {INSTALL_HINT}"
        done = subprocess.run(
            [docker, "-H", self.url, *args], input=input, capture_output=True, timeout=300
        )
        assert done.returncode == 0, done.stderr.decode(errors="replace")
        return done.stdout.decode()

    def containers(self, label: str = "fleetrun.agent") -> list[dict]:
        filters = urllib.parse.quote(json.dumps({"label": [label]}))
        status, found = self.api("GET", f"/containers/json?all=1&filters={filters}")
        assert status == 200, found
        return found

    def remove_all(self) -> list[str]:
        """Remove every container of ours; their names."""
        names = []
        for container in self.containers():
            self.api("DELETE", f"/containers/{container['Id']}?force=1")
            names.append(container["Names"][0].lstrip("/"))
        return names

    def stop(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(60)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        shutil.rmtree(self.folder / "data", ignore_errors=True)


def start_dockerd(folder: Path) -> Dockerd:
    dockerd = shutil.which("dockerd") or "/usr/sbin/dockerd"
    if not os.path.exists(dockerd):
        raise AssertionError(f"the Docker tests need dockerd; {INSTALL_HINT}")
    args = [
        dockerd,
        "--bridge=none",
        "--iptables=false",
        f"--data-root={folder / 'data'}",
        f"--exec-root={folder / 'exec'}",
        f"--pidfile={folder / 'docker.pid'}",
        f"--host=unix://{folder / 'docker.sock'}",
        "--log-level=warn",
    ]
    log = open(folder / "dockerd.log", "wb")
    process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    daemon = Dockerd(folder, process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if process.poll() is not None:
            text = (folder / "dockerd.log").read_text(errors="replace")
            raise AssertionError(f"dockerd exited:\n{text[-3000:]}")
        with contextlib.suppress(OSError):
            if daemon.api("GET", "/_ping")[0] == 200:
                return daemon
        time.sleep(0.1)
    daemon.stop()
    raise AssertionError("dockerd did not answer within 60 s")


def _libraries(paths: list[str]) -> set[str]:
    """The shared libraries that `paths` link, with the dynamic loader."""
    found: set[str] = set()
    for path in paths:
        done = subprocess.run(["ldd", path], capture_output=True, text=True)
        for line in done.stdout.splitlines():
            parts = line.split()
            for part in parts:
                if part.startswith("/") and os.path.exists(part):
                    found.add(part)
    return found


def worker_rootfs() -> bytes:
    """A tar of the image's root file system (see the module's docstring)."""
    import importlib

    python = os.path.realpath(sys.executable)
    stdlib = Path(os.path.dirname(os.__file__))
    buffer = io.BytesIO()
    native = [python]
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add_dir(name: str, mode: int = 0o755) -> None:
            info = tarfile.TarInfo(name.lstrip("/"))
            info.type, info.mode = tarfile.DIRTYPE, mode
            tar.addfile(info)

        add_dir("/tmp", 0o1777)
        tar.add(python, python.lstrip("/"))
        link = tarfile.TarInfo("usr/local/bin/python3")
        link.type, link.linkname = tarfile.SYMTYPE, python
        tar.addfile(link)
        for entry in sorted(stdlib.iterdir()):
            if entry.name not in STDLIB_SKIPPED:
                tar.add(str(entry), str(entry).lstrip("/"))
        native += [str(p) for p in (stdlib / "lib-dynload").glob("*.so")]
        for name in PACKAGES:
            module = importlib.import_module(name)
            source = Path(module.__file__ or "")
            source = source.parent if source.name == "__init__.py" else source
            tar.add(str(source), f"{PYTHONPATH}/{source.name}".lstrip("/"))
            native += [str(p) for p in source.rglob("*.so")] if source.is_dir() else []
        for package in ("agent", "protocol"):
            tar.add(str(REPO / package), f"{PYTHONPATH}/{package}".lstrip("/"))
        for library in sorted(_libraries(native)):
            tar.add(os.path.realpath(library), library.lstrip("/"))
    return buffer.getvalue()


def build_worker_image(daemon: Dockerd, tag: str = IMAGE) -> str:
    daemon.cli(
        "import", "--change", f"ENV PYTHONPATH={PYTHONPATH}", "-", tag, input=worker_rootfs()
    )
    return tag
