"""
The HTTP server around L{mqttsvc.control.web}: what one connection may cost before
any resource sees its request.

twisted.web alone spools a request body over 100 kB to a temporary file as
it arrives (issue 13 measured 300 MiB spooled in 5 s for one unauthenticated
C{Content-Length: 10^12}), accepts as many connections as the process has
descriptors (997 idle sockets starved the brokers and the database of them),
and restarts its idle timeout on every byte, so a client sending one byte a
minute keeps its connection for ever.  Here, instead:

 - a body is kept in memory and refused with 413, the connection dropped,
   as soon as its declared length or the bytes received pass C{max_body}:
   before any resource, so before authentication is looked at.  The body of
   any other method than POST is counted against the limit but not kept;
 - a connection has C{request_timeout} seconds to send a complete request,
   counted from when it opens or its previous response was handed to the
   network, whatever it trickles meanwhile; then it is closed, gracefully
   (it may still be reading that response), and cut as long again later;
 - at most C{max_connections} connections are open at once; one more is
   answered 503 and closed, so the process's remaining descriptors stay
   for brokers and the database.

This module is the one place that leans on twisted.web's channel internals
(the L{HTTPChannel} hooks and its C{_command}); C{tests/test_http_abuse.py}
checks them against a real listener.
"""

from __future__ import annotations

import json
import resource
from io import BytesIO
from typing import Any, cast

import attrs
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime, ITCPTransport
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.iweb import IAccessLogFormatter
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from mqttsvc.control.rpc.dispatcher import INVALID_REQUEST, RPCError

log = Logger()

#: The largest request body accepted, in bytes.
MAX_BODY = 1024 * 1024

#: Seconds a connection has to send a whole request (line, headers, body).
REQUEST_TIMEOUT = 30.0

#: The most HTTP connections served at once, whatever the descriptor limit.
MAX_CONNECTIONS = 256

#: The fewest HTTP connections served at once, however low the limit.
MIN_CONNECTIONS = 16

#: Seconds a client refused for lack of room is told to wait (Retry-After).
RETRY_AFTER = 5

#: Seconds between two log lines about connections refused over the cap.
SHED_LOG_INTERVAL = 60.0


def descriptor_limit() -> int:
    """
    The process's (soft) limit of open file descriptors, RLIMIT_NOFILE.
    """
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections(descriptors: int) -> int:
    """
    The connection cap when none is configured: a quarter of the
    descriptors, from L{MIN_CONNECTIONS} to L{MAX_CONNECTIONS}, so that at
    least three quarters stay for brokers, the database and log files.
    """
    return max(MIN_CONNECTIONS, min(MAX_CONNECTIONS, descriptors // 4))


def body_too_large(limit: int) -> dict[str, Any]:
    """
    The JSON-RPC error response for a body over C{limit} bytes (the
    method cannot run, so there is no id).
    """
    error = RPCError(
        INVALID_REQUEST,
        f"Invalid Request: the body is larger than {limit} bytes",
        {"limit": limit},
    )
    return {"jsonrpc": "2.0", "error": error.as_json(), "id": None}


def _raw_response(status: bytes, body: dict[str, Any], *headers: bytes) -> bytes:
    """
    A whole response written straight to the transport, for refusals made
    before a request object can answer (the channel is closed after it).
    """
    content = json.dumps(body, separators=(",", ":")).encode()
    head = [
        b"HTTP/1.1 " + status,
        b"Content-Type: application/json",
        b"Content-Length: %d" % len(content),
        b"Connection: close",
        *headers,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + content


@attrs.frozen
class Limits:
    """
    What one HTTP connection may cost.
    """

    max_body: int = MAX_BODY
    request_timeout: float = REQUEST_TIMEOUT
    max_connections: int = MAX_CONNECTIONS


class BoundedRequest(Request):
    """
    A request whose body is held in memory, never more of it than its
    channel's limit, and never a byte for another method than POST
    (twisted.web would spool one over 100 kB to a temporary file).
    """

    channel: BoundedChannel
    _body: BytesIO

    def gotLength(self, length: int | None) -> None:
        self.content = self._body = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        if self.channel.take_body(len(data)):
            self._body.write(data)

    def requestReceived(self, command: bytes, path: bytes, version: bytes) -> None:
        # The rest of a refused body may complete the request in the same
        # read; its connection is closing and nothing of it may run.
        if not self.channel.body_refused:
            super().requestReceived(command, path, version)


class BoundedChannel(HTTPChannel):
    """
    An HTTP/1.1 connection with a body limit and a deadline for each
    request; L{BoundedSite} builds one per connection.
    """

    def __init__(self, site: BoundedSite, limits: Limits, clock: IReactorTime) -> None:
        super().__init__()
        self._site = site
        self._limits = limits
        self._clock = clock
        self._deadline: IDelayedCall | None = None
        self._body_received = 0
        self._keep_body = False
        self.body_refused = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self._site.opened(self)
        self._await_request()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        self._cancel_deadline()
        super().connectionLost(reason)
        self._site.closed(self)

    def allHeadersReceived(self) -> None:
        self._body_received = 0
        # Only JSON-RPC (POST) reads a body; any other is counted, not kept.
        self._keep_body = getattr(self, "_command", b"POST") == b"POST"
        if self.length is not None and self.length > self._limits.max_body:
            # Refused on the declared length alone, before a byte of the
            # body is read (and before "100 Continue" invites it).
            self._refuse_body(self.length)
            return
        super().allHeadersReceived()

    def take_body(self, size: int) -> bool:
        """
        Count C{size} more bytes of the current request's body; whether to
        keep them.  Over the limit, the request is refused.
        """
        if self.body_refused:
            return False
        self._body_received += size
        if self._body_received > self._limits.max_body:
            self._refuse_body(self._body_received)
            return False
        return self._keep_body

    def _refuse_body(self, size: int) -> None:
        self.body_refused = True
        self._site.refused["body"] += 1
        log.info(
            "refused a request body of {size} bytes or more from {peer}: the limit is {limit}",
            size=size,
            peer=_peer(self),
            limit=self._limits.max_body,
        )
        _transport(self).write(self._site.too_large)
        self.loseConnection()

    def allContentReceived(self) -> None:
        self._cancel_deadline()
        super().allContentReceived()

    def requestDone(self, request: Request) -> None:
        # Before handing on: the next pipelined request may be parsed (and
        # complete) within it.  A connection that closes cancels the timer.
        self._await_request()
        super().requestDone(request)

    def _await_request(self) -> None:
        self._cancel_deadline()
        self._deadline = self._clock.callLater(self._limits.request_timeout, self._too_slow)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None and self._deadline.active():
            self._deadline.cancel()
        self._deadline = None

    def _too_slow(self) -> None:
        self._site.refused["timeout"] += 1
        log.info(
            "closed an HTTP connection from {peer}: no complete request within {timeout:g} s",
            peer=_peer(self),
            timeout=self._limits.request_timeout,
        )
        # Gracefully: the client may still be reading the previous response
        # (an abort would discard what the kernel holds of it).  One that
        # does not read it either is cut after as long again.
        self.loseConnection()
        self._deadline = self._clock.callLater(
            self._limits.request_timeout, _transport(self).abortConnection
        )


def _transport(protocol: Protocol) -> ITCPTransport:
    assert protocol.transport is not None
    return cast(ITCPTransport, protocol.transport)


def _peer(protocol: Protocol) -> str:
    address = _transport(protocol).getPeer()
    return str(getattr(address, "host", address))


class _Overloaded(Protocol):
    """
    What a connection over the cap gets: a 503 and the door.
    """

    def __init__(self, response: bytes) -> None:
        self._response = response

    def connectionMade(self) -> None:
        _transport(self).write(self._response)
        _transport(self).loseConnection()


class BoundedSite(Site):
    """
    A L{Site} of L{BoundedChannel}s, at most C{limits.max_connections} of
    them at once.  Bodies are JSON-RPC, never HTML forms: they are not
    parsed as such (twisted.web would parse each with the email package).
    """

    requestFactory = BoundedRequest

    def __init__(
        self,
        resource: IResource,
        reactor: IReactorTime,
        limits: Limits = Limits(),
        logFormatter: IAccessLogFormatter | None = None,
    ) -> None:
        super().__init__(
            resource,
            timeout=limits.request_timeout,
            logFormatter=logFormatter,
            reactor=reactor,
            parsePOSTFormSubmission=False,
        )
        self.limits = limits
        self.channels: set[BoundedChannel] = set()
        #: What was refused since the start, by reason: a connection over
        #: the cap, a body over the limit, a request not whole in time.
        self.refused = {"connection": 0, "body": 0, "timeout": 0}
        self._shed = 0
        self._shed_logged: float | None = None
        self.too_large = _raw_response(b"413 Content Too Large", body_too_large(limits.max_body))
        self._overloaded = _raw_response(
            b"503 Service Unavailable",
            {"error": f"the server has {limits.max_connections} connections open; retry later"},
            b"Retry-After: %d" % RETRY_AFTER,
        )

    def protocol(self) -> BoundedChannel:  # type: ignore[override]
        # Called by Factory.buildProtocol; Site.buildProtocol then gives the
        # channel its request factory and this site.  Plain HTTP/1.1 (no
        # HTTP/2 negotiation: TLS is a reverse proxy's job here).
        return BoundedChannel(self, self.limits, self.reactor)

    def buildProtocol(self, addr: IAddress | None) -> Protocol | None:  # type: ignore[override]
        if len(self.channels) >= self.limits.max_connections:
            self._refused_connection()
            return _Overloaded(self._overloaded)
        channel: Protocol | None = super().buildProtocol(addr)
        return channel

    def _refused_connection(self) -> None:
        # One line a minute at most: a flood must not fill the log too.
        self.refused["connection"] += 1
        self._shed += 1
        now = self.reactor.seconds()
        if self._shed_logged is None or now - self._shed_logged >= SHED_LOG_INTERVAL:
            log.warn(
                "{count} HTTP connections are open, the most allowed: {shed} refused with 503 "
                "since the last report",
                count=len(self.channels),
                shed=self._shed,
            )
            self._shed_logged = now
            self._shed = 0

    def opened(self, channel: BoundedChannel) -> None:
        self.channels.add(channel)

    def closed(self, channel: BoundedChannel) -> None:
        self.channels.discard(channel)
