"""The transfer state machine: exact effect sequences for every input, no clock, no I/O.

Each test drives one transfer's machine the way the custody service does (``Driver``: a
recording fake of the service that keeps every effect in order) and asserts the exact
effects and the phase each input leads to. Every step is also checked to leave its input
untouched (the machine is pure: frozen dataclasses, new values out).
"""

import copy
import dataclasses
import hashlib

import pytest

from maildrop import lifecycle as L
from maildrop.lifecycle import (
    Accepted,
    Broke,
    Cancel,
    Committed,
    Confirmed,
    Deliver,
    Delivered,
    DeliveryFailed,
    Drop,
    Fail,
    Flush,
    GaveUp,
    Handed,
    Hold,
    LinkDown,
    LinkUp,
    NoPathLeft,
    Note,
    Offer,
    Policy,
    Receipt,
    ReceiveFailed,
    Refused,
    RefusedDownstream,
    Release,
    Report,
    Route,
    Tick,
    Transfer,
    step,
)
from tests.factories import T0

TID = "e" * 32
POLICY = Policy(expire_after=100.0, resend_after=50.0, confirm_after=20.0, idle_retry=5.0,
                backoff_base=1.0, backoff_cap=300.0)
INF = float("inf")
TRANSIENT = ["busy", "no-space", "quota", "hash-mismatch", "unknown-destination", "delivery-pending", "conflicting-offer"]


class Driver:
    """One transfer's machine as the custody service drives it: every input stepped at a
    time, every effect recorded in order; each step must leave its input as it was."""

    def __init__(self, t: Transfer, effects=(), policy: Policy = POLICY) -> None:
        self.t = t
        self.policy = policy
        self.effects = list(effects)

    def __call__(self, inp, at: float) -> list:
        before = copy.deepcopy(self.t)
        new, effects = step(self.t, inp, at, self.policy)
        assert self.t == before, f"step mutated its input on {inp!r}"
        self.t = new
        self.effects.extend(effects)
        return effects


def origin(**kw) -> Transfer:
    return Transfer(TID, "NodeA", "NodeE", 10, T0, L.ORIGIN, **kw)


def relay(**kw) -> Transfer:
    kw.setdefault("passed", ("NodeA",))
    return Transfer(TID, "NodeA", "NodeE", 10, T0, L.RELAY, **kw)


def destination(**kw) -> Transfer:
    kw.setdefault("passed", ("NodeA", "NodeB"))
    return Transfer(TID, "NodeA", "NodeE", 10, T0, L.DESTINATION, **kw)


def offering(make=origin, hop="NodeB", at=T0 + 1) -> Driver:
    """A driver whose transfer was just offered to ``hop`` (token 1)."""
    d = Driver(make())
    assert d(Route(hop), at) == [Offer(TID, hop, 1)]
    return d


# -- constructors -----------------------------------------------------------------------------
def test_a_held_copy_is_due_at_once_and_one_at_the_destination_is_delivered_at_once():
    t, effects = L.held(TID, "NodeA", "NodeE", 10, T0, "NodeA")
    assert (t.role, t.phase, effects) == (L.ORIGIN, L.QUEUED, [])
    assert t.due(T0)
    t, effects = L.held(TID, "NodeA", "NodeE", 10, T0, "NodeC", passed=("NodeA",))
    assert (t.role, t.phase, t.passed, effects) == (L.RELAY, L.QUEUED, ("NodeA",), [])
    t, effects = L.held(TID, "NodeA", "NodeE", 10, T0, "NodeE")
    assert (t.role, t.phase, t.retry_at, effects) == (L.DESTINATION, L.DELIVERING, INF, [Deliver(TID)])
    assert t.wake_at(POLICY) is None  # a Deliver is under way: only its answer changes it


# -- offers and their answers -----------------------------------------------------------------
def test_a_due_transfer_is_offered_to_the_planned_hop_with_a_new_token():
    d = offering()
    assert (d.t.phase, d.t.hop, d.t.token, d.t.offset) == (L.OFFERING, "NodeB", 1, 0)
    assert d(Route("NodeC"), T0 + 2) == [] and d.t.hop == "NodeB"  # one offer at a time
    assert d.t.wake_at(POLICY) == T0 + 100  # only the deadline: the answer is awaited


def test_accepted_then_stored_hands_it_over_and_the_origin_keeps_its_copy():
    d = offering()
    assert d(Accepted(1, 4), T0 + 2) == []
    assert (d.t.phase, d.t.offset) == (L.SENDING, 4)
    assert d(Handed(1, "stored"), T0 + 3) == []  # no Drop: the origin waits for the receipt
    assert (d.t.phase, d.t.hop, d.t.handed_at, d.t.reason) == (L.HANDED, "NodeB", T0 + 3, "")
    assert d.effects == [Offer(TID, "NodeB", 1)]


def test_have_hands_it_over_without_bytes():
    d = offering(relay, hop="NodeE")
    assert d(Handed(1, "have"), T0 + 2) == []
    assert (d.t.phase, d.t.hop) == (L.HANDED, "NodeE")


def test_a_success_resets_the_backoff_and_the_avoided_hops():
    d = offering()
    d(Broke(1, "unreachable"), T0 + 2)
    assert (d.t.attempts, d.t.avoid) == (1, frozenset({"NodeB"}))
    d(Route("NodeC"), d.t.retry_at)
    d(Handed(2, "stored"), d.t.retry_at + 1)
    assert (d.t.phase, d.t.attempts, d.t.avoid, d.t.reason) == (L.HANDED, 0, frozenset(), "")


def test_pending_is_handed_with_the_hops_reason_noted_once_per_change():
    d = offering(hop="NodeE")
    why = "NodeE holds it but cannot deliver it yet: inbox/NodeA/: Permission denied"
    assert d(Handed(1, "pending", "inbox/NodeA/: Permission denied"), T0 + 2) == [
        Note(TID, "relay.handed.pending", why)]
    assert (d.t.phase, d.t.reason) == (L.HANDED, why)
    # No receipt in time: resend; the same answer again is not noted again.
    assert d(Tick(), T0 + 2 + POLICY.resend_after) == []
    assert d(Route("NodeE"), T0 + 53) == [Offer(TID, "NodeE", 2)]
    assert d(Handed(2, "pending", "inbox/NodeA/: Permission denied"), T0 + 54) == []
    assert d(Handed(2, "pending", "inbox/NodeA/: Read-only file system"), T0 + 54) == []  # answered
    assert d.effects == [Offer(TID, "NodeE", 1), Note(TID, "relay.handed.pending", why),
                         Offer(TID, "NodeE", 2)]


@pytest.mark.parametrize("reason", TRANSIENT)
@pytest.mark.parametrize("make", [origin, relay])
def test_a_transient_refusal_backs_off_and_avoids_the_hop(make, reason):
    d = offering(make)
    why = f"NodeB refused: {reason}: try later"
    assert d(Refused(1, reason, "try later"), T0 + 2) == [Note(TID, "relay.hop.refused", why)]
    assert (d.t.phase, d.t.hop, d.t.attempts, d.t.avoid, d.t.reason) == (
        L.QUEUED, None, 1, frozenset({"NodeB"}), why)
    assert d.t.retry_at == T0 + 2 + POLICY.backoff(1, TID)
    assert not d.t.due(d.t.retry_at - 0.01) and d.t.due(d.t.retry_at)


def test_the_permanent_refusals_are_the_designed_list():
    designed = {"too-large", "unsafe-name", "unknown-origin", "not-accepted", "failed",
                "bad-offer", "bad-signature", "undecryptable", "stale"}
    assert designed == L.PERMANENT
    assert POLICY.permanent == L.PERMANENT
    assert not set(TRANSIENT) & L.PERMANENT


@pytest.mark.parametrize("reason", sorted(L.PERMANENT - POLICY.patient - POLICY.per_hop))
def test_a_permanent_refusal_fails_the_transfer_at_the_origin_in_that_round_trip(reason):
    d = offering()
    assert d(Refused(1, reason, "12 > 10 bytes"), T0 + 2) == [
        Fail(TID, f"refused by NodeB: {reason}: 12 > 10 bytes")]
    assert d.t.phase == L.FAILED and d.t.ended
    assert d(Route("NodeC"), T0 + 3) == [] and d(Tick(), T0 + 500) == []  # ended: nothing more


NA = "refused by NodeB: not-accepted: NodeB does not relay for NodeA (relay_for)"


@pytest.mark.parametrize("make", [origin, relay])
def test_a_relay_that_will_not_carry_it_is_excluded_for_good_and_routed_around(make):
    """``not-accepted`` from a relay speaks for that relay only: it is never used for the
    transfer again (unlike ``avoid``, no input lets it back but a flush), the transfer is
    planned again at once without a backoff, and the next relay is offered it."""
    assert POLICY.per_hop == {"not-accepted"} <= L.PERMANENT
    d = offering(make)
    detail = "NodeB does not relay for NodeA (relay_for)"
    assert d(Refused(1, "not-accepted", detail), T0 + 2) == [Note(TID, "relay.hop.refused", NA)]
    assert (d.t.phase, d.t.hop, d.t.refused_by, d.t.refusal, d.t.attempts, d.t.avoid, d.t.reason) == (
        L.QUEUED, None, frozenset({"NodeB"}), ("NodeB", "not-accepted", detail), 0, frozenset(), NA)
    assert d.t.due(T0 + 2)  # at once: nothing to wait for
    assert d(LinkUp("NodeB"), T0 + 3) == [] and d.t.refused_by == {"NodeB"}  # not an avoid
    assert d(Route(None), T0 + 3) == [] and d.t.refused_by == {"NodeB"}  # kept while no route
    assert d(Route("NodeC"), T0 + 8) == [Offer(TID, "NodeC", 2)]
    assert d(Refused(2, "not-accepted", "no"), T0 + 9) == [
        Note(TID, "relay.hop.refused", "refused by NodeC: not-accepted: no")]
    assert d.t.refused_by == {"NodeB", "NodeC"} and d.t.refusal == ("NodeC", "not-accepted", "no")


def test_no_path_left_ends_it_at_the_origin_with_the_last_refusal():
    d = offering()
    d(Refused(1, "not-accepted", "NodeB does not relay for NodeA (relay_for)"), T0 + 2)
    assert d(NoPathLeft(), T0 + 2) == [Fail(TID, NA)]
    assert d.t.phase == L.FAILED


def test_no_path_left_at_a_relay_reports_the_refusal_and_keeps_the_copy():
    d = offering(relay)
    d(Refused(1, "not-accepted", "no"), T0 + 2)
    assert d(NoPathLeft(), T0 + 2) == [Report(TID, "NodeB", "not-accepted", "no")]
    assert (d.t.phase, d.t.reason) == (L.REFUSED, "refused by NodeB: not-accepted: no")
    assert d(GaveUp(), T0 + 3) == [Drop(TID, "origin gave up")]


def test_no_path_left_changes_nothing_without_a_refusal_or_while_not_due():
    d = Driver(origin())
    assert d(NoPathLeft(), T0 + 1) == [] and d.t.phase == L.QUEUED  # nobody refused it
    d = offering()
    d(Refused(1, "not-accepted", "no"), T0 + 2)
    d(Hold(), T0 + 2)
    assert d(NoPathLeft(), T0 + 3) == [] and d.t.phase == L.QUEUED  # held: not due
    assert d(Release(), T0 + 4) == [] and d(NoPathLeft(), T0 + 4) == [
        Fail(TID, "refused by NodeB: not-accepted: no")]


@pytest.mark.parametrize("make", [origin, relay])
def test_not_accepted_by_the_destination_itself_ends_it_at_once(make):
    d = offering(make, hop="NodeE")
    fx = d(Refused(1, "not-accepted", "NodeE takes no files from NodeA (accept_from)"), T0 + 2)
    why = "NodeE takes no files from NodeA (accept_from)"
    if make is origin:
        assert fx == [Fail(TID, f"refused by NodeE: not-accepted: {why}")] and d.t.phase == L.FAILED
    else:
        assert fx == [Report(TID, "NodeE", "not-accepted", why)] and d.t.phase == L.REFUSED


@pytest.mark.parametrize("make", [origin, relay])
def test_a_relay_refusing_past_our_hop_is_routed_around_with_our_hop(make):
    """Our hop B reported that C (a relay past it) will not carry it and B found no way
    around C: both are left out (B would answer "have" and report it again)."""
    d = offering(make)
    d(Handed(1, "stored"), T0 + 2)
    fx = d(RefusedDownstream("NodeC", "not-accepted", "no"), T0 + 3)
    assert fx == [Note(TID, "relay.refused.downstream", "refused by NodeC: not-accepted: no")]
    assert (d.t.phase, d.t.hop, d.t.handed_at, d.t.refused_by) == (
        L.QUEUED, None, None, frozenset({"NodeB", "NodeC"}))
    assert d.t.due(T0 + 3)
    # By the destination itself: the end, as for any permanent refusal.
    d = offering(make)
    d(Handed(1, "stored"), T0 + 2)
    fx = d(RefusedDownstream("NodeE", "not-accepted", "no"), T0 + 3)
    assert fx == ([Fail(TID, "refused by NodeE: not-accepted: no")] if make is origin
                  else [Report(TID, "NodeE", "not-accepted", "no")])


def test_a_flush_forgets_the_relays_that_refused():
    d = offering()
    d(Refused(1, "not-accepted", "no"), T0 + 2)
    assert d(Flush(), T0 + 3) == []
    assert (d.t.refused_by, d.t.refusal, d.t.flush) == (frozenset(), None, True)
    assert d(Route("NodeB"), T0 + 3) == [Offer(TID, "NodeB", 2)]


def test_unknown_origin_is_retried_until_patience_runs_out_then_ends_at_the_origin():
    """A relay says "unknown-origin" before gossip brought it the origin's key: retried with
    backoff like a transient refusal, and only ``patience`` refusals in a row end it."""
    assert POLICY.patient == {"unknown-origin", "bad-signature"} and POLICY.patience == 6
    d = offering()
    now = T0 + 2
    for n in range(1, POLICY.patience):
        fx = d(Refused(d.t.token, "unknown-origin", "no key known for NodeA yet"), now)
        assert d.t.phase == L.QUEUED and d.t.attempts == n, n
        assert fx in ([], [Note(TID, "relay.hop.refused", d.t.reason)])
        now = d.t.retry_at
        d(Route("NodeB"), now)
    assert d(Refused(d.t.token, "unknown-origin", "no key known for NodeA yet"), now) == [
        Fail(TID, "refused by NodeB: unknown-origin: no key known for NodeA yet")]
    assert d.t.phase == L.FAILED


@pytest.mark.parametrize("reason", sorted(L.PERMANENT - POLICY.patient))
def test_a_permanent_refusal_at_a_relay_is_reported_and_the_copy_kept(reason):
    d = offering(relay, hop="NodeE")
    d(Accepted(1, 0), T0 + 2)  # refused after the bytes too (the receiver's check)
    assert d(Refused(1, reason, "no"), T0 + 3) == [Report(TID, "NodeE", reason, "no")]
    assert (d.t.phase, d.t.hop, d.t.reason) == (L.REFUSED, None, f"refused by NodeE: {reason}: no")
    # It waits for the origin to give up: no offer, no resend, no drop before that.
    for inp in (Route("NodeD"), Tick(), LinkUp("NodeE"), Flush(), Cancel()):
        assert d(inp, T0 + 10) == [] and d.t.phase == L.REFUSED
    assert d.t.wake_at(POLICY) == T0 + POLICY.relay_keep()
    assert d(GaveUp(), T0 + 11) == [Drop(TID, "origin gave up")]
    assert d.effects == [Offer(TID, "NodeE", 1), Report(TID, "NodeE", reason, "no"),
                         Drop(TID, "origin gave up")]


def test_a_refused_relay_lets_go_at_the_receipt_or_its_keep_limit():
    for end, at, effect in [(Receipt(), T0 + 5, Drop(TID, "delivered")),
                            (Tick(), T0 + 200, Drop(TID, "kept 200 s at a relay"))]:
        d = offering(relay, hop="NodeE")
        d(Refused(1, "too-large", "big"), T0 + 2)
        assert d(Tick(), T0 + 199) == []
        assert d(end, at) == [effect]
        assert d.t.ended


@pytest.mark.parametrize("make", [origin, relay])
def test_a_broken_offer_backs_off_and_avoids_the_hop(make):
    d = offering(make)
    assert d(Accepted(1, 0), T0 + 2) == []
    assert d(Broke(1, "timed out"), T0 + 3) == [Note(TID, "relay.hop.failed", "NodeB: timed out")]
    assert (d.t.phase, d.t.hop, d.t.offset, d.t.attempts, d.t.avoid) == (
        L.QUEUED, None, 0, 1, frozenset({"NodeB"}))
    assert d.t.retry_at == T0 + 3 + POLICY.backoff(1, TID)


# -- the token rule ---------------------------------------------------------------------------
STALE = [Accepted(1, 5), Handed(1, "stored"), Handed(1, "have"), Handed(1, "pending", "x"),
         Refused(1, "too-large", "x"), Refused(1, "busy", "x"), Broke(1, "x")]


@pytest.mark.parametrize("answer", STALE)
def test_an_answer_to_an_older_offer_changes_nothing(answer):
    d = offering()
    d(Broke(1, "unreachable"), T0 + 2)
    queued = d.t
    assert d(answer, T0 + 3) == [] and d.t == queued  # no offer out: nothing to answer
    d(Route("NodeC"), queued.retry_at)
    for phase_input in (None, Accepted(2, 0)):  # offering, then sending
        if phase_input is not None:
            d(phase_input, queued.retry_at + 1)
        now = d.t
        assert d(answer, queued.retry_at + 2) == [] and d.t == now
    assert d(Handed(2, "stored"), queued.retry_at + 3) == [] and d.t.phase == L.HANDED
    handed = d.t
    assert d(answer, queued.retry_at + 4) == [] and d.t == handed
    assert d.effects == [Offer(TID, "NodeB", 1), Note(TID, "relay.hop.failed", "NodeB: unreachable"),
                         Offer(TID, "NodeC", 2)]


def test_answers_with_the_current_token_count_once():
    d = offering()
    d(Handed(1, "stored"), T0 + 2)
    handed = d.t
    assert d(Refused(1, "too-large", "late"), T0 + 3) == [] and d.t == handed
    assert d(Broke(1, "late"), T0 + 3) == [] and d.t == handed


# -- backoff ----------------------------------------------------------------------------------
def test_backoff_doubles_per_failure_is_capped_and_jittered_in_half_to_whole():
    for n in range(1, 40):
        raw = min(300.0, 2.0 ** (n - 1))
        wait = POLICY.backoff(n, TID)
        assert 0.5 * raw <= wait <= raw, (n, wait)
    assert POLICY.backoff(10, TID) <= 300.0 and POLICY.backoff(10_000, TID) <= 300.0
    assert 0.5 <= POLICY.backoff(0, TID) <= 1.0  # never less than the first wait
    capped = Policy(backoff_base=2.0, backoff_cap=10.0)
    assert all(5.0 <= capped.backoff(n, TID) <= 10.0 for n in range(4, 30))


def test_backoff_jitter_is_deterministic_per_transfer_and_attempt():
    for n in (1, 2, 7, 9):
        digest = hashlib.sha256(f"{TID}:{n}".encode()).digest()
        jitter = 0.5 + int.from_bytes(digest[:4], "big") / 2**33
        assert POLICY.backoff(n, TID) == min(300.0, 2.0 ** (n - 1)) * jitter
        assert Policy().backoff(n, TID) == POLICY.backoff(n, TID)  # nothing but (id, n) in it
    spread = {round(POLICY.backoff(9, f"{i:032x}"), 6) for i in range(50)}
    assert len(spread) > 40  # transfers that failed together do not retry together


def test_consecutive_failures_back_off_exponentially_and_are_noted_once():
    d = offering()
    now = T0 + 1
    for n in range(1, 11):
        d(Broke(n, "unreachable"), now + 1)
        assert d.t.attempts == n
        assert d.t.retry_at - (now + 1) == pytest.approx(POLICY.backoff(n, TID))
        assert d(Route("NodeB"), d.t.retry_at - 0.001) == []  # not before its time
        now = d.t.retry_at
        assert d(Route("NodeB"), now) == [Offer(TID, "NodeB", n + 1)]
    assert d.effects == [Offer(TID, "NodeB", 1), Note(TID, "relay.hop.failed", "NodeB: unreachable"),
                         *[Offer(TID, "NodeB", n) for n in range(2, 12)]]


# -- avoid, link up, link down --------------------------------------------------------------------
def test_a_link_up_of_an_avoided_hop_retries_at_once():
    d = offering()
    d(Broke(1, "unreachable"), T0 + 2)
    waiting = d.t
    assert d(LinkUp("NodeC"), T0 + 2.1) == [] and d.t == waiting  # not the avoided hop
    assert d(LinkUp("NodeB"), T0 + 2.2) == []
    assert (d.t.avoid, d.t.retry_at, d.t.attempts) == (frozenset(), T0 + 2.2, 1)
    assert d.t.due(T0 + 2.2)


def test_a_link_up_changes_nothing_but_a_waiting_transfer():
    d = offering()
    for inp in (LinkUp("NodeB"), LinkDown("NodeC")):
        now = d.t
        assert d(inp, T0 + 2) == [] and d.t == now
    d(Handed(1, "stored"), T0 + 3)
    for inp in (LinkUp("NodeB"), LinkDown("NodeB")):
        now = d.t
        assert d(inp, T0 + 4) == [] and d.t == now  # handed: the hop has it; we wait anyway


@pytest.mark.parametrize("sending", [False, True])
def test_a_link_down_replans_an_offer_over_it_at_once_and_its_token_goes_stale(sending):
    d = offering()
    if sending:
        d(Accepted(1, 3), T0 + 2)
    assert d(LinkDown("NodeB"), T0 + 5) == [Note(TID, "relay.hop.down", "link to NodeB is down")]
    assert (d.t.phase, d.t.hop, d.t.offset, d.t.retry_at, d.t.avoid, d.t.attempts) == (
        L.QUEUED, None, 0, T0 + 5, frozenset({"NodeB"}), 0)
    assert d.t.due(T0 + 5)
    replanned = d.t
    for answer in (Accepted(1, 9), Handed(1, "stored"), Broke(1, "x"), Refused(1, "too-large", "x")):
        assert d(answer, T0 + 5) == [] and d.t == replanned
    assert d(Route("NodeC"), T0 + 5) == [Offer(TID, "NodeC", 3)]
    assert d(Handed(1, "stored"), T0 + 6) == [] and d.t.phase == L.OFFERING  # still stale
    assert d(Handed(3, "stored"), T0 + 6) == [] and d.t.phase == L.HANDED


def test_a_second_link_down_for_the_same_reason_is_not_noted_again():
    d = offering()
    d(LinkDown("NodeB"), T0 + 2)
    d(Route("NodeB"), T0 + 2)  # the model still had the link up: same hop again
    assert d(LinkDown("NodeB"), T0 + 3) == []
    assert d.effects == [Offer(TID, "NodeB", 1), Note(TID, "relay.hop.down", "link to NodeB is down"),
                         Offer(TID, "NodeB", 3)]


# -- no route --------------------------------------------------------------------------------------
def test_no_route_waits_idle_retry_noted_once_and_forgets_the_avoided_hops():
    d = Driver(origin(avoid=frozenset({"NodeB"}), tried=frozenset({"NodeD"})))
    assert d(Route(None), T0 + 1) == [Note(TID, "relay.no_route", "no route to NodeE over up links")]
    assert (d.t.phase, d.t.avoid, d.t.tried, d.t.retry_at) == (
        L.QUEUED, frozenset(), frozenset(), T0 + 1 + POLICY.idle_retry)
    waiting = d.t
    assert d(Route(None), T0 + 5.9) == [] and d.t == waiting  # not due yet: unchanged
    assert d(Route(None), T0 + 6) == []  # due, still no route, the same reason: not noted again
    assert d.t.retry_at == T0 + 6 + POLICY.idle_retry


def test_no_route_keeps_the_last_failure_as_the_reason():
    d = offering()
    d(Broke(1, "unreachable"), T0 + 2)
    assert d(Route(None), d.t.retry_at) == []
    assert d.t.reason == "NodeB: unreachable"


# -- Tick: deadlines, resends, delivery retries ---------------------------------------------------
def _in_phase(make, phase):
    d = Driver(make())
    if phase in (L.OFFERING, L.SENDING, L.HANDED):
        d(Route("NodeB"), T0 + 1)
    if phase in (L.SENDING,):
        d(Accepted(1, 0), T0 + 1)
    if phase == L.HANDED:
        d(Handed(1, "stored"), T0 + 99)  # handed late: no resend is due at the deadline
    assert d.t.phase == phase
    d.effects.clear()
    return d


@pytest.mark.parametrize("phase", [L.QUEUED, L.OFFERING, L.SENDING, L.HANDED])
def test_the_origin_fails_a_transfer_at_expire_after_in_every_phase(phase):
    d = _in_phase(origin, phase)
    assert d(Tick(), T0 + 99.9) == [] and d.t.phase == phase
    assert d(Tick(), T0 + 100) == [Fail(TID, "not delivered within 100 s")]
    assert (d.t.phase, d.t.hop) == (L.FAILED, None)


@pytest.mark.parametrize("phase", [L.QUEUED, L.OFFERING, L.SENDING, L.HANDED])
def test_a_relay_drops_its_copy_at_the_keep_limit_and_the_origin_fails_instead(phase):
    assert POLICY.relay_keep() == 200.0  # expire_after + min(expire_after, relay_grace)
    assert Policy(expire_after=7 * 86400.0).relay_keep() == 8 * 86400.0
    d = _in_phase(relay, phase)
    assert d(Tick(), T0 + 199.9) == []  # (a handed relay's resend comes first: no effect)
    assert d(Tick(), T0 + 200) == [Drop(TID, "kept 200 s at a relay")]
    assert d.t.phase == L.DROPPED
    o = _in_phase(origin, L.QUEUED)
    assert o(Tick(), T0 + 200) == [Fail(TID, "not delivered within 100 s")]  # never dropped


def test_a_destination_has_no_deadline():
    d = Driver(destination(phase=L.DELIVERING, retry_at=INF))
    assert d.t.deadline(POLICY) is None
    assert d(Tick(), T0 + 10**9) == [] and d.t.phase == L.DELIVERING


@pytest.mark.parametrize("make, wait", [(origin, 50.0), (relay, 20.0)])
def test_a_handed_transfer_is_resent_around_the_hop_after_its_wait(make, wait):
    d = offering(make)
    d(Handed(1, "stored"), T0 + 2)
    assert d.t.wake_at(POLICY) == T0 + 2 + wait
    assert d(Tick(), T0 + 2 + wait - 0.1) == [] and d.t.phase == L.HANDED
    assert d(Tick(), T0 + 2 + wait) == []
    assert (d.t.phase, d.t.hop, d.t.tried, d.t.handed_at, d.t.retry_at) == (
        L.QUEUED, None, frozenset({"NodeB"}), None, T0 + 2 + wait)
    assert d.t.due(T0 + 2 + wait)
    assert d(Route("NodeC"), T0 + 2 + wait) == [Offer(TID, "NodeC", 2)]


def test_a_delivery_retry_is_due_at_retry_at_and_never_twice_at_once():
    d = Driver(destination(phase=L.DELIVERING, retry_at=T0 + 5, attempts=1))
    assert d.t.wake_at(POLICY) == T0 + 5
    assert d(Tick(), T0 + 4.9) == []
    assert d(Tick(), T0 + 5) == [Deliver(TID)]
    assert d.t.retry_at == INF and d.t.wake_at(POLICY) is None
    assert d(Tick(), T0 + 10**6) == []  # the Deliver under way answers first


# -- delivery ------------------------------------------------------------------------------------
def test_delivery_failures_are_noted_once_per_reason_back_off_and_heal():
    t, effects = L.held(TID, "NodeA", "NodeE", 10, T0, "NodeE", passed=("NodeA", "NodeB"))
    d = Driver(t, effects)
    denied = "delivery into inbox/NodeA/ failed: Permission denied"
    full = "delivery into inbox/NodeA/ failed: No space left on device"
    assert d(DeliveryFailed("Permission denied"), T0 + 1) == [
        Note(TID, "transfer.deliver.failed", denied)]
    assert (d.t.phase, d.t.reason, d.t.attempts) == (L.DELIVERING, denied, 1)
    assert d.t.retry_at == T0 + 1 + POLICY.backoff(1, TID)
    now = d.t.retry_at
    assert d(Tick(), now) == [Deliver(TID)]
    assert d(DeliveryFailed("Permission denied"), now) == []  # same reason: not noted again
    assert d.t.retry_at == now + POLICY.backoff(2, TID)
    now = d.t.retry_at
    assert d(Tick(), now) == [Deliver(TID)]
    assert d(DeliveryFailed("No space left on device"), now) == [
        Note(TID, "transfer.deliver.failed", full)]
    assert d.t.retry_at == now + POLICY.backoff(3, TID)
    now = d.t.retry_at
    assert d(Tick(), now) == [Deliver(TID)]
    assert d(Delivered(), now) == []
    assert (d.t.phase, d.t.reason) == (L.DELIVERED, "")
    assert d.effects == [Deliver(TID), Note(TID, "transfer.deliver.failed", denied), Deliver(TID),
                         Deliver(TID), Note(TID, "transfer.deliver.failed", full), Deliver(TID)]


def test_delivery_answers_outside_delivering_change_nothing():
    for make in (origin, relay):
        d = Driver(make())
        for inp in (Delivered(), DeliveryFailed("x"), Committed(), ReceiveFailed("x")):
            now = d.t
            assert d(inp, T0 + 1) == [] and d.t == now


# -- receiving -----------------------------------------------------------------------------------
def _arriving(me):
    return Driver(L.arriving(TID, "NodeA", "NodeE", 10, T0, me, "NodeB", 4, ("NodeA", "NodeB")))


def test_a_relay_that_committed_the_bytes_holds_it_and_is_due_at_once():
    d = _arriving("NodeC")
    assert (d.t.role, d.t.phase, d.t.hop, d.t.offset) == (L.RELAY, L.RECEIVING, "NodeB", 4)
    assert d(Committed(), T0 + 3) == []
    assert (d.t.phase, d.t.hop, d.t.offset, d.t.retry_at) == (L.QUEUED, None, 0, T0 + 3)
    assert d.t.due(T0 + 3) and d.t.passed == ("NodeA", "NodeB")
    assert d(Route("NodeD"), T0 + 3) == [Offer(TID, "NodeD", 1)]


def test_the_destination_that_committed_the_bytes_delivers_them():
    d = _arriving("NodeE")
    assert d.t.role == L.DESTINATION
    assert d(Committed(), T0 + 3) == [Deliver(TID)]
    assert (d.t.phase, d.t.hop, d.t.retry_at) == (L.DELIVERING, None, INF)
    assert d(Delivered(), T0 + 4) == [] and d.t.phase == L.DELIVERED


@pytest.mark.parametrize("me", ["NodeC", "NodeE"])
def test_a_failed_arrival_ends_without_effects_and_nothing_else_ends_an_arrival(me):
    d = _arriving(me)
    for inp in (Receipt(), GaveUp(), Tick(), Cancel(), Route("NodeD"), LinkDown("NodeB"),
                Flush(), Confirmed("NodeB"), Handed(0, "stored"), Broke(0, "x")):
        now = d.t
        assert d(inp, T0 + 10**6) == [] and d.t == now, inp
    assert d(ReceiveFailed("hash-mismatch"), T0 + 5) == []  # the part stays for a resume
    assert (d.t.phase, d.t.reason) == (L.DROPPED, "hash-mismatch")


def test_a_hold_placed_during_an_arrival_stays_after_the_commit():
    d = _arriving("NodeC")
    d(Hold(), T0 + 1)
    d(Committed(), T0 + 2)
    assert d.t.hold and not d.t.due(T0 + 2)


# -- what the model says: receipt, gave up, confirmed, refused downstream -------------------------
@pytest.mark.parametrize("make", [origin, relay])
@pytest.mark.parametrize("phase", [L.QUEUED, L.OFFERING, L.SENDING, L.HANDED])
def test_a_receipt_drops_the_copy_in_every_live_phase(make, phase):
    d = _in_phase(make, phase)
    assert d(Receipt(), T0 + 99) == [Drop(TID, "delivered")]
    assert (d.t.phase, d.t.hop) == (L.DELIVERED, None)


def test_a_receipt_at_the_destination_ends_its_delivery():
    d = Driver(destination(phase=L.DELIVERING, retry_at=T0 + 5, reason="x"))
    assert d(Receipt(), T0 + 1) == [Drop(TID, "delivered")]
    assert (d.t.phase, d.t.reason) == (L.DELIVERED, "")


@pytest.mark.parametrize("phase", [L.QUEUED, L.OFFERING, L.SENDING, L.HANDED])
def test_the_origins_failure_drops_every_copy_but_the_destinations(phase):
    assert _in_phase(origin, phase)(GaveUp(), T0 + 99) == [Drop(TID, "failed")]
    assert _in_phase(relay, phase)(GaveUp(), T0 + 99) == [Drop(TID, "origin gave up")]
    d = Driver(destination(phase=L.DELIVERING, retry_at=T0 + 5))
    assert d(GaveUp(), T0 + 1) == [] and d.t.phase == L.DELIVERING  # it is still delivered
    assert d(Tick(), T0 + 5) == [Deliver(TID)]


def test_a_relay_lets_its_copy_go_when_its_hop_signed_custody_and_remembers_the_hop():
    d = offering(relay, hop="NodeD")
    assert d(Confirmed("NodeD"), T0 + 2) == []  # not handed yet
    d(Handed(1, "stored"), T0 + 3)
    assert d(Confirmed("NodeC"), T0 + 4) == [] and d.t.phase == L.HANDED  # another hop's custody
    assert d(Confirmed("NodeD"), T0 + 5) == [Drop(TID, "stored by NodeD")]
    assert (d.t.phase, d.t.hop, d.t.reason, d.t.ended) == (L.FORWARDED, "NodeD", "", False)
    assert d(Confirmed("NodeD"), T0 + 6) == []  # once: the copy is gone already
    assert d.t.wake_at(POLICY) == T0 + POLICY.relay_keep()  # no resend: only the keep limit
    assert d.effects == [Offer(TID, "NodeD", 1), Drop(TID, "stored by NodeD")]


def _forwarded() -> Driver:
    """A relay that handed the transfer to NodeD, whose signed custody let our copy go."""
    d = offering(relay, hop="NodeD")
    d(Handed(1, "stored"), T0 + 2)
    assert d(Confirmed("NodeD"), T0 + 3) == [Drop(TID, "stored by NodeD")]
    assert d.t.phase == L.FORWARDED
    d.effects.clear()
    return d


def test_a_forwarded_relay_ends_without_effects_at_the_receipt_the_give_up_or_its_keep_limit():
    for end, at, phase in [(Receipt(), T0 + 5, L.DELIVERED), (GaveUp(), T0 + 5, L.DROPPED),
                           (Tick(), T0 + POLICY.relay_keep(), L.DROPPED)]:
        d = _forwarded()
        assert d(end, at) == [], end  # no copy left here: only the memory of the hop goes
        assert (d.t.phase, d.t.hop, d.t.ended) == (phase, None, True), end
        assert d(RefusedDownstream("NodeE", "too-large", "x"), at + 1) == []  # ended


def test_a_forwarded_relay_passes_its_hops_refusal_back():
    d = _forwarded()
    assert d(RefusedDownstream("NodeE", "too-large", "12 > 10"), T0 + 4) == [
        Report(TID, "NodeE", "too-large", "12 > 10")]
    assert (d.t.phase, d.t.reason) == (L.REFUSED, "refused by NodeE: too-large: 12 > 10")
    assert not d.t.ended  # it waits for the origin to give up, as any refused relay
    assert d(RefusedDownstream("NodeE", "too-large", "12 > 10"), T0 + 5) == []  # reported once


def test_a_forwarded_relay_waits_for_nothing_but_the_model_and_its_keep_limit():
    d = _forwarded()
    # No resend (the hop signed custody), no offer, no deadline before the keep limit; the
    # operator's cancel and flush are the origin's business or need a copy.
    for inp in (Tick(), Route("NodeB"), Flush(), Cancel(), LinkUp("NodeD"), LinkDown("NodeD"),
                Confirmed("NodeD"), Handed(1, "stored"), Refused(1, "too-large", "late"),
                Broke(1, "late"), Delivered(), DeliveryFailed("x"), Committed(), ReceiveFailed("x")):
        now = d.t
        assert d(inp, T0 + POLICY.relay_keep() - 1) == [] and d.t == now, inp
    assert d(Hold(), T0 + 10) == [] and d(Release(), T0 + 11) == []
    assert (d.t.phase, d.t.hop) == (L.FORWARDED, "NodeD")
    assert d(Tick(), T0 + POLICY.relay_keep()) == [] and d.t.phase == L.DROPPED


def test_the_origin_never_lets_go_on_custody_alone():
    d = offering()
    d(Handed(1, "stored"), T0 + 2)
    assert d(Confirmed("NodeB"), T0 + 3) == [] and d.t.phase == L.HANDED


def test_a_refusal_reported_by_the_hop_fails_the_transfer_at_the_origin():
    d = _in_phase(origin, L.HANDED)
    assert d(RefusedDownstream("NodeE", "too-large", "12 > 10"), T0 + 99) == [
        Fail(TID, "refused by NodeE: too-large: 12 > 10")]
    assert (d.t.phase, d.t.hop) == (L.FAILED, None)


def test_a_refusal_reported_by_the_hop_is_passed_back_by_a_relay_that_keeps_its_copy():
    d = _in_phase(relay, L.HANDED)
    assert d(RefusedDownstream("NodeE", "too-large", "12 > 10"), T0 + 99) == [
        Report(TID, "NodeE", "too-large", "12 > 10")]
    assert (d.t.phase, d.t.reason) == (L.REFUSED, "refused by NodeE: too-large: 12 > 10")
    assert d(Tick(), T0 + 99 + POLICY.confirm_after) == [] and d.t.phase == L.REFUSED  # no resend
    assert d(GaveUp(), T0 + 120) == [Drop(TID, "origin gave up")]  # the copy it kept goes now


@pytest.mark.parametrize("make", [origin, relay])
@pytest.mark.parametrize("phase", [L.QUEUED, L.OFFERING, L.SENDING])
def test_a_refusal_reported_downstream_means_nothing_before_the_transfer_was_handed(make, phase):
    # Queued: no hop to believe. Offering or sending: the answer to the offer decides.
    d = _in_phase(make, phase)
    now = d.t
    assert d(RefusedDownstream("NodeE", "too-large", "12 > 10"), T0 + 99) == [] and d.t == now
    dd = Driver(destination(phase=L.DELIVERING, retry_at=T0 + 5))
    assert dd(RefusedDownstream("NodeE", "too-large", "x"), T0 + 2) == [] and dd.t.phase == L.DELIVERING


# -- the operator: cancel, hold, release, flush ---------------------------------------------------
@pytest.mark.parametrize("phase", [L.QUEUED, L.OFFERING, L.SENDING, L.HANDED])
def test_cancel_fails_the_transfer_at_the_origin_only(phase):
    d = _in_phase(origin, phase)
    assert d(Cancel(), T0 + 2) == [Fail(TID, "cancelled")]
    assert _in_phase(origin, phase)(Cancel("cancelled by ops"), T0 + 2) == [Fail(TID, "cancelled by ops")]
    r = _in_phase(relay, phase)
    now = r.t
    assert r(Cancel(), T0 + 2) == [] and r.t == now
    dd = Driver(destination(phase=L.DELIVERING, retry_at=T0 + 5))
    assert dd(Cancel(), T0 + 2) == [] and dd.t.phase == L.DELIVERING


def test_hold_stops_offers_and_resends_but_not_the_deadline():
    d = Driver(origin())
    assert d(Hold(), T0 + 1) == [] and d.t.hold
    assert not d.t.due(T0 + 1)
    assert d(Route("NodeB"), T0 + 1) == [] and d.t.phase == L.QUEUED
    assert d.t.wake_at(POLICY) == T0 + 100  # only the deadline
    assert d(Release(), T0 + 2) == [] and not d.t.hold and d.t.due(T0 + 2)
    d(Route("NodeB"), T0 + 2)
    d(Hold(), T0 + 3)
    assert d.t.phase == L.OFFERING  # an offer under way goes on
    d(Handed(1, "stored"), T0 + 4)
    assert d(Tick(), T0 + 4 + POLICY.resend_after) == [] and d.t.phase == L.HANDED  # no resend
    assert d.t.wake_at(POLICY) == T0 + 100
    assert d(Tick(), T0 + 100) == [Fail(TID, "not delivered within 100 s")]


def test_release_lets_a_due_resend_happen():
    d = offering()
    d(Handed(1, "stored"), T0 + 2)
    d(Hold(), T0 + 3)
    d(Tick(), T0 + 60)
    assert d.t.phase == L.HANDED
    d(Release(), T0 + 61)
    assert d.t.wake_at(POLICY) == T0 + 52  # overdue: the next plan ticks it at once
    assert d(Tick(), T0 + 61) == [] and d.t.phase == L.QUEUED and d.t.tried == {"NodeB"}


def test_flush_ends_every_wait_once():
    d = offering()
    d(Broke(1, "unreachable"), T0 + 2)
    d(Route("NodeB"), d.t.retry_at)
    d(Broke(2, "unreachable"), d.t.retry_at + 1)
    now = d.t.retry_at - 0.4  # the backoff still runs
    assert d.t.attempts == 2 and d.t.avoid == {"NodeB"} and not d.t.due(now)
    assert d(Flush(), now) == []
    assert (d.t.phase, d.t.attempts, d.t.avoid, d.t.retry_at, d.t.flush) == (
        L.QUEUED, 0, frozenset(), now, True)
    assert d.t.due(now)
    assert d(Route("NodeB"), now) == [Offer(TID, "NodeB", 3)]
    assert not d.t.flush  # once


def test_flush_resends_a_handed_transfer_around_the_hop_that_stored_it():
    d = offering()
    d(Handed(1, "stored"), T0 + 2)
    assert d(Flush(), T0 + 3) == []
    assert (d.t.phase, d.t.hop, d.t.tried, d.t.handed_at, d.t.flush) == (
        L.QUEUED, None, frozenset({"NodeB"}), None, True)


def test_flush_is_ignored_on_hold_and_while_an_offer_or_a_delivery_is_under_way():
    d = Driver(origin(hold=True, retry_at=T0 + 50))
    assert d(Flush(), T0 + 1) == [] and not d.t.flush and not d.t.due(T0 + 1)
    d = offering()
    now = d.t
    assert d(Flush(), T0 + 2) == [] and d.t == now
    d = Driver(destination(phase=L.DELIVERING, retry_at=INF))
    assert d(Flush(), T0 + 2) == [] and d.t.retry_at == INF
    assert d(Tick(), T0 + 2) == []  # no second Deliver beside the one under way


def test_flush_retries_a_waiting_delivery_now():
    d = Driver(destination(phase=L.DELIVERING, retry_at=T0 + 200, attempts=8))
    assert d(Flush(), T0 + 2) == [] and d.t.retry_at == T0 + 2
    assert d(Tick(), T0 + 2) == [Deliver(TID)]


# -- purity ---------------------------------------------------------------------------------------
EVERY_INPUT = [Route("NodeB"), Route(None), Accepted(1, 0), Handed(1, "stored"), Handed(1, "pending", "x"),
               Refused(1, "busy", "x"), Refused(1, "too-large", "x"), Broke(1, "x"), Committed(),
               ReceiveFailed("x"), Delivered(), DeliveryFailed("x"), Receipt(), GaveUp(),
               Confirmed("NodeB"), RefusedDownstream("NodeE", "too-large", "x"), LinkUp("NodeB"),
               LinkDown("NodeB"), Tick(), Cancel(), Hold(), Release(), Flush()]


def _every_state():
    yield origin(avoid=frozenset({"NodeC"}), tried=frozenset({"NodeD"}), attempts=2)
    yield origin(phase=L.OFFERING, hop="NodeB", token=1)
    yield origin(phase=L.SENDING, hop="NodeB", token=1, offset=3)
    yield origin(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0)
    yield relay(phase=L.HANDED, hop="NodeB", token=1, handed_at=T0, hold=True)
    yield relay(phase=L.FORWARDED, hop="NodeB", token=1, handed_at=T0)
    yield relay(phase=L.REFUSED, reason="refused by NodeE: too-large: x")
    yield relay(phase=L.RECEIVING, hop="NodeB", offset=2)
    yield destination(phase=L.DELIVERING, retry_at=T0 + 1, attempts=1, reason="r")
    yield destination(phase=L.DELIVERING, retry_at=INF)


@pytest.mark.parametrize("inp", EVERY_INPUT, ids=repr)
def test_step_never_mutates_its_input_and_returns_frozen_values(inp):
    for t in _every_state():
        before = copy.deepcopy(t)
        for now in (T0 + 1, T0 + 10**6):
            new, effects = step(t, inp, now, POLICY)
            assert t == before
            assert isinstance(new, Transfer) and isinstance(effects, list)
            assert all(dataclasses.is_dataclass(e) for e in effects)
    with pytest.raises(dataclasses.FrozenInstanceError):
        origin().phase = L.FAILED  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        POLICY.backoff_cap = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("inp", EVERY_INPUT, ids=repr)
def test_an_ended_transfer_ignores_every_input(inp):
    for phase in sorted(L.ENDED):
        t = origin(phase=phase)
        assert step(t, inp, T0 + 10**6, POLICY) == (t, [])


def test_something_that_is_not_an_input_is_refused():
    with pytest.raises(TypeError):
        step(origin(), Drop(TID, "x"), T0, POLICY)  # an effect is not an input
