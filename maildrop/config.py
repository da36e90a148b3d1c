"""YAML -> frozen ``Config``: the one place a node's config file is read and checked.

Every mistake becomes one line of the form
``<file>: <dotted.key>: <what is wrong>; expected <what is expected>``. Each part of the file
is checked on its own, so one mistake never hides the next: ``load_config`` raises one
``ConfigProblems`` (a ``ConfigError``) whose ``problems`` hold every line (``maildrop check``
lists them all) and whose message is the first one, plus "(and N more problems: see
'maildrop check')" when there are more, so every other command still prints one line.
A YAML syntax error stops the reading there: it is the only problem reported. Unknown keys
are errors at every level (a typo must never be ignored).

YAML is read with a stricter resolver than PyYAML's YAML 1.1 default: only ``true``/``false``
are booleans (``yes``, ``no``, ``on``, ``off`` stay text, so ``id: NO`` is the node "NO" and
``json: yes`` is a clear error), ints are plain decimal (no sexagesimal ``1:30``, no octal
``007``, no ``1_000``, no hex), floats need a dot, and there are no implicit timestamps.

Imports only the stdlib, PyYAML and maildrop's ``errors``, ``ids``, ``keys`` and ``admission``
(the rules ``accept_from``, ``relay_for`` and ``relay.*`` become).
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import math
import os
import re
import shlex
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import yaml

from .admission import Rules
from .errors import ConfigError
from .ids import is_node_id
from .keys import normalize_public_line

__all__ = [
    "CONFIG_ENV",
    "LOCAL_CONFIG_NAME",
    "SYSTEM_CONFIG",
    "Config",
    "ConfigProblems",
    "Peer",
    "find_config",
    "format_duration",
    "format_hostport",
    "format_size",
    "load_config",
    "parse_config",
    "parse_duration",
    "parse_hostport",
    "parse_size",
    "render_config",
]

CONFIG_ENV = "MAILDROP_CONFIG"
LOCAL_CONFIG_NAME = "maildrop.yaml"
SYSTEM_CONFIG = Path("/etc/maildrop/maildrop.yaml")
MAX_CONFIG_BYTES = 1 << 20
MAX_PARALLEL = 64
MAX_DISPLAY_NAME = 128
LOG_LEVELS = ("debug", "info", "warning", "error")

DEFAULT_GOSSIP_INTERVAL = 5.0
DEFAULT_LINK_DOWN_AFTER = 15.0


class ConfigProblems(ConfigError):
    """A config file with one or more problems. ``problems`` holds every one, each a single
    line naming the file, in the order they were checked (about the file's order); the
    message is the first, with a count of the others."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems = tuple(_one_line(p) for p in problems)
        more = len(self.problems) - 1
        extra = f" (and {more} more problem{'s' if more > 1 else ''}: see 'maildrop check')"
        super().__init__(self.problems[0] + (extra if more else ""))


@dataclass(frozen=True)
class Peer:
    """A node this node links to; ``key`` is the normalised ``ssh-ed25519 <base64>`` line.
    ``address`` None: the peer dials us (it is behind NAT or only makes outbound connections);
    we never dial it and use the connection it makes.

    ``via``: how its channels are opened: ``maildrop`` (our own SSH client, to the peer's
    agent at ``address``) or ``openssh`` (the ``ssh`` client, to an sshd at ``address`` that
    runs ``maildrop serve``; an address is required). The ``ssh_*`` fields apply to
    ``openssh`` only: the login name (None: ssh's default), the request (``subsystem``: the
    ``maildrop`` subsystem; ``command``: the command ``maildrop serve``, which a forced
    command replaces), the client's argv before our options, and sshd's host key when it is
    not ``key``."""

    id: str
    address: tuple[str, int] | None
    key: str
    via: str = "maildrop"
    ssh_user: str | None = None
    ssh_request: str = "subsystem"
    ssh_command: tuple[str, ...] = ("ssh",)
    ssh_host_key: str | None = None

    @property
    def host_key(self) -> str:
        """The host key its SSH server must present (pinned; never learned)."""
        return self.ssh_host_key or self.key


@dataclass(frozen=True)
class Config:
    """One node's checked configuration. Paths are absolute; durations are seconds."""

    path: Path
    node_id: str
    display_name: str
    listen: tuple[str, int]
    advertise: tuple[str, int]
    root: Path
    key_path: Path
    peers: tuple[Peer, ...]
    gossip_interval: float = DEFAULT_GOSSIP_INTERVAL
    link_down_after: float = DEFAULT_LINK_DOWN_AFTER
    expire_after: float = 7 * 86400.0
    resend_after: float = 6 * 3600.0
    max_file_size: int = 64 * 2**30
    min_free_space: int = 256 * 2**20
    parallel: int = 4
    settle: float = 1.0
    rescan_interval: float = 30.0
    polling: bool = False
    history_keep: float = 14 * 86400.0  # facts of an ended transfer are kept this long
    log_level: str = "info"
    log_json: bool = False
    metrics_listen: tuple[str, int] | None = None  # None: no metrics served
    # accept_from, relay_for, relay.max_bytes_per_origin, relay.max_transfers_per_origin
    admission: Rules = Rules()

    def peer(self, peer_id: str) -> Peer | None:
        """The configured peer with this id, or None."""
        for p in self.peers:
            if p.id == peer_id:
                return p
        return None

    def peer_by_key(self, public_line: str) -> Peer | None:
        """The configured peer whose key is ``public_line`` (comment ignored), or None."""
        try:
            wanted = normalize_public_line(public_line)
        except ValueError:
            return None
        for p in self.peers:
            if p.key == wanted:
                return p
        return None

    @property
    def outbox(self) -> Path:
        return self.root / "outbox"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def failed(self) -> Path:
        return self.root / "failed"

    @property
    def state_dir(self) -> Path:
        return self.root / "state"

    @property
    def spool(self) -> Path:
        return self.root / "state" / "spool"

    @property
    def events_path(self) -> Path:
        return self.root / "state" / "events.jsonl"


# --------------------------------------------------------------------------- finding, loading


def find_config(
    cli_value: str | None, environ: Mapping[str, str] = os.environ, cwd: Path | None = None
) -> Path:
    """The config file to use: ``--config FILE``, else ``$MAILDROP_CONFIG``, else
    ``./maildrop.yaml``, else ``/etc/maildrop/maildrop.yaml``. Returns an absolute path;
    a relative one is taken from ``cwd`` (default: the process's working folder)."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    if cli_value is not None:
        if not cli_value:
            raise ConfigError("--config: empty file name; expected --config FILE")
        path = _absolute(base / cli_value)
        if not _exists(path):
            raise ConfigError(_one_line(f"{path}: config file not found"))
        return path
    env_value = environ.get(CONFIG_ENV)
    if env_value:
        path = _absolute(base / env_value)
        if not _exists(path):
            raise ConfigError(_one_line(f"{path}: config file not found (named by ${CONFIG_ENV})"))
        return path
    local = _absolute(base / LOCAL_CONFIG_NAME)
    if _exists(local):
        return local
    if _exists(SYSTEM_CONFIG):
        return SYSTEM_CONFIG
    raise ConfigError(
        f"no config found: tried ./{LOCAL_CONFIG_NAME} and {SYSTEM_CONFIG}; "
        f"pass --config FILE or set {CONFIG_ENV}"
    )


def _exists(path: Path) -> bool:
    """True when ``path`` exists or cannot be looked at (load_config then says why)."""
    try:
        path.stat()
    except FileNotFoundError:
        return False
    except OSError as exc:
        return not isinstance(exc, NotADirectoryError)
    return True


def load_config(path: Path) -> Config:
    """Read and check the config file at ``path``. On any problem: ConfigError whose message
    is one line; ``ConfigProblems`` (with every problem) once the file could be parsed."""
    path = _absolute(Path(path))
    try:
        return _load_config(path)
    except ConfigProblems:
        raise
    except ConfigError as exc:
        raise ConfigError(_one_line(str(exc))) from None


def _load_config(path: Path) -> Config:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise ConfigError(f"{path}: config file not found") from None
    except PermissionError:
        raise _unreadable(path) from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot be read ({exc.strerror or exc}); expected a readable YAML config file"
        ) from None
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(
            f"{path}: is a directory; expected a YAML config file, e.g. {path / LOCAL_CONFIG_NAME}"
        )
    if not stat.S_ISREG(st.st_mode):
        raise ConfigError(f"{path}: is not a regular file; expected a YAML config file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except PermissionError:
        raise _unreadable(path) from None
    except OSError as exc:
        raise ConfigError(
            f"{path}: cannot be read ({exc.strerror or exc}); expected a readable YAML config file"
        ) from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{path}: larger than {format_size(MAX_CONFIG_BYTES)}; expected a small YAML config file"
        )
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}: line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at offset "
            f"{exc.start}); expected a UTF-8 YAML file"
        ) from None
    return parse_config(text, path)


def _unreadable(path: Path) -> ConfigError:
    return ConfigError(
        f"{path}: permission denied; expected a config file readable by the user running "
        "maildrop (check its owner and mode)"
    )


def parse_config(text: str, path: Path) -> Config:
    """Check ``text`` (the YAML of the file at ``path``) and build the Config.

    Relative paths in it resolve against ``path.parent``. Reads no files. Raises
    ConfigProblems with every problem found (ConfigError for a YAML syntax error).
    """
    path = _absolute(Path(path))
    duplicates: list[str] = []
    data = _load_yaml(text, path, duplicates)
    try:
        config = _build(data, path)
    except _Invalid as exc:
        raise ConfigProblems([*duplicates, *(f"{path}: {m}" for m in exc.messages)]) from None
    if duplicates:
        raise ConfigProblems(duplicates)
    return config


# --------------------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2-like implicit types (see the module docstring)."""

    yaml_implicit_resolvers: dict = {}  # own table, filled below (not SafeLoader's)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:null", re.compile(r"^(?:~|null|Null|NULL|)$"), ["~", "n", "N", ""]
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^[-+]?(?:0|[1-9][0-9]*)$"),
    list("-+0123456789"),
)
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"^(?:[-+]?(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
    ),
    list("-+0123456789."),
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:merge", re.compile(r"^(?:<<)$"), ["<"])


def _load_yaml(text: str, path: Path, duplicates: list[str]) -> Any:
    """The document in ``text``; each key said twice is added to ``duplicates`` (PyYAML
    keeps the last one, so the rest can still be checked)."""
    if not isinstance(text, str):
        raise ConfigError(f"{path}: not text; expected a UTF-8 YAML file")
    if text.startswith("\ufeff"):
        text = text[1:]
    loader = None
    try:
        loader = _Loader(text)  # checks for unprintable characters at once
        node = loader.get_single_node()
        if node is None:
            raise ConfigError(
                f"{path}: no settings (the file is empty or only comments); expected a YAML "
                "mapping with node, root, key and peers (see sample_config/)"
            )
        _check_duplicate_keys(node, path, "", duplicates)
        return loader.construct_document(node)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}: " if mark is not None else ""
        problem = ", ".join(p for p in (exc.context, exc.problem) if p) or "cannot be parsed"
        expected = "valid YAML"
        if "\t" in problem or "'\\t'" in problem:
            expected += " (indent with spaces, not tabs)"
        raise ConfigError(
            _one_line(f"{path}: {where}YAML syntax error: {problem}; expected {expected}")
        ) from None
    except yaml.YAMLError as exc:  # ReaderError: a control character, ...
        raise ConfigError(
            _one_line(f"{path}: YAML error: {exc}; expected valid YAML text")
        ) from None
    finally:
        if loader is not None:
            loader.dispose()


def _check_duplicate_keys(
    node: yaml.Node, path: Path, where: str, found: list[str], seen_nodes: set[int] | None = None
) -> None:
    """PyYAML keeps the last of two equal keys silently; a config must say a key once.
    Adds a line to ``found`` for each key said again.

    Each node is visited once, so aliases (even recursive ones) cost nothing extra.
    """
    seen_nodes = set() if seen_nodes is None else seen_nodes
    if id(node) in seen_nodes:
        return
    seen_nodes.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode):
                name = key_node.value
                line = key_node.start_mark.line + 1
                dotted = f"{where}.{name}" if where else name
                if name in seen:
                    found.append(
                        _one_line(
                            f"{path}: {dotted}: duplicate key (lines {seen[name]} and {line}); "
                            "expected each key once"
                        )
                    )
                seen[name] = line
                _check_duplicate_keys(value_node, path, dotted, found, seen_nodes)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_duplicate_keys(item, path, f"{where}[{i}]", found, seen_nodes)


# --------------------------------------------------------------------------- checking


class _Invalid(Exception):
    """One or more problems, each a line ``<dotted.key>: ...; expected ...``; parse_config
    adds the file name. ``message`` is the first."""

    def __init__(self, *messages: str) -> None:
        self.messages = list(messages)
        self.message = messages[0]
        super().__init__(self.message)


def _problem(key: str, what: str, expected: str) -> str:
    return f"{key}: {what}; expected {expected}" if key else f"{what}; expected {expected}"


def _fail(key: str, what: str, expected: str) -> NoReturn:
    raise _Invalid(_problem(key, what, expected))


class _Problems:
    """The problems of one file, in the order they are checked.

    Each part (a key, a field of a peer, a key of a section) is checked on its own, so one
    mistake never hides the next; a check that needs a broken value is skipped, so no
    problem is reported only because of another."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def add(self, key: str, what: str, expected: str) -> None:
        self.messages.append(_problem(key, what, expected))

    def take(self, check: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """``check(*args, **kwargs)``, or None after noting the problems it raised."""
        try:
            return check(*args, **kwargs)
        except _Invalid as exc:
            self.messages.extend(exc.messages)
            return None


_TOP_KEYS = ("node", "root", "key", "peers", "accept_from", "relay_for", "gossip", "transfers",
             "relay", "outbox", "history", "log", "metrics")
_NODE_KEYS = ("id", "display_name", "listen", "advertise")
_PEER_KEYS = ("id", "address", "key", "via", "ssh_user", "ssh_request", "ssh_command", "ssh_host_key")
_OPENSSH_KEYS = ("ssh_user", "ssh_request", "ssh_command", "ssh_host_key")
VIAS = ("maildrop", "openssh")
SSH_REQUESTS = ("subsystem", "command")
_SECTION_KEYS = {
    "gossip": ("interval", "link_down_after"),
    "transfers": ("expire_after", "resend_after", "max_file_size", "min_free_space", "parallel"),
    "relay": ("max_bytes_per_origin", "max_transfers_per_origin"),
    "outbox": ("settle", "rescan_interval", "polling"),
    "history": ("keep",),
    "log": ("level", "json"),
    "metrics": ("listen",),
}
# Where each key belongs, to say "it belongs under gossip:" when it is in the wrong place.
_HOME_OF: dict[str, str] = {}
for _section, _keys in (("node", _NODE_KEYS), *_SECTION_KEYS.items()):
    for _k in _keys:
        _HOME_OF.setdefault(_k, f"under {_section}:")
for _k in ("root", "key", "peers", "accept_from", "relay_for", *_SECTION_KEYS):
    _HOME_OF[_k] = "at the top level"

_NODE_ID_EXPECTED = "a node id like {example} (letters, digits, '-', '_'; 1..64 chars)"
_LISTEN_EXPECTED = (
    "HOST:PORT where this node's SSH server listens, e.g. 127.0.0.1:7001 or 0.0.0.0:7001"
)
_ADVERTISE_EXPECTED = "HOST:PORT that other nodes dial to reach this node, e.g. 192.0.2.10:7001"
_METRICS_EXPECTED = "HOST:PORT to serve Prometheus metrics on, e.g. 127.0.0.1:9464"
_ADDRESS_EXPECTED = "e.g. 127.0.0.1:7002 (the peer's HOST:PORT; IPv6 as [::1]:7002)"
_KEY_EXPECTED = "one OpenSSH line 'ssh-ed25519 AAAA...' (the peer's 'maildrop pubkey' output)"
_DURATION_EXPECTED = "e.g. 30s, 5m, 2h, 7d"
_SIZE_EXPECTED = "e.g. 512MiB, 4GiB, 64GiB or a number of bytes"
_BOOL_EXPECTED = "true or false"


def _got(value: Any) -> str:
    """'got ...' naming a value of the wrong type."""
    if isinstance(value, bool):
        return f"got {str(value).lower()} (a boolean)"
    if isinstance(value, int | float):
        return f"got the number {value}"
    if isinstance(value, str):
        return f"got {_show(value)}"
    if isinstance(value, list):
        return "got a list"
    if isinstance(value, dict):
        return "got a mapping"
    if value is None:
        return "got nothing"
    return f"got a {type(value).__name__}"


def _show(value: Any, limit: int = 60) -> str:
    """A short one-line rendering of a value for a message."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        text = value if len(value) <= limit else value[: limit - 3] + "..."
        return repr(text)
    if isinstance(value, int | float):
        return str(value)
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    if value is None:
        return "nothing"
    return f"a {type(value).__name__}"


def _key_text(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bool):
        return str(key).lower()
    if key is None:
        return "null"
    return str(key)


def _join(where: str, name: str) -> str:
    return f"{where}.{name}" if where else name


def _mapping(
    value: Any, where: str, keys: Sequence[str], *, optional: bool, problems: _Problems
) -> dict:
    """Check that ``value`` is a mapping (None is {} when optional); each key not in
    ``keys`` is added to ``problems`` (the others can still be checked)."""
    if value is None and optional:
        return {}
    if not isinstance(value, dict):
        if value is None:
            _fail(where or "top level", "empty", f"a mapping with keys {', '.join(keys)}")
        _fail(where or "top level", _got(value), f"a mapping with keys {', '.join(keys)}")
    for k in value:
        if k not in keys:
            name = _key_text(k)
            hint = ""
            close = difflib.get_close_matches(name, keys, n=1, cutoff=0.6)
            if close:
                hint = f" (did you mean '{close[0]}'?)"
            elif name in _HOME_OF:
                hint = f" ('{name}' belongs {_HOME_OF[name]})"
            problems.add(_join(where, name), f"unknown key{hint}", f"one of {', '.join(keys)}")
    return value


def _required(m: dict, where: str, name: str, expected: str) -> Any:
    key = _join(where, name)
    if name not in m:
        _fail(key, "missing", expected)
    if m[name] is None:
        _fail(key, "empty", expected)
    return m[name]


def _node_id(value: Any, key: str, example: str) -> str:
    expected = _NODE_ID_EXPECTED.format(example=example)
    if isinstance(value, int | float) and not isinstance(value, bool):
        _fail(key, _got(value), f'{expected}, in quotes when all digits: "{value}"')
    if not isinstance(value, str):
        _fail(key, _got(value), expected)
    if not is_node_id(value):
        _fail(key, f"{_show(value)} is not a node id", expected)
    return value


def _hostport(
    value: Any, key: str, expected: str, *, allow_port_zero: bool = False
) -> tuple[str, int]:
    try:
        return parse_hostport(value, allow_port_zero=allow_port_zero)
    except ValueError as exc:
        _fail(key, str(exc), expected)


def _text(value: Any, key: str, expected: str, limit: int) -> str:
    if not isinstance(value, str):
        _fail(
            key,
            _got(value),
            f"{expected} (put it in quotes)" if isinstance(value, int | float) else expected,
        )
    if not value.strip():
        _fail(key, "empty", expected)
    if len(value) > limit:
        _fail(key, f"{len(value)} characters long", f"{expected}, at most {limit} characters")
    if not value.isprintable():
        _fail(key, f"{_show(value)} contains control characters", expected)
    return value


def _path(value: Any, key: str, expected: str, base: Path) -> Path:
    if not isinstance(value, str):
        _fail(key, _got(value), expected)
    if not value.strip():
        _fail(key, "empty", expected)
    if "\0" in value or not value.isprintable():
        _fail(key, f"{_show(value)} contains control characters", expected)
    return _absolute(base / os.path.expanduser(value))


def _public_key(value: Any, key: str) -> str:
    if not isinstance(value, str):
        _fail(key, _got(value), _KEY_EXPECTED)
    if "PRIVATE KEY" in value:
        # Never echo it back: it is a secret pasted in the wrong place.
        _fail(key, "this is a PRIVATE key", f"the peer's PUBLIC key: {_KEY_EXPECTED}")
    if len(value.split()) < 2:
        _fail(key, f"{_show(value)} is not a public key line", _KEY_EXPECTED)
    try:
        return normalize_public_line(value)
    except ValueError as exc:
        reason = str(exc)
        if not reason.startswith("public key does not parse"):
            reason = f"public key does not parse ({reason})"
        _fail(key, reason, _KEY_EXPECTED)


def _quantity(m: dict, where: str, name: str, default: Any, parse: Any, expected: str,
              kind: str, allow_zero: bool) -> Any:
    """An optional duration or size under ``where.name``: parsed, and above zero unless
    ``allow_zero``; ``default`` when absent."""
    key = _join(where, name)
    if name not in m or m[name] is None:
        return default
    try:
        value = parse(m[name])
    except ValueError as exc:
        _fail(key, str(exc), expected)
    if value == 0 and not allow_zero:
        _fail(key, f"{_show(m[name])} is zero", f"a {kind} above zero, {expected}")
    return value


def _duration(m: dict, where: str, name: str, default: float, *, allow_zero: bool = False) -> float:
    return _quantity(m, where, name, default, parse_duration, _DURATION_EXPECTED, "duration", allow_zero)


def _size(m: dict, where: str, name: str, default: int, *, allow_zero: bool = False) -> int:
    return _quantity(m, where, name, default, parse_size, _SIZE_EXPECTED, "size", allow_zero)


def _bool(m: dict, where: str, name: str, default: bool) -> bool:
    if name not in m or m[name] is None:
        return default
    value = m[name]
    if not isinstance(value, bool):
        _fail(_join(where, name), _got(value), _BOOL_EXPECTED)
    return value


def _build(data: Any, path: Path) -> Config:
    """The Config of ``data``; _Invalid with every problem found (see _Problems)."""
    # Relative paths are relative to the folder the file really lives in, so a symlink such
    # as /etc/maildrop/maildrop.yaml -> /var/lib/maildrop/maildrop.yaml keeps working.
    base = Path(os.path.realpath(path)).parent
    problems = _Problems()
    top = _mapping(data, "", _TOP_KEYS, optional=False, problems=problems)
    node_id, display_name, listen, advertise = _node(top, problems)

    # paths
    root_expected = "the folder for outbox/, inbox/, failed/ and state/, e.g. ./NodeA or /var/lib/maildrop/NodeA"
    root = problems.take(_top_path, top, "root", root_expected, base)
    key_expected = "the path of this node's OpenSSH ed25519 private key, e.g. ./NodeA/node_ed25519"
    key_path = problems.take(_top_path, top, "key", key_expected, base)

    peers = _peers(top, node_id, listen, advertise, problems)

    # optional sections
    sections = {
        name: problems.take(_mapping, top.get(name), name, keys, optional=True, problems=problems)
        or {}
        for name, keys in _SECTION_KEYS.items()
    }
    gossip = sections["gossip"]
    interval = problems.take(_duration, gossip, "gossip", "interval", DEFAULT_GOSSIP_INTERVAL)
    link_down_after = problems.take(
        _duration, gossip, "gossip", "link_down_after",
        max(DEFAULT_LINK_DOWN_AFTER, 3 * (interval or DEFAULT_GOSSIP_INTERVAL)),
    )
    if interval is not None and link_down_after is not None and link_down_after < interval:
        problems.add(
            "gossip.link_down_after",
            f"{format_duration(link_down_after)} is shorter than gossip.interval "
            f"({format_duration(interval)})",
            "at least one gossip interval (three or more avoids flapping)",
        )

    transfers = sections["transfers"]
    expire_after = problems.take(_duration, transfers, "transfers", "expire_after", Config.expire_after)
    resend_after = problems.take(_duration, transfers, "transfers", "resend_after", Config.resend_after)
    max_file_size = problems.take(_size, transfers, "transfers", "max_file_size", Config.max_file_size)
    min_free_space = problems.take(
        _size, transfers, "transfers", "min_free_space", Config.min_free_space, allow_zero=True
    )
    parallel = problems.take(_parallel, transfers)

    accept_from = problems.take(_origins, top, "accept_from", "that may deliver into this node's inbox")
    relay_for = problems.take(_origins, top, "relay_for", "whose files this node carries for others")
    relay = sections["relay"]
    max_bytes = problems.take(_limit, relay, "max_bytes_per_origin", _size_or_unlimited,
                              "a size or unlimited, e.g. 10GiB, 0 or unlimited")
    max_transfers = problems.take(_limit, relay, "max_transfers_per_origin", _count_or_unlimited,
                                  "a whole number or unlimited, e.g. 1000, 0 or unlimited")

    outbox = sections["outbox"]
    settle = problems.take(_duration, outbox, "outbox", "settle", Config.settle, allow_zero=True)
    rescan_interval = problems.take(
        _duration, outbox, "outbox", "rescan_interval", Config.rescan_interval
    )
    polling = problems.take(_bool, outbox, "outbox", "polling", Config.polling)
    history_keep = problems.take(_duration, sections["history"], "history", "keep", Config.history_keep)

    log = sections["log"]
    log_level = problems.take(_log_level, log)
    log_json = problems.take(_bool, log, "log", "json", Config.log_json)

    metrics_listen = None
    if sections["metrics"].get("listen") is not None:
        metrics_listen = problems.take(
            _hostport, sections["metrics"]["listen"], "metrics.listen", _METRICS_EXPECTED
        )
        if (metrics_listen is not None and listen is not None
                and _address_id(metrics_listen) == _address_id(listen)):
            problems.add("metrics.listen", f"{format_hostport(listen)} is node.listen too",
                         "another port than the SSH server's")

    if problems.messages:
        raise _Invalid(*problems.messages)
    return Config(
        path=path,
        node_id=node_id,
        display_name=display_name,
        listen=listen,
        advertise=advertise,
        root=root,
        key_path=key_path,
        peers=tuple(peers),
        gossip_interval=interval,
        link_down_after=link_down_after,
        expire_after=expire_after,
        resend_after=resend_after,
        max_file_size=max_file_size,
        min_free_space=min_free_space,
        parallel=parallel,
        settle=settle,
        rescan_interval=rescan_interval,
        polling=polling,
        history_keep=history_keep,
        log_level=log_level,
        log_json=log_json,
        metrics_listen=metrics_listen,
        admission=Rules(accept_from=accept_from, relay_for=relay_for,
                        max_bytes_per_origin=max_bytes, max_transfers_per_origin=max_transfers),
    )


def _node(top: dict, problems: _Problems) -> tuple[Any, Any, Any, Any]:
    """``node:``'s id, display_name, listen and advertise; None for each one that is broken."""
    node_expected = "a mapping with keys id, listen (and optional display_name, advertise)"
    if "node" not in top:
        problems.add("node", "missing", node_expected)
        return None, None, None, None
    if top["node"] is None:
        problems.add("node", "empty", node_expected)
        return None, None, None, None
    node = problems.take(_mapping, top["node"], "node", _NODE_KEYS, optional=False, problems=problems)
    if node is None:
        return None, None, None, None
    node_id = problems.take(_required_node_id, node, "node", "NodeA")
    display_name = node_id
    if node.get("display_name") is not None:
        display_name = problems.take(
            _text, node["display_name"], "node.display_name", "a name for people, e.g. Node A",
            MAX_DISPLAY_NAME,
        )
    listen = problems.take(
        _required_hostport, node, "node", "listen", _LISTEN_EXPECTED,
        _LISTEN_EXPECTED + " (port 0 picks a free port)", allow_port_zero=True,
    )
    advertise = listen
    if node.get("advertise") is not None:
        advertise = problems.take(_hostport, node["advertise"], "node.advertise", _ADVERTISE_EXPECTED)
    return node_id, display_name, listen, advertise


def _peers(top: dict, node_id: str | None, listen: tuple[str, int] | None,
           advertise: tuple[str, int] | None, problems: _Problems) -> list[Peer]:
    """The valid entries of ``peers:``; each problem of each entry goes to ``problems``."""
    peers_value = top.get("peers")
    if peers_value is None:
        return []
    if not isinstance(peers_value, list):
        problems.add(
            "peers", _got(peers_value),
            "a list of peers, each with id, key and an optional address (or [] for none)",
        )
        return []
    own_addresses = {_address_id(a): name for name, a in
                     (("node.listen", listen), ("node.advertise", advertise)) if a is not None}
    names: dict[int, str] = {}  # index -> peer id, of the entries whose id is valid
    by_id: dict[str, int] = {}
    by_key: dict[str, int] = {}
    by_address: dict[tuple[str, int], int] = {}
    peers: list[Peer] = []
    for i, item in enumerate(peers_value):
        where = f"peers[{i}]"
        entry = problems.take(_mapping, item, where, _PEER_KEYS, optional=False, problems=problems)
        if entry is None:
            continue
        pid = problems.take(_required_node_id, entry, where, "NodeB")
        if pid is not None:
            if pid == node_id:
                problems.add(f"{where}.id", f"{pid} is this node itself", "only other nodes as peers")
            elif pid in by_id:
                problems.add(f"{where}.id", f"duplicate peer {pid} (also peers[{by_id[pid]}])",
                             "each peer once")
            else:
                by_id[pid] = i
            names[i] = pid
        address = None  # optional: a peer without one dials us
        address_ok = entry.get("address") is None  # none is fine; one given must parse
        if not address_ok:
            address = problems.take(_hostport, entry["address"], f"{where}.address", _ADDRESS_EXPECTED)
            address_ok = address is not None
        if address is not None:
            aid = _address_id(address)
            if aid in own_addresses:
                problems.add(
                    f"{where}.address",
                    f"{format_hostport(address)} is this node's own address ({own_addresses[aid]})",
                    f"the address of {pid or 'the peer'}",
                )
            elif aid in by_address:
                j = by_address[aid]
                problems.add(
                    f"{where}.address",
                    f"{format_hostport(address)} is also the address of peers[{j}] "
                    f"({names.get(j, '?')})",
                    "a different address for each peer",
                )
            else:
                by_address[aid] = i
        key = problems.take(_required_public_key, entry, where)
        if key is not None:
            if key in by_key:
                j = by_key[key]
                problems.add(
                    f"{where}.key",
                    f"same key as peers[{j}] ({names.get(j, '?')})",
                    "a different key for each peer (a key identifies its peer at login)",
                )
            else:
                by_key[key] = i
        reach = problems.take(_reach, entry, where)
        if reach is not None and reach.get("via") == "openssh" and address_ok and address is None:
            problems.add(f"{where}.address", "missing: a peer reached through OpenSSH is dialed",
                         "the host:port of its sshd")
            reach = None
        if pid is not None and address_ok and key is not None and reach is not None:
            peers.append(Peer(pid, address, key, **reach))
    return peers


_USER_EXPECTED = "a login name on the peer's machine, e.g. maildrop"
_COMMAND_EXPECTED = "the ssh client and its extra options, e.g. 'ssh' or 'ssh -J bastion.example.net'"


def _reach(entry: dict, where: str) -> dict[str, Any]:
    """How a peer entry is reached: ``via`` and, with ``via: openssh``, the ``ssh_*`` keys."""
    via = entry.get("via")
    if via is None:
        via = "maildrop"
    elif via not in VIAS:
        _fail(f"{where}.via", _show(via) if isinstance(via, str) else _got(via),
              "maildrop (the peer's own agent) or openssh (an sshd that runs 'maildrop serve')")
    given = [k for k in _OPENSSH_KEYS if entry.get(k) is not None]
    if via != "openssh":
        if given:
            _fail(f"{where}.{given[0]}", "set without via: openssh",
                  "via: openssh with it, or no ssh_* keys")
        return {}
    out: dict[str, Any] = {"via": via}
    user = entry.get("ssh_user")
    if user is not None:
        text = _text(user, f"{where}.ssh_user", _USER_EXPECTED, 64)
        if text.startswith("-") or any(c.isspace() or c in "@:" for c in text):
            _fail(f"{where}.ssh_user", f"{_show(text)} is not a login name", _USER_EXPECTED)
        out["ssh_user"] = text
    request = entry.get("ssh_request")
    if request is not None:
        if request not in SSH_REQUESTS:
            _fail(f"{where}.ssh_request", _show(request) if isinstance(request, str) else _got(request),
                  "subsystem (sshd_config: Subsystem maildrop ...) or command (authorized_keys: "
                  "command=\"maildrop serve --peer ...\")")
        out["ssh_request"] = request
    command = entry.get("ssh_command")
    if command is not None:
        text = _text(command, f"{where}.ssh_command", _COMMAND_EXPECTED, 1024)
        try:
            argv = tuple(shlex.split(text))
        except ValueError as exc:
            _fail(f"{where}.ssh_command", f"{_show(text)} does not parse ({exc})", _COMMAND_EXPECTED)
        if not argv or argv[0].startswith("-"):
            _fail(f"{where}.ssh_command", f"{_show(text)} names no program", _COMMAND_EXPECTED)
        out["ssh_command"] = argv
    if entry.get("ssh_host_key") is not None:
        out["ssh_host_key"] = _public_key(entry["ssh_host_key"], f"{where}.ssh_host_key")
    return out


def _required_node_id(m: dict, where: str, example: str) -> str:
    expected = _NODE_ID_EXPECTED.format(example=example)
    return _node_id(_required(m, where, "id", expected), _join(where, "id"), example)


def _required_hostport(m: dict, where: str, name: str, missing_expected: str, expected: str,
                       *, allow_port_zero: bool = False) -> tuple[str, int]:
    return _hostport(_required(m, where, name, missing_expected), _join(where, name), expected,
                     allow_port_zero=allow_port_zero)


def _required_public_key(m: dict, where: str) -> str:
    return _public_key(_required(m, where, "key", _KEY_EXPECTED), f"{where}.key")


def _top_path(top: dict, name: str, expected: str, base: Path) -> Path:
    return _path(_required(top, "", name, expected), name, expected, base)


def _parallel(transfers: dict) -> int:
    if transfers.get("parallel") is None:
        return Config.parallel
    parallel = transfers["parallel"]
    expected = f"a whole number from 1 to {MAX_PARALLEL}"
    if not isinstance(parallel, int) or isinstance(parallel, bool):
        _fail("transfers.parallel", _got(parallel), expected)
    if not 1 <= parallel <= MAX_PARALLEL:
        _fail("transfers.parallel", f"{parallel} is out of range", expected)
    return parallel


def _origins(top: dict, name: str, what: str) -> frozenset[str] | None:
    """``accept_from`` / ``relay_for``: a list of node ids (None when the key is absent:
    everyone; ``[]``: no one). Ids nobody knows yet are fine: a node may be learned later."""
    expected = (f"a list of the node ids {what}, e.g. [NodeA, NodeB] "
                "([] for none; leave the key out for every node)")
    if name not in top:
        return None
    value = top[name]
    if value is None:
        _fail(name, "empty", expected)
    if not isinstance(value, list):
        _fail(name, _got(value), expected)
    problems = _Problems()
    ids = [problems.take(_node_id, item, f"{name}[{i}]", "NodeA") for i, item in enumerate(value)]
    if problems.messages:
        raise _Invalid(*problems.messages)
    return frozenset(ids)


def _limit(relay: dict, name: str, parse: Callable[[Any], int | None], expected: str) -> int | None:
    """One of ``relay.max_*_per_origin``: None (unlimited, the default) or a limit >= 0."""
    if relay.get(name) is None:
        return None
    try:
        return parse(relay[name])
    except ValueError as exc:
        _fail(f"relay.{name}", str(exc), expected)


def _size_or_unlimited(value: Any) -> int | None:
    return None if value == "unlimited" else parse_size(value)


def _count_or_unlimited(value: Any) -> int | None:
    if value == "unlimited":
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{_show(value)} is not a whole number")
    if value < 0:
        raise ValueError(f"{value} is negative")
    return value


def _log_level(log: dict) -> str:
    if log.get("level") is None:
        return Config.log_level
    level = log["level"]
    expected = f"one of {', '.join(LOG_LEVELS)}"
    if not isinstance(level, str):
        _fail("log.level", _got(level), expected)
    if level.lower() not in LOG_LEVELS:
        close = difflib.get_close_matches(level.lower(), LOG_LEVELS, n=1, cutoff=0.6)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        _fail("log.level", f"{_show(level)} is not a log level{hint}", expected)
    return level.lower()


def _address_id(address: tuple[str, int]) -> tuple[str, int]:
    return (address[0].lower().rstrip("."), address[1])


def _absolute(path: Path) -> Path:
    return Path(os.path.abspath(path))


def _one_line(message: str) -> str:
    return " ".join(message.splitlines())


# --------------------------------------------------------------------------- values

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 7 * 86400.0}
_DURATION_PART = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*(ms|s|m|h|d|w)")
_NUMBER = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?|\.[0-9]+)\s*$")


def parse_duration(value: Any) -> float:
    """Seconds from a number (seconds) or text like ``30s``, ``5m``, ``1.5h``, ``7d``, ``1h30m``.

    Units: ms, s, m, h, d, w. Raises ValueError saying what is wrong.
    """
    if isinstance(value, int | float) and not isinstance(value, bool):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        match = _NUMBER.match(text)
        if match:
            seconds = float(match.group(1))
        else:
            if text.startswith("-"):
                raise ValueError(f"{_show(value)} is negative")
            seconds, pos = 0.0, 0
            while pos < len(text):
                part = _DURATION_PART.match(text, pos)
                if not part:
                    raise ValueError(f"{_show(value)} is not a duration")
                seconds += float(part.group(1)) * _DURATION_UNITS[part.group(2)]
                pos = part.end()
            if not text:
                raise ValueError(f"{_show(value)} is not a duration")
    else:
        raise ValueError(f"{_show(value)} is not a duration")
    if math.isnan(seconds) or math.isinf(seconds):
        raise ValueError(f"{_show(value)} is not a finite duration")
    if seconds < 0:
        raise ValueError(f"{_show(value)} is negative")
    return seconds


def format_duration(seconds: float) -> str:
    """The shortest exact text ``parse_duration`` reads back: 604800 -> '7d', 90 -> '90s'."""
    for unit, size in (("d", 86400.0), ("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and float(seconds / size).is_integer():
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


_SIZE_UNITS = {
    "": 1, "b": 1,
    "k": 2**10, "kib": 2**10, "kb": 10**3,
    "m": 2**20, "mib": 2**20, "mb": 10**6,
    "g": 2**30, "gib": 2**30, "gb": 10**9,
    "t": 2**40, "tib": 2**40, "tb": 10**12,
}  # fmt: skip
_SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$")


def parse_size(value: Any) -> int:
    """Bytes from an int or text: ``512``, ``10KiB``/``10K`` (binary), ``10KB`` (decimal),
    likewise M, G, T. A fraction is allowed with a unit (``1.5GiB``) and rounded down."""
    if isinstance(value, bool) or value is None:
        raise ValueError(f"{_show(value)} is not a size")
    if isinstance(value, int):
        if value < 0:
            raise ValueError(f"{value} is negative")
        return value
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value} is not a whole number of bytes")
        if value < 0:
            raise ValueError(f"{value} is negative")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{_show(value)} is not a size")
    if value.strip().startswith("-"):
        raise ValueError(f"{_show(value)} is negative")
    match = _SIZE.match(value.lower())
    if not match or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"{_show(value)} is not a size")
    number, unit = match.group(1), match.group(2)
    if "." in number and not unit:
        raise ValueError(f"{_show(value)} is not a whole number of bytes")
    if "." in number:
        whole, frac = number.split(".")
        # Exact arithmetic: 1.1TiB must not pick up float rounding.
        return (int(whole + frac) * _SIZE_UNITS[unit]) // 10 ** len(frac)
    return int(number) * _SIZE_UNITS[unit]


def format_size(size: int) -> str:
    """The shortest exact binary-unit text: 68719476736 -> '64GiB', 1000 -> '1000'."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= factor and size % factor == 0:
            return f"{size // factor}{unit}"
    return str(size)


_HOSTNAME = re.compile(
    r"^(?=.{1,253}\.?$)[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
    r"(?:\.[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


def parse_hostport(value: Any, *, allow_port_zero: bool = False) -> tuple[str, int]:
    """``(host, port)`` from ``HOST:PORT``: ``127.0.0.1:7001``, ``[::1]:7001``, ``host.example:22``.

    The port is 1..65535; 0 ("any free port") only with ``allow_port_zero`` (for ``listen``).
    IPv6 hosts come back without brackets. Raises ValueError saying what is wrong.
    """
    if isinstance(value, int) and not isinstance(value, bool):
        raise ValueError(f"{value} is only a port, not HOST:PORT")
    if not isinstance(value, str):
        raise ValueError(f"{_show(value)} is not HOST:PORT")
    if value.startswith("["):
        end = value.find("]")
        if end < 0 or value[end + 1 : end + 2] != ":":
            raise ValueError(f"{_show(value)} is not HOST:PORT")
        host, port_text = value[1:end], value[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{_show(value)} has no valid IPv6 address in brackets") from None
    else:
        host, sep, port_text = value.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{_show(value)} is not HOST:PORT")
        if ":" in host:
            raise ValueError(
                f"{_show(value)} has an IPv6 address without brackets, write [{host}]:{port_text}"
            )
        if not _HOSTNAME.match(host):
            raise ValueError(f"{_show(value)} has no valid host name before the ':'")
        if re.fullmatch(r"[0-9.]+", host):
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{_show(value)} has no valid IPv4 address") from None
    if not re.fullmatch(r"[0-9]{1,5}", port_text):
        raise ValueError(f"{_show(value)} has no port number after the ':'")
    port = int(port_text)
    low = 0 if allow_port_zero else 1
    if not low <= port <= 65535:
        raise ValueError(f"{_show(value)} has port {port}, outside {low}..65535")
    return host, port


def format_hostport(address: tuple[str, int]) -> str:
    """``HOST:PORT`` text of an address, with brackets around an IPv6 host."""
    host, port = address
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# --------------------------------------------------------------------------- rendering


def render_config(
    node_id: str,
    listen: str,
    *,
    display_name: str | None = None,
    advertise: str | None = None,
    root: str = ".",
    key: str = "node_ed25519",
    peers: Sequence[Peer] = (),
) -> str:
    """The commented YAML that ``maildrop init`` writes; ``parse_config`` reads it back to
    the same values. Optional sections are written commented out, showing the defaults;
    so is ``advertise`` when it is None (it defaults to ``listen``).
    Raises ConfigError ("<dotted.key>: ...; expected ...") when a value is not valid."""
    lines = [
        f"# maildrop configuration of node {_comment_safe(node_id)}, written by 'maildrop init'.",
        "# Relative paths are relative to the folder of this file. Unknown keys are errors.",
        "# Durations: a number of seconds or 30s, 5m, 2h, 7d. Sizes: bytes or 512MiB, 4GiB.",
        "",
        "node:",
        _entry("  id", node_id, "this node's id: letters, digits, '-', '_'; 1..64 chars"),
    ]
    if display_name is None:
        lines.append(
            _entry("  # display_name", node_id, "optional: a name for people (default: the id)")
        )
    else:
        lines.append(
            _entry("  display_name", display_name, "optional: a name for people (default: the id)")
        )
    lines += [
        _entry("  listen", listen, "where this node's SSH server listens (HOST:PORT)"),
        _entry(
            "  # advertise" if advertise is None else "  advertise",
            listen if advertise is None else advertise,
            "optional: the HOST:PORT other nodes dial (default: listen)",
        ),
        "",
        _entry("root", root, "outbox/, inbox/, failed/ and state/ live here"),
        _entry("key", key, "this node's OpenSSH ed25519 private key (never share it)"),
        "",
        "# The nodes this node connects to. Each peer must list this node back, with the key",
        "# that 'maildrop pubkey' prints here. A peer's key both lets it log in and pins it.",
    ]
    if peers:
        lines.append("peers:")
        for p in peers:
            address = format_hostport(p.address) if isinstance(p.address, tuple) else p.address
            lines += [
                _entry("  - id", p.id, ""),
                *([_entry("    address", address, f"where {_comment_safe(p.id)} listens")]
                  if address is not None else []),
                _entry("    key", p.key, ""),
            ]
    else:
        lines += [
            "peers: []",
            "# peers:",
            "#   - id: NodeB",
            "#     address: 127.0.0.1:7002",
            "#     key: ssh-ed25519 AAAA...   # NodeB's 'maildrop pubkey' output",
        ]
    lines += [
        "",
        "# Optional sections; the values shown are the defaults.",
        *_OPTIONAL_SECTIONS,
        "",
    ]
    text = "\n".join(lines)
    try:
        _build(yaml.load(text, Loader=_Loader), Path(os.path.abspath(LOCAL_CONFIG_NAME)))
    except _Invalid as exc:
        raise ConfigError(_one_line(exc.message)) from None
    except yaml.YAMLError as exc:  # pragma: no cover - _scalar quotes everything unsafe
        raise ConfigError(_one_line(f"cannot render the config: {exc}")) from None
    return text


_COMMENT_COLUMN = 30


def _entry(key: str, value: str, comment: str, *, raw: bool = False) -> str:
    """One ``key: value  # comment`` line; ``raw`` writes ``value`` as YAML text unquoted."""
    text = f"{key}: {value if raw else _scalar(value)}"
    if comment:
        text = f"{text:<{_COMMENT_COLUMN - 2}}  # {comment}"
    return text


def _scalar(value: Any) -> str:
    """``value`` as a YAML scalar that reads back as the same string: plain when safe."""
    text = str(value)
    if text and text.isprintable() and text == text.strip():
        try:
            if yaml.load(f"k: {text}\n", Loader=_Loader) == {"k": text}:
                return text
        except yaml.YAMLError:
            pass
    # Printable non-ASCII stays readable; anything else is escaped.
    return json.dumps(text, ensure_ascii=not text.isprintable())


def _comment_safe(text: str) -> str:
    return _one_line(str(text))


_OPTIONAL_SECTIONS = [
    "# gossip:",
    _entry(
        "#   interval",
        format_duration(DEFAULT_GOSSIP_INTERVAL),
        "how often to exchange events with each peer",
        raw=True,
    ),
    _entry(
        "#   link_down_after",
        format_duration(DEFAULT_LINK_DOWN_AFTER),
        "unreachable this long -> link.down (default: 15s or 3 intervals)",
        raw=True,
    ),
    "# transfers:",
    _entry(
        "#   expire_after",
        format_duration(Config.expire_after),
        "give up on an undelivered file (it goes to failed/)",
        raw=True,
    ),
    _entry(
        "#   resend_after",
        format_duration(Config.resend_after),
        "resend over another path if no receipt by then",
        raw=True,
    ),
    _entry(
        "#   max_file_size",
        format_size(Config.max_file_size),
        "the largest file a peer may push to this node",
        raw=True,
    ),
    _entry(
        "#   min_free_space",
        format_size(Config.min_free_space),
        "refuse offers that would leave less free disk",
        raw=True,
    ),
    _entry(
        "#   parallel",
        str(Config.parallel),
        f"concurrent transfers per peer (1..{MAX_PARALLEL})",
        raw=True,
    ),
    "# relay:                    # limits for files this node carries for others (never its inbox's)",
    _entry(
        "#   max_bytes_per_origin",
        "unlimited",
        "one origin's bytes held here at once (quota)",
        raw=True,
    ),
    _entry(
        "#   max_transfers_per_origin",
        "unlimited",
        "one origin's files held here at once (quota)",
        raw=True,
    ),
    "# accept_from: [NodeA, NodeB]  # only these origins deliver into inbox/ (default all; []: none)",
    "# relay_for: [NodeA, NodeB]    # only these origins' files are carried on (default all; []: none)",
    "# outbox:",
    _entry(
        "#   settle",
        format_duration(Config.settle),
        "a file written in place must be unchanged this long",
        raw=True,
    ),
    _entry(
        "#   rescan_interval",
        format_duration(Config.rescan_interval),
        "full rescan of outbox/ besides file events",
        raw=True,
    ),
    _entry("#   polling", "false", "true on NFS/CIFS/SSHFS, where inotify sees nothing", raw=True),
    "# history:",
    _entry(
        "#   keep",
        format_duration(Config.history_keep),
        "facts of a finished transfer are kept this long",
        raw=True,
    ),
    "# log:",
    _entry("#   level", Config.log_level, "debug, info, warning or error", raw=True),
    _entry("#   json", "false", "true: one JSON object per log line", raw=True),
]
