"""
The cluster's series of C{/metrics} (issue #17): what the collector reads of
the lease keeper (a fake checked against the L{ClusterMember} Protocol the
metrics declare), the keeper's own counts on a Clock against the fake
database's journal, and a real C{twistd mqttsvc --cluster} scraped with a
token.
"""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet.task import Clock

from mqttsvc.cluster.keeper import LEASE_RENEW, LEASE_TTL
from mqttsvc.control.metrics import ClusterMember, Metrics
from tests.conformance import assert_implements
from tests.conftest import BROKER_HOST, BROKER_PORT, scratch_database
from tests.reliability.harness import Service
from tests.test_lease_keeper import (
    FakeDatabase,
    Node,
    _Instance,
    _Lease,
    finish,
    run,
    run_until,
    settled,
    sites,
    stop,
)
from tests.twistd_process import wait_until

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]

#: The series of the cluster, each with the labels it may have: none that
#: grows with the sites or the instances.
CLUSTER_SERIES = {
    "mqttsvc_instance_info": {"instance"},
    "mqttsvc_cluster_member": set(),
    "mqttsvc_cluster_owned_sites": set(),
    "mqttsvc_cluster_lease_renewals_total": {"result"},
    "mqttsvc_cluster_acquisitions_total": set(),
    "mqttsvc_cluster_handovers_total": set(),
    "mqttsvc_cluster_leases_lost_total": set(),
    "mqttsvc_cluster_self_fences_total": set(),
}


def parse(text: str) -> Samples:
    """Every sample of a text exposition, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(instance: str, keeper: ClusterMember | None) -> Samples:
    """The samples of a registry watching only the cluster."""
    metrics = Metrics()
    metrics.watch_cluster(instance, keeper)
    return parse(metrics.render().decode())


def cluster(samples: Samples) -> dict[str, float]:
    """
    The cluster's series of C{samples}, by name (renewals as
    C{..._total{result}}), after checking their labels.
    """
    found: dict[str, float] = {}
    for (name, labels), value in samples.items():
        if name not in CLUSTER_SERIES:
            continue
        assert {k for k, _ in labels} == CLUSTER_SERIES[name], (name, labels)
        if name == "mqttsvc_cluster_lease_renewals_total":
            name = f"{name}{{result={dict(labels)['result']}}}"
        elif name == "mqttsvc_instance_info":
            name = f"{name}{{instance={dict(labels)['instance']}}}"
        found[name] = value
    return found


@attrs.define
class FakeKeeper:
    """
    Stands in for the lease keeper as the metrics read it.
    """

    held: dict[str, int] = attrs.Factory(dict)
    renewals_ok: int = 0
    renewals_failed: int = 0
    acquisitions: int = 0
    handovers: int = 0
    leases_lost: int = 0
    self_fences: int = 0

    def owned(self) -> dict[str, int]:
        return dict(self.held)


# --- the collector ----------------------------------------------------------------


def test_the_fake_keeper_is_what_the_metrics_read() -> None:
    """
    The fake has exactly the Protocol's members (the real keeper is checked
    against it by mypy, where tap.py hands it to the metrics).
    """
    assert_implements(FakeKeeper, ClusterMember)


def test_a_members_series_are_the_keepers_counts() -> None:
    """
    With a keeper: member 1, the sites it holds, and each count as its
    counter; the instance's name is the one label of the info series.
    """
    keeper = FakeKeeper(
        held={"s1": 3, "s2": 1, "s3": 7},
        renewals_ok=41,
        renewals_failed=2,
        acquisitions=9,
        handovers=4,
        leases_lost=5,
        self_fences=1,
    )
    assert cluster(scrape("pod-a", keeper)) == {
        "mqttsvc_instance_info{instance=pod-a}": 1,
        "mqttsvc_cluster_member": 1,
        "mqttsvc_cluster_owned_sites": 3,
        "mqttsvc_cluster_lease_renewals_total{result=ok}": 41,
        "mqttsvc_cluster_lease_renewals_total{result=failed}": 2,
        "mqttsvc_cluster_acquisitions_total": 9,
        "mqttsvc_cluster_handovers_total": 4,
        "mqttsvc_cluster_leases_lost_total": 5,
        "mqttsvc_cluster_self_fences_total": 1,
    }
    # Read at every scrape, not copied.
    keeper.held.clear()
    keeper.renewals_ok += 1
    again = cluster(scrape("pod-a", keeper))
    assert again["mqttsvc_cluster_owned_sites"] == 0
    assert again["mqttsvc_cluster_lease_renewals_total{result=ok}"] == 42


def test_alone_the_cluster_series_are_zero() -> None:
    """
    Without --cluster (no keeper) every cluster series is there, at 0, and
    member says 0: one query works on every instance.
    """
    assert cluster(scrape("box", None)) == {
        "mqttsvc_instance_info{instance=box}": 1,
        "mqttsvc_cluster_member": 0,
        "mqttsvc_cluster_owned_sites": 0,
        "mqttsvc_cluster_lease_renewals_total{result=ok}": 0,
        "mqttsvc_cluster_lease_renewals_total{result=failed}": 0,
        "mqttsvc_cluster_acquisitions_total": 0,
        "mqttsvc_cluster_handovers_total": 0,
        "mqttsvc_cluster_leases_lost_total": 0,
        "mqttsvc_cluster_self_fences_total": 0,
    }


# --- the keeper's counts, on a Clock ------------------------------------------------


@pytest.fixture
def clock() -> Clock:
    """The test's clock, which is also the fake database's."""
    return Clock()


def heartbeats(db: FakeDatabase, instance: str) -> int:
    return sum(1 for _, what, i, _, _ in db.journal if what == "heartbeat" and i == instance)


def test_renewals_acquisitions_self_fences_and_losses_are_counted(clock: Clock) -> None:
    """
    A real keeper, read by the collector: every heartbeat answered is a
    renewal ok and every lease taken an acquisition (as the fake database's
    journal has them); when the database fails, each failed heartbeat is a
    failed renewal, and after a ttl one self-fence loses every site; when
    it answers again the sites are acquired anew.
    """
    db = FakeDatabase(clock, sites(6))
    a = Node(db, "a")
    a.keeper.startService()
    run_until(db, lambda: len(a.running) == 6, within=5)
    run(db, 3 * LEASE_RENEW)
    counts = cluster(scrape("a", a.keeper))
    assert counts["mqttsvc_cluster_member"] == 1
    assert counts["mqttsvc_cluster_owned_sites"] == 6
    assert counts["mqttsvc_cluster_lease_renewals_total{result=ok}"] == heartbeats(db, "a") >= 4
    assert counts["mqttsvc_cluster_lease_renewals_total{result=failed}"] == 0
    assert counts["mqttsvc_cluster_acquisitions_total"] == len(db.events("acquire", "a")) == 6
    assert counts["mqttsvc_cluster_self_fences_total"] == 0
    assert counts["mqttsvc_cluster_leases_lost_total"] == 0

    renewed = a.keeper.renewals_ok
    a.leases.failing = True
    run_until(db, lambda: len(a.lost) == 6, within=LEASE_TTL + LEASE_RENEW)
    counts = cluster(scrape("a", a.keeper))
    assert counts["mqttsvc_cluster_lease_renewals_total{result=ok}"] == renewed
    # Every round since the last renewal failed: at least ttl / renew - 1.
    assert counts["mqttsvc_cluster_lease_renewals_total{result=failed}"] >= (
        LEASE_TTL / LEASE_RENEW - 1
    )
    assert counts["mqttsvc_cluster_self_fences_total"] == 1
    assert counts["mqttsvc_cluster_leases_lost_total"] == 6
    assert counts["mqttsvc_cluster_owned_sites"] == 0

    a.leases.failing = False
    failed = a.keeper.renewals_failed
    run_until(db, lambda: len(a.running) == 6, within=3 * LEASE_RENEW + 1)
    counts = cluster(scrape("a", a.keeper))
    assert counts["mqttsvc_cluster_acquisitions_total"] == len(db.events("acquire", "a")) == 12
    assert counts["mqttsvc_cluster_lease_renewals_total{result=ok}"] > renewed
    assert counts["mqttsvc_cluster_lease_renewals_total{result=failed}"] == failed
    assert counts["mqttsvc_cluster_self_fences_total"] == 1
    assert counts["mqttsvc_cluster_owned_sites"] == 6
    finish(db)


def test_a_renewal_answered_too_late_is_a_failed_renewal(clock: Clock) -> None:
    """
    A heartbeat whose answer comes after a ttl is ignored: a failed
    renewal, not an ok one.
    """
    db = FakeDatabase(clock, sites(2))
    a = Node(db, "a")
    a.keeper.startService()
    run_until(db, lambda: len(a.running) == 2, within=5)
    renewed = a.keeper.renewals_ok
    a.leases.heartbeat_latency = LEASE_TTL + 1
    run_until(db, lambda: a.leases.late_answers != [], within=2 * LEASE_TTL)
    run(db, 1)
    # That one was given up (timed out) after a ttl, and counted once.
    assert a.keeper.renewals_failed == 1
    assert a.keeper.self_fences == 1 and a.keeper.leases_lost == 2
    run_until(db, lambda: len(a.running) == 2, within=3 * LEASE_RENEW + 1)
    assert a.keeper.renewals_ok > renewed
    assert a.keeper.renewals_failed == 1
    finish(db)


def test_hand_overs_and_leases_taken_over_are_counted(clock: Clock) -> None:
    """
    An instance that another joins counts each site it hands over (as its
    hand-overs began), and loses none; a clean stop hands over the rest;
    a lease another instance took over is a lease lost, not a self-fence.
    """
    db = FakeDatabase(clock, sites(20))
    a = Node(db, "a")
    a.keeper.startService()
    run_until(db, lambda: len(a.running) == 20, within=5)
    b = Node(db, "b")
    b.keeper.startService()
    run_until(db, settled(db, ["a", "b"]), within=30)
    assert a.keeper.handovers == len(a.hand_over_starts) == 10
    assert b.keeper.acquisitions == 10 and b.keeper.handovers == 0
    assert a.keeper.leases_lost == b.keeper.leases_lost == 0

    stop(db, b)
    assert b.keeper.handovers == len(b.hand_over_starts) == 10
    assert b.keeper.leases_lost == 0
    run_until(db, lambda: len(a.running) == 20, within=5)

    # z, another live instance, holds one of a's sites now.
    taken = sorted(a.running)[0]
    db.instances["z"] = _Instance(expires_at=db.now() + 1000)
    db.leases[taken] = _Lease("z", db.leases[taken].epoch + 1, db.now() + 1000)
    run(db, LEASE_RENEW)
    assert [s for _, s in a.lost] == [taken]
    assert a.keeper.leases_lost == 1 and a.keeper.self_fences == 0
    # z being live, a hands it its share too: what a holds is what it reports.
    assert cluster(scrape("a", a.keeper))["mqttsvc_cluster_owned_sites"] == len(a.keeper.owned())
    finish(db)


# --- a real --cluster instance --------------------------------------------------------


@pytest.fixture
def cluster_dsn() -> Iterator[str]:
    """A migrated database of this test's own: the leases are all its."""
    with scratch_database("mqttsvc_metrics") as dsn:
        yield dsn


def test_a_cluster_instance_reports_its_leases(cluster_dsn: str, tmp_path: Path) -> None:
    """
    C{twistd mqttsvc --cluster}, scraped with its token: it is a member,
    named by its instance, holds the two sites, has renewed its leases and
    acquired them, and no batch was fenced.
    """
    service = Service(
        cluster_dsn, tmp_path, "metrics-a", "--cluster", "--lease-ttl", "3", "--lease-renew", "0.5"
    )
    service.start()
    try:
        for site_id in ("m1", "m2"):
            service.call(
                "site.create", {"site_id": site_id, "host": BROKER_HOST, "port": BROKER_PORT}
            )

        def leased() -> Samples | None:
            m = parse(service.metrics())
            owned = m.get(("mqttsvc_cluster_owned_sites", ()), 0)
            ok = m.get(("mqttsvc_cluster_lease_renewals_total", (("result", "ok"),)), 0)
            return m if owned == 2 and ok > 0 else None

        m = wait_until(leased, within=15, what="two sites owned and renewals in the metrics")
        counts = cluster(m)
        assert counts["mqttsvc_instance_info{instance=metrics-a}"] == 1
        assert counts["mqttsvc_cluster_member"] == 1
        assert counts["mqttsvc_cluster_acquisitions_total"] == 2
        assert counts["mqttsvc_cluster_lease_renewals_total{result=failed}"] == 0
        assert counts["mqttsvc_cluster_self_fences_total"] == 0
        assert m[("mqttsvc_fenced_batches_total", ())] == 0
        assert m[("mqttsvc_fenced_messages_total", ())] == 0
        # Without the token: refused.
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"http://127.0.0.1:{service.port}/metrics", timeout=10)
        assert refused.value.code == 401
    finally:
        service.stop()
