"""
Device state at scale (issue 14) against the real broker and database:
the per-site device limit (dead letters, one event, an alert), site-wide
transitions as one summary event while every device's row still changes,
device state that follows the newest ts, ts too far ahead, and a foreign
topic from a scripted non-compliant broker.

Known devices are inserted by SQL: publishing tens of thousands would take
longer than the behaviour under test.
"""

from __future__ import annotations

import time
import zlib
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThread

from mqttsvc.config import ConfigError, SiteConfig
from mqttsvc.events.alerts import AlertRules
from mqttsvc.events.hub import Event
from mqttsvc.ingest.processing import FOREIGN_TOPIC
from mqttsvc.records import DeadLetter, DeviceSeen, Reading, TopicSeen
from mqttsvc.tap import Options, check_values
from tests.conftest import BROKER_HOST, BROKER_PORT, PrivateBroker
from tests.fakebroker import FakeBroker, publish_header
from tests.publish import publish
from tests.service import RunningService
from tests.test_devices import j, query
from tests.test_hostile_broker import listening, running_site
from tests.waiting import eventually


async def create_site(service: RunningService, site_id: str, **params: Any) -> None:
    params = {"host": BROKER_HOST, "port": BROKER_PORT, **params}
    await service.call("site.create", {"site_id": site_id, **params})


async def site_with_known_devices(
    db_dsn: str, sql: Any, site_id: str, table: str, status: str, count: int, **params: Any
) -> None:
    """
    Create a site (with a service that then stops) and give it C{count}
    known devices of one table, inserted by SQL.
    """
    from twisted.internet import reactor

    first = RunningService(reactor, db_dsn)
    await first.start()
    await create_site(first, site_id, **params)
    await first.stop()
    with sql.cursor() as cur:
        cur.execute(
            f"INSERT INTO {table} (site_id, {table}_id, status, first_seen_at, last_seen_at) "
            "SELECT %s, left(%s, 1) || i, %s, now(), now() FROM generate_series(1, %s) AS i",
            (site_id, table, status, count),
        )


async def subscribed(service: RunningService, site_id: str) -> None:
    async def up() -> bool:
        status = await service.call("site.status", [site_id])
        return bool(status["state"] == "connected" and status["subscriptions"])

    await eventually(up, what=f"{site_id} connected and subscribed")


def test_device_limit_and_clock_skew_options() -> None:
    """
    --max-devices (100,000) and --max-clock-skew (300 s), or their
    variables, reach every site; a limit that is not a whole number from 1
    to 100,000,000, or a skew that is not positive, is refused naming the
    option; a site's own max_devices is checked the same way.
    """
    options = Options(environ={})
    options.parseOptions([])
    check_values(options)
    assert (options["max-devices"], options["max-clock-skew"]) == (100_000, 300.0)
    options = Options(environ={"MQTTSVC_MAX_DEVICES": "5", "MQTTSVC_MAX_CLOCK_SKEW": "2.5"})
    options.parseOptions([])
    check_values(options)
    assert (options["max-devices"], options["max-clock-skew"]) == (5, 2.5)
    for name, bad in (
        ("max-devices", "0"),
        ("max-devices", "1.5"),
        ("max-devices", "100000001"),
        ("max-clock-skew", "0"),
    ):
        options = Options(environ={})
        options.parseOptions([f"--{name}", bad])
        with pytest.raises(ConfigError) as refused:
            check_values(options)
        assert refused.value.field == name
    for bad_limit in (0, 1.5, True, 10**9):
        with pytest.raises(ConfigError, match="from 1 to 100000000") as refused:
            SiteConfig("s", "h", max_devices=bad_limit)  # type: ignore[arg-type]
        assert refused.value.field == "max_devices"


def test_device_limit_and_site_summaries_raise_alerts() -> None:
    """
    A site that reaches its device limit raises a device_limit alert
    naming the limit and the first refused device; with
    --alert-device-offline, a site-wide change to offline is one alert
    with the count, while a site-wide unknown (the link lost, which has
    alerts of its own) raises none.
    """
    now = datetime.now(UTC)
    limit = Event(
        1,
        "service",
        "s",
        now,
        {"problem": "device_limit_reached", "limit": 5, "kind": "sensor", "device_id": "x6"},
    )
    alert = AlertRules().alert_for(limit)
    assert alert is not None and alert.kind == "device_limit"
    assert alert.text == (
        "site s has reached its limit of 5 devices: messages of new device ids are dead letters "
        "(the first: sensor x6)"
    )
    summary = {"kind": "site", "device_id": None, "gateway_id": None, "from": None}
    unknown = Event(2, "device", "s", now, {**summary, "to": "unknown", "devices": 300_000})
    assert AlertRules(device_offline=True).alert_for(unknown) is None
    offline = Event(3, "device", "s", now, {**summary, "to": "offline", "devices": 7})
    alert = AlertRules(device_offline=True).alert_for(offline)
    assert alert is not None and alert.text == "7 devices of site s are offline"


@pytest_twisted.ensureDeferred
async def test_a_site_at_its_device_limit(
    db_dsn: str, no_sites: None, sql: Any, site_id: str
) -> None:
    """
    A site with 20,000 known sensors (inserted by SQL) and max_devices
    20,000 (the service's --max-devices is larger): a message of a new
    sensor is a dead letter saying so, with no device, reading or
    discovered topic; the first refusal is one service event (and so an
    alert), however many follow; known sensors still report.  A higher
    limit set by SQL applies at once, without a reconnect.
    """
    from twisted.internet import reactor

    count = 20_000
    await site_with_known_devices(db_dsn, sql, site_id, "sensor", "offline", count)
    with sql.cursor() as cur:
        cur.execute(
            "UPDATE mqtt_connection SET max_devices = %s WHERE site_id = %s", (count, site_id)
        )
    service = RunningService(reactor, db_dsn, "--max-devices", "50000")
    started = time.monotonic()
    await service.start()
    try:
        assert service.ingest.devices.site_count(site_id) == count
        await subscribed(service, site_id)
        load_seconds = time.monotonic() - started
        await publish(
            [
                (f"{site_id}/sensor/new-1/data", j({"value": 1})),
                (f"{site_id}/sensor/new-2/data", j({"value": 2})),
                (f"{site_id}/sensor/s7/data", j({"value": 7})),
            ]
        )

        def landed() -> bool:
            readings = query(
                sql, "SELECT sensor_id FROM sensor_reading WHERE site_id = %s", site_id
            )
            dead = query(sql, "SELECT count(*) FROM dead_letter WHERE site_id = %s", site_id)
            return readings == [("s7",)] and dead == [(2,)]

        await eventually(landed, what="the known sensor's reading and two dead letters")
        assert query(
            sql, "SELECT topic, reason FROM dead_letter WHERE site_id = %s ORDER BY id", site_id
        ) == [
            (f"{site_id}/sensor/new-{i}/data", f"site has reached its limit of {count} devices")
            for i in (1, 2)
        ]
        assert query(
            sql,
            "SELECT count(*) FROM sensor WHERE site_id = %s AND sensor_id LIKE 'new%%'",
            site_id,
        ) == [(0,)]
        assert query(
            sql,
            "SELECT topic_path FROM discovered_topic WHERE site_id = %s",
            site_id,
        ) == [(f"{site_id}/sensor/s7/data",)]

        def limit_events() -> list[tuple[Any, ...]]:
            text = "SELECT data FROM event_log WHERE type = 'service' AND site_id = %s"
            return query(sql, text, site_id)

        await eventually(lambda: len(limit_events()) == 1, what="the device_limit_reached event")
        [(data,)] = limit_events()
        assert data == {
            "problem": "device_limit_reached",
            "limit": count,
            "kind": "sensor",
            "device_id": "new-1",
            "gateway_id": None,
        }
        print(f"start-up with {count} known devices: {load_seconds:.2f}s")
        # A higher limit by SQL applies within a second, without reconnecting.
        site = service.supervisor.site(site_id)
        assert site is not None
        connects = site.connects
        with sql.cursor() as cur:
            cur.execute(
                "UPDATE mqtt_connection SET max_devices = %s WHERE site_id = %s",
                (count + 1, site_id),
            )
        await eventually(lambda: site.config.max_devices == count + 1, what="the new limit")
        await publish([(f"{site_id}/sensor/new-3/data", j({"value": 3}))])
        await eventually(
            lambda: (
                query(
                    sql,
                    "SELECT count(*) FROM sensor WHERE site_id = %s AND sensor_id = 'new-3'",
                    site_id,
                )
                == [(1,)]
            ),
            what="a device under the new limit",
        )
        assert site.connects == connects and service.supervisor.site(site_id) is site
    finally:
        await service.stop()


@pytest_twisted.ensureDeferred
async def test_a_site_wide_change_is_one_event(
    db_dsn: str, no_sites: None, sql: Any, site_id: str, private_broker: PrivateBroker
) -> None:
    """
    30,000 known gateways (by SQL) online at a start: one summary event
    ('mqttsvc started', 30,000 devices) in device_event and in the event
    log, not 30,000, and every row unknown.  A gateway that speaks again
    is online without an event of its own (it was online before); when
    the link is lost, the site's devices that were online are one more
    summary.
    """
    from twisted.internet import reactor

    count = 30_000
    await site_with_known_devices(
        db_dsn, sql, site_id, "gateway", "online", count, port=private_broker.port
    )
    service = RunningService(reactor, db_dsn)
    await service.start()
    try:

        def summaries() -> list[tuple[Any, ...]]:
            return query(
                sql,
                "SELECT kind, device_id, from_status, to_status, reason, devices "
                "FROM device_event WHERE site_id = %s ORDER BY id",
                site_id,
            )

        def statuses() -> dict[str, int]:
            return dict(
                query(
                    sql,
                    "SELECT status, count(*) FROM gateway WHERE site_id = %s GROUP BY status",
                    site_id,
                )
            )

        await eventually(lambda: statuses() == {"unknown": count}, what="every gateway unknown")
        assert summaries() == [("site", None, None, "unknown", "mqttsvc started", count)]
        logged = query(
            sql, "SELECT data FROM event_log WHERE type = 'device' AND site_id = %s", site_id
        )
        assert logged == [
            (
                {
                    "kind": "site",
                    "device_id": None,
                    "gateway_id": None,
                    "from": None,
                    "to": "unknown",
                    "reason": "mqttsvc started",
                    "devices": count,
                    "instance": "test",
                },
            )
        ]
        await subscribed(service, site_id)
        await publish([(f"{site_id}/gateway/g1/heartbeat", j({}))], port=private_broker.port)
        await eventually(
            lambda: statuses() == {"unknown": count - 1, "online": 1}, what="g1 online again"
        )
        assert len(summaries()) == 1  # back to its status from before: no event of its own
        private_broker.stop()
        await eventually(lambda: len(summaries()) == 2, what="the link-loss summary")
        assert summaries()[1] == (
            "site",
            None,
            None,
            "unknown",
            "site connection waiting",
            1,
        )
        await eventually(lambda: statuses() == {"unknown": count}, what="g1 unknown again")
    finally:
        await service.stop()


@pytest_twisted.ensureDeferred
async def test_device_state_follows_the_newest_ts_through_the_broker(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """
    Heartbeats published newest first: the ones with an older ts (an hour
    old, 1971) arrive later and do not overwrite the newest payload and
    reported status; one a day ahead of the receive time is a dead letter
    (--max-clock-skew, 300 s), as is a reading a day ahead.
    """
    await create_site(running, site_id)
    await subscribed(running, site_id)
    now = datetime.now(UTC)
    topic = f"{site_id}/gateway/g/heartbeat"
    await publish(
        [
            (topic, j({"ts": now.timestamp(), "status": "newest"})),
            (topic, j({"ts": (now - timedelta(hours=1)).timestamp(), "status": "hour old"})),
            (topic, j({"ts": "1971-01-01T00:00:00Z", "status": "1971"})),
            (topic, j({"ts": (now + timedelta(days=1)).timestamp(), "status": "future"})),
            (
                f"{site_id}/sensor/t/data",
                j({"ts": (now + timedelta(days=1)).isoformat(), "value": 1}),
            ),
        ]
    )

    def dead() -> list[tuple[Any, ...]]:
        return query(sql, "SELECT reason FROM dead_letter WHERE site_id = %s ORDER BY id", site_id)

    await eventually(lambda: len(dead()) == 2, what="two dead letters")
    assert all("ahead of the receive time; at most 300s" in r for (r,) in dead())
    [(payload, reported, reported_at)] = query(
        sql,
        "SELECT last_payload, reported_status, reported_at FROM gateway WHERE site_id = %s",
        site_id,
    )
    assert (payload["status"], reported) == ("newest", "newest")
    assert abs((reported_at - now).total_seconds()) < 0.001
    assert query(sql, "SELECT count(*) FROM sensor_reading WHERE site_id = %s", site_id) == [(0,)]


@pytest_twisted.ensureDeferred
async def test_a_foreign_topic_from_a_non_compliant_broker_creates_no_state() -> None:
    """
    A broker that sends a topic none of the site's filters match (real
    Mosquitto never does; a scripted one does) gets a dead letter for it
    with the reason and nothing else (no discovered topic, no device),
    counted as rejected; a subscribed topic beside it is processed as
    usual.
    """
    from twisted.internet import reactor

    payload = b'{"value": 1}'
    topics = [b"elsewhere/sensor/x/data", b"hostile/sensor/s1/data"]

    def send(connection: Any) -> None:
        for mid, topic in enumerate(topics, 1):
            connection.send(publish_header(topic, len(payload), mid=mid) + payload)

    async with listening(FakeBroker(after_suback=send)) as port:
        async with running_site(port) as (site, _states, writer):
            while len(writer.queued) < 2:
                await writer.next().addTimeout(5, reactor)
    foreign, subscribed = (effects for effects, _, _ in writer.queued)
    assert foreign == [
        DeadLetter("hostile", "elsewhere/sensor/x/data", payload, FOREIGN_TOPIC, foreign[0].at)
    ]
    assert [type(e) for e in subscribed] == [TopicSeen, DeviceSeen, Reading]
    assert site.messages_rejected == 1


def same_lane_sites(prefix: str, lanes: int = 2) -> tuple[str, str]:
    """A flooding and a quiet site id that the writer's lanes put together."""
    for i in range(100):
        flood, quiet = f"{prefix}-flood-{i}", f"{prefix}-quiet-{i}"
        if zlib.crc32(flood.encode()) % lanes == zlib.crc32(quiet.encode()) % lanes:
            return flood, quiet
    raise AssertionError("no pair of site ids in one lane")


@pytest.mark.deadline(120)
@pytest_twisted.ensureDeferred
async def test_a_flooding_site_never_pauses_a_quiet_one_in_its_lane(
    running: RunningService, sql: Any, site_id: str, private_broker: PrivateBroker
) -> None:
    """
    20,000 messages of new device ids for one site, pipelined, while a
    site in the same write lane publishes a few: every message of both is
    committed, and the quiet site is never paused (neither held alone nor
    pressed with its lane); if anyone is held, it is the flooding site.
    """
    from bench.wire import publish_all, publish_packet

    flood, quiet = same_lane_sites(site_id)
    assert running.ingest.writer.lane(flood) is running.ingest.writer.lane(quiet)
    # A broker of our own: the shared one drops what passes 1,000 queued.
    for site in (flood, quiet):
        await create_site(running, site, port=private_broker.port)
        await subscribed(running, site)
    paused: dict[str, int] = {flood: 0, quiet: 0}
    for name in (flood, quiet):
        service = running.supervisor.site(name)
        assert service is not None
        hold, pause = service.hold, service.pause_reading

        def held(holding: bool, name: str = name, hold: Any = hold) -> None:
            paused[name] += holding
            hold(holding)

        def pressed(name: str = name, pause: Any = pause) -> None:
            paused[name] += 1
            pause()

        service.hold = held  # type: ignore[method-assign]
        service.pause_reading = pressed  # type: ignore[method-assign]
    count = 20_000
    packets = [
        publish_packet(f"{flood}/sensor/new-{i}/data".encode(), b'{"value": 1}', i % 65535 + 1)
        for i in range(count)
    ]
    flooding = deferToThread(publish_all, private_broker.port, packets, 100)
    for i in range(10):
        await publish(
            [(f"{quiet}/sensor/q/data", j({"ts": time.time(), "value": i}))],
            port=private_broker.port,
        )
    await flooding

    def committed() -> bool:
        return query(
            sql,
            "SELECT site_id, count(*) FROM sensor WHERE site_id IN (%s, %s) GROUP BY site_id "
            "ORDER BY site_id",
            flood,
            quiet,
        ) == sorted([(flood, count), (quiet, 1)]) and query(
            sql, "SELECT count(*) FROM sensor_reading WHERE site_id = %s", quiet
        ) == [(10,)]

    await eventually(committed, within=60, what="every message of both sites committed")
    assert paused[quiet] == 0, paused
    print(f"paused: {paused}")
