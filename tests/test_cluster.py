"""
Two real C{twistd mqttsvc --cluster} processes on one scratch database and
a private Mosquitto, with 20 sites: each site owned once, by a live
instance, and connected; every QoS 1 reading committed exactly once; a
clean stop of one hands its sites to the other at once (well under the
lease's ttl, thanks to its leave and the NOTIFY), and a crash moves them
within the ttl plus one renewal; the messages published meanwhile are
delivered to the new owner, which resumes the same persistent session.

Short leases (3 s, renewed every 0.5 s) keep it fast.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest

from tests.conftest import PrivateBroker, scratch_database
from tests.reliability.harness import (
    Service,
    connected,
    owners,
    publish,
    readings,
    settled,
    sql,
)
from tests.twistd_process import wait_until

SITES = 20
TTL = 3.0
RENEW = 0.5


@pytest.fixture
def cluster_dsn() -> Iterator[str]:
    """A migrated database of this test's own: the leases are all its."""
    with scratch_database("mqttsvc_cluster") as dsn:
        yield dsn


def _start(dsn: str, directory: Path, name: str) -> Service:
    directory.mkdir(exist_ok=True)
    service = Service(
        dsn,
        directory,
        name,
        *("--cluster", "--lease-ttl", str(TTL), "--lease-renew", str(RENEW)),
    )
    service.start()
    return service


def all_committed(dsn: str, sites: list[str], count: int, within: float) -> None:
    """Every site has C{count} readings, each message once."""

    def done() -> bool:
        return all(readings(dsn, s)[0] >= count for s in sites)

    wait_until(done, within=within, what=f"{count} readings of every site")
    for site_id in sites:
        assert readings(dsn, site_id) == (count, count), site_id


def test_two_instances_share_and_take_over_the_sites(
    cluster_dsn: str, private_broker: PrivateBroker, tmp_path: Path
) -> None:
    """
    Each of 20 sites is owned by exactly one of two instances, both own
    some, and all connect; readings are committed once each.  SIGTERM one:
    the other owns every site well within the ttl and connects them, and
    receives what was published meanwhile.  Start it again (it takes its
    share back by hand-over), then SIGKILL the other: its sites move within
    the ttl plus one renewal (and slack for the connects).
    """
    dsn = cluster_dsn
    a = _start(dsn, tmp_path / "a", "a")
    b = _start(dsn, tmp_path / "b", "b")
    try:
        sites = [f"c{i:02d}" for i in range(SITES)]
        for site_id in sites:
            a.call(
                "site.create",
                {"site_id": site_id, "host": "127.0.0.1", "port": private_broker.port},
            )

        # One owner each, both instances own some, and all connect.
        mine = settled(dsn, sites, {"a": a, "b": b})
        assert {m["instance"]: m["sites"] for m in a.call("cluster.status")["instances"]} == mine
        members = a.call("cluster.status")["instances"]
        assert b.call("cluster.status")["instances"] == members
        for member in members:
            assert datetime.fromisoformat(member["renewed_at"]).tzinfo is not None
            assert member["epochs"].keys() == set(member["sites"])
        assert a.call("cluster.status")["cluster"] is True

        publish(private_broker.port, sites, 0, 20)
        all_committed(dsn, sites, 20, within=20)

        # A clean stop hands over at once: well under the ttl.
        assert a.process is not None
        started = time.monotonic()
        a.process.terminate()
        wait_until(lambda: set(owners(dsn).items()) == {(s, "b") for s in sites}, within=TTL)
        taken = time.monotonic() - started
        wait_until(lambda: connected(b, sites), within=5)
        up = time.monotonic() - started
        assert taken < 2.0, f"the sites of a stopped instance took {taken:.1f}s to move"
        a.process.wait(10)
        print(f"SIGTERM: owned elsewhere after {taken:.2f}s, all connected after {up:.2f}s")
        publish(private_broker.port, sites, 20, 10)
        all_committed(dsn, sites, 30, within=20)

        # It comes back and takes its share back.
        a.start()
        settled(dsn, sites, {"a": a, "b": b})

        # A crash: its leases expire by the database's clock, then move.
        started = time.monotonic()
        b.kill()
        publish(private_broker.port, sites, 30, 10)
        bound = TTL + RENEW + 1.5
        wait_until(lambda: set(owners(dsn).items()) == {(s, "a") for s in sites}, within=bound)
        taken = time.monotonic() - started
        wait_until(lambda: connected(a, sites), within=5)
        up = time.monotonic() - started
        print(f"SIGKILL: owned elsewhere after {taken:.2f}s, all connected after {up:.2f}s")
        assert taken < bound
        all_committed(dsn, sites, 40, within=20)
        assert sql(dsn, "SELECT count(*) FROM site_lease WHERE owner IS NOT NULL") == [(SITES,)]
    finally:
        a.stop()
        b.stop()
