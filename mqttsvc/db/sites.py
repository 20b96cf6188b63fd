"""
The sites repository: each site's configuration and subscriptions
(C{mqtt_connection}, C{mqtt_topic}) and the status its last run recorded,
as the supervisor loads them and the control plane creates, changes and
lists them.  Passwords are stored encrypted (L{mqttsvc.db.secrets}).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

import attrs
from psycopg2.extras import Json
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
from mqttsvc.records import ResumeState


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


class Sites:
    """
    The sites, read and changed through C{pool}; C{secrets} encrypts and
    decrypts their passwords (None: no password can be stored).
    """

    log = Logger()

    def __init__(self, pool: ConnectionPool, secrets: Secrets | None) -> None:
        self._pool = pool
        self._secrets = secrets

    async def get(self, site_id: str) -> SiteRow | None:
        """
        The site C{site_id}, or None when there is none.
        """
        rows = await self._pool.query(
            f"SELECT {_SITE_COLUMNS} FROM mqtt_connection c WHERE c.site_id = %s", (site_id,)
        )
        return self._rows(rows)[0] if rows else None

    async def all(self) -> list[SiteRow]:
        """
        Every site, in site id order.
        """
        rows = await self._pool.query(
            f"SELECT {_SITE_COLUMNS} FROM mqtt_connection c ORDER BY c.site_id"
        )
        return self._rows(rows)

    async def page(self, after: str | None, limit: int) -> list[SiteRow]:
        """
        Up to C{limit} sites in site id order, those after the id C{after}.
        """
        rows = await self._pool.query(
            f"SELECT {_SITE_COLUMNS} FROM mqtt_connection c"
            " WHERE %(a)s::text IS NULL OR c.site_id > %(a)s ORDER BY c.site_id LIMIT %(n)s",
            {"a": after, "n": limit},
        )
        return self._rows(rows)

    def _rows(self, rows: list[tuple[Any, ...]]) -> list[SiteRow]:
        sites = [_site_row(r, self._secrets) for r in rows]
        # A password written in plain text by SQL is encrypted at once.
        plain = [(r[0], r[4]) for r in rows if r[4] is not None and not is_encrypted(r[4])]
        if plain and self._secrets is not None:
            Deferred.fromCoroutine(self._encrypt_plain(plain)).addErrback(
                lambda f: self.log.warn(
                    "encrypting stored passwords failed: {error}", error=f.getErrorMessage()
                )
            )
        return sites

    async def _encrypt_plain(self, plain: list[tuple[str, str]]) -> None:
        assert self._secrets is not None
        for site_id, password in plain:
            await self._pool.operation(
                "UPDATE mqtt_connection SET password = %s WHERE site_id = %s AND password = %s",
                (self._secrets.encrypt(password), site_id, password),
            )
            self.log.warn(
                "site {site_id} had its password stored in plain text; it is encrypted now",
                site_id=site_id,
            )

    async def statuses(self) -> list[tuple[str, str]]:
        """
        Every site's id and stored status, and nothing else (cheap).
        """
        rows = await self._pool.query("SELECT site_id, status FROM mqtt_connection ORDER BY 1")
        return [(site_id, status) for site_id, status in rows]

    async def create(self, config: SiteConfig) -> SiteRow:
        """
        Insert a site and its subscriptions in one transaction.

        @raise SiteExists: when the site id is taken.
        """

        async def insert(cursor: Any) -> None:
            await cursor.execute(
                f"INSERT INTO mqtt_connection (site_id, {', '.join(CONFIG_COLUMNS)}) "
                f"VALUES (%s, {', '.join(['%s'] * len(CONFIG_COLUMNS))}) "
                "ON CONFLICT (site_id) DO NOTHING RETURNING id",
                (config.site_id, *_config_values(config, self._secrets)),
            )
            inserted = cursor.fetchall()
            if not inserted:
                raise SiteExists(config.site_id)
            await _insert_topics(cursor, inserted[0][0], config)

        await self._pool.transaction(insert)
        return await self._must_get(config.site_id)

    async def update(self, config: SiteConfig, topics_changed: bool) -> SiteRow | None:
        """
        Replace a site's configuration (and its subscriptions when they
        changed) in one transaction.

        @return: the new row, or None when the site does not exist.
        """

        async def update(cursor: Any) -> bool:
            await cursor.execute(
                f"UPDATE mqtt_connection SET ({', '.join(CONFIG_COLUMNS)}) = "
                f"({', '.join(['%s'] * len(CONFIG_COLUMNS))}) WHERE site_id = %s RETURNING id",
                (*_config_values(config, self._secrets), config.site_id),
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

        if not await self._pool.transaction(update):
            return None
        return await self._must_get(config.site_id)

    async def delete(self, site_id: str) -> bool:
        """
        Delete a site and its subscriptions (its devices, readings and
        history stay).

        @return: whether it existed.
        """
        rows = await self._pool.query(
            "DELETE FROM mqtt_connection WHERE site_id = %s RETURNING id", (site_id,)
        )
        return bool(rows)

    async def _must_get(self, site_id: str) -> SiteRow:
        site = await self.get(site_id)
        assert site is not None, f"site {site_id} vanished"
        return site

    async def set_enabled(self, site_id: str, enabled: bool) -> bool:
        """
        Enable or disable a site.

        @return: whether the site exists.
        """
        rows = await self._pool.query(
            "UPDATE mqtt_connection SET is_enabled = %s WHERE site_id = %s RETURNING id",
            (enabled, site_id),
        )
        return bool(rows)
