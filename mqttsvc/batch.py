"""
How one batch of effects becomes one statement per table.

Effects are folded first (one row may appear only once in an C{INSERT ...
ON CONFLICT DO UPDATE}), then each table gets one multi-row statement whose
rows travel as arrays that C{unnest} turns back into rows.  Everything in a
batch is one transaction (the caller's).
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import attrs

from mqttsvc.processing import (
    DeviceKey,
    DeviceSeen,
    DeviceStatus,
    Effect,
    Reading,
    TopicSeen,
)


@attrs.frozen
class StatusUpdate:
    """
    The connection state of one site as the C{mqtt_connection} row shows it.
    """

    site_id: str
    status: str
    last_connected_at: datetime | None
    retry_count: int
    next_retry: datetime | None
    last_error: str | None


@attrs.frozen
class ConnectionEvent:
    """
    One transition of a site's connection, for the C{connection_event}
    history.
    """

    site_id: str
    at: datetime
    from_state: str
    to_state: str
    reason: str | None


#: Per device kind: its table and the columns that identify a device there
#: besides C{site_id}.
DEVICE_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "gateway": ("gateway", ("gateway_id",)),
    "datalogger": ("datalogger", ("gateway_id", "datalogger_id")),
    "sensor": ("sensor", ("sensor_id",)),
}


def device_ids(key: DeviceKey) -> tuple[str, ...]:
    """
    The identifying column values of a device in its table, after site_id.
    """
    if key.kind == "datalogger":
        assert key.gateway_id is not None
        return (key.gateway_id, key.device_id)
    return (key.device_id,)


def _upsert_devices(table: str, ids: tuple[str, ...]) -> str:
    id_columns = ", ".join(ids)
    id_arrays = ", ".join(["%s::text[]"] * len(ids))
    newer = f"EXCLUDED.last_seen_at >= {table}.last_seen_at"
    return f"""
INSERT INTO {table} (site_id, {id_columns}, status, first_seen_at, last_seen_at, last_payload,
                     reported_status, heartbeat_interval)
SELECT s, {id_columns}, 'online', f, l, p::jsonb, rs, hi
FROM unnest(%s::text[], {id_arrays}, %s::timestamptz[], %s::timestamptz[], %s::text[],
            %s::text[], %s::float8[])
    AS t(s, {id_columns}, f, l, p, rs, hi)
ON CONFLICT (site_id, {id_columns}) DO UPDATE SET
    first_seen_at = LEAST({table}.first_seen_at, EXCLUDED.first_seen_at),
    last_payload = CASE WHEN {newer} THEN EXCLUDED.last_payload ELSE {table}.last_payload END,
    reported_status = CASE WHEN {newer} THEN COALESCE(EXCLUDED.reported_status,
                                                      {table}.reported_status)
                           ELSE {table}.reported_status END,
    heartbeat_interval = CASE WHEN {newer} THEN COALESCE(EXCLUDED.heartbeat_interval,
                                                         {table}.heartbeat_interval)
                              ELSE {table}.heartbeat_interval END,
    last_seen_at = GREATEST({table}.last_seen_at, EXCLUDED.last_seen_at)
"""


def _update_device_status(table: str, ids: tuple[str, ...]) -> str:
    id_columns = ", ".join(ids)
    id_arrays = ", ".join(["%s::text[]"] * len(ids))
    matches = " AND ".join(f"d.{c} = u.{c}" for c in ("site_id", *ids))
    return f"""
UPDATE {table} AS d SET status = u.status
FROM unnest(%s::text[], {id_arrays}, %s::text[]) AS u(site_id, {id_columns}, status)
WHERE {matches}
"""


_UPSERT_DEVICES = {kind: _upsert_devices(*spec) for kind, spec in DEVICE_TABLES.items()}
_UPDATE_DEVICE_STATUS = {kind: _update_device_status(*spec) for kind, spec in DEVICE_TABLES.items()}

_UPSERT_TOPICS = """
INSERT INTO discovered_topic (site_id, topic_path, first_seen_at, last_seen_at, message_count)
SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::bigint[])
ON CONFLICT (site_id, topic_path) DO UPDATE SET
    first_seen_at = LEAST(discovered_topic.first_seen_at, EXCLUDED.first_seen_at),
    last_seen_at = GREATEST(discovered_topic.last_seen_at, EXCLUDED.last_seen_at),
    message_count = discovered_topic.message_count + EXCLUDED.message_count
"""

_INSERT_READINGS = """
INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value, unit, received_at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::text[], %s::float8[],
                     %s::text[], %s::timestamptz[])
ON CONFLICT (site_id, sensor_id, ts, name) DO NOTHING
"""

_INSERT_DEAD_LETTERS = """
INSERT INTO dead_letter (site_id, topic, payload, reason, received_at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::text[], %s::timestamptz[])
"""

_INSERT_DEVICE_EVENTS = """
INSERT INTO device_event (site_id, kind, device_id, gateway_id, at, from_status, to_status, reason)
SELECT * FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[],
                     %s::text[], %s::text[], %s::text[])
"""

_INSERT_EVENTS = """
INSERT INTO connection_event (site_id, at, from_state, to_state, reason)
SELECT * FROM unnest(%s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[])
"""

_UPDATE_STATUS = """
UPDATE mqtt_connection AS c SET
    status = u.status,
    last_connected_at = u.last_connected_at,
    mqtt_retry_count = u.retry_count,
    mqtt_next_retry = u.next_retry,
    last_error = u.last_error
FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::integer[], %s::timestamptz[], %s::text[])
    AS u(site_id, status, last_connected_at, retry_count, next_retry, last_error)
WHERE c.site_id = u.site_id
"""


async def _write_rows(cursor: Any, statement: str, rows: Iterable[tuple[Any, ...]]) -> None:
    """
    Run one statement over many rows: the rows are passed column by column,
    as the arrays that the statement's C{unnest} turns back into rows.
    """
    rows = list(rows)
    if rows:
        await cursor.execute(statement, [list(column) for column in zip(*rows, strict=True)])


def _as_row(value: Any) -> tuple[Any, ...]:
    row: tuple[Any, ...] = attrs.astuple(value, recurse=False)
    return row


class _Fold:
    """
    The rows of one batch, with repeated rows folded into one.
    """

    def __init__(self) -> None:
        self.topics: dict[tuple[str, str], list[Any]] = {}
        self.devices: dict[str, dict[tuple[str, ...], list[Any]]] = {k: {} for k in DEVICE_TABLES}
        self.statuses: dict[str, dict[tuple[str, ...], str]] = {k: {} for k in DEVICE_TABLES}
        self.device_events: list[tuple[Any, ...]] = []
        self.readings: list[tuple[Any, ...]] = []
        self.dead: list[tuple[Any, ...]] = []

    def add(self, effect: Effect) -> None:
        if isinstance(effect, TopicSeen):
            seen = self.topics.get((effect.site_id, effect.topic))
            if seen is None:
                self.topics[(effect.site_id, effect.topic)] = [effect.at, effect.at, 1]
            else:
                seen[0] = min(seen[0], effect.at)
                seen[1] = max(seen[1], effect.at)
                seen[2] += 1
        elif isinstance(effect, DeviceSeen):
            key = (effect.site_id, *device_ids(effect.key))
            row = self.devices[effect.kind].get(key)
            if row is None:
                self.devices[effect.kind][key] = [
                    effect.at,
                    effect.at,
                    effect.payload,
                    effect.reported_status,
                    effect.interval,
                ]
            else:
                row[0] = min(row[0], effect.at)
                if effect.at >= row[1]:
                    # A heartbeat that does not repeat its status or interval
                    # leaves the last known ones, as the upsert does.
                    row[1:] = [
                        effect.at,
                        effect.payload,
                        effect.reported_status or row[3],
                        effect.interval or row[4],
                    ]
        elif isinstance(effect, Reading):
            self.readings.append(_as_row(effect))
        elif isinstance(effect, DeviceStatus):
            device = effect.key
            # Effects arrive in the order they happened: the last one wins.
            self.statuses[device.kind][(device.site_id, *device_ids(device))] = effect.status
            self.device_events.append(
                (
                    device.site_id,
                    device.kind,
                    device.device_id,
                    device.gateway_id,
                    effect.at,
                    effect.from_status,
                    effect.status,
                    effect.reason,
                )
            )
        else:
            self.dead.append(_as_row(effect))


async def write_effects(
    cursor: Any,
    effects: Iterable[Effect],
    statuses: Iterable[StatusUpdate] = (),
    events: list[ConnectionEvent] | None = None,
) -> None:
    """
    Write effects, site statuses and connection events with one statement
    per table.
    """
    fold = _Fold()
    for effect in effects:
        fold.add(effect)
    await _write_rows(cursor, _UPSERT_TOPICS, ((*k, *v) for k, v in fold.topics.items()))
    for kind, rows in fold.devices.items():
        await _write_rows(cursor, _UPSERT_DEVICES[kind], ((*k, *v) for k, v in rows.items()))
    # After the upserts, so that a device first seen in this batch exists.
    for kind, changes in fold.statuses.items():
        await _write_rows(
            cursor, _UPDATE_DEVICE_STATUS[kind], ((*k, status) for k, status in changes.items())
        )
    await _write_rows(cursor, _INSERT_DEVICE_EVENTS, fold.device_events)
    await _write_rows(cursor, _INSERT_READINGS, fold.readings)
    await _write_rows(cursor, _INSERT_DEAD_LETTERS, fold.dead)
    await _write_rows(cursor, _INSERT_EVENTS, (_as_row(e) for e in events or ()))
    latest = {s.site_id: s for s in statuses}
    await _write_rows(cursor, _UPDATE_STATUS, (_as_row(s) for s in latest.values()))
