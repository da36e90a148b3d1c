"""Issue 9, wire findings: hostile input on the wire is refused with a reason, the agent stays up.

The test plays NodeX, a peer that NodeA's config lists, with a real SSH client, and sends
events and frames NodeX signed itself but that break the rules: a timestamp that is no date
(F6), control characters in free text (F14), an endless address (F5), JSON nested deeper
than a parser's stack and a queued event over the event size limit (F15).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import struct
from typing import Any

import pytest

from maildrop import events as E
from maildrop.errors import ProtocolError
from maildrop.events import MAX_EVENT_BYTES, compute_id, format_ts
from maildrop.keys import NodeKey, generate_key
from maildrop.protocol import MAX_HEADER, FrameStream
from tests.factories import T0, FeedWriter
from tests.harness import Word, introduce_outsider, start_with_outsider, wait_until


class Peer:
    """NodeX as the test plays it: its feed, its SSH client, and the wire calls it makes."""

    def __init__(self, a: Any, client: Any, x: FeedWriter) -> None:
        self.a, self.client, self.x = a, client, x

    def stream(self) -> tuple[Any, FrameStream]:
        chan = self.client.open_channel()
        chan.settimeout(20)
        return chan, FrameStream(chan)

    def gossip_lines(self, lines: list[bytes]) -> dict[str, int]:
        """One gossip round that sends exactly ``lines`` as one batch; A's ``gossip.done``."""
        chan, s = self.stream()
        try:
            s.send("fingerprint", fp="0" * 32)
            assert not s.recv(expect={"fingerprint.reply"})["same"]
            s.send("gossip", vv={})
            while s.recv(expect={"events"})["more"]:
                pass
            s.send("events", b"".join(line + b"\n" for line in lines), more=False,
                   count=len(lines))
            done = s.recv(expect={"gossip.done"})
            return {"accepted": done["accepted"], "rejected": done["rejected"]}
        finally:
            chan.close()

    def offer(self, queued: dict[str, Any]) -> Any:
        """Offer ``queued`` (a raw dict) and return A's first reply."""
        chan, s = self.stream()
        try:
            s.send("offer", files=[{"transfer": queued["data"]["transfer"], "queued": queued,
                                    "route": ["NodeX"]}])
            reply = s.recv(expect={"answers", "refuse"})
            return Word(reply.header) if reply.op == "refuse" else Word(reply["answers"][0])
        finally:
            chan.close()

    def still_answers(self) -> None:
        chan, s = self.stream()
        try:
            s.send("ping")
            assert s.recv().op == "pong"
        finally:
            chan.close()

    def log(self) -> str:
        return self.a.log_path.read_text(errors="replace")

    def assert_healthy(self) -> None:
        """A is up, answers, and no handler crashed (no traceback) on the way."""
        assert self.a.running
        self.still_answers()
        text = self.log()
        assert "handler-crashed" not in text and "Traceback" not in text, text[-3000:]


@pytest.fixture
def peer(make_net, tmp_path):
    xkey = generate_key(tmp_path / "x_key")
    a, client = start_with_outsider(make_net(["NodeA"], [], start=False), "NodeA", xkey)
    yield Peer(a, client, introduce_outsider(a, client, xkey))
    client.close()


def signed(key: NodeKey, origin: str, seq: int, prev: str | None, type_: str,
           data: dict[str, Any], ts: str | None = None) -> dict[str, Any]:
    """A raw event validly signed by ``key``, built by hand so no schema check stops it."""
    body = {"v": 1, "origin": origin, "seq": seq, "prev": prev, "ts": ts or format_ts(T0),
            "type": type_, "data": data}
    eid = compute_id(body)
    return dict(body, id=eid, sig=base64.b64encode(key.sign(eid.encode())).decode())


def line(raw: dict[str, Any]) -> bytes:
    return json.dumps(raw, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def queued_data(**over: Any) -> dict[str, Any]:
    data = {"transfer": os.urandom(16).hex(), "destination": "NodeA", "name": "f.txt",
            "size": 5, "sha256": hashlib.sha256(b"hello").hexdigest()}
    data.update(over)
    return data


def stored_lines(a: Any) -> bytes:
    return (a.dir / "state" / "events.jsonl").read_bytes()


# ---------------------------------------------------------------------------------- F6

def test_f6_offer_with_a_ts_that_is_no_date_is_refused_as_bad_offer(peer):
    x = peer.x
    nxt, prev = len(x.events) + 1, x.events[-1].id
    for ts in ("2026-99-99T99:99:99.999Z", "2026-02-30T12:00:00.000Z", "0001-01-01T00:00:00.000Z"):
        raw = signed(x.key, "NodeX", nxt, prev, E.TRANSFER_QUEUED, queued_data(), ts=ts)
        reply = peer.offer(raw)
        assert (reply.op, reply["reason"]) == ("refuse", "bad-offer"), ts
        assert "bad ts" in reply["detail"], reply["detail"]
    assert peer.a.spool_files() == []  # nothing opened, nothing kept
    assert b"99:99:99" not in stored_lines(peer.a)
    peer.assert_healthy()


# ---------------------------------------------------------------------------------- F14

def test_f14_control_characters_in_free_text_are_refused(peer):
    a, x = peer.a, peer.x
    nxt, prev = len(x.events) + 1, x.events[-1].id
    evil = [
        signed(x.key, "NodeX", nxt, prev, E.NODE_CONFIGURED, {
            "id": "NodeX", "display_name": "X\x1b[2J\x1b]0;pwned\x07", "address": "127.0.0.1:1",
            "key": x.key.public_line}),
        signed(x.key, "NodeX", nxt, prev, E.NODE_CONFIGURED, {
            "id": "NodeX", "display_name": "X\r\u202eevil", "address": "127.0.0.1:1",
            "key": x.key.public_line}),
        signed(x.key, "NodeX", nxt, prev, E.TRANSFER_FAILED, {
            "transfer": "a" * 32, "reason": "gone\rtransfer.delivered transfer=" + "a" * 32}),
        signed(x.key, "NodeX", nxt, prev, E.TRANSFER_FAILED, {
            "transfer": "a" * 32, "reason": "bidi \u2066override\u2069 and \u2028 line sep"}),
    ]
    for e in evil:  # one round each: a first one let in would make the others a fork
        assert peer.gossip_lines([line(e)]) == {"accepted": 0, "rejected": 1}, e["data"]
    wait_until(lambda: peer.log().count("gossip.event.invalid") >= len(evil), 10, "the refusals")
    stored = stored_lines(a)
    for bad in (b"\x1b", b"\r", "\u202e".encode(), "\u2066".encode(), "\u2028".encode()):
        assert bad not in stored
    out = a.cli("events", check=True).stdout + a.cli("status", check=True).stdout
    assert "\x1b" not in out and "\r" not in out
    # An ordinary reason with spaces, from the same peer, still goes in.
    ok = signed(x.key, "NodeX", nxt, prev, E.TRANSFER_FAILED, {
        "transfer": "a" * 32, "reason": "not delivered within 21600 s (disk full)"})
    assert peer.gossip_lines([line(ok)]) == {"accepted": 1, "rejected": 0}
    peer.assert_healthy()


# ---------------------------------------------------------------------------------- F5

def test_f5_an_endless_address_is_refused(peer):
    x = peer.x
    nxt, prev = len(x.events) + 1, x.events[-1].id
    host = ".".join(["a" * 60] * 150)  # 9149 characters: fits an event, not a host name
    long_ = signed(x.key, "NodeX", nxt, prev, E.NODE_CONFIGURED, {
        "id": "NodeX", "display_name": "NodeX", "address": f"{host}:22", "key": x.key.public_line})
    label = signed(x.key, "NodeX", nxt, prev, E.NODE_CONFIGURED, {
        "id": "NodeX", "display_name": "NodeX", "address": f"{'b' * 64}.example:22",
        "key": x.key.public_line})
    assert len(line(long_)) < MAX_EVENT_BYTES
    for e in (long_, label):  # one round each: a first one let in would make the other a fork
        assert peer.gossip_lines([line(e)]) == {"accepted": 0, "rejected": 1}, e["data"]["address"][:80]
    assert host.encode() not in stored_lines(peer.a)
    assert {n["address"] for n in peer.a.status()["nodes"] if n["id"] == "NodeX"} == {"127.0.0.1:1"}
    peer.assert_healthy()


# ---------------------------------------------------------------------------------- F15

def test_f15_a_deeply_nested_gossip_line_is_one_invalid_event(peer):
    x = peer.x
    nested = b"[" * 8_000 + b"]" * 8_000  # under the event size limit, over the stack
    nested_obj = b'{"v":1,"data":' * 1_000 + b"1" + b"}" * 1_000
    assert len(nested) < MAX_EVENT_BYTES and len(nested_obj) < MAX_EVENT_BYTES
    good = x.link("NodeQ")  # the batch's good event must not be dropped with the bad lines
    got = peer.gossip_lines([nested, good.to_line().rstrip(b"\n"), nested_obj])
    assert got == {"accepted": 1, "rejected": 2}
    assert good.id.encode() in stored_lines(peer.a)
    wait_until(lambda: "too deeply nested" in peer.log(), 10, "the refusal logged")
    peer.assert_healthy()


def test_f15_a_deeply_nested_frame_header_is_a_protocol_error(peer):
    depth = (MAX_HEADER - 40) // 2
    header = b'{"op":"ping","v":1,"x":' + b"[" * depth + b"]" * depth + b"}"
    assert len(header) <= MAX_HEADER
    chan, s = peer.stream()
    try:
        chan.sendall(struct.pack(">I", len(header)) + header)
        with pytest.raises(ProtocolError, match="nested"):
            s.recv()
    finally:
        chan.close()
    wait_until(lambda: "protocol.refused" in peer.log(), 10, "the refusal logged")
    peer.assert_healthy()


def test_f15_an_oversize_queued_event_in_an_offer_is_refused(peer):
    x = peer.x
    raw = signed(x.key, "NodeX", len(x.events) + 1, x.events[-1].id, E.TRANSFER_QUEUED,
                 queued_data())
    raw["data"]["pad"] = "p" * (MAX_EVENT_BYTES + 1)  # fits the 64 KiB header, not an event
    reply = peer.offer(raw)
    assert (reply.op, reply["reason"]) == ("refuse", "bad-offer")
    assert f"larger than {MAX_EVENT_BYTES}" in reply["detail"], reply["detail"]
    nested = signed(x.key, "NodeX", len(x.events) + 1, x.events[-1].id, E.TRANSFER_QUEUED,
                    queued_data())
    inner: Any = "n"
    for _ in range(900):  # deep enough to break a recursive repr, shallow enough to decode
        inner = [inner]
    nested["data"]["name"] = inner
    reply = peer.offer(nested)
    assert (reply.op, reply["reason"]) == ("refuse", "bad-offer")
    assert peer.a.spool_files() == []
    peer.assert_healthy()
