"""A run worker's channel (agent/channel.py): what the agent reads of it, how far it got
(the position stored with the spooled records), and an agent that reads on from there
passing on each record once: also when it stopped while holding the run's result."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from agent.channel import Channel, ChannelReader, Position, existing_channels
from agent.launchers import LaunchedRun
from agent.spool import Spool, SpooledAttempt
from agent.worker.capture import MARK_CLOSE, MARK_OPEN
from agent.worker.lease import read_deadline
from agent.worker.records import RecordSink
from protocol.messages import LaunchRun, RunRecord

LAUNCH = LaunchRun(run_id="run-1", job="etl", location="loc", lease=42, tags={"t": "1"})


def channel_in(folder: Path) -> Channel:
    return Channel.create(str(folder), LAUNCH, "agent-id")


def append(channel: Channel, name: str, data: bytes) -> None:
    with open(channel.path(name), "ab") as fh:
        fh.write(data)


def write_records(channel: Channel, *types: str) -> None:
    fd = os.open(channel.path("records"), os.O_WRONLY | os.O_APPEND)
    try:
        sink = RecordSink(fd)
        for type_ in types:
            sink.event(type_, f"{type_} happened", "extract" if type_.startswith("STEP") else None)
    finally:
        os.close(fd)


def test_a_channel_keeps_the_launch_and_who_the_worker_is(tmp_path: Path) -> None:
    channel = channel_in(tmp_path)
    (found,) = existing_channels(str(tmp_path))
    assert (found.lease, found.launch(), found.agent_id()) == (42, LAUNCH, "agent-id")
    assert found.worker() is None  # none started yet
    channel.set_deadline(123.5, 2.0)
    assert read_deadline(channel.path("deadline")) == (123.5, 2.0)
    channel.remove()
    assert list(existing_channels(str(tmp_path))) == []


def test_the_reader_takes_whole_frames_and_output_by_step(tmp_path: Path) -> None:
    channel = channel_in(tmp_path)
    reader = ChannelReader(channel, Position())
    write_records(channel, "RUN_START")
    whole = Path(channel.path("records")).read_bytes()
    append(channel, "records", whole[:5])  # half a frame: not yet
    frames = reader.frames()
    assert len(frames) == 1 and frames[0][1:] == (0, len(whole))
    append(channel, "records", whole[5:])
    assert [f[1:] for f in reader.frames()] == [(len(whole), 2 * len(whole))]
    append(channel, "stdout", b"before\n" + MARK_OPEN + b"extract" + MARK_CLOSE + b"in step\n\xc3")
    assert reader.output("stdout") == [(None, "before\n"), ("extract", "in step\n")]
    offset, step = reader.output_position("stdout")
    assert step == "extract" and offset == os.path.getsize(channel.path("stdout")) - 1
    reader.close()


def run_following(channel: Channel, start: Position | None) -> tuple[LaunchedRun, list]:
    passed: list[tuple[RunRecord, Position]] = []
    return LaunchedRun(LAUNCH, lambda r, p: passed.append((r, p)), channel, start), passed


async def follow_until_done(worker: LaunchedRun) -> None:
    """Pass on what the channel holds, as for a worker that has exited."""
    done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    done.set_result(None)
    await worker._pump(done)
    worker._release_result()


async def test_an_agent_reads_on_from_the_stored_position_passing_each_record_once(
    tmp_path: Path,
) -> None:
    """The first agent stops while it holds the run's result (it waits for the output)
    and after passing on a record written after it; the next one, from the position it
    stored, passes on what was left: each record once, the result last."""
    channel = channel_in(tmp_path)
    write_records(channel, "RUN_START", "STEP_START")
    first, passed = run_following(channel, None)
    await follow_until_done_partially(first, channel)
    write_records(channel, "RUN_SUCCESS", "ENGINE_EVENT")
    await follow_until_done_partially(first, channel)
    stored = passed[-1][1]
    assert [r.type for r, _ in passed] == ["RUN_START", "STEP_START", "ENGINE_EVENT"]
    assert stored.passed_after_result == 1 and not stored.result_passed
    append(channel, "stdout", b"late output\n")
    second, passed_again = run_following(channel, stored)
    await follow_until_done(second)
    assert [(r.kind, r.type) for r, _ in passed_again] == [
        ("log", "stdout"),
        ("event", "RUN_SUCCESS"),
    ]
    assert passed_again[-1][1].result_passed
    third, nothing = run_following(channel, passed_again[-1][1])
    await follow_until_done(third)
    assert nothing == [] and third.reported_result


async def follow_until_done_partially(worker: LaunchedRun, channel: Channel) -> None:
    """One look at the channel, as a running agent takes it (no final read)."""
    reader = ChannelReader(channel, worker._position)
    try:
        worker._take_records(reader)
        worker._take_output(reader, final=False)
    finally:
        reader.close()


async def test_the_spool_keeps_the_position_with_the_records(tmp_path: Path) -> None:
    spool = Spool(tmp_path / "spool.db")
    await spool.open()
    attempt = SpooledAttempt("agent-1", "run-1", 42)
    position = Position(records=120, stdout=7, stdout_step="a", result_passed=True)
    record = RunRecord(seq=5, time=time.time(), kind="event", type="RUN_START")
    await spool.append(attempt, [record], position)
    await spool.acknowledged(42, 5)
    await spool.close()
    again = Spool(tmp_path / "spool.db")
    await again.open()
    assert await again.position(42) == (position, 6)  # acknowledged records go; it stays
    await again.forget(42)
    assert await again.position(42) is None
    await again.close()
