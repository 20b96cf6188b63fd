"""
The batched writer against a real PostgreSQL: batching, folding of
repeated rows, and dead letters for what the database rejects.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest_twisted
from twisted.internet.defer import gatherResults

from mqttsvc.pool import ConnectionPool
from mqttsvc.processing import DeadLetter, GatewaySeen, TopicSeen
from mqttsvc.writer import BatchWriter

T0 = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)


def rows(sql: Any, query: str, *params: Any) -> list[tuple[Any, ...]]:
    with sql.cursor() as cur:
        cur.execute(query, params)
        return list(cur.fetchall())


@pytest_twisted.ensureDeferred
async def test_one_transaction_for_a_burst(db_dsn: str, sql: Any, site_id: str) -> None:
    """Messages queued together are written in one batch, with rows folded."""
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    topic = f"{site_id}/gateway/g1/heartbeat"
    done = []
    for i in range(300):
        at = T0 + timedelta(seconds=i)
        done.append(
            writer.submit(
                [TopicSeen(site_id, topic, at), GatewaySeen(site_id, "g1", at, f'{{"n": {i}}}')]
            )
        )
    await gatherResults(done)
    pool.close()
    assert writer.batches_written == 1
    assert writer.messages_written == 300
    assert rows(
        sql,
        "SELECT message_count, first_seen_at, last_seen_at FROM discovered_topic "
        "WHERE site_id = %s",
        site_id,
    ) == [(300, T0, T0 + timedelta(seconds=299))]
    assert rows(
        sql,
        "SELECT status, first_seen_at, last_seen_at, last_payload FROM gateway WHERE site_id = %s",
        site_id,
    ) == [("online", T0, T0 + timedelta(seconds=299), {"n": 299})]


@pytest_twisted.ensureDeferred
async def test_counts_accumulate_across_batches(db_dsn: str, sql: Any, site_id: str) -> None:
    """A later batch adds to a topic's count and never moves last_seen_at back."""
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    topic = f"{site_id}/x"
    await writer.submit([TopicSeen(site_id, topic, T0 + timedelta(hours=1))])
    await writer.submit([TopicSeen(site_id, topic, T0)])
    pool.close()
    assert rows(
        sql,
        "SELECT message_count, first_seen_at, last_seen_at FROM discovered_topic "
        "WHERE site_id = %s",
        site_id,
    ) == [(2, T0, T0 + timedelta(hours=1))]


@pytest_twisted.ensureDeferred
async def test_rejected_message_becomes_dead_letter(db_dsn: str, sql: Any, site_id: str) -> None:
    """A row the database refuses is dead-lettered with its reason; the rest of the batch lands."""
    from twisted.internet import reactor

    pool = ConnectionPool(reactor, db_dsn, size=1)
    writer = BatchWriter(reactor, pool)
    good = writer.submit(
        [TopicSeen(site_id, "a", T0), GatewaySeen(site_id, "good", T0, '{"ok": true}')]
    )
    # Not JSON: processing never produces this, so it stands for any row
    # that the database rejects for its content.
    bad = writer.submit([TopicSeen(site_id, "b", T0), GatewaySeen(site_id, "bad", T0, "{")])
    letter = writer.submit(
        [TopicSeen(site_id, "c", T0), DeadLetter(site_id, "c", b"\x00", "x", T0)]
    )
    await gatherResults([good, bad, letter])
    pool.close()
    assert rows(sql, "SELECT gateway_id FROM gateway WHERE site_id = %s", site_id) == [("good",)]
    dead = rows(
        sql,
        "SELECT topic, payload, reason FROM dead_letter WHERE site_id = %s ORDER BY id",
        site_id,
    )
    assert [(t, bytes(p)) for t, p, _ in dead] == [("b", b"{"), ("c", b"\x00")]
    assert dead[0][2].startswith(
        "database rejected the message: invalid input syntax for type json"
    )
    assert dead[1][2] == "x"
    topics = rows(
        sql, "SELECT topic_path FROM discovered_topic WHERE site_id = %s ORDER BY 1", site_id
    )
    assert topics == [("a",), ("b",), ("c",)]
