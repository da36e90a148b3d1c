"""``maildrop check``: validate config, key, folders and permissions; say what to fix.

Exit status: 0 when every check passed (warnings allowed), 1 when any failed, 2 when the
config itself cannot be used: then every problem in it is listed (one ``FAIL`` each, its
fix the problem's "expected ..."), stderr gets one line (the config error, or the number of
problems when there are several) and nothing else is checked.

``--json`` prints one JSON document instead of text (same exit status): ``config`` (the
file, null if none was found), ``node`` (null when the config cannot be used), ``checks``
(a list of ``{"check", "status": "ok"|"warn"|"fail", "what", "fix"}``; ``fix`` is null for
ok), ``failed``, ``warned`` and ``status`` (the exit status). ``--peers`` also dials each configured
peer, at most ``PEER_TIMEOUT`` seconds a stage, all peers at once: TCP connect, SSH
handshake, the host key against the configured one, our login; a failure is named in the
README's troubleshooting words, and its entry carries ``peer`` and ``stage``.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import socket
import stat
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from .config import Config, ConfigProblems, Peer, find_config, format_hostport, load_config
from .errors import MaildropError
from .ids import is_node_id
from .keys import NodeKey, load_key
from .spool import FolderRefused, open_folder

PEER_TIMEOUT = 5.0
"""Seconds ``--peers`` waits for a peer's TCP connect, then for each SSH stage."""


class _Report:
    """The results of the checks: printed as they come, or kept for one JSON document.
    ``check`` names the part being checked (``config``, ``key``, ...), for the JSON."""

    def __init__(self, as_json: bool = False) -> None:
        self.as_json = as_json
        self.check = "config"
        self.items: list[dict[str, Any]] = []
        self.failed = 0
        self.warned = 0

    def _add(self, status: str, what: str, fix: str | None, extra: dict[str, Any]) -> None:
        self.items.append({"check": self.check, "status": status, "what": what, "fix": fix, **extra})
        if not self.as_json:
            label = "FAIL" if status == "fail" else status
            print(f"{label:<6}{what}" + (f"\n      → {fix}" if fix else ""))

    def ok(self, what: str, **extra: Any) -> None:
        self._add("ok", what, None, extra)

    def warn(self, what: str, fix: str, **extra: Any) -> None:
        self.warned += 1
        self._add("warn", what, fix, extra)

    def fail(self, what: str, fix: str, **extra: Any) -> None:
        self.failed += 1
        self._add("fail", what, fix, extra)

    def finish(self, status: int, config: Path | None, node: str | None) -> int:
        """Print the summary (or the JSON document); returns ``status``."""
        if self.as_json:
            json.dump({"config": str(config) if config else None, "node": node,
                       "checks": self.items, "failed": self.failed, "warned": self.warned,
                       "status": status}, sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif status == 2:
            print(f"\n{self.failed} problem(s) in the config; nothing else was checked")
        elif self.failed or self.warned:
            print(f"\n{self.failed} failed, {self.warned} warning(s)")
        else:
            print("\nall checks passed")
        return status


def _own_feed(c: Config) -> tuple[int, str | None]:
    """How many events of this node its log holds, and the feed's current key (0, None when
    there is no log or it cannot be read)."""
    from .eventlog import EventLog

    try:
        elog = EventLog(c.events_path, writable=False, me=c.node_id)
    except (OSError, MaildropError):
        return 0, None
    try:
        return elog.ledger.version_vector().get(c.node_id, 0), elog.ledger.key_of(c.node_id)
    finally:
        elog.close()


def _key_trouble(path: Path) -> str:
    """What is wrong with a key file that does not load, without advice."""
    if not path.exists():
        return "is missing"
    if path.is_dir():
        return "is a folder, not a key file"
    if not os.access(path, os.R_OK):
        st = path.stat()
        return (f"is not readable by this user (owner uid {st.st_uid}, "
                f"mode {stat.S_IMODE(st.st_mode):04o})")
    return "does not load as an unencrypted OpenSSH ed25519 private key"


def _check_key(c: Config, r: _Report) -> None:
    """The key loads, is private, and is the key this node's feed is signed with. For a
    node that already exists (its log holds its events) the advice is never a new key:
    a new key is a new identity its peers refuse."""
    events, feed_key = _own_feed(c)
    try:
        key = load_key(c.key_path)
    except MaildropError as exc:
        if not events:
            r.fail(f"key {c.key_path}: {exc}",
                   "create it with 'ssh-keygen -t ed25519 -N \"\" -f KEYFILE' or 'maildrop init'")
            return
        trouble = _key_trouble(c.key_path)
        fix = (f"chown it to the agent's user and chmod 600 {c.key_path}; " if "readable" in trouble else "")
        r.fail(f"key {c.key_path} {trouble}; this node exists already ({events} events of its own in its log)",
               f"{fix}restore the key from this node's backup. Do not make a new one: peers refuse a new "
               "key under this id (to change keys on purpose: maildrop rotate-key)")
        return
    if feed_key is not None and feed_key != key.public_line:
        r.fail(f"key {c.key_path} is not the key this node's feed is signed with "
               f"(the log says {feed_key[:32]}…)",
               "restore this node's current key from its backup (after a crash in rotate-key: run "
               "'maildrop rotate-key' again to finish it)")
    mode = stat.S_IMODE(c.key_path.stat().st_mode)
    if mode & 0o077:
        r.fail(f"key {c.key_path} is readable by others (mode {mode:04o})", f"chmod 600 {c.key_path}")
    else:
        r.ok(f"key {c.key_path} (mode {mode:04o}): {key.public_line[:40]}…")
    for p in c.peers:
        if p.key == key.public_line:
            r.fail(f"peer {p.id} has this node's own key", f"put {p.id}'s 'maildrop pubkey' line in peers")


def _writable_by_others(path: Path) -> str | None:
    """Who besides the owner may change ``path`` ("group" / "others"), or None.

    A folder with the sticky bit lets others add entries but not replace the owner's, so it
    counts as safe (like /tmp)."""
    try:
        st = path.stat()
    except OSError:
        return None
    if stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX:
        return None
    if st.st_mode & stat.S_IWOTH:
        return "others"
    if st.st_mode & stat.S_IWGRP:
        return "group"
    return None


def _check_ownership(c: Config, config_path: Path, r: _Report) -> None:
    """Whoever can change the config, the key, the root or state/ can become this node (add
    their own peer key, read or replace the key, rewrite the log): only the agent's user
    (and root) may. The group shares outbox/ (write) and inbox/, failed/ (read) only."""
    real_config = config_path.resolve()
    places = [("config", real_config), ("the config's folder", real_config.parent),
              ("the folder of the config's link", config_path.parent),
              ("key", c.key_path), ("the key's folder", c.key_path.parent),
              ("root", c.root), ("state folder", c.state_dir)]
    seen: set[Path] = set()
    for what, path in places:
        if path in seen:
            continue
        seen.add(path)
        who = _writable_by_others(path)
        if who is not None:
            mode = stat.S_IMODE(path.stat().st_mode)
            r.fail(f"{what} {path} is writable by {who} (mode {mode:04o}): they could change "
                   "this node's identity, peers or state",
                   f"chmod {who[0]}-w {path} (only outbox/ is for the group)")
    if not any(_writable_by_others(p) for _, p in places):
        r.ok("config, key, root and state/ are writable only by their owner")


def _check_folders(c: Config, r: _Report) -> None:
    for name, path in (("root", c.root), ("outbox", c.outbox), ("inbox", c.inbox),
                       ("failed", c.failed), ("state", c.state_dir), ("spool", c.spool)):
        if not path.is_dir():
            r.fail(f"{name} folder {path} is missing", f"create it: mkdir -p {path} (or run 'maildrop run' once)")
        elif not os.access(path, os.W_OK | os.X_OK):
            r.fail(f"{name} folder {path} is not writable by this user", f"chown the root to the agent's user, or chmod g+w {path}")
        else:
            r.ok(f"{name} folder {path}")
    try:
        if c.spool.is_dir() and c.inbox.is_dir() and c.spool.stat().st_dev != c.inbox.stat().st_dev:
            r.fail("the spool and the inbox are on different filesystems",
                   "keep state/ and inbox/ under one root on one filesystem (deliveries are hard links)")
    except OSError:
        pass
    try:
        st = os.statvfs(c.root)
        free = st.f_bavail * st.f_frsize
        if free < c.min_free_space:
            r.warn(f"only {free // 2**20} MiB free under {c.root}", "free some disk: offers are refused below transfers.min_free_space")
    except OSError:
        pass


def _link_trouble(folder: Path, src: Path | None) -> tuple[str, str] | None:
    """What stops this user from delivering into ``folder`` as the agent does, or None.

    The probe is a delivery: a hard link of ``src`` (a file in the spool) into ``folder``,
    under a dotname, unlinked at once; without ``src`` a file is created in ``folder`` and
    linked beside itself. ``folder`` is opened ``O_NOFOLLOW`` as the agent opens it, so a
    symlink there is named, not followed. Returns ``(what is wrong, the fix)``."""
    try:
        fd = open_folder(folder)
    except FolderRefused as exc:
        if exc.reason == "symlink":
            return ("is a symlink: the agent never delivers through one",
                    f"replace it with a real folder: rm {folder} && mkdir {folder}")
        return "is not a folder", f"move it out of the inbox: mv {folder} {folder}.moved"
    except OSError as exc:
        return f"cannot be opened ({exc.strerror or exc})", f"chown it to the agent's user and chmod u+rwx {folder}"
    name = f".maildrop-check-{secrets.token_hex(8)}"
    made: list[str] = []
    try:
        if src is None:
            os.close(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                             0o600, dir_fd=fd))
            made.append(name)
            os.link(name, name + "-link", src_dir_fd=fd, dst_dir_fd=fd, follow_symlinks=False)
            made.append(name + "-link")
        else:
            os.link(src, name, dst_dir_fd=fd, follow_symlinks=False)
            made.append(name)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return ("is on another filesystem than the spool (deliveries are hard links)",
                    f"make it a plain folder on the root's filesystem: {folder}")
        if exc.errno == errno.EROFS:
            return "is on a read-only filesystem", f"remount the filesystem of {folder} read-write"
        st = os.fstat(fd)
        return (f"is not writable by this user: {exc.strerror or exc} (owner uid {st.st_uid}, "
                f"mode {stat.S_IMODE(st.st_mode):04o})",
                f"chown it to the agent's user and chmod u+rwx {folder}")
    finally:
        for made_name in made:
            with contextlib.suppress(OSError):
                os.unlink(made_name, dir_fd=fd)
        os.close(fd)
    return None


def _check_inbox(c: Config, r: _Report) -> None:
    """``inbox/`` and every ``inbox/<origin>/`` in it take a delivery (a hard link from the
    spool). A folder that does not leaves that origin's files waiting in the spool; one
    ``FAIL`` each, carrying ``origin`` in the JSON. Missing origin folders are fine: the
    agent makes them in ``inbox/`` (checked first)."""
    if not c.inbox.is_dir():
        return  # reported by the folders check
    reported = not os.access(c.inbox, os.W_OK | os.X_OK)  # the folders check said so
    src: Path | None = c.spool / f".maildrop-check-{secrets.token_hex(8)}"
    try:
        os.close(os.open(src, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600))
    except OSError:
        src = None  # the spool's own trouble is reported by the folders check
    try:
        trouble = None if reported else _link_trouble(c.inbox, src)
        if trouble is not None:
            r.fail(f"inbox folder {c.inbox} {trouble[0]}: no delivery can be made", trouble[1])
            return
        try:
            origins = sorted(e.name for e in os.scandir(c.inbox) if is_node_id(e.name))
        except OSError as exc:
            r.warn(f"inbox folder {c.inbox} cannot be listed by this user ({exc.strerror or exc}): "
                   "its origin folders were not checked", f"chmod u+rx {c.inbox}")
            return
        bad = 0
        for origin in origins:
            folder = c.inbox / origin
            trouble = _link_trouble(folder, src)
            if trouble is not None:
                bad += 1
                r.fail(f"inbox folder {folder} {trouble[0]}: files from {origin} wait in the spool",
                       trouble[1], origin=origin)
        if not bad and not reported:
            r.ok(f"inbox folder {c.inbox} and its {len(origins)} origin folder(s) take deliveries")
    finally:
        if src is not None:
            with contextlib.suppress(OSError):
                src.unlink()


def _check_log(c: Config, r: _Report) -> None:
    from .eventlog import EventLog

    if not c.events_path.exists():
        r.warn(f"no event log yet at {c.events_path}", "run 'maildrop run' (or 'maildrop init') to start one")
        return
    try:
        # Every stored signature again (a start trusts them: they were checked on arrival).
        elog = EventLog(c.events_path, pinned={p.id: p.key for p in c.peers}, writable=False,
                        verify_stored=True)
    except (OSError, MaildropError) as exc:
        r.fail(f"event log {c.events_path}: {exc}", "check its owner and mode")
        return
    if elog.rejected:
        r.warn(f"event log has {len(elog.rejected)} invalid line(s); first: {elog.rejected[0]}",
               "they are ignored; see 'maildrop events' (gossip refills valid events)")
    else:
        r.ok(f"event log {c.events_path}: {elog.ledger.count} valid events (signatures checked)")
    for p in c.peers:
        held = elog.ledger.key_of(p.id)
        if held is not None and held != p.key:
            r.warn(f"peer {p.id} rotated its key (signed by its old one): the config pins an old key",
                   f"update peers[].key of {p.id} to: {held}")
    for origin, why in elog.ledger.conflicts.items():
        r.warn(f"conflict for {origin}: {why}", f"check {origin}'s key with its operator; it is not routed to")
    elog.close()


def _check_listen(c: Config, r: _Report) -> None:
    host, port = c.listen
    where = format_hostport(c.listen)
    state = c.state_dir / "agent.json"
    try:
        running = json.loads(state.read_text()).get("running")
    except (OSError, ValueError):
        running = False
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        r.ok(f"listen address {where} is free")
    except OSError as exc:
        if running:
            r.ok(f"listen address {where} is in use (the agent is running)")
        else:
            r.fail(f"cannot listen on {where}: {exc.strerror}", "choose another node.listen or stop what uses it")


def _dial(c: Config, key: NodeKey | None, peer: Peer) -> tuple[str, str | None, str, str | None]:
    """Dial ``peer`` as the agent would: ``(status, stage, what, fix)``; ``stage`` is the one
    that failed (tcp, ssh, host-key, login), None when every stage passed."""
    from .transport.ssh import (
        AuthRefused,
        HostKeyMismatch,
        PeerClient,
        PeerIncompatible,
        PeerUnreachable,
    )

    if peer.address is None:
        return ("ok", None, f"peer {peer.id} has no address: it dials this node (nothing to dial)", None)
    where = f"peer {peer.id} at {format_hostport(peer.address)}"
    try:
        socket.create_connection(peer.address, timeout=PEER_TIMEOUT).close()
    except ConnectionRefusedError:
        return ("fail", "tcp", f"{where}: connection refused",
                f"its agent is not running or listens elsewhere: start it on {peer.id} "
                f"(systemctl start maildrop), or fix this peer's address in {c.path}")
    except TimeoutError:
        return ("fail", "tcp", f"{where}: no answer to the TCP connect in {PEER_TIMEOUT:g}s",
                "a firewall drops it, or the address is wrong: check the peer's address and the network")
    except OSError as exc:
        return ("fail", "tcp", f"{where}: cannot connect ({exc.strerror or exc})",
                "check the peer's address (host name, port) and the network")
    if key is None:
        return ("warn", "ssh", f"{where}: TCP connect ok; no SSH login tried: this node's key does not load",
                "fix the key (see above), then run 'maildrop check --peers' again")
    if peer.via == "openssh":
        return _dial_openssh(c, key, peer, where)
    client = PeerClient(c.node_id, key, peer.id, peer.address, peer.key, connect_timeout=PEER_TIMEOUT)
    try:
        client.connect()
    except HostKeyMismatch as exc:
        return ("fail", "host-key",
                f"{where}: host key mismatch: the key you configured is not the one it has ({exc})",
                f"compare this peer's key: in {c.path} with 'maildrop pubkey' on {peer.id}")
    except AuthRefused:
        return ("fail", "login",
                f"{where}: authentication refused: it does not list this node ({c.node_id}) "
                "under peers:, or lists it with another key",
                f"on {peer.id}, add to peers: id {c.node_id}, address {format_hostport(c.advertise)}, "
                f"key {key.public_line}")
    except PeerIncompatible as exc:
        return ("fail", "ssh", f"{where}: SSH handshake failed: {exc}",
                "something other than a maildrop agent listens there: check the address")
    except PeerUnreachable as exc:
        return ("fail", "ssh", f"{where}: SSH handshake failed: {exc}",
                "something other than a maildrop agent listens there, or it is overloaded: "
                f"check the address and {peer.id}'s log")
    finally:
        client.close()
    return "ok", None, f"{where}: TCP connect, SSH handshake, host key and login ok", None


def _dial_openssh(c: Config, key: NodeKey, peer: Peer, where: str) -> tuple[str, str | None, str, str | None]:
    """Open one channel to a ``via: openssh`` peer as the agent would (the ``ssh`` client,
    the pinned host key, a ping through ``maildrop serve``), with a known_hosts file in a
    temporary folder: a check writes nothing into the agent's ``state/``."""
    import tempfile

    from .transport.openssh import (
        HostKeyRefused,
        LoginRefused,
        OpenSSHClient,
        SSHChannelFailed,
        SSHClientMissing,
    )

    with tempfile.TemporaryDirectory(prefix="maildrop-check-") as tmp:
        client = OpenSSHClient(c.node_id, key, peer, Path(tmp), silence_after=PEER_TIMEOUT)
        try:
            client.open_channel(timeout=PEER_TIMEOUT).close()
        except HostKeyRefused as exc:
            return ("fail", "host-key", f"{where}: sshd's host key is not the one pinned ({exc})",
                    f"set peers[].ssh_host_key of {peer.id} to its sshd's host key line")
        except LoginRefused as exc:
            return ("fail", "login", f"{where}: sshd refused the login ({exc})",
                    f"on {peer.id}, put this node's key in the maildrop account's authorized_keys: "
                    f"{key.public_line}")
        except SSHClientMissing as exc:
            return ("fail", "ssh", f"{where}: {exc}", "install openssh-client")
        except SSHChannelFailed as exc:
            return ("fail", "ssh", f"{where}: the channel through sshd failed: {exc}",
                    f"check {peer.id}'s sshd config (README: a node served by sshd) and that its agent runs")
        finally:
            client.close()
    return "ok", None, f"{where}: ssh client, sshd host key, login and 'maildrop serve' ok", None


def _check_peers(c: Config, r: _Report) -> None:
    if not c.peers:
        r.ok("no peers configured: nothing to dial")
        return
    try:
        key: NodeKey | None = load_key(c.key_path)
    except MaildropError:
        key = None
    with ThreadPoolExecutor(max_workers=min(16, len(c.peers)), thread_name_prefix="dial") as pool:
        results = list(pool.map(lambda p: _dial(c, key, p), c.peers))
    for peer, (status, stage, what, fix) in zip(c.peers, results, strict=True):
        extra = {"peer": peer.id, "stage": stage}
        if status == "ok":
            r.ok(what, **extra)
        elif status == "warn":
            r.warn(what, fix or "", **extra)
        else:
            r.fail(what, fix or "", **extra)


def _report_config_error(exc: MaildropError, r: _Report) -> None:
    """One FAIL per problem of the config; the fix is the problem's 'expected ...'."""
    for line in exc.problems if isinstance(exc, ConfigProblems) else (str(exc),):
        what, sep, expected = line.rpartition("; expected ")
        if sep:
            r.fail(what, f"expected {expected}")
        else:
            r.fail(line, "fix the config (see the README's configuration section)")


def run_checks(config_arg: str | None, *, as_json: bool = False, peers: bool = False) -> int:
    """Run every check and report (text or JSON); returns the exit status (see above)."""
    r = _Report(as_json)
    path: Path | None = None
    try:
        path = find_config(config_arg)
        c = load_config(path)
    except MaildropError as exc:  # ConfigProblems lists them all
        if isinstance(exc, ConfigProblems) and len(exc.problems) > 1:
            print(f"maildrop: {path}: {len(exc.problems)} problems, each listed on stdout",
                  file=sys.stderr)
        else:
            print(f"maildrop: {exc}", file=sys.stderr)
        _report_config_error(exc, r)
        return r.finish(2, path, None)
    r.ok(f"config {path}: node {c.node_id}, {len(c.peers)} peer(s)")
    for name, check in (("key", _check_key), ("ownership", lambda c, r: _check_ownership(c, path, r)),
                        ("folders", _check_folders), ("inbox", _check_inbox), ("log", _check_log),
                        ("listen", _check_listen)):
        r.check = name
        check(c, r)
    if peers:
        r.check = "peers"
        _check_peers(c, r)
    return r.finish(1 if r.failed else 0, path, c.node_id)


__all__ = ["run_checks"]
