"""
The store: the service that opens mqttsvc's database and holds its
repositories, one per kind of row (L{Sites}, L{Devices}, L{Readings},
L{Topics}, L{Events}, L{DeadLetters}, and the cluster's L{Leases} and
L{LiveStatuses}), so that
the rest of mqttsvc reads and writes the database only through methods named
for what they mean.

It owns two connection pools: C{write_pool}, which the ingest writer's
lanes write through (message effects and connection status, one batch at a
time per lane, one connection per lane), and C{pool} for the control
plane's reads and writes, so that a burst of RPC calls never delays a
commit that MQTT acknowledgements wait for.  The cluster's leases have a
third pool of their own (opened only when used: C{--cluster}, or
C{cluster.status}), so that neither delays a lease's renewal.

Each pool's connections carry an C{application_name} of the store's
C{name} and the pool's purpose (C{"mqttsvc a leases"}), so that
C{pg_stat_activity} tells which instance holds which connection and what
for.
"""

from __future__ import annotations

from typing import Any

import psycopg2.extensions
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mqttsvc.db.dead_letters import DeadLetters
from mqttsvc.db.devices import Devices
from mqttsvc.db.events import Events
from mqttsvc.db.leases import Leases
from mqttsvc.db.live import LiveStatuses
from mqttsvc.db.pool import ConnectionPool
from mqttsvc.db.readings import Readings
from mqttsvc.db.secrets import Secrets
from mqttsvc.db.sites import Sites
from mqttsvc.db.topics import Topics
from mqttsvc.records import DeviceKey

#: Connections of C{write_pool}, one for each lane of the ingest writer
#: (each writes its share of the sites side by side): two kept both cores
#: busy (10,746 -> 14,779 msg/s, issue 7).
WRITE_CONNECTIONS = 2


class Store(Service):
    """
    The database side of mqttsvc, as a service: started first, stopped
    last (after the ingest writer has written what it holds), when it
    closes its pools.

    @param reactor: drives the txpostgres connections.
    @param dsn: a libpq connection string.
    @param write_connections: the size of C{write_pool}.
    @param name: the start of every connection's C{application_name}
        (overriding one the DSN may hold), followed by its pool's purpose.
    """

    log = Logger()
    name = "store"

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        rpc_connections: int = 3,
        secrets: Secrets | None = None,
        write_connections: int = WRITE_CONNECTIONS,
        name: str = "mqttsvc",
    ) -> None:
        def named(purpose: str) -> str:
            return psycopg2.extensions.make_dsn(dsn, application_name=f"{name} {purpose}")

        self.secrets = secrets
        self.pool = ConnectionPool(reactor, named("rpc"), size=rpc_connections)
        self.sites = Sites(self.pool, secrets)
        self.devices = Devices(self.pool)
        self.readings = Readings(self.pool)
        self.topics = Topics(self.pool)
        self.events = Events(self.pool)
        self.dead_letters = DeadLetters(self.pool)
        #: The live statuses site owners publish, on the control plane's
        #: pool (only with --cluster, once a second).
        self.live = LiveStatuses(self.pool)
        self.write_pool = ConnectionPool(reactor, named("writer"), size=write_connections)
        # Two: the keeper's round and a release may overlap.
        self.lease_pool = ConnectionPool(reactor, named("leases"), size=2)
        self.leases = Leases(self.lease_pool)

    def write_lane_stalled(self, lane: int, seconds: float, error: str, recovered: bool) -> None:
        """
        A write lane has committed nothing for a while (C{error} is why), or
        commits again: say so as a C{service} event.  When the database is
        what is gone the first cannot be written, but the second says it
        all: how long, and why.
        """
        problem = "write_lane_recovered" if recovered else "write_lane_stalled"
        recorded = Deferred.fromCoroutine(
            self.events.record_service_event(
                problem, lane=lane, seconds=round(seconds, 1), error=error
            )
        )
        recorded.addErrback(
            lambda f: self.log.warn(
                "could not record the {problem} event: {error}",
                problem=problem,
                error=f.getErrorMessage(),
            )
        )

    def device_limit_reached(self, site_id: str, limit: int, device: DeviceKey) -> None:
        """
        A site refused its first device for its limit: say so as a
        C{service} event of the site (C{device_limit_reached}, with the
        limit and the refused device), which also raises an alert.
        """
        recorded = Deferred.fromCoroutine(
            self.events.record_service_event(
                "device_limit_reached",
                site_id,
                limit=limit,
                kind=device.kind,
                device_id=device.device_id,
                gateway_id=device.gateway_id,
            )
        )
        recorded.addErrback(
            lambda f: self.log.warn(
                "could not record that site {site_id} reached its device limit: {error}",
                site_id=site_id,
                error=f.getErrorMessage(),
            )
        )

    def stopService(self) -> None:
        super().stopService()
        # The ingest writer has stopped before us, having written what it
        # could.
        self.pool.close()
        self.write_pool.close()
        self.lease_pool.close()
