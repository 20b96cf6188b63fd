"""
Issue 13, the HTTP side: one bad request must never stall, bloat or leak.

A real L{BoundedSite} listens on a loopback port and is hit with raw sockets
from a thread, so that the reactor keeps serving meanwhile: bodies are
refused before they are buffered and are never spooled to disk, slow and
idle connections are cut, connections over the cap are shed, event streams
are capped, and no log line holds a token however it was sent.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThread
from twisted.logger import LogEvent, LogLevel, formatEvent, globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from mqttsvc.control.httpserver import (
    MAX_BODY,
    MAX_CONNECTIONS,
    MIN_CONNECTIONS,
    RETRY_AFTER,
    BoundedSite,
    Limits,
    default_max_connections,
)
from mqttsvc.control.rpc.dispatcher import Call, Dispatcher, Method
from mqttsvc.control.sse import EventStreams
from mqttsvc.control.tokens import load_tokens
from mqttsvc.control.web import WebApp, access_log_line, redact_query, redact_referrer
from mqttsvc.events.hub import Event, EventFilter
from mqttsvc.runtime.logs import event_as_json_line
from mqttsvc.tap import Options, check_values
from tests.waiting import eventually

TOKEN = "k" * 12 + "-TokenUnderTest-" + "k" * 12


class Recorder(Resource):
    """
    Answers C{ok} and records each request's method and what it kept of
    the body; with C{delay}, answers that many seconds later.
    """

    isLeaf = True

    def __init__(self, delay: float = 0.0) -> None:
        super().__init__()
        self.seen: list[tuple[bytes, type, int]] = []
        self._delay = delay

    def render(self, request: Request) -> Any:
        content = request.content
        assert content is not None
        self.seen.append((request.method, type(content), len(content.read())))
        if not self._delay:
            return b"ok"
        from twisted.internet import reactor

        def answer() -> None:
            request.write(b"ok")
            request.finish()

        reactor.callLater(self._delay, answer)
        return NOT_DONE_YET


class Server:
    """
    A L{BoundedSite} with the access log on a free loopback port.
    """

    def __init__(self, resource: Any, limits: Limits) -> None:
        from twisted.internet import reactor

        self.site = BoundedSite(resource, reactor, limits, logFormatter=access_log_line)
        self._listening = reactor.listenTCP(0, self.site, interface="127.0.0.1")
        self.port: int = self._listening.getHost().port

    async def stop(self) -> None:
        for channel in list(self.site.channels):
            channel.transport.abortConnection()
        await self._listening.stopListening()
        await eventually(lambda: not self.site.channels, what="every connection closed")


@pytest_twisted.async_yield_fixture
async def serve() -> AsyncIterator[Callable[..., Server]]:
    """
    Start servers with the given resource and limits; stopped after the test.
    """
    servers: list[Server] = []

    def start(resource: Any, **limits: Any) -> Server:
        server = Server(resource, Limits(**limits))
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
def spooled(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    """
    Every temporary file created during the test (twisted.web spools a
    request body over 100 kB to one).
    """
    created: list[object] = []
    original = tempfile.TemporaryFile

    def recording(*args: Any, **kwargs: Any) -> Any:
        created.append(args)
        return original(*args, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", recording)
    return created


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """
    Every log event of the test: twisted.logger's and the access log's.
    """
    events: list[LogEvent] = []
    globalLogPublisher.addObserver(events.append)
    yield events
    globalLogPublisher.removeObserver(events.append)


# --- raw clients, run in a thread -------------------------------------------------


def _connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def _read_to_close(sock: socket.socket) -> bytes:
    chunks = []
    while True:
        try:
            data = sock.recv(65536)
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def exchange(port: int, *parts: bytes) -> tuple[bytes, float]:
    """
    Send C{parts}, then read until the server closes: what it answered, and
    the seconds from the last byte sent to the close.
    """
    with _connect(port) as sock:
        for part in parts:
            sock.sendall(part)
        sent = time.monotonic()
        answer = _read_to_close(sock)
        return answer, time.monotonic() - sent


def open_with_head(port: int, request: bytes) -> tuple[socket.socket, bytes]:
    """
    Send C{request} and read the response's head; the connection stays
    open (an event stream goes on).
    """
    sock = _connect(port)
    sock.sendall(request)
    head = b""
    while b"\r\n\r\n" not in head:
        data = sock.recv(4096)
        if not data:
            break
        head += data
    return sock, head


def head_of(port: int, request: bytes) -> bytes:
    """
    The head of the response to C{request}, the connection closed after it.
    """
    sock, head = open_with_head(port, request)
    sock.close()
    return head


def send_chunks(port: int, head: bytes, chunk: bytes, most: int) -> tuple[int, bytes]:
    """
    Send a chunked body of C{chunk}s, never its end, until the server cuts
    the connection (or C{most} bytes are sent): the body bytes sent, and
    what the server answered.
    """
    framed = b"%x\r\n%s\r\n" % (len(chunk), chunk)
    sent = 0
    with _connect(port) as sock:
        sock.sendall(head)
        try:
            while sent < most:
                sock.sendall(framed)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        return sent, _read_to_close(sock)


def trickle(port: int, data: bytes, every: float) -> tuple[int, float]:
    """
    Send C{data} a byte at a time, one every C{every} seconds, until the
    server closes: how many bytes went, and after how many seconds.
    """
    with _connect(port) as sock:
        sock.settimeout(every)
        start = time.monotonic()
        for i in range(len(data)):
            try:
                sock.send(data[i : i + 1])
                if sock.recv(1024) == b"":
                    return i + 1, time.monotonic() - start
            except TimeoutError:
                continue
            except (BrokenPipeError, ConnectionResetError):
                return i + 1, time.monotonic() - start
        return len(data), time.monotonic() - start


def _status(answer: bytes) -> bytes:
    return answer.split(b"\r\n", 1)[0]


def _body(answer: bytes) -> Any:
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"Transfer-Encoding: chunked" not in head:
        return json.loads(body)
    chunks = []
    while True:
        size, _, body = body.partition(b"\r\n")
        if not int(size, 16):
            return json.loads(b"".join(chunks))
        chunks.append(body[: int(size, 16)])
        body = body[int(size, 16) + 2 :]


def _head(method: bytes, target: bytes, *headers: bytes) -> bytes:
    return b"\r\n".join([b"%s %s HTTP/1.1" % (method, target), b"Host: test", *headers, b"", b""])


# --- bodies -----------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_declared_length_over_the_limit_is_refused_before_any_body(
    serve: Callable[..., Server], spooled: list[object]
) -> None:
    """
    C{Content-Length: 10^12} without a token gets 413 (a JSON-RPC error
    naming the limit) and a closed connection right after the headers,
    whatever the method, without "100 Continue", a temporary file or a
    resource running.
    """
    recorder = Recorder()
    server = serve(recorder)
    for method, extra in [
        (b"POST", b"Content-Type: application/json"),
        (b"POST", b"Expect: 100-continue"),
        (b"GET", b"Connection: keep-alive"),
    ]:
        head = _head(method, b"/rpc", extra, b"Content-Length: 1000000000000")
        answer, seconds = await deferToThread(exchange, server.port, head)
        assert _status(answer) == b"HTTP/1.1 413 Content Too Large", answer
        assert b"100 Continue" not in answer
        assert _body(answer)["error"]["data"] == {"limit": MAX_BODY}
        assert seconds < 1.0
    assert recorder.seen == []
    assert spooled == []


@pytest_twisted.ensureDeferred
async def test_a_chunked_body_is_cut_as_soon_as_it_passes_the_limit(
    serve: Callable[..., Server], spooled: list[object], logged: list[LogEvent]
) -> None:
    """
    An unterminated chunked body is refused within one read of passing the
    limit: the server counts no more than the limit plus one chunk, stops
    reading, and the client cannot go on sending; nothing is spooled.
    """
    recorder = Recorder()
    server = serve(recorder)
    head = _head(b"POST", b"/rpc", b"Transfer-Encoding: chunked")
    chunk = b"x" * 16384
    sent, answer = await deferToThread(send_chunks, server.port, head, chunk, 256 * MAX_BODY)
    # Loopback socket buffers hold some megabytes; the point is the end.
    assert sent < 64 * MAX_BODY
    if answer:
        assert _status(answer) == b"HTTP/1.1 413 Content Too Large"
    [refused] = [e for e in logged if e.get("log_format", "").startswith("refused a request body")]
    assert MAX_BODY < refused["size"] <= MAX_BODY + 65536
    assert recorder.seen == []
    assert spooled == []


@pytest_twisted.ensureDeferred
async def test_bodies_stay_in_memory_and_only_post_keeps_one(
    serve: Callable[..., Server], spooled: list[object]
) -> None:
    """
    A body just under the limit reaches the resource from memory; the body
    of a GET is read and counted but not kept.
    """
    recorder = Recorder()
    server = serve(recorder)
    body = b"x" * (MAX_BODY - 1)
    for method in (b"POST", b"GET"):
        head = _head(method, b"/", b"Connection: close", b"Content-Length: %d" % len(body))
        answer, _ = await deferToThread(exchange, server.port, head, body)
        assert _status(answer) == b"HTTP/1.1 200 OK"
    assert recorder.seen == [(b"POST", BytesIO, len(body)), (b"GET", BytesIO, 0)]
    assert spooled == []


# --- time -------------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_a_request_must_arrive_whole_within_the_timeout(
    serve: Callable[..., Server],
) -> None:
    """
    A connection that sends nothing, or trickles its headers a byte at a
    time (which restarts twisted.web's own idle timeout every time), is
    closed once the request timeout has passed.
    """
    server = serve(Recorder(), request_timeout=0.5)
    answer, seconds = await deferToThread(exchange, server.port)
    assert answer == b"" and 0.4 < seconds < 3
    head = _head(b"GET", b"/", b"X-Padding: " + b"p" * 500)
    count, seconds = await deferToThread(trickle, server.port, head, 0.05)
    assert count < 100 and 0.4 < seconds < 3


@pytest_twisted.ensureDeferred
async def test_the_timeout_spares_slow_answers_and_ends_idle_keep_alive(
    serve: Callable[..., Server],
) -> None:
    """
    The clock stops once a request is whole (a slow answer, an event
    stream, is not cut) and starts again when its response is sent: an
    idle keep-alive connection is closed after the timeout.
    """
    server = serve(Recorder(delay=1.0), request_timeout=0.5)
    answer, seconds = await deferToThread(exchange, server.port, _head(b"GET", b"/"))
    assert _status(answer) == b"HTTP/1.1 200 OK" and answer.endswith(b"ok\r\n0\r\n\r\n")
    assert 1.4 < seconds < 4


class Large(Resource):
    """
    An 8 MiB answer to anything.
    """

    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"x" * (8 * MAX_BODY)


@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_its_answer_is_cut(serve: Callable[..., Server]) -> None:
    """
    A response the client does not read is not held for ever: once the
    timeout has passed the connection is closed gracefully (what the client
    has not read yet is still sent), and cut as long again later.
    """
    server = serve(Large(), request_timeout=0.5)
    sock = _connect(server.port)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.sendall(_head(b"GET", b"/"))
        await eventually(lambda: len(server.site.channels) == 1, what="the connection")
        start = time.monotonic()
        await eventually(lambda: not server.site.channels, within=5, what="the cut")
        assert 0.9 < time.monotonic() - start < 3
    finally:
        sock.close()


# --- connections ------------------------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_connections_over_the_cap_get_503_and_room_comes_back(
    serve: Callable[..., Server],
) -> None:
    """
    With the cap reached by idle sockets, one more connection gets 503 with
    Retry-After and is closed; once one of them goes, a new one is served.
    """
    server = serve(Recorder(), max_connections=3)
    idle = [_connect(server.port) for _ in range(3)]
    try:
        await eventually(lambda: len(server.site.channels) == 3, what="three connections")
        answer, _ = await deferToThread(exchange, server.port, _head(b"GET", b"/"))
        assert _status(answer) == b"HTTP/1.1 503 Service Unavailable"
        assert b"Retry-After: %d\r\n" % RETRY_AFTER in answer
        idle.pop().close()
        await eventually(lambda: len(server.site.channels) == 2, what="one connection gone")
        answer, _ = await deferToThread(
            exchange, server.port, _head(b"GET", b"/", b"Connection: close")
        )
        assert _status(answer) == b"HTTP/1.1 200 OK"
    finally:
        for sock in idle:
            sock.close()


def test_the_connection_cap_defaults_to_a_quarter_of_the_descriptors() -> None:
    """
    Without --http-max-connections the cap leaves three quarters of
    RLIMIT_NOFILE to brokers and the database, within fixed bounds; the
    options read the defaults from the server module.
    """
    assert default_max_connections(1024) == 256
    assert default_max_connections(400) == 100
    assert default_max_connections(20) == MIN_CONNECTIONS
    assert default_max_connections(1 << 20) == MAX_CONNECTIONS
    options = Options(environ={"MQTTSVC_HTTP_REQUEST_TIMEOUT": "7"})
    options.parseOptions(["--db", "x", "--events-max-streams", "3"])
    check_values(options)
    assert options["events-max-streams"] == 3
    assert options["http-request-timeout"] == 7.0
    assert MIN_CONNECTIONS <= options["http-max-connections"] <= MAX_CONNECTIONS


# --- the web app behind it: tokens, streams, JSON -----------------------------------


class Hub:
    """
    What the event streams need of the hub: a position and no history.
    """

    def positioned(self) -> Deferred[int]:
        return succeed(1)

    def subscribe(self, subscriber: Callable[[Event], object]) -> Callable[[], None]:
        return lambda: None

    def history(self, after: int, wanted: EventFilter) -> Deferred[list[Event]]:
        return succeed([])


async def echo(call: Call) -> Any:
    return call.params.get("value")


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[WebApp, EventStreams]]:
    """
    The real web app with a token file, an echo method and event streams
    capped at two.
    """
    from twisted.internet import reactor

    from mqttsvc.control.rpc.dispatcher import Param

    path = tmp_path / "tokens"
    path.write_text(f"frontend {TOKEN}\n")
    path.chmod(0o600)
    streams = EventStreams(reactor, Hub(), max_streams=2)  # type: ignore[arg-type]
    streams.startService()
    dispatcher = Dispatcher([Method("echo", echo, (Param("value", "string", required=False),))])
    yield WebApp(dispatcher, load_tokens(str(path)), events=streams), streams
    streams.stopService()


def _rpc(body: bytes, *headers: bytes) -> bytes:
    return (
        _head(
            b"POST",
            b"/rpc",
            b"Content-Type: application/json",
            b"Authorization: Bearer " + TOKEN.encode(),
            b"Connection: close",
            b"Content-Length: %d" % len(body),
            *headers,
        )
        + body
    )


@pytest_twisted.ensureDeferred
async def test_no_log_line_holds_a_token(
    serve: Callable[..., Server], app: tuple[WebApp, EventStreams], logged: list[LogEvent]
) -> None:
    """
    However the token is sent (percent-encoded query names, either query
    separator, a Referer, the header, with a refused body, in a request
    that never completes), no log event holds it, formatted or as the JSON
    log writes its fields; the access log still shows which requests came.
    """
    web, streams = app
    server = serve(web.resource(), request_timeout=1.0)
    token = TOKEN.encode()
    # Open until the service stops, which finishes it: then it is logged.
    kept, head = await deferToThread(
        open_with_head, server.port, _head(b"GET", b"/events?access%5Ftoken=" + token)
    )
    try:
        assert _status(head) == b"HTTP/1.1 200 OK"
        for target in (b"/events?%61ccess_token=", b"/events?type=device;access_token="):
            head = await deferToThread(head_of, server.port, _head(b"GET", target + token))
            assert _status(head) == b"HTTP/1.1 200 OK", target
            await eventually(lambda: streams.clients == 1, what="the stream closed")
        close = b"Connection: close"
        requests: list[tuple[bytes, bytes]] = [
            (_head(b"GET", b"/events?ACCESS%5FTOKEN=" + token, close), b"401"),
            (
                _head(
                    b"GET",
                    b"/healthz",
                    close,
                    b"Referer: https://front.example/page?x=1&access_token=" + token,
                ),
                b"200",
            ),
            (_head(b"GET", b"/", close, b"Referer: https://front.example/#t=" + token), b"200"),
            (_rpc(b'{"jsonrpc":"2.0","method":"echo","id":1}'), b"200"),
            (
                _head(b"POST", b"/rpc?access_token=" + token, b"Content-Length: 1000000000000"),
                b"413",
            ),
            # Never completed: closed by the deadline, with no answer.
            (b"GET /events?access_token=" + token + b" HTTP/1.1\r\n", b""),
        ]
        for request, status in requests:
            answer, _ = await deferToThread(exchange, server.port, request)
            assert _status(answer)[9:12] == status, (request, answer)
        streams.stopService()

        def lines() -> list[str]:
            return [formatEvent(e) for e in logged] + [event_as_json_line(e) for e in logged]

        await eventually(
            lambda: any("/events?access%5Ftoken=<redacted>" in line for line in lines()),
            what="the stream's access log line",
        )
    finally:
        kept.close()
    logs = lines()
    for expected in (
        "/events?ACCESS%5FTOKEN=<redacted>",
        "https://front.example/page?<redacted>",
        "https://front.example/?<redacted>",
        "refused a request body",
        "no complete request",
    ):
        assert any(expected in line for line in logs), expected
    assert [line for line in logs if TOKEN in line] == []


@pytest_twisted.ensureDeferred
async def test_event_streams_over_the_cap_get_503(
    serve: Callable[..., Server], app: tuple[WebApp, EventStreams]
) -> None:
    """
    With as many streams open as allowed, one more is refused with 503 and
    Retry-After, not accepted into memory; when one ends, there is room.
    """
    web, streams = app
    server = serve(web.resource())
    request = _head(
        b"GET", b"/events", b"Authorization: Bearer " + TOKEN.encode(), b"Connection: close"
    )
    open_streams = [_connect(server.port) for _ in range(2)]
    try:
        for sock in open_streams:
            sock.sendall(request)
        await eventually(lambda: streams.clients == 2, what="two open streams")
        answer, _ = await deferToThread(exchange, server.port, request)
        assert _status(answer) == b"HTTP/1.1 503 Service Unavailable"
        assert b"Retry-After: %d\r\n" % RETRY_AFTER in answer
        assert "retry later" in _body(answer)["error"]
        open_streams.pop().close()
        await eventually(lambda: streams.clients == 1, what="one stream gone")
        assert not streams.full
    finally:
        for sock in open_streams:
            sock.close()


@pytest_twisted.ensureDeferred
async def test_a_nesting_bomb_is_a_parse_error_not_a_crash(
    serve: Callable[..., Server], app: tuple[WebApp, EventStreams], logged: list[LogEvent]
) -> None:
    """
    A body of 100,000 nested arrays is answered -32700 with HTTP 200, and
    nothing is logged as an error.
    """
    server = serve(app[0].resource())
    answer, _ = await deferToThread(exchange, server.port, _rpc(b"[" * 100_000))
    assert _status(answer) == b"HTTP/1.1 200 OK"
    assert _body(answer)["error"]["code"] == -32700
    assert [e for e in logged if e["log_level"] >= LogLevel.error] == []


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        (b"/events?access_token=T", b"/events?access_token=<redacted>"),
        (b"/events?access%5Ftoken=T&x=1", b"/events?access%5Ftoken=<redacted>&x=1"),
        (b"/events?x=1;%61ccess_token=T", b"/events?x=1;%61ccess_token=<redacted>"),
        (b"/events?Access+Token=T", b"/events?Access+Token=<redacted>"),
        (b"/events?access_token", b"/events?access_token"),
        (b"/events?site_id=a&type=device", b"/events?site_id=a&type=device"),
        (b"/rpc", b"/rpc"),
    ],
)
def test_query_tokens_are_redacted_by_their_decoded_name(uri: bytes, expected: bytes) -> None:
    """Any parameter whose decoded name holds 'token' loses its value in the log."""
    assert redact_query(uri) == expected


@pytest.mark.parametrize(
    ("referrer", "expected"),
    [
        (b"https://front/page?access_token=T", b"https://front/page?<redacted>"),
        (b"https://front/page#token=T", b"https://front/page?<redacted>"),
        (b"https://front/page", b"https://front/page"),
    ],
)
def test_a_referrer_is_logged_without_its_query(referrer: bytes, expected: bytes) -> None:
    """The page that linked here may carry its own tokens, under any name."""
    assert redact_referrer(referrer) == expected
