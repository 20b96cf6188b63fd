"""
Shutdown has a deadline: the root service makes the process exit if its
children have not stopped in time, and never when they have.
"""

from __future__ import annotations

import threading

import pytest_twisted
from twisted.application.service import Service
from twisted.internet.defer import Deferred

from mqttsvc.runtime.root import LATE_EXIT_STATUS, RootService


class Stuck(Service):
    """A child whose stop never finishes (a database holding a write forever)."""

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred()


class Exits:
    """Records the exit the root asks for, from its timer thread."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.called = threading.Event()

    def __call__(self, status: int) -> None:
        self.statuses.append(status)
        self.called.set()


def test_a_stop_that_hangs_ends_the_process_at_the_deadline() -> None:
    """A child that never stops: the process exits (status 1) once the deadline passes."""
    exits = Exits()
    root = RootService(deadline=0.2, exit=exits)
    Stuck().setServiceParent(root)
    root.startService()
    stopping = root.stopService()
    assert exits.called.wait(5)
    assert exits.statuses == [LATE_EXIT_STATUS]
    assert not stopping.called


@pytest_twisted.ensureDeferred
async def test_a_timely_stop_cancels_the_deadline() -> None:
    """Children that stop in time: the deadline timer is cancelled and never fires."""
    exits = Exits()
    root = RootService(deadline=0.2, exit=exits)
    Service().setServiceParent(root)
    root.startService()
    await root.stopService()
    assert root._timer is None
    assert not exits.called.wait(0.5)
