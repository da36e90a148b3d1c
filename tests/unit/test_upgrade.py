"""Record versions: a version 1 record is read as version 2 and given back as it was signed."""

from __future__ import annotations

import base64
import copy
from pathlib import Path

import pytest

from maildrop import events as E
from maildrop.errors import InvalidEvent
from maildrop.events import canonical, compute_id, format_ts, make_event, parse_event
from tests.factories import T0, node_key

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "release-2026-12-01"


def v1_record(key, type_, data, seq=1, prev=None) -> dict:
    """A record as the release of 2026-12-01 signed it (version 1)."""
    body = {"v": 1, "origin": "NodeA", "seq": seq, "prev": prev, "ts": format_ts(T0),
            "type": type_, "data": data}
    eid = compute_id(body)
    return {**body, "id": eid, "sig": base64.b64encode(key.sign(eid.encode())).decode()}


def test_new_records_are_version_2():
    ev = make_event(node_key(), "NodeA", 1, None, T0, E.LINK_CONFIGURED, {"peer": "NodeB"})
    assert E.VERSION == 2 and ev.v == 2 and ev.to_dict()["v"] == 2
    assert parse_event(ev.to_line()) == ev


def test_a_v1_record_reads_as_v2_and_writes_back_as_signed():
    key = node_key()
    rec = v1_record(key, E.TRANSFER_RELAYED, {"transfer": "a" * 32, "from": "NodeB"}, seq=3, prev="f" * 64)
    line = canonical(rec) + b"\n"
    ev = parse_event(line)
    assert ev.v == 1 and ev.seq == 3 and ev.prev == "f" * 64
    assert ev.to_line() == line  # never re-stamped
    assert ev.id == rec["id"] and ev.verify_signature(key.public_line)
    assert ev.is_legacy_fact


def test_a_v1_network_event_is_not_a_legacy_fact():
    key = node_key()
    ev = parse_event(v1_record(key, E.LINK_UP, {"peer": "NodeB"}))
    assert ev.v == 1 and not ev.is_legacy_fact
    new = E.make_fact(key, "NodeA", T0, E.TRANSFER_FAILED, {"transfer": "b" * 32, "reason": "x"})
    assert not new.is_legacy_fact  # a v2 record is never legacy


def test_the_upgrade_does_not_touch_its_input():
    rec = v1_record(node_key(), E.LINK_UP, {"peer": "NodeB"})
    before = copy.deepcopy(rec)
    out = E._UPGRADES[1](rec)
    assert rec == before and out == {**before, "v": 2}
    parse_event(rec)
    assert rec == before


def test_a_tampered_v1_record_is_still_refused():
    rec = v1_record(node_key(), E.LINK_UP, {"peer": "NodeB"})
    rec["data"] = {"peer": "NodeC"}
    with pytest.raises(InvalidEvent, match="id does not match"):
        parse_event(rec)


def test_a_v1_record_relabelled_v2_is_refused():
    rec = v1_record(node_key(), E.LINK_UP, {"peer": "NodeB"})
    rec["v"] = 2  # the id is over the v1 body: a record cannot change its version
    with pytest.raises(InvalidEvent, match="id does not match"):
        parse_event(rec)


def test_a_newer_version_is_refused_with_a_reason():
    rec = v1_record(node_key(), E.LINK_UP, {"peer": "NodeB"})
    rec["v"] = 3
    with pytest.raises(InvalidEvent, match="newer than this maildrop understands"):
        parse_event(rec)


def test_every_record_of_the_release_fixture_reads_and_round_trips():
    lines = [ln + b"\n" for p in sorted(FIXTURE.glob("*/state/events.jsonl"))
             for ln in p.read_bytes().splitlines() if ln.strip()]
    assert len(lines) > 50
    types = set()
    for line in lines:
        ev = parse_event(line)
        assert ev.v == 1 and ev.to_line() == line
        types.add(ev.type)
        assert ev.is_legacy_fact == (ev.type in E.TRANSFER_TYPES)
    assert {E.TRANSFER_QUEUED, E.TRANSFER_RELAYED, E.TRANSFER_DELIVERED, E.NODE_CONFIGURED} <= types
