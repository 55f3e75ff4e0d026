"""Output stores: where step outputs are kept so that a later run can reuse them.

A re-execution (or a resumed run) loads the outputs of the steps it does not run again
from the store instead of computing them. Two stores:

- `control_plane` (default): the run worker writes each output to the attempt's scratch
  folder and the agent sends it to the control plane's storage before or with the
  step's STEP_OUTPUT event (small outputs ride inside that event's batch and are stored
  in its transaction; larger ones are uploaded first), so a re-execution can run on any
  agent. For a reused output the agent downloads it into the scratch folder before the
  worker starts.
- `filesystem`: outputs live under a path every agent can read (a shared volume).

Outputs are pickled; one over `max_output_bytes` fails its step with a message saying so.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path
from typing import Any, Protocol

from agent.errors import AgentError

DEFAULT_MAX_OUTPUT_BYTES = 16 * 1024 * 1024
INLINE_OUTPUT_BYTES = 256 * 1024  # up to this size an output travels inside its event
INLINE_KEY = "output_bytes"


class OutputTooLarge(AgentError):
    pass


class OutputStore(Protocol):
    """Bytes of one step's output, by the run that produced it and the step's name."""

    def put(self, run_id: str, step: str, data: bytes) -> None: ...
    def get(self, run_id: str, step: str) -> bytes: ...


def _write_atomically(path: Path, data: bytes, durable: bool = True) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temp, "wb") as fh:
        fh.write(data)
        if durable:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(temp, path)


class FilesystemOutputStore:
    """`ROOT/RUN_ID/STEP.pickle`; ROOT is shared by every agent that may reuse them."""

    def __init__(self, root: str) -> None:
        self.root = Path(root)

    def path(self, run_id: str, step: str) -> Path:
        return self.root / run_id / f"{step}.pickle"

    def put(self, run_id: str, step: str, data: bytes) -> None:
        _write_atomically(self.path(run_id, step), data)

    def get(self, run_id: str, step: str) -> bytes:
        return self.path(run_id, step).read_bytes()


class ScratchOutputStore(FilesystemOutputStore):
    """The run worker's side of the `control_plane` store: the agent moves the bytes.

    New outputs go to `SCRATCH/out/STEP.pickle` (the agent uploads them); reused ones
    were downloaded by the agent to `SCRATCH/in/RUN_ID/STEP.pickle`.
    """

    def path(self, run_id: str, step: str) -> Path:
        return self.root / "in" / run_id / f"{step}.pickle"

    def put(self, run_id: str, step: str, data: bytes) -> None:
        # No fsync: this copy is transient; the control plane's commit makes it durable.
        _write_atomically(self.root / "out" / f"{step}.pickle", data, durable=False)


def encode_output(step: str, value: Any, max_bytes: int) -> bytes:
    """Pickle an output; raises OutputTooLarge or pickling's own errors."""
    data = pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
    if len(data) > max_bytes:
        raise OutputTooLarge(
            f"output of step {step} is {len(data)} bytes pickled, over the output store's "
            f"limit of {max_bytes} bytes (output_store.max_output_bytes)"
        )
    return data
