"""Step outputs between this agent and the control plane's output store: sent with (or
before) the records that announce them, and fetched for a re-execution that reuses them."""

from __future__ import annotations

import asyncio
import os
import re

from agent.client import ControlPlaneClient, ControlPlaneError, ControlPlaneUnreachable
from agent.state import REQUEST_TIMEOUT_SECONDS
from agent.worker.outputs import INLINE_KEY, INLINE_OUTPUT_BYTES
from protocol.messages import LaunchRun, RunRecord
from protocol.validation import name_problem

RUN_ID_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")


def _read_if_exists(path: str) -> bytes | None:
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except FileNotFoundError:
        return None


def _write(path: str, data: bytes) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as fh:
        fh.write(data)


class OutputUploader:
    """Sends step outputs to the control plane with, or before, the records announcing them."""

    def __init__(
        self, client: ControlPlaneClient, agent_id: str, launch: LaunchRun, scratch: str
    ) -> None:
        self.client = client
        self.agent_id = agent_id
        self.launch = launch
        self.scratch = scratch
        self.uploaded: set[str] = set()
        self.inline: dict[str, bytes] = {}  # a batch read again from the spool needs them

    async def upload(self, records: list[RunRecord]) -> None:
        for record in records:
            step = record.step
            if record.type != "STEP_OUTPUT" or step is None:
                continue
            if step in self.inline:
                record.data[INLINE_KEY] = self.inline[step]
            if step in self.uploaded:
                continue
            path = os.path.join(self.scratch, "out", f"{step}.pickle")
            data = await asyncio.to_thread(_read_if_exists, path)
            if data is not None and len(data) <= INLINE_OUTPUT_BYTES:
                self.inline[step] = data
                record.data[INLINE_KEY] = data  # stored with the event, one transaction
            elif data is not None:
                await self.client.put_output(
                    self.agent_id,
                    self.launch.run_id,
                    self.launch.lease,
                    step,
                    data,
                    REQUEST_TIMEOUT_SECONDS,
                )
            self.uploaded.add(step)


async def download_reused(
    client: ControlPlaneClient, agent_id: str, launch: LaunchRun, scratch: str
) -> str | None:
    """Fetch the outputs a re-execution reuses into the scratch folder; None if all came,
    else why not. Names are checked before they become paths."""
    ours = (agent_id, launch.run_id, launch.lease)
    for step, source in launch.reuse_outputs.items():
        if name_problem(step) or not RUN_ID_RE.fullmatch(source):
            return f"the launch names a reused output that is not a step's: {step[:64]!r}"
        try:
            data = await client.get_output(*ours, source, step, REQUEST_TIMEOUT_SECONDS)
        except ControlPlaneError as exc:
            if exc.status == 404:
                continue  # the worker fails the run only if a step needs it
            return f"could not fetch the output of step {step} from run {source}: {exc}"
        except ControlPlaneUnreachable as exc:
            return f"could not fetch the output of step {step} from run {source}: {exc}"
        path = os.path.join(scratch, "in", source, f"{step}.pickle")
        await asyncio.to_thread(_write, path, data)
    return None
