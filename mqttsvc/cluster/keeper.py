"""
The lease keeper: this instance's side of lease-based ownership of sites.

The database decides who owns a site (a lease row with an owner, an epoch
and an expiry computed with the database's own C{now()}); the keeper only
asks it, through the L{LeaseStore} Protocol, every L{LEASE_RENEW} seconds
and whenever it is poked (a NOTIFY that an instance joined or left, or that
leases were released):

  1. heartbeat: renew this instance and every lease it holds; a lease
     missing from the answer (or with another epoch) was taken over and is
     lost (C{on_lost});
  2. plan (L{mqttsvc.cluster.assignment.plan}) with the live instances and
     the enabled sites;
  3. acquire the sites that are this instance's and free, calling
     C{on_acquired(site_id, epoch)};
  4. hand over the sites that are another live instance's (or no longer
     enabled): C{hand_over(site_id)} stops the site cleanly, and once its
     Deferred has fired the lease is released, which NOTIFYs the others.

Acquisitions and hand-overs together start at most C{handover_rate} per
second (any second, not on average): no thundering herd of reconnects when
an instance joins, leaves or dies.

Self-fencing: the keeper's only use of its own clock.  A lease this
instance renewed with a heartbeat sent at local time C{t} expires, by the
database's clock, no earlier than C{t + ttl} (the database's C{now()} is
read after the request was sent).  If no heartbeat has succeeded for a
whole C{ttl}, the keeper calls C{on_lost} for every site it holds and holds
nothing until a heartbeat succeeds again; what was held is released then and
acquired anew, with a new epoch.  Correctness never rests on this: a write
of a site whose epoch is no longer current is rejected by the database's
fence (C{fence_for} gives the writer what to send), whatever the clocks say.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Coroutine, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IDelayedCall
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttsvc.cluster.assignment import plan

#: Seconds a lease (and an instance's heartbeat) lasts without renewal:
#: with the renewal interval and the rate, what keeps a failover of 1,000
#: sites on three instances under 15 s (docs/cluster.md, "Defaults and the
#: worst case").
LEASE_TTL = 8.0
#: Seconds between two renewals: four chances to renew before a lease
#: expires.
LEASE_RENEW = 2.0
#: The most sites one instance acquires or hands over in any one second.
HANDOVER_RATE = 50
#: Seconds the keeper's stop waits for its sites to be handed over, and
#: then again for the database to take its leave: well inside a lease's
#: life (the last renewal is at most LEASE_RENEW old) and inside the
#: process's shutdown deadline (L{mqttsvc.runtime.root.SHUTDOWN_DEADLINE}).
STOP_TIMEOUT = 3.0
#: The epoch the fence is given for a site this instance does not hold: no
#: lease has it (the first acquisition makes epoch 1), so a batch with it is
#: rejected whole.
NO_EPOCH = 0

_T = TypeVar("_T")

#: The span the rate is counted over, in seconds.
_RATE_WINDOW = 1.0
#: Slack when comparing times that a Clock computed by adding floats.
_EPSILON = 1e-9


class LeaseStore(Protocol):
    """
    The leases as the database keeps them (implemented by
    L{mqttsvc.db.leases}); every time in it is the database's.
    """

    async def heartbeat(self, instance: str, ttl: float) -> dict[str, int]:
        """
        In one transaction: upsert the instance row (renewed_at = now(),
        expires_at = now() + ttl, stopping = false) and extend every lease
        it owns to now() + ttl; return site_id -> epoch of every lease it
        still owns (a lease taken over by another instance is absent).
        """
        ...

    async def live_instances(self) -> list[str]:
        """
        Sorted names of the instances whose expires_at > now() and that are
        not stopping.
        """
        ...

    async def enabled_sites(self) -> list[str]:
        """
        Sorted ids of every enabled site (mqtt_connection.is_enabled).
        """
        ...

    async def acquire_many(
        self, instance: str, site_ids: Sequence[str], ttl: float
    ) -> dict[str, int]:
        """
        Take each lease that is free (no row, owner NULL), expired
        (expires_at <= now()), or held by an instance that is not live (no
        live row, or stopping); its epoch goes up by one.  Returns the new
        epoch of each taken; a site another live instance holds (or that is
        gone) is not in it.
        """
        ...

    async def release(self, instance: str, site_ids: Sequence[str]) -> None:
        """
        Give leases up (owner NULL, epoch unchanged) where this instance
        still owns them; NOTIFY.
        """
        ...

    async def leave(self, instance: str) -> None:
        """
        Release every lease of the instance and mark it stopping (or delete
        its row); NOTIFY.
        """
        ...


class LeaseKeeper(Service):
    """
    Keeps this instance's leases: renews them, acquires the sites the
    assignment gives it, hands over the others, and fences itself when it
    cannot renew (see the module's docstring).

    @param leases: the database's leases.
    @param instance: this instance's name, unique among running processes
        (two processes with one name would share leases and epochs).
    @param ttl: seconds a lease lasts without renewal.
    @param renew_interval: seconds between two renewals.
    @param handover_rate: the most sites acquired or handed over per second.
    @param on_acquired: called with a site and its epoch when this instance
        has taken the lease: start the site.
    @param on_lost: called with a site whose lease is no longer this
        instance's (taken over, or not renewed for a whole C{ttl}): stop
        the site at once; its writes are fenced anyway.
    @param hand_over: called with a site to give to another instance: stop
        it cleanly (stop reading, commit and acknowledge what it has,
        disconnect); the lease is released once the Deferred fires.
    """

    log = Logger()
    name = "cluster"

    def __init__(
        self,
        reactor: Any,
        leases: LeaseStore,
        instance: str,
        *,
        ttl: float = LEASE_TTL,
        renew_interval: float = LEASE_RENEW,
        handover_rate: int = HANDOVER_RATE,
        on_acquired: Callable[[str, int], None],
        on_lost: Callable[[str], None],
        hand_over: Callable[[str], Deferred[None]],
    ) -> None:
        if not 0 < renew_interval < ttl:
            raise ValueError(
                f"the renewal interval ({renew_interval}s) must be positive and shorter than "
                f"the lease's ttl ({ttl}s)"
            )
        if handover_rate < 1:
            raise ValueError(f"handover_rate must be at least 1 site a second, not {handover_rate}")
        self._reactor = reactor
        self._leases = leases
        self.instance = instance
        self._ttl = ttl
        self._renew_interval = renew_interval
        self._rate = handover_rate
        self._on_acquired = on_acquired
        self._on_lost = on_lost
        self._hand_over = hand_over
        #: The sites this instance holds, with their epochs; the ones being
        #: handed over are still held (their last batch is fenced with it).
        self._owned: dict[str, int] = {}
        #: Held sites whose hand-over has begun.
        self._handing_over: set[str] = set()
        #: Fires when the hand-over of a site has ended, by site.
        self._handovers: dict[str, Deferred[None]] = {}
        #: Sites no longer held here whose lease is still to be released
        #: (or being released): not acquired again before that is done.
        self._releasing: set[str] = set()
        self._to_release: set[str] = set()
        self._release: Deferred[None] | None = None
        #: Local time until which the last good heartbeat keeps the leases.
        self._renewed_until: float | None = None
        self._fence: IDelayedCall | None = None
        #: Local times of the acquisitions and hand-overs of the last second.
        self._starts: deque[float] = deque()
        self._pacer: IDelayedCall | None = None
        self._round: Deferred[None] | None = None
        self._again = False
        self._failing = False
        self._ticks = LoopingCall(self.poke)
        self._ticks.clock = reactor
        # What the keeper has done since it was built, for /metrics
        # (L{mqttsvc.control.metrics}); counted, never read here.
        #: Heartbeats answered in time (every lease renewed).
        self.renewals_ok = 0
        #: Heartbeats that failed, timed out, or were answered too late.
        self.renewals_failed = 0
        #: Leases taken.
        self.acquisitions = 0
        #: Hand-overs begun (by the plan, or by a clean stop).
        self.handovers = 0
        #: Sites given up at once (C{on_lost}): taken over, self-fenced, or
        #: not handed over within a stop's deadline.
        self.leases_lost = 0
        #: Times the self-fence stopped every site held.
        self.self_fences = 0

    # What the writer and the supervisor ask.

    def owns(self, site_id: str) -> bool:
        """
        Whether this instance holds the site's lease now (also while
        handing it over: its last batch is still written with the lease's
        epoch).  False from the moment a ttl has passed since the last
        renewal was sent, even before the self-fence has run (after a
        freeze the reactor may run other work first).
        """
        return self.epoch(site_id) is not None

    def epoch(self, site_id: str) -> int | None:
        """
        The epoch of the site's lease if this instance holds it now.
        """
        return self._owned.get(site_id) if self._renewed() else None

    def owned(self) -> dict[str, int]:
        """
        Every site this instance holds now, with its epoch.
        """
        return dict(self._owned) if self._renewed() else {}

    def fence_for(self, site_ids: Iterable[str]) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
        """
        What a batch of these sites' writes is fenced with: this instance,
        the sites, and the epoch of each (L{NO_EPOCH} for a site not held
        here now, which the database's fence rejects).
        """
        sites = tuple(sorted(set(site_ids)))
        return self.instance, sites, tuple(self.epoch(s) or NO_EPOCH for s in sites)

    def _renewed(self) -> bool:
        """
        Whether the last renewal still covers the leases, by the local
        clock.
        """
        until = self._renewed_until
        return until is not None and self._reactor.seconds() < until

    # The service.

    def startService(self) -> None:
        super().startService()
        ticking = self._ticks.start(self._renew_interval, now=True)
        ticking.addErrback(lambda f: self.log.failure("the lease renewals stopped", f))

    def poke(self) -> None:
        """
        Renew and re-plan now (or as soon as the round in progress ends):
        another instance joined or left, or leases were released.
        """
        if not self.running:
            return
        if self._round is not None:
            self._again = True
            return
        self._again = False
        self._round = Deferred.fromCoroutine(self._one_round())
        self._round.addErrback(lambda f: self.log.failure("a lease round failed", f))
        self._round.addBoth(self._round_done)

    def _round_done(self, result: object) -> None:
        self._round = None
        if self._again:
            self.poke()

    async def _one_round(self) -> None:
        try:
            await self._renew_and_plan()
        except Exception as e:
            if not self._failing:
                self.log.warn(
                    "the lease round of {instance} failed (its sites stop {ttl}s after the last "
                    "renewal unless one succeeds): {error}",
                    instance=self.instance,
                    ttl=self._ttl,
                    error=str(e).strip() or repr(e),
                )
            self._failing = True

    async def _renew_and_plan(self) -> None:
        sent_at = self._reactor.seconds()
        try:
            held = await self._ask(self._leases.heartbeat(self.instance, self._ttl))
        except Exception:
            self.renewals_failed += 1
            raise
        if not self._take_answer(sent_at, held):
            return
        instances = await self._ask(self._leases.live_instances())
        sites = await self._ask(self._leases.enabled_sites())
        if not self._holding():
            return
        todo = plan(sites, instances, self.instance, self._owned.keys() | self._releasing)
        budget = self._budget()
        acquire = list(todo.acquire)
        hand_over = list(todo.hand_over)
        # The sites of this second, in one statement: all started at once,
        # so the whole budget comes back a second later (one at a time,
        # each after a round trip, they spread over the second, and the
        # budget came back a site at a time, each costing a round).
        batch, acquire = acquire[: max(budget, 0)], acquire[max(budget, 0) :]
        budget -= len(batch)
        self._starts.extend([self._reactor.seconds()] * len(batch))
        taken: dict[str, int] = {}
        if batch:
            taken = await self._ask(self._leases.acquire_many(self.instance, batch, self._ttl))
        if taken and not self._holding():
            # Stopping, or fenced while acquiring: hold nothing new.
            for site_id in sorted(taken):
                self._release_soon(site_id)
            return
        for site_id in batch:
            epoch = taken.get(site_id)
            if epoch is None:
                continue
            self._owned[site_id] = epoch
            self.acquisitions += 1
            self.log.info(
                "{instance} acquired site {site_id} (epoch {epoch})",
                instance=self.instance,
                site_id=site_id,
                epoch=epoch,
            )
            try:
                self._on_acquired(site_id, epoch)
            except Exception:
                self.log.failure("starting acquired site {site_id} failed", site_id=site_id)
        while hand_over and budget > 0:
            site_id = hand_over.pop(0)
            if site_id not in self._owned or site_id in self._handing_over:
                continue  # being handed over or released already, or lost meanwhile
            budget -= 1
            self._starts.append(self._reactor.seconds())
            self._begin_hand_over(site_id)
        if acquire or any(s in self._owned and s not in self._handing_over for s in hand_over):
            self._pace()

    async def _ask(self, request: Coroutine[Any, Any, _T]) -> _T:
        """
        One request to the database, bounded by a ttl so that a connection
        that hangs cannot stop the renewals forever (the request may still
        reach the database: whatever it did is reported by the next
        heartbeat).
        """
        return await Deferred.fromCoroutine(request).addTimeout(self._ttl, self._reactor)

    def _holding(self) -> bool:
        """
        Whether this instance may hold leases now: running, and renewed
        within a ttl.
        """
        return bool(self.running) and self._renewed()

    def _take_answer(self, sent_at: float, held: dict[str, int]) -> bool:
        """
        Take a heartbeat's answer: lose what was taken over, release what
        is held without this keeper knowing it, and re-arm the self-fence.
        False when the answer came too late to be trusted.
        """
        if not self.running:
            return False  # stopping: every site is handed over, then left
        until = sent_at + self._ttl
        if self._reactor.seconds() >= until:
            self.renewals_failed += 1
            self.log.warn(
                "the renewal of {instance}'s leases was answered after {ttl}s: ignored",
                instance=self.instance,
                ttl=self._ttl,
            )
            return False
        if self._failing:
            self.log.info("{instance} renews its leases again", instance=self.instance)
        self._failing = False
        self.renewals_ok += 1
        for site_id, epoch in list(self._owned.items()):
            if held.get(site_id) != epoch:
                self._lose(site_id, "it was taken over")
        for site_id in sorted(held.keys() - self._owned.keys() - self._releasing):
            # Held by this name, but not acquired by this keeper: from a
            # process of the same name before a restart, or from before a
            # self-fence.  Released, not adopted, so that it is acquired
            # anew with a new epoch and whatever wrote with the old one is
            # fenced.
            self._release_soon(site_id)
        self._renewed_until = until
        if self._fence is not None and self._fence.active():
            self._fence.cancel()
        self._fence = self._reactor.callLater(until - self._reactor.seconds(), self._self_fence)
        return True

    def _self_fence(self) -> None:
        self._fence = None
        if not self._owned:
            return
        self.self_fences += 1
        self.log.warn(
            "{instance} has not renewed its leases for {ttl}s: stopping its {count} sites",
            instance=self.instance,
            ttl=self._ttl,
            count=len(self._owned),
        )
        for site_id in sorted(self._owned):
            self._lose(site_id)

    def _lose(self, site_id: str, why: str | None = None) -> None:
        """
        Stop holding the site and say so; C{why} is logged, unless the
        caller logged one line for many sites.
        """
        del self._owned[site_id]
        self._handing_over.discard(site_id)
        self.leases_lost += 1
        if why is not None:
            self.log.warn(
                "{instance} lost site {site_id}: {why}",
                instance=self.instance,
                site_id=site_id,
                why=why,
            )
        try:
            self._on_lost(site_id)
        except Exception:
            self.log.failure("stopping lost site {site_id} failed", site_id=site_id)

    # The rate.

    def _budget(self) -> int:
        now = self._reactor.seconds()
        while self._starts and self._starts[0] + _RATE_WINDOW <= now + _EPSILON:
            self._starts.popleft()
        return self._rate - len(self._starts)

    def _pace(self) -> None:
        """
        Come back for the work left over as soon as the rate allows.
        """
        if self._pacer is not None or not self.running:
            return
        delay = self._starts[0] + _RATE_WINDOW - self._reactor.seconds() if self._starts else 0.0
        self._pacer = self._reactor.callLater(max(delay, 0.0), self._paced)

    def _paced(self) -> None:
        self._pacer = None
        self.poke()

    # Hand-over and release.

    def _begin_hand_over(self, site_id: str) -> None:
        self._handing_over.add(site_id)
        self.handovers += 1
        epoch = self._owned[site_id]
        self.log.info(
            "{instance} hands site {site_id} over", instance=self.instance, site_id=site_id
        )
        try:
            stopped = self._hand_over(site_id)
        except Exception:
            stopped = fail()
        finished: Deferred[None] = Deferred()
        self._handovers[site_id] = finished

        def done(result: object) -> None:
            if self._handovers.get(site_id) is finished:
                del self._handovers[site_id]
            self._handed_over(result, site_id, epoch)
            finished.callback(None)

        stopped.addBoth(done)

    def _handed_over(self, result: object, site_id: str, epoch: int) -> None:
        if isinstance(result, Failure):
            # The lease is released all the same: what the site still
            # writes is fenced by the next owner's epoch.
            self.log.failure(
                "handing site {site_id} over failed; releasing it anyway",
                result,
                site_id=site_id,
            )
        if site_id not in self._handing_over or self._owned.get(site_id) != epoch:
            return  # lost meanwhile: nothing of ours to release
        self._handing_over.discard(site_id)
        del self._owned[site_id]
        self._release_soon(site_id)

    def _release_soon(self, site_id: str) -> None:
        """
        Release the lease with the next release (one at a time, each of
        everything waiting); a release that fails is retried after the next
        heartbeat, which still reports the lease as held.
        """
        self._releasing.add(site_id)
        self._to_release.add(site_id)
        if self._release is None:
            self._release = Deferred.fromCoroutine(self._release_waiting())
            self._release.addErrback(lambda f: self.log.failure("releasing leases failed", f))
            self._release.addBoth(self._release_done)

    async def _release_waiting(self) -> None:
        while self._to_release:
            batch, self._to_release = sorted(self._to_release), set()
            try:
                await self._ask(self._leases.release(self.instance, batch))
            except Exception as e:
                self.log.warn(
                    "releasing {count} leases of {instance} failed (retried after the next "
                    "renewal): {error}",
                    count=len(batch),
                    instance=self.instance,
                    error=str(e).strip(),
                )
            self._releasing.difference_update(batch)

    def _release_done(self, result: object) -> None:
        self._release = None

    # Stopping.

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._ticks.running:
            self._ticks.stop()
        if self._pacer is not None:
            self._pacer.cancel()
            self._pacer = None
        return Deferred.fromCoroutine(self._leave())

    async def _leave(self) -> None:
        # Hand every site over (all at once: the others pace their own
        # acquisitions), then leave, which releases every lease and tells
        # the others.  Each wait is bounded, since a stop has a deadline.
        if self._round is not None:
            await _within(self._reactor, self._round, STOP_TIMEOUT)
        for site_id in sorted(self._owned.keys() - self._handing_over):
            self._begin_hand_over(site_id)
        if self._handovers:
            handed = DeferredList(list(self._handovers.values()))
            if not await _within(self._reactor, handed, STOP_TIMEOUT):
                self.log.warn(
                    "{count} sites of {instance} were not handed over within {timeout}s: "
                    "stopping them now",
                    count=len(self._handovers),
                    instance=self.instance,
                    timeout=STOP_TIMEOUT,
                )
        for site_id in sorted(self._owned):
            self._lose(site_id)
        if self._release is not None:
            await _within(self._reactor, self._release, STOP_TIMEOUT)
        if self._fence is not None and self._fence.active():
            self._fence.cancel()
        self._fence = None
        self._renewed_until = None
        left = Deferred.fromCoroutine(self._leaves())
        if not await _within(self._reactor, left, STOP_TIMEOUT):
            self.log.warn(
                "{instance} could not leave within {timeout}s; its leases expire in {ttl}s",
                instance=self.instance,
                timeout=STOP_TIMEOUT,
                ttl=self._ttl,
            )

    async def _leaves(self) -> None:
        try:
            await self._ask(self._leases.leave(self.instance))
        except Exception as e:
            self.log.warn(
                "{instance} could not leave (its leases expire in {ttl}s): {error}",
                instance=self.instance,
                ttl=self._ttl,
                error=str(e).strip(),
            )
        else:
            self.log.info("{instance} left the cluster", instance=self.instance)


def _within(reactor: Any, d: Deferred[Any], seconds: float) -> Deferred[bool]:
    """
    Fires with True once C{d} has fired, or with False after C{seconds};
    never fails, and leaves C{d}'s result to its own chain.
    """
    done: Deferred[bool] = Deferred()

    def late() -> None:
        done.callback(False)

    timer = reactor.callLater(seconds, late)

    def fired(result: object) -> object:
        if timer.active():
            timer.cancel()
            done.callback(True)
        return result

    d.addBoth(fired)
    return done
