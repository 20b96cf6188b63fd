"""
The JSON-RPC 2.0 dispatcher against the specification's cases.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import pytest_twisted

from mqttsvc.control.rpc.dispatcher import Call, Dispatcher, Method, Param, RPCError


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


# --- issue 13: bounded work and validated strings -----------------------------------


async def big(call: Call) -> Any:
    calls.append(call)
    return "x" * call.params["size"]


BOUNDED = Dispatcher(
    [
        Method("big", big, (Param("size", "integer"),)),
        Method("notify", record, (Param("what", "object", nullable=True),)),
    ],
    max_batch=5,
    max_response=1000,
)


async def bounded(body: Any) -> Any:
    response = await BOUNDED.handle(json.dumps(body).encode(), "tester")
    return None if response is None else json.loads(response)


@pytest_twisted.ensureDeferred
async def test_a_nesting_bomb_is_a_parse_error() -> None:
    """JSON nested deeper than the parser's stack is -32700, not a crash."""
    for bomb in (b"[" * 100_000, b'{"a":' * 100_000):
        response = await rpc(bomb, raw=True)
        assert response["error"]["code"] == -32700
        assert "nested too deeply" in response["error"]["message"]


@pytest_twisted.ensureDeferred
async def test_a_batch_over_the_cap_is_refused_whole() -> None:
    """More calls than max_batch: one -32600 naming the limit, and none runs."""
    calls.clear()
    response = await bounded(
        [{"jsonrpc": "2.0", "method": "big", "params": [1], "id": i} for i in range(6)]
    )
    assert response["error"]["code"] == -32600
    assert response["error"]["data"] == {"limit": 5, "calls": 6}
    assert calls == []


@pytest_twisted.ensureDeferred
async def test_a_result_over_the_response_limit_is_an_error_naming_it() -> None:
    """A single result over max_response becomes -32004 with the limit and its size."""
    response = await bounded({"jsonrpc": "2.0", "method": "big", "params": [2000], "id": 7})
    assert response["id"] == 7 and response["error"]["code"] == -32004
    size = len(json.dumps({"jsonrpc": "2.0", "result": "x" * 2000, "id": 7}).replace(" ", ""))
    assert response["error"]["data"] == {"limit": 1000, "size": size, "ran": True}
    fits = await bounded({"jsonrpc": "2.0", "method": "big", "params": [900], "id": 8})
    assert fits["result"] == "x" * 900


@pytest_twisted.ensureDeferred
async def test_a_batch_stops_running_once_its_answer_is_full() -> None:
    """
    Calls run in order; the one whose result would pass the limit is
    answered with an error (it ran), the rest are not run at all and say
    so; the whole answer stays within the limit.
    """
    calls.clear()
    batch = [
        {"jsonrpc": "2.0", "method": "big", "params": [300], "id": 1},
        {"jsonrpc": "2.0", "method": "big", "params": [300], "id": 2},
        {"jsonrpc": "2.0", "method": "big", "params": [300], "id": 3},
        {"jsonrpc": "2.0", "method": "notify", "params": [None]},
        {"jsonrpc": "2.0", "method": "big", "params": [1], "id": 5},
    ]
    raw = await BOUNDED.handle(json.dumps(batch).encode(), "tester")
    assert raw is not None and len(raw) <= 1000 + 2 * 300
    response = json.loads(raw)
    assert [r["id"] for r in response] == [1, 2, 3, 5]
    assert response[0]["result"] == response[1]["result"] == "x" * 300
    assert response[2]["error"]["code"] == -32004 and response[2]["error"]["data"]["ran"] is True
    assert response[3]["error"]["code"] == -32004 and response[3]["error"]["data"]["ran"] is False
    assert [c.params for c in calls] == [{"size": 300}] * 3


@pytest.mark.parametrize(
    ("params", "problem"),
    [
        ({"what": "a\x00b"}, "control characters"),
        ({"what": "\ud800"}, "lone surrogate"),
        ({"what": "tab\there"}, "control characters"),
        ({"what": "c1\x85"}, "control characters"),
        ({"what": "del\x7f"}, "control characters"),
        ({"what": "x" * 1025}, "at most 1024 characters"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_bad_strings_are_invalid_params_naming_the_param(
    params: dict[str, Any], problem: str
) -> None:
    """NUL, controls, lone surrogates and overlong strings are -32602 before the method runs."""
    calls.clear()
    response = await rpc({"jsonrpc": "2.0", "method": "notify", "params": params, "id": 1})
    assert response["error"]["code"] == -32602
    assert response["error"]["data"]["field"] == "what"
    assert problem in response["error"]["data"]["problem"]
    assert calls == []


@pytest.mark.parametrize(
    "value",
    [
        {"nested": ["ok", {"deeper": "a\x00"}]},
        {"key\x00": 1},
        ["\udfff"],
        {"path": "p" * 4097},
        json.loads("[" * 17 + "]" * 17),
    ],
)
@pytest_twisted.ensureDeferred
async def test_strings_are_checked_at_any_depth(value: Any) -> None:
    """Keys and values inside objects and arrays obey the same rule, and nesting is bounded."""
    calls.clear()
    response = await bounded({"jsonrpc": "2.0", "method": "notify", "params": [value], "id": 1})
    assert response["error"]["code"] == -32602
    assert response["error"]["data"]["field"] == "what"
    assert calls == []
    fine = await bounded({"jsonrpc": "2.0", "method": "notify", "params": [{"k": ["é ü 中"]}]})
    assert fine is None and calls == [Call("notify", {"what": {"k": ["é ü 中"]}}, "tester")]


class Unavailable(Exception):
    pass


class ConnectionGone(Unavailable):
    pass


class ServerGone(ConnectionGone):
    pass


@pytest_twisted.ensureDeferred
async def test_registered_errors_are_mapped_by_class_hierarchy() -> None:
    """
    A subclass of a registered error gets its nearest registered base's RPC
    error (it was a KeyError, hence -32603, when mapped by exact type).
    """

    async def fail_with(call: Call) -> Any:
        raise {"base": Unavailable, "sub": ConnectionGone, "subsub": ServerGone}[
            call.params["kind"]
        ]("gone")

    dispatcher = Dispatcher(
        [Method("fail", fail_with, (Param("kind", "string"),))],
        errors={
            Unavailable: lambda e: RPCError(-32003, "Database unavailable"),
            ConnectionGone: lambda e: RPCError(-32005, "Connection gone"),
        },
    )

    async def code(kind: str) -> int:
        body = {"jsonrpc": "2.0", "method": "fail", "params": {"kind": kind}, "id": 1}
        answer = json.loads(await dispatcher.handle(json.dumps(body).encode(), "tester"))
        result: int = answer["error"]["code"]
        return result

    assert await code("base") == -32003
    assert await code("sub") == -32005
    assert await code("subsub") == -32005
