"""
C{python -m bench [SCENARIO ...]}: run the scenarios, repeat each
measurement, and write C{BENCHMARKS.md} (and the raw results as JSON).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any

import psycopg2

from bench import cluster, environment, report, wire, workload
from bench.child import parse_result
from bench.environment import Broker, Database
from bench.servers import free_port
from mqttsvc.cluster.keeper import HANDOVER_RATE, LEASE_RENEW, LEASE_TTL

Params = dict[str, Any]

SCENARIOS = (
    "ingest",
    "latency",
    "sites",
    "offline",
    "control",
    "profile",
    "micro",
    "devices",
    "fairness",
    "cluster",
)

#: Scenario sizes: C{full} is what C{make bench} runs and the issue's
#: targets refer to; C{quick} for a faster look; C{tiny} for the smoke test
#: (tests/test_bench_smoke.py), whose time goes mostly to starting a child
#: process, a broker and a database per measurement: its durations are as
#: short as still give every figure at least one sample.  C{fairness}
#: keeps a flood of 20,000: its quiet site's latency is sampled only while
#: the flood drains, which must outlast the start of the quiet site's
#: publisher (a child process), or the figures are NaN.  C{cluster} runs
#: its failover series once, with C{cluster_failovers} kills inside it,
#: and its throughput C{--reps} times; its leases are the defaults but for
#: C{tiny}, whose short ones keep the smoke test's failover to seconds.
SIZES: dict[str, Params] = {
    "full": {
        "ingest_sites": 10,
        "ingest_messages": 100_000,
        "old_messages": 5_000,
        "variant_messages": 15_000,
        "latency_sites": 10,
        "latency_rate": 5000,
        "latency_seconds": 30,
        "many_sites": 1000,
        "idle_seconds": 5,
        "devices": 100_000,
        "offline_delay": 5.0,
        "offline_spread": 10.0,
        "control_seconds": 5,
        "control_concurrency": 16,
        "profile_messages": 30_000,
        "micro_batch": 1000,
        "known_devices": 300_000,
        "known_sites": 10,
        "flood_messages": 60_000,
        "quiet_rate": 20,
        "fairness_seconds": 5,
        "cluster_sites": 1000,
        "cluster_ttl": LEASE_TTL,
        "cluster_renew": LEASE_RENEW,
        "cluster_rate": HANDOVER_RATE,
        "cluster_failovers": 5,
        "cluster_short_ttl": 3.0,
        "cluster_short_renew": 0.5,
        "cluster_short_rate": 100,
        "cluster_short_failovers": 3,
        "cluster_ingest_sites": 12,
        "cluster_messages": 100_000,
    },
    "quick": {
        "ingest_sites": 10,
        "ingest_messages": 20_000,
        "old_messages": 2_000,
        "variant_messages": 10_000,
        "latency_sites": 10,
        "latency_rate": 5000,
        "latency_seconds": 5,
        "many_sites": 1000,
        "idle_seconds": 3,
        "devices": 100_000,
        "offline_delay": 5.0,
        "offline_spread": 3.0,
        "control_seconds": 3,
        "control_concurrency": 16,
        "profile_messages": 10_000,
        "micro_batch": 1000,
        "known_devices": 100_000,
        "known_sites": 10,
        "flood_messages": 30_000,
        "quiet_rate": 20,
        "fairness_seconds": 3,
        "cluster_sites": 60,
        "cluster_ttl": LEASE_TTL,
        "cluster_renew": LEASE_RENEW,
        "cluster_rate": HANDOVER_RATE,
        "cluster_failovers": 2,
        "cluster_short_ttl": 3.0,
        "cluster_short_renew": 0.5,
        "cluster_short_rate": 100,
        "cluster_short_failovers": 1,
        "cluster_ingest_sites": 12,
        "cluster_messages": 20_000,
    },
    "tiny": {
        "ingest_sites": 5,
        "ingest_messages": 200,
        "old_messages": 50,
        "variant_messages": 100,
        "latency_sites": 5,
        "latency_rate": 200,
        "latency_seconds": 0.5,
        "many_sites": 5,
        "idle_seconds": 0.2,
        "devices": 1000,
        "offline_delay": 0.5,
        "offline_spread": 0.5,
        "control_seconds": 0.5,
        "control_concurrency": 2,
        "profile_messages": 200,
        "micro_batch": 50,
        "known_devices": 2000,
        "known_sites": 2,
        "flood_messages": 20_000,
        "quiet_rate": 20,
        "fairness_seconds": 0.5,
        "cluster_sites": 6,
        "cluster_ttl": 2.0,
        "cluster_renew": 0.4,
        "cluster_rate": HANDOVER_RATE,
        "cluster_failovers": 1,
        "cluster_short_ttl": 2.0,
        "cluster_short_renew": 0.4,
        "cluster_short_rate": 100,
        "cluster_short_failovers": 0,
        "cluster_ingest_sites": 6,
        "cluster_messages": 300,
    },
}


class Runner:
    """
    Runs children and keeps their logs in one working directory.
    """

    def __init__(self, workdir: Path, verbose: bool = True) -> None:
        self.workdir = workdir
        self.verbose = verbose
        self._runs = 0

    def say(self, text: str) -> None:
        if self.verbose:
            print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)

    def child(self, role: str, params: Params, timeout: float) -> Any:
        """
        Run one child to its end (killed after C{timeout} seconds) and
        return its result.
        """
        self._runs += 1
        machine = environment.Others()
        log = self.workdir / f"{self._runs:03d}-{role}.log"
        with log.open("w") as stderr:
            try:
                done = subprocess.run(
                    [sys.executable, "-m", "bench.child", role, json.dumps(params)],
                    stdout=subprocess.PIPE,
                    stderr=stderr,
                    text=True,
                    timeout=timeout,
                )
            except subprocess.TimeoutExpired:
                raise RuntimeError(
                    f"{role} did not finish within {timeout:g}s; see {log}"
                ) from None
        if done.returncode != 0:
            tail = log.read_text(errors="replace")[-3000:]
            raise RuntimeError(f"{role} failed with {done.returncode}:\n{tail}")
        result = parse_result(done.stdout)
        result.update(machine.figures())
        return result


def _count(dsn: str, sql: str) -> int:
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(sql)
            row = cur.fetchone()
            return int(row[0] or 0) if row else 0
    finally:
        conn.close()


def ingest_rep(run: Runner, size: Params, rep: int) -> Params:
    """
    One repetition of the ingest scenario: one backlog, queued for three
    consumers (mqttsvc, the bare client, the old design), drained by each
    in turn.
    """
    sites = workload.site_ids(size["ingest_sites"])
    count = size["ingest_messages"]
    old_count = min(count, size["old_messages"])
    mqttsvc_ids = [workload.mqttsvc_client_id(s) for s in sites]
    bare_ids = [f"bare_{s}" for s in sites]
    old_ids = [f"old_{s}" for s in sites]
    timeout = 120 + count / 500
    with (
        Broker(run.workdir / f"ingest-{rep}") as broker,
        Database("ingest") as db,
        Database("old") as old_db,
    ):
        workload.insert_sites(db.dsn, sites, broker.port)
        for ids in (mqttsvc_ids, bare_ids, old_ids):
            workload.prime(broker.port, ids, sites)
        publish_seconds, readings = workload.publish_backlog(broker.port, sites, count)
        run.say(f"ingest {rep}: {count} messages queued in {publish_seconds:.1f}s")

        def bare() -> Params:
            params = {"port": broker.port, "client_ids": bare_ids, "expected": count}
            return run.child("drain-bare", {**params, "timeout": timeout}, timeout + 30)

        def mqttsvc() -> Params:
            params = {"dsn": db.dsn, "expected": count, "timeout": timeout}
            return run.child("ingest-mqttsvc", params, timeout + 60)

        # Alternate who goes first, so that neither always meets the
        # broker with more queued for the others.
        if rep % 2 == 0:
            bare_result, mqttsvc_result = bare(), mqttsvc()
        else:
            mqttsvc_result, bare_result = mqttsvc(), bare()
        old_params = {"port": broker.port, "dsn": old_db.dsn, "client_ids": old_ids}
        old_result = run.child(
            "drain-old", {**old_params, "expected": old_count, "timeout": timeout}, timeout + 30
        )
        old_result["rate"] = old_result["messages"] / old_result["seconds"]
        bare_result["rate"] = bare_result["messages"] / bare_result["seconds"]
        left = sum(wire.count_queued(broker.port, c, wait=0.3) for c in mqttsvc_ids)
        counted = _count(db.dsn, "SELECT sum(message_count) FROM discovered_topic")
        stored = _count(db.dsn, "SELECT count(*) FROM sensor_reading")
        dead = _count(db.dsn, "SELECT count(*) FROM dead_letter")
    result = {
        "messages": count,
        "publish_seconds": publish_seconds,
        "bare": bare_result,
        "mqttsvc": mqttsvc_result,
        "old": old_result,
        "check": {
            "topics_counted": counted,
            "readings_expected": readings,
            "readings_stored": stored,
            "dead_letters": dead,
            "left_on_broker": left,
            "ok": counted == count and stored == readings and dead == 0 and left == 0,
        },
        "ratio_vs_bare": mqttsvc_result["rate"] / bare_result["rate"],
        "speedup_vs_old": mqttsvc_result["rate"] / old_result["rate"],
    }
    run.say(
        f"ingest {rep}: mqttsvc {mqttsvc_result['rate']:.0f}/s, bare {bare_result['rate']:.0f}/s, "
        f"old {old_result['rate']:.0f}/s, checks {'ok' if result['check']['ok'] else 'FAILED'}"
    )
    return result


#: Ingest variants: (label, broker overrides, site protocol).
VARIANTS: list[tuple[str, dict[str, str], str]] = [
    ("MQTT 3.1.1, broker window 1000 (as the headline)", {}, "3.1.1"),
    (
        "MQTT 3.1.1, broker window 20 (Mosquitto's default)",
        {"max_inflight_messages": "20"},
        "3.1.1",
    ),
    (
        "MQTT 5, broker window 20; mqttsvc asks for Receive Maximum 1000",
        {"max_inflight_messages": "20"},
        "5",
    ),
]


def variant_rep(run: Runner, size: Params, rep: int, variant: int) -> Params:
    label, overrides, protocol = VARIANTS[variant]
    sites = workload.site_ids(size["ingest_sites"])
    count = size["variant_messages"]
    ids = [workload.mqttsvc_client_id(s) for s in sites]
    timeout = 120 + count / 200
    with (
        Broker(run.workdir / f"variant-{variant}-{rep}", overrides) as broker,
        Database("variant") as db,
    ):
        workload.insert_sites(db.dsn, sites, broker.port, protocol)
        workload.prime(broker.port, ids, sites)
        workload.publish_backlog(broker.port, sites, count)
        params = {"dsn": db.dsn, "expected": count, "timeout": timeout}
        result = run.child("ingest-mqttsvc", params, timeout + 60)
        left = sum(wire.count_queued(broker.port, c, wait=0.3) for c in ids)
    result["label"] = label
    result["left_on_broker"] = left
    run.say(f"ingest variant {label} {rep}: {result['rate']:.0f}/s")
    return result


def latency_rep(run: Runner, size: Params, rep: int) -> Params:
    sites = workload.site_ids(size["latency_sites"])
    rate, seconds = size["latency_rate"], size["latency_seconds"]
    with Broker(run.workdir / f"latency-{rep}") as broker, Database("latency") as db:
        workload.insert_sites(db.dsn, sites, broker.port)
        common = {"port": broker.port, "sites": sites, "rate": rate, "seconds": seconds}
        mqttsvc = run.child("latency-mqttsvc", {**common, "dsn": db.dsn}, seconds + 120)
        # The bare client's sessions are made only now, so that they hold
        # nothing from mqttsvc's run.
        bare_ids = [f"bare_{s}" for s in sites]
        workload.prime(broker.port, bare_ids, sites)
        bare = run.child("latency-bare", {**common, "client_ids": bare_ids}, seconds + 120)
    run.say(
        f"latency {rep}: mqttsvc p50 {mqttsvc['p50_ms']:.1f} p99 {mqttsvc['p99_ms']:.1f} ms; "
        f"bare p99 {bare['p99_ms']:.1f} ms"
    )
    return {"mqttsvc": mqttsvc, "bare": bare}


def many_sites_rep(run: Runner, size: Params, rep: int, control: bool, bare: bool) -> Params:
    sites = workload.site_ids(size["many_sites"])
    with Broker(run.workdir / f"sites-{rep}") as broker, Database("sites") as db:
        workload.insert_sites(db.dsn, sites, broker.port)
        params: Params = {
            "dsn": db.dsn,
            "sites": sites,
            "timeout": 120,
            "idle_seconds": size["idle_seconds"],
        }
        if control:
            params["control_seconds"] = size["control_seconds"]
            params["concurrency"] = size["control_concurrency"]
        budget = 300 + 4 * size["control_seconds"] + size["idle_seconds"]
        mqttsvc = run.child("many-sites", params, budget)
        result: Params = {"mqttsvc": mqttsvc}
        if bare:
            bare_params = {
                "port": broker.port,
                "sites": sites,
                "idle_seconds": size["idle_seconds"],
                "timeout": 120,
            }
            result["bare"] = run.child("sites-bare", bare_params, 240)
    run.say(
        f"sites {rep}: {len(sites)} connected in {mqttsvc['connect_seconds']:.2f}s, "
        f"RSS {mqttsvc['rss_mb']:.0f} MB, idle CPU {mqttsvc['idle_cpu_percent']:.1f}%"
    )
    return result


def offline_rep(run: Runner, size: Params, rep: int) -> Params:
    with Database("offline") as db:
        params = {
            "dsn": db.dsn,
            "devices": size["devices"],
            "delay": size["offline_delay"],
            "spread": size["offline_spread"],
        }
        result: Params = run.child(
            "offline", params, 180 + size["offline_delay"] + size["offline_spread"]
        )
    run.say(
        f"offline {rep}: marked p99 {result['marked']['p99_ms']:.1f} ms, "
        f"committed p99 {result['committed']['p99_ms']:.1f} ms"
    )
    return result


def profile_run(run: Runner, size: Params) -> Params:
    sites = workload.site_ids(size["ingest_sites"])
    count = size["profile_messages"]
    ids = [workload.mqttsvc_client_id(s) for s in sites]
    with Broker(run.workdir / "profile") as broker, Database("profile") as db:
        workload.insert_sites(db.dsn, sites, broker.port)
        workload.prime(broker.port, ids, sites)
        workload.publish_backlog(broker.port, sites, count)
        params = {"dsn": db.dsn, "expected": count, "timeout": 300, "profile": True}
        result: Params = run.child("ingest-mqttsvc", params, 400)
    run.say(f"profile: {count} messages at {result['rate']:.0f}/s under cProfile")
    return result


def devices_rep(run: Runner, size: Params, rep: int) -> Params:
    """
    Start-up with many known devices (inserted by SQL, all online as after
    a crash) and the memory each costs.
    """
    sites = workload.site_ids(size["known_sites"])
    count = size["known_devices"]
    with Database("devices") as db:
        # A port nothing listens on: the start-up measured is the load,
        # not the connects.
        workload.insert_sites(db.dsn, sites, free_port())
        conn = psycopg2.connect(db.dsn)
        try:
            with conn, conn.cursor() as cur:
                cur.execute(
                    "INSERT INTO sensor (site_id, sensor_id, status, first_seen_at, "
                    "last_seen_at, last_payload) "
                    "SELECT (%s::text[])[1 + i %% %s], 'sn-' || i, 'online', now(), now(), "
                    "'{\"value\": 1}' FROM generate_series(1, %s) AS i",
                    (sites, len(sites), count),
                )
        finally:
            conn.close()
        params = {"dsn": db.dsn, "devices": count, "sites": len(sites)}
        result: Params = run.child("known-devices", params, 120 + count / 1000)
    run.say(
        f"devices {rep}: {count} known, started in {result['start_seconds']:.2f}s, "
        f"{result['detector_bytes_per_device']:.0f} bytes each, "
        f"{result['device_events_at_start']} device events"
    )
    return result


def _same_lane(lanes: int = 2) -> tuple[str, str]:
    """
    A flooding and a quiet site id that the writer puts in one lane.
    """
    for i in range(100):
        flood, quiet = f"bench-flood-{i}", f"bench-quiet-{i}"
        if zlib.crc32(flood.encode()) % lanes == zlib.crc32(quiet.encode()) % lanes:
            return flood, quiet
    raise AssertionError("no pair of site ids in one lane")


def fairness_rep(run: Runner, size: Params, rep: int) -> Params:
    """
    A site flooding its lane with new device ids beside a quiet site in
    the same lane.
    """
    flood, quiet = _same_lane()
    count = size["flood_messages"]
    with Broker(run.workdir / f"fairness-{rep}") as broker, Database("fairness") as db:
        workload.insert_sites(db.dsn, [flood, quiet], broker.port)
        workload.prime(
            broker.port, [workload.mqttsvc_client_id(s) for s in (flood, quiet)], [flood, quiet]
        )
        now = time.time()
        packets = [
            wire.publish_packet(
                f"{flood}/sensor/new-{i:07d}/data".encode(),
                b'{"ts":%.6f,"value":1}' % (now + i / 1e6),
                i % 65535 + 1,
            )
            for i in range(count)
        ]
        wire.publish_all(broker.port, packets, timeout=60 + count / 1000)
        params = {
            "dsn": db.dsn,
            "port": broker.port,
            "flood": count,
            "flood_site": flood,
            "quiet_site": quiet,
            "rate": size["quiet_rate"],
            "seconds": size["fairness_seconds"],
        }
        result: Params = run.child("fairness", params, 180 + count / 500)
    run.say(
        f"fairness {rep}: {count} new devices at {result['flood_rate']:.0f}/s; quiet site "
        f"p99 {result['p99_ms']:.0f} ms, max {result['max_ms']:.0f} ms, held "
        f"{result['quiet_holds']} times; lane pressed {result['lane_pressed']} times"
    )
    return result


def micro_rep(run: Runner, size: Params) -> Params:
    with Database("micro") as db:
        result: Params = run.child("micro", {"dsn": db.dsn, "batch": size["micro_batch"]}, 300)
    run.say(f"micro: build {result['build_ms']:.0f} ms, server {result['server_ms']:.0f} ms")
    return result


def run_scenarios(names: list[str], size: Params, reps: int, run: Runner) -> dict[str, Any]:
    """
    Run the named scenarios, each C{reps} times; the results by scenario.
    """
    results: dict[str, Any] = {}
    if "ingest" in names:
        results["ingest"] = [ingest_rep(run, size, r) for r in range(reps)]
        results["ingest_variants"] = [
            [variant_rep(run, size, r, v) for r in range(reps)] for v in range(len(VARIANTS))
        ]
    if "latency" in names:
        results["latency"] = [latency_rep(run, size, r) for r in range(reps)]
    if "sites" in names or "control" in names:
        reps_results = [
            many_sites_rep(run, size, r, "control" in names, "sites" in names) for r in range(reps)
        ]
        if "sites" in names:
            results["sites"] = reps_results
        if "control" in names:
            results["control"] = [r["mqttsvc"]["control"] for r in reps_results]
    if "offline" in names:
        results["offline"] = [offline_rep(run, size, r) for r in range(reps)]
    if "profile" in names:
        results["profile"] = profile_run(run, size)
    if "micro" in names:
        results["micro"] = [micro_rep(run, size) for _ in range(reps)]
    if "devices" in names:
        results["devices"] = [devices_rep(run, size, r) for r in range(reps)]
    if "fairness" in names:
        results["fairness"] = [fairness_rep(run, size, r) for r in range(reps)]
    if "cluster" in names:
        results["cluster"] = cluster.scenario(run, size, reps)
    return results


def _parse_set(values: list[str]) -> Params:
    overrides: Params = {}
    for item in values:
        key, _, value = item.partition("=")
        overrides[key] = float(value) if "." in value else int(value)
    return overrides


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description="Benchmark mqttsvc against its baselines."
    )
    parser.add_argument(
        "scenarios", nargs="*", metavar="SCENARIO", help=f"any of {', '.join(SCENARIOS)} (all)"
    )
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--quick", action="store_const", const="quick", dest="size")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (3)")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override one size"
    )
    parser.add_argument("--output", type=Path, default=Path("BENCHMARKS.md"))
    parser.add_argument("--json", type=Path, default=None, help="also write the raw results")
    parser.add_argument("--keep", action="store_true", help="keep the working directory")
    parser.add_argument(
        "--render",
        type=Path,
        default=None,
        metavar="JSON",
        help="only rewrite the report from the raw results of an earlier run",
    )
    args = parser.parse_args(argv)
    if args.render is not None:
        args.output.write_text(report.render(json.loads(args.render.read_text()), args.output))
        return 0
    names = args.scenarios or list(SCENARIOS)
    unknown = set(names) - set(SCENARIOS)
    if unknown:
        parser.error(f"unknown scenarios {sorted(unknown)}; choose from {', '.join(SCENARIOS)}")
    size = {**SIZES[args.size], **_parse_set(args.set)}
    environment.raise_file_limit()
    workdir = Path(tempfile.mkdtemp(prefix="mqttsvc-bench-"))
    run = Runner(workdir)
    started = time.time()
    try:
        results = run_scenarios(names, size, args.reps, run)
    finally:
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    document = {
        "size": args.size,
        "sizes": size,
        "reps": args.reps,
        "scenarios": names,
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(started)),
        "duration_s": time.time() - started,
        "machine": environment.machine(),
        "versions": environment.versions(),
        "broker": environment.BROKER_SETTINGS,
        "results": results,
    }
    if args.json is not None:
        args.json.write_text(json.dumps(document, indent=1))
    args.output.write_text(report.render(document, args.output))
    run.say(f"wrote {args.output} after {document['duration_s']:.0f}s")
    return 0
