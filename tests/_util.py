"""Helpers shared by tests."""

import os
import signal
import time


def sigkill_once_written(proc, path, timeout=120):
    """Wait until ``path`` exists, then SIGKILL the subprocess ``proc`` (a crash mid-run)."""
    try:
        deadline = time.monotonic() + timeout
        while not path.exists():
            assert proc.poll() is None, proc.communicate()[0]
            assert time.monotonic() < deadline, "no checkpoint written in time"
            time.sleep(0.01)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()
