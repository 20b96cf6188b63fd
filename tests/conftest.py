"""
Shared fixtures: a real PostgreSQL database created for the test run and
dropped after it, the machine's Mosquitto, and private Mosquitto brokers
for tests that need to stop one (the servers themselves are
L{bench.servers}, which the benchmarks share).

The reactor is imported inside fixtures, never at module level, so that
pytest-twisted installs it first.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg2
import pytest
import pytest_twisted

from bench.servers import Mosquitto, ScratchDatabase
from bench.servers import free_port as free_port  # many tests import it from here

# A deadline on every test, asynchronous fixture and teardown.
pytest_plugins = ["tests.deadline"]

PG_HOST = os.environ.get("MQTTSVC_TEST_PGHOST", "127.0.0.1")
PG_PORT = os.environ.get("MQTTSVC_TEST_PGPORT", "5432")
PG_USER = os.environ.get("MQTTSVC_TEST_PGUSER", "postgres")
BROKER_HOST = os.environ.get("MQTTSVC_TEST_BROKER_HOST", "127.0.0.1")
BROKER_PORT = int(os.environ.get("MQTTSVC_TEST_BROKER_PORT", "1883"))


def admin_dsn(dbname: str = "postgres") -> str:
    """
    The test server's DSN for database C{dbname} (by default the one a
    user connects to first, to create others).
    """
    return f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname={dbname}"


@pytest.fixture(scope="session")
def db_dsn() -> Iterator[str]:
    """
    A migrated database of its own for this test run, dropped at the end.
    """
    with scratch_database(f"mqttsvc_test_{os.getpid()}") as dsn:
        yield dsn


@contextmanager
def scratch_database(prefix: str) -> Iterator[str]:
    """
    A new migrated database named after C{prefix}, dropped on leaving.
    """
    with ScratchDatabase(admin_dsn(), f"{prefix}_{uuid.uuid4().hex[:6]}") as scratch:
        yield scratch.dsn


@pytest.fixture
def sql(db_dsn: str) -> Iterator[psycopg2.extensions.connection]:
    """
    A blocking connection for assertions (autocommit, so that every query
    sees what the service committed).
    """
    conn = psycopg2.connect(db_dsn)
    conn.autocommit = True
    yield conn
    conn.close()


@pytest.fixture
def no_sites(db_dsn: str) -> None:
    """
    Start from a database without sites, so that a service started by the
    test runs only the sites the test creates.
    """
    conn = psycopg2.connect(db_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM mqtt_connection")
    conn.close()


@pytest.fixture
def site_id() -> str:
    """
    A site id no other test uses, so tests share the database safely.
    """
    return f"t{uuid.uuid4().hex[:10]}"


@pytest_twisted.async_yield_fixture
async def running(db_dsn: str, no_sites: None) -> AsyncIterator[Any]:
    """
    The service tree as C{twistd mqttsvc} builds it, on the test's
    database (without sites), stopped after the test.
    """
    from twisted.internet import reactor

    # Imported here: it imports treq, which must not install a reactor
    # before pytest-twisted has chosen one.
    from tests.service import RunningService

    service = RunningService(reactor, db_dsn)
    await service.start()
    yield service
    await service.stop()


class PrivateBroker(Mosquitto):
    """
    A Mosquitto of our own on a free port (L{bench.servers.Mosquitto}),
    which a test may stop and start: persistent, so that it keeps its
    sessions' queues across a stop, and queueing without limit for a slow
    subscriber, as mqttsvc's brokers should be configured (Mosquitto's
    default drops after 1000).

    @param extra_config: more C{mosquitto.conf} lines (TLS, a password file).
    @param anonymous: whether clients may connect without a user name.
    """

    def __init__(self, directory: Path, extra_config: str = "", anonymous: bool = True) -> None:
        settings = {
            "persistence": "true",
            "persistence_location": f"{directory}/",
            "allow_anonymous": "true" if anonymous else "false",
            "max_queued_messages": "0",
        }
        super().__init__(directory, settings, extra_config)


@pytest.fixture
def private_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """
    A started L{PrivateBroker}, stopped after the test.
    """
    broker = PrivateBroker(tmp_path)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture
def password_broker(tmp_path: Path) -> Iterator[PrivateBroker]:
    """
    A private Mosquitto that accepts only user C{reader} with password
    C{right-password}.
    """
    passwords = tmp_path / "passwords"
    subprocess.run(
        ["mosquitto_passwd", "-b", "-c", str(passwords), "reader", "right-password"],
        check=True,
        capture_output=True,
    )
    broker = PrivateBroker(tmp_path, f"password_file {passwords}\n", anonymous=False)
    broker.start()
    yield broker
    broker.stop()


@pytest.fixture(scope="module")
def mqttsvc_service(db_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """
    One real C{twistd mqttsvc} (L{tests.twistd_process.TwistdService}) for a
    test module, started on the test database without sites and stopped
    with SIGTERM after the module's last test.  Tests create sites with ids
    of their own (the L{site_id} fixture).
    """
    from tests.twistd_process import TwistdService

    conn = psycopg2.connect(db_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("DELETE FROM mqtt_connection")
    conn.close()
    service = TwistdService(db_dsn, tmp_path_factory.mktemp("twistd"))
    service.start()
    try:
        yield service
    finally:
        service.stop()
