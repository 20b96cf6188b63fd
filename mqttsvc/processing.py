"""
From an MQTT message to the database effects it has.

Processing is pure: it routes a topic to the site's subscription that
matched it, parses the payload, and returns the effects (frozen values) for
the batch writer.  Anything it cannot understand becomes a L{DeadLetter}
with the reason, never an exception.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import attrs

from mqttsvc.config import TopicSubscription


@attrs.frozen
class TopicSeen:
    """
    A message arrived on this exact topic.
    """

    site_id: str
    topic: str
    at: datetime


@attrs.frozen
class GatewaySeen:
    """
    A gateway sent a heartbeat; it is online.
    """

    site_id: str
    gateway_id: str
    at: datetime
    payload: str


@attrs.frozen
class DeadLetter:
    """
    A message that could not be processed, kept with the reason.
    """

    site_id: str
    topic: str
    payload: bytes
    reason: str
    at: datetime


Effect = TopicSeen | GatewaySeen | DeadLetter


@attrs.frozen
class _CompiledFilter:
    subscription: TopicSubscription
    levels: tuple[str, ...]
    multi: bool  # ends with '#'

    def match(self, parts: list[str]) -> list[str] | None:
        """
        The topic levels that the filter's C{+} wildcards matched, or None.
        """
        levels = self.levels
        if self.multi:
            if len(parts) < len(levels):
                return None
        elif len(parts) != len(levels):
            return None
        captured = []
        for level, part in zip(levels, parts, strict=False):
            if level == "+":
                captured.append(part)
            elif level != part:
                return None
        return captured


class Router:
    """
    Matches topics against one site's subscriptions, precompiled once.

    Filters are tried in the order they were configured; the first match
    decides the kind.
    """

    def __init__(self, subscriptions: tuple[TopicSubscription, ...]) -> None:
        compiled = []
        for sub in subscriptions:
            levels = tuple(sub.topic.split("/"))
            multi = levels[-1] == "#"
            compiled.append(_CompiledFilter(sub, levels[:-1] if multi else levels, multi))
        self._filters = tuple(compiled)

    def route(self, topic: str) -> tuple[TopicSubscription, list[str]] | None:
        """
        The subscription a topic belongs to, with the values of its C{+}
        levels; None when no subscription matches.
        """
        parts = topic.split("/")
        for f in self._filters:
            captured = f.match(parts)
            if captured is not None:
                return f.subscription, captured
        return None


def _decode_object(payload: bytes) -> tuple[dict[str, Any] | None, str | None]:
    """
    Parse a JSON object payload.

    @return: the object and its canonical JSON text, or None and a reason.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"payload is not UTF-8: {e.reason} at byte {e.start}"
    try:
        value = json.loads(text)
    except ValueError as e:
        return None, f"payload is not JSON: {e}"
    if not isinstance(value, dict):
        return None, f"payload is a JSON {type(value).__name__}, not an object"
    canonical = json.dumps(value, separators=(",", ":"), allow_nan=False)
    if "\\u0000" in canonical:
        return None, "payload contains a NUL character, which PostgreSQL cannot store"
    return value, canonical


def process(site_id: str, router: Router, topic: str, payload: bytes, at: datetime) -> list[Effect]:
    """
    The effects of one message received at C{at}.
    """
    effects: list[Effect] = [TopicSeen(site_id, topic, at)]
    routed = router.route(topic)
    if routed is None:
        return effects
    subscription, captured = routed
    if subscription.kind == "gateway_heartbeat":
        if not captured or not captured[0]:
            effects.append(
                DeadLetter(
                    site_id,
                    topic,
                    payload,
                    f"subscription {subscription.topic!r} has no '+' level for the gateway id",
                    at,
                )
            )
            return effects
        try:
            value, canonical = _decode_object(payload)
        except ValueError as e:  # out-of-range floats and the like
            value, canonical = None, f"payload cannot be stored as JSON: {e}"
        if value is None:
            assert canonical is not None
            effects.append(DeadLetter(site_id, topic, payload, canonical, at))
            return effects
        assert canonical is not None
        effects.append(GatewaySeen(site_id, captured[0], at, canonical))
    return effects
