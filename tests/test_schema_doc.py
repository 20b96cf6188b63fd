"""
docs/schema.md documents the schema the migrations build: every table has
a section, and every column is named in it.  Read from a migrated database,
so that a migration that adds a table or a column without its documentation
fails here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

SCHEMA_MD = Path(__file__).resolve().parents[1] / "docs" / "schema.md"

#: yoyo's own tables (and its record of what it applied, described in the
#: introduction), not mqttsvc's.
YOYO = {"_yoyo_log", "_yoyo_version", "_yoyo_migration", "mqttsvc_migration", "yoyo_lock"}


def documented() -> dict[str, set[str]]:
    """
    Per table named in backquotes in a section's heading: the words in
    backquotes in that section (a column may be named alone, in a list
    such as C{`(site_id, gateway_id)`}, or in a heading with others).
    """
    names: dict[str, set[str]] = {}
    for section in re.split(r"^## ", SCHEMA_MD.read_text(), flags=re.MULTILINE)[1:]:
        heading = section.split("\n", 1)[0]
        words = {
            word
            for span in re.findall(r"`([^`]*)`", section)
            for word in re.findall(r"[a-z_][a-z_0-9]*", span)
        }
        for table in re.findall(r"`([a-z_]+)`", heading):
            names.setdefault(table, set()).update(words)
    return names


def test_schema_md_documents_every_table_and_column(sql: Any) -> None:
    """
    Every table of mqttsvc's schema has a section of docs/schema.md named
    for it, and every column of the table is named in one of them; a
    table's C{id} is described once, in the introduction.
    """
    with sql.cursor() as cur:
        cur.execute(
            "SELECT table_name, column_name FROM information_schema.columns"
            " WHERE table_schema = 'public' ORDER BY table_name, ordinal_position"
        )
        columns = cur.fetchall()
    tables: dict[str, list[str]] = {}
    for table, column in columns:
        if table not in YOYO:
            tables.setdefault(table, []).append(column)
    assert {"connection_event", "site_live", "site_writer"} <= set(tables)
    doc = documented()
    assert sorted(set(tables) - set(doc)) == [], "tables without a section in docs/schema.md"
    undocumented = {
        table: missing
        for table, names in tables.items()
        if (missing := [c for c in names if c != "id" and c not in doc[table]])
    }
    assert undocumented == {}, "columns docs/schema.md does not name"
    assert (
        "A table's `id`, where\nit has one, is a `bigserial` primary key" in SCHEMA_MD.read_text()
    )
