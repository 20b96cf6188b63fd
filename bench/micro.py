"""
Where one batch's time goes, piece by piece, with mqttsvc's own functions
on the benchmark's messages: framing and decoding the PUBLISH packets,
processing, building the batch's statements, psycopg2 quoting them, and
the server executing them.  Each figure is the median of several runs over
the same batch.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg2

from bench import workload
from mqttsvc.config import default_topics
from mqttsvc.db.batch import batch_statements
from mqttsvc.ingest.processing import Router, process

Params = dict[str, Any]


def _median_seconds(work: Callable[[], object], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def measure(dsn: str, batch: int = 1000, sites: int = 10) -> Params:
    """
    The costs of one batch of C{batch} benchmark messages.
    """
    names = workload.site_ids(sites)
    routers = {s: Router(default_topics(s)) for s in names}
    raw = []
    for i in range(batch):
        m = workload.message(names, i)
        raw.append((names[i % sites], m.topic.decode(), m.payload(1.7e9 + i / 1000)))
    now = datetime.now(UTC)

    def processed() -> list[Any]:
        return [process(s, routers[s], t, p, now) for s, t, p in raw]

    effects = [e for message in processed() for e in message]

    def build() -> tuple[str, list[Any]] | None:
        return batch_statements(effects)

    script = build()
    assert script is not None
    sql, params = script

    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()

        def quote() -> bytes:
            return cur.mogrify(sql, params)

        text = quote()
        # Once for real, so that the timed runs update existing devices
        # and topics as a running service mostly does.
        cur.execute(text)
        conn.commit()

        def server() -> None:
            cur.execute(text)
            conn.rollback()

        result = {
            "batch": batch,
            "statements": sql.count(";") + 1,
            "process_us": 1e6 * _median_seconds(processed) / batch,
            "build_ms": 1000 * _median_seconds(build),
            "quote_ms": 1000 * _median_seconds(quote),
            "query_kb": len(text) / 1024,
            "server_ms": 1000 * _median_seconds(server, 5),
        }
    finally:
        conn.close()
    return result
