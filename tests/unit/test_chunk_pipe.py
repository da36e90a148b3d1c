"""transport.ssh._ChunkPipe: a channel's receive buffer with paramiko's BufferedPipe
semantics, and the hook (``_Channels``) that gives it to every channel of a connection."""

from __future__ import annotations

import inspect
import socket
import threading
import time

import paramiko
import pytest
from paramiko.buffered_pipe import PipeTimeout

from maildrop.transport import ssh


def test_reads_join_and_split_the_packets_fed_in_order():
    pipe = ssh._ChunkPipe()
    for chunk in (b"abc", b"", b"defgh", b"ij"):
        pipe.feed(chunk)
    assert len(pipe) == 10 and pipe.read_ready()
    assert pipe.read(2) == b"ab"  # a split packet
    assert pipe.read(5) == b"cdefg"  # two packets joined
    assert len(pipe) == 3
    assert pipe.read(100) == b"hij"  # less than asked: what there is
    assert len(pipe) == 0 and not pipe.read_ready()


def test_a_read_waits_for_a_feed_times_out_and_ends_at_close():
    pipe = ssh._ChunkPipe()
    with pytest.raises(PipeTimeout):
        pipe.read(10, 0.0)
    t0 = time.monotonic()
    with pytest.raises(PipeTimeout):
        pipe.read(10, 0.05)
    assert time.monotonic() - t0 >= 0.05
    threading.Timer(0.05, pipe.feed, args=(b"late",)).start()
    assert pipe.read(10, 5.0) == b"late"
    pipe.feed(b"left")
    pipe.close()
    assert pipe.read(10) == b"left"  # what was fed before the close is still read
    assert pipe.read(10) == b""  # then the end


def test_the_event_follows_the_buffer_and_empty_takes_everything():
    pipe = ssh._ChunkPipe()
    event = threading.Event()
    pipe.set_event(event)
    assert not event.is_set()
    pipe.feed(b"x" * 10)
    assert event.is_set()
    assert pipe.read(4) == b"xxxx" and event.is_set()
    assert pipe.empty() == b"x" * 6
    assert not event.is_set() and len(pipe) == 0
    pipe.close()
    assert event.is_set()


def test_every_channel_of_a_connection_gets_chunk_pipes():
    a, b = socket.socketpair()
    try:
        transport = ssh._new_transport(a)
        assert isinstance(transport._channels, ssh._Channels)
        chan = paramiko.Channel(7)
        transport._channels.put(7, chan)
        assert isinstance(chan.in_buffer, ssh._ChunkPipe)
        assert isinstance(chan.in_stderr_buffer, ssh._ChunkPipe)
        assert transport._channels.get(7) is chan
    finally:
        a.close()
        b.close()
    # Both ways a channel is made (we open it, the peer opens it) go through the map's put
    # before a byte can reach it; Channel.recv reads in_buffer. Keep that true on upgrades.
    for func in (paramiko.Transport.open_channel, paramiko.Transport._parse_channel_open):
        assert "self._channels.put(" in inspect.getsource(func), f"paramiko {func.__name__} moved"
    assert "self.in_buffer.read(" in inspect.getsource(paramiko.Channel.recv)
