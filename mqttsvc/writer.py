"""
The batched writer: many messages' effects per statement and transaction.

Messages are queued with their effects.  A batch is written when
C{batch_size} messages are waiting or the oldest has waited C{batch_delay}
seconds, whichever comes first (group commit), in one transaction with one
statement per table, sent as one query: one round trip per batch.  After the
commit each message's owner (its site) hears once per batch which of its
messages are committed, so that their MQTT acknowledgements go out only
then.  One batch is written at a
time, which keeps each site's writes in order; the next one gathers
meanwhile.

When more than C{high_water} messages wait (the database is slow or down),
the writer asks for back-pressure: the sites stop reading from their
brokers until the queue is back under C{low_water}, so memory stays bounded
and the brokers keep the rest.

Connection failures keep the batch and retry it with backoff.  A batch the
database rejects for its data is split: each message is retried on its own
and one that still fails becomes a dead letter with the database's reason.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mqttsvc.batch import ConnectionEvent, StatusUpdate, batch_statements
from mqttsvc.pool import ConnectionPool, is_rejection
from mqttsvc.processing import DeadLetter, DeviceStatus, Effect, TopicSeen


class CommitListener(Protocol):
    """
    Who hears that queued messages are committed (a site, which then
    acknowledges them to its broker).
    """

    def committed(self, messages: list[Any]) -> None:
        """
        These messages' effects are committed, in the order they were
        queued.
        """


class _FireDeferreds:
    """
    The listener behind L{BatchWriter.submit}: its messages are Deferreds.
    """

    def committed(self, messages: list[Any]) -> None:
        for d in messages:
            d.callback(None)


_FIRE = _FireDeferreds()

#: A queued message: its effects, its listener, what the listener is told
#: of, and when it was queued.
_Pending = tuple[list[Effect], CommitListener, Any, float]


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

    async def write(self, pool: ConnectionPool) -> None:
        await write_batch(pool, (), self.statuses.values(), self.events)


class BatchWriter:
    """
    Queues effects and status updates and writes them in batches.

    @param clock: schedules flushes and retries.
    @param pool: the connection pool to write through (one connection is
        enough: only one batch is written at a time, which also keeps the
        writes of one site in order).
    @param batch_size: write as soon as this many messages wait; also the
        most written in one transaction.
    @param batch_delay: write at the latest this many seconds after the
        oldest waiting message arrived.
    @param on_pressure: called with True when the queue passes
        C{high_water}, and with False once it is back under C{low_water}.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        pool: ConnectionPool,
        batch_size: int = 1000,
        batch_delay: float = 0.01,
        max_retry_delay: float = 2.0,
        high_water: int | None = None,
        low_water: int | None = None,
        on_pressure: Callable[[bool], None] | None = None,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self._batch_size = batch_size
        self._batch_delay = batch_delay
        self._max_retry_delay = max_retry_delay
        self._high_water = high_water if high_water is not None else 20 * batch_size
        self._low_water = low_water if low_water is not None else 2 * batch_size
        self.on_pressure = on_pressure
        #: Called with each committed batch's size and write time.
        self.observe: Callable[[int, float], None] | None = None
        self.pressing = False
        self._retrying = False
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
        self.queue(effects, _FIRE, done)
        return done

    def queue(self, effects: list[Effect], listener: CommitListener, message: Any) -> None:
        """
        Queue one message's effects; once they are committed,
        C{listener.committed} hears of C{message} (with the batch's other
        messages of the same listener).  Nothing is dropped: a batch is
        retried until it is committed.
        """
        queue = self._queue
        queue.append((effects, listener, message, self._clock.seconds()))
        if len(queue) >= self._high_water and not self.pressing:
            self._press(True)
        if not self._flushing and (self._scheduled is None or len(queue) >= self._batch_size):
            self._kick()

    def _press(self, pressing: bool) -> None:
        self.pressing = pressing
        self.log.warn(
            "{action} reading from the brokers: {count} messages wait to be written",
            action="pausing" if pressing else "resuming",
            count=len(self._queue),
        )
        if self.on_pressure is not None:
            self.on_pressure(pressing)

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

    def _kick(self, retry_in: float | None = None) -> None:
        """
        Decide when the next batch is written.
        """
        if self._flushing:
            return
        if not self._queue and not self._records:
            waiters, self._idle_waiters = self._idle_waiters, []
            for w in waiters:
                w.callback(None)
            return
        if retry_in is not None:
            self._retrying = True
            self._schedule(retry_in)
        elif self._retrying:
            return  # the retry is already scheduled
        elif len(self._queue) >= self._batch_size:
            self._schedule(0)
        elif self._scheduled is None:
            oldest = self._queue[0][3] if self._queue else self._clock.seconds()
            self._schedule(max(0.0, oldest + self._batch_delay - self._clock.seconds()))

    def _schedule(self, delay: float) -> None:
        if self._scheduled is not None and self._scheduled.active():
            if self._scheduled.getTime() <= self._clock.seconds() + delay:
                return
            self._scheduled.cancel()
        self._scheduled = self._clock.callLater(delay, self._flush)

    def _flush(self) -> None:
        self._scheduled = None
        self._retrying = False
        self._flushing = True
        batch = [self._queue.popleft() for _ in range(min(self._batch_size, len(self._queue)))]
        records, self._records = self._records, _SiteRecords()
        d = Deferred.fromCoroutine(self._write(batch, records))
        d.addErrback(lambda f: self.log.failure("batch writer crashed", f))

    async def _write(self, batch: list[_Pending], records: _SiteRecords) -> None:
        delay: float | None = None
        started = self._clock.seconds()
        try:
            await write_batch(
                self._pool,
                (e for p in batch for e in p[0]),
                records.statuses.values(),
                records.events,
            )
        except Exception as e:
            if is_rejection(e):
                self.log.warn(
                    "database rejected a batch of {count} messages, writing them one by one: "
                    "{error}",
                    count=len(batch),
                    error=str(e).strip(),
                )
                delay = await self._write_one_by_one(batch, records)
            else:
                delay = self._retry_later(batch, records, e)
        else:
            self._failures = 0
            self.batches_written += 1
            self.messages_written += len(batch)
            if self.observe is not None and batch:
                self.observe(len(batch), self._clock.seconds() - started)
            self._tell(batch)
        finally:
            self._flushing = False
            if self.pressing and len(self._queue) <= self._low_water:
                self._press(False)
            self._kick(delay)

    def _tell(self, batch: list[_Pending]) -> None:
        """
        Tell each listener, once, which of its messages are committed.
        """
        by_listener: dict[CommitListener, list[Any]] = {}
        for _, listener, message, _ in batch:
            messages = by_listener.get(listener)
            if messages is None:
                by_listener[listener] = [message]
            else:
                messages.append(message)
        for listener, messages in by_listener.items():
            try:
                listener.committed(messages)
            except Exception:
                self.log.failure("a commit listener failed", listener=listener)

    def _retry_later(self, batch: list[_Pending], records: _SiteRecords, error: Exception) -> float:
        """
        Keep what could not be written (the database is unreachable, or
        failed in a way that retrying can mend) and say when to try again.
        Nothing is acknowledged meanwhile, and nothing is dropped.
        """
        self._queue.extendleft(reversed(batch))
        self._records.put_back(records)
        self._failures += 1
        delay = min(0.5 * 2 ** (self._failures - 1), self._max_retry_delay)
        self.log.warn(
            "database write failed, keeping {count} messages and retrying in {delay}s: {error}",
            count=len(self._queue),
            delay=delay,
            error=str(error).strip() or type(error).__name__,
        )
        return delay

    async def _write_one_by_one(self, batch: list[_Pending], records: _SiteRecords) -> float | None:
        """
        Write a rejected batch message by message; a message the database
        refuses becomes a dead letter with its reason.

        @return: the delay before a retry, if the database failed otherwise.
        """
        for i, p in enumerate(batch):
            try:
                await self._write_alone(p[0])
            except Exception as e:
                if not is_rejection(e):
                    return self._retry_later(batch[i:], records, e)
                reason = f"database rejected the message: {str(e).strip().splitlines()[0]}"
                try:
                    await self._write_alone(_rejected(p[0], reason))
                except Exception as e2:
                    return self._retry_later(batch[i:], records, e2)
            self.messages_written += 1
            self._tell([p])
        if records:
            try:
                await records.write(self._pool)
            except Exception as e:
                if not is_rejection(e):
                    return self._retry_later([], records, e)
                self.log.error(
                    "the database refused site statuses and events, dropped: {error}",
                    error=str(e).strip(),
                )
        self._failures = 0
        return None

    async def _write_alone(self, effects: list[Effect]) -> None:
        await write_batch(self._pool, effects)


async def write_batch(
    pool: ConnectionPool,
    effects: Iterable[Effect],
    statuses: Iterable[StatusUpdate] = (),
    events: Iterable[ConnectionEvent] = (),
) -> None:
    """
    Write one batch as one query (one round trip, one implicit
    transaction); nothing when there is nothing to write.
    """
    script = batch_statements(effects, statuses, events)
    if script is not None:
        await pool.operation(*script)


def _rejected(effects: list[Effect], reason: str) -> list[Effect]:
    """
    What to write instead of a message whose effects the database refused:
    its topic sighting and a dead letter with the raw payload and the
    database's reason.
    """
    seen = next((e for e in effects if isinstance(e, TopicSeen)), None)
    if seen is None:
        return []
    return [seen, DeadLetter(seen.site_id, seen.topic, seen.payload, reason, seen.at)]


def _site_of(effect: Effect) -> str:
    if isinstance(effect, DeviceStatus):
        return effect.key.site_id
    return effect.site_id


class WriterLanes:
    """
    Several L{BatchWriter}s, each writing through a database connection of
    its own, side by side; every site's writes go to one lane, chosen by a
    stable hash of its id.

    A site's batches stay in order (they are all in its lane), and lanes
    never touch the same rows: every table is keyed by site.  So while one
    lane's batch is on the server the next lane's can be too, which
    shortens the wait for a commit and uses a second core of the database
    server.

    It offers what L{BatchWriter} offers, over all lanes.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        pool: ConnectionPool,
        lanes: int = 2,
        **options: Any,
    ) -> None:
        self._pressing_lanes: set[int] = set()
        self.on_pressure: Callable[[bool], None] | None = None
        self._lanes = [
            BatchWriter(clock, pool, on_pressure=partial(self._lane_pressure, i), **options)
            for i in range(lanes)
        ]
        self._by_site: dict[str, BatchWriter] = {}

    def lane(self, site_id: str) -> BatchWriter:
        """
        The lane that writes a site's effects.
        """
        lane = self._by_site.get(site_id)
        if lane is None:
            index = zlib.crc32(site_id.encode("utf-8")) % len(self._lanes)
            lane = self._by_site[site_id] = self._lanes[index]
        return lane

    def _lane_pressure(self, index: int, pressing: bool) -> None:
        was = bool(self._pressing_lanes)
        if pressing:
            self._pressing_lanes.add(index)
        else:
            self._pressing_lanes.discard(index)
        now = bool(self._pressing_lanes)
        if now != was and self.on_pressure is not None:
            self.on_pressure(now)

    def queue(self, effects: list[Effect], listener: CommitListener, message: Any) -> None:
        """
        See L{BatchWriter.queue}; the effects are one message's, of one site.
        """
        self.lane(_site_of(effects[0])).queue(effects, listener, message)

    def submit(self, effects: list[Effect]) -> Deferred[None]:
        """
        Queue effects of any sites, each in its site's lane.

        @return: fires once all of them are committed.
        """
        by_lane: dict[BatchWriter, list[Effect]] = {}
        for effect in effects:
            by_lane.setdefault(self.lane(_site_of(effect)), []).append(effect)
        return _all([lane.submit(part) for lane, part in by_lane.items()])

    def set_status(self, update: StatusUpdate, event: ConnectionEvent | None = None) -> None:
        self.lane(update.site_id).set_status(update, event)

    def whenIdle(self) -> Deferred[None]:
        return _all([lane.whenIdle() for lane in self._lanes])

    def stop(self) -> None:
        for lane in self._lanes:
            lane.stop()

    @property
    def lanes(self) -> list[BatchWriter]:
        return list(self._lanes)

    @property
    def pressing(self) -> bool:
        return bool(self._pressing_lanes)

    @property
    def queued(self) -> int:
        return sum(lane.queued for lane in self._lanes)

    @property
    def batches_written(self) -> int:
        return sum(lane.batches_written for lane in self._lanes)

    @property
    def messages_written(self) -> int:
        return sum(lane.messages_written for lane in self._lanes)

    @property
    def observe(self) -> Callable[[int, float], None] | None:
        return self._lanes[0].observe

    @observe.setter
    def observe(self, observe: Callable[[int, float], None] | None) -> None:
        for lane in self._lanes:
            lane.observe = observe


def _all(deferreds: list[Deferred[None]]) -> Deferred[None]:
    """
    Fire (with None) once every one of C{deferreds} has.
    """
    gathered = gatherResults(deferreds, consumeErrors=True)
    return gathered.addCallback(lambda _: None)
