"""
The HTTP face of mqttsvc: JSON-RPC at C{/rpc}, the live event stream at
C{/events}, Prometheus metrics at C{/metrics}, readiness at C{/readyz} (all
four need a token), and liveness at C{/healthz} and the status page at C{/}
(both open: the page holds no data, it asks for a token).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any
from urllib.parse import unquote_to_bytes

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.logger import Logger
from twisted.web.http import Request
from twisted.web.iweb import IAccessLogFormatter, IRequest
from twisted.web.resource import IResource
from zope.interface import provider

from mqttsvc.control.httpserver import MAX_BODY, RETRY_AFTER, body_too_large
from mqttsvc.control.rpc.dispatcher import Dispatcher
from mqttsvc.control.sse import EventStreams
from mqttsvc.control.tokens import Tokens
from mqttsvc.db.events import TYPES, EventFilter

_NOT_POST = ["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]

#: The status page: one file, no build step, no external resources.
STATUS_PAGE = Path(__file__).with_name("static") / "status.html"

#: What twisted.web splits a query on (C{twisted.web.http.parse_qs}).
_QUERY_FIELDS = re.compile(rb"([&;])")

_REDACTED = b"<redacted>"


#: Bytes that twisted.web's combined log format writes as they are: printable
#: ASCII but the double quote, the single quote and the backslash.
_PLAIN_LOG_FIELD = re.compile(rb"[\x20\x21\x23-\x26\x28-\x5b\x5d-\x7e]*")


def _log_field(value: bytes) -> str:
    """
    A field of the combined log format, escaped as C{twisted.web.http}
    escapes it (like C{repr} inside double quotes), with a fast path for
    the usual plain value.
    """
    if _PLAIN_LOG_FIELD.fullmatch(value):
        return value.decode("ascii")
    escaped = repr(value)[1:]
    if escaped.startswith("'"):
        return escaped[1:-1].replace('"', '\\"').replace("\\'", "'")
    return escaped[1:-1]


def redact_query(uri: bytes) -> bytes:
    """
    C{uri} with the value of every query parameter whose name holds
    C{token} replaced by C{<redacted>}.  Names are decoded as twisted.web
    decodes them for C{request.args} (C{+} and percent escapes, any case),
    so that C{access%5Ftoken=...}, which authenticates, is redacted too.
    """
    path, mark, query = uri.partition(b"?")
    if not mark:
        return uri
    fields = _QUERY_FIELDS.split(query)
    for i in range(0, len(fields), 2):
        name, equals, _ = fields[i].partition(b"=")
        if equals and b"token" in unquote_to_bytes(name.replace(b"+", b" ")).lower():
            fields[i] = name + b"=" + _REDACTED
    return path + mark + b"".join(fields)


def redact_referrer(referrer: bytes) -> bytes:
    """
    A C{Referer} without its query and fragment: they belong to another
    page, whose parameter names (and tokens) we cannot know.
    """
    page, _, rest = referrer.partition(b"?")
    page, _, fragment = page.partition(b"#")
    return page + b"?" + _REDACTED if rest or fragment else page


@provider(IAccessLogFormatter)
def access_log_line(timestamp: str, request: Request) -> str:
    """
    twisted.web's combined log format, with tokens redacted from the
    request's query and the query of its C{Referer} left out.

    Written out rather than wrapping C{combinedLogFormatter}: it runs for
    every request, and this costs a quarter of the wrapped original.
    """
    client = request.getClientAddress()
    ip = (
        _log_field(client.host.encode("ascii"))
        if isinstance(client, IPv4Address | IPv6Address)
        else "-"
    )
    referrer = request.getHeader(b"referer")
    agent = request.getHeader(b"user-agent") or b"-"
    return (
        f'"{ip}" - - {timestamp} '
        f'"{_log_field(request.method)} {_log_field(redact_query(request.uri))} '
        f'{_log_field(request.clientproto)}" '
        f"{request.code:d} {request.sentLength or '-'} "
        f'"{_log_field(redact_referrer(referrer) if referrer else b"-")}" "{_log_field(agent)}"'
    )


def _csp_hash(page: bytes, tag: bytes) -> str:
    """
    The CSP source expression of the page's (single) inline C{tag} block.
    """
    match = re.search(b"<%s>(.*?)</%s>" % (tag, tag), page, re.DOTALL)
    content = match.group(1) if match else b""
    return "'sha256-" + base64.b64encode(hashlib.sha256(content).digest()).decode() + "'"


def _stream_params(request: IRequest) -> tuple[EventFilter, int | None]:
    """
    The filters and resume point of a C{GET /events}.

    @raise ValueError: naming the bad parameter.
    """

    def values(name: str) -> frozenset[str] | None:
        found: set[str] = set()
        for raw in request.args.get(name.encode(), []):
            found.update(v.strip() for v in raw.decode("utf-8").split(",") if v.strip())
        return frozenset(found) or None

    types = values("type")
    if types is not None and not types <= set(TYPES):
        raise ValueError(
            f"type: {', '.join(sorted(types - set(TYPES)))} is not one of {', '.join(TYPES)}"
        )
    last = request.getHeader(b"Last-Event-ID")
    if last is None:
        last = (request.args.get(b"last_event_id") or [None])[0]
    after = None
    if last is not None and last.strip():
        if not re.fullmatch(rb"\s*\d{1,18}\s*", last):
            raise ValueError("Last-Event-ID must be an event id (a whole number)")
        after = int(last)
    return EventFilter(values("site_id"), types), after


_encode = json.JSONEncoder(separators=(",", ":")).encode


def _json(request: IRequest, status: int, value: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return _encode(value).encode()


class WebApp:
    """
    The Klein application; C{resource()} is what the web server serves.

    @param tokens: the accepted bearer tokens, or None to accept every
        call (only allowed on a loopback listener; see L{mqttsvc.tap}).
    """

    app = Klein()
    log = Logger()

    def __init__(
        self,
        dispatcher: Dispatcher,
        tokens: Tokens | None,
        metrics: Callable[[], bytes] | None = None,
        readiness: Callable[[], Awaitable[list[str]]] | None = None,
        events: EventStreams | None = None,
    ) -> None:
        """
        @param metrics: renders the Prometheus text exposition.
        @param readiness: the reasons the service is not ready (none when
            it is).
        @param events: serves C{GET /events}.
        """
        self._dispatcher = dispatcher
        self._tokens = tokens
        self._metrics = metrics
        self._readiness = readiness
        self._events = events
        self._page = STATUS_PAGE.read_bytes()
        self._page_policy = (
            "default-src 'none'; connect-src 'self'; img-src 'self' data:; "
            f"script-src {_csp_hash(self._page, b'script')}; "
            f"style-src {_csp_hash(self._page, b'style')}; "
            "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
        ).encode()

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    def _caller(self, request: IRequest, query_token: bool = False) -> str | None:
        """
        Who calls, by the bearer token; with C{query_token}, a request
        without an C{Authorization} header may pass it as C{access_token}
        (an EventSource cannot set headers).
        """
        if self._tokens is None:
            return "anonymous"
        header = request.getHeader(b"Authorization")
        if header is None and query_token:
            presented = (request.args.get(b"access_token") or [b""])[0]
            return self._tokens.caller(presented.strip()) if presented.strip() else None
        scheme, _, presented = (header or b"").partition(b" ")
        if scheme.lower() != b"bearer" or not presented.strip():
            return None
        return self._tokens.caller(presented.strip())

    def _refuse(self, request: IRequest) -> bytes:
        request.setHeader(b"WWW-Authenticate", b'Bearer realm="mqttsvc"')
        return _json(request, 401, {"error": "a valid 'Authorization: Bearer' token is required"})

    @app.route("/rpc", methods=["POST"], strict_slashes=False)
    async def rpc(self, request: IRequest) -> bytes:
        caller = self._caller(request)
        if caller is None:
            return self._refuse(request)
        content_type = (request.getHeader(b"Content-Type") or b"").split(b";")[0].strip()
        if content_type.lower() != b"application/json":
            return _json(request, 415, {"error": "Content-Type must be application/json"})
        # The server refuses larger bodies before they are read (see
        # mqttsvc.control.httpserver); this holds for any other server of the app.
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            return _json(request, 413, body_too_large(MAX_BODY))
        response = await self._dispatcher.handle(body, caller)
        if response is None:
            request.setResponseCode(204)
            return b""
        request.setHeader(b"Content-Type", b"application/json")
        return response

    @app.route("/rpc", methods=_NOT_POST, strict_slashes=False)
    def rpc_wrong_method(self, request: IRequest) -> bytes:
        request.setHeader(b"Allow", b"POST")
        return _json(request, 405, {"error": "use POST with a JSON-RPC 2.0 body"})

    @app.route("/", methods=["GET", "HEAD"])
    def status_page(self, request: IRequest) -> bytes:
        request.setHeader(b"Content-Type", b"text/html; charset=utf-8")
        request.setHeader(b"Content-Security-Policy", self._page_policy)
        request.setHeader(b"X-Content-Type-Options", b"nosniff")
        request.setHeader(b"Referrer-Policy", b"no-referrer")
        request.setHeader(b"X-Frame-Options", b"DENY")
        return self._page

    @app.route("/events", methods=["GET"])
    async def events(self, request: IRequest) -> bytes | None:
        caller = self._caller(request, query_token=True)
        if caller is None:
            return self._refuse(request)
        if self._events is None:
            return _json(request, 404, {"error": "the event stream is not enabled"})
        try:
            wanted, after = _stream_params(request)
        except ValueError as e:
            return _json(request, 400, {"error": str(e)})
        if self._events.full:
            request.setHeader(b"Retry-After", b"%d" % RETRY_AFTER)
            return _json(
                request,
                503,
                {
                    "error": f"{self._events.clients} event streams are open, the most allowed; "
                    "retry later"
                },
            )
        self.log.debug("event stream for {caller} (after {after})", caller=caller, after=after)
        await self._events.serve(request, wanted, after)
        return None

    @app.route("/healthz", methods=["GET", "HEAD"])
    def healthz(self, request: IRequest) -> bytes:
        return _json(request, 200, {"status": "ok"})

    @app.route("/readyz", methods=["GET", "HEAD"])
    async def readyz(self, request: IRequest) -> bytes:
        if self._caller(request) is None:
            return self._refuse(request)
        problems = await self._readiness() if self._readiness is not None else []
        if problems:
            return _json(request, 503, {"status": "not ready", "reasons": problems})
        return _json(request, 200, {"status": "ready"})

    @app.route("/metrics", methods=["GET"])
    def metrics(self, request: IRequest) -> bytes:
        if self._caller(request) is None:
            return self._refuse(request)
        if self._metrics is None:
            return _json(request, 404, {"error": "metrics are not enabled"})
        request.setHeader(b"Content-Type", CONTENT_TYPE_LATEST.encode())
        return self._metrics()
