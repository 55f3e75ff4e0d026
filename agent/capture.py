"""Per-step capture of stdout/stderr, at the file-descriptor level, streamed live.

Redirecting fds 1 and 2 (not just `sys.stdout`) also catches output of C extensions and
of subprocesses the op starts. A reader thread per stream forwards chunks as they come.
"""

from __future__ import annotations

import codecs
import contextlib
import os
import sys
import threading
from collections.abc import Iterator

from agent.records import RecordSink

CHUNK = 64 * 1024


def _pump(fd: int, stream: str, step: str, sink: RecordSink) -> None:
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    with os.fdopen(fd, "rb", buffering=0) as pipe:
        while True:
            data = pipe.read(CHUNK)
            text = decoder.decode(data, final=not data)
            if text:
                sink.log(stream, text, step)
            if not data:
                return


@contextlib.contextmanager
def capture_step_output(step: str, sink: RecordSink) -> Iterator[None]:
    """Send everything written to fds 1 and 2 while the block runs to `step`'s log."""
    threads = []
    saved = []
    for target, stream, pystream in ((1, "stdout", sys.stdout), (2, "stderr", sys.stderr)):
        pystream.flush()
        read_fd, write_fd = os.pipe()
        saved.append((target, os.dup(target), pystream))
        os.dup2(write_fd, target)
        os.close(write_fd)
        thread = threading.Thread(
            target=_pump, args=(read_fd, stream, step, sink), daemon=True, name=f"capture-{stream}"
        )
        thread.start()
        threads.append(thread)
    try:
        yield
    finally:
        for target, original, pystream in saved:
            pystream.flush()
            os.dup2(original, target)
            os.close(original)
        for thread in threads:
            thread.join(timeout=10)
