"""
Poison messages against the real writer and PostgreSQL: whatever a message
holds, it is committed or dead-lettered with a reason, the rest of its
batch commits, and the lane goes on writing.  Plus the writer's bounds in
bytes, and how a lane that cannot commit shows.
"""

from __future__ import annotations

import base64
import hashlib
import json
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest_twisted
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.task import Clock

from mqttsvc.config import DEAD_LETTER_KEEP, MAX_TOPIC_BYTES, default_topics
from mqttsvc.db.batch import TOPIC_RAW_KEEP
from mqttsvc.db.pool import ConnectionPool, is_rejection
from mqttsvc.ingest.processing import Router, process
from mqttsvc.ingest.writer import BatchWriter, CommitListener, WritePool, WriterLanes
from mqttsvc.records import (
    DeadLetter,
    DeviceKey,
    DeviceSeen,
    DeviceStatus,
    Effect,
    Reading,
    TopicSeen,
)
from tests.conformance import assert_implements

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def rows(sql: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sql.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall())


class Counting:
    """
    A pool that counts the statements sent through it (each batch, half or
    dead letter is one).
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self.pool = pool
        self.operations = 0
        self.largest = 0

    async def operation(self, sql: str, params: list[Any]) -> None:
        self.operations += 1
        size = len(sql) + sum(len(p) if isinstance(p, str) else 0 for p in params)
        self.largest = max(self.largest, size)
        await self.pool.operation(sql, params)


def message(site_id: str, topic: str, sensor: str, name: str, at: datetime) -> list[Effect]:
    payload = b'{"value": 1}'
    return [
        TopicSeen(site_id, topic, at, payload),
        DeviceSeen(site_id, "sensor", None, sensor, at, payload.decode()),
        Reading(site_id, sensor, at, name, 1.0, None, at),
    ]


@pytest_twisted.ensureDeferred
async def test_poison_is_isolated_by_bisection(db_dsn: str, sql: Any, site_id: str) -> None:
    """
    Ten poison messages among 1,000 (a lone surrogate, a NUL, an index row
    too large: each fails in a different place) become ten dead letters
    with reasons, the 990 others commit, in far fewer statements than one
    per message.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    counting = Counting(pool)
    writer = BatchWriter(reactor, counting, batch_size=1000)  # type: ignore[arg-type]
    poison = {
        17: ("name", "a\ud800"),  # UnicodeEncodeError in psycopg2
        101: ("name", "nul\x00"),  # ValueError in psycopg2
        230: ("topic", "t/" + secrets.token_urlsafe(6000)),  # index row too large (54000)
        310: ("sensor", "\udc80"),
        444: ("name", "b\udfff"),
        512: ("topic", "t/\x00/nul"),
        640: ("sensor", secrets.token_hex(5000)),
        777: ("name", "\ud83d"),
        888: ("topic", "t/\udcff"),
        999: ("name", "z\x00z"),
    }
    done = []
    for i in range(1000):
        at = T0 + timedelta(milliseconds=i)
        topic, sensor, name = f"{site_id}/s{i}", f"s{i}", "value"
        field, value = poison.get(i, ("", ""))
        topic = value if field == "topic" else topic
        sensor = value if field == "sensor" else sensor
        name = value if field == "name" else name
        done.append(writer.submit(message(site_id, topic, sensor, name, at)))
    await gatherResults(done)
    # A normal message after the poison commits at once.
    await writer.submit(message(site_id, f"{site_id}/after", "after", "value", T0)).addTimeout(
        1.0, reactor
    )
    pool.close()
    readings = rows(
        sql, "SELECT sensor_id FROM sensor_reading WHERE site_id = %s ORDER BY sensor_id", site_id
    )
    assert len(readings) == 991
    assert {f"s{i}" for i in range(1000) if i not in poison} | {"after"} == {r for (r,) in readings}
    dead = rows(sql, "SELECT reason, payload_size FROM dead_letter WHERE site_id = %s", site_id)
    assert len(dead) == 10
    assert all(reason.startswith("database rejected the message: ") for reason, _ in dead)
    assert {size for _, size in dead} == {len(b'{"value": 1}')}
    # Bisection: about k * log2(n) statements, where one by one costs n.
    assert counting.operations < 200, counting.operations
    assert writer.dead_lettered == 10


@pytest_twisted.ensureDeferred
async def test_dead_letters_keep_what_text_cannot_hold(db_dsn: str, sql: Any, site_id: str) -> None:
    """
    A dead letter whose topic holds a NUL, bytes that are not UTF-8 or 60 kB,
    and whose payload is 1 MB, is stored: the topic escaped and cut with its
    raw bytes beside it, the payload cut to DEAD_LETTER_KEEP with its full
    size and SHA-256.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    big = bytes(range(256)) * 4096
    raw_topic = b"a/\xff\xfe/b"
    letters = [
        DeadLetter(site_id, "n/\x00/ul", b"x", "nul \x00 in reason", T0),
        DeadLetter(site_id, raw_topic.decode("utf-8", "surrogateescape"), b"y", "utf8", T0),
        DeadLetter(site_id, "long/" + "l" * 60000, big, "long", T0),
        DeadLetter(site_id, "cut", big[:DEAD_LETTER_KEEP], "cut", T0, len(big), b"h" * 32),
    ]
    await gatherResults([writer.submit([letter]) for letter in letters])
    pool.close()
    stored = rows(
        sql,
        "SELECT topic, topic_raw, octet_length(payload), payload_size, payload_sha256, reason "
        "FROM dead_letter WHERE site_id = %s ORDER BY id",
        site_id,
    )
    assert len(stored) == 4
    nul, utf8, long, cut = stored
    assert (nul[0], bytes(nul[1]), nul[5]) == ("n/\\x00/ul", b"n/\x00/ul", "nul \\x00 in reason")
    assert (utf8[0], bytes(utf8[1])) == ("a/\\xff\\xfe/b", raw_topic)
    assert len(long[0]) == MAX_TOPIC_BYTES and long[0].endswith("\u2026")
    assert bytes(long[1]) == ("long/" + "l" * 60000).encode()[:TOPIC_RAW_KEEP]
    assert (long[2], long[3], bytes(long[4])) == (
        DEAD_LETTER_KEEP,
        len(big),
        hashlib.sha256(big).digest(),
    )
    assert cut[1] is None
    assert (cut[2], cut[3], bytes(cut[4])) == (DEAD_LETTER_KEEP, len(big), b"h" * 32)
    events = rows(
        sql,
        "SELECT data->>'size' FROM event_log WHERE type = 'dead_letter' AND site_id = %s",
        site_id,
    )
    assert sorted(int(s) for (s,) in events) == sorted([1, 1, len(big), len(big)])


@pytest_twisted.ensureDeferred
async def test_site_down_of_many_devices_is_written_in_parts(
    db_dsn: str, sql: Any, site_id: str
) -> None:
    """
    Device status changes of a whole site (20,000 devices) are written in
    statements bounded by batch_bytes, never one statement that grows with
    the site.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    counting = Counting(pool)
    writer = BatchWriter(
        reactor,
        counting,  # type: ignore[arg-type]
        batch_size=1000,
        batch_bytes=1024 * 1024,
    )
    changes: list[Effect] = [
        DeviceStatus(DeviceKey(site_id, "sensor", None, f"d{i}"), "online", "offline", T0, "down")
        for i in range(20_000)
    ]
    await writer.submit(changes)
    pool.close()
    assert counting.operations >= 5
    assert counting.largest < 1024 * 1024
    (count,) = rows(sql, "SELECT count(*) FROM device_event WHERE site_id = %s", site_id)
    assert count == (20_000,)


@pytest_twisted.ensureDeferred
async def test_batches_are_bounded_in_bytes(db_dsn: str, sql: Any, site_id: str) -> None:
    """
    Large messages are written in batches of at most batch_bytes, however
    many of them wait: 100 messages of 200 kB in batches of 1 MB.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    counting = Counting(pool)
    writer = BatchWriter(
        reactor,
        counting,  # type: ignore[arg-type]
        batch_size=1000,
        batch_bytes=1024 * 1024,
    )
    listener = Listener()
    text = '{"v": "' + "x" * 200_000 + '"}'
    for i in range(100):
        at = T0 + timedelta(seconds=i)
        effects: list[Effect] = [
            TopicSeen(site_id, "t", at),
            DeviceSeen(site_id, "gateway", None, f"g{i}", at, text),
        ]
        writer.queue(effects, listener, i, len(text))
    await listener.all(100)
    pool.close()
    assert writer.batches_written >= 20
    assert counting.largest < 1024 * 1024 + 20_000
    assert listener.committed_messages == list(range(100))
    (count,) = rows(sql, "SELECT count(*) FROM gateway WHERE site_id = %s", site_id)
    assert count == (100,)


class Listener:
    """
    A commit listener that records what it hears.
    """

    def __init__(self) -> None:
        self.committed_messages: list[Any] = []
        self.holds: list[bool] = []
        self._waiting: tuple[int, Deferred[None]] | None = None

    def committed(self, messages: list[Any]) -> None:
        self.committed_messages.extend(messages)
        if self._waiting is not None and len(self.committed_messages) >= self._waiting[0]:
            d = self._waiting[1]
            self._waiting = None
            d.callback(None)

    def hold(self, holding: bool) -> None:
        self.holds.append(holding)

    def all(self, count: int) -> Deferred[None]:
        from twisted.internet import reactor

        d: Deferred[None] = Deferred()
        self._waiting = (count, d)
        return d.addTimeout(30, reactor)


class Unreachable:
    """
    A pool whose database is gone (or, with C{reject}, refuses everything
    for its data), counting the attempts.
    """

    def __init__(self, reject: bool = False) -> None:
        self.attempts = 0
        self.reject = reject

    async def operation(self, sql: str, params: Any = None) -> None:
        self.attempts += 1
        if self.reject:
            raise ValueError("A string literal cannot contain NUL (0x00) characters.")
        raise ConnectionRefusedError("connection refused")


def test_bytes_press_every_site_and_a_greedy_site_is_held_alone() -> None:
    """
    Bytes count as well as messages: one site holding more than site_bytes
    is told to hold on its own; past high_bytes every site is paused, and
    both are released once the bytes are written.
    """
    clock = Clock()
    pool = Unreachable()
    pressure: list[bool] = []
    writer = BatchWriter(
        clock,
        pool,  # type: ignore[arg-type]
        batch_size=1000,
        high_water=10_000,
        high_bytes=6_000_000,
        site_bytes=4_000_000,
        on_pressure=pressure.append,
    )
    greedy, modest = Listener(), Listener()
    for i in range(3):
        writer.queue([TopicSeen("a", "t", T0)], greedy, i, 1_000_000)
    assert greedy.holds == [] and pressure == []
    writer.queue([TopicSeen("a", "t", T0)], greedy, 3, 1_000_000)
    assert greedy.holds == [True] and pressure == []
    for i in range(2):
        writer.queue([TopicSeen("b", "t", T0)], modest, i, 1_000_000)
    assert pressure == [True]
    assert modest.holds == []
    assert writer.bytes_held > 6_000_000
    # The database comes back: everything is written, both released.
    pool.operation = _succeed  # type: ignore[method-assign]
    clock.advance(2.0)
    assert greedy.holds == [True, False]
    assert pressure == [True, False]
    assert writer.bytes_held == 0
    assert len(greedy.committed_messages) == 4 and len(modest.committed_messages) == 2


async def _succeed(sql: str, params: Any = None) -> None:
    pass


def test_the_fakes_match_the_writer_interfaces() -> None:
    """
    The pool and listener fakes of this module stand for the writer's
    L{WritePool} and L{CommitListener} Protocols, and nothing more.
    """
    assert_implements(Unreachable, WritePool)
    assert_implements(Listener, CommitListener, extra=["all"])


def test_a_lane_that_cannot_commit_is_visible() -> None:
    """
    While the database fails, the lane says for how long and why, and
    reports a stall once past STALLED_AFTER; it reports the recovery and
    forgets once a batch commits.
    """
    clock = Clock()
    pool = Unreachable()
    stalls: list[tuple[int, float, str, bool]] = []
    lanes = WriterLanes(clock, pool, lanes=1, on_stall=lambda *stall: stalls.append(stall))
    lanes.submit([TopicSeen("a", "t", T0)])
    clock.advance(0.01)
    for _ in range(4):
        clock.advance(2.0)
    assert stalls == [] and lanes.problem("a") is None
    for _ in range(16):
        clock.advance(2.0)
    [(index, seconds, error)] = lanes.failing()
    assert index == 0 and seconds >= 38.0 and error == "connection refused"
    assert lanes.problem("a") == f"database: nothing committed for {seconds:.0f}s: {error}"
    [(lane, stalled_at, why, recovered)] = stalls
    assert (lane, why, recovered) == (0, "connection refused", False)
    assert 10.0 <= stalled_at < 12.1
    pool.operation = _succeed  # type: ignore[method-assign]
    clock.advance(2.0)
    assert lanes.failing() == [] and lanes.problem("a") is None
    lane, lasted, why, recovered = stalls[1]
    assert (lane, why, recovered) == (0, "connection refused", True) and lasted >= 40
    assert clock.getDelayedCalls() == []


def test_a_refusal_is_never_retried() -> None:
    """
    A batch that cannot be sent for its data (psycopg2's NUL error) is
    dead-lettered, not retried every two seconds forever.
    """
    clock = Clock()
    pool = Unreachable(reject=True)
    writer = BatchWriter(clock, pool)  # type: ignore[arg-type]
    done = writer.submit([TopicSeen("a", "t", T0, b"p")])
    clock.advance(0.01)
    assert done.called
    assert writer.failing_since is None
    # The batch, the dead letter with its topic, the dead letter alone.
    assert pool.attempts == 3
    assert clock.getDelayedCalls() == []


def test_data_errors_are_rejections() -> None:
    """The errors psycopg2 raises for text PostgreSQL cannot hold count as the data's fault."""
    assert is_rejection(UnicodeEncodeError("utf-8", "\ud800", 0, 1, "surrogates not allowed"))
    assert is_rejection(ValueError("A string literal cannot contain NUL (0x00) characters."))
    assert not is_rejection(ConnectionRefusedError())


# Text as a hostile device or broker writes it: any code point, lone
# surrogates and NUL included, sometimes very long.
hostile_text = st.text(st.characters(codec=None), max_size=12) | st.text(
    st.characters(min_codepoint=0x20, max_codepoint=0x7E), min_size=1000, max_size=9000
)
json_leaf = (
    st.none()
    | st.booleans()
    | st.floats(allow_nan=False)
    | st.integers(min_value=-(10**400), max_value=10**400)
    | hostile_text
)
hostile_level = st.text("abc123", min_size=1, max_size=5) | hostile_text
fields = {
    "value": json_leaf,
    "values": st.dictionaries(hostile_text, json_leaf, max_size=4),
    "unit": json_leaf,
    "note": st.recursive(
        json_leaf,
        lambda inner: st.lists(inner, max_size=3) | st.dictionaries(hostile_text, inner),
        max_leaves=6,
    ),
}
hostile_payload = st.one_of(
    st.binary(max_size=64),
    # Valid readings, and hostile text around them.
    st.fixed_dictionaries(
        {"value": st.floats(allow_nan=False, allow_infinity=False)},
        optional={k: v for k, v in fields.items() if k != "value"},
    ).map(lambda drawn: json.dumps(drawn).encode()),
    st.fixed_dictionaries({}, optional=fields).map(lambda drawn: json.dumps(drawn).encode()),
)


def drawn_messages(examples: int) -> list[list[tuple[str, bytes]]]:
    """
    Lists of (topic level, payload) drawn by Hypothesis (generation only:
    the database test that uses them runs on the reactor, where Hypothesis
    cannot drive it).
    """
    drawn: list[list[tuple[str, bytes]]] = []

    @settings(
        max_examples=examples,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(messages=st.lists(st.tuples(hostile_level, hostile_payload), min_size=1, max_size=12))
    def collect(messages: list[tuple[str, bytes]]) -> None:
        drawn.append(messages)

    collect()
    return drawn


@pytest_twisted.ensureDeferred
async def test_any_message_commits_exactly_or_becomes_a_dead_letter(
    db_dsn: str, sql: Any, site_id: str
) -> None:
    """
    Random topics and payloads (lone surrogates, NULs, wildcards, huge
    numbers, long levels) go through processing and the real writer into
    PostgreSQL: each message's readings are committed exactly, or it is a
    dead letter with a reason and none of its readings are; and a normal
    message sent after them commits within a second.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    router = Router(default_topics(site_id))
    clock = iter(range(10**9))
    outcomes = {"dead": 0, "committed": 0, "no readings": 0}
    for messages in drawn_messages(60):
        listener = Listener()
        expected = []
        for level, payload in messages:
            at = T0 + timedelta(microseconds=next(clock))
            topic = f"{site_id}/sensor/{level}/data"
            effects = process(site_id, router, topic, payload, at)
            readings = {(r.sensor_id, r.name, r.value) for r in effects if isinstance(r, Reading)}
            expected.append((at, readings, any(isinstance(e, DeadLetter) for e in effects)))
            writer.queue(effects, listener, at, len(payload) + len(topic))
        await listener.all(len(messages))
        for at, readings, dead in expected:
            where = "WHERE site_id = %s AND received_at = %s"
            stored = set(
                rows(sql, f"SELECT sensor_id, name, value FROM sensor_reading {where}", site_id, at)
            )
            letters = rows(sql, f"SELECT reason FROM dead_letter {where}", site_id, at)
            if letters:
                assert len(letters) == 1 and letters[0][0] and not stored, messages
                outcomes["dead"] += 1
            else:
                assert not dead and stored == readings, messages
                outcomes["committed" if readings else "no readings"] += 1
    normal = writer.submit(message(site_id, f"{site_id}/sensor/n/data", "n", "value", T0))
    await normal.addTimeout(1.0, reactor)
    pool.close()
    # Not vacuous: both outcomes happened.
    assert outcomes["dead"] > 10 and outcomes["committed"] > 0, outcomes


@pytest_twisted.ensureDeferred
async def test_poison_through_the_broker_stalls_nothing(
    running: Any, sql: Any, site_id: str
) -> None:
    """
    The messages of issue 13 published through the real Mosquitto (lone
    surrogates in a value name, a unit and a heartbeat status; a NUL
    escape; a topic level of 8,000 random characters) become dead letters,
    and the readings published after them are committed; the site stays
    connected with no error.
    """
    from tests.publish import publish
    from tests.test_integration import connected, create
    from tests.waiting import eventually

    await create(running, site_id)
    await connected(running, site_id)
    poison = [
        (f"{site_id}/sensor/s1/data", b'{"values":{"a\\ud800":1}}'),
        (f"{site_id}/sensor/s1/data", b'{"value":1,"unit":"\\udc00"}'),
        (f"{site_id}/gateway/g1/heartbeat", b'{"status":"\\ud800"}'),
        (f"{site_id}/gateway/g1/heartbeat", b'{"status":"\\u0000"}'),
        (f"{site_id}/sensor/{secrets.token_urlsafe(6000)}/data", b'{"value":1}'),
    ]
    good = [
        (f"{site_id}/sensor/s2/data", b'{"value": %d, "ts": %d}' % (i, 1767225600 + i))
        for i in range(5)
    ]
    await publish(poison + good)

    def landed() -> Any:
        readings = rows(sql, "SELECT count(*) FROM sensor_reading WHERE site_id = %s", site_id)
        return readings[0][0] == 5 or None

    await eventually(landed, what="the good readings after the poison")
    dead = rows(sql, "SELECT reason FROM dead_letter WHERE site_id = %s ORDER BY id", site_id)
    assert len(dead) == len(poison)
    assert ["lone surrogate" in r for (r,) in dead[:3]] == [True, True, True]
    assert "NUL" in dead[3][0] and "over the limit of 1024" in dead[4][0]
    status = await running.call("site.status", {"site_id": site_id})
    assert (status["status"], status["last_error"]) == ("connected", None)
    assert status["messages_rejected"] == len(poison)
    # The long topic is kept cut, with its bytes; it cannot be replayed.
    letters = (await running.call("deadletter.list", {"site_id": site_id}))["items"]
    [long] = [d for d in letters if d["topic_raw_base64"] is not None]
    assert len(long["topic"]) == 1024
    assert base64.b64decode(long["topic_raw_base64"]) == poison[4][0].encode()[:4096]
    assert (long["payload_size"], long["truncated"]) == (11, False)
    assert long["payload_sha256"] == hashlib.sha256(b'{"value":1}').hexdigest()
    outcome = await running.call("deadletter.replay", [[long["id"]]])
    assert outcome == {"replayed": 0, "dead_again": 1}
    [(reason,)] = rows(sql, "SELECT reason FROM dead_letter WHERE id = %s", long["id"])
    assert reason.startswith("cannot be replayed")


def test_a_pressing_lane_pauses_only_its_own_sites() -> None:
    """
    The writer pauses the running sites of a lane whose backlog is over
    its high water, and only those: a site whose lane commits keeps reading.
    """
    from mqttsvc.config import SiteConfig
    from mqttsvc.sites.site import SiteService
    from tests.test_site_machine import FakeClient
    from tests.test_writer import _StalledPool, two_lanes_sites

    clock = Clock()
    pool = _StalledPool()
    lanes = WriterLanes(clock, pool, lanes=2, batch_size=2, high_water=4, low_water=1)
    stalled, free = two_lanes_sites(lanes, "pause")
    clients: dict[str, FakeClient] = {}
    for site_id in (stalled, free):
        config = SiteConfig(site_id=site_id, host="127.0.0.1", topics=default_topics(site_id))

        def factory(*args: Any, site_id: str = site_id, **kw: Any) -> FakeClient:
            clients[site_id] = FakeClient(*args, **kw)
            return clients[site_id]

        site = SiteService(clock, config, lanes, lambda *_: None, client_factory=factory)
        site.startService()
    for _ in range(6):
        lanes.submit([TopicSeen(stalled, "t", T0)])
        clock.advance(0.02)
    assert (clients[stalled].paused, clients[free].paused) == (1, 0)
    resumed = clients[stalled].resumed
    while pool.pending:
        pool.answer_all()
        clock.advance(0.02)
    assert clients[stalled].resumed == resumed + 1
