"""
Events out: one shape for everything worth telling the outside world, and
the hub that publishes them.

Connection transitions, device status changes, dead letters and operator
actions each become a row of C{event_log} (C{id}, C{type}, C{site_id}, C{at},
C{data}): the first three by triggers on their own tables, operator actions
by L{record_operator_action}.  Every insert sends C{NOTIFY mqttsvc_events}
when its transaction commits, and event ids become visible in increasing
order (see migration 0006), so "everything after id N" is a complete
resume point.

The L{EventHub} listens on that channel, reads each new event once from the
database, and hands it, in id order, to its subscribers: the live streams of
L{mqttsvc.control.sse} and the webhook alerts of L{mqttsvc.events.alerts}.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
from psycopg2.extras import Json
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mqttsvc.db.notifications import NotificationListener
from mqttsvc.db.observations import iso
from mqttsvc.db.pool import ConnectionPool

#: The NOTIFY channel that every committed event is published on.
CHANNEL = "mqttsvc_events"

#: The event types, as C{event_log.type} holds them.
TYPES = ("connection", "device", "dead_letter", "operator", "service")

#: Events read from the database per query.
PAGE = 500


@attrs.frozen
class Event:
    """
    One event, as stored in C{event_log}.
    """

    id: int
    type: str
    site_id: str | None
    at: datetime
    data: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "site_id": self.site_id,
            "at": iso(self.at),
            "data": self.data,
        }


@attrs.frozen
class EventFilter:
    """
    Which events a subscriber wants: None means any.
    """

    site_ids: frozenset[str] | None = None
    types: frozenset[str] | None = None

    def __call__(self, event: Event) -> bool:
        if self.site_ids is not None and event.site_id not in self.site_ids:
            return False
        return self.types is None or event.type in self.types


async def fetch_events(
    pool: ConnectionPool, after: int, wanted: EventFilter = EventFilter(), limit: int = PAGE
) -> list[Event]:
    """
    The events with an id above C{after} that C{wanted} selects, in id order.
    """
    rows = await pool.query(
        "SELECT id, type, site_id, at, data FROM event_log WHERE id > %(after)s"
        " AND (%(sites)s::text[] IS NULL OR site_id = ANY(%(sites)s::text[]))"
        " AND (%(types)s::text[] IS NULL OR type = ANY(%(types)s::text[]))"
        " ORDER BY id LIMIT %(limit)s",
        {
            "after": after,
            "sites": None if wanted.site_ids is None else sorted(wanted.site_ids),
            "types": None if wanted.types is None else sorted(wanted.types),
            "limit": limit,
        },
    )
    return [Event(*row) for row in rows]


async def record_operator_action(
    pool: ConnectionPool, caller: str, action: str, site_id: str | None, **details: Any
) -> None:
    """
    Record what an operator did (C{site.restart}, C{deadletter.purge}, ...)
    and who did it, as an C{operator} event.

    Its own short transaction: it must not run inside one that holds row
    locks, since taking an event id waits for other event writers to commit.
    """
    data = {"action": action, "caller": caller, **details}
    await pool.operation(
        "INSERT INTO event_log (type, site_id, at, data) VALUES ('operator', %s, %s, %s)",
        (site_id, datetime.now(UTC), Json(data)),
    )


async def record_service_event(
    pool: ConnectionPool, problem: str, site_id: str | None = None, **details: Any
) -> None:
    """
    Record something the service itself ran into (a write lane that cannot
    commit, and its recovery; a site that reached its device limit) as a
    C{service} event, of one site or of none.

    Written through C{pool}, not through the writer whose trouble it may
    report.
    """
    data = {"problem": problem, **details}
    await pool.operation(
        "INSERT INTO event_log (type, site_id, at, data) VALUES ('service', %s, %s, %s)",
        (site_id, datetime.now(UTC), Json(data)),
    )


Subscriber = Callable[[Event], object]


class EventHub(Service):
    """
    Reads every new event once, in id order, and passes it to each
    subscriber.

    It listens on L{CHANNEL} with a connection of its own (reconnecting like
    the configuration listener).  A notification only says "there is
    more": the hub then reads everything after the last id it has seen, so a
    notification missed while the connection was down costs nothing; after
    every reconnect, and every C{poll_interval} seconds as a safety net, it
    reads again.

    @param pool: where events are read.
    @param poll_interval: seconds between reads without a notification.
    """

    log = Logger()
    name = "events"

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        pool: ConnectionPool,
        poll_interval: float = 15.0,
        listen_interval: float = 2.0,
    ) -> None:
        self._reactor = reactor
        self._pool = pool
        self._subscribers: list[Subscriber] = []
        self._listener = NotificationListener(
            reactor, dsn, CHANNEL, self._notified, self.wake, listen_interval, what="event"
        )
        self._polling = LoopingCall(self.wake)
        self._polling.clock = reactor
        self._poll_interval = poll_interval
        #: The id of the last event handed out; None until first read.
        self.position: int | None = None
        self._started_at = 0.0
        self._reading: Deferred[None] | None = None
        self._again = False
        self._caught_up: list[Deferred[None]] = []
        self._positioned: list[Deferred[int]] = []
        self._failing = False

    @property
    def listening(self) -> bool:
        return self._listener.listening

    @property
    def listener(self) -> NotificationListener:
        return self._listener

    def startService(self) -> None:
        super().startService()
        # Events from the moment this process started count as new (every
        # event it writes is stamped later by the same clock); older ones
        # are history, for clients that ask for them.
        self._started_at = self._reactor.seconds()
        self._listener.startService()
        self._polling.start(self._poll_interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._polling.running:
            self._polling.stop()
        self._listener.stopService()

    def subscribe(self, subscriber: Subscriber) -> Callable[[], None]:
        """
        Hand every new event to C{subscriber}, from now on; returns what
        cancels that.
        """
        self._subscribers.append(subscriber)

        def unsubscribe() -> None:
            if subscriber in self._subscribers:
                self._subscribers.remove(subscriber)

        return unsubscribe

    def _notified(self, payload: str) -> None:
        self.wake()

    def wake(self) -> None:
        """
        Read what is new, now (or as soon as the read in progress is done).
        """
        if not self.running:
            return
        if self._reading is not None:
            self._again = True
            return
        reading = Deferred.fromCoroutine(self._read())
        self._reading = reading

        def done(result: object) -> None:
            self._reading = None
            waiters, self._caught_up = self._caught_up, []
            for waiter in waiters:
                waiter.callback(None)

        reading.addBoth(done)

    def positioned(self) -> Deferred[int]:
        """
        Fires with L{position} once the hub knows it (after its first read
        of the database): events after it are the ones it will publish.
        """
        if self.position is not None:
            return succeed(self.position)
        waiter: Deferred[int] = Deferred()
        self._positioned.append(waiter)
        return waiter

    def caught_up(self) -> Deferred[None]:
        """
        Fires once a read that starts after this call has finished.
        """
        waiter: Deferred[None] = Deferred()
        self._caught_up.append(waiter)
        self.wake()
        if self._reading is None:
            # Not running: nothing will read.
            self._caught_up.remove(waiter)
            waiter.callback(None)
        else:
            self._again = True
        return waiter

    async def _read(self) -> None:
        try:
            if self.position is None:
                self.position = await self._start_position()
                waiters, self._positioned = self._positioned, []
                for waiter in waiters:
                    waiter.callback(self.position)
            while True:
                self._again = False
                events = await fetch_events(self._pool, self.position)
                for event in events:
                    self.position = event.id
                    self._publish(event)
                if len(events) < PAGE and not self._again:
                    break
        except Exception as e:
            # The next notification, reconnect or poll tries again.
            if not self._failing:
                self.log.warn(
                    "reading new events failed (retrying on the next notification, reconnect "
                    "or poll): {error}",
                    error=str(e).strip(),
                )
            self._failing = True
            return
        if self._failing:
            self.log.info("reading new events again, after id {position}", position=self.position)
        self._failing = False

    async def _start_position(self) -> int:
        started = datetime.fromtimestamp(self._started_at, UTC)
        rows = await self._pool.query(
            "SELECT id FROM event_log WHERE at < %s ORDER BY id DESC LIMIT 1", (started,)
        )
        position: int = rows[0][0] if rows else 0
        return position

    def _publish(self, event: Event) -> None:
        for subscriber in list(self._subscribers):
            try:
                subscriber(event)
            except Exception:
                self.log.failure("an event subscriber failed on event {id}", id=event.id)

    async def history(self, after: int, wanted: EventFilter) -> list[Event]:
        """
        One page (L{PAGE}) of stored events after C{after}, for a client
        that resumes.
        """
        return await fetch_events(self._pool, after, wanted)
