"""The run worker's side of the record pipe: events and log chunks, framed, thread-safe."""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from protocol.codec import frame
from protocol.messages import RunRecord


class RecordSink:
    """Writes RunRecords to the agent; seq is left 0, the agent numbers records."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._lock = threading.Lock()

    def _write(self, record: RunRecord) -> None:
        data = frame(record)
        with self._lock:
            # SIGTERM (a stop order) waits until the frame is whole: a half-written frame
            # would corrupt the stream for the records written while the worker unwinds.
            blocked = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
            try:
                view = memoryview(data)
                while view:
                    written = os.write(self.fd, view)
                    view = view[written:]
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
