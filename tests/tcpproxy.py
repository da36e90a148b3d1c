"""A TCP proxy on 127.0.0.1 for tests: a slow link (every byte held ``delay`` seconds each
way) or a flapping one (``drop_all`` resets every connection through it). There is no netem
or iptables on the test machines; pointing a peer's address at the proxy makes the link
between two real agents really slow, or really broken, at the socket level."""

from __future__ import annotations

import contextlib
import queue
import socket
import struct
import threading
import time

_EOF = b""


class TcpProxy:
    """Forwards connections to ``listen`` (``address``) to ``target``, each chunk delivered
    ``delay`` seconds after it was read (latency, not a bandwidth limit). ``drop_all``
    resets every connection open through it (RST on both sides); new ones are accepted."""

    def __init__(self, target: tuple[str, int], delay: float = 0.0) -> None:
        self.target = target
        self.delay = delay
        self.listener = socket.create_server(("127.0.0.1", 0), backlog=32)
        self.address = self.listener.getsockname()[:2]
        self.port = self.address[1]
        self._lock = threading.Lock()  # guards _socks and dropped
        self._socks: list[socket.socket] = []
        self.dropped = 0
        self._closed = threading.Event()
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                down, _ = self.listener.accept()
            except OSError:
                return
            try:
                up = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(down)
                continue
            up.settimeout(None)
            with self._lock:
                self._socks += [down, up]
            for src, dst in ((down, up), (up, down)):
                chunks: queue.Queue[tuple[float, bytes]] = queue.Queue()
                threading.Thread(target=self._read, args=(src, chunks), daemon=True).start()
                threading.Thread(target=self._write, args=(dst, chunks), daemon=True).start()

    def _read(self, src: socket.socket, chunks: queue.Queue) -> None:
        while True:
            try:
                data = src.recv(65536)
            except OSError:
                data = _EOF
            chunks.put((time.monotonic() + self.delay, data))
            if not data:
                return

    def _write(self, dst: socket.socket, chunks: queue.Queue) -> None:
        while True:
            due, data = chunks.get()
            wait = due - time.monotonic()
            if wait > 0:
                time.sleep(wait)  # the added latency itself (not a test's synchronisation)
            try:
                if not data:
                    dst.shutdown(socket.SHUT_WR)
                    return
                dst.sendall(data)
            except OSError:
                return

    def drop_all(self) -> int:
        """Reset every connection open through the proxy now; returns how many."""
        with self._lock:
            socks, self._socks = self._socks, []
            self.dropped += len(socks) // 2
        for s in socks:
            _reset(s)
        return len(socks) // 2

    def close(self) -> None:
        self._closed.set()
        self.listener.close()
        self.drop_all()


def _reset(s: socket.socket) -> None:
    """Close with an RST (SO_LINGER 0): the other side learns at once, as from a reset link."""
    with contextlib.suppress(OSError):
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    with contextlib.suppress(OSError):
        s.shutdown(socket.SHUT_RDWR)  # wakes the proxy's own thread blocked in recv on it
    with contextlib.suppress(OSError):
        s.close()
