"""
One measurement in a process of its own:
C{python -m bench.child ROLE 'JSON PARAMS'} prints C{RESULT <json>} as its
last line of standard output.

Roles that run mqttsvc run a fresh reactor; the baselines and load
generators are plain blocking (or asyncio) Python.  Every role stops by
itself: each wait has a deadline.
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import pstats
import random
import select
import subprocess
import sys
import time
from array import array
from collections.abc import Awaitable, Callable
from typing import Any

from bench import stats, wire, workload
from bench.environment import proc_status, raise_file_limit

Params = dict[str, Any]


def _spawn(role: str, params: Params) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "bench.child", role, json.dumps(params)],
        stdout=subprocess.PIPE,
        text=True,
    )


def _result_of(process: subprocess.Popen[str], role: str) -> Any:
    out, _ = process.communicate(timeout=60)
    if process.returncode != 0:
        raise RuntimeError(f"{role} exited with {process.returncode}")
    return parse_result(out)


def parse_result(out: str) -> Any:
    """
    The result a child printed (its last C{RESULT} line).
    """
    for line in reversed(out.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT ") :])
    raise RuntimeError("the child printed no result")


# Blocking roles: the baselines and the load generators.


def drain_bare(p: Params) -> Params:
    from bench.baselines import drain

    return drain(p["port"], p["client_ids"], p["expected"], p["timeout"])


def drain_old(p: Params) -> Params:
    from bench.baselines import OldProcessor, drain

    processor = OldProcessor(p["dsn"])
    try:
        return drain(p["port"], p["client_ids"], p["expected"], p["timeout"], processor.handle)
    finally:
        processor.close()


def publish_steady(p: Params) -> Params:
    """
    Publish C{rate} messages a second for C{seconds}, each stamped with its
    send time, over one pipelining connection.
    """
    sites, rate = p["sites"], p["rate"]
    total = p.get("count") or int(rate * p["seconds"])
    messages = [workload.message(sites, i) for i in range(total)]
    publisher = wire.Publisher(p["port"], f"bench-steady-{os.getpid()}")
    started = time.perf_counter()
    sent = 0
    lag = 0.0
    while sent < total:
        elapsed = time.perf_counter() - started
        due = min(total, int(elapsed * rate) + 1)
        if due > sent:
            lag = max(lag, elapsed - sent / rate)
            now = time.time()
            publisher.send(
                [
                    wire.publish_packet(messages[i].topic, messages[i].payload(now), i % 65535 + 1)
                    for i in range(sent, due)
                ]
            )
            sent = due
        else:
            time.sleep(min(0.001, (sent + 1) / rate - elapsed))
    seconds = time.perf_counter() - started
    publisher.wait_acked(60)
    publisher.close()
    return {"sent": sent, "seconds": seconds, "rate": sent / seconds, "max_lag_s": lag}


def latency_bare(p: Params) -> Params:
    """
    Publish-to-receive latency of a bare paho client at the steady rate.
    """
    from bench.baselines import drain

    samples = array("d")

    def handle(topic: str, payload: bytes) -> None:
        samples.append(time.time() - workload.sent_at(payload))

    total = int(p["rate"] * p["seconds"])
    publisher = _spawn("publish-steady", p)
    result = drain(p["port"], p["client_ids"], total, p["seconds"] + 60, handle)
    published = _result_of(publisher, "publish-steady")
    return {**result, **stats.distribution(samples), "publisher": published}


def sites_bare(p: Params) -> Params:
    """
    The same number of bare paho clients, connected and subscribed from
    one thread: how long it takes, the memory and the idle CPU.
    """
    import paho.mqtt.client as paho
    from paho.mqtt.enums import CallbackAPIVersion

    raise_file_limit()
    rss_before = proc_status("VmRSS")
    acked = 0

    def on_connect(*args: Any) -> None:
        nonlocal acked
        acked += 1

    started = time.perf_counter()
    clients: dict[Any, Any] = {}
    for site_id in p["sites"]:
        client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"bare-{site_id}")
        client.on_connect = on_connect
        client.connect("127.0.0.1", p["port"], keepalive=60)
        clients[client.socket()] = client
    deadline = started + p["timeout"]
    while acked < len(clients) and time.perf_counter() < deadline:
        readable, _, _ = select.select(list(clients), [], [], 0.1)
        for sock in readable:
            clients[sock].loop_read()
    connect_seconds = time.perf_counter() - started
    for client in clients.values():
        client.subscribe([(f, 1) for f in workload.filters(p["sites"][0])])
    for client in clients.values():
        client.loop_write()
    _idle_loop(clients, 1.0)
    rss = proc_status("VmRSS")
    cpu = time.process_time()
    wall = time.perf_counter()
    _idle_loop(clients, p["idle_seconds"])
    idle_cpu = (time.process_time() - cpu) / (time.perf_counter() - wall)
    for client in clients.values():
        client.disconnect()
    return {
        "sites": len(clients),
        "connected": acked,
        "connect_seconds": connect_seconds,
        "rss_mb": rss / 2**20,
        "rss_increase_mb": (rss - rss_before) / 2**20,
        "idle_cpu_percent": idle_cpu * 100,
    }


def _idle_loop(clients: dict[Any, Any], seconds: float) -> None:
    end = time.perf_counter() + seconds
    last_misc = 0.0
    while (now := time.perf_counter()) < end:
        readable, _, _ = select.select(list(clients), [], [], min(1.0, end - now))
        for sock in readable:
            clients[sock].loop_read()
        if now - last_misc >= 1.0:
            last_misc = now
            for client in clients.values():
                client.loop_misc()


def http_load(p: Params) -> Params:
    """
    C{concurrency} keep-alive connections, each sending the next request
    as soon as the last answer is in, for C{seconds}.
    """
    return asyncio.run(_http_load(p))


async def _http_load(p: Params) -> Params:
    requests = [_http_request(p["path"], body) for body in p["bodies"]]
    latencies = array("d")
    errors = 0
    stop_at = time.perf_counter() + p["seconds"]

    async def worker(index: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", p["port"])
        i = index
        try:
            while time.perf_counter() < stop_at:
                request = requests[i % len(requests)]
                i += p["concurrency"]
                sent = time.perf_counter()
                writer.write(request)
                status, body = await _http_response(reader)
                latencies.append(time.perf_counter() - sent)
                if status != 200 or (p["bodies"][0] and b'"result"' not in body):
                    errors += 1
        finally:
            writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(p["concurrency"])))
    seconds = time.perf_counter() - started
    return {
        "requests": len(latencies),
        "errors": errors,
        "seconds": seconds,
        "rate": len(latencies) / seconds,
        **stats.distribution(latencies),
    }


def _http_request(path: str, body: str) -> bytes:
    if not body:
        return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()
    data = body.encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def _http_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    if "content-length" in headers:
        return status, await reader.readexactly(int(headers["content-length"]))
    body = b""
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    return status, body


# Roles that run mqttsvc on a reactor of their own.


def _profile_top(profiler: cProfile.Profile, limit: int = 30) -> Params:
    """
    The profile's top entries by own time and by cumulative time.
    """
    raw: dict[Any, Any] = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(entry[2] for entry in raw.values())

    def name(key: tuple[str, int, str]) -> str:
        path, line, function = key
        for marker in ("site-packages/", "/work/main/", "lib/python3.11/"):
            if marker in path:
                path = path.split(marker, 1)[1]
        return f"{path}:{line}({function})" if line else function

    def rows(index: int) -> list[Params]:
        ordered = sorted(raw.items(), key=lambda kv: kv[1][index], reverse=True)[:limit]
        return [
            {
                "function": name(key),
                "calls": value[1],
                "own_s": value[2],
                "cumulative_s": value[3],
                "own_percent": 100 * value[2] / total if total else 0.0,
            }
            for key, value in ordered
        ]

    return {"total_s": total, "by_own": rows(2), "by_cumulative": rows(3)}


def _observe_commits(writer: Any) -> array[float]:
    """
    Collect how long each batch took to write (from the writer's own
    C{observe} hook, which the metrics use too).
    """
    seconds = array("d")
    for lane in writer.lanes:
        observe = lane.observe

        def observed(
            size: int, took: float, observe: Callable[[int, float], None] | None = observe
        ) -> None:
            seconds.append(took)
            if observe is not None:
                observe(size, took)

        lane.observe = observed
    return seconds


async def ingest_mqttsvc(reactor: Any, p: Params) -> Params:
    """
    Start mqttsvc on sites whose sessions hold a backlog and time it until
    every message is committed and acknowledged.
    """
    from bench.service import Tree, until

    tree = Tree(reactor, p["dsn"])
    writer = tree.ingest.writer
    commits = _observe_commits(writer)
    profiler = cProfile.Profile() if p.get("profile") else None
    cpu = time.process_time()
    started = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    tree.root.startService()
    expected = p["expected"]
    done = await until(
        reactor, lambda: tree.committed() >= expected, p["timeout"], "every message committed"
    )
    if profiler is not None:
        profiler.disable()
    cpu = time.process_time() - cpu
    result: Params = {
        "messages": tree.committed(),
        "seconds": done - started,
        "cpu_seconds": cpu,
        "batches": writer.batches_written,
        "rss_peak_mb": proc_status("VmHWM") / 2**20,
    }
    result["rate"] = expected / result["seconds"]
    result["mean_batch"] = writer.messages_written / max(1, writer.batches_written)
    result["cpu_us_per_message"] = 1e6 * cpu / expected
    result["writer_busy_percent"] = 100 * sum(commits) / result["seconds"]
    result["batch_write_ms"] = 1000 * stats.percentile(commits, 0.5)
    if profiler is not None:
        result["profile"] = _profile_top(profiler)
        if p.get("profile_file"):
            profiler.dump_stats(p["profile_file"])
    await tree.stop()
    return result


def _stand_between(writer: Any, stand_in: Callable[[Any], Any]) -> None:
    """
    Put C{stand_in(site)} between the writer and each site, to hear of its
    commits and holds first.
    """
    queue = writer.queue
    stand_ins: dict[Any, Any] = {}

    def queue_through(effects: list[Any], listener: Any, message: Any, size: int = 0) -> None:
        between = stand_ins.get(listener)
        if between is None:
            between = stand_ins[listener] = stand_in(listener)
        queue(effects, between, message, size)

    writer.queue = queue_through


async def latency_mqttsvc(reactor: Any, p: Params) -> Params:
    """
    Publish-to-commit latency at a steady rate: the send time rides in
    each payload, and the commit is when the writer tells the message's
    site (which then queues its PUBACK).
    """
    from bench.service import Tree, until

    tree = Tree(reactor, p["dsn"])
    await tree.start()
    sites = len(p["sites"])
    await until(reactor, lambda: tree.subscribed() >= sites, 30, "every site subscribed")
    writer = tree.ingest.writer
    total = int(p["rate"] * p["seconds"])
    # Warm up with the same messages as fast as they go: every device is
    # then known, as in a service that has been running, instead of the
    # measured seconds starting with thousands of first sightings (each
    # an "online" event through the event log).
    warmup = _spawn("publish-steady", {**p, "rate": 50_000, "count": total})
    await until(
        reactor,
        lambda: writer.messages_written >= total or warmup.poll() not in (None, 0),
        300,
        "the warm-up committed",
        interval=0.05,
    )
    _result_of(warmup, "publish-steady")
    await writer.when_idle()
    commits = _observe_commits(writer)
    batches_before, written_before = writer.batches_written, writer.messages_written
    samples = array("d")

    class Timed:
        """
        Stands between the writer and a site: notes each message's
        publish-to-commit time, then tells the site.
        """

        def __init__(self, site: Any) -> None:
            self.site = site

        def committed(self, messages: list[Any]) -> None:
            now = time.time()
            for m in messages:
                if m.payload.startswith(b'{"ts":'):
                    samples.append(now - workload.sent_at(m.payload))
            self.site.committed(messages)

        def hold(self, holding: bool) -> None:
            self.site.hold(holding)

    _stand_between(writer, Timed)
    cpu = time.process_time()
    started = time.perf_counter()
    publisher = _spawn("publish-steady", p)
    await until(
        reactor,
        lambda: len(samples) >= total or publisher.poll() not in (None, 0),
        p["seconds"] + 60,
        "every message committed",
        interval=0.05,
    )
    wall = time.perf_counter() - started
    cpu = time.process_time() - cpu
    published = _result_of(publisher, "publish-steady")
    result = {
        **stats.distribution(samples),
        "committed": len(samples),
        "cpu_percent": 100 * cpu / wall,
        "batches": writer.batches_written - batches_before,
        "mean_batch": (writer.messages_written - written_before)
        / max(1, writer.batches_written - batches_before),
        "writer_busy_percent": 100 * sum(commits) / wall,
        "batch_write_ms": 1000 * stats.percentile(commits, 0.5),
        "publisher": published,
    }
    await tree.stop()
    return result


async def many_sites(reactor: Any, p: Params) -> Params:
    """
    Start mqttsvc with many sites (each its own connection): time to all
    connected, resident memory, idle CPU; then, if asked, the control
    plane's throughput and latency under concurrent load.
    """
    from bench.service import Tree, sleep, until

    raise_file_limit()
    rss_before = proc_status("VmRSS")
    tree = Tree(reactor, p["dsn"])
    count = len(p["sites"])
    started = time.perf_counter()
    await tree.start()
    connected = await until(
        reactor, lambda: tree.connected() >= count, p["timeout"], "every site connected", 0.01
    )
    await until(reactor, lambda: tree.subscribed() >= count, p["timeout"], "every site subscribed")
    await tree.ingest.writer.when_idle()
    await sleep(reactor, 1.0)
    rss = proc_status("VmRSS")
    cpu = time.process_time()
    wall = time.perf_counter()
    await sleep(reactor, p["idle_seconds"])
    idle_cpu = (time.process_time() - cpu) / (time.perf_counter() - wall)
    result: Params = {
        "sites": count,
        "connect_seconds": connected - started,
        "rss_mb": rss / 2**20,
        "rss_increase_mb": (rss - rss_before) / 2**20,
        "idle_cpu_percent": idle_cpu * 100,
    }
    if p.get("control_seconds"):
        result["control"] = await _control_loads(reactor, tree, p)
    result["rss_peak_mb"] = proc_status("VmHWM") / 2**20
    await tree.stop()
    return result


async def _control_loads(reactor: Any, tree: Any, p: Params) -> Params:
    from bench.service import until

    port = tree.port
    loads = {
        "healthz": ("/healthz", [""]),
        "site.status": (
            "/rpc",
            [
                json.dumps(
                    {"jsonrpc": "2.0", "id": i, "method": "site.status", "params": {"site_id": s}}
                )
                for i, s in enumerate(p["sites"])
            ],
        ),
        "service.status": (
            "/rpc",
            [json.dumps({"jsonrpc": "2.0", "id": 1, "method": "service.status"})],
        ),
    }
    results = {}
    for name, (path, bodies) in loads.items():
        load = {
            "port": port,
            "path": path,
            "bodies": bodies,
            "concurrency": p["concurrency"],
            "seconds": p["control_seconds"],
        }
        cpu = time.process_time()
        wall = time.perf_counter()
        process = _spawn("http-load", load)
        await until(
            reactor,
            lambda process=process: process.poll() is not None,  # type: ignore[misc]
            p["control_seconds"] + 60,
            name,
            0.05,
        )
        server_cpu = (time.process_time() - cpu) / (time.perf_counter() - wall)
        results[name] = {**_result_of(process, "http-load"), "server_cpu_percent": 100 * server_cpu}
    results["queries"] = await _status_queries(tree)
    return results


async def _status_queries(tree: Any) -> Params:
    """
    What C{service.status} spends per call: loading every site (the
    query, and building each L{SiteRow}), against a query of only the two
    columns it needs.
    """
    store = tree.store
    timings: dict[str, list[float]] = {
        "list_sites_ms": [],
        "status_columns_ms": [],
        "get_site_ms": [],
    }
    site_id = tree.supervisor.sites()[0].name
    for _ in range(5):
        started = time.perf_counter()
        await store.sites.get(site_id)
        timings["get_site_ms"].append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        await store.sites.all()
        timings["list_sites_ms"].append(1000 * (time.perf_counter() - started))
        started = time.perf_counter()
        await store.pool.query("SELECT site_id, status FROM mqtt_connection")
        timings["status_columns_ms"].append(1000 * (time.perf_counter() - started))
    return {name: sorted(values)[len(values) // 2] for name, values in timings.items()}


async def offline(reactor: Any, p: Params) -> Params:
    """
    Give C{devices} devices deadlines spread over C{spread} seconds and
    measure how late after its deadline each is marked offline (and
    committed), and the CPU it takes.
    """
    from bench.service import Tree, sleep, until
    from mqttsvc.records import DeviceKey, DeviceStatus

    tree = Tree(reactor, p["dsn"])
    await tree.start()
    detector = tree.ingest.devices
    writer = tree.ingest.writer
    count = p["devices"]
    deadlines: dict[Any, float] = {}
    marked = array("d")
    committed = array("d")
    changed = detector._on_change

    def on_change(changes: list[Any]) -> None:
        now = reactor.seconds()
        marked.extend(now - deadlines[c.key] for c in changes if c.status == "offline")
        changed(changes)

    detector._on_change = on_change
    submit = writer.submit

    def timed_submit(effects: list[Any]) -> Any:
        written = submit(effects)
        offline = [e.key for e in effects if isinstance(e, DeviceStatus) and e.status == "offline"]
        if offline:

            def record(result: object) -> object:
                now = reactor.seconds()
                committed.extend(now - deadlines[key] for key in offline)
                return result

            written.addCallback(record)
        return written

    writer.submit = timed_submit  # type: ignore[method-assign]
    cpu = time.process_time()
    wall = time.perf_counter()
    await sleep(reactor, 1.0)
    idle_cpu = (time.process_time() - cpu) / (time.perf_counter() - wall)

    rng = random.Random(1)
    sites = [f"bench-{i:04d}" for i in range(max(1, min(100, count // 100)))]
    keys = [DeviceKey(sites[i % len(sites)], "sensor", None, f"sn-{i:06d}") for i in range(count)]
    cpu = time.process_time()
    started = time.perf_counter()
    for key in keys:
        detector.seen(key, p["delay"] + rng.random() * p["spread"], 1.0)
        deadlines[key] = detector.deadline(key)  # type: ignore[assignment]
    register_seconds = time.perf_counter() - started
    register_cpu = time.process_time() - cpu
    first = min(deadlines.values())
    last = max(deadlines.values())

    cpu = time.process_time()
    wall = time.perf_counter()
    await until(
        reactor,
        lambda: len(committed) >= count,
        p["delay"] + p["spread"] + 60,
        "every device offline and committed",
        interval=0.05,
    )
    window = time.perf_counter() - wall
    window_cpu = time.process_time() - cpu
    result = {
        "devices": count,
        "register_seconds": register_seconds,
        "register_us_per_device": 1e6 * register_cpu / count,
        "registration_overran": reactor.seconds() > first and register_seconds > p["delay"],
        "deadline_span_s": last - first,
        "marked": {**stats.distribution(marked)},
        "committed": {**stats.distribution(committed)},
        "idle_cpu_percent": 100 * idle_cpu,
        "expiry_cpu_seconds": window_cpu,
        "expiry_cpu_percent": 100 * window_cpu / window,
        "expiry_us_per_device": 1e6 * window_cpu / count,
    }
    await tree.stop()
    return result


async def known_devices(reactor: Any, p: Params) -> Params:
    """
    Start mqttsvc on a database that knows C{devices} devices (inserted by
    SQL over C{sites} sites, all online as after a crash): the start-up
    time until the sites are reconciled (the devices loaded), the RSS it
    adds, the device events the start writes (one summary per site), and
    the offline detector's memory per known device, measured with
    tracemalloc on a second detector loaded through the same store path.
    """
    import gc
    import tracemalloc

    from twisted.internet.task import Clock

    from bench.service import Tree
    from mqttsvc.ingest.liveness import OfflineDetector

    count = p["devices"]
    rss_before = proc_status("VmRSS")
    tree = Tree(reactor, p["dsn"])
    started = time.perf_counter()
    await tree.start()
    start_seconds = time.perf_counter() - started
    rss = proc_status("VmRSS")
    tracked = len(tree.ingest.devices)
    await tree.ingest.writer.when_idle()
    [(events,)] = await tree.store.pool.query("SELECT count(*) FROM device_event")
    gc.collect()
    tracemalloc.start()
    try:
        detector = OfflineDetector(Clock(), lambda changes: None)
        site_ids: set[str] = set()
        async for page in tree.store.devices.known():
            detector.load(((k, s, i or 900.0, b) for k, s, i, b in page), "measured")
            site_ids.update(key.site_id for key, *_ in page)
        page = []  # the last one is not the detector's
        # Connected sites: every device has a deadline in the heap.
        for site_id in site_ids:
            detector.site_up(site_id, 2.5)
        # The pool's connection holds its last result until its next
        # query (not the detector's memory, and gone a moment later).
        for _ in range(4):
            await tree.store.pool.query("SELECT 1")
        gc.collect()
        traced = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    detector.stop()
    await tree.stop()
    return {
        "devices": count,
        "tracked": tracked,
        "start_seconds": start_seconds,
        "rss_increase_mb": (rss - rss_before) / 2**20,
        "rss_kb_per_device": (rss - rss_before) / 1024 / count,
        "detector_bytes_per_device": traced / count,
        "device_events_at_start": events,
        "sites": p["sites"],
    }


async def fairness(reactor: Any, p: Params) -> Params:
    """
    Two sites in one write lane: one floods (a backlog of C{flood}
    messages, each from a new device id, queued before mqttsvc starts),
    the other publishes C{rate} messages a second.  The quiet site's
    publish-to-commit latency while the flood drains, and how often each
    site was paused.
    """
    from bench.service import Tree, until

    flood_site, quiet_site = p["flood_site"], p["quiet_site"]
    tree = Tree(reactor, p["dsn"])
    writer = tree.ingest.writer
    samples = array("d")
    holds: dict[str, int] = {flood_site: 0, quiet_site: 0}
    flooded = [0]

    class Timed:
        def __init__(self, site: Any) -> None:
            self.site = site

        def committed(self, messages: list[Any]) -> None:
            now = time.time()
            if self.site.name == quiet_site:
                # Only what committed while the flood was still draining.
                if flooded[0] < p["flood"]:
                    samples.extend(now - workload.sent_at(m.payload) for m in messages)
            else:
                flooded[0] += len(messages)
            self.site.committed(messages)

        def hold(self, holding: bool) -> None:
            if holding:
                holds[self.site.name] += 1
            self.site.hold(holding)

    _stand_between(writer, Timed)
    pressed = [0]
    lane_pressure = writer.on_pressure

    def on_pressure(lane: int, pressing: bool) -> None:
        pressed[0] += pressing
        if lane_pressure is not None:
            lane_pressure(lane, pressing)

    writer.on_pressure = on_pressure
    started = time.perf_counter()
    await tree.start()
    await until(reactor, lambda: tree.subscribed() >= 2, 30, "both sites subscribed")
    # The flood (queued on the broker) drains from the moment its site
    # connects; the quiet site publishes meanwhile.
    quiet = _spawn("publish-steady", {**p, "sites": [quiet_site]})
    await until(
        reactor,
        lambda: flooded[0] >= p["flood"],
        120 + p["flood"] / 1000,
        "the flood committed",
        interval=0.05,
    )
    flood_seconds = time.perf_counter() - started
    published = _result_of(quiet, "publish-steady")
    await tree.stop()
    return {
        **stats.distribution(samples),
        "quiet_sent": published["sent"],
        "quiet_messages": len(samples),
        "flood_messages": flooded[0],
        "flood_seconds": flood_seconds,
        "flood_rate": flooded[0] / flood_seconds,
        "flood_holds": holds[flood_site],
        "quiet_holds": holds[quiet_site],
        "lane_pressed": pressed[0],
    }


def micro(p: Params) -> Params:
    from bench.micro import measure

    return measure(p["dsn"], p["batch"])


BLOCKING: dict[str, Callable[[Params], Params]] = {
    "micro": micro,
    "drain-bare": drain_bare,
    "drain-old": drain_old,
    "publish-steady": publish_steady,
    "latency-bare": latency_bare,
    "sites-bare": sites_bare,
    "http-load": http_load,
}

REACTOR: dict[str, Callable[[Any, Params], Awaitable[Params]]] = {
    "ingest-mqttsvc": ingest_mqttsvc,
    "latency-mqttsvc": latency_mqttsvc,
    "many-sites": many_sites,
    "offline": offline,
    "known-devices": known_devices,
    "fairness": fairness,
}


def _log_warnings() -> None:
    from twisted.logger import (
        FilteringLogObserver,
        LogLevel,
        LogLevelFilterPredicate,
        globalLogBeginner,
        textFileLogObserver,
    )

    predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.warn)
    observer = FilteringLogObserver(textFileLogObserver(sys.stderr), [predicate])
    globalLogBeginner.beginLoggingTo([observer], redirectStandardIO=False)


def main(argv: list[str]) -> int:
    role, params = argv[0], json.loads(argv[1])
    if role in BLOCKING:
        _print_result(BLOCKING[role](params))
    else:
        from twisted.internet import reactor as installed
        from twisted.internet.defer import Deferred
        from twisted.internet.task import react

        _log_warnings()

        async def run(reactor: Any) -> None:
            _print_result(await REACTOR[role](reactor, params))

        # react() ends the process, with 1 and a traceback on a failure.
        react(lambda reactor: Deferred.fromCoroutine(run(reactor)), _reactor=installed)
    return 0


def _print_result(result: Params) -> None:
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
