"""Queue control: hold and flush as the planner and the transfer machine see them (pure), id
prefixes, queue rows, the holds file and the request/answer files between the CLI and an
agent (real files, no agent process: the test holds the agent's lock, runs a real custody
service on its thread and serves ``Control.poll`` on another)."""

import fcntl
import json
import os
import threading
import time

import pytest

from maildrop import cli
from maildrop import events as E
from maildrop import lifecycle as L
from maildrop.config import load_config
from maildrop.control import STATES, Control, Holds, held_row, request, resolve
from maildrop.errors import MaildropError, TransferRefused
from maildrop.eventlog import EventLog
from maildrop.keys import load_key
from maildrop.localnet import LocalNode
from maildrop.model import fold
from maildrop.relay import plan
from maildrop.spool import Spool
from maildrop.transfers import Custody
from tests.factories import T0, network_of, node_key
from tests.harness import custody_service, wait_until

TID = "e" * 32
# idle_retry is long: a transfer with no route is planned again only when something asks
# (a flush), so a test sees exactly when that happened.
POLICY = L.Policy(expire_after=100.0, resend_after=50.0, confirm_after=120.0, idle_retry=600.0)
EDGES = [("NodeA", "NodeB"), ("NodeB", "NodeE"), ("NodeA", "NodeC"), ("NodeC", "NodeD"), ("NodeD", "NodeE")]
INF = float("inf")


def _net(extra=()):
    feeds = network_of(EDGES)
    feeds["NodeA"].add(E.TRANSFER_QUEUED, {"transfer": TID, "destination": "NodeE", "name": "f",
                                           "size": 1, "sha256": "0" * 64})
    for who, type_, data in extra:
        feeds[who].add(type_, data)
    return fold(ev for f in feeds.values() for ev in f.events)


def origin(**kw) -> L.Transfer:
    return L.Transfer(TID, "NodeA", "NodeE", 1, T0, L.ORIGIN, **kw)


def relay(**kw) -> L.Transfer:
    return L.Transfer(TID, "NodeA", "NodeE", 1, T0, L.RELAY, passed=("NodeA",), **kw)


def destination(**kw) -> L.Transfer:
    return L.Transfer(TID, "NodeA", "NodeE", 1, T0, L.DESTINATION, passed=("NodeA", "NodeB"), **kw)


def _planned(net, me, t, now):
    """The planner's inputs for ``t`` at ``now``, and ``t`` stepped with them with the effects,
    as the custody service does it."""
    inputs = plan(net, me, [t], now, POLICY)
    effects = []
    for tid, inp in inputs:
        assert tid == t.id
        t, fx = L.step(t, inp, now, POLICY)
        effects += fx
    return inputs, t, effects


def _operator(t, inp, now):
    """``t`` after the operator's ``inp`` (hold, release, flush): never an effect by itself."""
    t, effects = L.step(t, inp, now, POLICY)
    assert effects == []
    return t


# -- the planner and the machine ------------------------------------------------------------------

def test_a_held_transfer_is_never_offered_but_still_ends():
    net = _net()
    t = _operator(origin(), L.Hold(), T0)
    assert _planned(net, "NodeA", t, T0 + 1)[0] == [] and t.wake_at(POLICY) == T0 + 100  # only its expiry
    t = _operator(t, L.Release(), T0 + 2)
    assert _planned(net, "NodeA", t, T0 + 2)[::2] == ([(TID, L.Route("NodeB"))], [L.Offer(TID, "NodeB", 1)])
    done = _net([("NodeE", E.TRANSFER_DELIVERED, {"transfer": TID, "sha256": "0" * 64, "name": "f"})])
    inputs, ended, effects = _planned(done, "NodeA", origin(hold=True), T0 + 1)
    assert (inputs, ended.phase, effects) == ([(TID, L.Receipt())], L.DELIVERED, [L.Drop(TID, "delivered")])
    assert _planned(net, "NodeA", origin(hold=True), T0 + 100)[2] == [L.Fail(TID, "not delivered within 100 s")]
    handed = relay(phase=L.HANDED, hop="NodeE", token=1, handed_at=T0)
    assert _planned(net, "NodeB", handed, T0 + 150)[0] == [(TID, L.Tick())]  # its resend is due...
    assert _planned(net, "NodeB", _operator(handed, L.Hold(), T0), T0 + 150)[0] == []  # ...but held


def test_flush_ends_the_backoff_and_the_avoided_hops_once():
    net = _net()
    t = origin(retry_at=T0 + 40, attempts=3, avoid=frozenset({"NodeB"}), reason="NodeB: down")
    assert _planned(net, "NodeA", t, T0 + 1)[0] == []
    t = _operator(t, L.Flush(), T0 + 1)
    _, t, effects = _planned(net, "NodeA", t, T0 + 1)
    assert effects == [L.Offer(TID, "NodeB", 1)]  # B is tried again
    assert (t.flush, t.attempts, t.avoid) == (False, 0, frozenset())


def test_flush_resends_a_handed_transfer_now_around_the_hop_that_has_it():
    net = _net()
    t = origin(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0)
    assert _planned(net, "NodeA", t, T0 + 1)[0] == [] and t.wake_at(POLICY) == T0 + POLICY.resend_after
    t = _operator(t, L.Flush(), T0 + 1)
    assert (t.phase, t.hop, t.handed_at, t.tried) == (L.QUEUED, None, None, {"NodeB"})
    _, t, effects = _planned(net, "NodeA", t, T0 + 1)
    assert effects == [L.Offer(TID, "NodeC", 2)] and t.tried == {"NodeB"}


def test_no_route_is_the_last_error_unless_a_hop_failed_first():
    net = _net([("NodeA", E.LINK_DOWN, {"peer": "NodeB"}), ("NodeA", E.LINK_DOWN, {"peer": "NodeC"})])
    _, t, effects = _planned(net, "NodeA", origin(), T0 + 1)
    assert t.reason == "no route to NodeE over up links"
    assert effects == [L.Note(TID, "relay.no_route", t.reason)]
    _, t, _ = _planned(net, "NodeA", origin(reason="NodeB: ConnectionRefusedError: refused"), T0 + 1)
    assert t.reason == "NodeB: ConnectionRefusedError: refused"


# -- ids, rows, states ---------------------------------------------------------------------------

def test_a_transfer_is_named_by_a_unique_prefix():
    ids = ["ab12" + "0" * 28, "ab34" + "0" * 28, "cd" + "0" * 30]
    assert resolve("ab1", ids) == ids[0]
    assert resolve("cd", ids) == ids[2]
    with pytest.raises(MaildropError, match="matches 2 transfers") as exc:
        resolve("ab", ids)
    assert exc.value.exit_status == 2
    with pytest.raises(MaildropError, match="no transfer ff") as exc:
        resolve("ff", ids)
    assert exc.value.exit_status == 1
    for bad in ("", "AB12", "xyz", "a" * 33):
        with pytest.raises(MaildropError) as exc:
            resolve(bad, ids)
        assert exc.value.exit_status == 2


NOW = T0 + 10
MOVING = {"peer": "NodeB", "bytes": 7}
FIELDS = ("state", "hop", "bytes", "next_try", "last_error")
ROWS = [  # (the transfer's state, its bytes moving now), the row fields the listing shows
    ((origin(), None), ("queued", None, None, NOW, "")),
    ((origin(retry_at=NOW + 4, attempts=1, reason="NodeB: down"), None),
     ("deferred", None, None, NOW + 4, "NodeB: down")),
    ((relay(phase=L.REFUSED, reason="refused by NodeE: too-large: 2 > 1"), None),
     ("deferred", None, None, None, "refused by NodeE: too-large: 2 > 1")),
    ((origin(phase=L.OFFERING, hop="NodeB", token=1), None), ("in-flight", "NodeB", None, None, "")),
    ((origin(phase=L.SENDING, hop="NodeB", token=1, offset=3), MOVING), ("in-flight", "NodeB", 7, None, "")),
    ((origin(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0), None),
     ("handed", "NodeB", None, T0 + POLICY.resend_after, "")),
    ((relay(phase=L.HANDED, hop="NodeE", token=1, handed_at=T0), None),
     ("handed", "NodeE", None, T0 + POLICY.confirm_after, "")),
    ((origin(hold=True, retry_at=NOW + 4), None), ("held", None, None, None, "")),
    ((origin(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0, hold=True), None),
     ("held", None, None, None, "")),
    ((destination(phase=L.DELIVERING, retry_at=INF), None), ("delivering", None, None, None, "")),
    ((destination(phase=L.DELIVERING, retry_at=NOW + 30, attempts=2,
                  reason="delivery into inbox/NodeA/ failed: Permission denied"), None),
     ("delivering", None, None, NOW + 30, "delivery into inbox/NodeA/ failed: Permission denied")),
    ((L.arriving(TID, "NodeA", "NodeE", 1, T0, "NodeC", "NodeB", 0, ("NodeA", "NodeB")), None),
     ("receiving", "NodeB", None, None, "")),
    ((L.arriving(TID, "NodeA", "NodeE", 10, T0, "NodeC", "NodeB", 3, ("NodeA", "NodeB")), MOVING),
     ("receiving", "NodeB", 7, None, "")),
]


@pytest.mark.parametrize(("given", "want"), ROWS, ids=[f"{g[0].phase}-{w[0]}" for g, w in ROWS])
def test_queue_rows_say_state_hop_bytes_next_try_and_the_reason(given, want):
    t, moving = given
    row = held_row(t, None, NOW, POLICY, moving)
    assert tuple(row[k] for k in FIELDS) == want
    assert (row["id"], row["name"]) == (TID, None)  # no queued event here: nothing made up


def test_every_row_state_of_a_held_transfer_is_a_listed_one_and_each_phase_has_one():
    shown = {want[0] for _, want in ROWS}
    assert shown == {"queued", "deferred", "in-flight", "handed", "held", "delivering", "receiving"}
    assert shown <= set(STATES)
    live = {L.RECEIVING, L.QUEUED, L.OFFERING, L.SENDING, L.HANDED, L.REFUSED, L.DELIVERING}
    assert {given[0].phase for given, _ in ROWS} == live  # every phase the service holds


def test_a_row_takes_its_facts_from_the_queued_event_and_the_name_as_opened():
    feeds = network_of(EDGES)
    queued = feeds["NodeA"].add(E.TRANSFER_QUEUED, {"transfer": TID, "destination": "NodeE",
                                                    "name": "report.txt", "size": 1, "sha256": "0" * 64})
    row = held_row(origin(), queued, NOW, POLICY, name="report.txt")
    assert (row["origin"], row["destination"], row["name"], row["size"], row["queued"]) == \
        ("NodeA", "NodeE", "report.txt", 1, queued.ts)
    # A sealed transfer at a relay: the name is not this node's to read, and none is made up.
    assert held_row(origin(), queued, NOW, POLICY)["name"] is None


def test_the_cli_lists_every_queue_state():
    assert cli.QUEUE_STATES == STATES
    assert "Exit status: 0 done; 1 operational failure" in cli.build_parser()._subparsers._group_actions[0] \
        .choices["cancel"].format_help().replace("\n", " ").replace("  ", " ")


def test_holds_file_round_trip_and_an_unreadable_one_holds_nothing(tmp_path, caplog):
    holds = Holds(tmp_path)
    assert holds.load() == {}
    holds.save({TID: {"origin": "NodeA", "at": T0}})
    assert holds.load() == {TID: {"origin": "NodeA", "at": T0}}
    assert json.loads((tmp_path / "holds.json").read_bytes())["v"] == 1
    (tmp_path / "holds.json").write_text("{not json")
    assert holds.load() == {}
    assert "control.holds.unreadable" in caplog.text


# -- the request files, with the agent's lock held by the test ---------------------------------

@pytest.fixture
def node(tmp_path):
    """A real node folder (key, config, log) whose 'agent' is this test: it holds the agent's
    lock and runs a custody service, which holds one transfer taken from the outbox (for
    NodeZ, a node with no route: it is never offered)."""
    n = LocalNode(tmp_path, "NodeA", dict(os.environ))
    config = load_config(n.config_path)
    # NodeZ's key is pinned (as a configured peer's is), so the file can be sealed to it;
    # no link to it was ever announced, so it has no route.
    elog = EventLog(config.events_path, pinned={"NodeZ": node_key("NodeZ").public_line},
                    me=config.node_id)
    custody = Custody(config.node_id, load_key(config.key_path), elog, Spool(config.spool),
                      config.inbox, config.failed, max_file_size=2**30, min_free_space=0)
    lock = os.open(config.state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        with custody_service(custody, elog, POLICY) as (custodian, offers):
            control = Control(config.state_dir, custody, custodian, lambda: POLICY)
            control.start()
            src = config.outbox / "NodeZ"
            src.mkdir(parents=True)
            (src / "doc.txt").write_bytes(b"hello")
            tid = custody.take(src / "doc.txt", "NodeZ")
            wait_until(lambda: custodian.snapshot().get(tid, origin()).reason.startswith("no route"),
                       10, "the service to hold and plan the transfer")
            yield config, custody, custodian, control, tid
            assert offers == []  # no route: nothing was ever offered
    finally:
        os.close(lock)
        elog.close()


def _serve(control, stop):
    while not stop.wait(0.02):
        control.poll()


def test_requests_are_applied_by_the_agent_and_answered(node):
    config, custody, custodian, control, tid = node
    stop = threading.Event()
    t = threading.Thread(target=_serve, args=(control, stop), daemon=True)
    t.start()
    try:
        assert [r["state"] for r in request(config, "queue", timeout=5).rows] == ["deferred"]
        ans = request(config, "hold", tid[:8], timeout=5)
        assert (ans.status, ans.agent) == (0, True) and "held" in ans.message
        assert custodian.snapshot()[tid].hold is True
        assert set(Holds(config.state_dir).load()) == {tid}
        assert request(config, "flush", tid[:8], timeout=5).status == 1  # on hold
        rows = request(config, "queue", timeout=5).rows
        assert [(r["id"], r["state"], r["name"], r["destination"]) for r in rows] == \
            [(tid, "held", "doc.txt", "NodeZ")]
        assert request(config, "release", tid[:8], timeout=5).status == 0
        assert custodian.snapshot()[tid].hold is False and Holds(config.state_dir).load() == {}
        assert request(config, "release", tid[:8], timeout=5).status == 1
        before = custodian.snapshot()[tid]
        flushed_at = time.time()
        assert before.retry_at > flushed_at + 60  # no route: its next try is idle_retry away
        assert request(config, "flush", None, all_=True, timeout=5).status == 0
        # Flushed: planned again at once (still no route), not at its old next try.
        wait_until(lambda: custodian.snapshot()[tid].retry_at > before.retry_at, 5,
                   "the flushed transfer to be planned again at once")
        assert custodian.snapshot()[tid].flush is False  # once
        ans = request(config, "cancel", tid, timeout=5)
        assert ans.status == 0, ans.message
        assert (config.failed / "doc.txt").read_bytes() == b"hello"
        assert "cancelled" in (config.failed / "doc.txt.reason").read_text()
        assert tid not in custodian.snapshot()
        assert request(config, "cancel", tid, timeout=5).status == 1  # already failed
        # A cancelled transfer offered again (by a relay that has not heard) is refused.
        offer = {"transfer": tid, "queued": custody.queued_event(tid).to_dict(), "route": ["NodeB"]}
        with pytest.raises(TransferRefused) as refused:
            custody._check_offer("NodeB", offer, custody._parse_offered(offer))
        assert refused.value.reason == "failed"
    finally:
        stop.set()
        t.join()
    assert sorted(os.listdir(config.state_dir / "control")) == []  # every answer was read


def test_a_request_nobody_picks_up_is_withdrawn_and_changes_nothing(node):
    config, custody, custodian, control, tid = node
    ans = request(config, "hold", tid[:8], timeout=0.3)
    assert ans.status == 1 and "did not pick up" in ans.message and "nothing was changed" in ans.message
    assert os.listdir(config.state_dir / "control") == []
    control.poll()
    assert custodian.snapshot()[tid].hold is False
    ans = request(config, "queue", timeout=0.3)  # queue falls back to the log and spool
    assert ans.status == 0 and not ans.agent and "log and spool" in ans.message
    assert [r["id"] for r in ans.rows] == [tid]


def test_an_expired_request_is_dropped_unapplied_and_a_bad_one_answered(node, caplog):
    config, custody, custodian, control, tid = node
    folder = config.state_dir / "control"
    (folder / "1-x.req").write_text(json.dumps({"v": 1, "op": "hold", "transfer": tid, "all": False,
                                                "expires": 1.0}))
    (folder / "2-y.req").write_text("garbage")
    control.poll()
    assert custodian.snapshot()[tid].hold is False
    assert sorted(os.listdir(folder)) == ["2-y.ack"]
    assert json.loads((folder / "2-y.ack").read_bytes())["status"] == 2
    assert "control.request.failed" not in caplog.text
