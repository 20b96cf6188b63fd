"""
From an MQTT message to the database effects it has.

Processing is pure: it routes a topic to the site's subscription that
matched it, parses the payload, and returns the effects (frozen values) for
the batch writer.  Anything it cannot understand becomes a L{DeadLetter}
with the reason, never an exception.  The protocol is described in
C{docs/protocol.md}.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from mqttsvc.config import (
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_MAX_PAYLOAD,
    KIND_IDS,
    MAX_TOPIC_BYTES,
    TopicSubscription,
)
from mqttsvc.records import DeadLetter, DeviceSeen, Effect, Reading, TopicSeen

#: Device kind of each message kind that has one.
DEVICE_KIND = {
    "gateway_heartbeat": "gateway",
    "datalogger_heartbeat": "datalogger",
    "sensor_data": "sensor",
}

#: Epoch values above this are taken as milliseconds (1e11 s is in the year 5138).
_MILLISECONDS_FROM = 1e11
_EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
_LATEST = datetime(2200, 1, 1, tzinfo=UTC)
_LATEST_SECONDS = _LATEST.timestamp()
#: Integers beyond this do not fit a float8 (its largest is about 1.8e308).
_LARGEST_INT = 2**1023


class _Compiled:
    """
    A subscription's pattern, split once: each level is a literal to
    compare, or a capture into a named id.
    """

    __slots__ = ("ids", "levels", "multi", "subscription")

    def __init__(self, subscription: TopicSubscription) -> None:
        self.subscription = subscription
        levels = subscription.filter.split("/")
        self.multi = levels[-1] == "#"
        if self.multi:
            levels = levels[:-1]
        names = subscription.level_names()[: len(levels)]
        # Plain '+' levels supply the ids the pattern does not name, in order.
        unnamed = iter(n for n in KIND_IDS[subscription.kind] if n not in names)
        self.ids: list[tuple[int, str]] = []
        for i, name in enumerate(names):
            if name == "":
                name = next(unnamed, None)
            if name:
                self.ids.append((i, name))
        self.levels = [None if level == "+" else level for level in levels]

    def match(self, parts: list[str]) -> dict[str, str] | None:
        levels = self.levels
        if len(parts) != len(levels) and not (self.multi and len(parts) >= len(levels)):
            return None
        for level, part in zip(levels, parts, strict=False):
            if level is not None and level != part:
                return None
        return {name: parts[i] for i, name in self.ids}


#: Routes remembered per site (then forgotten all at once, and learned again).
ROUTE_CACHE = 100_000


class Router:
    """
    Matches topics against one site's subscriptions, compiled once.

    Patterns are tried in the order they were configured; the first match
    decides the kind.
    """

    def __init__(self, subscriptions: tuple[TopicSubscription, ...]) -> None:
        self._compiled = [_Compiled(s) for s in subscriptions]
        # A device keeps sending on the same topics: remember each topic's
        # route (a bounded number of them).
        self._routes: dict[str, tuple[TopicSubscription, dict[str, str]] | None] = {}

    def route(self, topic: str) -> tuple[TopicSubscription, dict[str, str]] | None:
        """
        The subscription a topic belongs to, with the ids its levels carry
        (do not change them: routes are shared); None when no subscription
        matches.
        """
        routes = self._routes
        if topic in routes:
            return routes[topic]
        route = None
        parts = topic.split("/")
        for compiled in self._compiled:
            ids = compiled.match(parts)
            if ids is not None:
                route = compiled.subscription, ids
                break
        if len(routes) >= ROUTE_CACHE:
            routes.clear()
        routes[topic] = route
        return route


#: The reason of a message on a topic that none of its site's filters match.
FOREIGN_TOPIC = "topic matches none of the site's subscriptions"


class Rejected(Exception):
    """
    The message cannot be processed; the text says why.
    """


def topic_problem(topic: str) -> str | None:
    """
    Why a topic name cannot be processed, or None when it can.

    MQTT forbids wildcards and NUL in a topic name and requires UTF-8 (the
    transport decodes with C{surrogateescape}, so bytes that are not UTF-8
    arrive as lone surrogates); a topic over L{MAX_TOPIC_BYTES} cannot be a
    key of C{discovered_topic}.  Such a message is a dead letter with its
    raw topic, never altered silently nor a device of its own.
    """
    if len(topic) * 4 > MAX_TOPIC_BYTES or not topic.isascii():
        try:
            size = len(topic.encode("utf-8"))
        except UnicodeEncodeError as e:
            return f"topic is not valid UTF-8 (at character {e.start})"
        if size > MAX_TOPIC_BYTES:
            return f"topic of {size} bytes is over the limit of {MAX_TOPIC_BYTES}"
    if "\x00" in topic:
        return "topic contains a NUL character, which MQTT does not allow"
    if "+" in topic or "#" in topic:
        return "topic name contains a wildcard (+ or #), which MQTT does not allow"
    return None


def _refuse_constant(name: str) -> Any:
    raise Rejected("payload holds NaN or Infinity, which JSON does not allow")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant)
_raw_decode = _DECODER.raw_decode


def _decode_json(text: str) -> Any:
    """
    C{json.loads}, a little quicker for the usual payload (no whitespace
    around it); anything else goes the full way, for the full error.
    """
    try:
        value, end = _raw_decode(text)
    except ValueError:
        return _DECODER.decode(text)
    if end != len(text):
        return _DECODER.decode(text)
    return value


def _decode_object(payload: bytes) -> tuple[dict[str, Any], str]:
    """
    Parse a JSON object payload into the object and its text.

    The text is kept as it came (C{jsonb} normalizes it in the database),
    so a payload is decoded once and never encoded again.
    """
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Rejected(f"payload is not UTF-8: {e.reason} at byte {e.start}") from None
    try:
        value = _decode_json(text)
    except ValueError as e:
        raise Rejected(f"payload is not JSON: {e}") from None
    except RecursionError:
        raise Rejected("payload is not JSON we accept: it nests too deeply") from None
    if not isinstance(value, dict):
        raise Rejected(f"payload is a JSON {_json_type(value)}, not an object")
    # A NUL or a lone surrogate can only be written as a \u escape (raw,
    # the first is not JSON and the second not UTF-8); PostgreSQL stores
    # neither.  Most payloads have no escape at all.
    if "\\u" in text:
        _check_strings(value)
    return value, text


def _check_strings(value: Any) -> None:
    """
    Refuse a decoded JSON value if any of its strings (keys included) holds
    a NUL or a lone surrogate.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            for key, inner in item.items():
                _check_text(key)
                stack.append(inner)
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            _check_text(item)


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise Rejected("payload contains a NUL character (\\u0000), which PostgreSQL cannot store")
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise Rejected(
                f"payload contains a lone surrogate ({text[e.start]!a}), which is not Unicode text"
            ) from None


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if value is None:
        return "null"
    return "array" if isinstance(value, list) else "object"


def _number(value: Any) -> bool:
    """
    Whether a JSON value is a finite number that fits a float8.
    """
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    if kind is int:
        # JSON integers have no size limit; a float8 column has.
        return -_LARGEST_INT < value < _LARGEST_INT
    return False


def _quote(value: Any) -> str:
    """
    A value as a reason quotes it: its C{repr}, cut short (a device chooses
    how long it is).
    """
    text = repr(value)
    return text if len(text) <= 64 else text[:60] + "...'"


def parse_ts(value: Any, received: datetime) -> datetime:
    """
    A message's C{ts}: epoch seconds or milliseconds, or ISO 8601 (naive
    means UTC); the receive time when absent.

    @raise Rejected: for any other value.
    """
    if value is None:
        return received
    if _number(value):
        seconds = value / 1000.0 if abs(value) >= _MILLISECONDS_FROM else float(value)
        # Checked on the number: comparing aware datetimes costs more.
        if not 0.0 <= seconds < _LATEST_SECONDS:
            raise Rejected(f"ts {_quote(value)} is out of range (1970 to 2200)")
        return datetime.fromtimestamp(seconds, UTC)
    elif isinstance(value, str):
        try:
            ts = datetime.fromisoformat(value.strip())
        except ValueError:
            raise Rejected(f"ts {_quote(value)} is neither epoch seconds nor ISO 8601") from None
        if ts.tzinfo is None:
            ts = ts.replace(tzinfo=UTC)
    else:
        raise Rejected(f"ts must be a number or an ISO 8601 string, not a JSON {_json_type(value)}")
    if not _EARLIEST <= ts < _LATEST:
        raise Rejected(f"ts {_quote(value)} is out of range (1970 to 2200)")
    return ts


def _heartbeat(fields: dict[str, Any]) -> tuple[str | None, float | None]:
    status = fields.get("status")
    if status is not None and (not isinstance(status, str) or len(status) > 64):
        raise Rejected("status must be a string of at most 64 characters")
    interval = fields.get("interval")
    if interval is not None and (not _number(interval) or not 0 < interval <= 7 * 86400):
        raise Rejected("interval must be a number of seconds from 0 to 604800")
    return status, None if interval is None else float(interval)


def _check_skew(value: Any, ts: datetime, received: datetime, max_skew: float) -> None:
    """
    Refuse a C{ts} (parsed from C{value}) ahead of the receive time by more
    than C{max_skew} seconds: a clock that far ahead is wrong, and its
    readings would sort after every true one.  Called only for a C{ts}
    ahead at all, which keeps the usual message (sent before it arrived)
    to one comparison.
    """
    ahead = (ts - received).total_seconds()
    if ahead > max_skew:
        raise Rejected(
            f"ts {_quote(value)} is {ahead:.0f}s ahead of the receive time; at most "
            f"{max_skew:g}s is allowed (--max-clock-skew)"
        )


def _readings(
    site_id: str, sensor_id: str, fields: dict[str, Any], received: datetime, ts: datetime
) -> list[Reading]:
    unit = fields.get("unit")
    if unit is not None and (not isinstance(unit, str) or len(unit) > 32):
        raise Rejected("unit must be a string of at most 32 characters")
    values: dict[str, Any] = {}
    if "value" in fields:
        values["value"] = fields["value"]
    if "values" in fields:
        extra = fields["values"]
        if not isinstance(extra, dict) or not extra:
            raise Rejected("values must be a non-empty object of names to numbers")
        for name in extra:
            if not 1 <= len(name) <= 100:
                raise Rejected("each name in values must have 1 to 100 characters")
            if name in values:
                raise Rejected(f"{_quote(name)} is given both as value and in values")
        values.update(extra)
    if not values:
        raise Rejected("sensor data needs a value (a number) or values (an object of numbers)")
    for name, value in values.items():
        if not _number(value):
            where = "value" if name == "value" and "value" in fields else f"values.{name}"
            kind = _json_type(value)
            if kind == "number":
                # 1e999 parses as infinity: "not a JSON number" was wrong.
                raise Rejected(
                    f"{where} is out of range: it must be a finite number within ±1.8e308 "
                    "(what a float8 column holds)"
                )
            raise Rejected(f"{where} must be a finite number, not a JSON {kind}")
    return [
        Reading(site_id, sensor_id, ts, name, float(value), unit, received)
        for name, value in values.items()
    ]


def process(
    site_id: str,
    router: Router,
    topic: str,
    payload: bytes,
    at: datetime,
    *,
    retained: bool = False,
    max_payload: int = DEFAULT_MAX_PAYLOAD,
    size: int | None = None,
    sha256: bytes | None = None,
    max_skew: float = DEFAULT_MAX_CLOCK_SKEW,
) -> list[Effect]:
    """
    The effects of one message received at C{at}.

    A retained message is a replay of the past, not a sign of life: it
    updates no device, and its readings are kept only when they carry
    their own C{ts} (so a replay cannot invent a reading at receive time).

    @param size: the payload's full size when C{payload} is only its
        beginning (the transport discards the rest of a payload over the
        limit as it reads it); C{sha256} is then the full payload's hash.
    @param max_skew: seconds a message's C{ts} may be ahead of C{at}.
    """
    problem = topic_problem(topic)
    if problem is not None:
        return [DeadLetter(site_id, topic, payload, problem, at, size, sha256)]
    routed = router.route(topic)
    if routed is None:
        # A broker that does not honour our filters (or a message still in
        # flight for a filter just removed): it belongs to none of the
        # site's subscriptions and creates no state, not even a topic.
        return [DeadLetter(site_id, topic, payload, FOREIGN_TOPIC, at, size, sha256)]
    if size is not None and size > len(payload):
        reason = f"payload of {size} bytes is over the limit of {max_payload}"
        return [
            TopicSeen(site_id, topic, at),
            DeadLetter(site_id, topic, payload, reason, at, size, sha256),
        ]
    effects: list[Effect] = [TopicSeen(site_id, topic, at, payload)]
    subscription, ids = routed
    device_kind = DEVICE_KIND.get(subscription.kind)
    if device_kind is None:
        return effects
    if not all(ids.values()):
        effects.append(DeadLetter(site_id, topic, payload, "a device id level is empty", at))
        return effects
    try:
        if len(payload) > max_payload:
            raise Rejected(f"payload of {len(payload)} bytes is over the limit of {max_payload}")
        fields, text = _decode_object(payload)
        value = fields.get("ts")
        if value is None:
            ts, own_ts = at, None
        else:
            ts = own_ts = parse_ts(value, at)
            if ts > at:
                _check_skew(value, ts, at, max_skew)
        if device_kind == "sensor":
            sensor_id = ids["sensor_id"]
            readings = _readings(site_id, sensor_id, fields, at, ts)
            if retained and "ts" not in fields:
                readings = []
            if not retained:
                effects.append(
                    DeviceSeen(site_id, "sensor", None, sensor_id, at, text, None, None, own_ts)
                )
            effects.extend(readings)
        else:
            status, interval = _heartbeat(fields)
            if not retained:
                effects.append(
                    DeviceSeen(
                        site_id,
                        device_kind,
                        ids.get("gateway_id") if device_kind == "datalogger" else None,
                        ids["datalogger_id"] if device_kind == "datalogger" else ids["gateway_id"],
                        at,
                        text,
                        status,
                        interval,
                        own_ts,
                    )
                )
    except Rejected as e:
        effects.append(DeadLetter(site_id, topic, payload, str(e), at))
    return effects
