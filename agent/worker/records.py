"""The run worker's side of the record pipe: events and log chunks, framed, thread-safe."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from typing import Any

from protocol.codec import DEFAULT_LIMITS, ProtocolError, frame
from protocol.messages import RunRecord
from protocol.wire import make_deliverable, payload_problem

MAX_MESSAGE_CHARS = DEFAULT_LIMITS.max_str_len // 4  # surely under the limit in UTF-8


def _sanitized(record: RunRecord) -> RunRecord:
    message = record.message
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + " [truncated]"
    return dataclasses.replace(
        record,
        message=make_deliverable(message),
        step=make_deliverable(record.step) if record.step is not None else None,
        data=make_deliverable(record.data),
    )


def encode_record(record: RunRecord) -> bytes:
    """`record` framed as it can reach the control plane: what user code put in it that
    the protocol cannot carry (text that is not Unicode, numbers past 64 bits, objects,
    nesting past the protocol's depth, a message over the size limit) is replaced by
    its repr or cut, rather than failing the step or the run worker."""
    nested = any(type(v) in (dict, list, tuple) for v in record.data.values())
    if len(record.message) > MAX_MESSAGE_CHARS or (
        nested and payload_problem(record.data, "data") is not None
    ):
        record = _sanitized(record)
    try:
        return frame(record)
    except ProtocolError:
        return frame(_sanitized(record))


class RecordSink:
    """Writes RunRecords to the agent; seq is left 0, the agent numbers records."""

    def __init__(self, fd: int, bell: int | None = None) -> None:
        self.fd = fd
        self.bell = bell  # rung after each record: the agent reading the channel wakes
        self._lock = threading.Lock()

    def _write(self, record: RunRecord) -> None:
        data = encode_record(record)
        with self._lock:
            # SIGTERM (a stop order) waits until the frame is whole: a half-written frame
            # would corrupt the stream for the records written while the worker unwinds.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self.fd, view)
                    view = view[written:]
                if self.bell is not None:
                    with contextlib.suppress(OSError):  # full: it is rung already
                        os.write(self.bell, b"\x01")
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, blocked)

    def event(
        self,
        event_type: str,
        message: str = "",
        step: str | None = None,
        data: dict[str, Any] | None = None,
    ) -> None:
        self._write(
            RunRecord(
                seq=0,
                time=time.time(),
                kind="event",
                type=event_type,
                step=step,
                message=message,
                data=data or {},
            )
        )

    def log(self, stream: str, text: str, step: str | None) -> None:
        self._write(
            RunRecord(seq=0, time=time.time(), kind="log", type=stream, step=step, message=text)
        )
