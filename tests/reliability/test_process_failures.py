"""
The mqttsvc process itself failing under load: SIGTERM (graceful) and
SIGKILL (a crash), then started again.  Nothing is lost, nothing doubled.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PrivateBroker
from tests.reliability.harness import (
    Service,
    all_committed,
    load_a_third,
    proxied_database,
    readings,
)

COUNT = 6000
RATE = 1000.0


@pytest.mark.parametrize("signal_name", ["SIGTERM", "SIGKILL"])
def test_stopped_under_load_then_started(
    signal_name: str,
    db_dsn: str,
    no_sites: None,
    tmp_path: Path,
    private_broker: PrivateBroker,
    report: dict[str, Any],
) -> None:
    """
    Every message published during the stop is committed exactly once
    after the start: QoS 1 on a persistent session, acknowledged only
    after commit, so the broker redelivers whatever was not committed.
    """
    site_id = f"proc-{signal_name.lower()}"
    service = Service(db_dsn, tmp_path, instance="reliability")
    service.start()
    try:
        publisher = load_a_third(service, db_dsn, private_broker.port, site_id, COUNT, RATE)
        exit_seconds = None
        if signal_name == "SIGTERM":
            exit_seconds = service.terminate()
            assert exit_seconds < 10
        else:
            service.kill()
        at_stop = readings(db_dsn, site_id)[0]
        restart = time.monotonic()
        service.start()
        publisher.wait()
        final = all_committed(db_dsn, site_id, COUNT, within=60)
        recovered = time.monotonic() - restart
        assert final == (COUNT, COUNT), final
        assert service.call("site.status", [site_id])["state"] == "connected"
        report[f"mqttsvc {signal_name} under load"] = {
            "injected": f"{signal_name} after a third of the load, then a restart",
            "load": f"{COUNT} QoS 1 messages at {RATE:.0f}/s",
            "published": publisher.acked,
            "committed": final[1],
            "duplicates": final[0] - final[1],
            "dead_lettered": 0,
            "committed_before_stop": at_stop,
            "exit_seconds": None if exit_seconds is None else round(exit_seconds, 2),
            "recovery_seconds": round(recovered, 1),
        }
    finally:
        service.stop()


def test_sigterm_exits_in_time_while_the_database_holds_every_write(
    db_dsn: str,
    no_sites: None,
    tmp_path: Path,
    private_broker: PrivateBroker,
    report: dict[str, Any],
) -> None:
    """
    SIGTERM exits within 10 s even while the database holds every query
    forever (its connections open, nothing answered); once the database is
    back, a new start commits every message exactly once.
    """
    proxy, proxied = proxied_database(db_dsn)
    site_id = "proc-frozen-db"
    service = Service(proxied, tmp_path, instance="reliability")
    service.start()
    try:
        publisher = load_a_third(service, db_dsn, private_broker.port, site_id, COUNT, RATE)
        proxy.freeze()
        time.sleep(2)  # writes are now held by the frozen database
        exit_seconds = service.terminate()
        assert exit_seconds < 10, exit_seconds
        at_stop = readings(db_dsn, site_id)[0]
        proxy.restore()
        service.start()
        publisher.wait()
        final = all_committed(db_dsn, site_id, COUNT, within=60)
        assert final == (COUNT, COUNT), final
        report["mqttsvc SIGTERM while the database holds every write"] = {
            "injected": "database frozen (connections open, nothing answered), then SIGTERM",
            "load": f"{COUNT} QoS 1 messages at {RATE:.0f}/s",
            "published": publisher.acked,
            "committed": final[1],
            "duplicates": final[0] - final[1],
            "dead_lettered": 0,
            "committed_before_stop": at_stop,
            "exit_seconds": round(exit_seconds, 2),
        }
    finally:
        service.stop()
        proxy.close()
