"""
What a benchmark runs against: a private Mosquitto and a fresh PostgreSQL
database with the benchmark's settings (the servers themselves are
in L{bench.servers}, shared with the tests), and the facts about the machine
and the versions that the report prints.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import shutil
import subprocess
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg2

from bench.servers import Mosquitto, ScratchDatabase

#: The PostgreSQL server to create benchmark databases on (trust
#: authentication, a user allowed to create databases).
ADMIN_DSN = os.environ.get(
    "MQTTSVC_BENCH_PG", "host=127.0.0.1 port=5432 user=postgres dbname=postgres"
)

#: Mosquitto settings of every private broker, beside the listener.
BROKER_SETTINGS = {
    # Keep every queued QoS 1 message, as mqttsvc's brokers must (the
    # default, 1000, drops the rest of a backlog).
    "max_queued_messages": "0",
    # The in-flight window per MQTT 3.1.1 subscriber.  Mosquitto's default
    # of 20 bounds a consumer that acknowledges only after its commit to
    # 20 messages per site per commit; see BENCHMARKS.md.
    "max_inflight_messages": "1000",
    # Any number of connections (1,000 sites); the real bound is the
    # process's file-descriptor limit, which the broker inherits from us.
    "max_connections": "-1",
    # Queues live in memory; nothing here restarts the broker.
    "persistence": "false",
}


def raise_file_limit(wanted: int = 16384) -> int:
    """
    Raise this process's soft limit of open files (1,000 sites are 1,000
    sockets) as far as the hard limit allows; children inherit it.

    @return: the soft limit now in force.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Broker(Mosquitto):
    """
    A private Mosquitto (L{bench.servers.Mosquitto}) with L{BROKER_SETTINGS}
    and C{overrides} of them.  It inherits its limit of open files from
    C{python -m bench}, which raises it (L{raise_file_limit}) first.
    """

    def __init__(self, directory: Path, overrides: dict[str, str] | None = None) -> None:
        super().__init__(directory, {**BROKER_SETTINGS, **(overrides or {})})


class Database(ScratchDatabase):
    """
    A database of its own for one measurement, on the server of
    L{ADMIN_DSN}: created and migrated, dropped afterwards.
    """

    def __init__(self, label: str = "bench") -> None:
        super().__init__(ADMIN_DSN, f"mqttsvc_{label}_{os.getpid()}_{uuid.uuid4().hex[:6]}")


def proc_status(field: str) -> int:
    """
    A C{/proc/self/status} memory field (C{VmRSS}, C{VmHWM}) in bytes.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def cpu_times() -> list[int]:
    """
    The machine's CPU time counters in clock ticks (the first line of
    C{/proc/stat}: user, nice, system, idle, iowait, irq, softirq, steal);
    empty where there is no such file.
    """
    try:
        with open("/proc/stat") as stat:
            return [int(v) for v in stat.readline().split()[1:]]
    except OSError:
        return []


def busy_percent(before: list[int], after: list[int]) -> float:
    """
    How busy the machine's CPUs were between two L{cpu_times} readings,
    in percent of one core (so up to 100 times the number of cores): all
    time but idle and iowait.
    """
    if not before or not after:
        return math.nan
    total = sum(after[:8]) - sum(before[:8])
    idle = (after[3] + after[4]) - (before[3] + before[4])
    return 100 * (os.cpu_count() or 1) * (total - idle) / max(1, total)


class Others:
    """
    Others' load on the machine while something is measured, for the
    report: made when the measurement starts, read by L{figures} when it
    ends.
    """

    def __init__(self) -> None:
        self._load = os.getloadavg()[0]
        self._cpu = cpu_times()

    def figures(self) -> dict[str, float]:
        """
        C{load_average}: the higher 1-minute load average of the start and
        the end; C{steal_percent}: the share of CPU time the host gave to
        other guests meanwhile (where C{/proc/stat} says).
        """
        out = {"load_average": max(self._load, os.getloadavg()[0])}
        after = cpu_times()
        if self._cpu and after:
            total = sum(after) - sum(self._cpu)
            out["steal_percent"] = 100 * (after[7] - self._cpu[7]) / max(1, total)
        return out


def process_cpu_seconds(pid: int) -> float:
    """
    The CPU time (user and system) a process has used so far, from
    C{/proc/PID/stat}; 0 once it is gone.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces: split after it.
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _first_line(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    text = (done.stdout or done.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def machine() -> dict[str, Any]:
    """
    The machine the numbers were measured on.
    """
    model = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = proc_meminfo("MemTotal")
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "memory_gib": round(memory / 2**30, 1),
        "kernel": platform.release(),
    }


def proc_meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def versions() -> dict[str, str]:
    """
    The versions of everything that takes part.
    """
    mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
    conn = psycopg2.connect(ADMIN_DSN)
    try:
        with conn.cursor() as cur:
            cur.execute("SHOW server_version")
            postgres = cur.fetchone()[0]
            cur.execute("SHOW synchronous_commit")
            sync = cur.fetchone()[0]
    finally:
        conn.close()
    result = {
        "mqttsvc": revision(),
        "python": platform.python_version(),
        "postgresql": f"{postgres} (synchronous_commit={sync})",
        "mosquitto": _first_line([mosquitto, "-h"]).replace("mosquitto version ", ""),
    }
    for package in ("twisted", "paho-mqtt", "txpostgres", "psycopg2-binary", "klein"):
        try:
            result[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            result[package] = "not installed"
    return result


def revision() -> str:
    """
    The commit of the mqttsvc being measured, marked when its package has
    uncommitted changes (C{MQTTSVC_BENCH_REVISION} names it when the code
    is not a git checkout, e.g. an exported snapshot).
    """
    import mqttsvc

    if os.environ.get("MQTTSVC_BENCH_REVISION"):
        return os.environ["MQTTSVC_BENCH_REVISION"]
    package = Path(mqttsvc.__file__).parent
    head = _first_line(["git", "-C", str(package), "rev-parse", "--short", "HEAD"])
    if head == "unknown" or "fatal" in head:
        return "unknown"
    changed = subprocess.run(
        ["git", "-C", str(package), "status", "--porcelain", "--", "."],
        capture_output=True,
        text=True,
    ).stdout.strip()
    return f"{head} with uncommitted changes" if changed else head
