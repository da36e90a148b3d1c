"""Gossip: the Fingerprint and Gossip calls over a FrameStream.

Fingerprint: the caller sends its fingerprint; equal fingerprints end the round (one round
trip, about two hundred bytes). Gossip: the caller sends its version vector; the callee
answers with the events the caller lacks, in batches of at most ``BATCH`` events, the last
batch carrying the callee's own vector; the caller ingests them and sends back, in batches,
the events the callee lacks; the callee answers ``gossip.done``. Cost grows with the
difference, not with the log.

Bounds: one round moves at most ``ROUND_EVENTS`` events each way (the rest goes in the
next round, which the agent starts at once after a round that brought news), so a
``gossip {vv: {}}`` costs the callee one bounded answer, never its whole log; a batch
claims at most ``BATCH`` events and a frame whose count or lines exceed that is one
ProtocolError, refused before its lines are parsed; a round of more than
``MAX_BATCHES`` batches is refused the same way.

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

import json
import logging
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from . import ids
from .errors import InvalidEvent, ProtocolError
from .events import Event, parse_event
from .protocol import Frame, FrameStream

BATCH = 500
ROUND_EVENTS = 2_000
"""Events one side sends in one round at most (about 1 MiB); the rest waits a round."""
MAX_BATCHES = ROUND_EVENTS // BATCH
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


def _send_batches(stream: FrameStream, events: list[Event], **last: Any) -> None:
    for i in range(0, max(len(events), 1), BATCH):
        chunk = events[i : i + BATCH]
        more = i + BATCH < len(events)
        extra = {} if more else last
        stream.send("events", encode_batch(chunk), more=more, count=len(chunk), **extra)


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
    """One gossip round as the caller: Fingerprint, then Gossip if they differ."""
    stats = RoundStats(fingerprint=store.fingerprint())
    stream.send("fingerprint", fp=stats.fingerprint)
    reply = stream.recv(expect={"fingerprint.reply"})
    stats.peer_fingerprint = reply["fp"]
    if reply["same"]:
        stats.in_sync = True
        return stats
    stream.send("gossip", vv=store.version_vector())
    last = _recv_batches(stream, store, stats)
    their_vv = clean_vv(last.header.get("vv", {}))
    missing = store.since(their_vv, ROUND_EVENTS)
    stats.sent = len(missing)
    _send_batches(stream, missing)
    stream.recv(expect={"gossip.done"})
    return stats


def answer_fingerprint(stream: FrameStream, frame: Frame, store: Store) -> str:
    """Answer the caller's fingerprint with ours; returns ours (the one compared)."""
    mine = store.fingerprint()
    stream.send("fingerprint.reply", fp=mine, same=(frame["fp"] == mine))
    return mine


def answer_gossip(stream: FrameStream, frame: Frame, store: Store) -> RoundStats:
    """The callee's half of Gossip: send what the caller lacks, take what we lack."""
    stats = RoundStats()
    their_vv = clean_vv(frame["vv"])
    missing = store.since(their_vv, ROUND_EVENTS)
    stats.sent = len(missing)
    _send_batches(stream, missing, vv=store.version_vector())
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
