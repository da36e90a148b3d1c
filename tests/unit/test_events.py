import json

import pytest

from maildrop import events as E
from maildrop.errors import InvalidEvent
from maildrop.events import canonical, format_ts, parse_event, parse_ts
from tests.factories import FeedWriter


def test_round_trip_and_canonical_form():
    f = FeedWriter("NodeA")
    ev = f.configured()
    line = ev.to_line()
    obj = json.loads(line)
    assert line == json.dumps(obj, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    again = parse_event(line)
    assert again == ev
    assert again.verify_signature(f.key.public_line)


def test_ts_format_round_trip():
    assert format_ts(0.25) == "1970-01-01T00:00:00.250Z"
    assert parse_ts(format_ts(1_800_000_000.123)) == pytest.approx(1_800_000_000.123)


def test_tampered_content_breaks_the_id():
    f = FeedWriter("NodeA")
    obj = f.configured().to_dict()
    obj["data"]["address"] = "10.0.0.1:22"
    with pytest.raises(InvalidEvent, match="id does not match"):
        parse_event(canonical(obj))


def test_signature_by_another_key_fails():
    a, b = FeedWriter("NodeA"), FeedWriter("NodeB")
    ev = a.configured()
    assert not ev.verify_signature(b.key.public_line)


@pytest.mark.parametrize(
    "mutate, reason",
    [
        (lambda o: o.update(seq=0), "bad seq"),
        (lambda o: o.update(origin="../x"), "bad origin"),
        (lambda o: o.update(type="nope"), "unknown event type"),
        (lambda o: o.update(v=99), "newer"),
        (lambda o: o.pop("sig"), "fields"),
        (lambda o: o.update(ts="yesterday"), "bad ts"),
        (lambda o: o["data"].update(extra=1), "unexpected data"),
    ],
)
def test_structural_errors_name_the_reason(mutate, reason):
    obj = FeedWriter("NodeA").configured().to_dict()
    mutate(obj)
    with pytest.raises(InvalidEvent, match=reason):
        parse_event(canonical(obj))


def test_bad_json_and_oversize():
    with pytest.raises(InvalidEvent, match="bad JSON"):
        parse_event(b"{not json")
    with pytest.raises(InvalidEvent, match="larger"):
        parse_event(b"{" + b" " * 20000 + b"}")


def test_unsafe_names_refused_in_queued_events():
    f = FeedWriter("NodeA")
    f.configured()
    for bad in ["../etc/passwd", "/abs", "a/b", "x\x00y", "new\nline", "..", ".hidden", "CON", "a" * 300]:
        with pytest.raises(InvalidEvent):
            f.add(E.TRANSFER_QUEUED, {"transfer": "0" * 32, "destination": "NodeB", "name": bad,
                                      "size": 1, "sha256": "0" * 64})
