"""SSH transport: the one module that imports paramiko.

Owns: the SSH server every agent embeds (listener, login deadline, who may log in, which
channels are served) and the links (``PeerClient``: one long-lived SSH connection per peer,
host-key-pinned when we dial it, used both ways: it hands out ``maildrop`` channels on the
connection we dialed or on the one the peer dialed, and the server's policy serves the
peer's channels on either). Everything above it sees only ``Stream``s, ``peer_id`` strings
and maildrop errors; paramiko exceptions never leave this module.

Channels both ways: an SSH server may open channels towards its client (RFC 4254), but
paramiko's client refuses every "session" channel. ``_Transport._parse_channel_open``
takes them on a logged-in connection we dialed whose ``server_object`` is a
``_ServerSession`` (``SSHServer.dial_session``), so the peer's channels get exactly the
server's policy. Chosen over a reverse request multiplexed on a channel the client opened:
that costs an extra message (and round trip) per channel and a second channel state
machine; this costs one private method, pinned by a test.

Must not import the agent or another edge (eventlog, spool, watcher): the agent implements
``ChannelHandler`` and passes it in.

Layout: errors and ``is_transient``; policy (``_PeerKeys``, ``_ChannelLedger`` and the
paramiko callbacks in ``_ServerSession``, the client's timeouts in ``_Liveness``); plumbing
(sockets, threads: ``SSHServer``, ``_MaildropSubsystem``, ``PeerClient`` and its single-flight
``_Attempt``, ``_CountingSocket``, ``_Pending`` and
``_EvictionLog`` for the connections waiting to log in, and ``_Transport``, which works
around a paramiko rekey livelock, starts channel handlers only once the request that
started them has been answered, and reads through ``_Packetizer``, which bounds packets).

Security invariants:
- Public-key auth only. A client logs in as the peer id it claims (the SSH username) and
  is accepted only if that id is configured AND the key it proves is that peer's key.
- Only a session channel running the ``maildrop`` subsystem (or ``exec maildrop``, for
  OpenSSH clients) reaches the handler; shells, other commands, ptys, env, X11, agent and
  port forwarding are refused. The same holds for the channels a peer opens on a
  connection we dialed: served only after our login succeeded, only for the peer whose
  pinned host key the connection presented, and refused on a client that serves nothing
  (no ``SSHServer.attach``, e.g. ``maildrop check``).
- The client pins the peer's configured key as the only acceptable host key (no TOFU).

Before login (a network attacker needs no key to get this far):
- Every connection must log in within ``login_timeout`` (10 s) of its TCP accept (sshd's
  ``LoginGraceTime``).
- At most ``max_unauthenticated_per_address`` (4) connections wait for a login per source
  address (IPv4 address, IPv6 /64), and ``max_unauthenticated`` (32) in all (sshd's
  ``PerSourceMaxStartups`` and ``MaxStartups``). A new connection is admitted; when a limit
  is reached, an older waiting one is closed instead: a stalled one first (waiting longer
  than ``STALL_FRACTION`` of ``login_timeout``, 2.5 s: an honest client logs in within a few
  round trips), then the least advanced (no key exchange done yet before one that did), then
  the one whose address has the most waiting, then the oldest. So idle TCP connections and
  clients that stall after the key exchange can neither lock out a peer arriving after
  them, nor push out a login under way, and a flood from other addresses evicts its own
  connections first. What can still push a peer's login out is a flood that opens, during
  the peer's key exchange and login (a few round trips), more than 3 connections from the
  peer's own address, or more than 31 fresh ones from addresses that each have no more
  waiting than the peer's; the peer's next attempt gets in.
- Each admitted connection costs two threads (ours and paramiko's) until it logs in or
  ends; evicted ones end within ~0.1 s, but a fast connect flood evicts faster than that.
  So at most ``max_prelogin`` (2 x ``max_unauthenticated``) connections that have not
  logged in may have threads at once; over that, the accept thread closes a new
  connection at once with a reset, before any thread or SSH byte (a peer's attempt then
  fails as transient and is made again: the agent's gossip loop backs off, up to twice
  the gossip interval). A peer already logged in is never affected. Evictions and these
  refusals are logged as counts (``ssh.conn.evicted … reasons=per-address:N,total:N,
  overload:N``): at most one line per ``EVICTION_LOG_EVERY`` seconds.
- Packets are bounded before they are read: ``PREAUTH_MAX_PACKET`` bytes until the login
  succeeds, ``MAX_WIRE_PACKET`` after; the lines before the peer's version string, that one
  included, ``MAX_BANNER_BYTES`` in all. A longer claim ends the connection at once
  (paramiko would buffer a claimed length, up to 4 GiB, by quadratic concatenation).

After login: a channel's handler gets the channel with an I/O timeout of
``channel_idle_timeout``: a peer that sends nothing (or takes nothing) for that long gets
its channel closed, its handler thread back and its channel slot released.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import ipaddress
import logging
import resource
import selectors
import socket
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import paramiko
import paramiko.buffered_pipe
import paramiko.transport

from ..errors import ConfigError, MaildropError
from ..keys import NodeKey, normalize_public_line

SUBSYSTEM = "maildrop"

# The receiver's window bounds throughput at any RTT (measured: 20 ms RTT, 2 -> 32 MiB
# window: 78 -> ~370 MB/s). 128 KiB packets: ~2x 32 KiB on loopback here; 256 KiB were
# slower again (more byte copies). A window is buffered per channel: hence the per-peer channel cap.
WINDOW_SIZE = 32 * 1024 * 1024
MAX_PACKET_SIZE = 128 * 1024
# GCM avoids paramiko's per-packet Python HMAC. paramiko has no chacha20; the CTR modes stay
# for OpenSSH clients (the client's preference order wins the negotiation).
PREFERRED_CIPHERS = (
    "aes128-gcm@openssh.com",
    "aes256-gcm@openssh.com",
    "aes128-ctr",
    "aes192-ctr",
    "aes256-ctr",
)
TCP_KEEPIDLE = 30  # TCP keepalive: dead peer noticed after ~IDLE + INTVL * CNT seconds
TCP_KEEPINTVL = 10
TCP_KEEPCNT = 3
# Liveness of the client's connections derives from one number, ``PeerClient.silence_after``
# (the agent passes gossip.link_down_after): see ``_Liveness``. The server's sockets keep this
# fixed TCP_USER_TIMEOUT (unacknowledged data for this long: the connection is dead).
SERVER_TCP_USER_TIMEOUT = 60.0
DEFAULT_SILENCE_AFTER = 15.0  # seconds; config.DEFAULT_LINK_DOWN_AFTER
MAX_CONNECT_TIMEOUT = 10.0
MIN_CONNECT_TIMEOUT = 1.0  # one SSH handshake on a loaded machine; never less than this
MIN_KEEPALIVE = 1.0

PREAUTH_MAX_PACKET = 35_000  # RFC 4253 6.1: the packet size every implementation must take
MAX_WIRE_PACKET = 256 * 1024  # after login; OpenSSH's own limit, 2x our channels' MAX_PACKET_SIZE
MAX_BANNER_BYTES = 8192  # the peer's version line and any lines before it, in all
EVICTION_LOG_EVERY = 10.0  # seconds between ssh.conn.evicted lines during a flood
STALL_FRACTION = 0.25  # a connection waiting longer than this part of login_timeout is stalled
DEFAULT_CHANNEL_IDLE_TIMEOUT = 60.0  # seconds; the agent passes one derived from gossip timing

_POLL = 0.05  # granularity of the server's login-deadline wait
_DRAIN = 0.25  # how often a connection thread sweeps idle channels and notices a close
_STOP_BUDGET = 2.0
_PRELOGIN_JOIN = 2.0  # at most this long for paramiko's thread of a connection that never logged in


# ---------------------------------------------------------------------------- errors


class PeerUnreachable(MaildropError):
    """Transient: the peer could not be reached or the connection dropped. Retry later."""


class ChannelRefused(PeerUnreachable):
    """Transient: connected, but the peer refused or timed out a channel (e.g. it is busy)."""


class HostKeyMismatch(MaildropError):
    """Permanent: the peer presented a host key other than the configured one."""


class AuthRefused(MaildropError):
    """Permanent: the peer does not accept our node id with our key."""


class PeerIncompatible(MaildropError):
    """Permanent: no common SSH protocol version or algorithms with the peer."""


_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EHOSTUNREACH", "ENETUNREACH", "ENETDOWN", "EHOSTDOWN", "ETIMEDOUT")
    if hasattr(errno, name)
)


def is_transient(exc: BaseException) -> bool:
    """True when retrying the same operation later may succeed (a predicate for tenacity).

    Permanent: HostKeyMismatch, AuthRefused, PeerIncompatible, any other MaildropError,
    paramiko's AuthenticationException / BadHostKeyException / IncompatiblePeer, and local
    OSErrors such as ENOSPC or EACCES. Transient: PeerUnreachable (and ChannelRefused),
    EOFError, ConnectionError, TimeoutError (socket.timeout), other SSHExceptions,
    NoValidConnectionsError and network-unreachable errnos.
    """
    if isinstance(exc, PeerUnreachable):
        return True
    if isinstance(exc, MaildropError):
        return False
    if isinstance(
        exc,
        paramiko.AuthenticationException | paramiko.BadHostKeyException | paramiko.IncompatiblePeer,
    ):
        return False
    if isinstance(exc, paramiko.SSHException | EOFError | ConnectionError | TimeoutError):
        return True
    if isinstance(exc, paramiko.ssh_exception.NoValidConnectionsError | socket.gaierror):
        return True
    return isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS


# ---------------------------------------------------------------------------- interfaces


class Stream(Protocol):
    """What handlers and callers get: a paramiko Channel, duck-typed."""

    def recv(self, n: int) -> bytes: ...
    def sendall(self, data: bytes) -> None: ...
    def settimeout(self, timeout: float | None) -> None: ...
    def close(self) -> None: ...
    def shutdown_write(self) -> None: ...


class ChannelHandler(Protocol):
    """Implemented by the agent; the transport calls it, never the other way round."""

    def handle_channel(self, peer_id: str, channel: Stream) -> None:
        """Serve one channel from an authenticated ``peer_id``.

        Runs on its own worker thread (never the paramiko Transport thread), so it may
        block. The channel comes with an I/O timeout of the server's
        ``channel_idle_timeout``: ``recv``/``sendall`` raise TimeoutError when the peer
        sends (or takes) nothing for that long, and the handler should then return; it
        must not lengthen the timeout. The transport closes the channel after this
        returns or raises; an exception is logged and never takes the server down.
        """
        ...


# ---------------------------------------------------------------------------- helpers


def _key_blob(line: str) -> bytes:
    """The SSH wire blob of an ``ssh-ed25519 AAAA...`` line; ValueError if it is not one."""
    return base64.b64decode(normalize_public_line(line).split()[1])


def _fingerprint(blob: bytes) -> str:
    digest = base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    return f"SHA256:{digest}"


def _tune_socket(sock: socket.socket, user_timeout: float) -> None:
    """TCP_NODELAY (paramiko never sets it: ~40 ms Nagle stalls), TCP keepalive, and
    TCP_USER_TIMEOUT of ``user_timeout`` seconds (data unacknowledged that long, or a zero
    window that long: the kernel ends the connection)."""
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (
        ("TCP_KEEPIDLE", TCP_KEEPIDLE),
        ("TCP_KEEPINTVL", TCP_KEEPINTVL),
        ("TCP_KEEPCNT", TCP_KEEPCNT),
    ):
        _set_tcp_option(sock, name, value)
    _set_user_timeout(sock, user_timeout)


def _set_user_timeout(sock: object, seconds: float) -> None:
    _set_tcp_option(sock, "TCP_USER_TIMEOUT", max(1, round(seconds * 1000)))


def _set_tcp_option(sock: object, name: str, value: int) -> None:
    option = getattr(socket, name, None)
    if option is not None:
        with contextlib.suppress(OSError):  # not every kernel has every option
            sock.setsockopt(socket.IPPROTO_TCP, option, value)  # type: ignore[attr-defined]


@dataclass(frozen=True)
class _Liveness:
    """The client's timeouts, all derived from ``silence_after`` (L): TCP_USER_TIMEOUT = L;
    an SSH keepalive after max(1, L/3) s without sending, so an idle connection always has
    data in flight and a peer that vanished (no ACKs) is cut by the kernel within ~4/3 L;
    one connection attempt (TCP connect, SSH handshake, login) within min(10, L/2) s, at
    least 1 s. A peer that is gone while its kernel still ACKs (a frozen process) is not
    seen here: the callers' channel read timeouts (``PeerClient.silence_after``) see it."""

    silence_after: float
    connect_timeout: float
    keepalive: float

    @classmethod
    def of(cls, silence_after: float, connect_timeout: float | None = None) -> _Liveness:
        if not silence_after > 0:
            raise ValueError(f"silence_after must be > 0 seconds, not {silence_after!r}")
        if connect_timeout is None:
            connect_timeout = max(MIN_CONNECT_TIMEOUT, min(MAX_CONNECT_TIMEOUT, silence_after / 2))
        return cls(silence_after, connect_timeout, max(MIN_KEEPALIVE, silence_after / 3))

    def apply(self, transport: paramiko.Transport) -> None:
        """Set the keepalive and TCP_USER_TIMEOUT of a (live) client connection."""
        transport.set_keepalive(self.keepalive)  # type: ignore[arg-type]  # float works
        _set_user_timeout(transport.sock, self.silence_after)


def _answer_then_start(chan: paramiko.Channel, m: paramiko.Message) -> None:
    """Transport thread: handle a channel request (paramiko calls the ``check_channel_*``
    callback and sends the reply), then start the handler the callback claimed, if any."""
    try:
        paramiko.Channel._handle_request(chan, m)
    finally:
        session = getattr(chan.transport, "server_object", None)
        if isinstance(session, _ServerSession):
            session.start_claimed(chan)


class _Packetizer(paramiko.Packetizer):
    """paramiko's Packetizer with bounded reads: a packet longer than the limit, or a
    version banner longer than ``MAX_BANNER_BYTES``, raises SSHException (the connection
    ends) before anything is buffered. The limit is ``PREAUTH_MAX_PACKET`` until
    ``logged_in()`` (set by ``_Transport``) says the login succeeded, then
    ``MAX_WIRE_PACKET``.

    Hooks: every packet body is read by one ``read_all(n)`` (``n`` is the claimed length
    less the first block, plus the MAC); the banner lines only through ``_read_timeout``.
    Both are paramiko internals; the tests with a huge claimed length and an endless
    banner keep this honest on upgrades. The handshake timeout is a deadline, not a timer
    thread (``start_handshake``, ``handshake_timed_out``, ``complete_handshake``, the three
    methods paramiko uses for it; a flood test counts the agent's threads).
    """

    def __init__(self, sock: object) -> None:
        super().__init__(sock)
        self.logged_in: Callable[[], bool] = lambda: False
        self._banner_bytes = 0  # touched by the Transport thread only
        self._handshake_deadline: float | None = None  # likewise
        self._handshake_done = False

    # paramiko times the handshake with a threading.Timer (15 s) that only a finished
    # handshake cancels: every connection that ended before (evicted, refused, cut) left a
    # sleeping thread behind for 15 s -- hundreds during a connect flood. A deadline read
    # where paramiko asks does the same without a thread.
    def start_handshake(self, timeout: float) -> None:
        if self._handshake_deadline is None:
            self._handshake_deadline = time.monotonic() + float(timeout)

    def handshake_timed_out(self) -> bool:
        deadline = self._handshake_deadline
        return deadline is not None and not self._handshake_done and time.monotonic() >= deadline

    def complete_handshake(self) -> None:
        self._handshake_done = True

    def read_all(self, n: int, check_rekey: bool = False) -> bytes:
        limit = MAX_WIRE_PACKET if self.logged_in() else PREAUTH_MAX_PACKET
        if n > limit:
            raise paramiko.SSHException(f"packet of {n} bytes is over the limit of {limit}")
        return super().read_all(n, check_rekey)

    def _read_timeout(self, timeout: float) -> bytes:
        data = super()._read_timeout(timeout)
        self._banner_bytes += len(data)
        if self._banner_bytes > MAX_BANNER_BYTES:
            raise paramiko.SSHException(f"banner over the limit of {MAX_BANNER_BYTES} bytes")
        return data


class _ChunkPipe(paramiko.buffered_pipe.BufferedPipe):
    """A channel's receive buffer that keeps the packets it is fed as they came (a deque of
    ``bytes``) instead of paramiko's one ``array`` of bytes.

    paramiko's ``BufferedPipe.read(n)`` copies the first ``n`` bytes out and then deletes
    them from the front of its array, moving everything behind them: with our 32 MiB window
    full (a receiver busy hashing and writing), every 1 MiB read moved up to 31 MiB, and the
    profile of a 1 GiB hop showed half of the receiving thread's GIL time there. Here a read
    joins whole packets (one copy of what it returns) and splits at most one; nothing else
    moves. Same interface and semantics (timeouts, close, the event); ``_lock`` (paramiko's,
    a leaf lock) guards ``_chunks`` and ``_size`` as it guards paramiko's buffer."""

    def __init__(self) -> None:
        super().__init__()
        self._chunks: deque[bytes] = deque()
        self._size = 0

    def _buffer_frombytes(self, data: bytes) -> None:  # called by feed, under _lock
        if data:
            self._chunks.append(bytes(data))
            self._size += len(data)

    def _take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes off the front; the caller holds ``_lock``."""
        out: list[bytes] = []
        want = limit
        while want and self._chunks:
            head = self._chunks[0]
            if len(head) <= want:
                out.append(self._chunks.popleft())
                want -= len(head)
            else:
                out.append(head[:want])
                self._chunks[0] = head[want:]
                want = 0
        self._size -= limit - want
        if not self._size and self._event is not None and not self._closed:
            self._event.clear()
        return out[0] if len(out) == 1 else b"".join(out)

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        with self._lock:
            if not self._size:
                if self._closed:
                    return b""
                if timeout == 0.0:
                    raise paramiko.buffered_pipe.PipeTimeout()
                deadline = None if timeout is None else time.monotonic() + timeout
                while not self._size and not self._closed:
                    left = None if deadline is None else deadline - time.monotonic()
                    if left is not None and left <= 0:
                        raise paramiko.buffered_pipe.PipeTimeout()
                    self._cv.wait(left)
                if not self._size:
                    return b""  # closed while waiting
            return self._take(nbytes)

    def read_ready(self) -> bool:
        with self._lock:
            return self._size > 0

    def empty(self) -> bytes:
        with self._lock:
            return self._take(self._size)

    def set_event(self, event: threading.Event) -> None:
        with self._lock:
            self._event = event
            if self._closed or self._size:
                event.set()
            else:
                event.clear()

    def __len__(self) -> int:
        with self._lock:
            return self._size


class _Channels(paramiko.transport.ChannelMap):
    """paramiko's map of a connection's channels, which gives every channel put in it a
    ``_ChunkPipe`` as its receive buffers. paramiko puts a channel here (both when we open
    it and when the peer does) before the Transport thread can route a byte to it, so the
    swap never races a feed. A test checks the map of a real transport (and paramiko's calls)."""

    def put(self, chanid: int, chan: paramiko.Channel) -> None:
        chan.in_buffer, chan.in_stderr_buffer = _ChunkPipe(), _ChunkPipe()
        super().put(chanid, chan)


class _Transport(paramiko.Transport):
    """paramiko.Transport without the rekey livelock of paramiko issue #822, and whose
    channel handlers start only after the request that started them has been answered.

    When this side starts a key re-exchange (every 2**29 bytes) and the peer's
    CHANNEL_CLOSE (or a channel request wanting a reply) is already in flight, paramiko
    answers it from the Transport thread through ``_send_user_message``, which waits for
    the key exchange to finish, which only that same thread can drive: a 30 s stall, then
    the connection dies. Measured here: one in ~30 short channels with frequent rekeys.

    Fix: on the Transport thread, during a key exchange, queue such a message and send it
    right after our NEWKEYS (RFC 4253 7.1 allows any message once NEWKEYS is sent), before
    user threads are let through again, so the order on the wire is kept. Overrides two
    private methods; a test forces frequent rekeys to keep this honest on upgrades.

    Handler start: paramiko answers a channel request (CHANNEL_SUCCESS) only after the
    ``check_channel_*_request`` callback returns, and its ``SubsystemHandler`` starts the
    handler thread inside that callback. A handler that answers and closes at once could
    then put its data, exit-status and CHANNEL_CLOSE on the wire before the SUCCESS: the
    client saw a closed channel, i.e. "refused the maildrop subsystem", and lost the answer
    (measured: 41 of 200 channels whose handler only sends 2 bytes). So the callback only
    claims the channel, and the channel-request dispatch entry below starts the handler
    after paramiko has sent the reply. Replaces one entry of a private table; a test with
    an instant handler keeps this honest on upgrades.

    Reads go through ``_Packetizer`` (bounded packets and banner); channels receive into
    ``_ChunkPipe`` buffers (``_Channels``).
    """

    _channel_handler_table = {
        **paramiko.Transport._channel_handler_table,
        paramiko.common.MSG_CHANNEL_REQUEST: _answer_then_start,
    }

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, packetizer_class=_Packetizer, **kwargs)
        self.packetizer.logged_in = self.is_authenticated
        self._channels = _Channels()
        self._during_kex: list[paramiko.Message] = []  # touched by the Transport thread only

    def _parse_channel_open(self, m: paramiko.Message) -> None:
        """Serve the peer's ``session`` channels on a connection we dialed, as the server
        serves ours: paramiko's client refuses every channel kind it has no handler of its
        own for. Only a logged-in client connection whose ``server_object`` is a
        ``_ServerSession`` (``SSHServer.dial_session``) takes them, under that session's
        policy (channel ledger, subsystem check, idle timeouts); every other case is
        paramiko's. Mirrors the accept path of paramiko's server branch (private: a test
        with a real server opening a channel towards its client keeps this honest)."""
        session = self.server_object
        kind = m.get_text()
        m.rewind()
        if self.server_mode or not isinstance(session, _ServerSession) or kind != "session" \
                or not self.is_authenticated():
            super()._parse_channel_open(m)
            return
        m.get_text()
        chanid, window, max_packet = m.get_int(), m.get_int(), m.get_int()
        with self.lock:
            my_chanid = self._next_channel()
        reason = session.check_channel_request(kind, my_chanid)
        if reason != paramiko.OPEN_SUCCEEDED:
            reply = paramiko.Message()
            reply.add_byte(paramiko.common.cMSG_CHANNEL_OPEN_FAILURE)
            reply.add_int(chanid)
            reply.add_int(reason)
            reply.add_string("")
            reply.add_string("en")
            self._send_message(reply)
            return
        chan = paramiko.Channel(my_chanid)
        with self.lock:
            self._channels.put(my_chanid, chan)
            self.channels_seen[my_chanid] = True
            chan._set_transport(self)
            chan._set_window(self.default_window_size, self.default_max_packet_size)
            chan._set_remote_channel(chanid, window, max_packet)
        reply = paramiko.Message()
        reply.add_byte(paramiko.common.cMSG_CHANNEL_OPEN_SUCCESS)
        reply.add_int(chanid)
        reply.add_int(my_chanid)
        reply.add_int(self.default_window_size)
        reply.add_int(self.default_max_packet_size)
        self._send_message(reply)
        self._queue_incoming_channel(chan)

    def _send_user_message(self, data: paramiko.Message) -> None:
        if threading.current_thread() is self and not self.clear_to_send.is_set():
            self._during_kex.append(data)
            return
        super()._send_user_message(data)

    def _activate_outbound(self) -> None:
        super()._activate_outbound()  # sends NEWKEYS, switches outbound keys
        queued, self._during_kex = self._during_kex, []
        for data in queued:
            self._send_message(data)


def _new_transport(sock: object) -> paramiko.Transport:
    transport = _Transport(
        sock, default_window_size=WINDOW_SIZE, default_max_packet_size=MAX_PACKET_SIZE
    )
    options = transport.get_security_options()
    available = tuple(options.ciphers)
    options.ciphers = tuple(c for c in PREFERRED_CIPHERS if c in available)
    return transport


def _load_pkey(key: NodeKey) -> paramiko.PKey:
    try:
        return paramiko.PKey.from_path(key.path)
    except (OSError, paramiko.SSHException, ValueError) as exc:
        raise ConfigError(f"{key.path}: paramiko cannot load the node key ({exc})") from None


def _quiet_paramiko() -> None:
    """paramiko logs expected failures (port scans, dropped clients) as ERROR tracebacks;
    we log one line of our own instead. An explicitly configured level is left alone."""
    paramiko_logger = logging.getLogger("paramiko")
    if paramiko_logger.level == logging.NOTSET:
        paramiko_logger.setLevel(logging.CRITICAL)


def _safe(text: str, limit: int = 64) -> str:
    """A client-controlled string made fit for one log field (no spaces, no newlines)."""
    cleaned = "".join(c if c.isprintable() and not c.isspace() else "?" for c in text[:limit])
    return cleaned + ("..." if len(text) > limit else "")


def _address_bucket(host: str) -> str:
    """The unit of the per-address login limit: an IPv4 address (IPv4-mapped included), or
    an IPv6 /64 (one host often holds a whole /64). Unparsable text stands for itself."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


def _hang_up(sock: socket.socket) -> None:
    """Close an accepted socket with a reset (SO_LINGER 0): no FIN handshake, no TIME_WAIT
    kept by this side for a connection that is refused unheard."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _reason(exc: BaseException | None) -> str:
    if exc is None:
        return "connection closed"
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------- policy


@dataclass(frozen=True)
class _PeerKeys:
    """The authorized peers: peer id -> key blob. Immutable; replaced whole."""

    by_peer: Mapping[str, bytes]
    owner_of: Mapping[bytes, str]

    @classmethod
    def parse(cls, authorized: Mapping[str, str]) -> _PeerKeys:
        by_peer: dict[str, bytes] = {}
        for peer_id, line in authorized.items():
            try:
                by_peer[peer_id] = _key_blob(line)
            except ValueError as exc:
                raise ConfigError(f"authorized key of peer {peer_id}: {exc}") from None
        return cls(by_peer, {blob: peer for peer, blob in by_peer.items()})

    def refusal(self, username: str, blob: bytes) -> str | None:
        """None when ``username`` may log in with ``blob``; else a stable reason word."""
        expected = self.by_peer.get(username)
        if expected is not None and expected == blob:
            return None
        if blob in self.owner_of:
            return "key-of-other-peer"
        if expected is None:
            return "unknown-peer"
        return "unknown-key"


class _ChannelLedger:
    """Open channels per peer, across all its connections, capped. Thread-safe."""

    def __init__(self, cap: int) -> None:
        self._cap = cap
        self._lock = threading.Lock()
        self._open: dict[str, int] = {}

    def try_acquire(self, peer_id: str) -> bool:
        with self._lock:
            count = self._open.get(peer_id, 0)
            if count >= self._cap:
                return False
            self._open[peer_id] = count + 1
            return True

    def release(self, peer_id: str) -> None:
        with self._lock:
            count = self._open.get(peer_id, 0) - 1
            if count > 0:
                self._open[peer_id] = count
            else:
                self._open.pop(peer_id, None)


@dataclass
class _Slot:
    """One session channel of a connection, from open until it is released."""

    opened_at: float
    channel: paramiko.Channel | None = None
    started: bool = False  # claimed by a subsystem/exec request: it has (or gets) a handler
    start_pending: bool = False  # claimed, handler not started yet (see _answer_then_start)


@dataclass(eq=False)
class _Pending:
    """One accepted connection that has not logged in yet (identity-hashed)."""

    bucket: str  # see _address_bucket
    sock: socket.socket
    accepted_at: float
    negotiated: threading.Event = field(default_factory=threading.Event)  # kex done or failed
    transport: paramiko.Transport | None = None  # set by the connection thread
    evicted: bool = False  # closed to make room: its end is counted, not logged
    counted: bool = False  # holds one unit of SSHServer._prelogin until it logs in or ends

    def logged_in(self) -> bool:
        transport = self.transport
        return transport is not None and transport.is_authenticated()

    def stalled(self, now: float, stall_after: float) -> bool:
        """Waiting for a login for longer than an honest client takes (``stall_after``)."""
        return now - self.accepted_at > stall_after

    def rank(self, now: float, stall_after: float) -> tuple[int, int, float]:
        """Eviction order among one address's connections: stalled first, then not past
        kex, then the oldest."""
        return (0 if self.stalled(now, stall_after) else 1, 1 if self.negotiated.is_set() else 0,
                self.accepted_at)

    def shut(self) -> None:
        """Wake the connection's threads (paramiko's read sees EOF); they clean up."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


class _EvictionLog:
    """``ssh.conn.evicted`` as counts: the first eviction after a quiet spell is logged at
    once, the ones that follow as one line per ``every`` seconds (count, how many addresses
    -- counted up to ``_MAX_BUCKETS`` -- the busiest one, the reasons). Used by the accept
    thread only."""

    _MAX_BUCKETS = 1024

    def __init__(self, log: logging.Logger, every: float) -> None:
        self._log = log
        self._every = every
        self._quiet_until = 0.0
        self._buckets: Counter[str] = Counter()
        self._reasons: Counter[str] = Counter()

    def note(self, now: float, reason: str, bucket: str) -> None:
        self._reasons[reason] += 1
        if bucket in self._buckets or len(self._buckets) < self._MAX_BUCKETS:
            self._buckets[bucket] += 1
        self.flush(now)

    def flush(self, now: float, force: bool = False) -> None:
        if not self._reasons or (now < self._quiet_until and not force):
            return
        top, _ = self._buckets.most_common(1)[0]
        self._log.warning(
            "ssh.conn.evicted count=%d addrs=%d top_addr=%s reasons=%s",
            sum(self._reasons.values()), len(self._buckets), top,
            ",".join(f"{r}:{n}" for r, n in sorted(self._reasons.items())),
        )
        self._buckets.clear()
        self._reasons.clear()
        self._quiet_until = now + self._every


class _ServerSession(paramiko.ServerInterface):
    """The policy for one incoming connection: paramiko calls these on its Transport
    thread, so they decide and return at once (handlers run on their own threads).

    The same policy serves the peer's channels on a connection this node dialed
    (``dialed``; ``peer_id`` and ``key_blob`` are then the dialed peer and its pinned host
    key from the start, see ``SSHServer.dial_session``).

    Invariant: every slot in ``_slots`` holds one unit of the peer's ledger count, and is
    released exactly once (handler done, channel closed, idle sweep, or connection end).
    """

    def __init__(self, server: SSHServer, transport: paramiko.Transport, addr: str,
                 counter: _ByteCounter | None = None) -> None:
        self.server = server
        self.transport = transport
        self.addr = addr
        self.counter = counter or _ByteCounter()  # raw bytes of this connection
        self.peer_id: str | None = None
        self.key_blob: bytes | None = None
        self.dialed = False
        self._lock = threading.Lock()
        self._slots: dict[int, _Slot] = {}
        self._closed = False

    # --- bookkeeping (called from plumbing threads too)

    def attach(self, channel: paramiko.Channel) -> None:
        with self._lock:
            slot = self._slots.get(channel.get_id())
            if slot is not None and slot.channel is None:
                slot.channel = channel

    def release(self, chanid: int) -> None:
        with self._lock:
            slot = self._slots.pop(chanid, None)
        if slot is not None and self.peer_id is not None:
            self.server._ledger.release(self.peer_id)

    def reclaim_closed(self) -> None:
        """Release channels that closed without ever running a handler (refused requests,
        abandoned opens). A handler's channel keeps its slot until the handler returns."""
        with self._lock:
            closed = [
                chanid for chanid, slot in self._slots.items()
                if not slot.started and slot.channel is not None and slot.channel.closed
            ]
        for chanid in closed:
            self.release(chanid)

    def sweep(self, now: float, idle_limit: float) -> None:
        """``reclaim_closed``, and close channels that never asked for the maildrop
        subsystem within ``idle_limit`` (they would hold a slot and a 32 MiB window)."""
        self.reclaim_closed()
        with self._lock:
            idle = [
                (chanid, slot.channel) for chanid, slot in self._slots.items()
                if not slot.started and now - slot.opened_at > idle_limit
            ]
        for chanid, channel in idle:
            self.server._log.warning(
                "ssh.channel.idle peer=%s chan=%d reason=no-request addr=%s",
                self.peer_id, chanid, self.addr,
            )
            if channel is not None:
                channel.close()
            self.release(chanid)

    def release_all(self) -> None:
        with self._lock:
            self._closed = True
            chanids = list(self._slots)
        for chanid in chanids:
            self.release(chanid)

    def _refuse(self, reason: str, **fields: object) -> None:
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        self.server._log.warning(
            "ssh.channel.refused peer=%s reason=%s%s addr=%s", self.peer_id, reason, extra, self.addr
        )

    # --- authentication

    def get_allowed_auths(self, username: str) -> str:
        return "publickey"

    def check_auth_publickey(self, username: str, key: paramiko.PKey) -> int:
        # paramiko verifies the signature after (or asks for one because of) this answer.
        blob = key.asbytes()
        reason = self.server._peers.refusal(username, blob)
        if reason is not None:
            owner = self.server._peers.owner_of.get(blob)
            self.server._log.warning(
                "ssh.auth.refused peer=%s reason=%s%s key=%s addr=%s",
                _safe(username), reason, f" key_owner={owner}" if owner else "",
                _fingerprint(blob), self.addr,
            )
            return paramiko.AUTH_FAILED
        self.peer_id, self.key_blob = username, blob
        return paramiko.AUTH_SUCCESSFUL

    # --- channels: only sessions, only the maildrop subsystem

    def check_channel_request(self, kind: str, chanid: int) -> int:
        if kind != "session":
            self._refuse("channel-kind", kind=_safe(kind, 32))
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        peer_id = self.peer_id  # paramiko refuses channel opens before auth: set by now
        if peer_id is None or self._closed:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        ledger = self.server._ledger
        if not ledger.try_acquire(peer_id):
            # Closed channels are otherwise reclaimed by the next sweep; do it now.
            self.server._reclaim(peer_id)
            if not ledger.try_acquire(peer_id):
                self._refuse("too-many-channels", limit=self.server._max_channels_per_peer)
                return paramiko.OPEN_FAILED_RESOURCE_SHORTAGE
        with self._lock:
            if not self._closed:
                self._slots[chanid] = _Slot(opened_at=time.monotonic())
                return paramiko.OPEN_SUCCEEDED
        ledger.release(peer_id)
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def _claim(self, channel: paramiko.Channel) -> bool:
        """Mark the channel's one handler as started; False if it already has one. The
        handler thread is started by :meth:`start_claimed` once the request is answered."""
        with self._lock:
            slot = self._slots.get(channel.get_id())
            if slot is None or slot.started:
                return False
            slot.started = True
            slot.start_pending = True
            slot.channel = channel
            return True

    def start_claimed(self, channel: paramiko.Channel) -> None:
        """Transport thread, after the reply to a channel request was sent: start the
        handler that request claimed (no-op if it claimed none or the slot is gone)."""
        with self._lock:
            slot = self._slots.get(channel.get_id())
            if slot is None or slot.channel is not channel or not slot.start_pending:
                return
            slot.start_pending = False
        _MaildropSubsystem(channel, SUBSYSTEM, self).start()

    def check_channel_subsystem_request(self, channel: paramiko.Channel, name: str) -> bool:
        self.attach(channel)
        if name != SUBSYSTEM:
            self._refuse("subsystem", name=_safe(name, 32))
            return False
        if not self._claim(channel):
            self._refuse("already-started")
            return False
        return True  # the handler starts once paramiko has sent the SUCCESS reply

    def check_channel_exec_request(self, channel: paramiko.Channel, command: bytes) -> bool:
        # OpenSSH clients without -s send "exec maildrop"; nothing else runs.
        self.attach(channel)
        if command != SUBSYSTEM.encode():
            self._refuse("exec", command=_safe(bytes(command).decode("utf-8", "replace"), 40))
            return False
        if not self._claim(channel):
            self._refuse("already-started")
            return False
        return True  # the handler starts once paramiko has sent the SUCCESS reply

    def check_channel_shell_request(self, channel: paramiko.Channel) -> bool:
        self.attach(channel)
        self._refuse("shell")
        return False

    def check_channel_pty_request(
        self, channel: paramiko.Channel, term: bytes, width: int, height: int,
        pixelwidth: int, pixelheight: int, modes: bytes,
    ) -> bool:
        self.attach(channel)
        self._refuse("pty")
        return False

    def check_channel_env_request(self, channel: paramiko.Channel, name: bytes, value: bytes) -> bool:
        self.attach(channel)
        return False  # OpenSSH sends LANG etc. routinely: refuse quietly

    def check_channel_x11_request(
        self, channel: paramiko.Channel, single_connection: bool, auth_protocol: str,
        auth_cookie: bytes, screen_number: int,
    ) -> bool:
        self.attach(channel)
        self._refuse("x11")
        return False

    def check_channel_forward_agent_request(self, channel: paramiko.Channel) -> bool:
        self.attach(channel)
        self._refuse("agent-forwarding")
        return False

    def check_channel_window_change_request(
        self, channel: paramiko.Channel, width: int, height: int, pixelwidth: int, pixelheight: int
    ) -> bool:
        return False

    def check_channel_direct_tcpip_request(self, chanid: int, origin: tuple, destination: tuple) -> int:
        self._refuse("direct-tcpip")
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_port_forward_request(self, address: str, port: int) -> bool:
        self._refuse("port-forwarding")
        return False

    def check_global_request(self, kind: str, msg: paramiko.Message) -> bool:
        return False  # keepalives want a reply; a failure reply is a valid one


class _MaildropSubsystem(paramiko.SubsystemHandler):
    """One worker thread per maildrop channel: runs the handler, then closes the channel."""

    def __init__(self, channel: paramiko.Channel, name: str, server: _ServerSession) -> None:
        super().__init__(channel, name, server)
        self._session = server
        self._channel = channel
        self._status = 1
        self.name = f"maildrop-ssh-chan-{server.peer_id}-{channel.get_id()}"
        self.daemon = True
        server.server._add_worker(self)

    def start_subsystem(self, name: str, transport: paramiko.Transport, channel: paramiko.Channel) -> None:
        session = self._session
        log = session.server._log
        try:
            channel.settimeout(session.server._channel_idle_timeout)
            session.server._handler.handle_channel(session.peer_id or "", channel)
            self._status = 0
        except TimeoutError:  # the idle timeout set above did its job: no crash
            log.warning(
                "ssh.channel.idle peer=%s chan=%d reason=timeout seconds=%g addr=%s",
                session.peer_id, channel.get_id(), session.server._channel_idle_timeout, session.addr,
            )
        except MaildropError as exc:
            log.warning("ssh.channel.handler-failed peer=%s error=%s", session.peer_id, _reason(exc))
        except Exception:
            log.exception("ssh.channel.handler-crashed peer=%s", session.peer_id)

    def finish_subsystem(self) -> None:
        channel = self._channel
        try:
            if not channel.closed:
                channel.send_exit_status(self._status)  # OpenSSH `ssh ... maildrop` wants one
        except Exception:
            pass  # the peer may be gone already
        # Free the slot before the client can see the CLOSE and open the next channel.
        self._session.release(channel.get_id())
        try:
            channel.close()
        finally:
            self._session.server._remove_worker(self)


# ---------------------------------------------------------------------------- server


def raise_open_files_limit() -> tuple[int, int]:
    """Raise this process's soft RLIMIT_NOFILE to its hard limit (the common soft default,
    1024, is the first thing a connection flood or a busy node runs into; the server's own
    bounds keep the real use far below). Returns (soft before, soft now); a limit that
    cannot be raised is left as it was."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft == hard:
        return soft, soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        return soft, soft
    return soft, hard



class SSHServer:
    """The agent's SSH listener. Each connection gets its own thread, so a slow or hostile
    client never stalls another; each channel gets its own worker thread.

    Limits: at most ``max_unauthenticated`` connections between TCP accept and successful
    login, and ``max_unauthenticated_per_address`` from one address; at a limit the new
    connection is admitted and an older waiting one closed (the order is in the module
    docstring); at most ``max_prelogin`` (default 2 x ``max_unauthenticated``) connections
    not logged in hold threads (waiting or evicted and still ending), over that a new one
    is closed at once, unheard. Login must complete within ``login_timeout`` seconds of the TCP accept; at
    most ``max_channels_per_peer`` open channels per peer; a channel that has not asked for
    the maildrop subsystem ``channel_request_timeout`` seconds (default: ``login_timeout``)
    after it was opened is closed and gives back its slot; a served channel on which the
    peer sends (or takes) nothing for ``channel_idle_timeout`` seconds is closed (its
    handler sees TimeoutError) and gives back its slot. Make that timeout longer than the
    longest pause a client leaves between two messages on a channel it keeps open.
    """

    def __init__(
        self,
        key: NodeKey,
        listen: tuple[str, int],
        authorized: Mapping[str, str],
        handler: ChannelHandler,
        *,
        login_timeout: float = 10.0,
        channel_request_timeout: float | None = None,
        channel_idle_timeout: float = DEFAULT_CHANNEL_IDLE_TIMEOUT,
        max_unauthenticated: int = 32,
        max_unauthenticated_per_address: int = 4,
        max_prelogin: int | None = None,
        max_channels_per_peer: int = 16,
        logger: logging.Logger | None = None,
    ) -> None:
        _quiet_paramiko()
        self._host_key = _load_pkey(key)
        self._listen = listen
        self._peers = _PeerKeys.parse(authorized)
        self._handler = handler
        self._login_timeout = login_timeout
        self._channel_request_timeout = (
            login_timeout if channel_request_timeout is None else channel_request_timeout
        )
        self._channel_idle_timeout = channel_idle_timeout
        self._max_channels_per_peer = max_channels_per_peer
        self._max_unauthenticated = max_unauthenticated
        self._max_unauthenticated_per_address = max_unauthenticated_per_address
        self._max_prelogin = 2 * max_unauthenticated if max_prelogin is None else max_prelogin
        self._stall_after = login_timeout * STALL_FRACTION
        self._log = logger or logging.getLogger(__name__)
        self._ledger = _ChannelLedger(max_channels_per_peer)
        self._evictions = _EvictionLog(self._log, EVICTION_LOG_EVERY)
        self._lock = threading.Lock()
        self._pending: set[_Pending] = set()  # accepted, not logged in; guarded by _lock
        # Connections with a thread that have not logged in: the pending ones and the evicted
        # ones whose threads are still ending. Guarded by _lock.
        self._prelogin = 0
        self._stopping = threading.Event()
        self._sessions: set[_ServerSession] = set()  # guarded by _lock
        self._clients: dict[str, PeerClient] = {}  # peer id -> its link's client; guarded by _lock
        self._threads: set[threading.Thread] = set()
        self._listener: socket.socket | None = None
        self._wake_r: socket.socket | None = None
        self._wake_w: socket.socket | None = None
        self._accept_thread: threading.Thread | None = None
        self._bound: tuple[str, int] | None = None

    @property
    def address(self) -> tuple[str, int]:
        """The bound (host, port) once started (the real port when 0 was asked for)."""
        return self._bound if self._bound is not None else self._listen

    def start(self) -> None:
        """Bind, listen and start accepting. MaildropError with one line if it cannot."""
        if self._accept_thread is not None:
            raise MaildropError("SSH server already started")
        host, port = self._listen
        try:
            family, kind, proto, _, sockaddr = socket.getaddrinfo(
                host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
            )[0]
            listener = socket.socket(family, kind, proto)
        except OSError as exc:
            raise MaildropError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        try:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind(sockaddr)
            listener.listen(128)
            listener.setblocking(False)
        except OSError as exc:
            listener.close()
            raise MaildropError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
        self._listener = listener
        self._bound = listener.getsockname()[:2]
        self._wake_r, self._wake_w = socket.socketpair()
        self._accept_thread = threading.Thread(
            target=self._accept_loop, name=f"maildrop-ssh-accept-{self._bound[1]}", daemon=True
        )
        self._accept_thread.start()
        self._log.info("ssh.server.listening addr=%s:%d", *self._bound)

    def set_authorized(self, authorized: Mapping[str, str]) -> None:
        """Replace the allowed peers. New logins see the new set at once; connected peers
        that are no longer allowed with the key they logged in with are disconnected."""
        peers = _PeerKeys.parse(authorized)
        with self._lock:
            self._peers = peers
            stale = [
                s for s in self._sessions
                if s.peer_id is not None and s.key_blob is not None
                and peers.refusal(s.peer_id, s.key_blob) is not None
            ]
        for session in stale:
            self._log.warning("ssh.peer.deauthorized peer=%s addr=%s", session.peer_id, session.addr)
            session.transport.close()

    def attach(self, client: PeerClient) -> None:
        """Make ``client`` its peer's link: the connections that peer makes to us are
        handed to it (its ``open_channel`` uses them), and on the connections it dials the
        peer's channels are served here, as on ours. A connection of that peer logged in
        already is handed over at once. Call before ``start`` for the configured peers."""
        with self._lock:
            self._clients[client.peer_id] = client
            live = [s for s in self._sessions if s.peer_id == client.peer_id and not s.dialed
                    and s.transport.is_authenticated()]
        client.serve_on(self)
        for session in live:
            client.adopt(session.transport, session.counter)

    def detach(self, client: PeerClient) -> None:
        """Undo ``attach`` (a reload retired the link); its connections are the client's to close."""
        with self._lock:
            if self._clients.get(client.peer_id) is client:
                del self._clients[client.peer_id]
        client.serve_on(None)

    def dial_session(self, transport: paramiko.Transport, peer_id: str, peer_blob: bytes,
                     addr: str, counter: _ByteCounter) -> None:
        """Before a client handshake: the policy that serves ``peer_id``'s channels on this
        dialed connection once it has logged in (see ``_Transport._parse_channel_open``).
        ``serve_dialed`` starts serving them after the login."""
        session = _ServerSession(self, transport, addr, counter)
        session.peer_id, session.key_blob, session.dialed = peer_id, peer_blob, True
        transport.server_object = session

    def serve_dialed(self, transport: paramiko.Transport, client: PeerClient) -> None:
        """After a login on a connection ``client`` dialed (with ``dial_session``): a thread
        takes the channels the peer opens and sweeps them, as for an incoming connection,
        and closes the connection once it is a duplicate with no channel left
        (``PeerClient.redundant``)."""
        session = transport.server_object
        if not isinstance(session, _ServerSession):
            return
        with self._lock:
            if self._stopping.is_set():
                session = None
            else:
                self._sessions.add(session)
        if session is None:
            transport.close()
            return
        thread = threading.Thread(target=self._serve_dialed, args=(session, client),
                                  name=f"maildrop-ssh-dialed-{client.peer_id}", daemon=True)
        self._add_worker(thread)
        thread.start()

    def _serve_dialed(self, session: _ServerSession, client: PeerClient) -> None:
        transport = session.transport
        try:
            while transport.is_active() and not self._stopping.is_set():
                channel = transport.accept(_DRAIN)
                if channel is not None:
                    session.attach(channel)
                session.sweep(time.monotonic(), self._channel_request_timeout)
                if client.redundant(transport):
                    self._log.info("ssh.link.duplicate-closed peer=%s addr=%s (both ends dialed; "
                                   "the connection %s dialed is kept)", session.peer_id, session.addr,
                                   min(client.node_id, client.peer_id))
                    break
        except Exception:
            self._log.exception("ssh.conn.crashed peer=%s addr=%s", session.peer_id, session.addr)
        finally:
            transport.close()
            session.release_all()
            with self._lock:
                self._sessions.discard(session)
            client.forget(transport)
            self._remove_worker(threading.current_thread())

    def stop(self) -> None:
        """Close the listener and every connection; join our threads within ~2 s.
        Idempotent. Handlers see their channels close (recv returns b"")."""
        if self._stopping.is_set():
            return
        self._stopping.set()
        deadline = time.monotonic() + _STOP_BUDGET
        if self._wake_w is not None:
            with contextlib.suppress(OSError):
                self._wake_w.send(b"x")
        with self._lock:
            sessions = list(self._sessions)
            pending = list(self._pending)
        for session in sessions:
            session.transport.close()
        for entry in pending:  # a closed transport does not set it: wake _wait_login
            entry.negotiated.set()
        threads = [self._accept_thread] if self._accept_thread is not None else []
        with self._lock:
            threads += list(self._threads)
        for thread in threads:
            # A channel worker is registered before it is started (join would raise); one
            # not started yet runs against a closed channel and ends by itself.
            if thread.is_alive():
                thread.join(max(0.0, deadline - time.monotonic()))
        alive = [t.name for t in threads if t.is_alive()]
        if alive:
            self._log.warning("ssh.server.stop-slow threads=%d names=%s", len(alive), ",".join(alive[:5]))
        for sock in (self._wake_r, self._wake_w):
            if sock is not None:
                sock.close()
        self._log.info("ssh.server.stopped")

    # --- plumbing

    def _reclaim(self, peer_id: str) -> None:
        with self._lock:
            sessions = [s for s in self._sessions if s.peer_id == peer_id]
        for session in sessions:
            session.reclaim_closed()

    def _add_worker(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.add(thread)

    def _remove_worker(self, thread: threading.Thread) -> None:
        with self._lock:
            self._threads.discard(thread)

    def _accept_loop(self) -> None:
        assert self._listener is not None and self._wake_r is not None
        listener = self._listener
        selector = selectors.DefaultSelector()
        selector.register(listener, selectors.EVENT_READ)
        selector.register(self._wake_r, selectors.EVENT_READ)
        try:
            while not self._stopping.is_set():
                for key, _ in selector.select(timeout=1.0):  # wakes to flush eviction counts
                    if key.fileobj is self._wake_r:
                        return
                    try:
                        sock, addr = listener.accept()
                    except (BlockingIOError, InterruptedError):
                        continue
                    except OSError as exc:
                        # EMFILE and friends: log, back off a little, keep serving.
                        self._log.error("ssh.server.accept-failed error=%s", _reason(exc))
                        self._stopping.wait(0.1)
                        continue
                    self._admit(sock, addr[0], f"{addr[0]}:{addr[1]}")
                self._evictions.flush(time.monotonic())
        finally:
            self._evictions.flush(time.monotonic(), force=True)
            selector.close()
            listener.close()

    def _admit(self, sock: socket.socket, host: str, addr: str) -> None:
        """Accept thread: register the connection as pending, making room first if a
        limit is reached, and start its thread; or, when ``max_prelogin`` connections not
        logged in still have threads, close it at once (see the module docstring)."""
        now = time.monotonic()
        entry = _Pending(_address_bucket(host), sock, now)
        victim: _Pending | None = None
        reason = ""
        stall = self._stall_after
        with self._lock:
            overload = self._prelogin >= self._max_prelogin
            if not overload:
                waiting = [p for p in self._pending if not p.logged_in()]
                same = [p for p in waiting if p.bucket == entry.bucket]
                if len(same) >= self._max_unauthenticated_per_address:
                    victim, reason = min(same, key=lambda p: p.rank(now, stall)), "per-address"
                elif len(waiting) >= self._max_unauthenticated:
                    per_bucket = Counter(p.bucket for p in waiting)
                    victim = min(waiting, key=lambda p: (*p.rank(now, stall)[:2], -per_bucket[p.bucket],
                                                         p.accepted_at))
                    reason = "total"
                if victim is not None:
                    victim.evicted = True
                    self._pending.discard(victim)
                self._pending.add(entry)
                entry.counted = True
                self._prelogin += 1
        if overload:
            _hang_up(sock)
            self._evictions.note(now, "overload", entry.bucket)
            return
        if victim is not None:
            victim.shut()
            self._evictions.note(now, reason, victim.bucket)
        thread = threading.Thread(
            target=self._serve_connection, args=(entry, addr), name=f"maildrop-ssh-conn-{addr}", daemon=True
        )
        self._add_worker(thread)
        try:
            thread.start()
        except RuntimeError as exc:  # no thread to be had: this connection only is refused
            self._remove_worker(thread)
            self._leave_pending(entry)
            _hang_up(sock)
            self._log.error("ssh.server.accept-failed addr=%s error=%s", addr, _reason(exc))

    def _serve_connection(self, entry: _Pending, addr: str) -> None:
        """Login within the deadline, then drain the transport's accept queue (channels are
        served by request callbacks) and sweep idle channels until the connection ends."""
        sock = entry.sock
        deadline = entry.accepted_at + self._login_timeout
        session: _ServerSession | None = None
        transport: paramiko.Transport | None = None
        try:
            sock.setblocking(True)
            _tune_socket(sock, SERVER_TCP_USER_TIMEOUT)
            counter = _ByteCounter()
            transport = _new_transport(_CountingSocket(sock, counter))
            entry.transport = transport
            transport.add_server_key(self._host_key)
            transport.banner_timeout = self._login_timeout
            session = _ServerSession(self, transport, addr, counter)
            with self._lock:
                if self._stopping.is_set():
                    return
                self._sessions.add(session)
            transport.start_server(event=entry.negotiated, server=session)
            if not self._wait_login(transport, entry, deadline, addr):
                return
            self._leave_pending(entry)
            # set_authorized may have swapped the peers while this login was being checked.
            if self._peers.refusal(session.peer_id or "", session.key_blob or b"") is not None:
                self._log.warning("ssh.peer.deauthorized peer=%s addr=%s", session.peer_id, addr)
                return
            self._log.info("ssh.peer.connected peer=%s addr=%s", session.peer_id, addr)
            with self._lock:
                client = self._clients.get(session.peer_id or "")
            if client is not None:  # our calls to this peer may use its connection too
                client.adopt(transport, counter)
            while transport.is_active() and not self._stopping.is_set():
                channel = transport.accept(_DRAIN)
                if channel is not None:
                    session.attach(channel)
                session.sweep(time.monotonic(), self._channel_request_timeout)
            self._log.info("ssh.peer.disconnected peer=%s addr=%s", session.peer_id, addr)
        except Exception:
            self._log.exception("ssh.conn.crashed addr=%s", addr)
        finally:
            if transport is not None:
                transport.close()  # a no-op when it never started, hence the close below
            sock.close()
            if transport is not None and transport.is_alive() and not entry.logged_in():
                # paramiko's close does not wait for its thread (it polls every 0.1 s): a
                # connection not logged in counts against max_prelogin until both are gone.
                transport.join(_PRELOGIN_JOIN)
            self._leave_pending(entry)
            if session is not None:
                session.release_all()
                with self._lock:
                    self._sessions.discard(session)
                    client = self._clients.get(session.peer_id or "")
                if client is not None and transport is not None:
                    client.forget(transport)
            self._remove_worker(threading.current_thread())

    def _leave_pending(self, entry: _Pending) -> None:
        """The connection logged in or ended: no longer pending, nor counted as one
        without a login (idempotent)."""
        with self._lock:
            self._pending.discard(entry)
            if entry.counted:
                entry.counted = False
                self._prelogin -= 1

    def _wait_login(self, transport: paramiko.Transport, entry: _Pending, deadline: float, addr: str) -> bool:
        """True once authenticated; False on a failed handshake, a closed connection, the
        login deadline (each logged, unless the connection was evicted: that is counted by
        ``_EvictionLog``) or the server stopping. Polls: paramiko has no auth-done callback."""
        if not entry.negotiated.wait(max(0.0, deadline - time.monotonic())):
            self._log.warning("ssh.conn.login-timeout stage=handshake addr=%s", addr)
            return False
        if self._stopping.is_set():
            return False
        if not transport.is_active():
            if not entry.evicted:
                self._log.info(
                    "ssh.conn.handshake-failed addr=%s reason=%s", addr, _reason(transport.get_exception())
                )
            return False
        while not transport.is_authenticated():
            if not transport.is_active():
                if not entry.evicted:
                    self._log.info("ssh.conn.closed-before-login addr=%s", addr)
                return False
            if time.monotonic() >= deadline:
                self._log.warning("ssh.conn.login-timeout stage=auth addr=%s", addr)
                return False
            if self._stopping.wait(_POLL):
                return False
        return True


# ---------------------------------------------------------------------------- client


class _ByteCounter:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0


class _CountingSocket:
    """Wraps the TCP socket paramiko uses, counting raw (encrypted) bytes each way.
    paramiko sends under its write lock and receives on its one thread, so the counters
    need no lock of their own."""

    def __init__(self, sock: socket.socket, counter: _ByteCounter) -> None:
        self._sock = sock
        self._counter = counter

    def recv(self, n: int) -> bytes:
        data = self._sock.recv(n)
        self._counter.received += len(data)
        return data

    def send(self, data: bytes) -> int:
        n = self._sock.send(data)
        self._counter.sent += n
        return n

    def sendall(self, data: bytes) -> None:
        self._sock.sendall(data)
        self._counter.sent += len(data)

    def __getattr__(self, name: str) -> object:
        return getattr(self._sock, name)


@dataclass(eq=False)
class _Attempt:
    """One connection attempt of a ``PeerClient``: made by a thread of its own, awaited by
    every caller that needs the connection while it runs (single flight).

    ``transport`` or ``error`` (exactly one) is written once, under the client's lock, just
    before ``done`` is set, and read only after ``done``. ``sock`` is the attempt's TCP
    socket while its handshake runs (guarded by the client's lock), so that ``close`` can
    cut the handshake short.
    """

    peer_blob: bytes  # the host key pinned when the attempt started
    liveness: _Liveness
    done: threading.Event = field(default_factory=threading.Event)
    transport: paramiko.Transport | None = None
    error: MaildropError | None = None
    sock: socket.socket | None = None

    def outcome(self) -> paramiko.Transport:
        """The connection made, or a copy of the attempt's error (each caller raises its
        own: one exception object raised in several threads would share a traceback)."""
        if self.transport is not None:
            return self.transport
        assert self.error is not None
        raise type(self.error)(str(self.error)) from None


@dataclass(eq=False)
class _Conn:
    """One live connection of a link: dialed by this node or by the peer (adopted)."""

    transport: paramiko.Transport
    dialer: str  # the node id that dialed it
    since: float  # monotonic time it was logged in
    counter: _ByteCounter | None = None  # an adopted connection's bytes (dialed: the client's)
    one_way: bool = False  # adopted, but its client refuses our channels (e.g. OpenSSH's ssh)


class PeerClient:
    """One peer's link: the SSH connection to it, used both ways, handing out ``maildrop``
    channels. Thread-safe: many threads may call ``open_channel`` at once; they share the
    connection.

    One connection per link: channels go over whichever live connection the link has,
    dialed by us or by the peer (``adopt``: the ``SSHServer`` hands over the peer's logins
    once this client is ``attach``-ed to it; the server then also serves the peer's channels
    on the connections we dial). A new connection is dialed only when there is none, and
    never to a peer without an ``address`` (it dials us). When both ends dialed at once the
    connection dialed by the lower node id is used (of two dialed by the same node, the
    newer), by both ends alike; the other one gets no new channel and the end that dialed it
    closes it once its last channel has closed (``redundant``), so nothing in flight fails.
    An adopted connection whose client refuses our channels (administratively prohibited:
    a client that serves none, such as OpenSSH's ``ssh``) is never used for ours again; we
    dial instead, if the peer has an address.

    Connecting is single-flight and holds no lock across network I/O: the first caller
    that finds no live connection starts one attempt on a thread of its own (``_Attempt``);
    it and every caller that comes while it runs wait for that attempt's outcome, each for
    at most its own timeout, and none starts another. An attempt ends within
    ``connect_timeout``. ``close`` and ``set_peer_key`` never wait: they cut the attempt
    in progress (its waiters get PeerUnreachable at once; a connection it still makes is
    closed, never used).

    Liveness: ``silence_after`` (the agent passes gossip.link_down_after, and sets it again
    on reload) gives TCP_USER_TIMEOUT, the SSH keepalive and the connect timeout (see
    ``_Liveness``) of every connection of the link, dialed or adopted; callers use it as the
    read timeout of their channels.

    Key rotation: ``fallback`` keys (this node's key before a rotation) are offered only
    when the peer refuses ``key``, so a peer that has not learned the rotation yet still
    lets us in and learns it by gossip. ``set_peer_key`` moves the pinned host key (the
    peer's feed rotated from the pinned key) and closes the connections we dialed under the
    old one (the peer's own logins are the server's to judge: ``SSHServer.set_authorized``).
    """

    def __init__(
        self,
        node_id: str,
        key: NodeKey,
        peer_id: str,
        address: tuple[str, int] | None,
        peer_key: str,
        *,
        silence_after: float = DEFAULT_SILENCE_AFTER,
        connect_timeout: float | None = None,
        logger: logging.Logger | None = None,
        fallback: Sequence[NodeKey] = (),
    ) -> None:
        """``address`` None: never dial (the peer dials us). ``connect_timeout``: a fixed
        budget per connection attempt (``maildrop check``); None derives it from
        ``silence_after``. ValueError if ``silence_after`` is not > 0."""
        _quiet_paramiko()
        self.node_id = node_id
        self.peer_id = peer_id
        self.address = address
        try:
            peer_blob = _key_blob(peer_key)
        except ValueError as exc:
            raise ConfigError(f"configured key of peer {peer_id}: {exc}") from None
        self._pkey = _load_pkey(key)
        self._fallback = [_load_pkey(k) for k in fallback]
        self._fixed_connect_timeout = connect_timeout
        self._log = logger or logging.getLogger(__name__)
        self._winner = min(node_id, peer_id)  # of two connections, the one this node dialed
        # Guards _peer_blob, _liveness, _conns, _gone, _attempt (and an attempt's ``sock``)
        # and _server. Held only to read or swap them, to apply liveness options to the live
        # connections and to shut an attempt's socket down: none of which waits for the
        # network. Never held across a connect, a handshake, a login or a channel open, and
        # never taken together with the SSH server's lock (a leaf).
        self._lock = threading.Lock()
        self._peer_blob = peer_blob
        self._liveness = _Liveness.of(silence_after, connect_timeout)
        self._conns: list[_Conn] = []
        self._attempt: _Attempt | None = None
        self._server: SSHServer | None = None
        self._bytes = _ByteCounter()  # every connection we dialed
        self._gone = _ByteCounter()  # adopted connections that ended

    @property
    def bytes_sent(self) -> int:
        """Raw TCP bytes written to this peer, over all connections of the link."""
        with self._lock:
            return self._bytes.sent + self._gone.sent + sum(
                c.counter.sent for c in self._conns if c.counter is not None)

    @property
    def bytes_received(self) -> int:
        """Raw TCP bytes read from this peer, over all connections of the link."""
        with self._lock:
            return self._bytes.received + self._gone.received + sum(
                c.counter.received for c in self._conns if c.counter is not None)

    @property
    def connected(self) -> bool:
        """True while the link has a live, logged-in connection (either end dialed it)."""
        with self._lock:
            return self._preferred_locked() is not None

    @property
    def silence_after(self) -> float:
        """Seconds without a word from the peer after which a channel counts as dead:
        callers set it as their channels' read timeout. Setting it (a reload) applies to
        the live connections at once (keepalive, TCP_USER_TIMEOUT) and to later attempts."""
        return self._liveness.silence_after

    @silence_after.setter
    def silence_after(self, seconds: float) -> None:
        liveness = _Liveness.of(seconds, self._fixed_connect_timeout)
        with self._lock:
            if liveness == self._liveness:
                return
            self._liveness = liveness
            for conn in self._conns:
                self._apply_locked(conn.transport)

    @property
    def connect_timeout(self) -> float:
        """Seconds one connection attempt (TCP connect, SSH handshake, login) may take."""
        return self._liveness.connect_timeout

    def connect(self, timeout: float | None = None) -> None:
        """Make sure there is a live, verified, authenticated connection. Idempotent.
        Waits at most ``timeout`` seconds (None: the attempt's own ``connect_timeout``).
        Raises PeerUnreachable (also when the wait ends first, and at once for a peer
        without an address that is not connected to us), HostKeyMismatch, AuthRefused or
        PeerIncompatible."""
        self._connection(timeout)

    def open_channel(self, timeout: float = 10.0) -> Stream:
        """A new channel running the peer's ``maildrop`` subsystem, on the link's connection
        (whichever end dialed it). Waits at most ``timeout`` for a connection (see
        ``connect``), then at most ``timeout`` each for the channel and the subsystem's
        answer. The channel has no I/O timeout: callers set one (``silence_after``). A
        channel refused on a duplicate connection that is being closed is asked for once
        more on the one kept. Raises PeerUnreachable (ChannelRefused when the peer refuses
        the channel), or the permanent errors of ``connect``."""
        transport = self._connection(timeout)
        try:
            return self._open_on(transport, timeout)
        except PeerUnreachable:
            again = self._connection(timeout)
            if again is transport:
                raise
            return self._open_on(again, timeout)

    def _one_way(self, transport: paramiko.Transport) -> None:
        with self._lock:
            for conn in self._conns:
                if conn.transport is transport and conn.dialer != self.node_id and not conn.one_way:
                    conn.one_way = True
                    self._log.info("ssh.link.one-way peer=%s (its client serves no channel: our "
                                   "calls need a connection we dial)", self.peer_id)

    def carries(self, channel: Stream) -> bool:
        """True when ``channel`` runs over the connection the link uses now: a caller that
        keeps a channel open (gossip, a pool) moves to a new one when this is False."""
        get = getattr(channel, "get_transport", None)
        with self._lock:
            conn = self._preferred_locked()
        return conn is not None and get is not None and get() is conn.transport

    @staticmethod
    def dropped(channel: paramiko.Channel) -> bool:
        """True when ``channel`` ended with its connection, or by itself (the peer closed it)."""
        transport = channel.get_transport()
        return bool(channel.closed) or transport is None or not transport.is_active()

    def adopt(self, transport: paramiko.Transport, counter: _ByteCounter | None = None) -> None:
        """Use ``transport``, a connection the peer dialed and logged in on (the server
        calls this), for our channels too; the link's liveness options apply to it.
        Idempotent (a login and ``SSHServer.attach`` may both hand it over)."""
        with self._lock:
            if any(c.transport is transport for c in self._conns):
                return
            self._conns.append(_Conn(transport, self.peer_id, time.monotonic(), counter))
            self._apply_locked(transport)
        self._log.debug("ssh.link.adopted peer=%s", self.peer_id)

    def forget(self, transport: paramiko.Transport) -> None:
        """The connection ended (its serving thread is done with it)."""
        with self._lock:
            self._drop_locked([c for c in self._conns if c.transport is transport])

    def redundant(self, transport: paramiko.Transport) -> bool:
        """True when ``transport``, a connection this node dialed, is a duplicate (another
        live connection of the link is preferred) with no channel open any more."""
        with self._lock:
            conn = self._preferred_locked()
            mine = any(c.transport is transport and c.dialer == self.node_id for c in self._conns)
        if conn is None or conn.transport is transport or not mine:
            return False
        return not any(not ch.closed for ch in list(transport._channels.values()))

    def serve_on(self, server: SSHServer | None) -> None:
        """The server that serves the peer's channels on connections we dial (``SSHServer.attach``)."""
        with self._lock:
            self._server = server

    def close(self) -> None:
        """Close the link's connections (open channels with them) and cut an attempt in
        progress. Does not wait for the network. A later call reconnects."""
        with self._lock:
            conns, self._conns = self._conns, []
            self._drop_locked(conns)
            self._cancel_locked("the client was closed")
        for conn in conns:
            conn.transport.close()

    def set_peer_key(self, peer_key: str) -> None:
        """Pin ``peer_key`` as the peer's host key from now on; a connection we made (or are
        making) under the old pin is closed (the next call reconnects and checks the new one)."""
        try:
            blob = _key_blob(peer_key)
        except ValueError as exc:
            raise ConfigError(f"key of peer {self.peer_id}: {exc}") from None
        with self._lock:
            if blob == self._peer_blob:
                return
            self._peer_blob = blob
            dialed = [c for c in self._conns if c.dialer == self.node_id]
            self._drop_locked(dialed)
            self._cancel_locked("the peer's pinned host key changed")
        for conn in dialed:
            conn.transport.close()

    # --- plumbing

    def _where(self) -> str:
        return "(no address: it dials us)" if self.address is None else f"{self.address[0]}:{self.address[1]}"

    def _preferred_locked(self) -> _Conn | None:
        """The live connection our channels go over (never a one-way one): the one the lower
        node id dialed, then the newest. Drops the connections that ended (their threads
        close them)."""
        self._drop_locked([c for c in self._conns
                           if not (c.transport.is_active() and c.transport.is_authenticated())])
        usable = [c for c in self._conns if not c.one_way]
        if not usable:
            return None
        return min(usable, key=lambda c: (c.dialer != self._winner, -c.since))

    def _drop_locked(self, conns: list[_Conn]) -> None:
        for conn in conns:
            if conn in self._conns:
                self._conns.remove(conn)
                if conn.counter is not None:
                    self._gone.sent += conn.counter.sent
                    self._gone.received += conn.counter.received

    def _open_on(self, transport: paramiko.Transport, timeout: float) -> Stream:
        where = f"peer {self.peer_id} at {self._where()}"
        try:
            channel = transport.open_session(timeout=timeout)
        except paramiko.ChannelException as exc:
            if exc.code == paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED:
                self._one_way(transport)
            raise ChannelRefused(f"{where} refused a channel: {exc.text or exc.code}") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise PeerUnreachable(f"{where}: cannot open a channel ({_reason(exc)})") from None
        # invoke_subsystem has no timeout of its own; closing the channel ends its wait.
        expired = threading.Event()

        def expire() -> None:
            expired.set()
            channel.close()

        timer = threading.Timer(timeout, expire)
        timer.daemon = True
        timer.start()
        try:
            channel.invoke_subsystem(SUBSYSTEM)
        except (paramiko.SSHException, EOFError, OSError) as exc:
            channel.close()
            if expired.is_set():
                raise ChannelRefused(f"{where}: no answer to the {SUBSYSTEM} request in {timeout:g}s") from None
            if not transport.is_active():
                raise PeerUnreachable(f"{where}: connection dropped ({_reason(exc)})") from None
            raise ChannelRefused(f"{where} refused the {SUBSYSTEM} subsystem") from None
        finally:
            timer.cancel()
        if expired.is_set():  # the timer fired just as the answer came
            channel.close()
            raise ChannelRefused(f"{where}: no answer to the {SUBSYSTEM} request in {timeout:g}s")
        return channel

    def _connection(self, timeout: float | None) -> paramiko.Transport:
        """The link's live connection, or the outcome of the attempt in progress (started
        here if there is none), waited for at most ``timeout`` seconds."""
        start = False
        with self._lock:
            conn = self._preferred_locked()
            if conn is not None:
                return conn.transport
            if self.address is None:
                raise PeerUnreachable(f"peer {self.peer_id} is not connected to us (it has no "
                                      "address in our config: it dials us)")
            attempt = self._attempt
            if attempt is None:
                attempt = self._attempt = _Attempt(self._peer_blob, self._liveness)
                start = True
        if start:
            try:
                threading.Thread(target=self._attempt_connect, args=(attempt,),
                                 name=f"maildrop-ssh-connect-{self.peer_id}", daemon=True).start()
            except RuntimeError as exc:  # no thread to be had
                with self._lock:
                    self._settle_locked(attempt, None, PeerUnreachable(
                        f"peer {self.peer_id} at {self._where()}: cannot start a connection attempt ({exc})"))
        wait = attempt.liveness.connect_timeout + 1.0 if timeout is None else timeout
        if not attempt.done.wait(wait):
            raise PeerUnreachable(f"peer {self.peer_id} at {self._where()}: not connected within "
                                  f"{wait:g}s (a connection attempt is in progress)")
        return attempt.outcome()

    def _cancel_locked(self, why: str) -> None:
        """End the attempt in progress, if any: its waiters get PeerUnreachable now, its
        handshake is cut (the socket shut down: paramiko's reads see EOF)."""
        attempt, self._attempt = self._attempt, None
        if attempt is None:
            return
        self._settle_locked(attempt, None, PeerUnreachable(
            f"peer {self.peer_id} at {self._where()}: connection attempt ended ({why})"))
        if attempt.sock is not None:
            with contextlib.suppress(OSError):
                attempt.sock.shutdown(socket.SHUT_RDWR)

    def _settle_locked(self, attempt: _Attempt, transport: paramiko.Transport | None,
                       error: MaildropError | None) -> bool:
        """Record ``attempt``'s outcome and wake its waiters; False (nothing changed) when
        it has one already (it was cut). A connection made becomes one of the link's."""
        if attempt.done.is_set():
            return False
        if self._attempt is attempt:
            self._attempt = None
        attempt.transport, attempt.error = transport, error
        if transport is not None:
            self._conns.append(_Conn(transport, self.node_id, time.monotonic()))
            self._apply_locked(transport)
        attempt.done.set()
        return True

    def _apply_locked(self, transport: paramiko.Transport) -> None:
        with contextlib.suppress(Exception):  # it may be closing under us
            self._liveness.apply(transport)

    def _attempt_connect(self, attempt: _Attempt) -> None:
        """An attempt's thread: connect within its budget, settle the outcome, and close
        what lost (a connection made after ``close`` cut the attempt, or a failed one). With
        a server (``serve_on``), the connection made serves the peer's channels too."""
        assert self.address is not None
        where = f"peer {self.peer_id} at {self._where()}"
        budget = attempt.liveness.connect_timeout
        deadline = time.monotonic() + budget
        with self._lock:
            server = self._server
        sock: socket.socket | None = None
        transport: paramiko.Transport | None = None
        error: MaildropError | None = None
        try:
            sock = socket.create_connection(self.address, timeout=budget)
        except OSError as exc:
            error = PeerUnreachable(f"cannot reach {where}: {exc.strerror or _reason(exc)}")
        if sock is not None:
            with self._lock:
                cut = attempt.done.is_set()
                if not cut:
                    attempt.sock = sock
            try:
                if cut:
                    error = PeerUnreachable(f"{where}: connection attempt ended")
                else:
                    _tune_socket(sock, attempt.liveness.silence_after)
                    transport = _new_transport(_CountingSocket(sock, self._bytes))
                    if server is not None:
                        server.dial_session(transport, self.peer_id, attempt.peer_blob,
                                            self._where(), self._bytes)
                    self._handshake(transport, attempt, deadline)
            except MaildropError as exc:
                error = exc
            except Exception as exc:  # a bug: say so; the callers see a transient error
                self._log.error("ssh.client.connect-crashed peer=%s", self.peer_id, exc_info=True)
                error = PeerUnreachable(f"{where}: connection attempt failed ({_reason(exc)})")
            finally:
                with self._lock:
                    attempt.sock = None  # close() no longer touches it: ours to close
        with self._lock:
            won = self._settle_locked(attempt, transport if error is None else None, error)
        if won and error is None:
            assert transport is not None
            self._log.debug("ssh.client.connected peer=%s addr=%s cipher=%s",
                            self.peer_id, self._where(), transport.local_cipher)
            if server is not None:
                server.serve_dialed(transport, self)
            return
        self._log.debug("ssh.client.connect-failed peer=%s error=%s", self.peer_id,
                        _reason(error) if won else "cut by close")
        if transport is not None:
            transport.close()  # a no-op when it never started, hence the close below
        if sock is not None:
            sock.close()

    def _handshake(self, transport: paramiko.Transport, attempt: _Attempt, deadline: float) -> None:
        """SSH handshake, host key check and login on a new connection, by ``deadline``.
        Raises PeerUnreachable, HostKeyMismatch, AuthRefused or PeerIncompatible; the
        caller closes the connection on any error."""
        where = f"peer {self.peer_id} at {self._where()}"
        budget = attempt.liveness.connect_timeout

        def left() -> float:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise PeerUnreachable(f"{where}: no SSH connection within {budget:g}s")
            return remaining

        transport.banner_timeout = left()
        # Our peers have ed25519 host keys; ask for exactly that one, then compare it.
        transport.get_security_options().key_types = ("ssh-ed25519",)
        try:
            transport.start_client(timeout=left())
        except paramiko.IncompatiblePeer as exc:
            raise PeerIncompatible(f"{where}: incompatible SSH peer ({exc})") from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise PeerUnreachable(f"{where}: SSH handshake failed ({_reason(exc)})") from None
        if not transport.is_active() or not transport.initial_kex_done:
            raise PeerUnreachable(f"{where}: SSH handshake did not finish in {budget:g}s")
        presented = transport.get_remote_server_key().asbytes()
        if presented != attempt.peer_blob:
            raise HostKeyMismatch(
                f"{where} presented host key {_fingerprint(presented)}, but its configured "
                f"key is {_fingerprint(attempt.peer_blob)}; refusing to connect "
                f"(fix the peer's key in the config if it really changed)"
            )
        try:
            remaining = self._login(transport, left)
        except paramiko.AuthenticationException as exc:
            if not transport.is_active():
                # paramiko says "Authentication failed: transport shut down or saw EOF"
                # when the peer hung up mid-login (e.g. its login deadline passed on a
                # loaded machine): that is no verdict on our key.
                raise PeerUnreachable(
                    f"{where}: connection closed during authentication ({_reason(exc)})"
                ) from None
            if time.monotonic() >= deadline:  # "Authentication timeout.": no verdict either
                raise PeerUnreachable(f"{where}: authentication did not finish in {budget:g}s") from None
            raise AuthRefused(
                f"{where} refused our key for node {self.node_id} ({_reason(exc)}); "
                f"is our public key configured there?"
            ) from None
        except (paramiko.SSHException, EOFError, OSError) as exc:
            raise PeerUnreachable(f"{where}: authentication did not finish ({_reason(exc)})") from None
        if remaining or not transport.is_authenticated():
            raise AuthRefused(f"{where} wants more than our key for node {self.node_id}")

    def _login(self, transport: paramiko.Transport, left: Callable[[], float]) -> list[str]:
        """Log in with our key, else (refused, still connected) with each fallback key,
        each try within the attempt's time ``left()``; the last refusal is raised."""
        refused: paramiko.AuthenticationException | None = None
        for pkey in (self._pkey, *self._fallback):
            transport.auth_timeout = left()
            try:
                remaining = transport.auth_publickey(self.node_id, pkey)
            except paramiko.AuthenticationException as exc:
                refused = exc
                if not transport.is_active():
                    break
                continue
            if pkey is not self._pkey:
                self._log.info("ssh.client.old_key peer=%s key=%s (the peer refused our new key "
                               "and took the one before the rotation: it learns the rotation by "
                               "gossip)", self.peer_id, _fingerprint(pkey.asbytes()))
            return remaining
        assert refused is not None
        raise refused
