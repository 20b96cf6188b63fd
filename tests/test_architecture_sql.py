"""
All SQL lives in the database package (C{mqttsvc.db}), behind methods named
for what they mean: no other module of mqttsvc holds a string that reads as
SQL, runs a statement on a connection, cursor or pool, or imports a
PostgreSQL driver.  An AST scan, so that comments and docstrings may still
speak of C{NOTIFY} or C{SELECT} while code may not.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mqttsvc"
DATABASE = PACKAGE / "db"

#: What reads as SQL in a string constant (or in the literal parts of an
#: f-string).  Upper case only, as SQL is written here: prose that says
#: "select" or "update" is not SQL.
SQL = re.compile(
    r"\bSELECT\s+\S[\s\S]*?\bFROM\b"
    r"|\bSELECT\s+(?:\d|\*|pg_|now\(|count\(|EXISTS\b)"
    r"|\bINSERT\s+INTO\b"
    r"|\bUPDATE\s+\w+(?:\s+AS\s+\w+)?\s+SET\b"
    r"|\bDELETE\s+FROM\b"
    r"|\b(?:UN)?LISTEN\s+\w"
    r"|\bNOTIFY\s+\w"
    r"|\b(?:CREATE|ALTER|DROP|TRUNCATE)\s+(?:TABLE|INDEX|TRIGGER|FUNCTION|SCHEMA|DATABASE)\b"
    r"|\bpg_\w+\s*\("
)

#: Methods that run a statement: txpostgres' connection and pool, a DB-API
#: cursor.
RUNNERS = frozenset(
    {"runQuery", "runOperation", "runInteraction", "execute", "executemany", "callproc"}
)

#: Methods of L{mqttsvc.db.pool.ConnectionPool} that run a statement, when
#: called on something named as a pool.
POOL_RUNNERS = frozenset({"query", "operation", "transaction", "run"})

#: Drivers that only the database package may import.
DRIVERS = ("psycopg2", "txpostgres")


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if DATABASE not in p.parents)


def _docstrings(tree: ast.AST) -> set[int]:
    """
    The ids of the docstring nodes in C{tree}.
    """
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
            and node.body
        ):
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _name(node: ast.AST) -> str:
    """
    The last name of an expression (C{pool} of C{self._store.pool}), or "".
    """
    if isinstance(node, ast.Attribute):
        return node.attr
    if isinstance(node, ast.Name):
        return node.id
    return ""


def _findings(source: str) -> Iterator[tuple[int, str, str]]:
    """
    Every SQL string, statement run and driver import in C{source}: its
    line, the function it is in ("" at module level) and what it is.
    """
    tree = ast.parse(source)
    docstrings = _docstrings(tree)
    enclosing: dict[int, str] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                enclosing.setdefault(id(inner), node.name)
    for node in ast.walk(tree):
        where = enclosing.get(id(node), "")
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings
            and SQL.search(node.value)
        ):
            yield node.lineno, where, f"SQL string {node.value[:60]!r}"
        elif isinstance(node, ast.Call):
            called = node.func
            method = _name(called)
            if method in RUNNERS:
                yield node.lineno, where, f"call of {method}()"
            elif (
                isinstance(called, ast.Attribute)
                and method in POOL_RUNNERS
                and "pool" in _name(called.value).lower()
            ):
                yield node.lineno, where, f"call of {_name(called.value)}.{method}()"
        elif isinstance(node, ast.Import | ast.ImportFrom):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                names = [node.module or ""]
            for name in names:
                if name.split(".")[0] in DRIVERS:
                    yield node.lineno, where, f"import of {name}"


def _violations() -> list[tuple[str, int, str, str]]:
    found = []
    for path in _modules():
        module = path.relative_to(PACKAGE.parent).as_posix()
        for line, function, what in _findings(path.read_text()):
            found.append((module, line, function, what))
    return found


def test_no_sql_outside_the_database_package() -> None:
    """
    No module of mqttsvc outside C{mqttsvc.db} writes SQL, runs a
    statement, or imports a PostgreSQL driver.
    """
    found = [
        f"{module}:{line} ({function or 'module'}): {what}"
        for module, line, function, what in _violations()
    ]
    assert found == [], "SQL belongs in mqttsvc.db, behind a named method:\n" + "\n".join(found)


@pytest.mark.parametrize(
    "source",
    [
        'rows = await self._store.pool.query("SELECT id FROM dead_letter")',
        'await pool.operation("DELETE FROM dead_letter WHERE id = ANY(%s)", (ids,))',
        "await store.pool.query(sql)",
        'await cursor.execute(f"UPDATE {table} SET reason = %s", (r,))',
        "await conn.runQuery(statement)",
        'probe = "SELECT 1"',
        'x = f"INSERT INTO {table} (a) VALUES (%s)"',
        'await listener.runOperation("LISTEN mqttsvc_events")',
        'q = "SELECT pg_terminate_backend(%s)"',
        "import psycopg2",
        "from txpostgres import txpostgres",
    ],
)
def test_the_scan_finds(source: str) -> None:
    """
    What an RPC handler must not hold is found by the scan.
    """
    assert list(_findings(f"async def handler():\n    {source}\n")) != []


@pytest.mark.parametrize(
    "source",
    [
        '"""Every insert sends NOTIFY mqttsvc_events when it commits."""',
        'log.info("select a site, then update it")',
        'methods = ["GET", "HEAD", "PUT", "DELETE"]',
        "page = await self._store.dead_letters.page(site_id, None, None, None, 10)",
        "await self._store.pool.ping()",
    ],
)
def test_the_scan_passes(source: str) -> None:
    """
    Docstrings, prose and calls of the repositories are not SQL.
    """
    assert list(_findings(f"async def handler():\n    {source}\n")) == []
