"""
Routing topics and turning payloads into effects, dead letters included.
"""

from __future__ import annotations

from datetime import UTC, datetime

from mqttsvc.config import TopicSubscription, default_topics
from mqttsvc.processing import DeadLetter, GatewaySeen, Router, TopicSeen, process

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def test_router_captures_wildcards() -> None:
    """The values of '+' levels are captured; '#' matches any tail."""
    router = Router(
        (
            TopicSubscription("s/gateway/+/heartbeat", "gateway_heartbeat"),
            TopicSubscription("s/raw/#", "other"),
        )
    )
    routed = router.route("s/gateway/gw-1/heartbeat")
    assert routed is not None
    assert routed[0].kind == "gateway_heartbeat"
    assert routed[1] == ["gw-1"]
    raw = router.route("s/raw/a/b/c")
    assert raw is not None and raw[0].kind == "other"
    assert router.route("s/gateway/gw-1/heartbeat/extra") is None
    assert router.route("s/gateway/heartbeat") is None
    assert router.route("other/gateway/gw-1/heartbeat") is None


def test_first_matching_subscription_wins() -> None:
    """Filters are tried in configured order."""
    router = Router(
        (TopicSubscription("s/+/x", "other"), TopicSubscription("s/gateway/+", "gateway_heartbeat"))
    )
    routed = router.route("s/gateway/x")
    assert routed is not None and routed[0].kind == "other"


def test_gateway_heartbeat() -> None:
    """A heartbeat yields the topic sighting and the gateway's new state."""
    effects = process(
        "s", Router(default_topics("s")), "s/gateway/gw-1/heartbeat", b'{"status": "ok"}', AT
    )
    assert effects == [
        TopicSeen("s", "s/gateway/gw-1/heartbeat", AT),
        GatewaySeen("s", "gw-1", AT, '{"status":"ok"}'),
    ]


def test_other_kinds_are_counted_as_topics() -> None:
    """Messages of kinds without their own effects still count as topics."""
    effects = process("s", Router(default_topics("s")), "s/sensor/t1/data", b"{}", AT)
    assert effects == [TopicSeen("s", "s/sensor/t1/data", AT)]


def test_unmatched_topic_only_counted() -> None:
    """A topic no subscription claims is recorded as discovered."""
    effects = process("s", Router(default_topics("s")), "s/else", b"x", AT)
    assert effects == [TopicSeen("s", "s/else", AT)]


def _dead_reason(payload: bytes) -> str:
    effects = process("s", Router(default_topics("s")), "s/gateway/g/heartbeat", payload, AT)
    assert effects[0] == TopicSeen("s", "s/gateway/g/heartbeat", AT)
    assert len(effects) == 2 and isinstance(effects[1], DeadLetter)
    assert effects[1].payload == payload
    return effects[1].reason


def test_bad_payloads_become_dead_letters() -> None:
    """Each kind of bad payload is kept with a reason that says what is wrong."""
    assert "not JSON" in _dead_reason(b"garbage")
    assert "not UTF-8" in _dead_reason(b"\xff\xfe")
    assert "JSON list, not an object" in _dead_reason(b"[1, 2]")
    assert "NUL" in _dead_reason(b'{"a": "\\u0000"}')
    assert "cannot be stored" in _dead_reason(b'{"a": NaN}')


def test_subscription_without_wildcard_for_gateway() -> None:
    """A gateway subscription that captures no id is a configuration problem, reported."""
    router = Router((TopicSubscription("s/gw/heartbeat", "gateway_heartbeat"),))
    effects = process("s", router, "s/gw/heartbeat", b"{}", AT)
    assert isinstance(effects[1], DeadLetter)
    assert "no '+' level" in effects[1].reason
