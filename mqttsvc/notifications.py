"""
Configuration changes from the database, as they happen.

Triggers on C{mqtt_connection} and C{mqtt_topic} send C{NOTIFY
mqttsvc_config} with the site id whenever the backend (or anyone) changes a
site's configuration.  The listener keeps one connection of its own with
C{LISTEN mqttsvc_config} and passes each site id on.  A periodic ping
notices a lost connection; after every (re)connect it asks for a full
resynchronisation, since notifications sent while it was away are lost.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import Cooperator, LoopingCall
from twisted.logger import Logger
from txpostgres import txpostgres

CHANNEL = "mqttsvc_config"


class ConfigListener(Service):
    """
    Calls C{on_change(site_id)} for every notification and C{on_resync()}
    after every (re)connect, while running as a service.

    @param check_interval: seconds between pings of the listening
        connection (and between reconnect attempts while it is down).
    """

    log = Logger()
    name = "config-listener"

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        on_change: Callable[[str], object],
        on_resync: Callable[[], object],
        check_interval: float = 2.0,
    ) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._on_change = on_change
        self._on_resync = on_resync
        self._connection: txpostgres.Connection | None = None
        self._checking = LoopingCall(self._check)
        self._checking.clock = reactor
        self._interval = check_interval
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f), started=True)
        self._down_since_logged = False
        self.listening = False
        #: How many times a listening connection has been established.
        self.connections = 0

    def startService(self) -> None:
        super().startService()
        self.start()

    def stopService(self) -> None:
        super().stopService()
        self.stop()

    def start(self) -> Deferred[None]:
        """
        Connect and listen; fires after the first attempt (successful or
        not: later checks keep trying).
        """
        started: Deferred[None] = Deferred()
        self._started: Deferred[None] | None = started
        loop: Deferred[Any] = self._checking.start(self._interval, now=True)
        loop.addErrback(lambda f: self.log.failure("configuration listener stopped", f))
        return started

    def stop(self) -> None:
        if self._checking.running:
            self._checking.stop()
        self._drop()

    def _check(self) -> Deferred[None]:
        # LoopingCall waits for this Deferred, so checks never overlap.
        checked = Deferred.fromCoroutine(self._check_once())

        def first(result: object) -> object:
            started, self._started = self._started, None
            if started is not None:
                started.callback(None)
            return result

        return checked.addBoth(first)

    async def _check_once(self) -> None:
        if self._connection is not None:
            try:
                await self._connection.runQuery("SELECT 1")
                return
            except Exception as e:
                self.log.warn("configuration listener lost the database: {error}", error=str(e))
                self._drop()
        connection = txpostgres.Connection(reactor=self._reactor, cooperator=self._cooperator)
        try:
            await connection.connect(self._dsn)
            await connection.runOperation(f"LISTEN {CHANNEL}")
        except Exception as e:
            if not self._down_since_logged:
                self.log.warn(
                    "configuration listener cannot reach the database, retrying every "
                    "{interval}s: {error}",
                    interval=self._interval,
                    error=str(e).strip(),
                )
                self._down_since_logged = True
            try:
                connection.close()
            except Exception:
                pass  # it never opened
            return
        self._down_since_logged = False
        connection.addNotifyObserver(self._notified)
        self._connection = connection
        self.listening = True
        self.connections += 1
        self.log.info("listening for configuration changes")
        try:
            self._on_resync()
        except Exception:
            self.log.failure("resynchronising after (re)connecting failed")

    def _notified(self, notify: Any) -> None:
        if notify.channel == CHANNEL and notify.payload:
            try:
                self._on_change(notify.payload)
            except Exception:
                self.log.failure(
                    "handling a change of site {site_id} failed", site_id=notify.payload
                )

    def _drop(self) -> None:
        connection, self._connection = self._connection, None
        self.listening = False
        if connection is not None:
            connection.removeNotifyObserver(self._notified)
            try:
                connection.close()
            except Exception:
                pass  # already closed underneath us
