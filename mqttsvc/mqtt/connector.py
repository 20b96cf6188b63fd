"""
Where broker connections come from: L{Connector}, the service that owns the
threads for paho's blocking connects and makes clients that run on them,
and L{ClientFactory}, the shape of its L{Connector.client} that sites are
given.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from twisted.application.service import Service
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool

from mqttsvc.config import DEFAULT_MAX_PAYLOAD, SiteConfig
from mqttsvc.mqtt.client import BrokerClient, MQTTClient
from mqttsvc.mqtt.codec import ReceivedMessage
from mqttsvc.mqtt.errors import ConnectFailed
from mqttsvc.mqtt.keepalive import KeepaliveSweep

#: Threads for the sites' blocking connects.  A connect to a host that
#: drops SYNs holds its thread for the connect timeout (5 s): this many
#: such attempts at once still leave threads for the others.
CONNECT_THREADS = 32


class ClientFactory(Protocol):
    """
    Makes a site's broker client (L{Connector.client}, or a fake in tests).
    """

    def __call__(
        self,
        config: SiteConfig,
        on_message: Callable[[ReceivedMessage], None],
        on_lost: Callable[[ConnectFailed], None],
        *,
        client_id: str,
        max_payload: int,
    ) -> BrokerClient: ...


class Connector(Service):
    """
    The threads that run paho's blocking C{reconnect()}: a pool of their
    own, sized and named, so that nothing else queued on the reactor's pool
    (name lookups) nor another connector's connects can delay these; and
    the clients that connect on them, looked after by the given
    L{KeepaliveSweep}.

    Connects wait for the service to start: start it before the sites that
    use it, stop it after them.

    @ivar pool: the connect threads, running while the service runs.
    """

    name = "mqtt-connector"

    def __init__(
        self,
        reactor: Any,
        sweep: KeepaliveSweep,
        threads: int = CONNECT_THREADS,
        pool_name: str = "mqtt-connect",
    ) -> None:
        self._reactor = reactor
        self._sweep = sweep
        self.pool = ThreadPool(minthreads=0, maxthreads=threads, name=pool_name)

    def client(
        self,
        config: SiteConfig,
        on_message: Callable[[ReceivedMessage], None],
        on_lost: Callable[[ConnectFailed], None],
        *,
        client_id: str,
        max_payload: int = DEFAULT_MAX_PAYLOAD,
        connect_timeout: float = 5.0,
        persistent: bool = True,
    ) -> MQTTClient:
        """
        A client for the broker of C{config}, not connected yet (see
        L{MQTTClient}).
        """
        return MQTTClient(
            self._reactor,
            config,
            on_message,
            on_lost,
            client_id,
            threads=self.pool,
            sweep=self._sweep,
            connect_timeout=connect_timeout,
            persistent=persistent,
            max_payload=max_payload,
        )

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> Deferred[None]:
        super().stopService()
        # stop() joins the threads, one of which may be in a connect: not
        # on the reactor thread.
        return deferToThreadPool(self._reactor, self._reactor.getThreadPool(), self.pool.stop)
