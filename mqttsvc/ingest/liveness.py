"""
Offline detection: every device has a deadline, and one timer watches the
earliest.

A device's deadline is its last message's receive time plus its expected
interval times the site's grace factor.  Deadlines live in a heap; one
L{IDelayedCall} is armed for the earliest, so a device is marked offline
right at its deadline however many devices are tracked, and nothing sweeps
periodically.  A heartbeat pushes a new heap entry rather than searching
for the old one; stale entries are skipped when they surface, and the heap
is rebuilt when they outnumber the live ones.

While a site's connection is down its devices are C{unknown} and have no
deadline; when it is back, each gets a full interval of grace.  So in a
site that is up, every device that is not offline has a deadline: one that
has none would never go offline again.  L{OfflineDetector.repair} finds
such devices (none, unless there is a bug) and gives them their deadline.

A site-wide change (a site's connection lost, every device unknown) is one
L{SiteDevicesStatus}, not one change per device: it is written as one
statement per table and one event.  A site may have a limit on its
devices: a new one beyond it is refused (L{DeviceLimit}).

L{Liveness} is the detector as a service: it loads the devices the database
knows, is fed each site's connection changes, writes the changes its timer
makes, and runs the repair now and then.  Alone it loads every site's
devices at start; in a cluster (C{--cluster}) it tracks only the sites this
instance owns: a site's devices are loaded when it is acquired
(L{Liveness.site_ready}) and forgotten, without a write, when it is lost or
handed over (L{Liveness.site_released}).
"""

from __future__ import annotations

import heapq
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred, DeferredLock
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.task import Cooperator, LoopingCall
from twisted.logger import Logger

from mqttsvc.config import OfflinePolicy
from mqttsvc.records import DeviceKey, DeviceStatus, Effect, SiteDevicesStatus

ONLINE, OFFLINE, UNKNOWN = "online", "offline", "unknown"


class DeviceLimit(Exception):
    """
    A new device of a site that already has as many devices as it may; the
    text is the dead letter's reason.
    """

    def __init__(self, site_id: str, limit: int) -> None:
        super().__init__(f"site has reached its limit of {limit} devices")
        self.site_id = site_id
        self.limit = limit


class _Device:
    """
    One tracked device.  Its heap entries are C{(deadline, device)}: a
    device compares by identity when deadlines tie, so an entry needs no
    sequence number.  Measured with tracemalloc (C{python -m bench
    device-memory}): 529 bytes per device before (a set per site beside
    the dict of all, C{(deadline, sequence, key)} entries, and a fresh
    site id, kind and status string per device loaded from the database),
    about 300 after.
    """

    __slots__ = ("before", "deadline", "interval", "key", "status")

    def __init__(self, key: DeviceKey, status: str, interval: float) -> None:
        self.key = key
        self.status = status
        self.interval = interval
        self.deadline: float | None = None
        #: While its site made it unknown: the status it had before.
        self.before: str | None = None

    def become(self, status: str) -> bool:
        """
        Take a status of its own; whether that is an event (it is not when
        the device only returns to the status it had before its site made
        it unknown).
        """
        recorded = self.before != status
        self.before = None
        self.status = status
        return recorded

    def __lt__(self, other: _Device) -> bool:
        return id(self) < id(other)


#: The statuses as the detector keeps them: one string object each.
_STATUSES = {ONLINE: ONLINE, OFFLINE: OFFLINE, UNKNOWN: UNKNOWN}


class OfflineDetector:
    """
    Tracks the liveness of every device of every site.

    @param clock: the deadlines' clock.
    @param on_change: receives the L{DeviceStatus} changes that a timer
        makes (changes caused by a message or by a site's connection are
        returned to the caller instead, to be written with it).
    @param on_limit: called with the site, its limit and the refused
        device the first time a site refuses a device for its limit (in
        this run).
    """

    def __init__(
        self,
        clock: IReactorTime,
        on_change: Callable[[list[DeviceStatus]], None],
        on_limit: Callable[[str, int, DeviceKey], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_change = on_change
        self._on_limit = on_limit
        #: Every tracked device, by site: a site's devices are found
        #: without a second index.
        self._sites: dict[str, dict[DeviceKey, _Device]] = {}
        self._count = 0
        self._heap: list[tuple[float, _Device]] = []
        self._timer: IDelayedCall | None = None
        self._timer_for = 0.0
        self._grace: dict[str, float] = {}
        #: Sites whose connection is up: their devices have deadlines.
        self._up: set[str] = set()
        #: Sites that have refused a device for their limit.
        self._full: set[str] = set()

    def __len__(self) -> int:
        return self._count

    def site_count(self, site_id: str) -> int:
        """
        How many devices a site has.
        """
        return len(self._sites.get(site_id, ()))

    def counts(self) -> dict[str, int]:
        """
        How many tracked devices are in each status.
        """
        counts = {ONLINE: 0, OFFLINE: 0, UNKNOWN: 0}
        for devices in self._sites.values():
            for device in devices.values():
                counts[device.status] += 1
        return counts

    def _get(self, key: DeviceKey) -> _Device | None:
        devices = self._sites.get(key.site_id)
        return None if devices is None else devices.get(key)

    def status(self, key: DeviceKey) -> str | None:
        device = self._get(key)
        return None if device is None else device.status

    def deadline(self, key: DeviceKey) -> float | None:
        device = self._get(key)
        return None if device is None else device.deadline

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def _schedule(self, device: _Device, deadline: float) -> None:
        device.deadline = deadline
        heapq.heappush(self._heap, (deadline, device))
        if len(self._heap) > 2 * self._count + 1024:
            self._compact()
        self._arm()

    def _compact(self) -> None:
        self._heap = [entry for entry in self._heap if entry[1].deadline == entry[0]]
        heapq.heapify(self._heap)

    def _arm(self) -> None:
        if not self._heap:
            if self._timer is not None and self._timer.active():
                self._timer.cancel()
            self._timer = None
            return
        earliest = self._heap[0][0]
        if self._timer is not None and self._timer.active():
            # Compare with the deadline the timer was set for, not with its
            # getTime(): that is computed from a later clock reading, so it
            # is a little late and would move the timer on every message.
            if self._timer_for <= earliest:
                return
            self._timer.cancel()
        self._timer_for = earliest
        self._timer = self._clock.callLater(
            max(0.0, earliest - self._clock.seconds()), self._expire
        )

    def _expire(self) -> None:
        self._timer = None
        now = self._clock.seconds()
        at = self._now()
        changes = []
        while self._heap and self._heap[0][0] <= now:
            deadline, device = heapq.heappop(self._heap)
            if device.deadline != deadline:
                continue  # superseded by a later message, or forgotten
            device.deadline = None
            if device.status != OFFLINE:
                key = device.key
                grace = self._grace.get(key.site_id, 1)
                was = device.status
                recorded = device.become(OFFLINE)
                changes.append(
                    DeviceStatus(
                        key,
                        was,
                        OFFLINE,
                        at,
                        f"silent for {device.interval * grace:g}s "
                        f"({grace:g} x {device.interval:g}s interval)",
                        recorded,
                    )
                )
        self._arm()
        if changes:
            self._on_change(changes)

    def seen(
        self, key: DeviceKey, interval: float, grace: float, limit: int | None = None
    ) -> DeviceStatus | None:
        """
        A device spoke now.

        @param interval: seconds until it is due to speak again.
        @param limit: how many devices its site may have.
        @return: its change to online, if it was not online.
        @raise DeviceLimit: for a new device of a site that has C{limit}
            devices already; it is not tracked.
        """
        self._grace[key.site_id] = grace
        devices = self._sites.get(key.site_id)
        if devices is None:
            devices = self._sites[key.site_id] = {}
        device = devices.get(key)
        if device is None:
            if limit is not None and len(devices) >= limit:
                if key.site_id not in self._full:
                    self._full.add(key.site_id)
                    if self._on_limit is not None:
                        self._on_limit(key.site_id, limit, key)
                raise DeviceLimit(key.site_id, limit)
            device = devices[key] = _Device(key, UNKNOWN, interval)
            self._count += 1
        device.interval = interval
        self._schedule(device, self._clock.seconds() + interval * grace)
        was = device.status
        if was == ONLINE:
            return None
        recorded = device.become(ONLINE)
        return DeviceStatus(key, was, ONLINE, self._now(), "message received", recorded)

    def load(
        self, devices: Iterable[tuple[DeviceKey, str, float, str | None]], reason: str
    ) -> list[SiteDevicesStatus]:
        """
        Remember devices known from an earlier run (key, stored status,
        expected interval, and for an unknown one the status it had before
        its site made it unknown), merged with what happened since this run
        began:
        a device already tracked (it spoke) is left as it is; one of a site
        that is up gets its grace period from now; any other is unknown
        (with C{reason}) until its site is up.

        @return: per site whose devices became unknown, one summary of the
            change (see L{site_down}).
        """
        at = self._now()
        now = self._clock.seconds()
        sites = self._sites
        unknown: dict[str, int] = {}
        for key, status, interval, before in devices:
            site_devices = sites.get(key.site_id)
            if site_devices is None:
                site_devices = sites[key.site_id] = {}
            if key in site_devices:
                continue
            device = site_devices[key] = _Device(key, _STATUSES.get(status, UNKNOWN), interval)
            self._count += 1
            if device.status == UNKNOWN and before in (ONLINE, OFFLINE):
                device.before = _STATUSES[before]
            if key.site_id in self._up:
                self._schedule(device, now + interval * self._grace.get(key.site_id, 1))
            elif device.status != UNKNOWN:
                unknown[key.site_id] = unknown.get(key.site_id, 0) + 1
                device.before = device.status
                device.status = UNKNOWN
        return [
            SiteDevicesStatus(site_id, UNKNOWN, at, reason, count)
            for site_id, count in unknown.items()
        ]

    def site_down(self, site_id: str, reason: str) -> SiteDevicesStatus | None:
        """
        The site's connection is gone: its devices are unknown until it is
        back, and their deadlines are suspended.

        @return: the change as one summary for the whole site (how many
            devices became unknown), or None when none did.
        """
        self._up.discard(site_id)
        changed = 0
        for device in self._sites.get(site_id, {}).values():
            device.deadline = None
            if device.status != UNKNOWN:
                changed += 1
                device.before = device.status
                device.status = UNKNOWN
        if not changed:
            return None
        return SiteDevicesStatus(site_id, UNKNOWN, self._now(), reason, changed)

    def site_up(self, site_id: str, grace: float) -> None:
        """
        The site's connection is back: every device not heard from since
        gets a full grace period from now before it is declared offline.
        """
        self._grace[site_id] = grace
        self._up.add(site_id)
        now = self._clock.seconds()
        for device in self._sites.get(site_id, {}).values():
            if device.deadline is None:
                self._schedule(device, now + device.interval * grace)

    def repair(self, found: list[DeviceKey], chunk: int = 10_000) -> Iterator[None]:
        """
        Find the devices of sites that are up which are not offline and
        have no deadline (a bug: nothing would ever mark them offline),
        append them to C{found}, and give each its grace period from now.

        A generator for a cooperative task: it yields after every C{chunk}
        devices, so that a sweep of hundreds of thousands never holds the
        reactor for long.
        """
        seen = 0
        for site_id in list(self._up):
            grace = self._grace.get(site_id, 1)
            for device in list(self._sites.get(site_id, {}).values()):
                seen += 1
                if seen % chunk == 0:
                    yield None
                if (
                    device.deadline is not None
                    or device.status == OFFLINE
                    or site_id not in self._up
                    or self._get(device.key) is not device
                ):
                    continue
                found.append(device.key)
                self._schedule(device, self._clock.seconds() + device.interval * grace)

    def limit_changed(self, site_id: str) -> None:
        """
        The site's device limit changed: its next refusal is reported as
        the first.
        """
        self._full.discard(site_id)

    def forget_site(self, site_id: str) -> None:
        """
        Stop tracking a site's devices (the site was deleted).
        """
        devices = self._sites.pop(site_id, {})
        for device in devices.values():
            device.deadline = None  # its heap entries are stale now
        self._count -= len(devices)
        self._grace.pop(site_id, None)
        self._up.discard(site_id)
        self._full.discard(site_id)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None


class KnownDevices(Protocol):
    """
    Where the devices of earlier runs are read from (the store's
    L{mqttsvc.db.devices.Devices}).
    """

    def known(self) -> AsyncIterator[list[tuple[DeviceKey, str, float | None, str | None]]]:
        """
        Every known device, in pages: key, stored status, own interval
        (None when it never said), status before its site made it unknown.
        """
        ...


class KnownSiteDevices(Protocol):
    """
    Where, in a cluster, the devices of one site are read from when this
    instance acquires it (the store's L{mqttsvc.db.devices.Devices}).
    """

    def known_of(
        self, site_id: str, size: int = ...
    ) -> AsyncIterator[list[tuple[DeviceKey, str, float | None, str | None]]]:
        """
        The site's known devices, in pages of at most C{size}, as
        L{KnownDevices.known} gives them.
        """
        ...


class Liveness(Service):
    """
    Device liveness as a service: the L{OfflineDetector}, fed by the sites'
    connection changes (L{site_up}, L{site_down}), loaded once from the database
    before any site starts (L{ready}), its changes written through
    C{write}, and repaired every C{repair_interval} seconds (L{repair}).

    In a cluster (C{per_site}) it tracks only the sites this instance owns:
    nothing is loaded at start; each site's devices are loaded once it is
    acquired, before it starts (L{site_ready}), and forgotten when it is
    lost or handed over (L{site_released}); nothing is written for a site
    it does not track.

    @param write: writes device status changes (the ingest writer's
        C{submit}).
    @param on_limit: called with the site, its limit and the refused
        device the first time a site refuses a device for its limit.
    @param per_site: in a cluster, where each acquired site's devices are
        read; None (alone): every site's are loaded at start from C{known}.
    """

    log = Logger()
    name = "liveness"

    def __init__(
        self,
        clock: Any,
        known: KnownDevices,
        write: Callable[[list[Effect]], Deferred[None]],
        *,
        on_limit: Callable[[str, int, DeviceKey], None] | None = None,
        repair_interval: float,
        per_site: KnownSiteDevices | None = None,
    ) -> None:
        self._write = write
        self._on_limit = on_limit
        self._known = known
        self._per_site = per_site
        #: In a cluster: the sites acquired (their devices are written),
        #: those whose devices are loaded, a lock per site (one load at a
        #: time), and a count of each site's releases, so that a load that
        #: a release overtook keeps nothing.
        self._acquired: set[str] = set()
        self._site_loaded: set[str] = set()
        self._site_loading: dict[str, DeferredLock] = {}
        self._releases: dict[str, int] = {}
        self.devices = OfflineDetector(clock, self._changed, self._limit)
        # The devices are loaded once, before any site is started, however
        # many reconciliations ask for them at once (the monitor's first
        # pass, the configuration listener's resync, a notification).
        self._loaded = False
        self._loading = DeferredLock()
        #: Devices found stuck (see L{OfflineDetector.repair}): a bug.
        self.devices_repaired = 0
        self._cooperator = Cooperator(scheduler=lambda f: clock.callLater(0, f), started=True)
        self._repairs = LoopingCall(self.repair_once)
        self._repairs.clock = clock
        self._repair_interval = repair_interval

    def startService(self) -> None:
        super().startService()
        repairing: Deferred[Any] = self._repairs.start(self._repair_interval, now=False)
        repairing.addErrback(lambda f: self.log.failure("the device repair stopped", f))

    def stopService(self) -> None:
        super().stopService()
        if self._repairs.running:
            self._repairs.stop()
        self.devices.stop()

    def repair_once(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self.repair()).addErrback(
            lambda f: self.log.failure("repairing the devices failed", f)
        )

    async def repair(self) -> None:
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

    async def ready(self, policies: Callable[[], Awaitable[Mapping[str, OfflinePolicy]]]) -> None:
        """
        Load the known devices, once: whoever comes second waits for the
        first load instead of running another.  In a cluster it loads
        nothing: each site is loaded when it is acquired (L{site_ready}).

        @param policies: gives each site's offline policy, when the load
            needs them.
        """
        if self._loaded or self._per_site is not None:
            # In a cluster each site is loaded when acquired (site_ready).
            return
        async with self._loading:
            if self._loaded:
                return
            await self._load(await policies())

    async def _load(self, policies: Mapping[str, OfflinePolicy]) -> None:
        """
        Rebuild the detector from the database: every device is unknown
        until its site is connected, then gets a grace period.
        """
        default = OfflinePolicy()
        # One summary per site, however many pages its devices came in.
        unknown: dict[str, SiteDevicesStatus] = {}
        count = 0
        async for page in self._known.known():
            known = []
            for key, status, interval, before in page:
                policy = policies.get(key.site_id, default)
                known.append((key, status, interval or policy.interval(key.kind), before))
            count += len(known)
            for change in self.devices.load(known, "mqttsvc started"):
                earlier = unknown.get(change.site_id)
                if earlier is not None:
                    change = attrs.evolve(change, devices=earlier.devices + change.devices)
                unknown[change.site_id] = change
        self._changed(list(unknown.values()))
        self._loaded = True
        self.log.info("tracking {count} known devices", count=count)

    async def site_ready(self, site_id: str, policy: OfflinePolicy) -> None:
        """
        In a cluster: this instance acquired the site; load its known
        devices, once, before it starts (whoever comes second waits for the
        first load instead of running another).  As after a restart, they
        are unknown until the site's connection is up, then get their grace
        period; the site's devices that became unknown are written as one
        summary.

        @param policy: the site's offline policy (the interval of a device
            that never said its own).
        """
        if site_id in self._site_loaded:
            return
        lock = self._site_loading.setdefault(site_id, DeferredLock())
        async with lock:
            if site_id in self._site_loaded:
                return
            await self._load_site(site_id, policy)

    async def _load_site(self, site_id: str, policy: OfflinePolicy) -> None:
        assert self._per_site is not None, "site_ready is for an instance of a cluster"
        releases = self._releases.get(site_id, 0)
        self._acquired.add(site_id)
        unknown: SiteDevicesStatus | None = None
        count = 0
        try:
            async for page in self._per_site.known_of(site_id):
                if self._releases.get(site_id, 0) != releases:
                    break
                known = [
                    (key, status, interval or policy.interval(key.kind), before)
                    for key, status, interval, before in page
                ]
                count += len(known)
                for change in self.devices.load(known, "site acquired by this instance"):
                    if unknown is not None:
                        change = attrs.evolve(change, devices=unknown.devices + change.devices)
                    unknown = change
        except Exception:
            # Half a site is not loaded: the next start of the site loads
            # it again, from nothing.
            if self._releases.get(site_id, 0) == releases:
                self._acquired.discard(site_id)
                self.devices.forget_site(site_id)
            raise
        if self._releases.get(site_id, 0) != releases:
            # Lost or handed over while loading: what was loaded is
            # forgotten (by the release, and again here for the pages
            # read since).
            self.devices.forget_site(site_id)
            return
        self._site_loaded.add(site_id)
        if unknown is not None:
            self._changed([unknown])
        self.log.info(
            "site {site_id} acquired: tracking its {count} known devices",
            site_id=site_id,
            count=count,
        )

    def site_released(self, site_id: str) -> None:
        """
        In a cluster: the site is another instance's now (lost, handed
        over, fenced): forget its devices and write nothing more of them;
        their state in the database is the next owner's to take over.
        """
        self._acquired.discard(site_id)
        self._site_loaded.discard(site_id)
        self._releases[site_id] = self._releases.get(site_id, 0) + 1
        self.devices.forget_site(site_id)

    def site_up(self, site_id: str, grace: float) -> None:
        """
        A site's connection is up: its devices get their grace (C{grace}
        times their interval) before they are declared offline.
        """
        self.devices.site_up(site_id, grace)

    def site_down(self, site_id: str, reason: str) -> None:
        """
        A site's connection is no longer up: its devices are unknown.  In a
        cluster, a site this instance gave up (its connection closes after
        it was released) leaves nothing behind: what the messages it read
        meanwhile brought back is forgotten, and nothing is written.
        """
        if self._per_site is not None and site_id not in self._acquired:
            self.devices.forget_site(site_id)
            return
        down = self.devices.site_down(site_id, reason)
        if down is not None:
            self._changed([down])

    def forget_site(self, site_id: str) -> None:
        """
        The site is deleted: stop tracking its devices.
        """
        if self._per_site is not None:
            self.site_released(site_id)
            return
        self.devices.forget_site(site_id)

    def _limit(self, site_id: str, limit: int, device: DeviceKey) -> None:
        self.log.error(
            "site {site_id} has reached its limit of {limit} devices: new device ids are dead "
            "letters from now on (the first: {device})",
            site_id=site_id,
            limit=limit,
            device=device,
        )
        if self._on_limit is not None:
            self._on_limit(site_id, limit, device)

    def _changed(self, changes: Iterable[Effect]) -> None:
        changes = list(changes)
        if self._per_site is not None:
            # In a cluster only the sites this instance owns are written.
            changes = [c for c in changes if _site_of(c) in self._acquired]
        if not changes:
            return
        written = self._write(changes)
        written.addErrback(
            lambda f: self.log.warn(
                "could not record {count} device status changes: {error}",
                count=len(changes),
                error=f.getErrorMessage(),
            )
        )


def _site_of(change: Effect) -> str | None:
    """
    The site of a device change (one device's, or a whole site's).
    """
    if isinstance(change, DeviceStatus):
        return change.key.site_id
    if isinstance(change, SiteDevicesStatus):
        return change.site_id
    return None
