"""A run worker's channel: the files it reports through, in the agent's state directory,
so that it outlives the agent that started it and a restarted agent can adopt it.

    <state_dir>/workers/<lease>/
      launch       the run's LaunchRun, framed as on the wire (versioned with the protocol)
      attempt.json the worker: pid, its start time (to tell it from a reused pid), cgroup
                   or container
      spec         the worker's WorkerSpec, framed (a worker in a container reads it here)
      records      the RunRecords the worker appends, framed
      stdout, stderr   the worker's output, and that of every process it starts
      bell         a FIFO: the worker writes a byte after each record, waking the reader
      deadline     the lease deadline, written by the agent, enforced by the worker
      slots        the pool slots granted to its steps (JSON: ["step#attempt", ...]),
                   written by the agent as the control plane grants them
      slot_bell    a FIFO: the agent writes a byte after each change of `slots` or
                   `step_results`
      step_results how its step tasks ended (the fleet executor; JSON list), written by
                   the agent as the control plane tells it
      code_version the version of the run's code location that the worker runs

The agent tails the three files. Where it got to (a `Position`) is stored in its spool
in the transaction that stores the records read up to there, so an agent that restarts
reads on from exactly there: every record reaches the control plane once, in order.
The deadline is when the control plane may give the run to another attempt, less a
margin; the worker stops itself before it (agent/worker/lease.py) unless the agent,
hearing from the control plane, moves it on.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgpack

from agent.compute_logs import StepOutputSplitter
from agent.processes import process_info
from agent.worker.slots import SLOT_BELL, SLOTS, STEP_RESULTS
from protocol import PROTOCOL_VERSION, SUPPORTED_PROTOCOL_VERSIONS
from protocol.codec import FRAME_HEADER_SIZE, frame_length
from protocol.messages import LaunchRun
from protocol.schema import from_plain, to_plain

CHANNEL_FORMAT = 1  # of this folder's layout; a frame carries its own protocol version
STREAMS = ("records", "stdout", "stderr")
FILE_MODE = 0o600


@dataclass(frozen=True)
class Position:
    """How far an agent has read a channel: a byte offset per file (up to the last byte
    turned into a record) and, per output stream, the step its output belongs to."""

    records: int = 0
    stdout: int = 0
    stderr: int = 0
    stdout_step: str | None = None
    stderr_step: str | None = None
    # The run's result is held back until its output is read: `records` then points at
    # it, and this many records after it were already passed on.
    passed_after_result: int = 0
    result_passed: bool = False  # the run's result (or its failure) was passed on

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Position:
        return cls(**json.loads(text))


@dataclass(frozen=True)
class WorkerIdentity:
    """The worker process of a channel, told apart from a later process with its pid."""

    pid: int
    start_time: int  # clock ticks after boot (/proc/PID/stat)
    cgroup: str | None = None  # its process-tracking cgroup, if it has one
    container: str | None = None  # its Docker container's id (the docker launcher)

    def alive(self) -> bool:
        info = process_info(self.pid, with_environ=False)
        return info is not None and info.start_time == self.start_time and info.state != "Z"


class Channel:
    """One run attempt's channel folder."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.lease = int(folder.name)

    def path(self, name: str) -> str:
        return str(self.folder / name)

    @classmethod
    def create(cls, state_dir: str, launch: LaunchRun, agent_id: str) -> Channel:
        """A new channel for `launch` by agent `agent_id`, with its files, its bell and
        the run's scratch folder (a left-over folder of the same lease, from an attempt
        that never started, is replaced)."""
        folder = channels_dir(state_dir) / str(launch.lease)
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True, mode=0o700)
        channel = cls(folder)
        os.mkdir(channel.path("scratch"), 0o700)
        os.mkfifo(channel.path("bell"), FILE_MODE)
        os.mkfifo(channel.path(SLOT_BELL), FILE_MODE)
        for name in STREAMS:
            os.close(os.open(channel.path(name), os.O_CREAT | os.O_WRONLY, FILE_MODE))
        _write_atomically(channel.path("agent"), agent_id.encode())
        launch_data = {"v": PROTOCOL_VERSION, "launch": to_plain(launch)}
        _write_atomically(channel.path("launch"), msgpack.packb(launch_data))
        return channel

    def agent_id(self) -> str:
        with open(self.path("agent"), "rb") as fh:
            return fh.read().decode()

    def writer_fds(self) -> dict[str, int]:
        """The worker's ends: its records, stdout and stderr, opened for appending."""
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        return {name: os.open(self.path(name), flags) for name in STREAMS}

    def launch(self) -> LaunchRun:
        """The run's launch; ValueError if it is unreadable or of a protocol version
        this agent does not speak."""
        with open(self.path("launch"), "rb") as fh:
            data = msgpack.unpackb(fh.read())
        if not isinstance(data, dict) or data.get("v") not in SUPPORTED_PROTOCOL_VERSIONS:
            raise ValueError(f"{self.path('launch')} is not a launch this agent can read")
        return from_plain(LaunchRun, data["launch"])

    def set_worker(self, identity: WorkerIdentity) -> None:
        text = json.dumps({"format": CHANNEL_FORMAT, **asdict(identity)})
        _write_atomically(self.path("attempt.json"), text.encode())

    def worker(self) -> WorkerIdentity | None:
        """The worker it was started for; None if none was (or the folder is from a
        format this agent does not read)."""
        try:
            with open(self.path("attempt.json"), "rb") as fh:
                data = json.loads(fh.read())
        except (OSError, ValueError):
            return None
        if data.pop("format", None) != CHANNEL_FORMAT:
            return None
        return WorkerIdentity(**data)

    def set_code_version(self, version: str) -> None:
        """The code version the worker runs (its folder is kept while the run lasts)."""
        _write_atomically(self.path("code_version"), version.encode())

    def code_version(self) -> str:
        try:
            with open(self.path("code_version"), "rb") as fh:
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def set_deadline(self, monotonic_deadline: float, grace: float) -> None:
        """When the worker must be gone (SIGKILL) on the host's monotonic clock, and how
        long before it the worker starts stopping (SIGTERM)."""
        text = f"{monotonic_deadline:.3f} {grace:.3f}\n"
        with contextlib.suppress(FileNotFoundError):  # the attempt ended meanwhile
            _write_atomically(self.path("deadline"), text.encode())

    def grant_slots(self, keys: list[str]) -> None:
        """Tell the worker which of its steps' slot claims are granted (`slot_key`s):
        the whole set, replaced at once, then the bell (the worker may not read it yet,
        or no longer: it reads the file whenever it looks)."""
        with contextlib.suppress(FileNotFoundError):  # the attempt ended meanwhile
            _write_atomically(self.path(SLOTS), json.dumps(sorted(keys)).encode())
        self._ring(SLOT_BELL)

    def deliver_step_results(self, results: list[dict[str, Any]]) -> None:
        """Tell the worker how its step tasks ended (the fleet executor): the whole
        list, replaced at once, then the slot bell, which its scheduler listens to."""
        with contextlib.suppress(FileNotFoundError):  # the attempt ended meanwhile
            _write_atomically(self.path(STEP_RESULTS), json.dumps(results).encode())
        self._ring(SLOT_BELL)

    def _ring(self, name: str) -> None:
        try:
            fd = os.open(self.path(name), os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # no reader (the worker is gone or not started yet), or no FIFO
            return
        try:
            os.write(fd, b"\x01")
        except OSError:  # full: it is rung already
            pass
        finally:
            os.close(fd)

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


def channels_dir(state_dir: str) -> Path:
    return Path(state_dir) / "workers"


def existing_channels(state_dir: str) -> Iterator[Channel]:
    """The channels a previous life of this agent left, oldest attempt first."""
    with contextlib.suppress(FileNotFoundError):
        folders = [p for p in channels_dir(state_dir).iterdir() if p.name.isdigit()]
        for folder in sorted(folders, key=lambda p: int(p.name)):
            yield Channel(folder)


def _write_atomically(path: str, data: bytes) -> None:
    """Replace `path` whole: a reader sees the old content or the new, never half."""
    temporary = f"{path}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(temporary, path)


class Bell:
    """The reading end of a channel's bell. Opened read-write, so the FIFO
    always has a writer and a dead worker does not make it readable forever."""

    def __init__(self, channel: Channel) -> None:
        self._fd = os.open(channel.path("bell"), os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self._rang = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._fd, self._ring)

    def _ring(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._fd, 4096):
                pass
        self._rang.set()

    async def rung(self) -> None:
        """Returns once the worker has written a record since the last call."""
        await self._rang.wait()
        self._rang.clear()

    def close(self) -> None:
        self._loop.remove_reader(self._fd)
        os.close(self._fd)


READ_CHUNK = 1 << 16


class ChannelReader:
    """Reads a channel on from a `Position`: whole record frames, and output split by
    step, and says at each point how far it has read."""

    def __init__(self, channel: Channel, start: Position) -> None:
        self.position = start
        self._fds: dict[str, int] = {}
        for name in STREAMS:
            fd = os.open(channel.path(name), os.O_RDONLY | os.O_CLOEXEC)
            os.lseek(fd, getattr(start, name), os.SEEK_SET)
            self._fds[name] = fd
        self._partial = b""  # the start of a record frame not yet whole
        self._fed = {"stdout": start.stdout, "stderr": start.stderr}
        self._splitters = {
            "stdout": StepOutputSplitter(start.stdout_step),
            "stderr": StepOutputSplitter(start.stderr_step),
        }
        self._frame_end = start.records  # end of the last whole frame read

    def frames(self) -> list[tuple[bytes, int, int]]:
        """The whole record frames written since the last call: (body, offset of the
        frame, offset after it)."""
        data = self._read("records")
        if not data:
            return []
        buffer = self._partial + data
        found, at = [], 0
        while len(buffer) - at >= FRAME_HEADER_SIZE:
            length = frame_length(buffer[at : at + FRAME_HEADER_SIZE])
            end = at + FRAME_HEADER_SIZE + length
            if end > len(buffer):
                break
            start = self._frame_end
            self._frame_end += end - at
            found.append((buffer[at + FRAME_HEADER_SIZE : end], start, self._frame_end))
            at = end
        self._partial = buffer[at:]
        return found

    def output(self, name: str, final: bool = False) -> list[tuple[str | None, str]]:
        """`name`'s new output, in (step, text) pieces; `final`: all of it (the worker
        and what it started are gone)."""
        data = self._read(name)
        self._fed[name] += len(data)
        splitter = self._splitters[name]
        pieces = splitter.feed(data) if data else []
        if final:
            pieces += splitter.flush()
        return pieces

    def output_position(self, name: str) -> tuple[int, str | None]:
        """How far `name` has been turned into pieces, and the step it is in there."""
        splitter = self._splitters[name]
        return self._fed[name] - splitter.pending_bytes(), splitter.step

    def _read(self, name: str) -> bytes:
        chunks = []
        while chunk := os.read(self._fds[name], READ_CHUNK):
            chunks.append(chunk)
            if len(chunk) < READ_CHUNK:
                break
        return b"".join(chunks)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
