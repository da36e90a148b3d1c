"""The snapshot of the fold on real files: round trip, and every way it must be ignored."""

import base64
import hashlib
import json
import logging
import os
import signal
import subprocess
import sys
import textwrap

import pytest

from maildrop import events as E
from maildrop import snapshot
from maildrop.eventlog import EventLog
from maildrop.keys import generate_key

T0 = 1.8e9


def _log_with_history(tmp_path, n=40):
    """NodeA's writable log: its config and ``n + 1`` links."""
    key = generate_key(tmp_path / "k")
    path = tmp_path / "state" / "events.jsonl"
    elog = EventLog(path, me="NodeA")
    elog.append_own(key, "NodeA", [(E.NODE_CONFIGURED, {
        "id": "NodeA", "display_name": "A", "address": "127.0.0.1:7001", "key": key.public_line})], T0)
    elog.append_own(key, "NodeA", [(E.LINK_CONFIGURED, {"peer": "NodeB"})], T0 + 1)
    elog.append_own(key, "NodeA", [(E.LINK_CONFIGURED, {"peer": f"Peer{i}"}) for i in range(n)], T0 + 2)
    return key, path, elog


def _picture(elog):
    return (elog.ledger.fingerprint(), elog.ledger.count, elog.network.as_dict())


def test_encode_decode_round_trip_gives_the_same_events(tmp_path):
    _, _, elog = _log_with_history(tmp_path, 5)
    held = list(elog.ledger.all_events())
    offset, covered, back = snapshot.decode(snapshot.encode("NodeA", 123, "ab" * 32, held), "NodeA")
    assert (offset, covered) == (123, "ab" * 32)
    assert back == held
    assert [e.to_line() for e in back] == [e.to_line() for e in held]


def test_a_start_uses_the_snapshot_and_replays_only_what_follows(tmp_path, caplog):
    key, path, elog = _log_with_history(tmp_path)
    assert elog.write_snapshot() == 42
    after = elog.append_own(key, "NodeA", [(E.LINK_CONFIGURED, {"peer": "NodeC"})], T0 + 3)
    full = _picture(elog)
    elog.close()
    with caplog.at_level(logging.INFO, logger="maildrop"):
        again = EventLog(path, writable=False, me="NodeA")
    assert again.snapshot_count == 42
    assert "snapshot.loaded events=42" in caplog.text
    assert _picture(again) == full
    assert again.network.configured("NodeA", "NodeC")  # the line after the snapshot's offset
    assert again.ledger.feeds["NodeA"].events[-1] == after[0]
    # A reader of the whole log, every signature checked, folds exactly the same.
    check = EventLog(path, writable=False, me="NodeA", verify_stored=True)
    assert check.snapshot_count == 0 and _picture(check) == full


def _ignored(path, caplog, reason, me="NodeA"):
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="maildrop"):
        elog = EventLog(path, writable=False, me=me)
    assert elog.snapshot_count == 0
    assert f"snapshot.ignored path={snapshot.path_for(path)} reason={reason}" in caplog.text
    return elog


def test_a_corrupted_snapshot_is_ignored_and_the_log_replayed(tmp_path, caplog):
    _, path, elog = _log_with_history(tmp_path)
    elog.write_snapshot()
    full = _picture(elog)
    elog.close()
    snap = snapshot.path_for(path)
    data = bytearray(snap.read_bytes())
    data[len(data) // 2] ^= 0x01
    snap.write_bytes(bytes(data))
    assert _picture(_ignored(path, caplog, "checksum")) == full
    snap.write_bytes(bytes(data[: len(data) // 3]))  # cut short (a disk that lost its tail)
    assert _picture(_ignored(path, caplog, "checksum")) == full
    snap.write_bytes(b"")
    assert _picture(_ignored(path, caplog, "truncated")) == full


def test_a_snapshot_of_a_longer_log_is_ignored_after_a_restore(tmp_path, caplog):
    key, path, elog = _log_with_history(tmp_path)
    backup = path.read_bytes()  # the log as an older backup holds it
    elog.append_own(key, "NodeA", [(E.LINK_CONFIGURED, {"peer": "NodeC"})], T0 + 3)
    elog.write_snapshot()
    elog.close()
    path.write_bytes(backup)
    restored = _ignored(path, caplog, "log-shorter")
    assert not restored.network.configured("NodeA", "NodeC")
    assert restored.ledger.count == 42


def test_a_snapshot_of_a_rewritten_log_is_ignored(tmp_path, caplog):
    _, path, elog = _log_with_history(tmp_path)
    elog.write_snapshot()
    full = _picture(elog)
    elog.close()
    # The log rewritten (as a compaction would): the same length, other first bytes.
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:2] + lines[3:] + lines[2:3]))
    assert _picture(_ignored(path, caplog, "log-changed")) == full  # the replay's own fold


def test_a_snapshot_of_another_node_or_format_is_ignored(tmp_path, caplog):
    _, path, elog = _log_with_history(tmp_path)
    elog.write_snapshot()
    full = _picture(elog)
    elog.close()
    assert _picture(_ignored(path, caplog, "node", me="NodeZ"))[1] == full[1]
    snap = snapshot.path_for(path)
    header, body = snap.read_bytes().split(b"\n", 1)
    h = json.loads(header)
    h["v"] = snapshot.FORMAT + 1
    snap.write_bytes(E.canonical(h) + b"\n" + body)
    assert _picture(_ignored(path, caplog, "format")) == full


def test_a_snapshot_the_ledger_refuses_is_dropped_and_the_log_replayed(tmp_path, caplog):
    key, path, elog = _log_with_history(tmp_path)
    held = list(elog.ledger.all_events())
    offset, covered = elog.size_bytes, elog._prefix_hash.hexdigest()
    full = _picture(elog)
    elog.close()
    # Intact and covering this log, but its seq 2 links to no held event (a bug of its writer).
    stray = E.make_event(key, "NodeA", 2, "0" * 64, T0 + 1, E.LINK_CONFIGURED, {"peer": "NodeQ"})
    bad = snapshot.encode("NodeA", offset, covered, [held[0], stray, *held[2:]])
    snapshot.path_for(path).write_bytes(bad)
    assert _picture(_ignored(path, caplog, "refused")) == full


def test_a_whole_snapshot_with_events_of_the_wrong_shape_is_ignored(tmp_path, caplog):
    _, path, elog = _log_with_history(tmp_path)
    held = list(elog.ledger.all_events())
    offset, covered = elog.size_bytes, elog._prefix_hash.hexdigest()
    full = _picture(elog)
    elog.close()
    rows = [[e.origin, e.seq, e.prev, e.ts, e.type, dict(e.data), e.id, e.sig, e.v] for e in held]
    rows[1][5] = {}  # a link.configured without its peer: the fold cannot read it
    body = E.canonical(rows)
    header = {"v": snapshot.FORMAT, "node": "NodeA", "offset": offset, "covered": covered,
              "count": len(rows), "body": hashlib.sha256(body).hexdigest()}
    snapshot.path_for(path).write_bytes(E.canonical(header) + b"\n" + body)
    assert _picture(_ignored(path, caplog, "bad-event")) == full


def test_a_crash_while_writing_leaves_the_old_snapshot(tmp_path):
    _, path, elog = _log_with_history(tmp_path)
    elog.write_snapshot()
    old = snapshot.path_for(path).read_bytes()
    elog.close()
    # A real process killed -9 after writing and fsyncing the new file aside, before its rename.
    child = textwrap.dedent(f"""
        import os, signal, sys
        from maildrop import events as E
        from maildrop import eventlog
        from maildrop.keys import load_key
        elog = eventlog.EventLog(eventlog.Path({str(path)!r}), me="NodeA")
        elog.append_own(load_key(eventlog.Path({str(tmp_path / "k")!r})), "NodeA",
                        [(E.LINK_CONFIGURED, {{"peer": "NodeC"}})], {T0 + 3})
        eventlog.os.replace = lambda *a: os.kill(os.getpid(), signal.SIGKILL)
        elog.write_snapshot()
    """)
    proc = subprocess.run([sys.executable, "-c", child], env={**os.environ, "PYTHONPATH": os.getcwd()},
                          capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.decode()
    assert snapshot.path_for(path).read_bytes() == old
    strays = [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    assert strays  # the new one, whole but never renamed into place
    again = EventLog(path, me="NodeA")
    assert again.snapshot_count == 42  # the old snapshot, then the appended line replayed
    assert again.network.configured("NodeA", "NodeC")
    again.write_snapshot()  # the next write removes what the crash left
    assert not [p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("verify_stored", [False, True])
def test_stored_signatures_are_trusted_unless_a_full_check_is_asked(tmp_path, verify_stored):
    _, path, elog = _log_with_history(tmp_path, 1)
    elog.close()
    # A line added by hand with a valid id and someone else's signature (an operator's doing).
    other = generate_key(tmp_path / "other")
    head = json.loads(path.read_bytes().splitlines()[-1])
    body = {"v": E.VERSION, "origin": "NodeA", "seq": head["seq"] + 1, "prev": head["id"],
            "ts": E.format_ts(T0 + 9), "type": E.LINK_CONFIGURED, "data": {"peer": "NodeD"}}
    eid = E.compute_id(body)
    sig = base64.b64encode(other.sign(eid.encode())).decode()
    with open(path, "ab") as f:
        f.write(E.canonical({**body, "id": eid, "sig": sig}) + b"\n")
    again = EventLog(path, writable=False, me="NodeA", verify_stored=verify_stored)
    assert again.network.configured("NodeA", "NodeD") is not verify_stored
    assert bool(again.rejected) is verify_stored
