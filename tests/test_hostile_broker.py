"""
Real clients and sites, on the real reactor, against a broker that means
harm (L{tests.fakebroker.FakeBroker} with a script): a 50 MiB payload, a
packet that never ends, QoS 2, topics that are not UTF-8, silence or
garbage after CONNACK; and connection tests that must not starve the
sites' connects.
"""

from __future__ import annotations

import hashlib
import itertools
import socket
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults

from mqttsvc.config import DEAD_LETTER_KEEP, DEFAULT_MAX_PAYLOAD, SiteConfig, default_topics
from mqttsvc.mqtt.client import READ_SIZE, MQTTClient
from mqttsvc.mqtt.codec import HEADER_ROOM, ReceivedMessage
from mqttsvc.mqtt.connector import Connector
from mqttsvc.mqtt.errors import ConnectFailed
from mqttsvc.mqtt.keepalive import KeepaliveSweep
from mqttsvc.mqtt.probe import PROBE_QUEUE, PROBE_THREADS, ConnectionTests
from mqttsvc.records import DeadLetter, ResumeState
from mqttsvc.sites.site import (
    MAX_RETRIES,
    PROVING_TIME,
    MessageSink,
    Reader,
    SiteService,
    SiteState,
)
from tests.conformance import assert_implements
from tests.conftest import BROKER_HOST, BROKER_PORT
from tests.fakebroker import PUBACK, FakeBroker, pattern, publish_header
from tests.publish import publish

#: Seconds of keepalive for these sites: the least allowed, so that the
#: silence and packet timeouts come soon.
KEEPALIVE = 5


@asynccontextmanager
async def listening(broker: FakeBroker) -> AsyncIterator[int]:
    """The broker on a free loopback port, closed after."""
    from twisted.internet import reactor

    port = reactor.listenTCP(0, broker, interface="127.0.0.1")
    try:
        yield port.getHost().port
    finally:
        for connection in broker.connections:
            if connection.transport.connected:
                connection.transport.abortConnection()
        await port.stopListening()


@asynccontextmanager
async def connector() -> AsyncIterator[Connector]:
    """A connector of the test's own, started, and stopped after."""
    from twisted.internet import reactor

    made = Connector(reactor, KeepaliveSweep(reactor), threads=4, pool_name="test-connect")
    made.startService()
    try:
        yield made
    finally:
        await made.stopService()


def site_config(port: int, protocol: str = "3.1.1") -> SiteConfig:
    return SiteConfig(
        site_id="hostile",
        host="127.0.0.1",
        port=port,
        keepalive=KEEPALIVE,
        protocol=protocol,
        topics=default_topics("hostile"),
    )


class Writer:
    """Takes the site's messages; the test commits them when it likes."""

    def __init__(self) -> None:
        self.queued: list[tuple[list[Any], Any, ReceivedMessage]] = []
        self._waiting: list[Deferred[None]] = []

    def queue(self, effects: list[Any], listener: Any, message: Any, size: int = 0) -> None:
        self.queued.append((effects, listener, message))
        waiting, self._waiting = self._waiting, []
        for d in waiting:
            d.callback(None)

    def attach(self, site_id: str, reader: Reader) -> None:
        pass  # never presses

    def detach(self, site_id: str, reader: Reader) -> None:
        pass

    def next(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self._waiting.append(d)
        return d


def test_the_writer_fake_is_a_message_sink() -> None:
    """The fake writer has what a site uses of the real one, and no more."""
    assert_implements(Writer, MessageSink, extra=["next"])


class States:
    """Every state a site reports, and a wait for the one a test expects."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, SiteState]] = []
        self._waiting: list[tuple[Callable[[SiteState], bool], Deferred[SiteState]]] = []

    def report(self, state: SiteState, event: Any) -> None:
        from twisted.internet import reactor

        self.seen.append((time.monotonic(), state))
        waiting, self._waiting = self._waiting, []
        for wanted, d in waiting:
            if wanted(state):
                # Not from inside the state machine's transition: the test
                # may go on to stop the site.
                reactor.callLater(0, d.callback, state)
            else:
                self._waiting.append((wanted, d))

    def until(self, wanted: Callable[[SiteState], bool], within: float) -> Deferred[SiteState]:
        from twisted.internet import reactor

        d: Deferred[SiteState] = Deferred()
        self._waiting.append((wanted, d))
        return d.addTimeout(within, reactor)


@asynccontextmanager
async def running_site(
    port: int, resume: ResumeState | None = None, **kwargs: Any
) -> AsyncIterator[tuple[SiteService, States, Writer]]:
    """A site on the broker at C{port}, stopped after."""
    from twisted.internet import reactor

    states, writer = States(), Writer()
    async with connector() as connect:
        site = SiteService(
            reactor,
            site_config(port),
            writer,
            states.report,
            resume=resume,
            jitter=lambda: 0.0,
            client_factory=connect.client,
            **kwargs,
        )
        site.startService()
        try:
            yield site, states, writer
        finally:
            await site.stopService()


def peak_rss_reset() -> bool:
    """Reset this process's peak RSS (VmHWM); False where Linux does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise LookupError(field)


@pytest.mark.deadline(120)
@pytest_twisted.ensureDeferred
async def test_a_50_mib_payload_is_kept_as_a_prefix_with_size_and_hash() -> None:
    """
    A 50 MiB PUBLISH arrives as its first DEAD_LETTER_KEEP bytes, its size
    and SHA-256, becomes a dead letter, and is acknowledged after the
    commit; the read buffer and the process's memory stay small meanwhile.
    """
    from twisted.internet import reactor

    size = 50 * 1024 * 1024
    header = publish_header(b"hostile/sensor/s1/data", size, qos=1, mid=7)
    broker = FakeBroker(after_suback=lambda c: c.stream(itertools.chain([header], pattern(size))))
    digest = hashlib.sha256()
    for chunk in pattern(size):
        digest.update(chunk)
    prefix = b"".join(itertools.islice(pattern(size), 1))[:DEAD_LETTER_KEEP]
    async with listening(broker) as port, running_site(port) as (site, _, writer):
        client: Any = site._core.client
        buffered: list[int] = []
        received = client._received

        def measured(data: bytes) -> None:
            received(data)
            buffered.append(len(client._buffer))

        client._received = measured
        measuring = peak_rss_reset()
        before = rss_kib("VmRSS")
        started = time.monotonic()
        await writer.next().addTimeout(60, reactor)
        elapsed = time.monotonic() - started
        growth = rss_kib("VmHWM") - before
        [(effects, listener, message)] = writer.queued
        assert (message.topic, message.mid, message.qos) == ("hostile/sensor/s1/data", 7, 1)
        assert message.payload == prefix and len(message.payload) == DEAD_LETTER_KEEP
        assert (message.size, message.sha256) == (size, digest.digest())
        dead = effects[-1]
        assert isinstance(dead, DeadLetter)
        assert (dead.size, dead.sha256) == (size, digest.digest())
        assert dead.reason == f"payload of {size} bytes is over the limit of {DEFAULT_MAX_PAYLOAD}"
        assert max(buffered) <= READ_SIZE + HEADER_ROOM
        if measuring:
            assert growth < 24 * 1024, f"peak RSS grew by {growth} KiB"
        print(f"\n50 MiB payload: {elapsed:.1f} s, peak RSS +{growth / 1024:.1f} MiB")
        assert broker.pubacks == []
        acked = broker.next_packet(PUBACK)
        listener.committed([message])
        body = await acked.addTimeout(5, reactor)
        assert body[:2] == b"\x00\x07"


@pytest_twisted.ensureDeferred
async def test_a_trickled_packet_closes_the_link() -> None:
    """
    A packet whose bytes come one every half second keeps the link busy but
    never completes: after 1.5 keepalives it is closed with a named error,
    and the connection, never proven, counts as a failed attempt.
    """
    from twisted.internet import reactor

    packet = publish_header(b"hostile/sensor/s1/data", 2000) + b"x" * 2000

    def trickle(connection: Any) -> None:
        connection.factory.silent = True  # a PINGRESP would land inside the packet
        connection.trickle(packet, 0.5, reactor)

    async with (
        listening(FakeBroker(after_suback=trickle)) as port,
        running_site(port) as (_, states, writer),
    ):
        connected = await states.until(lambda s: s.state == "connected", 5)
        at = time.monotonic()
        waiting = await states.until(lambda s: s.state == "waiting", 15)
        took = time.monotonic() - at
        assert waiting.last_error is not None
        assert waiting.last_error.startswith(f"timeout: packet of {len(packet)} bytes incomplete")
        assert waiting.retry_count == 1 and connected.retry_count == 0
        assert 1.5 * KEEPALIVE <= took <= 1.5 * KEEPALIVE + 2.5
        assert writer.queued == []
        print(f"\ntrickled packet closed after {took:.1f} s: {waiting.last_error}")


@pytest_twisted.ensureDeferred
async def test_topics_that_are_not_utf8_arrive_with_their_bytes() -> None:
    """
    Topics with invalid UTF-8 or a NUL reach processing as lone surrogates
    and a NUL, never U+FFFD, so that two of them cannot collide.
    """
    from twisted.internet import reactor

    raw = [b"a/\xff", b"a/\xfe", b"a/\x00b"]

    def send(connection: Any) -> None:
        for mid, topic in enumerate(raw, 1):
            connection.send(publish_header(topic, 2, mid=mid) + b"{}")

    messages: list[ReceivedMessage] = []
    three: Deferred[None] = Deferred()

    def received(message: ReceivedMessage) -> None:
        messages.append(message)
        if len(messages) == 3:
            three.callback(None)

    async with listening(FakeBroker(after_connack=send)) as port, connector() as connect:
        client = connect.client(
            site_config(port), received, lambda e: None, client_id="hostile-utf8"
        )
        await client.connect().addTimeout(5, reactor)
        await three.addTimeout(5, reactor)
        await client.disconnect()
    assert [m.topic for m in messages] == ["a/\udcff", "a/\udcfe", "a/\x00b"]
    assert [m.topic.encode("utf-8", "surrogateescape") for m in messages] == raw
    assert not any("\ufffd" in m.topic for m in messages)


@pytest_twisted.ensureDeferred
async def test_a_qos2_publish_closes_the_link() -> None:
    """
    A QoS 2 PUBLISH (we subscribe at 0 or 1) is a protocol error: the link
    closes at once, with no PUBREC and nothing kept by paho.
    """
    from twisted.internet import reactor

    lost: Deferred[ConnectFailed] = Deferred()
    send = lambda c: c.send(publish_header(b"hostile/x", 2, qos=2, mid=9) + b"{}")  # noqa: E731
    async with listening(FakeBroker(after_connack=send)) as port, connector() as connect:
        client = connect.client(
            site_config(port), lambda m: None, lost.callback, client_id="hostile-q2"
        )
        await client.connect().addTimeout(5, reactor)
        error = await lost.addTimeout(5, reactor)
    assert error.category == "protocol"
    assert "QoS 2" in error.detail
    assert client._client._in_messages == {}
    assert not client.connected


@pytest_twisted.ensureDeferred
async def test_garbage_after_connack_does_not_reset_the_retry_count() -> None:
    """
    A broker that accepts and then sends garbage: each connection ends
    before proving itself, so the retry count grows (1, then 2 after the
    5 s backoff) instead of resetting on every CONNACK.
    """
    garbage = lambda c: c.send(b"\xff\xff\xff\xff\xff\xff")  # noqa: E731
    async with (
        listening(FakeBroker(after_connack=garbage)) as port,
        running_site(port) as (site, states, _),
    ):
        first = await states.until(lambda s: s.state == "waiting", 5)
        second = await states.until(lambda s: s.state == "waiting", 10)
    assert (first.retry_count, second.retry_count) == (1, 2)
    assert second.last_error is not None and second.last_error.startswith("protocol: ")
    assert site.connects == 2


@pytest_twisted.ensureDeferred
async def test_garbage_on_the_last_retry_is_error() -> None:
    """With the retries used up, one more connection that never proves itself ends in error."""
    now = datetime.now(UTC)
    resume = ResumeState("disconnected", MAX_RETRIES - 1, now - timedelta(seconds=1), None, None)
    garbage = lambda c: c.send(b"\xff\xff\xff\xff\xff\xff")  # noqa: E731
    async with (
        listening(FakeBroker(after_connack=garbage)) as port,
        running_site(port, resume) as (site, states, _),
    ):
        error = await states.until(lambda s: s.state == "error", 5)
    assert error.retry_count == MAX_RETRIES
    assert site.connects == 1


@pytest_twisted.ensureDeferred
async def test_silence_after_connack_on_the_last_retry_is_error() -> None:
    """
    A broker that answers CONNECT and then nothing (no SUBACK, no PINGRESP)
    is dropped after two keepalives; never proven, that counts as a failure.
    """
    now = datetime.now(UTC)
    resume = ResumeState("disconnected", MAX_RETRIES - 1, now - timedelta(seconds=1), None, None)
    broker = FakeBroker(after_connack=lambda c: c.mute())
    async with listening(broker) as port, running_site(port, resume) as (_, states, _):
        await states.until(lambda s: s.state == "connected", 5)
        error = await states.until(lambda s: s.state == "error", 4 * KEEPALIVE)
    assert error.retry_count == MAX_RETRIES
    assert error.last_error is not None and error.last_error.startswith("timeout: no data")


@pytest_twisted.ensureDeferred
async def test_a_healthy_link_proves_itself() -> None:
    """
    A broker that grants the subscriptions and answers PINGREQ: the retry
    count stays until a packet comes PROVING_TIME after CONNACK, then resets.
    """
    now = datetime.now(UTC)
    resume = ResumeState("disconnected", 3, now - timedelta(seconds=1), "refused: x", None)
    async with (
        listening(FakeBroker()) as port,
        running_site(port, resume) as (_, states, _),
    ):
        connected = await states.until(lambda s: s.state == "connected", 5)
        at = time.monotonic()
        proven = await states.until(lambda s: s.retry_count == 0, PROVING_TIME + 2 * KEEPALIVE)
    assert connected.retry_count == 3
    assert proven.state == "connected"
    assert time.monotonic() - at >= PROVING_TIME - 0.5


@pytest_twisted.ensureDeferred
async def test_mqtt5_connect_announces_the_maximum_packet_size() -> None:
    """An MQTT 5 CONNECT carries Maximum Packet Size: the payload limit plus header room."""
    from twisted.internet import reactor

    broker = FakeBroker()
    async with listening(broker) as port, connector() as connect:
        client = connect.client(
            site_config(port, protocol="5"),
            lambda m: None,
            lambda e: None,
            client_id="hostile-v5",
            max_payload=100_000,
        )
        await client.connect().addTimeout(5, reactor)
        await client.disconnect()
    [properties] = broker.connect_properties
    assert properties[0x27] == 100_000 + HEADER_ROOM


@contextmanager
def black_hole() -> Iterator[int]:
    """
    A loopback port that drops every SYN: a listener with a backlog of 0
    whose queue is already full (it never accepts).
    """
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    fillers = []
    for _ in range(2):
        filler = socket.socket()
        filler.setblocking(False)
        filler.connect_ex(("127.0.0.1", port))
        fillers.append(filler)
    try:
        yield port
    finally:
        for s in [*fillers, listener]:
            s.close()


@pytest_twisted.ensureDeferred
async def test_connection_tests_do_not_starve_real_connects() -> None:
    """
    Sixty connection tests of a host that drops SYNs run a few at a time on
    threads of their own (the rest wait briefly or are refused as busy); a
    real site's connect meanwhile takes milliseconds, on the reactor's pool
    (the one name lookups use) as on the sites' own.
    """
    from twisted.internet import reactor

    sweep = KeepaliveSweep(reactor)
    with black_hole() as port:
        tests = ConnectionTests(reactor, sweep)
        tests.startService()
        sites = Connector(reactor, sweep)
        sites.startService()
        try:
            config = SiteConfig(site_id="connection-test", host="127.0.0.1", port=port)
            checks = [Deferred.fromCoroutine(tests.probe(config, within=2.0)) for _ in range(60)]
            assert tests.pool.max == PROBE_THREADS
            took = []
            for pool in (reactor.getThreadPool(), sites.pool):
                real = SiteConfig(site_id="real", host=BROKER_HOST, port=BROKER_PORT)
                client = MQTTClient(
                    reactor,
                    real,
                    lambda m: None,
                    lambda e: None,
                    "hostile-real",
                    threads=pool,
                    sweep=sweep,
                )
                started = time.monotonic()
                await client.connect().addTimeout(5, reactor)
                took.append(time.monotonic() - started)
                await client.disconnect()
            outcomes = await gatherResults(checks)
        finally:
            await sites.stopService()
            await tests.stopService()
    categories = Counter(o["category"] for o in outcomes)
    assert set(categories) <= {"busy", "timeout"}
    assert categories["busy"] >= 60 - PROBE_THREADS - PROBE_QUEUE
    assert categories["timeout"] >= PROBE_THREADS
    assert max(took) < 1.0, took
    times = ", ".join(f"{t * 1000:.0f} ms" for t in took)
    print(f"\nreal connects during 60 connection tests: {times}")


@pytest_twisted.ensureDeferred
async def test_mosquitto_honours_the_announced_maximum_packet_size() -> None:
    """
    A real MQTT 5 broker, told our Maximum Packet Size, does not send a
    larger message at all (it drops it); the next one arrives as usual.
    """
    from twisted.internet import reactor

    topic = f"hostile-v5/{uuid.uuid4().hex[:8]}"
    got: Deferred[ReceivedMessage] = Deferred()
    config = SiteConfig(site_id="v5", host=BROKER_HOST, port=BROKER_PORT, protocol="5")
    async with connector() as connect:
        client = connect.client(
            config,
            got.callback,
            lambda e: None,
            client_id=f"hostile-v5-{topic[-8:]}",
            persistent=False,
            max_payload=1000,
        )
        await client.connect().addTimeout(5, reactor)
        try:
            [granted] = await client.subscribe([(topic, 1)]).addTimeout(5, reactor)
            assert granted.granted
            await publish([(topic, b"x" * (1000 + HEADER_ROOM)), (topic, b"small")])
            message = await got.addTimeout(5, reactor)
        finally:
            await client.disconnect()
    assert message.payload == b"small"
