"""logsafe (issue 14, item 4): fields read from the format string and arguments, values
quoted in the text form, raw in the JSON form, syslog priorities under the journal."""

from __future__ import annotations

import ast
import json
import logging
import re
import sys

import pytest

from maildrop.logsafe import JsonFormatter, OneLine, TextFormatter, parse, priority, quote

_KV = re.compile(r'(?:^|\s)([A-Za-z_][\w.-]*)=("(?:[^"\\]|\\.)*"|[^\s"]*)')


def fields_of(line: str) -> dict[str, str]:
    """What a log reader gets from a text line: key=value pairs, quoted values unescaped."""
    return {k: ast.literal_eval(v) if v.startswith('"') else v for k, v in _KV.findall(line)}


def record(msg: str, *args: object, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("maildrop.agent", level, __file__, 1, msg, args or None, None)


NASTY = ["a b", "k=v", 'say "hi"', "back\\slash", "line\nbreak", "\x1b[2J", "\u2028", "", "tab\there",
         "nbsp\xa0x", "ünïcode"]


@pytest.mark.parametrize("value", NASTY)
def test_4_a_value_reads_back_as_itself_and_stays_on_one_line(value):
    r = record("outbox.refused path=%s reason=%s", value, "unsafe-name")
    text = TextFormatter().format(r)
    assert "\n" not in text and text.isprintable()
    assert fields_of(text) == {"path": value, "reason": "unsafe-name"}


def test_4_plain_values_stay_bare_and_others_are_quoted():
    assert quote("NodeB") == "NodeB" and quote("127.0.0.1:7001") == "127.0.0.1:7001"
    assert quote("ünïcode") == "ünïcode"
    assert quote("a b") == '"a b"' and quote("k=v") == '"k=v"' and quote("") == '""'
    assert quote('q"\\') == '"q\\"\\\\"'
    assert quote("a\nb\x1b") == '"a\\nb\\x1b"'


def test_4_fields_come_from_the_format_and_args_not_the_merged_text():
    p = parse(record("relay.hop.retry transfer=%s peer=%s attempt=%d error=%s", "t1", "NodeC", 3,
                     "TimeoutError: peer=NodeX forged=1"))
    assert p.event == "relay.hop.retry"
    assert p.fields == {"transfer": "t1", "peer": "NodeC", "attempt": "3",
                        "error": "TimeoutError: peer=NodeX forged=1"}
    assert p.text == 'relay.hop.retry transfer=t1 peer=NodeC attempt=3 error="TimeoutError: peer=NodeX forged=1"'
    assert p.message == "relay.hop.retry transfer=t1 peer=NodeC attempt=3 error=TimeoutError: peer=NodeX forged=1"


def test_4_a_value_may_join_several_args_or_carry_a_unit():
    p = parse(record("agent.started node=%s listen=%s:%d after=%.0fs", "NodeA", "::1", 7001, 2.4))
    assert p.fields == {"node": "NodeA", "listen": "::1:7001", "after": "2s"}


def test_4_punctuation_or_a_plain_word_ends_the_fields():
    p = parse(record("outbox.refused path=%s reason=%s: put back as %s", "/o/a b", "changed", "/o/x y=1"))
    assert p.fields == {"path": "/o/a b", "reason": "changed"}
    assert p.text == 'outbox.refused path="/o/a b" reason=changed: put back as "/o/x y=1"'
    p = parse(record("eventlog.conflict origin=%s reason=%s (never routed to; evidence in %s)",
                     "NodeB", "two events for seq 3", "/s/c.jsonl"))
    assert p.fields == {"origin": "NodeB", "reason": "two events for seq 3"}
    assert fields_of(p.text) == {"origin": "NodeB", "reason": "two events for seq 3"}


def test_4_a_preformatted_line_logged_with_percent_s_is_read_as_the_format():
    p = parse(record("%s", "ledger.admission.refused origin=NodeX reason=too-many-nodes limit=4096"))
    assert p.event == "ledger.admission.refused"
    assert p.fields == {"origin": "NodeX", "reason": "too-many-nodes", "limit": "4096"}


def test_4_records_that_do_not_fit_are_one_escaped_line_without_fields():
    for r, message in ((record("x=%(a)s y", {"a": "1\n2"}), "x=1\n2 y"),
                       (record("100%% of %s", "x"), "100% of x"),
                       (record("no args, 100% literal"), "no args, 100% literal")):
        p = parse(r)
        assert (p.event, p.fields, p.message) == (None, {}, message)
        assert "\n" not in p.text
    p = parse(record("ignoring temp-named folder outbox/%s", "a\nb"))
    assert p.event is None and p.text == 'ignoring temp-named folder outbox/"a\\nb"'


def test_4_a_record_logging_cannot_format_fails_as_logging_would():
    with pytest.raises(TypeError):
        parse(record("relay.x n=%d", "not a number"))
    with pytest.raises(TypeError):
        parse(record("relay.x a=%s b=%s", "only one"))


def test_4_json_has_the_fields_as_keys_and_escapes_once():
    r = record("outbox.refused path=%s reason=%s level=%s", "/o/evil\nname \x1b.txt", "unsafe-name", "x")
    line = JsonFormatter().format(r)
    assert "\n" not in line and line.isascii()
    d = json.loads(line)
    assert d["event"] == "outbox.refused" and d["level"] == "info" and d["logger"] == "maildrop.agent"
    assert d["path"] == "/o/evil\nname \x1b.txt"  # the raw value: not escaped twice
    assert d["msg"] == "outbox.refused path=/o/evil\nname \x1b.txt reason=unsafe-name level=x"
    assert d["_level"] == "x"  # a field named like a key of the record itself
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", d["ts"])


def test_4_oneline_keeps_the_reading_for_the_handlers_after_it():
    """The recent-errors handler (OneLine) runs before the root handler: the JSON form must
    still see the fields and the raw message."""
    r = record("relay.hop.failed transfer=%s error=%s; rerouting", "t1", "a\nb", level=logging.WARNING)
    assert OneLine().filter(r)
    assert r.getMessage() == 'relay.hop.failed transfer=t1 error="a\\nb"; rerouting'
    d = json.loads(JsonFormatter().format(r))
    assert d["error"] == "a\nb" and d["msg"] == "relay.hop.failed transfer=t1 error=a\nb; rerouting"


@pytest.mark.parametrize("level, prio", [(logging.CRITICAL, 2), (logging.ERROR, 3), (logging.WARNING, 4),
                                         (logging.INFO, 6), (logging.DEBUG, 7)])
def test_4_journal_lines_start_with_the_syslog_priority(level, prio):
    assert priority(level) == prio
    r = record("link.down peer=%s", "NodeB", level=level)
    assert TextFormatter(journal=True).format(r).startswith(f"<{prio}>2")
    assert JsonFormatter(journal=True).format(r).startswith(f"<{prio}>{{")
    assert not TextFormatter().format(r).startswith("<")


def test_4_every_line_of_a_traceback_carries_the_priority():
    try:
        raise ValueError("boom")
    except ValueError:
        r = logging.LogRecord("maildrop.agent", logging.ERROR, __file__, 1, "relay.plan.failed transfer=%s",
                              ("t1",), sys.exc_info())
    lines = TextFormatter(journal=True).format(r).split("\n")
    assert len(lines) > 2 and all(ln.startswith("<3>") for ln in lines)
    assert lines[-1] == "<3>ValueError: boom"
