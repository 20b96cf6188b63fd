"""
The codec on its own, without a connection: the variable byte integer,
PUBLISH at QoS 0 and 1 in MQTT 3.1.1 and 5, the oversized PUBLISH read as it
arrives, and PUBACK.
"""

from __future__ import annotations

import hashlib
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from bench.wire import remaining_length
from mqttsvc.config import DEAD_LETTER_KEEP
from mqttsvc.mqtt.codec import (
    PUBACK_PACKET,
    Malformed,
    ReceivedMessage,
    begin_oversized,
    decode_publish,
    encode_pubacks,
    packet_size,
    varint,
)


def publish(
    topic: bytes, payload: bytes, qos: int, mid: int = 0, properties: bytes | None = None
) -> bytearray:
    body = struct.pack("!H", len(topic)) + topic
    if qos:
        body += struct.pack("!H", mid)
    if properties is not None:
        body += remaining_length(len(properties)) + properties
    body += payload
    return bytearray(bytes([0x30 | qos << 1]) + remaining_length(len(body)) + body)


def decode(packet: bytearray, v5: bool = False) -> ReceivedMessage:
    header = varint(packet, 1, len(packet))
    assert header is not None
    length, i = header
    return decode_publish(packet, packet[0], i, i + length, v5, 7)


@given(st.integers(min_value=0, max_value=268_435_455))
def test_varint_reads_what_mqtt_writes(value: int) -> None:
    """Every value MQTT can encode comes back, with the index after it."""
    encoded = bytearray(b"x" + remaining_length(value) + b"rest")
    assert varint(encoded, 1, len(encoded)) == (value, 1 + len(remaining_length(value)))


def test_varint_incomplete_and_too_long() -> None:
    """A varint cut by the limit is None; a fifth byte is malformed."""
    assert varint(bytearray(b"\x80\x80"), 0, 2) is None
    with pytest.raises(Malformed, match="longer than four bytes"):
        varint(bytearray(b"\x80\x80\x80\x80\x01"), 0, 5)


@pytest.mark.parametrize("v5", [False, True])
@pytest.mark.parametrize("qos", [0, 1])
def test_a_publish_decodes(v5: bool, qos: int) -> None:
    """Topic (bytes that are not UTF-8 kept), payload, QoS, packet id; v5 properties skipped."""
    packet = publish(b"a/\xff", b"payload", qos, mid=513, properties=b"\x01\x01" if v5 else None)
    assert decode(packet, v5) == ReceivedMessage("a/\udcff", b"payload", qos, False, qos and 513, 7)


@pytest.mark.parametrize(
    ("packet", "v5", "why"),
    [
        (bytearray(b"\x30\x01\x00"), False, "PUBLISH without a topic"),
        (bytearray(b"\x30\x03\x00\x05a"), False, "PUBLISH shorter than its topic"),
        (bytearray(b"\x30\x04\x00\x01a\xff"), True, "PUBLISH with broken properties"),
        (bytearray(b"\x30\x04\x00\x01a\x05"), True, "PUBLISH shorter than its properties"),
    ],
)
def test_a_broken_publish_is_malformed(packet: bytearray, v5: bool, why: str) -> None:
    with pytest.raises(Malformed) as raised:
        decode(packet, v5)
    assert str(raised.value) == why


def test_pubacks_are_four_bytes_each() -> None:
    assert encode_pubacks([1, 65535]) == b"\x40\x02\x00\x01\x40\x02\xff\xff"
    assert PUBACK_PACKET.size == 4


def test_an_oversized_publish_keeps_a_prefix_and_hashes_the_rest() -> None:
    """Fed in pieces, an over-limit payload keeps DEAD_LETTER_KEEP bytes, its size and digest."""
    payload = bytes(range(256)) * 400
    packet = publish(b"big", payload, 1, mid=9)
    header = varint(packet, 1, len(packet))
    assert header is not None
    length, i = header
    head = packet[: i + 100]
    stream = begin_oversized(head, 0, i, length, False, 1000, 5.0)
    assert stream is not None and stream.total == len(packet) and stream.started == 5.0
    rest = bytes(packet[i + 100 :])
    stream.feed(rest[:70_000])
    stream.feed(rest[70_000:])
    assert stream.remaining == 0
    message = stream.message(2)
    assert message.payload == payload[:DEAD_LETTER_KEEP]
    assert (message.size, message.sha256) == (len(payload), hashlib.sha256(payload).digest())
    assert (message.topic, message.qos, message.mid, message.generation) == ("big", 1, 9, 2)


def test_only_a_publish_may_be_oversized() -> None:
    """A large packet of another type is refused; a header still to come is None."""
    with pytest.raises(Malformed, match="a packet of type 9 with 100000 bytes"):
        begin_oversized(bytearray(b"\x90\xa0\x8d\x06"), 0, 4, 100_000, False, 10, 0.0)
    assert (
        begin_oversized(bytearray(b"\x32\xa0\x8d\x06\x00"), 0, 4, 100_000, False, 10, 0.0) is None
    )


def test_packet_size_while_incomplete() -> None:
    assert packet_size(bytearray(b"\x30\x80")) == 2
    assert packet_size(bytearray(b"\x30\x05ab")) == 7
