"""The append-only event log on disk: ``state/events.jsonl``, one canonical event a line.

Crash semantics:
- An append is one ``os.write`` of whole lines followed by ``fdatasync`` before it returns;
  several events written together share one sync (group commit).
- A power cut mid-write leaves a torn tail (bytes after the last newline, or trailing lines
  that are not JSON). A writer that opens the log sets the torn bytes aside in
  ``events.jsonl.torn-<time>``, truncates them, and logs it. They are never folded.
- A bad line in the middle (bad JSON, schema, id, chain) is rejected with a reason and
  logged; it stays in the file (until a compaction, which writes only what is live) and
  nothing valid is lost (gossip refills any gap it leaves).
- A failed write (disk full) is cut back to the last good offset and the log reloaded, so
  memory never runs ahead of the disk.

Verify once: every line of the file was signature-checked before it was written (``ingest``
checks a peer's events, ``append_own`` signs its own), so loading the file checks only what
is cheap (JSON, schema, the id is the sha256 of the content, each ``prev`` is the held
head) and trusts the signatures. ``verify_stored=True`` (``maildrop check``) checks every
signature again and ignores the snapshot. A start reads ``state/snapshot.json`` (its format
is ``snapshot``; the file is written and checked here) when it is intact and covers a
prefix of this very file, and replays only the lines after it. Its crash semantics: written
aside, fsynced, renamed, folder fsynced: the old snapshot or the new one, never a mix.

Concurrency: processes serialize appends with ``flock`` on ``events.lock`` (the agent and a
CLI command may append at once); before appending, a writer reads what others appended.
Threads share one ``EventLog`` and its ``lock``, which also guards ``ledger`` and ``network``
(and the read offset with its running sha256, which ``write_snapshot`` takes under it).
Events from peers are signature-checked *before* the lock is taken (``ingest``), so a flood
of forgeries costs CPU on the receiving thread, never the lock others wait for.

Checkpoints and compaction: ``append_own`` appends this node's own ``feed.checkpoint``
once its feed has grown by ``CHECKPOINT_EVERY`` network events since the last one
(``checkpoint_if_old``: at start, when its live feed holds records older than
``events.VERSION``). Every event that leaves the ledger's memory (those before a feed's
second latest checkpoint, see ``ledger``) is counted as a covered line on disk; a legacy
transfer event among them was already put into the fact store when it joined, if this node
is a party of its transfer (``_adopt_legacy``), so nothing it needs leaves with it. Once the
covered lines on disk are at least ``COMPACT_MIN`` and at least as many as the live ones,
a writer compacts the file: the live events (and the file's own events waiting in the
ledger) are written aside, fsynced, renamed over ``events.jsonl`` and the folder fsynced,
all under the exclusive ``flock``. A crash leaves the old file or the new one (a stale
``.events.jsonl.compact-*`` file is removed at the next writable open); a process that
holds the old file open notices the new inode under the ``flock`` and reads the new file
from the start, so no append goes to the old file.

Transfer facts (docs/history.md) are not in this file: this node's own go to the fact
store beside it (``facts.sqlite``, ``factstore``) through ``append_own``, and those that
reach it with an offer, in a ``stored`` answer or by notice through ``ingest_facts``; the
model is fed from the store (at open: the transfers not ended, and the most recently ended
ones). A version-1 (legacy) transfer event in a feed stays in the file and the ledger (the
chain needs it); it enters the store and the model only when this node is a party of that
transfer (``_party``): a bystander's model shows none.

Conflicts (see ``ledger``) are kept in ``conflicts.jsonl`` beside the log, one record a line
with the origin, the reason and the two signed events that prove it; each is appended and
fsynced when found. ``clear_conflict`` (``maildrop conflicts --clear``) rewrites the file
atomically (write aside, fsync, rename) under the same ``flock``; ``refresh`` notices a
changed file and reloads it, so a running agent sees a clear within its next refresh (the
agent refreshes every second). A crash mid-clear leaves the old file or the new one.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import checkpoint, snapshot
from .durable import fsync_dir
from .errors import InvalidEvent, MaildropError
from .events import (
    FEED_CHECKPOINT,
    NODE_CONFIGURED,
    TRANSFER_FAILED,
    TRANSFER_QUEUED,
    TRANSFER_RELAYED,
    TRANSFER_TYPES,
    VERSION,
    Event,
    make_event,
    make_fact,
    parse_event,
)
from .factstore import FILE as FACTS_FILE
from .factstore import FactStore
from .keys import NodeKey
from .ledger import NETWORK_TYPES, Feed, Ledger, Verify, verify_now
from .model import ENDED, RECENT_ENDED, Network

log = logging.getLogger("maildrop.eventlog")

REJECTED_LOG_EVERY = 10.0
"""Seconds between two ``gossip.events.rejected`` lines (the count covers the interval)."""
EXPIRE_EVERY = 10.0
"""Seconds between two sweeps of the ledger's pending events."""
CONFLICTS_FILE = "conflicts.jsonl"
CHECKPOINT_EVERY = 256
"""Own *network* events after which this node appends a checkpoint of its feed (the transfer
records a version-1 feed also holds do not count: a checkpoint covers them too, and the
fact store keeps the ones this node is a party to). A live feed then
holds at most about twice this many events (~200 KiB), so every holder's copy stays small,
while a checkpoint (a node with a handful of peers: 1 to 3 KiB, a few events' worth)
costs each holder about one percent more bytes than the events it stands for."""
COMPACT_MIN = 256
"""Covered lines on disk before a writer compacts the file (and at least as many as the
live ones, so the rewrite costs O(1) per covered line)."""
HASH_CHUNK = 1 << 20
"""Bytes of the log hashed at a time while checking the prefix a snapshot covers."""


@dataclass
class Ingested:
    accepted: list[Event] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    duplicates: int = 0


class EventLog:
    """One node's event log: the file, the ledger of valid events and the model they fold to."""

    def __init__(self, path: Path, *, pinned: Mapping[str, str] | None = None, writable: bool = True,
                 me: str | None = None, verify_stored: bool = False) -> None:
        """Open and fold the log. ``verify_stored``: check every stored signature again and
        never use the snapshot (slow: for ``maildrop check``); else trust the signatures of
        the lines (they were checked before they were written) and start from the snapshot
        when it is usable (it needs ``me``)."""
        self.path = path
        self.writable = writable
        self.me = me
        self._verify_stored: Verify = verify_now if verify_stored else _trusted
        self._prefix_hash = hashlib.sha256()  # sha256 of the file's bytes before ``_offset``
        self.snapshot_count = 0  # events the snapshot this log started from held (0: none)
        self.lock = threading.RLock()
        self.ledger = Ledger(pinned, me, collect_dropped=True)
        self.network = Network()
        self.rejected: list[str] = []
        self.torn: Path | None = None
        self._known_conflicts: dict[str, str] = {}
        self._conflicts_stamp: tuple[int, int, int] | None = None
        self._rejected_since = 0
        self._rejected_logged_at = 0.0
        self._expired_at = 0.0
        self._offset = 0
        self._covered = 0  # lines on disk that a checkpoint covers (compaction drops them)
        self._grown: dict[str, int] = {}  # origin -> own network events since its last checkpoint
        """Called with the events a checkpoint covered, before they leave the disk (the
        transfer facts among them are kept elsewhere by whoever sets it)."""
        self._lock_path = path.with_name(path.name.replace(".jsonl", "") + ".lock")
        if writable:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
            self._lock_fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
        else:
            try:
                self._fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._fd = -1
            try:
                self._lock_fd = os.open(self._lock_path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                self._lock_fd = -1
        self._conflicts_path = path.with_name(CONFLICTS_FILE)
        self.facts = FactStore(path.with_name(FACTS_FILE), readonly=not writable)
        self._fact_row = self.facts.last_row()
        with self._flock(exclusive=writable):
            if writable:
                for stale in path.parent.glob(f".{path.name}.compact-*"):
                    stale.unlink(missing_ok=True)
            if not verify_stored and me is not None:
                self._start_from_snapshot()
            self._read_new(initial=True)
            if writable:
                self._maybe_compact()
            for ev in self.facts.open_facts(RECENT_ENDED):
                self.network.apply(ev)
        self._load_conflicts()

    # -- file plumbing ----------------------------------------------------------------------
    @contextmanager
    def _flock(self, exclusive: bool) -> Iterator[None]:
        if self._lock_fd < 0:
            yield
            return
        fcntl.flock(self._lock_fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(self._lock_fd, fcntl.LOCK_UN)

    def _replaced(self) -> bool:
        """True when ``events.jsonl`` is another file than the one open (compacted, or
        created since a read-only open found none)."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        if self._fd < 0:
            return True
        return (st.st_ino, st.st_dev) != (os.fstat(self._fd).st_ino, os.fstat(self._fd).st_dev)

    def _reopen(self) -> None:
        """Open the file now at ``path`` and fold it from the start (another process
        compacted it, or created it after a read-only open found none). Caller holds the
        flock."""
        if self._fd >= 0:
            os.close(self._fd)
        flags = (os.O_RDWR | os.O_APPEND) if self.writable else os.O_RDONLY
        self._fd = os.open(self.path, flags | os.O_CLOEXEC)
        log.info("eventlog.reopened path=%s (replaced by another process: compacted, or created)", self.path)
        self._reload()

    def _start_from_snapshot(self) -> None:
        """Fold the snapshot's events, if it is usable, and go on after the offset it
        covers. Its events were checked when they joined the log; should the ledger refuse
        one now (its rules changed), the snapshot is dropped and the log replayed whole.
        Caller holds the flock."""
        assert self.me is not None
        snap = self._load_snapshot(snapshot.path_for(self.path), self.me)
        if snap is None:
            return
        offset, covered, events = snap
        try:
            legacy: list[Event] = []
            for ev in events:
                res = self.ledger.offer(ev, verify=_trusted)
                if res.rejected:
                    raise snapshot.Ignored(f"refused ({res.rejected})")
                self._apply_network(res.accepted, legacy)
            self._adopt_legacy(legacy)
        except (snapshot.Ignored, KeyError, TypeError, AttributeError, ValueError) as exc:
            # A refused event, or one whose fields are not what the fold reads (a snapshot
            # made by hand: its checksum only proves it is whole).
            why = exc if isinstance(exc, snapshot.Ignored) else f"bad-event ({type(exc).__name__})"
            log.warning("snapshot.ignored path=%s reason=%s; replaying the log", snapshot.path_for(self.path), why)
            self._reset()
            self.ledger.conflicts, self.ledger.evidence = {}, {}  # none of them is the file's
            return
        self._offset = offset
        self._prefix_hash = covered
        self.snapshot_count = len(events)
        log.info("snapshot.loaded events=%d offset=%d", len(events), offset)

    def _load_snapshot(self, path: Path, me: str) -> tuple[int, Any, list[Event]] | None:
        """``(offset, running sha256 of the log's first offset bytes, events)`` of the
        snapshot at ``path`` when it is intact and covers a prefix of this very log, else
        None (none there, or ignored: logged ``snapshot.ignored reason=...``)."""
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("snapshot.ignored path=%s reason=unreadable (%s); replaying the log", path, exc.strerror)
            return None
        try:
            offset, covered, events = snapshot.decode(data, me)
            h = self._hash_prefix(offset)
            if h.hexdigest() != covered:
                raise snapshot.Ignored("log-changed (the log's first bytes differ from those it "
                                       "covers: compacted, rewritten or restored)")
        except snapshot.Ignored as exc:
            log.warning("snapshot.ignored path=%s reason=%s; replaying the log", path, exc)
            return None
        return offset, h, events

    def _hash_prefix(self, offset: int) -> Any:
        """sha256 of the log's first ``offset`` bytes; snapshot.Ignored if it is shorter."""
        if self._fd < 0 or os.fstat(self._fd).st_size < offset:
            raise snapshot.Ignored("log-shorter (the log is shorter than the snapshot covers: "
                                   "restored or truncated)")
        h = hashlib.sha256()
        at = 0
        while at < offset:
            chunk = os.pread(self._fd, min(HASH_CHUNK, offset - at), at)
            if not chunk:
                raise snapshot.Ignored("log-shorter (the log shrank while it was read)")
            h.update(chunk)
            at += len(chunk)
        return h

    def _reset(self) -> None:
        """Forget every folded event (the conflicts stay): the file is read again from 0."""
        conflicts, evidence = self.ledger.conflicts, self.ledger.evidence
        self.ledger = Ledger(self.ledger.pinned, self.me, collect_dropped=True)
        self.ledger.conflicts, self.ledger.evidence = conflicts, evidence
        self.network = Network()
        self._offset = 0
        self._prefix_hash = hashlib.sha256()
        self._covered = 0
        self._grown = {}

    def _read_new(self, initial: bool = False) -> list[Event]:
        """Read and fold every complete line after ``_offset``. Caller holds the flock."""
        if not initial and self._replaced():
            self._reopen()
            return []
        if self._fd < 0:
            return []
        size = os.fstat(self._fd).st_size
        if size <= self._offset:
            return []
        data = os.pread(self._fd, size - self._offset, self._offset)
        end = data.rfind(b"\n") + 1
        body, tail = data[:end], data[end:]
        lines = body.split(b"\n")[:-1] if body else []
        # Trailing lines that are not JSON at all are torn too (e.g. zeros after a power cut).
        torn_from = len(lines)
        while torn_from > 0 and not _looks_like_json(lines[torn_from - 1]):
            torn_from -= 1
        if tail or torn_from < len(lines):
            torn_bytes = b"\n".join(lines[torn_from:]) + (b"\n" if torn_from < len(lines) else b"") + tail
            good_end = self._offset + sum(len(x) + 1 for x in lines[:torn_from])
            self._set_aside(torn_bytes, good_end)
            lines = lines[:torn_from]
            end = good_end - self._offset
        accepted: list[Event] = []
        legacy: list[Event] = []
        start_line = 0
        for n, line in enumerate(lines, start_line + 1):
            if not line.strip():
                continue
            try:
                ev = parse_event(line)
            except InvalidEvent as exc:
                self._reject(f"line at byte {self._offset}+: {exc}", n)
                continue
            result = self.ledger.offer(ev, verify=self._verify_stored)
            if result.rejected:
                self._reject(result.rejected, n)
            self._apply_network(result.accepted, legacy)
            accepted.extend(result.accepted)
        self._prefix_hash.update(data[:end])
        self._offset += end
        self._adopt_legacy(legacy)
        self._take_dropped()
        self._log_notes()
        return accepted

    def _take_dropped(self) -> None:
        """Count the events checkpoints covered as covered lines (every held event is on
        disk, and the file's covered lines were read)."""
        self._covered += len(self.ledger.take_dropped())

    def _maybe_compact(self) -> None:
        """Compact when the covered lines are many enough (see the module). Caller holds
        the exclusive flock and ``lock`` (or is the constructor)."""
        if self._covered >= COMPACT_MIN and self._covered >= self.ledger.count:
            self.compact()

    def compact(self) -> int:
        """Rewrite the file with only what is live: every held event and the file's own
        events waiting in the ledger. Atomic (write aside, fsync, rename, fsync the folder);
        caller holds the exclusive flock. Returns the bytes the file shrank by."""
        waiting = [w.ev for ws in self.ledger.pending.values() for vs in ws.values() for w in vs
                   if w.at == float("inf")]
        buf = b"".join(e.to_line() for e in [*self.ledger.all_events(), *waiting])
        tmp = self.path.with_name(f".{self.path.name}.compact-{os.getpid()}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(buf)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            log.error("eventlog.compact.failed path=%s error=%s (the old file stays)", self.path,
                      os.strerror(exc.errno or errno.EIO))
            return 0
        fsync_dir(self.path.parent)
        os.close(self._fd)
        self._fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
        shrank, self._offset = self._offset - len(buf), len(buf)
        self._prefix_hash = hashlib.sha256(buf)
        log.info("eventlog.compacted path=%s dropped_lines=%d bytes=%d shrank=%d",
                 self.path, self._covered, len(buf), shrank)
        self._covered = 0
        return shrank

    def _apply_network(self, events: Iterable[Event], legacy: list[Event]) -> None:
        """Fold the network events of a feed into the model; its legacy transfer events go
        to ``legacy`` (for ``_adopt_legacy``)."""
        for e in events:
            if e.type in TRANSFER_TYPES:
                legacy.append(e)
            else:
                self.network.apply(e)

    def party_of(self, events: Sequence[Event]) -> set[str]:
        """The transfer ids among ``events`` (transfer facts) this node has a part in (``_party``)."""
        with self.lock:
            return self._party(events)

    def _party(self, events: Sequence[Event]) -> set[str]:
        """The transfer ids among ``events`` this node has a part in: it queued the transfer,
        is its destination, signed custody of it, or already holds a fact of it. With no
        ``me`` (a bare log, in tests and tools) every id."""
        tids = {e.data["transfer"] for e in events}
        if self.me is None:
            return tids
        mine = {e.data["transfer"] for e in events if e.origin == self.me and e.type in
                (TRANSFER_QUEUED, TRANSFER_RELAYED)}
        mine |= {e.data["transfer"] for e in events
                 if e.type == TRANSFER_QUEUED and e.data["destination"] == self.me}
        return mine | {t for t in tids - mine if self.network.holds_transfer(t) or self.facts.holds(t)}

    def _adopt_legacy(self, legacy: Sequence[Event]) -> None:
        """Legacy (version-1) transfer events that joined the ledger: the ones of transfers
        this node is a party of go into the store (a writer) and the model; the others stay
        in their chain only."""
        if not legacy:
            return
        ours = self._party(legacy)
        mine = [e for e in legacy if e.data["transfer"] in ours]
        if self.writable and mine:
            mine = self.facts.put(mine)
        self._apply_facts(mine)

    def _apply_facts(self, events: Iterable[Event]) -> None:
        """Fold new facts into the model, except late ones of a transfer already ended and
        forgotten by it (the store holds those)."""
        for e in events:
            tid = e.data["transfer"]
            if not self.network.holds_transfer(tid) and self.facts.state_of(tid) in ENDED \
                    and e.type != TRANSFER_QUEUED:
                continue
            self.network.apply(e)

    def _log_notes(self) -> None:
        for note in self.ledger.take_notes():
            log.warning("%s", note)

    def _set_aside(self, torn: bytes, good_end: int) -> None:
        if not self.writable:
            log.warning("eventlog.torn.ignored path=%s bytes=%d (a writer will set it aside)", self.path, len(torn))
            return
        aside = self.path.with_name(f"{self.path.name}.torn-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        with open(aside, "wb") as f:
            f.write(torn)
            f.flush()
            os.fsync(f.fileno())
        os.ftruncate(self._fd, good_end)
        os.fsync(self._fd)
        self.torn = aside
        log.warning("eventlog.torn path=%s bytes=%d set_aside=%s", self.path, len(torn), aside)

    def _load_conflicts(self) -> None:
        """Conflicts found earlier (forks) stay known across restarts; the file is the list
        (a record for this node's own id is ignored: a node never marks itself)."""
        self._conflicts_stamp = _stamp(self._conflicts_path)
        self.ledger.conflicts = {o: r for o, r in self.ledger.conflicts.items() if o not in self._known_conflicts}
        for rec in read_conflicts(self._conflicts_path):
            if rec["origin"] != self.me:
                self.ledger.conflicts.setdefault(rec["origin"], rec["reason"])
        self.ledger.evidence = {o: e for o, e in self.ledger.evidence.items() if o in self.ledger.conflicts}
        self._known_conflicts = dict(self.ledger.conflicts)

    def _record_conflicts(self) -> None:
        """Persist newly found conflicts with both signed events (caller holds the lock)."""
        new = {o: r for o, r in self.ledger.conflicts.items() if o not in self._known_conflicts}
        if not new or not self.writable:
            return
        with open(self._conflicts_path, "ab") as f:
            for origin, reason in new.items():
                pair = self.ledger.evidence.get(origin, ())
                rec = {"origin": origin, "reason": reason, "events": [e.to_dict() for e in pair]}
                f.write(json.dumps(rec, sort_keys=True).encode() + b"\n")
            f.flush()
            os.fsync(f.fileno())
        self._conflicts_stamp = _stamp(self._conflicts_path)
        self._known_conflicts.update(new)
        for origin, reason in new.items():
            log.error("eventlog.conflict origin=%s reason=%s (never routed to; evidence in %s)",
                      origin, reason, self._conflicts_path)

    def _reject(self, reason: str, line_no: int) -> None:
        self.rejected.append(reason)
        log.warning("eventlog.rejected path=%s line=%d reason=%s", self.path, line_no, reason)

    def _write(self, events: Sequence[Event]) -> None:
        """Append whole lines and fdatasync. Caller holds the flock. On failure cut back."""
        buf = b"".join(e.to_line() for e in events)
        before = self._offset
        try:
            view = memoryview(buf)
            while view:
                n = os.write(self._fd, view)
                view = view[n:]
            os.fdatasync(self._fd)
        except OSError as exc:
            os.ftruncate(self._fd, before)
            self._reload()
            raise MaildropError(f"cannot append to {self.path}: {os.strerror(exc.errno or errno.EIO)}") from exc
        self._prefix_hash.update(buf)
        self._offset += len(buf)

    def _reload(self) -> None:
        self._reset()
        self._read_new(initial=True)
        for ev in self.facts.open_facts(RECENT_ENDED):
            self.network.apply(ev)

    # -- the API ----------------------------------------------------------------------------
    def set_pins(self, remove: Iterable[str] = (), add: Mapping[str, str] | None = None) -> None:
        """Change the pinned peer keys (a reload): feeds already held stay; the new pins
        apply to what joins from now on."""
        with self.lock:
            for origin in remove:
                self.ledger.pinned.pop(origin, None)
            self.ledger.pinned.update(add or {})

    def refresh(self) -> list[Event]:
        """Fold what other processes appended since we last looked, and reload the conflicts
        if their file changed (an operator cleared one). Cheap when nothing did."""
        with self.lock:
            if _stamp(self._conflicts_path) != self._conflicts_stamp:
                before = set(self.ledger.conflicts)
                self._load_conflicts()
                log.warning("eventlog.conflicts.reloaded cleared=%s conflicts=%d",
                            ",".join(sorted(before - set(self.ledger.conflicts))) or "-",
                            len(self.ledger.conflicts))
            facts: list[Event] = []
            if not self.writable:  # the agent appends facts to the store: follow them
                facts, self._fact_row = self.facts.since(self._fact_row)
                for ev in facts:
                    self.network.apply(ev)
            if not self._replaced() and (self._fd < 0 or os.fstat(self._fd).st_size <= self._offset):
                return facts
            with self._flock(exclusive=False):
                return facts + self._read_new()

    def append_own(
        self, key: NodeKey, origin: str, items: Iterable[tuple[str, Mapping[str, Any]]], now: float
    ) -> list[Event]:
        """Sign and record this node's next events; returns them in the order of ``items``.
        Network events are appended to the feed (one write, one sync); transfer facts are
        made standalone (``make_fact``) and put into the fact store (one transaction,
        durable on return). Then, once the feed has grown by ``CHECKPOINT_EVERY`` network
        events since its last checkpoint, append a checkpoint too (not among the returned
        events) and compact if due. Counted here, from one scan of the feed on the first
        append: own events another process appends (a CLI command) are not counted, which
        only delays a checkpoint."""
        items = list(items)
        if not items:
            return []
        if not self.writable:
            raise MaildropError("event log opened read-only")
        with self.lock, self._flock(exclusive=True):
            self._read_new()
            if origin not in self._grown:
                self._grown[origin] = _grown(self.ledger.feeds.get(origin))
            out = self._append(key, origin, items, now)
            if self._grown[origin] >= CHECKPOINT_EVERY:
                self._checkpoint(key, origin, now)
            self._maybe_compact()
            return out

    def _append(self, key: NodeKey, origin: str, items: Sequence[tuple[str, Mapping[str, Any]]],
                now: float) -> list[Event]:
        """Sign and record ``items`` (caller holds both locks): network events as ``origin``'s
        next feed events (one write), transfer facts standalone into the fact store."""
        feed = self.ledger.feeds.get(origin)
        seq = feed.head_seq if feed else 0
        prev = feed.head_id if feed else None
        out: list[Event] = []
        chained: list[Event] = []
        facts: list[Event] = []
        for type_, data in items:
            if type_ in TRANSFER_TYPES:
                ev = make_fact(key, origin, now, type_, data)
                facts.append(ev)
            else:
                seq += 1
                ev = make_event(key, origin, seq, prev, now, type_, data)
                prev = ev.id
                chained.append(ev)
            out.append(ev)
        if facts:
            self._apply_facts(self.facts.put(facts))
        if chained:
            self._write(chained)
        for ev in chained:
            res = self.ledger.offer(ev, signed_here=True)
            if res.rejected:  # cannot happen unless our key differs from our feed's key
                raise MaildropError(f"own event refused by own log: {res.rejected}")
            for e in res.accepted:
                self.network.apply(e)
            if origin in self._grown and ev.type in NETWORK_TYPES:
                self._grown[origin] = 0 if ev.type == FEED_CHECKPOINT else self._grown[origin] + 1
        self._take_dropped()
        return out

    def _checkpoint(self, key: NodeKey, origin: str, now: float) -> Event | None:
        """Append a checkpoint of ``origin``'s live feed (caller holds both locks); None when
        its state is too big for one (logged; tried again ``CHECKPOINT_EVERY`` events later, the
        feed staying whole meanwhile)."""
        feed = self.ledger.feeds[origin]
        try:
            ev = self._append(key, origin, [(FEED_CHECKPOINT, checkpoint.make_checkpoint_data(feed.events))], now)[0]
        except InvalidEvent as exc:
            self._grown[origin] = 0  # tried again CHECKPOINT_EVERY network events later
            log.warning("checkpoint.skipped origin=%s seq=%d reason=%s", origin, feed.head_seq + 1, exc)
            return None
        log.info("checkpoint.written origin=%s seq=%d", origin, ev.seq)
        return ev

    def checkpoint_if_old(self, key: NodeKey, origin: str, now: float) -> Event | None:
        """At start: append a checkpoint of ``origin``'s feed when its live part holds
        records of an older version than ``events.VERSION`` (so they can be dropped), and
        compact if due. Returns the checkpoint, or None when none was needed."""
        with self.lock, self._flock(exclusive=True):
            self._read_new()
            feed = self.ledger.feeds.get(origin)
            if feed is None or not any(e.v < VERSION for e in feed.events):
                return None
            ev = self._checkpoint(key, origin, now)
            self._maybe_compact()
            return ev

    def ingest_facts(self, events: Iterable[Event], now: float | None = None, *,
                     offered: bool = False, addressed: bool = False) -> Ingested:
        """Take transfer facts from a peer (with an offer: ``offered``; in a ``stored`` or
        ``have`` answer; by notice) into the store and the model.

        Each must be a transfer fact (standalone, or a legacy version-1 one: then it joins
        the store only, its chain comes by gossip), signed by its origin under a key the
        ledger knows for it, and about a transfer this node has a part in: a
        ``transfer.queued`` that comes with an offer to us, names us as its destination or
        is ours; a ``transfer.failed`` its origin addressed to us by notice (``addressed``:
        we are its destination or a custodian, and a copy may still come); any other fact
        only when this node already holds a fact of that transfer (the id is random: only
        a party can name it). The rest is refused, logged as one
        line with a count, never stored. Durable on return (``FactStore.put``)."""
        result = Ingested()
        events = list(events)
        now = time.time() if now is None else now
        if not self.writable:
            raise MaildropError("event log opened read-only")
        with self.lock:
            keys = {o: self.ledger.known_keys(o) for o in {e.origin for e in events}}
        signed: list[Event] = []
        for ev in events:
            if ev.type not in TRANSFER_TYPES:
                result.rejected.append(f"{ev.type} from {ev.origin} is not a transfer fact")
            elif not keys.get(ev.origin):
                result.rejected.append(f"no key known for {ev.origin}")
            elif not any(ev.verify_signature(k) for k in keys[ev.origin]):
                result.rejected.append(f"{ev.type} not signed by {ev.origin}")
            else:
                signed.append(ev)
        with self.lock:
            known = self._party(signed)
            ours = []
            for ev in signed:
                tid = ev.data["transfer"]
                if tid in known or ev.origin == self.me or (ev.type == TRANSFER_QUEUED and (
                        offered or ev.data["destination"] == self.me)) or (
                        addressed and ev.type == TRANSFER_FAILED):
                    ours.append(ev)
                else:
                    result.rejected.append(f"{ev.type} of {tid} from {ev.origin}: not a transfer of ours")
            new = self.facts.put(ours) if ours else []
            result.duplicates = len(ours) - len(new)
            result.accepted = new
            self._apply_facts(new)
        self._log_rejected(result.rejected, now)
        return result

    def ingest(self, events: Iterable[Event], now: float | None = None) -> Ingested:
        """Validate events from a peer (received at ``now``, default the clock) and append
        the ones that join (one write, one sync). Signatures are checked before the lock is
        taken; rejections are logged as one line with a count (at most one line every
        ``REJECTED_LOG_EVERY`` seconds), never one line per event."""
        result = Ingested()
        events = list(events)
        now = time.time() if now is None else now
        with self.lock:
            keys = {o: self.ledger.known_keys(o) for o in {e.origin for e in events}}
            # Duplicates are never checked by the ledger: no signature to verify for them.
            fresh = [e for e in events if not e.is_fact and not self.ledger.holds(e)]
        verify = _preverify(fresh, keys)
        with self.lock, self._flock(exclusive=True):
            self._read_new()
            if now - self._expired_at >= EXPIRE_EVERY:
                self._expired_at = now
                self.ledger.expire(now)
            legacy: list[Event] = []
            for ev in events:
                if ev.is_fact:
                    result.rejected.append(f"{ev.type} from {ev.origin}: a transfer fact never comes by gossip")
                    continue
                offered = self.ledger.receive(ev, now, verify)
                if offered.rejected:
                    result.rejected.append(offered.rejected)
                elif offered.duplicate:
                    result.duplicates += 1
                result.accepted.extend(offered.accepted)
            if result.accepted:
                self._write(result.accepted)
                self._apply_network(result.accepted, legacy)
                self._adopt_legacy(legacy)
            self._take_dropped()
            if result.rejected:
                self._record_conflicts()
            self._maybe_compact()
            self._log_notes()
        self._log_rejected(result.rejected, now)
        return result

    def _log_rejected(self, reasons: list[str], now: float) -> None:
        if not reasons:
            return
        self._rejected_since += len(reasons)
        if now - self._rejected_logged_at >= REJECTED_LOG_EVERY:
            log.warning("gossip.events.rejected count=%d first=%s (count: since the last such line)",
                        self._rejected_since, reasons[0])
            self._rejected_logged_at = now
            self._rejected_since = 0

    # -- the gossip Store interface (see gossip.Store) -------------------------------------
    def fingerprint(self) -> str:
        with self.lock:
            return self.ledger.fingerprint()

    def version_vector(self) -> dict[str, int]:
        with self.lock:
            return self.ledger.version_vector()

    def since(self, their_vv: Mapping[str, int], limit: int | None = None) -> list[Event]:
        with self.lock:
            return self.ledger.since(their_vv, limit)

    @property
    def size_bytes(self) -> int:
        return self._offset

    def write_snapshot(self) -> int:
        """Replace ``state/snapshot.json`` with the events held now and the log offset they
        fold from; returns how many events it holds. The state is taken under the lock,
        the file written outside it (events are immutable). Raises MaildropError if the
        file cannot be written (the old one stays; nothing else depends on it)."""
        if not self.writable or self.me is None:
            raise MaildropError("a snapshot is written by the agent's own writable log")
        with self.lock:
            offset, covered = self._offset, self._prefix_hash.hexdigest()
            held = list(self.ledger.all_events())
        target = snapshot.path_for(self.path)
        for stray in target.parent.glob(f".{target.name}.*.tmp"):  # left by a crash mid-write
            stray.unlink(missing_ok=True)
        try:
            size = _replace(snapshot.path_for(self.path), snapshot.encode(self.me, offset, covered, held))
        except OSError as exc:
            raise MaildropError(f"cannot write {snapshot.path_for(self.path)}: "
                                f"{os.strerror(exc.errno or errno.EIO)}") from exc
        log.info("snapshot.written events=%d offset=%d bytes=%d", len(held), offset, size)
        return len(held)

    def close(self) -> None:
        self.facts.close()
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1


def _grown(feed: Feed | None) -> int:
    """Network events of ``feed`` after its latest checkpoint (all of them without one)."""
    n = 0
    for e in reversed(feed.events if feed else []):
        if e.type == FEED_CHECKPOINT:
            break
        n += e.type in NETWORK_TYPES
    return n


def _replace(path: Path, data: bytes) -> int:
    """Replace ``path`` with ``data`` atomically and durably (write aside, fsync, rename,
    fsync the folder); returns the size. Raises OSError: the old file is then in place."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except OSError:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(tmp, path)
    fsync_dir(path.parent)
    return len(data)


def _trusted(_ev: Event, _key: str) -> bool:
    """The ``Verify`` of stored lines: their signatures were checked before they were written."""
    return True


def _preverify(events: Sequence[Event], keys: Mapping[str, list[str]]) -> Verify:
    """Check every signature against the keys it could be under (the origin's known keys,
    a seq 1's own key, and at most two keys announced in the batch) *now*, outside any
    lock; returns the ledger's ``verify`` callable, answering from these results."""
    batch_keys: dict[str, list[str]] = {}
    for ev in events:
        if ev.type in (NODE_CONFIGURED, FEED_CHECKPOINT):
            ks = batch_keys.setdefault(ev.origin, [])
            if len(ks) < 2 and checkpoint.start_key(ev) not in ks:
                ks.append(checkpoint.start_key(ev))
    known: dict[tuple[str, str], bool] = {}
    for ev in events:
        if ev.seq == 1:
            tries = [ev.data["key"]] if ev.type == NODE_CONFIGURED else []
        else:
            tries = [*keys.get(ev.origin, []), *batch_keys.get(ev.origin, [])]
        for key in tries:
            ok = known[(ev.id, key)] = ev.verify_signature(key)
            if ok:
                break

    def verify(ev: Event, key: str) -> bool:
        ok = known.get((ev.id, key))
        if ok is None:  # the ledger moved on since the batch was checked (rare)
            ok = known[(ev.id, key)] = ev.verify_signature(key)
        return ok
    return verify


def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def read_conflicts(path: Path) -> list[dict[str, Any]]:
    """The records of a ``conflicts.jsonl`` (``origin``, ``reason``, ``events``); bad lines
    are skipped. Reads the old format (one ``event``) too."""
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
            events = rec.get("events") or ([rec["event"]] if rec.get("event") else [])
            out.append({"origin": str(rec["origin"]), "reason": str(rec["reason"]), "events": list(events)})
        except (ValueError, KeyError, TypeError, AttributeError):
            continue
    return out


def clear_conflict(events_path: Path, origin: str) -> bool:
    """Remove every conflict record of ``origin`` from the log's conflicts file; False if it
    had none. Atomic (write aside, fsync, rename, fsync the folder) and under the log's
    ``flock``, so an agent appending a conflict at the same time loses nothing; a running
    agent reloads the file on its next ``refresh``."""
    path = events_path.with_name(CONFLICTS_FILE)
    lock_fd = os.open(events_path.with_name(events_path.name.replace(".jsonl", "") + ".lock"),
                      os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o660)
    try:
        fcntl.flock(lock_fd, fcntl.LOCK_EX)
        records = read_conflicts(path)
        keep = [r for r in records if r["origin"] != origin]
        if len(keep) == len(records):
            return False
        tmp = path.with_name(f".{CONFLICTS_FILE}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o640)
        with os.fdopen(fd, "wb") as f:
            f.write(b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in keep))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        return True
    finally:
        os.close(lock_fd)


def _looks_like_json(line: bytes) -> bool:
    s = line.strip()
    return s.startswith(b"{") and s.endswith(b"}")
