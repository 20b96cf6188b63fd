"""
A real Server-Sent Events client for tests: a plain TCP connection, an
HTTP/1.0 request (so the stream comes without chunked encoding), and a
parser of the event stream format.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure


@attrs.frozen
class Message:
    id: str | None
    data: str | None
    comment: bool = False

    def json(self) -> Any:
        assert self.data is not None
        return json.loads(self.data)


class SSEClient(Protocol):
    """
    Collects the response status, headers and every message (comments
    included) of one C{GET /events}.
    """

    def __init__(self, path: str, headers: dict[str, str]) -> None:
        self._request = f"GET {path} HTTP/1.0\r\n" + "".join(
            f"{k}: {v}\r\n" for k, v in headers.items()
        )
        self._buffer = b""
        self._in_body = False
        self.status: int | None = None
        self.headers: dict[str, str] = {}
        self.messages: list[Message] = []
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[Any, Deferred[None]]] = []

    def connectionMade(self) -> None:
        assert self.transport is not None
        self.transport.write(self._request.encode() + b"\r\n")

    def dataReceived(self, data: bytes) -> None:
        self._buffer += data
        if not self._in_body:
            if b"\r\n\r\n" not in self._buffer:
                return
            head, self._buffer = self._buffer.split(b"\r\n\r\n", 1)
            lines = head.decode().split("\r\n")
            self.status = int(lines[0].split()[1])
            for line in lines[1:]:
                name, _, value = line.partition(":")
                self.headers[name.strip().lower()] = value.strip()
            self._in_body = True
        while b"\n\n" in self._buffer:
            block, self._buffer = self._buffer.split(b"\n\n", 1)
            self._parse(block.decode())
        self._check()

    def _parse(self, block: str) -> None:
        id_: str | None = None
        data: list[str] = []
        comment = False
        for line in block.split("\n"):
            if line.startswith(":"):
                comment = True
                continue
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "id":
                id_ = value
            elif field == "data":
                data.append(value)
        self.messages.append(Message(id_, "\n".join(data) if data else None, comment))

    def connectionLost(self, reason: Failure | None = None) -> None:
        self.lost.callback(None)
        self._check()

    @property
    def events(self) -> list[Any]:
        """
        The messages that carry an event, as JSON.
        """
        return [m.json() for m in self.messages if m.data is not None]

    @property
    def last_id(self) -> str | None:
        ids = [m.id for m in self.messages if m.id is not None]
        return ids[-1] if ids else None

    def until(self, check: Any, timeout: float = 10.0) -> Deferred[None]:
        """
        Fires once C{check(self)} is true (or the connection is gone).
        """
        from twisted.internet import reactor

        waiter: Deferred[None] = Deferred()
        self._waiting.append((check, waiter))
        self._check()
        waiter.addTimeout(timeout, reactor)
        return waiter

    def _check(self) -> None:
        for entry in list(self._waiting):
            check, waiter = entry
            if waiter.called:
                self._waiting.remove(entry)
            elif self.lost.called or check(self):
                self._waiting.remove(entry)
                waiter.callback(None)

    def close(self) -> Deferred[None]:
        assert self.transport is not None
        self.transport.loseConnection()
        return self.lost


async def open_stream(
    port: int,
    *,
    headers: dict[str, str] | None = None,
    **params: str,
) -> SSEClient:
    """
    Connect to C{/events} on 127.0.0.1:C{port} and wait for the response
    headers.
    """
    from twisted.internet import reactor

    path = "/events" + (f"?{urlencode(params)}" if params else "")
    client = SSEClient(path, headers or {})
    await connectProtocol(TCP4ClientEndpoint(reactor, "127.0.0.1", port), client)
    await client.until(lambda c: c.status is not None)
    return client
