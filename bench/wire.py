"""
Just enough MQTT 3.1.1 on a plain socket to fill a broker fast: prime
persistent sessions and pipeline QoS 1 publishes without a client
library's per-message cost, so that producing the load never limits what
is measured.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterable


def remaining_length(n: int) -> bytes:
    """
    MQTT's remaining length: 7 bits a byte, low first, high bit for "more".
    """
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str | bytes) -> bytes:
    data = text.encode() if isinstance(text, str) else text
    return struct.pack("!H", len(data)) + data


def connect_packet(client_id: str, clean: bool, keepalive: int = 60) -> bytes:
    body = _string("MQTT") + bytes([4, 0x02 if clean else 0]) + struct.pack("!H", keepalive)
    body += _string(client_id)
    return b"\x10" + remaining_length(len(body)) + body


def publish_packet(topic: bytes, payload: bytes, mid: int) -> bytes:
    """
    A QoS 1 PUBLISH.
    """
    body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid) + payload
    return b"\x32" + remaining_length(len(body)) + body


def subscribe_packet(filters: Iterable[str], mid: int = 1) -> bytes:
    body = struct.pack("!H", mid) + b"".join(_string(f) + b"\x01" for f in filters)
    return b"\x82" + remaining_length(len(body)) + body


DISCONNECT = b"\xe0\x00"


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = bytearray()
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the broker closed the connection")
        data += chunk
    return bytes(data)


def read_packet(sock: socket.socket) -> tuple[int, bytes]:
    """
    The next packet's type byte and body.
    """
    kind = _read_exactly(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = _read_exactly(sock, 1)[0]
        length += (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return kind, _read_exactly(sock, length)


def open_session(port: int, client_id: str, clean: bool) -> socket.socket:
    """
    Connect and wait for an accepting CONNACK.
    """
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.sendall(connect_packet(client_id, clean))
    kind, body = read_packet(sock)
    if kind != 0x20 or body[1] != 0:
        raise ConnectionError(f"{client_id}: the broker refused the connection ({body!r})")
    return sock


def prime_session(port: int, client_id: str, filters: Iterable[str]) -> None:
    """
    Create a persistent session subscribed (QoS 1) to C{filters} and leave
    it, so that the broker queues what is published meanwhile.
    """
    sock = open_session(port, client_id, clean=False)
    try:
        sock.sendall(subscribe_packet(filters))
        kind, body = read_packet(sock)
        if kind != 0x90 or any(code >= 0x80 for code in body[2:]):
            raise ConnectionError(f"{client_id}: subscription refused ({body!r})")
        sock.sendall(DISCONNECT)
    finally:
        sock.close()


def count_queued(port: int, client_id: str, wait: float = 0.5) -> int:
    """
    How many messages the broker still holds for a persistent session:
    resume it, count what arrives within C{wait} seconds without acking,
    and leave it as it was.
    """
    sock = open_session(port, client_id, clean=False)
    sock.settimeout(0.05)
    count = 0
    deadline = time.monotonic() + wait
    try:
        while time.monotonic() < deadline:
            try:
                kind, _ = read_packet(sock)
            except TimeoutError:
                continue
            if kind & 0xF0 == 0x30:
                count += 1
        sock.sendall(DISCONNECT)
    finally:
        sock.close()
    return count


class Publisher:
    """
    One publishing connection that pipelines QoS 1 PUBLISH packets and
    counts the PUBACKs in a thread of its own.
    """

    #: Most unacknowledged publishes, well below the 65,535 packet ids.
    WINDOW = 20000

    def __init__(self, port: int, client_id: str) -> None:
        self._sock = open_session(port, client_id, clean=True)
        self._sock.settimeout(None)
        self.sent = 0
        self.acked = 0
        self._error: BaseException | None = None
        self._acks = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        sock = self._sock
        buffer = b""
        try:
            while True:
                chunk = sock.recv(65536)
                if not chunk:
                    return
                buffer += chunk
                # PUBACKs are 4 bytes each; nothing else comes our way.
                whole = len(buffer) // 4
                buffer = buffer[whole * 4 :]
                with self._acks:
                    self.acked += whole
                    self._acks.notify_all()
        except OSError as e:
            self._error = e
            with self._acks:
                self._acks.notify_all()

    def send(self, packets: list[bytes]) -> None:
        """
        Send already encoded publishes (see L{publish_packet}), waiting
        while the window is full.
        """
        with self._acks:
            while self.sent - self.acked > self.WINDOW and self._error is None:
                self._acks.wait(1.0)
        self._sock.sendall(b"".join(packets))
        self.sent += len(packets)

    def wait_acked(self, timeout: float) -> None:
        """
        Wait until every publish is acknowledged.

        @raise TimeoutError: if they are not within C{timeout} seconds.
        """
        deadline = time.monotonic() + timeout
        with self._acks:
            while self.acked < self.sent:
                left = deadline - time.monotonic()
                if left <= 0 or self._error is not None:
                    raise TimeoutError(
                        f"{self.sent - self.acked} of {self.sent} publishes unacknowledged"
                    )
                self._acks.wait(min(left, 1.0))

    def close(self) -> None:
        try:
            self._sock.sendall(DISCONNECT)
        finally:
            self._sock.close()


def publish_all(port: int, packets: list[bytes], timeout: float = 120.0) -> float:
    """
    Publish pre-encoded packets as fast as the broker takes them.

    @return: the seconds it took until every PUBACK arrived.
    """
    started = time.perf_counter()
    publisher = Publisher(port, f"bench-pub-{port}")
    try:
        for i in range(0, len(packets), 1000):
            publisher.send(packets[i : i + 1000])
        publisher.wait_acked(timeout)
    finally:
        publisher.close()
    return time.perf_counter() - started
