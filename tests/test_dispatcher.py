"""
The JSON-RPC 2.0 dispatcher against the specification's cases.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from mqttsvc.rpc.dispatcher import Call, Dispatcher, Method, Param, RPCError


async def subtract(call: Call) -> Any:
    return call.params["minuend"] - call.params.get("subtrahend", 0)


async def explode(call: Call) -> Any:
    raise ZeroDivisionError("secret internals")


async def refuse(call: Call) -> Any:
    raise RPCError(-32001, "Site not found: x", {"site_id": "x"})


calls: list[Call] = []


async def record(call: Call) -> Any:
    calls.append(call)
    return None


DISPATCHER = Dispatcher(
    [
        Method(
            "subtract",
            subtract,
            (Param("minuend", "integer"), Param("subtrahend", "integer", required=False)),
        ),
        Method("explode", explode),
        Method("refuse", refuse),
        Method("notify", record, (Param("what", "string", nullable=True),)),
    ]
)


async def rpc(body: Any, raw: bool = False) -> Any:
    data = body if raw else json.dumps(body).encode()
    response = await DISPATCHER.handle(data, "tester")
    return None if response is None else json.loads(response)


@pytest_twisted.ensureDeferred
async def test_params_by_position_and_name() -> None:
    """Both forms of params reach the method by name."""
    assert await rpc({"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": 1}) == {
        "jsonrpc": "2.0",
        "result": 19,
        "id": 1,
    }
    response = await rpc(
        {
            "jsonrpc": "2.0",
            "method": "subtract",
            "params": {"subtrahend": 23, "minuend": 42},
            "id": "a",
        }
    )
    assert response == {"jsonrpc": "2.0", "result": 19, "id": "a"}


@pytest_twisted.ensureDeferred
async def test_invalid_params_name_the_field() -> None:
    """Missing, unknown, mistyped and surplus params are -32602 with the field."""
    cases = [
        ({"subtrahend": 1}, "minuend"),
        ({"minuend": 1, "bogus": 2}, "bogus"),
        ({"minuend": "1"}, "minuend"),
        ({"minuend": True}, "minuend"),
        ({"minuend": None}, "minuend"),
    ]
    for params, field in cases:
        response = await rpc({"jsonrpc": "2.0", "method": "subtract", "params": params, "id": 1})
        assert response["error"]["code"] == -32602, params
        assert response["error"]["data"]["field"] == field
    response = await rpc({"jsonrpc": "2.0", "method": "subtract", "params": [1, 2, 3], "id": 1})
    assert response["error"]["code"] == -32602


@pytest_twisted.ensureDeferred
async def test_protocol_errors() -> None:
    """Parse errors, invalid requests and unknown methods get their codes."""
    assert (await rpc(b'{"jsonrpc": "2.0", "method": "foobar', raw=True))["error"]["code"] == -32700
    assert (await rpc({"jsonrpc": "2.0", "method": 1, "params": "bar"}))["error"]["code"] == -32600
    assert (await rpc({"jsonrpc": "1.0", "method": "x", "id": 1}))["error"]["code"] == -32600
    assert (await rpc({"jsonrpc": "2.0", "method": "x", "id": {}}))["error"]["code"] == -32600
    assert (await rpc([]))["error"]["code"] == -32600
    assert await rpc([1]) == [
        {
            "jsonrpc": "2.0",
            "error": {"code": -32600, "message": "Invalid Request: not a JSON object"},
            "id": None,
        }
    ]
    missing = await rpc({"jsonrpc": "2.0", "method": "foobar", "id": "1"})
    assert missing["error"]["code"] == -32601
    assert missing["error"]["data"] == {"method": "foobar"}
    params = await rpc({"jsonrpc": "2.0", "method": "subtract", "params": 3, "id": 1})
    assert params["error"]["code"] == -32600


@pytest_twisted.ensureDeferred
async def test_application_and_internal_errors() -> None:
    """Method errors travel with their data; crashes become -32603 without internals."""
    refused = await rpc({"jsonrpc": "2.0", "method": "refuse", "id": 5})
    assert refused == {
        "jsonrpc": "2.0",
        "error": {"code": -32001, "message": "Site not found: x", "data": {"site_id": "x"}},
        "id": 5,
    }
    crashed = await rpc({"jsonrpc": "2.0", "method": "explode", "id": 6})
    assert crashed["error"]["code"] == -32603
    assert "secret" not in json.dumps(crashed)


@pytest_twisted.ensureDeferred
async def test_batch_with_notifications() -> None:
    """A batch answers each call in its own entry and nothing for notifications."""
    calls.clear()
    response = await rpc(
        [
            {"jsonrpc": "2.0", "method": "subtract", "params": [1, 1], "id": "1"},
            {"jsonrpc": "2.0", "method": "notify", "params": ["hello"]},
            {"jsonrpc": "2.0", "method": "subtract", "params": [42, 23], "id": "2"},
            {"foo": "boo"},
            {"jsonrpc": "2.0", "method": "foo.get", "params": {"name": "myself"}, "id": "5"},
        ]
    )
    assert [r.get("id") for r in response] == ["1", "2", None, "5"]
    assert response[0]["result"] == 0 and response[1]["result"] == 19
    assert response[2]["error"]["code"] == -32600
    assert response[3]["error"]["code"] == -32601
    assert [c.params for c in calls] == [{"what": "hello"}]
    assert calls[0].caller == "tester"


@pytest_twisted.ensureDeferred
async def test_only_notifications_get_no_response() -> None:
    """A notification, or a batch of them, has nothing to answer (HTTP 204)."""
    assert await rpc({"jsonrpc": "2.0", "method": "notify", "params": {"what": None}}) is None
    assert (
        await rpc(
            [
                {"jsonrpc": "2.0", "method": "notify", "params": ["a"]},
                {"jsonrpc": "2.0", "method": "nonexistent"},
            ]
        )
        is None
    )
