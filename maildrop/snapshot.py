"""The snapshot of a node's fold (``state/snapshot.json``), so a start replays only the tail.

This module is the format, pure (no I/O): ``eventlog`` writes and reads the file (the
snapshot belongs to its log, and edges never import each other).

A snapshot is the list of events the ledger held at one point of ``events.jsonl`` in
*trusted form*: each event's fields as a JSON array, rebuilt as an ``Event`` without
parsing, schema, hash or signature work (every one of them was checked when it joined the
log). It holds events, never model or ledger internals, so a change to the fold or the
ledger rules changes nothing here: the loader offers the events to the ledger and applies
what joins to the model, as a replay of the log would.

Layout: one header line, then the body.

- header (canonical JSON): ``{"v": FORMAT, "node", "offset", "covered", "count", "body"}``:
  the node id, the byte ``offset`` of ``events.jsonl`` the snapshot covers, ``covered`` the
  sha256 of those ``offset`` bytes, ``count`` events, ``body`` the sha256 of the body.
- body: canonical JSON, an array of ``[origin, seq, prev, ts, type, data, id, sig, v]``.

It is used only when every check holds (``decode``, then ``eventlog`` hashes the prefix):
the header parses and is this format and node, the body's sha256 matches, the log is at
least ``offset`` bytes long and its first ``offset`` bytes hash to ``covered``. So a compacted or rewritten log, a log
restored from an older backup, a truncated or corrupted snapshot, or a snapshot copied from
another node is ignored (logged ``snapshot.ignored reason=...``) and the log replayed whole.

Crash: ``eventlog`` writes aside (``.snapshot.json.<pid>.tmp``), fsyncs, renames over the old
one and fsyncs the folder: a crash leaves the old snapshot or the new one, never a mix (a
stray temp file is never read, and the next write removes it). A lost snapshot costs only
time: the log is the record.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .events import Event, canonical

SNAPSHOT_FILE = "snapshot.json"
FORMAT = 1
"""The layout version of the snapshot file; another one is ignored (the log is replayed)."""


class Ignored(Exception):
    """A snapshot that cannot be used; ``str`` is the reason (one word, then details)."""


def path_for(events_path: Path) -> Path:
    """Where the snapshot of the log at ``events_path`` lives (beside it)."""
    return events_path.with_name(SNAPSHOT_FILE)


def _row(ev: Event) -> list[Any]:
    return [ev.origin, ev.seq, ev.prev, ev.ts, ev.type, dict(ev.data), ev.id, ev.sig, ev.v]


def encode(node: str, offset: int, covered: str, events: Sequence[Event]) -> bytes:
    """The file's bytes: header line and body (pure)."""
    body = canonical([_row(e) for e in events])
    header = {"v": FORMAT, "node": node, "offset": offset, "covered": covered, "count": len(events),
              "body": hashlib.sha256(body).hexdigest()}
    return canonical(header) + b"\n" + body


def decode(data: bytes, node: str) -> tuple[int, str, list[Event]]:
    """``(offset, covered, events)`` of a snapshot file's bytes; Ignored if it is not a
    whole, intact snapshot of this format for ``node`` (pure)."""
    nl = data.find(b"\n")
    if nl < 0:
        raise Ignored("truncated (no header line)")
    try:
        header = json.loads(data[:nl])
    except ValueError:
        raise Ignored("bad-header (not JSON)") from None
    if not isinstance(header, dict) or header.get("v") != FORMAT:
        raise Ignored(f"format (not version {FORMAT})")
    if header.get("node") != node:
        raise Ignored(f"node (written for {str(header.get('node'))[:70]!r}, this is {node!r})")
    offset, covered, count = header.get("offset"), header.get("covered"), header.get("count")
    if not (isinstance(offset, int) and offset >= 0 and isinstance(covered, str) and isinstance(count, int)):
        raise Ignored("bad-header (offset, covered, count)")
    body = data[nl + 1:]
    if hashlib.sha256(body).hexdigest() != header.get("body"):
        raise Ignored("checksum (the body does not match its sha256: truncated or corrupted)")
    try:
        rows = json.loads(body)
        events = [Event(o, s, p, t, ty, d, i, g, v) for o, s, p, t, ty, d, i, g, v in rows]
    except (ValueError, TypeError):
        raise Ignored("bad-body (not a list of events)") from None
    if len(events) != count:
        raise Ignored(f"count (header says {count}, body holds {len(events)})")
    return offset, covered, events
