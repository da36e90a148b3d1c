"""Fast start with real agents: a node with a long history (a checkpointed network feed, and
delivered files in its fact store) starts from its snapshot and answers status with the
same model as a full replay (every signature checked); a line changed by hand is caught by
the cheap checks a start keeps."""

from __future__ import annotations

import json

from bench.history_bench import PAIR, build_history, build_network
from maildrop.eventlog import EventLog
from maildrop.model import RECENT_ENDED
from maildrop.routing import route
from tests.harness import Net

FILES = 3000
NETWORK = 1500
"""Own network events of NodeA (link.up/down/health): checkpoints and compaction leave a
few hundred of them in the feed."""


def _history_net(tmp_path) -> Net:
    """NodeA–NodeB converged, stopped, then NETWORK network events appended to NodeA's feed
    and FILES delivered files put into its fact store."""
    net = Net(tmp_path, PAIR, [PAIR])
    net.start()
    net.wait_converged(60)
    net.stop_all()
    build_network(net["NodeA"], NETWORK)
    build_history(net["NodeA"].config().state_dir, {n: net[n].dir / "node_ed25519" for n in PAIR},
                  FILES, workers=2, names=20)
    return net


def _start(node) -> int:
    """Start the agent, wait until it listens; the agent log's size before (``_since``)."""
    mark = node.log_path.stat().st_size if node.log_path.exists() else 0
    node.start()
    node.wait_listening(120)
    return mark


def _since(node, mark: int) -> str:
    return node.log_path.read_bytes()[mark:].decode()


def _full_replay(node) -> tuple[str, int, dict]:
    c = node.config()
    elog = EventLog(c.events_path, pinned={p.id: p.key for p in c.peers}, writable=False,
                    me=c.node_id, verify_stored=True)
    try:
        return elog.ledger.fingerprint(), elog.ledger.count, elog.network.as_dict()
    finally:
        elog.close()


def _full_route(node, to: str) -> list[str] | None:
    """The route to ``to`` by a full replay of the node's log (every signature checked)."""
    c = node.config()
    elog = EventLog(c.events_path, pinned={p.id: p.key for p in c.peers}, writable=False,
                    me=c.node_id, verify_stored=True)
    try:
        return route(elog.network, c.node_id, to, excluded=elog.ledger.conflicts)
    finally:
        elog.close()


def _model_of(doc: dict) -> tuple[str, int, dict]:
    return doc["fingerprint"], doc["events"], {k: doc[k] for k in ("nodes", "links")}


def test_a_long_log_starts_from_its_snapshot_with_the_model_of_a_full_replay(tmp_path):
    net = _history_net(tmp_path)
    a = net["NodeA"]
    try:
        held = _full_replay(a)[1]
        assert 256 < held < NETWORK  # checkpointed and compacted: the feed is its live part
        _start(a)
        assert a.stop() == 0  # a clean stop writes the snapshot
        snap = a.config().state_dir / "snapshot.json"
        header = json.loads(snap.read_bytes().split(b"\n", 1)[0])
        assert header["count"] >= held
        mark = _start(a)
        assert "snapshot.loaded" in _since(a, mark)
        running = json.loads(a.cli("status", "--json", check=True).stdout)
        # The model holds the RECENT_ENDED most recently ended transfers; the store counts all.
        assert len(running["transfers"]) == RECENT_ENDED
        assert running["transfer_counts"] == {"delivered": FILES}
        assert a.stop() == 0
        # Stopped, nothing moves: the CLI's status (snapshot + tail) is a full replay's model.
        doc = json.loads(a.cli("status", "--json", check=True).stdout)
        fp, count, model = _full_replay(a)
        assert _model_of(doc) == (fp, count, {k: model[k] for k in ("nodes", "links")})
        assert sorted(t["id"] for t in doc["transfers"]) == sorted(t["id"] for t in model["transfers"])
        assert {t["state"] for t in doc["transfers"]} == {"delivered"}
        reader = EventLog(a.config().events_path, writable=False, me="NodeA")
        assert reader.snapshot_count > 0  # the CLI's reader did start from the snapshot
        reader.close()
        # ``route`` answers from the snapshot as a full replay would (NodeB never ran while
        # NodeA did: whether NodeA wrote link.down before its stop depends on the timing).
        want = _full_route(a, "NodeB")
        answer = a.cli("route", "NodeB", "--json")
        if want:
            assert answer.returncode == 0 and json.loads(answer.stdout)["route"] == want
        else:
            assert answer.returncode == 1, answer.stderr
        events = json.loads(a.cli("events", "--json", "-n", "5", check=True).stdout)["events"]
        assert [e["seq"] for e in events] and all(e["origin"] in PAIR for e in events)
    finally:
        net.stop_all()


def test_a_line_changed_by_hand_is_caught_without_a_signature_check(tmp_path):
    net = _history_net(tmp_path)
    a = net["NodeA"]
    try:
        _start(a)
        assert a.stop() == 0  # a clean stop writes the snapshot
        path = a.config().events_path
        lines = path.read_bytes().splitlines(keepends=True)
        before = json.loads(a.cli("status", "--json", check=True).stdout)["events"]
        at = next(i for i in range(len(lines) // 2, len(lines))
                  if json.loads(lines[i])["type"] == "link.health")
        ev = json.loads(lines[at])
        ev["data"]["rtt_ms"] = 3000  # valid JSON and schema, a valid-looking signature: id mismatch
        lines[at] = json.dumps(ev, sort_keys=True, separators=(",", ":")).encode() + b"\n"
        path.write_bytes(b"".join(lines))
        text = _since(a, _start(a))
        assert "snapshot.ignored" in text and "log-changed" in text  # it covered the changed line
        assert "id does not match content" in text
        doc = json.loads(a.cli("status", "--json", check=True).stdout)
        # Refused where it stands; a compaction since the start (it writes only what is
        # live) may already have dropped it from the file.
        still = lines[at] in path.read_bytes().splitlines(keepends=True)
        assert doc["rejected_events"] == (1 if still else 0)
        # NodeA's chain stops before the changed line (its later events wait for that link,
        # which a peer holding NodeA's feed would give back); nothing after it is believed.
        assert doc["events"] < before
        assert all(h["rtt_ms"] != 3000 for h in doc["health"])
        assert a.stop() == 0
        check = a.cli("check", "--json")
        assert "invalid line" in check.stdout
    finally:
        net.stop_all()
