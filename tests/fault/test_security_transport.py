"""Issue 9, findings 10 and 9 (server part): what a network attacker can do to the SSH
server before login, and what a logged-in peer can do by going silent on a channel.

A real ``SSHServer`` (real paramiko, real sockets) on 127.0.0.1; the attacker is played with
raw TCP sockets, the honest peer with a real ``PeerClient``. 127.0.0.0/8 is all loopback on
Linux, so "other addresses" are 127.0.0.2 and up. No mocks; every wait has a deadline.
"""

from __future__ import annotations

import logging
import re
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from maildrop.keys import NodeKey, generate_key
from maildrop.transport.ssh import PeerClient, SSHServer
from tests.harness import hung_up, wait_until

LOGGER = "maildrop.test.security.ssh"
log = logging.getLogger(LOGGER)


# ---------------------------------------------------------------------------- helpers


class EchoHandler:
    """Like ``Agent.handle_channel``: loops on recv and returns on TimeoutError or EOF."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.timed_out = 0

    def handle_channel(self, peer_id: str, channel) -> None:
        try:
            while data := channel.recv(1 << 16):
                channel.sendall(data)
        except TimeoutError:
            with self.lock:
                self.timed_out += 1


@pytest.fixture
def keys(tmp_path: Path) -> Callable[[str], NodeKey]:
    return lambda name: generate_key(tmp_path / "keys" / name, comment=name)


@pytest.fixture
def caplog_ssh(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    return caplog


@pytest.fixture
def server_and_peer(keys) -> Iterator[Callable[..., tuple[SSHServer, PeerClient]]]:
    """An SSHServer (NodeA) with default limits unless told otherwise, and NodeB's client."""
    made: list[tuple[SSHServer, PeerClient]] = []

    def make(handler=None, **kwargs) -> tuple[SSHServer, PeerClient]:
        a, b = keys("a"), keys("b")
        server = SSHServer(a, ("127.0.0.1", 0), {"NodeB": b.public_line}, handler or EchoHandler(),
                           logger=log, **kwargs)
        server.start()
        client = PeerClient("NodeB", b, "NodeA", server.address, a.public_line, logger=log)
        made.append((server, client))
        return server, client

    yield make
    for server, client in made:
        client.close()
        server.stop()


def connect_from(address: tuple[str, int], source: str) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.settimeout(5)
    sock.connect(address)
    return sock


def logs_in(client: PeerClient) -> bool:
    channel = client.open_channel(timeout=10)
    channel.settimeout(10)
    channel.sendall(b"hello")
    ok = channel.recv(5) == b"hello"
    channel.close()
    return ok


def eviction_counts(caplog: pytest.LogCaptureFixture) -> list[int]:
    return [int(re.search(r"count=(\d+)", m).group(1)) for m in
            (r.getMessage() for r in caplog.records) if m.startswith("ssh.conn.evicted")]


def flood(sock: socket.socket, data: Callable[[], bytes], limit: int, seconds: float) -> tuple[int, bool, float]:
    """Send ``data()`` chunks until ``limit`` bytes, ``seconds`` or the server hangs up.
    Returns (bytes the kernel took, whether the server hung up, seconds taken)."""
    started = time.monotonic()
    sock.settimeout(0.2)
    sent = 0
    try:
        while sent < limit and time.monotonic() - started < seconds:
            try:
                sent += sock.send(data())
            except TimeoutError:
                continue
    except OSError:  # EPIPE / ECONNRESET: the server hung up
        return sent, True, time.monotonic() - started
    elapsed = time.monotonic() - started
    sock.settimeout(1.0)
    try:
        return sent, sock.recv(1 << 20) == b"" or hung_up(sock), elapsed
    except TimeoutError:
        return sent, False, elapsed
    except OSError:
        return sent, True, elapsed


# ---------------------------------------------------------------------------- F10


def test_f10_idle_connections_from_one_address_do_not_lock_out_a_peer(server_and_peer, caplog_ssh):
    # 40 idle TCP connections from 127.0.0.1 -- the real peer's own address -- used to fill
    # all 32 unauthenticated slots until the login deadline: the peer's login was refused.
    server, client = server_and_peer()
    idle = [connect_from(server.address, "127.0.0.1") for _ in range(40)]
    try:
        assert logs_in(client)  # the peer's connection came last and still got in
        wait_until(lambda: sum(hung_up(s) for s in idle) >= 36, 10,
                   "the server to close all but 4 idle connections from 127.0.0.1")
        evicted = sum(hung_up(s) for s in idle)
        assert 40 - evicted <= 4  # at most 4 pending logins per address
        assert client.connected
    finally:
        for sock in idle:
            sock.close()
    server.stop()  # flushes the eviction count
    counts = eviction_counts(caplog_ssh)
    assert 1 <= len(counts) <= 2, counts  # counted, not one line per connection
    assert sum(counts) >= evicted >= 36


def test_f10_flood_from_many_addresses_does_not_lock_out_a_peer(server_and_peer):
    # Idle connections from ten other addresses, and more arriving while the peer logs in:
    # at most 4 per address and 32 in all are kept, and the peer gets in.
    server, client = server_and_peer()
    sources = [f"127.0.0.{i}" for i in range(2, 12)]
    held: list[tuple[str, socket.socket]] = [
        (src, connect_from(server.address, src)) for src in sources for _ in range(5)
    ]
    stop = threading.Event()

    def keep_flooding() -> None:
        for i in range(300):
            if stop.is_set():
                return
            src = sources[i % len(sources)]
            held.append((src, connect_from(server.address, src)))

    flooder = threading.Thread(target=keep_flooding, daemon=True)
    flooder.start()
    try:
        assert logs_in(client)
        stop.set()
        flooder.join(30)
        assert not flooder.is_alive()

        def settled() -> bool:
            live = [src for src, sock in held if not hung_up(sock)]
            return len(live) <= 32 and all(live.count(src) <= 4 for src in sources)

        assert wait_until(settled, 10, "at most 32 pending logins, at most 4 per address")
        assert client.connected
    finally:
        stop.set()
        for _, sock in held:
            sock.close()


# A pre-auth packet claiming 64 MiB (+4: a multiple of the 8-byte block after the length).
HUGE = (64 << 20) + 4


def test_f10_huge_preauth_packet_is_cut_off_at_once(server_and_peer, caplog_ssh):
    # paramiko buffered a pre-auth packet of any claimed length (by quadratic concatenation):
    # the server took all 64 MiB (~0.7-6 s of its CPU, ~280 MB of memory) before refusing it.
    server, client = server_and_peer(login_timeout=30)  # the login deadline is not what cuts
    sock = connect_from(server.address, "127.0.0.1")
    try:
        sock.sendall(b"SSH-2.0-probe\r\n" + struct.pack(">IB", HUGE, 4) + bytes(11))
        cpu = time.process_time()
        sent, closed, elapsed = flood(sock, lambda: bytes(1024), HUGE, seconds=5)
        cpu = time.process_time() - cpu
    finally:
        sock.close()
    log.info("f10 huge packet: sent=%d closed=%s wall=%.2fs cpu=%.2fs", sent, closed, elapsed, cpu)
    assert closed, "the server kept reading a 64 MiB pre-auth packet"
    assert sent < 16 << 20, sent  # the kernel's socket buffers, not the claimed length
    assert elapsed < 2.0 and cpu < 1.0, (elapsed, cpu)
    wait_until(lambda: any("packet" in r.getMessage() and "limit" in r.getMessage()
                           for r in caplog_ssh.records if r.getMessage().startswith("ssh.conn.handshake-failed")),
               5, "the handshake-failed line naming the packet limit")
    assert logs_in(client)


def test_f10_endless_banner_line_is_cut_off(server_and_peer):
    # paramiko read a banner line until its newline, however long (again by quadratic
    # concatenation), for as long as the login deadline allowed.
    server, client = server_and_peer(login_timeout=30)
    sock = connect_from(server.address, "127.0.0.1")
    try:
        sent, closed, elapsed = flood(sock, lambda: b"SSH-2.0-" + b"x" * 1016, 64 << 20, seconds=3)
    finally:
        sock.close()
    assert closed, f"the server was still reading a {sent}-byte banner line after {elapsed:.1f}s"
    assert sent < 16 << 20, sent
    assert logs_in(client)


# ---------------------------------------------------------------------------- F9


def test_f9_silent_channel_is_closed_and_its_slot_released(server_and_peer):
    # A peer could open channels and go silent: each held a handler thread and a channel
    # slot forever. With one slot per peer, a silent channel blocked the peer for good.
    handler = EchoHandler()
    server, client = server_and_peer(handler, channel_idle_timeout=1.0, max_channels_per_peer=1)
    silent = client.open_channel()
    started = time.monotonic()
    silent.settimeout(10)
    assert silent.recv(1) == b"", "the server sent data on a silent channel"
    elapsed = time.monotonic() - started
    assert 0.8 <= elapsed < 5.0, elapsed  # closed by the idle timeout, not at once
    assert handler.timed_out == 1
    assert logs_in(client)  # the only slot was given back


def test_f9_a_channel_in_use_outlives_the_idle_timeout(server_and_peer):
    # The timeout is for silence, not a lifetime: the client keeps its gossip channel open
    # between rounds, so a channel that keeps talking must stay up.
    handler = EchoHandler()
    server, client = server_and_peer(handler, channel_idle_timeout=1.0)
    channel = client.open_channel()
    channel.settimeout(10)
    started = time.monotonic()
    while time.monotonic() - started < 2.5:  # 2.5 idle timeouts in all
        channel.sendall(b"x")
        assert channel.recv(1) == b"x"
        time.sleep(0.3)  # pacing the conversation: less than the idle timeout
    assert not channel.closed
    assert handler.timed_out == 0
    channel.close()


class SilentTimeoutHandler:
    """Lets the idle timeout's TimeoutError escape, as a handler blocked in a reply may."""

    def handle_channel(self, peer_id: str, channel) -> None:
        channel.recv(1)


def test_f9_timeout_escaping_a_handler_is_an_idle_close_not_a_crash(server_and_peer, caplog_ssh):
    server, client = server_and_peer(SilentTimeoutHandler(), channel_idle_timeout=0.5,
                                     max_channels_per_peer=1)
    silent = client.open_channel()
    silent.settimeout(10)
    assert silent.recv(1) == b""
    wait_until(lambda: any(m.startswith("ssh.channel.idle peer=NodeB") and "reason=timeout" in m
                           for m in (r.getMessage() for r in caplog_ssh.records)),
               5, "the idle close in the log")
    lines = [r.getMessage() for r in caplog_ssh.records]
    assert not [m for m in lines if m.startswith("ssh.channel.handler-crashed")]
    other = client.open_channel()  # the slot came back
    other.close()
