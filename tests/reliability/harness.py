"""
What the reliability scenarios share: a real publisher that counts what
the broker acknowledged, a TCP proxy in front of PostgreSQL that a test can
cut, a C{twistd mqttsvc} process, and the counting of what landed.
"""

from __future__ import annotations

import json
import select
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg2
from paho.mqtt.enums import CallbackAPIVersion

from tests.conftest import free_port
from tests.twistd_process import BIN, clean_env, rpc_call, wait_until

#: Readings carry ts = BASE + i milliseconds: unique per message, so the
#: table's unique key makes duplicates visible as a shortfall, never as
#: extra rows, and a count of distinct ts is a count of distinct messages.
BASE = 1_770_000_000.0


class LoadPublisher:
    """
    Publishes C{count} sensor readings for a site at C{rate} per second,
    QoS 1, on a persistent session that survives broker restarts, in a
    thread; C{acked} counts the broker's PUBACKs.  A test whose load only
    has to last as long as its injections calls L{finish} once they are
    over: C{count} is then what was published.
    """

    def __init__(self, port: int, site_id: str, count: int, rate: float) -> None:
        self.port = port
        self.site_id = site_id
        self.count = count
        self.rate = rate
        self.acked = 0
        self.published = 0
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._finishing = False
        self.error: BaseException | None = None

    def payload(self, i: int) -> tuple[str, bytes]:
        """The topic and payload of message C{i}: one reading, ts BASE + i ms."""
        return (
            f"{self.site_id}/sensor/s{i % 10}/data",
            json.dumps({"ts": BASE + i / 1000.0, "value": i}).encode(),
        )

    def start(self) -> None:
        """Start publishing, in a thread of its own."""
        self._thread.start()

    def finish(self) -> None:
        """
        Publish nothing more: what was published so far becomes the whole
        load (C{count}), whose PUBACKs L{wait} still waits for.

        @raise AssertionError: if the load had run out already, so that
            the test's injections did not all happen under load.
        """
        assert self.published < self.count, "the load ran out before the injections were over"
        self._finishing = True

    def _on_publish(self, *args: Any) -> None:
        with self._lock:
            self.acked += 1

    def _run(self) -> None:
        try:
            client = paho.Client(
                CallbackAPIVersion.VERSION2,
                client_id=f"load-{uuid.uuid4().hex[:8]}",
                clean_session=False,
            )
            client.max_queued_messages_set(0)
            client.max_inflight_messages_set(200)
            client.reconnect_delay_set(0.1, 0.5)
            client.on_publish = self._on_publish
            client.connect_async("127.0.0.1", self.port)
            client.loop_start()
            started = time.monotonic()
            for i in range(self.count):
                if self._finishing:
                    break
                topic, body = self.payload(i)
                client.publish(topic, body, qos=1)
                self.published = i + 1
                lag = started + (i + 1) / self.rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            self.count = self.published
            wait_until(lambda: self.acked >= self.count, within=120, what="every PUBACK")
            client.disconnect()
            client.loop_stop()
        except BaseException as e:  # reported by wait()
            self.error = e

    def wait(self, within: float = 180) -> None:
        self._thread.join(within)
        assert not self._thread.is_alive(), "the publisher did not finish"
        if self.error is not None:
            raise self.error


def readings(dsn: str, site_id: str) -> tuple[int, int]:
    """
    (rows, distinct message timestamps) of a site's readings.
    """
    conn = psycopg2.connect(dsn)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT count(*), count(DISTINCT ts) FROM sensor_reading WHERE site_id = %s",
                (site_id,),
            )
            rows, distinct = cur.fetchone()
            return int(rows), int(distinct)
    finally:
        conn.close()


def all_committed(dsn: str, site_id: str, count: int, within: float) -> tuple[int, int]:
    """
    Wait until C{count} of a site's readings are committed, and return
    L{readings} then: a test asserts C{(count, count)}, every message once.
    """
    return wait_until(
        lambda: (r := readings(dsn, site_id))[0] >= count and r,
        within=within,
        what=f"all {count} readings",
    )


def sql(dsn: str, text: str, *params: Any) -> list[tuple[Any, ...]]:
    """
    Run one statement on a connection of its own (autocommit); its rows.
    """
    conn = psycopg2.connect(dsn)
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(text, params)
            return list(cur.fetchall()) if cur.description else []
    finally:
        conn.close()


class CuttableProxy:
    """
    A TCP proxy (threads) from a free port to C{target}; C{cut()} drops
    every connection and refuses new ones until C{restore()}; C{freeze()}
    keeps every connection open but forwards nothing (a database that
    holds every query forever).
    """

    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.port = free_port()
        self._listener = socket.create_server(("127.0.0.1", self.port))
        self._open: set[socket.socket] = set()
        self._lock = threading.Lock()
        self.cut_off = False
        self.frozen = False
        self._running = True
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while self._running:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            if self.cut_off:
                conn.close()
                continue
            try:
                upstream = socket.create_connection(self.target)
            except OSError:
                conn.close()
                continue
            with self._lock:
                self._open.update((conn, upstream))
            threading.Thread(target=self._pump, args=(conn, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        try:
            while True:
                ready, _, _ = select.select([a, b], [], [], 0.5)
                if self.cut_off:
                    break
                if self.frozen:
                    time.sleep(0.1)
                    continue
                for s in ready:
                    data = s.recv(65536)
                    if not data:
                        raise OSError("closed")
                    (b if s is a else a).sendall(data)
        except OSError:
            pass
        finally:
            with self._lock:
                self._open.discard(a)
                self._open.discard(b)
            for s in (a, b):
                try:
                    s.close()
                except OSError:
                    pass

    def cut(self) -> None:
        """Drop every connection and refuse new ones until L{restore}."""
        self.cut_off = True
        with self._lock:
            doomed = list(self._open)
        for s in doomed:
            try:
                s.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def freeze(self) -> None:
        """Keep every connection open but forward nothing until L{restore}."""
        self.frozen = True

    def restore(self) -> None:
        """Forward again, and accept new connections."""
        self.cut_off = False
        self.frozen = False

    def close(self) -> None:
        """Stop listening and drop every connection."""
        self._running = False
        self.cut()
        self._listener.close()


def proxied_database(dsn: str) -> tuple[CuttableProxy, str]:
    """
    A L{CuttableProxy} in front of the database of C{dsn}, and the DSN that
    reaches the database through it.
    """
    import psycopg2.extensions

    port = int(psycopg2.extensions.parse_dsn(dsn).get("port", 5432))
    proxy = CuttableProxy(port)
    return proxy, psycopg2.extensions.make_dsn(dsn, host="127.0.0.1", port=proxy.port)


def load_a_third(
    service: Service, dsn: str, broker_port: int, site_id: str, count: int, rate: float
) -> LoadPublisher:
    """
    Add C{site_id} to C{service}, start publishing C{count} readings to it
    at C{rate}, and return once a third of them are committed.
    """
    service.add_site(site_id, broker_port)
    publisher = LoadPublisher(broker_port, site_id, count, rate)
    publisher.start()
    wait_until(
        lambda: readings(dsn, site_id)[0] > count // 3,
        within=30,
        what="a third of the load committed",
    )
    return publisher


class Service:
    """
    C{twistd -n mqttsvc} with a token and a secret key, started and stopped
    (gracefully or not) by the test.
    """

    TOKEN = "reliability-token-0123456789"

    def __init__(self, dsn: str, directory: Path, instance: str, *extra_args: str) -> None:
        self.extra_args = extra_args
        self.dsn = dsn
        self.directory = directory
        self.instance = instance
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}/rpc"
        tokens = directory / "tokens"
        tokens.write_text(f"ops {self.TOKEN}\n")
        tokens.chmod(0o600)
        self.tokens = tokens
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def log(self) -> str:
        """What the latest run has logged so far."""
        return (self.directory / f"twistd-{self.starts}.log").read_text(errors="replace")

    def start(self) -> None:
        """Start it (again) and wait until it answers JSON-RPC."""
        self.starts += 1
        log = self.directory / f"twistd-{self.starts}.log"
        with log.open("wb") as out:
            self.process = subprocess.Popen(
                [
                    *(str(BIN / "twistd"), "-n", "--pidfile=", "mqttsvc"),
                    *("--db", self.dsn, "--rpc", f"tcp:{self.port}:interface=127.0.0.1"),
                    *("--rpc-token-file", str(self.tokens), "--instance", self.instance),
                    *self.extra_args,
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=clean_env(),
            )

        def up() -> bool:
            assert self.process is not None and self.process.poll() is None, log.read_text()
            try:
                return bool(self.call("service.status"))
            except OSError:
                return False

        wait_until(up, within=30, what="mqttsvc answering")

    def add_site(self, site_id: str, broker_port: int) -> None:
        """
        Create a site on a local broker and wait until it has subscribed.
        """
        self.call("site.create", {"site_id": site_id, "host": "127.0.0.1", "port": broker_port})
        wait_until(lambda: self.call("site.status", [site_id])["subscriptions"], what="subscribed")

    def call(self, method: str, params: Any = None) -> Any:
        """Call a JSON-RPC method with the token; its result (an error fails the test)."""
        return rpc_call(self.url, self.TOKEN, method, params)

    def metrics(self) -> str:
        """The text of C{/metrics}."""
        import urllib.request

        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}/metrics",
            headers={"Authorization": f"Bearer {self.TOKEN}"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            return str(response.read().decode())

    def rss_mb(self) -> float:
        """The process's resident memory, in MB."""
        assert self.process is not None
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def terminate(self) -> float:
        """
        SIGTERM; return how long the process took to exit.
        """
        assert self.process is not None
        started = time.monotonic()
        self.process.terminate()
        self.process.wait(timeout=30)
        return time.monotonic() - started

    def kill(self) -> None:
        """SIGKILL, as a crash; wait for the process to be gone."""
        assert self.process is not None
        self.process.kill()
        self.process.wait(timeout=30)

    def stop(self) -> None:
        """SIGTERM, if it still runs."""
        if self.process is not None and self.process.poll() is None:
            self.terminate()
