"""
The event stream's logic without a network: history then live without a gap
or a duplicate, bounded memory for a slow client, heartbeats; and the HTTP
side of C{/events} and the status page (authentication, parameters,
headers, the access log).
"""

from __future__ import annotations

import base64
import hashlib
import re
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.test.requesthelper import DummyRequest

from mqttsvc.control import sse as eventstream
from mqttsvc.control.rpc.dispatcher import Dispatcher
from mqttsvc.control.sse import EventStreams
from mqttsvc.control.tokens import load_tokens
from mqttsvc.control.web import STATUS_PAGE, WebApp, access_log_line
from mqttsvc.db.events import Event, EventFilter


def event(id_: int, site: str = "s", type_: str = "connection") -> Event:
    return Event(id_, type_, site, datetime(2024, 1, 1, tzinfo=UTC), {"n": id_})


class Transport:
    def __init__(self) -> None:
        self.aborted = False
        self.closed = False

    def abortConnection(self) -> None:
        self.aborted = True

    def loseConnection(self) -> None:
        self.closed = True


class StreamRequest(DummyRequest):
    """
    A request that a push producer can be registered with.
    """

    def __init__(self) -> None:
        super().__init__([])
        self.transport = Transport()
        self.producer: Any = None

    def registerProducer(self, prod: Any, s: bool) -> None:
        assert s and self.producer is None
        self.producer = prod

    def unregisterProducer(self) -> None:
        self.producer = None

    def lose(self) -> None:
        """The client went away."""
        observers, self._finishedDeferreds = self._finishedDeferreds, None
        for observer in observers:
            observer.errback(Failure(ConnectionError("lost")))

    def ids(self) -> list[int]:
        return [int(i) for i in re.findall(rb"^id: (\d+)\ndata:", b"".join(self.written), re.M)]


class Hub:
    """
    What the streams need of an L{EventHub}: live events and history pages.
    """

    def __init__(self) -> None:
        self.position: int | None = 7
        self.subscribers: list[Callable[[Event], object]] = []
        self.pages: list[Deferred[list[Event]]] = []
        self.asked: list[int] = []

    def positioned(self) -> Deferred[int]:
        assert self.position is not None
        return succeed(self.position)

    def subscribe(self, subscriber: Callable[[Event], object]) -> Callable[[], None]:
        self.subscribers.append(subscriber)
        return lambda: None

    def publish(self, event: Event) -> None:
        for subscriber in self.subscribers:
            subscriber(event)

    def history(self, after: int, wanted: EventFilter) -> Deferred[list[Event]]:
        self.asked.append(after)
        page: Deferred[list[Event]] = Deferred()
        self.pages.append(page)
        return page


@pytest.fixture
def streams() -> tuple[EventStreams, Hub, Clock]:
    clock, hub = Clock(), Hub()
    service = EventStreams(clock, hub, heartbeat=15.0, max_buffered=3)  # type: ignore[arg-type]
    service.startService()
    return service, hub, clock


def test_history_then_live_without_gap_or_duplicate(
    streams: tuple[EventStreams, Hub, Clock], monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Live events that arrive while history pages are read are held, and
    sent after the history, skipping those the history already had.
    """
    service, hub, _ = streams
    monkeypatch.setattr(eventstream, "PAGE", 2)
    request = StreamRequest()
    served = Deferred.fromCoroutine(service.serve(request, EventFilter(), 0))
    hub.publish(event(5))
    hub.pages[0].callback([event(1), event(2)])
    hub.publish(event(6))
    hub.pages[1].callback([event(3), event(4)])
    hub.pages[2].callback([event(5)])
    hub.publish(event(7))
    assert hub.asked == [0, 2, 4]
    assert request.ids() == [1, 2, 3, 4, 5, 6, 7]
    assert request.written[0] == b"retry: 2000\n\n"
    assert request.responseHeaders.getRawHeaders(b"Content-Type") == [
        b"text/event-stream; charset=utf-8"
    ]
    assert not served.called
    request.lose()
    assert served.called and service.clients == 0


def test_without_last_event_id_the_stream_starts_at_the_hub_position(
    streams: tuple[EventStreams, Hub, Clock],
) -> None:
    """An id line without data gives the client its resume point before any event."""
    service, hub, _ = streams
    request = StreamRequest()
    Deferred.fromCoroutine(service.serve(request, EventFilter(frozenset({"s"})), None))
    assert request.written[1] == b"id: 7\n\n"
    assert hub.asked == []
    hub.publish(event(8, site="other"))
    hub.publish(event(9))
    assert request.ids() == [9]


def test_a_slow_client_is_dropped_not_buffered_without_end(
    streams: tuple[EventStreams, Hub, Clock],
) -> None:
    """
    While the transport is paused, at most max_buffered events are held;
    one more and the connection is aborted.  Resuming in time sends the
    held events in order.
    """
    service, hub, _ = streams
    patient, slow = StreamRequest(), StreamRequest()
    Deferred.fromCoroutine(service.serve(patient, EventFilter(), None))
    dropped = Deferred.fromCoroutine(service.serve(slow, EventFilter(), None))
    patient.producer.pauseProducing()
    slow.producer.pauseProducing()
    for id_ in (8, 9, 10):
        hub.publish(event(id_))
    patient.producer.resumeProducing()
    assert patient.ids() == [8, 9, 10]
    hub.publish(event(11))
    assert slow.transport.aborted
    assert slow.ids() == []
    slow.lose()
    assert dropped.called
    assert service.clients == 1
    assert patient.ids() == [8, 9, 10, 11]


def test_heartbeats_and_stopping(streams: tuple[EventStreams, Hub, Clock]) -> None:
    """A comment every heartbeat; stopping the service ends every stream and its timer."""
    service, _, clock = streams
    request = StreamRequest()
    served = Deferred.fromCoroutine(service.serve(request, EventFilter(), None))
    clock.advance(15)
    clock.advance(15)
    assert request.written.count(b": heartbeat\n\n") == 2
    service.stopService()
    assert request.finished and request.transport.closed and served.called
    assert clock.getDelayedCalls() == []


def test_history_failure_ends_the_stream_so_the_client_retries(
    streams: tuple[EventStreams, Hub, Clock],
) -> None:
    """The database being down while resuming closes the stream with a comment."""
    service, hub, _ = streams
    hub.history = lambda after, wanted: fail(ConnectionError("database down"))  # type: ignore[method-assign]
    request = StreamRequest()
    served = Deferred.fromCoroutine(service.serve(request, EventFilter(), 3))
    assert served.called and request.finished
    assert request.written[-1] == b": database unavailable; reconnect\n\n"


def test_catching_up_sends_a_window_at_a_time_and_keeps_no_page(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    Issue 13: a client resuming from far back gets at most replay_window
    bytes of stored events before the next page is read from the last one
    it got; the rest of a page is dropped, not held.  While its connection
    pushes back, nothing more is sent or read.
    """
    monkeypatch.setattr(eventstream, "PAGE", 4)
    clock, hub = Clock(), Hub()
    window = 2 * len(eventstream._message(event(1))) - 1
    service = EventStreams(clock, hub, replay_window=window)  # type: ignore[arg-type]
    service.startService()
    request = StreamRequest()
    Deferred.fromCoroutine(service.serve(request, EventFilter(), 0))
    hub.pages[0].callback([event(1), event(2), event(3), event(4)])
    hub.pages[1].callback([event(3), event(4), event(5), event(6)])
    assert hub.asked == [0, 2, 4] and request.ids() == [1, 2, 3, 4]
    request.producer.pauseProducing()
    hub.pages[2].callback([event(5), event(6), event(7)])
    assert request.ids() == [1, 2, 3, 4] and hub.asked == [0, 2, 4]
    request.producer.resumeProducing()
    assert hub.asked == [0, 2, 4, 4]
    hub.pages[3].callback([event(5)])
    hub.publish(event(8))
    assert request.ids() == [1, 2, 3, 4, 5, 8]
    service.stopService()
    assert clock.getDelayedCalls() == []


def test_the_stream_count_is_capped() -> None:
    """full says when max_streams are open, and stops saying it when one ends."""
    clock, hub = Clock(), Hub()
    service = EventStreams(clock, hub, max_streams=2)  # type: ignore[arg-type]
    service.startService()
    requests = [StreamRequest(), StreamRequest()]
    for request in requests:
        assert not service.full
        Deferred.fromCoroutine(service.serve(request, EventFilter(), None))
    assert service.full
    requests[0].lose()
    assert not service.full and service.clients == 1
    service.stopService()


# --- HTTP -----------------------------------------------------------------------

TOKEN = "e" * 32


class Streams:
    """Records what /events asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[EventFilter, int | None]] = []
        self.full = False
        self.clients = 0

    async def serve(self, request: Any, wanted: EventFilter, after: int | None) -> None:
        self.asked.append((wanted, after))
        request.write(b"ok")


@pytest.fixture
def web(tmp_path: Path) -> tuple[StubTreq, Streams]:
    path = tmp_path / "tokens"
    path.write_text(f"frontend {TOKEN}\n")
    path.chmod(0o600)
    streams = Streams()
    app = WebApp(Dispatcher([]), load_tokens(str(path)), events=streams)  # type: ignore[arg-type]
    return StubTreq(app.resource()), streams


@pytest.mark.parametrize(
    "url, headers",
    [
        ("http://x/events", {}),
        ("http://x/events?access_token=wrong-wrong-wrong-wrong", {}),
        ("http://x/events", {"Authorization": "Bearer wrong-wrong-wrong-wrong"}),
        (f"http://x/events?access_token={TOKEN}", {"Authorization": "Bearer wrong-wrong-wrong"}),
    ],
)
@pytest_twisted.ensureDeferred
async def test_events_need_a_token(
    web: tuple[StubTreq, Streams], url: str, headers: dict[str, str]
) -> None:
    """Like the RPC: 401 without a valid token (a wrong header is not rescued by the query)."""
    treq, streams = web
    response = await treq.get(url, headers=headers)
    assert response.code == 401
    assert streams.asked == []


@pytest_twisted.ensureDeferred
async def test_events_accept_a_header_or_a_query_token_and_parse_filters(
    web: tuple[StubTreq, Streams],
) -> None:
    """Filters may repeat or be comma-separated; Last-Event-ID as a header or a parameter."""
    treq, streams = web
    response = await treq.get(
        "http://x/events?site_id=a,b&site_id=c&type=device",
        headers={"Authorization": f"Bearer {TOKEN}", "Last-Event-ID": "41"},
    )
    assert response.code == 200
    response = await treq.get(f"http://x/events?access_token={TOKEN}&last_event_id=7")
    assert response.code == 200
    assert streams.asked == [
        (EventFilter(frozenset({"a", "b", "c"}), frozenset({"device"})), 41),
        (EventFilter(), 7),
    ]
    response = await treq.get(f"http://x/events?access_token={TOKEN}&type=weather")
    assert response.code == 400
    assert "weather" in (await response.json())["error"]


def test_access_log_hides_the_query_token() -> None:
    """The token an EventSource passes in the URL never reaches the log."""
    request = DummyRequest([])
    request.uri = f"/events?site_id=a&access_token={TOKEN}&type=device".encode()
    request.code = 200
    request.sentLength = 10
    line = access_log_line("[ts]", request)
    assert TOKEN not in line
    assert '"GET /events?site_id=a&access_token=<redacted>&type=device HTTP/1.0"' in line


@pytest_twisted.ensureDeferred
async def test_status_page_is_open_self_contained_and_locked_down(
    web: tuple[StubTreq, Streams],
) -> None:
    """
    GET / needs no token and holds no data; it loads nothing from elsewhere,
    and its Content-Security-Policy allows exactly its own inline script and
    style.
    """
    treq, _ = web
    response = await treq.get("http://x/")
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == ["text/html; charset=utf-8"]
    page = await response.content()
    assert page == STATUS_PAGE.read_bytes()
    assert b'name="viewport"' in page
    assert not re.search(rb"(src|href)=\"?(https?:)?//", page)
    [policy] = response.headers.getRawHeaders("Content-Security-Policy")
    for tag in ("script", "style"):
        [block] = re.findall(f"<{tag}>(.*?)</{tag}>".encode(), page, re.S)
        digest = base64.b64encode(hashlib.sha256(block).digest()).decode()
        assert f"{tag}-src 'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
