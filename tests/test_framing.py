"""
The transport's own framing of what a broker sends: packets split across
reads at any byte, several per read, PUBLISH decoded here and everything
else handed to paho, and a pause that leaves the rest of a read for later.
"""

from __future__ import annotations

import random
import socket
import struct
from typing import Any

from twisted.internet.testing import MemoryReactorClock

from bench.wire import remaining_length
from mqttsvc.config import SiteConfig
from mqttsvc.transport import MQTTClient, ReceivedMessage, _SocketDescriptor


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


def client(received: list[ReceivedMessage], protocol: str = "3.1.1") -> MQTTClient:
    config = SiteConfig(site_id="frame", host="127.0.0.1", protocol=protocol)
    c = MQTTClient(MemoryReactorClock(), config, received.append, lambda e: None, "frame-test")
    # paho's packet handlers need to believe there is a socket.
    c._client.socket = lambda: object()  # type: ignore[method-assign,assignment,return-value]
    return c


def feed(c: MQTTClient, data: bytes) -> None:
    c._buffer += data
    c._frame()


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
    c._client._loop_rc_handle = handled.append  # type: ignore[method-assign]
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
        c._client._loop_rc_handle = handled.append  # type: ignore[method-assign]
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
