"""Issue 10: what the custody engine must do, with real agents.

- a delivery into ``inbox/<origin>/`` that fails is loud at both ends and heals by itself
  once the cause is fixed, without a restart;
- a permanent refusal (``too-large``) ends the transfer at the origin within seconds, and
  the file is not offered again;
- a relay whose next hop dies (kill -9) or goes silent (SIGSTOP: its connections stay open
  and say nothing) routes around it from where it stands, within ``link_down_after``;
- a receiver killed -9 between a batch's fsyncs and its one log append
  (``MAILDROP_FAILPOINT=receive.before_append``) loses and duplicates nothing.

Real agents, real SSH on 127.0.0.1, real files, real signals. Run as root (as the tests
are), a mode bit stops nobody: the receiver of the stalled delivery runs without
CAP_DAC_OVERRIDE (``harness.NO_DAC_OVERRIDE``), and the test first checks that the
staging really bites.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from typing import Any

import pytest

from tests.harness import NO_DAC_OVERRIDE, Node, wait_until

MiB = 2**20
L = 3.0  # gossip.link_down_after in these tests
SETTINGS = {"gossip": {"interval": "1s", "link_down_after": f"{L:g}s"}}


# ------------------------------------------------------------------------------ helpers

def queue_row(node: Node, tid: str) -> dict[str, Any] | None:
    """``tid``'s row in ``maildrop queue --json`` (a real CLI call to the running agent)."""
    cp = node.cli("queue", "--json", timeout=30)
    if cp.returncode != 0:
        return None
    return next((r for r in json.loads(cp.stdout)["transfers"] if r["id"] == tid), None)


def log_lines(node: Node, *needles: str) -> list[str]:
    """The lines of ``node``'s log above DEBUG that contain every one of ``needles``."""
    text = node.log_path.read_text(errors="replace")
    return [ln for ln in text.splitlines()
            if " DEBUG " not in ln and all(n in ln for n in needles)]


def stays(pred: Callable[[], Any], seconds: float, what: str) -> None:
    """``pred`` holds at every look for ``seconds`` (an observation window: something that
    must not happen, e.g. a retry logged again, is given the time to happen)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert pred(), f"{what} stopped holding"
        time.sleep(0.2)


def set_max_file_size(node: Node, size: str) -> None:
    """``transfers.max_file_size`` for ``node`` alone (before it starts)."""
    text = node.config_path.read_text()
    assert "\ntransfers:" not in text
    node.config_path.write_text(text + f"transfers:\n  max_file_size: {size}\n")


def drop_many(node: Node, dest: str, files: dict[str, bytes]) -> None:
    """Write every file as a dotfile, then rename them all in: they arrive at once."""
    folder = node.outbox / dest
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / f".{name}.tmp").write_bytes(data)
    for name in files:
        os.rename(folder / f".{name}.tmp", folder / name)


def inbox_of(node: Node, origin: str) -> dict[str, str]:
    """name -> sha256 of every file in ``node``'s ``inbox/<origin>/``."""
    folder = node.inbox / origin
    if not folder.is_dir():
        return {}
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.iterdir() if p.is_file()}


def relayed_by(node: Node) -> set[str]:
    """Transfers ``node`` took custody of as a relay (its own ``transfer.relayed``)."""
    return {e["data"]["transfer"] for e in node.events("transfer.relayed") if e["origin"] == node.name}


def delivered_at(node: Node) -> dict[str, int]:
    """transfer -> how many ``transfer.delivered`` ``node`` signed for it."""
    out: dict[str, int] = {}
    for e in node.events("transfer.delivered"):
        if e["origin"] == node.name:
            out[e["data"]["transfer"]] = out.get(e["data"]["transfer"], 0) + 1
    return out


TRANSFER_FILE = re.compile(r"[0-9a-f]{32}\.(data|part|json)|take-.*")


def transfer_files(node: Node) -> list[str]:
    """What of transfers is left in ``node``'s spool: copies, parts, metas, take intents."""
    return [p.name for p in node.spool_files() if TRANSFER_FILE.fullmatch(p.name)]


# ------------------------------------------------------------------------------ must have 4: stalled delivery

def test_stalled_delivery_heals(make_net):
    """The issue's first story: B's ``inbox/NodeA/`` is unwritable. Was: B logged one
    ``relay.receive.interrupted … Permission denied`` and answered "have" ever after, A
    showed ``queued`` with an empty error, and fixing the permission did not unstick it."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], settings=SETTINGS, start=False)
    a, b = net["NodeA"], net["NodeB"]
    folder = b.inbox / "NodeA"
    folder.mkdir(parents=True)
    folder.chmod(0o555)
    probe = subprocess.run([*NO_DAC_OVERRIDE, "touch", str(folder / "probe")], capture_output=True)
    assert probe.returncode != 0, "the staging proves nothing: inbox/NodeA is still writable"
    net.start(["NodeA"])
    b.start_without_dac_override()
    b.wait_listening()
    net.wait_converged(60)
    pids = (a.proc.pid, b.proc.pid)

    data = os.urandom(100_000)
    name = "stalled.bin"
    a.drop("NodeB", name, data)
    tid = wait_until(lambda: a.queued_tid(name), 10, "A to take the file")
    wait_until((b.spool / f"{tid}.data").exists, 20, "B to hold the whole file in its spool")
    assert inbox_of(b, "NodeA") == {}

    # B, where the delivery waits, says why: in its queue row, and in its log once.
    b_row = wait_until(lambda: (r := queue_row(b, tid)) and "ermission" in r["last_error"] and r, 20,
                       "B's queue row to say the delivery waits on a permission problem")
    assert "inbox/NodeA" in b_row["last_error"], b_row  # the folder to fix, not only the errno
    # A, which handed it on, says why too: the reason came back in B's answer.
    a_row = wait_until(lambda: (r := queue_row(a, tid)) and "ermission" in r["last_error"] and r, 20,
                       "A's queue row to carry B's reason")
    assert a_row["state"] != "delivered", a_row
    # ... and in `maildrop status --json` on both ends (a reason on the transfer's row).
    for node in (a, b):
        wait_until(lambda node=node: "ermission" in next(
            (t.get("reason", "") for t in node.status()["transfers"] if t["id"] == tid), ""), 10,
            f"{node.name}'s status to show the reason")
    def failure_lines() -> list[str]:
        return [ln for ln in log_lines(b, "ermission") if tid in ln or name in ln or "inbox/NodeA" in ln]
    wait_until(failure_lines, 10, "B to log the delivery failure")
    # retries come at 1, 2, 4 s: 8 s without a second line means one line per change of reason
    stays(lambda: len(failure_lines()) == 1, 8, "one log line for the delivery failure")
    assert (b.spool / f"{tid}.data").exists() and inbox_of(b, "NodeA") == {}

    # Fix the cause; nothing is restarted: B delivers by itself, once.
    folder.chmod(0o755)
    t_fix = time.monotonic()
    wait_until(lambda: name in inbox_of(b, "NodeA"), 15, "the file in B's inbox after the fix")
    print(f"\ndelivered {time.monotonic() - t_fix:.1f}s after the permission was fixed")
    assert inbox_of(b, "NodeA") == {name: hashlib.sha256(data).hexdigest()}
    # The inbox link comes first, the receipt right after it (a transaction of the fact store).
    wait_until(lambda: delivered_at(b) == {tid: 1}, 10, "B's receipt")
    assert (a.proc.pid, b.proc.pid) == pids and a.running and b.running
    wait_until(lambda: not b.spool_files(tid), 15, "B's spool to let go")
    wait_until(lambda: next(t for t in a.status()["transfers"] if t["id"] == tid)["state"] == "delivered",
               15, "the receipt at A")
    wait_until(lambda: not a.spool_files(tid), 15, "A's spool to let go")
    assert inbox_of(b, "NodeA") == {name: hashlib.sha256(data).hexdigest()}
    assert not a.failed.exists() or list(a.failed.iterdir()) == []


# ------------------------------------------------------------------------------ must have 5: permanent refusal

@pytest.mark.parametrize("where", ["at-the-destination", "at-a-relay"])
def test_too_large_fails_at_origin(make_net, where):
    """A file over the refusing node's ``transfers.max_file_size``: A->B refused by B, or
    A->B->C refused by C when B offers it on. Was: offered again every ~7 s for
    ``expire_after`` (7 days)."""
    if where == "at-the-destination":
        names, edges, dest, refuser = ["NodeA", "NodeB"], [("NodeA", "NodeB")], "NodeB", "NodeB"
    else:
        names, edges = ["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeB", "NodeC")]
        dest = refuser = "NodeC"
    net = make_net(names, edges, settings=SETTINGS, start=False)
    a = net["NodeA"]
    set_max_file_size(net[refuser], "1MiB")
    net.start()
    net.wait_converged(60)

    data = os.urandom(2 * MiB)
    name = "huge.bin"
    a.drop(dest, name, data)
    t0 = time.monotonic()
    failed, reason = a.failed / name, a.failed / f"{name}.reason"
    wait_until(lambda: failed.exists() and reason.exists(), 10 if refuser == "NodeB" else 15,
               f"{name} in A's failed/ with its .reason")
    print(f"\nin A's failed/ {time.monotonic() - t0:.1f}s after the drop")
    assert failed.read_bytes() == data
    text = reason.read_text()
    assert "too-large" in text and refuser in text, text  # the refusal and who refused
    tid = a.queued_tid(name)

    def fails() -> list[dict]:
        return [e for e in a.events("transfer.failed") if e["origin"] == "NodeA" and e["data"]["transfer"] == tid]
    # The file goes to failed/ first and transfer.failed is appended just after: wait for it.
    wait_until(lambda: fails(), 10, "A's transfer.failed")
    assert len(fails()) == 1 and "too-large" in fails()[0]["data"]["reason"], fails()
    # Not offered again: one refusal in the refuser's log, and it stays one.
    wait_until(lambda: log_lines(net[refuser], tid, "too-large"), 10, f"{refuser} to log its refusal")
    stays(lambda: len(log_lines(net[refuser], tid, "too-large")) == 1, 8, f"one refusal at {refuser}")
    for n in names:
        assert net[n].inbox_files() == [], n
        wait_until(lambda n=n: not net[n].spool_files(tid), 15, f"{n}'s spool to let go")
    assert sorted(p.name for p in a.failed.iterdir()) == [name, f"{name}.reason"]


# ------------------------------------------------------------------------------ must have 6: reroute from the holder

DIAMOND = (["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"],
           [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeE"), ("NodeB", "NodeD"), ("NodeD", "NodeE")])


def _reroute_when_next_hop_goes(make_net, cut: Callable[[Node], None], revive: Callable[[Node], None]) -> None:
    """A sends 20 files to E; B's two ways to E are C (preferred: C < D) and D. Once B holds
    some and is sending to C, C is cut. What C had not taken custody of arrives over D
    within ``L`` + 20 s, from B (A sends nothing again); what C had taken custody of is C's
    to deliver and arrives once C is back. Every file at E exactly once, whole."""
    net = make_net(*DIAMOND, settings=SETTINGS)
    net.wait_converged(60)
    a, b, c, d, e = (net[n] for n in DIAMOND[0])
    assert a.status()["routes"]["NodeE"] == ["NodeA", "NodeB", "NodeC", "NodeE"]
    files = {f"f{i:02d}.bin": os.urandom(2 * MiB) for i in range(20)}
    want = {n: hashlib.sha256(v).hexdigest() for n, v in files.items()}
    drop_many(a, "NodeE", files)

    def b_sends_to_c() -> bool:  # B holds a file for E and C is receiving one from B
        return (any(p.suffix == ".data" for p in b.spool_files())
                and any(p.suffix in (".part", ".data") for p in c.spool_files()))
    wait_until(b_sends_to_c, 30, "B to hold files for E and to be sending to C", every=0.005)
    cut(c)
    t_cut = time.monotonic()
    try:
        at_e = set(inbox_of(e, "NodeA"))
        tids = wait_until(lambda: (m := {n: a.queued_tid(n) for n in files}) and all(m.values()) and m, 10,
                          "A's queued events")
        with_c = relayed_by(c)  # C's custody, as its log says at the cut (C is dead or frozen)
        around = {n for n, t in tids.items() if t not in with_c}
        print(f"\nat the cut: {len(at_e)} at E, {len(with_c & set(tids.values()))} in C's custody, "
              f"{len(around)} to go around C")
        assert around, "C had every file before the cut: the test proves nothing"
        wait_until(lambda: around <= set(inbox_of(e, "NodeA")), L + 20,
                   f"the {len(around)} files C never had, at E over D")
        print(f"the {len(around)} around C were at E {time.monotonic() - t_cut:.1f}s after the cut")
        via_d = relayed_by(d)
        assert {tids[n] for n in around} <= via_d, "some files reached E neither over C nor over D"
    finally:
        revive(c)
    wait_until(lambda: set(inbox_of(e, "NodeA")) >= set(files), 40, "every file at E once C is back")
    assert inbox_of(e, "NodeA") == want  # each once (no "name (1)"), whole
    assert delivered_at(e) == {t: 1 for t in tids.values()}
    assert not a.failed.exists() or list(a.failed.iterdir()) == []
    assert len([q for q in a.events("transfer.queued") if q["origin"] == "NodeA"]) == len(files)


def test_reroute_when_next_hop_killed(make_net):
    def revive(c: Node) -> None:
        c.start()
        c.wait_listening()
    _reroute_when_next_hop_goes(make_net, lambda c: c.kill(), revive)


def test_reroute_when_next_hop_frozen(make_net):
    """SIGSTOP: C's TCP connections stay open and silent (the black hole of the issue)."""
    def freeze(c: Node) -> None:
        assert c.proc is not None
        os.kill(c.proc.pid, signal.SIGSTOP)

    def thaw(c: Node) -> None:
        assert c.proc is not None
        os.kill(c.proc.pid, signal.SIGCONT)
    _reroute_when_next_hop_goes(make_net, freeze, thaw)


# ------------------------------------------------------------------------------ must have 8: a batch cut by kill -9

def test_batch_kill_between_fsync_and_append(make_net):
    """B kills itself (SIGKILL) at ``receive.before_append``: the batch's files fsynced and
    renamed into its spool, its one log append not made. After a restart every file is in
    B's inbox exactly once and A's spool is empty."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], settings=SETTINGS, start=False)
    a, b = net["NodeA"], net["NodeB"]
    net.start(["NodeA"])
    b.start(env={"MAILDROP_FAILPOINT": "receive.before_append"})
    b.wait_listening()
    net.wait_converged(60)
    files = {f"s{i:02d}.dat": os.urandom(512 + i) for i in range(50)}
    want = {n: hashlib.sha256(v).hexdigest() for n, v in files.items()}
    drop_many(a, "NodeB", files)
    wait_until(lambda: not b.running, 20, "B's agent to kill itself at the failpoint")
    assert b.proc is not None and b.proc.returncode == -signal.SIGKILL, b.proc.returncode
    # It died where the failpoint is: files of the batch in the spool, none recorded, none delivered.
    ours = {t for n in files if (t := a.queued_tid(n))}
    stored = {p.name.split(".")[0] for p in b.spool_files() if p.suffix == ".data"} & ours
    assert stored, "B died with no file of the batch in its spool: not at receive.before_append"
    recorded = {e["data"]["transfer"] for e in b.events() if e["origin"] == "NodeB"
                and e["type"].startswith("transfer.") and "transfer" in e["data"]}
    assert not stored & recorded, "the batch's events were appended before B died"
    assert inbox_of(b, "NodeA") == {}

    b.start()  # no failpoint this time
    b.wait_listening()
    wait_until(lambda: len(inbox_of(b, "NodeA")) >= len(files), 30, "all 50 in B's inbox after the restart")
    assert inbox_of(b, "NodeA") == want  # each once, whole
    tids = {a.queued_tid(n) for n in files}
    assert delivered_at(b) == dict.fromkeys(tids, 1)
    wait_until(lambda: not transfer_files(a), 30, "A's spool to let go of every file")
    assert not a.failed.exists() or list(a.failed.iterdir()) == []
