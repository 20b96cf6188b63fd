"""
L{mqttsvc.rpcclient} against a real C{twistd mqttsvc}: what the Django backend
sees when it drives sites over JSON-RPC, including every way a call can
fail (refused by the service, refused token, nothing listening, no answer).
"""

from __future__ import annotations

import http.server
import json
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from mqttsvc.control.rpc.paging import MAX_LIMIT, MAX_SITE_LIMIT
from mqttsvc.rpcclient import (
    PAGE_SIZE,
    SITE_PAGE_SIZE,
    AuthenticationError,
    Conflict,
    InvalidParams,
    MethodNotFound,
    MqttSvcClient,
    MqttSvcError,
    NotFound,
    Page,
    ResponseTooLarge,
    RPCError,
    Timeout,
    TransportError,
    Unavailable,
)
from tests.conftest import BROKER_HOST, BROKER_PORT, free_port
from tests.twistd_process import TwistdService, wait_until

ROOT = Path(__file__).parent.parent


@pytest.fixture
def client(mqttsvc_service: TwistdService) -> MqttSvcClient:
    return MqttSvcClient(mqttsvc_service.url, token=mqttsvc_service.TOKEN, timeout=10)


def connected(client: MqttSvcClient, site_id: str) -> Any:
    """
    Wait until the site is connected with every subscription granted; return
    its status.
    """

    def check() -> Any:
        status = client.site_status(site_id)
        granted = status["subscriptions"] and all(s["granted"] for s in status["subscriptions"])
        return status if status["status"] == "connected" and granted else None

    return wait_until(check, within=20, what=f"{site_id} connected and subscribed")


# --- no dependencies ----------------------------------------------------------


def test_import_needs_only_the_standard_library() -> None:
    """
    A fresh interpreter that imports mqttsvc.rpcclient loads no Twisted and no
    other third-party module, even where they are installed; and it imports
    with no site-packages at all.
    """
    code = (
        "import sys\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "before = set(sys.modules)\n"
        "import mqttsvc.rpcclient\n"
        "names = {m.split('.')[0] for m in set(sys.modules) - before}\n"
        "print(sorted(names - set(sys.stdlib_module_names) - {'mqttsvc'}))\n"
        "print('twisted' in sys.modules)\n"
    )
    installed = subprocess.run(
        [sys.executable, "-I", "-c", "import twisted, attrs"], capture_output=True, timeout=60
    )
    assert installed.returncode == 0, "the check needs Twisted importable to mean anything"
    for flags in (["-I"], ["-I", "-S"]):
        result = subprocess.run(
            [sys.executable, *flags, "-c", code], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.splitlines() == ["[]", "False"], flags


def test_the_old_import_path_warns_and_is_the_same_client() -> None:
    """
    C{mqttsvc.client}, the client's name before it was renamed for what it
    is, still imports for one release: it warns, and its names are the
    renamed module's own objects.
    """
    code = (
        "import sys, warnings\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "warnings.simplefilter('error')\n"
        "try:\n"
        "    import mqttsvc.client\n"
        "except DeprecationWarning as e:\n"
        "    print('warned:', e)\n"
        "warnings.simplefilter('ignore')\n"
        "import mqttsvc.client as old, mqttsvc.rpcclient as new\n"
        "print(all(getattr(old, n) is getattr(new, n) for n in new.__all__))\n"
    )
    result = subprocess.run(
        [sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    warned, same = result.stdout.splitlines()
    assert (
        warned.startswith("warned: mqttsvc.client is deprecated") and "mqttsvc.rpcclient" in warned
    )
    assert same == "True"


# --- the API, for real ---------------------------------------------------------


def test_site_lifecycle(client: MqttSvcClient, site_id: str) -> None:
    """
    A site created through the client connects to the real broker; it is
    listed, counted, stopped, started and restarted, and its connection
    events can be read back.
    """
    created = client.site_create(site_id, BROKER_HOST, port=BROKER_PORT, keepalive=30)
    assert created["site_id"] == site_id
    assert created["keepalive"] == 30
    assert created["has_password"] is False
    assert created["status"]["site_id"] == site_id
    connected(client, site_id)

    config = client.site_get(site_id)
    assert (config["host"], config["port"], config["is_enabled"]) == (
        BROKER_HOST,
        BROKER_PORT,
        True,
    )
    assert [t["kind"] for t in config["topics"]] == [
        "gateway_heartbeat",
        "datalogger_heartbeat",
        "sensor_data",
    ]
    listed = {s["site_id"]: s for s in client.site_list()}
    assert listed[site_id]["status"]["status"] == "connected"

    counts = client.service_status()
    assert counts["state"] == "RUNNING"
    assert counts["total"] == len(listed)
    assert counts["connected"] >= 1
    assert counts["total"] == sum(
        counts[s] for s in ("connected", "connecting", "disconnected", "error")
    )

    stopped = client.site_stop(site_id)
    assert (stopped["status"], stopped["is_enabled"]) == ("disconnected", False)
    assert client.site_get(site_id)["is_enabled"] is False

    started = client.site_start(site_id)
    assert started["is_enabled"] is True
    connected(client, site_id)

    restarted = client.site_restart(site_id)
    assert restarted["mqtt_retry_count"] == 0
    assert connected(client, site_id)["last_error"] is None

    events = client.event_list(site_id=site_id)
    assert {e["type"] for e in events} <= {"connection", "device"}
    transitions = [e["data"]["to"] for e in events if e["type"] == "connection"]
    assert transitions.count("connected") >= 3, transitions
    later = client.event_list(site_id=site_id, since=events[0]["at"], limit=1000)
    assert events[0]["id"] not in [e["id"] for e in later]
    assert len(client.event_list(site_id=site_id, limit=1)) == 1


def test_site_update_and_delete(client: MqttSvcClient, site_id: str) -> None:
    """
    site.update changes only the fields given (a new port reconnects the
    site, and a broker that refuses shows in the status); site.delete
    removes the site, after which it is not found.
    """
    client.site_create(site_id, BROKER_HOST, port=BROKER_PORT)
    connected(client, site_id)

    closed_port = free_port()
    updated = client.site_update(site_id, port=closed_port, keepalive=20)
    assert (updated["port"], updated["keepalive"], updated["host"]) == (
        closed_port,
        20,
        BROKER_HOST,
    )
    refused = wait_until(
        lambda: (s := client.site_status(site_id))["last_error"] and s,
        within=20,
        what="the refused connection to be reported",
    )
    assert refused["status"] != "connected"
    assert refused["last_error"].startswith("refused")

    client.site_update(site_id, port=BROKER_PORT)
    connected(client, site_id)

    assert client.site_delete(site_id) == {"site_id": site_id, "deleted": True}
    with pytest.raises(NotFound):
        client.site_get(site_id)
    assert site_id not in [s["site_id"] for s in client.site_list()]


def test_site_test(client: MqttSvcClient) -> None:
    """
    site.test reports whether a broker accepts a connection, without
    creating a site; a refused connection is a result, not an exception.
    """
    before = len(client.site_list())
    assert client.site_test(BROKER_HOST, port=BROKER_PORT) == {
        "ok": True,
        "category": None,
        "error": None,
    }
    failed = client.site_test("127.0.0.1", port=free_port())
    assert failed["ok"] is False
    assert failed["category"] == "refused"
    assert failed["error"]
    assert len(client.site_list()) == before


def test_observations_and_dead_letters(client: MqttSvcClient, site_id: str) -> None:
    """
    Messages published on the real broker show up as devices, readings and
    discovered topics; an unparsable one as a dead letter, which can be
    replayed (and fails again) and purged.
    """
    from tests.publish import publish_blocking

    client.site_create(site_id, BROKER_HOST, port=BROKER_PORT)
    connected(client, site_id)
    publish_blocking(
        BROKER_HOST,
        BROKER_PORT,
        [
            (f"{site_id}/gateway/g1/heartbeat", b'{"status": "ok"}'),
            (f"{site_id}/sensor/s1/data", b'{"value": 21.5, "unit": "C"}'),
            (f"{site_id}/sensor/s2/data", b"not json"),
        ],
        retain=False,
    )

    devices = wait_until(
        lambda: len(d := client.device_list(site_id)) == 2 and d,
        what="the gateway and the sensor",
    )
    assert sorted((d["kind"], d["device_id"]) for d in devices) == [
        ("gateway", "g1"),
        ("sensor", "s1"),
    ]
    gateways = client.device_list(site_id, kind="gateway")
    assert [(d["device_id"], d["reported_status"]) for d in gateways] == [("g1", "ok")]
    assert [d["device_id"] for d in client.device_list(site_id, status="online")] == [
        d["device_id"] for d in client.device_list(site_id) if d["status"] == "online"
    ]
    counts = {
        status: sum(d["status"] == status for d in devices)
        for status in ("online", "offline", "unknown")
    }
    assert client.device_counts(site_id) == [{"site_id": site_id, **counts}]

    readings = client.reading_list(site_id, "s1")
    assert [(r["name"], r["value"], r["unit"]) for r in readings] == [("value", 21.5, "C")]
    assert client.reading_list(site_id, "s1", since=readings[0]["ts"]) == []

    topics = wait_until(
        lambda: len(t := client.topic_list(site_id)) == 3 and t, what="three discovered topics"
    )
    assert {t["topic_path"] for t in topics} == {
        f"{site_id}/gateway/g1/heartbeat",
        f"{site_id}/sensor/s1/data",
        f"{site_id}/sensor/s2/data",
    }

    letters = wait_until(lambda: client.deadletter_list(site_id=site_id), what="a dead letter")
    assert len(letters) == 1
    letter = letters[0]
    assert (letter["topic"], letter["payload"]) == (f"{site_id}/sensor/s2/data", "not json")
    assert letter["payload_base64"] == "bm90IGpzb24="
    assert letter["reason"]
    assert client.deadletter_replay([letter["id"]]) == {"replayed": 0, "dead_again": 1}
    assert client.deadletter_purge([letter["id"]]) == {"purged": 1}
    assert client.deadletter_list(site_id=site_id) == []


def test_discover_matches_the_client(client: MqttSvcClient) -> None:
    """
    The service's OpenRPC document lists exactly the methods the client has
    a typed method for (rpc.discover being discover()).
    """
    document = client.discover()
    assert str(document["openrpc"]).startswith("1.")
    served = {m["name"] for m in document["methods"]}
    typed = {
        name.replace("_", ".", 1)
        for name in vars(MqttSvcClient)
        if not name.startswith(("_", "iter_")) and name not in ("call", "discover")
    }
    assert served == typed | {"rpc.discover"}
    # Each iter_* helper follows the pages of a list method.
    followed = {name for name in vars(MqttSvcClient) if name.startswith("iter_")}
    assert followed == {
        "iter_sites",
        "iter_devices",
        "iter_readings",
        "iter_topics",
        "iter_events",
        "iter_deadletters",
    }


def test_pages_and_iterators(client: MqttSvcClient, sql: Any, site_id: str) -> None:
    """
    A list method answers one page (a list with next_cursor); its iter_*
    helper follows the cursors and yields every item once; a poller of
    reading_list in receive order keeps its cursor and gets only what
    arrived since.
    """
    assert (PAGE_SIZE, SITE_PAGE_SIZE) == (MAX_LIMIT, MAX_SITE_LIMIT)
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO discovered_topic (site_id, topic_path, first_seen_at, last_seen_at)"
            " SELECT %s, 't/' || lpad(i::text, 4, '0'), now(), now()"
            " FROM generate_series(1, 2500) i",
            (site_id,),
        )
        cur.execute(
            "INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value)"
            " SELECT %s, 'x', '2020-01-01Z'::timestamptz + i * interval '1 s', 'v', i"
            " FROM generate_series(1, 1500) i",
            (site_id,),
        )
    first = client.topic_list(site_id)
    assert isinstance(first, Page) and len(first) == 100
    assert first.next_cursor is not None
    second = client.topic_list(site_id, cursor=first.next_cursor, limit=1000)
    assert second[0]["topic_path"] == "t/0101"
    every = [t["topic_path"] for t in client.iter_topics(site_id)]
    assert every == [f"t/{i:04d}" for i in range(1, 2501)]
    assert len(list(client.iter_topics(site_id, prefix="t/2"))) == 501
    values = [r["value"] for r in client.iter_readings(site_id, "x")]
    assert values == list(range(1, 1501))

    caught_up = client.reading_list(site_id, "x", order="received", limit=1)
    assert caught_up.next_cursor is not None
    assert client.reading_list(site_id, "x", order="received", cursor=caught_up.next_cursor) == []
    with sql.cursor() as cur:
        cur.execute(
            "INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value)"
            " VALUES (%s, 'x', '1999-01-01Z', 'v', -1)",
            (site_id,),
        )
    news = client.reading_list(site_id, "x", order="received", cursor=caught_up.next_cursor)
    assert [r["value"] for r in news] == [-1]
    with pytest.raises(InvalidParams) as bad:
        client.topic_list(site_id, cursor=caught_up.next_cursor)
    assert bad.value.field == "cursor"


# --- errors from the service ---------------------------------------------------


def test_unknown_site_is_not_found(client: MqttSvcClient) -> None:
    """
    Every call about a site that does not exist raises NotFound, naming the
    site and the method.
    """
    for call in (
        client.site_get,
        client.site_status,
        client.site_start,
        client.site_stop,
        client.site_restart,
        client.site_delete,
    ):
        with pytest.raises(NotFound) as raised:
            call("no-such-site")
        assert raised.value.code == -32001
        assert raised.value.data == {"site_id": "no-such-site"}
        assert raised.value.method == call.__name__.replace("_", ".", 1)
        assert "no-such-site" in str(raised.value)
    with pytest.raises(NotFound):
        client.site_update("no-such-site", keepalive=30)


def test_existing_site_is_a_conflict(client: MqttSvcClient, site_id: str) -> None:
    """
    Creating a site twice raises Conflict; the first one is untouched.
    """
    client.site_create(site_id, "127.0.0.1", port=free_port(), is_enabled=False)
    with pytest.raises(Conflict) as raised:
        client.site_create(site_id, "192.0.2.1")
    assert raised.value.code == -32002
    assert client.site_get(site_id)["host"] == "127.0.0.1"


@pytest.mark.parametrize(
    ("method", "params", "field"),
    [
        ("site.status", {}, "site_id"),
        ("site.create", {"site_id": "x", "host": "h", "port": "1883"}, "port"),
        ("site.create", {"site_id": "x", "host": "h", "port": 0}, "port"),
        ("site.create", {"site_id": "x", "host": "h", "topics": [{"topic": "a", "qos": 3}]}, None),
        ("site.create", {"site_id": "x", "host": "h", "colour": "red"}, "colour"),
        ("event.list", {"limit": 0}, "limit"),
        ("event.list", {"since": "yesterday"}, "since"),
    ],
)
def test_bad_params_name_the_field(
    client: MqttSvcClient, method: str, params: dict[str, Any], field: str | None
) -> None:
    """
    A missing or invalid parameter raises InvalidParams whose .field names it.
    """
    with pytest.raises(InvalidParams) as raised:
        client.call(method, params)
    assert raised.value.code == -32602
    if field is None:
        assert raised.value.field is not None
        assert raised.value.field.startswith("topics[0].")
    else:
        assert raised.value.field == field


def test_typed_methods_report_bad_params(client: MqttSvcClient, site_id: str) -> None:
    """
    The typed methods raise InvalidParams too, and nothing is created.
    """
    with pytest.raises(InvalidParams) as raised:
        client.site_create(site_id, "127.0.0.1", port=70000)
    assert raised.value.field == "port"
    with pytest.raises(NotFound):
        client.site_get(site_id)


def test_unknown_method(client: MqttSvcClient) -> None:
    """
    A method the service does not have raises MethodNotFound.
    """
    with pytest.raises(MethodNotFound) as raised:
        client.call("site.explode", {"site_id": "x"})
    assert raised.value.code == -32601


def test_error_codes_select_the_exception() -> None:
    """
    Each documented code maps to its class, all of them RPCErrors (and
    MqttSvcErrors); an unknown code is a plain RPCError.
    """
    for code, kind in (
        (-32001, NotFound),
        (-32002, Conflict),
        (-32003, Unavailable),
        (-32004, ResponseTooLarge),
        (-32602, InvalidParams),
        (-32601, MethodNotFound),
        (-32603, RPCError),
    ):
        error = RPCError.from_error({"code": code, "message": "m", "data": {"field": "f"}}, "x.y")
        assert type(error) is kind
        assert isinstance(error, MqttSvcError)
        assert (error.code, error.message, error.method) == (code, "m", "x.y")
    assert InvalidParams(-32602, "m", None).field is None
    with pytest.raises(TransportError):
        RPCError.from_error({"message": "no code"})


# --- errors on the way ------------------------------------------------------------


def test_wrong_or_missing_token(mqttsvc_service: TwistdService) -> None:
    """
    A wrong token and no token both raise AuthenticationError (HTTP 401).
    """
    wrong = MqttSvcClient(mqttsvc_service.url, token="not-the-token-0123456789")
    with pytest.raises(AuthenticationError, match="HTTP 401"):
        wrong.service_status()
    with pytest.raises(AuthenticationError, match="no token was given"):
        MqttSvcClient(mqttsvc_service.url).service_status()


def test_token_is_not_in_repr(mqttsvc_service: TwistdService) -> None:
    """
    The client's repr, which may reach a log, does not show the token.
    """
    client = MqttSvcClient(mqttsvc_service.url, token=mqttsvc_service.TOKEN)
    assert mqttsvc_service.TOKEN not in repr(client)
    assert mqttsvc_service.url in repr(client)


def test_nothing_listening() -> None:
    """
    A port where nothing listens raises TransportError at once (not Timeout).
    """
    client = MqttSvcClient(f"http://127.0.0.1:{free_port()}/rpc", timeout=10)
    started = time.monotonic()
    with pytest.raises(TransportError) as raised:
        client.service_status()
    assert not isinstance(raised.value, Timeout)
    assert "Connection refused" in str(raised.value)
    assert raised.value.status is None
    assert time.monotonic() - started < 5


class _Silent(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        # Take the connection and say nothing until the test is over.
        self.server.done.wait(30)  # type: ignore[attr-defined]


@pytest.fixture
def silent_url() -> Iterator[str]:
    """
    A TCP server that accepts connections and never answers.
    """
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Silent)
    server.daemon_threads = True
    server.done = threading.Event()  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/rpc"
    finally:
        server.done.set()  # type: ignore[attr-defined]
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_no_answer_times_out(silent_url: str) -> None:
    """
    A server that never answers raises Timeout after the client's timeout,
    and sooner when a call is given a shorter one.
    """
    client = MqttSvcClient(silent_url, timeout=0.5)
    started = time.monotonic()
    with pytest.raises(Timeout, match=r"did not answer within 0\.5 s"):
        client.service_status()
    assert 0.4 < time.monotonic() - started < 5

    patient = MqttSvcClient(silent_url, timeout=60)
    started = time.monotonic()
    with pytest.raises(Timeout):
        patient.site_status("x", timeout=0.3)
    assert time.monotonic() - started < 5


class _Broken(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        status, body = {
            "/bad-gateway": (502, b"<html><h1>502 Bad Gateway</h1></html>"),
            "/not-json": (200, b"hello"),
            "/not-rpc": (200, b'{"hello": "world"}'),
        }[self.path]
        self.send_response(status)
        self.send_header("Content-Type", "text/html")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def broken_server() -> Iterator[str]:
    """
    An HTTP server that answers everything wrongly (a proxy's error page,
    non-JSON, JSON that is not JSON-RPC); its base URL.
    """
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Broken)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def test_answers_that_are_not_json_rpc(broken_server: str, mqttsvc_service: TwistdService) -> None:
    """
    A 5xx page, a non-JSON body, JSON that is not a JSON-RPC response and
    an HTTP error from the real service (a wrong path) are TransportErrors
    that say what came back.
    """
    with pytest.raises(TransportError) as raised:
        MqttSvcClient(f"{broken_server}/bad-gateway").service_status()
    assert raised.value.status == 502
    assert "HTTP 502" in str(raised.value)
    assert "Bad Gateway" in str(raised.value)
    with pytest.raises(TransportError, match="other than JSON: 'hello'"):
        MqttSvcClient(f"{broken_server}/not-json").service_status()
    with pytest.raises(TransportError, match="other than a JSON-RPC response"):
        MqttSvcClient(f"{broken_server}/not-rpc").service_status()
    healthz = mqttsvc_service.url.replace("/rpc", "/healthz")
    with pytest.raises(TransportError) as raised:
        MqttSvcClient(healthz, token=mqttsvc_service.TOKEN).service_status()
    assert raised.value.status == 405


def test_oversized_request_is_an_rpc_error(client: MqttSvcClient) -> None:
    """
    A body over the service's limit is answered (HTTP 413) with a JSON-RPC
    error, which the client raises as an RPCError, not a transport failure.
    """
    with pytest.raises(RPCError) as raised:
        client.call("site.status", {"site_id": "x" * (1024 * 1024 + 1)})
    assert raised.value.code == -32600


def test_bad_url_is_refused_at_once() -> None:
    """
    A URL that is not http(s) and a timeout that is not positive are
    refused when the client is made, not on the first call.
    """
    with pytest.raises(ValueError, match="url"):
        MqttSvcClient("127.0.0.1:8780/rpc")
    with pytest.raises(ValueError, match="timeout"):
        MqttSvcClient("http://127.0.0.1:8780/rpc", timeout=0)


def test_positional_params_and_json_round_trip(client: MqttSvcClient, site_id: str) -> None:
    """
    call() passes params by position too, and non-ASCII text survives the
    round trip.
    """
    client.site_create(
        site_id,
        "127.0.0.1",
        port=free_port(),
        is_enabled=False,
        topics=[{"topic": f"{site_id}/température/{{sensor_id}}", "kind": "sensor_data"}],
    )
    config = client.call("site.get", [site_id])
    assert config["topics"][0]["topic"] == f"{site_id}/température/{{sensor_id}}"
    assert json.loads(json.dumps(config)) == client.site_get(site_id)
