"""
Connection and device events carry the instance that produced them
(migration 0013): the writer puts the C{--instance} name on every
C{connection_event} and C{device_event} row, the triggers copy it into
C{event_log}'s data, and C{event.list} and C{/events} show it there.  An
instance alone has its name on its events as well; in a cluster each
instance's events carry its own, also for a site that moved from one to
the other.  Events written by anyone else (the backend's SQL) have none.
Against the real PostgreSQL, a real broker and the real service tree.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest
import pytest_twisted

from mqttsvc.db.batch import batch_statements
from mqttsvc.records import (
    ConnectionEvent,
    DeviceKey,
    DeviceStatus,
    Effect,
    Reading,
    SiteDevicesStatus,
)
from tests.conftest import PrivateBroker, scratch_database
from tests.publish import publish
from tests.service import RunningService
from tests.sse import open_stream
from tests.waiting import eventually

NOW = datetime(2026, 1, 1, tzinfo=UTC)


def query(dsn_or_conn: Any, text: str, *params: Any) -> list[tuple[Any, ...]]:
    """Rows of one statement, on a connection or a DSN (autocommit)."""
    conn = psycopg2.connect(dsn_or_conn) if isinstance(dsn_or_conn, str) else dsn_or_conn
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(text, params)
            return list(cur.fetchall()) if cur.description else []
    finally:
        if isinstance(dsn_or_conn, str):
            conn.close()


def site_params(site_id: str, port: int) -> dict[str, Any]:
    return {
        "site_id": site_id,
        "host": "127.0.0.1",
        "port": port,
        "topics": [
            {"topic": f"{site_id}/gateway/{{gateway_id}}/heartbeat", "kind": "gateway_heartbeat"}
        ],
    }


# --- the statements ------------------------------------------------------------------


def test_the_instance_is_one_parameter_of_each_event_statement() -> None:
    """
    Each event statement takes the instance as one more parameter, the same
    for all its rows, in place of the null it is without a name; a batch
    of messages without events (the message path) takes nothing more.
    """
    key = DeviceKey("s1", "gateway", None, "g1")
    effects: list[Effect] = [
        DeviceStatus(key, "unknown", "online", NOW, "message received"),
        SiteDevicesStatus("s2", "unknown", NOW, "site connection waiting", 7),
    ]
    events = [
        ConnectionEvent("s1", NOW, "stopped", "connecting", None),
        ConnectionEvent("s1", NOW, "connecting", "connected", "new session"),
    ]
    without = batch_statements(effects, events=events)
    named = batch_statements(effects, events=events, instance="east")
    assert without is not None and named is not None
    assert named[0] == without[0]
    changed = [(a, b) for a, b in zip(without[1], named[1], strict=True) if a != b]
    assert changed == [(None, "east"), (None, "east")]
    readings = [Reading("s1", f"t{i}", NOW, "value", float(i), None, NOW) for i in range(1000)]
    plain = batch_statements(readings)
    assert plain is not None
    assert batch_statements(readings, instance="east") == plain


# --- an instance alone -----------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_an_instance_alone_names_itself_on_its_events(
    db_dsn: str, no_sites: None, sql: Any, site_id: str, private_broker: PrivateBroker
) -> None:
    """
    Without --cluster, instance "solo": its site's connection events and a
    device's change to online carry "solo" in connection_event.instance,
    device_event.instance and event_log's data, in event.list and on the
    /events stream; a connection event inserted by SQL (the backend) has
    no instance in any of them.
    """
    from twisted.internet import reactor

    service = RunningService(reactor, db_dsn, instance="solo")
    await service.start()
    try:
        [(before,)] = query(sql, "SELECT coalesce(max(id), 0) FROM event_log")
        port = urlsplit(service.url).port
        assert port is not None
        stream = await open_stream(port, site_id=site_id, last_event_id=str(before))
        await service.call("site.create", site_params(site_id, private_broker.port))

        def connection_rows() -> list[tuple[Any, ...]]:
            return query(
                sql,
                "SELECT from_state, to_state, instance FROM connection_event"
                " WHERE site_id = %s ORDER BY id",
                site_id,
            )

        await eventually(
            lambda: ("connecting", "connected", "solo") in connection_rows(), what="connected"
        )
        await publish(
            [(f"{site_id}/gateway/g1/heartbeat", b'{"status": "ok"}')], port=private_broker.port
        )

        def device_rows() -> list[tuple[Any, ...]]:
            return query(
                sql,
                "SELECT device_id, to_status, instance FROM device_event WHERE site_id = %s",
                site_id,
            )

        assert await eventually(device_rows, what="the device event") == [("g1", "online", "solo")]
        assert {instance for *_, instance in connection_rows()} == {"solo"}
        query(
            sql,
            "INSERT INTO connection_event (site_id, at, from_state, to_state, reason)"
            " VALUES (%s, now(), 'connected', 'waiting', 'written by the backend')",
            site_id,
        )
        logged = query(
            sql,
            "SELECT id, type, data->>'reason', data->>'instance' FROM event_log"
            " WHERE site_id = %s AND type IN ('connection', 'device') ORDER BY id",
            site_id,
        )
        assert len(logged) == len(connection_rows()) + 1
        assert logged[-1][1:] == ("connection", "written by the backend", None)
        assert {instance for *_, instance in logged[:-1]} == {"solo"}
        assert any(row[1:] == ("device", "message received", "solo") for row in logged)

        listed = (await service.call("event.list", {"site_id": site_id}))["items"]
        assert Counter((e["type"], e["data"]["reason"]) for e in listed) == Counter(
            (type_, reason) for _, type_, reason, _ in logged
        )
        for e in listed:
            by_backend = e["data"]["reason"] == "written by the backend"
            assert e["data"].get("instance") == (None if by_backend else "solo"), e

        ids = {id_ for id_, *_ in logged}
        await stream.until(lambda c: ids <= {e["id"] for e in c.events})
        streamed = {e["id"]: e["data"].get("instance") for e in stream.events if e["id"] in ids}
        assert streamed == {id_: instance for id_, *_, instance in logged}
        await stream.close()
    finally:
        await service.stop()


# --- two instances of a cluster -------------------------------------------------------

SITES = 6
CLUSTER_ARGS = ("--cluster", "--lease-ttl", "3", "--lease-renew", "0.5")


@pytest.fixture
def cluster_dsn() -> Iterator[str]:
    """A migrated database of this test's own: the leases are all its."""
    with scratch_database("mqttsvc_events_instance") as dsn:
        yield dsn


def owners(dsn: str) -> dict[str, str]:
    """Site -> owner of every lease held now."""
    return dict(
        query(
            dsn,
            "SELECT site_id, owner FROM site_lease WHERE owner IS NOT NULL AND expires_at > now()",
        )
    )


def running_here(service: RunningService) -> set[str]:
    return {
        str(site.name) for site in service.supervisor.sites() if site.state.state == "connected"
    }


@pytest.mark.deadline(120)
@pytest_twisted.ensureDeferred
async def test_each_instance_of_a_cluster_names_itself_on_its_events(
    cluster_dsn: str, private_broker: PrivateBroker
) -> None:
    """
    East owns six sites, then west joins and three move to it by handover.
    Every connection and device event of those sites carries the instance
    that wrote it: a site that moved was connected by east, then by west;
    each site's last connection is its current owner's, a device heard
    after the move is its site's owner's, and event_log and event.list
    (asked of either instance) say the same.
    """
    from twisted.internet import reactor

    site_ids = [f"c{i}" for i in range(SITES)]
    east = RunningService(reactor, cluster_dsn, *CLUSTER_ARGS, instance="east")
    west = RunningService(reactor, cluster_dsn, *CLUSTER_ARGS, instance="west")
    started: list[RunningService] = []
    try:
        await east.start()
        started.append(east)
        for site_id in site_ids:
            await east.call("site.create", site_params(site_id, private_broker.port))
        await eventually(
            lambda: running_here(east) == set(site_ids), within=30, what="east runs every site"
        )
        await west.start()
        started.append(west)

        def balanced() -> bool:
            held = owners(cluster_dsn)
            here = {
                name: {s for s, owner in held.items() if owner == name} for name in ("east", "west")
            }
            return (
                len(held) == SITES
                and len(here["west"]) == SITES // 2
                and running_here(east) == here["east"]
                and running_here(west) == here["west"]
            )

        await eventually(balanced, within=60, what="three sites moved to west, connected")
        held = owners(cluster_dsn)
        await publish(
            [(f"{s}/gateway/g1/heartbeat", b'{"status": "ok"}') for s in site_ids],
            port=private_broker.port,
        )

        def devices() -> dict[str, str | None]:
            return dict(
                query(
                    cluster_dsn,
                    "SELECT site_id, instance FROM device_event WHERE device_id = 'g1'"
                    " AND to_status = 'online'",
                )
            )

        await eventually(lambda: len(devices()) == SITES, what="every g1 online")
        assert devices() == held

        connections = query(
            cluster_dsn,
            "SELECT site_id, to_state, reason, instance FROM connection_event ORDER BY id",
        )
        assert {instance for *_, instance in connections} == {"east", "west"}
        # A site that moved has both names in its history: east connected
        # it first, west connected it after the move.
        for site_id in (s for s, owner in held.items() if owner == "west"):
            history = [(to, i) for s, to, _, i in connections if s == site_id]
            first_west = history.index(("connecting", "west"))
            assert ("connected", "east") in history[:first_west], history
            # East's last events of it, written under its lease before the release.
            assert history[first_west - 2 : first_west] == [
                ("stopping", "east"),
                ("stopped", "east"),
            ], history
            assert history[first_west:] == [("connecting", "west"), ("connected", "west")], history
        last_connected = {s: i for s, to, _, i in connections if to == "connected"}
        assert last_connected == held
        every_device_event = query(cluster_dsn, "SELECT instance FROM device_event")
        assert {i for (i,) in every_device_event} <= {"east", "west"}

        def key(type_: str, site_id: str, at: datetime, instance: str | None) -> tuple[Any, ...]:
            return (type_, site_id, at, instance)

        tables = Counter(
            key(*row)
            for row in query(
                cluster_dsn,
                "SELECT 'connection', site_id, at, instance FROM connection_event UNION ALL"
                " SELECT 'device', site_id, at, instance FROM device_event",
            )
        )
        logged = Counter(
            key(*row)
            for row in query(
                cluster_dsn,
                "SELECT type, site_id, at, data->>'instance' FROM event_log"
                " WHERE type IN ('connection', 'device')",
            )
        )
        assert logged == tables

        for site_id in site_ids:
            from_east = await east.call("event.list", {"site_id": site_id, "limit": 1000})
            from_west = await west.call("event.list", {"site_id": site_id, "limit": 1000})
            assert from_east == from_west
            listed = Counter((e["type"], e["data"]["instance"]) for e in from_east["items"])
            expected = Counter((t, i) for t, s, _, i in tables.elements() if s == site_id)
            assert listed == expected, site_id
    finally:
        for service in reversed(started):
            await service.stop()
