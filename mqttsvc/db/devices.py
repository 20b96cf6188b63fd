"""
The devices repository: every gateway, datalogger and sensor a site has
shown, as device liveness loads them (every site's at start, or in a
cluster each site's when this instance acquires it) and the control plane
lists and counts them.  (The batch writer records them: L{mqttsvc.db.batch}.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

from mqttsvc.db.pages import Page, iso, page_of
from mqttsvc.db.pool import ConnectionPool
from mqttsvc.records import DeviceKey

#: Devices read per query when the known devices are loaded at start.
DEVICE_PAGE = 20_000

#: Each kind of device (its table has its name): its gateway column (or
#: NULL) and its id column, in the order the devices are loaded at start.
_DEVICE_TABLES = {
    "gateway": ("NULL", "gateway_id"),
    "datalogger": ("gateway_id", "datalogger_id"),
    "sensor": ("NULL", "sensor_id"),
}


class Devices:
    """
    The devices, read through C{pool}.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def known(
        self, size: int = DEVICE_PAGE
    ) -> AsyncIterator[list[tuple[DeviceKey, str, float | None, str | None]]]:
        """
        Every known device, in pages of at most C{size}: its key, stored
        status, own heartbeat interval (None when it never said) and the
        status it had before its site made it unknown (None when it is not
        unknown, or not known).

        In pages, so that the driver's rows of 300,000 devices are never
        held at once beside what is kept of them (the start-up's RSS grew
        by 253 MB before issue 14, 93 MB now, most of it the detector).
        """
        # Hundreds of thousands of rows repeat a few site ids, statuses,
        # gateways and intervals, each a new object as the driver hands it
        # over: share one of each (about 110 bytes less per device tracked).
        shared: dict[Any, Any] = {None: None}
        share = shared.setdefault
        for kind, (gateway, device) in _DEVICE_TABLES.items():
            after = 0
            while True:
                rows = await self._pool.query(
                    f"SELECT id, site_id, {gateway}, {device}, status, heartbeat_interval, "
                    f"CASE WHEN status = 'unknown' THEN known_status END FROM {kind} "
                    "WHERE id > %s ORDER BY id LIMIT %s",
                    (after, size),
                )
                if not rows:
                    break
                after = rows[-1][0]
                yield [
                    (
                        DeviceKey(
                            share(site_id, site_id), kind, share(gateway_id, gateway_id), dev
                        ),
                        share(status, status),
                        share(interval, interval),
                        share(before, before),
                    )
                    for _, site_id, gateway_id, dev, status, interval, before in rows
                ]
                if len(rows) < size:
                    break

    async def known_of(
        self, site_id: str, size: int = DEVICE_PAGE
    ) -> AsyncIterator[list[tuple[DeviceKey, str, float | None, str | None]]]:
        """
        One site's known devices, as L{known} gives every site's, in pages
        of at most C{size}: for an instance of a cluster, which loads a site
        when it acquires it.

        Each table is read along its unique index (the site, then the
        device's key), from after the last key of the previous page, so
        that a page costs C{size} rows however many devices the site has.
        """
        shared: dict[Any, Any] = {None: None, site_id: site_id}
        share = shared.setdefault
        for kind, (gateway, device) in _DEVICE_TABLES.items():
            keys = f"{gateway}, {device}" if gateway != "NULL" else device
            # The key of the last device read (gateway and id, or id).
            after: tuple[str, ...] = ()
            while True:
                rows = await self._pool.query(
                    f"SELECT {gateway}, {device}, status, heartbeat_interval, "
                    f"CASE WHEN status = 'unknown' THEN known_status END FROM {kind} "
                    f"WHERE site_id = %s{f' AND ({keys}) > %s' if after else ''} "
                    f"ORDER BY {keys} LIMIT %s",
                    (site_id, after, size) if after else (site_id, size),
                )
                if not rows:
                    break
                gateway_id, device_id = rows[-1][:2]
                after = (gateway_id, device_id) if gateway != "NULL" else (device_id,)
                yield [
                    (
                        DeviceKey(site_id, kind, share(gateway_id, gateway_id), dev),
                        share(status, status),
                        share(interval, interval),
                        share(before, before),
                    )
                    for gateway_id, dev, status, interval, before in rows
                ]
                if len(rows) < size:
                    break

    async def page(
        self,
        site_id: str,
        kind: str | None,
        status: str | None,
        after: tuple[str, str | None, str] | None,
        limit: int,
    ) -> Page:
        """
        A site's devices ordered by kind, gateway and id, from after the key
        C{after} (C{(kind, gateway_id, device_id)}): one table after the
        other, each read along its unique index, so that a page costs
        C{limit} rows whatever the site holds (unless C{status} leaves out
        most of them).
        """
        rows: list[tuple[Any, ...]] = []
        for kind_, (gateway, device) in sorted(_DEVICE_TABLES.items()):
            if len(rows) > limit:
                break
            if (kind is not None and kind_ != kind) or (after is not None and kind_ < after[0]):
                continue
            keys = f"{gateway}, {device}" if gateway != "NULL" else device
            where = ["site_id = %(s)s"]
            if status is not None:
                where.append("status = %(st)s")
            if after is not None and kind_ == after[0]:
                where.append(
                    f"({keys}) > (%(g)s, %(d)s)" if gateway != "NULL" else f"{device} > %(d)s"
                )
            rows.extend(
                (kind_, *row)
                for row in await self._pool.query(
                    f"SELECT {device}, {gateway}, status, reported_status, first_seen_at,"
                    f" last_seen_at FROM {kind_} WHERE {' AND '.join(where)}"
                    f" ORDER BY {keys} LIMIT %(n)s",
                    {
                        "s": site_id,
                        "st": status,
                        "g": None if after is None else after[1],
                        "d": None if after is None else after[2],
                        "n": limit + 1 - len(rows),
                    },
                )
            )
        return page_of(rows, limit, lambda row: (row[0], row[2], row[1]), _device)

    async def counts(self, site_id: str | None) -> list[dict[str, Any]]:
        """
        Per site (every site that has devices, or the one asked for): how
        many devices are online, offline and unknown.
        """
        rows = await self._pool.query(
            "SELECT site_id,"
            "  count(*) FILTER (WHERE status = 'online'),"
            "  count(*) FILTER (WHERE status = 'offline'),"
            "  count(*) FILTER (WHERE status = 'unknown')"
            " FROM (SELECT site_id, status FROM gateway"
            "       UNION ALL SELECT site_id, status FROM datalogger"
            "       UNION ALL SELECT site_id, status FROM sensor) d"
            " WHERE (%(s)s::text IS NULL OR site_id = %(s)s)"
            " GROUP BY site_id ORDER BY site_id",
            {"s": site_id},
        )
        return [
            {"site_id": site, "online": online, "offline": offline, "unknown": unknown}
            for site, online, offline, unknown in rows
        ]


def _device(
    kind: str,
    device_id: str,
    gateway_id: str | None,
    status: str,
    reported: str | None,
    first: datetime,
    last: datetime,
) -> dict[str, Any]:
    return {
        "kind": kind,
        "device_id": device_id,
        "gateway_id": gateway_id,
        "status": status,
        "reported_status": reported,
        "first_seen_at": iso(first),
        "last_seen_at": iso(last),
    }
