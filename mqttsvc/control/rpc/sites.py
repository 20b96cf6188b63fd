"""
The control plane's site methods: configuration, status and operator
actions.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.task import deferLater
from twisted.logger import Logger

from mqttsvc.cluster.commands import Command
from mqttsvc.config import (
    ConfigError,
    OfflinePolicy,
    SiteConfig,
    TlsSettings,
    default_topics,
    topics_from_params,
)
from mqttsvc.control.rpc import paging
from mqttsvc.control.rpc.actions import OperatorActions
from mqttsvc.control.rpc.cluster import member_json
from mqttsvc.control.rpc.dispatcher import (
    CONFLICT,
    NOT_FOUND,
    Call,
    Method,
    Param,
    RPCError,
    invalid_params,
)
from mqttsvc.db.live import Published
from mqttsvc.db.pages import Page, iso
from mqttsvc.db.sites import CONFIG_COLUMNS, SiteExists, SiteRow
from mqttsvc.db.store import Store
from mqttsvc.ingest.writer import WriterLanes
from mqttsvc.mqtt.probe import ConnectionTests
from mqttsvc.runtime.descriptors import DescriptorBudget
from mqttsvc.sites.site import SiteService
from mqttsvc.sites.states import STATUSES
from mqttsvc.sites.supervisor import SiteSupervisor, idle_status

#: Seconds C{site.restart} (or C{site.start}) of a site owned by another
#: instance waits for the owner to publish the site's status after acting.
COMMAND_WAIT = 2.0
#: Seconds between two looks at the owner's published status meanwhile.
_COMMAND_POLL = 0.05


class SiteMethods:
    """
    The site methods, over the store and the supervisor they drive.

    In a cluster (C{clustered}) they answer for every site, owned here or
    not: the status of a site another instance runs is the one its owner
    published (L{mqttsvc.cluster.publisher}), and a restart is sent to the
    owner (L{mqttsvc.cluster.commands}).  Every site status says which
    instance it comes from (C{instance}, C{null} when no instance runs
    the site) and, when it was published by another, when
    (C{published_at}).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: Store,
        supervisor: SiteSupervisor,
        connection_tests: ConnectionTests,
        descriptors: DescriptorBudget | None = None,
        *,
        writer: WriterLanes,
        instance: str = "local",
        clustered: bool = False,
    ) -> None:
        self._reactor = reactor
        self._store = store
        self._instance = instance
        self._clustered = clustered
        self._writer = writer
        self._supervisor = supervisor
        self._connection_tests = connection_tests
        self._descriptors = descriptors
        self._actions = OperatorActions(store.events)

    def methods(self) -> list[Method]:
        site_id = Param("site_id", "string", description="The site's identifier.")
        settings = (
            Param("port", "integer", required=False, description="Broker port (1883)."),
            Param("username", "string", required=False, nullable=True),
            Param("password", "string", required=False, nullable=True, description="Write-only."),
            Param(
                "client_id_prefix",
                "string",
                required=False,
                description="Client id is {prefix}_{instance}_{site_id} (prefix 'mqttsvc'); "
                "with --cluster {prefix}_{site_id}.",
            ),
            Param("is_enabled", "boolean", required=False),
            Param("protocol", "string", required=False, description="'3.1.1' or '5'."),
            Param("keepalive", "integer", required=False, description="Seconds, 5-3600."),
            Param(
                "topics",
                "array",
                required=False,
                description="Subscriptions: objects with topic (a pattern), kind and qos.",
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
            Param(
                "tls",
                "object",
                required=False,
                nullable=True,
                description="TLS to the broker: {ca_certs, certfile, keyfile, insecure} (paths "
                "on mqttsvc's host); {} for the system CAs; null for plain MQTT.",
            ),
            Param(
                "max_devices",
                "integer",
                required=False,
                nullable=True,
                description="Devices the site may have (a new device id past it is a dead "
                "letter); null for the service's --max-devices.",
            ),
        )
        host = Param("host", "string", description="The site broker's host name or IP.")
        return [
            Method(
                "service.status",
                self.service_status,
                summary="Counts of sites by connection status.",
            ),
            Method(
                "site.list",
                self.site_list,
                (
                    Param(
                        "status",
                        "string",
                        required=False,
                        nullable=True,
                        description="Only the sites in this status: " + ", ".join(STATUSES) + ".",
                    ),
                    paging.cursor_param(),
                    paging.limit_param(paging.MAX_SITE_LIMIT),
                ),
                summary="A page of the sites, in site id order, with their status.",
                result=paging.PAGE_SCHEMA,
            ),
            Method("site.get", self.site_get, (site_id,), summary="A site's configuration."),
            Method(
                "site.create",
                self.site_create,
                (site_id, host, *settings),
                summary="Create a site; an enabled site connects at once.",
            ),
            Method(
                "site.update",
                self.site_update,
                (site_id, attrs.evolve(host, required=False), *settings),
                summary="Change a site's settings; it reconnects or resubscribes as needed.",
            ),
            Method(
                "site.delete",
                self.site_delete,
                (site_id,),
                summary="Delete a site (its devices, readings and history stay).",
            ),
            Method(
                "site.status", self.site_status, (site_id,), summary="A site's connection status."
            ),
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
                "site.test",
                self.site_test,
                (host, *(p for p in settings if p.name in _TEST_SETTINGS)),
                summary="Try to connect with these settings, without saving anything.",
            ),
        ]

    async def _row(self, site_id: str) -> SiteRow:
        row = await self._store.sites.get(site_id)
        if row is None:
            raise _not_found(site_id)
        return row

    def live_status(self, site_id: str) -> dict[str, Any] | None:
        """
        The C{site.status} of a site running here; C{None} if it does not.
        """
        return running_status(self._supervisor, self._writer, self._instance, site_id)

    def _here(self, status: dict[str, Any]) -> dict[str, Any]:
        return {**status, "instance": self._instance, "published_at": None}

    async def _statuses_published(self) -> dict[str, Published]:
        return await self._store.live.current() if self._clustered else {}

    def _status(self, row: SiteRow, published: Published | None = None) -> dict[str, Any]:
        config = row.config
        site = self._supervisor.site(config.site_id)
        if site is not None:
            # The running service knows more recent truth than the row,
            # which the batch writer may not have updated yet.
            return self._here(
                _live_status(site, config, row.config_error, self._write_problem(config.site_id))
            )
        if published is not None:
            return _from_owner(published)
        counters = self._supervisor.counters(config.site_id)
        return {
            "site_id": config.site_id,
            "status": idle_status(row.status),
            "is_enabled": config.is_enabled,
            "last_connected_at": iso(row.last_connected_at),
            "mqtt_retry_count": row.retry_count,
            "mqtt_next_retry": iso(row.next_retry),
            "topics_list": [t.topic for t in config.topics],
            "last_error": row.last_error,
            "config_error": row.config_error,
            "state": "stopped",
            "state_since": iso(row.updated_at),
            "subscriptions": [],
            "messages_received": counters.messages_received,
            "messages_rejected": counters.messages_rejected,
            "last_message_at": iso(counters.last_message_at),
            "instance": None,
            "published_at": None,
        }

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
            "tls": None if c.tls is None else c.tls.as_settings(),
            "max_devices": c.max_devices,
            "created_at": iso(row.created_at),
            "updated_at": iso(row.updated_at),
            "config_error": row.config_error,
        }

    async def service_status(self, call: Call) -> dict[str, Any]:
        # File descriptors: a site needs one; see mqttsvc.runtime.descriptors.
        extra = {} if self._descriptors is None else {"descriptors": self._descriptors.report()}
        if self._clustered:
            # Every site, each as the instance that runs it says, and the
            # live instances.
            members = await self._store.leases.instances()
            cluster = {
                "instance": self._instance,
                "instances": [member_json(m) for m in members],
            }
            return {**await self._counts(await self._statuses_published()), **cluster, **extra}
        if self._supervisor.loaded:
            # The supervisor keeps the counts as statuses change: at a
            # thousand sites even reading two columns of every row was too
            # slow for a call that monitoring makes often.
            return {"state": "RUNNING", **self._supervisor.status_counts(), **extra}
        return {**await self._counts({}), **extra}

    async def _counts(self, published: dict[str, Published]) -> dict[str, Any]:
        """
        How many sites are in each status: a site running here as it is,
        one another instance runs as it C{published}, any other as its row.
        """
        stored = await self._store.sites.statuses()
        counts = dict.fromkeys(STATUSES, 0)
        for site_id, status in stored:
            site = self._supervisor.site(site_id)
            if site is not None:
                now = site.state.status
            elif site_id in published:
                now = published[site_id].status
            else:
                now = idle_status(status)
            if now in counts:
                counts[now] += 1
        return {"state": "RUNNING", "total": len(stored), **counts}

    def _can_store(self, config: SiteConfig) -> None:
        if config.password is not None and self._store.secrets is None:
            raise invalid_params(
                "password",
                "cannot be stored: mqttsvc runs without --secret-key-file. Start it with one "
                "(see docs/security.md), or leave the password out.",
            )

    async def site_create(self, call: Call) -> dict[str, Any]:
        config = _site_config(call.params, None)
        self._can_store(config)
        try:
            row = await self._store.sites.create(config)
        except SiteExists:
            raise RPCError(
                CONFLICT, f"Site already exists: {config.site_id}", {"site_id": config.site_id}
            ) from None
        self.log.info(
            "site {site_id} created by {caller} (enabled: {enabled})",
            site_id=config.site_id,
            caller=call.caller,
            enabled=config.is_enabled,
        )
        await self._actions.record(call, config.site_id, enabled=config.is_enabled)
        await self._supervisor.reconcile(config.site_id)
        return {**self._config(row), "status": self._status(row)}

    async def site_update(self, call: Call) -> dict[str, Any]:
        current = await self._row(call.params["site_id"])
        config = _site_config(call.params, current.config)
        self._can_store(config)
        row = await self._store.sites.update(config, config.topics != current.config.topics)
        if row is None:
            raise _not_found(config.site_id)
        changed = sorted(k for k in call.params if k != "site_id")
        self.log.info(
            "site {site_id} updated by {caller}: {fields}",
            site_id=config.site_id,
            caller=call.caller,
            fields=", ".join(changed),
        )
        await self._actions.record(call, config.site_id, fields=changed)
        await self._supervisor.reconcile(config.site_id)
        return {**self._config(row), "status": await self._settled_status(config.site_id)}

    async def site_delete(self, call: Call) -> dict[str, Any]:
        site_id: str = call.params["site_id"]
        if not await self._store.sites.delete(site_id):
            raise _not_found(site_id)
        self.log.info("site {site_id} deleted by {caller}", site_id=site_id, caller=call.caller)
        await self._actions.record(call, site_id)
        await self._supervisor.reconcile(site_id)
        return {"site_id": site_id, "deleted": True}

    async def site_test(self, call: Call) -> dict[str, Any]:
        p = call.params
        params = {"site_id": "connection-test", **p, "topics": []}
        config = _site_config(params, None)
        outcome = await self._connection_tests.probe(config)
        self.log.info(
            "connection test of {host}:{port} by {caller}: {outcome}",
            host=config.host,
            port=config.port,
            caller=call.caller,
            outcome=outcome["error"] or "ok",
        )
        return outcome

    async def site_get(self, call: Call) -> dict[str, Any]:
        return self._config(await self._row(call.params["site_id"]))

    async def site_list(self, call: Call) -> dict[str, Any]:
        wanted: str | None = call.params.get("status")
        if wanted is not None and wanted not in STATUSES:
            raise invalid_params("status", f"must be one of {', '.join(STATUSES)}")
        after = paging.decode(call, "site")
        limit = paging.limit(call, paging.MAX_SITE_LIMIT)
        # The status filter is the live status, which only this process
        # knows: read the sites a page at a time and keep those in it.
        found: list[dict[str, Any]] = []
        more = True
        published = await self._statuses_published()
        while more and len(found) <= limit:
            rows = await self._store.sites.page(None if after is None else after[0], limit + 1)
            more = len(rows) > limit
            for row in rows:
                status = self._status(row, published.get(row.config.site_id))
                if wanted is None or status["status"] == wanted:
                    found.append({**self._config(row), "status": status})
            if rows:
                after = (rows[-1].config.site_id,)
        kept = found[:limit]
        return paging.answer(
            "site",
            Page(kept, (kept[-1]["site_id"],) if kept else None, len(found) > limit),
        )

    async def site_status(self, call: Call) -> dict[str, Any]:
        return await self._site_status(call.params["site_id"])

    async def _site_status(self, site_id: str) -> dict[str, Any]:
        live = self.live_status(site_id)
        if live is not None:
            return live
        if self._clustered:
            published = await self._store.live.of(site_id)
            if published is not None:
                return _from_owner(published)
        return self._status(await self._row(site_id))

    def _write_problem(self, site_id: str) -> str | None:
        return self._writer.problem(site_id)

    async def _set_enabled(self, call: Call, enabled: bool) -> str:
        site_id: str = call.params["site_id"]
        found = await self._store.sites.set_enabled(site_id, enabled)
        if not found:
            raise _not_found(site_id)
        self.log.info(
            "{method} {site_id} by {caller}",
            method=call.method,
            site_id=site_id,
            caller=call.caller,
        )
        await self._actions.record(call, site_id)
        return site_id

    async def _settled_status(self, site_id: str) -> dict[str, Any]:
        # The row's status columns are written by the batch writer; wait for
        # it so that what we return and what the row says agree.
        await self._writer.when_idle()
        return self._status(await self._row(site_id))

    async def site_start(self, call: Call) -> dict[str, Any]:
        site_id = await self._set_enabled(call, True)
        site = self._supervisor.site(site_id)
        if site is not None and site.state.state in ("waiting", "error"):
            site.restart()
        elif site is None and self._clustered:
            published = await self._store.live.of(site_id)
            if published is not None and published.live.get("state") in ("waiting", "error"):
                return await self._restart_at_owner(site_id)
            await self._supervisor.reconcile(site_id)
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
        elif self._clustered:
            return await self._restart_at_owner(site_id)
        else:
            await self._supervisor.reconcile(site_id)
        return await self._settled_status(site_id)

    async def _restart_at_owner(self, site_id: str) -> dict[str, Any]:
        """
        Restart a site another instance runs: send its owner the command,
        then answer with the status the owner publishes after acting on
        it (C{"command"} says to whom it went and whether it was seen to
        act within L{COMMAND_WAIT} seconds).  A site that nobody owns yet
        (just enabled) is started by whoever acquires it.
        """
        owner = await self._store.live.owner(site_id)
        if owner is None or owner == self._instance:
            await self._supervisor.reconcile(site_id)
            return await self._settled_status(site_id)
        before = await self._store.live.of(site_id)
        await self._store.live.send(Command(owner, site_id, "restart").payload())
        waited = 0.0
        while waited < COMMAND_WAIT:
            await deferLater(self._reactor, _COMMAND_POLL, lambda: None)
            waited += _COMMAND_POLL
            now = await self._store.live.of(site_id)
            if now is not None and (before is None or now.published_at > before.published_at):
                return {**_from_owner(now), "command": {"sent_to": owner, "acted": True}}
        status = await self._site_status(site_id)
        return {**status, "command": {"sent_to": owner, "acted": False}}


def _not_found(site_id: str) -> RPCError:
    return RPCError(NOT_FOUND, f"Site not found: {site_id}", {"site_id": site_id})


#: The settings that site.test takes.
_TEST_SETTINGS = frozenset({"port", "username", "password", "protocol", "keepalive", "tls"})

#: Parameters of site.create and site.update that map one to one onto
#: L{SiteConfig} fields (the stored offline policy is two columns, one field).
_PLAIN_FIELDS = tuple(
    c for c in CONFIG_COLUMNS if c not in ("device_intervals", "offline_grace", "tls")
)


def _site_config(params: dict[str, Any], base: SiteConfig | None) -> SiteConfig:
    """
    A site's configuration from C{site.create} / C{site.update} params: the
    given fields over C{base} (or over the defaults for a new site).

    @raise RPCError: -32602 naming the invalid field.
    """
    site_id = params["site_id"]
    try:
        values = {name: params[name] for name in _PLAIN_FIELDS if name in params}
        if "topics" in params:
            values["topics"] = topics_from_params(site_id, params["topics"])
        elif base is None:
            values["topics"] = default_topics(site_id)
        if "device_intervals" in params or "offline_grace" in params or base is None:
            values["offline"] = OfflinePolicy.from_settings(
                params["device_intervals"]
                if "device_intervals" in params
                else (base.offline.overrides() if base else None),
                params["offline_grace"]
                if "offline_grace" in params
                else (base.offline.grace if base else None),
            )
        if "tls" in params:
            values["tls"] = TlsSettings.from_settings(params["tls"])
        if base is None:
            return SiteConfig(site_id=site_id, **values)
        return attrs.evolve(base, **values)
    except ConfigError as e:
        raise invalid_params(e.field, e.message) from None


def running_status(
    supervisor: SiteSupervisor, writer: WriterLanes, instance: str, site_id: str
) -> dict[str, Any] | None:
    """
    The C{site.status} of a site running in this instance, all from memory
    (what a cluster member publishes for the others); C{None} if it does
    not run here.
    """
    site = supervisor.site(site_id)
    if site is None:
        return None
    # config_error comes from the row the supervisor started it with.
    try:
        config_error = supervisor.config_error(site_id)
    except KeyError:
        return None
    status = _live_status(site, site.config, config_error, writer.problem(site_id))
    return {**status, "instance": instance, "published_at": None}


def _from_owner(published: Published) -> dict[str, Any]:
    """
    The C{site.status} of a site another instance runs, as it published it.
    """
    return {
        **published.live,
        "instance": published.instance,
        "published_at": iso(published.published_at),
    }


def _live_status(
    site: SiteService, config: SiteConfig, config_error: str | None, write_problem: str | None
) -> dict[str, Any]:
    """
    The C{site.status} of a running site, from its service; a write lane
    that cannot commit the site's messages is its C{last_error} when the
    link itself has none.
    """
    live = site.state
    return {
        "site_id": config.site_id,
        "status": live.status,
        "is_enabled": config.is_enabled,
        "last_connected_at": iso(live.last_connected_at),
        "mqtt_retry_count": live.retry_count,
        "mqtt_next_retry": iso(live.next_retry),
        "topics_list": [t.topic for t in config.topics],
        "last_error": live.last_error or write_problem,
        "config_error": config_error,
        "state": live.state,
        "state_since": iso(live.since),
        "subscriptions": [
            {"topic": r.topic, "granted": r.granted, "reason": r.reason} for r in live.subscriptions
        ],
        "messages_received": site.messages_received,
        "messages_rejected": site.messages_rejected,
        "last_message_at": iso(site.last_message_at),
    }
