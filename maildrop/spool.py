"""The node's folders and durable file operations: outbox, inbox, failed, the spool.

Layout under the root: ``outbox/<NodeId>/`` (drop files here), ``inbox/<Origin>/``
(deliveries), ``failed/`` (gave up, with ``<name>.reason``), ``state/spool/`` (custody).

A transfer in the spool is ``<tid>.json`` (its meta, written durably first) plus either
``<tid>.part`` (bytes still arriving; its size is the resume offset) or ``<tid>.data`` (a
whole, verified, fsynced copy). Crash semantics, step by step, are in each method.

Edge module: files only. Imports no other edge.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
from pathlib import Path
from typing import Any

HASH_CHUNK = 4 * 1024 * 1024


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def durable_write(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, fsync, rename, fsync the folder.

    Crash: either the old content or the new one, never a mix.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)


def split_name(name: str) -> tuple[str, str]:
    """``report.tar.gz`` -> (``report``, ``.tar.gz``); a leading dot is not an extension."""
    stem, dot, ext = name.partition(".")
    if not stem or not dot:
        return name, ""
    return stem, "." + ext


def link_unique(src: Path, folder: Path, name: str) -> Path:
    """Hard-link ``src`` into ``folder`` as ``name``, or ``name (1)``, ``(2)`` … on a clash.

    Never overwrites (``os.link`` fails with EEXIST instead). Fsyncs the folder. Crash: the
    link exists or it does not; ``src`` is untouched either way.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stem, ext = split_name(name)
    for n in range(10_000):
        candidate = folder / (name if n == 0 else f"{stem} ({n}){ext}")
        if len(candidate.name.encode()) > 255:
            candidate = folder / f"{stem[:200]} ({n}){ext[-40:]}"
        try:
            os.link(src, candidate)
        except FileExistsError:
            continue
        fsync_dir(folder)
        return candidate
    raise OSError(f"no free name for {name} in {folder}")


def find_link(src: Path, folder: Path) -> Path | None:
    """A file in ``folder`` that is the same inode as ``src`` (a link made before a crash)."""
    try:
        st = src.stat()
        for entry in os.scandir(folder):
            est = entry.stat(follow_symlinks=False)
            if est.st_ino == st.st_ino and est.st_dev == st.st_dev:
                return Path(entry.path)
    except FileNotFoundError:
        return None
    return None


def hash_file(path: Path, h: Any | None = None, start: int = 0) -> tuple[int, str]:
    """(size, sha256 hex) of ``path`` from ``start`` (fed into ``h`` if given)."""
    h = h or hashlib.sha256()
    size = start
    with open(path, "rb", buffering=0) as f:
        f.seek(start)
        buf = bytearray(HASH_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            h.update(view[:n])
            size += n
    return size, h.hexdigest()


def ensure_layout(root: Path) -> None:
    """Create the root folders. outbox/ and inbox/ are group-writable and setgid so people
    and the agent can share them; state/ is private to the agent."""
    for sub, mode in (("outbox", 0o2770), ("inbox", 0o2750), ("failed", 0o2750),
                      ("state", 0o700), ("state/spool", 0o700)):
        p = root / sub
        if not p.exists():
            p.mkdir(parents=True, exist_ok=True)
            with contextlib.suppress(OSError):
                os.chmod(p, mode)


def ensure_outbox(outbox: Path, node_ids: list[str]) -> None:
    """Create ``outbox/<id>/`` for each known node, group-writable and setgid, so people drop
    files into folders the agent can empty whatever their umask."""
    for node in node_ids:
        folder = outbox / node
        if not folder.exists():
            with contextlib.suppress(OSError):
                folder.mkdir()
                os.chmod(folder, 0o2770)


class Spool:
    """Transfers in custody under ``state/spool``."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)

    def data(self, tid: str) -> Path:
        return self.folder / f"{tid}.data"

    def part(self, tid: str) -> Path:
        return self.folder / f"{tid}.part"

    def meta_path(self, tid: str) -> Path:
        return self.folder / f"{tid}.json"

    def read_meta(self, tid: str) -> dict[str, Any] | None:
        try:
            return json.loads(self.meta_path(tid).read_bytes())
        except (FileNotFoundError, ValueError):
            return None

    def write_meta(self, tid: str, meta: dict[str, Any]) -> None:
        durable_write(self.meta_path(tid), json.dumps(meta, sort_keys=True).encode())

    def transfer_ids(self) -> list[str]:
        """Every transfer with anything in the spool: a meta, a whole copy or a part."""
        tids = set()
        for p in self.folder.iterdir():
            stem, dot, ext = p.name.partition(".")
            if dot and ext in ("json", "data", "part") and not p.name.startswith("."):
                tids.add(stem)
        return sorted(tids)

    def write_intent(self, entries: list[dict[str, Any]]) -> Path:
        """Durably record a batch of takes before any file moves (see ``Custody.take_batch``)."""
        path = self.folder / f"take-{secrets.token_hex(8)}.intent"
        durable_write(path, json.dumps(entries).encode())
        return path

    def intents(self) -> list[Path]:
        return sorted(self.folder.glob("take-*.intent"))

    def move_in(self, src: Path, tid: str) -> None:
        """Rename ``src`` (same filesystem) to ``<tid>.data``; the caller fsyncs the folders."""
        os.rename(src, self.data(tid))

    def take(self, src: Path, tid: str, meta: dict[str, Any]) -> Path:
        """Move a file from the outbox into custody.

        Crash: (1) meta written durably, (2) ``rename`` src -> data (same filesystem, atomic),
        (3) both folders fsynced. After a crash before (2) the file is still in the outbox and
        the meta has no data: recovery drops the meta. After (2) the data is here.
        """
        self.write_meta(tid, meta)
        dst = self.data(tid)
        os.rename(src, dst)
        fsync_dir(self.folder)
        fsync_dir(src.parent)
        return dst

    def part_size(self, tid: str) -> int:
        try:
            return self.part(tid).stat().st_size
        except FileNotFoundError:
            return 0

    def open_part(self, tid: str, offset: int) -> int:
        """A write descriptor on ``<tid>.part`` cut to ``offset`` (the resume point)."""
        fd = os.open(self.part(tid), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        return fd

    def commit_part(self, tid: str, fd: int) -> Path:
        """fsync the whole part, rename it to ``<tid>.data``, fsync the folder.

        Crash: before the rename the part stays and resumes; after it the copy is whole.
        """
        os.fsync(fd)
        os.close(fd)
        os.rename(self.part(tid), self.data(tid))
        fsync_dir(self.folder)
        return self.data(tid)

    def discard(self, tid: str, keep_meta: bool = False) -> None:
        """Forget a transfer: data, part, and meta (meta last, so a crash leaves a record)."""
        for p in (self.data(tid), self.part(tid)) + (() if keep_meta else (self.meta_path(tid),)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        fsync_dir(self.folder)

    def free_bytes(self) -> int:
        st = os.statvfs(self.folder)
        return st.f_bavail * st.f_frsize


def move_to_failed(src: Path, failed: Path, name: str, reason: str) -> Path:
    """Put an undeliverable file into ``failed/`` beside ``<name>.reason``; never overwrites.

    Crash: the link is made first, then the reason, then ``src`` is removed; a crash leaves
    at worst the file in both places, never in neither.
    """
    final = link_unique(src, failed, name)
    durable_write(final.with_name(final.name + ".reason"), (reason.rstrip() + "\n").encode(), 0o640)
    with contextlib.suppress(FileNotFoundError):
        src.unlink()
    return final
