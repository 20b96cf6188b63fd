"""
The control plane's JSON-RPC methods.

Each method is declared with its parameters (checked by the dispatcher)
and implemented on L{ControlPlane}, which owns the store and the site
supervisor it drives.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from twisted.logger import Logger

from mqttsvc.config import ConfigError, OfflinePolicy, SiteConfig, topics_from_params
from mqttsvc.pool import DatabaseUnavailable
from mqttsvc.rpc.dispatcher import (
    CONFLICT,
    NOT_FOUND,
    UNAVAILABLE,
    Call,
    Method,
    Param,
    RPCError,
    invalid_params,
)
from mqttsvc.store import SiteExists, SiteRow, Store
from mqttsvc.supervisor import SiteSupervisor

STATUSES = ("connected", "connecting", "disconnected", "error")


def iso(value: datetime | None) -> str | None:
    """
    An ISO 8601 UTC timestamp (naive values are taken as UTC), or None.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


class ControlPlane:
    """
    The methods the backend calls, over the store and the supervisor.
    """

    log = Logger()

    def __init__(self, store: Store, supervisor: SiteSupervisor) -> None:
        self._store = store
        self._supervisor = supervisor

    def methods(self) -> list[Method]:
        site_id = Param("site_id", "string", description="The site's identifier.")
        return [
            Method(
                "service.status",
                self.service_status,
                summary="Counts of sites by connection status.",
            ),
            Method(
                "site.create",
                self.site_create,
                (
                    site_id,
                    Param("host", "string", description="The site broker's host name or IP."),
                    Param("port", "integer", required=False),
                    Param("username", "string", required=False, nullable=True),
                    Param("password", "string", required=False, nullable=True),
                    Param("client_id_prefix", "string", required=False),
                    Param("is_enabled", "boolean", required=False),
                    Param("protocol", "string", required=False, description="3.1.1 or 5"),
                    Param("keepalive", "integer", required=False),
                    Param(
                        "topics",
                        "array",
                        required=False,
                        description="Subscriptions: objects with topic, kind and qos.",
                    ),
                    Param(
                        "status_topic",
                        "string",
                        required=False,
                        nullable=True,
                        description="Retained online/offline (birth and last will) topic.",
                    ),
                    Param(
                        "device_intervals",
                        "object",
                        required=False,
                        nullable=True,
                        description="Expected seconds between messages per device kind, "
                        "e.g. {gateway: 30}.",
                    ),
                    Param(
                        "offline_grace",
                        "number",
                        required=False,
                        nullable=True,
                        description="Silent intervals before a device is offline (default 2.5).",
                    ),
                ),
                summary="Create a site; an enabled site connects at once.",
            ),
            Method("site.get", self.site_get, (site_id,), summary="A site's configuration."),
            Method(
                "site.start",
                self.site_start,
                (site_id,),
                summary="Enable a site and connect it now; returns its status.",
            ),
            Method(
                "site.stop",
                self.site_stop,
                (site_id,),
                summary="Disable a site and disconnect it cleanly; returns its status.",
            ),
            Method(
                "site.restart",
                self.site_restart,
                (site_id,),
                summary="Enable a site, reset its retry count and reconnect now.",
            ),
            Method(
                "event.list",
                self.event_list,
                (
                    Param("site_id", "string", required=False, nullable=True),
                    Param("since", "string", required=False, nullable=True),
                    Param("limit", "integer", required=False),
                ),
                summary="Connection events, oldest first, after `since` (ISO 8601).",
            ),
            Method("site.list", self.site_list, summary="Every site with its status."),
            Method(
                "site.status", self.site_status, (site_id,), summary="A site's connection status."
            ),
        ]

    async def _row(self, site_id: str) -> SiteRow:
        try:
            row = await self._store.get_site(site_id)
        except DatabaseUnavailable as e:
            raise _unavailable(e) from None
        if row is None:
            raise RPCError(NOT_FOUND, f"Site not found: {site_id}", {"site_id": site_id})
        return row

    def _status(self, row: SiteRow) -> dict[str, Any]:
        config = row.config
        result: dict[str, Any] = {
            "site_id": config.site_id,
            "status": row.status,
            "is_enabled": config.is_enabled,
            "last_connected_at": iso(row.last_connected_at),
            "mqtt_retry_count": row.retry_count,
            "mqtt_next_retry": iso(row.next_retry),
            "topics_list": [t.topic for t in config.topics],
            "last_error": row.last_error,
            "state": "stopped",
            "state_since": iso(row.updated_at),
            "subscriptions": [],
            "messages_received": 0,
            "messages_rejected": 0,
            "last_message_at": None,
        }
        site = self._supervisor.site(config.site_id)
        if site is not None:
            # The running service knows more recent truth than the row,
            # which the batch writer may not have updated yet.
            live = site.state
            result.update(
                status=live.status,
                last_connected_at=iso(live.last_connected_at),
                mqtt_retry_count=live.retry_count,
                mqtt_next_retry=iso(live.next_retry),
                last_error=live.last_error,
                state=live.state,
                state_since=iso(live.since),
                subscriptions=[
                    {"topic": r.topic, "granted": r.granted, "reason": r.reason}
                    for r in live.subscriptions
                ],
                messages_received=site.messages_received,
                messages_rejected=site.messages_rejected,
                last_message_at=iso(site.last_message_at),
            )
        elif row.status != "error":
            result["status"] = "disconnected"
        return result

    @staticmethod
    def _config(row: SiteRow) -> dict[str, Any]:
        c = row.config
        return {
            "site_id": c.site_id,
            "host": c.host,
            "port": c.port,
            "username": c.username,
            "has_password": c.password is not None,
            "client_id_prefix": c.client_id_prefix,
            "is_enabled": c.is_enabled,
            "protocol": c.protocol,
            "keepalive": c.keepalive,
            "topics": [{"topic": t.topic, "kind": t.kind, "qos": t.qos} for t in c.topics],
            "status_topic": c.status_topic,
            "device_intervals": {
                kind: c.offline.interval(kind) for kind in ("gateway", "datalogger", "sensor")
            },
            "offline_grace": c.offline.grace,
            "created_at": iso(row.created_at),
            "updated_at": iso(row.updated_at),
        }

    async def service_status(self, call: Call) -> dict[str, Any]:
        try:
            rows = await self._store.list_sites()
        except DatabaseUnavailable as e:
            raise _unavailable(e) from None
        counts = dict.fromkeys(STATUSES, 0)
        for row in rows:
            counts[self._status(row)["status"]] += 1
        return {"state": "RUNNING", "total": len(rows), **counts}

    async def site_create(self, call: Call) -> dict[str, Any]:
        p = call.params
        try:
            config = SiteConfig(
                site_id=p["site_id"],
                host=p["host"],
                port=p.get("port", 1883),
                username=p.get("username"),
                password=p.get("password"),
                client_id_prefix=p.get("client_id_prefix", "mqttsvc-"),
                is_enabled=p.get("is_enabled", True),
                protocol=p.get("protocol", "3.1.1"),
                keepalive=p.get("keepalive", 60),
                topics=topics_from_params(p["site_id"], p.get("topics")),
                status_topic=p.get("status_topic"),
                offline=OfflinePolicy.from_settings(
                    p.get("device_intervals"), p.get("offline_grace")
                ),
            )
        except ConfigError as e:
            raise invalid_params(e.field, e.message) from None
        try:
            row = await self._store.create_site(config)
        except SiteExists:
            raise RPCError(
                CONFLICT, f"Site already exists: {config.site_id}", {"site_id": config.site_id}
            ) from None
        except DatabaseUnavailable as e:
            raise _unavailable(e) from None
        self.log.info(
            "site {site_id} created by {caller} (enabled: {enabled})",
            site_id=config.site_id,
            caller=call.caller,
            enabled=config.is_enabled,
        )
        if config.is_enabled:
            await self._supervisor.reconcile(config.site_id)
        return {**self._config(row), "status": self._status(row)}

    async def site_get(self, call: Call) -> dict[str, Any]:
        return self._config(await self._row(call.params["site_id"]))

    async def site_list(self, call: Call) -> list[dict[str, Any]]:
        try:
            rows = await self._store.list_sites()
        except DatabaseUnavailable as e:
            raise _unavailable(e) from None
        return [{**self._config(row), "status": self._status(row)} for row in rows]

    async def site_status(self, call: Call) -> dict[str, Any]:
        return self._status(await self._row(call.params["site_id"]))

    async def _set_enabled(self, call: Call, enabled: bool) -> str:
        site_id: str = call.params["site_id"]
        try:
            found = await self._store.set_enabled(site_id, enabled)
        except DatabaseUnavailable as e:
            raise _unavailable(e) from None
        if not found:
            raise RPCError(NOT_FOUND, f"Site not found: {site_id}", {"site_id": site_id})
        self.log.info(
            "{method} {site_id} by {caller}",
            method=call.method,
            site_id=site_id,
            caller=call.caller,
        )
        return site_id

    async def _settled_status(self, site_id: str) -> dict[str, Any]:
        # The row's status columns are written by the batch writer; wait for
        # it so that what we return and what the row says agree.
        await self._store.writer.whenIdle()
        return self._status(await self._row(site_id))

    async def site_start(self, call: Call) -> dict[str, Any]:
        site_id = await self._set_enabled(call, True)
        site = self._supervisor.site(site_id)
        if site is not None and site.state.state in ("waiting", "error"):
            site.restart()
        else:
            await self._supervisor.reconcile(site_id)
        return await self._settled_status(site_id)

    async def site_stop(self, call: Call) -> dict[str, Any]:
        site_id = await self._set_enabled(call, False)
        await self._supervisor.reconcile(site_id)
        return await self._settled_status(site_id)

    async def site_restart(self, call: Call) -> dict[str, Any]:
        site_id = await self._set_enabled(call, True)
        site = self._supervisor.site(site_id)
        if site is not None:
            site.restart()
        else:
            await self._supervisor.reconcile(site_id)
        return await self._settled_status(site_id)

    async def event_list(self, call: Call) -> list[dict[str, Any]]:
        p = call.params
        since = None
        if p.get("since") is not None:
            try:
                since = datetime.fromisoformat(p["since"].replace("Z", "+00:00"))
            except ValueError:
                raise invalid_params("since", "must be an ISO 8601 timestamp") from None
        limit = p.get("limit", 100)
        if not 1 <= limit <= 1000:
            raise invalid_params("limit", "must be from 1 to 1000")
        try:
            rows = await self._store.list_events(p.get("site_id"), since, limit)
        except DatabaseUnavailable as e:
            raise _unavailable(e) from None
        return [
            {
                "id": r.id,
                "type": "connection",
                "site_id": r.site_id,
                "at": iso(r.at),
                "data": {"from": r.from_state, "to": r.to_state, "reason": r.reason},
            }
            for r in rows
        ]


def _unavailable(e: Exception) -> RPCError:
    return RPCError(UNAVAILABLE, "Database unavailable; try again shortly", {"reason": str(e)})
