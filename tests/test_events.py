"""
Events out, against the real database and service: every kind of event is
recorded once committed, published with NOTIFY to a psycopg2 listener, and
streamed over Server-Sent Events to a real HTTP client that can disconnect
and resume with C{Last-Event-ID} without losing anything.
"""

from __future__ import annotations

import json
import random
import select
import threading
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import urlsplit

import psycopg2
import pytest
import pytest_twisted
from twisted.internet.defer import gatherResults
from twisted.internet.threads import deferToThread

from mqttsvc.db.events import EventFilter, Events
from mqttsvc.db.pool import ConnectionPool
from tests.conftest import BROKER_HOST, BROKER_PORT
from tests.publish import publish
from tests.service import RunningService
from tests.sse import SSEClient, open_stream
from tests.waiting import eventually


def port_of(service: RunningService) -> int:
    port = urlsplit(service.url).port
    assert port is not None
    return port


def execute(sql: Any, text: str, *params: Any) -> list[tuple[Any, ...]]:
    with sql.cursor() as cur:
        cur.execute(text, params)
        return list(cur.fetchall()) if cur.description else []


async def write(sql: Any, text: str, *params: Any) -> list[tuple[Any, ...]]:
    """
    A writing statement in a thread: taking an event id may wait for the
    service's own transaction, which needs the reactor running.
    """
    result: list[tuple[Any, ...]] = await deferToThread(execute, sql, text, *params)
    return result


async def connection_event(sql: Any, site_id: str, from_: str, to: str, reason: str) -> None:
    await write(
        sql,
        "INSERT INTO connection_event (site_id, at, from_state, to_state, reason) "
        "VALUES (%s, now(), %s, %s, %s) RETURNING id",
        site_id,
        from_,
        to,
        reason,
    )


class Listener:
    """
    A psycopg2 connection doing C{LISTEN mqttsvc_events}, as the Django
    backend would.
    """

    def __init__(self, dsn: str) -> None:
        self.conn = psycopg2.connect(dsn)
        self.conn.autocommit = True
        with self.conn.cursor() as cur:
            cur.execute("LISTEN mqttsvc_events")
        self.received: list[dict[str, Any]] = []

    def poll(self) -> list[dict[str, Any]]:
        if select.select([self.conn], [], [], 0)[0]:
            self.conn.poll()
            while self.conn.notifies:
                notify = self.conn.notifies.pop(0)
                assert notify.channel == "mqttsvc_events"
                self.received.append(json.loads(notify.payload))
        return self.received


@pytest.fixture
def listener(db_dsn: str) -> Iterator[Listener]:
    listening = Listener(db_dsn)
    yield listening
    listening.conn.close()


@pytest_twisted.ensureDeferred
async def test_every_kind_of_event_reaches_a_listener(
    running: RunningService, listener: Listener, sql: Any, site_id: str
) -> None:
    """
    Connection transitions, device changes, dead letters and operator
    actions (with the caller) arrive as NOTIFY payloads of one shape, in the
    order of their ids, each matching its event_log row.
    """
    await running.call(
        "site.create",
        {
            "site_id": site_id,
            "host": BROKER_HOST,
            "port": BROKER_PORT,
            "topics": [
                {
                    "topic": f"{site_id}/gateway/{{gateway_id}}/heartbeat",
                    "kind": "gateway_heartbeat",
                }
            ],
        },
    )

    def seen(type_: str, **data: Any) -> bool:
        return any(
            e["type"] == type_
            and e["site_id"] == site_id
            and all(e["data"].get(k) == v for k, v in data.items())
            for e in listener.poll()
        )

    await eventually(lambda: seen("connection", to="connected"), what="connected event")
    await publish(
        [
            (f"{site_id}/gateway/g1/heartbeat", b'{"status": "ok"}'),
            (f"{site_id}/gateway/g2/heartbeat", b"not json"),
        ]
    )
    await eventually(lambda: seen("dead_letter", topic=f"{site_id}/gateway/g2/heartbeat"))
    await eventually(lambda: seen("device", device_id="g1", to="online"), what="device event")
    await running.call("site.restart", {"site_id": site_id})
    await eventually(lambda: seen("operator", action="site.restart", caller="anonymous"))

    mine = [e for e in listener.poll() if e["site_id"] == site_id]
    ids = [e["id"] for e in listener.poll()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids)
    # The restart goes on writing connection events while this reads: compare
    # up to the last event notified (reading every row failed when one more
    # committed in between), and find no row before it missing.
    rows = {
        id_: (type_, data)
        for id_, type_, data in execute(
            sql,
            "SELECT id, type, data FROM event_log WHERE site_id = %s AND id <= %s",
            site_id,
            mine[-1]["id"],
        )
    }
    assert {e["id"]: (e["type"], e["data"]) for e in mine} == rows
    assert all(set(e) == {"id", "type", "site_id", "at", "data"} for e in mine)
    assert all(e["at"].endswith("Z") for e in mine)
    dead = next(e for e in mine if e["type"] == "dead_letter")
    assert dead["data"]["reason"].startswith("payload is not JSON")
    assert dead["data"]["size"] == len(b"not json")
    created = next(e for e in mine if e["type"] == "operator")
    assert created["data"] == {"action": "site.create", "caller": "anonymous", "enabled": True}


@pytest_twisted.ensureDeferred
async def test_large_event_is_announced_truncated(
    running: RunningService, listener: Listener, sql: Any, site_id: str
) -> None:
    """An event too big for a NOTIFY payload is announced by id; the row holds it all."""
    reason = "x" * 9000
    await write(
        sql,
        "INSERT INTO dead_letter (site_id, topic, payload, reason, received_at) "
        "VALUES (%s, 't', 'p', %s, now()) RETURNING id",
        site_id,
        reason,
    )
    [notice] = await eventually(lambda: [e for e in listener.poll() if e["site_id"] == site_id])
    assert notice["truncated"] is True and "data" not in notice
    [(data,)] = execute(sql, "SELECT data FROM event_log WHERE id = %s", notice["id"])
    assert data["reason"] == reason


def test_event_ids_become_visible_in_order(db_dsn: str) -> None:
    """
    A transaction that writes an event holds back every other event writer
    until it commits, so ids are handed out in commit order and "after id N"
    never skips an event that commits late.
    """
    first = psycopg2.connect(db_dsn)
    second = psycopg2.connect(db_dsn)
    watcher = psycopg2.connect(db_dsn)
    watcher.autocommit = True
    insert = (
        "INSERT INTO connection_event (site_id, at, from_state, to_state) "
        "VALUES ('order-test', now(), 'stopped', 'connecting')"
    )
    try:
        with first.cursor() as cur:
            cur.execute(insert)
        result: list[int] = []

        def later() -> None:
            with second, second.cursor() as cur:
                cur.execute(insert)
                cur.execute("SELECT max(id) FROM event_log")
                result.append(cur.fetchone()[0])

        thread = threading.Thread(target=later)
        thread.start()
        with watcher.cursor() as cur:
            for _ in range(200):
                cur.execute(
                    "SELECT count(*) FROM pg_stat_activity WHERE pid = %s "
                    "AND wait_event_type = 'Lock' AND wait_event = 'advisory'",
                    (second.info.backend_pid,),
                )
                if cur.fetchone()[0] == 1:
                    break
                threading.Event().wait(0.02)
            else:
                raise AssertionError("the second writer did not wait for the first")
        with first.cursor() as cur:
            cur.execute("SELECT max(id) FROM event_log")
            first_id = cur.fetchone()[0]
        first.commit()
        thread.join(10)
        assert result and result[0] > first_id
    finally:
        for conn in (first, second, watcher):
            conn.close()


# --- the live stream -----------------------------------------------------------


@pytest_twisted.async_yield_fixture
async def streaming(db_dsn: str, no_sites: None) -> AsyncIterator[RunningService]:
    """
    The service with a fast heartbeat.
    """
    from twisted.internet import reactor

    service = RunningService(reactor, db_dsn, "--events-heartbeat", "0.2")
    await service.start()
    yield service
    await service.stop()


def ids(client: SSEClient) -> list[int]:
    return [e["id"] for e in client.events]


@pytest_twisted.ensureDeferred
async def test_stream_resumes_after_a_disconnect_without_losing_anything(
    streaming: RunningService, sql: Any, site_id: str
) -> None:
    """
    A client filtered to one site disconnects; what happens meanwhile is
    replayed from the database when it reconnects with Last-Event-ID, then
    live events follow: every event of the site exactly once, in order.
    """
    port = port_of(streaming)
    first = await open_stream(port, site_id=site_id)
    assert first.status == 200
    assert first.headers["content-type"] == "text/event-stream; charset=utf-8"
    await first.until(lambda c: c.last_id is not None)
    start = int(first.last_id or 0)
    await streaming.call("site.create", {"site_id": site_id, "host": BROKER_HOST})
    await first.until(lambda c: any(e["data"].get("to") == "connected" for e in c.events))
    await connection_event(sql, "another-site", "stopped", "connecting", "not for this client")
    await first.close()
    resume_from = first.last_id
    assert resume_from is not None

    # Missed while disconnected: operator actions and their transitions.
    await streaming.call("site.stop", {"site_id": site_id})
    await streaming.call("site.start", {"site_id": site_id})
    await streaming.call("site.restart", {"site_id": site_id})

    second = await open_stream(port, headers={"Last-Event-ID": resume_from}, site_id=site_id)
    await streaming.call("site.update", {"site_id": site_id, "keepalive": 30})

    def stored() -> list[int]:
        return [
            row[0]
            for row in execute(
                sql,
                "SELECT id FROM event_log WHERE site_id = %s AND id > %s ORDER BY id",
                site_id,
                start,
            )
        ]

    async def complete() -> bool:
        updates = execute(
            sql,
            "SELECT count(*) FROM event_log WHERE site_id = %s AND data->>'action' = 'site.update'",
            site_id,
        )
        return updates == [(1,)] and ids(first) + ids(second) == stored()

    await eventually(complete, what="every event of the site, once, in order")
    received = first.events + second.events
    assert {e["site_id"] for e in received} == {site_id}
    actions = [e["data"]["action"] for e in received if e["type"] == "operator"]
    assert actions == ["site.create", "site.stop", "site.start", "site.restart", "site.update"]
    assert int(second.events[0]["id"]) > int(resume_from)
    await second.until(lambda c: sum(m.comment for m in c.messages) >= 2)
    assert any(m.comment for m in second.messages), "no heartbeat"
    await second.close()


@pytest_twisted.ensureDeferred
async def test_stream_filters_by_type_and_site(
    streaming: RunningService, sql: Any, site_id: str
) -> None:
    """type and site_id select events; several values may be given."""
    port = port_of(streaming)
    client = await open_stream(port, type="dead_letter,operator", site_id=f"{site_id},other")
    await connection_event(sql, site_id, "stopped", "connecting", "filtered out")
    await streaming.call("site.create", {"site_id": "other", "host": BROKER_HOST})
    await write(
        sql,
        "INSERT INTO dead_letter (site_id, topic, payload, reason, received_at) "
        "VALUES (%s, 't', 'p', 'bad', now()), ('elsewhere', 't', 'p', 'bad', now()) "
        "RETURNING id",
        site_id,
    )
    await client.until(lambda c: len(c.events) >= 2)
    assert [(e["type"], e["site_id"]) for e in client.events] == [
        ("operator", "other"),
        ("dead_letter", site_id),
    ]
    await client.close()


@pytest_twisted.ensureDeferred
async def test_stream_survives_losing_the_listening_connection(
    streaming: RunningService, sql: Any, site_id: str
) -> None:
    """
    When the hub's LISTEN connection is killed, events committed meanwhile
    still reach the stream once it has reconnected.
    """
    hub = streaming.root.getServiceNamed("events")
    await eventually(lambda: hub.listening, what="the hub listening")
    client = await open_stream(port_of(streaming), site_id=site_id)
    killed = await write(sql, "SELECT pg_terminate_backend(%s)", hub.listener.backend_pid)
    assert killed == [(True,)]
    await connection_event(sql, site_id, "stopped", "connecting", "while nobody listened")
    await client.until(lambda c: len(c.events) >= 1, timeout=15)
    assert client.events[0]["data"]["reason"] == "while nobody listened"
    await eventually(lambda: hub.listening, what="listening again")
    await connection_event(sql, site_id, "connecting", "connected", "after")
    await client.until(lambda c: len(c.events) >= 2, timeout=5)
    await client.close()


@pytest_twisted.ensureDeferred
async def test_stream_refuses_bad_parameters(streaming: RunningService) -> None:
    """An unknown type or a malformed Last-Event-ID is a 400 naming it."""
    port = port_of(streaming)
    bad_type = await open_stream(port, type="connection,weather")
    await bad_type.lost
    assert bad_type.status == 400
    bad_id = await open_stream(port, headers={"Last-Event-ID": "yesterday"})
    await bad_id.lost
    assert bad_id.status == 400


@pytest_twisted.ensureDeferred
async def test_stopping_the_service_ends_open_streams(db_dsn: str, no_sites: None) -> None:
    """Open streams are closed when the service stops, so that shutdown never hangs on them."""
    from twisted.internet import reactor

    service = RunningService(reactor, db_dsn)
    await service.start()
    client = await open_stream(port_of(service))
    await service.stop()
    await client.until(lambda c: False, timeout=5)
    assert client.lost.called


def _commit_events(dsn: str, site_id: str, writer: int, count: int, stop: threading.Event) -> int:
    """
    Commit C{count} events from a connection of its own, alternating the
    two ways an event is written (directly, and by the trigger on
    C{connection_event}); each transaction stays open a moment after taking
    its id, so that another connection's later id is ready to commit first.
    """
    rng = random.Random(writer)
    conn = psycopg2.connect(dsn)
    try:
        for i in range(count):
            if stop.is_set():
                return i
            with conn.cursor() as cur:
                if i % 2:
                    cur.execute(
                        "INSERT INTO connection_event (site_id, at, from_state, to_state, reason) "
                        "VALUES (%s, now(), 'connecting', 'connected', %s)",
                        (site_id, f"writer {writer} #{i}"),
                    )
                else:
                    cur.execute(
                        "INSERT INTO event_log (type, site_id, at, data) "
                        "VALUES ('operator', %s, now(), %s)",
                        (site_id, json.dumps({"action": f"writer {writer} #{i}"})),
                    )
            stop.wait(rng.random() * 0.003)
            conn.commit()
        return count
    finally:
        conn.close()


@pytest_twisted.ensureDeferred
async def test_events_committed_from_two_connections_resume_without_a_gap(
    db_dsn: str, site_id: str
) -> None:
    """
    Two connections commit events at the same time while a reader resumes
    after every single event it reads (pages of one, as an SSE client
    reconnecting with Last-Event-ID after each event would): it reads every
    event exactly once, in id order.  Were ids handed out before the
    previous event-writing transaction committed, a resume point past a
    higher id that committed first would skip the lower one for good.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    stop = threading.Event()
    wanted = EventFilter(site_ids=frozenset({site_id}))
    try:
        writers = gatherResults(
            [deferToThread(_commit_events, db_dsn, site_id, writer, 150, stop) for writer in (1, 2)]
        )
        position, read, resumes = 0, [], 0
        while not writers.called:
            events = await Events(pool).after(position, wanted, limit=1)
            resumes += 1
            for event in events:
                read.append(event.id)
                position = event.id
        committed = await writers.addTimeout(30, reactor)
        while events := await Events(pool).after(position, wanted, limit=1):
            read.append(events[0].id)
            position = events[0].id
        [(stored,)] = await pool.query(
            "SELECT array_agg(id ORDER BY id) FROM event_log WHERE site_id = %s", (site_id,)
        )
    finally:
        stop.set()
        pool.close()
    assert committed == [150, 150]
    assert resumes > 100, resumes
    assert read == sorted(set(read))
    assert read == stored, f"skipped: {sorted(set(stored) - set(read))}"
