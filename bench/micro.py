"""
Where one batch's time goes, piece by piece, with mqttsvc's own functions
on the benchmark's messages: processing, folding into rows, psycopg2's
adaptation of the row arrays, the server's execution, and the per-message
costs that the suggestions in C{BENCHMARKS.md} would remove.  Each figure
is the median of several runs over the same batch.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg2
from twisted.internet.defer import Deferred

from bench import workload
from mqttsvc.batch import write_effects
from mqttsvc.config import default_topics
from mqttsvc.processing import Router, process
from mqttsvc.transport import ReceivedMessage

Params = dict[str, Any]


class Recorder:
    """
    A cursor that keeps what it is asked to execute.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, Any]] = []

    async def execute(self, statement: str, params: Any = None) -> None:
        self.calls.append((statement, params))


def _run(coroutine: Any) -> None:
    try:
        coroutine.send(None)
    except StopIteration:
        return
    raise RuntimeError("the coroutine suspended")


def _median_seconds(work: Callable[[], object], repeat: int = 7) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def _epoch(params: Any) -> Any:
    """
    The same parameters with every list of datetimes as epoch floats (the
    proposed way to pass timestamps).
    """
    out = []
    for column in params:
        if column and isinstance(column[0], datetime):
            out.append([d.timestamp() for d in column])
        else:
            out.append(column)
    return out


def _literal(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return repr(value)


def array_literals(params: Any) -> list[Any]:
    """
    The same parameters with every list as one PostgreSQL array literal
    (the proposed way: one string per column for the server's C{array_in}
    to parse, instead of psycopg2 adapting every element).  Lists of bytes
    are left to psycopg2.
    """
    return [
        column
        if any(isinstance(v, bytes) for v in column)
        else "{" + ",".join(map(_literal, column)) + "}"
        for column in params
    ]


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

    effects = processed()
    flat = [e for message in effects for e in message]
    recorder = Recorder()
    _run(write_effects(recorder, flat))
    calls = recorder.calls

    conn = psycopg2.connect(dsn)
    try:
        cur = conn.cursor()

        def adapt() -> list[bytes]:
            return [cur.mogrify(statement, params) for statement, params in calls]

        def adapt_epoch() -> list[bytes]:
            return [cur.mogrify(statement, _epoch(params)) for statement, params in calls]

        def adapt_literal() -> list[bytes]:
            return [cur.mogrify(statement, array_literals(params)) for statement, params in calls]

        sql = adapt()
        literal_sql = adapt_literal()
        # Once for real, so that the timed runs update existing devices
        # and topics as a running service mostly does.
        for statement in sql:
            cur.execute(statement)
        conn.commit()

        def server() -> None:
            for statement in sql:
                cur.execute(statement)
            conn.rollback()

        def server_literal() -> None:
            for statement in literal_sql:
                cur.execute(statement)
            conn.rollback()

        def server_one_round_trip() -> None:
            cur.execute(b";\n".join(sql))
            conn.rollback()

        objects = [json.loads(p) for _, _, p in raw]

        def canonical() -> None:
            for value in objects:
                json.dumps(value, separators=(",", ":"), allow_nan=False)

        def deferreds() -> None:
            for _ in range(batch):
                d: Deferred[None] = Deferred()
                d.addCallbacks(lambda _: None, lambda _: None)
                d.callback(None)

        def received() -> None:
            for _, t, p in raw:
                ReceivedMessage(topic=t, payload=p, qos=1, retain=False, mid=1, generation=1)

        def fold() -> None:
            _run(write_effects(Recorder(), flat))

        result = {
            "batch": batch,
            "statements": len(calls),
            "process_us": 1e6 * _median_seconds(processed) / batch,
            "fold_ms": 1000 * _median_seconds(fold),
            "adapt_ms": 1000 * _median_seconds(adapt),
            "adapt_epoch_ms": 1000 * _median_seconds(adapt_epoch),
            "adapt_literal_ms": 1000 * _median_seconds(adapt_literal),
            "server_literal_ms": 1000 * _median_seconds(server_literal, 5),
            "server_ms": 1000 * _median_seconds(server, 5),
            "server_one_round_trip_ms": 1000 * _median_seconds(server_one_round_trip, 5),
            "canonical_json_us": 1e6 * _median_seconds(canonical) / batch,
            "deferred_us": 1e6 * _median_seconds(deferreds) / batch,
            "received_message_us": 1e6 * _median_seconds(received) / batch,
        }
    finally:
        conn.close()
    return result
