"""
What a benchmark runs against: a private Mosquitto, a fresh PostgreSQL
database, and the facts about the machine and the versions that the report
prints.
"""

from __future__ import annotations

import os
import platform
import resource
import shutil
import socket
import subprocess
import time
import uuid
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg2

from mqttsvc.db import schema as database

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


def free_port() -> int:
    """
    A TCP port on 127.0.0.1 that nothing listens on right now.
    """
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


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


class Broker:
    """
    A Mosquitto of our own on a free loopback port, started with
    L{BROKER_SETTINGS} (and C{overrides} of them).
    """

    def __init__(self, directory: Path, overrides: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.settings = {**BROKER_SETTINGS, **(overrides or {})}
        self.config = directory / "mosquitto.conf"
        # Started as root, mosquitto drops to its own user, which may not
        # read our directory: stay root.
        lines = ["user root"] if os.geteuid() == 0 else []
        lines.append(f"listener {self.port} 127.0.0.1")
        lines.append("allow_anonymous true")
        lines += [f"{k} {v}" for k, v in self.settings.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        mosquitto = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        raise_file_limit()
        with (self.directory / "mosquitto.log").open("ab") as log:
            self.process = subprocess.Popen(
                [mosquitto, "-c", str(self.config)], stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                if self.process.poll() is not None:
                    log_text = (self.directory / "mosquitto.log").read_text(errors="replace")
                    raise RuntimeError(
                        f"mosquitto exited with {self.process.returncode}: {log_text[-500:]}"
                    ) from None
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 10 s")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)
        self.process = None

    def __enter__(self) -> Broker:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _with_dbname(dsn: str, name: str) -> str:
    params = psycopg2.extensions.parse_dsn(dsn)
    params["dbname"] = name
    return " ".join(f"{k}={v}" for k, v in params.items())


class Database:
    """
    A database of its own for one measurement: created and migrated with
    C{mqttsvc.db.schema.migrate}, dropped afterwards.
    """

    def __init__(self, label: str = "bench") -> None:
        self.name = f"mqttsvc_{label}_{os.getpid()}_{uuid.uuid4().hex[:6]}"
        self.dsn = _with_dbname(ADMIN_DSN, self.name)

    def _admin(self) -> Any:
        conn = psycopg2.connect(ADMIN_DSN)
        conn.autocommit = True
        return conn

    def create(self) -> None:
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{self.name}"')
        finally:
            conn.close()
        database.migrate(self.dsn)

    def drop(self) -> None:
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = %s AND pid <> pg_backend_pid()",
                    (self.name,),
                )
                cur.execute(f'DROP DATABASE IF EXISTS "{self.name}"')
        finally:
            conn.close()

    def __enter__(self) -> Database:
        self.create()
        return self

    def __exit__(self, *exc: object) -> None:
        self.drop()


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
