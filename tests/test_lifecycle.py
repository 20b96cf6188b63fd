"""
Site lifecycle against real parts: configuration changes written straight
to the database, refused credentials, refused subscriptions, a silent
link, operator actions, birth and last will, and resuming retry state.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import paho.mqtt.client as paho
import psycopg2
import psycopg2.errors
import pytest
import pytest_twisted
from paho.mqtt.enums import CallbackAPIVersion
from twisted.internet.threads import deferToThread

from tests.conftest import BROKER_HOST, BROKER_PORT, PrivateBroker
from tests.fakebroker import FakeBroker
from tests.publish import publish
from tests.service import RunningService
from tests.waiting import eventually


def execute(sql: Any, text: str, *params: Any) -> list[tuple[Any, ...]]:
    """
    Run a statement on the test's blocking connection: from the reactor
    thread only for reads, which never wait for the service's locks.
    """
    with sql.cursor() as cur:
        cur.execute(text, params)
        return list(cur.fetchall()) if cur.description else []


async def write(sql: Any, text: str, *params: Any) -> list[tuple[Any, ...]]:
    """
    Run a writing statement in a thread, as the backend would from its own
    process: it may wait for a row lock of the service's open transaction,
    which needs the reactor running to finish.
    """
    result: list[tuple[Any, ...]] = await deferToThread(execute, sql, text, *params)
    return result


async def state_of(service: RunningService, site_id: str, state: str, within: float = 10) -> Any:
    async def check() -> Any:
        status = await service.call("site.status", {"site_id": site_id})
        return status if status["state"] == state else None

    return await eventually(check, within=within, what=f"{site_id} becoming {state}")


async def insert_site(sql: Any, site_id: str, port: int = BROKER_PORT, **columns: Any) -> None:
    names = ["site_id", "host", "port", *columns]
    values = [site_id, BROKER_HOST, port, *columns.values()]
    await write(
        sql,
        f"INSERT INTO mqtt_connection ({', '.join(names)}) "
        f"VALUES ({', '.join(['%s'] * len(values))}) RETURNING id",
        *values,
    )
    await write(
        sql,
        "INSERT INTO mqtt_topic (connection_id, topic, kind) "
        "SELECT id, %s, 'gateway_heartbeat' FROM mqtt_connection WHERE site_id = %s "
        "RETURNING id",
        f"{site_id}/gateway/+/heartbeat",
        site_id,
    )


@pytest_twisted.async_yield_fixture
async def unmonitored(db_dsn: str, no_sites: None) -> AsyncIterator[RunningService]:
    """
    The service with its periodic reconciliation an hour away: whatever it
    notices within a test, it noticed through NOTIFY (or a listener's own
    resync), however slowly the machine runs.
    """
    from twisted.internet import reactor

    service = RunningService(reactor, db_dsn, "--monitor-interval", "3600")
    await service.start()
    yield service
    await service.stop()


@pytest_twisted.ensureDeferred
async def test_site_inserted_by_sql_connects_without_waiting_for_the_monitor(
    unmonitored: RunningService, sql: Any, site_id: str
) -> None:
    """
    A row the backend inserts is noticed through NOTIFY, not the monitor
    (an hour away here: a wall-clock bound of 1.5 s stood for that, and
    failed on a loaded machine).
    """
    await eventually(lambda: unmonitored.root.getServiceNamed("config-listener").listening)
    await insert_site(sql, site_id)
    await state_of(unmonitored, site_id, "connected")


@pytest_twisted.ensureDeferred
async def test_listening_resumes_after_losing_the_database(
    unmonitored: RunningService, sql: Any, site_id: str
) -> None:
    """
    When the listening connection is killed, it comes back, LISTENs again,
    and catches up on what changed meanwhile (the monitor is an hour away).
    """
    running = unmonitored
    listener = running.root.getServiceNamed("config-listener")
    await eventually(lambda: listener.listening)
    before = listener.connections
    # Its own backend: matching pg_stat_activity's last query missed it
    # when that was the listener's ping, not its LISTEN.
    assert listener.backend_pid is not None
    killed = execute(sql, "SELECT pg_terminate_backend(%s)", listener.backend_pid)
    assert killed == [(True,)]
    await insert_site(sql, site_id)  # while nobody listens: only a resync can see it
    await state_of(running, site_id, "connected", within=8)
    await eventually(lambda: listener.connections > before, what="listening again")
    await insert_site(sql, site_id + "-b")
    await state_of(running, site_id + "-b", "connected")


@pytest_twisted.ensureDeferred
async def test_invalid_rows_written_by_sql(running: RunningService, sql: Any, site_id: str) -> None:
    """
    A subscription the API would refuse, written by SQL, is ignored and
    reported; the site and every other call keep working.  What the
    database itself can refuse, it refuses.
    """
    await eventually(lambda: running.root.getServiceNamed("config-listener").listening)
    await insert_site(sql, site_id)
    await write(
        sql,
        "INSERT INTO mqtt_topic (connection_id, topic, kind) SELECT id, %s, 'sensor_data' "
        "FROM mqtt_connection WHERE site_id = %s RETURNING id",
        f"{site_id}/plain",
        site_id,
    )
    await state_of(running, site_id, "connected")

    async def reconciled() -> Any:
        # The topic's NOTIFY may reconcile the site after it connected.
        status = await running.call("site.status", {"site_id": site_id})
        return status if status["config_error"] is not None else None

    status = await eventually(reconciled, what="the ignored topic reported")
    assert status["state"] == "connected"
    assert status["config_error"] == (
        f"topic '{site_id}/plain' (sensor_data) ignored: sensor_data needs the levels "
        f"{{sensor_id}} (or as many '+' levels) in '{site_id}/plain'"
    )
    assert [s["topic"] for s in status["subscriptions"]] == [f"{site_id}/gateway/+/heartbeat"]
    assert (await running.call("service.status"))["connected"] == 1
    assert [s["site_id"] for s in (await running.call("site.list"))["items"]] == [site_id]
    with pytest.raises(psycopg2.errors.CheckViolation):
        await write(
            sql, "INSERT INTO mqtt_connection (site_id, host) VALUES ('bad id', 'h') RETURNING id"
        )


@pytest_twisted.ensureDeferred
async def test_unknown_host_is_a_dns_error(running: RunningService, site_id: str) -> None:
    """A host name that does not resolve is reported as such."""
    await running.call("site.create", {"site_id": site_id, "host": "no-such-host.invalid"})
    status = await state_of(running, site_id, "waiting")
    assert status["last_error"].startswith("dns: cannot resolve host")


@pytest_twisted.ensureDeferred
async def test_sql_changes_reconcile(running: RunningService, sql: Any, site_id: str) -> None:
    """New topics resubscribe in place; disabling and deleting stop the site."""
    await eventually(lambda: running.root.getServiceNamed("config-listener").listening)
    await insert_site(sql, site_id)
    await state_of(running, site_id, "connected")
    first = running.supervisor.site(site_id)
    await write(
        sql,
        "INSERT INTO mqtt_topic (connection_id, topic, kind) SELECT id, %s, 'other' "
        "FROM mqtt_connection WHERE site_id = %s RETURNING id",
        f"{site_id}/extra/#",
        site_id,
    )

    async def resubscribed() -> Any:
        status = await running.call("site.status", {"site_id": site_id})
        return f"{site_id}/extra/#" in [s["topic"] for s in status["subscriptions"]]

    await eventually(resubscribed, what="the new subscription")
    assert running.supervisor.site(site_id) is first, "topics alone must not reconnect"
    await publish([(f"{site_id}/extra/a/b", b"hello")])
    await eventually(
        lambda: execute(
            sql,
            "SELECT 1 FROM discovered_topic WHERE site_id = %s AND topic_path = %s",
            site_id,
            f"{site_id}/extra/a/b",
        ),
        what="a message on the new subscription",
    )
    await write(
        sql, "UPDATE mqtt_connection SET keepalive = 30 WHERE site_id = %s RETURNING id", site_id
    )
    await eventually(lambda: running.supervisor.site(site_id) is not first, what="reconnect")
    await state_of(running, site_id, "connected")
    await write(
        sql,
        "UPDATE mqtt_connection SET is_enabled = false WHERE site_id = %s RETURNING id",
        site_id,
    )
    await eventually(
        lambda: running.supervisor.site(site_id) is None, what="disabled site stopping"
    )
    await write(
        sql, "UPDATE mqtt_connection SET is_enabled = true WHERE site_id = %s RETURNING id", site_id
    )
    await state_of(running, site_id, "connected")
    await write(sql, "DELETE FROM mqtt_connection WHERE site_id = %s RETURNING id", site_id)
    await eventually(lambda: running.supervisor.site(site_id) is None, what="deleted site stopping")


@pytest_twisted.ensureDeferred
async def test_wrong_password_is_an_auth_error(
    running: RunningService, sql: Any, site_id: str, password_broker: PrivateBroker
) -> None:
    """Refused credentials go to error with the broker's reason; fixing them reconnects."""
    await running.call(
        "site.create",
        {
            "site_id": site_id,
            "host": "127.0.0.1",
            "port": password_broker.port,
            "username": "reader",
            "password": "wrong-password",
        },
    )
    status = await state_of(running, site_id, "error")
    assert status["status"] == "error"
    assert status["last_error"].startswith("auth: broker refused the credentials")
    assert "wrong-password" not in str(status)
    await write(
        sql,
        "UPDATE mqtt_connection SET password = 'right-password' WHERE site_id = %s RETURNING id",
        site_id,
    )
    status = await state_of(running, site_id, "connected")
    assert status["mqtt_retry_count"] == 0 and status["last_error"] is None


@asynccontextmanager
async def site_on_fake_broker(
    running: RunningService, site_id: str, broker: FakeBroker, **params: Any
) -> AsyncIterator[None]:
    """
    A site connected to a scripted broker on a free port, removed after.
    """
    from twisted.internet import reactor

    port = reactor.listenTCP(0, broker, interface="127.0.0.1")
    try:
        await running.call(
            "site.create",
            {"site_id": site_id, "host": "127.0.0.1", "port": port.getHost().port, **params},
        )
        yield
    finally:
        await running.call("site.stop", {"site_id": site_id})
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_refused_subscription_shows_in_status(running: RunningService, site_id: str) -> None:
    """A SUBACK that refuses a filter is reported in last_error and the status data."""
    async with site_on_fake_broker(running, site_id, FakeBroker(refuse_subscriptions=True)):

        async def refused() -> Any:
            status = await running.call("site.status", {"site_id": site_id})
            return status if status["subscriptions"] else None

        status = await eventually(refused, what="the SUBACK")
        assert status["state"] == "connected"
        assert [s["granted"] for s in status["subscriptions"]] == [False, False, False]
        assert status["last_error"].startswith(
            f"subscription refused: {site_id}/gateway/+/heartbeat"
        )


@pytest_twisted.ensureDeferred
async def test_silent_link_is_closed_and_retried(running: RunningService, site_id: str) -> None:
    """A broker that stops answering (no PINGRESP) is dropped after about two keepalives."""
    broker = FakeBroker(silent=True)
    async with site_on_fake_broker(running, site_id, broker, keepalive=5):
        connected = await state_of(running, site_id, "connected")
        waiting = await state_of(running, site_id, "waiting", within=15)
        silence = (
            datetime.fromisoformat(waiting["state_since"])
            - datetime.fromisoformat(connected["state_since"])
        ).total_seconds()
        assert 9 <= silence <= 13
        assert waiting["last_error"].startswith(("timeout: ", "network: "))
        assert 12 in broker.received  # it did ask with PINGREQ first


def _read_retained(topic: str) -> bytes | None:
    import queue

    got: queue.Queue[bytes] = queue.Queue()
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"test-sub-{uuid.uuid4().hex[:8]}")
    client.on_message = lambda c, u, m: got.put(m.payload)
    client.connect(BROKER_HOST, BROKER_PORT)
    client.subscribe(topic, qos=1)
    client.loop_start()
    try:
        return got.get(timeout=2)
    except queue.Empty:
        return None
    finally:
        client.disconnect()
        client.loop_stop()


@pytest_twisted.ensureDeferred
async def test_birth_and_last_will(running: RunningService, site_id: str) -> None:
    """A site with a status topic says online when connected and offline when stopped."""
    topic = f"mqttsvc-status/{site_id}"
    await running.call(
        "site.create",
        {"site_id": site_id, "host": BROKER_HOST, "port": BROKER_PORT, "status_topic": topic},
    )
    await state_of(running, site_id, "connected")
    assert await eventually(
        lambda: deferToThread(_read_retained, topic).addCallback(lambda p: p == b"online"),
        what="the retained online message",
    )
    await running.call("site.stop", {"site_id": site_id})
    assert await deferToThread(_read_retained, topic) == b"offline"
    await publish([(topic, b"")], retain=True)  # clear the retained message


@pytest_twisted.ensureDeferred
async def test_operator_actions_and_events(running: RunningService, sql: Any, site_id: str) -> None:
    """
    restart reconnects and is recorded; stop and start flip is_enabled;
    unknown sites are named; the history lists every transition.
    """
    await running.call(
        "site.create", {"site_id": site_id, "host": BROKER_HOST, "port": BROKER_PORT}
    )
    await state_of(running, site_id, "connected")
    restarted = await running.call("site.restart", {"site_id": site_id})
    assert restarted["mqtt_retry_count"] == 0
    assert restarted["state"] in ("restarting", "connecting", "connected")
    await state_of(running, site_id, "connected")
    stopped = await running.call("site.stop", [site_id])
    assert (stopped["state"], stopped["is_enabled"]) == ("stopped", False)
    started = await running.call("site.start", [site_id])
    assert started["is_enabled"] is True
    await state_of(running, site_id, "connected")
    for method in ("site.start", "site.stop", "site.restart"):
        missing = await running.call_raw(method, {"site_id": "no-such-site"})
        assert missing["error"]["code"] == -32001
        assert "no-such-site" in missing["error"]["message"]

    events = (await running.call("event.list", {"site_id": site_id}))["items"]
    transitions = [(e["data"]["from"], e["data"]["to"]) for e in events]
    assert transitions[:2] == [("stopped", "connecting"), ("connecting", "connected")]
    assert ("connected", "restarting") in transitions
    assert ("stopping", "stopped") in transitions
    assert any(e["data"]["reason"] == "restart requested" for e in events)
    assert all(e["type"] == "connection" and e["site_id"] == site_id for e in events)
    later = (await running.call("event.list", {"site_id": site_id, "since": events[1]["at"]}))[
        "items"
    ]
    assert later and all(e["at"] > events[1]["at"] for e in later)
    assert execute(sql, "SELECT count(*) FROM connection_event WHERE site_id = %s", site_id) == [
        (len(events),)
    ]


@pytest_twisted.ensureDeferred
async def test_retry_state_survives_a_restart(db_dsn: str, no_sites: None, sql: Any) -> None:
    """A site in error stays in error across a restart; a waiting one waits for its time."""
    from twisted.internet import reactor

    now = datetime.now(UTC)
    await insert_site(
        sql,
        "gave-up",
        status="error",
        mqtt_retry_count=10,
        mqtt_next_retry=now + timedelta(hours=1),
        last_error="auth: nope",
    )
    await insert_site(
        sql,
        "backing-off",
        status="disconnected",
        mqtt_retry_count=3,
        mqtt_next_retry=now + timedelta(seconds=2),
        last_error="refused: connection refused",
    )
    await insert_site(
        sql,
        "waits-long",
        status="disconnected",
        mqtt_retry_count=3,
        mqtt_next_retry=now + timedelta(hours=1),
        last_error="refused: connection refused",
    )
    service = RunningService(reactor, db_dsn)
    await service.start()
    try:
        waiting = await service.call("site.status", ["waits-long"])
        assert (waiting["state"], waiting["mqtt_retry_count"]) == ("waiting", 3)
        assert datetime.fromisoformat(waiting["mqtt_next_retry"]) == now + timedelta(hours=1)
        error = await service.call("site.status", ["gave-up"])
        assert (error["state"], error["mqtt_retry_count"], error["last_error"]) == (
            "error",
            10,
            "auth: nope",
        )
        assert datetime.fromisoformat(error["mqtt_next_retry"]) == now + timedelta(hours=1)
        connected = await state_of(service, "backing-off", "connected")
        assert datetime.fromisoformat(connected["last_connected_at"]) >= now + timedelta(seconds=2)
        # It waited for its time first, as its history says (a call while
        # it waits raced the 2 s on a loaded machine).
        await service.ingest.writer.when_idle()
        history = execute(
            sql,
            "SELECT to_state, reason FROM connection_event"
            " WHERE site_id = 'backing-off' ORDER BY id",
        )
        assert history[0] == ("waiting", "resumed after a restart of mqttsvc")
        assert [state for state, _ in history[1:3]] == ["connecting", "connected"]
        assert (await service.call("site.status", ["gave-up"]))["state"] == "error"
    finally:
        await service.stop()
