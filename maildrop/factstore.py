"""The fact store: the transfer facts this node holds, bounded by retention (``state/facts.sqlite``).

A transfer fact (``events.TRANSFER_TYPES``) is held only by the transfer's origin, its
destination and the custodians on its path (docs/history.md); it is never gossiped and
never enters the ledger. This store keeps them, indexed by transfer id:

- ``facts``: one row per fact (its canonical line, as signed), keyed by its id, indexed by
  transfer id; ``n`` numbers the rows in the order they came (never reused), so a reader
  can follow what was added since it last looked (``since``).
- ``transfers``: one row per transfer id with its origin, destination, state (the fold of
  its facts, ``model``), queued time and ended time (POSIX seconds of the fact that ended
  it: the receipt or the failure), so ``sweep`` is a few queries over indexes (the rows
  it ends, and the exactly-once memory rows, ``transfers_memory``), never a scan. A row
  whose facts were swept but that was delivered stays as the destination's exactly-once
  memory (``delivered``) until the horizon passes.
- ``counts``: transfers whose facts are held (``swept`` 0), by state, kept up to date by
  ``put`` and ``sweep`` in their transaction, so ``counts()`` (every ``status``) reads a
  handful of rows however many transfers the retention window holds. A file made before
  this table existed is counted once, at its first writable open.

Nothing about finished transfers is kept in memory: every query goes to the file.

Crash behaviour: sqlite in WAL mode with ``synchronous=FULL``; each ``put`` and ``sweep`` is
one transaction, durable when it returns (a sweep's vacuum after it is another; a crash
there leaves free pages, given back at the next sweep). A crash mid-``put`` leaves none of its facts (the
caller, which has not answered or acted yet, does it again); a crash mid-``sweep`` leaves
the rows as they were.

Concurrency: one connection per process; ``_lock`` guards it (a leaf: nothing is taken
while it is held). Several processes may open the file (the agent writes; the CLI reads,
``readonly``): sqlite's own file locks serialize them.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from . import events as E
from .errors import InvalidEvent, MaildropError
from .events import Event, parse_event, parse_ts
from .model import DELIVERED, FAILED, UNKNOWN, fold

FILE = "facts.sqlite"
BUSY_TIMEOUT = 30.0
"""Seconds a statement waits for another process's write lock before it fails."""
SWEEP_BATCH = 5_000
"""Transfers a sweep drops per transaction: a sweep of most of a big store (800,000
transfers in one transaction took minutes and a 2 GiB write-ahead log) holds the write
lock a fraction of a second at a time."""

_SCHEMA = """
CREATE TABLE IF NOT EXISTS facts (
    n INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    tid TEXT NOT NULL,
    ts TEXT NOT NULL,
    line BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS facts_tid ON facts (tid, ts);
CREATE TABLE IF NOT EXISTS transfers (
    tid TEXT PRIMARY KEY,
    origin TEXT,
    destination TEXT,
    state TEXT NOT NULL,
    queued_ts REAL,
    ended_ts REAL,
    swept INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS transfers_ended ON transfers (ended_ts);
CREATE INDEX IF NOT EXISTS transfers_queued ON transfers (queued_ts);
CREATE INDEX IF NOT EXISTS transfers_memory ON transfers (queued_ts) WHERE swept = 1;
CREATE TABLE IF NOT EXISTS counts (
    state TEXT PRIMARY KEY,
    n INTEGER NOT NULL
);
"""
_COUNT_ALL = "SELECT state, count(*) FROM transfers WHERE swept = 0 GROUP BY state"


class FactStore:
    """The transfer facts of one node (see the module docstring). ``readonly`` opens an
    existing file for reading only (a missing one reads as empty)."""

    def __init__(self, path: Path, readonly: bool = False) -> None:
        self.path = path
        self.readonly = readonly
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        try:
            if readonly:
                if not path.exists():
                    return
                self._db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=BUSY_TIMEOUT,
                                           check_same_thread=False, isolation_level=None)
            else:
                path.parent.mkdir(parents=True, exist_ok=True)
                self._db = sqlite3.connect(path, timeout=BUSY_TIMEOUT, check_same_thread=False,
                                           isolation_level=None)
                self._db.execute("PRAGMA auto_vacuum=INCREMENTAL")  # takes effect in a new file only
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA synchronous=FULL")
                self._create()
        except sqlite3.Error as exc:
            raise MaildropError(f"{path}: cannot open the fact store: {exc}") from None

    def _create(self) -> None:
        """The schema, in one transaction; a ``counts`` table new to an existing file is
        filled from one scan of ``transfers``."""
        assert self._db is not None
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            had = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'counts'").fetchone()
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    db.execute(statement)
            if not had:
                db.execute("INSERT INTO counts (state, n) " + _COUNT_ALL)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    # -- writing ----------------------------------------------------------------------------
    def put(self, events: Sequence[Event]) -> list[Event]:
        """Keep these facts (duplicates are ignored) and update their transfers' rows, in
        one transaction, durable on return. Returns the facts that were new."""
        if self._db is None or self.readonly:
            raise MaildropError(f"{self.path}: the fact store is open read-only")
        new: list[Event] = []
        with self._lock:
            db = self._db
            db.execute("BEGIN IMMEDIATE")
            try:
                for ev in events:
                    cur = db.execute("INSERT OR IGNORE INTO facts (id, tid, ts, line) VALUES (?, ?, ?, ?)",
                                     (ev.id, ev.data["transfer"], ev.ts, ev.to_line()))
                    if cur.rowcount:
                        new.append(ev)
                for tid in dict.fromkeys(ev.data["transfer"] for ev in new):
                    self._update_row(tid)
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
        return new

    def _update_row(self, tid: str) -> None:
        """Fold ``tid``'s facts into its ``transfers`` row (caller holds the transaction)."""
        assert self._db is not None
        facts = self._facts(tid)
        net = fold(facts)
        claims = net.claims.get(tid, {})
        row = self._db.execute("SELECT origin, state, swept FROM transfers WHERE tid = ?", (tid,)).fetchone()
        origin = row[0] if row and row[0] in claims else min(claims, default=None)
        claim = claims.get(origin) if origin else None
        state = claim.state if claim else UNKNOWN
        ended = None
        if claim is not None and state in (DELIVERED, FAILED):
            enders = [f for f in facts if (state == DELIVERED and f.type == E.TRANSFER_DELIVERED
                                           and f.origin == claim.destination)
                      or (state == FAILED and f.type == E.TRANSFER_FAILED and f.origin == origin)]
            ended = min(parse_ts(f.ts) for f in enders) if enders else None
        queued = parse_ts(claim.queued_ts) if claim and claim.queued_ts else None
        self._db.execute(
            "INSERT INTO transfers (tid, origin, destination, state, queued_ts, ended_ts, swept) "
            "VALUES (?, ?, ?, ?, ?, ?, 0) ON CONFLICT (tid) DO UPDATE SET origin = excluded.origin, "
            "destination = excluded.destination, state = excluded.state, "
            "queued_ts = excluded.queued_ts, ended_ts = excluded.ended_ts, swept = 0",
            (tid, origin, claim.destination if claim else None, state, queued, ended))
        if row is not None and not row[2]:
            self._count(row[1], -1)
        self._count(state, 1)

    def _count(self, state: str, n: int) -> None:
        """Add ``n`` to the count of ``state`` (caller holds the transaction)."""
        assert self._db is not None
        self._db.execute("INSERT INTO counts (state, n) VALUES (?, ?) "
                         "ON CONFLICT (state) DO UPDATE SET n = n + excluded.n", (state, n))

    def sweep(self, now: float, keep: float, horizon: float | None = None,
              until: Callable[[], bool] | None = None) -> int:
        """Retention: drop the facts of transfers that ended more than ``keep`` seconds ago,
        and of transfers queued more than ``max(keep, horizon)`` ago that never ended here
        (a middle relay never hears the receipt; by then no copy is anywhere). A delivered
        transfer's row stays, without its facts, as the exactly-once memory until its
        queued time is ``horizon`` seconds old (``None``: ``keep``). In transactions of at
        most ``SWEEP_BATCH`` transfers, the lock released between them (other writers go
        on; a crash leaves the batches done, the next sweep does the rest); after each the
        free pages are given back to the file system (``incremental_vacuum``, its own
        transaction: a file made with ``auto_vacuum`` shrinks to what the window holds; an
        older file keeps its free pages for reuse). ``until``: asked between batches; True
        ends the sweep there (the agent stops; the next sweep does the rest). Returns how
        many transfers' facts were dropped."""
        if self._db is None or self.readonly:
            return 0
        horizon = keep if horizon is None else horizon
        total = 0
        while True:
            n = self._sweep_batch(now - keep, now - max(keep, horizon), now - horizon)
            total += n
            if n < SWEEP_BATCH or (until is not None and until()):
                return total

    def _sweep_batch(self, ended_before: float, open_before: float, memory_before: float) -> int:
        """One transaction of ``sweep``: at most ``SWEEP_BATCH`` transfers."""
        with self._lock:
            db = self._db
            assert db is not None
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute("CREATE TEMP TABLE IF NOT EXISTS gone (tid TEXT PRIMARY KEY)")
                db.execute("DELETE FROM gone")
                db.execute(
                    "INSERT INTO gone SELECT tid FROM transfers WHERE swept = 0 AND "
                    "((ended_ts IS NOT NULL AND ended_ts < ?) OR "
                    "(ended_ts IS NULL AND (queued_ts IS NULL OR queued_ts < ?))) LIMIT ?",
                    (ended_before, open_before, SWEEP_BATCH))
                n = 0
                for state, m in db.execute("SELECT t.state, count(*) FROM gone g JOIN transfers t "
                                           "ON t.tid = g.tid GROUP BY t.state").fetchall():
                    self._count(state, -m)
                    n += m
                db.execute("DELETE FROM facts WHERE tid IN (SELECT tid FROM gone)")
                db.execute("UPDATE transfers SET swept = 1 WHERE tid IN (SELECT tid FROM gone)")
                db.execute("DELETE FROM transfers WHERE swept = 1 AND "
                           "(state != ? OR queued_ts IS NULL OR queued_ts < ?)",
                           (DELIVERED, memory_before))
                db.execute("COMMIT")
            except BaseException:
                db.execute("ROLLBACK")
                raise
            if db.execute("PRAGMA freelist_count").fetchone()[0]:
                db.executescript("PRAGMA incremental_vacuum;")  # execute() frees one page a call
        return n

    # -- reading ----------------------------------------------------------------------------
    def _query(self, sql: str, args: Iterable[object] = ()) -> list[tuple]:
        if self._db is None:
            return []
        with self._lock:
            return self._db.execute(sql, tuple(args)).fetchall()

    def _facts(self, tid: str) -> list[Event]:
        assert self._db is not None
        rows = self._db.execute("SELECT line FROM facts WHERE tid = ? ORDER BY ts, n", (tid,)).fetchall()
        return _parsed(r[0] for r in rows)

    def facts_of(self, tid: str) -> list[Event]:
        """Every fact held about ``tid`` (any origin), by ts."""
        return _parsed(r[0] for r in self._query("SELECT line FROM facts WHERE tid = ? ORDER BY ts, n",
                                                 (tid,)))

    def holds(self, tid: str) -> bool:
        """True when this node holds any fact of ``tid`` (or its exactly-once memory): it
        has a part in that transfer."""
        return bool(self._query("SELECT 1 FROM transfers WHERE tid = ?", (tid,)))

    def state_of(self, tid: str) -> str | None:
        """The state of ``tid`` as its facts say (None: nothing held)."""
        rows = self._query("SELECT state FROM transfers WHERE tid = ?", (tid,))
        return rows[0][0] if rows else None

    def delivered(self, tid: str) -> bool:
        """The exactly-once memory: True when the receipt of ``tid`` is known here (kept
        after its facts are swept, until the horizon)."""
        return bool(self._query("SELECT 1 FROM transfers WHERE tid = ? AND state = ?", (tid, DELIVERED)))

    def open_facts(self, recent: int = 0) -> list[Event]:
        """The facts of every transfer not ended here, and of the ``recent`` most recently
        ended (what the model needs at start): one indexed query, never the whole store."""
        return _parsed(r[0] for r in self._query(
            "SELECT f.line FROM transfers t JOIN facts f ON f.tid = t.tid "
            "WHERE t.swept = 0 AND (t.ended_ts IS NULL OR t.tid IN (SELECT tid FROM transfers "
            "WHERE ended_ts IS NOT NULL AND swept = 0 ORDER BY ended_ts DESC LIMIT ?)) ORDER BY f.n",
            (recent,)))

    def has_fact(self, event_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM facts WHERE id = ?", (event_id,)))

    def since(self, n: int) -> tuple[list[Event], int]:
        """The facts added after row ``n`` and the last row number (``n`` when none)."""
        rows = self._query("SELECT n, line FROM facts WHERE n > ? ORDER BY n", (n,))
        return _parsed(r[1] for r in rows), (rows[-1][0] if rows else n)

    def last_row(self) -> int:
        rows = self._query("SELECT max(n) FROM facts")
        return rows[0][0] or 0 if rows else 0

    def all_facts(self) -> list[Event]:
        """Every fact held (retention bounds them: ``sweep``), in the order they came
        (``status --at`` folds them)."""
        return _parsed(r[0] for r in self._query("SELECT line FROM facts ORDER BY n", ()))

    def counts(self) -> dict[str, int]:
        """Transfers by state (those whose facts are held): the ``counts`` table, or one scan
        of ``transfers`` in a file no writer has opened since that table came."""
        try:
            return dict(self._query("SELECT state, n FROM counts WHERE n > 0"))
        except sqlite3.OperationalError:
            return dict(self._query(_COUNT_ALL))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def _parsed(lines: Iterable[bytes]) -> list[Event]:
    """Events from the store's own lines (a damaged one is skipped: it cannot be trusted)."""
    out = []
    for line in lines:
        try:
            out.append(parse_event(bytes(line)))
        except InvalidEvent:
            continue
    return out
