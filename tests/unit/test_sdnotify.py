"""sdnotify against real AF_UNIX datagram sockets (a path in tmp_path, and an abstract one)."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from maildrop import sdnotify


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def path_socket(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    address = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(address))
    sock.settimeout(5)
    clean_env.setenv("NOTIFY_SOCKET", str(address))
    yield sock
    sock.close()


@pytest.fixture
def abstract_socket(clean_env: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    name = f"maildrop-test-{uuid.uuid4().hex}"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(5)
    clean_env.setenv("NOTIFY_SOCKET", "@" + name)
    yield sock
    sock.close()


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_unset_socket_returns_false(clean_env: pytest.MonkeyPatch) -> None:
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.ready() is False
    assert sdnotify.stopping() is False
    assert sdnotify.status("x") is False
    assert sdnotify.watchdog_ping() is False


def test_path_socket_receives_each_message(path_socket: socket.socket) -> None:
    assert sdnotify.notify("READY=1") is True
    assert recv(path_socket) == "READY=1"
    assert sdnotify.ready("up, 3 peers") is True
    assert recv(path_socket) == "READY=1\nSTATUS=up, 3 peers"
    assert sdnotify.status("sending 2 files") is True
    assert recv(path_socket) == "STATUS=sending 2 files"
    assert sdnotify.watchdog_ping() is True
    assert recv(path_socket) == "WATCHDOG=1"
    assert sdnotify.stopping() is True
    assert recv(path_socket) == "STOPPING=1"


def test_abstract_socket(abstract_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert recv(abstract_socket) == "READY=1"


def test_status_is_kept_on_one_line(path_socket: socket.socket) -> None:
    # A newline would smuggle a second assignment (e.g. READY=1) into the datagram.
    assert sdnotify.status("bad\nREADY=1") is True
    assert recv(path_socket) == "STATUS=bad READY=1"


def test_unicode_status(path_socket: socket.socket) -> None:
    assert sdnotify.status("café ✓") is True
    assert recv(path_socket) == "STATUS=café ✓"


def test_failures_never_raise(tmp_path: Path, clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens"))
    assert sdnotify.notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", "@" + f"maildrop-nobody-{uuid.uuid4().hex}")
    assert sdnotify.notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert sdnotify.notify("READY=1") is False
    clean_env.setenv("NOTIFY_SOCKET", str(tmp_path))  # a directory, not a socket
    assert sdnotify.notify("READY=1") is False


def test_unencodable_message_returns_false(path_socket: socket.socket) -> None:
    assert sdnotify.notify("STATUS=\udcff") is False


def test_watchdog_interval(clean_env: pytest.MonkeyPatch) -> None:
    assert sdnotify.watchdog_interval() is None
    clean_env.setenv("WATCHDOG_USEC", "60000000")
    assert sdnotify.watchdog_interval() == 30.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid()))
    assert sdnotify.watchdog_interval() == 30.0
    clean_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # meant for another process
    assert sdnotify.watchdog_interval() is None
    clean_env.setenv("WATCHDOG_PID", "not-a-pid")
    assert sdnotify.watchdog_interval() is None
    clean_env.delenv("WATCHDOG_PID")
    for bad in ("", "0", "-5", "soon"):
        clean_env.setenv("WATCHDOG_USEC", bad)
        assert sdnotify.watchdog_interval() is None
