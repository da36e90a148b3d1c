"""The command line: argument parsing and output formatting. ``main(argv) -> exit status``.

Exit statuses: 0 success; 1 operational failure (a --wait deadline passed, the transfer
failed, the agent stopped on an error, ``serve``'s peer refused); 2 usage or configuration
error; 3 the agent is not running (``serve``); 130 interrupted.
A user's mistake is one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, NoReturn

from . import __version__
from .errors import ConfigError, MaildropError, UsageError

EXIT_OK, EXIT_FAIL, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
QUEUE_STATES = ("queued", "deferred", "in-flight", "handed", "held", "delivering", "receiving",
                "partial", "delivered", "failed", "unknown")  # control.STATES, without its imports


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_USAGE, f"maildrop: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="maildrop", description="Store-and-forward file mail for servers.")
    p.add_argument("--version", action="version", version=f"maildrop {__version__}")
    p.add_argument("-c", "--config", metavar="FILE", help="config file (also accepted after the command)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def cmd(name: str, help_: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_)
        sp.add_argument("-c", "--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="config file (default: $MAILDROP_CONFIG, ./maildrop.yaml, /etc/maildrop/maildrop.yaml)")
        return sp

    sp = sub.add_parser("init", help="create a node: config, key pair, folders, first event",
                        description="Create DIR with maildrop.yaml, an ed25519 key pair and the root folders; print the public key line.")
    sp.add_argument("dir", metavar="DIR")
    sp.add_argument("--id", required=True, help="node id: letters, digits, '-', '_' (1..64)")
    sp.add_argument("--listen", required=True, metavar="HOST:PORT", help="where the SSH server listens")
    sp.add_argument("--advertise", metavar="HOST:PORT", help="the address other nodes dial (default: listen)")
    sp.add_argument("--display-name", help="a name for people")

    cmd("pubkey", "print this node's public key line (give it to peers)")
    sp = cmd("events", "list the event log, newest last")
    sp.add_argument("--json", action="store_true", help="one JSON document")
    sp.add_argument("-n", "--limit", type=int, metavar="N", help="only the newest N events")
    sp = cmd("status", "this node, peers, known nodes, links, routes, transfers")
    sp.add_argument("--json", action="store_true", help="one JSON document")
    sp.add_argument("--at", metavar="TIME",
                    help="the model as it was at TIME: ISO 8601 (2026-12-01T18:00:00Z; without an "
                         "offset: UTC) or relative (-2h, -30m, -1d)")
    sp.epilog = ("Exit status: 0 shown; 1 (--at) TIME is before the history this node holds; "
                 "2 usage error (a TIME that is not a time, or in the future).")
    sp = cmd("explain", "every hop of TRANSFER with its times, outcome and reason, from the facts held here")
    sp.epilog = ("TRANSFER is an id or its unique start, as 'maildrop queue' shows it. Exit status: "
                 "0 explained; 1 no fact about TRANSFER is held here; 2 usage error (a malformed "
                 "or ambiguous id).")
    sp.add_argument("transfer", metavar="TRANSFER")
    sp.add_argument("--json", action="store_true", help="one JSON document (stable keys)")
    sp = cmd("route", "the path from this node to NODE")
    sp.add_argument("node", metavar="NODE")
    sp.add_argument("--json", action="store_true")
    sp = cmd("run", "run the agent (SSH server, gossip, relay, outbox watcher)")
    sp.add_argument("--log-level", choices=["debug", "info", "warning", "error"],
                    help="default: log.level from the config")
    sp.add_argument("--log-json", action="store_true", default=None, help="one JSON object per log line")
    sp = cmd("send", "drop FILE into the outbox for NODE (atomically)")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("node", metavar="NODE")
    sp.add_argument("--wait", action="store_true", help="show progress and wait for the receipt")
    sp.add_argument("--timeout", type=_timeout, default=600.0, metavar="DURATION",
                    help="with --wait: give up waiting after this long: seconds or 30s, 5m, 2h "
                         "(default 10m)")
    sp = cmd("check", "check config, key, folders and permissions; say what to fix")
    sp.epilog = ("Exit status: 0 every check passed (warnings allowed); 1 a check failed; 2 the "
                 "config cannot be used (every problem in it is listed).")
    sp.add_argument("--json", action="store_true",
                    help="one JSON document: each check with its status (ok, warn, fail), what and fix")
    sp.add_argument("--peers", action="store_true",
                    help="also dial each peer: TCP connect, SSH handshake, its host key, our login")
    sp = cmd("conflicts", "list the nodes marked as conflicts (forked feeds, never routed to), or clear one")
    sp.add_argument("--json", action="store_true", help="one JSON document, with the evidence events")
    sp.add_argument("--clear", metavar="NODE",
                    help="forget NODE's conflict (the running agent sees it within a second); "
                         "exit 1 if NODE had none. A real fork is found again when its events come back")
    control_exit = ("Works with the agent running (it acts within a second) and stopped (the command "
                    "acts on the log and spool itself). TRANSFER is an id or its unique start, as "
                    "'maildrop queue' shows it. Exit status: 0 done; 1 operational failure (no such "
                    "transfer here, not the origin, already delivered or failed, not on hold, the "
                    "agent did not answer); 2 usage error (a malformed or ambiguous id).")
    sp = cmd("queue", "list what this node holds: id, from, to, name, size, state, next try, last error")
    sp.epilog = ("With the agent running it answers (next try, last error, progress); stopped, the log "
                 "and spool are read. Exit status: 0 listed; 1 operational failure; 2 usage error.")
    sp.add_argument("--json", action="store_true", help="one JSON document with every row")
    sp.add_argument("--to", metavar="NODE", help="only transfers to NODE")
    sp.add_argument("--state", metavar="STATE", help="only transfers in STATE: " + ", ".join(QUEUE_STATES))
    sp.add_argument("-n", "--limit", type=int, default=100, metavar="N",
                    help="show at most N rows, oldest first (default 100; 0: all)")
    sp = cmd("flush", "offer TRANSFER (or every transfer) now: no backoff, no avoided hop (like postqueue -f)")
    sp.epilog = control_exit
    sp.add_argument("transfer", nargs="?", metavar="TRANSFER")
    sp.add_argument("--all", action="store_true", help="every transfer held here (except those on hold)")
    sp = cmd("cancel", "give up TRANSFER at its origin: the file goes to failed/ with reason 'cancelled'")
    sp.epilog = control_exit + " Only the origin may cancel; relays drop their copies when they learn it."
    sp.add_argument("transfer", metavar="TRANSFER")
    sp = cmd("hold", "never offer TRANSFER until 'maildrop release' (the hold survives restarts)")
    sp.epilog = control_exit
    sp.add_argument("transfer", metavar="TRANSFER")
    sp = cmd("release", "end the hold on TRANSFER: it is offered again")
    sp.epilog = control_exit
    sp.add_argument("transfer", metavar="TRANSFER")
    sp = cmd("serve", "speak the maildrop protocol on stdin/stdout for a peer sshd logged in "
                      "(sshd's Subsystem maildrop, or a forced command in authorized_keys)")
    sp.epilog = ("Connects to the running agent (state/serve.sock) and copies bytes both ways; the "
                 "agent serves the session as a channel of that peer. The peer is --peer, or the "
                 "key sshd authenticated ($SSH_USER_AUTH, with 'ExposeAuthInfo yes' in "
                 "sshd_config), or both (then they must agree). Exit status: 0 the session "
                 "ended; 1 the agent refused the peer; 2 usage or config error (a bad --peer, "
                 "neither --peer nor $SSH_USER_AUTH); 3 the agent is not running.")
    sp.add_argument("--peer", metavar="ID",
                    help="the peer this session speaks for, as in authorized_keys: "
                         "command=\"maildrop serve --peer NodeB\" ssh-ed25519 AAAA... (the key decides)")
    cmd("rotate-key", "give this node a new key, announced signed by the old one (stop the agent first)")
    sp = sub.add_parser("demo", help="run a five-node network on 127.0.0.1 and show a delivery and a reroute",
                        description="Build five nodes A-B-C-D-E (plus an alternate path) on free loopback ports, deliver a file, stop a relay, deliver another over the other path.")
    sp.add_argument("--dir", metavar="DIR", help="keep the demo network in DIR (default: a temp folder, removed)")
    return p


def complete(parser: argparse.ArgumentParser) -> None:
    """Shell completion (the optional ``completion`` extra): only when the shell asks for
    completions (``_ARGCOMPLETE`` set) is argcomplete imported; it answers and exits. Without
    that variable, or without argcomplete installed, this does nothing."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    try:
        import argcomplete
    except ImportError:
        return
    argcomplete.autocomplete(parser)


def _timeout(text: str) -> float:
    """``send --timeout``: a duration above zero, as the config reads one (``600``, ``5m``)."""
    from .config import parse_duration

    try:
        seconds = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{exc}; expected seconds or e.g. 30s, 5m, 2h") from None
    if seconds <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is zero; expected a duration above zero")
    return seconds


def _glue_relative(argv: list[str]) -> list[str]:
    """``--at -2h`` as ``--at=-2h``: argparse would read a value that starts with '-' as
    an option (only '-' and a digit is glued: ``--at --json`` stays a missing TIME)."""
    out: list[str] = []
    for a in argv:
        if out and out[-1] == "--at" and len(a) > 1 and a[0] == "-" and a[1].isdigit():
            out[-1] = f"--at={a}"
        else:
            out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    complete(parser)
    args = parser.parse_args(_glue_relative(sys.argv[1:] if argv is None else list(argv)))
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    handler = COMMANDS[args.command]
    try:
        return handler(args)
    except MaildropError as exc:
        print(f"maildrop: {exc}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("maildrop: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return EXIT_OK


# -- helpers -----------------------------------------------------------------------------------

def _config(args: argparse.Namespace):  # -> Config
    from .config import find_config, load_config

    return load_config(find_config(getattr(args, "config", None)))


def _print_json(obj: Any) -> None:
    """The document, keys sorted: the top two levels one item a line, deeper values each on
    their line in compact form (the C encoder: ``indent`` would take the pure-Python one,
    ~10x slower, seconds for a status of many transfers)."""
    sys.stdout.write(_json_lines(obj, 0) + "\n")


def _json_lines(obj: Any, depth: int) -> str:
    pad, inner = "  " * depth, "  " * (depth + 1)
    if depth >= 2 or not obj or not isinstance(obj, dict | list):
        return json.dumps(obj, sort_keys=True, ensure_ascii=True)
    if isinstance(obj, list):
        return "[\n" + ",\n".join(inner + _json_lines(v, depth + 1) for v in obj) + "\n" + pad + "]"
    return "{\n" + ",\n".join(f"{inner}{json.dumps(str(k))}: {_json_lines(obj[k], depth + 1)}"
                               for k in sorted(obj)) + "\n" + pad + "}"


def _table(rows: list[list[str]], headers: list[str], indent: str = "  ") -> str:
    if not rows:
        return indent + "(none)"
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    fmt = indent + "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers).rstrip()]
    out += [fmt.format(*[str(c) for c in r]).rstrip() for r in rows]
    return "\n".join(out)


def _span(d: float) -> str:
    """A short human duration: ``45s``, ``12m``, ``3.5h``, ``2.0d``."""
    if d < 60:
        return f"{d:.0f}s"
    if d < 3600:
        return f"{d / 60:.0f}m"
    if d < 86400:
        return f"{d / 3600:.1f}h"
    return f"{d / 86400:.1f}d"


def _ago(ts: float | None, now: float) -> str:
    return "never" if ts is None else f"{_span(max(0.0, now - ts))} ago"


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


# -- commands ------------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    from .agent import announce, open_log
    from .config import load_config, parse_hostport, render_config
    from .ids import is_node_id
    from .keys import generate_key
    from .spool import ensure_layout

    if not is_node_id(args.id):
        raise UsageError(f"--id: {args.id!r} is not a node id; expected letters, digits, '-', '_' (1..64 chars)")
    for opt, val in (("--listen", args.listen), ("--advertise", args.advertise)):
        if val is not None:
            try:
                parse_hostport(val, allow_port_zero=(opt == "--listen"))
            except (ValueError, ConfigError) as exc:
                raise UsageError(f"{opt}: {val!r} is not HOST:PORT ({exc}); expected e.g. 127.0.0.1:7001") from None
    root = Path(args.dir).absolute()
    cfg_path, key_path = root / "maildrop.yaml", root / "node_ed25519"
    for p in (cfg_path, key_path):
        if p.exists():
            raise UsageError(f"{p} already exists; refusing to overwrite it (choose another DIR or remove it)")
    text = render_config(args.id, args.listen, display_name=args.display_name,
                         advertise=args.advertise)
    try:
        root.mkdir(parents=True, exist_ok=True)
        key = generate_key(key_path, comment=f"maildrop-{args.id}")
        fd = os.open(cfg_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        with os.fdopen(fd, "w") as f:
            f.write(text)
    except OSError as exc:
        raise MaildropError(f"cannot create {root}: {exc.strerror or exc}") from None
    config = load_config(cfg_path)
    ensure_layout(config.root)
    elog = open_log(config)
    announce(config, key, elog)
    elog.close()
    print(key.public_line)
    print(f"created {cfg_path}; give the line above to each peer", file=sys.stderr)
    return EXIT_OK


def cmd_pubkey(args: argparse.Namespace) -> int:
    from .keys import load_key

    print(load_key(_config(args).key_path).public_line)
    return EXIT_OK


def cmd_events(args: argparse.Namespace) -> int:
    from .eventlog import EventLog

    config = _config(args)
    elog = EventLog(config.events_path, writable=False, me=config.node_id)
    evs = _file_order(config.events_path, elog)
    if args.limit is not None:
        evs = evs[-args.limit:] if args.limit > 0 else []
    if args.json:
        _print_json({"node": config.node_id, "events": [e.to_dict() for e in evs],
                     "rejected": elog.rejected})
        return EXIT_OK
    rows = [[e.ts, e.origin, str(e.seq), e.type, _summary(e.data)] for e in evs]
    print(_table(rows, ["TIME", "ORIGIN", "SEQ", "TYPE", "FACT"], indent=""))
    for r in elog.rejected:
        print(f"rejected: {r}")
    return EXIT_OK


def _line_id(line: bytes) -> str | None:
    """The top-level ``id`` of a log line: found by position in a canonical line (keys
    sorted, so it follows ``data``; any ``"id":"`` inside a value is escaped), else parsed."""
    at = line.rfind(b'"id":"')
    if at > 0 and line[at - 1:at] == b"," and line[at + 70:at + 71] == b'"':
        return line[at + 6:at + 70].decode("ascii", "replace")
    try:
        eid = json.loads(line).get("id")
    except (ValueError, AttributeError):
        return None
    return eid if isinstance(eid, str) else None


def _file_order(path: Path, elog) -> list:  # events valid in the ledger, in log order
    valid = {e.id: e for e in elog.ledger.all_events()}
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                eid = _line_id(line)
                ev = valid.pop(eid, None) if eid else None
                if ev is not None:
                    out.append(ev)
    except FileNotFoundError:
        pass
    return out


def _summary(data: dict[str, Any]) -> str:
    parts = []
    for k, v in data.items():
        if k == "key":
            v = str(v)[:20] + "…"
        elif k == "sha256":
            v = str(v)[:12]
        elif k == "state" and isinstance(v, dict):  # a feed.checkpoint: its size, not its fold
            v = f"links:{len(v['links'])},seen:{len(v['seen'])},health:{len(v['health'])}"
        parts.append(f"{k}={v}")
    return " ".join(parts)


AGENT_STATUS_FILE = "agent.json"  # agent.STATUS_FILE, without importing the agent (paramiko, ...)


def _agent_state(config) -> dict[str, Any] | None:
    try:
        st = json.loads((config.state_dir / AGENT_STATUS_FILE).read_bytes())
    except (FileNotFoundError, ValueError, PermissionError):
        return None
    pid = st.get("pid")
    alive = False
    if isinstance(pid, int) and st.get("running"):
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    st["running"] = alive and time.time() - st.get("updated", 0) < 30
    return st


def status_document(config) -> dict[str, Any]:
    from .config import format_hostport
    from .eventlog import EventLog
    from .notices import FILE_NAME as NOTICES_FILE
    from .notices import counts_at
    from .routing import route

    elog = EventLog(config.events_path, pinned={p.id: p.key for p in config.peers}, writable=False,
                    me=config.node_id)
    net = elog.network
    agent = _agent_state(config)
    running = bool(agent and agent["running"])
    inflight = {p["transfer"]: p for p in (agent or {}).get("inflight", [])} if running else {}
    waiting = {c["transfer"]: c for c in (agent or {}).get("custody", [])} if running else {}
    peers = []
    for p in config.peers:
        soft = next((x for x in (agent or {}).get("peers", []) if x.get("id") == p.id), {})
        obs = net.last_observation(config.node_id, p.id)
        state = soft.get("state") if running else ("up" if obs and obs[0] else "down")
        current = elog.ledger.key_of(p.id) or p.key  # its feed's key (it may have rotated)
        # Its fingerprint as the running agent last heard it (all None when stopped).
        sync = {k: soft.get(k) if running else None for k in SYNC_FIELDS}
        peers.append({"id": p.id, "address": format_hostport(p.address) if p.address else "(it dials us)",
                      "state": "up" if state == "up" else "down",
                      "last_seen": soft.get("last_seen"), "last_error": soft.get("last_error", ""),
                      "key": current, "config_pins_old_key": current != p.key, **sync})
    routes = {}
    for n in sorted(net.nodes):
        if n != config.node_id:
            routes[n] = route(net, config.node_id, n, excluded=elog.ledger.conflicts)
    transfers = []
    names = _names(config)
    for t in sorted(net.all_transfers(), key=lambda t: t.queued_ts or ""):
        d = t.as_dict()
        d.update(_file_of(t, config.node_id, names))
        fl = inflight.get(t.id)
        d["hop"] = fl["peer"] if fl else None
        d["bytes"] = fl["bytes"] if fl else (t.size if t.state == "delivered" else None)
        if fl and d["state"] in ("queued", "relayed"):
            d["state_detail"] = "in-flight"
        # Why it waits here, from the custody service ("" while nothing is wrong).
        d["reason"] = waiting[t.id]["reason"] if t.id in waiting and d["state"] not in ("delivered", "failed") else ""
        transfers.append(d)
    doc = net.as_dict()
    doc.update({
        "node": config.node_id, "display_name": config.display_name,
        "listen": format_hostport(config.listen),
        "fingerprint": elog.ledger.fingerprint(), "events": elog.ledger.count,
        "log_bytes": elog.size_bytes, "rejected_events": len(elog.rejected),
        "conflicts": dict(elog.ledger.conflicts),
        "agent": {"running": running, "pid": agent.get("pid") if agent else None,
                  "started": agent.get("started") if agent else None},
        "peers": peers, "differing_peers": [p["id"] for p in peers if p["in_sync"] is False],
        "routes": routes, "transfers": transfers,
        # Transfers by state among the facts this node holds (the list above shows the open
        # ones and the most recently ended: ``model.RECENT_ENDED``).
        "transfer_counts": elog.facts.counts(),
        "notices": (agent or {}).get("notices") if running else counts_at(config.state_dir / NOTICES_FILE),
        "errors": (agent or {}).get("errors", []) if agent else [],
    })
    elog.close()
    return doc


SYNC_FIELDS = ("fingerprint", "fingerprint_heard", "in_sync", "differs_since")
"""A peer's fingerprint fields in ``status``, from the running agent's soft state."""


def _names(config) -> Any:
    """The names of sealed transfers as this node may read them: opened with its key (and
    the one before its rotation) when this user can read it, else none (``seal.Names``)."""
    from .errors import ConfigError
    from .keys import load_key
    from .seal import Keyring, Names

    try:
        key = load_key(config.key_path)
    except ConfigError:
        key = None
    return Names(Keyring.of(key))


def _name_of(t: Any, me: str, names: Any) -> str | None:
    """A model transfer's file name: a plaintext one's as it is; a sealed one's opened only
    at its origin or destination (elsewhere it cannot be, and is not tried)."""
    return _file_of(t, me, names)["name"]


def _file_of(t: Any, me: str, names: Any) -> dict[str, Any]:
    """The file of a model transfer as this node may know it: ``name``, ``file_size`` and
    ``file_sha256`` of the plaintext (``size`` and ``sha256`` are what moves: a sealed
    transfer's ciphertext). A sealed one's are read from its envelope at its origin or
    destination only; elsewhere they are None."""
    if t.sealed is None:
        return {"name": t.name, "file_size": t.size, "file_sha256": t.sha256}
    env = names.envelope(t.sealed) if me in (t.origin, t.destination) else None
    if env is None:
        return {"name": None, "file_size": None, "file_sha256": None}
    return {"name": env.name, "file_size": env.size, "file_sha256": env.sha256}


STATUS_TRANSFERS = 50  # the newest transfers `status` shows; a line counts the others
LAST_ERROR_WIDTH = 60


def _last_error(peer: dict[str, Any]) -> str:
    """A peer's last error for its row: without the peer's id and address (the row shows
    them), and cut in the middle when still too long, so the reason at the end stays."""
    text = peer["last_error"]
    host, _, port = peer["address"].rpartition(":")
    for where in (f"peer {peer['id']} at {peer['address']}",
                  f"peer {peer['id']} at {host.strip('[]')}:{port}"):  # the transport's form
        text = text.replace(f" {where}", "").replace(f"{where} ", "")
    if len(text) <= LAST_ERROR_WIDTH:
        return text
    head = LAST_ERROR_WIDTH // 3
    return f"{text[:head]}…{text[-(LAST_ERROR_WIDTH - head - 1):]}"


def _sync_cell(peer: dict[str, Any], now: float) -> str:
    """A peer's SYNC cell: its fingerprint against ours, as the agent last compared them."""
    if peer["in_sync"] is None:
        return "?"
    return "in sync" if peer["in_sync"] else f"differs {_ago(peer['differs_since'], now).replace(' ago', '')}"


def _sync_lines(doc: dict[str, Any], now: float) -> list[str]:
    """Under the peers table: which peers' fingerprints differ from ours, since when; or
    "in sync"; or why it is not known."""
    if not doc["peers"]:
        return []
    if not doc["agent"]["running"]:
        return ["  in sync: unknown (the agent is not running; it compares fingerprints every gossip round)"]
    lines = []
    for p in doc["peers"]:
        if p["in_sync"] is False:
            lines.append(f"  {p['id']} differs from this node since {_ago(p['differs_since'], now)} "
                         f"(its fingerprint {p['fingerprint'][:16]}, heard {_ago(p['fingerprint_heard'], now)})")
    unheard = [p["id"] for p in doc["peers"] if p["in_sync"] is None]
    if unheard:
        lines.append(f"  not heard from yet: {', '.join(unheard)}")
    if not lines:
        lines.append("  in sync with every peer (equal fingerprints)")
    return lines


def cmd_status(args: argparse.Namespace) -> int:
    if args.at is not None:
        return _status_at(args)
    config = _config(args)
    doc = status_document(config)
    if args.json:
        _print_json(doc)
        return EXIT_OK
    now = time.time()
    ag = doc["agent"]
    state = f"agent running (pid {ag['pid']}, up {_ago(ag['started'], now).replace(' ago', '')})" \
        if ag["running"] else "agent NOT running (start it: maildrop run, or systemctl start maildrop)"
    print(f"node       {doc['node']} ({doc['display_name']})  listen {doc['listen']}  {state}")
    print(f"log        {doc['events']} events, {_size(doc['log_bytes'])}, fingerprint {doc['fingerprint'][:16]}")
    print("peers")
    print(_table([[p["id"], p["address"], p["state"], _ago(p["last_seen"], now), _sync_cell(p, now),
                   _last_error(p)] for p in doc["peers"]],
                 ["ID", "ADDRESS", "STATE", "LAST SEEN", "SYNC", "LAST ERROR"]))
    for line in _sync_lines(doc, now):
        print(line)
    for p in doc["peers"]:
        if p["config_pins_old_key"]:
            print(f"  {p['id']} rotated its key (signed by the old one): the config pins an old key; "
                  f"update its peers[].key to: {p['key']}")
    print("known nodes and routes")
    rows = []
    for n in doc["nodes"]:
        r = doc["routes"].get(n["id"])
        path = "(this node)" if n["id"] == doc["node"] else (" → ".join(r) if r else "no route")
        rows.append([n["id"], n["address"], path])
    print(_table(rows, ["NODE", "ADDRESS", "ROUTE"]))
    print("links")
    print(_table([[lk["from"], lk["to"], lk["state"]] for lk in doc["links"]], ["FROM", "TO", "STATE"]))
    print("transfers")
    rows = []
    shown = doc["transfers"][-STATUS_TRANSFERS:]
    for t in shown:
        prog = ""
        if t.get("hop"):
            pct = 100 * (t["bytes"] or 0) / t["size"] if t["size"] else 100
            prog = f"→ {t['hop']} {_size(t['bytes'])}/{_size(t['size'])} ({pct:.0f}%)"
        elif t["state"] == "failed":
            prog = t["failed"] or ""
        elif t.get("reason"):
            prog = t["reason"]
        rows.append([t["id"][:12], t["origin"] or "?", t["destination"] or "?", t["name"] or "-",
                     _size(t["size"]), t.get("state_detail") or t["state"], prog])
    if len(doc["transfers"]) > len(shown):  # the older ones, above the rows shown
        print(f"  … {len(doc['transfers']) - len(shown)} more, older (of {len(doc['transfers'])}; "
              "'maildrop status --json' lists every one)")
    print(_table(rows, ["ID", "FROM", "TO", "NAME", "SIZE", "STATE", "PROGRESS"]))
    if doc["conflicts"]:
        print("conflicts (never routed to)")
        for n, why in doc["conflicts"].items():
            print(f"  {n}: {why}")
    if doc["errors"]:
        print("recent errors")
        for e in doc["errors"][-5:]:
            print(f"  {_ago(e['ts'], now):>8}  {e['level']:<7} {e['message'][:110]}")
    return EXIT_OK


def cmd_route(args: argparse.Namespace) -> int:
    from .eventlog import EventLog
    from .ids import is_node_id
    from .routing import path_weights, route

    config = _config(args)
    if not is_node_id(args.node):
        raise UsageError(f"{args.node!r} is not a node id; expected letters, digits, '-', '_'")
    elog = EventLog(config.events_path, writable=False, me=config.node_id)
    path = route(elog.network, config.node_id, args.node, excluded=elog.ledger.conflicts)
    weights = path_weights(elog.network, path) if path else None
    known = args.node in elog.network.nodes
    conflict = elog.ledger.conflicts.get(args.node)
    if args.json:
        _print_json({"from": config.node_id, "to": args.node, "known": known, "route": path,
                     "weights": weights, "weight": sum(weights) if weights is not None else None,
                     "conflict": conflict})
    elif path and weights is not None:
        # "NodeA → NodeB → NodeD   weight 50 (10 + 40)": each link's weight, 10 a healthy
        # hop (docs/routing.md)
        print(f"{' → '.join(path)}   weight {sum(weights)} ({' + '.join(map(str, weights))})")
    else:
        if conflict is not None:
            why = (f"is a conflict ({conflict}): never routed to; see 'maildrop conflicts', "
                   "clear it once its operator fixed it")
        elif not known:
            why = "is not known yet (no gossip from it)"
        else:
            why = "is known but unreachable over up links"
        print(f"no route: {args.node} {why}", file=sys.stderr)
    return EXIT_OK if path else EXIT_FAIL


def setup_logging(level: str, as_json: bool) -> None:
    """Log to stderr, one line per record (``logsafe``): text, or JSON with ``as_json``;
    each line prefixed with its syslog priority when ``$JOURNAL_STREAM`` says stderr is the
    journal. Called again on a reload: the new handler replaces the old one."""
    from .logsafe import JsonFormatter, TextFormatter

    journal = bool(os.environ.get("JOURNAL_STREAM"))
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(journal) if as_json else TextFormatter(journal))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    if level != "debug":
        # The transport logs its own one-line reasons; paramiko's tracebacks for a client
        # that hung up early (port probes, scanners) are noise in the journal.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def cmd_run(args: argparse.Namespace) -> int:
    """Run the agent. SIGTERM and SIGINT stop it, SIGHUP reloads its config; the handlers
    only set an event, the agent's main loop acts on it."""
    from .agent import Agent
    from .config import Config

    stop, reload = threading.Event(), threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        (reload if signum == signal.SIGHUP else stop).set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    config = _config(args)

    def logging_of(c: Config) -> None:  # the command line's --log-* win over the file
        setup_logging(args.log_level or c.log_level, c.log_json if args.log_json is None else args.log_json)

    logging_of(config)
    agent = Agent(config)
    return agent.run(stop, reload=reload, on_reload=logging_of)


def cmd_send(args: argparse.Namespace) -> int:
    from .ids import is_node_id, safe_file_name

    config = _config(args)
    src = Path(args.file)
    if not is_node_id(args.node):
        raise UsageError(f"{args.node!r} is not a node id; expected letters, digits, '-', '_'")
    _check_sendable(src)
    name = safe_file_name(src.name)
    if name is None:
        raise UsageError(f"{src.name!r} cannot be sent as a file name (no leading dot, control characters or path parts)")
    folder = config.outbox / args.node
    if not folder.exists():
        folder.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(OSError):
            os.chmod(folder, 0o2770)  # the agent (group) must be able to empty it
    tmp = folder / f".{name}.{secrets.token_hex(4)}.part"
    dropped_at = time.time()
    shutil.copyfile(src, tmp)
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    final = folder / name
    n = 1
    while True:  # never replace a file still waiting in the outbox
        try:
            os.link(tmp, final)
            break
        except FileExistsError:
            final = folder / f"{Path(name).stem} ({n}){Path(name).suffix}"
            n += 1
    os.unlink(tmp)
    print(f"dropped {final}", file=sys.stderr)
    if not args.wait:
        return EXIT_OK
    return _wait_for_receipt(config, final.name, args.node, dropped_at, args.timeout)


def _check_sendable(src: Path) -> None:
    """UsageError saying what ``src`` is when it is not a regular file this user can read."""
    import stat

    try:
        st = src.stat()
    except FileNotFoundError:
        raise UsageError(f"{src}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{src}: cannot be looked at ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise UsageError(f"{src}: is a folder; send one regular file (e.g. a tar of the folder)")
    if not stat.S_ISREG(st.st_mode):
        raise UsageError(f"{src}: is not a regular file (a device, pipe or socket); send a regular file")
    if not os.access(src, os.R_OK):
        raise UsageError(f"{src}: is not readable by this user (check its owner and mode)")


def _wait_for_receipt(config, name: str, dest: str, since: float, timeout: float) -> int:
    from .config import format_duration
    from .eventlog import EventLog
    from .events import parse_ts

    deadline = time.monotonic() + timeout
    elog = EventLog(config.events_path, writable=False)
    names = _names(config)
    tid = None
    tty = sys.stderr.isatty()
    last_line = ""
    warned = False
    while time.monotonic() < deadline:
        elog.refresh()
        if tid is None:
            for t in elog.network.all_transfers():
                if (t.origin == config.node_id and t.destination == dest
                        and t.queued_ts and parse_ts(t.queued_ts) >= since - 1
                        and _name_of(t, config.node_id, names) == name):
                    tid = t.id
        agent = _agent_state(config)
        if not (agent and agent["running"]) and not warned:
            print("maildrop: the agent is not running; the file waits in the outbox", file=sys.stderr)
            warned = True
        line = "waiting for the agent to take the file"
        if tid is not None:
            t = elog.network.transfer(tid, config.node_id)
            if t.state == "delivered":
                print(f"\rdelivered {name} to {dest} (transfer {tid})" + " " * 20, file=sys.stderr)
                return EXIT_OK
            if t.state == "failed":
                print(f"\rfailed: {t.failed}", file=sys.stderr)
                return EXIT_FAIL
            fl = next((p for p in (agent or {}).get("inflight", []) if p["transfer"] == tid), None)
            if fl:
                pct = 100 * fl["bytes"] / fl["size"] if fl["size"] else 100
                bar = "#" * int(pct / 5)
                line = f"[{bar:<20}] {pct:5.1f}% → {fl['peer']}"
            else:
                line = f"{t.state}, waiting for the receipt"
        if tty:
            print(f"\r{line:<60}", end="", file=sys.stderr, flush=True)
        elif line != last_line:
            print(line, file=sys.stderr)
        last_line = line
        time.sleep(0.2)
    print(f"\rmaildrop: no receipt within {format_duration(timeout)} (the transfer goes on; "
          "see 'maildrop status')", file=sys.stderr)
    return EXIT_FAIL


def cmd_conflicts(args: argparse.Namespace) -> int:
    from .eventlog import clear_conflict, read_conflicts
    from .ids import is_node_id

    config = _config(args)
    if args.clear is not None:
        if not is_node_id(args.clear):
            raise UsageError(f"{args.clear!r} is not a node id; expected letters, digits, '-', '_'")
        if not clear_conflict(config.events_path, args.clear):
            print(f"maildrop: no conflict recorded for {args.clear}", file=sys.stderr)
            return EXIT_FAIL
        print(f"cleared the conflict of {args.clear}", file=sys.stderr)
        return EXIT_OK
    records = [r for r in read_conflicts(config.events_path.with_name("conflicts.jsonl"))
               if r["origin"] != config.node_id]
    if args.json:
        _print_json({"node": config.node_id, "conflicts": records})
        return EXIT_OK
    rows = [[r["origin"], r["reason"], " ".join(str(e.get("id", "?"))[:12] for e in r["events"])]
            for r in records]
    print(_table(rows, ["NODE", "REASON", "EVIDENCE (event ids)"], indent=""))
    return EXIT_OK


def _until(ts: float, now: float) -> str:
    return "now" if ts - now < 1 else f"in {_span(ts - now)}"


def cmd_queue(args: argparse.Namespace) -> int:
    from .control import request
    from .ids import is_node_id

    if args.to is not None and not is_node_id(args.to):
        raise UsageError(f"--to: {args.to!r} is not a node id; expected letters, digits, '-', '_'")
    if args.state is not None and args.state not in QUEUE_STATES:
        raise UsageError(f"--state: {args.state!r} is not a state; expected one of {', '.join(QUEUE_STATES)}")
    if args.limit < 0:
        raise UsageError(f"--limit: {args.limit} is negative; give a count, or 0 for all")
    config = _config(args)
    ans = request(config, "queue")
    if ans.message:
        print(f"maildrop: {ans.message}", file=sys.stderr)
    if ans.status:
        return ans.status
    rows = [r for r in ans.rows if (args.to is None or r["destination"] == args.to)
            and (args.state is None or r["state"] == args.state)]
    if args.json:
        _print_json({"node": config.node_id, "agent_running": ans.agent, "total": len(rows),
                     "transfers": rows})
        return EXIT_OK
    now = time.time()
    shown = rows if args.limit == 0 else rows[:args.limit]
    table = []
    for r in shown:
        state = r["state"] + (f" → {r['hop']}" if r["hop"] else "")
        if r["bytes"] is not None and r["size"]:
            state += f" {100 * r['bytes'] / r['size']:.0f}%"
        if r["state"] == "held":
            when = "on hold"
        elif r["next_try"] is not None:
            when = _until(r["next_try"], now)
        else:
            when = "at start" if not ans.agent and r["state"] in ("queued", "handed") else "-"
        table.append([r["id"][:12], r["origin"] or "?", r["destination"] or "?", r["name"] or "-",
                      _size(r["size"]), state, when, r["last_error"]])
    print(_table(table, ["ID", "FROM", "TO", "NAME", "SIZE", "STATE", "NEXT TRY", "LAST ERROR"], indent=""))
    if len(rows) > len(shown):
        print(f"… {len(rows) - len(shown)} more (-n 0 shows every row, --json too)")
    total = sum(r["size"] or 0 for r in rows)
    print(f"-- {len(rows)} transfer(s), {_size(total)}"
          + ("" if ans.agent else "; the agent is not running (read from the log and spool)"))
    return EXIT_OK


def _control(args: argparse.Namespace, op: str, all_: bool = False) -> int:
    from .control import request

    ans = request(_config(args), op, args.transfer, all_)
    if ans.message:
        print(ans.message if ans.status == EXIT_OK else f"maildrop: {ans.message}", file=sys.stderr)
    return ans.status


def cmd_flush(args: argparse.Namespace) -> int:
    if (args.transfer is None) == (not args.all):
        raise UsageError("give one TRANSFER or --all (not both)")
    return _control(args, "flush", args.all)


def cmd_cancel(args: argparse.Namespace) -> int:
    return _control(args, "cancel")


def cmd_hold(args: argparse.Namespace) -> int:
    return _control(args, "hold")


def cmd_release(args: argparse.Namespace) -> int:
    return _control(args, "release")


def cmd_serve(args: argparse.Namespace) -> int:
    """``maildrop serve``: sshd runs it for a peer it authenticated; a pipe to the agent
    (``transport.local``). Nothing but the protocol is ever written to stdout."""
    from .ids import is_node_id
    from .keys import normalize_public_line
    from .transport.local import SOCKET_NAME, authenticated_keys, serve_stdio

    peer = args.peer
    if peer is not None and not is_node_id(peer):
        raise UsageError(f"--peer {peer!r} is not a node id (letters, digits, '-', '_'; 1..64 chars)")
    key = None
    auth = os.environ.get("SSH_USER_AUTH")
    if auth:
        try:
            keys = authenticated_keys(auth)
        except OSError as exc:
            raise UsageError(f"cannot read $SSH_USER_AUTH ({auth}): {exc.strerror or exc}") from None
        if keys:
            try:
                key = normalize_public_line(keys[-1])  # the key that completed the login
            except ValueError:
                if peer is None:
                    raise UsageError(f"sshd authenticated a {keys[-1].split()[0]} key: only a "
                                     "peer's ed25519 node key names a peer") from None
    if peer is None and key is None:
        raise UsageError("cannot tell which peer this session is for: give --peer ID (a forced "
                         "command in authorized_keys), or set 'ExposeAuthInfo yes' in sshd_config "
                         "so the key sshd authenticated names the peer")
    config = _config(args)
    serve_stdio(config.state_dir / SOCKET_NAME, peer, key)
    return EXIT_OK


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_checks

    return run_checks(getattr(args, "config", None), as_json=args.json, peers=args.peers)


def cmd_rotate_key(args: argparse.Namespace) -> int:
    """Generate ``<key>.new``, append a ``node.configured`` with it signed by the current
    key, then install it (the old key kept as ``<key>.old``). Refused while the agent runs
    (it signs with the key it loaded). Run again after a crash, it finishes the rotation."""
    from .agent import _lock_root, open_log
    from .announce import node_configured
    from .config import format_hostport
    from .keys import NEW_SUFFIX, OLD_SUFFIX, install_new_key, load_key, new_key_for, sibling

    config = _config(args)
    path = config.key_path
    lock = _lock_root(config)
    try:
        current = load_key(path)
        elog = open_log(config)
        try:
            with elog.lock:
                feed_key = elog.ledger.key_of(config.node_id)
            pending = sibling(path, NEW_SUFFIX)
            if feed_key is None:
                raise MaildropError(f"{config.events_path} holds no event of this node: start the agent "
                                    "once (it takes its feed back from its peers), stop it, then rotate")
            if feed_key == current.public_line:
                new = new_key_for(path, comment=f"maildrop-{config.node_id}")
                elog.append_own(current, config.node_id, node_configured(
                    config.node_id, config.display_name, format_hostport(config.advertise),
                    new.public_line), time.time())
            elif pending.exists() and load_key(pending).public_line == feed_key:
                new = load_key(pending)  # announced before a crash: only the switch is left
            else:
                raise MaildropError(f"{path} is not this node's current key (its feed rotated to "
                                    f"{feed_key[:32]}…): restore the current key from its backup")
        finally:
            elog.close()
        install_new_key(path)
    finally:
        os.close(lock)
    print(new.public_line)
    print(f"rotated the key of {config.node_id}: the old key is kept as {sibling(path, OLD_SUFFIX)}. "
          "Start the agent: peers follow the signed rotation on their own; give each peer's "
          "operator the line above for their config", file=sys.stderr)
    return EXIT_OK


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir)


# -- explain and time travel (docs/history.md) -----------------------------------------------

def _held_records(config, tid: str | None = None) -> tuple[list, list, dict[str, str]]:
    """What this node holds: its network events, its transfer facts (of ``tid`` only, when
    given) and its conflicts. The facts are the fact store's, and the legacy (version 1)
    transfer events of its feeds that this node is a party of and that no writer has moved
    into the store yet (a log written before the upgrade, read before the agent ran)."""
    from .eventlog import EventLog
    from .events import TRANSFER_TYPES

    elog = EventLog(config.events_path, pinned={p.id: p.key for p in config.peers}, writable=False,
                    me=config.node_id)
    try:
        network, legacy = [], []
        for e in elog.ledger.all_events():
            if e.type not in TRANSFER_TYPES:
                network.append(e)
            elif tid is None or e.data["transfer"] == tid:
                legacy.append(e)
        stored = elog.facts.facts_of(tid) if tid is not None else elog.facts.all_facts()
        ours = elog.party_of(legacy)
        seen = {e.id for e in stored}
        facts = stored + [e for e in legacy if e.data["transfer"] in ours and e.id not in seen]
        return network, facts, dict(elog.ledger.conflicts)
    finally:
        elog.close()


def _held_events(config) -> tuple[list, dict[str, str]]:
    """Every record this node holds (network events and transfer facts) and its conflicts:
    the one place ``status --at`` reads history from."""
    network, facts, conflicts = _held_records(config)
    return network + facts, conflicts


def facts_for(config, tid: str) -> list:
    """Every transfer fact this node holds about ``tid`` (any origin, oldest first)."""
    _, facts, _ = _held_records(config, tid)
    return sorted(facts, key=lambda e: (e.ts, e.origin, e.seq))


def _transfer_id(config, text: str) -> str:
    """The full id for TRANSFER (an id or its unique start among the ids held here)."""
    import re

    if not re.fullmatch(r"[0-9a-f]{1,32}", text):
        raise UsageError(f"{text!r} is not a transfer id; expected up to 32 hex digits (0-9, a-f), "
                         "as 'maildrop queue' shows them")
    if len(text) == 32:
        return text
    _, facts, _ = _held_records(config)
    found = sorted({e.data["transfer"] for e in facts if e.data["transfer"].startswith(text)})
    if len(found) > 1:
        many = "more than 3" if len(found) > 3 else str(len(found))
        raise UsageError(f"{text!r} is the start of {many} transfer ids ({', '.join(f[:16] for f in found[:3])}"
                         f"{', …' if len(found) > 3 else ''}); give more digits")
    if not found:
        raise MaildropError(f"no transfer {text} is known here (no fact about it is held on this node)")
    return found[0]


def cmd_explain(args: argparse.Namespace) -> int:
    from .control import Answer, request
    from .explain import explain
    from .model import fold

    config = _config(args)
    tid = _transfer_id(config, args.transfer)
    facts = facts_for(config, tid)
    if not facts:
        raise MaildropError(f"no transfer {tid} is known here (no fact about it is held on this node)")
    names = _names(config)
    claims = fold(facts).claims.get(tid, {})
    name = _name_of(claims[min(claims)], config.node_id, names) if claims else None
    try:  # this node's own custody row: the facts explain the rest without it
        ans = request(config, "queue")
    except MaildropError as exc:
        ans = Answer(EXIT_FAIL, str(exc))
    here = next((r for r in ans.rows if r["id"] == tid), None) if not ans.status else None
    doc = explain(tid, facts, config.node_id, name, here)
    assert doc is not None  # facts about tid are held
    doc["agent_running"] = bool(ans.agent)
    doc["here_unknown"] = ans.message if ans.status else None
    if args.json:
        _print_json(doc)
        return EXIT_OK
    print(f"transfer   {doc['transfer']}  {doc['origin'] or '?'} → {doc['destination'] or '?'}  "
          f"{doc['name'] or '(name not readable here)'}  {_size(doc['size'])}")
    print(f"state      {doc['state']}" + (f" ({doc['failed']})" if doc["failed"] else "")
          + f"   as node {doc['node']} holds it")
    print("hops")
    print(_table([[h["node"], h["role"], h["from"] or "-", h["took"] or "?", h["outcome"]
                   + (f" → {h['to']}" if h["to"] else ""), h["left"] or "-", h["reason"]]
                  for h in doc["hops"]], ["NODE", "ROLE", "FROM", "TOOK", "OUTCOME", "AT", "REASON"]))
    print("facts")
    print(_table([[t["at"], t["by"], t["type"].removeprefix("transfer."), t["text"]] for t in doc["timeline"]],
                 ["TIME", "BY", "FACT", "WHAT"]))
    h = doc["here"]
    if doc["here_unknown"]:
        print(f"here       unknown ({doc['here_unknown']})")
    elif h is not None:
        state = h["state"] + (f" → {h['hop']}" if h["hop"] else "")
        print(f"here       {state}" + (f", last error: {h['last_error']}" if h["last_error"] else "")
              + ("" if ans.agent else " (the agent is not running: read from the log and spool)"))
    return EXIT_OK


def status_at_document(config, at: float, now: float) -> dict[str, Any]:
    """``status --at``: the model folded from the records dated at or before ``at``.
    Raises MaildropError (exit 1) when ``at`` is before the history held here."""
    from .routing import route
    from .timetravel import Unheld, check_held, held_since, model_at

    events, conflicts = _held_events(config)
    try:
        check_held(held_since(events, now, config.history_keep), at)
    except Unheld as exc:
        raise MaildropError(str(exc)) from None
    net = model_at(events, at)
    names = _names(config)
    transfers = []
    for t in sorted(net.all_transfers(), key=lambda t: t.queued_ts or ""):
        d = t.as_dict()
        d.update(_file_of(t, config.node_id, names))
        transfers.append(d)
    doc = net.as_dict()
    doc.update({
        "node": config.node_id, "at": _iso(at), "events": net.event_count,
        "routes": {n: route(net, config.node_id, n, excluded=conflicts)
                   for n in sorted(net.nodes) if n != config.node_id},
        "transfers": transfers,
    })
    return doc


def _iso(ts: float) -> str:
    from .events import format_ts

    return format_ts(ts)


def _status_at(args: argparse.Namespace) -> int:
    from .timetravel import parse_at

    now = time.time()
    try:
        at = parse_at(args.at, now)
    except ValueError as exc:
        raise UsageError(f"--at: {exc}; expected e.g. 2026-12-01T18:00:00Z or -2h") from None
    config = _config(args)
    doc = status_at_document(config, at, now)
    if args.json:
        _print_json(doc)
        return EXIT_OK
    print(f"node       {doc['node']} as its records say at {doc['at']} ({doc['events']} records up to then)")
    print("known nodes and routes")
    rows = []
    for n in doc["nodes"]:
        r = doc["routes"].get(n["id"])
        rows.append([n["id"], n["address"], "(this node)" if n["id"] == doc["node"]
                     else (" → ".join(r) if r else "no route")])
    print(_table(rows, ["NODE", "ADDRESS", "ROUTE"]))
    print("links")
    print(_table([[lk["from"], lk["to"], lk["state"]] for lk in doc["links"]], ["FROM", "TO", "STATE"]))
    print("transfers")
    shown = doc["transfers"][-STATUS_TRANSFERS:]
    if len(doc["transfers"]) > len(shown):
        print(f"  … {len(doc['transfers']) - len(shown)} more, older ('--json' lists every one)")
    print(_table([[t["id"][:12], t["origin"] or "?", t["destination"] or "?", t["name"] or "-",
                   _size(t["size"]), t["state"], t["delivered"] or ""] for t in shown],
                 ["ID", "FROM", "TO", "NAME", "SIZE", "STATE", "DELIVERED"]))
    return EXIT_OK


COMMANDS = {
    "init": cmd_init, "pubkey": cmd_pubkey, "events": cmd_events, "status": cmd_status,
    "route": cmd_route, "run": cmd_run, "send": cmd_send, "check": cmd_check, "demo": cmd_demo,
    "serve": cmd_serve,
    "conflicts": cmd_conflicts, "rotate-key": cmd_rotate_key,
    "queue": cmd_queue, "flush": cmd_flush, "cancel": cmd_cancel, "hold": cmd_hold, "release": cmd_release,
    "explain": cmd_explain,
}
