"""
Readiness: whether this process can do its work right now.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred

from mqttsvc.db.store import Store
from mqttsvc.ingest.writer import STALLED_AFTER, WriterLanes
from mqttsvc.sites.supervisor import SiteSupervisor

#: How long the database may take to answer the readiness probe.
DATABASE_TIMEOUT = 2.0


async def readiness(
    reactor: Any, store: Store, supervisor: SiteSupervisor, writer: WriterLanes
) -> list[str]:
    """
    The reasons the service is not ready; none when it is.
    """
    problems = []
    if not supervisor.running:
        problems.append("the site supervisor is not running")
    elif not supervisor.loaded:
        problems.append("the sites have not been loaded from the database yet")
    for lane, seconds, error in writer.failing():
        if seconds >= STALLED_AFTER:
            problems.append(
                f"database writer lane {lane} has committed nothing for {seconds:.0f}s: {error}"
            )
    probe: Deferred[None] = Deferred.fromCoroutine(store.pool.ping())
    probe.addTimeout(DATABASE_TIMEOUT, reactor)
    try:
        await probe
    except Exception as e:
        problems.append(f"the database does not answer: {str(e).strip() or type(e).__name__}")
    return problems
