"""
The leases repository: which instances take part in a cluster and which
instance owns each site (C{mqttsvc_instance}, C{site_lease}), and the fence
that a site owner's batches carry (L{Fence}, checked by the SQL function
C{mqttsvc_fence} as the first statement of the batch).

Correctness rests on the database alone: every expiry is computed and
compared with the database's C{now()}, never an instance's clock, and every
lease change and every fenced batch is a transaction that locks the lease
rows it depends on, so an acquisition and an old owner's batch are ordered
one after the other.  The epoch of a site only ever increases, by exactly
one per acquisition, so a batch fenced with an older epoch is refused
whole.

Every change of leases is one query: its statements run in one implicit
transaction that the server begins and ends without waiting for the
client, never in an explicit transaction of several round trips.  A process
frozen between two of those (SIGSTOP, a long GC pause, a VM stall) kept the
lease rows it had locked until its connection died (hours: the server's
TCP keepalive): every other instance's acquisition of them waited as long,
and its renewals with it, until it fenced itself and lost all its sites.

Joining, leaving and giving leases up notify L{CHANNEL} (triggers of
migration 0012) with the instance's name, so that the others re-plan at
once.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import attrs
import psycopg2

from mqttsvc.db.pages import iso
from mqttsvc.db.pool import ConnectionPool

#: The NOTIFY channel of joins, leaves and released leases; the payload
#: is the instance's name.
CHANNEL = "mqttsvc_cluster"

#: The SQLSTATE that C{mqttsvc_fence} raises for a stale batch.
FENCED = "MQFNC"


def _same_length(instance: Fence, attribute: attrs.Attribute[Any], epochs: tuple[int, ...]) -> None:
    if len(epochs) != len(instance.sites):
        raise ValueError(f"a fence of {len(instance.sites)} sites needs as many epochs")


# Typed converters: with the builtin C{tuple} as converter, mypy's attrs
# plugin cannot type a call of Fence (its parameter is Iterable[_T_co]).
def _sites(sites: Iterable[str]) -> tuple[str, ...]:
    return tuple(sites)


def _epochs(epochs: Iterable[int]) -> tuple[int, ...]:
    return tuple(epochs)


@attrs.frozen
class Fence:
    """
    What a batch is written under: the instance that owns its sites and
    the epoch of each site's lease (C{epochs[i]} is that of C{sites[i]}).
    """

    instance: str
    sites: tuple[str, ...] = attrs.field(converter=_sites)
    epochs: tuple[int, ...] = attrs.field(converter=_epochs, validator=_same_length)


@attrs.frozen
class Member:
    """
    A live instance as C{cluster.status} shows it: the sites it owns, with
    each lease's epoch, and when it joined and last renewed (ISO 8601).
    """

    instance: str
    started_at: str
    renewed_at: str
    expires_at: str
    #: Site id -> epoch, in site id order.
    sites: dict[str, int]


def fenced_sites(error: BaseException) -> list[str] | None:
    """
    The stale sites that made C{mqttsvc_fence} refuse a batch (sorted), or
    None when C{error} is anything else.
    """
    if not isinstance(error, psycopg2.Error) or error.pgcode != FENCED:
        return None
    detail = error.diag.message_detail or ""
    return [site_id for site_id in detail.split(",") if site_id]


#: Lease rows of an instance, locked in site order: every multi-row writer
#: of C{site_lease} and C{mqttsvc_fence} lock rows in this order, so none
#: of them can deadlock with another.
_LOCK_OWNED = (
    "SELECT site_id FROM site_lease WHERE owner = %(instance)s ORDER BY site_id FOR NO KEY UPDATE"
)

_LIVE = "i.expires_at > now() AND NOT i.stopping"


class Leases:
    """
    The leases of a cluster of instances, on a pool of its own or shared.

    Every method is one transaction.  C{ttl} is in seconds.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def heartbeat(self, instance: str, ttl: float) -> dict[str, int]:
        """
        In one transaction: upsert the instance's row (renewed now, expiring
        C{ttl} seconds from now, not stopping; C{started_at} is kept while
        it stays live, and reset when it joins again after it expired or
        left) and extend every lease it still owns to now + C{ttl}.

        A lease that another instance has acquired is not the caller's any
        more and is not extended: a renewal that arrives late never takes
        a lease back.

        @return: site id -> epoch of every lease the instance owns.
        """
        rows = await self._pool.query(
            f"""
INSERT INTO mqttsvc_instance AS i (instance, started_at, renewed_at, expires_at)
VALUES (%(instance)s, now(), now(), now() + make_interval(secs => %(ttl)s))
ON CONFLICT (instance) DO UPDATE SET
    started_at = CASE WHEN i.expires_at > now() AND NOT i.stopping THEN i.started_at
                      ELSE EXCLUDED.started_at END,
    renewed_at = EXCLUDED.renewed_at,
    expires_at = EXCLUDED.expires_at,
    stopping = false;
{_LOCK_OWNED};
UPDATE site_lease SET expires_at = now() + make_interval(secs => %(ttl)s)
WHERE owner = %(instance)s
RETURNING site_id, epoch
""",
            {"instance": instance, "ttl": ttl},
        )
        return {site_id: epoch for site_id, epoch in sorted(rows)}

    async def live_instances(self) -> list[str]:
        """
        The names of the instances whose row has not expired (by the
        database's clock) and that are not stopping, sorted (code point
        order, as Python sorts them).
        """
        rows = await self._pool.query(
            f"SELECT i.instance FROM mqttsvc_instance i WHERE {_LIVE} "
            'ORDER BY i.instance COLLATE "C"'
        )
        return [instance for (instance,) in rows]

    async def enabled_sites(self) -> list[str]:
        """
        The ids of every enabled site (C{mqtt_connection.is_enabled}), sorted
        (code point order).
        """
        rows = await self._pool.query(
            'SELECT site_id FROM mqtt_connection WHERE is_enabled ORDER BY site_id COLLATE "C"'
        )
        return [site_id for (site_id,) in rows]

    async def acquire_many(
        self, instance: str, site_ids: Sequence[str], ttl: float
    ) -> dict[str, int]:
        """
        Take the leases of C{site_ids} for C{ttl} seconds, each that is free
        (no row yet, or no owner), expired, held by an instance that is not
        live (its row expired or stopping, or no row at all), or held by
        C{instance} itself (a new term of ownership: its earlier batches are
        fenced).  Each taken lease's epoch goes up by exactly one.

        One statement, in site order (the order in which the fence locks
        lease rows, so that neither deadlocks with the other): where a row
        is locked by an old owner's batch in flight (C{mqttsvc_fence}), it
        waits for that batch to commit or abort, then decides on the row as
        committed.

        @return: the new epoch of each site taken; a site another live
            instance holds, or that does not exist, is not in it.
        """
        if not site_ids:
            return {}
        rows = await self._pool.query(
            f"""
INSERT INTO site_lease AS l (site_id, owner, epoch, expires_at, changed_at)
SELECT c.site_id, %(instance)s, 1, now() + make_interval(secs => %(ttl)s), now()
FROM mqtt_connection c WHERE c.site_id = ANY (%(sites)s)
ORDER BY c.site_id
ON CONFLICT (site_id) DO UPDATE SET
    owner = EXCLUDED.owner,
    epoch = l.epoch + 1,
    expires_at = EXCLUDED.expires_at,
    changed_at = EXCLUDED.changed_at
WHERE l.owner IS NULL
   OR l.owner = EXCLUDED.owner
   OR l.expires_at IS NULL
   OR l.expires_at <= now()
   OR NOT EXISTS (SELECT 1 FROM mqttsvc_instance i WHERE i.instance = l.owner AND {_LIVE})
RETURNING l.site_id, l.epoch
""",
            {"instance": instance, "sites": list(site_ids), "ttl": ttl},
        )
        return dict(rows)

    async def release(self, instance: str, site_ids: Sequence[str]) -> None:
        """
        Give up the leases of C{site_ids} that C{instance} still owns (owner
        set NULL, epoch kept, so the next owner's is greater); a lease
        another instance holds is left alone.  Notifies L{CHANNEL} when any
        was given up.
        """
        await self._pool.operation(
            """
SELECT site_id FROM site_lease
WHERE owner = %(instance)s AND site_id = ANY (%(sites)s::text[])
ORDER BY site_id FOR NO KEY UPDATE;
UPDATE site_lease SET owner = NULL, expires_at = NULL, changed_at = now()
WHERE owner = %(instance)s AND site_id = ANY (%(sites)s::text[])
""",
            {"instance": instance, "sites": list(site_ids)},
        )

    async def leave(self, instance: str) -> None:
        """
        In one transaction: give up every lease of C{instance} and mark it
        stopping (its row stays, expired; a later heartbeat makes it live
        again).  Notifies L{CHANNEL}.
        """
        await self._pool.operation(
            f"""
UPDATE mqttsvc_instance SET stopping = true, expires_at = LEAST(expires_at, now())
WHERE instance = %(instance)s;
{_LOCK_OWNED};
UPDATE site_lease SET owner = NULL, expires_at = NULL, changed_at = now()
WHERE owner = %(instance)s
""",
            {"instance": instance},
        )

    async def instances(self) -> list[Member]:
        """
        Every live instance (as L{live_instances}) with the leases it owns,
        in instance order, in one statement (one snapshot).
        """
        rows = await self._pool.query(
            f"""
SELECT i.instance, i.started_at, i.renewed_at, i.expires_at,
       COALESCE(array_agg(l.site_id ORDER BY l.site_id COLLATE "C")
                    FILTER (WHERE l.site_id IS NOT NULL), ARRAY[]::text[]),
       COALESCE(array_agg(l.epoch ORDER BY l.site_id COLLATE "C")
                    FILTER (WHERE l.site_id IS NOT NULL), ARRAY[]::bigint[])
FROM mqttsvc_instance i
LEFT JOIN site_lease l ON l.owner = i.instance
WHERE {_LIVE}
GROUP BY i.instance
ORDER BY i.instance COLLATE "C"
"""
        )
        members = []
        for instance, started_at, renewed_at, expires_at, sites, epochs in rows:
            members.append(
                Member(
                    instance=instance,
                    started_at=_iso(started_at),
                    renewed_at=_iso(renewed_at),
                    expires_at=_iso(expires_at),
                    sites=dict(zip(sites, epochs, strict=True)),
                )
            )
        return members


def _iso(value: Any) -> str:
    text = iso(value)
    assert text is not None
    return text
