"""
The list methods page (issue 14): at realistic sizes, rows inserted by SQL,
following C{next_cursor} from the first page to the last gives every row
exactly once, in the documented order, and each page is read along an
index whatever the table holds.
"""

from __future__ import annotations

import json
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg2
import pytest
import pytest_twisted

from mqttsvc.control.rpc.dispatcher import MAX_RESPONSE
from mqttsvc.control.rpc.paging import MAX_LIMIT, MAX_SITE_LIMIT, encode
from mqttsvc.db.dead_letters import DEAD_LETTER_PAGE_BYTES, DeadLetters
from mqttsvc.db.devices import Devices
from mqttsvc.db.events import Events
from mqttsvc.db.pages import Page, iso
from mqttsvc.db.readings import Readings
from mqttsvc.db.topics import Topics
from tests.service import RunningService

#: Far from "now", so that only this test's rows fall between since and until.
BASE = datetime(2001, 1, 1, tzinfo=UTC)


async def every_page(
    running: RunningService, method: str, params: dict[str, Any], limit: int
) -> tuple[list[Any], int]:
    """
    Every item of a list method, following its cursors; and how many pages.
    """
    found: list[Any] = []
    cursor = None
    pages = 0
    while True:
        page = await running.call(method, {**params, "limit": limit, "cursor": cursor})
        pages += 1
        assert len(page["items"]) <= limit
        found.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            return found, pages
        assert len(page["items"]) == limit, "a page before the last is full"


@pytest_twisted.ensureDeferred
async def test_device_pages_cover_every_device_once(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """
    30,000 devices of three kinds: the pages give each exactly once, in
    kind, gateway, id order, with and without filters; a device added
    behind the cursor while paging is not seen, one ahead of it is.
    """
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO gateway (site_id, gateway_id, status, first_seen_at, last_seen_at)"
            " SELECT %s, 'g' || lpad(i::text, 4, '0'), 'online', now(), now()"
            " FROM generate_series(0, 999) i",
            (site_id,),
        )
        cur.execute(
            "INSERT INTO datalogger (site_id, gateway_id, datalogger_id, status, first_seen_at,"
            " last_seen_at) SELECT %s, 'g' || lpad((i %% 1000)::text, 4, '0'), 'd' || i,"
            " CASE WHEN i %% 7 = 0 THEN 'offline' ELSE 'online' END, now(), now()"
            " FROM generate_series(0, 8999) i",
            (site_id,),
        )
        cur.execute(
            "INSERT INTO sensor (site_id, sensor_id, status, first_seen_at, last_seen_at)"
            " SELECT %s, 's' || i, CASE WHEN i %% 5 = 0 THEN 'offline' ELSE 'unknown' END,"
            " now(), now() FROM generate_series(0, 19999) i",
            (site_id,),
        )

    def expected(where: str = "TRUE") -> list[tuple[Any, ...]]:
        with sql.cursor() as cur:
            cur.execute(
                "SELECT kind, gateway_id, device_id FROM ("
                "  SELECT 'gateway' AS kind, NULL AS gateway_id, gateway_id AS device_id, status"
                "  FROM gateway WHERE site_id = %(s)s"
                "  UNION ALL SELECT 'datalogger', gateway_id, datalogger_id, status"
                "  FROM datalogger WHERE site_id = %(s)s"
                "  UNION ALL SELECT 'sensor', NULL, sensor_id, status"
                "  FROM sensor WHERE site_id = %(s)s"
                f") d WHERE {where} ORDER BY kind, gateway_id NULLS FIRST, device_id",
                {"s": site_id},
            )
            return [tuple(row) for row in cur.fetchall()]

    def keys(devices: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(d["kind"], d["gateway_id"], d["device_id"]) for d in devices]

    devices, pages = await every_page(running, "device.list", {"site_id": site_id}, MAX_LIMIT)
    assert len(devices) == 30_000
    assert keys(devices) == expected()
    assert pages == 30, "the last page is full and says so: no empty page after it"
    offline, _ = await every_page(
        running, "device.list", {"site_id": site_id, "status": "offline"}, 777
    )
    assert keys(offline) == expected("status = 'offline'")
    assert len(offline) == 9000 // 7 + 1 + 20_000 // 5
    sensors, _ = await every_page(
        running, "device.list", {"site_id": site_id, "kind": "sensor", "status": "unknown"}, 999
    )
    assert keys(sensors) == expected("kind = 'sensor' AND status = 'unknown'")

    first = await running.call("device.list", {"site_id": site_id, "limit": 500})
    last = first["items"][-1]
    assert last["kind"] == "datalogger" and "g0000" < last["gateway_id"] < "g0999"
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO datalogger (site_id, gateway_id, datalogger_id, first_seen_at,"
            " last_seen_at) VALUES (%(s)s, 'g0000', 'behind', now(), now()),"
            " (%(s)s, 'g0999', 'ahead', now(), now())",
            {"s": site_id},
        )
    rest: list[dict[str, Any]] = []
    cursor = first["next_cursor"]
    while cursor is not None:
        page = await running.call(
            "device.list", {"site_id": site_id, "cursor": cursor, "limit": MAX_LIMIT}
        )
        rest.extend(page["items"])
        cursor = page["next_cursor"]
    seen = keys(first["items"] + rest)
    assert len(seen) == len(set(seen)) == 30_001
    assert ("datalogger", "g0999", "ahead") in seen
    assert ("datalogger", "g0000", "behind") not in seen


@pytest_twisted.ensureDeferred
async def test_topic_pages_in_code_point_order_and_by_prefix(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """
    20,000 topics: the pages give each once in code point order (whatever
    the database's locale), and a prefix gives exactly the topics that
    start with it, punctuation and non-ASCII included.
    """
    paths = [f"{site_id}/a/{i:05d}/data" for i in range(19_990)]
    paths += [f"{site_id}/a-b/x", f"{site_id}/ab/x", f"{site_id}/aé/x", f"{site_id}/a\U0010ffff"]
    paths += [f"{site_id}/A/x", f"{site_id}/a/", f"{site_id}/b", f"{site_id}/a/1", "other/a"]
    paths += [f"{site_id}/a/1\U0010ffff/x"]
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO discovered_topic (site_id, topic_path, first_seen_at, last_seen_at,"
            " message_count) SELECT %s, p, now(), now(), 1 FROM unnest(%s::text[]) p",
            (site_id, paths),
        )
    topics, _ = await every_page(running, "topic.list", {"site_id": site_id}, MAX_LIMIT)
    assert [t["topic_path"] for t in topics] == sorted(paths)
    for prefix in (f"{site_id}/a/1", f"{site_id}/a", f"{site_id}/a/1\U0010ffff", "other/"):
        found, _ = await every_page(
            running, "topic.list", {"site_id": site_id, "prefix": prefix}, 333
        )
        assert [t["topic_path"] for t in found] == sorted(p for p in paths if p.startswith(prefix))
    nothing = await running.call("topic.list", {"site_id": site_id, "prefix": "nothing/"})
    assert nothing == {"items": [], "next_cursor": None}


@pytest_twisted.ensureDeferred
async def test_reading_pages_by_ts_and_by_receive_time(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """
    20,000 readings (and one stamped 2199): in ts order the pages give each
    once; in receive order too, and a poller that keeps the last
    next_cursor gets exactly the readings received after it, even though
    the reading from 2199 stays the latest by ts.
    """
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value, received_at)"
            " SELECT %(s)s, 'x', %(base)s + (i / 2) * interval '1 second',"
            " CASE WHEN i %% 2 = 0 THEN 'temp' ELSE 'hum' END, i,"
            # Received in another order than ts, and in ties of ten.
            " %(base)s + interval '1 day' + ((i * 7919) %% 20000 / 10) * interval '1 ms'"
            " FROM generate_series(0, 19999) i",
            {"s": site_id, "base": BASE},
        )
        cur.execute(
            "INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value, received_at)"
            " VALUES (%s, 'x', '2199-01-01Z', 'temp', -1, %s)",
            (site_id, BASE + timedelta(days=1, minutes=1)),
        )

    def expected(order: str) -> list[float]:
        with sql.cursor() as cur:
            cur.execute(
                f"SELECT value FROM sensor_reading WHERE site_id = %s ORDER BY {order}",
                (site_id,),
            )
            return [row[0] for row in cur.fetchall()]

    base = {"site_id": site_id, "sensor_id": "x"}
    by_ts, _ = await every_page(
        running, "reading.list", {**base, "since": "0001-01-01T00:00:00Z"}, MAX_LIMIT
    )
    assert [r["value"] for r in by_ts] == expected("ts, name")
    latest = await running.call("reading.list", {**base, "limit": 1})
    assert (latest["items"][0]["ts"], latest["next_cursor"]) == ("2199-01-01T00:00:00Z", None)
    window = await running.call(
        "reading.list", {**base, "since": iso(BASE), "until": iso(BASE + timedelta(seconds=2))}
    )
    assert [r["value"] for r in window["items"]] == [3, 2, 5, 4]

    received = {**base, "order": "received"}
    newest = await running.call("reading.list", {**received, "limit": 1})
    assert newest["items"][0]["value"] == -1
    polled: list[Any] = []
    cursor = None
    while True:
        page = await running.call(
            "reading.list",
            {**received, "since": iso(BASE), "cursor": cursor, "limit": MAX_LIMIT},
        )
        polled.extend(page["items"])
        assert page["next_cursor"] is not None
        cursor = page["next_cursor"]
        if len(page["items"]) < MAX_LIMIT:
            break
    assert [r["value"] for r in polled] == expected("received_at, id")
    nothing = await running.call("reading.list", {**received, "cursor": cursor})
    assert nothing == {"items": [], "next_cursor": cursor}
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value)"
            " VALUES (%s, 'x', '2020-01-01Z', 'temp', 42)",
            (site_id,),
        )
    fresh = await running.call("reading.list", {**received, "cursor": cursor})
    assert [r["value"] for r in fresh["items"]] == [42]
    assert fresh["next_cursor"] != cursor


@pytest_twisted.ensureDeferred
async def test_event_pages_merge_both_kinds(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """
    20,000 connection and device events, many at the same instant, and a
    site-wide summary: the pages give each once in (at, type, id) order,
    for the site or for all sites between since and until, and of one type.
    """
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO connection_event (site_id, at, from_state, to_state)"
            " SELECT %(s)s, %(base)s + (i / 3) * interval '1 second', 'a', 'b'"
            " FROM generate_series(1, 10000) i",
            {"s": site_id, "base": BASE},
        )
        cur.execute(
            "INSERT INTO device_event (site_id, kind, device_id, at, from_status, to_status)"
            " SELECT %(s)s, 'sensor', 's' || i, %(base)s + (i / 2) * interval '1 second',"
            " 'unknown', 'online' FROM generate_series(1, 10000) i",
            {"s": site_id, "base": BASE},
        )
        cur.execute(
            "INSERT INTO device_event (site_id, kind, at, to_status, reason, devices)"
            " VALUES (%s, 'site', %s, 'unknown', 'mqttsvc started', 300000)",
            (site_id, BASE + timedelta(days=1)),
        )

    def expected(where: str = "TRUE") -> list[tuple[Any, ...]]:
        with sql.cursor() as cur:
            cur.execute(
                "SELECT type, id FROM (SELECT 'connection' AS type, id, at, site_id"
                " FROM connection_event UNION ALL SELECT 'device', id, at, site_id"
                f" FROM device_event) e WHERE site_id = %s AND {where} ORDER BY at, type, id",
                (site_id,),
            )
            return [tuple(row) for row in cur.fetchall()]

    def keys(events: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(e["type"], e["id"]) for e in events]

    events, _ = await every_page(running, "event.list", {"site_id": site_id}, MAX_LIMIT)
    assert len(events) == 20_001
    assert keys(events) == expected()
    # A site-wide summary says how many devices it changed.
    assert events[-1]["data"] == {
        "kind": "site",
        "device_id": None,
        "gateway_id": None,
        "from": None,
        "to": "unknown",
        "reason": "mqttsvc started",
        "devices": 300_000,
    }
    assert "devices" not in events[0]["data"]
    everywhere, _ = await every_page(
        running,
        "event.list",
        {"since": iso(BASE), "until": iso(BASE + timedelta(seconds=3000))},
        MAX_LIMIT,
    )
    assert keys(everywhere) == expected(
        f"at > '{iso(BASE)}' AND at <= '{iso(BASE + timedelta(seconds=3000))}'"
    )
    devices, _ = await every_page(
        running, "event.list", {"site_id": site_id, "type": "device"}, 555
    )
    assert keys(devices) == expected("type = 'device'")


@pytest_twisted.ensureDeferred
async def test_dead_letter_pages_newest_first(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """
    5,000 dead letters: the pages give each once, newest first, for the
    site and between since and until.
    """
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO dead_letter (site_id, topic, payload, reason, received_at)"
            " SELECT %(s)s, 't/' || i, convert_to('p' || i, 'UTF8'), 'bad',"
            " %(base)s + i * interval '1 second' FROM generate_series(1, 5000) i",
            {"s": site_id, "base": BASE},
        )
        cur.execute(
            "SELECT id, received_at FROM dead_letter WHERE site_id = %s ORDER BY id DESC",
            (site_id,),
        )
        rows = cur.fetchall()
    letters, _ = await every_page(running, "deadletter.list", {"site_id": site_id}, 700)
    assert [d["id"] for d in letters] == [id_ for id_, _ in rows]
    since, until = BASE + timedelta(seconds=100), BASE + timedelta(seconds=1100)
    window, pages = await every_page(
        running,
        "deadletter.list",
        {"site_id": site_id, "since": iso(since), "until": iso(until)},
        300,
    )
    assert [d["id"] for d in window] == [id_ for id_, at in rows if since < at <= until]
    assert pages == 4


@pytest_twisted.ensureDeferred
async def test_dead_letter_pages_are_bounded_in_bytes(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """
    Dead letters that kept their whole 64 KiB: a page stops at
    DEAD_LETTER_PAGE_BYTES of payload (fewer items than its limit, with a
    cursor), so its answer stays under the 4 MiB answer limit; following
    the cursors still gives every letter once.
    """
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO dead_letter (site_id, topic, payload, reason, received_at)"
            " SELECT %s, 't', convert_to(repeat(chr(97 + i %% 26), 65536), 'UTF8'), 'big', now()"
            " FROM generate_series(1, 40) i",
            (site_id,),
        )
    per_page = DEAD_LETTER_PAGE_BYTES // 65536
    first = await running.call_raw("deadletter.list", {"site_id": site_id, "limit": MAX_LIMIT})
    assert len(first["result"]["items"]) == per_page
    assert len(json.dumps(first)) < MAX_RESPONSE
    seen = first["result"]["items"]
    cursor = first["result"]["next_cursor"]
    while cursor is not None:
        page = await running.call(
            "deadletter.list", {"site_id": site_id, "cursor": cursor, "limit": MAX_LIMIT}
        )
        seen.extend(page["items"])
        cursor = page["next_cursor"]
    assert len(seen) == len({d["id"] for d in seen}) == 40
    assert {len(d["payload"]) for d in seen} == {65536}


@pytest_twisted.ensureDeferred
async def test_site_pages_with_a_status_filter(running: RunningService, sql: Any) -> None:
    """
    1,200 sites written by SQL: the pages give each once in site id order;
    the status filter is applied on the server, also when no site matches.
    """
    ids = [f"page{i:05d}" for i in range(1200)]
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO mqtt_connection (site_id, host, is_enabled)"
            " SELECT s, '127.0.0.1', false FROM unnest(%s::text[]) s",
            (ids,),
        )
    try:
        sites, pages = await every_page(running, "site.list", {}, MAX_SITE_LIMIT)
        assert [s["site_id"] for s in sites] == ids
        assert pages == 12
        assert {s["status"]["status"] for s in sites} == {"disconnected"}
        disconnected, _ = await every_page(running, "site.list", {"status": "disconnected"}, 77)
        assert len(disconnected) == 1200
        none = await running.call("site.list", {"status": "connected"})
        assert none == {"items": [], "next_cursor": None}
        wrong = await running.call_raw("site.list", {"status": "asleep"})
        assert wrong["error"]["data"]["field"] == "status"
    finally:
        with sql.cursor() as cur:
            cur.execute("DELETE FROM mqtt_connection WHERE site_id = ANY(%s)", (ids,))


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("device.list", {"site_id": "s", "cursor": "not a cursor"}),
        ("device.list", {"site_id": "s", "cursor": encode("topic", ["x"])}),
        ("device.list", {"site_id": "s", "cursor": encode("device", ["robot", None, "x"])}),
        ("device.list", {"site_id": "s", "cursor": encode("device", ["gateway", "g", "x"])}),
        ("device.list", {"site_id": "s", "cursor": encode("device", ["gateway", None, "x"]) + "="}),
        ("topic.list", {"site_id": "s", "cursor": encode("topic", [1])}),
        ("topic.list", {"site_id": "s", "cursor": encode("topic", ["a", "b"])}),
        (
            "reading.list",
            {"site_id": "s", "sensor_id": "x", "cursor": encode("reading.ts", ["2020", "t"])},
        ),
        (
            "reading.list",
            {
                "site_id": "s",
                "sensor_id": "x",
                "order": "received",
                "cursor": encode("reading.ts", [BASE, "t"]),
            },
        ),
        ("event.list", {"cursor": encode("event", [BASE, "device", True])}),
        ("deadletter.list", {"cursor": "e30"}),
        ("site.list", {"cursor": "!!!!"}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_bad_cursor_names_the_cursor(
    running: RunningService, method: str, params: dict[str, Any]
) -> None:
    """
    A cursor that the method did not give (garbage, another list's, the
    wrong types, a key that cannot exist, non-canonical base64) is -32602
    naming the cursor, before any query runs.
    """
    response = await running.call_raw(method, params)
    assert response["error"]["code"] == -32602, response
    assert response["error"]["data"]["field"] == "cursor"


@pytest_twisted.ensureDeferred
async def test_limits_are_bounded(running: RunningService) -> None:
    """
    Every list method refuses a page of fewer than 1 or more than its
    most (MAX_SITE_LIMIT sites, MAX_LIMIT of anything else) items, naming
    the limit, and gives a page of exactly its most.
    """
    for method, params, most in (
        ("site.list", {}, MAX_SITE_LIMIT),
        ("device.list", {"site_id": "s"}, MAX_LIMIT),
        ("topic.list", {"site_id": "s"}, MAX_LIMIT),
        ("reading.list", {"site_id": "s", "sensor_id": "x"}, MAX_LIMIT),
        ("event.list", {}, MAX_LIMIT),
        ("deadletter.list", {}, MAX_LIMIT),
    ):
        for limit in (0, -1, most + 1):
            response = await running.call_raw(method, {**params, "limit": limit})
            assert response["error"]["data"]["field"] == "limit", (method, response)
        assert "result" in await running.call_raw(method, {**params, "limit": most})


#: Rows per table for the plans of test_every_page_is_an_index_scan: twenty
#: times the largest page.  The planner chose the same index scans, with no
#: sort, for every one of its 18 queries at 5,000, 10,000, 20,000, 30,000
#: and 100,000 rows (PostgreSQL 15, checked with EXPLAIN); 100,000 took 5 s
#: to insert, 20,000 takes 1.
INDEXED_ROWS = 20_000


class _ExplainingPool:
    """
    Stands for the connection pool: runs each query on a blocking
    connection, and keeps its plan.
    """

    def __init__(self, conn: Any) -> None:
        self.conn = conn
        self.plans: list[str] = []

    async def query(self, sql: str, params: Any) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute("EXPLAIN (FORMAT JSON) " + sql, params)
            self.plans.append(json.dumps(cur.fetchone()[0]))
            cur.execute(sql, params)
            return list(cur.fetchall())


def _run(coroutine: Coroutine[Any, Any, Page]) -> Page:
    """
    Run a coroutine that never waits (its pool answers at once).
    """
    try:
        coroutine.send(None)
    except StopIteration as done:
        result: Page = done.value
        return result
    raise AssertionError("the coroutine waited")


def test_every_page_is_an_index_scan(db_dsn: str, site_id: str) -> None:
    """
    With INDEXED_ROWS rows in each table, the first page and a page from
    a cursor of every list are read along an index, in its order: no
    sequential scan and no sort, so a page costs its own rows.
    """
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    s = {"s": site_id, "base": BASE, "n": INDEXED_ROWS}
    with conn.cursor() as cur:
        for statement in (
            "INSERT INTO sensor (site_id, sensor_id, first_seen_at, last_seen_at)"
            " SELECT %(s)s, 's' || i, now(), now() FROM generate_series(1, %(n)s) i",
            "INSERT INTO gateway (site_id, gateway_id, first_seen_at, last_seen_at)"
            " SELECT %(s)s, 'g' || i, now(), now() FROM generate_series(1, %(n)s) i",
            "INSERT INTO datalogger (site_id, gateway_id, datalogger_id, first_seen_at,"
            " last_seen_at) SELECT %(s)s, 'g' || (i %% 100), 'd' || i, now(), now()"
            " FROM generate_series(1, %(n)s) i",
            "INSERT INTO discovered_topic (site_id, topic_path, first_seen_at, last_seen_at)"
            " SELECT %(s)s, 't/' || i, now(), now() FROM generate_series(1, %(n)s) i",
            "INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value, received_at)"
            " SELECT %(s)s, 'x', %(base)s + i * interval '1 s', 'v', i,"
            " %(base)s + (i %% 977) * interval '1 s' FROM generate_series(1, %(n)s) i",
            "INSERT INTO connection_event (site_id, at, from_state, to_state)"
            " SELECT %(s)s, %(base)s + i * interval '1 s', 'a', 'b'"
            " FROM generate_series(1, %(n)s) i",
            "INSERT INTO device_event (site_id, kind, device_id, at, from_status, to_status)"
            " SELECT %(s)s, 'sensor', 's', %(base)s + i * interval '1 s', 'a', 'b'"
            " FROM generate_series(1, %(n)s) i",
            "INSERT INTO dead_letter (site_id, topic, payload, reason, received_at)"
            " SELECT %(s)s, 't', 'p', 'r', now() FROM generate_series(1, %(n)s) i",
        ):
            cur.execute(statement, s)
        cur.execute(
            "ANALYZE gateway, datalogger, sensor, discovered_topic, sensor_reading,"
            " connection_event, device_event, dead_letter"
        )
    pool = _ExplainingPool(conn)
    p: Any = pool
    try:
        for order in ("ts", "received"):
            first = _run(Readings(p).series(site_id, "x", order, BASE, None, None, 100))
            assert first.last is not None
            _run(Readings(p).series(site_id, "x", order, None, None, first.last, 100))
            _run(Readings(p).series(site_id, "x", order, None, None, None, 100))
        first = _run(Devices(p).page(site_id, None, None, None, 1000))
        after: Any = first.last
        _run(Devices(p).page(site_id, None, "unknown", after, 1000))
        _run(Devices(p).page(site_id, "gateway", None, None, 1000))
        _run(Devices(p).page(site_id, "sensor", None, None, 1000))
        first = _run(Topics(p).page(site_id, "t/1", None, 1000))
        _run(Topics(p).page(site_id, None, first.items[-1]["topic_path"], 1000))
        first = _run(Events(p).history(site_id, None, BASE, None, None, 1000))
        after = first.last
        _run(Events(p).history(None, None, None, None, after, 1000))
        first = _run(DeadLetters(p).page(site_id, None, None, None, 1000))
        _run(DeadLetters(p).page(None, None, None, first.items[-1]["id"], 1000))
    finally:
        with conn.cursor() as cur:
            for table in (
                "gateway",
                "datalogger",
                "sensor",
                "discovered_topic",
                "sensor_reading",
                "connection_event",
                "device_event",
                "dead_letter",
            ):
                cur.execute(f"DELETE FROM {table} WHERE site_id = %s", (site_id,))
        conn.close()
    assert len(pool.plans) == 18
    for plan in pool.plans:
        assert "Index" in plan and "Seq Scan" not in plan and '"Sort"' not in plan, plan
