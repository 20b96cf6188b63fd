"""
The offline detector on a fake clock: deadlines, unknown while a site is
disconnected, grace after reconnecting, restart rebuild, and scale.
"""

from __future__ import annotations

import pytest
from twisted.internet.task import Clock

from mqttsvc.ingest.liveness import DeviceLimit, OfflineDetector
from mqttsvc.records import DeviceKey, DeviceStatus, SiteDevicesStatus

GW = DeviceKey("s", "gateway", None, "gw-1")
DL = DeviceKey("s", "datalogger", "gw-1", "dl-1")
OTHER = DeviceKey("t", "sensor", None, "x")


def detector() -> tuple[OfflineDetector, Clock, list[DeviceStatus]]:
    clock = Clock()
    changes: list[DeviceStatus] = []
    return OfflineDetector(clock, changes.extend), clock, changes


def test_offline_exactly_at_the_deadline() -> None:
    """Last message + interval x grace: not a moment before, and at once after."""
    d, clock, changes = detector()
    first = d.seen(GW, 60, 2.5)
    assert first is not None and (first.from_status, first.status) == ("unknown", "online")
    assert d.seen(GW, 60, 2.5) is None
    clock.advance(100)
    assert d.seen(GW, 60, 2.5) is None  # deadline moves to 250
    clock.advance(149.999)
    assert changes == []
    clock.advance(0.001)
    [change] = changes
    assert (change.key, change.from_status, change.status) == (GW, "online", "offline")
    assert change.reason == "silent for 150s (2.5 x 60s interval)"
    assert d.status(GW) == "offline"
    assert clock.getDelayedCalls() == []
    back = d.seen(GW, 60, 2.5)
    assert back is not None and (back.from_status, back.status) == ("offline", "online")


def test_heartbeat_interval_overrides_per_device() -> None:
    d, clock, changes = detector()
    d.seen(GW, 60, 2)
    d.seen(DL, 5, 2)
    clock.advance(10)
    assert [c.key for c in changes] == [DL]
    clock.advance(110)
    assert [c.key for c in changes] == [DL, GW]


def test_site_down_makes_devices_unknown_without_deadlines() -> None:
    """While a site is disconnected its devices are unknown, never offline."""
    d, clock, changes = detector()
    d.seen(GW, 60, 2)
    d.seen(OTHER, 60, 2)
    down = d.site_down("s", "site connection waiting")
    assert down == SiteDevicesStatus("s", "unknown", down.at, "site connection waiting", 1)
    assert d.site_down("s", "again") is None  # nothing changed: nothing to record
    clock.advance(10_000)
    assert [c.key for c in changes] == [OTHER]
    assert d.status(GW) == "unknown"


def test_reconnect_gives_a_grace_period() -> None:
    """After reconnecting, a silent device gets a full interval x grace before offline."""
    d, clock, changes = detector()
    d.seen(GW, 60, 2)
    d.site_down("s", "down")
    clock.advance(500)
    d.site_up("s", 2)
    clock.advance(119)
    assert changes == []
    clock.advance(1)
    assert [(c.from_status, c.status) for c in changes] == [("unknown", "offline")]


def test_rebuilt_after_a_restart() -> None:
    """Devices loaded from the database are watched once their site connects."""
    d, clock, changes = detector()
    down = d.load(
        [(GW, "online", 60.0, None), (DL, "offline", 300.0, None), (OTHER, "unknown", 60.0, None)],
        "mqttsvc started",
    )
    # One summary per site whose devices changed, with how many did.
    assert [(c.site_id, c.status, c.reason, c.devices) for c in down] == [
        ("s", "unknown", "mqttsvc started", 2)
    ]
    d.site_up("s", 2)
    clock.advance(120)
    assert [c.key for c in changes] == [GW]
    clock.advance(480)
    assert [c.key for c in changes] == [GW, DL]
    assert clock.getDelayedCalls() == []


def test_a_late_load_merges_with_what_happened_since() -> None:
    """
    Devices loaded after their site connected (or after they spoke) are not
    made unknown without a deadline: a site that is up gives the loaded
    devices their grace, a device that spoke keeps its state.
    """
    d, clock, changes = detector()
    other = DeviceKey("s", "sensor", None, "t1")
    d.site_up("s", 2)
    d.seen(GW, 60, 2)
    clock.advance(10)
    down = d.load([(GW, "offline", 60.0, None), (other, "online", 100.0, None)], "mqttsvc started")
    assert down == []
    assert d.status(GW) == "online" and d.deadline(GW) == clock.seconds() - 10 + 120
    assert d.deadline(other) == clock.seconds() + 200
    clock.advance(200)
    assert {c.key for c in changes} == {GW, other}
    assert clock.getDelayedCalls() == []


def test_repair_finds_devices_of_a_site_up_without_a_deadline() -> None:
    """
    A device of a connected site that is not offline and has no deadline
    (a bug elsewhere) is found by the sweep, reported, and goes offline on
    time after it.
    """
    d, clock, changes = detector()
    d.site_up("s", 2)
    d.seen(GW, 60, 2)
    d.seen(DL, 60, 2)
    d._sites["s"][GW].deadline = None  # the bug: a deadline lost
    found: list[DeviceKey] = []
    sweeps = list(d.repair(found, chunk=1))
    assert found == [GW] and len(sweeps) >= 1
    clock.advance(120)
    assert {c.key for c in changes} == {GW, DL}
    found.clear()
    list(d.repair(found))
    assert found == []  # offline devices need no deadline


def test_forgotten_site_is_not_flagged() -> None:
    d, clock, changes = detector()
    d.seen(GW, 60, 2)
    d.forget_site("s")
    clock.advance(1000)
    assert changes == [] and len(d) == 0


def test_stale_heap_entries_are_compacted() -> None:
    """A chatty device does not grow the heap without bound."""
    d, clock, _ = detector()
    for _ in range(10_000):
        d.seen(GW, 60, 2)
        clock.advance(0.001)
    assert len(d._heap) <= 2 * len(d) + 1024


def test_hundred_thousand_devices_on_one_timer() -> None:
    """100,000 tracked devices use one timer, and each goes offline at its own deadline."""
    d, clock, changes = detector()
    keys = [DeviceKey("big", "sensor", None, f"s{i}") for i in range(100_000)]
    for i, key in enumerate(keys):
        d.seen(key, 60 + i % 60, 2)
    assert len(clock.getDelayedCalls()) == 1
    clock.advance(120)
    assert len(changes) == len([i for i in range(100_000) if i % 60 == 0])
    clock.advance(120)
    assert len(changes) == 100_000
    assert clock.getDelayedCalls() == []


class _TickingClock(Clock):
    """A clock that moves on a little with every reading, as real ones do."""

    def seconds(self) -> float:
        self.rightNow += 1e-6
        return self.rightNow


def test_later_deadlines_leave_the_timer_alone() -> None:
    """Devices that speak do not reschedule the one timer when a real clock drifts on."""
    clock = _TickingClock()
    scheduled = []
    call_later = clock.callLater

    def counting(delay: float, f: object, *args: object) -> object:
        scheduled.append(delay)
        return call_later(delay, f, *args)  # type: ignore[arg-type]

    clock.callLater = counting  # type: ignore[method-assign]
    d = OfflineDetector(clock, lambda changes: None)
    for i in range(1000):
        d.seen(DeviceKey("s", "sensor", None, f"s{i % 10}"), 60, 2)
    assert len(scheduled) == 1
    assert len(clock.getDelayedCalls()) == 1


def test_a_site_is_capped_at_its_device_limit() -> None:
    """
    A new device of a site that has its limit of devices is refused (and
    not tracked), the first refusal is reported once; devices already
    known still speak, and other sites are not affected.
    """
    clock = Clock()
    reached: list[tuple[str, int, DeviceKey]] = []
    d = OfflineDetector(clock, lambda changes: None, lambda *args: reached.append(args))
    keys = [DeviceKey("s", "sensor", None, f"x{i}") for i in range(3)]
    for key in keys:
        d.seen(key, 60, 2, limit=3)
    extra = DeviceKey("s", "sensor", None, "x3")
    for _ in range(2):
        with pytest.raises(DeviceLimit, match="site has reached its limit of 3 devices"):
            d.seen(extra, 60, 2, limit=3)
    assert reached == [("s", 3, extra)]
    assert d.status(extra) is None and d.site_count("s") == 3 and len(d) == 3
    assert d.seen(keys[0], 60, 2, limit=3) is None  # known: still tracked
    d.seen(OTHER, 60, 2, limit=3)
    assert len(d) == 4
    d.limit_changed("s")  # a new limit: its next refusal is reported again
    with pytest.raises(DeviceLimit):
        d.seen(extra, 60, 2, limit=3)
    assert reached == [("s", 3, extra), ("s", 3, extra)]
    d.forget_site("s")
    assert len(d) == 1
    d.stop()


def test_device_memory_is_bounded_per_device() -> None:
    """
    What one tracked device costs, measured: a key, its entry, a deadline
    in the heap; strings shared as the store's load shares them.  It was
    529 bytes (a set per site beside the dict, a sequence number per heap
    entry, a fresh status string per device); the bound catches a return.
    """
    import gc
    import tracemalloc

    n = 20_000
    gc.collect()
    tracemalloc.start()
    try:
        d = OfflineDetector(Clock(), lambda changes: None)
        site, kind = "site-" + str(1), "sen" + "sor"
        d.load(
            [
                (DeviceKey(site, kind, None, f"sensor-{i:08d}"), "online", 900.0, None)
                for i in range(n)
            ],
            "start",
        )
        d.site_up(site, 2.5)
        gc.collect()
        per_device = tracemalloc.get_traced_memory()[0] / n
    finally:
        tracemalloc.stop()
    assert per_device < 380, per_device
    d.stop()


def test_returning_to_the_status_before_the_site_went_is_not_an_event() -> None:
    """
    After a site-wide unknown (its link lost, or a restart), a device that
    comes back to the status it had before (online again, or offline again
    at its deadline) changes its row without an event of its own; one that
    comes back to another status is an event, as is every change after.
    """
    d, clock, changes = detector()
    quiet = DeviceKey("s", "gateway", None, "quiet")
    d.seen(GW, 60, 2)
    d.seen(quiet, 60, 2)
    clock.advance(120)  # both offline, recorded
    assert [c.recorded for c in changes] == [True, True]
    d.seen(GW, 60, 2)  # GW online again
    changes.clear()
    assert d.site_down("s", "down").devices == 2  # type: ignore[union-attr]
    d.site_up("s", 2)
    back = d.seen(GW, 60, 2)
    assert back is not None and (back.from_status, back.status, back.recorded) == (
        "unknown",
        "online",
        False,
    )
    clock.advance(120)
    # quiet is offline again (no event); GW, silent, goes offline: an event.
    assert {(c.key, c.from_status, c.recorded) for c in changes} == {
        (quiet, "unknown", False),
        (GW, "online", True),
    }
    # Restored from the database: stored unknown, offline before.
    d2, clock2, changes2 = detector()
    d2.load([(quiet, "unknown", 60.0, "offline"), (DL, "unknown", 60.0, None)], "started")
    d2.site_up("s", 2)
    clock2.advance(120)
    assert {(c.key, c.recorded) for c in changes2} == {(quiet, False), (DL, True)}
