"""Queue control: list what this node holds; flush, cancel, hold and release transfers.

Like Postfix's ``mailq``, ``postqueue -f`` and ``postsuper -d/-h/-H``. Every command works
while the agent runs and while it is stopped:

- Whether an agent runs is whether ``state/agent.lock`` is flock-held (``agent._lock_root``).
  With no agent the CLI takes that lock itself for the whole command (an agent started in
  those milliseconds refuses to start), reads the log and the spool and acts on them.
- With an agent the CLI writes a request ``state/control/<rid>.req`` (written aside, then
  renamed into place) and waits for ``<rid>.ack`` until a deadline. The agent's main loop
  (every second, ``Control.poll``) claims each request by renaming it to ``<rid>.work``,
  applies it, writes the answer as ``<rid>.ack`` and removes the ``.work``. A CLI that gives
  up withdraws its request by removing the ``.req``: if that fails the agent has claimed it.
  Should the agent stop meanwhile, the CLI withdraws the request and acts itself.

Holds are kept in ``state/holds.json`` (``{"v": 1, "holds": {tid: {"origin", "at"}}}``),
replaced atomically and fsynced before a hold or release is acknowledged, so an
acknowledged hold survives a crash and a restart (``Control.start`` applies it before the
relay service starts). Holds of transfers that left the spool are forgotten.

Crash: a hold/release is in ``holds.json`` or not (old or new file, never a mix). A cancel
is ``Custody.expire`` (the file into ``failed/`` with its ``.reason``, then
``transfer.failed``, then the spool copy goes). A flush is soft state only. A request
claimed by an agent that crashed before answering is removed at the next start (its
``.work`` is logged and dropped); the CLI reports that it got no answer.

Exit statuses (the ``status`` of an ``Answer``): 0 done, 1 operational failure (no such
transfer here, not the origin, already delivered, no answer from the agent), 2 usage error
(a malformed or ambiguous id).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import lifecycle as L
from .config import Config
from .errors import ConfigError, MaildropError, UsageError
from .eventlog import EventLog
from .events import Event, parse_ts
from .model import DELIVERED, FAILED, Network
from .notices import FILE_NAME as NOTICES_FILE
from .notices import Notices
from .spool import Spool, fsync_dir
from .transfers import Custody

if TYPE_CHECKING:
    from .custodian import Custodian

log = logging.getLogger("maildrop.control")

CONTROL_DIR = "control"
HOLDS_FILE = "holds.json"
LOCK_FILE = "agent.lock"  # the agent's single-instance lock (agent._lock_root)
ACK_TIMEOUT = 10.0
"""Seconds the CLI waits for a running agent to pick up and answer a request."""
LEFTOVER_AFTER = 60.0
"""Seconds after which an unanswered request, an unread answer or a temp file is removed."""
OPS = ("queue", "flush", "cancel", "hold", "release")
STATES = ("queued", "deferred", "in-flight", "handed", "held", "delivering", "receiving",
          "partial", "delivered", "failed", "unknown")
"""Row states of ``maildrop queue``: queued (due now), deferred (the last try failed or no
route; tried again at its next try), in-flight (being offered now), handed (a hop stored
it; waiting for the receipt or the hop's signed custody, resent at its next try), held (on
hold), delivering (here, being published), receiving / partial (part of a copy is here,
arriving now / waiting for the sender to resume), delivered / failed (the end is known; the
copy goes when the agent runs), unknown (a copy whose queued event has not arrived yet)."""
_PREFIX = re.compile(r"[0-9a-f]{1,32}")


@dataclass
class Answer:
    """What a request came to: an exit status, a line for people, queue rows for ``queue``."""

    status: int
    message: str = ""
    rows: list[dict[str, Any]] = field(default_factory=list)
    agent: bool = False  # answered by a running agent (else read from the log and spool)

    def to_dict(self) -> dict[str, Any]:
        return {"status": self.status, "message": self.message, "rows": self.rows, "agent": self.agent}


class _Refused(MaildropError):
    """A request that cannot be done; ``exit_status`` says why (1 operational, 2 usage)."""


def _usage(msg: str) -> _Refused:
    exc = _Refused(msg)
    exc.exit_status = UsageError.exit_status
    return exc


def resolve(prefix: str, candidates: Iterable[str]) -> str:
    """The one id in ``candidates`` that starts with ``prefix``. Raises a usage error (2) for
    a malformed or ambiguous prefix and an operational one (1) when nothing matches."""
    if not isinstance(prefix, str) or not _PREFIX.fullmatch(prefix):
        raise _usage(f"{prefix!r} is not a transfer id or the start of one (hex digits, as "
                     "'maildrop queue' shows them)")
    found = sorted({c for c in candidates if c.startswith(prefix)})
    if not found:
        raise _Refused(f"no transfer {prefix} here (see 'maildrop queue')")
    if len(found) > 1:
        raise _usage(f"{prefix} matches {len(found)} transfers ({', '.join(f[:12] for f in found[:5])}"
                     f"{' …' if len(found) > 5 else ''}); give more of the id")
    return found[0]


# -- files -------------------------------------------------------------------------------------

def _write(path: Path, data: bytes, *, durable: bool, like: Path | None = None) -> None:
    """Replace ``path`` with ``data``: a temp file beside it, renamed over it (fsynced first,
    and the folder after, when ``durable``). Run as root, the file is given the owner of
    ``like`` (the agent's ``state/``), so the agent can read and replace it."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        if like is not None and os.geteuid() == 0:
            st = like.stat()
            os.fchown(fd, st.st_uid, st.st_gid)
        if durable:
            os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    if durable:
        fsync_dir(path.parent)


def control_dir(state_dir: Path) -> Path:
    """``state/control``, made if missing (owned like ``state/`` when made by root)."""
    folder = state_dir / CONTROL_DIR
    if not folder.is_dir():
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
            if os.geteuid() == 0:
                st = state_dir.stat()
                os.chown(folder, st.st_uid, st.st_gid)
    return folder


class Holds:
    """The persistent set of transfers on hold at this node (``state/holds.json``)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.path = state_dir / HOLDS_FILE

    def load(self) -> dict[str, dict[str, Any]]:
        """``{tid: {"origin": ..., "at": ...}}``; an unreadable file is logged and read as
        empty (the transfers are then offered: say so loudly)."""
        try:
            doc = json.loads(self.path.read_bytes())
            holds = doc["holds"]
            if doc.get("v") != 1 or not isinstance(holds, dict):
                raise ValueError("not a holds file of version 1")
            return {t: v for t, v in holds.items() if isinstance(v, dict)}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.error("control.holds.unreadable path=%s error=%s; no transfer is on hold", self.path, exc)
            return {}

    def save(self, holds: dict[str, dict[str, Any]]) -> None:
        data = json.dumps({"v": 1, "holds": holds}, sort_keys=True).encode()
        _write(self.path, data, durable=True, like=self.state_dir)


# -- queue rows --------------------------------------------------------------------------------

def _row(tid: str, queued: Event | None, state: str, name: str | None, **extra: Any) -> dict[str, Any]:
    """One queue row; ``name`` is the file's name as this node may know it (a sealed
    transfer's only at its origin and destination: None elsewhere)."""
    d = queued.data if queued is not None else {}
    row = {"id": tid, "origin": queued.origin if queued is not None else None,
           "destination": d.get("destination"), "name": name, "size": d.get("size"),
           "queued": queued.ts if queued is not None else None, "state": state, "hop": None,
           "bytes": None, "next_try": None, "last_error": ""}
    row.update(extra)
    return row


def _queued_at(row: dict[str, Any]) -> float:
    try:
        return parse_ts(row["queued"]) if row["queued"] else float("inf")
    except (ValueError, OverflowError):
        return float("inf")


def held_row(t: L.Transfer, queued: Event | None, now: float, policy: L.Policy,
             moving: dict[str, Any] | None = None, name: str | None = None) -> dict[str, Any]:
    """The queue row of a transfer the custody service holds (or receives), from its state
    ``t`` (``moving``: its bytes moving now, if any; ``name``: as ``Custody.name_of`` says).
    ``next_try`` is when it is offered next: now, its ``retry_at``, or (handed) when it
    resends; None while held or in flight."""
    extra: dict[str, Any] = {"last_error": t.reason}
    if t.phase in (L.OFFERING, L.SENDING, L.RECEIVING) and moving is not None:
        extra.update(hop=moving["peer"], bytes=moving["bytes"])
    if t.phase == L.RECEIVING:
        state = "receiving"
        extra.setdefault("hop", t.hop)
    elif t.hold:
        state = "held"
    elif t.phase in (L.OFFERING, L.SENDING):
        state = "in-flight"
        extra.setdefault("hop", t.hop)
    elif t.phase == L.HANDED:
        state = "handed"
        wait = policy.resend_after if t.role == L.ORIGIN else policy.confirm_after
        extra.update(hop=t.hop, next_try=(t.handed_at or now) + wait)
    elif t.phase == L.DELIVERING:
        state = "delivering"
        extra["next_try"] = t.retry_at if t.retry_at != float("inf") else None
    elif t.phase == L.REFUSED or t.retry_at > now:
        state = "deferred"
        extra["next_try"] = t.retry_at if t.phase == L.QUEUED else None
    else:
        state = "queued"
        extra["next_try"] = now
    return _row(t.id, queued, state, name, **extra)


def spool_row(tid: str, custody: Custody, net: Network, holds: dict[str, Any],
              receiving: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """The queue row of a spool entry that is not (or, with no agent, cannot be known to
    be) in custody: from the spool, the log and the holds alone. None for a bare meta."""
    spool, me = custody.spool, custody.me
    queued = custody.queued_event(tid)
    name = custody.name_of(queued)
    if not spool.data(tid).exists():
        if not spool.part(tid).exists():
            return None
        if receiving is not None:
            return _row(tid, queued, "receiving", name, hop=receiving["peer"], bytes=receiving["bytes"])
        return _row(tid, queued, "partial", name, bytes=spool.part_size(tid))
    if queued is None:
        return _row(tid, None, "unknown", None, last_error="its queued event has not arrived yet")
    tr = net.transfer(tid, queued.origin)
    if tr is not None and tr.state in (DELIVERED, FAILED):
        return _row(tid, queued, tr.state, name)
    if queued.data["destination"] == me:
        return _row(tid, queued, "delivering", name)
    if tid in holds:
        return _row(tid, queued, "held", name)
    hops = sorted(n for n, sender in (tr.handoffs if tr is not None else ()) if sender == me)
    if hops:
        return _row(tid, queued, "handed", name, hop=hops[0])
    return _row(tid, queued, "queued", name)


def _sorted(rows: Iterable[dict[str, Any] | None]) -> list[dict[str, Any]]:
    return sorted((r for r in rows if r is not None), key=lambda r: (_queued_at(r), r["id"]))


def _check_cancel(tid: str, origin: str, me: str, net: Network) -> None:
    """Raise unless this node may cancel ``tid`` of ``origin``: only the origin may, and only
    while no end is known."""
    if origin != me:
        raise _Refused(f"{me} is not the origin of {tid} (its origin is {origin}): cancel it "
                       f"there ('maildrop cancel {tid[:12]}' on {origin}); this node drops its "
                       "copy when it learns the origin cancelled it")
    tr = net.transfer(tid, me)
    if tr is not None and tr.state == DELIVERED:
        raise _Refused(f"{tid} was already delivered to {tr.destination}; nothing to cancel")
    if tr is not None and tr.state == FAILED:
        raise _Refused(f"{tid} already failed ({tr.failed}); nothing to cancel")


def _give_up(custody: Custody, tid: str, holds: dict[str, Any], holds_file: Holds) -> Answer:
    """Cancel ``tid`` at its origin (checked by the caller): the file to ``failed/`` with
    reason "cancelled" and ``transfer.failed``; a hold on it is dropped."""
    queued = custody.queued_event(tid)
    had_copy = custody.spool.data(tid).exists()
    custody.expire(tid, "cancelled")
    if holds.pop(tid, None) is not None:
        holds_file.save(holds)
    return _cancelled(tid, custody.name_of(queued) or tid, custody.failed, had_copy)


def _cancelled(tid: str, name: str, failed: Path, had_copy: bool) -> Answer:
    where = (f"{name} is in {failed}/ with its .reason" if had_copy
             else "no copy was here any more")
    return Answer(0, f"cancelled {tid}: {where}; relays drop their copies when they learn it")


def _on_hold(tid: str) -> _Refused:
    return _Refused(f"{tid} is on hold: release it first ('maildrop release {tid[:12]}')")


# -- the agent's side --------------------------------------------------------------------------

class Control:
    """Applies control requests in the running agent (on its main thread, ``poll``).

    Owns ``holds`` (the persistent set, mirrored onto the custody service's transfers as
    ``Hold`` inputs); every change to a transfer is an input to the custody service
    (``custodian``), which owns them. ``policy`` gives the policy in force (a reload may
    replace it).
    """

    def __init__(self, state_dir: Path, custody: Custody, custodian: Custodian,
                 policy: Callable[[], L.Policy]) -> None:
        self.state_dir = state_dir
        self.folder = state_dir / CONTROL_DIR
        self.custody = custody
        self.custodian = custodian
        self.policy = policy
        self._holds_file = Holds(state_dir)
        self.holds: dict[str, dict[str, Any]] = {}

    def start(self) -> None:
        """After recovery, before the relay service starts: apply the saved holds, drop the
        requests a crash left half done (each logged)."""
        control_dir(self.state_dir)
        self.holds = self._holds_file.load()
        self._sync_holds()
        for path in self.folder.glob("*.work"):
            log.warning("control.request.abandoned request=%s (the agent stopped while applying "
                        "it; see 'maildrop queue')", path.stem)
            path.unlink(missing_ok=True)
        if self.holds:
            log.info("control.holds transfers=%d", len(self.holds))

    def poll(self) -> None:
        """Apply every waiting request, oldest first, and tidy the folder. Never raises: a
        failure is logged and the main loop goes on."""
        try:
            names = sorted(os.listdir(self.folder))
        except OSError as exc:
            log.warning("control.poll.failed folder=%s error=%s", self.folder, exc)
            return
        now = time.time()
        for name in names:
            path = self.folder / name
            try:
                if name.endswith(".req") and not name.startswith("."):
                    self._serve(path)
                elif now - path.lstat().st_mtime > LEFTOVER_AFTER:
                    path.unlink()  # an answer nobody read, a temp file of a CLI that died
            except FileNotFoundError:
                continue
            except Exception:
                log.exception("control.request.failed request=%s", name)
        try:
            self._sync_holds()
        except Exception:
            log.exception("control.holds.failed")

    def _serve(self, path: Path) -> None:
        rid = path.name[: -len(".req")]
        work = path.with_name(f"{rid}.work")
        os.rename(path, work)  # claimed; FileNotFoundError: the CLI withdrew it
        req: Any = None
        try:
            req = json.loads(work.read_bytes())
            if not isinstance(req, dict) or req.get("v") != 1:
                raise ValueError("not a request of version 1")
            if float(req["expires"]) < time.time():
                log.info("control.request.expired request=%s op=%s", rid, req.get("op"))
                work.unlink()
                return
            answer = self.apply(req)
        except (ValueError, KeyError, TypeError) as exc:
            answer = Answer(2, f"bad request: {exc}")
        answer.agent = True
        _write(path.with_name(f"{rid}.ack"), json.dumps(answer.to_dict()).encode(), durable=False)
        work.unlink()
        req = req if isinstance(req, dict) else {}
        (log.debug if req.get("op") == "queue" else log.info)(
            "control.applied op=%s transfer=%s status=%d message=%s", req.get("op"),
            req.get("transfer"), answer.status, answer.message)

    def apply(self, req: dict[str, Any]) -> Answer:
        """One request (``op`` one of ``OPS``, ``transfer`` an id or its start, ``all``)."""
        op, prefix, all_ = req["op"], req.get("transfer"), bool(req.get("all"))
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}")
        try:
            if op == "queue":
                return Answer(0, rows=self.rows(time.time()))
            if op == "flush":
                return self._flush(prefix, all_)
            return {"cancel": self._cancel, "hold": self._hold, "release": self._release}[op](prefix)
        except _Refused as exc:
            return Answer(exc.exit_status, str(exc))

    def rows(self, now: float) -> list[dict[str, Any]]:
        custody = self.custody
        held = self.custodian.snapshot()
        with custody.progress_lock:
            moving = {(t, d): p.as_dict() for (t, d), p in custody.progress.items()}
        rows = [held_row(t, q := custody.queued_event(tid), now, self.policy(),
                         moving.get((tid, "in" if t.phase == L.RECEIVING else "out")),
                         custody.name_of(q))
                for tid, t in held.items() if t.phase != L.FORWARDED]
        with custody.log.lock:
            rows += [spool_row(t, custody, custody.log.network, self.holds, moving.get((t, "in")))
                     for t in custody.spool.transfer_ids()
                     if t not in held or held[t].phase == L.FORWARDED]
        return _sorted(rows)

    def _held(self) -> dict[str, L.Transfer]:
        """The transfers the custody service holds (not the ones still arriving)."""
        return {tid: t for tid, t in self.custodian.snapshot().items() if t.phase != L.RECEIVING}

    def _flush(self, prefix: str | None, all_: bool) -> Answer:
        held = self._held()
        flying = (L.OFFERING, L.SENDING)
        if all_:
            todo = [tid for tid, t in held.items() if not t.hold and t.phase not in flying]
            self.custodian.apply_all(todo, L.Flush())
            kept = sum(1 for t in held.values() if t.hold)
            return Answer(0, f"flushing {len(todo)} transfer(s)" + (f"; {kept} on hold stay" if kept else ""))
        t = held[resolve(prefix or "", held)]
        if t.hold:
            raise _on_hold(t.id)
        if t.phase in flying:
            return Answer(0, f"{t.id} is being offered right now")
        self.custodian.apply_all([t.id], L.Flush())
        return Answer(0, f"flushing {t.id}: it is offered now")

    def _cancel(self, prefix: str | None) -> Answer:
        custody = self.custody
        origins = {tid: t.origin for tid, t in self._held().items()}
        with custody.log.lock:
            net = custody.log.network
            own = {t.id for t in net.all_transfers() if t.origin == custody.me}
            tid = resolve(prefix or "", set(origins) | own)
            _check_cancel(tid, origins.get(tid, custody.me), custody.me, net)
        queued = custody.queued_event(tid)
        had_copy = custody.spool.data(tid).exists()
        if tid in origins:
            self.custodian.apply_all([tid], L.Cancel())
        else:  # no copy held here any more: only the fact is left to write
            self.custodian.call(lambda: custody.expire(tid, "cancelled"))
        if self.holds.pop(tid, None) is not None:
            self._holds_file.save(self.holds)
        return _cancelled(tid, custody.name_of(queued) or tid, custody.failed, had_copy)

    def _hold(self, prefix: str | None) -> Answer:
        held = self._held()
        t = held[resolve(prefix or "", held)]
        tid = t.id
        if tid in self.holds:
            return Answer(0, f"{tid} is already on hold")
        self.custodian.apply_all([tid], L.Hold())  # before the save: nothing new is offered
        self.holds[tid] = {"origin": t.origin, "at": time.time()}
        try:
            self._holds_file.save(self.holds)
        except OSError as exc:
            self.custodian.apply_all([tid], L.Release())
            del self.holds[tid]
            raise _Refused(f"cannot save the hold in {self._holds_file.path}: {exc}") from None
        note = "; the offer in flight now finishes" if t.phase in (L.OFFERING, L.SENDING) else ""
        return Answer(0, f"held {tid}: not offered until 'maildrop release {tid[:12]}'{note}")

    def _release(self, prefix: str | None) -> Answer:
        tid = resolve(prefix or "", set(self.custodian.snapshot()) | set(self.holds))
        if tid not in self.holds:
            raise _Refused(f"{tid} is not on hold")
        entry = self.holds.pop(tid)
        try:
            self._holds_file.save(self.holds)
        except OSError as exc:
            self.holds[tid] = entry
            raise _Refused(f"cannot save {self._holds_file.path}: {exc}") from None
        self.custodian.apply_all([tid], L.Release())
        return Answer(0, f"released {tid}: it is offered again")

    def _sync_holds(self) -> None:
        """Mirror ``holds`` onto the custody service; forget holds of transfers that left
        the spool."""
        if not self.holds:
            return
        held = self.custodian.snapshot()
        self.custodian.apply_all([t for t in self.holds if t in held and not held[t].hold], L.Hold())
        gone = [t for t in self.holds if t not in held and not self.custody.spool.data(t).exists()]
        if gone:
            for tid in gone:
                del self.holds[tid]
            self._holds_file.save(self.holds)
            log.info("control.holds.forgotten transfers=%s (no longer here)", ",".join(gone))


# -- the CLI's side ----------------------------------------------------------------------------

class _NoAnswer(MaildropError):
    """The running agent did not answer a request in time."""


class _RootLock:
    """The CLI's handle on ``state/agent.lock``: ``take`` succeeds only while no agent runs."""

    def __init__(self, state_dir: Path) -> None:
        path = state_dir / LOCK_FILE
        try:
            self.fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:  # no agent ever ran here
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            if os.geteuid() == 0:
                st = state_dir.stat()
                os.fchown(self.fd, st.st_uid, st.st_gid)
        self.held = False

    def take(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        self.held = True
        return True

    def holder(self) -> str:
        return os.pread(self.fd, 32, 0).decode(errors="replace").strip() or "?"

    def close(self) -> None:
        os.close(self.fd)  # drops the flock too


def request(config: Config, op: str, transfer: str | None = None, all_: bool = False,
            timeout: float = ACK_TIMEOUT) -> Answer:
    """Do ``op`` (one of ``OPS``) at this node: through the running agent, which answers
    within ``timeout`` s, or (no agent runs) on the log and spool under the agent's lock."""
    try:
        lock = _RootLock(config.state_dir)
    except PermissionError as exc:
        raise MaildropError(f"cannot open {exc.filename}: run this as the agent's user or root") from None
    try:
        if lock.take():
            return _offline(config, op, transfer, all_)
        try:
            return _ask(config, lock, op, transfer, all_, timeout)
        except _NoAnswer as exc:
            if op != "queue":
                return Answer(1, str(exc))
            answer = _offline(config, op, transfer, all_)
            answer.message = f"{exc}; this is what the log and spool say"
            return answer
    except _Refused as exc:
        return Answer(exc.exit_status, str(exc))
    finally:
        lock.close()


def _withdraw(req: Path) -> bool:
    try:
        req.unlink()
        return True
    except FileNotFoundError:
        return False  # the agent has claimed it


def _ask(config: Config, lock: _RootLock, op: str, transfer: str | None, all_: bool,
         timeout: float) -> Answer:
    try:
        folder = control_dir(config.state_dir)
        rid = f"{time.time_ns()}-{secrets.token_hex(4)}"
        req = folder / f"{rid}.req"
        body = {"v": 1, "op": op, "transfer": transfer, "all": all_, "expires": time.time() + timeout}
        _write(req, json.dumps(body).encode(), durable=False, like=config.state_dir)
    except PermissionError as exc:
        raise MaildropError(f"cannot write {exc.filename}: run this as the agent's user or root") from None
    ack = folder / f"{rid}.ack"
    pid = lock.holder()
    deadline = time.monotonic() + timeout
    claimed = False
    while True:
        with contextlib.suppress(FileNotFoundError):
            data = ack.read_bytes()
            ack.unlink()
            d = json.loads(data)
            return Answer(int(d["status"]), str(d["message"]), list(d["rows"]), agent=True)
        if lock.take():  # the agent stopped meanwhile
            if _withdraw(req):
                return _offline(config, op, transfer, all_)
            if ack.exists():
                continue
            raise _NoAnswer("the agent stopped while applying the request; see 'maildrop queue'")
        if time.monotonic() >= deadline:
            if _withdraw(req):
                raise _NoAnswer(f"the agent (pid {pid}) did not pick up the request within "
                                f"{timeout:.0f} s; nothing was changed")
            if claimed:
                raise _NoAnswer(f"the agent (pid {pid}) took the request but did not answer "
                                f"within {timeout:.0f} s; see 'maildrop queue' and its log")
            claimed, deadline = True, deadline + timeout / 2  # it is at work: a little longer
        time.sleep(0.05)


def _offline(config: Config, op: str, transfer: str | None, all_: bool) -> Answer:
    """``op`` with no agent running: the caller holds the agent's lock (or, for ``queue``
    when the agent does not answer, reads only)."""
    from .keys import load_key

    elog = EventLog(config.events_path, pinned={p.id: p.key for p in config.peers},
                    writable=op == "cancel", me=config.node_id)
    outbound: Notices | None = None
    try:
        if op == "cancel":
            key = load_key(config.key_path)
        else:  # only to show the names of sealed transfers: without it they show none
            try:
                key = load_key(config.key_path)
            except ConfigError:
                key = None
        # The key signs only in ``expire`` (a cancel); the other ops read.
        custody = Custody(config.node_id, key, elog, Spool(config.spool), config.inbox,
                          config.failed, max_file_size=config.max_file_size,
                          min_free_space=config.min_free_space)
        if op == "cancel":  # the failure goes by notice to the destination and custodians
            from .agent import NOTICE_AGE_FACTOR

            outbound = Notices(config.state_dir / NOTICES_FILE, max_age=NOTICE_AGE_FACTOR * config.expire_after)
            custody.notify = outbound.send
        holds_file = Holds(config.state_dir)
        holds = holds_file.load()
        net, me = elog.network, config.node_id
        rows = {r["id"]: r for r in _sorted(spool_row(t, custody, net, holds)
                                             for t in custody.spool.transfer_ids())}
        if op == "queue":
            return Answer(0, rows=list(rows.values()))
        here = {t for t, r in rows.items() if r["state"] in ("queued", "handed", "held")}
        if op == "flush":
            if all_:
                return Answer(0, "the agent is not running: every transfer here is offered as "
                                 "soon as it starts (maildrop run, or systemctl start maildrop)")
            tid = resolve(transfer or "", here)
            if tid in holds:
                raise _on_hold(tid)
            return Answer(0, f"the agent is not running: {tid} is offered as soon as it starts "
                             "(maildrop run, or systemctl start maildrop)")
        if op == "hold":
            tid = resolve(transfer or "", here)
            if tid in holds:
                return Answer(0, f"{tid} is already on hold")
            holds[tid] = {"origin": rows[tid]["origin"], "at": time.time()}
            holds_file.save(holds)
            return Answer(0, f"held {tid}: not offered until 'maildrop release {tid[:12]}'")
        if op == "release":
            tid = resolve(transfer or "", here | set(holds))
            if tid not in holds:
                raise _Refused(f"{tid} is not on hold")
            del holds[tid]
            holds_file.save(holds)
            return Answer(0, f"released {tid}: it is offered when the agent starts")
        if op == "cancel":
            origins = {t: r["origin"] for t, r in rows.items() if r["origin"]}
            own = {t.id for t in net.all_transfers() if t.origin == me}
            tid = resolve(transfer or "", set(origins) | own)
            _check_cancel(tid, origins.get(tid, me), me, net)
            return _give_up(custody, tid, holds, holds_file)
        raise ValueError(f"unknown op {op!r}")
    finally:
        if outbound is not None:
            outbound.close()
        elog.close()


__all__ = ["ACK_TIMEOUT", "Answer", "Control", "Holds", "OPS", "STATES", "held_row", "request",
           "resolve", "spool_row"]

