"""
Logging: JSON lines on request, and log files rotated by size with a
bounded number kept.
"""

from __future__ import annotations

import io
import json
import signal
import subprocess
import urllib.request
from pathlib import Path

from twisted.logger import Logger, LogLevel, globalLogPublisher

from mqttsvc.runtime.logs import event_as_json_line, make_observer
from tests.conftest import free_port
from tests.test_twistd import TWISTD, clean_env, wait_for


def test_json_line_carries_message_and_fields() -> None:
    """One event is one line: time, level, namespace, the message, and its fields."""
    line = event_as_json_line(
        {
            "log_format": "site {site_id} is {state}",
            "site_id": "north",
            "state": "connected",
            "log_level": LogLevel.warn,
            "log_namespace": "mqttsvc.sites.site",
            "log_time": 0.0,
            "when": object(),
        }
    )
    assert line.endswith("\n") and "\n" not in line[:-1]
    record = json.loads(line)
    assert record["message"] == "site north is connected"
    assert (record["level"], record["namespace"]) == ("warn", "mqttsvc.sites.site")
    assert record["time"] == "1970-01-01T00:00:00+00:00"
    assert record["site_id"] == "north" and isinstance(record["when"], str)


def test_text_observer_to_a_stream() -> None:
    out = io.StringIO()
    observer = make_observer("text", None, 1000, 1, stream=out)
    globalLogPublisher.addObserver(observer)
    try:
        Logger(namespace="t").info("hello {who}", who="operator")
    finally:
        globalLogPublisher.removeObserver(observer)
    assert "[t#info] hello operator" in out.getvalue()


def test_twistd_logs_json_to_a_rotated_file(db_dsn: str, no_sites: None, tmp_path: Path) -> None:
    """--log-format json --log-file F --log-max-bytes N --log-keep K, as an operator runs it."""
    log = tmp_path / "mqttsvc.log"
    port = free_port()
    process = subprocess.Popen(
        [
            *TWISTD,
            "mqttsvc",
            "--db",
            db_dsn,
            "--rpc",
            f"tcp:{port}:interface=127.0.0.1",
            "--log-format",
            "json",
            "--log-file",
            str(log),
            "--log-max-bytes",
            "300",
            "--log-keep",
            "2",
        ],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        # Each request is logged: enough lines to rotate several times.
        for _ in range(10):
            wait_for(lambda: _healthy(port), 30, "the service answering /healthz")
    finally:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=15)
    assert output == b""  # everything went to the file
    files = sorted(f.name for f in tmp_path.glob("mqttsvc.log*"))
    assert files == ["mqttsvc.log", "mqttsvc.log.1", "mqttsvc.log.2"]
    for name in files:
        for line in (tmp_path / name).read_text().splitlines():
            assert json.loads(line)["level"] in ("info", "warn", "error", "critical")


def _healthy(port: int) -> bool:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as response:
        return bool(response.status == 200)
