"""A fork server ("zygote") per worker Python, so a run does not pay interpreter start-up.

Starting a fresh interpreter and importing the worker, SDK and protocol costs ~90 ms of
CPU per run; on a small host that caps throughput. The agent instead starts one
long-lived process per worker executable that has imported all of that once, and asks
it to fork a run worker for each run. User code is *not* preloaded: each forked worker
imports its code location itself, so runs stay isolated from one another.

Wire: a SOCK_SEQPACKET socket pair (message boundaries kept, file descriptors passed
with SCM_RIGHTS). The agent sends `{"argv", "env", "cwd"}` with the worker's four fds
(stdin, stdout, stderr, record pipe); the server answers `{"pid"}` or `{"error"}`, and
later `{"exit": pid, "code": returncode}` when it reaps the worker (negative code:
killed by that signal, as in `subprocess`). When the agent closes its end the server
exits; workers already running carry on.

A worker tracked by a cgroup (agent/tracking.py) is born in it: clone3 with
CLONE_INTO_CGROUP, where the kernel allows it. Moving a process in afterwards (writing
cgroup.procs) waits for an RCU grace period, 10-14 ms of every launch on the bench host
(docs/performance.md); where clone3 is refused (an old kernel, a seccomp filter) the
server forks as before and the worker joins its cgroup itself.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import ctypes
import errno
import gc
import os
import platform
import selectors
import signal
import socket
import struct
import sys
import threading
import traceback
from typing import Any

import msgpack

from agent.errors import AgentError
from agent.processes import CGROUP_ENV

WORKER_FDS = 4
RECORD_FD = 3
MAX_MESSAGE_BYTES = 1 << 20

PRELOAD = (
    "agent.worker.main",
    "agent.worker.code_location",
    "agent.worker.executors",
    "agent.worker.executors.in_process",
    "agent.worker.executors.step",
    "agent.worker.records",
    "agent.worker.capture",
    "agent.worker.lease",
    "agent.processes",
    "agent.sdk",
    "protocol.codec",
    "protocol.messages",
)


SYS_CLONE3 = 435  # the same number on every architecture fleetrun runs on
# (set_robust_list, get_robust_list) by machine: these numbers differ
ROBUST_LIST_SYSCALLS = {"x86_64": (273, 274), "aarch64": (99, 100)}
PR_GET_TID_ADDRESS = 40
CLONE_CHILD_CLEARTID = 0x00200000
CLONE_CHILD_SETTID = 0x01000000
CLONE_INTO_CGROUP = 0x200000000
CLONE_ARGS = struct.Struct("=11Q")  # struct clone_args up to `cgroup` (CLONE_ARGS_SIZE_VER2)
REFUSALS = (errno.ENOSYS, errno.EPERM, errno.E2BIG)  # clone3 is not to be had here


class ForkServerGone(AgentError):
    """The fork server exited or stopped answering; the agent starts a new one."""


def _pack(message: dict[str, Any]) -> bytes:
    return msgpack.packb(message, use_bin_type=True)


def _unpack(data: bytes) -> dict[str, Any]:
    message = msgpack.unpackb(data, raw=False, strict_map_key=True)
    if not isinstance(message, dict):
        raise ValueError("fork server message must be a map")
    return message


class ForkServer:
    """The agent's handle on one fork server process (asyncio side)."""

    def __init__(self, command: list[str]) -> None:
        self.command = command
        self._sock: socket.socket | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._reply: asyncio.Future[dict[str, Any]] | None = None
        self._exits: dict[int, asyncio.Future[int | None]] = {}

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    @property
    def alive(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            self._process = await asyncio.create_subprocess_exec(
                *self.command,
                str(theirs.fileno()),
                stdin=asyncio.subprocess.DEVNULL,
                pass_fds=(theirs.fileno(),),
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        ours.setblocking(False)
        self._sock = ours
        self._reader = asyncio.create_task(self._read_forever(ours), name="forkserver-reader")

    async def _read_forever(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        try:
            while data := await loop.sock_recv(sock, MAX_MESSAGE_BYTES):
                message = _unpack(data)
                if "exit" in message:
                    future = self._exits.setdefault(message["exit"], loop.create_future())
                    if not future.done():
                        future.set_result(int(message["code"]))
                    continue
                if "pid" in message:
                    self._exits.setdefault(message["pid"], loop.create_future())
                if self._reply is not None and not self._reply.done():
                    self._reply.set_result(message)
        except (OSError, ValueError, msgpack.ExtraData, msgpack.FormatError):
            pass
        finally:
            self._gone()

    def _gone(self) -> None:
        """Whoever waits learns the server is gone; exit codes it owed become unknown."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._reply is not None and not self._reply.done():
            self._reply.set_exception(ForkServerGone("the fork server exited"))
        for future in self._exits.values():
            if not future.done():
                future.set_result(None)

    async def _send(self, data: bytes, fds: list[int]) -> None:
        loop = asyncio.get_running_loop()
        while True:
            if self._sock is None:
                raise ForkServerGone("the fork server exited")
            try:
                socket.send_fds(self._sock, [data], fds)
                return
            except BlockingIOError:
                writable = loop.create_future()
                fileno = self._sock.fileno()
                loop.add_writer(fileno, writable.set_result, None)
                try:
                    await writable
                finally:
                    loop.remove_writer(fileno)

    async def spawn(self, argv: list[str], env: dict[str, str], cwd: str, fds: list[int]) -> int:
        """Fork a worker running `agent.worker.main(argv)` with fds 0-3 from `fds`."""
        if len(fds) != WORKER_FDS:
            raise ValueError(f"a worker takes {WORKER_FDS} fds, got {len(fds)}")
        async with self._lock:
            self._reply = asyncio.get_running_loop().create_future()
            await self._send(_pack({"argv": argv, "env": env, "cwd": cwd}), fds)
            reply = await self._reply
        if "error" in reply:
            raise OSError(f"fork server could not start the worker: {reply['error']}")
        return int(reply["pid"])

    async def wait(self, pid: int) -> int | None:
        """The worker's return code, or None if the server died before reaping it."""
        future = self._exits.setdefault(pid, asyncio.get_running_loop().create_future())
        try:
            return await future
        finally:
            self._exits.pop(pid, None)

    async def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._process is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self._process.wait()
            if self._process.returncode is None:
                self._process.kill()
                await self._process.wait()


def _child(request: dict[str, Any], fds: list[int]) -> None:
    """In the forked worker: become a fresh-looking process, run the worker, exit."""
    code = 1
    try:
        os.setsid()
        signal.set_wakeup_fd(-1)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        os.closerange(WORKER_FDS, os.sysconf("SC_OPEN_MAX"))
        os.environ.clear()
        os.environ.update(request["env"])
        os.environ["FLEETRUN_RECORD_FD"] = str(RECORD_FD)
        os.chdir(request["cwd"])
        sys.argv = ["agent.worker", *request["argv"]]
        if os.environ.get("PYTHONUNBUFFERED"):
            sys.stdout.reconfigure(write_through=True)  # type: ignore[union-attr]
        gc.unfreeze()
        from agent.worker.main import main

        code = main(list(request["argv"]))
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        # What interpreter shutdown would do (as multiprocessing's forked children do).
        with contextlib.suppress(BaseException):
            threading._shutdown()  # type: ignore[attr-defined]
        with contextlib.suppress(BaseException):
            atexit._run_exitfuncs()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(BaseException):
                stream.flush()
        os._exit(code)


class _Forker:
    """fork(), or a fork whose child is born in a given cgroup."""

    def __init__(self) -> None:
        robust = ROBUST_LIST_SYSCALLS.get(platform.machine())
        self.clone3 = sys.platform == "linux" and robust is not None  # until refused
        self._set_robust, self._get_robust = robust or (0, 0)
        try:
            # A PyDLL call keeps the GIL, as os.fork() does around fork().
            libc = ctypes.PyDLL(None, use_errno=True)
            self._syscall = libc.syscall
            self._syscall.restype = ctypes.c_long
            self._prctl = libc.prctl
            api = ctypes.pythonapi
            self._before, self._child, self._parent = (
                api.PyOS_BeforeFork,
                api.PyOS_AfterFork_Child,
                api.PyOS_AfterFork_Parent,
            )
        except (AttributeError, OSError):  # an interpreter that does not export them
            self.clone3 = False

    def fork(self, cgroup: str) -> int:
        """Like os.fork(); with `cgroup` (a cgroup v2 directory), the child starts in it
        where clone3 allows, else it is an ordinary fork."""
        if not cgroup or not self.clone3:
            return os.fork()
        try:
            fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return os.fork()  # the worker reports the cgroup's trouble when it joins
        try:
            pid, error = self._clone_into(fd)
        finally:
            os.close(fd)
        if pid >= 0:
            return pid
        if error in REFUSALS:
            self.clone3 = False
        return os.fork()

    def _thread_registrations(self) -> tuple[int, int, int] | None:
        """This thread's tid field and robust-futex list as glibc registered them with
        the kernel: (tid address, list head, head size), or None if not to be had."""
        tid_address = ctypes.c_void_p()
        if self._prctl(PR_GET_TID_ADDRESS, ctypes.byref(tid_address), 0, 0, 0) != 0:
            return None
        head, size = ctypes.c_void_p(), ctypes.c_size_t()
        args = (ctypes.c_long(0), ctypes.byref(head), ctypes.byref(size))
        if self._syscall(self._get_robust, *args) != 0 or not tid_address.value:
            return None
        return tid_address.value, head.value or 0, size.value

    def _clone_into(self, cgroup_fd: int) -> tuple[int, int]:
        """clone3 as glibc's fork() calls clone, and between CPython's own before- and
        after-fork steps (locks, at-fork hooks, thread state) as os.fork() does.

        As glibc's fork: the kernel writes the child's tid into glibc's thread
        descriptor (CLONE_CHILD_SETTID), and the child registers its robust-futex list
        again (a new process has none), so that PI and robust mutexes in a job's native
        code work. (pid, errno)."""
        registrations = self._thread_registrations()
        if registrations is None:
            return -1, errno.ENOSYS
        tid_address, head, size = registrations
        flags = CLONE_INTO_CGROUP | CLONE_CHILD_SETTID | CLONE_CHILD_CLEARTID
        args = CLONE_ARGS.pack(flags, 0, tid_address, 0, signal.SIGCHLD, 0, 0, 0, 0, 0, cgroup_fd)
        buffer = ctypes.create_string_buffer(args, len(args))
        self._before()
        pid = int(self._syscall(SYS_CLONE3, buffer, ctypes.c_size_t(len(args))))
        if pid == 0:
            if head:
                self._syscall(self._set_robust, ctypes.c_void_p(head), ctypes.c_size_t(size))
            self._child()
            return 0, 0
        error = ctypes.get_errno() if pid < 0 else 0
        self._parent()
        return pid, error


def _reap(sock: socket.socket) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        sock.send(_pack({"exit": pid, "code": os.waitstatus_to_exitcode(status)}))


def serve(sock: socket.socket) -> None:
    """The server loop: fork a worker per request, report each worker's exit."""
    wake_read, wake_write = os.pipe()
    os.set_blocking(wake_write, False)
    signal.set_wakeup_fd(wake_write)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    selector = selectors.DefaultSelector()
    selector.register(sock, selectors.EVENT_READ)
    selector.register(wake_read, selectors.EVENT_READ)
    forker = _Forker()
    gc.freeze()
    try:
        while True:
            for key, _ in selector.select():
                if key.fileobj == wake_read:
                    os.read(wake_read, 4096)
                    _reap(sock)
                    continue
                data, fds, _, _ = socket.recv_fds(sock, MAX_MESSAGE_BYTES, WORKER_FDS)
                if not data:
                    return
                _handle(sock, selector, data, fds, forker)
    finally:
        selector.close()


def _handle(
    sock: socket.socket,
    selector: selectors.BaseSelector,
    data: bytes,
    fds: list[int],
    forker: _Forker,
) -> None:
    try:
        request = _unpack(data)
        if len(fds) != WORKER_FDS:
            raise ValueError(f"expected {WORKER_FDS} fds, got {len(fds)}")
        pid = forker.fork(str(request["env"].get(CGROUP_ENV, "")))
        if pid == 0:
            selector.close()
            sock.close()
            _child(request, fds)
        sock.send(_pack({"pid": pid}))
    except Exception as exc:
        sock.send(_pack({"error": f"{type(exc).__name__}: {exc}"}))
    finally:
        for fd in fds:
            os.close(fd)


def main(argv: list[str]) -> int:
    """`python -m agent.forkserver FD`: serve on the inherited socket FD."""
    for module in PRELOAD:
        __import__(module)
    sock = socket.socket(fileno=int(argv[0]))
    serve(sock)
    return 0


__all__ = ["ForkServer", "ForkServerGone", "main", "serve"]

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
