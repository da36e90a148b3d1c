"""maildrop.config: parsing, defaults, path resolution, and every error message."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from maildrop import config as config_module
from maildrop.config import (
    Config,
    Peer,
    find_config,
    format_duration,
    format_hostport,
    format_size,
    load_config,
    parse_config,
    parse_duration,
    parse_hostport,
    parse_size,
    render_config,
)
from maildrop.errors import ConfigError
from maildrop.keys import generate_key

CFG = Path("/srv/maildrop/maildrop.yaml")

# Three fixed, valid ed25519 public keys (from maildrop.keys.generate_key; private halves discarded).
KEY_B = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILuNC5fBMssMjFuFcvNByO4pLI2xJcKXod4fsmwc/2vI"
KEY_C = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAILyoJlXbodMheELQAvurlv/No2KY645JwMg8Se8IBv2b"
KEY_D = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIN36KtgpUWqcPCgPlXC6LGWK73P/+2RBlTtfJsL0UPPo"

BASE = """\
node:
  id: NodeA
  listen: 127.0.0.1:7001
root: ./NodeA
key: ./NodeA/node_ed25519
"""


def with_peers(*peers: tuple[str, str, str], head: str = BASE) -> str:
    text = head + "peers:\n"
    for pid, address, key in peers:
        text += f"  - id: {pid}\n    address: {address}\n    key: {key}\n"
    return text


def err(text: str, path: Path = CFG) -> str:
    """The ConfigError message parse_config gives for ``text``; checks it is one line."""
    with pytest.raises(ConfigError) as info:
        parse_config(text, path)
    message = str(info.value)
    assert "\n" not in message and "\r" not in message, message
    assert message.startswith(f"{path}: "), message
    assert "Traceback" not in message
    assert info.value.exit_status == 2
    return message[len(f"{path}: ") :]


# --------------------------------------------------------------------------- good configs


def test_minimal_config_and_defaults() -> None:
    c = parse_config(BASE, CFG)
    assert c.path == CFG
    assert c.node_id == "NodeA"
    assert c.display_name == "NodeA"
    assert c.listen == ("127.0.0.1", 7001)
    assert c.advertise == ("127.0.0.1", 7001)  # defaults to listen
    assert c.root == Path("/srv/maildrop/NodeA")
    assert c.key_path == Path("/srv/maildrop/NodeA/node_ed25519")
    assert c.peers == ()
    assert c.gossip_interval == 5.0
    assert c.link_down_after == 15.0
    assert c.expire_after == 7 * 86400
    assert c.resend_after == 6 * 3600
    assert c.history_keep == 14 * 86400
    assert c.max_file_size == 64 * 2**30
    assert c.min_free_space == 256 * 2**20
    assert c.parallel == 4
    assert c.settle == 1.0
    assert c.rescan_interval == 30.0
    assert c.polling is False
    assert c.log_level == "info"
    assert c.log_json is False


def test_full_config() -> None:
    text = f"""\
node:
  id: NodeA
  display_name: Node A (Paris)
  listen: 0.0.0.0:7001
  advertise: nodea.example.org:7001
root: /var/lib/maildrop/NodeA
key: /etc/maildrop/node_ed25519
peers:
  - id: NodeB
    address: 127.0.0.1:7002
    key: {KEY_B} admin@nodeb
  - id: NodeC
    address: "[::1]:7003"
    key: {KEY_C}
gossip:
  interval: 2s
  link_down_after: 1m
transfers:
  expire_after: 3d
  resend_after: 1.5h
  max_file_size: 10GiB
  min_free_space: 0
  parallel: 8
outbox:
  settle: 500ms
  rescan_interval: 2m
  polling: true
log:
  level: DEBUG
  json: true
"""
    c = parse_config(text, CFG)
    assert c.display_name == "Node A (Paris)"
    assert c.listen == ("0.0.0.0", 7001)
    assert c.advertise == ("nodea.example.org", 7001)
    assert c.root == Path("/var/lib/maildrop/NodeA")
    assert c.key_path == Path("/etc/maildrop/node_ed25519")
    assert c.peers == (
        Peer("NodeB", ("127.0.0.1", 7002), KEY_B),  # comment stripped
        Peer("NodeC", ("::1", 7003), KEY_C),
    )
    assert c.peer("NodeC") == c.peers[1]
    assert c.peer("NodeZ") is None
    assert c.peer_by_key(KEY_B + " some comment") == c.peers[0]
    assert c.peer_by_key(KEY_D) is None
    assert c.peer_by_key("garbage") is None
    assert (c.gossip_interval, c.link_down_after) == (2.0, 60.0)
    assert (c.expire_after, c.resend_after) == (3 * 86400, 5400.0)
    assert (c.max_file_size, c.min_free_space, c.parallel) == (10 * 2**30, 0, 8)
    assert (c.settle, c.rescan_interval, c.polling) == (0.5, 120.0, True)
    assert (c.log_level, c.log_json) == ("debug", True)


def test_convenience_paths() -> None:
    c = parse_config(BASE, CFG)
    root = Path("/srv/maildrop/NodeA")
    assert c.outbox == root / "outbox"
    assert c.inbox == root / "inbox"
    assert c.failed == root / "failed"
    assert c.state_dir == root / "state"
    assert c.spool == root / "state" / "spool"
    assert c.events_path == root / "state" / "events.jsonl"


def test_config_is_frozen() -> None:
    c = parse_config(BASE, CFG)
    with pytest.raises(AttributeError):
        c.node_id = "NodeZ"  # type: ignore[misc]


def test_relative_paths_resolve_against_the_config_folder(tmp_path: Path) -> None:
    text = BASE.replace("root: ./NodeA", "root: ../data/./NodeA").replace(
        "key: ./NodeA/node_ed25519", "key: keys/node_ed25519"
    )
    c = parse_config(text, tmp_path / "etc" / "maildrop.yaml")
    assert c.root == tmp_path / "data" / "NodeA"
    assert c.key_path == tmp_path / "etc" / "keys" / "node_ed25519"


def test_relative_config_path_is_made_absolute(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    c = parse_config(BASE, Path("conf/maildrop.yaml"))
    assert c.path == tmp_path / "conf" / "maildrop.yaml"
    assert c.root == tmp_path / "conf" / "NodeA"


def test_root_dot_is_the_config_folder() -> None:
    c = parse_config(BASE.replace("root: ./NodeA", "root: ."), CFG)
    assert c.root == Path("/srv/maildrop")


def test_home_in_paths_is_expanded(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/mail")
    c = parse_config(BASE.replace("root: ./NodeA", "root: ~/maildrop"), CFG)
    assert c.root == Path("/home/mail/maildrop")


def test_advertise_defaults_to_listen_and_can_differ() -> None:
    assert parse_config(BASE, CFG).advertise == ("127.0.0.1", 7001)
    text = BASE.replace(
        "  listen: 127.0.0.1:7001\n", "  listen: '[::]:7001'\n  advertise: 192.0.2.1:7001\n"
    )
    c = parse_config(text, CFG)
    assert c.listen == ("::", 7001)
    assert c.advertise == ("192.0.2.1", 7001)


def test_listen_port_zero_is_allowed_but_not_elsewhere() -> None:
    c = parse_config(BASE.replace("127.0.0.1:7001", "127.0.0.1:0"), CFG)
    assert c.listen == ("127.0.0.1", 0)
    text = BASE.replace(
        "  listen: 127.0.0.1:7001\n", "  listen: 127.0.0.1:7001\n  advertise: 127.0.0.1:0\n"
    )
    assert err(text).startswith(
        "node.advertise: '127.0.0.1:0' has port 0, outside 1..65535; expected"
    )
    assert "peers[0].address: '127.0.0.1:0' has port 0, outside 1..65535" in err(
        with_peers(("NodeB", "127.0.0.1:0", KEY_B))
    )


@pytest.mark.parametrize("peers", ["", "peers:\n", "peers: []\n", "peers: ~\n"])
def test_peers_may_be_absent_or_empty(peers: str) -> None:
    assert parse_config(BASE + peers, CFG).peers == ()


def test_empty_optional_sections_are_defaults() -> None:
    text = BASE + "gossip:\ntransfers: {}\noutbox:\n  settle:\nlog:\n"
    c = parse_config(text, CFG)
    assert (c.gossip_interval, c.expire_after, c.settle, c.log_level) == (
        5.0,
        7 * 86400,
        1.0,
        "info",
    )


def test_link_down_after_default_follows_a_long_gossip_interval() -> None:
    c = parse_config(BASE + "gossip:\n  interval: 30s\n", CFG)
    assert c.link_down_after == 90.0
    c = parse_config(BASE + "gossip:\n  interval: 1s\n", CFG)
    assert c.link_down_after == 15.0


def test_numbers_are_seconds_and_bytes() -> None:
    text = BASE + "gossip:\n  interval: 2.5\ntransfers:\n  max_file_size: 1048576\n"
    c = parse_config(text, CFG)
    assert c.gossip_interval == 2.5
    assert c.max_file_size == 2**20


def test_yaml_1_1_words_stay_text() -> None:
    # 'NO', 'on', 'yes' are booleans in YAML 1.1 but node ids here; '007' is not octal.
    for word in ("NO", "on", "yes", "off", "007", "1_000"):
        c = parse_config(BASE.replace("id: NodeA", f"id: {word}"), CFG)
        assert c.node_id == word


def test_quoted_numeric_node_id_is_accepted() -> None:
    assert parse_config(BASE.replace("id: NodeA", 'id: "123"'), CFG).node_id == "123"


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "maildrop.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())
    assert load_config(path).node_id == "NodeA"


def test_load_config_reads_the_file(tmp_path: Path) -> None:
    path = tmp_path / "maildrop.yaml"
    path.write_text(with_peers(("NodeB", "127.0.0.1:7002", KEY_B)))
    c = load_config(path)
    assert c.path == path
    assert c.root == tmp_path / "NodeA"
    assert c.peers[0].key == KEY_B


def test_generated_key_with_comment_is_accepted(tmp_path: Path) -> None:
    line = generate_key(tmp_path / "k", comment="NodeB@host").public_line
    pub = (tmp_path / "k.pub").read_text().strip()
    assert pub.endswith(" NodeB@host")
    c = parse_config(with_peers(("NodeB", "127.0.0.1:7002", pub)), CFG)
    assert c.peers[0].key == line


@pytest.mark.skipif(shutil.which("ssh-keygen") is None, reason="ssh-keygen not installed")
def test_ssh_keygen_key_is_accepted_and_normalised(tmp_path: Path) -> None:
    subprocess.run(
        [
            "ssh-keygen",
            "-q",
            "-t",
            "ed25519",
            "-N",
            "",
            "-C",
            "ops@nodeb",
            "-f",
            str(tmp_path / "id"),
        ],
        check=True,
        capture_output=True,
    )
    pub = (tmp_path / "id.pub").read_text().strip()
    kind, blob, comment = pub.split(" ", 2)
    assert comment == "ops@nodeb"
    c = parse_config(with_peers(("NodeB", "127.0.0.1:7002", pub)), CFG)
    assert c.peers[0].key == f"{kind} {blob}"


# --------------------------------------------------------------------------- file-level errors


def test_yaml_syntax_error_names_the_line() -> None:
    text = "node:\n  id: NodeA\n  listen: 127.0.0.1:7001\n  root: a: b\n"
    assert err(text) == (
        "line 4: YAML syntax error: mapping values are not allowed here; expected valid YAML"
    )


def test_tab_indentation_hint() -> None:
    assert err("node:\n\tid: NodeA\n") == (
        "line 2: YAML syntax error: while scanning for the next token, found character '\\t' "
        "that cannot start any token; expected valid YAML (indent with spaces, not tabs)"
    )


def test_unclosed_quote_is_a_syntax_error() -> None:
    assert err('node:\n  id: "NodeA\n') == (
        "line 3: YAML syntax error: while scanning a quoted scalar, found unexpected end of "
        "stream; expected valid YAML"
    )


def test_two_documents_is_a_syntax_error() -> None:
    message = err(BASE + "---\n" + BASE)
    assert message == (
        "line 6: YAML syntax error: expected a single document in the stream, but found another "
        "document; expected valid YAML"
    )


def test_control_character_is_an_error() -> None:
    message = err(BASE + "x: \x00\n")
    assert message.startswith("YAML error: unacceptable character #x0000")
    assert message.endswith("expected valid YAML text")


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_empty_file(text: str) -> None:
    message = err(text)
    if text == "---\n":  # an explicit empty document is null, not "no document"
        assert message == (
            "top level: empty; expected a mapping with keys node, root, key, peers, accept_from, "
            "relay_for, gossip, transfers, relay, outbox, history, log, metrics"
        )
    else:
        assert message == (
            "no settings (the file is empty or only comments); expected a YAML mapping with "
            "node, root, key and peers (see sample_config/)"
        )


@pytest.mark.parametrize(
    ("text", "got"),
    [("- node\n- root\n", "got a list"), ("NodeA\n", "got 'NodeA'"), ("42\n", "got the number 42")],
)
def test_top_level_not_a_mapping(text: str, got: str) -> None:
    assert err(text) == (
        f"top level: {got}; expected a mapping with keys node, root, key, peers, accept_from, "
        "relay_for, gossip, transfers, relay, outbox, history, log, metrics"
    )


def test_duplicate_key_names_both_lines() -> None:
    text = BASE.replace("  listen: 127.0.0.1:7001\n", "  listen: 127.0.0.1:7001\n  id: NodeB\n")
    assert err(text) == "node.id: duplicate key (lines 2 and 4); expected each key once"
    assert err(BASE + "root: /x\n") == "root: duplicate key (lines 4 and 6); expected each key once"


def test_duplicate_key_inside_a_peer() -> None:
    text = with_peers(("NodeB", "127.0.0.1:7002", KEY_B)) + "    id: NodeC\n"
    assert err(text) == "peers[0].id: duplicate key (lines 7 and 10); expected each key once"


def test_file_not_found(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: config file not found"


def test_directory_as_config(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value) == (
        f"{tmp_path}: is a directory; expected a YAML config file, e.g. {tmp_path}/maildrop.yaml"
    )


def test_not_a_regular_file(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(ConfigError) as info:
        load_config(fifo)
    assert str(info.value) == f"{fifo}: is not a regular file; expected a YAML config file"


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "maildrop.yaml"
    path.write_bytes(b"node:\n  id: Node\xe9\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: line 2: not UTF-8 text (byte 0xe9 at offset 16); expected a UTF-8 YAML file"
    )


def test_unreadable_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "maildrop.yaml"
    path.write_text(BASE)
    if os.geteuid() != 0:
        path.chmod(0)
    else:  # root reads anything: simulate the refusal

        def refuse(*args: object, **kwargs: object) -> None:
            raise PermissionError(13, "Permission denied")

        monkeypatch.setattr("builtins.open", refuse)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}: permission denied; expected a config file readable by the user running "
        "maildrop (check its owner and mode)"
    )


def test_huge_file(tmp_path: Path) -> None:
    path = tmp_path / "maildrop.yaml"
    path.write_bytes(b"#" * (2**20 + 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: larger than 1MiB; expected a small YAML config file"


# --------------------------------------------------------------------------- structure errors


def test_unknown_key_at_every_level() -> None:
    # node.id is missing too: the message is the first problem, with a count of the others
    assert err(BASE.replace("  id: NodeA", "  idd: NodeA")) == (
        "node.idd: unknown key (did you mean 'id'?); expected one of id, display_name, listen, "
        "advertise (and 1 more problem: see 'maildrop check')"
    )
    assert err(BASE + "roots: /x\n") == (
        "roots: unknown key (did you mean 'root'?); expected one of node, root, key, peers, "
        "accept_from, relay_for, gossip, transfers, relay, outbox, history, log, metrics"
    )
    assert err(BASE + "gossip:\n  intervall: 5s\n") == (
        "gossip.intervall: unknown key (did you mean 'interval'?); expected one of interval, "
        "link_down_after"
    )
    assert err(BASE + "transfers:\n  colour: blue\n") == (
        "transfers.colour: unknown key; expected one of expire_after, resend_after, "
        "max_file_size, min_free_space, parallel"
    )
    assert err(BASE + "outbox:\n  poling: true\n").startswith(
        "outbox.poling: unknown key (did you mean 'polling'?); expected one of settle, "
    )
    assert err(BASE + "log:\n  lvl: info\n").startswith("log.lvl: unknown key")
    text = with_peers(("NodeB", "127.0.0.1:7002", KEY_B)) + "    adress: x\n"
    assert err(text) == (
        "peers[0].adress: unknown key (did you mean 'address'?); expected one of id, address, key, via, ssh_user, ssh_request, ssh_command, ssh_host_key"
    )


def test_key_in_the_wrong_section_says_where_it_belongs() -> None:
    assert err(BASE + "interval: 5s\n") == (
        "interval: unknown key ('interval' belongs under gossip:); expected one of node, root, "
        "key, peers, accept_from, relay_for, gossip, transfers, relay, outbox, history, log, metrics"
    )
    text = BASE.replace("  id: NodeA\n", "  id: NodeA\n  parallel: 3\n")
    assert err(text).startswith("node.parallel: unknown key ('parallel' belongs under transfers:)")


def test_non_string_key_is_unknown() -> None:
    assert err(BASE + "1: x\n").startswith("1: unknown key; expected one of node, root")
    assert err(BASE + "true: x\n").startswith("true: unknown key; expected one of node, root")


@pytest.mark.parametrize(
    ("section", "value", "got"),
    [("node", "[NodeA]", "got a list"), ("node", "NodeA", "got 'NodeA'"), ("gossip", "5s", "got '5s'"),
     ("transfers", "[1, 2]", "got a list"), ("outbox", "true", "got true (a boolean)"), ("log", "3", "got the number 3")],
)  # fmt: skip
def test_section_of_wrong_type(section: str, value: str, got: str) -> None:
    head = BASE if section != "node" else "root: .\nkey: k\n"
    message = err(f"{head}{section}: {value}\n")
    assert message.startswith(f"{section}: {got}; expected a mapping with keys ")


def test_missing_required_keys() -> None:
    expected_id = "expected a node id like NodeA (letters, digits, '-', '_'; 1..64 chars)"
    assert err("root: .\nkey: k\n") == (
        "node: missing; expected a mapping with keys id, listen (and optional display_name, advertise)"
    )
    assert err("node:\nroot: .\nkey: k\n") == (
        "node: empty; expected a mapping with keys id, listen (and optional display_name, advertise)"
    )
    assert err(BASE.replace("  id: NodeA\n", "")) == f"node.id: missing; {expected_id}"
    assert err(BASE.replace("  id: NodeA\n", "  id:\n")) == f"node.id: empty; {expected_id}"
    assert err(BASE.replace("  listen: 127.0.0.1:7001\n", "")) == (
        "node.listen: missing; expected HOST:PORT where this node's SSH server listens, "
        "e.g. 127.0.0.1:7001 or 0.0.0.0:7001"
    )
    assert err(BASE.replace("root: ./NodeA\n", "")) == (
        "root: missing; expected the folder for outbox/, inbox/, failed/ and state/, "
        "e.g. ./NodeA or /var/lib/maildrop/NodeA"
    )
    assert err(BASE.replace("key: ./NodeA/node_ed25519\n", "")) == (
        "key: missing; expected the path of this node's OpenSSH ed25519 private key, "
        "e.g. ./NodeA/node_ed25519"
    )
    assert err(BASE.replace("root: ./NodeA", "root: ''")).startswith(
        "root: empty; expected the folder"
    )


# --------------------------------------------------------------------------- node errors


def test_bad_node_id() -> None:
    expected = "expected a node id like NodeA (letters, digits, '-', '_'; 1..64 chars)"
    assert (
        err(BASE.replace("id: NodeA", "id: Node A"))
        == f"node.id: 'Node A' is not a node id; {expected}"
    )
    assert err(BASE.replace("id: NodeA", "id: " + "N" * 65)).startswith("node.id: 'NNNN")
    assert err(BASE.replace("id: NodeA", "id: [NodeA]")) == f"node.id: got a list; {expected}"
    assert (
        err(BASE.replace("id: NodeA", "id: true")) == f"node.id: got true (a boolean); {expected}"
    )


def test_numeric_node_id_says_to_quote_it() -> None:
    assert err(BASE.replace("id: NodeA", "id: 123")) == (
        "node.id: got the number 123; expected a node id like NodeA (letters, digits, '-', '_'; "
        '1..64 chars), in quotes when all digits: "123"'
    )


def test_bad_display_name() -> None:
    text = BASE.replace("  id: NodeA\n", "  id: NodeA\n  display_name: 2024\n")
    assert err(text) == (
        "node.display_name: got the number 2024; expected a name for people, e.g. Node A (put it in quotes)"
    )
    text = BASE.replace("  id: NodeA\n", '  id: NodeA\n  display_name: "a\\tb"\n')
    assert err(text) == (
        "node.display_name: 'a\\tb' contains control characters; expected a name for people, e.g. Node A"
    )
    text = BASE.replace("  id: NodeA\n", f"  id: NodeA\n  display_name: {'x' * 129}\n")
    assert err(text) == (
        "node.display_name: 129 characters long; expected a name for people, e.g. Node A, at most 128 characters"
    )


def test_listen_as_bare_port_number() -> None:
    assert err(BASE.replace("listen: 127.0.0.1:7001", "listen: 7001")) == (
        "node.listen: 7001 is only a port, not HOST:PORT; expected HOST:PORT where this node's "
        "SSH server listens, e.g. 127.0.0.1:7001 or 0.0.0.0:7001 (port 0 picks a free port)"
    )


@pytest.mark.parametrize(
    ("value", "what"),
    [
        ("localhost", "'localhost' is not HOST:PORT"),
        ("':7001'", "':7001' is not HOST:PORT"),
        ("'localhost:'", "'localhost:' has no port number after the ':'"),
        ("localhost:http", "'localhost:http' has no port number after the ':'"),
        ("localhost:70000", "'localhost:70000' has port 70000, outside 0..65535"),
        ("'::1:7001'", "'::1:7001' has an IPv6 address without brackets, write [::1]:7001"),
        ("'[nope]:7001'", "'[nope]:7001' has no valid IPv6 address in brackets"),
        ("'[::1]7001'", "'[::1]7001' is not HOST:PORT"),
        ("300.1.1.1:7001", "'300.1.1.1:7001' has no valid IPv4 address"),
        ("'bad host:7001'", "'bad host:7001' has no valid host name before the ':'"),
        ("10:22", "'10:22' has no valid IPv4 address"),  # not sexagesimal 622
    ],
)
def test_bad_listen(value: str, what: str) -> None:
    assert err(BASE.replace("listen: 127.0.0.1:7001", f"listen: {value}")) == (
        f"node.listen: {what}; expected HOST:PORT where this node's SSH server listens, "
        "e.g. 127.0.0.1:7001 or 0.0.0.0:7001 (port 0 picks a free port)"
    )


def test_bad_advertise() -> None:
    text = BASE.replace(
        "  listen: 127.0.0.1:7001\n", "  listen: 0.0.0.0:7001\n  advertise: nodea\n"
    )
    assert err(text) == (
        "node.advertise: 'nodea' is not HOST:PORT; expected HOST:PORT that other nodes dial to "
        "reach this node, e.g. 192.0.2.10:7001"
    )


def test_bad_paths() -> None:
    assert err(BASE.replace("root: ./NodeA", "root: [a, b]")).startswith(
        "root: got a list; expected the folder for outbox/"
    )
    assert err(BASE.replace("key: ./NodeA/node_ed25519", "key: 5")).startswith(
        "key: got the number 5; expected the path of this node's OpenSSH ed25519 private key"
    )
    assert err(BASE.replace("key: ./NodeA/node_ed25519", 'key: "a\\0b"')).startswith(
        "key: 'a\\x00b' contains control characters; expected the path"
    )


# --------------------------------------------------------------------------- peer errors

KEY_EXPECTED = (
    "expected one OpenSSH line 'ssh-ed25519 AAAA...' (the peer's 'maildrop pubkey' output)"
)
ADDRESS_EXPECTED = "expected e.g. 127.0.0.1:7002 (the peer's HOST:PORT; IPv6 as [::1]:7002)"


def test_peers_of_wrong_type() -> None:
    assert err(BASE + "peers: NodeB\n") == (
        "peers: got 'NodeB'; expected a list of peers, each with id, key and an optional address "
        "(or [] for none)"
    )
    assert err(BASE + "peers:\n  NodeB:\n    address: x\n") == (
        "peers: got a mapping; expected a list of peers, each with id, key and an optional address "
        "(or [] for none)"
    )
    assert err(BASE + "peers:\n  - NodeB\n") == (
        "peers[0]: got 'NodeB'; expected a mapping with keys id, address, key, via, ssh_user, ssh_request, ssh_command, ssh_host_key"
    )
    assert (
        err(BASE + "peers:\n  -\n")
        == "peers[0]: empty; expected a mapping with keys id, address, key, via, ssh_user, ssh_request, ssh_command, ssh_host_key"
    )


def test_peer_missing_fields() -> None:
    assert err(BASE + f"peers:\n  - address: 127.0.0.1:7002\n    key: {KEY_B}\n") == (
        "peers[0].id: missing; expected a node id like NodeB (letters, digits, '-', '_'; 1..64 chars)"
    )
    assert err(BASE + "peers:\n  - id: NodeB\n    address: 127.0.0.1:7002\n") == (
        f"peers[0].key: missing; {KEY_EXPECTED}"
    )


def test_a_peer_without_an_address_dials_us() -> None:
    config = parse_config(BASE + f"peers:\n  - id: NodeB\n    key: {KEY_B}\n"
                          f"  - id: NodeC\n    address: null\n    key: {KEY_C}\n", CFG)
    assert [(p.id, p.address) for p in config.peers] == [("NodeB", None), ("NodeC", None)]
    assert err(BASE + f"peers:\n  - id: NodeB\n    address: ''\n    key: {KEY_B}\n") == (
        f"peers[0].address: '' is not HOST:PORT; {ADDRESS_EXPECTED}"
    )


def test_bad_peer_id() -> None:
    assert err(with_peers(("Node/B", "127.0.0.1:7002", KEY_B))) == (
        "peers[0].id: 'Node/B' is not a node id; expected a node id like NodeB "
        "(letters, digits, '-', '_'; 1..64 chars)"
    )


def test_bad_peer_address() -> None:
    text = with_peers(("NodeB", "127.0.0.1:7002", KEY_B), ("NodeC", "localhost", KEY_C))
    assert err(text) == f"peers[1].address: 'localhost' is not HOST:PORT; {ADDRESS_EXPECTED}"
    text = with_peers(("NodeB", "7002", KEY_B))
    assert err(text) == f"peers[0].address: 7002 is only a port, not HOST:PORT; {ADDRESS_EXPECTED}"


def test_peer_key_does_not_parse() -> None:
    message = err(with_peers(("NodeB", "127.0.0.1:7002", "ssh-ed25519 AAAAnotbase64")))
    assert message.startswith("peers[0].key: public key does not parse (")
    assert message.endswith(f"); {KEY_EXPECTED}")


def test_peer_key_of_another_type() -> None:
    rsa = "ssh-rsa AAAAB3NzaC1yc2EAAAADAQABAAABAQC7 user@host"
    assert err(with_peers(("NodeB", "127.0.0.1:7002", rsa))) == (
        "peers[0].key: public key does not parse (key type 'ssh-rsa' is not supported, use "
        f"ssh-ed25519); {KEY_EXPECTED}"
    )


def test_peer_key_that_is_one_word() -> None:
    blob = KEY_B.split()[1]
    assert err(with_peers(("NodeB", "127.0.0.1:7002", blob))) == (
        f"peers[0].key: '{blob[:57]}...' is not a public key line; {KEY_EXPECTED}"
    )


def test_peer_key_of_wrong_type() -> None:
    assert (
        err(with_peers(("NodeB", "127.0.0.1:7002", "[a, b]")))
        == f"peers[0].key: got a list; {KEY_EXPECTED}"
    )


def test_private_key_in_peers_is_refused_and_not_echoed() -> None:
    secret = "b3BlbnNzaC1rZXktdjEAAAAABG5vbmUAAAAEbm9uZQAAAAAAAAABAAAAMwAAAAtzc2gtZW"
    text = BASE + (
        "peers:\n  - id: NodeB\n    address: 127.0.0.1:7002\n    key: |\n"
        f"      -----BEGIN OPENSSH PRIVATE KEY-----\n      {secret}\n"
        "      -----END OPENSSH PRIVATE KEY-----\n"
    )
    message = err(text)
    assert (
        message
        == f"peers[0].key: this is a PRIVATE key; expected the peer's PUBLIC key: {KEY_EXPECTED[9:]}"
    )
    assert secret not in message


def test_duplicate_peer_id() -> None:
    text = with_peers(
        ("NodeB", "127.0.0.1:7002", KEY_B),
        ("NodeC", "127.0.0.1:7003", KEY_C),
        ("NodeB", "127.0.0.1:7004", KEY_D),
    )
    assert err(text) == "peers[2].id: duplicate peer NodeB (also peers[0]); expected each peer once"


def test_peer_is_this_node() -> None:
    assert err(with_peers(("NodeA", "127.0.0.1:7002", KEY_B))) == (
        "peers[0].id: NodeA is this node itself; expected only other nodes as peers"
    )


def test_duplicate_peer_key() -> None:
    text = with_peers(
        ("NodeB", "127.0.0.1:7002", KEY_B), ("NodeC", "127.0.0.1:7003", KEY_B + " copy")
    )
    assert err(text) == (
        "peers[1].key: same key as peers[0] (NodeB); expected a different key for each peer "
        "(a key identifies its peer at login)"
    )


def test_duplicate_peer_address() -> None:
    text = with_peers(("NodeB", "host.example:7002", KEY_B), ("NodeC", "HOST.example:7002", KEY_C))
    assert err(text) == (
        "peers[1].address: HOST.example:7002 is also the address of peers[0] (NodeB); "
        "expected a different address for each peer"
    )


def test_peer_address_is_this_nodes_own() -> None:
    assert err(with_peers(("NodeB", "127.0.0.1:7001", KEY_B))) == (
        "peers[0].address: 127.0.0.1:7001 is this node's own address (node.advertise); "
        "expected the address of NodeB"
    )


# --------------------------------------------------------------------------- setting errors


def test_history_keep() -> None:
    assert parse_config(BASE + "history:\n  keep: 3d\n", CFG).history_keep == 3 * 86400
    assert err(BASE + "history:\n  keep: forever\n") == (
        "history.keep: 'forever' is not a duration; expected e.g. 30s, 5m, 2h, 7d"
    )


def test_bad_durations() -> None:
    assert err(BASE + "transfers:\n  expire_after: soon\n") == (
        "transfers.expire_after: 'soon' is not a duration; expected e.g. 30s, 5m, 2h, 7d"
    )
    assert err(BASE + "gossip:\n  interval: -5s\n") == (
        "gossip.interval: '-5s' is negative; expected e.g. 30s, 5m, 2h, 7d"
    )
    assert err(BASE + "gossip:\n  interval: 0\n") == (
        "gossip.interval: 0 is zero; expected a duration above zero, e.g. 30s, 5m, 2h, 7d"
    )
    assert err(BASE + "transfers:\n  resend_after: true\n") == (
        "transfers.resend_after: true is not a duration; expected e.g. 30s, 5m, 2h, 7d"
    )
    assert err(BASE + "outbox:\n  rescan_interval: .inf\n") == (
        "outbox.rescan_interval: inf is not a finite duration; expected e.g. 30s, 5m, 2h, 7d"
    )
    assert parse_config(BASE + "outbox:\n  settle: 0\n", CFG).settle == 0.0  # settle may be zero


def test_link_down_after_shorter_than_interval() -> None:
    assert err(BASE + "gossip:\n  interval: 10s\n  link_down_after: 5s\n") == (
        "gossip.link_down_after: 5s is shorter than gossip.interval (10s); expected at least one "
        "gossip interval (three or more avoids flapping)"
    )


def test_bad_sizes() -> None:
    expected = "expected e.g. 512MiB, 4GiB, 64GiB or a number of bytes"
    assert err(BASE + "transfers:\n  max_file_size: huge\n") == (
        f"transfers.max_file_size: 'huge' is not a size; {expected}"
    )
    assert err(BASE + "transfers:\n  max_file_size: 10 furlongs\n") == (
        f"transfers.max_file_size: '10 furlongs' is not a size; {expected}"
    )
    assert err(BASE + "transfers:\n  min_free_space: -1\n") == (
        f"transfers.min_free_space: -1 is negative; {expected}"
    )
    assert err(BASE + "transfers:\n  max_file_size: 0\n") == (
        "transfers.max_file_size: 0 is zero; expected a size above zero, e.g. 512MiB, 4GiB, 64GiB or a number of bytes"
    )
    assert err(BASE + "transfers:\n  max_file_size: 1.5\n") == (
        f"transfers.max_file_size: 1.5 is not a whole number of bytes; {expected}"
    )


@pytest.mark.parametrize(
    ("value", "what"),
    [("0", "0 is out of range"), ("65", "65 is out of range"), ("'4'", "got '4'"),
     ("2.5", "got the number 2.5"), ("true", "got true (a boolean)")],
)  # fmt: skip
def test_bad_parallel(value: str, what: str) -> None:
    assert err(BASE + f"transfers:\n  parallel: {value}\n") == (
        f"transfers.parallel: {what}; expected a whole number from 1 to 64"
    )


@pytest.mark.parametrize(("key", "value", "got"), [("outbox.polling", "yes", "got 'yes'"),
                                                  ("log.json", "yes", "got 'yes'"),
                                                  ("log.json", "1", "got the number 1"),
                                                  ("outbox.polling", "on", "got 'on'")])  # fmt: skip
def test_bad_booleans(key: str, value: str, got: str) -> None:
    section, name = key.split(".")
    assert err(BASE + f"{section}:\n  {name}: {value}\n") == f"{key}: {got}; expected true or false"


def test_bad_log_level() -> None:
    expected = "expected one of debug, info, warning, error"
    assert err(BASE + "log:\n  level: warn\n") == (
        f"log.level: 'warn' is not a log level (did you mean 'warning'?); {expected}"
    )
    assert (
        err(BASE + "log:\n  level: loud\n") == f"log.level: 'loud' is not a log level; {expected}"
    )
    assert err(BASE + "log:\n  level: 3\n") == f"log.level: got the number 3; {expected}"


def test_long_values_are_shortened_and_newlines_escaped() -> None:
    message = err(BASE + 'log:\n  level: "a\\nb"\n')
    assert message.startswith("log.level: 'a\\nb' is not a log level")
    message = err(BASE + f"log:\n  level: {'x' * 500}\n")
    assert len(message) < 200


def test_every_error_message_is_one_line_with_expected() -> None:
    # A sweep over many broken variants: each gives one line naming the file and what is expected.
    variants = [
        "node: [", "node:\n  id: NodeA\n  id: NodeA\n", BASE + "peers: 5\n",
        BASE + "gossip: [1]\n", BASE.replace("NodeA\n", '"\\u2028"\n', 1),
        BASE + 'log:\n  level: "\\u2028"\n', BASE.replace("root: ./NodeA", "root: |\n  a\n  b"),
    ]  # fmt: skip
    for text in variants:
        message = err(text)
        assert "; expected " in message, message


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    ("value", "seconds"),
    [(30, 30.0), (2.5, 2.5), ("30", 30.0), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0),
     ("7d", 604800.0), ("1.5h", 5400.0), ("500ms", 0.5), ("1w", 604800.0), ("1h30m", 5400.0),
     ("5 m", 300.0), (" 10S ", 10.0), ("0", 0.0), (".5s", 0.5)],
)  # fmt: skip
def test_parse_duration(value: object, seconds: float) -> None:
    assert parse_duration(value) == seconds


@pytest.mark.parametrize(
    ("value", "message"),
    [("soon", "'soon' is not a duration"), ("", "'' is not a duration"), ("5x", "'5x' is not a duration"),
     ("s", "'s' is not a duration"), ("-1s", "'-1s' is negative"), (-3, "-3 is negative"),
     (True, "true is not a duration"), (None, "nothing is not a duration"), ([1], "a list is not a duration"),
     (float("nan"), "nan is not a finite duration"), ("1h 30", "'1h 30' is not a duration")],
)  # fmt: skip
def test_parse_duration_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_duration(value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("value", "size"),
    [(0, 0), (512, 512), ("512", 512), ("10KiB", 10240), ("10MiB", 10 * 2**20), ("4GiB", 4 * 2**30),
     ("1TiB", 2**40), ("10K", 10240), ("10M", 10 * 2**20), ("4G", 4 * 2**30), ("10KB", 10_000),
     ("10MB", 10_000_000), ("4GB", 4_000_000_000), ("2TB", 2 * 10**12), ("1.5GiB", 3 * 2**29),
     ("64 GiB", 64 * 2**30), ("10kib", 10240), ("100B", 100), (2048.0, 2048)],
)  # fmt: skip
def test_parse_size(value: object, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize(
    ("value", "message"),
    [("lots", "'lots' is not a size"), ("10XB", "'10XB' is not a size"), ("-1", "'-1' is negative"),
     (-1, "-1 is negative"), ("1.5", "'1.5' is not a whole number of bytes"), (True, "true is not a size"),
     (None, "nothing is not a size"), ("", "'' is not a size")],
)  # fmt: skip
def test_parse_size_errors(value: object, message: str) -> None:
    with pytest.raises(ValueError) as info:
        parse_size(value)
    assert str(info.value) == message


@pytest.mark.parametrize(
    ("value", "address"),
    [("127.0.0.1:7001", ("127.0.0.1", 7001)), ("[::1]:7001", ("::1", 7001)),
     ("host.example:22", ("host.example", 22)), ("localhost:65535", ("localhost", 65535)),
     ("[fe80::1%eth0]:7001", ("fe80::1%eth0", 7001)), ("node_a:1", ("node_a", 1))],
)  # fmt: skip
def test_parse_hostport(value: str, address: tuple[str, int]) -> None:
    assert parse_hostport(value) == address
    assert parse_hostport(format_hostport(address)) == address


def test_parse_hostport_port_zero_only_when_allowed() -> None:
    assert parse_hostport("127.0.0.1:0", allow_port_zero=True) == ("127.0.0.1", 0)
    with pytest.raises(ValueError, match=r"has port 0, outside 1\.\.65535"):
        parse_hostport("127.0.0.1:0")


def test_format_duration_and_size() -> None:
    assert [format_duration(s) for s in (604800, 21600, 90, 30, 1.5, 0.5)] == [
        "7d", "6h", "90s", "30s", "1.5s", "0.5s"
    ]  # fmt: skip
    assert format_duration(300) == "5m"
    assert [format_size(s) for s in (64 * 2**30, 256 * 2**20, 2**40, 1000, 1536)] == [
        "64GiB", "256MiB", "1TiB", "1000", "1536"
    ]  # fmt: skip
    for s in (604800, 21600, 90, 1.5):
        assert parse_duration(format_duration(s)) == s
    for n in (64 * 2**30, 1000, 1536):
        assert parse_size(format_size(n)) == n


# --------------------------------------------------------------------------- find_config


@pytest.fixture
def no_system_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    system = tmp_path / "etc" / "maildrop" / "maildrop.yaml"
    monkeypatch.setattr(config_module, "SYSTEM_CONFIG", system)
    return system


def test_find_config_order(tmp_path: Path, no_system_config: Path) -> None:
    cwd = tmp_path / "work"
    cwd.mkdir()
    cli = tmp_path / "cli.yaml"
    env = tmp_path / "env.yaml"
    local = cwd / "maildrop.yaml"
    for p in (cli, env, local):
        p.write_text(BASE)
    no_system_config.parent.mkdir(parents=True)
    no_system_config.write_text(BASE)
    environ = {"MAILDROP_CONFIG": str(env)}
    assert find_config(str(cli), environ, cwd) == cli
    assert find_config(None, environ, cwd) == env
    assert find_config(None, {}, cwd) == local
    assert find_config(None, {"MAILDROP_CONFIG": ""}, cwd) == local  # empty means unset
    local.unlink()
    assert find_config(None, {}, cwd) == no_system_config


def test_find_config_relative_values_use_cwd(tmp_path: Path, no_system_config: Path) -> None:
    (tmp_path / "a.yaml").write_text(BASE)
    assert find_config("a.yaml", {}, tmp_path) == tmp_path / "a.yaml"
    assert find_config(None, {"MAILDROP_CONFIG": "a.yaml"}, tmp_path) == tmp_path / "a.yaml"


def test_find_config_uses_the_process_cwd_by_default(
    tmp_path: Path, no_system_config: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "maildrop.yaml").write_text(BASE)
    monkeypatch.chdir(tmp_path)
    assert find_config(None, {}) == tmp_path / "maildrop.yaml"


def test_find_config_nothing_found(tmp_path: Path, no_system_config: Path) -> None:
    with pytest.raises(ConfigError) as info:
        find_config(None, {}, tmp_path)
    assert str(info.value) == (
        f"no config found: tried ./maildrop.yaml and {no_system_config}; "
        "pass --config FILE or set MAILDROP_CONFIG"
    )
    assert info.value.exit_status == 2


def test_find_config_default_message_names_etc(tmp_path: Path) -> None:
    if config_module.SYSTEM_CONFIG.exists():
        pytest.skip("this machine has /etc/maildrop/maildrop.yaml")
    with pytest.raises(ConfigError) as info:
        find_config(None, {}, tmp_path)
    assert str(info.value) == (
        "no config found: tried ./maildrop.yaml and /etc/maildrop/maildrop.yaml; "
        "pass --config FILE or set MAILDROP_CONFIG"
    )


def test_find_config_explicit_missing(tmp_path: Path, no_system_config: Path) -> None:
    (tmp_path / "maildrop.yaml").write_text(BASE)  # must not be used as a fallback
    with pytest.raises(ConfigError) as info:
        find_config("missing.yaml", {}, tmp_path)
    assert str(info.value) == f"{tmp_path / 'missing.yaml'}: config file not found"
    with pytest.raises(ConfigError) as info:
        find_config(None, {"MAILDROP_CONFIG": "/nowhere/m.yaml"}, tmp_path)
    assert str(info.value) == "/nowhere/m.yaml: config file not found (named by $MAILDROP_CONFIG)"
    with pytest.raises(ConfigError) as info:
        find_config("", {}, tmp_path)
    assert str(info.value) == "--config: empty file name; expected --config FILE"


# --------------------------------------------------------------------------- render_config


def test_render_round_trip_minimal(tmp_path: Path) -> None:
    text = render_config("NodeA", "127.0.0.1:7001")
    path = tmp_path / "maildrop.yaml"
    c = parse_config(text, path)
    assert c == Config(
        path=path,
        node_id="NodeA",
        display_name="NodeA",
        listen=("127.0.0.1", 7001),
        advertise=("127.0.0.1", 7001),
        root=tmp_path,
        key_path=tmp_path / "node_ed25519",
        peers=(),
    )


def test_render_round_trip_full(tmp_path: Path) -> None:
    peers = [Peer("NodeB", ("127.0.0.1", 7002), KEY_B), Peer("NodeC", ("::1", 7003), KEY_C)]
    text = render_config(
        "NodeA",
        "[::]:0",
        display_name="Nœud A: #1 'prod'",
        root="/var/lib/maildrop/NodeA",
        key="keys/node_ed25519",
        peers=peers,
    )
    c = parse_config(text, tmp_path / "maildrop.yaml")
    assert c.node_id == "NodeA"
    assert c.display_name == "Nœud A: #1 'prod'"
    assert c.listen == c.advertise == ("::", 0)
    assert c.root == Path("/var/lib/maildrop/NodeA")
    assert c.key_path == tmp_path / "keys" / "node_ed25519"
    assert c.peers == tuple(peers)
    defaults = Config(tmp_path, "x", "x", ("h", 1), ("h", 1), tmp_path, tmp_path, ())
    for field in ("gossip_interval", "link_down_after", "expire_after", "resend_after",
                  "max_file_size", "min_free_space", "parallel", "settle", "rescan_interval",
                  "polling", "log_level", "log_json"):  # fmt: skip
        assert getattr(c, field) == getattr(defaults, field), field


def test_render_mentions_every_key_with_a_comment() -> None:
    text = render_config("NodeA", "127.0.0.1:7001")
    for key in ("id:", "display_name:", "listen:", "advertise:", "root:", "key:", "peers:",
                "gossip:", "interval:", "link_down_after:", "transfers:", "expire_after:",
                "resend_after:", "max_file_size:", "min_free_space:", "parallel:", "outbox:",
                "settle:", "rescan_interval:", "polling:", "history:", "keep:", "log:", "level:",
                "json:"):  # fmt: skip
        lines = [line for line in text.splitlines() if line.lstrip("# ").startswith(key)]
        assert lines, key
    # The optional sections are commented out; uncommenting them gives the same values.
    uncommented = "\n".join(
        line[2:] if line.startswith(("# gossip", "#   ", "# transfers", "# relay:", "# outbox", "# history",
                                     "# log"))
        and ":" in line
        and not line.startswith(("#   - id", "#     ")) else line
        for line in text.splitlines()
    )  # fmt: skip
    assert "\ngossip:\n  interval: 5s" in uncommented
    assert parse_config(uncommented, CFG) == parse_config(text, CFG)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"node_id": "Node A"}, "node.id: 'Node A' is not a node id; expected a node id like NodeA"),
        ({"listen": "nowhere"}, "node.listen: 'nowhere' is not HOST:PORT; expected HOST:PORT"),
        ({"display_name": "a\nb"}, "node.display_name: 'a\\nb' contains control characters"),
        ({"root": ""}, "root: empty; expected the folder"),
        ({"peers": [Peer("NodeB", ("127.0.0.1", 7002), "ssh-ed25519 AAAAx")]},
         "peers[0].key: public key does not parse"),
        ({"peers": [Peer("NodeA", ("127.0.0.1", 7002), KEY_B)]}, "peers[0].id: NodeA is this node itself"),
    ],
)  # fmt: skip
def test_render_rejects_bad_values(kwargs: dict, message: str) -> None:
    args = {"node_id": "NodeA", "listen": "127.0.0.1:7001"} | kwargs
    node_id, listen = args.pop("node_id"), args.pop("listen")
    with pytest.raises(ConfigError) as info:
        render_config(node_id, listen, **args)
    assert str(info.value).startswith(message), str(info.value)
    assert "\n" not in str(info.value)


def test_render_writes_normalised_keys() -> None:
    text = render_config(
        "NodeA", "127.0.0.1:7001", peers=[Peer("NodeB", ("127.0.0.1", 7002), KEY_B)]
    )
    assert f"key: {KEY_B}\n" in text
    assert "peers: []" not in text


def test_find_config_path_below_a_file_is_not_found(tmp_path: Path, no_system_config: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError) as info:
        find_config("file/maildrop.yaml", {}, tmp_path)
    assert str(info.value) == f"{tmp_path}/file/maildrop.yaml: config file not found"


def test_file_name_with_a_newline_still_gives_one_line(tmp_path: Path) -> None:
    path = tmp_path / "a\nb.yaml"
    path.write_text("node: [\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "\n" not in str(info.value)
    assert str(info.value).endswith(
        "YAML syntax error: while parsing a flow node, expected the node "
        "content, but found '<stream end>'; expected valid YAML"
    )


def test_recursive_and_exploding_aliases_are_harmless() -> None:
    assert err(BASE + "peers: &p [*p]\n") == (
        "peers[0]: got a list; expected a mapping with keys id, address, key, via, ssh_user, ssh_request, ssh_command, ssh_host_key"
    )
    laughs = "a: &a [x, x, x, x, x, x, x, x, x, x]\n" + "".join(
        f"{c}: &{c} [*{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}, *{p}]\n"
        for p, c in zip("abcdefgh", "bcdefghi", strict=True)
    )
    assert err(laughs).startswith("a: unknown key; expected one of node, root")


def test_relative_paths_follow_a_symlinked_config_to_its_real_folder(tmp_path):
    from maildrop.config import load_config, render_config

    real = tmp_path / "var" / "node"
    real.mkdir(parents=True)
    (real / "maildrop.yaml").write_text(render_config("NodeA", "127.0.0.1:7001"))
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "maildrop.yaml").symlink_to(real / "maildrop.yaml")
    c = load_config(etc / "maildrop.yaml")
    assert c.root == real and c.key_path == real / "node_ed25519"


# --------------------------------------------------------------------------- every problem at once


def problems(text: str, path: Path = CFG) -> list[str]:
    """Every problem parse_config finds in ``text``, without the file name."""
    with pytest.raises(config_module.ConfigProblems) as info:
        parse_config(text, path)
    assert all(p.startswith(f"{path}: ") and "\n" not in p for p in info.value.problems)
    return [p[len(f"{path}: ") :] for p in info.value.problems]


def test_every_problem_is_reported_in_file_order() -> None:
    text = (
        "node:\n  id: Node A\n  listen: 127.0.0.1\n  colour: blue\nroot: .\nkey: k\n"
        "peers:\n  - id: NodeB\n    address: nowhere\n    key: ssh-ed25519 AAAA\n"
        "  - id: NodeC\n    address: 127.0.0.1:7003\n    key: " + KEY_C + "\n"
        "gossip:\n  interval: soon\ntransfers:\n  parallel: 0\nlog:\n  level: loud\n"
    )
    found = problems(text)
    assert [p.split(":")[0] for p in found] == [
        "node.colour", "node.id", "node.listen", "peers[0].address", "peers[0].key",
        "gossip.interval", "transfers.parallel", "log.level",
    ], found
    assert all("; expected " in p for p in found)
    # the one-line message for every other command: the first problem and a count
    message = str(pytest.raises(ConfigError, parse_config, text, CFG).value)
    assert message == f"{CFG}: {found[0]} (and 7 more problems: see 'maildrop check')"


def test_a_broken_value_adds_no_problem_of_its_own_elsewhere() -> None:
    # listen is broken: the peer that has the same address is not reported for it; a broken
    # interval does not make link_down_after "shorter than the interval"
    text = with_peers(("NodeB", "127.0.0.1:7001", KEY_B), head=BASE.replace(
        "listen: 127.0.0.1:7001", "listen: 127.0.0.1")) + "gossip:\n  interval: x\n  link_down_after: 1s\n"
    assert [p.split(":")[0] for p in problems(text)] == ["node.listen", "gossip.interval"]
    # a broken peer entry still lets the next be checked against the valid ones
    text = with_peers(("NodeB", "127.0.0.1:7002", "x"), ("NodeB", "127.0.0.1:7002", KEY_C))
    assert problems(text) == [
        "peers[0].key: 'x' is not a public key line; expected one OpenSSH line 'ssh-ed25519 "
        "AAAA...' (the peer's 'maildrop pubkey' output)",
        "peers[1].id: duplicate peer NodeB (also peers[0]); expected each peer once",
        "peers[1].address: 127.0.0.1:7002 is also the address of peers[0] (NodeB); expected a "
        "different address for each peer",
    ]


def test_duplicate_keys_and_other_problems_are_reported_together() -> None:
    text = BASE + "log:\n  level: info\n  level: loud\n" + "gossip:\n  interval: x\n"
    found = problems(text)
    assert found[0].startswith("log.level: duplicate key (lines 7 and 8)")
    assert [p.split(":")[0] for p in found[1:]] == ["gossip.interval", "log.level"]


def test_a_config_with_one_problem_has_no_count() -> None:
    message = err(BASE + "gossip:\n  interval: x\n")
    assert "more problem" not in message
    assert problems(BASE + "gossip:\n  interval: x\n") == [message]


def test_14_render_writes_an_ipv6_advertise_address(tmp_path: Path) -> None:
    """``init --listen '[::1]:7001' --advertise ...`` lost the advertise address: the line
    was found by text replacement, which missed the quoted IPv6 form."""
    text = render_config("NodeA", "[::1]:7001", advertise="[2001:db8::1]:7002")
    c = parse_config(text, tmp_path / "maildrop.yaml")
    assert c.listen == ("::1", 7001) and c.advertise == ("2001:db8::1", 7002)
    plain = parse_config(render_config("NodeA", "[::1]:7001"), tmp_path / "maildrop.yaml")
    assert plain.advertise == ("::1", 7001)
    assert "# advertise:" in render_config("NodeA", "[::1]:7001")
