"""Gossip: the Fingerprint and Gossip calls over a FrameStream.

Fingerprint: the caller sends its fingerprint; equal fingerprints end the round (one round
trip, about two hundred bytes). Gossip, when they differ: the caller first learns, by hash
buckets (``reconcile``), which feeds differ — ``buckets {prefixes}`` answered by
``buckets.reply``, one level of the bucket tree per round trip, at most ``MAX_PREFIXES``
prefixes a frame and ``LEVEL_PREFIXES`` a level — then sends a *scoped* ``gossip {vv,
only: true}`` that names just those feeds; the callee answers with the events the caller
lacks in batches of at most ``BATCH`` events, the caller ingests them and sends back, in
batches, the events the callee lacks; the callee answers ``gossip.done``. Cost grows with
the difference, not with the number of feeds.

A caller holding at most ``DIRECT_MAX`` feeds sends its whole version vector instead
(``gossip {vv}``, the call before buckets; still answered). So does a caller whose descent
meets more than ``LEVEL_PREFIXES`` differing buckets on one level (a big difference: a
long outage) when its vector fits a frame (``WHOLE_MAX``); when it does not (about 4,000
feeds of short ids, fewer of long ones), the descent goes on with the first
``LEVEL_PREFIXES`` of them only, and the rest waits for the next round (which the agent
starts at once after news). The callee's vector rides the last batch of a whole-vector
call only when it fits ``WHOLE_MAX``; a caller that does not get it gives nothing that
round (the callee's own call to it takes what it lacks).

Bounds: one round moves at most ``ROUND_EVENTS`` events each way (the rest goes in the
next round, which the agent starts at once after a round that brought news), so a
``gossip {vv: {}}`` costs the callee one bounded answer, never its whole log; a batch
claims at most ``BATCH`` events and a frame whose count or lines exceed that is one
ProtocolError, refused before its lines are parsed; a round of more than
``MAX_BATCHES`` batches is refused the same way. A ``buckets`` frame or answer out of
shape (``reconcile.check_prefixes`` / ``check_answers``) is one ProtocolError.

Received events are parsed and validated (via the store's ``ingest``) before anything is
stored; invalid ones are counted and logged, never stored. Only feeds travel: a standalone
transfer fact (``Event.is_fact``) is in no feed, so it is never sent, and one received is
refused by the store (docs/history.md); legacy version-1 transfer events travel inside
their origin's chain until a checkpoint covers them. Works on any ``Store``: pure
of files and sockets itself.

Agreement: each round tells both ends the other's fingerprint (the caller's in
``fingerprint``, the callee's in the reply). ``PeerSync`` is what a node remembers of one
peer from them — its last fingerprint, whether it equals ours, since when they differ —
and ``compare`` is its pure step (no clock: the caller passes ``now``).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from . import ids, reconcile
from .errors import InvalidEvent, ProtocolError
from .events import Event, canonical, parse_event
from .protocol import MAX_BODY, Frame, FrameStream, cut

BATCH = 500
ROUND_EVENTS = 2_000
"""Events one side sends in one round at most (about 1 MiB); the rest waits a round."""
MAX_BATCHES = ROUND_EVENTS // BATCH
DIRECT_MAX = reconcile.LEAF
"""A caller holding at most this many feeds sends its whole vector (no descent)."""
LEVEL_PREFIXES = 256
"""Differing buckets one level of the descent asks for at most (in frames of
``reconcile.MAX_PREFIXES``, sent back to back)."""
WHOLE_MAX = 48 * 1024
"""Bytes a whole version vector may take in a frame header (the limit is 64 KiB)."""
log = logging.getLogger("maildrop.gossip")


class IngestResult(Protocol):
    accepted: list[Event]
    rejected: list[str]


class Store(Protocol):
    def fingerprint(self) -> str: ...
    def version_vector(self) -> dict[str, int]: ...
    def since(self, their_vv: Mapping[str, int], limit: int | None = None) -> list[Event]: ...
    def ingest(self, events: Iterable[Event]) -> IngestResult: ...


@dataclass
class RoundStats:
    in_sync: bool = False
    fingerprint: str = ""  # ours, as the round's fingerprint frame sent it
    peer_fingerprint: str = ""  # the callee's, from its fingerprint.reply
    bucket_calls: int = 0  # buckets frames sent (0: in sync, or the whole vector was sent)
    scoped: bool = False  # the events were asked for by a scoped gossip (after buckets)
    received: int = 0
    accepted: int = 0
    rejected: int = 0
    sent: int = 0


def clean_vv(vv: Any) -> dict[str, int]:
    """A version vector from the network: keep well-formed entries only."""
    if not isinstance(vv, dict):
        raise ProtocolError("version vector is not an object")
    return {o: s for o, s in vv.items() if ids.is_node_id(o) and isinstance(s, int)
            and not isinstance(s, bool) and s >= 0}


def encode_batch(events: list[Event]) -> bytes:
    return b"".join(e.to_line() for e in events)


def decode_batch(frame: Frame) -> tuple[list[Event], int]:
    """Parse a batch body; returns the structurally valid events and the count of bad lines.

    A count over ``BATCH`` or other than the body's lines is a ProtocolError, raised before
    any line is parsed; bad lines are logged as one line with their count."""
    count, body = frame["count"], frame.body
    if not 0 <= count <= BATCH:
        raise ProtocolError(f"events: count {count} is over the limit of {BATCH} a batch")
    n = body.count(b"\n") + (1 if body and not body.endswith(b"\n") else 0)
    if n != count:
        raise ProtocolError(f"events: count {count} but {n} lines")
    good, bad, first = [], 0, ""
    for line in body.split(b"\n")[:count]:
        try:
            good.append(parse_event(line))
        except InvalidEvent as exc:
            bad += 1
            first = first or str(exc)
    if bad:
        log.warning("gossip.event.invalid count=%d first=%s", bad, first)
    return good, bad


def _batches(events: list[Event]) -> list[bytes]:
    """``events`` as batch bodies of at most ``BATCH`` lines and ``MAX_BODY`` bytes (a
    checkpoint may be up to 64 KiB), at most ``MAX_BATCHES`` of them: what does not fit
    waits for the next round (the peer's vector still lacks it)."""
    runs = cut((e.to_line() for e in events), len, BATCH, MAX_BODY)
    return [b"".join(run) for run in itertools.islice(runs, MAX_BATCHES)] or [b""]


def _send_batches(stream: FrameStream, events: list[Event], **last: Any) -> None:
    bodies = _batches(events)
    for i, body in enumerate(bodies):
        more = i + 1 < len(bodies)
        extra = {} if more else last
        stream.send("events", body, more=more, count=body.count(b"\n"), **extra)


def _recv_batches(stream: FrameStream, store: Store, stats: RoundStats) -> Frame:
    for _ in range(MAX_BATCHES):
        frame = stream.recv(expect={"events"})
        events, bad = decode_batch(frame)
        stats.received += len(events) + bad
        stats.rejected += bad
        if events:
            res = store.ingest(events)
            stats.accepted += len(res.accepted)
            stats.rejected += len(res.rejected)
        if not frame["more"]:
            return frame
    raise ProtocolError("too many event batches")


def call(stream: FrameStream, store: Store) -> RoundStats:
    """One gossip round as the caller: Fingerprint, then (if they differ) buckets and a
    scoped Gossip, or the whole vector (see the module docstring)."""
    stats = RoundStats(fingerprint=store.fingerprint())
    stream.send("fingerprint", fp=stats.fingerprint)
    reply = stream.recv(expect={"fingerprint.reply"})
    stats.peer_fingerprint = reply["fp"]
    if reply["same"]:
        stats.in_sync = True
        return stats
    vv = store.version_vector()
    found = _descend(stream, vv, stats) if len(vv) > DIRECT_MAX else None
    if found is None:
        stream.send("gossip", vv=vv)
        last = _recv_batches(stream, store, stats)
        theirs = last.header.get("vv")
        missing = [] if theirs is None else store.since(clean_vv(theirs), ROUND_EVENTS)
    else:
        want, their_vv = found
        missing = store.since(their_vv, ROUND_EVENTS)
        if not want and not missing:
            return stats  # the buckets agree (the fingerprints differ in a head only)
        stats.scoped = True
        stream.send("gossip", vv=want, only=True)
        _recv_batches(stream, store, stats)
    stats.sent = len(missing)
    _send_batches(stream, missing)
    stream.recv(expect={"gossip.done"})
    if stats.scoped:
        log.debug("gossip.scoped buckets=%d received=%d sent=%d", stats.bucket_calls, stats.received,
                  stats.sent)
    return stats


def _descend(stream: FrameStream, vv: Mapping[str, int], stats: RoundStats
             ) -> tuple[dict[str, int], dict[str, int]] | None:
    """The caller's descent of the bucket tree: (``want``, the callee's vector as far as
    known), or None (send the whole vector) when a level holds more than
    ``LEVEL_PREFIXES`` differing buckets and the vector fits; when it does not, only the
    first ``LEVEL_PREFIXES`` are followed (the others stay unknown, as if equal: their
    feeds wait for a later round)."""
    index = reconcile.Index.of(vv)
    prefixes, theirs, covered = [""], {}, []
    while prefixes:
        if len(prefixes) > LEVEL_PREFIXES:
            if fits(vv):
                return None
            prefixes = prefixes[:LEVEL_PREFIXES]
        chunks = [prefixes[i : i + reconcile.MAX_PREFIXES]
                  for i in range(0, len(prefixes), reconcile.MAX_PREFIXES)]
        for chunk in chunks:  # small requests, back to back; then their answers in order
            stream.send("buckets", prefixes=chunk)
        stats.bucket_calls += len(chunks)
        nxt: list[str] = []
        for chunk in chunks:
            answers = reconcile.check_answers(stream.recv(expect={"buckets.reply"})["buckets"], chunk)
            more, got, cov = reconcile.descend(index, chunk, answers)
            nxt += more
            theirs.update(got)
            covered += cov
        prefixes = nxt
    return reconcile.diff(vv, theirs, covered)


def answer_fingerprint(stream: FrameStream, frame: Frame, store: Store) -> str:
    """Answer the caller's fingerprint with ours; returns ours (the one compared)."""
    mine = store.fingerprint()
    stream.send("fingerprint.reply", fp=mine, same=(frame["fp"] == mine))
    return mine


def fits(vv: Mapping[str, int]) -> bool:
    """True when ``vv`` may go whole in a frame header (``WHOLE_MAX``)."""
    return len(canonical(vv)) <= WHOLE_MAX


def answer_buckets(stream: FrameStream, frame: Frame, store: Store) -> None:
    """Answer a ``buckets`` request: per prefix, our entries or our children's hashes."""
    prefixes = reconcile.check_prefixes(frame["prefixes"])
    index = reconcile.Index.of(store.version_vector())
    stream.send("buckets.reply", buckets=[index.answer(p) for p in prefixes])


def answer_gossip(stream: FrameStream, frame: Frame, store: Store) -> RoundStats:
    """The callee's half of Gossip: send what the caller lacks, take what we lack. A
    scoped call (``only``) asks for the feeds its ``vv`` names only; the whole-vector call
    for every feed, and gets our vector back with the last batch if it ``fits``."""
    stats = RoundStats()
    their_vv = clean_vv(frame["vv"])
    if frame.header.get("only"):
        stats.scoped = True
        missing = store.since({**store.version_vector(), **their_vv}, ROUND_EVENTS)
        _send_batches(stream, missing)
    else:
        missing = store.since(their_vv, ROUND_EVENTS)
        mine = store.version_vector()
        _send_batches(stream, missing, **({"vv": mine} if fits(mine) else {}))
    stats.sent = len(missing)
    _recv_batches(stream, store, stats)  # a ProtocolError: the server answers "error", closes
    stream.send("gossip.done", accepted=stats.accepted, rejected=stats.rejected)
    return stats


def events_json(events: Iterable[Event]) -> list[dict[str, Any]]:
    return [json.loads(e.to_line()) for e in events]


_FINGERPRINT = re.compile(r"[0-9a-f]{1,64}")


@dataclass(frozen=True)
class PeerSync:
    """What this node remembers of one peer's fingerprint."""

    fingerprint: str  # the peer's, as last heard ("?" when what it sent was not hex)
    heard: float  # when it was heard (wall clock, seconds)
    same: bool  # it equals ours, as of the last comparison
    differs_since: float | None  # since when they differ (None while they are the same)

    def as_dict(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "fingerprint_heard": self.heard,
                "in_sync": self.same, "differs_since": self.differs_since}


def compare(prev: PeerSync | None, ours: str, theirs: str | None, now: float) -> PeerSync | None:
    """The peer's record after comparing fingerprints at ``now``: ``theirs`` just heard
    from the peer, or None when nothing new was heard (its last fingerprint against ours
    now — our log moves on while a peer is away). A divergence keeps the time it was
    first seen until a comparison finds them equal. None when nothing was ever heard.
    Pure: ``prev`` is not changed."""
    if theirs is None:
        if prev is None:
            return None
        theirs, heard = prev.fingerprint, prev.heard
    else:
        theirs, heard = (theirs if _FINGERPRINT.fullmatch(theirs) else "?"), now
    same = theirs == ours
    since = None if same else (prev.differs_since if prev is not None and prev.differs_since is not None
                               else now)
    return PeerSync(theirs, heard, same, since)
