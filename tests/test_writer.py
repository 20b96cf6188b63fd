"""
The batched writer against a real PostgreSQL: batching, folding of
repeated rows, and dead letters for what the database rejects.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock

from mqttsvc.config import ConfigError
from mqttsvc.db.pool import ConnectionPool
from mqttsvc.ingest.writer import BatchWriter, CommitListener, WritePool, WriterLanes
from mqttsvc.records import DeadLetter, DeviceKey, DeviceSeen, DeviceStatus, Reading, TopicSeen
from mqttsvc.tap import Options, check_values
from tests.conformance import assert_implements

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def gateway(site_id: str, gateway_id: str, at: datetime, payload: str) -> DeviceSeen:
    return DeviceSeen(site_id, "gateway", None, gateway_id, at, payload)


def rows(sql: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sql.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall())


@pytest_twisted.ensureDeferred
async def test_one_transaction_for_a_burst(db_dsn: str, sql: Any, site_id: str) -> None:
    """Messages queued together are written in one batch, with rows folded."""
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    topic = f"{site_id}/gateway/g1/heartbeat"
    done = []
    for i in range(300):
        at = T0 + timedelta(seconds=i)
        done.append(
            writer.submit(
                [TopicSeen(site_id, topic, at), gateway(site_id, "g1", at, f'{{"n": {i}}}')]
            )
        )
    await gatherResults(done)
    pool.close()
    assert writer.batches_written == 1
    assert writer.messages_written == 300
    assert rows(
        sql,
        "SELECT message_count, first_seen_at, last_seen_at FROM discovered_topic "
        "WHERE site_id = %s",
        site_id,
    ) == [(300, T0, T0 + timedelta(seconds=299))]
    assert rows(
        sql,
        "SELECT status, first_seen_at, last_seen_at, last_payload FROM gateway WHERE site_id = %s",
        site_id,
    ) == [("online", T0, T0 + timedelta(seconds=299), {"n": 299})]


@pytest_twisted.ensureDeferred
async def test_counts_accumulate_across_batches(db_dsn: str, sql: Any, site_id: str) -> None:
    """A later batch adds to a topic's count and never moves last_seen_at back."""
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    topic = f"{site_id}/x"
    await writer.submit([TopicSeen(site_id, topic, T0 + timedelta(hours=1))])
    await writer.submit([TopicSeen(site_id, topic, T0)])
    pool.close()
    assert rows(
        sql,
        "SELECT message_count, first_seen_at, last_seen_at FROM discovered_topic "
        "WHERE site_id = %s",
        site_id,
    ) == [(2, T0, T0 + timedelta(hours=1))]


@pytest_twisted.ensureDeferred
async def test_rejected_message_becomes_dead_letter(db_dsn: str, sql: Any, site_id: str) -> None:
    """A row the database refuses is dead-lettered with its reason; the rest of the batch lands."""
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    good = writer.submit(
        [TopicSeen(site_id, "a", T0), gateway(site_id, "good", T0, '{"ok": true}')]
    )
    # Not JSON: processing never produces this, so it stands for any row
    # that the database rejects for its content.
    bad = writer.submit([TopicSeen(site_id, "b", T0, b"{"), gateway(site_id, "bad", T0, "{")])
    letter = writer.submit(
        [TopicSeen(site_id, "c", T0), DeadLetter(site_id, "c", b"\x00", "x", T0)]
    )
    await gatherResults([good, bad, letter])
    pool.close()
    assert rows(sql, "SELECT gateway_id FROM gateway WHERE site_id = %s", site_id) == [("good",)]
    dead = rows(
        sql,
        "SELECT topic, payload, reason FROM dead_letter WHERE site_id = %s ORDER BY id",
        site_id,
    )
    assert [(t, bytes(p)) for t, p, _ in dead] == [("b", b"{"), ("c", b"\x00")]
    assert dead[0][2].startswith(
        "database rejected the message: invalid input syntax for type json"
    )
    assert dead[1][2] == "x"
    topics = rows(
        sql, "SELECT topic_path FROM discovered_topic WHERE site_id = %s ORDER BY 1", site_id
    )
    assert topics == [("a",), ("b",), ("c",)]


@pytest_twisted.ensureDeferred
async def test_devices_readings_and_status(db_dsn: str, sql: Any, site_id: str) -> None:
    """
    Every kind of device is upserted; readings are inserted once however
    often they arrive; the last status change in a batch wins and each
    change is recorded as a device event.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    t1 = T0 + timedelta(seconds=1)
    logger = DeviceSeen(site_id, "datalogger", "gw", "dl", T0, '{"a":1}', "ok", 30.0)
    key = logger.key
    reading = Reading(site_id, "s1", T0, "value", 1.5, "V", T0)
    await gatherResults(
        [
            writer.submit(
                [
                    logger,
                    DeviceStatus(key, "unknown", "online", T0, "message received"),
                    DeviceSeen(site_id, "sensor", None, "s1", T0, "{}"),
                    reading,
                    reading,
                ]
            ),
            writer.submit([DeviceStatus(key, "online", "offline", t1, "silent")]),
            writer.submit([attrs.evolve(logger, at=t1, reported_status=None, interval=None)]),
        ]
    )
    await writer.submit([reading, DeviceStatus(key, "offline", "online", t1, "message received")])
    pool.close()
    assert rows(
        sql,
        "SELECT status, first_seen_at, last_seen_at, reported_status, heartbeat_interval "
        "FROM datalogger WHERE site_id = %s AND gateway_id = 'gw' AND datalogger_id = 'dl'",
        site_id,
    ) == [("online", T0, t1, "ok", 30.0)]
    assert rows(sql, "SELECT status FROM sensor WHERE site_id = %s", site_id) == [("online",)]
    assert rows(
        sql,
        "SELECT sensor_id, ts, name, value, unit FROM sensor_reading WHERE site_id = %s",
        site_id,
    ) == [("s1", T0, "value", 1.5, "V")]
    assert rows(
        sql,
        "SELECT kind, device_id, gateway_id, from_status, to_status, reason FROM device_event "
        "WHERE site_id = %s ORDER BY id",
        site_id,
    ) == [
        ("datalogger", "dl", "gw", "unknown", "online", "message received"),
        ("datalogger", "dl", "gw", "online", "offline", "silent"),
        ("datalogger", "dl", "gw", "offline", "online", "message received"),
    ]
    assert key == DeviceKey(site_id, "datalogger", "gw", "dl")


@pytest_twisted.ensureDeferred
async def test_group_commit_waits_for_size_or_delay(db_dsn: str, site_id: str) -> None:
    """
    A batch goes when batch_size messages wait, or batch_delay after the
    first.  The writer's timers run on a Clock (the database is real): a
    wall-clock bound here failed on a busy machine and proved nothing more.
    """
    from twisted.internet import reactor
    from twisted.internet.task import Clock, deferLater

    clock = Clock()
    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(clock, pool, batch_size=10, batch_delay=0.2)
    one = writer.submit([TopicSeen(site_id, "x", T0)])
    clock.advance(0.19)
    assert not one.called and writer.batches_written == 0
    clock.advance(0.01)
    await one.addTimeout(10, reactor)
    assert writer.batches_written == 1
    # The commit is told before the writer has finished with the batch.
    await deferLater(reactor, 0, lambda: None)
    # Ten at once fill a batch: it goes with no time passing at all.
    ten = gatherResults([writer.submit([TopicSeen(site_id, "x", T0)]) for _ in range(10)])
    clock.advance(0)
    await ten.addTimeout(10, reactor)
    assert writer.batches_written == 2
    assert clock.getDelayedCalls() == []
    await deferLater(reactor, 0, lambda: None)
    pool.close()


def test_back_pressure_between_the_water_marks() -> None:
    """Past high water the writer asks to pause reading; under low water, to resume."""
    clock = Clock()
    pool = _StalledPool()
    pressure: list[bool] = []
    queued_then: list[int] = []

    def pressed(pressing: bool) -> None:
        pressure.append(pressing)
        queued_then.append(writer.queued)

    writer = BatchWriter(
        clock,
        pool,
        batch_size=2,
        high_water=5,
        low_water=2,
        on_pressure=pressed,
    )
    for _ in range(4):
        writer.submit([TopicSeen("s", "x", T0)])
    assert pressure == []
    writer.submit([TopicSeen("s", "x", T0)])
    assert pressure == [True]
    writer.submit([TopicSeen("s", "x", T0)])
    assert pressure == [True]
    # The database answers one batch of two at a time: reading resumes
    # once the queue is down to the low water mark (2), not before.
    while pool.pending or writer.queued:
        clock.advance(0.02)
        pool.answer_all()
    assert pressure == [True, False]
    assert queued_then == [5, 2]


AWKWARD = [
    'quote " and backslash \\ and \\"',
    "NULL",
    "",
    "{braces}, commas, and spaces",
    "new\nline\ttab",
    "ünïcödé 🚀",
    "'single' quotes; DROP TABLE sensor; --",
    "%s %(x)s %%",
]


@pytest_twisted.ensureDeferred
async def test_any_text_survives_the_array_literals(db_dsn: str, sql: Any, site_id: str) -> None:
    """Ids, names, units and payloads reach the database as they were, whatever they hold."""
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    done = []
    for i, text in enumerate(AWKWARD):
        at = T0 + timedelta(seconds=i)
        payload = json.dumps({"note": text, "n": i})
        done.append(
            writer.submit(
                [
                    TopicSeen(site_id, f"{site_id}/{text}", at),
                    DeviceSeen(site_id, "sensor", None, f"s-{text}", at, payload),
                    Reading(site_id, f"s-{text}", at, text or "value", 0.1 * i, text, at),
                ]
            )
        )
    await gatherResults(done)
    pool.close()
    assert writer.batches_written == 1
    topics = rows(sql, "SELECT topic_path FROM discovered_topic WHERE site_id = %s", site_id)
    assert sorted(t for (t,) in topics) == sorted(f"{site_id}/{text}" for text in AWKWARD)
    sensors = rows(sql, "SELECT sensor_id, last_payload FROM sensor WHERE site_id = %s", site_id)
    assert sorted(sensors) == sorted(
        (f"s-{text}", {"note": text, "n": i}) for i, text in enumerate(AWKWARD)
    )
    readings = rows(
        sql, "SELECT sensor_id, name, value, unit FROM sensor_reading WHERE site_id = %s", site_id
    )
    assert sorted(readings) == sorted(
        (f"s-{text}", text or "value", 0.1 * i, text) for i, text in enumerate(AWKWARD)
    )


def two_lanes_sites(lanes: WriterLanes, prefix: str) -> tuple[str, str]:
    """Two site ids that go to different lanes."""
    first = f"{prefix}-0"
    for i in range(1, 100):
        other = f"{prefix}-{i}"
        if lanes.lane(other) is not lanes.lane(first):
            return first, other
    raise AssertionError("no two sites in different lanes")


@pytest_twisted.ensureDeferred
async def test_lanes_write_sites_side_by_side(db_dsn: str, sql: Any, site_id: str) -> None:
    """Each site stays in one lane; different lanes' batches are on the server at once."""
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=2)
    lanes = WriterLanes(reactor, pool, lanes=2)
    a, b = two_lanes_sites(lanes, site_id)
    done = []
    for i in range(200):
        at = T0 + timedelta(seconds=i)
        for site in (a, b):
            done.append(lanes.submit([TopicSeen(site, f"{site}/t", at)]))
    await gatherResults(done)
    await lanes.when_idle()
    assert pool.open_connections == 2
    assert [lane.messages_written for lane in lanes.lanes] == [200, 200]
    assert lanes.messages_written == 400
    pool.close()
    counts = rows(
        sql,
        "SELECT site_id, message_count FROM discovered_topic WHERE site_id IN (%s, %s) ORDER BY 1",
        a,
        b,
    )
    assert counts == sorted([(a, 200), (b, 200)])


class _StalledPool:
    """A database that takes every write and answers only when told to."""

    def __init__(self) -> None:
        self.pending: list[Deferred[None]] = []

    def operation(self, sql: str, params: Any = None) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.pending.append(d)
        return d

    def answer_all(self) -> None:
        pending, self.pending = self.pending, []
        for d in pending:
            d.callback(None)


def test_the_fakes_match_the_writer_interfaces() -> None:
    """
    The pool and listener fakes of this module stand for the writer's
    L{WritePool} and L{CommitListener} Protocols, and nothing more.
    """
    assert_implements(_StalledPool, WritePool, extra=["answer_all"])
    assert_implements(_Site, CommitListener)


def test_each_lane_presses_its_own_sites() -> None:
    """
    Back-pressure is per lane: each lane over its high water asks its own
    sites to pause, once, and releases them once under its low water; a
    lane that commits is never pressed by another's backlog.
    """
    clock = Clock()
    pool = _StalledPool()
    pressure: list[tuple[int, bool]] = []
    lanes = WriterLanes(
        clock,
        pool,
        lanes=2,
        batch_size=2,
        high_water=4,
        low_water=1,
        on_pressure=lambda lane, pressing: pressure.append((lane, pressing)),
    )
    a, b = two_lanes_sites(lanes, "press")
    first, second = lanes.index(a), lanes.index(b)
    for _ in range(6):
        lanes.submit([TopicSeen(a, "t", T0)])
        clock.advance(0.02)
    assert pressure == [(first, True)]
    assert lanes.lane(a).pressing and not lanes.lane(b).pressing
    for _ in range(6):
        lanes.submit([TopicSeen(b, "t", T0)])
        clock.advance(0.02)
    assert pressure == [(first, True), (second, True)]
    while pool.pending:
        pool.answer_all()
        clock.advance(0.02)
    assert sorted(pressure[2:]) == [(first, False), (second, False)]
    assert lanes.queued == 0 and not lanes.pressing


def test_write_connections_option() -> None:
    """--write-connections (or its variable) sets the lanes: 2 by default, 1 to 16."""
    options = Options(environ={})
    options.parseOptions([])
    check_values(options)
    assert options["write-connections"] == 2
    options = Options(environ={"MQTTSVC_WRITE_CONNECTIONS": "4"})
    options.parseOptions([])
    check_values(options)
    assert options["write-connections"] == 4
    for bad in ("0", "17", "1.5"):
        options = Options(environ={})
        options.parseOptions(["--write-connections", bad])
        with pytest.raises(ConfigError) as refused:
            check_values(options)
        assert refused.value.field == "write-connections"


class _Site:
    """A commit listener that records when the writer holds it."""

    def __init__(self) -> None:
        self.holds: list[bool] = []
        self.committed_count = 0

    def committed(self, messages: list[Any]) -> None:
        self.committed_count += len(messages)

    def hold(self, holding: bool) -> None:
        self.holds.append(holding)


def test_a_flooding_site_is_held_alone_and_a_quiet_one_never_pauses() -> None:
    """
    One lane, a database that answers only when told: a site that floods
    it with messages is held once it has more than its share of the
    lane's high water (a tenth), before the lane presses every site; a quiet
    site in the same lane keeps reading the whole time, and the flooding
    one is released once its backlog is committed.
    """
    clock = Clock()
    pool = _StalledPool()
    pressure: list[bool] = []
    writer = BatchWriter(
        clock,
        pool,
        batch_size=100,
        high_water=2000,
        low_water=200,
        on_pressure=pressure.append,
    )
    flood, quiet = _Site(), _Site()
    flooded = 0
    first_held_at = None
    for second in range(200):
        # The flooding site sends new device ids as fast as it is let.
        while not (flood.holds and flood.holds[-1]):
            writer.queue([TopicSeen("flood", f"flood/sensor/{flooded}/data", T0)], flood, flooded)
            flooded += 1
        if first_held_at is None:
            first_held_at = flooded
        writer.queue([TopicSeen("quiet", "quiet/x", T0)], quiet, second)
        clock.advance(0.01)
        if second % 2:
            pool.answer_all()  # the database commits one batch in two ticks
        clock.advance(0.01)
    assert flood.holds[0] is True
    assert first_held_at == 201  # held past its share: a tenth of the lane's high water
    assert flood.holds.count(True) > 1  # released as it drains, and held again
    assert quiet.holds == []
    assert pressure == []  # the lane never pressed everyone
    while pool.pending:
        pool.answer_all()
        clock.advance(0.02)
    assert flood.holds[-1] is False and flood.committed_count == flooded
    assert quiet.committed_count == 200
    assert clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_device_state_follows_the_newest_ts(db_dsn: str, sql: Any, site_id: str) -> None:
    """
    A heartbeat with an older ts (an hour old, or 1971) that arrives later
    does not overwrite the payload and reported status of a newer one,
    whether they meet in one batch or in two; liveness (last_seen_at)
    still follows the receive time, and a tie in ts goes to the later
    arrival.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)

    def beat(device: str, at: datetime, ts: datetime | None, status: str) -> DeviceSeen:
        return DeviceSeen(
            site_id, "gateway", None, device, at, json.dumps({"s": status}), status, None, ts
        )

    hour_ago, y1971 = T0 - timedelta(hours=1), datetime(1971, 1, 1, tzinfo=UTC)
    # Two batches: the newer ts first, the older ones later.
    await writer.submit([beat("two", T0, T0, "new")])
    await writer.submit([beat("two", T0 + timedelta(seconds=5), hour_ago, "old")])
    await writer.submit([beat("two", T0 + timedelta(seconds=9), y1971, "older")])
    # One batch: folded the same way.
    await writer.submit(
        [
            beat("one", T0, T0, "new"),
            beat("one", T0 + timedelta(seconds=5), hour_ago, "old"),
            beat("one", T0 + timedelta(seconds=9), None, "no ts"),  # receive time: newest
            beat("one", T0 + timedelta(seconds=9), y1971, "older"),
        ]
    )
    # Equal ts: the later arrival wins.
    await writer.submit([beat("tie", T0, T0, "first")])
    await writer.submit([beat("tie", T0 + timedelta(seconds=1), T0, "second")])
    pool.close()
    assert rows(
        sql,
        "SELECT gateway_id, last_payload, reported_status, reported_at, last_seen_at "
        "FROM gateway WHERE site_id = %s ORDER BY gateway_id",
        site_id,
    ) == [
        ("one", {"s": "no ts"}, "no ts", T0 + timedelta(seconds=9), T0 + timedelta(seconds=9)),
        ("tie", {"s": "second"}, "second", T0, T0 + timedelta(seconds=1)),
        ("two", {"s": "new"}, "new", T0, T0 + timedelta(seconds=9)),
    ]
