"""
Notifications from the database, as they happen.

Triggers on C{mqtt_connection} and C{mqtt_topic} send C{NOTIFY
mqttsvc_config} with the site id whenever the backend (or anyone) changes a
site's configuration; triggers on the event tables send C{NOTIFY
mqttsvc_events} (see L{mqttsvc.events.hub}).  A listener keeps one connection of
its own with C{LISTEN} on its channel and passes each payload on.  A
periodic ping notices a lost connection; after every (re)connect it asks for
a resynchronisation, since notifications sent while it was away are lost.
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


class NotificationListener(Service):
    """
    Calls C{on_change(payload)} for every notification on C{channel} and
    C{on_resync()} after every (re)connect, while running as a service.

    @param check_interval: seconds between pings of the listening
        connection (and between reconnect attempts while it is down).
    @param what: what is listened for, in log messages ("configuration").
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        channel: str,
        on_change: Callable[[str], object],
        on_resync: Callable[[], object],
        check_interval: float = 2.0,
        what: str = "notification",
    ) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._channel = channel
        self._what = what
        self._on_change = on_change
        self._on_resync = on_resync
        self._connection: txpostgres.Connection | None = None
        self._checking = LoopingCall(self._check)
        self._checking.clock = reactor
        self._interval = check_interval
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f), started=True)
        self._down_since_logged = False
        self._active = False
        self.listening = False
        #: How many times a listening connection has been established.
        self.connections = 0

    @property
    def backend_pid(self) -> int | None:
        """
        The server process of the listening connection, if there is one
        (to find it in C{pg_stat_activity}).
        """
        if self._connection is None:
            return None
        pid: int = self._connection.pollable().get_backend_pid()
        return pid

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
        self._active = True
        loop: Deferred[Any] = self._checking.start(self._interval, now=True)
        loop.addErrback(lambda f: self.log.failure("{what} listener stopped", f, what=self._what))
        return started

    def stop(self) -> None:
        self._active = False
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
                self.log.warn(
                    "{what} listener lost the database: {error}", what=self._what, error=str(e)
                )
                self._drop()
        connection = txpostgres.Connection(reactor=self._reactor, cooperator=self._cooperator)
        try:
            await connection.connect(self._dsn)
            await connection.runOperation(f"LISTEN {self._channel}")
        except Exception as e:
            if not self._down_since_logged:
                self.log.warn(
                    "{what} listener cannot reach the database, retrying every "
                    "{interval}s: {error}",
                    what=self._what,
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
        if not self._active:
            # Stopped while connecting: nobody would ever close it.
            connection.close()
            return
        connection.addNotifyObserver(self._notified)
        self._connection = connection
        self.listening = True
        self.connections += 1
        self.log.info(
            "{what} listener: listening on {channel}", what=self._what, channel=self._channel
        )
        try:
            self._on_resync()
        except Exception:
            self.log.failure("resynchronising after (re)connecting failed")

    def _notified(self, notify: Any) -> None:
        if notify.channel == self._channel and notify.payload:
            try:
                self._on_change(notify.payload)
            except Exception:
                self.log.failure(
                    "handling {what} notification {payload} failed",
                    what=self._what,
                    payload=notify.payload[:200],
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


class ConfigListener(NotificationListener):
    """
    Calls C{on_change(site_id)} for every change of a site's configuration
    and C{on_resync()} after every (re)connect.
    """

    name = "config-listener"

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        on_change: Callable[[str], object],
        on_resync: Callable[[], object],
        check_interval: float = 2.0,
    ) -> None:
        super().__init__(
            reactor, dsn, CHANNEL, on_change, on_resync, check_interval, what="configuration"
        )
