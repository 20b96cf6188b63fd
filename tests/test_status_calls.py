"""
C{service.status} and C{site.status} answered from the supervisor's memory:
they must say exactly what the database and the running services say,
after every kind of change, without reading the database.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from mqttsvc.db.pool import DatabaseUnavailable
from mqttsvc.sites.supervisor import STATUSES
from tests.conftest import BROKER_HOST, BROKER_PORT, PrivateBroker
from tests.service import RunningService
from tests.test_lifecycle import insert_site, write
from tests.waiting import eventually


async def counts_only(running: RunningService) -> dict[str, Any]:
    """service.status without its descriptors (tests/test_descriptors.py checks those)."""
    status: dict[str, Any] = await running.call("service.status")
    assert status.pop("descriptors")["limit"] > 0
    return status


async def state_of(running: RunningService, site_id: str, state: str) -> dict[str, Any]:
    async def check() -> Any:
        status = await running.call("site.status", [site_id])
        return status if status["state"] == state and status["subscriptions"] else None

    result: dict[str, Any] = await eventually(check, what=f"{site_id} becoming {state}")
    return result


async def assert_consistent(running: RunningService) -> dict[str, Any]:
    """
    Both status calls agree with C{site.list}, which still builds every
    status from the site's row (overlaid with its running service, as the
    status calls did before they answered from memory).

    @return: the C{service.status} answer.
    """
    await running.ingest.writer.when_idle()
    listed = (await running.call("site.list", {"limit": 100}))["items"]
    expected: dict[str, Any] = {"state": "RUNNING", "total": len(listed)}
    expected.update(dict.fromkeys(STATUSES, 0))
    for site in listed:
        expected[site["status"]["status"]] += 1
    counted = await counts_only(running)
    assert counted == expected
    for site in listed:
        assert await running.call("site.status", [site["site_id"]]) == site["status"]
    return counted


def counts(**nonzero: int) -> dict[str, Any]:
    return {
        "state": "RUNNING",
        "total": sum(nonzero.values()),
        **dict.fromkeys(STATUSES, 0),
        **nonzero,
    }


@pytest_twisted.ensureDeferred
async def test_status_calls_follow_every_change(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """
    Through create, stop, start, restart, a subscription change, a
    reconnecting change, SQL inserts and deletes, and site.delete, the
    status calls say what the rows and the running services say.
    """
    on, off = site_id, site_id + "-off"
    await running.call("site.create", {"site_id": on, "host": BROKER_HOST, "port": BROKER_PORT})
    await running.call(
        "site.create",
        {"site_id": off, "host": BROKER_HOST, "port": BROKER_PORT, "is_enabled": False},
    )
    await state_of(running, on, "connected")
    assert await assert_consistent(running) == counts(connected=1, disconnected=1)

    stopped = await running.call("site.stop", [on])
    assert (stopped["state"], stopped["is_enabled"]) == ("stopped", False)
    assert await counts_only(running) == counts(disconnected=2)
    assert await running.call("site.status", [on]) == stopped
    await assert_consistent(running)

    await running.call("site.start", [on])
    await state_of(running, on, "connected")
    assert await assert_consistent(running) == counts(connected=1, disconnected=1)

    await running.call("site.restart", [on])
    await state_of(running, on, "connected")
    await assert_consistent(running)

    topics = [{"topic": f"{on}/x/{{sensor_id}}", "kind": "sensor_data"}]
    first = running.supervisor.site(on)
    await running.call("site.update", {"site_id": on, "topics": topics})
    assert running.supervisor.site(on) is first, "a subscription change must not reconnect"
    assert (await running.call("site.status", [on]))["topics_list"] == [f"{on}/x/{{sensor_id}}"]
    await eventually(lambda: _subscribed(running, on, f"{on}/x/+"), what="the new subscription")
    await assert_consistent(running)

    await running.call("site.update", {"site_id": on, "keepalive": 30})
    assert running.supervisor.site(on) is not first
    await state_of(running, on, "connected")
    await assert_consistent(running)

    await running.call("site.start", [off])
    await state_of(running, off, "connected")
    assert await assert_consistent(running) == counts(connected=2)

    await eventually(lambda: running.root.getServiceNamed("config-listener").listening)
    bad = site_id + "-sql"
    await insert_site(sql, bad)
    await write(
        sql,
        "INSERT INTO mqtt_topic (connection_id, topic, kind) SELECT id, %s, 'sensor_data' "
        "FROM mqtt_connection WHERE site_id = %s RETURNING id",
        f"{bad}/plain",
        bad,
    )

    async def reported() -> Any:
        status = await running.call("site.status", [bad])
        return status if status["config_error"] and status["state"] == "connected" else None

    status = await eventually(reported, what="the SQL site connected with its config error")
    assert status["config_error"].startswith(f"topic '{bad}/plain' (sensor_data) ignored")
    assert await assert_consistent(running) == counts(connected=3)

    await running.call("site.delete", [on])
    assert (await running.call_raw("site.status", [on]))["error"]["code"] == -32001
    assert await assert_consistent(running) == counts(connected=2)

    await running.call("site.stop", [off])
    await write(sql, "DELETE FROM mqtt_connection WHERE site_id = %s RETURNING id", off)

    async def forgotten() -> Any:
        return (await running.call("service.status"))["total"] == 1

    await eventually(forgotten, what="the site deleted by SQL leaving the counts")
    assert await assert_consistent(running) == counts(connected=1)


async def _subscribed(running: RunningService, site_id: str, topic: str) -> bool:
    status = await running.call("site.status", [site_id])
    return [s["topic"] for s in status["subscriptions"]] == [topic] and all(
        s["granted"] for s in status["subscriptions"]
    )


@pytest_twisted.ensureDeferred
async def test_stored_error_of_a_site_that_does_not_run(
    db_dsn: str, no_sites: None, sql: Any, site_id: str
) -> None:
    """
    A disabled site whose row says it gave up (error) is counted as error,
    as its row says, until it runs again.
    """
    from twisted.internet import reactor

    await insert_site(sql, site_id, is_enabled=False, status="error", last_error="auth: no")
    running = RunningService(reactor, db_dsn)
    await running.start()
    try:
        assert await assert_consistent(running) == counts(error=1)
        status = await running.call("site.status", [site_id])
        assert (status["status"], status["state"], status["last_error"]) == (
            "error",
            "stopped",
            "auth: no",
        )
        await running.call("site.start", [site_id])
        await state_of(running, site_id, "connected")
        assert await assert_consistent(running) == counts(connected=1)
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_a_lost_connection_is_counted_at_once(
    running: RunningService, site_id: str, private_broker: PrivateBroker
) -> None:
    """
    When a site loses its broker, service.status says so as soon as
    site.status does, without waiting for the row to be written.
    """
    await running.call(
        "site.create", {"site_id": site_id, "host": "127.0.0.1", "port": private_broker.port}
    )
    await state_of(running, site_id, "connected")
    assert await counts_only(running) == counts(connected=1)
    private_broker.stop()

    async def lost() -> Any:
        status = await running.call("site.status", [site_id])
        return status if status["status"] != "connected" else None

    status = await eventually(lost, what="the connection lost")
    assert await counts_only(running) == counts(**{status["status"]: 1})
    await assert_consistent(running)


@pytest_twisted.ensureDeferred
async def test_status_calls_of_running_sites_need_no_database(
    running: RunningService, site_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With the database unreachable, service.status and the site.status of a
    running site still answer; a stopped site's status needs its row.
    """
    await running.call("site.create", {"site_id": site_id, "host": BROKER_HOST})
    await running.call(
        "site.create", {"site_id": site_id + "-off", "host": BROKER_HOST, "is_enabled": False}
    )
    await state_of(running, site_id, "connected")
    before = await running.call("site.status", [site_id])
    await running.ingest.writer.when_idle()

    async def unreachable(*args: Any, **kwargs: Any) -> Any:
        raise DatabaseUnavailable("the test cut it off")

    monkeypatch.setattr(running.store.pool, "query", unreachable)
    assert await counts_only(running) == counts(connected=1, disconnected=1)
    assert await running.call("site.status", [site_id]) == before
    stopped = await running.call_raw("site.status", [site_id + "-off"])
    assert stopped["error"]["code"] == -32003
