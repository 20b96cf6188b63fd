"""
The database pool against a real PostgreSQL whose backends are terminated
under it (issue 15, item 3): dead idle connections are noticed and
replaced, a read is retried once on a fresh connection, and a broken
connection is reported as L{DatabaseUnavailable}, never as psycopg2's own
error (which the RPC answered with -32603 and a traceback).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg2
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import ILogObserver, LogLevel, globalLogPublisher
from zope.interface import implementer

from mqttsvc.db.pool import ConnectionPool, DatabaseUnavailable
from tests.waiting import eventually


def terminate(dsn: str, pids: list[int]) -> None:
    """Terminate the backends and wait until each has exited (PostgreSQL 14+)."""
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            for pid in pids:
                cur.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
                assert cur.fetchone() == (True,)
    finally:
        conn.close()


@implementer(ILogObserver)
class Errors:
    """Every error, critical or failure log event while it is installed."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        if event.get("log_level") in (LogLevel.error, LogLevel.critical) or "log_failure" in event:
            self.events.append(event)


@pytest.fixture
def errors() -> Iterator[Errors]:
    observer = Errors()
    globalLogPublisher.addObserver(observer)
    yield observer
    globalLogPublisher.removeObserver(observer)


async def backend_pids(pool: ConnectionPool, count: int) -> list[int]:
    """Open C{count} connections at once; their backends' pids."""
    rows = await gatherResults(
        [
            Deferred.fromCoroutine(pool.query("SELECT pg_backend_pid() FROM pg_sleep(0.05)"))
            for _ in range(count)
        ]
    )
    pids = sorted({r[0][0] for r in rows})
    assert len(pids) == count and pool.open_connections == count
    return pids


@pytest_twisted.ensureDeferred
async def test_idle_connections_terminated_are_noticed_and_replaced(
    db_dsn: str, errors: Errors
) -> None:
    """
    Three idle connections killed by pg_terminate_backend leave the pool
    without waiting for a caller to meet them; nothing is logged as an
    error (txpostgres alone logs an Unhandled Error traceback); the next
    read simply works on a new connection.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=3)
    try:
        pids = await backend_pids(pool, 3)
        terminate(db_dsn, pids)
        await eventually(lambda: pool.open_connections == 0, within=5, what="dead ones dropped")
        [(pid,)] = await pool.query("SELECT pg_backend_pid()")
        assert pid not in pids
        assert errors.events == []
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_a_read_on_a_dead_connection_is_tried_again_on_a_fresh_one(
    db_dsn: str, errors: Errors
) -> None:
    """
    A read that takes an idle connection the server has just closed (before
    the reactor could notice) runs again on a new connection and answers.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    try:
        [pid] = await backend_pids(pool, 1)
        # Blocking on purpose: the reactor gets no turn between the two.
        terminate(db_dsn, [pid])
        [(new,)] = await pool.query("SELECT pg_backend_pid()")
        assert new != pid
        assert pool.open_connections == 1
        assert errors.events == []
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_a_write_on_a_dead_connection_is_database_unavailable(db_dsn: str) -> None:
    """
    A write is not run twice; its broken connection is reported as
    DatabaseUnavailable (the RPC's -32003), and the next call works.
    """
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    try:
        [pid] = await backend_pids(pool, 1)
        terminate(db_dsn, [pid])
        with pytest.raises(DatabaseUnavailable):
            await pool.operation("CREATE TEMPORARY TABLE never (x int)")
        assert pool.open_connections == 0
        assert await pool.query("SELECT 1") == [(1,)]
    finally:
        pool.close()


@pytest_twisted.ensureDeferred
async def test_no_database_is_database_unavailable() -> None:
    """Nothing listening: DatabaseUnavailable, with no second attempt to hide it."""
    from twisted.internet import reactor

    from tests.conftest import free_port

    pool = ConnectionPool(reactor, f"host=127.0.0.1 port={free_port()} user=postgres", size=1)
    try:
        with pytest.raises(DatabaseUnavailable):
            await pool.query("SELECT 1")
    finally:
        pool.close()
