"""
Probing a broker, a dry-run connection: can mqttsvc reach this broker with
these settings?

Used by C{site.test} before a site is saved.  L{ConnectionTests.probe}
connects once with a throw-away client id and a clean session (so the
broker keeps nothing), reports the broker's verdict, and disconnects.

Probes run on threads of their own, a few at a time: a connect blocks its
thread for up to the connect timeout, and sixty tests of a host that drops
SYNs once filled the reactor's pool, so that a real site's reconnect waited
28 s for a thread.
"""

from __future__ import annotations

import uuid
from typing import Any

from twisted.internet import defer
from twisted.internet.defer import CancelledError, DeferredSemaphore

from mqttsvc.config import SiteConfig
from mqttsvc.mqtt.connector import Connector
from mqttsvc.mqtt.errors import ConnectFailed
from mqttsvc.mqtt.keepalive import KeepaliveSweep

#: How long the whole probe may take, waiting for a free slot included.
PROBE_TIMEOUT = 10.0

#: How many probes connect at once (each on a thread of its own).
PROBE_THREADS = 4

#: How many more probes may wait for a free slot; past that a probe is
#: refused at once as C{busy}.
PROBE_QUEUE = 16

#: The longest a probe's connect may block its thread.
PROBE_CONNECT_TIMEOUT = 5.0


class ConnectionTests(Connector):
    """
    Runs the probes of C{site.test}: a connector of its own (connect
    threads like the sites', but not theirs), at most C{threads} probes at
    a time and C{waiting} more queued.

    @ivar pool: the probes' threads, running while the service runs.
    """

    name = "connection-tests"

    def __init__(
        self,
        reactor: Any,
        sweep: KeepaliveSweep,
        threads: int = PROBE_THREADS,
        waiting: int = PROBE_QUEUE,
    ) -> None:
        super().__init__(reactor, sweep, threads, pool_name="mqtt-connection-tests")
        self._slots = DeferredSemaphore(threads)
        self._waiting = waiting

    async def probe(self, config: SiteConfig, within: float = PROBE_TIMEOUT) -> dict[str, Any]:
        """
        Connect once and disconnect, within C{within} seconds in all.

        @return: C{{"ok": True, "category": None, "error": None}}, or C{ok}
            false with the failure's category (C{refused}, C{timeout},
            C{dns}, C{tls}, C{auth}, C{protocol}, C{network}, or C{busy}
            when too many probes are running already) and explanation.
        """
        slots = self._slots
        if not slots.tokens and len(slots.waiting) >= self._waiting:
            return _busy(
                f"{slots.limit} connection tests are running and {len(slots.waiting)} "
                "waiting; try again in a few seconds"
            )
        started = self._reactor.seconds()
        slot = slots.acquire()
        slot.addTimeout(within, self._reactor)
        try:
            await slot
        except (CancelledError, defer.TimeoutError):
            return _busy(f"no free slot for a connection test within {within:g}s; try again later")
        try:
            # At least a second to connect, however long the wait was.
            left = max(within - (self._reactor.seconds() - started), 1.0)
            return await self._connect(config, left)
        finally:
            slots.release()

    async def _connect(self, config: SiteConfig, within: float) -> dict[str, Any]:
        reactor = self._reactor
        client = self.client(
            config,
            on_message=lambda message: None,
            on_lost=lambda error: None,
            client_id=f"mqttsvc-check-{uuid.uuid4().hex[:12]}",
            connect_timeout=min(PROBE_CONNECT_TIMEOUT, within),
            persistent=False,
        )
        attempt = client.connect()
        attempt.addTimeout(within, reactor)
        try:
            await attempt
        except ConnectFailed as e:
            return {"ok": False, "category": e.category, "error": f"{e.category}: {e.detail}"}
        except (CancelledError, defer.TimeoutError):
            # Waits for the connecting thread: the slot is free only then.
            await client.disconnect()
            return {
                "ok": False,
                "category": "timeout",
                "error": f"timeout: no answer within {within:.0f}s",
            }
        closing = client.disconnect()
        closing.addTimeout(within, reactor)
        try:
            await closing
        except (CancelledError, defer.TimeoutError):
            client.abort()
        return {"ok": True, "category": None, "error": None}


def _busy(why: str) -> dict[str, Any]:
    return {"ok": False, "category": "busy", "error": f"busy: {why}"}
