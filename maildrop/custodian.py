"""The custody service: the one owner of every transfer this node deals with.

One thread (``run``) owns ``_transfers`` (transfer id -> ``lifecycle.Transfer``) and changes
it only by ``lifecycle.step``. Everyone else posts: the taker (``taken``), channel handlers
(``admit``, ``commit``, ``receive_failed``), hop workers (``post`` of the answers to an
offer), the gossip loops (``link_changed``), the operator (``call``) and the model
(``kick``: new facts, plan again). A post never waits for the network; ``call`` waits for
the service thread, which itself waits for nobody's thread. The service takes the event
log's lock (planning, appends) and, through ``on_change``, the agent's key lock and the SSH
server's lock: never ``call`` it while holding one of those.

Each turn: take every waiting post, step the transfers they concern, plan (``relay.plan``)
the due ones and, when the model changed or a timer is due, all of them; then carry out the
effects, facts first ("record durably, then act"): reports appended, give-ups, drops,
deliveries (one batch: one append of every receipt), and offers, grouped per hop, handed
to ``dispatch`` (the agent's per-peer lanes). An effect that fails is logged with its
transfer (``relay.action.failed``); the transfer goes back to the state it had and is left
alone for ``BROKEN_RETRY`` s.

Crash: the service holds only soft state. Every fact it acts on is in the log first and
every file step is durable (``transfers``); ``Custody.recover`` rebuilds what is in custody
at start (``adopt``).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, TypeVar

from . import events as E
from . import lifecycle as L
from .admission import Held, Rules, counted, decide
from .eventlog import EventLog
from .events import Event
from .model import DELIVERED
from .relay import plan
from .transfers import Answer, Custody, Offered, Recovered

log = logging.getLogger("maildrop.custody")

BROKEN_RETRY = 10.0  # a transfer whose effect failed is left alone this long
FULL_PLAN_EVERY = 0.5  # at most this often every transfer is planned after a model change
SWEEP_EVERY = 5.0  # how often the spool is checked for partial copies nobody will finish
CALL_TIMEOUT = 30.0

R = TypeVar("R")


class Stopped(RuntimeError):
    """The custody service has stopped (the agent is stopping)."""


@dataclass(frozen=True)
class Job:
    """One offer for a hop worker: answers carry ``token``."""

    transfer: str
    token: int
    passed: tuple[str, ...]
    size: int


class Custodian:
    """The custody service (see the module docstring). ``_transfers``, ``_held`` and
    ``_broken`` are touched by the service thread only; the queue ``_posts`` is the one way
    in. ``rules`` gives the admission rules in force (read at every offer, so a reload
    applies to the next one)."""

    def __init__(self, me: str, custody: Custody, events: EventLog, policy: Callable[[], L.Policy],
                 dispatch: Callable[[str, list[Job]], None],
                 after_sweep: Callable[[], None] = lambda: None,
                 rules: Callable[[], Rules] = Rules) -> None:
        self.me = me
        self.custody = custody
        self.events = events
        self.policy = policy
        self.rules = rules
        self.dispatch = dispatch
        self.after_sweep = after_sweep
        self._posts: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._transfers: dict[str, L.Transfer] = {}  # changed only through ``_keep``
        # origin -> what its relayed transfers hold here (``admission.counted``), kept in
        # step with ``_transfers`` by ``_keep``: the per-origin quotas read it. Soft, like
        # ``_transfers``: after a crash it is rebuilt from what ``adopt`` takes back.
        self._held: dict[str, Held] = {}
        self._broken: dict[str, float] = {}  # transfer id -> when it may be planned again
        # Our own transfers -> the hops we offered them to (soft): told the receipt by
        # notice when it comes, so a hop left with a part lets it go (``_tell_offered``).
        self._offered: dict[str, set[str]] = {}
        self._resuming: set[str] = set()  # deliveries recovered at start (a link may exist)
        self._cutting: set[str] = set()  # arrivals a cut-through forwards now: not planned meanwhile
        self._thread: threading.Thread | None = None
        self._serving = False
        self._stopped = False
        self._last_snapshot: dict[str, L.Transfer] = {}
        self._kicked = True
        self._due: set[str] = set()  # transfers to plan this turn (new or just freed)
        self._next_full = 0.0
        self._next_wake = 0.0
        self._next_sweep = 0.0

    # -- posting (any thread) -----------------------------------------------------------------
    def post(self, tid: str, inp: L.Input) -> None:
        self._posts.put(("input", tid, inp))

    def kick(self) -> None:
        """New facts in the model: plan every transfer again soon."""
        self._posts.put(("kick",))

    def taken(self, queued: list[Event]) -> None:
        """The taker queued these transfers (their events are in the log)."""
        self._posts.put(("taken", queued))

    def cutting(self, tid: str, on: bool) -> None:
        """A cut-through of ``tid`` started (``on``) or ended: while it runs, the service does
        not offer the transfer itself (the hop would answer "busy" and be avoided)."""
        self._posts.put(("cut", tid, on))

    def link_changed(self, peer: str, up: bool) -> None:
        self._posts.put(("link", peer, up))

    def receive_failed(self, tids: Iterable[str], error: str) -> None:
        for tid in tids:
            self.post(tid, L.ReceiveFailed(error))

    def call(self, fn: Callable[[], R], timeout: float = CALL_TIMEOUT) -> R:
        """Run ``fn`` on the service thread and return its result (or raise its exception).
        Before ``serving`` (start-up: one thread) and on the service thread itself it runs at
        once; once the service stopped it raises ``Stopped``."""
        if not self._serving or threading.current_thread() is self._thread:
            return fn()
        if self._stopped:
            raise Stopped("the custody service stopped")
        fut: Future[R] = Future()
        self._posts.put(("call", fn, fut))
        try:
            return fut.result(timeout)
        except TimeoutError:
            fut.cancel()  # not run later, when nobody waits for it any more
            raise

    def serving(self) -> None:
        """From now on every call goes through the service thread (started right after)."""
        self._serving = True

    # -- receiving (channel handler threads, through call) ----------------------------------------
    def admit(self, peer: str, files: list[Offered]) -> list[Answer]:
        return self.call(lambda: [self._admit_one(peer, o) for o in files])

    def commit(self, peer: str, files: list[Offered]) -> list[Answer]:
        return self.call(lambda: self._commit(peer, files))

    def current(self, tid: str, token: int) -> bool:
        """True while the offer ``token`` of ``tid`` is the one under way (hop workers skip
        stale jobs). A single dict read of a frozen value: safe from any thread."""
        t = self._transfers.get(tid)
        return t is not None and t.token == token and t.phase in (L.OFFERING, L.SENDING)

    # -- the service --------------------------------------------------------------------------------
    def adopt(self, recovered: list[Recovered]) -> None:
        """Own what ``Custody.recover`` found in custody (before the service runs)."""
        for r in recovered:
            self._add(r.queued, r.passed, resuming=True)

    def run(self, stop: threading.Event) -> None:
        self._thread = threading.current_thread()
        self._serving = True
        try:
            self._serve(stop)
        finally:
            self._stopped = True
            while True:  # nobody waits for an answer that will not come
                try:
                    post = self._posts.get_nowait()
                except queue.Empty:
                    break
                if post[0] == "call":
                    post[2].set_exception(Stopped("the custody service stopped"))

    def _serve(self, stop: threading.Event) -> None:
        while not stop.is_set():
            now = time.time()
            wake = min(self._next_wake, self._next_sweep, now + 1.0)
            if self._kicked:
                wake = min(wake, self._next_full)
            timeout = max(0.0, wake - now)
            if self._due:
                timeout = 0.0
            try:
                posts = [self._posts.get(timeout=timeout) if timeout else self._posts.get_nowait()]
            except queue.Empty:
                posts = []
            while len(posts) < 20000:
                try:
                    posts.append(self._posts.get_nowait())
                except queue.Empty:
                    break
            self._turn(posts, stop)

    def _turn(self, posts: list[tuple[Any, ...]], stop: threading.Event) -> None:
        effects: list[tuple[str, L.Transfer, L.Effect]] = []
        for post in posts:
            try:
                self._take_post(post, effects)
            except Exception:
                log.exception("custody.post.failed kind=%s", post[0])
        now = time.time()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_EVERY
            try:
                self.custody.sweep(lambda tid: tid in self._transfers)
                self.after_sweep()
            except Exception:
                log.exception("relay.sweep.failed")
        for tid in [t for t, until in self._broken.items() if until <= now]:
            del self._broken[tid]
        full = (self._kicked and now >= self._next_full) or now >= self._next_wake
        try:
            if full or self._due:
                self._plan(now, full, effects)
        except Exception:  # the planner failed: plan each transfer alone, set the bad ones aside
            log.exception("relay.plan.failed; planning one by one")
            self._plan_each(now, effects)
        try:
            self._carry_out(effects)
        except Exception:  # a bug in carrying out must not stop the service
            log.exception("custody.effects.failed effects=%d", len(effects))

    def _take_post(self, post: tuple[Any, ...], effects: list) -> None:
        kind = post[0]
        if kind == "input":
            self._step(post[1], post[2], effects)
        elif kind == "kick":
            self._kicked = True
        elif kind == "taken":
            for ev in post[1]:
                self._add(ev, (), resuming=False, effects=effects)
        elif kind == "cut":
            if post[2]:
                self._cutting.add(post[1])
            else:
                self._cutting.discard(post[1])
                self._due.add(post[1])
        elif kind == "link":
            inp = L.LinkUp(post[1]) if post[2] else L.LinkDown(post[1])
            for tid in list(self._transfers):
                self._step(tid, inp, effects)
        elif kind == "call":
            fn, fut = post[1], post[2]
            if fut.set_running_or_notify_cancel():
                try:
                    fut.set_result(fn())
                except BaseException as exc:
                    fut.set_exception(exc)
                # Let the caller (a channel handler waiting to answer its peer) run now,
                # not after the rest of this turn: the GIL is handed over here.
                time.sleep(0)

    def _add(self, queued: Event, passed: tuple[str, ...], *, resuming: bool,
             effects: list | None = None) -> None:
        d = queued.data
        tid = d["transfer"]
        if tid in self._transfers:
            return
        t, fx = L.held(tid, queued.origin, d["destination"], d["size"],
                       self.custody.queued_at(queued.origin, queued.ts), self.me, passed)
        self._keep(tid, t)
        if resuming and t.role == L.DESTINATION:
            self._resuming.add(tid)
        self._due.add(tid)
        if effects is not None:
            effects.extend((tid, t, e) for e in fx)
        else:
            self._carry_out([(tid, t, e) for e in fx])

    def _keep(self, tid: str, t: L.Transfer | None) -> None:
        """The one way ``_transfers`` changes: ``tid`` becomes ``t`` (None: forgotten), and
        its origin's ``_held`` follows (the transfer counted before is taken out, the new
        one put in), so the quotas never count a transfer twice or one that is gone."""
        old = self._transfers.pop(tid, None) if t is None else self._transfers.get(tid)
        if old is not None and counted(old):
            self._held[old.origin] = self._held[old.origin].plus(-old.size, -1)
            if not self._held[old.origin].transfers:
                del self._held[old.origin]
        if t is not None:
            self._transfers[tid] = t
            if counted(t):
                self._held[t.origin] = self._held.get(t.origin, Held()).plus(t.size)

    def _step(self, tid: str, inp: L.Input, effects: list) -> None:
        t = self._transfers.get(tid)
        if t is None:
            return
        now = time.time()
        new, fx = L.step(t, inp, now, self.policy())
        if new is t:
            return
        if new.phase == L.HANDED and t.phase != L.HANDED:
            log.info("relay.handed transfer=%s to=%s", tid, new.hop)
        if new.ended:
            self._keep(tid, None)
            self._resuming.discard(tid)
            self._tell_offered(new)
        else:
            self._keep(tid, new)
            if new.due(now):
                self._due.add(tid)
            wake = new.wake_at(self.policy())
            if wake is not None:
                self._next_wake = min(self._next_wake, wake)
        effects.extend((tid, t, e) for e in fx)

    def _tell_offered(self, t: L.Transfer) -> None:
        """Our own transfer ended: when delivered, every hop we offered it to (but the
        destination) hears the receipt by notice — one that kept a part of an offer cut
        short lets it go then, instead of after ``stale_after``. A relay's cut offers are
        not followed this way: their parts go as ``stale-part``."""
        hops = self._offered.pop(t.id, set()) - {self.me, t.destination}
        if t.phase != L.DELIVERED or not hops:
            return
        receipts = [e for e in self.custody.log.facts.facts_of(t.id)
                    if e.type == E.TRANSFER_DELIVERED and e.origin == t.destination]
        for hop in sorted(hops):
            for ev in receipts[:1]:
                self.custody.notify(hop, ev)

    def _plan(self, now: float, full: bool, effects: list) -> None:
        policy = self.policy()
        if full:
            todo = [t for tid, t in self._transfers.items()
                    if tid not in self._broken and tid not in self._cutting]
            self._kicked = False
            self._next_full = now + FULL_PLAN_EVERY
        else:
            todo = [self._transfers[tid] for tid in self._due
                    if tid in self._transfers and tid not in self._broken and tid not in self._cutting]
        self._due = set()
        self._plan_these(todo, now, policy, effects)
        if full:
            wakes = [w for tid, t in self._transfers.items()
                     if tid not in self._broken and (w := t.wake_at(policy)) is not None]
            self._next_wake = min(wakes + list(self._broken.values()), default=now + 60.0)
            self._next_wake = max(self._next_wake, now + 0.01)

    def _plan_these(self, todo: list[L.Transfer], now: float, policy: L.Policy, effects: list) -> None:
        """``relay.plan`` over ``todo`` (under the log's lock), each input stepped."""
        with self.events.lock:
            inputs = plan(self.events.network, self.me, todo, now, policy,
                          excluded=self.events.ledger.conflicts)
        for tid, inp in inputs:
            self._step(tid, inp, effects)

    def _plan_each(self, now: float, effects: list) -> None:
        policy = self.policy()
        for tid, t in list(self._transfers.items()):
            if tid in self._broken or tid in self._cutting:
                continue
            try:
                self._plan_these([t], now, policy, effects)
            except Exception:
                log.exception("relay.plan.failed transfer=%s; retried in %.0f s", tid, BROKEN_RETRY)
                self._broken[tid] = now + BROKEN_RETRY
        self._due = set()
        self._kicked = False
        self._next_full = now + FULL_PLAN_EVERY

    # -- effects ------------------------------------------------------------------------------------
    def _carry_out(self, effects: list[tuple[str, L.Transfer, L.Effect]]) -> None:
        """Facts first: reports (one append), then give-ups and drops, deliveries (one batch),
        and last the offers, grouped per hop."""
        reports = [(tid, before, e) for tid, before, e in effects if isinstance(e, L.Report)]
        if reports:
            try:
                evs = self.custody.append([(E.TRANSFER_REFUSED, self._report(tid, e)) for tid, _, e in reports])
                for (tid, before, e), ev in zip(reports, evs, strict=True):
                    log.warning("transfer.refused transfer=%s by=%s reason=%s detail=%s",
                                tid, e.by, e.reason, e.detail)
                    # The origin acts on it, the node that handed it to us routes around us.
                    sender = next((n for n in reversed(before.passed) if n != self.me), None)
                    for to in dict.fromkeys((before.origin, sender)):
                        if to is not None and to != self.me:
                            self.custody.notify(to, ev)
            except Exception:
                for tid, before, e in reports:
                    self._broke(tid, before, e)
        deliveries: list[str] = []
        drops: list[tuple[str, L.Transfer, L.Effect]] = []
        offers: dict[str, list[Job]] = {}
        for tid, before, e in effects:
            if isinstance(e, L.Note):
                log.warning("%s transfer=%s reason=%s", e.key, tid, e.reason)
            elif isinstance(e, L.Fail):
                try:
                    self.custody.expire(tid, e.reason)
                except Exception:
                    self._broke(tid, before, e)
            elif isinstance(e, L.Drop):
                drops.append((tid, before, e))
            elif isinstance(e, L.Deliver):
                deliveries.append(tid)
            elif isinstance(e, L.Offer):
                t = self._transfers.get(tid)
                if t is not None:
                    offers.setdefault(e.hop, []).append(Job(tid, e.token, t.passed, t.size))
                    if t.role == L.ORIGIN:
                        self._offered.setdefault(tid, set()).add(e.hop)
        for tid, _, e in drops:
            self.custody.let_go(tid, e.reason)  # unlinked on the reaper thread
        if deliveries:
            self._deliver(deliveries)
        undone: list[tuple[str, L.Transfer, L.Effect]] = []
        for hop, jobs in offers.items():
            try:
                self.dispatch(hop, jobs)
            except Exception as exc:  # e.g. the peer was removed by a reload, or we stop
                for j in jobs:
                    self._step(j.transfer, L.Broke(j.token, f"not sent: {exc!r}"), undone)
        if undone:
            self._carry_out(undone)

    def _report(self, tid: str, e: L.Report) -> dict[str, Any]:
        t = self._transfers.get(tid)
        origin = t.origin if t is not None else self.me
        return {"transfer": tid, "origin": origin, "by": e.by, "reason": e.reason[:64],
                "detail": e.detail[:500]}

    def _broke(self, tid: str, before: L.Transfer, e: L.Effect) -> None:
        """An effect failed: the transfer goes back to where it was before that step (so the
        step comes again), left alone for ``BROKEN_RETRY`` s. An offer it was answering is
        over: it goes back to ``queued`` (a fresh offer, never a wait for a stale answer)."""
        log.exception("relay.action.failed transfer=%s action=%s; retried in %.0f s",
                      tid, type(e).__name__.lower(), BROKEN_RETRY)
        if before.phase in (L.OFFERING, L.SENDING):
            before = replace(before, phase=L.QUEUED, hop=None, token=before.token + 1,
                             retry_at=time.time() + BROKEN_RETRY)
        self._keep(tid, before)
        self._broken[tid] = time.time() + BROKEN_RETRY
        self._next_wake = min(self._next_wake, self._broken[tid])

    def _deliver(self, tids: list[str]) -> dict[str, str | None]:
        """Deliver the stored copies ``tids`` in one batch and step each with the outcome."""
        queued = {tid: ev for tid in tids if (ev := self.custody.queued_event(tid)) is not None}
        resuming = {tid for tid in tids if tid in self._resuming
                    or (tid in self._transfers and self._transfers[tid].attempts)}
        try:
            out = self.custody.deliver_batch(list(queued.values()), resuming)
        except Exception as exc:
            log.exception("transfer.deliver.failed files=%d", len(queued))
            out = {tid: f"{exc.__class__.__name__}: {exc}" for tid in queued}
        effects: list[tuple[str, L.Transfer, L.Effect]] = []
        for tid in tids:
            error = out.get(tid, "its queued event is missing")
            self._step(tid, L.Delivered() if error is None else L.DeliveryFailed(error), effects)
        self._carry_out(effects)  # the notes of a changed reason (no further delivery)
        return out

    # -- receiving, on the service thread ------------------------------------------------------
    def _admit_one(self, peer: str, o: Offered) -> Answer:
        """This node's word on one offered file (see docs/protocol.md). A claim whose bytes
        are held (a whole copy, or a transfer this service owns) is never replaced by a
        rival's; a rival's mere part is: parts are not custody, and a stale one must not
        block the genuine claim. A whole copy nobody owns (a commit cut short, a claim that
        came late) is adopted here rather than answered "have" for ever. A file that would
        arrive anew is then put to the admission rules (``admission.decide``: ``accept_from``,
        ``relay_for``, and the per-origin quotas over ``_held``, which already count the
        files accepted before it in the same offer)."""
        tid, queued = o.transfer, o.queued
        spool = self.custody.spool
        t = self._transfers.get(tid)
        whole = spool.data(tid).exists()
        here = t is not None or whole or spool.part(tid).exists()
        mine = self.custody.queued_event(tid) if here else None
        if mine is not None and mine.id != queued.id:
            if t is not None or whole:
                return Answer("refuse", reason="conflicting-offer",
                              detail=f"another claim on this transfer id (by {mine.origin}) is held here")
            spool.discard(tid)  # a rival's part: let it go, take the claim offered now
            log.warning("relay.part.replaced transfer=%s claim_of=%s by_claim_of=%s",
                        tid, mine.origin, queued.origin)
        if t is not None and t.phase == L.RECEIVING:
            return Answer("refuse", reason="busy", detail="this transfer is arriving on another channel")
        if t is None and whole and self._open(tid, queued):
            self._add(queued, o.route, resuming=True)
            log.info("spool.adopted transfer=%s origin=%s", tid, queued.origin)
            t = self._transfers.get(tid)
        if t is not None and t.phase == L.DELIVERING and t.reason:
            return Answer("pending", detail=t.reason)
        if t is not None or whole or self._have(tid, queued):
            return Answer("have", facts=self.custody.facts_for_sender(tid))
        d = queued.data
        refusal = decide(self.rules(), self.me, queued.origin, d["destination"], d["size"],
                         self._held.get(queued.origin, Held()))
        if refusal is not None:
            return Answer("refuse", reason=refusal[0], detail=refusal[1])
        offset = spool.part_size(tid)
        if offset > d["size"]:
            offset = 0
        self._keep(tid, L.arriving(tid, queued.origin, d["destination"], d["size"],
                                   self.custody.queued_at(queued.origin, queued.ts),
                                   self.me, peer, offset, o.route))
        self.custody.remember(queued)
        return Answer("accept", offset=offset)

    def _open(self, tid: str, queued: Event) -> bool:
        """True while ``queued``'s claim has no end (neither delivered nor failed), by the
        model or the fact store."""
        return self.custody.ended(tid, queued.origin) is None

    def _have(self, tid: str, queued: Event) -> bool:
        """True when this node has (or had) the bytes by the model: its own file came back
        around, or the receipt or our signed custody is known."""
        if queued.origin == self.me:
            return True
        if self.custody.ended(tid, queued.origin) == DELIVERED:
            return True
        with self.events.lock:
            tr = self.events.network.transfer(tid, queued.origin)
            return tr is not None and self.me in tr.custody

    def _commit(self, peer: str, files: list[Offered]) -> list[Answer]:
        try:
            self.custody.commit_received(peer, files)
        except Exception as exc:
            log.exception("relay.commit.failed peer=%s files=%d", peer, len(files))
            for o in files:
                self._step(o.transfer, L.ReceiveFailed(str(exc)), [])
            return [Answer("refuse", reason="commit-failed", detail=str(exc)[:200]) for _ in files]
        effects: list[tuple[str, L.Transfer, L.Effect]] = []
        for o in files:
            self._step(o.transfer, L.Committed(), effects)
        self._carry_out(effects)  # the destination's deliveries: before "stored"
        out = []
        for o in files:
            t = self._transfers.get(o.transfer)
            if t is not None and t.phase == L.DELIVERING and t.reason:
                out.append(Answer("pending", detail=t.reason))
            else:  # our custody (or, delivered, the receipt) goes back inline
                out.append(Answer("stored", facts=self.custody.facts_for_sender(o.transfer)))
        return out

    # -- what readers see (through call) ----------------------------------------------------------
    def snapshot(self, timeout: float = 2.0) -> dict[str, L.Transfer]:
        """A copy of every transfer's state, taken on the service thread (the last one taken
        when the service does not answer within ``timeout``, e.g. while it stops)."""
        if self._stopped:  # the thread is gone: nobody changes them any more
            return dict(self._transfers)
        with contextlib.suppress(TimeoutError, Stopped):
            self._last_snapshot = self.call(lambda: dict(self._transfers), timeout)
        return self._last_snapshot

    def apply_all(self, tids: Iterable[str], inp: L.Input) -> None:
        """Step each of ``tids`` with the operator's input ``inp`` now, on the service thread,
        and carry out the effects before returning."""
        tids = list(tids)

        def run() -> None:
            effects: list = []
            for tid in tids:
                self._step(tid, inp, effects)
            self._carry_out(effects)
        self.call(run)
