"""
What a benchmark runs against: a private Mosquitto and a fresh PostgreSQL
database with the benchmark's settings (the servers themselves are
in L{bench.servers}, shared with the tests), and the facts about the machine
and the versions that the report prints.
"""

from __future__ import annotations

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
