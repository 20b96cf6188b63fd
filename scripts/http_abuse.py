"""
Issue 13's HTTP abuse, measured against a real C{twistd mqttsvc}: the
figures in docs/reliability.md ("Issue 13: HTTP abuse").

Creates a database of its own (dropped at the end) with 20,000 stored events
and 10,000 readings of one sensor, starts C{twistd -n mqttsvc} on it with a
token, and prints one JSON object of what each abuse cost the process.

    .venv/bin/python scripts/http_abuse.py
"""

from __future__ import annotations

import json
import os
import select
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg2

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.conftest import scratch_database
from tests.twistd_process import TwistdService


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    raise RuntimeError("no VmRSS")


def open_descriptors(pid: int) -> tuple[int, int]:
    """Open descriptors, and how many are deleted (spooled) files."""
    fds = list(Path(f"/proc/{pid}/fd").iterdir())
    deleted = sum(1 for fd in fds if "(deleted)" in os.readlink(fd))
    return len(fds), deleted


def seconds(action: Callable[[], Any]) -> tuple[Any, float]:
    start = time.monotonic()
    result = action()
    return result, round(time.monotonic() - start, 3)


def read_to_close(sock: socket.socket) -> bytes:
    chunks: list[bytes] = []
    while True:
        try:
            data = sock.recv(65536)
        except (ConnectionResetError, TimeoutError):
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def body_of(answer: bytes) -> bytes:
    """The body of a whole HTTP/1.1 response, de-chunked."""
    head, _, body = answer.partition(b"\r\n\r\n")
    if b"chunked" not in head.lower():
        return body
    chunks: list[bytes] = []
    while True:
        size_line, _, body = body.partition(b"\r\n")
        size = int(size_line, 16)
        if not size:
            return b"".join(chunks)
        chunks.append(body[:size])
        body = body[size + 2 :]


class Attacker:
    def __init__(self, service: TwistdService) -> None:
        self.service = service
        self.pid = service.process.pid  # type: ignore[union-attr]
        self.auth = b"Authorization: Bearer " + service.TOKEN.encode()

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.service.port), timeout=60)

    def exchange(self, data: bytes) -> bytes:
        with self.connect() as sock:
            sock.sendall(data)
            return read_to_close(sock)

    def rpc(self, body: bytes) -> bytes:
        head = (
            b"POST /rpc HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
            b"Content-Type: application/json\r\n%s\r\nContent-Length: %d\r\n\r\n"
            % (self.auth, len(body))
        )
        return self.exchange(head + body)

    def huge_declared_length(self) -> dict[str, Any]:
        head = b"POST /rpc HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000000000\r\n\r\n"
        answer, took = seconds(lambda: self.exchange(head))
        return {"status": answer.split(b"\r\n")[0].decode(), "refused_in_s": took}

    def unterminated_chunked(self) -> dict[str, Any]:
        chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
        sent = 0
        start = time.monotonic()
        with self.connect() as sock:
            sock.sendall(b"POST /rpc HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
            try:
                while sent < 200 * 1024 * 1024:
                    sock.sendall(chunk)
                    sent += 65536
            except (BrokenPipeError, ConnectionResetError):
                pass
        return {
            "client_sent_mib_before_cut": round(sent / 2**20, 1),
            "cut_after_s": round(time.monotonic() - start, 3),
        }

    def idle_sockets(self, count: int) -> dict[str, Any]:
        before, fds_before = rss_mb(self.pid), open_descriptors(self.pid)[0]
        socks = [self.connect() for _ in range(count)]
        time.sleep(1)  # the server answers the surplus at once
        refused = 0
        for sock in socks:
            ready, _, _ = select.select([sock], [], [], 0)
            if ready and sock.recv(200).startswith(b"HTTP/1.1 503"):
                refused += 1
        during = rss_mb(self.pid)
        fds_during = open_descriptors(self.pid)[0]
        api = self.exchange(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        start = time.monotonic()
        open_ones = [s for s in socks if not select.select([s], [], [], 0)[0]]
        for sock in open_ones:
            sock.settimeout(60)
            read_to_close(sock)
        closed_after = round(time.monotonic() - start, 1)
        for sock in socks:
            sock.close()
        time.sleep(0.5)
        return {
            "sockets": count,
            "refused_503": refused,
            "held_open": len(open_ones),
            "rss_mb_before_during": [before, during],
            "descriptors_before_during": [fds_before, fds_during],
            "new_api_call_meanwhile": api.split(b"\r\n")[0].decode(),
            "idle_closed_within_s": closed_after,
            "api_after": self.exchange(
                b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            )
            .split(b"\r\n")[0]
            .decode(),
        }

    def resuming_streams(self, count: int) -> dict[str, Any]:
        before = rss_mb(self.pid)
        request = b"GET /events HTTP/1.1\r\nHost: x\r\n%s\r\nLast-Event-ID: 0\r\n\r\n" % self.auth
        socks = []
        for _ in range(count):
            sock = self.connect()
            # A client that does not read: the smallest receive buffer.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(request)
            socks.append(sock)
        time.sleep(5)
        statuses: dict[str, int] = {}
        for sock in socks:
            head = sock.recv(12).decode(errors="replace")
            statuses[head[9:12]] = statuses.get(head[9:12], 0) + 1
        after = rss_mb(self.pid)
        # Proof that they were being replayed to: what one of them gets.
        sock = socks[0]
        sock.settimeout(2)
        received = b""
        try:
            while len(received) < 2**20:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        except TimeoutError:
            pass
        for sock in socks:
            sock.close()
        # And a client that reads, once they are gone: everything, in order.
        start = time.monotonic()
        with self.connect() as sock:
            sock.sendall(request)
            received = b""
            while received.count(b"\ndata: ") < 20000:
                data = sock.recv(65536)
                if not data:
                    break
                received += data
        ids = [int(line[4:]) for line in received.split(b"\n") if line.startswith(b"id: ")]
        return {
            "reader_got_every_event_in_order": ids == list(range(1, 20001)),
            "reader_seconds": round(time.monotonic() - start, 2),
            "streams": count,
            "statuses": statuses,
            "rss_mb_before_after": [before, after],
            "events_one_got_in_2_s_of_reading": received.count(b"\ndata: "),
        }

    def big_batches(self) -> dict[str, Any]:
        call = {
            "jsonrpc": "2.0",
            "method": "reading.list",
            # The largest page (before pages, 10,000 readings a call).
            "params": {"site_id": "abuse", "sensor_id": "sn-1", "limit": 1000},
        }
        refused, took = seconds(
            lambda: self.rpc(json.dumps([{**call, "id": i} for i in range(300)]).encode())
        )
        before = rss_mb(self.pid)
        answer, took_100 = seconds(
            lambda: self.rpc(json.dumps([{**call, "id": i} for i in range(100)]).encode())
        )
        body = body_of(answer)
        return {
            "batch_300": json.loads(body_of(refused))["error"]["message"],
            "batch_300_s": took,
            "batch_100_answer_bytes": len(body),
            "batch_100_s": took_100,
            "batch_100_results_and_errors": [
                body.count(b'"result"'),
                body.count(b'"code":-32004'),
            ],
            "rss_mb_before_after": [before, rss_mb(self.pid)],
        }

    def nesting_bomb(self) -> dict[str, Any]:
        answer, took = seconds(lambda: self.rpc(b"[" * 1_000_000))
        return {"answer": body_of(answer)[:100].decode(), "seconds": took}


def seed(dsn: str) -> None:
    conn = psycopg2.connect(dsn)
    with conn, conn.cursor() as cur:
        cur.execute(
            "INSERT INTO event_log (type, site_id, at, data) "
            "SELECT 'connection', 'abuse', now(), jsonb_build_object('from', 'connecting', "
            "'to', 'connected', 'reason', repeat('r', 100), 'n', i) "
            "FROM generate_series(1, 20000) i"
        )
        cur.execute(
            "INSERT INTO sensor_reading (site_id, sensor_id, ts, name, value, unit) "
            "SELECT 'abuse', 'sn-1', now() - i * interval '1 second', 'temperature', i, 'C' "
            "FROM generate_series(1, 10000) i"
        )
    conn.close()


def main() -> None:
    figures: dict[str, Any] = {}
    with scratch_database("mqttsvc_h13") as dsn, tempfile.TemporaryDirectory() as directory:
        seed(dsn)
        service = TwistdService(dsn, Path(directory))
        service.start()
        try:
            attacker = Attacker(service)
            figures["rss_mb_at_start"] = rss_mb(attacker.pid)
            figures["content_length_10e12"] = attacker.huge_declared_length()
            figures["unterminated_chunked"] = attacker.unterminated_chunked()
            figures["spooled_files_open"] = open_descriptors(attacker.pid)[1]
            figures["nesting_bomb"] = attacker.nesting_bomb()
            figures["batches"] = attacker.big_batches()
            figures["idle_sockets"] = attacker.idle_sockets(1000)
            figures["resuming_streams"] = attacker.resuming_streams(300)
            figures["rss_mb_at_end"] = rss_mb(attacker.pid)
        finally:
            service.stop()
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
