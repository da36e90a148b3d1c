"""What maildrop takes from its libraries, and what it ships (issue 14, items 9 and 10).

- Every library maildrop imports is declared in pyproject.toml, and the installed versions
  are inside the declared ranges.
- maildrop leans on internals of watchdog (the move grouper's delay, the text it logs on an
  inotify overflow) and of paramiko (Packetizer and Transport private methods and tables).
  pyproject bounds both to the tested major; the tests here check each internal with real
  parts and, when an upgrade moves one, fail with a message naming the internal, the
  installed version and the tested one.
- The wheel carries the man page, made from the parser at build time; shell completion is
  optional and costs nothing when the shell does not ask for it.
"""

from __future__ import annotations

import ast
import inspect
import logging
import os
import queue
import socket
import subprocess
import sys
import threading
import time
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import paramiko
import pytest
from packaging.requirements import Requirement
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer, inotify_c, inotify_move_event_grouper

from maildrop import cli, watcher
from maildrop.transport import ssh

ROOT = Path(__file__).resolve().parents[2]
PKG = ROOT / "maildrop"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
TESTED = {"paramiko": "5.1", "watchdog": "7.1"}


def _moved(lib: str, internal: str, detail: str, relies: str) -> str:
    return (f"{lib} {metadata.version(lib)} (tested: {TESTED[lib]}): {internal} {detail}. "
            f"{relies} Adapt that code and re-run the tests before widening {lib}'s bound in "
            f"pyproject.toml.")


# -- item 10: what is used is declared ---------------------------------------------------------

def _dist(module: str) -> str:
    dists = metadata.packages_distributions().get(module)
    assert dists, f"maildrop imports {module!r}, which no installed distribution provides"
    return dists[0].lower().replace("_", "-")


def _third_party_imports() -> tuple[set[str], set[str]]:
    """(modules imported unconditionally, modules imported only under ``except ImportError``)
    by maildrop's own code, top-level names, stdlib left out."""
    hard: set[str] = set()
    soft: set[str] = set()
    for path in PKG.rglob("*.py"):
        tree = ast.parse(path.read_text())
        optional = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers):
                optional |= {id(n) for stmt in node.body for n in ast.walk(stmt)}
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top != "maildrop" and top not in sys.stdlib_module_names:
                    (soft if id(node) in optional else hard).add(top)
    return hard, soft - hard


def _declared(requirements: list[str]) -> dict[str, Requirement]:
    reqs = [Requirement(r) for r in requirements]
    return {r.name.lower().replace("_", "-"): r for r in reqs}


def test_10_every_imported_library_is_declared():
    hard, soft = _third_party_imports()
    runtime = _declared(PYPROJECT["project"]["dependencies"])
    extras = {name: _declared(reqs) for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()
              if name != "test"}
    assert {"paramiko", "watchdog", "cryptography", "yaml"} <= hard  # the walk sees real imports
    for module in sorted(hard):
        assert _dist(module) in runtime, (
            f"maildrop imports {module} ({_dist(module)}) but pyproject.toml's dependencies do not declare it")
    for module in sorted(soft):
        assert any(_dist(module) in reqs for reqs in extras.values()), (
            f"maildrop imports {module} when installed; declare {_dist(module)} in an optional extra")


def test_10_installed_versions_are_inside_the_declared_ranges():
    groups = [PYPROJECT["project"]["dependencies"], PYPROJECT["build-system"]["requires"],
              *PYPROJECT["project"]["optional-dependencies"].values()]
    for group in groups:
        for name, req in _declared(group).items():
            try:
                installed = metadata.version(name)
            except metadata.PackageNotFoundError:
                continue  # e.g. hatchling: only in pip's isolated build environment
            assert req.specifier.contains(installed, prereleases=True), (
                f"{name} {installed} is installed but pyproject.toml declares {req}")


def test_10_libraries_whose_internals_are_used_have_an_upper_bound():
    runtime = _declared(PYPROJECT["project"]["dependencies"])
    for name in TESTED:
        spec = runtime[name].specifier
        assert any(s.operator == "<" for s in spec), f"{name} is declared {spec}: no upper bound"
        assert spec.contains(metadata.version(name)), f"{name} {metadata.version(name)} outside {spec}"


# -- item 10: watchdog internals ---------------------------------------------------------------

def test_10_watchdog_move_grouper_delay_is_what_the_watcher_lowers(tmp_path, monkeypatch):
    """watcher._shorten_move_pairing_delay sets InotifyMoveEventGrouper.delay, a class
    attribute each grouper reads when it is made; a rename out of the tree then reaches
    the handler after ~MOVE_PAIRING_DELAY instead of watchdog's 0.5 s."""
    cls = getattr(inotify_move_event_grouper, "InotifyMoveEventGrouper", None)
    assert cls is not None, _moved("watchdog", "watchdog.observers.inotify_move_event_grouper."
                                   "InotifyMoveEventGrouper", "is gone",
                                   "maildrop/watcher.py _shorten_move_pairing_delay lowers its delay.")
    # watchdog's own default, from a fresh interpreter: in this one an agent test may have
    # lowered the class attribute already (the watcher sets it once per process)
    probe = subprocess.run(
        [sys.executable, "-c", "from watchdog.observers.inotify_move_event_grouper import "
         "InotifyMoveEventGrouper as C; print(repr(C.__dict__.get('delay')))"],
        capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    default = ast.literal_eval(probe.stdout.strip())
    assert isinstance(default, int | float) and default > watcher.MOVE_PAIRING_DELAY, _moved(
        "watchdog", "InotifyMoveEventGrouper.delay", f"is {default!r}, not a number of seconds "
        f"over {watcher.MOVE_PAIRING_DELAY}", "maildrop/watcher.py lowers it (fast renames in).")
    assert "self.delay" in inspect.getsource(cls.__init__), _moved(
        "watchdog", "InotifyMoveEventGrouper.__init__", "no longer reads self.delay",
        "maildrop/watcher.py sets the class attribute before it makes an observer.")
    monkeypatch.setattr(cls, "delay", default)  # restored after the test
    watcher._shorten_move_pairing_delay()
    assert cls.delay == watcher.MOVE_PAIRING_DELAY

    watched, outside = tmp_path / "watched", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    (watched / "f").write_bytes(b"x")
    seen: queue.SimpleQueue[float] = queue.SimpleQueue()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            if event.event_type in ("moved", "deleted") and not event.is_directory:
                seen.put(time.monotonic())

    observer = watcher._new_observer(polling=False)
    observer.schedule(Handler(), str(watched), recursive=True)
    observer.start()
    try:
        t0 = time.monotonic()
        os.rename(watched / "f", outside / "f")
        took = seen.get(timeout=10) - t0
    finally:
        observer.stop()
        observer.join(10)
    assert took < default * 0.8, _moved(
        "watchdog", "InotifyMoveEventGrouper.delay", f"was lowered but a move out still took {took:.3f} s",
        "maildrop/watcher.py relies on it for rename latency.")


def test_10_watchdog_renamed_in_from_outside_is_a_moved_event(tmp_path):
    """The watcher's fast path: with generate_full_events, a file renamed in from outside
    the watched tree is a *moved* event with an empty source, not *created*."""
    assert getattr(Observer, "__name__", "") == "InotifyObserver"
    assert "generate_full_events" in inspect.signature(Observer.__init__).parameters, _moved(
        "watchdog", "InotifyObserver(generate_full_events=...)", "is gone",
        "maildrop/watcher.py _new_observer passes it.")
    watched, outside = tmp_path / "watched", tmp_path / "outside"
    watched.mkdir()
    outside.mkdir()
    (outside / "f").write_bytes(b"x")
    events: queue.SimpleQueue = queue.SimpleQueue()

    class Handler(FileSystemEventHandler):
        def on_any_event(self, event):
            if not event.is_directory and event.event_type != "opened":
                events.put(event)

    observer = watcher._new_observer(polling=False)
    observer.schedule(Handler(), str(watched), recursive=True)
    observer.start()
    try:
        os.rename(outside / "f", watched / "f")
        event = events.get(timeout=10)
    finally:
        observer.stop()
        observer.join(10)
    assert (event.event_type, event.src_path, event.dest_path) == ("moved", "", str(watched / "f")), _moved(
        "watchdog", "generate_full_events", f"now reports a rename in from outside as {event!r}",
        "maildrop/watcher.py takes such a file at once (no settle delay).")


def test_10_watchdog_inotify_overflow_is_logged_as_the_watcher_expects(tmp_path):
    """A real kernel queue overflow on watchdog's inotify wrapper: watchdog only logs it, on
    the logger the watcher hooks, in text containing "overflow"; the watcher's hook turns
    that record into a rescan request."""
    limit = int(Path("/proc/sys/fs/inotify/max_queued_events").read_text())
    if limit > 1 << 18:
        pytest.skip(f"fs.inotify.max_queued_events is {limit}: too many events to overflow quickly")
    name = "watchdog.observers.inotify_c"  # the logger maildrop/watcher.py hooks
    assert inotify_c.logger.name == name, _moved(
        "watchdog", "inotify_c's logger", f"is now {inotify_c.logger.name!r}",
        f"maildrop/watcher.py listens on {name!r} for overflow records.")

    class Callback:
        overflowed = False

        def on_event(self, event):
            pass

        def on_watch_deleted(self, wd):
            pass

        def on_queue_overflow(self):
            self.overflowed = True

    requests: queue.SimpleQueue[object] = queue.SimpleQueue()
    hook = watcher._OverflowHook(requests)
    logging.getLogger(name).addHandler(hook)
    fd = inotify_c.InotifyFD()
    try:
        cb = Callback()
        mask = inotify_c.InotifyConstants.IN_OPEN | inotify_c.InotifyConstants.IN_CLOSE_NOWRITE
        fd.add_callback(os.fsencode(tmp_path), mask, cb, inotify_c.CallbackId(1))
        for _ in range(limit // 2 + 16):  # open/close alternate, so the kernel merges none
            os.close(os.open(tmp_path, os.O_RDONLY))
        deadline = time.monotonic() + 10
        while not cb.overflowed and time.monotonic() < deadline:
            for event in fd.read_events():
                fd.handle_event(event)
    finally:
        logging.getLogger(name).removeHandler(hook)
        fd.close()
    assert cb.overflowed, "the kernel queue did not overflow (test setup)"
    got = []
    while not requests.empty():
        got.append(requests.get())
    assert watcher._OVERFLOW in got, _moved(
        "watchdog", "the log record of an inotify overflow", "no longer contains 'overflow' "
        "(or is below WARNING)", "maildrop/watcher.py's _OverflowHook rescans on it.")


# -- item 10: paramiko internals ---------------------------------------------------------------

def _params(func) -> list[str]:
    return list(inspect.signature(func).parameters)


def test_10_paramiko_packetizer_hooks_are_where_ssh_py_overrides_them():
    P = paramiko.Packetizer
    assert _params(P.read_all)[:3] == ["self", "n", "check_rekey"], _moved(
        "paramiko", "Packetizer.read_all", f"has the signature {inspect.signature(P.read_all)}",
        "maildrop/transport/ssh.py _Packetizer overrides it to bound packet lengths.")
    assert "self.read_all(" in inspect.getsource(P.read_message), _moved(
        "paramiko", "Packetizer.read_message", "no longer reads the packet body via read_all",
        "maildrop/transport/ssh.py bounds packets there.")
    assert _params(P._read_timeout)[:2] == ["self", "timeout"], _moved(
        "paramiko", "Packetizer._read_timeout", f"has the signature {inspect.signature(P._read_timeout)}",
        "maildrop/transport/ssh.py counts banner bytes there.")
    assert "_read_timeout(" in inspect.getsource(P.readline), _moved(
        "paramiko", "Packetizer.readline", "no longer reads through _read_timeout",
        "maildrop/transport/ssh.py bounds the banner there.")
    assert "packetizer_class" in inspect.signature(paramiko.Transport.__init__).parameters, _moved(
        "paramiko", "Transport(packetizer_class=...)", "is gone",
        "maildrop/transport/ssh.py _Transport passes its _Packetizer.")
    a, b = socket.socketpair()
    try:
        t = ssh._Transport(a)
        assert type(t.packetizer) is ssh._Packetizer, _moved(
            "paramiko", "Transport.packetizer", f"is a {type(t.packetizer).__name__}, not the class passed",
            "maildrop/transport/ssh.py bounds reads through it.")
        assert isinstance(t.clear_to_send, threading.Event), _moved(
            "paramiko", "Transport.clear_to_send", "is no threading.Event",
            "maildrop/transport/ssh.py _Transport tests it to queue messages during a key exchange.")
    finally:
        a.close()
        b.close()


def test_10_paramiko_rekey_and_handler_internals_are_where_ssh_py_overrides_them():
    T = paramiko.Transport
    assert _params(T._send_user_message) == ["self", "data"], _moved(
        "paramiko", "Transport._send_user_message", f"has the signature {inspect.signature(T._send_user_message)}",
        "maildrop/transport/ssh.py overrides it (rekey livelock, paramiko issue #822).")
    assert "clear_to_send" in inspect.getsource(T._send_user_message), _moved(
        "paramiko", "Transport._send_user_message", "no longer waits on clear_to_send",
        "maildrop/transport/ssh.py's livelock fix assumes it does.")
    assert _params(T._activate_outbound) == ["self"] and "MSG_NEWKEYS" in inspect.getsource(T._activate_outbound), _moved(
        "paramiko", "Transport._activate_outbound", "changed (signature, or it no longer sends NEWKEYS)",
        "maildrop/transport/ssh.py sends the queued messages right after it.")
    assert callable(getattr(T, "_send_message", None)), _moved(
        "paramiko", "Transport._send_message", "is gone", "maildrop/transport/ssh.py sends through it.")
    table = getattr(T, "_channel_handler_table", {})
    assert table.get(paramiko.common.MSG_CHANNEL_REQUEST) is paramiko.Channel._handle_request, _moved(
        "paramiko", "Transport._channel_handler_table[MSG_CHANNEL_REQUEST]", "is no longer Channel._handle_request",
        "maildrop/transport/ssh.py replaces that entry to start handlers after the reply.")
    assert _params(paramiko.Channel._handle_request) == ["self", "m"], _moved(
        "paramiko", "Channel._handle_request", f"has the signature {inspect.signature(paramiko.Channel._handle_request)}",
        "maildrop/transport/ssh.py calls it.")
    assert "self.server_object" in inspect.getsource(T.start_server), _moved(
        "paramiko", "Transport.server_object", "is no longer set by start_server",
        "maildrop/transport/ssh.py finds its session through it.")


def test_10_paramiko_channel_open_internals_are_where_ssh_py_serves_a_dialed_connection():
    """ssh._Transport._parse_channel_open takes the peer's session channels on a client
    connection, mirroring paramiko's server branch; PeerClient.redundant reads the open
    channels. (tests/integration/test_link_both_ways.py runs them with real parts.)"""
    T = paramiko.Transport
    source = inspect.getsource(T._parse_channel_open)
    assert _params(T._parse_channel_open) == ["self", "m"], _moved(
        "paramiko", "Transport._parse_channel_open", f"has the signature {inspect.signature(T._parse_channel_open)}",
        "maildrop/transport/ssh.py overrides it to serve channels the peer opens on a dialed connection.")
    for step in ("self._next_channel()", "self._channels.put(", "self.channels_seen[", "chan._set_transport(",
                 "chan._set_window(", "chan._set_remote_channel(", "self._queue_incoming_channel(chan)",
                 "cMSG_CHANNEL_OPEN_SUCCESS", "cMSG_CHANNEL_OPEN_FAILURE", "elif not self.server_mode"):
        assert step in source, _moved(
            "paramiko", "Transport._parse_channel_open", f"no longer does {step}",
            "maildrop/transport/ssh.py _Transport._parse_channel_open repeats its accept path.")
    a, b = socket.socketpair()
    try:
        t = ssh._Transport(a)
        assert callable(getattr(t._channels, "values", None)), _moved(
            "paramiko", "Transport._channels", "has no values()",
            "maildrop/transport/ssh.py PeerClient.redundant counts a connection's open channels there.")
    finally:
        a.close()
        b.close()


# -- item 9: man page and completion -----------------------------------------------------------

def _subcommands(parser) -> list[str]:
    actions = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    assert len(actions) == 1
    return sorted(actions[0].choices)


def test_9_wheel_ships_a_man_page_naming_every_command(tmp_path):
    """pip builds the wheel in an isolated environment (only [build-system] requires), as
    ``pip install .`` does; the page is shared data, every subcommand of the parser in it."""
    out = tmp_path / "wheel"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "-q", "-w", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    (wheel,) = out.glob("maildrop-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        pages = [n for n in names if n.endswith("/data/share/man/man1/maildrop.1")]
        assert len(pages) == 1, names
        page = z.read(pages[0]).decode()
    assert page.startswith(".TH MAILDROP \"1\"")
    text = page.replace("\\-", "-")  # roff escapes every hyphen
    commands = _subcommands(cli.build_parser())
    assert len(commands) >= 10
    for command in commands:
        assert f"'maildrop {command}'" in text, f"the man page has no section for 'maildrop {command}'"
    assert ".SH EXIT STATUS" in page and "130 interrupted" in page


def _completions(line: str, tmp_path: Path, *, block_argcomplete: bool = False) -> tuple[str, subprocess.CompletedProcess]:
    """Ask for completions as bash's hook does; (the candidates argcomplete wrote, the run)."""
    answer = tmp_path / "completions"
    env = dict(os.environ, _ARGCOMPLETE="1", COMP_LINE=line, COMP_POINT=str(len(line)),
               _ARGCOMPLETE_IFS="\n", _ARGCOMPLETE_STDOUT_FILENAME=str(answer))
    code = ("import sys; sys.modules['argcomplete'] = None\n" if block_argcomplete else "") + \
        "import sys; from maildrop.cli import main; sys.exit(main())"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=30, cwd=ROOT)
    return (answer.read_text() if answer.exists() else ""), proc


def test_9_completion_offers_every_command_and_option(tmp_path):
    pytest.importorskip("argcomplete")
    words, proc = _completions("maildrop ", tmp_path)
    assert proc.returncode == 0, proc.stderr
    commands = _subcommands(cli.build_parser())
    assert sorted(set(words.split()) & set(commands)) == commands, words
    words, proc = _completions("maildrop send --", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert {"--wait", "--timeout", "--config"} <= set(words.split()), words


def test_9_completion_leaves_parsing_as_it_was(monkeypatch):
    """With the completion hook in place (argcomplete installed, the shell not asking), the
    parser parses every command line as before."""
    pytest.importorskip("argcomplete")
    monkeypatch.delenv("_ARGCOMPLETE", raising=False)
    lines = [["status", "--json"], ["send", "f", "NodeB", "--wait", "--timeout", "5"],
             ["-c", "x.yaml", "route", "NodeC"], ["init", "d", "--id", "A", "--listen", "127.0.0.1:1"],
             ["conflicts", "--clear", "NodeX"], ["run", "--log-level", "debug"]]
    for argv in lines:
        hooked = cli.build_parser()
        cli.complete(hooked)
        assert vars(hooked.parse_args(argv)) == vars(cli.build_parser().parse_args(argv)), argv


def test_9_completion_costs_nothing_unless_asked(tmp_path):
    """Start-up never imports argcomplete (installed or not) unless the shell asks; asked
    without argcomplete installed, the command runs as usual."""
    r = subprocess.run([sys.executable, "-X", "importtime", "-m", "maildrop", "--help"],
                       capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0 and "usage: maildrop" in r.stdout
    assert "import time:" in r.stderr and "argcomplete" not in r.stderr
    words, proc = _completions("maildrop ", tmp_path, block_argcomplete=True)
    assert (words, proc.returncode) == ("", cli.EXIT_USAGE) and "usage: maildrop" in proc.stdout, proc
