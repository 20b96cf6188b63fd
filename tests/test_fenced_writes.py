"""
Fenced writes (issue 17) against the real PostgreSQL, in a database of this
module's own: instance a's ingest writes its sites' batches under their
leases' epochs, taken through L{mqttsvc.db.leases.Leases}; once instance b
has taken a site over, a's batch commits nothing of that site and
acknowledges none of its messages, and everything of a's other sites
commits at once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Collection, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import pytest
import pytest_twisted

from mqttsvc.db.leases import Fence, Leases
from mqttsvc.db.pool import ConnectionPool
from mqttsvc.ingest.service import Ingest
from mqttsvc.records import (
    ConnectionEvent,
    DeviceKey,
    Effect,
    Reading,
    StatusUpdate,
    TopicSeen,
)
from tests.conftest import scratch_database
from tests.test_leases import acquire_one

#: Long enough that no lease of a test expires unless the test expires it.
TTL = 60.0

#: The most a test waits for the writer to finish what it holds.
WAIT = 10.0

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def fenced_dsn() -> Iterator[str]:
    """A migrated database for this module, dropped after it."""
    with scratch_database("mqttsvc_fenced") as dsn:
        yield dsn


@pytest.fixture
def sql(fenced_dsn: str) -> Iterator[Any]:
    """A blocking autocommit connection, on a database emptied of sites and instances."""
    conn = psycopg2.connect(fenced_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        # Deleting the sites deletes their leases and rows.
        cur.execute("DELETE FROM mqttsvc_instance; DELETE FROM mqtt_connection")
    yield conn
    conn.close()


@pytest_twisted.async_yield_fixture
async def pool(fenced_dsn: str, sql: Any) -> AsyncIterator[ConnectionPool]:
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, fenced_dsn, size=3)
    yield pool
    pool.close()


def run(sql: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sql.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall()) if cur.description else []


class _NoDevices:
    """Known devices of earlier runs: none (liveness is not started here)."""

    async def known(self) -> AsyncIterator[list[tuple[DeviceKey, str, float | None, str | None]]]:
        return
        yield


class _Site:
    """A commit listener: which of its messages were acknowledged."""

    def __init__(self) -> None:
        self.acknowledged: list[Any] = []
        self.holds: list[bool] = []

    def committed(self, messages: list[Any]) -> None:
        self.acknowledged += messages

    def hold(self, holding: bool) -> None:
        self.holds.append(holding)


class _Instance:
    """
    Instance a as its lease keeper would fence its writes: the epochs it
    acquired (L{mqttsvc.cluster.keeper.LeaseKeeper.fence_for}: 0 for a
    site it does not hold).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.epochs: dict[str, int] = {}
        self.fenced: list[list[str]] = []

    def fence(self, site_ids: Collection[str]) -> Fence:
        ordered = sorted(site_ids)
        return Fence(self.name, ordered, [self.epochs.get(s, 0) for s in ordered])


def message(site_id: str, n: int) -> list[Effect]:
    """One message's effects: its topic and a reading at T0 + n seconds."""
    at = T0 + timedelta(seconds=n)
    return [
        TopicSeen(site_id, f"{site_id}/sensor/s1/data", at),
        Reading(site_id, "s1", at, "value", float(n), "V", at),
    ]


def report(ingest: Ingest, site_id: str, error: str) -> None:
    """A site's status (with error as its last_error) and its event."""
    ingest.site_reported(
        StatusUpdate(site_id, "connected", T0, 0, None, error),
        ConnectionEvent(site_id, T0, "connecting", "connected", error),
    )


def counts(sql: Any, site_id: str) -> dict[str, Any]:
    """What a site's writes left: readings, topic count, events, last_error."""
    [(readings,)] = run(sql, "SELECT count(*) FROM sensor_reading WHERE site_id = %s", site_id)
    topics = run(sql, "SELECT message_count FROM discovered_topic WHERE site_id = %s", site_id)
    events = run(sql, "SELECT reason FROM connection_event WHERE site_id = %s ORDER BY id", site_id)
    [(last_error,)] = run(sql, "SELECT last_error FROM mqtt_connection WHERE site_id = %s", site_id)
    return {
        "readings": readings,
        "topic count": topics[0][0] if topics else 0,
        "events": [reason for (reason,) in events],
        "last_error": last_error,
    }


@pytest_twisted.ensureDeferred
async def test_a_batch_of_a_site_taken_over_commits_nothing_of_it(
    pool: ConnectionPool, sql: Any
) -> None:
    """
    Instance a owns s and t (epoch 1 each, acquired through Leases) and
    writes them through Ingest with its fence: its batch commits and is
    acknowledged.  Then b acquires s (epoch 2).  a's next batch, one
    batch of messages, statuses and events of s and t (both sites in one
    lane), commits t's rows and nothing of s, acknowledges t's messages
    and none of s's, tells on_fenced ['s'] once, and holds no bytes after.
    """
    from twisted.internet import reactor

    a, b = _Instance("a"), _Instance("b")
    leases = Leases(pool)
    ingest = Ingest(
        reactor,
        pool,
        _NoDevices(),
        lanes=2,
        repair_interval=3600.0,
        fence=a.fence,
        on_fenced=a.fenced.append,
    )
    writer = ingest.writer
    s = "fs-0"
    t = next(f"fs-{i}" for i in range(1, 100) if writer.lane(f"fs-{i}") is writer.lane(s))
    for site_id in (s, t):
        run(sql, "INSERT INTO mqtt_connection (site_id, host) VALUES (%s, '127.0.0.1')", site_id)
    await leases.heartbeat(a.name, TTL)
    await leases.heartbeat(b.name, TTL)
    for site_id in (s, t):
        epoch = await acquire_one(leases, a.name, site_id, TTL)
        assert epoch == 1
        a.epochs[site_id] = epoch
    s_site, t_site = _Site(), _Site()

    # a's first batch: its own sites, its own epochs.
    for n in range(3):
        writer.queue(message(s, n), s_site, ("s", n))
        writer.queue(message(t, n), t_site, ("t", n))
    report(ingest, s, "first")
    report(ingest, t, "first")
    await writer.when_idle().addTimeout(WAIT, reactor)
    assert s_site.acknowledged == [("s", 0), ("s", 1), ("s", 2)]
    assert t_site.acknowledged == [("t", 0), ("t", 1), ("t", 2)]
    first = {"readings": 3, "topic count": 3, "events": ["first"], "last_error": "first"}
    assert counts(sql, s) == first and counts(sql, t) == first
    assert a.fenced == [] and writer.batches_fenced == 0

    # b takes s over (a's lease expired): epoch 2.
    run(sql, "UPDATE site_lease SET expires_at = now() WHERE site_id = %s", s)
    assert await acquire_one(leases, b.name, s, TTL) == 2

    for n in range(3, 6):
        writer.queue(message(s, n), s_site, ("s", n))
        writer.queue(message(t, n), t_site, ("t", n))
    report(ingest, s, "stale")
    report(ingest, t, "second")
    assert writer.lane(s).queued == 6
    await writer.when_idle().addTimeout(WAIT, reactor)

    assert a.fenced == [[s]]
    assert s_site.acknowledged == [("s", 0), ("s", 1), ("s", 2)]
    assert t_site.acknowledged == [("t", n) for n in range(6)]
    assert counts(sql, s) == first
    assert counts(sql, t) == {
        "readings": 6,
        "topic count": 6,
        "events": ["first", "second"],
        "last_error": "second",
    }
    assert writer.batches_fenced == 1 and writer.messages_fenced == 3
    assert writer.bytes_held == 0 and writer.queued == 0
    assert writer.failing() == []
    assert run(sql, "SELECT owner, epoch FROM site_lease WHERE site_id = %s", s) == [("b", 2)]
    writer.stop()


@pytest_twisted.ensureDeferred
async def test_without_a_fence_the_leases_do_not_matter(pool: ConnectionPool, sql: Any) -> None:
    """
    An Ingest built without a fence (an instance alone, without
    --cluster) writes and acknowledges as before, even for a site whose
    lease another instance holds: nothing of the cluster reaches it.
    """
    from twisted.internet import reactor

    leases = Leases(pool)
    ingest = Ingest(reactor, pool, _NoDevices(), lanes=2, repair_interval=3600.0)
    writer = ingest.writer
    s = "alone-0"
    run(sql, "INSERT INTO mqtt_connection (site_id, host) VALUES (%s, '127.0.0.1')", s)
    await leases.heartbeat("b", TTL)
    assert await acquire_one(leases, "b", s, TTL) == 1
    site = _Site()
    writer.queue(message(s, 0), site, 0)
    report(ingest, s, "alone")
    await writer.when_idle().addTimeout(WAIT, reactor)
    assert site.acknowledged == [0]
    assert counts(sql, s) == {
        "readings": 1,
        "topic count": 1,
        "events": ["alone"],
        "last_error": "alone",
    }
    assert writer.batches_fenced == 0
    writer.stop()


def ledger(sql: Any, site_id: str) -> list[tuple[int, str]]:
    """The (epoch, instance) rows of a site's writer ledger, in order."""
    rows = run(
        sql, "SELECT epoch, instance FROM site_writer WHERE site_id = %s ORDER BY 1, 2", site_id
    )
    return [(epoch, instance) for epoch, instance in rows]


@pytest_twisted.ensureDeferred
async def test_the_ledger_names_the_writer_of_each_epoch(pool: ConnectionPool, sql: Any) -> None:
    """
    The fence records in C{site_writer}, inside the batch's transaction,
    which instance committed for a site under which epoch (the lease's):
    one row however many batches commit under it.  A batch refused for a
    stale epoch leaves no row, neither under its own epoch nor the
    lease's; the new owner's first batch adds its own under the new epoch.
    """
    from twisted.internet import reactor

    a, b = _Instance("a"), _Instance("b")
    leases = Leases(pool)

    def ingest(instance: _Instance) -> Ingest:
        return Ingest(
            reactor,
            pool,
            _NoDevices(),
            lanes=1,
            repair_interval=3600.0,
            fence=instance.fence,
            on_fenced=instance.fenced.append,
        )

    a_writer, b_writer = ingest(a).writer, ingest(b).writer
    s = "ledger-0"
    run(sql, "INSERT INTO mqtt_connection (site_id, host) VALUES (%s, '127.0.0.1')", s)
    await leases.heartbeat(a.name, TTL)
    await leases.heartbeat(b.name, TTL)
    a.epochs[s] = await acquire_one(leases, a.name, s, TTL) or 0
    assert a.epochs[s] == 1
    site = _Site()

    for n in range(2):
        a_writer.queue(message(s, n), site, n)
        await a_writer.when_idle().addTimeout(WAIT, reactor)
    assert site.acknowledged == [0, 1]
    assert ledger(sql, s) == [(1, "a")]
    [(first_commit,)] = run(sql, "SELECT first_commit FROM site_writer WHERE site_id = %s", s)

    # b takes s over (a's lease expired); a still believes it holds epoch 1.
    run(sql, "UPDATE site_lease SET expires_at = now() WHERE site_id = %s", s)
    b.epochs[s] = await acquire_one(leases, b.name, s, TTL) or 0
    assert b.epochs[s] == 2
    a_writer.queue(message(s, 2), site, 2)
    await a_writer.when_idle().addTimeout(WAIT, reactor)
    assert a.fenced == [[s]] and a_writer.batches_fenced == 1
    assert site.acknowledged == [0, 1]
    assert ledger(sql, s) == [(1, "a")]
    assert run(sql, "SELECT count(*) FROM sensor_reading WHERE site_id = %s", s) == [(2,)]

    b_writer.queue(message(s, 2), site, "b2")
    await b_writer.when_idle().addTimeout(WAIT, reactor)
    assert site.acknowledged == [0, 1, "b2"]
    assert ledger(sql, s) == [(1, "a"), (2, "b")]
    assert run(sql, "SELECT first_commit FROM site_writer WHERE site_id = %s AND epoch = 1", s) == [
        (first_commit,)
    ]
    assert (
        run(sql, "SELECT site_id, epoch FROM site_writer GROUP BY 1, 2 HAVING count(*) > 1") == []
    )
    a_writer.stop()
    b_writer.stop()


@pytest_twisted.ensureDeferred
async def test_a_site_is_written_before_its_lease_is_released(
    pool: ConnectionPool, sql: Any
) -> None:
    """
    C{Ingest.site_written} fires once everything queued for the site is
    committed under its fence: its messages, and the status and event its
    stop reported last.  A hand-over releases the lease only then, so the
    release fences nothing and the stop's event is kept.
    """
    from twisted.internet import reactor

    a = _Instance("a")
    leases = Leases(pool)
    ingest = Ingest(
        reactor,
        pool,
        _NoDevices(),
        lanes=2,
        repair_interval=3600.0,
        fence=a.fence,
        on_fenced=a.fenced.append,
    )
    s = "handed-0"
    run(sql, "INSERT INTO mqtt_connection (site_id, host) VALUES (%s, '127.0.0.1')", s)
    await leases.heartbeat(a.name, TTL)
    a.epochs[s] = await acquire_one(leases, a.name, s, TTL) or 0
    site = _Site()
    ingest.writer.queue(message(s, 0), site, 0)
    report(ingest, s, "handed over")
    written = ingest.site_written(s)
    assert not written.called
    await written.addTimeout(WAIT, reactor)
    assert site.acknowledged == [0]
    assert counts(sql, s) == {
        "readings": 1,
        "topic count": 1,
        "events": ["handed over"],
        "last_error": "handed over",
    }
    del a.epochs[s]
    await leases.release(a.name, [s])
    await ingest.writer.when_idle().addTimeout(WAIT, reactor)
    assert a.fenced == [] and ingest.writer.batches_fenced == 0
    assert ledger(sql, s) == [(1, "a")]
    ingest.writer.stop()
