"""
Device liveness in a cluster (issue 17): an instance tracks only the sites
it owns.  Nothing is loaded at start; a site's known devices are loaded
when it is acquired (once, whoever comes second waits), unknown until its
connection is up and then given their grace, with one summary written; a
site lost or handed over is forgotten without a write.  Fast on a Clock
with fakes checked against their Protocols, and once against the real
PostgreSQL: the per-site read loads only the acquired site's devices, and
nothing is written for the other.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterator, Mapping
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mqttsvc.config import OfflinePolicy
from mqttsvc.db.devices import Devices
from mqttsvc.db.leases import Fence, Leases
from mqttsvc.db.pool import ConnectionPool
from mqttsvc.ingest.liveness import KnownDevices, KnownSiteDevices, Liveness
from mqttsvc.ingest.service import Ingest
from mqttsvc.mqtt.codec import ReceivedMessage
from mqttsvc.records import (
    ConnectionEvent,
    DeviceKey,
    DeviceStatus,
    Effect,
    SiteDevicesStatus,
    StatusUpdate,
)
from mqttsvc.sites.site import DeviceTracker, MessageSink
from mqttsvc.sites.supervisor import IngestPort
from tests.conformance import assert_implements
from tests.conftest import scratch_database
from tests.test_cluster_wiring import Cluster as WiringCluster
from tests.test_cluster_wiring import _row
from tests.test_leases import acquire_one
from tests.test_site_machine import FakeWriter

Known = tuple[DeviceKey, str, float | None, str | None]


def gw(site_id: str, n: int) -> DeviceKey:
    return DeviceKey(site_id, "gateway", None, f"g{n}")


class FakeKnown:
    """
    The devices of earlier runs (a L{KnownDevices} and a
    L{KnownSiteDevices}), in pages; C{gate}, when set, holds the per-site
    read after its first page until it fires.
    """

    def __init__(self, devices: list[Known]) -> None:
        self.devices = devices
        self.reads: list[str | None] = []
        self.gate: Deferred[None] | None = None

    async def known(self) -> AsyncIterator[list[Known]]:
        self.reads.append(None)
        for i in range(0, len(self.devices), 2):
            yield self.devices[i : i + 2]

    async def known_of(self, site_id: str, size: int = 2) -> AsyncIterator[list[Known]]:
        self.reads.append(site_id)
        mine = [d for d in self.devices if d[0].site_id == site_id]
        for i in range(0, len(mine), size):
            yield mine[i : i + size]
            if self.gate is not None:
                await self.gate


def test_fakes_match_the_interfaces_they_stand_for() -> None:
    """
    The fake known devices are both reads liveness is given, and the
    store's devices repository is the per-site read too.
    """
    assert_implements(FakeKnown, KnownDevices, extra=["known_of"])
    assert_implements(FakeKnown, KnownSiteDevices, extra=["known"])
    assert_implements(Devices, KnownSiteDevices, extra=["known", "page", "counts"])
    assert_implements(LivenessIngest, IngestPort)


A = [(gw("a", 1), "online", None, None), (gw("a", 2), "offline", 30.0, None)]
A += [(gw("a", 3), "unknown", None, "online")]
B = [(gw("b", 1), "online", None, None), (gw("b", 2), "online", None, None)]


def liveness(*, cluster: bool) -> tuple[Liveness, FakeKnown, Clock, list[Effect]]:
    clock = Clock()
    clock.advance(1_000_000)
    known = FakeKnown(A + B)
    written: list[Effect] = []

    def write(changes: list[Effect]) -> Deferred[None]:
        written.extend(changes)
        return succeed(None)

    live = Liveness(
        clock, known, write, repair_interval=3600.0, per_site=known if cluster else None
    )
    return live, known, clock, written


async def no_policies() -> Mapping[str, OfflinePolicy]:
    raise AssertionError("the policies of every site are not needed in a cluster")


async def every_policy() -> Mapping[str, OfflinePolicy]:
    return {}


def run(coroutine: Any) -> Deferred[Any]:
    return Deferred.fromCoroutine(coroutine)


def test_alone_every_site_is_loaded_at_start() -> None:
    """
    Without --cluster nothing changes: every site's devices are read by the
    one global read at start, and each site's summary is written.
    """
    live, known, _, written = liveness(cluster=False)
    assert run(live.ready(every_policy)).called
    assert known.reads == [None]
    assert len(live.devices) == 5
    summaries = [c for c in written if isinstance(c, SiteDevicesStatus)]
    assert sorted((c.site_id, c.devices, c.reason) for c in summaries) == [
        ("a", 2, "mqttsvc started"),
        ("b", 2, "mqttsvc started"),
    ]


def test_in_a_cluster_nothing_is_loaded_at_start() -> None:
    """
    In a cluster the start loads no site (the policies of every site are
    not even asked for) and writes nothing.
    """
    live, known, _, written = liveness(cluster=True)
    assert run(live.ready(no_policies)).called
    assert known.reads == [] and len(live.devices) == 0 and written == []


def test_an_acquired_site_is_loaded_as_after_a_restart() -> None:
    """
    Acquiring a loads a's devices only, in pages, and writes one summary
    for the two that became unknown (the third was unknown already); they
    have no deadline until a's connection is up, then their grace: the one
    with its own interval (30 s) goes offline after 2 x 30 s, those that
    never said one after 2 x the site's interval.  b is never read.
    """
    live, known, clock, written = liveness(cluster=True)
    policy = OfflinePolicy()
    assert run(live.site_ready("a", policy)).called
    assert known.reads == ["a"]
    assert live.devices.site_count("a") == 3 and live.devices.site_count("b") == 0
    assert [(c.site_id, c.status, c.devices, c.reason) for c in written] == [
        ("a", "unknown", 2, "site acquired by this instance")
    ]
    assert {live.devices.status(key) for key, *_ in A} == {"unknown"}
    assert clock.getDelayedCalls() == []
    del written[:]
    live.site_up("a", 2)
    clock.advance(60)
    assert [(c.key, c.status) for c in written] == [(gw("a", 2), "offline")]
    assert isinstance(written[0], DeviceStatus) and not written[0].recorded
    clock.advance(2 * policy.interval("gateway"))
    assert {c.key for c in written} == {gw("a", 1), gw("a", 2), gw("a", 3)}
    assert known.reads == ["a"]
    live.devices.stop()


def test_a_site_is_loaded_once_whoever_comes_second_waits() -> None:
    """
    Two reconciliations ask for a's devices while the first read is under
    way: the second waits for it and reads nothing; a third, later, returns
    at once.
    """
    live, known, _, written = liveness(cluster=True)
    known.gate = Deferred()
    first = run(live.site_ready("a", OfflinePolicy()))
    second = run(live.site_ready("a", OfflinePolicy()))
    assert not first.called and not second.called
    known.gate.callback(None)
    assert first.called and second.called
    assert run(live.site_ready("a", OfflinePolicy())).called
    assert known.reads == ["a"]
    assert live.devices.site_count("a") == 3
    assert len([c for c in written if isinstance(c, SiteDevicesStatus)]) == 1


def test_a_released_site_is_forgotten_without_a_write() -> None:
    """
    Lost or handed over: a's devices are forgotten at once, their
    deadlines pass without a write, and the connection's close writes no
    summary.  Acquired again, a is read again.
    """
    live, known, clock, written = liveness(cluster=True)
    run(live.site_ready("a", OfflinePolicy()))
    live.site_up("a", 2)
    del written[:]
    live.site_released("a")
    assert len(live.devices) == 0
    live.site_down("a", "site connection stopping")
    clock.advance(3600)
    assert written == []
    assert run(live.site_ready("a", OfflinePolicy())).called
    assert known.reads == ["a", "a"] and live.devices.site_count("a") == 3
    live.devices.stop()


def test_a_release_during_the_load_keeps_nothing() -> None:
    """
    Released while its devices are being read: what was read is dropped,
    nothing is written, and the next acquisition reads it afresh.
    """
    live, known, _, written = liveness(cluster=True)
    known.gate = Deferred()
    loading = run(live.site_ready("a", OfflinePolicy()))
    assert live.devices.site_count("a") == 2
    live.site_released("a")
    known.gate.callback(None)
    assert loading.called
    assert len(live.devices) == 0 and written == []
    known.gate = None
    assert run(live.site_ready("a", OfflinePolicy())).called
    assert live.devices.site_count("a") == 3 and len(written) == 1


def test_messages_read_after_the_release_leave_nothing_behind() -> None:
    """
    A message already read when the site was handed over makes its device
    online again (written with the message, under the epoch still held);
    its deadline passing before the connection closes writes nothing, and
    the site's disconnection forgets it and writes no summary.
    """
    live, _, clock, written = liveness(cluster=True)
    run(live.site_ready("a", OfflinePolicy()))
    live.site_up("a", 2)
    del written[:]
    live.site_released("a")
    change = live.devices.seen(gw("a", 1), 10, 2)
    assert change is not None and change.status == "online"
    clock.advance(30)
    assert live.devices.status(gw("a", 1)) == "offline"
    live.site_down("a", "site connection stopping")
    assert len(live.devices) == 0
    clock.advance(3600)
    assert written == []


# --- the supervisor's wiring, with a real Liveness -------------------------


class LivenessIngest:
    """
    The ingest side (an L{IngestPort}) with a real L{Liveness} in a cluster
    behind a fake writer; the device changes it writes are in C{written}.
    """

    def __init__(self, clock: Clock, known: FakeKnown) -> None:
        self._writer = FakeWriter()
        self.written: list[Effect] = []

        def write(changes: list[Effect]) -> Deferred[None]:
            self.written.extend(changes)
            return succeed(None)

        self.liveness = Liveness(clock, known, write, repair_interval=3600.0, per_site=known)
        self.ready: list[str] = []

    @property
    def writer(self) -> MessageSink:
        return self._writer

    @property
    def devices(self) -> DeviceTracker:
        return self.liveness.devices

    def devices_ready(
        self, policies: Callable[[], Awaitable[Mapping[str, OfflinePolicy]]]
    ) -> Awaitable[None]:
        return Deferred.fromCoroutine(self.liveness.ready(policies))

    def site_devices_ready(self, site_id: str, policy: OfflinePolicy) -> Awaitable[None]:
        self.ready.append(site_id)
        return Deferred.fromCoroutine(self.liveness.site_ready(site_id, policy))

    def site_released(self, site_id: str) -> None:
        self.liveness.site_released(site_id)

    def site_written(self, site_id: str) -> Awaitable[None]:
        return succeed(None)

    def site_reported(self, update: StatusUpdate, event: ConnectionEvent | None) -> None:
        pass

    def site_up(self, site_id: str, grace: float) -> None:
        self.liveness.site_up(site_id, grace)

    def site_down(self, site_id: str, reason: str) -> None:
        self.liveness.site_down(site_id, reason)

    def site_removed(self, site_id: str) -> None:
        self.liveness.forget_site(site_id)


class Cluster(WiringCluster):
    """A supervisor in a cluster on a Clock, with real liveness."""

    def __init__(self, *held: str) -> None:
        self.known = FakeKnown(A + B)
        super().__init__([_row("a"), _row("b")], *held)

    def make_ingest(self) -> LivenessIngest:
        return LivenessIngest(self.clock, self.known)

    def stop_ingest(self) -> None:
        self.ingest.liveness.devices.stop()


def test_the_supervisor_loads_an_acquired_site_before_starting_it() -> None:
    """
    Owning a only, the supervisor's start loads a's devices (before a's
    service exists) and not b's; acquiring b loads b's, then starts it.
    """
    c = Cluster("a")
    c.known.gate = Deferred()
    c.supervisor.startService()
    assert c.ingest.ready == ["a"] and c.running() == []
    c.known.gate.callback(None)
    c.known.gate = None
    assert c.running() == ["a"]
    assert c.known.reads == ["a"]
    assert c.ingest.liveness.devices.site_count("b") == 0
    c.ownership.held.add("b")
    c.supervisor.acquired("b")
    assert c.running() == ["a", "b"] and c.known.reads == ["a", "b"]
    assert c.ingest.liveness.devices.site_count("b") == 2
    c.stop()


def test_a_site_given_up_while_loading_is_not_started() -> None:
    """
    Lost while its devices are being read: the site is not started when
    the read ends, and nothing of it is kept.
    """
    c = Cluster("a")
    c.known.gate = Deferred()
    c.supervisor.startService()
    c.ownership.held.discard("a")
    c.supervisor.lost("a")
    c.known.gate.callback(None)
    assert c.running() == []
    assert len(c.ingest.liveness.devices) == 0 and c.ingest.written == []
    c.stop()


def test_a_hand_over_forgets_the_devices_and_writes_nothing() -> None:
    """
    a connected (its devices on their grace), then handed over: its
    devices are forgotten, its disconnection writes no summary, and none
    goes offline later here.  A lost site is forgotten the same way.
    """
    c = Cluster("a", "b")
    c.supervisor.startService()
    for client in c.clients.values():
        client.attempts[0].callback(False)
    client = c.clients["a"]
    client.on_message(ReceivedMessage("a/gateway/g1/heartbeat", b"{}", 1, False, 7, 1))
    assert c.ingest.liveness.devices.status(gw("a", 1)) == "online"
    del c.ingest.written[:]
    handed = c.supervisor.hand_over("a")
    assert c.ingest.liveness.devices.site_count("a") == 0
    c.ingest._writer.commit(0)
    client.disconnects[-1].callback(None)
    assert handed.called and c.running() == ["b"]
    c.supervisor.lost("b")
    c.clients["b"].disconnects[-1].callback(None)
    c.clock.advance(3600)
    assert c.ingest.written == []
    assert len(c.ingest.liveness.devices) == 0
    c.stop()


# --- against the real PostgreSQL --------------------------------------------


@pytest.fixture(scope="module")
def live_dsn() -> Iterator[str]:
    """A migrated database for this module, dropped after it."""
    with scratch_database("mqttsvc_live") as dsn:
        yield dsn


@pytest.fixture
def sql(live_dsn: str) -> Iterator[Any]:
    conn = psycopg2.connect(live_dsn)
    conn.autocommit = True
    yield conn
    conn.close()


def query(sql: Any, text: str, *params: Any) -> list[tuple[Any, ...]]:
    with sql.cursor() as cur:
        cur.execute(text, params)
        return list(cur.fetchall()) if cur.description else []


@pytest_twisted.async_yield_fixture
async def pool(live_dsn: str, sql: Any) -> AsyncIterator[ConnectionPool]:
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, live_dsn, size=2)
    yield pool
    pool.close()


def device_rows(sql: Any) -> None:
    """
    Sites la and lb with known devices online: la 7 gateways, 5
    dataloggers under two gateways, 4 sensors; lb 3 gateways and 2 sensors.
    """
    for site_id in ("la", "lb"):
        query(sql, "INSERT INTO mqtt_connection (site_id, host) VALUES (%s, '127.0.0.1')", site_id)
    for site_id, gateways, sensors in (("la", 7, 4), ("lb", 3, 2)):
        query(
            sql,
            "INSERT INTO gateway (site_id, gateway_id, status, first_seen_at, last_seen_at) "
            "SELECT %s, 'g' || i, 'online', now(), now() FROM generate_series(1, %s) AS i",
            site_id,
            gateways,
        )
        query(
            sql,
            "INSERT INTO sensor (site_id, sensor_id, status, first_seen_at, last_seen_at) "
            "SELECT %s, 's' || i, 'online', now(), now() FROM generate_series(1, %s) AS i",
            site_id,
            sensors,
        )
    query(
        sql,
        "INSERT INTO datalogger (site_id, gateway_id, datalogger_id, status, first_seen_at,"
        " last_seen_at) SELECT 'la', 'g' || mod(i, 2), 'd' || i, 'online', now(), now()"
        " FROM generate_series(1, 5) AS i",
    )


def statuses(sql: Any, site_id: str) -> list[str]:
    rows = query(
        sql,
        "SELECT status FROM gateway WHERE site_id = %s UNION ALL "
        "SELECT status FROM datalogger WHERE site_id = %s UNION ALL "
        "SELECT status FROM sensor WHERE site_id = %s",
        site_id,
        site_id,
        site_id,
    )
    return sorted(status for (status,) in rows)


def summaries(sql: Any) -> list[tuple[Any, ...]]:
    return query(
        sql,
        "SELECT site_id, to_status, devices, reason FROM device_event WHERE kind = 'site' "
        "ORDER BY id",
    )


@pytest_twisted.ensureDeferred
async def test_an_instance_loads_and_writes_only_the_site_it_acquired(
    pool: ConnectionPool, sql: Any
) -> None:
    """
    With the devices of la (16) and lb (5) in the database, an Ingest in
    cluster mode that acquires only la (its lease, epoch 1, fences every
    write) reads nothing at start, then la's 16 devices only, in pages of
    the bound asked for; it writes la's devices unknown in one summary
    under its fence and nothing of lb's; released, la's devices are
    forgotten and its disconnection writes nothing.
    """
    from twisted.internet import reactor

    device_rows(sql)
    devices = Devices(pool)
    pages = [page async for page in devices.known_of("la", size=3)]
    assert all(len(page) <= 3 for page in pages)
    keys = [key for page in pages for key, *_ in page]
    assert len(keys) == len(set(keys)) == 16
    assert {key.site_id for key in keys} == {"la"}
    assert {(key.kind, key.gateway_id) for key in keys if key.kind == "datalogger"} == {
        ("datalogger", "g0"),
        ("datalogger", "g1"),
    }

    leases = Leases(pool)
    await leases.heartbeat("i1", 60.0)
    epoch = await acquire_one(leases, "i1", "la", 60.0)

    def fence(site_ids: Collection[str]) -> Fence:
        ordered = sorted(site_ids)
        return Fence("i1", ordered, [epoch if s == "la" else 0 for s in ordered])

    fenced: list[list[str]] = []
    ingest = Ingest(
        reactor,
        pool,
        devices,
        lanes=1,
        repair_interval=3600.0,
        fence=fence,
        on_fenced=fenced.append,
        per_site=devices,
    )
    await ingest.devices_ready(no_policies)
    assert len(ingest.devices) == 0
    await ingest.site_devices_ready("la", OfflinePolicy())
    assert ingest.devices.site_count("la") == 16
    assert ingest.devices.site_count("lb") == 0 and len(ingest.devices) == 16
    await ingest.writer.when_idle().addTimeout(10, reactor)
    assert fenced == []
    assert statuses(sql, "la") == ["unknown"] * 16
    assert statuses(sql, "lb") == ["online"] * 5
    assert summaries(sql) == [("la", "unknown", 16, "site acquired by this instance")]

    ingest.site_released("la")
    assert len(ingest.devices) == 0
    ingest.site_down("la", "site connection stopping")
    ingest.site_down("lb", "site connection stopping")
    await ingest.writer.when_idle().addTimeout(10, reactor)
    assert summaries(sql) == [("la", "unknown", 16, "site acquired by this instance")]
    assert statuses(sql, "lb") == ["online"] * 5
    assert fenced == []
    ingest.writer.stop()
