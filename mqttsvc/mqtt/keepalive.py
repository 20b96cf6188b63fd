"""
The one timer that looks after every broker connection's keepalive.
"""

from __future__ import annotations

from typing import Protocol

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger


class Kept(Protocol):
    """
    A connection the sweep looks after (L{mqttsvc.mqtt.client.MQTTClient}).
    """

    site_id: str

    def housekeeping(self) -> None:
        """
        The once-a-second check: keepalive, silent link, stalled packet.
        """


class KeepaliveSweep:
    """
    One timer for every connection's housekeeping: once a second, each
    client that has a socket runs its L{Kept.housekeeping} (paho's
    C{loop_misc}: PINGREQ, keepalive timeout; and our silent-link
    watchdog).  With a timer per site, a thousand idle sites cost a
    thousand timer reschedules a second.  The timer runs only while some
    client is added.

    Made once, in C{mqttsvc.tap}, and given to every L{Connector
    <mqttsvc.mqtt.connector.Connector>}.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._clients: dict[Kept, None] = {}
        self._timer: LoopingCall | None = None

    def __len__(self) -> int:
        return len(self._clients)

    def add(self, client: Kept) -> None:
        self._clients[client] = None
        if self._timer is None:
            self._timer = LoopingCall(self._tick)
            self._timer.clock = self._clock
            self._timer.start(1.0, now=False)

    def discard(self, client: Kept) -> None:
        self._clients.pop(client, None)
        if not self._clients and self._timer is not None:
            self._timer.stop()
            self._timer = None

    def _tick(self) -> None:
        for client in list(self._clients):
            try:
                client.housekeeping()
            except Exception:
                self.log.failure("keepalive check of site {site_id} failed", site_id=client.site_id)
