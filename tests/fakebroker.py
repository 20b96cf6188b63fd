"""
A scripted MQTT peer (3.1.1 and 5) for the behaviours a real Mosquitto will
not show on demand: refusing a subscription, going silent after CONNACK,
and the hostile broker's repertoire (a script run once the client has
subscribed, or at once after CONNACK): huge packets, packets that never
end, QoS 2, topics that are not UTF-8, garbage.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IPullProducer
from twisted.internet.protocol import Factory, Protocol
from twisted.python.failure import Failure
from zope.interface import implementer

from bench.wire import remaining_length

CONNECT, PUBACK, PUBREC, SUBSCRIBE, PINGREQ, DISCONNECT = 1, 4, 5, 8, 12, 14


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([kind << 4 | flags]) + remaining_length(len(body)) + body


def publish_header(
    topic: bytes, payload_size: int, qos: int = 1, mid: int = 1, v5: bool = False
) -> bytes:
    """
    A PUBLISH up to its payload: fixed header, topic, packet id and (MQTT 5)
    empty properties; C{payload_size} bytes must follow.
    """
    body = len(topic).to_bytes(2, "big") + topic
    if qos:
        body += mid.to_bytes(2, "big")
    if v5:
        body += b"\x00"
    return bytes([0x30 | qos << 1]) + remaining_length(len(body) + payload_size) + body


def pattern(size: int, chunk: int = 64 * 1024) -> Iterator[bytes]:
    """A payload of C{size} bytes, made a chunk at a time (never held whole)."""
    block = bytes(range(256)) * (chunk // 256)
    while size > 0:
        yield block[:size]
        size -= len(block)


@implementer(IPullProducer)
class _Chunks:
    """Writes an iterator of chunks as the transport drains."""

    def __init__(self, transport: Any, chunks: Iterator[bytes]) -> None:
        self._transport = transport
        self._chunks = chunks

    def resumeProducing(self) -> None:
        chunk = next(self._chunks, None)
        if chunk is None:
            self._transport.unregisterProducer()
        else:
            self._transport.write(chunk)

    def stopProducing(self) -> None:
        self._chunks = iter(())


class _FakeBrokerProtocol(Protocol):
    factory: FakeBroker

    def __init__(self) -> None:
        self._buffer = b""
        self.v5 = False
        self.muted = False
        self.lost: Deferred[None] = Deferred()
        self._timer: IDelayedCall | None = None

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def connectionLost(self, reason: Failure | None = None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self.lost.callback(None)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            parsed = self._next_packet()
            if parsed is None:
                return
            self.factory.packet_received(*parsed)
            self._answer(*parsed)

    def _next_packet(self) -> tuple[int, bytes] | None:
        buf = self._buffer
        if len(buf) < 2:
            return None
        length, multiplier, i = 0, 1, 1
        while True:
            if i >= len(buf):
                return None
            length += (buf[i] & 0x7F) * multiplier
            multiplier *= 128
            i += 1
            if not buf[i - 1] & 0x80:
                break
        if len(buf) < i + length:
            return None
        kind, body = buf[0] >> 4, buf[i : i + length]
        self._buffer = buf[i + length :]
        return kind, body

    def _answer(self, kind: int, body: bytes) -> None:
        factory = self.factory
        if self.muted:
            return
        if kind == CONNECT:
            self.v5 = body[6] == 5
            if self.v5:
                factory.connect_properties.append(_properties(body[10:]))
            self.transport.write(_packet(2, 0, b"\x00\x00\x00" if self.v5 else b"\x00\x00"))
            if factory.after_connack is not None:
                factory.after_connack(self)
        elif kind == SUBSCRIBE:
            mid = body[:2]
            pos = 2
            if self.v5:
                pos += 1 + body[2]  # short properties only
            topics = 0
            while pos < len(body):
                size = int.from_bytes(body[pos : pos + 2], "big")
                pos += 2 + size + 1
                topics += 1
            codes = bytes([0x80 if factory.refuse_subscriptions else 0x01] * topics)
            self.transport.write(_packet(9, 0, mid + (b"\x00" if self.v5 else b"") + codes))
            if factory.after_suback is not None:
                factory.after_suback(self)
        elif kind == PINGREQ and not factory.silent:
            self.transport.write(_packet(13, 0, b""))
        elif kind == DISCONNECT:
            self.transport.loseConnection()

    # What a script may do.

    def mute(self) -> None:
        """Answer nothing from now on."""
        self.muted = True

    def send(self, data: bytes) -> None:
        self.transport.write(data)

    def stream(self, chunks: Iterator[bytes]) -> None:
        """Write the chunks one at a time as the client reads them."""
        self.transport.registerProducer(_Chunks(self.transport, chunks), False)

    def trickle(self, data: bytes, interval: float, clock: Any) -> None:
        """Write C{data} a byte every C{interval} seconds."""
        if not data or not self.transport.connected:
            return
        self.transport.write(data[:1])
        self._timer = clock.callLater(interval, self.trickle, data[1:], interval, clock)


def _properties(body: bytes) -> dict[int, int]:
    """The four-byte-integer properties of a CONNECT's MQTT 5 properties."""
    length = body[0]  # the tests' CONNECT properties are shorter than 128 bytes
    found: dict[int, int] = {}
    pos = 1
    sizes = {0x11: 4, 0x21: 2, 0x22: 2, 0x27: 4, 0x17: 1, 0x19: 1}
    while pos < 1 + length:
        ident = body[pos]
        size = sizes[ident]
        found[ident] = int.from_bytes(body[pos + 1 : pos + 1 + size], "big")
        pos += 1 + size
    return found


Script = Callable[[_FakeBrokerProtocol], None]


class FakeBroker(Factory):
    """
    Accepts every CONNECT; refuses every subscription when
    C{refuse_subscriptions}; ignores PINGREQ when C{silent}; runs
    C{after_connack} / C{after_suback} on the connection right after
    sending those.

    @ivar received: the type of every packet received, in order.
    @ivar pubacks: the packet id of every PUBACK received.
    @ivar connect_properties: per MQTT 5 CONNECT, its integer properties
        by identifier.
    """

    protocol = _FakeBrokerProtocol

    def __init__(
        self,
        refuse_subscriptions: bool = False,
        silent: bool = False,
        after_connack: Script | None = None,
        after_suback: Script | None = None,
    ) -> None:
        self.refuse_subscriptions = refuse_subscriptions
        self.silent = silent
        self.after_connack = after_connack
        self.after_suback = after_suback
        self.received: list[int] = []
        self.pubacks: list[int] = []
        self.connect_properties: list[dict[int, int]] = []
        self.connections: list[Any] = []
        self._waiting: list[tuple[int, Deferred[bytes]]] = []

    def packet_received(self, kind: int, body: bytes) -> None:
        self.received.append(kind)
        if kind == PUBACK:
            self.pubacks.append(int.from_bytes(body[:2], "big"))
        waiting, self._waiting = self._waiting, []
        for wanted, d in waiting:
            if wanted == kind:
                d.callback(body)
            else:
                self._waiting.append((wanted, d))

    def next_packet(self, kind: int) -> Deferred[bytes]:
        """Fires with the body of the next packet of this type received."""
        d: Deferred[bytes] = Deferred()
        self._waiting.append((kind, d))
        return d
