"""
The broker failing under load, and a flood of malformed input.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

from tests.conftest import PrivateBroker
from tests.publish import publish_blocking
from tests.reliability.harness import BASE, LoadPublisher, Service, all_committed, readings, sql
from tests.twistd_process import wait_until

RESTARTS = 5
#: Seconds of load before each outage and after the last (each round then
#: waits for the connection to prove itself, PROVING_TIME_HERE, and for the
#: site's scheduled retry, 5 s, which is most of the scenario's time).
LOAD_BETWEEN = 1.0
#: More messages than five rounds take at 1,000/s: the publisher is
#: finished once the last outage is over.
MOST_MESSAGES = 200_000

#: --proving-time for the broker restarts (the default, 10 s, would make
#: each round last over 15 s).
PROVING_TIME_HERE = 1.0


def test_broker_killed_and_restarted(
    db_dsn: str,
    no_sites: None,
    tmp_path: Path,
    private_broker: PrivateBroker,
    report: dict[str, Any],
) -> None:
    """
    The site's broker goes down five times during 1,000 msg/s: each time
    the site reconnects at its scheduled retry, its subscriptions work,
    and in the end every message is committed exactly once.
    """
    site_id = "broker-restarts"
    # Each connection must prove itself before the next outage, or the
    # outage counts as one more failed attempt: a short proving time keeps
    # a round to a few seconds, with messages flowing all along.
    service = Service(db_dsn, tmp_path, "reliability", "--proving-time", f"{PROVING_TIME_HERE:g}")
    service.start()
    try:
        service.add_site(site_id, private_broker.port)
        # The load lasts as long as the outages do, plus a while after the
        # last (about 25 s in all; a fixed 50,000 messages ran on for
        # another 25 s of steady load that proved nothing more).
        publisher = LoadPublisher(private_broker.port, site_id, MOST_MESSAGES, 1000.0)
        publisher.start()
        lateness = []
        for _ in range(RESTARTS):
            time.sleep(LOAD_BETWEEN)  # load flows for a while between outages
            wait_until(
                lambda: service.call("site.status", [site_id])["mqtt_retry_count"] == 0,
                within=PROVING_TIME_HERE + 5,
                what="the connection proving itself",
            )
            private_broker.stop()
            waiting = wait_until(
                lambda: (s := service.call("site.status", [site_id]))["state"] == "waiting" and s,
                what="the site noticing",
            )
            assert waiting["mqtt_retry_count"] == 1
            due = waiting["mqtt_next_retry"]
            private_broker.start()
            back = wait_until(
                lambda: (s := service.call("site.status", [site_id]))["state"] == "connected" and s,
                within=15,
                what="the site back",
            )
            from datetime import datetime

            late = (
                datetime.fromisoformat(back["last_connected_at"]) - datetime.fromisoformat(due)
            ).total_seconds()
            assert 0 <= late < 1.5, late  # reconnected at the scheduled retry
            lateness.append(round(late, 2))
        time.sleep(LOAD_BETWEEN)  # and after the last
        publisher.finish()
        publisher.wait()
        count = publisher.count
        final = all_committed(db_dsn, site_id, count, within=60)
        assert final == (count, count)
        report["broker restarted 5 times"] = {
            "injected": f"Mosquitto stopped and started {RESTARTS} times",
            "load": f"{count} QoS 1 messages at 1000/s",
            "published": publisher.acked,
            "committed": final[1],
            "duplicates": final[0] - final[1],
            "dead_lettered": 0,
            "reconnect_seconds_after_scheduled_retry": lateness,
        }
    finally:
        service.stop()


def _malformed(rng: random.Random, i: int) -> bytes:
    kind = i % 11
    if kind == 0:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
    if kind == 1:
        return b'{"value": ' + str(rng.random()).encode()  # truncated JSON
    if kind == 2:
        return json.dumps([rng.random()]).encode()
    if kind == 3:
        return json.dumps({"value": str(rng.random())}).encode()
    if kind == 4:
        return json.dumps({"values": {"t": None}}).encode()
    if kind == 5:
        return json.dumps({"ts": "not a time", "value": 1}).encode()
    if kind == 6:
        return b'{"value": NaN}'
    if kind == 7:
        return b'{"values": {"a\\ud800": 1}}'  # a lone surrogate (JSON allows it, UTF-8 not)
    if kind == 8:
        return b'{"value": 1, "unit": "\\udc00"}'
    if kind == 9:
        return b'{"value": 1, "note": "\\u0000"}'
    return json.dumps({"unit": "V"}).encode()


def test_malformed_flood(
    db_dsn: str,
    no_sites: None,
    tmp_path: Path,
    private_broker: PrivateBroker,
    report: dict[str, Any],
) -> None:
    """
    10,000 malformed payloads among 10,000 valid ones: every malformed one
    is a dead letter with its reason, every valid one is committed, and the
    process lives on.
    """
    site_id = "malformed-flood"
    service = Service(db_dsn, tmp_path, instance="reliability")
    service.start()
    try:
        service.add_site(site_id, private_broker.port)
        rng = random.Random(8)
        messages = []
        for i in range(10_000):
            sensor = f"{site_id}/sensor/s{i % 10}/data"
            messages.append((sensor, json.dumps({"ts": BASE + i / 1000, "value": i}).encode()))
            messages.append((sensor, _malformed(rng, i)))
        publish_blocking("127.0.0.1", private_broker.port, messages, False)

        def counts() -> Any:
            r = readings(db_dsn, site_id)
            [(dead, empty_reasons)] = sql(
                db_dsn,
                "SELECT count(*), count(*) FILTER (WHERE reason = '') FROM dead_letter "
                "WHERE site_id = %s",
                site_id,
            )
            return (r, dead, empty_reasons) if r[0] >= 10_000 and dead >= 10_000 else None

        (rows, distinct), dead, empty_reasons = wait_until(counts, within=60, what="all of it")
        assert (rows, distinct, dead, empty_reasons) == (10_000, 10_000, 10_000, 0)
        status = service.call("site.status", [site_id])
        assert status["state"] == "connected"
        assert status["messages_rejected"] == 10_000
        assert service.process is not None and service.process.poll() is None
        report["10,000 malformed payloads"] = {
            "injected": "10,000 malformed payloads of 11 kinds (lone surrogates and NUL "
            "escapes among them), interleaved with valid ones",
            "load": "20,000 QoS 1 messages, as fast as the publisher goes",
            "published": 20_000,
            "committed": rows,
            "duplicates": rows - distinct,
            "dead_lettered": dead,
        }
    finally:
        service.stop()


def test_hostile_flood_of_long_topics(
    db_dsn: str,
    no_sites: None,
    tmp_path: Path,
    private_broker: PrivateBroker,
    report: dict[str, Any],
) -> None:
    """
    4,000 messages with 60 kB topic levels (each a dead letter) as fast as
    a publisher can send them, beside a site with normal traffic: memory
    stays bounded, every hostile message is a dead letter, the other site's
    readings are all committed, and a normal message sent afterwards on the
    flooded site commits within a second.
    """
    flooded, neighbour = "flood-long-topics", "flood-neighbour"
    service = Service(db_dsn, tmp_path, instance="reliability")
    service.start()
    try:
        service.add_site(flooded, private_broker.port)
        service.add_site(neighbour, private_broker.port)
        rss_before = service.rss_mb()
        count = 4000
        neighbours = LoadPublisher(private_broker.port, neighbour, 4000, 500.0)
        neighbours.start()
        rng = random.Random(13)
        level = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz0123456789") for _ in range(60_000))
        hostile = [(f"{flooded}/sensor/{level[i:]}{i}/data", b'{"value": 1}') for i in range(count)]
        started = time.monotonic()
        rss = [rss_before]

        def dead_letters() -> int:
            [(n,)] = sql(db_dsn, "SELECT count(*) FROM dead_letter WHERE site_id = %s", flooded)
            rss.append(service.rss_mb())
            return int(n)

        publish_blocking("127.0.0.1", private_broker.port, hostile, False)
        wait_until(lambda: dead_letters() >= count, within=120, what="every hostile message")
        flood_seconds = time.monotonic() - started
        sent = time.monotonic()
        publish_blocking(
            "127.0.0.1",
            private_broker.port,
            [(f"{flooded}/sensor/ok/data", json.dumps({"ts": BASE, "value": 7}).encode())],
            False,
        )
        wait_until(lambda: readings(db_dsn, flooded)[0] == 1, within=5, what="the normal message")
        recovery = time.monotonic() - sent
        neighbours.wait()
        final = wait_until(
            lambda: (r := readings(db_dsn, neighbour))[0] >= 4000 and r,
            within=60,
            what="the neighbour's readings",
        )
        assert final == (4000, 4000)
        assert recovery < 1.0, recovery
        assert dead_letters() == count
        [(longest_topic, longest_raw)] = sql(
            db_dsn,
            "SELECT max(length(topic)), max(octet_length(topic_raw)) FROM dead_letter "
            "WHERE site_id = %s",
            flooded,
        )
        assert longest_topic <= 1024 and longest_raw <= 4096
        assert max(rss) - rss_before < 100, (rss_before, max(rss))
        status = service.call("site.status", [flooded])
        assert (status["state"], status["last_error"]) == ("connected", None)
        report["4,000 messages with 60 kB topics"] = {
            "injected": "4,000 QoS 1 messages with a 60 kB topic level, as fast as the publisher "
            "goes, beside a site at 500 msg/s",
            "load": "4,000 hostile + 4,000 normal messages",
            "published": count + 4000 + 1,
            "committed": final[1] + 1,
            "duplicates": final[0] - final[1],
            "dead_lettered": count,
            "rss_mb_before_and_max": [round(rss_before, 1), round(max(rss), 1)],
            "flood_seconds": round(flood_seconds, 1),
            "recovery_seconds": round(recovery, 2),
        }
    finally:
        service.stop()
