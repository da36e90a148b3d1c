"""Peer entries reached through OpenSSH (via, ssh_*), the ssh command line they give, and
who a `maildrop serve` hello may speak for."""

from __future__ import annotations

from pathlib import Path

from maildrop.config import parse_config
from maildrop.keys import generate_key
from maildrop.transport.local import resolve_peer
from maildrop.transport.openssh import OpenSSHClient
from tests.unit.test_config import CFG, KEY_B, KEY_C, err, with_peers

OPENSSH = with_peers(("NodeB", "nodeb.example.net:22", KEY_B)) + "    via: openssh\n"


def test_a_peer_is_reached_by_our_own_client_unless_it_says_openssh():
    [peer] = parse_config(with_peers(("NodeB", "127.0.0.1:7002", KEY_B)), CFG).peers
    assert (peer.via, peer.ssh_user, peer.ssh_request, peer.ssh_command) == ("maildrop", None, "subsystem", ("ssh",))
    assert peer.host_key == KEY_B


def test_an_openssh_peer_with_every_field():
    text = OPENSSH + (f"    ssh_user: maildrop\n    ssh_request: command\n"
                      f"    ssh_command: ssh -J 'bastion.example.net'\n    ssh_host_key: {KEY_C}\n")
    [peer] = parse_config(text, CFG).peers
    assert peer.via == "openssh" and peer.address == ("nodeb.example.net", 22)
    assert peer.ssh_user == "maildrop" and peer.ssh_request == "command"
    assert peer.ssh_command == ("ssh", "-J", "bastion.example.net")
    assert peer.key == KEY_B and peer.host_key == KEY_C


def test_bad_openssh_fields_are_one_line_each():
    assert err(with_peers(("NodeB", "127.0.0.1:7002", KEY_B)) + "    via: telnet\n").startswith(
        "peers[0].via: 'telnet'; expected maildrop (the peer's own agent) or openssh")
    assert err(with_peers(("NodeB", "127.0.0.1:7002", KEY_B)) + "    ssh_user: maildrop\n") == (
        "peers[0].ssh_user: set without via: openssh; expected via: openssh with it, or no ssh_* keys")
    assert err(OPENSSH + "    ssh_user: -oProxyCommand=x\n").startswith(
        "peers[0].ssh_user: '-oProxyCommand=x' is not a login name")
    assert err(OPENSSH + "    ssh_request: shell\n").startswith("peers[0].ssh_request: 'shell'; expected subsystem")
    assert err(OPENSSH + "    ssh_command: \"ssh 'unclosed\"\n").startswith("peers[0].ssh_command: ")
    assert err(OPENSSH + "    ssh_command: -v\n").startswith("peers[0].ssh_command: '-v' names no program")
    assert err(OPENSSH + "    ssh_host_key: nope\n").startswith("peers[0].ssh_host_key: ")


def _client(tmp_path: Path, extra: str = "") -> OpenSSHClient:
    key = generate_key(tmp_path / "node_ed25519")
    [peer] = parse_config(OPENSSH + extra, CFG).peers
    (tmp_path / "state").mkdir()
    return OpenSSHClient("NodeA", key, peer, tmp_path / "state")


def test_the_ssh_command_line_pins_the_key_and_allows_nothing_else(tmp_path):
    client = _client(tmp_path, "    ssh_user: maildrop\n")
    argv = client.argv(10.0)
    options = {argv[i + 1] for i, a in enumerate(argv) if a == "-o"}
    assert {"BatchMode=yes", "StrictHostKeyChecking=yes", "IdentitiesOnly=yes", "IdentityAgent=none",
            "GlobalKnownHostsFile=/dev/null", "HostKeyAlias=maildrop-NodeB",
            f"UserKnownHostsFile={client.known_hosts}", "ClearAllForwardings=yes"} <= options
    assert argv[:1] == ["ssh"] and "-T" in argv and argv[argv.index("-F"):argv.index("-F") + 2] == ["-F", "none"]
    assert argv[-4:] == ["-s", "--", "nodeb.example.net", "maildrop"]
    assert argv[argv.index("-l"):argv.index("-l") + 2] == ["-l", "maildrop"]
    assert ["-i", str(tmp_path / "node_ed25519")] == argv[argv.index("-i"):argv.index("-i") + 2]
    assert client.known_hosts.read_text() == f"maildrop-NodeB {KEY_B}\n"


def test_a_forced_command_peer_runs_maildrop_serve_and_a_rotation_moves_the_pin(tmp_path):
    client = _client(tmp_path, "    ssh_request: command\n    ssh_command: ssh -F /etc/maildrop/ssh_config\n")
    argv = client.argv(10.0)
    assert argv[-3:] == ["--", "nodeb.example.net", "maildrop serve"] and "-s" not in argv
    assert argv.count("-F") == 1  # the operator's own ssh_config, not ours
    client.set_peer_key(KEY_C)
    assert client.known_hosts.read_text() == f"maildrop-NodeB {KEY_C}\n"


def test_a_separate_sshd_host_key_stays_pinned_through_a_rotation(tmp_path):
    client = _client(tmp_path, f"    ssh_host_key: {KEY_C}\n")
    assert client.known_hosts.read_text() == f"maildrop-NodeB {KEY_C}\n"
    client.set_peer_key("ssh-ed25519 " + KEY_B.split()[1])
    assert client.known_hosts.read_text() == f"maildrop-NodeB {KEY_C}\n"


def test_who_a_serve_hello_speaks_for():
    authorized = {"NodeB": KEY_B, "NodeC": KEY_C}
    assert resolve_peer(authorized, "NodeB", None) == ("NodeB", "")
    assert resolve_peer(authorized, None, KEY_C) == ("NodeC", "")
    assert resolve_peer(authorized, "NodeC", KEY_C) == ("NodeC", "")
    assert resolve_peer(authorized, "NodeB", KEY_C) == ("", "key-of-other-peer")
    assert resolve_peer(authorized, "NodeZ", None) == ("", "unknown-peer")
    assert resolve_peer({"NodeB": KEY_B}, None, KEY_C) == ("", "unknown-key")
    assert resolve_peer(authorized, None, None) == ("", "no-peer")
