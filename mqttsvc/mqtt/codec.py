"""
The bytes of the MQTT packets mqttsvc reads and writes itself: the variable
byte integer, PUBLISH at QoS 0 and 1 (MQTT 3.1.1 and 5), a PUBLISH too large
to hold read as it arrives, and PUBACK.

Pure: no paho, no reactor, no Twisted; the connection (L{mqttsvc.mqtt.client})
calls these on the bytes it read.  Every other packet type is paho's to
decode.  The PUBLISH decoder runs once per message: it allocates nothing but
the message itself.
"""

from __future__ import annotations

import hashlib
import struct
from typing import NamedTuple

from mqttsvc.config import DEAD_LETTER_KEEP

#: The packet types (the high four bits of a fixed header's first byte)
#: mqttsvc handles itself.
PUBLISH = 0x30
PUBACK = 0x40

#: A PUBACK: packet type, remaining length 2, packet identifier; the same
#: four bytes in MQTT 3.1.1 and 5.
PUBACK_PACKET = struct.Struct("!BBH")

#: Room in a packet for all but a PUBLISH's payload: the fixed header, a
#: topic (at most 65,535 bytes), the packet id and MQTT 5 properties.  It is
#: also the most any other packet from a broker may hold (CONNACK, SUBACK,
#: PINGRESP... are a few bytes, or a reason string and user properties):
#: a larger one is a protocol error, refused before it is buffered.
HEADER_ROOM = 66 * 1024

#: Why a QoS 2 PUBLISH closes the link.
QOS2_PUBLISH = (
    "a PUBLISH at QoS 2 or 3, but every subscription asked for QoS 0 or 1 "
    "(the broker must downgrade to the subscription's QoS)"
)


class Malformed(Exception):
    """
    A packet breaks the protocol's encoding; the message says how.
    """


class ReceivedMessage(NamedTuple):
    """
    One PUBLISH received from a broker.

    A named tuple rather than an attrs class: one is made per message, and
    this costs a fifth as much.

    @ivar topic: decoded with C{surrogateescape}: bytes that are not UTF-8
        become lone surrogates (U+DC80..U+DCFF), so two different topics
        never decode alike; C{topic.encode("utf-8", "surrogateescape")}
        gives the broker's bytes back.  A NUL is kept as it came.
    @ivar generation: which connection of this client carried it; an
        acknowledgement for an older generation is dropped because its
        packet identifier means nothing on a new connection.
    @ivar size: the payload's full length in bytes when the connection read
        the packet without holding it (one longer than the payload limit);
        if the payload itself is over the limit, C{payload} is only its
        first L{DEAD_LETTER_KEEP} bytes.  -1 (the default) means
        C{len(payload)}.
    @ivar sha256: the SHA-256 digest of the full payload when C{payload} is
        only its beginning (so C{size > len(payload)}); None when nothing
        was cut.
    """

    topic: str
    payload: bytes
    qos: int
    retain: bool
    mid: int
    generation: int
    size: int = -1
    sha256: bytes | None = None


def varint(buffer: bytearray, i: int, limit: int) -> tuple[int, int] | None:
    """
    The MQTT variable byte integer (1 to 4 bytes, 7 bits each) at
    C{buffer[i]}: its value and the index after it, or None when it runs
    on past C{limit}.

    @raise Malformed: when it is longer than four bytes.
    """
    value = 0
    shift = 0
    while i < limit:
        byte = buffer[i]
        i += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, i
        shift += 7
        if shift > 21:
            raise Malformed("longer than four bytes")
    return None


def decode_publish(
    buffer: bytearray, command: int, i: int, end: int, v5: bool, generation: int
) -> ReceivedMessage:
    """
    The PUBLISH at QoS 0 or 1 whose fixed header's first byte is C{command}
    and whose variable header and payload are C{buffer[i:end]}: topic
    length, topic, [packet id], [MQTT 5 properties], payload.  MQTT 5
    properties are skipped: none of them matter to us (we allow no topic
    aliases, so the topic is always there).

    @raise Malformed: when the packet is shorter than what it announces.
    """
    if end - i < 2:
        raise Malformed("PUBLISH without a topic")
    topic_end = i + 2 + ((buffer[i] << 8) | buffer[i + 1])
    qos = (command >> 1) & 0x03
    start = topic_end + 2 if qos else topic_end
    if start > end:
        raise Malformed("PUBLISH shorter than its topic")
    mid = (buffer[topic_end] << 8) | buffer[topic_end + 1] if qos else 0
    if v5:
        try:
            found = varint(buffer, start, end)
        except Malformed:
            found = None
        if found is None:
            raise Malformed("PUBLISH with broken properties")
        properties, start = found
        start += properties
        if start > end:
            raise Malformed("PUBLISH shorter than its properties")
    return ReceivedMessage(
        buffer[i + 2 : topic_end].decode("utf-8", "surrogateescape"),
        bytes(buffer[start:end]),
        qos,
        bool(command & 0x01),
        mid,
        generation,
    )


def encode_pubacks(mids: list[int]) -> bytes:
    """
    The PUBACKs of these packet identifiers, one after the other (one
    write for a batch).
    """
    pack = PUBACK_PACKET.pack
    return b"".join([pack(PUBACK, 2, mid) for mid in mids])


class OversizedPublish:
    """
    A PUBLISH too large to hold, read as it arrives: its MQTT 5 properties
    are skipped, the first C{keep} bytes of its payload are kept, and every
    payload byte goes through SHA-256 when the payload is cut.

    @ivar total: the whole packet's size in bytes (for the timeout message).
    @ivar started: when its first byte arrived (reactor seconds).
    """

    def __init__(
        self,
        topic: str,
        qos: int,
        retain: bool,
        mid: int,
        skip: int,
        size: int,
        keep: int,
        total: int,
        started: float,
    ) -> None:
        self.topic = topic
        self.qos = qos
        self.retain = retain
        self.mid = mid
        self.skip = skip
        self.left = size
        self.size = size
        self.keep = keep
        self.kept = bytearray()
        self.digest = hashlib.sha256() if size > keep else None
        self.total = total
        self.started = started

    @property
    def remaining(self) -> int:
        return self.skip + self.left

    def feed(self, data: bytes) -> None:
        """
        Take the next bytes of the packet (no more than L{remaining}).
        """
        if self.skip:
            skipped = min(self.skip, len(data))
            self.skip -= skipped
            data = data[skipped:]
        room = self.keep - len(self.kept)
        if room > 0:
            self.kept += data[:room]
        if self.digest is not None:
            self.digest.update(data)
        self.left -= len(data)

    def message(self, generation: int) -> ReceivedMessage:
        return ReceivedMessage(
            self.topic,
            bytes(self.kept),
            self.qos,
            self.retain,
            self.mid,
            generation,
            self.size,
            self.digest.digest() if self.digest is not None else None,
        )


def begin_oversized(
    buffer: bytearray,
    pos: int,
    i: int,
    length: int,
    v5: bool,
    max_payload: int,
    started: float,
) -> OversizedPublish | None:
    """
    The packet at C{buffer[pos]}, whose variable header starts at
    C{buffer[i]}, announces C{length} bytes, more than may be held: start
    reading it without holding it, fed with what the buffer already has
    (up to C{min(len(buffer), i + length)}).  Only a PUBLISH at QoS 0 or 1
    may be that large; its payload is kept whole if it is within
    C{max_payload}, else only its first L{DEAD_LETTER_KEEP} bytes.

    @return: the packet being read, or None when its header is still
        incomplete.
    @raise Malformed: for any other packet, or a broken PUBLISH.
    """
    command = buffer[pos]
    if command & 0xF0 != PUBLISH:
        raise Malformed(
            f"a packet of type {command >> 4} with {length} bytes (at most {HEADER_ROOM} allowed)"
        )
    qos = (command >> 1) & 0x03
    if qos > 1:
        raise Malformed(QOS2_PUBLISH)
    size = len(buffer)
    end = i + length
    if i + 2 > size:
        return None
    topic_end = i + 2 + ((buffer[i] << 8) | buffer[i + 1])
    start = topic_end + 2 if qos else topic_end
    if start > end:
        raise Malformed("PUBLISH shorter than its topic")
    if start > size:
        return None
    properties = 0
    if v5:
        try:
            found = varint(buffer, start, min(size, end))
        except Malformed:
            found = None
        if found is None:
            if min(size, end) - start < 4 and size < end:
                return None  # the properties' length is still to come
            raise Malformed("PUBLISH with broken properties")
        properties, start = found
    payload = end - start - properties
    if payload < 0:
        raise Malformed("PUBLISH shorter than its properties")
    stream = OversizedPublish(
        buffer[i + 2 : topic_end].decode("utf-8", "surrogateescape"),
        qos,
        bool(command & 0x01),
        (buffer[topic_end] << 8) | buffer[topic_end + 1] if qos else 0,
        properties,
        payload,
        payload if payload <= max_payload else DEAD_LETTER_KEEP,
        end - pos,
        started,
    )
    stream.feed(bytes(buffer[start : min(size, end)]))
    return stream


def packet_size(buffer: bytearray) -> int:
    """
    The size of the packet that begins C{buffer}: announced by its header,
    or what the buffer holds while that header is incomplete or broken.
    """
    try:
        header = varint(buffer, 1, len(buffer))
    except Malformed:
        header = None
    return len(buffer) if header is None else header[0] + header[1]
