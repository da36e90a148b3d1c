"""Issue 12: replayed and reordered events, replayed offers, and offers that lie about the
size or the hash of their file, each counted, against a real agent over real SSH.

The test plays NodeX, a peer NodeA's config lists. Forged events and forks have their own
tests (test_hostile_fuzz.py, test_security_feeds.py::test_f7_*, test_hostile_peer.py,
test_security_feeds.py::test_f2_*); docs/security.md maps each kind to its test and number.
"""

from __future__ import annotations

import hashlib
import os
import random
from collections import Counter
from typing import Any

import pytest

from maildrop import events as E
from maildrop.events import parse_event
from maildrop.keys import generate_key
from maildrop.protocol import FrameStream
from tests.harness import (
    Word,
    gossip_as_outsider,
    introduce_outsider,
    own_link_observation,
    start_with_outsider,
    wait_until,
)

QUIET_LINK = {"gossip": {"interval": "1s", "link_down_after": "600s"}}
CRASH_MARKS = ("handler-crashed", "Traceback", "conn.crashed", "relay.receive.failed")


@pytest.fixture
def peer(make_net, tmp_path):
    xkey = generate_key(tmp_path / "x_key")
    a, client = start_with_outsider(make_net(["NodeA"], [], QUIET_LINK, start=False), "NodeA", xkey)
    x = introduce_outsider(a, client, xkey)
    yield a, client, x
    client.close()


def _ids(a: Any, origin: str) -> list[tuple[int, str]]:
    return [(e["seq"], e["id"]) for e in a.events() if e["origin"] == origin]


def _healthy(a: Any, client: Any) -> None:
    assert a.running
    chan = client.open_channel()
    chan.settimeout(10)
    try:
        s = FrameStream(chan)
        s.send("fingerprint", fp="0" * 32)
        assert s.recv(expect={"fingerprint.reply"})["same"] is False
    finally:
        chan.close()
    text = a.log_path.read_text(errors="replace")
    assert not any(m in text for m in CRASH_MARKS), text[-3000:]


def _failed_events(x: Any, n: int) -> list[Any]:
    """``n`` more valid events of NodeX's feed (failures of claims nobody holds: facts with
    no side effect on NodeA)."""
    return [x.add(E.TRANSFER_FAILED, {"transfer": os.urandom(16).hex(), "reason": f"gone {i}"})
            for i in range(n)]


# ------------------------------------------------------------------------- replayed

REPLAYS = 5


def _stored(a) -> list[str]:
    """A's log, without its own observations of the link to NodeX (a link whose connection
    the test keeps reopening may be measured, even reported flapping: facts of A's own)."""
    text = (a.dir / "state" / "events.jsonl").read_text()
    return [line for line in text.splitlines() if not own_link_observation(line, "NodeA", "NodeX")]


def test_replayed_events_are_stored_once(peer):
    a, client, x = peer
    fresh = _failed_events(x, 400)
    gossip_as_outsider(client, fresh)
    wait_until(lambda: len(_ids(a, "NodeX")) == len(x.events), 15, "X's 400 events stored")
    stored = _stored(a)
    own_events = [parse_event(e) for e in a.events() if e["origin"] == "NodeA"]
    replayed = 0
    for _ in range(REPLAYS):  # X's whole feed again, and A's own events back to it, shuffled
        batch = list(x.events) + own_events
        random.shuffle(batch)
        for i in range(0, len(batch), 2000):
            stats = gossip_as_outsider(client, batch[i:i + 2000])
            assert stats.sent == len(batch[i:i + 2000])
        replayed += len(batch)
    assert _stored(a) == stored  # not one event more
    seqs = Counter(seq for seq, _ in _ids(a, "NodeX"))
    assert set(seqs.values()) == {1} and len(seqs) == len(x.events)
    assert a.status()["conflicts"] == {}
    _healthy(a, client)
    print(f"\nreplayed events={replayed} stored_again=0")


# ------------------------------------------------------------------------- reordered

def test_reordered_events_join_in_chain_order(peer):
    a, client, x = peer
    head = len(x.events)
    fresh = _failed_events(x, 1000)
    reversed_ = list(reversed(fresh))  # the worst order: every event but the last waits
    stats = gossip_as_outsider(client, reversed_[:500])
    assert stats.sent == 500
    assert _ids(a, "NodeX")[-1][0] == head  # nothing joins before the gap is filled
    shuffled = reversed_[500:]
    random.shuffle(shuffled)
    gossip_as_outsider(client, shuffled)
    wait_until(lambda: len(_ids(a, "NodeX")) == head + 1000, 15, "all 1,000 to join")
    seqs = [seq for seq, _ in _ids(a, "NodeX")]
    assert seqs == list(range(1, head + 1001))  # in the log in chain order, each once
    assert [i for _, i in _ids(a, "NodeX")][head:] == [e.id for e in fresh]
    assert a.status()["conflicts"] == {}
    _healthy(a, client)
    print("\nreordered events=1000 stored=1000 in chain order")


# ------------------------------------------------------------------------- lying offers

def _offer(client: Any, queued: Any, body: bytes) -> tuple[Word, Word | None]:
    """Offer ``queued`` and send ``body`` whatever was asked (a liar does not listen);
    returns (the file's answer, its final word or None when the channel ended first)."""
    chan = client.open_channel()
    chan.settimeout(20)
    s = FrameStream(chan)
    try:
        raw = queued.to_dict()
        s.send("offer", files=[{"transfer": raw["data"]["transfer"], "queued": raw, "route": ["NodeX"]}])
        reply = s.recv(expect={"answers", "refuse"})
        first = Word(reply.header) if reply.op == "refuse" else Word(reply["answers"][0])
        if first.op != "accept":
            return first, None
        s.send_raw(body)
        chan.shutdown_write()
        try:
            return first, Word(s.recv(expect={"stored"})["results"][0])
        except EOFError:
            return first, None
    finally:
        chan.close()


LIES = ["hash", "hash", "short", "size-under", "size-zero", "too-large"]


def test_offers_that_lie_about_size_or_hash_deliver_nothing(peer):
    a, client, x = peer
    outcomes: Counter[str] = Counter()
    rounds = 40
    for n in range(rounds):
        for lie in LIES:
            data = os.urandom(random.randint(1, 64 * 1024))
            size, digest, body = len(data), hashlib.sha256(data).hexdigest(), data
            if lie == "hash":  # the bytes are not the ones signed for
                body = bytes([data[0] ^ 1]) + data[1:]
            elif lie == "short":  # fewer bytes than the size, then the sender hangs up
                size, body = size + 1000, data
            elif lie == "size-under":  # the size is short of the file: the hash cannot match
                size = max(0, size - 100)
            elif lie == "size-zero":
                size = 0
            elif lie == "too-large":  # over max_file_size (64 GiB): refused before any byte
                size = 65 * 2**30
            queued = x.add(E.TRANSFER_QUEUED, {"transfer": os.urandom(16).hex(), "destination": "NodeA",
                                               "name": f"lie-{n}-{lie}.bin", "size": size, "sha256": digest})
            first, final = _offer(client, queued, body)
            if first.op == "refuse":
                outcomes[f"{lie}:refused:{first['reason']}"] += 1
            else:
                assert first.op == "accept", (lie, first.fields)
                outcomes[f"{lie}:{final['a'] + ':' + final['reason'] if final else 'cut'}"] += 1
    print(f"\nlying offers={rounds * len(LIES)} outcomes={dict(outcomes)}")
    assert outcomes == Counter({
        "hash:refuse:hash-mismatch": 2 * rounds,
        "short:cut": rounds,
        "size-under:refuse:hash-mismatch": rounds,
        "size-zero:refuse:hash-mismatch": rounds,
        "too-large:refused:too-large": rounds,
    })
    assert a.inbox_files() == []  # 0 delivered
    mine = {e["type"] for e in a.events() if e["origin"] == "NodeA"}
    assert not mine & {E.TRANSFER_DELIVERED, E.TRANSFER_RELAYED}
    assert not [p for p in a.spool_files() if p.name.endswith(".data")]  # no whole copy kept
    _healthy(a, client)


def test_a_replayed_offer_of_a_delivered_file_is_not_delivered_twice(peer):
    a, client, x = peer
    data = os.urandom(10_000)
    queued = x.add(E.TRANSFER_QUEUED, {"transfer": os.urandom(16).hex(), "destination": "NodeA",
                                       "name": "once.bin", "size": len(data),
                                       "sha256": hashlib.sha256(data).hexdigest()})
    first, final = _offer(client, queued, data)
    assert (first.op, final.op if final else None) == ("accept", "stored")
    wait_until(lambda: [p.name for p in a.inbox_files("NodeX")] == ["once.bin"], 15, "the delivery")
    answers = Counter()
    for _ in range(50):  # the same signed offer and bytes, again and again
        again, _ = _offer(client, queued, data)
        answers[again.op] += 1
    assert answers == Counter({"have": 50}), answers
    assert [p.name for p in a.inbox_files("NodeX")] == ["once.bin"]  # no "once (1).bin"
    delivered = [e for e in a.events(E.TRANSFER_DELIVERED) if e["data"]["transfer"] == queued.data["transfer"]]
    assert len(delivered) == 1
    _healthy(a, client)
    print("\nreplayed offers=50 delivered_again=0")

