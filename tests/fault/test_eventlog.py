"""The event log on real files: round trip, torn tails, bad lines, two writers at once."""

import json
import os
import subprocess
import sys
import textwrap

from maildrop import events as E
from maildrop.eventlog import EventLog
from maildrop.keys import generate_key
from tests.factories import FeedWriter


def _configure(log, key, node="NodeA", now=1.8e9):
    return log.append_own(key, node, [(E.NODE_CONFIGURED, {
        "id": node, "display_name": node, "address": "127.0.0.1:7001", "key": key.public_line})], now)


def test_append_read_round_trip(tmp_path):
    key = generate_key(tmp_path / "k")
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    _configure(log, key)
    log.append_own(key, "NodeA", [(E.LINK_CONFIGURED, {"peer": "NodeB"}),
                                  (E.LINK_CONFIGURED, {"peer": "NodeC"})], 1.8e9)
    fp = log.ledger.fingerprint()
    log.close()
    again = EventLog(path, writable=False)
    assert again.ledger.version_vector() == {"NodeA": 3}
    assert again.ledger.fingerprint() == fp
    assert again.network.configured("NodeA", "NodeC")
    assert again.rejected == []
    assert path.read_bytes().count(b"\n") == 3


def test_torn_last_line_is_set_aside_and_never_folded(tmp_path, caplog):
    key = generate_key(tmp_path / "k")
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    _configure(log, key)
    ev = log.append_own(key, "NodeA", [(E.LINK_CONFIGURED, {"peer": "NodeB"})], 1.8e9)[0]
    log.close()
    good = path.read_bytes()
    third = ev.to_line()[:-10]  # a power cut mid-write: no newline, cut JSON
    with open(path, "ab") as f:
        f.write(third)
    reader = EventLog(path, writable=False)  # a reader never truncates
    assert reader.ledger.version_vector() == {"NodeA": 2}
    assert path.read_bytes().endswith(third)
    reader.close()
    log = EventLog(path)
    assert log.ledger.version_vector() == {"NodeA": 2}
    assert path.read_bytes() == good
    assert log.torn is not None and log.torn.read_bytes() == third
    assert "eventlog.torn" in caplog.text
    # The log keeps working after recovery.
    log.append_own(key, "NodeA", [(E.LINK_CONFIGURED, {"peer": "NodeC"})], 1.8e9)
    assert EventLog(path, writable=False).ledger.version_vector() == {"NodeA": 3}


def test_zero_filled_tail_counts_as_torn(tmp_path):
    key = generate_key(tmp_path / "k")
    path = tmp_path / "events.jsonl"
    log = EventLog(path)
    _configure(log, key)
    log.close()
    with open(path, "ab") as f:
        f.write(b"\x00" * 100 + b"\n")
    log = EventLog(path)
    assert log.ledger.version_vector() == {"NodeA": 1}
    assert log.torn is not None


def test_bad_line_in_the_middle_is_rejected_and_nothing_valid_lost(tmp_path, caplog):
    a, b = FeedWriter("NodeA"), FeedWriter("NodeB")
    a.configured(), a.link("NodeB"), b.configured(), b.link("NodeA")
    forged = json.loads(b.events[1].to_line())
    forged["data"]["peer"] = "NodeZ"
    path = tmp_path / "events.jsonl"
    path.write_bytes(
        a.events[0].to_line() + b"{garbage\n" + json.dumps(forged).encode() + b"\n"
        + b.events[0].to_line() + a.events[1].to_line() + b.events[1].to_line()
    )
    log = EventLog(path)
    assert log.ledger.version_vector() == {"NodeA": 2, "NodeB": 2}
    assert len(log.rejected) == 2
    assert any("bad JSON" in r for r in log.rejected)
    assert any("id does not match" in r for r in log.rejected)
    assert "eventlog.rejected" in caplog.text


def test_ingest_rejects_forgeries_and_keeps_the_rest(tmp_path):
    a = FeedWriter("NodeA")
    a.configured()
    a.link("NodeB")
    evil = FeedWriter("NodeA")
    evil.events = [a.events[0]]
    forged = evil.link("NodeEvil")
    log = EventLog(tmp_path / "events.jsonl", pinned={"NodeA": a.key.public_line})
    res = log.ingest([a.events[0], forged, a.events[1]])
    assert res.accepted == a.events  # the forged seq 2 was refused, the genuine one joined
    assert len(res.rejected) == 1 and "bad signature" in res.rejected[0]
    assert not log.ledger.conflicts
    assert not log.network.configured("NodeA", "NodeEvil")


WRITER = textwrap.dedent("""
    import sys
    from pathlib import Path
    from maildrop import events as E
    from maildrop.eventlog import EventLog
    from maildrop.keys import load_key
    path, keyfile, node, n = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
    key = load_key(keyfile)
    log = EventLog(path)
    if not log.ledger.feeds.get(node):
        log.append_own(key, node, [(E.NODE_CONFIGURED, {"id": node, "display_name": node,
                       "address": "127.0.0.1:1", "key": key.public_line})], 1.8e9)
    print("ready", flush=True)
    sys.stdin.readline()
    for i in range(n):
        log.append_own(key, node, [(E.LINK_CONFIGURED, {"peer": f"P{i}"})], 1.8e9)
    print("done", flush=True)
""")


def test_two_processes_appending_at_once(tmp_path):
    """Two real processes, two keys, one file: every event of both feeds survives intact."""
    path = tmp_path / "events.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    procs = []
    for node in ("NodeA", "NodeB"):
        key = generate_key(tmp_path / node)
        p = subprocess.Popen([sys.executable, str(script), str(path), str(key.path), node, "300"],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                             cwd=os.getcwd())
        assert p.stdout.readline().strip() == "ready"
        procs.append(p)
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdout.readline().strip() == "done"
        assert p.wait(60) == 0
    log = EventLog(path, writable=False)
    assert log.rejected == []
    assert log.ledger.version_vector() == {"NodeA": 301, "NodeB": 301}
    assert path.read_bytes().count(b"\n") == 602


def test_same_origin_two_processes_never_fork(tmp_path):
    """The agent and a CLI command appending as the same node interleave, never fork."""
    path = tmp_path / "events.jsonl"
    script = tmp_path / "writer.py"
    script.write_text(WRITER)
    key = generate_key(tmp_path / "NodeA")
    log = EventLog(path)
    _configure(log, key)
    log.close()
    procs = [subprocess.Popen([sys.executable, str(script), str(path), str(key.path), "NodeA", "200"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(2)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.stdout.readline().strip() == "done"
        assert p.wait(60) == 0
    log = EventLog(path, writable=False)
    assert log.rejected == []
    # 401 events, and a checkpoint if the interleaving left few enough peers for one to fit
    checkpoints = path.read_bytes().count(b'"type":"feed.checkpoint"')
    assert log.ledger.version_vector() == {"NodeA": 401 + checkpoints}
    assert not log.ledger.conflicts
