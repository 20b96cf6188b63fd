"""
The site state machine on a fake clock: backoff schedule, giving up,
restart and stop semantics, and no timers left behind.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from mqttsvc.config import SiteConfig, default_topics
from mqttsvc.site import MAX_RETRIES, SiteService, SiteState, retry_delay
from mqttsvc.transport import ConnectFailed, ReceivedMessage


class FakeClient:
    """
    Stands in for L{MQTTClient}: each connect() returns a Deferred the test
    fires.
    """

    def __init__(self, reactor: Any, config: SiteConfig, on_message: Any, on_lost: Any) -> None:
        self.on_message = on_message
        self.on_lost = on_lost
        self.attempts: list[Deferred[bool]] = []
        self.subscriptions: list[list[tuple[str, int]]] = []
        self.disconnects: list[Deferred[None]] = []
        self.acked: list[int] = []
        self.aborted = 0

    def connect(self) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.attempts.append(d)
        return d

    def subscribe(self, topics: list[tuple[str, int]]) -> None:
        self.subscriptions.append(topics)

    def disconnect(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.disconnects.append(d)
        return d

    def abort(self) -> None:
        self.aborted += 1
        if self.disconnects and not self.disconnects[-1].called:
            self.disconnects[-1].callback(None)

    def ack(self, message: ReceivedMessage) -> bool:
        self.acked.append(message.mid)
        return True


class FakeWriter:
    def __init__(self) -> None:
        self.submitted: list[tuple[list[Any], Deferred[None]]] = []

    def submit(self, effects: list[Any]) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.submitted.append((effects, d))
        return d


def make_site(clock: Clock) -> tuple[SiteService, FakeClient, list[SiteState], FakeWriter]:
    config = SiteConfig(site_id="north", host="127.0.0.1", topics=default_topics("north"))
    reports: list[SiteState] = []
    clients: list[FakeClient] = []
    writer = FakeWriter()

    def factory(*args: Any) -> FakeClient:
        clients.append(FakeClient(*args))
        return clients[-1]

    site = SiteService(
        clock, config, writer, reports.append, jitter=lambda: 0.0, client_factory=factory
    )
    return site, clients[0], reports, writer


def refused() -> ConnectFailed:
    return ConnectFailed("refused", "connection refused")


def test_backoff_schedule_matches_the_old_service() -> None:
    """min(5 s * 2^n, 300 s), then error after the tenth consecutive failure."""
    assert [retry_delay(n) for n in range(9)] == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    assert retry_delay(0, 1.0) == pytest.approx(6.0)
    assert retry_delay(0, -1.0) == pytest.approx(4.0)
    assert retry_delay(50, 5.0) == pytest.approx(360.0)


def test_retries_then_gives_up() -> None:
    """Each failure waits the scheduled delay; the tenth puts the site in error."""
    clock = Clock()
    site, client, reports, _ = make_site(clock)
    site.startService()
    waits = []
    for n in range(MAX_RETRIES - 1):
        client.attempts[-1].errback(refused())
        assert site.state.state == "waiting"
        assert site.state.retry_count == n + 1
        assert site.state.last_error == "refused: connection refused"
        (call,) = clock.getDelayedCalls()
        waits.append(call.getTime() - clock.seconds())
        assert site.state.next_retry == datetime.fromtimestamp(call.getTime(), UTC)
        clock.advance(waits[-1])
        assert site.state.state == "connecting"
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    client.attempts[-1].errback(refused())
    assert site.state.state == "error"
    assert site.state.status == "error"
    assert site.state.retry_count == MAX_RETRIES
    assert site.state.next_retry is None
    assert clock.getDelayedCalls() == []
    assert len(client.attempts) == MAX_RETRIES
    assert [r.status for r in reports][:3] == ["disconnected", "connecting", "disconnected"]


def test_connect_subscribes_and_resets() -> None:
    """A successful connect subscribes every topic with its QoS and clears the error."""
    clock = Clock()
    site, client, _, _ = make_site(clock)
    site.startService()
    client.attempts[-1].errback(refused())
    clock.advance(5)
    clock.advance(1)
    client.attempts[-1].callback(False)
    assert site.state.state == "connected"
    assert site.state.retry_count == 0
    assert site.state.last_error is None
    assert site.state.last_connected_at == datetime.fromtimestamp(6, UTC)
    assert client.subscriptions == [
        [
            ("north/gateway/+/heartbeat", 1),
            ("north/datalogger/+/+/heartbeat", 1),
            ("north/sensor/+/data", 1),
        ]
    ]


def test_lost_connection_waits_and_resubscribes() -> None:
    """After a lost connection the site retries and subscribes again."""
    clock = Clock()
    site, client, _, _ = make_site(clock)
    site.startService()
    client.attempts[-1].callback(True)
    client.on_lost(ConnectFailed("network", "connection lost"))
    assert site.state.state == "waiting"
    assert site.state.last_error == "network: connection lost"
    clock.advance(5)
    client.attempts[-1].callback(True)
    assert site.state.state == "connected"
    assert len(client.subscriptions) == 2


def test_restart_resets_and_connects_now() -> None:
    """Restart from waiting or error ignores the pending retry and reconnects at once."""
    clock = Clock()
    site, client, _, _ = make_site(clock)
    site.startService()
    client.attempts[-1].errback(refused())
    assert clock.getDelayedCalls() != []
    site.restart()
    assert site.state.state == "connecting"
    assert site.state.retry_count == 0
    assert clock.getDelayedCalls() == []
    assert len(client.attempts) == 2
    for _ in range(MAX_RETRIES):
        client.attempts[-1].errback(refused())
        if site.state.state == "waiting":
            clock.advance(300)
    assert site.state.state == "error"
    site.restart()
    assert site.state.state == "connecting"
    assert site.state.retry_count == 0


def test_restart_while_connected_disconnects_first() -> None:
    """Restarting a connected site sends DISCONNECT, then connects again."""
    clock = Clock()
    site, client, _, _ = make_site(clock)
    site.startService()
    client.attempts[-1].callback(True)
    site.restart()
    assert site.state.state == "restarting"
    assert len(client.disconnects) == 1
    client.disconnects[-1].callback(None)
    assert site.state.state == "connecting"
    assert len(client.attempts) == 2
    assert clock.getDelayedCalls() == []


def test_stop_while_waiting_cancels_the_retry() -> None:
    """Stop leaves no timer behind and reports disconnected."""
    clock = Clock()
    site, client, reports, _ = make_site(clock)
    site.startService()
    client.attempts[-1].errback(refused())
    stopped = site.stopService()
    assert stopped.called
    assert site.state.state == "stopped"
    assert site.state.next_retry is None
    assert reports[-1].status == "disconnected"
    assert clock.getDelayedCalls() == []


def test_stop_while_connected_waits_for_disconnect() -> None:
    """Stop fires only once the clean DISCONNECT has closed the connection."""
    clock = Clock()
    site, client, _, _ = make_site(clock)
    site.startService()
    client.attempts[-1].callback(True)
    stopped = site.stopService()
    assert not stopped.called
    assert site.state.state == "stopping"
    client.disconnects[-1].callback(None)
    assert stopped.called
    assert site.state.state == "stopped"
    assert clock.getDelayedCalls() == []


def test_stop_aborts_a_broker_that_does_not_answer() -> None:
    """A DISCONNECT that never completes is cut off after the timeout."""
    clock = Clock()
    site, client, _, _ = make_site(clock)
    site.startService()
    client.attempts[-1].callback(True)
    stopped = site.stopService()
    clock.advance(5)
    assert client.aborted == 1
    assert stopped.called
    assert clock.getDelayedCalls() == []


def test_stop_while_connecting_ignores_the_late_result() -> None:
    """An attempt that completes after stop does not revive the site."""
    clock = Clock()
    site, client, _, _ = make_site(clock)
    site.startService()
    attempt = client.attempts[-1]
    stopped = site.stopService()
    client.disconnects[-1].callback(None)
    assert stopped.called
    attempt.callback(True)
    assert site.state.state == "stopped"
    assert client.subscriptions == []


def test_messages_are_acknowledged_after_commit() -> None:
    """A message's PUBACK waits for its batch's commit; a failed write is not acked."""
    clock = Clock()
    site, client, _, writer = make_site(clock)
    site.startService()
    client.attempts[-1].callback(True)
    client.on_message(ReceivedMessage("north/gateway/g/heartbeat", b"{}", 1, False, 7, 1))
    client.on_message(ReceivedMessage("north/gateway/g/heartbeat", b"{}", 1, False, 8, 1))
    assert site.messages_received == 2
    assert client.acked == []
    writer.submitted[0][1].callback(None)
    assert client.acked == [7]
    writer.submitted[1][1].errback(RuntimeError("database gone"))
    assert client.acked == [7]


def test_illegal_input_raises() -> None:
    """An input with no transition from the current state is an error, not a no-op."""
    clock = Clock()
    site, _, _, _ = make_site(clock)
    with pytest.raises(Exception, match="no transition"):
        site._machine._retryDue()


def test_stop_when_stopped_is_immediate() -> None:
    clock = Clock()
    site, _, _, _ = make_site(clock)
    assert site._machine.stop().called
    assert succeed(None).called
