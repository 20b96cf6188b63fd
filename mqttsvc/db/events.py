"""
The events repository: C{event_log}, the one shape for everything worth
telling the outside world, and the connection and device histories the
control plane lists.

Connection transitions, device status changes, dead letters and operator
actions each become a row of C{event_log} (C{id}, C{type}, C{site_id}, C{at},
C{data}): the first three by triggers on their own tables, operator actions
and the service's own troubles by L{Events.record_operator_action} and
L{Events.record_service_event}.  Every insert sends C{NOTIFY} on L{CHANNEL}
when its transaction commits, and event ids become visible in increasing
order (see migration 0006), so "everything after id N" is a complete
resume point.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import attrs
from psycopg2.extras import Json

from mqttsvc.db.pages import Page, iso, page_of, time_range
from mqttsvc.db.pool import ConnectionPool

#: The NOTIFY channel that every committed event is published on.
CHANNEL = "mqttsvc_events"

#: The event types, as C{event_log.type} holds them.
TYPES = ("connection", "device", "dead_letter", "operator", "service")

#: Events read from the database per query.
PAGE = 500


@attrs.frozen
class Event:
    """
    One event, as stored in C{event_log}.
    """

    id: int
    type: str
    site_id: str | None
    at: datetime
    data: dict[str, Any]

    def as_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.type,
            "site_id": self.site_id,
            "at": iso(self.at),
            "data": self.data,
        }


@attrs.frozen
class EventFilter:
    """
    Which events a subscriber wants: None means any.
    """

    site_ids: frozenset[str] | None = None
    types: frozenset[str] | None = None

    def __call__(self, event: Event) -> bool:
        if self.site_ids is not None and event.site_id not in self.site_ids:
            return False
        return self.types is None or event.type in self.types


#: The instance that wrote an event, when known (migration 0013), as its
#: event_log event says it.
_INSTANCE = (
    " || CASE WHEN instance IS NULL THEN '{}'::jsonb"
    " ELSE jsonb_build_object('instance', instance) END"
)

#: The two kinds of event.list, in the order they take at the same instant,
#: and what each one's row says: the same data as its event_log event.
_HISTORIES = {
    "connection": (
        "connection_event",
        "jsonb_build_object('from', from_state, 'to', to_state, 'reason', reason)" + _INSTANCE,
    ),
    "device": (
        "device_event",
        # A site-wide summary (kind 'site') also says how many devices it
        # changed.
        "jsonb_build_object('kind', kind, 'device_id', device_id, 'gateway_id', gateway_id,"
        " 'from', from_status, 'to', to_status, 'reason', reason)"
        " || CASE WHEN devices IS NULL THEN '{}'::jsonb"
        " ELSE jsonb_build_object('devices', devices) END" + _INSTANCE,
    ),
}

_MAX_ID = 2**63 - 1


class Events:
    """
    The events, read and recorded through C{pool}.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def after(
        self, after: int, wanted: EventFilter = EventFilter(), limit: int = PAGE
    ) -> list[Event]:
        """
        The events with an id above C{after} that C{wanted} selects, in id
        order.
        """
        rows = await self._pool.query(
            "SELECT id, type, site_id, at, data FROM event_log WHERE id > %(after)s"
            " AND (%(sites)s::text[] IS NULL OR site_id = ANY(%(sites)s::text[]))"
            " AND (%(types)s::text[] IS NULL OR type = ANY(%(types)s::text[]))"
            " ORDER BY id LIMIT %(limit)s",
            {
                "after": after,
                "sites": None if wanted.site_ids is None else sorted(wanted.site_ids),
                "types": None if wanted.types is None else sorted(wanted.types),
                "limit": limit,
            },
        )
        return [Event(*row) for row in rows]

    async def last_before(self, moment: datetime) -> int:
        """
        The id of the last event stamped before C{moment}; 0 when none was.
        """
        rows = await self._pool.query(
            "SELECT id FROM event_log WHERE at < %s ORDER BY id DESC LIMIT 1", (moment,)
        )
        position: int = rows[0][0] if rows else 0
        return position

    async def record_operator_action(
        self, caller: str, action: str, site_id: str | None, **details: Any
    ) -> None:
        """
        Record what an operator did (C{site.restart}, C{deadletter.purge},
        ...) and who did it, as an C{operator} event.

        Its own short transaction: it must not run inside one that holds row
        locks, since taking an event id waits for other event writers to
        commit.
        """
        data = {"action": action, "caller": caller, **details}
        await self._pool.operation(
            "INSERT INTO event_log (type, site_id, at, data) VALUES ('operator', %s, %s, %s)",
            (site_id, datetime.now(UTC), Json(data)),
        )

    async def record_service_event(
        self, problem: str, site_id: str | None = None, **details: Any
    ) -> None:
        """
        Record something the service itself ran into (a write lane that
        cannot commit, and its recovery; a site that reached its device
        limit) as a C{service} event, of one site or of none.

        Written through the control plane's pool, not through the writer
        whose trouble it may report.
        """
        data = {"problem": problem, **details}
        await self._pool.operation(
            "INSERT INTO event_log (type, site_id, at, data) VALUES ('service', %s, %s, %s)",
            (site_id, datetime.now(UTC), Json(data)),
        )

    async def history(
        self,
        site_id: str | None,
        type_: str | None,
        since: datetime | None,
        until: datetime | None,
        after: tuple[datetime, str, int] | None,
        limit: int,
    ) -> Page:
        """
        Connection and device events (C{connection_event}, C{device_event}),
        oldest first by C{(at, type, id)}, after C{since} (exclusive) up to
        C{until} (inclusive), from after the key C{after}.  Each table is
        read along its C{(site_id, at, id)} or C{(at, id)} index, and the
        two merged.
        """
        rows: list[tuple[Any, ...]] = []
        for kind, (table, data) in _HISTORIES.items():
            if type_ is not None and kind != type_:
                continue
            where = time_range(site_id, "at", since, until)
            bound = None
            if after is not None:
                # At the cursor's instant, a kind that sorts before the
                # cursor's is done, one after it starts at its first id.
                bound = after[2] if kind == after[1] else (0 if kind > after[1] else _MAX_ID)
                where.append("(at, id) > (%(a)s, %(b)s)")
            rows.extend(
                await self._pool.query(
                    f"SELECT %(t)s, id, site_id, at, {data} FROM {table}"
                    f" WHERE {' AND '.join(where)} ORDER BY at, id LIMIT %(n)s",
                    {
                        "t": kind,
                        "s": site_id,
                        "since": since,
                        "until": until,
                        "a": None if after is None else after[0],
                        "b": bound,
                        "n": limit + 1,
                    },
                )
            )
        rows.sort(key=lambda row: (row[3], row[0], row[1]))

        def event(type_: str, id_: int, site: str, at: datetime, data: Any) -> dict[str, Any]:
            return {"id": id_, "type": type_, "site_id": site, "at": iso(at), "data": data}

        return page_of(rows[: limit + 1], limit, lambda row: (row[3], row[0], row[1]), event)
