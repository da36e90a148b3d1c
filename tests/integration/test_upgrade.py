"""Upgrading in place: today's agents start on the state the release of 2026-12-01 left.

The fixture (``tests/fixtures/release-2026-12-01``, made by that release's code, every record
version 1) is copied to a temporary folder and real agents run on it. Everything is checked
by behaviour (inbox contents, ``status --json``, what a peer is answered), never by the
layout of ``state/``, so the test holds whatever the new layout is.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from maildrop.keys import load_key
from maildrop.transport.ssh import PeerClient
from tests.harness import Net, Node, free_port, offer_as_outsider, wait_until

FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "release-2026-12-01"


def adopt(base: Path) -> tuple[Net, dict]:
    """The fixture's nodes under ``base``, on fresh free ports, as a ``Net`` (not started)."""
    manifest = json.loads((FIXTURE / "fixture.json").read_text())
    shutil.copytree(FIXTURE, base)
    for name in manifest["nodes"]:  # git keeps neither modes nor empty folders: as a node had them
        (base / name / "node_ed25519").chmod(0o600)
        for folder in (base / name / "state").rglob("*"):
            if folder.is_dir():
                folder.chmod(0o700)
        (base / name / "state").chmod(0o700)
    ports = {old: free_port() for old in manifest["ports"].values()}
    net = Net.__new__(Net)
    net.base, net.settings, net.edges = base, {}, [tuple(e) for e in manifest["edges"]]
    net.env = dict(os.environ, PYTHONUNBUFFERED="1")
    net.nodes = {}
    for name in manifest["nodes"]:
        node = Node.__new__(Node)
        node.name, node.dir, node.env, node.proc = name, base / name, net.env, None
        node.config_path, node.log_path = node.dir / "maildrop.yaml", node.dir / "agent.log"
        node.port = ports[manifest["ports"][name]]
        node.pubkey = load_key(node.dir / "node_ed25519").public_line
        text = node.config_path.read_text()
        for old, new in ports.items():
            text = text.replace(f"127.0.0.1:{old}\n", f"127.0.0.1:{new}\n")
        node.config_path.write_text(text)
        net.nodes[name] = node
    return net, manifest


def by_name(node: Node) -> dict[str, dict]:
    """``status --json`` transfers of ``node`` by file name (as it can read them)."""
    doc = json.loads(node.cli("status", "--json", check=True).stdout)
    return {t["name"]: t for t in doc["transfers"] if t["name"]}


def test_a_release_2026_12_01_network_upgrades_in_place(tmp_path):
    net, manifest = adopt(tmp_path / "net")
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    late = manifest["in_flight"]
    old_inbox = {p.relative_to(c.inbox): p.read_bytes() for p in c.inbox_files()}
    assert sorted(p.name for p in old_inbox) == manifest["delivered"]
    try:
        # Every command reads the old state before any agent touched it.
        for n in (a, b, c):
            cp = n.cli("status")
            assert cp.returncode == 0 and "Traceback" not in cp.stderr, cp.stderr
        held = json.loads(b.cli("explain", late["transfer"], "--json", check=True).stdout)
        assert held["state"] == "in custody" and held["hops"][-1]["node"] == "NodeB"
        assert held["here"] is not None and held["agent_running"] is False
        net.start(["NodeA", "NodeB"])
        wait_until(lambda: b.status()["conflicts"].get("NodeX"), 20, "NodeX still a conflict at NodeB")
        assert b.status()["conflicts"]["NodeX"] == manifest["conflict"]["reason"]
        wait_until(lambda: by_name(a).get(late["name"], {}).get("state") == "relayed", 30,
                   "A to show the late file in custody (relayed), not yet delivered")
        assert all(by_name(a)[n]["state"] == "delivered" for n in manifest["delivered"])

        net.start(["NodeC"])
        wait_until(lambda: (c.inbox / "NodeA" / late["name"]).exists(), 60, "the late file at C")
        wait_until(lambda: by_name(a)[late["name"]]["state"] == "delivered", 60,
                   "A to learn the late file was delivered")
        new_inbox = {p.relative_to(c.inbox): p.read_bytes() for p in c.inbox_files()}
        assert {k: v for k, v in new_inbox.items() if k in old_inbox} == old_inbox
        assert sorted(p.name for p in new_inbox) == sorted([*manifest["delivered"], late["name"]])
        assert len(new_inbox[Path("NodeA") / late["name"]]) == late["size"]
        explained = json.loads(a.cli("explain", late["transfer"], "--json", check=True).stdout)
        assert [(h["node"], h["outcome"]) for h in explained["hops"]] == [
            ("NodeA", "handed"), ("NodeB", "handed"), ("NodeC", "delivered")]

        # The exactly-once memory survived: a copy of a file delivered before the upgrade,
        # offered again by its relay over real SSH, is not taken, and nothing new lands.
        tid = manifest["delivered_transfers"][0]
        [queued] = [e for e in a.events("transfer.queued") if e["data"]["transfer"] == tid]
        body = (FIXTURE / "NodeA" / "state" / "spool" / f"{tid}.data").read_bytes()
        client = PeerClient("NodeB", load_key(b.dir / "node_ed25519"), "NodeC",
                            ("127.0.0.1", c.port), c.pubkey)
        try:
            first, _ = offer_as_outsider(client, queued, body, route=("NodeA", "NodeB"))
        finally:
            client.close()
        assert first.op in ("have", "refuse"), first.fields
        assert {p.relative_to(c.inbox) for p in c.inbox_files()} == set(new_inbox)
        for n in (a, b, c):
            doc = json.loads(n.cli("status", "--json", check=True).stdout)
            assert doc["agent"]["running"], n.name
        assert b.status()["conflicts"].get("NodeX") == manifest["conflict"]["reason"]
    except AssertionError:
        print(net.logs())
        raise
    finally:
        net.stop_all()
