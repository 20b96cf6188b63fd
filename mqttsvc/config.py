"""
Site configuration as frozen values, validated when they are built.

A L{SiteConfig} is what the supervisor needs to run one site's MQTT client;
it is loaded from C{mqtt_connection} / C{mqtt_topic} rows or built from
C{site.create} parameters.  Invalid values fail here, naming the field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from typing import Any

import attrs

#: Topic kinds the message processor knows how to handle.
TOPIC_KINDS = frozenset({"gateway_heartbeat", "datalogger_heartbeat", "sensor_data", "other"})

#: MQTT protocol versions a site may select.
PROTOCOLS = frozenset({"3.1.1", "5"})

_SITE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


class ConfigError(ValueError):
    """
    A configuration value is invalid.

    @ivar field: the name of the offending field.
    """

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


def _check_site_id(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    check_site_id(value, attribute.name)


def check_site_id(value: Any, field: str = "site_id") -> None:
    """
    @raise ConfigError: naming C{field} when C{value} cannot be a site id.
    Checked before anything is built from it (the default topics), so that
    a bad site id is reported as itself, not as a bad topic.
    """
    if not isinstance(value, str) or not _SITE_ID.match(value):
        raise ConfigError(
            field,
            "must be 1-64 characters of letters, digits, '_', '-' or '.', "
            "starting with a letter or digit",
        )


_NAMED_LEVEL = re.compile(r"^\{([a-z_][a-z0-9_]*)\}$")

#: The device ids each kind of message needs, in the order that plain '+'
#: levels supply them when the pattern does not name them.
KIND_IDS: dict[str, tuple[str, ...]] = {
    "gateway_heartbeat": ("gateway_id",),
    "datalogger_heartbeat": ("gateway_id", "datalogger_id"),
    "sensor_data": ("sensor_id",),
    "other": (),
}


def _check_topic_pattern(instance: object, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not value:
        raise ConfigError(attribute.name, "must be a non-empty MQTT topic filter")
    size = len(value.encode("utf-8", "surrogatepass"))
    if size > 65535:
        raise ConfigError(
            attribute.name,
            f"is {size:,} bytes of UTF-8; an MQTT topic filter holds at most 65,535",
        )
    levels = value.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ConfigError(attribute.name, f"'#' must be the whole last level in {value!r}")
        if "+" in level and level != "+":
            raise ConfigError(attribute.name, f"'+' must be a whole level in {value!r}")
        if ("{" in level or "}" in level) and not _NAMED_LEVEL.match(level):
            raise ConfigError(
                attribute.name,
                f"a named level must be a whole level like {{gateway_id}}, not {level!r}",
            )


def _check_in(allowed: frozenset[Any]) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value not in allowed:
            raise ConfigError(attribute.name, f"must be one of {sorted(allowed)}, not {value!r}")

    return check


#: Characters no configured text may hold: C0 controls (NUL included), DEL,
#: C1 controls, and surrogates (in a str from JSON only a lone one can be
#: left, which is not valid Unicode and cannot be stored).
CONTROL_OR_SURROGATE = re.compile("[\x00-\x1f\x7f-\x9f\ud800-\udfff]")


def _check_topic_name(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, str) or not value or CONTROL_OR_SURROGATE.search(value):
        raise ConfigError(
            attribute.name, "must be a non-empty MQTT topic name without control characters"
        )
    if "+" in value or "#" in value:
        raise ConfigError(attribute.name, "must be a topic name, without wildcards")
    if len(value.encode()) > MAX_TOPIC_BYTES:
        raise ConfigError(attribute.name, f"must be at most {MAX_TOPIC_BYTES} bytes of UTF-8")


#: A label of a host name: letters, digits, '-' (not first or last) and '_'
#: (container and service names use it).
_HOST_LABEL = re.compile(r"(?!-)[A-Za-z0-9_-]{1,63}(?<!-)")


def _check_host(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if isinstance(value, str) and 0 < len(value) <= 253:
        try:
            ipaddress.ip_address(value)
            return
        except ValueError:
            labels = value.removesuffix(".").split(".")
            if all(_HOST_LABEL.fullmatch(label) for label in labels):
                return
    raise ConfigError(attribute.name, _host_problem(value))


def _host_problem(value: Any) -> str:
    """
    What is wrong with a host, in the terms of the mistake: a URL, a port
    written into it, a space (each of which would retry forever on a DNS
    error, as they did before issue 13).
    """
    rule = (
        "must be a host name (dot-separated letters, digits, '-' and '_') or an IP address, "
        "at most 253 characters"
    )
    if not isinstance(value, str) or not value:
        return rule
    scheme = re.match(r"([A-Za-z][A-Za-z0-9+.\-]*)://", value)
    if scheme:
        return (
            f"must be the broker's host name or address alone, without a scheme "
            f"({scheme.group(0)!r}); put the port in port, and TLS settings in tls"
        )
    host, colon, port = value.rpartition(":")
    if colon and host and port.isdigit() and ":" not in host:
        return f"must not hold a port ({':' + port!r}): give the host alone and the port as port"
    if any(c.isspace() for c in value):
        return "must not contain spaces (a host name is dot-separated letters, digits, '-' and '_')"
    return rule


_CLIENT_ID_PREFIX = re.compile(r"[A-Za-z0-9_.\-]{0,64}")


def _check_client_id_prefix(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    # The client id is {prefix}_{instance}_{site_id} (or {prefix}_{site_id}
    # in a cluster): the same characters as the others, which every broker
    # accepts.
    if not isinstance(value, str) or not _CLIENT_ID_PREFIX.fullmatch(value):
        raise ConfigError(attribute.name, "must be at most 64 letters, digits, '_', '-' or '.'")


def _check_int_range(low: int, high: int) -> Any:
    def check(instance: object, attribute: attrs.Attribute[int], value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(attribute.name, f"must be an integer from {low} to {high}")

    return check


def _check_str(max_len: int, *, empty: bool = True) -> Any:
    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, str) or len(value) > max_len or (not empty and not value):
            qualifier = "" if empty else "non-empty "
            raise ConfigError(
                attribute.name, f"must be a {qualifier}string of at most {max_len} characters"
            )

    return check


def _check_optional_str(max_len: int) -> Any:
    inner = _check_str(max_len)

    def check(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            inner(instance, attribute, value)

    return check


def _check_bool(instance: object, attribute: attrs.Attribute[bool], value: bool) -> None:
    if not isinstance(value, bool):
        raise ConfigError(attribute.name, "must be true or false")


@attrs.frozen
class TopicSubscription:
    """
    One subscription of a site: an MQTT topic filter, the kind of message
    it carries, and the QoS to subscribe with.
    """

    topic: str = attrs.field(validator=_check_topic_pattern)
    kind: str = attrs.field(validator=_check_in(TOPIC_KINDS))
    qos: int = attrs.field(default=1, validator=_check_int_range(0, 1))

    def __attrs_post_init__(self) -> None:
        names = self.level_names()
        if len(set(filter(None, names))) != len(list(filter(None, names))):
            raise ConfigError("topic", f"a level name is used twice in {self.topic!r}")
        needed = KIND_IDS[self.kind]
        named = [n for n in names if n in needed]
        wildcards = names.count("")
        if len(named) + wildcards < len(needed) or (named and len(named) < len(needed)):
            raise ConfigError(
                "topic",
                f"{self.kind} needs the levels {', '.join('{' + n + '}' for n in needed)} "
                f"(or as many '+' levels) in {self.topic!r}",
            )

    def level_names(self) -> list[str | None]:
        """
        For each level: the name of a named level, C{""} for C{+}, None for
        a literal level or C{#}.
        """
        names: list[str | None] = []
        for level in self.topic.split("/"):
            named = _NAMED_LEVEL.match(level)
            names.append(named.group(1) if named else "" if level == "+" else None)
        return names

    @property
    def filter(self) -> str:
        """
        The MQTT topic filter to subscribe to: named levels become C{+}.
        """
        levels = self.topic.split("/")
        return "/".join("+" if _NAMED_LEVEL.match(level) else level for level in levels)


#: Seconds a device of each kind is expected to stay silent at most, unless
#: the site or the device's own heartbeat ('interval') says otherwise.
DEFAULT_INTERVALS: dict[str, float] = {"gateway": 60.0, "datalogger": 300.0, "sensor": 900.0}

#: A device is offline once it has been silent this many intervals.
DEFAULT_GRACE = 2.5

#: The largest payload processed, in bytes; larger ones are dead-lettered.
DEFAULT_MAX_PAYLOAD = 256 * 1024

#: Seconds a message's own C{ts} may be ahead of its receive time (clocks
#: drift); a message further in the future is a dead letter, never clamped.
DEFAULT_MAX_CLOCK_SKEW = 300.0

#: Devices a site may have unless its C{max_devices} says otherwise; a new
#: device id beyond it is a dead letter.  Each known device costs about
#: 330 bytes of the service's memory (the offline detector's entry, measured
#: by C{python -m bench device-memory}).
DEFAULT_MAX_DEVICES = 100_000

#: The largest device limit a site (or --max-devices) may set.
MAX_DEVICES_LIMIT = 100_000_000

#: The most of a dead letter's payload that is kept, in bytes; its full size
#: and SHA-256 are kept beside it.  Also what the broker connection keeps of a
#: payload over the limit while it discards the rest unread into memory.
DEAD_LETTER_KEEP = 64 * 1024

#: The longest topic processed, in bytes of UTF-8.  MQTT allows 65,535, but
#: a topic is a key of C{discovered_topic} and PostgreSQL refuses an index
#: row over 2,704 bytes; real topics are far shorter (AWS IoT allows 256).
MAX_TOPIC_BYTES = 1024


def _check_interval(instance: object, attribute: attrs.Attribute[float], value: float) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 7 * 86400:
        raise ConfigError(attribute.name, "must be a number of seconds from 0 to 604800")


@attrs.frozen
class OfflinePolicy:
    """
    When a site's devices count as offline: silent for longer than their
    expected interval times the grace factor.
    """

    gateway: float = attrs.field(default=DEFAULT_INTERVALS["gateway"], validator=_check_interval)
    datalogger: float = attrs.field(
        default=DEFAULT_INTERVALS["datalogger"], validator=_check_interval
    )
    sensor: float = attrs.field(default=DEFAULT_INTERVALS["sensor"], validator=_check_interval)
    grace: float = attrs.field(default=DEFAULT_GRACE)

    @grace.validator
    def _check_grace(self, attribute: attrs.Attribute[float], value: float) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or not 1 <= value <= 100:
            raise ConfigError("offline_grace", "must be a number from 1 to 100")

    def interval(self, kind: str) -> float:
        value: float = getattr(self, kind)
        return value

    def overrides(self) -> dict[str, float] | None:
        """
        The intervals that differ from the defaults (what is stored).
        """
        changed = {k: self.interval(k) for k in DEFAULT_INTERVALS}
        changed = {k: v for k, v in changed.items() if v != DEFAULT_INTERVALS[k]}
        return changed or None

    @classmethod
    def from_settings(cls, intervals: Any, grace: Any) -> OfflinePolicy:
        """
        Build from C{device_intervals} (an object of kind to seconds, or
        null) and C{offline_grace} (a number, or null).

        @raise ConfigError: naming C{device_intervals.KIND} or
            C{offline_grace}.
        """
        if intervals is None:
            intervals = {}
        if not isinstance(intervals, dict):
            raise ConfigError("device_intervals", "must be an object of kind to seconds")
        unknown = set(intervals) - set(DEFAULT_INTERVALS)
        if unknown:
            raise ConfigError(
                "device_intervals",
                f"unknown kinds {sorted(unknown)}; use {sorted(DEFAULT_INTERVALS)}",
            )
        try:
            return cls(**intervals, grace=DEFAULT_GRACE if grace is None else grace)
        except ConfigError as e:
            if e.field == "offline_grace":
                raise
            raise ConfigError(f"device_intervals.{e.field}", e.message) from None


def _check_path(instance: object, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is not None and (
        not isinstance(value, str) or not value.startswith("/") or len(value) > 4096
    ):
        raise ConfigError(f"tls.{attribute.name}", "must be an absolute path on mqttsvc's host")


@attrs.frozen
class TlsSettings:
    """
    How to reach a site's broker over TLS: the CA bundle to trust (None:
    the system's), a client certificate and key for mutual TLS, and the
    explicit, loudly logged opt-out of certificate and host name checks.
    """

    ca_certs: str | None = attrs.field(default=None, validator=_check_path)
    certfile: str | None = attrs.field(default=None, validator=_check_path)
    keyfile: str | None = attrs.field(default=None, validator=_check_path)
    insecure: bool = attrs.field(default=False)

    @insecure.validator
    def _check_insecure(self, attribute: attrs.Attribute[bool], value: bool) -> None:
        if not isinstance(value, bool):
            raise ConfigError("tls.insecure", "must be true or false")
        if self.keyfile is not None and self.certfile is None:
            raise ConfigError("tls.keyfile", "needs tls.certfile too")

    @classmethod
    def from_settings(cls, value: Any) -> TlsSettings | None:
        """
        From the C{tls} object (None means no TLS; C{{}} means TLS with the
        system's CA store).

        @raise ConfigError: naming C{tls} or C{tls.FIELD}.
        """
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ConfigError("tls", "must be an object (or null for no TLS)")
        unknown = set(value) - {"ca_certs", "certfile", "keyfile", "insecure"}
        if unknown:
            raise ConfigError("tls", f"unknown keys {sorted(unknown)}")
        return cls(**value)

    def as_settings(self) -> dict[str, Any]:
        return {k: v for k, v in attrs.asdict(self).items() if v not in (None, False)}


def default_topics(site_id: str) -> tuple[TopicSubscription, ...]:
    """
    The subscriptions a site gets when it is created without C{topics}.

    @raise ConfigError: naming C{site_id} when it cannot be one.
    """
    check_site_id(site_id)
    return (
        TopicSubscription(f"{site_id}/gateway/+/heartbeat", "gateway_heartbeat"),
        TopicSubscription(f"{site_id}/datalogger/+/+/heartbeat", "datalogger_heartbeat"),
        TopicSubscription(f"{site_id}/sensor/+/data", "sensor_data"),
    )


@attrs.frozen
class SiteConfig:
    """
    Everything needed to run one site's MQTT connection.

    The password is kept out of C{repr} so that it never reaches a log line
    or the manhole's display of a site.
    """

    site_id: str = attrs.field(validator=_check_site_id)
    host: str = attrs.field(validator=_check_host)
    port: int = attrs.field(default=1883, validator=_check_int_range(1, 65535))
    username: str | None = attrs.field(default=None, validator=_check_optional_str(256))
    password: str | None = attrs.field(
        default=None, repr=False, validator=_check_optional_str(1024)
    )
    client_id_prefix: str = attrs.field(default="mqttsvc", validator=_check_client_id_prefix)
    is_enabled: bool = attrs.field(default=True, validator=_check_bool)
    protocol: str = attrs.field(default="3.1.1", validator=_check_in(PROTOCOLS))
    keepalive: int = attrs.field(default=60, validator=_check_int_range(5, 3600))
    topics: tuple[TopicSubscription, ...] = attrs.field(default=())
    status_topic: str | None = attrs.field(default=None, validator=_check_topic_name)
    offline: OfflinePolicy = attrs.field(factory=OfflinePolicy)
    tls: TlsSettings | None = attrs.field(default=None)
    #: How many devices the site may have; None: the service's
    #: C{--max-devices} (L{DEFAULT_MAX_DEVICES}).
    max_devices: int | None = attrs.field(default=None)

    @max_devices.validator
    def _check_max_devices(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if value is not None:
            _check_int_range(1, MAX_DEVICES_LIMIT)(self, attribute, value)

    @topics.validator
    def _check_topics(self, attribute: attrs.Attribute[Any], value: Any) -> None:
        if not isinstance(value, tuple) or not all(isinstance(t, TopicSubscription) for t in value):
            raise ConfigError("topics", "must be a list of topic subscriptions")
        seen = set()
        for sub in value:
            if sub.topic in seen:
                raise ConfigError("topics", f"topic {sub.topic!r} is listed twice")
            seen.add(sub.topic)

    def client_id(self, instance: str | None) -> str:
        """
        The MQTT client identifier: C{{prefix}_{instance}_{site_id}} for an
        instance that runs alone, C{{prefix}_{site_id}} in a cluster
        (C{instance} None, C{--cluster}).

        Alone, it is the same on every start of the same instance, so the
        broker resumes the persistent session (and delivers what it queued
        for us), and it differs between instances and between sites, so
        neither two independent mqttsvc instances nor two sites on one
        broker take each other's session over.  In a cluster it is the same
        for every owner of the site, so that a new owner resumes the
        session the last one left (with the messages queued while nobody
        owned it) and the broker's client-id takeover disconnects a stale
        owner (docs/cluster.md; the change of id: docs/upgrades.md).
        """
        if instance is None:
            return f"{self.client_id_prefix}_{self.site_id}"
        return f"{self.client_id_prefix}_{instance}_{self.site_id}"

    def connection_differs(self, other: SiteConfig) -> bool:
        """
        Whether going from this configuration to C{other} needs a new
        connection (anything but the subscriptions and the device limit
        changed).
        """
        return attrs.evolve(self, topics=other.topics, max_devices=other.max_devices) != other


def topics_from_params(site_id: str, raw: Iterable[Any] | None) -> tuple[TopicSubscription, ...]:
    """
    Build subscriptions from C{site.create}'s C{topics} parameter (a list of
    C{{"topic", "kind", "qos"}} objects), or the defaults when it is absent.

    @raise ConfigError: naming C{topics[i].field} for a malformed entry.
    """
    check_site_id(site_id)
    if raw is None:
        return default_topics(site_id)
    if isinstance(raw, str | bytes | dict):
        raise ConfigError("topics", "must be a list of {topic, kind, qos} objects")
    result = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ConfigError(f"topics[{i}]", "must be an object with topic, kind and qos")
        unknown = set(item) - {"topic", "kind", "qos"}
        if unknown:
            raise ConfigError(f"topics[{i}]", f"unknown keys {sorted(unknown)}")
        if "topic" not in item:
            raise ConfigError(f"topics[{i}].topic", "is required")
        try:
            result.append(
                TopicSubscription(
                    topic=item["topic"], kind=item.get("kind", "other"), qos=item.get("qos", 1)
                )
            )
        except ConfigError as e:
            raise ConfigError(f"topics[{i}].{e.field}", e.message) from None
    return tuple(result)
