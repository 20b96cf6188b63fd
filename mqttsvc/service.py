"""
The root service of mqttsvc.

Its children start in the order they were added (store, sites, web) and
stop in reverse, each only after the one after it has finished stopping:
the web server stops taking calls, every site disconnects cleanly and
reports it, and only then does the store write what is left and close.
"""

from __future__ import annotations

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger


class RootService(MultiService):
    """
    A C{MultiService} that stops its children one at a time, last first.
    """

    log = Logger()

    def stopService(self) -> Deferred[None]:
        self.running = False
        return Deferred.fromCoroutine(self._stop_in_order(list(reversed(list(self)))))

    async def _stop_in_order(self, children: list[IService]) -> None:
        for child in children:
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {service} failed", service=child.name)
