"""The agent: the imperative shell that wires log, model, spool, transport and watcher.

Services, each a named thread with a ``run`` loop, started and supervised here:
``ssh-server`` (incoming calls), the serve socket (``state/serve.sock``: incoming calls that
OpenSSH's sshd logged in, through ``maildrop serve``), ``gossip:<peer>`` (one per peer: Fingerprint/Gossip on a
jittered interval and right after new events; reconnect with tenacity backoff; liveness and
``link.up``/``link.down``; the peer's fingerprint against ours, for ``status``; the
link's health, measured and announced as ``link.health``). Each link is one SSH connection
used both ways (``PeerClient``, attached to the server): our calls go over the connection
we dialed or the one the peer dialed, and a peer configured without an address is never
dialed (it dials us). Further services: ``custody`` (the custody service, ``custodian``:
owns every transfer, plans, and hands offers to each peer's own hop lanes), ``taker``
(outbox files into custody, in batches), ``watcher`` (outbox), ``notices`` (the notice
pump: signed transfer facts routed hop by hop to one node, ``state/notices.sqlite``,
sent by ``notice-send`` threads, one hop each; docs/protocol.md).
With ``metrics.listen`` set, prometheus-client's HTTP server answers scrapes on a thread
of its own (``metrics``; it reads ``metrics_sample``); an address it cannot bind is logged
and the agent runs on without it.
The main thread supervises: it writes ``state/agent.json`` (soft state for ``status``),
pings the systemd watchdog, folds events other processes appended and applies a reload
(SIGHUP, ``systemctl reload``: ``reload``, the config file applied whole or refused whole).

Crash: every fact is in the log before it is acted on and every file step is durable
(see ``transfers``), so ``kill -9`` at any point is recovered by ``Custody.recover`` and
gossip on the next start.

State loss: before it writes anything (announce, ``link.up``, custody), ``start`` takes a
gossip round with every peer (``_recover_own_feed``): a node whose ``state/`` was lost or
restored from an older backup gets its own newer events back (signed by its own key, they
join its feed) and continues after the old head, never forking it. Meanwhile the SSH server
answers gossip but refuses offers. A peer that does not answer is not waited for when the
log holds this node's feed (the ordinary restart; the risk: an older backup restored while
every peer is down forks the feed when they return); with no own event at all it waits up
to ``RECOVER_WAIT_EMPTY`` s for one, and fails to start (exit 1) if none answers, rather
than start a feed its peers may already hold under the same id.

Key rotation: each peer's SSH login key and pinned host key follow that peer's feed (its
current key, the feed having started from, or rotated to, the pinned key), so a signed
``rotate-key`` is honoured before the operator updates the config; this node logs in with
its previous key (``<key>.old``) where the new one is refused.
"""

from __future__ import annotations

import collections
import contextlib
import fcntl
import json
import logging
import os
import pwd
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, fields, replace
from typing import Any

from tenacity import (
    Retrying,
    retry_if_exception,
    wait_random_exponential,
)

from . import events as E
from . import gossip, health, metrics, notices, sdnotify
from . import lifecycle as L
from .announce import config_events
from .config import Config, Peer, format_hostport, load_config
from .control import Control
from .custodian import Custodian, Job
from .errors import ConfigError, MaildropError, ProtocolError, TransferRefused
from .eventlog import EventLog
from .events import Event
from .failpoints import failpoint
from .keys import NEW_SUFFIX, NodeKey, load_key, load_old_key, sibling
from .logsafe import OneLine
from .protocol import (
    MAX_BATCH,
    MAX_NOTICE_BYTES,
    MAX_NOTICE_FACTS,
    MAX_NOTICE_HOPS,
    FrameStream,
    cut,
)
from .relay import choose_hop
from .routing import reachable
from .spool import Spool, ensure_layout, ensure_outbox
from .transfers import STALE_MARGIN, Answer, Custody, offer_chunks
from .transport import openssh
from .transport.local import SOCKET_NAME, LocalServer
from .transport.ssh import (
    AuthRefused,
    HostKeyMismatch,
    PeerClient,
    PeerIncompatible,
    PeerUnreachable,
    SSHServer,
    is_transient,
    raise_open_files_limit,
)
from .watcher import OutboxWatcher

log = logging.getLogger("maildrop.agent")

PERMANENT = (HostKeyMismatch, AuthRefused, PeerIncompatible, *openssh.PERMANENT)
SERVE_OPS = {"fingerprint", "buckets", "gossip", "offer", "ping", "notice"}
STATUS_FILE = "agent.json"
STATUS_EVERY = 1.0
HISTORY_SWEEP_EVERY = 3600.0
"""Seconds between two retention sweeps of the fact store (one runs at start too)."""
STATUS_REASONS = 200  # transfers with a reason listed in state/agent.json at most
SMALL_FILE = 1024 * 1024  # files up to this size travel in batches on the small-file lane
SMALL_LANE = 4  # small-file offers (batches) at once per peer
TAKE_BATCH = 256  # files taken with one set of syncs
POOL_IDLE = 20.0
"""Seconds an idle pooled relay channel is reused for; older ones are closed instead. Below
the peer's channel idle timeout (at least 30 s), so an offer never starts on a channel the
peer is about to close as idle."""
BROKEN_RETRY = 10.0  # a take that failed after its files moved in is replayed after this
CONFIRM_ROUNDS = 10  # gossip intervals a relay waits for the next hop's signed custody
RECOVER_WAIT_EMPTY = 60.0
"""Seconds a node with no event of its own in its log waits at start for a peer to answer."""
RECOVER_ROUNDS = 100
"""Gossip rounds with one peer at most while taking the own feed back (2,000 events each)."""
SNAPSHOT_EVERY_EVENTS = 5_000
"""New events since the last snapshot that make the main loop write the next one (and at
least a ``1 / SNAPSHOT_GROWTH`` share of all held: a write costs time ∝ all held events)."""
SNAPSHOT_GROWTH = 4
SNAPSHOT_EVERY = 600.0
"""Seconds after which any new event makes the main loop write a snapshot (as does a clean
stop), so a start replays little of the log's tail."""
NOTICE_AGE_FACTOR = 2
"""A notice is dropped once its fact is older than this many ``transfers.expire_after``: a
fact made at the end of a transfer's window still has a whole window to travel."""
NOTICE_SENDERS = 4
"""Hops the notice pump sends to at once (one frame group each): a silent hop holds one
sender for at most ``gossip.link_down_after``, never the others."""
NOTICE_BATCH = 1024
"""Notices one sender takes to one hop in one go (16 full frames); it kicks the pump when
done, so more follow at once."""
NOTICE_TICK = 2.0
"""Seconds the notice pump waits at most between two looks at its queue (it is also kicked
by every model change and link up)."""


def open_log(config: Config, writable: bool = True, own_key: str | None = None) -> EventLog:
    """The node's event log with its peers' keys pinned and this node's id as ``me`` (the
    roots of admission, and never marked as a conflict). ``own_key`` pins this node's own
    feed too, so its events can come back from peers (the agent's state-loss recovery)."""
    pinned = {p.id: p.key for p in config.peers}
    if own_key is not None:
        pinned[config.node_id] = own_key
    return EventLog(config.events_path, pinned=pinned, writable=writable, me=config.node_id)


def announce(config: Config, key: NodeKey, elog: EventLog) -> list[Event]:
    """Append the config facts that differ from the log's latest word (and only those)."""
    with elog.lock:
        items = config_events(elog.network, config.node_id, config.display_name,
                              format_hostport(config.advertise), key.public_line,
                              [p.id for p in config.peers])
    return elog.append_own(key, config.node_id, items, time.time()) if items else []


def _unwritable(config: Config, what: object) -> MaildropError:
    """The one-line error for a state/ this user cannot write (instead of a traceback)."""
    try:
        user = pwd.getpwuid(os.geteuid()).pw_name
    except KeyError:
        user = str(os.geteuid())
    return MaildropError(f"{what}: permission denied: this user ({user}) must be able to write "
                         f"{config.state_dir}; fix: chown -R {user} {config.state_dir} (or run "
                         "the agent as its owner), then see 'maildrop check'")


def _lock_root(config: Config) -> int:
    """One agent per root: a second one would recover and deliver beside the first.
    MaildropError (one line) when state/ is not writable by this user."""
    path = config.state_dir / "agent.lock"
    if config.state_dir.is_dir() and not os.access(config.state_dir, os.W_OK | os.X_OK):
        raise _unwritable(config, config.state_dir)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except PermissionError:
        raise _unwritable(config, path) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        other = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise MaildropError(f"another maildrop agent (pid {other}) already runs on {config.root}; "
                            "stop it first (systemctl stop maildrop)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@dataclass
class PeerLink:
    """Soft state of one configured peer. ``client`` is the link's one SSH connection, used
    both ways (whichever end dialed it); ``address`` None: the peer dials us."""

    id: str
    address: tuple[str, int] | None
    client: PeerClient | openssh.OpenSSHClient
    state: str = "unknown"  # "up" | "down" | "unknown"
    last_seen: float | None = None
    down_since: float | None = None
    last_error: str = ""
    kick: threading.Event = field(default_factory=threading.Event)
    rekeyed: threading.Event = field(default_factory=threading.Event)  # its pinned key moved
    stream: FrameStream | None = None
    chan: Any = None
    rounds: int = 0
    pool: list[tuple[float, FrameStream]] = field(default_factory=list)  # idle relay channels, since
    pool_lock: threading.Lock = field(default_factory=threading.Lock)
    halt: threading.Event = field(default_factory=threading.Event)  # set: stopping, or left the config
    # Guards a change of state / down_since and the link.up / link.down it may append (so two
    # channels that see the change at once append one fact), and the decision to append a
    # link.health. Taken before the log's lock and before meter_lock.
    observe_lock: threading.Lock = field(default_factory=threading.Lock)
    sync: gossip.PeerSync | None = None  # its last fingerprint against ours (None: never heard)
    # Guards ``sync`` (a gossip round, a served fingerprint and the main loop's recheck each
    # compare and replace it). A leaf: nothing is taken under it.
    sync_lock: threading.Lock = field(default_factory=threading.Lock)
    meter: health.LinkMeter = field(default_factory=health.LinkMeter)  # soft: rtt, attempts, outages
    meter_lock: threading.Lock = field(default_factory=threading.Lock)  # guards meter; a leaf

    def measure(self, rtt: float | None = None, ok: bool | None = None, outage: bool = False) -> None:
        """Record a round trip (seconds), an attempt (ok or failed) and/or an outage now."""
        now = time.monotonic()
        with self.meter_lock:
            if rtt is not None:
                self.meter.rtt(now, rtt)
            if ok is not None:
                self.meter.attempt(now, ok)
            if outage:
                self.meter.outage(now)


class _RecentErrors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.addFilter(OneLine())  # these reach the terminal through `status`
        self.items: collections.deque[dict[str, Any]] = collections.deque(maxlen=20)

    def emit(self, record: logging.LogRecord) -> None:
        self.items.append({"ts": record.created, "level": record.levelname.lower(),
                           "message": record.getMessage()[:300]})


_METRIC_STATE = {L.OFFERING: "in-flight", L.SENDING: "in-flight", L.REFUSED: "queued"}
"""Custody states by their metrics label (the others by their own name)."""


@dataclass
class Lanes:
    """One peer's hop workers: ``small`` carries batches of small files, ``big`` one big
    file each (``transfers.parallel`` at once)."""

    small: ThreadPoolExecutor
    big: ThreadPoolExecutor

    @classmethod
    def for_peer(cls, peer: str, parallel: int) -> Lanes:
        return cls(ThreadPoolExecutor(SMALL_LANE, thread_name_prefix=f"hop:{peer}:small"),
                   ThreadPoolExecutor(parallel, thread_name_prefix=f"hop:{peer}"))

    def shutdown(self) -> None:
        """No new offers; the ones waiting still run and, their link retired or the agent
        stopping, answer ``Broke`` at once (``_send_jobs``), so none stays unanswered."""
        self.small.shutdown(wait=False)
        self.big.shutdown(wait=False)


class Agent:
    """One node's agent. ``run(stop)`` blocks until ``stop`` is set or a service dies."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.me = config.node_id
        self.stop = threading.Event()
        self.key: NodeKey = load_key(config.key_path)
        try:
            ensure_layout(config.root)
            self._single = _lock_root(config)
            self.log = open_log(config, own_key=self.key.public_line)
            self.spool = Spool(config.spool)
        except PermissionError as exc:  # e.g. events.jsonl owned by another user
            raise _unwritable(config, exc.filename) from None
        self._ready = threading.Event()  # set once the own feed is taken back and announced
        # A hop's signed custody comes back inline in its ``stored`` answer (from an older
        # hop: by notice): ten gossip rounds without it and the relay resends elsewhere.
        self.policy = L.Policy(expire_after=config.expire_after, resend_after=config.resend_after,
                               confirm_after=CONFIRM_ROUNDS * config.gossip_interval)
        self.custody = Custody(self.me, self.key, self.log, self.spool, config.inbox, config.failed,
                               max_file_size=config.max_file_size,
                               min_free_space=config.min_free_space,
                               stale_after=config.expire_after, on_change=self._changed)
        self.custody.on_receiving = self._on_receiving
        self.notices = notices.Notices(config.state_dir / notices.FILE_NAME,
                                       max_age=NOTICE_AGE_FACTOR * config.expire_after)
        self.custody.notify = self._notify
        self._notice_kick = threading.Event()  # set: the notice pump looks at its queue now
        # The notices being sent right now, as (to, fact id), and the hops a sender works for:
        # the pump hands neither out again until that send ended. A leaf lock.
        self._notice_inflight: set[tuple[str, str]] = set()
        self._notice_hops: set[str] = set()
        self._notice_lock = threading.Lock()
        self._notice_senders = ThreadPoolExecutor(NOTICE_SENDERS, thread_name_prefix="notice-send")
        self.custody.silence_after = config.link_down_after
        self.custodian = Custodian(self.me, self.custody, self.log, lambda: self.policy,
                                   self._dispatch, after_sweep=self._after_sweep,
                                   rules=lambda: self.config.admission)
        self.custody.on_taken = self.custodian.taken
        self.control = Control(config.state_dir, self.custody, self.custodian, lambda: self.policy)
        self.metrics = self.custody.metrics = metrics.for_agent(
            config.metrics_listen, [p.id for p in config.peers], self.metrics_sample)
        self.links: dict[str, PeerLink] = {p.id: self._new_link(p) for p in config.peers}
        self._peer_keys = {p.id: p.key for p in config.peers}  # login / host key now (feeds)
        # Guards _peer_keys and the swap of self.links in a reload; taken before log.lock and
        # before the SSH server's own lock (set_authorized), never inside either; nothing
        # under it waits for the network.
        self._keys_lock = threading.Lock()
        self._take_q: queue.Queue[tuple[Any, str]] = queue.Queue()
        # Per peer: its own hop workers, so a stuck peer never holds the workers that other
        # peers' transfers need. Written by the custody service's thread (``_dispatch``) and
        # by a reload (``_apply``), which replaces the whole dict.
        self._lanes: dict[str, Lanes] = {}
        self._lanes_lock = threading.Lock()  # guards _lanes (a leaf: nothing is taken under it)
        self._threads: dict[str, threading.Thread] = {}
        self._errors = _RecentErrors()
        self.server: SSHServer | None = None
        self.local: LocalServer | None = None  # state/serve.sock, for `maildrop serve`
        self.started = time.time()
        # The latest snapshot: events it holds (written by its writer thread, read by the main
        # loop only while no writer runs), when it was started, the writer (main loop only).
        self._snapshot_count = self.log.snapshot_count
        self._snapshot_at = time.monotonic()
        self._snapshotting: threading.Thread | None = None
        self._sweeping: threading.Thread | None = None  # started and read by the main thread only

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        logging.getLogger("maildrop").addHandler(self._errors)
        self._check_own_key()
        self._follow_keys()
        before, now = raise_open_files_limit()
        log.debug("agent.nofile soft_before=%d soft=%d", before, now)
        limits = {"max_channels_per_peer": 3 + self.config.parallel + SMALL_LANE,
                  # > the gossip channel's pause between rounds, with margin
                  "channel_idle_timeout": max(3 * self.config.gossip_interval,
                                              2 * self.config.link_down_after, 30.0)}
        # The serve socket first: once the SSH port answers, `maildrop serve` works too.
        self.local = LocalServer(self.config.state_dir / SOCKET_NAME, self._authorized, self,
                                 logger=logging.getLogger("maildrop.serve"), **limits)
        self.local.start()
        self.server = SSHServer(self.key, self.config.listen, dict(self._peer_keys),
                                self, logger=logging.getLogger("maildrop.ssh"), **limits)
        for link in self.links.values():  # before the listener: no login finds no link
            self._attach(link)
        try:
            self.server.start()
        except BaseException:
            self.local.stop()
            raise
        try:
            self._recover_own_feed()
            self._check_own_key()
        except BaseException:
            self.server.stop()
            self.local.stop()
            raise
        if self.stop.is_set():  # stopped while recovering: write nothing
            return
        new = announce(self.config, self.key, self.log)
        if new:
            log.info("agent.announced events=%d", len(new))
        self.log.checkpoint_if_old(self.key, self.me, time.time())
        self._sweep_soon()
        self.custodian.adopt(self.custody.recover())
        self.control.start()  # saved holds apply before the custody service plans
        self.custodian.serving()
        self._spawn("custody", self.custodian.run, self.stop)
        self._ready.set()
        for link in self.links.values():
            self._spawn(f"gossip:{link.id}", self._gossip_loop, link)
        self._spawn("taker", self._taker_loop)
        self._spawn("notices", self._notice_loop)
        watcher = OutboxWatcher(self.config.outbox, self._on_outbox_file, settle=self.config.settle,
                                rescan_interval=self.config.rescan_interval,
                                polling=self.config.polling, logger=logging.getLogger("maildrop.watcher"))
        self._spawn("watcher", watcher.run, self.stop)
        self.metrics.start()
        host, port = self.server.address
        log.info("agent.started node=%s listen=%s:%d peers=%d events=%d", self.me, host, port,
                 len(self.links), self.log.ledger.count)

    def _check_own_key(self) -> None:
        """Refuse to start with a key that is not the own feed's current key: every event
        signed with it would be refused by the peers (MaildropError saying what to do)."""
        with self.log.lock:
            held = self.log.ledger.key_of(self.me)
            waiting = self.me in self.log.ledger.pending
        path = self.config.key_path
        if held is None and waiting:
            raise MaildropError(
                f"{path} is not the key this node's events are signed with (its log or its "
                "peers hold them under another key): restore the node's key from its backup "
                "(a new key is a new identity its peers refuse)")
        if held is not None and held != self.key.public_line:
            fix = ("finish the key rotation: maildrop rotate-key" if sibling(path, NEW_SUFFIX).exists()
                   else "restore the node's current key from its backup")
            raise MaildropError(f"{path} is not this node's current key (its feed rotated to "
                                f"{held[:32]}…): {fix}")

    def _recover_own_feed(self) -> None:
        """Before this node writes anything: gossip with each peer (in parallel, at most
        ``RECOVER_ROUNDS`` rounds each, until a round brings nothing), so own events the
        peers hold and this log lacks come back first. See the module docstring for a peer
        that does not answer. Logs ``agent.recovered.own_feed seq=N from=PEER`` when the
        own head moved."""
        if not self.links:
            return
        with self.log.lock:
            before = self.log.ledger.version_vector().get(self.me, 0)
        deadline = time.monotonic() + RECOVER_WAIT_EMPTY
        answered: list[str] = []
        best: dict[str, int] = {}  # peer -> own head right after its round moved it

        def one(link: PeerLink) -> None:
            while not self.stop.is_set():
                try:
                    self._recovery_rounds(link, best)
                    answered.append(link.id)
                    return
                except Exception as exc:
                    link.last_error = f"{exc.__class__.__name__}: {exc}"[:200]
                    log.debug("agent.recover.round_failed peer=%s error=%s", link.id, link.last_error)
                    if before or answered or isinstance(exc, PERMANENT) or time.monotonic() >= deadline:
                        return
                    self.stop.wait(0.5)

        threads = [threading.Thread(target=one, args=(lk,), name=f"recover:{lk.id}", daemon=True)
                   for lk in self.links.values()]
        for t in threads:
            t.start()
        last = deadline + 15.0  # one deadline for all (a round in progress has its own timeouts)
        for t in threads:
            t.join(max(0.0, last - time.monotonic()))
        if self.stop.is_set():
            return
        with self.log.lock:
            after = self.log.ledger.version_vector().get(self.me, 0)
        if after > before:
            source = max(best, key=lambda p: best[p])
            log.warning("agent.recovered.own_feed seq=%d from=%s had=%d (this node's log lacked "
                        "its own newer events; it continues after them)", after, source, before)
        elif not answered and not before:
            raise MaildropError(
                f"no peer answered within {RECOVER_WAIT_EMPTY:.0f}s and this node's log holds no "
                "event of its own: starting a new feed could fork the one its peers hold; start "
                "it again once a peer is reachable")
        elif not before:
            log.info("agent.recover.fresh peers=%s (no peer holds a feed of this node; it starts one)",
                     ",".join(sorted(answered)))
        elif len(answered) < len(self.links):
            log.info("agent.recover.partial answered=%s peers=%d (an own event only an unreachable "
                     "peer holds would fork this feed)", ",".join(sorted(answered)) or "-", len(self.links))

    def _recovery_rounds(self, link: PeerLink, best: dict[str, int]) -> None:
        """Gossip rounds with ``link``'s peer on one channel until one brings nothing."""
        chan = link.client.open_channel()
        try:
            chan.settimeout(30.0)
            stream = FrameStream(chan)
            for _ in range(RECOVER_ROUNDS):
                with self.log.lock:
                    had = self.log.ledger.version_vector().get(self.me, 0)
                stats = gossip.call(stream, self.log)
                with self.log.lock:
                    now = self.log.ledger.version_vector().get(self.me, 0)
                if now > had:
                    best[link.id] = now
                if not stats.accepted:
                    return
        finally:
            with contextlib.suppress(Exception):
                chan.close()

    def _follow_keys(self) -> None:
        """Let each peer's SSH login key and pinned host key follow its feed's current key
        (the ledger holds a pinned peer's feed only when it passes through the pinned key)."""
        with self._keys_lock:  # a reload may add or remove peers meanwhile: all under the lock
            with self.log.lock:
                now = {p: self.log.ledger.key_of(p) or pin for p, pin in self._peer_keys.items()}
            changed = {p: k for p, k in now.items() if k != self._peer_keys[p]}
            if not changed:
                return
            self._peer_keys = now
            links = [(self.links.get(p), key) for p, key in changed.items()]
            if self.server is not None:  # quick (the server's own lock): under ours, so a
                self.server.set_authorized(dict(now))  # reload cannot re-authorize a removed peer
        for (p, key), (link, _) in zip(changed.items(), links, strict=True):
            log.warning("peer.key.rotated peer=%s key=%s… (its feed rotated to a new key, "
                        "signed by the old one; the config still pins the old key: update "
                        "peers[].key)", p, key[:32])
            if link is not None:  # cuts a connect under way short; never under _keys_lock
                link.client.set_peer_key(key)
                link.rekeyed.set()

    def _spawn(self, name: str, target: Any, *args: Any) -> None:
        def body() -> None:
            try:
                target(*args)
            except Exception:
                log.exception("agent.service.crashed service=%s", name)
                raise
        t = threading.Thread(target=body, name=name, daemon=True)
        self._threads[name] = t
        t.start()

    def run(self, stop: threading.Event | None = None, reload: threading.Event | None = None,
            on_reload: Callable[[Config], None] | None = None) -> int:
        """Start, supervise until ``stop`` is set, stop cleanly. Returns an exit status.
        When ``reload`` is set (a SIGHUP handler sets it), the main loop clears it and calls
        ``reload()`` within ``STATUS_EVERY`` s, then ``on_reload`` with the config it applied."""
        if stop is not None:
            self.stop = stop
        self.start()
        self.write_status()
        sdnotify.ready(f"node {self.me} listening on {format_hostport(self.server.address)}")  # type: ignore[union-attr]
        wd = sdnotify.watchdog_interval()
        status = 0
        next_wd = 0.0
        next_history = time.monotonic() + HISTORY_SWEEP_EVERY
        while not self.stop.wait(STATUS_EVERY if wd is None else min(STATUS_EVERY, wd)):
            if time.monotonic() >= next_history:
                next_history = time.monotonic() + HISTORY_SWEEP_EVERY
                self._sweep_soon()
            if reload is not None and reload.is_set():
                reload.clear()
                applied = self.reload()
                if applied is not None and on_reload is not None:
                    on_reload(applied)
            dead = [n for n, t in self._threads.items() if not t.is_alive()]
            if dead:
                log.error("agent.service.died services=%s; stopping so the supervisor restarts us",
                          ",".join(dead))
                status = 1
                break
            if self.log.refresh():
                self._changed()
            self.control.poll()  # queue/flush/cancel/hold/release requests from the CLI
            self._recheck_sync()
            self._snapshot_due()
            self.write_status()
            if wd is not None and time.monotonic() >= next_wd:
                sdnotify.watchdog_ping()
                next_wd = time.monotonic() + wd
        self.shutdown()
        return status

    def _snapshot_due(self, stopping: bool = False) -> None:
        """Write ``state/snapshot.json`` when enough events joined since the last one
        (``SNAPSHOT_EVERY_EVENTS``, and a ``1 / SNAPSHOT_GROWTH`` share of all held: a start
        that replayed a long log writes one at its first tick), or any did and
        ``SNAPSHOT_EVERY`` s passed, or at a clean stop. Called by the main loop; a write
        takes time ∝ the events held, so it runs on its own short-lived thread (one at a
        time, never supervised: a failure is logged and costs only a longer next start);
        at a stop it runs here, after the one in progress."""
        writer = self._snapshotting
        if writer is not None and writer.is_alive():
            if not stopping:
                return
            writer.join()
        held = self.log.ledger.count
        new = held - self._snapshot_count
        if new <= 0 or not (stopping or new >= max(SNAPSHOT_EVERY_EVENTS, held // SNAPSHOT_GROWTH)
                            or time.monotonic() - self._snapshot_at >= SNAPSHOT_EVERY):
            return
        self._snapshot_at = time.monotonic()
        if stopping:
            self._write_snapshot()
            return
        self._snapshotting = threading.Thread(target=self._write_snapshot, name="snapshot", daemon=True)
        self._snapshotting.start()

    def _write_snapshot(self) -> None:
        try:
            self._snapshot_count = self.log.write_snapshot()
        except MaildropError as exc:
            log.warning("snapshot.failed error=%s (the next start replays more of the log)", exc)

    def shutdown(self) -> None:
        sdnotify.stopping()
        self.stop.set()
        self.custodian.kick()
        self._notice_kick.set()
        for link in self.links.values():
            link.halt.set()
            link.kick.set()
            link.rekeyed.set()
        if self.server is not None:
            self.server.stop()
        if self.local is not None:
            self.local.stop()
        self.metrics.stop()
        for link in self.links.values():
            link.client.close()
        with self._lanes_lock:
            lanes_now = list(self._lanes.values())
        for lanes in lanes_now:
            lanes.shutdown()
        for name, t in self._threads.items():
            t.join(3.0)
            if t.is_alive():
                log.warning("agent.stop.slow service=%s", name)
        self._notice_senders.shutdown(wait=True, cancel_futures=True)
        self.write_status(running=False)
        self._snapshot_due(stopping=True)
        sweeper = self._sweeping
        if sweeper is not None:
            sweeper.join(10.0)  # it stops after its batch (``sweep_history``)
        self.notices.close()
        self.log.close()
        logging.getLogger("maildrop").removeHandler(self._errors)
        log.info("agent.stopped node=%s", self.me)

    # -- reload (SIGHUP, systemctl reload) -------------------------------------------------------
    RELOADABLE = frozenset({"display_name", "advertise", "peers", "gossip_interval",
                            "link_down_after", "expire_after", "resend_after", "max_file_size",
                            "min_free_space", "parallel", "log_level", "log_json", "admission",
                            "history_keep"})
    """Config fields ``reload`` applies to the running agent (``log.*`` through ``run``'s
    ``on_reload``). Any other field that changed (node.id, node.listen, root, key, outbox.*,
    metrics.listen, and every field added later) needs a restart."""
    _YAML_NAMES = {"node_id": "node.id", "display_name": "node.display_name",
                   "listen": "node.listen", "advertise": "node.advertise", "key_path": "key",
                   "gossip_interval": "gossip.interval", "link_down_after": "gossip.link_down_after",
                   "expire_after": "transfers.expire_after", "resend_after": "transfers.resend_after",
                   "max_file_size": "transfers.max_file_size",
                   "min_free_space": "transfers.min_free_space", "parallel": "transfers.parallel",
                   "settle": "outbox.settle", "rescan_interval": "outbox.rescan_interval",
                   "polling": "outbox.polling", "history_keep": "history.keep",
                   "log_level": "log.level", "log_json": "log.json",
                   "metrics_listen": "metrics.listen"}
    """Config fields by the YAML keys an operator knows them as (the others: their own name)."""

    def reload(self) -> Config | None:
        """Re-read the config file and apply it whole, or refuse it whole; runs on the main
        thread (``run``), never raises for a bad file, returns the config applied or None.

        Refused, with one ``agent.reload.refused file=... reason=...`` line and the running
        config kept in force: a file that does not load (YAML error, unknown key, bad value),
        one that changes a field outside ``RELOADABLE`` (reason ``restart needed for ...``),
        and one whose key file now holds another key. Applied otherwise: limits, intervals
        and the expire/resend policy at once; peers: an added one gets a link, its pinned key
        and a gossip thread; a removed one's link is retired (its gossip thread ends, its
        connections close, its logins are refused); a changed address or key is a retired
        link and a new one. Unchanged peers keep their connections and every transfer in
        flight goes on (``parallel`` applies to hops that start after the reload). Then the
        config facts are announced (``link.configured``, ``link.removed``, ``node.configured``)
        and one ``agent.reloaded`` line lists what changed. systemd sees ``RELOADING=1`` and
        then ``READY=1``."""
        path = self.config.path
        sdnotify.notify(f"RELOADING=1\nMONOTONIC_USEC={time.monotonic_ns() // 1000}")
        try:
            try:  # everything that can fail comes before the first change
                new = load_config(path)
                why = self._reload_refusal(new)
                fresh = {} if why else {p.id: self._new_link(p) for p in new.peers
                                        if self.config.peer(p.id) != p}
            except ConfigError as exc:
                why = str(exc)
            if why:
                log.error("agent.reload.refused file=%s reason=%s; the running config stays in force",
                          path, why)
                return None
            return self._apply(new, fresh)
        except Exception:  # a bug here must not kill the agent: say so, keep running
            log.exception("agent.reload.failed file=%s; the config may be partly applied: restart "
                          "the agent (systemctl restart maildrop)", path)
            return None
        finally:
            sdnotify.ready(f"node {self.me} listening on {format_hostport(self.server.address)}"  # type: ignore[union-attr]
                           if self.server else "")

    def _reload_refusal(self, new: Config) -> str:
        """Why ``new`` cannot be applied to the running agent ("" if it can)."""
        old = self.config
        fixed = [self._YAML_NAMES.get(f.name, f.name) for f in fields(Config)
                 if f.name not in self.RELOADABLE and f.name != "path"
                 and getattr(old, f.name) != getattr(new, f.name)]
        if fixed:
            return f"restart needed for {', '.join(fixed)} (systemctl restart maildrop)"
        try:
            now = load_key(new.key_path).public_line
        except (ConfigError, OSError) as exc:
            return f"key: {exc}"
        if now != self.key.public_line:
            return f"restart needed for key: {new.key_path} holds another key than the running one"
        return ""

    def _apply(self, new: Config, fresh: dict[str, PeerLink]) -> Config:
        """Apply ``new`` (checked by ``_reload_refusal``); ``fresh``: the links of the peers
        it adds or changes, already made."""
        old, self.config = self.config, new
        before, after = {p.id: p for p in old.peers}, {p.id: p for p in new.peers}
        gone = sorted(p for p in before if p not in after or before[p] != after[p])
        added = sorted(fresh)
        self.notices.max_age = NOTICE_AGE_FACTOR * new.expire_after
        self.policy = replace(self.policy, expire_after=new.expire_after, resend_after=new.resend_after,
                              confirm_after=CONFIRM_ROUNDS * new.gossip_interval)
        # Plain attribute writes: the checks that read them take one value each time.
        self.custody.max_file_size = new.max_file_size
        self.custody.min_free_space = new.min_free_space
        self.custody.stale_after = new.expire_after
        self.custody.silence_after = new.link_down_after
        self.log.set_pins(remove=gone, add={p: after[p].key for p in added})
        links = dict(self.links)
        retired = [links.pop(p) for p in gone]
        links.update(fresh)
        with self._keys_lock:
            keys = {p: k for p, k in self._peer_keys.items() if p in links and p not in fresh}
            self.links = links
            self._peer_keys = keys | {p: after[p].key for p in fresh}
        for link in retired:
            self._retire(link)
        if self.server is not None:
            for link in fresh.values():  # before set_authorized lets their logins in
                self._attach(link)
        for link in links.values():  # fresh ones too: reload made them under the old config
            link.client.silence_after = new.link_down_after
        # New lanes for a new ``parallel`` and for new or changed peers (offers already
        # submitted run on in the old lanes, which then end).
        with self._lanes_lock:
            old_lanes = self._lanes
            keep = {p: lanes for p, lanes in old_lanes.items()
                    if p in links and p not in fresh and new.parallel == old.parallel}
            self._lanes = keep
        for p, lanes in old_lanes.items():
            if p not in keep:
                lanes.shutdown()
        self._follow_keys()
        if self.server is not None:
            with self._keys_lock:
                authorized = dict(self._peer_keys)
            self.server.set_authorized(authorized)
        for link in fresh.values():
            self._spawn(f"gossip:{link.id}", self._gossip_loop, link)
        announced = announce(new, self.key, self.log)
        changed = [self._YAML_NAMES.get(f.name, f.name) for f in fields(Config)
                   if f.name not in ("path", "peers") and getattr(old, f.name) != getattr(new, f.name)]
        log.info("agent.reloaded file=%s peers_added=%s peers_removed=%s changed=%s announced=%d",
                 new.path, ",".join(p for p in added if p not in before) or "-",
                 ",".join(p for p in gone if p not in after) or "-",
                 ",".join(changed + [f"peers.{p}" for p in added if p in before]) or "-",
                 len(announced))
        self._changed()
        return new

    def _new_link(self, peer: Peer) -> PeerLink:
        """The soft state and client of one configured peer (at start, or added by a
        reload): our SSH client, or the ``ssh`` program for ``via: openssh``. The client
        falls back to the key before the latest rotation, if any. Its timeouts derive from
        gossip.link_down_after (``_apply`` sets them again on reload)."""
        old = load_old_key(self.config.key_path)
        fallback = [old] if old else []
        if peer.via == "openssh":
            return PeerLink(peer.id, peer.address, openssh.OpenSSHClient(
                self.me, self.key, peer, self.config.state_dir, fallback=fallback,
                silence_after=self.config.link_down_after, logger=logging.getLogger("maildrop.openssh")))
        return PeerLink(peer.id, peer.address,
                        PeerClient(self.me, self.key, peer.id, peer.address, peer.key,
                                   silence_after=self.config.link_down_after, fallback=fallback))

    def _attach(self, link: PeerLink) -> None:
        """Let the server hand the peer's logins to the link's client (our own SSH client
        only: a ``via: openssh`` peer's channels are ``ssh`` processes, one each)."""
        if isinstance(link.client, PeerClient):
            self.server.attach(link.client)

    def _authorized(self) -> dict[str, str]:
        """The peers that may log in now, with their current keys (for ``maildrop serve``)."""
        with self._keys_lock:
            return dict(self._peer_keys)

    def _retire(self, link: PeerLink) -> None:
        """End a link a reload removed or replaced: its gossip loop and hops stop (``halt``),
        its connection closes; the thread is no longer supervised (it ends by itself)."""
        link.halt.set()
        link.kick.set()
        link.rekeyed.set()
        if self.server is not None and isinstance(link.client, PeerClient):
            self.server.detach(link.client)
        link.client.close()
        self._threads.pop(f"gossip:{link.id}", None)

    def _changed(self) -> None:
        """New facts or new custody: follow rotated peer keys, replan now and tell the peers soon."""
        self._follow_keys()
        self.custodian.kick()
        self._notice_kick.set()
        for link in self.links.values():
            link.kick.set()

    # -- incoming calls (the transport's ChannelHandler) ---------------------------------------
    def handle_channel(self, peer_id: str, channel: Any) -> None:
        stream = FrameStream(channel)
        link = self.links.get(peer_id)
        while not self.stop.is_set():
            try:
                frame = stream.recv(expect=SERVE_OPS)
                if link is not None and self._ready.is_set():  # link.up waits for recovery
                    self._observe(link, True)
                if frame.op == "fingerprint":
                    ours = gossip.answer_fingerprint(stream, frame, self.log)
                    if link is not None:
                        self._compare_fingerprints(link, ours, frame["fp"])
                elif frame.op == "buckets":
                    gossip.answer_buckets(stream, frame, self.log)
                elif frame.op == "gossip":
                    stats = gossip.answer_gossip(stream, frame, self.log)
                    self._after_gossip(peer_id, stats)
                elif frame.op == "offer" and not self._ready.is_set():
                    stream.send("refuse", reason="busy", detail="starting: taking back this node's own feed")
                elif frame.op == "offer":
                    self.custody.receive_offer(peer_id, stream, frame, self.custodian)
                elif frame.op == "ping":
                    stream.send("pong")
                elif frame.op == "notice":
                    self._serve_notice(peer_id, stream, frame)
            except (TimeoutError, EOFError, OSError):
                return  # the peer went away or went silent: the channel ends here
            except ProtocolError as exc:  # a bad frame, also one met mid-gossip
                log.warning("protocol.refused peer=%s reason=%s", peer_id, exc)
                with contextlib.suppress(Exception):
                    stream.send("error", reason=str(exc)[:200])
                return

    def _after_gossip(self, peer_id: str, stats: gossip.RoundStats) -> None:
        self.metrics.gossiped(peer_id, stats.accepted, stats.rejected)
        if stats.rejected:
            log.warning("gossip.rejected peer=%s count=%d", peer_id, stats.rejected)
        if stats.accepted:
            log.debug("gossip.accepted peer=%s count=%d", peer_id, stats.accepted)
            self._changed()

    # -- gossip and liveness ---------------------------------------------------------------------
    def _gossip_loop(self, link: PeerLink) -> None:
        """Gossip with ``link``'s peer until the agent stops or a reload retires the link
        (``link.halt``, set in both cases, ends every wait here). The interval is re-read
        every round (a reload may change it)."""
        while not link.halt.is_set() and not self.stop.is_set():
            interval = self.config.gossip_interval
            # Clear before the round, not after the wait: a kick that lands while a round runs
            # (or just after the wait ends) then always gets a round of its own.
            link.kick.clear()
            try:
                for attempt in Retrying(
                    retry=retry_if_exception(self._transient),
                    wait=wait_random_exponential(multiplier=0.2, max=max(2 * interval, 1.0)),
                    stop=lambda _rs, link=link: link.halt.is_set() or self.stop.is_set(),
                    sleep=link.halt.wait,
                    before_sleep=lambda rs, link=link: self._round_failed(link, rs.outcome.exception()),
                    reraise=True,
                ):
                    with attempt:
                        self._gossip_round(link)
            except Exception as exc:  # permanent: wrong host key, auth refused
                if link.halt.is_set() or self.stop.is_set():
                    return
                self._round_failed(link, exc)
                log.error("gossip.peer.refused peer=%s reason=%s; fix the key in the config", link.id, exc)
                link.rekeyed.wait(max(30.0, interval * 6))  # sooner when its key rotated
                link.rekeyed.clear()
                continue
            self._report_health(link)
            link.kick.wait(interval * random.uniform(0.8, 1.2))

    @staticmethod
    def _transient(exc: BaseException) -> bool:
        """Worth retrying: anything but a refusal that only an operator can fix (wrong host
        key, login refused, incompatible peer). A broken channel, a timeout or a local hiccup
        is retried with backoff. A receiver's refusal is its answer, not a hiccup: asking
        again at once gets the same answer (the caller decides when to offer again)."""
        if isinstance(exc, TransferRefused):
            return False
        return is_transient(exc) or not isinstance(exc, PERMANENT)

    def _gossip_round(self, link: PeerLink) -> None:
        """One gossip round on the link's gossip channel (opened if needed). A peer silent
        for ``link_down_after`` (the client's ``silence_after``) fails the round: waiting
        for the channel, or for any answer on it. So does a connection that dropped since
        the last round (the gossip channel is idle between rounds, and the link may have a
        new connection by now, redialed or adopted): the link went down, an outage, though
        the next try finds it up. A channel on a live duplicate that is being closed is no
        failure: the round moves to the connection kept."""
        silence = link.client.silence_after  # re-read every round: a reload may change it
        if link.chan is not None and link.client.dropped(link.chan):
            self._close_gossip(link)
            raise PeerUnreachable(f"peer {link.id}: the connection dropped")
        if link.chan is not None and not link.client.carries(link.chan):
            self._close_gossip(link)  # a duplicate connection is going: move to the one kept
        self._prune_pool(link)
        if link.stream is None:
            link.chan = link.client.open_channel(timeout=silence)
            link.stream = FrameStream(link.chan)
        link.chan.settimeout(silence)
        started = time.monotonic()
        try:
            stats = gossip.call(link.stream, self.log)
        except BaseException:
            self._close_gossip(link)
            raise
        # An in-sync round is one Fingerprint call: one round trip, about 200 bytes each way.
        link.measure(rtt=time.monotonic() - started if stats.in_sync else None, ok=True)
        link.rounds += 1
        self._observe(link, True)
        self._compare_fingerprints(link, stats.fingerprint, stats.peer_fingerprint)
        if stats.accepted or stats.rejected:
            self._after_gossip(link.id, stats)

    @staticmethod
    def _compare_fingerprints(link: PeerLink, ours: str, theirs: str | None) -> None:
        """Compare the peer's fingerprint (``theirs``: just heard, or None: its last one)
        with ``ours`` and remember the outcome (``gossip.compare``)."""
        now = time.time()
        with link.sync_lock:
            link.sync = gossip.compare(link.sync, ours, theirs, now)

    def _recheck_sync(self) -> None:
        """Every peer's last fingerprint against ours now (main loop, every second): a peer
        that went away while our log moved on differs from the moment we changed."""
        ours = self.log.fingerprint()
        for link in list(self.links.values()):
            self._compare_fingerprints(link, ours, None)

    @staticmethod
    def _prune_pool(link: PeerLink) -> None:
        """Close the pooled relay channels that ride a duplicate connection being closed
        (it closes once its last channel has)."""
        with link.pool_lock:
            keep = [(t, s) for t, s in link.pool if link.client.carries(s.chan)]
            stale = [s for _, s in link.pool if all(s is not k for _, k in keep)]
            link.pool[:] = keep
        for stream in stale:
            with contextlib.suppress(Exception):
                stream.chan.close()

    def _close_gossip(self, link: PeerLink) -> None:
        with contextlib.suppress(Exception):
            if link.chan is not None:
                link.chan.close()
        link.chan = link.stream = None

    def _round_failed(self, link: PeerLink, exc: BaseException | None) -> None:
        link.last_error = f"{exc.__class__.__name__}: {exc}"[:200] if exc else ""
        log.debug("gossip.round.failed peer=%s error=%s", link.id, link.last_error)
        if link.state == "up":  # a link that broke; retries while it is down are one outage
            link.measure(ok=False)
        self._observe(link, False)
        self._report_health(link)

    def _report_health(self, link: PeerLink) -> None:
        """Append a ``link.health`` for ``link`` when one is due (``health.report``: a
        bucket changed, and the debounce allows it). Called by the link's gossip thread after
        every round, ok or failed. The window and the debounce are counted in gossip
        intervals; a reload that changes the interval changes them from the next round."""
        interval = self.config.gossip_interval
        window = health.WINDOW_ROUNDS * interval
        with link.meter_lock:
            reading = link.meter.reading(time.monotonic(), window)
        with link.observe_lock:
            now = time.time()
            with self.log.lock:
                last = self.log.network.health(self.me, link.id)
            data = health.report(reading, last, now, window, health.MIN_INTERVAL_ROUNDS * interval)
            if data is None:
                return
            log.info("link.health peer=%s rtt_ms=%d loss=%d flaps=%d window=%d", link.id,
                     data["rtt_ms"], data["loss"], data["flaps"], data["window"])
            self._append(E.LINK_HEALTH, {"peer": link.id, **data})

    def _observe(self, link: PeerLink, up: bool) -> None:
        """Soft liveness, and a debounced ``link.up``/``link.down`` fact on a change."""
        now = time.time()
        if up and link.state == "up":
            link.last_seen = now  # the common case: nothing changed, no lock, no event
            return
        with link.observe_lock:
            self._observe_change(link, up, now)

    def _observe_change(self, link: PeerLink, up: bool, now: float) -> None:
        """``_observe``'s slow path, under ``link.observe_lock``."""
        with self.log.lock:
            last = self.log.network.last_observation(self.me, link.id)
        if up:
            link.last_seen, link.down_since = now, None
            if link.state != "up":
                log.info("link.up peer=%s", link.id)
                self.custodian.link_changed(link.id, True)  # what waits for it: try now
                self._notice_kick.set()
            link.state = "up"
            if last is None or not last[0]:
                self._append(E.LINK_UP, {"peer": link.id})
            return
        if link.down_since is None:
            link.down_since = now
        if link.state == "up":
            link.measure(outage=True)
        if link.state != "down":
            log.warning("link.unreachable peer=%s error=%s", link.id, link.last_error)
            self.custodian.link_changed(link.id, False)  # offers over it: re-planned at once
        link.state = "down"
        # Silence is counted from the last word heard (not from this failure, which comes up
        # to a round's timeout later); a peer never heard from, from the first failure.
        since = link.last_seen if link.last_seen is not None else link.down_since
        if now - since >= self.config.link_down_after and (last is None or last[0]):
            log.warning("link.down peer=%s after=%.1fs", link.id, now - since)  # of silence
            self._append(E.LINK_DOWN, {"peer": link.id})

    def _append(self, type_: str, data: dict[str, Any]) -> None:
        self.log.append_own(self.key, self.me, [(type_, data)], time.time())
        self._changed()

    # -- cut-through: forward a big file while it arrives -----------------------------------
    def _on_receiving(self, queued: Event, passed: tuple[str, ...], prog: Any, _fd: int) -> None:
        """Called on the receiving thread as a big file starts to arrive at this relay: when
        its next hop is up, forward it from the growing part file on a thread of its own."""
        tid = queued.data["transfer"]
        arriving = L.arriving(tid, queued.origin, queued.data["destination"], queued.data["size"],
                              0.0, self.me, passed[-2] if len(passed) > 1 else queued.origin, 0, passed)
        with self.log.lock:
            hop = choose_hop(self.log.network, self.me, arriving, self.log.ledger.conflicts)
        link = self.links.get(hop) if hop is not None else None  # (a reload may remove it)
        if link is None or link.state != "up":
            return  # store first; the service forwards it after
        try:
            rfd = os.open(self.spool.part(tid), os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return
        self.custodian.cutting(tid, True)
        threading.Thread(target=self._cut_through, args=(tid, link, passed, prog, rfd),
                         name=f"cut:{tid[:8]}", daemon=True).start()

    def _cut_through(self, tid: str, link: PeerLink, passed: tuple[str, ...], prog: Any, rfd: int) -> None:
        final: list[Answer] = []

        def report(_tid: str, ans: Answer) -> None:
            if ans.a != "accept":
                final.append(ans)
        try:
            item = self.custody.outgoing(tid, passed)
            with self._relay_channel(link) as stream:
                self.custody.send_batch(link.id, stream, [item], report, growing=(prog, rfd))
        except Exception as exc:
            log.info("relay.cut_through.stopped transfer=%s peer=%s error=%s", tid, link.id, exc)
        finally:
            os.close(rfd)
        # Let go only once our own copy is whole and verified (our sender got "stored").
        with prog.cond:
            while prog.finished is None and not self.stop.is_set():
                prog.cond.wait(1.0)
            mine = prog.finished
        if mine and final and final[-1].a in ("stored", "have"):
            log.info("relay.hop.done transfer=%s peer=%s result=%s cut_through=yes", tid, link.id, final[-1].a)
            self.custodian.post(tid, L.ForwardedEarly(link.id))
        self.custodian.cutting(tid, False)  # after ForwardedEarly: planned again only if needed

    # -- outbox and hops ------------------------------------------------------------------------
    def _on_outbox_file(self, path: Any, destination: str) -> None:
        """Watcher callback: hand the file to the taker (which batches), never block here."""
        self._take_q.put((path, destination))

    def _taker_loop(self) -> None:
        """Take outbox files in batches: under load many files share a handful of syncs.
        Files still queued at shutdown stay in the outbox and are taken at the next start."""
        unfinished_since: float | None = None
        while not self.stop.is_set():
            if unfinished_since is not None and time.monotonic() - unfinished_since >= BROKEN_RETRY:
                # A take that failed after its files moved into the spool (its intent is still
                # there): finish it here, on the one thread that takes, never beside a take.
                unfinished_since = None if self.custody.replay_takes() else time.monotonic()
            try:
                batch = [self._take_q.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < TAKE_BATCH:
                try:
                    batch.append(self._take_q.get_nowait())
                except queue.Empty:
                    break
            try:
                self.custody.take_batch(batch)
            except Exception:  # e.g. a full disk at the append
                log.exception("outbox.take.failed files=%d: files still in the outbox are taken "
                              "at the next rescan; files already in the spool are queued within "
                              "%.0f s (or at the next start)", len(batch), BROKEN_RETRY)
                unfinished_since = time.monotonic()

    def _sweep_soon(self) -> None:
        """Start ``sweep_history`` on a ``history-sweep`` thread unless one still runs: a
        store mostly past its window takes a while to sweep (~75 s for 800,000 transfers),
        and neither the start nor the main loop's watchdog pings may wait for it."""
        if self._sweeping is not None and self._sweeping.is_alive():
            return
        self._sweeping = threading.Thread(target=self.sweep_history, name="history-sweep", daemon=True)
        self._sweeping.start()

    def sweep_history(self) -> int:
        """Retention (``history.keep``): drop the facts of transfers that ended longer ago,
        and the exactly-once memory past its horizon (``transfers.expire_after`` +
        ``transfers.STALE_MARGIN``, the age from which offers are refused as ``stale``).
        Runs on its own thread (``_sweep_soon``) at start and every ``HISTORY_SWEEP_EVERY`` s,
        in batches; a stop ends it after its batch. A failure is logged, never fatal."""
        t0 = time.monotonic()
        try:
            n = self.log.facts.sweep(time.time(), self.config.history_keep,
                                     self.config.expire_after + STALE_MARGIN, until=self.stop.is_set)
        except Exception:
            log.exception("history.sweep.failed")
            return 0
        if n:
            log.info("history.swept transfers=%d keep=%.0f seconds=%.2f", n, self.config.history_keep,
                     time.monotonic() - t0)
        return n

    def _after_sweep(self) -> None:
        """Make ``outbox/<id>/`` for every node a route reaches (not for every node known:
        ids cost a folder and a watch each)."""
        with self.log.lock:
            near = reachable(self.log.network, self.me, excluded=self.log.ledger.conflicts)
        ensure_outbox(self.config.outbox, sorted(near - {self.me}))

    def _dispatch(self, hop: str, jobs: list[Job]) -> None:
        """The custody service's offers for ``hop``, onto that peer's own lanes: small files
        in batches (one offer each) on the small lane, big ones one by one on the big lane.
        A stuck peer fills only its own lanes. Raises KeyError for a peer a reload removed."""
        link = self.links[hop]
        lanes = self._lanes_of(link)
        small = [j for j in jobs if j.size <= SMALL_FILE]
        for i in range(0, len(small), MAX_BATCH):
            lanes.small.submit(self._send_jobs, link, small[i:i + MAX_BATCH])
        for j in jobs:
            if j.size > SMALL_FILE:
                lanes.big.submit(self._send_jobs, link, [j])

    def _lanes_of(self, link: PeerLink) -> Lanes:
        with self._lanes_lock:
            lanes = self._lanes.get(link.id)
            if lanes is None:
                lanes = self._lanes[link.id] = Lanes.for_peer(link.id, self.config.parallel)
            return lanes

    def _send_jobs(self, link: PeerLink, jobs: list[Job]) -> None:
        """One hop worker's offer: the jobs still current, in offers that fit a header, on
        one relay channel; every answer is posted to the custody service. A broken channel
        is one ``Broke`` for every file not answered yet: the service backs off and reroutes.
        Whatever fails here, every job gets an answer (no transfer waits for one in vain)."""
        try:
            self._offer_jobs(link, jobs)
        except Exception as exc:
            log.exception("relay.hop.crashed peer=%s files=%d", link.id, len(jobs))
            for j in jobs:
                self.custodian.post(j.transfer, L.Broke(j.token, f"crashed: {exc!r}"[:300]))

    def _offer_jobs(self, link: PeerLink, jobs: list[Job]) -> None:
        hop = link.id
        live = [j for j in jobs if self.custodian.current(j.transfer, j.token)]
        tokens = {j.transfer: j.token for j in live}
        items = []
        for j in live:
            try:
                items.append(self.custody.outgoing(j.transfer, j.passed))
            except TransferRefused as exc:
                self.custodian.post(j.transfer, L.Refused(j.token, exc.reason, exc.detail))
                del tokens[j.transfer]
        if not items:
            return
        if self.stop.is_set() or link.halt.is_set():  # stopping, or a reload retired the link
            for tid, token in tokens.items():
                self.custodian.post(tid, L.Broke(token, f"the link to {hop} was closed"))
            return
        left = dict(tokens)

        def report(tid: str, ans: Answer) -> None:
            token = tokens[tid]
            if ans.a == "accept":
                self.custodian.post(tid, L.Accepted(token, ans.offset))
                return
            left.pop(tid, None)
            if ans.a == "refuse":
                log.warning("relay.hop.refused transfer=%s peer=%s reason=%s detail=%s",
                            tid, hop, ans.reason, ans.detail)
                self.metrics.hop_refused(hop, ans.reason)
                self.custodian.post(tid, L.Refused(token, ans.reason, ans.detail))
            else:
                log.info("relay.hop.done transfer=%s peer=%s result=%s", tid, hop, ans.a)
                self.custodian.post(tid, L.Handed(token, ans.a, ans.detail))
        try:
            with self._relay_channel(link) as stream:
                for chunk in offer_chunks(items):
                    self.custody.send_batch(hop, stream, chunk, report)
            link.measure(ok=True)
        except TransferRefused as exc:  # the whole offer (e.g. "busy": the peer is starting)
            link.measure(ok=True)  # an answer: the link works
            for tid in list(left):
                report(tid, Answer("refuse", reason=exc.reason, detail=exc.detail))
        except Exception as exc:
            link.measure(ok=False)
            cause = f"{exc.__class__.__name__}: {exc}"[:300]
            if left:
                log.warning("relay.hop.failed peer=%s files=%d error=%s; rerouting", hop, len(left), cause)
                self.metrics.hop_failed(hop)
            for tid, token in left.items():
                self.custodian.post(tid, L.Broke(token, cause))

    @contextlib.contextmanager
    def _relay_channel(self, link: PeerLink) -> Iterator[FrameStream]:
        """A relay channel to ``link``'s peer from its pool (or a new one). It goes back to
        the pool after a clean conversation (a refusal is one) and is closed after anything
        else. Reads time out after ``gossip.link_down_after`` of silence."""
        stream = None
        with link.pool_lock:
            while link.pool and stream is None:
                pooled_at, candidate = link.pool.pop()
                if candidate.chan.closed:
                    continue
                if not link.client.carries(candidate.chan):  # on a duplicate being closed
                    with contextlib.suppress(Exception):
                        candidate.chan.close()
                    continue
                if time.monotonic() - pooled_at > POOL_IDLE:
                    # the peer may be closing it as idle right now: never start an offer on it
                    with contextlib.suppress(Exception):
                        candidate.chan.close()
                    continue
                stream = candidate
        if stream is None:
            chan = link.client.open_channel(timeout=link.client.silence_after)
            chan.settimeout(link.client.silence_after)
            stream = FrameStream(chan)
        try:
            yield stream
        except TransferRefused:
            self._pool(link, stream)
            raise
        except BaseException:
            with contextlib.suppress(Exception):
                stream.chan.close()
            raise
        self._pool(link, stream)

    @staticmethod
    def _pool(link: PeerLink, stream: FrameStream) -> None:
        with link.pool_lock:
            link.pool.append((time.monotonic(), stream))

    # -- notices: facts routed to one node, with custody --------------------------------------
    def _notify(self, to: str, ev: Event) -> None:
        """``Custody.notify``: hold ``ev`` for ``to`` (``Notices.send``: durable on return)
        and wake the pump. A full queue (``notice.queue.full``, logged by the queue) or a
        queue that cannot be written is logged and not raised: the caller's fact is
        recorded already, only its routing is lost, and the custody step goes on."""
        try:
            self.notices.send(to, ev)
        except notices.QueueFull:
            return
        except sqlite3.Error as exc:
            log.error("notice.send.dropped to=%s fact=%s error=%s", to, ev.id[:16], exc)
            return
        self._notice_kick.set()

    def _notice_loop(self) -> None:
        """The notice pump: send what is due, then wait for a kick (a model change, a link
        up, a notice taken in) or the next due time (at most ``NOTICE_TICK``)."""
        while not self.stop.is_set():
            self._notice_kick.clear()
            try:
                wait = self._pump_notices()
            except Exception:
                log.exception("notice.pump.failed; trying again in %.0fs", NOTICE_TICK)
                wait = NOTICE_TICK
            self._notice_kick.wait(wait)

    def _pump_notices(self) -> float:
        """One pass: for each (destination, came from) with notices due, the next hop
        (``notices.next_hop``); the due notices of those whose hop is up and has no sender
        at work (at most ``NOTICE_BATCH`` per hop, none in flight already) go to a sender
        thread per hop. Notices with no hop up are not even read: they wait for a kick.
        Returns the seconds until the next pass."""
        now = time.time()
        sources = self.notices.sources(now)
        for came in [c for to, c in sources if to == self.me]:  # made for this node itself
            mine = self.notices.due(now, source=(self.me, came))
            self._hand_over([n.fact for n in mine])
            self.notices.done(self.me, [n.fact.id for n in mine])
        up = {lk.id for lk in list(self.links.values()) if lk.state == "up"}
        with self._notice_lock:
            busy, inflight = set(self._notice_hops), set(self._notice_inflight)
        plan: dict[str, list[tuple[str, str | None]]] = {}
        with self.log.lock:
            net, excluded = self.log.network, set(self.log.ledger.conflicts)
            for to, came in sources:
                if to == self.me:
                    continue
                hop = notices.next_hop(net, self.me, to, up=up, came_from=came, excluded=excluded)
                if hop is not None and hop not in busy:
                    plan.setdefault(hop, []).append((to, came))
        for hop, pairs in plan.items():
            group: list[notices.Notice] = []
            for pair in pairs:
                room = NOTICE_BATCH - len(group)
                if room > 0:
                    group += [n for n in self.notices.due(now, source=pair, limit=room)
                              if (n.to, n.fact.id) not in inflight]
            if not group:
                continue
            with self._notice_lock:
                self._notice_hops.add(hop)
                self._notice_inflight.update((n.to, n.fact.id) for n in group)
            try:
                self._notice_senders.submit(self._send_to_hop, hop, group)
            except RuntimeError:  # shut down: the agent is stopping
                return NOTICE_TICK
        nxt = self.notices.next_due(time.time())
        return NOTICE_TICK if nxt is None else min(NOTICE_TICK, max(0.05, nxt - time.time()))

    def _send_to_hop(self, hop: str, group: list[notices.Notice]) -> None:
        """A sender thread: ``group`` to ``hop`` in frames per (destination, hops so far);
        then the notices are free again and the pump looks at the queue."""
        try:
            frames: dict[tuple[str, int], list[notices.Notice]] = {}
            for n in group:
                frames.setdefault((n.to, n.hops), []).append(n)
            for (to, made), part in frames.items():
                for chunk in _notice_frames(part):
                    self._send_notices(hop, to, made, chunk)
        except Exception:
            log.exception("notice.send.crashed peer=%s facts=%d", hop, len(group))
        finally:
            with self._notice_lock:
                self._notice_hops.discard(hop)
                self._notice_inflight.difference_update((n.to, n.fact.id) for n in group)
            self._notice_kick.set()

    def _send_notices(self, hop: str, to: str, made: int, chunk: list[notices.Notice]) -> None:
        """One ``notice`` frame to ``hop``; what it stored is forgotten here, the rest backs off."""
        link = self.links.get(hop)
        if link is None or link.halt.is_set() or self.stop.is_set():
            return
        ids = [n.fact.id for n in chunk]
        try:
            with self._relay_channel(link) as stream:
                stream.send("notice", to=to, hops=made, facts=[n.fact.to_dict() for n in chunk])
                reply = stream.recv(expect={"notice.stored", "refuse"})
        except Exception as exc:
            log.info("notice.send.failed peer=%s to=%s facts=%d error=%s", hop, to, len(ids),
                     f"{exc.__class__.__name__}: {exc}"[:200])
            self.notices.failed(to, ids, time.time())
            return
        if reply.op == "refuse":
            log.warning("notice.send.refused peer=%s to=%s facts=%d reason=%s detail=%s", hop, to,
                        len(ids), reply["reason"], reply["detail"])
            self.notices.failed(to, ids, time.time())
            return
        stored = [i for i in ids if i in {s for s in reply["stored"] if isinstance(s, str)}]
        self.notices.done(to, stored)
        for word in reply["refused"][:len(ids)]:
            if isinstance(word, dict):
                log.warning("notice.send.refused peer=%s to=%s fact=%s reason=%s", hop, to,
                            E.brief(word.get("id"), 16), E.brief(word.get("reason"), 40))
        self.notices.failed(to, [i for i in ids if i not in set(stored)], time.time())
        if stored:
            log.info("notice.sent peer=%s to=%s facts=%d", hop, to, len(stored))

    def _serve_notice(self, peer_id: str, stream: FrameStream, frame: Any) -> None:
        """Answer a peer's ``notice`` frame: check it whole (``_notice_frame_refusal``:
        refused whole with one ``notice.refused`` line), then each fact; hold the good ones
        durably (for another node) or hand them over (for this one), and answer
        ``notice.stored`` with the ids stored and the refused ones with their reason."""
        to, made, raw = frame["to"], frame["hops"], frame["facts"]
        reason = self._notice_frame_refusal(peer_id, to, made, raw)
        if reason is not None:
            log.warning("notice.refused peer=%s reason=%s to=%s facts=%d", peer_id, reason[0],
                        E.brief(to, 40), len(raw))
            stream.send("refuse", reason=reason[0], detail=reason[1])
            return
        now = time.time()
        good: list[Event] = []
        refused: list[dict[str, str]] = []
        for item in raw:
            ev, why = self._check_notice_fact(item, now)
            if ev is None:
                fid = item.get("id") if isinstance(item, dict) and isinstance(item.get("id"), str) else ""
                log.warning("notice.refused peer=%s reason=%s fact=%s", peer_id, why, E.brief(fid, 16))
                refused.append({"id": fid[:64], "reason": why})
            else:
                good.append(ev)
        failpoint("notice.before_store")
        try:
            if to == self.me:
                stored = self._hand_over(good)
            else:
                stored = self.notices.accept(to, good, came_from=peer_id, hops=made + 1)
                refused += [{"id": ev.id, "reason": "full"} for ev in good if ev.id not in set(stored)]
        except sqlite3.Error as exc:  # e.g. a full disk: nothing of it is promised
            log.error("notice.store.failed peer=%s facts=%d error=%s", peer_id, len(good), exc)
            stream.send("refuse", reason="store-failed", detail=str(exc)[:200])
            return
        if stored and to != self.me:
            self._notice_kick.set()
        stream.send("notice.stored", stored=stored, refused=refused)

    def _notice_frame_refusal(self, peer_id: str, to: str, made: int, raw: list[Any]) -> tuple[str, str] | None:
        """Why a ``notice`` frame is refused whole (reason, detail), or None."""
        if not self._ready.is_set():
            return "busy", "starting: taking back this node's own feed"
        if not 1 <= len(raw) <= MAX_NOTICE_FACTS:
            return "too-large", f"1 to {MAX_NOTICE_FACTS} facts in one frame"
        try:
            size = len(E.canonical(raw))
        except (ValueError, TypeError, RecursionError):
            return "bad-fact", "the facts are not JSON"
        if size > MAX_NOTICE_BYTES:
            return "too-large", f"the facts take {size} bytes, more than {MAX_NOTICE_BYTES}"
        if made < 0 or made >= MAX_NOTICE_HOPS:
            return "hop-limit", f"the notice made {made} hops (at most {MAX_NOTICE_HOPS})"
        if to == peer_id:
            return "loop", "a notice for the sender itself"
        with self.log.lock:
            known = to in self.log.network.nodes
        if not known:
            return "unknown-destination", f"no node {E.brief(to, 40)} is known here"
        return None

    def _check_notice_fact(self, item: Any, now: float) -> tuple[Event | None, str]:
        """One fact of a ``notice`` frame: (the event, "") or (None, the reason it is refused)."""
        if not isinstance(item, dict):
            return None, "bad-fact"
        try:
            ev = E.parse_event(item)
        except MaildropError:
            return None, "bad-fact"
        if ev.type not in notices.FACT_TYPES:
            return None, "not-a-transfer-fact"
        with self.log.lock:
            key = self.log.ledger.key_of(ev.origin)
        if key is None:
            return None, "unknown-origin"
        if not ev.verify_signature(key):
            return None, "bad-signature"
        if self.notices.too_old(ev, now):
            return None, "expired"
        return ev, ""

    def _hand_over(self, facts: list[Event]) -> list[str]:
        """Facts that reached this node: each one not handed over before goes to
        ``_on_notice``, then is remembered (``Notices.arrive``); returns the ids done. A
        crash between the two hands a fact over again when its hop resends it."""
        done: list[str] = []
        new: list[Event] = []
        for ev in facts:
            if ev.id in done:
                continue
            if not self.notices.arrived(ev.id):
                try:
                    self._on_notice(ev)
                except Exception:
                    log.exception("notice.handover.failed fact=%s", ev.id[:16])
                    continue
                new.append(ev)
            done.append(ev.id)
        if new:
            self.notices.arrive(new)
        return done

    def _on_notice(self, ev: Event) -> None:
        """A fact routed to this node arrived (once per fact id): into the fact store and the
        model (``EventLog.ingest_facts``: refused, and logged, when it is not about a
        transfer of ours); new facts replan at once."""
        res = self.log.ingest_facts([ev], addressed=True)
        log.info("notice.delivered to=%s fact=%s transfer=%s origin=%s new=%d", self.me, ev.type,
                 ev.data.get("transfer"), ev.origin, len(res.accepted))
        if res.accepted:
            self._changed()

    # -- soft state for status ----------------------------------------------------------------
    def status(self, running: bool = True) -> dict[str, Any]:
        return {
            "pid": os.getpid(), "node": self.me, "running": running,
            "started": self.started, "updated": time.time(),
            "listen": format_hostport(self.server.address) if self.server else None,
            "peers": [{"id": lk.id, "address": format_hostport(lk.address) if lk.address else None,
                       "state": lk.state,
                       "last_seen": lk.last_seen, "last_error": lk.last_error,
                       "gossip_rounds": lk.rounds, "bytes_sent": lk.client.bytes_sent,
                       "bytes_received": lk.client.bytes_received, **self._sync_status(lk)}
                      for lk in self.links.values()],
            "fingerprint": self.log.fingerprint(),
            "events": self.log.ledger.count,
            "inflight": self.custody.snapshot(),
            "notices": self.notices.counts(),
            **self._custody_status(),
            "errors": list(self._errors.items),
        }

    @staticmethod
    def _sync_status(link: PeerLink) -> dict[str, Any]:
        """The peer's fingerprint as last heard, and whether it equals ours (and since when
        they differ); nulls while it was never heard."""
        sync = link.sync
        if sync is None:
            return {"fingerprint": None, "fingerprint_heard": None, "in_sync": None, "differs_since": None}
        return sync.as_dict()

    def _custody_status(self) -> dict[str, Any]:
        """What the custody service holds, for ``status``: a count, and the transfers that
        wait for a reason (the first ``STATUS_REASONS``), with that reason."""
        held = self.custodian.snapshot()
        waiting = [{"transfer": t.id, "phase": t.phase, "hop": t.hop, "reason": t.reason,
                    "next_try": t.retry_at if t.phase in (L.QUEUED, L.DELIVERING) else None}
                   for t in held.values() if t.reason][:STATUS_REASONS]
        return {"held": sum(1 for t in held.values() if t.phase not in (L.RECEIVING, L.FORWARDED)),
                "custody": waiting}

    def write_status(self, running: bool = True) -> None:
        try:
            durable = json.dumps(self.status(running), sort_keys=True).encode()
            path = self.config.state_dir / STATUS_FILE
            tmp = path.with_name(f".{STATUS_FILE}.{os.getpid()}.tmp")
            tmp.write_bytes(durable)
            os.replace(tmp, path)  # soft state: atomic, not fsynced
        except OSError as exc:
            log.debug("agent.status.write_failed error=%s", exc)

    def metrics_sample(self) -> metrics.Sample:
        """What a metrics scrape reads (on the metrics server's thread): the custody
        service's snapshot, then the model under the log lock."""
        custody: collections.Counter[str] = collections.Counter(
            _METRIC_STATE.get(t.phase, t.phase) if not t.hold else "on-hold"
            for t in self.custodian.snapshot().values() if t.phase != L.FORWARDED)
        with self.log.lock:
            events, conflicts = self.log.ledger.count, len(self.log.ledger.conflicts)
        transfers = collections.Counter(self.log.facts.counts())
        peers = {lk.id: metrics.PeerSample(lk.state == "up", lk.rounds, lk.client.bytes_sent,
                                           lk.client.bytes_received)
                 for lk in list(self.links.values())}
        return metrics.Sample(custody, transfers, events, self.log.size_bytes, conflicts, peers,
                              self.notices.counts())


def _notice_frames(group: list[notices.Notice]) -> Iterator[list[notices.Notice]]:
    """``group`` cut into frames of at most ``MAX_NOTICE_FACTS`` facts and
    ``MAX_NOTICE_BYTES`` bytes (each fact is at most ``events.MAX_EVENT_BYTES``)."""
    return cut(group, lambda n: len(n.fact.to_line()), MAX_NOTICE_FACTS, MAX_NOTICE_BYTES)


__all__ = ["Agent", "announce", "open_log"]
