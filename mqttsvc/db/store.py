"""
The store: everything mqttsvc reads from and writes to PostgreSQL.

It owns two connection pools: C{write_pool}, which the ingest writer's
lanes write through (message effects and connection status, one batch at a
time per lane, one connection per lane), and C{pool} for the control
plane's reads and writes, so that a burst of RPC calls never delays a
commit that MQTT acknowledgements wait for.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import attrs
from psycopg2.extras import Json
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from mqttsvc.config import (
    DEFAULT_GRACE,
    MAX_DEVICES_LIMIT,
    ConfigError,
    OfflinePolicy,
    SiteConfig,
    TlsSettings,
    TopicSubscription,
)
from mqttsvc.db.pool import ConnectionPool
from mqttsvc.db.secrets import SecretError, Secrets, is_encrypted
from mqttsvc.events.hub import record_service_event
from mqttsvc.records import DeviceKey, ResumeState


class SiteExists(Exception):
    """
    A site with this id already exists.
    """


@attrs.frozen
class SiteRow:
    """
    A site as stored: its configuration and its last recorded status.
    """

    config: SiteConfig
    status: str
    last_connected_at: datetime | None
    retry_count: int
    next_retry: datetime | None
    last_error: str | None
    created_at: datetime
    updated_at: datetime
    #: What in the stored configuration was invalid and is being ignored.
    config_error: str | None = None

    def resume_state(self) -> ResumeState:
        """
        What a site service needs to carry on where the last run stopped.
        """
        return ResumeState(
            status=self.status,
            retry_count=self.retry_count,
            next_retry=self.next_retry,
            last_error=self.last_error,
            last_connected_at=self.last_connected_at,
        )


_SITE_COLUMNS = """
    c.site_id, c.host, c.port, c.username, c.password, c.client_id_prefix, c.is_enabled,
    c.protocol, c.keepalive, c.status_topic, c.device_intervals, c.offline_grace, c.tls,
    c.max_devices, c.status, c.last_connected_at, c.mqtt_retry_count,
    c.mqtt_next_retry, c.last_error, c.created_at, c.updated_at,
    COALESCE(
        (SELECT array_agg(ARRAY[t.topic, t.kind, t.qos::text] ORDER BY t.id)
         FROM mqtt_topic t WHERE t.connection_id = c.id),
        ARRAY[]::text[][]
    )
"""


def _site_row(row: tuple[Any, ...], secrets: Secrets | None) -> SiteRow:
    (
        site_id, host, port, username, password, prefix, enabled, protocol, keepalive,
        status_topic, device_intervals, offline_grace, tls, max_devices, status, last_connected_at,
        retry_count, next_retry, last_error, created, updated, topics,
    ) = row  # fmt: skip
    # A row written by SQL may hold what the API would have refused. Keep
    # the site usable and say what was wrong rather than fail every call.
    problems = []
    subscriptions = []
    for topic, kind, qos in topics:
        try:
            subscriptions.append(TopicSubscription(topic, kind, int(qos)))
        except ConfigError as e:
            problems.append(f"topic {topic!r} ({kind}) ignored: {e.message}")
    try:
        offline = OfflinePolicy.from_settings(device_intervals, offline_grace)
    except ConfigError as e:
        problems.append(f"{e.field} ignored: {e.message}")
        offline = OfflinePolicy()
    try:
        tls_settings = TlsSettings.from_settings(tls)
    except ConfigError as e:
        problems.append(f"{e.field} invalid, TLS settings ignored: {e.message}")
        tls_settings = None
    if max_devices is not None and not 1 <= max_devices <= MAX_DEVICES_LIMIT:
        problems.append(f"max_devices ignored: must be an integer from 1 to {MAX_DEVICES_LIMIT}")
        max_devices = None
    if password is not None and is_encrypted(password):
        try:
            if secrets is None:
                raise SecretError("mqttsvc runs without --secret-key-file")
            password = secrets.decrypt(password)
        except SecretError as e:
            problems.append(f"password cannot be decrypted ({e}); connecting without it")
            password = None
    config = SiteConfig(
        site_id=site_id,
        host=host,
        port=port,
        username=username,
        password=password,
        client_id_prefix=prefix,
        is_enabled=enabled,
        protocol=protocol,
        keepalive=keepalive,
        topics=tuple(subscriptions),
        status_topic=status_topic,
        offline=offline,
        tls=tls_settings,
        max_devices=max_devices,
    )
    return SiteRow(
        config=config,
        status=status,
        last_connected_at=last_connected_at,
        retry_count=retry_count,
        next_retry=next_retry,
        last_error=last_error,
        created_at=created,
        updated_at=updated,
        config_error="; ".join(problems) or None,
    )


#: Devices read per query when the known devices are loaded at start.
DEVICE_PAGE = 20_000

#: Per device table (its name is the device kind): the gateway id column
#: (dataloggers only) and the device id column.
_DEVICE_COLUMNS = (
    ("gateway", "NULL", "gateway_id"),
    ("datalogger", "gateway_id", "datalogger_id"),
    ("sensor", "NULL", "sensor_id"),
)


#: The configuration columns of mqtt_connection (beside site_id), in the
#: order of L{_config_values}.
CONFIG_COLUMNS = (
    "host",
    "port",
    "username",
    "password",
    "client_id_prefix",
    "is_enabled",
    "protocol",
    "keepalive",
    "status_topic",
    "device_intervals",
    "offline_grace",
    "tls",
    "max_devices",
)


def _config_values(config: SiteConfig, secrets: Secrets | None) -> tuple[Any, ...]:
    overrides = config.offline.overrides()
    password = None
    if config.password is not None:
        if secrets is None:
            raise ConfigError(
                "password",
                "mqttsvc runs without --secret-key-file, so it cannot store passwords",
            )
        password = secrets.encrypt(config.password)
    return (
        config.host,
        config.port,
        config.username,
        password,
        config.client_id_prefix,
        config.is_enabled,
        config.protocol,
        config.keepalive,
        config.status_topic,
        Json(overrides) if overrides else None,
        None if config.offline.grace == DEFAULT_GRACE else config.offline.grace,
        None if config.tls is None else Json(config.tls.as_settings()),
        config.max_devices,
    )


async def _insert_topics(cursor: Any, connection_id: int, config: SiteConfig) -> None:
    if config.topics:
        await cursor.execute(
            "INSERT INTO mqtt_topic (connection_id, topic, kind, qos) "
            "SELECT %s, * FROM unnest(%s::text[], %s::text[], %s::smallint[])",
            (
                connection_id,
                [t.topic for t in config.topics],
                [t.kind for t in config.topics],
                [t.qos for t in config.topics],
            ),
        )


class Store(Service):
    """
    The database side of mqttsvc, as a service: started first, stopped
    last (after the ingest writer has written what it holds), when it
    closes its pools.

    @param reactor: drives the txpostgres connections.
    @param dsn: a libpq connection string.
    @param write_connections: the size of C{write_pool}.
    """

    log = Logger()
    name = "store"

    def __init__(
        self,
        reactor: Any,
        dsn: str,
        rpc_connections: int = 3,
        secrets: Secrets | None = None,
        write_connections: int = 2,
    ) -> None:
        self.secrets = secrets
        self.pool = ConnectionPool(reactor, dsn, size=rpc_connections)
        self.write_pool = ConnectionPool(reactor, dsn, size=write_connections)

    def write_lane_stalled(self, lane: int, seconds: float, error: str, recovered: bool) -> None:
        """
        A write lane has committed nothing for a while (C{error} is why), or
        commits again: say so as a C{service} event.  When the database is
        what is gone the first cannot be written, but the second says it
        all: how long, and why.
        """
        problem = "write_lane_recovered" if recovered else "write_lane_stalled"
        recorded = Deferred.fromCoroutine(
            record_service_event(
                self.pool, problem, lane=lane, seconds=round(seconds, 1), error=error
            )
        )
        recorded.addErrback(
            lambda f: self.log.warn(
                "could not record the {problem} event: {error}",
                problem=problem,
                error=f.getErrorMessage(),
            )
        )

    def device_limit_reached(self, site_id: str, limit: int, device: DeviceKey) -> None:
        """
        A site refused its first device for its limit: say so as a
        C{service} event of the site (C{device_limit_reached}, with the
        limit and the refused device), which also raises an alert.
        """
        recorded = Deferred.fromCoroutine(
            record_service_event(
                self.pool,
                "device_limit_reached",
                site_id,
                limit=limit,
                kind=device.kind,
                device_id=device.device_id,
                gateway_id=device.gateway_id,
            )
        )
        recorded.addErrback(
            lambda f: self.log.warn(
                "could not record that site {site_id} reached its device limit: {error}",
                site_id=site_id,
                error=f.getErrorMessage(),
            )
        )

    def stopService(self) -> None:
        super().stopService()
        # The ingest writer has stopped before us, having written what it
        # could.
        self.pool.close()
        self.write_pool.close()

    async def get_site(self, site_id: str) -> SiteRow | None:
        rows = await self.pool.query(
            f"SELECT {_SITE_COLUMNS} FROM mqtt_connection c WHERE c.site_id = %s", (site_id,)
        )
        return self._rows(rows)[0] if rows else None

    async def list_sites(self) -> list[SiteRow]:
        rows = await self.pool.query(
            f"SELECT {_SITE_COLUMNS} FROM mqtt_connection c ORDER BY c.site_id"
        )
        return self._rows(rows)

    async def site_page(self, after: str | None, limit: int) -> list[SiteRow]:
        """
        Up to C{limit} sites in site id order, those after the id C{after}.
        """
        rows = await self.pool.query(
            f"SELECT {_SITE_COLUMNS} FROM mqtt_connection c"
            " WHERE %(a)s::text IS NULL OR c.site_id > %(a)s ORDER BY c.site_id LIMIT %(n)s",
            {"a": after, "n": limit},
        )
        return self._rows(rows)

    def _rows(self, rows: list[tuple[Any, ...]]) -> list[SiteRow]:
        sites = [_site_row(r, self.secrets) for r in rows]
        # A password written in plain text by SQL is encrypted at once.
        plain = [(r[0], r[4]) for r in rows if r[4] is not None and not is_encrypted(r[4])]
        if plain and self.secrets is not None:
            Deferred.fromCoroutine(self._encrypt_plain(plain)).addErrback(
                lambda f: self.log.warn(
                    "encrypting stored passwords failed: {error}", error=f.getErrorMessage()
                )
            )
        return sites

    async def _encrypt_plain(self, plain: list[tuple[str, str]]) -> None:
        assert self.secrets is not None
        for site_id, password in plain:
            await self.pool.operation(
                "UPDATE mqtt_connection SET password = %s WHERE site_id = %s AND password = %s",
                (self.secrets.encrypt(password), site_id, password),
            )
            self.log.warn(
                "site {site_id} had its password stored in plain text; it is encrypted now",
                site_id=site_id,
            )

    async def site_statuses(self) -> list[tuple[str, str]]:
        """
        Every site's id and stored status, and nothing else (cheap).
        """
        rows = await self.pool.query("SELECT site_id, status FROM mqtt_connection ORDER BY 1")
        return [(site_id, status) for site_id, status in rows]

    async def create_site(self, config: SiteConfig) -> SiteRow:
        """
        Insert a site and its subscriptions in one transaction.

        @raise SiteExists: when the site id is taken.
        """

        async def insert(cursor: Any) -> None:
            await cursor.execute(
                f"INSERT INTO mqtt_connection (site_id, {', '.join(CONFIG_COLUMNS)}) "
                f"VALUES (%s, {', '.join(['%s'] * len(CONFIG_COLUMNS))}) "
                "ON CONFLICT (site_id) DO NOTHING RETURNING id",
                (config.site_id, *_config_values(config, self.secrets)),
            )
            inserted = cursor.fetchall()
            if not inserted:
                raise SiteExists(config.site_id)
            await _insert_topics(cursor, inserted[0][0], config)

        await self.pool.transaction(insert)
        return await self._must_get(config.site_id)

    async def update_site(self, config: SiteConfig, topics_changed: bool) -> SiteRow | None:
        """
        Replace a site's configuration (and its subscriptions when they
        changed) in one transaction.

        @return: the new row, or None when the site does not exist.
        """

        async def update(cursor: Any) -> bool:
            await cursor.execute(
                f"UPDATE mqtt_connection SET ({', '.join(CONFIG_COLUMNS)}) = "
                f"({', '.join(['%s'] * len(CONFIG_COLUMNS))}) WHERE site_id = %s RETURNING id",
                (*_config_values(config, self.secrets), config.site_id),
            )
            updated = cursor.fetchall()
            if not updated:
                return False
            if topics_changed:
                await cursor.execute(
                    "DELETE FROM mqtt_topic WHERE connection_id = %s", (updated[0][0],)
                )
                await _insert_topics(cursor, updated[0][0], config)
            return True

        if not await self.pool.transaction(update):
            return None
        return await self._must_get(config.site_id)

    async def delete_site(self, site_id: str) -> bool:
        """
        Delete a site and its subscriptions (its devices, readings and
        history stay).

        @return: whether it existed.
        """
        rows = await self.pool.query(
            "DELETE FROM mqtt_connection WHERE site_id = %s RETURNING id", (site_id,)
        )
        return bool(rows)

    async def _must_get(self, site_id: str) -> SiteRow:
        site = await self.get_site(site_id)
        assert site is not None, f"site {site_id} vanished"
        return site

    async def set_enabled(self, site_id: str, enabled: bool) -> bool:
        """
        Enable or disable a site.

        @return: whether the site exists.
        """
        rows = await self.pool.query(
            "UPDATE mqtt_connection SET is_enabled = %s WHERE site_id = %s RETURNING id",
            (enabled, site_id),
        )
        return bool(rows)

    async def device_pages(
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
        for kind, gateway, device in _DEVICE_COLUMNS:
            after = 0
            while True:
                rows = await self.pool.query(
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
