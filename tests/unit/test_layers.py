"""Imports flow one way: pure core -> edges -> shell -> cli (docs/architecture.md)."""

import ast
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "maildrop"
CORE = {"ids", "errors", "keys", "events", "ledger", "model", "routing", "relay", "announce", "admission",
        "health", "checkpoint", "explain", "timetravel", "snapshot",
        "protocol", "gossip", "reconcile", "config", "logsafe", "durable", "lifecycle"}
EDGES = {"eventlog", "factstore", "spool", "seal", "transport.ssh", "transport.local", "transport.openssh",
         "watcher", "sdnotify", "metrics", "failpoints", "notices"}
SHELL = {"transfers", "custodian", "agent", "localnet", "demo", "check", "control"}
THIRD_PARTY_HOME = {"paramiko": {"transport.ssh"}, "watchdog": {"watcher"},
                    "prometheus_client": {"metrics"}, "pyrage": {"seal"}}
EDGE_OWNS = {"eventlog": {"factstore"}}
"""An edge that owns another: the event log keeps its transfer facts in the fact store."""
FORBIDDEN_IN_CORE = {"socket", "subprocess", "paramiko", "watchdog", "fcntl", "threading"}


def _modules():
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG).with_suffix("")
        name = ".".join(rel.parts)
        if name.endswith("__init__") or name == "__main__":
            continue
        yield name, ast.parse(path.read_text())


def _imports(name, tree):
    pkg_parts = name.split(".")[:-1]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, False
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg_parts[: len(pkg_parts) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                if node.module is None:
                    for a in node.names:
                        yield ".".join(base + [a.name]), True
                else:
                    yield mod, True
            elif node.module == "maildrop":
                for a in node.names:
                    yield f"maildrop.{a.name}", True
            else:
                yield node.module or "", bool(node.module and node.module.startswith("maildrop"))


def test_core_imports_only_core_and_no_io():
    for name, tree in _modules():
        if name not in CORE:
            continue
        for mod, internal in _imports(name, tree):
            mod = mod.removeprefix("maildrop.")
            if internal:
                assert mod in CORE, f"{name} (core) imports {mod}"
            else:
                assert mod.split(".")[0] not in FORBIDDEN_IN_CORE, f"{name} (core) imports {mod}"


def test_the_lifecycle_imports_only_the_standard_library():
    [(name, tree)] = [(n, t) for n, t in _modules() if n == "lifecycle"]
    for mod, internal in _imports(name, tree):
        assert not internal and mod.split(".")[0] in sys.stdlib_module_names, f"lifecycle imports {mod}"
        assert mod.split(".")[0] not in FORBIDDEN_IN_CORE | {"os", "time", "io", "pathlib", "random"}, mod


def test_edges_never_import_each_other_or_the_shell():
    for name, tree in _modules():
        if name not in EDGES:
            continue
        for mod, internal in _imports(name, tree):
            mod = mod.removeprefix("maildrop.")
            if internal:
                assert mod in CORE | EDGE_OWNS.get(name, set()), f"{name} (edge) imports {mod}"


def test_third_party_libraries_have_one_home():
    for name, tree in _modules():
        for mod, _ in _imports(name, tree):
            top = mod.split(".")[0]
            if top in THIRD_PARTY_HOME:
                assert name in THIRD_PARTY_HOME[top], f"{name} imports {top}"


def test_every_module_is_placed():
    names = {n for n, _ in _modules()}
    assert names <= CORE | EDGES | SHELL | {"cli"}, names - (CORE | EDGES | SHELL | {"cli"})
