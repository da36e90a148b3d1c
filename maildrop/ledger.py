"""The ledger: which events this node holds, feed by feed, and whether a new one may join.

An event joins only as the next link of its origin's feed: ``seq == head + 1``, ``prev ==``
the head's id, signed by the feed's current key. The first event of every feed is the
origin's ``node.configured``, self-signed with the key it announces; a later
``node.configured`` with another key is a key change, signed with the old key. A configured
peer's feed must carry the key pinned in our config.

Events that arrive ahead of a gap wait in ``pending`` (memory only, bounded) until the gap
fills. Two different events for one (origin, seq) are a fork: the later one is refused and
the origin is marked in ``conflicts``, which routing never uses.

Pure: no I/O. ``eventlog`` persists what the ledger accepts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .events import NODE_CONFIGURED, Event

MAX_PENDING = 100_000


@dataclass
class Feed:
    origin: str
    events: list[Event] = field(default_factory=list)
    key: str | None = None

    @property
    def head_seq(self) -> int:
        return len(self.events)

    @property
    def head_id(self) -> str | None:
        return self.events[-1].id if self.events else None


@dataclass(frozen=True)
class Offered:
    """What became of one offered event: ``accepted`` lists every event that joined (the
    offered one and any pending ones it unblocked); ``rejected`` is a reason or None."""

    accepted: list[Event]
    rejected: str | None = None
    duplicate: bool = False
    pending: bool = False


class Ledger:
    """All valid events this node holds, by origin, plus pending and conflicts."""

    def __init__(self, pinned: Mapping[str, str] | None = None) -> None:
        self.pinned: dict[str, str] = dict(pinned or {})
        self.feeds: dict[str, Feed] = {}
        self.pending: dict[str, dict[int, Event]] = {}
        self.conflicts: dict[str, str] = {}
        self.count = 0
        self._pending_count = 0

    # -- queries --------------------------------------------------------------------------
    def version_vector(self) -> dict[str, int]:
        """``{origin: highest contiguous seq}`` over every feed held."""
        return {o: f.head_seq for o, f in self.feeds.items() if f.events}

    def heads(self) -> dict[str, tuple[int, str]]:
        return {o: (f.head_seq, f.head_id) for o, f in self.feeds.items() if f.events}  # type: ignore[misc]

    def fingerprint(self) -> str:
        """A short hash of exactly which events are held (seq and head id per origin)."""
        h = hashlib.sha256()
        for origin in sorted(self.feeds):
            f = self.feeds[origin]
            if f.events:
                h.update(f"{origin}:{f.head_seq}:{f.head_id};".encode())
        return h.hexdigest()[:32]

    def key_of(self, origin: str) -> str | None:
        feed = self.feeds.get(origin)
        return feed.key if feed else None

    def since(self, their_vv: Mapping[str, int], limit: int | None = None) -> list[Event]:
        """Events the holder of ``their_vv`` lacks, each feed in seq order, at most ``limit``."""
        out: list[Event] = []
        for origin in sorted(self.feeds):
            have = their_vv.get(origin, 0)
            if not isinstance(have, int) or have < 0:
                have = 0
            feed = self.feeds[origin].events
            for ev in feed[have:]:
                if limit is not None and len(out) >= limit:
                    return out
                out.append(ev)
        return out

    def lacks(self, their_vv: Mapping[str, int]) -> bool:
        return any(f.head_seq > their_vv.get(o, 0) for o, f in self.feeds.items())

    def all_events(self) -> Iterable[Event]:
        for f in self.feeds.values():
            yield from f.events

    # -- joining --------------------------------------------------------------------------
    def offer(self, ev: Event, signed_here: bool = False) -> Offered:
        """Try to add one parsed event; see the module docstring for the rules.

        ``signed_here``: this process just signed ``ev`` with the feed's key, so checking the
        signature again would only burn CPU (the chain is still checked).
        """
        feed = self.feeds.get(ev.origin)
        head = feed.head_seq if feed else 0
        if ev.seq <= head:
            held = feed.events[ev.seq - 1]  # type: ignore[union-attr]
            if held.id == ev.id:
                return Offered([], duplicate=True)
            if ev.verify_signature(self._key_at(ev.origin, ev.seq) or ""):
                self.conflicts[ev.origin] = f"fork at seq {ev.seq}: two signed events"
                return Offered([], rejected=f"fork: {ev.origin} seq {ev.seq} differs from the one held")
            if ev.seq == 1 and ev.type == NODE_CONFIGURED and ev.verify_signature(ev.data["key"]):
                self.conflicts[ev.origin] = "a second feed under this node id (another key)"
                return Offered([], rejected=f"fork: {ev.origin} seq {ev.seq} differs from the one held")
            return Offered([], rejected=f"bad signature for {ev.origin} seq {ev.seq} (forged?)")
        if ev.seq > head + 1:
            return self._hold(ev)
        reason = self._check_next(feed, ev, signed_here)
        if reason:
            return Offered([], rejected=reason)
        accepted = [self._join(ev)]
        accepted.extend(self._drain(ev.origin))
        return Offered(accepted)

    def _key_at(self, origin: str, seq: int) -> str | None:
        """The key that signed ``origin``'s event ``seq`` (for telling forks from forgeries)."""
        feed = self.feeds.get(origin)
        if not feed:
            return None
        key = None
        for e in feed.events[: seq - 1]:
            if e.type == NODE_CONFIGURED:
                key = e.data["key"]
        if seq == 1:
            return feed.events[0].data["key"]
        return key

    def _check_next(self, feed: Feed | None, ev: Event, signed_here: bool = False) -> str | None:
        if ev.seq == 1:
            if ev.type != NODE_CONFIGURED:
                return f"{ev.origin} seq 1 is {ev.type}, expected node.configured"
            key = ev.data["key"]
            pinned = self.pinned.get(ev.origin)
            if pinned is not None and pinned != key:
                self.conflicts.setdefault(ev.origin, "announced key differs from the configured key")
                return f"{ev.origin} announces a key that differs from the configured one"
            if not ev.verify_signature(key):
                return f"bad signature for {ev.origin} seq 1"
            return None
        assert feed is not None
        if ev.prev != feed.head_id:
            self.conflicts[ev.origin] = f"chain break at seq {ev.seq}"
            return f"{ev.origin} seq {ev.seq}: prev does not match the held seq {ev.seq - 1}"
        if not signed_here and not ev.verify_signature(feed.key or ""):
            return f"bad signature for {ev.origin} seq {ev.seq} (forged?)"
        return None

    def _join(self, ev: Event) -> Event:
        feed = self.feeds.get(ev.origin)
        if feed is None:
            feed = self.feeds[ev.origin] = Feed(ev.origin)
        feed.events.append(ev)
        if ev.type == NODE_CONFIGURED:
            feed.key = ev.data["key"]
        self.count += 1
        return ev

    def _hold(self, ev: Event) -> Offered:
        waiting = self.pending.setdefault(ev.origin, {})
        if ev.seq in waiting:
            return Offered([], duplicate=True, pending=True)
        if self._pending_count >= MAX_PENDING:
            return Offered([], rejected="too many events waiting for a gap to fill")
        waiting[ev.seq] = ev
        self._pending_count += 1
        return Offered([], pending=True)

    def _drain(self, origin: str) -> list[Event]:
        out: list[Event] = []
        waiting = self.pending.get(origin)
        while waiting:
            feed = self.feeds[origin]
            nxt = waiting.pop(feed.head_seq + 1, None)
            if nxt is None:
                break
            self._pending_count -= 1
            if self._check_next(feed, nxt) is None:
                out.append(self._join(nxt))
            else:
                break
        if waiting is not None and not waiting:
            self.pending.pop(origin, None)
        return out
