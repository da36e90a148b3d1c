"""The node's folders and durable file operations: outbox, inbox, failed, the spool.

Layout under the root: ``outbox/<NodeId>/`` (drop files here), ``inbox/<Origin>/``
(deliveries), ``failed/`` (gave up, with ``<name>.reason``), ``state/spool/`` (custody).

A transfer in the spool is ``<tid>.json`` (its meta, written durably first) plus either
``<tid>.part`` (bytes still arriving; its size is the resume offset) or ``<tid>.data`` (a
whole, verified, fsynced copy: for a sealed transfer the age ciphertext). Two more files
live only for a moment, next to it: ``<tid>.plain`` (at the origin, a taken file before it
is sealed into ``<tid>.data``) and ``<tid>.open`` (at the destination, or at the origin
giving up, the decrypted file before it is linked into ``inbox/`` or ``failed/``). Crash
semantics, step by step, are in each method.

Nothing here follows a symlink that someone else could have planted: outbox, inbox and
failed folders are opened ``O_DIRECTORY|O_NOFOLLOW`` and files are linked, renamed and
written relative to those descriptors (see :class:`Spool.move_in_at`, :func:`link_unique_at`,
:func:`move_to_failed`). The spool folder is kept 0700: only the agent reaches its files.

Edge module: files only. Imports no other edge.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import logging
import os
import secrets
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .durable import fsync_dir

log = logging.getLogger("maildrop.spool")

HASH_CHUNK = 4 * 1024 * 1024
NAME_MAX = 255  # bytes in one file name (Linux file systems)
ACL_ACCESS_XATTR = "system.posix_acl_access"
TAKEN_MODE = 0o640
"""Mode of a taken file: the agent reads and writes, the group only reads (the inbox's
2750), so nobody else can change it once it is hashed."""


SYNCFS_FROM = 4
"""From this many files, one ``syncfs`` of their filesystem replaces one fsync per file: a
batch of small files then costs one flush (and one journal commit), not one each."""
_libc = ctypes.CDLL(None, use_errno=True)


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


def durable_write(path: Path, data: bytes, mode: int = 0o640) -> None:
    """Replace ``path`` with ``data`` atomically: temp file, fsync, rename, fsync the folder.

    Crash: either the old content or the new one, never a mix.
    """
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        write_at(fd, path.name, data, mode)
    finally:
        os.close(fd)


def write_at(dir_fd: int, name: str, data: bytes, mode: int = 0o640) -> None:
    """:func:`durable_write` of ``name`` inside the folder open as ``dir_fd``. The temp file
    is made with ``O_EXCL|O_NOFOLLOW`` and renamed over ``name``: a symlink planted at
    either name is replaced, never written through."""
    tmp = f".{cut_bytes(name, 200)}.{secrets.token_hex(4)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode,
                 dir_fd=dir_fd)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def split_name(name: str) -> tuple[str, str]:
    """``report.tar.gz`` -> (``report``, ``.tar.gz``); a leading dot is not an extension."""
    stem, dot, ext = name.partition(".")
    if not stem or not dot:
        return name, ""
    return stem, "." + ext


def cut_bytes(text: str, limit: int) -> str:
    """The longest start of ``text`` that is at most ``limit`` UTF-8 bytes; never splits a
    character."""
    return text.encode()[:max(limit, 0)].decode("utf-8", "ignore")


def _keep_end(text: str, limit: int) -> str:
    """The longest end of ``text`` that is at most ``limit`` UTF-8 bytes (whole characters)."""
    data = text.encode()
    return data[max(len(data) - limit, 0):].decode("utf-8", "ignore")


def fit_name(stem: str, tail: str) -> str:
    """``stem + tail`` in at most :data:`NAME_MAX` bytes: the stem is cut (by bytes, whole
    characters); a tail over 40 bytes keeps only its last 40 bytes."""
    if len((stem + tail).encode()) <= NAME_MAX:
        return stem + tail
    if len(tail.encode()) > 40:
        tail = _keep_end(tail, 40)
    return cut_bytes(stem, NAME_MAX - len(tail.encode())) + tail


def clash_name(name: str, n: int) -> str:
    """``name`` for the ``n``-th clash: ``report (n).tar.gz``, cut to fit in NAME_MAX bytes."""
    if n == 0:
        return name
    stem, ext = split_name(name)
    if len(f"{stem} ({n}){ext}".encode()) <= NAME_MAX:
        return f"{stem} ({n}){ext}"
    if len(ext.encode()) > 40:
        ext = _keep_end(ext, 40)
    suffix = f" ({n}){ext}"
    return cut_bytes(stem, NAME_MAX - len(suffix.encode())) + suffix


class FolderRefused(OSError):
    """A folder the agent writes into (``inbox/<origin>/``, ``failed/``) or takes from
    (``outbox/<dest>/``) is a symlink or not a folder: refused, never followed."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(errno.ELOOP if reason == "symlink" else errno.ENOTDIR,
                         f"{path} is {'a symlink' if reason == 'symlink' else 'not a folder'}")
        self.path = path
        self.reason = reason


def open_folder(path: Path, *, create: bool = False, parent_fd: int | None = None) -> int:
    """A read descriptor on the folder ``path`` that does not follow a symlink at its last
    part (``O_DIRECTORY|O_NOFOLLOW``); relative to ``parent_fd`` if given, else to
    ``path.parent`` (the operator's path, followed). ``create`` makes it first if missing
    (mode 0777 less the umask, as ``mkdir``). Raises :class:`FolderRefused` for a symlink or
    a non-folder there."""
    parent = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) \
        if parent_fd is None else parent_fd
    try:
        if create:
            with contextlib.suppress(FileExistsError):
                os.mkdir(path.name, dir_fd=parent)
        try:
            return os.open(path.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                           dir_fd=parent)
        except OSError as exc:
            if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
            raise FolderRefused(path, "symlink" if stat.S_ISLNK(st.st_mode) else "not-a-folder") \
                from None
    finally:
        if parent_fd is None:
            os.close(parent)


def link_unique_at(src: str | Path, dir_fd: int, name: str, src_dir_fd: int | None = None) -> str:
    """Hard-link ``src`` (relative to ``src_dir_fd`` if given) into the folder open as
    ``dir_fd`` as ``name``, or ``name (1)``, ``(2)`` … on a clash (cut by bytes to fit);
    returns the name used. A symlink at ``src`` is linked itself, never its target; an
    existing name is never overwritten (``EEXIST`` moves on to the next). Not fsynced."""
    for n in range(10_000):
        candidate = clash_name(name, n)
        try:
            os.link(src, candidate, src_dir_fd=src_dir_fd, dst_dir_fd=dir_fd,
                    follow_symlinks=False)
        except FileExistsError:
            continue
        return candidate
    raise OSError(errno.EEXIST, f"no free name for {name}")


def find_link(src: Path, folder: Path) -> Path | None:
    """A file in ``folder`` that is the same inode as ``src`` (a link made before a crash).
    Neither ``src`` nor ``folder`` is followed if it is a symlink."""
    try:
        st = src.lstat()
        if folder.is_symlink():
            return None
        for entry in os.scandir(folder):
            est = entry.stat(follow_symlinks=False)
            if est.st_ino == st.st_ino and est.st_dev == st.st_dev:
                return Path(entry.path)
    except (FileNotFoundError, NotADirectoryError):
        return None
    return None


def hash_file(path: Path, h: Any | None = None, start: int = 0) -> tuple[int, str]:
    """(size, sha256 hex) of ``path`` from ``start`` (fed into ``h`` if given); a symlink at
    ``path`` is refused (``ELOOP``), never followed."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return hash_fd(fd, h, start)
    finally:
        os.close(fd)


def hash_fd(fd: int, h: Any | None = None, start: int = 0) -> tuple[int, str]:
    """(size, sha256 hex) of the open file ``fd`` from ``start`` (fed into ``h`` if given)."""
    h = h or hashlib.sha256()
    size = start
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    while n := os.preadv(fd, [buf], size):
        h.update(view[:n])
        size += n
    return size, h.hexdigest()


class Refused(Exception):
    """An outbox file the agent will not take. ``reason`` is one word for the log line
    ``outbox.refused path=… reason=…``: symlink, hardlink, not-regular, own-file, unreadable,
    changed (swapped while it was being taken)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def check_takeable(st: os.stat_result, protected: set[tuple[int, int]]) -> None:
    """Raise :class:`Refused` unless ``st`` (not followed) is a regular file with exactly one
    link that is none of the agent's own files (``protected`` holds their (st_dev, st_ino)).

    One link: nobody keeps a second name to change the file after it is hashed, and a file
    elsewhere (the node's key, someone's secret) cannot be hard-linked into the outbox."""
    if stat.S_ISLNK(st.st_mode):
        raise Refused("symlink", "drop the file itself, not a symlink to it")
    if not stat.S_ISREG(st.st_mode):
        raise Refused("not-regular", "only regular files are sent")
    if (st.st_dev, st.st_ino) in protected:
        raise Refused("own-file", "this is one of the agent's own files")
    if st.st_nlink != 1:
        raise Refused("hardlink", f"it has {st.st_nlink} links; drop a copy, not a hard link")


def check_outbox_file(dir_fd: int, name: str, protected: set[tuple[int, int]]) -> os.stat_result:
    """Check ``name`` in the outbox folder open as ``dir_fd`` before it is taken: never
    followed, :func:`check_takeable`, and readable by the agent (opened ``O_NOFOLLOW``, which
    is also checked to be the same inode). Raises :class:`Refused` or FileNotFoundError."""
    check_takeable(os.stat(name, dir_fd=dir_fd, follow_symlinks=False), protected)
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC,
                     dir_fd=dir_fd)
    except PermissionError:
        raise Refused("unreadable", "the agent cannot read it; make it group-readable") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Refused("symlink", "drop the file itself, not a symlink to it") from None
        raise
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    check_takeable(st, protected)
    return st


def make_private(fd: int) -> None:
    """Give the open file mode :data:`TAKEN_MODE` and drop its access ACL (a default ACL
    such as ``g:rw`` on ``outbox/`` is inherited by dropped files). Only the file's owner
    (or root) may: for a file someone else owns the mode stays, and the file is private
    only by its place (``state/spool`` is 0700) and its single link."""
    with contextlib.suppress(OSError):  # no ACL (ENODATA), no ACL support, or not the owner
        os.removexattr(fd, ACL_ACCESS_XATTR)
    with contextlib.suppress(PermissionError):
        os.fchmod(fd, TAKEN_MODE)


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
        if stat.S_IMODE(folder.stat().st_mode) & 0o077:  # the spool is the agent's alone
            with contextlib.suppress(OSError):
                os.chmod(folder, 0o700)
        self._refused: set[tuple[str, int, int, str]] = set()

    def first_refusal(self, path: Path, st: os.stat_result | None, reason: str) -> bool:
        """True the first time this (path, inode, reason) is refused, so that a file the
        watcher offers again at every rescan is logged once (bounded memory)."""
        key = (str(path), st.st_dev if st else 0, st.st_ino if st else 0, reason)
        if key in self._refused:
            return False
        if len(self._refused) >= 10_000:
            self._refused.clear()
        self._refused.add(key)
        return True

    def data(self, tid: str) -> Path:
        return self.folder / f"{tid}.data"

    def part(self, tid: str) -> Path:
        return self.folder / f"{tid}.part"

    def plain(self, tid: str) -> Path:
        """A taken outbox file, not sealed yet (``Custody.take_batch``)."""
        return self.folder / f"{tid}.plain"

    def opened(self, tid: str) -> Path:
        """The decrypted copy of ``<tid>.data``, before it is linked out of the spool."""
        return self.folder / f"{tid}.open"

    def create(self, path: Path) -> int:
        """A write descriptor on a new (or emptied) file ``path`` in the spool, mode 0640,
        never through a symlink. The caller syncs and closes it."""
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)

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

    def move_in_at(self, dir_fd: int, name: str, tid: str, checked: os.stat_result,
                   protected: set[tuple[int, int]]) -> int:
        """Rename ``name`` from the outbox folder open as ``dir_fd`` to ``<tid>.plain`` and
        return a read descriptor on what arrived, once it is known to be the very file
        ``checked`` was taken of (same st_dev/st_ino, still regular with one link), made
        private (:func:`make_private`). The caller fsyncs the folders and closes the fd.

        If the name was swapped between the check and the rename (for a symlink, a hard link
        or another file), or cannot be opened once here, what arrived is put back into the
        folder (under ``name`` or a clash name, never overwriting) and :class:`Refused`
        ("changed", "symlink", "hardlink", "unreadable" …) is raised.
        Crash: the entry is in the outbox or in the spool, where recovery checks it again
        (:meth:`open_taken`).
        """
        spool_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.rename(name, self.plain(tid).name, src_dir_fd=dir_fd, dst_dir_fd=spool_fd)
            try:
                try:
                    fd = self._open_checked(spool_fd, tid, protected)
                except Refused:
                    raise
                except OSError as exc:
                    raise Refused("unreadable", f"cannot open it once moved: {exc}") from None
                st = os.fstat(fd)
                if (st.st_dev, st.st_ino) != (checked.st_dev, checked.st_ino):
                    os.close(fd)
                    raise Refused("changed", "it was replaced while it was being taken")
            except Refused:
                back = link_unique_at(self.plain(tid).name, dir_fd, name, src_dir_fd=spool_fd)
                os.unlink(self.plain(tid).name, dir_fd=spool_fd)
                os.fsync(dir_fd)
                if back != name:
                    log.warning("outbox.put-back name=%s as=%s", name, back)
                raise
        finally:
            os.close(spool_fd)
        make_private(fd)
        return fd

    def _open_checked(self, spool_fd: int, tid: str, protected: set[tuple[int, int]]) -> int:
        try:
            fd = os.open(self.plain(tid).name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK |
                         os.O_NOCTTY | os.O_CLOEXEC, dir_fd=spool_fd)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise Refused("symlink", "drop the file itself, not a symlink to it") from None
            raise
        try:
            check_takeable(os.fstat(fd), protected)
        except Refused:
            os.close(fd)
            raise
        return fd

    def open_taken(self, tid: str, protected: set[tuple[int, int]]) -> int:
        """A read descriptor on ``<tid>.plain`` after :func:`check_takeable` (recovery of a
        take a crash cut short between the rename and its check). Raises Refused."""
        spool_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fd = self._open_checked(spool_fd, tid, protected)
        finally:
            os.close(spool_fd)
        make_private(fd)
        return fd

    def put_back(self, tid: str, folder: Path, name: str) -> Path:
        """Move ``<tid>.plain`` (never followed) back to ``folder`` as ``name`` (or a clash
        name): a refused entry is returned to its owner, not lost. Raises FolderRefused
        if ``folder`` is now a symlink (the entry then stays here)."""
        dir_fd = open_folder(folder)
        spool_fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            back = link_unique_at(self.plain(tid).name, dir_fd, name, src_dir_fd=spool_fd)
            os.fsync(dir_fd)
            os.unlink(self.plain(tid).name, dir_fd=spool_fd)
        finally:
            os.close(spool_fd)
            os.close(dir_fd)
        return folder / back

    def part_size(self, tid: str) -> int:
        try:
            return self.part(tid).stat().st_size
        except FileNotFoundError:
            return 0

    def open_part(self, tid: str, offset: int) -> int:
        """A write descriptor on ``<tid>.part`` cut to ``offset`` (the resume point).

        A part already ``offset`` long (a new one: 0) is not truncated: on ext4 a truncate to
        size 0 marks the file "replaced by truncate" (``auto_da_alloc``), and its close then
        starts writeback of every byte written since -- at the destination 1 GiB of
        ciphertext that nothing syncs (only its ``.open`` is durable), competing with the
        ``.open``'s own writeback. Where a part is to be durable it is synced as before."""
        fd = os.open(self.part(tid), os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o640)
        if os.fstat(fd).st_size != offset:
            os.ftruncate(fd, offset)
        os.lseek(fd, offset, os.SEEK_SET)
        return fd

    def discard(self, tid: str, keep_meta: bool = False, sync: bool = True) -> None:
        """Forget a transfer: data, part, a decrypted copy, and meta (meta last, so a crash
        leaves a record). ``sync=False`` leaves the folder fsync to the caller (one for a
        whole batch)."""
        for p in (self.data(tid), self.part(tid), self.opened(tid)) + \
                (() if keep_meta else (self.meta_path(tid),)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
        if sync:
            fsync_dir(self.folder)

    def free_bytes(self) -> int:
        st = os.statvfs(self.folder)
        return st.f_bavail * st.f_frsize


def move_to_failed(src: Path, failed: Path, name: str, reason: str, *,
                   src_dir_fd: int | None = None, fallback: Path | None = None) -> Path:
    """Put an undeliverable file into ``failed/`` beside ``<name>.reason``; never overwrites.

    ``src`` is relative to ``src_dir_fd`` if given; it is never followed, nor is ``failed``.
    Names are cut by bytes to fit (``<name>.reason`` included). If ``failed`` is a symlink
    or not a folder it is refused (one ``failed.refused`` log line) and the file goes to
    ``fallback`` instead (default ``state/refused/`` beside ``failed/``, private to the
    agent). Crash: the link is made first, then the reason, then ``src`` is removed; a crash
    leaves at worst the file in both places, never in neither.
    """
    try:
        fd = open_folder(failed, create=True)
    except FolderRefused as exc:
        fallback = fallback or failed.parent / "state" / "refused"
        fallback.mkdir(mode=0o700, parents=True, exist_ok=True)
        log.warning("failed.refused path=%s reason=%s moved_to=%s", failed, exc.reason, fallback)
        fd = open_folder(fallback)
        failed = fallback
    try:
        final = link_unique_at(src, fd, name, src_dir_fd=src_dir_fd)
        os.fsync(fd)
        reason_name = fit_name(final, ".reason")
        text = f"{reason.rstrip()}\nfile: {final}\n"
        write_at(fd, reason_name, text.encode(), 0o640)
    finally:
        os.close(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(src, dir_fd=src_dir_fd)
    return failed / final
