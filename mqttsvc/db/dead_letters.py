"""
The dead letters repository: the messages that could not be stored, with
the reason, as the control plane lists, purges and replays them.  (The batch
writer stores them: L{mqttsvc.db.batch}.)
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

import attrs

from mqttsvc.db.batch import write_effects
from mqttsvc.db.pages import Page, iso, time_range
from mqttsvc.db.pool import ConnectionPool
from mqttsvc.records import Reading

#: Bytes of payload in a page of dead letters.  Each payload is answered
#: twice (as text and in base64), so a page stays near 2.4 MB of JSON, under
#: the 4 MiB answer limit, even when every letter kept its whole 64 KiB: a
#: page holds fewer than its limit when its payloads would pass this.
DEAD_LETTER_PAGE_BYTES = 1024 * 1024


@attrs.frozen
class StoredLetter:
    """
    A dead letter as replay sees it.

    @ivar whole: whether the stored topic and payload are the message's
        own (False when only part of the payload, or a stand-in for a topic
        that was not text, was kept).
    """

    id: int
    site_id: str
    topic: str
    payload: bytes
    received_at: datetime
    whole: bool


#: What replay asks of each letter: the readings it makes now, or the
#: reason it is still dead.
Judge = Callable[[StoredLetter], Sequence[Reading] | str]


@attrs.frozen
class Replayed:
    """
    What a replay did, per site: the ids written and removed
    (C{"replayed"}) and those still dead, with their new reason
    (C{"dead_again"}), in id order.
    """

    by_site: dict[str, dict[str, list[int]]]

    @property
    def replayed(self) -> int:
        return sum(len(ids["replayed"]) for ids in self.by_site.values())

    @property
    def dead_again(self) -> int:
        return sum(len(ids["dead_again"]) for ids in self.by_site.values())


class DeadLetters:
    """
    The dead letters, read and changed through C{pool}.
    """

    def __init__(self, pool: ConnectionPool) -> None:
        self._pool = pool

    async def page(
        self,
        site_id: str | None,
        since: datetime | None,
        until: datetime | None,
        after: int | None,
        limit: int,
    ) -> Page:
        """
        Dead letters, newest first (by id), received after C{since}
        (exclusive) up to C{until} (inclusive), from after (below) the id
        C{after}; at least one, then as many as fit in
        L{DEAD_LETTER_PAGE_BYTES}.
        """
        where = time_range(site_id, "received_at", since, until)
        if after is not None:
            where.append("id < %(a)s")
        # The payloads of the rows past the budget are not even read.
        rows = await self._pool.query(
            "SELECT id, site_id, topic, topic_raw, CASE WHEN fits THEN payload END, payload_size,"
            " payload_sha256, reason, received_at, fits FROM ("
            "  SELECT *, sum(octet_length(payload)) OVER (ORDER BY id DESC)"
            "    - octet_length(payload) < %(budget)s AS fits"
            f"  FROM dead_letter WHERE {' AND '.join(where)} ORDER BY id DESC LIMIT %(n)s"
            ") d ORDER BY id DESC",
            {
                "s": site_id,
                "since": since,
                "until": until,
                "a": after,
                "n": limit + 1,
                "budget": DEAD_LETTER_PAGE_BYTES,
            },
        )
        kept = [row[:-1] for row in rows[:limit] if row[-1]]
        return Page(
            [_dead_letter(*row) for row in kept],
            (kept[-1][0],) if kept else None,
            len(rows) > len(kept),
        )

    async def purge(self, ids: list[int]) -> dict[str, list[int]]:
        """
        Delete the dead letters C{ids}.

        @return: the ids deleted (those that existed), per site, in order.
        """
        rows = await self._pool.query(
            "DELETE FROM dead_letter WHERE id = ANY(%s) RETURNING id, site_id", (ids,)
        )
        purged: dict[str, list[int]] = {}
        for id_, site_id in sorted(rows):
            purged.setdefault(site_id, []).append(id_)
        return purged

    async def replay(self, ids: list[int], judge: Judge) -> Replayed:
        """
        Put the dead letters C{ids} (those that exist) through C{judge}
        again, in one transaction that locks them: the readings of those
        that now pass are written and the letters removed; the others stay,
        with the reason C{judge} gave.
        """

        async def replay(cursor: Any) -> Replayed:
            await cursor.execute(
                "SELECT id, site_id, topic, payload, received_at, "
                "payload_size > octet_length(payload) OR topic_raw IS NOT NULL "
                "FROM dead_letter WHERE id = ANY(%s) ORDER BY id FOR UPDATE",
                (ids,),
            )
            by_site: dict[str, dict[str, list[int]]] = {}
            effects: list[Reading] = []
            done: list[int] = []
            reasons: list[tuple[int, str]] = []
            for id_, site_id, topic, payload, received_at, altered in cursor.fetchall():
                outcomes = by_site.setdefault(site_id, {"replayed": [], "dead_again": []})
                verdict = judge(
                    StoredLetter(id_, site_id, topic, bytes(payload), received_at, not altered)
                )
                if isinstance(verdict, str):
                    reasons.append((id_, verdict))
                    outcomes["dead_again"].append(id_)
                    continue
                effects.extend(verdict)
                outcomes["replayed"].append(id_)
                done.append(id_)
            await write_effects(cursor.execute, effects)
            if done:
                await cursor.execute("DELETE FROM dead_letter WHERE id = ANY(%s)", (done,))
            for id_, reason in reasons:
                await cursor.execute(
                    "UPDATE dead_letter SET reason = %s WHERE id = %s", (reason, id_)
                )
            return Replayed(by_site)

        replayed: Replayed = await self._pool.transaction(replay)
        return replayed


def _payload(raw: bytes) -> tuple[str | None, str]:
    try:
        text: str | None = raw.decode("utf-8")
    except UnicodeDecodeError:
        text = None
    return text, base64.b64encode(raw).decode()


def _dead_letter(
    id_: int,
    site: str,
    topic: str,
    topic_raw: bytes | None,
    payload: bytes,
    size: int,
    digest: bytes | None,
    reason: str,
    received: datetime,
) -> dict[str, Any]:
    text, encoded = _payload(bytes(payload))
    return {
        "id": id_,
        "site_id": site,
        "topic": topic,
        "topic_raw_base64": None
        if topic_raw is None
        else base64.b64encode(bytes(topic_raw)).decode(),
        "payload": text,
        "payload_base64": encoded,
        "payload_size": size,
        "payload_sha256": None if digest is None else bytes(digest).hex(),
        "truncated": size > len(payload),
        "reason": reason,
        "received_at": iso(received),
    }
