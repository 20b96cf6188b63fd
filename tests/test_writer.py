"""
The batched writer against a real PostgreSQL: batching, folding of
repeated rows, and dead letters for what the database rejects.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import attrs
import psycopg2
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, fail, gatherResults, succeed
from twisted.internet.task import Clock

from mqttsvc.config import ConfigError
from mqttsvc.db.batch import batch_statements
from mqttsvc.db.leases import Fence
from mqttsvc.db.pool import ConnectionPool
from mqttsvc.ingest.writer import (
    BATCH_DELAY,
    BatchWriter,
    CommitListener,
    Fenced,
    WritePool,
    WriterLanes,
)
from mqttsvc.records import (
    ConnectionEvent,
    DeadLetter,
    DeviceKey,
    DeviceSeen,
    DeviceStatus,
    Effect,
    Reading,
    StatusUpdate,
    TopicSeen,
)
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
    assert_implements(_LeasedDatabase, WritePool, extra=["move", "committed"])
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
        self.messages: list[Any] = []

    def committed(self, messages: list[Any]) -> None:
        self.committed_count += len(messages)
        self.messages += messages

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


# Fenced writes (issue 17), on a Clock, against a fake database that keeps
# each site's lease and judges a fence as mqttsvc_fence does, refusing with
# the very error PostgreSQL raises (tests/test_fenced_writes.py does the
# same against the real one).


@pytest.fixture
def fence_error(db_dsn: str) -> Iterator[Callable[[list[str]], psycopg2.Error]]:
    """
    The error that PostgreSQL's C{mqttsvc_fence} raises, through psycopg2,
    for a batch whose stale sites are these.
    """
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True

    def error(stale: list[str]) -> psycopg2.Error:
        with conn.cursor() as cur:
            try:
                cur.execute(
                    "SELECT mqttsvc_fence('nobody', %s::text[], %s::bigint[])",
                    (stale, [1] * len(stale)),
                )
            except psycopg2.Error as e:
                return e
        raise AssertionError(f"the fence took {stale}")

    yield error
    conn.close()


def _elements(literal: str) -> list[str]:
    """The elements of an array literal of plain values."""
    return [v.strip('"') for v in literal.strip("{}").split(",") if v]


@attrs.frozen
class _Write:
    sql: str
    params: list[Any]
    committed: bool

    def mentions(self, site_id: str) -> bool:
        return any(isinstance(p, str) and f'"{site_id}"' in p for p in self.params)


class _LeasedDatabase:
    """
    A database that answers every write at once, as PostgreSQL would: it
    keeps each site's lease (owner, epoch) and refuses a fenced write whose
    instance does not hold every site at its epoch with C{mqttsvc_fence}'s
    error, and a write with a unit C{"bad"} as a data error.
    C{move(site, before=n)} gives a site's lease to another instance just
    before the n-th write (1-based) arrives.  With C{misnamed}, a refused
    fence names those sites instead of the stale ones.
    """

    def __init__(self, fence_error: Callable[[list[str]], psycopg2.Error]) -> None:
        self.leases: dict[str, tuple[str, int]] = {}
        self.writes: list[_Write] = []
        self._moves: dict[int, str] = {}
        self.misnamed: list[str] | None = None
        self._fence_error = fence_error

    def move(self, site_id: str, before: int) -> None:
        self._moves[before] = site_id

    def operation(self, sql: str, params: Any = None) -> Deferred[None]:
        moved = self._moves.pop(len(self.writes) + 1, None)
        if moved is not None:
            self.leases[moved] = ("b", self.leases[moved][1] + 1)
        error: Exception | None = None
        if sql.startswith("SELECT mqttsvc_fence("):
            instance, sites, epochs = params[0], _elements(params[1]), _elements(params[2])
            stale = sorted(
                s
                for s, e in zip(sites, epochs, strict=True)
                if self.leases.get(s) != (instance, int(e))
            )
            if stale:
                error = self._fence_error(self.misnamed or stale)
        if error is None and any(isinstance(p, str) and '"bad"' in p for p in params):
            error = ValueError("invalid input: bad")
        self.writes.append(_Write(sql, list(params), error is None))
        return succeed(None) if error is None else fail(error)

    def committed(self, site_id: str) -> list[_Write]:
        """The committed writes that wrote something of a site."""
        return [w for w in self.writes if w.committed and w.mentions(site_id)]


def fence_as(epochs: dict[str, int]) -> Callable[[Collection[str]], Fence]:
    """Instance a's fence, holding the sites at these epochs (0: not held)."""

    def fence(site_ids: Collection[str]) -> Fence:
        ordered = sorted(site_ids)
        return Fence("a", ordered, [epochs.get(s, 0) for s in ordered])

    return fence


def message(site_id: str, n: int, unit: str = "V") -> list[Effect]:
    """One message's effects: its topic and a reading."""
    topic = f"{site_id}/sensor/s1/data"
    at = T0 + timedelta(seconds=n)
    return [TopicSeen(site_id, topic, at), Reading(site_id, "s1", at, "value", n, unit, at)]


def connected(site_id: str) -> tuple[StatusUpdate, ConnectionEvent]:
    return (
        StatusUpdate(site_id, "connected", T0, 0, None, None),
        ConnectionEvent(site_id, T0, "connecting", "connected", None),
    )


def test_an_empty_write_fires_after_everything_queued_before_it() -> None:
    """
    An empty write (C{submit([])}: how a hand-over waits for what a site
    left to write) queued while a batch of submitted effects is in flight
    fires only after that batch, and the release of that batch's bytes
    leaves the empty write's to be released after it: the writer neither
    fires it early nor crashes on it, and ends holding nothing.
    """
    clock = Clock()
    pool = _StalledPool()
    writer = BatchWriter(clock, pool)
    first = writer.submit([TopicSeen("s", "s/x", T0)])
    clock.advance(BATCH_DELAY)
    assert len(pool.pending) == 1
    marker = writer.submit([])
    assert not marker.called
    pool.pending[0].callback(None)
    assert first.called and not marker.called
    clock.advance(BATCH_DELAY)
    assert marker.called
    assert (writer.bytes_held, writer.queued) == (0, 0)
    assert clock.getDelayedCalls() == []


def test_without_a_fence_a_batch_is_written_as_before(
    fence_error: Callable[[list[str]], psycopg2.Error],
) -> None:
    """
    A writer without a fence sends exactly the statements of the batch
    (no fence in them); with one, the same statements after the fence of
    the batch's sites (its messages' and its statuses' and events').
    """
    for fence in (None, fence_as({"fs": 1, "ft": 1})):
        clock = Clock()
        db = _LeasedDatabase(fence_error)
        db.leases = {"fs": ("a", 1), "ft": ("a", 1)}
        writer = BatchWriter(clock, db, fence=fence)
        site = _Site()
        writer.queue(message("fs", 0), site, 0)
        writer.queue(message("fs", 1), site, 1)
        status, event = connected("ft")
        writer.set_status(status, event)
        clock.advance(BATCH_DELAY)
        expected = batch_statements(
            [*message("fs", 0), *message("fs", 1)],
            [status],
            [event],
            fence=None if fence is None else Fence("a", ("fs", "ft"), (1, 1)),
        )
        assert expected is not None
        assert [(w.sql, w.params) for w in db.writes] == [expected]
        assert ("mqttsvc_fence" in db.writes[0].sql) is (fence is not None)
        assert site.messages == [0, 1]
        assert clock.getDelayedCalls() == []


def test_a_fenced_batch_drops_the_stale_site_unacknowledged_and_writes_the_rest_at_once(
    fence_error: Callable[[list[str]], psycopg2.Error],
) -> None:
    """
    Instance a's batch holds messages, a status and an event of fs (taken
    over by b meanwhile) and of ft (still a's).  The fence refuses it;
    in the same instant, without a backoff, the writer writes ft's part
    alone and commits it.  fs's messages (those in the batch and the one
    still queued) are never acknowledged and none of its rows is written;
    on_fenced hears ['fs'] once; fs, which was held for its backlog, is
    released, and no byte stays accounted.
    """
    clock = Clock()
    db = _LeasedDatabase(fence_error)
    db.leases = {"fs": ("b", 2), "ft": ("a", 1)}
    fenced: list[list[str]] = []
    writer = BatchWriter(
        clock,
        db,
        batch_size=3,
        site_messages=2,
        fence=fence_as({"fs": 1, "ft": 1}),
        on_fenced=fenced.append,
    )
    fs, ft = _Site(), _Site()
    for n in range(3):
        writer.queue(message("fs", n), fs, n)
    assert fs.holds == [True]
    writer.queue(message("ft", 0), ft, 0)
    writer.queue(message("ft", 1), ft, 1)
    for site_id in ("fs", "ft"):
        writer.set_status(*connected(site_id))
    clock.advance(0)
    # The first batch (fs 0 and 1, ft 0) was refused and ft's part written.
    assert [(w.committed, w.mentions("fs"), w.mentions("ft")) for w in db.writes] == [
        (False, True, True),
        (True, False, True),
    ]
    assert fenced == [["fs"]]
    assert writer.failing_since is None
    clock.advance(BATCH_DELAY)
    assert ft.messages == [0, 1]
    assert fs.messages == [] and fs.holds == [True, False]
    assert db.committed("fs") == []
    assert len(db.committed("ft")) == 2
    assert writer.batches_fenced == 1 and writer.messages_fenced == 3
    assert writer.bytes_held == 0 and writer.queued == 0
    assert clock.getDelayedCalls() == []
    # fs is accounted from zero again: one message does not hold it.
    writer.queue(message("fs", 9), fs, 9)
    assert fs.holds == [True, False]
    writer.stop()


def test_a_site_fenced_while_a_rejected_batch_is_isolated(
    fence_error: Callable[[list[str]], psycopg2.Error],
) -> None:
    """
    A batch is rejected for one bad message of ft; while it is isolated,
    fs moves to b: the write of the statuses and events is fenced, fs's
    message and status are dropped unacknowledged, and the isolation goes
    on with ft's alone: its good message commits, its bad one becomes a
    dead letter; on_fenced hears ['fs'] once.
    """
    clock = Clock()
    db = _LeasedDatabase(fence_error)
    db.leases = {"fs": ("a", 1), "ft": ("a", 1)}
    fenced: list[list[str]] = []
    writer = BatchWriter(clock, db, fence=fence_as({"fs": 1, "ft": 1}), on_fenced=fenced.append)
    fs, ft = _Site(), _Site()
    writer.queue(message("ft", 0), ft, "good")
    writer.queue(message("fs", 0), fs, "fs")
    writer.queue(message("ft", 1, unit="bad"), ft, "bad")
    for site_id in ("fs", "ft"):
        writer.set_status(*connected(site_id))
    db.move("fs", before=2)
    clock.advance(BATCH_DELAY)
    assert fenced == [["fs"]]
    assert ft.messages == ["good", "bad"] and fs.messages == []
    assert writer.dead_lettered == 1
    assert db.committed("fs") == []
    assert any("INSERT INTO dead_letter" in w.sql for w in db.committed("ft"))
    assert any("UPDATE mqtt_connection" in w.sql for w in db.committed("ft"))
    assert writer.bytes_held == 0 and writer.failing_since is None
    assert clock.getDelayedCalls() == []


@pytest.mark.parametrize(
    ("fs_units", "moved_before", "refused"),
    [(["V", "bad"], 3, "INSERT INTO sensor_reading"), (["bad"], 4, "INSERT INTO dead_letter")],
    ids=["half", "dead-letter"],
)
def test_a_fenced_half_or_dead_letter_drops_the_stale_site(
    fence_error: Callable[[list[str]], psycopg2.Error],
    fs_units: list[str],
    moved_before: int,
    refused: str,
) -> None:
    """
    A batch of a good message of ft and a bad one of fs is rejected and
    written in halves.  fs moves to b before the half of fs's messages
    is written (with a good one of fs before its bad one), or before the
    bad message's dead letter is written (the bad one alone).  Either
    way that write is fenced, fs's messages are dropped unacknowledged,
    nothing of fs is written, ft's message commits and on_fenced hears
    ['fs'] once.
    """
    clock = Clock()
    db = _LeasedDatabase(fence_error)
    db.leases = {"fs": ("a", 1), "ft": ("a", 1)}
    fenced: list[list[str]] = []
    writer = BatchWriter(clock, db, fence=fence_as({"fs": 1, "ft": 1}), on_fenced=fenced.append)
    fs, ft = _Site(), _Site()
    writer.queue(message("ft", 0), ft, "good")
    for n, unit in enumerate(fs_units):
        writer.queue(message("fs", n, unit=unit), fs, unit)
    db.move("fs", before=moved_before)
    clock.advance(BATCH_DELAY)
    stale = db.writes[moved_before - 1]
    assert refused in stale.sql and stale.mentions("fs") and not stale.committed
    assert fenced == [["fs"]]
    assert ft.messages == ["good"] and fs.messages == []
    assert db.committed("fs") == []
    assert writer.dead_lettered == 0
    assert writer.messages_fenced == len(fs_units)
    assert writer.bytes_held == 0 and writer.failing_since is None
    assert clock.getDelayedCalls() == []


def test_submitted_effects_of_a_stale_site_are_dropped_and_their_deferred_fails(
    fence_error: Callable[[list[str]], psycopg2.Error],
) -> None:
    """
    Effects submitted without a message (device changes) may be of several
    sites: a fenced write drops only the stale site's; a part left with
    others' effects fires once they are committed, a part of the stale
    site alone fails with L{Fenced} naming it.
    """
    clock = Clock()
    db = _LeasedDatabase(fence_error)
    db.leases = {"fs": ("b", 2), "ft": ("a", 1)}
    fenced: list[list[str]] = []
    writer = BatchWriter(clock, db, fence=fence_as({"fs": 1, "ft": 1}), on_fenced=fenced.append)
    both = writer.submit([TopicSeen("fs", "fs/x", T0), TopicSeen("ft", "ft/x", T0)])
    alone = writer.submit([TopicSeen("fs", "fs/y", T0)])
    failures: list[Any] = []
    alone.addErrback(failures.append)
    clock.advance(BATCH_DELAY)
    assert both.called and both.result is None
    assert len(failures) == 1 and failures[0].check(Fenced)
    assert failures[0].value.sites == ["fs"]
    assert fenced == [["fs"]]
    assert db.committed("fs") == [] and len(db.committed("ft")) == 1
    assert writer.bytes_held == 0
    assert clock.getDelayedCalls() == []


def test_a_fence_refusal_that_names_no_written_site_is_retried(
    fence_error: Callable[[list[str]], psycopg2.Error],
) -> None:
    """
    A fence's error naming none of the sites written (which dropping
    could not mend) is neither dropped nor repeated at once: the batch is
    kept and retried after a backoff, as any failure of the database.
    """
    clock = Clock()
    db = _LeasedDatabase(fence_error)
    db.leases = {"fs": ("b", 2)}
    db.misnamed = ["elsewhere"]
    fenced: list[list[str]] = []
    writer = BatchWriter(clock, db, fence=fence_as({"fs": 1}), on_fenced=fenced.append)
    site = _Site()
    writer.queue(message("fs", 0), site, 0)
    clock.advance(BATCH_DELAY)
    assert len(db.writes) == 1 and fenced == []
    assert writer.failing_since is not None and writer.queued == 1
    assert site.messages == []
    clock.advance(0.5)
    assert len(db.writes) == 2
    writer.stop()
