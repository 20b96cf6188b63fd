"""
Routing topics and turning payloads into effects; every bad payload is a
dead letter with its reason, never an exception.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mqttsvc.config import ConfigError, TopicSubscription, default_topics
from mqttsvc.ingest.processing import FOREIGN_TOPIC, Rejected, Router, parse_ts, process
from mqttsvc.records import DeadLetter, DeviceKey, DeviceSeen, Reading, TopicSeen

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
ROUTER = Router(default_topics("s"))


def run(topic: str, payload: Any, **kwargs: Any) -> list[Any]:
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return process("s", ROUTER, topic, data, AT, **kwargs)


def test_router_named_and_positional_levels() -> None:
    """Named levels say which id they carry; plain '+' levels fill the kind's ids in order."""
    router = Router(
        (
            TopicSubscription("s/gw/{gateway_id}/dl/{datalogger_id}/hb", "datalogger_heartbeat"),
            TopicSubscription("s/{datalogger_id}/{gateway_id}/x", "datalogger_heartbeat"),
            TopicSubscription("s/datalogger/+/+/heartbeat", "datalogger_heartbeat"),
            TopicSubscription("s/raw/#", "other"),
        )
    )
    assert router.route("s/gw/G/dl/D/hb") == (
        router._compiled[0].subscription,
        {"gateway_id": "G", "datalogger_id": "D"},
    )
    assert router.route("s/D2/G2/x")[1] == {"datalogger_id": "D2", "gateway_id": "G2"}  # type: ignore[index]
    assert router.route("s/datalogger/G3/D3/heartbeat")[1] == {  # type: ignore[index]
        "gateway_id": "G3",
        "datalogger_id": "D3",
    }
    assert router.route("s/raw/a/b/c")[0].kind == "other"  # type: ignore[index]
    assert router.route("s/gw/G/dl/D/hb/extra") is None
    assert router.route("other/gw/G/dl/D/hb") is None


def test_named_levels_are_subscribed_as_wildcards() -> None:
    sub = TopicSubscription("acme/{sensor_id}/telemetry", "sensor_data")
    assert sub.filter == "acme/+/telemetry"


@pytest.mark.parametrize(
    ("topic", "kind"),
    [
        ("s/{gateway_id}/{gateway_id}", "gateway_heartbeat"),
        ("s/heartbeat", "gateway_heartbeat"),
        ("s/{gateway_id}/x", "datalogger_heartbeat"),
        ("s/{gateway_id}/+/x", "datalogger_heartbeat"),
        ("s/{sensor", "sensor_data"),
    ],
)
def test_patterns_that_cannot_carry_the_ids(topic: str, kind: str) -> None:
    """A pattern that cannot name every id its kind needs is refused when configured."""
    with pytest.raises(ConfigError):
        TopicSubscription(topic, kind)


def test_gateway_heartbeat() -> None:
    """A heartbeat says the gateway is alive, with its own status and interval."""
    effects = run("s/gateway/gw-1/heartbeat", {"status": "ok", "interval": 30, "fw": "1.2"})
    assert effects == [
        TopicSeen("s", "s/gateway/gw-1/heartbeat", AT),
        DeviceSeen(
            "s",
            "gateway",
            None,
            "gw-1",
            AT,
            '{"status": "ok", "interval": 30, "fw": "1.2"}',  # the text as it came
            "ok",
            30.0,
        ),
    ]
    assert effects[1].key == DeviceKey("s", "gateway", None, "gw-1")


def test_datalogger_heartbeat_knows_its_gateway() -> None:
    [_, seen] = run("s/datalogger/gw-1/dl-9/heartbeat", {})
    assert seen == DeviceSeen("s", "datalogger", "gw-1", "dl-9", AT, "{}", None, None)


def test_sensor_value_and_values() -> None:
    """A single value is named 'value'; each entry of values is a reading of its own."""
    single = run("s/sensor/t1/data", {"ts": 1767225600, "value": 21.5, "unit": "°C"})
    ts = datetime(2026, 1, 1, tzinfo=UTC)
    assert single[1] == DeviceSeen("s", "sensor", None, "t1", AT, single[1].payload, None, None, ts)
    assert single[2:] == [Reading("s", "t1", ts, "value", 21.5, "°C", AT)]
    several = run("s/sensor/t2/data", {"ts": 1767225600000, "values": {"t": 1, "h": 55.5}})
    assert [(r.name, r.value, r.ts) for r in several[2:]] == [("t", 1.0, ts), ("h", 55.5, ts)]
    no_ts = run("s/sensor/t3/data", {"value": 1})
    assert no_ts[2].ts == AT


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, AT),
        (1767225600, datetime(2026, 1, 1, tzinfo=UTC)),
        (1767225600.5, datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
        (1767225600500, datetime(2026, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
        ("2026-01-01T00:00:00Z", datetime(2026, 1, 1, tzinfo=UTC)),
        ("2026-01-01T01:00:00+01:00", datetime(2026, 1, 1, tzinfo=UTC)),
        ("2026-01-01 00:00:00", datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
def test_timestamps(raw: Any, expected: datetime) -> None:
    """Epoch seconds, milliseconds and ISO 8601 all mean the same instant."""
    assert parse_ts(raw, AT) == expected


@pytest.mark.parametrize("raw", [True, "yesterday", [], {}, -1e20, 1e30, "9999-01-01T00:00:00"])
def test_bad_timestamps(raw: Any) -> None:
    with pytest.raises(Rejected):
        parse_ts(raw, AT)


@pytest.mark.parametrize(
    ("topic", "payload", "reason"),
    [
        ("s/gateway/g/heartbeat", b"garbage", "payload is not JSON"),
        ("s/gateway/g/heartbeat", b"\xff\xfe", "payload is not UTF-8"),
        ("s/gateway/g/heartbeat", b"[1, 2]", "payload is a JSON array, not an object"),
        ("s/gateway/g/heartbeat", b'{"a": "\\u0000"}', "NUL character"),
        ("s/gateway/g/heartbeat", b'{"\\u0000": 1}', "NUL character"),
        ("s/sensor/t/data", b'{"values": {"a\\ud800": 1}}', "lone surrogate"),
        ("s/sensor/t/data", b'{"value": 1, "unit": "\\udc00"}', "lone surrogate"),
        ("s/gateway/g/heartbeat", b'{"status": "\\ud800"}', "lone surrogate"),
        ("s/gateway/g/heartbeat", b'{"x": [[{"y": "\\udfff"}]]}', "lone surrogate"),
        ("s/gateway/g/heartbeat", b"[" * 100_000 + b"]" * 100_000, "nests too deeply"),
        ("s/gateway/g/heartbeat", {"ts": "x" * 100_000}, "ts 'xxxx"),
        ("s/gateway/g/heartbeat", b'{"a": NaN}', "NaN or Infinity"),
        ("s/gateway/g/heartbeat", b'{"a": [1, -Infinity]}', "NaN or Infinity"),
        ("s/gateway/g/heartbeat", {"status": 5}, "status must be a string"),
        ("s/gateway/g/heartbeat", {"interval": "soon"}, "interval must be a number"),
        ("s/gateway/g/heartbeat", {"interval": 0}, "interval must be a number"),
        ("s/gateway/g/heartbeat", {"ts": "noon"}, "ts 'noon' is neither"),
        ("s/sensor/t/data", {}, "needs a value"),
        ("s/sensor/t/data", {"value": "1"}, "value must be a finite number, not a JSON string"),
        ("s/sensor/t/data", {"value": True}, "value must be a finite number"),
        ("s/sensor/t/data", {"value": 10**400}, "value is out of range: it must be a finite"),
        ("s/sensor/t/data", b'{"value": 1e999}', "value is out of range: it must be a finite"),
        ("s/sensor/t/data", b'{"values": {"a": -1e999}}', "values.a is out of range"),
        ("s/gateway/g/heartbeat", {"interval": 10**400}, "interval must be a number"),
        ("s/sensor/t/data", {"values": {"a": None}}, "values.a must be a finite number"),
        ("s/sensor/t/data", {"values": []}, "values must be a non-empty object"),
        ("s/sensor/t/data", {"value": 1, "values": {"value": 2}}, "given both"),
        ("s/sensor/t/data", {"value": 1, "unit": 5}, "unit must be a string"),
    ],
)
def test_bad_payloads_become_dead_letters(topic: str, payload: Any, reason: str) -> None:
    """Each kind of bad payload is kept whole, with a reason that says what is wrong."""
    effects = run(topic, payload)
    assert effects[0] == TopicSeen("s", topic, AT)
    assert len(effects) == 2
    [letter] = effects[1:]
    assert isinstance(letter, DeadLetter)
    assert reason in letter.reason
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    assert letter.payload == raw


def test_escapes_that_look_like_nul_are_not() -> None:
    """An escaped backslash followed by u0000 is text, not a NUL; a valid surrogate pair is text."""
    effects = run("s/gateway/g/heartbeat", b'{"note": "\\\\u0000", "e": "\\ud83d\\ude80"}')
    assert [type(e) for e in effects] == [TopicSeen, DeviceSeen]


def test_a_long_reason_is_cut_short() -> None:
    """A reason quotes what the device sent, but never all of a long value."""
    [_, letter] = run("s/gateway/g/heartbeat", {"ts": "x" * 100_000})
    assert isinstance(letter, DeadLetter) and len(letter.reason) < 200


@pytest.mark.parametrize(
    ("topic", "reason"),
    [
        ("s/gateway/g\x00/heartbeat", "NUL"),
        ("s/gateway/+/heartbeat", "wildcard"),
        ("s/gateway/#", "wildcard"),
        ("s/gateway/" + "g" * 2000 + "/heartbeat", "over the limit of 1024"),
        ("s/gateway/\u00e9" * 300, "over the limit of 1024"),
        (b"s/gateway/\xff\xfe/heartbeat".decode("utf-8", "surrogateescape"), "not valid UTF-8"),
    ],
)
def test_topics_mqtt_forbids_are_dead_letters(topic: str, reason: str) -> None:
    """
    A topic name with a NUL, a wildcard, bytes that are not UTF-8, or over
    the length limit is a dead letter alone: no topic sighting, no device.
    """
    [letter] = run(topic, {"status": "ok"})
    assert isinstance(letter, DeadLetter)
    assert reason in letter.reason
    assert letter.topic == topic


def test_a_payload_the_transport_cut_is_a_dead_letter() -> None:
    """A payload over the limit, of which the transport kept the start, keeps size and hash."""
    effects = run("s/sensor/t/data", b'{"value": 1, "pad": "xx', size=5_000_000, sha256=b"h" * 32)
    assert effects[0] == TopicSeen("s", "s/sensor/t/data", AT)
    [letter] = effects[1:]
    assert isinstance(letter, DeadLetter)
    assert (letter.size, letter.sha256) == (5_000_000, b"h" * 32)
    assert "payload of 5000000 bytes is over the limit" in letter.reason


def test_oversized_payload() -> None:
    effects = run("s/sensor/t/data", {"value": 1, "pad": "x" * 100}, max_payload=50)
    assert isinstance(effects[1], DeadLetter)
    assert "over the limit of 50" in effects[1].reason


def test_retained_messages_are_not_signs_of_life() -> None:
    """A retained replay updates no device; only readings with their own ts are kept."""
    heartbeat = run("s/gateway/g/heartbeat", {"status": "ok"}, retained=True)
    assert heartbeat == [TopicSeen("s", "s/gateway/g/heartbeat", AT)]
    with_ts = run("s/sensor/t/data", {"ts": 1767225600, "value": 1}, retained=True)
    assert [type(e) for e in with_ts] == [TopicSeen, Reading]
    without_ts = run("s/sensor/t/data", {"value": 1}, retained=True)
    assert [type(e) for e in without_ts] == [TopicSeen]


def test_other_topics_are_only_counted() -> None:
    """A topic of an 'other' subscription is counted and nothing more, whatever its payload."""
    router = Router((TopicSubscription("s/#", "other"),))
    assert process("s", router, "s/a/b", b"\x00", AT) == [TopicSeen("s", "s/a/b", AT)]


def test_a_foreign_topic_is_a_dead_letter_and_creates_nothing() -> None:
    """
    A topic none of the site's filters match (a broker that ignores our
    subscriptions) is a dead letter with the reason, and nothing else: no
    discovered topic, no device, no reading, whatever its payload.
    """
    for payload in (b"x", json.dumps({"value": 1}).encode()):
        for topic in ("s/else", "other-site/sensor/t/data", "s/sensor/t/data/extra"):
            assert run(topic, payload) == [DeadLetter("s", topic, payload, FOREIGN_TOPIC, AT)]
    # Also when the transport cut its payload: the full size and hash stay.
    cut = run("elsewhere", b"x" * 10, size=10**6, sha256=b"h" * 32)
    assert cut == [DeadLetter("s", "elsewhere", b"x" * 10, FOREIGN_TOPIC, AT, 10**6, b"h" * 32)]


json_values = st.recursive(
    st.none() | st.booleans() | st.floats(allow_nan=False) | st.integers() | st.text(),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)
sensor_fields = st.fixed_dictionaries(
    {},
    optional={
        "ts": json_values | st.integers(min_value=0, max_value=2**42),
        "value": json_values,
        "values": json_values | st.dictionaries(st.text(max_size=8), st.floats(), max_size=4),
        "unit": json_values,
        "status": json_values,
        "interval": json_values,
    },
)


@pytest.mark.parametrize("topic", ["s/sensor/t/data", "s/gateway/g/heartbeat"])
def test_any_payload_is_processed_or_dead_lettered(topic: str) -> None:
    """
    Whatever arrives, processing returns effects: either the device's
    effects, or exactly one dead letter holding the payload.
    """

    # Hypothesis runs inside the test: pytest-twisted's hook does not
    # accept @given on the test function itself.
    @settings(max_examples=300, deadline=None)
    @given(payload=st.binary(max_size=200) | sensor_fields.map(lambda d: json.dumps(d).encode()))
    def check(payload: bytes) -> None:
        effects = process("s", ROUTER, topic, payload, AT)
        assert effects[0] == TopicSeen("s", topic, AT)
        dead = [e for e in effects if isinstance(e, DeadLetter)]
        if dead:
            assert len(effects) == 2 and dead[0].payload == payload and dead[0].reason
        else:
            assert isinstance(effects[1], DeviceSeen)
            for reading in effects[2:]:
                assert isinstance(reading, Reading)
                assert reading.value == reading.value  # finite, never NaN

    check()


def test_a_ts_too_far_ahead_is_a_dead_letter() -> None:
    """
    A ts more than max_skew seconds ahead of the receive time is a dead
    letter saying by how much, for heartbeats and sensor data alike (never
    clamped); one within the tolerance, or in the past, is the device's
    own time, kept beside the receive time.
    """
    ahead = AT.timestamp() + 301
    for topic, fields in (
        ("s/sensor/t/data", {"value": 1}),
        ("s/gateway/g/heartbeat", {"status": "ok"}),
    ):
        effects = run(topic, {**fields, "ts": ahead})
        assert [type(e) for e in effects] == [TopicSeen, DeadLetter]
        assert effects[1].reason == (
            f"ts {ahead!r} is 301s ahead of the receive time; at most 300s is allowed "
            "(--max-clock-skew)"
        )
        assert [type(e) for e in run(topic, {**fields, "ts": ahead}, max_skew=400)][1] is (
            DeviceSeen
        )
        within = run(topic, {**fields, "ts": AT.timestamp() + 299})[1]
        assert within.ts == datetime.fromtimestamp(AT.timestamp() + 299, UTC)
        old = run(topic, {**fields, "ts": 3600})[1]
        assert old.ts == datetime.fromtimestamp(3600, UTC) and old.at == AT
        assert run(topic, fields)[1].ts is None  # no ts of its own: the receive time
