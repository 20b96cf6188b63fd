"""
The control plane's method registry: the site methods, the read side, the
cluster's status, and C{rpc.discover}, which describes them all.
"""

from __future__ import annotations

from typing import Any

from mqttsvc.control.rpc.cluster import ClusterMethods
from mqttsvc.control.rpc.dispatcher import UNAVAILABLE, Call, Dispatcher, Method, RPCError
from mqttsvc.control.rpc.observed import ObservationMethods
from mqttsvc.control.rpc.openrpc import document
from mqttsvc.control.rpc.sites import SiteMethods
from mqttsvc.db.pool import DatabaseUnavailable
from mqttsvc.db.store import Store
from mqttsvc.ingest.writer import WriterLanes
from mqttsvc.mqtt.probe import ConnectionTests
from mqttsvc.runtime.descriptors import DescriptorBudget
from mqttsvc.sites.supervisor import SiteSupervisor


def _unavailable(e: Exception) -> RPCError:
    return RPCError(UNAVAILABLE, "Database unavailable; try again shortly", {"reason": str(e)})


def control_plane(
    reactor: Any,
    store: Store,
    supervisor: SiteSupervisor,
    connection_tests: ConnectionTests,
    descriptors: DescriptorBudget | None = None,
    *,
    writer: WriterLanes,
    instance: str = "local",
    clustered: bool = False,
) -> Dispatcher:
    """
    The dispatcher of every control plane method.

    @param instance: this instance's name (C{--instance}).
    @param clustered: whether it runs with C{--cluster}.
    """
    methods = [
        *SiteMethods(
            reactor,
            store,
            supervisor,
            connection_tests,
            descriptors,
            writer=writer,
            instance=instance,
            clustered=clustered,
        ).methods(),
        *ObservationMethods(store).methods(),
        *ClusterMethods(store.leases, instance, clustered=clustered).methods(),
    ]

    async def discover(call: Call) -> dict[str, Any]:
        return described

    discover_method = Method("rpc.discover", discover, summary="This API's OpenRPC document.")
    methods.append(discover_method)
    described = document(methods)
    return Dispatcher(methods, errors={DatabaseUnavailable: _unavailable})
