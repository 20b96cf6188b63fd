"""
The connection's own framing of what a broker sends: packets split across
reads at any byte, several per read, PUBLISH decoded here and everything
else handed to paho, and a pause that leaves the rest of a read for later.
"""

from __future__ import annotations

import hashlib
import random
import socket
import struct
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from bench.wire import remaining_length
from mqttsvc.config import DEAD_LETTER_KEEP, SiteConfig
from mqttsvc.mqtt.client import MQTTClient, _SocketDescriptor
from mqttsvc.mqtt.codec import HEADER_ROOM, ReceivedMessage
from mqttsvc.mqtt.connector import Connector
from mqttsvc.mqtt.keepalive import KeepaliveSweep


def publish(
    topic: str, payload: bytes, qos: int, retain: bool, mid: int, properties: bytes | None = None
) -> bytes:
    name = topic.encode()
    body = struct.pack("!H", len(name)) + name
    if qos:
        body += struct.pack("!H", mid)
    if properties is not None:  # MQTT 5
        body += remaining_length(len(properties)) + properties
    body += payload
    return bytes([0x30 | qos << 1 | int(retain)]) + remaining_length(len(body)) + body


PINGRESP = b"\xd0\x00"


def client(
    received: list[ReceivedMessage], protocol: str = "3.1.1", max_payload: int = 4 * 1024 * 1024
) -> MQTTClient:
    config = SiteConfig(site_id="frame", host="127.0.0.1", protocol=protocol)
    reactor = MemoryReactorClock()
    c = Connector(reactor, KeepaliveSweep(reactor)).client(
        config,
        received.append,
        lambda e: None,
        client_id="frame-test",
        max_payload=max_payload,
    )
    # paho's packet handlers need to believe there is a socket.
    c._client.socket = lambda: object()  # type: ignore[method-assign,assignment,return-value]
    return c


def feed(c: MQTTClient, data: bytes) -> None:
    c._received(data)


MESSAGES = [
    ("a/b", b"", 0, False, 0),
    ("site/gateway/gw-1/heartbeat", b'{"status":"ok"}', 1, False, 1),
    ("retained/one", b"r" * 127, 1, True, 2),
    ("longer/payload", b"x" * 128, 1, False, 3),
    ("ünïcode/tøpic", b"y" * 20_000, 0, False, 0),
    ("big", b"z" * 2_100_000, 1, False, 65535),
]


def expected(generation: int = 0) -> list[ReceivedMessage]:
    return [ReceivedMessage(t, p, q, r, m, generation) for t, p, q, r, m in MESSAGES]


def stream() -> bytes:
    return b"".join(publish(*m) for m in MESSAGES)


def test_one_byte_at_a_time() -> None:
    """Every header, length and body split at every possible byte."""
    received: list[ReceivedMessage] = []
    c = client(received)
    for byte in stream()[:-2_100_010]:
        feed(c, bytes([byte]))
    feed(c, stream()[-2_100_010:])
    assert received == expected()
    assert c._buffer == b""


def test_random_reads() -> None:
    """Reads of any size, many packets each or a part of one."""
    rng = random.Random(7)
    data = stream() * 3
    for _ in range(20):
        received: list[ReceivedMessage] = []
        c = client(received)
        pos = 0
        while pos < len(data):
            size = rng.choice([1, 2, 3, 50, 1000, 8192, 100_000])
            feed(c, data[pos : pos + size])
            pos += size
        assert received == expected() * 3
        assert c._buffer == b""


def test_other_packets_go_to_paho() -> None:
    """A PINGRESP among the PUBLISH packets is paho's: it clears the ping timer."""
    received: list[ReceivedMessage] = []
    c = client(received)
    c._client._ping_t = 123.0
    feed(c, publish("t", b"1", 1, False, 9) + PINGRESP + publish("t", b"2", 1, False, 10))
    assert [m.payload for m in received] == [b"1", b"2"]
    assert c._client._ping_t == 0
    assert c._client._in_packet["command"] == 0


def test_pause_keeps_the_rest_of_a_read() -> None:
    """Back-pressure stops mid-read; resuming handles what was already read."""
    received: list[ReceivedMessage] = []
    c = client(received)
    c._descriptor = object()  # type: ignore[assignment]

    def on_message(message: ReceivedMessage) -> None:
        received.append(message)
        if len(received) == 2:
            c.pause()

    c._on_message = on_message
    feed(c, stream())
    assert received == expected()[:2]
    assert c._buffer != b""
    c.resume()
    reactor: Any = c._reactor
    reactor.advance(0)
    assert received == expected()
    assert c._buffer == b""


def test_broken_remaining_length_closes_the_link() -> None:
    """A length of more than four bytes is a protocol error, not a hang."""
    received: list[ReceivedMessage] = []
    c = client(received)
    handled: list[Any] = []
    c._client._loop_rc_handle = handled.append  # type: ignore[method-assign,assignment]
    feed(c, b"\x30\xff\xff\xff\xff\x01")
    assert received == []
    assert len(handled) == 1
    assert c._buffer == b""


def test_mqtt5_properties_are_skipped() -> None:
    """MQTT 5 PUBLISH packets carry properties between the packet id and the payload."""
    received: list[ReceivedMessage] = []
    c = client(received, protocol="5")
    expiry = b"\x02\x00\x00\x00\x3c"  # Message Expiry Interval 60
    user = b"\x26\x00\x01k\x00\x01v"  # User Property k=v
    long_user = b"\x26\x00\x01k" + struct.pack("!H", 300) + b"v" * 300  # a 2-byte length
    data = (
        publish("a", b"no properties", 1, False, 1, b"")
        + publish("b", b"expiry", 1, True, 2, expiry)
        + publish("c", b"two", 0, False, 0, expiry + user)
        + publish("d", b"long", 1, False, 4, long_user)
    )
    for byte in data:
        feed(c, bytes([byte]))
    assert received == [
        ReceivedMessage("a", b"no properties", 1, False, 1, 0),
        ReceivedMessage("b", b"expiry", 1, True, 2, 0),
        ReceivedMessage("c", b"two", 0, False, 0, 0),
        ReceivedMessage("d", b"long", 1, False, 4, 0),
    ]


def test_broken_publish_packets_close_the_link() -> None:
    """A PUBLISH too short for its topic or its properties is a protocol error, not a crash."""
    for protocol, data in [
        ("3.1.1", b"\x30\x00"),
        ("3.1.1", b"\x30\x01\x00"),
        ("3.1.1", b"\x32\x04\x00\x05ab"),
        ("5", b"\x32\x06\x00\x01a\x00\x01\x09"),
    ]:
        received: list[ReceivedMessage] = []
        c = client(received, protocol=protocol)
        handled: list[Any] = []
        c._client._loop_rc_handle = handled.append  # type: ignore[method-assign,assignment]
        feed(c, data + publish("ok", b"after", 1, False, 1, b"" if protocol == "5" else None))
        assert received == []
        assert len(handled) == 1, data
        assert c._buffer == b""


def test_a_failure_while_reading_drops_the_connection_not_the_reader() -> None:
    """If handling what was read raises, the link is aborted (to reconnect), nothing escapes."""
    c = client([])
    aborted: list[Any] = []
    c.abort = aborted.append  # type: ignore[method-assign,assignment]

    def broken() -> None:
        raise ValueError("a bug")

    c._readable = broken  # type: ignore[method-assign]
    with socket.socket() as sock:
        _SocketDescriptor(c, sock).doRead()
    [reason] = aborted
    assert reason.category == "protocol"
    assert reason.detail == "internal error while reading: ValueError: a bug"


def test_a_payload_over_the_limit_is_read_without_holding_it() -> None:
    """
    A PUBLISH whose payload is over the limit arrives as its first
    DEAD_LETTER_KEEP bytes, its full size and SHA-256; the buffer never
    holds more than about the limit, and the packets around it are intact.
    """
    for protocol, properties in [("3.1.1", None), ("5", b"\x02\x00\x00\x00\x3c")]:
        received: list[ReceivedMessage] = []
        c = client(received, protocol=protocol, max_payload=100_000)
        payload = bytes(range(256)) * 2_000  # 512,000 bytes
        data = (
            publish("before", b"1", 1, False, 1, properties and b"")
            + publish("big", payload, 1, True, 2, properties)
            + publish("after", b"3", 0, False, 0, properties and b"")
        )
        largest = 0
        for pos in range(0, len(data), 8192):
            feed(c, data[pos : pos + 8192])
            largest = max(largest, len(c._buffer))
            if pos == 0:
                size = len(publish("big", payload, 1, True, 2, properties))
                assert c._partial_packet() == (size, 0.0)
        assert largest <= 8192
        first, big, after = received
        assert first == ReceivedMessage("before", b"1", 1, False, 1, 0)
        assert after == ReceivedMessage("after", b"3", 0, False, 0, 0)
        assert big == ReceivedMessage(
            "big",
            payload[:DEAD_LETTER_KEEP],
            1,
            True,
            2,
            0,
            len(payload),
            hashlib.sha256(payload).digest(),
        )
        assert c._buffer == b"" and c._oversized is None


def test_a_large_packet_under_the_limit_is_whole() -> None:
    """
    A packet longer than the limit only by its topic and properties has a
    payload within the limit: it arrives whole, with no hash, even a byte
    at a time.
    """
    received: list[ReceivedMessage] = []
    c = client(received, protocol="5", max_payload=1000)
    user = b"\x26\x00\x01k" + struct.pack("!H", 600) + b"v" * 600
    for byte in publish("t" * 500, b"p" * 1000, 1, False, 3, user):
        feed(c, bytes([byte]))
    assert received == [ReceivedMessage("t" * 500, b"p" * 1000, 1, False, 3, 0, 1000, None)]


def test_other_packets_over_the_bound_close_the_link_unread() -> None:
    """A SUBACK announcing 1 MiB is refused at its header, before its bytes are buffered."""
    c = client([])
    handled: list[Any] = []
    c._client._loop_rc_handle = handled.append  # type: ignore[method-assign,assignment]
    feed(c, b"\x90\x80\x80\x40\x00\x01")
    assert len(handled) == 1
    assert c._lost_reason is not None
    assert (
        c._lost_reason.detail
        == f"a packet of type 9 with 1048576 bytes (at most {HEADER_ROOM} allowed)"
    )
    assert c._buffer == b""


def test_a_qos2_publish_closes_the_link() -> None:
    """
    We subscribe at QoS 0 or 1, so a QoS 2 PUBLISH breaks the protocol: the
    link closes with a protocol error and paho keeps nothing of it.
    """
    for payload in (b"small", b"x" * 300_000):
        received: list[ReceivedMessage] = []
        c = client(received, max_payload=100_000)
        handled: list[Any] = []
        c._client._loop_rc_handle = handled.append  # type: ignore[method-assign,assignment]
        feed(c, publish("t", payload, 2, False, 5)[:9000])  # the large one: its first read
        assert c._buffer == b""
        assert received == []
        assert len(handled) == 1
        assert c._lost_reason is not None and c._lost_reason.category == "protocol"
        assert "QoS 2" in c._lost_reason.detail
        assert c._client._in_messages == {}


def test_topics_that_are_not_utf8_keep_their_bytes() -> None:
    """
    Invalid UTF-8 becomes lone surrogates (two such topics never collide,
    and the bytes come back); a NUL stays a NUL; valid UTF-8 is unchanged.
    """
    received: list[ReceivedMessage] = []
    c = client(received, max_payload=10)
    raw = [b"a/\xff", b"a/\xfe", b"a/\x00b", "ü/ø".encode()]
    for name in raw:
        packet = bytearray(publish("x" * len(name), b"p", 0, False, 0))
        packet[4 : 4 + len(name)] = name
        feed(c, bytes(packet))
    packet = bytearray(publish("x", b"y" * 100, 0, False, 0))  # over the limit
    packet[4:5] = b"\x80"
    feed(c, bytes(packet))
    topics = [m.topic for m in received]
    assert topics == ["a/\udcff", "a/\udcfe", "a/\x00b", "ü/ø", "\udc80"]
    assert [t.encode("utf-8", "surrogateescape") for t in topics] == [*raw, b"\x80"]


def test_a_packet_that_does_not_complete_closes_the_link() -> None:
    """
    A packet whose bytes trickle in is given 1.5 keepalives plus a second
    per MiB, however many bytes arrive meanwhile; then the link closes.
    """
    c = client([], max_payload=1000)
    reactor: Any = c._reactor
    aborted: list[Any] = []
    c.abort = aborted.append  # type: ignore[method-assign,assignment]
    c._connected = True
    packet = publish("t", b"z" * 50_000, 1, False, 1)
    feed(c, packet[:10])
    for second in range(89):
        reactor.advance(1)
        c._last_rx = reactor.seconds()
        feed(c, packet[10 + second : 11 + second])
        c.housekeeping()
    assert aborted == []
    reactor.advance(1.1)
    c._last_rx = reactor.seconds()
    c.housekeeping()
    [reason] = aborted
    assert (reason.category, reason.detail) == (
        "timeout",
        f"packet of {len(packet)} bytes incomplete after 90s",
    )


def test_heard_after_waits_for_a_whole_packet() -> None:
    """Bytes of an unfinished packet prove nothing; a whole packet after the time does."""
    c = client([])
    reactor: Any = c._reactor
    c._client._ping_t = 1.0
    heard = c.heard_after(reactor.seconds() + 10)
    reactor.advance(11)
    c._last_rx = reactor.seconds()
    feed(c, PINGRESP[:1])
    c.housekeeping()
    assert not heard.called
    feed(c, PINGRESP[1:])
    c.housekeeping()
    assert heard.called


def test_mqtt5_connect_announces_the_maximum_packet_size() -> None:
    """MQTT 5 brokers are told the largest packet we take: the payload limit plus room."""
    c = client([], protocol="5", max_payload=300_000)
    properties: Any = c._client._connect_properties
    assert properties.MaximumPacketSize == 300_000 + HEADER_ROOM
