"""
The live statuses that site owners publish (C{site_live}, migration 0013),
and the commands one instance sends the owner of a site.

In a cluster every instance answers for every site: a site's live status
(state, retries, subscriptions, counters) is in the memory of its owner
only, so the owner publishes it here at least once a second, and a replica
that does not own the site reads it.  A row counts only while its
instance still holds the site's lease at the epoch it was published
under: an owner that lost the site, or died, leaves a row that readers
ignore until the new owner publishes.

A command (restart a site) is a NOTIFY on L{COMMANDS} naming the owner
and the site; the owner acts on it within the round trip of a
notification, and publishes the site's status at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import attrs

from mqttsvc.db.pool import ConnectionPool

#: The NOTIFY channel of commands to a site's owner (the payload is
#: L{mqttsvc.cluster.commands.Command}'s).
COMMANDS = "mqttsvc_site_command"

_CURRENT = """
SELECT s.site_id, s.instance, s.status, s.live, s.published_at
FROM site_live s
JOIN site_lease l ON l.site_id = s.site_id AND l.owner = s.instance AND l.epoch = s.epoch
JOIN mqttsvc_instance i ON i.instance = s.instance
WHERE i.expires_at > now() AND NOT i.stopping
"""


@attrs.frozen
class Published:
    """
    A site's live status as its owner published it.

    @ivar live: the C{site.status} fields the owner knew.
    @ivar published_at: when, by the database's clock.
    """

    site_id: str
    instance: str
    status: str
    live: dict[str, Any]
    published_at: datetime


def _published(row: tuple[Any, ...]) -> Published:
    site_id, instance, status, live, published_at = row
    return Published(site_id, instance, status, live, published_at)


class LiveStatuses:
    """
    The C{site_live} table, and the commands to a site's owner.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def publish(self, instance: str, rows: Sequence[tuple[str, int, str, str]]) -> None:
        """
        Publish the live status of some of C{instance}'s sites: each row is
        the site, the epoch of its lease, its status and its C{site.status}
        fields as JSON text.  A site deleted meanwhile is skipped.
        """
        if not rows:
            return
        sites, epochs, statuses, lives = (list(c) for c in zip(*rows, strict=True))
        await self._pool.operation(
            """
INSERT INTO site_live AS s (site_id, instance, epoch, status, live, published_at)
SELECT u.site_id, %s, u.epoch, u.status, u.live::jsonb, now()
FROM unnest(%s::text[], %s::bigint[], %s::text[], %s::text[]) AS u(site_id, epoch, status, live)
JOIN mqtt_connection c ON c.site_id = u.site_id
ORDER BY u.site_id
ON CONFLICT (site_id) DO UPDATE SET
    instance = EXCLUDED.instance, epoch = EXCLUDED.epoch, status = EXCLUDED.status,
    live = EXCLUDED.live, published_at = EXCLUDED.published_at
""",
            (instance, sites, epochs, statuses, lives),
        )

    async def of(self, site_id: str) -> Published | None:
        """
        The site's status as its current owner published it, if it has.
        """
        rows = await self._pool.query(_CURRENT + " AND s.site_id = %s", (site_id,))
        return _published(rows[0]) if rows else None

    async def current(self) -> dict[str, Published]:
        """
        Every site's status as its current owner published it.
        """
        return {p.site_id: p for p in map(_published, await self._pool.query(_CURRENT))}

    async def owner(self, site_id: str) -> str | None:
        """
        The live instance that holds the site's lease now, if one does.
        """
        rows = await self._pool.query(
            """
SELECT l.owner FROM site_lease l JOIN mqttsvc_instance i ON i.instance = l.owner
WHERE l.site_id = %s AND l.expires_at > now() AND i.expires_at > now() AND NOT i.stopping
""",
            (site_id,),
        )
        return rows[0][0] if rows else None

    async def send(self, payload: str) -> None:
        """
        Send a command (L{mqttsvc.cluster.commands.Command}'s payload) to
        every instance; the one it names acts on it.  Delivered at once: it
        is not part of a transaction.
        """
        await self._pool.operation("SELECT pg_notify(%s, %s)", (COMMANDS, payload))
