"""explain (every hop of one transfer from its facts) and time travel (the model at a moment)."""

from __future__ import annotations

import copy

import pytest

from maildrop import events as E
from maildrop.explain import explain
from maildrop.timetravel import Unheld, check_held, held_since, model_at, parse_at
from tests.factories import T0, FeedWriter, network_of

TID = "a" * 32
SHA = "b" * 64


def chain():
    """A-B-C-D with links; returns the feeds."""
    return network_of([("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeD")])


def queued(f: FeedWriter, at: float, dest="NodeD", tid=TID):
    return f.add(E.TRANSFER_QUEUED, {"transfer": tid, "destination": dest, "name": "r.txt",
                                     "size": 10, "sha256": SHA}, at)


def relayed(f: FeedWriter, frm: str, at: float, tid=TID):
    return f.add(E.TRANSFER_RELAYED, {"transfer": tid, "from": frm}, at)


def delivered(f: FeedWriter, at: float, sha=SHA):
    return f.add(E.TRANSFER_DELIVERED, {"transfer": TID, "sha256": sha, "name": "r.txt"}, at)


def three_hops():
    fs = chain()
    facts = [queued(fs["NodeA"], T0 + 10), relayed(fs["NodeB"], "NodeA", T0 + 11),
             relayed(fs["NodeC"], "NodeB", T0 + 12), delivered(fs["NodeD"], T0 + 13)]
    return fs, facts


def test_every_hop_of_a_delivered_three_hop_transfer_in_order():
    _, facts = three_hops()
    doc = explain(TID, reversed(facts), "NodeB", "r.txt")
    assert doc["state"] == "delivered" and doc["origin"] == "NodeA" and doc["destination"] == "NodeD"
    rows = [(h["node"], h["role"], h["from"], h["took"], h["outcome"], h["to"]) for h in doc["hops"]]
    ts = [E.format_ts(T0 + i) for i in (10, 11, 12, 13)]
    assert rows == [("NodeA", "origin", None, ts[0], "handed", "NodeB"),
                    ("NodeB", "custodian", "NodeA", ts[1], "handed", "NodeC"),
                    ("NodeC", "custodian", "NodeB", ts[2], "handed", "NodeD"),
                    ("NodeD", "destination", "NodeC", ts[3], "delivered", None)]
    assert [t["type"] for t in doc["timeline"]] == [e.type for e in facts]
    assert doc["delivered"] == ts[3] and doc["name"] == "r.txt" and doc["here"] is None


def test_in_custody_shows_who_holds_it():
    _, facts = three_hops()
    doc = explain(TID, facts[:3], "NodeC", here={"id": TID, "state": "deferred"})
    assert doc["state"] == "in custody"
    assert doc["hops"][-1]["node"] == "NodeC" and doc["hops"][-1]["outcome"] == "holding"
    assert doc["here"] == {"id": TID, "state": "deferred"}


def test_a_refusal_and_the_origins_failure_give_reasons():
    fs, facts = three_hops()
    refused = fs["NodeB"].add(E.TRANSFER_REFUSED, {"transfer": TID, "origin": "NodeA", "by": "NodeC",
                                                   "reason": "too-large", "detail": "limit 5"}, T0 + 12)
    failed = fs["NodeA"].add(E.TRANSFER_FAILED, {"transfer": TID, "reason": "refused: too-large"}, T0 + 14)
    doc = explain(TID, [facts[0], facts[1], refused, failed], "NodeA")
    b = next(h for h in doc["hops"] if h["node"] == "NodeB")
    assert b["outcome"] == "refused" and b["to"] == "NodeC" and "too-large (limit 5)" in b["reason"]
    assert doc["state"] == "failed" and doc["failed"] == "refused: too-large"


def test_a_receipt_for_other_bytes_or_by_another_node_is_not_counted():
    fs, facts = three_hops()
    wrong = [facts[0], delivered(fs["NodeC"], T0 + 12), delivered(fs["NodeD"], T0 + 13, sha="c" * 64)]
    doc = explain(TID, wrong, "NodeA")
    assert doc["state"] == "queued" and doc["delivered"] is None
    assert [t["counted"] for t in doc["timeline"]] == [True, False, False]
    fail_by_other = fs["NodeB"].add(E.TRANSFER_FAILED, {"transfer": TID, "reason": "nope"}, T0 + 20)
    assert explain(TID, [facts[0], fail_by_other], "NodeA")["state"] == "queued"


def test_the_destination_is_not_told_a_hop_no_fact_names():
    _, facts = three_hops()
    doc = explain(TID, [facts[0], facts[3]], "NodeD")  # what a scoped destination holds
    d = doc["hops"][-1]
    assert d["node"] == "NodeD" and d["from"] is None and d["outcome"] == "delivered"
    assert doc["hops"][0]["to"] is None


def test_no_fact_is_none_and_inputs_are_not_changed():
    _, facts = three_hops()
    assert explain("c" * 32, facts, "NodeA") is None
    before = copy.deepcopy([e.to_dict() for e in facts])
    explain(TID, facts, "NodeA")
    assert [e.to_dict() for e in facts] == before


def test_a_rival_claim_is_named_not_explained():
    fs, facts = three_hops()
    rival = queued(FeedWriter("NodeZ"), T0 + 9, dest="NodeB")
    doc = explain(TID, [*facts, rival], "NodeB")
    assert doc["origin"] == "NodeA" and doc["rival_claims"] == ["NodeZ"] and doc["state"] == "delivered"


# -- time travel ---------------------------------------------------------------------------

def test_model_at_before_and_after_the_delivery():
    fs, facts = three_hops()
    history = [e for f in fs.values() for e in f.events]
    assert TID not in model_at(history, T0 + 9.999).transfers
    assert model_at(history, T0 + 10).transfers[TID].state == "queued"
    assert model_at(history, T0 + 12.5).transfers[TID].state == "relayed"
    assert model_at(history, T0 + 13).transfers[TID].state == "delivered"
    assert set(model_at(history, T0 + 13).nodes) == {"NodeA", "NodeB", "NodeC", "NodeD"}


@pytest.mark.parametrize(("text", "want"), [
    ("now", T0), ("-2h", T0 - 7200), ("-90s", T0 - 90), ("-1d12h", T0 - 129600),
    (E.format_ts(T0 - 5), T0 - 5), ("2027-01-15T08:00:00Z", T0), ("2027-01-15T09:00:00+01:00", T0),
    ("2027-01-15T07:59:59.5z", T0 - 0.5),
])
def test_parse_at_reads_iso_and_relative_times(text, want):
    assert parse_at(text, T0) == pytest.approx(want)


def test_parse_at_naive_iso_is_utc():
    assert parse_at("2027-01-15T08:00:00", T0) == parse_at("2027-01-15T08:00:00Z", T0)


@pytest.mark.parametrize("text", ["", "yesterday", "-2x", "-", "2099-01-01T00:00:00Z", "12:00"])
def test_parse_at_refuses_with_a_reason(text):
    with pytest.raises(ValueError) as exc:
        parse_at(text, T0)
    assert "\n" not in str(exc.value)


def test_held_since_is_the_oldest_record_or_the_retention_or_a_compacted_feed():
    fs, _ = three_hops()
    history = [e for f in fs.values() for e in f.events]
    assert held_since(history, T0 + 100, keep=1e9).since == T0  # the oldest record
    assert held_since(history, T0 + 100, keep=50).since == T0 + 50  # retention
    compacted = [e for e in history if not (e.origin == "NodeA" and e.seq < 3)]
    first_a = min((e for e in compacted if e.origin == "NodeA"), key=lambda e: e.seq)
    assert held_since(compacted, T0 + 100, 1e9).since == E.parse_ts(first_a.ts)
    assert held_since([], T0, 1e9).since is None
    check_held(held_since(history, T0 + 100, 1e9), T0)
    with pytest.raises(Unheld, match="before the history held here"):
        check_held(held_since(history, T0 + 100, 1e9), T0 - 1)


def test_a_relay_that_holds_only_its_own_facts_orders_the_hop_before_it():
    _, facts = three_hops()
    doc = explain(TID, [facts[0], facts[2], facts[3]], "NodeC")  # the claim, C's custody, the receipt
    assert [(h["node"], h["outcome"], h["to"]) for h in doc["hops"]] == [
        ("NodeA", "handed", None), ("NodeB", "handed", "NodeC"), ("NodeC", "handed", "NodeD"),
        ("NodeD", "delivered", None)]
    assert doc["state"] == "delivered" and doc["hops"][0]["left"] is None
