"""Hash-bucket reconciliation of version vectors: the pure functions, and the Gossip call
that uses them over a real socketpair (real EventLogs, real signed events)."""

import base64
import random
import socket
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from maildrop import gossip, reconcile
from maildrop.errors import ProtocolError
from maildrop.eventlog import EventLog
from maildrop.protocol import FrameStream
from maildrop.reconcile import FANOUT, LEAF, MAX_DEPTH, MAX_PREFIXES, Index
from tests.factories import FeedWriter


def vv_of(n, seed=1, top=9):
    rnd = random.Random(seed)
    return {f"N{i:05d}": rnd.randint(1, top) for i in range(n)}


def reconcile_pure(ours, theirs_vv):
    """The caller's descent against a callee answering from ``theirs_vv``, all in process."""
    mine, callee = Index.of(ours), Index.of(theirs_vv)
    prefixes, theirs, covered, levels = [""], {}, [], 0
    while prefixes:
        levels += 1
        answers = reconcile.check_answers([callee.answer(p) for p in prefixes], prefixes)
        prefixes, got, cov = reconcile.descend(mine, prefixes, answers)
        theirs.update(got)
        covered += cov
    return (*reconcile.diff(ours, theirs, covered), levels)


def test_equal_vectors_have_equal_buckets_and_one_entry_changes_its_path_only():
    a = vv_of(2000)
    b = dict(a)
    assert Index.of(a).answer("") == Index.of(b).answer("")
    b["N00042"] += 1
    k = reconcile.key("N00042")
    ia, ib = Index.of(a), Index.of(b)
    for depth in range(4):
        for c in reconcile.children(k[:depth]):
            assert (ia.hash(c) == ib.hash(c)) == (not k.startswith(c)), (depth, c)


def test_small_buckets_are_answered_with_entries_big_ones_split():
    vv = vv_of(100)
    idx = Index.of(vv)
    root = idx.answer("")
    assert list(root) == ["h"] and len(base64.b64decode(root["h"])) == FANOUT * reconcile.HASH_BYTES
    assert reconcile.check_answers([root], [""])[0]["h"] == [idx.hash(c) for c in reconcile.children("")]
    leaf = next(p for p in (reconcile.key(o)[:3] for o in vv) if idx.count(p) <= LEAF)
    got = idx.answer(leaf)["vv"]
    assert got == {o: s for o, s in vv.items() if reconcile.key(o).startswith(leaf)} and got
    assert Index.of({"N1": 1}).answer("") == {"vv": {"N1": 1}}


@pytest.mark.parametrize("seed", range(8))
def test_descent_finds_exactly_what_each_side_lacks(seed):
    rnd = random.Random(seed)
    base = vv_of(rnd.choice([5, 40, 700, 3000]), seed)
    ours, theirs = dict(base), dict(base)
    names = list(base)
    for o in rnd.sample(names, min(len(names), rnd.randint(1, 12))):
        (ours if rnd.random() < 0.5 else theirs)[o] += rnd.randint(1, 3)
    for i in range(rnd.randint(0, 3)):  # feeds only one side holds
        (ours if i % 2 else theirs)[f"New{seed}x{i}"] = rnd.randint(1, 5)
    want, their_vv, _ = reconcile_pure(ours, theirs)
    assert want == {o: ours.get(o, 0) for o, s in theirs.items() if s > ours.get(o, 0)}
    assert their_vv == theirs  # known exactly: equal buckets are ours, differing ones answered


def test_one_change_among_10000_is_found_in_a_few_levels_of_small_frames():
    ours = vv_of(10_000)
    theirs = {**ours, "N04711": ours["N04711"] + 1}
    want, their_vv, levels = reconcile_pure(ours, theirs)
    assert want == {"N04711": ours["N04711"]}
    assert their_vv == theirs
    assert levels <= 5


def test_diff_keeps_our_vector_outside_the_covered_buckets():
    ours = {"A": 3, "B": 2}
    cover = reconcile.key("A")[:2]
    assert not reconcile.key("B").startswith(cover)  # "55" and "df": different buckets
    want, their_vv = reconcile.diff(ours, {"A": 5}, [cover])
    assert want == {"A": 3} and their_vv == {"A": 5, "B": 2}
    want, their_vv = reconcile.diff(ours, {}, [cover])  # they hold nothing of A's bucket
    assert want == {} and their_vv == {"B": 2}


@pytest.mark.parametrize("raw, reason", [
    ("", "1 to"),
    ([], "1 to"),
    ([""] * (MAX_PREFIXES + 1), "1 to"),
    (["xyz"], "hex"),
    (["A0"], "hex"),
    (["0" * (MAX_DEPTH + 1)], "hex"),
    ([3], "hex"),
    (["ab", "ab"], "twice"),
])
def test_hostile_prefixes_are_refused(raw, reason):
    with pytest.raises(ProtocolError, match=reason):
        reconcile.check_prefixes(raw)


def b64(n):
    return base64.b64encode(bytes(n)).decode()


GOOD_H = {"h": b64(FANOUT * 8)}


@pytest.mark.parametrize("raw, prefixes, reason", [
    ("nope", [""], "expected 1"),
    ([GOOD_H, GOOD_H], [""], "expected 1"),
    ([{"h": b64((FANOUT - 1) * 8)}], [""], "16 bucket hashes"),
    ([{"h": b64((FANOUT + 1) * 8)}], [""], "16 bucket hashes"),
    ([{"h": "!" * reconcile.HASHES_B64}], [""], "16 bucket hashes"),
    ([{"h": ["0" * 16] * FANOUT}], [""], "16 bucket hashes"),
    ([{"h": b64(FANOUT * 8), "vv": {}}], [""], "is not"),
    ([{"x": 1}], [""], "is not"),
    ([GOOD_H], ["0" * MAX_DEPTH], "split"),
    ([{"vv": {f"N{i}": 1 for i in range(LEAF + 1)}}], [""], f"at most {LEAF}"),
    ([{"vv": {"bad id!": 1}}], [""], "entry"),
    ([{"vv": {"N1": 0}}], [""], "entry"),
    ([{"vv": {"N1": True}}], [""], "entry"),
    ([{"vv": {"N1": 2}}], [("0" if reconcile.key("N1")[0] != "0" else "1")], "outside"),
])
def test_hostile_answers_are_refused(raw, prefixes, reason):
    with pytest.raises(ProtocolError, match=reason):
        reconcile.check_answers(raw, prefixes)


def test_the_pure_functions_do_not_mutate_their_inputs():
    ours, theirs = vv_of(300), vv_of(300, seed=2)
    o2, t2 = dict(ours), dict(theirs)
    reconcile_pure(ours, theirs)
    assert ours == o2 and theirs == t2


# -- the wire: real logs over a socketpair ------------------------------------------------


class Counting:
    """A socket end that counts the bytes it sends."""

    def __init__(self, s):
        self.s, self.sent = s, 0

    def recv(self, n):
        return self.s.recv(n)

    def sendall(self, b):
        self.sent += len(b)
        self.s.sendall(b)


def serve(stream, store, ops):
    """The callee's channel loop, as the agent's handle_channel dispatches gossip ops."""
    try:
        while True:
            f = stream.recv(expect={"fingerprint", "buckets", "gossip"})
            ops.append(f.op)
            if f.op == "fingerprint":
                gossip.answer_fingerprint(stream, f, store)
            elif f.op == "buckets":
                gossip.answer_buckets(stream, f, store)
            else:
                gossip.answer_gossip(stream, f, store)
    except ProtocolError as exc:
        ops.append(f"error: {exc}")
        stream.send("error", reason=str(exc))
    except (EOFError, OSError):
        pass


def round_between(caller, callee):
    a, b = socket.socketpair()
    ca, cb = Counting(a), Counting(b)
    ops = []
    t = threading.Thread(target=serve, args=(FrameStream(cb), callee, ops), daemon=True)
    t.start()
    try:
        stats = gossip.call(FrameStream(ca), caller)
    finally:
        a.shutdown(socket.SHUT_RDWR)
        t.join(10)
        a.close()
        b.close()
    return stats, ca.sent + cb.sent, ops


@pytest.fixture
def feeds():
    fs = [FeedWriter(f"Node{i:02d}") for i in range(40)]
    for f in fs:
        f.configured()
    return fs


def _log(tmp_path, name, events, feeds):
    elog = EventLog(tmp_path / f"{name}.jsonl", pinned={f.origin: f.key.public_line for f in feeds})
    elog.ingest(events)
    return elog


def test_a_change_crosses_by_buckets_and_a_scoped_gossip(tmp_path, feeds, monkeypatch):
    events = [e for f in feeds for e in f.events]
    left, right = _log(tmp_path, "l", events, feeds), _log(tmp_path, "r", events, feeds)
    assert len(left.version_vector()) == 40 > gossip.DIRECT_MAX
    stats, in_sync_bytes, ops = round_between(left, right)
    assert stats.in_sync and ops == ["fingerprint"]
    new = feeds[7].link("Node08")
    right.ingest([new])
    stats, changed_bytes, ops = round_between(left, right)
    assert ops[0] == "fingerprint" and "buckets" in ops and ops[-1] == "gossip"
    assert stats.scoped and stats.accepted == 1 and stats.sent == 0
    assert left.fingerprint() == right.fingerprint()
    # The other way: the caller holds the news and gives it.
    new2 = feeds[30].link("Node31")
    left.ingest([new2])
    stats, _, _ = round_between(left, right)
    assert stats.scoped and stats.sent == 1 and stats.accepted == 0
    assert left.fingerprint() == right.fingerprint()
    # The same change by the whole vector (the call before buckets) costs more.
    monkeypatch.setattr(gossip, "DIRECT_MAX", 10**6)
    right.ingest([feeds[9].link("Node10")])
    stats, whole_bytes, ops = round_between(left, right)
    assert not stats.scoped and ops == ["fingerprint", "gossip"] and stats.accepted == 1
    print(f"\n40 feeds: in sync {in_sync_bytes} B, one change {changed_bytes} B by buckets, "
          f"{whole_bytes} B by the whole vector")
    assert in_sync_bytes < 300 and changed_bytes < whole_bytes


def test_a_hostile_bucket_answer_fails_the_round_and_stores_nothing(tmp_path, feeds):
    events = [e for f in feeds for e in f.events]
    honest = _log(tmp_path, "h", events, feeds)
    a, b = socket.socketpair()
    y = FrameStream(b)

    def liar():
        y.recv(expect={"fingerprint"})
        y.send("fingerprint.reply", fp="f" * 32, same=False)
        y.recv(expect={"buckets"})
        y.send("buckets.reply", buckets=[{"h": b64(3 * 8)}])  # 3 buckets, not 16

    t = threading.Thread(target=liar, daemon=True)
    t.start()
    with pytest.raises(ProtocolError, match="16 bucket hashes"):
        gossip.call(FrameStream(a), honest)
    t.join(10)
    assert len(honest.version_vector()) == 40


def test_a_hostile_bucket_request_is_refused_with_an_error_frame(tmp_path, feeds):
    store = _log(tmp_path, "s", [e for f in feeds for e in f.events], feeds)
    a, b = socket.socketpair()
    ops = []
    t = threading.Thread(target=serve, args=(FrameStream(b), store, ops), daemon=True)
    t.start()
    x = FrameStream(a)
    x.send("buckets", prefixes=["0"] * 2)
    with pytest.raises(ProtocolError, match="asked twice"):
        x.recv(expect={"buckets.reply"})
    t.join(10)
    assert ops[-1].startswith("error: buckets")


class VVStore:
    """A gossip Store of version vectors only (no events): for the frames of big differences.
    ``asked`` records the vectors its ``since`` was asked for."""

    def __init__(self, vv):
        self.vv, self.asked = vv, []

    def fingerprint(self):
        return reconcile.Index.of(self.vv).hash("").hex().ljust(32, "0")

    def version_vector(self):
        return dict(self.vv)

    def since(self, their_vv, limit=None):
        self.asked.append(dict(their_vv))
        return []

    def ingest(self, events):
        raise AssertionError("no events expected")


def test_a_big_difference_that_fits_a_frame_goes_as_the_whole_vector():
    ours = vv_of(3000, top=1)
    assert gossip.fits(ours)
    theirs = {o: 2 for o in ours}  # every feed differs: every bucket on every level
    stats, nbytes, ops = round_between(VVStore(ours), VVStore(theirs))
    assert not stats.scoped and ops[-1] == "gossip"
    assert stats.bucket_calls == 1 + 1 + (FANOUT * FANOUT) // MAX_PREFIXES  # 3 levels, then 4096 > 256
    # A small difference among as many feeds stays scoped and small.
    theirs = {**ours, "N00001": 2, "N02999": 2}
    stats, nbytes, ops = round_between(VVStore(ours), VVStore(theirs))
    assert ops.count("gossip") == 1 and stats.scoped and nbytes < 4096


def test_a_big_difference_too_big_for_a_frame_is_reconciled_a_slice_a_round():
    ours = vv_of(10_000, top=1)
    assert not gossip.fits(ours)
    theirs = {o: 2 for o in ours}
    callee = VVStore(theirs)
    stats, nbytes, ops = round_between(VVStore(ours), callee)
    assert stats.scoped and 1 + 1 + 4 + 4 <= stats.bucket_calls <= 20  # from the 4th level: 256 of 4096
    want = {o: s for o, s in callee.asked[-1].items() if s != theirs[o]}  # what the scoped call named
    assert 0 < len(want) <= gossip.LEVEL_PREFIXES * LEAF
    assert all(s == 1 for s in want.values())
    print(f"\n10,000 feeds all differing: {len(want)} reconciled in one round of {nbytes:,} B")
    assert nbytes < 200_000


json_value = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=30)
    | st.sampled_from(["", "0", "ab", "f" * 16, "0" * 17, reconcile.key("N1")[:3], b64(FANOUT * 8)]),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8) | st.sampled_from(
        ["h", "vv", "N1", "N2"]), inner, max_size=4),
    max_leaves=20)


@settings(max_examples=400, deadline=None)
@given(json_value)
def test_any_prefixes_are_checked_or_refused_never_another_error(raw):
    try:
        got = reconcile.check_prefixes(raw)
    except ProtocolError:
        return
    idx = Index.of(vv_of(50))
    assert all(isinstance(p, str) and len(p) <= MAX_DEPTH for p in got)
    assert len([idx.answer(p) for p in got]) == len(got)


@settings(max_examples=400, deadline=None)
@given(st.lists(json_value, max_size=3), st.lists(st.sampled_from(["", "0", "a1", "0" * MAX_DEPTH]),
                                                  min_size=1, max_size=3, unique=True))
def test_any_answers_are_checked_or_refused_never_another_error(raw, prefixes):
    try:
        got = reconcile.check_answers(raw, prefixes)
    except ProtocolError:
        return
    nxt, theirs, covered = reconcile.descend(Index.of(vv_of(50)), prefixes, got)
    assert all(reconcile.key(o).startswith(tuple(covered)) for o in theirs)
    assert all(any(c.startswith(p) and len(c) == len(p) + 1 for p in prefixes) for c in nxt)
