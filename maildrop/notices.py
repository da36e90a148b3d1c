"""Notices: signed transfer facts routed hop by hop, with custody, to the one node that needs them.

A *notice* is ``(to, fact)``: a signed transfer fact (a receipt, a refusal, a failure) that
must reach node ``to``. This node keeps each notice in ``state/notices.sqlite`` until the
next hop said it stored it (``done``), then forgets it; the next hop keeps it the same way,
until ``to`` has it. The hop protocol's ``notice`` op carries them (docs/protocol.md); the
agent's pump picks the next hop (``next_hop``) and sends.

Why sqlite3 (WAL, ``synchronous=FULL``) and not one file per notice: a notice is small
(under 1 KiB) and a hop stores a whole frame of them at once; one transaction is one fsync
of the write-ahead log for the frame, where files would cost a file fsync each plus a
folder fsync, and the dedupe by ``(to, fact id)`` is the table's primary key. It is the
standard library, as the fact store is.

Bounds: at most ``MAX_QUEUE`` notices and ``MAX_QUEUE_BYTES`` of facts are held; over
either ``send`` logs ``notice.queue.full`` and raises ``QueueFull`` (the caller's fact is
still recorded in its own store; only its routing is refused); one peer's notices fill at
most ``MAX_FROM_PEER`` of it. A notice whose fact is older
than ``max_age`` (by the fact's own signed ``ts``) is dropped with ``notice.expired``: by
then the transfer it tells of has ended by its own deadline.

At the destination, ``arrive`` remembers each fact id handed over (table ``arrived``) for
``max_age`` after the fact's time, so a notice a hop resends after a crash is handed over
once; older duplicates are expired on arrival anyway.

Crash behaviour: ``send``, ``accept`` and ``arrive`` return after their transaction is
committed and the write-ahead log fsynced; a crash before that loses nothing the sender was
told was stored (the sender drops a notice only after the next hop's ``stored``). A crash
between the next hop's ``stored`` and ``done`` resends the notice: the next hop dedupes by
``(to, fact id)`` while it still holds it, and the destination by ``arrived``.

Thread safety: one connection, used by the pump, the channel handlers and the custody
service; ``_lock`` guards it (a leaf: nothing is taken under it).
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import InvalidEvent, MaildropError
from .events import (
    TRANSFER_DELIVERED,
    TRANSFER_FAILED,
    TRANSFER_QUEUED,
    TRANSFER_REFUSED,
    TRANSFER_RELAYED,
    Event,
    parse_event,
    parse_ts,
)
from .model import Network
from .routing import route

log = logging.getLogger("maildrop.notices")

FILE_NAME = "notices.sqlite"
MAX_QUEUE = 10_000
"""Notices held at once at most (every destination together)."""
MAX_QUEUE_BYTES = 32 * 1024 * 1024
"""Bytes of facts held at once at most."""
MAX_FROM_PEER = MAX_QUEUE // 4
"""Notices held at once at most that one peer handed here: a peer that floods this node
with notices fills a quarter of the queue, never the room the others' notices need."""
FACT_TYPES = frozenset({TRANSFER_QUEUED, TRANSFER_RELAYED, TRANSFER_DELIVERED, TRANSFER_FAILED,
                        TRANSFER_REFUSED})
"""The event types a notice may carry: transfer facts (network facts travel by gossip)."""
BACKOFF_FIRST = 1.0
"""Seconds before the first retry of a notice whose send failed."""
BACKOFF_CAP = 300.0
"""The longest wait between two tries of one notice."""


class QueueFull(MaildropError):
    """The notice queue is over ``MAX_QUEUE`` or ``MAX_QUEUE_BYTES``: the notice was not taken."""


def backoff(attempts: int, first: float = BACKOFF_FIRST, cap: float = BACKOFF_CAP) -> float:
    """Seconds to wait after the ``attempts``-th failed try (1, 2, ...): ``first`` doubled
    per failure, at most ``cap`` (tenacity's ``wait_exponential``, without jitter). Pure."""
    if attempts <= 0:
        return 0.0
    return min(cap, first * 2.0 ** min(attempts - 1, 64))


def next_hop(net: Network, me: str, to: str, *, up: Collection[str], came_from: str | None = None,
             excluded: Iterable[str] = ()) -> str | None:
    """The peer to hand a notice for ``to`` to, or None while none can take it. Pure.

    ``to`` itself when its link is up (``up``: the peers this node's links are up to now);
    else the next hop of the model's route, first avoiding the peers that are down and the
    peer the notice came from (``came_from``: never sent back while another route exists),
    then avoiding only the down peers. A hop whose link is not up is never returned.
    """
    if to in up:
        return to
    down = {p for p in net.graph(excluded).get(me, ()) if p not in up}
    tries = [down | {came_from}, down] if came_from else [down]
    for avoid in tries:
        path = route(net, me, to, avoid=avoid - {to}, excluded=excluded)
        if path and len(path) > 1 and path[1] in up:
            return path[1]
    return None


@dataclass(frozen=True, slots=True)
class Notice:
    """One held notice: ``fact`` for ``to``; ``came_from`` the peer that handed it here
    (None: made here), ``hops`` how many hops it made so far, ``attempts`` failed tries."""

    to: str
    fact: Event
    came_from: str | None
    hops: int
    attempts: int
    due: float


_SCHEMA = """
CREATE TABLE IF NOT EXISTS notices (
    dest TEXT NOT NULL, fact_id TEXT NOT NULL, fact BLOB NOT NULL, fact_ts REAL NOT NULL,
    came_from TEXT, hops INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,
    due REAL NOT NULL, PRIMARY KEY (dest, fact_id)) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS notices_due ON notices (due);
CREATE INDEX IF NOT EXISTS notices_age ON notices (fact_ts);
CREATE TABLE IF NOT EXISTS arrived (fact_id TEXT PRIMARY KEY, fact_ts REAL NOT NULL) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS arrived_age ON arrived (fact_ts);
"""


class Notices:
    """The durable notice queue of one node (``state/notices.sqlite``). See the module."""

    def __init__(self, path: Path, *, max_age: float, max_count: int = MAX_QUEUE,
                 max_bytes: int = MAX_QUEUE_BYTES, max_from_peer: int = MAX_FROM_PEER) -> None:
        self.path = path
        self.max_age = max_age  # seconds; a reload may replace it (one float, read per use)
        self.max_count = max_count
        self.max_bytes = max_bytes
        self.max_from_peer = max_from_peer
        self._lock = threading.Lock()  # guards _db (and the counts read with it); a leaf
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute("PRAGMA secure_delete=ON")  # a forgotten notice leaves no bytes behind
        self._db.executescript(_SCHEMA)

    # -- taking notices in ----------------------------------------------------------------
    def send(self, to: str, ev: Event) -> None:
        """Hold ``ev`` for ``to`` (made here); durable on return. A notice already held for
        ``to`` is not held twice. Raises QueueFull (logged ``notice.queue.full``)."""
        if not self.accept(to, [ev], came_from=None, hops=0):
            raise QueueFull(f"the notice queue is full ({self.max_count} notices or "
                            f"{self.max_bytes} bytes): fact {ev.id[:16]} for {to} not routed")

    def accept(self, to: str, facts: Sequence[Event], *, came_from: str | None, hops: int) -> list[str]:
        """Hold each of ``facts`` for ``to`` in one transaction (durable on return); returns
        the ids held now (new or held already). Facts over the bounds are left out (one
        ``notice.queue.full`` line); so are those over ``max_from_peer`` from one peer."""
        held: list[str] = []
        with self._lock:
            count, size = self._db.execute(
                "SELECT count(*), coalesce(sum(length(fact)), 0) FROM notices").fetchone()
            (theirs,) = self._db.execute("SELECT count(*) FROM notices WHERE came_from = ?",
                                         (came_from,)).fetchone() if came_from else (0,)
            cap = self.max_from_peer if came_from else self.max_count
            rows = []
            for ev in facts:
                line = ev.to_line()
                if self._db.execute("SELECT 1 FROM notices WHERE dest=? AND fact_id=?",
                                    (to, ev.id)).fetchone() or any(r[1] == ev.id for r in rows):
                    held.append(ev.id)
                    continue
                if count + 1 > self.max_count or size + len(line) > self.max_bytes or theirs + 1 > cap:
                    log.warning("notice.queue.full to=%s fact=%s from=%s count=%d bytes=%d from_peer=%d",
                                to, ev.id[:16], came_from or "-", count, size, theirs)
                    break
                count, size, theirs = count + 1, size + len(line), theirs + 1
                rows.append((to, ev.id, line, parse_ts(ev.ts), came_from, hops, 0.0))
                held.append(ev.id)
            if rows:
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.executemany(
                        "INSERT OR IGNORE INTO notices (dest, fact_id, fact, fact_ts, came_from, "
                        "hops, due) VALUES (?, ?, ?, ?, ?, ?, ?)", rows)
        for r in rows:
            log.info("notice.queued to=%s fact=%s from=%s hops=%d", to, r[1][:16], came_from or "-", hops)
        return held

    # -- the pump ---------------------------------------------------------------------------
    def sources(self, now: float) -> list[tuple[str, str | None]]:
        """The (to, came from) pairs that have a notice due at ``now`` (their backoff passed):
        the pump picks a hop per pair, then asks ``due`` for the pairs it can serve.
        Expired notices are dropped first (``notice.expired``)."""
        self.expire(now)
        with self._lock:
            return self._db.execute("SELECT DISTINCT dest, came_from FROM notices WHERE due <= ? "
                                    "ORDER BY dest, came_from", (now,)).fetchall()

    def due(self, now: float, *, source: tuple[str, str | None] | None = None,
            limit: int = 1000) -> list[Notice]:
        """The notices due at ``now`` and not expired, oldest fact first, at most
        ``limit``; only those of ``source`` (to, came from) when given."""
        where, args = "due <= ? AND fact_ts >= ?", [now, now - self.max_age]
        if source is not None:
            where += " AND dest = ? AND came_from IS ?"
            args += list(source)
        with self._lock:
            rows = self._db.execute(
                f"SELECT dest, fact_id, fact, came_from, hops, attempts, due FROM notices WHERE {where} "
                "ORDER BY fact_ts LIMIT ?", (*args, limit)).fetchall()
        out, bad = [], []
        for d, fid, f, c, h, a, t in rows:
            try:
                out.append(Notice(d, parse_event(bytes(f)), c, h, a, t))
            except InvalidEvent as exc:  # a row no longer readable: never let it block the rest
                log.error("notice.unreadable to=%s fact=%s error=%s (dropped)", d, fid[:16], exc)
                bad.append(fid)
        for fid in bad:
            self.done(next(r[0] for r in rows if r[1] == fid), [fid])
        return out

    def next_due(self, after: float) -> float | None:
        """When the next notice that is not due at ``after`` is due (None: none)."""
        with self._lock:
            (t,) = self._db.execute("SELECT min(due) FROM notices WHERE due > ?", (after,)).fetchone()
        return t

    def done(self, to: str, fact_ids: Iterable[str]) -> None:
        """Forget these notices for ``to``: the next hop stored them (durable on return)."""
        ids = [(to, f) for f in fact_ids]
        if not ids:
            return
        with self._lock:
            with self._db:
                self._db.execute("BEGIN IMMEDIATE")
                self._db.executemany("DELETE FROM notices WHERE dest=? AND fact_id=?", ids)
            if self._db.execute("SELECT 1 FROM notices LIMIT 1").fetchone() is None:
                # Empty: fold the write-ahead log into the file and cut it to nothing, so a
                # node that only passed notices on keeps no copy of them (secure_delete
                # zeroed the rows in the file).
                self._db.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def failed(self, to: str, fact_ids: Iterable[str], now: float) -> None:
        """A try of these notices failed: each waits ``backoff(attempts)`` before the next."""
        ids = list(fact_ids)
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            for fid in ids:
                row = self._db.execute("SELECT attempts FROM notices WHERE dest=? AND fact_id=?",
                                       (to, fid)).fetchone()
                if row is not None:
                    n = row[0] + 1
                    self._db.execute("UPDATE notices SET attempts=?, due=? WHERE dest=? AND fact_id=?",
                                     (n, now + backoff(n), to, fid))

    def expire(self, now: float) -> int:
        """Drop the notices whose fact is older than ``max_age`` (``notice.expired``) and
        the arrivals that old; returns how many notices went."""
        cutoff = now - self.max_age
        with self._lock:
            old = self._db.execute("SELECT dest, fact_id, came_from FROM notices WHERE fact_ts < ?",
                                   (cutoff,)).fetchall()
            gone = self._db.execute("SELECT 1 FROM arrived WHERE fact_ts < ? LIMIT 1", (cutoff,)).fetchone()
            if old or gone:  # (no write transaction, and no fsync, when nothing is old)
                with self._db:
                    self._db.execute("BEGIN IMMEDIATE")
                    self._db.execute("DELETE FROM notices WHERE fact_ts < ?", (cutoff,))
                    self._db.execute("DELETE FROM arrived WHERE fact_ts < ?", (cutoff,))
        for dest, fid, came in old:
            log.warning("notice.expired to=%s fact=%s from=%s max_age=%.0fs", dest, fid[:16],
                        came or "-", self.max_age)
        return len(old)

    def too_old(self, ev: Event, now: float) -> bool:
        """True when ``ev`` is older than the age limit (a hop refuses it: ``expired``)."""
        return parse_ts(ev.ts) < now - self.max_age

    # -- at the destination -----------------------------------------------------------------
    def arrived(self, fact_id: str) -> bool:
        """True when this fact was handed over here already (within the age limit)."""
        with self._lock:
            return self._db.execute("SELECT 1 FROM arrived WHERE fact_id=?", (fact_id,)).fetchone() is not None

    def arrive(self, facts: Sequence[Event]) -> None:
        """Remember that these facts were handed over here (durable on return)."""
        with self._lock, self._db:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("INSERT OR IGNORE INTO arrived (fact_id, fact_ts) VALUES (?, ?)",
                                 [(ev.id, parse_ts(ev.ts)) for ev in facts])

    def counts(self) -> dict[str, int]:
        """``{"queued": notices held, "delivered": facts handed over here (within the age limit)}``."""
        with self._lock:
            (q,) = self._db.execute("SELECT count(*) FROM notices").fetchone()
            (d,) = self._db.execute("SELECT count(*) FROM arrived").fetchone()
        return {"queued": q, "delivered": d}

    def close(self) -> None:
        with self._lock:
            self._db.close()


def counts_at(path: Path) -> dict[str, int]:
    """``Notices.counts`` of a queue no agent has open (``status`` of a stopped node): read
    only; zeros when the file does not exist or cannot be read."""
    if not path.exists():
        return {"queued": 0, "delivered": 0}
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            (q,) = db.execute("SELECT count(*) FROM notices").fetchone()
            (d,) = db.execute("SELECT count(*) FROM arrived").fetchone()
    except sqlite3.Error as exc:
        log.debug("notice.counts.unreadable file=%s error=%s", path, exc)
        return {"queued": 0, "delivered": 0}
    return {"queued": q, "delivered": d}


__all__ = ["FACT_TYPES", "FILE_NAME", "MAX_QUEUE", "MAX_QUEUE_BYTES", "Notice", "Notices", "QueueFull", "backoff", "counts_at",
           "next_hop"]
