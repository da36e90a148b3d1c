"""``maildrop check``: validate config, key, folders and permissions; say what to fix.

Exit status: 0 when every check passed (warnings allowed), 1 when any failed, 2 when the
config itself cannot be read (the one-line config error).
"""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from pathlib import Path

from .config import Config, find_config, load_config
from .errors import MaildropError
from .keys import load_key


class _Report:
    def __init__(self) -> None:
        self.failed = 0
        self.warned = 0

    def ok(self, what: str) -> None:
        print(f"ok    {what}")

    def warn(self, what: str, fix: str) -> None:
        self.warned += 1
        print(f"warn  {what}\n      → {fix}")

    def fail(self, what: str, fix: str) -> None:
        self.failed += 1
        print(f"FAIL  {what}\n      → {fix}")


def _check_key(c: Config, r: _Report) -> None:
    try:
        key = load_key(c.key_path)
    except MaildropError as exc:
        r.fail(f"key {c.key_path}: {exc}", "create it with 'ssh-keygen -t ed25519 -N \"\" -f KEYFILE' or 'maildrop init'")
        return
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


def _check_log(c: Config, r: _Report) -> None:
    from .eventlog import EventLog

    if not c.events_path.exists():
        r.warn(f"no event log yet at {c.events_path}", "run 'maildrop run' (or 'maildrop init') to start one")
        return
    try:
        elog = EventLog(c.events_path, pinned={p.id: p.key for p in c.peers}, writable=False)
    except (OSError, MaildropError) as exc:
        r.fail(f"event log {c.events_path}: {exc}", "check its owner and mode")
        return
    if elog.rejected:
        r.warn(f"event log has {len(elog.rejected)} invalid line(s); first: {elog.rejected[0]}",
               "they are ignored; see 'maildrop events' (gossip refills valid events)")
    else:
        r.ok(f"event log {c.events_path}: {elog.ledger.count} valid events")
    for origin, why in elog.ledger.conflicts.items():
        r.warn(f"conflict for {origin}: {why}", f"check {origin}'s key with its operator; it is not routed to")
    elog.close()


def _check_listen(c: Config, r: _Report) -> None:
    host, port = c.listen
    state = c.state_dir / "agent.json"
    try:
        running = json.loads(state.read_text()).get("running")
    except (OSError, ValueError):
        running = False
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, port))
        r.ok(f"listen address {host}:{port} is free")
    except OSError as exc:
        if running:
            r.ok(f"listen address {host}:{port} is in use (the agent is running)")
        else:
            r.fail(f"cannot listen on {host}:{port}: {exc.strerror}", "choose another node.listen or stop what uses it")


def run_checks(config_arg: str | None) -> int:
    try:
        path = find_config(config_arg)
        c = load_config(path)
    except MaildropError as exc:
        print(f"maildrop: {exc}", file=sys.stderr)
        return 2
    r = _Report()
    r.ok(f"config {path}: node {c.node_id}, {len(c.peers)} peer(s)")
    _check_key(c, r)
    _check_ownership(c, path, r)
    _check_folders(c, r)
    _check_log(c, r)
    _check_listen(c, r)
    print(f"\n{r.failed} failed, {r.warned} warning(s)" if (r.failed or r.warned) else "\nall checks passed")
    return 1 if r.failed else 0


__all__ = ["run_checks"]
