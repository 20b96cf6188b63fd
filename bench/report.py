"""
C{BENCHMARKS.md} from the results of a run.

Everything but the analysis is generated.  The analysis (why a target is
missed, what to change) is written by hand between the markers
L{ANALYSIS_START} and L{ANALYSIS_END}; a new run keeps it.
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.cluster import POLL as POLL_SECONDS
from bench.stats import percentile, summary
from mqttsvc.cluster.keeper import HANDOVER_RATE, LEASE_RENEW, LEASE_TTL

ANALYSIS_START = "<!-- analysis: written by hand, kept by `make bench` -->"
ANALYSIS_END = "<!-- /analysis -->"

Row = tuple[str, str, Sequence[float], str, Callable[[float], bool] | None]


def _fmt(value: float, unit: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if unit in ("x",):
        return f"{value:.2f}"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def _table(rows: list[Row]) -> list[str]:
    out = [
        "| figure | unit | median | min | max | target | met |",
        "| --- | --- | ---: | ---: | ---: | --- | --- |",
    ]
    for name, unit, values, target, check in rows:
        s = summary(values)
        met = "" if check is None else ("yes" if check(s["median"]) else "**no**")
        out.append(
            f"| {name} | {unit} | {_fmt(s['median'], unit)} | {_fmt(s['min'], unit)} | "
            f"{_fmt(s['max'], unit)} | {target} | {met} |"
        )
    return out


def _get(items: Sequence[Any], *path: str) -> list[float]:
    values = []
    for item in items:
        for key in path:
            item = item[key]
        values.append(item)
    return values


def _ingest(results: dict[str, Any]) -> list[Row]:
    reps = results["ingest"]
    rows: list[Row] = [
        ("mqttsvc: ingest rate", "msg/s", _get(reps, "mqttsvc", "rate"), "", None),
        ("bare paho client: drain rate", "msg/s", _get(reps, "bare", "rate"), "", None),
        (
            "**mqttsvc / bare client**",
            "x",
            _get(reps, "ratio_vs_bare"),
            "≥ 0.6",
            lambda v: v >= 0.6,
        ),
        ("old design: per-message transaction", "msg/s", _get(reps, "old", "rate"), "", None),
        ("**mqttsvc speed-up over the old design**", "x", _get(reps, "speedup_vs_old"), "", None),
        ("mqttsvc: CPU per message", "µs", _get(reps, "mqttsvc", "cpu_us_per_message"), "", None),
        (
            "bare client: CPU per message",
            "µs",
            [1e6 * r["bare"]["cpu_seconds"] / r["bare"]["messages"] for r in reps],
            "",
            None,
        ),
        ("mqttsvc: mean batch", "messages", _get(reps, "mqttsvc", "mean_batch"), "", None),
        ("mqttsvc: median batch write", "ms", _get(reps, "mqttsvc", "batch_write_ms"), "", None),
        (
            "mqttsvc: writer busy (writing / wall)",
            "%",
            _get(reps, "mqttsvc", "writer_busy_percent"),
            "",
            None,
        ),
        ("mqttsvc: peak RSS while ingesting", "MB", _get(reps, "mqttsvc", "rss_peak_mb"), "", None),
        (
            "every message committed and acked (checks passed)",
            "reps",
            [sum(1 for r in reps if r["check"]["ok"])],
            f"{len(reps)} of {len(reps)}",
            lambda v: v == len(reps),
        ),
    ]
    for variant in results.get("ingest_variants", []):
        label = variant[0]["label"]
        rows.append((f"variant {label}: rate", "msg/s", _get(variant, "rate"), "", None))
        ratios = [v["rate"] / r["bare"]["rate"] for v, r in zip(variant, reps, strict=False)]
        rows.append((f"variant {label}: / bare client", "x", ratios, "", None))
    return rows


def _latency(results: dict[str, Any]) -> list[Row]:
    reps = results["latency"]
    return [
        ("achieved publish rate", "msg/s", _get(reps, "mqttsvc", "publisher", "rate"), "", None),
        ("mqttsvc: publish-to-commit p50", "ms", _get(reps, "mqttsvc", "p50_ms"), "", None),
        (
            "**mqttsvc: publish-to-commit p99**",
            "ms",
            _get(reps, "mqttsvc", "p99_ms"),
            "≤ 50",
            lambda v: v <= 50,
        ),
        ("mqttsvc: max", "ms", _get(reps, "mqttsvc", "max_ms"), "", None),
        ("bare client: publish-to-receive p50", "ms", _get(reps, "bare", "p50_ms"), "", None),
        ("bare client: publish-to-receive p99", "ms", _get(reps, "bare", "p99_ms"), "", None),
        (
            "mqttsvc p99 / bare client p99",
            "x",
            [r["mqttsvc"]["p99_ms"] / r["bare"]["p99_ms"] for r in reps],
            "",
            None,
        ),
        ("mqttsvc: CPU while loaded", "%", _get(reps, "mqttsvc", "cpu_percent"), "", None),
        ("mqttsvc: mean batch", "messages", _get(reps, "mqttsvc", "mean_batch"), "", None),
        ("mqttsvc: median batch write", "ms", _get(reps, "mqttsvc", "batch_write_ms"), "", None),
    ]


def _sites(results: dict[str, Any]) -> list[Row]:
    reps = results["sites"]
    count = reps[0]["mqttsvc"]["sites"]
    rows: list[Row] = [
        (
            f"**mqttsvc: start to all {count} connected**",
            "s",
            _get(reps, "mqttsvc", "connect_seconds"),
            "≤ 10",
            lambda v: v <= 10,
        ),
        (
            "**mqttsvc: resident memory, all connected**",
            "MB",
            _get(reps, "mqttsvc", "rss_mb"),
            "≤ 150",
            lambda v: v <= 150,
        ),
        (
            "mqttsvc: of which the service tree and sites",
            "MB",
            _get(reps, "mqttsvc", "rss_increase_mb"),
            "",
            None,
        ),
        (
            "mqttsvc: peak RSS (incl. control-plane load)",
            "MB",
            _get(reps, "mqttsvc", "rss_peak_mb"),
            "",
            None,
        ),
        ("mqttsvc: CPU while idle", "%", _get(reps, "mqttsvc", "idle_cpu_percent"), "", None),
    ]
    if "bare" in reps[0]:
        rows += [
            (
                "bare paho clients: all connected",
                "s",
                _get(reps, "bare", "connect_seconds"),
                "",
                None,
            ),
            ("bare paho clients: RSS", "MB", _get(reps, "bare", "rss_mb"), "", None),
            (
                "bare paho clients: of which the clients",
                "MB",
                _get(reps, "bare", "rss_increase_mb"),
                "",
                None,
            ),
            (
                "bare paho clients: CPU while idle",
                "%",
                _get(reps, "bare", "idle_cpu_percent"),
                "",
                None,
            ),
            (
                "mqttsvc / bare: memory for the sites",
                "x",
                [r["mqttsvc"]["rss_increase_mb"] / r["bare"]["rss_increase_mb"] for r in reps],
                "",
                None,
            ),
        ]
    return rows


def _offline(results: dict[str, Any]) -> list[Row]:
    reps = results["offline"]
    return [
        ("devices", "", _get(reps, "devices"), "", None),
        ("deadlines spread over", "s", _get(reps, "deadline_span_s"), "", None),
        ("marked offline after deadline: p50", "ms", _get(reps, "marked", "p50_ms"), "", None),
        (
            "**marked offline after deadline: p99**",
            "ms",
            _get(reps, "marked", "p99_ms"),
            "≤ 1000",
            lambda v: v <= 1000,
        ),
        ("marked offline: max", "ms", _get(reps, "marked", "max_ms"), "", None),
        (
            "offline committed after deadline: p99",
            "ms",
            _get(reps, "committed", "p99_ms"),
            "",
            None,
        ),
        ("CPU to register a device (seen)", "µs", _get(reps, "register_us_per_device"), "", None),
        (
            "CPU per device expiring (mark + write)",
            "µs",
            _get(reps, "expiry_us_per_device"),
            "",
            None,
        ),
        ("CPU while deadlines expire", "%", _get(reps, "expiry_cpu_percent"), "", None),
        ("CPU while idle, before", "%", _get(reps, "idle_cpu_percent"), "", None),
    ]


def _devices(results: dict[str, Any]) -> list[Row]:
    reps = results["devices"]
    return [
        ("known devices (inserted by SQL, all online)", "", _get(reps, "devices"), "", None),
        ("**start-up until every site is reconciled**", "s", _get(reps, "start_seconds"), "", None),
        ("RSS added by the start-up", "MB", _get(reps, "rss_increase_mb"), "", None),
        (
            "**offline detector memory per known device**",
            "bytes",
            _get(reps, "detector_bytes_per_device"),
            "< 529 (before issue 14)",
            lambda v: v < 529,
        ),
        (
            "device events written by the start-up (one per site)",
            "",
            _get(reps, "device_events_at_start"),
            "",
            None,
        ),
    ]


def _fairness(results: dict[str, Any]) -> list[Row]:
    reps = results["fairness"]
    return [
        ("flood: messages of new device ids", "", _get(reps, "flood_messages"), "", None),
        ("flood drained at", "msg/s", _get(reps, "flood_rate"), "", None),
        ("quiet site: messages during the flood", "", _get(reps, "quiet_messages"), "", None),
        ("quiet site publish-to-commit: p50", "ms", _get(reps, "p50_ms"), "", None),
        ("**quiet site publish-to-commit: p99**", "ms", _get(reps, "p99_ms"), "", None),
        ("quiet site publish-to-commit: max", "ms", _get(reps, "max_ms"), "", None),
        ("flooding site held alone", "times", _get(reps, "flood_holds"), "", None),
        (
            "**quiet site paused (held, or its lane pressed)**",
            "times",
            [r["quiet_holds"] + r["lane_pressed"] for r in reps],
            "0",
            lambda v: v == 0,
        ),
    ]


def _control(results: dict[str, Any]) -> list[Row]:
    reps = results["control"]
    rows: list[Row] = [
        ("baseline GET /healthz", "req/s", _get(reps, "healthz", "rate"), "", None),
        ("baseline GET /healthz p99", "ms", _get(reps, "healthz", "p99_ms"), "", None),
    ]
    for method in ("site.status", "service.status"):
        rows += [
            (
                f"**{method}**",
                "req/s",
                _get(reps, method, "rate"),
                "≥ 1,500",
                lambda v: v >= 1500,
            ),
            (f"**{method} p99**", "ms", _get(reps, method, "p99_ms"), "≤ 20", lambda v: v <= 20),
            (f"{method} p50", "ms", _get(reps, method, "p50_ms"), "", None),
            (
                f"{method} / healthz rate",
                "x",
                [r[method]["rate"] / r["healthz"]["rate"] for r in reps],
                "",
                None,
            ),
            (f"{method}: server CPU", "%", _get(reps, method, "server_cpu_percent"), "", None),
            (f"{method}: errors", "", _get(reps, method, "errors"), "0", lambda v: v == 0),
        ]
    rows += [
        (
            "`store.sites.all()` (what service.status ran per call before it kept counts)",
            "ms",
            _get(reps, "queries", "list_sites_ms"),
            "",
            None,
        ),
        (
            "`SELECT site_id, status` (what it would need from the database)",
            "ms",
            _get(reps, "queries", "status_columns_ms"),
            "",
            None,
        ),
        (
            "`store.sites.get()` (what site.status runs only for a site that is not running)",
            "ms",
            _get(reps, "queries", "get_site_ms"),
            "",
            None,
        ),
    ]
    return rows


DistributionRow = tuple[str, str, Sequence[float], str]


def _distribution_table(rows: list[DistributionRow]) -> list[str]:
    """
    p50, p99 and max of samples (nearest rank: with a few samples p99 is
    their largest).
    """
    out = [
        "| figure | unit | p50 | p99 | max | samples | bound |",
        "| --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for name, unit, values, bound in rows:
        out.append(
            f"| {name} | {unit} | {_fmt(percentile(values, 0.5), unit)} | "
            f"{_fmt(percentile(values, 0.99), unit)} | "
            f"{_fmt(max(values) if values else math.nan, unit)} | {len(values)} | {bound} |"
        )
    return out


def _failover_series(series: dict[str, Any], title: str) -> list[str]:
    leasing = series["leasing"]
    failovers, joins = series["failovers"], series["joins"]
    sites, count = series["sites"], series["instances"]
    bound = max(f["bound_s"] for f in failovers)
    paced = max(j["paced_s"] for j in joins)
    lines = [
        f"#### {title}: {sites:,} sites on {count} instances; "
        + _leasing(leasing["ttl"], leasing["renew"], leasing["rate"]),
        "",
        f"Cold start (every site enabled at once on three live instances): all connected "
        f"{series['cold_start']['seconds']:.2f} s later (the rate alone paces a third of the "
        f"sites over {series['cold_start']['paced_s']:.1f} s).",
        "",
        f"Failover: `SIGKILL` of one instance, {_times(len(failovers))}, each instance in turn.",
        "",
        *_distribution_table(
            [
                (
                    "**kill → all its sites connected by a survivor**",
                    "s",
                    _get(failovers, "connected_s"),
                    f"{bound:g} s + connect",
                ),
                (
                    "kill → all its sites' leases taken by a survivor",
                    "s",
                    _get(failovers, "owned_s"),
                    "",
                ),
                (
                    "kill → the first of them taken (expiry, then the survivors' round)",
                    "s",
                    _get(failovers, "first_owned_s"),
                    f"{leasing['ttl'] + leasing['renew']:g} s (ttl + renew)",
                ),
                (
                    "first → last of them taken (the pacing)",
                    "s",
                    [f["owned_s"] - f["first_owned_s"] for f in failovers],
                    f"{max(f['pacing_bound_s'] for f in failovers):g} s "
                    "(ceil(sites / (survivors * rate)) - 1)",
                ),
                (
                    "the survivors' take-over rate, each",
                    "sites/s",
                    [
                        f["sites"] / f["survivors"] / max(1e-9, f["owned_s"] - f["first_owned_s"])
                        for f in failovers
                    ],
                    f"{leasing['rate']:g} (the rate)",
                ),
                (
                    f"kill → seen so in the database (polled every {POLL_SECONDS:g} s)",
                    "s",
                    _get(failovers, "observed_s"),
                    "",
                ),
            ]
        ),
        "",
        *_table(
            [
                ("sites of the killed instance", "sites", _get(failovers, "sites"), "", None),
                (
                    "leases taken (epoch increments) per failover",
                    "",
                    _get(failovers, "lease_changes"),
                    "",
                    None,
                ),
                (
                    "sites moved between the survivors besides (the quotas)",
                    "sites",
                    _get(failovers, "others_moved"),
                    "",
                    None,
                ),
                (
                    "connections made (events to `connected`)",
                    "",
                    _get(failovers, "reconnects"),
                    "",
                    None,
                ),
            ]
        ),
        "",
        f"Join: the killed instance started again while the two others hold every site "
        f"({_times(len(joins))}).",
        "",
        *_table(
            [
                (
                    "its share: the ideal number of sites to move",
                    "sites",
                    _get(joins, "ideal"),
                    "",
                    None,
                ),
                ("**sites whose owner changed**", "sites", _get(joins, "moved"), "", None),
                ("sites moved / ideal", "x", _get(joins, "moved_per_ideal"), "", None),
                ("leases taken (epoch increments)", "", _get(joins, "lease_changes"), "", None),
                (
                    "**reconnects the join caused** (events to `connected`)",
                    "",
                    _get(joins, "reconnects"),
                    "",
                    None,
                ),
                (
                    "**joined (first heartbeat) → balanced, all connected**",
                    "s",
                    _get(joins, "balanced_from_join_s"),
                    f"≈ {paced:g} s (share / rate)",
                    None,
                ),
                (
                    "sites moved to it a second, from the first to the last",
                    "sites/s",
                    [
                        j["ideal"] / max(1e-9, j["balanced_from_join_s"] - j["first_moved_s"])
                        for j in joins
                    ],
                    f"{leasing['rate']:g} (the rate)",
                    None,
                ),
                (
                    "joined → the first site moved to it",
                    "s",
                    _get(joins, "first_moved_s"),
                    "",
                    None,
                ),
                ("process started → joined", "s", _get(joins, "start_to_join_s"), "", None),
                ("process started → balanced", "s", _get(joins, "balanced_from_start_s"), "", None),
            ]
        ),
        "",
    ]
    if series["epochs_with_two_writers"]:
        lines += [
            f"**{series['epochs_with_two_writers']} (site, epoch) pairs were committed by two "
            "instances** (`site_writer`): the fence failed.",
            "",
        ]
    else:
        lines += [
            "No site was ever committed for by two instances under one epoch (`site_writer`).",
            "",
        ]
    return lines


def _throughput(reps: list[dict[str, Any]], cores: int) -> list[str]:
    rows: list[Row] = [
        ("1 instance alone (no `--cluster`)", "msg/s", _get(reps, "alone", "rate"), "", None),
        ("1 instance, `--cluster`", "msg/s", _get(reps, "one", "rate"), "", None),
        ("**3 instances, `--cluster`**", "msg/s", _get(reps, "three", "rate"), "", None),
        ("**3 instances / 1 instance**", "x", _get(reps, "three_per_one"), "", None),
        ("1 instance `--cluster` / alone (the fence)", "x", _get(reps, "one_per_alone"), "", None),
    ]
    per_case = [
        ("mqttsvc CPU per message", "µs", "cpu_us_per_message"),
        ("PostgreSQL CPU per message", "µs", "postgres_us_per_message"),
        ("mean batch", "messages", "mean_batch"),
        ("mean batch commit", "ms", "mean_commit_ms"),
        (
            "CPU of the run's processes (mqttsvc, PostgreSQL, broker)",
            f"% of {100 * cores}",
            "own_busy_percent",
        ),
        ("CPU of the whole machine", f"% of {100 * cores}", "machine_busy_percent"),
        ("1-minute load average", "", "load_average"),
    ]
    for figure, unit, field in per_case:
        for key, label in (("alone", "1 alone"), ("one", "1, cluster"), ("three", "3, cluster")):
            rows.append((f"{label}: {figure}", unit, _get(reps, key, field), "", None))
    ok = [sum(1 for r in reps if all(r[k]["check"]["ok"] for k in ("alone", "one", "three")))]
    rows.append(
        (
            "every message committed once and acked, no epoch with two writers",
            "reps",
            ok,
            f"{len(reps)} of {len(reps)}",
            lambda v: v == len(reps),
        )
    )

    def median(key: str, figure: str) -> float:
        return summary(_get(reps, key, figure))["median"]

    ratio = summary(_get(reps, "three_per_one"))["median"]
    return [
        *_table(rows),
        "",
        f"Three instances drained the backlog at {ratio:.2f}x the rate of one (median of the "
        f"repetitions). The {cores} cores are shared by the instances, PostgreSQL and "
        f"Mosquitto, which used {median('one', 'own_busy_percent'):.0f}% of {100 * cores}% "
        f"while one instance drained and {median('three', 'own_busy_percent'):.0f}% while "
        f"three did (the whole machine: {median('one', 'machine_busy_percent'):.0f}% and "
        f"{median('three', 'machine_busy_percent'):.0f}%; the difference is other work on "
        "this host, which also skews the ratio: three processes get a larger share of a "
        "contended CPU than one). An instance does its work on one reactor thread, so one "
        "instance can use at most one core and leaves the rest to PostgreSQL and the broker; "
        "three can use both cores, but only by taking them from PostgreSQL, which has the "
        "same work to do and gets it in more, smaller batches at once (mean "
        f"{median('three', 'mean_batch'):.0f} messages with three, "
        f"{median('one', 'mean_batch'):.0f} with one; "
        f"{median('three', 'postgres_us_per_message'):.0f} and "
        f"{median('one', 'postgres_us_per_message'):.0f} µs of its CPU a message). Once both "
        "cores are busy, more instances cannot add throughput: on 2 cores what a cluster buys "
        "is that a site's work survives the loss of a process. Where each instance and "
        "PostgreSQL have cores of their own, the instances' part "
        f"({median('one', 'cpu_us_per_message'):.0f} µs of CPU a message with one instance, "
        f"{median('three', 'cpu_us_per_message'):.0f} with three) divides among them, and the "
        "limit becomes the database: its CPU per message on however many cores it has, and "
        "its WAL flushes. That is an expectation from these per-message costs, not a "
        "measurement: this host has no spare cores to show it.",
        "",
    ]


def _cluster(results: dict[str, Any], cores: int) -> list[str]:
    cluster = results["cluster"]
    main = cluster["failover"]
    leasing = main["leasing"]
    defaults = (leasing["ttl"], leasing["renew"], leasing["rate"]) == (
        LEASE_TTL,
        LEASE_RENEW,
        HANDOVER_RATE,
    )
    lines = _failover_series(main, "With the default leases" if defaults else "Leases")
    if "short" in cluster:
        lines += _failover_series(
            cluster["short"], "Shorter leases, to show the mechanism (not the defaults)"
        )
    first = cluster["throughput"][0]["one"]
    lines += [
        f"#### Ingest throughput, 3 instances vs 1 ({first['messages']:,} messages over "
        f"{first['sites']} sites)",
        "",
        *_throughput(cluster["throughput"], cores),
    ]
    return lines


def _micro(reps: list[dict[str, Any]]) -> list[str]:
    batch = reps[0]["batch"]
    rows: list[Row] = [
        ("`process()`: route, parse, effects", "µs/msg", _get(reps, "process_us"), "", None),
        (
            "`batch_statements`: fold, array literals (Python)",
            "ms/batch",
            _get(reps, "build_ms"),
            "",
            None,
        ),
        ("psycopg2 quoting the query (`mogrify`)", "ms/batch", _get(reps, "quote_ms"), "", None),
        ("the query's size", "KiB", _get(reps, "query_kb"), "", None),
        ("server: the batch in one round trip", "ms/batch", _get(reps, "server_ms"), "", None),
    ]
    return [
        f"mqttsvc's own functions on one batch of {batch:,} benchmark messages "
        f"({reps[0]['statements']} statements), median of 7 runs each (`bench/micro.py`); "
        "the server figure executes the batch's query on a fresh database (once "
        "committed first, so that the timed runs update existing rows, then rolled back).",
        "",
        *_table(rows),
    ]


def _loads(items: Any, key: str = "load_average") -> list[float]:
    found: list[float] = []

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            if key in value:
                found.append(value[key])
            for v in value.values():
                walk(v)
        elif isinstance(value, list):
            for v in value:
                walk(v)

    walk(items)
    return found


#: What the profile's usual top entries are.
MEANINGS = {
    "epoll": "idle: the reactor waiting for sockets (broker, database)",
    "psycopg2.extensions.cursor' objects>": (
        "psycopg2 quoting the batch's query (one string per column) and sending it"
    ),
    "iterencode": "json.dumps (JSON encoding)",
    "addCallbacks": "Deferred callbacks",
    "_packet_read": "paho: reading a packet (byte-wise recv of header and length)",
    "ReceivedMessage": "ReceivedMessage built per message",
    "site.py": (
        "SiteService._message / committed: per-message glue (process, offline detector, "
        "queue, acks)"
    ),
    "batch.py": "folding effects into columns and array literals, one statement per table",
    # Before paho's decode_publish: ours has the same name.
    "mqtt/codec.py": "codec: one PUBLISH decoded into a ReceivedMessage",
    "decode_publish": "paho: decoding PUBLISH",
    "_handle_publish": "paho: PUBLISH handling, MQTTMessage object",
    "_handle_on_message": "paho: dispatching to on_message (after matching per-topic callbacks)",
    "iter_match": "paho: matching the topic against per-topic callbacks (none are registered)",
    "_packet_handle": "paho: dispatch by packet type",
    "processing.py:305(process)": "process(): route, parse, build effects",
    "processing.py": "message processing (routing, parsing, effects)",
    "recv": "socket reads (paho reads 1 byte, then length bytes, then the body)",
    "_easy_log": "paho: debug log call per packet (no logger, but still a call)",
    "_runCallbacks": "Deferred machinery",
    "astuple": "attrs.astuple",
    "fromtimestamp": "datetime per message (receive time) and per status change",
    "isinstance": "type dispatch in fold and processing",
    "offline.py": "offline detector: new deadline per device message",
    "writer.py": "BatchWriter.queue: a queue entry per message",
    "callLater": "timers (writer flush, offline detector re-arm)",
    "json/decoder": "json.loads of the payload",
    "send": "socket sends (PUBACKs, queries)",
    "txpostgres": "txpostgres: query dispatch and polling",
    "_paho_message": "transport: paho message to ReceivedMessage",
    "_readable": "mqtt client: one block read from a site's socket",
    "read_block": "paho adapter: the socket read and paho's keepalive stamp",
    "_frame": "mqtt client: framing the packets in the block",
    "doRead": "reactor: socket readable",
    "_inlineCallbacks": "coroutine/Deferred trampolining",
    "write_effects": "the batch: fold + one statement per table",
    "_write_rows": "rows → column arrays, then execute",
    "mainLoop": "the whole reactor run",
    "run": "",
}


def _meaning(function: str) -> str:
    for key, text in MEANINGS.items():
        if key in function:
            return text
    return ""


def _short(function: str) -> str:
    """
    A profiled function's name without the directory mqttsvc was run from.
    """
    for package in ("/mqttsvc/", "/bench/"):
        if package in function and not function.startswith(package[1:]):
            return package[1:] + function.split(package, 1)[1]
    return function


def _profile(profile: dict[str, Any]) -> list[str]:
    top = profile["profile"]
    out = [
        f"{profile['messages']:,} messages through the whole path (10 sites, backlog drained, "
        f"committed and acknowledged) under cProfile, {profile['rate']:,.0f} msg/s with the "
        f"profiler on; {top['total_s']:.2f} s profiled on the reactor thread.",
        "",
        "Top by own time:",
        "",
        "| own s | share | calls | function | what it is |",
        "| ---: | ---: | ---: | --- | --- |",
    ]
    for row in top["by_own"][:12]:
        out.append(
            f"| {row['own_s']:.3f} | {row['own_percent']:.1f}% | {row['calls']:,} | "
            f"`{_short(row['function'])}` | {_meaning(row['function'])} |"
        )
    out += [
        "",
        "Top by cumulative time (below the reactor's own frames):",
        "",
        "| cumulative s | calls | function | what it is |",
        "| ---: | ---: | --- | --- |",
    ]
    skip = ("base.py", "log.py", "context.py", "posixbase.py", "epollreactor.py", "_contextvars")
    shown = [r for r in top["by_cumulative"] if not any(s in r["function"] for s in skip)]
    for row in shown[:12]:
        out.append(
            f"| {row['cumulative_s']:.3f} | {row['calls']:,} | `{_short(row['function'])}` | "
            f"{_meaning(row['function'])} |"
        )
    return out


METHOD = """\
## Method

Every measurement runs in a child process of its own (`python -m bench.child ROLE`), with
a fresh reactor, against a **private Mosquitto** (its own port and configuration, started
per repetition) and a **fresh PostgreSQL database** (created, migrated with
`mqttsvc.db.schema.migrate`, dropped). Only 127.0.0.1 is used. mqttsvc runs **in-process**,
built exactly as `twistd mqttsvc` builds it (`tap.Options`, `tap.check_values`,
`tap.build_service`): the benchmark reads the sites' and the writer's own counters, hooks
the commit of each message to time it, and profiles the reactor thread — none of which a
`twistd` subprocess would show — while the child process keeps memory and CPU figures
mqttsvc's own. Sites are written into `mqtt_connection`/`mqtt_topic` by SQL, as the
backend does, with the default topics. Every wait has a deadline; a child that overruns is
killed.

Broker settings (every private broker): {broker}. `max_queued_messages 0` keeps the whole
backlog (the default, 1000, drops the rest). `max_inflight_messages` is the per-client window
of unacknowledged QoS 1 messages for MQTT 3.1.1 subscribers; mqttsvc acknowledges only after
its commit, so with Mosquitto's default of 20 each site can have only 20 messages in hand. It
is raised to 1000 (one batch) for the headline runs; the variants below measure the default,
and MQTT 5 sites, for which mqttsvc asks for a Receive Maximum of 1000 in its CONNECT
(Mosquitto honours a v5 client's Receive Maximum over `max_inflight_messages`, and falls
back to 20 when the client sends none). `max_connections -1` lets 1,000 sites connect; the real
bound is the broker's file-descriptor limit, which it inherits from the benchmark (raised
with `resource.setrlimit` to 16,384 where the hard limit allows).

The message mix: per site 20 gateways, 100 dataloggers, 1,000 sensors; of every 20
messages one gateway heartbeat, three datalogger heartbeats and sixteen sensor messages (a
quarter with two values). Every payload starts with its `ts`, so receivers read the send
time without parsing. The backlog and the steady load are published by a raw MQTT 3.1.1
socket that pipelines QoS 1 publishes (`bench/wire.py`), so producing load never limits a
measurement.

- **Ingest.** A backlog of {ingest_messages:,} messages over {ingest_sites} sites is
  queued (QoS 1, persistent sessions primed beforehand) for three consumers at once; each
  drains it in turn (mqttsvc and the bare client alternate who goes first). *mqttsvc*: from
  `startService()` until every site's `messages_committed` covers the backlog (the PUBACK is
  queued in the same callback). *Bare client*: one paho client per site, all sockets on one
  thread, each read until empty (as mqttsvc's transport does), acknowledged at once, no
  processing: from the first connect to the last message. *Old design*: the same bare loop
  with the old processor's write path (regex routing, `json.loads`, per row a `SELECT`
  then `UPDATE` or `INSERT`, each reading inserted, `COMMIT` per message, paho acking after
  the callback), timed over the first {old_messages:,} messages of its own copy of the backlog
  and its own fresh database. Checks after each repetition: `sum(discovered_topic.message_count)`
  equals the backlog, every reading is stored, no dead letters, and the broker holds nothing
  for mqttsvc's sessions (each is resumed and what arrives in 0.3 s is counted).
  Variants: {variant_messages:,} messages.
- **Latency.** {latency_rate:,} msg/s for {latency_seconds} s over {latency_sites} sites,
  published at a steady pace from another process, each payload stamped with its send time
  (`time.time()`). *mqttsvc*: publish-to-commit, timed when the writer tells the message's
  site that its batch is committed (right before its PUBACK is queued), after a warm-up in
  which the same messages are published as fast as they go and committed (so every device
  is known, as in a running service, rather than the measured seconds being thousands of
  first sightings). *Bare client*: publish-to-receive at the same rate, same broker,
  sessions primed only after mqttsvc's run.
- **Many sites.** {many_sites:,} sites, each its own connection to one private broker:
  from `startService()` to every site's CONNACK, then (after every SUBACK, the writer idle
  and 1 s) `VmRSS` from `/proc/self/status`, then CPU (`time.process_time`) over
  {idle_seconds} s idle. Baseline: the same number of bare paho clients connected (and
  subscribed) from one thread, in a process of their own.
- **Offline detection.** {devices:,} devices get deadlines spread uniformly over
  {offline_spread:g} s (plus the time registering them takes) starting {offline_delay:g} s
  out, through the service's own
  `OfflineDetector.seen()`. *Marked*: the time the detector reports each device offline,
  minus its deadline. *Committed*: when the write of that change committed. CPU over the
  expiry window, per device.
- **Control plane.** With the many-sites service still running: `site.status` (cycling
  over all sites) and `service.status`, each for {control_seconds} s from a separate
  process with {control_concurrency} concurrent keep-alive connections, each sending its
  next request when the last answer is in (closed loop). Baseline: `GET /healthz` the same
  way — the HTTP stack with no method behind it.
- **Profile.** cProfile of a separate ingest run of {profile_messages:,} messages.
- **Known devices.** {known_devices:,} sensors over {known_sites} sites inserted by SQL,
  all `online` (as after a crash); mqttsvc starts (its sites cannot connect, so the
  start-up is the load): the time until every site is reconciled, the RSS it adds, the
  device events it writes, and the offline detector's memory per device (tracemalloc, a
  second detector loaded through the store, every site up so every device has a deadline).
- **Fairness.** {flood_messages:,} messages, each from a new device id, queued for one site;
  a second site in the same write lane publishes {quiet_rate} msg/s meanwhile: its
  publish-to-commit latency while the flood drains, and how often each site was paused.
{cluster}
Each figure below is the median of the repetitions with min and max; ratios are computed
within each repetition, against the baseline measured in the same repetition.
"""


CLUSTER_METHOD = """\
- **Several instances (cluster).** Unlike the rest, real `twistd -n mqttsvc --cluster`
  processes (named `bench-a`, `bench-b`, `bench-c`), each on its own, on one fresh database
  and one private broker, watched from outside through the database every 0.1 s. They all
  run on this host, so the database's `now()`, the instances' clocks and the benchmark's are
  one clock, and the figures are differences of timestamps the database holds (a lease's
  `changed_at`, a site's `last_connected_at`), not of when a poll saw them (one row says
  when the poll did). The issue's "3 instances x 1,000 sites" is read as {cluster_sites:,}
  sites shared by the three (about a third each): with 2 cores, three processes of 1,000
  sites each would measure the CPU, not the protocol. The sites are idle (no load) and are
  inserted disabled; once all three instances are live, one `UPDATE` enables them all (the
  cold start). *Failover*, {failovers}, each instance in turn: `SIGKILL` one, and time until
  every site it owned is owned by a live survivor (`site_lease`, live by the database's
  clock) and reported `connected` by that owner (`mqtt_connection.status`, with
  `last_connected_at` after the lease was taken): the latest such `last_connected_at` minus
  the time of the kill. The bound beside it is docs/cluster.md's worst case: ttl + renew +
  (ceil(dead sites / (survivors * rate)) - 1) s, plus the connect. *Join*: once the two
  survivors hold every site as the assignment over them says, the killed instance is started
  again (same name): the sites whose owner changed, the lease epochs raised (one per
  acquisition), and the connection events to `connected`, against the ideal (its share, a
  third of the sites); and the time until every site is with the instance that
  `mqttsvc.cluster.assignment.assign` gives it over the three and connected, from its first
  heartbeat (its `mqttsvc_instance.started_at`) and from the start of the process. Leases:
  {leasing}.{short} *Throughput*: a backlog of {cluster_messages:,} messages over
  {cluster_ingest_sites} sites is queued (QoS 1, persistent sessions primed with the
  cluster's client ids, `mqttsvc_<site>`), then 1 or 3 instances start with every site
  disabled, and once they are live every site is enabled at once: messages a second until
  `sum(discovered_topic.message_count)` covers the backlog (polled every 0.05 s). The
  hand-over rate is set to the number of sites there, so that no instance waits to take its
  sites. One instance without `--cluster` (its own client ids, no fence) drains the same
  backlog as a third case. CPU is read from `/proc` for the instances, the broker, and
  PostgreSQL's backends of the run's database with the server's background processes (WAL
  writer, checkpointer: shared, but the run's writes are what keeps them busy); the
  instances' batches from their `/metrics`. Checks: every message counted, every reading
  stored, no dead letters, nothing left for the sites' sessions on the broker, and (here and
  in the failover series) no site with two instances committing under one epoch
  (`site_writer`, filled by the fence). The three cases run in an order that turns with the
  repetition.
"""


def _leasing(ttl: float, renew: float, rate: float) -> str:
    text = f"{ttl:g} s ttl, renewed every {renew:g} s, {rate:g} acquisitions or hand-overs a second"
    if (ttl, renew, rate) == (LEASE_TTL, LEASE_RENEW, HANDOVER_RATE):
        return text + " per instance (the defaults, `mqttsvc/cluster/keeper.py`)"
    return (
        text + " per instance (**not the defaults** of `mqttsvc/cluster/keeper.py`: "
        f"{LEASE_TTL:g} s, {LEASE_RENEW:g} s, {HANDOVER_RATE}/s)"
    )


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _cluster_method(size: dict[str, Any]) -> str:
    short = ""
    if size["cluster_short_failovers"]:
        short = (
            f" A second, labelled series ({size['cluster_short_failovers']} failovers and "
            "joins) has shorter leases, to show how the failover follows them: "
            + _leasing(
                size["cluster_short_ttl"], size["cluster_short_renew"], size["cluster_short_rate"]
            )
            + "."
        )
    leasing = _leasing(size["cluster_ttl"], size["cluster_renew"], size["cluster_rate"])
    text = CLUSTER_METHOD.format(
        leasing=leasing, short=short, failovers=_times(size["cluster_failovers"]), **size
    )
    text = " ".join(text.split())
    wrapped = textwrap.fill(
        text, width=92, subsequent_indent="  ", break_long_words=False, break_on_hyphens=False
    )
    return wrapped + "\n"


def render(document: dict[str, Any], previous: Path | None = None) -> str:
    """
    The whole C{BENCHMARKS.md}; the analysis section of C{previous} (the
    file it replaces) is kept.
    """
    results = document["results"]
    machine = document["machine"]
    versions = document["versions"]
    size = document["sizes"]
    loads = _loads(results)
    lines = [
        "# Benchmarks",
        "",
        f"Generated by `python -m bench --size {document['size']}` (`make bench` runs "
        "`--size full`) on "
        f"{document['started']}, {document['reps']} repetitions, "
        f"{document['duration_s'] / 60:.1f} minutes. Scenarios: "
        f"{', '.join(document['scenarios'])}.",
        "",
        "## Machine and versions",
        "",
        f"- {machine['cores']} cores, {machine['cpu']}, {machine['memory_gib']} GiB RAM, "
        f"Linux {machine['kernel']}",
        "- " + ", ".join(f"{k} {v}" for k, v in versions.items()),
    ]
    if loads:
        lines.append(
            "- 1-minute load average around the measurements: median "
            f"{summary(loads)['median']:.1f}, "
            f"max {max(loads):.1f} on {machine['cores']} cores (mqttsvc, the broker, PostgreSQL "
            "and the load generators all share them; anything else running shows here)"
        )
    steals = _loads(results, "steal_percent")
    if steals:
        lines.append(
            "- CPU steal (time the host gave to other guests) during each measurement: median "
            f"{summary(steals)['median']:.1f}%, max {max(steals):.1f}%: this is a shared virtual "
            "machine, and a measurement with high steal is slowed by others"
        )
    broker = ", ".join(f"`{k} {v}`" for k, v in document["broker"].items())
    cluster = _cluster_method(size) if "cluster" in results else ""
    lines += ["", METHOD.format(broker=broker, cluster=cluster, **size)]
    sections: list[tuple[str, str, Callable[[dict[str, Any]], list[Row]]]] = [
        ("ingest", "Ingest throughput (scenarios 1 and 2)", _ingest),
        ("latency", "Latency (scenario 3)", _latency),
        ("sites", "Many sites (scenario 4)", _sites),
        ("offline", "Offline detection (scenario 5)", _offline),
        ("control", "Control plane (scenario 6)", _control),
        ("devices", "Known devices: start-up and memory", _devices),
        ("fairness", "A flooding site beside a quiet one in its lane", _fairness),
    ]
    lines += ["## Results", ""]
    for key, title, rows in sections:
        if key in results:
            lines += [f"### {title}", "", *_table(rows(results)), ""]
    if "cluster" in results:
        lines += [
            "### Several instances (cluster)",
            "",
            *_cluster(results, machine["cores"] or 1),
        ]
    if "profile" in results:
        lines += ["## Profile of the ingest path", "", *_profile(results["profile"]), ""]
    if "micro" in results:
        lines += ["## Where a batch's time goes", "", *_micro(results["micro"]), ""]
    analysis = _kept_analysis(previous)
    lines += [ANALYSIS_START, analysis, ANALYSIS_END, ""]
    return "\n".join(lines)


def _kept_analysis(previous: Path | None) -> str:
    if previous is None or not previous.exists():
        return "## Analysis\n\n(Not written yet.)"
    text = previous.read_text()
    if ANALYSIS_START not in text or ANALYSIS_END not in text:
        return "## Analysis\n\n(Not written yet.)"
    return text.split(ANALYSIS_START, 1)[1].split(ANALYSIS_END, 1)[0].strip()
