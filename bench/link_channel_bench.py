"""Channels both ways on one SSH connection: what a channel costs in each direction.

Two SSH servers and two link clients on 127.0.0.1, as two agents have them: NodeA dials
NodeB; NodeB has no address for NodeA and opens its channels on the connection NodeA
made (the dialed side serves them through ``_Transport._parse_channel_open``). For each
direction it prints the median and p90 of one channel's open + ``maildrop`` subsystem
request + one 64-byte echo + close, and the throughput of one 64 MiB stream. The forward
direction (the dialer's channel, as every channel was before) is the reference measured
in the same run. It also prints the TCP connections the link holds (/proc/net/tcp).

Usage: python bench/link_channel_bench.py [--channels 300] [--mib 64]
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from maildrop.keys import generate_key  # noqa: E402
from maildrop.transport.ssh import PeerClient, SSHServer  # noqa: E402


class Echo:
    def handle_channel(self, peer_id: str, channel) -> None:
        channel.settimeout(30)
        while data := channel.recv(1 << 20):
            channel.sendall(data)


class Sink:
    """Echoes small messages; swallows a stream and answers its byte count at EOF."""

    def handle_channel(self, peer_id: str, channel) -> None:
        channel.settimeout(30)
        first = channel.recv(1 << 20)
        if first.startswith(b"stream"):
            total = len(first)
            while data := channel.recv(1 << 20):
                total += len(data)
            channel.sendall(str(total).encode())
            return
        channel.sendall(first)
        while data := channel.recv(1 << 20):
            channel.sendall(data)


def one_channel(client: PeerClient) -> float:
    t0 = time.perf_counter()
    channel = client.open_channel()
    channel.settimeout(30)
    channel.sendall(b"x" * 64)
    got = b""
    while len(got) < 64:
        got += channel.recv(64)
    channel.close()
    return time.perf_counter() - t0


def stream(client: PeerClient, mib: int) -> float:
    block = b"stream" + b"\0" * ((1 << 20) - 6)
    channel = client.open_channel()
    channel.settimeout(60)
    t0 = time.perf_counter()
    for _ in range(mib):
        channel.sendall(block)
    channel.shutdown_write()
    answer = channel.recv(64)
    took = time.perf_counter() - t0
    channel.close()
    assert int(answer) == mib << 20, answer
    return mib / took


def connections(port: int) -> int:
    rows = [line.split() for line in Path("/proc/net/tcp").read_text().splitlines()[1:]]
    return sum(1 for r in rows if r[3] == "01" and r[1] == f"0100007F:{port:04X}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=300)
    parser.add_argument("--mib", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        ka = generate_key(Path(tmp) / "a", comment="NodeA")
        kb = generate_key(Path(tmp) / "b", comment="NodeB")
        server_a = SSHServer(ka, ("127.0.0.1", 0), {"NodeB": kb.public_line}, Sink())
        server_b = SSHServer(kb, ("127.0.0.1", 0), {"NodeA": ka.public_line}, Sink())
        server_a.start()
        server_b.start()
        a_to_b = PeerClient("NodeA", ka, "NodeB", server_b.address, kb.public_line)
        b_to_a = PeerClient("NodeB", kb, "NodeA", None, ka.public_line)  # only A can dial
        server_a.attach(a_to_b)
        server_b.attach(b_to_a)
        try:
            a_to_b.connect()
            deadline = time.monotonic() + 10
            while not b_to_a.connected and time.monotonic() < deadline:
                time.sleep(0.01)
            rows = []
            for name, client in (("forward (A's channel, A dialed: the reference)", a_to_b),
                                 ("reverse (B's channel on A's connection)", b_to_a)):
                for _ in range(20):
                    one_channel(client)  # warm up
                times = sorted(one_channel(client) for _ in range(args.channels))
                rate = stream(client, args.mib)
                rows.append((name, statistics.median(times) * 1e3, times[int(len(times) * 0.9)] * 1e3, rate))
            print(f"{'direction':52} {'median ms':>10} {'p90 ms':>8} {'MiB/s':>8}")
            for name, median, p90, rate in rows:
                print(f"{name:52} {median:10.2f} {p90:8.2f} {rate:8.1f}")
            print(f"TCP connections of the link: {connections(server_b.address[1])} to B, "
                  f"{connections(server_a.address[1])} to A")
        finally:
            a_to_b.close()
            b_to_a.close()
            server_a.stop()
            server_b.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
