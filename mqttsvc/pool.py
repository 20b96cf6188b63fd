"""
A small pool of txpostgres connections that replaces dead ones.

txpostgres runs one query at a time per connection and its own
C{ConnectionPool} never replaces a connection that the server dropped.  This
pool hands out idle connections in turn, opens them lazily, and throws a
connection away when a query fails with a connection-level error, so that
the next query gets a fresh one once the database is back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import psycopg2
from twisted.internet.defer import Deferred, DeferredSemaphore
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from txpostgres import txpostgres

T = TypeVar("T")

#: psycopg2 errors that mean the connection itself is unusable.
CONNECTION_ERRORS = (psycopg2.OperationalError, psycopg2.InterfaceError)


class DatabaseUnavailable(Exception):
    """
    The database could not be reached (or the connection to it broke).
    """


def is_connection_error(e: BaseException) -> bool:
    """
    Whether an error means that the connection broke rather than that the
    statement was wrong.
    """
    if isinstance(e, DatabaseUnavailable | txpostgres.RollbackFailed):
        return True
    if isinstance(e, psycopg2.Error) and e.pgcode is not None:
        # Class 08 is "connection exception"; 57P01-57P03 are shutdowns.
        return e.pgcode.startswith("08") or e.pgcode in ("57P01", "57P02", "57P03")
    return isinstance(e, CONNECTION_ERRORS)


def is_rejection(e: BaseException) -> bool:
    """
    Whether a statement failed for the data in it, so that writing the
    same rows again cannot succeed: the database refused it (a data
    exception, an integrity violation, a program limit such as an index
    row too large), or it could not even be sent (psycopg2 raises
    C{UnicodeEncodeError} for a lone surrogate and C{ValueError} for a NUL
    in text; building the statement's literals raises the like).  Anything
    else is worth retrying.
    """
    if isinstance(e, psycopg2.Error):
        return e.pgcode is not None and e.pgcode[:2] in ("22", "23", "54")
    return isinstance(e, ValueError | TypeError | ArithmeticError)


class ConnectionPool:
    """
    Up to C{size} txpostgres connections to one database.

    @param reactor: the reactor the connections are driven by.
    @param dsn: a libpq connection string (use an IP address or a socket
        path: libpq resolves host names synchronously).
    """

    log = Logger()

    def __init__(self, reactor: Any, dsn: str, size: int = 3) -> None:
        self._reactor = reactor
        self._dsn = dsn
        self._idle: deque[txpostgres.Connection] = deque()
        self._open = 0
        self._size = size
        self._slots = DeferredSemaphore(size)
        self._cooperator = Cooperator(scheduler=lambda f: reactor.callLater(0, f), started=True)
        self._closed = False
        self._all: set[txpostgres.Connection] = set()

    async def _acquire(self) -> txpostgres.Connection:
        if self._idle:
            return self._idle.popleft()
        conn = txpostgres.Connection(reactor=self._reactor, cooperator=self._cooperator)
        try:
            await conn.connect(self._dsn)
        except Exception as e:
            raise DatabaseUnavailable(_first_line(e)) from e
        self._all.add(conn)
        return conn

    def _release(self, conn: txpostgres.Connection, broken: bool) -> None:
        if broken or self._closed:
            self._discard(conn)
        else:
            self._idle.append(conn)

    def _discard(self, conn: txpostgres.Connection) -> None:
        self._all.discard(conn)
        try:
            conn.close()
        except Exception:
            # Already closed underneath us: nothing left to release.
            pass

    async def run(self, work: Callable[[txpostgres.Connection], Awaitable[T]]) -> T:
        """
        Run C{work} with a connection of its own.

        @raise DatabaseUnavailable: when no connection could be opened.
        """
        if self._closed:
            raise DatabaseUnavailable("the connection pool is closed")
        await self._slots.acquire()
        try:
            conn = await self._acquire()
            broken = False
            try:
                return await work(conn)
            except BaseException as e:
                broken = is_connection_error(e)
                raise
            finally:
                self._release(conn, broken)
        finally:
            self._slots.release()

    async def query(self, sql: str, params: Any = None) -> list[tuple[Any, ...]]:
        """
        Run one statement that returns rows.
        """

        async def work(conn: txpostgres.Connection) -> list[tuple[Any, ...]]:
            rows: list[tuple[Any, ...]] = await conn.runQuery(sql, params)
            return rows

        return await self.run(work)

    async def operation(self, sql: str, params: Any = None) -> None:
        """
        Run one statement that returns nothing.
        """

        async def work(conn: txpostgres.Connection) -> None:
            await conn.runOperation(sql, params)

        await self.run(work)

    async def transaction(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """
        Run C{work(cursor)} in one transaction: committed when it returns,
        rolled back when it raises.
        """

        async def interact(conn: txpostgres.Connection) -> T:
            result: T = await conn.runInteraction(
                lambda cursor: Deferred.fromCoroutine(_as_coroutine(work(cursor)))
            )
            return result

        return await self.run(interact)

    def close(self) -> None:
        """
        Close every connection; later calls fail with L{DatabaseUnavailable}.
        """
        self._closed = True
        while self._idle:
            self._discard(self._idle.popleft())

    @property
    def open_connections(self) -> int:
        return len(self._all)


async def _as_coroutine(awaitable: Awaitable[T]) -> T:
    return await awaitable


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
