"""The bulk byte path at a destination: a big sealed file is decrypted while it arrives.

Real custody layers over a socketpair, as in test_hop_protocol (whose ``hop`` fixture these
tests use): NodeA takes and seals a file of more than ``CUT_THROUGH_MIN`` for NodeB, and the
test plays NodeA's side of the offer by hand where it must hold the bytes back or cut them.
"""

from __future__ import annotations

import hashlib
import os
import threading

import pyrage

from maildrop import events as E
from maildrop.seal import Envelope, seal_envelope
from maildrop.transfers import CUT_THROUGH_MIN
from tests.harness import wait_until
from tests.integration import test_hop_protocol
from tests.integration.test_hop_protocol import (
    ACCEPT,
    STORED,
    TIMEOUT,
    _offer,
    _queue_by_hand,
    _words,
)

hop = test_hop_protocol.hop  # that module's fixture, used here under its name

BIG = CUT_THROUGH_MIN + 3 * 1024 * 1024


def _openers() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "open"]


def test_a_big_sealed_file_is_decrypted_while_its_bytes_still_arrive(hop):
    """NodeA sends the first half of the ciphertext and holds the rest back: NodeB's
    ``.open`` already holds plaintext (decryption began before the last byte), and once the
    rest comes the file is delivered whole, once, under its name, with nothing left behind."""
    hop.receiver.max_file_size = 2**30
    data = os.urandom(BIG)
    (tid,) = hop.take("NodeB", {"big.bin": data})
    sealed = hop.sealed(tid)
    half = len(sealed) // 2
    opened = hop.receiver.spool.opened(tid)
    with hop.channel() as stream:
        assert _offer(stream, hop.items([tid])) == [ACCEPT]
        stream.send_raw(sealed[:half])
        wait_until(lambda: opened.exists() and opened.stat().st_size > 1024 * 1024, TIMEOUT,
                   "NodeB to decrypt the first half before the rest is sent")
        assert opened.stat().st_size <= half  # only what has arrived is opened
        stream.send_raw(sealed[half:])
        results = stream.recv(expect={"stored"})["results"]
        # The destination's receipt rides the answer inline (docs/history.md).
        assert [{k: v for k, v in r.items() if k != "facts"} for r in results] == [STORED]
        assert [f["type"] for f in results[0]["facts"]] == [E.TRANSFER_DELIVERED]
    delivered = hop.b.inbox / "NodeA" / "big.bin"
    assert hashlib.sha256(delivered.read_bytes()).digest() == hashlib.sha256(data).digest()
    assert len(hop.b.events(E.TRANSFER_DELIVERED)) == 1
    assert hop.spool_of(tid) == set()
    assert _openers() == []


def test_a_big_sealed_file_cut_off_mid_way_stops_its_decryption_and_resumes(hop):
    """The channel closes mid-file: the decrypting thread stops with the offer (none is left
    running), nothing reaches the inbox, and the resume sends only the rest and delivers
    the file once."""
    hop.receiver.max_file_size = 2**30
    data = os.urandom(BIG)
    (tid,) = hop.take("NodeB", {"cut.bin": data})
    sealed = hop.sealed(tid)
    cut = len(sealed) // 3
    with hop.channel() as stream:
        assert _offer(stream, hop.items([tid])) == [ACCEPT]
        stream.send_raw(sealed[:cut])
        wait_until(lambda: hop.receiver.spool.part(tid).stat().st_size == cut, TIMEOUT,
                   "NodeB to write what was sent")
    assert _openers() == []  # the channel handler finished, and with it the decryption
    assert not (hop.b.inbox / "NodeA").exists() or list((hop.b.inbox / "NodeA").iterdir()) == []
    assert _words(hop.send([tid])) == [(tid, {"a": "accept", "offset": cut}), (tid, STORED)]
    assert (hop.b.inbox / "NodeA" / "cut.bin").read_bytes() == data
    assert len(hop.b.events(E.TRANSFER_DELIVERED)) == 1
    assert hop.spool_of(tid) == set()


def test_big_bytes_that_are_not_the_sealed_file_are_refused_undecryptable_and_not_kept(hop):
    """A good envelope (the origin's own, signed) with a big ciphertext sealed to another key:
    the bytes match the signed hash, so they are taken, then the decryption that ran while
    they arrived fails and the file is refused for good; nothing is delivered or kept."""
    hop.receiver.max_file_size = 2**30
    other = pyrage.x25519.Identity.generate().to_public()
    b_key, a_key = hop.sender.recipient_key("NodeB"), hop.sender.key.public_line
    plain = os.urandom(BIG)
    env = Envelope("lie.bin", "NodeA", len(plain), hashlib.sha256(plain).hexdigest())
    tid = _queue_by_hand(hop, {"transfer": os.urandom(16).hex(), "destination": "NodeB",
                               "sealed": seal_envelope(env, [b_key, a_key])}, pyrage.encrypt(plain, [other]))
    reports = _words(hop.send([tid]))
    assert [(w["a"], w.get("reason")) for _, w in reports] == [("accept", None), ("refuse", "undecryptable")]
    assert not (hop.b.inbox / "NodeA").exists() or list((hop.b.inbox / "NodeA").iterdir()) == []
    assert hop.b.events(E.TRANSFER_DELIVERED) == []
    assert hop.spool_of(tid) == set()
    assert _openers() == []
