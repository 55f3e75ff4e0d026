"""Step-output attribution: markers and multi-byte characters split across pipe reads."""

from __future__ import annotations

import pytest

from agent.compute_logs import StepOutputSplitter
from agent.worker.capture import MARK_CLOSE, MARK_OPEN


def mark(step: str) -> bytes:
    return MARK_OPEN + step.encode() + MARK_CLOSE


STREAM = (
    b"import time\n"
    + mark("extract")
    + "rows: ünïcode ✓\n".encode()
    + mark("")
    + b"between\n"
    + mark("load")
    + b"loaded\n"
)
EXPECTED = {None: "import time\nbetween\n", "extract": "rows: ünïcode ✓\n", "load": "loaded\n"}


@pytest.mark.parametrize("chunk_size", [1, 2, 3, 7, 16, len(STREAM)])
def test_splits_at_markers_whatever_the_read_sizes(chunk_size: int) -> None:
    splitter = StepOutputSplitter()
    pieces = []
    for i in range(0, len(STREAM), chunk_size):
        pieces += splitter.feed(STREAM[i : i + chunk_size])
    pieces += splitter.flush()
    joined: dict[str | None, str] = {}
    for step, text in pieces:
        joined[step] = joined.get(step, "") + text
    assert joined == EXPECTED


def test_a_lone_nul_byte_is_output_not_a_marker() -> None:
    splitter = StepOutputSplitter()
    assert splitter.feed(b"a\x00") == [(None, "a")]  # could start a marker: held back
    assert splitter.feed(b"b") == [(None, "\x00b")]
    assert splitter.feed(b"\x00\x1ex") == [(None, "\x00\x1ex")]
