"""
A graceful restart (SIGTERM, then start) of a real C{twistd mqttsvc} keeps
each site's schedule: a site in error stays in error, a waiting site keeps
waiting, with C{mqtt_retry_count} and C{mqtt_next_retry} as the database
had them, and no alert is sent twice (issue 15, item 1).
"""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PrivateBroker, free_port
from tests.reliability.harness import Service, sql
from tests.twistd_process import wait_until


class Receiver:
    """A webhook receiver on a thread of its own: keeps every alert body."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers["Content-Length"])
                received.append(json.loads(self.rfile.read(length)))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def alerts(self, kind: str, site_id: str) -> list[dict[str, Any]]:
        return [a for a in self.received if a["alert"] == kind and a["site_id"] == site_id]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    hook = Receiver()
    yield hook
    hook.close()


def schedule(dsn: str, site_id: str) -> tuple[Any, ...]:
    [row] = sql(
        dsn,
        "SELECT status, mqtt_retry_count, mqtt_next_retry, last_error FROM mqtt_connection "
        "WHERE site_id = %s",
        site_id,
    )
    return tuple(row)


def test_sigterm_and_start_keep_error_and_waiting_sites_schedule(
    db_dsn: str, password_broker: PrivateBroker, receiver: Receiver, tmp_path: Path
) -> None:
    """
    A site refused by its broker gives up (one site_gave_up alert); another,
    whose broker is not there, waits, and the backend moves its next retry
    an hour ahead.  After SIGTERM both rows are exactly as before it; after
    the next start the first is still in error and the second still waiting,
    with the same counts and times, and the first is not announced again.
    """
    tag = uuid.uuid4().hex[:8]
    refused, waiting, later = f"refused-{tag}", f"waiting-{tag}", f"later-{tag}"
    service = Service(db_dsn, tmp_path, f"graceful-{tag}", "--alert-webhook", receiver.url)
    service.start()
    try:
        service.call(
            "site.create",
            {
                "site_id": refused,
                "host": "127.0.0.1",
                "port": password_broker.port,
                "username": "intruder",
            },
        )
        service.call("site.create", {"site_id": waiting, "host": "127.0.0.1", "port": free_port()})
        wait_until(lambda: service.call("site.status", [refused])["state"] == "error", what="error")
        wait_until(
            lambda: service.call("site.status", [waiting])["state"] == "waiting", what="waiting"
        )
        wait_until(lambda: receiver.alerts("site_gave_up", refused), what="the site_gave_up alert")
        # The backend's own schedule: the database is the truth across restarts.
        an_hour = datetime.now(UTC) + timedelta(hours=1)
        sql(
            db_dsn,
            "UPDATE mqtt_connection SET mqtt_next_retry = %s WHERE site_id = %s RETURNING id",
            an_hour,
            waiting,
        )
        before = {site: schedule(db_dsn, site) for site in (refused, waiting)}
        assert before[refused][:2] == ("error", 1), before
        assert before[waiting][0] == "disconnected" and before[waiting][1] >= 1, before

        service.terminate()
        assert {site: schedule(db_dsn, site) for site in (refused, waiting)} == before

        service.start()

        def resumed(site_id: str) -> Any:
            # The service answers before its first reconciliation has
            # started every site (on a busy machine, visibly so).
            status = service.call("site.status", [site_id])
            return status if status["state"] != "stopped" else None

        error = wait_until(lambda: resumed(refused), what="the site in error resumed")
        assert (error["state"], error["mqtt_retry_count"]) == ("error", before[refused][1])
        assert datetime.fromisoformat(error["mqtt_next_retry"]) == before[refused][2]
        still = wait_until(lambda: resumed(waiting), what="the waiting site resumed")
        assert (still["state"], still["mqtt_retry_count"]) == ("waiting", before[waiting][1])
        assert datetime.fromisoformat(still["mqtt_next_retry"]) == an_hour
        # Alerts are decided in event order: once a later site's alert is
        # logged, the resumed site would have had its own by then.
        service.call(
            "site.create",
            {"site_id": later, "host": "127.0.0.1", "port": password_broker.port},
        )
        wait_until(lambda: f"alert for site {later}" in service.log(), what="a later alert")
        assert f"alert for site {refused}" not in service.log()
        wait_until(lambda: receiver.alerts("site_gave_up", later), what="the later alert arriving")
        assert len(receiver.alerts("site_gave_up", refused)) == 1
        assert {site: schedule(db_dsn, site) for site in (refused, waiting)} == before
    finally:
        service.stop()
