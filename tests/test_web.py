"""
The HTTP layer of the control plane, without a port: authentication,
methods, content type, body limit, and health.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import StubTreq

from mqttsvc.control.rpc.dispatcher import Call, Dispatcher, Method
from mqttsvc.control.tokens import load_tokens
from mqttsvc.control.web import MAX_BODY, WebApp

TOKEN = "t" * 32


async def whoami(call: Call) -> Any:
    return call.caller


@pytest.fixture
def treq(tmp_path: Path) -> StubTreq:
    path = tmp_path / "tokens"
    path.write_text(f"backend {TOKEN}\n")
    path.chmod(0o600)
    app = WebApp(Dispatcher([Method("whoami", whoami)]), load_tokens(str(path)))
    return StubTreq(app.resource())


CALL = json.dumps({"jsonrpc": "2.0", "method": "whoami", "id": 1}).encode()
JSON = {"Content-Type": "application/json"}
AUTH = {**JSON, "Authorization": f"Bearer {TOKEN}"}


@pytest_twisted.ensureDeferred
async def test_call_with_token_names_the_caller(treq: StubTreq) -> None:
    """A valid bearer token reaches the method as its caller's name."""
    response = await treq.post("http://x/rpc", CALL, headers=AUTH)
    assert response.code == 200
    assert response.headers.getRawHeaders("Content-Type") == ["application/json"]
    assert (await response.json())["result"] == "backend"


@pytest.mark.parametrize(
    "authorization", [None, "Bearer wrong-token-wrong-token", "Basic dXNlcjpwYXNz", "Bearer "]
)
@pytest_twisted.ensureDeferred
async def test_missing_or_wrong_token_is_401(treq: StubTreq, authorization: str | None) -> None:
    """No valid token: 401 with a WWW-Authenticate challenge, and the method never runs."""
    headers = dict(JSON)
    if authorization is not None:
        headers["Authorization"] = authorization
    response = await treq.post("http://x/rpc", CALL, headers=headers)
    assert response.code == 401
    assert response.headers.getRawHeaders("WWW-Authenticate") == ['Bearer realm="mqttsvc"']


@pytest_twisted.ensureDeferred
async def test_wrong_method_and_content_type(treq: StubTreq) -> None:
    """Only POST with JSON is accepted."""
    response = await treq.get("http://x/rpc", headers=AUTH)
    assert response.code == 405
    assert response.headers.getRawHeaders("Allow") == ["POST"]
    response = await treq.post("http://x/rpc", CALL, headers={**AUTH, "Content-Type": "text/plain"})
    assert response.code == 415


@pytest_twisted.ensureDeferred
async def test_trailing_slash_is_served(treq: StubTreq) -> None:
    """POST /rpc/ is answered, not redirected."""
    response = await treq.post("http://x/rpc/", CALL, headers=AUTH)
    assert response.code == 200


@pytest_twisted.ensureDeferred
async def test_oversized_body_is_refused(treq: StubTreq) -> None:
    """A body over the limit gets 413 and a JSON-RPC error saying so."""
    response = await treq.post("http://x/rpc", b" " * (MAX_BODY + 1), headers=AUTH)
    assert response.code == 413
    body = await response.json()
    assert body["error"]["code"] == -32600
    assert body["error"]["data"] == {"limit": MAX_BODY}


@pytest_twisted.ensureDeferred
async def test_notification_only_is_204(treq: StubTreq) -> None:
    """Nothing to answer means HTTP 204 with no body."""
    body = json.dumps({"jsonrpc": "2.0", "method": "whoami"}).encode()
    response = await treq.post("http://x/rpc", body, headers=AUTH)
    assert response.code == 204
    assert await response.content() == b""


@pytest.mark.parametrize("path", ["/metrics", "/readyz"])
@pytest_twisted.ensureDeferred
async def test_metrics_and_readiness_need_a_token(treq: StubTreq, path: str) -> None:
    """Only /healthz is open."""
    response = await treq.get("http://x" + path)
    assert response.code == 401


@pytest_twisted.ensureDeferred
async def test_healthz_is_open(treq: StubTreq) -> None:
    """Liveness needs no token."""
    response = await treq.get("http://x/healthz")
    assert response.code == 200
    assert await response.json() == {"status": "ok"}


@pytest.mark.parametrize(
    "uri, agent",
    [
        (b"/rpc", None),
        (b'/rpc?a="quoted"&b=it\'s', b'curl/8.0 "x"'),
        (b"/rpc?back\\slash", b"it's \\ both \" kinds '"),
        (b"/rpc?nl=%0a&raw=\n\r\t", b"\x00\x1b[31mred\x7f"),
        (b"/caf\xc3\xa9", b"\xff\xfe agent"),
    ],
)
def test_access_log_line_is_twisted_webs_combined_format(uri: bytes, agent: bytes | None) -> None:
    """
    The access log line is exactly what twisted.web's combined formatter
    writes, escapes included (nothing a client sends can forge a log line).
    """
    from twisted.internet.address import IPv4Address
    from twisted.web.http import combinedLogFormatter
    from twisted.web.test.requesthelper import DummyRequest

    from mqttsvc.control.web import access_log_line

    request = DummyRequest([])
    request.method = b"POST"
    request.uri = uri
    request.client = IPv4Address("TCP", "10.0.0.7", 40000)
    request.code = 200
    request.sentLength = 123
    if agent is not None:
        request.requestHeaders.setRawHeaders(b"user-agent", [agent])
    line = access_log_line("[26/Nov/2026:22:00:00 +0000]", request)
    assert line == combinedLogFormatter("[26/Nov/2026:22:00:00 +0000]", request)
    assert "\n" not in line and "\r" not in line
