"""
The site state machine on a fake clock: backoff schedule, giving up,
restart and stop semantics, and no timers left behind.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import formatEvent, globalLogPublisher

from mqttsvc.config import SiteConfig, TopicSubscription, default_topics
from mqttsvc.mqtt.client import BrokerClient, SubscriptionResult
from mqttsvc.mqtt.codec import ReceivedMessage
from mqttsvc.mqtt.connector import ClientFactory
from mqttsvc.mqtt.errors import ConnectFailed
from mqttsvc.records import ConnectionEvent, DeviceKey, DeviceStatus, ResumeState
from mqttsvc.sites.site import (
    DISCONNECT_TIMEOUT,
    DRAIN_TIMEOUT,
    MAX_RETRIES,
    PROBE_INTERVAL,
    PROVING_TIME,
    DeviceTracker,
    MessageSink,
    Reader,
    SiteService,
    SiteState,
    retry_delay,
)
from tests.conformance import assert_implements


class FakeClient:
    """
    Stands in for L{MQTTClient}: each connect() returns a Deferred the test
    fires.
    """

    def __init__(
        self,
        config: SiteConfig,
        on_message: Any,
        on_lost: Any,
        *,
        client_id: str,
        max_payload: int,
    ) -> None:
        self.max_payload = max_payload
        self.on_message = on_message
        self.on_lost = on_lost
        self.client_id = client_id
        self.attempts: list[Deferred[bool]] = []
        self.subscriptions: list[list[tuple[str, int]]] = []
        self.subacks: list[Deferred[list[SubscriptionResult]]] = []
        self.unsubscribed: list[list[str]] = []
        self.paused = 0
        self.resumed = 0
        self.disconnects: list[Deferred[None]] = []
        self.acked: list[int] = []
        self.aborted = 0
        self.proofs: list[tuple[float, Deferred[None]]] = []

    def connect(self) -> Deferred[bool]:
        d: Deferred[bool] = Deferred()
        self.attempts.append(d)
        return d

    def subscribe(self, topics: list[tuple[str, int]]) -> Deferred[list[SubscriptionResult]]:
        self.subscriptions.append(topics)
        self.subacks.append(Deferred())
        return self.subacks[-1]

    def unsubscribe(self, topics: list[str]) -> None:
        self.unsubscribed.append(topics)

    def pause(self) -> None:
        self.paused += 1

    def resume(self) -> None:
        self.resumed += 1

    def disconnect(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.disconnects.append(d)
        return d

    def abort(self, reason: ConnectFailed | None = None) -> None:
        self.aborted += 1
        if self.disconnects and not self.disconnects[-1].called:
            self.disconnects[-1].callback(None)

    def ack(self, messages: list[ReceivedMessage]) -> int:
        self.acked.extend(m.mid for m in messages)
        return len(messages)

    def heard_after(self, at: float) -> Deferred[None]:
        self.proofs.append((at, Deferred()))
        return self.proofs[-1][1]


#: Checked by mypy: the fake's constructor is a site's client factory, so
#: the fake is a BrokerClient, method by method and signature by signature.
_FAKE_FACTORY: ClientFactory = FakeClient


def test_the_fake_client_is_a_broker_client() -> None:
    """
    The fake has exactly the methods of the L{BrokerClient} Protocol, with
    the same signatures: when the Protocol changes, this fails instead of
    the site's tests passing against a fake of the old interface.
    """

    def methods(cls: type) -> dict[str, inspect.Signature]:
        return {
            name: inspect.signature(value)
            for name, value in vars(cls).items()
            if callable(value) and not name.startswith("_")
        }

    assert methods(FakeClient) == methods(BrokerClient)


class FakeWriter:
    """
    Stands in for the ingest writer (a L{MessageSink}): records what is
    queued, and which site runs.
    """

    def __init__(self, pressing: bool = False) -> None:
        self.submitted: list[tuple[list[Any], Any, Any]] = []
        self.readers: dict[str, Reader] = {}
        self.pressing = pressing

    def queue(self, effects: list[Any], listener: Any, message: Any, size: int = 0) -> None:
        self.submitted.append((effects, listener, message))

    def attach(self, site_id: str, reader: Reader) -> None:
        self.readers[site_id] = reader
        if self.pressing:
            reader.pause_reading()

    def detach(self, site_id: str, reader: Reader) -> None:
        if self.readers.get(site_id) is reader:
            del self.readers[site_id]

    def commit(self, index: int) -> None:
        _, listener, message = self.submitted[index]
        listener.committed([message])


class Harness:
    """
    A site on a fake clock with a fake client and writer, recording every
    reported state and event.
    """

    def __init__(
        self,
        resume: ResumeState | None = None,
        jitter: Callable[[], float] | None = lambda: 0.0,
        **kwargs: Any,
    ) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        config = SiteConfig(site_id="north", host="127.0.0.1", topics=default_topics("north"))
        self.states: list[SiteState] = []
        self.events: list[ConnectionEvent] = []
        self.writer = kwargs.pop("writer", None) or FakeWriter()
        clients: list[FakeClient] = []

        def factory(*args: Any, **kw: Any) -> FakeClient:
            clients.append(FakeClient(*args, **kw))
            assert isinstance(clients[-1], BrokerClient), "the fake lacks a method of the client"
            return clients[-1]

        def report(state: SiteState, event: ConnectionEvent | None) -> None:
            self.states.append(state)
            if event is not None:
                self.events.append(event)

        self.site = SiteService(
            self.clock,
            config,
            self.writer,
            report,
            instance="box",
            resume=resume,
            jitter=jitter,
            client_factory=factory,
            **kwargs,
        )
        self.client = clients[0]

    @property
    def state(self) -> SiteState:
        return self.site.state

    def fail(self, category: str = "refused", detail: str = "connection refused") -> None:
        self.client.attempts[-1].errback(ConnectFailed(category, detail))

    def connect(self, session_present: bool = False) -> None:
        self.client.attempts[-1].callback(session_present)

    def suback(self) -> None:
        """The broker grants every filter of the last SUBSCRIBE."""
        self.client.subacks[-1].callback(
            [SubscriptionResult(t, True, "Granted QoS 1") for t, _ in self.client.subscriptions[-1]]
        )

    def prove(self) -> None:
        """A packet arrives after the proving time: the last proof wait fires."""
        at, heard = self.client.proofs[-1]
        self.clock.advance(max(0.0, at - self.clock.seconds()))
        heard.callback(None)

    def wait(self) -> float:
        """Advance to the only pending timer and return how long that was."""
        (call,) = self.clock.getDelayedCalls()
        delay = call.getTime() - self.clock.seconds()
        self.clock.advance(delay)
        return delay


def refused() -> ConnectFailed:
    return ConnectFailed("refused", "connection refused")


def test_one_transition_one_event_named_alike_in_the_log() -> None:
    """
    Connecting, the SUBACKs and the proof make two events (stopped ->
    connecting -> connected), never a connected -> connected one; the log
    names the first transition as the event does (it said "new").
    """
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "mqttsvc.sites.site":
            lines.append(formatEvent(event))

    globalLogPublisher.addObserver(observe)
    try:
        h = Harness()
        h.site.startService()
        h.connect()
        h.suback()
        h.clock.advance(PROVING_TIME)
        h.prove()
    finally:
        globalLogPublisher.removeObserver(observe)
    assert [(e.from_state, e.to_state) for e in h.events] == [
        ("stopped", "connecting"),
        ("connecting", "connected"),
    ]
    assert h.states[-1].subscriptions and h.states[-1].state == "connected"
    assert lines[:2] == [
        "site north: stopped -> connecting",
        "site north: connecting -> connected (new session)",
    ]
    assert not any("connected -> connected" in line or "new ->" in line for line in lines)


def test_a_site_says_what_it_is_in_the_manhole() -> None:
    """repr(site) names the site, its state, retries and broker, not an address."""
    h = Harness()
    assert repr(h.site) == "<SiteService north stopped (0 retries) 127.0.0.1:1883>"
    h.site.startService()
    h.fail()
    assert repr(h.site) == "<SiteService north waiting (1 retries) 127.0.0.1:1883>"


def test_backoff_schedule_matches_the_old_service() -> None:
    """
    min(5 s * 2^n, 300 s), with jitter of at most 20% either way, and never
    past 300 s (jitter at the cap reached 360 s): at the cap only its
    shorter half is left.
    """
    assert [retry_delay(n) for n in range(6)] == [5, 10, 20, 40, 80, 160]
    assert retry_delay(0, 1.0) == pytest.approx(6.0)
    assert retry_delay(0, -1.0) == pytest.approx(4.0)
    assert retry_delay(5, 1.0) == pytest.approx(192.0)
    assert retry_delay(50, 5.0) == pytest.approx(300.0)
    assert retry_delay(50, -1.0) == pytest.approx(240.0)
    worst = max(retry_delay(n, j / 10) for n in range(20) for j in range(-10, 11))
    assert worst == pytest.approx(300.0)
    at_cap = {round(retry_delay(10, j / 10), 6) for j in range(-10, 11)}
    assert len(at_cap) == 11 and min(at_cap) == 240 and max(at_cap) == 300


def test_jitter_spreads_retries_within_bounds() -> None:
    """With the default random jitter, first retries spread over 4-6 s."""
    delays = set()
    for _ in range(50):
        h = Harness(jitter=None)
        h.site.startService()
        h.fail()
        delays.add(round(h.wait(), 6))
    assert all(4.0 <= d <= 6.0 for d in delays)
    assert len(delays) > 10


def test_retries_then_gives_up_and_probes() -> None:
    """Nine waits on the old schedule; the tenth failure is error, then a probe every 15 min."""
    h = Harness()
    h.site.startService()
    waits = []
    for n in range(MAX_RETRIES - 1):
        h.fail()
        assert h.state.state == "waiting"
        assert h.state.retry_count == n + 1
        assert h.state.last_error == "refused: connection refused"
        assert h.state.next_retry is not None
        assert h.state.next_retry.timestamp() == h.clock.getDelayedCalls()[0].getTime()
        waits.append(h.wait())
        assert h.state.state == "connecting"
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    h.fail()
    assert (h.state.state, h.state.status, h.state.retry_count) == ("error", "error", 10)
    assert h.wait() == PROBE_INTERVAL
    assert h.state.state == "connecting"
    h.fail()
    assert (h.state.state, h.state.retry_count) == ("error", 11)
    assert h.wait() == PROBE_INTERVAL
    h.connect()
    assert (h.state.state, h.state.retry_count, h.state.last_error) == ("connected", 11, None)
    h.suback()
    h.prove()
    assert (h.state.state, h.state.retry_count, h.state.last_error) == ("connected", 0, None)
    assert h.clock.getDelayedCalls() == []
    assert [e.to_state for e in h.events[:3]] == ["connecting", "waiting", "connecting"]
    assert h.events[1].reason == "refused: connection refused"


def test_bad_credentials_go_straight_to_error() -> None:
    """Refused credentials are not retried on the schedule: error at once, then probes."""
    h = Harness()
    h.site.startService()
    h.fail("auth", "broker refused the credentials: Not authorized")
    assert h.state.state == "error"
    assert h.state.retry_count == 1
    assert h.state.last_error == "auth: broker refused the credentials: Not authorized"
    assert h.wait() == PROBE_INTERVAL


def test_connect_subscribes_and_checks_every_suback() -> None:
    """A new session subscribes every topic; a refused filter shows in last_error."""
    h = Harness()
    h.site.startService()
    h.fail()
    h.wait()
    h.connect(session_present=False)
    assert h.state.state == "connected"
    assert h.state.last_connected_at == datetime.fromtimestamp(h.clock.seconds(), UTC)
    assert h.client.subscriptions == [
        [
            ("north/gateway/+/heartbeat", 1),
            ("north/datalogger/+/+/heartbeat", 1),
            ("north/sensor/+/data", 1),
        ]
    ]
    h.client.subacks[-1].callback(
        [
            SubscriptionResult("north/gateway/+/heartbeat", True, "Granted QoS 1"),
            SubscriptionResult("north/datalogger/+/+/heartbeat", False, "Unspecified error"),
            SubscriptionResult("north/sensor/+/data", True, "Granted QoS 1"),
        ]
    )
    assert h.state.state == "connected"
    assert h.state.last_error == (
        "subscription refused: north/datalogger/+/+/heartbeat (Unspecified error)"
    )
    assert [r.granted for r in h.state.subscriptions] == [True, False, True]
    # Written as the site's last_error; not an event: the state is the same.
    assert h.states[-1].last_error == h.state.last_error
    assert h.events[-1].to_state == "connected" and h.events[-1].reason == "new session"


def test_resumed_session_is_not_resubscribed() -> None:
    """With the broker's session present and the same topics, no SUBSCRIBE is sent again."""
    h = Harness()
    h.site.startService()
    h.connect(session_present=False)
    h.client.subacks[-1].callback(
        [SubscriptionResult(t, True, "ok") for t, _ in h.client.subscriptions[-1]]
    )
    h.client.on_lost(ConnectFailed("network", "connection lost"))
    assert h.state.state == "waiting"
    h.wait()
    h.connect(session_present=True)
    assert len(h.client.subscriptions) == 1
    h.client.on_lost(ConnectFailed("network", "connection lost"))
    h.wait()
    h.connect(session_present=False)
    assert len(h.client.subscriptions) == 2


def test_topics_change_without_reconnecting() -> None:
    """New subscriptions are applied on the live connection: removed ones unsubscribed."""
    h = Harness()
    h.site.startService()
    h.connect()
    new = (default_topics("north")[0], TopicSubscription("north/extra/#", "other"))
    d = h.site.reconfigure(attrs.evolve(h.site.config, topics=new))
    assert d.result is True
    assert h.client.unsubscribed == [["north/datalogger/+/+/heartbeat", "north/sensor/+/data"]]
    assert h.client.subscriptions[-1] == [("north/gateway/+/heartbeat", 1), ("north/extra/#", 1)]
    assert len(h.client.attempts) == 1


def test_restart_resets_and_connects_now() -> None:
    """Restart from waiting or error ignores the pending timer and reconnects at once."""
    h = Harness()
    h.site.startService()
    h.fail()
    h.site.restart()
    assert (h.state.state, h.state.retry_count, h.state.next_retry) == ("connecting", 0, None)
    assert h.clock.getDelayedCalls() == []
    assert h.events[-1].reason == "restart requested"
    for _ in range(MAX_RETRIES):
        h.fail()
        if h.state.state == "waiting":
            h.wait()
    assert h.state.state == "error"
    h.site.restart()
    assert (h.state.state, h.state.retry_count) == ("connecting", 0)
    assert h.clock.getDelayedCalls() == []


def test_restart_while_connected_disconnects_first() -> None:
    """Restarting a connected site sends DISCONNECT, then connects again."""
    h = Harness()
    h.site.startService()
    h.connect()
    h.site.restart()
    assert h.state.state == "restarting"
    h.client.disconnects[-1].callback(None)
    assert h.state.state == "connecting"
    assert len(h.client.attempts) == 2
    assert h.clock.getDelayedCalls() == []


def test_resume_error_stays_in_error() -> None:
    """A site the database shows in error is not reconnected at start; it probes on time."""
    h0 = Harness()
    due = datetime.fromtimestamp(h0.clock.seconds() + 600, UTC)
    h = Harness(ResumeState("error", 10, due, "auth: bad", None))
    h.site.startService()
    assert (h.state.state, h.state.retry_count, h.state.next_retry) == ("error", 10, due)
    assert h.client.attempts == []
    assert h.wait() == 600
    assert h.state.state == "connecting"


def test_resume_waiting_honours_next_retry() -> None:
    """A waiting site keeps its retry count and waits until its stored next retry."""
    h0 = Harness()
    due = datetime.fromtimestamp(h0.clock.seconds() + 42, UTC)
    h = Harness(ResumeState("disconnected", 3, due, "timeout: timed out connecting", None))
    h.site.startService()
    assert (h.state.state, h.state.retry_count) == ("waiting", 3)
    assert h.wait() == 42
    h.fail()
    assert h.state.retry_count == 4
    assert h.wait() == 40


def test_resume_overdue_retry_connects_now() -> None:
    """A retry that fell due while mqttsvc was down is made at once, keeping the count."""
    h0 = Harness()
    past = datetime.fromtimestamp(h0.clock.seconds() - 5, UTC)
    h = Harness(ResumeState("disconnected", 2, past, "refused: connection refused", None))
    h.site.startService()
    assert (h.state.state, h.state.retry_count) == ("connecting", 2)


def test_stop_while_waiting_cancels_the_retry() -> None:
    """Stop leaves no timer behind and reports disconnected."""
    h = Harness()
    h.site.startService()
    h.fail()
    stopped = h.site.stopService()
    assert stopped.called
    assert (h.state.state, h.state.next_retry) == ("stopped", None)
    assert h.states[-1].status == "disconnected"
    assert h.clock.getDelayedCalls() == []


def test_stop_in_error_cancels_the_probe() -> None:
    h = Harness()
    h.site.startService()
    h.fail("auth", "no")
    assert h.site.stopService().called
    assert h.clock.getDelayedCalls() == []


def test_stop_drains_then_disconnects() -> None:
    """Shutdown stops reading, waits for commits (acks go out), then DISCONNECTs."""
    h = Harness()
    h.site.startService()
    h.connect()
    h.client.on_message(ReceivedMessage("north/gateway/g/heartbeat", b"{}", 1, False, 7, 1))
    stopped = h.site.stopService()
    assert h.client.paused == 1
    assert h.client.disconnects == []
    h.writer.commit(0)
    assert h.client.acked == [7]
    assert len(h.client.disconnects) == 1
    h.client.disconnects[-1].callback(None)
    assert stopped.called
    assert h.state.state == "stopped"
    assert h.clock.getDelayedCalls() == []


def test_stop_gives_up_draining_after_a_timeout() -> None:
    """A commit that never comes does not hold shutdown; the message is not acked."""
    h = Harness()
    h.site.startService()
    h.connect()
    h.client.on_message(ReceivedMessage("north/gateway/g/heartbeat", b"{}", 1, False, 7, 1))
    stopped = h.site.stopService()
    h.clock.advance(DRAIN_TIMEOUT)
    assert len(h.client.disconnects) == 1
    h.client.disconnects[-1].callback(None)
    assert stopped.called
    assert h.client.acked == []


def test_stop_aborts_a_broker_that_does_not_answer() -> None:
    """A DISCONNECT that never completes is cut off after the timeout."""
    h = Harness()
    h.site.startService()
    h.connect()
    stopped = h.site.stopService()
    h.clock.advance(DISCONNECT_TIMEOUT)
    assert h.client.aborted == 1
    assert stopped.called
    assert h.clock.getDelayedCalls() == []


def test_stop_while_connecting_ignores_the_late_result() -> None:
    """An attempt that completes after stop does not revive the site."""
    h = Harness()
    h.site.startService()
    attempt = h.client.attempts[-1]
    stopped = h.site.stopService()
    h.client.disconnects[-1].callback(None)
    assert stopped.called
    attempt.callback(True)
    assert h.state.state == "stopped"
    assert h.client.subscriptions == []


def test_messages_are_acknowledged_after_commit() -> None:
    """A message's PUBACK waits for its batch's commit; an uncommitted one is not acked."""
    h = Harness()
    h.site.startService()
    h.connect()
    h.client.on_message(ReceivedMessage("north/gateway/g/heartbeat", b"{}", 1, False, 7, 1))
    h.client.on_message(ReceivedMessage("north/gateway/g/heartbeat", b"x", 1, False, 8, 1))
    assert (h.site.messages_received, h.site.messages_rejected) == (2, 1)
    assert h.client.acked == []
    assert h.site.uncommitted == 2
    h.writer.commit(0)
    assert h.client.acked == [7]
    assert (h.site.uncommitted, h.site.messages_committed) == (1, 1)
    h.clock.advance(60)
    assert h.client.acked == [7]


def test_client_id_is_stable() -> None:
    """The client id is prefix, instance and site: the same on every start."""
    assert Harness().client.client_id == "mqttsvc_box_north"


def test_illegal_input_raises() -> None:
    """An input with no transition from the current state is an error, not a no-op."""
    h = Harness()
    with pytest.raises(Exception, match="no transition"):
        h.site._machine._retry_due()


def test_a_processing_bug_becomes_a_dead_letter(monkeypatch: Any) -> None:
    """If processing itself fails, the message is kept as a dead letter and the site goes on."""
    import mqttsvc.sites.site

    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OverflowError("int too large to convert to float")

    h = Harness()
    h.site.startService()
    h.connect()
    monkeypatch.setattr(mqttsvc.sites.site, "process", broken)
    h.client.on_message(ReceivedMessage("north/sensor/s/data", b'{"value": 1}', 1, False, 7, 1))
    [(effects, _, _)] = h.writer.submitted
    assert [type(e).__name__ for e in effects] == ["TopicSeen", "DeadLetter"]
    assert (
        effects[1].reason == "processing failed: OverflowError: int too large to convert to float"
    )
    assert h.site.messages_rejected == 1
    h.writer.commit(0)
    assert h.client.acked == [7]


def test_connections_that_never_prove_themselves_back_off_to_error() -> None:
    """
    A broker that accepts and then drops the link (garbage, silence, a
    trickled packet) before the connection proved itself does not reset
    the retry count: the backoff goes on and the site reaches error.
    """
    h = Harness()
    h.site.startService()
    waits = []
    for n in range(MAX_RETRIES - 1):
        h.connect()
        assert (h.state.state, h.state.retry_count) == ("connected", n)
        h.suback()
        h.client.on_lost(ConnectFailed("protocol", "a PUBLISH at QoS 2"))
        assert (h.state.state, h.state.retry_count) == ("waiting", n + 1)
        assert h.state.last_error == "protocol: a PUBLISH at QoS 2"
        waits.append(h.wait())
    assert waits == [5, 10, 20, 40, 80, 160, 300, 300, 300]
    h.connect()
    h.client.on_lost(ConnectFailed("timeout", "packet of 1000 bytes incomplete after 8s"))
    assert (h.state.state, h.state.retry_count) == ("error", MAX_RETRIES)
    assert h.state.last_error == "timeout: packet of 1000 bytes incomplete after 8s"
    assert h.wait() == PROBE_INTERVAL
    assert h.state.state == "connecting"


def test_proof_needs_the_suback_and_a_packet_after_the_proving_time() -> None:
    """
    The proof is asked for only once the SUBACK came, for a packet at least
    PROVING_TIME after CONNACK; then the count resets, and a later drop is
    the first failure again.
    """
    h = Harness()
    h.site.startService()
    h.fail()
    h.wait()
    h.fail()
    h.wait()
    connected_at = h.clock.seconds()
    h.connect()
    assert h.client.proofs == []
    h.clock.advance(3)
    h.suback()
    [(at, _)] = h.client.proofs
    assert at == connected_at + PROVING_TIME
    assert h.state.retry_count == 2
    h.prove()
    assert (h.state.state, h.state.retry_count) == ("connected", 0)
    # The reset is reported as a state (to be written), not as an event.
    assert h.states[-1].retry_count == 0
    assert (h.events[-1].from_state, h.events[-1].to_state) == ("connecting", "connected")
    h.client.on_lost(ConnectFailed("network", "connection lost"))
    assert (h.state.state, h.state.retry_count) == ("waiting", 1)
    assert h.wait() == 5
    assert h.clock.getDelayedCalls() == []


def test_the_proving_time_is_the_sites_to_set() -> None:
    """--proving-time reaches the site: the proof asked for is that long after CONNACK."""
    h = Harness(proving_time=2.5)
    h.site.startService()
    connected_at = h.clock.seconds()
    h.connect()
    h.suback()
    [(at, _)] = h.client.proofs
    assert at == connected_at + 2.5


def test_a_resumed_session_waits_for_proof_without_subscribing() -> None:
    """With the session present and nothing to subscribe, the proof wait starts at CONNACK."""
    h = Harness()
    h.site.startService()
    h.connect()
    h.suback()
    h.prove()
    h.client.on_lost(ConnectFailed("network", "connection lost"))
    h.wait()
    h.connect(session_present=True)
    assert len(h.client.subscriptions) == 1
    assert len(h.client.proofs) == 2
    assert h.state.retry_count == 1
    h.prove()
    assert h.state.retry_count == 0


def test_a_late_proof_changes_nothing() -> None:
    """A proof for a connection that already ended is ignored, not an illegal input."""
    h = Harness()
    h.site.startService()
    h.connect()
    h.suback()
    _, heard = h.client.proofs[-1]
    h.client.on_lost(ConnectFailed("network", "connection lost"))
    heard.callback(None)
    assert (h.state.state, h.state.retry_count) == ("waiting", 1)
    h.wait()
    h.connect()
    h.suback()
    assert len(h.client.proofs) == 2


def test_a_broker_that_refuses_every_filter_proves_nothing() -> None:
    """With every subscription refused, no proof is awaited: the retry count stays."""
    h = Harness()
    h.site.startService()
    h.fail()
    h.wait()
    h.connect()
    h.client.subacks[-1].callback(
        [SubscriptionResult(t, False, "Not authorized") for t, _ in h.client.subscriptions[-1]]
    )
    assert h.client.proofs == []
    assert (h.state.state, h.state.retry_count) == ("connected", 1)


class FakeDevices:
    """
    Stands in for device liveness (a L{DeviceTracker}): every device is
    new, and limit changes are recorded.
    """

    def __init__(self) -> None:
        self.limit_changes: list[str] = []

    def seen(
        self, key: DeviceKey, interval: float, grace: float, limit: int | None = None
    ) -> DeviceStatus | None:
        return None

    def limit_changed(self, site_id: str) -> None:
        self.limit_changes.append(site_id)


def test_fakes_match_the_interfaces_they_stand_for() -> None:
    """
    The fakes of this module have the methods, with the same parameters,
    of the Protocols the site is given, and none the site no longer calls.
    """
    assert_implements(FakeWriter, MessageSink, extra=["commit"])
    assert_implements(FakeDevices, DeviceTracker)
    assert_implements(FakeClient, BrokerClient)


def test_a_connection_change_asks_to_be_replaced() -> None:
    """
    A configuration whose connection settings differ is refused (the
    supervisor replaces the service): nothing changes on this connection.
    """
    h = Harness()
    h.site.startService()
    h.connect()
    d = h.site.reconfigure(attrs.evolve(h.site.config, port=1884))
    assert d.result is False
    assert h.site.config.port == 1883
    assert (h.client.unsubscribed, len(h.client.subscriptions)) == ([], 1)
    assert len(h.client.attempts) == 1 and h.client.disconnects == []


def test_a_device_limit_change_applies_in_place() -> None:
    """
    A new device limit is taken without reconnecting or resubscribing, and
    device liveness hears that the site's limit changed; the same
    configuration again changes nothing.
    """
    devices = FakeDevices()
    h = Harness(devices=devices)
    h.site.startService()
    h.connect()
    d = h.site.reconfigure(attrs.evolve(h.site.config, max_devices=5))
    assert d.result is True
    assert h.site.config.max_devices == 5 and devices.limit_changes == ["north"]
    assert h.site.reconfigure(h.site.config).result is True
    assert devices.limit_changes == ["north"]
    assert (h.client.unsubscribed, len(h.client.subscriptions)) == ([], 1)
    assert len(h.client.attempts) == 1


def test_a_running_site_is_attached_to_its_writer() -> None:
    """
    A site attaches to the writer when it starts (a lane that presses then
    pauses it at once) and detaches when it stops.
    """
    writer = FakeWriter(pressing=True)
    h = Harness(writer=writer)
    h.site.startService()
    assert writer.readers == {"north": h.site}
    assert h.client.paused == 1
    h.site.stopService()
    assert writer.readers == {}
