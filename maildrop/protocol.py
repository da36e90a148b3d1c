"""The wire protocol spoken on a maildrop SSH channel: framing and the closed list of ops.

A frame is ``u32 big-endian header length | header | body``. The header is a canonical JSON
object with ``"v"`` (protocol version, first thing checked) and ``"op"``; when a body
follows, ``"len"`` gives its length. Headers are at most 64 KiB, bodies at most 8 MiB. An
``offer`` carries up to ``MAX_BATCH`` files; after the ``answers`` the sender streams the
accepted files' raw bytes back to back (no framing), and one ``stored`` answers for them
all — see docs/protocol.md.

A bad frame, an unknown op, a wrong version or a field of the wrong type raises
ProtocolError — whatever the peer sent (JSON nested past the stack included), never
another exception; the caller closes that channel and logs the reason. Dispatch is by the
``OPS`` table only, never by looking up arbitrary names.

Pure: works on any object with ``recv(n)`` and ``sendall(b)``; imports no sockets.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Collection, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from .errors import ProtocolError
from .events import brief, canonical

VERSION = 2
MAX_HEADER = 64 * 1024
MAX_BODY = 8 * 1024 * 1024
MAX_BATCH = 64
"""Files in one offer at most. Each file's signed queued event and route take about 700
bytes of the offer's header, which must stay under MAX_HEADER; a sender also stops adding
files once the header would pass ``OFFER_BUDGET``."""
OFFER_BUDGET = 48 * 1024
MAX_NOTICE_FACTS = 64
"""Facts in one ``notice`` frame at most (a receiver refuses more: ``too-large``)."""
MAX_NOTICE_BYTES = 48 * 1024
"""Canonical bytes of one ``notice`` frame's facts at most (a sender stops adding facts
before it; a receiver refuses more: ``too-large``)."""
MAX_NOTICE_HOPS = 32
"""Hops a notice makes at most: a frame whose ``hops`` reached it is refused (``hop-limit``),
so a notice caught in a routing loop ends instead of circling."""
_LEN = struct.Struct(">I")

# op -> {field: type}. Every op may also carry "v", "op" and (with a body) "len".
OPS: dict[str, dict[str, type | tuple[type, ...]]] = {
    "fingerprint": {"fp": str},
    "fingerprint.reply": {"fp": str, "same": bool},
    "gossip": {"vv": dict},
    "buckets": {"prefixes": list},
    "buckets.reply": {"buckets": list},
    "events": {"more": bool, "count": int},
    "gossip.done": {"accepted": int, "rejected": int},
    "offer": {"files": list},
    "answers": {"answers": list},
    "refuse": {"reason": str, "detail": str},
    "stored": {"results": list},
    "ping": {},
    "pong": {},
    "notice": {"to": str, "hops": int, "facts": list},
    "notice.stored": {"stored": list, "refused": list},
    "error": {"reason": str},
}
_OPTIONAL: dict[str, dict[str, type | tuple[type, ...]]] = {
    "gossip": {"only": bool},
    "events": {"vv": dict},
    "offer": {"cut_through": bool},
}


# The per-file words inside ``answers`` and ``stored``: {"a": kind, ...fields}.
ANSWERS: dict[str, dict[str, type]] = {
    "accept": {"offset": int},
    "have": {},
    "pending": {"detail": str},
    "refuse": {"reason": str, "detail": str},
}
RESULTS: dict[str, dict[str, type]] = {
    "stored": {},
    "pending": {"detail": str},
    "refuse": {"reason": str, "detail": str},
}


def check_list(items: Any, n: int, kinds: dict[str, dict[str, type]], what: str) -> list[dict[str, Any]]:
    """Validate the ``n`` per-file words of an ``answers`` or ``stored`` frame against
    ``kinds``; return them, or raise ProtocolError naming what is wrong."""
    if not isinstance(items, list) or len(items) != n:
        raise ProtocolError(f"{what}: expected {n} entries")
    for w in items:
        kind = w.get("a") if isinstance(w, dict) else None
        if not isinstance(kind, str) or kind not in kinds:
            raise ProtocolError(f"{what}: unknown entry {brief(kind)}")
        for name, typ in kinds[kind].items():
            val = w.get(name)
            if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
                raise ProtocolError(f"{what}: {kind} field {name!r} missing or of the wrong type")
    return items


class Stream(Protocol):
    def recv(self, n: int) -> bytes: ...
    def sendall(self, data: bytes) -> None: ...


@dataclass
class Frame:
    op: str
    header: dict[str, Any]
    body: bytes = b""
    fields: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        return self.header[key]


def encode(op: str, body: bytes = b"", **fields: Any) -> bytes:
    """One frame, ready to send."""
    header = {"v": VERSION, "op": op, **fields}
    if body:
        header["len"] = len(body)
    hb = canonical(header)
    if len(hb) > MAX_HEADER:
        raise ProtocolError(f"header of {op} too large ({len(hb)} bytes)")
    return _LEN.pack(len(hb)) + hb + body


def check_header(header: Any, expect: Collection[str] | None = None) -> str:
    """Validate a decoded header against the op table; return the op or raise ProtocolError."""
    if not isinstance(header, dict):
        raise ProtocolError("frame header is not a JSON object")
    if header.get("v") != VERSION:
        raise ProtocolError(f"protocol version {brief(header.get('v'))} not supported (want {VERSION})")
    op = header.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown op {brief(op)}")
    if expect is not None and op not in expect and op != "error":
        raise ProtocolError(f"unexpected op {op!r} (expected {', '.join(sorted(expect))})")
    schema = OPS[op]
    for name, typ in schema.items():
        if name not in header:
            raise ProtocolError(f"{op}: field {name!r} missing")
        val = header[name]
        if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
            raise ProtocolError(f"{op}: field {name!r} has the wrong type")
    for name, typ in _OPTIONAL.get(op, {}).items():
        if name in header and not isinstance(header[name], typ):
            raise ProtocolError(f"{op}: field {name!r} has the wrong type")
    if op == "offer" and not 1 <= len(header["files"]) <= MAX_BATCH:
        raise ProtocolError(f"offer: 1 to {MAX_BATCH} files")
    return op


class FrameStream:
    """Frames over one channel. Not thread-safe: one conversation per channel at a time."""

    def __init__(self, chan: Stream, max_body: int = MAX_BODY) -> None:
        self.chan = chan
        self.max_body = max_body
        self._buf = bytearray()

    def send(self, op: str, body: bytes = b"", **fields: Any) -> None:
        self.chan.sendall(encode(op, body, **fields))

    def send_raw(self, data: bytes | memoryview) -> None:
        self.chan.sendall(data)

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            chunk = self.chan.recv(max(n - len(self._buf), 65536))
            if not chunk:
                raise EOFError("channel closed")
            self._buf += chunk

    def recv_exact(self, n: int) -> bytes:
        self._fill(n)
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    def recv_some(self, limit: int) -> bytes:
        """Up to ``limit`` raw bytes (at least one); EOFError when the channel closed."""
        if self._buf:
            out = bytes(self._buf[:limit])
            del self._buf[:limit]
            return out
        chunk = self.chan.recv(limit)
        if not chunk:
            raise EOFError("channel closed")
        return chunk

    def recv(self, expect: Collection[str] | None = None) -> Frame:
        """The next frame; ProtocolError if it is bad, EOFError if the channel closed.

        An ``error`` frame from the peer is raised as ProtocolError carrying its reason.
        """
        self._fill(4)
        (hlen,) = _LEN.unpack(self._buf[:4])
        if hlen == 0 or hlen > MAX_HEADER:
            raise ProtocolError(f"bad frame: header length {hlen}")
        self._fill(4 + hlen)
        raw = bytes(self._buf[4 : 4 + hlen])
        del self._buf[: 4 + hlen]
        try:
            header = json.loads(raw)
        except RecursionError:
            raise ProtocolError("bad frame: header is not JSON (too deeply nested)") from None
        except ValueError:  # UnicodeDecodeError included
            raise ProtocolError("bad frame: header is not JSON") from None
        op = check_header(header, expect)
        body = b""
        blen = header.get("len", 0)
        if not isinstance(blen, int) or isinstance(blen, bool) or blen < 0 or blen > self.max_body:
            raise ProtocolError(f"bad frame: body length {brief(blen)}")
        if blen:
            body = self.recv_exact(blen)
        if op == "error":
            raise ProtocolError(f"peer said: {header['reason'][:200]}")
        return Frame(op, header, body)


T = TypeVar("T")


def cut(items: Iterable[T], cost: Callable[[T], int], max_count: int, max_bytes: int) -> Iterator[list[T]]:
    """``items`` in order, cut into runs of at most ``max_count`` items whose ``cost`` adds up
    to at most ``max_bytes`` (an item that alone costs more goes alone): how offers, notices
    and gossip batches are cut into frames. Pure; ``items`` is not changed."""
    chunk: list[T] = []
    used = 0
    for it in items:
        c = cost(it)
        if chunk and (len(chunk) >= max_count or used + c > max_bytes):
            yield chunk
            chunk, used = [], 0
        chunk.append(it)
        used += c
    if chunk:
        yield chunk
