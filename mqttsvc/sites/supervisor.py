"""
The site supervisor: one named child service per enabled site, kept equal
to the database by reconciling by name.

Reconciliation happens on start, for a single site whenever the database
notifies a configuration change (within a second), after the notification
connection comes back (anything may have changed meanwhile), and every
C{monitor_interval} seconds as a safety net.  For each site it compares the
row with the running service: a new enabled site starts, a removed or
disabled one stops with a clean DISCONNECT, a changed connection setting
reconnects, and a changed subscription list resubscribes without
reconnecting.

It also keeps what the status calls need without reading the database:
each site's stored status and configuration error, and the number of sites
in each connection status, updated on every reconcile and state change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import attrs
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, DeferredLock, gatherResults
from twisted.internet.task import Cooperator, LoopingCall
from twisted.logger import Logger

from mqttsvc.config import (
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_MAX_DEVICES,
    DEFAULT_MAX_PAYLOAD,
    OfflinePolicy,
)
from mqttsvc.db.sites import SiteRow
from mqttsvc.db.store import Store
from mqttsvc.ingest.liveness import OfflineDetector
from mqttsvc.mqtt.connector import ClientFactory
from mqttsvc.records import ConnectionEvent, DeviceKey, Effect, SiteDevicesStatus
from mqttsvc.sites.site import PROBE_INTERVAL, PROVING_TIME, SiteCounters, SiteService, SiteState

#: Seconds between two full reconciliations (the old service's health check).
MONITOR_INTERVAL = 30.0

#: The connection statuses a site can be in, as C{service.status} counts them.
STATUSES = ("connected", "connecting", "disconnected", "error")


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

    @param instance: this mqttsvc instance's name, part of every client id.
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
        *,
        instance: str = "local",
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
        self.devices = OfflineDetector(reactor, self._devices_changed, self._device_limit)
        # The devices are loaded once, before any site is started, however
        # many reconciliations ask for them at once (the monitor's first
        # pass, the configuration listener's resync, a notification).
        self._devices_loaded = False
        self._devices_loading = DeferredLock()
        #: Devices found stuck (see L{OfflineDetector.repair}): a bug.
        self.devices_repaired = 0
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f), started=True)
        store.writer.on_pressure = self._pressure
        self._reactor = reactor
        self._store = store
        self._instance = instance
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

    def whenLoaded(self) -> Deferred[None]:
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
        passed = Deferred.fromCoroutine(self._monitor_pass())

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

    async def _monitor_pass(self) -> None:
        await self.reconcile_all()
        await self.repair_devices()

    async def repair_devices(self) -> None:
        """
        Look for devices that can never go offline (see
        L{OfflineDetector.repair}); there should be none.  Any found is a
        bug: it is logged as an error and counted, and the device is given
        its deadline.
        """
        found: list[DeviceKey] = []
        await self._cooperator.cooperate(self.devices.repair(found)).whenDone()
        if found:
            self.devices_repaired += len(found)
            self.log.error(
                "{count} devices of connected sites had no offline deadline (a bug); they have "
                "one now; the first: {key}",
                count=len(found),
                key=found[0],
            )

    async def reconcile_all(self) -> None:
        """
        Bring every site in line with the database (the first time, after
        loading the devices it knows).
        """
        rows = {row.config.site_id: row for row in await self._store.sites.all()}
        await self._devices_ready(rows)
        for site_id in sorted(set(rows) | set(self.namedServices) | set(self._known)):
            await self._apply(site_id, rows.get(site_id))

    async def _devices_ready(self, rows: dict[str, SiteRow] | None = None) -> None:
        """
        Load the known devices, once: whoever comes second waits for the
        first load instead of running another.
        """
        if self._devices_loaded:
            return
        async with self._devices_loading:
            if self._devices_loaded:
                return
            if rows is None:
                rows = {row.config.site_id: row for row in await self._store.sites.all()}
            await self._load_devices(rows)

    async def _load_devices(self, rows: dict[str, SiteRow]) -> None:
        """
        Rebuild the offline detector from the database: every device is
        unknown until its site is connected, then gets a grace period.
        """
        default = OfflinePolicy()
        # One summary per site, however many pages its devices came in.
        unknown: dict[str, SiteDevicesStatus] = {}
        count = 0
        async for page in self._store.devices.known():
            known = []
            for key, status, interval, before in page:
                row = rows.get(key.site_id)
                policy = row.config.offline if row is not None else default
                known.append((key, status, interval or policy.interval(key.kind), before))
            count += len(known)
            for change in self.devices.load(known, "mqttsvc started"):
                earlier = unknown.get(change.site_id)
                if earlier is not None:
                    change = attrs.evolve(change, devices=earlier.devices + change.devices)
                unknown[change.site_id] = change
        self._devices_changed(list(unknown.values()))
        self._devices_loaded = True
        self.log.info("tracking {count} known devices", count=count)

    def _pressure(self, lane: int, pressing: bool) -> None:
        """
        A write lane asks its sites to stop reading (or lets them read
        again); sites in other lanes read on.
        """
        writer = self._store.writer
        for site in self.sites():
            if writer.index(site.config.site_id) != lane:
                continue
            if pressing:
                site.pause_reading()
            else:
                site.resume_reading()

    def _device_limit(self, site_id: str, limit: int, device: DeviceKey) -> None:
        self.log.error(
            "site {site_id} has reached its limit of {limit} devices: new device ids are dead "
            "letters from now on (the first: {device})",
            site_id=site_id,
            limit=limit,
            device=device,
        )
        self._store.device_limit_reached(site_id, limit, device)

    def _devices_changed(self, changes: Sequence[Effect]) -> None:
        if not changes:
            return
        written = self._store.writer.submit(list(changes))
        written.addErrback(
            lambda f: self.log.warn(
                "could not record {count} device status changes: {error}",
                count=len(changes),
                error=f.getErrorMessage(),
            )
        )

    async def reconcile(self, site_id: str) -> None:
        """
        Bring one site in line with its row (or its absence), once the
        known devices are loaded.
        """
        await self._devices_ready()
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
            if row is None or not row.config.is_enabled:
                if current is not None:
                    why = "deleted" if row is None else "disabled"
                    self.log.info("site {site_id} {why}: stopping it", site_id=site_id, why=why)
                    await current.disownServiceParent()
                if row is None:
                    self._known.pop(site_id, None)
                    self._counters.pop(site_id, None)
                    self.devices.forget_site(site_id)
                return
            if current is None:
                self._attach(row)
            elif current.config.connection_differs(row.config):
                self.log.info("site {site_id} changed: reconnecting", site_id=site_id)
                await current.disownServiceParent()
                self._attach(row, resume=False)
            else:
                if current.config.topics != row.config.topics:
                    self.log.info("site {site_id} subscriptions changed", site_id=site_id)
                    current.update_topics(row.config.topics)
                if current.config.max_devices != row.config.max_devices:
                    current.set_max_devices(row.config.max_devices)
                    self.devices.limit_changed(site_id)
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
            self._store.writer,
            self._report,
            instance=self._instance,
            resume=row.resume_state() if resume else None,
            probe_interval=self._probe_interval,
            proving_time=self._proving_time,
            devices=self.devices,
            max_payload=self._max_payload,
            client_factory=self._client_factory,
            max_clock_skew=self._max_clock_skew,
            max_devices=self._max_devices,
            counters=self._counters.setdefault(row.config.site_id, SiteCounters()),
        )
        site.setServiceParent(self)
        if self._store.writer.lane(row.config.site_id).pressing:
            site.pause_reading()
        return site

    def _report(self, state: SiteState, event: ConnectionEvent | None) -> None:
        self._store.writer.set_status(state.as_update(), event)
        known = self._known.get(state.site_id)
        if known is not None:
            known.status = state.status
            known.reported = True
            self._recount(state.site_id)
        if event is None or event.to_state == event.from_state:
            return
        if event.to_state == "connected":
            site = self.site(event.site_id)
            grace = site.config.offline.grace if site is not None else OfflinePolicy().grace
            self.devices.site_up(event.site_id, grace)
        elif event.from_state == "connected":
            down = self.devices.site_down(event.site_id, f"site connection {event.to_state}")
            if down is not None:
                self._devices_changed([down])

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
        self.devices.stop()
        self.running = False
        stops = [Deferred.fromCoroutine(_maybe(s.shut_down())) for s in self.sites()]
        return gatherResults(stops, consumeErrors=True).addCallback(lambda _: None)


async def _maybe(d: Deferred[None] | None) -> None:
    if d is not None:
        await d
