"""
One site's MQTT connection as a service with an explicit state machine.

The states are those an operator sees: stopped, connecting, connected,
waiting to retry, error (gave up) and stopping (or restarting).  Every state
change is reported to a status sink, which writes it to C{mqtt_connection}.

The shape follows Twisted's C{ClientService}: inputs are the methods of
L{_SiteInputs}, states carry their own data (the connection attempt, the
pending retry's L{IDelayedCall}), and an input with no transition from the
current state raises.
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

from mqttsvc.config import SiteConfig
from mqttsvc.processing import Router, process
from mqttsvc.transport import BrokerClient, ConnectFailed, MQTTClient, ReceivedMessage
from mqttsvc.writer import StatusUpdate

#: Consecutive failed attempts after which a site gives up (status error).
MAX_RETRIES = 10

#: How long a clean DISCONNECT may take before the socket is just closed.
DISCONNECT_TIMEOUT = 5.0


def retry_delay(retry_count: int, jitter: float = 0.0) -> float:
    """
    The old service's backoff: C{min(5 s * 2^retry_count, 300 s)}, spread by
    a relative C{jitter} in [-1, 1] times 20%, so that many sites that lost
    the same broker do not come back in lockstep.
    """
    base = min(5.0 * 2 ** min(retry_count, 16), 300.0)
    return base * (1.0 + 0.2 * max(-1.0, min(1.0, jitter)))


@attrs.frozen
class SiteState:
    """
    A snapshot of one site's connection, as shown by C{site.status}.

    @ivar state: the state machine's state.
    @ivar status: the C{mqtt_connection.status} value it maps to.
    """

    site_id: str
    state: str
    status: str
    retry_count: int
    next_retry: datetime | None
    last_error: str | None
    last_connected_at: datetime | None
    since: datetime

    def as_update(self) -> StatusUpdate:
        return StatusUpdate(
            site_id=self.site_id,
            status=self.status,
            last_connected_at=self.last_connected_at,
            retry_count=self.retry_count,
            next_retry=self.next_retry,
            last_error=self.last_error,
        )


_STATUS_OF_STATE = {
    "stopped": "disconnected",
    "connecting": "connecting",
    "connected": "connected",
    "waiting": "disconnected",
    "error": "error",
    "stopping": "disconnected",
    "restarting": "connecting",
}


class MessageSink(Protocol):
    def submit(self, effects: list[Any]) -> Deferred[None]: ...


class _SiteInputs(Protocol):
    def start(self) -> None:
        "Connect, unless already connected or trying to."

    def stop(self) -> Deferred[None]:
        "Disconnect cleanly and stay stopped; fires when the socket is closed."

    def restart(self) -> None:
        "Forget earlier failures and (re)connect now."

    def _connected(self, session_present: bool) -> None:
        "The broker accepted the connection."

    def _connectFailed(self, error: ConnectFailed) -> None:
        "An attempt failed; another one will be made later."

    def _exhausted(self, error: ConnectFailed) -> None:
        "An attempt failed and it was the last one allowed."

    def _lost(self, error: ConnectFailed) -> None:
        "An established connection ended."

    def _retryDue(self) -> None:
        "The wait before the next attempt is over."

    def _closed(self) -> None:
        "The connection we asked to close is closed."


@dataclass
class _SiteCore:
    config: SiteConfig
    clock: IReactorTime
    client: BrokerClient
    report: Callable[[SiteState], None]
    jitter: Callable[[], float]
    retry_count: int = 0
    last_error: str | None = None
    last_connected_at: datetime | None = None
    next_retry: datetime | None = None
    attempt: int = 0
    state: SiteState | None = None
    stop_waiters: list[Deferred[None]] = field(default_factory=list)
    log: Logger = field(default_factory=Logger)

    def now(self) -> datetime:
        return datetime.fromtimestamp(self.clock.seconds(), UTC)

    def enter(self, state: str) -> None:
        snapshot = SiteState(
            site_id=self.config.site_id,
            state=state,
            status=_STATUS_OF_STATE[state],
            retry_count=self.retry_count,
            next_retry=self.next_retry,
            last_error=self.last_error,
            last_connected_at=self.last_connected_at,
            since=self.now(),
        )
        previous = self.state
        self.state = snapshot
        if previous is None or previous.state != state or previous != snapshot:
            self.log.info(
                "site {site_id} is {state}{detail}",
                site_id=self.config.site_id,
                state=state,
                detail=(
                    f" after {self.retry_count} failed attempts, last: {self.last_error}"
                    if self.last_error
                    else ""
                ),
                retry_count=self.retry_count,
                last_error=self.last_error,
            )
            self.report(snapshot)

    def wait_for_stop(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.stop_waiters.append(d)
        return d

    def finish_stopping(self) -> None:
        waiters, self.stop_waiters = self.stop_waiters, []
        for w in waiters:
            w.callback(None)

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


def _makeMachine() -> Callable[[_SiteCore], _SiteInputs]:
    machine = TypeMachineBuilder(_SiteInputs, _SiteCore)

    def attemptConnection(c: _SiteInputs, s: _SiteCore, *args: object) -> int:
        s.attempt += 1
        token = s.attempt
        s.next_retry = None
        s.enter("connecting")

        def connected(session_present: bool) -> None:
            if s.attempt == token:
                c._connected(session_present)

        def failed(f: Failure) -> None:
            if s.attempt != token:
                return
            error = (
                f.value
                if isinstance(f.value, ConnectFailed)
                else ConnectFailed("protocol", str(f.value))
            )
            if s.retry_count + 1 >= MAX_RETRIES:
                c._exhausted(error)
            else:
                c._connectFailed(error)

        s.client.connect().addCallbacks(connected, failed)
        return token

    def scheduleRetry(c: _SiteInputs, s: _SiteCore, error: ConnectFailed) -> IDelayedCall:
        delay = retry_delay(s.retry_count, s.jitter())
        s.retry_count += 1
        s.last_error = f"{error.category}: {error.detail}"
        s.next_retry = datetime.fromtimestamp(s.clock.seconds() + delay, UTC)
        call = s.clock.callLater(delay, c._retryDue)
        s.enter("waiting")
        return call

    def becomeConnected(c: _SiteInputs, s: _SiteCore, session_present: bool) -> BrokerClient:
        s.retry_count = 0
        s.last_error = None
        s.next_retry = None
        s.last_connected_at = s.now()
        s.client.subscribe([(t.topic, t.qos) for t in s.config.topics])
        s.enter("connected")
        return s.client

    Stopped = machine.state("Stopped")
    Connecting = machine.state("Connecting", attemptConnection)
    Connected = machine.state("Connected", becomeConnected)
    Waiting = machine.state("Waiting", scheduleRetry)
    Error = machine.state("Error")
    Stopping = machine.state("Stopping")
    Restarting = machine.state("Restarting")

    Stopped.upon(_SiteInputs.start).to(Connecting).returns(None)
    Connecting.upon(_SiteInputs.start).loop().returns(None)
    Connected.upon(_SiteInputs.start).loop().returns(None)
    Waiting.upon(_SiteInputs.start).loop().returns(None)
    Restarting.upon(_SiteInputs.start).loop().returns(None)
    Restarting.upon(_SiteInputs.restart).loop().returns(None)
    Stopping.upon(_SiteInputs.start).to(Restarting).returns(None)
    Stopping.upon(_SiteInputs.restart).to(Restarting).returns(None)
    Connecting.upon(_SiteInputs._connected).to(Connected).returns(None)
    Connecting.upon(_SiteInputs._connectFailed).to(Waiting).returns(None)
    Connected.upon(_SiteInputs._lost).to(Waiting).returns(None)
    Waiting.upon(_SiteInputs._retryDue).to(Connecting).returns(None)

    @pep614(Connecting.upon(_SiteInputs._exhausted).to(Error))
    def giveUp(c: _SiteInputs, s: _SiteCore, token: int, error: ConnectFailed) -> None:
        s.retry_count += 1
        s.last_error = f"{error.category}: {error.detail}"
        s.next_retry = None
        s.log.error(
            "site {site_id} gave up after {retries} failed attempts: {error}",
            site_id=s.config.site_id,
            retries=s.retry_count,
            error=s.last_error,
        )
        s.enter("error")

    @pep614(Stopped.upon(_SiteInputs.stop).loop())
    def alreadyStopped(c: _SiteInputs, s: _SiteCore) -> Deferred[None]:
        return succeed(None)

    @pep614(Error.upon(_SiteInputs.stop).to(Stopped))
    def stopFromError(c: _SiteInputs, s: _SiteCore) -> Deferred[None]:
        s.enter("stopped")
        return succeed(None)

    @pep614(Waiting.upon(_SiteInputs.stop).to(Stopped))
    def stopWaiting(c: _SiteInputs, s: _SiteCore, retry: IDelayedCall) -> Deferred[None]:
        retry.cancel()
        s.next_retry = None
        s.enter("stopped")
        return succeed(None)

    def stopConnection(c: _SiteInputs, s: _SiteCore) -> Deferred[None]:
        waiter = s.wait_for_stop()
        s.enter("stopping")
        s.close(c)
        return waiter

    @pep614(Connecting.upon(_SiteInputs.stop).to(Stopping))
    def stopConnecting(c: _SiteInputs, s: _SiteCore, attempt: int) -> Deferred[None]:
        return stopConnection(c, s)

    @pep614(Connected.upon(_SiteInputs.stop).to(Stopping))
    def stopConnected(c: _SiteInputs, s: _SiteCore, client: BrokerClient) -> Deferred[None]:
        return stopConnection(c, s)

    @pep614(Stopping.upon(_SiteInputs.stop).loop())
    @pep614(Restarting.upon(_SiteInputs.stop).to(Stopping))
    def alreadyStopping(c: _SiteInputs, s: _SiteCore) -> Deferred[None]:
        s.enter("stopping")
        return s.wait_for_stop()

    @pep614(Stopping.upon(_SiteInputs._closed).to(Stopped))
    def stopped(c: _SiteInputs, s: _SiteCore) -> None:
        s.enter("stopped")
        s.finish_stopping()

    @pep614(Restarting.upon(_SiteInputs._closed).to(Connecting))
    def restarted(c: _SiteInputs, s: _SiteCore) -> None:
        s.finish_stopping()

    # restart() resets the retry count before it reaches the machine (see
    # SiteService.restart), so that the state entered below already shows it.
    Stopped.upon(_SiteInputs.restart).to(Connecting).returns(None)
    Error.upon(_SiteInputs.restart).to(Connecting).returns(None)
    Error.upon(_SiteInputs.start).loop().returns(None)

    @pep614(Waiting.upon(_SiteInputs.restart).to(Connecting))
    def restartWaiting(c: _SiteInputs, s: _SiteCore, retry: IDelayedCall) -> None:
        retry.cancel()

    def restartConnection(c: _SiteInputs, s: _SiteCore) -> None:
        s.enter("restarting")
        s.close(c)

    @pep614(Connecting.upon(_SiteInputs.restart).to(Restarting))
    def restartConnecting(c: _SiteInputs, s: _SiteCore, attempt: int) -> None:
        restartConnection(c, s)

    @pep614(Connected.upon(_SiteInputs.restart).to(Restarting))
    def restartConnected(c: _SiteInputs, s: _SiteCore, client: BrokerClient) -> None:
        restartConnection(c, s)

    return machine.build()


_SiteMachine = _makeMachine()


class SiteService(Service):
    """
    Keeps one site connected to its broker and feeds its messages to the
    batch writer; a QoS 1 message is acknowledged once its effects are
    committed.

    @param reactor: the reactor (time, threads and file descriptors).
    @param config: the site.
    @param writer: where message effects go (the L{BatchWriter}).
    @param report: called with a L{SiteState} on every state change.
    @param last_connected_at: when the site was last connected, as the
        database remembers it.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        config: SiteConfig,
        writer: MessageSink,
        report: Callable[[SiteState], None],
        jitter: Callable[[], float] | None = None,
        client_factory: Callable[..., BrokerClient] = MQTTClient,
        last_connected_at: datetime | None = None,
    ) -> None:
        self.name = config.site_id
        self.config = config
        self._clock: IReactorTime = reactor
        self._writer = writer
        self._router = Router(config.topics)
        self.messages_received = 0
        self.messages_rejected = 0
        self.last_message_at: datetime | None = None
        client = client_factory(reactor, config, self._message, self._lost)
        self._core = _SiteCore(
            config=config,
            clock=reactor,
            client=client,
            report=report,
            jitter=jitter if jitter is not None else (lambda: random.uniform(-1.0, 1.0)),
        )
        self._core.last_connected_at = last_connected_at
        self._machine = _SiteMachine(self._core)
        self._core.enter("stopped")

    @property
    def state(self) -> SiteState:
        """
        The current state snapshot.
        """
        assert self._core.state is not None
        return self._core.state

    def startService(self) -> None:
        super().startService()
        self._machine.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return self._machine.stop()

    def restart(self) -> None:
        """
        Reset the retry count and reconnect now (from any state; a site in
        error leaves it only this way).
        """
        self._core.retry_count = 0
        self._core.next_retry = None
        self._machine.restart()

    def _lost(self, error: ConnectFailed) -> None:
        self._machine._lost(error)

    def _message(self, message: ReceivedMessage) -> None:
        now = self._core.now()
        self.messages_received += 1
        self.last_message_at = now
        effects = process(self.config.site_id, self._router, message.topic, message.payload, now)
        committed = self._writer.submit(effects)
        client = self._core.client

        def acknowledge(_: object) -> None:
            client.ack(message)

        def unacknowledged(f: Failure) -> None:
            self.log.warn(
                "site {site_id}: message on {topic} not committed, the broker will "
                "redeliver it: {error}",
                site_id=self.config.site_id,
                topic=message.topic,
                error=f.getErrorMessage(),
            )

        committed.addCallbacks(acknowledge, unacknowledged)
