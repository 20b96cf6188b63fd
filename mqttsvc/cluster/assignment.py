"""
Which live instance owns which site: rendezvous (highest random weight)
hashing with quotas, a pure function of the set of sites and the set of
live instances, so every instance computes the same answer on its own.

Every (instance, site) pair has a weight from a stable hash
(L{hashlib.blake2b}, never Python's per-process C{hash()}).  Plain
rendezvous hashing gives each site to its heaviest instance; that moves
only the sites of an instance that comes or goes, but its counts are only
balanced on average: with 100 sites on 10 instances one instance typically
has 5 sites more than another, beyond the issue's bound (largest minus
smallest count at most 1 site or 5% of the sites, whichever is larger).
So each instance has a quota, C{len(sites) // len(instances)} sites and one
more for the first C{len(sites) % len(instances)} instances to claim it,
and the pairs are taken heaviest first: a site goes to the heaviest of its
instances that still has room.  The counts then differ by at most one, and
a join or a leave still moves few sites besides the ones it must (see
tests/test_cluster_assignment.py for the bound that is asserted).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Collection, Iterable, Mapping
from types import MappingProxyType

import attrs


def weight(instance: str, site_id: str) -> int:
    """
    The rendezvous weight of a site on an instance: the same in every
    process and on every machine.
    """
    digest = hashlib.blake2b(f"{instance}\0{site_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def assign(sites: Iterable[str], instances: Collection[str]) -> dict[str, str]:
    """
    The owner of every site among C{instances}: each site to the heaviest
    instance that has room under its quota (see the module's docstring).

    Ties of weight (a one in 2**64 chance) are broken by the names, so the
    answer never depends on the order of the arguments.
    """
    return dict(_assign(tuple(sorted(set(sites))), tuple(sorted(set(instances)))))


@functools.lru_cache(maxsize=4)
def _assign(ids: tuple[str, ...], names: tuple[str, ...]) -> Mapping[str, str]:
    # Kept for the next call: every keeper plans every round (2 s, and on
    # every NOTIFY), and the sites and instances rarely change; 5,000 sites
    # on 10 instances take about 80 ms to assign, on the reactor thread.
    if not names:
        raise ValueError("no instance to assign sites to")
    base, extra = divmod(len(ids), len(names))
    pairs = sorted(
        ((weight(name, site_id), name, site_id) for name in names for site_id in ids),
        reverse=True,
    )
    counts = dict.fromkeys(names, 0)
    owners: dict[str, str] = {}
    for _, name, site_id in pairs:
        if site_id in owners:
            continue
        count = counts[name]
        if count < base or (count == base and extra > 0):
            if count == base:
                extra -= 1
            counts[name] = count + 1
            owners[site_id] = name
            if len(owners) == len(ids):
                break
    return MappingProxyType(owners)


def owner_of(site_id: str, instances: Collection[str], sites: Iterable[str]) -> str:
    """
    The instance that owns C{site_id} when C{sites} are spread over
    C{instances} (C{site_id} counts as one of C{sites}).
    """
    return assign({*sites, site_id}, instances)[site_id]


@attrs.frozen
class Plan:
    """
    What one instance does next: the sites to acquire (its own, not held
    yet) and the sites to hand over (held, but another live instance's, or
    no longer enabled), each sorted.
    """

    acquire: tuple[str, ...]
    hand_over: tuple[str, ...]


def plan(sites: Iterable[str], instances: Collection[str], me: str, owned: Collection[str]) -> Plan:
    """
    Compare what C{me} holds (C{owned}) with what the assignment of the
    enabled C{sites} over the live C{instances} (C{me} among them) gives it.
    """
    owners = _assign(tuple(sorted(set(sites))), tuple(sorted({*instances, me})))
    held = set(owned)
    mine = {site_id for site_id, name in owners.items() if name == me}
    return Plan(acquire=tuple(sorted(mine - held)), hand_over=tuple(sorted(held - mine)))
