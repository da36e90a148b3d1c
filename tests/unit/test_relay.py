"""The planner: exact lifecycle inputs for the transfers a node deals with, no clock, no I/O.

Where a property is about what finally happens (a copy dropped, a transfer failed, an offer
to another hop), the planner's input is stepped through the machine (``_then``), as the
custody service does, and the effects are asserted exactly.
"""

from maildrop import events as E
from maildrop import lifecycle as L
from maildrop.lifecycle import (
    Broke,
    Confirmed,
    Deliver,
    Drop,
    Fail,
    GaveUp,
    LinkDown,
    NoPathLeft,
    Note,
    Offer,
    Policy,
    Receipt,
    Refused,
    RefusedDownstream,
    Report,
    Route,
    Tick,
    Transfer,
    step,
)
from maildrop.model import fold
from maildrop.relay import choose_hop, plan
from tests.factories import T0, FeedWriter, network_of

TID = "e" * 32
POLICY = Policy(expire_after=100.0, resend_after=50.0, confirm_after=20.0, idle_retry=5.0)
EDGES = [("NodeA", "NodeB"), ("NodeB", "NodeE"), ("NodeA", "NodeC"), ("NodeC", "NodeD"), ("NodeD", "NodeE")]


def _world(extra=(), edges=EDGES):
    feeds = network_of(edges)
    feeds["NodeA"].add(E.TRANSFER_QUEUED, {"transfer": TID, "destination": "NodeE", "name": "f",
                                           "size": 1, "sha256": "0" * 64})
    for who, type_, data in extra:
        feeds[who].add(type_, data)
    return feeds, fold(ev for f in feeds.values() for ev in f.events)


def _net(feeds):
    return fold(ev for f in feeds.values() for ev in f.events)


def origin(**kw) -> Transfer:
    return Transfer(TID, "NodeA", "NodeE", 1, T0, L.ORIGIN, **kw)


def relay(**kw) -> Transfer:
    kw.setdefault("passed", ("NodeA",))
    return Transfer(TID, "NodeA", "NodeE", 1, T0, L.RELAY, **kw)


def _plan(net, me, t, now, excluded=()):
    return plan(net, me, [t], now, POLICY, excluded)


def _then(net, me, t, now, excluded=()):
    """Plan ``t`` and step its machine with the planner's input, as the custody service
    does: the next transfer and its effects (``t`` and no effects when nothing is due)."""
    out = _plan(net, me, t, now, excluded)
    if not out:
        return t, []
    [(tid, inp)] = out
    assert tid == t.id
    return step(t, inp, now, POLICY)


def test_origin_sends_along_the_shortest_route():
    _, net = _world()
    assert _plan(net, "NodeA", origin(), T0 + 1) == [(TID, Route("NodeB"))]
    t, effects = _then(net, "NodeA", origin(), T0 + 1)
    assert effects == [Offer(TID, "NodeB", 1)]
    assert t.wake_at(POLICY) == T0 + 100  # the expiry is the next thing due


def test_after_a_failure_the_holder_reroutes():
    _, net = _world()
    t, _ = _then(net, "NodeA", origin(), T0 + 1)
    t, _ = step(t, Broke(1, "unreachable"), T0 + 2, POLICY)
    assert _plan(net, "NodeA", t, t.retry_at - 0.01) == []  # backing off
    t, effects = _then(net, "NodeA", t, t.retry_at)
    assert effects == [Offer(TID, "NodeC", 2)]  # around the hop that failed


def test_a_relay_reroutes_from_where_it_stands_when_its_next_hop_fails_or_goes_silent():
    # A-B, then B-C-E and B-D-E: B holds it for E; C is its next hop, D the other path.
    edges = [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeE"), ("NodeB", "NodeD"),
             ("NodeD", "NodeE")]
    _, net = _world(edges=edges)
    t, effects = _then(net, "NodeB", relay(), T0 + 1)
    assert effects == [Offer(TID, "NodeC", 1)]
    failed, _ = step(t, Refused(1, "no-space", "disk full"), T0 + 2, POLICY)
    assert _then(net, "NodeB", failed, failed.retry_at)[1] == [Offer(TID, "NodeD", 2)]
    # Silent (link down, the model not caught up yet): re-planned at once, around C.
    silent, _ = step(t, LinkDown("NodeC"), T0 + 3, POLICY)
    assert _then(net, "NodeB", silent, T0 + 3)[1] == [Offer(TID, "NodeD", 3)]


def test_a_relay_never_sends_back_where_it_came_from_unless_no_other_way():
    _, net = _world()
    assert _plan(net, "NodeB", relay(), T0 + 1) == [(TID, Route("NodeE"))]
    # From C, going on to D is fine; going back to A only if nothing else works.
    assert _plan(net, "NodeC", relay(), T0 + 1) == [(TID, Route("NodeD"))]
    t, _ = _then(net, "NodeC", relay(), T0 + 1)
    t, _ = step(t, Broke(1, "unreachable"), T0 + 2, POLICY)
    assert _then(net, "NodeC", t, t.retry_at)[1] == [Offer(TID, "NodeA", 2)]


def test_a_failed_hop_is_tried_again_when_it_is_the_only_way():
    _, net = _world()
    t, _ = _then(net, "NodeB", relay(), T0 + 1)
    assert t.hop == "NodeE"
    t, _ = step(t, Broke(1, "unreachable"), T0 + 2, POLICY)
    assert _then(net, "NodeB", t, t.retry_at)[1] == [Offer(TID, "NodeE", 2)]  # the destination
    assert choose_hop(net, "NodeC", relay(avoid=frozenset({"NodeD"}), passed=("NodeA",)),
                      excluded={"NodeA"}) == "NodeD"  # avoided, never excluded outright


def test_no_route_waits_and_retries_later():
    _, net = _world([("NodeA", E.LINK_DOWN, {"peer": "NodeB"}), ("NodeA", E.LINK_DOWN, {"peer": "NodeC"})])
    assert _plan(net, "NodeA", origin(), T0 + 1) == [(TID, Route(None))]
    t, effects = _then(net, "NodeA", origin(), T0 + 1)
    assert effects == [Note(TID, "relay.no_route", "no route to NodeE over up links")]
    assert t.wake_at(POLICY) == T0 + 1 + POLICY.idle_retry
    assert _plan(net, "NodeA", t, T0 + 2) == []  # not before retry_at
    assert _plan(net, "NodeA", t, T0 + 1 + POLICY.idle_retry) == [(TID, Route(None))]


def test_receipt_drops_every_copy():
    _, net = _world([("NodeE", E.TRANSFER_DELIVERED, {"transfer": TID, "sha256": "0" * 64, "name": "f"})])
    for me, t in [("NodeA", origin()), ("NodeB", relay()), ("NodeA", origin(hold=True)),
                  ("NodeA", origin(phase=L.OFFERING, hop="NodeB", token=1)),
                  ("NodeC", relay(phase=L.HANDED, hop="NodeD", token=1, handed_at=T0))]:
        assert _plan(net, me, t, T0 + 1) == [(TID, Receipt())]
        assert _then(net, me, t, T0 + 1)[1] == [Drop(TID, "delivered")]


def test_expiry_at_the_origin_and_relays_drop_failed_transfers():
    _, net = _world()
    assert _plan(net, "NodeA", origin(), T0 + 100) == [(TID, Tick())]
    assert _then(net, "NodeA", origin(), T0 + 100)[1] == [Fail(TID, "not delivered within 100 s")]
    _, net = _world([("NodeA", E.TRANSFER_FAILED, {"transfer": TID, "reason": "expired"})])
    assert _plan(net, "NodeB", relay(), T0 + 1) == [(TID, GaveUp())]
    assert _then(net, "NodeB", relay(), T0 + 1)[1] == [Drop(TID, "origin gave up")]
    assert _then(net, "NodeA", origin(), T0 + 1)[1] == [Drop(TID, "failed")]


def test_the_destination_retries_its_delivery_even_after_the_origin_gave_up():
    _, net = _world([("NodeA", E.TRANSFER_FAILED, {"transfer": TID, "reason": "expired"})])
    t = Transfer(TID, "NodeA", "NodeE", 1, T0, L.DESTINATION, phase=L.DELIVERING,
                 retry_at=T0 + 5, attempts=1, passed=("NodeA", "NodeB"))
    assert _plan(net, "NodeE", t, T0 + 4) == []
    assert _plan(net, "NodeE", t, T0 + 5) == [(TID, Tick())]  # not a GaveUp it would ignore
    assert _then(net, "NodeE", t, T0 + 5)[1] == [Deliver(TID)]


def test_origin_keeps_its_copy_then_resends_over_another_path():
    _, net = _world()
    t = origin(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0 + 1)
    assert _plan(net, "NodeA", t, T0 + 10) == []
    assert t.wake_at(POLICY) == T0 + 51
    t, effects = _then(net, "NodeA", t, T0 + 51)
    assert (effects, t.phase, t.tried) == ([], L.QUEUED, {"NodeB"})
    assert _then(net, "NodeA", t, T0 + 51)[1] == [Offer(TID, "NodeC", 2)]


def test_in_flight_transfers_are_left_alone():
    _, net = _world()
    for t in (origin(phase=L.OFFERING, hop="NodeB", token=1),
              origin(phase=L.SENDING, hop="NodeB", token=1, offset=1)):
        assert _plan(net, "NodeA", t, T0 + 1) == []
        assert _plan(net, "NodeA", t, T0 + 99) == []
    arriving = L.arriving(TID, "NodeA", "NodeE", 1, T0, "NodeB", "NodeA", 0, ("NodeA",))
    assert _plan(net, "NodeB", arriving, T0 + 10**6) == []  # its bytes decide, not the model


def test_conflicted_nodes_are_never_used():
    _, net = _world()
    assert _plan(net, "NodeA", origin(), T0 + 1, excluded={"NodeB"}) == [(TID, Route("NodeC"))]
    assert _plan(net, "NodeA", origin(), T0 + 1, excluded={"NodeB", "NodeC"}) == [(TID, Route(None))]


def test_f1_a_rival_claim_delivered_or_failed_does_not_drop_the_held_copy():
    feeds, _ = _world()
    minted = FeedWriter("-")  # sorts before every real node id
    minted.configured()
    minted.add(E.TRANSFER_QUEUED, {"transfer": TID, "destination": "-", "name": "x", "size": 2,
                                   "sha256": "3" * 64})
    minted.add(E.TRANSFER_DELIVERED, {"transfer": TID, "sha256": "3" * 64, "name": "x"})
    minted.add(E.TRANSFER_FAILED, {"transfer": TID, "reason": "forged"})
    net = fold([*(ev for f in feeds.values() for ev in f.events), *minted.events])
    assert _plan(net, "NodeA", origin(), T0 + 1) == [(TID, Route("NodeB"))]
    assert _plan(net, "NodeC", relay(), T0 + 1) == [(TID, Route("NodeD"))]


def test_f9_a_relay_keeps_its_copy_until_the_hop_signs_custody():
    _, net = _world()
    h = relay(phase=L.HANDED, hop="NodeD", token=1, handed_at=T0 + 1)
    assert _plan(net, "NodeC", h, T0 + 10) == []
    assert h.wake_at(POLICY) == T0 + 1 + POLICY.confirm_after
    # No signed custody in time: resend, over another path than the hop that said "stored".
    t, effects = _then(net, "NodeC", h, T0 + 1 + POLICY.confirm_after)
    assert (effects, t.tried) == ([], {"NodeD"})
    assert _then(net, "NodeC", t, T0 + 1 + POLICY.confirm_after)[1] == [Offer(TID, "NodeA", 2)]
    _, net = _world([("NodeD", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeC"})])
    assert _plan(net, "NodeC", h, T0 + 2) == [(TID, Confirmed("NodeD"))]
    t, effects = _then(net, "NodeC", h, T0 + 2)
    assert (effects, t.phase, t.hop) == ([Drop(TID, "stored by NodeD")], L.FORWARDED, "NodeD")
    assert _plan(net, "NodeC", t, T0 + 3) == []  # confirmed once: nothing more until an end
    # Custody taken from someone else is no evidence that the hop has *our* copy.
    assert _plan(net, "NodeB", h, T0 + 2) == []
    # Handed back to the origin: it always keeps its own copy.
    _, net = _world()
    back = relay(phase=L.HANDED, hop="NodeA", token=1, handed_at=T0 + 1)
    t, effects = _then(net, "NodeC", back, T0 + 2)
    assert (effects, t.phase, t.hop) == ([Drop(TID, "stored by NodeA")], L.FORWARDED, "NodeA")
    # The origin itself never lets go on custody, only on the receipt.
    _, net = _world([("NodeB", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeA"})])
    assert _plan(net, "NodeA", origin(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0 + 1),
                 T0 + 2) == []


def test_f9_a_route_naming_every_node_never_excludes_every_path():
    _, net = _world()
    t = origin(passed=("NodeA", "NodeB", "NodeC", "NodeD", "NodeE"))  # a route naming everyone
    assert _plan(net, "NodeA", t, T0 + 1) == [(TID, Route("NodeB"))]
    t = relay(passed=("NodeA", "NodeB", "NodeC", "NodeD", "NodeE"),
              avoid=frozenset({"NodeD"}), tried=frozenset({"NodeA"}))
    # Every neighbour avoided or passed: the shortest path still, never no route at all.
    assert _plan(net, "NodeC", t, T0 + 1) == [(TID, Route("NodeD"))]


def test_f8_relays_drop_copies_past_the_keep_limit_origins_never():
    _, net = _world()
    keep = POLICY.relay_keep()
    assert keep == 200.0  # expire_after + min(expire_after, relay_grace)
    assert _plan(net, "NodeB", relay(), T0 + keep - 1) == [(TID, Route("NodeE"))]
    assert _plan(net, "NodeB", relay(), T0 + keep) == [(TID, Tick())]
    assert _then(net, "NodeB", relay(), T0 + keep)[1] == [Drop(TID, "kept 200 s at a relay")]
    assert _then(net, "NodeA", origin(), T0 + keep)[1] == [
        Fail(TID, "not delivered within 100 s")]  # the origin expires into failed/


def test_on_hold_nothing_is_offered_but_the_model_still_ends_it():
    _, net = _world()
    assert _plan(net, "NodeA", origin(hold=True), T0 + 1) == []
    assert _plan(net, "NodeA", origin(hold=True), T0 + 100) == [(TID, Tick())]  # expiry
    _, net = _world([("NodeD", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeC"})])
    h = relay(phase=L.HANDED, hop="NodeD", token=1, handed_at=T0 + 1, hold=True)
    assert _plan(net, "NodeC", h, T0 + 2) == [(TID, Confirmed("NodeD"))]


def test_one_input_per_transfer_in_order_and_one_route_per_destination():
    _, net = _world()
    other = Transfer("f" * 32, "NodeA", "NodeE", 1, T0, L.ORIGIN)
    held = origin(hold=True)
    assert plan(net, "NodeA", [origin(), held, other], T0 + 1, POLICY) == [
        (TID, Route("NodeB")), ("f" * 32, Route("NodeB"))]
    routes: dict = {}
    for t in (origin(), other):
        choose_hop(net, "NodeA", t, routes=routes)
    assert len(routes) == 1  # the second transfer to NodeE reused the first one's path


# -- a permanent refusal downstream: reported by a custodian, believed only from one -------------
def _refusal(by_whom, origin_named="NodeA"):
    return (by_whom, E.TRANSFER_REFUSED, {"transfer": TID, "origin": origin_named, "by": "NodeE",
                                          "reason": "too-large", "detail": "12 > 10 bytes"})


def test_a_custodians_refusal_reaches_the_origin_and_fails_the_transfer():
    feeds, net = _world([("NodeB", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeA"})])
    # B (a relay holding it) offers it on to E, which refuses it for good: B reports it.
    b, _ = _then(net, "NodeB", relay(), T0 + 1)
    b, effects = step(b, Refused(1, "too-large", "12 > 10 bytes"), T0 + 2, POLICY)
    assert effects == [Report(TID, "NodeE", "too-large", "12 > 10 bytes")] and b.phase == L.REFUSED
    [report] = effects
    feeds["NodeB"].add(E.TRANSFER_REFUSED, {"transfer": TID, "origin": "NodeA", "by": report.by,
                                            "reason": report.reason, "detail": report.detail})
    net = _net(feeds)
    a = origin(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0 + 1)
    assert _plan(net, "NodeA", a, T0 + 3) == [
        (TID, RefusedDownstream("NodeE", "too-large", "12 > 10 bytes"))]
    a, effects = _then(net, "NodeA", a, T0 + 3)
    assert effects == [Fail(TID, "refused by NodeE: too-large: 12 > 10 bytes")]
    # B waits meanwhile (no offer, no drop), then drops its copy once the origin's failure is in.
    assert _plan(net, "NodeB", b, T0 + 3) == []
    feeds["NodeA"].add(E.TRANSFER_FAILED, {"transfer": TID, "reason": a.reason})
    assert _then(_net(feeds), "NodeB", b, T0 + 4)[1] == [Drop(TID, "origin gave up")]


def test_a_bystanders_refusal_report_is_ignored():
    # D never took custody of the transfer: its signed report changes nothing at the origin.
    _, net = _world([_refusal("NodeD")])
    assert _plan(net, "NodeA", origin(), T0 + 1) == [(TID, Route("NodeB"))]
    assert _plan(net, "NodeA", origin(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0 + 1),
                 T0 + 2) == []
    # A custodian's report about another origin's claim on the id is no report on ours.
    _, net = _world([("NodeB", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeA"}),
                     _refusal("NodeB", origin_named="NodeC")])
    assert _plan(net, "NodeA", origin(), T0 + 1) == [(TID, Route("NodeB"))]
    # A relay acts only on its own hop's report: one that never handed it to B goes on.
    _, net = _world([("NodeB", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeA"}),
                     _refusal("NodeB")])
    assert _plan(net, "NodeC", relay(), T0 + 1) == [(TID, Route("NodeD"))]
    c = relay(phase=L.HANDED, hop="NodeD", token=1, handed_at=T0 + 1)
    assert _plan(net, "NodeC", c, T0 + 2) == []


def _forwarded():
    """At C: C handed the transfer to D, whose signed custody (from C) let C's copy go."""
    return relay(phase=L.FORWARDED, hop="NodeD", token=1, handed_at=T0 + 1)


def test_a_forwarded_relay_is_ended_by_the_model_without_effects():
    # D signed custody from C: C let its copy go and only waits for the transfer to end.
    custody = ("NodeD", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeC"})
    _, net = _world([custody])
    t = _forwarded()
    assert _plan(net, "NodeC", t, T0 + 1 + POLICY.confirm_after) == []  # no resend: D has it
    assert t.wake_at(POLICY) == T0 + POLICY.relay_keep()
    assert _plan(net, "NodeC", t, T0 + POLICY.relay_keep()) == [(TID, Tick())]
    done, effects = _then(net, "NodeC", t, T0 + POLICY.relay_keep())
    assert (done.phase, done.hop, effects) == (L.DROPPED, None, [])
    _, net = _world([custody, ("NodeE", E.TRANSFER_DELIVERED,
                               {"transfer": TID, "sha256": "0" * 64, "name": "f"})])
    assert _plan(net, "NodeC", t, T0 + 2) == [(TID, Receipt())]
    done, effects = _then(net, "NodeC", t, T0 + 2)
    assert (done.phase, done.hop, effects) == (L.DELIVERED, None, [])
    _, net = _world([custody, ("NodeA", E.TRANSFER_FAILED, {"transfer": TID, "reason": "expired"})])
    assert _plan(net, "NodeC", t, T0 + 2) == [(TID, GaveUp())]
    done, effects = _then(net, "NodeC", t, T0 + 2)
    assert (done.phase, done.hop, effects) == (L.DROPPED, None, [])


def test_a_refusal_travels_back_hop_by_hop_from_c_through_b_to_the_origin():
    # A-B-C-E: A hands the transfer to B, B to C (C's custody lets B's copy go), and the
    # destination E refuses it for good. C reports; B, which handed it to C, believes C and
    # passes it back; A, which handed it to B, believes B and fails the transfer.
    feeds, net = _world(edges=[("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeE")])
    a, effects = _then(net, "NodeA", origin(), T0 + 1)
    assert effects == [Offer(TID, "NodeB", 1)]
    a, _ = step(a, L.Handed(1, "stored"), T0 + 2, POLICY)
    feeds["NodeB"].add(E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeA"})
    b, effects = _then(_net(feeds), "NodeB", relay(), T0 + 2)
    assert effects == [Offer(TID, "NodeC", 1)]
    b, _ = step(b, L.Handed(1, "stored"), T0 + 3, POLICY)
    feeds["NodeC"].add(E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeB"})
    net = _net(feeds)
    assert _plan(net, "NodeA", a, T0 + 4) == []  # the origin never lets go on custody
    b, effects = _then(net, "NodeB", b, T0 + 4)
    assert (effects, b.phase, b.hop) == ([Drop(TID, "stored by NodeC")], L.FORWARDED, "NodeC")
    c, effects = _then(net, "NodeC", relay(passed=("NodeA", "NodeB")), T0 + 4)
    assert effects == [Offer(TID, "NodeE", 1)]
    c, effects = step(c, Refused(1, "too-large", "12 > 10 bytes"), T0 + 5, POLICY)
    assert effects == [Report(TID, "NodeE", "too-large", "12 > 10 bytes")] and c.phase == L.REFUSED

    def record(who, report):  # the custody service appends a Report as a signed event
        feeds[who].add(E.TRANSFER_REFUSED, {"transfer": TID, "origin": "NodeA", "by": report.by,
                                            "reason": report.reason, "detail": report.detail})

    record("NodeC", effects[0])
    net = _net(feeds)
    assert _plan(net, "NodeA", a, T0 + 6) == []  # C is not A's hop: A waits for B's word
    assert _plan(net, "NodeB", b, T0 + 6) == [
        (TID, RefusedDownstream("NodeE", "too-large", "12 > 10 bytes"))]
    b, effects = _then(net, "NodeB", b, T0 + 6)
    assert effects == [Report(TID, "NodeE", "too-large", "12 > 10 bytes")] and b.phase == L.REFUSED
    record("NodeB", effects[0])
    net = _net(feeds)
    assert _plan(net, "NodeB", b, T0 + 7) == []  # reported once
    assert _plan(net, "NodeA", a, T0 + 7) == [
        (TID, RefusedDownstream("NodeE", "too-large", "12 > 10 bytes"))]
    a, effects = _then(net, "NodeA", a, T0 + 7)
    assert effects == [Fail(TID, "refused by NodeE: too-large: 12 > 10 bytes")]
    assert a.phase == L.FAILED
    # The origin's failure ends the relays: C lets the copy it kept go.
    feeds["NodeA"].add(E.TRANSFER_FAILED, {"transfer": TID, "reason": a.reason})
    net = _net(feeds)
    assert _then(net, "NodeC", c, T0 + 8)[1] == [Drop(TID, "origin gave up")]
    assert _plan(net, "NodeB", b, T0 + 8) == [(TID, GaveUp())]
    assert _then(net, "NodeB", b, T0 + 8)[0].ended  # B's copy went at C's custody already


def test_a_report_by_a_node_that_is_not_our_hop_is_ignored():
    # A handed the transfer to B. A minted node "-" signs that it took custody from A and
    # that E refused the transfer: its custody claim does not make it A's hop.
    feeds, _ = _world([("NodeB", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeA"})])
    minted = FeedWriter("-")
    minted.configured()
    minted.add(E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeA"})
    minted.add(*_refusal("-")[1:])
    net = fold([*(ev for f in feeds.values() for ev in f.events), *minted.events])
    assert net.took_custody(TID, "-", "NodeA")  # the custody claim is in the model
    assert net.transfer(TID, "NodeA").refusal_from("-") is not None  # and so is the report
    a = origin(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0 + 1)
    assert _plan(net, "NodeA", a, T0 + 2) == []
    assert _plan(net, "NodeA", origin(), T0 + 1) == [(TID, Route("NodeB"))]
    # The same at a relay: C forwarded it to D; "-" claims custody from C and reports.
    minted.add(E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeC"})
    net = fold([*(ev for f in feeds.values() for ev in f.events), *minted.events])
    for c in (_forwarded(), relay(phase=L.HANDED, hop="NodeD", token=1, handed_at=T0 + 1)):
        assert _plan(net, "NodeC", c, T0 + 2) == [], c.phase
    # A real custodian that is not our hop (any more) is not believed either: A resent the
    # transfer to C after B stored it without a receipt, and B's report comes in now.
    feeds["NodeB"].add(*_refusal("NodeB")[1:])
    net = _net(feeds)
    resent = origin(phase=L.HANDED, hop="NodeC", token=2, handed_at=T0 + 60, tried=frozenset({"NodeB"}))
    assert _plan(net, "NodeA", resent, T0 + 61) == []
    # While an offer to B is under way, its answer decides, not an older report of B's.
    for t in (origin(phase=L.OFFERING, hop="NodeB", token=2),
              origin(phase=L.SENDING, hop="NodeB", token=2, offset=1)):
        assert _plan(net, "NodeA", t, T0 + 61) == [], t.phase
    # The control: B's report is believed once B is A's hop.
    assert _plan(net, "NodeA", a, T0 + 61) == [
        (TID, RefusedDownstream("NodeE", "too-large", "12 > 10 bytes"))]


# -- relays that refused for good (not-accepted: relay_for) -------------------------------------
NA = ("NodeB", "not-accepted", "NodeB does not relay for NodeA (relay_for)")


def test_a_relay_that_refused_for_good_is_never_used_even_when_it_is_the_only_way():
    _, net = _world()
    t = origin(refused_by=frozenset({"NodeB"}), refusal=NA)
    assert _plan(net, "NodeA", t, T0 + 1) == [(TID, Route("NodeC"))]  # around B: A-C-D-E
    # C failed (soft): it is tried again, since B stays out whatever else fails.
    t = origin(refused_by=frozenset({"NodeB"}), refusal=NA, avoid=frozenset({"NodeC"}))
    assert choose_hop(net, "NodeA", t) == "NodeC"
    assert choose_hop(net, "NodeA", origin(avoid=frozenset({"NodeC"}))) == "NodeB"


def test_a_refused_origin_transfer_goes_the_other_way_then_fails_when_no_path_is_left():
    _, net = _world()
    t, _ = _then(net, "NodeA", origin(), T0 + 1)
    assert t.hop == "NodeB"
    t, _ = step(t, Refused(1, "not-accepted", NA[2]), T0 + 2, POLICY)
    t, effects = _then(net, "NodeA", t, T0 + 2)
    assert effects == [Offer(TID, "NodeC", 2)]
    t, _ = step(t, Refused(2, "not-accepted", "no"), T0 + 3, POLICY)
    assert _plan(net, "NodeA", t, T0 + 3) == [(TID, NoPathLeft())]
    assert _then(net, "NodeA", t, T0 + 3)[1] == [Fail(TID, "refused by NodeC: not-accepted: no")]


def test_a_path_over_a_link_that_is_only_down_is_still_a_path_left():
    _, net = _world([("NodeC", E.LINK_DOWN, {"peer": "NodeD"}), ("NodeD", E.LINK_DOWN, {"peer": "NodeC"})])
    t = origin(refused_by=frozenset({"NodeB"}), refusal=NA)
    assert _plan(net, "NodeA", t, T0 + 1) == [(TID, Route(None))]  # waits for C-D to come back
    t, effects = _then(net, "NodeA", t, T0 + 1)
    assert t.phase == L.QUEUED and t.refused_by == {"NodeB"}
    assert effects == [Note(TID, "relay.no_route", "no route to NodeE over up links")]


def test_a_relay_with_no_way_on_reports_and_the_origin_goes_around_it_and_the_refuser():
    """A-B-E and A-C-D-E. C holds it (from A) and D will not carry it: C does not go back
    through A (that ends where it started); no path is left, so it reports D's refusal.
    A, handed to C, hears it from C and goes around both, over B."""
    feeds, net = _world([("NodeC", E.TRANSFER_RELAYED, {"transfer": TID, "from": "NodeA"})])
    c, effects = _then(net, "NodeC", relay(), T0 + 1)
    assert effects == [Offer(TID, "NodeD", 1)]
    why = "NodeD does not relay for NodeA (relay_for)"
    c, _ = step(c, Refused(1, "not-accepted", why), T0 + 2, POLICY)
    assert _plan(net, "NodeC", c, T0 + 2) == [(TID, NoPathLeft())]
    c, effects = _then(net, "NodeC", c, T0 + 2)
    assert effects == [Report(TID, "NodeD", "not-accepted", why)] and c.phase == L.REFUSED
    feeds["NodeC"].add(E.TRANSFER_REFUSED, {"transfer": TID, "origin": "NodeA", "by": "NodeD",
                                            "reason": "not-accepted", "detail": why})
    net = _net(feeds)
    a = origin(phase=L.HANDED, hop="NodeC", token=1, handed_at=T0 + 1)
    assert _plan(net, "NodeA", a, T0 + 3) == [(TID, RefusedDownstream("NodeD", "not-accepted", why))]
    a, _ = _then(net, "NodeA", a, T0 + 3)
    assert (a.phase, a.refused_by) == (L.QUEUED, frozenset({"NodeC", "NodeD"}))
    assert _then(net, "NodeA", a, T0 + 3)[1] == [Offer(TID, "NodeB", 2)]
