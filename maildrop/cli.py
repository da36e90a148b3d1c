"""The command line: argument parsing and output formatting. ``main(argv) -> exit status``.

Exit statuses: 0 success; 1 operational failure (a --wait deadline passed, the transfer
failed, the agent stopped on an error); 2 usage or configuration error; 130 interrupted.
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
    sp.add_argument("--timeout", type=float, default=600.0, metavar="SECONDS",
                    help="with --wait: give up waiting after this long (default 600)")
    cmd("check", "check config, key, folders and permissions; say what to fix")
    sp = cmd("conflicts", "list the nodes marked as conflicts (forked feeds, never routed to), or clear one")
    sp.add_argument("--json", action="store_true", help="one JSON document, with the evidence events")
    sp.add_argument("--clear", metavar="NODE",
                    help="forget NODE's conflict (the running agent sees it within a second); "
                         "exit 1 if NODE had none. A real fork is found again when its events come back")
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    complete(parser)
    args = parser.parse_args(argv)
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
    json.dump(obj, sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def _table(rows: list[list[str]], headers: list[str], indent: str = "  ") -> str:
    if not rows:
        return indent + "(none)"
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]
    fmt = indent + "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers).rstrip()]
    out += [fmt.format(*[str(c) for c in r]).rstrip() for r in rows]
    return "\n".join(out)


def _ago(ts: float | None, now: float) -> str:
    if ts is None:
        return "never"
    d = max(0.0, now - ts)
    if d < 60:
        return f"{d:.0f}s ago"
    if d < 3600:
        return f"{d / 60:.0f}m ago"
    if d < 86400:
        return f"{d / 3600:.1f}h ago"
    return f"{d / 86400:.1f}d ago"


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
    text = render_config(args.id, args.listen, display_name=args.display_name)
    if args.advertise:
        text = text.replace(f"  # advertise: {args.listen}", f"  advertise: {args.advertise}", 1)
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
    elog = EventLog(config.events_path, writable=False)
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


def _file_order(path: Path, elog) -> list:  # events valid in the ledger, in log order
    valid = {e.id: e for e in elog.ledger.all_events()}
    out = []
    try:
        with open(path, "rb") as f:
            for line in f:
                try:
                    eid = json.loads(line).get("id")
                except ValueError:
                    continue
                ev = valid.pop(eid, None)
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
        parts.append(f"{k}={v}")
    return " ".join(parts)


def _agent_state(config) -> dict[str, Any] | None:
    from .agent import STATUS_FILE

    try:
        st = json.loads((config.state_dir / STATUS_FILE).read_bytes())
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
    from .eventlog import EventLog
    from .routing import route

    elog = EventLog(config.events_path, pinned={p.id: p.key for p in config.peers}, writable=False,
                    me=config.node_id)
    net = elog.network
    agent = _agent_state(config)
    running = bool(agent and agent["running"])
    inflight = {p["transfer"]: p for p in (agent or {}).get("inflight", [])} if running else {}
    peers = []
    for p in config.peers:
        soft = next((x for x in (agent or {}).get("peers", []) if x.get("id") == p.id), {})
        obs = net.last_observation(config.node_id, p.id)
        state = soft.get("state") if running else ("up" if obs and obs[0] else "down")
        peers.append({"id": p.id, "address": f"{p.address[0]}:{p.address[1]}",
                      "state": "up" if state == "up" else "down",
                      "last_seen": soft.get("last_seen"), "last_error": soft.get("last_error", "")})
    routes = {}
    for n in sorted(net.nodes):
        if n != config.node_id:
            routes[n] = route(net, config.node_id, n, excluded=elog.ledger.conflicts)
    transfers = []
    for t in sorted(net.all_transfers(), key=lambda t: t.queued_ts or ""):
        d = t.as_dict()
        fl = inflight.get(t.id)
        d["hop"] = fl["peer"] if fl else None
        d["bytes"] = fl["bytes"] if fl else (t.size if t.state == "delivered" else None)
        if fl and d["state"] in ("queued", "relayed"):
            d["state_detail"] = "in-flight"
        transfers.append(d)
    doc = net.as_dict()
    doc.update({
        "node": config.node_id, "display_name": config.display_name,
        "listen": f"{config.listen[0]}:{config.listen[1]}",
        "fingerprint": elog.ledger.fingerprint(), "events": elog.ledger.count,
        "log_bytes": elog.size_bytes, "rejected_events": len(elog.rejected),
        "conflicts": dict(elog.ledger.conflicts),
        "agent": {"running": running, "pid": agent.get("pid") if agent else None,
                  "started": agent.get("started") if agent else None},
        "peers": peers, "routes": routes, "transfers": transfers,
        "errors": (agent or {}).get("errors", []) if agent else [],
    })
    elog.close()
    return doc


def cmd_status(args: argparse.Namespace) -> int:
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
    print(_table([[p["id"], p["address"], p["state"], _ago(p["last_seen"], now), p["last_error"][:60]]
                  for p in doc["peers"]], ["ID", "ADDRESS", "STATE", "LAST SEEN", "LAST ERROR"]))
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
    for t in doc["transfers"][-50:]:
        prog = ""
        if t.get("hop"):
            pct = 100 * (t["bytes"] or 0) / t["size"] if t["size"] else 100
            prog = f"→ {t['hop']} {_size(t['bytes'])}/{_size(t['size'])} ({pct:.0f}%)"
        elif t["state"] == "failed":
            prog = t["failed"] or ""
        rows.append([t["id"][:12], t["origin"] or "?", t["destination"] or "?", t["name"] or "?",
                     _size(t["size"]), t.get("state_detail") or t["state"], prog])
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
    from .routing import route

    config = _config(args)
    if not is_node_id(args.node):
        raise UsageError(f"{args.node!r} is not a node id; expected letters, digits, '-', '_'")
    elog = EventLog(config.events_path, writable=False)
    path = route(elog.network, config.node_id, args.node, excluded=elog.ledger.conflicts)
    known = args.node in elog.network.nodes
    if args.json:
        _print_json({"from": config.node_id, "to": args.node, "known": known, "route": path})
    elif path:
        print(" → ".join(path))
    else:
        why = "is not known yet (no gossip from it)" if not known else "is known but unreachable over up links"
        print(f"no route: {args.node} {why}", file=sys.stderr)
    return EXIT_OK if path else EXIT_FAIL


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        d = {"ts": self.formatTime(record, "%Y-%m-%dT%H:%M:%S") + f".{int(record.msecs):03d}Z",
             "level": record.levelname.lower(), "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            d["exc"] = self.formatException(record.exc_info)
        return json.dumps(d, sort_keys=True)


def setup_logging(level: str, as_json: bool) -> None:
    from .logsafe import OneLine

    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(OneLine())  # text from peers never starts a line of its own
    if as_json:
        handler.setFormatter(_JsonFormatter())
    else:
        fmt = logging.Formatter("%(asctime)s.%(msecs)03dZ %(levelname)-7s %(name)s %(message)s",
                                "%Y-%m-%dT%H:%M:%S")
        handler.setFormatter(fmt)
    logging.Formatter.converter = time.gmtime
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(getattr(logging, level.upper()))
    if level != "debug":
        # The transport logs its own one-line reasons; paramiko's tracebacks for a client
        # that hung up early (port probes, scanners) are noise in the journal.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)


def cmd_run(args: argparse.Namespace) -> int:
    from .agent import Agent

    config = _config(args)
    setup_logging(args.log_level or config.log_level,
                  config.log_json if args.log_json is None else args.log_json)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        logging.getLogger("maildrop.agent").info("agent.signal signal=%s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    agent = Agent(config)
    return agent.run(stop)


def cmd_send(args: argparse.Namespace) -> int:
    from .ids import is_node_id, safe_file_name

    config = _config(args)
    src = Path(args.file)
    if not is_node_id(args.node):
        raise UsageError(f"{args.node!r} is not a node id; expected letters, digits, '-', '_'")
    if not src.is_file():
        raise UsageError(f"{src}: no such file")
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


def _wait_for_receipt(config, name: str, dest: str, since: float, timeout: float) -> int:
    from .eventlog import EventLog
    from .events import parse_ts

    deadline = time.monotonic() + timeout
    elog = EventLog(config.events_path, writable=False)
    tid = None
    tty = sys.stderr.isatty()
    last_line = ""
    warned = False
    while time.monotonic() < deadline:
        elog.refresh()
        if tid is None:
            for t in elog.network.all_transfers():
                if (t.origin == config.node_id and t.destination == dest and t.name == name
                        and t.queued_ts and parse_ts(t.queued_ts) >= since - 1):
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
    print(f"\rmaildrop: no receipt within {timeout:.0f} s (the transfer goes on; see 'maildrop status')",
          file=sys.stderr)
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


def cmd_check(args: argparse.Namespace) -> int:
    from .check import run_checks

    return run_checks(getattr(args, "config", None))


def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo(args.dir)


COMMANDS = {
    "init": cmd_init, "pubkey": cmd_pubkey, "events": cmd_events, "status": cmd_status,
    "route": cmd_route, "run": cmd_run, "send": cmd_send, "check": cmd_check, "demo": cmd_demo,
    "conflicts": cmd_conflicts,
}
