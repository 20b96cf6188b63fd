"""
How the control plane's lists are read and shown: a L{Page} of rows read
along an index from after the sort key of the page before (keyset pages: a
page costs its own rows whatever the table holds), and L{iso}, the one way a
stored time is shown.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs


def iso(value: datetime | None) -> str | None:
    """
    An ISO 8601 UTC timestamp (naive values are taken as UTC), or None.
    """
    if value is None:
        return None
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.astimezone(UTC).isoformat().replace("+00:00", "Z")


@attrs.frozen
class Page:
    """
    One page of a list: its items, the sort key of the last item (None
    when the page is empty), and whether more items follow it.
    """

    items: list[dict[str, Any]]
    last: tuple[Any, ...] | None
    more: bool


def page_of(
    rows: list[Any], limit: int, key: Callable[[Any], tuple[Any, ...]], item: Callable[..., Any]
) -> Page:
    """
    A page from up to C{limit} + 1 rows in order (the extra row only says
    that more follow).
    """
    kept = rows[:limit]
    return Page([item(*row) for row in kept], key(kept[-1]) if kept else None, len(rows) > limit)


def time_range(site_id: str | None, column: str, since: Any, until: Any) -> list[str]:
    """
    The conditions for one site (or every site, given None) and for
    C{column} after C{since} (exclusive) up to C{until} (inclusive), as
    the parameters C{s}, C{since} and C{until}.
    """
    where = ["TRUE"] if site_id is None else ["site_id = %(s)s"]
    if since is not None:
        where.append(f"{column} > %(since)s")
    if until is not None:
        where.append(f"{column} <= %(until)s")
    return where
