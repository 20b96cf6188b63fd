"""
The control plane's read side: devices, readings, discovered topics,
events, and the dead letters (which can also be replayed or purged).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from twisted.logger import Logger

from mqttsvc.control.rpc import paging
from mqttsvc.control.rpc.dispatcher import Call, Method, Param, invalid_params
from mqttsvc.db import observations
from mqttsvc.db.batch import write_effects
from mqttsvc.db.store import Store
from mqttsvc.events.hub import record_operator_action
from mqttsvc.ingest.processing import Router, process
from mqttsvc.records import DeadLetter, Reading

KINDS = ("gateway", "datalogger", "sensor")
DEVICE_STATUSES = ("online", "offline", "unknown")
EVENT_TYPES = ("connection", "device")


def _time(call: Call, name: str) -> datetime | None:
    value = call.params.get(name)
    if value is None:
        return None
    try:
        moment = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise invalid_params(name, "must be an ISO 8601 timestamp") from None
    if moment.tzinfo is None:
        raise invalid_params(name, "must include its UTC offset (for example Z)")
    return moment


def _one_of(call: Call, name: str, allowed: tuple[str, ...]) -> str | None:
    value: str | None = call.params.get(name)
    if value is not None and value not in allowed:
        raise invalid_params(name, f"must be one of {', '.join(allowed)}")
    return value


def _ids(call: Call) -> list[int]:
    ids = call.params["ids"]
    if not ids or len(ids) > 10_000:
        raise invalid_params("ids", "must list 1 to 10000 dead letter ids")
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise invalid_params("ids", "must be integers")
    return list(ids)


class ObservationMethods:
    """
    What the service has observed, read back through the store's pool.
    """

    log = Logger()

    def __init__(self, store: Store) -> None:
        self._store = store

    def methods(self) -> list[Method]:
        site_id = Param("site_id", "string", description="The site's identifier.")
        some_site = Param("site_id", "string", required=False, nullable=True)
        since = Param(
            "since", "string", required=False, nullable=True, description="ISO 8601, exclusive."
        )
        until = Param(
            "until", "string", required=False, nullable=True, description="ISO 8601, inclusive."
        )
        cursor, limit = paging.cursor_param(), paging.limit_param()
        ids = Param("ids", "array", description="Dead letter ids.")
        return [
            Method(
                "device.list",
                self.device_list,
                (
                    site_id,
                    Param(
                        "kind",
                        "string",
                        required=False,
                        nullable=True,
                        description="gateway, datalogger or sensor.",
                    ),
                    Param(
                        "status",
                        "string",
                        required=False,
                        nullable=True,
                        description="online, offline or unknown.",
                    ),
                    cursor,
                    limit,
                ),
                summary="A page of a site's devices and their status, by kind, gateway and id.",
                result=paging.PAGE_SCHEMA,
            ),
            Method(
                "device.counts",
                self.device_counts,
                (some_site,),
                summary="How many devices of each site are online, offline and unknown.",
            ),
            Method(
                "reading.list",
                self.reading_list,
                (
                    site_id,
                    Param("sensor_id", "string"),
                    since,
                    limit,
                    until,
                    Param(
                        "order",
                        "string",
                        required=False,
                        nullable=True,
                        description="ts (the sensor's time, the default) or received "
                        "(mqttsvc's receive time, for pollers); since and until bound it.",
                    ),
                    cursor,
                ),
                summary="A page of a sensor's readings, oldest first: after `since` or the "
                "cursor, else the latest.",
                result=paging.PAGE_SCHEMA,
            ),
            Method(
                "topic.list",
                self.topic_list,
                (
                    site_id,
                    Param(
                        "prefix",
                        "string",
                        required=False,
                        nullable=True,
                        description="Only the topics that start with it.",
                    ),
                    cursor,
                    limit,
                ),
                summary="A page of the exact topics seen on a site, with counts.",
                result=paging.PAGE_SCHEMA,
            ),
            Method(
                "event.list",
                self.event_list,
                (
                    some_site,
                    since,
                    limit,
                    until,
                    Param(
                        "type",
                        "string",
                        required=False,
                        nullable=True,
                        description="connection or device.",
                    ),
                    cursor,
                ),
                summary="A page of connection and device events, oldest first.",
                result=paging.PAGE_SCHEMA,
            ),
            Method(
                "deadletter.list",
                self.deadletter_list,
                (some_site, limit, since, until, cursor),
                summary="A page of dead letters, newest first; since and until bound when "
                "they were received.",
                result=paging.PAGE_SCHEMA,
            ),
            Method(
                "deadletter.replay",
                self.deadletter_replay,
                (ids,),
                summary="Process dead letters again with their site's current configuration; "
                "those that now pass are written and removed.",
            ),
            Method(
                "deadletter.purge",
                self.deadletter_purge,
                (ids,),
                summary="Delete dead letters.",
            ),
        ]

    async def device_list(self, call: Call) -> dict[str, Any]:
        after = paging.decode(call, "device")
        if after is not None and (
            after[0] not in KINDS or (after[0] == "datalogger") != (after[1] is not None)
        ):
            raise paging.bad_cursor(call)
        page = await observations.devices(
            self._store.pool,
            call.params["site_id"],
            _one_of(call, "kind", KINDS),
            _one_of(call, "status", DEVICE_STATUSES),
            after,
            paging.limit(call),
        )
        return paging.answer("device", page)

    async def device_counts(self, call: Call) -> list[dict[str, Any]]:
        return await observations.device_counts(self._store.pool, call.params.get("site_id"))

    async def _record(self, call: Call, ids_by_site: dict[str, dict[str, list[int]]]) -> None:
        """
        Publish the action as one C{operator} event per site it touched.
        """
        for site_id, ids in sorted(ids_by_site.items()):
            try:
                await record_operator_action(
                    self._store.pool, call.caller, call.method, site_id, **ids
                )
            except Exception as e:
                self.log.warn(
                    "could not record {method} by {caller} as an event: {error}",
                    method=call.method,
                    caller=call.caller,
                    error=str(e).strip(),
                )
                return

    async def reading_list(self, call: Call) -> dict[str, Any]:
        """
        In receive order, the answer always has a C{next_cursor} once any
        reading was seen: a poller keeps it and asks again later for the
        readings received since (a page shorter than the limit means it
        has caught up).
        """
        order = _one_of(call, "order", tuple(observations.READING_ORDERS)) or "ts"
        tag = f"reading.{order}"
        page = await observations.readings(
            self._store.pool,
            call.params["site_id"],
            call.params["sensor_id"],
            order,
            _time(call, "since"),
            _time(call, "until"),
            paging.decode(call, tag),
            paging.limit(call),
        )
        answer = paging.answer(tag, page)
        if order == "received":
            answer["next_cursor"] = (
                call.params.get("cursor") if page.last is None else paging.encode(tag, page.last)
            )
        return answer

    async def topic_list(self, call: Call) -> dict[str, Any]:
        after = paging.decode(call, "topic")
        page = await observations.topics(
            self._store.pool,
            call.params["site_id"],
            call.params.get("prefix"),
            None if after is None else after[0],
            paging.limit(call),
        )
        return paging.answer("topic", page)

    async def event_list(self, call: Call) -> dict[str, Any]:
        page = await observations.events(
            self._store.pool,
            call.params.get("site_id"),
            _one_of(call, "type", EVENT_TYPES),
            _time(call, "since"),
            _time(call, "until"),
            paging.decode(call, "event"),
            paging.limit(call),
        )
        return paging.answer("event", page)

    async def deadletter_list(self, call: Call) -> dict[str, Any]:
        after = paging.decode(call, "deadletter")
        page = await observations.dead_letters(
            self._store.pool,
            call.params.get("site_id"),
            _time(call, "since"),
            _time(call, "until"),
            None if after is None else after[0],
            paging.limit(call),
        )
        return paging.answer("deadletter", page)

    async def deadletter_purge(self, call: Call) -> dict[str, Any]:
        rows = await self._store.pool.query(
            "DELETE FROM dead_letter WHERE id = ANY(%s) RETURNING id, site_id", (_ids(call),)
        )
        self.log.info(
            "{count} dead letters purged by {caller}", count=len(rows), caller=call.caller
        )
        purged: dict[str, dict[str, list[int]]] = {}
        for id_, site_id in sorted(rows):
            purged.setdefault(site_id, {"ids": []})["ids"].append(id_)
        await self._record(call, purged)
        return {"purged": len(rows)}

    async def deadletter_replay(self, call: Call) -> dict[str, Any]:
        """
        Replayed messages are old: they add readings (received at their
        original time) but say nothing about whether a device is alive now,
        and were already counted as topics when they first arrived.
        """
        wanted = _ids(call)
        sites = {row.config.site_id: row.config for row in await self._store.list_sites()}
        by_site: dict[str, dict[str, list[int]]] = {}

        async def replay(cursor: Any) -> dict[str, int]:
            await cursor.execute(
                "SELECT id, site_id, topic, payload, received_at, "
                "payload_size > octet_length(payload) OR topic_raw IS NOT NULL "
                "FROM dead_letter WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                (wanted,),
            )
            replayed, dead_again = 0, 0
            by_site.clear()
            effects: list[Reading] = []
            done: list[int] = []
            reasons: list[tuple[int, str]] = []
            for id_, site_id, topic, payload, received_at, altered in cursor.fetchall():
                outcomes = by_site.setdefault(site_id, {"replayed": [], "dead_again": []})
                config = sites.get(site_id)
                why = None
                if config is None:
                    why = f"site {site_id} no longer exists"
                elif altered:
                    # What is kept is not the message: never guess at the rest.
                    why = "cannot be replayed: only part of its payload or topic was kept"
                if why is not None:
                    reasons.append((id_, why))
                    outcomes["dead_again"].append(id_)
                    dead_again += 1
                    continue
                assert config is not None
                result = process(site_id, Router(config.topics), topic, bytes(payload), received_at)
                dead = [e for e in result if isinstance(e, DeadLetter)]
                if dead:
                    reasons.append((id_, dead[0].reason))
                    outcomes["dead_again"].append(id_)
                    dead_again += 1
                    continue
                effects.extend(e for e in result if isinstance(e, Reading))
                outcomes["replayed"].append(id_)
                done.append(id_)
                replayed += 1
            await write_effects(cursor.execute, effects)
            if done:
                await cursor.execute("DELETE FROM dead_letter WHERE id = ANY(%s)", (done,))
            for id_, reason in reasons:
                await cursor.execute(
                    "UPDATE dead_letter SET reason = %s WHERE id = %s", (reason, id_)
                )
            return {"replayed": replayed, "dead_again": dead_again}

        outcome: dict[str, int] = await self._store.pool.transaction(replay)
        self.log.info(
            "dead letters replayed by {caller}: {replayed} written, {dead_again} still dead",
            caller=call.caller,
            **outcome,
        )
        await self._record(call, by_site)
        return outcome
