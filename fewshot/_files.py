"""Atomic file writes, shared by checkpoints, caches and ``fewshot compare``'s files."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write(path, write) -> None:
    """Write ``path`` with ``write(file)`` atomically: a temporary file in the same folder (created
    with its parents), flushed to disk, made readable by all (``0o644``), then ``os.replace``. A
    reader sees the previous file or the new one, never a part; a failed write leaves no
    temporary file behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes the file private; caches and results may be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
