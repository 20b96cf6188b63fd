"""
The database failing under load: its connections terminated again and
again, then unreachable for 20 seconds behind a proxy the test cuts.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

from tests.conftest import PrivateBroker
from tests.reliability.harness import (
    LoadPublisher,
    Service,
    all_committed,
    proxied_database,
    readings,
    sql,
)
from tests.twistd_process import wait_until

OUTAGE = 20.0
#: More messages than the scenario takes at 1,000/s: the publisher is
#: finished once writing has resumed.
MOST_MESSAGES = 200_000


def _queue_depth(metrics: str) -> float:
    match = re.search(r"^mqttsvc_write_queue_depth (\S+)$", metrics, re.M)
    assert match is not None
    return float(match.group(1))


def _lane_failing(metrics: str) -> float:
    """
    The longest any write lane has failed to commit, from the metrics.
    """
    found = re.findall(r"^mqttsvc_write_lane_failing_seconds\{[^}]*\} (\S+)$", metrics, re.M)
    assert found
    return max(float(v) for v in found)


def test_database_terminated_then_unreachable(
    db_dsn: str,
    no_sites: None,
    tmp_path: Path,
    private_broker: PrivateBroker,
    report: dict[str, Any],
) -> None:
    """
    Nothing is lost or doubled, memory stays bounded while the database is
    away (the sites stop reading), and writing resumes once the database
    is back.  How soon is a measurement (recovery_seconds in the report),
    not an assertion: a bound of 5 s failed on a loaded machine.
    """
    proxy, proxied = proxied_database(db_dsn)
    site_id = "db-failures"
    service = Service(proxied, tmp_path, instance="reliability")
    service.start()
    try:
        service.add_site(site_id, private_broker.port)
        # The load lasts until writing has resumed (about 30 s); a fixed
        # 40,000 messages ran on for another 10 s of steady load.
        publisher = LoadPublisher(private_broker.port, site_id, MOST_MESSAGES, 1000.0)
        publisher.start()
        wait_until(lambda: readings(db_dsn, site_id)[0] > 1000, within=20, what="load flowing")

        # Terminate the service's database connections again and again.
        terminated = 0
        until = time.monotonic() + 5
        while time.monotonic() < until:
            [(n,)] = sql(
                db_dsn,
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE datname = current_database() AND pid <> pg_backend_pid()",
            )
            terminated += n
            time.sleep(0.3)
        assert terminated > 0

        # Then cut the database off for 20 s.
        rss_before = service.rss_mb()
        proxy.cut()
        cut_at = time.monotonic()
        at_cut = readings(db_dsn, site_id)[0]
        depths, rss, failing = [], [], []
        while time.monotonic() - cut_at < OUTAGE:
            metrics = service.metrics()
            depths.append(_queue_depth(metrics))
            failing.append(_lane_failing(metrics))
            rss.append(service.rss_mb())
            time.sleep(1)
        # A lane that cannot commit is visible: in the metrics, and as the
        # site's last_error (its link to the broker is fine).
        assert max(failing) > 10, failing
        status = service.call("site.status", {"site_id": site_id})
        assert status["last_error"].startswith("database: nothing committed for "), status
        proxy.restore()
        restored = time.monotonic()
        wait_until(
            lambda: readings(db_dsn, site_id)[0] > at_cut + 100, within=30, what="writing again"
        )
        recovery = time.monotonic() - restored
        assert max(rss) - rss_before < 50, (rss_before, max(rss))

        publisher.finish()
        publisher.wait()
        count = publisher.count
        final = all_committed(db_dsn, site_id, count, within=90)
        assert final == (count, count)
        # ...and afterwards as a service event that says how long and why.
        [(_, seconds)] = sql(
            db_dsn,
            "SELECT data->>'problem', (data->>'seconds')::float FROM event_log "
            "WHERE type = 'service' AND data->>'problem' = 'write_lane_recovered' "
            "ORDER BY id DESC LIMIT 1",
        )
        assert seconds > 10, seconds
        assert _lane_failing(service.metrics()) == 0
        report["database terminated, then cut for 20 s"] = {
            "injected": f"{terminated} backends terminated over 5 s, then {OUTAGE:.0f} s "
            "unreachable behind a cut proxy",
            "load": f"{count} QoS 1 messages at 1000/s",
            "published": publisher.acked,
            "committed": final[1],
            "duplicates": final[0] - final[1],
            "dead_lettered": 0,
            "max_write_queue_during_outage": max(depths),
            "rss_mb_before_and_max_during_outage": [round(rss_before, 1), round(max(rss), 1)],
            "recovery_seconds": round(recovery, 2),
        }
    finally:
        service.stop()
        proxy.close()
