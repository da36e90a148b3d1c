"""Events: the signed, immutable facts of the network, and their canonical form.

One event is one JSON object on one line::

    {"v":1,"origin":"NodeA","seq":12,"prev":"<id of seq 11>","ts":"2026-11-27T15:30:00.123Z",
     "type":"transfer.queued","data":{...},"id":"<sha256 hex>","sig":"<base64 ed25519>"}

- ``id`` is the sha256 of the canonical form (sorted keys, no spaces, UTF-8) of the event
  without ``id`` and ``sig``; ``sig`` is the origin's ed25519 signature of the ASCII id.
- Every type has a data schema checked here; an event from the network is parsed with
  ``parse_event`` before anything else looks at it.
- Old record versions are upgraded when read (``_UPGRADES``), never rewritten.

Pure: no clock (``now`` is passed in), no files, no sockets.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from . import ids
from .errors import InvalidEvent
from .keys import NodeKey, normalize_public_line, verify

VERSION = 1
MAX_EVENT_BYTES = 16 * 1024
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
_ADDR = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.\-_]+):\d{1,5}$")

NODE_CONFIGURED = "node.configured"
LINK_CONFIGURED = "link.configured"
LINK_REMOVED = "link.removed"
LINK_UP = "link.up"
LINK_DOWN = "link.down"
TRANSFER_QUEUED = "transfer.queued"
TRANSFER_RELAYED = "transfer.relayed"
TRANSFER_DELIVERED = "transfer.delivered"
TRANSFER_FAILED = "transfer.failed"


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8 (not ASCII-escaped)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def format_ts(now: float) -> str:
    """``2026-11-27T15:30:00.123Z`` for a POSIX time."""
    whole = int(now)
    ms = int(round((now - whole) * 1000))
    if ms == 1000:
        whole, ms = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def parse_ts(ts: str) -> float:
    """Inverse of ``format_ts``."""
    import calendar

    base, ms = ts[:-1].split(".")
    return calendar.timegm(time.strptime(base, "%Y-%m-%dT%H:%M:%S")) + int(ms) / 1000


# --- data schemas -------------------------------------------------------------------------

def _node(v: Any) -> bool:
    return ids.is_node_id(v)


def _tid(v: Any) -> bool:
    return ids.is_transfer_id(v)


def _hex64(v: Any) -> bool:
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def _text(limit: int) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, str) and len(v) <= limit and "\n" not in v


def _size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _name(v: Any) -> bool:
    return ids.safe_file_name(v) is not None


def _addr(v: Any) -> bool:
    return isinstance(v, str) and _ADDR.fullmatch(v) is not None


def _pubkey(v: Any) -> bool:
    if not isinstance(v, str):
        return False
    try:
        return normalize_public_line(v) == v
    except ValueError:
        return False


_LINK = {"peer": _node}
SCHEMAS: dict[str, dict[str, Callable[[Any], bool]]] = {
    NODE_CONFIGURED: {"id": _node, "display_name": _text(200), "address": _addr, "key": _pubkey},
    LINK_CONFIGURED: _LINK,
    LINK_REMOVED: _LINK,
    LINK_UP: _LINK,
    LINK_DOWN: _LINK,
    TRANSFER_QUEUED: {
        "transfer": _tid, "destination": _node, "name": _name, "size": _size, "sha256": _hex64,
    },
    TRANSFER_RELAYED: {"transfer": _tid, "from": _node},
    TRANSFER_DELIVERED: {"transfer": _tid, "sha256": _hex64, "name": _name},
    TRANSFER_FAILED: {"transfer": _tid, "reason": _text(500)},
}


# --- the event --------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Event:
    """A validated event. Construct with ``make_event`` (own) or ``parse_event`` (received)."""

    origin: str
    seq: int
    prev: str | None
    ts: str
    type: str
    data: Mapping[str, Any]
    id: str
    sig: str
    v: int = VERSION

    def body(self) -> dict[str, Any]:
        """The signed content: everything but ``id`` and ``sig``."""
        return {
            "v": self.v, "origin": self.origin, "seq": self.seq, "prev": self.prev,
            "ts": self.ts, "type": self.type, "data": dict(self.data),
        }

    def to_dict(self) -> dict[str, Any]:
        d = self.body()
        d["id"] = self.id
        d["sig"] = self.sig
        return d

    def to_line(self) -> bytes:
        """One canonical JSON line, newline-terminated: the on-disk and on-wire form."""
        return canonical(self.to_dict()) + b"\n"

    def verify_signature(self, public_line: str) -> bool:
        try:
            sig = base64.b64decode(self.sig, validate=True)
        except (binascii.Error, ValueError):
            return False
        return verify(public_line, sig, self.id.encode())


def compute_id(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def make_event(
    key: NodeKey, origin: str, seq: int, prev: str | None, now: float, type: str, data: Mapping[str, Any]
) -> Event:
    """Build and sign this node's next event. Raises InvalidEvent if ``data`` breaks its schema."""
    _check_data(type, data)
    body = {"v": VERSION, "origin": origin, "seq": seq, "prev": prev, "ts": format_ts(now),
            "type": type, "data": dict(data)}
    eid = compute_id(body)
    sig = base64.b64encode(key.sign(eid.encode())).decode()
    return Event(origin, seq, prev, body["ts"], type, dict(data), eid, sig)


def _check_data(type: str, data: Any) -> None:
    schema = SCHEMAS.get(type)
    if schema is None:
        raise InvalidEvent(f"unknown event type {type!r}")
    if not isinstance(data, dict):
        raise InvalidEvent(f"{type}: data is not an object")
    extra = set(data) - set(schema)
    if extra:
        raise InvalidEvent(f"{type}: unexpected data field(s) {sorted(extra)}")
    for field, ok in schema.items():
        if field not in data:
            raise InvalidEvent(f"{type}: data.{field} missing")
        if not ok(data[field]):
            raise InvalidEvent(f"{type}: data.{field} is invalid ({str(data[field])[:80]!r})")


# Upgraders from record version N to N+1; none yet (version 1 is the first).
_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {}


def parse_event(raw: bytes | str | Mapping[str, Any]) -> Event:
    """Check the structure and the content hash of one event; raise InvalidEvent with a reason.

    Does not check the signature or the chain: those need the origin's feed (see ``ledger``).
    """
    if isinstance(raw, (bytes, str)):
        if len(raw) > MAX_EVENT_BYTES:
            raise InvalidEvent(f"event larger than {MAX_EVENT_BYTES} bytes")
        try:
            obj = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidEvent(f"bad JSON ({exc.__class__.__name__}: {str(exc)[:60]})") from None
    else:
        obj = dict(raw)
    if not isinstance(obj, dict):
        raise InvalidEvent("event is not a JSON object")
    v = obj.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InvalidEvent("missing or bad record version 'v'")
    if v > VERSION:
        raise InvalidEvent(f"record version {v} is newer than this maildrop understands ({VERSION})")
    original = obj
    while obj["v"] < VERSION:
        obj = _UPGRADES[obj["v"]](obj)
    want = {"v", "origin", "seq", "prev", "ts", "type", "data", "id", "sig"}
    if set(obj) != want:
        raise InvalidEvent(f"event fields {sorted(obj)} are not {sorted(want)}")
    origin, seq, prev, ts = obj["origin"], obj["seq"], obj["prev"], obj["ts"]
    if not ids.is_node_id(origin):
        raise InvalidEvent(f"bad origin {str(origin)[:70]!r}")
    if not isinstance(seq, int) or isinstance(seq, bool) or seq < 1:
        raise InvalidEvent(f"bad seq {seq!r}")
    if seq == 1 and prev is not None:
        raise InvalidEvent("seq 1 must have prev null")
    if seq > 1 and not _hex64(prev):
        raise InvalidEvent("bad prev")
    if not isinstance(ts, str) or _TS.fullmatch(ts) is None:
        raise InvalidEvent("bad ts")
    if not isinstance(obj["type"], str):
        raise InvalidEvent("bad type")
    _check_data(obj["type"], obj["data"])
    if not isinstance(obj["sig"], str) or len(obj["sig"]) > 200:
        raise InvalidEvent("bad sig")
    # The id is over the record as written (its own version), so hash the original body.
    body = {k: original[k] for k in original if k not in ("id", "sig")}
    if compute_id(body) != original.get("id"):
        raise InvalidEvent("id does not match content (tampered or corrupted)")
    if obj["type"] == NODE_CONFIGURED and obj["data"]["id"] != origin:
        raise InvalidEvent("node.configured names another node than its origin")
    return Event(origin, seq, prev, ts, obj["type"], obj["data"], obj["id"], obj["sig"], VERSION)
