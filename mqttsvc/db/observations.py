"""
What mqttsvc has observed, as the control plane reads it back: devices,
readings, discovered topics, connection and device events, dead letters.

Every function takes the control plane's connection pool and returns plain
rows as dictionaries of JSON-ready values; the lists return a L{Page} of
them, read along an index from after the sort key of the page before
(keyset pages: a page costs its own rows whatever the table holds).
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs

from mqttsvc.db.pool import ConnectionPool


def iso(value: datetime | None) -> str | None:
    """
    An ISO 8601 UTC timestamp (naive values are taken as UTC), or None.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@attrs.frozen
class Page:
    """
    One page of a list: its items, the sort key of the last item (None
    when the page is empty), and whether more items follow it.
    """

    items: list[dict[str, Any]]
    last: tuple[Any, ...] | None
    more: bool


def _page(
    rows: list[Any], limit: int, key: Callable[[Any], tuple[Any, ...]], item: Callable[..., Any]
) -> Page:
    """
    A page from up to C{limit} + 1 rows in order (the extra row only says
    that more follow).
    """
    kept = rows[:limit]
    return Page([item(*row) for row in kept], key(kept[-1]) if kept else None, len(rows) > limit)


def _range(site_id: str | None, column: str, since: Any, until: Any) -> list[str]:
    """
    The conditions for one site (or every site, given None) and for
    C{column} after C{since} (exclusive) up to C{until} (inclusive), as
    the parameters C{s}, C{since} and C{until}.
    """
    where = ["TRUE"] if site_id is None else ["site_id = %(s)s"]
    if since is not None:
        where.append(f"{column} > %(since)s")
    if until is not None:
        where.append(f"{column} <= %(until)s")
    return where


#: Each kind of device: its table, its gateway column (or NULL) and its id
#: column.  The kinds are listed in the order device.list gives them.
_DEVICE_TABLES = {
    "datalogger": ("datalogger", "gateway_id", "datalogger_id"),
    "gateway": ("gateway", "NULL", "gateway_id"),
    "sensor": ("sensor", "NULL", "sensor_id"),
}


async def devices(
    pool: ConnectionPool,
    site_id: str,
    kind: str | None,
    status: str | None,
    after: tuple[str, str | None, str] | None,
    limit: int,
) -> Page:
    """
    A site's devices ordered by kind, gateway and id, from after the key
    C{after} (C{(kind, gateway_id, device_id)}): one table after the other,
    each read along its unique index, so that a page costs C{limit} rows
    whatever the site holds (unless C{status} leaves out most of them).
    """
    rows: list[tuple[Any, ...]] = []
    for kind_, (table, gateway, device) in _DEVICE_TABLES.items():
        if len(rows) > limit:
            break
        if (kind is not None and kind_ != kind) or (after is not None and kind_ < after[0]):
            continue
        keys = f"{gateway}, {device}" if gateway != "NULL" else device
        where = ["site_id = %(s)s"]
        if status is not None:
            where.append("status = %(st)s")
        if after is not None and kind_ == after[0]:
            where.append(f"({keys}) > (%(g)s, %(d)s)" if gateway != "NULL" else f"{device} > %(d)s")
        rows.extend(
            (kind_, *row)
            for row in await pool.query(
                f"SELECT {device}, {gateway}, status, reported_status, first_seen_at,"
                f" last_seen_at FROM {table} WHERE {' AND '.join(where)}"
                f" ORDER BY {keys} LIMIT %(n)s",
                {
                    "s": site_id,
                    "st": status,
                    "g": None if after is None else after[1],
                    "d": None if after is None else after[2],
                    "n": limit + 1 - len(rows),
                },
            )
        )
    return _page(rows, limit, lambda row: (row[0], row[2], row[1]), _device)


def _device(
    kind: str,
    device_id: str,
    gateway_id: str | None,
    status: str,
    reported: str | None,
    first: datetime,
    last: datetime,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "device_id": device_id,
        "gateway_id": gateway_id,
        "status": status,
        "reported_status": reported,
        "first_seen_at": iso(first),
        "last_seen_at": iso(last),
    }


async def device_counts(pool: ConnectionPool, site_id: str | None) -> list[dict[str, Any]]:
    """
    Per site (every site that has devices, or the one asked for): how many
    devices are online, offline and unknown.
    """
    rows = await pool.query(
        "SELECT site_id,"
        "  count(*) FILTER (WHERE status = 'online'),"
        "  count(*) FILTER (WHERE status = 'offline'),"
        "  count(*) FILTER (WHERE status = 'unknown')"
        " FROM (SELECT site_id, status FROM gateway"
        "       UNION ALL SELECT site_id, status FROM datalogger"
        "       UNION ALL SELECT site_id, status FROM sensor) d"
        " WHERE (%(s)s::text IS NULL OR site_id = %(s)s)"
        " GROUP BY site_id ORDER BY site_id",
        {"s": site_id},
    )
    return [
        {"site_id": site, "online": online, "offline": offline, "unknown": unknown}
        for site, online, offline, unknown in rows
    ]


#: The orders of reading.list: their key columns.
READING_ORDERS = {"ts": ("ts", "name"), "received": ("received_at", "id")}


async def readings(
    pool: ConnectionPool,
    site_id: str,
    sensor_id: str,
    order: str,
    since: datetime | None,
    until: datetime | None,
    after: tuple[datetime, Any] | None,
    limit: int,
) -> Page:
    """
    Readings of one sensor, oldest first by C{order}: C{"ts"} (the time the
    sensor gave, key C{(ts, name)}) or C{"received"} (when mqttsvc received
    it, key C{(received_at, id)}); C{since} (exclusive) and C{until}
    (inclusive) bound that same column.  From after the key C{after}, or
    after C{since}; with neither, the latest C{limit} (then none follow).
    """
    time, tie = READING_ORDERS[order]
    where = [*_range(site_id, time, since, until), "sensor_id = %(x)s"]
    if after is not None:
        where.append(f"({time}, {tie}) > (%(a)s, %(b)s)")
    latest = after is None and since is None
    direction = " DESC" if latest else ""
    rows = await pool.query(
        f"SELECT ts, name, value, unit, received_at, id FROM sensor_reading"
        f" WHERE {' AND '.join(where)}"
        f" ORDER BY {time}{direction}, {tie}{direction} LIMIT %(n)s",
        {
            "s": site_id,
            "x": sensor_id,
            "since": since,
            "until": until,
            "a": None if after is None else after[0],
            "b": None if after is None else after[1],
            "n": limit if latest else limit + 1,
        },
    )
    if latest:
        rows.reverse()

    def key(row: tuple[Any, ...]) -> tuple[Any, ...]:
        return (row[0], row[1]) if order == "ts" else (row[4], row[5])

    def reading(
        ts: datetime, name: str, value: float, unit: str | None, received: datetime, id_: int
    ) -> dict[str, Any]:
        return {
            "sensor_id": sensor_id,
            "ts": iso(ts),
            "name": name,
            "value": value,
            "unit": unit,
            "received_at": iso(received),
        }

    return _page(rows, limit, key, reading)


def prefix_end(prefix: str) -> str | None:
    """
    The least string after every string that starts with C{prefix}, in
    code point order (the order of C{COLLATE "C"} on UTF-8); None when
    there is none.
    """
    chars = list(prefix)
    while chars:
        point = ord(chars.pop()) + 1
        if point <= 0x10FFFF:
            if 0xD800 <= point <= 0xDFFF:
                point = 0xE000
            return "".join(chars) + chr(point)
    return None


async def topics(
    pool: ConnectionPool, site_id: str, prefix: str | None, after: str | None, limit: int
) -> Page:
    """
    A site's discovered topics in code point order (C{COLLATE "C"}, the
    order in which the topics that share a prefix are together), those
    that start with C{prefix} only, from after the topic C{after}.
    """
    where = ["site_id = %(s)s"]
    if prefix:
        where.append('topic_path COLLATE "C" >= %(p)s')
        end = prefix_end(prefix)
        if end is not None:
            where.append('topic_path COLLATE "C" < %(e)s')
    else:
        end = None
    if after is not None:
        where.append('topic_path COLLATE "C" > %(a)s')
    rows = await pool.query(
        "SELECT topic_path, first_seen_at, last_seen_at, message_count FROM discovered_topic"
        f' WHERE {" AND ".join(where)} ORDER BY topic_path COLLATE "C" LIMIT %(n)s',
        {"s": site_id, "p": prefix, "e": end, "a": after, "n": limit + 1},
    )

    def topic(path: str, first: datetime, last: datetime, count: int) -> dict[str, Any]:
        return {
            "topic_path": path,
            "first_seen_at": iso(first),
            "last_seen_at": iso(last),
            "message_count": count,
        }

    return _page(rows, limit, lambda row: (row[0],), topic)


#: The two kinds of event.list, in the order they take at the same instant,
#: and what each one's row says.
_EVENT_SOURCES = {
    "connection": (
        "connection_event",
        "json_build_object('from', from_state, 'to', to_state, 'reason', reason)",
    ),
    "device": (
        "device_event",
        # A site-wide summary (kind 'site') also says how many devices it
        # changed, as its event_log event does.
        "jsonb_build_object('kind', kind, 'device_id', device_id, 'gateway_id', gateway_id,"
        " 'from', from_status, 'to', to_status, 'reason', reason)"
        " || CASE WHEN devices IS NULL THEN '{}'::jsonb"
        " ELSE jsonb_build_object('devices', devices) END",
    ),
}

_MAX_ID = 2**63 - 1


async def events(
    pool: ConnectionPool,
    site_id: str | None,
    type_: str | None,
    since: datetime | None,
    until: datetime | None,
    after: tuple[datetime, str, int] | None,
    limit: int,
) -> Page:
    """
    Connection and device events, oldest first by C{(at, type, id)}, after
    C{since} (exclusive) up to C{until} (inclusive), from after the key
    C{after}.  Each table is read along its C{(site_id, at, id)} or
    C{(at, id)} index, and the two merged.
    """
    rows: list[tuple[Any, ...]] = []
    for kind, (table, data) in _EVENT_SOURCES.items():
        if type_ is not None and kind != type_:
            continue
        where = _range(site_id, "at", since, until)
        bound = None
        if after is not None:
            # At the cursor's instant, a kind that sorts before the
            # cursor's is done, one after it starts at its first id.
            bound = after[2] if kind == after[1] else (0 if kind > after[1] else _MAX_ID)
            where.append("(at, id) > (%(a)s, %(b)s)")
        rows.extend(
            await pool.query(
                f"SELECT %(t)s, id, site_id, at, {data} FROM {table}"
                f" WHERE {' AND '.join(where)} ORDER BY at, id LIMIT %(n)s",
                {
                    "t": kind,
                    "s": site_id,
                    "since": since,
                    "until": until,
                    "a": None if after is None else after[0],
                    "b": bound,
                    "n": limit + 1,
                },
            )
        )
    rows.sort(key=lambda row: (row[3], row[0], row[1]))

    def event(type_: str, id_: int, site: str, at: datetime, data: Any) -> dict[str, Any]:
        return {"id": id_, "type": type_, "site_id": site, "at": iso(at), "data": data}

    return _page(rows[: limit + 1], limit, lambda row: (row[3], row[0], row[1]), event)


def _payload(raw: bytes) -> tuple[str | None, str]:
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return text, base64.b64encode(raw).decode()


#: Bytes of payload in a page of dead letters.  Each payload is answered
#: twice (as text and in base64), so a page stays near 2.4 MB of JSON, under
#: the 4 MiB answer limit, even when every letter kept its whole 64 KiB: a
#: page holds fewer than its limit when its payloads would pass this.
DEAD_LETTER_PAGE_BYTES = 1024 * 1024


async def dead_letters(
    pool: ConnectionPool,
    site_id: str | None,
    since: datetime | None,
    until: datetime | None,
    after: int | None,
    limit: int,
) -> Page:
    """
    Dead letters, newest first (by id), received after C{since} (exclusive)
    up to C{until} (inclusive), from after (below) the id C{after}; at
    least one, then as many as fit in L{DEAD_LETTER_PAGE_BYTES}.
    """
    where = _range(site_id, "received_at", since, until)
    if after is not None:
        where.append("id < %(a)s")
    # The payloads of the rows past the budget are not even read.
    rows = await pool.query(
        "SELECT id, site_id, topic, topic_raw, CASE WHEN fits THEN payload END, payload_size,"
        " payload_sha256, reason, received_at, fits FROM ("
        "  SELECT *, sum(octet_length(payload)) OVER (ORDER BY id DESC)"
        "    - octet_length(payload) < %(budget)s AS fits"
        f"  FROM dead_letter WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %(n)s"
        ") d ORDER BY id DESC",
        {
            "s": site_id,
            "since": since,
            "until": until,
            "a": after,
            "n": limit + 1,
            "budget": DEAD_LETTER_PAGE_BYTES,
        },
    )
    kept = [row[:-1] for row in rows[:limit] if row[-1]]
    return Page(
        [_dead_letter(*row) for row in kept],
        (kept[-1][0],) if kept else None,
        len(rows) > len(kept),
    )


def _dead_letter(
    id_: int,
    site: str,
    topic: str,
    topic_raw: bytes | None,
    payload: bytes,
    size: int,
    digest: bytes | None,
    reason: str,
    received: datetime,
) -> dict[str, Any]:
    text, encoded = _payload(bytes(payload))
    return {
        "id": id_,
        "site_id": site,
        "topic": topic,
        "topic_raw_base64": None
        if topic_raw is None
        else base64.b64encode(bytes(topic_raw)).decode(),
        "payload": text,
        "payload_base64": encoded,
        "payload_size": size,
        "payload_sha256": None if digest is None else bytes(digest).hex(),
        "truncated": size > len(payload),
        "reason": reason,
        "received_at": iso(received),
    }
