"""
The lease keeper on a fake clock, against an in-memory database that keeps
leases by the rules of the real one (L{mqttsvc.cluster.keeper.LeaseStore}):
expiry by the database's clock (here the test's Clock), epochs that go up
by one per change of owner, NOTIFY on joins, leaves and releases.  Several
keepers share one fake database, and after every step of the clock no site
has two owners.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from mqttsvc.cluster.assignment import assign
from mqttsvc.cluster.keeper import (
    HANDOVER_RATE,
    LEASE_RENEW,
    LEASE_TTL,
    NO_EPOCH,
    STOP_TIMEOUT,
    LeaseKeeper,
    LeaseStore,
)
from tests.conformance import assert_implements

#: The clock's step: every check of "one owner" runs after each.
STEP = 0.05


@attrs.define
class _Instance:
    expires_at: float
    stopping: bool = False


@attrs.define
class _Lease:
    owner: str | None
    epoch: int
    expires_at: float | None


class FakeDatabase:
    """
    The C{mqttsvc_instance} and C{site_lease} tables, with the clock as the
    database's C{now()}, and a journal of what happened to the leases.
    """

    def __init__(self, clock: Clock, enabled: Sequence[str], disabled: Sequence[str] = ()) -> None:
        self.clock = clock
        self.sites = {**dict.fromkeys(enabled, True), **dict.fromkeys(disabled, False)}
        self.instances: dict[str, _Instance] = {}
        self.leases: dict[str, _Lease] = {}
        #: (time, what, instance, site, epoch): "acquire", "release", and the
        #: nodes' "handed" (a hand-over's Deferred fired).
        self.journal: list[tuple[float, str, str, str, int]] = []
        #: The sites of every acquisition request, one list per statement.
        self.acquire_calls: list[list[str]] = []
        self.nodes: list[Node] = []

    def now(self) -> float:
        return self.clock.seconds()

    def live(self, instance: str | None) -> bool:
        row = self.instances.get(instance or "")
        return row is not None and row.expires_at > self.now() and not row.stopping

    def notify(self) -> None:
        # Delivered after the transaction, as NOTIFY is.
        for node in self.nodes:
            node.clock.callLater(0, node.keeper.poke)

    def owner(self, site_id: str) -> str | None:
        lease = self.leases.get(site_id)
        return lease.owner if lease else None

    def check(self) -> None:
        """
        No site has two owners: no two keepers hold it, and no two nodes
        run it (a site being handed over runs until it has stopped).
        """
        for site_id in self.sites:
            # A frozen process holds nothing it could act on; what it holds
            # when it resumes is checked then.
            holders = [n.name for n in self.nodes if n.keeper.owns(site_id) and not n.frozen]
            running = [n.name for n in self.nodes if site_id in n.running and not n.frozen]
            assert len(holders) <= 1, f"at {self.now()}: {site_id} held by {holders}"
            assert len(running) <= 1, f"at {self.now()}: {site_id} runs on {running}"

    def events(self, what: str, instance: str | None = None) -> list[tuple[float, str, int]]:
        return [
            (t, site_id, epoch)
            for t, w, i, site_id, epoch in self.journal
            if w == what and (instance is None or i == instance)
        ]


class FakeLeases:
    """
    One instance's connection to the L{FakeDatabase}: a L{LeaseStore}.
    Each request can be made to fail, or to reach the database late.
    """

    def __init__(self, db: FakeDatabase, clock: Clock) -> None:
        self._db = db
        #: The instance's clock, on which answers reach it.
        self._clock = clock
        self.failing = False
        #: Seconds the next heartbeat takes to reach the database.
        self.heartbeat_latency = 0.0
        #: What each late heartbeat answered when it reached the database.
        self.late_answers: list[dict[str, int]] = []

    def _up(self) -> None:
        if self.failing:
            raise ConnectionError("the database is unreachable")

    async def heartbeat(self, instance: str, ttl: float) -> dict[str, int]:
        self._up()
        if not self.heartbeat_latency:
            return self._heartbeat(instance, ttl)
        latency, self.heartbeat_latency = self.heartbeat_latency, 0.0
        answer: Deferred[dict[str, int]] = Deferred()

        def arrive() -> None:
            # The request was sent: it reaches the database even when the
            # keeper has given up waiting for it.
            held = self._heartbeat(instance, ttl)
            self.late_answers.append(held)
            self._clock.callLater(0, lambda: None if answer.called else answer.callback(held))

        self._db.clock.callLater(latency, arrive)
        return await answer

    def _heartbeat(self, instance: str, ttl: float) -> dict[str, int]:
        db = self._db
        joined = not db.live(instance)
        db.instances[instance] = _Instance(expires_at=db.now() + ttl)
        held = {}
        for site_id, lease in db.leases.items():
            if lease.owner == instance:
                lease.expires_at = db.now() + ttl
                held[site_id] = lease.epoch
        db.journal.append((db.now(), "heartbeat", instance, "", 0))
        if joined:
            db.notify()
        return held

    async def live_instances(self) -> list[str]:
        self._up()
        return sorted(name for name in self._db.instances if self._db.live(name))

    async def enabled_sites(self) -> list[str]:
        self._up()
        return sorted(site_id for site_id, enabled in self._db.sites.items() if enabled)

    async def acquire_many(
        self, instance: str, site_ids: Sequence[str], ttl: float
    ) -> dict[str, int]:
        self._up()
        db = self._db
        db.acquire_calls.append(list(site_ids))
        taken = {}
        for site_id in sorted(site_ids):
            epoch = self._acquire(instance, site_id, ttl)
            if epoch is not None:
                taken[site_id] = epoch
        return taken

    def _acquire(self, instance: str, site_id: str, ttl: float) -> int | None:
        db = self._db
        if site_id not in db.sites:
            return None
        lease = db.leases.setdefault(site_id, _Lease(None, 0, None))
        # The keeper never asks for a lease it holds itself.
        assert not (lease.owner == instance and db.live(instance)), (instance, site_id)
        free = (
            lease.owner is None
            or lease.expires_at is None
            or lease.expires_at <= db.now()
            or not db.live(lease.owner)
        )
        if not free:
            return None
        # At the instant the database hands the lease over, nobody else
        # holds or runs the site.
        for node in db.nodes:
            if node.name != instance and not node.frozen:
                assert not node.keeper.owns(site_id), f"{node.name} still holds {site_id}"
                assert site_id not in node.running or node.frozen, f"{node.name} runs {site_id}"
        lease.owner, lease.epoch, lease.expires_at = instance, lease.epoch + 1, db.now() + ttl
        db.journal.append((db.now(), "acquire", instance, site_id, lease.epoch))
        return lease.epoch

    async def release(self, instance: str, site_ids: Sequence[str]) -> None:
        self._up()
        db = self._db
        for site_id in site_ids:
            lease = db.leases.get(site_id)
            if lease is not None and lease.owner == instance:
                lease.owner, lease.expires_at = None, None
                db.journal.append((db.now(), "release", instance, site_id, lease.epoch))
        db.notify()

    async def leave(self, instance: str) -> None:
        self._up()
        db = self._db
        await self.release(
            instance, [s for s, lease in db.leases.items() if lease.owner == instance]
        )
        if instance in db.instances:
            db.instances[instance].stopping = True
        db.notify()


class Node:
    """
    One instance: its keeper, and the sites it runs as the keeper's
    callbacks start and stop them; a hand-over takes C{stop_time} seconds.
    """

    def __init__(
        self,
        db: FakeDatabase,
        name: str,
        stop_time: float = 0.2,
        clock: Clock | None = None,
        **options: Any,
    ) -> None:
        self.db = db
        self.name = name
        self.stop_time = stop_time
        #: The instance's own clock, when it can be frozen (SIGSTOP).
        self.clock = clock or db.clock
        self.frozen = False
        self.leases = FakeLeases(db, self.clock)
        self.running: dict[str, int] = {}
        self.lost: list[tuple[float, str]] = []
        self.hand_over_starts: list[float] = []
        self.keeper = LeaseKeeper(
            self.clock,
            self.leases,
            name,
            on_acquired=self._acquired,
            on_lost=self._lost,
            hand_over=self._hand_over,
            **options,
        )
        db.nodes.append(self)

    def _acquired(self, site_id: str, epoch: int) -> None:
        assert site_id not in self.running
        self.running[site_id] = epoch

    def _lost(self, site_id: str) -> None:
        self.lost.append((self.db.now(), site_id))
        self.running.pop(site_id, None)

    def _hand_over(self, site_id: str) -> Deferred[None]:
        self.hand_over_starts.append(self.db.now())
        stopped: Deferred[None] = Deferred()

        def done() -> None:
            if self.running.pop(site_id, None) is not None:
                self.db.journal.append(
                    (self.db.now(), "handed", self.name, site_id, self.keeper.epoch(site_id) or 0)
                )
            stopped.callback(None)

        self.clock.callLater(self.stop_time, done)
        return stopped

    def owned(self) -> set[str]:
        return set(self.keeper.owned())


def sites(count: int) -> list[str]:
    return [f"site_{n:03d}" for n in range(count)]


def step(db: FakeDatabase) -> None:
    """
    One step of the database's clock and of every instance's own clock
    that is not frozen; then check that no site has two owners.
    """
    db.clock.advance(STEP)
    for node in db.nodes:
        if node.clock is not db.clock and not node.frozen:
            node.clock.advance(STEP)
    db.check()


def run(db: FakeDatabase, seconds: float) -> None:
    """
    Advance the clocks by C{seconds}, checking after every step that no
    site has two owners.
    """
    for _ in range(round(seconds / STEP)):
        step(db)


def run_until(db: FakeDatabase, done: Callable[[], bool], within: float) -> float:
    """
    Advance (checking) until C{done()}; fail after C{within} seconds.
    Returns the seconds it took.
    """
    start = db.now()
    while not done():
        assert db.now() - start < within, f"not done within {within}s"
        step(db)
    return db.now() - start


def most_in_one_second(times: Sequence[float]) -> int:
    """
    The most of C{times} in any one second (a half-open window).
    """
    ordered = sorted(times)
    return max((sum(1 for u in ordered if t <= u < t + 1.0 - 1e-6) for t in ordered), default=0)


def stop(db: FakeDatabase, node: Node) -> None:
    stopped = node.keeper.stopService()
    finished: list[object] = []
    stopped.addBoth(finished.append)
    run_until(db, lambda: bool(finished), within=3 * STOP_TIMEOUT + 1)
    assert finished == [None]


@pytest.fixture
def clock() -> Clock:
    """
    The test's clock, which is also the fake database's.
    """
    return Clock()


def finish(db: FakeDatabase) -> None:
    """
    Stop every keeper still running; then no delayed call is pending.
    """
    for node in db.nodes:
        if node.keeper.running:
            stop(db, node)
    for clock in {db.clock, *(n.clock for n in db.nodes)}:
        clock.advance(0)
        clock.advance(max((n.stop_time for n in db.nodes), default=0))
        assert clock.getDelayedCalls() == []


def test_the_fake_database_is_a_lease_store() -> None:
    """
    The fake has exactly the Protocol's methods, with its parameters.
    """
    assert_implements(FakeLeases, LeaseStore)


def test_the_defaults_fail_over_within_the_issues_bound() -> None:
    """
    The defaults: a lease lives 8 s and is renewed every 2 s, so a dead
    instance's sites are free after at most a ttl and taken from the next
    round on, 50 a second per survivor: the worst case of docs/cluster.md,
    for the issue's 300 sites and for the benchmark's 1,000 on three
    instances, leaves at least a second for the connects within 15 s.
    """
    assert (LEASE_TTL, LEASE_RENEW, HANDOVER_RATE) == (8.0, 2.0, 50)

    def worst(sites: int, instances: int) -> float:
        dead = math.ceil(sites / instances)
        survivors = instances - 1
        return LEASE_TTL + LEASE_RENEW + math.ceil(dead / (survivors * HANDOVER_RATE)) - 1

    assert worst(300, 3) == 10.0
    assert worst(1000, 3) == 13.0
    assert STOP_TIMEOUT < LEASE_TTL - LEASE_RENEW


def test_bad_timings_are_refused(clock: Clock) -> None:
    """
    A renewal interval that is not shorter than the ttl, or a rate below
    one site a second, is refused when the keeper is built.
    """
    db = FakeDatabase(clock, [])
    with pytest.raises(ValueError, match="renewal interval"):
        Node(db, "a", ttl=2.0, renew_interval=2.0)
    with pytest.raises(ValueError, match="handover_rate"):
        Node(db, "a", handover_rate=0)


def test_one_instance_acquires_every_enabled_site_at_the_rate(clock: Clock) -> None:
    """
    Alone, an instance acquires every enabled site (epoch 1) and no
    disabled one, never more than handover_rate in any second but as many
    as that (not waiting for the next renewal), and keeps them renewed.
    """
    db = FakeDatabase(clock, sites(90), disabled=["off_1", "off_2"])
    node = Node(db, "a")
    node.keeper.startService()
    took = run_until(db, lambda: len(node.running) == 90, within=10)
    assert set(node.running) == set(sites(90))
    assert set(node.running.values()) == {1}
    acquired = [t for t, _, _ in db.events("acquire")]
    assert most_in_one_second(acquired) <= HANDOVER_RATE
    # Paced, not all at once, and at the rate, not one batch per renewal.
    assert 90 // HANDOVER_RATE <= took <= 90 / HANDOVER_RATE + 1
    # The sites of one second are asked for in one statement.
    asked = [len(c) for c in db.acquire_calls]
    assert asked == [HANDOVER_RATE] * (90 // HANDOVER_RATE) + [90 % HANDOVER_RATE] * (
        90 % HANDOVER_RATE > 0
    )
    run(db, 3 * LEASE_TTL)
    assert node.keeper.owned() == dict.fromkeys(sites(90), 1)
    assert node.lost == []
    assert len(db.events("acquire")) == 90
    finish(db)


def test_fence_for_gives_each_sites_epoch(clock: Clock) -> None:
    """
    The fence of a batch names this instance and each site's epoch, with
    NO_EPOCH (rejected by the database) for a site not held here.
    """
    db = FakeDatabase(clock, ["s1", "s2"])
    node = Node(db, "a")
    node.keeper.startService()
    run(db, 1)
    assert node.keeper.fence_for(["s2", "s1", "gone"]) == (
        "a",
        ("gone", "s1", "s2"),
        (NO_EPOCH, 1, 1),
    )
    assert node.keeper.epoch("s1") == 1 and node.keeper.epoch("gone") is None
    finish(db)


def settled(db: FakeDatabase, names: Sequence[str]) -> Callable[[], bool]:
    """
    True once every enabled site runs on its assigned instance among
    C{names}, and nothing is moving.
    """
    enabled = [s for s, on in db.sites.items() if on]

    def check() -> bool:
        owners = assign(enabled, names)
        return all(
            {s for s, o in owners.items() if o == n.name} == set(n.running) == n.owned()
            for n in db.nodes
            if n.name in names
        )

    return check


def test_two_instances_split_the_sites_by_the_assignment(clock: Clock) -> None:
    """
    Two instances started together end with the assignment's split (one
    owner per site throughout), each having acquired at the rate.
    """
    db = FakeDatabase(clock, sites(100))
    a, b = Node(db, "a"), Node(db, "b")
    a.keeper.startService()
    clock.advance(0.5)
    b.keeper.startService()
    run_until(db, settled(db, ["a", "b"]), within=30)
    assert len(a.running) == len(b.running) == 50
    for name in "ab":
        assert most_in_one_second([t for t, _, _ in db.events("acquire", name)]) <= HANDOVER_RATE
    finish(db)


def test_a_joining_instance_takes_its_share_by_clean_hand_over(clock: Clock) -> None:
    """
    A third instance joins two settled ones: it ends with its third of the
    sites; each site that moved was handed over (its Deferred fired) before
    its lease was released, and acquired once, with the next epoch; no
    instance started more than handover_rate hand-overs or acquisitions in
    any second; and no site ever had two owners.
    """
    db = FakeDatabase(clock, sites(150))
    a, b = Node(db, "a"), Node(db, "b")
    a.keeper.startService()
    b.keeper.startService()
    run_until(db, settled(db, ["a", "b"]), within=30)
    before = {s: db.owner(s) for s in sites(150)}
    epochs = {s: db.leases[s].epoch for s in sites(150)}
    joined_at = db.now()
    c = Node(db, "c")
    c.keeper.startService()
    run_until(db, settled(db, ["a", "b", "c"]), within=30)
    assert len(c.running) == 50
    moved = {s for s in sites(150) if db.owner(s) != before[s]}
    assert set(c.running) <= moved
    releases = [(t, s, e) for t, s, e in db.events("release") if t >= joined_at]
    assert {s for _, s, _ in releases} == moved
    handed = {(s, e): t for t, s, e in db.events("handed") if t >= joined_at}
    for t, site_id, epoch in releases:
        assert handed[site_id, epoch] <= t, f"{site_id} released before it was handed over"
    for site_id in sites(150):
        assert db.leases[site_id].epoch == epochs[site_id] + (site_id in moved)
    for node in (a, b):
        assert most_in_one_second(node.hand_over_starts) <= HANDOVER_RATE
    assert most_in_one_second([t for t, _, _ in db.events("acquire", "c")]) <= HANDOVER_RATE
    finish(db)


def test_an_instance_that_cannot_renew_fences_itself_and_the_others_take_over(
    clock: Clock,
) -> None:
    """
    An instance whose heartbeats fail stops all its sites (on_lost) a
    whole ttl after its last successful renewal, and not before; the other
    instance acquires them once their leases have expired, with the next
    epoch, within ttl + one renewal + the paced acquisitions.
    """
    db = FakeDatabase(clock, sites(60))
    a, b = Node(db, "a"), Node(db, "b")
    a.keeper.startService()
    clock.advance(0.5)
    b.keeper.startService()
    run_until(db, settled(db, ["a", "b"]), within=30)
    held = dict(a.keeper.owned())
    run(db, 2 * LEASE_RENEW)  # a renews
    a.leases.failing = True
    failed_at = db.now()
    last_renewal = failed_at - LEASE_RENEW  # renewals come every LEASE_RENEW
    took = run_until(db, lambda: set(b.running) == set(sites(60)), within=30)
    assert sorted(s for _, s in a.lost) == sorted(held)
    fenced_at = {t for t, _ in a.lost}
    assert len(fenced_at) == 1
    assert last_renewal + LEASE_TTL - 1e-6 <= fenced_at.pop() <= failed_at + LEASE_TTL
    assert a.running == {} and a.keeper.owned() == {}
    assert took <= LEASE_TTL + LEASE_RENEW + len(held) / HANDOVER_RATE + 1
    for site_id, epoch in held.items():
        assert b.keeper.epoch(site_id) == epoch + 1
    # The database comes back: a takes its share again, by hand-over.
    a.leases.failing = False
    run_until(db, settled(db, ["a", "b"]), within=30)
    finish(db)


def test_a_renewal_that_arrives_after_the_leases_were_taken_loses_them(clock: Clock) -> None:
    """
    A heartbeat that reaches the database after the leases expired and
    some were taken over: the instance fenced itself (on_lost for every
    site) at the ttl already, and gave up waiting for the answer; the
    leases nobody took are released by its next heartbeat and acquired
    anew with a new epoch, never kept with the old one; the late heartbeat
    renews none of the leases taken over.
    """
    db = FakeDatabase(clock, sites(40))
    a = Node(db, "a")
    b = Node(db, "b", handover_rate=2)
    a.keeper.startService()
    clock.advance(0.5)
    b.keeper.startService()
    run_until(db, settled(db, ["a", "b"]), within=60)
    held = dict(a.keeper.owned())
    sent = db.now()
    # The next heartbeat reaches the database 3 s after the leases expired.
    a.leases.heartbeat_latency = LEASE_TTL + 3
    run_until(db, lambda: len(a.lost) == len(held), within=LEASE_TTL + LEASE_RENEW)
    run_until(db, lambda: a.keeper.owned() != {}, within=3 * LEASE_TTL)
    taken = [s for s in held if db.owner(s) == "b"]
    assert taken and len(taken) < len(held), "some sites, not all, were taken meanwhile"
    run_until(db, lambda: a.leases.late_answers != [], within=LEASE_TTL)
    [late] = a.leases.late_answers
    # Whatever of a's the late heartbeat renewed, a acquired anew since
    # (the taken sites were handed back by b meanwhile): no old epoch.
    assert all(late[s] > held[s] for s in late if s in held), "a lease kept its old epoch"
    assert all(late[s] > held[s] + 1 for s in taken if s in late)
    run_until(db, settled(db, ["a", "b"]), within=60)
    assert sorted(s for _, s in a.lost) == sorted(held)
    for t, site_id, epoch in db.events("acquire", "a"):
        if t > sent and site_id in held:
            assert epoch > held[site_id], f"{site_id} kept its old epoch"
    for site_id, old in held.items():
        assert db.leases[site_id].epoch > old
    finish(db)


def test_a_process_frozen_for_60s_holds_nothing_when_it_resumes(clock: Clock) -> None:
    """
    SIGSTOP for 60 s, then SIGCONT: while it is frozen the other instance
    takes its sites once its leases expire.  From the instant it resumes,
    before any of its timers has run, it holds nothing (owns() is false,
    the fence carries NO_EPOCH, and every epoch it held is stale in the
    database); the renewal it sent before freezing, answered after, is not
    trusted; it stops every site, then rejoins and takes its share again
    by hand-over, with new epochs.
    """
    db = FakeDatabase(clock, sites(40))
    a = Node(db, "a", clock=Clock())
    b = Node(db, "b")
    a.keeper.startService()
    clock.advance(0.5)
    b.keeper.startService()
    run_until(db, settled(db, ["a", "b"]), within=30)
    # Its next heartbeat reaches the database; the process is frozen
    # before the answer reaches it.
    a.leases.heartbeat_latency = 0.1
    run_until(db, lambda: a.leases.heartbeat_latency == 0, within=LEASE_RENEW + STEP)
    a.frozen = True
    held = a.keeper.owned()
    assert held and not a.leases.late_answers
    run(db, 60)
    assert a.leases.late_answers
    assert {db.owner(s) for s in held} == {"b"}
    # SIGCONT: the time has passed, nothing has run yet.
    a.clock.rightNow = db.now()
    a.frozen = False
    assert a.keeper.owned() == {} and not any(a.keeper.owns(s) for s in held)
    assert set(a.keeper.fence_for(held)[2]) == {NO_EPOCH}
    assert all(db.leases[s].epoch > held[s] for s in held)
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mqttsvc.cluster.keeper.LeaseKeeper":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        a.clock.advance(0)
    finally:
        globalLogPublisher.removeObserver(observe)
    db.check()
    assert sorted(s for _, s in a.lost) == sorted(held) and a.running == {}
    assert lines[0] == f"the renewal of a's leases was answered after {LEASE_TTL}s: ignored"
    run_until(db, settled(db, ["a", "b"]), within=30)
    assert all(epoch > held.get(s, 0) for s, epoch in a.keeper.owned().items())
    finish(db)


def test_a_lease_missing_from_the_answer_or_with_another_epoch_is_lost_at_once(
    clock: Clock,
) -> None:
    """
    A lease another live instance took over is absent from the next
    heartbeat's answer, and one that comes back with another epoch was
    acquired again by some other process of the same name: either site is
    lost within one renewal.  The first is not acquired again while the
    other instance holds it; the second is released, not adopted, and then
    acquired anew.
    """
    db = FakeDatabase(clock, sites(4))
    a = Node(db, "a")
    a.keeper.startService()
    run_until(db, lambda: len(a.running) == 4, within=5)
    db.instances["z"] = _Instance(expires_at=db.now() + 1000)
    db.leases["site_002"] = _Lease("z", 2, db.now() + 1000)
    db.leases["site_003"] = _Lease("a", 7, db.now() + LEASE_TTL)
    run(db, LEASE_RENEW)
    assert sorted(s for _, s in a.lost) == ["site_002", "site_003"]
    assert not a.keeper.owns("site_002")
    assert ("release", "site_003", 7) in [(w, s, e) for _, w, _, s, e in db.journal]
    run(db, 5 * LEASE_RENEW)
    assert db.owner("site_002") == "z" and "site_002" not in a.running
    assert a.keeper.epoch("site_003") == 8
    finish(db)


def test_stop_hands_over_then_leaves_and_the_others_acquire_at_once(clock: Clock) -> None:
    """
    A stopping instance hands every site over, then leaves; the others
    acquire its sites on the NOTIFY within 2 s, long before its leases
    would have expired.
    """
    db = FakeDatabase(clock, sites(60))
    a, b, c = Node(db, "a"), Node(db, "b"), Node(db, "c")
    for node in (a, b, c):
        node.keeper.startService()
    run_until(db, settled(db, ["a", "b", "c"]), within=30)
    held = dict(b.keeper.owned())
    stop_at = db.now()
    stop(db, b)
    assert db.now() - stop_at <= b.stop_time + 2 * STEP
    assert b.running == {} and b.lost == []
    released = {s: t for t, s, _ in db.events("release", "b") if t >= stop_at}
    assert set(released) == set(held)
    handed = {s: t for t, s, _ in db.events("handed", "b") if t >= stop_at}
    assert all(handed[s] <= released[s] for s in held)
    took = run_until(db, lambda: all(db.owner(s) in ("a", "c") for s in held), within=2)
    assert took < 2
    run_until(db, settled(db, ["a", "c"]), within=5)
    finish(db)


def test_stop_is_bounded_when_a_site_will_not_stop(clock: Clock) -> None:
    """
    A hand-over that never finishes does not hold the stop: after
    STOP_TIMEOUT the site is dropped (on_lost) and the instance leaves.
    """
    db = FakeDatabase(clock, ["s1", "s2"])
    a = Node(db, "a", stop_time=1000.0)
    a.keeper.startService()
    run_until(db, lambda: len(a.running) == 2, within=5)
    started = db.now()
    stop(db, a)
    assert STOP_TIMEOUT <= db.now() - started <= STOP_TIMEOUT + 1
    assert sorted(s for _, s in a.lost) == ["s1", "s2"]
    assert db.instances["a"].stopping and db.owner("s1") is None
    clock.advance(1000)
    assert clock.getDelayedCalls() == []
