"""
What the reliability scenarios share: a real publisher that counts what
the broker acknowledged, a TCP proxy in front of PostgreSQL that a test can
cut, a C{twistd mqttsvc} process, the counting of what landed, and, for
several C{--cluster} instances, who owns and runs which site.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import threading
import time
import urllib.request
import uuid
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import paho.mqtt.client as paho
import psycopg2
from paho.mqtt.client import MQTTMessageInfo
from paho.mqtt.enums import CallbackAPIVersion
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import free_port
from tests.twistd_process import BIN, clean_env, rpc_call, wait_until

#: Readings carry ts = BASE + i milliseconds: unique per message, so the
#: table's unique key makes duplicates visible as a shortfall, never as
#: extra rows, and a count of distinct ts is a count of distinct messages.
BASE = 1_770_000_000.0


class LoadPublisher:
    """
    Publishes C{count} sensor readings at C{rate} per second, QoS 1, on a
    persistent session that survives broker restarts, in a thread; message
    C{i} goes to C{site_id}, or, given several sites, to the C{i}-th of
    them in turn.  C{acked} counts the broker's PUBACKs.  A test whose load
    only has to last as long as its injections calls L{finish} once they
    are over: C{count} is then what was published.
    """

    def __init__(self, port: int, site_id: str | Sequence[str], count: int, rate: float) -> None:
        self.port = port
        self.sites = [site_id] if isinstance(site_id, str) else list(site_id)
        self.count = count
        self.rate = rate
        self.acked = 0
        self.published = 0
        self._lock = threading.Lock()
        #: Messages published and not yet counted by L{acked_prefix}, in order.
        self._unconfirmed: deque[MQTTMessageInfo] = deque()
        self._confirmed = 0
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._finishing = False
        self._abandoned = False
        self.error: BaseException | None = None

    def payload(self, i: int) -> tuple[str, bytes]:
        """The topic and payload of message C{i}: one reading, ts BASE + i ms."""
        site_id = self.sites[i % len(self.sites)]
        return (
            f"{site_id}/sensor/s{i // len(self.sites) % 10}/data",
            json.dumps({"ts": BASE + i / 1000.0, "value": i}).encode(),
        )

    def acked_prefix(self) -> int:
        """
        How many messages, from the first, the broker has all acknowledged:
        messages C{0 .. n - 1} are each acknowledged (a test can count what
        was committed of them while the load goes on).  For a load whose
        broker stays up: paho's C{is_published} raises for a message
        published while its client was disconnected.
        """
        with self._lock:
            while self._unconfirmed and self._unconfirmed[0].is_published():
                self._unconfirmed.popleft()
                self._confirmed += 1
            return self._confirmed

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

    def abandon(self) -> None:
        """
        Publish nothing more, and do not wait for what is unacknowledged
        (a test that failed, whose brokers are going away).
        """
        self._finishing = True
        self._abandoned = True

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
            # Published before the connection, a message's info keeps the
            # "not connected" code even once it is sent and acknowledged,
            # and paho's is_published() raises for it (L{acked_prefix}).
            wait_until(client.is_connected, within=10, what="the publisher connected")
            started = time.monotonic()
            for i in range(self.count):
                if self._finishing:
                    break
                topic, body = self.payload(i)
                info = client.publish(topic, body, qos=1)
                with self._lock:
                    self._unconfirmed.append(info)
                self.published = i + 1
                lag = started + (i + 1) / self.rate - time.monotonic()
                if lag > 0:
                    time.sleep(lag)
            self.count = self.published
            wait_until(
                lambda: self._abandoned or self.acked >= self.count,
                within=120,
                what="every PUBACK",
            )
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


def committed_prefix(dsn: str, publisher: LoadPublisher, count: int) -> tuple[int, int]:
    """
    (rows, distinct messages) of a publisher's first C{count} messages
    that are committed (their ts are below BASE + C{count} ms, each site's
    unique).
    """
    [(rows, distinct)] = sql(
        dsn,
        "SELECT count(*), count(DISTINCT (site_id, ts)) FROM sensor_reading "
        "WHERE site_id = ANY (%s) AND ts < to_timestamp(%s)",
        publisher.sites,
        BASE + (count - 0.5) / 1000.0,
    )
    return int(rows), int(distinct)


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
        self.launch()
        self.wait_up()

    def launch(self) -> None:
        """Start it (again), without waiting (L{wait_up} waits)."""
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

    def wait_up(self) -> None:
        """Wait until the process launched last answers JSON-RPC."""

        def up() -> bool:
            assert self.process is not None and self.process.poll() is None, self.log()
            try:
                return bool(self.call("service.status"))
            except OSError:
                return False

        wait_until(up, within=30, what=f"mqttsvc {self.instance} answering")

    def add_site(self, site_id: str, broker_port: int) -> None:
        """
        Create a site on a local broker and wait until it has subscribed.
        """
        self.call("site.create", {"site_id": site_id, "host": "127.0.0.1", "port": broker_port})
        wait_until(lambda: self.call("site.status", [site_id])["subscriptions"], what="subscribed")

    def call(self, method: str, params: Any = None) -> Any:
        """Call a JSON-RPC method with the token; its result (an error fails the test)."""
        return rpc_call(self.url, self.TOKEN, method, params)

    def call_many(self, calls: Sequence[tuple[str, Any]]) -> list[Any]:
        """
        Call several JSON-RPC methods in batches of at most 100 (the
        dispatcher's limit); their results, in order (an error fails the
        test).
        """
        results: list[Any] = []
        for first in range(0, len(calls), 100):
            body = [
                {"jsonrpc": "2.0", "method": method, "params": params, "id": n}
                for n, (method, params) in enumerate(calls[first : first + 100])
            ]
            request = urllib.request.Request(
                self.url,
                data=json.dumps(body).encode(),
                headers={
                    "Content-Type": "application/json",
                    "Authorization": f"Bearer {self.TOKEN}",
                },
            )
            with urllib.request.urlopen(request, timeout=30) as response:
                answers = sorted(json.loads(response.read()), key=lambda a: a["id"])
            for answer in answers:
                assert "error" not in answer, answer
                results.append(answer["result"])
        return results

    def metrics(self) -> str:
        """The text of C{/metrics}."""
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

    def signal(self, number: signal.Signals) -> None:
        """Send a signal (C{SIGSTOP} freezes it, C{SIGCONT} resumes it)."""
        assert self.process is not None and self.process.poll() is None
        self.process.send_signal(number)

    def stop(self) -> None:
        """SIGTERM, if it still runs (resumed first, if it was frozen)."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGCONT)
            self.terminate()


# Several C{--cluster} instances on one database.


def owners(dsn: str) -> dict[str, str]:
    """Site -> owner of every lease held now (by the database's clock)."""
    return {site_id: owner for site_id, (owner, _) in leases(dsn).items()}


def leases(dsn: str) -> dict[str, tuple[str, int]]:
    """
    Site -> (owner, epoch) of every lease held now by a live instance (by
    the database's clock).
    """
    rows = sql(
        dsn,
        "SELECT l.site_id, l.owner, l.epoch FROM site_lease l JOIN mqttsvc_instance i "
        "ON i.instance = l.owner WHERE l.expires_at > now() AND i.expires_at > now() "
        "AND NOT i.stopping",
    )
    return {site_id: (owner, epoch) for site_id, owner, epoch in rows}


def samples(service: Service) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of the service's C{/metrics}, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(service.metrics())
        for s in family.samples
    }


def running(service: Service) -> dict[str, str]:
    """
    Site -> state of every site the process runs (its supervisor's, as
    its C{mqttsvc_site_state} says; a site it does not run shows there as
    stopped).
    """
    return {
        dict(labels)["site_id"]: dict(labels)["state"]
        for (name, labels), value in samples(service).items()
        if name == "mqttsvc_site_state" and value == 1 and dict(labels)["state"] != "stopped"
    }


def connected(service: Service, sites: list[str]) -> bool:
    """Whether every one of C{sites} runs, connected, in C{service}."""
    states = running(service)
    return all(states.get(s) == "connected" for s in sites)


def settled(
    dsn: str, sites: list[str], services: Mapping[str, Service], within: float = 15
) -> dict[str, list[str]]:
    """
    Wait until every site is owned by one of C{services}, their counts
    differ by one at most (the assignment's balance: no hand-over left to
    do), and each runs exactly its own sites, connected (so no site runs
    twice), with no lease moving meanwhile; the sites of each.
    """

    problem = ["nothing checked yet"]

    def check() -> dict[str, list[str]] | None:
        held = owners(dsn)
        if set(held) != set(sites) or set(held.values()) != set(services):
            problem[0] = (
                f"{len(set(sites) - set(held))} sites not owned; owners "
                f"{sorted(set(held.values()))}, instances {sorted(services)}"
            )
            return None
        mine = {name: sorted(s for s, o in held.items() if o == name) for name in services}
        counts = {name: len(owned) for name, owned in mine.items()}
        if max(counts.values()) - min(counts.values()) > 1:
            problem[0] = f"sites still being handed over: {counts}"
            return None
        for name, service in services.items():
            states = running(service)
            if sorted(states) != mine[name] or set(states.values()) != {"connected"}:
                others = {s: st for s, st in states.items() if s not in mine[name]}
                down = {s: states.get(s) for s in mine[name] if states.get(s) != "connected"}
                problem[0] = (
                    f"{name} runs {len(states)} sites and owns {len(mine[name])}; "
                    f"its own not connected: {dict(list(down.items())[:10])}; "
                    f"running but not its own: {dict(list(others.items())[:10])}"
                )
                return None
        return mine if owners(dsn) == held else None

    try:
        return wait_until(
            check, within=within, interval=0.1, what="every site owned once and connected"
        )
    except AssertionError as e:
        raise AssertionError(f"{e}: {problem[0]}") from None


def publish(port: int, sites: list[str], first: int, count: int) -> None:
    """
    Publish readings C{first} .. C{first + count - 1} to every site, QoS 1
    (ts BASE + n ms), and wait for every PUBACK.
    """
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = []
        for n in range(first, first + count):
            for site_id in sites:
                body = json.dumps({"ts": BASE + n / 1000.0, "value": n})
                infos.append(client.publish(f"{site_id}/sensor/s{n % 5}/data", body, qos=1))
        for info in infos:
            info.wait_for_publish(20)
    finally:
        client.disconnect()
        client.loop_stop()
