"""
One housekeeping timer per reactor for all the sites' connections.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from mqttsvc.config import SiteConfig
from mqttsvc.mqtt.transport import KeepaliveSweep, MQTTClient


def clients(reactor: MemoryReactorClock, count: int) -> list[MQTTClient]:
    made = []
    for i in range(count):
        config = SiteConfig(site_id=f"s{i}", host="127.0.0.1")
        made.append(MQTTClient(reactor, config, lambda m: None, lambda e: None, f"c{i}"))
    return made


def test_one_timer_for_every_connection() -> None:
    """A thousand connections share one timer; each is looked after once a second."""
    reactor = MemoryReactorClock()
    sweep = KeepaliveSweep.of(reactor)
    assert KeepaliveSweep.of(reactor) is sweep
    ticks: dict[str, int] = {}
    many = clients(reactor, 1000)
    for c in many:
        c._loop_misc = lambda c=c: ticks.__setitem__(c.site_id, ticks.get(c.site_id, 0) + 1)  # type: ignore[method-assign]
        sweep.add(c)
    assert len(reactor.getDelayedCalls()) == 1
    reactor.advance(1.0)
    reactor.advance(1.0)
    assert len(ticks) == 1000 and set(ticks.values()) == {2}
    for c in many:
        sweep.discard(c)
    assert reactor.getDelayedCalls() == []


def test_a_failing_check_does_not_stop_the_others() -> None:
    reactor = MemoryReactorClock()
    sweep = KeepaliveSweep.of(reactor)
    bad, good = clients(reactor, 2)
    seen = []

    def broken() -> None:
        raise RuntimeError("boom")

    bad._loop_misc = broken  # type: ignore[method-assign]
    good._loop_misc = lambda: seen.append(1)  # type: ignore[method-assign]
    sweep.add(bad)
    sweep.add(good)
    reactor.advance(1.0)
    assert seen == [1]
    sweep.discard(bad)
    sweep.discard(good)
    assert reactor.getDelayedCalls() == []


def test_the_last_one_leaving_during_a_tick() -> None:
    """A check that ends its own connection (a silent link) may remove it mid-sweep."""
    reactor = MemoryReactorClock()
    sweep = KeepaliveSweep.of(reactor)
    [only] = clients(reactor, 1)
    only._loop_misc = lambda: sweep.discard(only)  # type: ignore[method-assign]
    sweep.add(only)
    reactor.advance(1.0)
    assert len(sweep) == 0
    assert reactor.getDelayedCalls() == []
    sweep.add(only)
    assert len(reactor.getDelayedCalls()) == 1
