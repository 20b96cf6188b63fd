"""
What mqttsvc has observed, as the control plane reads it back: devices,
readings, discovered topics, connection and device events, dead letters.

Every function takes the control plane's connection pool and returns plain
rows as dictionaries of JSON-ready values.
"""

from __future__ import annotations

import base64
from datetime import UTC, datetime
from typing import Any

from mqttsvc.pool import ConnectionPool


def iso(value: datetime | None) -> str | None:
    """
    An ISO 8601 UTC timestamp (naive values are taken as UTC), or None.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


async def devices(
    pool: ConnectionPool, site_id: str, kind: str | None, status: str | None
) -> list[dict[str, Any]]:
    rows = await pool.query(
        "SELECT * FROM ("
        "  SELECT 'gateway' AS kind, gateway_id AS device_id, NULL AS gateway_id, status,"
        "         reported_status, first_seen_at, last_seen_at FROM gateway WHERE site_id = %(s)s"
        "  UNION ALL SELECT 'datalogger', datalogger_id, gateway_id, status, reported_status,"
        "         first_seen_at, last_seen_at FROM datalogger WHERE site_id = %(s)s"
        "  UNION ALL SELECT 'sensor', sensor_id, NULL, status, reported_status,"
        "         first_seen_at, last_seen_at FROM sensor WHERE site_id = %(s)s"
        ") d WHERE (%(k)s::text IS NULL OR kind = %(k)s)"
        " AND (%(st)s::text IS NULL OR status = %(st)s)"
        " ORDER BY kind, gateway_id NULLS FIRST, device_id",
        {"s": site_id, "k": kind, "st": status},
    )
    return [
        {
            "kind": kind_,
            "device_id": device_id,
            "gateway_id": gateway_id,
            "status": status_,
            "reported_status": reported,
            "first_seen_at": iso(first),
            "last_seen_at": iso(last),
        }
        for kind_, device_id, gateway_id, status_, reported, first, last in rows
    ]


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


async def readings(
    pool: ConnectionPool, site_id: str, sensor_id: str, since: datetime | None, limit: int
) -> list[dict[str, Any]]:
    """
    Readings of one sensor after C{since} (exclusive), oldest first; without
    C{since}, the latest C{limit}, still oldest first.
    """
    if since is None:
        rows = await pool.query(
            "SELECT * FROM (SELECT ts, name, value, unit, received_at FROM sensor_reading "
            "WHERE site_id = %s AND sensor_id = %s ORDER BY ts DESC, name LIMIT %s) r "
            "ORDER BY ts, name",
            (site_id, sensor_id, limit),
        )
    else:
        rows = await pool.query(
            "SELECT ts, name, value, unit, received_at FROM sensor_reading "
            "WHERE site_id = %s AND sensor_id = %s AND ts > %s ORDER BY ts, name LIMIT %s",
            (site_id, sensor_id, since, limit),
        )
    return [
        {
            "sensor_id": sensor_id,
            "ts": iso(ts),
            "name": name,
            "value": value,
            "unit": unit,
            "received_at": iso(received),
        }
        for ts, name, value, unit, received in rows
    ]


async def topics(pool: ConnectionPool, site_id: str) -> list[dict[str, Any]]:
    rows = await pool.query(
        "SELECT topic_path, first_seen_at, last_seen_at, message_count FROM discovered_topic "
        "WHERE site_id = %s ORDER BY topic_path",
        (site_id,),
    )
    return [
        {
            "topic_path": path,
            "first_seen_at": iso(first),
            "last_seen_at": iso(last),
            "message_count": count,
        }
        for path, first, last, count in rows
    ]


async def events(
    pool: ConnectionPool, site_id: str | None, since: datetime | None, limit: int
) -> list[dict[str, Any]]:
    """
    Connection and device events after C{since} (exclusive), oldest first.
    """
    rows = await pool.query(
        "SELECT * FROM ("
        "  SELECT 'connection' AS type, id, site_id, at, json_build_object("
        "      'from', from_state, 'to', to_state, 'reason', reason) AS data"
        "  FROM connection_event"
        "  WHERE (%(s)s::text IS NULL OR site_id = %(s)s)"
        "    AND (%(since)s::timestamptz IS NULL OR at > %(since)s)"
        "  UNION ALL"
        "  SELECT 'device', id, site_id, at, json_build_object("
        "      'kind', kind, 'device_id', device_id, 'gateway_id', gateway_id,"
        "      'from', from_status, 'to', to_status, 'reason', reason)"
        "  FROM device_event"
        "  WHERE (%(s)s::text IS NULL OR site_id = %(s)s)"
        "    AND (%(since)s::timestamptz IS NULL OR at > %(since)s)"
        ") e ORDER BY at, type, id LIMIT %(limit)s",
        {"s": site_id, "since": since, "limit": limit},
    )
    return [
        {"id": id_, "type": type_, "site_id": site, "at": iso(at), "data": data}
        for type_, id_, site, at, data in rows
    ]


def _payload(raw: bytes) -> tuple[str | None, str]:
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return text, base64.b64encode(raw).decode()


async def dead_letters(
    pool: ConnectionPool, site_id: str | None, limit: int
) -> list[dict[str, Any]]:
    """
    The latest dead letters, newest first.
    """
    rows = await pool.query(
        "SELECT id, site_id, topic, topic_raw, payload, payload_size, payload_sha256, reason, "
        "received_at FROM dead_letter "
        "WHERE (%(s)s::text IS NULL OR site_id = %(s)s) ORDER BY id DESC LIMIT %(limit)s",
        {"s": site_id, "limit": limit},
    )
    result = []
    for id_, site, topic, topic_raw, payload, size, digest, reason, received in rows:
        text, encoded = _payload(bytes(payload))
        result.append(
            {
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
        )
    return result
