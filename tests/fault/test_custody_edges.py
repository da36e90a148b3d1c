"""Custody at its edges: a give-up cut short by a crash, two give-ups at once, and one
transfer of a batch that cannot be delivered. Each ends with every transfer accounted for:
delivered, or in ``failed/`` with its ``transfer.failed``, exactly once."""

from __future__ import annotations

import time

from maildrop import lifecycle as L
from maildrop.config import load_config
from maildrop.eventlog import EventLog
from maildrop.keys import load_key
from maildrop.spool import Spool
from maildrop.transfers import Custody
from tests.factories import node_key
from tests.harness import custody_service, wait_until


def _custody(node):
    """The node's log and Custody; NodeZ's and NodeB's keys pinned (as configured peers'
    are), so files for them can be sealed; neither ever runs."""
    config = load_config(node.config_path)
    elog = EventLog(config.events_path, pinned={n: node_key(n).public_line for n in ("NodeZ", "NodeB")},
                    me=config.node_id)
    return elog, Custody(node.name, load_key(config.key_path), elog, Spool(config.spool),
                         config.inbox, config.failed, max_file_size=2**30, min_free_space=0)


def _failed_events(node, tid):
    return [e for e in node.events("transfer.failed") if e["data"]["transfer"] == tid]


def test_a_give_up_cut_short_between_the_move_and_the_event_is_finished_at_start(make_net):
    """The state a crash leaves inside ``expire``: the reason durably in the spool meta, the
    file already in failed/, no ``transfer.failed`` yet. The next start appends it."""
    net = make_net(["NodeA"], [], start=False)
    a = net["NodeA"]
    elog, custody = _custody(a)
    try:
        path = a.drop("NodeZ", "late.bin", b"x" * 100)
        (tid,) = custody.take_batch([(path, "NodeZ")])
        custody.spool.write_meta(tid, {"failing": "cancelled"})
        # expire's steps up to the crash: the copy opened, the plaintext in failed/, the
        # sealed copy gone; then the crash, before the event
        (a.failed / "late.bin").write_bytes(b"x" * 100)
        custody.spool.data(tid).unlink()
    finally:
        elog.close()
    assert _failed_events(a, tid) == []
    a.start()
    wait_until(lambda: _failed_events(a, tid), 20, "the missing transfer.failed")
    assert [e["data"]["reason"] for e in _failed_events(a, tid)] == ["cancelled"]
    wait_until(lambda: not a.spool_files(tid), 20, "the meta to go")
    assert (a.failed / "late.bin").read_bytes() == b"x" * 100
    assert not (a.failed / "late (1).bin").exists()


def test_an_expiry_and_a_cancel_at_once_give_up_once(make_net):
    """The expiry (the service's own timer) and an operator's cancel arrive together: the
    one owner steps them one after the other, and the second finds the transfer ended."""
    net = make_net(["NodeA"], [], start=False)
    a = net["NodeA"]
    elog, custody = _custody(a)
    try:
        with custody_service(custody, elog, L.Policy(expire_after=0.5)) as (custodian, _):
            path = a.drop("NodeZ", "twice.bin", b"y" * 1000)
            (tid,) = custody.take_batch([(path, "NodeZ")])
            wait_until(lambda: tid in custodian.snapshot(), 5, "the service to hold it")
            wait_until(lambda: time.time() >= custodian.snapshot()[tid].queued_at + 0.5
                       if tid in custodian.snapshot() else True, 5, "the expiry to be due")
            custodian.apply_all([tid], L.Cancel())
            wait_until(lambda: tid not in custodian.snapshot(), 10, "the transfer to end")
    finally:
        elog.close()
    assert len(_failed_events(a, tid)) == 1
    assert sorted(p.name for p in a.failed.iterdir()) == ["twice.bin", "twice.bin.reason"]
    assert not a.spool_files(tid)


def test_one_undeliverable_file_does_not_strand_the_rest_of_its_batch(make_net, tmp_path):
    """The first file of a take batch is for this node itself and its delivery fails
    (``inbox/NodeA`` planted as a symlink): the files for NodeB after it in the same batch
    are still held for sending, and the failed one keeps its copy in the spool."""
    net = make_net(["NodeA"], [], start=False)
    a = net["NodeA"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    a.inbox.mkdir(parents=True, exist_ok=True)
    (a.inbox / "NodeA").symlink_to(elsewhere)
    elog, custody = _custody(a)
    try:
        batch = [(a.drop("NodeA", "self.bin", b"to myself"), "NodeA")]
        batch += [(a.drop("NodeB", f"f{i}.bin", b"for B %d" % i), "NodeB") for i in range(5)]
        with custody_service(custody, elog) as (custodian, _):
            tids = custody.take_batch(batch)
            assert len(tids) == 6
            # Alone, A has no route to B: held and waiting for one, not stranded.
            wait_until(lambda: {t for t, st in custodian.snapshot().items()
                                if st.phase == L.QUEUED and st.destination == "NodeB"} == set(tids[1:]),
                       10, "the files after the failed delivery to be held for NodeB")
            mine = custodian.snapshot()[tids[0]]
            assert (mine.phase, mine.reason.startswith("delivery into inbox/NodeA/ failed")) == \
                (L.DELIVERING, True), "the failed delivery waits for a retry, with its reason"
        assert custody.spool.data(tids[0]).exists()  # kept: delivered once the inbox is fixed
        assert list(elsewhere.iterdir()) == []  # never written through the symlink
        assert not list(custody.spool.intents())
    finally:
        elog.close()
