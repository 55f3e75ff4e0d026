"""A run worker's stdout and stderr, split by step at the markers the worker writes
between steps (agent/worker/capture.py), as the agent reads them."""

from __future__ import annotations

import codecs

from agent.worker.capture import MARK_CLOSE, MARK_OPEN
from protocol.validation import name_problem


class StepOutputSplitter:
    """Splits one output stream (in the agent) into (step, text) pieces at the markers."""

    def __init__(self, step: str | None = None) -> None:
        self.step = step
        self._buffer = b""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def _text(self, data: bytes, final: bool = False) -> list[tuple[str | None, str]]:
        text = self._decoder.decode(data, final=final)
        return [(self.step, text)] if text else []

    def feed(self, data: bytes) -> list[tuple[str | None, str]]:
        self._buffer += data
        out: list[tuple[str | None, str]] = []
        while True:
            start = self._buffer.find(MARK_OPEN)
            if start < 0:
                keep = _partial_suffix(self._buffer, MARK_OPEN)
                cut = len(self._buffer) - keep
                out += self._text(self._buffer[:cut])
                self._buffer = self._buffer[cut:]
                return out
            end = self._buffer.find(MARK_CLOSE, start + len(MARK_OPEN))
            if end < 0:
                out += self._text(self._buffer[:start])
                self._buffer = self._buffer[start:]
                return out
            out += self._text(self._buffer[:start], final=True)
            name = self._buffer[start + len(MARK_OPEN) : end].decode(errors="replace")
            # A step's name; anything else (a marker an op printed itself) names none.
            self.step = name if name and name_problem(name) is None else None
            self._buffer = self._buffer[end + len(MARK_CLOSE) :]

    def pending_bytes(self) -> int:
        """Bytes fed but not yet in a piece (part of a marker, or of a character)."""
        return len(self._buffer) + len(self._decoder.getstate()[0])

    def flush(self) -> list[tuple[str | None, str]]:
        data, self._buffer = self._buffer, b""
        return self._text(data, final=True)


def _partial_suffix(data: bytes, marker: bytes) -> int:
    """Length of the longest suffix of `data` that is a proper prefix of `marker`."""
    for length in range(min(len(marker) - 1, len(data)), 0, -1):
        if data.endswith(marker[:length]):
            return length
    return 0
