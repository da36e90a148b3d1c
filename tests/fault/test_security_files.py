"""A local user against the agent's file handling (issue 9, findings 3, 11, 13 and 16).

Each test plays the recipe of the review against a real agent (one against the real
``Custody`` in-process, where the race needs an exact interleaving) and asserts the safe
outcome: the node's key and files outside the outbox never reach the spool or a peer, a
symlink planted as ``inbox/<origin>`` or as ``failed/`` is never written through, one bad
file never holds up the others, and names of multibyte characters are cut by bytes.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from maildrop.agent import open_log
from maildrop.config import load_config
from maildrop.keys import load_key
from maildrop.spool import Spool
from maildrop.transfers import Custody
from tests.harness import Node, wait_until

ACL_ACCESS = "system.posix_acl_access"
ACL_DEFAULT = "system.posix_acl_default"
EMOJI_NAME = "\N{GRINNING FACE}" * 63  # 252 UTF-8 bytes: legal, but no room for a suffix


def log_of(node: Node) -> str:
    return node.log_path.read_text(errors="replace")


def queued(node: Node) -> dict[str, dict]:
    """name -> data of every ``transfer.queued`` the node itself signed (the sealed name
    opened with the node's own key, as the origin may)."""
    return {node.name_in(e["data"]): e["data"] for e in node.events("transfer.queued")
            if e["origin"] == node.name}


def spool_contents(node: Node) -> list[bytes]:
    """The bytes of every regular file in the spool (symlinks are not followed)."""
    return [p.read_bytes() for p in node.spool_files()
            if stat.S_ISREG(p.lstat().st_mode)]


def rename_in(node: Node, dest: str, name: str, data: bytes) -> Path:
    """Drop ``data`` as ``outbox/<dest>/<name>`` by a rename from outside the outbox (no
    temp name beside it: a 252-byte name leaves no room for one)."""
    staging = node.dir / "staging"
    staging.mkdir(exist_ok=True)
    tmp = staging / "file"
    tmp.write_bytes(data)
    folder = node.outbox / dest
    folder.mkdir(parents=True, exist_ok=True)
    os.rename(tmp, folder / name)
    return folder / name


def start_without_dac_override(node: Node) -> None:
    """Start the agent as root but without CAP_DAC_OVERRIDE/CAP_DAC_READ_SEARCH, so a file
    of mode 000 is unreadable to it, as it is to an agent running as its own user."""
    with open(node.log_path, "ab") as logf:
        node.proc = subprocess.Popen(
            ["setpriv", "--bounding-set", "-dac_override,-dac_read_search",
             sys.executable, "-m", "maildrop", "-c", str(node.config_path), "run",
             "--log-level", "debug"],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=logf, env=node.env,
            start_new_session=True)
    node.wait_listening()


def posix_acl(entries: list[tuple[int, int, int]]) -> bytes:
    """The kernel's xattr form of a POSIX ACL: version 2, then (tag, perm, id) entries."""
    return struct.pack("<I", 2) + b"".join(struct.pack("<HHI", *e) for e in entries)


ANY = 0xFFFFFFFF
# user::rw- group::rw- group:<gid 4242>:rw- mask::rw- other::---
GROUP_RW_ACL = posix_acl([(0x01, 6, ANY), (0x04, 6, ANY), (0x08, 6, 4242), (0x10, 6, ANY),
                          (0x20, 0, ANY)])


# --------------------------------------------------------------------------- finding 3


def test_f3_parent_folder_swapped_for_a_symlink_does_not_send_the_key(make_net, tmp_path):
    """Drop ``outbox/NodeB/node_ed25519``; within the settle time move ``outbox/NodeB`` away
    and put a symlink to the node's root in its place."""
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], settings={"outbox": {"settle": "1s"}})
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    key = a.dir / "node_ed25519"
    secret = key.read_bytes()
    folder = a.outbox / "NodeB"
    folder.mkdir(exist_ok=True)
    (folder / "node_ed25519").write_bytes(b"decoy")  # written in place: it settles
    os.rename(folder, tmp_path / "moved-away")
    os.symlink(a.dir, folder)
    wait_until(lambda: "outbox.refused" in log_of(a) or not key.exists(), 30,
               "A to refuse the file (or to take the key)")
    assert key.exists() and key.read_bytes() == secret, "the node's key was taken"
    assert "reason=symlink" in log_of(a)
    assert "node_ed25519" not in queued(a)
    assert secret not in spool_contents(a)
    assert b.inbox_files() == []
    assert a.running


class _SwappingSpool(Spool):
    """A real spool; the attacker wins the race: right after the intent is written, each
    file to be taken is moved away and a symlink to ``secret`` is put in its place."""

    secret: Path

    def write_intent(self, entries):
        path = super().write_intent(entries)
        for e in entries:
            src = Path(e["src"])
            os.rename(src, src.with_name(f".{src.name}.moved-away"))
            os.symlink(self.secret, src)
        return path


def test_f3_file_swapped_for_a_symlink_during_the_intent_write_is_not_sent(make_net, tmp_path):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], start=False)  # B's key: pinned
    a = net["NodeA"]
    config = load_config(a.config_path)
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for the outbox " * 100)
    spool = _SwappingSpool(config.spool)
    spool.secret = secret
    elog = open_log(config)
    try:
        custody = Custody(a.name, load_key(config.key_path), elog, spool, config.inbox,
                          config.failed, max_file_size=2**30, min_free_space=0)
        path = rename_in(a, "NodeB", "report.txt", b"the real report")
        custody.take_batch([(path, "NodeB")])
        assert not any(p.is_symlink() for p in a.spool_files()), "a symlink entered the spool"
        assert secret.read_bytes() not in spool_contents(a)
        secret_sha = hashlib.sha256(secret.read_bytes()).hexdigest()
        with elog.lock:
            shas = [e.data["sha256"] for e in elog.ledger.all_events()
                    if e.type == "transfer.queued"]
        assert secret_sha not in shas
        assert path.is_symlink() and path.resolve() == secret, "the refused entry was lost"
        assert secret.exists()
    finally:
        elog.close()


def test_f3_hard_link_to_a_file_outside_the_outbox_is_refused(make_net, tmp_path):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    secret = tmp_path / "secret"
    secret.write_bytes(b"someone else's file")
    folder = a.outbox / "NodeB"
    folder.mkdir(exist_ok=True)
    os.link(secret, folder / "linked")
    wait_until(lambda: "outbox.refused" in log_of(a) or "linked" in queued(a), 30,
               "A to refuse the hard link (or to queue it)")
    assert "linked" not in queued(a), "a hard-linked file was queued"
    assert "reason=hardlink" in log_of(a)
    assert (folder / "linked").exists() and secret.stat().st_nlink == 2  # left, not lost
    assert secret.read_bytes() not in spool_contents(a)
    assert b.inbox_files() == []


def test_f3_symlink_planted_as_inbox_origin_is_not_written_through(make_net, tmp_path):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    b.inbox.mkdir(exist_ok=True)
    os.symlink(elsewhere, b.inbox / "NodeA")
    data = os.urandom(5000)
    a.drop("NodeB", "planted.bin", data)
    wait_until(lambda: "transfer.deliver.failed" in log_of(b) or list(elsewhere.iterdir()), 30,
               "B to refuse the inbox folder (or to deliver through it)")
    assert list(elsewhere.iterdir()) == [], "B delivered through the planted symlink"
    refused = next(ln for ln in log_of(b).splitlines() if "transfer.deliver.failed" in ln)
    assert "inbox/NodeA" in refused and "is a symlink" in refused
    assert data in spool_contents(b)  # kept in custody: the delivery waits, nothing is lost
    assert b.running


def test_f3_symlink_planted_as_failed_is_not_written_through(make_net, tmp_path):
    net = make_net(["NodeA"], [], settings={"transfers": {"expire_after": "2s"}}, start=False)
    a = net["NodeA"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    a.failed.rmdir()
    os.symlink(elsewhere, a.failed)
    net.start()
    data = os.urandom(3000)
    a.drop("NodeZ", "doomed.bin", data)  # NodeZ never appears: it expires
    wait_until(lambda: "failed.refused" in log_of(a) or list(elsewhere.iterdir()), 30,
               "A to refuse failed/ (or to write through it)")
    assert list(elsewhere.iterdir()) == [], "A wrote through the planted failed/ symlink"
    kept = [p for p in (a.dir / "state" / "refused").iterdir() if p.read_bytes() == data]
    assert kept, "the expired file was lost"
    assert a.running


# --------------------------------------------------------------------------- finding 11


def test_f11_unreadable_file_does_not_strand_the_rest_of_its_batch(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], start=False)
    a, b = net["NodeA"], net["NodeB"]
    folder = a.outbox / "NodeB"
    folder.mkdir(parents=True, exist_ok=True)
    good = {f"good{i}.txt": os.urandom(100 + i) for i in range(3)}
    for name, data in good.items():
        (folder / name).write_bytes(data)
    locked = folder / "locked.txt"
    locked.write_bytes(b"nobody may read this")
    locked.chmod(0)
    net.start(["NodeB"])
    start_without_dac_override(a)
    wait_until(lambda: set(good) <= set(queued(a)) or "outbox.take.failed" in log_of(a), 30,
               "A to queue the readable files")
    assert set(good) <= set(queued(a)), "the readable files were stranded"
    wait_until(lambda: {p.name for p in b.inbox_files("NodeA")} == set(good), 30,
               "the readable files at B")
    assert "locked.txt" not in queued(a)
    assert locked.exists() and "reason=unreadable" in log_of(a)


def test_f11_expiry_of_a_252_byte_name_does_not_stop_the_agent(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], settings={"transfers": {"expire_after": "2s"}})
    net.wait_converged(60)
    a = net["NodeA"]
    net["NodeB"].stop()  # known (its key is pinned), never reached: the sealed copy expires
    data = os.urandom(2000)
    rename_in(a, "NodeB", EMOJI_NAME, data)
    wait_until(lambda: [p for p in a.failed.iterdir() if p.name.endswith(".reason")] or not a.running, 30,
               "the file and its reason in failed/ (or the agent to exit)")
    assert a.running, "the agent exited: " + a.log_tail(5)
    assert (a.failed / EMOJI_NAME).read_bytes() == data
    reasons = [p for p in a.failed.iterdir() if p.name.endswith(".reason")]
    assert len(reasons) == 1 and len(reasons[0].name.encode()) <= 255
    text = reasons[0].read_text()
    assert "not delivered" in text and EMOJI_NAME in text


# --------------------------------------------------------------------------- finding 13


def test_f13_clash_suffix_on_a_multibyte_name_is_cut_by_bytes(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")])
    net.wait_converged(60)
    a, b = net["NodeA"], net["NodeB"]
    first, second = os.urandom(1000), os.urandom(1001)
    rename_in(a, "NodeB", EMOJI_NAME, first)
    wait_until(lambda: len(b.inbox_files("NodeA")) == 1, 30, "the first file at B")
    rename_in(a, "NodeB", EMOJI_NAME, second)
    wait_until(lambda: len(b.inbox_files("NodeA")) == 2 or "Errno 36" in log_of(b), 30,
               "the second file at B")
    got = {p.name: p.read_bytes() for p in b.inbox_files("NodeA")}
    assert len(got) == 2, "the clashing name could not be delivered"
    assert got[EMOJI_NAME] == first
    (other,) = set(got) - {EMOJI_NAME}
    assert got[other] == second
    assert len(other.encode()) <= 255 and "(1)" in other


# --------------------------------------------------------------------------- finding 16


def test_f16_taken_files_are_private_to_the_agent(make_net):
    net = make_net(["NodeA", "NodeB"], [("NodeA", "NodeB")], start=False)
    a, b = net["NodeA"], net["NodeB"]
    folder = a.outbox / "NodeB"
    folder.mkdir(parents=True, exist_ok=True)
    os.setxattr(folder, ACL_DEFAULT, GROUP_RW_ACL)  # like `setfacl -d -m g:...:rw`
    data = os.urandom(4000)
    net.start(["NodeA"])  # B is down: the file waits in A's spool
    fd = os.open(folder / "shared.bin", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    os.write(fd, data)
    os.close(fd)
    assert ACL_ACCESS in os.listxattr(folder / "shared.bin")  # inherited, group-writable
    wait_until(lambda: "shared.bin" in queued(a), 30, "A to take the file")
    (copy,) = [p for p in a.spool_files() if p.name.endswith(".data")]
    st = copy.lstat()
    assert stat.S_IMODE(st.st_mode) == 0o640, oct(st.st_mode)
    assert ACL_ACCESS not in os.listxattr(copy), "the group ACL survived the take"
    assert st.st_nlink == 1
    net.start(["NodeB"])
    wait_until(lambda: b.inbox_files("NodeA"), 60, "the file at B")
    (got,) = b.inbox_files("NodeA")
    assert got.read_bytes() == data
    mode = stat.S_IMODE(got.stat().st_mode)
    assert mode & 0o040 and not mode & 0o022, oct(mode)  # group-readable, not writable


@pytest.fixture(autouse=True)
def _need_root():
    if os.geteuid() != 0:
        pytest.skip("plays a local user against a root-owned node (needs root)")
