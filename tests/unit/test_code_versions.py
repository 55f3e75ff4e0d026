"""Code versions on the agent: version folders (local copies, git commits), which ones
are removed, which version a launch runs, and which file changes ask for a reload."""

from __future__ import annotations

import asyncio
import os
import subprocess
from pathlib import Path

import pytest

from agent.codeversions import (
    CodeFetchError,
    code_files,
    mark_state_dir,
    prune,
    snapshot_local,
    to_remove,
    update_git,
    version_of,
    versions_held,
)
from agent.config import CodeLocationConfig
from agent.reloading import _changed, choose_version
from protocol.messages import LaunchRun
from protocol.tags import CODE_VERSION_TAG


def local(folder: Path, include: tuple[str, ...] = ("*.py",)) -> CodeLocationConfig:
    return CodeLocationConfig(
        name="loc",
        python_file=str(folder / "defs.py"),
        working_directory=str(folder),
        include=list(include),
    )


def test_a_local_version_is_a_copy_named_by_its_content(tmp_path: Path) -> None:
    code, state = tmp_path / "code", tmp_path / "state"
    (code / "pkg" / "__pycache__").mkdir(parents=True)
    (code / ".venv").mkdir()
    (code / "defs.py").write_text("A = 1\n")
    (code / "pkg" / "util.py").write_text("B = 2\n")
    (code / "pkg" / "__pycache__" / "util.py").write_text("cached\n")
    (code / ".venv" / "x.py").write_text("hidden\n")
    (code / "data.csv").write_text("1,2\n")
    loc = local(code)
    first = snapshot_local(loc, str(state))
    assert snapshot_local(loc, str(state)) == first  # same content, same version
    loaded = version_of(loc, str(state), first)
    assert loaded is not None and loaded.spec.code_directory == loaded.folder
    assert loaded.spec.python_file == os.path.join(loaded.folder, "defs.py")
    assert loaded.working_directory == str(code)  # runs still work in the location's folder
    assert sorted(code_files(loaded.folder, ["*"])) == ["defs.py", os.path.join("pkg", "util.py")]
    (code / "pkg" / "util.py").write_text("B = 3\n")
    second = snapshot_local(loc, str(state))
    assert second != first and versions_held(str(state), "loc") == [second, first]
    with_data = snapshot_local(local(code, include=("*.py", "*.csv")), str(state))
    assert with_data not in (first, second)
    assert (Path(str(state)) / "code" / "loc" / with_data / "data.csv").read_text() == "1,2\n"


def test_the_state_dir_inside_the_code_folder_is_not_code(tmp_path: Path) -> None:
    (tmp_path / "defs.py").write_text("A = 1\n")
    state = tmp_path / "fleetrun-state" / "a1"
    state.mkdir(parents=True)
    (state / "left.py").write_text("not code\n")
    version = snapshot_local(local(tmp_path), str(state))
    assert code_files(str(state / "code" / "loc" / version), ["*.py"]) == ["defs.py"]


def test_a_missing_folder_is_a_load_error(tmp_path: Path) -> None:
    with pytest.raises(CodeFetchError, match="does not exist"):
        snapshot_local(local(tmp_path / "nope"), str(tmp_path / "state"))


def test_old_versions_go_unless_kept_or_in_use(tmp_path: Path) -> None:
    assert to_remove(["v5", "v4", "v3", "v2", "v1"], {"v5", "v1"}, 2) == ["v2"]
    assert to_remove(["v3", "v2", "v1"], {"v3"}, 0) == ["v2", "v1"]
    assert to_remove(["v1"], {"v1"}, 0) == []
    code, state = tmp_path / "code", str(tmp_path / "state")
    code.mkdir()
    loc = local(code)
    made = []
    for n in range(4):
        (code / "defs.py").write_text(f"A = {n}\n")
        made.append(snapshot_local(loc, state))
    assert prune(state, "loc", {made[3], made[0]}, 1) == [made[1]]
    assert versions_held(state, "loc") == [made[3], made[2], made[0]]


def launch(code_version: str = "", tags: dict[str, str] | None = None) -> LaunchRun:
    return LaunchRun("r1", "etl", "loc", 1, tags=tags or {}, code_version=code_version)


def test_which_version_a_launch_runs(tmp_path: Path) -> None:
    code, state = tmp_path / "code", str(tmp_path / "state")
    code.mkdir()
    loc = local(code)
    (code / "defs.py").write_text("A = 1\n")
    old = snapshot_local(loc, state)
    (code / "defs.py").write_text("A = 2\n")
    new = snapshot_local(loc, state)
    held = {v: version_of(loc, state, v) for v in (old, new)}
    current, previous = held[new], held[old]
    assert current is not None and previous is not None
    versions = {k: v for k, v in held.items() if v is not None}
    assert choose_version("loc", current, launch(), versions, "a1").version == current
    parent = choose_version("loc", current, launch(old), versions, "a1")
    assert parent.version == previous and "as its parent run did" in (parent.note or "")
    gone = choose_version("loc", current, launch("feed"), versions, "a1")
    assert gone.version == current and "no longer on agent a1" in (gone.note or "")
    pinned = choose_version("loc", current, launch(tags={CODE_VERSION_TAG: old}), versions, "a1")
    assert pinned.version == previous and pinned.refusal is None
    missing = choose_version(
        "loc", current, launch(tags={CODE_VERSION_TAG: "feed"}), versions, "a1"
    )
    assert missing.version is None and CODE_VERSION_TAG in (missing.refusal or "")
    none = choose_version("loc", None, launch(), {}, "a1")
    assert none.version is None and "no version that loads" in (none.refusal or "")


def test_only_changes_to_code_files_ask_for_a_reload(tmp_path: Path) -> None:
    code = tmp_path / "code"
    loc = local(code, include=("*.py", "*.sql"))
    state = str(tmp_path / "code" / "state")
    assert _changed([loc], {str(code / "defs.py")}, state) == ["loc"]
    assert _changed([loc], {str(code / "sub" / "q.sql")}, state) == ["loc"]
    for path in (
        code / "notes.txt",
        code / "__pycache__" / "defs.py",
        code / ".git" / "x.py",
        code / "state" / "spool.py",
        tmp_path / "elsewhere.py",
    ):
        assert _changed([loc], {str(path)}, state) == [], path


def git(repo: Path, *args: str) -> str:
    env = {
        **os.environ,
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@example.invalid",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@example.invalid",
    }
    done = subprocess.run(
        ["git", "-C", str(repo), *args], capture_output=True, text=True, env=env, check=True
    )
    return done.stdout.strip()


def test_a_git_version_is_the_commit_its_ref_names(tmp_path: Path) -> None:
    repo, state = tmp_path / "repo", str(tmp_path / "state")
    (repo / "sub").mkdir(parents=True)
    git(repo, "init", "-q", "-b", "main")
    (repo / "sub" / "defs.py").write_text("A = 1\n")
    (repo / "top.py").write_text("T = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "one")
    git(repo, "tag", "v1")
    first = git(repo, "rev-parse", "HEAD")
    loc = CodeLocationConfig(
        name="g", python_file="defs.py", git=str(repo), ref="main", subdirectory="sub"
    )

    def fetch(loc: CodeLocationConfig, state: str) -> str:
        return asyncio.run(update_git(loc, state))

    assert fetch(loc, state) == first
    loaded = version_of(loc, state, first)
    assert loaded is not None and loaded.spec.python_file is not None
    assert Path(loaded.spec.python_file).read_text() == "A = 1\n"
    assert not (Path(loaded.folder) / "top.py").exists()  # only the subdirectory
    (repo / "sub" / "defs.py").write_text("A = 2\n")
    git(repo, "commit", "-q", "-am", "two")
    second = git(repo, "rev-parse", "HEAD")
    assert fetch(loc, state) == second
    assert Path(state, "code", "g", first, "sub", "defs.py").read_text() == "A = 1\n"
    tagged = CodeLocationConfig(name="g", python_file="defs.py", git=str(repo), ref="v1")
    assert fetch(tagged, state) == first
    wrong = CodeLocationConfig(name="g", python_file="defs.py", git=str(repo), ref="nope")
    with pytest.raises(CodeFetchError, match="names no commit"):
        fetch(wrong, state)
    nowhere = CodeLocationConfig(name="h", python_file="d.py", git=str(tmp_path / "none"))
    with pytest.raises(CodeFetchError, match="git clone failed"):
        fetch(nowhere, state)


def test_git_keys_are_checked(tmp_path: Path) -> None:
    problems = list(
        CodeLocationConfig(name="g", python_file="d.py", ref="main", subdirectory="../x").problems()
    )
    assert {p.field for p in problems} >= {"ref", "subdirectory"}
    bad = CodeLocationConfig(name="g", python_file="d.py", git="--upload-pack=x")
    assert "git" in {p.field for p in bad.problems()}
    outside = CodeLocationConfig(name="g", python_file="/etc/d.py", git="https://x.invalid/r")
    assert "python_file" in {p.field for p in outside.problems()}


def test_another_agents_state_dir_in_the_code_folder_is_not_code(tmp_path: Path) -> None:
    """Agents whose state dirs lie in a location's folder neither copy nor watch the
    versions the others keep there."""
    (tmp_path / "defs.py").write_text("A = 1\n")
    mine, theirs = tmp_path / "fleetrun-state" / "a1", tmp_path / "fleetrun-state" / "a2"
    mark_state_dir(str(theirs))
    (theirs / "code" / "loc" / "abc").mkdir(parents=True)
    (theirs / "code" / "loc" / "abc" / "defs.py").write_text("A = 0\n")
    version = snapshot_local(local(tmp_path), str(mine))
    assert code_files(str(mine / "code" / "loc" / version), ["*.py"]) == ["defs.py"]
    copy = theirs / "code" / "loc" / "abc" / "defs.py"
    assert _changed([local(tmp_path)], {str(copy)}, str(mine)) == []
    assert _changed([local(tmp_path)], {str(tmp_path / "defs.py")}, str(mine)) == ["loc"]


def test_a_git_version_larger_than_a_pipe_read_comes_whole(tmp_path: Path) -> None:
    repo, state = tmp_path / "repo", str(tmp_path / "state")
    repo.mkdir()
    git(repo, "init", "-q", "-b", "main")
    blob = os.urandom(3 * 1024 * 1024)
    (repo / "data.bin").write_bytes(blob)
    (repo / "defs.py").write_text("A = 1\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", "big")
    loc = CodeLocationConfig(name="g", python_file="defs.py", git=str(repo))
    commit = asyncio.run(update_git(loc, state))
    assert Path(state, "code", "g", commit, "data.bin").read_bytes() == blob
