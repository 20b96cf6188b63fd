"""
End to end in one process: a real Mosquitto, a real PostgreSQL, the real
service tree, and calls over HTTP.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_twisted

from tests.conftest import BROKER_HOST, BROKER_PORT, PrivateBroker, free_port
from tests.publish import publish
from tests.service import RunningService
from tests.waiting import eventually


async def counts_only(running: RunningService) -> dict[str, Any]:
    """service.status without its descriptors (tests/test_descriptors.py checks those)."""
    status: dict[str, Any] = await running.call("service.status")
    assert status.pop("descriptors")["limit"] > 0
    return status


def query(sql: Any, text: str, *params: Any) -> list[tuple[Any, ...]]:
    with sql.cursor() as cur:
        cur.execute(text, params)
        return list(cur.fetchall())


async def create(service: RunningService, site_id: str, **params: Any) -> Any:
    params = {"site_id": site_id, "host": BROKER_HOST, "port": BROKER_PORT, **params}
    return await service.call("site.create", params)


async def connected(service: RunningService, site_id: str) -> dict[str, Any]:
    async def check() -> Any:
        status = await service.call("site.status", {"site_id": site_id})
        return status if status["status"] == "connected" else None

    result: dict[str, Any] = await eventually(check, what=f"{site_id} connecting")
    return result


@pytest_twisted.ensureDeferred
async def test_create_connects_and_reports(running: RunningService, sql: Any, site_id: str) -> None:
    """site.create connects an enabled site at once; status fields and the row agree."""
    created = await create(running, site_id, username="reader", password="canary-pw-123")
    assert created["has_password"] is True
    assert "password" not in created
    assert created["topics"][0] == {
        "topic": f"{site_id}/gateway/+/heartbeat",
        "kind": "gateway_heartbeat",
        "qos": 1,
    }
    status = await connected(running, site_id)
    assert status["is_enabled"] is True
    assert status["mqtt_retry_count"] == 0
    assert status["mqtt_next_retry"] is None
    assert status["last_error"] is None
    assert status["topics_list"] == [
        f"{site_id}/gateway/+/heartbeat",
        f"{site_id}/datalogger/+/+/heartbeat",
        f"{site_id}/sensor/+/data",
    ]
    assert status["last_connected_at"].endswith("Z")
    connected_at = datetime.fromisoformat(status["last_connected_at"])
    assert abs((datetime.now(UTC) - connected_at).total_seconds()) < 30

    def row() -> Any:
        rows = query(
            sql,
            "SELECT status, mqtt_retry_count, last_connected_at FROM mqtt_connection "
            "WHERE site_id = %s",
            site_id,
        )
        return rows if rows and rows[0][0] == "connected" else None

    [(_, retries, last_connected_at)] = await eventually(row, what="the status row")
    assert retries == 0
    assert last_connected_at == connected_at
    assert "canary-pw-123" not in str(await running.call("site.get", {"site_id": site_id}))
    assert "canary-pw-123" not in str(await running.call("site.list"))


@pytest_twisted.ensureDeferred
async def test_heartbeat_becomes_gateway_row(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """A heartbeat published by a real client upserts its gateway; topics are counted."""
    await create(running, site_id)
    await connected(running, site_id)
    topic = f"{site_id}/gateway/gw-7/heartbeat"
    await publish([(topic, b'{"status": "ok", "uptime": 1}')] * 2 + [(topic, b"not json")])

    def done() -> Any:
        return query(
            sql,
            "SELECT message_count FROM discovered_topic WHERE site_id = %s AND topic_path = %s "
            "AND message_count = 3",
            site_id,
            topic,
        )

    await eventually(done, what="three messages counted")
    [(status, payload)] = query(
        sql, "SELECT status, last_payload FROM gateway WHERE site_id = %s", site_id
    )
    assert status == "online"
    assert payload == {"status": "ok", "uptime": 1}
    [(reason,)] = query(sql, "SELECT reason FROM dead_letter WHERE site_id = %s", site_id)
    assert reason.startswith("payload is not JSON")


@pytest_twisted.ensureDeferred
async def test_burst_is_batched(running: RunningService, sql: Any, site_id: str) -> None:
    """Many messages are committed in far fewer transactions than messages."""
    await create(running, site_id)
    await connected(running, site_id)
    before = running.ingest.writer.batches_written
    messages = [
        (f"{site_id}/gateway/gw-{i % 50}/heartbeat", b'{"status": "ok"}') for i in range(1000)
    ]
    await publish(messages)

    def done() -> Any:
        rows = query(
            sql, "SELECT sum(message_count) FROM discovered_topic WHERE site_id = %s", site_id
        )
        return rows[0][0] == 1000

    await eventually(done, what="1000 messages committed")
    assert query(sql, "SELECT count(*) FROM gateway WHERE site_id = %s", site_id) == [(50,)]
    assert running.ingest.writer.batches_written - before < 500


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest_twisted.ensureDeferred
async def test_payloads_of_every_size_arrive_intact(
    running: RunningService, sql: Any, site_id: str, protocol: str
) -> None:
    """
    Payloads from a few bytes to well over a socket read (one remaining
    length byte to three) arrive whole, in order, between small ones.
    """
    await create(running, site_id, protocol=protocol)
    await connected(running, site_id)
    sizes = [0, 1, 100, 127, 128, 5_000, 16_383, 16_384, 40_000, 200_000]
    messages = []
    for n, size in enumerate(sizes):
        body = {"status": "ok", "n": n, "pad": "x" * size}
        messages.append((f"{site_id}/gateway/big-{n}/heartbeat", json.dumps(body).encode()))
        messages.append((f"{site_id}/gateway/small/heartbeat", b'{"n": %d}' % n))
    await publish(messages)

    def done() -> Any:
        rows = query(
            sql, "SELECT sum(message_count) FROM discovered_topic WHERE site_id = %s", site_id
        )
        return rows[0][0] == len(messages)

    await eventually(done, what="every message committed")
    stored = query(
        sql,
        "SELECT gateway_id, last_payload FROM gateway WHERE site_id = %s AND gateway_id <> 'small'",
        site_id,
    )
    assert sorted((g, p["n"], len(p["pad"])) for g, p in stored) == [
        (f"big-{n}", n, size) for n, size in enumerate(sizes)
    ]
    [(last,)] = query(
        sql, "SELECT last_payload FROM gateway WHERE site_id = %s AND gateway_id = 'small'", site_id
    )
    assert last == {"n": len(sizes) - 1}
    assert query(sql, "SELECT count(*) FROM dead_letter WHERE site_id = %s", site_id) == [(0,)]


@pytest.mark.parametrize("protocol", ["3.1.1", "5"])
@pytest_twisted.ensureDeferred
async def test_messages_wait_in_the_persistent_session(
    running: RunningService, sql: Any, site_id: str, protocol: str
) -> None:
    """
    QoS 1 messages published while a site is stopped (site.stop) arrive when
    it is started again (site.start): the broker kept the persistent session.
    """
    await create(running, site_id, protocol=protocol)
    await connected(running, site_id)
    stopped = await running.call("site.stop", {"site_id": site_id})
    assert (stopped["status"], stopped["is_enabled"], stopped["state"]) == (
        "disconnected",
        False,
        "stopped",
    )
    assert running.supervisor.site(site_id) is None
    assert query(
        sql, "SELECT status, is_enabled FROM mqtt_connection WHERE site_id = %s", site_id
    ) == [("disconnected", False)]
    await publish([(f"{site_id}/gateway/offline-{i}/heartbeat", b"{}") for i in range(5)])
    assert query(sql, "SELECT count(*) FROM gateway WHERE site_id = %s", site_id) == [(0,)]
    started = await running.call("site.start", {"site_id": site_id})
    assert started["is_enabled"] is True
    assert started["status"] in ("connecting", "connected")

    def arrived() -> Any:
        return query(sql, "SELECT count(*) FROM gateway WHERE site_id = %s", site_id) == [(5,)]

    await eventually(arrived, what="the queued messages")


@pytest_twisted.ensureDeferred
async def test_refused_connection_waits_with_reason(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """A broker that refuses TCP puts the site in backoff with a useful last_error."""
    await create(running, site_id, port=free_port())

    async def waiting() -> Any:
        status = await running.call("site.status", {"site_id": site_id})
        return status if status["state"] == "waiting" else None

    status = await eventually(waiting, what="the first failure")
    assert status["status"] == "disconnected"
    assert status["mqtt_retry_count"] == 1
    assert status["last_error"] == "refused: connection refused"
    delay = (
        datetime.fromisoformat(status["mqtt_next_retry"])
        - datetime.fromisoformat(status["state_since"])
    ).total_seconds()
    assert 3.9 <= delay <= 6.1

    def row() -> Any:
        return query(
            sql,
            "SELECT status, mqtt_retry_count, last_error FROM mqtt_connection "
            "WHERE site_id = %s AND mqtt_retry_count = 1",
            site_id,
        )

    assert await eventually(row, what="the row") == [
        ("disconnected", 1, "refused: connection refused")
    ]


@pytest_twisted.ensureDeferred
async def test_broker_restart_keeps_subscriptions(
    running: RunningService, sql: Any, site_id: str, private_broker: PrivateBroker
) -> None:
    """After its broker restarts, a site reconnects on schedule and still gets messages."""
    await create(running, site_id, port=private_broker.port)
    await connected(running, site_id)
    private_broker.stop()

    async def lost() -> Any:
        status = await running.call("site.status", {"site_id": site_id})
        return status if status["state"] == "waiting" else None

    waiting = await eventually(lost, what="the site noticing the broker is gone")
    assert waiting["mqtt_retry_count"] == 1
    due = datetime.fromisoformat(waiting["mqtt_next_retry"])
    private_broker.start()
    back = await connected(running, site_id)
    # Reconnected at the scheduled retry, not before and not much after.
    reconnected = datetime.fromisoformat(back["last_connected_at"])
    assert due <= reconnected <= due + timedelta(seconds=1.5)
    await publish([(f"{site_id}/gateway/after/heartbeat", b"{}")], port=private_broker.port)

    def arrived() -> Any:
        return query(sql, "SELECT gateway_id FROM gateway WHERE site_id = %s", site_id)

    assert await eventually(arrived, what="a message after the restart") == [("after",)]


@pytest_twisted.ensureDeferred
async def test_control_plane_errors(running: RunningService, site_id: str) -> None:
    """Bad params name the field, a duplicate conflicts, an unknown site is named."""
    bad = await running.call_raw("site.create", {"site_id": site_id, "host": "h", "port": 0})
    assert bad["error"]["code"] == -32602
    assert bad["error"]["data"]["field"] == "port"
    topics = await running.call_raw(
        "site.create", {"site_id": site_id, "host": "h", "topics": [{"topic": "a/#/b"}]}
    )
    assert topics["error"]["data"]["field"] == "topics[0].topic"
    await create(running, site_id, is_enabled=False)
    duplicate = await running.call_raw("site.create", {"site_id": site_id, "host": "h"})
    assert duplicate["error"]["code"] == -32002
    missing = await running.call_raw("site.status", {"site_id": "no-such-site"})
    assert missing["error"]["code"] == -32001
    assert missing["error"]["data"] == {"site_id": "no-such-site"}
    disabled = await running.call("site.status", [site_id])
    assert (disabled["status"], disabled["is_enabled"], disabled["state"]) == (
        "disconnected",
        False,
        "stopped",
    )


@pytest_twisted.ensureDeferred
async def test_service_status_counts(running: RunningService, site_id: str) -> None:
    """service.status counts every site by its status."""
    assert await counts_only(running) == {
        "state": "RUNNING",
        "total": 0,
        "connected": 0,
        "connecting": 0,
        "disconnected": 0,
        "error": 0,
    }
    await create(running, site_id)
    await create(running, site_id + "-off", is_enabled=False)
    await connected(running, site_id)
    assert await counts_only(running) == {
        "state": "RUNNING",
        "total": 2,
        "connected": 1,
        "connecting": 0,
        "disconnected": 1,
        "error": 0,
    }


@pytest_twisted.ensureDeferred
async def test_shutdown_and_start_again(
    db_dsn: str, no_sites: None, sql: Any, site_id: str
) -> None:
    """
    Stopping the service disconnects every site cleanly and says so in the
    database; the next start connects the enabled sites again.
    """
    from twisted.internet import reactor

    first = RunningService(reactor, db_dsn)
    await first.start()
    await create(first, site_id)
    await connected(first, site_id)
    await first.stop()
    assert query(sql, "SELECT status FROM mqtt_connection WHERE site_id = %s", site_id) == [
        ("disconnected",)
    ]
    assert first.ingest.writer.queued == 0
    second = RunningService(reactor, db_dsn)
    await second.start()
    try:
        status = await connected(second, site_id)
        assert status["mqtt_retry_count"] == 0
    finally:
        await second.stop()
