"""Channels to a peer reached through OpenSSH (``via: openssh``): one ``ssh`` client
process per channel, speaking the maildrop protocol over its stdin/stdout.

``OpenSSHClient`` offers what the agent uses of ``transport.ssh.PeerClient``
(``open_channel``, ``close``, ``set_peer_key``, ``silence_after``, the byte counters), so
a peer's channels are opened the same way whichever client it has. At the other end an
sshd runs ``maildrop serve`` (as its ``Subsystem maildrop``, or as the forced command of
this node's key), or a maildrop agent's own SSH server answers (``ssh_request:
subsystem``, ``ssh_user`` this node's id).

Pinning: the client reads a known_hosts file of its own, ``state/openssh/<peer>.known_hosts``,
holding one line ``maildrop-<peer> <key>`` (the peer's ``ssh_host_key``, else its ``key``),
and runs ``ssh`` with ``HostKeyAlias`` that name, ``StrictHostKeyChecking yes``, no global
known_hosts, ``IdentitiesOnly`` with ``-i`` the node key (and the key before a rotation),
no agent, ``BatchMode`` (no prompt ever), no forwarding. The file is written (aside, then
renamed) at start and when the peer's key follows a rotation; it is soft state.

Bounded waits: ``open_channel(timeout)`` returns a channel only once the peer answered a
``ping`` through it (so the connection, the host key, the login and the far end's agent all
work), within ``timeout``; otherwise the process is ended and the error names why, from
ssh's own words on stderr: ``HostKeyRefused`` (mismatch or unknown key), ``LoginRefused``
(our key is not accepted), ``SSHClientMissing`` (no such program) — the three need an
operator (``PERMANENT``) — or ``SSHChannelFailed`` (unreachable, the far agent not
running, a timeout: retry later). Each failure is logged as ``openssh.channel.failed`` once
per change of reason. A channel's reads and writes time out as a socket's do
(``settimeout``); ssh's ``ServerAliveInterval`` (``silence_after`` / 3, 3 missed) ends a
connection whose peer vanished.

Crash: nothing here is durable. A killed agent closes the pipes: each ``ssh`` sees EOF,
passes it on, and exits when the far end closes.

Must not import the agent or another edge (it imports ``protocol`` and ``config`` from
the core).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import select
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ..config import Peer
from ..errors import MaildropError, ProtocolError
from ..keys import NodeKey, normalize_public_line
from ..protocol import FrameStream, encode

SUBSYSTEM = "maildrop"
REMOTE_COMMAND = "maildrop serve"
KNOWN_HOSTS_DIR = "openssh"
STDERR_TAIL = 4096  # bytes of ssh's stderr kept for the error message
_REAP = 2.0  # seconds a failed or closed ssh is given to exit before SIGKILL


class SSHChannelFailed(MaildropError):
    """Transient: the ssh client could not open a working channel (retry later)."""


class HostKeyRefused(MaildropError):
    """Permanent: the peer's sshd did not present the pinned host key."""


class LoginRefused(MaildropError):
    """Permanent: the peer's sshd refused this node's key."""


class SSHClientMissing(MaildropError):
    """Permanent: the configured ssh client cannot be run."""


PERMANENT = (HostKeyRefused, LoginRefused, SSHClientMissing)


_SERVE_EXITS = {
    1: "maildrop serve exit 1: the peer's agent refused this node; is it configured there?",
    2: "maildrop serve exit 2: its command line or config is wrong there",
    3: "maildrop serve exit 3: the peer's agent is not running",
}
"""What the far ``maildrop serve``'s exit status (passed on by ssh) means: sshd does not
pass a subsystem's stderr on, so the status is all the Subsystem form tells."""


class _Counter:
    """Protocol bytes moved over this client's channels (not ssh's encrypted bytes). Each
    channel adds from the one thread that uses it; a lost update under a race costs a
    statistic only."""

    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


class _Tail:
    """The last ``STDERR_TAIL`` bytes of a process's stderr, read by a thread of its own,
    which then reaps the process (so no zombie outlives its channel)."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.data = b""
        self.done = threading.Event()
        self._proc = proc
        threading.Thread(target=self._run, name=f"ssh-stderr-{proc.pid}", daemon=True).start()

    def _run(self) -> None:
        assert self._proc.stderr is not None
        try:
            while chunk := self._proc.stderr.read(4096):
                self.data = (self.data + chunk)[-STDERR_TAIL:]
        except (OSError, ValueError):
            pass
        finally:
            self.done.set()
            with contextlib.suppress(Exception):
                self._proc.stderr.close()
                self._proc.wait()

    def text(self) -> str:
        lines = [ln.strip() for ln in self.data.decode(errors="replace").splitlines()]
        return " | ".join(ln for ln in lines if ln and not ln.startswith("@@@"))[-600:]


class ProcessChannel:
    """One ``ssh`` process as a ``Stream``: ``recv``/``sendall`` on its stdout/stdin, each
    wait bounded by ``settimeout`` (TimeoutError, as a socket). Used by one thread at a
    time (a FrameStream's conversation); ``close`` is idempotent and never waits long."""

    def __init__(self, proc: subprocess.Popen, counter: _Counter,
                 on_close: Callable[[ProcessChannel], None] | None = None) -> None:
        assert proc.stdin is not None and proc.stdout is not None
        self._on_close = on_close
        self._proc = proc
        self._in = proc.stdin
        self._out = proc.stdout
        os.set_blocking(self._in.fileno(), False)
        os.set_blocking(self._out.fileno(), False)
        self._counter = counter
        self._timeout: float | None = None
        self._closed = False
        self.tail = _Tail(proc)

    @property
    def closed(self) -> bool:
        return self._closed or self._proc.poll() is not None

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def exit_status(self) -> int | None:
        """ssh's exit status (the far command's, when it ran), waited for up to ``_REAP`` s."""
        try:
            return self._proc.wait(_REAP)
        except subprocess.TimeoutExpired:
            return None

    def gettimeout(self) -> float | None:
        return self._timeout

    def _wait(self, fd: int, events: int, what: str) -> None:
        poller = select.poll()
        poller.register(fd, events)
        ms = None if self._timeout is None else max(0, math.ceil(self._timeout * 1000))
        if not poller.poll(ms):
            raise TimeoutError(f"ssh channel: nothing to {what} for {self._timeout:g}s")

    def recv(self, n: int) -> bytes:
        fd = self._out.fileno()
        while True:
            try:
                data = os.read(fd, n)
            except BlockingIOError:
                self._wait(fd, select.POLLIN, "read")
                continue
            self._counter.received += len(data)
            return data

    def sendall(self, data: bytes | memoryview) -> None:
        fd = self._in.fileno()
        view = memoryview(data)
        while view:
            try:
                k = os.write(fd, view)
            except BlockingIOError:
                self._wait(fd, select.POLLOUT, "write")
                continue
            self._counter.sent += k
            view = view[k:]

    def shutdown_write(self) -> None:
        with contextlib.suppress(OSError):
            self._in.close()

    def terminate(self) -> None:
        """End the process (SIGTERM, SIGKILL after ``_REAP`` s) without closing our pipes:
        a thread using the channel sees EOF, then closes it. Any thread may call this."""
        with contextlib.suppress(OSError):
            self._proc.terminate()

        def reap() -> None:
            try:
                self._proc.wait(_REAP)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(OSError):
                    self._proc.kill()
        threading.Thread(target=reap, name=f"ssh-reap-{self._proc.pid}", daemon=True).start()

    def close(self) -> None:
        """Close our ends (ssh sees EOF and passes it on) and end the process. Called by
        the thread that uses the channel."""
        if self._closed:
            return
        self._closed = True
        if self._on_close is not None:
            self._on_close(self)
        for f in (self._in, self._out):
            with contextlib.suppress(OSError):
                f.close()
        if self._proc.poll() is None:
            self.terminate()


class OpenSSHClient:
    """Hands out maildrop channels to one peer through the ``ssh`` client (see the module
    docstring). Thread-safe: ``_lock`` guards ``_live`` (the channels not closed yet, so
    ``close`` and a key change can end them), ``_liveness`` and the reason last logged; it
    is a leaf and never held while a process starts or a channel waits."""

    def __init__(self, node_id: str, key: NodeKey, peer: Peer, state_dir: Path, *,
                 silence_after: float = 15.0, fallback: Sequence[NodeKey] = (),
                 logger: logging.Logger | None = None) -> None:
        if not silence_after > 0:
            raise ValueError(f"silence_after must be > 0 seconds, not {silence_after!r}")
        self.node_id = node_id
        self.peer_id = peer.id
        self.address = peer.address
        self._peer = peer
        self._identities = [str(key.path), *(str(k.path) for k in fallback)]
        self._log = logger or logging.getLogger(__name__)
        self._lock = threading.Lock()
        self._silence_after = silence_after
        self._live: set[ProcessChannel] = set()
        self._last_reason = ""
        self._bytes = _Counter()
        self.known_hosts = state_dir / KNOWN_HOSTS_DIR / f"{peer.id}.known_hosts"
        self._pin(peer.host_key)

    # --- what the agent uses of a PeerClient

    @property
    def bytes_sent(self) -> int:
        return self._bytes.sent

    @property
    def bytes_received(self) -> int:
        return self._bytes.received

    @property
    def silence_after(self) -> float:
        """Seconds of silence after which a channel counts as dead (callers' read timeout);
        also gives ssh's ServerAliveInterval (a third of it) for channels opened later."""
        return self._silence_after

    @silence_after.setter
    def silence_after(self, seconds: float) -> None:
        if not seconds > 0:
            raise ValueError(f"silence_after must be > 0 seconds, not {seconds!r}")
        self._silence_after = seconds

    def open_channel(self, timeout: float = 10.0) -> ProcessChannel:
        """A channel whose far end answered a ping, within ``timeout`` seconds (each wait
        for ssh bounded by it; learning why it failed adds at most 2 x ``_REAP`` s). It has
        no I/O timeout (callers set one). Raises SSHChannelFailed, or one of ``PERMANENT``."""
        started = time.monotonic()
        argv = self.argv(timeout)
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, bufsize=0)
        except FileNotFoundError:
            raise self._failed(SSHClientMissing(
                f"peer {self.peer_id}: cannot run {argv[0]!r}: no such program (install "
                "openssh-client, or fix peers[].ssh_command)")) from None
        except OSError as exc:
            raise self._failed(SSHChannelFailed(
                f"peer {self.peer_id}: cannot run {argv[0]!r}: {exc.strerror or exc}")) from None
        chan = ProcessChannel(proc, self._bytes, on_close=self._forget)
        with self._lock:
            self._live.add(chan)
        chan.settimeout(max(0.1, timeout - (time.monotonic() - started)))
        try:
            chan.sendall(encode("ping"))
            FrameStream(chan).recv(expect={"pong"})
        except (TimeoutError, EOFError, OSError, ProtocolError) as exc:
            if isinstance(exc, TimeoutError):
                chan.terminate()  # else ssh ends by itself: its status says why
            error = self._classify(chan, exc, timeout)  # waits (bounded) for ssh to exit
            chan.close()
            raise self._failed(error) from None
        chan.settimeout(None)
        self._settled()
        self._log.debug("openssh.channel.opened peer=%s seconds=%.3f", self.peer_id,
                        time.monotonic() - started)
        return chan

    @staticmethod
    def dropped(chan: ProcessChannel) -> bool:
        """True when the channel was closed or its ``ssh`` process ended (never waits)."""
        return chan.closed

    @staticmethod
    def carries(_chan: object) -> bool:
        """Always True: each channel is an ``ssh`` process of its own, never on a duplicate
        connection that is going (``PeerClient.carries``)."""
        return True

    def close(self) -> None:
        """End every open channel's process (their users see EOF). A later call opens anew."""
        with self._lock:
            live, self._live = list(self._live), set()
        for chan in live:
            chan.terminate()

    def set_peer_key(self, peer_key: str) -> None:
        """The peer's key moved (its feed rotated): pin it, unless ``ssh_host_key`` pins
        the sshd's own key; channels opened under the old pin are ended."""
        if self._peer.ssh_host_key is not None:
            return
        self._pin(peer_key)
        self.close()

    # --- plumbing

    def argv(self, timeout: float) -> list[str]:
        """The ssh command line for one channel."""
        p = self._peer
        host, port = p.address
        connect = max(1, math.ceil(min(timeout, 10.0)))
        alive = max(1, round(self._silence_after / 3))
        own_config = "-F" in p.ssh_command[1:]  # else no ssh_config: only what we say counts
        argv = [*p.ssh_command, "-T", "-x", "-a", *([] if own_config else ["-F", "none"]),
                "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
                "-o", f"HostKeyAlias=maildrop-{p.id}", "-o", "HostKeyAlgorithms=ssh-ed25519",
                "-o", "CheckHostIP=no", "-o", "UpdateHostKeys=no",
                "-o", "IdentitiesOnly=yes", "-o", "IdentityAgent=none",
                "-o", "PreferredAuthentications=publickey", "-o", "PasswordAuthentication=no",
                "-o", "KbdInteractiveAuthentication=no", "-o", "ClearAllForwardings=yes",
                "-o", f"ConnectTimeout={connect}",
                "-o", f"ServerAliveInterval={alive}", "-o", "ServerAliveCountMax=3",
                "-o", "LogLevel=ERROR"]
        for identity in self._identities:
            argv += ["-i", identity]
        argv += ["-p", str(port)]
        if p.ssh_user is not None:
            argv += ["-l", p.ssh_user]
        if p.ssh_request == "subsystem":
            argv += ["-s", "--", host, SUBSYSTEM]
        else:
            argv += ["--", host, REMOTE_COMMAND]
        return argv

    def _pin(self, key_line: str) -> None:
        """Write the known_hosts file (aside, then renamed): one line for our alias."""
        line = f"maildrop-{self.peer_id} {normalize_public_line(key_line)}\n"
        folder = self.known_hosts.parent
        folder.mkdir(mode=0o700, exist_ok=True)
        tmp = folder / f".{self.known_hosts.name}.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(line)
        os.replace(tmp, self.known_hosts)

    def _forget(self, chan: ProcessChannel) -> None:
        with self._lock:
            self._live.discard(chan)

    def _classify(self, chan: ProcessChannel, exc: BaseException, timeout: float) -> MaildropError:
        """Why a channel did not answer its ping, from ssh's stderr (waited for briefly)."""
        chan.tail.done.wait(_REAP)
        said = chan.tail.text()
        where = f"peer {self.peer_id} at {self.address[0]}:{self.address[1]} (ssh)"
        low = said.lower()
        if "host key verification failed" in low or "host identification has changed" in low:
            return HostKeyRefused(f"{where}: host key verification failed: its sshd does not "
                                  f"present the pinned key (peers[].ssh_host_key, else "
                                  f"peers[].key); ssh said: {said}")
        if "permission denied" in low:
            return LoginRefused(f"{where}: our key was refused (is this node's key in its "
                                f"authorized_keys, with the right ssh_user?); ssh said: {said}")
        if isinstance(exc, TimeoutError):
            return SSHChannelFailed(f"{where}: no answer within {timeout:g}s"
                                    + (f"; ssh said: {said}" if said else ""))
        if isinstance(exc, ProtocolError):
            return SSHChannelFailed(f"{where}: the far end does not speak maildrop ({exc})"
                                    + (f"; ssh said: {said}" if said else ""))
        status = chan.exit_status()
        why = _SERVE_EXITS.get(status, f"ssh exit {status}")
        return SSHChannelFailed(f"{where}: the channel closed before the far end answered ({why})"
                                + (f"; ssh said: {said}" if said else ""))

    def _failed(self, error: MaildropError) -> MaildropError:
        """Log ``error`` once per change of its kind; return it (for ``raise``)."""
        reason = type(error).__name__
        with self._lock:
            changed, self._last_reason = reason != self._last_reason, reason
        if changed:
            self._log.warning("openssh.channel.failed peer=%s reason=%s error=%s",
                              self.peer_id, reason, error)
        return error

    def _settled(self) -> None:
        with self._lock:
            was, self._last_reason = self._last_reason, ""
        if was:
            self._log.info("openssh.channel.ok peer=%s (after %s)", self.peer_id, was)


__all__ = ["PERMANENT", "HostKeyRefused", "LoginRefused", "OpenSSHClient", "ProcessChannel",
           "SSHChannelFailed", "SSHClientMissing"]
