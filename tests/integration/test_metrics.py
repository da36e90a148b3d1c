"""Metrics (issue 14, item 3): real agents serve the Prometheus text format on
``metrics.listen``; the tests scrape it over HTTP and parse it with prometheus-client's own
parser. Waiting is always for a condition with a deadline."""

import socket
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from maildrop.config import ConfigError, parse_config
from tests.harness import free_port, wait_until

PAIR = ["NodeA", "NodeB"]
PAIR_EDGES = [("NodeA", "NodeB")]


def with_metrics(node, host: str = "127.0.0.1", port: int | None = None) -> tuple[str, int]:
    """Add ``metrics.listen`` to ``node``'s config (before it starts); returns the address."""
    port = port or free_port()
    with open(node.config_path, "a") as f:
        f.write(f"metrics:\n  listen: {host}:{port}\n")
    return host, port


def scrape(address: tuple[str, int]) -> dict[tuple[str, frozenset], float]:
    """Every sample the agent serves, by (sample name, labels)."""
    host, port = address
    with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=5) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = r.read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def test_3_scrape_shows_a_sent_file_per_peer(make_net):
    net = make_net(PAIR, PAIR_EDGES, start=False)
    a, b = net["NodeA"], net["NodeB"]
    at_a = with_metrics(a, host="127.0.0.2")  # any loopback address: bound to that one only
    at_b = with_metrics(b)
    net.start()
    net.wait_converged(30)
    wait_until(lambda: value(scrape(at_a), "maildrop_peer_up", peer="NodeB") == 1, 20, "A: peer_up{NodeB}=1")
    wait_until(lambda: value(scrape(at_b), "maildrop_peer_up", peer="NodeA") == 1, 20, "B: peer_up{NodeA}=1")
    before = scrape(at_a)
    assert value(before, "maildrop_files_sent_total", peer="NodeB") == 0  # the series exists at 0
    assert value(before, "maildrop_hop_duration_seconds_count", peer="NodeB") == 0

    size = 300_000
    a.drop("NodeB", "report.bin", bytes(range(256)) * (size // 256) + b"x" * (size % 256))
    wait_until((b.inbox / "NodeA" / "report.bin").exists, 30, "report.bin in B's inbox")
    wait_until(lambda: value(scrape(at_a), "maildrop_files_sent_total", peer="NodeB") == 1, 10,
               "A to count the file sent to NodeB")
    wait_until(lambda: value(scrape(at_a), "maildrop_transfers", state="delivered") == 1, 20,
               "A to learn the receipt")
    sa, sb = scrape(at_a), scrape(at_b)
    [queued] = a.events("transfer.queued")
    size = queued["data"]["size"]  # the bytes that moved: the sealed file's (docs/encryption.md)
    assert size > 300_000

    assert value(sa, "maildrop_file_bytes_sent_total", peer="NodeB") == size
    assert value(sa, "maildrop_hop_duration_seconds_count", peer="NodeB") == 1
    assert 0 < value(sa, "maildrop_hop_duration_seconds_sum", peer="NodeB") < 30
    assert value(sa, "maildrop_hop_duration_seconds_bucket", peer="NodeB", le="+Inf") == 1
    assert value(sa, "maildrop_ssh_bytes_sent_total", peer="NodeB") > size  # the file went over it
    assert value(sa, "maildrop_gossip_rounds_total", peer="NodeB") > 0
    assert value(sb, "maildrop_files_received_total", peer="NodeA") == 1
    assert value(sb, "maildrop_file_bytes_received_total", peer="NodeA") == size
    assert value(sb, "maildrop_files_sent_total", peer="NodeA") == 0
    assert value(sb, "maildrop_transfers", state="delivered") == 1
    for s in (sa, sb):
        assert value(s, "maildrop_events") > 0
        assert value(s, "maildrop_event_log_bytes") > 0
        assert value(s, "maildrop_conflicted_nodes") == 0
        assert value(s, "maildrop_notices", state="queued") == 0
        assert value(s, "maildrop_transfers", state="queued") == 0
        assert value(s, "process_open_fds") > 0  # the process collector, in the same registry
        assert not any(name.startswith("python_") for name, _ in s)  # not the global registry
    # A lets go of its copy once the receipt is in: nothing is held any more.
    wait_until(lambda: all(value(scrape(at_a), "maildrop_custody_transfers", state=st) == 0
                           for st in ("queued", "in-flight", "on-hold", "handed", "receiving")),
               20, "A's custody to empty")
    # Bound to 127.0.0.2 only: the same port on 127.0.0.1 is closed.
    with pytest.raises(urllib.error.URLError):
        scrape(("127.0.0.1", at_a[1]))


def test_3_refused_offer_shows_in_refusals_by_reason(make_net):
    net = make_net(PAIR, PAIR_EDGES, settings={"transfers": {"max_file_size": "64KiB"}}, start=False)
    a, b = net["NodeA"], net["NodeB"]
    at_a, at_b = with_metrics(a), with_metrics(b)
    net.start()
    net.wait_converged(30)
    assert value(scrape(at_a), "maildrop_hop_refused_total", peer="NodeB", reason="too-large") is None
    a.drop("NodeB", "big.bin", b"y" * 100_000)
    wait_until(lambda: (value(scrape(at_a), "maildrop_hop_refused_total", peer="NodeB",
                              reason="too-large") or 0) >= 1, 20, "A to count NodeB's refusal")
    wait_until(lambda: (value(scrape(at_b), "maildrop_offers_refused_total", peer="NodeA",
                              reason="too-large") or 0) >= 1, 10, "B to count its refusal")
    sa, sb = scrape(at_a), scrape(at_b)
    assert value(sa, "maildrop_files_sent_total", peer="NodeB") == 0
    assert value(sb, "maildrop_files_received_total", peer="NodeA") == 0
    # A refusal that asking again cannot change ends the transfer at its origin at once.
    wait_until(lambda: value(scrape(at_a), "maildrop_transfers", state="failed") == 1, 10,
               "A to count the transfer as failed")
    assert (value(scrape(at_a), "maildrop_custody_transfers", state="queued") or 0) == 0
    assert (a.failed / "big.bin").exists()
    assert b.inbox_files() == []


def test_3_bad_metrics_listen_is_a_one_line_config_error(make_net):
    net = make_net(["NodeA"], [], start=False)
    a = net["NodeA"]
    with open(a.config_path, "a") as f:
        f.write("metrics:\n  listen: 9464\n")
    cp = a.cli("run", timeout=30)
    assert cp.returncode == 2, cp.stderr
    lines = cp.stderr.strip().splitlines()
    assert len(lines) == 1, cp.stderr
    assert "metrics.listen: 9464 is only a port, not HOST:PORT; expected HOST:PORT" in lines[0]
    assert not (a.dir / "state" / "agent.lock").exists()  # refused before an agent was made


def test_3_metrics_port_in_use_is_one_log_line_and_the_agent_runs_on(make_net):
    net = make_net(PAIR, PAIR_EDGES, start=False)
    a = net["NodeA"]
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with_metrics(a, port=port)
        net.start()
        line = f"metrics.listen.failed listen=127.0.0.1:{port} error="
        wait_until(lambda: line in a.log_path.read_text(), 20, "the metrics.listen.failed line")
        assert a.log_path.read_text().count("metrics.listen.failed") == 1
        # The agent goes on: it gossips and carries a file.
        net.wait_converged(30)
        a.drop("NodeB", "still.txt", b"mail keeps moving\n")
        wait_until((net["NodeB"].inbox / "NodeA" / "still.txt").exists, 30, "still.txt at B")
        assert a.running


@pytest.mark.parametrize(("listen", "message"), [
    ("127.0.0.1", "metrics.listen: '127.0.0.1' is not HOST:PORT"),
    ("127.0.0.1:0", "metrics.listen: '127.0.0.1:0' has port 0, outside 1..65535"),
    ("localhost:70000", "metrics.listen: 'localhost:70000' has port 70000, outside 1..65535"),
    ("::1:9464", "metrics.listen: '::1:9464' has an IPv6 address without brackets"),
    ("127.0.0.1:7001", "metrics.listen: 127.0.0.1:7001 is node.listen too; expected another port"),
])
def test_3_metrics_listen_is_checked(listen: str, message: str) -> None:
    base = "node:\n  id: NodeA\n  listen: 127.0.0.1:7001\nroot: .\nkey: k\npeers: []\n"
    path = Path("/tmp/maildrop.yaml")
    assert parse_config(base, path).metrics_listen is None  # off unless configured
    assert parse_config(base + "metrics:\n  listen: '[::1]:9464'\n", path).metrics_listen == ("::1", 9464)
    with pytest.raises(ConfigError) as exc:
        parse_config(base + f"metrics:\n  listen: '{listen}'\n", path)
    assert str(exc.value).startswith(f"{path}: {message}"), str(exc.value)
    assert "\n" not in str(exc.value)
