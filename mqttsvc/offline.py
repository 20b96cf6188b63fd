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
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime

from twisted.internet.interfaces import IDelayedCall, IReactorTime

from mqttsvc.processing import DeviceKey, DeviceStatus

ONLINE, OFFLINE, UNKNOWN = "online", "offline", "unknown"


class _Device:
    __slots__ = ("deadline", "interval", "status")

    def __init__(self, status: str, interval: float) -> None:
        self.status = status
        self.interval = interval
        self.deadline: float | None = None


class OfflineDetector:
    """
    Tracks the liveness of every device of every site.

    @param clock: the deadlines' clock.
    @param on_change: receives the L{DeviceStatus} changes that a timer
        makes (changes caused by a message or by a site's connection are
        returned to the caller instead, to be written with it).
    """

    def __init__(
        self, clock: IReactorTime, on_change: Callable[[list[DeviceStatus]], None]
    ) -> None:
        self._clock = clock
        self._on_change = on_change
        self._devices: dict[DeviceKey, _Device] = {}
        self._by_site: dict[str, set[DeviceKey]] = {}
        self._heap: list[tuple[float, int, DeviceKey]] = []
        self._sequence = 0
        self._timer: IDelayedCall | None = None
        self._timer_for = 0.0
        self._grace: dict[str, float] = {}
        #: Sites whose connection is up: their devices have deadlines.
        self._up: set[str] = set()

    def __len__(self) -> int:
        return len(self._devices)

    def counts(self) -> dict[str, int]:
        """
        How many tracked devices are in each status.
        """
        counts = {ONLINE: 0, OFFLINE: 0, UNKNOWN: 0}
        for device in self._devices.values():
            counts[device.status] += 1
        return counts

    def status(self, key: DeviceKey) -> str | None:
        device = self._devices.get(key)
        return None if device is None else device.status

    def deadline(self, key: DeviceKey) -> float | None:
        device = self._devices.get(key)
        return None if device is None else device.deadline

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self._clock.seconds(), UTC)

    def _track(self, key: DeviceKey, status: str, interval: float) -> _Device:
        device = self._devices.get(key)
        if device is None:
            device = self._devices[key] = _Device(status, interval)
            self._by_site.setdefault(key.site_id, set()).add(key)
        return device

    def _schedule(self, key: DeviceKey, device: _Device, deadline: float) -> None:
        device.deadline = deadline
        self._sequence += 1
        heapq.heappush(self._heap, (deadline, self._sequence, key))
        if len(self._heap) > 2 * len(self._devices) + 1024:
            self._compact()
        self._arm()

    def _compact(self) -> None:
        self._heap = [
            entry
            for entry in self._heap
            if (d := self._devices.get(entry[2])) is not None and d.deadline == entry[0]
        ]
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
            deadline, _, key = heapq.heappop(self._heap)
            device = self._devices.get(key)
            if device is None or device.deadline != deadline:
                continue  # superseded by a later message, or forgotten
            device.deadline = None
            if device.status != OFFLINE:
                changes.append(
                    DeviceStatus(
                        key,
                        device.status,
                        OFFLINE,
                        at,
                        f"silent for {device.interval * self._grace.get(key.site_id, 1):g}s "
                        f"({self._grace.get(key.site_id, 1):g} x {device.interval:g}s interval)",
                    )
                )
                device.status = OFFLINE
        self._arm()
        if changes:
            self._on_change(changes)

    def seen(self, key: DeviceKey, interval: float, grace: float) -> DeviceStatus | None:
        """
        A device spoke now.

        @param interval: seconds until it is due to speak again.
        @return: its change to online, if it was not online.
        """
        self._grace[key.site_id] = grace
        device = self._track(key, UNKNOWN, interval)
        device.interval = interval
        self._schedule(key, device, self._clock.seconds() + interval * grace)
        if device.status == ONLINE:
            return None
        change = DeviceStatus(key, device.status, ONLINE, self._now(), "message received")
        device.status = ONLINE
        return change

    def load(
        self, devices: Iterable[tuple[DeviceKey, str, float]], reason: str
    ) -> list[DeviceStatus]:
        """
        Remember devices known from an earlier run (key, stored status,
        expected interval), merged with what happened since this run began:
        a device already tracked (it spoke) is left as it is; one of a site
        that is up gets its grace period from now; any other is unknown
        (with C{reason}) until its site is up.

        @return: the changes to unknown.
        """
        at = self._now()
        now = self._clock.seconds()
        changes = []
        for key, status, interval in devices:
            if key in self._devices:
                continue
            device = self._track(key, status, interval)
            if key.site_id in self._up:
                self._schedule(key, device, now + interval * self._grace.get(key.site_id, 1))
            elif status != UNKNOWN:
                changes.append(DeviceStatus(key, status, UNKNOWN, at, reason))
                device.status = UNKNOWN
        return changes

    def site_down(self, site_id: str, reason: str) -> list[DeviceStatus]:
        """
        The site's connection is gone: its devices are unknown until it is
        back, and their deadlines are suspended.
        """
        self._up.discard(site_id)
        at = self._now()
        changes = []
        for key in self._by_site.get(site_id, ()):
            device = self._devices[key]
            device.deadline = None
            if device.status != UNKNOWN:
                changes.append(DeviceStatus(key, device.status, UNKNOWN, at, reason))
                device.status = UNKNOWN
        return changes

    def site_up(self, site_id: str, grace: float) -> None:
        """
        The site's connection is back: every device not heard from since
        gets a full grace period from now before it is declared offline.
        """
        self._grace[site_id] = grace
        self._up.add(site_id)
        now = self._clock.seconds()
        for key in self._by_site.get(site_id, ()):
            device = self._devices[key]
            if device.deadline is None:
                self._schedule(key, device, now + device.interval * grace)

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
            for key in list(self._by_site.get(site_id, ())):
                seen += 1
                if seen % chunk == 0:
                    yield None
                device = self._devices.get(key)
                if (
                    device is None
                    or device.deadline is not None
                    or device.status == OFFLINE
                    or site_id not in self._up
                ):
                    continue
                found.append(key)
                self._schedule(key, device, self._clock.seconds() + device.interval * grace)

    def forget_site(self, site_id: str) -> None:
        """
        Stop tracking a site's devices (the site was deleted).
        """
        for key in self._by_site.pop(site_id, set()):
            self._devices.pop(key, None)
        self._grace.pop(site_id, None)
        self._up.discard(site_id)

    def stop(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
