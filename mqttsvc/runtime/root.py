"""
The root service of mqttsvc.

Its children start in the order they were added (store, ingest, sites,
web) and stop in reverse, each only after the one after it has finished
stopping: the web server stops taking calls, every site disconnects
cleanly and reports it, the ingest writer writes what is left, and only
then does the store close its connections.

Shutdown has a deadline: whatever state a child is in (a database that
holds a write forever, a connect stuck in a thread), the process exits
L{SHUTDOWN_DEADLINE} seconds after the stop began.  Nothing is lost by
that: a message is acknowledged only after its commit, so the broker
redelivers whatever was not.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable

from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

#: Seconds from the start of shutdown (SIGTERM) to the process's exit at the
#: latest.  The orderly stop takes well under a second when the database and
#: brokers answer; its own waits (DRAIN_TIMEOUT, the store's flush) fit in it.
SHUTDOWN_DEADLINE = 9.0

#: The exit status of a shutdown that missed its deadline.
LATE_EXIT_STATUS = 1


class RootService(MultiService):
    """
    A C{MultiService} that stops its children one at a time, last first,
    and makes the process exit if that takes longer than C{deadline}.

    @param deadline: seconds, or None for no deadline.
    @param exit: ends the process (with a status); called from a timer
        thread, since the reactor thread may be what is stuck.
    """

    log = Logger()

    def __init__(
        self, deadline: float | None = None, exit: Callable[[int], object] = os._exit
    ) -> None:
        super().__init__()
        self._deadline = deadline
        self._exit = exit
        self._timer: threading.Timer | None = None

    def stopService(self) -> Deferred[None]:
        self.running = False
        if self._deadline is not None:
            self._timer = threading.Timer(self._deadline, self._late)
            self._timer.daemon = True
            self._timer.start()
        stopped = Deferred.fromCoroutine(self._stop_in_order(list(reversed(list(self)))))
        return stopped.addBoth(self._stopped)

    def _stopped(self, result: object) -> object:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        return result

    def _late(self) -> None:
        self.log.critical(
            "shutdown did not finish within {deadline}s: exiting now; the brokers will "
            "redeliver every message not yet acknowledged",
            deadline=self._deadline,
        )
        self._exit(LATE_EXIT_STATUS)

    async def _stop_in_order(self, children: list[IService]) -> None:
        for child in children:
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                self.log.failure("stopping {service} failed", service=child.name)
