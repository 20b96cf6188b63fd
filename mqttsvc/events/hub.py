"""
The event hub: publishes every new event of C{event_log} (see
L{mqttsvc.db.events}) once, in id order, to its subscribers: the live
streams of L{mqttsvc.control.sse} and the webhook alerts of
L{mqttsvc.events.alerts}.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mqttsvc.db.events import CHANNEL, PAGE, Event, EventFilter, Events
from mqttsvc.db.notifications import NotificationListener

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

    @param events: where events are read.
    @param poll_interval: seconds between reads without a notification.
    """

    log = Logger()
    name = "events"

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        events: Events,
        poll_interval: float = 15.0,
        listen_interval: float = 2.0,
    ) -> None:
        self._reactor = reactor
        self._events = events
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
                events = await self._events.after(self.position)
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
        return await self._events.last_before(datetime.fromtimestamp(self._started_at, UTC))

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
        return await self._events.after(after, wanted)
