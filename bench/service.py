"""
mqttsvc's real service tree in the benchmark's own process, built exactly
as C{twistd mqttsvc} builds it (C{tap.Options}, C{tap.check_values},
C{tap.buildService}), and small helpers to wait on it.

In-process rather than a C{twistd} subprocess: the benchmark reads the
writer's and the sites' own counters, hooks the commit of each message to
time it, and profiles the reactor thread, none of which a subprocess would
show without adding an API for it.  Each measurement still runs in a fresh
child process (L{bench.child}), so memory and CPU figures are mqttsvc's
and a reactor is never reused.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from twisted.application.service import IService
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater

from bench.workload import INSTANCE
from mqttsvc.db.store import Store
from mqttsvc.ingest.service import Ingest
from mqttsvc.sites.supervisor import SiteSupervisor
from mqttsvc.tap import Options, buildService, check_values


class Tree:
    """
    The service tree on a database, with its JSON-RPC listener on a free
    loopback port and no tokens.
    """

    def __init__(self, reactor: Any, dsn: str, *extra_args: str) -> None:
        self.reactor = reactor
        options = Options(environ={})
        options.parseOptions(
            [
                "--db",
                dsn,
                "--rpc",
                "tcp:0:interface=127.0.0.1",
                "--instance",
                INSTANCE,
                *extra_args,
            ]
        )
        check_values(options)
        self.root: IService = buildService(options, reactor, None)
        self.store: Store = self.root.getServiceNamed("store")
        self.ingest: Ingest = self.root.getServiceNamed("ingest")
        self.supervisor: SiteSupervisor = self.root.getServiceNamed("sites")
        self.url = ""

    async def start(self) -> None:
        self.root.startService()
        await self.supervisor.whenLoaded()
        port = await self.root.getServiceNamed("web")._waitingForPort  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{port.getHost().port}"

    async def stop(self, within: float = 60.0) -> None:
        stopped: Deferred[None] = self.root.stopService()
        stopped.addTimeout(within, self.reactor)
        await stopped

    def committed(self) -> int:
        """
        Messages whose effects are committed (and acknowledged), over all
        sites.
        """
        return sum(site.messages_committed for site in self.supervisor.sites())

    def connected(self) -> int:
        return sum(1 for site in self.supervisor.sites() if site.state.state == "connected")

    def subscribed(self) -> int:
        return sum(
            1
            for site in self.supervisor.sites()
            if site.state.subscriptions and all(r.granted for r in site.state.subscriptions)
        )


async def until(
    reactor: Any, check: Callable[[], bool], within: float, what: str, interval: float = 0.005
) -> float:
    """
    Poll C{check} every C{interval} seconds until it holds.

    @return: the C{time.perf_counter()} at which it was seen to hold.
    @raise TimeoutError: naming C{what} after C{within} seconds.
    """
    deadline = time.perf_counter() + within
    while not check():
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} did not happen within {within:g}s")
        await deferLater(reactor, interval, lambda: None)
    return time.perf_counter()


async def sleep(reactor: Any, seconds: float) -> None:
    await deferLater(reactor, seconds, lambda: None)
