"""
Site leases and fencing (issue 17) against the real PostgreSQL, in a
database of this module's own (so that instance and site lists are exact):
acquisition, renewal, loss and release judged by the database's clock, the
epoch as a fencing token, the NOTIFY that makes the others re-plan, and
the fence that refuses a stale owner's batch whole, ordered against an
acquisition by the lease row's lock.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from typing import Any, cast

import psycopg2
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredQueue, gatherResults
from twisted.internet.task import deferLater

from mqttsvc.db.batch import batch_statements, write_effects
from mqttsvc.db.leases import CHANNEL, Fence, Leases, Member, fenced_sites
from mqttsvc.db.notifications import NotificationListener
from mqttsvc.db.pool import ConnectionPool
from mqttsvc.records import ConnectionEvent, Effect, Reading, StatusUpdate, TopicSeen
from tests.conftest import scratch_database

#: Long enough that no lease of a test expires unless the test expires it.
TTL = 60.0

#: The most a test waits for something that should happen at once.
WAIT = 5.0

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def leases_dsn() -> Iterator[str]:
    """A migrated database for this module, dropped after it."""
    with scratch_database("mqttsvc_leases") as dsn:
        yield dsn


@pytest.fixture
def sql(leases_dsn: str) -> Iterator[Any]:
    """
    A blocking autocommit connection, on a database emptied of sites,
    leases, instances and what earlier tests' batches wrote.
    """
    conn = psycopg2.connect(leases_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "DELETE FROM mqttsvc_instance; DELETE FROM mqtt_connection;"
            " DELETE FROM sensor_reading; DELETE FROM discovered_topic;"
            " DELETE FROM connection_event"
        )
    yield conn
    conn.close()


@pytest_twisted.async_yield_fixture
async def pool(leases_dsn: str, sql: Any) -> AsyncIterator[ConnectionPool]:
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, leases_dsn, size=2)
    yield pool
    pool.close()


@pytest.fixture
def leases(pool: ConnectionPool) -> Leases:
    return Leases(pool)


async def acquire_one(leases: Leases, instance: str, site_id: str, ttl: float) -> int | None:
    """One site's L{Leases.acquire_many}: its new epoch, or None."""
    return (await leases.acquire_many(instance, [site_id], ttl)).get(site_id)


@pytest_twisted.ensureDeferred
async def test_many_leases_in_one_statement(leases: Leases, sql: Any) -> None:
    """
    L{Leases.acquire_many} takes every lease it may in one statement and
    says which: a free one, one of a dead instance and one of its own (a
    new term), not one another live instance holds, nor a site that does
    not exist.
    """
    add_sites(sql, "s1", "s2", "s3", "s4")
    for instance in ("a", "b", "c"):
        await leases.heartbeat(instance, TTL)
    assert await acquire_one(leases, "b", "s2", TTL) == 1
    assert await acquire_one(leases, "c", "s3", TTL) == 1
    assert await acquire_one(leases, "a", "s4", TTL) == 1
    expire_instance(sql, "c")
    taken = await leases.acquire_many("a", ["s4", "s3", "s2", "s1", "nowhere"], TTL)
    assert taken == {"s1": 1, "s3": 2, "s4": 2}
    assert await leases.acquire_many("a", [], TTL) == {}


def run(sql: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sql.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall()) if cur.description else []


def add_sites(sql: Any, *site_ids: str, enabled: bool = True) -> None:
    for site_id in site_ids:
        run(
            sql,
            "INSERT INTO mqtt_connection (site_id, host, is_enabled) VALUES (%s, '127.0.0.1', %s)",
            site_id,
            enabled,
        )


def lease(sql: Any, site_id: str) -> tuple[Any, ...] | None:
    """A lease row's owner and epoch, or None without a row."""
    rows = run(sql, "SELECT owner, epoch FROM site_lease WHERE site_id = %s", site_id)
    return rows[0] if rows else None


def expire_lease(sql: Any, site_id: str) -> None:
    run(
        sql, "UPDATE site_lease SET expires_at = now() - interval '1 s' WHERE site_id = %s", site_id
    )


def expire_instance(sql: Any, instance: str) -> None:
    run(
        sql,
        "UPDATE mqttsvc_instance SET expires_at = now() - interval '1 s' WHERE instance = %s",
        instance,
    )


def readings(sql: Any, *site_ids: str) -> int:
    [(count,)] = run(
        sql, "SELECT count(*) FROM sensor_reading WHERE site_id = ANY (%s)", list(site_ids)
    )
    return int(count)


def batch(*site_ids: str) -> list[Effect]:
    """A message's effects for each site: a topic and a reading."""
    effects: list[Effect] = []
    for site_id in site_ids:
        effects.append(TopicSeen(site_id, f"{site_id}/sensor/s1/data", T0))
        effects.append(Reading(site_id, "s1", T0, "value", 1.0, None, T0))
    return effects


def status(site_id: str) -> StatusUpdate:
    return StatusUpdate(site_id, "connected", T0, 0, None, None)


async def backend_pid(cursor: Any) -> int:
    await cursor.execute("SELECT pg_backend_pid()")
    pid: int = cursor.fetchall()[0][0]
    return pid


async def until_blocked_by(observer: ConnectionPool, pid: int) -> None:
    """
    Wait (at most L{WAIT} seconds) until some statement waits for a lock
    that backend C{pid} holds.
    """
    from twisted.internet import reactor

    deadline = reactor.seconds() + WAIT
    while True:
        [(waiting,)] = await observer.query(
            "SELECT count(*) FROM pg_stat_activity WHERE %s = ANY (pg_blocking_pids(pid))", (pid,)
        )
        if waiting:
            return
        assert reactor.seconds() < deadline, f"nothing waited for backend {pid}"
        await deferLater(reactor, 0.01, lambda: None)


@pytest_twisted.async_yield_fixture
async def notices(leases_dsn: str, sql: Any) -> AsyncIterator[DeferredQueue[str]]:
    """The payloads of NOTIFY mqttsvc_cluster, once listening."""
    from twisted.internet import reactor

    queue: DeferredQueue[str] = DeferredQueue()
    listener = NotificationListener(reactor, leases_dsn, CHANNEL, queue.put, lambda: None)
    await listener.start()
    assert listener.listening
    yield queue
    listener.stop()


async def next_notice(queue: DeferredQueue[str]) -> str:
    from twisted.internet import reactor

    got: Deferred[str] = queue.get()
    return await got.addTimeout(WAIT, reactor)


# Acquisition


@pytest_twisted.ensureDeferred
async def test_a_free_lease_is_acquired_at_epoch_one(leases: Leases, sql: Any) -> None:
    """
    A site nobody ever owned: its lease row is made with epoch 1, expiring
    TTL seconds after the database's now().
    """
    add_sites(sql, "s1")
    await leases.heartbeat("a", TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    assert lease(sql, "s1") == ("a", 1)
    [(left,)] = run(
        sql, "SELECT extract(epoch FROM expires_at - now()) FROM site_lease WHERE site_id = 's1'"
    )
    assert TTL - 5 < left <= TTL


@pytest_twisted.ensureDeferred
async def test_a_live_lease_is_not_acquired_by_another_instance(leases: Leases, sql: Any) -> None:
    """
    While its owner is live and the lease has not expired, another
    instance gets None and the lease (owner, epoch) stays as it was.
    """
    add_sites(sql, "s1")
    await leases.heartbeat("a", TTL)
    await leases.heartbeat("b", TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    assert await acquire_one(leases, "b", "s1", TTL) is None
    assert await acquire_one(leases, "b", "s1", TTL) is None
    assert lease(sql, "s1") == ("a", 1)


@pytest_twisted.ensureDeferred
async def test_an_expired_lease_is_taken_over_by_the_database_clock(
    leases: Leases, sql: Any
) -> None:
    """
    A lease of a tenth of a second: once the database's clock has passed
    it (pg_sleep), another instance takes it with the next epoch.
    """
    add_sites(sql, "s1")
    await leases.heartbeat("a", TTL)
    await leases.heartbeat("b", TTL)
    assert await acquire_one(leases, "a", "s1", 0.1) == 1
    run(sql, "SELECT pg_sleep(0.2)")
    assert await acquire_one(leases, "b", "s1", TTL) == 2
    assert lease(sql, "s1") == ("b", 2)


@pytest_twisted.ensureDeferred
async def test_a_lease_of_an_instance_that_is_not_live_is_taken_over(
    leases: Leases, sql: Any
) -> None:
    """
    A lease that has not expired is taken all the same when its owner's
    row has expired, its owner is stopping, or its owner has no row.
    """
    add_sites(sql, "s1", "s2", "s3")
    for instance in ("a", "b", "c", "d"):
        await leases.heartbeat(instance, TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    assert await acquire_one(leases, "b", "s2", TTL) == 1
    assert await acquire_one(leases, "c", "s3", TTL) == 1
    expire_instance(sql, "a")
    run(sql, "UPDATE mqttsvc_instance SET stopping = true WHERE instance = 'b'")
    run(sql, "DELETE FROM mqttsvc_instance WHERE instance = 'c'")
    assert [await acquire_one(leases, "d", s, TTL) for s in ("s1", "s2", "s3")] == [2, 2, 2]


@pytest_twisted.ensureDeferred
async def test_the_epoch_goes_up_by_one_per_change_of_owner(leases: Leases, sql: Any) -> None:
    """
    a, b, a again, released, then b: epochs 1, 2, 3, 4; refused attempts
    and the release change nothing; a site that does not exist gets None
    and no row.
    """
    add_sites(sql, "s1")
    for instance in ("a", "b"):
        await leases.heartbeat(instance, TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    expire_lease(sql, "s1")
    assert await acquire_one(leases, "b", "s1", TTL) == 2
    assert await acquire_one(leases, "a", "s1", TTL) is None
    expire_lease(sql, "s1")
    assert await acquire_one(leases, "a", "s1", TTL) == 3
    await leases.release("a", ["s1"])
    assert lease(sql, "s1") == (None, 3)
    assert await acquire_one(leases, "b", "s1", TTL) == 4
    assert await acquire_one(leases, "a", "nowhere", TTL) is None
    assert lease(sql, "nowhere") is None


@pytest_twisted.ensureDeferred
async def test_acquiring_a_lease_it_holds_starts_a_new_term(leases: Leases, sql: Any) -> None:
    """
    An instance that acquires a lease it already holds (after it stopped
    the site on its own, say) gets the next epoch, which fences whatever
    it wrote under the old one.
    """
    add_sites(sql, "s1")
    await leases.heartbeat("a", TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    assert await acquire_one(leases, "a", "s1", TTL) == 2
    assert lease(sql, "s1") == ("a", 2)


# Renewal and loss


@pytest_twisted.ensureDeferred
async def test_heartbeat_renews_and_reports_only_the_leases_still_owned(
    leases: Leases, sql: Any
) -> None:
    """
    a owns s1 and s2, b takes s2 over: a's heartbeat answers {s1: 1},
    extends s1 and leaves s2 with b at epoch 2; b's answers {s2: 2}.
    """
    add_sites(sql, "s1", "s2")
    await leases.heartbeat("a", TTL)
    await leases.heartbeat("b", TTL)
    assert await acquire_one(leases, "a", "s1", 1.0) == 1
    assert await acquire_one(leases, "a", "s2", 1.0) == 1
    assert await leases.heartbeat("a", TTL) == {"s1": 1, "s2": 1}
    expire_lease(sql, "s2")
    assert await acquire_one(leases, "b", "s2", TTL) == 2
    run(sql, "UPDATE site_lease SET expires_at = now() WHERE site_id = 's1'")
    assert await leases.heartbeat("a", TTL) == {"s1": 1}
    [(left,)] = run(
        sql, "SELECT extract(epoch FROM expires_at - now()) FROM site_lease WHERE site_id = 's1'"
    )
    assert TTL - 5 < left <= TTL
    assert lease(sql, "s2") == ("b", 2)
    assert await leases.heartbeat("b", TTL) == {"s2": 2}


@pytest_twisted.ensureDeferred
async def test_a_renewal_after_the_lease_expired(leases: Leases, sql: Any) -> None:
    """
    A heartbeat that arrives after a's leases and row expired (a frozen
    instance): s1, which nobody took, is renewed at the same epoch (no one
    else can have written under it); s2, which b took meanwhile, is not
    given back, and a's late heartbeat does not change it.
    """
    add_sites(sql, "s1", "s2")
    await leases.heartbeat("a", 0.1)
    await leases.heartbeat("b", TTL)
    assert await acquire_one(leases, "a", "s1", 0.1) == 1
    assert await acquire_one(leases, "a", "s2", 0.1) == 1
    run(sql, "SELECT pg_sleep(0.2)")
    assert await leases.live_instances() == ["b"]
    assert await acquire_one(leases, "b", "s2", TTL) == 2
    assert await leases.heartbeat("a", TTL) == {"s1": 1}
    assert lease(sql, "s2") == ("b", 2)
    assert await leases.live_instances() == ["a", "b"]


# Release, leave and NOTIFY


@pytest_twisted.ensureDeferred
async def test_release_gives_up_only_its_own_leases_and_notifies(
    leases: Leases, sql: Any, notices: DeferredQueue[str]
) -> None:
    """
    a releases s1 (its own) and s2 (b's): s1 is free at its epoch, s2
    stays b's; the others hear 'a' on mqttsvc_cluster and can take s1 at
    once, with the next epoch.
    """
    add_sites(sql, "s1", "s2")
    await leases.heartbeat("a", TTL)
    assert await next_notice(notices) == "a"
    await leases.heartbeat("b", TTL)
    assert await next_notice(notices) == "b"
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    assert await acquire_one(leases, "b", "s2", TTL) == 1
    await leases.release("a", ["s1", "s2"])
    assert await next_notice(notices) == "a"
    assert lease(sql, "s1") == (None, 1)
    assert lease(sql, "s2") == ("b", 1)
    assert await leases.heartbeat("a", TTL) == {}
    assert await acquire_one(leases, "b", "s1", TTL) == 2


@pytest_twisted.ensureDeferred
async def test_only_joining_and_leaving_notify(
    leases: Leases, sql: Any, notices: DeferredQueue[str]
) -> None:
    """
    The heartbeats of a live instance and an acquisition send nothing:
    after them, the next notification is c joining.  Leaving notifies, and
    so does joining again after leaving or expiring.
    """
    add_sites(sql, "s1")
    await leases.heartbeat("a", TTL)
    assert await next_notice(notices) == "a"
    await leases.heartbeat("a", TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    await leases.heartbeat("a", TTL)
    await leases.heartbeat("c", TTL)
    assert await next_notice(notices) == "c"
    await leases.leave("c")
    assert await next_notice(notices) == "c"
    await leases.heartbeat("c", TTL)
    assert await next_notice(notices) == "c"
    # A write that makes a lapse (an operator's, here) is a leave too.
    expire_instance(sql, "a")
    assert await next_notice(notices) == "a"
    await leases.heartbeat("a", TTL)
    assert await next_notice(notices) == "a"


@pytest_twisted.ensureDeferred
async def test_leave_releases_everything_and_stops_being_live(
    leases: Leases, sql: Any, notices: DeferredQueue[str]
) -> None:
    """
    a leaves: each of its leases is free at its epoch, b's is untouched,
    a is no longer live (one notification, 'a'), and b takes a's sites at
    once.  A later heartbeat of a makes it live again, with a new
    started_at.
    """
    add_sites(sql, "s1", "s2", "s3")
    await leases.heartbeat("a", TTL)
    await leases.heartbeat("b", TTL)
    assert [await next_notice(notices) for _ in range(2)] == ["a", "b"]
    for site_id in ("s1", "s2"):
        assert await acquire_one(leases, "a", site_id, TTL) == 1
    assert await acquire_one(leases, "b", "s3", TTL) == 1
    [(started,)] = run(sql, "SELECT started_at FROM mqttsvc_instance WHERE instance = 'a'")
    await leases.leave("a")
    assert await next_notice(notices) == "a"
    assert notices.pending == []
    assert (lease(sql, "s1"), lease(sql, "s2"), lease(sql, "s3")) == (
        (None, 1),
        (None, 1),
        ("b", 1),
    )
    assert await leases.live_instances() == ["b"]
    assert await acquire_one(leases, "b", "s1", TTL) == 2
    assert await leases.heartbeat("a", TTL) == {}
    assert await leases.live_instances() == ["a", "b"]
    [(restarted,)] = run(sql, "SELECT started_at FROM mqttsvc_instance WHERE instance = 'a'")
    assert restarted > started


# Instances and sites


@pytest_twisted.ensureDeferred
async def test_live_instances_exclude_expired_and_stopping_ones(leases: Leases, sql: Any) -> None:
    """
    Of five instances, the expired one and the one that left are not
    live; the others come sorted in code point order ('B' before 'a').
    """
    for instance in ("a", "B", "expired", "left", "z"):
        await leases.heartbeat(instance, TTL)
    expire_instance(sql, "expired")
    await leases.leave("left")
    assert await leases.live_instances() == ["B", "a", "z"]


@pytest_twisted.ensureDeferred
async def test_enabled_sites(leases: Leases, sql: Any) -> None:
    """Enabled sites only, sorted in code point order."""
    add_sites(sql, "b", "A", "c-1")
    add_sites(sql, "off", enabled=False)
    assert await leases.enabled_sites() == ["A", "b", "c-1"]


@pytest_twisted.ensureDeferred
async def test_instances_list_live_members_with_their_leases(leases: Leases, sql: Any) -> None:
    """
    Live instances with their sites and epochs and ISO 8601 times; an
    expired instance is left out, one without sites has none.
    """
    add_sites(sql, "s1", "s2", "s3")
    for instance in ("a", "b", "gone"):
        await leases.heartbeat(instance, TTL)
    assert await acquire_one(leases, "a", "s2", TTL) == 1
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    assert await acquire_one(leases, "gone", "s3", TTL) == 1
    expire_instance(sql, "gone")
    members = await leases.instances()
    assert [(m.instance, m.sites) for m in members] == [("a", {"s1": 1, "s2": 1}), ("b", {})]
    assert all(isinstance(m, Member) for m in members)
    for m in members:
        for text in (m.started_at, m.renewed_at, m.expires_at):
            assert text.endswith("Z")
            datetime.fromisoformat(text)
        assert m.expires_at > m.renewed_at


@pytest_twisted.ensureDeferred
async def test_deleting_a_site_drops_its_lease(leases: Leases, sql: Any) -> None:
    """
    A site deleted from mqtt_connection loses its lease row (cascade); it
    can no longer be acquired nor renewed.  A renamed site's lease follows
    it.
    """
    add_sites(sql, "s1", "s2")
    await leases.heartbeat("a", TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    assert await acquire_one(leases, "a", "s2", TTL) == 1
    run(sql, "DELETE FROM mqtt_connection WHERE site_id = 's1'")
    assert lease(sql, "s1") is None
    assert await acquire_one(leases, "a", "s1", TTL) is None
    run(sql, "UPDATE mqtt_connection SET site_id = 's2b' WHERE site_id = 's2'")
    assert await leases.heartbeat("a", TTL) == {"s2b": 1}


# Fencing


def test_batch_statements_without_a_fence_are_unchanged() -> None:
    """
    fence=None gives exactly what no fence gives; a fence puts its check
    first, with its parameters first; nothing to write stays None.
    """
    effects = batch("s1", "s2")
    plain = batch_statements(effects, [status("s1")])
    assert plain is not None
    assert batch_statements(effects, [status("s1")], fence=None) == plain
    fenced = batch_statements(effects, [status("s1")], fence=Fence("a", ("s1", "s2"), (3, 4)))
    assert fenced is not None
    assert fenced[0] == "SELECT mqttsvc_fence(%s, %s::text[], %s::bigint[]);\n" + plain[0]
    assert fenced[1] == ["a", '{"s1","s2"}', "{3,4}", *plain[1]]
    assert batch_statements([], fence=Fence("a", ("s1",), (1,))) is None


def test_a_fence_needs_an_epoch_per_site() -> None:
    """Sites and epochs go in pairs; lists become tuples."""
    with pytest.raises(ValueError):
        Fence("a", ("s1", "s2"), (1,))
    assert Fence("a", ["s1"], [1]) == Fence("a", ("s1",), (1,))


@pytest_twisted.ensureDeferred
async def test_a_batch_of_the_current_owner_commits(
    leases: Leases, pool: ConnectionPool, sql: Any
) -> None:
    """Fenced with the owner and epochs of now, everything commits."""
    add_sites(sql, "s1", "s2")
    await leases.heartbeat("a", TTL)
    e1 = await acquire_one(leases, "a", "s1", TTL)
    expire_lease(sql, "s1")
    assert await acquire_one(leases, "a", "s1", TTL) == 2
    e2 = await acquire_one(leases, "a", "s2", TTL)
    assert (e1, e2) == (1, 1)
    await write_effects(
        pool.operation,
        batch("s1", "s2"),
        [status("s1")],
        [ConnectionEvent("s1", T0, "connecting", "connected", None)],
        fence=Fence("a", ("s1", "s2"), (2, 1)),
    )
    assert readings(sql, "s1", "s2") == 2
    assert run(sql, "SELECT status FROM mqtt_connection WHERE site_id = 's1'") == [("connected",)]


@pytest_twisted.ensureDeferred
async def test_a_stale_batch_is_refused_whole(
    leases: Leases, pool: ConnectionPool, sql: Any
) -> None:
    """
    A batch for s1 (still a's, epoch 1), s2 (taken over by b: epoch 2) and
    s3 (never acquired) raises; fenced_sites names exactly s2 and s3, and
    nothing of the batch is committed, s1's rows included.  The same batch
    fenced as another instance names every site.
    """
    add_sites(sql, "s1", "s2", "s3")
    await leases.heartbeat("a", TTL)
    await leases.heartbeat("b", TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    assert await acquire_one(leases, "a", "s2", TTL) == 1
    expire_lease(sql, "s2")
    assert await acquire_one(leases, "b", "s2", TTL) == 2
    effects = batch("s1", "s2", "s3")
    statuses = [status("s1"), status("s2")]
    events = [ConnectionEvent("s1", T0, "connecting", "connected", None)]
    with pytest.raises(psycopg2.Error) as stale:
        await write_effects(
            pool.operation,
            effects,
            statuses,
            events,
            fence=Fence("a", ("s1", "s2", "s3"), (1, 1, 1)),
        )
    assert fenced_sites(stale.value) == ["s2", "s3"]
    assert stale.value.pgcode == "MQFNC"
    with pytest.raises(psycopg2.Error) as other:
        await write_effects(
            pool.operation, effects, statuses, fence=Fence("c", ("s1", "s2"), (1, 2))
        )
    assert fenced_sites(other.value) == ["s1", "s2"]
    assert readings(sql, "s1", "s2", "s3") == 0
    assert run(sql, "SELECT count(*) FROM discovered_topic") == [(0,)]
    assert run(sql, "SELECT count(*) FROM connection_event") == [(0,)]
    assert run(sql, "SELECT DISTINCT status FROM mqtt_connection") == [("disconnected",)]


@pytest_twisted.ensureDeferred
async def test_fenced_sites_of_any_other_error_is_none(pool: ConnectionPool) -> None:
    """Another database error, or no database error at all, is not a fence's."""
    with pytest.raises(psycopg2.Error) as error:
        await pool.query("SELECT 1/0")
    assert fenced_sites(error.value) is None
    assert fenced_sites(ValueError("fenced")) is None


@pytest_twisted.ensureDeferred
async def test_an_acquisition_waits_for_an_old_owners_batch_in_flight(
    leases_dsn: str, leases: Leases, sql: Any
) -> None:
    """
    While a's fenced batch is in an open transaction (a's row and lease
    expired meanwhile), b's acquire waits on the lease row's lock; the
    batch commits, then b's acquire takes the lease at the next epoch.
    So no batch of the old epoch can commit after the new owner holds it.
    """
    from twisted.internet import reactor

    add_sites(sql, "s1")
    await leases.heartbeat("a", TTL)
    await leases.heartbeat("b", TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    expire_lease(sql, "s1")
    expire_instance(sql, "a")
    writer = ConnectionPool(reactor, leases_dsn, size=1)
    observer = ConnectionPool(reactor, leases_dsn, size=1)
    commit: Deferred[None] = Deferred()
    in_flight: Deferred[int] = Deferred()

    async def old_owner(cursor: Any) -> None:
        await write_effects(cursor.execute, batch("s1"), fence=Fence("a", ("s1",), (1,)))
        in_flight.callback(await backend_pid(cursor))
        await commit

    try:
        written = Deferred.fromCoroutine(writer.transaction(old_owner))
        pid = await in_flight.addTimeout(WAIT, reactor)
        taken = Deferred.fromCoroutine(acquire_one(leases, "b", "s1", TTL))
        await until_blocked_by(observer, pid)
        assert not taken.called
        commit.callback(None)
        await written.addTimeout(WAIT, reactor)
        assert await taken.addTimeout(WAIT, reactor) == 2
    finally:
        writer.close()
        observer.close()
    assert readings(sql, "s1") == 1
    assert lease(sql, "s1") == ("b", 2)


@pytest_twisted.ensureDeferred
async def test_a_batch_waits_for_an_acquisition_in_progress_then_is_fenced(
    leases_dsn: str, leases: Leases, pool: ConnectionPool, sql: Any
) -> None:
    """
    While b's acquisition of s1 (the row updated, not yet committed) is
    in flight, a's batch waits on the row; b commits, and the batch sees
    the new epoch: refused, nothing of it committed.
    """
    from twisted.internet import reactor

    add_sites(sql, "s1")
    await leases.heartbeat("a", TTL)
    assert await acquire_one(leases, "a", "s1", TTL) == 1
    acquirer = ConnectionPool(reactor, leases_dsn, size=1)
    observer = ConnectionPool(reactor, leases_dsn, size=1)
    commit: Deferred[None] = Deferred()
    in_flight: Deferred[int] = Deferred()

    async def acquisition(cursor: Any) -> None:
        # As acquire's statement leaves the row until it commits.
        await cursor.execute(
            "UPDATE site_lease SET owner = 'b', epoch = epoch + 1 WHERE site_id = 's1'"
        )
        in_flight.callback(await backend_pid(cursor))
        await commit

    try:
        taking = Deferred.fromCoroutine(acquirer.transaction(acquisition))
        pid = await in_flight.addTimeout(WAIT, reactor)
        written = Deferred.fromCoroutine(
            write_effects(pool.operation, batch("s1"), fence=Fence("a", ("s1",), (1,)))
        )
        await until_blocked_by(observer, pid)
        assert not written.called
        commit.callback(None)
        await taking.addTimeout(WAIT, reactor)
        with pytest.raises(psycopg2.Error) as fenced:
            await written.addTimeout(WAIT, reactor)
    finally:
        acquirer.close()
        observer.close()
    assert fenced_sites(fenced.value) == ["s1"]
    assert readings(sql, "s1") == 0
    assert lease(sql, "s1") == ("b", 2)


@pytest_twisted.ensureDeferred
async def test_heartbeats_and_batches_of_many_sites_never_deadlock(
    leases_dsn: str, leases: Leases, sql: Any
) -> None:
    """
    Fifty sites whose lease rows lie in reverse site order on disk: thirty
    heartbeats of a run while three connections write twenty fenced
    batches of all fifty sites each.  Heartbeats and batches lock the rows
    in site order, so every one of them succeeds (a deadlock would abort
    one after deadlock_timeout).
    """
    from twisted.internet import reactor

    site_ids = [f"s{i:02}" for i in range(50)]
    add_sites(sql, *reversed(site_ids))
    await leases.heartbeat("a", TTL)
    for site_id in reversed(site_ids):
        assert await acquire_one(leases, "a", site_id, TTL) == 1
    writers = ConnectionPool(reactor, leases_dsn, size=3)
    fence = Fence("a", tuple(site_ids), (1,) * len(site_ids))

    async def write() -> None:
        for _ in range(20):
            await write_effects(writers.operation, batch(*site_ids), fence=fence)

    async def beat() -> None:
        for _ in range(30):
            assert await leases.heartbeat("a", TTL) == dict.fromkeys(site_ids, 1)

    try:
        work = [Deferred.fromCoroutine(write()) for _ in range(3)]
        work.append(Deferred.fromCoroutine(beat()))
        await gatherResults(work, consumeErrors=True).addTimeout(WAIT * 6, reactor)
    finally:
        writers.close()
    assert readings(sql, *site_ids) == len(site_ids)


def test_the_repository_is_the_keepers_lease_store() -> None:
    """
    The database's leases are what the cluster room's keeper was written
    against: the Protocol's methods with its parameters (and, beyond them,
    only C{instances} for C{cluster.status}).
    """
    from mqttsvc.cluster.keeper import LeaseStore
    from tests.conformance import assert_implements

    assert_implements(Leases, LeaseStore, extra=("instances",))


class _Recording:
    """The pool, recording how each call of the leases reaches the database."""

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool
        self.calls: list[str] = []

    async def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        self.calls.append("query")
        return await self._pool.query(sql, params)

    async def operation(self, sql: str, params: Any = None) -> None:
        self.calls.append("operation")
        await self._pool.operation(sql, params)

    async def transaction(self, work: Any) -> Any:
        self.calls.append("transaction")
        return await self._pool.transaction(work)


@pytest_twisted.ensureDeferred
async def test_every_change_of_leases_is_one_query(pool: ConnectionPool, sql: Any) -> None:
    """
    A heartbeat, an acquisition, a release and a leave each reach the
    database as one query (its statements one implicit transaction, begun
    and ended by the server), never as an explicit transaction of several
    round trips: a process frozen between two of those (SIGSTOP, a long GC
    pause) kept the lease rows it had locked until its connection died,
    hours later, and every other instance's acquisition of them waited as
    long, its renewals with it, until it fenced itself.  Each still does
    all of its work.
    """
    recording = _Recording(pool)
    leases = Leases(cast(ConnectionPool, recording))
    add_sites(sql, "s", "t")

    async def one_call(work: Any) -> Any:
        del recording.calls[:]
        result = await work
        assert len(recording.calls) == 1 and recording.calls != ["transaction"], recording.calls
        return result

    assert await one_call(leases.heartbeat("a", TTL)) == {}
    assert await one_call(leases.acquire_many("a", ["s"], TTL)) == {"s": 1}
    assert await one_call(leases.acquire_many("a", ["t", "nowhere"], TTL)) == {"t": 1}
    assert await one_call(leases.heartbeat("a", TTL)) == {"s": 1, "t": 1}
    await one_call(leases.release("a", ["s"]))
    assert lease(sql, "s") == (None, 1)
    await one_call(leases.leave("a"))
    assert lease(sql, "t") == (None, 1)
    assert run(sql, "SELECT stopping FROM mqttsvc_instance WHERE instance = 'a'") == [(True,)]
