"""Watch ``<root>/outbox/<NodeId>/`` and hand over every complete file, once.

This is the only module that imports watchdog. It never imports another edge or the agent.

How a file is judged complete ("closed" does not mean complete: `scp` killed mid-transfer
leaves a closed, truncated file; a `mv` from another folder shows no close at all):

- **Fast path.** A final name that appears by a rename is complete the moment it appears and
  is handed over at once, with no settle delay: a rename inside the watched tree (watchdog
  reports a *moved* event, e.g. ``.x.part -> x``, rsync's ``.x.AbC123 -> x``) and a rename
  in from elsewhere on the same file system (``mv /tmp/x outbox/B/``: an unpaired
  ``IN_MOVED_TO``, which the observer reports as a *moved* event with an empty source
  because it is built with ``generate_full_events=True``; plain watchdog calls it *created*).
- **Settle path.** Everything else (``cp``, ``scp``, any file written in place; files found
  by a rescan) must be a regular file whose ``(size, mtime_ns, inode)`` stays unchanged for
  ``settle`` seconds after its last event. Each new event (modified, closed, attrib) pushes
  the deadline back. A file renamed to another final name while it is still settling keeps
  settling under its new name, also when the rename is seen as two unpaired halves (moved
  out, then moved in with the same inode: see the latency note).
- Temp names (:func:`is_temp_name`) are ignored until they are renamed to a final name.
- Events are hints: the outbox is rescanned on start, every ``rescan_interval`` seconds, soon
  after watchdog reports an inotify queue overflow, and when a destination folder is created
  or moved in. Rescanned files go through the settle path.
- Watches: one non-recursive watch on ``outbox/`` and one on each valid destination folder
  (nothing deeper: sub-folders are ignored anyway), added before the folder is scanned. When
  the kernel refuses a watch (``ENOSPC``: ``fs.inotify.max_user_watches`` reached, or
  ``EMFILE``) the watcher does not stop: it logs ``watcher.watch_limit`` once and rescans the
  folders it could not watch (all of them, if ``outbox/`` itself is unwatched) every
  :data:`WATCH_LIMIT_RESCAN` seconds, trying to watch them again each time.

Producers should write a dotfile (or ``name.part``) in the destination folder and rename it
to its final name: that is both safe and the fastest path. A producer that writes the final
name in place and pauses for longer than ``settle`` (or an ``scp`` killed mid-transfer) can
get a truncated file taken: nothing in a file system says "this writer is finished".

Only direct children of ``outbox/<dest>/`` are handed over. Sub-folders (and the files in
them) are ignored and logged once; so are symlinks, other non-regular files, files lying
directly in ``outbox/`` and folders whose name is not a valid destination.

Threading: ``on_ready`` is only ever called from the thread that runs :meth:`OutboxWatcher.run`
(the watcher's single worker thread), one call at a time. watchdog's threads only put events
on a queue; the worker waits on that queue with a timeout equal to its next deadline.

Latency note (measured with watchdog 7.1): watchdog's inotify backend holds every unpaired
``IN_MOVED_FROM`` for 0.5 s (to pair it with an ``IN_MOVED_TO``) and its queue is FIFO, so
each file our callback moves *out* of the outbox stalled all later events by up to 0.5 s
(median 290 ms rename-in latency at 10 drops/s). Both halves of a rename come from one
syscall and are usually read together, so :meth:`OutboxWatcher.run` lowers that delay to
``MOVE_PAIRING_DELAY`` (20 ms; 0 mis-pairings in 500 renames with 3 CPU-burning threads).
A pairing can still be missed (the reader thread descheduled between the two halves for
longer than the delay, or a read() landing between them): watchdog then reports the halves
separately, *moved out* (empty destination) and *moved in* (empty source). Plain watchdog
reports them as *deleted* + *created*, which once sent a renamed-in file down the settle
path under load; with full events the moved-in half still takes the fast path, and a file
that was settling when its half moved out keeps settling when the same inode moves back in
(remembered for ``_MOVED_AWAY_MEMORY`` seconds).
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import itertools
import logging
import os
import queue
import stat
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

from maildrop import ids
from maildrop.errors import MaildropError

__all__ = [
    "MOVE_PAIRING_DELAY",
    "TEMP_SUFFIXES",
    "WATCH_LIMIT_RESCAN",
    "OutboxWatcher",
    "WatcherError",
    "is_temp_name",
]

log = logging.getLogger(__name__)

#: Name endings that mark a file still being written (compared case-insensitively).
TEMP_SUFFIXES: tuple[str, ...] = (".part", ".tmp", "~", ".swp", ".swx", ".crdownload")

#: Seconds watchdog's inotify backend waits to pair IN_MOVED_FROM with IN_MOVED_TO (see above).
MOVE_PAIRING_DELAY = 0.02

#: Seconds between rescans of the folders the kernel would not let us watch (at most
#: ``rescan_interval``): the latency of a drop there while the watch limit is reached.
WATCH_LIMIT_RESCAN = 2.0

# Longest the worker blocks before it looks at the stop event again.
_STOP_POLL = 0.2
# After an inotify overflow watchdog rebuilds its watches; rescan once that has happened.
_OVERFLOW_RESCAN_DELAY = 0.5
# Bound on the "already logged" memory, so a hostile outbox cannot grow it forever.
_MAX_WARNED = 10_000
# How long (seconds) the inode of a settling file that was moved out stays remembered, so
# that if it is moved back in (e.g. the second half of a rename watchdog did not pair) it
# keeps settling instead of taking the fast path; and how many such inodes at most.
_MOVED_AWAY_MEMORY = 60.0
_MAX_MOVED_AWAY = 10_000

_EVENT_FILTER: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]

# (size, mtime_ns, inode): a file is stable while this does not change.
_Sig = tuple[int, int, int]

# Requests put on the worker's queue beside watchdog's events.
_RESCAN = object()
_OVERFLOW = object()


class WatcherError(MaildropError):
    """File watching cannot go on (outbox missing or deleted, watchdog thread died)."""


def is_temp_name(name: str) -> bool:
    """True if ``name`` marks a file still being written, which must not be sent yet.

    Temp: empty, starting with ``.`` (dotfiles, rsync's ``.name.XXXXXX``, emacs ``.#name``),
    ``#name#`` (emacs autosave) or ending in one of :data:`TEMP_SUFFIXES` (any case).
    """
    if not name or name.startswith("."):
        return True
    if len(name) >= 2 and name.startswith("#") and name.endswith("#"):
        return True
    return name.lower().endswith(TEMP_SUFFIXES)


@dataclass
class _Candidate:
    dest: str
    sig: _Sig
    due: float
    token: int


class _Forwarder(FileSystemEventHandler):
    """Runs on watchdog's thread: only forwards events to the worker's queue."""

    def __init__(self, inbox: queue.SimpleQueue[object]) -> None:
        super().__init__()
        self._inbox = inbox

    def dispatch(self, event: FileSystemEvent) -> None:
        self._inbox.put(event)


class _OverflowHook(logging.Handler):
    """watchdog only *logs* an inotify overflow; turn that log record into a rescan request."""

    def __init__(self, inbox: queue.SimpleQueue[object]) -> None:
        super().__init__(logging.WARNING)
        self._inbox = inbox

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg).lower():
            self._inbox.put(_OVERFLOW)


def _new_observer(polling: bool) -> BaseObserver:
    """A PollingObserver, or the platform's observer; on Linux an inotify observer with
    ``generate_full_events``, so that an unpaired IN_MOVED_TO (a file renamed in from outside
    the outbox, or a rename whose halves were not paired) is a moved event with an empty
    source rather than a *created* event: it takes the fast path, not the settle path."""
    if polling:
        return PollingObserver()
    if getattr(Observer, "__name__", "") == "InotifyObserver":
        return Observer(generate_full_events=True)  # type: ignore[call-arg]
    return Observer()


def _shorten_move_pairing_delay() -> None:
    """Lower watchdog's IN_MOVED_FROM hold time (process-wide; only this module uses watchdog)."""
    try:
        from watchdog.observers import inotify_move_event_grouper as grouper
    except ImportError:  # not Linux, or watchdog changed its layout: correct, only slower
        return
    cls = getattr(grouper, "InotifyMoveEventGrouper", None)
    current = getattr(cls, "delay", None)
    if isinstance(current, int | float) and current > MOVE_PAIRING_DELAY:
        cls.delay = MOVE_PAIRING_DELAY  # type: ignore[union-attr]


class OutboxWatcher:
    """Hands every complete regular file in ``outbox/<dest>/`` to ``on_ready(path, dest)``.

    Invariants:
      - ``on_ready`` is called only from the thread inside :meth:`run`, never concurrently,
        and never after :meth:`run` has returned.
      - A file is offered once per appearance. ``on_ready`` is expected to move the file out of
        the outbox. If it raises, the error is logged and the path is offered again at the next
        rescan; if it returns but leaves the file in place, the file may be offered again at the
        next rescan (not before, unless it changes).
      - ``dest`` passed to ``on_ready`` always satisfies ``is_valid_destination``.
      - Sub-folders of destination folders are ignored for now (logged once).
    """

    def __init__(
        self,
        outbox: Path,
        on_ready: Callable[[Path, str], None],
        *,
        settle: float = 1.0,
        rescan_interval: float = 30.0,
        is_valid_destination: Callable[[str], bool] = ids.is_node_id,
        polling: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        if settle < 0:
            raise ValueError(f"settle must be >= 0, got {settle!r}")
        if rescan_interval <= 0:
            raise ValueError(f"rescan_interval must be > 0, got {rescan_interval!r}")
        self.outbox = Path(os.path.abspath(outbox))
        self.settle = float(settle)
        self.rescan_interval = float(rescan_interval)
        self.polling = polling
        self._on_ready = on_ready
        self._is_valid_destination = is_valid_destination
        self._log = logger or log
        self._root = str(self.outbox)
        self._inbox: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._run_lock = threading.Lock()
        self._stop = threading.Event()
        #: Set while :meth:`run` is watching: the watches are in place and the start rescan
        #: has been done (so anything dropped from now on is seen). Cleared when run() returns.
        self.watching = threading.Event()
        # Worker-thread state: only touched by the thread inside run().
        self._pending: dict[Path, _Candidate] = {}
        self._heap: list[tuple[float, int, Path]] = []
        self._tokens = itertools.count()
        self._held: dict[Path, _Sig] = {}
        # inode -> when a file that was still settling was moved out (see _on_file_moved).
        self._moved_away: dict[int, float] = {}
        self._warned: set[tuple[str, str]] = set()
        self._next_rescan = 0.0
        self._observer: BaseObserver | None = None
        self._watches: dict[str, ObservedWatch] = {}  # watched folder -> its watch
        self._unwatched: set[str] = set()  # folders the kernel would not let us watch
        self._next_limited_rescan = 0.0

    # ------------------------------------------------------------------ public

    def run(self, stop: threading.Event) -> None:
        """Watch until ``stop`` is set; the calling thread becomes the worker thread.

        Starts a watchdog ``Observer`` (``PollingObserver`` if ``polling``; use that on NFS,
        CIFS, SSHFS) on the outbox, recursively, then rescans it. Returns within about 0.2 s
        of ``stop`` being set (plus the duration of an ``on_ready`` call in progress).

        Raises :class:`WatcherError` if the outbox is missing, is deleted or moved away, or a
        watchdog thread dies; ``OSError`` if the watches cannot be set up (e.g. the inotify
        watch limit). Anything ``on_ready`` raises that is not an ``Exception`` propagates.
        Files still settling when it returns are picked up by the next run's first rescan.
        """
        if not self._run_lock.acquire(blocking=False):
            raise RuntimeError("OutboxWatcher.run() is already running")
        try:
            self._stop = stop
            self._pending.clear()
            self._heap.clear()
            self._held.clear()
            self._moved_away.clear()
            self._watches.clear()
            self._unwatched.clear()
            if not self.outbox.is_dir():
                raise WatcherError(f"outbox {self._root} is not a directory")
            _shorten_move_pairing_delay()
            observer = _new_observer(self.polling)
            hook = _OverflowHook(self._inbox)
            wd_logger = logging.getLogger("watchdog.observers.inotify_c")
            wd_logger.addHandler(hook)
            try:
                # Started with no watch, each schedule() puts its watch in place before it
                # returns (or raises at once when the kernel refuses it): the first rescan,
                # which watches each folder before it lists it, misses nothing.
                observer.start()
                self._observer = observer
                self._watch(self._root)
                self._log.info(
                    "watching %s (%s, settle %.2fs, rescan every %.0fs)",
                    self._root,
                    "polling" if self.polling else "inotify",
                    self.settle,
                    self.rescan_interval,
                )
                self._loop(observer)
            finally:
                self.watching.clear()
                self._observer = None
                wd_logger.removeHandler(hook)
                observer.stop()
                if observer.ident is not None:
                    observer.join(timeout=10)
        finally:
            self._run_lock.release()

    def rescan(self) -> None:
        """Ask the worker to walk every ``outbox/<dest>/`` now. Thread-safe, returns at once.

        Files found go through the settle check, so they are handed over ``settle`` seconds
        later at the earliest. Paths whose ``on_ready`` failed are offered again. If the
        watcher is not running, the walk happens when :meth:`run` starts (it rescans anyway).
        """
        self._inbox.put(_RESCAN)

    # ------------------------------------------------------------------ worker loop

    def _loop(self, observer: BaseObserver) -> None:
        self._scan_all("start")
        self._next_rescan = time.monotonic() + self.rescan_interval
        self.watching.set()
        while not self._stop.is_set():
            self._check_observer(observer)
            now = time.monotonic()
            if now >= self._next_rescan:
                self._scan_all("periodic")
                self._next_rescan = now + self.rescan_interval
            elif self._unwatched and now >= self._next_limited_rescan:
                self._scan_unwatched()
            self._run_due()
            if self._stop.is_set():
                break
            wake = self._next_rescan
            if self._unwatched:
                wake = min(wake, self._next_limited_rescan)
            if self._heap:
                wake = min(wake, self._heap[0][0])
            timeout = min(max(wake - time.monotonic(), 0.0), _STOP_POLL)
            try:
                item = self._inbox.get(timeout=timeout)
            except queue.Empty:
                continue
            self._handle(item)

    def _check_observer(self, observer: BaseObserver) -> None:
        """Raise if watchdog stopped, or stopped watching ``outbox/``; a destination folder
        whose watch ended (the folder went away) is forgotten and watched again if it
        comes back."""
        if not observer.is_alive():
            raise WatcherError(f"watchdog stopped watching {self._root}")
        for emitter in list(observer.emitters):
            if emitter.is_alive():
                continue
            path = os.fsdecode(emitter.watch.path)
            if path == self._root:
                raise WatcherError(f"watchdog stopped watching {self._root}")
            self._unwatch(path)

    # ------------------------------------------------------------------ watches

    def _watch(self, folder: str) -> None:
        """Watch ``folder`` (not recursively) unless it is watched; a refusal by the kernel
        (watch or instance limit) makes it a folder rescanned every WATCH_LIMIT_RESCAN s."""
        if folder in self._watches or self._observer is None:
            return
        try:
            self._watches[folder] = self._observer.schedule(
                _Forwarder(self._inbox), folder, recursive=False, event_filter=_EVENT_FILTER
            )
        except OSError as exc:
            if exc.errno not in (errno.ENOSPC, errno.EMFILE):
                if folder == self._root:
                    raise
                self._warn_once("watch", folder, "cannot watch %s: %s", folder, exc)
                return
            if not self._unwatched:
                every = min(WATCH_LIMIT_RESCAN, self.rescan_interval)
                self._log.warning(
                    "watcher.watch_limit folder=%s error=%s: the kernel refuses more inotify "
                    "watches (raise fs.inotify.max_user_watches); falling back to rescans "
                    "every %gs for the folders not watched",
                    folder, exc.strerror or exc, every,
                )
                self._next_limited_rescan = time.monotonic() + every
            self._unwatched.add(folder)
            return
        self._unwatched.discard(folder)

    def _unwatch(self, folder: str) -> None:
        self._unwatched.discard(folder)
        watch = self._watches.pop(folder, None)
        if watch is not None and self._observer is not None:
            with contextlib.suppress(KeyError, OSError):
                self._observer.unschedule(watch)

    def _scan_unwatched(self) -> None:
        """The fallback for folders the kernel would not let us watch: watch them again if
        it lets us now, and list them (everything, if ``outbox/`` itself is unwatched)."""
        self._next_limited_rescan = time.monotonic() + min(WATCH_LIMIT_RESCAN, self.rescan_interval)
        if self._root in self._unwatched:
            self._watch(self._root)
            self._scan_all("unwatched")
            return
        for folder in sorted(self._unwatched):
            self._watch(folder)
            path = Path(folder)
            self._scan_folder(path, path.name)

    def _handle(self, item: object) -> None:
        if item is _RESCAN:
            self._scan_all("requested")
            return
        if item is _OVERFLOW:
            self._log.warning("inotify queue overflowed: events lost, rescanning %s", self._root)
            self._next_rescan = min(self._next_rescan, time.monotonic() + _OVERFLOW_RESCAN_DELAY)
            return
        if not isinstance(item, FileSystemEvent):
            return
        src = os.fsdecode(item.src_path)
        if isinstance(item, FileMovedEvent):
            self._on_file_moved(src, os.fsdecode(item.dest_path))
        elif isinstance(
            item, FileCreatedEvent | FileModifiedEvent | FileAttribEvent | FileClosedEvent
        ):
            target = self._file_target(src)
            if target is not None:
                self._schedule(*target, from_scan=False)
        elif isinstance(item, FileDeletedEvent):
            self._forget(Path(src))
        elif isinstance(item, DirCreatedEvent):
            self._on_dir_appeared(src)
        elif isinstance(item, DirMovedEvent):
            if src == self._root:
                raise WatcherError(f"outbox {self._root} was moved away")
            if src:
                self._unwatch(src)
            self._on_dir_appeared(os.fsdecode(item.dest_path))
        elif isinstance(item, DirDeletedEvent):
            if src == self._root:
                raise WatcherError(f"outbox {self._root} was deleted")
            self._unwatch(src)

    # ------------------------------------------------------------------ events

    def _on_file_moved(self, src: str, dest: str) -> None:
        """A rename. ``src`` is empty when the file came from outside the watched tree (or
        watchdog did not pair the two halves of the rename); ``dest`` is empty when it left."""
        was_settling = False
        if src:
            src_path = Path(src)
            settling = self._pending.pop(src_path, None)
            self._held.pop(src_path, None)
            was_settling = settling is not None
            if settling is not None and not dest:
                self._remember_moved_away(settling.sig[2])
        if not dest:
            return
        target = self._file_target(dest)
        if target is None:
            return
        path, node = target
        sig = self._probe(path)
        if sig is None:
            self._pending.pop(path, None)
            return
        if not src and self._moved_away.pop(sig[2], None) is not None:
            was_settling = True  # moved out while it was settling, and now back in
        if was_settling:
            # Renamed while it was still being written in place: keep settling.
            self._pending.pop(path, None)
            self._add_candidate(path, node, sig)
            return
        self._hand_over(path, node, sig, how="renamed in")

    def _remember_moved_away(self, inode: int) -> None:
        now = time.monotonic()
        expired = [i for i, at in self._moved_away.items() if now - at > _MOVED_AWAY_MEMORY]
        for i in expired:
            del self._moved_away[i]
        if len(self._moved_away) >= _MAX_MOVED_AWAY:
            self._moved_away.pop(next(iter(self._moved_away)))  # the oldest
        self._moved_away[inode] = now

    def _on_dir_appeared(self, path: str) -> None:
        parts = self._parts(path)
        if parts is None:
            return
        if len(parts) == 1:
            if self._valid_folder(parts[0]):
                # Moved in with files already inside, or files created before the watch: scan.
                self._watch(path)
                self._scan_folder(Path(path), parts[0])
        elif len(parts) == 2 and self._valid_folder(parts[0]):
            self._warn_once(
                "subdir",
                path,
                "ignoring sub-folder %s: only files directly in a destination folder are sent",
            )

    def _forget(self, path: Path) -> None:
        self._pending.pop(path, None)
        self._held.pop(path, None)

    # ------------------------------------------------------------------ classification

    def _parts(self, path: str) -> list[str] | None:
        """Path components below the outbox, or None if ``path`` is not below it."""
        prefix = self._root + os.sep
        if not path.startswith(prefix):
            return None
        return path[len(prefix) :].split(os.sep)

    def _file_target(self, path: str) -> tuple[Path, str] | None:
        """(path, dest) if ``path`` is a final name directly inside a valid destination folder."""
        parts = self._parts(path)
        if parts is None:
            return None
        if len(parts) == 1:
            if not is_temp_name(parts[0]):
                self._warn_once(
                    "loose", path, "ignoring %s: drop files into outbox/<NodeId>/, not outbox/"
                )
            return None
        if len(parts) != 2 or not self._valid_folder(parts[0]) or is_temp_name(parts[1]):
            return None
        return Path(path), parts[0]

    def _valid_folder(self, name: str) -> bool:
        if self._is_valid_destination(name):
            return True
        if is_temp_name(name):
            self._log.debug("ignoring temp-named folder outbox/%s", name)
        else:
            self._warn_once("dest", name, "ignoring folder outbox/%s: not a valid node id")
        return False

    def _probe(self, path: Path) -> _Sig | None:
        """The file's signature, or None if it is gone or not a regular file (logged once)."""
        try:
            st = os.lstat(path)
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            self._warn_once("stat", str(path), "cannot stat %s: %s", path, exc)
            return None
        if stat.S_ISLNK(st.st_mode):
            self._warn_once("symlink", str(path), "refusing symlink %s: drop the file itself")
            return None
        if not stat.S_ISREG(st.st_mode):
            if not stat.S_ISDIR(st.st_mode):
                self._warn_once("special", str(path), "refusing %s: not a regular file")
            return None
        return (st.st_size, st.st_mtime_ns, st.st_ino)

    def _warn_once(self, kind: str, key: str, msg: str, *args: object) -> None:
        """Log ``msg % (args or (key,))`` the first time (kind, key) is seen."""
        if (kind, key) in self._warned:
            return
        if len(self._warned) >= _MAX_WARNED:
            self._warned.clear()
        self._warned.add((kind, key))
        self._log.warning(msg, *(args or (key,)))

    # ------------------------------------------------------------------ settle timers

    def _schedule(self, path: Path, dest: str, *, from_scan: bool) -> None:
        """(Re)start the settle clock for ``path``; a scan never pushes back a running clock."""
        if from_scan and path in self._pending:
            return
        sig = self._probe(path)
        if sig is None:
            self._pending.pop(path, None)
            return
        cand = self._pending.get(path)
        if cand is None:
            self._add_candidate(path, dest, sig)
        else:
            # Its one heap entry stays; when it pops early it is pushed again at cand.due.
            cand.sig = sig
            cand.due = time.monotonic() + self.settle

    def _add_candidate(self, path: Path, dest: str, sig: _Sig) -> None:
        cand = _Candidate(dest, sig, time.monotonic() + self.settle, next(self._tokens))
        self._pending[path] = cand
        heapq.heappush(self._heap, (cand.due, cand.token, path))

    def _run_due(self) -> None:
        """Check every candidate whose deadline has passed; hand over the stable ones."""
        while self._heap and not self._stop.is_set():
            now = time.monotonic()
            due, token, path = self._heap[0]
            if due > now:
                return
            heapq.heappop(self._heap)
            cand = self._pending.get(path)
            if cand is None or cand.token != token:
                continue  # stale entry
            if cand.due > now:
                heapq.heappush(self._heap, (cand.due, token, path))
                continue
            sig = self._probe(path)
            if sig is None:
                del self._pending[path]
            elif sig != cand.sig:
                cand.sig = sig
                cand.due = now + self.settle
                heapq.heappush(self._heap, (cand.due, token, path))
            elif self._held.get(path) == sig:
                del self._pending[path]  # offered already and unchanged: wait for a rescan
            else:
                self._hand_over(path, cand.dest, sig, how="settled")

    # ------------------------------------------------------------------ hand-over

    def _hand_over(self, path: Path, dest: str, sig: _Sig, *, how: str) -> None:
        self._pending.pop(path, None)
        self._log.debug("handing over %s for %s (%s, %d bytes)", path, dest, how, sig[0])
        try:
            self._on_ready(path, dest)
        except Exception:
            self._log.exception("taking %s failed; will retry at the next rescan", path)
            self._held[path] = sig
            return
        try:
            st = os.lstat(path)
        except OSError:
            self._held.pop(path, None)
            return
        if st.st_ino == sig[2]:
            # Left in place by the callback: offer it again at the next rescan, not before.
            self._held[path] = (st.st_size, st.st_mtime_ns, st.st_ino)

    # ------------------------------------------------------------------ scanning

    def _scan_all(self, reason: str) -> None:
        """Walk every destination folder; found files start settling. Retries held paths."""
        self._held.clear()
        try:
            entries = list(os.scandir(self._root))
        except (FileNotFoundError, NotADirectoryError) as exc:
            raise WatcherError(f"outbox {self._root} is gone") from exc
        before = len(self._pending)
        for entry in entries:
            if entry.is_symlink():
                self._warn_once("symlink", entry.path, "refusing symlink %s in the outbox")
            elif entry.is_dir(follow_symlinks=False):
                if self._valid_folder(entry.name):
                    if entry.path not in self._unwatched:  # those are retried on their own clock
                        self._watch(entry.path)
                    self._scan_folder(Path(entry.path), entry.name)
            elif not is_temp_name(entry.name):
                self._warn_once(
                    "loose",
                    entry.path,
                    "ignoring %s: drop files into outbox/<NodeId>/, not outbox/",
                )
        self._log.debug(
            "rescan (%s) of %s: %d new candidates", reason, self._root, len(self._pending) - before
        )

    def _scan_folder(self, folder: Path, dest: str) -> None:
        try:
            it = os.scandir(folder)
        except (FileNotFoundError, NotADirectoryError):
            return
        except OSError as exc:
            self._warn_once("scan", str(folder), "cannot list %s: %s", folder, exc)
            return
        with it:
            for entry in it:
                if is_temp_name(entry.name):
                    continue
                if entry.is_symlink():
                    self._warn_once(
                        "symlink", entry.path, "refusing symlink %s: drop the file itself"
                    )
                elif entry.is_dir(follow_symlinks=False):
                    self._warn_once(
                        "subdir",
                        entry.path,
                        "ignoring sub-folder %s: only files directly in a destination folder are sent",
                    )
                else:
                    self._schedule(Path(entry.path), dest, from_scan=True)
