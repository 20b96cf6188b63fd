"""
Messages into device state against the real broker and database: every
kind of message, duplicates, custom layouts, retained replays, offline and
unknown transitions, malformed input among valid, and database connections
killed mid-stream.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest_twisted
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread

from tests.conftest import BROKER_HOST, BROKER_PORT, PrivateBroker
from tests.publish import publish, publish_blocking
from tests.service import RunningService
from tests.waiting import eventually


def query(sql: Any, text: str, *params: Any) -> list[tuple[Any, ...]]:
    with sql.cursor() as cur:
        cur.execute(text, params)
        return list(cur.fetchall())


async def connected_site(running: RunningService, site_id: str, **params: Any) -> None:
    params = {"host": BROKER_HOST, "port": BROKER_PORT, **params}
    await running.call("site.create", {"site_id": site_id, **params})

    async def up() -> bool:
        status = await running.call("site.status", [site_id])
        return bool(status["state"] == "connected" and status["subscriptions"])

    await eventually(up, what=f"{site_id} connected and subscribed")


def j(value: Any) -> bytes:
    return json.dumps(value).encode()


@pytest_twisted.ensureDeferred
async def test_every_kind_of_message(running: RunningService, sql: Any, site_id: str) -> None:
    """Gateways, dataloggers (under their gateway), sensors and readings land in their tables."""
    await connected_site(running, site_id)
    s = site_id
    await publish(
        [
            (f"{s}/gateway/gw-1/heartbeat", j({"status": "ok", "interval": 30, "fw": "2.1"})),
            (f"{s}/datalogger/gw-1/dl-1/heartbeat", j({"status": "degraded"})),
            (f"{s}/datalogger/gw-2/dl-1/heartbeat", j({})),
            (
                f"{s}/sensor/t-1/data",
                j({"ts": "2026-03-01T12:00:00Z", "value": 21.5, "unit": "°C"}),
            ),
            (f"{s}/sensor/t-2/data", j({"ts": 1772366400, "values": {"temp": 20, "hum": 41.5}})),
        ]
    )

    def readings() -> Any:
        rows = query(
            sql,
            "SELECT sensor_id, ts, name, value, unit FROM sensor_reading WHERE site_id = %s "
            "ORDER BY sensor_id, name",
            s,
        )
        return rows if len(rows) == 3 else None

    march = datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert await eventually(readings, what="three readings") == [
        ("t-1", march, "value", 21.5, "°C"),
        ("t-2", march, "hum", 41.5, None),
        ("t-2", march, "temp", 20.0, None),
    ]
    assert query(
        sql,
        "SELECT gateway_id, status, reported_status, heartbeat_interval, last_payload "
        "FROM gateway WHERE site_id = %s",
        s,
    ) == [("gw-1", "online", "ok", 30.0, {"status": "ok", "interval": 30, "fw": "2.1"})]
    assert query(
        sql,
        "SELECT gateway_id, datalogger_id, status, reported_status FROM datalogger "
        "WHERE site_id = %s ORDER BY gateway_id",
        s,
    ) == [("gw-1", "dl-1", "online", "degraded"), ("gw-2", "dl-1", "online", None)]
    assert query(sql, "SELECT sensor_id, status FROM sensor WHERE site_id = %s ORDER BY 1", s) == [
        ("t-1", "online"),
        ("t-2", "online"),
    ]
    events = query(
        sql,
        "SELECT kind, from_status, to_status, reason FROM device_event WHERE site_id = %s",
        s,
    )
    assert len(events) == 5
    assert set(events) == {
        ("gateway", "unknown", "online", "message received"),
        ("datalogger", "unknown", "online", "message received"),
        ("sensor", "unknown", "online", "message received"),
    }


@pytest_twisted.ensureDeferred
async def test_duplicates_do_not_double(running: RunningService, sql: Any, site_id: str) -> None:
    """A reading delivered three times is stored once; the topic counts all three."""
    await connected_site(running, site_id)
    topic = f"{site_id}/sensor/t/data"
    await publish([(topic, j({"ts": 1772366400.25, "value": 7}))] * 3)
    await eventually(
        lambda: query(
            sql,
            "SELECT 1 FROM discovered_topic WHERE site_id = %s AND message_count = 3",
            site_id,
        ),
        what="three messages counted",
    )
    assert query(sql, "SELECT count(*) FROM sensor_reading WHERE site_id = %s", site_id) == [(1,)]


@pytest_twisted.ensureDeferred
async def test_custom_layout_by_configuration(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """A site whose devices use another topic layout needs only named levels."""
    await connected_site(
        running,
        site_id,
        topics=[
            {"topic": f"{site_id}/{{gateway_id}}/status", "kind": "gateway_heartbeat"},
            {"topic": f"{site_id}/m/{{sensor_id}}/v/#", "kind": "sensor_data"},
        ],
    )
    await publish(
        [
            (f"{site_id}/gw-9/status", j({"status": "ok"})),
            (f"{site_id}/m/pump/v/rpm", j({"value": 1450})),
        ]
    )

    def landed() -> Any:
        return query(
            sql, "SELECT sensor_id, name, value FROM sensor_reading WHERE site_id = %s", site_id
        )

    assert await eventually(landed, what="the reading") == [("pump", "value", 1450.0)]
    assert query(sql, "SELECT gateway_id FROM gateway WHERE site_id = %s", site_id) == [("gw-9",)]


@pytest_twisted.ensureDeferred
async def test_retained_heartbeat_is_not_a_sign_of_life(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """A retained heartbeat replayed on subscribe does not bring a gateway online."""
    topic = f"{site_id}/gateway/old/heartbeat"
    await publish([(topic, j({"status": "ok"}))], retain=True)
    try:
        await connected_site(running, site_id)
        await eventually(
            lambda: query(sql, "SELECT 1 FROM discovered_topic WHERE topic_path = %s", topic),
            what="the retained message",
        )
        assert query(sql, "SELECT count(*) FROM gateway WHERE site_id = %s", site_id) == [(0,)]
    finally:
        await publish([(topic, b"")], retain=True)


@pytest_twisted.ensureDeferred
async def test_offline_then_unknown_then_grace(
    running: RunningService, sql: Any, site_id: str, private_broker: PrivateBroker
) -> None:
    """
    Real timing: a silent gateway goes offline at its deadline; while the
    site is disconnected it is unknown; after reconnecting it gets a grace
    period before it is offline again.
    """
    await running.call(
        "site.create",
        {
            "site_id": site_id,
            "host": "127.0.0.1",
            "port": private_broker.port,
            "device_intervals": {"gateway": 0.5},
            "offline_grace": 1,
        },
    )
    await eventually(
        lambda: (
            running.supervisor.site(site_id) is not None
            and running.supervisor.site(site_id).state.state == "connected"
        ),  # type: ignore[union-attr]
        what="connected",
    )
    await publish([(f"{site_id}/gateway/gw/heartbeat", j({}))], port=private_broker.port)

    def transitions() -> list[tuple[Any, ...]]:
        return query(
            sql,
            "SELECT from_status, to_status, at FROM device_event WHERE site_id = %s ORDER BY id",
            site_id,
        )

    await eventually(lambda: len(transitions()) == 2, what="online, then offline")
    (_, online, t_online), (_, offline, t_offline) = transitions()
    assert (online, offline) == ("online", "offline")
    late = (t_offline - t_online).total_seconds()
    assert 0.5 <= late < 1.5, late

    private_broker.stop()
    await eventually(lambda: len(transitions()) == 3, what="unknown while disconnected")
    # A site-wide change: one summary row (no device, no former status).
    assert transitions()[2][:2] == (None, "unknown")
    assert query(
        sql,
        "SELECT kind, device_id, devices FROM device_event WHERE site_id = %s AND id = "
        "(SELECT max(id) FROM device_event WHERE site_id = %s)",
        site_id,
        site_id,
    ) == [("site", None, 1)]
    assert query(sql, "SELECT status FROM gateway WHERE site_id = %s", site_id) == [("unknown",)]
    private_broker.start()
    # Offline again after its grace: the status it had before its site went,
    # so its row changes without an event of its own.
    await eventually(
        lambda: (
            query(sql, "SELECT status FROM gateway WHERE site_id = %s", site_id) == [("offline",)]
        ),
        within=15,
        what="offline after the grace",
    )
    assert len(transitions()) == 3


@pytest_twisted.ensureDeferred
async def test_malformed_among_valid(running: RunningService, sql: Any, site_id: str) -> None:
    """Bad messages become dead letters with reasons; every good one around them lands."""
    await connected_site(running, site_id)
    bad = [b"garbage", j([1]), j({"value": "x"}), j({"values": {}}), j({"ts": "then", "value": 1})]
    messages = []
    for i in range(100):
        messages.append((f"{site_id}/sensor/s/data", j({"ts": 1772366400 + i, "value": i})))
        messages.append((f"{site_id}/sensor/s/data", bad[i % len(bad)]))
    messages.append((f"{site_id}/sensor/s/data", b"{" + b" " * 300_000 + b"}"))
    await publish(messages)

    def counted() -> Any:
        return query(
            sql,
            "SELECT (SELECT count(*) FROM sensor_reading WHERE site_id = %s), "
            "(SELECT count(*) FROM dead_letter WHERE site_id = %s)",
            site_id,
            site_id,
        ) == [(100, 101)]

    await eventually(counted, what="100 readings and 101 dead letters")
    reasons = {
        r.split(":")[0]
        for (r,) in query(sql, "SELECT reason FROM dead_letter WHERE site_id = %s", site_id)
    }
    assert reasons == {
        "payload is not JSON",
        "payload is a JSON array, not an object",
        "value must be a finite number, not a JSON string",
        "values must be a non-empty object of names to numbers",
        "ts 'then' is neither epoch seconds nor ISO 8601",
        "payload of 300002 bytes is over the limit of 262144",
    }
    status = await running.call("site.status", [site_id])
    assert (status["state"], status["messages_rejected"], status["messages_received"]) == (
        "connected",
        101,
        201,
    )


@pytest_twisted.ensureDeferred
async def test_database_connections_killed_mid_stream(
    running: RunningService, sql: Any, site_id: str, private_broker: PrivateBroker
) -> None:
    """
    Terminating the service's database connections while messages flow
    loses nothing and doubles nothing: every reading is there exactly once.
    (The broker queues without limit, as production brokers for mqttsvc
    must: Mosquitto's default drops a slow client's messages after 1000.)
    """
    from twisted.internet import reactor

    await connected_site(running, site_id, host="127.0.0.1", port=private_broker.port)
    total = 3000
    messages = [
        (f"{site_id}/sensor/s{i % 10}/data", j({"ts": 1772366400 + i, "value": i}))
        for i in range(total)
    ]
    publishing = deferToThread(publish_blocking, "127.0.0.1", private_broker.port, messages, False)
    kills = 0
    while not publishing.called and kills < 20:
        killed = await deferToThread(
            query,
            sql,
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        kills += killed[0][0]
        await deferLater(reactor, 0.05, lambda: None)
    await publishing
    assert kills > 0

    def all_there() -> Any:
        return query(
            sql,
            "SELECT count(*), count(DISTINCT ts) FROM sensor_reading WHERE site_id = %s",
            site_id,
        ) == [(total, total)]

    await eventually(all_there, within=30, what=f"all {total} readings")
    assert query(sql, "SELECT count(*) FROM dead_letter WHERE site_id = %s", site_id) == [(0,)]


@pytest_twisted.ensureDeferred
async def test_restart_rebuilds_deadlines(
    db_dsn: str, no_sites: None, sql: Any, site_id: str
) -> None:
    """
    After a restart of mqttsvc, known devices are unknown until their site
    connects, then get a grace period: one that stays silent goes offline,
    one that speaks is online.
    """
    from twisted.internet import reactor

    first = RunningService(reactor, db_dsn)
    await first.start()
    await connected_site(first, site_id, device_intervals={"gateway": 0.5}, offline_grace=2)
    await publish(
        [(f"{site_id}/gateway/{g}/heartbeat", j({"interval": 60})) for g in ("quiet", "chatty")]
    )

    def statuses() -> dict[str, str]:
        return dict(
            query(sql, "SELECT gateway_id, status FROM gateway WHERE site_id = %s", site_id)
        )

    await eventually(lambda: statuses() == {"quiet": "online", "chatty": "online"}, what="online")
    await first.stop()
    assert statuses() == {"quiet": "unknown", "chatty": "unknown"}

    second = RunningService(reactor, db_dsn)
    await second.start()
    try:
        # "quiet" said its interval is 60 s: its grace after reconnecting is
        # 2 x 60 s, far beyond this test, so it stays unknown; "chatty" speaks.
        await publish([(f"{site_id}/gateway/chatty/heartbeat", j({"interval": 0.5}))])
        await eventually(lambda: statuses()["chatty"] == "online", what="chatty online")
        await eventually(lambda: statuses()["chatty"] == "offline", what="chatty offline")
        assert statuses()["quiet"] == "unknown"
        reasons = query(
            sql,
            "SELECT reason FROM device_event WHERE site_id = %s AND device_id = 'quiet' "
            "ORDER BY id",
            site_id,
        )
        assert reasons == [("message received",)]
        # Its change to unknown at the stop is in the site's summary.
        assert query(
            sql,
            "SELECT kind, to_status, reason, devices FROM device_event WHERE site_id = %s "
            "AND device_id IS NULL ORDER BY id",
            site_id,
        ) == [("site", "unknown", "site connection stopping", 2)]
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_known_devices_go_offline_after_every_restart(
    db_dsn: str, no_sites: None, sql: Any, site_id: str
) -> None:
    """
    20,000 known devices (inserted by SQL) and a probe that speaks go
    offline on time after each of three restarts, with a resync racing the
    first reconciliation: the devices are loaded once, before the site
    connects, and none is left without a deadline.  Each restart is one
    summary event for the site (and its stop another), not one per
    device: a device offline before and offline again after its grace has
    no event of its own.
    """
    from twisted.internet import reactor

    count = 20_000
    first = RunningService(reactor, db_dsn)
    await first.start()
    await connected_site(first, site_id, device_intervals={"gateway": 1}, offline_grace=1.5)
    await first.stop()
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO gateway (site_id, gateway_id, status, first_seen_at, last_seen_at) "
            "SELECT %s, 'g' || i, 'offline', now(), now() FROM generate_series(1, %s) AS i",
            (site_id, count),
        )
    sql.commit()

    def offline() -> int:
        [(n,)] = query(
            sql, "SELECT count(*) FROM gateway WHERE site_id = %s AND status = 'offline'", site_id
        )
        return int(n)

    def went_offline() -> int:
        """Times a known device went from unknown to offline."""
        [(n,)] = query(
            sql,
            "SELECT count(*) FROM device_event WHERE site_id = %s AND device_id <> 'probe' "
            "AND from_status = 'unknown' AND to_status = 'offline'",
            site_id,
        )
        return int(n)

    for restart in range(3):
        service = RunningService(reactor, db_dsn)
        service.root.startService()
        # The configuration listener's resync and the monitor's first pass
        # both reconcile at start; add a third for good measure.
        service.supervisor.resync()
        try:
            await service.supervisor.when_loaded()
            await publish([(f"{site_id}/gateway/probe/heartbeat", j({"status": "ok"}))])
            await eventually(
                lambda: offline() == count + 1,
                within=30,
                what=f"every known device and the probe offline again (restart {restart})",
            )
            assert went_offline() == 0
            summaries = query(
                sql,
                "SELECT reason, devices FROM device_event WHERE site_id = %s AND kind = 'site' "
                "ORDER BY id",
                site_id,
            )
            # The first start makes every device unknown (one row); each
            # stop makes them unknown again (one row), and the next start
            # finds them unknown already (no row).
            assert summaries[0] == ("mqttsvc started", count)
            assert summaries[1:] == [("site connection stopping", count + 1)] * restart
            assert service.ingest.liveness.devices_repaired == 0
            assert service.ingest.devices.counts()["offline"] == count + 1
        finally:
            await service.stop()
