"""The local hop between ``maildrop serve`` (run by sshd for a peer it authenticated) and
the running agent: a unix socket in ``state/``, and both of its ends.

Only the agent writes the node's log and spool, so ``serve`` is a thin pipe: it connects to
``state/serve.sock``, says in one hello line which peer it speaks for (the ``--peer`` of a
forced command, and/or the key sshd authenticated, from ``$SSH_USER_AUTH``), and once the
agent has accepted it, copies bytes both ways between its stdin/stdout and the socket. The
agent serves that stream exactly like an SSH channel from that peer
(``ChannelHandler.handle_channel``).

Wire (docs/protocol.md, "The stdio transport"): the client sends one line
``{"v": 1, "peer": ID | null, "key": "ssh-ed25519 ..." | null}\\n`` (at most
``MAX_HELLO`` bytes, within ``HELLO_TIMEOUT``); the agent answers one line,
``{"ok": true, "peer": ID}`` or ``{"ok": false, "reason": WORD, "detail": TEXT}``. The
maildrop protocol follows, unchanged.

Trust: the socket is made mode 0600 in ``state/`` (0700), and a connection is served only
when its SO_PEERCRED uid is the agent's own or root: whoever can connect could read the
node's key anyway. So the hello's claim is believed as far as the agent's authorized peers
allow it: a claimed peer must be configured, a claimed key must be that peer's current key
(a rotation followed), a key alone names the peer it belongs to. A peer a reload removes (or
whose key moves away from the one it claimed) is disconnected within ``SWEEP_EVERY``.

Must not import the agent or another edge: the agent passes its handler and a callable
returning its authorized peers (peer id -> current key line).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import MaildropError
from ..ids import is_node_id
from ..keys import normalize_public_line

SOCKET_NAME = "serve.sock"
HELLO_VERSION = 1
MAX_HELLO = 4096
HELLO_TIMEOUT = 5.0  # seconds for the hello, each way
SWEEP_EVERY = 1.0  # seconds between checks that every session's peer is still authorized
COPY_CHUNK = 256 * 1024
_STOP_BUDGET = 2.0
_PATH_MAX = 100  # sun_path holds 108 bytes; longer paths go through /proc/self/fd


class AgentNotRunning(MaildropError):
    """``serve``: no agent listens on the node's serve socket."""

    exit_status = 3


class ServeRefused(MaildropError):
    """``serve``: the agent refused the peer the hello named (not configured, wrong key)."""


class ChannelHandler(Protocol):
    """The agent's handler (as in ``transport.ssh``): serves one channel of ``peer_id``."""

    def handle_channel(self, peer_id: str, channel: Any) -> None: ...


# ---------------------------------------------------------------------------- both ends


@contextlib.contextmanager
def _short_path(path: Path):  # -> Iterator[str]
    """A path to ``path`` that fits in a sockaddr_un: itself, or ``/proc/self/fd/N/name``
    through a descriptor of its folder (held open while the context runs)."""
    text = os.fsencode(path)
    if len(text) < _PATH_MAX:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def _read_line(sock: socket.socket, deadline: float) -> tuple[bytes, bytes]:
    """One ``\\n``-terminated line of at most ``MAX_HELLO`` bytes by ``deadline``, and the
    bytes read after it. ValueError for a longer line or a close before the newline;
    TimeoutError when the deadline passes."""
    buf = b""
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("no complete line in time")
        sock.settimeout(left)
        chunk = sock.recv(MAX_HELLO + 1 - len(buf))
        if not chunk:
            raise ValueError("closed before the end of the line")
        buf += chunk
        if len(buf) > MAX_HELLO and b"\n" not in buf:
            raise ValueError(f"line longer than {MAX_HELLO} bytes")
    line, _, rest = buf.partition(b"\n")
    return line, rest


def _send_line(sock: socket.socket, obj: Mapping[str, Any]) -> None:
    sock.sendall(json.dumps(obj, sort_keys=True).encode() + b"\n")


# ---------------------------------------------------------------------------- agent end


class _LocalChannel:
    """A served connection as the handler's ``Stream``: the socket, with the bytes that
    came after the hello line given back first."""

    def __init__(self, sock: socket.socket, early: bytes) -> None:
        self._sock = sock
        self._early = early

    def recv(self, n: int) -> bytes:
        if self._early:
            out, self._early = self._early[:n], self._early[n:]
            return out
        return self._sock.recv(n)

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)

    def settimeout(self, timeout: float | None) -> None:
        self._sock.settimeout(timeout)

    def gettimeout(self) -> float | None:
        return self._sock.gettimeout()

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._sock.close()


@dataclass(eq=False)
class _Session:
    """One served connection, from accept until its handler returns (identity-hashed)."""

    sock: socket.socket
    peer_id: str = ""
    key: str | None = None  # the key the hello claimed, if any
    served: bool = False  # past the hello: counted in the peer's channels


def resolve_peer(authorized: Mapping[str, str], peer: str | None, key: str | None) -> tuple[str, str]:
    """The peer a hello speaks for, or ("", reason word): ``peer`` must be configured,
    ``key`` must be that peer's current key; a ``key`` alone names its peer. Pure."""
    if key is not None:
        owner = next((p for p, k in authorized.items() if k == key), None)
        if owner is None:
            return "", "unknown-key"
        if peer is not None and peer != owner:
            return "", "key-of-other-peer"
        return owner, ""
    if peer is None:
        return "", "no-peer"
    if peer not in authorized:
        return "", "unknown-peer"
    return peer, ""


class LocalServer:
    """The agent's acceptor on ``state/serve.sock``: one thread accepts (and every
    ``SWEEP_EVERY`` s disconnects sessions whose peer is no longer authorized), one thread
    per connection reads the hello, checks it and runs the handler.

    Limits, as the SSH server's: at most ``max_channels_per_peer`` served connections per
    peer; the handler's stream has an I/O timeout of ``channel_idle_timeout``.

    ``authorized`` is called from this module's threads, never under ``_lock`` (the agent's
    takes its keys lock). ``_lock`` guards ``_sessions``, ``_threads`` and ``_open`` (a leaf).

    Crash: the socket file is soft state; a stale one (the agent was killed) is removed at
    the next start, which holds the root's lock.
    """

    def __init__(self, path: Path, authorized: Callable[[], Mapping[str, str]],
                 handler: ChannelHandler, *, max_channels_per_peer: int = 16,
                 channel_idle_timeout: float = 60.0, logger: logging.Logger | None = None) -> None:
        self.path = path
        self._authorized = authorized
        self._handler = handler
        self._max_channels = max_channels_per_peer
        self._idle_timeout = channel_idle_timeout
        self._log = logger or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._sessions: set[_Session] = set()
        self._threads: set[threading.Thread] = set()
        self._open: dict[str, int] = {}
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._uid = os.geteuid()

    def start(self) -> None:
        """Bind ``path`` (mode 0600; a stale socket replaced), listen, accept on a thread.
        MaildropError with one line if it cannot."""
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # only a dead agent's: we hold the root's lock
            with _short_path(self.path) as where:
                listener.bind(where)
            os.chmod(self.path, 0o600)  # state/ is 0700: nobody else reached it meanwhile
            listener.listen(64)
        except OSError as exc:
            listener.close()
            raise MaildropError(f"cannot listen on {self.path}: {exc.strerror or exc}") from None
        listener.settimeout(SWEEP_EVERY)
        self._listener = listener
        self._accept_thread = threading.Thread(target=self._accept_loop, name="maildrop-serve-accept",
                                               daemon=True)
        self._accept_thread.start()
        self._log.debug("serve.listening path=%s", self.path)

    def stop(self) -> None:
        """Close the listener and every session; join the threads within ~2 s; remove the
        socket file. Idempotent."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        deadline = time.monotonic() + _STOP_BUDGET
        if self._listener is not None:  # wake the accept thread now, not at its next timeout
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as wake:
                wake.settimeout(0.5)
                wake.connect(str(self.path))
        with self._lock:
            sessions = list(self._sessions)
        for s in sessions:
            with contextlib.suppress(OSError):
                s.sock.shutdown(socket.SHUT_RDWR)
        threads = [self._accept_thread] if self._accept_thread is not None else []
        with self._lock:
            threads += list(self._threads)
        for t in threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        with contextlib.suppress(OSError):
            os.unlink(self.path)

    # --- plumbing

    def _accept_loop(self) -> None:
        assert self._listener is not None
        listener = self._listener
        next_sweep = time.monotonic() + SWEEP_EVERY
        try:
            while not self._stopping.is_set():
                if time.monotonic() >= next_sweep:  # also while connections keep coming
                    self._sweep()
                    next_sweep = time.monotonic() + SWEEP_EVERY
                try:
                    sock, _ = listener.accept()
                except TimeoutError:
                    continue
                except OSError as exc:
                    if self._stopping.is_set():
                        return
                    self._log.error("serve.accept-failed error=%s", exc)
                    self._stopping.wait(0.1)
                    continue
                if self._stopping.is_set():  # the wake-up of stop(), or one just too late
                    sock.close()
                    return
                self._admit(sock)
        finally:
            listener.close()

    def _admit(self, sock: socket.socket) -> None:
        uid = _peer_uid(sock)
        if uid not in (self._uid, 0):
            self._log.warning("serve.refused reason=wrong-user uid=%s", uid)
            sock.close()
            return
        session = _Session(sock)
        thread = threading.Thread(target=self._serve, args=(session,), name="maildrop-serve-conn",
                                  daemon=True)
        with self._lock:
            self._sessions.add(session)
            self._threads.add(thread)
        thread.start()

    def _sweep(self) -> None:
        """Disconnect the sessions whose peer (or claimed key) is no longer authorized."""
        with self._lock:
            served = [s for s in self._sessions if s.served]
        if not served:
            return
        authorized = self._authorized()
        for s in served:
            if resolve_peer(authorized, s.peer_id, s.key)[0] != s.peer_id:
                self._log.warning("serve.peer.deauthorized peer=%s", s.peer_id)
                with contextlib.suppress(OSError):
                    s.sock.shutdown(socket.SHUT_RDWR)

    def _serve(self, session: _Session) -> None:
        sock = session.sock
        try:
            early = self._hello(session)
            if early is None:
                return
            sock.settimeout(self._idle_timeout)
            self._log.debug("serve.peer.connected peer=%s", session.peer_id)
            try:
                self._handler.handle_channel(session.peer_id, _LocalChannel(sock, early))
            except TimeoutError:
                self._log.warning("serve.channel.idle peer=%s reason=timeout seconds=%g",
                                  session.peer_id, self._idle_timeout)
            except MaildropError as exc:
                self._log.warning("serve.channel.handler-failed peer=%s error=%s", session.peer_id, exc)
            self._log.debug("serve.peer.disconnected peer=%s", session.peer_id)
        except Exception:
            self._log.exception("serve.conn.crashed peer=%s", session.peer_id or "-")
        finally:
            sock.close()
            with self._lock:
                self._sessions.discard(session)
                self._threads.discard(threading.current_thread())
                if session.served:
                    left = self._open.get(session.peer_id, 1) - 1
                    if left > 0:
                        self._open[session.peer_id] = left
                    else:
                        self._open.pop(session.peer_id, None)

    def _hello(self, session: _Session) -> bytes | None:
        """Read and answer the hello; the bytes after it, or None when refused (logged)."""
        sock = session.sock
        try:
            line, early = _read_line(sock, time.monotonic() + HELLO_TIMEOUT)
            peer, key = _parse_hello(line)
        except (TimeoutError, ValueError, OSError) as exc:
            self._log.warning("serve.refused reason=bad-hello detail=%s", str(exc)[:120])
            with contextlib.suppress(OSError):
                _send_line(sock, {"ok": False, "reason": "bad-hello", "detail": str(exc)[:200]})
            return None
        peer_id, why = resolve_peer(self._authorized(), peer, key)
        if not why:
            with self._lock:
                if self._open.get(peer_id, 0) >= self._max_channels:
                    why = "too-many-channels"
                else:
                    self._open[peer_id] = self._open.get(peer_id, 0) + 1
                    session.peer_id, session.key, session.served = peer_id, key, True
        if why:
            self._log.warning("serve.refused reason=%s peer=%s key=%s", why, peer or "-",
                              key.split()[1][:16] + "…" if key else "-")
            with contextlib.suppress(OSError):
                _send_line(sock, {"ok": False, "reason": why, "detail": _REFUSALS[why]})
            return None
        sock.settimeout(HELLO_TIMEOUT)
        _send_line(sock, {"ok": True, "peer": peer_id})
        return early


_REFUSALS = {
    "unknown-key": "the key sshd authenticated is no configured peer's key",
    "key-of-other-peer": "the key sshd authenticated is another peer's key",
    "unknown-peer": "no such peer in this node's config",
    "no-peer": "the hello named neither a peer nor a key",
    "too-many-channels": "this peer has too many channels open",
}


def _parse_hello(line: bytes) -> tuple[str | None, str | None]:
    """The (peer, key) a hello line claims; ValueError naming what is wrong."""
    try:
        hello = json.loads(line)
    except (ValueError, RecursionError):
        raise ValueError("hello is not JSON") from None
    if not isinstance(hello, dict) or hello.get("v") != HELLO_VERSION:
        raise ValueError(f"hello is not a version {HELLO_VERSION} object")
    peer, key = hello.get("peer"), hello.get("key")
    if peer is not None and not (isinstance(peer, str) and is_node_id(peer)):
        raise ValueError("hello's peer is not a node id")
    if key is not None:
        if not isinstance(key, str):
            raise ValueError("hello's key is not a key line")
        key = normalize_public_line(key)  # ValueError when it is not one
    return peer, key


def _peer_uid(sock: socket.socket) -> int | None:
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    return struct.unpack("3i", creds)[1]


# ---------------------------------------------------------------------------- serve end


def authenticated_keys(path: str) -> list[str]:
    """The public keys in sshd's ``ExposeAuthInfo`` file (``$SSH_USER_AUTH``): its
    ``publickey <type> <base64>`` lines, in order. OSError when it cannot be read."""
    keys = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f.read(1 << 16).splitlines():
            words = line.split()
            if len(words) >= 3 and words[0] == "publickey":
                keys.append(f"{words[1]} {words[2]}")
    return keys


def serve_stdio(path: Path, peer: str | None, key: str | None, *, stdin: int = 0,
                stdout: int = 1) -> None:
    """``maildrop serve``: say hello on ``path`` for ``peer`` and/or ``key``, then copy
    ``stdin`` to the agent and the agent's answers to ``stdout`` until the agent closes the
    stream (stdin's end is passed on as a half close). Raises AgentNotRunning (no agent
    listens), ServeRefused (this user may not reach the socket, the agent refused the
    hello, or did not answer it within ``HELLO_TIMEOUT``). Returns when the stream ended; the agent's end decides."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        try:
            with _short_path(path) as where:
                sock.settimeout(HELLO_TIMEOUT)
                sock.connect(where)
        except (FileNotFoundError, ConnectionRefusedError):
            raise AgentNotRunning(f"the agent is not running (nothing listens on {path}); "
                                  "start it: systemctl start maildrop") from None
        except PermissionError:
            raise ServeRefused(f"permission denied on {path}: sshd must run 'maildrop serve' as "
                               "the agent's own user (the account in sshd's Match User / "
                               "authorized_keys)") from None
        except OSError as exc:
            raise AgentNotRunning(f"cannot reach the agent at {path}: {exc.strerror or exc}") from None
        try:
            _send_line(sock, {"v": HELLO_VERSION, "peer": peer, "key": key})
            line, early = _read_line(sock, time.monotonic() + HELLO_TIMEOUT)
            answer = json.loads(line)
        except (OSError, ValueError) as exc:
            raise ServeRefused(f"the agent did not answer the hello ({exc})") from None
        if not isinstance(answer, dict) or answer.get("ok") is not True:
            reason = answer.get("reason", "?") if isinstance(answer, dict) else "?"
            detail = answer.get("detail", "") if isinstance(answer, dict) else ""
            raise ServeRefused(f"the agent refused this session: {reason} ({detail})")
        sock.settimeout(None)
        _copy(sock, early, stdin, stdout)
    finally:
        sock.close()


def _copy(sock: socket.socket, early: bytes, stdin: int, stdout: int) -> None:
    """Each direction on a thread of its own (the agent's handler reads and writes on one
    thread, so one thread here could block on a full socket while the agent blocks on a
    full stdout pipe). stdin's EOF is passed on as a half close; the copy ends when the
    agent's side reaches EOF (or stdout is gone): the process then exits, taking the
    stdin thread with it."""

    def upstream() -> None:
        try:
            while data := os.read(stdin, COPY_CHUNK):
                sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # wake the other direction: we are done

    threading.Thread(target=upstream, name="serve-stdin", daemon=True).start()
    _write_all(stdout, early)
    while True:
        try:
            data = sock.recv(COPY_CHUNK)
        except ConnectionResetError:
            return
        if not data:
            return
        _write_all(stdout, data)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


__all__ = ["SOCKET_NAME", "AgentNotRunning", "LocalServer", "ServeRefused", "authenticated_keys",
           "resolve_peer", "serve_stdio"]
