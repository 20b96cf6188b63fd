"""
A scripted MQTT 3.1.1 peer for the behaviours a real Mosquitto will not
show on demand: refusing a subscription, or going silent after CONNACK.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.protocol import Factory, Protocol

CONNECT, SUBSCRIBE, PINGREQ, DISCONNECT = 1, 8, 12, 14


def _packet(kind: int, flags: int, body: bytes) -> bytes:
    length = len(body)
    encoded = bytearray()
    while True:
        byte, length = length % 128, length // 128
        encoded.append(byte | (0x80 if length else 0))
        if not length:
            break
    return bytes([kind << 4 | flags]) + bytes(encoded) + body


class _FakeBrokerProtocol(Protocol):
    factory: FakeBroker

    def __init__(self) -> None:
        self._buffer = b""

    def connectionMade(self) -> None:
        self.factory.connections.append(self)

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        while True:
            parsed = self._next_packet()
            if parsed is None:
                return
            self.factory.received.append(parsed[0])
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
        if kind == CONNECT:
            self.transport.write(_packet(2, 0, b"\x00\x00"))  # CONNACK, no session
        elif kind == SUBSCRIBE:
            mid = body[:2]
            topics = 0
            pos = 2
            while pos < len(body):
                size = int.from_bytes(body[pos : pos + 2], "big")
                pos += 2 + size + 1
                topics += 1
            codes = bytes([0x80 if self.factory.refuse_subscriptions else 0x01] * topics)
            self.transport.write(_packet(9, 0, mid + codes))
        elif kind == PINGREQ and not self.factory.silent:
            self.transport.write(_packet(13, 0, b""))
        elif kind == DISCONNECT:
            self.transport.loseConnection()


class FakeBroker(Factory):
    """
    Accepts every CONNECT; refuses every subscription when
    C{refuse_subscriptions}; ignores PINGREQ when C{silent}.
    """

    protocol = _FakeBrokerProtocol

    def __init__(self, refuse_subscriptions: bool = False, silent: bool = False) -> None:
        self.refuse_subscriptions = refuse_subscriptions
        self.silent = silent
        self.received: list[int] = []
        self.connections: list[Any] = []
