"""
Site configuration values: validation names the offending field.
"""

from __future__ import annotations

import pytest

from mqttsvc.config import (
    ConfigError,
    SiteConfig,
    TopicSubscription,
    default_topics,
    topics_from_params,
)


def test_default_topics() -> None:
    """A site created without topics subscribes to the three default shapes."""
    assert [(t.topic, t.kind, t.qos) for t in default_topics("north")] == [
        ("north/gateway/+/heartbeat", "gateway_heartbeat", 1),
        ("north/datalogger/+/+/heartbeat", "datalogger_heartbeat", 1),
        ("north/sensor/+/data", "sensor_data", 1),
    ]
    assert topics_from_params("north", None) == default_topics("north")


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"site_id": "bad id"}, "site_id"),
        ({"site_id": ""}, "site_id"),
        ({"host": ""}, "host"),
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"port": True}, "port"),
        ({"protocol": "4"}, "protocol"),
        ({"keepalive": 1}, "keepalive"),
        ({"is_enabled": "yes"}, "is_enabled"),
        ({"username": 5}, "username"),
    ],
)
def test_invalid_site_fields(kwargs: dict[str, object], field: str) -> None:
    """Each invalid value is rejected with the field's name."""
    values: dict[str, object] = {"site_id": "north", "host": "127.0.0.1", **kwargs}
    with pytest.raises(ConfigError) as raised:
        SiteConfig(**values)  # type: ignore[arg-type]
    assert raised.value.field == field


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ([{"topic": "a/#/b", "kind": "other"}], "topics[0].topic"),
        ([{"topic": "a/b+", "kind": "other"}], "topics[0].topic"),
        ([{"topic": "a/+", "kind": "bogus"}], "topics[0].kind"),
        ([{"topic": "a/+", "kind": "other", "qos": 2}], "topics[0].qos"),
        ([{"kind": "other"}], "topics[0].topic"),
        ([{"topic": "a", "colour": "red"}], "topics[0]"),
        (["a/b"], "topics[0]"),
        ("a/b", "topics"),
    ],
)
def test_invalid_topics(raw: object, field: str) -> None:
    """A malformed subscription is reported with its index and field."""
    with pytest.raises(ConfigError) as raised:
        topics_from_params("north", raw)  # type: ignore[arg-type]
    assert raised.value.field == field


def test_duplicate_topics_rejected() -> None:
    """The same filter twice in one site is a configuration error."""
    sub = TopicSubscription("a/+", "other")
    with pytest.raises(ConfigError, match="listed twice"):
        SiteConfig(site_id="north", host="h", topics=(sub, sub))


def test_password_not_in_repr() -> None:
    """The password never shows in a site's repr (logs, manhole)."""
    config = SiteConfig(site_id="north", host="h", username="u", password="s3cret-canary")
    assert "s3cret-canary" not in repr(config)
    assert config.client_id("host-a") == "mqttsvc_host-a_north"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "broker .example"),
        ("host", "broker\x00.example"),
        ("host", "a/#/b"),
        ("host", "-broker.example"),
        ("host", "é" * 70),
        ("host", "b" * 254),
        ("client_id_prefix", "has space"),
        ("client_id_prefix", "wild+card"),
        ("client_id_prefix", "ctl\x01"),
        ("client_id_prefix", "p" * 65),
        ("status_topic", "status/+/x"),
        ("status_topic", "status/#"),
        ("status_topic", "nul\x00"),
        ("status_topic", "bell\x07"),
        ("status_topic", "t" * 1025),
        ("status_topic", "é" * 513),
    ],
)
def test_host_client_id_prefix_and_status_topic_are_checked(field: str, value: str) -> None:
    """
    Issue 13: a host is a host name or an IP literal, a client id prefix
    holds only client id characters, a status topic is a topic name of at
    most 1024 bytes without wildcards or control characters.
    """
    with pytest.raises(ConfigError) as raised:
        SiteConfig(**{"site_id": "north", "host": "127.0.0.1", field: value})  # type: ignore[arg-type]
    assert raised.value.field == field


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("host", "broker.example.com."),
        ("host", "mqtt_broker"),
        ("host", "::1"),
        ("host", "fe80::1%eth0"),
        ("host", "10.0.0.7"),
        ("client_id_prefix", ""),
        ("client_id_prefix", "plant-3.line_2"),
        ("status_topic", "plant/ü/status"),
    ],
)
def test_usual_hosts_prefixes_and_status_topics_pass(field: str, value: str) -> None:
    """The stricter checks still accept what sites really use."""
    config = SiteConfig(**{"site_id": "north", "host": "127.0.0.1", field: value})  # type: ignore[arg-type]
    assert getattr(config, field) == value
