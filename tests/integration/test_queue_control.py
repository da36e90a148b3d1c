"""Queue control with real agents: queue, flush, cancel, hold and release (issue 14, item 2).

Each command is run as a real ``maildrop`` subprocess against a running agent (which applies
it from ``state/control/`` within a second) and against a stopped one (the command acts on
the log and spool itself); the effect is then checked after the agent starts. Waiting is
always for a condition with a deadline.
"""

import json
import os
import time

from tests.harness import wait_until

SLOW_DOWN = {"gossip": {"link_down_after": "60s"}}  # a stopped peer's links stay "up" a while


def queue(node, *args):
    cp = node.cli("queue", "--json", *args, check=True)
    return json.loads(cp.stdout)


def row_named(node, name):
    return next((r for r in queue(node)["transfers"] if r["name"] == name), None)


def spool_has_copy(node, tid):
    return any(p.name == f"{tid}.data" for p in node.spool_files(tid))


def log_lines(node, needle):
    return [ln for ln in node.log_path.read_text(errors="replace").splitlines() if needle in ln]


def test_queue_lists_a_transfer_stuck_to_an_unreachable_node(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    b.stop()
    data = os.urandom(5000)
    a.drop("NodeB", "stuck.bin", data)
    # the oldest first: the others only once stuck.bin is queued (one take batch could hold
    # all three in any order, and `queue -n 2` below shows the two oldest)
    wait_until(lambda: row_named(a, "stuck.bin"), 30, "stuck.bin to be queued")
    a.drop("NodeB", "more1.bin", b"1")
    a.drop("NodeB", "more2.bin", b"2")
    row = wait_until(lambda: (r := row_named(a, "stuck.bin")) and r["last_error"] and r, 30,
                     "A's queue to show stuck.bin with its last error")
    tid = row["id"]
    sealed = next(e["data"]["size"] for e in a.events("transfer.queued") if e["data"]["transfer"] == tid)
    assert (row["origin"], row["destination"], row["size"]) == ("NodeA", "NodeB", sealed)  # what moves
    assert sealed > len(data)
    assert row["state"] in ("queued", "deferred")
    assert row["next_try"] is not None and row["next_try"] < time.time() + 60
    assert "NodeB" in row["last_error"]
    doc = queue(a)
    assert doc["agent_running"] is True and doc["total"] == 3

    cp = a.cli("queue", "-n", "2", check=True)
    assert cp.stdout.splitlines()[0].split() == ["ID", "FROM", "TO", "NAME", "SIZE", "STATE",
                                                 "NEXT", "TRY", "LAST", "ERROR"]
    line = next(ln for ln in cp.stdout.splitlines() if tid[:12] in ln)
    assert "stuck.bin" in line and "NodeB" in line and ("now" in line or " in " in line)
    assert "… 1 more" in cp.stdout
    assert queue(a, "--to", "NodeZ")["transfers"] == []
    assert queue(a, "--state", "held")["transfers"] == []
    assert a.cli("queue", "--state", "bogus").returncode == 2

    # Stopped: the log and the spool alone; the next try is "at start".
    a.stop()
    doc = queue(a)
    assert doc["agent_running"] is False
    offline = next(r for r in doc["transfers"] if r["id"] == tid)
    assert offline["state"] == "queued" and offline["next_try"] is None
    cp = a.cli("queue", check=True)
    assert "at start" in cp.stdout and "the agent is not running" in cp.stdout

    cp = a.cli("flush", tid[:12])
    assert cp.returncode == 0 and "as soon as it starts" in cp.stderr, cp.stderr
    assert a.cli("flush").returncode == 2
    assert a.cli("flush", tid[:12], "--all").returncode == 2
    assert a.cli("flush", "zz").returncode == 2
    missing = ("0" if tid[0] != "0" else "1") * 12
    cp = a.cli("flush", missing)
    assert cp.returncode == 1 and "no transfer" in cp.stderr

    net.start()
    cp = a.cli("flush", "--all")
    assert cp.returncode == 0 and "flushing" in cp.stderr, cp.stderr
    wait_until(lambda: (b.inbox / "NodeA" / "stuck.bin").exists(), 30, "stuck.bin in B's inbox")
    assert (b.inbox / "NodeA" / "stuck.bin").read_bytes() == data


def test_hold_is_never_offered_survives_restarts_and_release_sends_it(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    b.stop()
    for name in ("held.bin", "free.bin", "later.bin"):
        a.drop("NodeB", name, name.encode() * 100)
    rows = wait_until(lambda: (d := {r["name"]: r for r in queue(a)["transfers"]}) and len(d) == 3 and d,
                      30, "A's queue to hold three transfers")
    held, later = rows["held.bin"]["id"], rows["later.bin"]["id"]

    cp = a.cli("hold", held[:12])  # the agent runs: it applies the hold
    assert cp.returncode == 0 and "held" in cp.stderr, cp.stderr
    assert row_named(a, "held.bin")["state"] == "held"
    assert a.cli("hold", held[:12]).returncode == 0  # already on hold: nothing to do

    a.stop()
    cp = a.cli("hold", later[:12])  # stopped: the command keeps the hold itself
    assert cp.returncode == 0, cp.stderr
    saved = json.loads((a.dir / "state" / "holds.json").read_bytes())["holds"]
    assert set(saved) == {held, later}
    assert {r["name"]: r["state"] for r in queue(a)["transfers"]}["later.bin"] == "held"

    net.start()  # both holds survive the restart; the route to B is up again
    inbox = b.inbox / "NodeA"
    wait_until(lambda: (inbox / "free.bin").exists(), 30, "free.bin in B's inbox")
    wait_until(lambda: (r := row_named(a, "free.bin")) is None or r["state"] == "delivered", 30,
               "A to see free.bin's receipt")
    assert not (inbox / "held.bin").exists() and not (inbox / "later.bin").exists()
    assert {r["name"]: r["state"] for r in queue(a)["transfers"]} == {"held.bin": "held", "later.bin": "held"}
    for tid in (held, later):
        assert log_lines(a, f"relay.hop.done transfer={tid}") == []

    cp = a.cli("release", held[:12])
    assert cp.returncode == 0 and "released" in cp.stderr, cp.stderr
    wait_until(lambda: (inbox / "held.bin").exists(), 30, "held.bin in B's inbox after release")
    assert not (inbox / "later.bin").exists()
    cp = a.cli("release", held[:12])
    assert cp.returncode == 1 and ("not on hold" in cp.stderr or "no transfer" in cp.stderr), cp.stderr
    assert a.cli("release", later[:12]).returncode == 0
    wait_until(lambda: (inbox / "later.bin").exists(), 30, "later.bin in B's inbox after release")
    wait_until(lambda: json.loads((a.dir / "state" / "holds.json").read_bytes())["holds"] == {}, 10,
               "holds.json to be empty")


def test_flush_resends_at_once_instead_of_after_resend_after(make_net):
    # A handed the file to B; B went away with it. A would resend after resend_after (1 h):
    # a flush makes it resend now, around B, over C.
    names = ["NodeA", "NodeB", "NodeC", "NodeD"]
    edges = [("NodeA", "NodeB"), ("NodeB", "NodeD"), ("NodeA", "NodeC"), ("NodeC", "NodeD")]
    net = make_net(names, edges, settings={**SLOW_DOWN, "transfers": {"resend_after": "1h"}})
    net.wait_converged(60)
    a, b, d = net["NodeA"], net["NodeB"], net["NodeD"]
    d.stop()
    data = os.urandom(20_000)
    a.drop("NodeD", "late.bin", data)
    row = wait_until(lambda: (r := row_named(a, "late.bin")) and r["state"] == "handed" and r, 30,
                     "A to hand late.bin to B")
    tid = row["id"]
    assert row["hop"] == "NodeB"
    assert row["next_try"] - time.time() > 3000  # its backoff: resend_after, an hour away
    wait_until(lambda: spool_has_copy(b, tid), 10, "B to hold late.bin")
    b.stop()
    d.start()
    d.wait_listening()

    t0 = time.monotonic()
    cp = a.cli("flush", tid[:12])
    assert cp.returncode == 0 and "flushing" in cp.stderr, cp.stderr
    got = d.inbox / "NodeA" / "late.bin"
    wait_until(got.exists, 30, "late.bin in D's inbox after the flush")
    took = time.monotonic() - t0
    print(f"\nflush: delivered over C {took:.1f}s after the flush (the resend was due in an hour)")
    assert got.read_bytes() == data
    assert log_lines(a, f"relay.hop.done transfer={tid} peer=NodeC")


def test_cancel_at_the_origin_over_two_hops_and_refused_at_a_relay(make_net):
    net = make_net(["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeB", "NodeC")],
                   settings=SLOW_DOWN)
    net.wait_converged(60)
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    c.stop()
    data = os.urandom(30_000)
    a.drop("NodeC", "secret.bin", data)
    tid = wait_until(lambda: (r := row_named(a, "secret.bin")) and r["state"] == "handed" and r["id"],
                     30, "A to hand secret.bin to B")
    wait_until(lambda: spool_has_copy(b, tid), 10, "B to hold secret.bin")

    cp = b.cli("cancel", tid[:12])  # B is a relay: only the origin may cancel
    assert cp.returncode == 1 and "not the origin" in cp.stderr and "NodeA" in cp.stderr, cp.stderr
    assert spool_has_copy(b, tid)

    cp = a.cli("cancel", tid[:12])
    assert cp.returncode == 0 and "cancelled" in cp.stderr, cp.stderr
    assert (a.failed / "secret.bin").read_bytes() == data
    assert "cancelled" in (a.failed / "secret.bin.reason").read_text()
    failed = [e for e in a.events("transfer.failed") if e["data"]["transfer"] == tid]
    assert [e["data"]["reason"] for e in failed] == ["cancelled"]
    assert row_named(a, "secret.bin") is None
    assert a.spool_files(tid) == []

    wait_until(lambda: b.spool_files(tid) == [], 30, "B to drop its copy")
    assert [ln for ln in log_lines(b, f"transfer.dropped transfer={tid}") if "origin gave up" in ln]
    cp = a.cli("cancel", tid[:12])
    assert cp.returncode == 1 and "already failed" in cp.stderr, cp.stderr

    c.start()
    c.wait_listening()
    wait_until(lambda: any(e["data"]["transfer"] == tid for e in c.events("transfer.failed")), 30,
               "C to learn the cancellation")
    assert c.inbox_files() == []


def test_cancel_with_the_agent_stopped_holds_after_start(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    b.stop()
    a.drop("NodeB", "oops.bin", b"not for B")
    tid = wait_until(lambda: (r := row_named(a, "oops.bin")) and r["id"], 30, "oops.bin in A's queue")
    a.stop()

    assert a.cli("cancel", "xyz").returncode == 2
    cp = a.cli("cancel", tid[:12])
    assert cp.returncode == 0 and "cancelled" in cp.stderr, cp.stderr
    assert (a.failed / "oops.bin").read_bytes() == b"not for B"
    assert "cancelled" in (a.failed / "oops.bin.reason").read_text()
    assert [e["data"]["reason"] for e in a.events("transfer.failed")
            if e["data"]["transfer"] == tid] == ["cancelled"]
    assert a.spool_files(tid) == []

    net.start()
    wait_until(lambda: any(e["data"]["transfer"] == tid for e in b.events("transfer.failed")), 30,
               "B to learn the cancellation")
    assert b.inbox_files() == []
    assert queue(a)["transfers"] == []
