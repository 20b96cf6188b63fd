"""
Every control-plane method against the real database and broker, and the
OpenRPC document that describes them.
"""

from __future__ import annotations

import json
from typing import Any

import pytest_twisted

from mqttsvc.control.rpc.dispatcher import MAX_STRING, STRING_PATTERN
from tests.conftest import BROKER_HOST, BROKER_PORT, free_port
from tests.publish import publish
from tests.service import RunningService
from tests.waiting import eventually


def j(value: Any) -> bytes:
    return json.dumps(value).encode()


async def items(running: RunningService, method: str, params: dict[str, Any]) -> list[Any]:
    """The items of a list method's first page."""
    page = await running.call(method, params)
    result: list[Any] = page["items"]
    return result


async def connected(running: RunningService, site_id: str) -> None:
    async def up() -> bool:
        status = await running.call("site.status", [site_id])
        return bool(status["state"] == "connected" and status["subscriptions"])

    await eventually(up, what=f"{site_id} connected")


@pytest_twisted.ensureDeferred
async def test_update_and_delete(running: RunningService, site_id: str) -> None:
    """site.update merges fields and applies them live; site.delete stops and removes."""
    await running.call("site.create", {"site_id": site_id, "host": BROKER_HOST, "password": "p1"})
    await connected(running, site_id)
    updated = await running.call(
        "site.update",
        {
            "site_id": site_id,
            "keepalive": 30,
            "topics": [{"topic": f"{site_id}/x/{{sensor_id}}", "kind": "sensor_data"}],
            "offline_grace": 4,
        },
    )
    assert (updated["keepalive"], updated["offline_grace"], updated["has_password"]) == (
        30,
        4,
        True,
    )
    assert updated["host"] == BROKER_HOST
    assert updated["topics"] == [
        {"topic": f"{site_id}/x/{{sensor_id}}", "kind": "sensor_data", "qos": 1}
    ]
    await connected(running, site_id)
    status = await running.call("site.status", [site_id])
    assert status["topics_list"] == [f"{site_id}/x/{{sensor_id}}"]
    assert [s["topic"] for s in status["subscriptions"]] == [f"{site_id}/x/+"]
    bad = await running.call_raw("site.update", {"site_id": site_id, "keepalive": 1})
    assert bad["error"]["data"]["field"] == "keepalive"
    missing = await running.call_raw("site.update", {"site_id": "nope", "port": 1})
    assert missing["error"]["code"] == -32001
    assert await running.call("site.delete", [site_id]) == {"site_id": site_id, "deleted": True}
    assert running.supervisor.site(site_id) is None
    gone = await running.call_raw("site.get", [site_id])
    assert gone["error"]["code"] == -32001
    again = await running.call_raw("site.delete", [site_id])
    assert again["error"]["code"] == -32001


@pytest_twisted.ensureDeferred
async def test_a_sites_device_limit_is_set_through_the_api(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """
    site.create and site.update take max_devices (null: the service's
    --max-devices), site.get shows it, a bad one is -32602 naming it, and
    the site refuses a device past it.
    """
    created = await running.call(
        "site.create", {"site_id": site_id, "host": BROKER_HOST, "max_devices": 2}
    )
    assert created["max_devices"] == 2
    bad = await running.call_raw("site.update", {"site_id": site_id, "max_devices": 0})
    assert bad["error"]["data"]["field"] == "max_devices"
    await connected(running, site_id)
    await publish([(f"{site_id}/gateway/g{i}/heartbeat", j({"status": "ok"})) for i in range(3)])

    async def refused() -> Any:
        return await items(running, "deadletter.list", {"site_id": site_id}) or None

    [letter] = await eventually(refused, what="the third device refused")
    assert "limit of 2 devices" in letter["reason"]
    cleared = await running.call("site.update", {"site_id": site_id, "max_devices": None})
    assert cleared["max_devices"] is None


@pytest_twisted.ensureDeferred
async def test_site_test_reports_without_saving(running: RunningService) -> None:
    """site.test connects once and says how it went; nothing is stored."""
    ok = await running.call("site.test", {"host": BROKER_HOST, "port": BROKER_PORT})
    assert ok == {"ok": True, "category": None, "error": None}
    refused = await running.call("site.test", {"host": "127.0.0.1", "port": free_port()})
    assert (refused["ok"], refused["category"]) == (False, "refused")
    unknown = await running.call("site.test", {"host": "no-such-host.invalid"})
    assert unknown["category"] == "dns"
    assert await running.call("site.list") == {"items": [], "next_cursor": None}


@pytest_twisted.ensureDeferred
async def test_devices_readings_topics_events(running: RunningService, site_id: str) -> None:
    """The read side lists what the messages produced."""
    await running.call("site.create", {"site_id": site_id, "host": BROKER_HOST})
    await connected(running, site_id)
    await publish(
        [
            (f"{site_id}/gateway/gw/heartbeat", j({"status": "ok"})),
            (f"{site_id}/datalogger/gw/dl/heartbeat", j({})),
            *[
                (f"{site_id}/sensor/t/data", j({"ts": 1772366400 + i, "value": i}))
                for i in range(5)
            ],
        ]
    )

    async def seven() -> Any:
        topics = (await running.call("topic.list", [site_id]))["items"]
        return topics if sum(t["message_count"] for t in topics) == 7 else None

    topics = await eventually(seven, what="seven messages")
    assert [t["topic_path"] for t in topics] == sorted(
        [
            f"{site_id}/datalogger/gw/dl/heartbeat",
            f"{site_id}/gateway/gw/heartbeat",
            f"{site_id}/sensor/t/data",
        ]
    )
    devices = await items(running, "device.list", {"site_id": site_id})
    assert [(d["kind"], d["device_id"], d["gateway_id"], d["status"]) for d in devices] == [
        ("datalogger", "dl", "gw", "online"),
        ("gateway", "gw", None, "online"),
        ("sensor", "t", None, "online"),
    ]
    assert devices[1]["reported_status"] == "ok"
    only = await items(running, "device.list", {"site_id": site_id, "kind": "gateway"})
    assert [d["device_id"] for d in only] == ["gw"]
    assert await items(running, "device.list", {"site_id": site_id, "status": "offline"}) == []
    wrong = await running.call_raw("device.list", {"site_id": site_id, "kind": "robot"})
    assert wrong["error"]["data"]["field"] == "kind"

    latest = await items(
        running, "reading.list", {"site_id": site_id, "sensor_id": "t", "limit": 2}
    )
    assert [r["value"] for r in latest] == [3.0, 4.0]
    after = await items(
        running, "reading.list", {"site_id": site_id, "sensor_id": "t", "since": latest[0]["ts"]}
    )
    assert [r["value"] for r in after] == [4.0]
    bad_since = await running.call_raw(
        "reading.list", {"site_id": site_id, "sensor_id": "t", "since": "yesterday"}
    )
    assert bad_since["error"]["data"]["field"] == "since"

    events = await items(running, "event.list", {"site_id": site_id})
    assert {e["type"] for e in events} == {"connection", "device"}
    device_events = [e for e in events if e["type"] == "device"]
    assert {(e["data"]["kind"], e["data"]["to"]) for e in device_events} == {
        ("gateway", "online"),
        ("datalogger", "online"),
        ("sensor", "online"),
    }
    assert [e["at"] for e in events] == sorted(e["at"] for e in events)


@pytest_twisted.ensureDeferred
async def test_dead_letters_list_replay_purge(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """Dead letters can be listed, replayed after the site is fixed, and purged."""
    await running.call(
        "site.create",
        {
            "site_id": site_id,
            "host": BROKER_HOST,
            "topics": [{"topic": f"{site_id}/in/{{sensor_id}}", "kind": "sensor_data"}],
            "device_intervals": {"sensor": 60},
        },
    )
    await connected(running, site_id)
    await publish(
        [
            (f"{site_id}/in/a", j({"ts": 1772366400, "value": "12.5"})),
            (f"{site_id}/in/b", b"\xff not json"),
        ]
    )

    async def two() -> Any:
        letters = await items(running, "deadletter.list", {"site_id": site_id})
        return letters if len(letters) == 2 else None

    letters = await eventually(two, what="two dead letters")
    by_topic = {d["topic"]: d for d in letters}
    assert by_topic[f"{site_id}/in/a"]["payload"] == '{"ts": 1772366400, "value": "12.5"}'
    assert by_topic[f"{site_id}/in/b"]["payload"] is None
    assert by_topic[f"{site_id}/in/b"]["payload_base64"] == "/yBub3QganNvbg=="
    # Replay changes nothing while the data is still bad...
    outcome = await running.call("deadletter.replay", [[d["id"] for d in letters]])
    assert outcome == {"replayed": 0, "dead_again": 2}
    # ...but a message that only failed for lack of a matching rule passes
    # once the rule exists: route /in/ to "other" and it has nothing to say.
    await running.call(
        "site.update",
        {"site_id": site_id, "topics": [{"topic": f"{site_id}/in/#", "kind": "other"}]},
    )
    outcome = await running.call("deadletter.replay", {"ids": [by_topic[f"{site_id}/in/a"]["id"]]})
    assert outcome == {"replayed": 1, "dead_again": 0}
    assert await running.call("deadletter.purge", [[by_topic[f"{site_id}/in/b"]["id"]]]) == {
        "purged": 1
    }
    assert await items(running, "deadletter.list", {"site_id": site_id}) == []
    bad = await running.call_raw("deadletter.purge", [[]])
    assert bad["error"]["data"]["field"] == "ids"


@pytest_twisted.ensureDeferred
async def test_openrpc_document_matches_the_registry(running: RunningService) -> None:
    """rpc.discover lists every method with its params, and its schemas accept real calls."""
    doc = await running.call("rpc.discover")
    assert doc["openrpc"].startswith("1.")
    names = {m["name"] for m in doc["methods"]}
    assert {
        "service.status",
        "site.list",
        "site.get",
        "site.create",
        "site.update",
        "site.delete",
        "site.status",
        "site.start",
        "site.stop",
        "site.restart",
        "site.test",
        "device.list",
        "device.counts",
        "reading.list",
        "topic.list",
        "event.list",
        "deadletter.list",
        "deadletter.replay",
        "deadletter.purge",
        "cluster.status",
        "rpc.discover",
    } == names
    create = next(m for m in doc["methods"] if m["name"] == "site.create")
    params = {p["name"]: p for p in create["params"]}
    strings = {"maxLength": MAX_STRING, "pattern": STRING_PATTERN}
    assert params["site_id"]["required"] is True and params["site_id"]["schema"] == {
        "type": "string",
        **strings,
    }
    assert params["password"]["schema"] == {"type": ["string", "null"], **strings}
    # Each required param's declared type is what the method accepts: a
    # call with a wrong type is refused naming it.
    wrong = await running.call_raw("site.create", {"site_id": 5, "host": "h"})
    assert wrong["error"]["data"]["field"] == "site_id"


@pytest_twisted.ensureDeferred
async def test_cluster_status_without_cluster(running: RunningService) -> None:
    """
    cluster.status answers without --cluster too: this instance is no
    member, and the list is of the live members on its database (read from
    the leases, so every instance answers the same).
    """
    status = await running.call("cluster.status")
    assert (status["instance"], status["cluster"]) == ("test", False)
    assert isinstance(status["instances"], list)
    assert "test" not in [m["instance"] for m in status["instances"]]


_GOOD = {"string": "x", "integer": 1, "number": 1.5, "boolean": True, "object": {}, "array": []}
_WRONG = {"string": 5, "integer": "5", "number": "5", "boolean": 1, "object": [], "array": {}}


def _kind(param: dict[str, Any]) -> str:
    """The JSON type of a documented param (the first, when null is allowed too)."""
    declared = param["schema"]["type"]
    return str(declared[0] if isinstance(declared, list) else declared)


def _required(method: dict[str, Any]) -> dict[str, Any]:
    """A good value for each required param of a documented method."""
    return {p["name"]: _GOOD[_kind(p)] for p in method["params"] if p["required"]}


@pytest_twisted.ensureDeferred
async def test_every_documented_param_is_enforced(running: RunningService) -> None:
    """
    For every method and every param in the OpenRPC document, a value of
    the wrong type is refused (-32602 naming that param) before the method
    runs: the document describes what the dispatcher enforces.
    """
    doc = await running.call("rpc.discover")
    checked = 0
    for method in doc["methods"]:
        for param in method["params"]:
            params = {**_required(method), param["name"]: _WRONG[_kind(param)]}
            response = await running.call_raw(method["name"], params)
            assert response.get("error", {}).get("code") == -32602, (method["name"], response)
            assert response["error"]["data"]["field"] == param["name"]
            checked += 1
    assert checked > 40


@pytest_twisted.ensureDeferred
async def test_every_documented_string_rule_is_enforced(running: RunningService) -> None:
    """
    Issue 13: for every string param in the OpenRPC document, NUL, a lone
    surrogate, a C1 control and one character over its maxLength are each
    refused (-32602 naming that param) before the method runs, instead of
    reaching the database (where NUL and surrogates failed with -32603).
    """
    doc = await running.call("rpc.discover")
    checked = 0
    for method in doc["methods"]:
        required = _required(method)
        for param in method["params"]:
            schema = param["schema"]
            if "string" not in schema["type"]:
                continue
            for bad in ("a\x00b", "\ud800", "c1\x85", "x" * (schema["maxLength"] + 1)):
                response = await running.call_raw(method["name"], {**required, param["name"]: bad})
                assert response.get("error", {}).get("code") == -32602, (method["name"], bad)
                assert response["error"]["data"]["field"] == param["name"]
                checked += 1
    assert checked > 80


@pytest_twisted.ensureDeferred
async def test_documented_pages_are_what_the_lists_answer(running: RunningService) -> None:
    """
    rpc.discover describes the result of every list method as a page, and
    each list method answers exactly that shape (issue 14).
    """
    doc = await running.call("rpc.discover")
    paged = {
        m["name"]: m
        for m in doc["methods"]
        if "next_cursor" in m["result"]["schema"].get("properties", {})
    }
    assert set(paged) == {
        "site.list",
        "device.list",
        "reading.list",
        "topic.list",
        "event.list",
        "deadletter.list",
    }
    for name, method in paged.items():
        answer = await running.call(name, _required(method))
        assert set(answer) == set(method["result"]["schema"]["required"]), name
        assert isinstance(answer["items"], list)
        assert answer["next_cursor"] is None or isinstance(answer["next_cursor"], str)
