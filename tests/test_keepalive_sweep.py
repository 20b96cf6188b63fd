"""
One housekeeping timer for all the sites' connections.
"""

from __future__ import annotations

from twisted.internet.testing import MemoryReactorClock

from mqttsvc.config import SiteConfig
from mqttsvc.mqtt.client import MQTTClient
from mqttsvc.mqtt.connector import Connector
from mqttsvc.mqtt.keepalive import KeepaliveSweep


def clients(sweep: KeepaliveSweep, reactor: MemoryReactorClock, count: int) -> list[MQTTClient]:
    connector = Connector(reactor, sweep)
    made = []
    for i in range(count):
        config = SiteConfig(site_id=f"s{i}", host="127.0.0.1")
        made.append(connector.client(config, lambda m: None, lambda e: None, client_id=f"c{i}"))
    return made


def test_one_timer_for_every_connection() -> None:
    """A thousand connections share one timer; each is looked after once a second."""
    reactor = MemoryReactorClock()
    sweep = KeepaliveSweep(reactor)
    ticks: dict[str, int] = {}
    many = clients(sweep, reactor, 1000)
    # Injected, not looked up: every client has the one sweep it was given.
    assert all(c._sweep is sweep for c in many)
    for c in many:
        c.housekeeping = lambda c=c: ticks.__setitem__(c.site_id, ticks.get(c.site_id, 0) + 1)  # type: ignore[method-assign]
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
    sweep = KeepaliveSweep(reactor)
    bad, good = clients(sweep, reactor, 2)
    seen = []

    def broken() -> None:
        raise RuntimeError("boom")

    bad.housekeeping = broken  # type: ignore[method-assign]
    good.housekeeping = lambda: seen.append(1)  # type: ignore[method-assign]
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
    sweep = KeepaliveSweep(reactor)
    [only] = clients(sweep, reactor, 1)
    only.housekeeping = lambda: sweep.discard(only)  # type: ignore[method-assign]
    sweep.add(only)
    reactor.advance(1.0)
    assert len(sweep) == 0
    assert reactor.getDelayedCalls() == []
    sweep.add(only)
    assert len(reactor.getDelayedCalls()) == 1
