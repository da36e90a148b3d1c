"""Events: the signed, immutable facts of the network, and their canonical form.

One event is one JSON object on one line::

    {"v":2,"origin":"NodeA","seq":12,"prev":"<id of seq 11>","ts":"2026-11-27T15:30:00.123Z",
     "type":"link.up","data":{...},"id":"<sha256 hex>","sig":"<base64 ed25519>"}

- Network events (``node.configured``, ``link.*``, ``feed.checkpoint``) are links of their origin's feed: ``seq``
  from 1, ``prev`` the id of the one before. Transfer facts (``TRANSFER_TYPES``) written
  since version 2 are standalone: ``seq`` 0, ``prev`` null (``Event.is_fact``,
  ``make_fact``); a version-1 transfer record is a legacy fact inside its origin's chain.

- ``id`` is the sha256 of the canonical form (sorted keys, no spaces, UTF-8) of the event
  without ``id`` and ``sig``; ``sig`` is the origin's ed25519 signature of the ASCII id.
- Every type has a data schema checked here; an event from the network is parsed with
  ``parse_event`` before anything else looks at it. Every field is bounded: an event is at
  most ``MAX_EVENT_BYTES`` in canonical form, whichever way it arrives; free text holds no
  control or format characters (``ids.UNSAFE_CATEGORIES``); ``ts`` is a real UTC date and
  time of the years ``MIN_YEAR``..``MAX_YEAR``, so ``parse_ts`` never raises on a parsed
  event; a file name is already NFC and portable (``ids.safe_file_name``).
- ``transfer.queued`` and ``transfer.delivered`` have two data shapes: sealed (written for
  every new transfer: the name is inside ``data.sealed``, an age file only the origin and the
  destination can open, docs/encryption.md) and plaintext (``data.name``, what maildrop wrote
  before end-to-end encryption: still read, and a receipt of such a transfer keeps it).
- ``feed.checkpoint`` (``FEED_CHECKPOINT``) states the fold of its origin's own feed up to
  ``data.upto`` (always its own seq minus one, so its ``prev`` is the id of event ``upto``:
  the hash of the chain up to there); its ``data.state`` is checked here for shape only
  (``checkpoint`` folds and compares). It may be up to ``MAX_CHECKPOINT_BYTES``.
- Old record versions are upgraded when read (``_UPGRADES``), never rewritten: an ``Event``
  keeps the version it was written with (``Event.v``), so ``to_line`` gives back the record
  exactly as signed (version 1: every record before issue 11; version 2: the current one).

Pure: no clock (``now`` is passed in), no files, no sockets.
"""

from __future__ import annotations

import base64
import binascii
import calendar
import datetime
import functools
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

VERSION = 2
"""The record version this code writes. Versions 1..VERSION are read (``_UPGRADES``)."""
MAX_EVENT_BYTES = 16 * 1024
MAX_CHECKPOINT_BYTES = 64 * 1024
"""The largest ``feed.checkpoint`` in canonical form. A checkpoint carries, per peer of its
origin, a link word, an observation and up to two health reports (about 450 bytes in all),
so 64 KiB holds ``MAX_CHECKPOINT_PEERS``; a gossip batch still fits a frame body
(``gossip`` splits batches by bytes too)."""
MAX_CHECKPOINT_PEERS = 128
"""Entries at most in each list of a checkpoint's state (peers of one node)."""
MAX_SEQ = 2**63 - 1
# Every ts from the epoch on parses, so a node whose clock was reset to 1970 still writes
# events that it and others can read; how far a ts may be trusted is custody's business.
MIN_YEAR, MAX_YEAR = 1970, 9999
MAX_HOST_CHARS = 253  # a DNS name (RFC 1035), without its optional trailing dot
MAX_ADDRESS_CHARS = 260  # HOST + "." + ":" + five port digits
MAX_KEY_CHARS = 200
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
AGE_MAGIC = b"age-encryption.org/v1\n"
MAX_SEALED_CHARS = 4 * 1024
"""The longest ``data.sealed`` (base64 of the envelope's age file): a 255-byte name and two
ssh-ed25519 recipients take about 1,000."""
_TS = re.compile(r"^([0-9]{4})-([0-9]{2})-([0-9]{2})T([0-9]{2}):([0-9]{2}):([0-9]{2})\.([0-9]{3})Z$")
_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_ADDR = re.compile(
    rf"^(?:\[[0-9A-Fa-f:.]{{2,45}}\]|(?P<host>{_LABEL}(?:\.{_LABEL})*\.?)):(?P<port>[0-9]{{1,5}})$"
)

NODE_CONFIGURED = "node.configured"
LINK_CONFIGURED = "link.configured"
LINK_REMOVED = "link.removed"
LINK_UP = "link.up"
LINK_DOWN = "link.down"
TRANSFER_QUEUED = "transfer.queued"
TRANSFER_RELAYED = "transfer.relayed"
TRANSFER_DELIVERED = "transfer.delivered"
TRANSFER_FAILED = "transfer.failed"
TRANSFER_REFUSED = "transfer.refused"
LINK_HEALTH = "link.health"
FEED_CHECKPOINT = "feed.checkpoint"
_CHECKPOINT_MARK = b'"type":"feed.checkpoint"'
TRANSFER_TYPES = frozenset({TRANSFER_QUEUED, TRANSFER_RELAYED, TRANSFER_DELIVERED, TRANSFER_FAILED,
                            TRANSFER_REFUSED})
"""Transfer facts: in a version-2 record standalone (``seq`` 0, ``prev`` null, in no feed),
held only by the transfer's origin, destination and custodians (docs/history.md). A
version-1 record of one of these types is a *legacy* fact: a link of its origin's chain."""

# ``link.health`` values are buckets (their lower bounds), never raw measurements, so noise
# within a bucket writes no event (docs/routing.md).
RTT_BUCKETS = (0, 30, 100, 300, 1000, 3000)
"""Round-trip time, ms: the bucket a measured median falls in, named by its lower bound (below
30 ms counts as near: a LAN, one region, or a busy machine's noise)."""
LOSS_BUCKETS = (0, 5, 20, 50)
"""Failed attempts (connects, gossip rounds, offers) per attempt, percent: lower bounds."""
FLAP_BUCKETS = (0, 2, 5)
"""Outages (up -> down) within the report's ``window``: 0 means fewer than 2."""
MAX_HEALTH_WINDOW = 86_400


def canonical(obj: Any) -> bytes:
    """Canonical JSON: sorted keys, no spaces, UTF-8 (not ASCII-escaped)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def format_ts(now: float) -> str:
    """``2026-11-27T15:30:00.123Z`` for a POSIX time (``parse_ts`` reads back MIN_YEAR..MAX_YEAR)."""
    whole = int(now)
    ms = int(round((now - whole) * 1000))
    if ms == 1000:
        whole, ms = whole + 1, 0
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(whole)) + f".{ms:03d}Z"


def parse_ts(ts: str) -> float:
    """Inverse of ``format_ts``: POSIX seconds. Raises ValueError unless ``ts`` is exactly that
    form and a real UTC date and time (no month 99, no Feb 30, no leap second) of the years
    MIN_YEAR..MAX_YEAR."""
    m = _TS.fullmatch(ts) if isinstance(ts, str) else None
    if m is None:
        raise ValueError(f"{brief(ts, 40)} is not YYYY-MM-DDTHH:MM:SS.mmmZ")
    year, month, day, hour, minute, second, ms = (int(g) for g in m.groups())
    if not MIN_YEAR <= year <= MAX_YEAR:
        raise ValueError(f"{ts!r} is outside the years {MIN_YEAR}..{MAX_YEAR}")
    when = datetime.datetime(year, month, day, hour, minute, second)  # ValueError if no such time
    return calendar.timegm(when.timetuple()) + ms / 1000


def _ts(v: Any) -> bool:
    try:
        parse_ts(v)
    except ValueError:
        return False
    return True


# --- data schemas -------------------------------------------------------------------------

def _node(v: Any) -> bool:
    return ids.is_node_id(v)


def _tid(v: Any) -> bool:
    return ids.is_transfer_id(v)


def _hex64(v: Any) -> bool:
    return isinstance(v, str) and _HEX64.fullmatch(v) is not None


def _text(limit: int) -> Callable[[Any], bool]:
    """Free text for people: at most ``limit`` characters, none of ``ids.UNSAFE_CATEGORIES``
    (no ESC, CR, LF, TAB, DEL, bidi override ...); ordinary spaces are fine."""
    return lambda v: isinstance(v, str) and len(v) <= limit and not ids.has_unsafe_characters(v)


def _size(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**63


def _name(v: Any) -> bool:
    """A safe file name, already in NFC (``safe_file_name`` would return another string)."""
    return isinstance(v, str) and ids.safe_file_name(v) == v


def _sealed(v: Any) -> bool:
    """Canonical base64 of an age file (``AGE_MAGIC`` first), at most MAX_SEALED_CHARS."""
    if not isinstance(v, str) or not 0 < len(v) <= MAX_SEALED_CHARS:
        return False
    try:
        raw = base64.b64decode(v, validate=True)
    except (binascii.Error, ValueError):
        return False
    return raw.startswith(AGE_MAGIC) and base64.b64encode(raw).decode() == v


def _addr(v: Any) -> bool:
    """``HOST:PORT`` with a DNS-like host of at most MAX_HOST_CHARS, or ``[IPv6]:PORT``."""
    if not isinstance(v, str) or len(v) > MAX_ADDRESS_CHARS:
        return False
    m = _ADDR.fullmatch(v)
    if m is None or int(m["port"]) > 65535:
        return False
    return m["host"] is None or len(m["host"].removesuffix(".")) <= MAX_HOST_CHARS


def _pubkey(v: Any) -> bool:
    if not isinstance(v, str) or len(v) > MAX_KEY_CHARS:
        return False
    try:
        return normalize_public_line(v) == v
    except ValueError:
        return False


def _one_of(allowed: tuple[int, ...]) -> Callable[[Any], bool]:
    return lambda v: isinstance(v, int) and not isinstance(v, bool) and v in allowed


def _window(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_HEALTH_WINDOW


def _seq(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= MAX_SEQ


def _flag(v: Any) -> bool:
    return isinstance(v, bool)


_HEALTH_FIELDS: dict[str, Callable[[Any], bool]] = {
    "rtt_ms": _one_of(RTT_BUCKETS), "loss": _one_of(LOSS_BUCKETS), "flaps": _one_of(FLAP_BUCKETS),
    "window": _window,
}
_CHECKPOINT_ENTRIES: dict[str, dict[str, Callable[[Any], bool]]] = {
    "links": {"peer": _node, "seq": _seq, "on": _flag},
    "seen": {"peer": _node, "seq": _seq, "ts": _ts, "up": _flag},
    "health": {"peer": _node, "seq": _seq, "ts": _ts, **_HEALTH_FIELDS},
    "flapped": {"peer": _node, "seq": _seq, "ts": _ts, **_HEALTH_FIELDS},
}
"""A checkpoint state's lists, one entry per peer, sorted by peer: the latest
``link.configured``/``link.removed`` (``on``), ``link.up``/``link.down`` (``up``), ``link.health``
and ``link.health`` that said the link flaps, each with the seq and ts of its event."""
_CHECKPOINT_NODE: dict[str, Callable[[Any], bool]] = {
    "seq": _seq, "ts": _ts, "display_name": _text(200), "address": _addr, "key": _pubkey,
}
"""A checkpoint state's ``node``: the latest ``node.configured`` (its seq, ts and data)."""


def _fields(obj: Any, schema: Mapping[str, Callable[[Any], bool]]) -> bool:
    return isinstance(obj, dict) and set(obj) == set(schema) and all(ok(obj[k]) for k, ok in schema.items())


def _checkpoint_state(v: Any) -> bool:
    """The shape of a checkpoint's ``state``: ``node`` and the four lists, each at most
    ``MAX_CHECKPOINT_PEERS`` entries, strictly sorted by peer (so one word per peer)."""
    if not isinstance(v, dict) or set(v) != {"node", *_CHECKPOINT_ENTRIES}:
        return False
    if not _fields(v["node"], _CHECKPOINT_NODE):
        return False
    for name, schema in _CHECKPOINT_ENTRIES.items():
        entries = v[name]
        if not isinstance(entries, list) or len(entries) > MAX_CHECKPOINT_PEERS:
            return False
        if not all(_fields(e, schema) for e in entries):
            return False
        peers = [e["peer"] for e in entries]
        if any(a >= b for a, b in zip(peers, peers[1:], strict=False)):
            return False
    return True


def _checkpoint_seqs(seq: int, data: Mapping[str, Any]) -> str | None:
    """Why a checkpoint's numbers do not fit its own seq (``upto`` must be seq - 1 and every
    fact it states must come from the prefix it covers), or None."""
    if data["upto"] != seq - 1:
        return f"feed.checkpoint: upto {data['upto']} is not its seq - 1 ({seq - 1})"
    state = data["state"]
    seqs = [state["node"]["seq"], *(e["seq"] for name in _CHECKPOINT_ENTRIES for e in state[name])]
    if max(seqs) > data["upto"]:
        return f"feed.checkpoint: states a fact of seq {max(seqs)}, past the {data['upto']} it covers"
    return None


_LINK = {"peer": _node}
SCHEMAS: dict[str, dict[str, Callable[[Any], bool]]] = {
    NODE_CONFIGURED: {"id": _node, "display_name": _text(200), "address": _addr, "key": _pubkey},
    LINK_CONFIGURED: _LINK,
    LINK_REMOVED: _LINK,
    LINK_UP: _LINK,
    LINK_DOWN: _LINK,
    # size and sha256 are the ciphertext's (what every holder stores, checks and resumes on)
    TRANSFER_QUEUED: {
        "transfer": _tid, "destination": _node, "sealed": _sealed, "size": _size, "sha256": _hex64,
    },
    TRANSFER_RELAYED: {"transfer": _tid, "from": _node},
    TRANSFER_DELIVERED: {"transfer": _tid, "sha256": _hex64},
    TRANSFER_FAILED: {"transfer": _tid, "reason": _text(500)},
    # A custodian reports that ``by`` refused the transfer for good; only the origin acts on it.
    TRANSFER_REFUSED: {"transfer": _tid, "origin": _node, "by": _node, "reason": _text(64),
                       "detail": _text(500)},
    # The origin's measurement of its link to ``peer``, bucketed; ``window``: the seconds
    # over which loss and flaps were counted (and a flapping link must stay calm).
    LINK_HEALTH: {"peer": _node, "rtt_ms": _one_of(RTT_BUCKETS), "loss": _one_of(LOSS_BUCKETS),
                  "flaps": _one_of(FLAP_BUCKETS), "window": _window},
    # The fold of the origin's own feed up to ``upto`` (see ``checkpoint``).
    FEED_CHECKPOINT: {"upto": _seq, "state": _checkpoint_state},
}


PLAINTEXT_SCHEMAS: dict[str, dict[str, Callable[[Any], bool]]] = {
    TRANSFER_QUEUED: {
        "transfer": _tid, "destination": _node, "name": _name, "size": _size, "sha256": _hex64,
    },
    TRANSFER_DELIVERED: {"transfer": _tid, "sha256": _hex64, "name": _name},
}
"""The shapes, with ``data.name``, that maildrop wrote before end-to-end encryption: a data
object with ``name`` is checked against these. Read for ever (a transfer queued before an
upgrade is still delivered, in plaintext); a receipt of such a transfer is written this way."""


def is_sealed(data: Mapping[str, Any]) -> bool:
    """True for the data of a sealed ``transfer.queued`` (its bytes are age ciphertext)."""
    return "sealed" in data


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

    @property
    def is_fact(self) -> bool:
        """A standalone transfer fact (``seq`` 0): in no feed, never gossiped."""
        return self.seq == 0

    def to_dict(self) -> dict[str, Any]:
        d = self.body()
        d["id"] = self.id
        d["sig"] = self.sig
        return d

    def to_line(self) -> bytes:
        """One canonical JSON line, newline-terminated: the on-disk and on-wire form."""
        return canonical(self.to_dict()) + b"\n"

    @property
    def is_legacy_fact(self) -> bool:
        """A transfer fact written as record version 1: it sits in its origin's v1 chain
        (``seq`` >= 1) and is a fact about its transfer too (see ``_upgrade_1_to_2``)."""
        return self.v == 1 and self.type in TRANSFER_TYPES

    def verify_signature(self, public_line: str) -> bool:
        """True when ``sig`` is ``public_line``'s signature of ``id``. An event often comes
        twice (with an offer and by gossip): the answer is remembered (``_checked``)."""
        return _checked(self.id, self.sig, public_line)


@functools.lru_cache(maxsize=16384)
def _checked(event_id: str, sig: str, public_line: str) -> bool:
    """The signature check of one (id, signature, key): pure, so its answer can be kept."""
    try:
        raw = base64.b64decode(sig, validate=True)
    except (binascii.Error, ValueError):
        return False
    return verify(public_line, raw, event_id.encode())


def compute_id(body: Mapping[str, Any]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


def make_event(
    key: NodeKey, origin: str, seq: int, prev: str | None, now: float, type: str, data: Mapping[str, Any],
    v: int = VERSION,
) -> Event:
    """Build and sign this node's next network event (the next link of its feed). Raises
    InvalidEvent if ``data`` breaks its schema, ``type`` is a transfer fact (those are made
    with ``make_fact``; ``v=1`` makes a legacy chained one, as maildrop wrote before version
    2, for tests and fixtures) or ``now`` is outside the years MIN_YEAR..MAX_YEAR (a clock
    before the epoch or past 9999): such an event would be refused by every node, this one
    included when it reads its log again."""
    if type in TRANSFER_TYPES and v >= 2:
        raise InvalidEvent(f"{type} is a transfer fact: it is made with make_fact, in no feed")
    return _signed(key, v, origin, seq, prev, now, type, data)


def make_fact(key: NodeKey, origin: str, now: float, type: str, data: Mapping[str, Any]) -> Event:
    """Build and sign a standalone transfer fact of this node (``seq`` 0, ``prev`` null,
    the current ``VERSION``). Raises InvalidEvent as ``make_event`` does, and for a type
    that is not a transfer fact."""
    if type not in TRANSFER_TYPES:
        raise InvalidEvent(f"{brief(type, 40)} is not a transfer fact")
    return _signed(key, VERSION, origin, 0, None, now, type, data)


def _signed(key: NodeKey, v: int, origin: str, seq: int, prev: str | None, now: float, type: str,
            data: Mapping[str, Any]) -> Event:
    _check_data(type, data)
    why = _checkpoint_seqs(seq, data) if type == FEED_CHECKPOINT else None
    if why:
        raise InvalidEvent(why)
    if type == FEED_CHECKPOINT and len(canonical(data)) > MAX_CHECKPOINT_BYTES - 1024:
        raise InvalidEvent(f"feed.checkpoint: over {MAX_CHECKPOINT_BYTES} bytes")
    ts = format_ts(now)
    if not _ts(ts):
        raise InvalidEvent(f"the clock says {ts}, outside the years {MIN_YEAR}..{MAX_YEAR}; "
                           "set the system clock")
    body = {"v": v, "origin": origin, "seq": seq, "prev": prev, "ts": ts,
            "type": type, "data": dict(data)}
    eid = compute_id(body)
    sig = base64.b64encode(key.sign(eid.encode())).decode()
    return Event(origin, seq, prev, body["ts"], type, dict(data), eid, sig, v)


def _check_data(type: str, data: Any) -> None:
    schema = SCHEMAS.get(type)
    if schema is None:
        raise InvalidEvent(f"unknown event type {brief(type, 40)}")
    if not isinstance(data, dict):
        raise InvalidEvent(f"{type}: data is not an object")
    if "name" in data and type in PLAINTEXT_SCHEMAS:
        schema = PLAINTEXT_SCHEMAS[type]
    extra = set(data) - set(schema)
    if extra:
        raise InvalidEvent(f"{type}: unexpected data field(s) {sorted(extra)}")
    for field, ok in schema.items():
        if field not in data:
            raise InvalidEvent(f"{type}: data.{field} missing")
        if not ok(data[field]):
            raise InvalidEvent(f"{type}: data.{field} is invalid ({brief(data[field])})")


def brief(value: Any, limit: int = 80) -> str:
    """A short, ASCII picture of a peer's bad value for an error message: a str or number
    cut to ``limit`` characters, anything else by its type name (never a recursive repr,
    which a value nested past the stack would make raise)."""
    if isinstance(value, str):
        return ascii(value[:limit])
    if isinstance(value, bool | int | float) or value is None:
        return ascii(value)[:limit]
    return f"a {type(value).__name__}"


def _upgrade_1_to_2(obj: dict[str, Any]) -> dict[str, Any]:
    """Read a version 1 record as version 2 (docs/history.md, "Upgrading: record versions").

    Version 2 changed where a transfer fact lives, not what any record says: every field of
    a version 1 record keeps its meaning and its value, so the reading is the record with
    ``"v": 2``. A v1 record of a transfer type keeps the ``seq`` and ``prev`` it was signed
    with: it is a link of its origin's v1 chain (the chain's hashes need it) and, read as
    v2, a *legacy fact* (``Event.is_legacy_fact``), not a standalone one (seq 0). The id is
    still checked over the original body, and the ``Event`` keeps ``v`` 1, so ``to_line``
    gives back the very record that was signed. Returns a new dict; ``obj`` is not changed.
    """
    return {**obj, "v": 2}


_UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: _upgrade_1_to_2}
"""Version-to-version readers: ``_UPGRADES[n]`` reads a record of version n as version
n + 1 (a new dict). ``parse_event`` chains them up to ``VERSION`` for the checks and the
code; the stored record is never rewritten."""


def parse_event(raw: bytes | str | Mapping[str, Any]) -> Event:
    """Check the structure and the content hash of one event; raise InvalidEvent with a reason.

    Any input, however hostile (nested past the stack, over the size limit, lone surrogates,
    values of the wrong type), ends in InvalidEvent, never in another exception. A line is
    measured in bytes, a Mapping (a queued event inside an offer, a spool meta) in canonical
    bytes: both at most MAX_EVENT_BYTES (a ``feed.checkpoint``: MAX_CHECKPOINT_BYTES; any
    other type is measured again once parsed). Does not check the signature or the chain: those
    need the origin's feed (see ``ledger``). Does not modify ``raw``.
    """
    if isinstance(raw, (bytes, str)):
        line = raw.encode("utf-8", "surrogatepass") if isinstance(raw, str) else raw
        size = len(line)
        # Only a checkpoint (written canonically, as every event is) may pass 16 KiB.
        if size > MAX_EVENT_BYTES and (size > MAX_CHECKPOINT_BYTES or _CHECKPOINT_MARK not in line):
            raise InvalidEvent(f"event larger than {MAX_EVENT_BYTES} bytes")
        try:
            obj = json.loads(line)
        except RecursionError:
            raise InvalidEvent("bad JSON (too deeply nested)") from None
        except ValueError as exc:  # UnicodeDecodeError included
            raise InvalidEvent(f"bad JSON ({exc.__class__.__name__}: {str(exc)[:60]})") from None
    else:
        obj = dict(raw)
        try:
            size = len(canonical(obj))
        except RecursionError:
            raise InvalidEvent("bad JSON (too deeply nested)") from None
        except (ValueError, TypeError) as exc:  # a lone surrogate, a value JSON cannot hold
            raise InvalidEvent(f"not JSON ({exc.__class__.__name__}: {str(exc)[:60]})") from None
        if size > MAX_CHECKPOINT_BYTES:
            raise InvalidEvent(f"event larger than {MAX_CHECKPOINT_BYTES} bytes ({size} in canonical form)")
    if not isinstance(obj, dict):
        raise InvalidEvent("event is not a JSON object")
    if size > MAX_EVENT_BYTES and obj.get("type") != FEED_CHECKPOINT:
        raise InvalidEvent(f"event larger than {MAX_EVENT_BYTES} bytes")
    v = obj.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise InvalidEvent("missing or bad record version 'v'")
    if v > VERSION:
        raise InvalidEvent(f"record version {brief(v)} is newer than this maildrop understands ({VERSION})")
    original = obj
    while obj["v"] < VERSION:
        obj = _UPGRADES[obj["v"]](obj)
    want = {"v", "origin", "seq", "prev", "ts", "type", "data", "id", "sig"}
    if set(obj) != want:
        raise InvalidEvent(f"event fields {sorted(obj)} are not {sorted(want)}")
    origin, seq, prev, ts = obj["origin"], obj["seq"], obj["prev"], obj["ts"]
    if not ids.is_node_id(origin):
        raise InvalidEvent(f"bad origin {brief(origin, 70)}")
    if not isinstance(seq, int) or isinstance(seq, bool) or not 0 <= seq <= MAX_SEQ:
        raise InvalidEvent(f"bad seq {brief(seq)}")
    if not isinstance(obj["type"], str):
        raise InvalidEvent("bad type")
    if seq == 0 and (original["v"] < 2 or obj["type"] not in TRANSFER_TYPES):
        raise InvalidEvent("bad seq 0: only a version-2 transfer fact is standalone")
    if seq >= 1 and original["v"] >= 2 and obj["type"] in TRANSFER_TYPES:
        raise InvalidEvent(f"a version-2 {obj['type']} is a standalone fact: seq 0, prev null")
    if seq == 0 and prev is not None:
        raise InvalidEvent("a transfer fact (seq 0) must have prev null")
    if seq == 1 and prev is not None:
        raise InvalidEvent("seq 1 must have prev null")
    if seq > 1 and not _hex64(prev):
        raise InvalidEvent("bad prev")
    if not _ts(ts):
        raise InvalidEvent(f"bad ts {brief(ts)} (want a real UTC time, {MIN_YEAR}..{MAX_YEAR})")
    _check_data(obj["type"], obj["data"])
    if obj["type"] == FEED_CHECKPOINT:
        why = _checkpoint_seqs(seq, obj["data"])
        if why:
            raise InvalidEvent(why)
    if not isinstance(obj["sig"], str) or len(obj["sig"]) > 200:
        raise InvalidEvent("bad sig")
    # The id is over the record as written (its own version), so hash the original body.
    body = {k: original[k] for k in original if k not in ("id", "sig")}
    if compute_id(body) != original.get("id"):
        raise InvalidEvent("id does not match content (tampered or corrupted)")
    if obj["type"] == NODE_CONFIGURED and obj["data"]["id"] != origin:
        raise InvalidEvent("node.configured names another node than its origin")
    # The record keeps its own version: its id and signature are over the body as written.
    return Event(origin, seq, prev, ts, obj["type"], dict(obj["data"]), obj["id"], obj["sig"], v)
