"""
The benchmark suite, once, at a tiny size: every scenario runs through the
same code paths as C{make bench} and produces well-formed results, so the
benchmarks never rot.  Nothing here asserts a timing.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.cli import SCENARIOS
from tests.conftest import PG_HOST, PG_PORT, PG_USER

ROOT = Path(__file__).resolve().parent.parent


def _numbers(value: Any) -> list[float]:
    """Every number in a JSON value, at any depth."""
    if isinstance(value, bool):
        return []
    if isinstance(value, int | float):
        return [float(value)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _numbers(v)]
    if isinstance(value, list):
        return [n for v in value for n in _numbers(v)]
    return []


def test_every_scenario_runs_at_a_tiny_size(tmp_path: Path) -> None:
    """
    C{python -m bench --size tiny --reps 1} runs every scenario to its end
    and writes a report and raw results in which every message was
    committed, every device expired, every call answered, every site of a
    killed cluster instance moved (and no epoch had two writers), and
    every figure is a finite number.
    """
    report = tmp_path / "BENCHMARKS.md"
    raw = tmp_path / "results.json"
    env = {
        **os.environ,
        "MQTTSVC_BENCH_PG": f"host={PG_HOST} port={PG_PORT} user={PG_USER} dbname=postgres",
    }
    command = [sys.executable, "-m", "bench", "--size", "tiny", "--reps", "1"]
    done = subprocess.run(
        [*command, "--output", str(report), "--json", str(raw)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(raw.read_text())["results"]
    # One result per scenario, and the ingest scenario's variants beside it.
    assert set(results) == {*SCENARIOS, "ingest_variants"}
    assert all(math.isfinite(n) for n in _numbers(results))

    [ingest] = results["ingest"]
    assert ingest["check"]["ok"], ingest["check"]
    assert ingest["mqttsvc"]["messages"] == ingest["messages"]
    assert ingest["bare"]["messages"] == ingest["messages"]
    assert ingest["old"]["messages"] > 0
    for [variant] in results["ingest_variants"]:
        assert variant["left_on_broker"] == 0, variant

    [latency] = results["latency"]
    sent = latency["mqttsvc"]["publisher"]["sent"]
    assert sent > 0
    assert latency["mqttsvc"]["committed"] == sent
    assert latency["bare"]["count"] == latency["bare"]["publisher"]["sent"]

    [sites] = results["sites"]
    assert sites["mqttsvc"]["sites"] == sites["bare"]["connected"] > 0

    [offline] = results["offline"]
    assert offline["marked"]["count"] == offline["committed"]["count"] == offline["devices"]

    [control] = results["control"]
    for name in ("healthz", "site.status", "service.status"):
        assert control[name]["requests"] > 0, name
        assert control[name]["errors"] == 0, name

    assert results["profile"]["profile"]["by_own"]
    assert results["micro"][0]["statements"] > 0

    [devices] = results["devices"]
    assert devices["tracked"] == devices["devices"]
    assert devices["device_events_at_start"] == devices["sites"]  # one summary per site

    [fairness] = results["fairness"]
    assert fairness["flood_messages"] > 0 and fairness["quiet_sent"] > 0
    assert fairness["quiet_holds"] == 0  # the flooding site is held, never the quiet one

    cluster = results["cluster"]
    series = cluster["failover"]
    [failover] = series["failovers"]
    assert failover["sites"] > 0
    assert failover["owned_s"] <= failover["connected_s"]  # a site connects after its lease
    [joined] = series["joins"]
    assert joined["moved"] >= joined["ideal"] > 0
    assert joined["reconnects"] >= joined["moved"]
    assert series["epochs_with_two_writers"] == 0
    [throughput] = cluster["throughput"]
    for mode in ("alone", "one", "three"):
        assert throughput[mode]["check"]["ok"], (mode, throughput[mode]["check"])

    text = report.read_text()
    for heading in (
        "## Machine and versions",
        "## Method",
        "### Ingest throughput",
        "## Profile",
        "### Several instances (cluster)",
    ):
        assert heading in text
