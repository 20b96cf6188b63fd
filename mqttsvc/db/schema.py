"""
Database connection strings and schema migrations.

The service accepts a libpq connection string in either form
(C{host=127.0.0.1 dbname=mqttsvc} or C{postgresql://user@host/db}); this
module validates it and applies the versioned SQL migrations under
C{mqttsvc/db/migrations} with yoyo-migrations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import psycopg2
import psycopg2.extensions

from mqttsvc.config import ConfigError
from mqttsvc.db.secrets import SecretError, Secrets, is_encrypted

MIGRATION_TABLE = "mqttsvc_migration"


def parse_dsn(dsn: str) -> dict[str, str]:
    """
    Check a libpq connection string and return its parameters.

    @raise ConfigError: naming C{db} when the string is malformed.
    """
    if not dsn or not dsn.strip():
        raise ConfigError("db", "no database given (use --db or MQTTSVC_DB)")
    try:
        return psycopg2.extensions.parse_dsn(dsn)
    except psycopg2.ProgrammingError as e:
        raise ConfigError("db", f"malformed connection string: {_first_line(e)}") from None


def describe(dsn: str) -> str:
    """
    A printable description of a database (never the password).
    """
    params = parse_dsn(dsn)
    host = params.get("host", "(default socket)")
    port = params.get("port", "5432")
    return f"{params.get('dbname', '(default database)')} on {host}:{port}"


def check_connection(dsn: str, timeout: int = 5) -> None:
    """
    Connect once, synchronously, to prove that the database is reachable.

    Only for start-up, before the reactor runs, and for the command line.

    @raise ConfigError: naming C{db} with libpq's reason.
    """
    parse_dsn(dsn)
    try:
        conn = psycopg2.connect(dsn, connect_timeout=timeout)
    except psycopg2.Error as e:
        raise ConfigError("db", f"cannot connect to {describe(dsn)}: {_first_line(e)}") from None
    conn.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _backend(dsn: str) -> Any:
    from yoyo.backends import get_backend_class
    from yoyo.connections import DatabaseURI

    params = parse_dsn(dsn)
    dbname = params.pop("dbname", None)
    uri = DatabaseURI(
        scheme="postgresql",
        username=None,
        password=None,
        hostname=None,
        port=None,
        database=dbname,
        args=params,
    )
    backend = get_backend_class("postgresql")(uri, MIGRATION_TABLE)
    backend.init_database()
    return backend


def _migrations() -> Any:
    from yoyo import read_migrations

    with resources.as_file(resources.files("mqttsvc.db") / "migrations") as path:
        return read_migrations(str(path))


def migrate(dsn: str) -> list[str]:
    """
    Apply every migration that the database has not had yet, under yoyo's
    lock so that two processes starting together do not race.

    Blocking: call it from the command line or before the reactor runs.

    @return: the identifiers of the migrations applied.
    """
    check_connection(dsn)
    migrations = _migrations()
    backend = _backend(dsn)
    try:
        with backend.lock():
            pending = backend.to_apply(migrations)
            backend.apply_migrations(pending)
        return [m.id for m in pending]
    finally:
        backend.connection.close()


def pending_migrations(dsn: str) -> list[str]:
    """
    The identifiers of migrations not yet applied (blocking, like L{migrate}).
    """
    migrations = _migrations()
    backend = _backend(dsn)
    try:
        return [m.id for m in backend.to_apply(migrations)]
    finally:
        backend.connection.close()


def check_secrets(dsn: str, secrets: Secrets | None) -> None:
    """
    Prove at start-up that the key decrypts every stored password, and
    encrypt any password that someone stored in plain text (blocking).

    @raise ConfigError: naming C{secret-key-file} when passwords are stored
        but no key was given, or the key does not fit.
    """
    with _stored_passwords(dsn) as (stored, store):
        if stored and secrets is None:
            raise ConfigError(
                "secret-key-file",
                f"{len(stored)} sites have stored passwords (first: {stored[0][0]}); "
                "start with --secret-key-file",
            )
        for site_id, password in stored:
            assert secrets is not None
            if not is_encrypted(password):
                store(site_id, secrets.encrypt(password))
                continue
            try:
                secrets.decrypt(password)
            except SecretError:
                raise ConfigError(
                    "secret-key-file",
                    f"the key does not decrypt the password of site {site_id} "
                    "(a wrong key, or one rotated without mqttsvc rotate-key?)",
                ) from None


def rotate_key(dsn: str, old: Secrets, new: Secrets) -> int:
    """
    Re-encrypt every stored password from the old key to the new one, in
    one transaction (blocking; for the command line).

    @return: how many passwords were re-encrypted.
    @raise SecretError: when the old key does not decrypt one (nothing is
        changed then).
    """
    with _stored_passwords(dsn) as (stored, store):
        for site_id, password in stored:
            try:
                plaintext = old.decrypt(password)
            except SecretError:
                raise SecretError(
                    f"the old key does not decrypt the password of site {site_id}"
                ) from None
            store(site_id, new.encrypt(plaintext))
        return len(stored)


@contextmanager
def _stored_passwords(
    dsn: str,
) -> Iterator[tuple[list[tuple[str, str]], Callable[[str, str], None]]]:
    """
    In one transaction (blocking), committed when the block ends and rolled
    back when it raises: every stored password by site id, locked, and
    what stores a new (encrypted) one for a site.
    """
    conn = psycopg2.connect(dsn, connect_timeout=5)
    try:
        with conn, conn.cursor() as cur:
            cur.execute(
                "SELECT site_id, password FROM mqtt_connection WHERE password IS NOT NULL "
                "ORDER BY site_id FOR UPDATE"
            )

            def store(site_id: str, encrypted: str) -> None:
                cur.execute(
                    "UPDATE mqtt_connection SET password = %s WHERE site_id = %s",
                    (encrypted, site_id),
                )

            yield cur.fetchall(), store
    finally:
        conn.close()
