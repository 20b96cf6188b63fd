"""
The HTTP face of mqttsvc: JSON-RPC at C{/rpc}, Prometheus metrics at
C{/metrics}, readiness at C{/readyz} (all three need a token) and liveness
at C{/healthz} (open).
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from klein import Klein
from prometheus_client import CONTENT_TYPE_LATEST
from twisted.logger import Logger
from twisted.web.iweb import IRequest
from twisted.web.resource import IResource

from mqttsvc.rpc.dispatcher import INVALID_REQUEST, Dispatcher, RPCError
from mqttsvc.tokens import Tokens

#: The largest request body accepted, in bytes.
MAX_BODY = 1024 * 1024

_NOT_POST = ["GET", "HEAD", "PUT", "DELETE", "PATCH", "OPTIONS"]


def _json(request: IRequest, status: int, value: Any) -> bytes:
    request.setResponseCode(status)
    request.setHeader(b"Content-Type", b"application/json")
    return json.dumps(value, separators=(",", ":")).encode()


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
    ) -> None:
        """
        @param metrics: renders the Prometheus text exposition.
        @param readiness: the reasons the service is not ready (none when
            it is).
        """
        self._dispatcher = dispatcher
        self._tokens = tokens
        self._metrics = metrics
        self._readiness = readiness

    def resource(self) -> IResource:
        resource: IResource = self.app.resource()
        return resource

    def _caller(self, request: IRequest) -> str | None:
        if self._tokens is None:
            return "anonymous"
        header = request.getHeader(b"Authorization") or b""
        scheme, _, presented = header.partition(b" ")
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
        body = request.content.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            error = RPCError(
                INVALID_REQUEST,
                f"Invalid Request: the body is larger than {MAX_BODY} bytes",
                {"limit": MAX_BODY},
            )
            return _json(request, 413, {"jsonrpc": "2.0", "error": error.as_json(), "id": None})
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
