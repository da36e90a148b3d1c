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


# --- issue 9: hostile content is refused at parse time -------------------------------------

def _resigned(obj):
    """``obj`` with its id recomputed, so only the check under test can refuse it."""
    body = {k: v for k, v in obj.items() if k not in ("id", "sig")}
    return dict(body, id=E.compute_id(body), sig=obj["sig"])


@pytest.mark.parametrize("ts", [
    "2026-99-99T99:99:99.999Z", "2026-02-30T12:00:00.000Z", "2026-12-31T24:00:00.000Z",
    "2026-12-31T23:59:60.000Z", "0000-01-01T00:00:00.000Z", "1969-12-31T23:59:59.999Z",
])
def test_f6_a_ts_that_is_no_real_date_is_refused(ts):
    obj = FeedWriter("NodeA").configured().to_dict()
    obj["ts"] = ts
    with pytest.raises(InvalidEvent, match="bad ts"):
        parse_event(canonical(_resigned(obj)))
    with pytest.raises(ValueError):
        parse_ts(ts)


def test_f6_a_clock_outside_the_years_makes_no_event():
    f = FeedWriter("NodeA")
    with pytest.raises(InvalidEvent, match="clock says 1969"):
        f.add(E.LINK_CONFIGURED, {"peer": "NodeB"}, now=-86400.0)
    assert f.events == []
    assert f.add(E.LINK_CONFIGURED, {"peer": "NodeB"}, now=0.0).ts == "1970-01-01T00:00:00.000Z"


def test_f6_every_parsed_ts_can_be_read_back():
    for now in (0.0, 1_800_000_000.999, 253_402_300_799.0):  # 1970 .. 9999-12-31
        obj = FeedWriter("NodeA").configured().to_dict()
        obj["ts"] = format_ts(now)
        ev = parse_event(canonical(_resigned(obj)))
        assert parse_ts(ev.ts) == pytest.approx(now, abs=0.001)


@pytest.mark.parametrize("bad", [
    "X\x1b[2J", "X\rY", "X\x07", "X\u202eY", "X\u200bY", "X\u2028Y", "X\u2029Y", "X\x85Y",
    "X\ud800Y", "\t", "X\x7fY",
])
def test_f14_free_text_refuses_control_and_format_characters(bad):
    obj = FeedWriter("NodeA").configured().to_dict()
    obj["data"]["display_name"] = bad  # the schema is checked before the id: no re-signing
    with pytest.raises(InvalidEvent, match="data.display_name"):
        parse_event(json.dumps(obj).encode())  # as on the wire (a surrogate as \ud800)
    g = FeedWriter("NodeB")
    g.configured()
    with pytest.raises(InvalidEvent, match="data.reason"):
        g.add(E.TRANSFER_FAILED, {"transfer": "0" * 32, "reason": bad})


def test_f14_ordinary_text_with_spaces_still_goes_in():
    f = FeedWriter("NodeA")
    f.configured()
    ev = f.add(E.TRANSFER_FAILED, {"transfer": "0" * 32,
                                   "reason": "not delivered within 21600 s (disk full, ünïcode ok)"})
    assert parse_event(ev.to_line()) == ev
    assert E.make_event(f.key, "NodeC", 1, None, 1.8e9, E.NODE_CONFIGURED, {
        "id": "NodeC", "display_name": "Node C — Zürich\u00a0office", "address": "[::1]:7000",
        "key": f.key.public_line}).data["display_name"] == "Node C — Zürich\u00a0office"


@pytest.mark.parametrize("address", [
    "a" * 254 + ":22",                                # host over 253 characters
    ".".join(["a" * 60] * 150) + ":22",               # an endless host
    "b" * 64 + ".example:22",                         # a label over 63 characters
    "host:123456", "host:", ":22", "-host:22", "[::1]", "[" + "1:" * 200 + "1]:22",
])
def test_f5_address_is_bounded(address):
    f = FeedWriter("NodeA")
    with pytest.raises(InvalidEvent, match="data.address"):
        f.configured(address=address)


def test_f5_longest_legal_address_is_accepted():
    host = ".".join(["a" * 63] * 3 + ["a" * 61])  # 253 characters
    assert len(host) == 253
    for address in (f"{host}:65535", "[2001:db8::ffff:255.255.255.255]:22", "node-1.example.org:7000"):
        assert FeedWriter("NodeA").configured(address=address).data["address"] == address


def test_f5_every_field_of_every_schema_is_bounded():
    """Each schema check refuses a 20,000-character string and a giant int: none is unbounded."""
    for type_, schema in E.SCHEMAS.items():
        for field, ok in schema.items():
            assert not ok("x" * 20_000), (type_, field)
            assert not ok(10 ** 30), (type_, field)
    obj = FeedWriter("NodeA").configured().to_dict()
    for field, bad in (("seq", 2 ** 63), ("sig", "A" * 201)):
        with pytest.raises(InvalidEvent, match=f"bad {field}"):
            parse_event(canonical(_resigned(dict(obj, **{field: bad}))))


@pytest.mark.parametrize("raw", [
    b"[" * 8000 + b"]" * 8000,
    b'{"v":1,"data":' * 1000 + b"1" + b"}" * 1000,
    b'{"a":"\\ud800"}',
])
def test_f15_deep_or_strange_json_is_an_invalid_event(raw):
    with pytest.raises(InvalidEvent):
        parse_event(raw)


def test_f15_a_mapping_is_held_to_the_size_limit_too():
    obj = FeedWriter("NodeA").configured().to_dict()
    obj["data"]["pad"] = "p" * E.MAX_EVENT_BYTES
    with pytest.raises(InvalidEvent, match="larger than"):
        parse_event(obj)
    deep = obj
    for _ in range(5000):
        deep = {"v": 1, "data": deep}
    with pytest.raises(InvalidEvent, match="nested"):
        parse_event(deep)
    with pytest.raises(InvalidEvent, match="larger than"):  # bytes, not characters
        parse_event("é" * (E.MAX_EVENT_BYTES // 2 + 1))


def test_f15_a_value_of_the_wrong_shape_is_named_without_repr():
    obj = FeedWriter("NodeA").configured().to_dict()
    inner = "n"
    for _ in range(900):
        inner = [inner]
    obj["data"]["display_name"] = inner
    with pytest.raises(InvalidEvent, match=r"data.display_name is invalid \(a list\)"):
        parse_event(obj)


def test_f13_names_in_events_must_be_nfc_and_portable():
    f = FeedWriter("NodeA")
    f.configured()
    nfd = "re\u0301sume\u0301.txt"
    for bad in [nfd, "COM\u00b9", "lpt\u00b3.txt", "trail.", "trail ", "a:b", "a*b", "a?b",
                "a|b", "a<b", "a>b", 'a"b', "con .txt", "CONIN$"]:
        with pytest.raises(InvalidEvent, match="data.name"):
            f.add(E.TRANSFER_QUEUED, {"transfer": "0" * 32, "destination": "NodeB", "name": bad,
                                      "size": 1, "sha256": "0" * 64})
