"""The one durable-file step every writer shares: fsync a folder after a rename into it.

A rename (or a new link) is durable only once its folder is fsynced; the log, the spool, the
conflicts file and key rotation all publish files that way. Stdlib only; imports nothing of
maildrop, so the core (``keys``) and the edges (``eventlog``, ``spool``) can all use it.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (new names, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = ["fsync_dir"]
