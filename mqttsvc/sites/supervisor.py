"""
The site supervisor: one named child service per enabled site, kept equal
to the database by reconciling by name.

Reconciliation happens on start, for a single site whenever the database
notifies a configuration change (within a second), after the notification
connection comes back (anything may have changed meanwhile), and every
C{monitor_interval} seconds as a safety net.  As Buildbot's service manager
does, the supervisor only adds, removes and reconfigures: a new enabled
site starts, a removed or disabled one stops with a clean DISCONNECT, and a
running one is given its row's configuration (L{SiteService.reconfigure}),
which the site applies (new subscriptions, a new device limit) or refuses
when it needs a new connection; then it is replaced.

It also keeps what the status calls need without reading the database:
each site's stored status and configuration error, and the number of sites
in each connection status, updated on every reconcile and state change.
It passes each site's state reports on to the ingest side (L{IngestPort}),
which writes them and feeds device liveness.

In a cluster (C{--cluster}) it runs a site only while this instance owns
it (L{Ownership}, the lease keeper of L{mqttsvc.cluster.keeper}), and the
keeper tells it when that changes: L{SiteSupervisor.acquired} starts a
site, L{SiteSupervisor.hand_over} stops one cleanly for its next owner,
L{SiteSupervisor.lost} and L{SiteSupervisor.fenced} stop one at once.  A
site stopped here leaves its row's retry schedule to the next owner, which
resumes it (failover is not a restart).  The ingest side loads a site's
devices before it starts here and forgets them when it is given up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any, Protocol

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

from mqttsvc.config import (
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_MAX_DEVICES,
    DEFAULT_MAX_PAYLOAD,
    OfflinePolicy,
)
from mqttsvc.db.sites import SiteRow
from mqttsvc.db.store import Store
from mqttsvc.mqtt.connector import ClientFactory
from mqttsvc.records import ConnectionEvent, StatusUpdate
from mqttsvc.sites.site import (
    PROBE_INTERVAL,
    PROVING_TIME,
    DeviceTracker,
    MessageSink,
    SiteCounters,
    SiteService,
    SiteState,
)
from mqttsvc.sites.states import CONNECTED, STATUSES


class IngestPort(Protocol):
    """
    What the sites need of the ingest side (L{mqttsvc.ingest.service.Ingest}).
    """

    @property
    def writer(self) -> MessageSink:
        "Where the sites' messages go."

    @property
    def devices(self) -> DeviceTracker:
        "Device liveness, told of every device that speaks."

    def devices_ready(
        self, policies: Callable[[], Awaitable[Mapping[str, OfflinePolicy]]]
    ) -> Awaitable[None]:
        """
        Load the devices the database knows, once, before any site starts;
        C{policies} gives each site's offline policy when the load needs it.
        (In a cluster nothing is loaded here: see L{site_devices_ready}.)
        """

    def site_devices_ready(self, site_id: str, policy: OfflinePolicy) -> Awaitable[None]:
        """
        In a cluster: load the known devices of a site this instance
        acquired, once, before it starts.
        """

    def site_released(self, site_id: str) -> None:
        "In a cluster: the site is another instance's now: forget its devices."

    def site_written(self, site_id: str) -> Awaitable[None]:
        """
        Fire once everything queued so far for the site (its messages'
        effects, its statuses and events, its device changes) is written,
        or dropped by the fence.
        """

    def site_reported(self, update: StatusUpdate, event: ConnectionEvent | None) -> None:
        "Write a site's connection status and the event that led to it."

    def site_up(self, site_id: str, grace: float) -> None:
        "A site's connection is up: its devices get their grace period."

    def site_down(self, site_id: str, reason: str) -> None:
        "A site's connection is no longer up: its devices are unknown."

    def site_removed(self, site_id: str) -> None:
        "A site is deleted: forget its devices."


class Ownership(Protocol):
    """
    Which sites this instance may run, in a cluster
    (L{mqttsvc.cluster.keeper.LeaseKeeper}).
    """

    def owns(self, site_id: str) -> bool:
        "Whether this instance holds the site's lease now."


#: Seconds between two full reconciliations (the old service's health check).
MONITOR_INTERVAL = 30.0


def idle_status(stored: str) -> str:
    """
    The status of a site without a running service: what the row says if
    it gave up (error), else disconnected (the row may still say connected
    for a moment after its service stopped).
    """
    return stored if stored == "error" else "disconnected"


@attrs.define
class _Known:
    """
    What the supervisor remembers of a site's row, so that the status calls
    need not read it.

    @ivar status: the row's status column as read, until a service of this
        process reports; then as last reported (the batch writer writes each
        report to the row, so a report is newer than any row read since).
    @ivar config_error: what in the stored configuration is being ignored.
    @ivar reported: whether a service of this process has reported.
    """

    status: str
    config_error: str | None
    reported: bool = False


class SiteSupervisor(MultiService):
    """
    Runs a L{SiteService} per enabled site, reconciled by name.

    @param instance: this mqttsvc instance's name, part of every client id;
        None in a cluster, where a site's client id is the same for every
        owner.
    @param ownership: in a cluster, which sites this instance may run; None
        (alone): every enabled site.
    @param store: where the sites' rows are read.
    @param ingest: where the sites' messages and state reports go.
    @param client_factory: makes each site's broker client
        (L{mqttsvc.mqtt.connector.Connector.client}).
    @param max_clock_skew: seconds a message's C{ts} may be ahead.
    @param max_devices: devices a site may have unless it says otherwise.
    """

    log = Logger()
    name = "sites"

    def __init__(
        self,
        reactor: Any,
        store: Store,
        ingest: IngestPort,
        *,
        instance: str | None = "local",
        ownership: Ownership | None = None,
        monitor_interval: float = MONITOR_INTERVAL,
        probe_interval: float = PROBE_INTERVAL,
        proving_time: float = PROVING_TIME,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        site_factory: Callable[..., SiteService] = SiteService,
        client_factory: ClientFactory,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
        max_devices: int = DEFAULT_MAX_DEVICES,
    ) -> None:
        super().__init__()
        self._max_payload = max_payload
        self._max_clock_skew = max_clock_skew
        self._max_devices = max_devices
        self._client_factory = client_factory
        self._reactor = reactor
        self._store = store
        self._ingest = ingest
        self._instance = instance
        self._ownership = ownership
        #: Sites this instance gave up (handed over, lost, fenced) and has
        #: not acquired again: not started here even while the keeper
        #: still says it holds them (a hand-over is released only after
        #: the site stopped; a fenced site waits for the keeper's word).
        self._given_up: set[str] = set()
        self._probe_interval = probe_interval
        self._proving_time = proving_time
        self._site_factory = site_factory
        self._locks: dict[str, DeferredLock] = {}
        self._monitor = LoopingCall(self._monitor_once)
        self._monitor.clock = reactor
        self._monitor_interval = monitor_interval
        self._loaded: Deferred[None] = Deferred()
        self._known: dict[str, _Known] = {}
        #: Each site's counters, kept across its services (see SiteCounters).
        self._counters: dict[str, SiteCounters] = {}
        # Each known site's status as counted, and the counts: kept up to
        # date on every change so that service.status costs nothing.
        self._counted: dict[str, str] = {}
        self._counts = dict.fromkeys(STATUSES, 0)

    def startService(self) -> None:
        super().startService()
        monitoring: Deferred[Any] = self._monitor.start(self._monitor_interval, now=True)
        monitoring.addErrback(lambda f: self.log.failure("the site monitor stopped", f))

    @property
    def loaded(self) -> bool:
        """
        Whether the sites in the database have been reconciled once.
        """
        return self._loaded.called

    def when_loaded(self) -> Deferred[None]:
        """
        Fire once the sites in the database have been reconciled for the
        first time.
        """
        d: Deferred[None] = Deferred()

        def done(result: object) -> object:
            d.callback(None)
            return result

        self._loaded.addBoth(done)
        return d

    def _monitor_once(self) -> Deferred[None]:
        # LoopingCall waits for this, so two passes never overlap.
        passed = Deferred.fromCoroutine(self.reconcile_all())

        def failed(f: Any) -> None:
            self.log.warn(
                "reconciling the sites failed, trying again in {interval}s: {error}",
                interval=self._monitor_interval,
                error=f.getErrorMessage(),
            )

        def loaded(_: object) -> None:
            if not self._loaded.called:
                self._loaded.callback(None)

        return passed.addCallback(loaded).addErrback(failed)

    async def reconcile_all(self) -> None:
        """
        Bring every site in line with the database (the first time, after
        the ingest side has loaded the devices it knows).
        """
        rows = {row.config.site_id: row for row in await self._store.sites.all()}

        async def policies() -> Mapping[str, OfflinePolicy]:
            return _policies(rows)

        await self._ingest.devices_ready(policies)
        for site_id in sorted(set(rows) | set(self.namedServices) | set(self._known)):
            await self._apply(site_id, rows.get(site_id))

    async def _listed_policies(self) -> Mapping[str, OfflinePolicy]:
        rows = {row.config.site_id: row for row in await self._store.sites.all()}
        return _policies(rows)

    async def reconcile(self, site_id: str) -> None:
        """
        Bring one site in line with its row (or its absence), once the
        known devices are loaded.
        """
        await self._ingest.devices_ready(self._listed_policies)
        await self._apply(site_id, await self._store.sites.get(site_id))

    def notified(self, site_id: str) -> None:
        """
        The database says a site's configuration changed.
        """
        d = Deferred.fromCoroutine(self.reconcile(site_id))
        d.addErrback(
            lambda f: self.log.warn(
                "reconciling site {site_id} failed: {error}; the monitor will retry",
                site_id=site_id,
                error=f.getErrorMessage(),
            )
        )

    def resync(self) -> None:
        """
        Reconcile everything now (notifications may have been missed).
        """
        d = Deferred.fromCoroutine(self.reconcile_all())
        d.addErrback(
            lambda f: self.log.warn(
                "resynchronising the sites failed: {error}; the monitor will retry",
                error=f.getErrorMessage(),
            )
        )

    async def _apply(self, site_id: str, row: SiteRow | None) -> None:
        lock = self._locks.setdefault(site_id, DeferredLock())
        await lock.acquire()
        try:
            if not self.running:
                return
            if row is not None:
                self._remember(row)
            current = self.site(site_id)
            if row is not None and row.config.is_enabled and not self._runs_here(site_id):
                if current is not None:
                    self.log.info("site {site_id} is not ours: stopping it", site_id=site_id)
                    current.moving(drain=False)
                    await current.disownServiceParent()
                return
            if row is None or not row.config.is_enabled:
                if current is not None:
                    why = "deleted" if row is None else "disabled"
                    self.log.info("site {site_id} {why}: stopping it", site_id=site_id, why=why)
                    await current.disownServiceParent()
                if row is None:
                    self._given_up.discard(site_id)
                    self._known.pop(site_id, None)
                    self._counters.pop(site_id, None)
                    self._ingest.site_removed(site_id)
                return
            if current is None:
                if self._ownership is not None:
                    # In a cluster liveness loads a site's devices when it
                    # is acquired; it may be given up meanwhile.
                    await self._ingest.site_devices_ready(site_id, row.config.offline)
                    if not self.running or not self._runs_here(site_id):
                        return
                self._attach(row)
            elif not await current.reconfigure(row.config):
                # The site needs a new connection for this configuration.
                await current.disownServiceParent()
                self._attach(row, resume=False)
        finally:
            self._recount(site_id)
            lock.release()

    def _runs_here(self, site_id: str) -> bool:
        """
        Whether this instance may run the site: always when it runs alone;
        in a cluster while it holds the lease and has not given it up.
        """
        if self._ownership is None:
            return True
        return self._ownership.owns(site_id) and site_id not in self._given_up

    # What the lease keeper says (in a cluster).

    def acquired(self, site_id: str) -> None:
        """
        This instance has taken the site's lease: start it, from its row
        (the retry schedule its last owner left).
        """
        self._given_up.discard(site_id)
        self.notified(site_id)

    def hand_over(self, site_id: str) -> Deferred[None]:
        """
        Give the site to another instance: stop reading, let what was read
        be committed and acknowledged, disconnect, and let what stopping
        wrote (its status and events) be committed too, under the lease it
        still holds.  Fires once all that is done (then the keeper releases
        the lease: a write of the site queued after that would be fenced,
        its status and events lost, and a fenced batch counted).
        """
        self._given_up.add(site_id)
        stopped = Deferred.fromCoroutine(self._hand_over(site_id))
        # After it stopped reading (at once, unless a reconcile of the site
        # holds its lock): its devices are the next owner's.
        self._ingest.site_released(site_id)
        return stopped

    async def _hand_over(self, site_id: str) -> None:
        if self.site(site_id) is not None:
            await self._give_up(site_id, drain=True)
        await self._ingest.site_written(site_id)

    def lost(self, site_id: str) -> None:
        """
        The site's lease is no longer this instance's: stop it at once.
        """
        self._given_up.add(site_id)
        self._stop_at_once(site_id, "its lease was lost")
        self._ingest.site_released(site_id)

    def fenced(self, site_ids: Iterable[str]) -> None:
        """
        The database refused a batch of these sites' writes: their leases
        are another instance's (or another epoch's).  Stop them at once;
        they start here again only when the keeper acquires them again.
        """
        for site_id in site_ids:
            self._given_up.add(site_id)
            self._stop_at_once(site_id, "its writes were fenced")
            self._ingest.site_released(site_id)

    def _stop_at_once(self, site_id: str, why: str) -> None:
        site = self.site(site_id)
        if site is None:
            return
        self.log.info("site {site_id}: {why}: stopping it", site_id=site_id, why=why)
        site.moving(drain=False)
        stopping = Deferred.fromCoroutine(self._give_up(site_id, drain=False))
        stopping.addErrback(
            lambda f: self.log.failure("stopping site {site_id} failed", f, site_id=site_id)
        )

    async def _give_up(self, site_id: str, *, drain: bool) -> None:
        lock = self._locks.setdefault(site_id, DeferredLock())
        await lock.acquire()
        try:
            current = self.site(site_id)
            if current is None:
                return
            current.moving(drain=drain)
            await current.disownServiceParent()
        finally:
            self._recount(site_id)
            lock.release()

    def _remember(self, row: SiteRow) -> None:
        known = self._known.get(row.config.site_id)
        if known is None:
            self._known[row.config.site_id] = _Known(row.status, row.config_error)
            return
        known.config_error = row.config_error
        if not known.reported:
            known.status = row.status

    def _recount(self, site_id: str) -> None:
        """
        Count a site under its current status (or no more, once it is gone).
        """
        known = self._known.get(site_id)
        new: str | None = None
        if known is not None:
            site = self.site(site_id)
            new = site.state.status if site is not None else idle_status(known.status)
        old = self._counted.get(site_id)
        if old == new:
            return
        if old is not None:
            self._counts[old] -= 1
        if new is None:
            del self._counted[site_id]
        else:
            self._counted[site_id] = new
            self._counts[new] += 1

    def status_counts(self) -> dict[str, int]:
        """
        How many sites there are (C{total}) and how many are in each of
        L{STATUSES}: a running site's live status, else the stored one (see
        L{idle_status}).  Exact once L{loaded}.
        """
        return {"total": len(self._counted), **self._counts}

    def config_error(self, site_id: str) -> str | None:
        """
        What in a site's stored configuration is being ignored, as of the
        last reconcile of the site.

        @raise KeyError: for a site the supervisor does not know.
        """
        return self._known[site_id].config_error

    def _attach(self, row: SiteRow, resume: bool = True) -> SiteService:
        site = self._site_factory(
            self._reactor,
            row.config,
            self._ingest.writer,
            self._report,
            instance=self._instance,
            resume=row.resume_state() if resume else None,
            probe_interval=self._probe_interval,
            proving_time=self._proving_time,
            devices=self._ingest.devices,
            max_payload=self._max_payload,
            client_factory=self._client_factory,
            max_clock_skew=self._max_clock_skew,
            max_devices=self._max_devices,
            counters=self._counters.setdefault(row.config.site_id, SiteCounters()),
        )
        site.setServiceParent(self)
        return site

    def _report(self, state: SiteState, event: ConnectionEvent | None) -> None:
        self._ingest.site_reported(state.as_update(), event)
        known = self._known.get(state.site_id)
        if known is not None:
            known.status = state.status
            known.reported = True
            self._recount(state.site_id)
        if event is None or event.to_state == event.from_state:
            return
        # What the connection means for the site's devices.
        if event.to_state == CONNECTED:
            site = self.site(event.site_id)
            grace = site.config.offline.grace if site is not None else OfflinePolicy().grace
            self._ingest.site_up(event.site_id, grace)
        elif event.from_state == CONNECTED:
            self._ingest.site_down(event.site_id, f"site connection {event.to_state}")

    def site(self, site_id: str) -> SiteService | None:
        """
        The running service of a site, if it has one.
        """
        service = self.namedServices.get(site_id)
        return service if isinstance(service, SiteService) else None

    def sites(self) -> list[SiteService]:
        return [s for s in self if isinstance(s, SiteService)]

    def counters(self, site_id: str) -> SiteCounters:
        """
        A site's counters since this process started (zero for a site that
        has not run), whether it runs now or not.
        """
        return self._counters.get(site_id) or SiteCounters()

    def idle_sites(self) -> list[str]:
        """
        The sites the database has that have no running service (stopped,
        disabled), in site id order.
        """
        return sorted(site_id for site_id in self._known if self.site(site_id) is None)

    def stopService(self) -> Deferred[None]:
        """
        Stop every site, each with a clean DISCONNECT, and wait for all; a
        site waiting or in error keeps its schedule for the next start.
        """
        if self._monitor.running:
            self._monitor.stop()
        self.running = False
        stops = [Deferred.fromCoroutine(_maybe(s.shut_down())) for s in self.sites()]
        return gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)


def _policies(rows: Mapping[str, SiteRow]) -> Mapping[str, OfflinePolicy]:
    return {site_id: row.config.offline for site_id, row in rows.items()}


async def _maybe(d: Deferred[None] | None) -> None:
    if d is not None:
        await d
