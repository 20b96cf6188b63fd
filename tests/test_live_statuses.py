"""
What makes any replica answer for any site (issue 17): the live statuses
that owners publish (L{LiveStatuses}, real PostgreSQL), the publisher that
writes them (L{LivePublisher}, on a Clock), and the commands one replica
sends a site's owner (L{Command}, L{CommandReceiver}).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, DeferredQueue
from twisted.internet.task import Clock

from mqttsvc.cluster.commands import MAX_PAYLOAD_BYTES, Command, CommandReceiver
from mqttsvc.cluster.publisher import (
    PUBLISH_INTERVAL,
    REFRESH_INTERVAL,
    LivePublisher,
    LiveStore,
)
from mqttsvc.db.leases import Leases
from mqttsvc.db.live import COMMANDS, LiveStatuses
from mqttsvc.db.notifications import NotificationListener
from mqttsvc.db.pool import ConnectionPool
from tests.conformance import assert_implements
from tests.conftest import scratch_database
from tests.test_leases import acquire_one

TTL = 60.0


@pytest.fixture(scope="module")
def live_dsn() -> Iterator[str]:
    with scratch_database("mqttsvc_live_statuses") as dsn:
        yield dsn


@pytest.fixture
def sql(live_dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(live_dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute("DELETE FROM mqttsvc_instance; DELETE FROM mqtt_connection")
        for site_id in ("s1", "s2"):
            cur.execute(
                "INSERT INTO mqtt_connection (site_id, host) VALUES (%s, '127.0.0.1')", (site_id,)
            )
    yield conn
    conn.close()


@pytest_twisted.async_yield_fixture
async def pool(live_dsn: str, sql: Any) -> AsyncIterator[ConnectionPool]:
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, live_dsn, size=2)
    yield pool
    pool.close()


def _row(site_id: str, epoch: int, state: str) -> tuple[str, int, str, str]:
    status = {"site_id": site_id, "state": state, "status": "connected"}
    return (site_id, epoch, "connected", json.dumps(status))


@pytest_twisted.ensureDeferred
async def test_a_status_counts_only_while_its_publisher_holds_the_lease(
    pool: ConnectionPool, sql: Any
) -> None:
    """
    What the owner publishes is read back by any replica; once another
    instance acquires the site (the old owner died: its lease and its
    heartbeat expired), the old row is ignored until the new owner
    publishes, and a site deleted meanwhile is skipped, not an error.
    """
    leases, live = Leases(pool), LiveStatuses(pool)
    await leases.heartbeat("a", TTL)
    epoch = await acquire_one(leases, "a", "s1", TTL)
    assert epoch is not None
    await live.publish("a", [_row("s1", epoch, "connected"), _row("gone", 1, "connected")])
    found = await live.of("s1")
    assert found is not None
    assert (found.instance, found.status, found.live["state"]) == ("a", "connected", "connected")
    assert set(await live.current()) == {"s1"}
    assert await live.owner("s1") == "a"
    assert await live.of("s2") is None

    # "a" dies: its heartbeat and its lease expire, and "b" takes the site.
    with sql.cursor() as cur:
        cur.execute("UPDATE mqttsvc_instance SET expires_at = now() - interval '1 s'")
        cur.execute("UPDATE site_lease SET expires_at = now() - interval '1 s'")
    assert await live.of("s1") is None
    assert await live.owner("s1") is None
    await leases.heartbeat("b", TTL)
    new_epoch = await acquire_one(leases, "b", "s1", TTL)
    assert new_epoch == epoch + 1
    assert await live.owner("s1") == "b"
    assert await live.of("s1") is None, "the dead owner's row must not count"
    # A late publication of the old owner, under its old epoch, still does not.
    await live.publish("a", [_row("s1", epoch, "late")])
    assert await live.of("s1") is None
    await live.publish("b", [_row("s1", new_epoch, "connecting")])
    found = await live.of("s1")
    assert found is not None
    assert (found.instance, found.live["state"]) == ("b", "connecting")


@pytest_twisted.ensureDeferred
async def test_a_command_is_a_notification_on_its_channel(
    live_dsn: str, pool: ConnectionPool
) -> None:
    """What L{LiveStatuses.send} sends arrives, whole, at a listener of the channel."""
    from twisted.internet import reactor

    heard: DeferredQueue[str] = DeferredQueue()
    ready: Deferred[None] = Deferred()
    listener = NotificationListener(
        reactor, live_dsn, COMMANDS, heard.put, lambda: ready.callback(None), what="commands"
    )
    listener.startService()
    try:
        await ready
        payload = Command("b", "s1", "restart").payload()
        await LiveStatuses(pool).send(payload)
        assert Command.parse(await heard.get()) == Command("b", "s1", "restart")
    finally:
        listener.stopService()


# --- commands -------------------------------------------------------------------


@pytest.mark.parametrize(
    "payload",
    [
        "",
        "not json",
        "[1, 2]",
        '{"instance": "a", "site_id": "s1", "action": "delete"}',
        '{"instance": 1, "site_id": "s1", "action": "restart"}',
        '{"instance": "a", "site_id": null, "action": "restart"}',
        json.dumps({"instance": "a", "site_id": "s" * MAX_PAYLOAD_BYTES, "action": "restart"}),
    ],
)
def test_a_malformed_command_is_dropped(payload: str) -> None:
    """Anything but a well-formed, bounded restart command is dropped and counted."""
    restarted: list[str] = []
    receiver = CommandReceiver("a", lambda s: restarted.append(s) is None, lambda: None)
    receiver.received(payload)
    assert restarted == []
    assert (receiver.acted, receiver.malformed) == (0, 1)


def test_only_the_instance_named_acts_and_then_publishes() -> None:
    """
    A command for another instance is ignored; one for this instance
    restarts the site and publishes at once; one for a site it no longer
    runs does nothing.
    """
    running = {"s1"}
    restarted: list[str] = []
    published: list[None] = []

    def restart(site_id: str) -> bool:
        if site_id not in running:
            return False
        restarted.append(site_id)
        return True

    receiver = CommandReceiver("a", restart, lambda: published.append(None))
    receiver.received(Command("b", "s1", "restart").payload())
    assert restarted == [] and published == []
    receiver.received(Command("a", "s1", "restart").payload())
    assert restarted == ["s1"] and len(published) == 1
    receiver.received(Command("a", "s9", "restart").payload())
    assert restarted == ["s1"] and len(published) == 1
    assert (receiver.acted, receiver.malformed) == (1, 0)


# --- the publisher --------------------------------------------------------------


class FakeLiveStore:
    """Records publications; each answers when the test says."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, list[tuple[str, int, str, str]]]] = []
        self.answers: list[Deferred[None]] = []

    async def publish(self, instance: str, rows: Sequence[tuple[str, int, str, str]]) -> None:
        self.calls.append((instance, list(rows)))
        d: Deferred[None] = Deferred()
        self.answers.append(d)
        await d


def test_the_fake_store_is_a_live_store() -> None:
    assert_implements(FakeLiveStore, LiveStore)


def _publisher(
    owned: dict[str, int], statuses: dict[str, dict[str, Any]]
) -> tuple[Clock, FakeLiveStore, LivePublisher]:
    clock, store = Clock(), FakeLiveStore()
    publisher = LivePublisher(clock, "a", lambda: dict(owned), statuses.get, store)
    return clock, store, publisher


def test_publishes_what_changed_every_interval_and_retries_a_failure() -> None:
    """
    At start every owned running site is published; then only what changed
    (a new status or a new epoch), once a second; a failed publication is
    retried at the next tick; a site no longer owned is no longer published.
    """
    owned = {"s1": 1, "s2": 1, "s3": 1}
    statuses: dict[str, dict[str, Any]] = {
        "s1": {"status": "connected", "state": "connected"},
        "s2": {"status": "waiting", "state": "waiting"},
    }
    clock, store, publisher = _publisher(owned, statuses)
    publisher.startService()
    [(instance, rows)] = store.calls
    assert instance == "a"
    assert [(s, e, st) for s, e, st, _ in rows] == [("s1", 1, "connected"), ("s2", 1, "waiting")]
    assert json.loads(rows[0][3]) == statuses["s1"]
    store.answers[-1].callback(None)

    clock.advance(PUBLISH_INTERVAL)
    assert len(store.calls) == 1, "nothing changed: nothing written"

    statuses["s1"] = {"status": "waiting", "state": "waiting"}
    owned["s2"] = 2
    clock.advance(PUBLISH_INTERVAL)
    assert [r[:2] for r in store.calls[-1][1]] == [("s1", 1), ("s2", 2)]
    store.answers[-1].errback(RuntimeError("database down"))
    assert publisher.failures == 1

    clock.advance(PUBLISH_INTERVAL)
    assert [r[:2] for r in store.calls[-1][1]] == [("s1", 1), ("s2", 2)], "retried, all"
    store.answers[-1].callback(None)
    assert publisher.published == 4

    del owned["s1"]
    statuses["s1"] = {"status": "connected", "state": "connected"}
    clock.advance(PUBLISH_INTERVAL)
    assert len(store.calls) == 3

    # Every site again after a while, changed or not (the table may have
    # been emptied by a crash of the database server).
    clock.advance(REFRESH_INTERVAL)
    assert [r[:2] for r in store.calls[-1][1]] == [("s2", 2)]
    store.answers[-1].callback(None)
    publisher.stopService()
    assert clock.getDelayedCalls() == []


def test_publish_now_waits_for_the_publication_in_flight() -> None:
    """
    L{LivePublisher.publish_now} while a publication is in flight publishes
    again right after it, not beside it.
    """
    statuses = {"s1": {"status": "connected", "state": "connected"}}
    clock, store, publisher = _publisher({"s1": 1}, statuses)
    publisher.startService()
    statuses["s1"] = {"status": "connecting", "state": "connecting"}
    publisher.publish_now()
    assert len(store.calls) == 1
    store.answers[-1].callback(None)
    assert len(store.calls) == 2
    assert json.loads(store.calls[-1][1][0][3])["state"] == "connecting"
    store.answers[-1].callback(None)
    publisher.stopService()
    assert clock.getDelayedCalls() == []


def test_the_publications_and_commands_are_counted_in_metrics() -> None:
    """
    /metrics counts the statuses published, the failed publications, and
    the commands acted on and dropped; without --cluster, 0.
    """
    from prometheus_client.parser import text_string_to_metric_families

    from mqttsvc.control.metrics import Metrics

    def samples(metrics: Metrics) -> dict[tuple[str, str], float]:
        return {
            (s.name, s.labels.get("result", "")): s.value
            for f in text_string_to_metric_families(metrics.render().decode())
            for s in f.samples
            if s.name.startswith(("mqttsvc_cluster_live", "mqttsvc_cluster_site_commands"))
        }

    alone = Metrics()
    alone.watch_live(None, None)
    assert set(samples(alone).values()) == {0.0}
    assert len(samples(alone)) == 4

    statuses = {"s1": {"status": "connected", "state": "connected"}}
    clock, store, publisher = _publisher({"s1": 1}, statuses)
    receiver = CommandReceiver("a", lambda s: True, publisher.publish_now)
    metrics = Metrics()
    metrics.watch_live(publisher, receiver)
    publisher.startService()
    store.answers[-1].callback(None)
    statuses["s1"] = {"status": "waiting", "state": "waiting"}
    clock.advance(PUBLISH_INTERVAL)
    store.answers[-1].errback(RuntimeError("database down"))
    receiver.received(Command("a", "s1", "restart").payload())
    receiver.received("{")
    assert samples(metrics) == {
        ("mqttsvc_cluster_live_published_total", ""): 1.0,
        ("mqttsvc_cluster_live_publish_failures_total", ""): 1.0,
        ("mqttsvc_cluster_site_commands_total", "acted"): 1.0,
        ("mqttsvc_cluster_site_commands_total", "malformed"): 1.0,
    }
    publisher.stopService()
