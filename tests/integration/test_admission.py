"""Issue 12, must-haves 2 and 3: per-origin quotas at relays, accept_from and relay_for.

Real agents, real SSH on 127.0.0.1, real files. Each node's rules are written into its
own YAML before it starts (or before a SIGHUP, for the reload case):

- a relay whose quota for the origin is full refuses with ``quota`` (transient): the
  origin backs off and sends around it; the relay's own inbox is not limited;
- a relay at ``relay.max_transfers_per_origin`` refuses the next transfer and takes it by
  itself once the first one has left;
- ``accept_from`` at the destination: the origin's ``failed/<name>.reason`` names the
  destination and ``not-accepted`` (the refusal travels back through the relay);
- ``relay_for`` at one of two relays: the file goes the other way; once a reload makes the
  other relay refuse too, the next file fails ``not-accepted`` (no path is left);
- a relay past the first that will not carry it: the first relay reports the refusal and
  the origin goes another way, around both;
- within one offer (the real hop protocol over a socketpair, ``test_hop_protocol.hop``),
  the files accepted before count against the quota of the next one, and files for the
  receiver's own inbox are not counted.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any

from maildrop import lifecycle as L
from maildrop.admission import Rules
from tests.harness import Node, wait_until
from tests.integration.test_hop_protocol import ACCEPT, STORED, Hop, _words, hop  # noqa: F401 (fixture)
from tests.integration.test_reload import sighup

DIAMOND = (["NodeA", "NodeB", "NodeC", "NodeD"],
           [("NodeA", "NodeB"), ("NodeA", "NodeC"), ("NodeB", "NodeD"), ("NodeC", "NodeD")])


def add_yaml(node: Node, text: str) -> None:
    """Append top-level YAML (a rule, a section the net's settings do not have) to ``node``'s config."""
    node.config_path.write_text(node.config_path.read_text() + text)


def log_lines(node: Node, *needles: str) -> list[str]:
    return [ln for ln in node.log_path.read_text(errors="replace").splitlines()
            if " DEBUG " not in ln and all(n in ln for n in needles)]


def queue_row(node: Node, tid: str) -> dict[str, Any] | None:
    cp = node.cli("queue", "--json", timeout=30)
    if cp.returncode != 0:
        return None
    return next((r for r in json.loads(cp.stdout)["transfers"] if r["id"] == tid), None)


def custodians(node: Node, tid: str) -> set[str]:
    """The nodes whose signed ``transfer.relayed`` for ``tid`` ``node`` holds."""
    return {e["origin"] for e in node.events("transfer.relayed") if e["data"]["transfer"] == tid}


def inbox(node: Node, origin: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in node.inbox_files(origin)}


def test_a_full_quota_at_b_sends_the_file_through_c_and_b_still_takes_its_own_mail(make_net):
    """B (the preferred relay: B < C) holds at most 0 bytes per origin: it refuses A's file
    for D with ``quota``, A backs off and avoids B, and the file goes A -> C -> D. Files for
    B itself are not counted: all three arrive in B's inbox."""
    net = make_net(*DIAMOND, start=False)
    a, b, c, d = (net[n] for n in DIAMOND[0])
    add_yaml(b, "relay:\n  max_bytes_per_origin: 0\n")
    net.start()
    net.wait_converged(60)
    data = os.urandom(20_000)
    a.drop("NodeD", "through-c.bin", data)
    own = {f"own-{i}.txt": os.urandom(3000) for i in range(3)}
    for name, body in own.items():
        a.drop("NodeB", name, body)
    wait_until(lambda: inbox(d, "NodeA"), 60, "the file in D's inbox")
    assert inbox(d, "NodeA") == {"through-c.bin": hashlib.sha256(data).hexdigest()}
    tid = a.queued_tid("through-c.bin")
    assert log_lines(b, "relay.offer.refused", "peer=NodeA", f"transfer={tid}", "reason=quota")
    assert log_lines(a, "relay.hop.refused", f"transfer={tid}", "NodeB refused: quota:")
    # Custody facts go to the origin (inline, by notice), never to the destination.
    wait_until(lambda: "NodeC" in custodians(a, tid), 20, "C's custody of it to reach A")
    assert "NodeB" not in custodians(a, tid) and not b.spool_files(tid)  # B never held it
    wait_until(lambda: len(inbox(b, "NodeA")) == 3, 60, "B's own three files")
    assert inbox(b, "NodeA") == {n: hashlib.sha256(v).hexdigest() for n, v in own.items()}
    assert not a.failed.exists() or list(a.failed.iterdir()) == []


def test_a_relay_at_its_transfer_limit_refuses_the_next_one_and_takes_it_once_the_first_left(make_net):
    """A - B - X; B holds at most one of A's transfers. X refuses every file with no-space
    (transient) until its config is fixed, so B holds A's first file; A's second one is
    refused ``quota`` by B, and A's queue and status say so, naming B; so does B after a
    kill -9 and a restart. Once X takes the first, B lets it go and the second goes through
    by itself: both arrive once."""
    net = make_net(["NodeA", "NodeB", "NodeX"], [("NodeA", "NodeB"), ("NodeB", "NodeX")], start=False)
    a, b, x = net["NodeA"], net["NodeB"], net["NodeX"]
    add_yaml(b, "relay:\n  max_transfers_per_origin: 1\n")
    fixed = x.config_path.read_text()
    add_yaml(x, "transfers:\n  min_free_space: 1000TiB\n")
    net.start()
    net.wait_converged(60)
    first, second = os.urandom(5000), os.urandom(6000)
    a.drop("NodeX", "first.bin", first)
    wait_until(lambda: a.queued_tid("first.bin"), 20, "A to take first.bin")
    t1 = a.queued_tid("first.bin")
    wait_until(lambda: "NodeB" in custodians(b, t1), 30, "B to hold first.bin")
    wait_until(lambda: log_lines(b, "relay.hop.refused", f"transfer={t1}", "no-space"), 30,
               "X to refuse first.bin (no-space)")
    a.drop("NodeX", "second.bin", second)
    wait_until(lambda: a.queued_tid("second.bin"), 20, "A to take second.bin")
    t2 = a.queued_tid("second.bin")
    wait_until(lambda: log_lines(b, "relay.offer.refused", f"transfer={t2}", "reason=quota",
                                 "NodeA has 1 transfers held here, at most 1"), 30, "B to refuse second.bin")
    row = wait_until(lambda: (r := queue_row(a, t2)) and "quota" in r["last_error"] and r, 20,
                     "A's queue to say why second.bin waits")
    assert re.search(r"NodeB refused: quota: NodeA has 1 transfers held here", row["last_error"]), row
    status = next(t for t in a.status()["transfers"] if t["id"] == t2)
    assert "NodeB refused: quota" in status["reason"], status
    assert "NodeB" not in custodians(b, t2) and x.inbox_files() == []
    # The count is soft state, rebuilt from the spool: killed and restarted, B still holds
    # first.bin for A and still refuses second.bin.
    refusals = len(log_lines(b, "relay.offer.refused", f"transfer={t2}", "reason=quota"))
    b.kill()
    b.start()
    b.wait_listening()
    wait_until(lambda: len(log_lines(b, "relay.offer.refused", f"transfer={t2}", "reason=quota")) > refusals,
               60, "B, restarted, to refuse second.bin again")
    assert b.spool_files(t1) and not b.spool_files(t2)
    # Fix X (space is fine again) and retry B's file now, as an operator would.
    x.config_path.write_text(fixed)
    sighup(x)
    b.cli("flush", "--all", check=True)
    wait_until(lambda: len(inbox(x, "NodeA")) == 2, 90, "both files in X's inbox")
    assert inbox(x, "NodeA") == {"first.bin": hashlib.sha256(first).hexdigest(),
                                 "second.bin": hashlib.sha256(second).hexdigest()}
    assert sum(1 for e in x.events("transfer.delivered") if e["data"]["transfer"] in (t1, t2)) == 2


def test_accept_from_at_the_destination_fails_the_file_at_its_origin_naming_the_destination(make_net):
    """A - B - D; D takes files only from B. A's file is carried by B, refused by D
    (``not-accepted``), B reports it (signed ``transfer.refused``), and A moves it to
    ``failed/`` with a ``.reason`` naming D; B lets its copy go. B's own file arrives."""
    net = make_net(["NodeA", "NodeB", "NodeD"], [("NodeA", "NodeB"), ("NodeB", "NodeD")], start=False)
    a, b, d = net["NodeA"], net["NodeB"], net["NodeD"]
    add_yaml(d, "accept_from: [NodeB]\n")
    net.start()
    net.wait_converged(60)
    data = os.urandom(4000)
    a.drop("NodeD", "not-for-d.txt", data)
    b.drop("NodeD", "from-b.txt", b"B may\n")
    failed, reason = a.failed / "not-for-d.txt", a.failed / "not-for-d.txt.reason"
    wait_until(lambda: failed.exists() and reason.exists(), 60, "A's failed/not-for-d.txt and its .reason")
    assert failed.read_bytes() == data
    text = reason.read_text()
    assert "refused by NodeD: not-accepted: NodeD takes no files from NodeA (accept_from)" in text, text
    tid = a.queued_tid("not-for-d.txt")
    assert [e["data"]["by"] for e in b.events("transfer.refused") if e["data"]["transfer"] == tid] == ["NodeD"]
    wait_until(lambda: not b.spool_files(tid), 30, "B to let its copy go")
    wait_until(lambda: inbox(d, "NodeB"), 30, "B's file in D's inbox")
    assert inbox(d, "NodeA") == {}


def test_relay_for_routes_around_a_relay_that_will_not_carry_and_fails_when_no_path_is_left(make_net):
    """Diamond A -> {B, C} -> D; B relays for nobody. A's first file is refused by B
    (``not-accepted``), never offered to B again, and goes through C. Then C's reload makes
    it relay only for B: A's second file has no path left and fails at once, its
    ``.reason`` naming C's refusal."""
    net = make_net(*DIAMOND, start=False)
    a, b, c, d = (net[n] for n in DIAMOND[0])
    add_yaml(b, "relay_for: []\n")
    net.start()
    net.wait_converged(60)
    one = os.urandom(7000)
    a.drop("NodeD", "one.bin", one)
    wait_until(lambda: inbox(d, "NodeA"), 60, "one.bin in D's inbox")
    assert inbox(d, "NodeA") == {"one.bin": hashlib.sha256(one).hexdigest()}
    t1 = a.queued_tid("one.bin")
    assert len(log_lines(b, "relay.offer.refused", f"transfer={t1}", "reason=not-accepted")) == 1
    assert log_lines(a, "relay.hop.refused", f"transfer={t1}", "refused by NodeB: not-accepted")
    wait_until(lambda: "NodeC" in custodians(a, t1), 20, "C's custody to reach the origin A")
    assert not a.failed.exists() or list(a.failed.iterdir()) == []

    cfg = c.config_path.read_text()
    c.config_path.write_text(cfg + "relay_for: [NodeB]\n")
    sighup(c)
    two = os.urandom(7000)
    a.drop("NodeD", "two.bin", two)
    failed, reason = a.failed / "two.bin", a.failed / "two.bin.reason"
    wait_until(lambda: failed.exists() and reason.exists(), 30, "A's failed/two.bin and its .reason")
    text = reason.read_text()
    assert "not-accepted" in text and re.search(r"refused by Node[BC]: not-accepted: Node[BC] does not relay "
                                                r"for NodeA \(relay_for\)", text), text
    t2 = a.queued_tid("two.bin")
    for relay in (b, c):  # each asked once: a refusal for good is not asked again
        assert len(log_lines(relay, "relay.offer.refused", f"transfer={t2}", "reason=not-accepted")) == 1
    assert failed.read_bytes() == two and set(inbox(d, "NodeA")) == {"one.bin"}


def test_in_one_offer_the_files_accepted_before_count_and_the_own_inbox_does_not(hop: Hop):  # noqa: F811
    """B relays at most two of A's transfers at once: of three for C in one offer, the
    third is refused ``quota`` (the first two are arriving: they count), while two for B's
    own inbox in the same offer are taken. Then B holds two for A; a rule changed on the
    running service (as a reload does) applies to the next offer."""
    hop.custodian.rules = lambda: Rules(max_transfers_per_origin=2)
    relayed = hop.take("NodeC", {f"r{i}.txt": b"relay %d" % i for i in range(3)})
    own = hop.take("NodeB", {f"o{i}.txt": b"own %d" % i for i in range(2)})
    reports = hop.send(relayed + own)
    quota = {"a": "refuse", "reason": "quota",
             "detail": "NodeA has 2 transfers held here, at most 2 (relay.max_transfers_per_origin)"}
    ok = relayed[:2] + own
    assert _words(reports) == [(relayed[0], ACCEPT), (relayed[1], ACCEPT), (relayed[2], quota),
                               *[(t, ACCEPT) for t in own], *[(t, STORED) for t in ok]]
    held = hop.custodian.snapshot()
    assert {t for t, tr in held.items() if tr.role == L.RELAY} == set(relayed[:2])
    assert sorted(p.name for p in (hop.b.inbox / "NodeA").iterdir()) == ["o0.txt", "o1.txt"]
    hop.custodian.rules = lambda: Rules(max_transfers_per_origin=3)
    assert _words(hop.send(relayed[2:])) == [(relayed[2], ACCEPT), (relayed[2], STORED)]
    hop.custodian.rules = lambda: Rules(relay_for=frozenset({"NodeZ"}))
    [late] = hop.take("NodeC", {"late.txt": b"late"})
    assert _words(hop.send([late])) == [(late, {"a": "refuse", "reason": "not-accepted",
                                                "detail": "NodeB does not relay for NodeA (relay_for)"})]


def test_a_refusal_past_the_first_relay_comes_back_and_the_origin_goes_another_way(make_net):
    """A - B - C - E and A - D - F - E (equal length: B's way is tried first). C relays for
    nobody. B, refused by C, has no way on but back through A: it reports C's refusal
    (signed ``transfer.refused``) and keeps its copy; A hears it from B, leaves B and C out
    and sends the file over D and F. Delivered once; B lets its copy go at the receipt."""
    names = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE", "NodeF"]
    edges = [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeE"),
             ("NodeA", "NodeD"), ("NodeD", "NodeF"), ("NodeF", "NodeE")]
    net = make_net(names, edges, start=False)
    a, b, c, e = net["NodeA"], net["NodeB"], net["NodeC"], net["NodeE"]
    add_yaml(c, "relay_for: []\n")
    net.start()
    net.wait_converged(90)
    data = os.urandom(9000)
    a.drop("NodeE", "long-way.bin", data)
    wait_until(lambda: inbox(e, "NodeA"), 90, "the file in E's inbox")
    assert inbox(e, "NodeA") == {"long-way.bin": hashlib.sha256(data).hexdigest()}
    tid = a.queued_tid("long-way.bin")
    assert [(ev["data"]["by"], ev["data"]["reason"]) for ev in b.events("transfer.refused")
            if ev["data"]["transfer"] == tid] == [("NodeC", "not-accepted")]
    assert log_lines(a, "relay.refused.downstream", f"transfer={tid}", "refused by NodeC: not-accepted")
    wait_until(lambda: {"NodeD", "NodeF"} <= custodians(a, tid), 20, "D's and F's custody to reach the origin A")
    assert "NodeC" not in custodians(a, tid)
    wait_until(lambda: not b.spool_files(tid), 30, "B to let its copy go at the receipt")
    assert not a.failed.exists() or list(a.failed.iterdir()) == []
