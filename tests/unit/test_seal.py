"""The age envelope and file sealing (maildrop/seal.py), the two shapes of the sealed event
types (events.py), and the take of a file: sealed before it is queued, the plaintext gone
(real files in a real node folder; no agent)."""

import base64
import hashlib
import json
import os

import pyrage
import pytest

from maildrop import events as E
from maildrop.config import load_config
from maildrop.errors import InvalidEvent
from maildrop.eventlog import EventLog
from maildrop.events import make_fact
from maildrop.keys import generate_key, install_new_key, load_key, new_key_for
from maildrop.seal import Envelope, Keyring, Names, SealError, seal_envelope, seal_file
from maildrop.spool import Spool
from maildrop.transfers import Custody
from tests.factories import T0, node_key
from tests.harness import Node

SHA = hashlib.sha256(b"x").hexdigest()


def _env(name="report.txt", origin="NodeA"):
    return Envelope(name, origin, 1, SHA)


def test_an_envelope_opens_only_for_its_recipients_and_says_what_was_sealed(tmp_path):
    dest, origin, relay = (generate_key(tmp_path / n) for n in ("d", "o", "r"))
    sealed = seal_envelope(_env(), [dest.public_line, origin.public_line])
    assert Keyring.of(dest).open_envelope(sealed) == _env()
    assert Keyring.of(origin).open_envelope(sealed) == _env()
    with pytest.raises(SealError, match="does not open"):
        Keyring.of(relay).open_envelope(sealed)
    assert Names(Keyring.of(relay)).name({"sealed": sealed}) is None  # a relay shows no name
    assert Names(Keyring.of(dest)).name({"sealed": sealed}) == "report.txt"
    assert Names(Keyring.of(None)).name({"name": "old.txt"}) == "old.txt"  # plaintext shape


@pytest.mark.parametrize(("inner", "why"), [
    (b"not json", "not JSON"),
    (json.dumps({"name": "a", "origin": "NodeA", "size": 1}).encode(), "does not hold"),
    (json.dumps({"name": "../x", "origin": "NodeA", "size": 1, "sha256": SHA}).encode(), "not a safe file name"),
    (json.dumps({"name": "a", "origin": "a b", "size": 1, "sha256": SHA}).encode(), "origin"),
    (json.dumps({"name": "a", "origin": "NodeA", "size": -1, "sha256": SHA}).encode(), "size"),
    (json.dumps({"name": "a", "origin": "NodeA", "size": 1, "sha256": "zz"}).encode(), "sha256"),
    (b"[" * 2700, "not JSON"),  # nested past the JSON parser's depth: was a RecursionError
])
def test_a_malformed_envelope_is_refused_with_the_reason(tmp_path, inner, why):
    key = generate_key(tmp_path / "k")
    sealed = base64.b64encode(pyrage.encrypt(inner, [pyrage.ssh.Recipient.from_str(key.public_line)])).decode()
    with pytest.raises(SealError, match=why):
        Keyring.of(key).open_envelope(sealed)


def test_after_a_key_rotation_what_was_sealed_to_the_old_key_still_opens(tmp_path):
    path = tmp_path / "node_ed25519"
    old = generate_key(path)
    sealed = seal_envelope(_env(), [old.public_line])
    new_key_for(path)
    install_new_key(path)
    assert load_key(path).public_line != old.public_line
    assert Keyring.of(load_key(path)).open_envelope(sealed) == _env()  # through <key>.old


def test_a_file_is_sealed_streaming_and_opens_to_the_same_bytes(tmp_path):
    key = generate_key(tmp_path / "k")
    data = os.urandom(3 * 65536 + 7)
    (tmp_path / "plain").write_bytes(data)
    src = os.open(tmp_path / "plain", os.O_RDONLY)
    dst = os.open(tmp_path / "sealed", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        s = seal_file(src, dst, [key.public_line])
    finally:
        os.close(src)
        os.close(dst)
    ct = (tmp_path / "sealed").read_bytes()
    assert (s.plain_size, s.plain_sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert (s.size, s.sha256) == (len(ct), hashlib.sha256(ct).hexdigest())
    assert data[:64] not in ct
    env = Envelope("f", "NodeA", len(data), hashlib.sha256(data).hexdigest())
    for wanted, ok in ((env, True), (Envelope("f", "NodeA", len(data), SHA), False)):
        src = os.open(tmp_path / "sealed", os.O_RDONLY)
        out = os.open(tmp_path / "opened", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            if ok:
                Keyring.of(key).open_file(src, out, wanted)
            else:  # the bytes are another plaintext than the envelope says: refused
                with pytest.raises(SealError, match="does not match the size and sha256 of its envelope"):
                    Keyring.of(key).open_file(src, out, wanted)
        finally:
            os.close(src)
            os.close(out)
    (tmp_path / "cut").write_bytes(ct[:-20])
    src = os.open(tmp_path / "cut", os.O_RDONLY)
    out = os.open(tmp_path / "opened", os.O_WRONLY | os.O_TRUNC)
    try:
        with pytest.raises(SealError, match="does not decrypt"):
            Keyring.of(key).open_file(src, out, env)
    finally:
        os.close(src)
        os.close(out)


def test_the_event_types_have_a_sealed_and_a_plaintext_shape_and_nothing_else():
    key = node_key()
    sealed = seal_envelope(_env(), [key.public_line])
    base = {"transfer": "a" * 32, "destination": "NodeB", "size": 1, "sha256": SHA}
    make_fact(key, "NodeA", T0, E.TRANSFER_QUEUED, {**base, "sealed": sealed})
    make_fact(key, "NodeA", T0, E.TRANSFER_QUEUED, {**base, "name": "old.txt"})
    make_fact(key, "NodeB", T0, E.TRANSFER_DELIVERED, {"transfer": "a" * 32, "sha256": SHA})
    make_fact(key, "NodeB", T0, E.TRANSFER_DELIVERED, {"transfer": "a" * 32, "sha256": SHA,
                                                                 "name": "old.txt"})
    for bad, why in [({**base, "sealed": sealed, "name": "x"}, "unexpected data field"),
                     ({**base, "sealed": "bm90IGFnZQ=="}, "data.sealed is invalid"),  # "not age"
                     ({**base, "sealed": "!!"}, "data.sealed is invalid"),
                     ({**base, "sealed": "YQ" * 5000}, "data.sealed is invalid"),
                     (base, "data.sealed missing")]:
        with pytest.raises(InvalidEvent, match=why):
            make_fact(key, "NodeA", T0, E.TRANSFER_QUEUED, bad)


@pytest.fixture
def origin(tmp_path):
    """NodeA's real folder and Custody, NodeB's key pinned (it can be sealed to)."""
    n = Node(tmp_path, "NodeA", dict(os.environ))
    config = load_config(n.config_path)
    b_key = generate_key(tmp_path / "b_key")
    elog = EventLog(config.events_path, pinned={"NodeB": b_key.public_line}, me="NodeA")
    custody = Custody("NodeA", load_key(config.key_path), elog, Spool(config.spool), config.inbox,
                      config.failed, max_file_size=2**30, min_free_space=0)
    yield n, custody, b_key
    elog.close()


def test_a_take_seals_the_file_before_it_is_queued_and_leaves_no_plaintext(origin):
    n, custody, b_key = origin
    data = b"MARK" + os.urandom(50_000)
    tid = custody.take(n.drop("NodeB", "doc.bin", data), "NodeB")
    ev = custody.queued_event(tid)
    assert set(ev.data) == {"transfer", "destination", "sealed", "size", "sha256"}
    files = {p.name for p in custody.spool.folder.iterdir()}
    assert files == {f"{tid}.data"}  # no .plain, no intent left
    ct = custody.spool.data(tid).read_bytes()
    assert b"MARK" not in ct and (len(ct), hashlib.sha256(ct).hexdigest()) == (ev.data["size"], ev.data["sha256"])
    assert Keyring.of(b_key).open_envelope(ev.data["sealed"]) == \
        Envelope("doc.bin", "NodeA", len(data), hashlib.sha256(data).hexdigest())
    assert pyrage.decrypt(ct, [pyrage.ssh.Identity.from_buffer(b_key.path.read_bytes())]) == data
    assert custody.name_of(ev) == "doc.bin"


def test_a_take_cut_short_by_an_older_version_is_sealed_when_replayed(origin):
    """An intent of the previous version (no ``seal`` in its entries) with its file already
    renamed to ``<tid>.data`` in plaintext and no queued event: the replay seals it like a
    fresh take, and no plaintext is left."""
    n, custody, _ = origin
    tid = os.urandom(16).hex()
    data = b"taken by the old version\n"
    src = n.outbox / "NodeB" / "old.txt"
    custody.spool.data(tid).write_bytes(data)
    os.chmod(custody.spool.data(tid), 0o640)
    (custody.spool.folder / "take-0123456789abcdef.intent").write_text(json.dumps(
        [{"transfer": tid, "src": str(src), "destination": "NodeB", "name": "old.txt", "size_hint": len(data)}]))
    assert custody.replay_takes()
    ev = custody.queued_event(tid)
    assert "sealed" in ev.data and custody.name_of(ev) == "old.txt"
    assert {p.name for p in custody.spool.folder.iterdir()} == {f"{tid}.data"}
    assert data not in custody.spool.data(tid).read_bytes()


def test_an_older_versions_take_replayed_twice_never_loses_its_plaintext(origin):
    """The first replay of an older version's intent renamed ``<tid>.data`` to ``.plain``
    and was cut short while sealing (a full disk, a crash): the intent on disk is unchanged
    and ``.data`` holds a partial ciphertext. The next replay seals the plaintext again; it
    never takes the partial ciphertext for the file."""
    n, custody, b_key = origin
    tid = os.urandom(16).hex()
    data = b"taken by the old version, replayed twice\n"
    src = n.outbox / "NodeB" / "twice.txt"
    custody.spool.plain(tid).write_bytes(data)
    os.chmod(custody.spool.plain(tid), 0o640)
    custody.spool.data(tid).write_bytes(b"age-encryption.org/v1\n-> a partial ciphertext")
    (custody.spool.folder / "take-00000000000000cc.intent").write_text(json.dumps(
        [{"transfer": tid, "src": str(src), "destination": "NodeB", "name": "twice.txt", "size_hint": len(data)}]))
    assert custody.replay_takes()
    ev = custody.queued_event(tid)
    assert custody.name_of(ev) == "twice.txt"
    assert {p.name for p in custody.spool.folder.iterdir()} == {f"{tid}.data"}
    ct = custody.spool.data(tid).read_bytes()
    assert pyrage.decrypt(ct, [pyrage.ssh.Identity.from_buffer(b_key.path.read_bytes())]) == data


def test_a_take_cut_short_while_sealing_is_sealed_again_from_the_start(origin):
    """The state a crash in the middle of sealing leaves: the intent, the ``.plain``, a
    partial ``.data`` and no event. The replay seals the whole file again (the partial
    ciphertext is replaced, never vouched for) and removes the plaintext."""
    n, custody, b_key = origin
    tid = os.urandom(16).hex()
    data = os.urandom(70_000)
    custody.spool.plain(tid).write_bytes(data)
    os.chmod(custody.spool.plain(tid), 0o640)
    custody.spool.data(tid).write_bytes(b"age-encryption.org/v1\n-> half")  # cut off
    src = n.outbox / "NodeB" / "big.bin"
    (custody.spool.folder / "take-00000000000000aa.intent").write_text(json.dumps(
        [{"transfer": tid, "src": str(src), "destination": "NodeB", "name": "big.bin",
          "size_hint": len(data), "seal": 1}]))
    assert custody.replay_takes()
    ev = custody.queued_event(tid)
    ct = custody.spool.data(tid).read_bytes()
    assert (len(ct), hashlib.sha256(ct).hexdigest()) == (ev.data["size"], ev.data["sha256"])
    assert pyrage.decrypt(ct, [pyrage.ssh.Identity.from_buffer(b_key.path.read_bytes())]) == data
    assert {p.name for p in custody.spool.folder.iterdir()} == {f"{tid}.data"}


def test_a_take_cut_short_after_its_append_only_loses_the_plaintext(origin):
    """The crash after the append, before the plaintext went: the replay finds the event,
    queues nothing twice and removes the ``.plain``."""
    n, custody, _ = origin
    tid = custody.take(n.drop("NodeB", "once.bin", b"once"), "NodeB")
    custody.spool.plain(tid).write_bytes(b"once")  # as the crash left it
    (custody.spool.folder / "take-00000000000000bb.intent").write_text(json.dumps(
        [{"transfer": tid, "src": str(n.outbox / "NodeB" / "once.bin"), "destination": "NodeB",
          "name": "once.bin", "size_hint": 4, "seal": 1}]))
    before = len([e for e in custody.log.ledger.all_events() if e.type == E.TRANSFER_QUEUED])
    assert custody.replay_takes()
    assert len([e for e in custody.log.ledger.all_events() if e.type == E.TRANSFER_QUEUED]) == before
    assert {p.name for p in custody.spool.folder.iterdir()} == {f"{tid}.data"}
