"""Reconciliation of version vectors by hash buckets: what a Gossip call asks for when two
fingerprints differ, so that its cost grows with the difference, not with the network.

An entry of a version vector is ``origin: seq``. Its *key* is the hex sha256 of the origin
id; the bucket of a hex prefix ``p`` holds the entries whose key starts with ``p`` (the
root, ``""``, holds them all). A bucket's hash is the first ``HASH_BYTES`` bytes of the
sha256 of ``"origin:seq;"`` for its entries in key order, so two vectors agree on a bucket
exactly when (but for a 2^-64 collision) its hashes agree.

The caller asks for buckets by prefix; the callee answers each with its entries when it
holds at most ``LEAF`` there (or the prefix is ``MAX_DEPTH`` digits long), else with the
``FANOUT`` hashes of its children (``p + "0"`` … ``p + "f"``, concatenated, in base64:
172 characters). The caller descends into
the children whose hash differs from its own, level by level, until it holds the callee's
entries of every bucket that differs (the *covered* prefixes); ``diff`` then says which
feeds each side lacks. One changed feed among N costs about log16(N / LEAF) levels of
``FANOUT`` hashes each: about 1 KiB at 10,000 nodes.

Pure: no I/O, inputs never mutated. Everything that came from the network is checked by
``check_prefixes`` (the callee) or ``check_answers`` (the caller) and refused with one
ProtocolError naming what is wrong.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from bisect import bisect_left
from collections.abc import Iterable, Mapping, Sequence
from functools import lru_cache
from typing import Any

from . import ids
from .errors import ProtocolError

FANOUT = 16
"""Children of a bucket: one per hex digit."""
DIGITS = "0123456789abcdef"
LEAF = 4
"""A bucket holding at most this many entries is answered with its entries, not split."""
MAX_DEPTH = 16
"""Longest prefix (hex digits, 64 bits): a bucket this deep is always answered with its
entries (only ids ground to share 64 bits of hash could crowd it)."""
HASH_BYTES = 8
"""Bytes of a bucket hash (64 bits)."""
HASHES_B64 = len(base64.b64encode(bytes(FANOUT * HASH_BYTES)))
"""Characters of a split bucket's answer: its children's hashes, concatenated, in base64."""
MAX_PREFIXES = 64
"""Prefixes one ``buckets`` frame may ask for: its answer stays far under the header limit
(64 x 180 bytes of hashes, or 64 x LEAF entries of up to 75 bytes)."""
MAX_ENTRIES = 1_000
"""Entries one answered bucket may carry at most (only a MAX_DEPTH bucket passes LEAF)."""

_PREFIX = re.compile(rf"[0-9a-f]{{0,{MAX_DEPTH}}}")

Answer = dict[str, Any]
"""One bucket's answer: ``{"vv": {origin: seq}}`` or ``{"h": base64 of FANOUT hashes}`` on
the wire; ``check_answers`` turns the second into ``{"h": [FANOUT hashes as bytes]}``."""


@lru_cache(maxsize=1 << 16)
def key(origin: str) -> str:
    """The bucket key of ``origin``: the hex sha256 of its id."""
    return hashlib.sha256(origin.encode()).hexdigest()


def children(prefix: str) -> list[str]:
    return [prefix + d for d in DIGITS]


def under(origin: str, prefixes: set[str]) -> bool:
    """True when ``origin``'s key starts with one of ``prefixes``."""
    k = key(origin)
    return any(k[:i] in prefixes for i in range(MAX_DEPTH + 1))


class Index:
    """A version vector sorted by key, to answer for any bucket in O(its size + log N).

    Immutable once built (``of``); shares nothing mutable with the vector it was built from."""

    __slots__ = ("_keys", "_entries", "_lines")

    def __init__(self, entries: list[tuple[str, str, int]]) -> None:
        self._entries = entries  # (key, origin, seq), sorted by key
        self._keys = [k for k, _, _ in entries]
        self._lines = [f"{o}:{s};".encode() for _, o, s in entries]

    @classmethod
    def of(cls, vv: Mapping[str, int]) -> Index:
        return cls(sorted((key(o), o, s) for o, s in vv.items()))

    def __len__(self) -> int:
        return len(self._entries)

    def _range(self, prefix: str) -> tuple[int, int]:
        return bisect_left(self._keys, prefix), bisect_left(self._keys, prefix + "~")

    def count(self, prefix: str) -> int:
        lo, hi = self._range(prefix)
        return hi - lo

    def entries(self, prefix: str) -> dict[str, int]:
        lo, hi = self._range(prefix)
        return {o: s for _, o, s in self._entries[lo:hi]}

    def hash(self, prefix: str) -> bytes:
        lo, hi = self._range(prefix)
        return hashlib.sha256(b"".join(self._lines[lo:hi])).digest()[:HASH_BYTES]

    def answer(self, prefix: str) -> Answer:
        """The callee's answer for one bucket: its entries when few (or at MAX_DEPTH),
        else its children's hashes."""
        if len(prefix) >= MAX_DEPTH or self.count(prefix) <= LEAF:
            return {"vv": self.entries(prefix)}
        return {"h": base64.b64encode(b"".join(self.hash(c) for c in children(prefix))).decode()}


def check_prefixes(raw: Any) -> list[str]:
    """The prefixes of a ``buckets`` request from the network: 1 to MAX_PREFIXES distinct
    hex strings of at most MAX_DEPTH digits; else ProtocolError."""
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PREFIXES:
        raise ProtocolError(f"buckets: 1 to {MAX_PREFIXES} prefixes")
    if not all(isinstance(p, str) and _PREFIX.fullmatch(p) for p in raw):
        raise ProtocolError(f"buckets: a prefix is not 0 to {MAX_DEPTH} lowercase hex digits")
    if len(set(raw)) != len(raw):
        raise ProtocolError("buckets: a prefix is asked twice")
    return list(raw)


def check_answers(raw: Any, prefixes: Sequence[str]) -> list[Answer]:
    """The callee's answers to a ``buckets`` request for ``prefixes``, checked: one per
    prefix; hashes exactly FANOUT of HASH_BYTES (returned split, as bytes); entries well
    formed, at most LEAF (MAX_ENTRIES at MAX_DEPTH), each origin in the bucket it is
    answered for. Else ProtocolError."""
    if not isinstance(raw, list) or len(raw) != len(prefixes):
        raise ProtocolError(f"buckets.reply: expected {len(prefixes)} answers")
    out: list[Answer] = []
    for p, a in zip(prefixes, raw, strict=True):
        if not isinstance(a, dict) or len(a) != 1:
            raise ProtocolError("buckets.reply: an answer is not {\"h\": …} or {\"vv\": …}")
        if "h" in a:
            h = a["h"]
            try:
                raw_h = base64.b64decode(h, validate=True) if isinstance(h, str) and len(h) == HASHES_B64 else b""
            except binascii.Error:
                raw_h = b""
            if len(raw_h) != FANOUT * HASH_BYTES:
                raise ProtocolError(f"buckets.reply: {FANOUT} bucket hashes of {HASH_BYTES} bytes expected "
                                    f"({HASHES_B64} base64 characters)")
            if len(p) >= MAX_DEPTH:
                raise ProtocolError(f"buckets.reply: a bucket {MAX_DEPTH} digits deep is split")
            out.append({"h": [raw_h[i : i + HASH_BYTES] for i in range(0, len(raw_h), HASH_BYTES)]})
        elif "vv" in a:
            vv = a["vv"]
            cap = MAX_ENTRIES if len(p) >= MAX_DEPTH else LEAF
            if not isinstance(vv, dict) or len(vv) > cap:
                raise ProtocolError(f"buckets.reply: at most {cap} entries a bucket")
            for o, s in vv.items():
                if not ids.is_node_id(o) or not isinstance(s, int) or isinstance(s, bool) or s < 1:
                    raise ProtocolError("buckets.reply: an entry is not node id: seq >= 1")
                if not key(o).startswith(p):
                    raise ProtocolError("buckets.reply: an entry outside its bucket")
            out.append({"vv": dict(vv)})
        else:
            raise ProtocolError("buckets.reply: an answer is not {\"h\": …} or {\"vv\": …}")
    return out


def descend(index: Index, prefixes: Sequence[str], answers: Sequence[Answer]
            ) -> tuple[list[str], dict[str, int], list[str]]:
    """One level of the descent, given our ``index`` and the callee's checked ``answers``
    (from ``check_answers``)
    for ``prefixes``: (the children to ask for next: their hash differs from ours, the
    callee's entries learned, the prefixes those entries cover)."""
    nxt: list[str] = []
    theirs: dict[str, int] = {}
    covered: list[str] = []
    for p, a in zip(prefixes, answers, strict=True):
        if "vv" in a:
            theirs.update(a["vv"])
            covered.append(p)
        else:
            nxt += [c for c, h in zip(children(p), a["h"], strict=True) if h != index.hash(c)]
    return nxt, theirs, covered


def diff(ours: Mapping[str, int], theirs: Mapping[str, int], covered: Iterable[str]
         ) -> tuple[dict[str, int], dict[str, int]]:
    """What each side lacks, once the callee's entries ``theirs`` are known for every
    bucket in ``covered`` and every other bucket is equal on both sides.

    Returns (``want``: ``{origin: our seq}`` for each feed the callee holds further than we
    do — what a scoped ``gossip`` asks for; ``their_vv``: the callee's whole vector as far
    as it can be known — ours outside the covered buckets, theirs inside)."""
    cov = set(covered)
    want = {o: ours.get(o, 0) for o, s in theirs.items() if s > ours.get(o, 0)}
    their_vv = {o: s for o, s in ours.items() if not under(o, cov)}
    their_vv.update(theirs)
    return want, their_vv

