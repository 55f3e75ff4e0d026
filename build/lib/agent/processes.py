"""Finding and killing the processes a worker left behind, from /proc and cgroup v2.

Shared by the agent and the run worker, so it imports no asyncio (a worker started as a
fresh interpreter would pay for it). The decisions (which processes, which cgroup, what
to report) are pure functions over text read from /proc; the rest reads and kills.

Every kill goes through a pidfd opened before the process's start time is checked
again, so a pid that was reused since the scan is never signalled.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import signal
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

CGROUP_ENV = "FLEETRUN_CGROUP"  # the worker joins this cgroup first thing
SUBREAPER_ENV = "FLEETRUN_SUBREAPER"  # the worker adopts orphans and kills them at its end
MAX_REPORTED = 20  # processes listed in one report (the count is always whole)
MAX_COMMAND_CHARS = 120
KILL_ROUNDS = 20  # rescans while killing finds new processes (forks racing the kill)
PR_SET_CHILD_SUBREAPER = 36


@dataclass(frozen=True, slots=True)
class ProcInfo:
    """One process as /proc showed it: enough to choose it and to kill that very one."""

    pid: int
    ppid: int
    pgid: int
    state: str
    start_time: int  # clock ticks after boot: with the pid, identifies the process
    environ: bytes = b""


@dataclass(frozen=True, slots=True)
class LeftProcess:
    """A process that was killed because its run (or evaluation) had ended."""

    pid: int
    command: str


# Pure decisions


def parse_stat(text: str) -> tuple[str, int, int, int]:
    """State, ppid, process group and start time from a /proc/PID/stat line.

    The command name is in parentheses and may itself hold spaces and ')'.
    """
    fields = text[text.rindex(")") + 2 :].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[19])


def _unescape(path: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), path)


def cgroup_dir(mountinfo: str, proc_cgroup: str) -> str | None:
    """The directory of this process's cgroup v2, or None if no cgroup2 mount shows it.

    `proc_cgroup` is /proc/self/cgroup: the v2 line is `0::/path`. A mount may show only
    a subtree (its root field), as in a container without a cgroup namespace.
    """
    own = next((line[3:] for line in proc_cgroup.splitlines() if line.startswith("0::")), None)
    if own is None or not own.startswith("/"):
        return None
    for line in mountinfo.splitlines():
        before, sep, after = line.partition(" - ")
        if not sep or after.split(" ", 1)[0] != "cgroup2":
            continue
        fields = before.split()
        root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        relative = os.path.relpath(own, root)
        if relative == ".":
            return mount_point
        if relative != ".." and not relative.startswith("../"):
            return os.path.join(mount_point, relative)
    return None


def environ_matches(environ: bytes, marker: Mapping[str, str]) -> bool:
    """Whether a /proc/PID/environ (NUL-separated) holds every `NAME=value` of `marker`."""
    if not marker:
        return False
    entries = set(environ.split(b"\0"))
    return all(f"{name}={value}".encode() in entries for name, value in marker.items())


def ancestors(table: Mapping[int, ProcInfo], pid: int) -> set[int]:
    """`pid` and every process above it (never to be killed by it)."""
    found: set[int] = set()
    while pid in table and pid not in found:
        found.add(pid)
        pid = table[pid].ppid
    return found


def descendants(table: Mapping[int, ProcInfo], root: int) -> list[ProcInfo]:
    """The live processes below `root` (zombies are dead already)."""
    children: dict[int, list[int]] = {}
    for info in table.values():
        children.setdefault(info.ppid, []).append(info.pid)
    found: list[ProcInfo] = []
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid == root:
            continue
        todo += children.get(pid, [])
        if table[pid].state != "Z":
            found.append(table[pid])
    return found


def left_behind(
    table: Mapping[int, ProcInfo],
    worker_pid: int,
    marker: Mapping[str, str],
    spare: Collection[int],
) -> list[ProcInfo]:
    """What an exited worker left running: members of its process group, and processes
    whose environment carries the worker's marker (they may have left the group)."""
    return [
        info
        for info in table.values()
        if info.pid not in spare
        and info.pid != worker_pid
        and info.state != "Z"
        and (info.pgid == worker_pid or environ_matches(info.environ, marker))
    ]


def command_text(cmdline: bytes, name: str) -> str:
    """A process's command line for people, cut to MAX_COMMAND_CHARS; `[name]` if empty."""
    text = " ".join(cmdline.replace(b"\0", b" ").decode(errors="replace").split())
    text = text or f"[{name}]"
    if len(text) > MAX_COMMAND_CHARS:
        text = text[: MAX_COMMAND_CHARS - 1] + "…"
    return text


def left_behind_event(
    killed: list[LeftProcess], tracking: str, what: str = "the run"
) -> tuple[str, dict]:
    """The ENGINE_EVENT's message and data for `killed` (non-empty), kept small."""
    ordered = sorted(killed, key=lambda p: p.pid)
    shown = ordered[:MAX_REPORTED]
    noun = "process" if len(ordered) == 1 else "processes"
    listed = ", ".join(f"{p.pid} ({p.command})" for p in shown)
    more = f" and {len(ordered) - len(shown)} more" if len(ordered) > len(shown) else ""
    message = f"killed {len(ordered)} {noun} {what} left behind: {listed}{more}"
    data = {
        "killed": [{"pid": p.pid, "command": p.command} for p in shown],
        "count": len(ordered),
        "tracking": tracking,
    }
    return message, data


# Reading /proc and killing


def _read(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def process_info(pid: int, with_environ: bool = True) -> ProcInfo | None:
    """One process from /proc; None if it is gone (it may vanish mid-read)."""
    try:
        state, ppid, pgid, start = parse_stat(_read(f"/proc/{pid}/stat").decode(errors="replace"))
    except (OSError, ValueError, IndexError):
        return None
    environ = b""
    if with_environ:
        with contextlib.suppress(OSError):  # another user's, or gone
            environ = _read(f"/proc/{pid}/environ")
    return ProcInfo(pid, ppid, pgid, state, start, environ)


def process_table(with_environ: bool = True) -> dict[int, ProcInfo]:
    """Every process this one can see."""
    table: dict[int, ProcInfo] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and (info := process_info(int(entry), with_environ)) is not None:
            table[info.pid] = info
    return table


def _command(pid: int) -> str:
    try:
        cmdline = _read(f"/proc/{pid}/cmdline")
        stat = _read(f"/proc/{pid}/stat").decode(errors="replace")
    except OSError:
        return "?"
    return command_text(cmdline, stat[stat.find("(") + 1 : stat.rfind(")")])


def kill_process(info: ProcInfo) -> LeftProcess | None:
    """SIGKILL exactly the process `info` describes; None if it is gone (or not ours)."""
    try:
        pidfd: int | None = os.pidfd_open(info.pid)
    except ProcessLookupError:
        return None
    except OSError as exc:
        if exc.errno != errno.ENOSYS:
            raise
        pidfd = None  # Linux before 5.3: by pid, right after the check below
    try:
        now = process_info(info.pid, with_environ=False)
        if now is None or now.start_time != info.start_time or now.state == "Z":
            return None  # it ended (and its pid may be someone else's now)
        command = _command(info.pid)
        if pidfd is None:
            os.kill(info.pid, signal.SIGKILL)
        else:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
        return LeftProcess(info.pid, command)
    except (ProcessLookupError, PermissionError):
        return None
    finally:
        if pidfd is not None:
            os.close(pidfd)


def kill_all(
    select: Callable[[dict[int, ProcInfo]], list[ProcInfo]], with_environ: bool = True
) -> list[LeftProcess]:
    """Kill what `select` picks from the process table, again until it picks nothing new:
    a process may fork while its siblings are being killed."""
    seen: set[tuple[int, int]] = set()
    killed: list[LeftProcess] = []
    for _ in range(KILL_ROUNDS):
        table = process_table(with_environ)
        fresh = [p for p in select(table) if (p.pid, p.start_time) not in seen]
        if not fresh:
            break
        for info in fresh:
            seen.add((info.pid, info.start_time))
            if (left := kill_process(info)) is not None:
                killed.append(left)
    return killed


def kill_left_behind(worker_pid: int, marker: Mapping[str, str]) -> list[LeftProcess]:
    """Kill what an exited worker left: its process group and its marked processes."""
    me = os.getpid()
    return kill_all(lambda table: left_behind(table, worker_pid, marker, ancestors(table, me)))


def kill_descendants() -> list[LeftProcess]:
    """Kill every process below this one (a subreaper: orphans stayed below it)."""
    me = os.getpid()
    return kill_all(lambda table: descendants(table, me), with_environ=False)


def become_subreaper() -> None:
    """Orphans of this process's descendants become its children instead of init's."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
        code = ctypes.get_errno()
        raise OSError(code, f"prctl(PR_SET_CHILD_SUBREAPER): {os.strerror(code)}")


# cgroup v2


def own_cgroup_dir() -> str | None:
    """This process's cgroup v2 directory, if a cgroup2 file system shows it."""
    try:
        mountinfo = _read("/proc/self/mountinfo").decode(errors="replace")
        proc_cgroup = _read("/proc/self/cgroup").decode(errors="replace")
    except OSError:
        return None
    return cgroup_dir(mountinfo, proc_cgroup)


def join_cgroup(path: str) -> None:
    """Move this process into the cgroup at `path` (its children will be born there)."""
    fd = os.open(os.path.join(path, "cgroup.procs"), os.O_WRONLY)
    try:
        os.write(fd, str(os.getpid()).encode())
    finally:
        os.close(fd)


def cgroup_pids(path: str) -> list[int]:
    """Every process in the cgroup at `path` and in the cgroups below it."""
    pids: list[int] = []
    for folder, _, _ in os.walk(path):
        with contextlib.suppress(FileNotFoundError):  # removed meanwhile
            pids += [int(p) for p in _read(os.path.join(folder, "cgroup.procs")).split()]
    return pids


def cgroup_populated(path: str) -> bool:
    """Whether any process is left in the cgroup at `path` or below (zombies do not count)."""
    try:
        events = _read(os.path.join(path, "cgroup.events")).decode()
    except FileNotFoundError:
        return False
    return "populated 1" in events.splitlines()


def kill_cgroup(path: str, spare: int | None = None) -> list[LeftProcess]:
    """SIGKILL every process in the cgroup at `path` (and below) at once; report each
    except `spare` (the worker, if it is still in its last moments)."""
    left = [LeftProcess(pid, _command(pid)) for pid in cgroup_pids(path) if pid != spare]
    with open(os.path.join(path, "cgroup.kill"), "w") as fh:
        fh.write("1")
    return left


def remove_cgroup(path: str) -> None:
    """Remove an empty cgroup and the cgroups below it (deepest first)."""
    for folder, _, _ in os.walk(path, topdown=False):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(folder)


def cgroup_problem(path: str) -> str | None:
    """None if processes can be put in, and killed from, a new cgroup below `path`;
    else why not. Creates and removes `path/probe`; forks a child that joins it."""
    probe = os.path.join(path, "probe")
    try:
        os.mkdir(probe)
    except OSError as exc:
        return f"cannot create a cgroup in {path}: {exc.strerror}"
    try:
        if not os.path.exists(os.path.join(probe, "cgroup.kill")):
            return "this kernel has no cgroup.kill (Linux 5.14 or later has)"
        pid = os.fork()
        if pid == 0:  # the child only writes its pid: this process may have threads
            code = 1
            try:
                join_cgroup(probe)
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        if os.waitstatus_to_exitcode(status) != 0:
            return f"cannot move a process into a cgroup in {path}"
        return None
    finally:
        with contextlib.suppress(OSError):
            os.rmdir(probe)
