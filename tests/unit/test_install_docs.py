"""The install docs, the systemd units and the TLS script agree with each other and with
the software: the directories the units make are the ones the documented configs name,
the documented configs load, the units' commands parse, and user docs carry no
internal references."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_agent_config
from control_plane.cli.parser import build_parser
from control_plane.config import load_control_plane_config
from tests.conftest import REPO

BUILD = REPO / "build"
DOCS = REPO / "docs"
AGENT_UNIT = BUILD / "fleetrun-agent.service"
CONTROL_PLANE_UNIT = BUILD / "fleetrun-control-plane.service"


def unit_settings(path: Path) -> dict[str, list[str]]:
    """A unit file's settings, every value of each key (systemd allows repeats)."""
    settings: dict[str, list[str]] = {}
    for line in path.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, value = line.split("=", 1)
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def toml_block(doc: Path, first_line: str) -> str:
    """The fenced toml block of `doc` that starts with `first_line`."""
    blocks = re.findall(r"```toml\n(.*?)```", doc.read_text(), re.DOTALL)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"{doc.name}: one toml block starting {first_line!r}"
    return found[0]


def test_the_agent_unit_makes_the_state_dir_the_documented_agent_toml_names(
    tmp_path: Path,
) -> None:
    unit = unit_settings(AGENT_UNIT)
    assert unit["StateDirectory"] == ["fleetrun-agent"]
    assert unit["KillMode"] == ["process"]
    assert " run --handoff --config /etc/fleetrun/agent.toml" in unit["ExecStart"][0]
    documented = toml_block(DOCS / "install.md", "# /etc/fleetrun/agent.toml")
    (tmp_path / "agent.toml").write_text(documented)
    config = load_agent_config(str(tmp_path / "agent.toml"))
    assert config.state_dir == "/var/lib/fleetrun-agent"


def test_the_control_plane_unit_makes_the_folder_of_the_documented_sqlite_file(
    tmp_path: Path,
) -> None:
    unit = unit_settings(CONTROL_PLANE_UNIT)
    assert unit["StateDirectory"] == ["fleetrun"]
    assert unit["RestartPreventExitStatus"] == ["2"]  # a newer schema, a config error
    command = unit["ExecStart"][0].split()
    assert command[0].endswith("/fleetrun")
    args = build_parser().parse_args(command[1:])
    assert (args.command, args.config) == ("serve", "/etc/fleetrun/control-plane.toml")
    documented = toml_block(DOCS / "install.md", "# /etc/fleetrun/control-plane.toml")
    (tmp_path / "control-plane.toml").write_text(documented)
    config = load_control_plane_config(str(tmp_path / "control-plane.toml"))
    assert config.storage.url == "sqlite:////var/lib/fleetrun/fleetrun.db"


@pytest.mark.parametrize("unit", [AGENT_UNIT, CONTROL_PLANE_UNIT], ids=lambda p: p.name)
def test_systemd_accepts_the_unit(unit: Path, tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    binaries = ("/usr/local/bin/fleetrun-agent", "/opt/fleetrun/bin/fleetrun")
    text = unit.read_text()
    for binary in binaries:  # verify checks that the commands exist
        text = text.replace(binary, sys.executable)
    (tmp_path / unit.name).write_text(text)
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / unit.name)], capture_output=True, text=True, timeout=60
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_the_tls_recipe_in_the_docs_is_the_script_the_tests_run() -> None:
    script = (BUILD / "make-tls-certs.sh").read_text()
    recipe = script.split("# recipe start\n")[1].split("# recipe end\n")[0]
    assert "openssl x509 -req -in server.csr -CA ca.pem" in recipe
    assert recipe in (DOCS / "security.md").read_text()


INTERNAL_REFERENCE = re.compile(r"\(#\d+\)|\bissues? \d+", re.IGNORECASE)


@pytest.mark.parametrize(
    "doc", [REPO / "README.md", *sorted(DOCS.glob("*.md"))], ids=lambda p: p.name
)
def test_user_docs_name_no_issue_numbers(doc: Path) -> None:
    found = INTERNAL_REFERENCE.findall(doc.read_text())
    assert found == [], f"{doc.name}: {found}"
