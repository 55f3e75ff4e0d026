"""Versions of a code location on this agent: each one a folder of its own, never changed
once made, so that a run keeps the code it started with whatever happens next.

    <state_dir>/code/<location>/
      <version>/     one version's files: a copy of a local location's code files (the
                     version is a hash of their content), or a git commit's tree (the
                     version is the commit)
      repo.git/      a git location's bare clone, fetched on each update
      .tmp-*         a version being made: renamed into place whole (a run never sees
                     half of one), removed if the agent died meanwhile

A local location's code is the folder holding its `python_file` (for a `module`: its
`working_directory`), recursively, the files whose names match `include` (hidden
folders, `__pycache__` and virtualenvs are passed by). Its workers still run in its
`working_directory`, with the version's folder first on `sys.path`: data files are
read where they are, code comes from the copy.

Old versions are removed (`prune`) unless they are current, used by a run this agent
holds, or among the `keep_versions` newest others; so disk use is bounded by the
number of versions and the size limits below.
"""

from __future__ import annotations

import asyncio
import fnmatch
import hashlib
import io
import os
import shutil
import tarfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from agent.config import CodeLocationConfig
from agent.errors import AgentError
from protocol.messages import LocationSpec

MAX_FILES = 20_000  # a location's code files, at most
MAX_BYTES = 256 * 1024 * 1024  # a version's size, at most
GIT_TIMEOUT_SECONDS = 300.0
REPO = "repo.git"
TEMPORARY = ".tmp-"
# In every agent's state dir: what is below it is never a location's code, so agents
# whose state dirs lie in a location's folder do not copy (and watch) each other's.
STATE_MARKER = ".fleetrun-state"


class CodeFetchError(AgentError):
    """A version of a code location could not be made (files unreadable, too large, or
    git failed); the message says why."""


@dataclass(frozen=True)
class LocationVersion:
    """One version of a code location, as its workers load it."""

    name: str
    version: str
    folder: str  # the version's own copy
    executable: str
    working_directory: str  # where its workers run
    spec: LocationSpec


def code_folder(loc: CodeLocationConfig) -> str:
    """A local location's code: the folder of its python_file, else its working_directory."""
    if loc.python_file is not None:
        return os.path.dirname(loc.python_file)
    return loc.working_directory


def location_dir(state_dir: str, name: str) -> Path:
    return Path(state_dir) / "code" / name


def mark_state_dir(state_dir: str) -> None:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    Path(state_dir, STATE_MARKER).touch()


def _skipped_dir(path: str, name: str) -> bool:
    return (
        name.startswith(".")
        or name == "__pycache__"
        or os.path.exists(os.path.join(path, name, "pyvenv.cfg"))
        or os.path.exists(os.path.join(path, name, STATE_MARKER))
    )


def in_skipped_dir(folder: str, path: str) -> bool:
    """Whether `path` (below `folder`) lies in a folder that holds no code."""
    parent = os.path.dirname(path)
    while len(parent) > len(folder) and parent.startswith(folder + os.sep):
        if _skipped_dir(os.path.dirname(parent), os.path.basename(parent)):
            return True
        parent = os.path.dirname(parent)
    return False


def code_files(folder: str, include: list[str], skip: str = "") -> list[str]:
    """The relative paths of the location's code files, sorted; `skip`: a folder not to
    enter (the agent's state dir). CodeFetchError past MAX_FILES or MAX_BYTES."""
    found: list[str] = []
    size = 0
    skip = os.path.abspath(skip) if skip else ""
    for path, dirs, files in os.walk(folder):
        dirs[:] = sorted(
            d for d in dirs if not _skipped_dir(path, d) and os.path.join(path, d) != skip
        )
        for name in files:
            if not any(fnmatch.fnmatch(name, pattern) for pattern in include):
                continue
            full = os.path.join(path, name)
            if not os.path.isfile(full):
                continue
            found.append(os.path.relpath(full, folder))
            size += os.path.getsize(full)
            if len(found) > MAX_FILES or size > MAX_BYTES:
                raise CodeFetchError(
                    f"{folder} holds more than {MAX_FILES} code files or {MAX_BYTES >> 20} MiB "
                    "of them: give the location a folder of its own"
                )
    return sorted(found)


def hash_files(folder: str, files: list[str]) -> str:
    """The content version of `files` (paths and bytes) under `folder`."""
    digest = hashlib.sha256()
    for rel in files:
        with open(os.path.join(folder, rel), "rb") as fh:
            content = hashlib.sha256(fh.read()).hexdigest()
        digest.update(f"{rel}\0{content}\n".encode())
    return digest.hexdigest()[:16]


def _new_temporary(parent: Path) -> Path:
    parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    folder = parent / f"{TEMPORARY}{uuid.uuid4().hex[:12]}"
    folder.mkdir(mode=0o700)
    return folder


def _move_into_place(temporary: Path, final: Path) -> None:
    """Rename a finished version into place; if it exists already (the same content
    again), keep that one and mark it the newest."""
    try:
        os.rename(temporary, final)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        if not final.is_dir():
            raise
        os.utime(final)


def snapshot_local(loc: CodeLocationConfig, state_dir: str) -> str:
    """Copy a local location's code files into a new version folder; the version. The
    hash is taken of the copy, so the version names exactly what the folder holds even
    if the files change while they are copied."""
    source = code_folder(loc)
    if not os.path.isdir(source):
        raise CodeFetchError(f"the folder {source} of code location {loc.name} does not exist")
    try:
        files = code_files(source, loc.include, skip=state_dir)
        parent = location_dir(state_dir, loc.name)
        temporary = _new_temporary(parent)
        try:
            for rel in files:
                target = temporary / rel
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(os.path.join(source, rel), target)
            version = hash_files(str(temporary), files)
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
    except OSError as exc:
        raise CodeFetchError(f"cannot copy the files of code location {loc.name}: {exc}") from None
    _move_into_place(temporary, parent / version)
    return version


def _git_env() -> dict[str, str]:
    """Never ask anyone for a password: fail instead."""
    return {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_ASKPASS": "true"}


def _git_config(loc: CodeLocationConfig) -> list[str]:
    """Credentials from the location's file only (git's credential store format)."""
    if not loc.credentials_file:
        return []
    return [
        "-c",
        "credential.helper=",
        "-c",
        f"credential.helper=store --file={loc.credentials_file}",
    ]


async def _git(loc: CodeLocationConfig, *args: str, limit: int = 1 << 20) -> bytes:
    """Run git; its stdout (CodeFetchError with its stderr if it fails or says more
    than `limit` bytes)."""
    try:
        proc = await asyncio.create_subprocess_exec(
            "git",
            *_git_config(loc),
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=_git_env(),
            start_new_session=True,
        )
    except OSError as exc:
        raise CodeFetchError(f"cannot run git: {exc}") from None
    assert proc.stdout is not None and proc.stderr is not None
    errors = asyncio.ensure_future(proc.stderr.read())
    out = bytearray()
    try:
        async with asyncio.timeout(GIT_TIMEOUT_SECONDS):
            while chunk := await proc.stdout.read(1 << 20):
                out += chunk
                if len(out) > limit:
                    proc.kill()
                    raise CodeFetchError(
                        f"code location {loc.name}: git {args[0]} gave more than "
                        f"{limit >> 20} MiB (the limit of one version)"
                    )
            await proc.wait()
    except TimeoutError:
        proc.kill()
        raise CodeFetchError(
            f"code location {loc.name}: git {args[0]} took over {GIT_TIMEOUT_SECONDS:g} s"
        ) from None
    finally:
        if proc.returncode is None:
            await proc.wait()
    stderr = (await errors).decode(errors="replace").strip()
    if proc.returncode != 0:
        raise CodeFetchError(f"code location {loc.name}: git {args[0]} failed: {stderr[-2000:]}")
    return bytes(out)


async def update_git(loc: CodeLocationConfig, state_dir: str) -> str:
    """Fetch the location's repository and make a version folder of the commit its
    `ref` names (if not made before); the commit."""
    parent = location_dir(state_dir, loc.name)
    repo = parent / REPO
    if not (repo / "HEAD").is_file():
        temporary = _new_temporary(parent)
        try:
            await _git(loc, "clone", "--quiet", "--bare", "--", loc.git, str(temporary))
        except BaseException:
            shutil.rmtree(temporary, ignore_errors=True)
            raise
        shutil.rmtree(repo, ignore_errors=True)
        os.rename(temporary, repo)
    else:
        await _git(
            loc,
            "--git-dir",
            str(repo),
            "fetch",
            "--quiet",
            "--prune",
            "--force",
            "--",
            loc.git,
            "+refs/heads/*:refs/heads/*",
            "+refs/tags/*:refs/tags/*",
        )
    wanted = f"{loc.ref or 'HEAD'}^{{commit}}"
    try:
        out = await _git(loc, "--git-dir", str(repo), "rev-parse", "--verify", "--quiet", wanted)
    except CodeFetchError:
        raise CodeFetchError(
            f"code location {loc.name}: ref {loc.ref or 'HEAD'!r} names no commit of {loc.git}"
        ) from None
    commit = out.decode().strip()
    final = parent / commit
    if final.is_dir():
        os.utime(final)
        return commit
    paths = [loc.subdirectory] if loc.subdirectory else []
    tar = await _git(
        loc, "--git-dir", str(repo), "archive", "--format=tar", commit, *paths, limit=MAX_BYTES
    )
    temporary = _new_temporary(parent)
    try:
        with tarfile.open(fileobj=io.BytesIO(tar)) as archive:
            archive.extractall(temporary, filter="data")
    except (tarfile.TarError, OSError) as exc:
        shutil.rmtree(temporary, ignore_errors=True)
        raise CodeFetchError(f"code location {loc.name}: cannot unpack {commit}: {exc}") from None
    _move_into_place(temporary, final)
    return commit


async def make_version(loc: CodeLocationConfig, state_dir: str) -> str:
    """The location's newest version, made into a folder of its own (git: fetched)."""
    if loc.git:
        return await update_git(loc, state_dir)
    return await asyncio.to_thread(snapshot_local, loc, state_dir)


def version_of(loc: CodeLocationConfig, state_dir: str, version: str) -> LocationVersion | None:
    """Version `version` of the location as its workers load it; None if this agent
    does not have it (any more)."""
    if not version or not version.isalnum():
        return None
    folder = location_dir(state_dir, loc.name) / version
    if not folder.is_dir():
        return None
    if loc.git:
        root = os.path.normpath(os.path.join(folder, loc.subdirectory))
        working = os.path.normpath(os.path.join(root, loc.working_directory))
        python_file = None if loc.python_file is None else os.path.join(working, loc.python_file)
        code_directory = working
    else:
        root = str(folder)
        working = loc.working_directory
        python_file = None
        if loc.python_file is not None:
            python_file = os.path.join(root, os.path.basename(loc.python_file))
        code_directory = root
    spec = LocationSpec(
        name=loc.name,
        python_file=python_file,
        module=loc.module,
        working_directory=working,
        code_directory=code_directory,
        version=version,
    )
    return LocationVersion(loc.name, version, str(folder), loc.executable, working, spec)


def versions_held(state_dir: str, name: str) -> list[str]:
    """The versions this agent has of a location, newest first."""
    parent = location_dir(state_dir, name)
    try:
        entries = [
            entry
            for entry in os.scandir(parent)
            if entry.is_dir() and entry.name.isalnum() and entry.name != REPO
        ]
    except FileNotFoundError:
        return []
    entries.sort(key=lambda entry: entry.stat().st_mtime, reverse=True)
    return [entry.name for entry in entries]


def to_remove(held: list[str], keep: set[str], keep_recent: int) -> list[str]:
    """Which versions go: all but those in `keep` and the `keep_recent` newest others
    (`held` is newest first)."""
    others = [version for version in held if version not in keep]
    return others[keep_recent:]


def prune(state_dir: str, name: str, keep: set[str], keep_recent: int) -> list[str]:
    """Remove the versions no longer wanted (and left-over temporaries); those removed."""
    parent = location_dir(state_dir, name)
    removed = to_remove(versions_held(state_dir, name), keep, keep_recent)
    for version in removed:
        shutil.rmtree(parent / version, ignore_errors=True)
    return removed


def remove_version(state_dir: str, name: str, version: str) -> None:
    """Remove one version folder (one that failed to load: no run may use it)."""
    if version.isalnum():
        shutil.rmtree(location_dir(state_dir, name) / version, ignore_errors=True)


def clear_temporaries(state_dir: str, name: str) -> None:
    """Versions half made by an agent that died meanwhile."""
    parent = location_dir(state_dir, name)
    if parent.is_dir():
        for entry in parent.iterdir():
            if entry.name.startswith(TEMPORARY):
                shutil.rmtree(entry, ignore_errors=True)


def in_place(loc: CodeLocationConfig) -> LocationVersion:
    """A local location's files where they are, unversioned: what a worker loads when
    the files themselves, not a copy, are meant (tests of the worker machinery)."""
    spec = LocationSpec(
        name=loc.name,
        python_file=loc.python_file,
        module=loc.module,
        working_directory=loc.working_directory,
    )
    return LocationVersion(
        loc.name, "", loc.working_directory, loc.executable, loc.working_directory, spec
    )
