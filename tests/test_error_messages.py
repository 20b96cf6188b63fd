"""
Errors that name the right field and say what is wrong with it (issue 15,
items 7 and 8), through the real JSON-RPC API.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted

from mqttsvc.config import ConfigError, TopicSubscription
from tests.service import RunningService


async def refused(service: RunningService, params: dict[str, Any]) -> tuple[str, str]:
    """site.create with C{params}: the -32602's field and message."""
    answer = await service.call_raw("site.create", params)
    error = answer["error"]
    assert error["code"] == -32602, error
    return error["data"]["field"], error["message"]


@pytest_twisted.ensureDeferred
async def test_hosts_that_can_never_work_say_why(running: RunningService, site_id: str) -> None:
    """
    A URL, a host with its port, and a host with a space are refused as
    host, each saying what is wrong, instead of a site retrying forever.
    """
    cases = {
        "mqtt://127.0.0.1:1883": "without a scheme ('mqtt://')",
        "127.0.0.1:1883": "must not hold a port (':1883'): give the host alone and the port as",
        "my broker": "must not contain spaces",
    }
    for host, problem in cases.items():
        field, message = await refused(running, {"site_id": site_id, "host": host})
        assert field == "host"
        assert message.startswith("Invalid params: host must ")
        assert problem in message, (host, message)
    assert (await running.call_raw("site.get", {"site_id": site_id}))["error"]["code"] == -32001


@pytest_twisted.ensureDeferred
async def test_a_bad_site_id_is_reported_as_the_site_id(running: RunningService) -> None:
    """a+b was reported as a bad topic built from it; it is a bad site_id."""
    field, message = await refused(running, {"site_id": "a+b", "host": "127.0.0.1"})
    assert field == "site_id", message
    assert "topic" not in message


@pytest_twisted.ensureDeferred
async def test_a_password_without_a_key_is_a_sentence(
    running: RunningService, site_id: str
) -> None:
    """
    Without --secret-key-file a password is refused naming password, in a
    message that reads as a sentence and says what to do.
    """
    running.store.secrets = None
    field, message = await refused(
        running, {"site_id": site_id, "host": "127.0.0.1", "password": "hunter2hunter2"}
    )
    assert field == "password"
    assert message == (
        "Invalid params: password cannot be stored: mqttsvc runs without --secret-key-file. "
        "Start it with one (see docs/security.md), or leave the password out."
    )


def test_a_topic_over_the_mqtt_limit_says_so() -> None:
    """A 70,000-character filter is over 65,535 bytes, which is what the message says."""
    with pytest.raises(ConfigError) as raised:
        TopicSubscription("a" * 70_000, "other")
    assert raised.value.field == "topic"
    assert raised.value.message == (
        "is 70,000 bytes of UTF-8; an MQTT topic filter holds at most 65,535"
    )
    with pytest.raises(ConfigError, match="non-empty"):
        TopicSubscription("", "other")
