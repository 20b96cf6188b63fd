"""
Fencing the writes of a cluster instance: what each write of the batch
writer carries (the lease keeper's epochs for its sites), and which sites
stop when the database refuses one.  Only a C{--cluster} instance builds
one (C{mqttsvc.tap}); alone, the writer sends no fence.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Protocol

from mqttsvc.db.leases import Fence


class FenceKeeper(Protocol):
    """
    What fencing needs of the lease keeper (L{mqttsvc.cluster.keeper.LeaseKeeper}).
    """

    def fence_for(self, site_ids: Collection[str]) -> tuple[str, tuple[str, ...], tuple[int, ...]]:
        "This instance's name, and the sites with the epoch each is held under (0: not held)."

    def epoch(self, site_id: str) -> int | None:
        "The epoch a site is held under now, or None."

    def poke(self) -> None:
        "Renew at once."


class Fences:
    """
    Between the writer and the lease keeper: the fence of every write (the
    keeper's epochs), and which sites to stop when the database refuses
    one.

    A site's writes all go through one writer lane, one write at a time,
    so the epoch that the last fence of a site carried is the epoch of the
    refused write.  A site this instance holds under a newer epoch (handed
    over and acquired again while that write was in flight) keeps running;
    any other stale site is stopped (C{on_fenced}) and the keeper renews at
    once, to learn which leases it lost.
    """

    def __init__(self, keeper: FenceKeeper, on_fenced: Callable[[list[str]], None]) -> None:
        self._keeper = keeper
        self._on_fenced = on_fenced
        #: The epoch of the last fence of each site.
        self._sent: dict[str, int] = {}

    def fence(self, site_ids: Collection[str]) -> Fence:
        instance, sites, epochs = self._keeper.fence_for(site_ids)
        self._sent.update(zip(sites, epochs, strict=True))
        return Fence(instance, sites, epochs)

    def refused(self, stale: list[str]) -> None:
        doomed = []
        for site_id in stale:
            epoch = self._keeper.epoch(site_id)
            if epoch is None or epoch == self._sent.get(site_id):
                doomed.append(site_id)
        self._keeper.poke()
        if doomed:
            self._on_fenced(doomed)
