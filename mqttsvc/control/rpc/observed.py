"""
The control plane's read side: devices, readings, discovered topics,
events, and the dead letters (which can also be replayed or purged).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from twisted.logger import Logger

from mqttsvc.config import SiteConfig
from mqttsvc.control.rpc import paging
from mqttsvc.control.rpc.actions import OperatorActions
from mqttsvc.control.rpc.dispatcher import Call, Method, Param, invalid_params
from mqttsvc.db.dead_letters import Judge, StoredLetter
from mqttsvc.db.readings import READING_ORDERS
from mqttsvc.db.store import Store
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
    What the service has observed, read back through the store's
    repositories.
    """

    log = Logger()

    def __init__(self, store: Store) -> None:
        self._store = store
        self._actions = OperatorActions(store.events)

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
        page = await self._store.devices.page(
            call.params["site_id"],
            _one_of(call, "kind", KINDS),
            _one_of(call, "status", DEVICE_STATUSES),
            after,
            paging.limit(call),
        )
        return paging.answer("device", page)

    async def device_counts(self, call: Call) -> list[dict[str, Any]]:
        return await self._store.devices.counts(call.params.get("site_id"))

    async def _record(self, call: Call, ids_by_site: dict[str, dict[str, list[int]]]) -> None:
        """
        Publish the action as one C{operator} event per site it touched
        (none after the first that cannot be recorded).
        """
        for site_id, ids in sorted(ids_by_site.items()):
            if not await self._actions.record(call, site_id, **ids):
                return

    async def reading_list(self, call: Call) -> dict[str, Any]:
        """
        In receive order, the answer always has a C{next_cursor} once any
        reading was seen: a poller keeps it and asks again later for the
        readings received since (a page shorter than the limit means it
        has caught up).
        """
        order = _one_of(call, "order", tuple(READING_ORDERS)) or "ts"
        tag = f"reading.{order}"
        page = await self._store.readings.series(
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
        page = await self._store.topics.page(
            call.params["site_id"],
            call.params.get("prefix"),
            None if after is None else after[0],
            paging.limit(call),
        )
        return paging.answer("topic", page)

    async def event_list(self, call: Call) -> dict[str, Any]:
        page = await self._store.events.history(
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
        page = await self._store.dead_letters.page(
            call.params.get("site_id"),
            _time(call, "since"),
            _time(call, "until"),
            None if after is None else after[0],
            paging.limit(call),
        )
        return paging.answer("deadletter", page)

    async def deadletter_purge(self, call: Call) -> dict[str, Any]:
        purged = await self._store.dead_letters.purge(_ids(call))
        count = sum(len(ids) for ids in purged.values())
        self.log.info("{count} dead letters purged by {caller}", count=count, caller=call.caller)
        await self._record(call, {site_id: {"ids": ids} for site_id, ids in purged.items()})
        return {"purged": count}

    async def deadletter_replay(self, call: Call) -> dict[str, Any]:
        """
        Replayed messages are old: they add readings (received at their
        original time) but say nothing about whether a device is alive now,
        and were already counted as topics when they first arrived.
        """
        wanted = _ids(call)
        sites = {row.config.site_id: row.config for row in await self._store.sites.all()}
        replayed = await self._store.dead_letters.replay(wanted, _replay_judge(sites))
        outcome = {"replayed": replayed.replayed, "dead_again": replayed.dead_again}
        self.log.info(
            "dead letters replayed by {caller}: {replayed} written, {dead_again} still dead",
            caller=call.caller,
            **outcome,
        )
        await self._record(call, replayed.by_site)
        return outcome


def _replay_judge(sites: dict[str, SiteConfig]) -> Judge:
    """
    Whether a dead letter passes now, with its site's current
    configuration: the readings it makes, or why it is still dead.
    """

    def judge(letter: StoredLetter) -> list[Reading] | str:
        config = sites.get(letter.site_id)
        if config is None:
            return f"site {letter.site_id} no longer exists"
        if not letter.whole:
            # What is kept is not the message: never guess at the rest.
            return "cannot be replayed: only part of its payload or topic was kept"
        result = process(
            letter.site_id, Router(config.topics), letter.topic, letter.payload, letter.received_at
        )
        dead = [e for e in result if isinstance(e, DeadLetter)]
        if dead:
            return dead[0].reason
        return [e for e in result if isinstance(e, Reading)]

    return judge
