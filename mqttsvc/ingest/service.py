"""
The ingest side as one service: the batch writer and its lanes, and device
liveness, with every callback they report through given to the
constructor.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mqttsvc.config import OfflinePolicy
from mqttsvc.db.leases import Fence
from mqttsvc.ingest.liveness import KnownDevices, KnownSiteDevices, Liveness, OfflineDetector
from mqttsvc.ingest.writer import WritePool, WriterLanes
from mqttsvc.records import ConnectionEvent, DeviceKey, Effect, StatusUpdate

#: Seconds shutdown waits for the writer to write what it holds.
DRAIN_TIMEOUT = 5.0


class Ingest(Service):
    """
    Owns the L{WriterLanes} (C{writer}: the sites' messages, their
    connection statuses and events, device changes) and device liveness
    (C{liveness}, a L{Liveness} service, whose detector is C{devices}).

    It is started before the sites and stopped after them, so that it
    writes what they leave; C{liveness} is a service of its own, placed in
    the tree after the sites (by L{mqttsvc.tap}), so that no device is
    declared offline while the sites disconnect.

    @param pool: the connections the writer writes through, one per lane.
    @param known: where the devices of earlier runs are read from.
    @param lanes: how many lanes write side by side.
    @param observe: called with each committed batch's size and write time.
    @param on_stall: called with a lane, the seconds it has failed to
        commit, its error, and whether it recovered (see L{WriterLanes}).
    @param on_device_limit: called when a site first refuses a device for
        its limit (with the site, the limit and the device).
    @param repair_interval: seconds between two device repairs
        (L{Liveness.repair}).
    @param fence: in a cluster, the fence of a write of these sites, for
        every write of every lane; None (alone) writes unfenced.
    @param on_fenced: called with the sites of a write that their fence
        refused (another instance owns them now), after the writer dropped
        their messages unacknowledged; it should stop them.
    @param per_site: in a cluster, where the devices of each site this
        instance acquires are read: liveness then tracks only the sites it
        owns (L{site_devices_ready}, L{site_released}); None (alone): every
        site's devices are loaded at start from C{known}.
    @param writer_options: the other L{mqttsvc.ingest.writer.BatchWriter}
        options (batch size and delay, water marks).
    """

    log = Logger()
    name = "ingest"

    def __init__(
        self,
        clock: Any,
        pool: WritePool,
        known: KnownDevices,
        *,
        lanes: int,
        repair_interval: float,
        observe: Callable[[int, float], None] | None = None,
        on_stall: Callable[[int, float, str, bool], None] | None = None,
        on_device_limit: Callable[[str, int, DeviceKey], None] | None = None,
        fence: Callable[[Collection[str]], Fence | None] | None = None,
        on_fenced: Callable[[list[str]], None] | None = None,
        per_site: KnownSiteDevices | None = None,
        **writer_options: Any,
    ) -> None:
        self._clock = clock
        self.writer = WriterLanes(
            clock,
            pool,
            lanes=lanes,
            observe=observe,
            on_stall=on_stall,
            fence=fence,
            on_fenced=on_fenced,
            **writer_options,
        )
        self.liveness = Liveness(
            clock,
            known,
            self._write_device_changes,
            on_limit=on_device_limit,
            repair_interval=repair_interval,
            per_site=per_site,
        )

    def _write_device_changes(self, changes: list[Effect]) -> Deferred[None]:
        return self.writer.submit(changes)

    @property
    def devices(self) -> OfflineDetector:
        """
        The offline detector, which every site tells of the devices that
        speak.
        """
        return self.liveness.devices

    async def devices_ready(
        self, policies: Callable[[], Awaitable[Mapping[str, OfflinePolicy]]]
    ) -> None:
        """
        Fire once the known devices are loaded (see L{Liveness.ready}).
        """
        await self.liveness.ready(policies)

    async def site_devices_ready(self, site_id: str, policy: OfflinePolicy) -> None:
        """
        In a cluster: fire once the devices of a site this instance
        acquired are loaded (see L{Liveness.site_ready}).
        """
        await self.liveness.site_ready(site_id, policy)

    def site_released(self, site_id: str) -> None:
        """
        In a cluster: the site is another instance's now: forget its
        devices, write nothing more of them.
        """
        self.liveness.site_released(site_id)

    def site_written(self, site_id: str) -> Deferred[None]:
        """
        Fire once everything queued so far for the site (its messages'
        effects, statuses, events and device changes) is written, or
        dropped by the fence: a lane writes in order, so an empty write
        queued behind them in the site's lane fires after them.
        """
        return self.writer.lane(site_id).submit([])

    def site_reported(self, update: StatusUpdate, event: ConnectionEvent | None) -> None:
        """
        Write a site's connection status, and the event that led to it.
        """
        self.writer.set_status(update, event)

    def site_up(self, site_id: str, grace: float) -> None:
        self.liveness.site_up(site_id, grace)

    def site_down(self, site_id: str, reason: str) -> None:
        self.liveness.site_down(site_id, reason)

    def site_removed(self, site_id: str) -> None:
        """
        The site is deleted: forget its devices.
        """
        self.liveness.forget_site(site_id)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # The sites have stopped before us: write what is left, but never
        # hang shutdown on a database that is gone.
        idle = self.writer.when_idle()
        idle.addTimeout(DRAIN_TIMEOUT, self._clock)
        try:
            await idle
        except Exception:
            self.log.warn(
                "shutting down with {count} messages unwritten; the broker will redeliver them",
                count=self.writer.queued,
            )
        self.writer.stop()
