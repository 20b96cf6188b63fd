"""
The batched writer: many messages' effects per statement and transaction.

Messages are queued with their effects; whenever the writer is idle it
takes everything queued (up to a batch size) and writes it in one
transaction, one statement per table, then fires each message's Deferred so
that its MQTT acknowledgement goes out only after the commit.  While one
batch is being written the next one gathers, so the batch size follows the
load by itself (group commit).

Connection failures keep the batch and retry it with backoff.  A batch the
database rejects for its data is split: each message is retried on its own
and one that still fails becomes a dead letter with the database's reason.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from datetime import datetime
from functools import partial
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mqttsvc.pool import ConnectionPool, is_connection_error
from mqttsvc.processing import DeadLetter, Effect, GatewaySeen, TopicSeen


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


_UPSERT_TOPICS = """
INSERT INTO discovered_topic (site_id, topic_path, first_seen_at, last_seen_at, message_count)
SELECT * FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::bigint[])
ON CONFLICT (site_id, topic_path) DO UPDATE SET
    first_seen_at = LEAST(discovered_topic.first_seen_at, EXCLUDED.first_seen_at),
    last_seen_at = GREATEST(discovered_topic.last_seen_at, EXCLUDED.last_seen_at),
    message_count = discovered_topic.message_count + EXCLUDED.message_count
"""

_UPSERT_GATEWAYS = """
INSERT INTO gateway (site_id, gateway_id, status, first_seen_at, last_seen_at, last_payload)
SELECT s, g, 'online', f, l, p::jsonb
FROM unnest(%s::text[], %s::text[], %s::timestamptz[], %s::timestamptz[], %s::text[])
    AS t(s, g, f, l, p)
ON CONFLICT (site_id, gateway_id) DO UPDATE SET
    status = 'online',
    last_payload = CASE WHEN EXCLUDED.last_seen_at >= gateway.last_seen_at
                        THEN EXCLUDED.last_payload ELSE gateway.last_payload END,
    last_seen_at = GREATEST(gateway.last_seen_at, EXCLUDED.last_seen_at)
"""

_INSERT_DEAD_LETTERS = """
INSERT INTO dead_letter (site_id, topic, payload, reason, received_at)
SELECT * FROM unnest(%s::text[], %s::text[], %s::bytea[], %s::text[], %s::timestamptz[])
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


async def _write_rows(cursor: Any, statement: str, rows: list[tuple[Any, ...]]) -> None:
    """
    Run one statement over many rows: the rows are passed column by column,
    as the arrays that the statement's C{unnest} turns back into rows.
    """
    if rows:
        await cursor.execute(statement, [list(column) for column in zip(*rows, strict=True)])


def _as_row(value: Any) -> tuple[Any, ...]:
    row: tuple[Any, ...] = attrs.astuple(value, recurse=False)
    return row


async def write_effects(
    cursor: Any,
    effects: Iterable[Effect],
    statuses: Iterable[StatusUpdate] = (),
    events: list[ConnectionEvent] | None = None,
) -> None:
    """
    Write effects, status updates and connection events with one statement
    per table.

    Effects on the same row are folded first: one row may appear only once
    in an C{INSERT ... ON CONFLICT DO UPDATE}.
    """
    topics: dict[tuple[str, str], list[Any]] = {}
    gateways: dict[tuple[str, str], list[Any]] = {}
    dead: list[tuple[Any, ...]] = []
    for effect in effects:
        if isinstance(effect, TopicSeen):
            key = (effect.site_id, effect.topic)
            seen = topics.get(key)
            if seen is None:
                topics[key] = [effect.at, effect.at, 1]
            else:
                seen[0] = min(seen[0], effect.at)
                seen[1] = max(seen[1], effect.at)
                seen[2] += 1
        elif isinstance(effect, GatewaySeen):
            key = (effect.site_id, effect.gateway_id)
            gw = gateways.get(key)
            if gw is None:
                gateways[key] = [effect.at, effect.at, effect.payload]
            else:
                gw[0] = min(gw[0], effect.at)
                if effect.at >= gw[1]:
                    gw[1], gw[2] = effect.at, effect.payload
        else:
            dead.append(_as_row(effect))
    await _write_rows(cursor, _UPSERT_TOPICS, [(*k, *v) for k, v in topics.items()])
    await _write_rows(cursor, _UPSERT_GATEWAYS, [(*k, *v) for k, v in gateways.items()])
    await _write_rows(cursor, _INSERT_DEAD_LETTERS, dead)
    await _write_rows(cursor, _INSERT_EVENTS, [_as_row(e) for e in events or ()])
    latest = {s.site_id: s for s in statuses}
    await _write_rows(cursor, _UPDATE_STATUS, [_as_row(s) for s in latest.values()])


@attrs.define
class _Pending:
    effects: list[Effect]
    done: Deferred[None]


@attrs.define
class _SiteRecords:
    """
    Connection statuses (only the latest per site counts) and events (all
    of them, in order) waiting to be written.
    """

    statuses: dict[str, StatusUpdate] = attrs.Factory(dict)
    events: list[ConnectionEvent] = attrs.Factory(list)

    def __bool__(self) -> bool:
        return bool(self.statuses or self.events)

    def put_back(self, older: _SiteRecords) -> None:
        for site_id, update in older.statuses.items():
            self.statuses.setdefault(site_id, update)
        self.events[:0] = older.events

    async def write(self, cursor: Any) -> None:
        await write_effects(cursor, (), self.statuses.values(), self.events)


class BatchWriter:
    """
    Queues effects and status updates and writes them in batches.

    @param clock: schedules flushes and retries.
    @param pool: the connection pool to write through (one connection is
        enough: only one batch is written at a time, which also keeps the
        writes of one site in order).
    @param max_batch: the most messages written in one transaction.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        pool: ConnectionPool,
        max_batch: int = 2000,
        max_retry_delay: float = 10.0,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self._max_batch = max_batch
        self._max_retry_delay = max_retry_delay
        self._queue: deque[_Pending] = deque()
        self._records = _SiteRecords()
        self._flushing = False
        self._scheduled: IDelayedCall | None = None
        self._failures = 0
        self._idle_waiters: list[Deferred[None]] = []
        self.batches_written = 0
        self.messages_written = 0

    @property
    def queued(self) -> int:
        """
        Messages waiting to be written (not counting a batch in flight).
        """
        return len(self._queue)

    def submit(self, effects: list[Effect]) -> Deferred[None]:
        """
        Queue one message's effects.

        @return: fires once they are committed.
        """
        done: Deferred[None] = Deferred()
        self._queue.append(_Pending(effects, done))
        self._kick()
        return done

    def set_status(self, update: StatusUpdate, event: ConnectionEvent | None = None) -> None:
        """
        Queue a site's connection status (only the latest one per site is
        written) and the event that led to it (every one is written).
        """
        self._records.statuses[update.site_id] = update
        if event is not None:
            self._records.events.append(event)
        self._kick()

    def whenIdle(self) -> Deferred[None]:
        """
        Fire when everything queued so far has been written.
        """
        if not self._flushing and not self._queue and not self._records:
            d: Deferred[None] = Deferred()
            d.callback(None)
            return d
        waiter: Deferred[None] = Deferred()
        self._idle_waiters.append(waiter)
        return waiter

    def stop(self) -> None:
        """
        Cancel a pending flush or retry (nothing more will be written).
        """
        if self._scheduled is not None and self._scheduled.active():
            self._scheduled.cancel()
        self._scheduled = None

    def _kick(self, delay: float = 0) -> None:
        if self._flushing or self._scheduled is not None:
            return
        if not self._queue and not self._records:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)
            return
        self._scheduled = self._clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        self._flushing = True
        batch = [self._queue.popleft() for _ in range(min(self._max_batch, len(self._queue)))]
        records, self._records = self._records, _SiteRecords()
        d = Deferred.fromCoroutine(self._write(batch, records))
        d.addErrback(lambda f: self.log.failure("batch writer crashed", f))

    async def _write(self, batch: list[_Pending], records: _SiteRecords) -> None:
        delay = 0.0
        try:
            await self._pool.transaction(
                lambda cursor: write_effects(
                    cursor,
                    (e for p in batch for e in p.effects),
                    records.statuses.values(),
                    records.events,
                )
            )
        except Exception as e:
            if is_connection_error(e):
                self._requeue(batch, records)
                self._failures += 1
                delay = min(0.5 * 2 ** (self._failures - 1), self._max_retry_delay)
                self.log.warn(
                    "database unavailable, keeping {count} messages and retrying in "
                    "{delay}s: {error}",
                    count=len(batch),
                    delay=delay,
                    error=str(e).strip(),
                )
            else:
                self.log.warn(
                    "database rejected a batch of {count} messages, writing them one by one: "
                    "{error}",
                    count=len(batch),
                    error=str(e).strip(),
                )
                await self._write_one_by_one(batch, records)
        else:
            self._failures = 0
            self.batches_written += 1
            self.messages_written += len(batch)
            for p in batch:
                p.done.callback(None)
        finally:
            self._flushing = False
            self._kick(delay)

    def _requeue(self, batch: list[_Pending], records: _SiteRecords) -> None:
        self._queue.extendleft(reversed(batch))
        self._records.put_back(records)

    async def _write_one_by_one(self, batch: list[_Pending], records: _SiteRecords) -> None:
        for p in batch:
            try:
                await self._pool.transaction(partial(write_effects, effects=p.effects))
            except Exception as e:
                if is_connection_error(e):
                    p.done.errback(e)
                    continue
                reason = f"database rejected the message: {str(e).strip().splitlines()[0]}"
                try:
                    await self._pool.transaction(
                        partial(write_effects, effects=_rejected(p.effects, reason))
                    )
                except Exception as e2:
                    p.done.errback(e2)
                    continue
            self.messages_written += 1
            p.done.callback(None)
        if records:
            try:
                await self._pool.transaction(records.write)
            except Exception as e:
                if is_connection_error(e):
                    self._requeue([], records)
                else:
                    self.log.error(
                        "the database refused site statuses and events, dropped: {error}",
                        error=str(e).strip(),
                    )


def _rejected(effects: list[Effect], reason: str) -> list[Effect]:
    """
    What to write instead of a message whose effects the database refused:
    its topic sighting and a dead letter with the database's reason.
    """
    topics: list[Effect] = [e for e in effects if isinstance(e, TopicSeen)]
    if not topics:
        return []
    seen = topics[0]
    assert isinstance(seen, TopicSeen)
    payload = next(
        (
            e.payload if isinstance(e, DeadLetter) else e.payload.encode()
            for e in effects
            if isinstance(e, DeadLetter | GatewaySeen)
        ),
        b"",
    )
    return [*topics, DeadLetter(seen.site_id, seen.topic, payload, reason, seen.at)]
