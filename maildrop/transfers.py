"""Custody of files: take from the outbox, receive from a peer, deliver, send to a hop.

Part of the imperative shell (with ``agent``): it drives ``spool`` (files) and ``eventlog``
(facts) in the order that makes every crash safe. Record before acting:

- take:    meta -> rename into the spool -> hash -> ``transfer.queued``.
- receive: meta -> bytes into ``<tid>.part`` -> verify size+sha256 -> fsync -> rename to
           ``<tid>.data`` -> ``transfer.relayed`` (or deliver) -> answer ``stored``.
- deliver: meta says delivering -> hard-link into ``inbox/<origin>/`` (never overwriting)
           -> ``transfer.delivered`` -> drop the spool copy.
- send:    nobody lets go on the receiver's ``stored`` (or ``have``) alone: the origin waits
           for the receipt, a relay for the hop's signed ``transfer.relayed`` (``relay.plan``).
- give up: the reason into the spool meta -> the file to ``failed/`` -> ``transfer.failed``
           (``expire``; a crash in between is finished by ``recover``).
- offers:  a transfer is ``(origin, id)``; while bytes of an id are here, an offer of another
           queued event for it is refused (``conflicting-offer``), never taken in its place;
           an offer of a transfer its origin gave up on (``transfer.failed``: cancelled or
           expired) is refused (``failed``).

``recover()`` finishes whatever a crash interrupted, from the spool and the log alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import events as E
from . import ids
from .errors import InvalidEvent, ProtocolError, TransferRefused
from .eventlog import EventLog
from .events import Event, parse_event, parse_ts
from .keys import NodeKey
from .metrics import Metrics
from .model import DELIVERED, FAILED
from .protocol import Frame, FrameStream
from .relay import Held
from .spool import (
    FolderRefused,
    Refused,
    Spool,
    check_outbox_file,
    find_link,
    fsync_dir,
    hash_fd,
    hash_file,
    link_unique,
    move_to_failed,
    open_folder,
)

log = logging.getLogger("maildrop.transfers")

CHUNK = 1024 * 1024
CUT_THROUGH_MIN = 8 * 1024 * 1024
FLUSH_FROM = 64 * 1024 * 1024  # files from this size are written back while they arrive
FLUSH_EVERY = 0.25  # smaller files are stored, then forwarded
SENDER_XATTR = "user.maildrop.from"
MAX_ROUTE = 64
CLOCK_SKEW = 3600.0
"""How far ahead of our clock a peer's ``transfer.queued`` time is believed. A relay's
``queued_at`` is that time clamped to [receive time - ``stale_after``, receive time +
CLOCK_SKEW], so a date far in the future cannot keep a copy forever and one far in the past
cannot make it go at once. Our own events use our own clock unclamped."""


@dataclass
class Progress:
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


class Custody:
    """Everything this node does with file bytes. Thread-safe."""

    def __init__(self, node_id: str, key: NodeKey, log_: EventLog, spool: Spool, inbox: Path,
                 failed: Path, *, max_file_size: int, min_free_space: int,
                 stale_after: float = 7 * 86400.0,
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.me = node_id
        self.key = key
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
        # Called when a relay starts receiving a big file, to forward it while it arrives.
        self.on_receiving: Callable[[Event, tuple[str, ...], Progress, int], None] | None = None
        self.metrics = Metrics()  # counting hooks; the agent sets its own (no-ops by default)
        # ``lock`` guards ``held`` (and each Held's soft state), ``progress``, ``_receiving``,
        # ``_failing`` and ``_queued``. Order: ``_deliver_lock`` -> ``lock`` -> the event log's
        # ``lock`` (-> its flock); never the other way round. Held across an append (which
        # fdatasyncs) but never across network I/O; ``Progress.cond`` and the agent's
        # ``pool_lock`` are leaves.
        self.lock = threading.RLock()
        self.held: dict[str, Held] = {}
        self.progress: dict[tuple[str, str], Progress] = {}
        self._receiving: set[str] = set()
        self._failing: set[str] = set()  # transfers being expired or cancelled right now
        self._deliver_lock = threading.Lock()  # one delivery at a time (its link, receipt, drop)
        # transfer id -> the claim (the origin's signed queued event) this node deals with for
        # that id: one it took, accepted bytes for, or recovered. Never replaced by an offer.
        self._queued: dict[str, Event] = {}
        self._resume_failed: set[str] = set()  # parts already cut back once after a bad resume

    # -- helpers ----------------------------------------------------------------------------
    def _append(self, type_: str, data: dict[str, Any]) -> Event:
        ev = self.log.append_own(self.key, self.me, [(type_, data)], time.time())[0]
        self.on_change()
        return ev

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
            with self.log.lock:
                found = [e for e in self.log.ledger.all_events()
                         if e.type == E.TRANSFER_QUEUED and e.data["transfer"] == tid]
            ev = self._pick(tid, found)
        if ev is not None:
            self._queued[tid] = ev
        return ev

    def _index_queued(self) -> None:
        """Remember the claim for every id in the log (one pass, before recovery)."""
        found: dict[str, list[Event]] = {}
        with self.log.lock:
            for e in self.log.ledger.all_events():
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

    def _in_ledger(self, queued: Event) -> bool:
        """True once this queued event is part of the log (not just waiting for a gap)."""
        with self.log.lock:
            tr = self.log.network.transfer(queued.data["transfer"], queued.origin)
            return tr is not None and tr.queued_seq == queued.seq

    def _queued_at(self, origin: str, ts: str) -> float:
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

    def _hold(self, tid: str, origin: str, destination: str, queued_ts: str,
              passed: tuple[str, ...]) -> None:
        with self.lock:
            if tid not in self.held:
                self.held[tid] = Held(tid, origin, destination, self._queued_at(origin, queued_ts),
                                      passed=passed)
        self.on_change()

    def reserve(self, queued: Event, passed: tuple[str, ...]) -> Held | None:
        """Hold a transfer that is still arriving, marked in flight (cut-through)."""
        tid = queued.data["transfer"]
        with self.lock:
            if tid in self.held:
                return None
            h = self.held[tid] = Held(tid, queued.origin, queued.data["destination"],
                                      self._queued_at(queued.origin, queued.ts), passed=passed,
                                      in_flight=True)
            return h

    def unreserve(self, tid: str) -> None:
        """Forget a reservation whose bytes never became a whole copy here."""
        with self.lock:
            if not self.spool.data(tid).exists():
                self.held.pop(tid, None)

    # -- take (origin) -------------------------------------------------------------------------
    def take(self, path: Path, destination: str) -> str | None:
        """Take custody of one complete file dropped into ``outbox/<destination>/``."""
        tids = self.take_batch([(path, destination)])
        return tids[0] if tids else None

    def take_batch(self, items: list[tuple[Path, str]]) -> list[str]:
        """Take custody of several complete outbox files with a handful of syncs in all.

        Crash: (1) an intent listing (transfer id, source, destination, name) is written
        durably; (2) each file is renamed into the spool; (3) the spool and outbox folders are
        fsynced; (4) the files are hashed and one write appends every ``transfer.queued``;
        (5) the intent is removed. Recovery replays an intent: a file still in the outbox was
        never taken (it will be taken again); a file in the spool without its queued event is
        checked again, hashed and queued; a file with its event is done. Nothing is lost or
        queued twice.

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
                tid = secrets.token_hex(16)
                checked[tid] = st
                entries.append({"transfer": tid, "src": str(path), "destination": destination,
                                "name": name, "size_hint": st.st_size})
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
        """Hash taken files and append their ``transfer.queued`` events in one write; returns
        the transfer ids queued. A file is hashed from its descriptor in ``fds`` (closed
        here), else (recovery) opened and checked again: a refused one is put back into its
        outbox folder. One that cannot be read goes to ``failed/``; the others are queued."""
        items = []
        protected: set[tuple[int, int]] | None = None
        for e in entries:
            tid = e["transfer"]
            try:
                fd = fds.pop(tid, None)
                if fd is None:
                    protected = protected if protected is not None else self._protected()
                    fd = self.spool.open_taken(tid, protected)
                try:
                    size, sha = hash_fd(fd)
                finally:
                    os.close(fd)
            except Refused as exc:
                self._put_back(e, exc.reason)
                continue
            except OSError as exc:
                try:
                    final = move_to_failed(self.spool.data(tid), self.failed, e["name"],
                                           f"{e['src']} could not be read once taken: {exc}")
                except OSError as exc2:
                    log.error("outbox.take.failed path=%s error=%s: kept as %s (not queued)",
                              e["src"], exc2, self.spool.data(tid))
                    continue
                log.warning("outbox.refused path=%s reason=unreadable error=%s moved_to=%s",
                            e["src"], exc, final)
                continue
            items.append((E.TRANSFER_QUEUED, {"transfer": tid, "destination": e["destination"],
                                              "name": e["name"], "size": size, "sha256": sha}))
        if not items:
            return []
        evs = self.log.append_own(self.key, self.me, items, time.time())
        self.on_change()
        for ev in evs:
            d = ev.data
            self._queued[d["transfer"]] = ev
            log.info("transfer.queued transfer=%s destination=%s name=%s size=%d",
                     d["transfer"], d["destination"], d["name"], d["size"])
            try:
                if d["destination"] == self.me:
                    self._deliver(d["transfer"], ev)
                else:
                    self._hold(d["transfer"], self.me, d["destination"], ev.ts, ())
            except Exception:  # one transfer's trouble must not strand the rest of the batch
                log.exception("transfer.take.unfinished transfer=%s: queued, its copy stays in "
                              "the spool; the next start picks it up", d["transfer"])
        return [ev.data["transfer"] for ev in evs]

    def _put_back(self, entry: dict[str, Any], reason: str) -> None:
        """Return a taken entry that failed its check to its outbox folder (else, if that
        folder is now a symlink, to ``failed/``): refused, never lost."""
        src, tid = Path(entry["src"]), entry["transfer"]
        try:
            where = self.spool.put_back(tid, src.parent, src.name)
        except FolderRefused:
            where = move_to_failed(self.spool.data(tid), self.failed, entry["name"],
                                   f"{src} was refused ({reason}) and its folder is a symlink now")
        log.warning("outbox.refused path=%s reason=%s: put back as %s", src, reason, where)

    # -- receive (relay or destination) ------------------------------------------------------
    def receive(self, peer: str, stream: FrameStream, frame: Frame) -> None:
        """Answer one ``offer`` from ``peer``: have / refuse / accept, then take the bytes."""
        tid = frame["transfer"]
        try:
            queued, route = self._check_offer(peer, frame)
            with self.lock:  # the claim check, "have" and taking the slot are one step
                self._check_claim(tid, queued)
                have = self._already_have(tid, queued)
                busy = not have and tid in self._receiving
                if not (have or busy):
                    self._receiving.add(tid)
                    self._queued[tid] = queued
        except TransferRefused as exc:
            log.warning("relay.offer.refused peer=%s transfer=%s reason=%s detail=%s",
                        peer, str(tid)[:40], exc.reason, exc.detail)
            self.metrics.offer_refused(peer, exc.reason)
            stream.send("refuse", reason=exc.reason, detail=exc.detail)
            return
        if have:
            stream.send("have")
            return
        if busy:
            self.metrics.offer_refused(peer, "busy")
            stream.send("refuse", reason="busy", detail="this transfer is arriving on another channel")
            return
        try:
            self._receive_bytes(peer, stream, queued, route)
        except (EOFError, OSError) as exc:
            # The sender went away (or the disk failed) mid-file: an expected event, not a
            # crash. The part stays; the next offer resumes from its size.
            log.warning("relay.receive.interrupted transfer=%s peer=%s bytes=%d error=%s",
                        tid, peer, self.spool.part_size(tid), exc)
        except Exception:
            # Any other failure ends this offer only: what it opened is closed
            # (``_receive_bytes``), the part stays for a resume or the sweep.
            log.exception("relay.receive.failed transfer=%s peer=%s", tid, peer)
        finally:
            with self.lock:
                self._receiving.discard(tid)
                self.progress.pop((tid, "in"), None)

    def _check_offer(self, peer: str, frame: Frame) -> tuple[Event, tuple[str, ...]]:
        tid = frame["transfer"]
        if not ids.is_transfer_id(tid):
            raise TransferRefused("bad-offer", "transfer id is malformed")
        try:
            queued = parse_event(frame["queued"])
        except InvalidEvent as exc:
            raise TransferRefused("bad-offer", str(exc)) from None
        if queued.type != E.TRANSFER_QUEUED or queued.data["transfer"] != tid:
            raise TransferRefused("bad-offer", "queued event does not match the transfer")
        with self.log.lock:
            key = self.log.ledger.key_of(queued.origin)
            known_dest = queued.data["destination"] in self.log.network.nodes
        if key is None:
            raise TransferRefused("unknown-origin", f"no key known for {queued.origin} yet")
        if not queued.verify_signature(key):
            raise TransferRefused("bad-signature", f"queued event not signed by {queued.origin}")
        try:
            parse_ts(queued.ts)
        except (ValueError, OverflowError):
            raise TransferRefused("bad-offer", f"queued time {queued.ts!r} is not a date") from None
        if not self._in_ledger(queued):
            self.log.ingest([queued])
        with self.log.lock:
            tr = self.log.network.transfer(tid, queued.origin)
            gave_up = tr is not None and tr.state == FAILED
        if gave_up:  # cancelled or expired by its origin: neither kept nor delivered any more
            raise TransferRefused("failed", f"{queued.origin} gave up on this transfer")
        route = frame["route"]
        if len(route) > MAX_ROUTE or not all(ids.is_node_id(n) for n in route):
            raise TransferRefused("bad-offer", "route is malformed")
        d = queued.data
        if d["destination"] != self.me and not known_dest:
            raise TransferRefused("unknown-destination", f"{d['destination']} is not known here")
        if d["size"] > self.max_file_size:
            raise TransferRefused("too-large", f"{d['size']} bytes is over the limit of {self.max_file_size}")
        need = d["size"] - self.spool.part_size(tid) + self.min_free_space
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

    def _check_claim(self, tid: str, queued: Event) -> None:
        """Never let an offer replace what is held: while bytes of ``tid`` are here (held,
        whole, partial or arriving), only the very queued event they belong to is taken."""
        here = (tid in self.held or tid in self._receiving or self.spool.data(tid).exists()
                or self.spool.part(tid).exists())
        mine = self.queued_event(tid) if here else None
        if mine is not None and mine.id != queued.id:
            raise TransferRefused("conflicting-offer",
                                  f"another claim on this transfer id (by {mine.origin}) is held here")

    def _already_have(self, tid: str, queued: Event) -> bool:
        if queued.origin == self.me:
            return True  # our own file came back around: we hold the original
        with self.log.lock:
            tr = self.log.network.transfer(tid, queued.origin)
            if tr is not None and (tr.state == DELIVERED or self.me in tr.custody):
                return True
        return self.spool.data(tid).exists()  # a whole copy is here (arrived, not yet passed on)

    def _receive_bytes(self, peer: str, stream: FrameStream, queued: Event,
                       route: tuple[str, ...]) -> None:
        """Take the bytes of an accepted offer into ``<tid>.part``, verify, commit, hold.

        Whatever happens after the part is opened, its descriptor is closed (and the flusher
        stopped) on the way out. A hash mismatch after a resume cuts the part back to the
        resume point once (the bytes before it may be honest); a second one discards it.
        """
        tid, d = queued.data["transfer"], queued.data
        size = d["size"]
        offset = self.spool.part_size(tid)
        if offset > size:
            offset = 0
        h = hashlib.sha256()
        if offset:
            hash_file(self.spool.part(tid), h)
        prog = Progress(tid, "in", peer, size, offset, time.time())
        ok = committed = False
        flusher = None
        fd = self.spool.open_part(tid, offset)
        try:
            with self.lock:
                self.progress[(tid, "in")] = prog
            stream.send("accept", offset=offset)
            if offset:
                log.info("relay.resume transfer=%s peer=%s offset=%d size=%d", tid, peer, offset, size)
            if d["destination"] != self.me and self.on_receiving and size - offset >= CUT_THROUGH_MIN:
                self.on_receiving(queued, route + (self.me,), prog, fd)
            flusher = _Flusher(fd) if size - offset >= FLUSH_FROM else None
            remaining = size - offset
            while remaining:
                chunk = stream.recv_some(min(remaining, CHUNK))
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view):]
                h.update(chunk)
                remaining -= len(chunk)
                prog.advance(len(chunk))
            if flusher is not None:
                flusher.stop()
            if h.hexdigest() != d["sha256"]:
                if offset and tid not in self._resume_failed:
                    self._resume_failed.add(tid)
                    os.ftruncate(fd, offset)  # keep what came before the resume, once
                    kept = offset
                else:
                    self._resume_failed.discard(tid)
                    os.close(fd)
                    committed = True
                    self.spool.discard(tid)
                    kept = 0
                log.warning("relay.refused transfer=%s peer=%s reason=hash-mismatch kept=%d", tid, peer, kept)
                self.metrics.offer_refused(peer, "hash-mismatch")
                stream.send("refuse", reason="hash-mismatch", detail="bytes do not match the sha256 of the queued event")
                return
            self._resume_failed.discard(tid)
            try:  # who sent it, for recovery; fsynced with the file's inode
                os.setxattr(fd, SENDER_XATTR, peer.encode())
            except OSError:
                self.spool.write_meta(tid, {"queued": queued.to_dict(), "from": peer, "passed": list(route)})
            self.spool.commit_part(tid, fd)
            committed = True
            if not self._in_ledger(queued):
                # The origin's feed has a gap here, so recovery could not find the queued
                # event in the log: keep it beside the copy.
                self.spool.write_meta(tid, {"queued": queued.to_dict(), "from": peer, "passed": list(route)})
            if d["destination"] == self.me:
                self._deliver(tid, queued)
            else:
                self._append(E.TRANSFER_RELAYED, {"transfer": tid, "from": peer})
                self._hold(tid, queued.origin, d["destination"], queued.ts, route + (self.me,))
                log.info("transfer.relayed transfer=%s from=%s size=%d", tid, peer, size)
            ok = True
        finally:
            if flusher is not None:
                flusher.stop()
            if not committed:
                os.close(fd)  # the part stays: the next offer resumes from here
            prog.finish(ok)
        self.metrics.received(peer, size - offset)
        stream.send("stored")

    # -- deliver (destination) ---------------------------------------------------------------
    def _deliver(self, tid: str, queued: Event, recovering: bool = False) -> None:
        """Publish into ``inbox/<origin>/`` once, then the receipt, then drop the spool copy.

        Crash: the inbox link comes first, then the receipt, then the spool copy goes. A crash
        before the receipt leaves the spool copy: recovery finds the link it made (same inode)
        instead of making a second one.
        """
        with self._deliver_lock:
            with self.log.lock:
                tr = self.log.network.transfer(tid, queued.origin)
                done = tr is not None and tr.delivered is not None
            if not done:
                resuming = recovering
                folder = self.inbox / queued.origin
                data = self.spool.data(tid)
                # Only a delivery a crash interrupted can have linked already; looking for
                # that link reads the whole folder, so not on every delivery.
                final = (find_link(data, folder) if resuming and folder.exists() else None) \
                    or link_unique(data, folder, queued.data["name"])
                self._append(E.TRANSFER_DELIVERED, {"transfer": tid, "sha256": queued.data["sha256"],
                                                    "name": final.name})
                log.info("transfer.delivered transfer=%s origin=%s path=%s size=%d",
                         tid, queued.origin, final, queued.data["size"])
            self.spool.discard(tid)
            with self.lock:
                self.held.pop(tid, None)

    # -- send (origin or relay) ----------------------------------------------------------------
    def offer_to(self, hop: str, channel: Any, held: Held) -> str:
        """Offer one transfer to ``hop`` over an open channel; returns "stored" or "have".

        Raises TransferRefused for a refusal, ProtocolError / EOFError / OSError when the
        channel breaks (the caller's retry decides what is transient).
        """
        tid = held.transfer
        queued = self.queued_event(tid)
        if queued is None:
            raise TransferRefused("lost", "no queued event for this transfer")
        stream = channel if isinstance(channel, FrameStream) else FrameStream(channel)
        size = queued.data["size"]
        t0 = time.monotonic()
        offset = self._offer(stream, held, queued)
        if offset is None:
            return "have"
        prog = self._outgoing(tid, hop, size, offset)
        try:
            with open(self.spool.data(tid), "rb", buffering=0) as f:
                f.seek(offset)
                buf = bytearray(CHUNK)
                remaining = size - offset
                while remaining:
                    n = f.readinto(memoryview(buf)[: min(CHUNK, remaining)])
                    if not n:
                        raise TransferRefused("lost", "spool copy is shorter than queued")
                    stream.send_raw(memoryview(buf)[:n])
                    remaining -= n
                    prog.done += n
            return self._stored(stream, hop, size - offset, t0)
        finally:
            with self.lock:
                self.progress.pop((tid, "out"), None)

    def forward_while_receiving(self, hop: str, stream: FrameStream, held: Held, queued: Event,
                                prog: Progress, fd: int) -> str:
        """Cut-through: offer to ``hop`` and stream bytes as they land in our part file.

        Custody does not change here: we answer our sender "stored" only for our own whole,
        verified copy, and the caller lets go only after both that and ``hop``'s "stored".
        Raises EOFError when our incoming copy fails (``hop`` keeps its part for a resume).
        """
        tid = held.transfer
        size = queued.data["size"]
        t0 = time.monotonic()
        sent = self._offer(stream, held, queued, cut_through=True)
        if sent is None:
            return "have"
        offset = sent
        out = self._outgoing(tid, hop, size, sent)
        try:
            while sent < size:
                with prog.cond:
                    while prog.done <= sent and prog.finished is None:
                        prog.cond.wait(1.0)
                    avail = prog.done if prog.finished is not False else sent
                if avail <= sent:
                    raise EOFError("the incoming copy stopped; forwarding stops too")
                data = os.pread(fd, min(avail - sent, CHUNK), sent)
                if not data:
                    raise EOFError("part file shorter than announced")
                stream.send_raw(data)
                sent += len(data)
                out.done = sent
            return self._stored(stream, hop, size - offset, t0)
        finally:
            with self.lock:
                self.progress.pop((tid, "out"), None)

    def _stored(self, stream: FrameStream, hop: str, sent: int, t0: float) -> str:
        """The receiver's "stored" for the ``sent`` bytes of an offer made at ``t0`` (counted
        in the metrics), or TransferRefused."""
        result = self._await_stored(stream)
        self.metrics.sent(hop, sent, time.monotonic() - t0)
        return result

    @staticmethod
    def _await_stored(stream: FrameStream) -> str:
        """The receiver's verdict on the bytes just sent: "stored", or TransferRefused."""
        reply = stream.recv(expect={"stored", "refuse"})
        if reply.op == "refuse":
            raise TransferRefused(reply["reason"], reply["detail"])
        return "stored"

    def _offer(self, stream: FrameStream, held: Held, queued: Event, cut_through: bool = False) -> int | None:
        """Send the offer; the receiver's resume offset, or None when it already has it."""
        extra = {"cut_through": True} if cut_through else {}
        stream.send("offer", transfer=held.transfer, queued=queued.to_dict(),
                    route=self._route_of(held), **extra)
        reply = stream.recv(expect={"accept", "have", "refuse"})
        if reply.op == "refuse":
            raise TransferRefused(reply["reason"], reply["detail"])
        if reply.op == "have":
            return None
        size = queued.data["size"]
        if not 0 <= reply["offset"] <= size:
            raise ProtocolError(f"accept offset {reply['offset']} outside 0..{size}")
        return reply["offset"]

    def _outgoing(self, tid: str, hop: str, size: int, offset: int) -> Progress:
        prog = Progress(tid, "out", hop, size, offset, time.time())
        with self.lock:
            self.progress[(tid, "out")] = prog
        return prog

    def _route_of(self, held: Held) -> list[str]:
        return [n for n in held.passed if n != self.me] + [self.me]

    def handed(self, tid: str, hop: str) -> None:
        """``hop`` answered "stored" (or "have"). Nobody lets go on that word alone: the origin
        keeps its copy until the receipt, a relay until the model shows the hop's signed
        custody; the planner drops it then, or resends elsewhere (``relay.plan``)."""
        with self.lock:
            h = self.held.get(tid)
            if h is None:
                return
            h.in_flight = False
            h.failures.clear()
            h.last_error = ""
            h.handed_to, h.handed_at = hop, time.time()
        log.info("relay.handed transfer=%s to=%s", tid, hop)

    def drop(self, tid: str, reason: str) -> None:
        with self.lock:
            self.held.pop(tid, None)
        self.spool.discard(tid)
        log.info("transfer.dropped transfer=%s reason=%s", tid, reason)

    def expire(self, tid: str, reason: str) -> None:
        """Give up as the origin: the file to ``failed/`` with the reason, then the event.

        Once per transfer: an expiry and a cancel that meet let the first one do it, and a
        transfer already failed is left alone. Crash: the reason is written into the spool
        meta (durably) before the file moves, so a crash between the move and the event
        leaves a meta without a copy, and ``recover`` appends the missing
        ``transfer.failed``. (The event cannot come first: the planner drops the copy of a
        transfer its origin failed.)
        """
        with self.lock:
            if tid in self._failing:
                return
            self._failing.add(tid)
        try:
            with self.log.lock:
                tr = self.log.network.transfer(tid, self.me)
                if tr is not None and tr.failed is not None:
                    return
            queued = self.queued_event(tid)
            name = queued.data["name"] if queued else tid
            dest = queued.data["destination"] if queued else "?"
            data = self.spool.data(tid)
            text = f"transfer {tid} to {dest} failed: {reason}"
            if data.exists():
                self.spool.write_meta(tid, {**(self.spool.read_meta(tid) or {}), "failing": reason[:500]})
                final = move_to_failed(data, self.failed, name, text)
            else:
                final = self.failed / name
            self._append(E.TRANSFER_FAILED, {"transfer": tid, "reason": reason[:500]})
            with self.lock:
                self.held.pop(tid, None)
            self.spool.discard(tid)
            log.warning("transfer.failed transfer=%s destination=%s reason=%s path=%s",
                        tid, dest, reason, final)
        finally:
            with self.lock:
                self._failing.discard(tid)

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish what a crash interrupted. Idempotent; runs before any service starts."""
        self._index_queued()
        self.replay_takes()
        for tid in self.spool.transfer_ids():
            try:
                self._recover_one(tid)
            except Exception:
                log.exception("spool.recover.failed transfer=%s", tid)

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
        """A batch take that a crash cut short: queue what moved in and has no event yet,
        after checking it again (the crash may have come between its rename and its check)."""
        entries = json.loads(intent.read_bytes())
        todo = [e for e in entries
                if e["transfer"] not in self._queued
                and os.path.lexists(self.spool.data(e["transfer"]))]
        if todo:
            fsync_dir(self.spool.folder)
            log.info("spool.recover intent=%s queue=%d", intent.name, len(todo))
            self._queue(todo, {})
        intent.unlink()

    def _recover_one(self, tid: str) -> None:
        data = self.spool.data(tid)
        failing = (self.spool.read_meta(tid) or {}).get("failing")
        if isinstance(failing, str):  # an expiry or cancel a crash cut short: finish it
            self.expire(tid, failing)
            return
        if not data.exists() or tid in self.held:
            return  # only a part (the next offer resumes it, or the sweep drops it) or done
        queued = self.queued_event(tid)
        if queued is None:
            log.warning("spool.recover transfer=%s no queued event yet; kept until gossip brings it", tid)
            return
        dest = queued.data["destination"]
        if dest == self.me:
            self._deliver(tid, queued, recovering=True)
            return
        with self.log.lock:
            tr = self.log.network.transfer(tid, queued.origin)
            delivered = tr is not None and tr.state == DELIVERED
            custody = dict(tr.custody) if tr is not None else {}
        if delivered:
            self.spool.discard(tid)
            return
        if queued.origin == self.me:
            self._hold(tid, self.me, dest, queued.ts, ())
            return
        sender = custody.get(self.me) or self._sender_of(tid) or queued.origin
        if self.me not in custody:
            self._append(E.TRANSFER_RELAYED, {"transfer": tid, "from": sender})
        chain = [sender]
        while chain[-1] in custody and len(chain) < MAX_ROUTE:
            chain.append(custody[chain[-1]])
        self._hold(tid, queued.origin, dest, queued.ts, tuple(reversed(chain)) + (self.me,))

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

    def sweep(self) -> None:
        """Let go of copies that nobody will finish or pass on:

        - a part whose transfer was delivered (or its origin gave up) while it waited here,
          e.g. the sender rerouted around us while we were down (reason = that state);
        - a part nobody wrote to for ``stale_after`` (an abandoned offer: ``stale-part``);
        - a whole copy that nobody holds (its queued event never came) in the spool for
          twice ``stale_after`` (``stale-copy``).

        Held copies (the planner ages those: ``relay.plan``), transfers arriving right now
        and, while a take is in progress, unheld whole copies are left alone.
        """
        now = time.time()
        taking = bool(self.spool.intents())
        for tid in self.spool.transfer_ids():
            reason = self._sweep_reason(tid, now, taking)
            if reason is None:
                continue
            with self.lock:
                if tid in self.held or tid in self._receiving:
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
        with self.lock:
            if tid in self.held or tid in self._receiving:
                return None
        try:
            if self.spool.data(tid).exists():
                # ctime: when it was renamed into the spool (mtime may be the producer's).
                old = now - self.spool.data(tid).stat().st_ctime >= 2 * self.stale_after
                return "stale-copy" if old and not taking else None
            queued = self._queued.get(tid)
            with self.log.lock:
                tr = self.log.network.transfer(tid, queued.origin) if queued is not None else None
                state = tr.state if tr is not None else None
            if state in (DELIVERED, FAILED):
                return state
            part = self.spool.part(tid)
            return "stale-part" if part.exists() and now - part.stat().st_mtime >= self.stale_after else None
        except FileNotFoundError:
            return None

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [p.as_dict() for p in self.progress.values()]
