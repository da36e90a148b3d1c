"""sample_config/: five nodes that load cleanly and describe one consistent topology."""

from __future__ import annotations

from pathlib import Path

import pytest

from maildrop.config import Config, load_config

SAMPLE = Path(__file__).resolve().parents[2] / "sample_config"
NODES = ["NodeA", "NodeB", "NodeC", "NodeD", "NodeE"]
# The chain A-B-C-D-E plus the alternate link B-D.
LINKS = {
    frozenset(pair)
    for pair in [("NodeA", "NodeB"), ("NodeB", "NodeC"), ("NodeC", "NodeD"), ("NodeD", "NodeE"), ("NodeB", "NodeD")]
}  # fmt: skip


@pytest.fixture(scope="module")
def configs() -> dict[str, Config]:
    return {n: load_config(SAMPLE / f"{n}.yaml") for n in NODES}


def test_exactly_five_sample_files() -> None:
    assert sorted(p.name for p in SAMPLE.glob("*.yaml")) == [f"{n}.yaml" for n in NODES]


def test_each_sample_loads_with_its_own_id_port_and_paths(configs: dict[str, Config]) -> None:
    for i, n in enumerate(NODES):
        c = configs[n]
        assert c.node_id == n
        assert c.listen == c.advertise == ("127.0.0.1", 7101 + i)
        assert c.root == SAMPLE / n
        assert c.key_path == SAMPLE / n / "node_ed25519"


def test_links_are_the_documented_topology(configs: dict[str, Config]) -> None:
    configured = {frozenset((n, p.id)) for n, c in configs.items() for p in c.peers}
    assert configured == LINKS


def test_every_link_is_configured_on_both_ends(configs: dict[str, Config]) -> None:
    for x, c in configs.items():
        for peer in c.peers:
            back = configs[peer.id].peer(x)
            assert back is not None, f"{peer.id} does not list {x} back"


def test_peers_cross_reference_consistently(configs: dict[str, Config]) -> None:
    # Whoever lists Y uses the same key and the address Y advertises.
    key_of: dict[str, str] = {}
    for x, c in configs.items():
        for peer in c.peers:
            assert key_of.setdefault(peer.id, peer.key) == peer.key, (
                f"{x} has another key for {peer.id}"
            )
            assert peer.address == configs[peer.id].advertise, (
                f"{x} dials {peer.id} at the wrong address"
            )
    assert set(key_of) == set(NODES)
    assert len(set(key_of.values())) == len(NODES), "two nodes share a key"


def test_node_c_down_leaves_the_others_connected(configs: dict[str, Config]) -> None:
    up = {n: {p.id for p in c.peers} - {"NodeC"} for n, c in configs.items() if n != "NodeC"}
    seen, todo = set(), ["NodeA"]
    while todo:
        n = todo.pop()
        if n not in seen:
            seen.add(n)
            todo.extend(up[n])
    assert seen == {"NodeA", "NodeB", "NodeD", "NodeE"}


def test_no_private_key_in_the_sample_files() -> None:
    for path in [*SAMPLE.glob("*.yaml"), SAMPLE / "README.md"]:
        text = path.read_text()
        assert "PRIVATE KEY" not in text, path


def test_every_key_is_explained_by_a_comment() -> None:
    keys = ["id:", "display_name:", "listen:", "advertise:", "root:", "key:", "peers:",
            "interval:", "link_down_after:", "expire_after:", "resend_after:", "max_file_size:",
            "min_free_space:", "parallel:", "settle:", "rescan_interval:", "polling:", "level:",
            "json:"]  # fmt: skip
    for n in NODES:
        lines = (SAMPLE / f"{n}.yaml").read_text().splitlines()
        for key in keys:
            found = [line for line in lines if line.lstrip("#- ").startswith(key)]
            assert found, f"{n}.yaml lacks {key}"
            if key not in ("peers:", "key:", "id:"):
                assert any("  # " in line for line in found), f"{n}.yaml: {key} has no comment"
