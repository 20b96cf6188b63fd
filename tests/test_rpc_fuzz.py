"""
Fuzzing the JSON-RPC endpoint of a running service: random bytes, random
JSON, and random calls of every method with random params.  Whatever
arrives, the answer is never a 5xx, and it is always a valid JSON-RPC
response (or 204 for notifications only).
"""

from __future__ import annotations

import json
import random
from typing import Any

import pytest_twisted
import treq

from tests.service import RunningService

SEED = 20261126


def _value(rng: random.Random, depth: int = 0) -> Any:
    choice = rng.randrange(9 if depth < 3 else 6)
    if choice == 0:
        return None
    if choice == 1:
        return rng.choice([True, False])
    if choice == 2:
        return rng.choice([0, -1, 1, 2**31, 2**63, -(2**70), 1883, 65536])
    if choice == 3:
        return rng.choice([0.5, -1e308, 1e308, 3.14])
    if choice == 4:
        return rng.choice(["", "x", "site-1", "127.0.0.1", "a/#/b", "{bad}", "é" * 70, "\u0000"])
    if choice == 5:
        return "".join(chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(12)))
    if choice == 6:
        return [_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {
        rng.choice(
            ["site_id", "host", "port", "topics", "ids", "limit", "since", "kind", "x"]
        ): _value(rng, depth + 1)
        for _ in range(rng.randrange(5))
    }


def _call(rng: random.Random, methods: list[str]) -> Any:
    request: dict[str, Any] = {"jsonrpc": rng.choice(["2.0", "2.0", "2.0", "1.0", 2])}
    request["method"] = rng.choice([*methods, "nope", 5])
    if rng.random() < 0.8:
        request["params"] = (
            _value(rng)
            if rng.random() < 0.3
            else {
                name: _value(rng)
                for name in rng.sample(
                    [
                        "site_id",
                        "host",
                        "port",
                        "topics",
                        "ids",
                        "limit",
                        "since",
                        "kind",
                        "sensor_id",
                        "keepalive",
                        "protocol",
                        "device_intervals",
                        "password",
                    ],
                    rng.randrange(5),
                )
            }
        )
    if rng.random() < 0.9:
        request["id"] = rng.choice([1, "a", None, 2.5])
    return request


def _check_response(item: Any) -> None:
    assert isinstance(item, dict) and item.get("jsonrpc") == "2.0", item
    assert "id" in item
    if "error" in item:
        error = item["error"]
        assert isinstance(error["code"], int) and isinstance(error["message"], str)
        assert -32768 <= error["code"] <= -32000
        assert error["code"] != -32603, item  # no method may crash on any input
    else:
        assert "result" in item


@pytest_twisted.ensureDeferred
async def test_fuzzed_requests_get_valid_answers(running: RunningService) -> None:
    rng = random.Random(SEED)
    methods = [m["name"] for m in (await running.call("rpc.discover"))["methods"]]
    # Destructive calls on fuzzed ids are harmless here: the database holds
    # no sites (the fixture emptied it) and nothing else.
    bodies: list[bytes] = []
    for _ in range(150):
        bodies.append(bytes(rng.randrange(256) for _ in range(rng.randrange(64))))
    for _ in range(400):
        shape = rng.random()
        if shape < 0.7:
            payload: Any = _call(rng, methods)
        elif shape < 0.9:
            payload = [_call(rng, methods) for _ in range(rng.randrange(4))]
        else:
            payload = _value(rng)
        bodies.append(json.dumps(payload).encode())
    for body in bodies:
        response = await treq.post(
            running.url, body, headers={"Content-Type": "application/json"}, persistent=False
        )
        assert response.code in (200, 204), (response.code, body)
        content = await response.content()
        if response.code == 204:
            assert content == b""
            continue
        decoded = json.loads(content)
        for item in decoded if isinstance(decoded, list) else [decoded]:
            _check_response(item)
