"""Atomic file writes: the one helper every result, JSON record and data file goes through.

    with files.atomic_open(path, "wb") as f:
        np.savez(f, ...)

A reader sees the old file or the new one, never a mix, and a crash leaves the old file (and at
most a stray `*.tmp` beside it, never removed unless it is ours).
"""
from __future__ import annotations

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_open(path, mode: str = "w"):
    """Yields a file open on a unique temporary file beside `path` (two writers never share one);
    on success it is flushed, fsynced, given the permissions a plain `open` would give, and
    renamed over `path`. On any error only the temporary file is removed."""
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open: mode {mode!r}; use 'w' or 'wb'.")
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; results are not
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)  # our own temporary file only
        raise


def write_text(path, text: str) -> None:
    """Writes `text` to `path` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)
