"""
tac/service.tac and C{twistd mqttsvc} build the same configuration from the
same environment, for every C{MQTTSVC_*} variable the service reads
(issue 15, item 2: the tac ignored C{MQTTSVC_MIGRATE}).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.application.service import IService, MultiService, loadApplication
from twisted.logger import ILogObserver
from twisted.scripts.twistd import ServerOptions

import mqttsvc
from mqttsvc import tap

ROOT = Path(__file__).resolve().parents[1]

#: Variables of the command-line client, not of the service.
NOT_THE_SERVICE = {"MQTTSVC_URL"}


def service_variables() -> set[str]:
    """Every MQTTSVC_* name in the service's own source."""
    names: set[str] = set()
    for path in Path(mqttsvc.__file__).parent.rglob("*.py"):
        names.update(re.findall(r"MQTTSVC_[A-Z0-9_]+", path.read_text()))
    return names - NOT_THE_SERVICE


def environment(tmp_path: Path) -> dict[str, str]:
    """A value for every variable, none of them its default."""
    values = {
        "MQTTSVC_DB": "host=127.0.0.1 user=postgres dbname=elsewhere",
        "MQTTSVC_RPC": "tcp:8799:interface=127.0.0.1",
        "MQTTSVC_RPC_TOKEN_FILE": str(tmp_path / "tokens"),
        "MQTTSVC_MIGRATE": "1",
        "MQTTSVC_INSTANCE": "tac-test",
        "MQTTSVC_MONITOR_INTERVAL": "31",
        "MQTTSVC_PROBE_INTERVAL": "901",
        "MQTTSVC_PROVING_TIME": "11",
        "MQTTSVC_SHUTDOWN_DEADLINE": "8",
        "MQTTSVC_MAX_PAYLOAD": "1234",
        "MQTTSVC_MAX_CLOCK_SKEW": "301",
        "MQTTSVC_MAX_DEVICES": "99",
        "MQTTSVC_BATCH_SIZE": "999",
        "MQTTSVC_BATCH_DELAY_MS": "11",
        "MQTTSVC_WRITE_CONNECTIONS": "3",
        "MQTTSVC_LOG_FORMAT": "json",
        "MQTTSVC_LOG_FILE": str(tmp_path / "mqttsvc.log"),
        "MQTTSVC_LOG_MAX_BYTES": "4096",
        "MQTTSVC_LOG_KEEP": "3",
        "MQTTSVC_SECRET_KEY_FILE": str(tmp_path / "key"),
        "MQTTSVC_MANHOLE": "tcp:2299:interface=127.0.0.1",
        "MQTTSVC_MANHOLE_KEYS": str(tmp_path / "keys"),
        "MQTTSVC_MANHOLE_HOST_KEY": str(tmp_path / "host-key"),
        "MQTTSVC_EVENTS_HEARTBEAT": "16",
        "MQTTSVC_EVENTS_MAX_STREAMS": "101",
        "MQTTSVC_ALERT_WEBHOOKS": "http://a.example/x, https://b.example/y",
        "MQTTSVC_ALERT_DEVICE_OFFLINE": "1",
        "MQTTSVC_ALERT_LIMIT": "6",
        "MQTTSVC_GC_FREEZE": "0",
        "MQTTSVC_HTTP_MAX_CONNECTIONS": "77",
        "MQTTSVC_HTTP_REQUEST_TIMEOUT": "29",
        "MQTTSVC_CLUSTER": "1",
        "MQTTSVC_LEASE_TTL": "7",
        "MQTTSVC_LEASE_RENEW": "1.5",
        "MQTTSVC_HANDOVER_RATE": "9",
    }
    missing = service_variables() - set(values)
    assert not missing, f"give these a value here: {sorted(missing)}"
    return values


def test_the_tac_builds_what_twistd_mqttsvc_builds(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    With every variable set, the options the tac hands to makeService are
    those twistd's own command hands to it, option by option; each one
    differs from its default, so a variable either path ignored shows.
    The tac also logs as the variables say.
    """
    env = environment(tmp_path)
    for name in list(os.environ):
        if name.startswith("MQTTSVC_"):
            monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    built: list[tap.Options] = []

    def capture(options: tap.Options, reactor: Any = None) -> IService:
        built.append(options)
        return MultiService()

    monkeypatch.setattr(tap, "makeService", capture)
    application = loadApplication(str(ROOT / "tac" / "service.tac"), "python")
    [from_tac] = built

    command = ServerOptions()
    command.parseOptions(["-n", "mqttsvc"])
    from_twistd = command.subOptions
    defaults = tap.Options(environ={})
    defaults.parseOptions([])

    assert dict(from_tac) == dict(from_twistd)
    assert from_tac["migrate"] is True
    unchanged = [
        name
        for name in from_tac
        if name not in ("help", "version", "secrets") and from_tac[name] == defaults[name]
    ]
    assert unchanged == ["no-gc-freeze"] or unchanged == [], unchanged
    assert ILogObserver(application, None) is not None
