"""
Rolling back a release is documented migration by migration (issue 15,
item 18): docs/upgrades.md has a row for every migration, and no migration
ships a rollback step that the document does not know of.
"""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MIGRATIONS = ROOT / "mqttsvc" / "db" / "migrations"
DOC = (ROOT / "docs" / "upgrades.md").read_text()


def test_every_migration_has_a_row_saying_what_the_release_before_it_does() -> None:
    """A migration without a row (or a row without its migration) fails."""
    migrations = {
        p.name.removesuffix(".sql")
        for p in MIGRATIONS.glob("*.sql")
        if not p.name.endswith(".rollback.sql")
    }
    rows = dict(re.findall(r"^\| (\d{4}\.[\w-]+) \| [^|]+ \| ([^|]+) \|$", DOC, re.MULTILINE))
    assert set(rows) == migrations, sorted(set(rows) ^ migrations)
    assert all(verdict.strip() for verdict in rows.values())


def test_migrations_are_forward_only_as_documented() -> None:
    """The document says none ships a rollback step; so none may, unless it changes too."""
    assert "mqttsvc ships none: every migration is forward-only" in DOC
    assert list(MIGRATIONS.glob("*.rollback.sql")) == []
