"""
A small pool of txpostgres connections that replaces dead ones.

txpostgres runs one query at a time per connection and its own
C{ConnectionPool} never replaces a connection that the server dropped.  This
pool hands out idle connections in turn, opens them lazily, and throws a
connection away when a query fails with a connection-level error, so that
the next query gets a fresh one once the database is back.  An idle
connection that the server closes (C{pg_terminate_backend}, a restart) is
noticed as soon as its socket says so, and dropped; a read that still meets
a dead connection is tried once more on a fresh one.  Connection-level
failures leave the pool as L{DatabaseUnavailable}, whatever psycopg2 raised.

txpostgres' C{reconnection.DeadConnectionDetector} is not used: it revives
one long-lived connection in place, retrying forever on its own timers
(against the global reactor unless given one) even when nobody needs the
database.  A pool does better to forget a dead connection and open a new
one on the next use; the listeners, which hold one connection for good,
reconnect on their own terms (L{mqttsvc.db.notifications}).
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


class _PooledConnection(txpostgres.Connection):
    """
    A txpostgres connection that tells its pool when the server closes it
    while it is idle.  Left to txpostgres, the error surfaces from the
    reactor as an "Unhandled Error" traceback and the dead connection stays
    in the pool until a caller meets it.
    """

    def __init__(
        self, reactor: Any, cooperator: Cooperator, died: Callable[[Any, BaseException], None]
    ) -> None:
        super().__init__(reactor=reactor, cooperator=cooperator)
        self._died = died

    def doRead(self) -> None:
        try:
            super().doRead()
        except Exception as e:
            if not is_connection_error(e):
                raise
            self._died(self, e)

    def connectionLost(self, reason: Any) -> None:
        super().connectionLost(reason)
        self._died(self, reason.value)


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

    async def _acquire(self, fresh: bool) -> tuple[txpostgres.Connection, bool]:
        """
        An idle connection (unless C{fresh}) or a new one, and whether it
        was idle.
        """
        if self._idle and not fresh:
            return self._idle.popleft(), True
        conn = _PooledConnection(self._reactor, self._cooperator, self._idle_died)
        try:
            await conn.connect(self._dsn)
        except Exception as e:
            raise DatabaseUnavailable(_first_line(e)) from e
        self._all.add(conn)
        return conn, False

    def _idle_died(self, conn: txpostgres.Connection, error: BaseException) -> None:
        if conn not in self._idle:
            # In use (the caller hears of it) or already let go.
            return
        self._idle.remove(conn)
        self.log.info(
            "the database closed an idle connection ({error}); a new one opens when needed",
            error=_first_line(error),
        )
        self._discard(conn)

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

    async def run(
        self, work: Callable[[txpostgres.Connection], Awaitable[T]], retry: bool = False
    ) -> T:
        """
        Run C{work} with a connection of its own.

        @param retry: whether C{work} may run twice (it only reads): when an
            idle connection turns out to be dead, it runs once more on a
            fresh one.
        @raise DatabaseUnavailable: when no connection could be opened, or
            the connection broke.
        """
        if self._closed:
            raise DatabaseUnavailable("the connection pool is closed")
        await self._slots.acquire()
        try:
            fresh = False
            while True:
                conn, reused = await self._acquire(fresh)
                broken = False
                try:
                    return await work(conn)
                except BaseException as e:
                    broken = is_connection_error(e)
                    if not broken:
                        raise
                    if retry and reused and not self._closed:
                        self.log.info(
                            "a pooled connection was dead ({error}); reading again on a new one",
                            error=_first_line(e),
                        )
                        fresh = True
                        continue
                    if isinstance(e, DatabaseUnavailable):
                        raise
                    raise DatabaseUnavailable(_first_line(e)) from e
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

        # Only a plain read may run twice: a DELETE ... RETURNING that did
        # its work before the connection broke would answer "nothing" the
        # second time.
        return await self.run(work, retry=sql.lstrip()[:6].upper() == "SELECT")

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

    async def ping(self) -> None:
        """
        One round trip to the database, to prove that it answers.
        """
        await self.query("SELECT 1")

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
