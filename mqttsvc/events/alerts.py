"""
Alerts: the events that need a human, posted to webhooks.

A site that gives up connecting (enters C{error}), the same site once it is
connected again, a site that reaches its device limit, and (with
C{--alert-device-offline}) a device going offline.  Each alert is a JSON
POST to every C{--alert-webhook} URL, retried with exponential backoff when
the receiver fails, and limited per site so that a flapping site cannot
flood anyone: at most C{limit} alerts per site per C{window} seconds; the
rest are counted and summarised in one C{alerts_suppressed} alert as soon
as the window allows.

Deliveries live in memory: an alert still being retried when mqttsvc stops
is lost (and logged).
"""

from __future__ import annotations

import json
from collections import deque
from collections.abc import Callable
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import Cooperator
from twisted.logger import Logger
from twisted.python.failure import Failure

from mqttsvc.db.events import Event

#: Alerts per site per window.
LIMIT = 5
#: The rate limit's window, in seconds.
WINDOW = 600.0
#: Delivery attempts per alert and URL.
ATTEMPTS = 8
#: Seconds before the first retry; each retry waits twice as long...
RETRY_DELAY = 5.0
#: ...up to this.
MAX_RETRY_DELAY = 300.0
#: Seconds one attempt may take.
TIMEOUT = 10.0
#: Deliveries (in flight or waiting to retry) beyond which new ones are refused.
MAX_PENDING = 1000

#: POST C{body} to C{url}; fires with the HTTP status code.
Post = Callable[[str, bytes], Deferred[int]]


def describe_url(url: str) -> str:
    """
    A webhook URL as logs may show it: scheme, host and port only, since
    the path of many webhooks (Slack, Teams) is itself the secret.
    """
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")


@attrs.frozen
class Alert:
    """
    Something a human should hear about.

    @ivar kind: C{site_gave_up}, C{site_recovered}, C{device_limit},
        C{device_offline} or C{alerts_suppressed}.
    @ivar text: one line saying it, for chat receivers.
    """

    kind: str
    site_id: str
    text: str
    event: Event | None = None
    suppressed: int = 0
    latest: Alert | None = None

    def body(self) -> dict[str, Any]:
        """
        The webhook's JSON body: the event's own fields plus C{alert} and
        C{text}.
        """
        body: dict[str, Any] = {"alert": self.kind, "text": self.text, "site_id": self.site_id}
        if self.event is not None:
            body.update(self.event.as_json())
        if self.latest is not None:
            body["suppressed"] = self.suppressed
            body["latest"] = self.latest.body()
        return body


class AlertRules:
    """
    Which events need a human.

    A site's incident starts when it enters C{error} and ends when it is
    connected again: one alert each.  The probes in between (which fail
    back into C{error}) and an operator's restarts stay quiet.  A site that
    mqttsvc resumes in C{error} after a restart of its own (C{stopped} to
    C{error}) was announced by the run before.
    """

    def __init__(self, device_offline: bool = False) -> None:
        self._device_offline = device_offline
        self._given_up: set[str] = set()

    def alert_for(self, event: Event) -> Alert | None:
        site = event.site_id
        if site is None:
            return None
        data = event.data
        if event.type == "connection":
            if data.get("to") == "error":
                if site in self._given_up:
                    return None
                self._given_up.add(site)
                if data.get("from") == "stopped":
                    return None
                return Alert(
                    "site_gave_up",
                    site,
                    f"site {site} gave up connecting: {data.get('reason') or 'no reason given'}",
                    event,
                )
            if data.get("to") == "connected" and site in self._given_up:
                self._given_up.discard(site)
                return Alert("site_recovered", site, f"site {site} is connected again", event)
        elif event.type == "service" and data.get("problem") == "device_limit_reached":
            return Alert(
                "device_limit",
                site,
                f"site {site} has reached its limit of {data.get('limit')} devices: messages of "
                f"new device ids are dead letters (the first: {data.get('kind')} "
                f"{data.get('device_id')})",
                event,
            )
        elif event.type == "device" and self._device_offline and data.get("to") == "offline":
            if data.get("kind") == "site":
                return Alert(
                    "device_offline",
                    site,
                    f"{data.get('devices')} devices of site {site} are offline"
                    + (f": {data['reason']}" if data.get("reason") else ""),
                    event,
                )
            device = data.get("device_id")
            if data.get("gateway_id"):
                device = f"{device} (gateway {data['gateway_id']})"
            return Alert(
                "device_offline",
                site,
                f"{data.get('kind')} {device} of site {site} is offline"
                + (f": {data['reason']}" if data.get("reason") else ""),
                event,
            )
        return None


class RateLimit:
    """
    At most C{limit} per key in any C{window} seconds.
    """

    def __init__(self, clock: IReactorTime, limit: int, window: float) -> None:
        self._clock = clock
        self._limit = limit
        self._window = window
        self._taken: dict[str, deque[float]] = {}

    def _recent(self, key: str) -> deque[float]:
        taken = self._taken.setdefault(key, deque())
        horizon = self._clock.seconds() - self._window
        while taken and taken[0] <= horizon:
            taken.popleft()
        return taken

    def take(self, key: str) -> bool:
        """
        Use one of C{key}'s allowance, if any is left.
        """
        taken = self._recent(key)
        if len(taken) >= self._limit:
            return False
        taken.append(self._clock.seconds())
        return True

    def free_in(self, key: str) -> float:
        """
        Seconds until C{key} may take one again.
        """
        taken = self._recent(key)
        if len(taken) < self._limit:
            return 0.0
        return taken[0] + self._window - self._clock.seconds()


@attrs.frozen
class _Delivery:
    url: str
    body: bytes
    alert: Alert
    attempt: int = 1


@attrs.define
class _Held:
    """
    The alerts of a site that the rate limit held back.
    """

    count: int
    latest: Alert
    timer: IDelayedCall


class AlertDispatcher(Service):
    """
    Turns events into alerts and delivers them to every webhook; never
    waits for a receiver.

    @param clock: schedules retries and the rate limit.
    @param post: sends one request (L{http_post} in production).
    """

    log = Logger()
    name = "alerts"

    def __init__(
        self,
        clock: IReactorTime,
        urls: list[str],
        post: Post,
        rules: AlertRules,
        limit: int = LIMIT,
        window: float = WINDOW,
        attempts: int = ATTEMPTS,
        retry_delay: float = RETRY_DELAY,
        max_retry_delay: float = MAX_RETRY_DELAY,
        max_pending: int = MAX_PENDING,
    ) -> None:
        self._clock = clock
        self._urls = list(urls)
        self._post = post
        self._rules = rules
        self._limit = RateLimit(clock, limit, window)
        self._window = window
        self._attempts = attempts
        self.retry_delay = retry_delay
        self._max_retry_delay = max_retry_delay
        self._max_pending = max_pending
        self._held: dict[str, _Held] = {}
        self._retries: set[IDelayedCall] = set()
        self._in_flight: set[Deferred[int]] = set()
        #: Deliveries that a receiver accepted, and that were given up on.
        self.delivered = 0
        self.failed = 0
        #: Alerts the rate limit held back (each counted in a summary).
        self.suppressed = 0

    def stopService(self) -> None:
        super().stopService()
        lost = len(self._retries) + len(self._in_flight)
        for call in self._retries:
            call.cancel()
        self._retries.clear()
        for held in self._held.values():
            held.timer.cancel()
        self._held.clear()
        for request in list(self._in_flight):
            request.cancel()
        if lost:
            self.log.warn("stopping with {count} alert deliveries unfinished", count=lost)

    def observe(self, event: Event) -> None:
        """
        An event from the hub.
        """
        alert = self._rules.alert_for(event)
        if alert is not None and self.running:
            self.alert(alert)

    def alert(self, alert: Alert) -> None:
        """
        Send an alert now, or count it toward the site's next summary.
        """
        site = alert.site_id
        if self._limit.take(site):
            self.log.info("alert for site {site_id}: {text}", site_id=site, text=alert.text)
            self._send(alert)
            return
        self.suppressed += 1
        held = self._held.get(site)
        if held is not None:
            held.count += 1
            held.latest = alert
            return
        timer = self._clock.callLater(self._limit.free_in(site), self._summarise, site)
        self._held[site] = _Held(1, alert, timer)
        self.log.warn(
            "site {site_id} reached its alert limit; holding its alerts for a summary",
            site_id=site,
        )

    def _summarise(self, site: str) -> None:
        held = self._held.pop(site)
        minutes = self._window / 60
        self.alert(
            Alert(
                "alerts_suppressed",
                site,
                f"{held.count} more alert(s) for site {site} were held back by the rate limit "
                f"({minutes:g} min); the latest: {held.latest.text}",
                suppressed=held.count,
                latest=held.latest,
            )
        )

    def _send(self, alert: Alert) -> None:
        body = json.dumps(alert.body(), separators=(",", ":")).encode()
        for url in self._urls:
            if len(self._retries) + len(self._in_flight) >= self._max_pending:
                self.failed += 1
                self.log.error(
                    "alert for site {site_id} not sent to {url}: {count} deliveries pending",
                    site_id=alert.site_id,
                    url=describe_url(url),
                    count=self._max_pending,
                )
                continue
            self._attempt(_Delivery(url, body, alert))

    def _attempt(self, delivery: _Delivery) -> None:
        try:
            request = self._post(delivery.url, delivery.body)
        except Exception as e:
            self._retry(delivery, str(e))
            return
        self._in_flight.add(request)

        def answered(code: int) -> None:
            self._in_flight.discard(request)
            if 200 <= code < 300:
                self.delivered += 1
            else:
                self._retry(delivery, f"HTTP {code}")

        def failed(failure: Failure) -> None:
            self._in_flight.discard(request)
            if self.running:
                self._retry(delivery, failure.getErrorMessage() or repr(failure.value))

        request.addCallbacks(answered, failed)

    def _retry(self, delivery: _Delivery, reason: str) -> None:
        url = describe_url(delivery.url)
        if delivery.attempt >= self._attempts:
            self.failed += 1
            self.log.error(
                "giving up on alert {kind} for site {site_id} to {url} after {attempts} "
                "attempts: {reason}",
                kind=delivery.alert.kind,
                site_id=delivery.alert.site_id,
                url=url,
                attempts=delivery.attempt,
                reason=reason,
            )
            return
        delay = min(self.retry_delay * 2 ** (delivery.attempt - 1), self._max_retry_delay)
        self.log.warn(
            "alert {kind} for site {site_id} to {url} failed ({reason}); retrying in {delay:g}s",
            kind=delivery.alert.kind,
            site_id=delivery.alert.site_id,
            url=url,
            reason=reason,
            delay=delay,
        )

        def due() -> None:
            self._retries.discard(call)
            self._attempt(attrs.evolve(delivery, attempt=delivery.attempt + 1))

        call = self._clock.callLater(delay, due)
        self._retries.add(call)


class _Discard(Protocol):
    """
    Reads a response body to its end and forgets it; L{done} fires then.

    Not L{twisted.web.client.readBody}: that keeps the whole body in
    memory, however much a receiver (anyone's server) sends, and every
    buffer of ours is bounded.  This keeps nothing; how long it reads is
    bounded by the attempt's timeout, and cancelling L{done} closes the
    connection, as cancelling readBody's Deferred does.
    """

    def __init__(self) -> None:
        self.done: Deferred[None] = Deferred(self._abort)

    def _abort(self, done: Deferred[None]) -> None:
        abort = getattr(self.transport, "abortConnection", None)
        if abort is not None:
            abort()

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: Failure | None = None) -> None:
        # Not after a cancel, which has fired it already.
        if not self.done.called:
            self.done.callback(None)


def http_post(reactor: Any, timeout: float = TIMEOUT) -> Post:
    """
    A L{Post} over Twisted's HTTP client: no connection is kept between
    alerts, each attempt has C{timeout} seconds.
    """
    from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool
    from twisted.web.http_headers import Headers

    agent = Agent(
        reactor, pool=HTTPConnectionPool(reactor, persistent=False), connectTimeout=timeout
    )
    headers = Headers({b"Content-Type": [b"application/json"], b"User-Agent": [b"mqttsvc-alerts"]})
    # FileBodyProducer writes through a Cooperator; the default one runs on
    # the global reactor, this one on ours.
    cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    def post(url: str, body: bytes) -> Deferred[int]:
        async def request() -> int:
            producer = FileBodyProducer(BytesIO(body), cooperator)
            response = await agent.request(b"POST", url.encode(), headers, producer)
            drained = _Discard()
            response.deliverBody(drained)
            await drained.done
            code: int = response.code
            return code

        sent = Deferred.fromCoroutine(request())
        sent.addTimeout(timeout, reactor)
        return sent

    return post
