"""A received part is written where the spool is, and its close does not start writeback.

Real files on the real file system of the test's temp folder. The writeback check reads
the page cache's own per-file counters (``cachestat(2)``, Linux 6.5+) and needs ext4, where a
truncate to size 0 makes the next close write the whole file back (``auto_da_alloc``): at a
destination that was 1 GiB of ciphertext nobody syncs, competing with the ``.open``'s
writeback (docs/benchmarks.md, the disk row).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from maildrop.spool import Spool

MiB = 1 << 20
SYS_CACHESTAT = 451  # the same number on x86_64 and arm64


class _Range(ctypes.Structure):
    _fields_ = [("off", ctypes.c_uint64), ("len", ctypes.c_uint64)]


class _Stat(ctypes.Structure):
    _fields_ = [(n, ctypes.c_uint64) for n in
                ("cache", "dirty", "writeback", "evicted", "recently_evicted")]


def _dirty_pages(path: Path) -> int:
    """Pages of ``path`` dirty in the page cache and not under writeback."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        rng, st = _Range(0, 0), _Stat()
        if libc.syscall(SYS_CACHESTAT, fd, ctypes.byref(rng), ctypes.byref(st), 0) != 0:
            pytest.skip(f"cachestat(2) unavailable: {os.strerror(ctypes.get_errno())}")
        return st.dirty
    finally:
        os.close(fd)


def _fs_type(path: Path) -> str:
    best, kind = "", ""
    for line in Path("/proc/mounts").read_text().splitlines():
        _, point, fstype = line.split()[:3]
        if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
            best, kind = point, fstype
    return kind


def test_a_new_part_is_not_written_back_when_it_is_closed(tmp_path):
    if _fs_type(tmp_path) != "ext4":
        pytest.skip("the writeback-on-close heuristic is ext4's")
    spool = Spool(tmp_path / "spool")
    fd = spool.open_part("t1", 0)
    block = os.urandom(MiB)
    try:
        for _ in range(32):
            os.write(fd, block)
    finally:
        os.close(fd)
    part = spool.part("t1")
    assert part.stat().st_size == 32 * MiB
    # Written back at the close, nearly nothing would still be dirty; the kernel's own
    # writeback waits 30 s (dirty_expire) for a file this small.
    assert _dirty_pages(part) > (32 * MiB // 4096) // 2
    part.unlink()


def test_a_resumed_part_is_cut_to_its_offset_and_a_whole_one_kept(tmp_path):
    spool = Spool(tmp_path / "spool")
    spool.part("t1").write_bytes(b"0123456789")
    fd = spool.open_part("t1", 4)
    try:
        os.write(fd, b"ab")
    finally:
        os.close(fd)
    assert spool.part("t1").read_bytes() == b"0123ab"
    fd = spool.open_part("t1", 6)
    try:
        os.write(fd, b"cd")
    finally:
        os.close(fd)
    assert spool.part("t1").read_bytes() == b"0123abcd"
