"""Custody of file bytes: take from the outbox, receive from a peer, deliver, send to a hop.

Part of the imperative shell. It owns no transfer state: the custody service
(``custodian.Custodian``) owns that and calls the durable steps here, which drive ``spool``
(files) and ``eventlog`` (facts) in the order that makes every crash safe. Record before acting:

- take:    intent -> rename into the spool (``<tid>.plain``) -> fsync the folders -> seal
           into ``<tid>.data`` (age, to the destination's key and ours; hashed as written)
           -> the files' data synced (one fsync each, or one syncfs for a batch) -> one
           append of every ``transfer.queued`` -> the plaintext copies removed -> the
           service is told.
- receive: bytes into ``<tid>.part`` -> verify size+sha256 -> (the receiving thread) the
           batch's data synced -> the service commits the batch: every part renamed to
           ``<tid>.data``, one spool-folder fsync, ONE append of the batch's
           ``transfer.relayed`` facts (or, at the destination, delivery) -> answer ``stored``.
- deliver: (sealed, on the receiving thread, before the commit) decrypt into
           ``<tid>.open``, fsync, check it against the envelope -> hard-link into
           ``inbox/<origin>/`` (never overwriting) -> one fsync per inbox folder -> one
           append of the batch's ``transfer.delivered`` -> drop the spool copies.
- send:    nobody lets go on the receiver's ``stored`` (or ``have``) alone: the origin waits
           for the receipt, a relay for the hop's signed ``transfer.relayed``.
- give up: the reason into the spool meta -> (sealed) our own copy decrypted -> the file
           to ``failed/`` -> ``transfer.failed`` (``expire``; a crash in between is finished
           by ``recover``).
- offers:  a transfer is ``(origin, id)``; while bytes of an id are here, an offer of another
           queued event for it is refused (``conflicting-offer``), never taken in its place;
           an offer of a transfer its origin gave up on (``transfer.failed``: cancelled or
           expired) is refused (``failed``).

``recover()`` finishes whatever a crash interrupted, from the spool and the log alone, and
returns what is in custody for the service to own.

The hop protocol (docs/protocol.md): ``offer`` {files} -> ``answers`` (accept from an
offset / have / pending / refuse, per file) -> the accepted files' bytes back to back ->
``stored`` {results} once the receiver's group commit is durable.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from . import events as E
from . import ids
from .errors import InvalidEvent, ProtocolError, TransferRefused
from .eventlog import EventLog
from .events import Event, parse_event, parse_ts
from .failpoints import failpoint
from .keys import NodeKey
from .metrics import Metrics
from .model import DELIVERED, FAILED
from .protocol import ANSWERS, MAX_BATCH, OFFER_BUDGET, RESULTS, Frame, FrameStream, check_list, cut
from .seal import Envelope, Keyring, Names, SealError, WriteFailed, seal_envelope, seal_file
from .spool import (
    FolderRefused,
    Refused,
    Spool,
    check_outbox_file,
    find_link,
    fsync_dir,
    hash_file,
    link_unique_at,
    move_to_failed,
    open_folder,
    sync_files,
)

log = logging.getLogger("maildrop.transfers")

CHUNK = 1024 * 1024
CUT_THROUGH_MIN = 8 * 1024 * 1024
FLUSH_FROM = 64 * 1024 * 1024  # files from this size are written back while they arrive
FLUSH_EVERY = 0.25  # smaller files are stored, then forwarded
SENDER_XATTR = "user.maildrop.from"
MAX_ROUTE = 64
STALE_MARGIN = 3600.0
"""Seconds past ``transfers.expire_after`` after which an offer is refused for good
(``stale``), whatever its route: by then its origin has given up (or it was delivered), so
the destination's exactly-once memory (``FactStore.delivered``) need not outlive that
horizon. Covers the clock skew a queued time is believed within (``CLOCK_SKEW``)."""
MAX_INLINE_FACTS = 4
"""Signed facts one per-file word of ``answers`` / ``stored`` carries at most (``facts``)."""
CLOCK_SKEW = 3600.0
"""How far ahead of our clock a peer's ``transfer.queued`` time is believed. A relay's
``queued_at`` is that time clamped to [receive time - ``stale_after``, receive time +
CLOCK_SKEW], so a date far in the future cannot keep a copy forever and one far in the past
cannot make it go at once. Our own events use our own clock unclamped."""


@dataclass
class Progress:
    """Bytes of one transfer moving now (status). ``cond`` guards ``done`` and ``finished``
    for the cut-through reader; the writer is the one thread moving those bytes."""

    transfer: str
    direction: str  # "out" or "in"
    peer: str
    size: int
    done: int = 0
    started: float = 0.0
    finished: bool | None = None  # incoming only: True once stored, False if it failed
    cond: threading.Condition = field(default_factory=threading.Condition)

    def advance(self, n: int) -> None:
        with self.cond:
            self.done += n
            self.cond.notify_all()

    def finish(self, ok: bool) -> None:
        with self.cond:
            self.finished = ok
            self.cond.notify_all()

    def as_dict(self) -> dict[str, Any]:
        return {"transfer": self.transfer, "direction": self.direction, "peer": self.peer,
                "size": self.size, "bytes": self.done}


class _Flusher:
    """Writes a big incoming file back to disk while it still arrives (fdatasync every
    ``FLUSH_EVERY`` s on its own thread), so the fsync before "stored" finds little left to
    do. Durability still comes only from that final fsync."""

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="flush", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(FLUSH_EVERY):
            try:
                os.fdatasync(self._fd)
            except OSError:
                return

    def stop(self) -> None:
        if not self._done.is_set():
            self._done.set()
            self._thread.join()


class _Opener:
    """At the destination: decrypts a sealed part into ``<tid>.open`` on its own thread while
    the part still arrives (``Progress`` says how far it is), so the file is open about when
    its last byte lands instead of one whole read of the part later. The ``.open`` is written
    back while it grows (``_Flusher``) and synced with the batch, as before; what it holds is
    trusted only once its part passed its hash and ``join`` says it matched its envelope.
    ``cancel`` (the part failed, the offer broke) stops it and waits for it. The thread is the
    only writer of ``error`` until ``join``/``cancel`` returns."""

    def __init__(self, custody: Custody, queued: Event, prog: Progress) -> None:
        self._prog = prog
        self._cancelled = False  # under prog.cond
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(custody, queued), name="open", daemon=True)
        self._thread.start()

    def _ready(self, n: int) -> int:
        prog = self._prog
        with prog.cond:
            while prog.done <= n < prog.size and prog.finished is None and not self._cancelled:
                prog.cond.wait(1.0)
            if n < prog.size and (self._cancelled or prog.done <= n):
                raise OSError("the incoming copy stopped")
            return prog.done

    def _run(self, custody: Custody, queued: Event) -> None:
        tid = queued.data["transfer"]
        try:
            custody._decrypt(queued, custody.spool.part(tid), custody.spool.opened(tid), self._ready)
        except BaseException as exc:  # SealError (the bytes) or OSError (the disk): join() says
            self.error = exc

    def join(self) -> BaseException | None:
        """Wait for the decryption; None when the ``.open`` matched its envelope."""
        self._thread.join()
        return self.error

    def cancel(self) -> None:
        with self._prog.cond:
            self._cancelled = True
            self._prog.cond.notify_all()
        self._thread.join()


@dataclass(frozen=True)
class Offered:
    """One checked file of an incoming offer."""

    transfer: str
    queued: Event
    route: tuple[str, ...]  # the nodes before us that signed facts vouch for, then the sender


@dataclass(frozen=True)
class Answer:
    """The receiver's word on one offered file: ``accept`` (from ``offset``), ``have``,
    ``pending`` (held here, delivery waits: ``detail``) or ``refuse`` (``reason``); after
    the bytes: ``stored``, ``pending`` or ``refuse``."""

    a: str
    offset: int = 0
    reason: str = ""
    detail: str = ""
    # The receiver's signed facts for the sender (``have``, ``stored``): its
    # ``transfer.relayed``, the destination's ``transfer.delivered`` (docs/protocol.md).
    facts: tuple[Event, ...] = ()

    def wire(self) -> dict[str, Any]:
        """As sent in ``answers`` / ``stored`` (see ``protocol.ANSWERS`` and ``RESULTS``)."""
        if self.a == "accept":
            return {"a": "accept", "offset": self.offset}
        if self.a == "refuse":
            return {"a": "refuse", "reason": self.reason, "detail": self.detail}
        if self.a == "pending":
            return {"a": "pending", "detail": self.detail}
        out: dict[str, Any] = {"a": self.a}  # have, stored
        if self.facts:
            out["facts"] = [e.to_dict() for e in self.facts[:MAX_INLINE_FACTS]]
        return out


class Owner(Protocol):
    """What the receiving side asks of the custody service (the consumer owns the interface)."""

    def admit(self, peer: str, files: list[Offered]) -> list[Answer]: ...
    def commit(self, peer: str, files: list[Offered]) -> list[Answer]: ...
    def receive_failed(self, tids: Iterable[str], error: str) -> None: ...


@dataclass(frozen=True)
class Outgoing:
    """One file of an offer we make."""

    transfer: str
    queued: Event
    route: list[str]  # the route so far, ending with us


class Custody:
    """The durable steps of custody. Holds no transfer state of its own except caches:
    ``_queued`` (transfer id -> the claim this node deals with, read from any thread; only
    the custody service replaces one, and only a rival's that had no bytes here but a part),
    ``_resume_failed`` and ``names`` (opened envelopes). ``progress`` is guarded by
    ``progress_lock`` (a leaf: nothing else is taken while it is held). ``key`` may be None
    for a command that only reads (it then opens no envelope)."""

    def __init__(self, node_id: str, key: NodeKey | None, log_: EventLog, spool: Spool, inbox: Path,
                 failed: Path, *, max_file_size: int, min_free_space: int,
                 stale_after: float = 7 * 86400.0,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.me = node_id
        self.key = key
        self.keyring = Keyring.of(key)  # our key and the one before its rotation
        self.names = Names(self.keyring)  # names of sealed transfers, for logs and listings
        self.log = log_
        self.spool = spool
        self.inbox = inbox
        self.failed = failed
        self.max_file_size = max_file_size
        self.min_free_space = min_free_space
        # Parts not written to for this long, and whole copies nobody holds (no queued
        # event came) older than twice this, are swept (see ``sweep``).
        self.stale_after = stale_after
        self.on_change = on_change
        self.silence_after = 15.0  # a sender silent this long mid-offer is gone (the agent sets it)
        # Told of every transfer this node has just queued (take, replayed take).
        self.on_taken: Callable[[list[Event]], None] = lambda _evs: None
        # Called when a relay starts receiving a big file, to forward it while it arrives.
        self.on_receiving: Callable[[Event, tuple[str, ...], Progress, int], None] | None = None
        self.metrics = Metrics()  # counting hooks; the agent sets its own (no-ops by default)
        # Routes a fact to one node with custody (``Notices.send``: the agent sets it; it may
        # raise notices.QueueFull, the fact then stays recorded here only); a no-op here.
        self.notify: Callable[[str, Event], None] = lambda _to, _ev: None
        self.progress_lock = threading.Lock()
        self.progress: dict[tuple[str, str], Progress] = {}
        # transfer id -> the claim (the origin's signed queued event) this node deals with for
        # that id: one it took, accepted bytes for, or recovered. Never replaced by an offer.
        self._queued: dict[str, Event] = {}
        self._resume_failed: set[str] = set()  # parts already cut back once after a bad resume
        # Copies to unlink in the background (``let_go``); ``_reaper_lock`` guards starting
        # the reaper thread once (a leaf lock).
        self._doomed: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()
        self._reaper: threading.Thread | None = None
        self._reaper_lock = threading.Lock()

    # -- helpers ----------------------------------------------------------------------------
    def append(self, items: list[tuple[str, dict[str, Any]]]) -> list[Event]:
        """Append our own facts in one write (one fdatasync)."""
        if not items:
            return []
        evs = self.log.append_own(self.key, self.me, items, time.time())
        self.on_change()
        return evs

    def queued_event(self, tid: str) -> Event | None:
        """The claim this node deals with for ``tid``: from memory, the spool meta, or (once,
        then remembered) the log, where a rival claim never displaces ours (``_pick``)."""
        ev = self._queued.get(tid)
        if ev is not None:
            return ev
        meta = self.spool.read_meta(tid)
        if meta and isinstance(meta.get("queued"), dict):
            try:
                ev = parse_event(meta["queued"])
            except InvalidEvent:
                ev = None
        if ev is None:
            found = [e for e in self.log.facts.facts_of(tid) if e.type == E.TRANSFER_QUEUED]
            ev = self._pick(tid, found)
        if ev is not None:
            self._queued[tid] = ev
        return ev

    def remember(self, queued: Event) -> None:
        """This node now deals with this claim for its id (bytes of it are arriving)."""
        self._queued[queued.data["transfer"]] = queued

    def _index_queued(self) -> None:
        """Remember the claim for every transfer not ended in the fact store (one query,
        before recovery; an ended one is looked up when its copy is met)."""
        found: dict[str, list[Event]] = {}
        for e in self.log.facts.open_facts():
            if e.type == E.TRANSFER_QUEUED:
                found.setdefault(e.data["transfer"], []).append(e)
        for tid, evs in found.items():
            ev = self._pick(tid, evs)
            if ev is not None:
                self._queued[tid] = ev

    def _pick(self, tid: str, evs: list[Event]) -> Event | None:
        """Of the queued events for ``tid`` in the log, the one this node holds: the only
        one; else our own (we minted the id); else the one whose size and sha256 match the
        whole copy in our spool. None when that cannot be told (several claims, no copy)."""
        claims = {e.id: e for e in evs}
        if len(claims) <= 1:
            return next(iter(claims.values()), None)
        own = [e for e in claims.values() if e.origin == self.me]
        if own:
            return min(own, key=lambda e: e.seq)
        data = self.spool.data(tid)
        if not data.exists():
            return None
        size, sha = hash_file(data)
        match = [e for e in claims.values() if (e.data["size"], e.data["sha256"]) == (size, sha)]
        return min(match, key=lambda e: (e.origin, e.seq)) if match else None

    def _in_store(self, queued: Event) -> bool:
        """True once this queued event is held in the fact store."""
        return self.log.facts.has_fact(queued.id)

    def ended(self, tid: str, origin: str) -> str | None:
        """DELIVERED or FAILED when ``origin``'s claim on ``tid`` ended, by the model or, for
        one it no longer keeps, the fact store; else None."""
        with self.log.lock:
            tr = self.log.network.transfer(tid, origin)
            if tr is not None:
                return tr.state if tr.state in (DELIVERED, FAILED) else None
        state = self.log.facts.state_of(tid)
        return state if state in (DELIVERED, FAILED) else None

    def facts_for_sender(self, tid: str) -> tuple[Event, ...]:
        """Our facts a sender of ``tid`` waits for (our custody, the receipt), to go inline
        in a ``have`` or ``stored`` answer."""
        return tuple(e for e in self.log.facts.facts_of(tid)
                     if (e.type == E.TRANSFER_RELAYED and e.origin == self.me)
                     or e.type == E.TRANSFER_DELIVERED)[:MAX_INLINE_FACTS]

    def queued_at(self, origin: str, ts: str) -> float:
        """When a transfer counts as queued here: our own time as is; a peer's clamped to
        ``CLOCK_SKEW`` ahead and ``stale_after`` back from now (an unparsable one is now)."""
        now = time.time()
        try:
            at = parse_ts(ts)
        except (ValueError, OverflowError):
            return now
        if origin == self.me:
            return at
        return min(max(at, now - self.stale_after), now + CLOCK_SKEW)

    def recipient_key(self, destination: str) -> str | None:
        """The key a file for ``destination`` is sealed to: its feed's current key (which
        follows its signed rotations), else its pinned key from our config; None when no
        key is known yet."""
        with self.log.lock:
            return self.log.ledger.key_of(destination) or self.log.ledger.pinned.get(destination)

    def name_of(self, queued: Event | None) -> str | None:
        """The file name of a claim as this node may know it (None: sealed, not ours)."""
        return self.names.name(queued.data) if queued is not None else None


    # -- take (origin) -------------------------------------------------------------------------
    def take(self, path: Path, destination: str) -> str | None:
        """Take custody of one complete file dropped into ``outbox/<destination>/``."""
        tids = self.take_batch([(path, destination)])
        return tids[0] if tids else None

    def take_batch(self, items: list[tuple[Path, str]]) -> list[str]:
        """Take custody of several complete outbox files with a handful of syncs in all.

        Crash: (1) an intent listing (transfer id, source, destination, name) is written
        durably; (2) each file is renamed into the spool as ``<tid>.plain``; (3) the spool
        and outbox folders are fsynced; (4) each file is sealed into ``<tid>.data`` (age, to
        the destination's key and ours: ``_queue``), the data synced, and one write appends
        every ``transfer.queued``; (5) the plaintext copies are removed (one spool fsync);
        (6) the intent is removed. Recovery replays an intent: a file still in the outbox was
        never taken (it will be taken again); a ``.plain`` without its queued event is checked
        again and sealed again from the start (a half-written ``.data`` is replaced); a
        ``.plain`` with its event is removed; a file with its event is done. Nothing is lost
        or queued twice, and a ``.data`` is vouched for only once it is whole and synced.

        A file for a destination whose key is not known yet (no feed of it here, no pinned
        key) is not taken: it stays in the outbox with one log line ``outbox.waiting … reason=no-key``
        and is taken at a rescan once gossip has brought the key (``outbox.rescan_interval``);
        one that waited ``stale_after`` (the agent's ``transfers.expire_after``) goes to
        ``failed/`` with the reason (``_wait_for_key``).

        Only the very file checked is taken, whatever a local user swaps meanwhile:
        ``outbox/<dest>`` is opened ``O_DIRECTORY|O_NOFOLLOW`` and the file is looked at and
        renamed relative to that descriptor, never following a symlink; it must be a regular
        file with one link, none of the agent's own files (key, ``state/``) and readable; what
        arrived in the spool must be that same inode, is made private (mode 0640, no ACL)
        and is hashed from a descriptor held on it. Errors are per file: a refused file is
        left in the outbox (a swapped entry is put back) with one log line
        ``outbox.refused path=… reason=symlink|hardlink|not-regular|own-file|unreadable|changed``;
        one that cannot be read once taken goes to ``failed/`` with the reason; the other
        files of the batch are queued.
        """
        protected = self._protected()
        folders: dict[Path, int] = {}  # outbox/<dest> -> an O_NOFOLLOW descriptor on it
        fds: dict[str, int] = {}  # transfer id -> a descriptor on its taken file
        try:
            entries: list[dict[str, Any]] = []
            checked: dict[str, os.stat_result] = {}
            seen: set[Path] = set()
            for path, destination in items:
                if path in seen:
                    continue
                seen.add(path)
                try:
                    dir_fd = self._outbox_folder(path.parent, folders, protected)
                    st = check_outbox_file(dir_fd, path.name, protected)
                except FileNotFoundError:
                    continue
                except (Refused, FolderRefused) as exc:
                    self._refuse(path, None, exc.reason)
                    continue
                name = ids.safe_file_name(path.name)
                if name is None:
                    final = move_to_failed(Path(path.name), self.failed,
                                           f"unsafe-name-{secrets.token_hex(4)}",
                                           f"the file name {path.name!r} cannot be sent safely; rename it",
                                           src_dir_fd=dir_fd)
                    log.warning("outbox.refused path=%s reason=unsafe-name moved_to=%s", path, final)
                    continue
                if self.recipient_key(destination) is None:
                    self._wait_for_key(path, dir_fd, st, name, destination)
                    continue
                tid = secrets.token_hex(16)
                checked[tid] = st
                entries.append({"transfer": tid, "src": str(path), "destination": destination,
                                "name": name, "size_hint": st.st_size, "seal": 1})
            if not entries:
                return []
            intent = self.spool.write_intent(entries)
            moved = []
            for e in entries:
                src, tid = Path(e["src"]), e["transfer"]
                try:
                    fds[tid] = self.spool.move_in_at(folders[src.parent], src.name, tid,
                                                     checked[tid], protected)
                except FileNotFoundError:  # taken away meanwhile (by its owner): nothing to send
                    continue
                except Refused as exc:
                    self._refuse(src, checked[tid], exc.reason)
                    continue
                except PermissionError:
                    log.error("outbox.take.refused path=%s reason=permission-denied: the agent cannot "
                              "move files out of %s; make it writable by the agent's group "
                              "(chmod 2770, or setfacl -d -m g:maildrop:rwX on outbox/)",
                              src, src.parent)
                    continue
                moved.append(e)
            fsync_dir(self.spool.folder)
            for folder in {Path(e["src"]).parent for e in moved}:
                os.fsync(folders[folder])
            queued = self._queue(moved, fds)
            intent.unlink()
            return queued
        finally:
            for fd in list(fds.values()) + list(folders.values()):
                os.close(fd)

    def _wait_for_key(self, path: Path, dir_fd: int, st: os.stat_result, name: str,
                      destination: str) -> None:
        """Leave an outbox file whose destination has no known key where it is (logged once),
        or, once it has waited there ``stale_after`` since it appeared (its ctime), move it
        to ``failed/`` with the reason: a file for a node that never appears is not kept for
        ever, just as a queued one expires."""
        waited = time.time() - st.st_ctime
        if waited < self.stale_after:
            if self.spool.first_refusal(path, st, "no-key"):
                log.warning("outbox.waiting path=%s destination=%s reason=no-key: no key of %s is "
                            "known yet, so the file cannot be sealed to it; it stays in the outbox "
                            "and is taken once gossip brings the key", path, destination, destination)
            return
        final = move_to_failed(Path(path.name), self.failed, name,
                               f"{path} for {destination} was not sent: no key of {destination} "
                               f"became known within {self.stale_after:.0f} s (is the node id right? "
                               "does a route reach it?)", src_dir_fd=dir_fd)
        log.warning("outbox.refused path=%s reason=no-key waited=%.0f moved_to=%s", path, waited, final)

    def _protected(self) -> set[tuple[int, int]]:
        """(st_dev, st_ino) of what must never be taken: the key, its .pub, ``state/``,
        the spool."""
        out = set()
        for p in (self.key.path, self.key.path.with_name(self.key.path.name + ".pub"),
                  self.spool.folder.parent, self.spool.folder):
            try:
                st = os.stat(p)
            except OSError:
                continue
            out.add((st.st_dev, st.st_ino))
        return out

    def _outbox_folder(self, folder: Path, folders: dict[Path, int],
                       protected: set[tuple[int, int]]) -> int:
        """An ``O_DIRECTORY|O_NOFOLLOW`` descriptor on ``outbox/<dest>`` (cached in
        ``folders``); raises FolderRefused for a symlink there, Refused for an own folder."""
        fd = folders.get(folder)
        if fd is None:
            fd = open_folder(folder)
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in protected:
                os.close(fd)
                raise Refused("own-file", "this is one of the agent's own folders")
            folders[folder] = fd
        return fd

    def _refuse(self, path: Path, st: os.stat_result | None, reason: str) -> None:
        if self.spool.first_refusal(path, st, reason):
            log.warning("outbox.refused path=%s reason=%s: left where it is", path, reason)

    def _queue(self, entries: list[dict[str, Any]], fds: dict[str, int]) -> list[str]:
        """Seal taken files, make them durable and append their ``transfer.queued`` events in
        one write; returns the transfer ids queued. A file is read from its descriptor in
        ``fds`` (closed here), else (recovery) opened and checked again: a refused one is put
        back into its outbox folder. Each is read once, sealed into ``<tid>.data`` (to the
        destination's key and ours) and hashed as it is written; its envelope (name, origin,
        plaintext size and sha256) is sealed to the same keys. One that cannot be read goes
        to ``failed/``; a write that fails (a full disk) raises, and the intent replays the
        take later. The sealed copies are made durable together (``sync_files``: one fsync
        each, or one syncfs for a batch) before the event: a queued event never vouches for
        bytes that are only in the page cache. Only after the append do the plaintext copies
        go (one spool fsync)."""
        items = []
        plain_size: dict[str, int] = {}
        protected: set[tuple[int, int]] | None = None
        for e in entries:
            tid = e["transfer"]
            dest_key = self.recipient_key(e["destination"])
            if dest_key is None:  # a pinned key a reload removed before a replay: wait for it
                self._put_back(e, "no-key")
                continue
            keys = [dest_key, self.key.public_line]
            try:
                fd = fds.pop(tid, None)
                if fd is None:
                    protected = protected if protected is not None else self._protected()
                    fd = self.spool.open_taken(tid, protected)
                try:
                    try:
                        out = self.spool.create(self.spool.data(tid))
                    except OSError as exc:  # a full disk or no descriptor left: try again later
                        raise WriteFailed(exc.errno, f"creating the ciphertext: {exc.strerror}") from None
                    # A big ciphertext is written back while it is sealed, so the sync
                    # before the event finds little left (durability is still that sync).
                    flusher = _Flusher(out) if os.fstat(fd).st_size >= FLUSH_FROM else None
                    try:
                        sealed = seal_file(fd, out, keys)
                    finally:
                        if flusher is not None:
                            flusher.stop()
                        os.close(out)
                    log.debug("transfer.sealed transfer=%s sealed_size=%d", tid, sealed.size)
                finally:
                    os.close(fd)
            except Refused as exc:
                self._put_back(e, exc.reason)
                continue
            except WriteFailed:
                raise
            except OSError as exc:
                self.spool.discard(tid, sync=False)  # a partial ciphertext
                try:
                    final = move_to_failed(self.spool.plain(tid), self.failed, e["name"],
                                           f"{e['src']} could not be read once taken: {exc}")
                except OSError as exc2:
                    log.error("outbox.take.failed path=%s error=%s: kept as %s (not queued)",
                              e["src"], exc2, self.spool.plain(tid))
                    continue
                log.warning("outbox.refused path=%s reason=unreadable error=%s moved_to=%s",
                            e["src"], exc, final)
                continue
            env = Envelope(e["name"], self.me, sealed.plain_size, sealed.plain_sha256)
            plain_size[tid] = sealed.plain_size
            items.append((E.TRANSFER_QUEUED, {"transfer": tid, "destination": e["destination"],
                                              "sealed": seal_envelope(env, keys),
                                              "size": sealed.size, "sha256": sealed.sha256}))
        if not items:
            return []
        sync_files([self.spool.data(d["transfer"]) for _, d in items], self.spool.folder)
        fsync_dir(self.spool.folder)  # the new .data names too, before the event vouches for them
        log.debug("transfer.synced transfers=%d", len(items))
        evs = self.append(items)
        for ev in evs:
            self._queued[ev.data["transfer"]] = ev
            self.spool.plain(ev.data["transfer"]).unlink(missing_ok=True)
        fsync_dir(self.spool.folder)
        by_tid = {e["transfer"]: e["name"] for e in entries}
        for ev in evs:
            d = ev.data
            log.info("transfer.queued transfer=%s destination=%s name=%s size=%d sealed_size=%d",
                     d["transfer"], d["destination"], by_tid[d["transfer"]], plain_size[d["transfer"]],
                     d["size"])
        self.on_taken(evs)
        return [ev.data["transfer"] for ev in evs]

    def _put_back(self, entry: dict[str, Any], reason: str) -> None:
        """Return a taken entry that failed its check to its outbox folder (else, if that
        folder is now a symlink, to ``failed/``): refused, never lost."""
        src, tid = Path(entry["src"]), entry["transfer"]
        try:
            where = self.spool.put_back(tid, src.parent, src.name)
        except FolderRefused:
            where = move_to_failed(self.spool.plain(tid), self.failed, entry["name"],
                                   f"{src} was refused ({reason}) and its folder is a symlink now")
        log.warning("outbox.refused path=%s reason=%s: put back as %s", src, reason, where)

    # -- receive (relay or destination) ------------------------------------------------------

    # -- receive (relay or destination) ------------------------------------------------------
    def receive_offer(self, peer: str, stream: FrameStream, frame: Frame, owner: Owner) -> None:
        """Serve one ``offer`` (``_receive_offer``) with reads that give up after
        ``silence_after`` seconds of silence: a frozen sender holds an arrival no longer."""
        chan = stream.chan
        before = chan.gettimeout() if hasattr(chan, "gettimeout") else None
        if hasattr(chan, "settimeout"):
            chan.settimeout(self.silence_after)
        try:
            self._receive_offer(peer, stream, frame, owner)
        finally:
            if hasattr(chan, "settimeout"):
                chan.settimeout(before)

    def _receive_offer(self, peer: str, stream: FrameStream, frame: Frame, owner: Owner) -> None:
        """Answer one ``offer`` from ``peer`` and take the bytes of the files accepted.

        Each file is checked here (signature, route, size, space); the owner then decides
        (have / pending / busy / conflicting claim / accept from the part's size). The accepted
        files' bytes arrive back to back; each is verified, and fsynced, as it completes. The
        owner commits the good ones together (one folder fsync, one log append) and one
        ``stored`` answers for the whole offer. Crash before the commit: the parts stay and
        the next offer resumes them; after it, the copies are whole and recovery finishes
        whatever facts the commit had not appended yet.
        """
        answers: list[Answer] = []
        parsed: list[tuple[int, dict[str, Any], Event]] = []
        for i, item in enumerate(frame["files"]):
            answers.append(Answer("accept"))  # a place holder: the real answer follows
            try:
                if not (isinstance(item, dict) and isinstance(item.get("transfer"), str)
                        and isinstance(item.get("queued"), dict) and isinstance(item.get("route"), list)):
                    raise TransferRefused("bad-offer", "an offered file needs transfer, queued and route")
                parsed.append((i, item, self._parse_offered(item)))
            except TransferRefused as exc:
                self._refusal(answers, i, peer, item, exc)
        missing = [q for _, _, q in parsed if not self._in_store(q)]
        if missing:  # the batch's queued facts join the store in one transaction
            self.log.ingest_facts(missing, offered=True)
        checked: list[tuple[int, Offered]] = []
        reserved = 0
        for i, item, queued in parsed:
            try:
                _, route = self._check_offer(peer, item, queued, reserved)
            except TransferRefused as exc:
                self._refusal(answers, i, peer, item, exc)
                continue
            checked.append((i, Offered(item["transfer"], queued, route)))
            reserved += queued.data["size"]
        if checked:
            try:
                said = owner.admit(peer, [o for _, o in checked])
            except BaseException:
                # The service may have taken some (admit ran, its answer came too late).
                owner.receive_failed([o.transfer for _, o in checked], "the offer was not answered in time")
                raise
            for (i, offered), ans in zip(checked, said, strict=True):
                answers[i] = ans
                if ans.a == "refuse":
                    self._log_refusal(peer, offered.transfer, TransferRefused(ans.reason, ans.detail))
        accepted = [(o, answers[i].offset) for i, o in checked if answers[i].a == "accept"]
        progress: list[Progress] = []
        openers: dict[str, _Opener] = {}  # big sealed files decrypted as they arrive
        try:
            self._receive_files(peer, stream, answers, accepted, owner, progress, openers)
        finally:
            for opener in openers.values():  # only those the commit did not wait for
                opener.cancel()

    def _receive_files(self, peer: str, stream: FrameStream, answers: list[Answer],
                       accepted: list[tuple[Offered, int]], owner: Owner, progress: list[Progress],
                       openers: dict[str, _Opener]) -> None:
        """The second half of ``_receive_offer``: send the answers, take the accepted files'
        bytes, decrypt and sync them, commit, answer ``stored``."""
        results: dict[str, Answer] = {}
        good: list[Offered] = []
        current: Offered | None = None
        try:
            stream.send("answers", answers=[a.wire() for a in answers])
            for offered, offset in accepted:
                current = offered
                refusal = self._take_bytes(peer, stream, offered, offset, progress, openers)
                if refusal is None:
                    good.append(offered)
                else:
                    results[offered.transfer] = refusal
        except Exception as exc:
            # The sender went away (or the disk failed) mid-batch: an expected event, not a
            # crash. Every part stays; the next offer resumes each from its size.
            owner.receive_failed([o.transfer for o, _ in accepted], f"{exc.__class__.__name__}: {exc}")
            for prog in progress:
                prog.finish(False)
            if isinstance(exc, EOFError | OSError | ProtocolError | TimeoutError):
                log.warning("relay.receive.interrupted transfer=%s peer=%s bytes=%d files=%d error=%s",
                            current.transfer if current else "-", peer,
                            self.spool.part_size(current.transfer) if current else 0, len(accepted), exc)
            else:  # any other failure ends this offer only; what it opened is closed
                log.exception("relay.receive.failed transfer=%s peer=%s files=%d",
                              current.transfer if current else "-", peer, len(accepted))
            # The rest of the bytes may still be on their way: this channel is done.
            raise EOFError("the offer was cut short") from None
        finally:
            with self.progress_lock:
                for offered, _ in accepted:
                    self.progress.pop((offered.transfer, "in"), None)
        if not accepted:
            return
        if results:
            owner.receive_failed(list(results), "hash-mismatch")
        try:
            # Our own sealed files are decrypted here, and the data of the good ones is made
            # durable here, on this thread (one syncfs for a batch), so the service never
            # waits for the disk (or for decryption) on anyone's behalf.
            if good:
                opened = self._open_arrived(peer, good, results, openers)
                if len(opened) < len(good):
                    owner.receive_failed([o.transfer for o in good if o not in opened], "undecryptable")
                good = opened
            if good:
                # At the destination a sealed file's part is not synced: its verified, synced
                # ``.open`` is what the delivery links (docs/durability.md).
                sync_files([self.spool.opened(o.transfer) if self._sealed_to_me(o.queued)
                            else self.spool.part(o.transfer) for o in good], self.spool.folder)
                log.debug("relay.synced peer=%s files=%d", peer, len(good))
            stored = owner.commit(peer, good) if good else []
        except BaseException:
            owner.receive_failed([o.transfer for o in good], "the commit did not finish")
            for prog in progress:
                prog.finish(False)
            raise
        for offered, ans in zip(good, stored, strict=True):
            results[offered.transfer] = ans
        for prog in progress:
            prog.finish(results[prog.transfer].a in ("stored", "pending"))
        size = sum(o.queued.data["size"] - off for o, off in accepted)
        self.metrics.received(peer, size)
        stream.send("stored", results=[results[o.transfer].wire() for o, _ in accepted])

    def _sealed_to_me(self, queued: Event) -> bool:
        return queued.data["destination"] == self.me and E.is_sealed(queued.data)

    def _open_arrived(self, peer: str, good: list[Offered], results: dict[str, Answer],
                      openers: dict[str, _Opener]) -> list[Offered]:
        """At the destination: decrypt each verified sealed part into ``<tid>.open`` (not
        synced yet) and check it against its envelope -- or wait for its ``_Opener``, which
        did it while the part arrived. One that does not open is refused for good
        (``undecryptable``: a result in ``results``) and its bytes discarded; returns the
        others. OSError (the disk) ends the offer (the parts stay)."""
        out = []
        for o in good:
            if not self._sealed_to_me(o.queued):
                out.append(o)
                continue
            try:
                opener = openers.pop(o.transfer, None)
                if opener is None:
                    self._decrypt(o.queued, self.spool.part(o.transfer), self.spool.opened(o.transfer))
                elif (err := opener.join()) is not None:
                    raise err
            except SealError as exc:
                self.spool.discard(o.transfer, sync=False)
                self._log_refusal(peer, o.transfer, TransferRefused("undecryptable", str(exc)))
                results[o.transfer] = Answer("refuse", reason="undecryptable", detail=str(exc)[:300])
                continue
            out.append(o)
        return out

    def _decrypt(self, queued: Event, src: Path, dst: Path,
                 ready: Callable[[int], int] | None = None) -> Envelope:
        """Decrypt the sealed copy ``src`` of ``queued`` into the spool file ``dst`` (mode
        0640, not synced; a big one written back as it grows) and check it against its
        envelope, which must name ``queued``'s origin. SealError when it does not open or
        match (``dst`` is left for the caller to discard); OSError from the disk. ``ready``:
        ``src`` is still arriving (``seal._Reader``)."""
        env = self.names.envelope(queued.data["sealed"])
        if env is None:
            raise SealError("the sealed envelope does not open with this node's key "
                            "(sealed to another key, or damaged)")
        if env.origin != queued.origin:
            raise SealError(f"the envelope names {env.origin} as its origin, not {queued.origin}")
        src_fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        try:
            out = self.spool.create(dst)
            flusher = _Flusher(out) if env.size >= FLUSH_FROM else None
            try:
                self.keyring.open_file(src_fd, out, env, ready)
            finally:
                if flusher is not None:
                    flusher.stop()
                os.close(out)
        finally:
            os.close(src_fd)
        log.debug("transfer.opened transfer=%s size=%d", queued.data["transfer"], env.size)
        return env

    def _refusal(self, answers: list[Answer], i: int, peer: str, item: Any, exc: TransferRefused) -> None:
        self._log_refusal(peer, item.get("transfer") if isinstance(item, dict) else None, exc)
        answers[i] = Answer("refuse", reason=exc.reason, detail=exc.detail)

    def _log_refusal(self, peer: str, tid: Any, exc: TransferRefused) -> None:
        log.warning("relay.offer.refused peer=%s transfer=%s reason=%s detail=%s",
                    peer, str(tid)[:40], exc.reason, exc.detail)
        self.metrics.offer_refused(peer, exc.reason)

    def _parse_offered(self, frame: dict[str, Any]) -> Event:
        """The signed queued event of one offered file, checked on its own (before the
        batch's queued events join the log together)."""
        tid = frame["transfer"]
        if not ids.is_transfer_id(tid):
            raise TransferRefused("bad-offer", "transfer id is malformed")
        try:
            queued = parse_event(frame["queued"])
        except InvalidEvent as exc:
            raise TransferRefused("bad-offer", str(exc)) from None
        if queued.type != E.TRANSFER_QUEUED or queued.data["transfer"] != tid:
            raise TransferRefused("bad-offer", "queued event does not match the transfer")
        with self.log.lock:  # its feed's key, else (a configured peer not heard yet) the pinned one
            keys = self.log.ledger.known_keys(queued.origin)
        if not keys:
            raise TransferRefused("unknown-origin", f"no key known for {queued.origin} yet")
        if not any(queued.verify_signature(k) for k in keys):
            raise TransferRefused("bad-signature", f"queued event not signed by {queued.origin}")
        try:
            at = parse_ts(queued.ts)
        except (ValueError, OverflowError):
            raise TransferRefused("bad-offer", f"queued time {queued.ts!r} is not a date") from None
        horizon = self.stale_after + STALE_MARGIN
        if queued.origin != self.me and at < time.time() - horizon:  # before it is kept at all
            raise TransferRefused("stale", f"queued at {queued.ts}, more than {horizon:.0f} s ago: "
                                  "no node keeps or delivers it any more")
        return queued

    def _check_offer(self, peer: str, frame: dict[str, Any], queued: Event,
                     reserved: int = 0) -> tuple[Event, tuple[str, ...]]:
        """The rest of one offered file's checks, once its queued event is in the log
        (``reserved``: bytes the files before it in the same offer may take)."""
        tid = frame["transfer"]
        if self.ended(tid, queued.origin) == FAILED:
            # cancelled or expired by its origin: neither kept nor delivered any more
            raise TransferRefused("failed", f"{queued.origin} gave up on this transfer")

        route = frame["route"]
        if len(route) > MAX_ROUTE or not all(ids.is_node_id(n) for n in route):
            raise TransferRefused("bad-offer", "route is malformed")
        d = queued.data
        with self.log.lock:
            known_dest = d["destination"] in self.log.network.nodes
        if d["destination"] != self.me and not known_dest:
            raise TransferRefused("unknown-destination", f"{d['destination']} is not known here")
        if d["size"] > self.max_file_size:
            raise TransferRefused("too-large", f"{d['size']} bytes is over the limit of {self.max_file_size}")
        if self._sealed_to_me(queued):  # before any byte moves: can we open it at all?
            env = self.names.envelope(d["sealed"])
            if env is None or env.origin != queued.origin:
                raise TransferRefused("undecryptable", "the sealed envelope does not open with this "
                                      "node's key (sealed to another key, or damaged)")
        # At the destination a sealed file needs room twice for a moment: its ciphertext and
        # the plaintext opened beside it.
        need = d["size"] * (2 if self._sealed_to_me(queued) else 1) - self.spool.part_size(tid) \
            + self.min_free_space + reserved
        if self.spool.free_bytes() < need:
            raise TransferRefused("no-space", "not enough free disk space for this file")
        return queued, self._vouched(tid, queued.origin, peer, route)

    def _vouched(self, tid: str, origin: str, peer: str, route: list[str]) -> tuple[str, ...]:
        """The nodes of an offer's ``route`` that signed facts vouch for: the origin, the
        sending peer, and nodes whose ``transfer.relayed`` for the id we hold. The planner
        prefers paths around these and never lets them exclude every path
        (``relay.choose_hop``), so a lying route cannot steer a transfer into a dead end."""
        with self.log.lock:
            tr = self.log.network.transfer(tid, origin)
            keep = (set(tr.custody) if tr is not None else set()) | {origin, peer}
        out = [n for n in route if n in keep and n != self.me]
        return tuple(out if peer in out else out + [peer])


    def _take_bytes(self, peer: str, stream: FrameStream, offered: Offered, offset: int,
                    progress: list[Progress], openers: dict[str, _Opener]) -> Answer | None:
        """The bytes of one accepted file into ``<tid>.part``: verified, its sender recorded
        (not synced yet: ``commit_received`` syncs the batch). None when good; a ``refuse`` Answer on a hash mismatch. Whatever happens
        after the part is opened, its descriptor is closed (and the flusher stopped) on the
        way out. A hash mismatch after a resume cuts the part back to the resume point once
        (the bytes before it may be honest); a second one discards it. A big file sealed to
        us is decrypted while it arrives (an ``_Opener`` put in ``openers``; cancelled on a
        mismatch), and its part is not written back (only its ``.open`` is synced)."""
        queued, tid = offered.queued, offered.transfer
        d = queued.data
        size = d["size"]
        h = hashlib.sha256()
        if offset:
            hash_file(self.spool.part(tid), h)
        prog = Progress(tid, "in", peer, size, offset, time.time())
        progress.append(prog)
        with self.progress_lock:
            self.progress[(tid, "in")] = prog
        if offset:
            log.info("relay.resume transfer=%s peer=%s offset=%d size=%d", tid, peer, offset, size)
        fd = self.spool.open_part(tid, offset)
        flusher = None
        try:
            if d["destination"] != self.me and self.on_receiving and size - offset >= CUT_THROUGH_MIN:
                self.on_receiving(queued, offered.route + (self.me,), prog, fd)
            opening = self._sealed_to_me(queued) and size >= CUT_THROUGH_MIN
            if opening:
                openers[tid] = _Opener(self, queued, prog)
            flusher = _Flusher(fd) if size - offset >= FLUSH_FROM and not opening else None
            remaining = size - offset
            while remaining:
                chunk = stream.recv_some(min(remaining, CHUNK))
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                h.update(chunk)
                remaining -= len(chunk)
                prog.advance(len(chunk))
            log.debug("relay.received transfer=%s peer=%s bytes=%d", tid, peer, size - offset)
            if flusher is not None:
                flusher.stop()
            if h.hexdigest() != d["sha256"]:
                if tid in openers:
                    openers.pop(tid).cancel()
                if offset and tid not in self._resume_failed:
                    self._resume_failed.add(tid)
                    os.ftruncate(fd, offset)  # keep what came before the resume, once
                    kept = offset
                else:
                    self._resume_failed.discard(tid)
                    self.spool.discard(tid)
                    kept = 0
                log.warning("relay.refused transfer=%s peer=%s reason=hash-mismatch kept=%d", tid, peer, kept)
                self.metrics.offer_refused(peer, "hash-mismatch")
                return Answer("refuse", reason="hash-mismatch",
                              detail="bytes do not match the sha256 of the queued event")
            self._resume_failed.discard(tid)
            try:  # who sent it, for recovery; fsynced with the file's inode
                os.setxattr(fd, SENDER_XATTR, peer.encode())
            except OSError:
                self.spool.write_meta(tid, {"queued": queued.to_dict(), "from": peer,
                                            "passed": list(offered.route)})
            return None  # made durable with the rest of its batch (``commit_received``)
        finally:
            if flusher is not None:
                flusher.stop()
            os.close(fd)

    def commit_received(self, peer: str, files: Sequence[Offered]) -> list[Event]:
        """Make verified parts, whose data the receiving thread synced (``sync_files``), whole
        copies: each renamed, ONE spool-folder fsync, then ONE append of the ``transfer.relayed`` facts of those that go on from here. Crash
        (``receive.before_append`` marks the spot): a whole copy without its fact is found by
        ``recover``, which appends it; the sender, never answered, offers again and hears
        "have". Should the append fail, the copies go back to being parts (the sender's next
        offer resumes them), so no whole copy is left that nobody holds."""
        for o in files:
            if not self._in_store(o.queued):
                # The queued fact is not in the fact store (its put was refused), so recovery
                # could not find it there: keep it beside the copy (before the copy is whole).
                self.spool.write_meta(o.transfer, {"queued": o.queued.to_dict(), "from": peer,
                                                   "passed": list(o.route)})
        for o in files:
            os.rename(self.spool.part(o.transfer), self.spool.data(o.transfer))
        fsync_dir(self.spool.folder)
        failpoint("receive.before_append")
        facts = []
        for o in files:
            if o.queued.data["destination"] != self.me:
                facts.append((E.TRANSFER_RELAYED, {"transfer": o.transfer, "from": peer}))
        try:
            evs = self.append(facts)
        except BaseException:
            for o in files:
                os.rename(self.spool.data(o.transfer), self.spool.part(o.transfer))
            raise
        log.debug("relay.committed peer=%s files=%d", peer, len(files))
        for o in files:
            if o.queued.data["destination"] != self.me:
                log.info("transfer.relayed transfer=%s from=%s size=%d", o.transfer, peer, o.queued.data["size"])
        by_tid = {o.transfer: o.queued for o in files}
        for ev in evs:  # the sender hears it inline (``stored``); the origin by notice
            origin = by_tid[ev.data["transfer"]].origin
            if origin not in (peer, self.me):
                self.notify(origin, ev)
        return evs

    # -- deliver (destination) ---------------------------------------------------------------
    def deliver_batch(self, queued: Sequence[Event], resuming: Iterable[str] = ()) -> dict[str, str | None]:
        """Publish stored copies into ``inbox/<origin>/`` once each, then the receipts (one
        append), then drop the spool copies. Returns transfer id -> None (delivered) or the
        error that kept it here (the copy stays; the caller retries).

        A sealed copy is delivered from its decrypted ``<tid>.open`` (made and synced on the
        receiving thread; made again here, on this thread, only when a crash lost it) under
        the name in its envelope; a plaintext one (queued before sealing) from ``<tid>.data``
        under ``data.name``, as before. The receipt of a sealed transfer names no file.

        Crash: the inbox link comes first (one fsync per inbox folder), then the receipts,
        then the spool copies go. A crash before the receipt leaves the spool copy: a
        delivery in ``resuming`` (recovered at start) looks for the link it made (same
        inode) instead of making a second one.
        """
        resuming = set(resuming)
        out: dict[str, str | None] = {}
        linked: list[tuple[Event, str]] = []
        by_origin: dict[str, list[Event]] = {}
        with self.log.lock:  # one look at the model for the whole batch
            done_already = {ev.data["transfer"] for ev in queued
                            if (tr := self.log.network.transfer(ev.data["transfer"], ev.origin)) is not None
                            and tr.delivered is not None}
        # The exactly-once memory outlives the model's (bounded) view of ended transfers.
        done_already |= {ev.data["transfer"] for ev in queued
                         if ev.data["transfer"] not in done_already and self.log.facts.delivered(ev.data["transfer"])}
        for ev in queued:
            tid = ev.data["transfer"]
            if tid in done_already:
                self.spool.discard(tid, sync=False)
                out[tid] = None
            else:
                by_origin.setdefault(ev.origin, []).append(ev)
        for origin, evs in by_origin.items():
            folder = self.inbox / origin
            try:
                fd = open_folder(folder, create=True)
            except (OSError, FolderRefused) as exc:  # the service logs it, once per reason
                for ev in evs:
                    out[ev.data["transfer"]] = _why(exc)
                continue
            try:
                for ev in evs:
                    tid = ev.data["transfer"]
                    try:
                        src, wanted = self._plaintext(ev)
                        size = src.lstat().st_size  # never the inbox's: once linked, it is the reader's
                        # Only a delivery a crash interrupted can have linked already; looking
                        # for that link reads the whole folder, so not on every delivery.
                        found = find_link(src, folder) if tid in resuming else None
                        name = found.name if found else link_unique_at(src, fd, wanted)
                    except (OSError, SealError) as exc:
                        out[tid] = _why(exc)
                        continue
                    linked.append((ev, name, size))
                os.fsync(fd)
            finally:
                os.close(fd)
        receipts = self.append([(E.TRANSFER_DELIVERED, _receipt(ev, name)) for ev, name, _ in linked])
        for ev, receipt in zip([ev for ev, _, _ in linked], receipts, strict=True):
            if ev.origin != self.me:  # the last hop hears it inline; the origin by notice
                self.notify(ev.origin, receipt)
        for ev, name, size in linked:
            tid = ev.data["transfer"]
            log.info("transfer.delivered transfer=%s origin=%s path=%s size=%d",
                     tid, ev.origin, self.inbox / ev.origin / name, size)
            self.spool.discard(tid, sync=False)
            out[tid] = None
        fsync_dir(self.spool.folder)
        return out

    def _plaintext(self, ev: Event) -> tuple[Path, str]:
        """The spool file holding ``ev``'s plaintext and the name to deliver it under.

        A sealed copy's ``<tid>.open`` is whole whenever it exists beside ``<tid>.data``
        (it was synced before the commit renamed the part). Should it be missing (the copy
        came another way: adopted, or recovered from an older version), it is decrypted
        again into a temp file, synced and renamed into place, so a crash meanwhile never
        leaves a partial ``.open``."""
        tid = ev.data["transfer"]
        if not E.is_sealed(ev.data):
            return self.spool.data(tid), ev.data["name"]
        opened = self.spool.opened(tid)
        env = self.names.envelope(ev.data["sealed"])
        if env is None or not opened.exists():
            tmp = opened.with_name(f".{opened.name}.tmp")
            try:
                env = self._decrypt(ev, self.spool.data(tid), tmp)
                sync_files([tmp], self.spool.folder)
                os.rename(tmp, opened)
                fsync_dir(self.spool.folder)
            finally:
                tmp.unlink(missing_ok=True)
        return opened, env.name

    # -- send (origin or relay) ----------------------------------------------------------------
    def outgoing(self, tid: str, passed: Sequence[str]) -> Outgoing:
        """What an offer of ``tid`` says; TransferRefused("lost") without its queued event."""
        queued = self.queued_event(tid)
        if queued is None:
            raise TransferRefused("lost", "no queued event for this transfer")
        return Outgoing(tid, queued, [n for n in passed if n != self.me] + [self.me])

    def send_batch(self, hop: str, stream: FrameStream, items: Sequence[Outgoing],
                   report: Callable[[str, Answer], None],
                   growing: tuple[Progress, int] | None = None) -> None:
        """Offer ``items`` to ``hop`` in one offer and send the accepted files' bytes back to
        back; ``report(tid, answer)`` is called with each file's answer (accept, have,
        pending, refuse) and, for the accepted ones, the receiver's final word (stored,
        pending, refuse) once its commit is durable. ``growing`` (cut-through: one item)
        reads the bytes from a part file still being written, as they land.

        Raises TransferRefused when the whole offer is refused, ProtocolError / EOFError /
        OSError when the channel breaks (files not reported yet are unanswered).
        """
        extra = {"cut_through": True} if growing is not None else {}
        stream.send("offer", files=[{"transfer": it.transfer, "queued": it.queued.to_dict(),
                                     "route": it.route} for it in items], **extra)
        reply = stream.recv(expect={"answers", "refuse"})
        if reply.op == "refuse":
            raise TransferRefused(reply["reason"], reply["detail"])
        words = check_list(reply["answers"], len(items), ANSWERS, "answers")
        self._take_inline(hop, words)
        answers = [_answer(w) for w in words]
        accepted: list[tuple[Outgoing, int]] = []
        for it, ans in zip(items, answers, strict=True):
            if ans.a == "accept":
                size = it.queued.data["size"]
                if not 0 <= ans.offset <= size:
                    raise ProtocolError(f"accept offset {ans.offset} outside 0..{size}")
                accepted.append((it, ans.offset))
            report(it.transfer, ans)
        if not accepted:
            return
        t0 = time.monotonic()
        for it, offset in accepted:
            prog = Progress(it.transfer, "out", hop, it.queued.data["size"], offset, time.time())
            with self.progress_lock:
                self.progress[(it.transfer, "out")] = prog
            log.debug("transfer.sending transfer=%s peer=%s offset=%d", it.transfer, hop, offset)
            try:
                if growing is None:
                    self._send_file(stream, it, offset, prog)
                else:
                    self._send_growing(stream, it, offset, prog, *growing)
                log.debug("transfer.sent transfer=%s peer=%s", it.transfer, hop)
            finally:
                with self.progress_lock:
                    self.progress.pop((it.transfer, "out"), None)
        reply = stream.recv(expect={"stored"})
        results = check_list(reply["results"], len(accepted), RESULTS, "results")
        self._take_inline(hop, results)
        self.metrics.sent(hop, sum(it.queued.data["size"] - off for it, off in accepted),
                          time.monotonic() - t0)
        for (it, _), res in zip(accepted, results, strict=True):
            report(it.transfer, _answer(res))

    def _take_inline(self, hop: str, words: list[dict[str, Any]]) -> None:
        """Ingest the signed facts a receiver sent inline with its words (``facts``: at most
        ``MAX_INLINE_FACTS`` each), before the words are acted on, so the model already
        holds the custody or the receipt they stand for. A malformed or foreign fact is
        logged and dropped; the word itself still counts."""
        found: list[Event] = []
        bad = 0
        for w in words:
            raw = w.get("facts")
            if raw is None:
                continue
            if not isinstance(raw, list) or len(raw) > MAX_INLINE_FACTS:
                bad += 1
                continue
            for item in raw:
                try:
                    found.append(parse_event(item if isinstance(item, dict) else {}))
                except InvalidEvent:
                    bad += 1
        if found:
            res = self.log.ingest_facts(found)
            bad += len(res.rejected)
            if res.accepted:
                self.on_change()
        if bad:
            log.warning("relay.facts.refused peer=%s count=%d (inline facts that are malformed, "
                        "unsigned or not about our transfers)", hop, bad)

    def _send_file(self, stream: FrameStream, it: Outgoing, offset: int, prog: Progress) -> None:
        size = it.queued.data["size"]
        with open(self.spool.data(it.transfer), "rb", buffering=0) as f:
            f.seek(offset)
            buf = bytearray(min(CHUNK, max(size - offset, 1)))
            remaining = size - offset
            while remaining:
                n = f.readinto(memoryview(buf)[: min(len(buf), remaining)])
                if not n:
                    # The receiver cannot tell a short copy from a slow one: end the channel.
                    raise EOFError(f"spool copy of {it.transfer} is shorter than queued")
                stream.send_raw(memoryview(buf)[:n])
                remaining -= n
                prog.done += n

    @staticmethod
    def _send_growing(stream: FrameStream, it: Outgoing, offset: int, out: Progress,
                      incoming: Progress, fd: int) -> None:
        """Cut-through: stream bytes as they land in our part file. Custody does not change
        here: we answer our sender "stored" only for our own whole, verified copy. Raises
        EOFError when our incoming copy fails (the hop keeps its part for a resume)."""
        size = it.queued.data["size"]
        sent = offset
        while sent < size:
            with incoming.cond:
                while incoming.done <= sent and incoming.finished is None:
                    incoming.cond.wait(1.0)
                avail = incoming.done if incoming.finished is not False else sent
            if avail <= sent:
                raise EOFError("the incoming copy stopped; forwarding stops too")
            data = os.pread(fd, min(avail - sent, CHUNK), sent)
            if not data:
                raise EOFError("part file shorter than announced")
            stream.send_raw(data)
            sent += len(data)
            out.done = sent

    def let_go(self, tid: str, reason: str) -> None:
        """Let our copy go on the reaper thread: an unlink waits for the file system's journal
        while other agents sync, so the custody service hands it on and goes on. Nothing
        depends on its timing: no new bytes of ``tid`` come while the service still knows the
        transfer, and a copy a crash leaves behind is found by ``recover`` and let go again."""
        with self._reaper_lock:
            if self._reaper is None:
                self._reaper = threading.Thread(target=self._reap, name="spool-reaper", daemon=True)
                self._reaper.start()
        self._doomed.put((tid, reason))

    def _reap(self) -> None:
        """The reaper thread: unlink what ``let_go`` queued; one folder fsync per batch."""
        while True:
            batch = [self._doomed.get()]
            while len(batch) < 1000:
                try:
                    batch.append(self._doomed.get_nowait())
                except queue.Empty:
                    break
            for tid, reason in batch:
                try:
                    self.spool.discard(tid, sync=False)
                    log.info("transfer.dropped transfer=%s reason=%s", tid, reason)
                except OSError as exc:
                    log.warning("spool.drop.failed transfer=%s error=%s", tid, exc)
            try:
                fsync_dir(self.spool.folder)
            except OSError as exc:
                log.warning("spool.drop.failed folder=%s error=%s", self.spool.folder, exc)

    def expire(self, tid: str, reason: str) -> None:
        """Give up as the origin: the file to ``failed/`` with the reason, then the event.

        A sealed copy is decrypted with our own key (we are one of its recipients) into
        ``<tid>.open``, and that plaintext goes to ``failed/<name>``; should it not open (our
        key was rotated twice since), the ciphertext goes there as ``<name>.age`` with the
        reason saying so. Runs on the custody service's thread: a big file costs its
        decryption there (about 0.5 GB/s).

        A transfer already failed is left alone. Crash: the reason is written into the spool
        meta (durably) before the file moves, so a crash between the move and the event
        leaves a meta without a copy, and ``recover`` appends the missing
        ``transfer.failed``; a crash while decrypting leaves the ciphertext, decrypted again
        by that ``recover``. (The event cannot come first: every holder drops the copy of a
        transfer its origin failed.)
        """
        with self.log.lock:
            tr = self.log.network.transfer(tid, self.me)
            if tr is not None and tr.failed is not None:
                return
            custodians = set(tr.custody) if tr is not None else set()
        if tr is None and self.log.facts.state_of(tid) == FAILED:
            return
        queued = self.queued_event(tid)
        name = self.name_of(queued) or tid
        dest = queued.data["destination"] if queued else "?"
        data = self.spool.data(tid)
        text = f"transfer {tid} to {dest} failed: {reason}"
        if data.exists():
            self.spool.write_meta(tid, {**(self.spool.read_meta(tid) or {}), "failing": reason[:500]})
            src = data
            if queued is not None and E.is_sealed(queued.data):
                try:
                    self._decrypt(queued, data, self.spool.opened(tid))
                    sync_files([self.spool.opened(tid)], self.spool.folder)
                    src = self.spool.opened(tid)
                except SealError as exc:
                    name, text = f"{name}.age", f"{text}\nour copy is sealed and does not open: {exc}"
            final = move_to_failed(src, self.failed, name, text)
            data.unlink(missing_ok=True)  # at once, as the move unlinks a plaintext copy
        else:
            final = self.failed / name
        [failed] = self.append([(E.TRANSFER_FAILED, {"transfer": tid, "reason": reason[:500]})])
        # The destination and every custodian we know of hear it by notice (never by gossip).
        for to in sorted(({dest} if queued is not None else set()) | custodians - {self.me}):
            self.notify(to, failed)
        self.spool.discard(tid)
        log.warning("transfer.failed transfer=%s destination=%s reason=%s path=%s",
                    tid, dest, reason, final)

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> list[Recovered]:
        """Finish what a crash interrupted and return every whole copy in custody, for the
        service to own. Idempotent; runs before any service starts."""
        self._index_queued()
        self.replay_takes()
        out = []
        for tid in self.spool.transfer_ids():
            try:
                found = self._recover_one(tid)
            except Exception:
                log.exception("spool.recover.failed transfer=%s", tid)
                continue
            if found is not None:
                out.append(found)
        return out

    def replay_takes(self) -> bool:
        """Finish every batch take whose intent is still in the spool: a crash, or a take that
        failed after its files moved in (a full disk at the append). Only the taker (or
        recovery, before it starts) calls this, so no take is running meanwhile. True when
        none is left."""
        done = True
        for intent in self.spool.intents():
            try:
                self._replay_intent(intent)
            except Exception:  # one bad spool entry must not stop the others
                log.exception("spool.recover.failed intent=%s", intent.name)
                done = False
        return done

    def _replay_intent(self, intent: Path) -> None:
        """A batch take that a crash cut short: seal and queue what moved in and has no event
        yet, after checking it again (the crash may have come between its rename and its
        check); remove the plaintext of what was queued. An intent of a maildrop from before
        sealing (entries without ``seal``) left its files as ``<tid>.data`` in plaintext:
        they become ``<tid>.plain`` and are sealed like the others."""
        entries = json.loads(intent.read_bytes())
        for e in entries:
            tid = e["transfer"]
            if tid in self._queued:
                if os.path.lexists(self.spool.data(tid)):  # never the last copy of the file
                    self.spool.plain(tid).unlink(missing_ok=True)
            elif not e.get("seal") and os.path.lexists(self.spool.data(tid)):
                if os.path.lexists(self.spool.plain(tid)):
                    # An earlier replay of this old intent moved the plaintext already (the
                    # intent on disk never changes): what is at .data is its partial ciphertext.
                    self.spool.data(tid).unlink()
                else:
                    os.rename(self.spool.data(tid), self.spool.plain(tid))
                e["seal"] = 1
        todo = [e for e in entries
                if e["transfer"] not in self._queued
                and os.path.lexists(self.spool.plain(e["transfer"]))]
        fsync_dir(self.spool.folder)
        if todo:
            log.info("spool.recover intent=%s queue=%d", intent.name, len(todo))
            self._queue(todo, {})
        intent.unlink()

    def _recover_one(self, tid: str) -> Recovered | None:
        data = self.spool.data(tid)
        failing = (self.spool.read_meta(tid) or {}).get("failing")
        if isinstance(failing, str):  # an expiry or cancel a crash cut short: finish it
            self.expire(tid, failing)
            return None
        if not data.exists():
            return None  # only a part (the next offer resumes it, or the sweep drops it)
        queued = self.queued_event(tid)
        if queued is None:
            log.warning("spool.recover transfer=%s no queued event yet; kept until gossip brings it", tid)
            return None
        dest = queued.data["destination"]
        if dest == self.me:
            return Recovered(queued, ())
        with self.log.lock:
            tr = self.log.network.transfer(tid, queued.origin)
            custody = dict(tr.custody) if tr is not None else {}
        if self.ended(tid, queued.origin) == DELIVERED:
            self.spool.discard(tid)
            return None
        if queued.origin == self.me:
            return Recovered(queued, ())
        sender = custody.get(self.me) or self._sender_of(tid) or queued.origin
        if self.me not in custody:
            self.append([(E.TRANSFER_RELAYED, {"transfer": tid, "from": sender})])
        chain = [sender]
        while chain[-1] in custody and len(chain) < MAX_ROUTE:
            chain.append(custody[chain[-1]])
        return Recovered(queued, tuple(reversed(chain)) + (self.me,))

    def _sender_of(self, tid: str) -> str | None:
        """Who sent us this copy, as recorded beside it (xattr, else the meta)."""
        try:
            who = os.getxattr(self.spool.data(tid), SENDER_XATTR).decode()
            if ids.is_node_id(who):
                return who
        except OSError:
            pass
        meta = self.spool.read_meta(tid) or {}
        who = meta.get("from")
        return who if ids.is_node_id(who) else None

    def sweep(self, active: Callable[[str], bool]) -> None:
        """Let go of copies that nobody will finish or pass on:

        - a part whose transfer was delivered (or its origin gave up) while it waited here,
          e.g. the sender rerouted around us while we were down (reason = that state);
        - a part nobody wrote to for ``stale_after`` (an abandoned offer: ``stale-part``);
        - a whole copy that nobody holds (its queued event never came) in the spool for
          twice ``stale_after`` (``stale-copy``).

        Transfers the service deals with (``active``: held or arriving) and, while a take is
        in progress, unheld whole copies are left alone. Runs on the service's thread, so
        ``active`` cannot change under it.
        """
        now = time.time()
        taking = bool(self.spool.intents())
        for tid in self.spool.transfer_ids():
            if active(tid):
                continue
            reason = self._sweep_reason(tid, now, taking)
            if reason is None:
                continue
            try:
                self.spool.discard(tid)
            except OSError as exc:
                log.warning("spool.drop.failed transfer=%s error=%s", tid, exc)
                continue
            self._resume_failed.discard(tid)
            log.info("spool.dropped transfer=%s reason=%s", tid, reason)

    def _sweep_reason(self, tid: str, now: float, taking: bool) -> str | None:
        """Why the spool entry ``tid`` can go (see ``sweep``), or None to keep it."""
        try:
            if self.spool.data(tid).exists():
                # ctime: when it was renamed into the spool (mtime may be the producer's).
                old = now - self.spool.data(tid).stat().st_ctime >= 2 * self.stale_after
                return "stale-copy" if old and not taking else None
            queued = self._queued.get(tid)
            state = self.ended(tid, queued.origin) if queued is not None else None
            if state is not None:
                return state
            part = self.spool.part(tid)
            return "stale-part" if part.exists() and now - part.stat().st_mtime >= self.stale_after else None
        except FileNotFoundError:
            return None

    def snapshot(self) -> list[dict[str, Any]]:
        with self.progress_lock:
            return [p.as_dict() for p in self.progress.values()]


def offer_chunks(items: Sequence[Outgoing]) -> Iterator[list[Outgoing]]:
    """``items`` in offers that fit: at most MAX_BATCH files and OFFER_BUDGET bytes of
    header each (a file's signed queued event and route, as sent)."""
    return cut(items, lambda it: len(E.canonical(it.queued.to_dict())) + sum(len(n) + 3 for n in it.route) + 40,
               MAX_BATCH, OFFER_BUDGET)


@dataclass(frozen=True)
class Recovered:
    """A whole copy found in custody at start-up: its claim and the route so far."""

    queued: Event
    passed: tuple[str, ...]


def _receipt(queued: Event, name: str) -> dict[str, Any]:
    """``transfer.delivered`` of a delivery under ``name``: a sealed transfer's receipt says
    only which bytes arrived (the name stays between origin and destination)."""
    d = queued.data
    if E.is_sealed(d):
        return {"transfer": d["transfer"], "sha256": d["sha256"]}
    return {"transfer": d["transfer"], "sha256": d["sha256"], "name": name}


def _answer(w: dict[str, Any]) -> Answer:
    """A peer's word on one file (checked by ``protocol.check_list`` for its kind's fields);
    its free text made printable and short (it goes into our log, our status and, as a
    refusal, into our own signed events). A field the word's kind does not need is ignored
    unless it has the right type (a ``stored`` with ``"reason": null`` is just ``stored``)."""
    def text(name: str, limit: int) -> str:
        value = w.get(name)
        return ids.printable(value, limit) if isinstance(value, str) else ""

    offset = w.get("offset")
    return Answer(w["a"], offset=offset if isinstance(offset, int) and not isinstance(offset, bool) else 0,
                  reason=text("reason", 64), detail=text("detail", 300))


def _why(exc: BaseException) -> str:
    return (str(exc) or exc.__class__.__name__)[:300]
