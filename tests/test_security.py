"""
Security: TLS to brokers (server-authenticated and mutual, with the
failures an operator must be able to tell apart), broker passwords
encrypted at rest with key rotation, and a canary password that must not
appear in any output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from mqttsvc.config import ConfigError
from mqttsvc.db.secrets import PREFIX, SecretError, Secrets, load_key
from tests.conftest import PrivateBroker
from tests.service import RunningService
from tests.tls_certs import Authority
from tests.waiting import eventually

CANARY = "canary-Pw-7f3a9c"


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Path]:
    tmp_path.chmod(0o755)
    ca = Authority(tmp_path, "test-ca")
    stranger = Authority(tmp_path, "stranger-ca")
    server_cert, server_key = ca.issue(tmp_path, "broker", server=True)
    client_cert, client_key = ca.issue(tmp_path, "client", server=False)
    return {
        "ca": ca.path,
        "stranger": stranger.path,
        "server_cert": server_cert,
        "server_key": server_key,
        "client_cert": client_cert,
        "client_key": client_key,
    }


def _tls_broker(directory: Path, pki: dict[str, Path], mutual: bool) -> PrivateBroker:
    directory.mkdir()
    directory.chmod(0o755)
    broker = PrivateBroker(
        directory,
        f"cafile {pki['ca']}\ncertfile {pki['server_cert']}\nkeyfile {pki['server_key']}\n"
        f"require_certificate {'true' if mutual else 'false'}\n",
    )
    broker.start()
    return broker


@pytest.fixture
def tls_broker(tmp_path: Path, pki: dict[str, Path]) -> Iterator[PrivateBroker]:
    broker = _tls_broker(tmp_path / "tls", pki, mutual=False)
    yield broker
    broker.stop()


@pytest.fixture
def mtls_broker(tmp_path: Path, pki: dict[str, Path]) -> Iterator[PrivateBroker]:
    broker = _tls_broker(tmp_path / "mtls", pki, mutual=True)
    yield broker
    broker.stop()


async def _test(running: RunningService, port: int, host: str = "127.0.0.1", **tls: Any) -> Any:
    return await running.call("site.test", {"host": host, "port": port, "tls": tls})


@pytest_twisted.ensureDeferred
async def test_server_authenticated_tls(
    running: RunningService, site_id: str, tls_broker: PrivateBroker, pki: dict[str, Path]
) -> None:
    """With the right CA a site connects over TLS and subscribes; the wrong CA and host fail."""
    await running.call(
        "site.create",
        {
            "site_id": site_id,
            "host": "127.0.0.1",
            "port": tls_broker.port,
            "tls": {"ca_certs": str(pki["ca"])},
        },
    )

    async def subscribed() -> bool:
        status = await running.call("site.status", [site_id])
        return bool(status["state"] == "connected" and status["subscriptions"])

    await eventually(subscribed, what="a TLS connection")
    assert (await running.call("site.get", [site_id]))["tls"] == {"ca_certs": str(pki["ca"])}

    wrong_ca = await _test(running, tls_broker.port, ca_certs=str(pki["stranger"]))
    assert wrong_ca["category"] == "tls"
    assert wrong_ca["error"].startswith("tls: certificate verification failed")
    assert "self-signed certificate in certificate chain" in wrong_ca["error"]

    wrong_host = await _test(running, tls_broker.port, host="localhost", ca_certs=str(pki["ca"]))
    assert wrong_host["category"] == "tls"
    assert "Hostname mismatch" in wrong_host["error"]

    # The explicit opt-out connects anyway (and is logged loudly).
    insecure = await _test(running, tls_broker.port, ca_certs=str(pki["stranger"]), insecure=True)
    assert insecure["ok"] is True

    missing = await _test(running, tls_broker.port, ca_certs="/no/such/ca.pem")
    assert missing["category"] == "tls"
    assert "cannot load the TLS files" in missing["error"]


@pytest_twisted.ensureDeferred
async def test_mutual_tls(
    running: RunningService, mtls_broker: PrivateBroker, pki: dict[str, Path]
) -> None:
    """A broker that requires a client certificate accepts ours and refuses its absence."""
    ok = await _test(
        running,
        mtls_broker.port,
        ca_certs=str(pki["ca"]),
        certfile=str(pki["client_cert"]),
        keyfile=str(pki["client_key"]),
    )
    assert ok == {"ok": True, "category": None, "error": None}
    refused = await _test(running, mtls_broker.port, ca_certs=str(pki["ca"]))
    assert refused["ok"] is False
    assert refused["category"] == "tls", refused
    assert "certificate" in refused["error"].lower()


def test_secrets_round_trip_and_wrong_key() -> None:
    """Stored values are prefixed ciphertext; another key cannot read them."""
    one, other = Secrets(Secrets.generate_key()), Secrets(Secrets.generate_key())
    stored = one.encrypt(CANARY)
    assert stored.startswith(PREFIX) and CANARY not in stored
    assert one.decrypt(stored) == CANARY
    with pytest.raises(SecretError):
        other.decrypt(stored)
    assert one.decrypt("plain") == "plain"
    assert "key" in repr(one) and Secrets.generate_key().decode() not in repr(one)


def test_key_file_checks(tmp_path: Path) -> None:
    key = tmp_path / "key"
    with pytest.raises(ConfigError, match="cannot read"):
        load_key(str(key))
    key.write_bytes(Secrets.generate_key())
    key.chmod(0o640)
    with pytest.raises(ConfigError, match="chmod 600"):
        load_key(str(key))
    key.chmod(0o600)
    load_key(str(key))
    key.write_text("not a key")
    with pytest.raises(ConfigError, match="mqttsvc generate-key"):
        load_key(str(key))


@pytest_twisted.ensureDeferred
async def test_passwords_are_encrypted_at_rest(
    running: RunningService, sql: Any, site_id: str
) -> None:
    """The API stores ciphertext; a password written in plain text by SQL is encrypted."""
    await running.call("site.create", {"site_id": site_id, "host": "127.0.0.1", "password": CANARY})
    with sql.cursor() as cur:
        cur.execute("SELECT password FROM mqtt_connection WHERE site_id = %s", (site_id,))
        [(stored,)] = cur.fetchall()
    assert stored.startswith(PREFIX) and CANARY not in stored
    from twisted.internet.threads import deferToThread

    def set_plain() -> None:
        with sql.cursor() as cur:
            cur.execute(
                "UPDATE mqtt_connection SET password = 'plain-secret' WHERE site_id = %s",
                (site_id,),
            )

    await deferToThread(set_plain)

    def encrypted() -> bool:
        with sql.cursor() as cur:
            cur.execute("SELECT password FROM mqtt_connection WHERE site_id = %s", (site_id,))
            return bool(cur.fetchall()[0][0].startswith(PREFIX))

    await eventually(encrypted, what="the plain password encrypted")


def _run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    from tests.test_twistd import clean_env

    return subprocess.run(
        [str(Path(sys.executable).parent / args[0]), *args[1:]],
        capture_output=True,
        text=True,
        timeout=60,
        env=env or clean_env(),
    )


def _key(path: Path) -> Path:
    path.write_text(_run("mqttsvc", "generate-key").stdout)
    path.chmod(0o600)
    return path


def test_start_up_key_errors_and_rotation(db_dsn: str, no_sites: None, tmp_path: Path) -> None:
    """
    Stored passwords need the key: none, or a wrong one, stops start-up with
    one line; rotate-key moves every password to a new key in one go.
    """
    from tests.test_twistd import start_fails

    first, second, stranger = _key(tmp_path / "k1"), _key(tmp_path / "k2"), _key(tmp_path / "k3")
    secrets = load_key(str(first))
    import psycopg2

    conn = psycopg2.connect(db_dsn)
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO mqtt_connection (site_id, host, password, is_enabled) "
            "VALUES ('vault', '127.0.0.1', %s, false)",
            (secrets.encrypt(CANARY),),
        )
    conn.close()
    assert "start with --secret-key-file" in start_fails(["--db", db_dsn])
    wrong = start_fails(["--db", db_dsn, "--secret-key-file", str(stranger)])
    assert "the key does not decrypt the password of site vault" in wrong
    assert CANARY not in wrong

    bad = _run(
        "mqttsvc", "rotate-key", "--old", str(stranger), "--new", str(second), "--db", db_dsn
    )
    assert bad.returncode == 1 and "nothing was changed" in bad.stderr
    rotated = _run(
        "mqttsvc", "rotate-key", "--old", str(first), "--new", str(second), "--db", db_dsn
    )
    assert rotated.returncode == 0, rotated.stderr
    assert "re-encrypted 1 passwords" in rotated.stdout
    conn = psycopg2.connect(db_dsn)
    with conn, conn.cursor() as cur:
        cur.execute("SELECT password FROM mqtt_connection WHERE site_id = 'vault'")
        [(stored,)] = cur.fetchall()
    conn.close()
    assert load_key(str(second)).decrypt(stored) == CANARY
    assert "does not decrypt" in start_fails(["--db", db_dsn, "--secret-key-file", str(first)])


def test_canary_password_appears_nowhere(
    db_dsn: str, no_sites: None, tmp_path: Path, password_broker: PrivateBroker
) -> None:
    """
    A canary password is in no log line, RPC result, event, metric or
    database column of a running twistd mqttsvc; its API token is in no log
    line, however a request sent it.
    """
    import signal
    import urllib.error
    import urllib.request

    import psycopg2

    from tests.conftest import free_port
    from tests.test_twistd import TWISTD, clean_env, rpc, wait_for

    key = _key(tmp_path / "key")
    tokens = tmp_path / "tokens"
    tokens.write_text("ops ops-token-0123456789abcdef\n")
    tokens.chmod(0o600)
    port = free_port()
    log = tmp_path / "twistd.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [
                *TWISTD,
                "mqttsvc",
                "--db",
                db_dsn,
                "--rpc",
                f"tcp:{port}:interface=127.0.0.1",
                "--rpc-token-file",
                str(tokens),
                "--secret-key-file",
                str(key),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=clean_env(),
        )
    url = f"http://127.0.0.1:{port}/rpc"
    outputs = []

    def call(method: str, params: Any = None) -> Any:
        body: dict[str, Any] = {"jsonrpc": "2.0", "method": method, "id": 1}
        if params is not None:
            body["params"] = params
        request = urllib.request.Request(
            url,
            data=json.dumps(body).encode(),
            headers={
                "Content-Type": "application/json",
                "Authorization": "Bearer ops-token-0123456789abcdef",
            },
        )
        with urllib.request.urlopen(request, timeout=20) as response:
            text = response.read().decode()
        outputs.append(text)
        return json.loads(text)

    try:
        wait_for(lambda: rpc(url, "service.status", "ops-token-0123456789abcdef"), 30, "start")
        site = {"host": "127.0.0.1", "port": password_broker.port, "username": "reader"}
        call("site.create", {"site_id": "canary", **site, "password": CANARY})
        call("site.test", {**site, "password": CANARY})
        wait_for(
            lambda: call("site.status", ["canary"])["result"]["state"] == "error", 20, "auth error"
        )
        for method, params in [
            ("site.get", ["canary"]),
            ("site.list", None),
            ("event.list", {"site_id": "canary"}),
            ("service.status", None),
            ("rpc.discover", None),
        ]:
            call(method, params)
        metrics = urllib.request.Request(
            f"http://127.0.0.1:{port}/metrics",
            headers={"Authorization": "Bearer ops-token-0123456789abcdef"},
        )
        with urllib.request.urlopen(metrics, timeout=10) as response:
            outputs.append(response.read().decode())
        # The token, however sent, must not reach the log either (issue 13):
        # a percent-encoded query name authenticates (400: a bad filter),
        # a Referer carries it under a name of its own.
        token = "ops-token-0123456789abcdef"
        for target, referrer, status in [
            (f"/events?type=bogus&access%5Ftoken={token}", "-", 400),
            ("/healthz", f"https://front.example/?t={token}", 200),
        ]:
            request = urllib.request.Request(
                f"http://127.0.0.1:{port}{target}", headers={"Referer": referrer}
            )
            try:
                with urllib.request.urlopen(request, timeout=10) as response:
                    code = response.status
            except urllib.error.HTTPError as e:
                code = e.code
            assert code == status, target
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=15)
    conn = psycopg2.connect(db_dsn)
    with conn, conn.cursor() as cur:
        for table in ("mqtt_connection", "connection_event", "dead_letter", "event_log"):
            cur.execute(f"SELECT * FROM {table}")
            outputs.append(repr(cur.fetchall()))
    conn.close()
    outputs.append(log.read_text())
    assert "auth: broker refused the credentials" in "".join(outputs)
    for output in outputs:
        assert CANARY not in output
    assert "access%5Ftoken=<redacted>" in outputs[-1]
    assert "ops-token-0123456789abcdef" not in outputs[-1]
