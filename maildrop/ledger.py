"""The ledger: which events this node holds, feed by feed, and whether a new one may join.

Chain rules (every event, from a peer or from the local file):

- An event joins only as the next link of its origin's feed: ``seq == head + 1``,
  ``prev ==`` the head's id, signed by the feed's current key. The first event of every
  feed is the origin's ``node.configured``, self-signed with the key it announces; a later
  ``node.configured`` with another key is a key change, signed with the old key.
- A configured (pinned) peer's feed must pass through the key pinned in our config: it
  starts with that key, or it starts with another one and rotates to the pinned key (the
  pin was updated after a ``maildrop rotate-key``). A seq 1 with another key waits in
  ``pending`` (marking nothing: anyone can mint one) until the rotation to the pinned key
  waits behind it, then that whole verified chain joins. ``me`` may be pinned the same way
  (the agent pins its own current key), so this node takes its own feed back from peers
  after losing its log (``receive``), and never a feed that does not lead to its key.
- The signature is checked before anything about the event is believed. A forged event
  changes no state at all: a bad ``prev`` on an event that is not validly signed is just
  a forgery.
- A *conflict* is proof, never a claim: two events validly signed under the feed's key
  that cannot both be in one chain (two events for one seq, or an event for ``head + 1``
  whose ``prev`` is not the held head). The origin is marked in ``conflicts`` (routing
  never uses it) and both events are kept in ``evidence``. This node's own id is never
  marked from outside (``me``): a fork of its own feed is refused and noted. Its own events
  that it lacks (the log was lost or restored from an older backup) join from a peer like
  any other: next link, signed by the feed's key; an unheld own feed only when ``me`` is
  pinned (see above).
- A *rival* is a second self-signed seq-1 ``node.configured`` under another key for an id
  whose feed is held: the first feed is kept, the rival is noted once and not kept.

Events from a peer (``receive``, with the receive time ``now``) also obey:

- Admission. A feed joins only when its origin is this node, a pinned peer, or a node
  *introduced by a link both ends signed*: some admitted node N (a node whose feed is
  held) says, as its latest word, ``link.configured {peer: X}``, and X's own chain,
  already verified under X's key, says ``link.configured {peer: N}``. Until then X's
  events wait in ``pending``. Refused outright: an id that differs only by letter case
  from a known one (case-insensitive filesystems), any new id beyond ``MAX_NODES`` feeds,
  more than ``MAX_CANDIDATES`` unknown ids waiting at once.
- Trust in distant keys (issue 9, F12): a distant node's key is trusted on first
  admission. When several self-signed feeds for one unpinned id wait at once, the one
  vouched for by the most admitted nodes (links signed by both ends, as above) wins, ties
  going to the one that came first; a feed once held is never replaced (the log is
  append-only), later rivals are only noted. So an attacker can substitute a key only for
  an id it introduces with a link it signs itself (evidence in its own feed), and only when
  its feed is admitted before the real one. Pin the keys that matter (``peers``).
- Budget of *network* events (``node.configured``, ``link.*`` with ``link.health``) per origin: at most
  ``NET_MAX_EVENTS`` held, and a token bucket on receive time (``NET_BURST`` at once,
  ``NET_RATE`` a second after). This node's feed and pinned peers are exempt. An event over
  budget is refused (it is asked for again later), marks nothing, and one note says so.
- Pending: events ahead of a gap are held (memory only) only when their signature verifies
  under a key known now, at most ``MAX_PENDING_PER_ORIGIN`` per origin and
  ``MAX_PENDING`` in all, and for at most ``PENDING_MAX_AGE`` seconds (``expire``).

Checkpoints (``feed.checkpoint``, see ``checkpoint``): a feed may start at a checkpoint
(``Feed.base``: the seqs 1..base it covers are not held; ``base`` is the checkpoint's seq
minus one). An accepted checkpoint drops from memory the events the checkpoint *before it*
covers, so a feed holds its two latest checkpoints and what lies between and after them
(queued in ``dropped`` with ``collect_dropped``, for the caller that compacts its file); the budget counts
that live feed. Keeping one window more than needed is what lets every holder that kept up
check each checkpoint against its whole prefix: when checkpoint N arrives right behind the
events before it, a peer that lacks a few of them still gets them (``since`` serves the
window from checkpoint N-1 on), instead of having to jump over them unchecked.

- A holder of the whole prefix (from seq 1 or from an earlier checkpoint) folds it and
  compares (``checkpoint.check``): a checkpoint that misstates it is a conflict like a
  fork, the origin marked, the checkpoint and the prefix event it contradicts kept as
  evidence. A holder whose head is short of the checkpoint's ``upto`` checks what it
  holds, then jumps to the checkpoint (it never sees the events in between); the key it
  holds must be the key the checkpoint names (a key change hidden in the gap cannot be
  verified: refused, and the feed waits for a later checkpoint or a peer with the events).
- A newcomer admits a feed that starts at a checkpoint as it admits one that starts at
  seq 1: the checkpoint is signed with the key its state names; a pinned origin's state
  must name the pinned key; an unpinned one needs a link both ends signed, the origin's
  side read from the links the checkpoint states. What it trusts is the origin's
  signature and its introducers, as for seq 1; the covered prefix it never sees.
- ``since`` gives a peer whose vector is below ``base`` the checkpoint and what follows.
- An event of a covered seq (``seq <= base``) is taken as held: nothing about it can be
  checked any more, and it changes nothing.

Local events (``offer``: the log file, this node's own appends) obey the chain rules and
the pinned key (a feed that starts with another key waits for its rotation to the pin) only;
the file holds nothing a peer could add without passing ``receive``. A pinned feed whose
rotation to the pinned key lies more than ``MAX_PENDING_PER_ORIGIN`` events deep cannot
join from a peer (it never waits whole): pin the key the feed starts with, then update it.

Pure: no I/O, no clock (``now`` is passed in). The log lines the ledger wants written are
queued in ``notes`` (each at most once an hour per subject); the caller drains and logs them.
Signatures are checked through a ``Verify`` callable so the caller can check a batch before
taking its lock. ``eventlog`` persists what the ledger accepts.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from . import checkpoint
from .events import (
    FEED_CHECKPOINT,
    LINK_CONFIGURED,
    LINK_DOWN,
    LINK_HEALTH,
    LINK_REMOVED,
    LINK_UP,
    NODE_CONFIGURED,
    Event,
)

MAX_PENDING = 10_000
"""Events held ahead of a gap, all origins together (each at most 16 KiB; a checkpoint, at most
64 KiB, waits only to start an unheld feed, and at most ``MAX_VARIANTS`` of them per origin)."""
MAX_PENDING_PER_ORIGIN = 2_000
"""Events held ahead of a gap for one origin; gossip asks again for the rest."""
MAX_VARIANTS = 2
"""Different events held for one (origin, seq) while they wait (rival feeds, forks)."""
PENDING_MAX_AGE = 600.0
"""Seconds a pending event may wait for its gap to fill before it is dropped."""
MAX_NODES = 2_000
"""Feeds (node ids) held at most; pinned peers and this node are always admitted."""
MAX_CANDIDATES = 256
"""Unknown, not yet admitted node ids whose events may wait at once."""
NETWORK_TYPES = frozenset({NODE_CONFIGURED, LINK_CONFIGURED, LINK_REMOVED, LINK_UP, LINK_DOWN, LINK_HEALTH,
                           FEED_CHECKPOINT})
NET_MAX_EVENTS = 20_000
"""Network events held at most per (unpinned, distant) origin, in its live feed (from the
checkpoint it starts at on)."""
NET_BURST = 1_000
"""Network events a distant origin may add at once (token bucket size)."""
NET_RATE = 0.1
"""Network events a second a distant origin may add after its burst (one per 10 s)."""
NOTE_AGAIN_AFTER = 3600.0
"""Seconds before the same note (subject) is queued again."""

Verify = Callable[[Event, str], bool]
"""``verify(event, public_key_line) -> bool``: is ``event`` signed by that key?"""


def verify_now(ev: Event, key: str) -> bool:
    """The plain check: compute the signature check here and now."""
    return ev.verify_signature(key)


@dataclass
class Feed:
    """One origin's held events: seqs ``base + 1`` .. ``head_seq`` (``base`` > 0: the feed
    starts at a checkpoint, which is ``events[0]``); ``key``: the key of its next event."""

    origin: str
    events: list[Event] = field(default_factory=list)
    key: str | None = None
    base: int = 0

    @property
    def head_seq(self) -> int:
        return self.base + len(self.events)

    def at(self, seq: int) -> Event:
        """The held event ``seq`` (``base < seq <= head_seq``)."""
        return self.events[seq - self.base - 1]

    @property
    def head_id(self) -> str | None:
        return self.events[-1].id if self.events else None


@dataclass(frozen=True)
class Offered:
    """What became of one offered event: ``accepted`` lists every event that joined (the
    offered one and any pending ones it unblocked or admitted); ``rejected`` is a reason or
    None."""

    accepted: list[Event]
    rejected: str | None = None
    duplicate: bool = False
    pending: bool = False


@dataclass
class _Waiting:
    ev: Event
    at: float  # receive time; inf for local events (never expire)
    order: int  # arrival order, for ties


class Ledger:
    """All valid events this node holds, by origin, plus pending, conflicts and notes."""

    def __init__(self, pinned: Mapping[str, str] | None = None, me: str | None = None,
                 collect_dropped: bool = False) -> None:
        """``collect_dropped``: queue the events checkpoints cover in ``dropped`` for the
        caller to drain (``take_dropped``; the event log does, to compact its file)."""
        self.pinned: dict[str, str] = dict(pinned or {})
        self.me = me
        self.feeds: dict[str, Feed] = {}
        self.pending: dict[str, dict[int, list[_Waiting]]] = {}
        self.conflicts: dict[str, str] = {}
        self.evidence: dict[str, tuple[Event, Event]] = {}
        self.notes: list[str] = []
        self.count = 0
        self._pending_count = 0
        self._pending_of: dict[str, int] = {}
        self._order = 0
        self._links: dict[str, dict[str, bool]] = {}  # origin -> peer -> latest word "configured"
        self._net_count: dict[str, int] = {}
        self._buckets: dict[str, tuple[float, float]] = {}  # origin -> (tokens, at)
        self._folded: dict[str, str] = {}  # casefolded id -> held id
        self._noted: dict[str, float] = {}
        self._anchored: set[str] = set()  # unheld pinned origins with a rotation to the pin waiting
        self.collect_dropped = collect_dropped
        self._waiting_checkpoints: dict[str, set[int]] = {}  # origin -> seqs where one may wait
        self.dropped: list[Event] = []  # held events a checkpoint covered since the last take_dropped

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

    def holds(self, ev: Event) -> bool:
        """True when this very event is held already (a duplicate: nothing to check)."""
        feed = self.feeds.get(ev.origin)
        if feed is None or not 0 < ev.seq <= feed.head_seq:
            return False
        return ev.seq <= feed.base or feed.at(ev.seq).id == ev.id

    def key_of(self, origin: str) -> str | None:
        feed = self.feeds.get(origin)
        return feed.key if feed else None

    def known_keys(self, origin: str) -> list[str]:
        """Keys an event of ``origin`` could be signed with now: the held feed's key, else
        the pinned key and the keys of waiting seq-1 events (for checking a batch early)."""
        feed = self.feeds.get(origin)
        if feed is not None:
            return [feed.key] if feed.key else []
        keys = [self.pinned[origin]] if origin in self.pinned else []
        keys += [checkpoint.start_key(w.ev) for w in self._starts(origin)]
        return keys

    def since(self, their_vv: Mapping[str, int], limit: int | None = None) -> list[Event]:
        """Events the holder of ``their_vv`` lacks, each feed in seq order, at most ``limit``.

        Under a limit every lacking feed gets a fair share (then the leftover), so one feed
        that the other side keeps refusing cannot starve the rest. A feed that starts at a
        checkpoint is given from the checkpoint on to a holder below its ``base``."""
        lacking: list[tuple[list[Event], int]] = []
        for origin in sorted(self.feeds):
            have = their_vv.get(origin, 0)
            if not isinstance(have, int) or have < 0:
                have = 0
            feed = self.feeds[origin]
            if feed.head_seq > have:
                lacking.append((feed.events, max(0, have - feed.base)))
        give = [len(evs) - have for evs, have in lacking]
        if limit is not None:
            give = _fair_shares(give, limit)
        out: list[Event] = []
        for (events, have), n in zip(lacking, give, strict=True):
            out.extend(events[have : have + n])
        return out

    def lacks(self, their_vv: Mapping[str, int]) -> bool:
        return any(f.head_seq > their_vv.get(o, 0) for o, f in self.feeds.items())

    def all_events(self) -> Iterable[Event]:
        for f in self.feeds.values():
            yield from f.events

    def take_notes(self) -> list[str]:
        """The notes queued since the last call (the caller logs them)."""
        out, self.notes = self.notes, []
        return out

    def take_dropped(self) -> list[Event]:
        """The held events checkpoints covered since the last call, and the covered events
        the log file offered again (the caller compacts the file)."""
        out, self.dropped = self.dropped, []
        return out

    # -- joining --------------------------------------------------------------------------
    def offer(self, ev: Event, signed_here: bool = False, verify: Verify = verify_now) -> Offered:
        """Add one local event (the log file, this node's appends): chain rules only.

        ``signed_here``: this process just signed ``ev`` with the feed's key, so checking the
        signature again would only burn CPU (the chain is still checked).
        """
        return self._offer(ev, None, verify, signed_here)

    def receive(self, ev: Event, now: float, verify: Verify = verify_now) -> Offered:
        """Add one event from a peer at receive time ``now``: every rule of the module."""
        return self._offer(ev, now, verify, False)

    def expire(self, now: float) -> int:
        """Drop pending events older than ``PENDING_MAX_AGE``; returns how many."""
        cutoff = now - PENDING_MAX_AGE
        dropped = 0
        for origin, waiting in list(self.pending.items()):
            for seq, variants in list(waiting.items()):
                keep = [w for w in variants if w.at >= cutoff]
                if len(keep) < len(variants):
                    dropped += len(variants) - len(keep)
                    self._forget(origin, seq, len(variants) - len(keep))
                    if keep:
                        self.pending.setdefault(origin, {})[seq] = keep
        if dropped:
            self._note("expire", now, f"ledger.pending.expired count={dropped} "
                       f"(waited over {PENDING_MAX_AGE:.0f}s for a gap to fill)")
        return dropped

    def _offer(self, ev: Event, now: float | None, verify: Verify, signed_here: bool) -> Offered:
        feed = self.feeds.get(ev.origin)
        head = feed.head_seq if feed else 0
        if feed is not None and ev.seq <= head:
            return self._older(feed, ev, now, verify)
        if feed is None and now is not None:
            return self._unheld(ev, now, verify)
        if ev.type == FEED_CHECKPOINT and ev.seq > head + 1:
            return self._jump(feed, ev, now, verify, signed_here)
        if ev.seq > head + 1 or self._before_pin(ev):
            return self._hold_pinned(ev, now, verify)
        reason = self._check_next(feed, ev, now, verify, signed_here)
        if reason is None and now is not None:
            reason = self._spend(ev, now)
        if reason:
            return Offered([], rejected=reason)
        accepted = [self._join(ev)]
        accepted += self._drain(ev.origin, now, verify)
        if now is not None:
            accepted += self._admit_from(accepted, now, verify)
        return Offered(accepted)

    def _older(self, feed: Feed, ev: Event, now: float | None, verify: Verify) -> Offered:
        if ev.seq <= feed.base:  # covered by the checkpoint the feed starts at
            if now is None and self.collect_dropped:
                self.dropped.append(ev)
            return Offered([], duplicate=True)
        held = feed.at(ev.seq)
        if held.id == ev.id:
            return Offered([], duplicate=True)
        if verify(ev, self._key_at(feed, ev.seq)):
            return Offered([], rejected=self._fork(held, ev, now))
        if ev.seq == 1 and ev.type == NODE_CONFIGURED and verify(ev, ev.data["key"]):
            self._note(f"rival:{ev.origin}:{ev.data['key']}", now,
                       f"ledger.rival origin={ev.origin} (a second feed under this id with "
                       "another key; the first one is kept)")
            return Offered([], rejected=f"{ev.origin}: a second feed under this id (another key); "
                                        "the first one is kept")
        return Offered([], rejected=f"bad signature for {ev.origin} seq {ev.seq} (forged?)")

    def _fork(self, held: Event, ev: Event, now: float | None) -> str:
        """Two validly signed events that cannot share one chain: mark the origin (never
        ourselves) and keep both as evidence. Returns the rejection reason."""
        if ev.origin == self.me:
            self._note(f"own-fork:{ev.seq}", now, f"ledger.fork.own origin={ev.origin} seq={ev.seq} "
                       "(another event signed with this node's key; refused, this node never "
                       "marks itself)")
        else:
            self.conflicts.setdefault(ev.origin, f"fork at seq {ev.seq}: two signed events")
            self.evidence.setdefault(ev.origin, (held, ev))
        return f"fork: {ev.origin} seq {ev.seq} differs from the one held"

    @staticmethod
    def _key_at(feed: Feed, seq: int) -> str:
        """The key that signs ``feed``'s event ``seq`` (for telling forks from forgeries)."""
        key = checkpoint.start_key(feed.events[0])
        for e in feed.events[: seq - feed.base - 1]:
            if e.type == NODE_CONFIGURED:
                key = e.data["key"]
        return key

    def _check_next(self, feed: Feed | None, ev: Event, now: float | None, verify: Verify,
                    signed_here: bool) -> str | None:
        if ev.seq == 1:
            if ev.type != NODE_CONFIGURED:
                return f"{ev.origin} seq 1 is {ev.type}, expected node.configured"
            key = ev.data["key"]
            if not signed_here and not verify(ev, key):
                return f"bad signature for {ev.origin} seq 1"
            return None
        assert feed is not None
        if not signed_here and not verify(ev, feed.key or ""):
            return f"bad signature for {ev.origin} seq {ev.seq} (forged?)"
        if ev.prev != feed.head_id:
            return self._fork(feed.events[-1], ev, now)
        if ev.type == FEED_CHECKPOINT:
            return self._check_checkpoint(feed, ev, now)
        return None

    def _check_checkpoint(self, feed: Feed, ev: Event, now: float | None) -> str | None:
        """Fold what ``feed`` holds before ``ev`` and compare; a lie is a conflict."""
        why = checkpoint.check(ev, feed.events)
        if why is None:
            return None
        if ev.origin == self.me:
            self._note(f"own-lie:{ev.seq}", now, f"ledger.checkpoint.own_mismatch origin={ev.origin} "
                       f"seq={ev.seq} ({why}; refused, this node never marks itself)")
        else:
            self.conflicts.setdefault(ev.origin, f"lying checkpoint: {why}")
            self.evidence.setdefault(ev.origin, (checkpoint.witness(ev, feed.events), ev))
            self._note(f"lie:{ev.origin}", now, f"ledger.checkpoint.mismatch origin={ev.origin} "
                       f"seq={ev.seq} ({why})")
        return f"{ev.origin}: {why}"

    def _jump(self, feed: Feed | None, ev: Event, now: float | None, verify: Verify,
              signed_here: bool) -> Offered:
        """A checkpoint past the head of a held feed (or, from the log file, of an unheld
        one): check what is held of its prefix, then start the feed at it."""
        o = ev.origin
        key = checkpoint.start_key(ev)
        if feed is None:  # the log file: a compacted feed
            pin = self.pinned.get(o)
            if pin is not None and key != pin:
                return self._hold_pinned(ev, now, verify)
        elif key != feed.key and self.pinned.get(o) != key:
            self._note(f"jump-key:{o}", now, f"ledger.checkpoint.key_gap origin={o} seq={ev.seq} "
                       "(its key changed in events this node lacks; waits for them or a later checkpoint)")
            return Offered([], rejected=f"{o}: checkpoint at seq {ev.seq} names another key than "
                                        "the one held, and the change is in events not held here")
        if not signed_here and not verify(ev, key):
            return Offered([], rejected=f"bad signature for {o} seq {ev.seq} (forged?)")
        if feed is not None:
            why = self._check_checkpoint(feed, ev, now)
            if why:
                return Offered([], rejected=why)
        if now is not None:
            why = self._spend(ev, now)
            if why:
                return Offered([], rejected=why)
        accepted = [self._join(ev)]
        accepted += self._drain(o, now, verify)
        if now is not None:
            accepted += self._admit_from(accepted, now, verify)
        return Offered(accepted)

    def _spend(self, ev: Event, now: float) -> str | None:
        """Charge ``ev`` to its origin's budget of network events; a reason if over it."""
        o = ev.origin
        if ev.type not in NETWORK_TYPES or o == self.me or o in self.pinned:
            return None
        if self._net_count.get(o, 0) >= NET_MAX_EVENTS:
            self._note(f"budget:{o}", now, f"ledger.budget.refused origin={o} kind=count "
                       f"limit={NET_MAX_EVENTS} (its network events wait; nothing marked)")
            return f"{o} is over its budget of {NET_MAX_EVENTS} network events"
        tokens, at = self._buckets.get(o, (float(NET_BURST), now))
        tokens = min(float(NET_BURST), tokens + max(0.0, now - at) * NET_RATE)
        if tokens < 1.0:
            self._buckets[o] = (tokens, now)
            self._note(f"budget:{o}", now, f"ledger.budget.refused origin={o} kind=rate "
                       f"burst={NET_BURST} rate={NET_RATE}/s (its network events wait; nothing marked)")
            return f"{o} is over its rate of network events"
        self._buckets[o] = (tokens - 1.0, now)
        return None

    def _join(self, ev: Event) -> Event:
        feed = self.feeds.get(ev.origin)
        if feed is None:
            feed = self.feeds[ev.origin] = Feed(ev.origin, base=ev.seq - 1)
            self._folded.setdefault(ev.origin.casefold(), ev.origin)
        if ev.type == FEED_CHECKPOINT:
            self._drop_covered(feed, ev)
        feed.events.append(ev)
        if ev.type == NODE_CONFIGURED:
            feed.key = ev.data["key"]
        if ev.type in (LINK_CONFIGURED, LINK_REMOVED):
            self._links.setdefault(ev.origin, {})[ev.data["peer"]] = ev.type == LINK_CONFIGURED
        if ev.type in NETWORK_TYPES:
            self._net_count[ev.origin] = self._net_count.get(ev.origin, 0) + 1
        self.count += 1
        return ev

    def _drop_covered(self, feed: Feed, ev: Event) -> None:
        """Before the checkpoint ``ev`` joins ``feed``: the events before the feed's latest
        checkpoint leave memory (queued in ``dropped``; all held ones when ``ev`` lies past
        the head: a jump), and its key and links are what its state says."""
        if ev.seq == feed.head_seq + 1:
            cut = next((i for i in range(len(feed.events) - 1, -1, -1)
                        if feed.events[i].type == FEED_CHECKPOINT), 0)
        else:
            cut = len(feed.events)
        covered, feed.events = feed.events[:cut], feed.events[cut:]
        feed.base = (feed.events[0].seq if feed.events else ev.seq) - 1
        state = ev.data["state"]
        feed.key = state["node"]["key"]
        self._links[ev.origin] = checkpoint.links_of(state)
        self._net_count[ev.origin] = sum(1 for e in feed.events if e.type in NETWORK_TYPES)
        self.count -= len(covered)
        if self.collect_dropped:
            self.dropped.extend(covered)

    # -- waiting --------------------------------------------------------------------------
    def _before_pin(self, ev: Event) -> bool:
        """A seq 1 of an unheld pinned origin under another key than the pinned one."""
        pin = self.pinned.get(ev.origin)
        return (ev.seq == 1 and pin is not None and ev.origin not in self.feeds
                and ev.type == NODE_CONFIGURED and ev.data["key"] != pin)

    def _hold_pinned(self, ev: Event, now: float | None, verify: Verify) -> Offered:
        """``_hold``; for an unheld pinned origin, then join the chain that rotates from
        another first key to the pinned one, once it waits whole."""
        o = ev.origin
        if self._before_pin(ev):
            self._note(f"pinned:{o}:{ev.data['key']}", now, f"ledger.pinned.waiting origin={o} "
                       "(a feed that starts with another key than the configured one waits "
                       "until it rotates to the configured key)")
        held = self._hold(ev, now, verify)
        pin = self.pinned.get(o)
        if held.rejected or held.duplicate or pin is None or o in self.feeds:
            return held
        if ev.type == NODE_CONFIGURED and ev.data["key"] == pin:
            self._anchored.add(o)
        if o not in self._anchored:
            return held
        accepted = self._join_rotated(o, pin, now, verify)
        if not accepted:
            return held
        if now is not None:
            accepted += self._admit_from(accepted, now, verify)
        return Offered(accepted)

    def _join_rotated(self, o: str, pin: str, now: float | None, verify: Verify) -> list[Event]:
        """Join ``o``'s waiting verified chain that rotates to ``pin``, if one waits whole."""
        for w in sorted(self.pending.get(o, {}).get(1, []), key=lambda w: w.order):
            chain = self._chain(w.ev, verify)
            at = next((e.seq for e in chain if e.type == NODE_CONFIGURED and e.data["key"] == pin), None)
            if at is None:
                continue
            self._anchored.discard(o)
            out = []
            for ev in chain:
                self._take(o, ev.seq)
                out.append(self._join(ev))
            out += self._drain(o, now, verify)
            self._note(f"rotated:{o}", now, f"ledger.pinned.rotated origin={o} seq={at} (its feed "
                       "starts with another key and rotates to the configured one; joined)")
            return out
        return []

    def _hold(self, ev: Event, now: float | None, verify: Verify) -> Offered:
        variants = self.pending.get(ev.origin, {}).get(ev.seq, [])
        if any(w.ev.id == ev.id for w in variants):
            return Offered([], duplicate=True, pending=True)
        if now is not None:
            keys = self.known_keys(ev.origin)
            if (ev.seq == 1 and ev.type == NODE_CONFIGURED) or ev.type == FEED_CHECKPOINT:
                keys.append(checkpoint.start_key(ev))
            if not any(verify(ev, k) for k in keys):
                return Offered([], rejected=f"{ev.origin} seq {ev.seq} waits for a gap but is not "
                                            "signed by a key known here (forged, or asked for again later)")
            if ev.type == FEED_CHECKPOINT and sum(
                    1 for w in self._starts(ev.origin) if w.ev.type == FEED_CHECKPOINT) >= MAX_VARIANTS:
                return Offered([], rejected=f"too many checkpoints of {ev.origin} waiting to be admitted "
                                            "(asked for again later)")
            if len(variants) >= MAX_VARIANTS or self._pending_of.get(ev.origin, 0) >= MAX_PENDING_PER_ORIGIN:
                self._note(f"pending-origin:{ev.origin}", now, f"ledger.pending.full origin={ev.origin} "
                           f"limit={MAX_PENDING_PER_ORIGIN} (the rest is asked for again later)")
                return Offered([], rejected=f"too many events of {ev.origin} waiting for a gap to fill")
        if self._pending_count >= MAX_PENDING:
            self._note("pending-all", now, f"ledger.pending.full limit={MAX_PENDING} "
                       "(the rest is asked for again later)")
            return Offered([], rejected="too many events waiting for a gap to fill")
        self._order += 1
        at = float("inf") if now is None else now
        self.pending.setdefault(ev.origin, {}).setdefault(ev.seq, []).append(_Waiting(ev, at, self._order))
        if ev.type == FEED_CHECKPOINT:
            self._waiting_checkpoints.setdefault(ev.origin, set()).add(ev.seq)
        self._pending_count += 1
        self._pending_of[ev.origin] = self._pending_of.get(ev.origin, 0) + 1
        return Offered([], pending=True)

    def _forget(self, origin: str, seq: int, n: int) -> None:
        """Account for ``n`` waiting events of ``origin`` at ``seq`` being let go."""
        waiting = self.pending.get(origin, {})
        waiting.pop(seq, None)
        self._pending_count -= n
        left = self._pending_of.get(origin, 0) - n
        if left > 0:
            self._pending_of[origin] = left
        else:
            self._pending_of.pop(origin, None)
        if not waiting:
            self.pending.pop(origin, None)
            self._waiting_checkpoints.pop(origin, None)

    def _take(self, origin: str, seq: int) -> None:
        self._forget(origin, seq, len(self.pending.get(origin, {}).get(seq, [])))

    def _drain(self, origin: str, now: float | None, verify: Verify) -> list[Event]:
        out: list[Event] = []
        feed = self.feeds[origin]
        for seq in [s for s in self.pending.get(origin, {}) if s <= feed.head_seq]:
            self._take(origin, seq)  # stale: that place is taken now
        while origin in self.pending:
            variants = self.pending[origin].get(feed.head_seq + 1)
            if not variants:
                break
            nxt = next((w.ev for w in variants
                        if self._check_next(feed, w.ev, now, verify, False) is None), None)
            if nxt is None or (now is not None and self._spend(nxt, now)):
                break  # wrong links wait to expire; over budget waits for tokens
            self._take(origin, nxt.seq)
            out.append(self._join(nxt))
        return out

    # -- admission --------------------------------------------------------------------------
    def _unheld(self, ev: Event, now: float, verify: Verify) -> Offered:
        """An event from a peer for an origin whose feed is not held yet."""
        o = ev.origin
        pinned = self.pinned.get(o)
        if o == self.me and pinned is None:
            return Offered([], rejected=f"{o} is this node: its feed is written here, not taken from peers")
        if pinned is None:
            why = self._refuse_new(o)
            if why:
                self._note(f"admission:{o}", now, f"ledger.admission.refused origin={o} reason={why}")
                return Offered([], rejected=f"{o} not admitted: {why}")
        if pinned is not None and ev.type == FEED_CHECKPOINT and checkpoint.start_key(ev) == pinned:
            return self._jump(None, ev, now, verify, False)
        if self._before_pin(ev) or (pinned is not None and ev.seq > 1):
            return self._hold_pinned(ev, now, verify)
        if ev.seq == 1:
            reason = self._check_next(None, ev, now, verify, False)
            if reason:
                return Offered([], rejected=reason)
            if pinned is not None:
                accepted = [self._join(ev)]
                accepted += self._drain(o, now, verify)
                return Offered(accepted + self._admit_from(accepted, now, verify))
        held = self._hold(ev, now, verify)
        if held.rejected or held.duplicate:
            return held
        if ev.seq == 1 or ev.type in (LINK_CONFIGURED, FEED_CHECKPOINT):
            accepted = self._admit(o, now, verify)
            if accepted:
                return Offered(accepted + self._admit_from(accepted, now, verify))
            self._note(f"waiting:{o}", now, f"ledger.admission.waiting origin={o} (no admitted "
                       "node has a link to it that it links back; its events wait)")
        return held

    def _refuse_new(self, o: str) -> str | None:
        """Why a new, unpinned id may not even wait, or None."""
        twin = self._folded.get(o.casefold())
        if twin is None:
            twin = next((n for n in (self.me, *self.pinned) if n and n.casefold() == o.casefold()), None)
        if twin is not None and twin != o:
            return f"differs-only-by-case-from={twin}"
        if len(self.feeds) >= MAX_NODES:
            return f"too-many-nodes limit={MAX_NODES}"
        if o not in self.pending and sum(1 for p in self.pending if p not in self.feeds) >= MAX_CANDIDATES:
            return f"too-many-unknown-nodes-waiting limit={MAX_CANDIDATES}"
        return None

    def _starts(self, origin: str) -> list[_Waiting]:
        """``origin``'s waiting events that can start a feed (a seq-1 ``node.configured``
        or a checkpoint), in arrival order. Looks only at seq 1 and the seqs where a
        checkpoint was put to wait (a set that may hold stale seqs: pruned here)."""
        waiting = self.pending.get(origin, {})
        seqs = self._waiting_checkpoints.get(origin, set())
        seqs.intersection_update(waiting)
        out = [w for w in waiting.get(1, []) if w.ev.type == NODE_CONFIGURED]
        out += [w for seq in seqs if seq != 1 for w in waiting[seq] if w.ev.type == FEED_CHECKPOINT]
        return sorted(out, key=lambda w: w.order)

    def _chain(self, first: Event, verify: Verify) -> list[Event]:
        """The verified chain waiting behind ``first`` (a seq-1 event or a checkpoint); a
        checkpoint in it that misstates the chain before it ends the chain there (it is
        judged when offered next)."""
        chain, key = [first], checkpoint.start_key(first)
        waiting = self.pending.get(first.origin, {})
        while True:
            nxt = next((w.ev for w in waiting.get(chain[-1].seq + 1, [])
                        if w.ev.prev == chain[-1].id and verify(w.ev, key)
                        and (w.ev.type != FEED_CHECKPOINT or checkpoint.check(w.ev, chain) is None)), None)
            if nxt is None:
                return chain
            chain.append(nxt)
            if nxt.type == NODE_CONFIGURED:
                key = nxt.data["key"]

    def _vouches(self, origin: str, chain: list[Event]) -> int:
        """How many admitted nodes link to ``origin`` and are linked back by ``chain``."""
        said: dict[str, bool] = {}
        for e in chain:
            if e.type == FEED_CHECKPOINT:
                said = checkpoint.links_of(e.data["state"])
            if e.type in (LINK_CONFIGURED, LINK_REMOVED):
                said[e.data["peer"]] = e.type == LINK_CONFIGURED
        return sum(1 for n, on in said.items()
                   if on and n in self.feeds and self._links.get(n, {}).get(origin))

    def _admit(self, o: str, now: float, verify: Verify) -> list[Event]:
        """Admit ``o``'s best vouched waiting feed, if one is vouched for; its events."""
        if o in self.feeds or self._refuse_new(o):
            return []
        firsts = [w for w in self._starts(o) if verify(w.ev, checkpoint.start_key(w.ev))]
        best: tuple[int, list[Event]] | None = None
        for w in firsts:
            chain = self._chain(w.ev, verify)
            score = self._vouches(o, chain)
            if score > 0 and (best is None or score > best[0]):
                best = (score, chain)
        if best is None:
            return []
        chain = best[1]
        for w in firsts:
            if checkpoint.start_key(w.ev) != checkpoint.start_key(chain[0]):
                self._note(f"rival:{o}:{checkpoint.start_key(w.ev)}", now, f"ledger.rival origin={o} "
                           "(a feed vouched for by fewer nodes, or later; not kept)")
        out: list[Event] = []
        for ev in chain:
            if self._spend(ev, now):
                break
            self._take(o, ev.seq)
            out.append(self._join(ev))
        if o in self.feeds:
            out += self._drain(o, now, verify)
            self._note(f"admitted:{o}", now, f"ledger.admitted origin={o} vouched_by={best[0]}")
        return out

    def _admit_from(self, accepted: list[Event], now: float, verify: Verify) -> list[Event]:
        """Waiting feeds that the links among ``accepted`` introduce, transitively."""
        out: list[Event] = []
        todo = _introduced(accepted)
        while todo:
            o = todo.pop()
            if o in self.feeds or o not in self.pending:
                continue
            joined = self._admit(o, now, verify)
            out += joined
            todo += _introduced(joined)
        return out

    def _note(self, subject: str, now: float | None, line: str) -> None:
        at = 0.0 if now is None else now
        last = self._noted.get(subject)
        if last is not None and at - last < NOTE_AGAIN_AFTER:
            return
        if len(self._noted) > 10_000:
            self._noted.clear()
        self._noted[subject] = at
        self.notes.append(line)


def _introduced(events: list[Event]) -> list[str]:
    """The peers ``events`` say their origin links to (``link.configured``, or a link a
    checkpoint states as configured)."""
    out = []
    for e in events:
        if e.type == LINK_CONFIGURED:
            out.append(e.data["peer"])
        elif e.type == FEED_CHECKPOINT:
            out += [p for p, on in checkpoint.links_of(e.data["state"]).items() if on]
    return out


def _fair_shares(needs: list[int], limit: int) -> list[int]:
    """Split ``limit`` over ``needs``: equal shares first, the leftover to those needing more."""
    give = [0] * len(needs)
    left = [i for i, n in enumerate(needs) if n > 0]
    remaining = limit
    while remaining > 0 and left:
        share = max(1, remaining // len(left))
        still = []
        for i in left:
            if remaining <= 0:
                break
            g = min(share, needs[i] - give[i], remaining)
            give[i] += g
            remaining -= g
            if give[i] < needs[i]:
                still.append(i)
        left = still
    return give
