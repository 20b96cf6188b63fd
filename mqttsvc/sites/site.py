"""
One site's MQTT connection as a service with an explicit state machine.

The states are those an operator sees: stopped, connecting, connected,
waiting to retry, error (gave up, probing now and then), stopping and
restarting.  Every state change is reported (to C{mqtt_connection} and the
C{connection_event} history) with its reason.

The shape follows Twisted's C{ClientService}: inputs are the methods of
L{_SiteInputs}, states carry their own data (the connection attempt, the
pending retry's or probe's L{IDelayedCall}), and an input with no
transition from the current state raises.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import attrs
from automat import TypeMachineBuilder, pep614
from twisted.application.service import Service
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttsvc.config import (
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_MAX_DEVICES,
    DEFAULT_MAX_PAYLOAD,
    SiteConfig,
    TopicSubscription,
)
from mqttsvc.ingest.liveness import DeviceLimit
from mqttsvc.ingest.processing import (
    Router,
    process,
    topic_problem,
)
from mqttsvc.mqtt.client import BrokerClient, SubscriptionResult
from mqttsvc.mqtt.codec import ReceivedMessage
from mqttsvc.mqtt.connector import ClientFactory
from mqttsvc.mqtt.errors import ConnectFailed
from mqttsvc.records import (
    ConnectionEvent,
    DeadLetter,
    DeviceKey,
    DeviceSeen,
    DeviceStatus,
    ResumeState,
    StatusUpdate,
    TopicSeen,
)
from mqttsvc.runtime.summary import Summary
from mqttsvc.sites.states import (
    CONNECTED,
    CONNECTING,
    ERROR,
    RESTARTING,
    STATUS_OF_STATE,
    STOPPED,
    STOPPING,
    WAITING,
)

#: Consecutive failed attempts after which a site gives up (status error).
MAX_RETRIES = 10

#: How often a site in error tries once more (the half-open circuit).
PROBE_INTERVAL = 15 * 60.0

#: A connection counts as a success, and resets the retry count, only once
#: it has proven itself: the broker granted our SUBSCRIBE (a filter at
#: least, or the resumed session needed none) and a whole packet arrived
#: this many seconds or more after CONNACK.  For an idle site that packet
#: is the first PINGRESP, one keepalive in.  Until then a drop counts as
#: one more failed attempt, so a broker that accepts and then goes silent,
#: sends garbage or trickles one endless packet backs off and reaches error
#: like one that refuses.  Longer than a connect-and-drop cycle (the
#: CONNACK timeout is 10 s, too).
PROVING_TIME = 10.0

#: How long a clean DISCONNECT may take before the socket is just closed.
DISCONNECT_TIMEOUT = 3.0

#: How long shutdown waits for received messages to be committed (and so
#: acknowledged) before it disconnects anyway; the broker redelivers the rest.
DRAIN_TIMEOUT = 3.0


#: The longest wait between two attempts, jitter included.
MAX_RETRY_DELAY = 300.0


def retry_delay(retry_count: int, jitter: float = 0.0) -> float:
    """
    The old service's backoff: C{min(5 s * 2^retry_count, 300 s)}, spread by
    a relative C{jitter} in [-1, 1] over 20% either side, so that many sites
    that lost the same broker do not come back in lockstep; never past
    L{MAX_RETRY_DELAY} (jitter at the cap reached 360 s).  At the cap only
    the shorter half of the spread is left, which is enough: the jittered
    waits before it have spread the sites' attempts out already.
    """
    base = min(5.0 * 2 ** min(retry_count, 16), MAX_RETRY_DELAY)
    return min(base * (1.0 + 0.2 * max(-1.0, min(1.0, jitter))), MAX_RETRY_DELAY)


@attrs.frozen
class SiteState:
    """
    A snapshot of one site's connection, as shown by C{site.status}.

    @ivar state: the state machine's state.
    @ivar status: the C{mqtt_connection.status} value it maps to.
    @ivar subscriptions: the broker's verdict on each subscription of the
        current connection.
    """

    site_id: str
    state: str
    status: str
    retry_count: int
    next_retry: datetime | None
    last_error: str | None
    last_connected_at: datetime | None
    since: datetime
    subscriptions: tuple[SubscriptionResult, ...] = ()

    def as_update(self) -> StatusUpdate:
        return StatusUpdate(
            site_id=self.site_id,
            status=self.status,
            last_connected_at=self.last_connected_at,
            retry_count=self.retry_count,
            next_retry=self.next_retry,
            last_error=self.last_error,
        )


class Reader(Protocol):
    """
    What the writer may ask of a site: to stop reading from its broker
    while its write lane is full, and to read again.
    """

    def pause_reading(self) -> None: ...

    def resume_reading(self) -> None: ...


class MessageSink(Protocol):
    """
    Where a site's messages go: the ingest side's writer
    (L{mqttsvc.ingest.writer.WriterLanes}); the site needs nothing else of it.
    """

    def queue(self, effects: list[Any], listener: Any, message: Any, size: int = 0) -> None:
        """
        Write C{effects}; then call C{listener.committed([message, ...])}.
        C{size} is the message's bytes; past its share, C{listener.hold}.
        """

    def attach(self, site_id: str, reader: Reader) -> None:
        """
        The running service of a site: pause it while its lane presses
        (at once, if the lane presses now).
        """

    def detach(self, site_id: str, reader: Reader) -> None:
        """
        C{reader} no longer runs for its site.
        """


class DeviceTracker(Protocol):
    """
    What a site tells device liveness (the ingest side's
    L{mqttsvc.ingest.liveness.OfflineDetector}): every device that speaks.
    """

    def seen(
        self, key: DeviceKey, interval: float, grace: float, limit: int | None = None
    ) -> DeviceStatus | None:
        """
        A device spoke now: its change to online, if it was not.

        @raise mqttsvc.ingest.liveness.DeviceLimit: for a new device past
            C{limit}.
        """

    def limit_changed(self, site_id: str) -> None:
        """
        The site's device limit changed: its next refusal is a first again.
        """


class _SiteInputs(Protocol):
    def start(self) -> None:
        "Connect, unless already connected or trying to."

    def stop(self) -> Deferred[None]:
        "Disconnect cleanly and stay stopped; fires when the socket is closed."

    def restart(self) -> None:
        "(Re)connect now; the caller has reset the retry count."

    def _resume_waiting(self) -> None:
        "Start as the database left it: waiting until next_retry."

    def _resume_error(self) -> None:
        "Start as the database left it: given up, probing at next_retry."

    def _connected(self, session_present: bool) -> None:
        "The broker accepted the connection."

    def _proven(self) -> None:
        "The connection has proven itself (see L{PROVING_TIME})."

    def _connect_failed(self) -> None:
        "An attempt failed (already recorded); another one is due later."

    def _exhausted(self) -> None:
        """
        An attempt failed, or its connection ended before it proved itself,
        and no regular retry is left.
        """

    def _lost(self) -> None:
        "An established connection ended (already recorded)."

    def _retry_due(self) -> None:
        "The wait before the next attempt is over."

    def _probe_due(self) -> None:
        "Time for a site in error to try once more."

    def _closed(self) -> None:
        "The connection we asked to close is closed."


@attrs.define
class SiteCounters:
    """
    A site's counters for the life of the process: they go on across the
    site's stops and starts, and reconnects that replace its service, as
    Prometheus counters should (they restarted at zero, so sites of the
    same traffic showed 20 and 540).  The supervisor keeps one per site.
    """

    messages_received: int = 0
    messages_rejected: int = 0
    messages_committed: int = 0
    #: How many times the broker accepted the site's connection.
    connects: int = 0
    last_message_at: datetime | None = None


@dataclass
class _SiteCore:
    config: SiteConfig
    clock: IReactorTime
    client: BrokerClient
    report: Callable[[SiteState, ConnectionEvent | None], None]
    jitter: Callable[[], float]
    probe_interval: float
    proving_time: float = PROVING_TIME
    retry_count: int = 0
    last_error: str | None = None
    last_connected_at: datetime | None = None
    next_retry: datetime | None = None
    attempt: int = 0
    counters: SiteCounters = field(default_factory=SiteCounters)
    connected_at: float = 0.0
    #: The attempt whose connection is waiting to prove itself (or has).
    proving: int = -1
    state: SiteState | None = None
    reason: str | None = None
    subscribed: tuple[tuple[str, int], ...] = ()
    subscriptions: tuple[SubscriptionResult, ...] = ()
    #: mqttsvc itself is stopping: a schedule (waiting, error) stays as the
    #: database has it, for the next start to resume.
    shutting_down: bool = False
    stop_waiters: list[Deferred[None]] = field(default_factory=list)
    log: Logger = field(default_factory=lambda: Logger(namespace="mqttsvc.sites.site"))

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def snapshot(self, state: str) -> SiteState:
        return SiteState(
            site_id=self.config.site_id,
            state=state,
            status=STATUS_OF_STATE[state],
            retry_count=self.retry_count,
            next_retry=self.next_retry,
            last_error=self.last_error,
            last_connected_at=self.last_connected_at,
            since=self.now(),
            subscriptions=self.subscriptions,
        )

    def enter(self, state: str) -> None:
        """
        Take a new snapshot and report it (with the pending reason) when
        anything an operator can see changed: with a L{ConnectionEvent} when
        the state changed, without one when only what it shows did (the
        subscriptions granted, the retry count reset by a proven connection).
        One transition, one event, named the same in the log.
        """
        snapshot = self.snapshot(state)
        previous = self.state
        reason, self.reason = self.reason, None
        if previous is not None and attrs.evolve(previous, since=snapshot.since) == snapshot:
            return
        why = f" ({reason})" if reason else ""
        if previous is not None and previous.state == state:
            self.state = attrs.evolve(snapshot, since=previous.since)
            self.log.info(
                "site {site_id}: still {state}{why}",
                site_id=self.config.site_id,
                state=state,
                why=why,
                reason=reason,
                retry_count=self.retry_count,
            )
            self.report(self.state, None)
            return
        self.state = snapshot
        from_state = previous.state if previous is not None else STOPPED
        self.log.info(
            "site {site_id}: {from_state} -> {to_state}{why}",
            site_id=self.config.site_id,
            from_state=from_state,
            to_state=state,
            why=why,
            reason=reason,
            retry_count=self.retry_count,
        )
        self.report(
            snapshot,
            ConnectionEvent(
                site_id=self.config.site_id,
                at=snapshot.since,
                from_state=from_state,
                to_state=state,
                reason=reason,
            ),
        )

    def record_failure(self, error: ConnectFailed) -> bool:
        """
        Count a failed attempt or lost connection and decide when the next
        attempt is due.

        @return: whether regular retries are over: after L{MAX_RETRIES}
            consecutive failures, or at once for refused credentials, which
            no retry will fix (a probe still runs now and then).
        """
        self.retry_count += 1
        self.last_error = f"{error.category}: {error.detail}"
        self.reason = self.last_error
        exhausted = self.retry_count >= MAX_RETRIES or error.category == "auth"
        if exhausted:
            delay = self.probe_interval
        else:
            delay = retry_delay(self.retry_count - 1, self.jitter())
        self.next_retry = datetime.fromtimestamp(self.clock.seconds() + delay, UTC)
        return exhausted

    def until_next_retry(self) -> float:
        if self.next_retry is None:
            return 0.0
        return max(0.0, self.next_retry.timestamp() - self.clock.seconds())

    def wait_for_stop(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.stop_waiters.append(d)
        return d

    def finish_stopping(self) -> None:
        waiters, self.stop_waiters = self.stop_waiters, []
        for w in waiters:
            w.callback(None)

    def wanted(self) -> tuple[tuple[str, int], ...]:
        """
        The MQTT filters and QoS the configured topics subscribe to.
        """
        return tuple((t.filter, t.qos) for t in self.config.topics)

    def subscribe(self, inputs: _SiteInputs) -> None:
        """
        Subscribe every configured topic on the current connection, and
        record the broker's verdict on each; then wait for the connection
        to prove itself.
        """
        wanted = self.wanted()
        token = self.attempt

        def verdicts(results: list[SubscriptionResult]) -> None:
            if self.attempt != token or self.state is None:
                return
            if self.state.state == CONNECTED and (not results or any(r.granted for r in results)):
                # A broker that refuses every filter proves nothing.
                self.await_proof(inputs)
            self.subscriptions = tuple(results)
            refused = [r for r in results if not r.granted]
            if refused:
                self.subscribed = ()
                self.last_error = "subscription refused: " + ", ".join(
                    f"{r.topic} ({r.reason})" for r in refused
                )
                self.reason = self.last_error
            else:
                self.subscribed = wanted
            self.enter(self.state.state)

        self.client.subscribe(list(wanted)).addCallback(verdicts)

    def await_proof(self, inputs: _SiteInputs) -> None:
        """
        The broker answered: wait for a packet C{proving_time} after
        CONNACK, then C{_proven} (once per connection).
        """
        token = self.attempt
        if self.proving == token:
            return
        self.proving = token

        def heard(_: object) -> None:
            if self.attempt == token and self.state is not None:
                if self.state.state == CONNECTED:
                    inputs._proven()

        self.client.heard_after(self.connected_at + self.proving_time).addCallback(heard)

    def close(self, inputs: _SiteInputs) -> None:
        """
        Close the current connection or attempt; C{_closed} follows.
        """
        self.attempt += 1  # results of an attempt in flight are now stale
        closing = self.client.disconnect()
        timeout = self.clock.callLater(DISCONNECT_TIMEOUT, self.client.abort)

        def closed(result: object) -> None:
            if timeout.active():
                timeout.cancel()
            inputs._closed()

        closing.addBoth(closed)


def _make_machine() -> Callable[[_SiteCore], _SiteInputs]:
    machine = TypeMachineBuilder(_SiteInputs, _SiteCore)

    def attempt_connection(c: _SiteInputs, s: _SiteCore) -> int:
        s.attempt += 1
        token = s.attempt
        s.enter(CONNECTING)

        def connected(session_present: bool) -> None:
            if s.attempt == token:
                c._connected(session_present)

        def failed(f: Failure) -> None:
            if s.attempt != token:
                return
            error = f.value
            if not isinstance(error, ConnectFailed):
                error = ConnectFailed("protocol", f.getErrorMessage())
            if s.record_failure(error):
                c._exhausted()
            else:
                c._connect_failed()

        s.client.connect().addCallbacks(connected, failed)
        return token

    def schedule_retry(c: _SiteInputs, s: _SiteCore) -> IDelayedCall:
        call = s.clock.callLater(s.until_next_retry(), c._retry_due)
        s.enter(WAITING)
        return call

    def schedule_probe(c: _SiteInputs, s: _SiteCore) -> IDelayedCall:
        if s.next_retry is None:
            s.next_retry = datetime.fromtimestamp(s.clock.seconds() + s.probe_interval, UTC)
        call = s.clock.callLater(s.until_next_retry(), c._probe_due)
        if s.state is None or s.state.state != ERROR:
            s.log.error(
                "site {site_id} gave up after {retries} failed attempts ({error}); "
                "next probe at {next_retry}",
                site_id=s.config.site_id,
                retries=s.retry_count,
                error=s.last_error,
                next_retry=s.next_retry.isoformat(),
            )
        s.enter(ERROR)
        return call

    def become_connected(c: _SiteInputs, s: _SiteCore, session_present: bool) -> BrokerClient:
        # The retry count stays until the connection proves itself.
        s.last_error = None
        s.next_retry = None
        s.counters.connects += 1
        s.connected_at = s.clock.seconds()
        s.last_connected_at = s.now()
        s.reason = "session resumed" if session_present else "new session"
        if not session_present:
            s.subscribed = ()
        s.enter(CONNECTED)
        if s.subscribed != s.wanted():
            s.subscribe(c)
        else:
            s.await_proof(c)
        return s.client

    Stopped = machine.state(STOPPED)
    Connecting = machine.state(CONNECTING, attempt_connection)
    Connected = machine.state(CONNECTED, become_connected)
    Waiting = machine.state(WAITING, schedule_retry)
    Error = machine.state(ERROR, schedule_probe)
    Stopping = machine.state(STOPPING)
    Restarting = machine.state(RESTARTING)

    Stopped.upon(_SiteInputs.start).to(Connecting).returns(None)
    Stopped.upon(_SiteInputs.restart).to(Connecting).returns(None)
    Stopped.upon(_SiteInputs._resume_waiting).to(Waiting).returns(None)
    Stopped.upon(_SiteInputs._resume_error).to(Error).returns(None)
    Connecting.upon(_SiteInputs.start).loop().returns(None)
    Connecting.upon(_SiteInputs._connected).to(Connected).returns(None)
    Connecting.upon(_SiteInputs._connect_failed).to(Waiting).returns(None)
    Connecting.upon(_SiteInputs._exhausted).to(Error).returns(None)
    Connected.upon(_SiteInputs.start).loop().returns(None)
    Connected.upon(_SiteInputs._lost).to(Waiting).returns(None)
    Connected.upon(_SiteInputs._exhausted).to(Error).returns(None)
    Waiting.upon(_SiteInputs.start).loop().returns(None)
    Waiting.upon(_SiteInputs._retry_due).to(Connecting).returns(None)
    Error.upon(_SiteInputs.start).loop().returns(None)
    Error.upon(_SiteInputs._probe_due).to(Connecting).returns(None)
    Stopping.upon(_SiteInputs.start).to(Restarting).returns(None)
    Stopping.upon(_SiteInputs.restart).to(Restarting).returns(None)
    Restarting.upon(_SiteInputs.start).loop().returns(None)
    Restarting.upon(_SiteInputs.restart).loop().returns(None)

    @pep614(Connected.upon(_SiteInputs._proven).loop())
    def proven(c: _SiteInputs, s: _SiteCore, client: BrokerClient) -> None:
        s.retry_count = 0
        s.reason = "the connection proved itself"
        s.enter(CONNECTED)

    @pep614(Stopped.upon(_SiteInputs.stop).loop())
    def already_stopped(c: _SiteInputs, s: _SiteCore) -> Deferred[None]:
        return succeed(None)

    def cancel_timer(c: _SiteInputs, s: _SiteCore, timer: IDelayedCall) -> None:
        timer.cancel()
        s.next_retry = None

    def stop_timer(c: _SiteInputs, s: _SiteCore, timer: IDelayedCall) -> Deferred[None]:
        if s.shutting_down:
            # Nothing is written: the row keeps this site's status, retry
            # count and next retry (or the backend's change to them), and
            # the next start resumes from it.  Reporting "stopped" here made
            # a graceful restart forget the backoff, probe a site in error at
            # once and announce it giving up a second time (issue 15).
            timer.cancel()
            s.log.info(
                "site {site_id}: stopped here (mqttsvc stopping, or the site moving to another "
                "instance); left {state} with {retries} retries and the next attempt at "
                "{next_retry} for the next start",
                site_id=s.config.site_id,
                state=s.state.state if s.state is not None else "?",
                retries=s.retry_count,
                next_retry=s.next_retry.isoformat() if s.next_retry is not None else None,
            )
            s.state = s.snapshot(STOPPED)
            return succeed(None)
        cancel_timer(c, s, timer)
        s.enter(STOPPED)
        return succeed(None)

    pep614(Waiting.upon(_SiteInputs.stop).to(Stopped))(stop_timer)
    pep614(Error.upon(_SiteInputs.stop).to(Stopped))(stop_timer)
    pep614(Waiting.upon(_SiteInputs.restart).to(Connecting))(cancel_timer)
    pep614(Error.upon(_SiteInputs.restart).to(Connecting))(cancel_timer)

    def begin_stopping(c: _SiteInputs, s: _SiteCore, data: object) -> Deferred[None]:
        waiter = s.wait_for_stop()
        s.enter(STOPPING)
        s.close(c)
        return waiter

    def begin_restarting(c: _SiteInputs, s: _SiteCore, data: object) -> None:
        s.enter(RESTARTING)
        s.close(c)

    pep614(Connecting.upon(_SiteInputs.stop).to(Stopping))(begin_stopping)
    pep614(Connected.upon(_SiteInputs.stop).to(Stopping))(begin_stopping)
    pep614(Connecting.upon(_SiteInputs.restart).to(Restarting))(begin_restarting)
    pep614(Connected.upon(_SiteInputs.restart).to(Restarting))(begin_restarting)

    @pep614(Stopping.upon(_SiteInputs.stop).loop())
    def already_stopping(c: _SiteInputs, s: _SiteCore) -> Deferred[None]:
        return s.wait_for_stop()

    @pep614(Restarting.upon(_SiteInputs.stop).to(Stopping))
    def stop_restarting(c: _SiteInputs, s: _SiteCore) -> Deferred[None]:
        s.enter(STOPPING)
        return s.wait_for_stop()

    @pep614(Stopping.upon(_SiteInputs._closed).to(Stopped))
    def stopped(c: _SiteInputs, s: _SiteCore) -> None:
        s.enter(STOPPED)
        s.finish_stopping()

    @pep614(Restarting.upon(_SiteInputs._closed).to(Connecting))
    def restarted(c: _SiteInputs, s: _SiteCore) -> None:
        s.finish_stopping()

    return machine.build()


_SiteMachine = _make_machine()


class SiteService(Service):
    """
    Keeps one site connected to its broker and feeds its messages to the
    batch writer; a QoS 1 message is acknowledged once its effects are
    committed.

    @param reactor: the reactor (time, threads and file descriptors).
    @param config: the site.
    @param writer: where message effects go (a L{MessageSink}); the site
        attaches to it while it runs, so that a full write lane pauses it.
    @param report: called with a L{SiteState} and the L{ConnectionEvent} on
        every state change, and with the state and None when only what the
        state shows changed.
    @param instance: this mqttsvc instance's name, part of the client id;
        None in a cluster, where every owner of the site uses one client id
        (L{SiteConfig.client_id}).
    @param resume: the connection state the database remembers; a site in
        error stays in error, a waiting site waits for its next retry.
    @param devices: device liveness, which learns of every device that
        speaks (a L{DeviceTracker}).
    @param max_payload: payloads larger than this (bytes) are dead letters;
        the broker connection holds no more of one than
        L{mqttsvc.config.DEAD_LETTER_KEEP}.
    @param max_clock_skew: seconds a message's C{ts} may be ahead of its
        receive time; further ahead it is a dead letter.
    @param max_devices: devices the site may have unless its own
        C{max_devices} says; a message of a new device beyond it is a dead
        letter.
    @param client_factory: makes the site's broker client
        (L{mqttsvc.mqtt.connector.Connector.client}).
    @param proving_time: see L{PROVING_TIME}.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: SiteConfig,
        writer: MessageSink,
        report: Callable[[SiteState, ConnectionEvent | None], None],
        *,
        instance: str | None = "local",
        resume: ResumeState | None = None,
        jitter: Callable[[], float] | None = None,
        probe_interval: float = PROBE_INTERVAL,
        proving_time: float = PROVING_TIME,
        devices: DeviceTracker | None = None,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        client_factory: ClientFactory,
        max_clock_skew: float = DEFAULT_MAX_CLOCK_SKEW,
        max_devices: int = DEFAULT_MAX_DEVICES,
        counters: SiteCounters | None = None,
    ) -> None:
        self.name = config.site_id
        self.counters = counters if counters is not None else SiteCounters()
        self._devices = devices
        self._max_payload = max_payload
        self._max_clock_skew = max_clock_skew
        self._default_max_devices = max_devices
        self._max_devices = config.max_devices or max_devices
        self.config = config
        self._clock: IReactorTime = reactor
        self._writer = writer
        self._router = Router(config.topics)
        self._resume = resume
        #: Messages handed to the writer and not committed yet.
        self.uncommitted = 0
        self._drained: Deferred[None] | None = None
        #: Whether the next stop waits for those to be committed, and why
        #: it stops (the reason of its events).
        self._drain_on_stop = True
        self._stop_reason = "stopped"
        #: Back-pressure: the writer is full (every site paused), or holds
        #: more of this site's bytes than its share (this site paused).
        self._pressed = False
        self._held = False
        #: Dead letters and processing bugs, logged at most once a minute.
        self._rejections = Summary(reactor)
        self._bugs = Summary(reactor)
        client = client_factory(
            config,
            self._message,
            self._lost,
            client_id=config.client_id(instance),
            max_payload=max_payload,
        )
        if config.tls is not None and config.tls.insecure:
            self.log.warn(
                "site {site_id}: TLS certificate and host name checks are OFF (tls.insecure); "
                "anyone on the path to {host} can read and change this site's traffic",
                site_id=config.site_id,
                host=config.host,
            )
        self._core = _SiteCore(
            config=config,
            clock=reactor,
            client=client,
            report=report,
            jitter=jitter if jitter is not None else (lambda: random.uniform(-1.0, 1.0)),
            probe_interval=probe_interval,
            proving_time=proving_time,
            counters=self.counters,
        )
        if resume is not None:
            self._core.last_connected_at = resume.last_connected_at
        self._machine = _SiteMachine(self._core)

    @property
    def connects(self) -> int:
        """
        How many times the broker accepted this site's connection.
        """
        return self.counters.connects

    @property
    def messages_received(self) -> int:
        return self.counters.messages_received

    @property
    def messages_rejected(self) -> int:
        return self.counters.messages_rejected

    @property
    def messages_committed(self) -> int:
        return self.counters.messages_committed

    @property
    def last_message_at(self) -> datetime | None:
        return self.counters.last_message_at

    @property
    def state(self) -> SiteState:
        """
        The current state snapshot.
        """
        return self._core.state or self._core.snapshot(STOPPED)

    def startService(self) -> None:
        super().startService()
        if not (self._pressed or self._held):
            self._core.client.resume()
        self._begin()
        # After the first attempt began, as the supervisor used to: a lane
        # that presses now pauses this site at once.
        self._writer.attach(self.config.site_id, self)

    def _begin(self) -> None:
        resume, self._resume = self._resume, None
        core = self._core
        if resume is not None and resume.retry_count > 0:
            core.retry_count = resume.retry_count
            core.last_error = resume.last_error
            core.next_retry = resume.next_retry
            core.reason = "resumed after a restart of mqttsvc"
            if resume.status == "error":
                self._machine._resume_error()
                return
            if core.until_next_retry() > 0:
                self._machine._resume_waiting()
                return
        self._machine.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._writer.detach(self.config.site_id, self)
        return Deferred.fromCoroutine(self._stop())

    async def _stop(self) -> None:
        # Take no new messages, let the ones in hand be committed (their
        # PUBACKs then go out ahead of our DISCONNECT), then disconnect.
        self._core.client.pause()
        if self.uncommitted and self._drain_on_stop:
            drained: Deferred[None] = Deferred()
            self._drained = drained
            drained.addTimeout(DRAIN_TIMEOUT, self._clock)
            try:
                await drained
            except Exception:
                self.log.warn(
                    "site {site_id}: {count} messages still uncommitted at shutdown; "
                    "the broker will redeliver them",
                    site_id=self.name,
                    count=self.uncommitted,
                )
            finally:
                self._drained = None
        self._core.reason = self._stop_reason
        await self._machine.stop()

    def shut_down(self) -> Deferred[None]:
        """
        Stop because mqttsvc stops (not because the site was stopped,
        disabled or deleted): a site waiting for its next attempt, or in
        error, leaves its row as it is, so that the next start resumes its
        schedule; any other stops as L{stopService} does.
        """
        self._core.shutting_down = True
        return self.stopService()

    def moving(self, *, drain: bool) -> None:
        """
        This instance gives the site up to another (a cluster): its next
        stop leaves the row's schedule (waiting, error) as it is, as
        L{shut_down} does, for the next owner to resume (failover is not a
        restart).  With C{drain} (a hand-over) that stop waits for the
        messages in hand to be committed and acknowledged, then
        disconnects; without (the lease is lost) it reads no more from now
        on and its stop disconnects at once: those messages are fenced,
        never acknowledged, and the broker redelivers them to the owner.
        """
        self._core.shutting_down = True
        # Once lost, never drained again: nothing more will be committed.
        self._drain_on_stop = self._drain_on_stop and drain
        self._stop_reason = (
            "handed over to another instance" if self._drain_on_stop else "its lease was lost"
        )
        if not drain:
            self._core.client.pause()

    def __repr__(self) -> str:
        # What the manhole shows for sites['north'] (it was "<... object at 0x...>").
        s = self.state
        return (
            f"<SiteService {self.name} {s.state} ({s.retry_count} retries) "
            f"{self.config.host}:{self.config.port}>"
        )

    def restart(self) -> None:
        """
        Reset the retry count and reconnect now (from any state; a site in
        error leaves it only this way).
        """
        if not (self._pressed or self._held):
            self._core.client.resume()
        self._core.retry_count = 0
        self._core.next_retry = None
        self._core.reason = "restart requested"
        self._machine.restart()

    def pause_reading(self) -> None:
        """
        Take no more messages from the broker for now (back-pressure).
        """
        self._pressed = True
        self._core.client.pause()

    def resume_reading(self) -> None:
        self._pressed = False
        if self.running and not self._held:
            self._core.client.resume()

    def hold(self, holding: bool) -> None:
        """
        The writer holds more of this site's bytes than its share (with
        True), or no longer does: pause or resume this site's reading.
        """
        self._held = holding
        if holding:
            self._core.client.pause()
        elif self.running and not self._pressed:
            self._core.client.resume()

    def reconfigure(self, config: SiteConfig) -> Deferred[bool]:
        """
        Take a new configuration of this site (the supervisor calls this
        for every reconciliation of a running site): new subscriptions are
        subscribed on the current connection, a new device limit applies
        from the next new device.  Changed connection settings cannot be
        taken in place: the site says so and the supervisor replaces it
        with a new service (a new connection, with a fresh retry count).

        @return: fires with whether this service carries on with
            C{config}; False when it must be replaced.
        """
        if self.config.connection_differs(config):
            self.log.info("site {site_id} changed: reconnecting", site_id=self.name)
            return succeed(False)
        if self.config.topics != config.topics:
            self.log.info("site {site_id} subscriptions changed", site_id=self.name)
            self._update_topics(config.topics)
        if self.config.max_devices != config.max_devices:
            self._set_max_devices(config.max_devices)
            if self._devices is not None:
                self._devices.limit_changed(self.config.site_id)
        return succeed(True)

    def _set_max_devices(self, max_devices: int | None) -> None:
        """
        Change the site's device limit (None: the service's); devices
        already tracked stay.
        """
        self.config = attrs.evolve(self.config, max_devices=max_devices)
        self._core.config = self.config
        self._max_devices = max_devices or self._default_max_devices

    def _update_topics(self, topics: tuple[TopicSubscription, ...]) -> None:
        """
        Change the subscriptions without reconnecting: drop the removed
        filters and subscribe the current set (the broker keeps one
        subscription per filter).
        """
        kept = {t.filter for t in topics}
        removed = [t.filter for t in self.config.topics if t.filter not in kept]
        self.config = attrs.evolve(self.config, topics=topics)
        self._core.config = self.config
        self._router = Router(topics)
        if self.state.state != CONNECTED:
            self._core.subscribed = ()
            return
        self._core.client.unsubscribe(removed)
        self._core.reason = "subscriptions changed"
        self._core.subscribe(self._machine)

    def _lost(self, error: ConnectFailed) -> None:
        # Before the connection proved itself, the count was not reset: the
        # last retry may be used up.
        if self._core.record_failure(error):
            self._machine._exhausted()
        else:
            self._machine._lost()

    def _message(self, message: ReceivedMessage) -> None:
        now = self._core.now()
        self.counters.messages_received += 1
        self.counters.last_message_at = now
        try:
            effects = process(
                self.config.site_id,
                self._router,
                message.topic,
                message.payload,
                now,
                retained=message.retain,
                max_payload=self._max_payload,
                # Only a cut payload (it has a hash) has a size of its own.
                size=message.size if message.sha256 is not None else None,
                sha256=message.sha256,
                max_skew=self._max_clock_skew,
            )
        except Exception as e:
            # A bug, not bad input (that is a dead letter already): keep the
            # message as a dead letter rather than lose it or stall the site.
            reason = f"processing failed: {type(e).__name__}: {e}"
            self._bugs.occurred(
                lambda unlogged: self.log.failure(
                    "site {site_id}: processing a message failed ({unlogged} more since the "
                    "last such line)",
                    site_id=self.name,
                    unlogged=unlogged,
                )
            )
            effects = [DeadLetter(self.config.site_id, message.topic, message.payload, reason, now)]
            if topic_problem(message.topic) is None:
                effects.insert(0, TopicSeen(self.config.site_id, message.topic, now))
        if self._devices is not None and type(effects[-1]) is not DeadLetter:
            policy = self.config.offline
            try:
                for effect in list(effects):
                    if isinstance(effect, DeviceSeen):
                        interval = effect.interval or policy.interval(effect.kind)
                        change = self._devices.seen(
                            effect.key, interval, policy.grace, self._max_devices
                        )
                        if change is not None:
                            effects.append(change)
            except DeviceLimit as e:
                # No device, no readings, not even the topic: a site that
                # invents device ids must not grow anything but dead letters.
                effects = [
                    DeadLetter(self.config.site_id, message.topic, message.payload, str(e), now)
                ]
        last = effects[-1]
        if type(last) is DeadLetter:
            self.counters.messages_rejected += 1
            self._rejections.occurred(
                lambda unlogged: self.log.warn(
                    "site {site_id}: a message was dead-lettered ({unlogged} more since the last "
                    "such line): {reason}",
                    site_id=self.name,
                    unlogged=unlogged,
                    reason=last.reason,
                )
            )
        self.uncommitted += 1
        self._writer.queue(effects, self, message, len(message.payload) + len(message.topic))

    def committed(self, messages: list[ReceivedMessage]) -> None:
        """
        The writer committed these messages' effects: acknowledge them (one
        write for all their PUBACKs).
        """
        self.uncommitted -= len(messages)
        self.counters.messages_committed += len(messages)
        self._core.client.ack(messages)
        drained = self._drained
        if drained is not None and self.uncommitted <= 0 and not drained.called:
            drained.callback(None)
