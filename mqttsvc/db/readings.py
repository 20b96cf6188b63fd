"""
The readings repository: the sensor values mqttsvc stored, as the control
plane reads them back.  (The batch writer stores them: L{mqttsvc.db.batch}.)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mqttsvc.db.pages import Page, iso, page_of, time_range
from mqttsvc.db.pool import ConnectionPool

#: The orders of reading.list: their key columns.
READING_ORDERS = {"ts": ("ts", "name"), "received": ("received_at", "id")}


class Readings:
    """
    The readings, read through C{pool}.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def series(
        self,
        site_id: str,
        sensor_id: str,
        order: str,
        since: datetime | None,
        until: datetime | None,
        after: tuple[datetime, Any] | None,
        limit: int,
    ) -> Page:
        """
        Readings of one sensor, oldest first by C{order}: C{"ts"} (the time
        the sensor gave, key C{(ts, name)}) or C{"received"} (when mqttsvc
        received it, key C{(received_at, id)}); C{since} (exclusive) and
        C{until} (inclusive) bound that same column.  From after the key
        C{after}, or after C{since}; with neither, the latest C{limit} (then
        none follow).
        """
        time, tie = READING_ORDERS[order]
        where = [*time_range(site_id, time, since, until), "sensor_id = %(x)s"]
        if after is not None:
            where.append(f"({time}, {tie}) > (%(a)s, %(b)s)")
        latest = after is None and since is None
        direction = " DESC" if latest else ""
        rows = await self._pool.query(
            f"SELECT ts, name, value, unit, received_at, id FROM sensor_reading"
            f" WHERE {' AND '.join(where)}"
            f" ORDER BY {time}{direction}, {tie}{direction} LIMIT %(n)s",
            {
                "s": site_id,
                "x": sensor_id,
                "since": since,
                "until": until,
                "a": None if after is None else after[0],
                "b": None if after is None else after[1],
                "n": limit if latest else limit + 1,
            },
        )
        if latest:
            rows.reverse()

        def key(row: tuple[Any, ...]) -> tuple[Any, ...]:
            return (row[0], row[1]) if order == "ts" else (row[4], row[5])

        def reading(
            ts: datetime, name: str, value: float, unit: str | None, received: datetime, id_: int
        ) -> dict[str, Any]:
            return {
                "sensor_id": sensor_id,
                "ts": iso(ts),
                "name": name,
                "value": value,
                "unit": unit,
                "received_at": iso(received),
            }

        return page_of(rows, limit, key, reading)
