"""
The C{mqttsvc} command as an operator runs it, in a subprocess, against a
real C{twistd mqttsvc}: tables and summaries for people, JSON with
C{--json}, and every failure as one line on stderr with exit status 1
(the call failed) or 2 (the command line was wrong).
"""

from __future__ import annotations

import json
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqttsvc.rpcclient import MqttSvcClient
from tests.conftest import BROKER_HOST, BROKER_PORT, free_port
from tests.twistd_process import BIN, TwistdService, clean_env, wait_until

MQTTSVC = str(BIN / "mqttsvc")


def run(
    *args: str, service: TwistdService | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """
    Run C{mqttsvc ARGS}; with a service, pointed at it by the environment.
    """
    if env is None:
        env = clean_env()
        if service is not None:
            env.update(MQTTSVC_URL=service.url, MQTTSVC_RPC_TOKEN_FILE=str(service.token_file))
    return subprocess.run([MQTTSVC, *args], capture_output=True, text=True, timeout=60, env=env)


def ok(*args: str, service: TwistdService) -> str:
    result = run(*args, service=service)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return result.stdout


def fails(result: subprocess.CompletedProcess[str], status: int) -> str:
    """
    Check that the command failed with C{status} and one line on stderr
    (and nothing on stdout); return that line.
    """
    assert result.returncode == status, (result.stdout, result.stderr)
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("mqttsvc: ")
    assert "Traceback" not in lines[0]
    return lines[0]


@pytest.fixture
def client(mqttsvc_service: TwistdService) -> MqttSvcClient:
    return MqttSvcClient(mqttsvc_service.url, token=mqttsvc_service.TOKEN)


@pytest.fixture
def live_site(client: MqttSvcClient, site_id: str) -> str:
    """
    A site connected to the real broker.
    """
    client.site_create(site_id, BROKER_HOST, port=BROKER_PORT)
    wait_until(
        lambda: client.site_status(site_id)["status"] == "connected",
        within=20,
        what=f"{site_id} connected",
    )
    return site_id


# --- commands --------------------------------------------------------------------


def test_status(mqttsvc_service: TwistdService, client: MqttSvcClient, live_site: str) -> None:
    """
    `status` prints the old summary; with --json, service.status itself.
    """
    text = ok("status", service=mqttsvc_service)
    lines = text.splitlines()
    assert lines[0] == "Manager Status: 🟢 RUNNING"
    total = len(client.site_list())
    assert lines[1] == f"Total Connections: {total}"
    assert any(line.startswith("  🟢 CONNECTED: ") for line in lines[2:])
    document = json.loads(ok("--json", "status", service=mqttsvc_service))
    assert set(document) == {
        "state",
        "total",
        "connected",
        "connecting",
        "disconnected",
        "error",
        "descriptors",
    }
    assert document["total"] == total


def test_sites(mqttsvc_service: TwistdService, live_site: str) -> None:
    """
    `sites` is a table with one line per site; --json (before or after the
    command) is site.list.
    """
    lines = ok("sites", service=mqttsvc_service).splitlines()
    assert lines[0].split() == [
        "SITE",
        "BROKER",
        "ENABLED",
        "STATUS",
        "STATE",
        "RETRIES",
        "LAST",
        "ERROR",
    ]
    row = next(line for line in lines if line.startswith(live_site + " "))
    assert row.split() == [
        live_site,
        f"{BROKER_HOST}:{BROKER_PORT}",
        "yes",
        "connected",
        "connected",
        "0",
        "-",
    ]
    for args in (["--json", "sites"], ["sites", "--json"]):
        sites = json.loads(ok(*args, service=mqttsvc_service))
        assert live_site in [s["site_id"] for s in sites]


def test_site_actions(
    mqttsvc_service: TwistdService, client: MqttSvcClient, live_site: str
) -> None:
    """
    `site stop|start|restart|status SITE` act on the site and print its
    status; --json prints site.status.
    """
    stopped = ok("site", "stop", live_site, service=mqttsvc_service)
    assert f"site            {live_site}" in stopped.splitlines()
    assert "status          🔴 disconnected" in stopped.splitlines()
    assert "enabled         no" in stopped.splitlines()
    assert client.site_get(live_site)["is_enabled"] is False

    started = json.loads(ok("site", "start", live_site, "--json", service=mqttsvc_service))
    assert (started["site_id"], started["is_enabled"]) == (live_site, True)
    wait_until(
        lambda: client.site_status(live_site)["status"] == "connected",
        within=20,
        what="the site reconnected",
    )
    restarted = json.loads(ok("--json", "site", "restart", live_site, service=mqttsvc_service))
    assert restarted["mqtt_retry_count"] == 0

    def shown_connected() -> str | None:
        text = ok("site", "status", live_site, service=mqttsvc_service)
        return text if "status          🟢 connected" in text else None

    text = wait_until(shown_connected, within=20, what="`site status` showing connected")
    assert "subscriptions   " in text
    assert f"{live_site}/sensor/+/data (Granted QoS 1)" in text


def test_devices(mqttsvc_service: TwistdService, client: MqttSvcClient, live_site: str) -> None:
    """
    `devices SITE` lists what the site's devices published, filtered by
    --kind and --status; --json is device.list.
    """
    from tests.publish import publish_blocking

    assert ok("devices", live_site, service=mqttsvc_service) == "no devices\n"
    publish_blocking(
        BROKER_HOST,
        BROKER_PORT,
        [
            (f"{live_site}/gateway/g7/heartbeat", b'{"status": "fine"}'),
            (f"{live_site}/sensor/s7/data", b'{"value": 1}'),
        ],
        retain=False,
    )
    wait_until(lambda: len(client.device_list(live_site)) == 2, what="two devices")
    lines = ok("devices", live_site, service=mqttsvc_service).splitlines()
    assert lines[0].split() == ["KIND", "DEVICE", "GATEWAY", "STATUS", "REPORTED", "LAST", "SEEN"]
    assert sorted(line.split()[:2] for line in lines[1:]) == [["gateway", "g7"], ["sensor", "s7"]]
    gateways = json.loads(
        ok("--json", "devices", live_site, "--kind", "gateway", service=mqttsvc_service)
    )
    assert [(d["device_id"], d["reported_status"]) for d in gateways] == [("g7", "fine")]
    online = json.loads(
        ok("--json", "devices", live_site, "--status", "online", service=mqttsvc_service)
    )
    assert {d["device_id"] for d in online} <= {"g7", "s7"}


def test_deadletters(mqttsvc_service: TwistdService, client: MqttSvcClient, live_site: str) -> None:
    """
    `deadletters` lists messages that could not be processed, for one
    site with --site and at most --limit of them.
    """
    from tests.publish import publish_blocking

    publish_blocking(
        BROKER_HOST,
        BROKER_PORT,
        [(f"{live_site}/sensor/s1/data", b"garbage"), (f"{live_site}/sensor/s2/data", b"[]")],
        retain=False,
    )
    wait_until(lambda: len(client.deadletter_list(live_site)) == 2, what="two dead letters")
    lines = ok("deadletters", "--site", live_site, service=mqttsvc_service).splitlines()
    assert lines[0].split() == ["ID", "SITE", "RECEIVED", "TOPIC", "REASON"]
    assert sorted(line.split()[3] for line in lines[1:]) == [
        f"{live_site}/sensor/s1/data",
        f"{live_site}/sensor/s2/data",
    ]
    first = run(
        "--json", "deadletters", "--site", live_site, "--limit", "1", service=mqttsvc_service
    )
    assert first.returncode == 0, first.stderr
    one = json.loads(first.stdout)
    assert len(one) == 1
    assert one[0]["site_id"] == live_site
    # More follow: a hint on stderr names the next page's cursor.
    hint = first.stderr.split()
    assert hint[:5] == ["mqttsvc:", "1", "shown,", "more", "follow:"], first.stderr
    cursor = hint[hint.index("--cursor") + 1]
    two = json.loads(
        ok(
            "--json",
            "deadletters",
            "--site",
            live_site,
            "--cursor",
            cursor,
            service=mqttsvc_service,
        )
    )
    every = json.loads(
        ok("--json", "deadletters", "--site", live_site, "--all", service=mqttsvc_service)
    )
    assert one + two == every and len(every) == 2
    assert ok("deadletters", "--site", "nothing-here", service=mqttsvc_service) == (
        "no dead letters\n"
    )


def test_topics_page_by_page(mqttsvc_service: TwistdService, sql: Any, site_id: str) -> None:
    """
    `topics SITE` shows the first page as a table and names the next page
    on stderr; --prefix filters on the server; --all follows every page.
    """
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO discovered_topic (site_id, topic_path, first_seen_at, last_seen_at)"
            " SELECT %s, 'a/' || lpad(i::text, 4, '0'), now(), now()"
            " FROM generate_series(1, 1500) i",
            (site_id,),
        )
    first = run("topics", site_id, service=mqttsvc_service)
    lines = first.stdout.splitlines()
    assert lines[0].split() == ["TOPIC", "MESSAGES", "LAST", "SEEN"]
    assert [line.split()[0] for line in lines[1:]] == [f"a/{i:04d}" for i in range(1, 101)]
    assert "more follow: add --cursor " in first.stderr
    assert (
        len(ok("topics", site_id, "--prefix", "a/14", service=mqttsvc_service).splitlines()) == 101
    )
    every = json.loads(ok("--json", "topics", site_id, "--all", service=mqttsvc_service))
    assert [t["topic_path"] for t in every] == [f"a/{i:04d}" for i in range(1, 1501)]


def test_call(mqttsvc_service: TwistdService, live_site: str) -> None:
    """
    `call METHOD JSON` prints any method's result as JSON, with params by
    name or position, or none.
    """
    by_name = json.loads(
        ok("call", "site.get", json.dumps({"site_id": live_site}), service=mqttsvc_service)
    )
    by_position = json.loads(
        ok("call", "site.get", json.dumps([live_site]), service=mqttsvc_service)
    )
    assert by_name == by_position
    assert by_name["site_id"] == live_site
    assert json.loads(ok("call", "service.status", service=mqttsvc_service))["state"] == "RUNNING"


def test_flags_override_the_environment(mqttsvc_service: TwistdService) -> None:
    """
    --url and --token-file work without any MQTTSVC_ variable, and take
    precedence over them.
    """
    result = run(
        *("--url", mqttsvc_service.url, "--token-file", str(mqttsvc_service.token_file)),
        "status",
        env=clean_env(MQTTSVC_URL=f"http://127.0.0.1:{free_port()}/rpc"),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Manager Status: 🟢 RUNNING\n")


def test_migrate(db_dsn: str) -> None:
    """
    `migrate --db DSN` on a migrated database says there is nothing to do.
    """
    result = run("migrate", "--db", db_dsn)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "the schema is up to date\n"


# --- failures --------------------------------------------------------------------------


def test_rpc_errors_exit_1(mqttsvc_service: TwistdService, live_site: str) -> None:
    """
    A call the service refuses exits 1 with the method, the service's
    message and the code on one line.
    """
    line = fails(run("site", "status", "no-such-site", service=mqttsvc_service), 1)
    assert line == (
        "mqttsvc: site.status failed: Site not found: no-such-site (code -32001) "
        '{"site_id": "no-such-site"}'
    )
    created = json.dumps({"site_id": live_site, "host": "127.0.0.1"})
    line = fails(run("call", "site.create", created, service=mqttsvc_service), 1)
    assert "already exists" in line
    assert "(code -32002)" in line
    line = fails(run("call", "event.list", '{"limit": 0}', service=mqttsvc_service), 1)
    assert '"field": "limit"' in line


def test_authentication_errors_exit_1(mqttsvc_service: TwistdService, tmp_path: Path) -> None:
    """
    No token or a wrong one exits 1, saying HTTP 401 and how to give one.
    """
    line = fails(run("--url", mqttsvc_service.url, "status", env=clean_env()), 1)
    assert "HTTP 401" in line
    assert "--token-file" in line
    wrong = tmp_path / "wrong-tokens"
    wrong.write_text("ops not-the-right-token-123456\n")
    line = fails(
        run("--url", mqttsvc_service.url, "--token-file", str(wrong), "sites", env=clean_env()),
        1,
    )
    assert "HTTP 401" in line


def test_transport_errors_exit_1() -> None:
    """
    Nothing listening exits 1 at once, naming the URL.
    """
    url = f"http://127.0.0.1:{free_port()}/rpc"
    line = fails(run("--url", url, "sites", env=clean_env()), 1)
    assert line == f"mqttsvc: cannot reach mqttsvc at {url}: Connection refused"


@pytest.fixture
def silent_url() -> Iterator[str]:
    """
    A listening socket that is never accepted from nor answered: the
    kernel completes connections to it, and no answer ever comes.
    """
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield f"http://127.0.0.1:{server.getsockname()[1]}/rpc"


def test_timeout_exits_1(silent_url: str) -> None:
    """
    --timeout bounds the wait for an answer.
    """
    line = fails(run("--url", silent_url, "--timeout", "0.5", "status", env=clean_env()), 1)
    assert line == f"mqttsvc: {silent_url} did not answer within 0.5 s"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        ([], "the following arguments are required: COMMAND"),
        (["bogus"], "invalid choice: 'bogus'"),
        (["site"], "the following arguments are required: ACTION"),
        (["site", "start"], "the following arguments are required: SITE"),
        (["devices", "x", "--kind", "robot"], "argument --kind: invalid choice: 'robot'"),
        (["deadletters", "--limit", "0"], "argument --limit: must be at least 1, not 0"),
        (["sites", "--all", "--limit", "5"], "--all reads every page"),
        (["--timeout", "-1", "status"], "argument --timeout: must be more than 0"),
        (["call", "site.get", "{not json"], "params are not JSON"),
        (["call", "site.get", '"x"'], "params must be a JSON object or array"),
        (["--url", "127.0.0.1:8780", "status"], "--url: url must be an http:// or https:// URL"),
        (["--token-file", "/nonexistent/tokens", "status"], "cannot read /nonexistent/tokens"),
        (["migrate"], "migrate: no database given (use --db or MQTTSVC_DB)"),
    ],
)
def test_usage_errors_exit_2(args: list[str], expected: str) -> None:
    """
    A wrong command line exits 2 with one line naming the problem, and no
    call is attempted (nothing listens on the default URL's port here).
    """
    env = clean_env(MQTTSVC_URL=f"http://127.0.0.1:{free_port()}/rpc")
    line = fails(run(*args, env=env), 2)
    assert expected in line


def test_help_lists_the_commands() -> None:
    """
    --help names every command.
    """
    result = run("--help")
    assert result.returncode == 0
    for command in (
        "status",
        "sites",
        "site",
        "devices",
        "topics",
        "deadletters",
        "call",
        "migrate",
    ):
        assert command in result.stdout


def test_status_of_a_cluster_lists_its_instances() -> None:
    """
    In a cluster `status` adds each live instance, its sites and its last
    renewal under the old summary, which is unchanged.
    """
    from mqttsvc.cli import format_status

    counts = {"state": "RUNNING", "total": 3, "connected": 3, "disconnected": 0}
    alone = format_status(counts)
    members = [
        {"instance": "a", "sites": ["s1", "s2"], "renewed_at": "2026-12-07T10:00:00+00:00"},
        {"instance": "b", "sites": ["s3"], "renewed_at": "2026-12-07T10:00:01+00:00"},
    ]
    text = format_status({**counts, "instances": members})
    assert text.splitlines()[: len(alone.splitlines())] == alone.splitlines()
    assert text.splitlines()[len(alone.splitlines()) :] == [
        "Instances: 2",
        "  a: 2 sites, renewed 2026-12-07T10:00:00+00:00",
        "  b: 1 sites, renewed 2026-12-07T10:00:01+00:00",
    ]
