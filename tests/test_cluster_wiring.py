"""
What C{--cluster} changes, fast: the options (their defaults are the
keeper's constants), the client id, the service tree (a keeper only with
the option, and last, so that it stops first), and the supervisor running
only the sites the keeper owns, on a Clock with fakes: started when
acquired (resuming the row's retry schedule), stopped cleanly when handed
over, at once when lost or fenced.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mqttsvc import tap
from mqttsvc.cluster.keeper import HANDOVER_RATE, LEASE_RENEW, LEASE_TTL, LeaseKeeper
from mqttsvc.config import ConfigError, OfflinePolicy, SiteConfig, default_topics
from mqttsvc.db.sites import SiteRow
from mqttsvc.db.store import Store
from mqttsvc.ingest.fencing import Fences
from mqttsvc.mqtt.codec import ReceivedMessage
from mqttsvc.records import ConnectionEvent, StatusUpdate
from mqttsvc.sites.site import DeviceTracker, MessageSink, SiteService
from mqttsvc.sites.supervisor import IngestPort, Ownership, SiteSupervisor
from tests.conformance import assert_implements
from tests.test_site_machine import FakeClient, FakeDevices, FakeWriter

# --- options ------------------------------------------------------------------


def _options(*args: str, environ: Mapping[str, str] | None = None) -> tap.Options:
    options = tap.Options(environ=environ or {})
    options.parseOptions(["--db", "host=127.0.0.1 dbname=x", *args])
    tap.check_values(options)
    return options


def test_cluster_options_default_to_the_keepers_constants() -> None:
    """
    Without the option an instance runs alone; the lease options default to
    the keeper's constants (written once), as numbers.
    """
    options = _options()
    assert options["cluster"] is False
    assert options["lease-ttl"] == LEASE_TTL
    assert options["lease-renew"] == LEASE_RENEW
    assert options["handover-rate"] == HANDOVER_RATE
    assert isinstance(options["handover-rate"], int)


def test_cluster_from_the_flag_or_the_environment() -> None:
    """
    C{--cluster} or C{MQTTSVC_CLUSTER=1} turns it on, with the lease
    options given either way.
    """
    assert _options("--cluster")["cluster"] is True
    options = _options(
        environ={
            "MQTTSVC_CLUSTER": "1",
            "MQTTSVC_LEASE_TTL": "3",
            "MQTTSVC_LEASE_RENEW": "0.5",
            "MQTTSVC_HANDOVER_RATE": "7",
        }
    )
    assert (options["cluster"], options["lease-ttl"], options["lease-renew"]) == (True, 3.0, 0.5)
    assert options["handover-rate"] == 7
    assert _options(environ={"MQTTSVC_CLUSTER": "0"})["cluster"] is False


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (("--lease-ttl", "2", "--lease-renew", "2"), "lease-renew"),
        (("--lease-renew", "0"), "lease-renew"),
        (("--handover-rate", "2.5"), "handover-rate"),
        (("--lease-ttl", "-1"), "lease-ttl"),
    ],
)
def test_bad_lease_options_name_the_option(args: tuple[str, ...], field: str) -> None:
    """
    A renewal interval that is not shorter than the ttl, a rate that is not
    a whole number, a ttl that is not positive: one error naming the option.
    """
    with pytest.raises(ConfigError) as e:
        _options("--cluster", *args)
    assert e.value.field == field


# --- the client id --------------------------------------------------------------


def test_the_client_id_in_a_cluster_has_no_instance() -> None:
    """
    Alone the client id names the instance; in a cluster (no instance) it
    is the same for every owner of the site.
    """
    config = SiteConfig(site_id="north", host="127.0.0.1", client_id_prefix="plant")
    assert config.client_id("host-a") == "plant_host-a_north"
    assert config.client_id(None) == "plant_north"


# --- the service tree -----------------------------------------------------------


def _tree(*args: str) -> Any:
    from twisted.internet import reactor

    options = _options("--instance", "box", *args)
    return tap.build_service(options, reactor, None)


def test_without_cluster_the_tree_has_no_keeper() -> None:
    """
    Alone: no keeper, no cluster listener, and the sites' client ids name
    the instance, exactly as before.
    """
    root = _tree()
    names = [s.name for s in root]
    assert "cluster" not in names
    assert "cluster-listener" not in names
    supervisor = root.getServiceNamed("sites")
    assert supervisor._instance == "box"
    assert supervisor._ownership is None


def test_with_cluster_the_keeper_is_last_and_owns_the_sites() -> None:
    """
    With --cluster the keeper is the last child (so it stops first: it
    hands every site over while the supervisor, the writer and the database
    are still there), the supervisor asks it which sites it owns, and
    client ids have no instance name.
    """
    root = _tree("--cluster", "--lease-ttl", "4", "--lease-renew", "1", "--handover-rate", "3")
    services = list(root)
    keeper = services[-1]
    assert isinstance(keeper, LeaseKeeper)
    assert (keeper.instance, keeper._ttl, keeper._renew_interval, keeper._rate) == (
        "box",
        4.0,
        1.0,
        3,
    )
    supervisor = root.getServiceNamed("sites")
    assert supervisor._ownership is keeper
    assert supervisor._instance is None
    assert services.index(supervisor) < services.index(keeper)


# --- the supervisor on a Clock ----------------------------------------------------


class FakeOwnership:
    """
    Stands in for the lease keeper: the sites it holds are C{held}.
    """

    def __init__(self, *held: str) -> None:
        self.held = set(held)

    def owns(self, site_id: str) -> bool:
        return site_id in self.held


class FakeIngest:
    """
    Stands in for the ingest side (an L{IngestPort}): a fake writer and
    liveness, and every report recorded.
    """

    def __init__(self) -> None:
        self._writer = FakeWriter()
        self._devices = FakeDevices()
        self.reports: list[tuple[StatusUpdate, ConnectionEvent | None]] = []
        #: The sites whose queued writes were waited for, and, when set,
        #: what that wait waits on.
        self.waited: list[str] = []
        self.writing: Deferred[None] | None = None

    @property
    def writer(self) -> MessageSink:
        return self._writer

    @property
    def devices(self) -> DeviceTracker:
        return self._devices

    def devices_ready(
        self, policies: Callable[[], Awaitable[Mapping[str, OfflinePolicy]]]
    ) -> Awaitable[None]:
        return succeed(None)

    def site_devices_ready(self, site_id: str, policy: OfflinePolicy) -> Awaitable[None]:
        return succeed(None)

    def site_released(self, site_id: str) -> None:
        pass

    def site_written(self, site_id: str) -> Awaitable[None]:
        self.waited.append(site_id)
        return succeed(None) if self.writing is None else self.writing

    def site_reported(self, update: StatusUpdate, event: ConnectionEvent | None) -> None:
        self.reports.append((update, event))

    def site_up(self, site_id: str, grace: float) -> None:
        pass

    def site_down(self, site_id: str, reason: str) -> None:
        pass

    def site_removed(self, site_id: str) -> None:
        pass


class FakeSites:
    """
    The site rows, as C{store.sites} reads them.
    """

    def __init__(self, rows: list[SiteRow]) -> None:
        self.rows = {row.config.site_id: row for row in rows}

    async def all(self) -> list[SiteRow]:
        return list(self.rows.values())

    async def get(self, site_id: str) -> SiteRow | None:
        return self.rows.get(site_id)


class FakeStore:
    def __init__(self, rows: list[SiteRow]) -> None:
        self.sites = FakeSites(rows)


def test_fakes_match_the_interfaces_they_stand_for() -> None:
    """
    The fake keeper is an L{Ownership}, the fake ingest an L{IngestPort}.
    """
    assert_implements(FakeOwnership, Ownership)
    assert_implements(FakeIngest, IngestPort)


NOW = 1_000_000.0


def _row(site_id: str, retry_count: int = 0, next_retry: float | None = None) -> SiteRow:
    at = datetime.fromtimestamp(NOW, UTC)
    return SiteRow(
        config=SiteConfig(site_id=site_id, host="127.0.0.1", topics=default_topics(site_id)),
        status="disconnected" if retry_count else "connected",
        last_connected_at=None,
        retry_count=retry_count,
        next_retry=None if next_retry is None else at + timedelta(seconds=next_retry),
        last_error="network: refused" if retry_count else None,
        created_at=at,
        updated_at=at,
    )


class Cluster:
    """
    A supervisor in a cluster on a Clock: fake keeper, store, ingest and
    broker clients (by site).
    """

    def __init__(self, rows: list[SiteRow], *held: str) -> None:
        self.clock = Clock()
        self.clock.advance(NOW)
        self.ownership = FakeOwnership(*held)
        self.ingest = self.make_ingest()
        self.clients: dict[str, FakeClient] = {}

        def client_factory(config: SiteConfig, *args: Any, **kwargs: Any) -> FakeClient:
            client = FakeClient(config, *args, **kwargs)
            self.clients[config.site_id] = client
            return client

        self.supervisor = SiteSupervisor(
            self.clock,
            cast(Store, FakeStore(rows)),
            self.ingest,
            instance=None,
            ownership=self.ownership,
            client_factory=client_factory,
        )

    def make_ingest(self) -> Any:
        """The ingest side the supervisor is given (a fake, here)."""
        return FakeIngest()

    def running(self) -> list[str]:
        return sorted(s.name for s in self.supervisor.sites())

    def site(self, site_id: str) -> SiteService:
        site = self.supervisor.site(site_id)
        assert site is not None
        return site

    def disconnected(self, site_id: str) -> None:
        """The broker answers the site's DISCONNECT: the connection is closed."""
        self.clients[site_id].disconnects[-1].callback(None)

    def stop(self) -> None:
        """Stop the supervisor; no timer may be left behind."""
        stopping = self.supervisor.stopService()
        for site_id, client in self.clients.items():
            if client.disconnects and not client.disconnects[-1].called:
                self.disconnected(site_id)
        assert stopping.called
        self.stop_ingest()
        assert self.clock.getDelayedCalls() == []

    def stop_ingest(self) -> None:
        """Stop what the ingest side runs on the clock (nothing, here)."""


def test_only_owned_sites_run_with_the_shared_client_id() -> None:
    """
    In a cluster the supervisor starts only the enabled sites the keeper
    owns, each with the client id every owner uses.
    """
    c = Cluster([_row("a"), _row("b"), _row("c")], "a", "c")
    c.supervisor.startService()
    assert c.running() == ["a", "c"]
    assert c.clients["a"].client_id == "mqttsvc_a"
    assert c.supervisor.loaded
    c.stop()


def test_an_acquired_site_resumes_its_rows_retry_schedule() -> None:
    """
    A site acquired from another owner resumes the retry schedule its row
    holds (failover is not a restart): it waits for its next retry.
    """
    c = Cluster([_row("a"), _row("b", retry_count=3, next_retry=60)], "a")
    c.supervisor.startService()
    assert c.running() == ["a"]
    c.ownership.held.add("b")
    c.supervisor.acquired("b")
    assert c.running() == ["a", "b"]
    state = c.site("b").state
    assert (state.state, state.retry_count) == ("waiting", 3)
    assert c.clients["b"].attempts == []
    c.stop()


def test_a_hand_over_drains_then_disconnects_and_is_not_undone() -> None:
    """
    A hand-over stops reading, waits for the messages in hand to be
    committed and acknowledged, then disconnects; only then does its
    Deferred fire.  A reconciliation meanwhile (the keeper still holds the
    lease until it is released) does not start the site again.
    """
    c = Cluster([_row("a")], "a")
    c.supervisor.startService()
    client = c.clients["a"]
    client.attempts[0].callback(False)
    client.on_message(ReceivedMessage("a/gateway/g/heartbeat", b"{}", 1, False, 7, 1))
    assert c.site("a").uncommitted == 1
    handed: Deferred[None] = c.supervisor.hand_over("a")
    assert client.paused >= 1
    assert not handed.called
    assert client.disconnects == [], "disconnected before the message was committed"
    Deferred.fromCoroutine(c.supervisor.reconcile_all())
    c.ingest._writer.commit(0)
    assert client.acked == [7]
    assert len(client.disconnects) == 1
    assert not handed.called
    c.disconnected("a")
    assert handed.called
    assert c.running() == []
    events = [e for _, e in c.ingest.reports if e is not None]
    assert (events[-1].to_state, events[-1].reason) == ("stopped", None)
    assert (events[-2].to_state, events[-2].reason) == (
        "stopping",
        "handed over to another instance",
    )
    Deferred.fromCoroutine(c.supervisor.reconcile_all())
    assert c.running() == [], "a site handed over started again"
    c.stop()


def test_a_hand_over_fires_once_what_stopping_wrote_is_written() -> None:
    """
    A hand-over fires only once the writes its stop queued (the site's
    status and events) are written: the keeper releases the lease after
    it, and a write queued before and sent after would be fenced.
    """
    c = Cluster([_row("a")], "a")
    c.supervisor.startService()
    c.clients["a"].attempts[0].callback(False)
    c.ingest.writing = Deferred()
    handed: Deferred[None] = c.supervisor.hand_over("a")
    c.disconnected("a")
    assert c.running() == []
    events = [e for _, e in c.ingest.reports if e is not None]
    assert (events[-1].to_state, events[-1].reason) == ("stopped", None)
    assert c.ingest.waited == ["a"]
    assert not handed.called, "fired before the stop's status and events were written"
    c.ingest.writing.callback(None)
    assert handed.called
    c.stop()


def test_a_lost_site_stops_at_once_until_acquired_again() -> None:
    """
    A lost lease stops the site at once: it reads no more and disconnects
    without waiting for the messages in hand (they are fenced, never
    acknowledged); reconciliations leave it stopped until the keeper
    acquires it again.
    """
    c = Cluster([_row("a")], "a")
    c.supervisor.startService()
    client = c.clients["a"]
    client.attempts[0].callback(False)
    client.on_message(ReceivedMessage("a/gateway/g/heartbeat", b"{}", 1, False, 7, 1))
    c.supervisor.lost("a")
    assert client.paused >= 1
    assert len(client.disconnects) == 1, "waited for a message that will never be committed"
    c.disconnected("a")
    assert c.running() == []
    assert client.acked == []
    events = [e for _, e in c.ingest.reports if e is not None]
    assert (events[-2].to_state, events[-2].reason) == ("stopping", "its lease was lost")
    Deferred.fromCoroutine(c.supervisor.reconcile_all())
    assert c.running() == []
    c.supervisor.acquired("a")
    assert c.running() == ["a"]
    c.stop()


def test_fenced_sites_stop_at_once() -> None:
    """
    The writer's fence refused a batch of two sites: both stop at once,
    the third runs on.
    """
    c = Cluster([_row("a"), _row("b"), _row("c")], "a", "b", "c")
    c.supervisor.startService()
    c.supervisor.fenced(["a", "b"])
    c.disconnected("a")
    c.disconnected("b")
    assert c.running() == ["c"]
    c.stop()


def test_a_site_no_longer_owned_is_stopped_by_a_reconciliation() -> None:
    """
    The safety net: a running site the keeper no longer owns is stopped by
    the next reconciliation.
    """
    c = Cluster([_row("a"), _row("b")], "a", "b")
    c.supervisor.startService()
    c.ownership.held.discard("b")
    Deferred.fromCoroutine(c.supervisor.reconcile_all())
    c.disconnected("b")
    assert c.running() == ["a"]
    c.stop()


def test_handing_over_a_site_that_is_not_running() -> None:
    """
    Handing over a site that does not run here fires at once.
    """
    c = Cluster([_row("a")])
    c.supervisor.startService()
    assert c.running() == []
    assert c.supervisor.hand_over("a").called
    c.stop()


# --- the fence between the writer and the keeper ----------------------------------


class FakeKeeper:
    """The keeper as the writer's fences see it: epochs by site, and pokes."""

    instance = "box"

    def __init__(self, **epochs: int) -> None:
        self.epochs = epochs
        self.pokes = 0

    def epoch(self, site_id: str) -> int | None:
        return self.epochs.get(site_id)

    def fence_for(self, site_ids: Any) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
        sites = tuple(sorted(site_ids))
        return self.instance, sites, tuple(self.epochs.get(s, 0) for s in sites)

    def poke(self) -> None:
        self.pokes += 1


def test_a_refused_write_stops_only_the_sites_of_its_term() -> None:
    """
    A write is fenced with the keeper's epochs.  When the database refuses
    it, the sites whose lease this instance no longer holds, or holds
    under the epoch that write carried, are stopped; a site acquired again
    (a newer epoch) while the write was in flight runs on.  Either way the
    keeper renews at once.
    """
    keeper = FakeKeeper(a=3, b=5, c=1)
    stopped: list[list[str]] = []
    fences = Fences(keeper, stopped.append)
    fence = fences.fence({"a", "b", "c", "d"})
    assert (fence.instance, fence.sites, fence.epochs) == (
        "box",
        ("a", "b", "c", "d"),
        (3, 5, 1, 0),
    )
    del keeper.epochs["a"]  # lost
    keeper.epochs["b"] = 6  # handed over and acquired again
    fences.refused(["a", "b", "c", "d"])
    assert stopped == [["a", "c", "d"]]
    assert keeper.pokes == 1
    fences.refused(["b"])
    assert stopped == [["a", "c", "d"]]
    assert keeper.pokes == 2


def test_mqttsvc_cluster_shows_each_live_instance() -> None:
    """
    C{mqttsvc cluster} is a table of the live instances (how many sites
    each owns, when it renewed), or says that none runs with --cluster.
    """
    from mqttsvc.cli import build_parser, format_cluster

    assert build_parser().parse_args(["cluster"]).command == "cluster"
    member = {
        "instance": "a",
        "sites": ["s1", "s2"],
        "epochs": {"s1": 1, "s2": 4},
        "started_at": "2026-01-01T00:00:00+00:00",
        "renewed_at": "2026-01-01T00:01:00+00:00",
        "expires_at": "2026-01-01T00:01:10+00:00",
    }
    table = format_cluster({"instance": "a", "cluster": True, "instances": [member]})
    assert table.splitlines() == [
        "INSTANCE  SITES  RENEWED                    STARTED",
        "a         2      2026-01-01T00:01:00+00:00  2026-01-01T00:00:00+00:00",
    ]
    alone = format_cluster({"instance": "box", "cluster": False, "instances": []})
    assert alone == "no instance runs with --cluster (box runs without --cluster)"
