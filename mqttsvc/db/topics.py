"""
The discovered topics repository: every exact topic seen on a site, with
its counts, as the control plane lists them.  (The batch writer counts
them: L{mqttsvc.db.batch}.)
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from mqttsvc.db.pages import Page, iso, page_of
from mqttsvc.db.pool import ConnectionPool


def prefix_end(prefix: str) -> str | None:
    """
    The least string after every string that starts with C{prefix}, in
    code point order (the order of C{COLLATE "C"} on UTF-8); None when
    there is none.
    """
    chars = list(prefix)
    while chars:
        point = ord(chars.pop()) + 1
        if point <= 0x10FFFF:
            if 0xD800 <= point <= 0xDFFF:
                point = 0xE000
            return "".join(chars) + chr(point)
    return None


class Topics:
    """
    The discovered topics, read through C{pool}.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def page(self, site_id: str, prefix: str | None, after: str | None, limit: int) -> Page:
        """
        A site's discovered topics in code point order (C{COLLATE "C"}, the
        order in which the topics that share a prefix are together), those
        that start with C{prefix} only, from after the topic C{after}.
        """
        where = ["site_id = %(s)s"]
        if prefix:
            where.append('topic_path COLLATE "C" >= %(p)s')
            end = prefix_end(prefix)
            if end is not None:
                where.append('topic_path COLLATE "C" < %(e)s')
        else:
            end = None
        if after is not None:
            where.append('topic_path COLLATE "C" > %(a)s')
        rows = await self._pool.query(
            "SELECT topic_path, first_seen_at, last_seen_at, message_count FROM discovered_topic"
            f' WHERE {" AND ".join(where)} ORDER BY topic_path COLLATE "C" LIMIT %(n)s',
            {"s": site_id, "p": prefix, "e": end, "a": after, "n": limit + 1},
        )

        def topic(path: str, first: datetime, last: datetime, count: int) -> dict[str, Any]:
            return {
                "topic_path": path,
                "first_seen_at": iso(first),
                "last_seen_at": iso(last),
                "message_count": count,
            }

        return page_of(rows, limit, lambda row: (row[0],), topic)
