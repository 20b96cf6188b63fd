"""
The messages the benchmarks send: sites with the default topic layout, a
mix of 20% heartbeats and 80% sensor data, and C{ts} as the first field of
every payload so that a receiver can read the send time without parsing
JSON.
"""

from __future__ import annotations

import time

import attrs
import psycopg2

from bench import wire
from mqttsvc.config import SiteConfig, default_topics

#: mqttsvc's instance name in the benchmarks (part of every client id).
INSTANCE = "bench"

#: Devices per site.
GATEWAYS = 20
DATALOGGERS = 100
SENSORS = 1000


def site_ids(count: int) -> list[str]:
    return [f"bench-{i:04d}" for i in range(count)]


def filters(site_id: str) -> list[str]:
    """
    The MQTT filters a site subscribes to (its default topics).
    """
    return [t.filter for t in default_topics(site_id)]


def mqttsvc_client_id(site_id: str) -> str:
    """
    The client id mqttsvc uses for a site, so that a benchmark can prime
    the session it will resume.
    """
    return SiteConfig(site_id=site_id, host="127.0.0.1").client_id(INSTANCE)


def insert_sites(
    dsn: str, sites: list[str], port: int, protocol: str = "3.1.1", enabled: bool = True
) -> None:
    """
    Write sites (enabled unless told otherwise) with the default topics,
    as the backend would by SQL.
    """
    conn = psycopg2.connect(dsn)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "INSERT INTO mqtt_connection (site_id, host, port, protocol, is_enabled) "
                "SELECT s, '127.0.0.1', %s, %s, %s FROM unnest(%s::text[]) AS s",
                (port, protocol, enabled, sites),
            )
            rows = [(s, t.topic, t.kind) for s in sites for t in default_topics(s)]
            cur.execute(
                "INSERT INTO mqtt_topic (connection_id, topic, kind, qos) "
                "SELECT c.id, t.topic, t.kind, 1 "
                "FROM unnest(%s::text[], %s::text[], %s::text[]) AS t(site_id, topic, kind) "
                "JOIN mqtt_connection c USING (site_id)",
                ([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows]),
            )
    finally:
        conn.close()


def prime(port: int, client_ids: list[str], sites: list[str]) -> None:
    """
    Make each site's persistent session under its client id (in the same
    order), subscribed to its default topics, so that the broker queues
    what is published for it before the consumer first connects.
    """
    for client_id, site in zip(client_ids, sites, strict=True):
        wire.prime_session(port, client_id, filters(site))


def publish_backlog(port: int, sites: list[str], count: int) -> tuple[float, int]:
    """
    Publish a backlog of C{count} messages over C{sites} (L{backlog}, a day
    old), QoS 1, as fast as the broker takes them.

    @return: the seconds it took, and the readings the messages hold.
    """
    messages, readings = backlog(sites, count, time.time() - 86400)
    packets = [wire.publish_packet(t, p, i % 65535 + 1) for i, (t, p) in enumerate(messages)]
    return wire.publish_all(port, packets, timeout=60 + count / 1000), readings


@attrs.frozen
class Message:
    topic: bytes
    #: The payload after C{{"ts":}, without the send time.
    rest: bytes
    readings: int

    def payload(self, ts: float) -> bytes:
        return b'{"ts":%.6f,' % ts + self.rest


def message(sites: list[str], i: int) -> Message:
    """
    The C{i}th message of the mix: per 20 messages one gateway heartbeat,
    three datalogger heartbeats and sixteen sensor messages (a quarter of
    them with two values).
    """
    site = sites[i % len(sites)]
    n = i // len(sites)
    slot = n % 20
    if slot == 0:
        gateway = f"gw-{n % GATEWAYS:03d}"
        return Message(
            f"{site}/gateway/{gateway}/heartbeat".encode(), b'"status":"ok","uptime":%d}' % n, 0
        )
    if slot <= 3:
        gateway = f"gw-{n % GATEWAYS:03d}"
        logger = f"dl-{n % DATALOGGERS:03d}"
        return Message(
            f"{site}/datalogger/{gateway}/{logger}/heartbeat".encode(),
            b'"status":"ok","interval":300}',
            0,
        )
    sensor = f"sn-{n % SENSORS:04d}"
    topic = f"{site}/sensor/{sensor}/data".encode()
    if slot % 4 == 0:
        return Message(topic, b'"values":{"t":%d.5,"h":%d.25},"unit":"C"}' % (n % 40, n % 90), 2)
    return Message(topic, b'"value":%d.5,"unit":"C"}' % (n % 40), 1)


def backlog(sites: list[str], count: int, first_ts: float) -> tuple[list[tuple[bytes, bytes]], int]:
    """
    C{count} messages with distinct C{ts} one millisecond apart (so every
    reading is stored: readings are unique on their C{ts}).

    @return: C{(topic, payload)} pairs and the number of readings they hold.
    """
    out = []
    readings = 0
    for i in range(count):
        m = message(sites, i)
        out.append((m.topic, m.payload(first_ts + i / 1000.0)))
        readings += m.readings
    return out, readings


def sent_at(payload: bytes) -> float:
    """
    The send time a benchmark payload carries in its first field.
    """
    return float(payload[6 : payload.index(b",")])
