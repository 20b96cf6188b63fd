"""
How one batch of effects becomes one statement per table.

Effects are folded first (one row may appear only once in an C{INSERT ...
ON CONFLICT DO UPDATE}), then each table gets one multi-row statement whose
rows travel as arrays that C{unnest} turns back into rows.  The statements
of a batch are sent as one query: one round trip and, without an explicit
C{BEGIN}, one implicit transaction of their own (L{write_effects} on a pool's
C{operation}), or part of the caller's transaction when sent on its cursor.
A batch written by a site's owner in a cluster starts with its fence
(L{mqttsvc.db.leases.Fence}), which refuses it whole once a site has
changed owner.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Iterable
from datetime import datetime
from typing import Any

from mqttsvc.config import DEAD_LETTER_KEEP, MAX_TOPIC_BYTES
from mqttsvc.db.leases import Fence
from mqttsvc.records import (
    ConnectionEvent,
    DeadLetter,
    DeviceKey,
    DeviceSeen,
    DeviceStatus,
    Effect,
    Reading,
    SiteDevicesStatus,
    StatusUpdate,
    TopicSeen,
)

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
    # What the device says follows its own newest ts (a row from before
    # reported_at existed counts its receive time); a tie goes to the later
    # batch, which holds the later arrival.
    newer = (
        f"EXCLUDED.reported_at >= COALESCE({table}.reported_at, {table}.last_seen_at, '-infinity')"
    )
    return f"""
INSERT INTO {table} (site_id, {id_columns}, status, first_seen_at, last_seen_at, last_payload,
                     reported_status, heartbeat_interval, reported_at)
SELECT s, {id_columns}, 'online', f, l, p::jsonb, rs, hi, ra
FROM unnest(%s::text[], {id_arrays}, %s::timestamptz[], %s::timestamptz[], %s::text[],
            %s::text[], %s::float8[], %s::timestamptz[])
    AS t(s, {id_columns}, f, l, p, rs, hi, ra)
ON CONFLICT (site_id, {id_columns}) DO UPDATE SET
    first_seen_at = LEAST({table}.first_seen_at, EXCLUDED.first_seen_at),
    last_payload = CASE WHEN {newer} THEN EXCLUDED.last_payload ELSE {table}.last_payload END,
    reported_status = CASE WHEN {newer} THEN COALESCE(EXCLUDED.reported_status,
                                                      {table}.reported_status)
                           ELSE {table}.reported_status END,
    heartbeat_interval = CASE WHEN {newer} THEN COALESCE(EXCLUDED.heartbeat_interval,
                                                         {table}.heartbeat_interval)
                              ELSE {table}.heartbeat_interval END,
    reported_at = CASE WHEN {newer} THEN EXCLUDED.reported_at ELSE {table}.reported_at END,
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


def _update_site_devices(table: str) -> str:
    # Set-based: a site of 300,000 devices is one statement per table
    # (rows already in the status are left alone), not arrays of ids.
    return f"""
UPDATE {table} AS d SET status = u.status, known_status = d.status
FROM unnest(%s::text[], %s::text[]) AS u(site_id, status)
WHERE d.site_id = u.site_id AND d.status <> u.status
"""


_UPDATE_SITE_DEVICES = {kind: _update_site_devices(spec[0]) for kind, spec in DEVICE_TABLES.items()}

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
INSERT INTO dead_letter (site_id, topic, topic_raw, payload, payload_size, payload_sha256, reason,
                         received_at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::bytea[], %s::bigint[], %s::bytea[],
                     %s::text[], %s::timestamptz[])
"""

#: A fenced batch's first statement (migration 0012): it raises SQLSTATE
#: C{MQFNC} unless the instance owns every site at its epoch.
_FENCE = "SELECT mqttsvc_fence(%s, %s::text[], %s::bigint[])"

#: The longest reason kept with a dead letter or an error, in characters.
MAX_REASON = 1000

#: The most of a dead letter's raw topic kept, in bytes (MQTT allows 65,535).
TOPIC_RAW_KEEP = 4 * MAX_TOPIC_BYTES

# The events' last parameter is the writing instance's name, one value for
# every row (migration 0013): the triggers copy it into event_log's data.
_INSERT_DEVICE_EVENTS = """
INSERT INTO device_event (site_id, kind, device_id, gateway_id, at, from_status, to_status, reason,
                          devices, instance)
SELECT *, %s::text FROM unnest(%s::text[], %s::text[], %s::text[], %s::text[], %s::timestamptz[],
                               %s::text[], %s::text[], %s::text[], %s::integer[])
"""

_INSERT_EVENTS = """
INSERT INTO connection_event (site_id, at, from_state, to_state, reason, instance)
SELECT *, %s::text FROM unnest(%s::text[], %s::timestamptz[], %s::text[], %s::text[], %s::text[])
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


def text_array(values: Iterable[str | None]) -> str:
    """
    A PostgreSQL array literal of text values, for a C{%s::text[]}
    parameter: the server's C{array_in} parses one string instead of
    psycopg2 adapting every element (which costs far more).

    Every element is double-quoted, with C{\\} and C{"} escaped by a
    backslash; C{NULL} stands for None.
    """
    items = ["\x00" if v is None else v for v in values]
    if not items:
        return "{}"
    # NUL cannot be in a text value (PostgreSQL refuses it), so it marks None.
    joined = '","'.join(items)
    # Only the separators' quotes, and no backslash: nothing to escape.
    if "\\" in joined or joined.count('"') != 2 * (len(items) - 1):
        joined = '","'.join([v.replace("\\", "\\\\").replace('"', '\\"') for v in items])
    literal = '{"' + joined + '"}'
    if "\x00" in joined:
        literal = literal.replace('"\x00"', "NULL")
    return literal


class TimeFormat:
    """
    Aware datetimes as ISO 8601 (which needs no quoting in an array
    literal), each distinct one formatted once per batch: a message's
    receive time shows in several tables.
    """

    def __init__(self) -> None:
        self._text: dict[datetime, str] = {}

    def array(self, values: Iterable[datetime | None]) -> str:
        text = self._text
        parts = []
        for v in values:
            if v is None:
                parts.append("NULL")
                continue
            iso = text.get(v)
            if iso is None:
                iso = text[v] = v.isoformat()
            parts.append(iso)
        return "{" + ",".join(parts) + "}"


def storable_text(text: str, limit: int) -> str:
    """
    C{text} as PostgreSQL can store it, at most C{limit} characters: NUL
    written as C{\\x00}, bytes that are not UTF-8 (lone surrogates, as
    C{surrogateescape} decoding leaves them) as C{\\xNN} escapes, and a
    longer text cut with an ellipsis.  Text that needs none of it is
    returned as it is.
    """
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            text = raw_text(text).decode("utf-8", "backslashreplace")
    if len(text) > limit:
        text = text[: limit - 1] + "\u2026"
    return text


def raw_text(text: str) -> bytes:
    """
    The bytes a text stands for: as received, for one decoded with
    C{surrogateescape}; any other lone surrogate as its UTF-8 form.
    """
    try:
        return text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return text.encode("utf-8", "surrogatepass")


def dead_letter_row(
    letter: DeadLetter,
) -> tuple[str, str, bytes | None, bytes, int, bytes, str, datetime]:
    """
    A dead letter's C{dead_letter} row, which the database cannot refuse
    for its content: the topic as storable text (with its raw bytes, up to
    L{TOPIC_RAW_KEEP}, when that text is not the topic itself), the payload cut to
    L{DEAD_LETTER_KEEP} bytes with its full size and SHA-256, and the
    reason as storable text.
    """
    topic = storable_text(letter.topic, MAX_TOPIC_BYTES)
    topic_raw = None if topic == letter.topic else raw_text(letter.topic)[:TOPIC_RAW_KEEP]
    payload = bytes(letter.payload)
    size = letter.size if letter.size is not None else len(payload)
    digest = letter.sha256 if letter.sha256 is not None else hashlib.sha256(payload).digest()
    return (
        storable_text(letter.site_id, MAX_TOPIC_BYTES),
        topic,
        topic_raw,
        payload[:DEAD_LETTER_KEEP],
        size,
        digest,
        storable_text(letter.reason, MAX_REASON),
        letter.at,
    )


def _key_columns(keys: Iterable[tuple[str, ...]]) -> list[str]:
    """
    Rows' keys (site and ids) as one text array literal per key column.
    """
    return [text_array(column) for column in zip(*keys, strict=True)]


def number_array(values: Iterable[float | int | None]) -> str:
    """
    An array literal of finite numbers.
    """
    return "{" + ",".join("NULL" if v is None else repr(v) for v in values) + "}"


class _Fold:
    """
    The rows of one batch, kept column by column, with repeated rows (a
    topic, a device) folded into one.
    """

    def __init__(self) -> None:
        self.topics: dict[tuple[str, str], list[Any]] = {}
        self.devices: dict[str, dict[tuple[str, ...], list[Any]]] = {k: {} for k in DEVICE_TABLES}
        self.statuses: dict[str, dict[tuple[str, ...], str]] = {k: {} for k in DEVICE_TABLES}
        #: Site-wide changes (the latest per site), written before the
        #: per-device ones, which came after them.
        self.site_statuses: dict[str, str] = {}
        self.device_events: list[tuple[Any, ...]] = []
        # sensor_reading's columns.
        self.r_site: list[str] = []
        self.r_sensor: list[str] = []
        self.r_ts: list[datetime] = []
        self.r_name: list[str] = []
        self.r_value: list[float] = []
        self.r_unit: list[str | None] = []
        self.r_received: list[datetime] = []
        self.dead: list[DeadLetter] = []

    def add(self, effect: Effect) -> None:
        kind = type(effect)
        if kind is Reading:
            assert isinstance(effect, Reading)
            self.r_site.append(effect.site_id)
            self.r_sensor.append(effect.sensor_id)
            self.r_ts.append(effect.ts)
            self.r_name.append(effect.name)
            self.r_value.append(effect.value)
            self.r_unit.append(effect.unit)
            self.r_received.append(effect.received_at)
        elif kind is TopicSeen:
            assert isinstance(effect, TopicSeen)
            at = effect.at
            seen = self.topics.get((effect.site_id, effect.topic))
            if seen is None:
                self.topics[(effect.site_id, effect.topic)] = [at, at, 1]
            else:
                if at < seen[0]:
                    seen[0] = at
                if at > seen[1]:
                    seen[1] = at
                seen[2] += 1
        elif kind is DeviceSeen:
            assert isinstance(effect, DeviceSeen)
            if effect.gateway_id is not None and effect.kind == "datalogger":
                key: tuple[str, ...] = (effect.site_id, effect.gateway_id, effect.device_id)
            else:
                key = (effect.site_id, effect.device_id)
            rows = self.devices[effect.kind]
            row = rows.get(key)
            at = effect.at
            ts = effect.ts or at
            if row is None:
                rows[key] = [at, at, effect.payload, effect.reported_status, effect.interval, ts]
            else:
                if at < row[0]:
                    row[0] = at
                if at > row[1]:
                    row[1] = at
                if ts >= row[5]:
                    # The device's own newest ts wins (a tie: the later
                    # arrival).  A heartbeat that does not repeat its status
                    # or interval leaves the last known ones, as the upsert
                    # does.
                    row[2:] = [
                        effect.payload,
                        effect.reported_status or row[3],
                        effect.interval or row[4],
                        ts,
                    ]
        elif kind is DeviceStatus:
            assert isinstance(effect, DeviceStatus)
            device = effect.key
            # Effects arrive in the order they happened: the last one wins.
            self.statuses[device.kind][(device.site_id, *device_ids(device))] = effect.status
            if effect.recorded:
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
                        None,
                    )
                )
        elif kind is SiteDevicesStatus:
            assert isinstance(effect, SiteDevicesStatus)
            site_id = effect.site_id
            # It overrides the site's per-device changes before it.
            for changes in self.statuses.values():
                for ids in [ids for ids in changes if ids[0] == site_id]:
                    del changes[ids]
            self.site_statuses[site_id] = effect.status
            self.device_events.append(
                (
                    site_id,
                    "site",
                    None,
                    None,
                    effect.at,
                    None,
                    effect.status,
                    effect.reason,
                    effect.devices,
                )
            )
        else:
            assert isinstance(effect, DeadLetter)
            self.dead.append(effect)


def _storable_reason(reason: str | None) -> str | None:
    return None if reason is None else storable_text(reason, MAX_REASON)


def _columns(rows: list[tuple[Any, ...]]) -> list[list[Any]]:
    return [list(column) for column in zip(*rows, strict=True)]


def batch_statements(
    effects: Iterable[Effect],
    statuses: Iterable[StatusUpdate] = (),
    events: Iterable[ConnectionEvent] = (),
    *,
    fence: Fence | None = None,
    instance: str | None = None,
) -> tuple[str, list[Any]] | None:
    """
    Everything a batch writes, as one SQL text of several statements (one
    per table, in an order that lets later ones see earlier rows) and its
    parameters; None when there is nothing to write.

    Every connection and device event is written with C{instance}, the
    name of the instance that produced it (C{--instance}), which its
    C{event_log} event then carries in its data; None writes it null.

    Sent as one query, the statements are one round trip and, without an
    explicit C{BEGIN}, one implicit transaction: all of them are committed,
    or none.

    With a C{fence}, the first statement is C{mqttsvc_fence}: it raises
    (L{mqttsvc.db.leases.fenced_sites} names the stale sites) unless the
    fence's instance still owns each of its sites at its epoch, and holds
    those leases (C{FOR SHARE}) until the batch commits, so that none
    changes owner meanwhile.  Nothing to write is still None: there is
    nothing to fence.
    """
    fold = _Fold()
    add = fold.add
    for effect in effects:
        add(effect)
    times = TimeFormat().array
    sql: list[str] = []
    params: list[Any] = []

    def statement(text: str, *columns: Any) -> None:
        sql.append(text)
        params.extend(columns)

    if fold.topics:
        seen = fold.topics.values()
        statement(
            _UPSERT_TOPICS,
            *_key_columns(fold.topics),
            times(v[0] for v in seen),
            times(v[1] for v in seen),
            number_array(v[2] for v in seen),
        )
    for kind, devices in fold.devices.items():
        if devices:
            rows = devices.values()
            statement(
                _UPSERT_DEVICES[kind],
                *_key_columns(devices),
                times(r[0] for r in rows),
                times(r[1] for r in rows),
                text_array(r[2] for r in rows),
                text_array(r[3] for r in rows),
                number_array(r[4] for r in rows),
                times(r[5] for r in rows),
            )
    # After the upserts, so that a device first seen in this batch exists;
    # site-wide changes first, since the per-device ones left are later.
    if fold.site_statuses:
        sites = text_array(fold.site_statuses)
        to_status = text_array(fold.site_statuses.values())
        for kind in DEVICE_TABLES:
            statement(_UPDATE_SITE_DEVICES[kind], sites, to_status)
    for kind, changes in fold.statuses.items():
        if changes:
            statement(
                _UPDATE_DEVICE_STATUS[kind],
                *_key_columns(changes),
                text_array(changes.values()),
            )
    if fold.device_events:
        s, k, d, g, at, fr, to, why, n = _columns(fold.device_events)
        statement(
            _INSERT_DEVICE_EVENTS,
            instance,
            text_array(s),
            text_array(k),
            text_array(d),
            text_array(g),
            times(at),
            text_array(fr),
            text_array(to),
            text_array(why),
            number_array(n),
        )
    if fold.r_site:
        statement(
            _INSERT_READINGS,
            text_array(fold.r_site),
            text_array(fold.r_sensor),
            times(fold.r_ts),
            text_array(fold.r_name),
            number_array(fold.r_value),
            text_array(fold.r_unit),
            times(fold.r_received),
        )
    if fold.dead:
        site, topic, topic_raw, payload, size, digest, reason, at = _columns(
            [dead_letter_row(d) for d in fold.dead]
        )
        statement(
            _INSERT_DEAD_LETTERS,
            text_array(site),
            text_array(topic),
            # bytea[] stays a list: rare, and binary.
            topic_raw,
            payload,
            number_array(size),
            digest,
            text_array(reason),
            times(at),
        )
    events = list(events)
    if events:
        statement(
            _INSERT_EVENTS,
            instance,
            text_array(e.site_id for e in events),
            times(e.at for e in events),
            text_array(e.from_state for e in events),
            text_array(e.to_state for e in events),
            # Reasons and errors may quote a broker or a socket: any text.
            text_array(_storable_reason(e.reason) for e in events),
        )
    latest = list({s.site_id: s for s in statuses}.values())
    if latest:
        statement(
            _UPDATE_STATUS,
            text_array(s.site_id for s in latest),
            text_array(s.status for s in latest),
            times(s.last_connected_at for s in latest),
            number_array(s.retry_count for s in latest),
            times(s.next_retry for s in latest),
            text_array(_storable_reason(s.last_error) for s in latest),
        )
    if not sql:
        return None
    if fence is not None:
        sql.insert(0, _FENCE)
        params[:0] = [fence.instance, text_array(fence.sites), number_array(fence.epochs)]
    return ";\n".join(sql), params


#: What sends one query: a pool's C{operation} (its own implicit
#: transaction) or a cursor's C{execute} (inside the caller's transaction).
Executes = Callable[[str, Any], Awaitable[object]]


async def write_effects(
    execute: Executes,
    effects: Iterable[Effect],
    statuses: Iterable[StatusUpdate] = (),
    events: Iterable[ConnectionEvent] = (),
    *,
    fence: Fence | None = None,
    instance: str | None = None,
) -> None:
    """
    Write effects, site statuses and connection events with one statement
    per table, sent as one query through C{execute} (see L{Executes});
    nothing when there is nothing to write.  With a C{fence}, all of it
    or nothing is written under it; the events are C{instance}'s (see
    L{batch_statements}).
    """
    script = batch_statements(effects, statuses, events, fence=fence, instance=instance)
    if script is not None:
        await execute(*script)
