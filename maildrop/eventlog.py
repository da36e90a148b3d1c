"""The append-only event log on disk: ``state/events.jsonl``, one canonical event a line.

Crash semantics:
- An append is one ``os.write`` of whole lines followed by ``fdatasync`` before it returns;
  several events written together share one sync (group commit).
- A power cut mid-write leaves a torn tail (bytes after the last newline, or trailing lines
  that are not JSON). A writer that opens the log sets the torn bytes aside in
  ``events.jsonl.torn-<time>``, truncates them, and logs it. They are never folded.
- A bad line in the middle (bad JSON, id, signature, chain) is rejected with a reason and
  logged; it stays in the file and nothing valid is lost (gossip refills any gap it leaves).
- A failed write (disk full) is cut back to the last good offset and the log reloaded, so
  memory never runs ahead of the disk.

Concurrency: processes serialize appends with ``flock`` on ``events.lock`` (the agent and a
CLI command may append at once); before appending, a writer reads what others appended.
Threads share one ``EventLog`` and its ``lock``, which also guards ``ledger`` and ``network``.
Events from peers are signature-checked *before* the lock is taken (``ingest``), so a flood
of forgeries costs CPU on the receiving thread, never the lock others wait for.

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

from .durable import fsync_dir
from .errors import InvalidEvent, MaildropError
from .events import (
    NODE_CONFIGURED,
    TRANSFER_FAILED,
    TRANSFER_QUEUED,
    TRANSFER_RELAYED,
    TRANSFER_TYPES,
    Event,
    make_event,
    make_fact,
    parse_event,
)
from .factstore import FILE as FACTS_FILE
from .factstore import FactStore
from .keys import NodeKey
from .ledger import Ledger, Verify
from .model import ENDED, RECENT_ENDED, Network

log = logging.getLogger("maildrop.eventlog")

REJECTED_LOG_EVERY = 10.0
"""Seconds between two ``gossip.events.rejected`` lines (the count covers the interval)."""
EXPIRE_EVERY = 10.0
"""Seconds between two sweeps of the ledger's pending events."""
CONFLICTS_FILE = "conflicts.jsonl"


@dataclass
class Ingested:
    accepted: list[Event] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    duplicates: int = 0


class EventLog:
    """One node's event log: the file, the ledger of valid events and the model they fold to."""

    def __init__(self, path: Path, *, pinned: Mapping[str, str] | None = None, writable: bool = True,
                 me: str | None = None) -> None:
        self.path = path
        self.writable = writable
        self.me = me
        self.lock = threading.RLock()
        self.ledger = Ledger(pinned, me)
        self.network = Network()
        self.rejected: list[str] = []
        self.torn: Path | None = None
        self._known_conflicts: dict[str, str] = {}
        self._conflicts_stamp: tuple[int, int, int] | None = None
        self._rejected_since = 0
        self._rejected_logged_at = 0.0
        self._expired_at = 0.0
        self._offset = 0
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
            self._read_new(initial=True)
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

    def _read_new(self, initial: bool = False) -> list[Event]:
        """Read and fold every complete line after ``_offset``. Caller holds the flock."""
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
            result = self.ledger.offer(ev)
            if result.rejected:
                self._reject(result.rejected, n)
            self._apply_network(result.accepted, legacy)
            accepted.extend(result.accepted)
        self._offset += end
        self._adopt_legacy(legacy)
        self._log_notes()
        return accepted

    def _apply_network(self, events: Iterable[Event], legacy: list[Event]) -> None:
        """Fold the network events of a feed into the model; its legacy transfer events go
        to ``legacy`` (for ``_adopt_legacy``)."""
        for e in events:
            if e.type in TRANSFER_TYPES:
                legacy.append(e)
            else:
                self.network.apply(e)

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
        self._offset += len(buf)

    def _reload(self) -> None:
        conflicts, evidence = self.ledger.conflicts, self.ledger.evidence
        self.ledger = Ledger(self.ledger.pinned, self.me)
        self.ledger.conflicts, self.ledger.evidence = conflicts, evidence
        self.network = Network()
        self._offset = 0
        self._read_new()
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
            if self._fd < 0 or os.fstat(self._fd).st_size <= self._offset:
                return facts
            with self._flock(exclusive=False):
                return facts + self._read_new()

    def append_own(
        self, key: NodeKey, origin: str, items: Iterable[tuple[str, Mapping[str, Any]]], now: float
    ) -> list[Event]:
        """Sign and record this node's next events; returns them in the order of ``items``.
        Network events are appended to the feed (one write, one sync); transfer facts are
        made standalone (``make_fact``) and put into the fact store (one transaction,
        durable on return)."""
        items = list(items)
        if not items:
            return []
        if not self.writable:
            raise MaildropError("event log opened read-only")
        with self.lock, self._flock(exclusive=True):
            self._read_new()
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
            return out

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
            if result.rejected:
                self._record_conflicts()
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

    def close(self) -> None:
        self.facts.close()
        for fd in (self._fd, self._lock_fd):
            if fd >= 0:
                os.close(fd)
        self._fd = self._lock_fd = -1


def _preverify(events: Sequence[Event], keys: Mapping[str, list[str]]) -> Verify:
    """Check every signature against the keys it could be under (the origin's known keys,
    a seq 1's own key, and at most two keys announced in the batch) *now*, outside any
    lock; returns the ledger's ``verify`` callable, answering from these results."""
    batch_keys: dict[str, list[str]] = {}
    for ev in events:
        if ev.type == NODE_CONFIGURED:
            ks = batch_keys.setdefault(ev.origin, [])
            if len(ks) < 2 and ev.data["key"] not in ks:
                ks.append(ev.data["key"])
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
