"""
C{twistd mqttsvc} as an operator runs it: the plugin is listed, bad
configuration ends start-up with one clear line, and a real run serves the
status summary and shuts down gracefully on SIGTERM.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BROKER_PORT, free_port

BIN = Path(sys.executable).parent
TWISTD = [str(BIN / "twistd"), "-n", "--pidfile="]
MQTTSVC = str(BIN / "mqttsvc")
TOKEN = "ops-token-0123456789abcdef"


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MQTTSVC_")}
    env.update(extra)
    return env


def test_plugin_is_listed() -> None:
    """An installed mqttsvc shows up in twistd's list of plugins."""
    result = subprocess.run(
        [*TWISTD, "--help"], capture_output=True, text=True, timeout=60, env=clean_env()
    )
    assert result.returncode == 0
    assert "mqttsvc" in result.stdout


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"ops {TOKEN}\n")
    path.chmod(0o600)
    return path


def start_fails(args: list[str], env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        [*TWISTD, "mqttsvc", *args],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or clean_env(),
    )
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_bad_configuration_is_one_line(db_dsn: str, tmp_path: Path, token_file: Path) -> None:
    """Each kind of bad configuration is named in a single line on stderr."""
    assert start_fails([]) == (
        "mqttsvc: configuration error: db: no database given (use --db or MQTTSVC_DB)"
    )
    assert "db: malformed connection string" in start_fails(["--db", "host=127.0.0.1 bogus"])
    unreachable = start_fails(["--db", f"host=127.0.0.1 port={free_port()} dbname=x"])
    assert "db: cannot connect to x on 127.0.0.1" in unreachable
    assert "rpc: malformed endpoint 'nonsense:1'" in start_fails(
        ["--db", db_dsn, "--rpc", "nonsense:1"]
    )
    assert f"rpc-token-file: cannot read {tmp_path}/missing" in start_fails(
        ["--db", db_dsn, "--rpc-token-file", str(tmp_path / "missing")]
    )
    token_file.chmod(0o644)
    assert "readable by every user" in start_fails(
        ["--db", db_dsn, "--rpc-token-file", str(token_file)]
    )
    assert "rpc-token-file: required when the JSON-RPC listener" in start_fails(
        ["--db", db_dsn, "--rpc", "tcp:0:interface=0.0.0.0"]
    )
    from_env = start_fails([], clean_env(MQTTSVC_DB="host=127.0.0.1 bogus"))
    assert "db: malformed connection string" in from_env


def test_unmigrated_database_is_refused(tmp_path: Path) -> None:
    """A database without the schema is named, with the command that fixes it."""
    import psycopg2

    from tests.conftest import admin_dsn

    name = f"mqttsvc_empty_{os.getpid()}"
    admin = psycopg2.connect(admin_dsn())
    admin.autocommit = True
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        line = start_fails(["--db", admin_dsn(name)])
        assert "lacks migrations ['0001.initial-schema', '0002" in line
        assert "mqttsvc migrate" in line
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE "{name}"')
        admin.close()


def rpc(url: str, method: str, token: str | None = TOKEN) -> Any:
    headers = {"Content-Type": "application/json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    body = json.dumps({"jsonrpc": "2.0", "method": method, "id": 1}).encode()
    request = urllib.request.Request(url, data=body, headers=headers, method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


def wait_for(check: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = check()
            if result:
                return result
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not happen within {timeout}s")
        time.sleep(0.1)


@pytest.fixture
def twistd(db_dsn: str, no_sites: None, token_file: Path, tmp_path: Path) -> Iterator[Any]:
    port = free_port()
    log = tmp_path / "twistd.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [*TWISTD, "mqttsvc", "--db", db_dsn, "--rpc", f"tcp:{port}:interface=127.0.0.1"],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(MQTTSVC_RPC_TOKEN_FILE=str(token_file)),
        )
    url = f"http://127.0.0.1:{port}/rpc"

    def healthy() -> bool:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as r:
            return bool(r.status == 200)

    try:
        wait_for(healthy, 30, "twistd answering /healthz")
        yield process, url, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_status_summary_and_graceful_shutdown(twistd: Any, sql: Any, token_file: Path) -> None:
    """`mqttsvc status` prints the old summary; SIGTERM disconnects every site and exits."""
    process, url, log = twistd
    env = clean_env(MQTTSVC_URL=url, MQTTSVC_RPC_TOKEN_FILE=str(token_file))
    for name, port in (("north", BROKER_PORT), ("south", free_port())):
        created = subprocess.run(
            [
                MQTTSVC,
                "call",
                "site.create",
                json.dumps({"site_id": name, "host": "127.0.0.1", "port": port}),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env=env,
        )
        assert created.returncode == 0, created.stderr
    wait_for(lambda: rpc(url, "service.status")["result"]["connected"] == 1, 20, "north connecting")
    status = subprocess.run(
        [MQTTSVC, "status"], capture_output=True, text=True, timeout=30, env=env
    )
    assert status.returncode == 0, status.stderr
    assert status.stdout == (
        "Manager Status: 🟢 RUNNING\n"
        "Total Connections: 2\n"
        "  🟢 CONNECTED: 1\n"
        "  🔴 DISCONNECTED: 1\n"
    )
    unauthorized = subprocess.run(
        [MQTTSVC, "--url", url, "status"],
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_env(),
    )
    assert unauthorized.returncode == 1
    assert "HTTP 401" in unauthorized.stderr

    started = time.monotonic()
    process.send_signal(signal.SIGTERM)
    # twistd re-raises the signal once its shutdown has run, so that the
    # exit status says what ended it.
    assert process.wait(timeout=15) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 10
    with sql.cursor() as cur:
        cur.execute("SELECT site_id, status FROM mqtt_connection ORDER BY site_id")
        assert cur.fetchall() == [("north", "disconnected"), ("south", "disconnected")]
    text = log.read_text()
    assert "site north created by ops" in text
    # Once the sites were loaded, the start-up heap left the collector's reach.
    assert re.search(r"moved \d+ start-up objects out of the garbage collector", text)
    assert "Traceback" not in text
    assert "Main loop terminated." in text


def test_tac_file_builds_the_same_service(db_dsn: str, no_sites: None, token_file: Path) -> None:
    """tac/service.tac, configured by the environment alone, serves the same API."""
    port = free_port()
    tac = Path(__file__).parent.parent / "tac" / "service.tac"
    process = subprocess.Popen(
        [str(BIN / "twistd"), "-n", "--pidfile=", "-y", str(tac)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=clean_env(
            MQTTSVC_DB=db_dsn,
            MQTTSVC_RPC=f"tcp:{port}:interface=127.0.0.1",
            MQTTSVC_RPC_TOKEN_FILE=str(token_file),
        ),
    )
    url = f"http://127.0.0.1:{port}/rpc"
    try:
        status = wait_for(lambda: rpc(url, "service.status"), 30, "the tac service answering")
        assert status["result"]["state"] == "RUNNING"
        with pytest.raises(urllib.error.HTTPError) as refused:
            rpc(url, "service.status", token=None)
        assert refused.value.code == 401
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
