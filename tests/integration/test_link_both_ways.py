"""One SSH connection per link, used both ways (issue 15, must-have 1): real paramiko on
both ends over 127.0.0.1, then real agents. A peer without an address is never dialed and
reached over the connection it makes; when both ends dial at once one connection is kept.
Connections are counted from the kernel's own table (/proc/net/tcp). Every wait has a
deadline."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from maildrop.keys import NodeKey, generate_key
from maildrop.transport.ssh import PeerClient, PeerUnreachable, SSHServer
from tests.harness import Net, wait_until

log = logging.getLogger("maildrop.test.link")


LOOPBACK = "0100007F"  # 127.0.0.1 as /proc/net/tcp writes it


def established(port: int) -> int:
    """TCP connections in state ESTABLISHED to 127.0.0.1:``port``: those with an end there
    and the other end on 127.0.0.1 too whose row names ``port`` as its remote (each
    connection counted once, by the end that listens)."""
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    ends = {(r[1], r[2]) for r in rows if r[3] == "01"}
    server = f"{LOOPBACK}:{port:04X}"
    return sum(1 for local, remote in ends
               if local == server and remote.startswith(LOOPBACK) and (remote, local) in ends
               and not _listens_on(rows, remote))


def _listens_on(rows: list[list[str]], end: str) -> bool:
    """Whether ``end``'s port is a listener on 127.0.0.1 (then ``end`` is the server end)."""
    return any(r[3] == "0A" and r[1] == end for r in rows)


class Echo:
    """Echoes every byte until EOF; records which peer each channel came from."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.peers: list[str] = []

    def handle_channel(self, peer_id: str, channel) -> None:
        with self.lock:
            self.peers.append(peer_id)
        channel.settimeout(10)
        while data := channel.recv(1 << 16):
            channel.sendall(data)


def echo(channel, payload: bytes) -> bytes:
    channel.settimeout(10)
    channel.sendall(payload)
    got = b""
    while len(got) < len(payload):
        data = channel.recv(1 << 16)
        if not data:
            break
        got += data
    return got


class End:
    """One node of a link: its server (with an echo handler) and its client for the peer."""

    def __init__(self, name: str, key: NodeKey, peer: str, peer_key: NodeKey) -> None:
        self.name, self.key = name, key
        self.echo = Echo()
        self.server = SSHServer(key, ("127.0.0.1", 0), {peer: peer_key.public_line}, self.echo,
                                logger=log)
        self.peer, self.peer_key = peer, peer_key
        self.client: PeerClient | None = None

    def link(self, address: tuple[str, int] | None, attach: bool = True) -> PeerClient:
        self.client = PeerClient(self.name, self.key, self.peer, address, self.peer_key.public_line,
                                 silence_after=3.0, logger=log)
        if attach:
            self.server.attach(self.client)
        return self.client

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
        self.server.stop()


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Callable[[], tuple[End, End]]]:
    made: list[End] = []

    def make() -> tuple[End, End]:
        ka = generate_key(tmp_path / "a" / "key", comment="NodeA")
        kb = generate_key(tmp_path / "b" / "key", comment="NodeB")
        a, b = End("NodeA", ka, "NodeB", kb), End("NodeB", kb, "NodeA", ka)
        made.extend((a, b))
        a.server.start()
        b.server.start()
        return a, b

    yield make
    for end in made:
        end.close()


# ---------------------------------------------------------------------------- transport


def test_the_end_that_cannot_dial_uses_the_connection_it_is_given(pair):
    a, b = pair()
    b_to_a = b.link(None)  # B has no address for A: it never dials it
    a_to_b = a.link(b.server.address)

    with pytest.raises(PeerUnreachable, match="dials us"):
        b_to_a.open_channel(timeout=1)
    assert not b_to_a.connected

    assert echo(a_to_b.open_channel(), b"from A") == b"from A"  # A dials B
    wait_until(lambda: b_to_a.connected, 5, "B to adopt A's connection")
    for i in range(5):  # B's channels go over the connection A dialed, served by A's server
        payload = f"from B {i}".encode()
        assert echo(b_to_a.open_channel(), payload) == payload
    assert b.echo.peers == ["NodeA"]
    assert a.echo.peers == ["NodeB"] * 5
    assert established(b.server.address[1]) == 1
    assert established(a.server.address[1]) == 0  # nobody dialed A
    assert a_to_b.bytes_received > 0 and b_to_a.bytes_sent > 0


def test_the_connection_given_gets_the_links_liveness_options(pair):
    """The end that does not dial keeps the same watch on the link as the dialing end:
    TCP_USER_TIMEOUT = silence_after and an SSH keepalive every silence_after / 3."""
    a, b = pair()
    b_to_a = b.link(None)
    a.link(b.server.address).connect()
    wait_until(lambda: b_to_a.connected, 5, "B to adopt A's connection")
    sock = b_to_a._conns[0].transport.sock
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3000
    for _ in range(2):  # idle, B's end sends keepalives of its own
        sent = b_to_a.bytes_sent
        wait_until(lambda sent=sent: b_to_a.bytes_sent > sent, 3, "a keepalive from B's end")
    b_to_a.silence_after = 9  # a reload
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 9000


def test_a_channel_the_server_opens_is_refused_when_the_client_serves_nothing(pair):
    a, b = pair()
    b_to_a = b.link(None)
    a_to_b = a.link(b.server.address, attach=False)  # a bare client (as `maildrop check`)
    a_to_b.connect()
    wait_until(lambda: b_to_a.connected, 5, "B to adopt A's connection")
    with pytest.raises(PeerUnreachable):
        b_to_a.open_channel(timeout=2)
    assert a.echo.peers == []
    assert not b_to_a.connected  # that connection carries only A's calls now


def test_a_connection_whose_client_serves_nothing_makes_the_other_end_dial(pair):
    """A peer whose client refuses our channels (OpenSSH's ssh does): its connection
    carries its calls; ours go over a connection we dial."""
    a, b = pair()
    b_to_a = b.link(a.server.address)
    a_to_b = a.link(b.server.address, attach=False)
    a_to_b.connect()
    wait_until(lambda: b_to_a.connected, 5, "B to adopt A's connection")
    assert echo(b_to_a.open_channel(), b"B's call") == b"B's call"  # refused there, so B dialed
    assert a.echo.peers == ["NodeB"]
    assert established(a.server.address[1]) == 1
    assert echo(a_to_b.open_channel(), b"A's call") == b"A's call"
    assert echo(b_to_a.open_channel(), b"again") == b"again"
    assert a.echo.peers == ["NodeB", "NodeB"]


def test_a_simultaneous_dial_keeps_the_lower_ids_connection_and_finishes_what_runs(pair):
    a, b = pair()
    b_to_a = b.link(a.server.address)
    a_to_b = a.link(b.server.address, attach=False)  # A does not see B's connection yet...
    a_to_b.serve_on(a.server)  # ...but serves B's channels on the one it dials
    b_to_a.connect()  # C2: dialed by NodeB
    in_flight = b_to_a.open_channel()  # a conversation on C2 that must not break
    assert echo(in_flight, b"first half") == b"first half"
    a_to_b.connect()  # C1: dialed by NodeA, who did not know of C2
    a.server.attach(a_to_b)  # now A knows both
    wait_until(lambda: established(a.server.address[1]) == 1 and established(b.server.address[1]) == 1,
               5, "both connections up")

    # Both ends now put new channels on C1 (dialed by the lower id, NodeA)...
    wait_until(lambda: not b_to_a.carries(in_flight), 5, "B to prefer A's connection (once A logged in)")
    assert not a_to_b.carries(in_flight)
    assert on_kept(b_to_a) and on_kept(a_to_b)
    time.sleep(0.6)  # two sweeps of B's dialed connection: it must stay while a channel is open
    assert established(a.server.address[1]) == 1
    assert echo(in_flight, b"second half") == b"second half"  # ...and C2's work finishes
    in_flight.close()
    wait_until(lambda: established(a.server.address[1]) == 0, 5, "B to close its duplicate")
    assert established(b.server.address[1]) == 1
    assert echo(b_to_a.open_channel(), b"after") == b"after"
    assert echo(a_to_b.open_channel(), b"after") == b"after"


def on_kept(client: PeerClient) -> bool:
    """Whether a new channel of ``client`` goes over the connection it keeps (then closed)."""
    channel = client.open_channel()
    try:
        return client.carries(channel) and echo(channel, b"?") == b"?"
    finally:
        channel.close()


# ---------------------------------------------------------------------------- agents


def _without_address(node, peer: str) -> None:
    """Drop ``peer``'s address from ``node``'s config: it dials us."""
    lines = node.config_path.read_text().splitlines()
    at = lines.index(f"  - id: {peer}")
    assert lines[at + 1].startswith("    address: ")
    del lines[at + 1]
    node.config_path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def net(tmp_path: Path) -> Iterator[Net]:
    made = Net(tmp_path, ["NodeA", "NodeB", "NodeC"], [("NodeA", "NodeB"), ("NodeB", "NodeC")])
    yield made
    made.stop_all()


def test_a_node_nobody_can_dial_sends_receives_and_relays_over_its_one_connection(net):
    """B has no address for A (A is "behind NAT"): A dials B; files flow A->B, B->A, and
    through B both ways (A->B->C, C->B->A); each link costs one TCP connection."""
    a, b, c = net["NodeA"], net["NodeB"], net["NodeC"]
    _without_address(b, "NodeA")
    net.start()
    net.wait_converged(60)
    for peer in b.status()["peers"]:
        if peer["id"] == "NodeA":
            assert peer["address"] == "(it dials us)"

    payloads = {("NodeA", "NodeC"): b"a to c " * 1000, ("NodeC", "NodeA"): b"c to a " * 1000,
                ("NodeA", "NodeB"): b"a to b", ("NodeB", "NodeA"): b"b to a",
                ("NodeA", "NodeC", "big"): bytes(range(256)) * 8192}  # 2 MiB: the big lane
    for key, data in payloads.items():
        net[key[0]].drop(key[1], f"from-{key[0]}-{len(key)}.bin", data)
    for key, data in payloads.items():
        origin, dest = key[0], key[1]
        name = f"from-{origin}-{len(key)}.bin"
        path = net[dest].inbox / origin / name
        wait_until(path.exists, 60, f"{name} in {dest}'s inbox")
        assert path.read_bytes() == data, name

    # Idle: one connection per link (it was two: each end dialed the other).
    wait_until(lambda: established(a.port) == 0 and established(b.port) + established(c.port) == 2,
               20, "one connection per link (A dialed B; B or C dialed the other)")
    # Nobody ever reached A's listener: B does not know where it is, C is no peer of it.
    assert "ssh.peer.connected" not in a.log_path.read_text()


def test_a_link_the_far_end_dials_goes_down_when_it_dies_and_up_when_it_returns(net):
    a, b = net["NodeA"], net["NodeB"]
    _without_address(b, "NodeA")
    net.start(["NodeA", "NodeB"])
    net.wait_converged(60, ["NodeA", "NodeB"])

    def b_sees_a(state: str) -> bool:
        return any(p["id"] == "NodeA" and p["state"] == state for p in b.status()["peers"])

    wait_until(lambda: b_sees_a("up"), 20, "B to see A up")

    def b_says(kind: str) -> int:
        return sum(1 for e in b.events(kind) if e["origin"] == "NodeB" and e["data"]["peer"] == "NodeA")

    downs, ups = b_says("link.down"), b_says("link.up")
    killed = time.monotonic()
    a.kill()
    wait_until(lambda: b_says("link.down") > downs, 20, "B to announce link.down for A")
    took = time.monotonic() - killed
    assert b_sees_a("down")
    assert took < 3.0 + 2 * 1.0 + 5.0, took  # link_down_after 3 s, a round's timeout, margin
    a.start()
    a.wait_listening()
    wait_until(lambda: b_sees_a("up") and b_says("link.up") > ups, 30, "B to announce A up again")
    payload = b"after the restart"
    b.drop("NodeA", "back.txt", payload)
    wait_until(lambda: (a.inbox / "NodeB" / "back.txt").exists(), 30, "a file B->A after the restart")
    assert established(b.port) == 1 and established(a.port) == 0


def test_two_agents_that_dial_each_other_at_start_keep_one_connection(tmp_path):
    net = Net(tmp_path, ["NodeA", "NodeB"], [("NodeA", "NodeB")])
    try:
        net.start()  # both start at once and dial each other in their first gossip rounds
        net.wait_converged(60)
        a, b = net["NodeA"], net["NodeB"]
        wait_until(lambda: established(a.port) + established(b.port) == 1, 20,
                   "one connection between A and B")
        a.drop("NodeB", "ab.txt", b"from A")
        b.drop("NodeA", "ba.txt", b"from B")
        wait_until(lambda: (b.inbox / "NodeA" / "ab.txt").exists() and (a.inbox / "NodeB" / "ba.txt").exists(),
                   30, "a file each way")
        assert established(a.port) + established(b.port) == 1
        assert "link.down" not in {e["type"] for e in a.events() + b.events()}
    finally:
        net.stop_all()
