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
from tests.reliability.harness import BASE, LoadPublisher, Service, readings, sql
from tests.twistd_process import wait_until

RESTARTS = 5


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
    service = Service(db_dsn, tmp_path, instance="reliability")
    service.start()
    try:
        service.add_site(site_id, private_broker.port)
        count = 30_000
        publisher = LoadPublisher(private_broker.port, site_id, count, 1000.0)
        publisher.start()
        lateness = []
        for _ in range(RESTARTS):
            time.sleep(1.5)  # load flows for a while between outages
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
        publisher.wait()
        final = wait_until(
            lambda: (r := readings(db_dsn, site_id))[0] >= count and r,
            within=60,
            what="every reading",
        )
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
    kind = i % 8
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
            "injected": "10,000 malformed payloads of 8 kinds, interleaved with valid ones",
            "load": "20,000 QoS 1 messages, as fast as the publisher goes",
            "published": 20_000,
            "committed": rows,
            "duplicates": rows - distinct,
            "dead_lettered": dead,
        }
    finally:
        service.stop()
