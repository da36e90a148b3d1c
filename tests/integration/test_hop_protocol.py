"""The hop protocol in one process: offer / answers / bytes / stored between two nodes'
real custody layers over a ``socket.socketpair()``.

NodeA sends with ``Custody.send_batch`` (files taken from its real outbox into its spool);
NodeB answers with ``Custody.receive_offer`` on a thread, with its real custody service
(``Custodian``, on its own thread) as the owner, as the agent serves a relay channel. Both
are real node folders made by ``make_net`` (keys, configs, spools, inboxes, signed event
logs that learnt each other's feeds in a real gossip round); NodeC exists so NodeB can
relay to it. Where a test must break the protocol (wrong bytes, a channel cut mid-file) it
plays NodeA by hand with a ``FrameStream``. Every test runs in milliseconds.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import os
import socket
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Any

import pyrage
import pytest

from maildrop import events as E
from maildrop import gossip
from maildrop import lifecycle as L
from maildrop.agent import announce, open_log
from maildrop.config import load_config
from maildrop.custodian import Custodian, Job
from maildrop.errors import ProtocolError
from maildrop.eventlog import EventLog
from maildrop.events import compute_id
from maildrop.keys import load_key
from maildrop.protocol import MAX_BATCH, FrameStream
from maildrop.seal import Envelope, seal_envelope
from maildrop.spool import Spool
from maildrop.transfers import Answer, Custody, Outgoing, offer_chunks
from tests.factories import FeedWriter
from tests.harness import Node, custody_service, wait_until

MAX_FILE = 64 * 1024  # NodeB's max_file_size
POLICY = L.Policy(backoff_base=0.02, backoff_cap=0.1)  # a failed delivery is retried at once
TIMEOUT = 5.0  # no read on either end of a socketpair waits longer


def _node_custody(node: Node, max_file_size: int) -> tuple[EventLog, Custody]:
    """A node's log (its peers' keys pinned, its config facts announced, as the agent does
    at start) and its Custody over its real spool, inbox and failed folders."""
    config = load_config(node.config_path)
    key = load_key(config.key_path)
    elog = open_log(config)
    announce(config, key, elog)
    return elog, Custody(config.node_id, key, elog, Spool(config.spool), config.inbox,
                         config.failed, max_file_size=max_file_size, min_free_space=0)


def _gossip(caller: EventLog, callee: EventLog) -> None:
    """One real gossip round between two logs over a socketpair: afterwards each holds
    every event of the other (the callee answers on a thread, as a channel handler)."""
    x, y = socket.socketpair()
    with x, y:
        x.settimeout(TIMEOUT)
        y.settimeout(TIMEOUT)
        server = FrameStream(y)

        def answer() -> None:
            f = server.recv(expect={"fingerprint"})
            same = f["fp"] == callee.fingerprint()
            gossip.answer_fingerprint(server, f, callee)
            if not same:
                gossip.answer_gossip(server, server.recv(expect={"gossip"}), callee)

        t = threading.Thread(target=answer, daemon=True)
        t.start()
        gossip.call(FrameStream(x), caller)
        t.join(TIMEOUT)
    assert caller.fingerprint() == callee.fingerprint()


def _serve(custody: Custody, owner: Custodian, sock: socket.socket, errors: list[BaseException]) -> None:
    """NodeB's side of one relay channel, as the agent's channel handler (``handle_channel``)
    serves offers: one ``receive_offer`` per offer until the channel ends or an offer is cut
    short; a bad frame is answered ``error``."""
    stream = FrameStream(sock)
    try:
        while True:
            try:
                frame = stream.recv(expect={"offer"})
                custody.receive_offer("NodeA", stream, frame, owner)
            except (TimeoutError, EOFError, OSError):
                return  # the sender went away (or cut an offer short): the channel ends
            except ProtocolError as exc:
                stream.send("error", reason=str(exc)[:200])
                return
    except BaseException as exc:  # surfaced by the test, not lost on the thread
        errors.append(exc)


def _offer(stream: FrameStream, items: Sequence[Outgoing]) -> list[dict[str, Any]]:
    """Send an offer of ``items`` by hand (as ``send_batch`` words it); return the answers."""
    stream.send("offer", files=[{"transfer": it.transfer, "queued": it.queued.to_dict(),
                                 "route": it.route} for it in items])
    return stream.recv(expect={"answers"})["answers"]


def _words(reports: list[tuple[str, Answer]]) -> list[tuple[str, dict[str, Any]]]:
    return [(tid, ans.wire()) for tid, ans in reports]


ACCEPT = {"a": "accept", "offset": 0}
STORED = {"a": "stored"}
HAVE = {"a": "have"}


@dataclass
class Hop:
    """NodeA (sender) and NodeB (receiver, with its custody service running)."""

    a: Node
    b: Node
    sender: Custody
    receiver: Custody
    custodian: Custodian
    offers: list[Job]
    logs: tuple[EventLog, EventLog]

    def take(self, dest: str, files: dict[str, bytes]) -> list[str]:
        """Drop ``files`` into NodeA's outbox for ``dest`` and take them in one batch; the
        transfer ids in the order of ``files``."""
        tids = self.sender.take_batch([(self.a.drop(dest, name, data), dest) for name, data in files.items()])
        by_name = {self.sender.name_of(self.sender.queued_event(t)): t for t in tids}
        assert sorted(by_name) == sorted(files)
        return [by_name[name] for name in files]

    def sync(self) -> None:
        """Gossip A <-> B: B learns A's latest facts (its queued events) before an offer."""
        _gossip(*self.logs)

    def items(self, tids: Sequence[str]) -> list[Outgoing]:
        return [self.sender.outgoing(t, ()) for t in tids]

    @contextlib.contextmanager
    def channel(self) -> Iterator[FrameStream]:
        """A new socketpair: B's end served on a thread (``_serve``), A's end yielded as a
        FrameStream. On exit A's end is closed and B's thread has finished."""
        mine, theirs = socket.socketpair()
        mine.settimeout(TIMEOUT)
        theirs.settimeout(TIMEOUT)
        errors: list[BaseException] = []
        t = threading.Thread(target=_serve, args=(self.receiver, self.custodian, theirs, errors),
                             name="serve-NodeB", daemon=True)
        t.start()
        try:
            yield FrameStream(mine)
        finally:
            mine.close()
            t.join(TIMEOUT)
            theirs.close()
        assert not t.is_alive(), "NodeB's channel handler did not finish"
        assert errors == []

    def send(self, tids: Sequence[str]) -> list[tuple[str, Answer]]:
        """One offer of ``tids`` with the real sender; every ``report`` call, in order."""
        reports: list[tuple[str, Answer]] = []
        with self.channel() as stream:
            self.sender.send_batch("NodeB", stream, self.items(tids),
                                   lambda tid, ans: reports.append((tid, ans)))
        return reports

    def sealed(self, tid: str) -> bytes:
        """NodeA's spool copy of ``tid``: the age ciphertext every holder stores and sends."""
        return self.sender.spool.data(tid).read_bytes()

    def spool_of(self, tid: str) -> set[str]:
        """B's spool entries of ``tid`` besides a meta (``.data`` whole, ``.part`` arriving)."""
        return {p.suffix for p in self.receiver.spool.folder.iterdir()
                if p.name.startswith(tid) and p.suffix != ".json"}

    def added(self, before: int) -> list[dict[str, Any]]:
        """B's transfer facts (its fact store) kept since it had ``before`` of them."""
        return self.b.facts()[before:]


@pytest.fixture
def hop(make_net) -> Iterator[Hop]:
    net = make_net(["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeB", "NodeC")], start=False)
    a_log, sender = _node_custody(net["NodeA"], 2**30)
    b_log, receiver = _node_custody(net["NodeB"], MAX_FILE)
    c_log, _ = _node_custody(net["NodeC"], 2**30)
    try:
        _gossip(c_log, b_log)  # B knows C (a destination it relays to) ...
        _gossip(a_log, b_log)  # ... and A's key, as it must before it takes A's offers
    finally:
        c_log.close()
    try:
        with custody_service(receiver, b_log, POLICY) as (custodian, offers):
            yield Hop(net["NodeA"], net["NodeB"], sender, receiver, custodian, offers, (a_log, b_log))
    finally:
        a_log.close()
        b_log.close()


def test_a_batch_of_small_files_is_stored_at_a_relay_with_one_append(hop):
    """Eight files for NodeC in one offer: eight accepts from 0, the bytes back to back,
    one ``stored`` with a result per file. NodeB holds each whole copy; the offer brought
    the queued facts (one ingest) and NodeB records its custody of all of them in one
    append (one timestamp), as standalone facts (never in a feed)."""
    files = {f"s{i}.txt": os.urandom(200 + i) for i in range(8)}
    tids = hop.take("NodeC", files)
    hop.sync()  # gossip brings B no transfer fact: the queued ones come with the offer
    before = len(hop.b.facts())
    t0 = time.perf_counter()
    reports = hop.send(tids)
    elapsed = time.perf_counter() - t0
    print(f"\nhop protocol: {len(tids)} files offered, sent and stored over a socketpair "
          f"in {elapsed * 1000:.1f} ms")
    assert _words(reports) == [(t, ACCEPT) for t in tids] + [(t, STORED) for t in tids]
    for tid, data in zip(tids, files.values(), strict=True):
        assert hop.spool_of(tid) == {".data"}
        held = hop.receiver.spool.data(tid).read_bytes()
        assert held == hop.sealed(tid) and held.startswith(b"age-encryption.org/v1\n")
        assert data not in held  # the relay holds the ciphertext only
    added = hop.added(before)
    assert [(e["origin"], e["type"], e["data"]["transfer"]) for e in added] == \
        [("NodeA", E.TRANSFER_QUEUED, t) for t in tids] + [("NodeB", E.TRANSFER_RELAYED, t) for t in tids]
    custody = added[len(tids):]
    assert [e["data"]["from"] for e in custody] == ["NodeA"] * len(tids)
    assert len({e["ts"] for e in custody}) == 1  # one append_own: one transaction
    assert {(e["seq"], e["prev"]) for e in added} == {(0, None)}
    held = hop.custodian.snapshot()
    assert {t: (held[t].role, held[t].passed) for t in tids} == {t: (L.RELAY, ("NodeA",)) for t in tids}
    assert all(held[t].phase != L.RECEIVING for t in tids)
    assert elapsed < 1.0, f"one small batch over a socketpair took {elapsed:.3f} s"


def test_a_batch_for_the_receiver_lands_in_its_inbox_with_one_receipt_each(hop):
    """Files for NodeB itself: delivered into ``inbox/NodeA/`` before "stored" is sent. The
    offer brought their queued events (one ingest), the delivery one receipt each (one
    append), and no copy is left in the spool."""
    files = {f"d{i}.txt": os.urandom(300 + i) for i in range(5)}
    tids = hop.take("NodeB", files)
    before = len(hop.b.facts())
    reports = hop.send(tids)
    assert _words(reports) == [(t, ACCEPT) for t in tids] + [(t, STORED) for t in tids]
    inbox = hop.b.inbox / "NodeA"
    assert {p.name: p.read_bytes() for p in inbox.iterdir()} == files
    added = hop.added(before)
    assert [(e["origin"], e["type"], e["data"]["transfer"]) for e in added] == \
        [("NodeA", E.TRANSFER_QUEUED, t) for t in tids] + [("NodeB", E.TRANSFER_DELIVERED, t) for t in tids]
    receipts = added[len(tids):]
    # A sealed transfer's receipt names the bytes, not the file (its name stays sealed).
    assert [e["data"] for e in receipts] == \
        [{"transfer": t, "sha256": hop.sender.queued_event(t).data["sha256"]} for t in tids]
    assert len({e["ts"] for e in receipts}) == 1  # the batch's receipts: one append
    assert all(hop.spool_of(t) == set() for t in tids)
    assert not set(tids) & set(hop.custodian.snapshot())  # ended: the service forgot them


@pytest.mark.parametrize("dest", ["NodeC", "NodeB"], ids=["held-at-a-relay", "delivered"])
def test_offering_again_what_the_receiver_holds_or_delivered_answers_have(hop, dest):
    files = {f"h{i}.txt": b"have %d" % i for i in range(3)}
    tids = hop.take(dest, files)
    assert _words(hop.send(tids))[-3:] == [(t, STORED) for t in tids]
    before = len(hop.b.facts())
    assert _words(hop.send(tids)) == [(t, HAVE) for t in tids]  # no bytes, no "stored"
    assert hop.added(before) == []


def test_a_file_over_the_receivers_limit_is_refused_and_the_rest_of_the_batch_goes(hop):
    big, small = hop.take("NodeC", {"big.bin": b"x" * (MAX_FILE + 1), "small.txt": b"small"})
    reports = hop.send([big, small])
    sealed_size = hop.sender.queued_event(big).data["size"]  # the limit is on what is stored
    assert sealed_size > MAX_FILE + 1
    assert _words(reports) == [
        (big, {"a": "refuse", "reason": "too-large",
               "detail": f"{sealed_size} bytes is over the limit of {MAX_FILE}"}),
        (small, ACCEPT),
        (small, STORED),  # "stored" answers for the accepted files only
    ]
    assert hop.spool_of(big) == set()
    assert hop.receiver.spool.data(small).read_bytes() == hop.sealed(small)
    assert big not in hop.custodian.snapshot()


def test_forged_and_unknown_queued_events_are_refused_file_by_file(hop):
    """One offer: a good file; one whose queued event was edited (its id no longer matches:
    bad-offer); one edited and re-hashed (its id matches, NodeA's signature does not:
    bad-signature); one from an origin NodeB has no key for (unknown-origin). Only the good
    one is accepted, and no forged fact joins NodeB's log."""
    good, edited, resealed = hop.take("NodeC", {"good.txt": b"good", "e.txt": b"eee", "r.txt": b"rrr"})
    items = hop.items([good, edited, resealed])
    evil = items[0].queued.data["sealed"]  # another transfer's envelope: a well-formed lie
    ev = items[1].queued
    items[1] = replace(items[1], queued=replace(ev, data={**ev.data, "sealed": evil}))
    ev = items[2].queued
    body = {**ev.body(), "data": {**ev.data, "sealed": evil}}
    items[2] = replace(items[2], queued=replace(ev, data=body["data"], id=compute_id(body)))
    x = FeedWriter("NodeX")
    x.configured()
    stranger = "f" * 32
    items.append(Outgoing(stranger, x.add(E.TRANSFER_QUEUED, {
        "transfer": stranger, "destination": "NodeC", "name": "x.txt", "size": 1,
        "sha256": "0" * 64}), ["NodeX", "NodeA"]))
    reports: list[tuple[str, Answer]] = []
    with hop.channel() as stream:
        hop.sender.send_batch("NodeB", stream, items, lambda tid, ans: reports.append((tid, ans)))
    assert _words(reports) == [
        (good, ACCEPT),
        (edited, {"a": "refuse", "reason": "bad-offer",
                  "detail": "id does not match content (tampered or corrupted)"}),
        (resealed, {"a": "refuse", "reason": "bad-signature", "detail": "queued event not signed by NodeA"}),
        (stranger, {"a": "refuse", "reason": "unknown-origin", "detail": "no key known for NodeX yet"}),
        (good, STORED),
    ]
    assert [hop.spool_of(t) for t in (good, edited, resealed, stranger)] == [{".data"}, set(), set(), set()]
    events = hop.b.events()
    assert not [e for e in events if e["origin"] == "NodeX"
                or (e["data"].get("sealed") == evil and e["data"]["transfer"] != good)]


def test_an_offer_of_more_than_max_batch_files_is_refused_whole(hop):
    """65 files in one offer break the protocol: NodeB answers ``error`` and ends the
    channel before it looks at any file (an offer by hand: 65 sealed queued events would not
    even fit one header). Split as a hop worker splits them (``offer_chunks``: at most
    MAX_BATCH files and OFFER_BUDGET bytes of header each), offers on one channel carry
    them all."""
    files = {f"m{i:02d}.txt": b"%d" % i for i in range(MAX_BATCH + 1)}
    tids = hop.take("NodeC", files)
    with hop.channel() as stream:
        stream.send("offer", files=[{"transfer": t, "queued": {}, "route": ["NodeA"]} for t in tids])
        with pytest.raises(ProtocolError, match=rf"^peer said: offer: 1 to {MAX_BATCH} files$"):
            stream.recv(expect={"answers"})
    assert [t for t in tids if hop.spool_of(t)] == []
    chunks = list(offer_chunks(hop.items(tids)))
    assert len(chunks) >= 2 and all(len(c) <= MAX_BATCH for c in chunks)
    assert [t for c in chunks for t in (it.transfer for it in c)] == tids
    reports: list[tuple[str, Answer]] = []
    with hop.channel() as stream:
        for chunk in chunks:
            hop.sender.send_batch("NodeB", stream, chunk, lambda tid, ans: reports.append((tid, ans)))
    assert _words(reports) == [w for c in chunks for w in
                               [(it.transfer, ACCEPT) for it in c] + [(it.transfer, STORED) for it in c]]
    assert [hop.receiver.spool.data(t).read_bytes() for t in tids] == [hop.sealed(t) for t in tids]


def test_bytes_that_do_not_match_the_signed_hash_are_refused_after_the_batch(hop):
    """A sender (by hand) streams the right length but the wrong bytes for the first file
    of two: its result is a hash-mismatch refusal and its part is gone; the second is stored
    and is the only custody NodeB records."""
    bad, good = hop.take("NodeC", {"bad.bin": b"B" * 1000, "good.bin": b"G" * 1000})
    hop.sync()
    before = len(hop.b.facts())
    with hop.channel() as stream:
        assert _offer(stream, hop.items([bad, good])) == [ACCEPT, ACCEPT]
        stream.send_raw(b"X" * len(hop.sealed(bad)))
        stream.send_raw(hop.sealed(good))
        results = stream.recv(expect={"stored"})["results"]
    assert results[0] == {"a": "refuse", "reason": "hash-mismatch",
                          "detail": "bytes do not match the sha256 of the queued event"}
    # The good file's word carries B's signed custody inline, for the sender.
    assert results[1]["a"] == "stored"
    assert [(f["origin"], f["type"], f["data"]) for f in results[1]["facts"]] == [
        ("NodeB", E.TRANSFER_RELAYED, {"transfer": good, "from": "NodeA"})]
    assert hop.spool_of(bad) == set()
    assert hop.receiver.spool.data(good).read_bytes() == hop.sealed(good)
    assert [(e["type"], e["data"]["transfer"]) for e in hop.added(before)] == [
        (E.TRANSFER_QUEUED, bad), (E.TRANSFER_QUEUED, good), (E.TRANSFER_RELAYED, good)]
    held = hop.custodian.snapshot()
    assert bad not in held and good in held


def test_a_batch_cut_off_mid_file_resumes_from_the_parts_kept(hop):
    """The channel closes after the first file of two and 15,000 bytes of the second:
    nothing is committed, both parts stay. The next offer, on a new channel, is accepted
    from each part's size (the first: all of it, so no byte is sent again) and completes."""
    t1, t2 = hop.take("NodeC", {"one.bin": os.urandom(3000), "two.bin": os.urandom(40000)})
    one, two = hop.sealed(t1), hop.sealed(t2)  # what moves: the ciphertext, resumed as such
    hop.sync()
    before = len(hop.b.facts())
    cut = 15000
    with hop.channel() as stream:
        assert _offer(stream, hop.items([t1, t2])) == [ACCEPT, ACCEPT]
        stream.send_raw(one)
        stream.send_raw(two[:cut])
    assert hop.receiver.spool.part(t1).read_bytes() == one
    assert hop.receiver.spool.part(t2).read_bytes() == two[:cut]
    assert (hop.spool_of(t1), hop.spool_of(t2)) == ({".part"}, {".part"})
    queued = [(E.TRANSFER_QUEUED, t1), (E.TRANSFER_QUEUED, t2)]
    assert [(e["type"], e["data"]["transfer"]) for e in hop.added(before)] == queued  # no custody
    assert not {t1, t2} & set(hop.custodian.snapshot())
    reports = hop.send([t1, t2])
    assert _words(reports) == [(t1, {"a": "accept", "offset": len(one)}), (t2, {"a": "accept", "offset": cut}),
                               (t1, STORED), (t2, STORED)]
    assert hop.receiver.spool.data(t1).read_bytes() == one
    assert hop.receiver.spool.data(t2).read_bytes() == two
    assert (hop.spool_of(t1), hop.spool_of(t2)) == ({".data"}, {".data"})
    added = hop.added(before)[len(queued):]
    assert [(e["type"], e["data"]["transfer"]) for e in added] == [(E.TRANSFER_RELAYED, t1), (E.TRANSFER_RELAYED, t2)]
    assert len({e["ts"] for e in added}) == 1


def test_a_resume_onto_a_bad_part_is_cut_back_once_then_started_afresh(hop):
    """A part whose first 5,000 bytes are wrong (a sender, by hand, sent garbage, then the
    channel closed). The honest resume from 5,000 fails its hash: the part is cut back to
    5,000 (those bytes may be honest). The next resume fails again: the part is dropped.
    The offer after that starts from 0 and is stored."""
    (tid,) = hop.take("NodeC", {"resumed.bin": os.urandom(12000)})
    data = hop.sealed(tid)
    with hop.channel() as stream:
        assert _offer(stream, hop.items([tid])) == [ACCEPT]
        stream.send_raw(b"X" * 5000)
    assert hop.receiver.spool.part_size(tid) == 5000
    mismatch = {"a": "refuse", "reason": "hash-mismatch",
                "detail": "bytes do not match the sha256 of the queued event"}
    from_cut = {"a": "accept", "offset": 5000}
    assert _words(hop.send([tid])) == [(tid, from_cut), (tid, mismatch)]
    assert hop.receiver.spool.part(tid).read_bytes() == b"X" * 5000  # cut back to the resume point
    assert _words(hop.send([tid])) == [(tid, from_cut), (tid, mismatch)]
    assert hop.spool_of(tid) == set()  # a second failure: nothing of it is kept
    assert _words(hop.send([tid])) == [(tid, ACCEPT), (tid, STORED)]
    assert hop.receiver.spool.data(tid).read_bytes() == data


def test_a_sender_that_stops_mid_file_leaves_a_part_and_no_fact(hop):
    """While the bytes arrive, the service shows the transfer receiving from NodeA; when the
    channel closes mid-file the handler tells it (``receive_failed``): nothing is committed,
    no fact of custody is written (only the offered queued fact is kept), the part is kept,
    and the service no longer has the transfer."""
    (tid,) = hop.take("NodeC", {"half.bin": os.urandom(20000)})
    data = hop.sealed(tid)
    hop.sync()
    log_before = hop.b.events()
    with hop.channel() as stream:
        assert _offer(stream, hop.items([tid])) == [ACCEPT]
        stream.send_raw(data[:5000])
        wait_until(lambda: hop.receiver.snapshot() == [
            {"transfer": tid, "direction": "in", "peer": "NodeA", "size": len(data), "bytes": 5000}],
            TIMEOUT, "NodeB to have the first 5000 bytes")
        arriving = hop.custodian.snapshot()[tid]
        assert (arriving.phase, arriving.hop, arriving.offset, arriving.role) == \
            (L.RECEIVING, "NodeA", 0, L.RELAY)
    assert hop.receiver.spool.part(tid).read_bytes() == data[:5000]
    assert hop.spool_of(tid) == {".part"}
    assert [(e["type"], e["data"]["transfer"]) for e in hop.b.events() if e not in log_before] == [
        (E.TRANSFER_QUEUED, tid)]
    assert tid not in hop.custodian.snapshot()
    assert hop.receiver.snapshot() == []  # no progress left behind


def test_a_destination_that_cannot_deliver_answers_pending_with_the_reason_and_heals(hop, tmp_path):
    """``inbox/NodeA`` at NodeB is a symlink: the file is stored (NodeB keeps custody) but
    its result is "pending" with the reason, and so is the answer to the next offer. Once the
    symlink is gone NodeB delivers it by itself, and then answers "have"."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    folder = hop.b.inbox / "NodeA"
    folder.parent.mkdir(parents=True, exist_ok=True)
    folder.symlink_to(elsewhere)
    (tid,) = hop.take("NodeB", {"late.txt": b"late"})
    pending = {"a": "pending",
               "detail": f"delivery into inbox/NodeA/ failed: [Errno {errno.ELOOP}] {folder} is a symlink"}
    assert _words(hop.send([tid])) == [(tid, ACCEPT), (tid, pending)]
    assert hop.receiver.spool.data(tid).read_bytes() == hop.sealed(tid)
    assert hop.receiver.spool.opened(tid).read_bytes() == b"late"  # opened before the commit
    assert list(elsewhere.iterdir()) == []  # never written through the symlink
    assert _words(hop.send([tid])) == [(tid, pending)]  # not "have": the reason, again
    assert not hop.b.events(E.TRANSFER_DELIVERED)
    folder.unlink()
    wait_until(lambda: hop.b.events(E.TRANSFER_DELIVERED), TIMEOUT, "NodeB to deliver by itself")
    assert (folder / "late.txt").read_bytes() == b"late"
    assert hop.spool_of(tid) == set()
    assert _words(hop.send([tid])) == [(tid, HAVE)]


# -- sealed files at their destination (docs/encryption.md) -----------------------------------

def test_a_sealed_file_cut_off_at_its_destination_resumes_on_ciphertext_and_is_opened_once(hop):
    """The channel closes mid-file for NodeB itself: the part is ciphertext and no plaintext
    is anywhere in NodeB's spool. The resume sends only the rest of the ciphertext; NodeB
    opens the whole copy before its commit and delivers the plaintext once, under its name."""
    data = b"PLAIN-" + os.urandom(30000)
    (tid,) = hop.take("NodeB", {"resumed.txt": data})
    sealed = hop.sealed(tid)
    cut = 10000
    with hop.channel() as stream:
        assert _offer(stream, hop.items([tid])) == [ACCEPT]
        stream.send_raw(sealed[:cut])
    assert hop.receiver.spool.part(tid).read_bytes() == sealed[:cut]
    assert not [p for p in hop.receiver.spool.folder.iterdir() if b"PLAIN-" in p.read_bytes()]
    assert _words(hop.send([tid])) == [(tid, {"a": "accept", "offset": cut}), (tid, STORED)]
    assert [(p.name, p.read_bytes()) for p in (hop.b.inbox / "NodeA").iterdir()] == [("resumed.txt", data)]
    assert len(hop.b.events(E.TRANSFER_DELIVERED)) == 1
    assert hop.spool_of(tid) == set()


def _queue_by_hand(hop: Hop, data: dict[str, Any], body: bytes) -> str:
    """Append a ``transfer.queued`` of NodeA with ``data`` (its own signed fact) and put
    ``body`` in A's spool as that transfer's copy; its transfer id."""
    tid = data["transfer"]
    fd = hop.sender.spool.create(hop.sender.spool.data(tid))
    try:
        os.write(fd, body)
    finally:
        os.close(fd)
    hop.sender.append([(E.TRANSFER_QUEUED, {**data, "size": len(body),
                                            "sha256": hashlib.sha256(body).hexdigest()})])
    return tid


def test_a_plaintext_transfer_queued_before_the_upgrade_is_still_delivered_as_before(hop):
    """A queued event of the old shape (``data.name``, the bytes in plaintext), as a node of
    the previous version wrote it: NodeB delivers those bytes under that name, and its
    receipt keeps the name, as before."""
    body = b"queued before sealing\n"
    tid = _queue_by_hand(hop, {"transfer": os.urandom(16).hex(), "destination": "NodeB",
                               "name": "old.txt"}, body)
    assert "sealed" not in hop.sender.queued_event(tid).data
    assert _words(hop.send([tid])) == [(tid, ACCEPT), (tid, STORED)]
    assert (hop.b.inbox / "NodeA" / "old.txt").read_bytes() == body
    [receipt] = hop.b.events(E.TRANSFER_DELIVERED)
    assert receipt["data"] == {"transfer": tid, "sha256": hashlib.sha256(body).hexdigest(), "name": "old.txt"}


def test_a_sealed_file_that_does_not_decrypt_is_refused_for_good_and_nothing_is_delivered(hop):
    """Two lies, each refused ``undecryptable`` (a permanent reason): an envelope NodeB
    cannot open is refused before any byte moves; a good envelope with bytes that are not
    its ciphertext (another age file, of the right signed size and hash) is refused after
    the bytes, before the commit. No half-written file reaches the inbox, no receipt is
    written, nothing is kept."""
    other = pyrage.x25519.Identity.generate().to_public()
    b_key, a_key = hop.sender.recipient_key("NodeB"), hop.sender.key.public_line
    env = Envelope("lie.txt", "NodeA", 5, hashlib.sha256(b"hello").hexdigest())
    stranger_env = base64.b64encode(pyrage.encrypt(env.to_bytes(), [other])).decode()
    unopenable = _queue_by_hand(hop, {"transfer": os.urandom(16).hex(), "destination": "NodeB",
                                      "sealed": stranger_env}, pyrage.encrypt(b"hello", [other]))
    wrong_bytes = _queue_by_hand(hop, {"transfer": os.urandom(16).hex(), "destination": "NodeB",
                                       "sealed": seal_envelope(env, [b_key, a_key])},
                                 pyrage.encrypt(b"hello", [other]))
    reports = _words(hop.send([unopenable, wrong_bytes]))
    assert [(t, w["a"], w.get("reason")) for t, w in reports] == [
        (unopenable, "refuse", "undecryptable"), (wrong_bytes, "accept", None),
        (wrong_bytes, "refuse", "undecryptable")]
    assert "does not decrypt" in reports[2][1]["detail"]
    assert "undecryptable" in L.PERMANENT
    assert not (hop.b.inbox / "NodeA").exists() or list((hop.b.inbox / "NodeA").iterdir()) == []
    assert hop.b.events(E.TRANSFER_DELIVERED) == []
    assert hop.spool_of(unopenable) == hop.spool_of(wrong_bytes) == set()
    assert not {unopenable, wrong_bytes} & set(hop.custodian.snapshot())
