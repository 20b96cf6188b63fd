"""
Any replica answers (issue 17): two real C{twistd mqttsvc --cluster}
processes on one database and a private Mosquitto, and every question
about a site gets the same answer from either, whichever owns it.

The owner publishes its sites' live statuses at least once a second; the
other replica answers C{site.status}, C{site.list} and C{service.status}
from them, and sends the owner C{site.restart} as a command it acts on at
once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PrivateBroker, scratch_database
from tests.reliability.harness import Service, settled
from tests.test_cluster import _start
from tests.twistd_process import wait_until

SITES = 6

#: The fields that say what a site is doing now; the counters and the
#: publication time may move between two calls.
_NOW = ("status", "state", "state_since", "instance", "mqtt_retry_count", "topics_list")


@pytest.fixture
def cluster_dsn() -> Iterator[str]:
    """A migrated database of this test's own: the leases are all its."""
    with scratch_database("mqttsvc_answers") as dsn:
        yield dsn


def _now(status: dict[str, Any]) -> dict[str, Any]:
    return {k: status[k] for k in _NOW}


def _elsewhere(mine: dict[str, list[str]], here: str) -> tuple[str, str]:
    """A site owned by the other instance than C{here}, and that owner."""
    other = next(name for name in mine if name != here)
    return mine[other][0], other


def test_every_replica_answers_for_every_site(
    cluster_dsn: str, private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """
    C{site.status}, C{site.list} and C{service.status} agree between the
    two replicas for every site, each status naming the owner; asked of
    the replica that does not own it, a status says when the owner
    published it (within the last few seconds).  C{site.restart} sent to
    the other replica reaches the owner within a second; C{site.stop} and
    C{site.start} sent there stop and start the site at its owner.
    """
    dsn = cluster_dsn
    a = _start(dsn, tmp_path / "a", "a")
    b = _start(dsn, tmp_path / "b", "b")
    services = {"a": a, "b": b}
    try:
        sites = [f"r{i}" for i in range(SITES)]
        for site_id in sites:
            a.call(
                "site.create",
                {"site_id": site_id, "host": "127.0.0.1", "port": private_broker.port},
            )
        mine = settled(dsn, sites, services)
        owner_of = {s: name for name, owned in mine.items() for s in owned}

        # site.status: the owner's live fields from either replica.
        def statuses_agree() -> bool:
            for site_id in sites:
                answers = [_now(s.call("site.status", [site_id])) for s in (a, b)]
                if answers[0] != answers[1] or answers[0]["instance"] != owner_of[site_id]:
                    return False
            return True

        wait_until(statuses_agree, within=5, what="both replicas give the owners' statuses")
        site_id, owner = _elsewhere(mine, "a")
        there = a.call("site.status", [site_id])
        assert there["state"] == "connected"
        assert there["instance"] == owner
        published = datetime.fromisoformat(there["published_at"])
        assert abs((datetime.now(UTC) - published).total_seconds()) < 5
        assert services[owner].call("site.status", [site_id])["published_at"] is None

        # site.list and service.status: the same from both.
        def listed(service: Service) -> dict[str, dict[str, Any]]:
            page = service.call("site.list", {"limit": 100})
            return {item["site_id"]: _now(item["status"]) for item in page["items"]}

        assert listed(a) == listed(b)
        assert {s["instance"] for s in listed(a).values()} == {"a", "b"}

        def counts(service: Service) -> dict[str, Any]:
            status = service.call("service.status")
            return {
                "connected": status["connected"],
                "total": status["total"],
                "instances": {m["instance"]: m["sites"] for m in status["instances"]},
            }

        assert counts(a) == counts(b) == {"connected": SITES, "total": SITES, "instances": mine}

        # site.restart at the replica that does not own the site.
        before = services[owner].call("site.status", [site_id])["state_since"]
        asked = datetime.now(UTC)
        answer = a.call("site.restart", [site_id])
        assert answer["command"] == {"sent_to": owner, "acted": True}
        assert answer["instance"] == owner
        restarted = datetime.fromisoformat(answer["state_since"])
        assert restarted > datetime.fromisoformat(before)
        reached = (restarted - asked).total_seconds()
        assert reached < 1.0, f"the restart reached the owner after {reached:.2f}s"
        print(f"site.restart elsewhere reached the owner after {reached:.3f}s")
        wait_until(
            lambda: a.call("site.status", [site_id])["state"] == "connected",
            within=5,
            what="the restarted site connected again",
        )
        assert 'mqttsvc_cluster_site_commands_total{result="acted"} 1.0' in (
            services[owner].metrics()
        )
        assert 'mqttsvc_cluster_site_commands_total{result="acted"} 0.0' in a.metrics()

        # site.stop and site.start there: the owner stops it, then it runs again.
        a.call("site.stop", [site_id])
        started = time.monotonic()
        wait_until(
            lambda: services[owner].call("site.status", [site_id])["state"] == "stopped",
            within=5,
            what="the owner stopped the site",
        )
        stopped = services[owner].call("site.status", [site_id])
        assert stopped["instance"] is None
        assert a.call("site.status", [site_id])["is_enabled"] is False
        print(f"site.stop elsewhere took effect after {time.monotonic() - started:.2f}s")
        a.call("site.start", [site_id])
        wait_until(
            lambda: all(s.call("site.status", [site_id])["state"] == "connected" for s in (a, b)),
            within=10,
            what="the site running again",
        )
    finally:
        a.stop()
        b.stop()
