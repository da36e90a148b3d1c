"""Custody of files: take from the outbox, receive from a peer, deliver, send to a hop.

Part of the imperative shell (with ``agent``): it drives ``spool`` (files) and ``eventlog``
(facts) in the order that makes every crash safe. Record before acting:

- take:    meta -> rename into the spool -> hash -> ``transfer.queued``.
- receive: meta -> bytes into ``<tid>.part`` -> verify size+sha256 -> fsync -> rename to
           ``<tid>.data`` -> ``transfer.relayed`` (or deliver) -> answer ``stored``.
- deliver: meta says delivering -> hard-link into ``inbox/<origin>/`` (never overwriting)
           -> ``transfer.delivered`` -> drop the spool copy.
- send:    the sender lets go only after the receiver answered ``stored`` (or ``have``).

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
from .model import DELIVERED, FAILED
from .protocol import Frame, FrameStream
from .relay import Held
from .spool import Spool, find_link, fsync_dir, hash_file, link_unique, move_to_failed

log = logging.getLogger("maildrop.transfers")

CHUNK = 1024 * 1024
CUT_THROUGH_MIN = 8 * 1024 * 1024
FLUSH_FROM = 64 * 1024 * 1024  # files from this size are written back while they arrive
FLUSH_EVERY = 0.25  # smaller files are stored, then forwarded
SENDER_XATTR = "user.maildrop.from"
MAX_ROUTE = 64


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
                 on_change: Callable[[], None] = lambda: None) -> None:
        self.me = node_id
        self.key = key
        self.log = log_
        self.spool = spool
        self.inbox = inbox
        self.failed = failed
        self.max_file_size = max_file_size
        self.min_free_space = min_free_space
        self.on_change = on_change
        # Called when a relay starts receiving a big file, to forward it while it arrives.
        self.on_receiving: Callable[[Event, tuple[str, ...], Progress, int], None] | None = None
        self.lock = threading.RLock()
        self.held: dict[str, Held] = {}
        self.progress: dict[tuple[str, str], Progress] = {}
        self._receiving: set[str] = set()
        self._deliver_lock = threading.Lock()
        self._queued: dict[str, Event] = {}  # transfer id -> the origin's signed queued event

    # -- helpers ----------------------------------------------------------------------------
    def _append(self, type_: str, data: dict[str, Any]) -> Event:
        ev = self.log.append_own(self.key, self.me, [(type_, data)], time.time())[0]
        self.on_change()
        return ev

    def queued_event(self, tid: str) -> Event | None:
        """The origin's signed ``transfer.queued`` for ``tid``: from memory, the spool meta, or
        (once, then remembered) the log."""
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
                for e in self.log.ledger.all_events():
                    if e.type == E.TRANSFER_QUEUED and e.data["transfer"] == tid:
                        ev = e
                        break
        if ev is not None:
            self._queued[tid] = ev
        return ev

    def _index_queued(self) -> None:
        """Remember every queued event in the log (one pass, before recovery)."""
        with self.log.lock:
            for e in self.log.ledger.all_events():
                if e.type == E.TRANSFER_QUEUED:
                    self._queued[e.data["transfer"]] = e

    def _in_ledger(self, tid: str) -> bool:
        """True once the queued event is part of the log (not just waiting for a gap)."""
        with self.log.lock:
            tr = self.log.network.transfers.get(tid)
            return tr is not None and tr.origin is not None

    def _hold(self, tid: str, origin: str, destination: str, queued_ts: str,
              passed: tuple[str, ...]) -> None:
        with self.lock:
            if tid not in self.held:
                self.held[tid] = Held(tid, origin, destination, parse_ts(queued_ts), passed=passed)
        self.on_change()

    def reserve(self, queued: Event, passed: tuple[str, ...]) -> Held | None:
        """Hold a transfer that is still arriving, marked in flight (cut-through)."""
        tid = queued.data["transfer"]
        with self.lock:
            if tid in self.held:
                return None
            h = self.held[tid] = Held(tid, queued.origin, queued.data["destination"],
                                      parse_ts(queued.ts), passed=passed, in_flight=True)
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
        hashed and queued; a file with its event is done. Nothing is lost or queued twice.
        """
        entries: list[dict[str, Any]] = []
        seen: set[Path] = set()
        for path, destination in items:
            if path in seen:
                continue
            seen.add(path)
            try:
                st = path.lstat()
            except FileNotFoundError:
                continue
            if not os.path.isfile(path) or os.path.islink(path):
                continue
            name = ids.safe_file_name(path.name)
            if name is None:
                final = move_to_failed(path, self.failed, f"unsafe-name-{secrets.token_hex(4)}",
                                       f"the file name {path.name!r} cannot be sent safely; rename it")
                log.warning("outbox.refused path=%s reason=unsafe-name moved_to=%s", path, final)
                continue
            entries.append({"transfer": secrets.token_hex(16), "src": str(path),
                            "destination": destination, "name": name, "size_hint": st.st_size})
        if not entries:
            return []
        intent = self.spool.write_intent(entries)
        moved = []
        for e in entries:
            try:
                self.spool.move_in(Path(e["src"]), e["transfer"])
            except FileNotFoundError:  # taken away meanwhile (by its owner): nothing to send
                continue
            except PermissionError:
                log.error("outbox.take.refused path=%s reason=permission-denied: the agent cannot "
                          "move files out of %s; make it writable by the agent's group "
                          "(chmod 2770, or setfacl -d -m g:maildrop:rwX on outbox/)",
                          e["src"], Path(e["src"]).parent)
                continue
            moved.append(e)
        fsync_dir(self.spool.folder)
        for folder in {Path(e["src"]).parent for e in moved}:
            fsync_dir(folder)
        self._queue(moved)
        intent.unlink()
        return [e["transfer"] for e in moved]

    def _queue(self, entries: list[dict[str, Any]]) -> None:
        """Hash taken files and append their ``transfer.queued`` events in one write."""
        if not entries:
            return
        items = []
        for e in entries:
            size, sha = hash_file(self.spool.data(e["transfer"]))
            items.append((E.TRANSFER_QUEUED, {"transfer": e["transfer"], "destination": e["destination"],
                                              "name": e["name"], "size": size, "sha256": sha}))
        evs = self.log.append_own(self.key, self.me, items, time.time())
        self.on_change()
        for ev in evs:
            d = ev.data
            self._queued[d["transfer"]] = ev
            log.info("transfer.queued transfer=%s destination=%s name=%s size=%d",
                     d["transfer"], d["destination"], d["name"], d["size"])
            if d["destination"] == self.me:
                self._deliver(d["transfer"], ev)
            else:
                self._hold(d["transfer"], self.me, d["destination"], ev.ts, ())

    # -- receive (relay or destination) ------------------------------------------------------
    def receive(self, peer: str, stream: FrameStream, frame: Frame) -> None:
        """Answer one ``offer`` from ``peer``: have / refuse / accept, then take the bytes."""
        tid = frame["transfer"]
        try:
            queued, route = self._check_offer(peer, frame)
        except TransferRefused as exc:
            log.warning("relay.offer.refused peer=%s transfer=%s reason=%s detail=%s",
                        peer, str(tid)[:40], exc.reason, exc.detail)
            stream.send("refuse", reason=exc.reason, detail=exc.detail)
            return
        if self._already_have(tid, queued):
            stream.send("have")
            return
        with self.lock:
            if tid in self._receiving:
                stream.send("refuse", reason="busy", detail="this transfer is arriving on another channel")
                return
            self._receiving.add(tid)
        try:
            self._receive_bytes(peer, stream, queued, route)
        except (EOFError, OSError) as exc:
            # The sender went away (or the disk failed) mid-file: an expected event, not a
            # crash. The part stays; the next offer resumes from its size.
            log.warning("relay.receive.interrupted transfer=%s peer=%s bytes=%d error=%s",
                        tid, peer, self.spool.part_size(tid), exc)
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
        if not self._in_ledger(tid):
            self.log.ingest([queued])
        self._queued[tid] = queued
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
        return queued, tuple(route)

    def _already_have(self, tid: str, queued: Event) -> bool:
        if queued.origin == self.me:
            return True  # our own file came back around: we hold the original
        with self.log.lock:
            tr = self.log.network.transfers.get(tid)
            if tr is not None and (tr.state == DELIVERED or self.me in tr.receipts
                                   or self.me in tr.custody):
                return True
        return self.spool.data(tid).exists()  # a whole copy is here (arrived, not yet passed on)

    def _receive_bytes(self, peer: str, stream: FrameStream, queued: Event,
                       route: tuple[str, ...]) -> None:
        tid, d = queued.data["transfer"], queued.data
        size = d["size"]
        offset = self.spool.part_size(tid)
        if offset > size:
            offset = 0
        h = hashlib.sha256()
        if offset:
            hash_file(self.spool.part(tid), h)
        fd = self.spool.open_part(tid, offset)
        prog = Progress(tid, "in", peer, size, offset, time.time())
        with self.lock:
            self.progress[(tid, "in")] = prog
        stream.send("accept", offset=offset)
        if offset:
            log.info("relay.resume transfer=%s peer=%s offset=%d size=%d", tid, peer, offset, size)
        if d["destination"] != self.me and self.on_receiving and size - offset >= CUT_THROUGH_MIN:
            self.on_receiving(queued, route + (self.me,), prog, fd)
        ok = committed = False
        flusher = _Flusher(fd) if size - offset >= FLUSH_FROM else None
        try:
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
                os.close(fd)
                committed = True
                self.spool.discard(tid)
                log.warning("relay.refused transfer=%s peer=%s reason=hash-mismatch", tid, peer)
                stream.send("refuse", reason="hash-mismatch", detail="bytes do not match the sha256 of the queued event")
                return
            try:  # who sent it, for recovery; fsynced with the file's inode
                os.setxattr(fd, SENDER_XATTR, peer.encode())
            except OSError:
                self.spool.write_meta(tid, {"queued": queued.to_dict(), "from": peer, "passed": list(route)})
            self.spool.commit_part(tid, fd)
            committed = True
            if not self._in_ledger(tid):
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
                tr = self.log.network.transfers.get(tid)
                done = tr is not None and self.me in tr.receipts
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
            return self._await_stored(stream)
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
        sent = self._offer(stream, held, queued, cut_through=True)
        if sent is None:
            return "have"
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
            return self._await_stored(stream)
        finally:
            with self.lock:
                self.progress.pop((tid, "out"), None)

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
        """``hop`` stored it: a relay lets go now; the origin keeps its copy until the receipt."""
        with self.lock:
            h = self.held.get(tid)
            if h is None:
                return
            h.in_flight = False
            h.failures.clear()
            if h.origin == self.me:
                h.handed_to, h.handed_at = hop, time.time()
                return
            del self.held[tid]
        self.spool.discard(tid)
        log.info("relay.handed transfer=%s to=%s", tid, hop)

    def drop(self, tid: str, reason: str) -> None:
        with self.lock:
            self.held.pop(tid, None)
        self.spool.discard(tid)
        log.info("transfer.dropped transfer=%s reason=%s", tid, reason)

    def expire(self, tid: str, reason: str) -> None:
        """Give up as the origin: the file to ``failed/`` with the reason, then the event."""
        queued = self.queued_event(tid)
        name = queued.data["name"] if queued else tid
        dest = queued.data["destination"] if queued else "?"
        data = self.spool.data(tid)
        text = f"transfer {tid} to {dest} failed: {reason}"
        if data.exists():
            final = move_to_failed(data, self.failed, name, text)
        else:
            final = self.failed / name
        self._append(E.TRANSFER_FAILED, {"transfer": tid, "reason": reason[:500]})
        with self.lock:
            self.held.pop(tid, None)
        self.spool.discard(tid)
        log.warning("transfer.failed transfer=%s destination=%s reason=%s path=%s", tid, dest, reason, final)

    # -- recovery ------------------------------------------------------------------------------
    def recover(self) -> None:
        """Finish what a crash interrupted. Idempotent; runs before any service starts."""
        self._index_queued()
        for intent in self.spool.intents():
            try:
                self._replay_intent(intent)
            except Exception:  # one bad spool entry must not stop the agent
                log.exception("spool.recover.failed intent=%s", intent.name)
        for tid in self.spool.transfer_ids():
            try:
                self._recover_one(tid)
            except Exception:
                log.exception("spool.recover.failed transfer=%s", tid)

    def _replay_intent(self, intent: Path) -> None:
        """A batch take that a crash cut short: queue what moved in and has no event yet."""
        entries = json.loads(intent.read_bytes())
        todo = [e for e in entries
                if e["transfer"] not in self._queued and self.spool.data(e["transfer"]).exists()]
        if todo:
            fsync_dir(self.spool.folder)
            log.info("spool.recover intent=%s queue=%d", intent.name, len(todo))
            self._queue(todo)
        intent.unlink()

    def _recover_one(self, tid: str) -> None:
        data = self.spool.data(tid)
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
            tr = self.log.network.transfers.get(tid)
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
        """Let go of partial copies that nobody will finish: the transfer was delivered (or
        its origin gave up) while the part waited here, e.g. the sender rerouted around us
        while we were down. Whole copies and transfers arriving right now are left alone."""
        for tid in self.spool.transfer_ids():
            if self.spool.data(tid).exists():
                continue
            with self.log.lock:
                tr = self.log.network.transfers.get(tid)
                state = tr.state if tr is not None else None
            if state not in (DELIVERED, FAILED):
                continue
            with self.lock:
                if tid in self.held or tid in self._receiving:
                    continue
                try:
                    self.spool.discard(tid)
                except OSError as exc:
                    log.warning("spool.drop.failed transfer=%s error=%s", tid, exc)
                    continue
            log.info("spool.dropped transfer=%s reason=%s", tid, state)

    def snapshot(self) -> list[dict[str, Any]]:
        with self.lock:
            return [p.as_dict() for p in self.progress.values()]
