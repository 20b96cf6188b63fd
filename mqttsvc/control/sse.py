"""
The live event stream for browsers: Server-Sent Events at C{GET /events}.

Each client gets the events its filters select, one SSE message per event:

    id: 42
    data: {"id": 42, "type": "connection", "site_id": "north", "at": "...", "data": {...}}

A client that reconnects with C{Last-Event-ID} first gets every stored event
after that id from C{event_log}, then the live ones, without a gap or a
duplicate (see L{EventStreams.serve}).  A comment line every
C{heartbeat} seconds keeps proxies from closing an idle stream.

Memory stays bounded: a client whose connection cannot keep up (its
transport pauses us) has at most C{max_buffered} events held for it; one
more and the connection is dropped.  Its EventSource reconnects with the
last id it received and catches up from the database.  Catching up writes
at most C{replay_window} bytes at a time, none while the connection pushes
back, and keeps nothing of a page it has not sent: the next page is read
again from the last event sent.  At most C{max_streams} streams are open at
once.
"""

from __future__ import annotations

import json
from collections import deque
from typing import Any, cast

from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.server import Request
from zope.interface import implementer

from mqttsvc.db.events import PAGE, Event, EventFilter
from mqttsvc.events.hub import EventHub

#: Seconds between heartbeat comments.
HEARTBEAT = 15.0

#: Events held for one slow client before it is dropped.
MAX_BUFFERED = 1000

#: How long an EventSource waits before reconnecting, in milliseconds.
RETRY_MS = 2000

#: Streams open at once; one more is refused (503 with Retry-After).
MAX_STREAMS = 100

#: Bytes of stored events written to a catching-up client at a time (then
#: the next page is read, once its connection takes more).  Issue 13 measured
#: 300 clients resuming from id 0 holding 39 MB when each was sent whole
#: pages, and each page was kept while the client did not read.
REPLAY_WINDOW = 64 * 1024


def _message(event: Event) -> bytes:
    data = json.dumps(event.as_json(), separators=(",", ":"), ensure_ascii=False)
    return b"id: %d\ndata: %s\n\n" % (event.id, data.encode())


@implementer(IPushProducer)
class EventStream:
    """
    One client's stream, registered as the producer of its response, so
    that the transport tells it when the client stops reading.

    @ivar written: the id of the last event sent (or of the point the
        client resumes from): nothing at or below it is sent again.
    @ivar done: fires when the response has ended, for whatever reason.
    """

    log = Logger()

    def __init__(self, request: Request, wanted: EventFilter, max_buffered: int) -> None:
        self._request = request
        self._wanted = wanted
        self._max_buffered = max_buffered
        self._held: deque[Event] = deque()
        self._replaying = True
        self._paused = False
        self._writable: list[Deferred[None]] = []
        self.closed = False
        self.written = 0
        self.done: Deferred[None] = Deferred()
        request.notifyFinish().addBoth(self._finished)

    def _finished(self, result: object) -> None:
        # Finished by us, or the connection was lost: either way, over.
        self._stop_writing()
        if not self.done.called:
            self.done.callback(None)

    def open(self) -> None:
        request = self._request
        request.setHeader(b"Content-Type", b"text/event-stream; charset=utf-8")
        request.setHeader(b"Cache-Control", b"no-cache")
        # nginx buffers responses unless told otherwise.
        request.setHeader(b"X-Accel-Buffering", b"no")
        request.registerProducer(self, True)
        # Sends the headers at once, so that the client's `open` fires.
        request.write(b"retry: %d\n\n" % RETRY_MS)

    def resume_point(self, event_id: int) -> None:
        """
        Tell the client where it is: an C{id:} line without data sets its
        last event id without delivering a message, so that a reconnect
        before the first event still misses nothing.
        """
        self.written = event_id
        self._request.write(b"id: %d\n\n" % event_id)

    def live(self, event: Event) -> None:
        """
        A new event from the hub.
        """
        if self.closed or not self._wanted(event):
            return
        if self._replaying or self._paused or self._held:
            self._held.append(event)
            if len(self._held) > self._max_buffered:
                self.drop(f"more than {self._max_buffered} events waiting for a slow client")
            return
        self._send(event)

    def replayed(self, events: list[Event], window: int) -> bool:
        """
        Send stored events until C{window} bytes are written or the client's
        connection pushes back.

        @return: whether every one of C{events} was sent.
        """
        written = 0
        for event in events:
            if self.closed or self._paused or written >= window:
                return False
            written += self._send(event)
        return True

    def go_live(self) -> None:
        self._replaying = False
        self._flush()

    def heartbeat(self) -> None:
        if not self.closed and not self._paused:
            self._request.write(b": heartbeat\n\n")

    def writable(self) -> Deferred[None]:
        """
        Fires when the client's connection takes data again.
        """
        if not self._paused or self.closed:
            return succeed(None)
        waiter: Deferred[None] = Deferred()
        self._writable.append(waiter)
        return waiter

    def _send(self, event: Event) -> int:
        """
        Write one event unless it was already sent; the bytes written.
        """
        if self.closed or event.id <= self.written:
            return 0
        self.written = event.id
        message = _message(event)
        self._request.write(message)
        return len(message)

    def _flush(self) -> None:
        while self._held and not self._paused and not self.closed:
            self._send(self._held.popleft())

    # IPushProducer: the transport's verdict on the client's reading.

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        waiters, self._writable = self._writable, []
        for waiter in waiters:
            waiter.callback(None)
        if not self._replaying:
            self._flush()

    def stopProducing(self) -> None:
        self._stop_writing()

    def drop(self, why: str) -> None:
        """
        Cut the connection without sending what is held; the client
        reconnects and catches up from the database.
        """
        if self.closed:
            return
        self.log.warn("dropping an event stream client: {why}", why=why)
        self._stop_writing()
        self._request.unregisterProducer()
        transport: Any = getattr(self._request, "transport", None)
        if transport is not None:
            transport.abortConnection()

    def close(self, comment: str | None = None) -> None:
        """
        End the response and the connection (the service is stopping, or
        the stream cannot go on); the client reconnects.
        """
        if self.closed:
            return
        request = self._request
        if comment:
            request.write(b": %s\n\n" % comment.encode())
        self._stop_writing()
        request.unregisterProducer()
        transport: Any = getattr(request, "transport", None)
        request.finish()
        if transport is not None:
            transport.loseConnection()

    def _stop_writing(self) -> None:
        if self.closed:
            return
        self.closed = True
        self._held.clear()
        waiters, self._writable = self._writable, []
        for waiter in waiters:
            waiter.callback(None)


class EventStreams(Service):
    """
    Every open event stream: fed by the hub, kept alive by heartbeats, and
    closed when the service stops.
    """

    log = Logger()
    name = "event-streams"

    def __init__(
        self,
        reactor: Any,
        hub: EventHub,
        heartbeat: float = HEARTBEAT,
        max_buffered: int = MAX_BUFFERED,
        max_streams: int = MAX_STREAMS,
        replay_window: int = REPLAY_WINDOW,
    ) -> None:
        self._hub = hub
        self._streams: set[EventStream] = set()
        self._heartbeats = LoopingCall(self._beat)
        self._heartbeats.clock = reactor
        self._heartbeat = heartbeat
        self._max_buffered = max_buffered
        self._max_streams = max_streams
        self._replay_window = replay_window
        self._unsubscribe = hub.subscribe(self._publish)

    @property
    def clients(self) -> int:
        return len(self._streams)

    @property
    def full(self) -> bool:
        """
        Whether as many streams are open as allowed: refuse the next one.
        """
        return len(self._streams) >= self._max_streams

    def startService(self) -> None:
        super().startService()
        self._heartbeats.start(self._heartbeat, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._heartbeats.running:
            self._heartbeats.stop()
        for stream in list(self._streams):
            stream.close()

    def _beat(self) -> None:
        for stream in list(self._streams):
            stream.heartbeat()

    def _publish(self, event: Event) -> None:
        for stream in list(self._streams):
            stream.live(event)

    async def serve(self, request: IRequest, wanted: EventFilter, after: int | None) -> None:
        """
        Stream events to one client until it goes away; with C{after}
        (its C{Last-Event-ID}), stored events after that id come first.

        Nothing falls between history and live events: the stream joins the
        hub before the history is read, holds what arrives meanwhile, and
        skips whatever it has already sent (ids only grow).
        """
        if not self.running:
            request.setResponseCode(503)
            return
        stream = EventStream(cast(Request, request), wanted, self._max_buffered)
        self._streams.add(stream)
        try:
            stream.open()
            if after is None:
                # Events after the hub's position are the ones it will
                # publish: that is where this client starts.
                position = await self._hub.positioned()
                if not stream.closed:
                    stream.resume_point(position)
            else:
                stream.written = after
                try:
                    while not stream.closed:
                        await stream.writable()
                        if await self._replay_page(stream, wanted):
                            break
                except Exception as e:
                    self.log.warn(
                        "cannot replay events after {after}: {error}",
                        after=stream.written,
                        error=str(e).strip(),
                    )
                    stream.close("database unavailable; reconnect")
            stream.go_live()
            await stream.done
        finally:
            self._streams.discard(stream)

    async def _replay_page(self, stream: EventStream, wanted: EventFilter) -> bool:
        """
        Send the client one page of stored events after the last one it
        got, or as much of it as its window allows; nothing of the page is
        kept once this returns.

        @return: whether the history is exhausted.
        """
        page = await self._hub.history(stream.written, wanted)
        return stream.replayed(page, self._replay_window) and len(page) < PAGE
