"""The durable-file steps every writer shares: fsync a folder after a rename into it, and
make the data of many files durable at once.

A rename (or a new link) is durable only once its folder is fsynced; the log, the spool, the
conflicts file and key rotation all publish files that way. Stdlib only; imports nothing of
maildrop, so the core (``keys``) and the edges (``eventlog``, ``spool``) can all use it.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from pathlib import Path

SYNCFS_FROM = 4
"""From this many files, one ``syncfs`` of their filesystem replaces one fsync per file: a
batch of small files then costs one flush (and one journal commit), not one each."""
_libc = ctypes.CDLL(None, use_errno=True)


def fsync_dir(path: Path) -> None:
    """Make the entries of folder ``path`` (new names, renames, unlinks) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_files(paths: Sequence[Path], folder: Path) -> None:
    """Make the data of the files ``paths`` (all on ``folder``'s filesystem) durable: one
    fsync each, or, from ``SYNCFS_FROM`` files on, one ``syncfs(2)`` of the filesystem (it
    writes back every dirty page there, these files' included, and reports a writeback
    error since Linux 5.8). Raises OSError when the data may not be on disk."""
    if len(paths) >= SYNCFS_FROM:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            if _libc.syncfs(fd) != 0:
                err = ctypes.get_errno()
                raise OSError(err, os.strerror(err), str(folder))
        finally:
            os.close(fd)
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


__all__ = ["SYNCFS_FROM", "fsync_dir", "sync_files"]
