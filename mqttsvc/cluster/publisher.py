"""
The live-status publisher: in a cluster, this instance writes the live
status of the sites it owns to the database at least once a second, so
that every replica answers C{site.status}, C{site.list} and
C{service.status} for them (L{mqttsvc.db.live}).

Why publish rather than forward a call to the owner: the database is the
one thing every replica must reach anyway, while forwarding would need
every replica to reach every other one (addresses, tokens, a second hop
that fails while the owner is dying).  A published status is at most a
second old, and a frozen owner's is recognisable: readers keep only the
rows of live instances that still hold the site's lease at the epoch the
row was published under.

Only what changed since the last publication is written, in one statement;
every site again every L{REFRESH_INTERVAL} seconds and after a failure.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

#: Seconds between two publications.
PUBLISH_INTERVAL = 1.0
#: Seconds between two publications of every site, changed or not: the
#: table is UNLOGGED, so a crash of the database server empties it, and a
#: quiet site would otherwise not be published again until it changed.
REFRESH_INTERVAL = 30.0


class LiveStore(Protocol):
    """
    Where live statuses are published (L{mqttsvc.db.live.LiveStatuses}).
    """

    async def publish(self, instance: str, rows: Sequence[tuple[str, int, str, str]]) -> None:
        """
        Publish rows of (site, lease epoch, status, C{site.status} as JSON).
        """


class LivePublisher(Service):
    """
    Publishes the live status of every site C{owned()} returns (site ->
    lease epoch), as C{status_of(site_id)} gives it (C{None}: not running
    here), every C{interval} seconds and on L{publish_now}.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        instance: str,
        owned: Callable[[], dict[str, int]],
        status_of: Callable[[str], dict[str, Any] | None],
        store: LiveStore,
        interval: float = PUBLISH_INTERVAL,
    ) -> None:
        self._instance = instance
        self._owned = owned
        self._status_of = status_of
        self._store = store
        self._interval = interval
        self._clock = reactor
        self._refreshed_at = reactor.seconds()
        self._loop = LoopingCall(self.publish_now)
        self._loop.clock = reactor
        self._sent: dict[str, tuple[int, str]] = {}
        self._in_flight: Deferred[None] | None = None
        self._again = False
        self._failing = False
        #: Rows published, and publications that failed.
        self.published = 0
        self.failures = 0

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=True)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return None

    def publish_now(self) -> None:
        """
        Publish what changed now (or as soon as the publication in flight
        is done).
        """
        if self._in_flight is not None:
            self._again = True
            return
        rows = self._changed()
        if not rows:
            return
        d = Deferred.fromCoroutine(self._store.publish(self._instance, rows))
        self._in_flight = d
        d.addCallbacks(self._done, self._failed, callbackArgs=(rows,))
        d.addBoth(self._next)

    def _changed(self) -> list[tuple[str, int, str, str]]:
        if self._clock.seconds() - self._refreshed_at >= REFRESH_INTERVAL:
            self._refreshed_at = self._clock.seconds()
            self._sent.clear()
        owned = self._owned()
        for gone in self._sent.keys() - owned.keys():
            del self._sent[gone]
        rows = []
        for site_id, epoch in owned.items():
            status = self._status_of(site_id)
            if status is None:
                continue
            text = json.dumps(status, sort_keys=True)
            if self._sent.get(site_id) != (epoch, text):
                rows.append((site_id, epoch, status["status"], text))
        return rows

    def _done(self, result: None, rows: list[tuple[str, int, str, str]]) -> None:
        for site_id, epoch, _, text in rows:
            self._sent[site_id] = (epoch, text)
        self.published += len(rows)
        if self._failing:
            self._failing = False
            self.log.info("live statuses published again")

    def _failed(self, failure: Any) -> None:
        self.failures += 1
        # What did reach the table before is unknown now (the server may
        # have restarted and emptied it): publish everything next time.
        self._sent.clear()
        if not self._failing:
            self._failing = True
            self.log.warn(
                "could not publish live statuses (other replicas answer with older ones "
                "until it works): {error}",
                error=failure.getErrorMessage(),
            )

    def _next(self, result: object) -> None:
        self._in_flight = None
        if self._again and self.running:
            self._again = False
            self.publish_now()
