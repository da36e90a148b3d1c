"""Liveness of peer links: timeouts derived from gossip.link_down_after, connects that block
no one. Real sockets, real paramiko on both ends, real agents frozen with SIGSTOP (their
TCP stays open and silent: the stand-in for a black hole). Every wait has a deadline."""

from __future__ import annotations

import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from maildrop.keys import NodeKey, generate_key
from maildrop.transport.ssh import HostKeyMismatch, PeerClient, PeerUnreachable, SSHServer
from tests.harness import wait_until

log = logging.getLogger("maildrop.test.liveness")


class Echo:
    def handle_channel(self, peer_id: str, channel) -> None:
        channel.settimeout(10)
        while data := channel.recv(1 << 16):
            channel.sendall(data)


class BlackHole:
    """A TCP listener that says nothing. ``accept=True``: it accepts every connection and
    holds it open without a byte (counted in ``conns``); ``accept=False``: nobody accepts,
    the kernel completes the handshakes into the backlog."""

    def __init__(self, accept: bool) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=16)
        self.address = self.listener.getsockname()[:2]
        self.conns: list[socket.socket] = []
        self._lock = threading.Lock()
        if accept:
            threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return  # closed
            with self._lock:
                self.conns.append(sock)

    def accepted(self) -> int:
        with self._lock:
            return len(self.conns)

    def close(self) -> None:
        self.listener.close()
        with self._lock:
            for sock in self.conns:
                sock.close()


@pytest.fixture
def keys(tmp_path: Path) -> Callable[[str], NodeKey]:
    return lambda name: generate_key(tmp_path / "keys" / name, comment=name)


@pytest.fixture
def holes() -> Iterator[Callable[[bool], BlackHole]]:
    made: list[BlackHole] = []

    def make(accept: bool) -> BlackHole:
        made.append(BlackHole(accept))
        return made[-1]

    yield make
    for hole in made:
        hole.close()


def call_in_thread(fn: Callable[[], object]) -> tuple[threading.Thread, dict[str, object]]:
    """Run ``fn`` on a thread; the dict gets ``error`` (or ``result``) and ``ended`` (monotonic)."""
    out: dict[str, object] = {}

    def body() -> None:
        try:
            out["result"] = fn()
        except BaseException as exc:  # the test inspects it
            out["error"] = exc
        out["ended"] = time.monotonic()

    thread = threading.Thread(target=body, daemon=True)
    thread.start()
    return thread, out


def timed(fn: Callable[[], object]) -> tuple[float, BaseException | None]:
    started = time.monotonic()
    try:
        fn()
    except BaseException as exc:  # the test inspects it
        return time.monotonic() - started, exc
    return time.monotonic() - started, None


# ---------------------------------------------------------------------------- transport


def test_timeouts_derive_from_silence_after(keys):
    a, b = keys("a"), keys("b")
    make = lambda s: PeerClient("NodeB", b, "NodeA", ("127.0.0.1", 1), a.public_line,  # noqa: E731
                                silence_after=s, logger=log)
    assert (make(3).connect_timeout, make(3).silence_after) == (1.5, 3)
    assert make(40).connect_timeout == 10.0  # capped
    assert make(1).connect_timeout == 1.0  # floored: one handshake on a loaded machine
    fixed = PeerClient("NodeB", b, "NodeA", ("127.0.0.1", 1), a.public_line, silence_after=40,
                       connect_timeout=2.5, logger=log)
    assert fixed.connect_timeout == 2.5
    fixed.silence_after = 4
    assert (fixed.silence_after, fixed.connect_timeout) == (4, 2.5)  # a fixed budget stays
    with pytest.raises(ValueError):
        make(0)
    with pytest.raises(ValueError):
        fixed.silence_after = -1


def test_live_connection_gets_user_timeout_and_keepalive_from_silence_after(keys):
    a, b = keys("a"), keys("b")
    server = SSHServer(a, ("127.0.0.1", 0), {"NodeB": b.public_line}, Echo(), logger=log)
    server.start()
    client = PeerClient("NodeB", b, "NodeA", server.address, a.public_line, silence_after=3, logger=log)
    try:
        client.connect()
        sock = client._conns[0].transport.sock  # the real socket (through the byte counter)
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 3000
        # Idle, it sends an SSH keepalive every max(1, 3/3) s: the kernel then always has
        # data in flight, and TCP_USER_TIMEOUT cuts a peer that stopped ACKing.
        for _ in range(2):
            sent = client.bytes_sent
            wait_until(lambda sent=sent: client.bytes_sent > sent, 3, "a keepalive from the idle client")
        client.silence_after = 12  # a reload: the live connection follows at once
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT) == 12000
        assert client.connect_timeout == 6
        assert client.connected
    finally:
        client.close()
        server.stop()


@pytest.mark.parametrize("accept", [True, False], ids=["accepts-silently", "never-accepts"])
def test_a_connect_to_a_black_hole_blocks_no_other_caller_nor_close(accept, keys, holes):
    a, b = keys("a"), keys("b")
    hole = holes(accept)
    # 20 s of silence: one attempt may take 10 s, far longer than any wait below.
    client = PeerClient("NodeB", b, "NodeA", hole.address, a.public_line, silence_after=20, logger=log)
    assert client.connect_timeout == 10
    first, first_out = call_in_thread(lambda: client.open_channel(timeout=30))
    # The attempt is under way: TCP is connected (the kernel answers for the hole) and our
    # SSH banner is sent; no answer will ever come.
    wait_until(lambda: client.bytes_sent > 0, 5, "the first caller's attempt to send its banner")

    # Others are not queued behind it: each waits its own timeout, none starts an attempt.
    others = [call_in_thread(lambda: client.open_channel(timeout=0.5)) for _ in range(4)]
    started = time.monotonic()
    for thread, _ in others:
        thread.join(5)
    for _, out in others:
        assert isinstance(out.get("error"), PeerUnreachable), out
        assert "in progress" in str(out["error"])
        assert float(out["ended"]) - started < 2.0  # 0.5 s each, side by side
    if accept:
        assert hole.accepted() == 1  # single flight: one connection for five callers
    took, error = timed(lambda: client.connect(timeout=0.2))
    assert isinstance(error, PeerUnreachable) and took < 1.5, (took, error)

    # close() does not wait for the attempt, and ends the first caller's wait at once.
    took, error = timed(client.close)
    closed = time.monotonic()
    assert error is None and took < 0.5, took
    first.join(5)
    assert isinstance(first_out.get("error"), PeerUnreachable), first_out
    assert "ended (the client was closed)" in str(first_out["error"])
    assert float(first_out["ended"]) - closed < 1.0  # not the attempt's 10 s
    if accept:  # the handshake was cut: the hole sees the connection end
        hole.conns[0].settimeout(5)
        assert hole.conns[0].recv(4096).startswith(b"SSH-2.0-")
        wait_until(lambda: hole.conns[0].recv(4096) == b"", 5, "the cut connection to close")

    # A new pin (the peer's key rotated) cuts an attempt the same way; the next call
    # starts a fresh one.
    sent = client.bytes_sent
    second, second_out = call_in_thread(lambda: client.connect(timeout=30))
    wait_until(lambda: client.bytes_sent > sent, 5, "a second attempt to send its banner")
    changed = time.monotonic()
    client.set_peer_key(b.public_line)
    second.join(5)
    assert isinstance(second_out.get("error"), PeerUnreachable), second_out
    assert "pinned host key changed" in str(second_out["error"])
    assert float(second_out["ended"]) - changed < 1.0
    client.close()


def test_an_attempt_ends_within_its_connect_timeout(keys, holes):
    a, b = keys("a"), keys("b")
    hole = holes(True)
    client = PeerClient("NodeB", b, "NodeA", hole.address, a.public_line, silence_after=2, logger=log)
    try:
        took, error = timed(client.connect)  # no timeout of its own: the attempt's 1 s
        assert isinstance(error, PeerUnreachable), error
        assert 0.9 <= took < 3.0, took
        # The next call makes a new attempt (a failed one is not remembered).
        took, error = timed(lambda: client.open_channel(timeout=5))
        assert isinstance(error, PeerUnreachable) and 0.9 <= took < 3.0, (took, error)
        assert hole.accepted() == 2
    finally:
        client.close()


def test_callers_arriving_together_share_one_attempt_and_its_outcome(keys, caplog):
    caplog.set_level(logging.INFO, logger=log.name)
    a, b, other = keys("a"), keys("b"), keys("other")
    server = SSHServer(a, ("127.0.0.1", 0), {"NodeB": b.public_line}, Echo(), logger=log)
    server.start()

    def logins() -> list[str]:
        return [r.getMessage() for r in caplog.records if r.getMessage().startswith("ssh.peer.connected")]

    try:
        for pin, outcome in ((other, HostKeyMismatch), (a, None)):
            client = PeerClient("NodeB", b, "NodeA", server.address, pin.public_line, logger=log)
            gate = threading.Barrier(8)

            def call(client: PeerClient = client, gate: threading.Barrier = gate) -> bytes:
                gate.wait(5)
                chan = client.open_channel(timeout=10)
                try:
                    chan.sendall(b"ping")
                    return chan.recv(4)
                finally:
                    chan.close()

            calls = [call_in_thread(call) for _ in range(8)]
            for thread, _ in calls:
                thread.join(20)
            try:
                if outcome is None:
                    assert [out.get("result") for _, out in calls] == [b"ping"] * 8
                    wait_until(logins, 5, "the server to log the login")
                    assert len(logins()) == 1, logins()  # one connection for eight callers
                else:  # a permanent refusal reaches every caller, each with its own error
                    errors = [out.get("error") for _, out in calls]
                    assert all(isinstance(e, outcome) for e in errors), errors
                    assert len({id(e) for e in errors}) == 8
                    assert not logins()
            finally:
                client.close()
    finally:
        server.stop()


# ---------------------------------------------------------------------------- agents


def own_link_events(node, type_: str, peer: str) -> list[dict]:
    return [e for e in node.events(type_) if e["origin"] == node.name and e["data"].get("peer") == peer]


def test_a_frozen_peer_is_declared_down_within_link_down_after(make_net):
    # FAST: gossip every 1 s, link_down_after (L) 3 s.
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(30)
    a, b = net["NodeA"], net["NodeB"]
    wait_until(lambda: own_link_events(a, "link.up", "NodeB"), 20, "A's link.up for B")
    downs = len(own_link_events(a, "link.down", "NodeB"))
    ups = len(own_link_events(a, "link.up", "NodeB"))
    limit = 3 + 4.0  # L, plus a gossip interval (the round that notices) and margin
    b.proc.send_signal(signal.SIGSTOP)  # its TCP stays open: the kernel ACKs, nobody answers
    frozen = time.monotonic()
    try:
        wait_until(lambda: len(own_link_events(a, "link.down", "NodeB")) > downs, limit,
                   "A to append link.down for the frozen B", every=0.05)
        took = time.monotonic() - frozen
        print(f"\nlink.down {took:.2f}s after B froze (link_down_after 3 s)")
    finally:
        b.proc.send_signal(signal.SIGCONT)
    assert "link.down peer=NodeB" in a.log_path.read_text()
    # Thawed, B answers again: the link comes back by itself.
    wait_until(lambda: len(own_link_events(a, "link.up", "NodeB")) > ups, 20, "A's link.up for B again")
