"""
The batched writer: many messages' effects per statement and transaction.

Messages are queued with their effects.  A batch is written when
C{batch_size} messages (or C{batch_bytes} of them) are waiting or the oldest
has waited C{batch_delay} seconds, whichever comes first (group commit), in
one transaction with one statement per table, sent as one query: one round
trip per batch.  After the commit each message's owner (its site) hears once
per batch which of its messages are committed, so that their MQTT
acknowledgements go out only then.  A L{BatchWriter} (one lane) writes one
batch at a time, which keeps each site's writes in order; the next one
gathers meanwhile.  L{WriterLanes} runs several lanes side by side, each on
a connection of its own, and sends every site's writes to one of them.

Memory is bounded in messages and in bytes.  When more than C{high_water}
messages or C{high_bytes} wait (the database is slow or down), the writer
asks for back-pressure: the sites stop reading from their brokers until the
queue is back under C{low_water} and C{low_bytes}, so the brokers keep the
rest.  A single site holding more than C{site_bytes}, or more than its
share of the messages (C{site_messages}, a tenth of C{high_water}: two
batches by default), is told to stop reading on its own, before it can
fill the lane for every other site: a site flooding the lane with new
devices pauses alone, and the quiet sites of its lane read on, waiting
behind at most its two batches.  Measured (C{python -m bench fairness
--size quick}): beside a flood of 30,000 new device ids, a quiet site's
messages committed in 118 ms (p50) and 207 ms (p99) with this share, 742
and 1,009 ms with half of C{high_water}; the flood drained as fast.

Connection failures keep the batch and retry it with backoff; how long a
lane has failed to commit is visible (L{BatchWriter.failing_for}).  A batch
the database rejects for its data is bisected until the messages that
caused it stand alone; those become dead letters with the database's
reason, and everything else commits.  A dead letter is written so that the
database cannot refuse it (L{mqttsvc.db.batch.dead_letter_row}).

In a cluster every write carries the fence of the sites it writes (see
L{mqttsvc.db.leases.Fence}).  A write the fence refuses (another instance
owns some of its sites now) is neither a rejection of its data nor an
outage: the stale sites' messages, statuses and events are dropped without
being acknowledged (the broker redelivers them to the real owner), their
owner is told (C{on_fenced}), and the rest is written at once.
"""

from __future__ import annotations

import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Iterable
from functools import partial
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from mqttsvc.db.batch import write_effects
from mqttsvc.db.leases import Fence, fenced_sites
from mqttsvc.db.pool import is_rejection
from mqttsvc.db.store import WRITE_CONNECTIONS
from mqttsvc.records import (
    ConnectionEvent,
    DeadLetter,
    DeviceSeen,
    DeviceStatus,
    Effect,
    SiteDevicesStatus,
    StatusUpdate,
    TopicSeen,
)

#: A batch is written once this many messages wait, or once the oldest has
#: waited this many seconds (the defaults of --batch-size and
#: --batch-delay-ms).
BATCH_SIZE = 1000
BATCH_DELAY = 0.01

#: The most bytes of messages written in one batch (their payloads and
#: topics, plus L{MESSAGE_OVERHEAD} each): every statement stays far below
#: PostgreSQL's 1 GB message limit whatever the messages hold.
DEFAULT_BATCH_BYTES = 8 * 1024 * 1024

#: Bytes a lane may hold before every site pauses reading (back-pressure).
DEFAULT_HIGH_BYTES = 64 * 1024 * 1024

#: Bytes one site may hold in a lane before that site alone pauses reading.
DEFAULT_SITE_BYTES = 16 * 1024 * 1024

#: Seconds a lane may fail to commit before it is reported as stalled: in
#: C{/readyz}, in the sites' C{last_error}, in the metrics and as a
#: C{service} event.  Writes are retried at most 2 s apart, so this is a
#: few failed attempts in a row, not one slow batch.
STALLED_AFTER = 10.0

#: What each effect of a queued message costs beyond the message's payload
#: and topic: its objects and its share of the statement, roughly.
MESSAGE_OVERHEAD = 256


class WritePool(Protocol):
    """
    What the writer needs of its connection pool
    (L{mqttsvc.db.pool.ConnectionPool}): to send one query, which is one
    implicit transaction.
    """

    def operation(self, sql: str, params: Any = None) -> Awaitable[object]: ...


class CommitListener(Protocol):
    """
    Who hears that queued messages are committed (a site, which then
    acknowledges them to its broker).
    """

    def committed(self, messages: list[Any]) -> None:
        """
        These messages' effects are committed (or dead-lettered), in the
        order they were queued.
        """

    def hold(self, holding: bool) -> None:
        """
        With True: this listener has more bytes waiting than its share;
        send no more until called with False.
        """


class _FireDeferreds:
    """
    The listener behind L{BatchWriter.submit}: its messages are Deferreds.
    """

    def committed(self, messages: list[Any]) -> None:
        for d in messages:
            d.callback(None)

    def hold(self, holding: bool) -> None:
        pass  # submitted effects are the service's own, a few at a time


_FIRE = _FireDeferreds()


class Fenced(Exception):
    """
    Writes of these sites were refused by their fence: another instance
    owns them now.  The failure of a L{BatchWriter.submit} whose effects
    were all of such sites.
    """

    def __init__(self, sites: list[str]) -> None:
        super().__init__(f"sites owned by another instance now: {', '.join(sites)}")
        self.sites = sites


#: A queued message: its effects, its listener, what the listener is told
#: of, when it was queued, and what it costs in bytes.
_Pending = tuple[list[Effect], CommitListener, Any, float, int]


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

    def drop(self, sites: Collection[str]) -> None:
        """
        Forget the statuses and events of C{sites}.
        """
        for site_id in [s for s in self.statuses if s in sites]:
            del self.statuses[site_id]
        self.events[:] = [e for e in self.events if e.site_id not in sites]


class _Retry(Exception):
    """
    A write failed for a reason other than its data: keep what is left and
    retry later.
    """

    def __init__(self, left: list[_Pending], error: Exception) -> None:
        self.left = left
        self.error = error


class BatchWriter:
    """
    Queues effects and status updates and writes them in batches.

    @param clock: schedules flushes and retries.
    @param pool: the connection pool to write through (one connection is
        enough: this lane writes one batch at a time, which also keeps the
        writes of one site in order).
    @param batch_size: write as soon as this many messages wait; also the
        most written in one transaction.
    @param batch_bytes: the most bytes of messages in one transaction.
    @param batch_delay: write at the latest this many seconds after the
        oldest waiting message arrived.
    @param high_bytes: bytes held (queued or being written) above which
        every site pauses; they resume under a quarter of it.
    @param site_bytes: bytes one listener may hold before it alone is told
        to hold; it is released under half of it.
    @param site_messages: messages one listener may have waiting before it
        alone is told to hold (by default a tenth of C{high_water}, so
        that a single flooding site is held long before the lane presses
        every site); it is released under half of it.
    @param on_pressure: called with True when the queue passes
        C{high_water} or C{high_bytes}, and with False once it is back under
        C{low_water} and a quarter of C{high_bytes}.
    @param observe: called with each committed batch's size and write time.
    @param on_stall: called once when failing writes pass L{STALLED_AFTER}
        seconds (with the seconds, the error and False), and once when
        writes succeed again after that (with the seconds it lasted, the
        last error and True).
    @param fence: in a cluster, gives the fence of a write of these sites
        (every write is fenced with it); None writes unfenced, as a lone
        instance does.
    @param on_fenced: called with the stale sites, once per write the fence
        refused, after their messages were dropped unacknowledged (their
        owner should stop them).
    @param instance: the name of this instance (C{--instance}), written on
        every connection and device event; None writes none.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        pool: WritePool,
        batch_size: int = BATCH_SIZE,
        batch_delay: float = BATCH_DELAY,
        max_retry_delay: float = 2.0,
        high_water: int | None = None,
        low_water: int | None = None,
        on_pressure: Callable[[bool], None] | None = None,
        batch_bytes: int = DEFAULT_BATCH_BYTES,
        high_bytes: int = DEFAULT_HIGH_BYTES,
        site_bytes: int = DEFAULT_SITE_BYTES,
        site_messages: int | None = None,
        observe: Callable[[int, float], None] | None = None,
        on_stall: Callable[[float, str, bool], None] | None = None,
        *,
        fence: Callable[[Collection[str]], Fence | None] | None = None,
        on_fenced: Callable[[list[str]], None] | None = None,
        instance: str | None = None,
    ) -> None:
        self._clock = clock
        self._pool = pool
        self._batch_size = batch_size
        self._batch_bytes = batch_bytes
        self._batch_delay = batch_delay
        self._max_retry_delay = max_retry_delay
        self._high_water = high_water if high_water is not None else 20 * batch_size
        self._low_water = low_water if low_water is not None else 2 * batch_size
        self._high_bytes = high_bytes
        self._low_bytes = high_bytes // 4
        self._site_bytes = site_bytes
        self._site_messages = (
            site_messages if site_messages is not None else max(1, self._high_water // 10)
        )
        self.on_pressure = on_pressure
        self.observe = observe
        self.pressing = False
        self._retrying = False
        self._queue: deque[_Pending] = deque()
        self._records = _SiteRecords()
        self._flushing = False
        self._scheduled: IDelayedCall | None = None
        self._failures = 0
        self._idle_waiters: list[Deferred[None]] = []
        #: Bytes held (queued or being written), in all and per listener.
        self.bytes_held = 0
        self._held: dict[CommitListener, int] = {}
        #: Messages held, per listener.
        self._waiting: dict[CommitListener, int] = {}
        self._holding: set[CommitListener] = set()
        #: When the current run of failed writes began, and its last error.
        self.failing_since: float | None = None
        self.last_error: str | None = None
        self.on_stall = on_stall
        self._stall_reported = False
        self.batches_written = 0
        self.messages_written = 0
        self.dead_lettered = 0
        self._fence = fence
        self._instance = instance
        self.on_fenced = on_fenced
        #: Writes the fence refused, and the messages dropped for it.
        self.batches_fenced = 0
        self.messages_fenced = 0

    @property
    def queued(self) -> int:
        """
        Messages waiting to be written (not counting a batch in flight).
        """
        return len(self._queue)

    def failing_for(self) -> float:
        """
        Seconds since this lane last could write, while its writes fail
        for reasons other than their data; 0 when it writes.
        """
        if self.failing_since is None:
            return 0.0
        return self._clock.seconds() - self.failing_since

    def submit(self, effects: list[Effect]) -> Deferred[None]:
        """
        Queue effects that belong to no message (device status changes of
        a whole site, say): in parts of at most C{batch_size} effects, so
        that no statement grows with them.

        @return: fires once all of them are committed.
        """
        parts = []
        for start in range(0, max(len(effects), 1), self._batch_size):
            done: Deferred[None] = Deferred()
            part = effects[start : start + self._batch_size]
            self.queue(part, _FIRE, done, sum(map(_text_size, part)))
            parts.append(done)
        return parts[0] if len(parts) == 1 else _all(parts)

    def queue(
        self, effects: list[Effect], listener: CommitListener, message: Any, size: int = 0
    ) -> None:
        """
        Queue one message's effects; once they are committed,
        C{listener.committed} hears of C{message} (with the batch's other
        messages of the same listener).  Nothing is dropped: a batch is
        retried until it is committed, and a message the database refuses
        is committed as a dead letter.  Only in a cluster, a message of a
        site that another instance owns now is dropped unacknowledged when
        the fence refuses it (see C{on_fenced}).

        @param size: the message's bytes (payload and topic).
        """
        queue = self._queue
        # At least one overhead, even for an empty write (a marker that
        # fires once all before it is written): every entry then holds
        # bytes, so a listener's count of held bytes reaches 0 only with
        # its last entry, and no release finds it already gone.
        cost = size + MESSAGE_OVERHEAD * max(len(effects), 1)
        queue.append((effects, listener, message, self._clock.seconds(), cost))
        self.bytes_held += cost
        held = self._held.get(listener, 0) + cost
        self._held[listener] = held
        waiting = self._waiting.get(listener, 0) + 1
        self._waiting[listener] = waiting
        if (
            held >= self._site_bytes or waiting > self._site_messages
        ) and listener not in self._holding:
            self._holding.add(listener)
            self.log.warn(
                "a site holds {count} messages ({bytes} bytes) waiting to be written: pausing "
                "its reading",
                count=waiting,
                bytes=held,
                listener=listener,
            )
            listener.hold(True)
        if not self.pressing and (
            len(queue) >= self._high_water or self.bytes_held >= self._high_bytes
        ):
            self._press(True)
        if not self._flushing and (self._scheduled is None or len(queue) >= self._batch_size):
            self._kick()

    def _press(self, pressing: bool) -> None:
        self.pressing = pressing
        self.log.warn(
            "{action} reading from the brokers: {count} messages ({bytes} bytes) wait to be "
            "written",
            action="pausing" if pressing else "resuming",
            count=len(self._queue),
            bytes=self.bytes_held,
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

    def when_idle(self) -> Deferred[None]:
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
        queue = self._queue
        limit = min(self._batch_size, len(queue))
        batch = [queue.popleft() for _ in range(limit)]
        size = sum(p[4] for p in batch)
        while size > self._batch_bytes and len(batch) > 1:
            # Rare (large payloads): give back what does not fit.
            p = batch.pop()
            queue.appendleft(p)
            size -= p[4]
        records, self._records = self._records, _SiteRecords()
        d = Deferred.fromCoroutine(self._write(batch, records))
        d.addErrback(lambda f: self.log.failure("batch writer crashed", f))

    async def _write(self, batch: list[_Pending], records: _SiteRecords) -> None:
        delay: float | None = None
        started = self._clock.seconds()
        try:
            while True:
                try:
                    await self._send(
                        (e for p in batch for e in p[0]),
                        records.statuses.values(),
                        records.events,
                    )
                except Fenced as fenced:
                    # Not the data's fault nor the database's: write the
                    # other sites' part at once.
                    [batch] = self._forget(fenced.sites, [batch], records)
                    continue
                break
        except Exception as e:
            if is_rejection(e):
                self.log.warn(
                    "database rejected a batch of {count} messages, isolating the cause: {error}",
                    count=len(batch),
                    error=_first_line(e),
                )
                delay = await self._isolate(batch, records, e)
            else:
                delay = self._retry_later(batch, records, e)
        else:
            self._wrote()
            self.batches_written += 1
            self.messages_written += len(batch)
            if self.observe is not None and batch:
                self.observe(len(batch), self._clock.seconds() - started)
            self._tell(batch)
        finally:
            self._flushing = False
            if (
                self.pressing
                and len(self._queue) <= self._low_water
                and self.bytes_held <= self._low_bytes
            ):
                self._press(False)
            self._kick(delay)

    async def _send(
        self,
        effects: Iterable[Effect],
        statuses: Iterable[StatusUpdate] = (),
        events: Iterable[ConnectionEvent] = (),
    ) -> None:
        """
        Write effects, statuses and events in one query, fenced when this
        writer has a fence.

        @raise Fenced: the fence refused the write (nothing of it is
            committed); the caller drops the stale sites (L{_forget}).
        """
        if self._fence is None:
            await write_effects(
                self._pool.operation, effects, statuses, events, instance=self._instance
            )
            return
        effects = list(effects)
        statuses = list(statuses)
        events = list(events)
        sites = {_site_of(e) for e in effects}
        sites.update(s.site_id for s in statuses)
        sites.update(e.site_id for e in events)
        if not sites:
            return
        try:
            await write_effects(
                self._pool.operation,
                effects,
                statuses,
                events,
                fence=self._fence(sites),
                instance=self._instance,
            )
        except Exception as e:
            stale = fenced_sites(e)
            # A refusal that names none of the written sites could not be
            # mended by dropping them: leave it to the retries.
            if stale is None or sites.isdisjoint(stale):
                raise
            self.batches_fenced += 1
            raise Fenced(stale) from None

    def _forget(
        self, stale: list[str], parts: list[list[_Pending]], records: _SiteRecords
    ) -> list[list[_Pending]]:
        """
        Drop everything of the C{stale} sites this lane holds: from the
        C{parts} being written (returned without them, in order), their
        C{records}, and the queue.  Their messages are not acknowledged
        (their listeners never hear C{committed}), and the bytes and
        messages they held are released; then C{on_fenced} is told.

        A message's effects are one site's, except those of L{submit},
        which lose only the stale sites' effects (and fail with L{Fenced}
        when none are left).
        """
        gone = set(stale)
        dropped: list[_Pending] = []

        def keep(pending: Iterable[_Pending]) -> list[_Pending]:
            kept = []
            for p in pending:
                effects = p[0]
                left = [e for e in effects if _site_of(e) not in gone]
                if len(left) == len(effects):
                    kept.append(p)
                elif left:
                    kept.append((left, *p[1:]))
                else:
                    dropped.append(p)
            return kept

        parts = [keep(part) for part in parts]
        self._queue = deque(keep(self._queue))
        records.drop(gone)
        self._records.drop(gone)
        self.messages_fenced += len(dropped)
        by_listener = self._release(dropped)
        self.log.warn(
            "sites {sites} are owned by another instance now: dropped {count} of their messages "
            "unacknowledged",
            sites=stale,
            count=len(dropped),
        )
        for d in by_listener.pop(_FIRE, []):
            d.errback(Fenced(stale))
        if self.on_fenced is not None:
            try:
                self.on_fenced(stale)
            except Exception:
                self.log.failure("telling of fenced sites failed", sites=stale)
        return parts

    def _wrote(self) -> None:
        self._failures = 0
        if self.failing_since is not None:
            seconds = self._clock.seconds() - self.failing_since
            self.log.info("database writes succeed again after {seconds:.1f}s", seconds=seconds)
            if self._stall_reported:
                self._stall_reported = False
                if self.on_stall is not None:
                    self.on_stall(seconds, self.last_error or "", True)
        self.failing_since = None
        self.last_error = None

    def _tell(self, batch: list[_Pending]) -> None:
        """
        Tell each listener, once, which of its messages are committed, and
        release the bytes they held.
        """
        for listener, messages in self._release(batch).items():
            try:
                listener.committed(messages)
            except Exception:
                self.log.failure("a commit listener failed", listener=listener)

    def _release(self, batch: list[_Pending]) -> dict[CommitListener, list[Any]]:
        """
        Release the bytes and messages that C{batch} held, per listener,
        and let a held listener read again once it is under half its
        share.

        @return: each listener's messages of C{batch}, in order.
        """
        by_listener: dict[CommitListener, list[Any]] = {}
        freed: dict[CommitListener, int] = {}
        waiting = self._waiting
        for _, listener, message, _, cost in batch:
            messages = by_listener.get(listener)
            if messages is None:
                by_listener[listener] = [message]
                freed[listener] = cost
            else:
                messages.append(message)
                freed[listener] += cost
        held = self._held
        for listener, cost in freed.items():
            self.bytes_held -= cost
            left = held[listener] - cost
            if left:
                held[listener] = left
            else:
                del held[listener]
            count = waiting[listener] - len(by_listener[listener])
            if count:
                waiting[listener] = count
            else:
                del waiting[listener]
            if (
                listener in self._holding
                and left <= self._site_bytes // 2
                and count <= self._site_messages // 2
            ):
                self._holding.discard(listener)
                listener.hold(False)
        return by_listener

    def _retry_later(self, batch: list[_Pending], records: _SiteRecords, error: Exception) -> float:
        """
        Keep what could not be written (the database is unreachable, or
        failed in a way that retrying can mend) and say when to try again.
        Nothing is acknowledged meanwhile, and nothing is dropped.
        """
        self._queue.extendleft(reversed(batch))
        self._records.put_back(records)
        self._failures += 1
        if self.failing_since is None:
            self.failing_since = self._clock.seconds()
        self.last_error = _first_line(error)
        failing = self.failing_for()
        if failing >= STALLED_AFTER and not self._stall_reported:
            self._stall_reported = True
            self.log.error(
                "nothing committed for {seconds:.0f}s: {count} messages wait; {error}",
                seconds=failing,
                count=len(self._queue),
                error=self.last_error,
            )
            if self.on_stall is not None:
                self.on_stall(failing, self.last_error, False)
        delay = min(0.5 * 2 ** (self._failures - 1), self._max_retry_delay)
        self.log.warn(
            "database write failed, keeping {count} messages and retrying in {delay}s: {error}",
            count=len(self._queue),
            delay=delay,
            error=self.last_error,
        )
        return delay

    async def _isolate(
        self, batch: list[_Pending], records: _SiteRecords, error: Exception
    ) -> float | None:
        """
        Write a rejected batch in halves, and halves of the halves that are
        rejected, until each message the database refuses stands alone and
        becomes a dead letter: k bad messages cost O(k log n) statements.
        Messages are committed in their order.

        @return: the delay before a retry, if the database failed otherwise.
        """
        while records:
            # Their text is made storable (L{mqttsvc.db.batch}): a refusal
            # would be a bug, logged, and not worth stalling for.
            try:
                await self._send((), records.statuses.values(), records.events)
            except Fenced as fenced:
                [batch] = self._forget(fenced.sites, [batch], records)
                continue
            except Exception as e:
                if not is_rejection(e):
                    return self._retry_later(batch, records, e)
                self.log.error(
                    "the database refused site statuses and events, dropped: {error}",
                    error=_first_line(e),
                )
            break
        # Parts still to write, the next one last; each with the error that
        # refused it, if it was already tried.
        work: list[tuple[list[_Pending], Exception | None]] = [(batch, error)] if batch else []
        try:
            while work:
                part, refused = work.pop()
                try:
                    if refused is None:
                        try:
                            await self._send(e for p in part for e in p[0])
                        except Fenced:
                            raise
                        except Exception as e:
                            if not is_rejection(e):
                                raise _Retry(_left(part, work), e) from None
                            refused = e
                        else:
                            self.messages_written += len(part)
                            self._tell(part)
                            continue
                    if len(part) == 1:
                        await self._dead_letter(part[0], refused, _left(part, work))
                    else:
                        middle = len(part) // 2
                        work += [(part[middle:], None), (part[:middle], None)]
                except Fenced as fenced:
                    # Nothing of this part was written: it is tried again
                    # without the stale sites, and so is every later part
                    # that lost messages (a refusal may have been theirs).
                    work.append((part, None))
                    parts = self._forget(fenced.sites, [p for p, _ in work], _SiteRecords())
                    work = [
                        (kept, tried if kept == before else None)
                        for kept, (before, tried) in zip(parts, work, strict=True)
                        if kept
                    ]
        except _Retry as retry:
            return self._retry_later(retry.left, _SiteRecords(), retry.error)
        self._wrote()
        return None

    async def _dead_letter(self, pending: _Pending, error: Exception, left: list[_Pending]) -> None:
        """
        Commit a message the database refuses as a dead letter with the
        database's reason: with its topic's sighting if the database takes
        that, else the dead letter alone.  A message that is nothing but a
        dead letter already and still refused (a bug) is logged and let go.
        """
        effects = pending[0]
        reason = "database rejected the message: " + _first_line(error)
        seen = next((e for e in effects if isinstance(e, TopicSeen)), None)
        dead: list[Effect] = [e for e in effects if isinstance(e, DeadLetter)]
        attempts: list[list[Effect]]
        if seen is not None:
            letter = DeadLetter(seen.site_id, seen.topic, seen.payload, reason, seen.at)
            attempts = [[seen, letter], [letter]]
        else:
            attempts = [dead] if dead and len(dead) < len(effects) else []
        for attempt in attempts:
            try:
                await self._send(attempt)
            except Fenced:
                raise
            except Exception as e:
                if not is_rejection(e):
                    raise _Retry(left, e) from None
                error = e
                continue
            self.dead_lettered += 1
            break
        else:
            self.log.error(
                "the database refused a message and its dead letter, dropped: {error}",
                error=_first_line(error),
                effects=len(effects),
            )
        self.messages_written += 1
        self._tell([pending])


def _left(
    part: list[_Pending], work: list[tuple[list[_Pending], Exception | None]]
) -> list[_Pending]:
    """
    What is still to be written, in order: this part, then the parts on the
    work stack (the last one on it is the next one).
    """
    return part + [p for later, _ in reversed(work) for p in later]


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _text_size(effect: Effect) -> int:
    """
    The text an effect that belongs to no message adds to a statement,
    beyond L{MESSAGE_OVERHEAD}: its device id (a topic level, up to
    L{mqttsvc.config.MAX_TOPIC_BYTES}) or topic.
    """
    if isinstance(effect, DeviceStatus):
        return len(effect.key.device_id) + len(effect.key.gateway_id or "")
    if isinstance(effect, DeviceSeen):
        return len(effect.device_id) + len(effect.payload)
    if isinstance(effect, TopicSeen | DeadLetter):
        return len(effect.topic) + len(effect.payload)
    if isinstance(effect, SiteDevicesStatus):
        return len(effect.reason)
    return 0


def _site_of(effect: Effect) -> str:
    if isinstance(effect, DeviceStatus):
        return effect.key.site_id
    return effect.site_id


class Reader(Protocol):
    """
    A running site, as far as back-pressure goes.
    """

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


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

    A lane over its high water pauses the running sites of that lane (they
    L{attach} while they run), and resumes them once it is back under its
    low water; sites in other lanes read on.

    It offers what L{BatchWriter} offers, over all lanes.

    @param on_pressure: also told of each lane's pressure (its index and
        whether it presses), after its sites were paused or resumed.
    @param on_stall: called with a lane's index and what L{BatchWriter}'s
        C{on_stall} is called with.
    @param fence: the fence of every lane's writes (see L{BatchWriter}).
    @param on_fenced: told of the stale sites of every lane's refused
        writes (see L{BatchWriter}).
    @param options: the L{BatchWriter} options of every lane.
    """

    log = Logger()

    def __init__(
        self,
        clock: IReactorTime,
        pool: WritePool,
        lanes: int = WRITE_CONNECTIONS,
        *,
        on_pressure: Callable[[int, bool], None] | None = None,
        on_stall: Callable[[int, float, str, bool], None] | None = None,
        fence: Callable[[Collection[str]], Fence | None] | None = None,
        on_fenced: Callable[[list[str]], None] | None = None,
        **options: Any,
    ) -> None:
        self._pressing_lanes: set[int] = set()
        self.on_pressure = on_pressure
        self._lanes = [
            BatchWriter(
                clock,
                pool,
                on_pressure=partial(self._lane_pressure, i),
                on_stall=None if on_stall is None else partial(on_stall, i),
                fence=fence,
                on_fenced=on_fenced,
                **options,
            )
            for i in range(lanes)
        ]
        self._by_site: dict[str, BatchWriter] = {}
        #: The running sites, by id.
        self._readers: dict[str, Reader] = {}

    def lane(self, site_id: str) -> BatchWriter:
        """
        The lane that writes a site's effects.
        """
        lane = self._by_site.get(site_id)
        if lane is None:
            index = zlib.crc32(site_id.encode("utf-8")) % len(self._lanes)
            lane = self._by_site[site_id] = self._lanes[index]
        return lane

    def index(self, site_id: str) -> int:
        """
        The index of the lane that writes a site's effects.
        """
        return self._lanes.index(self.lane(site_id))

    def attach(self, site_id: str, reader: Reader) -> None:
        """
        A site's service runs: pause it whenever its lane presses, at once
        if it presses now.
        """
        self._readers[site_id] = reader
        if self.lane(site_id).pressing:
            reader.pause_reading()

    def detach(self, site_id: str, reader: Reader) -> None:
        """
        That service of the site no longer runs.
        """
        if self._readers.get(site_id) is reader:
            del self._readers[site_id]

    def _lane_pressure(self, index: int, pressing: bool) -> None:
        # A lane presses only its own sites: the others' lanes commit.
        if pressing:
            self._pressing_lanes.add(index)
        else:
            self._pressing_lanes.discard(index)
        lane = self._lanes[index]
        for site_id, reader in list(self._readers.items()):
            if self.lane(site_id) is not lane:
                continue
            if pressing:
                reader.pause_reading()
            else:
                reader.resume_reading()
        if self.on_pressure is not None:
            self.on_pressure(index, pressing)

    def queue(
        self, effects: list[Effect], listener: CommitListener, message: Any, size: int = 0
    ) -> None:
        """
        See L{BatchWriter.queue}; the effects are one message's, of one site.
        """
        self.lane(_site_of(effects[0])).queue(effects, listener, message, size)

    def problem(self, site_id: str) -> str | None:
        """
        Why a site's messages are not being committed, when its lane has
        failed to commit for L{STALLED_AFTER} seconds or more.
        """
        lane = self.lane(site_id)
        seconds = lane.failing_for()
        if seconds < STALLED_AFTER:
            return None
        return f"database: nothing committed for {seconds:.0f}s: {lane.last_error}"

    def failing(self) -> list[tuple[int, float, str]]:
        """
        The lanes whose writes fail (for reasons other than their data):
        each one's index, for how many seconds, and its last error.
        """
        return [
            (i, lane.failing_for(), lane.last_error or "")
            for i, lane in enumerate(self._lanes)
            if lane.failing_since is not None
        ]

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

    def when_idle(self) -> Deferred[None]:
        return _all([lane.when_idle() for lane in self._lanes])

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
    def dead_lettered(self) -> int:
        return sum(lane.dead_lettered for lane in self._lanes)

    @property
    def bytes_held(self) -> int:
        return sum(lane.bytes_held for lane in self._lanes)

    @property
    def batches_fenced(self) -> int:
        return sum(lane.batches_fenced for lane in self._lanes)

    @property
    def messages_fenced(self) -> int:
        return sum(lane.messages_fenced for lane in self._lanes)


def _all(deferreds: list[Deferred[None]]) -> Deferred[None]:
    """
    Fire (with None) once every one of C{deferreds} has.
    """
    gathered = gatherResults(deferreds, consumeErrors=True)
    return gathered.addCallback(lambda _: None)
