"""Queue control: the planner's hold and flush (pure), id prefixes, queue rows, the holds
file and the request/answer files between the CLI and an agent (real files, no agent
process: the test holds the agent's lock and serves ``Control.poll`` on a thread)."""

import fcntl
import json
import os
import threading

import pytest

from maildrop import cli
from maildrop import events as E
from maildrop.agent import open_log
from maildrop.config import load_config
from maildrop.control import STATES, Control, Holds, held_row, request, resolve
from maildrop.errors import MaildropError, TransferRefused
from maildrop.keys import load_key
from maildrop.localnet import LocalNode
from maildrop.model import fold
from maildrop.relay import Drop, Held, Policy, Send, plan
from maildrop.spool import Spool
from maildrop.transfers import Custody
from tests.factories import T0, network_of

TID = "e" * 32
POLICY = Policy(expire_after=100.0, resend_after=50.0, reroute_after=3, idle_retry=5.0)
EDGES = [("NodeA", "NodeB"), ("NodeB", "NodeE"), ("NodeA", "NodeC"), ("NodeC", "NodeD"), ("NodeD", "NodeE")]


def _net(extra=()):
    feeds = network_of(EDGES)
    feeds["NodeA"].add(E.TRANSFER_QUEUED, {"transfer": TID, "destination": "NodeE", "name": "f",
                                           "size": 1, "sha256": "0" * 64})
    for who, type_, data in extra:
        feeds[who].add(type_, data)
    return fold(ev for f in feeds.values() for ev in f.events)


def held(**kw):
    base = {"transfer": TID, "origin": "NodeA", "destination": "NodeE", "queued_at": T0}
    base.update(kw)
    return Held(**base)


# -- the planner ---------------------------------------------------------------------------------

def test_a_held_transfer_is_never_offered_but_still_ends():
    net = _net()
    h = held(hold=True)
    p = plan(net, "NodeA", [h], T0 + 1, POLICY)
    assert p.actions == [] and p.wake_at == T0 + 100  # only its expiry is due
    h.hold = False
    assert plan(net, "NodeA", [h], T0 + 2, POLICY).actions == [Send(TID, "NodeB")]
    done = _net([("NodeE", E.TRANSFER_DELIVERED, {"transfer": TID, "sha256": "0" * 64, "name": "f"})])
    assert plan(done, "NodeA", [held(hold=True)], T0 + 1, POLICY).actions == [Drop(TID, "delivered")]
    handed = held(hold=True, handed_to="NodeB", handed_at=T0, passed=("NodeA",))
    assert plan(net, "NodeB", [handed], T0 + 150, POLICY).actions == []  # resend due, but held


def test_flush_ends_the_backoff_and_the_avoided_hops_once():
    net = _net()
    h = held(retry_at=T0 + 40, failures={"NodeB": 3})
    assert plan(net, "NodeA", [h], T0 + 1, POLICY).actions == []
    h.flush = True
    assert plan(net, "NodeA", [h], T0 + 1, POLICY).actions == [Send(TID, "NodeB")]  # B is tried again
    assert h.flush is False and h.failures == {} and h.retry_at == 0.0


def test_flush_resends_a_handed_transfer_now_around_the_hop_that_has_it():
    net = _net()
    h = held(handed_to="NodeB", handed_at=T0)
    p = plan(net, "NodeA", [h], T0 + 1, POLICY)
    assert p.actions == [] and p.wake_at == T0 + POLICY.resend_after
    h.flush = True
    assert plan(net, "NodeA", [h], T0 + 1, POLICY).actions == [Send(TID, "NodeC")]
    assert h.handed_to is None and h.tried == {"NodeB"}


def test_no_route_is_the_last_error_unless_a_hop_failed_first():
    net = _net([("NodeA", E.LINK_DOWN, {"peer": "NodeB"}), ("NodeA", E.LINK_DOWN, {"peer": "NodeC"})])
    h = held()
    plan(net, "NodeA", [h], T0 + 1, POLICY)
    assert h.last_error == "no route to NodeE over up links"
    h2 = held(last_error="NodeB: ConnectionRefusedError: refused")
    plan(net, "NodeA", [h2], T0 + 1, POLICY)
    assert h2.last_error == "NodeB: ConnectionRefusedError: refused"


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


def test_queue_rows_say_state_and_next_try():
    now = T0 + 10
    row = held_row(held(), None, "NodeA", now, POLICY)
    assert (row["state"], row["next_try"]) == ("queued", now)
    row = held_row(held(retry_at=now + 4, last_error="NodeB: down"), None, "NodeA", now, POLICY)
    assert (row["state"], row["next_try"], row["last_error"]) == ("deferred", now + 4, "NodeB: down")
    row = held_row(held(handed_to="NodeB", handed_at=T0), None, "NodeA", now, POLICY)
    assert (row["state"], row["hop"], row["next_try"]) == ("handed", "NodeB", T0 + POLICY.resend_after)
    relay = held_row(held(handed_to="NodeE", handed_at=T0, passed=("NodeA",)), None, "NodeB", now, POLICY)
    assert relay["next_try"] == T0 + POLICY.confirm_after
    row = held_row(held(in_flight=True), None, "NodeA", now, POLICY, {"peer": "NodeB", "bytes": 7})
    assert (row["state"], row["hop"], row["bytes"], row["next_try"]) == ("in-flight", "NodeB", 7, None)
    row = held_row(held(hold=True, retry_at=now + 4), None, "NodeA", now, POLICY)
    assert (row["state"], row["next_try"]) == ("held", None)


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
    lock and a Custody with one transfer taken from the outbox."""
    n = LocalNode(tmp_path, "NodeA", dict(os.environ))
    config = load_config(n.config_path)
    elog = open_log(config)
    custody = Custody(config.node_id, load_key(config.key_path), elog, Spool(config.spool),
                      config.inbox, config.failed, max_file_size=2**30, min_free_space=0)
    src = config.outbox / "NodeZ"
    src.mkdir(parents=True)
    (src / "doc.txt").write_bytes(b"hello")
    tid = custody.take(src / "doc.txt", "NodeZ")
    lock = os.open(config.state_dir / "agent.lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    kicks = []
    control = Control(config.state_dir, custody, lambda: POLICY, lambda: kicks.append(1))
    control.start()
    yield config, custody, control, tid, kicks
    os.close(lock)
    elog.close()


def _serve(control, stop):
    while not stop.wait(0.02):
        control.poll()


def test_requests_are_applied_by_the_agent_and_answered(node):
    config, custody, control, tid, kicks = node
    stop = threading.Event()
    t = threading.Thread(target=_serve, args=(control, stop), daemon=True)
    t.start()
    try:
        ans = request(config, "hold", tid[:8], timeout=5)
        assert (ans.status, ans.agent) == (0, True) and "held" in ans.message
        assert custody.held[tid].hold is True
        assert set(Holds(config.state_dir).load()) == {tid}
        assert request(config, "flush", tid[:8], timeout=5).status == 1  # on hold
        rows = request(config, "queue", timeout=5).rows
        assert [(r["id"], r["state"], r["name"], r["destination"]) for r in rows] == \
            [(tid, "held", "doc.txt", "NodeZ")]
        assert request(config, "release", tid[:8], timeout=5).status == 0
        assert custody.held[tid].hold is False and Holds(config.state_dir).load() == {}
        assert request(config, "release", tid[:8], timeout=5).status == 1
        kicks.clear()
        assert request(config, "flush", None, all_=True, timeout=5).status == 0
        assert custody.held[tid].flush is True and kicks
        ans = request(config, "cancel", tid, timeout=5)
        assert ans.status == 0, ans.message
        assert (config.failed / "doc.txt").read_bytes() == b"hello"
        assert "cancelled" in (config.failed / "doc.txt.reason").read_text()
        assert tid not in custody.held
        assert request(config, "cancel", tid, timeout=5).status == 1  # already failed
        # A cancelled transfer offered again (by a relay that has not heard) is refused.
        offer = {"transfer": tid, "queued": custody.queued_event(tid).to_dict(), "route": ["NodeB"]}
        with pytest.raises(TransferRefused) as refused:
            custody._check_offer("NodeB", offer)
        assert refused.value.reason == "failed"
    finally:
        stop.set()
        t.join()
    assert sorted(os.listdir(config.state_dir / "control")) == []  # every answer was read


def test_a_request_nobody_picks_up_is_withdrawn_and_changes_nothing(node):
    config, custody, control, tid, _ = node
    ans = request(config, "hold", tid[:8], timeout=0.3)
    assert ans.status == 1 and "did not pick up" in ans.message and "nothing was changed" in ans.message
    assert os.listdir(config.state_dir / "control") == []
    control.poll()
    assert custody.held[tid].hold is False
    ans = request(config, "queue", timeout=0.3)  # queue falls back to the log and spool
    assert ans.status == 0 and not ans.agent and "log and spool" in ans.message
    assert [r["id"] for r in ans.rows] == [tid]


def test_an_expired_request_is_dropped_unapplied_and_a_bad_one_answered(node, caplog):
    config, custody, control, tid, _ = node
    folder = config.state_dir / "control"
    (folder / "1-x.req").write_text(json.dumps({"v": 1, "op": "hold", "transfer": tid, "all": False,
                                                "expires": 1.0}))
    (folder / "2-y.req").write_text("garbage")
    control.poll()
    assert custody.held[tid].hold is False
    assert sorted(os.listdir(folder)) == ["2-y.ack"]
    assert json.loads((folder / "2-y.ack").read_bytes())["status"] == 2
    assert "control.request.failed" not in caplog.text
