"""
Measure the list methods at the size of issue 14: one site with 300,000
devices and 300,000 discovered topics, written by SQL into a scratch
database, read by a real C{twistd mqttsvc} a page at a time, while a
second client calls C{service.status} every 10 ms.

It prints, as JSON: the time of each page (median and worst), the worst
C{service.status} meanwhile, the service's resident memory before and
after, and how long the largest pages take to encode in this process.

    .venv/bin/python scripts/list_pages.py
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import psycopg2

sys.path.insert(0, str(Path(__file__).parent.parent))

from mqttsvc.db import observations
from mqttsvc.rpcclient import MqttSvcClient
from mqttsvc.control.rpc.dispatcher import _encode
from mqttsvc.control.rpc.paging import MAX_LIMIT
from tests.conftest import scratch_database
from tests.twistd_process import TwistdService

SITE = "big"
DEVICES_PER_KIND = 100_000


def rss_mb(pid: int) -> tuple[float, float]:
    """
    Resident memory now and at its peak, in MB.
    """
    fields = dict(
        line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
    )
    return tuple(round(int(fields[name].split()[0]) / 1024, 1) for name in ("VmRSS", "VmHWM"))  # type: ignore[return-value]


def fill(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(
            "INSERT INTO gateway (site_id, gateway_id, status, reported_status, first_seen_at,"
            " last_seen_at) SELECT %(s)s, 'gw-' || lpad(i::text, 6, '0'), 'online', 'ok', now(),"
            " now() FROM generate_series(1, %(n)s) i;"
            "INSERT INTO datalogger (site_id, gateway_id, datalogger_id, status, first_seen_at,"
            " last_seen_at) SELECT %(s)s, 'gw-' || lpad((i %% 1000)::text, 6, '0'),"
            " 'dl-' || lpad(i::text, 6, '0'), 'online', now(), now()"
            " FROM generate_series(1, %(n)s) i;"
            "INSERT INTO sensor (site_id, sensor_id, status, first_seen_at, last_seen_at)"
            " SELECT %(s)s, 'sn-' || lpad(i::text, 6, '0'), 'offline', now(), now()"
            " FROM generate_series(1, %(n)s) i;"
            "INSERT INTO discovered_topic (site_id, topic_path, first_seen_at, last_seen_at,"
            " message_count) SELECT %(s)s, %(s)s || '/sensor/sn-' || lpad(i::text, 6, '0')"
            " || '/data', now(), now(), i FROM generate_series(1, 3 * %(n)s) i;"
            "INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value, unit)"
            " SELECT %(s)s, 'sn-000001', now() - i * interval '1 s', 'temperature', i, 'C'"
            " FROM generate_series(1, %(n)s) i;"
            "ANALYZE",
            {"s": SITE, "n": DEVICES_PER_KIND},
        )
    conn.close()


def read_all(client: MqttSvcClient, method: str, params: dict[str, Any]) -> dict[str, Any]:
    """
    Every page of a list method; the pages' times and how many items.
    """
    times: list[float] = []
    count = 0
    cursor = None
    while True:
        start = time.perf_counter()
        page = client.call(method, {**params, "limit": MAX_LIMIT, "cursor": cursor})
        times.append(time.perf_counter() - start)
        count += len(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    return {
        "items": count,
        "pages": len(times),
        "page_ms_median": round(statistics.median(times) * 1000, 1),
        "page_ms_worst": round(max(times) * 1000, 1),
        "worst_page": times.index(max(times)) + 1,
        "total_s": round(sum(times), 2),
    }


def encode_ms(dsn: str) -> dict[str, float]:
    """
    The reactor's share of the largest pages, measured in this process:
    turning the rows into items, and encoding them (best of 20).
    """

    class Pool:
        def __init__(self) -> None:
            self.conn = psycopg2.connect(dsn)

        async def query(self, sql: str, params: Any) -> list[Any]:
            with self.conn.cursor() as cur:
                cur.execute(sql, params)
                return cur.fetchall()

    def run(coroutine: Any) -> Any:
        try:
            coroutine.send(None)
        except StopIteration as done:
            return done.value
        raise AssertionError("waited")

    pool: Any = Pool()
    pages = {
        "device.list": lambda: observations.devices(pool, SITE, None, None, None, MAX_LIMIT),
        "topic.list": lambda: observations.topics(pool, SITE, None, None, MAX_LIMIT),
        "reading.list": lambda: observations.readings(
            pool, SITE, "sn-000001", "ts", None, None, None, MAX_LIMIT
        ),
    }
    result = {}
    for name, page in pages.items():
        built = run(page())
        shaping = []
        encoding = []
        for _ in range(20):
            start = time.perf_counter()
            built = run(page())
            shaping.append(time.perf_counter() - start)
            start = time.perf_counter()
            body = _encode({"jsonrpc": "2.0", "result": {"items": built.items}, "id": 1})
            encoding.append(time.perf_counter() - start)
        result[f"{name}_query_and_shape_ms"] = round(min(shaping) * 1000, 2)
        result[f"{name}_encode_ms"] = round(min(encoding) * 1000, 2)
        result[f"{name}_bytes"] = len(body)
    return result


def main() -> None:
    with scratch_database("mqttsvc_list_pages") as dsn, tempfile.TemporaryDirectory() as tmp:
        fill(dsn)
        service = TwistdService(dsn, Path(tmp))
        service.start()
        assert service.process is not None
        pid = service.process.pid
        client = MqttSvcClient(service.url, token=service.TOKEN, timeout=30)
        monitor = MqttSvcClient(service.url, token=service.TOKEN, timeout=30)
        stop = threading.Event()
        status_times: list[float] = []

        def poll() -> None:
            while not stop.wait(0.01):
                start = time.perf_counter()
                monitor.service_status()
                status_times.append(time.perf_counter() - start)

        try:
            # What the service does on its own when it starts with this many
            # devices (it loads them, and its first monitor pass sweeps
            # them) is not what is measured here: let it settle.
            settled = time.monotonic() + 60
            while time.monotonic() < settled:
                start = time.perf_counter()
                monitor.service_status()
                if time.perf_counter() - start < 0.02 and time.monotonic() > settled - 45:
                    break
                time.sleep(0.5)
            time.sleep(5)
            before = rss_mb(pid)
            poller = threading.Thread(target=poll)
            poller.start()
            report: dict[str, Any] = {
                "device.list": read_all(client, "device.list", {"site_id": SITE}),
                "device.list offline": read_all(
                    client, "device.list", {"site_id": SITE, "status": "offline"}
                ),
                "topic.list": read_all(client, "topic.list", {"site_id": SITE}),
                "reading.list": read_all(
                    client,
                    "reading.list",
                    {"site_id": SITE, "sensor_id": "sn-000001", "since": "2000-01-01T00:00:00Z"},
                ),
            }
            stop.set()
            poller.join()
            report["service.status_ms_worst"] = round(max(status_times) * 1000, 1)
            report["service.status_ms_median"] = round(statistics.median(status_times) * 1000, 1)
            report["service.status_calls"] = len(status_times)
            report["rss_mb_before"], report["rss_peak_mb_before"] = before
            report["rss_mb_after"], report["rss_peak_mb_after"] = rss_mb(pid)
            report.update(encode_ms(dsn))
        finally:
            stop.set()
            service.stop()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
