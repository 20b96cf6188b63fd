"""
mqttsvc's real service tree in the calling process, built exactly as
C{twistd mqttsvc} builds it (C{tap.Options}, C{tap.check_values},
C{tap.build_service}), and small helpers to wait on it.  The one builder
for the benchmarks and the tests (C{tests/service.py} adds JSON-RPC calls).

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
from mqttsvc.db.secrets import Secrets
from mqttsvc.db.store import Store
from mqttsvc.ingest.service import Ingest
from mqttsvc.sites.supervisor import SiteSupervisor
from mqttsvc.tap import Options, build_service, check_values


class Tree:
    """
    The service tree on a database, with its JSON-RPC listener on a free
    loopback port and no tokens.

    @param extra_args: more C{twistd mqttsvc} options.
    @param instance: the C{--instance} name (in the sites' client ids).
    @param secrets: the key for stored passwords, in place of
        C{--secret-key-file}: trees built one after the other with the
        same key read each other's.
    @ivar url: the JSON-RPC endpoint, once started (L{start}).
    """

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        *extra_args: str,
        instance: str = INSTANCE,
        secrets: Secrets | None = None,
    ) -> None:
        self.reactor = reactor
        options = Options(environ={})
        options.parseOptions(
            [
                "--db",
                dsn,
                "--rpc",
                "tcp:0:interface=127.0.0.1",
                "--instance",
                instance,
                *extra_args,
            ]
        )
        check_values(options)
        if secrets is not None:
            options["secrets"] = secrets
        self.root: IService = build_service(options, reactor, None)
        self.store: Store = self.root.getServiceNamed("store")
        self.ingest: Ingest = self.root.getServiceNamed("ingest")
        self.supervisor: SiteSupervisor = self.root.getServiceNamed("sites")
        self.port = 0
        self.url = ""

    async def start(self) -> None:
        """
        Start the tree; return once its sites are loaded and its web
        service listens.
        """
        self.root.startService()
        await self.supervisor.when_loaded()
        # The endpoint service's Deferred for its listening port.
        port = await self.root.getServiceNamed("web")._waitingForPort  # type: ignore[attr-defined]
        self.port = port.getHost().port
        self.url = f"http://127.0.0.1:{self.port}/rpc"

    async def stop(self, within: float = 60.0) -> None:
        """
        Stop the tree; fail if that takes over C{within} seconds.
        """
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
        """Sites connected to their broker."""
        return sum(1 for site in self.supervisor.sites() if site.state.state == "connected")

    def subscribed(self) -> int:
        """Sites whose every subscription the broker granted."""
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
    """Wait C{seconds} on C{reactor}."""
    await deferLater(reactor, seconds, lambda: None)
