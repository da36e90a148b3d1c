"""The relay planner: exact actions for held transfers, no clock, no I/O."""

from maildrop import events as E
from maildrop.model import fold
from maildrop.relay import Drop, Expire, Held, Policy, Send, plan, relay_keep
from tests.factories import T0, FeedWriter, network_of

TID = "e" * 32
POLICY = Policy(expire_after=100.0, resend_after=50.0, reroute_after=3, idle_retry=5.0)
EDGES = [("NodeA", "NodeB"), ("NodeB", "NodeE"), ("NodeA", "NodeC"), ("NodeC", "NodeD"), ("NodeD", "NodeE")]


def _world(extra=()):
    feeds = network_of(EDGES)
    feeds["NodeA"].add(E.TRANSFER_QUEUED, {"transfer": TID, "destination": "NodeE", "name": "f",
                                           "size": 1, "sha256": "0" * 64})
    for who, type_, data in extra:
        feeds[who].add(type_, data)
    return feeds, fold(ev for f in feeds.values() for ev in f.events)


def held(**kw):
    base = {"transfer": TID, "origin": "NodeA", "destination": "NodeE", "queued_at": T0}
    base.update(kw)
    return Held(**base)


def test_origin_sends_along_the_shortest_route():
    _, net = _world()
    p = plan(net, "NodeA", [held()], T0 + 1, POLICY)
    assert p.actions == [Send(TID, "NodeB")]
    assert p.wake_at == T0 + 100  # the expiry is the next thing due


def test_after_repeated_failures_the_holder_reroutes():
    _, net = _world()
    h = held(failures={"NodeB": 3})
    assert plan(net, "NodeA", [h], T0 + 1, POLICY).actions == [Send(TID, "NodeC")]


def test_a_relay_never_sends_back_where_it_came_from_unless_no_other_way():
    _, net = _world()
    h = held(passed=("NodeA",))
    assert plan(net, "NodeB", [h], T0 + 1, POLICY).actions == [Send(TID, "NodeE")]
    h = held(passed=("NodeA", "NodeB"), failures={"NodeE": 3})
    # From C, going on to D is fine; going back to A only if nothing else works.
    assert plan(net, "NodeC", [held(passed=("NodeA",))], T0 + 1, POLICY).actions == [Send(TID, "NodeD")]


def test_no_route_waits_and_retries_later():
    _, net = _world([("NodeA", E.LINK_DOWN, {"peer": "NodeB"}), ("NodeA", E.LINK_DOWN, {"peer": "NodeC"})])
    h = held()
    p = plan(net, "NodeA", [h], T0 + 1, POLICY)
    assert p.actions == []
    assert p.wake_at == T0 + 1 + POLICY.idle_retry
    assert plan(net, "NodeA", [h], T0 + 2, POLICY).actions == []  # not before retry_at


def test_receipt_drops_every_copy():
    _, net = _world([("NodeE", E.TRANSFER_DELIVERED, {"transfer": TID, "sha256": "0" * 64, "name": "f"})])
    assert plan(net, "NodeA", [held()], T0 + 1, POLICY).actions == [Drop(TID, "delivered")]
    assert plan(net, "NodeB", [held(passed=("NodeA",))], T0 + 1, POLICY).actions == [Drop(TID, "delivered")]


def test_expiry_at_the_origin_and_relays_drop_failed_transfers():
    _, net = _world()
    acts = plan(net, "NodeA", [held()], T0 + 100, POLICY).actions
    assert len(acts) == 1 and isinstance(acts[0], Expire)
    _, net = _world([("NodeA", E.TRANSFER_FAILED, {"transfer": TID, "reason": "expired"})])
    assert plan(net, "NodeB", [held(passed=("NodeA",))], T0 + 1, POLICY).actions == [Drop(TID, "origin gave up")]


def test_origin_keeps_its_copy_then_resends_over_another_path():
    _, net = _world()
    h = held(handed_to="NodeB", handed_at=T0 + 1)
    p = plan(net, "NodeA", [h], T0 + 10, POLICY)
    assert p.actions == [] and p.wake_at == T0 + 51
    assert plan(net, "NodeA", [h], T0 + 51, POLICY).actions == [Send(TID, "NodeC")]


def test_in_flight_transfers_are_left_alone():
    _, net = _world()
    assert plan(net, "NodeA", [held(in_flight=True)], T0 + 1, POLICY).actions == []


def test_conflicted_nodes_are_never_used():
    _, net = _world()
    assert plan(net, "NodeA", [held()], T0 + 1, POLICY, excluded={"NodeB"}).actions == [Send(TID, "NodeC")]


def test_f1_a_rival_claim_delivered_or_failed_does_not_drop_the_held_copy():
    feeds, _ = _world()
    minted = FeedWriter("-")  # sorts before every real node id
    minted.configured()
    minted.add(E.TRANSFER_QUEUED, {"transfer": TID, "destination": "-", "name": "x", "size": 2,
                                   "sha256": "3" * 64})
    minted.add(E.TRANSFER_DELIVERED, {"transfer": TID, "sha256": "3" * 64, "name": "x"})
    minted.add(E.TRANSFER_FAILED, {"transfer": TID, "reason": "forged"})
    net = fold([*(ev for f in feeds.values() for ev in f.events), *minted.events])
    assert plan(net, "NodeA", [held()], T0 + 1, POLICY).actions == [Send(TID, "NodeB")]
    assert plan(net, "NodeC", [held(passed=("NodeA",))], T0 + 1, POLICY).actions == [Send(TID, "NodeD")]


def test_f9_a_relay_keeps_its_copy_until_the_hop_signs_custody():
    _, net = _world()
    h = held(passed=("NodeA",), handed_to="NodeD", handed_at=T0 + 1)
    p = plan(net, "NodeC", [h], T0 + 10, POLICY)
    assert p.actions == [] and p.wake_at == T0 + 1 + POLICY.confirm_after
    # No signed custody in time: resend, over another path than the hop that said "stored".
    assert plan(net, "NodeC", [h], T0 + 1 + POLICY.confirm_after, POLICY).actions == [Send(TID, "NodeA")]
    _, net = _world([("NodeD", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeC"})])
    h = held(passed=("NodeA",), handed_to="NodeD", handed_at=T0 + 1)
    assert plan(net, "NodeC", [h], T0 + 2, POLICY).actions == [Drop(TID, "stored by NodeD")]
    # Custody taken from someone else is no evidence that the hop has *our* copy.
    h = held(passed=("NodeA",), handed_to="NodeD", handed_at=T0 + 1)
    assert plan(net, "NodeB", [h], T0 + 2, POLICY).actions == []


def test_f9_a_route_naming_every_node_never_excludes_every_path():
    _, net = _world()
    h = held(passed=("NodeA", "NodeB", "NodeC", "NodeD", "NodeE"))  # a route naming everyone
    assert plan(net, "NodeA", [h], T0 + 1, POLICY).actions == [Send(TID, "NodeB")]


def test_f8_relays_drop_copies_past_the_keep_limit_origins_never():
    _, net = _world()
    keep = relay_keep(POLICY)
    assert keep == 200.0  # expire_after + min(expire_after, relay_grace)
    relay = held(passed=("NodeA",))
    assert plan(net, "NodeB", [relay], T0 + keep - 1, POLICY).actions == [Send(TID, "NodeE")]
    assert plan(net, "NodeB", [held(passed=("NodeA",))], T0 + keep, POLICY).actions == [
        Drop(TID, "kept 200 s at a relay")]
    acts = plan(net, "NodeA", [held()], T0 + keep, POLICY).actions
    assert len(acts) == 1 and isinstance(acts[0], Expire)  # the origin expires into failed/
